//! Coherence stress programs with exact final checks:
//!
//! * `stress atomics THREADS N`: every thread of every rank does N
//!   `fetch_add(1)` on counter A and N `fetch_add(rank+1)` on counter B (on
//!   another page); A and B must end exact.
//! * `stress random THREADS OPS`: every thread does OPS random operations
//!   over 8 pages: stores of increasing values to its own slot, loads of
//!   random slots (each slot's values must never go backwards for a
//!   reader: coherence), `fetch_add` on shared counters. At the end every
//!   slot holds its writer's last value and the counters the exact sums.
//! * `stress prodcons N`: rank 0 produces 1..=N through a ring buffer in
//!   shared memory (release/acquire indices), rank 1 consumes and checks
//!   order and sum; other ranks idle.
//! * `stress falseshare N`: every rank increments its own word of one page
//!   N times; every word must end exactly N.
//! * `stress scan ROUNDS PAGES`: rank 0 sweeps PAGES pages homed at itself
//!   ROUNDS times while rank 1 reads them in order again and again, so
//!   read-ahead batches reach the home while it writes those pages; a
//!   reader must never see a page's values go back or half a sweep's
//!   stores, and every page must end at ROUNDS.
//! * `stress scan ROUNDS PAGES spread`: the same over PAGES pages of the
//!   fixed space spread round-robin (page p at rank p mod N): every rank
//!   but the last sweeps the pages it is home of, the last reads them all
//!   (its read-ahead asks every home at once, and each home write-protects
//!   the every-Nth pages asked for in one span).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

fn main() {
    if let Err(e) = run() {
        eprintln!("{}: {e}", env!("CARGO_BIN_NAME"));
        std::process::exit(1);
    }
}

/// xorshift64*: a small deterministic generator per thread.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn arg(args: &[String], i: usize, default: u64) -> Result<u64> {
    Ok(args
        .get(i)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(default))
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args
        .first()
        .cloned()
        .ok_or("usage: stress atomics|random|prodcons|falseshare|scan ...")?;
    let dsm = dsm::init_from_env()?;
    let (rank, size) = (dsm.rank(), dsm.size());
    let words = dsm.words();
    let per_page = dsm.page_size() / 8;
    let message = match mode.as_str() {
        "atomics" => {
            let (threads, n) = (arg(&args, 1, 4)?, arg(&args, 2, 10_000)?);
            let (a, b) = (&words[0], &words[per_page + 3]);
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        for _ in 0..n {
                            a.fetch_add(1, Relaxed);
                            b.fetch_add(rank as u64 + 1, Relaxed);
                        }
                    });
                }
            });
            dsm.barrier()?;
            let size = size as u64;
            let (want_a, want_b) = (size * threads * n, threads * n * size * (size + 1) / 2);
            let (got_a, got_b) = (a.load(Relaxed), b.load(Relaxed));
            if (got_a, got_b) != (want_a, want_b) {
                return Err(format!(
                    "counters A={got_a} B={got_b}, expected {want_a} and {want_b}"
                )
                .into());
            }
            format!("atomics exact: A={got_a} B={got_b}")
        }
        "random" => random(&dsm, arg(&args, 1, 4)? as usize, arg(&args, 2, 20_000)?)?,
        "scan" => scan(
            &dsm,
            arg(&args, 1, 20)?,
            arg(&args, 2, 256)? as usize,
            args.get(3).is_some_and(|a| a == "spread"),
        )?,
        "prodcons" => {
            let n = arg(&args, 1, 100_000)?;
            const CAPACITY: u64 = 256;
            let (head, tail) = (&words[0], &words[per_page]); // different pages
            let ring = &words[2 * per_page..2 * per_page + CAPACITY as usize];
            if rank == 0 {
                for v in 1..=n {
                    let h = head.load(Relaxed);
                    while h - tail.load(Acquire) == CAPACITY {
                        std::hint::spin_loop();
                    }
                    ring[(h % CAPACITY) as usize].store(v, Relaxed);
                    head.store(h + 1, Release);
                }
            } else if rank == 1 {
                let mut sum = 0u64;
                for expected in 1..=n {
                    let t = tail.load(Relaxed);
                    while head.load(Acquire) == t {
                        std::hint::spin_loop();
                    }
                    let v = ring[(t % CAPACITY) as usize].load(Relaxed);
                    if v != expected {
                        return Err(format!("consumer got {v}, expected {expected}").into());
                    }
                    sum += v;
                    tail.store(t + 1, Release);
                }
                if sum != n * (n + 1) / 2 {
                    return Err(format!("sum {sum}, expected {}", n * (n + 1) / 2).into());
                }
            }
            dsm.barrier()?;
            format!("prodcons exact: {n} items in order")
        }
        "falseshare" => {
            let n = arg(&args, 1, 10_000)?;
            let mine = &words[rank];
            for _ in 0..n {
                mine.store(mine.load(Relaxed) + 1, Relaxed);
            }
            dsm.barrier()?;
            for (r, w) in words[..size].iter().enumerate() {
                let v = w.load(Relaxed);
                if v != n {
                    return Err(format!("rank {r}'s word is {v}, expected {n}").into());
                }
            }
            format!("falseshare exact: {size} words of one page, {n} each")
        }
        other => return Err(format!("unknown mode {other}").into()),
    };
    let stats = dsm.finalize()?;
    println!(
        "rank {rank}: {message} ({} pages received)",
        stats.pages_received
    );
    Ok(())
}

/// Rank 0 stores the round number in word 1, then (release) in word 0, of
/// each page of a segment homed at itself; rank 1 reads word 0 (acquire)
/// then word 1 of each page in order until rank 0 is done. Seeing word 0 at
/// r means word 1 is at least r, and a page's word 0 never goes back.
/// First page of `stress scan ... spread`'s pages (page 0 holds the flags).
const SPREAD_FIRST_PAGE: usize = 64;

fn scan(dsm: &dsm::Dsm, rounds: u64, pages: usize, spread: bool) -> Result<String> {
    let (rank, size) = (dsm.rank(), dsm.size());
    if size < 2 {
        return Err("scan needs at least 2 ranks".into());
    }
    let words = dsm.words();
    let per_page = dsm.page_size() / 8;
    // Page 0 of the fixed space (homed at rank 0): the segment's address,
    // and the writers' "done" count.
    let (address, done) = (&words[0], &words[1]);
    if rank == 0 && !spread {
        let segment = dsm.alloc(pages * dsm.page_size(), dsm::Placement::Localized(0))?;
        address.store(segment.addr() as u64, Relaxed);
    }
    dsm.barrier()?;
    let first = if spread {
        SPREAD_FIRST_PAGE * per_page
    } else {
        (address.load(Relaxed) as usize - dsm.base() as usize) / 8
    };
    let segment = &words[first..first + pages * per_page];
    // Who writes page p, and who reads them all.
    let (writers, reader) = if spread { (size - 1, size - 1) } else { (1, 1) };
    let writer_of = |p: usize| {
        if spread {
            (SPREAD_FIRST_PAGE + p) % size
        } else {
            0
        }
    };
    let sweep = |rounds: std::ops::RangeInclusive<u64>, who: usize| {
        for round in rounds {
            for (_, page) in segment
                .chunks(per_page)
                .enumerate()
                .filter(|(p, _)| writer_of(*p) == who)
            {
                page[1].store(round, Relaxed);
                page[0].store(round, Release);
            }
        }
    };
    if rank == reader && spread {
        // Its own pages are local: written once, at the last round.
        sweep(rounds..=rounds, rank);
    }
    match rank {
        r if r < writers => {
            sweep(1..=rounds, r);
            done.fetch_add(1, Release);
        }
        r if r == reader => {
            let writers = writers as u64;
            let mut seen = vec![0u64; pages];
            let mut last_scan = false;
            while !last_scan {
                last_scan = done.load(Acquire) == writers;
                for (p, page) in segment.chunks(per_page).enumerate() {
                    let (w0, w1) = (page[0].load(Acquire), page[1].load(Relaxed));
                    if w1 < w0 {
                        return Err(
                            format!("page {p}: word 0 at round {w0}, word 1 at {w1}").into()
                        );
                    }
                    if w0 < seen[p] {
                        return Err(
                            format!("page {p} went back from round {} to {w0}", seen[p]).into()
                        );
                    }
                    seen[p] = w0;
                }
            }
        }
        _ => {}
    }
    dsm.barrier()?;
    for (p, page) in segment.chunks(per_page).enumerate() {
        let (w0, w1) = (page[0].load(Relaxed), page[1].load(Relaxed));
        if (w0, w1) != (rounds, rounds) {
            return Err(format!("page {p} ends at ({w0}, {w1}), expected round {rounds}").into());
        }
    }
    let layout = if spread { " spread" } else { "" };
    Ok(format!(
        "scan exact: {pages}{layout} pages at round {rounds}"
    ))
}

fn random(dsm: &dsm::Dsm, threads: usize, ops: u64) -> Result<String> {
    let (rank, size) = (dsm.rank(), dsm.size());
    let words = dsm.words();
    let per_page = dsm.page_size() / 8;
    const PAGES: usize = 8;
    let slots = size * threads;
    // Slot k (rank k / threads, thread k % threads) lives on page k % PAGES.
    let slot = |k: usize| -> &AtomicU64 { &words[(k % PAGES) * per_page + k / PAGES] };
    // Shared counters: one per page, at the page's last word.
    let counter = |p: usize| -> &AtomicU64 { &words[p * per_page + per_page - 1] };
    // Per-thread tallies, published after the run: [writes, atomic adds] each.
    let tally_base = PAGES * per_page;
    let tally = |k: usize, which: usize| -> &AtomicU64 { &words[tally_base + 2 * k + which] };

    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Option<String> {
                    let me = rank * threads + t;
                    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((me as u64 + 1) * 0x1000_0000_0001));
                    let mut last_seen = vec![0u64; slots];
                    let (mut writes, mut adds) = (0u64, 0u64);
                    for _ in 0..ops {
                        match rng.next() % 10 {
                            0..=3 => {
                                writes += 1;
                                slot(me).store(writes, Relaxed);
                            }
                            4..=7 => {
                                let k = (rng.next() % slots as u64) as usize;
                                let v = slot(k).load(Relaxed);
                                if v < last_seen[k] {
                                    return Some(format!(
                                        "slot {k} went back from {} to {v}",
                                        last_seen[k]
                                    ));
                                }
                                last_seen[k] = v;
                            }
                            _ => {
                                adds += 1;
                                counter((rng.next() % PAGES as u64) as usize).fetch_add(1, Relaxed);
                            }
                        }
                    }
                    tally(me, 0).store(writes, Relaxed);
                    tally(me, 1).store(adds, Relaxed);
                    None
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap_or(Some("a thread panicked".into())))
            .collect()
    });
    if let Some(f) = failures.first() {
        return Err(f.clone().into());
    }
    dsm.barrier()?;
    let mut total_adds = 0;
    for k in 0..slots {
        let (writes, v) = (tally(k, 0).load(Relaxed), slot(k).load(Relaxed));
        if v != writes {
            return Err(format!("slot {k} holds {v}, its writer stored up to {writes}").into());
        }
        total_adds += tally(k, 1).load(Relaxed);
    }
    let counted: u64 = (0..PAGES).map(|p| counter(p).load(Relaxed)).sum();
    if counted != total_adds {
        return Err(format!("counters sum to {counted}, {total_adds} additions were made").into());
    }
    Ok(format!(
        "random exact: {slots} slots, {total_adds} atomic additions"
    ))
}
