//! A write set larger than the cache: rank 1 of 2 stores to one word of
//! each page of a fresh 16 MiB segment homed at rank 0 (4096 pages), then
//! both ranks meet in a barrier; the figure is rank 1's stores and barrier,
//! per page. Each run uses a segment both ranks allocate collectively and
//! free afterwards (not timed), so every store is a remote write fault.
//!
//! Groups `write_set_mrsw_2_ranks` and `write_set_release_2_ranks` (the
//! protocol under which both ranks run, whatever `DSM_PROTOCOL` says; the
//! other `DSM_*` variables apply), each with two figures:
//!
//! * `unbounded`: rank 1's cache holds the whole write set: the baseline.
//! * `cache_4MiB`: rank 1's cache bounded to 1024 pages, a quarter of the
//!   write set: the oldest written pages go while the stores go on (a
//!   writable copy written back under `mrsw`; under `release`, a dirty
//!   copy's diff sent to its home, acknowledged).
//!
//! After each run rank 0 checks that every page holds rank 1's value (a
//! wrong one panics). The summary prints each figure per page and the ratio
//! of the bounded to the unbounded one.

use std::sync::atomic::Ordering::Relaxed;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use dsm_bench::{finalize, print_ratio, start_dsms_with, transports, Samples, WORDS_PER_PAGE};
use dsm_core::{Dsm, Placement, Protocol, PAGE_SIZE};

/// Pages of each rank's space: the heap (the upper half) holds one segment.
const SPACE_PAGES: usize = 16384;
/// Pages rank 1 writes in one run.
const WRITE_PAGES: usize = 4096;
/// Rank 1's bounded cache.
const CACHE_BYTES: usize = 4 << 20;

/// One run: a fresh segment, rank 1's stores and the barrier (timed, in
/// rank 1), rank 0's check, the free. Returns rank 1's time.
fn run(owner: &Dsm, writer: &Dsm, generation: u64) -> Duration {
    let bytes = WRITE_PAGES * PAGE_SIZE;
    thread::scope(|s| {
        let at_owner = s.spawn(move || {
            let segment = owner
                .coalloc(bytes, Placement::Localized(0))
                .expect("coalloc at rank 0");
            owner.barrier().expect("barrier");
            owner.barrier().expect("barrier");
            let words = owner.segment_words(&segment);
            for (p, page) in words.chunks(WORDS_PER_PAGE).enumerate() {
                let got = page[0].load(Relaxed);
                assert_eq!(got, generation, "page {p} of the write set holds {got}");
            }
            owner.free(segment).expect("free at rank 0");
        });
        let segment = writer
            .coalloc(bytes, Placement::Localized(0))
            .expect("coalloc at rank 1");
        writer.barrier().expect("barrier");
        let words = writer.segment_words(&segment);
        let t0 = Instant::now();
        for page in words.chunks(WORDS_PER_PAGE) {
            page[0].store(generation, Relaxed);
        }
        writer.barrier().expect("barrier");
        let took = t0.elapsed();
        // Collective: it ends with rank 0's, after its check.
        writer.free(segment).expect("free at rank 1");
        at_owner.join().expect("rank 0's thread");
        took
    })
}

fn group(c: &mut Criterion, protocol: Protocol, tag: &str) {
    let suite = format!("write_set_{tag}_2_ranks");
    let dsms = start_dsms_with(transports(2), SPACE_PAGES, protocol);
    let (owner, writer) = (&dsms[0], &dsms[1]);
    let configured = writer.cache_size();
    let samples: [Samples; 2] = Default::default();
    let mut generation = 0u64;
    let mut g = c.benchmark_group(&suite);
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(WRITE_PAGES as u64));
    for (i, (name, cache)) in [("unbounded", None), ("cache_4MiB", Some(CACHE_BYTES))]
        .into_iter()
        .enumerate()
    {
        writer.set_cache_size(cache).expect("cache bound");
        let out = &samples[i];
        let before = writer.stats();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    generation += 1;
                    let took = run(owner, writer, generation);
                    out.push(took / WRITE_PAGES as u32);
                    total += took;
                }
                total
            })
        });
        let after = writer.stats();
        println!(
            "{suite}/{name}: rank 1: {} write faults, {} copies given back (evicted, or at the free), {} diffs sent",
            after.write_faults - before.write_faults,
            after.evictions_written_back - before.evictions_written_back,
            after.diffs_sent - before.diffs_sent,
        );
    }
    g.finish();
    writer.set_cache_size(configured).expect("cache bound");
    print_ratio(
        &suite,
        ("cache_4MiB (per page)", &samples[1]),
        ("unbounded (per page)", &samples[0]),
    );
    finalize(dsms);
}

fn write_set(c: &mut Criterion) {
    group(c, Protocol::Mrsw, "mrsw");
    group(c, Protocol::Release, "release");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = write_set
}
criterion_main!(benches);
