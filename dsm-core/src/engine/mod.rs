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
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender, TryRecvError};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::coherence::release::Release;
use crate::coherence::twin::Twin;
use crate::coherence::{Migratory, Mrsw, ProtocolCounters};
use crate::config::PAGE_SIZE;
use crate::error::DsmError;
use crate::fault::FaultHandler;
use crate::outbox::Outbox;
use crate::pages::{PageMap, PageSet};
use crate::proto::{Msg, PageData, PageDiffs, SegmentInfo};
use crate::segment::{kind_name, Registry};
use crate::stats::Stats;
use crate::sync::{BarrierCounter, LockTable};
use crate::transport::Incoming;
use crate::{Rank, Transport};

mod direct;
mod free;
mod intake;
mod landing;
mod memory;
mod protocol;
mod push;
mod readahead;
mod report;
mod segments;
mod send;
mod sync;

use landing::{Landed, StagedRun};
use memory::Cache;
use protocol::{Carried, HomeCopy};
use readahead::Stream;
use segments::{Parked, PendingCoAlloc, Settling};
use send::take_turn;

pub(crate) use intake::{
    inline_delivery, payload_placement, read_faults, serve_here, signal_fault_server,
};

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
/// (Pages of the release-consistent protocol have their own state
/// machine beside it, `Engine::release`, see [`RcPages`].)
pub(crate) enum Node {
    Migratory(Migratory),
    Mrsw(Mrsw),
}

impl Node {
    fn counters(&self) -> ProtocolCounters {
        match self {
            Node::Migratory(n) => n.counters,
            Node::Mrsw(n) => n.counters,
        }
    }
}

/// Which pages run the release-consistent protocol (`Engine::release`)
/// rather than the job's sequentially consistent one (`Engine::node`):
/// every page of a job started with `DSM_PROTOCOL=release`, except the
/// segments allocated sequentially consistent, and in other jobs only the
/// segments allocated release-consistent. Every rank registers the same
/// segments, so every rank sorts a page the same way.
pub(crate) struct RcPages {
    /// The protocol of the fixed space and of raw heap chunks.
    default: bool,
    /// Pages of segments that chose the other protocol.
    flipped: PageSet,
}

impl RcPages {
    pub(crate) fn new(pages: usize, default: bool) -> RcPages {
        RcPages {
            default,
            flipped: PageSet::new(pages),
        }
    }

    /// True when `page` is release-consistent.
    pub(crate) fn contains(&self, page: usize) -> bool {
        self.default != self.flipped.contains(page)
    }

    /// The pages of a segment registered (`release`: release-consistent)
    /// or forgotten (`None`: back to the default).
    fn set(&mut self, pages: std::ops::Range<usize>, release: Option<bool>) {
        for page in pages {
            if release.unwrap_or(self.default) != self.default {
                self.flipped.insert(page);
            } else {
                self.flipped.remove(page);
            }
        }
    }
}

pub(crate) struct Engine {
    pub rank: Rank,
    pub size: usize,
    /// Address of the shared space (for messages naming addresses).
    pub base: usize,
    pub transport: Arc<dyn Transport>,
    pub faults: Arc<FaultHandler>,
    pub node: Node,
    /// The release-consistent protocol's state, for the pages `rc` names.
    pub release: Release,
    pub rc: RcPages,
    pub stats: Arc<Stats>,
    /// Origin of the multi-reader protocol's clock.
    started: Instant,
    /// The home's copy of pages no writer holds (multi-reader protocol);
    /// a page absent here is all zeros.
    backing: PageMap<HomeCopy>,
    fetch_started: FxHashMap<usize, Instant>,
    barrier_epoch: u64,
    barrier_waiter: Option<Reply<()>>,
    /// Rank 0: arrivals per barrier, with the diffs and the pages written
    /// under locks each entry carried.
    barrier_arrivals: BarrierCounter<(PageDiffs, Vec<u64>)>,
    registry: Registry,
    /// Events per looked-up page, in arrival order.
    parked: BTreeMap<usize, Vec<Parked>>,
    next_ticket: u64,
    /// This rank's lock requests not granted yet, by ticket: the lock and
    /// the caller to answer.
    lock_waiters: HashMap<u64, (u64, Reply<u64>)>,
    /// Lock grants (barriers their releasers had passed, ticket) waiting
    /// for those barriers' diffs to be in here (`sync.rs`).
    grants_awaiting_diffs: Vec<(u64, u64)>,
    /// Locks this rank's threads hold (granted, their unlock's release not
    /// done): a barrier entry meanwhile sends its copies' diffs to their
    /// homes, acknowledged (`ReleaseFor::BarrierUnderLock`).
    locks_held: usize,
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
    /// Readers of pages homed here that get them pushed at barriers.
    consumers: push::Consumers,
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
    /// Messages this rank sent itself (a barrier entry at rank 0, a lock
    /// homed here), handled under the lock where they were produced instead
    /// of looping through the transport to the engine thread.
    own_messages: std::collections::VecDeque<Vec<u8>>,
    /// True while `own_messages` is being handled (what that handling sends
    /// itself joins the queue's end).
    handling_own: bool,
    /// Held by whoever sends the outbox's messages, taken under the
    /// engine's lock and never waited for there: messages leave in the
    /// order they were produced, also when a thread sends them after
    /// letting go of the engine's lock (`send::send_queued`). A thread that
    /// finds the turn taken leaves its messages queued and says so
    /// (`output_left`); the only holder without the engine's lock is such a
    /// sender, which, once it lets the turn go, takes the lock again to send
    /// them if it was told (faults of several threads share batches).
    send_turn: Arc<Mutex<()>>,
    /// Set by a thread that left its output to the holder of the send
    /// turn (`send::claim_turn`), read by that holder once it lets go.
    output_left: Arc<AtomicBool>,
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
    /// Release consistency: the twins of this rank's dirty copies and
    /// twinned master copies.
    twins: FxHashMap<usize, Twin>,
    /// Release consistency: the diffs collected for this rank's next
    /// barrier entry, in page order.
    barrier_updates: PageDiffs,
    /// Twins done with, kept for the next write faults (`SPARE_TWINS`).
    spare_twins: Vec<Twin>,
    /// Release consistency: synchronizations waiting for a release, in
    /// order (`sync.rs`); the first one's release is under way.
    after_release: VecDeque<sync::AfterRelease>,
    /// Direct reads between co-located ranks (`direct.rs`).
    direct: direct::Direct,
}

/// How often the engine thread looks again at a collective free waiting
/// on this rank's own requests or transactions (answers handled in a
/// receive thread do not wake it).
const FREE_POLL: Duration = Duration::from_millis(1);

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
        | Msg::Denied { page }
        | Msg::Diff { page, .. }
        | Msg::DiffAck { page }
        | Msg::CopyReq { page, .. } => Some(*page as usize),
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
        release_by_default: bool,
        stats: Arc<Stats>,
    ) -> Engine {
        Engine {
            rank,
            size,
            base,
            transport,
            faults,
            node,
            release: Release::new(rank, size, pages),
            rc: RcPages::new(pages, release_by_default),
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
            grants_awaiting_diffs: Vec::new(),
            locks_held: 0,
            locks: LockTable::default(),
            alloc_waiters: HashMap::new(),
            coalloc_epoch: 0,
            coallocs: BTreeMap::new(),
            finds: BTreeMap::new(),
            free_epoch: 0,
            frees: BTreeMap::new(),
            consumers: push::Consumers::default(),
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
            own_messages: Default::default(),
            handling_own: false,
            send_turn: Arc::default(),
            output_left: Arc::default(),
            serving: true,
            landing: VecDeque::new(),
            landing_tokens: std::collections::hash_map::RandomState::new(),
            landings_made: 0,
            cache: Cache::new(pages),
            pages_since_memory_check: 0,
            twins: FxHashMap::default(),
            barrier_updates: Vec::new(),
            spare_twins: Vec::new(),
            after_release: VecDeque::new(),
            direct: direct::Direct::new(size, pages),
        }
    }

    /// Bounds the pages this rank holds from other homes (multi-reader
    /// protocol): `usize::MAX` for no bound.
    pub fn with_cache_limit(mut self, pages: usize) -> Engine {
        self.cache.bound(pages);
        self
    }

    /// Requests up to `depth` pages ahead of sequential read streams.
    pub fn with_prefetch(mut self, depth: usize) -> Engine {
        self.stream.max_depth = depth;
        self
    }

    /// Pushes a page to a reader that asked for it again after losing it
    /// to a write, at each barrier entry after the page is written again,
    /// up to `limit` times without a request of its own (0: off).
    pub fn with_push(mut self, limit: u32) -> Engine {
        self.consumers.limit = limit;
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
                if this.reading_directly() {
                    this = Engine::wait_for_direct_reads(this);
                }
                // What has arrived is handled before the replies leave, so
                // they leave together (bounded: the fault thread waits for
                // the lock meanwhile). Not during a direct read.
                let drain = if this.reading_directly() {
                    0
                } else {
                    DRAIN_AT_ONCE
                };
                for _ in 0..drain {
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

    pub(crate) fn on_input(&mut self, input: Input) -> Result<(), DsmError> {
        match input {
            Input::Failed(e) => Err(e),
            Input::Wake => Ok(()),
            Input::Barrier(reply) => self.synchronize(sync::AfterRelease::Barrier(reply)),
            Input::Lock { lock, reply } => {
                self.synchronize(sync::AfterRelease::Lock { lock, reply })
            }
            Input::Unlock { lock, ticket } => {
                self.synchronize(sync::AfterRelease::Unlock { lock, ticket })
            }
            Input::Alloc {
                pages,
                kind,
                rank,
                contents,
                reply,
            } => {
                self.ask_rank0_for_segment(reply, contents, kind, |ticket| Msg::AllocReq {
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
                if self.ask_rank0_for_segment(reply, None, kind, |ticket| Msg::CoAllocReq {
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

    /// The page's home, under the protocols that have homes.
    fn home_of(&self, page: usize) -> Option<Rank> {
        if self.rc.contains(page) {
            return Some(self.release.home_of(page));
        }
        match &self.node {
            Node::Migratory(_) => None,
            Node::Mrsw(n) => Some(n.home_of(page)),
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
}

/// The engine's state, shared by the engine thread and the fault thread.
/// A poisoned lock means a handler panicked; the process is about to end.
pub(crate) fn lock(engine: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    engine.lock().unwrap_or_else(|p| p.into_inner())
}
