/* MPI baseline for the DSM's Jacobi kernel (bench/jacobi-vs-mpi.sh).
 *
 *   mpirun -np 2 ./jacobi_mpi [N [SWEEPS]]        (defaults 2048, 50)
 *
 * 5-point Jacobi relaxation on an N x N grid of doubles, the rows split in
 * contiguous blocks over the ranks (the split, initial values and
 * relaxation of `kernels jacobi`, see jacobi.h). Each rank holds its rows
 * plus one ghost row above and below, exchanged with its neighbours
 * (MPI_Sendrecv) before every sweep; two grids swapped each sweep. The row
 * sums reach rank 0 through MPI_Reduce (each row's sum comes from one rank,
 * the others add +0.0, which is exact) and rank 0 adds them in row order,
 * as the serial checksum does, so the checksum is the same bit for bit.
 * Rank 0 prints one line:
 *   jacobi n=N sweeps=S ranks=R seconds=T checksum=C halo_seconds=H
 * T: the slowest rank's time for the sweeps, from after an MPI_Barrier;
 * H: rank 0's time in the halo exchanges (waiting for its neighbour
 * included). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

#include "jacobi.h"

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  long n, sweeps;
  jacobi_args(argc, argv, &n, &sweeps);
  if (n < size) {
    if (rank == 0)
      fprintf(stderr, "jacobi_mpi: N (%ld) must be at least the number of ranks (%d)\n", n, size);
    MPI_Finalize();
    return 2;
  }
  long first, end;
  rows_of(rank, size, n, &first, &end);
  long rows = end - first;
  int up = rank > 0 ? rank - 1 : MPI_PROC_NULL;
  int down = rank < size - 1 ? rank + 1 : MPI_PROC_NULL;

  /* Local row k (0..rows+1) is global row first - 1 + k; 0 and rows + 1
   * are the ghost rows. */
  double *grid[2];
  for (int g = 0; g < 2; g++) {
    grid[g] = malloc((size_t)(rows + 2) * n * sizeof(double));
    if (!grid[g]) {
      fprintf(stderr, "jacobi_mpi: out of memory\n");
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    for (long k = 0; k < (rows + 2) * n; k++)
      grid[g][k] = 0.0;
    for (long i = first; i < end; i++)
      for (long j = 0; j < n; j++)
        grid[g][(i - first + 1) * n + j] = initial(i, j, n);
  }
  long lo = first > 1 ? first : 1, hi = end < n - 1 ? end : n - 1;

  MPI_Barrier(MPI_COMM_WORLD);
  double start = MPI_Wtime(), halo = 0.0;
  for (long it = 0; it < sweeps; it++) {
    double *src = grid[it % 2], *dst = grid[1 - it % 2];
    /* First own row up, the lower neighbour's first row into the lower
     * ghost; then last own row down, the upper neighbour's last row into
     * the upper ghost. */
    double before = MPI_Wtime();
    MPI_Sendrecv(src + n, (int)n, MPI_DOUBLE, up, 0, src + (rows + 1) * n, (int)n, MPI_DOUBLE,
                 down, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    MPI_Sendrecv(src + rows * n, (int)n, MPI_DOUBLE, down, 1, src, (int)n, MPI_DOUBLE, up, 1,
                 MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    halo += MPI_Wtime() - before;
    for (long i = lo; i < hi; i++) {
      long k = i - first + 1;
      relax_row(src + (k - 1) * n, src + k * n, src + (k + 1) * n, dst + k * n, n);
    }
  }
  double mine = MPI_Wtime() - start, seconds;
  MPI_Reduce(&mine, &seconds, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);

  double *sums = calloc((size_t)n, sizeof(double)), *all = calloc((size_t)n, sizeof(double));
  const double *result = grid[sweeps % 2];
  for (long i = first; i < end; i++)
    sums[i] = row_sum(result + (i - first + 1) * n, n);
  MPI_Reduce(sums, all, (int)n, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
  if (rank == 0) {
    double checksum = -0.0;
    for (long i = 0; i < n; i++)
      checksum += all[i];
    printf("jacobi n=%ld sweeps=%ld ranks=%d seconds=%.6f checksum=%.17g halo_seconds=%.6f\n", n,
           sweeps, size, seconds, checksum, halo);
  }
  free(sums);
  free(all);
  free(grid[0]);
  free(grid[1]);
  MPI_Finalize();
  return 0;
}
