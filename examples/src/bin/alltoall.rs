//! Every rank sends one message to every other rank over the TCP transport
//! and checks each message it receives: content derived from (sender,
//! receiver, size), so a lost, duplicated, misrouted or corrupted message
//! is caught. `alltoall [BYTES]` sets the largest message (default 1 MiB).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use dsm_core::Transport;
use transport_tcp::{TcpOptions, TcpTransport};

fn expected(from: usize, to: usize, max: usize) -> Vec<u8> {
    // Sizes vary by pair, from a few bytes up to `max`.
    let len = 8 + (from * 7919 + to * 104_729) % max.max(1);
    let seed = (from as u64) << 32 | to as u64;
    (0..len as u64)
        .map(|i| {
            (seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(i.wrapping_mul(1442695040888963407))
                >> 56) as u8
        })
        .collect()
}

fn main() -> Result<()> {
    dsm_core::logging::init();
    let max: usize = match std::env::args().nth(1) {
        Some(s) => s.parse().with_context(|| format!("bad size {s:?}"))?,
        None => 1 << 20,
    };
    let boot = dsm_rendezvous::bootstrap_from_env()?;
    let host = boot.host_of(boot.rank).to_string();
    let transport = TcpTransport::connect(boot, &TcpOptions::default())?;
    let (rank, size) = (transport.rank(), transport.size());
    for to in (0..size).filter(|r| *r != rank) {
        transport.send(to, &expected(rank, to, max))?;
    }
    let mut seen = vec![false; size];
    for _ in 1..size {
        let msg = transport
            .recv_timeout(Duration::from_secs(60))?
            .context("no message within 60 s")?;
        if msg.from == rank || seen[msg.from] {
            bail!("unexpected second message from rank {}", msg.from);
        }
        if msg.payload != expected(msg.from, rank, max) {
            bail!(
                "message from rank {} is corrupted ({} bytes)",
                msg.from,
                msg.payload.len()
            );
        }
        seen[msg.from] = true;
    }
    transport.shutdown(Duration::from_secs(30))?;
    println!(
        "rank {rank} on {host}: {} messages from every other rank verified",
        size - 1
    );
    Ok(())
}
