/* False sharing through dsm.h (issue 26): every rank increments its own
 * 8-byte counters of one shared array in which all ranks' counters
 * interleave (counter i of rank r at index i * ranks + r, so every page
 * holds every rank's counters), with a barrier every BARRIER increments.
 * Under the default protocol the pages move from writer to writer; under
 * DSM_PROTOCOL=release each rank writes its own copy and the words it
 * changed reach the pages' homes at the barriers. After the last barrier
 * every rank checks every counter of every rank.
 *
 * Usage: dsmexec -n 4 falseshare [-i INCREMENTS] [-c COUNTERS] [-b BARRIER]
 *                                [-r]
 * (defaults 1000000 increments per rank, 512 counters per rank, a barrier
 * every 10000 increments). -r allocates the counters DSM_RELEASE whatever
 * DSM_PROTOCOL says (release-consistent pages in any job). Prints, on rank 0, one line:
 * "falseshare ranks R increments I counters C pages P barriers B seconds S".
 * Exit 1 on a wrong count. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "dsm.h"

#define PAGE 4096

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int usage(void)
{
    fprintf(stderr, "usage: falseshare [-i INCREMENTS] [-c COUNTERS] [-b BARRIER] [-r] (each at least 1)\n");
    return 2;
}

int main(int argc, char **argv)
{
    long increments = 1000000, counters = 512, barrier_every = 10000;
    int consistency = 0;
    for (int i = 1; i < argc; i++) {
        long *target = NULL;
        if (strcmp(argv[i], "-r") == 0) {
            consistency = DSM_RELEASE;
            continue;
        }
        if (strcmp(argv[i], "-i") == 0)
            target = &increments;
        else if (strcmp(argv[i], "-c") == 0)
            target = &counters;
        else if (strcmp(argv[i], "-b") == 0)
            target = &barrier_every;
        if (target == NULL || i + 1 == argc)
            return usage();
        *target = atol(argv[++i]);
    }
    if (increments < 1 || counters < 1 || barrier_every < 1)
        return usage();
    dsm_init(argc, argv);
    long rank = dsm_rank(), ranks = dsm_size();
    size_t bytes = (size_t)(counters * ranks) * sizeof(uint64_t);
    uint64_t *count = dsm_coalloc(bytes, DSM_DISTRIBUTED | consistency, 0);
    if (count == NULL) {
        fprintf(stderr, "falseshare: dsm_coalloc of %zu bytes failed\n", bytes);
        dsm_finalize();
        return 1;
    }
    dsm_barrier();
    double start = now();
    long barriers = 0;
    for (long k = 0; k < increments; k++) {
        count[(k % counters) * ranks + rank]++;
        if ((k + 1) % barrier_every == 0) {
            dsm_barrier();
            barriers++;
        }
    }
    dsm_barrier();
    double seconds = now() - start;
    long wrong = 0;
    for (long i = 0; i < counters * ranks; i++) {
        long counter = i / ranks;
        uint64_t want = (uint64_t)(increments / counters + (counter < increments % counters));
        if (count[i] != want) {
            if (wrong++ == 0)
                fprintf(stderr, "falseshare: rank %ld reads counter %ld of rank %ld = %llu, expected %llu\n", rank,
                        counter, i % ranks, (unsigned long long)count[i], (unsigned long long)want);
        }
    }
    if (rank == 0)
        printf("falseshare ranks %ld increments %ld counters %ld pages %zu barriers %ld seconds %.4f\n", ranks,
               increments, counters, (bytes + PAGE - 1) / PAGE, barriers + 1, seconds);
    dsm_finalize();
    return wrong ? 1 : 0;
}
