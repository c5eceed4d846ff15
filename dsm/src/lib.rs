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
//! From C, `include/dsm.h` gives the seed's API (`dsm_init`, `dsm_finalize`,
//! `dsm_rank`, `dsm_size`, `dsm_barrier`); link with `-ldsm`.

use std::sync::Arc;

pub use dsm_core::config::EngineCpu;
pub use dsm_core::dsm::LockGuard;
use dsm_core::{Bootstrap, Transport};
pub use dsm_core::{Config, Dsm, DsmError, Placement, Protocol, Segment, StatsSnapshot, PAGE_SIZE};
use transport_rdma::Selected;
use transport_tcp::{TcpOptions, TcpTransport};

mod capi;

/// Joins the job this process was started in (by dsmexec, Slurm's `srun` or
/// Open MPI's `mpirun`): maps the shared space, connects to every other rank
/// and starts the fault engine.
pub fn init(config: Config) -> Result<Dsm, DsmError> {
    dsm_core::logging::init();
    let config = config.validate()?;
    if !Bootstrap::launched() {
        return Err(dsm_core::BootstrapError::NotLaunched.into());
    }
    // Map first: a bad base or size fails before anyone waits for us (under
    // srun or mpirun, before this rank registers with rank 0).
    let space = Dsm::prepare(&config)?;
    // DSM_TRANSPORT (tcp, rdma, auto): decided here, so `rdma` without a
    // device fails before anyone waits for us.
    let selected = transport_rdma::select_from_env()
        .map_err(|e| dsm_core::TransportError::Setup(e.to_string()))?;
    let boot = Bootstrap::from_env()?;
    let hosts: Vec<String> = boot.peers.iter().map(|p| p.host.clone()).collect();
    // The receive threads share the engine's CPU (see dsm_core::sched).
    let tcp_options = TcpOptions {
        receiver_cpu: config.engine_cpu.for_rank(boot.rank),
        receiver_sched: config.service_sched,
        ..TcpOptions::default()
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
