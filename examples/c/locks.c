/* Shared allocation and locks from C: rank 0 allocates a counter with
 * dsm_remote_malloc (its page lives at the last rank) and publishes its
 * address at the base of the shared space; every rank adds 1 to it
 * ITERATIONS times under dsm_lock, with a plain load and store; every rank
 * checks the exact total. A block from dsm_malloc checks reads of memory
 * another rank wrote. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "dsm.h"

#define ITERATIONS 200

int main(int argc, char **argv)
{
    volatile uint64_t *base = dsm_init(argc, argv);
    int rank = dsm_rank(), size = dsm_size();
    if (rank == 0) {
        volatile uint64_t *counter = dsm_remote_malloc(sizeof(uint64_t), size - 1);
        volatile uint64_t *block = dsm_malloc(3 * 4096);
        for (int i = 0; i < 3 * 512; i++)
            block[i] = (uint64_t)i * 3;
        base[0] = (uint64_t)(uintptr_t)counter;
        base[1] = (uint64_t)(uintptr_t)block;
    }
    dsm_barrier();
    volatile uint64_t *counter = (volatile uint64_t *)(uintptr_t)base[0];
    volatile uint64_t *block = (volatile uint64_t *)(uintptr_t)base[1];
    for (int i = 0; i < ITERATIONS; i++) {
        dsm_lock(3);
        *counter = *counter + 1;
        dsm_unlock(3);
    }
    int status = 0;
    for (int i = 0; i < 3 * 512; i++) {
        if (block[i] != (uint64_t)i * 3) {
            fprintf(stderr, "[%d] block[%d] = %llu\n", rank, i, (unsigned long long)block[i]);
            status = 1;
            break;
        }
    }
    dsm_barrier();
    uint64_t total = *counter;
    if (total != (uint64_t)size * ITERATIONS) {
        fprintf(stderr, "[%d] counter = %llu, expected %d\n", rank, (unsigned long long)total, size * ITERATIONS);
        status = 1;
    } else {
        printf("[%d] counter = %llu under dsm_lock, block verified\n", rank, (unsigned long long)total);
    }
    dsm_finalize();
    return status;
}
