//! Connecting a DSM job's RDMA transport: the glue `dsm::init` uses once
//! [`crate::select_from_env`] chose RDMA.
//!
//! The job's TCP transport is connected first and serves as the bootstrap
//! channel (queue pair numbers, GIDs and PSNs travel over it, and a rank
//! whose TCP connection drops is reported lost); DSM messages, page data
//! included, then travel over SEND/RECV on one RC queue pair per peer.

use std::sync::Arc;

use dsm_core::Transport;

use crate::verbs::PortSummary;
use crate::{RdmaDevice, RdmaError, RdmaOptions, RdmaTransport};

/// Opens the device of `port` (or `DSM_RDMA_DEVICE` / `DSM_RDMA_PORT` when
/// set), connects an [`RdmaTransport`] over the connected bootstrap
/// transport `boot` and logs (at `info`) which device carries the job.
/// `hosts` (one per rank) name peers in error messages.
pub fn connect_job(
    boot: Arc<dyn Transport>,
    port: &PortSummary,
    hosts: Vec<String>,
) -> Result<Arc<RdmaTransport>, RdmaError> {
    let mut opts = RdmaOptions::from_env()?;
    if opts.device.is_none() {
        opts.device = Some(port.device.clone());
        opts.port = opts.port.or(Some(port.port));
    }
    opts.hosts = hosts;
    let rank = boot.rank();
    let device = RdmaDevice::open(&opts)?;
    let (name, cfg) = (device.name().to_string(), device.port());
    let transport = RdmaTransport::connect(boot, device, Vec::new(), &opts)?;
    tracing::info!(
        "rank {rank}: transport rdma (device {name}, port {}, GID index {}; messages over SEND/RECV)",
        cfg.port,
        cfg.gid_index
    );
    Ok(transport)
}
