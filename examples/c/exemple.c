/* The seed's exemple.c: every rank prints the base of the shared space;
 * rank 0 writes an int in page 0 (which it owns at start), and rank 1 reads
 * it through a page fault and checks the value. */
#include <stdio.h>
#include <stdlib.h>
#include "dsm.h"

int main(int argc, char **argv)
{
    char *base = dsm_init(argc, argv);
    int rank = dsm_rank();
    printf("[%d] base address of the shared space: %p\n", rank, (void *)base);
    int *value = (int *)base; /* page 0 */
    if (rank == 0) {
        *value = 4242;
    }
    dsm_barrier();
    int status = 0;
    if (rank == 1) {
        printf("[%d] read %d from page 0\n", rank, *value);
        if (*value != 4242) {
            fprintf(stderr, "[%d] expected 4242\n", rank);
            status = 1;
        }
    }
    dsm_finalize();
    return status;
}
