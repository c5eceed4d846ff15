//! Concurrent read faults of one rank: 1, 2, 4 and 8 threads of rank 1,
//! each reading its own 256 pages homed at rank 0 (no read-ahead: one
//! remote fault per page), over loopback TCP (`concurrent_faults_tcp`)
//! and over the rings co-located ranks use (`concurrent_faults_shm`, where
//! the pages are read directly from rank 0's memory, `DSM_DIRECT_READS`).
//! Criterion reports faults per second (throughput in elements); the
//! summary prints each thread count's rate beside the single thread's of
//! the same run. Faults on different pages should proceed in parallel and
//! their requests share messages: the rate should grow with threads until
//! the transport or the CPUs saturate. Beside them, measured first,
//! `concurrent_faults_mechanism`: the same thread counts on a region whose
//! faults the faulting thread serves itself with one `UFFDIO_COPY` (SIGBUS,
//! no DSM), how far this machine lets a process's faults overlap at all.
//!
//! The ranks are processes, as in a job: the bench process is rank 1, the
//! reader, and starts itself again as rank 0, the home
//! (`DSM_BENCH_CONCURRENT_HOME` set to the transport, the loopback job
//! handed over as dsmwrap does). Two ranks in one process would share one
//! memory map, whose TLB shootdowns (a direct read write-protects the
//! page in the home's mapping) would then reach the reader's own CPUs.
//! Each batch reads a fresh segment homed at rank 0, which rank 0 filled
//! and both free afterwards (not timed): pages rank 1 never held, so each
//! read is one remote fault carrying 4 KiB (pages rank 1 lost to a write
//! would be asked back with their neighbours). `bench/c/threaded_faults.c`
//! is the same measurement through `dsm.h`.

use std::hint::black_box;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, BenchmarkGroup, Criterion, Throughput};
use dsm_bench::mechanism::{SigbusCopy, SIGBUS_FILL};
use dsm_bench::{config, shm_options, spawn_ranks, tcp_options, WORDS_PER_PAGE};
use dsm_core::bootstrap::Bootstrap;
use dsm_core::{Config, Dsm, FaultDelivery, Placement, Transport, PAGE_SIZE};
use transport_tcp::{TcpOptions, TcpTransport};

/// The heap (the upper half) holds one batch's segment of 8 x 256 pages.
const SPACE_PAGES: usize = 8192;
const PAGES_PER_THREAD: usize = 256;
const THREADS: [usize; 4] = [1, 2, 4, 8];
/// Set in the environment of the bench started again as rank 0: `tcp` or
/// `shm`, the transport's options.
const HOME_ROLE: &str = "DSM_BENCH_CONCURRENT_HOME";
/// Words of the space's first page (homed at rank 0): the next batch's
/// generation (0: the end), and its number of pages.
const GENERATION_WORD: usize = 0;
const PAGES_WORD: usize = 1;

/// The options of the transport a role names.
fn options(over: &str) -> Option<fn(usize) -> TcpOptions> {
    match over {
        "tcp" => Some(tcp_options),
        "shm" => Some(shm_options),
        _ => None,
    }
}

/// The `Dsm` of `transport`'s rank: no read-ahead, faults served in the
/// faulting thread.
fn start(transport: Arc<dyn Transport>) -> Dsm {
    let hosts = vec!["localhost".to_string(); transport.size()];
    let config = Config {
        prefetch: 0,
        faults: FaultDelivery::Sigbus,
        ..config(transport.rank(), SPACE_PAGES)
    }
    .validate()
    .expect("bench configuration");
    let space = Dsm::prepare(&config).expect("mapping the space (userfaultfd)");
    Dsm::start(space, transport, hosts, config).expect("starting the DSM")
}

/// Rank 0, in a process the bench started: for each batch, allocates the
/// segment with the reader, fills it, and frees it once read.
fn home(over: &str) -> Result<(), Box<dyn std::error::Error>> {
    let options = options(over).ok_or("unknown transport")?;
    let boot = dsm_rendezvous::bootstrap_from_env()?;
    let rank = boot.rank;
    let home = start(TcpTransport::connect(boot, &options(rank))?);
    let words = home.words();
    loop {
        home.barrier()?;
        let generation = words[GENERATION_WORD].load(Relaxed);
        if generation == 0 {
            break;
        }
        let pages = usize::try_from(words[PAGES_WORD].load(Relaxed))?;
        let filled = home.coalloc(pages * PAGE_SIZE, Placement::Localized(0))?;
        for p in filled.pages() {
            words[p * WORDS_PER_PAGE].store(generation, Relaxed);
        }
        home.barrier()?;
        home.free(filled)?;
    }
    home.finalize()?;
    Ok(())
}

/// Faults per second of each thread count, as measured by criterion's
/// own loop (total faults / total time of the timed batches).
#[derive(Default)]
struct Rates(Vec<(usize, f64)>);

/// Times `batch` (one batch of `threads` threads' faults, returning the
/// time they took) under criterion as `{threads}_threads`, and returns the
/// faults per second of all its timed batches.
fn time_batches(
    g: &mut BenchmarkGroup<'_, WallTime>,
    threads: usize,
    mut batch: impl FnMut() -> Duration,
) -> f64 {
    let faults = threads * PAGES_PER_THREAD;
    g.throughput(Throughput::Elements(faults as u64));
    let (mut timed, mut counted) = (Duration::ZERO, 0usize);
    g.bench_function(format!("{threads}_threads"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let took = batch();
                total += took;
                timed += took;
                counted += faults;
            }
            total
        })
    });
    counted as f64 / timed.as_secs_f64().max(1e-9)
}

/// Reads `pages` with one thread per `PAGES_PER_THREAD` of them, each
/// thread its own in order (`read` loads and checks one page's first
/// word); returns the time from the first thread's start to the last one's
/// end.
fn read_in_threads(pages: &[usize], read: impl Fn(usize) + Sync) -> Duration {
    let read = &read;
    let t0 = Instant::now();
    thread::scope(|s| {
        for part in pages.chunks(PAGES_PER_THREAD) {
            s.spawn(move || part.iter().for_each(|&p| read(p)));
        }
    });
    t0.elapsed()
}

/// The limit on this machine: the same batches on a region whose missing
/// faults the faulting thread serves itself with one `UFFDIO_COPY` of
/// 4 KiB (`dsm_bench::mechanism::SigbusCopy`), no DSM. Its rate grows with
/// threads only as far as the CPUs (and the kernel's locks) let it: a DSM
/// fault that never waits for another rank can scale no further.
fn mechanism(c: &mut Criterion, group: &str) -> Rates {
    let mut rates = Rates::default();
    let most = THREADS.iter().max().copied().unwrap_or(1);
    let mechanism = match SigbusCopy::new(most * PAGES_PER_THREAD) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("concurrent_faults: {e}; {group} skipped");
            return rates;
        }
    };
    let fill = u64::from_ne_bytes([SIGBUS_FILL; 8]);
    mechanism.serve(|region| {
        let mut g = c.benchmark_group(group);
        for threads in THREADS {
            let pages: Vec<usize> = (0..threads * PAGES_PER_THREAD).collect();
            let rate = time_batches(&mut g, threads, || {
                region.discard();
                read_in_threads(&pages, |p| {
                    assert_eq!(black_box(region.load(p)), fill, "a page missed its copy");
                })
            });
            rates.0.push((threads, rate));
        }
        g.finish();
    });
    rates
}

fn concurrent(c: &mut Criterion, group: &str, over: &str) -> Rates {
    let options = options(over).expect("a known transport");
    let mut boots = Bootstrap::loopback_group(2).expect("loopback job");
    let reader_boot = boots.pop().expect("the reader");
    let homes = spawn_ranks(boots, (HOME_ROLE, over), &[]);
    let rank = reader_boot.rank;
    let reader = start(TcpTransport::connect(reader_boot, &options(rank)).expect("TCP connects"));
    let words = reader.words();
    let mut generation = 0u64;
    let mut rates = Rates::default();
    let mut g = c.benchmark_group(group);
    for threads in THREADS {
        let faults = threads * PAGES_PER_THREAD;
        let rate = time_batches(&mut g, threads, || {
            generation += 1;
            words[GENERATION_WORD].store(generation, Relaxed);
            words[PAGES_WORD].store(faults as u64, Relaxed);
            reader.barrier().expect("barrier");
            let read = reader
                .coalloc(faults * PAGE_SIZE, Placement::Localized(0))
                .expect("coalloc at rank 1");
            reader
                .barrier()
                .expect("barrier: rank 0 filled the segment");
            let pages: Vec<usize> = read.pages().collect();
            let expected = generation;
            let took = read_in_threads(&pages, |p| {
                let w: &AtomicU64 = &words[p * WORDS_PER_PAGE];
                let v = black_box(w.load(Relaxed));
                assert_eq!(v, expected, "rank 1 read stale page data");
            });
            reader.free(read).expect("free at rank 1");
            took
        });
        rates.0.push((threads, rate));
    }
    g.finish();
    words[GENERATION_WORD].store(0, Relaxed);
    reader.barrier().expect("the last barrier");
    reader.finalize().expect("finalize");
    for status in homes.wait() {
        assert!(status.success(), "rank 0's process failed: {status}");
    }
    rates
}

fn print_rates(group: &str, rates: &Rates) {
    let Some(&(_, single)) = rates.0.first() else {
        return;
    };
    for &(threads, rate) in &rates.0 {
        println!(
            "{group}: {threads} thread(s): {:.0} faults/s, {:.2}x the single thread's",
            rate,
            rate / single
        );
    }
}

fn concurrent_faults(c: &mut Criterion) {
    // First, while no DSM has its SIGBUS handler installed in this process.
    let limit = mechanism(c, "concurrent_faults_mechanism");
    let tcp = concurrent(c, "concurrent_faults_tcp", "tcp");
    let shm = concurrent(c, "concurrent_faults_shm", "shm");
    print_rates("concurrent_faults_tcp", &tcp);
    print_rates("concurrent_faults_shm", &shm);
    print_rates("concurrent_faults_mechanism", &limit);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = concurrent_faults
}
fn main() -> ExitCode {
    dsm_bench::main_with_ranks(HOME_ROLE, "concurrent_faults, rank 0", home, benches)
}
