//! Remote write faults beside the raw transport, measured in the same run,
//! over the transport `DSM_TRANSPORT` selects (TCP unless an RDMA device is
//! up: the suites are then named `write_fault_rdma_N_ranks`).
//!
//! * `write_fault_2_ranks/raw_round_trip_16B_4KiB`: the baseline, a 16 B
//!   request and a 4 KiB reply between rank 1 and rank 0 over the same
//!   transport the DSM then uses.
//! * `write_fault_2_ranks/dsm_remote_write_fault_4KiB`: rank 1 stores to a
//!   page it does not hold, homed at rank 0, which rank 0 wrote last: rank 0
//!   gives up its copy and the grant carries the 4 KiB (missing fault,
//!   page taken exclusive).
//! * `write_fault_2_ranks/dsm_upgrade_1_sharer`: rank 1 stores to a page it
//!   holds read-only while the home (rank 0) also holds a read-only copy:
//!   write-protect fault, the home invalidates its own copy, grants the
//!   upgrade (no page bytes on the wire).
//! * `write_fault_4_ranks/raw_round_trip_16B_4KiB` and
//!   `write_fault_4_ranks/dsm_upgrade_3_sharers`: the same with ranks 0, 2
//!   and 3 holding read-only copies (two invalidations on the wire, one at
//!   the home), plus `raw_fanout_16B`, the same message pattern on the raw
//!   transport (1 -> 0, 0 -> 2 and 3, both answer 0, 0 -> 1).
//!
//! Setup (outside the timed part) between batches: the sharers read the
//! pages again, which also makes rank 1's writable copies read-only, and
//! the bench waits out the minimum hold (500 µs) so no invalidation is
//! deferred.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use dsm_bench::{
    finalize, job_transports, page_word, print_figures, print_ratio, raw_round_trip,
    selected_transport, start_dsms, tcp_options, Samples,
};
use dsm_core::{Dsm, Transport};
use transport_rdma::Selected;

/// Pages per rank's space: the lower half holds the pages used here.
const SPACE_PAGES: usize = 8192;
/// Pages homed at rank 0 touched per batch of the upgrade benchmarks.
const UPGRADE_BATCH: usize = 256;

/// Up to `count` pages homed at rank 0 (page p is homed at p mod N) in
/// `pages` of the lower half.
fn pages_at_rank0(n: usize, pages: std::ops::Range<usize>, count: usize) -> Vec<usize> {
    pages.filter(|p| p % n == 0).take(count).collect()
}

/// Rank 1 stores to pages homed at rank 0 that rank 0 wrote last.
fn remote_write_fault(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    dsms: &[Dsm],
    out: &Samples,
) {
    let (home, writer) = (&dsms[0], &dsms[1]);
    let pages = pages_at_rank0(dsms.len(), 0..SPACE_PAGES / 4, 2048);
    let mut value = 1u64;
    // Rank 0 writes every page first: its data is what rank 1 receives.
    for &p in &pages {
        page_word(home, p).store(value, Relaxed);
    }
    let mut next = 0;
    g.bench_function("dsm_remote_write_fault_4KiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if next == pages.len() {
                    // Rank 0 takes every page back (not timed): rank 1's
                    // copies are dropped, the next stores fault again.
                    for &p in &pages {
                        let old = page_word(home, p).swap(value + 1, Relaxed);
                        assert_eq!(old, value + 1_000_000, "rank 0 read a stale page");
                    }
                    value += 1;
                    next = 0;
                }
                let w = page_word(writer, pages[next]);
                next += 1;
                let (d, ()) = out.time(|| w.store(value + 1_000_000, Relaxed));
                total += d;
            }
            total
        })
    });
}

/// Rank 1 stores to pages it holds read-only while every other rank also
/// holds a read-only copy.
fn upgrade(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    dsms: &[Dsm],
    out: &Samples,
) {
    let writer = &dsms[1];
    let sharers: Vec<&Dsm> = dsms
        .iter()
        .enumerate()
        .filter(|(r, _)| *r != 1)
        .map(|(_, d)| d)
        .collect();
    let pages = pages_at_rank0(dsms.len(), SPACE_PAGES / 4..SPACE_PAGES / 2, UPGRADE_BATCH);
    let mut value = 0u64;
    let mut next = pages.len();
    let before = writer.stats().write_faults;
    let mut stores = 0u64;
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if next == pages.len() {
                    // Not timed: every sharer reads every page (rank 1's
                    // writable copies become read-only), rank 1 reads them
                    // (a fault only the first time), then the minimum hold
                    // passes.
                    thread::scope(|s| {
                        for d in &sharers {
                            let pages = &pages;
                            s.spawn(move || {
                                for &p in pages {
                                    let v = page_word(d, p).load(Relaxed);
                                    assert_eq!(v, value, "a sharer read a stale page");
                                }
                            });
                        }
                    });
                    for &p in &pages {
                        assert_eq!(page_word(writer, p).load(Relaxed), value);
                    }
                    thread::sleep(Duration::from_millis(1));
                    value += 1;
                    next = 0;
                }
                let w: &AtomicU64 = page_word(writer, pages[next]);
                next += 1;
                let (d, ()) = out.time(|| w.store(value, Relaxed));
                stores += 1;
                total += d;
            }
            total
        })
    });
    println!(
        "{name}: rank 1: {} timed stores, {} write faults",
        stores,
        writer.stats().write_faults - before
    );
}

/// The invalidation pattern of an upgrade with sharers 0, 2 and 3 on the
/// raw transport: 1 -> 0, 0 -> 2 and 0 -> 3, 2 -> 0 and 3 -> 0, 0 -> 1.
fn raw_fanout(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    t: &[Arc<dyn Transport>],
    out: &Samples,
) {
    let home = Arc::clone(&t[0]);
    let home_thread = thread::spawn(move || {
        let msg = [2u8; 16];
        while let Ok(m) = home.recv() {
            if m.payload == b"stop" {
                for r in [2, 3] {
                    home.send(r, b"stop").expect("stop");
                }
                return;
            }
            for r in [2, 3] {
                home.send(r, &msg).expect("invalidate");
            }
            for _ in 0..2 {
                home.recv().expect("ack");
            }
            home.send(m.from, &msg).expect("grant");
        }
    });
    let sharers: Vec<_> = [2, 3]
        .into_iter()
        .map(|r| dsm_bench::echo(Arc::clone(&t[r]), 16))
        .collect();
    let client = &t[1];
    let request = [1u8; 16];
    g.bench_function("raw_fanout_16B", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (d, _) = out.time(|| {
                    client.send(0, &request).expect("request");
                    client.recv().expect("grant")
                });
                total += d;
            }
            total
        })
    });
    client.send(0, b"stop").expect("stop");
    home_thread.join().expect("home thread");
    for s in sharers {
        s.join().expect("sharer thread");
    }
}

/// The suite's name over `kind`: `write_fault_N_ranks` over TCP,
/// `write_fault_rdma_N_ranks` over RDMA.
fn suite_name(kind: &Selected, ranks: usize) -> String {
    match kind {
        Selected::Tcp => format!("write_fault_{ranks}_ranks"),
        Selected::Rdma(_) => format!("write_fault_rdma_{ranks}_ranks"),
    }
}

fn two_ranks(c: &mut Criterion) {
    let kind = selected_transport("write_fault");
    let suite = &suite_name(&kind, 2);
    let (raw, write, up) = (Samples::default(), Samples::default(), Samples::default());
    let t = job_transports(&kind, 2, SPACE_PAGES, tcp_options);
    let mut g = c.benchmark_group(suite);
    raw_round_trip(
        &mut g,
        "raw_round_trip_16B_4KiB",
        &t[1],
        &t[0],
        (16, 4096),
        &raw,
    );
    let dsms = start_dsms(t, SPACE_PAGES);
    remote_write_fault(&mut g, &dsms, &write);
    upgrade(&mut g, "dsm_upgrade_1_sharer", &dsms, &up);
    g.finish();
    finalize(dsms);
    let rows = [
        ("raw_round_trip_16B_4KiB", &raw),
        ("dsm_remote_write_fault_4KiB", &write),
        ("dsm_upgrade_1_sharer", &up),
    ];
    print_figures(suite, &rows);
    print_ratio(suite, rows[1], rows[0]);
    print_ratio(suite, rows[2], rows[0]);
}

fn four_ranks(c: &mut Criterion) {
    let kind = selected_transport("write_fault");
    let suite = &suite_name(&kind, 4);
    let (raw, fan, up) = (Samples::default(), Samples::default(), Samples::default());
    let t = job_transports(&kind, 4, SPACE_PAGES, tcp_options);
    let mut g = c.benchmark_group(suite);
    raw_round_trip(
        &mut g,
        "raw_round_trip_16B_4KiB",
        &t[1],
        &t[0],
        (16, 4096),
        &raw,
    );
    raw_fanout(&mut g, &t, &fan);
    let dsms = start_dsms(t, SPACE_PAGES);
    upgrade(&mut g, "dsm_upgrade_3_sharers", &dsms, &up);
    g.finish();
    finalize(dsms);
    let rows = [
        ("raw_round_trip_16B_4KiB", &raw),
        ("raw_fanout_16B", &fan),
        ("dsm_upgrade_3_sharers", &up),
    ];
    print_figures(suite, &rows);
    print_ratio(suite, rows[2], rows[0]);
    print_ratio(suite, rows[2], rows[1]);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = two_ranks, four_ranks
}
criterion_main!(benches);
