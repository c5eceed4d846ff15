//! Remote read fault of one 4 KiB page (no prefetch) beside a raw 4 KiB
//! request/response round trip over the same transport, measured in the same
//! run; the ratio of the medians is printed at the end.
//!
//! The transport follows `DSM_TRANSPORT` like `dsm::init` (`auto`: RDMA when
//! an active device exists, else TCP):
//!
//! * `fault_latency_tcp/raw_round_trip_16B_4KiB` (through the transport's
//!   API: its receive thread hands the message on, as to the engine),
//!   `fault_latency_tcp/raw_socket_round_trip_16B_4KiB` (the same on a bare
//!   pair of loopback sockets, blocking reads, no transport) and
//!   `fault_latency_tcp/dsm_remote_read_fault_4KiB` on loopback TCP, the
//!   fault served by the fault thread (`DSM_FAULTS=thread`), and
//!   `.../dsm_remote_read_fault_4KiB_sigbus` served by the faulting thread
//!   itself (`DSM_FAULTS=sigbus`), on a second pair of endpoints, and
//!   `.../dsm_remote_read_fault_4KiB_sigbus_evicting` the same with rank
//!   1's cache bounded to 64 pages (`Dsm::set_cache_size`): past 60 its
//!   engine thread evicts in the background, a few pages every few faults;
//! * `fault_latency_shm/raw_round_trip_16B_4KiB` and
//!   `fault_latency_shm/dsm_remote_read_fault_4KiB_sigbus`: the same over
//!   rings in shared memory, as co-located ranks talk (TCP runs only), with
//!   the ratio to the loopback TCP fault of the run (with
//!   `DSM_DIRECT_READS`, the default, rank 1 write-protects the page in
//!   rank 0's mapping and copies it from rank 0's memory, no message); beside them
//!   `fault_latency_shm/raw_polled_round_trip_16B_4KiB`, the round trip as
//!   a fault makes it (answered in the receive thread, the answer polled
//!   for by the asking thread), the least a fault's exchange takes; and
//!   `fault_latency_shm/dsm_read_fault_home_shared_4KiB_sigbus`, a read
//!   fault on a page its home holds read-only (rank 0 does not rewrite the
//!   pages; rank 1's copies go through a 64-page cache), which rank 1
//!   copies from rank 0's frame with no message (`DSM_DIRECT_READS`);
//! * with RDMA, `fault_latency_rdma/...` for the same two figures (the DSM
//!   over `transport_rdma::connect_job`, as `dsm::init` does it) plus
//!   `fault_latency_rdma/raw_rdma_read_4KiB`, a one-sided READ.
//!
//! Both ranks live in this process: two `Dsm` instances, each with its own
//! mapping (at a different address), userfaultfd, fault engine and transport
//! endpoint, connected over loopback like the ranks of a one-machine job.
//! Rank 1 reads the first word of a page homed at rank 0 that it does not
//! hold: one request and one 4 KiB grant (over rings, a direct read). When every such page has been
//! read, rank 0 writes them all (invalidating rank 1's copies) outside the
//! timed part, and the reads start over.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use dsm_core::bootstrap::Bootstrap;
use dsm_core::{Config, Dsm, FaultDelivery, Transport, PAGE_SIZE};
use transport_rdma::verbs::PortSummary;
use transport_rdma::{RdmaDevice, RdmaOptions, RdmaTransport, Selected};
use transport_tcp::{TcpOptions, TcpTransport};

/// 32 MiB: the lower half (not the heap) holds 4096 pages, 2048 homed at rank 0.
const SPACE_PAGES: usize = 8192;
const BASES: [usize; 2] = [0x2000_0000_0000, 0x2100_0000_0000];
const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;

/// Per-operation samples (µs) of one figure, for the printed summary.
#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl Samples {
    fn push(&self, d: Duration) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < 4_000_000 {
            v.push(d.as_secs_f64() * 1e6);
        }
    }

    /// (median, p99, count)
    fn summary(&self) -> Option<(f64, f64, usize)> {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
        Some((at(0.5), at(0.99), v.len()))
    }
}

/// Two connected endpoints of `kind`, rank 0 first.
fn pair(kind: &Selected) -> Vec<Arc<dyn Transport>> {
    pair_with(kind, dsm_bench::tcp_options)
}

/// Two endpoints of `kind` whose TCP part has `options` (rank -> options).
fn pair_with(kind: &Selected, options: fn(usize) -> TcpOptions) -> Vec<Arc<dyn Transport>> {
    dsm_bench::job_transports(kind, 2, SPACE_PAGES, options)
}

/// Two raw RDMA endpoints with a registered 1 MiB region each (for READ).
fn rdma_pair(port: &PortSummary) -> Vec<Arc<RdmaTransport>> {
    let boots = Bootstrap::loopback_group(2).expect("loopback job");
    let handles: Vec<_> = boots
        .into_iter()
        .map(|b| {
            let device = port.device.clone();
            thread::spawn(move || {
                let tcp = TcpTransport::connect(b, &TcpOptions::default()).expect("TCP connects");
                let mut opts = RdmaOptions::from_env().expect("DSM_RDMA_* settings");
                opts.device.get_or_insert(device);
                // Both ends share this host: measure the adapter, not the rings.
                opts.local = transport_rdma::LocalPath::Rdma;
                let dev = RdmaDevice::open(&opts).expect("RDMA device");
                let region = dev.alloc(1 << 20).expect("registered region");
                RdmaTransport::connect(tcp, dev, vec![region], &opts).expect("RDMA connects")
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("connecting thread"))
        .collect()
}

/// 16-byte request, 4 KiB reply: the shape of a page fetch.
fn raw_round_trip(c: &mut Criterion, group: &str, t: &[Arc<dyn Transport>], out: &Samples) {
    let (client, server) = (Arc::clone(&t[0]), Arc::clone(&t[1]));
    let echo = thread::spawn(move || {
        let page = vec![7u8; PAGE_SIZE];
        while let Ok(m) = server.recv() {
            if m.payload == b"stop" {
                return;
            }
            server.send(m.from, &page).expect("reply");
        }
    });
    let request = [1u8; 16];
    time_exchanges(c, (group, "raw_round_trip_16B_4KiB"), out, || {
        client.send(1, &request).expect("request");
        let reply = client.recv().expect("reply");
        assert_eq!(reply.payload.len(), PAGE_SIZE);
    });
    client.send(1, b"stop").expect("stop");
    echo.join().expect("echo thread");
}

/// The round trip of [`raw_round_trip`] the way a fault makes it: the
/// server answers in its receive thread (the engine's inline delivery at a
/// home), and the client polls its links for the answer itself
/// ([`Transport::poll_answers`], taken before the request leaves) for up
/// to `spin` before it sleeps, as a faulting thread with `DSM_WAIT_SPIN_US`.
/// The least the transport takes for a fault's exchange: the limit a
/// fault is held against, beside the plain round trip.
fn polled_round_trip(
    c: &mut Criterion,
    group: &str,
    t: &[Arc<dyn Transport>],
    spin: Duration,
    out: &Samples,
) {
    let (client, server) = (Arc::clone(&t[0]), Arc::clone(&t[1]));
    let page = vec![7u8; PAGE_SIZE];
    let replier = Arc::clone(&server);
    // A reply the receive thread cannot send without waiting is left to
    // the echo thread below (handed back, queued).
    let answered_inline = server.deliver_inline(Box::new(move |m| {
        if m.payload == b"stop" {
            return Some(m);
        }
        match replier.try_send_parts(m.from, &[&page]) {
            Ok(dsm_core::transport::TrySent::WouldWait) | Err(_) => Some(m),
            Ok(_) => None,
        }
    }));
    assert!(
        answered_inline,
        "the transport answers in its receive thread"
    );
    let echo = thread::spawn(move || {
        let page = vec![7u8; PAGE_SIZE];
        while let Ok(m) = server.recv() {
            if m.payload == b"stop" {
                return;
            }
            server.finish_sends().expect("a reply's rest");
            server.send(m.from, &page).expect("reply");
        }
    });
    let inbox = client.inbox();
    let request = [1u8; 16];
    time_exchanges(c, (group, "raw_polled_round_trip_16B_4KiB"), out, || {
        let mut answers = client.poll_answers();
        client.send(1, &request).expect("request");
        dsm_core::sched::poll_with_answers(&mut answers, spin, || !inbox.is_empty());
        drop(answers);
        let reply = client.recv().expect("reply");
        assert_eq!(reply.payload.len(), PAGE_SIZE);
    });
    client.send(1, b"stop").expect("stop");
    echo.join().expect("echo thread");
}

/// Times `exchange` (one request and its reply) as `group/name`, each
/// exchange's duration also kept in `out`.
fn time_exchanges(
    c: &mut Criterion,
    (group, name): (&str, &str),
    out: &Samples,
    mut exchange: impl FnMut(),
) {
    let mut g = c.benchmark_group(group);
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t0 = Instant::now();
                exchange();
                let d = t0.elapsed();
                total += d;
                out.push(d);
            }
            total
        })
    });
    g.finish();
}

/// The same round trip on a bare pair of loopback TCP sockets, no
/// transport: one blocking write and one blocking read on each side, the
/// least the kernel takes for it.
fn socket_round_trip(c: &mut Criterion, group: &str, out: &Samples) {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").expect("loopback listener");
    let mut client = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    for s in [&client, &server] {
        s.set_nodelay(true).expect("TCP_NODELAY");
    }
    let echo = thread::spawn(move || {
        let (mut request, page) = ([0u8; 16], vec![7u8; PAGE_SIZE]);
        // Ends when the client closes its end.
        while server.read_exact(&mut request).is_ok() {
            if server.write_all(&page).is_err() {
                return;
            }
        }
    });
    let (request, mut reply) = ([1u8; 16], vec![0u8; PAGE_SIZE]);
    time_exchanges(c, (group, "raw_socket_round_trip_16B_4KiB"), out, || {
        client.write_all(&request).expect("request");
        client.read_exact(&mut reply).expect("reply");
    });
    drop(client);
    echo.join().expect("echo thread");
}

fn rdma_read(c: &mut Criterion, group: &str, port: &PortSummary, out: &Samples) {
    let t = rdma_pair(port);
    let remote = t[0].remote_regions(1)[0];
    let local = t[0].device().alloc(PAGE_SIZE).expect("local buffer");
    let mut g = c.benchmark_group(group);
    let mut i = 0u64;
    g.bench_function("raw_rdma_read_4KiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let off = (i * PAGE_SIZE as u64) % remote.len;
                i += 1;
                let t0 = Instant::now();
                t[0].read(1, &remote, off, &local, 0, PAGE_SIZE)
                    .expect("RDMA READ");
                let d = t0.elapsed();
                total += d;
                out.push(d);
            }
            total
        })
    });
    g.finish();
    let ends: Vec<_> = t
        .into_iter()
        .map(|t| thread::spawn(move || t.shutdown(Duration::from_secs(20))))
        .collect();
    for e in ends {
        let _ = e.join();
    }
}

/// Rank 1 reads pages homed at rank 0, one remote read fault each, its
/// faults delivered as `delivery` says.
fn dsm_read_fault(
    c: &mut Criterion,
    (group, name): (&str, &str),
    delivery: FaultDelivery,
    t: Vec<Arc<dyn Transport>>,
    out: &Samples,
    reader_cache: Option<usize>,
    home_rewrites: bool,
) {
    let hosts = vec!["localhost".to_string(); 2];
    let dsms: Vec<Dsm> = t
        .into_iter()
        .zip(BASES)
        .map(|(t, base)| {
            let config = Config {
                base,
                size: SPACE_PAGES * PAGE_SIZE,
                // One fault per page: no read-ahead.
                prefetch: 0,
                faults: delivery,
                ..Config::from_env().expect("DSM_* variables")
            }
            .validate()
            .expect("bench configuration");
            let space = Dsm::prepare(&config).expect("mapping the space (userfaultfd)");
            Dsm::start(space, t, hosts.clone(), config).expect("starting the DSM")
        })
        .collect();
    let (owner, reader) = (&dsms[0], &dsms[1]);
    reader
        .set_cache_size(reader_cache.or(reader.cache_size()))
        .expect("cache bound");
    // Pages homed at rank 0 (page p starts at rank p mod 2), lower half only.
    let pages: Vec<usize> = (0..SPACE_PAGES / 2).step_by(2).collect();
    let word = |d: &Dsm, p: usize| -> *const AtomicU64 { &d.words()[p * WORDS_PER_PAGE] };
    let (owner_words, reader_words): (Vec<_>, Vec<_>) = pages
        .iter()
        .map(|&p| (word(owner, p), word(reader, p)))
        .unzip();
    let mut next = 0;
    let mut generation = 0u64;
    if !home_rewrites {
        // Written once and read once (not timed): the home keeps its pages
        // mapped read-only, the reader's copies go through its cache.
        generation = 1;
        for (&o, &r) in owner_words.iter().zip(&reader_words) {
            // SAFETY: the pointers are into the mapped spaces of `owner` and
            // `reader`, which live until `dsms` is dropped after the group.
            unsafe { &*o }.store(generation, Relaxed);
            // SAFETY: as above.
            let read = unsafe { &*r }.load(Relaxed);
            assert_eq!(read, generation);
        }
    }
    let mut g = c.benchmark_group(group);
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if next == pages.len() && !home_rewrites {
                    next = 0;
                } else if next == pages.len() {
                    // Every page read: rank 0 writes them all (not timed),
                    // which takes rank 1's copies away.
                    generation += 1;
                    for &w in &owner_words {
                        // SAFETY: the pointer is into `owner`'s mapped space,
                        // which lives until `dsms` is dropped after the group.
                        unsafe { &*w }.store(generation, Relaxed);
                    }
                    next = 0;
                }
                let w = reader_words[next];
                next += 1;
                let t0 = Instant::now();
                // SAFETY: as above, into `reader`'s mapped space.
                let v = black_box(unsafe { &*w }.load(Relaxed));
                let d = t0.elapsed();
                assert_eq!(v, generation, "rank 1 read stale page data");
                total += d;
                out.push(d);
            }
            total
        })
    });
    g.finish();
    let engine = reader.stats();
    println!(
        "{group}: {name}: rank 1 engine: {} read faults, {} pages received, {} read directly, {} messages handled on receipt, {} pages evicted; fault seen -> page installed p50 {:.1} µs, p99 {:.1} µs",
        engine.read_faults,
        engine.pages_received,
        engine.direct_reads,
        engine.messages_inline,
        engine.evictions_clean,
        engine.fault_latency_p50.as_secs_f64() * 1e6,
        engine.fault_latency_p99.as_secs_f64() * 1e6
    );
    thread::scope(|s| {
        for d in dsms {
            s.spawn(move || d.finalize().expect("finalize"));
        }
    });
}

/// Prints every figure, then each DSM figure's ratio to each raw round
/// trip: through the transport (the target's baseline) and, on TCP, on
/// bare sockets.
fn print_summary(group: &str, rows: &[(&str, &Samples)]) {
    let mut faults = Vec::new();
    let mut bases = Vec::new();
    for (name, samples) in rows {
        if let Some((p50, p99, n)) = samples.summary() {
            println!("{group}: {name:<38} median {p50:8.1} µs  p99 {p99:8.1} µs  ({n} samples)");
            if name.starts_with("dsm_") {
                faults.push((name, p50));
            } else if name.contains("round_trip") {
                bases.push((name, p50));
            }
        }
    }
    for (base, b) in &bases {
        for (name, f) in &faults {
            println!("{group}: ratio {name} / {base} = {:.2}x", f / b);
        }
    }
}

fn fault_latency(c: &mut Criterion) {
    let kind = dsm_bench::selected_transport("fault_latency");
    let group = match kind {
        Selected::Tcp => "fault_latency_tcp",
        Selected::Rdma(_) => "fault_latency_rdma",
    };
    let [raw, socket, fault, fault_sigbus, evicting, read] =
        std::array::from_fn(|_| Samples::default());
    let transports = pair(&kind);
    raw_round_trip(c, group, &transports, &raw);
    if let Selected::Tcp = kind {
        socket_round_trip(c, group, &socket);
    }
    let by_thread = (group, "dsm_remote_read_fault_4KiB");
    dsm_read_fault(
        c,
        by_thread,
        FaultDelivery::Events,
        transports,
        &fault,
        None,
        true,
    );
    let by_signal = (group, "dsm_remote_read_fault_4KiB_sigbus");
    dsm_read_fault(
        c,
        by_signal,
        FaultDelivery::Sigbus,
        pair(&kind),
        &fault_sigbus,
        None,
        true,
    );
    let by_signal_evicting = (group, "dsm_remote_read_fault_4KiB_sigbus_evicting");
    dsm_read_fault(
        c,
        by_signal_evicting,
        FaultDelivery::Sigbus,
        pair(&kind),
        &evicting,
        Some(64 * PAGE_SIZE),
        true,
    );
    if let Selected::Rdma(port) = &kind {
        rdma_read(c, group, port, &read);
    }
    print_summary(
        group,
        &[
            ("raw_round_trip_16B_4KiB", &raw),
            ("raw_socket_round_trip_16B_4KiB", &socket),
            ("dsm_remote_read_fault_4KiB", &fault),
            ("dsm_remote_read_fault_4KiB_sigbus", &fault_sigbus),
            ("dsm_remote_read_fault_4KiB_sigbus_evicting", &evicting),
            ("raw_rdma_read_4KiB", &read),
        ],
    );
    if let (Some((with, ..)), Some((without, ..))) = (evicting.summary(), fault_sigbus.summary()) {
        println!(
            "{group}: ratio dsm_remote_read_fault_4KiB_sigbus_evicting / dsm_remote_read_fault_4KiB_sigbus = {:.2}x",
            with / without
        );
    }
    if let Selected::Tcp = kind {
        co_located(c, &fault_sigbus);
    }
}

/// Co-located ranks over rings in shared memory (what `dsm::init` sets up
/// for ranks on one host): the raw round trip and the read fault on a
/// `fault_latency_shm` pair, beside the loopback TCP fault of this run.
fn co_located(c: &mut Criterion, tcp_fault: &Samples) {
    let group = "fault_latency_shm";
    let [raw, polled, fault, direct] = std::array::from_fn(|_| Samples::default());
    raw_round_trip(
        c,
        group,
        &pair_with(&Selected::Tcp, dsm_bench::shm_options),
        &raw,
    );
    // The faulting thread's poll: `DSM_WAIT_SPIN_US` for two ranks here.
    let spin = Config::from_env()
        .ok()
        .and_then(|config| config.wait_spin)
        .unwrap_or_else(|| dsm_core::config::auto_wait_spin(2));
    polled_round_trip(
        c,
        group,
        &pair_with(&Selected::Tcp, dsm_bench::shm_options),
        spin,
        &polled,
    );
    let by_signal = (group, "dsm_remote_read_fault_4KiB_sigbus");
    dsm_read_fault(
        c,
        by_signal,
        FaultDelivery::Sigbus,
        pair_with(&Selected::Tcp, dsm_bench::shm_options),
        &fault,
        None,
        true,
    );
    // A page its home holds read-only (the home does not rewrite it; the
    // reader's copies go through a 64-page cache): copied from the home's
    // frame, with no message (`DSM_DIRECT_READS`).
    dsm_read_fault(
        c,
        (group, "dsm_read_fault_home_shared_4KiB_sigbus"),
        FaultDelivery::Sigbus,
        pair_with(&Selected::Tcp, dsm_bench::shm_options),
        &direct,
        Some(64 * PAGE_SIZE),
        false,
    );
    print_summary(
        group,
        &[
            ("raw_round_trip_16B_4KiB", &raw),
            ("raw_polled_round_trip_16B_4KiB", &polled),
            ("dsm_remote_read_fault_4KiB_sigbus", &fault),
            ("dsm_read_fault_home_shared_4KiB_sigbus", &direct),
        ],
    );
    if let (Some((shm, ..)), Some((tcp, ..))) = (fault.summary(), tcp_fault.summary()) {
        println!(
            "{group}: ratio dsm_remote_read_fault_4KiB_sigbus / fault_latency_tcp dsm_remote_read_fault_4KiB_sigbus = {:.2}x",
            shm / tcp
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = fault_latency
}
criterion_main!(benches);
