//! Contention: every thread of every rank adds 1 to its own counter, N
//! times, with a plain load and store (no atomic read-modify-write); all
//! counters are packed into the first page(s) of the shared space, so the
//! pages are fought over. After a barrier every rank checks every counter
//! is exactly N: a lost update or a stale copy shows up as a wrong count.
//!
//! `contention [THREADS [ITERATIONS [YIELD_EVERY]]]` (default 4 threads,
//! 10000 iterations, never yield). With YIELD_EVERY=k each thread yields
//! its CPU every k increments, so ranks interleave and pages move mid-loop.

use std::sync::atomic::Ordering::Relaxed;

fn main() {
    if let Err(e) = run() {
        eprintln!("{}: {e}", env!("CARGO_BIN_NAME"));
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4);
    let iterations: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let yield_every: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(0);
    let dsm = dsm::init_from_env()?;
    let (rank, size) = (dsm.rank(), dsm.size());
    // Counter i lives on page i % 2: every counter shares a page with half the others.
    let words = dsm.words();
    let per_page = dsm.page_size() / 8;
    let counters: Vec<_> = (0..size * threads)
        .map(|i| &words[(i % 2) * per_page + i / 2])
        .collect();
    std::thread::scope(|s| {
        for t in 0..threads {
            let counter = counters[rank * threads + t];
            s.spawn(move || {
                for i in 1..=iterations {
                    let v = counter.load(Relaxed);
                    counter.store(v + 1, Relaxed);
                    if yield_every > 0 && i % yield_every == 0 {
                        std::thread::yield_now();
                    }
                }
            });
        }
    });
    dsm.barrier()?;
    let wrong: Vec<String> = counters
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.load(Relaxed)))
        .filter(|(_, v)| *v != iterations)
        .map(|(i, v)| {
            format!(
                "counter {i} (rank {} thread {}) = {v}",
                i / threads,
                i % threads
            )
        })
        .collect();
    let stats = dsm.finalize()?;
    if !wrong.is_empty() {
        return Err(format!(
            "rank {rank}: expected {iterations} everywhere, got {}",
            wrong.join(", ")
        )
        .into());
    }
    println!(
        "rank {rank}: all {} counters are exactly {iterations} ({} pages received, {} forwarded)",
        size * threads,
        stats.pages_received,
        stats.requests_forwarded
    );
    Ok(())
}
