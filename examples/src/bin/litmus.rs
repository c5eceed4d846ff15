//! Litmus tests across processes: `litmus TEST ITERATIONS`, TEST one of
//! `mp`, `sb`, `lb`, `iriw` (4 ranks), `2+2w`, and the data-race-free
//! `mp+lock`, `mp+barrier`, `2+2w+lock`; all but `iriw` need 2 ranks.
//!
//! Each iteration uses fresh, zeroed locations: `x` and `y` on two pages
//! with different homes, and every rank's observed registers are stored in
//! a results area. Ranks start each iteration together (barrier) after a
//! small varying delay, so their accesses race. At the end rank 0 counts
//! the outcomes and fails if one that the protocol in effect
//! (`DSM_PROTOCOL`, as the job parsed it) forbids appeared.
//!
//! Sequential consistency (`mrsw`, `migratory`):
//!
//! | test | program | forbidden |
//! | --- | --- | --- |
//! | mp | P0: x=1; y=1 / P1: r1=y; r2=x | r1=1, r2=0 |
//! | sb | P0: x=1; r1=y / P1: y=1; r2=x | r1=0, r2=0 |
//! | lb | P0: r1=x; y=1 / P1: r2=y; x=1 | r1=1, r2=1 |
//! | iriw | P0: x=1 / P1: y=1 / P2: r1=x; r2=y / P3: r3=y; r4=x | r1=1, r2=0, r3=1, r4=0 |
//! | 2+2w | P0: x=1; y=2 / P1: y=1; x=2 | final x=1, y=1 |
//! | mp+lock | P0: lock; x=1; y=1; unlock / P1: lock; r1=y; r2=x; unlock | r1≠r2 |
//! | mp+barrier | P0: x=1; y=1; barrier / P1: barrier; r1=y; r2=x | all but r1=1, r2=1 |
//! | 2+2w+lock | P0: lock; r1=x; x=1; y=2; unlock / P1: lock; r2=y; y=1; x=2; unlock | all but the two lock orders: r1=0, r2=2, x=2, y=1 (P0 first) and r1=2, r2=0, x=1, y=2 (P1 first) |
//!
//! Release consistency (`release`). A page's home reads and writes its
//! master copy in place; another rank reads a copy fetched from the home
//! at its first access and kept across barriers (each writes the other
//! ranks' diffs into it) until a lock's acquire drops it, and its writes
//! stay in that copy until its next release (barrier entry, lock request,
//! unlock), when they reach the home (and, at a barrier, every copy). So what a racy test
//! may show depends on which racing rank is home of `x` and of `y`:
//! `x@P0 y@P1` below is an iteration whose `x` page is homed at P0 and `y`
//! page at P1 (a page's home is `page mod ranks`; the two regions
//! alternate between both placements every 512 iterations, and `iriw`'s
//! go through four):
//!
//! | test | x@P0 y@P1 | x@P1 y@P0 |
//! | --- | --- | --- |
//! | mp | r1=1, r2=0 forbidden: P1 reads y at its home, where P0's y=1 arrives only with P0's next barrier entry | all four allowed: P0's x=1 waits in its copy until its release while its y=1 is in place, so P1 may fetch y=1 and read x=0 at home |
//! | sb | all four allowed: both writes in place, and each read is of a copy, fetched from the writer (after its write, or before) or kept from an earlier iteration | r1=0, r2=0 allowed (each write waits in its copy, each read is of its own home); r1=1, r2=1 forbidden: each needs the other's release, which follows the other's read |
//! | lb | r1=1, r2=1 forbidden: each read needs the other's release, which follows the other's read | r1=1, r2=1 forbidden: both writes in place, and a read of a copy (fetched, or kept) never sees a write made after it was fetched |
//! | iriw | r1=1, r2=0, r3=1, r4=0 forbidden in every placement: each page has one master copy, every read reads it (at home or by a fetch) after the reader's earlier reads, and a write, once in it, stays | |
//! | 2+2w | final x=1, y=1 forbidden: each rank's first write is in place, its second reaches the other's home at its release, after the other's in-place write | final x=1, y=1 allowed (and usual: each rank's first write arrives at its release, after the home wrote in place); final x=2, y=2 forbidden |
//! | mp+lock, mp+barrier, 2+2w+lock | as under sequential consistency (data-race free) | as under sequential consistency |
//!
//! The `sb` and `2+2w` outcomes forbidden at `x@P1 y@P0` (where both
//! allow the outcome sequential consistency forbids) follow from writes
//! leaving a rank only at its release (dirty copies are never evicted); the
//! others from the single master copy alone.
//!
//! Under every protocol, in every test: a register or final value is one
//! some rank wrote (or the initial 0), never a word never written nor a mix
//! of the bytes of two values (1 and 2 are stored as words with disjoint
//! nonzero bytes, so a torn word is neither); every rank reads back its own
//! last write (where no other rank writes the same word: not in `2+2w`);
//! after the last barrier every location written once holds its value.
//!
//! Loads and stores are plain (relaxed atomics with compiler fences: the
//! compiler keeps program order, the hardware and the DSM do the rest).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{compiler_fence, AtomicU64, Ordering};

/// The tests and their number of ranks.
const TESTS: [(&str, usize); 8] = [
    ("mp", 2),
    ("sb", 2),
    ("lb", 2),
    ("iriw", 4),
    ("2+2w", 2),
    ("mp+lock", 2),
    ("mp+barrier", 2),
    ("2+2w+lock", 2),
];

/// How value 1 is stored, and value 2: their nonzero bytes are disjoint,
/// so a word mixing bytes of two of 0, 1 and 2 is none of them.
const ONE: u64 = 0x0000_0000_0101_0101;
const TWO: u64 = 0x0202_0202_0000_0000;

/// A register holding a word that is none of the values written.
const NEVER_WRITTEN: u64 = 0xffff_ffff;

fn fence() {
    compiler_fence(Ordering::SeqCst);
}

/// The word value `v` (1 or 2) is stored as.
fn stored(v: u64) -> u64 {
    match v {
        1 => ONE,
        2 => TWO,
        _ => 0,
    }
}

/// The value a word holds: 0, 1, 2, or `NEVER_WRITTEN`.
fn value(word: u64) -> u64 {
    match word {
        0 => 0,
        ONE => 1,
        TWO => 2,
        _ => NEVER_WRITTEN,
    }
}

fn show(v: u64) -> String {
    if v == NEVER_WRITTEN {
        "?".into()
    } else {
        v.to_string()
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("{}: {e}", env!("CARGO_BIN_NAME"));
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let names: Vec<&str> = TESTS.iter().map(|(name, _)| *name).collect();
    let usage = format!("usage: litmus {} ITERATIONS", names.join("|"));
    let test = args.next().ok_or(usage)?;
    let iterations: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let Some(&(_, needed)) = TESTS.iter().find(|(name, _)| *name == test) else {
        return Err(format!("unknown litmus test {test}").into());
    };
    let dsm = dsm::init_from_env()?;
    let release = dsm.config().protocol == dsm::Protocol::Release;
    let (rank, size) = (dsm.rank(), dsm.size());
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
    // The home of a word's page (the default placement: page mod size).
    let home = |word: usize| (word / per_page) % size;
    // Own writes not read back, by this rank.
    let mut own_lost = 0usize;
    let mut read_back = |what: &str, i: usize, location: &AtomicU64, v: u64| {
        let seen = location.load(Relaxed);
        if seen != stored(v) {
            own_lost += 1;
            eprintln!(
                "rank {rank}, iteration {i}: wrote {what}={v}, read back {seen:#x} (value {})",
                show(value(seen))
            );
        }
    };
    let one = stored(1);
    let two = stored(2);

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
                xi.store(one, Relaxed);
                fence();
                yi.store(one, Relaxed);
                read_back("x", i, xi, 1);
                read_back("y", i, yi, 1);
                0
            }
            ("mp", _) => {
                let r1 = yi.load(Relaxed);
                fence();
                let r2 = xi.load(Relaxed);
                pack(value(r1), value(r2))
            }
            ("sb", 0) => {
                xi.store(one, Relaxed);
                fence();
                let r1 = yi.load(Relaxed);
                read_back("x", i, xi, 1);
                value(r1)
            }
            ("sb", _) => {
                yi.store(one, Relaxed);
                fence();
                let r2 = xi.load(Relaxed);
                read_back("y", i, yi, 1);
                value(r2)
            }
            ("lb", 0) => {
                let r1 = xi.load(Relaxed);
                fence();
                yi.store(one, Relaxed);
                read_back("y", i, yi, 1);
                value(r1)
            }
            ("lb", _) => {
                let r2 = yi.load(Relaxed);
                fence();
                xi.store(one, Relaxed);
                read_back("x", i, xi, 1);
                value(r2)
            }
            ("iriw", 0) => {
                xi.store(one, Relaxed);
                read_back("x", i, xi, 1);
                0
            }
            ("iriw", 1) => {
                yi.store(one, Relaxed);
                read_back("y", i, yi, 1);
                0
            }
            ("iriw", 2) => {
                let r1 = xi.load(Relaxed);
                fence();
                let r2 = yi.load(Relaxed);
                pack(value(r1), value(r2))
            }
            ("iriw", _) => {
                let r3 = yi.load(Relaxed);
                fence();
                let r4 = xi.load(Relaxed);
                pack(value(r3), value(r4))
            }
            ("2+2w", 0) => {
                xi.store(one, Relaxed);
                fence();
                yi.store(two, Relaxed);
                0
            }
            ("2+2w", _) => {
                yi.store(one, Relaxed);
                fence();
                xi.store(two, Relaxed);
                0
            }
            // Lock i: its home alternates between the ranks.
            ("mp+lock", 0) => {
                let held = dsm.lock(i as u64)?;
                xi.store(one, Relaxed);
                fence();
                yi.store(one, Relaxed);
                read_back("x", i, xi, 1);
                read_back("y", i, yi, 1);
                held.unlock()?;
                0
            }
            ("mp+lock", _) => {
                let held = dsm.lock(i as u64)?;
                let r1 = yi.load(Relaxed);
                fence();
                let r2 = xi.load(Relaxed);
                held.unlock()?;
                pack(value(r1), value(r2))
            }
            ("mp+barrier", 0) => {
                xi.store(one, Relaxed);
                fence();
                yi.store(one, Relaxed);
                read_back("x", i, xi, 1);
                read_back("y", i, yi, 1);
                dsm.barrier()?;
                0
            }
            ("mp+barrier", _) => {
                dsm.barrier()?;
                let r1 = yi.load(Relaxed);
                fence();
                let r2 = xi.load(Relaxed);
                pack(value(r1), value(r2))
            }
            ("2+2w+lock", 0) => {
                let held = dsm.lock(i as u64)?;
                let r1 = xi.load(Relaxed);
                fence();
                xi.store(one, Relaxed);
                fence();
                yi.store(two, Relaxed);
                read_back("x", i, xi, 1);
                read_back("y", i, yi, 2);
                held.unlock()?;
                value(r1)
            }
            ("2+2w+lock", _) => {
                let held = dsm.lock(i as u64)?;
                let r2 = yi.load(Relaxed);
                fence();
                yi.store(one, Relaxed);
                fence();
                xi.store(two, Relaxed);
                read_back("y", i, yi, 1);
                read_back("x", i, xi, 2);
                held.unlock()?;
                value(r2)
            }
            (other, _) => return Err(format!("unknown litmus test {other}").into()),
        };
        result(rank, i).store(registers, Relaxed);
    }
    dsm.barrier()?;

    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut forbidden = 0;
    if rank == 0 {
        let written = |v: u64| v == 0 || v == 1;
        for i in 0..iterations {
            let r = |k: usize| result(k, i).load(Relaxed);
            let unpack = |v: u64| (v & 0xffff_ffff, v >> 32);
            let (fx, fy) = (value(x(i).load(Relaxed)), value(y(i).load(Relaxed)));
            // Release consistency: is x homed at P0 (then y is at P1)?
            let x_at_p0 = home(x_base + i) == 0;
            // The locations are written once (x=1, y=1) in every test but
            // the 2+2w ones, whose final values are judged with the outcome.
            let once = !test.starts_with("2+2w");
            let (outcome, bad) = match test.as_str() {
                "mp" => {
                    let (r1, r2) = unpack(r(1));
                    let sc_outcome = r1 == 1 && r2 == 0;
                    (
                        format!("r1={} r2={}", show(r1), show(r2)),
                        !written(r1) || !written(r2) || (sc_outcome && (!release || x_at_p0)),
                    )
                }
                "sb" => {
                    let (r1, r2) = (r(0), r(1));
                    let no_write_seen = r1 == 0 && r2 == 0;
                    let both_seen = r1 == 1 && r2 == 1;
                    let ruled_out = if !release {
                        no_write_seen
                    } else {
                        !x_at_p0 && both_seen
                    };
                    (
                        format!("r1={} r2={}", show(r1), show(r2)),
                        !written(r1) || !written(r2) || ruled_out,
                    )
                }
                "lb" => {
                    let (r1, r2) = (r(0), r(1));
                    (
                        format!("r1={} r2={}", show(r1), show(r2)),
                        !written(r1) || !written(r2) || (r1 == 1 && r2 == 1),
                    )
                }
                "iriw" => {
                    let ((r1, r2), (r3, r4)) = (unpack(r(2)), unpack(r(3)));
                    (
                        format!(
                            "r1={} r2={} r3={} r4={}",
                            show(r1),
                            show(r2),
                            show(r3),
                            show(r4)
                        ),
                        ![r1, r2, r3, r4].into_iter().all(written)
                            || (r1 == 1 && r2 == 0 && r3 == 1 && r4 == 0),
                    )
                }
                "2+2w" => {
                    let one_of_two = |v: u64| v == 1 || v == 2;
                    let ruled_out = if !release || x_at_p0 {
                        fx == 1 && fy == 1
                    } else {
                        fx == 2 && fy == 2
                    };
                    (
                        format!("x={} y={}", show(fx), show(fy)),
                        !one_of_two(fx) || !one_of_two(fy) || ruled_out,
                    )
                }
                "mp+lock" | "mp+barrier" => {
                    let (r1, r2) = unpack(r(1));
                    let allowed = (r1 == 1 && r2 == 1) || (test == "mp+lock" && r1 == 0 && r2 == 0);
                    (format!("r1={} r2={}", show(r1), show(r2)), !allowed)
                }
                _ => {
                    // 2+2w+lock
                    let (r1, r2) = (r(0), r(1));
                    let p0_first = r1 == 0 && r2 == 2 && fx == 2 && fy == 1;
                    let p1_first = r1 == 2 && r2 == 0 && fx == 1 && fy == 2;
                    (
                        format!(
                            "r1={} r2={} x={} y={}",
                            show(r1),
                            show(r2),
                            show(fx),
                            show(fy)
                        ),
                        !(p0_first || p1_first),
                    )
                }
            };
            let lost = once && (fx != 1 || fy != 1);
            let mut outcome = if lost {
                format!("{outcome} final x={} y={}", show(fx), show(fy))
            } else {
                outcome
            };
            if release {
                let homes = format!("x@P{} y@P{}", home(x_base + i), home(y_base + i));
                outcome = format!("{homes} {outcome}");
            }
            if bad || lost {
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
        let model = if release {
            "release consistency"
        } else {
            "sequential consistency"
        };
        return Err(format!("{test}: {forbidden} outcomes forbidden by {model}").into());
    }
    if own_lost > 0 {
        return Err(
            format!("{test}: rank {rank} did not read back {own_lost} of its writes").into(),
        );
    }
    Ok(())
}
