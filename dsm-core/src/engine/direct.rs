//! Direct reads between co-located ranks (`crate::board`): this rank's
//! board as the home of its pages (retracted before every step of the
//! protocol on a page, published again after it when the page's own copy
//! is mapped read-only and current, or writable and this rank's alone),
//! and the boards and frames of the co-located homes, from which a read
//! fault copies a published page with no message.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Condvar, MutexGuard};
use std::time::Duration;

use super::landing::RunOp;
use super::protocol::Carried;
use super::{Engine, HomeCopy, Node};
use crate::board::{self, OwnBoard, PeerFrames};
use crate::coherence::mrsw::Copy;
use crate::config::PAGE_SIZE;
use crate::error::DsmError;
use crate::fault::{FaultError, FaultHandler};
use crate::pages::PageSet;
use crate::proto::Msg;
use crate::stats::Stats;
use crate::Rank;

pub(super) struct Direct {
    /// This rank's board, if some co-located rank may read its pages.
    own: Option<OwnBoard>,
    /// This rank reads co-located homes' pages directly (it set up its
    /// own board: `DSM_DIRECT_READS`): their offers are taken.
    accept_offers: bool,
    /// Pages published on it (retracting any other costs nothing).
    published: PageSet,
    /// The co-located readers of this rank's board, by their bit.
    readers: Vec<Rank>,
    /// The co-located homes' boards and frames, by rank (shared with the
    /// direct reads under way).
    peers: Vec<Option<Arc<PeerFrames>>>,
    /// Direct reads planned and not ended yet: while there is one, this
    /// rank handles no message (see [`DirectRead`]).
    reading: usize,
    /// The engine thread waits for the direct reads under way to end, to
    /// handle messages: faults read directly under the lock meanwhile.
    messages_wait: bool,
    /// Signalled when the last direct read under way ends and
    /// `messages_wait` is set.
    ended: Arc<Condvar>,
    /// Buffers of ended direct reads, kept to spare allocations per fault.
    spare: Vec<Scratch>,
    /// `board::monotonic_ns` at the protocol clock's origin (`Engine::now`):
    /// a hold's end on the board is in the host's clock.
    epoch: u64,
    /// Pages to publish writable once the staged run that makes them
    /// writable here is done (`Engine::run_staged`), with the least hold
    /// they are published with.
    after_staged: Vec<(usize, u64)>,
}

/// Most pages one fault copies directly (a sequential stream's run):
/// 256 KiB.
pub(super) const DIRECT_RUN_MAX: usize = 64;

/// Longest the engine thread waits, at a time, for the direct reads under
/// way to end before it handles messages (a faulting thread descheduled in
/// the middle of one); it then looks at its other inputs (a failure, a
/// stop) and comes back.
const DIRECT_READS_WAIT: Duration = Duration::from_millis(10);

/// A direct read of a run of pages from a co-located home's frames, in
/// three steps so that faults on different pages copy at once: planned
/// under the engine's lock (`Engine::plan_direct_read`: the pages marked as
/// asked for, so other threads' faults on them wait, read-ahead passes them
/// by), carried out without it by the faulting thread
/// ([`DirectRead::carry_out`]: joined, copied, checked, mapped), and ended
/// under it again (`Engine::end_direct_read`: the copies taken). Between the
/// first step and the last this rank handles no message (`Direct::
/// reading`): as the model checker has it, a rank's direct read is one
/// step to the protocol, and no command of the home about a copy it
/// counted is acknowledged before the copy is recorded.
pub(super) struct DirectRead {
    frames: Arc<PeerFrames>,
    first: usize,
    /// Pages marked from `first`, each seen published (`Scratch::looks`).
    marked: usize,
    scratch: Scratch,
    /// Reading the home's frames failed (nothing mapped then).
    copy_error: Option<std::io::Error>,
    /// Mapping the pages that held failed (fatal).
    mapped: Result<(), FaultError>,
}

/// What a direct read saw of its run's words, the words it joined, which
/// of them held through the copy, and the pages copied.
#[derive(Default)]
pub(super) struct Scratch {
    looks: Vec<board::Look>,
    joined: Vec<u64>,
    held: Vec<bool>,
    copy: Vec<u8>,
}

impl Scratch {
    fn clear(&mut self) {
        self.looks.clear();
        self.joined.clear();
        self.held.clear();
    }
}

impl DirectRead {
    /// The second step, in the faulting thread without the engine's lock,
    /// on the marked pages (each looked at when marked): the pages the home
    /// holds writable write-protected in its mapping, a span of them at a
    /// time (one TLB shootdown a span); joined in order up to the first
    /// that fails; copied; then every page whose publication held through
    /// the copy is mapped (before the engine records it: no message from
    /// another rank is handled meanwhile, so the home waits for this rank
    /// before any store to it).
    pub(super) fn carry_out(&mut self, faults: &FaultHandler) {
        let (frames, first) = (&self.frames, self.first);
        let Scratch {
            looks,
            joined,
            held,
            copy,
        } = &mut self.scratch;
        let mut at = 0;
        while at < looks.len() {
            let span = looks[at..]
                .iter()
                .take_while(|look| look.needs_protection())
                .count();
            if span > 0 && !frames.protect(first + at, span) {
                // A protection left behind is lifted by the home's next
                // store.
                looks.truncate(at);
                break;
            }
            at += span.max(1);
        }
        for (i, look) in looks.iter().enumerate() {
            match frames.join_looked(first + i, *look) {
                Some(word) => joined.push(word),
                None => break,
            }
        }
        if joined.is_empty() {
            return;
        }
        copy.resize(joined.len() * PAGE_SIZE, 0);
        let copied = frames.copy(first, copy);
        held.extend(
            joined
                .iter()
                .enumerate()
                .map(|(i, word)| copied.is_ok() && frames.finish(first + i, *word)),
        );
        self.copy_error = copied.err();
        let whole = held.iter().take_while(|ok| **ok).count();
        self.mapped = (|| {
            if whole > 0 {
                faults.install_readonly_run(first, &copy[..whole * PAGE_SIZE])?;
            }
            for (i, _) in held.iter().enumerate().skip(whole).filter(|(_, ok)| **ok) {
                let at = i * PAGE_SIZE;
                faults.install_readonly_run(first + i, &copy[at..at + PAGE_SIZE])?;
            }
            Ok(())
        })();
    }
}

impl Direct {
    pub(super) fn new(size: usize, pages: usize) -> Direct {
        Direct {
            own: None,
            accept_offers: false,
            published: PageSet::new(pages),
            readers: Vec::new(),
            peers: (0..size).map(|_| None).collect(),
            reading: 0,
            messages_wait: false,
            ended: Arc::new(Condvar::new()),
            spare: Vec::new(),
            epoch: 0,
            after_staged: Vec::new(),
        }
    }
}

impl Engine {
    /// Creates this rank's board and offers it, with the space's memfd
    /// (`space`), to every rank that shares memory with it (at most
    /// `board::word::MAX_READERS`), and takes their offers. Sequentially
    /// consistent protocol only; without such a rank, or if the board
    /// cannot be made (logged), this rank's pages are only ever asked for.
    pub(crate) fn share_frames(&mut self, space: BorrowedFd<'_>) -> Result<(), DsmError> {
        let Node::Mrsw(node) = &self.node else {
            return Ok(());
        };
        self.direct.accept_offers = true;
        let pages = node.pages();
        let readers: Vec<Rank> = (0..self.size)
            .filter(|r| *r != self.rank && self.transport.shares_memory_with(*r))
            .take(board::word::MAX_READERS)
            .collect();
        if readers.is_empty() {
            return Ok(());
        }
        let (own, space_inode) = match (OwnBoard::create(pages), board::inode_of(&space)) {
            (Ok(own), Some(inode)) => (own, inode),
            (Err(e), _) => {
                tracing::warn!("rank {}: no direct reads of its pages: {e}", self.rank);
                return Ok(());
            }
            (_, None) => return Ok(()),
        };
        self.direct.epoch = board::monotonic_ns().saturating_sub(self.now());
        for (bit, &reader) in readers.iter().enumerate() {
            let offer = board::Offer {
                pid: std::process::id(),
                space_fd: space.as_raw_fd(),
                space_inode,
                board_fd: own.fd_number(),
                nonce: own.nonce(),
                pages: pages as u64,
                bit: bit as u8,
                faults_fd: self.faults.fd().as_raw_fd(),
                base: self.faults.base() as u64,
            };
            self.transport
                .send(reader, &Msg::ShareFrames(offer).encode())?;
        }
        self.direct.own = Some(own);
        self.direct.readers = readers;
        Ok(())
    }

    /// A co-located home offered its board and frames: opened, or left
    /// (logged) if this process may not or the offer does not hold, or
    /// this rank reads nothing directly (`DSM_DIRECT_READS=off`).
    pub(super) fn on_share_frames(&mut self, from: Rank, offer: &board::Offer) {
        let pages = match &self.node {
            Node::Mrsw(node) if self.direct.accept_offers => node.pages(),
            _ => return,
        };
        let Some(slot) = self.direct.peers.get_mut(from) else {
            return;
        };
        if offer.pages != pages as u64 {
            tracing::warn!(
                "rank {}: asking rank {from} for its pages: its board covers {} pages, the space {pages}",
                self.rank,
                offer.pages
            );
            return;
        }
        match PeerFrames::open(from, offer) {
            Ok(frames) => {
                tracing::debug!("rank {}: reads rank {from}'s pages directly", self.rank);
                *slot = Some(Arc::new(frames));
            }
            Err(e) => tracing::warn!(
                "rank {}: asking rank {from} for its pages (no direct reads): {e}",
                self.rank
            ),
        }
    }

    /// A read fault on `page` whose home is co-located: plans a direct read
    /// of it and of the pages after it that may be read the same way, up
    /// to `run` pages in all (one copy and one mapping call for the run),
    /// each marked as asked for (`Mrsw::begin_direct_read`). `None`: the
    /// page is to be asked for. Carried out by [`DirectRead::carry_out`],
    /// ended by [`Engine::end_direct_read`].
    pub(super) fn plan_direct_read(
        &mut self,
        page: usize,
        run: usize,
    ) -> Result<Option<DirectRead>, DsmError> {
        let co_located = self
            .home_of(page)
            .is_some_and(|home| matches!(self.direct.peers.get(home), Some(Some(_))));
        if !co_located {
            return Ok(None);
        }
        // A fault replayed inside a batch: a drop staged for a page of the
        // run must happen before the run is mapped.
        self.run_staged()?;
        let Node::Mrsw(node) = &mut self.node else {
            return Ok(None);
        };
        let home = node.home_of(page);
        let Some(Some(frames)) = self.direct.peers.get(home) else {
            return Ok(None);
        };
        // Looked at in order, up to the first page that may not be read
        // directly: of another home or segment, held or asked for here,
        // not published (or held by the home).
        let mut scratch = self.direct.spare.pop().unwrap_or_default();
        scratch.clear();
        let clock = board::monotonic_ns();
        for p in page..(page + run.clamp(1, DIRECT_RUN_MAX)).min(node.pages()) {
            let known = p == page || !self.registry.in_heap(p) || self.registry.find(p).is_some();
            if !known
                || self.rc.contains(p)
                || node.home_of(p) != home
                || !node.may_read_directly(p)
            {
                break;
            }
            match frames.look(p, clock) {
                Some(look) => scratch.looks.push(look),
                None => break,
            }
            node.begin_direct_read(p)?;
        }
        let marked = scratch.looks.len();
        if marked == 0 {
            self.direct.spare.push(scratch);
            return Ok(None);
        }
        self.direct.reading += 1;
        Ok(Some(DirectRead {
            frames: Arc::clone(frames),
            first: page,
            marked,
            scratch,
            copy_error: None,
            mapped: Ok(()),
        }))
    }

    /// The end of a direct read, under the engine's lock: the pages whose
    /// publication held through the copy are this rank's read-only copies;
    /// the others it joined were counted by the home meanwhile and are
    /// given up as evictions; the rest of the run is as before. Threads
    /// that waited on a page of the run are woken. `Some(end)`: the fault
    /// is served, pages up to `end` were looked at.
    pub(super) fn end_direct_read(&mut self, read: DirectRead) -> Result<Option<usize>, DsmError> {
        self.direct.reading -= 1;
        if self.direct.reading == 0 && self.direct.messages_wait {
            // Also after the engine thread's wait timed out: reads may let
            // the lock go again.
            self.direct.messages_wait = false;
            self.direct.ended.notify_all();
        }
        let DirectRead {
            frames,
            first,
            marked,
            scratch,
            copy_error,
            mapped,
        } = read;
        drop(frames);
        let now = self.now();
        let Node::Mrsw(node) = &mut self.node else {
            return Err(DsmError::Protocol(
                "a direct read under another protocol".into(),
            ));
        };
        let held = &scratch.held;
        let end = first + held.len();
        if let Some(e) = copy_error {
            let home = node.home_of(first);
            tracing::warn!(
                "rank {}: reading rank {home}'s pages {first}..{end}: {e}",
                self.rank
            );
        }
        let mut given_up = Vec::new();
        for (i, &ok) in held.iter().enumerate() {
            if ok {
                node.took_direct_copy(first + i, now)?;
            } else {
                given_up.extend(node.direct_read_failed(first + i, now)?);
            }
        }
        for p in end..first + marked {
            node.direct_read_skipped(p)?;
        }
        if let Some(waiters) = self.faults.waiters() {
            waiters.woken_run(first, marked);
        }
        mapped?;
        let installed = held.iter().filter(|ok| **ok).count();
        let protected = (held.iter().zip(&scratch.joined))
            .filter(|(ok, word)| **ok && board::word::writable(**word))
            .count();
        Stats::add(&self.stats.direct_reads_protected, protected as u64);
        self.pages_since_memory_check += installed;
        for (i, _) in held.iter().enumerate().filter(|(_, ok)| **ok) {
            self.cache.installed(first + i);
        }
        let served = held.first().copied().unwrap_or(false);
        self.direct.spare.push(scratch);
        Stats::add(&self.stats.direct_reads, installed as u64);
        if installed > 0 {
            Stats::raise(
                &self.stats.peak_cached_bytes,
                (self.cached() * PAGE_SIZE) as u64,
            );
        }
        if !given_up.is_empty() {
            Stats::add(&self.stats.direct_reads_given_up, given_up.len() as u64);
            self.apply(given_up, Carried::Nothing)?;
        }
        Ok(served.then_some(end))
    }

    /// True while direct reads are under way: this rank handles no message
    /// (a receive thread leaves it to the engine thread, which waits for
    /// them to end).
    pub(super) fn reading_directly(&self) -> bool {
        self.direct.reading > 0
    }

    /// How many direct reads are under way (for hang reports).
    pub(super) fn direct_reads_under_way(&self) -> usize {
        self.direct.reading
    }

    /// True when a fault's direct read may run without the engine's lock:
    /// the engine thread does not wait to handle messages.
    pub(super) fn direct_read_may_unlock(&self) -> bool {
        !self.direct.messages_wait
    }

    /// The engine thread, with messages to handle while direct reads are
    /// under way: waits for them to end, at most `DIRECT_READS_WAIT` (it
    /// then looks at its other inputs and comes back); meanwhile faults
    /// read directly under the lock, so the wait ends.
    pub(super) fn wait_for_direct_reads(this: MutexGuard<'_, Engine>) -> MutexGuard<'_, Engine> {
        let ended = Arc::clone(&this.direct.ended);
        // Set again at each look: the last read's end clears it, and a read
        // may begin without the lock before this thread has it back.
        let waits = |this: &mut Engine| {
            this.direct.messages_wait = this.reading_directly();
            this.direct.messages_wait
        };
        let (this, _) = ended
            .wait_timeout_while(this, DIRECT_READS_WAIT, waits)
            .unwrap_or_else(|p| p.into_inner());
        this
    }

    /// True when this rank's copy of `page` was copied directly and its
    /// home has not counted it yet: it takes its joiner bit back, and the
    /// copy may then go with no notice (`Mrsw::evict_unseen`). Call only
    /// when about to evict the copy.
    pub(super) fn unseen_direct_copy(&self, page: usize) -> bool {
        let Node::Mrsw(node) = &self.node else {
            return false;
        };
        match self.direct.peers.get(node.home_of(page)) {
            Some(Some(frames)) => node.copy_of(page) == Some(Copy::Shared) && frames.withdraw(page),
            _ => false,
        }
    }

    /// Before a step of the protocol on `page` at this rank: if it is
    /// homed here and published, co-located ranks stop reading it directly
    /// and those that did are counted among its readers. If this rank held
    /// it writable, they write-protected it: its mapping, read-only now, is
    /// the home's copy.
    pub(super) fn retract_direct(&mut self, page: usize) -> Result<(), DsmError> {
        let Some(own) = &self.direct.own else {
            return Ok(());
        };
        if !self.direct.published.remove(page) {
            return Ok(());
        }
        let joiners = own.retract(page);
        if joiners == 0 {
            return Ok(());
        }
        let ranks: Vec<Rank> = (0..self.direct.readers.len())
            .filter(|bit| joiners & (1 << bit) != 0)
            .map(|bit| self.direct.readers[bit])
            .collect();
        // A copy taken as a request would have asked: a reader that lost
        // the page before becomes its consumer, pushed to at barriers.
        for &reader in &ranks {
            self.consumers.asked(page, reader);
        }
        if let Node::Mrsw(node) = &mut self.node {
            if node.add_direct_readers(page, &ranks)? {
                // Read-only from now on: protected here too, whatever the
                // readers' protection became (a late reader's may have
                // been lifted), as a downgrade's own write-back does.
                if !self.protected_ahead.remove(page) {
                    self.faults.write_protect(page, 1)?;
                }
                self.backing.insert(page, HomeCopy::Mapped);
            }
        }
        Ok(())
    }

    /// A store of this rank faulted on `page`, which it holds writable: a
    /// co-located reader write-protected it (`board`). Retracted (the
    /// readers that joined are counted, and the page is read-only here
    /// now: false, the fault asks as a store on a read-only copy does), or
    /// made writable again when none joined (true: served).
    pub(super) fn lift_readers_protection(&mut self, page: usize) -> Result<bool, DsmError> {
        let rank = self.rank;
        let writable_here = |node: &Node| {
            matches!(node, Node::Mrsw(n)
                if n.home_of(page) == rank && n.copy_of(page) == Some(Copy::Modified))
        };
        if self.direct.own.is_none() || self.rc.contains(page) || !writable_here(&self.node) {
            return Ok(false);
        }
        self.retract_direct(page)?;
        if !writable_here(&self.node) || self.protected_ahead.contains(page) {
            // Read-only now, or protected ahead of a downgrade: the rest of
            // the fault's path lifts what it must.
            return Ok(false);
        }
        self.faults.make_writable(page)?;
        // Held anew: the thread whose store faulted gets to store before a
        // reader may protect the page again.
        let hold = match &self.node {
            Node::Mrsw(node) => self.now().saturating_add(node.min_hold()),
            Node::Migratory(_) => 0,
        };
        self.publish_direct_held(page, hold);
        Ok(true)
    }

    /// After a step of the protocol on `page`: published if it is homed
    /// here, no transaction runs on it, and its own copy is this rank's
    /// read-only mapping and current, or its only, writable copy.
    pub(super) fn publish_direct(&mut self, page: usize) {
        self.publish_direct_held(page, 0);
    }

    /// `publish_direct`, a page published writable held at least until
    /// `hold` (the protocol's clock).
    fn publish_direct_held(&mut self, page: usize, hold: u64) {
        let Some(own) = &self.direct.own else {
            return;
        };
        if self.direct.published.contains(page) || self.rc.contains(page) {
            return;
        }
        let Node::Mrsw(node) = &self.node else {
            return;
        };
        if let Some(hold_end) = node.direct_writable(page) {
            if self.staged.holds(RunOp::MakeWritable, page) {
                // Still read-only here: a reader's protection would be
                // lifted with no retraction.
                if !self.direct.after_staged.iter().any(|(p, _)| *p == page) {
                    self.direct.after_staged.push((page, hold));
                }
                return;
            }
            own.publish(page, 0, Some(self.direct.epoch + hold_end.max(hold)));
            self.direct.published.insert(page);
            return;
        }
        if !self.home_copy_is_mapped(page) {
            return;
        }
        let Some(readers) = node.direct_readable(page) else {
            return;
        };
        let members = (0..self.direct.readers.len())
            .filter(|bit| readers.contains(&self.direct.readers[*bit]))
            .fold(0u64, |m, bit| m | 1 << bit);
        own.publish(page, members, None);
        self.direct.published.insert(page);
    }

    /// The pages whose publication waited for the staged run just done.
    pub(super) fn publish_after_staged(&mut self) {
        for (page, hold) in std::mem::take(&mut self.direct.after_staged) {
            self.publish_direct_held(page, hold);
        }
    }

    /// The holds of this rank's pages granted until now are over
    /// (`Mrsw::end_holds`): so they are for the readers of its board.
    pub(super) fn end_direct_holds(&self) {
        if let (Some(own), Node::Mrsw(node)) = (&self.direct.own, &self.node) {
            own.end_holds(self.direct.epoch + node.holds_void_until());
        }
    }
}
