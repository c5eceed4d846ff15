//! Cold sequential scans of 64 MiB of remote data beside raw stream
//! bandwidth over the same transport, measured in the same run: TCP, or
//! RDMA where `DSM_TRANSPORT` selects it (the suites are then named
//! `scan_rdma_...`).
//!
//! The ranks are processes, as in a job: the bench process is the last
//! rank, the reader, and starts itself again for each other rank, a home
//! (`DSM_BENCH_SCAN_HOME` set to the layout, or to `stream` for the raw
//! stream's sender; the loopback job handed over as dsmwrap does). The
//! homes only serve; every figure is timed in the reader.
//!
//! * `scan_2_ranks/raw_stream_1MiB_messages`: in a job of its own (two
//!   processes, the transport the DSM job uses), rank 1 asks with a 2-byte
//!   message, rank 0 answers with 64 messages of 1 MiB; timed until the
//!   last has arrived. Rank 1 hands each buffer back to the transport, as
//!   the engine does. Its own job, because a DSM's first messages (a
//!   co-located rank's frame offers) may reach a rank still streaming.
//! * `scan_2_ranks/dsm_cold_scan_64MiB`: rank 0 allocates a 64 MiB segment
//!   homed at itself (`Placement::Localized(0)`) and writes it; rank 1 then
//!   reads every word of it in order: remote read faults, with the
//!   configured read-ahead (`DSM_PREFETCH`, default 1024). Between scans
//!   (not timed) rank 0 writes the first word of every page from 4
//!   threads, which invalidates rank 1's copies, so every scan starts cold;
//!   the two ranks meet in barriers around it. The homes run with
//!   `DSM_PUSH=0` (unless it is set): a push at that barrier would bring
//!   the pages back before the timed scan.
//! * `scan_2_ranks/dsm_cold_scan_64MiB_cache_16MiB`: the same with the
//!   reader's cache bounded to 16 MiB (`Dsm::set_cache_size`), a quarter of
//!   what it reads: it evicts as it goes.
//! * `scan_round_robin_2_ranks/...` and `scan_round_robin_4_ranks/...`:
//!   the raw stream (its own two-process job), then a cold scan of 64 MiB
//!   of the seed's fixed space, its pages spread round-robin (page p at
//!   rank p mod N):
//!   every home writes its pages (the reader too), and the reader reads
//!   pages from every home in turn, its read-ahead asking each home for
//!   its pages of the window.
//!
//! With `DSM_BENCH_WINDOWS=FILE`, the CLOCK_MONOTONIC start and end of each
//! timed scan are written to FILE as `start,end` ranges, for
//! `perf record -a -k mono` then `perf report --time "$(cat FILE)"`: a
//! profile of the scans alone (the untimed invalidations between them cost
//! more).

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, BenchmarkGroup, Criterion, SamplingMode, Throughput};
use dsm_bench::{
    over_selected, over_selected_or_exit, print_figures, selected_transport, shm_options,
    spawn_ranks, start_dsm, Samples, WORDS_PER_PAGE,
};
use dsm_core::bootstrap::Bootstrap;
use dsm_core::segment::Placement;
use dsm_core::{Dsm, PAGE_SIZE};
use transport_rdma::Selected;
use transport_tcp::TcpTransport;

const SEGMENT: usize = 64 << 20;
/// Space per rank: the upper half (the heap) holds the segment.
const SPACE_PAGES: usize = 4 * SEGMENT / PAGE_SIZE;
const MSG: usize = 1 << 20;
const MSGS_PER_ITER: usize = 64;
/// Set in the environment of the bench started again as a home: the
/// layout's name, or [`STREAM_ROLE`].
const HOME_ROLE: &str = "DSM_BENCH_SCAN_HOME";
/// The role of the raw stream's sender, in a job of its own.
const STREAM_ROLE: &str = "stream";
/// The reader's request for a burst of the raw stream, and its signal that
/// the stream is over.
const STREAM_BURST: &[u8] = b"go";
const STREAM_DONE: &[u8] = b"done";
/// How long a rank of the raw stream's job waits for the other's goodbye.
const STREAM_SHUTDOWN: Duration = Duration::from_secs(10);
/// Words of the shared space's first page (homed at rank 0): the segment's
/// offset in the space (each rank maps its space at its own address, as in
/// the other suites), and the generation rank 0 writes next (0: finish).
const SEGMENT_WORD: usize = 0;
const COMMAND_WORD: usize = 1;
/// First page of the round-robin region: homed at rank 0 whatever the
/// number of ranks (up to 64), clear of page 0's command words.
const SPREAD_FIRST_PAGE: usize = 64;

/// Where the scanned data lives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// A segment homed at rank 0 (`Placement::Localized(0)`).
    Localized,
    /// The fixed space's pages, homed round-robin.
    RoundRobin,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Localized => "localized",
            Layout::RoundRobin => "round-robin",
        }
    }

    fn parse(name: &str) -> Option<Layout> {
        [Layout::Localized, Layout::RoundRobin]
            .into_iter()
            .find(|l| l.name() == name)
    }
}

/// Writes the scanned data's pages homed at `rank` of `ranks` (all pages of
/// `data` for the localized layout, held by its home): word i holds i, the
/// first of each page the generation.
fn write_pages(data: &[AtomicU64], layout: Layout, rank: usize, ranks: usize, generation: u64) {
    let mine =
        |page: usize| layout == Layout::Localized || (SPREAD_FIRST_PAGE + page) % ranks == rank;
    for (page, words) in data
        .chunks(WORDS_PER_PAGE)
        .enumerate()
        .filter(|(p, _)| mine(*p))
    {
        if generation == 1 {
            for (i, w) in words.iter().enumerate().skip(1) {
                w.store((page * WORDS_PER_PAGE + i) as u64, Relaxed);
            }
        }
        words[0].store(generation, Relaxed);
    }
}

/// The scanned data in `dsm`'s space, from its offset in page 0.
fn scanned_data(dsm: &Dsm) -> &[AtomicU64] {
    let words = dsm.words();
    let first = words[SEGMENT_WORD].load(Relaxed) as usize / 8;
    &words[first..first + SEGMENT / 8]
}

/// The raw stream, timed in the reader of a two-process job whose rank 0
/// ([`stream_sender`]) the bench starts again.
fn raw_stream(g: &mut BenchmarkGroup<'_, WallTime>, kind: &Selected, out: &Samples) {
    let mut boots = Bootstrap::loopback_group(2).expect("loopback job");
    let reader_boot = boots.pop().expect("the reader");
    let sender = spawn_ranks(boots, (HOME_ROLE, STREAM_ROLE), &[]);
    let tcp = TcpTransport::connect(reader_boot, &shm_options(1)).expect("TCP connects");
    let t = over_selected_or_exit(kind, tcp, SPACE_PAGES);
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
    t.shutdown(STREAM_SHUTDOWN)
        .expect("closing the raw stream's job");
    for status in sender.wait() {
        assert!(status.success(), "the stream's sender failed: {status}");
    }
}

/// Rank 0 of the raw stream's job: sends a burst each time the reader
/// asks, until it says the stream is over.
fn stream_sender() -> Result<(), Box<dyn std::error::Error>> {
    let boot = dsm_rendezvous::bootstrap_from_env()?;
    let tcp = TcpTransport::connect(boot, &shm_options(0))?;
    let t = over_selected(
        &selected_transport("scan, the stream's sender"),
        tcp,
        SPACE_PAGES,
    )?;
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
    t.shutdown(STREAM_SHUTDOWN)?;
    Ok(())
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

/// The reader: times each scan of the data the homes write, with each
/// cache bound of `runs` (`None`: the configured one) in turn.
fn cold_scan(
    g: &mut BenchmarkGroup<'_, WallTime>,
    reader: &Dsm,
    layout: Layout,
    runs: &[(&str, Option<usize>, &Samples)],
) {
    let mut windows = std::env::var_os("DSM_BENCH_WINDOWS").map(|_| String::new());
    let words = reader.words();
    let (rank, ranks) = (reader.rank(), reader.size());
    if layout == Layout::RoundRobin {
        let offset = SPREAD_FIRST_PAGE * PAGE_SIZE;
        let data = &words[offset / 8..(offset + SEGMENT) / 8];
        write_pages(data, layout, rank, ranks, 1);
    }
    // The homes have written the data, generation 1.
    reader.barrier().expect("barrier");
    let remote = scanned_data(reader);
    let pages = remote.len() / WORDS_PER_PAGE;
    let configured_cache = reader.cache_size();
    // Word i of the segment holds i, but the first of each page.
    let expected: u64 = (0..remote.len() as u64)
        .filter(|i| *i % WORDS_PER_PAGE as u64 != 0)
        .fold(0u64, |s, i| s.wrapping_add(i));
    let mut generation = 1u64;
    let mut scanned = false;
    let before = reader.stats();
    g.throughput(Throughput::Bytes(SEGMENT as u64));
    for &(name, cache, out) in runs {
        reader
            .set_cache_size(cache.or(configured_cache))
            .expect("cache bound");
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if scanned {
                        // Not timed: the homes write every page again, which
                        // invalidates the reader's copies.
                        generation += 1;
                        words[COMMAND_WORD].store(generation, Relaxed);
                        reader.barrier().expect("barrier");
                        if layout == Layout::RoundRobin {
                            write_pages(remote, layout, rank, ranks, generation);
                        }
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
                    assert_eq!(stale, 0, "the reader read stale pages");
                    assert_eq!(sum, expected, "the reader read wrong bytes");
                    scanned = true;
                    out.push(d);
                    total += d;
                }
                total
            })
        });
    }
    words[COMMAND_WORD].store(0, Relaxed);
    reader.barrier().expect("barrier");
    if let (Some(path), Some(w)) = (std::env::var_os("DSM_BENCH_WINDOWS"), windows) {
        if let Err(e) = std::fs::write(&path, w.trim_end()) {
            eprintln!("scan_2_ranks: cannot write DSM_BENCH_WINDOWS file {path:?}: {e}");
        }
    }
    let after = reader.stats();
    println!(
        "scan {}, {ranks} ranks: the reader during the scans: {} read faults, {} MiB received ({} MiB straight into their frames), {} pages evicted; {} pages per scan",
        layout.name(),
        after.read_faults - before.read_faults,
        (after.bytes_received - before.bytes_received) >> 20,
        ((after.pages_landed - before.pages_landed) * PAGE_SIZE as u64) >> 20,
        after.evictions_clean - before.evictions_clean,
        pages
    );
}

/// A home, in a process the bench started: each holds its pages of the
/// data and rewrites them between scans until told to finish.
fn home(layout: Layout) -> Result<(), Box<dyn std::error::Error>> {
    let boot = dsm_rendezvous::bootstrap_from_env()?;
    let rank = boot.rank;
    let tcp = TcpTransport::connect(boot, &shm_options(rank))?;
    let t = over_selected(&selected_transport("scan, a home"), tcp, SPACE_PAGES)?;
    let ranks = t.size();
    let home = start_dsm(t, SPACE_PAGES);
    let offset = match layout {
        Layout::Localized if rank == 0 => {
            let segment = home.alloc(SEGMENT, Placement::Localized(0))?;
            Some(segment.addr() as usize - home.base() as usize)
        }
        Layout::RoundRobin if rank == 0 => Some(SPREAD_FIRST_PAGE * PAGE_SIZE),
        _ => None,
    };
    if let Some(offset) = offset {
        home.words()[SEGMENT_WORD].store(offset as u64, Relaxed);
    }
    let offset = match layout {
        Layout::RoundRobin => SPREAD_FIRST_PAGE * PAGE_SIZE,
        Layout::Localized => offset.unwrap_or(0),
    };
    let at_home = &home.words()[offset / 8..(offset + SEGMENT) / 8];
    if layout == Layout::RoundRobin || rank == 0 {
        write_pages(at_home, layout, rank, ranks, 1);
    }
    home.barrier()?;
    loop {
        home.barrier()?;
        let generation = home.words()[COMMAND_WORD].load(Relaxed);
        if generation == 0 {
            break;
        }
        match layout {
            Layout::Localized if rank == 0 => thread::scope(|s| {
                for part in at_home.chunks(at_home.len() / 4) {
                    s.spawn(move || {
                        for page in part.chunks(WORDS_PER_PAGE) {
                            page[0].store(generation, Relaxed);
                        }
                    });
                }
            }),
            Layout::Localized => {}
            Layout::RoundRobin => write_pages(at_home, layout, rank, ranks, generation),
        }
        home.barrier()?;
    }
    home.finalize()?;
    Ok(())
}

/// MB/s (10^6 bytes per second) of `bytes` per sample at the median.
fn mb_per_s(samples: &Samples, bytes: usize) -> Option<f64> {
    samples
        .summary()
        .map(|s| bytes as f64 / (s.median / 1e6) / 1e6)
}

/// The raw stream (a job of its own), then one job of `ranks` processes:
/// the reader's scans of the data laid out as `layout`, with each cache bound
/// of `runs` (`None`: the configured one); the ratio of each scan to the
/// raw stream is printed.
fn job(
    c: &mut Criterion,
    kind: &Selected,
    suite: &str,
    ranks: usize,
    layout: Layout,
    runs: &[(&str, Option<usize>)],
) {
    let stream = Samples::default();
    let scans: Vec<Samples> = runs.iter().map(|_| Samples::default()).collect();
    let mut g = c.benchmark_group(suite);
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    raw_stream(&mut g, kind, &stream);
    let mut boots = Bootstrap::loopback_group(ranks).expect("loopback job");
    let reader_boot = boots.pop().expect("the reader");
    // A push at the barrier between scans would carry every page to the
    // reader before its timed scan, which would then measure no transfer
    // at all.
    let no_push: &[(&str, &str)] = if std::env::var_os("DSM_PUSH").is_none() {
        &[("DSM_PUSH", "0")]
    } else {
        &[]
    };
    let homes = spawn_ranks(boots, (HOME_ROLE, layout.name()), no_push);
    let tcp = TcpTransport::connect(reader_boot, &shm_options(ranks - 1)).expect("TCP connects");
    let t = over_selected_or_exit(kind, tcp, SPACE_PAGES);
    let reader = start_dsm(t, SPACE_PAGES);
    g.measurement_time(Duration::from_secs(20));
    let timed: Vec<(&str, Option<usize>, &Samples)> = runs
        .iter()
        .zip(&scans)
        .map(|(&(name, cache), out)| (name, cache, out))
        .collect();
    cold_scan(&mut g, &reader, layout, &timed);
    g.finish();
    reader.finalize().expect("finalize");
    for status in homes.wait() {
        assert!(status.success(), "a home's process failed: {status}");
    }
    let mut rows = vec![("raw_stream_1MiB_messages (per 64 MiB)", &stream)];
    rows.extend(runs.iter().map(|(name, _)| *name).zip(&scans));
    print_figures(suite, &rows);
    let Some(raw) = mb_per_s(&stream, MSGS_PER_ITER * MSG) else {
        return;
    };
    for ((name, _), samples) in runs.iter().zip(&scans) {
        if let Some(dsm) = mb_per_s(samples, SEGMENT) {
            println!(
                "{suite}: {name} {dsm:.1} MB/s, raw stream {raw:.1} MB/s: ratio {:.4} ({:.2}%)",
                dsm / raw,
                100.0 * dsm / raw
            );
        }
    }
}

fn scan(c: &mut Criterion) {
    let kind = selected_transport("scan");
    let over = match kind {
        Selected::Tcp => "scan",
        Selected::Rdma(_) => "scan_rdma",
    };
    job(
        c,
        &kind,
        &format!("{over}_2_ranks"),
        2,
        Layout::Localized,
        &[
            ("dsm_cold_scan_64MiB", None),
            ("dsm_cold_scan_64MiB_cache_16MiB", Some(16 << 20)),
        ],
    );
    for ranks in [2, 4] {
        job(
            c,
            &kind,
            &format!("{over}_round_robin_{ranks}_ranks"),
            ranks,
            Layout::RoundRobin,
            &[("dsm_cold_scan_64MiB", None)],
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
    let as_home = |role: &str| {
        if role == STREAM_ROLE {
            return stream_sender();
        }
        Layout::parse(role)
            .ok_or("unknown layout".into())
            .and_then(home)
    };
    dsm_bench::main_with_ranks(HOME_ROLE, "scan, a rank", as_home, benches)
}
