//! Test helper for a rank killed from outside while the others work:
//! `dsmfault MODE VICTIM GO_FILE`. Every rank ignores SIGTERM, so a survivor
//! ends only by noticing the loss itself (the engine's status 70) or by the
//! launcher's SIGKILL after its grace period.
//!
//! * `compute`: every rank prints `rank R pid P ready`, then increments
//!   counters spread over 8 pages forever (constant page traffic).
//! * `fault`: the victim writes page VICTIM (its home: it holds the only
//!   copy); after a barrier every rank prints `ready`. The waiter (rank
//!   VICTIM+1 mod N) waits for GO_FILE, prints `rank R touching`, and reads
//!   that page: with the victim stopped (SIGSTOP) it waits in the fault.
//! * `release` (under `DSM_PROTOCOL=release`): the waiter (rank VICTIM+1
//!   mod N) writes a word of page VICTIM (homed at the victim) and holds
//!   the page again after a barrier; every rank prints `ready`. The waiter
//!   waits for GO_FILE, prints `rank R touching`, writes the word again and
//!   enters a barrier, whose release waits for the victim's acknowledgement
//!   of its diff: with the victim stopped it waits there.
//! * `barrier`: the victim prints `ready` and idles; the others print
//!   `rank R entering barrier` and wait in a barrier it never joins.
//! * `leave`: after the first barrier the victim exits with status 0
//!   without finalize; the others print `rank R entering barrier` and
//!   wait in a barrier it never joins.
//! * `hog`: after the first barrier the victim allocates and touches
//!   private memory until the kernel stops it; the others wait in a
//!   barrier.
//! * `quiet SECONDS`: every rank runs two threads of pure computation for
//!   SECONDS without a DSM call, then adds its result to a shared word;
//!   after a barrier each prints `rank R total T` (T exact only if no rank
//!   was lost) and exits 0.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

fn say(line: String) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn idle() -> ! {
    loop {
        std::thread::park();
    }
}

fn fail(why: String) -> ! {
    eprintln!("dsmfault: {why}");
    std::process::exit(1)
}

/// Waits (at most a minute) for the test to create `go`.
fn wait_for(go: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Path::new(go).exists() {
        if Instant::now() >= deadline {
            fail(format!("{go} never appeared"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().cloned().unwrap_or_default();
    let victim: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1);
    let go = args.get(2).cloned().unwrap_or_default();
    // SAFETY: installing SIG_IGN touches no Rust state.
    if let Err(e) = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGTERM,
            nix::sys::signal::SigHandler::SigIgn,
        )
    } {
        fail(format!("ignoring SIGTERM: {e}"));
    }
    let dsm = dsm::init_from_env().unwrap_or_else(|e| fail(e.to_string()));
    let (rank, size) = (dsm.rank(), dsm.size());
    let words = dsm.words();
    let per_page = dsm.page_size() / 8;
    let pid = std::process::id();
    match mode.as_str() {
        "compute" => {
            dsm.barrier().unwrap_or_else(|e| fail(e.to_string()));
            say(format!("rank {rank} pid {pid} ready"));
            let mut i = 0usize;
            loop {
                words[(i % 8) * per_page + rank].fetch_add(1, Relaxed);
                i = i.wrapping_add(1);
            }
        }
        "fault" => {
            let word = &words[(victim % size) * per_page];
            if rank == victim {
                word.store(1, Relaxed);
            }
            dsm.barrier().unwrap_or_else(|e| fail(e.to_string()));
            say(format!("rank {rank} pid {pid} ready"));
            if rank != (victim + 1) % size {
                idle();
            }
            wait_for(&go);
            say(format!("rank {rank} touching"));
            let value = word.load(Relaxed);
            say(format!("rank {rank} read {value}"));
            idle();
        }
        "release" => {
            // A lock's release waits for its diffs' acknowledgements (a
            // barrier entry's does not: the barrier counts them).
            let waiter = (victim + 1) % size;
            let word = &words[(victim % size) * per_page + 1];
            if rank == waiter {
                word.store(1, Relaxed);
            }
            dsm.barrier().unwrap_or_else(|e| fail(e.to_string()));
            // A lock homed at the waiter; its acquire drops the copies, so
            // the page comes back here before the victim may be stopped.
            let lock = (rank == waiter).then(|| {
                dsm.lock(waiter as u64)
                    .unwrap_or_else(|e| fail(e.to_string()))
            });
            let before = word.load(Relaxed);
            say(format!("rank {rank} pid {pid} ready ({before})"));
            let Some(lock) = lock else { idle() };
            wait_for(&go);
            say(format!("rank {rank} touching"));
            word.store(2, Relaxed);
            let result = lock.unlock().and_then(|()| dsm.barrier());
            say(format!("rank {rank} left the barrier: {result:?}"));
            idle();
        }
        "barrier" => {
            dsm.barrier().unwrap_or_else(|e| fail(e.to_string()));
            say(format!("rank {rank} pid {pid} ready"));
            if rank == victim {
                idle();
            }
            say(format!("rank {rank} entering barrier"));
            let result = dsm.barrier();
            say(format!("rank {rank} left the barrier: {result:?}"));
            idle();
        }
        "leave" | "hog" => {
            dsm.barrier().unwrap_or_else(|e| fail(e.to_string()));
            say(format!("rank {rank} pid {pid} ready"));
            if rank == victim && mode == "leave" {
                std::process::exit(0);
            }
            if rank == victim {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    // Touched, so the pages are really taken.
                    hoard.push(vec![1u8; 64 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            say(format!("rank {rank} entering barrier"));
            let result = dsm.barrier();
            say(format!("rank {rank} left the barrier: {result:?}"));
            idle();
        }
        "quiet" => {
            let seconds: u64 = victim as u64;
            dsm.barrier().unwrap_or_else(|e| fail(e.to_string()));
            say(format!("rank {rank} pid {pid} ready"));
            let until = Instant::now() + Duration::from_secs(seconds);
            let workers: Vec<_> = (0..2)
                .map(|_| std::thread::spawn(move || compute_until(until)))
                .collect();
            let rounds: u64 = workers.into_iter().map(|w| w.join().unwrap_or(0)).sum();
            // Every round counts: a rank that computed at all adds 1.
            words[0].fetch_add(u64::from(rounds > 0), Relaxed);
            dsm.barrier().unwrap_or_else(|e| fail(e.to_string()));
            say(format!("rank {rank} total {}", words[0].load(Relaxed)));
            dsm.finalize().unwrap_or_else(|e| fail(e.to_string()));
        }
        other => fail(format!("unknown mode {other:?}")),
    }
}

/// Integer work on private memory until `until`; the rounds done.
fn compute_until(until: Instant) -> u64 {
    let mut state = vec![0x9e37_79b9_7f4a_7c15u64; 4096];
    let mut rounds = 0u64;
    while Instant::now() < until {
        for i in 0..state.len() {
            let x = state[i] ^ (state[(i + 1) % 4096] << 13);
            state[i] = x ^ (x >> 7) ^ (x << 17);
        }
        rounds += 1;
    }
    std::hint::black_box(&state);
    rounds
}
