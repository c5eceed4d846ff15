//! dsm: processes started by `dsmexec` (or `srun`, `mpirun`) share one address space.
//!
//! ```no_run
//! let dsm = dsm::init(dsm::Config::from_env()?)?;      // joins the job
//! let words = dsm.words();                             // the shared space, as atomics
//! if dsm.rank() == 0 {
//!     words[0].store(42, std::sync::atomic::Ordering::Relaxed);
//! }
//! dsm.barrier()?;
//! assert_eq!(words[0].load(std::sync::atomic::Ordering::Relaxed), 42);
//! dsm.finalize()?;                                     // termination sync
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Start it with `dsmexec -n 4 target/release/my_program` (a rank per
//! process; see `dsmexec --help`). Memory is sequentially consistent at
//! page granularity: a store is seen by every later load of any rank, and
//! atomics on shared words are atomic across ranks.
//!
//! # A tour of the API
//!
//! **Segments** ([`Dsm::alloc`], [`Placement`]): any rank allocates alone,
//! and the segment has the same address on every rank. Hand it to the
//! others through shared memory (or your own messages):
//!
//! ```no_run
//! # use std::sync::atomic::Ordering::Relaxed;
//! # let dsm = dsm::init_from_env()?;
//! use dsm::Placement;
//! if dsm.rank() == 0 {
//!     let rows = dsm.alloc(1 << 20, Placement::Localized(1))?; // pages live at rank 1
//!     dsm.words()[0].store(rows.addr() as u64, Relaxed);       // publish the address
//! }
//! dsm.barrier()?;
//! let rows = dsm.words()[0].load(Relaxed) as *mut u64;         // same address everywhere
//! # let _ = rows;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! **Read-only tables** ([`Placement::Replicated`], [`Dsm::seal`]): the
//! creator writes, seals, and every rank then reads a local copy that is
//! never invalidated; a store after the seal is an error naming the segment.
//!
//! ```no_run
//! # use std::sync::atomic::Ordering::Relaxed;
//! # let dsm = dsm::init_from_env()?;
//! let table = dsm.alloc(64 << 10, dsm::Placement::Replicated)?;
//! for (i, word) in dsm.segment_words(&table).iter().enumerate() {
//!     word.store(i as u64 * i as u64, Relaxed);
//! }
//! dsm.seal(&table)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! **Locks** ([`Dsm::lock`]): FIFO, managed at rank `id mod N`; a waiting
//! thread sleeps. The guard releases the lock when dropped.
//!
//! ```no_run
//! # use std::sync::atomic::Ordering::Relaxed;
//! # let dsm = dsm::init_from_env()?;
//! let total = &dsm.words()[8];
//! {
//!     let _held = dsm.lock(7)?;
//!     total.store(total.load(Relaxed) + 1, Relaxed); // no other rank in between
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! **Memory beyond a node** ([`Dsm::set_cache_size`], `DSM_CACHE_SIZE`):
//! each rank holds the pages it is home of plus a bounded cache of the
//! others, evicting the oldest; [`Dsm::stats`] counts what moved.
//!
//! ```no_run
//! # let dsm = dsm::init_from_env()?;
//! dsm.set_cache_size(Some(512 << 20))?; // at most 512 MiB of other ranks' pages
//! // ... work ...
//! let stats = dsm.stats();
//! println!("{} faults, {} pages evicted", stats.read_faults + stats.write_faults,
//!          stats.evictions_clean + stats.evictions_written_back);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! **Ending**: [`Dsm::finalize`] waits for every rank, so no rank leaves
//! while another may still need a page it holds. A rank that ends without
//! it is reported by its peers (and named by dsmexec).
//!
//! From C, C++ and Fortran: `include/dsm.h` and `include/dsm.f90`, installed
//! with `scripts/install.sh --prefix DIR` (pkg-config `dsm`, CMake
//! `dsm::dsm`).

use std::sync::Arc;

pub use dsm_core::config::EngineCpu;
pub use dsm_core::dsm::LockGuard;
pub use dsm_core::typed::{self, Epoch, Locked, Reads, SharedArray};
use dsm_core::{BootstrapError, Transport};
pub use dsm_core::{
    Config, Consistency, Dsm, DsmError, Placement, Protocol, Segment, StatsSnapshot, PAGE_SIZE,
};
use transport_rdma::Selected;
use transport_tcp::{TcpOptions, TcpTransport};

mod capi;

/// Joins the job this process was started in (by dsmexec, Slurm's `srun` or
/// Open MPI's `mpirun`): maps the shared space, connects to every other rank
/// and starts the fault engine.
pub fn init(config: Config) -> Result<Dsm, DsmError> {
    dsm_core::logging::init();
    let config = config.validate()?;
    if !dsm_rendezvous::launched() {
        return Err(BootstrapError::from(dsm_rendezvous::JoinError::NotLaunched).into());
    }
    // Map first: a bad base or size fails before anyone waits for us (under
    // srun or mpirun, before this rank registers with rank 0).
    let space = Dsm::prepare(&config)?;
    // DSM_TRANSPORT (tcp, rdma, auto): decided here, so `rdma` without a
    // device fails before anyone waits for us.
    let selected = transport_rdma::select_from_env()
        .map_err(|e| dsm_core::TransportError::Setup(e.to_string()))?;
    let boot = dsm_rendezvous::bootstrap_from_env().map_err(BootstrapError::from)?;
    let hosts: Vec<String> = boot.peers.iter().map(|p| p.host.clone()).collect();
    // The receive threads share the engine's CPU (see dsm_core::sched).
    let tcp_options = TcpOptions {
        receiver_cpu: config.engine_cpu.for_rank(boot.rank),
        receiver_sched: config.service_sched,
        ..TcpOptions::from_env().map_err(|e| {
            DsmError::Config(dsm_core::config::ConfigError {
                name: e.name,
                value: e.value,
                why: e.why,
            })
        })?
    };
    let transport: Arc<dyn Transport> = TcpTransport::connect(boot, &tcp_options)?;
    // RDMA: the TCP transport becomes the bootstrap channel of the queue
    // pairs; DSM messages go over SEND/RECV, page data by RDMA WRITE into a
    // landing arena of one slot per page of the shared space.
    let transport: Arc<dyn Transport> = match selected {
        Selected::Tcp => transport,
        Selected::Rdma(port) => {
            let pages = config.size / PAGE_SIZE;
            transport_rdma::connect_job(transport, &port, hosts.clone(), pages)
                .map_err(dsm_core::TransportError::from)?
        }
    };
    Dsm::start(space, transport, hosts, config)
}

/// [`init`] with [`Config::from_env`] (the `DSM_*` variables).
pub fn init_from_env() -> Result<Dsm, DsmError> {
    init(Config::from_env()?)
}
