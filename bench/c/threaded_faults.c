/* Concurrent read faults of one rank through dsm.h (issue 25): rank 1 of 2
 * starts T threads, each reading its own PAGES pages homed at rank 0 once
 * (run with DSM_PREFETCH=0: one remote fault per page), and reports faults
 * per second. The thread counts given on the command line are measured in
 * turn in one job (e.g. `1 8 1 8 1 8`: three alternated pairs), each on a
 * segment of its own that rank 0 fills and every rank frees afterwards (a
 * page rank 1 lost to a write would be asked back with its neighbours, not
 * faulted one by one). Every read is checked.
 *
 * Usage: dsmexec -n 2 threaded_faults [-p PAGES] T [T...]
 * Prints one line per measurement: "threads T faults N seconds S rate R/s",
 * then, when 1 and another count alternate, the median of the per-pair
 * ratios "median ratio T/1 X". Exit 1 on a wrong value. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "dsm.h"

#define PAGE 4096
#define MAX_THREADS 64
#define MAX_ROUNDS 64

static volatile uint64_t *pages_base;
static long pages_per_thread = 500;
static uint64_t generation;
static int bad;

struct slice {
    long first;
};

static void *reader(void *arg)
{
    const struct slice *s = arg;
    for (long p = s->first; p < s->first + pages_per_thread; p++) {
        uint64_t v = pages_base[p * (PAGE / 8)];
        if (v != generation * 1000003u + (uint64_t)p)
            __atomic_store_n(&bad, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int counts[MAX_ROUNDS], rounds = 0, most = 1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-p") == 0 && i + 1 < argc) {
            pages_per_thread = atol(argv[++i]);
            continue;
        }
        int t = atoi(argv[i]);
        if (t < 1 || t > MAX_THREADS || rounds == MAX_ROUNDS) {
            fprintf(stderr, "usage: threaded_faults [-p PAGES] T [T...] (1 <= T <= %d)\n", MAX_THREADS);
            return 2;
        }
        counts[rounds++] = t;
        most = t > most ? t : most;
    }
    if (rounds == 0 || pages_per_thread < 1) {
        fprintf(stderr, "usage: threaded_faults [-p PAGES] T [T...]\n");
        return 2;
    }
    dsm_init(argc, argv);
    if (dsm_size() != 2) {
        fprintf(stderr, "threaded_faults runs on 2 ranks (dsmexec -n 2)\n");
        dsm_finalize();
        return 2;
    }
    int rank = dsm_rank();
    long total = (long)most * pages_per_thread;
    double rates[MAX_ROUNDS];
    for (int r = 0; r < rounds; r++) {
        generation = (uint64_t)r + 1;
        pages_base = dsm_coalloc((size_t)total * PAGE, DSM_LOCALIZED, 0);
        if (rank == 0)
            for (long p = 0; p < total; p++)
                pages_base[p * (PAGE / 8)] = generation * 1000003u + (uint64_t)p;
        dsm_barrier();
        if (rank == 1) {
            pthread_t threads[MAX_THREADS];
            struct slice slices[MAX_THREADS];
            double start = now();
            for (int t = 0; t < counts[r]; t++) {
                slices[t].first = (long)t * pages_per_thread;
                pthread_create(&threads[t], NULL, reader, &slices[t]);
            }
            for (int t = 0; t < counts[r]; t++)
                pthread_join(threads[t], NULL);
            double seconds = now() - start;
            long faults = (long)counts[r] * pages_per_thread;
            rates[r] = (double)faults / seconds;
            printf("threads %d faults %ld seconds %.4f rate %.0f/s\n", counts[r], faults, seconds, rates[r]);
        }
        dsm_barrier();
        dsm_free((void *)pages_base);
    }
    if (rank == 1) {
        double ratios[MAX_ROUNDS];
        int pairs = 0, other = 0;
        for (int r = 0; r + 1 < rounds; r += 2) {
            if (counts[r] == 1 && counts[r + 1] != 1) {
                ratios[pairs++] = rates[r + 1] / rates[r];
                other = counts[r + 1];
            }
        }
        if (pairs > 0) {
            qsort(ratios, (size_t)pairs, sizeof ratios[0], by_value);
            printf("median ratio %d/1 %.2f over %d pairs\n", other, ratios[pairs / 2], pairs);
        }
        if (bad)
            fprintf(stderr, "threaded_faults: a read saw a wrong value\n");
    }
    int status = bad ? 1 : 0;
    dsm_finalize();
    return status;
}
