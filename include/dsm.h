/* dsm: distributed shared memory. Programs are started by dsmexec:
 *   dsmexec -n 4 ./program      or      dsmexec machinefile ./program
 * Link with -ldsm (target/<profile>/libdsm.so or libdsm.a).
 *
 * The shared space is mapped at the same address on every rank (by default
 * 0x40000000, 100 pages; DSM_BASE and DSM_SPACE_SIZE change it). Its pages start
 * spread round-robin over the ranks and move on page faults.
 * On an error these functions print a message naming the problem and end
 * the process with a non-zero status. */
#ifndef DSM_H
#define DSM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Joins the job; returns the base address of the shared space.
 * On x86-64 the space's page faults reach libdsm as SIGBUS (DSM_FAULTS=sigbus,
 * the default): a SIGBUS handler the program installs after this call must
 * call the one it replaces (sigaction's old action), and threads that touch
 * the space must not block SIGBUS (the kernel would then end the process);
 * or set DSM_FAULTS=thread. */
void *dsm_init(int argc, char **argv);
/* Waits for every rank, then leaves the job. */
void dsm_finalize(void);
int dsm_rank(void);
int dsm_size(void);
/* Waits until every rank reached the barrier. */
void dsm_barrier(void);
/* Allocates shared memory from any rank, no collective call needed; the
 * address is the same on every rank. dsm_malloc spreads the pages over the
 * ranks; dsm_remote_malloc keeps them at `rank`. The heap is the upper half
 * of the shared space (DSM_SPACE_SIZE). */
void *dsm_malloc(size_t size);
void *dsm_remote_malloc(size_t size, int rank);
/* Distributed locks, FIFO, held at rank id mod size. */
void dsm_lock(int id);
void dsm_unlock(int id);

#ifdef __cplusplus
}
#endif

#endif
