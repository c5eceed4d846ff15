//! Cold sequential scan of a remote 64 MiB segment beside raw TCP stream
//! bandwidth over the same transport, measured in the same run.
//!
//! The two ranks are two processes, as in a job: the bench process is rank
//! 1, the reader, and starts itself again as rank 0, the home
//! (`DSM_BENCH_SCAN_HOME` set, the loopback job handed over as dsmwrap
//! does). Rank 0 only serves; every figure is timed in rank 1.
//!
//! * `scan_2_ranks/raw_stream_1MiB_messages`: rank 1 asks with a 2-byte
//!   message, rank 0 answers with 64 messages of 1 MiB; timed until the
//!   last has arrived. Rank 1 hands each buffer back to the transport, as
//!   the engine does.
//! * `scan_2_ranks/dsm_cold_scan_64MiB`: rank 0 allocates a 64 MiB segment
//!   homed at itself (`Placement::Localized(0)`) and writes it; rank 1 then
//!   reads every word of it in order: remote read faults, with the
//!   configured read-ahead (`DSM_PREFETCH`, default 1024). Between scans
//!   (not timed) rank 0 writes the first word of every page from 4
//!   threads, which invalidates rank 1's copies, so every scan starts cold;
//!   the two ranks meet in barriers around it.
//!
//! With `DSM_BENCH_WINDOWS=FILE`, the CLOCK_MONOTONIC start and end of each
//! timed scan are written to FILE as `start,end` ranges, for
//! `perf record -a -k mono` then `perf report --time "$(cat FILE)"`: a
//! profile of the scans alone (the untimed invalidations between them cost
//! more).

use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, BenchmarkGroup, Criterion, SamplingMode, Throughput};
use dsm_bench::{print_figures, start_dsm, tcp_options, Samples, WORDS_PER_PAGE};
use dsm_core::bootstrap::Bootstrap;
use dsm_core::segment::Placement;
use dsm_core::{Dsm, Transport, PAGE_SIZE};
use transport_tcp::TcpTransport;

const SEGMENT: usize = 64 << 20;
/// Space per rank: the upper half (the heap) holds the segment.
const SPACE_PAGES: usize = 4 * SEGMENT / PAGE_SIZE;
const MSG: usize = 1 << 20;
const MSGS_PER_ITER: usize = 64;
/// Set in the environment of the bench started again as rank 0.
const HOME_ROLE: &str = "DSM_BENCH_SCAN_HOME";
/// Rank 1's request for a burst of the raw stream, and its signal that the
/// DSM part begins.
const STREAM_BURST: &[u8] = b"go";
const STREAM_DONE: &[u8] = b"dsm";
/// Words of the shared space's first page (homed at rank 0): the segment's
/// offset in the space (each rank maps its space at its own address, as in
/// the other suites), and the generation rank 0 writes next (0: finish).
const SEGMENT_WORD: usize = 0;
const COMMAND_WORD: usize = 1;

fn raw_stream(g: &mut BenchmarkGroup<'_, WallTime>, t: &Arc<dyn Transport>, out: &Samples) {
    g.throughput(Throughput::Bytes((MSGS_PER_ITER * MSG) as u64));
    g.bench_function("raw_stream_1MiB_messages", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (d, _) = out.time(|| {
                    t.send(0, STREAM_BURST).expect("asking for a burst");
                    for _ in 0..MSGS_PER_ITER {
                        let m = t.recv().expect("a 1 MiB message");
                        assert_eq!(m.payload.len(), MSG);
                        // As the DSM's engine does with what it received.
                        t.recycle(m.payload);
                    }
                });
                total += d;
            }
            total
        })
    });
    t.send(0, STREAM_DONE).expect("ending the stream");
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

/// Rank 1: times each scan of the segment rank 0 writes.
fn cold_scan(g: &mut BenchmarkGroup<'_, WallTime>, reader: &Dsm, out: &Samples) {
    let mut windows = std::env::var_os("DSM_BENCH_WINDOWS").map(|_| String::new());
    let words = reader.words();
    // Rank 0 has allocated and written the segment, generation 1.
    reader.barrier().expect("barrier");
    let first = words[SEGMENT_WORD].load(Relaxed) as usize / 8;
    let remote = &words[first..first + SEGMENT / 8];
    let pages = remote.len() / WORDS_PER_PAGE;
    // Word i of the segment holds i, but the first of each page.
    let expected: u64 = (0..remote.len() as u64)
        .filter(|i| *i % WORDS_PER_PAGE as u64 != 0)
        .fold(0u64, |s, i| s.wrapping_add(i));
    let mut generation = 1u64;
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
                    words[COMMAND_WORD].store(generation, Relaxed);
                    reader.barrier().expect("barrier");
                    reader.barrier().expect("barrier");
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
                assert_eq!(stale, 0, "rank 1 read stale pages");
                assert_eq!(sum, expected, "rank 1 read wrong bytes");
                scanned = true;
                out.push(d);
                total += d;
            }
            total
        })
    });
    words[COMMAND_WORD].store(0, Relaxed);
    reader.barrier().expect("barrier");
    if let (Some(path), Some(w)) = (std::env::var_os("DSM_BENCH_WINDOWS"), windows) {
        if let Err(e) = std::fs::write(&path, w.trim_end()) {
            eprintln!("scan_2_ranks: cannot write DSM_BENCH_WINDOWS file {path:?}: {e}");
        }
    }
    let after = reader.stats();
    println!(
        "scan_2_ranks: rank 1 during the scans: {} read faults, {} MiB received ({} MiB straight into their frames); {} pages per scan",
        after.read_faults - before.read_faults,
        (after.bytes_received - before.bytes_received) >> 20,
        ((after.pages_landed - before.pages_landed) * PAGE_SIZE as u64) >> 20,
        pages
    );
}

/// Rank 0, in the process the bench started: streams when asked, then
/// holds the segment and rewrites it between scans until told to finish.
fn home() -> Result<(), Box<dyn std::error::Error>> {
    let boot = Bootstrap::from_env()?;
    let t: Arc<dyn Transport> = TcpTransport::connect(boot, &tcp_options(0))?;
    let data = vec![3u8; MSG];
    loop {
        let m = t.recv()?;
        match m.payload.as_slice() {
            STREAM_BURST => {
                for _ in 0..MSGS_PER_ITER {
                    t.send(1, &data)?;
                }
            }
            STREAM_DONE => break,
            other => return Err(format!("unexpected message of {} bytes", other.len()).into()),
        }
    }
    let home = start_dsm(t, SPACE_PAGES);
    let segment = home.alloc(SEGMENT, Placement::Localized(0))?;
    let at_home = home.segment_words(&segment);
    // Word i holds i, the first word of each page the generation.
    for (i, w) in at_home.iter().enumerate() {
        let first_of_page = i % WORDS_PER_PAGE == 0;
        w.store(if first_of_page { 1 } else { i as u64 }, Relaxed);
    }
    let offset = segment.addr() as usize - home.base() as usize;
    home.words()[SEGMENT_WORD].store(offset as u64, Relaxed);
    home.barrier()?;
    loop {
        home.barrier()?;
        let generation = home.words()[COMMAND_WORD].load(Relaxed);
        if generation == 0 {
            break;
        }
        thread::scope(|s| {
            for part in at_home.chunks(at_home.len() / 4) {
                s.spawn(move || {
                    for page in part.chunks(WORDS_PER_PAGE) {
                        page[0].store(generation, Relaxed);
                    }
                });
            }
        });
        home.barrier()?;
    }
    home.finalize()?;
    Ok(())
}

/// Rank 0's process: killed and reaped if the bench fails before it ends.
struct HomeProcess(Option<Child>);

impl HomeProcess {
    fn wait(mut self) -> ExitStatus {
        let mut child = self.0.take().expect("waited once");
        child.wait().expect("waiting for rank 0")
    }
}

impl Drop for HomeProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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
    let mut boots = Bootstrap::loopback_group(2).expect("loopback job");
    let reader_boot = boots.pop().expect("rank 1");
    let home_boot = boots.pop().expect("rank 0");
    let exe = std::env::current_exe().expect("the bench's own path");
    let mut command = Command::new(exe);
    command.env(HOME_ROLE, "1");
    let inherited = home_boot
        .hand_over(&mut command)
        .expect("handing rank 0 over");
    let home = HomeProcess(Some(command.spawn().expect("starting rank 0's process")));
    drop(inherited);
    let t: Arc<dyn Transport> =
        TcpTransport::connect(reader_boot, &tcp_options(1)).expect("TCP connects");
    let mut g = c.benchmark_group(suite);
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    raw_stream(&mut g, &t, &stream);
    let reader = start_dsm(t, SPACE_PAGES);
    g.measurement_time(Duration::from_secs(20));
    cold_scan(&mut g, &reader, &scan);
    g.finish();
    reader.finalize().expect("finalize");
    let status = home.wait();
    assert!(status.success(), "rank 0's process failed: {status}");
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

fn main() -> ExitCode {
    if std::env::var_os(HOME_ROLE).is_some() {
        return match home() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("scan_2_ranks, rank 0: {e}");
                ExitCode::FAILURE
            }
        };
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    ExitCode::SUCCESS
}
