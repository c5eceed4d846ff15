//! Helpers shared by the criterion suites in `benches/`; see `bench/README.md`.
//!
//! Most multi-rank suites run every rank inside the bench process: one `Dsm`
//! per rank, each with its own mapping (at its own address), userfaultfd,
//! fault engine and TCP transport endpoint, connected over loopback like
//! the ranks of a one-machine job. The `scan` and `concurrent_faults`
//! suites run their home ranks as processes of their own (the bench binary
//! started again, [`spawn_ranks`]).

pub mod mechanism;

use std::hint::black_box;
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::BenchmarkGroup;
use dsm_core::bootstrap::Bootstrap;
use dsm_core::{Config, Dsm, Protocol, Transport, PAGE_SIZE};
use transport_rdma::Selected;
use transport_tcp::{TcpOptions, TcpTransport};

pub const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;

/// Where rank r maps its space: 1 TiB apart, so ranks never overlap.
pub fn base_of(rank: usize) -> usize {
    0x2000_0000_0000 + rank * 0x100_0000_0000
}

/// True under `cargo bench -- --test` (each benchmark runs once).
pub fn test_mode() -> bool {
    std::env::args().any(|a| a == "--test")
}

/// Per-operation samples (µs) of one figure, for the printed summary.
#[derive(Default)]
pub struct Samples(Mutex<Vec<f64>>);

/// Median and 99th percentile (µs) of a figure.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub median: f64,
    pub p99: f64,
    pub count: usize,
}

impl Samples {
    pub fn push(&self, d: Duration) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < 4_000_000 {
            v.push(d.as_secs_f64() * 1e6);
        }
    }

    pub fn summary(&self) -> Option<Summary> {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
        Some(Summary {
            median: at(0.5),
            p99: at(0.99),
            count: v.len(),
        })
    }

    /// Times `op` once, records it and returns its duration.
    pub fn time<T>(&self, op: impl FnOnce() -> T) -> (Duration, T) {
        let t0 = Instant::now();
        let out = black_box(op());
        let d = t0.elapsed();
        self.push(d);
        (d, out)
    }
}

/// Prints median and p99 of each figure that has samples.
pub fn print_figures(suite: &str, rows: &[(&str, &Samples)]) {
    for (name, samples) in rows {
        if let Some(s) = samples.summary() {
            println!(
                "{suite}: {name:<40} median {:9.1} µs  p99 {:9.1} µs  ({} samples)",
                s.median, s.p99, s.count
            );
        }
    }
}

/// Prints `figure / baseline` of the medians.
pub fn print_ratio(suite: &str, figure: (&str, &Samples), baseline: (&str, &Samples)) {
    if let (Some(f), Some(b)) = (figure.1.summary(), baseline.1.summary()) {
        println!(
            "{suite}: ratio {} / {} = {:.2}x ({:.1} / {:.1} µs)",
            figure.0,
            baseline.0,
            f.median / b.median,
            f.median,
            b.median
        );
    }
}

/// The TCP options of `rank`, as `dsm::init` sets them up: its receive
/// threads on the CPU `DSM_ENGINE_CPU` gives its engine, scheduled as
/// `DSM_SERVICE_SCHED` says; loopback TCP between the ranks (the suites'
/// endpoints share a host, where `dsm::init` would use shared memory: see
/// [`shm_options`]).
pub fn tcp_options(rank: usize) -> TcpOptions {
    let config = Config::from_env().expect("DSM_* variables");
    TcpOptions {
        receiver_cpu: config.engine_cpu.for_rank(rank),
        receiver_sched: config.service_sched,
        shared_memory: false,
        ..TcpOptions::default()
    }
}

/// [`tcp_options`] with rings in shared memory between the ranks, as
/// `dsm::init` sets up co-located ranks (`DSM_SHM_SPIN_US` applies).
pub fn shm_options(rank: usize) -> TcpOptions {
    TcpOptions {
        shared_memory: true,
        ..tcp_options(rank)
    }
}

/// `n` TCP transport endpoints of one job on loopback, rank order.
pub fn tcp_group(n: usize) -> Vec<Arc<TcpTransport>> {
    let boots = Bootstrap::loopback_group(n).expect("loopback job");
    let handles: Vec<_> = boots
        .into_iter()
        .map(|b| {
            let options = tcp_options(b.rank);
            thread::spawn(move || TcpTransport::connect(b, &options).expect("TCP connects"))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("connecting thread"))
        .collect()
}

/// `DSM_TRANSPORT` resolved against this machine (`auto`: RDMA if a device
/// is up, else TCP); a suite asked for `rdma` without a device exits
/// (status 2) saying so.
pub fn selected_transport(suite: &str) -> Selected {
    transport_rdma::select_from_env().unwrap_or_else(|e| {
        eprintln!("{suite}: {e}");
        std::process::exit(2);
    })
}

/// `n` endpoints of one job on this machine over `kind`, rank order: TCP on
/// loopback with `options` (rank -> options) and, for RDMA, queue pairs over
/// it (`DSM_RDMA_*` apply; each rank registers landing room for a space of
/// `space_pages` pages).
pub fn job_transports(
    kind: &Selected,
    n: usize,
    space_pages: usize,
    options: fn(usize) -> TcpOptions,
) -> Vec<Arc<dyn Transport>> {
    let boots = Bootstrap::loopback_group(n).expect("loopback job");
    let handles: Vec<_> = boots
        .into_iter()
        .map(|b| {
            let kind = kind.clone();
            let options = options(b.rank);
            thread::spawn(move || -> Arc<dyn Transport> {
                let tcp = TcpTransport::connect(b, &options).expect("TCP connects");
                over_selected_or_exit(&kind, tcp, space_pages)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("connecting thread"))
        .collect()
}

/// A rank's transport over `kind`, given its connected TCP endpoint: that
/// endpoint, or RDMA queue pairs set up over it (each rank registers
/// landing room for a space of `space_pages` pages; every rank on this
/// machine).
pub fn over_selected(
    kind: &Selected,
    tcp: Arc<TcpTransport>,
    space_pages: usize,
) -> Result<Arc<dyn Transport>, transport_rdma::RdmaError> {
    Ok(match kind {
        Selected::Tcp => tcp,
        Selected::Rdma(port) => {
            let hosts = vec!["localhost".to_string(); tcp.size()];
            transport_rdma::connect_job(tcp, port, hosts, space_pages)?
        }
    })
}

/// [`over_selected`], or the suite exits (status 2) naming why RDMA did
/// not connect (a device that is down, `DSM_RDMA_*` settings it refuses).
pub fn over_selected_or_exit(
    kind: &Selected,
    tcp: Arc<TcpTransport>,
    space_pages: usize,
) -> Arc<dyn Transport> {
    over_selected(kind, tcp, space_pages).unwrap_or_else(|e| {
        eprintln!("rank connecting over RDMA: {e}");
        std::process::exit(2);
    })
}

/// [`tcp_group`] as trait objects, as the DSM takes them.
pub fn transports(n: usize) -> Vec<Arc<dyn Transport>> {
    tcp_group(n)
        .into_iter()
        .map(|t| t as Arc<dyn Transport>)
        .collect()
}

/// The configuration of rank `rank`'s space of `pages` pages: the `DSM_*`
/// variables (e.g. `DSM_PREFETCH`, `DSM_ENGINE_CPU`) apply, else the
/// defaults (multi-reader protocol, engine pinned to `rank mod CPUs`, 500 µs
/// minimum hold).
pub fn config(rank: usize, pages: usize) -> Config {
    Config {
        base: base_of(rank),
        size: pages * PAGE_SIZE,
        ..Config::from_env().expect("DSM_* variables")
    }
    .validate()
    .expect("bench configuration")
}

/// The `Dsm` of `transport`'s rank, with a space of `pages` pages, in a job
/// of ranks all on this machine.
pub fn start_dsm(transport: Arc<dyn Transport>, pages: usize) -> Dsm {
    let hosts = vec!["localhost".to_string(); transport.size()];
    let config = config(transport.rank(), pages);
    let space = Dsm::prepare(&config).expect("mapping the space (userfaultfd)");
    Dsm::start(space, transport, hosts, config).expect("starting the DSM")
}

/// One `Dsm` per transport, each with a space of `pages` pages.
pub fn start_dsms(transports: Vec<Arc<dyn Transport>>, pages: usize) -> Vec<Dsm> {
    transports
        .into_iter()
        .map(|t| start_dsm(t, pages))
        .collect()
}

/// [`start_dsm`] under coherence protocol `protocol`, whatever
/// `DSM_PROTOCOL` says (the other `DSM_*` variables apply).
pub fn start_dsm_with(transport: Arc<dyn Transport>, pages: usize, protocol: Protocol) -> Dsm {
    let hosts = vec!["localhost".to_string(); transport.size()];
    let config = Config {
        protocol,
        ..config(transport.rank(), pages)
    }
    .validate()
    .expect("bench configuration");
    let space = Dsm::prepare(&config).expect("mapping the space (userfaultfd)");
    Dsm::start(space, transport, hosts, config).expect("starting the DSM")
}

/// [`start_dsms`] under coherence protocol `protocol`.
pub fn start_dsms_with(
    transports: Vec<Arc<dyn Transport>>,
    pages: usize,
    protocol: Protocol,
) -> Vec<Dsm> {
    transports
        .into_iter()
        .map(|t| start_dsm_with(t, pages, protocol))
        .collect()
}

/// Ends every rank together (finalize is a barrier).
pub fn finalize(dsms: Vec<Dsm>) {
    thread::scope(|s| {
        for d in dsms {
            s.spawn(move || d.finalize().expect("finalize"));
        }
    });
}

/// The first word of page `page` of `dsm`'s space.
pub fn page_word(dsm: &Dsm, page: usize) -> &AtomicU64 {
    &dsm.words()[page * WORDS_PER_PAGE]
}

/// Answers every message to `server` with `reply_len` bytes until a
/// message `stop` arrives.
pub fn echo(server: Arc<dyn Transport>, reply_len: usize) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let reply = vec![7u8; reply_len];
        while let Ok(m) = server.recv() {
            if m.payload == b"stop" {
                return;
            }
            server.send(m.from, &reply).expect("reply");
        }
    })
}

/// Benchmark `name`: `client` sends `request_len` bytes to rank `server`,
/// which answers with `reply_len` bytes (the raw transport, no DSM).
pub fn raw_round_trip(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    client: &Arc<dyn Transport>,
    server: &Arc<dyn Transport>,
    (request_len, reply_len): (usize, usize),
    out: &Samples,
) {
    let to = server.rank();
    let echo = echo(Arc::clone(server), reply_len);
    let request = vec![1u8; request_len];
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (d, reply) = out.time(|| {
                    client.send(to, &request).expect("request");
                    client.recv().expect("reply")
                });
                assert_eq!(reply.payload.len(), reply_len);
                total += d;
            }
            total
        })
    });
    client.send(to, b"stop").expect("stop");
    echo.join().expect("echo thread");
}

/// The processes of a job's other ranks that a bench started
/// ([`spawn_ranks`]): killed and reaped if the bench fails before they end.
pub struct RankProcesses(Vec<Child>);

impl RankProcesses {
    /// Waits for every process to end: their exit statuses.
    pub fn wait(mut self) -> Vec<ExitStatus> {
        std::mem::take(&mut self.0)
            .into_iter()
            .map(|mut child| child.wait().expect("waiting for a rank's process"))
            .collect()
    }
}

impl Drop for RankProcesses {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the bench binary again for each of `boots` (ranks of a loopback
/// job, [`Bootstrap::loopback_group`]), as dsmwrap starts a rank: the
/// rank's bootstrap handed over, `role` set in its environment (which the
/// bench's `main` looks at), and `env` too.
pub fn spawn_ranks(
    boots: Vec<Bootstrap>,
    role: (&str, &str),
    env: &[(&str, &str)],
) -> RankProcesses {
    let exe = std::env::current_exe().expect("the bench's own path");
    let mut started = RankProcesses(Vec::new());
    for boot in boots {
        let mut command = Command::new(&exe);
        command.env(role.0, role.1).envs(env.iter().copied());
        let inherited = boot.hand_over(&mut command).expect("handing a rank over");
        started
            .0
            .push(command.spawn().expect("starting a rank's process"));
        drop(inherited);
    }
    started
}

/// The `main` of a suite whose other ranks are the bench started again
/// ([`spawn_ranks`]): with `role` in the environment, this process is such
/// a rank, and runs `rank` on the role's value (`who` names it in an
/// error); otherwise it runs the criterion `benches`.
pub fn main_with_ranks(
    role: &str,
    who: &str,
    rank: impl FnOnce(&str) -> Result<(), Box<dyn std::error::Error>>,
    benches: fn(),
) -> ExitCode {
    let Some(value) = std::env::var_os(role) else {
        benches();
        criterion::Criterion::default()
            .configure_from_args()
            .final_summary();
        return ExitCode::SUCCESS;
    };
    match rank(&value.to_string_lossy()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{who}: {e}");
            ExitCode::FAILURE
        }
    }
}
