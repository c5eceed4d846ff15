/* The Jacobi kernel shared by jacobi_mpi.c and jacobi_dsm.c: the same
 * split, initial values, relaxation and checksum as `kernels jacobi`
 * (examples/src/bin/kernels.rs), operation for operation, so that all three
 * give the same checksum bit for bit. Build with -ffp-contract=off (no
 * fused multiply-add, which Rust never emits for a * b + c either). */
#ifndef JACOBI_H
#define JACOBI_H

#include <stdio.h>
#include <stdlib.h>

/* Rows [*first, *end) of n for rank of size (kernels.rs `rows_of`). */
static inline void rows_of(long rank, long size, long n, long *first, long *end) {
  *first = rank * n / size;
  *end = (rank + 1) * n / size;
}

/* Fixed boundary, zero inside (kernels.rs `initial`). */
static inline double initial(long i, long j, long n) {
  if (i == 0 || j == 0 || i == n - 1 || j == n - 1)
    return (double)((i * 31 + j * 17) % 100);
  return 0.0;
}

/* One row of a sweep (kernels.rs `relax_row`): out[j] from its four
 * neighbours, added in the same order. Not inlined, like the Rust one. */
__attribute__((noinline)) static void relax_row(const double *restrict up,
                                                const double *restrict mid,
                                                const double *restrict down,
                                                double *restrict out, long n) {
  for (long j = 1; j < n - 1; j++)
    out[j] = 0.25 * (up[j] + down[j] + mid[j - 1] + mid[j + 1]);
}

/* The sum of one row, left to right, as Rust's f64 `sum` (which starts
 * from -0.0). kernels.rs `checksum` adds the row sums in row order. */
static inline double row_sum(const double *row, long n) {
  double s = -0.0;
  for (long j = 0; j < n; j++)
    s += row[j];
  return s;
}

/* N and SWEEPS from argv (defaults 2048 and 50, as `kernels jacobi`);
 * exits on bad input. */
static inline void jacobi_args(int argc, char **argv, long *n, long *sweeps) {
  *n = 2048;
  *sweeps = 50;
  for (int k = 1; k < argc && k <= 2; k++) {
    char *end;
    long v = strtol(argv[k], &end, 10);
    if (*argv[k] == '\0' || *end != '\0' || v < 0) {
      fprintf(stderr, "usage: %s [N [SWEEPS]]: not a count: %s\n", argv[0], argv[k]);
      exit(2);
    }
    *(k == 1 ? n : sweeps) = v;
  }
}

#endif
