//! Litmus tests across processes: `litmus TEST ITERATIONS`, TEST one of
//! `mp`, `sb`, `lb`, `iriw` (4 ranks), `2+2w`; the others need 2 ranks.
//!
//! Each iteration uses fresh, zeroed locations: `x` and `y` on two pages
//! with different homes, and every rank's observed registers are stored in
//! a results area. Ranks start each iteration together (barrier) after a
//! small varying delay, so their accesses race. At the end rank 0 counts
//! the outcomes and fails if one that sequential consistency forbids
//! appeared:
//!
//! | test | program | forbidden |
//! | --- | --- | --- |
//! | mp | P0: x=1; y=1 / P1: r1=y; r2=x | r1=1, r2=0 |
//! | sb | P0: x=1; r1=y / P1: y=1; r2=x | r1=0, r2=0 |
//! | lb | P0: r1=x; y=1 / P1: r2=y; x=1 | r1=1, r2=1 |
//! | iriw | P0: x=1 / P1: y=1 / P2: r1=x; r2=y / P3: r3=y; r4=x | r1=1, r2=0, r3=1, r4=0 |
//! | 2+2w | P0: x=1; y=2 / P1: y=1; x=2 | final x=1, y=1 |
//!
//! Loads and stores are plain (relaxed atomics with compiler fences: the
//! compiler keeps program order, the hardware and the DSM do the rest).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{compiler_fence, AtomicU64, Ordering};

fn fence() {
    compiler_fence(Ordering::SeqCst);
}

fn main() {
    if let Err(e) = run() {
        eprintln!("{}: {e}", env!("CARGO_BIN_NAME"));
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let test = args
        .next()
        .ok_or("usage: litmus mp|sb|lb|iriw|2+2w ITERATIONS")?;
    let iterations: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let dsm = dsm::init_from_env()?;
    let (rank, size) = (dsm.rank(), dsm.size());
    let needed = if test == "iriw" { 4 } else { 2 };
    if size != needed {
        return Err(format!("{test} needs exactly {needed} ranks, the job has {size}").into());
    }
    let words = dsm.words();
    let per_page = dsm.page_size() / 8;
    let pages_per_var = iterations.div_ceil(per_page);
    // x and y regions start on pages of different homes (page mod size).
    let x_base = per_page; // page 1
    let y_base =
        x_base + pages_per_var * per_page + if pages_per_var % 2 == 0 { per_page } else { 0 };
    let results_base = y_base + (pages_per_var + 1) * per_page;
    // Each rank stores one word of registers per iteration (two 32-bit registers).
    let needed_words = results_base + size * iterations;
    if needed_words > words.len() {
        return Err(format!(
            "the shared space is too small for {iterations} iterations: set DSM_SPACE_SIZE={}",
            needed_words * 8 + 4096
        )
        .into());
    }
    let x = |i: usize| &words[x_base + i];
    let y = |i: usize| &words[y_base + i];
    let result = |r: usize, i: usize| -> &AtomicU64 { &words[results_base + r * iterations + i] };
    let pack = |a: u64, b: u64| a | (b << 32);

    for i in 0..iterations {
        dsm.barrier()?;
        // Vary who starts first.
        let spins = (i * 7919 + rank * 104_729) % 2000;
        for _ in 0..spins {
            std::hint::spin_loop();
        }
        let (xi, yi) = (x(i), y(i));
        let registers = match (test.as_str(), rank) {
            ("mp", 0) => {
                xi.store(1, Relaxed);
                fence();
                yi.store(1, Relaxed);
                0
            }
            ("mp", _) => {
                let r1 = yi.load(Relaxed);
                fence();
                let r2 = xi.load(Relaxed);
                pack(r1, r2)
            }
            ("sb", 0) => {
                xi.store(1, Relaxed);
                fence();
                yi.load(Relaxed)
            }
            ("sb", _) => {
                yi.store(1, Relaxed);
                fence();
                xi.load(Relaxed)
            }
            ("lb", 0) => {
                let r1 = xi.load(Relaxed);
                fence();
                yi.store(1, Relaxed);
                r1
            }
            ("lb", _) => {
                let r2 = yi.load(Relaxed);
                fence();
                xi.store(1, Relaxed);
                r2
            }
            ("iriw", 0) => {
                xi.store(1, Relaxed);
                0
            }
            ("iriw", 1) => {
                yi.store(1, Relaxed);
                0
            }
            ("iriw", 2) => {
                let r1 = xi.load(Relaxed);
                fence();
                let r2 = yi.load(Relaxed);
                pack(r1, r2)
            }
            ("iriw", _) => {
                let r3 = yi.load(Relaxed);
                fence();
                let r4 = xi.load(Relaxed);
                pack(r3, r4)
            }
            ("2+2w", 0) => {
                xi.store(1, Relaxed);
                fence();
                yi.store(2, Relaxed);
                0
            }
            ("2+2w", _) => {
                yi.store(1, Relaxed);
                fence();
                xi.store(2, Relaxed);
                0
            }
            (other, _) => return Err(format!("unknown litmus test {other}").into()),
        };
        result(rank, i).store(registers, Relaxed);
    }
    dsm.barrier()?;

    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut forbidden = 0;
    if rank == 0 {
        for i in 0..iterations {
            let r = |k: usize| result(k, i).load(Relaxed);
            let unpack = |v: u64| (v & 0xffff_ffff, v >> 32);
            let (outcome, bad) = match test.as_str() {
                "mp" => {
                    let (r1, r2) = unpack(r(1));
                    (format!("r1={r1} r2={r2}"), r1 == 1 && r2 == 0)
                }
                "sb" => {
                    let (r1, r2) = (r(0), r(1));
                    (format!("r1={r1} r2={r2}"), r1 == 0 && r2 == 0)
                }
                "lb" => {
                    let (r1, r2) = (r(0), r(1));
                    (format!("r1={r1} r2={r2}"), r1 == 1 && r2 == 1)
                }
                "iriw" => {
                    let ((r1, r2), (r3, r4)) = (unpack(r(2)), unpack(r(3)));
                    (
                        format!("r1={r1} r2={r2} r3={r3} r4={r4}"),
                        r1 == 1 && r2 == 0 && r3 == 1 && r4 == 0,
                    )
                }
                _ => {
                    let (fx, fy) = (x(i).load(Relaxed), y(i).load(Relaxed));
                    (format!("x={fx} y={fy}"), fx == 1 && fy == 1)
                }
            };
            if bad {
                forbidden += 1;
            }
            *outcomes.entry(outcome).or_default() += 1;
        }
        let summary: Vec<String> = outcomes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        println!(
            "{test}: {iterations} iterations; outcomes {}; forbidden {forbidden}",
            summary.join(", ")
        );
    }
    dsm.finalize()?;
    if forbidden > 0 {
        return Err(
            format!("{test}: {forbidden} outcomes forbidden by sequential consistency").into(),
        );
    }
    Ok(())
}
