//! Run-time configuration of the shared space, read from `DSM_*`
//! environment variables (exported by dsmexec to every rank) or built in code.

use std::time::Duration;

/// Bytes of a page: the unit of coherence and of transfer.
pub const PAGE_SIZE: usize = 4096;
/// 8-byte words in a page: the unit of a release-consistent diff.
pub const PAGE_WORDS: usize = PAGE_SIZE / 8;
/// The seed's base address of the shared space.
pub const DEFAULT_BASE: usize = 0x4000_0000;
/// The seed's 100 pages.
pub const DEFAULT_PAGES: usize = 100;
/// Most pages one first touch maps by default ([`Config::populate`]):
/// 256 KiB, one system call.
pub const DEFAULT_POPULATE: usize = 64;

/// `DSM_PUSH`'s default: pushes of a page to a reader without a request of
/// its own before the home stops (at most 8 pages sent for nothing to a
/// reader that stopped; one that keeps consuming asks again, and its limit
/// doubles each time, up to 16 times this).
pub const DEFAULT_PUSH: u32 = 8;
/// Pages of dropped frames a memfd-backed space keeps for their next
/// install by default ([`Config::memfd_retain`], in bytes): 256 MiB per rank.
pub const DEFAULT_RETAINED_PAGES: usize = (256 << 20) / PAGE_SIZE;

/// Coherence protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Sequentially consistent multi-reader / single-writer with a directory
    /// at each page's home (the default).
    Mrsw,
    /// The seed's protocol: one owner per page, the page moves to whoever
    /// touches it (read or write); requests follow probable-owner hints.
    Migratory,
    /// Release consistency with multiple writers (twins and diffs, see
    /// [`crate::coherence::release`]): ranks write disjoint words of one
    /// page at once, and their writes reach the page's home at the next
    /// barrier or unlock.
    Release,
}

/// Which CPU the fault engine and the rank's other service threads (fault
/// reader, TCP receivers) run on (`DSM_ENGINE_CPU`).
pub type EngineCpu = crate::sched::CpuChoice;

pub use crate::sched::ServiceSched;

/// What the shared space's memory is made of (see [`crate::fault::Backing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpaceBacking {
    /// A memfd where the kernel supports it, else anonymous memory.
    Auto,
    /// Private anonymous memory (`DSM_BACKING=anon`).
    Anonymous,
    /// A memfd mapped twice; fails where the kernel cannot (`DSM_BACKING=memfd`).
    Memfd,
}

/// How the kernel reports a fault on the shared space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultDelivery {
    /// As userfaultfd events, read and served by the rank's fault thread
    /// while the faulting thread sleeps in the kernel.
    Events,
    /// As SIGBUS in the faulting thread, which serves its own fault
    /// (`UFFD_FEATURE_SIGBUS`): no thread hand-off.
    Sigbus,
}

impl FaultDelivery {
    /// SIGBUS where the handler can tell reads from writes (x86-64):
    /// measured against events in the same runs (`bench/README.md`), it
    /// saves the fault thread's wake-up where that dominates, a fault this
    /// rank serves itself (one rank, unpinned: ~100 -> 5.2 µs), and is even
    /// with it on remote faults (within the development VM's noise).
    pub const DEFAULT: FaultDelivery = if cfg!(target_arch = "x86_64") {
        FaultDelivery::Sigbus
    } else {
        FaultDelivery::Events
    };
}

/// The wait poll of `DSM_WAIT_SPIN_US=auto` where CPUs are not
/// oversubscribed: about a loopback round trip on the 2-vCPU VM measured.
pub const AUTO_WAIT_SPIN: Duration = Duration::from_micros(60);

/// A barrier's wait poll under `DSM_WAIT_SPIN_US=auto` where CPUs are not
/// oversubscribed: long enough to cover a bulk-synchronous step's
/// imbalance (Jacobi 2048² at 2 ranks: a sweep's compute varies by
/// 0.2-0.4 ms at p90), which a sleeping waiter ends with a wake-up of its
/// idle CPU (25-55 µs on the 2-vCPU VM). Past the first
/// [`crate::sched::HOT_WAIT_POLL`] the poll yields its CPU between looks.
/// Other waits keep [`AUTO_WAIT_SPIN`]: their answer is a round trip away,
/// and a longer poll there moved co-located faults between CPUs (the
/// criterion fault 12 -> 37 µs in 3 runs of 4, unbound).
pub const AUTO_BARRIER_SPIN: Duration = Duration::from_millis(1);

/// `DSM_WAIT_SPIN_US=auto` for a host running `local_ranks` of the job's
/// ranks: [`AUTO_WAIT_SPIN`] if the process may use at least as many
/// CPUs, else no polling.
pub fn auto_wait_spin(local_ranks: usize) -> Duration {
    if cpu_per_rank(local_ranks) {
        AUTO_WAIT_SPIN
    } else {
        Duration::ZERO
    }
}

/// A barrier's poll under `DSM_WAIT_SPIN_US=auto`: [`AUTO_BARRIER_SPIN`]
/// where [`auto_wait_spin`] polls at all.
pub fn auto_barrier_spin(local_ranks: usize) -> Duration {
    if cpu_per_rank(local_ranks) {
        AUTO_BARRIER_SPIN
    } else {
        Duration::ZERO
    }
}

/// Whether the process may use a CPU for each of the `local_ranks` ranks
/// of the job on this host.
fn cpu_per_rank(local_ranks: usize) -> bool {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    local_ranks <= cpus
}

/// The bound on the pages a rank holds from other homes (`DSM_CACHE_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheSize {
    /// [`AUTO_CACHE_SHARE`] of the node's memory, split among the job's
    /// ranks on this host.
    Auto,
    /// This many bytes.
    Bytes(usize),
    /// This percentage of the node's memory (for this rank alone).
    PercentOfNode(f64),
    /// No bound: a rank may hold every page it touches.
    Unlimited,
}

/// The share of a node's memory that the caches of the job's ranks on it
/// may fill by default: the rest is left to the pages they are home of and
/// to the application.
pub const AUTO_CACHE_SHARE: f64 = 0.25;

impl CacheSize {
    /// Bytes for a rank on a node of `node_memory` bytes running
    /// `local_ranks` of the job's ranks (`None`: no bound).
    pub fn resolve(self, node_memory: u64, local_ranks: usize) -> Option<usize> {
        let share = |fraction: f64| (node_memory as f64 * fraction) as usize;
        match self {
            CacheSize::Auto => Some(share(AUTO_CACHE_SHARE) / local_ranks.max(1)),
            CacheSize::Bytes(bytes) => Some(bytes),
            CacheSize::PercentOfNode(percent) => Some(share(percent / 100.0)),
            CacheSize::Unlimited => None,
        }
    }

    fn parse(text: &str) -> Option<CacheSize> {
        let text = text.trim();
        match text.to_ascii_lowercase().as_str() {
            "auto" => return Some(CacheSize::Auto),
            "unlimited" | "none" | "off" => return Some(CacheSize::Unlimited),
            _ => {}
        }
        if let Some(percent) = text.strip_suffix('%') {
            let percent: f64 = percent.trim().parse().ok()?;
            return (percent > 0.0 && percent <= 100.0)
                .then_some(CacheSize::PercentOfNode(percent));
        }
        parse_size(text).filter(|b| *b > 0).map(CacheSize::Bytes)
    }
}

/// Settings of one rank's shared space; [`Config::from_env`] lists the
/// environment variables that set them.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address of the shared space, the same on every rank.
    pub base: usize,
    /// Size in bytes (rounded up to whole pages).
    pub size: usize,
    /// Coherence protocol (`DSM_PROTOCOL`).
    pub protocol: Protocol,
    /// CPU of the engine and the other service threads (`DSM_ENGINE_CPU`).
    pub engine_cpu: EngineCpu,
    /// How the service threads ask to be scheduled (`DSM_SERVICE_SCHED`).
    pub service_sched: ServiceSched,
    /// `DSM_BIND=core`: the thread that starts the DSM (and the threads it
    /// creates afterwards) runs on the rank's service CPU only, as
    /// `mpirun --bind-to core` binds a rank: the rank's memory is then used
    /// on one CPU, so changing its pages' protection interrupts no other.
    pub bind_to_core: bool,
    /// A page that arrived for a local fault stays at least this long before
    /// it is handed on, so the faulting thread always gets to use it (the
    /// Mirage time window); without it, pages can ping-pong forever.
    pub min_hold: Duration,
    /// What to print of the statistics at finalize (`DSM_STATS`).
    pub stats: StatsOutput,
    /// With [`StatsOutput::Json`]: the file to write instead of stderr,
    /// `%r` replaced by the rank (`DSM_STATS_FILE`).
    pub stats_file: Option<String>,
    /// Most pages requested ahead of a sequential read stream (0: off).
    pub prefetch: usize,
    /// Most pages a first touch of a never-touched page homed here (or
    /// private) maps at once, with the pages after it that are untouched
    /// too, all zeros and writable (`DSM_POPULATE`; 0: off, a first touch
    /// asks the home, itself, as any fault does).
    pub populate: usize,
    /// Pushes of a page to a reader at barriers without a request of its
    /// own before they stop (`DSM_PUSH`; 0: off), doubled for a reader
    /// that asks again after they stopped, up to 16 times: a home pushes a
    /// page, at its barrier entry, to a reader that asked for it again
    /// after losing it to a write (multi-reader protocol).
    pub push: u32,
    /// What the space's memory is made of (`DSM_BACKING`).
    pub backing: SpaceBacking,
    /// How long the fault and engine threads poll for work before they
    /// sleep (0: sleep at once, right for machines with more threads than
    /// CPUs; a few tens of µs trade CPU time for a wake-up per event).
    pub spin: Duration,
    /// How long a thread waiting on the DSM (for the page it faulted on,
    /// with SIGBUS delivery; for a lock, a barrier or another API call's
    /// answer) polls before it sleeps (0: sleep at once), yielding its CPU
    /// between looks after the first [`crate::sched::HOT_WAIT_POLL`]. Its
    /// CPU has nothing else of this thread's to do meanwhile, unless ranks
    /// outnumber CPUs: then polling ranks take the CPU the ones they wait
    /// for need (a barrier at 4 ranks on 2 CPUs: 69 -> 171 µs). `None`
    /// (auto): [`AUTO_WAIT_SPIN`] ([`AUTO_BARRIER_SPIN`] for a barrier;
    /// for a faulting thread twice its rank's recent waits for a page, at
    /// least [`AUTO_WAIT_SPIN`]: `sigbus::PagePoll::Adaptive`) when this
    /// host runs no more of the job's ranks than the process may use CPUs,
    /// else 0.
    pub wait_spin: Option<Duration>,
    /// How faults reach the engine (`DSM_FAULTS`).
    pub faults: FaultDelivery,
    /// Messages are handled in the transport's receive thread when the
    /// engine is free (no hand-off to the engine thread); false queues
    /// every message for the engine thread.
    pub receive_inline: bool,
    /// With a memfd and a transport that supports it: runs of pages are
    /// received straight into their frames (no copy from a receive
    /// buffer); false receives them into buffers.
    pub receive_in_frames: bool,
    /// With a memfd, between ranks that share memory: a read fault on a
    /// page its co-located home publishes copies it from the home's frame,
    /// with no message (`crate::board`); false always asks the home.
    pub direct_reads: bool,
    /// With a memfd: bytes of dropped pages whose frames are kept for their
    /// next install (beyond that, all are released).
    pub memfd_retain: usize,
    /// The bound on the pages this rank holds from other homes; past it,
    /// pages are evicted (multi-reader protocol).
    pub cache: CacheSize,
    /// A rank whose thread has waited this long on a page, lock or barrier
    /// prints a hang report by itself (`None`: only on SIGUSR1).
    pub hang_report: Option<Duration>,
}

/// What a rank prints of its statistics at finalize (`DSM_STATS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsOutput {
    /// Nothing.
    Off,
    /// One line for people.
    Text,
    /// One JSON document ([`crate::StatsSnapshot::to_json`]).
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            base: DEFAULT_BASE,
            size: DEFAULT_PAGES * PAGE_SIZE,
            protocol: Protocol::Mrsw,
            engine_cpu: EngineCpu::Auto,
            service_sched: ServiceSched::Auto,
            bind_to_core: false,
            min_hold: Duration::from_micros(500),
            stats: StatsOutput::Off,
            stats_file: None,
            prefetch: 1024,
            populate: DEFAULT_POPULATE,
            push: DEFAULT_PUSH,
            backing: SpaceBacking::Auto,
            spin: Duration::ZERO,
            wait_spin: None,
            faults: FaultDelivery::DEFAULT,
            receive_inline: true,
            receive_in_frames: true,
            direct_reads: true,
            memfd_retain: DEFAULT_RETAINED_PAGES * PAGE_SIZE,
            cache: CacheSize::Auto,
            hang_report: Some(crate::hang::DEFAULT_HANG_REPORT),
        }
    }
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{name}={value:?}: {why}")]
pub struct ConfigError {
    /// The environment variable concerned (`DSM_BASE`, ...).
    pub name: &'static str,
    /// Its value, as given (or as configured, from [`Config::validate`]).
    pub value: String,
    /// What is wrong, or what was expected.
    pub why: String,
}

fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, unit) = match text
        .char_indices()
        .find(|(_, c)| !c.is_ascii_digit() && *c != 'x')
    {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let number: usize = digits.parse().ok()?;
    let factor: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        "p" | "pages" => PAGE_SIZE,
        _ => return None,
    };
    number.checked_mul(factor)
}

fn parse_address(text: &str) -> Option<usize> {
    let text = text.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => usize::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

impl Config {
    /// Defaults overridden by the environment:
    ///
    /// | variable | meaning | default |
    /// | --- | --- | --- |
    /// | `DSM_BASE` | base address (hex `0x...` or decimal) | `0x40000000` |
    /// | `DSM_SPACE_SIZE` | size: bytes, or with a unit `K M G T`, or `Np` pages | `100p` (the seed's 100 pages) |
    /// | `DSM_PROTOCOL` | `mrsw` (multi-reader, sequentially consistent), `release` (release consistency, multiple writers per page) or `migratory` (the seed's) | `mrsw` |
    /// | `DSM_ENGINE_CPU` | CPU of the engine and the other service threads: `auto` (rank mod CPUs), `none`, or a CPU number | `auto` |
    /// | `DSM_BIND` | `core`: the thread that starts the DSM, and those it creates later, run on the rank's service CPU (`DSM_ENGINE_CPU`) only; `none` | `none` |
    /// | `DSM_SERVICE_SCHED` | `auto` (service threads `SCHED_FIFO` 1 where permitted, else a short fair slice) or `fair` (never real-time) | `auto` |
    /// | `DSM_MIN_HOLD_US` | minimum time a fetched page stays before moving on (a barrier entry or an unlock ends the wait) | `500` |
    /// | `DSM_PREFETCH` | most pages read ahead of a sequential read stream (0: off) | `1024` |
    /// | `DSM_POPULATE` | most pages a first touch maps at once: a fault on a never-touched page homed at this rank (or private) also maps the untouched pages after it in its segment, zeros, writable, in one system call (0: off, one fault per page) | `64` |
    /// | `DSM_PUSH` | at a barrier entry, a home pushes the pages it wrote to the readers that asked for them again after losing them to a write, up to this many times without a new request, then twice as many for a reader that asks again, up to 16 times this (0: off) | `8` |
    /// | `DSM_BACKING` | `anon` (private memory, pages installed by copy), `memfd` (a memfd mapped twice, pages mapped in place), or `auto` (memfd where the kernel can) | `auto` |
    /// | `DSM_CACHE_SIZE` | most bytes of pages homed elsewhere a rank holds (evicted beyond): a size (`512M`, `2G`), a percentage of the node's memory (`10%`), `auto` (a quarter of the node's memory split among the job's ranks on the host) or `unlimited` | `auto` |
    /// | `DSM_MEMFD_RETAIN` | with a memfd: size of the dropped pages whose frames are kept for their next fetch (beyond it, all are released; at most `DSM_CACHE_SIZE`) | `256M` |
    /// | `DSM_SPIN_US` | how long the fault and engine threads poll for work before sleeping | `0` |
    /// | `DSM_WAIT_SPIN_US` | how long a thread waiting on the DSM (its faulted page with SIGBUS delivery, a lock, a barrier) polls before it sleeps: microseconds (past the first 60 the poll yields its CPU between looks), or `auto` (where the host runs no more ranks than CPUs: a faulting thread twice its recent waits for a page, 60 to 2000; a barrier 1000; other calls 60; else 0) | `auto` |
    /// | `DSM_FAULTS` | `thread` (a fault thread reads userfaultfd events) or `sigbus` (the faulting thread serves its own fault in a SIGBUS handler; x86-64) | `sigbus` on x86-64, else `thread` |
    /// | `DSM_RECEIVE` | `inline` (a message is handled in the receive thread when the engine is free) or `queue` (always by the engine thread) | `inline` |
    /// | `DSM_RECEIVE_PAGES` | `frames` (with a memfd, runs of pages are received straight into their frames) or `buffer` (into a buffer, then copied) | `frames` |
    /// | `DSM_DIRECT_READS` | `on` (with a memfd, a read fault on a page homed at a co-located rank that holds it read-only copies it from that rank's memory, with no message) or `off` (always ask the home) | `on` |
    /// | `DSM_HANG_REPORT_S` | seconds a thread may wait on a page, lock or barrier before the rank prints a hang report (what each thread waits for, and since when); `0` or `off`: only on SIGUSR1 | `300` |
    /// | `DSM_STATS` | `1` prints per-rank statistics at finalize; `json` writes them as one JSON document (to stderr, a line starting `dsm-stats-json: `, or to `DSM_STATS_FILE`) | off |
    /// | `DSM_STATS_FILE` | with `DSM_STATS=json`: the file to write, `%r` replaced by the rank (`stats-%r.json`) | stderr |
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::default().with_env()
    }

    /// This configuration with the environment's overrides applied.
    pub fn with_env(mut self) -> Result<Config, ConfigError> {
        let get = |name: &'static str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let err = |name: &'static str, value: &str, why: &str| ConfigError {
            name,
            value: value.to_string(),
            why: why.to_string(),
        };
        if let Some(v) = get("DSM_BASE") {
            self.base = parse_address(&v)
                .ok_or_else(|| err("DSM_BASE", &v, "expected an address like 0x40000000"))?;
        }
        if let Some(v) = get("DSM_SPACE_SIZE") {
            self.size = parse_size(&v).ok_or_else(|| {
                err(
                    "DSM_SPACE_SIZE",
                    &v,
                    "expected a size like 4096, 256M, 2G or 100p",
                )
            })?;
        }
        if let Some(v) = get("DSM_PROTOCOL") {
            self.protocol = match v.trim().to_ascii_lowercase().as_str() {
                "mrsw" | "sc" => Protocol::Mrsw,
                "migratory" | "seed" => Protocol::Migratory,
                "release" | "rc" => Protocol::Release,
                _ => {
                    return Err(err(
                        "DSM_PROTOCOL",
                        &v,
                        "expected mrsw (the default), release or migratory",
                    ))
                }
            };
        }
        if let Some(v) = get("DSM_ENGINE_CPU") {
            self.engine_cpu = EngineCpu::parse(&v)
                .ok_or_else(|| err("DSM_ENGINE_CPU", &v, "expected auto, none or a CPU number"))?;
        }
        if let Some(v) = get("DSM_BIND") {
            self.bind_to_core = match v.trim() {
                "core" => true,
                "none" | "" => false,
                _ => return Err(err("DSM_BIND", &v, "expected core or none")),
            };
        }
        if let Some(v) = get(ServiceSched::ENV) {
            self.service_sched = ServiceSched::parse(&v).ok_or_else(|| {
                err(
                    ServiceSched::ENV,
                    &v,
                    "expected auto (real-time where permitted) or fair",
                )
            })?;
        }
        if let Some(v) = get("DSM_MIN_HOLD_US") {
            let us: u64 = v
                .trim()
                .parse()
                .map_err(|_| err("DSM_MIN_HOLD_US", &v, "expected microseconds"))?;
            self.min_hold = Duration::from_micros(us);
        }
        if let Some(v) = get("DSM_PREFETCH") {
            self.prefetch = v.trim().parse().map_err(|_| {
                err(
                    "DSM_PREFETCH",
                    &v,
                    "expected a number of pages (0 turns prefetch off)",
                )
            })?;
        }
        if let Some(v) = get("DSM_POPULATE") {
            self.populate = v.trim().parse().map_err(|_| {
                err(
                    "DSM_POPULATE",
                    &v,
                    "expected a number of pages (0 turns it off)",
                )
            })?;
        }
        if let Some(v) = get("DSM_PUSH") {
            self.push = v.trim().parse().map_err(|_| {
                err(
                    "DSM_PUSH",
                    &v,
                    "expected a number of pushes (0 turns pushing off)",
                )
            })?;
        }
        if let Some(v) = get("DSM_BACKING") {
            self.backing = match v.trim().to_ascii_lowercase().as_str() {
                "auto" => SpaceBacking::Auto,
                "anon" | "anonymous" => SpaceBacking::Anonymous,
                "memfd" => SpaceBacking::Memfd,
                _ => return Err(err("DSM_BACKING", &v, "expected anon, memfd or auto")),
            };
        }
        if let Some(v) = get("DSM_MEMFD_RETAIN") {
            self.memfd_retain = parse_size(&v)
                .ok_or_else(|| err("DSM_MEMFD_RETAIN", &v, "expected a size like 0, 64M or 1G"))?;
        }
        if let Some(v) = get("DSM_CACHE_SIZE") {
            self.cache = CacheSize::parse(&v).ok_or_else(|| {
                err(
                    "DSM_CACHE_SIZE",
                    &v,
                    "expected a size like 512M or 2G, a percentage of the node's memory like 10%, auto or unlimited",
                )
            })?;
        }
        if let Some(v) = get(crate::hang::ENV_HANG_REPORT) {
            self.hang_report = crate::hang::parse_threshold(&v)
                .map_err(|why| err(crate::hang::ENV_HANG_REPORT, &v, &why))?;
        }
        if let Some(v) = get("DSM_SPIN_US") {
            let us: u64 = v
                .trim()
                .parse()
                .map_err(|_| err("DSM_SPIN_US", &v, "expected microseconds (0: no polling)"))?;
            self.spin = Duration::from_micros(us);
        }
        if let Some(v) = get("DSM_WAIT_SPIN_US") {
            self.wait_spin = match v.trim() {
                "auto" => None,
                us => Some(Duration::from_micros(us.parse().map_err(|_| {
                    err(
                        "DSM_WAIT_SPIN_US",
                        &v,
                        "expected microseconds (0: sleep at once) or auto",
                    )
                })?)),
            };
        }
        if let Some(v) = get("DSM_FAULTS") {
            self.faults = match v.trim().to_ascii_lowercase().as_str() {
                "thread" | "events" => FaultDelivery::Events,
                "sigbus" | "signal" => FaultDelivery::Sigbus,
                _ => return Err(err("DSM_FAULTS", &v, "expected thread or sigbus")),
            };
        }
        if let Some(v) = get("DSM_RECEIVE") {
            self.receive_inline = match v.trim().to_ascii_lowercase().as_str() {
                "inline" => true,
                "queue" => false,
                _ => return Err(err("DSM_RECEIVE", &v, "expected inline or queue")),
            };
        }
        if let Some(v) = get("DSM_RECEIVE_PAGES") {
            self.receive_in_frames = match v.trim().to_ascii_lowercase().as_str() {
                "frames" => true,
                "buffer" => false,
                _ => return Err(err("DSM_RECEIVE_PAGES", &v, "expected frames or buffer")),
            };
        }
        if let Some(v) = get("DSM_DIRECT_READS") {
            self.direct_reads = match v.trim().to_ascii_lowercase().as_str() {
                "1" | "on" | "yes" | "true" => true,
                "0" | "off" | "no" | "false" => false,
                _ => return Err(err("DSM_DIRECT_READS", &v, "expected on or off")),
            };
        }
        if let Some(v) = get("DSM_STATS") {
            self.stats = match v.trim().to_ascii_lowercase().as_str() {
                "0" | "no" | "false" | "off" => StatsOutput::Off,
                "json" => StatsOutput::Json,
                "yes" | "true" | "on" | "text" => StatsOutput::Text,
                // Any other number meant "on" before json existed.
                n if n.parse::<u64>().is_ok() => StatsOutput::Text,
                _ => return Err(err("DSM_STATS", &v, "expected 1 (text), json or 0")),
            };
        }
        if let Some(v) = get("DSM_STATS_FILE") {
            self.stats_file = Some(v);
        }
        self.validate()
    }

    /// Checks alignment and rounds the size up to whole pages.
    pub fn validate(mut self) -> Result<Config, ConfigError> {
        if !self.base.is_multiple_of(PAGE_SIZE) || self.base == 0 {
            return Err(ConfigError {
                name: "DSM_BASE",
                value: format!("{:#x}", self.base),
                why: format!("must be a non-zero multiple of the page size ({PAGE_SIZE})"),
            });
        }
        if self.size == 0 {
            return Err(ConfigError {
                name: "DSM_SPACE_SIZE",
                value: "0".into(),
                why: "the shared space needs at least one page".into(),
            });
        }
        self.size = self.size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        Ok(self)
    }

    /// Pages of the space (`size` in pages, rounded down: whole once
    /// validated).
    pub fn pages(&self) -> usize {
        self.size / PAGE_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_addresses() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("256M"), Some(256 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("100p"), Some(100 * PAGE_SIZE));
        assert_eq!(parse_size("12 KiB"), Some(12 << 10));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_address("0x40000000"), Some(0x4000_0000));
        assert_eq!(parse_address("4096"), Some(4096));
    }

    #[test]
    fn cache_sizes() {
        assert_eq!(CacheSize::parse("512M"), Some(CacheSize::Bytes(512 << 20)));
        assert_eq!(
            CacheSize::parse("16p"),
            Some(CacheSize::Bytes(16 * PAGE_SIZE))
        );
        assert_eq!(
            CacheSize::parse("10%"),
            Some(CacheSize::PercentOfNode(10.0))
        );
        assert_eq!(CacheSize::parse("unlimited"), Some(CacheSize::Unlimited));
        assert_eq!(CacheSize::parse("auto"), Some(CacheSize::Auto));
        for bad in ["0", "150%", "0%", "lots"] {
            assert_eq!(CacheSize::parse(bad), None, "{bad}");
        }
        let gib = 1u64 << 30;
        assert_eq!(CacheSize::Auto.resolve(16 * gib, 4), Some(1 << 30));
        assert_eq!(
            CacheSize::PercentOfNode(50.0).resolve(16 * gib, 4),
            Some(8 << 30)
        );
        assert_eq!(CacheSize::Unlimited.resolve(16 * gib, 4), None);
    }

    #[test]
    fn waits_poll_only_where_cpus_are_not_oversubscribed() {
        assert_eq!(auto_wait_spin(1), AUTO_WAIT_SPIN, "one rank has a CPU");
        assert_eq!(auto_wait_spin(usize::MAX), Duration::ZERO);
        assert_eq!(auto_barrier_spin(1), AUTO_BARRIER_SPIN);
        assert_eq!(auto_barrier_spin(usize::MAX), Duration::ZERO);
    }

    #[test]
    fn validation_rounds_and_rejects() {
        let c = Config {
            size: 5000,
            ..Config::default()
        }
        .validate()
        .unwrap();
        assert_eq!(c.size, 2 * PAGE_SIZE);
        assert!(Config {
            base: 0x1001,
            ..Config::default()
        }
        .validate()
        .is_err());
        assert!(Config {
            size: 0,
            ..Config::default()
        }
        .validate()
        .is_err());
    }
}
