//! The shared space as a program sees it: [`Dsm`].

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicU8};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::coherence::{Migratory, Mrsw};
use crate::config::{Config, FaultDelivery, Protocol, SpaceBacking, StatsOutput, PAGE_SIZE};
use crate::engine::{self, Engine, Input, Node, Reply};
pub use crate::error::DsmError;
use crate::fault::{Backing, FaultError, FaultHandler, Region};
use crate::hang::{self, Reporter, ThreadReport, WaitFor, Waiting};
use crate::proto::SegmentInfo;
use crate::sched;
use crate::segment::{Consistency, Placement, Segment};
use crate::sigbus::PagePoll;
use crate::stats::{Stats, StatsSnapshot};
use crate::{Rank, Transport, TransportError};

/// Exit status of a rank whose DSM cannot go on (a peer died, the kernel
/// refused an operation): its threads may be parked in page faults that
/// can never be served, so the process ends rather than hang.
pub const EXIT_FATAL: i32 = 70;
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a rank that lost a peer waits before exiting (see its use).
const SECONDARY_FAILURE_DELAY: Duration = Duration::from_millis(500);
/// How long, beyond that delay, a call the engine can no longer serve waits
/// for the failing engine to end the process before it returns its error.
const ENGINE_EXIT_WAIT: Duration = Duration::from_secs(2);

/// Checks the configuration against this machine before mapping anything.
/// Under the multi-reader protocol the space may be far larger than a node
/// (each rank's cache of other homes' pages is bounded, `DSM_CACHE_SIZE`):
/// what must fit is checked once the job is known (`Dsm::start`) and at
/// each allocation. The migratory protocol evicts nothing: the whole space
/// must fit.
pub fn check_size(config: &Config) -> Result<(), DsmError> {
    if config.protocol != Protocol::Migratory {
        return Ok(());
    }
    if let Some((ram, swap)) = crate::memory::node_total() {
        if config.size as u64 > ram.saturating_add(swap) {
            return Err(DsmError::TooLarge {
                size: config.size,
                ram,
                swap,
            });
        }
    }
    Ok(())
}

/// A rank's view of the job's shared space.
///
/// The space is mapped at the same address on every rank; plain loads and
/// stores through [`Dsm::base`] (or the safe atomic views) reach the same
/// memory everywhere. Pages move between ranks on page faults.
pub struct Dsm {
    rank: Rank,
    size: usize,
    hosts: Vec<String>,
    config: Config,
    inputs: Sender<Input>,
    /// The engine's state, for API calls served in the calling thread.
    state: Arc<Mutex<Engine>>,
    engine: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
    /// With SIGBUS delivery: the space's entry in the SIGBUS handler's table.
    signal_faults: Option<crate::sigbus::Registration>,
    stop_reader: Option<OwnedFd>,
    /// What this rank's threads wait for (hang reports).
    waiting: Arc<Waiting>,
    /// The hang reporter and the sender whose drop stops it.
    reporter: Option<(Sender<()>, JoinHandle<()>)>,
    transport: Arc<dyn Transport>,
    stats: Arc<Stats>,
    barrier_lock: Mutex<()>,
    /// `Config::wait_spin` resolved for this host (`auto`).
    wait_spin: Duration,
    /// The same for a barrier's wait (`config::auto_barrier_spin`).
    barrier_spin: Duration,
    /// `Config::cache` resolved for this host, in bytes (`None`: no bound).
    cache_bytes: Mutex<Option<usize>>,
    faults: Option<Arc<FaultHandler>>,
    region: Option<Region>,
}

impl Dsm {
    /// Maps the shared space and registers it for faults: done before
    /// connecting to the other ranks, so a bad configuration fails fast.
    pub fn prepare(config: &Config) -> Result<(Region, FaultHandler), DsmError> {
        check_size(config)?;
        let mut backing = match config.backing {
            SpaceBacking::Anonymous => Backing::Anonymous,
            SpaceBacking::Memfd => {
                crate::fault::memfd_supported()?;
                Backing::Memfd
            }
            SpaceBacking::Auto => match crate::fault::memfd_supported() {
                Ok(()) => Backing::Memfd,
                Err(e) => {
                    tracing::debug!("shared space in anonymous memory: {e}");
                    Backing::Anonymous
                }
            },
        };
        let region = match Region::map(config.base, config.size, backing) {
            // A memfd needs a second view as large as the space: a space of
            // half the address space (64 TiB on x86-64) leaves no room for
            // it. `auto` then takes anonymous memory.
            Err(FaultError::MapFailed { .. })
                if backing == Backing::Memfd && config.backing == SpaceBacking::Auto =>
            {
                tracing::debug!(
                    "no room for a memfd's second view of {} bytes: anonymous memory instead",
                    config.size
                );
                backing = Backing::Anonymous;
                Region::map(config.base, config.size, backing)?
            }
            mapped => mapped?,
        };
        tracing::debug!(
            "shared space {:#x}-{:#x} in {}",
            region.base(),
            region.base() + region.len(),
            match backing {
                Backing::Anonymous => "anonymous memory (pages installed with UFFDIO_COPY)",
                Backing::Memfd =>
                    "a memfd (pages with a frame written through an alias and mapped with UFFDIO_CONTINUE, others filled by UFFDIO_COPY)",
            }
        );
        let faults = FaultHandler::register(&region, config.faults)?
            .retaining(config.memfd_retain / PAGE_SIZE);
        tracing::debug!(
            "faults {}",
            match config.faults {
                FaultDelivery::Events => "read as userfaultfd events by the fault thread",
                FaultDelivery::Sigbus => "served by the faulting thread (SIGBUS)",
            }
        );
        Ok((region, faults))
    }

    /// Starts the fault engine over a connected transport.
    pub fn start(
        (region, faults): (Region, FaultHandler),
        transport: Arc<dyn Transport>,
        hosts: Vec<String>,
        config: Config,
    ) -> Result<Dsm, DsmError> {
        let (rank, size) = (transport.rank(), transport.size());
        let here = hosts.get(rank).map(String::as_str).unwrap_or_default();
        let local_ranks = hosts.iter().filter(|h| h.as_str() == here).count();
        let wait_spin = config
            .wait_spin
            .unwrap_or_else(|| crate::config::auto_wait_spin(local_ranks.max(1)));
        let barrier_spin = config
            .wait_spin
            .unwrap_or_else(|| crate::config::auto_barrier_spin(local_ranks.max(1)));
        let cache_bytes = match config.protocol {
            Protocol::Mrsw | Protocol::Release => {
                let ram = crate::memory::node_total().map_or(u64::MAX, |(ram, _)| ram);
                config.cache.resolve(ram, local_ranks)
            }
            // Nothing is evicted under the seed's protocol.
            Protocol::Migratory => None,
        };
        if let (Some(cache), Some((ram, swap))) = (cache_bytes, crate::memory::node_total()) {
            let need = cache as u64 * local_ranks.max(1) as u64;
            if need > ram.saturating_add(swap) {
                return Err(DsmError::NoRoom {
                    rank,
                    host: here.to_string(),
                    what: format!(
                        "the caches of the job's {} rank(s) there (DSM_CACHE_SIZE: {cache} bytes each)",
                        local_ranks.max(1)
                    ),
                    need,
                    memory: ram.saturating_add(swap),
                    fix: "lower DSM_CACHE_SIZE (a size such as 512M, or a percentage of the node's memory such as 10%), or run fewer ranks per host",
                });
            }
        }
        // Frames kept for dropped pages count in the rank's memory too: no
        // more of them than the cache may hold.
        let faults = match cache_bytes {
            Some(cache) if cache < config.memfd_retain => faults.retaining(cache / PAGE_SIZE),
            _ => faults,
        };
        let faults = Arc::new(faults);
        let stats = Arc::new(Stats::new(size));
        let node = match config.protocol {
            Protocol::Migratory => {
                Node::Migratory(Migratory::new(rank, size, region.pages(), config.min_hold))
            }
            // Under release consistency, segments allocated sequentially
            // consistent run the multi-reader protocol.
            Protocol::Mrsw | Protocol::Release => Node::Mrsw(Mrsw::new(
                rank,
                size,
                region.pages(),
                config.min_hold.as_nanos() as u64,
            )),
        };
        let cpu = config.engine_cpu.for_rank(rank);
        if config.bind_to_core {
            match cpu {
                Some(cpu) if crate::sched::pin_current_thread(cpu) => {
                    tracing::info!("rank {rank}: bound to CPU {cpu} (DSM_BIND=core)")
                }
                _ => tracing::warn!(
                    "rank {rank}: DSM_BIND=core, but no CPU to bind to (DSM_ENGINE_CPU gives {cpu:?}); running unbound"
                ),
            }
        }
        let service_sched = config.service_sched;
        let (inputs_tx, inputs_rx) = crossbeam_channel::unbounded();
        let host = hosts.get(rank).cloned().unwrap_or_default();
        let engine = Arc::new(Mutex::new(
            Engine::new(
                rank,
                size,
                region.base(),
                region.pages(),
                Arc::clone(&transport),
                Arc::clone(&faults),
                node,
                config.protocol == Protocol::Release,
                Arc::clone(&stats),
            )
            .with_prefetch(config.prefetch)
            .with_populate(config.populate)
            .with_push(config.push)
            .with_cache_limit(cache_bytes.map_or(usize::MAX, |bytes| bytes / PAGE_SIZE)),
        ));
        if let (true, Some(space)) = (config.direct_reads, region.memfd()) {
            engine::lock(&engine).share_frames(space)?;
        }
        if config.receive_inline {
            transport.deliver_inline(engine::inline_delivery(
                Arc::downgrade(&engine),
                transport.inbox(),
                inputs_tx.clone(),
            ));
        }
        if config.receive_in_frames && region.alias().is_some() {
            transport.place_payloads(engine::payload_placement(
                Arc::downgrade(&engine),
                inputs_tx.clone(),
            ));
        }
        let spin = config.spin;
        let waiting = Arc::new(Waiting::default());
        let state = Arc::clone(&engine);
        let (engine_state, faults_served, failures) =
            (Arc::clone(&engine), Arc::clone(&faults), inputs_tx.clone());
        let (reader, stop_reader, signal_faults) = match config.faults {
            FaultDelivery::Events => {
                let (stop_read, stop_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                    .map_err(|e| DsmError::FaultReader(format!("pipe: {e}")))?;
                let reader = thread::Builder::new()
                    .name("dsm-faults".into())
                    .spawn(move || {
                        sched::enter_service_thread(cpu, service_sched);
                        engine::read_faults(engine_state, faults_served, stop_read, failures, spin)
                    })
                    .map_err(|e| DsmError::FaultReader(format!("spawn: {e}")))?;
                (Some(reader), Some(stop_write), None)
            }
            FaultDelivery::Sigbus => {
                // `auto`: as long as pages have recently taken to come.
                let page_poll = match config.wait_spin {
                    None if !wait_spin.is_zero() => PagePoll::Adaptive { floor: wait_spin },
                    _ => PagePoll::Fixed(wait_spin),
                };
                let server = engine::signal_fault_server(
                    engine_state,
                    Arc::clone(&transport),
                    faults_served,
                    failures,
                    page_poll,
                    Arc::clone(&waiting),
                );
                let registration = crate::sigbus::register(region.base(), region.len(), server)
                    .map_err(FaultError::from)?;
                (None, None, Some(registration))
            }
        };
        if size > 1 {
            hang::joined_job(rank, &host);
        }
        let reporter = spawn_hang_reporter(
            rank,
            &host,
            config.hang_report,
            &waiting,
            Arc::downgrade(&engine),
        );
        let engine = {
            thread::Builder::new()
                .name("dsm-engine".into())
                .spawn(move || {
                    sched::enter_service_thread(cpu, service_sched);
                    if let Err(e) = Engine::run(&engine, inputs_rx, spin) {
                        // Application threads may be parked in faults this
                        // engine can no longer serve: end the process.
                        hang::process_ending();
                        eprintln!("dsm: rank {rank} on {host}: {e}; aborting");
                        if matches!(e, DsmError::Transport(TransportError::PeerLost { .. })) {
                            // The lost peer's own end (a crash, a kill) is the
                            // cause: let the launcher hear of it before this
                            // consequence, so it names the right rank.
                            thread::sleep(SECONDARY_FAILURE_DELAY);
                        }
                        std::process::exit(EXIT_FATAL);
                    }
                })
                .map_err(|e| DsmError::FaultReader(format!("spawn: {e}")))?
        };
        Ok(Dsm {
            rank,
            size,
            hosts,
            config,
            inputs: inputs_tx,
            state,
            engine: Some(engine),
            reader,
            signal_faults,
            stop_reader,
            waiting,
            reporter,
            transport,
            stats,
            barrier_lock: Mutex::new(()),
            wait_spin,
            barrier_spin,
            cache_bytes: Mutex::new(cache_bytes),
            faults: Some(faults),
            region: Some(region),
        })
    }

    /// This process's rank, `0..size()`.
    pub fn rank(&self) -> Rank {
        self.rank
    }

    /// Number of ranks in the job.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The host `rank` runs on, as the launcher named it (`"?"` for a rank
    /// outside the job).
    pub fn host(&self, rank: Rank) -> &str {
        self.hosts.get(rank).map(String::as_str).unwrap_or("?")
    }

    /// The configuration this rank runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn region(&self) -> &Region {
        self.region
            .as_ref()
            .expect("the region lives as long as the Dsm")
    }

    /// Start of the shared space (the same on every rank).
    pub fn base(&self) -> *mut u8 {
        self.region().base() as *mut u8
    }

    /// Size of the shared space in bytes.
    pub fn len(&self) -> usize {
        self.region().len()
    }

    /// Whether the space has no bytes (never, once started).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per page: the unit of coherence and of transfer.
    pub fn page_size(&self) -> usize {
        PAGE_SIZE
    }

    /// The whole shared space as 64-bit atomics: safe shared access from any
    /// thread of any rank.
    pub fn words(&self) -> &[AtomicU64] {
        self.region().words()
    }

    /// The whole shared space as bytes (atomics, for safe shared access).
    pub fn bytes(&self) -> &[AtomicU8] {
        self.region().bytes()
    }

    /// Waits until every rank reached its barrier; the engine keeps serving
    /// other ranks meanwhile. One barrier at a time per process.
    pub fn barrier(&self) -> Result<(), DsmError> {
        let _one_at_a_time = self.barrier_lock.lock().unwrap_or_else(|p| p.into_inner());
        let _waiting = self.waiting.guard(WaitFor::Barrier);
        self.ask_polling(self.barrier_spin, Input::Barrier)
    }

    /// Serves an API call here and waits for its answer, polling for it
    /// up to `wait_spin` first: an answer within the poll costs the thread
    /// that sends it no futex wake, and this one no wake-up. Meanwhile it
    /// reads the rings itself ([`Transport::poll_answers`], started before
    /// the request leaves, as a faulting thread does): the message that
    /// brings the answer wakes no receive thread either.
    fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Input) -> Result<T, DsmError> {
        self.ask_polling(self.wait_spin, make)
    }

    /// [`Dsm::ask`], polling for up to `spin`.
    fn ask_polling<T>(
        &self,
        spin: Duration,
        make: impl FnOnce(Reply<T>) -> Input,
    ) -> Result<T, DsmError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let mut answers = if spin.is_zero() {
            None
        } else {
            self.transport.poll_answers()
        };
        self.serve(make(tx))?;
        crate::sched::poll_with_answers(&mut answers, spin, || !rx.is_empty());
        // Ended before sleeping: a poll holds back the receive threads'
        // wake-ups.
        drop(answers);
        rx.recv().map_err(|_| self.stopped())?
    }

    /// The error of a call the engine can no longer serve. The engine,
    /// failing, ends the process with status 70 after naming the cause
    /// (within `SECONDARY_FAILURE_DELAY`); this waits for that end, boundedly,
    /// so that a caller that exits on the error (status 1, say) does not
    /// hide the cause from the launcher.
    fn stopped(&self) -> DsmError {
        let until = std::time::Instant::now() + SECONDARY_FAILURE_DELAY + ENGINE_EXIT_WAIT;
        while std::time::Instant::now() < until {
            thread::sleep(Duration::from_millis(50));
        }
        DsmError::Stopped
    }

    /// Carries out an API call on the engine's state in the calling thread,
    /// like a fault in the SIGBUS handler: its messages leave without
    /// waking the engine thread first (a wake-up across CPUs costs about a
    /// message's round trip on a VM). The answer comes back through the
    /// engine thread. A failure ends the job there, as one of its own would.
    fn serve(&self, input: Input) -> Result<(), DsmError> {
        engine::serve_here(&self.state, &self.inputs, |engine| engine.on_input(input)).map_err(
            |e| {
                let _ = self.inputs.send(Input::Failed(e));
                self.stopped()
            },
        )
    }

    /// Takes distributed lock `id` (held at rank `id mod N`); waits in FIFO
    /// order (polling `DSM_WAIT_SPIN_US` at most, then asleep). Released
    /// when the guard is dropped.
    pub fn lock(&self, id: u64) -> Result<LockGuard<'_>, DsmError> {
        let waiting = self.waiting.guard(WaitFor::Lock(id));
        let ticket = self.ask(|reply| Input::Lock { lock: id, reply })?;
        drop(waiting);
        Ok(LockGuard {
            dsm: self,
            id,
            ticket,
        })
    }

    /// Releases a lock taken with [`LockGuard::into_ticket`].
    pub fn unlock_ticket(&self, id: u64, ticket: u64) -> Result<(), DsmError> {
        self.serve(Input::Unlock { lock: id, ticket })
    }

    /// Checks that a segment of `bytes` with `placement` fits where its
    /// pages live: on every host, the part of it homed there plus the caches
    /// of the job's ranks there must fit in a node's memory (this node's:
    /// the nodes of a job are taken to be alike).
    fn check_room(
        &self,
        bytes: usize,
        placement: &Placement,
        creator: Rank,
    ) -> Result<(), DsmError> {
        let Some((ram, swap)) = crate::memory::node_total() else {
            return Ok(());
        };
        let memory = ram.saturating_add(swap);
        let pages = bytes.div_ceil(PAGE_SIZE) as u64;
        let ranks = self.size as u64;
        let homed_at = |rank: Rank| -> u64 {
            match placement {
                Placement::Distributed => pages / ranks + u64::from((rank as u64) < pages % ranks),
                Placement::Localized(home) => {
                    if rank == *home {
                        pages
                    } else {
                        0
                    }
                }
                Placement::Replicated | Placement::File(_) => {
                    if rank == creator {
                        pages
                    } else {
                        0
                    }
                }
                Placement::Private => pages,
            }
        };
        let cache = self.cache_size().unwrap_or(0) as u64;
        let mut hosts: Vec<&str> = self.hosts.iter().map(String::as_str).collect();
        hosts.sort_unstable();
        hosts.dedup();
        for host in hosts {
            let on_host: Vec<Rank> = (0..self.size).filter(|r| self.host(*r) == host).collect();
            let homed: u64 = on_host.iter().map(|r| homed_at(*r)).sum::<u64>() * PAGE_SIZE as u64;
            let need = homed + cache * on_host.len() as u64;
            if need > memory {
                let rank = on_host
                    .iter()
                    .copied()
                    .max_by_key(|r| homed_at(*r))
                    .unwrap_or(self.rank);
                return Err(DsmError::NoRoom {
                    rank,
                    host: host.to_string(),
                    what: format!(
                        "a {} segment of {bytes} bytes ({homed} bytes of it homed there) beside the caches of the job's {} rank(s) there ({cache} bytes each)",
                        placement.name(),
                        on_host.len()
                    ),
                    need,
                    memory,
                    fix: "allocate less, spread the data over more ranks or hosts (Placement::Distributed), or lower DSM_CACHE_SIZE",
                });
            }
        }
        Ok(())
    }

    /// Allocates a segment of `bytes` bytes with the given placement, from
    /// any rank, without a collective call (see [`crate::segment`]). Its
    /// address is the same on every rank.
    pub fn alloc(&self, bytes: usize, placement: Placement) -> Result<Segment, DsmError> {
        self.alloc_with(bytes, placement, self.consistency())
    }

    /// The consistency of segments allocated without choosing: the job's
    /// protocol's (`DSM_PROTOCOL`).
    pub fn consistency(&self) -> Consistency {
        match self.config.protocol {
            Protocol::Release => Consistency::Release,
            Protocol::Mrsw | Protocol::Migratory => Consistency::Sequential,
        }
    }

    /// [`Dsm::alloc`] with the segment's consistency chosen, whatever the
    /// job's protocol (refused under the migratory protocol, which has no
    /// segments; a release-consistent segment cannot be replicated or a
    /// file's, whose seal and sync need a single writer).
    pub fn alloc_with(
        &self,
        bytes: usize,
        placement: Placement,
        consistency: Consistency,
    ) -> Result<Segment, DsmError> {
        self.check_placement(&placement)?;
        let contents = match &placement {
            Placement::File(path) => Some(
                std::fs::read(path)
                    .map_err(|e| DsmError::Segment(format!("reading {}: {e}", path.display())))?,
            ),
            _ => None,
        };
        let bytes = contents
            .as_ref()
            .map(|c| c.len().max(bytes))
            .unwrap_or(bytes);
        self.check_room(bytes, &placement, self.rank)?;
        let pages = segment_pages(bytes)?;
        let (kind, rank) = placement.code(self.rank);
        let kind = kind | release_flag(consistency);
        let info = self.ask(|reply| Input::Alloc {
            pages,
            kind,
            rank,
            contents,
            reply,
        })?;
        Ok(self.segment(info, bytes))
    }

    /// Refuses a placement at a rank outside the job.
    fn check_placement(&self, placement: &Placement) -> Result<(), DsmError> {
        match placement {
            Placement::Localized(r) if *r >= self.size => Err(DsmError::Segment(format!(
                "cannot place a segment at rank {r}: the job has {} ranks",
                self.size
            ))),
            _ => Ok(()),
        }
    }

    /// The program's view of segment `info`, allocated for `bytes`.
    fn segment(&self, info: SegmentInfo, bytes: usize) -> Segment {
        Segment {
            info,
            base: self.base() as usize,
            len: bytes,
        }
    }

    /// Allocates one segment collectively: every rank calls it, in the same
    /// order, with the same size and placement, and every rank gets the
    /// same segment (as `MPI_Win_allocate` does). Use it where each rank
    /// works on a part of shared data; [`Dsm::alloc`] makes a segment of
    /// the caller's own, which other ranks learn only by its address. A
    /// replicated segment allocated this way has rank 0 as its creator:
    /// rank 0 writes it and calls [`Dsm::seal`]. Different arguments on different ranks end the job with an
    /// error naming both calls; a file segment is refused (use `alloc` on
    /// the rank that holds the file).
    pub fn coalloc(&self, bytes: usize, placement: Placement) -> Result<Segment, DsmError> {
        self.coalloc_with(bytes, placement, self.consistency())
    }

    /// [`Dsm::coalloc`] with the segment's consistency chosen (every rank
    /// chooses the same), as [`Dsm::alloc_with`].
    pub fn coalloc_with(
        &self,
        bytes: usize,
        placement: Placement,
        consistency: Consistency,
    ) -> Result<Segment, DsmError> {
        self.check_placement(&placement)?;
        if matches!(placement, Placement::File(_)) {
            return Err(DsmError::Segment(
                "a file segment cannot be allocated collectively: allocate it with alloc on the rank that holds the file".into(),
            ));
        }
        // Every rank checks the same thing (the nodes of a job are taken to
        // be alike), so all refuse together rather than leave the others
        // waiting for them.
        self.check_room(bytes, &placement, 0)?;
        let pages = segment_pages(bytes)?;
        // The creator of a replicated segment is the same on every rank.
        let (kind, rank) = placement.code(0);
        let kind = kind | release_flag(consistency);
        let info = self.ask(|reply| Input::CoAlloc {
            pages,
            kind,
            rank,
            reply,
        })?;
        Ok(self.segment(info, bytes))
    }

    /// The segment's memory as 64-bit atomics.
    pub fn segment_words(&self, segment: &Segment) -> &[AtomicU64] {
        let start = segment.info.first_page as usize * PAGE_SIZE / 8;
        let len = segment.info.pages as usize * PAGE_SIZE / 8;
        &self.words()[start..start + len]
    }

    /// Seals a replicated segment (its creator only): read-only copies may
    /// then live everywhere and are never invalidated; a store to it from
    /// any rank is a fatal error naming the segment.
    pub fn seal(&self, segment: &Segment) -> Result<(), DsmError> {
        let info = segment.info;
        self.ask(|reply| Input::Seal {
            segment: info,
            reply,
        })
    }

    /// Writes a file segment's pages back to `path` (its creator only).
    pub fn sync(&self, segment: &Segment, path: &std::path::Path) -> Result<(), DsmError> {
        let info = segment.info;
        let (path, len) = (path.to_path_buf(), segment.len);
        self.ask(|reply| Input::Sync {
            segment: info,
            path,
            len,
            reply,
        })
    }

    /// The segment at `addr`, as [`Segment::addr`] gives it on any rank:
    /// how a rank gets hold of a segment another rank allocated with
    /// [`Dsm::alloc`] (its address handed over in shared memory or a
    /// message), to free it, say. Its [`Segment::len`] is then its whole
    /// pages. An error if no segment starts there.
    pub fn segment_at(&self, addr: *const u8) -> Result<Segment, DsmError> {
        let base = self.base() as usize;
        let offset = (addr as usize)
            .checked_sub(base)
            .filter(|o| *o < self.len() && o % PAGE_SIZE == 0)
            .ok_or_else(|| {
                DsmError::Segment(format!(
                    "{addr:?} is not the address of a segment: segments start at page boundaries of the shared space ({base:#x}, {} bytes)",
                    self.len()
                ))
            })?;
        let page = offset / PAGE_SIZE;
        let info = self.ask(|reply| Input::FindSegment { page, reply })?;
        Ok(self.segment(info, info.pages as usize * PAGE_SIZE))
    }

    /// Frees a segment, collectively: every rank calls it, in the same
    /// order as its other frees, once all its threads are done with the
    /// segment (whoever allocated it, with [`Dsm::alloc`] or
    /// [`Dsm::coalloc`]). Returns when no rank holds anything of it any
    /// more: the caches' copies, the homes' pages and their memory are
    /// gone, and the range may hold a later segment. A file segment's
    /// changes not written by [`Dsm::sync`] are lost. An access to the
    /// segment afterwards is an error that ends the job (or reads the
    /// segment allocated there since). Ranks that free different segments
    /// at the same point end the job with an error naming both; a second
    /// free of a segment is an error.
    pub fn free(&self, segment: Segment) -> Result<(), DsmError> {
        let _waiting = self.waiting.guard(WaitFor::Free(segment.id()));
        let info = segment.info;
        self.ask(|reply| Input::Free {
            segment: info,
            reply,
        })
    }

    /// This rank's statistics so far (faults, traffic, latency, evictions).
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot(self.rank)
    }

    /// The bound on the bytes of pages homed elsewhere this rank holds
    /// (`DSM_CACHE_SIZE` resolved; `None`: no bound).
    pub fn cache_size(&self) -> Option<usize> {
        *self.cache_bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes that bound (`None`: no bound; at least one page). Pages over
    /// a lower bound are evicted at once. Under the migratory protocol,
    /// which evicts nothing, this changes nothing.
    pub fn set_cache_size(&self, bytes: Option<usize>) -> Result<(), DsmError> {
        if self.config.protocol == Protocol::Migratory {
            return Ok(());
        }
        *self.cache_bytes.lock().unwrap_or_else(|p| p.into_inner()) = bytes;
        let pages = bytes.map_or(usize::MAX, |b| (b / PAGE_SIZE).max(1));
        self.serve(Input::CacheLimit { pages })
    }

    /// Ends this rank's part in the job: waits for every rank to get here
    /// (so no rank leaves while another may still need a page it holds),
    /// then closes the connections. Prints the statistics with `DSM_STATS=1`.
    pub fn finalize(mut self) -> Result<StatsSnapshot, DsmError> {
        // Called: a failure from here on is reported as itself, not as an
        // exit without finalize.
        hang::left_job();
        self.barrier()?;
        self.stop_engine();
        self.transport.shutdown(SHUTDOWN_TIMEOUT)?;
        let stats = self.stats();
        self.report_stats(&stats);
        Ok(stats)
    }

    /// Prints (or writes) the statistics as `DSM_STATS` and
    /// `DSM_STATS_FILE` say.
    fn report_stats(&self, stats: &StatsSnapshot) {
        match (self.config.stats, &self.config.stats_file) {
            (StatsOutput::Off, _) => {}
            (StatsOutput::Text, _) => eprintln!("{stats}"),
            (StatsOutput::Json, None) => {
                eprintln!("{}{}", crate::stats::JSON_LINE_PREFIX, stats.to_json())
            }
            (StatsOutput::Json, Some(pattern)) => {
                let path = pattern.replace("%r", &self.rank.to_string());
                if let Err(e) = std::fs::write(&path, stats.to_json() + "\n") {
                    eprintln!(
                        "dsm: rank {}: cannot write the statistics to {path} (DSM_STATS_FILE): {e}",
                        self.rank
                    );
                }
            }
        }
    }

    fn stop_engine(&mut self) {
        let _ = self.inputs.send(Input::Stop);
        if let Some(engine) = self.engine.take() {
            let _ = engine.join();
        }
        // Closing the pipe's write end wakes the reader's poll.
        drop(self.stop_reader.take());
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        drop(self.signal_faults.take());
        if let Some((stop, reporter)) = self.reporter.take() {
            drop(stop);
            let _ = reporter.join();
        }
    }
}

/// Pages of a segment of `bytes`; an empty segment is refused.
fn segment_pages(bytes: usize) -> Result<u64, DsmError> {
    if bytes == 0 {
        return Err(DsmError::Segment("cannot allocate an empty segment".into()));
    }
    Ok(bytes.div_ceil(PAGE_SIZE) as u64)
}

/// How long a hang report waits for the engine's lock before it reports
/// the engine as busy.
const REPORT_ENGINE_WAIT: Duration = Duration::from_secs(1);

/// Starts the thread that prints hang reports (see [`crate::hang`]); none
/// if SIGUSR1 cannot be watched or the thread not started (the job runs
/// without reports, as it would have before them).
fn spawn_hang_reporter(
    rank: Rank,
    host: &str,
    threshold: Option<Duration>,
    waiting: &Arc<Waiting>,
    engine: std::sync::Weak<Mutex<Engine>>,
) -> Option<(Sender<()>, JoinHandle<()>)> {
    let mut signals = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1]) {
        Ok(signals) => signals,
        Err(e) => {
            tracing::warn!("rank {rank}: no hang reports on SIGUSR1: {e}");
            return None;
        }
    };
    let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
    let describe = move |threads: &[ThreadReport]| -> Option<Vec<String>> {
        let names: Vec<String> = threads.iter().map(|w| hang::thread_name(w.tid)).collect();
        let engine = engine.upgrade()?;
        let deadline = std::time::Instant::now() + REPORT_ENGINE_WAIT;
        let engine = loop {
            match engine.try_lock() {
                Ok(engine) => break engine,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    if std::time::Instant::now() >= deadline {
                        return None;
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            }
        };
        let mut lines: Vec<String> = threads
            .iter()
            .zip(names)
            .map(|(w, name)| {
                format!(
                    "thread {} ({name}) waits for {} for {:.1} s",
                    w.tid,
                    engine.describe_wait(w.what),
                    w.waited.as_secs_f64()
                )
            })
            .collect();
        lines.extend(engine.waits_report());
        Some(lines)
    };
    let reporter = Reporter {
        rank,
        host: host.to_string(),
        threshold,
        waiting: Arc::clone(waiting),
        describe: Box::new(describe),
        stop: stop_rx,
    };
    let spawned = thread::Builder::new()
        .name("dsm-hang-report".into())
        .spawn(move || reporter.run(&mut signals));
    match spawned {
        Ok(handle) => Some((stop_tx, handle)),
        Err(e) => {
            tracing::warn!("rank {rank}: no hang reports: {e}");
            None
        }
    }
}

/// A held distributed lock; dropping it releases the lock.
pub struct LockGuard<'a> {
    dsm: &'a Dsm,
    id: u64,
    ticket: u64,
}

impl LockGuard<'_> {
    /// The lock's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Releases the lock, reporting a stopped engine.
    pub fn unlock(self) -> Result<(), DsmError> {
        let (dsm, id, ticket) = (self.dsm, self.id, self.ticket);
        std::mem::forget(self);
        dsm.unlock_ticket(id, ticket)
    }

    /// Keeps the lock held past the guard, for APIs (C) that release by
    /// lock id: release it with [`Dsm::unlock_ticket`].
    pub fn into_ticket(self) -> u64 {
        let ticket = self.ticket;
        std::mem::forget(self);
        ticket
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        let _ = self.dsm.unlock_ticket(self.id, self.ticket);
    }
}

impl Drop for Dsm {
    fn drop(&mut self) {
        // Dropped without finalize (an early return, a panic): the peers
        // will see this rank vanish; say why here.
        hang::report_leaving_without_finalize();
        self.stop_engine();
        // The userfaultfd goes before the mapping it watches.
        drop(self.faults.take());
        drop(self.region.take());
    }
}

/// The bit an allocation request's kind carries for `consistency`.
fn release_flag(consistency: Consistency) -> u8 {
    match consistency {
        Consistency::Release => crate::proto::KIND_RELEASE,
        Consistency::Sequential => 0,
    }
}
