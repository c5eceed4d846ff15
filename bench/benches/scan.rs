//! Cold sequential scan of a remote 64 MiB segment beside raw TCP stream
//! bandwidth over the same transport, measured in the same run.
//!
//! * `scan_2_ranks/raw_stream_1MiB_messages`: rank 0 sends 1 MiB messages
//!   to rank 1 (64 per iteration, then a 2-byte message that rank 1
//!   acknowledges, so each iteration counts only arrived bytes). Rank 1
//!   hands each message's buffer back to the transport, as the engine does.
//! * `scan_2_ranks/dsm_cold_scan_64MiB`: rank 0 allocates a 64 MiB segment
//!   homed at itself (`Placement::Localized(0)`) and writes it; rank 1 then
//!   reads every word of it in order: remote read faults, with the
//!   configured read-ahead (`DSM_PREFETCH`, default 1024). Between scans (not timed) rank 0 writes the first
//!   word of every page from 4 threads, which invalidates rank 1's copies,
//!   so every scan starts cold.
//!
//! With `DSM_BENCH_WINDOWS=FILE`, the CLOCK_MONOTONIC start and end of each
//! timed scan are written to FILE as `start,end` ranges, for
//! `perf record -k mono` then `perf report --time "$(cat FILE)"`: a profile
//! of the scans alone (the untimed invalidations between them cost more).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use dsm_bench::{finalize, print_figures, start_dsms, transports, Samples, WORDS_PER_PAGE};
use dsm_core::segment::Placement;
use dsm_core::{Dsm, Transport, PAGE_SIZE};

const SEGMENT: usize = 64 << 20;
/// Space per rank: the upper half (the heap) holds the segment.
const SPACE_PAGES: usize = 4 * SEGMENT / PAGE_SIZE;
const MSG: usize = 1 << 20;
const MSGS_PER_ITER: usize = 64;

fn raw_stream(g: &mut BenchmarkGroup<'_, WallTime>, t: &[Arc<dyn Transport>], out: &Samples) {
    let (sender, receiver) = (Arc::clone(&t[0]), Arc::clone(&t[1]));
    let sink = thread::spawn(move || {
        while let Ok(m) = receiver.recv() {
            match m.payload.len() {
                1 => return,
                2 => receiver.send(0, b"ok").expect("ack"),
                // As the DSM's engine does with what it received.
                _ => receiver.recycle(m.payload),
            }
        }
    });
    let data = vec![3u8; MSG];
    g.throughput(Throughput::Bytes((MSGS_PER_ITER * MSG) as u64));
    g.bench_function("raw_stream_1MiB_messages", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (d, _) = out.time(|| {
                    for _ in 0..MSGS_PER_ITER {
                        sender.send(1, &data).expect("send");
                    }
                    sender.send(1, b"ak").expect("sync");
                    sender.recv().expect("ack")
                });
                total += d;
            }
            total
        })
    });
    sender.send(1, b"x").expect("stop");
    sink.join().expect("sink thread");
}

/// CLOCK_MONOTONIC now, in seconds (perf's `-k mono` clock).
fn monotonic_seconds() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}

fn cold_scan(g: &mut BenchmarkGroup<'_, WallTime>, dsms: &[Dsm], out: &Samples) {
    let mut windows = std::env::var_os("DSM_BENCH_WINDOWS").map(|_| String::new());
    let (home, reader) = (&dsms[0], &dsms[1]);
    let segment = home
        .alloc(SEGMENT, Placement::Localized(0))
        .expect("allocating the segment");
    let at_home = home.segment_words(&segment);
    // The same segment (same addresses) in rank 1's space.
    let first = (segment.addr() as usize - home.base() as usize) / 8;
    let remote = &reader.words()[first..first + at_home.len()];
    let pages = at_home.len() / WORDS_PER_PAGE;
    // Rank 0 writes the whole segment: word i holds i, the first word of
    // each page the generation.
    let mut generation = 1u64;
    for (i, w) in at_home.iter().enumerate() {
        let v = if i % WORDS_PER_PAGE == 0 {
            generation
        } else {
            i as u64
        };
        w.store(v, Relaxed);
    }
    let mut scanned = false;
    let before = reader.stats();
    g.throughput(Throughput::Bytes(SEGMENT as u64));
    g.bench_function("dsm_cold_scan_64MiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if scanned {
                    // Not timed: rank 0 writes every page again, which
                    // invalidates rank 1's copies.
                    generation += 1;
                    thread::scope(|s| {
                        for part in at_home.chunks(at_home.len() / 4) {
                            s.spawn(move || {
                                for page in part.chunks(WORDS_PER_PAGE) {
                                    page[0].store(generation, Relaxed);
                                }
                            });
                        }
                    });
                }
                let started = windows.as_ref().map(|_| monotonic_seconds());
                let t0 = Instant::now();
                let mut sum = 0u64;
                let mut stale = 0usize;
                for page in remote.chunks(WORDS_PER_PAGE) {
                    stale += usize::from(page[0].load(Relaxed) != generation);
                    for w in &page[1..] {
                        sum = sum.wrapping_add(w.load(Relaxed));
                    }
                }
                let d = t0.elapsed();
                if let (Some(w), Some(start)) = (windows.as_mut(), started) {
                    w.push_str(&format!("{start:.6},{:.6} ", monotonic_seconds()));
                }
                std::hint::black_box(sum);
                assert_eq!(stale, 0, "rank 1 read stale pages");
                scanned = true;
                out.push(d);
                total += d;
            }
            total
        })
    });
    if let (Some(path), Some(w)) = (std::env::var_os("DSM_BENCH_WINDOWS"), windows) {
        if let Err(e) = std::fs::write(&path, w.trim_end()) {
            eprintln!("scan_2_ranks: cannot write DSM_BENCH_WINDOWS file {path:?}: {e}");
        }
    }
    let after = reader.stats();
    println!(
        "scan_2_ranks: rank 1 during the scans: {} read faults, {} MiB received; {} pages per scan",
        after.read_faults - before.read_faults,
        (after.bytes_received - before.bytes_received) >> 20,
        pages
    );
}

/// MB/s (10^6 bytes per second) of `bytes` per sample at the median.
fn mb_per_s(samples: &Samples, bytes: usize) -> Option<f64> {
    samples
        .summary()
        .map(|s| bytes as f64 / (s.median / 1e6) / 1e6)
}

fn scan(c: &mut Criterion) {
    let suite = "scan_2_ranks";
    let (stream, scan) = (Samples::default(), Samples::default());
    let t = transports(2);
    let mut g = c.benchmark_group(suite);
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    raw_stream(&mut g, &t, &stream);
    let dsms = start_dsms(t, SPACE_PAGES);
    g.measurement_time(Duration::from_secs(20));
    cold_scan(&mut g, &dsms, &scan);
    g.finish();
    finalize(dsms);
    print_figures(
        suite,
        &[
            ("raw_stream_1MiB_messages (per 64 MiB)", &stream),
            ("dsm_cold_scan_64MiB", &scan),
        ],
    );
    if let (Some(raw), Some(dsm)) = (
        mb_per_s(&stream, MSGS_PER_ITER * MSG),
        mb_per_s(&scan, SEGMENT),
    ) {
        println!(
            "{suite}: cold scan {dsm:.1} MB/s, raw TCP stream {raw:.1} MB/s: ratio {:.4} ({:.2}%)",
            dsm / raw,
            100.0 * dsm / raw
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = scan
}
criterion_main!(benches);
