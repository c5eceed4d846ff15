//! Locks and barriers beside the raw transport, measured in the same run.
//!
//! * `lock_2_ranks/raw_round_trip_16B_16B`: the baseline, a 16 B request
//!   and a 16 B reply between rank 1 and rank 0.
//! * `lock_2_ranks/dsm_lock_remote`: rank 1 takes and releases lock 0,
//!   whose home is rank 0 (request, grant, then a release message that
//!   nothing waits for); uncontended.
//! * `lock_2_ranks/dsm_lock_local`: rank 0 takes and releases the same
//!   lock at its home (no network).
//! * `lock_handoff_2_ranks/dsm_counter_under_lock`: both ranks at once
//!   take lock 0 in turn and add 1 to a counter on page 0 (homed at rank
//!   0) with a plain load and store, so the page follows the lock from one
//!   rank to the other. The figure is one round: each rank's critical
//!   section once (two hand-offs of the lock and of the page); the counter
//!   is checked exact at the end. Beside `raw_round_trip_16B_16B` of the
//!   same transports.
//! * `barrier_N_ranks/raw_barrier` (N = 2, 4, 8): every rank other than 0
//!   sends 16 B to rank 0, which answers each once all arrived (the shape
//!   of the DSM's barrier) on the raw transport; `dsm_barrier`: every rank
//!   calls `Dsm::barrier` in a loop. One thread per rank; the figure is
//!   rank 0's time per barrier.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use dsm_bench::{
    finalize, print_figures, print_ratio, raw_round_trip, start_dsms, transports, Samples,
};
use dsm_core::{Dsm, Transport};

/// The barrier and lock benchmarks touch no shared page; the lock
/// hand-off touches page 0.
const SPACE_PAGES: usize = 64;

/// Two ranks' DSMs, after the raw 16 B / 16 B round trip between their
/// endpoints was measured into `raw` in group `g`.
fn two_ranks_beside_raw(g: &mut BenchmarkGroup<'_, WallTime>, raw: &Samples) -> Vec<Dsm> {
    let t = transports(2);
    raw_round_trip(g, "raw_round_trip_16B_16B", &t[1], &t[0], (16, 16), raw);
    start_dsms(t, SPACE_PAGES)
}

fn lock(c: &mut Criterion) {
    let suite = "lock_2_ranks";
    let (raw, remote, local) = (Samples::default(), Samples::default(), Samples::default());
    let mut g = c.benchmark_group(suite);
    let dsms = two_ranks_beside_raw(&mut g, &raw);
    for (name, rank, out) in [
        ("dsm_lock_remote", 1, &remote),
        ("dsm_lock_local", 0, &local),
    ] {
        let dsm = &dsms[rank];
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (d, ()) = out.time(|| dsm.lock(0).expect("lock").unlock().expect("unlock"));
                    total += d;
                }
                total
            })
        });
    }
    g.finish();
    finalize(dsms);
    let rows = [
        ("raw_round_trip_16B_16B", &raw),
        ("dsm_lock_remote", &remote),
        ("dsm_lock_local", &local),
    ];
    print_figures(suite, &rows);
    print_ratio(suite, rows[1], rows[0]);
}

fn lock_handoff(c: &mut Criterion) {
    let suite = "lock_handoff_2_ranks";
    let (raw, rounds) = (Samples::default(), Samples::default());
    let mut g = c.benchmark_group(suite);
    let dsms = two_ranks_beside_raw(&mut g, &raw);
    let mut increments = 0;
    g.bench_function("dsm_counter_under_lock", |b| {
        b.iter_custom(|iters| {
            increments += iters * dsms.len() as u64;
            handoff_rounds(&dsms, iters, &rounds)
        })
    });
    g.finish();
    let counter = dsms[0].lock(0).expect("lock");
    let total = dsms[0].words()[0].load(Relaxed);
    counter.unlock().expect("unlock");
    assert_eq!(total, increments, "a lock-protected increment was lost");
    finalize(dsms);
    let rows = [
        ("raw_round_trip_16B_16B", &raw),
        ("dsm_counter_under_lock", &rounds),
    ];
    print_figures(suite, &rows);
    print_ratio(suite, rows[1], rows[0]);
}

/// `iters` rounds of the lock hand-off, every rank in its own thread: in
/// each, the rank takes lock 0 and adds 1 to word 0 with a plain load and
/// store. Returns the run's time; records the mean round.
fn handoff_rounds(dsms: &[Dsm], iters: u64, out: &Samples) -> Duration {
    let start = Instant::now();
    thread::scope(|s| {
        for dsm in dsms {
            s.spawn(move || {
                let counter = &dsm.words()[0];
                for _ in 0..iters {
                    let guard = dsm.lock(0).expect("lock");
                    counter.store(counter.load(Relaxed) + 1, Relaxed);
                    guard.unlock().expect("unlock");
                }
            });
        }
    });
    let elapsed = start.elapsed();
    out.push(elapsed.div_f64(iters.max(1) as f64));
    elapsed
}

/// `iters` barriers on every rank: `wait(r)` is rank r's barrier; the
/// returned time is rank 0's, from after a first untimed barrier.
fn barriers<W>(n: usize, iters: u64, wait: W, out: &Samples) -> Duration
where
    W: Fn(usize) + Sync,
{
    thread::scope(|s| {
        for r in 1..n {
            let wait = &wait;
            s.spawn(move || {
                for _ in 0..=iters {
                    wait(r);
                }
            });
        }
        wait(0);
        let t0 = Instant::now();
        for _ in 0..iters {
            out.time(|| wait(0));
        }
        t0.elapsed()
    })
}

/// One barrier of the raw transport: gather at rank 0, then release.
fn raw_barrier_wait(t: &[Arc<dyn Transport>], r: usize) {
    let me = &t[r];
    if r == 0 {
        for _ in 1..t.len() {
            me.recv().expect("enter");
        }
        for to in 1..t.len() {
            me.send(to, &[0u8; 16]).expect("release");
        }
    } else {
        me.send(0, &[1u8; 16]).expect("enter");
        me.recv().expect("release");
    }
}

fn barrier_at(c: &mut Criterion, n: usize) {
    let suite = format!("barrier_{n}_ranks");
    let (raw, dsm) = (Samples::default(), Samples::default());
    let t = transports(n);
    let mut g = c.benchmark_group(&suite);
    bench_barrier(&mut g, "raw_barrier", n, |r| raw_barrier_wait(&t, r), &raw);
    let dsms: Vec<Dsm> = start_dsms(t, SPACE_PAGES);
    bench_barrier(
        &mut g,
        "dsm_barrier",
        n,
        |r| dsms[r].barrier().expect("barrier"),
        &dsm,
    );
    g.finish();
    finalize(dsms);
    let rows = [("raw_barrier", &raw), ("dsm_barrier", &dsm)];
    print_figures(&suite, &rows);
    print_ratio(&suite, rows[1], rows[0]);
}

fn bench_barrier<W>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    n: usize,
    wait: W,
    out: &Samples,
) where
    W: Fn(usize) + Sync,
{
    g.bench_function(name, |b| {
        b.iter_custom(|iters| barriers(n, iters, &wait, out))
    });
}

fn barrier(c: &mut Criterion) {
    for n in [2, 4, 8] {
        barrier_at(c, n);
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = lock, lock_handoff, barrier
}
criterion_main!(benches);
