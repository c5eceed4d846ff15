! dsm: distributed shared memory, the Fortran interface to libdsm (dsm.h).
! Programs are started by dsmexec (or srun / mpirun):
!   gfortran prog.f90 -I PREFIX/include $(pkg-config --libs dsm) -o prog
!   dsmexec -n 4 ./prog
! Shared memory comes as C addresses (type(c_ptr)); turn them into arrays
! with c_f_pointer. Every function mirrors the C function of the same name
! (see dsm.h for its behaviour, errors and thread safety); functions
! returning integer(c_int) return 0 or an error code.
module dsm
  use, intrinsic :: iso_c_binding
  implicit none
  private
  public :: dsm_init, dsm_finalize, dsm_rank, dsm_size, dsm_barrier
  public :: dsm_malloc, dsm_remote_malloc, dsm_alloc, dsm_coalloc, dsm_free, dsm_seal
  public :: dsm_alloc_file, dsm_sync
  public :: dsm_lock, dsm_unlock, dsm_set_error_mode, dsm_strerror
  public :: dsm_last_error, dsm_stats, dsm_stats_t

  integer(c_int), parameter, public :: DSM_SUCCESS = 0
  integer(c_int), parameter, public :: DSM_ERR_NOT_INITIALIZED = 1
  integer(c_int), parameter, public :: DSM_ERR_INVALID_ARG = 2
  integer(c_int), parameter, public :: DSM_ERR_NO_MEMORY = 3
  integer(c_int), parameter, public :: DSM_ERR_PEER_LOST = 4
  integer(c_int), parameter, public :: DSM_ERR_STOPPED = 5
  integer(c_int), parameter, public :: DSM_ERR_INTERNAL = 6
  integer(c_int), parameter, public :: DSM_ERRORS_ARE_FATAL = 0
  integer(c_int), parameter, public :: DSM_ERRORS_RETURN = 1
  integer(c_int), parameter, public :: DSM_DISTRIBUTED = 0
  integer(c_int), parameter, public :: DSM_LOCALIZED = 1
  integer(c_int), parameter, public :: DSM_REPLICATED = 2
  integer(c_int), parameter, public :: DSM_PRIVATE = 3
  ! Added to a placement: the segment's consistency (see dsm.h).
  integer(c_int), parameter, public :: DSM_SEQUENTIAL = 256
  integer(c_int), parameter, public :: DSM_RELEASE = 512

  ! dsm_stats_t of dsm.h.
  type, bind(c) :: dsm_stats_t
    integer(c_int64_t) :: rank
    integer(c_int64_t) :: read_faults, write_faults
    integer(c_int64_t) :: pages_sent, pages_received
    integer(c_int64_t) :: bytes_sent, bytes_received
    integer(c_int64_t) :: pages_prefetched
    integer(c_int64_t) :: evictions_clean, evictions_written_back
    integer(c_int64_t) :: peak_cached_bytes
    integer(c_int64_t) :: fault_latency_samples
    integer(c_int64_t) :: fault_latency_p50_ns, fault_latency_p99_ns, fault_latency_max_ns
  end type dsm_stats_t

  interface
    ! Joins the job; the base of the shared space (argc/argv are not used).
    function dsm_init_c(argc, argv) bind(c, name="dsm_init") result(base)
      import :: c_int, c_ptr
      integer(c_int), value :: argc
      type(c_ptr), value :: argv
      type(c_ptr) :: base
    end function dsm_init_c

    function dsm_finalize() bind(c, name="dsm_finalize") result(err)
      import :: c_int
      integer(c_int) :: err
    end function dsm_finalize

    function dsm_rank() bind(c, name="dsm_rank") result(rank)
      import :: c_int
      integer(c_int) :: rank
    end function dsm_rank

    function dsm_size() bind(c, name="dsm_size") result(size)
      import :: c_int
      integer(c_int) :: size
    end function dsm_size

    function dsm_barrier() bind(c, name="dsm_barrier") result(err)
      import :: c_int
      integer(c_int) :: err
    end function dsm_barrier

    function dsm_malloc(size) bind(c, name="dsm_malloc") result(addr)
      import :: c_size_t, c_ptr
      integer(c_size_t), value :: size
      type(c_ptr) :: addr
    end function dsm_malloc

    function dsm_remote_malloc(size, rank) bind(c, name="dsm_remote_malloc") result(addr)
      import :: c_size_t, c_int, c_ptr
      integer(c_size_t), value :: size
      integer(c_int), value :: rank
      type(c_ptr) :: addr
    end function dsm_remote_malloc

    function dsm_alloc(size, placement, rank) bind(c, name="dsm_alloc") result(addr)
      import :: c_size_t, c_int, c_ptr
      integer(c_size_t), value :: size
      integer(c_int), value :: placement, rank
      type(c_ptr) :: addr
    end function dsm_alloc

    ! Collective: every rank calls it with the same arguments, and gets the same address.
    function dsm_coalloc(size, placement, rank) bind(c, name="dsm_coalloc") result(addr)
      import :: c_size_t, c_int, c_ptr
      integer(c_size_t), value :: size
      integer(c_int), value :: placement, rank
      type(c_ptr) :: addr
    end function dsm_coalloc

    ! Collective: every rank frees the same segment (the address an allocation returned).
    function dsm_free(addr) bind(c, name="dsm_free") result(err)
      import :: c_ptr, c_int
      type(c_ptr), value :: addr
      integer(c_int) :: err
    end function dsm_free

    ! path: a NUL-terminated string, e.g. trim(name) // c_null_char
    function dsm_alloc_file(path, size) bind(c, name="dsm_alloc_file") result(addr)
      import :: c_char, c_size_t, c_ptr
      character(kind=c_char), dimension(*), intent(in) :: path
      integer(c_size_t), value :: size
      type(c_ptr) :: addr
    end function dsm_alloc_file

    function dsm_sync(addr, path) bind(c, name="dsm_sync") result(err)
      import :: c_char, c_ptr, c_int
      type(c_ptr), value :: addr
      character(kind=c_char), dimension(*), intent(in) :: path
      integer(c_int) :: err
    end function dsm_sync

    function dsm_seal(addr) bind(c, name="dsm_seal") result(err)
      import :: c_int, c_ptr
      type(c_ptr), value :: addr
      integer(c_int) :: err
    end function dsm_seal

    function dsm_lock(id) bind(c, name="dsm_lock") result(err)
      import :: c_int
      integer(c_int), value :: id
      integer(c_int) :: err
    end function dsm_lock

    function dsm_unlock(id) bind(c, name="dsm_unlock") result(err)
      import :: c_int
      integer(c_int), value :: id
      integer(c_int) :: err
    end function dsm_unlock

    function dsm_set_error_mode(mode) bind(c, name="dsm_set_error_mode") result(previous)
      import :: c_int
      integer(c_int), value :: mode
      integer(c_int) :: previous
    end function dsm_set_error_mode

    function dsm_stats(out) bind(c, name="dsm_stats") result(err)
      import :: c_int, dsm_stats_t
      type(dsm_stats_t), intent(out) :: out
      integer(c_int) :: err
    end function dsm_stats

    function dsm_strerror_c(code) bind(c, name="dsm_strerror") result(text)
      import :: c_int, c_ptr
      integer(c_int), value :: code
      type(c_ptr) :: text
    end function dsm_strerror_c

    function dsm_last_error_c() bind(c, name="dsm_last_error") result(text)
      import :: c_ptr
      type(c_ptr) :: text
    end function dsm_last_error_c

    function c_strlen(s) bind(c, name="strlen") result(n)
      import :: c_ptr, c_size_t
      type(c_ptr), value :: s
      integer(c_size_t) :: n
    end function c_strlen
  end interface

contains

  ! Joins the job; returns the base address of the shared space.
  function dsm_init() result(base)
    type(c_ptr) :: base
    base = dsm_init_c(0_c_int, c_null_ptr)
  end function dsm_init

  ! The description of an error code.
  function dsm_strerror(code) result(text)
    integer(c_int), intent(in) :: code
    character(len=:), allocatable :: text
    text = from_c_string(dsm_strerror_c(code))
  end function dsm_strerror

  ! The calling thread's last error message.
  function dsm_last_error() result(text)
    character(len=:), allocatable :: text
    text = from_c_string(dsm_last_error_c())
  end function dsm_last_error

  function from_c_string(s) result(text)
    type(c_ptr), intent(in) :: s
    character(len=:), allocatable :: text
    character(kind=c_char), pointer :: chars(:)
    integer :: i, n
    n = int(c_strlen(s))
    allocate(character(len=n) :: text)
    call c_f_pointer(s, chars, [n])
    do i = 1, n
      text(i:i) = chars(i)
    end do
  end function from_c_string
end module dsm
