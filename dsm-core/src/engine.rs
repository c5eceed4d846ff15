//! The fault engine: one thread that owns the coherence state and reacts
//! to local page faults (read from the userfaultfd by a reader thread),
//! messages from other ranks, API commands (barrier, locks, allocation,
//! seal, sync, stop) and timers. It serves other ranks' requests at all
//! times, whatever the application threads are doing.
//!
//! Heap pages (segments, see [`crate::segment`]) are registered on demand:
//! a fault or a message about a page of a segment this rank does not know
//! yet is parked, the reference rank (0) is asked, and the parked events
//! are replayed in their order of arrival once the segment is registered.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender, TryRecvError};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::coherence::mrsw::Copy;
use crate::coherence::{Action, Migratory, Mrsw, ProtocolCounters};
use crate::config::PAGE_SIZE;
use crate::dsm::DsmError;
use crate::fault::{Fault, FaultError, FaultHandler};
use crate::hang::{WaitFor, Waiting};
use crate::outbox::{Outbox, PageSource};
use crate::pages::{PageMap, PageSet};
use crate::proto::{self, Msg, PageData, Payload, SegmentInfo};
use crate::segment::{kind_name, Registry};
use crate::stats::Stats;
use crate::sync::{BarrierCounter, LockTable};
use crate::transport::{Incoming, InlineDelivery, Landing, PayloadPlacement};
use crate::{Message, Rank, Transport};

mod free;

/// Most messages handled before the replies of the first leave.
const DRAIN_AT_ONCE: usize = 64;

pub(crate) type Reply<T> = Sender<Result<T, DsmError>>;

pub(crate) enum Input {
    /// The fault thread hit an error handling a fault: fatal.
    Failed(DsmError),
    /// Work was left for the engine thread by another: a timer set (its
    /// wait must end by then), or messages to send.
    Wake,
    Barrier(Reply<()>),
    /// Acquire a lock; the reply carries the ticket to release it with.
    Lock {
        lock: u64,
        reply: Reply<u64>,
    },
    Unlock {
        lock: u64,
        ticket: u64,
    },
    Alloc {
        pages: u64,
        kind: u8,
        rank: u32,
        /// Initial contents (file segments), loaded at this rank, their home.
        contents: Option<Vec<u8>>,
        reply: Reply<SegmentInfo>,
    },
    /// This rank's part of a collective allocation (every rank calls it).
    CoAlloc {
        pages: u64,
        kind: u8,
        rank: u32,
        reply: Reply<SegmentInfo>,
    },
    Seal {
        segment: SegmentInfo,
        reply: Reply<()>,
    },
    Sync {
        segment: SegmentInfo,
        path: PathBuf,
        len: usize,
        reply: Reply<()>,
    },
    /// The segment starting at page `page` (a segment another rank made).
    FindSegment {
        page: usize,
        reply: Reply<SegmentInfo>,
    },
    /// This rank's part of the collective free of a segment.
    Free {
        segment: SegmentInfo,
        reply: Reply<()>,
    },
    /// A new bound on the pages held from other homes (`usize::MAX`: none).
    CacheLimit {
        pages: usize,
    },
    Stop,
}

/// The coherence state machine of the configured protocol.
pub(crate) enum Node {
    Migratory(Migratory),
    Mrsw(Mrsw),
}

impl Node {
    /// The page's home, under the protocol that has homes.
    fn home_of(&self, page: usize) -> Option<Rank> {
        match self {
            Node::Migratory(_) => None,
            Node::Mrsw(n) => Some(n.home_of(page)),
        }
    }

    fn counters(&self) -> ProtocolCounters {
        match self {
            Node::Migratory(n) => n.counters,
            Node::Mrsw(n) => n.counters,
        }
    }
}

/// The home's copy of a page no writer holds.
#[derive(Clone)]
enum HomeCopy {
    /// Its bytes, kept here.
    Bytes(PageData),
    /// This rank's own read-only copy, in its mapping: the home wrote the
    /// page last and kept it shared, so read grants are sent straight from
    /// the mapping (no copy out). Copied out (`home_copy_bytes`) before the
    /// mapping of the page changes.
    Mapped,
}

/// Where the page bytes that the actions being applied install or keep
/// come from.
#[derive(Clone, Copy)]
enum Carried<'a> {
    /// Nowhere: no action may need bytes.
    Nothing,
    /// The message being handled (a grant's or a write-back's bytes).
    Msg(&'a Msg),
    /// This rank's own copy, in its mapping (its write-back to itself).
    OwnCopy,
}

/// An event waiting for its segment to be registered.
enum Parked {
    Fault(Fault),
    Message(Message),
}

/// Rank 0's record of a collective allocation under way: the arguments
/// of the first rank that asked (every rank must pass the same) and who
/// asked, with the ticket to answer each under.
struct PendingCoAlloc {
    pages: u64,
    kind: u8,
    rank: u32,
    first: Rank,
    askers: Vec<(Rank, u64)>,
}

/// A seal or sync waiting for its pages to settle at this home.
struct Settling {
    pages: FxHashSet<usize>,
    reply: Reply<()>,
    /// For a sync: the file to write once every page is current.
    write_to: Option<SyncFile>,
}

/// A sync's file and the segment's bytes gathered for it.
struct SyncFile {
    path: PathBuf,
    /// The file's length (the segment's last page may hold more).
    len: usize,
    /// The segment's first page.
    first: usize,
    /// Each page's bytes as they were when it settled (a page written again
    /// before the last one settles has left the home's copy).
    contents: Vec<u8>,
}

pub(crate) struct Engine {
    pub rank: Rank,
    pub size: usize,
    /// Address of the shared space (for messages naming addresses).
    pub base: usize,
    pub transport: Arc<dyn Transport>,
    pub faults: Arc<FaultHandler>,
    pub node: Node,
    pub stats: Arc<Stats>,
    /// Origin of the multi-reader protocol's clock.
    started: Instant,
    /// The home's copy of pages no writer holds (multi-reader protocol);
    /// a page absent here is all zeros.
    backing: PageMap<HomeCopy>,
    fetch_started: FxHashMap<usize, Instant>,
    barrier_epoch: u64,
    barrier_waiter: Option<Reply<()>>,
    barrier_arrivals: BarrierCounter,
    registry: Registry,
    /// Events per looked-up page, in arrival order.
    parked: BTreeMap<usize, Vec<Parked>>,
    next_ticket: u64,
    /// This rank's lock requests not granted yet, by ticket: the lock and
    /// the caller to answer.
    lock_waiters: HashMap<u64, (u64, Reply<u64>)>,
    locks: LockTable,
    alloc_waiters: HashMap<u64, (Reply<SegmentInfo>, Option<Vec<u8>>)>,
    /// Collective allocations this rank asked for so far (their numbers).
    coalloc_epoch: u64,
    /// Rank 0: the collective allocations some ranks have asked for.
    coallocs: BTreeMap<u64, PendingCoAlloc>,
    /// Callers of `Dsm::segment_at` waiting for rank 0's answer, by page.
    finds: BTreeMap<usize, Vec<Reply<SegmentInfo>>>,
    /// Collective frees this rank called so far (their numbers).
    free_epoch: u64,
    /// Collective frees under way here, by number (`free.rs`).
    frees: BTreeMap<u64, free::Freeing>,
    /// Ids of the segments freed (a second free of one is an error).
    freed_segments: FxHashSet<u32>,
    /// Rank 0: freed segments not yet forgotten by every rank, by id.
    forgetting: BTreeMap<u32, free::Forgetting>,
    settling: Vec<Settling>,
    zero_page: Box<[u8; PAGE_SIZE]>,
    stream: Stream,
    /// Most pages a first touch maps (`first_touch`; 0: off).
    populate: usize,
    /// Messages of the event being handled, sent when it is done.
    out: Outbox,
    /// Pages this rank holds writable (as their home) that were
    /// write-protected ahead of a batch of read requests, before their
    /// downgrade: the downgrade only copies them out, and a store here
    /// meanwhile just lifts the protection again.
    protected_ahead: PageSet,
    /// Page operations of the batch being handled, gathered into a run of
    /// consecutive pages done in one system call (`run_staged`).
    staged: StagedRun,
    /// While a batch's messages are being handled: the clock read once
    /// for all of them (one `clock_gettime` per batch, not per message).
    batch_clock: Option<u64>,
    /// Page buffers no longer referenced (home copies replaced), reused
    /// for the next pages copied out: no allocation per page served.
    spare_pages: Vec<PageData>,
    /// True while a receive thread handles a message (`inline_delivery`):
    /// what it produces stays in `out` until `try_flush` sends what the
    /// transport takes at once.
    sends_deferred: bool,
    /// Held by whoever sends the outbox's messages, taken under the
    /// engine's lock and never waited for there: messages leave in the
    /// order they were produced, also when a thread sends them after
    /// letting go of the engine's lock (`serve_here`). A thread that finds
    /// the turn taken leaves its messages queued: the only holder without
    /// the engine's lock is such a sender, which looks at the outbox again
    /// under the lock before it lets the turn go, and sends them with what
    /// else was queued meanwhile (faults of several threads share batches).
    send_turn: Arc<Mutex<()>>,
    /// False once the engine thread has stopped: messages are then queued,
    /// as nobody would send what handling them produces.
    serving: bool,
    /// Runs of read grants a receive thread is landing straight in their
    /// frames (`land_read_grant_run`), as (sender, first page, count), in
    /// order of arrival: the notice it hands on for each must match.
    landing: VecDeque<Landed>,
    /// Makes each landing's token (`Landed::token`): unknown outside this
    /// process, so a notice cannot come from anywhere but this rank's
    /// transport.
    landing_tokens: std::collections::hash_map::RandomState,
    landings_made: u64,
    /// The bound on pages held from other homes, and the victims' order.
    cache: Cache,
    /// Pages received or stored as home since memory was last checked.
    pages_since_memory_check: usize,
}

/// How often the engine thread looks again at a collective free waiting
/// on this rank's own requests or transactions (answers handled in a
/// receive thread do not wake it).
const FREE_POLL: Duration = Duration::from_millis(1);

/// Pages received or stored (4 MiB) between two checks that memory is
/// not running out (`check_memory`: a read of /proc/meminfo, ~20 µs).
const MEMORY_CHECK_EVERY: usize = 1024;

/// This rank's cache of pages homed elsewhere (`DSM_CACHE_SIZE`): past
/// `high` pages, the engine thread evicts down to `low`, in the background
/// of the faults; past `limit`, whoever holds the engine evicts at once.
/// Victims are taken oldest installed first (FIFO over the grants: a read
/// stream's consumed pages go first); a mapped page's accesses are not
/// visible to user space without privileges, so there is no reference bit
/// to give a second chance by. A page that cannot go yet (a request or a
/// command in flight, its minimum hold) goes to the back.
struct Cache {
    limit: usize,
    high: usize,
    low: usize,
    /// Pages installed from other homes, oldest first, each once (an
    /// entry may be stale: the page was invalidated since).
    order: VecDeque<usize>,
    queued: PageSet,
}

impl Cache {
    fn new(pages: usize) -> Cache {
        Cache {
            limit: usize::MAX,
            high: usize::MAX,
            low: usize::MAX,
            order: VecDeque::new(),
            queued: PageSet::new(pages),
        }
    }

    /// At most `limit` pages (at least one); `usize::MAX`: no bound.
    fn bound(&mut self, limit: usize) {
        let limit = limit.max(1);
        let margin = |share: usize| (limit / share).max(1);
        self.limit = limit;
        if self.bounded() {
            self.high = limit.saturating_sub(margin(16));
            self.low = limit.saturating_sub(margin(8));
        }
    }

    fn bounded(&self) -> bool {
        self.limit != usize::MAX
    }

    /// `page`, homed elsewhere, was just granted here. Recorded without a
    /// bound too, so that one set later (`Dsm::set_cache_size`) finds its
    /// victims: one word per page held.
    fn installed(&mut self, page: usize) {
        if self.queued.insert(page) {
            self.order.push_back(page);
        }
    }
}

/// A run of read grants being landed in its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Landed {
    from: Rank,
    first: usize,
    count: usize,
    /// What its notice carries.
    token: u64,
}

/// Most spare page buffers kept (16 MiB): enough for a home to turn over a
/// large share of a 64 MiB stream without allocating.
const SPARE_PAGES: usize = 4096;

/// Consecutive read faults after the first before read-ahead starts: the
/// fifth fault in a row. Shorter runs (up to 16 KiB, such as a stencil
/// reading a neighbour's row) are not streams; pages fetched for nothing
/// cost their writer an invalidation later.
const STREAM_MIN_RUN: usize = 4;

/// Pages a read stream may skip between two faults and still go on: pages
/// already held in between (this rank's own pages of a round-robin space,
/// one in N) fault no more, so a stream over the default layout faults on
/// N - 1 pages of every N.
const STREAM_MAX_SKIP: usize = 16;

/// Most pages a span write-protected ahead of a batch's read requests may
/// skip between two requested pages (`protect_ahead_of_reads`).
const SPAN_MAX_SKIP: usize = 64;

/// A page operation that one system call does for a run of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum RunOp {
    /// Map read-only copies (`UFFDIO_COPY` with write protection).
    #[default]
    InstallReadOnly,
    /// Drop invalidated copies (`MADV_DONTNEED`).
    Drop,
    /// Lift the write protection of upgraded copies.
    MakeWritable,
}

/// Consecutive pages `first..first + count` waiting for one `op` (and, to
/// install, their bytes): one TLB shootdown for the run instead of one per
/// page.
#[derive(Default)]
struct StagedRun {
    op: RunOp,
    first: usize,
    count: usize,
    data: Vec<u8>,
}

/// Most pages asked back after one fault (`regain_after`): 64 KiB.
const REGAIN_MAX: usize = 16;

/// Where the bytes of a run of read grants are.
#[derive(Clone, Copy)]
enum RunBytes<'a> {
    /// In the message received, page after page.
    Received(&'a [u8]),
    /// Already in the pages' frames (this many pages), landed there by the
    /// transport.
    Landed(usize),
}

impl RunBytes<'_> {
    fn count(&self) -> usize {
        match self {
            RunBytes::Received(pages) => pages.len() / PAGE_SIZE,
            RunBytes::Landed(count) => *count,
        }
    }
}

/// Sequential read-stream detection for prefetch.
#[derive(Default)]
struct Stream {
    /// Most pages to request ahead (0: prefetch off).
    max_depth: usize,
    last_page: Option<usize>,
    /// Consecutive read faults on consecutive pages.
    run: usize,
    /// Pages up to here (exclusive) were already requested ahead.
    requested_to: usize,
}

impl Stream {
    /// Pages up to `to` (exclusive) were asked for another way: a fault
    /// among them, or just after, continues the stream.
    fn requested(&mut self, to: usize) {
        self.requested_to = self.requested_to.max(to);
    }

    /// Records a read fault; returns the pages to request ahead.
    fn on_read_fault(&mut self, page: usize) -> std::ops::Range<usize> {
        // The next page, or a page of the window requested ahead (those
        // before it arrived in time and never faulted), or one a few pages
        // on (those between were held already): the stream goes on.
        let sequential = self.last_page.is_some_and(|last| {
            page > last && page <= self.requested_to.max(last + 1 + STREAM_MAX_SKIP)
        });
        self.run = if sequential { self.run + 1 } else { 0 };
        self.last_page = Some(page);
        if !sequential {
            self.requested_to = page + 1;
        }
        if self.max_depth == 0 || self.run < STREAM_MIN_RUN {
            return page + 1..page + 1;
        }
        // The window starts at one page and doubles as the stream goes on,
        // up to max_depth: a short run (a stencil reading a neighbour's
        // 4-page row) fetches little it will not use, and each page fetched
        // for nothing costs its writer an invalidation later.
        let depth = (1usize << (self.run - STREAM_MIN_RUN).min(10)).min(self.max_depth);
        let from = self.requested_to.max(page + 1);
        let to = page + 1 + depth;
        self.requested_to = self.requested_to.max(to);
        from..to.max(from)
    }
}

/// The page a multi-reader message is about.
fn page_of(msg: &Msg) -> Option<usize> {
    match msg {
        Msg::ReadReq { page }
        | Msg::WriteReq { page }
        | Msg::Invalidate { page }
        | Msg::InvalidateAck { page }
        | Msg::Recall { page, .. }
        | Msg::WriteBack { page, .. }
        | Msg::Evicted { page }
        | Msg::EvictedWriteBack { page, .. }
        | Msg::Grant { page, .. }
        | Msg::Denied { page } => Some(*page as usize),
        _ => None,
    }
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rank: Rank,
        size: usize,
        base: usize,
        pages: usize,
        transport: Arc<dyn Transport>,
        faults: Arc<FaultHandler>,
        node: Node,
        stats: Arc<Stats>,
    ) -> Engine {
        Engine {
            rank,
            size,
            base,
            transport,
            faults,
            node,
            stats,
            started: Instant::now(),
            backing: PageMap::new(pages),
            fetch_started: FxHashMap::default(),
            barrier_epoch: 0,
            barrier_waiter: None,
            barrier_arrivals: BarrierCounter::default(),
            registry: Registry::new(pages),
            parked: BTreeMap::new(),
            next_ticket: 1,
            lock_waiters: HashMap::new(),
            locks: LockTable::default(),
            alloc_waiters: HashMap::new(),
            coalloc_epoch: 0,
            coallocs: BTreeMap::new(),
            finds: BTreeMap::new(),
            free_epoch: 0,
            frees: BTreeMap::new(),
            freed_segments: FxHashSet::default(),
            forgetting: BTreeMap::new(),
            settling: Vec::new(),
            zero_page: Box::new([0u8; PAGE_SIZE]),
            stream: Stream::default(),
            populate: 0,
            out: Outbox::default(),
            protected_ahead: PageSet::new(pages),
            staged: StagedRun::default(),
            batch_clock: None,
            spare_pages: Vec::new(),
            sends_deferred: false,
            send_turn: Arc::default(),
            serving: true,
            landing: VecDeque::new(),
            landing_tokens: std::collections::hash_map::RandomState::new(),
            landings_made: 0,
            cache: Cache::new(pages),
            pages_since_memory_check: 0,
        }
    }

    /// Bounds the pages this rank holds from other homes (multi-reader
    /// protocol): `usize::MAX` for no bound.
    pub fn with_cache_limit(mut self, pages: usize) -> Engine {
        self.cache.bound(pages);
        self
    }

    /// Pages homed elsewhere held here.
    fn cached(&self) -> usize {
        match &self.node {
            Node::Mrsw(n) => n.cached(),
            Node::Migratory(_) => 0,
        }
    }

    /// True when the cache holds more than its background watermark: the
    /// engine thread should evict.
    fn eviction_due(&self) -> bool {
        self.cache.bounded() && self.cached() > self.cache.high
    }

    /// Evicts the pages homed elsewhere that this rank holds, oldest first,
    /// until at most `target` are left or none can go now.
    fn evict_to(&mut self, target: usize) -> Result<(), DsmError> {
        if !self.cache.bounded() || self.cached() <= target {
            return Ok(());
        }
        self.run_staged()?;
        let now = self.now();
        // Drops of consecutive pages are staged into runs, as in a batch:
        // one TLB shootdown per run.
        self.batch_clock = Some(now);
        let evicted = self.evict_oldest(target, now);
        self.batch_clock = None;
        evicted?;
        self.run_staged()?;
        // The frames of what was dropped go back to the kernel now.
        self.faults.release_dropped_frames()?;
        Ok(())
    }

    fn evict_oldest(&mut self, target: usize, now: u64) -> Result<(), DsmError> {
        let mut passed = 0;
        while self.cached() > target && passed < self.cache.order.len() {
            let Some(page) = self.cache.order.pop_front() else {
                break;
            };
            self.cache.queued.remove(page);
            let Node::Mrsw(node) = &mut self.node else {
                return Ok(());
            };
            match node.copy_of(page) {
                Some(Copy::Invalid) | None => continue, // lost since
                Some(_) if !node.evictable(page, now) => {
                    self.cache.installed(page);
                    passed += 1;
                    continue;
                }
                Some(Copy::Shared) => Stats::add(&self.stats.evictions_clean, 1),
                Some(Copy::Modified) => {}
            }
            let actions = node.evict(page, now)?;
            self.apply(actions, Carried::Nothing)?;
        }
        Ok(())
    }

    /// Every [`MEMORY_CHECK_EVERY`] pages received or stored: a rank about
    /// to run out of memory (as home, or with a cache too large for what
    /// the node has left) ends the job saying so, rather than being killed
    /// by the kernel without a word.
    fn check_memory(&mut self) -> Result<(), DsmError> {
        if self.pages_since_memory_check < MEMORY_CHECK_EVERY {
            return Ok(());
        }
        self.pages_since_memory_check = 0;
        match crate::memory::headroom() {
            Some(room) if room.exhausted() => Err(DsmError::OutOfMemory {
                available: room.available,
                total: room.total,
                scope: room.scope,
                cached: (self.cached() * PAGE_SIZE) as u64,
            }),
            _ => Ok(()),
        }
    }

    /// After serving an event outside the engine thread: checks memory
    /// (`check_memory`), and evicts in the calling thread only if the cache
    /// is over its limit (the engine thread did not keep up); true when the
    /// engine thread should evict in the background.
    fn bound_memory(&mut self) -> Result<bool, DsmError> {
        self.check_memory()?;
        if !self.eviction_due() {
            return Ok(false);
        }
        if self.cached() > self.cache.limit {
            self.evict_to(self.cache.limit)?;
        }
        Ok(self.eviction_due())
    }

    /// Requests up to `depth` pages ahead of sequential read streams.
    pub fn with_prefetch(mut self, depth: usize) -> Engine {
        self.stream.max_depth = depth;
        self
    }

    /// Maps up to `pages` never-touched pages at a first touch (0: off).
    pub fn with_populate(mut self, pages: usize) -> Engine {
        self.populate = pages;
        self
    }

    /// Serves messages, API commands and timers until `Stop`; faults are
    /// served by the fault thread ([`read_faults`]) on the same state. An
    /// error is fatal for the job (a peer is gone, a protocol violation, the
    /// kernel refused an operation, a store to a sealed segment).
    /// `spin`: how long to poll the queues before sleeping on them.
    pub fn run(
        engine: &Mutex<Engine>,
        inputs: Receiver<Input>,
        spin: Duration,
    ) -> Result<(), DsmError> {
        let inbox = lock(engine).transport.inbox();
        let result = Self::serve(engine, &inbox, &inputs, spin);
        let mut this = lock(engine);
        this.serving = false;
        // Messages handled in a receive thread may have left output whose
        // `Wake` arrived after `Stop`; they leave before the transport
        // closes, so this waits for the turn.
        result.and_then(|()| {
            let turn = Arc::clone(&this.send_turn);
            let _turn = take_turn(&turn);
            this.flush_in_turn()
        })
    }

    fn serve(
        engine: &Mutex<Engine>,
        inbox: &Receiver<Incoming>,
        inputs: &Receiver<Input>,
        spin: Duration,
    ) -> Result<(), DsmError> {
        loop {
            crate::sched::poll_until(spin, || !inbox.is_empty() || !inputs.is_empty());
            let timeout = {
                let this = lock(engine);
                let timeout = this
                    .next_deadline()
                    .map(|t| t.saturating_duration_since(Instant::now()))
                    .unwrap_or(Duration::from_secs(3600));
                if this.free_stalled() {
                    timeout.min(FREE_POLL)
                } else {
                    timeout
                }
            };
            // Wait for something to arrive without taking it: messages leave
            // the queue only under the engine's lock, so a receive thread
            // that finds the lock free and the queue empty knows nothing
            // received before its message is still to be handled.
            let mut ready = Select::new();
            ready.recv(inbox);
            ready.recv(inputs);
            let _ = ready.ready_timeout(timeout);
            if !inbox.is_empty() {
                let mut this = lock(engine);
                // What has arrived is handled before the replies leave, so
                // they leave together (bounded: the fault thread waits for
                // the lock meanwhile).
                for _ in 0..DRAIN_AT_ONCE {
                    match inbox.try_recv() {
                        Ok(Ok(msg)) => this.on_message(msg)?,
                        Ok(Err(e)) => return Err(e.into()),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => return Err(DsmError::Stopped),
                    }
                }
                this.flush()?;
            }
            match inputs.try_recv() {
                Ok(Input::Stop) | Err(TryRecvError::Disconnected) => return Ok(()),
                Ok(Input::Failed(e)) => return Err(e),
                Ok(input) => {
                    let mut this = lock(engine);
                    this.on_input(input)?;
                    this.flush()?;
                }
                Err(TryRecvError::Empty) => {}
            }
            let mut this = lock(engine);
            this.check_memory()?;
            if this.free_stalled() {
                this.advance_frees()?;
            }
            if this.eviction_due() {
                let low = this.cache.low;
                this.evict_to(low)?;
            }
            if this.next_deadline().is_some_and(|t| t <= Instant::now()) {
                let now = this.now();
                let actions = match &mut this.node {
                    Node::Migratory(n) => n.on_tick(Instant::now())?,
                    Node::Mrsw(n) => n.on_tick(now)?,
                };
                this.apply(actions, Carried::Nothing)?;
            }
            this.flush()?;
        }
    }

    /// Sends the messages the handling of the last events produced.
    fn flush(&mut self) -> Result<(), DsmError> {
        if self.sends_deferred {
            return Ok(());
        }
        if self.out.is_empty() {
            // Only a message a receive thread left part-written may be
            // waiting; a thread holding the turn finishes it first anyway,
            // so this one does not wait for the turn under the lock.
            if let Ok(_turn) = self.send_turn.try_lock() {
                self.transport.finish_sends()?;
            }
            return Ok(());
        }
        let turn = Arc::clone(&self.send_turn);
        let Ok(_turn) = turn.try_lock() else {
            // A thread sending without the engine's lock: it sends these
            // too (see `send_turn`).
            return Ok(());
        };
        self.flush_in_turn()
    }

    /// [`Engine::flush`] for a thread holding the send turn.
    fn flush_in_turn(&mut self) -> Result<(), DsmError> {
        // Grants read from the mapping only while it holds the home's copy.
        debug_assert!(self
            .out
            .mapped_pages()
            .all(|page| self.home_copy_is_mapped(page)));
        // Messages a receive thread left part-written go first.
        self.transport.finish_sends()?;
        let batches = self.out.batches;
        self.out.flush(&*self.transport, &self.faults)?;
        Stats::add(&self.stats.batches_sent, self.out.batches - batches);
        Ok(())
    }

    /// The queued messages, for a thread holding the send turn to send
    /// after letting go of the engine's lock: only when none reads a page
    /// from the mapping (which may change once the lock is free).
    fn detach_output(&mut self) -> Option<Outbox> {
        if self.sends_deferred || self.out.is_empty() || self.out.mapped_pages().next().is_some() {
            return None;
        }
        Some(self.out.detach())
    }

    /// In a receive thread, after handling a message: sends what the
    /// transport takes without waiting. True when the engine thread must
    /// send the rest (messages left queued, or one left part-written).
    fn try_flush(&mut self) -> Result<bool, DsmError> {
        let Ok(_turn) = self.send_turn.try_lock() else {
            // A thread sending without the engine's lock: it sends this
            // output too (see `send_turn`).
            return Ok(false);
        };
        debug_assert!(self
            .out
            .mapped_pages()
            .all(|page| self.home_copy_is_mapped(page)));
        let batches = self.out.batches;
        let started = self.out.try_flush(&*self.transport, &self.faults)?;
        Stats::add(&self.stats.batches_sent, self.out.batches - batches);
        Ok(started || !self.out.is_empty())
    }

    pub(crate) fn on_input(&mut self, input: Input) -> Result<(), DsmError> {
        match input {
            Input::Failed(e) => Err(e),
            Input::Wake => Ok(()),
            Input::Barrier(reply) => self.start_barrier(reply),
            Input::Lock { lock, reply } => {
                let ticket = self.ticket();
                self.lock_waiters.insert(ticket, (lock, reply));
                let home = (lock % self.size as u64) as Rank;
                self.out
                    .send(home, Msg::LockAcquire { lock, ticket }.header());
                Ok(())
            }
            Input::Unlock { lock, ticket } => {
                let home = (lock % self.size as u64) as Rank;
                self.out
                    .send(home, Msg::LockRelease { lock, ticket }.header());
                Ok(())
            }
            Input::Alloc {
                pages,
                kind,
                rank,
                contents,
                reply,
            } => {
                self.ask_rank0_for_segment(reply, contents, |ticket| Msg::AllocReq {
                    ticket,
                    pages,
                    kind,
                    rank,
                });
                Ok(())
            }
            Input::CoAlloc {
                pages,
                kind,
                rank,
                reply,
            } => {
                let epoch = self.coalloc_epoch + 1;
                if self.ask_rank0_for_segment(reply, None, |ticket| Msg::CoAllocReq {
                    ticket,
                    epoch,
                    pages,
                    kind,
                    rank,
                }) {
                    self.coalloc_epoch = epoch;
                }
                Ok(())
            }
            Input::Seal { segment, reply } => {
                if segment.kind != 2 || segment.rank as Rank != self.rank {
                    let _ = reply.send(Err(DsmError::Segment(format!(
                        "segment {} is {} and was created by rank {}: only a replicated segment's creator can seal it",
                        segment.id,
                        kind_name(segment.kind),
                        segment.rank
                    ))));
                    return Ok(());
                }
                self.settle_segment(segment, reply, None, true)
            }
            Input::Sync {
                segment,
                path,
                len,
                reply,
            } => {
                if segment.kind != 4 || segment.rank as Rank != self.rank {
                    let _ = reply.send(Err(DsmError::Segment(format!(
                        "segment {} is {} and was created by rank {}: only a file segment's creator (which holds the file) can sync it",
                        segment.id,
                        kind_name(segment.kind),
                        segment.rank
                    ))));
                    return Ok(());
                }
                self.settle_segment(segment, reply, Some((path, len)), false)
            }
            Input::Free { segment, reply } => self.start_free(segment, reply),
            Input::FindSegment { page, reply } => {
                if let Some(info) = self.registry.find(page).copied() {
                    let _ = reply.send(self.segment_starting_at(page, Some(info)));
                    return Ok(());
                }
                let asked = self.finds.contains_key(&page);
                self.finds.entry(page).or_default().push(reply);
                if !asked {
                    self.out
                        .send(0, Msg::FindSegment { page: page as u64 }.header());
                }
                Ok(())
            }
            Input::CacheLimit { pages } => {
                self.cache.bound(pages);
                Ok(())
            }
            Input::Stop => Ok(()),
        }
    }

    fn ticket(&mut self) -> u64 {
        self.next_ticket += 1;
        self.next_ticket
    }

    /// The multi-reader protocol's clock.
    fn now(&self) -> u64 {
        if let Some(now) = self.batch_clock {
            return now;
        }
        self.started.elapsed().as_nanos() as u64
    }

    fn next_deadline(&self) -> Option<Instant> {
        match &self.node {
            Node::Migratory(n) => n.next_deadline(),
            Node::Mrsw(n) => n
                .next_deadline()
                .map(|t| self.started + Duration::from_nanos(t)),
        }
    }

    /// Runs `f` on the state machine and records the change of its counters.
    fn counted<T>(&mut self, f: impl FnOnce(&mut Node) -> T) -> T {
        let before = self.node.counters();
        let result = f(&mut self.node);
        let after = self.node.counters();
        Stats::add(
            &self.stats.requests_forwarded,
            after.forwarded - before.forwarded,
        );
        Stats::add(
            &self.stats.requests_deferred,
            after.deferred - before.deferred,
        );
        result
    }

    /// True when `page` is in a heap segment this rank does not know yet:
    /// events about it wait (`park`) until the segment is looked up.
    fn segment_unknown(&self, page: usize) -> bool {
        matches!(self.node, Node::Mrsw(_))
            && self.registry.in_heap(page)
            && self.registry.find(page).is_none()
    }

    /// Parks an event about a page of an unknown segment and looks the
    /// segment up (once per page).
    fn park(&mut self, page: usize, event: Parked) {
        let first = !self.parked.contains_key(&page);
        self.parked.entry(page).or_default().push(event);
        if first {
            self.out.send(0, Msg::Lookup { page: page as u64 }.header());
        }
    }

    fn on_fault(&mut self, fault: Fault) -> Result<(), DsmError> {
        if self.segment_unknown(fault.page) {
            self.park(fault.page, Parked::Fault(fault));
            return Ok(());
        }
        if fault.write && self.protected_ahead.remove(fault.page) {
            // Still ours and writable: only the protection taken ahead of
            // a downgrade stopped the store (which will now protect it again).
            debug_assert!(!self.home_copy_is_mapped(fault.page), "a writable page");
            return Ok(self.faults.make_writable(fault.page)?);
        }
        let counter = if fault.write {
            &self.stats.write_faults
        } else {
            &self.stats.read_faults
        };
        Stats::add(counter, 1);
        if self.first_touch(fault.page)? {
            return Ok(());
        }
        let actions = match &mut self.node {
            Node::Migratory(n) => n.on_fault(fault.page)?,
            Node::Mrsw(n) => n.on_fault(fault.page, fault.write)?,
        };
        if actions.iter().any(|a| matches!(a, Action::Send { .. })) {
            self.fetch_started.insert(fault.page, Instant::now());
        }
        self.apply(actions, Carried::Nothing)?;
        let ahead = if fault.write {
            0..0
        } else {
            self.stream.on_read_fault(fault.page)
        };
        let regaining = matches!(&self.node, Node::Mrsw(n) if n.lost(fault.page).is_some());
        if !ahead.is_empty() || regaining {
            // The demand request leaves alone, ahead of the batch asked for
            // with it. Otherwise it leaves when the lock is let go
            // (`serve_here`), with other threads' requests queued meanwhile.
            self.flush()?;
        }
        let regained = self.regain_after(fault.page, fault.write)?;
        if !fault.write {
            self.prefetch(ahead)?;
            if regained > 0 {
                // Already asked for: a read stream that reaches them goes on.
                self.stream.requested(fault.page + 1 + regained);
            }
        }
        Ok(())
    }

    /// A first touch of a page homed here (or private) that was never
    /// touched: maps it and the untouched pages after it, up to
    /// `DSM_POPULATE` pages within its segment, zeros and writable, in one
    /// system call (`Mrsw::populate_ahead`) instead of one fault and one
    /// install per page. True when it served the fault.
    fn first_touch(&mut self, page: usize) -> Result<bool, DsmError> {
        let end = self.populate_end(page);
        if end <= page {
            return Ok(false);
        }
        let now = self.now();
        let Node::Mrsw(node) = &mut self.node else {
            return Ok(false);
        };
        let actions = node.populate_ahead(page, end, now)?;
        if actions.is_empty() {
            return Ok(false);
        }
        for action in &actions {
            if let Action::InstallZeros { count, .. } = action {
                Stats::add(&self.stats.pages_populated, *count as u64 - 1);
                // New memory, as a grant's page is (`check_memory`).
                self.pages_since_memory_check += count;
            }
        }
        self.apply(actions, Carried::Nothing)?;
        Ok(true)
    }

    /// Where a first touch of `page` stops taking pages (exclusive): the
    /// end of its segment (of the fixed space below the heap), at most
    /// `populate` pages on, and before the first page whose home's copy
    /// holds bytes (a file segment's contents, which the state machine
    /// does not see). `page` itself when no first touch applies here: the
    /// page is homed elsewhere (no lookup of the home's copies then).
    fn populate_end(&self, page: usize) -> usize {
        let Node::Mrsw(node) = &self.node else {
            return page;
        };
        if self.populate == 0 {
            return page;
        }
        let segment = self.registry.find(page);
        let private = segment.is_some_and(|s| s.kind == 3);
        if !private && node.home_of(page) != self.rank {
            return page;
        }
        let limit = match segment {
            Some(s) => (s.first_page + s.pages) as usize,
            None if !self.registry.in_heap(page) => self.registry.heap_start,
            None => return page,
        };
        let limit = limit
            .min(page.saturating_add(self.populate))
            .min(node.pages());
        (page..limit)
            .find(|p| self.backing.get(*p).is_some())
            .unwrap_or(limit)
    }

    /// Asks back the pages after a faulting one that this rank lost with
    /// it (`Mrsw::regain_ahead`), within its segment.
    /// Returns how many pages after `page` it asked for.
    fn regain_after(&mut self, page: usize, write: bool) -> Result<usize, DsmError> {
        let Node::Mrsw(node) = &mut self.node else {
            return Ok(0);
        };
        if node.lost(page).is_none() {
            return Ok(0); // the usual fault: no segment lookup
        }
        let end = match self.registry.find(page) {
            Some(segment) => (segment.first_page + segment.pages) as usize,
            None => page + 1 + REGAIN_MAX,
        };
        let actions = node.regain_ahead(page, write, end.min(page + 1 + REGAIN_MAX))?;
        let regained = actions.len();
        Stats::add(&self.stats.pages_regained, regained as u64);
        self.apply(actions, Carried::Nothing)?;
        Ok(regained)
    }

    /// Requests read-only copies of the pages `ahead` of a sequential read
    /// stream, within the space and within pages whose segment is known here.
    fn prefetch(&mut self, ahead: std::ops::Range<usize>) -> Result<(), DsmError> {
        for next in ahead {
            let known = !self.registry.in_heap(next) || self.registry.find(next).is_some();
            let Node::Mrsw(node) = &mut self.node else {
                return Ok(());
            };
            if !known || node.copy_of(next).is_none() {
                break;
            }
            let actions = node.prefetch(next)?;
            Stats::add(&self.stats.pages_prefetched, actions.len() as u64);
            self.apply(actions, Carried::Nothing)?;
        }
        Ok(())
    }

    fn on_message(&mut self, message: Message) -> Result<(), DsmError> {
        self.on_payload(message.from, &message.payload)?;
        self.transport.recycle(message.payload);
        Ok(())
    }

    /// Handles one message's bytes: a batch part by part, in order.
    fn on_payload(&mut self, from: Rank, payload: &[u8]) -> Result<(), DsmError> {
        if payload.first() == Some(&proto::BATCH) {
            let parts = proto::batch_parts(payload)
                .map_err(|e| DsmError::Protocol(format!("from rank {from}: {e}")))?;
            self.batch_clock = Some(self.now());
            let handled = self.protect_ahead_of_reads(&parts).and_then(|()| {
                parts
                    .into_iter()
                    .try_for_each(|part| self.on_payload(from, part))
            });
            self.batch_clock = None;
            handled?;
            return self.run_staged();
        }
        if let Some((first, pages)) = proto::read_grant_run(payload)
            .map_err(|e| DsmError::Protocol(format!("from rank {from}: {e}")))?
        {
            return self.on_read_grant_run(from, first, RunBytes::Received(pages));
        }
        if let Some((page, bytes)) = proto::read_grant(payload) {
            // A lone grant (a round-robin window's pages from one home are
            // not consecutive) is mapped straight from the received bytes,
            // as a run of one, unless it extends the install staged before
            // it: no copy into a page buffer and then into the staged run.
            let staged = &self.staged;
            let extends_staged = staged.count > 0
                && staged.op == RunOp::InstallReadOnly
                && staged.first + staged.count == page;
            if !extends_staged && !self.segment_unknown(page) {
                // Its header too: the bytes received are the message's.
                let header = payload.len() - bytes.len();
                Stats::add(&self.stats.bytes_received, header as u64);
                return self.on_read_grant_run(from, page, RunBytes::Received(bytes));
            }
        }
        if let Some(token) = proto::placed_read_run(payload) {
            if self.batch_clock.is_some() {
                return Err(DsmError::Protocol(format!(
                    "from rank {from}: a notice of pages landed in their frames inside a batch (such notices never travel between ranks)"
                )));
            }
            return self.on_landed_run(from, token);
        }
        let spares = &mut self.spare_pages;
        let msg = Msg::decode_with(payload, &mut |bytes| filled_page(spares, bytes))
            .map_err(|e| DsmError::Protocol(format!("from rank {from}: {e}")))?;
        if let Some(page) = page_of(&msg) {
            if self.segment_unknown(page) {
                let message = Message {
                    from,
                    payload: payload.to_vec(),
                };
                self.park(page, Parked::Message(message));
                return Ok(());
            }
        }
        // Once handled, a page nobody kept (an installed grant) is spare.
        let carried = msg.page_data().cloned();
        self.handle(from, msg, payload.len())?;
        if let Some(buffer) = carried {
            self.recycle(buffer);
        }
        Ok(())
    }

    /// Read grants of consecutive pages (`proto::read_grant_run`): each page
    /// goes through the state machine as its own grant, and those whose only
    /// action is their read-only install are mapped straight from the
    /// received bytes, one `UFFDIO_COPY` per run: no copy per page.
    fn on_read_grant_run(
        &mut self,
        from: Rank,
        first: usize,
        bytes: RunBytes<'_>,
    ) -> Result<(), DsmError> {
        let count = bytes.count();
        if (first..first + count).any(|page| self.segment_unknown(page)) {
            // Not what this rank asked for (it knows the segments of its
            // requests): the grants one by one, as the state machine and
            // parking expect them.
            for i in 0..count {
                let page = first + i;
                let grant = [
                    &Msg::grant_data_header_bytes(page, false)[..],
                    &self.run_page(bytes, first, i)[..],
                ]
                .concat();
                self.on_payload(from, &grant)?;
            }
            return Ok(());
        }
        // Page operations staged before the run come first.
        self.run_staged()?;
        let now = self.now();
        // Pages from `first + direct` up to the one handled are mapped
        // together once something else must happen.
        let mut direct = 0;
        for i in 0..count {
            let page = first + i;
            let actions = match &mut self.node {
                Node::Mrsw(node) => node.on_read_grant(from, page, now)?,
                Node::Migratory(_) => {
                    return Err(DsmError::Protocol(format!(
                        "rank {from} sent read grants of the multi-reader protocol, but this rank runs the migratory one"
                    )))
                }
            };
            self.received_page(page, PAGE_SIZE);
            if let [Action::Install {
                page: p,
                writable: false,
            }] = actions[..]
            {
                if p == page {
                    continue;
                }
            }
            if i > direct {
                self.install_run_part(bytes, first, direct..i)?;
            }
            direct = i + 1;
            let grant = Msg::Grant {
                page: page as u64,
                write: false,
                payload: Payload::Data(self.run_page(bytes, first, i)),
            };
            self.apply(actions, Carried::Msg(&grant))?;
            self.run_staged()?;
            if let Some(buffer) = grant.page_data().cloned() {
                drop(grant);
                self.recycle(buffer);
            }
        }
        if direct < count {
            self.install_run_part(bytes, first, direct..count)?;
        }
        Ok(())
    }

    /// Maps pages `first + parts` of a run of read grants, read-only.
    fn install_run_part(
        &self,
        bytes: RunBytes<'_>,
        first: usize,
        part: std::ops::Range<usize>,
    ) -> Result<(), FaultError> {
        match bytes {
            RunBytes::Received(pages) => self.faults.install_readonly_run(
                first + part.start,
                &pages[part.start * PAGE_SIZE..part.end * PAGE_SIZE],
            ),
            RunBytes::Landed(_) => self
                .faults
                .install_landed_run(first + part.start, part.len()),
        }
    }

    /// The bytes of page `first + i` of a run of read grants, in a buffer.
    fn run_page(&mut self, bytes: RunBytes<'_>, first: usize, i: usize) -> PageData {
        match bytes {
            RunBytes::Received(pages) => filled_page(
                &mut self.spare_pages,
                &pages[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
            ),
            RunBytes::Landed(_) => {
                let mut page = self.page_buffer();
                self.faults.copy_landed(first + i, Arc::make_mut(&mut page));
                page
            }
        }
    }

    /// In a receive thread, before the pages of a run of read grants from
    /// `from` are read: their frames to land them in, if this rank waits
    /// for exactly these grants (so nothing maps or writes those pages
    /// until the run is handled) and holds a memfd; otherwise `None`, and
    /// the run arrives in a buffer as usual. The notice the landing hands
    /// on is handled by `on_landed_run`.
    fn land_read_grant_run(
        &mut self,
        from: Rank,
        first: usize,
        count: usize,
    ) -> Option<Box<dyn Landing>> {
        let Node::Mrsw(node) = &self.node else {
            return None;
        };
        let pages = first..first.checked_add(count)?;
        let overlaps = |l: &Landed| l.first < pages.end && pages.start < l.first + l.count;
        if !self.serving
            || self.staged.count > 0
            || self.landing.iter().any(overlaps)
            || pages.clone().any(|p| !node.awaits_read_grant(p, from))
            || pages.clone().any(|p| self.segment_unknown(p))
        {
            return None;
        }
        self.landings_made += 1;
        let token = self.landing_tokens.hash_one(self.landings_made);
        let landing = self
            .faults
            .landing(first, count, proto::placed_read_run_notice(token))?;
        self.landing.push_back(Landed {
            from,
            first,
            count,
            token,
        });
        Stats::add(&self.stats.pages_landed, count as u64);
        Some(landing)
    }

    /// The notice a receive thread hands on once a run of read grants
    /// landed in its frames: the run's grants, handled as if they had
    /// arrived with their bytes. A notice naming no landing this rank made
    /// for that sender (one sent on the wire) is a protocol error.
    fn on_landed_run(&mut self, from: Rank, token: u64) -> Result<(), DsmError> {
        let found = self
            .landing
            .iter()
            .position(|l| l.token == token && l.from == from);
        let Some(Landed { first, count, .. }) = found.and_then(|i| self.landing.remove(i)) else {
            return Err(DsmError::Protocol(format!(
                "from rank {from}: a notice of pages landed in their frames that this rank did not land (such notices never travel between ranks)"
            )));
        };
        self.on_read_grant_run(from, first, RunBytes::Landed(count))
    }

    /// Home: the read requests of a batch (a reader's read-ahead) for
    /// pages this rank holds writable are write-protected in one system
    /// call per span of such pages, before they are handled one by one:
    /// one TLB shootdown per span instead of one per page. A span may
    /// skip pages (a round-robin window asks each home for every Nth page)
    /// that this rank does not hold writable: protecting them changes
    /// nothing (a read-only copy is protected already; a page not mapped
    /// gets a marker with a memfd, which the next install replaces).
    fn protect_ahead_of_reads(&mut self, parts: &[&[u8]]) -> Result<(), DsmError> {
        let Node::Mrsw(node) = &self.node else {
            return Ok(());
        };
        let now = self.now();
        // The pages to downgrade, by span, in order.
        let mut spans: Vec<Vec<usize>> = Vec::new();
        for page in parts.iter().filter_map(|p| proto::read_request_page(p)) {
            let page = page as usize;
            if self.protected_ahead.contains(page) || !node.read_request_downgrades_here(page, now)
            {
                continue;
            }
            let extends = spans
                .last()
                .and_then(|span| span.last())
                .is_some_and(|&last| {
                    page > last
                        && page - last <= SPAN_MAX_SKIP
                        && !(last + 1..page).any(|q| node.copy_of(q) == Some(Copy::Modified))
                });
            match spans.last_mut() {
                Some(span) if extends => span.push(page),
                _ => spans.push(vec![page]),
            }
        }
        for span in spans.into_iter().filter(|span| span.len() > 1) {
            let (first, last) = (span[0], span[span.len() - 1]);
            self.faults.write_protect(first, last + 1 - first)?;
            // Only the pages asked for are protected ahead of a downgrade:
            // the others kept what they had.
            for page in span {
                self.protected_ahead.insert(page);
            }
        }
        Ok(())
    }

    fn handle(&mut self, from: Rank, msg: Msg, wire_len: usize) -> Result<(), DsmError> {
        match msg {
            Msg::BarrierEnter { .. } | Msg::BarrierRelease { .. } => {
                self.on_barrier_message(from, msg)
            }
            Msg::LockAcquire { lock, ticket } => {
                if let Some((rank, ticket)) = self.locks.acquire(lock, (from, ticket)) {
                    self.out
                        .send(rank, Msg::LockGrant { lock, ticket }.header());
                }
                Ok(())
            }
            Msg::LockRelease { lock, ticket } => {
                let next = self
                    .locks
                    .release(lock, (from, ticket))
                    .map_err(|e| DsmError::Protocol(e.to_string()))?;
                if let Some((rank, ticket)) = next {
                    self.out
                        .send(rank, Msg::LockGrant { lock, ticket }.header());
                }
                Ok(())
            }
            Msg::LockGrant { ticket, .. } => {
                if let Some((_, waiter)) = self.lock_waiters.remove(&ticket) {
                    let _ = waiter.send(Ok(ticket));
                }
                Ok(())
            }
            Msg::AllocReq {
                ticket,
                pages,
                kind,
                rank,
            } => {
                let segment = if self.rank == 0 {
                    self.registry.allocate(pages, kind, rank)
                } else {
                    None
                };
                if let Some(info) = segment {
                    self.register(info);
                }
                self.out
                    .send(from, Msg::AllocReply { ticket, segment }.header());
                Ok(())
            }
            Msg::CoAllocReq {
                ticket,
                epoch,
                pages,
                kind,
                rank,
            } => self.on_coalloc_request(from, ticket, epoch, (pages, kind, rank)),
            Msg::AllocReply { ticket, segment } => {
                let Some((reply, contents)) = self.alloc_waiters.remove(&ticket) else {
                    return Err(DsmError::Protocol(format!(
                        "rank {from} answered an allocation nobody asked for"
                    )));
                };
                let Some(info) = segment else {
                    let _ = reply.send(Err(DsmError::Segment(
                        "the shared heap is full: allocate less, or enlarge the space (DSM_SPACE_SIZE; the heap is its upper half)"
                            .into(),
                    )));
                    return Ok(());
                };
                self.register(info);
                if let Some(contents) = contents {
                    self.load_contents(info, &contents);
                }
                let _ = reply.send(Ok(info));
                Ok(())
            }
            Msg::Lookup { page } => {
                let segment = self.registry.lookup(page as usize);
                self.out
                    .send(from, Msg::LookupReply { page, segment }.header());
                Ok(())
            }
            Msg::LookupReply { page, segment } => self.on_lookup_reply(page as usize, segment),
            Msg::FindSegment { page } => {
                let segment = self.registry.find(page as usize).copied();
                self.out
                    .send(from, Msg::FoundSegment { page, segment }.header());
                Ok(())
            }
            Msg::FoundSegment { page, segment } => {
                let page = page as usize;
                if let Ok(info) = self.segment_starting_at(page, segment) {
                    if self.registry.find(page).is_none() {
                        self.register(info);
                    }
                }
                for reply in self.finds.remove(&page).unwrap_or_default() {
                    let _ = reply.send(self.segment_starting_at(page, segment));
                }
                Ok(())
            }
            Msg::Free {
                step,
                epoch,
                segment,
            } => self.on_free_step(from, step, epoch, segment),
            Msg::PageRequest {
                page, requester, ..
            } => {
                let now = Instant::now();
                let actions = self.counted(|node| match node {
                    Node::Migratory(n) => n.on_request(page as usize, requester as usize, now),
                    Node::Mrsw(_) => Ok(Vec::new()),
                })?;
                self.apply(actions, Carried::Nothing)
            }
            Msg::PageGrant { page, .. } => {
                let page = page as usize;
                let actions = match &mut self.node {
                    Node::Migratory(n) => n.on_grant(page, from, Instant::now())?,
                    Node::Mrsw(_) => Vec::new(),
                };
                self.received_page(page, wire_len);
                self.apply(actions, Carried::Msg(&msg))
            }
            msg => {
                let now = self.now();
                let actions = self.counted(|node| match node {
                    Node::Mrsw(n) => n.on_message(from, &msg, now),
                    Node::Migratory(_) => Ok(Vec::new()),
                })?;
                if let Msg::Grant { page, .. } = msg {
                    self.received_page(page as usize, wire_len);
                }
                self.apply(actions, Carried::Msg(&msg))
            }
        }
    }

    /// Makes a segment known to this rank's state machine.
    fn register(&mut self, info: SegmentInfo) {
        self.registry.insert(info);
        let range = info.first_page as usize..(info.first_page + info.pages) as usize;
        if let Node::Mrsw(node) = &mut self.node {
            match info.kind {
                1 | 2 | 4 => node.set_home(range, info.rank as Rank),
                3 => node.set_private(range),
                _ => {}
            }
        }
    }

    /// Puts a file's bytes into this home's copies of the segment's pages.
    fn load_contents(&mut self, info: SegmentInfo, contents: &[u8]) {
        for (i, chunk) in contents
            .chunks(PAGE_SIZE)
            .enumerate()
            .take(info.pages as usize)
        {
            if chunk.iter().all(|b| *b == 0) {
                continue;
            }
            self.backing.insert(
                info.first_page as usize + i,
                HomeCopy::Bytes(proto::page_from(chunk)),
            );
        }
    }

    /// `segment_at`'s answer: `segment`, if it is one and starts at `page`.
    fn segment_starting_at(
        &self,
        page: usize,
        segment: Option<SegmentInfo>,
    ) -> Result<SegmentInfo, DsmError> {
        match segment {
            Some(info) if info.id != 0 && info.first_page as usize == page => Ok(info),
            _ => Err(DsmError::Segment(format!(
                "{:#x} is not the address of a segment of this job (as alloc or coalloc returned it)",
                self.base + page * PAGE_SIZE
            ))),
        }
    }

    fn on_lookup_reply(
        &mut self,
        page: usize,
        segment: Option<SegmentInfo>,
    ) -> Result<(), DsmError> {
        let Some(info) = segment else {
            let addr = self.base + page * PAGE_SIZE;
            return Err(DsmError::Unallocated { addr });
        };
        self.register(info);
        let range = info.first_page as usize..(info.first_page + info.pages) as usize;
        let pages: Vec<usize> = self.parked.range(range).map(|(p, _)| *p).collect();
        for p in pages {
            for event in self.parked.remove(&p).unwrap_or_default() {
                match event {
                    Parked::Fault(f) => self.on_fault(f)?,
                    Parked::Message(m) => self.on_message(m)?,
                }
            }
        }
        Ok(())
    }

    /// Seal (`seal`) or flush every page of a segment homed here; replies
    /// (after writing `len` bytes to the file `write_to`, for a sync) once
    /// all are settled.
    fn settle_segment(
        &mut self,
        segment: SegmentInfo,
        reply: Reply<()>,
        write_to: Option<(PathBuf, usize)>,
        seal: bool,
    ) -> Result<(), DsmError> {
        let range = segment.first_page as usize..(segment.first_page + segment.pages) as usize;
        let write_to = write_to.map(|(path, len)| SyncFile {
            path,
            len,
            first: range.start,
            contents: vec![0; range.len() * PAGE_SIZE],
        });
        self.settling.push(Settling {
            pages: range.clone().collect(),
            reply,
            write_to,
        });
        for page in range {
            let actions = match &mut self.node {
                Node::Mrsw(n) if seal => n.seal(page)?,
                Node::Mrsw(n) => n.settle(page)?,
                Node::Migratory(_) => vec![Action::Settled { page }],
            };
            self.apply(actions, Carried::Nothing)?;
        }
        Ok(())
    }

    fn settled(&mut self, page: usize) -> Result<(), DsmError> {
        let Some(i) = self.settling.iter().position(|s| s.pages.contains(&page)) else {
            return Ok(());
        };
        let settling = &mut self.settling[i];
        settling.pages.remove(&page);
        if let Some(file) = &mut settling.write_to {
            let at = (page - file.first) * PAGE_SIZE;
            let current = match self.backing.get(page) {
                Some(HomeCopy::Bytes(b)) => &b[..],
                Some(HomeCopy::Mapped) => self.faults.mapped_page(page),
                None => &self.zero_page[..],
            };
            file.contents[at..at + PAGE_SIZE].copy_from_slice(current);
        }
        if !settling.pages.is_empty() {
            return Ok(());
        }
        let done = self.settling.remove(i);
        let result = match done.write_to {
            Some(SyncFile {
                path,
                len,
                mut contents,
                ..
            }) => {
                contents.truncate(len);
                std::fs::write(&path, &contents)
                    .map_err(|e| DsmError::Segment(format!("writing {} back: {e}", path.display())))
            }
            None => Ok(()),
        };
        let _ = done.reply.send(result);
        Ok(())
    }

    fn received_page(&mut self, page: usize, bytes: usize) {
        self.pages_since_memory_check += 1;
        Stats::add(&self.stats.pages_received, 1);
        Stats::add(&self.stats.bytes_received, bytes as u64);
        if let Node::Mrsw(node) = &self.node {
            if node.home_of(page) != self.rank {
                self.cache.installed(page);
                Stats::raise(
                    &self.stats.peak_cached_bytes,
                    (node.cached() * PAGE_SIZE) as u64,
                );
            }
        }
        if let Some(start) = self.fetch_started.remove(&page) {
            self.stats.record_latency(start.elapsed());
        }
    }

    fn on_barrier_message(&mut self, from: Rank, msg: Msg) -> Result<(), DsmError> {
        match msg {
            Msg::BarrierEnter { epoch } => {
                if self.rank != 0 {
                    return Err(DsmError::Protocol(format!(
                        "rank {from} sent a barrier entry to rank {}",
                        self.rank
                    )));
                }
                if self.barrier_arrivals.arrive(epoch, from, self.size) {
                    let release = Msg::BarrierRelease { epoch }.header();
                    for rank in 0..self.size {
                        self.out.send(rank, release.clone());
                    }
                }
                Ok(())
            }
            Msg::BarrierRelease { epoch } => {
                if epoch == self.barrier_epoch {
                    if let Some(waiter) = self.barrier_waiter.take() {
                        let _ = waiter.send(Ok(()));
                    }
                }
                Ok(())
            }
            other => Err(DsmError::Protocol(format!(
                "from rank {from}: unexpected {other:?}"
            ))),
        }
    }

    /// Sends rank 0 the request `make(ticket)` for a segment, its answer
    /// (`AllocReply`) to go to `reply` (with `contents` loaded into the
    /// segment, for a file). False, having answered `reply` with the error,
    /// under the migratory protocol, which has no segments.
    fn ask_rank0_for_segment(
        &mut self,
        reply: Reply<SegmentInfo>,
        contents: Option<Vec<u8>>,
        make: impl FnOnce(u64) -> Msg,
    ) -> bool {
        if !matches!(self.node, Node::Mrsw(_)) {
            let _ = reply.send(Err(DsmError::Segment(
                "segments need the multi-reader protocol (DSM_PROTOCOL=mrsw, the default)".into(),
            )));
            return false;
        }
        let ticket = self.ticket();
        self.alloc_waiters.insert(ticket, (reply, contents));
        self.out.send(0, make(ticket).header());
        true
    }

    /// Rank 0: rank `from`'s part of collective allocation `epoch`. Once
    /// every rank has asked, with the same arguments, the segment is
    /// allocated once and every rank answered with it; different arguments
    /// are a program error that ends the job, naming both calls.
    fn on_coalloc_request(
        &mut self,
        from: Rank,
        ticket: u64,
        epoch: u64,
        (pages, kind, rank): (u64, u8, u32),
    ) -> Result<(), DsmError> {
        if self.rank != 0 {
            return Err(DsmError::Protocol(format!(
                "rank {from} sent a collective allocation to rank {}",
                self.rank
            )));
        }
        let pending = self.coallocs.entry(epoch).or_insert(PendingCoAlloc {
            pages,
            kind,
            rank,
            first: from,
            askers: Vec::new(),
        });
        if (pending.pages, pending.kind, pending.rank) != (pages, kind, rank) {
            let describe = |pages: u64, kind: u8, rank: u32| match kind {
                1 => format!("{pages} page(s) localized at rank {rank}"),
                _ => format!("{pages} page(s) {}", kind_name(kind)),
            };
            return Err(DsmError::Segment(format!(
                "collective allocation {epoch}: rank {from} asked for {}, rank {} for {}; every rank must call it with the same size and placement, in the same order",
                describe(pages, kind, rank),
                pending.first,
                describe(pending.pages, pending.kind, pending.rank)
            )));
        }
        if pending.askers.iter().any(|(r, _)| *r == from) {
            return Err(DsmError::Protocol(format!(
                "rank {from} asked twice for collective allocation {epoch}"
            )));
        }
        pending.askers.push((from, ticket));
        if pending.askers.len() < self.size {
            return Ok(());
        }
        let Some(done) = self.coallocs.remove(&epoch) else {
            return Ok(());
        };
        let segment = self.registry.allocate(done.pages, done.kind, done.rank);
        if let Some(info) = segment {
            self.register(info);
        }
        for (asker, ticket) in done.askers {
            self.out
                .send(asker, Msg::AllocReply { ticket, segment }.header());
        }
        Ok(())
    }

    /// A thread's wait, with what the engine knows of it.
    pub(crate) fn describe_wait(&self, what: WaitFor) -> String {
        match what {
            WaitFor::Page { page, write } => {
                let kind = if write { "write" } else { "read" };
                let home = match self.node.home_of(page) {
                    Some(home) if home == self.rank => "homed here".to_string(),
                    Some(home) => format!("homed at rank {home}"),
                    None => "migratory".to_string(),
                };
                format!(
                    "page {page} ({:#x}, {kind} fault, {home})",
                    self.base + page * PAGE_SIZE
                )
            }
            WaitFor::Barrier => format!(
                "barrier {} (arrivals counted at rank 0)",
                self.barrier_epoch
            ),
            WaitFor::Lock(lock) => {
                format!("lock {lock} (managed at rank {})", lock % self.size as u64)
            }
            WaitFor::Free(segment) => format!("the collective free of segment {segment}"),
        }
    }

    /// What this rank waits for and what it holds up for others, one line
    /// each, for a hang report: its requests in flight (pages, locks, its
    /// barrier), and as a manager the barriers and locks others wait on.
    pub(crate) fn waits_report(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let mut fetches: Vec<(&usize, &Instant)> = self.fetch_started.iter().collect();
        fetches.sort_by_key(|(_, started)| **started);
        for (page, started) in fetches {
            let addr = self.base + page * PAGE_SIZE;
            let from = match self.node.home_of(*page) {
                Some(home) => format!("home rank {home}"),
                None => "its owner".into(),
            };
            lines.push(format!(
                "page {page} ({addr:#x}) requested from {from} {:.1} s ago, not granted yet",
                started.elapsed().as_secs_f64()
            ));
        }
        let mut locks: Vec<u64> = self.lock_waiters.values().map(|(lock, _)| *lock).collect();
        locks.sort_unstable();
        for lock in locks {
            lines.push(format!(
                "lock {lock} requested from rank {}, not granted yet",
                lock % self.size as u64
            ));
        }
        if self.barrier_waiter.is_some() {
            lines.push(format!(
                "in barrier {}, whose arrivals rank 0 counts",
                self.barrier_epoch
            ));
        }
        for (epoch, missing) in self.barrier_arrivals.incomplete(self.size) {
            lines.push(format!(
                "barrier {epoch} (counted here): waiting for rank(s) {}",
                list(missing.iter())
            ));
        }
        lines.extend(self.frees_report());
        for (lock, (holder, _), queue) in self.locks.contended() {
            lines.push(format!(
                "lock {lock} (managed here): held by rank {holder}; waiting: rank(s) {}",
                list(queue.iter().map(|(rank, _)| rank))
            ));
        }
        lines
    }

    fn start_barrier(&mut self, reply: Reply<()>) -> Result<(), DsmError> {
        self.barrier_epoch += 1;
        self.barrier_waiter = Some(reply);
        self.out.send(
            0,
            Msg::BarrierEnter {
                epoch: self.barrier_epoch,
            }
            .header(),
        );
        Ok(())
    }

    /// Keeps a page buffer nobody else references for the next page copied
    /// out or received (a 4 KiB allocation per page costs the allocator more
    /// than the copy: glibc consolidates its fast bins before every large
    /// request).
    fn recycle(&mut self, mut buffer: PageData) {
        if Arc::get_mut(&mut buffer).is_some() && self.spare_pages.len() < SPARE_PAGES {
            self.spare_pages.push(buffer);
        }
    }

    /// A buffer for a page about to be copied out (its old bytes are all
    /// overwritten): a spare one, else a new one.
    fn page_buffer(&mut self) -> PageData {
        self.spare_pages
            .pop()
            .unwrap_or_else(|| Arc::new([0u8; PAGE_SIZE]))
    }

    /// True when the home's copy of `page` is this rank's read-only mapping
    /// of it (never while the page is writable here).
    fn home_copy_is_mapped(&self, page: usize) -> bool {
        matches!(self.backing.get(page), Some(HomeCopy::Mapped))
    }

    /// The home's copy of `page` as bytes (`None`: all zeros). One that
    /// lived in the mapping is copied out first, into the home's copy and
    /// into every queued grant that reads it: called before this rank's
    /// mapping of the page changes (dropped, made writable).
    fn home_copy_bytes(&mut self, page: usize) -> Option<PageData> {
        match self.backing.get(page)? {
            HomeCopy::Bytes(data) => Some(data.clone()),
            HomeCopy::Mapped => {
                let mut data = self.page_buffer();
                self.faults.copy_out(page, Arc::make_mut(&mut data));
                self.out.copied_out(page, &data);
                self.backing.insert(page, HomeCopy::Bytes(data.clone()));
                Some(data)
            }
        }
    }

    /// This rank is about to write `page`: a home's copy of it is
    /// superseded by the writer's, as when a remote writer is granted the
    /// page (`GrantFromBacking`), and written back again before anyone else
    /// reads it. Only grants still queued that read the mapping need its
    /// bytes now (copying the whole copy out on every write the home makes
    /// cost a page buffer per page, freed again at the next read).
    fn supersede_home_copy(&mut self, page: usize) {
        match self.backing.remove(page) {
            Some(HomeCopy::Mapped) if self.out.reads_mapping(page) => {
                let mut data = self.page_buffer();
                self.faults.copy_out(page, Arc::make_mut(&mut data));
                self.out.copied_out(page, &data);
            }
            Some(HomeCopy::Bytes(old)) => self.recycle(old),
            Some(HomeCopy::Mapped) | None => {}
        }
    }

    /// Does the staged run of page operations, if any.
    fn run_staged(&mut self) -> Result<(), DsmError> {
        let StagedRun {
            op,
            first,
            count,
            ref data,
        } = self.staged;
        match op {
            _ if count == 0 => {}
            RunOp::InstallReadOnly => self.faults.install_readonly_run(first, data)?,
            RunOp::Drop => self.faults.drop_run(first, count)?,
            RunOp::MakeWritable => self.faults.make_writable_run(first, count)?,
        }
        self.staged.count = 0;
        self.staged.data.clear();
        Ok(())
    }

    /// In a batch, adds a page operation that can be done on a run of
    /// pages to the staged run (done first if this one does not extend
    /// it); false for every other action.
    fn stage(&mut self, action: &Action, current: Carried<'_>) -> Result<bool, DsmError> {
        let (op, page) = match *action {
            Action::Install {
                page,
                writable: false,
            } => (RunOp::InstallReadOnly, page),
            Action::DropPage { page } => (RunOp::Drop, page),
            Action::MakeWritable { page } => (RunOp::MakeWritable, page),
            _ => return Ok(false),
        };
        if self.batch_clock.is_none() {
            return Ok(false);
        }
        match op {
            RunOp::InstallReadOnly => {}
            RunOp::Drop => {
                self.home_copy_bytes(page);
            }
            RunOp::MakeWritable => self.supersede_home_copy(page),
        }
        let run = &self.staged;
        if run.count == 0 || run.op != op || run.first + run.count != page {
            self.run_staged()?;
            self.staged.op = op;
            self.staged.first = page;
        }
        if op == RunOp::InstallReadOnly {
            let data = carried_page(current, &self.zero_page, page)?;
            self.staged.data.extend_from_slice(data);
        }
        self.staged.count += 1;
        Ok(true)
    }

    /// Carries out the state machine's actions. `current` is the message
    /// being handled: its page bytes are what `Install*` maps and what
    /// `StoreBacking` keeps. Messages to this rank itself (it is the home
    /// of the page, or of the barrier or lock) are handled at once instead
    /// of looping through the transport: the same order as a loop-back
    /// (in order among themselves), without a thread hand-off.
    fn apply(&mut self, actions: Vec<Action>, current: Carried<'_>) -> Result<(), DsmError> {
        for action in actions {
            if self.stage(&action, current)? {
                continue;
            }
            // Every other action comes after the page operations staged
            // before it, except a message: nothing leaves before the batch
            // is done, and one to this rank is handled through here.
            if !matches!(action, Action::Send { .. }) {
                self.run_staged()?;
            }
            match action {
                Action::Send { to, msg } if to == self.rank => self.handle(to, msg, 0)?,
                Action::Send { to, msg } => self.out.send(to, msg.header()),
                Action::GivePage { to, page, present } => {
                    if present {
                        let mut data = self.page_buffer();
                        self.faults.take(page, Arc::make_mut(&mut data))?;
                        self.out
                            .send_page(to, Msg::grant_header(page, true), page, data);
                        Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                    } else {
                        self.out.send(to, Msg::grant_header(page, false));
                    }
                    self.stats.page_sent(to);
                }
                Action::InstallGranted { page }
                | Action::Install {
                    page,
                    writable: true,
                } => {
                    let data = carried_page(current, &self.zero_page, page)?;
                    self.faults.install(page, data)?;
                }
                Action::Install {
                    page,
                    writable: false,
                } => {
                    let data = carried_page(current, &self.zero_page, page)?;
                    self.faults.install_readonly(page, data)?;
                }
                Action::InstallZero { page } => {
                    self.faults.install(page, &self.zero_page)?;
                }
                Action::InstallZeros { first, count } => {
                    self.faults.install_zero_run(first, count)?;
                }
                Action::MakeWritable { page } => {
                    self.supersede_home_copy(page);
                    self.faults.make_writable(page)?
                }
                Action::DropPage { page } => {
                    self.home_copy_bytes(page);
                    self.faults.drop_page(page)?
                }
                Action::WriteBack {
                    to,
                    page,
                    keep_shared: true,
                } if to == self.rank => {
                    // The home's own copy stays mapped read-only and is the
                    // home's copy from now on: nothing is copied out.
                    if !self.protected_ahead.remove(page) {
                        self.faults.write_protect(page, 1)?;
                    }
                    let rank = self.rank;
                    let actions = self.counted(|node| match node {
                        Node::Mrsw(n) => n.on_write_back(rank, page),
                        Node::Migratory(_) => Ok(Vec::new()),
                    })?;
                    self.apply(actions, Carried::OwnCopy)?;
                }
                Action::WriteBack {
                    to,
                    page,
                    keep_shared,
                } => {
                    debug_assert!(!self.home_copy_is_mapped(page), "an exclusive copy");
                    // Copied once, into the buffer the write-back (and the
                    // home's copy it becomes) keeps.
                    let mut data = self.page_buffer();
                    let out = Arc::make_mut(&mut data);
                    if self.protected_ahead.remove(page) {
                        self.faults.copy_out(page, out);
                        if !keep_shared {
                            self.faults.drop_page(page)?;
                        }
                    } else if keep_shared {
                        self.faults.downgrade(page, out)?;
                    } else {
                        self.faults.take(page, out)?;
                    }
                    if to == self.rank {
                        let msg = Msg::WriteBack {
                            page: page as u64,
                            data,
                        };
                        self.handle(to, msg, 0)?;
                        continue;
                    }
                    self.out
                        .send_page(to, Msg::write_back_header(page), page, data);
                    self.stats.page_sent(to);
                    Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                }
                Action::EvictWriteBack { to, page } => {
                    let mut data = self.page_buffer();
                    self.faults.take(page, Arc::make_mut(&mut data))?;
                    self.out
                        .send_page(to, Msg::evicted_write_back_header(page), page, data);
                    self.stats.page_sent(to);
                    Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                    Stats::add(&self.stats.evictions_written_back, 1);
                    Stats::add(&self.stats.bytes_written_back, PAGE_SIZE as u64);
                }
                Action::StoreBacking { page } => {
                    let copy = match current {
                        Carried::Msg(
                            Msg::WriteBack { data, .. } | Msg::EvictedWriteBack { data, .. },
                        ) => HomeCopy::Bytes(data.clone()),
                        Carried::OwnCopy => HomeCopy::Mapped,
                        _ => {
                            return Err(DsmError::Protocol(format!(
                                "store of page {page} without a write-back"
                            )))
                        }
                    };
                    self.pages_since_memory_check += 1;
                    if let Some(HomeCopy::Bytes(old)) = self.backing.insert(page, copy) {
                        self.recycle(old);
                    }
                }
                Action::GrantFromBacking { to, page, write } => {
                    Stats::add(&self.stats.grants_served, 1);
                    if !write && to != self.rank && self.home_copy_is_mapped(page) {
                        self.out.send_read_grant(to, page, PageSource::Mapped);
                        Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                        self.stats.page_sent(to);
                        continue;
                    }
                    let data = self.home_copy_bytes(page);
                    if write {
                        // A writer's copy supersedes the home's: hand it over.
                        self.backing.remove(page);
                    }
                    if to == self.rank {
                        // The home's own write: once handled, nobody else
                        // holds these bytes, and the buffer serves again.
                        let spare = data.clone();
                        let payload = data.map(Payload::Data).unwrap_or(Payload::Zero);
                        let msg = Msg::Grant {
                            page: page as u64,
                            write,
                            payload,
                        };
                        self.handle(to, msg, 0)?;
                        if let Some(buffer) = spare {
                            self.recycle(buffer);
                        }
                        continue;
                    }
                    match data {
                        Some(data) if !write => {
                            self.out.send_read_grant(to, page, PageSource::Bytes(data));
                            Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                        }
                        Some(data) => {
                            self.out
                                .send_page(to, Msg::grant_data_header(page, write), page, data);
                            Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                        }
                        None => {
                            let msg = Msg::Grant {
                                page: page as u64,
                                write,
                                payload: Payload::Zero,
                            };
                            self.out.send(to, msg.header());
                        }
                    }
                    self.stats.page_sent(to);
                }
                Action::Wake { page } => self.faults.wake(page)?,
                Action::SealedWrite { page } => {
                    let segment = self.registry.find(page).map(|s| s.id).unwrap_or(0);
                    return Err(DsmError::SealedWrite {
                        segment,
                        addr: self.base + page * PAGE_SIZE,
                    });
                }
                Action::Settled { page } => self.settled(page)?,
            }
        }
        Ok(())
    }
}

/// A page holding `bytes`, in a spare buffer when there is one.
fn filled_page(spares: &mut Vec<PageData>, bytes: &[u8]) -> PageData {
    if bytes.len() == PAGE_SIZE {
        if let Some(mut page) = spares.pop() {
            // Spares are unreferenced (`recycle`), so this always succeeds.
            if let Some(buffer) = Arc::get_mut(&mut page) {
                buffer.copy_from_slice(bytes);
                return page;
            }
        }
    }
    proto::page_from(bytes)
}

/// The page bytes carried by `current` (zeros for a zero grant).
fn carried_page<'a>(
    current: Carried<'a>,
    zero_page: &'a [u8; PAGE_SIZE],
    page: usize,
) -> Result<&'a [u8; PAGE_SIZE], DsmError> {
    match current {
        Carried::Msg(Msg::PageGrant { data, .. }) => Ok(data.as_deref().unwrap_or(zero_page)),
        Carried::Msg(Msg::Grant {
            payload: Payload::Data(data),
            ..
        }) => Ok(data),
        Carried::Msg(Msg::Grant {
            payload: Payload::Zero,
            ..
        }) => Ok(zero_page),
        _ => Err(DsmError::Protocol(format!(
            "install of page {page} without a grant"
        ))),
    }
}

/// The engine's state, shared by the engine thread and the fault thread.
/// A poisoned lock means a handler panicked; the process is about to end.
pub(crate) fn lock(engine: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    engine.lock().unwrap_or_else(|p| p.into_inner())
}

/// The send turn (`Engine::send_turn`), taken under the engine's lock.
fn take_turn(turn: &Mutex<()>) -> MutexGuard<'_, ()> {
    turn.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `work` (a fault, an API call) on the engine's state in the calling
/// thread, then flushes its messages. A timer the work set is announced to
/// the engine thread, whose wait was computed without it.
pub(crate) fn serve_here(
    engine: &Mutex<Engine>,
    events: &Sender<Input>,
    work: impl FnOnce(&mut Engine) -> Result<(), DsmError>,
) -> Result<(), DsmError> {
    let timer_set = {
        let mut this = lock(engine);
        let before = this.next_deadline();
        let free_stalled_before = this.free_stalled();
        work(&mut this)?;
        let evict_behind = this.bound_memory()?;
        let after = this.next_deadline();
        // A free left waiting on this rank's requests needs the engine
        // thread to look again (`FREE_POLL`), which it may be asleep for.
        let free_stalled = this.free_stalled() && !free_stalled_before;
        let timer_set = evict_behind || free_stalled || (after.is_some() && after != before);
        // With nothing to send, nothing is: a message a receive thread left
        // part-written is the engine thread's to finish (woken for it).
        if !this.out.is_empty() {
            send_queued(engine, this)?;
        }
        timer_set
    };
    if timer_set {
        events.send(Input::Wake).map_err(|_| DsmError::Stopped)?;
    }
    Ok(())
}

/// Sends the outbox from a thread that may wait (a faulting thread, an
/// API call), holding the engine's lock on entry. The turn is taken under
/// that lock, so what is queued now leaves before what is queued after;
/// requests then leave without the lock, as a send can take long (loopback
/// delivery, preemption) and receive threads landing pages need the lock
/// meanwhile. What other threads queue during the send (they find the turn
/// taken) goes out next in one batch, until nothing is left: the turn is let
/// go under the engine's lock, with the outbox empty (see `send_turn`).
fn send_queued<'a>(
    engine: &'a Mutex<Engine>,
    mut this: MutexGuard<'a, Engine>,
) -> Result<(), DsmError> {
    let turn = Arc::clone(&this.send_turn);
    let Ok(held) = turn.try_lock() else {
        return Ok(()); // the holder sends it
    };
    while !this.out.is_empty() {
        let Some(mut output) = this.detach_output() else {
            // Grants read from the mapping: sent under the engine's lock.
            this.flush_in_turn()?;
            break;
        };
        let (transport, faults, stats) = (
            Arc::clone(&this.transport),
            Arc::clone(&this.faults),
            Arc::clone(&this.stats),
        );
        drop(this);
        transport.finish_sends()?;
        output.flush(&*transport, &faults)?;
        Stats::add(&stats.batches_sent, output.batches);
        this = lock(engine);
    }
    drop(held);
    drop(this);
    Ok(())
}

/// The engine's handler for messages in the transport's receive threads
/// ([`Transport::deliver_inline`]): a message is handled there when the
/// engine's lock is free and nothing received earlier is still queued
/// (order per sender is kept: a sender's earlier message was either handled
/// the same way or is still in the queue). A grant is then installed, and
/// its faulting thread woken, with no hand-off to the engine thread. What
/// the handling produces leaves from there only if the transport takes it
/// without waiting (a receive thread blocked sending could deadlock two
/// ranks); the engine thread is woken to send the rest. Otherwise the
/// message is queued as usual.
pub(crate) fn inline_delivery(
    engine: Weak<Mutex<Engine>>,
    inbox: Receiver<Incoming>,
    events: Sender<Input>,
) -> InlineDelivery {
    Box::new(move |message: Message| {
        let Some(engine) = engine.upgrade() else {
            return Some(message);
        };
        let Ok(mut this) = engine.try_lock() else {
            return Some(message);
        };
        if !this.serving || !inbox.is_empty() {
            return Some(message);
        }
        let before = this.next_deadline();
        let free_stalled_before = this.free_stalled();
        let from = message.from;
        this.sends_deferred = true;
        // A panic here would otherwise end this receive thread silently,
        // with sends left deferred: the job is ended instead.
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let handled = this.on_message(message).and_then(|()| this.bound_memory());
            this.sends_deferred = false;
            // What it produced leaves from here if the transport takes it
            // at once (no hand-off to the engine thread on the way of a
            // fault); the rest is left to the engine thread.
            handled.and_then(|evict_behind| Ok(this.try_flush()? || evict_behind))
        }))
        .unwrap_or_else(|_| {
            Err(DsmError::Protocol(format!(
                "handling a message from rank {from} panicked"
            )))
        });
        this.sends_deferred = false;
        Stats::add(&this.stats.messages_inline, 1);
        let wake = !matches!(handled, Ok(false))
            || this.next_deadline() != before
            || (this.free_stalled() && !free_stalled_before);
        let handled = handled.map(|_| ());
        drop(this);
        match handled {
            Err(e) => {
                let _ = events.send(Input::Failed(e));
            }
            Ok(()) if wake => {
                let _ = events.send(Input::Wake);
            }
            Ok(()) => {}
        }
        None
    })
}

/// Lets the transport's receive threads land runs of read grants straight
/// in their pages' frames ([`Transport::place_payloads`]), when the engine
/// is free to check that this rank waits for exactly those grants
/// (`Engine::land_read_grant_run`). It never waits for the engine: a
/// receive thread blocked on it could deadlock two ranks, as for
/// [`inline_delivery`].
pub(crate) fn payload_placement(
    engine: Weak<Mutex<Engine>>,
    events: Sender<Input>,
) -> PayloadPlacement {
    PayloadPlacement {
        head_len: proto::READ_GRANT_RUN_HEAD,
        place: Box::new(move |from, head, len| {
            let (first, count) = proto::read_grant_run_head(head, len)?;
            let engine = engine.upgrade()?;
            let mut this = engine.try_lock().ok()?;
            // As in `inline_delivery`: a panic ends the job, not silently
            // this receive thread.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                this.land_read_grant_run(from, first, count)
            }))
            .unwrap_or_else(|_| {
                let _ = events.send(Input::Failed(DsmError::Protocol(format!(
                    "placing a run of pages from rank {from} panicked"
                ))));
                None
            })
        }),
    }
}

/// How long a thread parked in the SIGBUS handler sleeps before it retries
/// its access anyway (an install it was not woken for: a page of another
/// bucket, say); the retry faults again if the page is still missing.
const SIGNAL_WAIT: Duration = Duration::from_millis(50);

/// The fault path run in the faulting thread's SIGBUS handler
/// (`DSM_FAULTS=sigbus`): serves the fault on the engine's state (a page
/// homed here is installed at once; otherwise the request leaves from this
/// thread), then sleeps until a page of its bucket is installed. Errors go
/// to the engine thread, which ends the job; this thread then waits for
/// that end rather than retrying an access that can no longer be served.
pub(crate) fn signal_fault_server(
    engine: Arc<Mutex<Engine>>,
    faults: Arc<FaultHandler>,
    events: Sender<Input>,
    spin: Duration,
    waiting: Arc<Waiting>,
) -> crate::sigbus::Server {
    Box::new(move |page, write| {
        let Some(waiters) = faults.waiters() else {
            return;
        };
        // Registered for hang reports: a thread still waiting for its page
        // re-enters here at each retry, so the wait stays on record.
        waiting.enter(WaitFor::Page { page, write });
        let ticket = waiters.prepare(page);
        let fault = Fault {
            page,
            write,
            write_protect: false,
        };
        let served = serve_here(&engine, &events, |this| this.on_fault(fault));
        if let Err(e) = served {
            let _ = events.send(Input::Failed(e));
            loop {
                std::thread::park();
            }
        }
        // Timed out or not, the access is retried (and faults again if the
        // page is still missing). A wait an install ended is over: a thread
        // faulting again later on a busy page starts a new one.
        if waiters.wait(ticket, spin, SIGNAL_WAIT) {
            waiting.leave();
        } else {
            waiting.pause();
        }
    })
}

/// The fault thread: reads fault events until `stop` becomes readable (or
/// is closed) and serves each at once, on the engine's state, so a fault
/// needs no hand-off to the engine thread (on this kind of machine a thread
/// wake-up costs more than the fault itself). Errors go to the engine
/// thread, which ends the job.
pub(crate) fn read_faults(
    engine: Arc<Mutex<Engine>>,
    faults: Arc<FaultHandler>,
    stop: OwnedFd,
    events: Sender<Input>,
    spin: Duration,
) {
    let serve = |fault: Fault| serve_here(&engine, &events, |this| this.on_fault(fault));
    loop {
        // Poll the userfaultfd for a while first (DSM_SPIN_US): a fault
        // found this way costs no wake-up of this thread.
        let until = Instant::now() + spin;
        while !spin.is_zero() && Instant::now() < until {
            match faults.next_fault() {
                Ok(Some(fault)) => {
                    if let Err(e) = serve(fault) {
                        let _ = events.send(Input::Failed(e));
                        return;
                    }
                }
                Ok(None) => std::hint::spin_loop(),
                Err(e) => {
                    let _ = events.send(Input::Failed(e.into()));
                    return;
                }
            }
        }
        let mut fds = [
            PollFd::new(faults.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                let _ = events.send(Input::Failed(DsmError::FaultReader(format!("poll: {e}"))));
                return;
            }
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return;
        }
        loop {
            match faults.next_fault() {
                Ok(Some(fault)) => {
                    if let Err(e) = serve(fault) {
                        let _ = events.send(Input::Failed(e));
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = events.send(Input::Failed(e.into()));
                    return;
                }
            }
        }
    }
}

/// `1, 4, 7`: ranks for a report line.
fn list<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::Stream;

    #[test]
    fn a_sequential_stream_is_read_ahead_in_growing_windows() {
        let mut s = Stream {
            max_depth: 16,
            ..Stream::default()
        };
        assert!(
            s.on_read_fault(10).is_empty(),
            "a first fault is not a stream"
        );
        for p in 11..14 {
            assert!(
                s.on_read_fault(p).is_empty(),
                "four faults in a row are not yet a stream"
            );
        }
        assert_eq!(s.on_read_fault(14), 15..16, "window 1");
        assert_eq!(
            s.on_read_fault(15),
            16..18,
            "nothing requested twice, window 2"
        );
        assert_eq!(s.on_read_fault(16), 18..21, "window 4");
        assert_eq!(s.on_read_fault(17), 21..26, "window 8");
        assert_eq!(s.on_read_fault(18), 26..35, "window 16");
        assert_eq!(s.on_read_fault(19), 35..36, "capped at 16 ahead");
        assert_eq!(
            s.on_read_fault(27),
            36..44,
            "a fault inside the window requested ahead continues the stream"
        );
        assert!(s.on_read_fault(100).is_empty(), "a jump ends the stream");
        // Pages 101..117 asked back with the fault on 100: the fault just
        // after them is the stream's second, and the fifth starts a window.
        s.requested(117);
        for p in 117..120 {
            assert!(s.on_read_fault(p).is_empty());
        }
        assert_eq!(s.on_read_fault(120), 121..122, "window 1");
        let mut off = Stream::default();
        for p in 0..10 {
            assert!(
                off.on_read_fault(p).is_empty(),
                "depth 0 turns prefetch off"
            );
        }
    }
}
