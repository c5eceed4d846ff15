/* The Jacobi kernel of jacobi_mpi.c through dsm.h (bench/jacobi-vs-mpi.sh).
 *
 *   DSM_SPACE_SIZE=320M dsmexec -n 2 ./jacobi_dsm [N [SWEEPS]]   (defaults 2048, 50)
 *
 * The same split, initial values and relaxation (jacobi.h), in the shared
 * space as `kernels jacobi` lays it out: for each of the two grids, every
 * rank's block of rows is a segment localized at that rank, allocated
 * collectively (dsm_coalloc), so every rank sees every block at the same
 * address. A sweep reads the neighbouring ranks' boundary rows straight
 * from their blocks (page faults fetch them); one dsm_barrier per sweep.
 * Rank 0 then reads the whole result and adds the row sums in row order.
 * Rank 0 prints one line, the fields of jacobi_mpi's, then its time in
 * the barriers and its DSM statistics over the timed sweeps:
 *   jacobi n=N sweeps=S ranks=R seconds=T checksum=C barrier_seconds=B read_faults=...
 * T: rank 0's time for the sweeps (each ends with a barrier), from after a
 * barrier; B: the part of it spent in dsm_barrier. The heap (half of DSM_SPACE_SIZE) must hold 16 N^2 bytes. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "dsm.h"
#include "jacobi.h"

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(int argc, char **argv) {
  dsm_init(argc, argv);
  int rank = dsm_rank(), size = dsm_size();
  long n, sweeps;
  jacobi_args(argc, argv, &n, &sweeps);
  if (n < size) {
    if (rank == 0)
      fprintf(stderr, "jacobi_dsm: N (%ld) must be at least the number of ranks (%d)\n", n, size);
    dsm_finalize();
    return 2;
  }
  /* row[g][i]: global row i of grid g, in its rank's block. */
  double **row[2];
  for (int g = 0; g < 2; g++) {
    row[g] = malloc((size_t)n * sizeof(double *));
    for (int r = 0; r < size; r++) {
      long f, e;
      rows_of(r, size, n, &f, &e);
      double *block = dsm_coalloc((size_t)(e - f) * n * sizeof(double), DSM_LOCALIZED, r);
      for (long i = f; i < e; i++)
        row[g][i] = block + (i - f) * n;
    }
  }
  long first, end;
  rows_of(rank, size, n, &first, &end);
  for (int g = 0; g < 2; g++)
    for (long i = first; i < end; i++)
      for (long j = 0; j < n; j++)
        row[g][i][j] = initial(i, j, n);
  long lo = first > 1 ? first : 1, hi = end < n - 1 ? end : n - 1;

  dsm_barrier();
  dsm_stats_t before, after;
  dsm_stats(&before);
  double start = now(), waited = 0.0;
  for (long it = 0; it < sweeps; it++) {
    double **src = row[it % 2], **dst = row[1 - it % 2];
    for (long i = lo; i < hi; i++)
      relax_row(src[i - 1], src[i], src[i + 1], dst[i], n);
    double arrived = now();
    dsm_barrier();
    waited += now() - arrived;
  }
  double seconds = now() - start;
  dsm_stats(&after);

  if (rank == 0) {
    double checksum = -0.0;
    for (long i = 0; i < n; i++)
      checksum += row_sum(row[sweeps % 2][i], n);
    printf("jacobi n=%ld sweeps=%ld ranks=%d seconds=%.6f checksum=%.17g barrier_seconds=%.6f "
           "read_faults=%llu write_faults=%llu pages_received=%llu pages_sent=%llu\n",
           n, sweeps, size, seconds, checksum, waited,
           (unsigned long long)(after.read_faults - before.read_faults),
           (unsigned long long)(after.write_faults - before.write_faults),
           (unsigned long long)(after.pages_received - before.pages_received),
           (unsigned long long)(after.pages_sent - before.pages_sent));
  }
  dsm_finalize();
  return 0;
}
