//! RDMA verbs transport for dsm (issue 5).
//!
//! * [`verbs`]: small safe wrappers over `rdma-sys` (device list, context,
//!   protection domain, memory region, completion queue, RC queue pair).
//! * [`RdmaTransport`]: implements [`dsm_core::Transport`] over one RC queue
//!   pair per peer (SEND/RECV; pages given to `send_page` by RDMA WRITE into
//!   the receiver's landing arena), plus synchronous one-sided RDMA READ /
//!   WRITE of regions registered before connecting. Connection data travels
//!   over a bootstrap transport (e.g. `transport_tcp::TcpTransport`).
//! * [`connect_job`]: the RDMA transport of a DSM job over its connected
//!   TCP transport (what `dsm::init` uses with `DSM_TRANSPORT=rdma|auto`).
//! * [`mod@select`]: choosing the transport from `DSM_TRANSPORT` (rdma, tcp
//!   or auto).
//!
//! Without an RDMA device every entry point returns a typed error
//! ([`verbs::VerbsError::NoDevice`]); nothing panics.

mod job;
pub mod select;
mod transport;
pub mod verbs;

pub use job::connect_job;
pub use select::{rdma_available, select, select_from_env, SelectError, Selected, TransportChoice};
pub use transport::{
    auto_poll_spin, LocalPath, PageCounts, PageMode, PollCpu, RdmaDevice, RdmaError, RdmaOptions,
    RdmaTransport, RemoteRegion, PAGE_BYTES, SHARED_CPU_POLL_SPIN, SPARE_CPU_POLL_SPIN,
};
pub use verbs::{MemoryRegion, VerbsError};
