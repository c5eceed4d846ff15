//! 4 KiB RDMA READ round trips between two ranks of one process (two RC queue
//! pairs on the same device), for comparison with `ib_read_lat -s 4096` run
//! in the same VM session (`scripts/rdma-vm-test.sh --bench`).
//!
//!   cargo run --release -p transport-rdma --example read_lat [ITERATIONS]

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dsm_core::bootstrap::Bootstrap;
use dsm_core::Transport;
use transport_rdma::{RdmaDevice, RdmaOptions, RdmaTransport};
use transport_tcp::{TcpOptions, TcpTransport};

const SIZE: usize = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iters: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2000);
    if let Err(why) = transport_rdma::select::active_port() {
        eprintln!("read_lat: no RDMA device ({why}); nothing measured");
        std::process::exit(2);
    }
    let boots = Bootstrap::loopback_group(2)?;
    let handles: Vec<_> = boots
        .into_iter()
        .map(|b| {
            thread::spawn(move || -> Result<_, String> {
                let tcp =
                    TcpTransport::connect(b, &TcpOptions::default()).map_err(|e| e.to_string())?;
                let mut opts = RdmaOptions::from_env().map_err(|e| e.to_string())?;
                // Both ends share this host: measure the adapter, not the rings.
                opts.local = transport_rdma::LocalPath::Rdma;
                let dev = RdmaDevice::open(&opts).map_err(|e| e.to_string())?;
                let region = dev.alloc(1 << 20).map_err(|e| e.to_string())?;
                RdmaTransport::connect(tcp, dev, vec![region], &opts).map_err(|e| e.to_string())
            })
        })
        .collect();
    let mut ts = Vec::new();
    for h in handles {
        ts.push(h.join().map_err(|_| "setup thread panicked")??);
    }
    let (a, b): (&Arc<RdmaTransport>, &Arc<RdmaTransport>) = (&ts[0], &ts[1]);
    let remote = a.remote_regions(1)[0];
    let local = a.device().alloc(SIZE)?;
    for _ in 0..100 {
        a.read(1, &remote, 0, &local, 0, SIZE)?;
    }
    let mut us = Vec::with_capacity(iters);
    for i in 0..iters {
        let off = ((i * SIZE) % (1 << 20)) as u64;
        let t = Instant::now();
        a.read(1, &remote, off, &local, 0, SIZE)?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    us.sort_by(|x, y| x.total_cmp(y));
    let pct = |p: f64| us[((us.len() - 1) as f64 * p) as usize];
    let avg = us.iter().sum::<f64>() / us.len() as f64;
    println!(
        "read_lat transport-rdma 4096 B READ, {iters} iterations: min {:.1} us, median {:.1} us, avg {:.1} us, p99 {:.1} us, max {:.1} us",
        us[0],
        pct(0.5),
        avg,
        pct(0.99),
        us[us.len() - 1]
    );
    let hs: Vec<_> = [Arc::clone(a), Arc::clone(b)]
        .into_iter()
        .map(|t| thread::spawn(move || t.shutdown(Duration::from_secs(10))))
        .collect();
    for h in hs {
        h.join().map_err(|_| "shutdown thread panicked")??;
    }
    Ok(())
}
