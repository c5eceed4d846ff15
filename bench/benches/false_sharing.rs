//! False sharing under the sequentially consistent protocol (`Mrsw`, one
//! writer per page) beside release consistency (`Release`, multiple
//! writers, twins and diffs), in the same run (issue 26).
//!
//! Groups `false_sharing_N_ranks` (N = 2, 4), each rank a thread of this
//! process with its own `Dsm`. Every rank writes only its own words, but
//! the words of all ranks interleave in the same pages (slot i of rank r
//! at word i x N + r of the array), in the fixed space from page 1 on
//! (distributed placement: page p homed at rank p mod N). One criterion
//! iteration is one epoch: every rank does its 10 000 increments, each a
//! plain load and store of the word (no atomic read-modify-write), then a
//! barrier; the figure is the epoch as rank 0 times it.
//!
//! * `sc_counters`, `rc_counters`: 512 counters per rank (4 pages at 4
//!   ranks), incremented in turn (increment k of a rank goes to its counter
//!   k mod 512, k running on across epochs).
//! * `sc_histogram`, `rc_histogram`: 256 buckets per rank, in other pages;
//!   each rank adds values of its own fixed xorshift stream to its column
//!   (bucket v mod 256).
//!
//! `sc_` runs under `Protocol::Mrsw`, `rc_` under `Protocol::Release`,
//! whatever `DSM_PROTOCOL` says (the other `DSM_*` variables apply). Every
//! rank counts its increments in private memory; after the measurement and
//! a last barrier rank 0 reads every slot of every rank and panics on any
//! that differs from its count. The summary prints each figure, rank 0's
//! faults and diffs per epoch, and the ratio SC / RC of each workload.

use std::sync::atomic::Ordering::Relaxed;
use std::thread;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use dsm_bench::{
    finalize, print_figures, print_ratio, start_dsms_with, transports, Samples, WORDS_PER_PAGE,
};
use dsm_core::{Dsm, Protocol};

/// Pages of each rank's space; the fixed space (the lower half) holds both
/// arrays.
const SPACE_PAGES: usize = 64;
/// Increments of each rank per epoch.
const INCREMENTS: usize = 10_000;

/// One workload: which slot each increment of a rank goes to.
#[derive(Clone, Copy)]
enum Kind {
    /// Counter k mod `slots` for increment k.
    Counters,
    /// Bucket v mod `slots` for the rank's next xorshift value v.
    Histogram,
}

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    kind: Kind,
    /// The array's first page in the fixed space.
    first_page: usize,
    /// Slots per rank.
    slots: usize,
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        name: "counters",
        kind: Kind::Counters,
        first_page: 1,
        slots: 512,
    },
    Workload {
        name: "histogram",
        kind: Kind::Histogram,
        first_page: 16,
        slots: 256,
    },
];

/// A rank's private side of a workload: where its stream is, and how many
/// increments it did to each of its slots.
struct RankState {
    /// Counters: the next increment's number; histogram: the xorshift state.
    next: u64,
    counts: Vec<u64>,
}

impl RankState {
    fn new(w: &Workload, rank: usize) -> Self {
        let next = match w.kind {
            Kind::Counters => 0,
            // The stream of `kernels histogram` (examples/src/bin/kernels.rs).
            Kind::Histogram => {
                0x9E37_79B9_7F4A_7C15u64 ^ (rank as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
            }
        };
        RankState {
            next,
            counts: vec![0; w.slots],
        }
    }

    fn next_slot(&mut self, w: &Workload) -> usize {
        match w.kind {
            Kind::Counters => {
                let k = self.next;
                self.next += 1;
                (k % w.slots as u64) as usize
            }
            Kind::Histogram => {
                let mut x = self.next;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.next = x;
                (x % w.slots as u64) as usize
            }
        }
    }
}

/// The word of slot `slot` of rank `rank` in `dsm`'s space.
fn word_of(w: &Workload, size: usize, slot: usize, rank: usize) -> usize {
    w.first_page * WORDS_PER_PAGE + slot * size + rank
}

/// One epoch of `dsm`'s rank: its increments, then a barrier.
fn epoch(dsm: &Dsm, w: &Workload, state: &mut RankState) {
    let (words, size, rank) = (dsm.words(), dsm.size(), dsm.rank());
    for _ in 0..INCREMENTS {
        let slot = state.next_slot(w);
        let word = &words[word_of(w, size, slot, rank)];
        word.store(word.load(Relaxed) + 1, Relaxed);
        state.counts[slot] += 1;
    }
    dsm.barrier().expect("barrier");
}

/// `iters` epochs on every rank; returns rank 0's time.
fn epochs(
    dsms: &[Dsm],
    w: &Workload,
    states: &mut [RankState],
    iters: u64,
    out: &Samples,
) -> Duration {
    let (first, rest) = states.split_first_mut().expect("ranks");
    thread::scope(|s| {
        for (dsm, state) in dsms[1..].iter().zip(rest) {
            s.spawn(move || {
                for _ in 0..iters {
                    epoch(dsm, w, state);
                }
            });
        }
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            total += out.time(|| epoch(&dsms[0], w, first)).0;
        }
        total
    })
}

/// After a last barrier of every rank, rank 0 reads every slot of every
/// rank; a slot that differs from its rank's count panics.
fn check(dsms: &[Dsm], w: &Workload, states: &[RankState], label: &str) {
    thread::scope(|s| {
        for dsm in &dsms[1..] {
            s.spawn(move || dsm.barrier().expect("barrier"));
        }
        dsms[0].barrier().expect("barrier");
    });
    let (words, size) = (dsms[0].words(), dsms.len());
    let mut wrong = Vec::new();
    for (rank, state) in states.iter().enumerate() {
        for (slot, want) in state.counts.iter().enumerate() {
            let got = words[word_of(w, size, slot, rank)].load(Relaxed);
            if got != *want {
                wrong.push(format!(
                    "slot {slot} of rank {rank} = {got}, expected {want}"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{label}: {} of {} slots wrong, e.g. {}",
        wrong.len(),
        size * w.slots,
        wrong[..wrong.len().min(8)].join("; ")
    );
}

fn group(c: &mut Criterion, n: usize) {
    let suite = format!("false_sharing_{n}_ranks");
    let samples: [[Samples; 2]; 2] = Default::default(); // [protocol][workload]
    let mut g = c.benchmark_group(&suite);
    g.sampling_mode(SamplingMode::Flat);
    for (p, (protocol, tag)) in [(Protocol::Mrsw, "sc"), (Protocol::Release, "rc")]
        .into_iter()
        .enumerate()
    {
        let dsms = start_dsms_with(transports(n), SPACE_PAGES, protocol);
        for (wi, w) in WORKLOADS.iter().enumerate() {
            let name = format!("{tag}_{}", w.name);
            let mut states: Vec<RankState> = (0..n).map(|r| RankState::new(w, r)).collect();
            let out = &samples[p][wi];
            let before = dsms[0].stats();
            g.bench_function(&name, |b| {
                b.iter_custom(|iters| epochs(&dsms, w, &mut states, iters, out))
            });
            let after = dsms[0].stats();
            check(&dsms, w, &states, &format!("{suite}/{name}"));
            let done: u64 = states[0].counts.iter().sum();
            if done == 0 {
                continue; // filtered out
            }
            let per_epoch = |x: u64| x as f64 * INCREMENTS as f64 / done as f64;
            println!(
                "{suite}: {name}: {} epochs, every slot exact; rank 0 per epoch: {:.1} read faults, {:.1} write faults, {:.1} diffs sent",
                done / INCREMENTS as u64,
                per_epoch(after.read_faults - before.read_faults),
                per_epoch(after.write_faults - before.write_faults),
                per_epoch(after.diffs_sent - before.diffs_sent),
            );
        }
        finalize(dsms);
    }
    g.finish();
    let names = ["counters", "histogram"];
    let mut rows = Vec::new();
    for (wi, w) in names.iter().enumerate() {
        for (p, tag) in ["sc", "rc"].iter().enumerate() {
            rows.push((format!("{tag}_{w}"), &samples[p][wi]));
        }
    }
    let rows: Vec<(&str, &Samples)> = rows.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    print_figures(&suite, &rows);
    for pair in rows.chunks(2) {
        print_ratio(&suite, pair[0], pair[1]);
    }
}

fn false_sharing(c: &mut Criterion) {
    for n in [2, 4] {
        group(c, n);
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = false_sharing
}
criterion_main!(benches);
