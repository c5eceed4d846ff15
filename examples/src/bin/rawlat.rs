//! Raw round trip between the two processes of a dsmexec job, over the
//! transport `dsm::init` gives them (rings in shared memory on one host,
//! loopback TCP with `DSM_SHM=0`), with no DSM on top: rank 1 sends 16 B,
//! rank 0 answers 4 KiB, as a read fault and its grant do. Rank 1 prints
//! the median and mean round trip. It is the baseline of `faultlat`'s
//! remote fault between the same kind of processes (the criterion suite's
//! raw round trip runs both ends as threads of one process).
//!
//! `rawlat [ROUND_TRIPS]` (default 5000), exactly 2 ranks. The receive
//! threads are pinned and scheduled as `dsm::init` does
//! (`DSM_ENGINE_CPU`, `DSM_SERVICE_SCHED`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dsm_core::Transport;
use transport_tcp::{TcpOptions, TcpTransport};

/// Round trips before the measured ones (connections and caches warm).
const WARM_UP: usize = 200;

fn main() -> anyhow::Result<()> {
    let round_trips: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("ROUND_TRIPS must be a count")?
        .unwrap_or(5000);
    let config = dsm_core::Config::from_env()?;
    let boot = dsm_rendezvous::bootstrap_from_env()?;
    let rank = boot.rank;
    if boot.size != 2 {
        bail!("rawlat needs exactly 2 ranks, not {}", boot.size);
    }
    let options = TcpOptions {
        receiver_cpu: config.engine_cpu.for_rank(rank),
        receiver_sched: config.service_sched,
        ..TcpOptions::from_env()
            .map_err(|e| anyhow::anyhow!("{}={}: {}", e.name, e.value, e.why))?
    };
    let transport = TcpTransport::connect(boot, &options)?;
    let peer = 1 - rank;
    let page = vec![7u8; 4096];
    let mut samples = Vec::with_capacity(round_trips);
    for i in 0..WARM_UP + round_trips {
        if rank == 1 {
            let start = Instant::now();
            transport.send(peer, &[1u8; 16])?;
            let answer = transport.recv()?;
            let took = start.elapsed();
            if answer.payload.len() != page.len() {
                bail!("answer of {} bytes, expected 4096", answer.payload.len());
            }
            transport.recycle(answer.payload);
            if i >= WARM_UP {
                samples.push(took);
            }
        } else {
            let ask = transport.recv()?;
            transport.recycle(ask.payload);
            transport.send(peer, &page)?;
        }
    }
    if rank == 1 {
        samples.sort();
        let mean = samples.iter().sum::<Duration>() / samples.len().max(1) as u32;
        let median = samples.get(samples.len() / 2).copied().unwrap_or_default();
        let path = if transport.shares_memory_with(peer) {
            "shared-memory rings"
        } else {
            "TCP"
        };
        println!(
            "raw round trip 16 B / 4 KiB over {path}: median {:.1} us, mean {:.1} us ({} round trips)",
            median.as_secs_f64() * 1e6,
            mean.as_secs_f64() * 1e6,
            samples.len()
        );
    }
    transport.shutdown(Duration::from_secs(10))?;
    Ok(())
}
