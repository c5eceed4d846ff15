/* The C API end to end, as an installed dsm's user writes it (also built
 * as C++ by the tests): errors returned instead of fatal, a segment
 * allocated with a placement and handed to the other ranks through the
 * shared space, lock-protected counters with an exact total, statistics.
 *   dsmexec -n 3 ./api */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <dsm.h>

#define ROUNDS 200

static int check(int err, const char *what) {
  if (err != DSM_SUCCESS) {
    fprintf(stderr, "%s: %s (%s)\n", what, dsm_strerror(err), dsm_last_error());
    return 1;
  }
  return 0;
}

int main(int argc, char **argv) {
  dsm_set_error_mode(DSM_ERRORS_RETURN);
  uint64_t *base = (uint64_t *)dsm_init(argc, argv);
  if (base == NULL) {
    fprintf(stderr, "dsm_init: %s\n", dsm_last_error());
    return 1;
  }
  int rank = dsm_rank(), size = dsm_size();

  /* Errors come back as codes with a message. */
  if (dsm_unlock(99) != DSM_ERR_INVALID_ARG || strstr(dsm_last_error(), "not held") == NULL) {
    fprintf(stderr, "rank %d: dsm_unlock of a lock not held: %s\n", rank, dsm_last_error());
    return 1;
  }
  if (dsm_alloc(4096, 42, 0) != NULL) {
    fprintf(stderr, "rank %d: dsm_alloc took placement 42\n", rank);
    return 1;
  }

  /* Rank 0 allocates the counters at rank 1 and publishes their address. */
  if (rank == 0) {
    uint64_t *counters = (uint64_t *)dsm_alloc(4096, DSM_LOCALIZED, size > 1 ? 1 : 0);
    if (counters == NULL) {
      fprintf(stderr, "dsm_alloc: %s\n", dsm_last_error());
      return 1;
    }
    base[0] = (uint64_t)(uintptr_t)counters;
  }
  if (check(dsm_barrier(), "dsm_barrier")) return 1;
  uint64_t *counters = (uint64_t *)(uintptr_t)base[0];

  for (int i = 0; i < ROUNDS; i++) {
    if (check(dsm_lock(7), "dsm_lock")) return 1;
    counters[0] += 1;
    counters[1 + rank] += 2;
    if (check(dsm_unlock(7), "dsm_unlock")) return 1;
  }
  if (check(dsm_barrier(), "dsm_barrier")) return 1;

  /* A collective allocation: the same segment on every rank, each rank
   * writes its slot, every rank reads them all. */
  uint64_t *slots = (uint64_t *)dsm_coalloc(4096, DSM_DISTRIBUTED, 0);
  if (slots == NULL) {
    fprintf(stderr, "dsm_coalloc: %s\n", dsm_last_error());
    return 1;
  }
  slots[rank] = (uint64_t)rank + 1;
  if (check(dsm_barrier(), "dsm_barrier")) return 1;
  uint64_t slot_sum = 0;
  for (int r = 0; r < size; r++) slot_sum += slots[r];
  if (slot_sum != (uint64_t)(size * (size + 1) / 2)) {
    fprintf(stderr, "rank %d: the collective segment's slots add up to %llu\n", rank,
            (unsigned long long)slot_sum);
    return 1;
  }
  /* Freed collectively: the next collective segment reads as zeros, and a
   * second free of the same address is an error. */
  if (check(dsm_free(slots), "dsm_free")) return 1;
  if (dsm_free(slots) != DSM_ERR_INVALID_ARG) {
    fprintf(stderr, "rank %d: a second dsm_free did not fail\n", rank);
    return 1;
  }
  uint64_t *fresh = (uint64_t *)dsm_coalloc(4096, DSM_DISTRIBUTED, 0);
  if (fresh == NULL || fresh[(rank + 1) % size] != 0) {
    fprintf(stderr, "rank %d: the segment after a free is not all zeros\n", rank);
    return 1;
  }
  if (check(dsm_free(fresh), "dsm_free")) return 1;

  /* A file segment: rank 0 maps a file it wrote, every rank reads it, the
   * last rank changes a byte, rank 0 writes the segment back to the file. */
  static const char path[] = "api_file_segment.bin";
  enum { FILE_BYTES = 5000 };
  if (rank == 0) {
    FILE *f = fopen(path, "wb");
    for (int i = 0; f != NULL && i < FILE_BYTES; i++) fputc(i % 251, f);
    if (f == NULL || fclose(f) != 0) {
      fprintf(stderr, "rank 0: cannot write %s\n", path);
      return 1;
    }
    unsigned char *file = (unsigned char *)dsm_alloc_file(path, 0);
    if (file == NULL) {
      fprintf(stderr, "dsm_alloc_file: %s\n", dsm_last_error());
      return 1;
    }
    base[2] = (uint64_t)(uintptr_t)file;
  }
  if (check(dsm_barrier(), "dsm_barrier")) return 1;
  unsigned char *file = (unsigned char *)(uintptr_t)base[2];
  for (int i = 0; i < FILE_BYTES; i++) {
    if (file[i] != i % 251) {
      fprintf(stderr, "rank %d: file byte %d is %d\n", rank, i, file[i]);
      return 1;
    }
  }
  if (check(dsm_barrier(), "dsm_barrier")) return 1;
  if (rank == size - 1) file[4097] = 0xEE;
  if (check(dsm_barrier(), "dsm_barrier")) return 1;
  if (rank == 0) {
    if (check(dsm_sync(file, path), "dsm_sync")) return 1;
    FILE *f = fopen(path, "rb");
    int changed = -1;
    for (int i = 0; f != NULL && i < FILE_BYTES; i++) {
      int c = fgetc(f);
      if (c != (i == 4097 ? 0xEE : i % 251)) changed = i;
    }
    if (f == NULL || changed != -1) {
      fprintf(stderr, "rank 0: the synced file differs at byte %d\n", changed);
      return 1;
    }
    fclose(f);
  }

  uint64_t total = counters[0], mine = counters[1 + rank];
  dsm_stats_t stats;
  if (check(dsm_stats(&stats), "dsm_stats")) return 1;
  if (stats.rank != (uint64_t)rank || stats.read_faults + stats.write_faults == 0) {
    fprintf(stderr, "rank %d: statistics say rank %llu, %llu faults\n", rank,
            (unsigned long long)stats.rank,
            (unsigned long long)(stats.read_faults + stats.write_faults));
    return 1;
  }
  printf("rank %d: total %llu of %d, mine %llu\n", rank, (unsigned long long)total,
         size * ROUNDS, (unsigned long long)mine);
  if (check(dsm_finalize(), "dsm_finalize")) return 1;
  return total == (uint64_t)(size * ROUNDS) && mine == 2 * ROUNDS ? 0 : 1;
}
