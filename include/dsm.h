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

#ifdef __cplusplus
extern "C" {
#endif

/* Joins the job; returns the base address of the shared space. */
void *dsm_init(int argc, char **argv);
/* Waits for every rank, then leaves the job. */
void dsm_finalize(void);
int dsm_rank(void);
int dsm_size(void);
/* Waits until every rank reached the barrier. */
void dsm_barrier(void);

#ifdef __cplusplus
}
#endif

#endif
