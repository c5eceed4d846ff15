//! Randomized reads, writes and atomics for a bounded wall time, with an
//! exact final check: `dsmsoak SECS THREADS [GO_FILE]`.
//!
//! Every thread of every rank, until SECS have passed: adds its slot
//! number + 1 to one of 8 shared counters (spread over 4 pages),
//! stores increasing values to its own slot, and reads random slots
//! (a slot's values must never go backwards for a reader). Then each
//! thread reports its sums and last value in its own page; after a barrier
//! every rank checks every counter and slot exactly and prints
//! `rank R soak ok ops N`.
//!
//! With GO_FILE, the last rank waits for that file to exist before joining
//! the job (so the others sit in connection set-up meanwhile). Rank 0
//! first prints `rank 0 pid P peers DSM_PEERS`.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

const COUNTERS: usize = 8;
const REPORT_PAGE: usize = 8;

fn fail(why: String) -> ! {
    eprintln!("dsmsoak: {why}");
    std::process::exit(1)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn env_rank() -> Option<usize> {
    ["DSM_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .and_then(|r| r.parse().ok())
}

fn env_size() -> Option<usize> {
    ["DSM_SIZE", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .and_then(|r| r.parse().ok())
}

fn counter(words: &[AtomicU64], per_page: usize, k: usize) -> &AtomicU64 {
    &words[(k % 4) * per_page + (k / 4) * 8 + 1]
}

fn slot(words: &[AtomicU64], per_page: usize, s: usize) -> &AtomicU64 {
    &words[(4 + s % 4) * per_page + (s / 4) * 8 + 3]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: f64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(3.0);
    let threads: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let go = args.get(2).cloned();
    let (rank, size) = (env_rank(), env_size());
    if rank == Some(0) {
        println!(
            "rank 0 pid {} peers {}",
            std::process::id(),
            std::env::var("DSM_PEERS").unwrap_or_default()
        );
        let _ = std::io::stdout().flush();
    }
    if let (Some(go), Some(r), Some(n)) = (&go, rank, size) {
        if r + 1 == n {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !Path::new(go).exists() {
                if Instant::now() >= deadline {
                    fail(format!("{go} never appeared"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let dsm = dsm::init_from_env().unwrap_or_else(|e| fail(e.to_string()));
    let (rank, size) = (dsm.rank(), dsm.size());
    let words = dsm.words();
    let per_page = dsm.page_size() / 8;
    let slots = size * threads;
    if REPORT_PAGE + slots > words.len() / per_page {
        fail(format!("{slots} slots do not fit in the space"));
    }
    dsm.barrier().unwrap_or_else(|e| fail(e.to_string()));
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let results: Vec<Result<u64, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let me = rank * threads + t;
                    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((me as u64 + 1) * 0x1000_0001));
                    let mut sums = [0u64; COUNTERS];
                    let mut seen = vec![0u64; slots];
                    let mut last = 0u64;
                    let mut ops = 0u64;
                    while !ops.is_multiple_of(64) || Instant::now() < end {
                        let r = rng.next();
                        match r % 10 {
                            0..=3 => {
                                let k = (r >> 8) as usize % COUNTERS;
                                counter(words, per_page, k).fetch_add(me as u64 + 1, Relaxed);
                                sums[k] += me as u64 + 1;
                            }
                            4..=6 => {
                                last += 1;
                                slot(words, per_page, me).store(last, Relaxed);
                            }
                            _ => {
                                let s = (r >> 8) as usize % slots;
                                let v = slot(words, per_page, s).load(Relaxed);
                                if v < seen[s] {
                                    return Err(format!(
                                        "slot {s} went back from {} to {v}",
                                        seen[s]
                                    ));
                                }
                                seen[s] = v;
                            }
                        }
                        ops += 1;
                    }
                    let report = &words[(REPORT_PAGE + me) * per_page..];
                    for (k, sum) in sums.iter().enumerate() {
                        report[k].store(*sum, Relaxed);
                    }
                    report[COUNTERS].store(last, Relaxed);
                    Ok(ops)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a thread panicked".into())))
            .collect()
    });
    let mut ops = 0;
    for r in results {
        ops += r.unwrap_or_else(|e| fail(format!("rank {rank}: {e}")));
    }
    dsm.barrier().unwrap_or_else(|e| fail(e.to_string()));
    for k in 0..COUNTERS {
        let want: u64 = (0..slots)
            .map(|s| words[(REPORT_PAGE + s) * per_page + k].load(Relaxed))
            .sum();
        let got = counter(words, per_page, k).load(Relaxed);
        if got != want {
            fail(format!(
                "rank {rank}: counter {k} is {got}, expected {want}"
            ));
        }
    }
    for s in 0..slots {
        let want = words[(REPORT_PAGE + s) * per_page + COUNTERS].load(Relaxed);
        let got = slot(words, per_page, s).load(Relaxed);
        if got != want {
            fail(format!("rank {rank}: slot {s} is {got}, expected {want}"));
        }
    }
    dsm.barrier().unwrap_or_else(|e| fail(e.to_string()));
    println!("rank {rank} soak ok ops {ops}");
    let _ = std::io::stdout().flush();
    dsm.finalize().unwrap_or_else(|e| fail(e.to_string()));
}
