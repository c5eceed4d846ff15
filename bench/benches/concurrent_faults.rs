//! Concurrent read faults of one rank: 1, 2, 4 and 8 threads of rank 1,
//! each reading its own 256 pages homed at rank 0 (no read-ahead: one
//! remote fault per page), over loopback TCP (`concurrent_faults_tcp`)
//! and over the rings co-located ranks use (`concurrent_faults_shm`).
//! Criterion reports faults per second (throughput in elements); the
//! summary prints each thread count's rate beside the single thread's of
//! the same run. Faults on different pages should proceed in parallel and
//! their requests share messages: the rate should grow with threads until
//! the transport or the CPUs saturate.
//!
//! Both ranks live in this process (two `Dsm` instances at different
//! addresses). Each batch reads a fresh segment homed at rank 0, which rank
//! 0 filled and both free afterwards (not timed): pages rank 1 never held,
//! so each read is one remote fault carrying 4 KiB (pages rank 1 lost to a
//! write would be asked back with their neighbours). `bench/c/threaded_faults.c`
//! is the same measurement through `dsm.h`, as separate processes.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dsm_core::bootstrap::Bootstrap;
use dsm_core::{Config, Dsm, FaultDelivery, Placement, Transport, PAGE_SIZE};
use transport_tcp::{TcpOptions, TcpTransport};

/// The heap (the upper half) holds one batch's segment of 8 x 256 pages.
const SPACE_PAGES: usize = 8192;
const PAGES_PER_THREAD: usize = 256;
const THREADS: [usize; 4] = [1, 2, 4, 8];
const BASES: [usize; 2] = [0x2200_0000_0000, 0x2300_0000_0000];
const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;

fn pair(options: fn(usize) -> TcpOptions) -> Vec<Arc<dyn Transport>> {
    let boots = Bootstrap::loopback_group(2).expect("loopback job");
    let handles: Vec<_> = boots
        .into_iter()
        .map(|b| {
            let options = options(b.rank);
            thread::spawn(move || -> Arc<dyn Transport> {
                TcpTransport::connect(b, &options).expect("TCP connects")
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("connecting thread"))
        .collect()
}

fn start(t: Vec<Arc<dyn Transport>>) -> Vec<Dsm> {
    let hosts = vec!["localhost".to_string(); 2];
    t.into_iter()
        .zip(BASES)
        .map(|(t, base)| {
            let config = Config {
                base,
                size: SPACE_PAGES * PAGE_SIZE,
                prefetch: 0,
                faults: FaultDelivery::Sigbus,
                ..Config::from_env().expect("DSM_* variables")
            }
            .validate()
            .expect("bench configuration");
            let space = Dsm::prepare(&config).expect("mapping the space (userfaultfd)");
            Dsm::start(space, t, hosts.clone(), config).expect("starting the DSM")
        })
        .collect()
}

/// Faults per second of each thread count, as measured by criterion's
/// own loop (total faults / total time of the timed batches).
#[derive(Default)]
struct Rates(Vec<(usize, f64)>);

fn concurrent(c: &mut Criterion, group: &str, options: fn(usize) -> TcpOptions) -> Rates {
    let dsms = start(pair(options));
    let (owner, reader) = (&dsms[0], &dsms[1]);
    let mut generation = 0u64;
    let mut rates = Rates::default();
    let mut g = c.benchmark_group(group);
    for threads in THREADS {
        let faults = threads * PAGES_PER_THREAD;
        g.throughput(Throughput::Elements(faults as u64));
        let (mut timed, mut counted) = (Duration::ZERO, 0usize);
        g.bench_function(format!("{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    generation += 1;
                    let (filled, read) = fresh_segment(owner, reader, faults, generation);
                    let pages: Vec<usize> = read.pages().collect();
                    let words = reader.words();
                    let expected = generation;
                    let t0 = Instant::now();
                    thread::scope(|s| {
                        for part in pages[..faults].chunks(PAGES_PER_THREAD) {
                            s.spawn(move || {
                                for &p in part {
                                    let w: &AtomicU64 = &words[p * WORDS_PER_PAGE];
                                    let v = black_box(w.load(Relaxed));
                                    assert_eq!(v, expected, "rank 1 read stale page data");
                                }
                            });
                        }
                    });
                    let d = t0.elapsed();
                    thread::scope(|s| {
                        s.spawn(|| owner.free(filled).expect("free at rank 0"));
                        reader.free(read).expect("free at rank 1");
                    });
                    total += d;
                    timed += d;
                    counted += faults;
                }
                total
            })
        });
        rates
            .0
            .push((threads, counted as f64 / timed.as_secs_f64().max(1e-9)));
    }
    g.finish();
    dsm_bench::finalize(dsms);
    rates
}

/// A segment of `pages` pages homed at rank 0, allocated by both ranks
/// (collectively) and filled by rank 0 with `generation` in each page's
/// first word; rank 0's handle, then rank 1's.
fn fresh_segment(
    owner: &Dsm,
    reader: &Dsm,
    pages: usize,
    generation: u64,
) -> (dsm_core::Segment, dsm_core::Segment) {
    let bytes = pages * PAGE_SIZE;
    let (filled, read) = thread::scope(|s| {
        let at_owner = s.spawn(|| {
            owner
                .coalloc(bytes, Placement::Localized(0))
                .expect("coalloc at rank 0")
        });
        let read = reader
            .coalloc(bytes, Placement::Localized(0))
            .expect("coalloc at rank 1");
        (at_owner.join().expect("allocating thread"), read)
    });
    let words = owner.words();
    for p in filled.pages() {
        words[p * WORDS_PER_PAGE].store(generation, Relaxed);
    }
    (filled, read)
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
    let tcp = concurrent(c, "concurrent_faults_tcp", dsm_bench::tcp_options);
    let shm = concurrent(c, "concurrent_faults_shm", dsm_bench::shm_options);
    print_rates("concurrent_faults_tcp", &tcp);
    print_rates("concurrent_faults_shm", &shm);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = concurrent_faults
}
criterion_main!(benches);
