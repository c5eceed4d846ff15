! Jacobi relaxation in Fortran on the shared space (the dsm module over
! libdsm): an N x N grid of doubles in two segments allocated by rank 0,
! columns split across the ranks (Fortran is column-major), one barrier
! per sweep. Rank 0 checks the result against the same sweeps run serially
! in private memory, bit for bit.
!   dsmexec -n 3 ./jacobi [N [SWEEPS]]     (default 64, 20; N above 80 needs
!   a larger space than the default 100 pages: DSM_SPACE_SIZE=64M)
program jacobi
  use, intrinsic :: iso_c_binding
  use dsm
  implicit none
  integer :: n = 64, sweeps = 20
  type(c_ptr) :: base, grid_a, grid_b
  integer(c_int64_t), pointer :: slots(:)
  real(c_double), pointer :: a(:, :), b(:, :), src(:, :), dst(:, :)
  real(c_double), allocatable :: pa(:, :), pb(:, :)
  integer :: rank, nranks, first, last, sweep, i, j
  integer(c_int) :: err
  character(len=32) :: arg
  real(c_double) :: total, expected

  if (command_argument_count() >= 1) then
    call get_command_argument(1, arg)
    read (arg, *) n
  end if
  if (command_argument_count() >= 2) then
    call get_command_argument(2, arg)
    read (arg, *) sweeps
  end if

  base = dsm_init()
  rank = dsm_rank()
  nranks = dsm_size()
  call c_f_pointer(base, slots, [2])

  ! Rank 0 allocates both grids and publishes their addresses.
  if (rank == 0) then
    grid_a = dsm_alloc(int(n, c_size_t) * int(n, c_size_t) * 8_c_size_t, DSM_DISTRIBUTED, 0_c_int)
    grid_b = dsm_alloc(int(n, c_size_t) * int(n, c_size_t) * 8_c_size_t, DSM_DISTRIBUTED, 0_c_int)
    slots(1) = transfer(grid_a, slots(1))
    slots(2) = transfer(grid_b, slots(2))
  end if
  err = dsm_barrier()
  grid_a = transfer(slots(1), grid_a)
  grid_b = transfer(slots(2), grid_b)
  call c_f_pointer(grid_a, a, [n, n])
  call c_f_pointer(grid_b, b, [n, n])

  ! This rank's columns.
  first = rank * n / nranks + 1
  last = (rank + 1) * n / nranks
  do j = first, last
    do i = 1, n
      a(i, j) = initial(i, j)
      b(i, j) = initial(i, j)
    end do
  end do
  err = dsm_barrier()

  ! With no sweep the result is the initial grid.
  src => b
  dst => a
  do sweep = 1, sweeps
    if (mod(sweep, 2) == 1) then
      src => a
      dst => b
    else
      src => b
      dst => a
    end if
    do j = max(first, 2), min(last, n - 1)
      do i = 2, n - 1
        dst(i, j) = 0.25d0 * (src(i - 1, j) + src(i + 1, j) + src(i, j - 1) + src(i, j + 1))
      end do
    end do
    err = dsm_barrier()
  end do

  if (rank == 0) then
    total = sum(dst)
    allocate (pa(n, n), pb(n, n))
    do j = 1, n
      do i = 1, n
        pa(i, j) = initial(i, j)
        pb(i, j) = initial(i, j)
      end do
    end do
    do sweep = 1, sweeps
      if (mod(sweep, 2) == 1) then
        call relax(pa, pb)
      else
        call relax(pb, pa)
      end if
    end do
    if (mod(sweeps, 2) == 1) then
      expected = sum(pb)
    else
      expected = sum(pa)
    end if
    if (total /= expected) then
      write (*, '(a, es24.16, a, es24.16)') 'jacobi: checksum ', total, ' differs from the serial ', expected
      stop 1
    end if
    write (*, '(a, i0, a, i0, a, i0, a, f0.6, a)') 'jacobi ', n, 'x', n, ', ', sweeps, &
      ' sweeps: checksum ', total, ' equals the serial run'
  end if
  err = dsm_finalize()

contains

  pure function initial(i, j) result(v)
    integer, intent(in) :: i, j
    real(c_double) :: v
    if (i == 1 .or. j == 1) then
      v = 1.0d0
    else
      v = 0.0d0
    end if
  end function initial

  subroutine relax(from, to)
    real(c_double), intent(in) :: from(:, :)
    real(c_double), intent(inout) :: to(:, :)
    integer :: ii, jj
    do jj = 2, n - 1
      do ii = 2, n - 1
        to(ii, jj) = 0.25d0 * (from(ii - 1, jj) + from(ii + 1, jj) + from(ii, jj - 1) + from(ii, jj + 1))
      end do
    end do
  end subroutine relax
end program jacobi
