/* dsm: distributed shared memory. Programs are started by dsmexec:
 *   dsmexec -n 4 ./program      or      dsmexec machinefile ./program
 * (or srun / mpirun). Build against an installed dsm with
 *   cc prog.c $(pkg-config --cflags --libs dsm)
 * or CMake's find_package(dsm) and the target dsm::dsm.
 *
 * The shared space is mapped at the same address on every rank (by default
 * 0x40000000, 100 pages; DSM_BASE and DSM_SPACE_SIZE change it). Its pages
 * start spread round-robin over the ranks and move on page faults; the
 * upper half is the heap that dsm_malloc / dsm_alloc carve segments from.
 * Memory is sequentially consistent at page granularity.
 *
 * Errors. By default (DSM_ERRORS_ARE_FATAL) a call that fails prints a
 * message naming the problem and ends the process with status 1, so a
 * program need not check anything. After
 * dsm_set_error_mode(DSM_ERRORS_RETURN) a failing call returns an error
 * code (functions returning int) or NULL (functions returning a pointer)
 * instead; dsm_last_error() gives the calling thread's message and
 * dsm_strerror(code) the code's description.
 *
 * Threads. Every function may be called from any thread of the rank once
 * dsm_init has returned; dsm_init and dsm_finalize are called once, by one
 * thread. dsm_barrier is for one thread per rank at a time. */
#ifndef DSM_H
#define DSM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes. */
#define DSM_SUCCESS 0
#define DSM_ERR_NOT_INITIALIZED 1 /* dsm_init not called, or dsm_finalize was */
#define DSM_ERR_INVALID_ARG 2     /* a negative rank, unknown placement, lock not held... */
#define DSM_ERR_NO_MEMORY 3       /* shared heap, node memory or cache too small */
#define DSM_ERR_PEER_LOST 4       /* a rank of the job died or stopped responding */
#define DSM_ERR_STOPPED 5         /* the DSM engine has stopped (after a fatal error) */
#define DSM_ERR_INTERNAL 6

/* Error modes (dsm_set_error_mode). */
#define DSM_ERRORS_ARE_FATAL 0 /* the default: print and exit(1) */
#define DSM_ERRORS_RETURN 1    /* return the code / NULL */

/* Placements (dsm_alloc), after ALMOS-MKH. */
#define DSM_DISTRIBUTED 0 /* page p at rank p mod size */
#define DSM_LOCALIZED 1   /* every page at the rank given */
#define DSM_REPLICATED 2  /* at its creator until dsm_seal, then read-only copies everywhere */
#define DSM_PRIVATE 3     /* each rank its own pages, no coherence traffic */
/* Or-ed into a placement (dsm_alloc, dsm_coalloc): the segment's
 * consistency, whatever DSM_PROTOCOL says. DSM_SEQUENTIAL: one writer per
 * page, every access sequentially consistent, atomics work across ranks
 * (keep flags and counters updated with atomics there under
 * DSM_PROTOCOL=release). DSM_RELEASE: several writers per page, writes seen
 * by others after the writer's next barrier/lock/unlock and the reader's
 * next barrier/lock; not with DSM_REPLICATED. */
#define DSM_SEQUENTIAL 0x100
#define DSM_RELEASE 0x200

/* Sets the error mode (above) for the whole process, before or after
 * dsm_init. Returns the previous mode, or -1 for an unknown mode. */
int dsm_set_error_mode(int mode);
/* A static description of an error code; never NULL. */
const char *dsm_strerror(int code);
/* The calling thread's last error message ("" if none), valid until its
 * next failing call. */
const char *dsm_last_error(void);

/* Joins the job; returns the base address of the shared space (NULL on
 * error in DSM_ERRORS_RETURN mode). Calling it again returns the same base.
 * On x86-64 the space's page faults reach libdsm as SIGBUS (DSM_FAULTS=sigbus,
 * the default): a SIGBUS handler the program installs after this call must
 * call the one it replaces (sigaction's old action), and threads that touch
 * the space must not block SIGBUS (the kernel would then end the process);
 * or set DSM_FAULTS=thread. libdsm also catches SIGUSR1 (a hang report:
 * what each thread waits for). */
void *dsm_init(int argc, char **argv);
/* Waits for every rank (a barrier), then leaves the job. A rank that ends
 * without it takes its pages from the others, which then fail. 0 or an
 * error code. */
int dsm_finalize(void);
/* This rank, 0..size-1, and the number of ranks; -1 before dsm_init (in
 * DSM_ERRORS_RETURN mode). */
int dsm_rank(void);
int dsm_size(void);
/* Waits until every rank reached the barrier. 0 or an error code. */
int dsm_barrier(void);

/* Allocates shared memory from any one rank, no collective call needed; the
 * address is the same on every rank (pass it to the others through shared
 * memory or your own messages). Returns NULL on error (DSM_ERRORS_RETURN).
 * dsm_malloc spreads the pages over the ranks; dsm_remote_malloc keeps them
 * at `rank`; dsm_alloc takes a placement (above; `rank` is read for
 * DSM_LOCALIZED only). The heap is the upper half of the shared space
 * (DSM_SPACE_SIZE); dsm_free gives a segment back. */
void *dsm_malloc(size_t size);
void *dsm_remote_malloc(size_t size, int rank);
void *dsm_alloc(size_t size, int placement, int rank);
/* Collective allocation: every rank calls it, in the same order, with the
 * same arguments, and every rank gets the same address (as MPI_Win_allocate;
 * a DSM_REPLICATED segment made this way has rank 0 as its creator: rank 0
 * writes it and calls dsm_seal). Use it
 * when every rank works on a part of the data: dsm_malloc / dsm_alloc
 * called on every rank would give each rank a segment of its own.
 * Different arguments on different ranks end the job with an error naming
 * both calls. NULL on error (DSM_ERRORS_RETURN). */
void *dsm_coalloc(size_t size, int placement, int rank);
/* A segment of this rank's own, homed at it, whose initial contents are the
 * file at `path` (its size, or `size` bytes if larger; the rest zeros).
 * NULL on error. dsm_sync writes such a segment (its creator only) back to
 * `path`, each page as it is once every rank's writes to it have settled.
 * 0 or an error code. */
void *dsm_alloc_file(const char *path, size_t size);
int dsm_sync(void *addr, const char *path);
/* Frees the segment at `addr` (as an allocation returned it, on any
 * rank), collectively: every rank calls it, in the same order as its other
 * frees, once none of its threads touches the segment any more (whichever
 * rank allocated it). Returns when no rank holds anything of it: cached
 * copies, home pages and their memory are gone, and the range may hold a
 * later segment. A file segment's changes not written by dsm_sync are lost.
 * Touching the segment afterwards ends the job with an error (or reads the
 * segment allocated there since). Ranks freeing different segments at the
 * same point end the job with an error naming both. 0 or an error code
 * (DSM_ERR_INVALID_ARG: not a segment's address, or freed already). */
int dsm_free(void *addr);
/* Seals a DSM_REPLICATED segment this rank allocated (`addr` as returned):
 * from then on every rank reads it from a local read-only copy, and a
 * store to it is a fatal error naming the segment. 0 or an error code. */
int dsm_seal(void *addr);

/* Distributed locks, FIFO, managed at rank id mod size; a waiting thread
 * sleeps. dsm_unlock by the process that holds the lock. 0 or an error
 * code. */
int dsm_lock(int id);
int dsm_unlock(int id);

/* This rank's statistics since dsm_init. */
typedef struct dsm_stats {
  uint64_t rank;
  uint64_t read_faults, write_faults;     /* faults served by the DSM */
  uint64_t pages_sent, pages_received;    /* pages moved over the network */
  uint64_t bytes_sent, bytes_received;
  uint64_t pages_prefetched;              /* read ahead of a sequential stream */
  uint64_t evictions_clean, evictions_written_back; /* cache (DSM_CACHE_SIZE) */
  uint64_t peak_cached_bytes;
  uint64_t fault_latency_samples;         /* remote faults timed */
  uint64_t fault_latency_p50_ns, fault_latency_p99_ns, fault_latency_max_ns;
} dsm_stats_t;
/* Fills *out. 0 or an error code. */
int dsm_stats(dsm_stats_t *out);

#ifdef __cplusplus
}
#endif

#endif
