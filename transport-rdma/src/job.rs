//! Connecting a DSM job's RDMA transport: the glue `dsm::init` uses once
//! [`crate::select_from_env`] chose RDMA.
//!
//! The job's TCP transport is connected first and serves as the bootstrap
//! channel (queue pair numbers, GIDs, PSNs and the landing arenas' keys
//! travel over it, and a rank whose TCP connection drops is reported lost);
//! DSM messages then travel over SEND/RECV on one RC queue pair per peer,
//! and page data by RDMA WRITE into the receiver's landing arena (one
//! registered page slot per page of the shared space), unless
//! `DSM_RDMA_PAGES=send`. Ranks on the same host whose TCP transport
//! talks through rings in shared memory keep to those rings
//! (`DSM_RDMA_LOCAL`, see [`RdmaTransport`]).

use std::sync::Arc;

use dsm_core::Transport;

use crate::transport::PageMode;
use crate::verbs::PortSummary;
use crate::{RdmaDevice, RdmaError, RdmaOptions, RdmaTransport};

/// Opens the device of `port` (or `DSM_RDMA_DEVICE` / `DSM_RDMA_PORT` when
/// set), connects an [`RdmaTransport`] over the connected bootstrap
/// transport `boot` with a landing arena of `pages` pages (the shared
/// space's size in pages) and logs (at `info`) which device carries the job
/// and how page data moves. `hosts` (one per rank) name peers in error
/// messages.
pub fn connect_job(
    boot: Arc<dyn Transport>,
    port: &PortSummary,
    hosts: Vec<String>,
    pages: usize,
) -> Result<Arc<RdmaTransport>, RdmaError> {
    let mut opts = RdmaOptions::from_env()?;
    if opts.device.is_none() {
        opts.device = Some(port.device.clone());
        opts.port = opts.port.or(Some(port.port));
    }
    let rank = boot.rank();
    if opts.poll_spin_auto {
        let local_ranks = hosts
            .get(rank)
            .map_or(1, |mine| hosts.iter().filter(|h| *h == mine).count());
        opts.poll_spin = crate::auto_poll_spin(local_ranks);
    }
    opts.hosts = hosts;
    opts.landing_pages = pages;
    let device = RdmaDevice::open(&opts)?;
    let (name, cfg) = (device.name().to_string(), device.port());
    let transport = RdmaTransport::connect(boot, device, Vec::new(), &opts)?;
    let pages_by = match (opts.pages, transport.landing_pages()) {
        (PageMode::Send, _) => "page data over SEND/RECV (DSM_RDMA_PAGES=send)".to_string(),
        (PageMode::Write, 0) => "page data over SEND/RECV (no landing arena)".to_string(),
        (PageMode::Write, n) => {
            format!("page data by RDMA WRITE into a landing arena of {n} pages")
        }
    };
    let co_located: Vec<String> = (0..transport.size())
        .filter(|r| transport.shares_memory_with(*r))
        .map(|r| r.to_string())
        .collect();
    let local = if co_located.is_empty() {
        String::new()
    } else {
        format!(
            "; co-located rank(s) {} through shared memory (DSM_RDMA_LOCAL=rdma for the adapter)",
            co_located.join(", ")
        )
    };
    tracing::info!(
        "rank {rank}: transport rdma (device {name}, port {}, GID index {}; messages over SEND/RECV, up to {} B inline, {pages_by}{local}; completion threads poll {} us before sleeping)",
        cfg.port,
        cfg.gid_index,
        transport.inline_limit(),
        opts.poll_spin.as_micros()
    );
    Ok(transport)
}
