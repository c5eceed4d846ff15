//! Multi-reader / single-writer, sequentially consistent, with a directory
//! at each page's home (the default protocol).
//!
//! Every page has a home rank that keeps its directory entry (uncached,
//! shared by a set of readers, or exclusive at one writer) and, unless a
//! writer holds it, the authoritative copy of its bytes ("backing").
//!
//! Requester side (per page: Invalid, Shared = read-only copy, Modified =
//! writable copy; at most one request in flight):
//! * read fault on an invalid page: `ReadReq` to the home; the grant is
//!   installed write-protected;
//! * write fault (missing page, or store to a read-only copy): `WriteReq`;
//!   the grant carries the bytes, or is an upgrade of the copy we hold;
//! * `Invalidate`: drop the read-only copy, acknowledge;
//! * `Recall`: send the writable copy back, keeping it read-only
//!   (`keep_shared`, for a reader) or dropping it (for a writer).
//!
//! Home side: one transaction per page at a time, later requests queue.
//! * read: grant from the backing copy, or first recall the writer's copy;
//! * write: invalidate every other reader and wait for all their
//!   acknowledgements (or recall the writer's copy), then grant.
//!
//! Messages between two ranks arrive in order, and every message to a rank
//! about a page comes from that page's home, so a rank always sees its
//! grant before any later invalidation or recall of the same page.
//! A write is granted only once no other copy exists, so every read returns
//! the latest write: sequential consistency at page granularity.
//!
//! Progress: a page that arrives is kept at least `min_hold` before an
//! invalidation or recall takes it, so the faulting thread gets to use it.
//! A synchronization point of the rank (`end_holds`: a barrier entry, an
//! unlock) ends the holds of the pages granted before it: its threads got
//! there, so they used them. Holds only delay commands, as a timer would:
//! ending one early is the same as its deadline passing.
//!
//! Each local page remembers how it was lost since its last grant (`lost`):
//! a fault on it may ask back the pages after it lost the same way
//! (`regain_ahead`), as ordinary requests nobody waits for yet.
//!
//! First touch (`populate_ahead`): a fault on a page homed here that no
//! rank ever asked for takes it, and the following pages in the same
//! state, exclusive here at once (zeros, writable), with no request to
//! itself: one install for the run instead of one fault per page.
//!
//! Eviction (a bounded cache, `evict`): a rank may give up a copy of a page
//! homed elsewhere when nothing is in flight for it. A read-only copy is
//! dropped and the home told (`Evicted`): the directory stays exact. A
//! writable copy goes back to the home with its bytes
//! (`EvictedWriteBack`). Either notice may cross a command the home sent
//! before it arrived: an invalidation of the dropped read copy is still
//! acknowledged (the home waits for that acknowledgement and ignores the
//! notice), and a recall of the given-back writable copy is ignored (the
//! write-back answers it). The page remembers what it evicted until its
//! next grant, and only those crossings are accepted.
//!
//! Push (`push`): a home may hand a read-only copy to a rank that did not
//! ask for it, through the same transaction a read request from that rank
//! would start (recalling the writer's copy first, its own included). The
//! engine pushes, at a barrier entry, the pages whose readers lost them to
//! a write: producer/consumer codes (a stencil's boundary rows) then read
//! them after the barrier without a fault. The grant may cross a request of
//! the reader's: a read grant is installed whatever the rank asked for (a
//! write request in flight then finds the copy and is granted as an
//! upgrade), and the home answers nothing to a read request from a rank it
//! counts among the readers (only a push can have crossed it: a rank asks
//! only for a page it holds no copy of, and its eviction notice or
//! invalidation acknowledgement would arrive before a later request). A
//! read grant that reaches a rank after it released the page for a
//! collective free (a push, or the answer to a request a push answered) is
//! declined as an eviction, and the home's reset waits for that notice.

use std::collections::{BTreeMap, VecDeque};

use smallvec::SmallVec;

use super::{Action, CoherenceError, ProtocolCounters};
use crate::pages::{PageMap, PageSet, PageTable};
use crate::proto::{Msg, Payload};
use crate::Rank;

/// Abstract time (nanoseconds since the engine started; ticks in the model).
pub type Time = u64;

/// The access a fault or a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Access {
    /// A load: a read-only copy will do.
    Read,
    /// A store: needs the only, writable copy.
    Write,
}

/// A rank's own copy of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Copy {
    /// No copy: any access faults.
    Invalid,
    /// A read-only copy, mapped write-protected; others may exist.
    Shared,
    /// The only copy, mapped writable.
    Modified,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Command {
    Invalidate,
    Recall { keep_shared: bool },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct LocalPage {
    copy: Copy,
    pending: Option<Access>,
    held_until: Time,
    /// Why this rank lost access since its last grant, if it did: the
    /// access it is likely to want back (see `Mrsw::regain_ahead`).
    lost: Option<Access>,
    /// The copy this rank evicted since its last grant, if it did: a
    /// command the home sent before the eviction notice reached it may
    /// still arrive (see the module documentation).
    evicted: Option<Copy>,
    /// Released for a collective free (`release_for_free`) and not
    /// forgotten yet: a push that crossed the release is declined.
    freeing: bool,
}

impl LocalPage {
    const UNTOUCHED: LocalPage = LocalPage {
        copy: Copy::Invalid,
        pending: None,
        held_until: 0,
        lost: None,
        evicted: None,
        freeing: false,
    };
}

/// `Mrsw::home` of a page whose home is the default, `page mod size`.
const DEFAULT_HOME: u32 = u32::MAX;

/// The home's record of who holds copies of one of its pages.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Directory {
    /// No rank holds a copy: the home's copy is current.
    #[default]
    Uncached,
    /// These ranks hold read-only copies; the home's copy is current.
    Shared(Readers),
    /// This rank holds the only, writable copy; the home's may be stale.
    Exclusive(Rank),
}

/// The ranks holding read-only copies of a page, in order, each once. Up
/// to four are kept inline: a shared page costs its home no allocation in
/// the usual case of one or two readers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Readers(SmallVec<[Rank; 4]>);

impl Readers {
    fn of(ranks: &[Rank]) -> Readers {
        let mut readers = Readers::default();
        for &rank in ranks {
            readers.insert(rank);
        }
        readers
    }

    fn insert(&mut self, rank: Rank) -> bool {
        match self.0.binary_search(&rank) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, rank);
                true
            }
        }
    }

    fn remove(&mut self, rank: &Rank) -> bool {
        match self.0.binary_search(rank) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    fn contains(&self, rank: &Rank) -> bool {
        self.0.binary_search(rank).is_ok()
    }

    fn iter(&self) -> impl Iterator<Item = &Rank> {
        self.0.iter()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Queued {
    Request(Rank, Access),
    /// Seal or flush: bring the home's copy up to date.
    Settle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Transaction {
    /// Waiting for invalidation acknowledgements before granting a write.
    Acks {
        requester: Rank,
        remaining: usize,
        upgrade: bool,
    },
    /// Waiting for the exclusive copy to come back.
    WriteBack { requester: Rank, want: Access },
    /// Waiting for the exclusive copy to come back, for a seal or flush.
    Settle,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
struct HomePage {
    dir: Directory,
    txn: Option<Transaction>,
    queue: VecDeque<Queued>,
    /// Sealed (replicated segment): writes are denied.
    sealed: bool,
}

/// One rank's multi-reader / single-writer state machine: its own copy of
/// every page, and the directory of the pages it is home of.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mrsw {
    rank: Rank,
    size: usize,
    min_hold: Time,
    /// Holds that end by this time were granted before the rank's last
    /// synchronization point (`end_holds`) and no longer count.
    holds_void_until: Time,
    /// This rank's copy of every page (a chunk allocated on first use: a
    /// huge space costs nothing until touched).
    local: PageTable<LocalPage>,
    /// Home rank of every page (segment placement); `DEFAULT_HOME`:
    /// `page mod size`.
    home: PageTable<u32>,
    /// Pages of private segments: local to each rank, no directory.
    private: PageSet,
    /// Directory entries of the pages this rank is home of, by page,
    /// created on first use (looked up several times per request: an index,
    /// not a tree walk; boxed, so a page homed elsewhere costs one pointer).
    homes: PageMap<Box<HomePage>>,
    /// Invalidations and recalls deferred while their page is held, by
    /// page (rare: kept out of the per-page table, whose entries every
    /// touched page costs).
    waiting: BTreeMap<usize, VecDeque<Command>>,
    /// Pages homed elsewhere that this rank holds a copy of (its cache).
    cached: usize,
    /// Requests queued behind a transaction in progress (`deferred`).
    pub counters: ProtocolCounters,
}

type Actions = Result<Vec<Action>, CoherenceError>;

impl Mrsw {
    /// Rank `rank` of a job of `size` ranks over a space of `pages` pages,
    /// nothing held yet and every page at its default home (`page mod
    /// size`); a granted page is kept at least `min_hold` before an
    /// invalidation or recall takes it.
    pub fn new(rank: Rank, size: usize, pages: usize, min_hold: Time) -> Self {
        Mrsw {
            rank,
            size,
            min_hold,
            holds_void_until: 0,
            local: PageTable::new(pages, LocalPage::UNTOUCHED),
            home: PageTable::new(pages, DEFAULT_HOME),
            private: PageSet::new(pages),
            homes: PageMap::new(pages),
            waiting: BTreeMap::new(),
            cached: 0,
            counters: ProtocolCounters::default(),
        }
    }

    /// The home rank of `page`: its segment's placement (`set_home`),
    /// else `page mod size`.
    pub fn home_of(&self, page: usize) -> Rank {
        match self.home.get(page) {
            Some(&home) if home != DEFAULT_HOME => home as Rank,
            _ => page % self.size,
        }
    }

    /// Pages of the space.
    pub fn pages(&self) -> usize {
        self.local.pages()
    }

    /// True for a page of a private segment, or beyond the space: no
    /// protocol traffic about it.
    fn private_or_beyond(&self, page: usize) -> bool {
        page >= self.pages() || self.private.contains(page)
    }

    /// Places `pages` at `home` (a segment's placement). Must happen before
    /// any traffic about those pages, on every rank that takes part.
    pub fn set_home(&mut self, pages: std::ops::Range<usize>, home: Rank) {
        for p in pages {
            if let Some(h) = self.home.get_mut(p) {
                *h = home as u32;
            }
        }
        debug_assert!(home as u32 != DEFAULT_HOME);
    }

    /// Makes `pages` private: each rank has its own, no traffic.
    pub fn set_private(&mut self, pages: std::ops::Range<usize>) {
        self.private.extend(pages);
    }

    /// This rank's copy of `page`.
    pub fn copy_of(&self, page: usize) -> Option<Copy> {
        self.local.get(page).map(|l| l.copy)
    }

    /// Whether this rank holds no copy of `page` and waits for a read grant
    /// of it from `from`, its home: the grant's bytes may then land in the
    /// page's frame before the grant is handled (nothing maps the page
    /// meanwhile, and no other message of the protocol brings it).
    pub fn awaits_read_grant(&self, page: usize, from: Rank) -> bool {
        !self.private_or_beyond(page)
            && self.home_of(page) == from
            && self
                .local
                .get(page)
                .is_some_and(|lp| lp.copy == Copy::Invalid && lp.pending == Some(Access::Read))
    }

    /// True when a read request for `page` handled at `now` would make
    /// this rank, its home and only writer, give up write access at once
    /// (no transaction, queue, or hold in the way): the engine may then
    /// write-protect a run of such pages in one system call beforehand.
    pub fn read_request_downgrades_here(&self, page: usize, now: Time) -> bool {
        self.home_of(page) == self.rank
            && !self.private_or_beyond(page)
            && self.home_page_if_any(page).is_some_and(|h| {
                h.txn.is_none() && h.queue.is_empty() && h.dir == Directory::Exclusive(self.rank)
            })
            && !self.waiting.contains_key(&page)
            && self
                .local
                .get(page)
                .is_some_and(|l| l.copy == Copy::Modified && l.held_until <= self.hold_clock(now))
    }

    /// The directory entry, if this rank is the page's home.
    pub fn directory(&self, page: usize) -> Option<&Directory> {
        self.home_page_if_any(page).map(|h| &h.dir)
    }

    fn home_page_if_any(&self, page: usize) -> Option<&HomePage> {
        self.homes.get(page).map(|h| &**h)
    }

    /// The directory entry of `page`, created if need be. `page` is a page
    /// of the space (checked on the way in, by `home_page`).
    fn home_entry(&mut self, page: usize) -> &mut HomePage {
        self.homes.get_or_insert_with(page, Box::default)
    }

    /// True when nothing is in flight for any page at this rank.
    pub fn quiescent(&self) -> bool {
        self.waiting.is_empty()
            && self.local.iter().all(|(_, l)| l.pending.is_none())
            && self
                .homes
                .values()
                .all(|h| h.txn.is_none() && h.queue.is_empty())
    }

    fn local(&mut self, page: usize) -> Result<&mut LocalPage, CoherenceError> {
        let pages = self.pages();
        self.local
            .get_mut(page)
            .ok_or(CoherenceError::NoSuchPage { page, pages })
    }

    fn unexpected(page: usize, from: Rank, what: &'static str) -> CoherenceError {
        CoherenceError::Unexpected { page, from, what }
    }

    /// A thread of this process faulted on `page` (`write`: a store).
    pub fn on_fault(&mut self, page: usize, write: bool) -> Actions {
        let home = self.home_of(page);
        let private = self.private.contains(page);
        let lp = self.local(page)?;
        if private {
            if lp.copy == Copy::Invalid {
                lp.copy = Copy::Modified;
                return Ok(vec![Action::InstallZero { page }]);
            }
            return Ok(vec![Action::Wake { page }]);
        }
        match lp.copy {
            Copy::Modified => return Ok(vec![Action::Wake { page }]),
            Copy::Shared if !write => return Ok(vec![Action::Wake { page }]),
            _ => {}
        }
        if lp.pending.is_some() {
            // The answer to the request in flight wakes this thread too; a
            // store that finds a read-only copy then faults again.
            return Ok(Vec::new());
        }
        let (want, msg) = if write {
            (Access::Write, Msg::WriteReq { page: page as u64 })
        } else {
            (Access::Read, Msg::ReadReq { page: page as u64 })
        };
        lp.pending = Some(want);
        Ok(vec![Action::Send { to: home, msg }])
    }

    /// A first touch: if `page` was never touched (homed here with no
    /// directory entry yet, so no rank ever asked for it since its placement
    /// or its last reset and the home's copy is zeros; or private), and this
    /// rank holds no copy of it nor asks for one, takes it and the pages
    /// after it, below `end`, that are in the same state (up to the first
    /// that is not), exclusive and writable here, exactly as a write request
    /// to itself would (granted at once: no other copy exists), held as a
    /// grant is: one `InstallZeros` maps them all. A read takes them
    /// writable too (as a cache's "exclusive" state): no copy exists
    /// elsewhere, and a rank initializing its own pages (`a[i] += ...`)
    /// would otherwise fault again on each store; another rank's read later
    /// recalls the page (kept here read-only), as after a write.
    ///
    /// The caller bounds `end` (the segment's end, a most number of pages,
    /// and any page whose home's copy holds bytes not from the protocol,
    /// such as a file's). No actions when `page` is not such a page: the
    /// fault goes to `on_fault`.
    pub fn populate_ahead(&mut self, page: usize, end: usize, now: Time) -> Actions {
        let private = self.private.contains(page);
        if page >= end || !self.untouched(page, private) {
            return Ok(Vec::new());
        }
        let end = end.min(self.pages());
        let mut count = 1;
        while page + count < end && self.untouched(page + count, private) {
            count += 1;
        }
        let held_until = if private {
            0
        } else {
            now.saturating_add(self.min_hold)
        };
        let me = self.rank;
        for p in page..page + count {
            if !private {
                self.home_entry(p).dir = Directory::Exclusive(me);
            }
            let lp = self.local(p)?;
            lp.copy = Copy::Modified;
            lp.held_until = held_until;
        }
        Ok(vec![Action::InstallZeros { first: page, count }])
    }

    /// True when `page` is never touched at this rank, as `populate_ahead`
    /// takes it: private (`private`) and unmapped here, or homed here with no
    /// directory entry, no copy here and no request or command in flight.
    fn untouched(&self, page: usize, private: bool) -> bool {
        if page >= self.pages() || self.private.contains(page) != private {
            return false;
        }
        let unmapped = self
            .local
            .get(page)
            .is_some_and(|l| l.copy == Copy::Invalid && l.pending.is_none());
        unmapped
            && (private
                || (self.home_of(page) == self.rank
                    && self.homes.get(page).is_none()
                    && !self.waiting.contains_key(&page)))
    }

    /// Asks for a read-only copy of `page` before any thread faults on it
    /// (sequential prefetch). Does nothing unless the page is shared,
    /// invalid here and not already requested.
    pub fn prefetch(&mut self, page: usize) -> Actions {
        if self.private_or_beyond(page) {
            return Ok(Vec::new());
        }
        let home = self.home_of(page);
        let lp = self.local(page)?;
        if lp.copy != Copy::Invalid || lp.pending.is_some() {
            return Ok(Vec::new());
        }
        lp.pending = Some(Access::Read);
        Ok(vec![Action::Send {
            to: home,
            msg: Msg::ReadReq { page: page as u64 },
        }])
    }

    /// After a fault on `page`, if this rank lost that access to it (a
    /// read copy invalidated by a writer; for a store, a writable copy made
    /// read-only by a reader), asks its home for the same access to the
    /// pages after it, below `end`, that were lost the same way: an
    /// iterative code loses a run of pages at once (a stencil's boundary
    /// row, each iteration) and takes it back in one round trip instead of
    /// one per page. Stops at the first page that does not match.
    pub fn regain_ahead(&mut self, page: usize, write: bool, end: usize) -> Actions {
        let want = if write { Access::Write } else { Access::Read };
        if self.lost(page) != Some(want) {
            return Ok(Vec::new());
        }
        let home = self.home_of(page);
        // What a page lost the same way holds now: a read-only copy still
        // (downgraded), or nothing (invalidated).
        let held = if write { Copy::Shared } else { Copy::Invalid };
        let mut actions = Vec::new();
        for next in page + 1..end.min(self.pages()) {
            if self.private_or_beyond(next) || self.home_of(next) != home {
                break;
            }
            let lp = self.local(next)?;
            if lp.lost != Some(want) || lp.copy != held || lp.pending.is_some() {
                break;
            }
            lp.pending = Some(want);
            let page = next as u64;
            let msg = if write {
                Msg::WriteReq { page }
            } else {
                Msg::ReadReq { page }
            };
            actions.push(Action::Send { to: home, msg });
        }
        Ok(actions)
    }

    /// How this rank lost `page` since its last grant, if it did: the
    /// access `regain_ahead` would ask back with it.
    pub fn lost(&self, page: usize) -> Option<Access> {
        self.local.get(page).and_then(|l| l.lost)
    }

    /// Home: hands a read-only copy of `page` to `to`, which holds none and
    /// did not ask (see the module documentation), as a read request from
    /// `to` would. No actions when the page is not homed here, is private
    /// or sealed, has a transaction or queued requests, or `to` already
    /// holds a copy (as a reader or its writer).
    pub fn push(&mut self, page: usize, to: Rank) -> Actions {
        if to >= self.size
            || to == self.rank
            || self.home_of(page) != self.rank
            || self.private_or_beyond(page)
        {
            return Ok(Vec::new());
        }
        let hp = self.home_entry(page);
        let holds = match &hp.dir {
            Directory::Uncached => false,
            Directory::Shared(readers) => readers.contains(&to),
            Directory::Exclusive(owner) => *owner == to,
        };
        if holds || hp.sealed || hp.txn.is_some() || !hp.queue.is_empty() {
            return Ok(Vec::new());
        }
        self.counters.pushed += 1;
        self.start_transaction(page, to, Access::Read)
    }

    /// Gives up this rank's copy of `page`, homed elsewhere, to make room
    /// in its cache: a read-only copy is dropped and its home told, a
    /// writable one is given back to its home with its bytes. Does
    /// nothing (no actions) when the page is homed here, private, not held,
    /// has a request or command in flight, or is still within its minimum
    /// hold (the thread that faulted for it may not have used it yet).
    pub fn evict(&mut self, page: usize, now: Time) -> Actions {
        self.evict_as(page, now, None)
    }

    /// Evicts `page` as [`Mrsw::evict`] does, a read-only copy counting as
    /// lost to a write, as an invalidation would: a consumer's drop of a
    /// copy a push served (`DSM_PUSH`). When its pushes stop, its next
    /// fault then asks back the run of pages it dropped with it in one
    /// round trip (`regain_ahead`) instead of faulting on each. Asking
    /// back is only ever read requests, which the rank could make anyway.
    pub fn evict_served_push(&mut self, page: usize, now: Time) -> Actions {
        self.evict_as(page, now, Some(Access::Read))
    }

    fn evict_as(&mut self, page: usize, now: Time, lost: Option<Access>) -> Actions {
        let home = self.home_of(page);
        if home == self.rank || self.private_or_beyond(page) {
            return Ok(Vec::new());
        }
        let deferred = self.waiting.contains_key(&page);
        let hold_clock = self.hold_clock(now);
        let lp = self.local(page)?;
        if lp.pending.is_some() || deferred || lp.held_until > hold_clock {
            return Ok(Vec::new());
        }
        let evicted = lp.copy;
        let actions = match evicted {
            Copy::Invalid => return Ok(Vec::new()),
            Copy::Shared => vec![
                Action::DropPage { page },
                Action::Send {
                    to: home,
                    msg: Msg::Evicted { page: page as u64 },
                },
            ],
            Copy::Modified => vec![Action::EvictWriteBack { to: home, page }],
        };
        lp.copy = Copy::Invalid;
        lp.lost = if evicted == Copy::Shared { lost } else { None };
        lp.evicted = Some(evicted);
        self.cached -= 1;
        Ok(actions)
    }

    /// Pages homed elsewhere this rank holds a copy of: what its cache
    /// limit bounds.
    pub fn cached(&self) -> usize {
        self.cached
    }

    /// True when this rank could evict `page` now (`evict` would act).
    pub fn evictable(&self, page: usize, now: Time) -> bool {
        self.home_of(page) != self.rank
            && !self.private_or_beyond(page)
            && !self.waiting.contains_key(&page)
            && self.local.get(page).is_some_and(|l| {
                l.copy != Copy::Invalid
                    && l.pending.is_none()
                    && l.held_until <= self.hold_clock(now)
            })
    }

    // ---- direct reads between co-located ranks (`crate::board`) ----

    /// Reader: true when a read fault on `page` may copy it from its home's
    /// frame instead of asking (homed elsewhere, no copy here, no request
    /// in flight, no free under way). The home's board says the rest: a
    /// rank the home counts, whose eviction notice it has not handled yet,
    /// does not join (`board::word::joined`). After a writable copy given
    /// back, the next copy comes by message: the write-back answers a
    /// recall that crossed it, so the home may publish the page before that
    /// recall reaches this rank, and only a grant, behind it on the same
    /// link, ends the wait for it (the model checker found it).
    pub fn may_read_directly(&self, page: usize) -> bool {
        self.home_of(page) != self.rank
            && !self.private_or_beyond(page)
            && !self.waiting.contains_key(&page)
            && self.local.get(page).is_some_and(|l| {
                l.copy == Copy::Invalid
                    && l.pending.is_none()
                    && !l.freeing
                    && l.evicted != Some(Copy::Modified)
            })
    }

    /// Reader: a direct read of `page` starts (`may_read_directly`). Until
    /// it ends (`took_direct_copy`, `direct_read_failed`,
    /// `direct_read_skipped`) the page counts as asked for: other faults on
    /// it wait, read-ahead and regains pass it by. The caller handles no
    /// message meanwhile (the engine holds them back), so no answer to a
    /// request can meet this mark.
    pub fn begin_direct_read(&mut self, page: usize) -> Result<(), CoherenceError> {
        if !self.may_read_directly(page) {
            return Err(Self::unexpected(
                page,
                self.home_of(page),
                "a direct read of a page held or asked for",
            ));
        }
        self.local(page)?.pending = Some(Access::Read);
        Ok(())
    }

    /// Reader: the end of a direct read of `page` (`begin_direct_read`).
    fn end_direct_read(&mut self, page: usize) -> Result<&mut LocalPage, CoherenceError> {
        let home = self.home_of(page);
        let lp = self.local(page)?;
        if lp.copy != Copy::Invalid || lp.pending != Some(Access::Read) {
            return Err(Self::unexpected(
                page,
                home,
                "the end of a direct read that did not begin",
            ));
        }
        lp.pending = None;
        Ok(lp)
    }

    /// Reader: a direct read of `page` that began joined nothing (the home
    /// did not publish it, or published it again meanwhile): the page is as
    /// before, and the fault asks for it.
    pub fn direct_read_skipped(&mut self, page: usize) -> Result<(), CoherenceError> {
        self.end_direct_read(page).map(|_| ())
    }

    /// Reader: this rank copied `page` from its home's frame, which counts
    /// it among the readers (`add_direct_readers`): a read-only copy, held
    /// as a grant is. As after a grant, no command about an earlier
    /// read-only copy can still come: the home published the page with no
    /// transaction left, so it had this rank's acknowledgement of any
    /// invalidation its eviction notice crossed.
    pub fn took_direct_copy(&mut self, page: usize, now: Time) -> Result<(), CoherenceError> {
        let hold = self.min_hold;
        let lp = self.end_direct_read(page)?;
        lp.copy = Copy::Shared;
        lp.lost = None;
        lp.evicted = None;
        lp.held_until = now.saturating_add(hold);
        self.cached += 1;
        Ok(())
    }

    /// Reader: a direct read of `page` failed after the home counted this
    /// rank (it retracted the page during the copy, and may have let its
    /// frame go since): the copy is dropped unused, as an eviction of a
    /// read-only copy, and the home told.
    pub fn direct_read_failed(&mut self, page: usize, now: Time) -> Actions {
        self.took_direct_copy(page, now)?;
        let lp = self.local(page)?;
        lp.held_until = 0;
        let mut actions = self.evict(page, now)?;
        debug_assert!(!actions.is_empty(), "a copy just taken is evictable");
        // Nothing was mapped.
        actions.retain(|a| !matches!(a, Action::DropPage { .. }));
        Ok(actions)
    }

    /// Reader: gives up a copy of `page` taken directly that its home has
    /// not counted (this rank took its joiner bit back from the board): as
    /// `evict`, but the home is told nothing, and no command about the copy
    /// can come.
    pub fn evict_unseen(&mut self, page: usize, now: Time) -> Actions {
        let mut actions = self.evict(page, now)?;
        if actions.is_empty() {
            // The copy would stay while its home does not count it.
            return Err(Self::unexpected(
                page,
                self.home_of(page),
                "an unseen eviction of a copy that may not go now",
            ));
        }
        actions.retain(|a| !matches!(a, Action::Send { .. }));
        self.local(page)?.evicted = None;
        Ok(actions)
    }

    /// Home: ranks that copied `page` from this rank's frame since its
    /// last retraction are among its readers. Called before any step of
    /// the protocol on the page (the board retracted first). True when
    /// this rank held the page writable (`direct_writable`): the readers
    /// write-protected it here themselves, its copy is read-only from now
    /// on, and the caller makes its mapping the home's copy, as after a
    /// write-back of its own.
    pub fn add_direct_readers(
        &mut self,
        page: usize,
        ranks: &[Rank],
    ) -> Result<bool, CoherenceError> {
        let me = self.rank;
        let Some(&first) = ranks.first() else {
            return Ok(false);
        };
        let writable_here = self.direct_writable(page).is_some();
        let hp = self.home_page(page, me, "a direct read")?;
        if writable_here {
            let mut readers = Readers::of(ranks);
            readers.insert(me);
            hp.dir = Directory::Shared(readers);
            let lp = self.local(page)?;
            lp.copy = Copy::Shared;
            return Ok(true);
        }
        for &rank in ranks {
            match &mut hp.dir {
                Directory::Uncached => hp.dir = Directory::Shared(Readers::of(&[rank])),
                Directory::Shared(readers) => {
                    readers.insert(rank);
                }
                Directory::Exclusive(_) => {
                    return Err(Self::unexpected(
                        page,
                        first,
                        "a direct read of a page held exclusively elsewhere",
                    ))
                }
            }
        }
        Ok(false)
    }

    /// Home: when a co-located rank may copy `page` from this rank's frame
    /// after write-protecting it here: this rank holds the only, writable
    /// copy (it wrote it last), with nothing in flight. The end of this
    /// rank's hold on it: a reader waits it out, as a request would.
    pub fn direct_writable(&self, page: usize) -> Option<Time> {
        let lp = self.local.get(page)?;
        if self.home_of(page) != self.rank
            || self.private_or_beyond(page)
            || self.waiting.contains_key(&page)
            || lp.copy != Copy::Modified
            || lp.pending.is_some()
        {
            return None;
        }
        let hp = self.home_page_if_any(page)?;
        let idle = hp.txn.is_none() && hp.queue.is_empty() && !hp.sealed;
        (idle && hp.dir == Directory::Exclusive(self.rank)).then_some(lp.held_until)
    }

    /// Holds that end by this time no longer count (`end_holds`).
    pub fn holds_void_until(&self) -> Time {
        self.holds_void_until
    }

    /// How long a grant is held at least (`DSM_MIN_HOLD_US`).
    pub fn min_hold(&self) -> Time {
        self.min_hold
    }

    /// Home: the readers of `page` when a co-located rank may copy it from
    /// this rank's frame now: its own copy is mapped read-only here and
    /// current (no writer, no transaction, nothing queued or deferred).
    pub fn direct_readable(&self, page: usize) -> Option<&[Rank]> {
        if self.home_of(page) != self.rank
            || self.private_or_beyond(page)
            || self.waiting.contains_key(&page)
            || !self
                .local
                .get(page)
                .is_some_and(|l| l.copy == Copy::Shared && l.pending.is_none())
        {
            return None;
        }
        let hp = self.home_page_if_any(page)?;
        if hp.txn.is_some() || !hp.queue.is_empty() {
            return None;
        }
        match &hp.dir {
            Directory::Uncached => Some(&[]),
            Directory::Shared(readers) => Some(&readers.0),
            Directory::Exclusive(_) => None,
        }
    }

    // ---- freeing a segment (collective: every rank takes part) ----

    /// Free, first step, at every rank: true when nothing is in flight for
    /// `page` here (no request of this rank's, no command deferred), so
    /// `release_for_free` may act on it.
    pub fn free_ready(&self, page: usize) -> bool {
        !self.waiting.contains_key(&page)
            && self.local.get(page).is_none_or(|l| l.pending.is_none())
    }

    /// `page`'s state here in a few words, for a hang report: this rank's
    /// copy, its request and deferred commands, and as its home the
    /// directory, the transaction and the queue.
    pub fn describe_page(&self, page: usize) -> String {
        let mut text = match self.local.get(page) {
            Some(l) => format!(
                "copy {:?}, request {:?}, held until {} ns",
                l.copy, l.pending, l.held_until
            ),
            None => "outside the space".into(),
        };
        if let Some(commands) = self.waiting.get(&page) {
            text.push_str(&format!(", deferred {commands:?}"));
        }
        if let Some(h) = self.home_page_if_any(page) {
            text.push_str(&format!(
                "; home: {:?}, transaction {:?}, {} queued",
                h.dir,
                h.txn,
                h.queue.len()
            ));
        }
        text
    }

    /// Free, first step: gives up this rank's copy of `page`, as `evict`
    /// does but without waiting out the minimum hold (every thread of the
    /// program is done with the segment). A page of a private segment is
    /// dropped; a page homed here stays, for its home's reset. Call only
    /// when `free_ready`.
    pub fn release_for_free(&mut self, page: usize) -> Actions {
        if self.private.contains(page) {
            let lp = self.local(page)?;
            let held = lp.copy != Copy::Invalid;
            *lp = LocalPage::UNTOUCHED;
            return Ok(if held {
                vec![Action::DropPage { page }]
            } else {
                Vec::new()
            });
        }
        let actions = self.evict(page, Time::MAX)?;
        // Given up: a command that crosses the notice must not wait for
        // the hold to end (it is answered by the notice, or acknowledged).
        let lp = self.local(page)?;
        lp.held_until = 0;
        lp.freeing = true;
        Ok(actions)
    }

    /// Free, second step, at `page`'s home once every rank has released
    /// its copies: true when no transaction is under way or queued for it
    /// (acknowledgements of invalidations crossed by evictions may still
    /// be due).
    pub fn home_idle(&self, page: usize) -> bool {
        let me = self.rank;
        self.free_ready(page)
            && self.home_page_if_any(page).is_none_or(|h| {
                // Another reader after every rank released the page: a read
                // grant (a push, or the answer to a request a push already
                // answered) reached it after its release, and it declines
                // it (`local_read_grant`): its notice is on the way.
                let declining = matches!(&h.dir, Directory::Shared(readers)
                    if readers.iter().any(|r| *r != me));
                h.txn.is_none() && h.queue.is_empty() && !declining
            })
    }

    /// Free, second step: this home forgets `page` (homed here, not
    /// private; `home_idle`): its directory entry and its own copy go, and
    /// the page is as if never touched. Errors if another rank still holds
    /// a copy (it touched the segment during the free).
    pub fn reset_home_page(&mut self, page: usize) -> Actions {
        let me = self.rank;
        let hp = self.home_page(page, me, "a reset")?;
        let others_hold = match &hp.dir {
            Directory::Uncached => false,
            Directory::Shared(readers) => readers.iter().any(|r| *r != me),
            Directory::Exclusive(owner) => *owner != me,
        };
        if others_hold || hp.txn.is_some() || !hp.queue.is_empty() {
            return Err(Self::unexpected(
                page,
                me,
                "a free while another rank still holds or asks for the page",
            ));
        }
        self.homes.remove(page);
        let lp = self.local(page)?;
        let held = lp.copy != Copy::Invalid;
        *lp = LocalPage::UNTOUCHED;
        Ok(if held {
            vec![Action::DropPage { page }]
        } else {
            Vec::new()
        })
    }

    /// Free, third step, at every rank once `home` has reset its pages:
    /// this rank forgets its state of `page` (homed there), which it gave
    /// up in the first step: no command about it can still be on its way.
    pub fn forget_page(&mut self, page: usize, home: Rank) -> Result<(), CoherenceError> {
        let deferred = self.waiting.contains_key(&page);
        let lp = self.local(page)?;
        if lp.copy != Copy::Invalid || lp.pending.is_some() || deferred {
            return Err(Self::unexpected(
                page,
                home,
                "the end of a free while this rank holds or asks for the page",
            ));
        }
        *lp = LocalPage::UNTOUCHED;
        Ok(())
    }

    /// Free, last step: the pages' placement is forgotten (home back to
    /// `page mod size`, not private), so the range can hold a new segment.
    pub fn forget_placement(&mut self, pages: std::ops::Range<usize>) {
        for p in pages {
            if let Some(h) = self.home.get_mut(p) {
                *h = DEFAULT_HOME;
            }
            self.private.remove(p);
        }
    }

    /// A read grant carrying the page's bytes (the engine keeps them): the
    /// same as `on_message` with that grant, for a run of grants handled
    /// without a message per page.
    pub fn on_read_grant(&mut self, from: Rank, page: usize, now: Time) -> Actions {
        self.local_grant(page, from, false, true, now)
    }

    /// A write-back whose bytes the engine keeps (the home's own, left in
    /// its mapping): the same as `on_message` with that write-back.
    pub fn on_write_back(&mut self, from: Rank, page: usize) -> Actions {
        self.home_write_back(page, from)
    }

    /// A message from `from` arrived. Errors on a sender outside the job, a
    /// message of the migratory protocol, or one that does not fit the
    /// page's state here.
    pub fn on_message(&mut self, from: Rank, msg: &Msg, now: Time) -> Actions {
        if from >= self.size {
            return Err(CoherenceError::BadRequester {
                page: 0,
                requester: from,
            });
        }
        match msg {
            Msg::ReadReq { page } => self.home_request(*page as usize, from, Access::Read),
            Msg::WriteReq { page } => self.home_request(*page as usize, from, Access::Write),
            Msg::InvalidateAck { page } => self.home_ack(*page as usize, from),
            Msg::WriteBack { page, .. } => self.home_write_back(*page as usize, from),
            Msg::Evicted { page } => self.home_evicted(*page as usize, from),
            Msg::EvictedWriteBack { page, .. } => {
                self.home_evicted_write_back(*page as usize, from)
            }
            Msg::Invalidate { page } => {
                self.local_command(*page as usize, from, Command::Invalidate, now)
            }
            Msg::Recall { page, keep_shared } => self.local_command(
                *page as usize,
                from,
                Command::Recall {
                    keep_shared: *keep_shared,
                },
                now,
            ),
            Msg::Grant {
                page,
                write,
                payload,
            } => {
                let bytes = !matches!(payload, Payload::Upgrade);
                self.local_grant(*page as usize, from, *write, bytes, now)
            }
            Msg::Denied { page } => self.local_denied(*page as usize, from),
            _ => Err(Self::unexpected(0, from, "a message of another protocol")),
        }
    }

    // ---- home side ----

    fn home_page(
        &mut self,
        page: usize,
        from: Rank,
        what: &'static str,
    ) -> Result<&mut HomePage, CoherenceError> {
        if page >= self.pages() {
            return Err(CoherenceError::NoSuchPage {
                page,
                pages: self.pages(),
            });
        }
        if self.home_of(page) != self.rank {
            return Err(Self::unexpected(page, from, what));
        }
        Ok(self.home_entry(page))
    }

    fn home_request(&mut self, page: usize, requester: Rank, want: Access) -> Actions {
        let hp = self.home_page(page, requester, "a request")?;
        if hp.txn.is_some() {
            hp.queue.push_back(Queued::Request(requester, want));
            self.counters.deferred += 1;
            return Ok(Vec::new());
        }
        self.start_transaction(page, requester, want)
    }

    fn grant_write(page: usize, to: Rank, upgrade: bool) -> Action {
        if upgrade {
            Action::Send {
                to,
                msg: Msg::Grant {
                    page: page as u64,
                    write: true,
                    payload: Payload::Upgrade,
                },
            }
        } else {
            Action::GrantFromBacking {
                to,
                page,
                write: true,
            }
        }
    }

    fn start_transaction(&mut self, page: usize, requester: Rank, want: Access) -> Actions {
        let hp = self.home_entry(page);
        let page_id = page as u64;
        if hp.sealed && want == Access::Write {
            return Ok(vec![Action::Send {
                to: requester,
                msg: Msg::Denied { page: page_id },
            }]);
        }
        match (want, &mut hp.dir) {
            (Access::Read, Directory::Uncached) => {
                hp.dir = Directory::Shared(Readers::of(&[requester]));
                Ok(vec![Action::GrantFromBacking {
                    to: requester,
                    page,
                    write: false,
                }])
            }
            // A rank asks only for a page it holds no copy of: a push that
            // crossed the request answered it.
            (Access::Read, Directory::Shared(readers)) if readers.contains(&requester) => {
                Ok(Vec::new())
            }
            (Access::Read, Directory::Shared(readers)) => {
                readers.insert(requester);
                Ok(vec![Action::GrantFromBacking {
                    to: requester,
                    page,
                    write: false,
                }])
            }
            (_, Directory::Exclusive(owner)) if *owner == requester => Err(Self::unexpected(
                page,
                requester,
                "a request for a page it holds exclusively",
            )),
            (_, Directory::Exclusive(owner)) => {
                let owner = *owner;
                hp.txn = Some(Transaction::WriteBack { requester, want });
                Ok(vec![Action::Send {
                    to: owner,
                    msg: Msg::Recall {
                        page: page_id,
                        keep_shared: want == Access::Read,
                    },
                }])
            }
            (Access::Write, Directory::Uncached) => {
                hp.dir = Directory::Exclusive(requester);
                Ok(vec![Self::grant_write(page, requester, false)])
            }
            (Access::Write, Directory::Shared(readers)) => {
                let upgrade = readers.contains(&requester);
                let others: Vec<Rank> = readers
                    .iter()
                    .copied()
                    .filter(|r| *r != requester)
                    .collect();
                if others.is_empty() {
                    hp.dir = Directory::Exclusive(requester);
                    return Ok(vec![Self::grant_write(page, requester, upgrade)]);
                }
                hp.txn = Some(Transaction::Acks {
                    requester,
                    remaining: others.len(),
                    upgrade,
                });
                Ok(others
                    .into_iter()
                    .map(|to| Action::Send {
                        to,
                        msg: Msg::Invalidate { page: page_id },
                    })
                    .collect())
            }
        }
    }

    /// Starts queued requests until one has to wait.
    fn next_transactions(&mut self, page: usize, mut actions: Vec<Action>) -> Actions {
        loop {
            let hp = self.home_entry(page);
            if hp.txn.is_some() {
                return Ok(actions);
            }
            let Some(next) = hp.queue.pop_front() else {
                return Ok(actions);
            };
            actions.extend(match next {
                Queued::Request(requester, want) => {
                    self.start_transaction(page, requester, want)?
                }
                Queued::Settle => self.start_settle(page),
            });
        }
    }

    fn home_ack(&mut self, page: usize, from: Rank) -> Actions {
        let hp = self.home_page(page, from, "an invalidation ack")?;
        let Some(Transaction::Acks {
            requester,
            remaining,
            upgrade,
        }) = hp.txn.as_mut()
        else {
            return Err(Self::unexpected(
                page,
                from,
                "an unexpected invalidation ack",
            ));
        };
        let removed = match &mut hp.dir {
            Directory::Shared(readers) => readers.remove(&from),
            _ => false,
        };
        if !removed {
            return Err(Self::unexpected(
                page,
                from,
                "an invalidation ack from a non-reader",
            ));
        }
        *remaining -= 1;
        if *remaining > 0 {
            return Ok(Vec::new());
        }
        let (requester, upgrade) = (*requester, *upgrade);
        hp.txn = None;
        hp.dir = Directory::Exclusive(requester);
        self.next_transactions(page, vec![Self::grant_write(page, requester, upgrade)])
    }

    /// Seals `page` (this rank is its home): from now on writes are denied,
    /// and any writable copy is recalled. `Settled` says when it is done.
    pub fn seal(&mut self, page: usize) -> Actions {
        let me = self.rank;
        self.home_page(page, me, "a seal")?.sealed = true;
        self.settle(page)
    }

    /// Brings the home's copy of `page` up to date (recalling a writable
    /// copy, which stays readable at its holder). `Settled` says when.
    pub fn settle(&mut self, page: usize) -> Actions {
        let me = self.rank;
        let hp = self.home_page(page, me, "a flush")?;
        if hp.txn.is_some() {
            hp.queue.push_back(Queued::Settle);
            return Ok(Vec::new());
        }
        Ok(self.start_settle(page))
    }

    fn start_settle(&mut self, page: usize) -> Vec<Action> {
        let hp = self.home_entry(page);
        match hp.dir {
            Directory::Exclusive(owner) => {
                hp.txn = Some(Transaction::Settle);
                vec![Action::Send {
                    to: owner,
                    msg: Msg::Recall {
                        page: page as u64,
                        keep_shared: true,
                    },
                }]
            }
            _ => vec![Action::Settled { page }],
        }
    }

    fn home_write_back(&mut self, page: usize, from: Rank) -> Actions {
        let hp = self.home_page(page, from, "a write-back")?;
        let recalling = matches!(
            hp.txn,
            Some(Transaction::Settle | Transaction::WriteBack { .. })
        );
        if !recalling || !matches!(hp.dir, Directory::Exclusive(_)) {
            return Err(Self::unexpected(page, from, "an unexpected write-back"));
        }
        if hp.dir != Directory::Exclusive(from) {
            return Err(Self::unexpected(
                page,
                from,
                "a write-back from a non-owner",
            ));
        }
        self.recalled(page, from, true)
    }

    /// The exclusive copy came back from `from` (the answer to a recall, or
    /// an eviction that crossed it): the home's copy is current again, and
    /// the transaction waiting for it ends. `kept`: `from` still holds a
    /// read-only copy.
    fn recalled(&mut self, page: usize, from: Rank, kept: bool) -> Actions {
        let hp = self.home_entry(page);
        let mut readers = Readers::default();
        if kept {
            readers.insert(from);
        }
        let (dir, done) = match hp.txn.take() {
            Some(Transaction::WriteBack {
                requester,
                want: Access::Write,
            }) => (
                Directory::Exclusive(requester),
                Action::GrantFromBacking {
                    to: requester,
                    page,
                    write: true,
                },
            ),
            Some(Transaction::WriteBack {
                requester,
                want: Access::Read,
            }) => {
                readers.insert(requester);
                (
                    Directory::Shared(readers),
                    Action::GrantFromBacking {
                        to: requester,
                        page,
                        write: false,
                    },
                )
            }
            // A seal or flush.
            _ if readers.iter().next().is_none() => (Directory::Uncached, Action::Settled { page }),
            _ => (Directory::Shared(readers), Action::Settled { page }),
        };
        hp.dir = dir;
        self.next_transactions(page, vec![Action::StoreBacking { page }, done])
    }

    /// A reader dropped its copy (`evict`).
    fn home_evicted(&mut self, page: usize, from: Rank) -> Actions {
        let hp = self.home_page(page, from, "an eviction notice")?;
        let Directory::Shared(readers) = &mut hp.dir else {
            return Err(Self::unexpected(
                page,
                from,
                "an eviction notice of a read copy it does not hold",
            ));
        };
        if !readers.contains(&from) {
            return Err(Self::unexpected(
                page,
                from,
                "an eviction notice of a read copy it does not hold",
            ));
        }
        match hp.txn {
            // An invalidation crossed the notice: the reader acknowledges
            // it all the same, and that acknowledgement is what counts.
            Some(Transaction::Acks { requester, .. }) if requester != from => {}
            Some(_) => {
                return Err(Self::unexpected(
                    page,
                    from,
                    "an eviction notice of a copy it is upgrading",
                ))
            }
            None => {
                readers.remove(&from);
                if readers.iter().next().is_none() {
                    hp.dir = Directory::Uncached;
                }
            }
        }
        Ok(Vec::new())
    }

    /// The writer gave its copy back (`evict`): the home's copy is current
    /// again. A recall that crossed it is answered by it.
    fn home_evicted_write_back(&mut self, page: usize, from: Rank) -> Actions {
        let hp = self.home_page(page, from, "an eviction write-back")?;
        if hp.dir != Directory::Exclusive(from) {
            return Err(Self::unexpected(
                page,
                from,
                "an eviction write-back from a non-owner",
            ));
        }
        match hp.txn {
            None => {
                hp.dir = Directory::Uncached;
                Ok(vec![Action::StoreBacking { page }])
            }
            Some(Transaction::Acks { .. }) => Err(Self::unexpected(
                page,
                from,
                "an eviction write-back during an invalidation",
            )),
            // It answers the recall that crossed it.
            Some(_) => self.recalled(page, from, false),
        }
    }

    // ---- requester side ----

    fn local_command(&mut self, page: usize, from: Rank, command: Command, now: Time) -> Actions {
        if self.home_of(page) != from {
            return Err(Self::unexpected(
                page,
                from,
                "a command from a rank that is not the page's home",
            ));
        }
        let hold_clock = self.hold_clock(now);
        let held = self.local(page)?.held_until > hold_clock;
        if held || self.waiting.contains_key(&page) {
            self.waiting.entry(page).or_default().push_back(command);
            return Ok(Vec::new());
        }
        self.execute(page, command)
    }

    fn execute(&mut self, page: usize, command: Command) -> Actions {
        let home = self.home_of(page);
        let homed_elsewhere = home != self.rank;
        let pages = self.pages();
        let cached = &mut self.cached;
        let lp = self
            .local
            .get_mut(page)
            .ok_or(CoherenceError::NoSuchPage { page, pages })?;
        let page_id = page as u64;
        match (command, lp.copy) {
            (Command::Invalidate, Copy::Shared) => {
                lp.copy = Copy::Invalid;
                lp.lost = Some(Access::Read);
                *cached -= usize::from(homed_elsewhere);
                Ok(vec![
                    Action::DropPage { page },
                    Action::Send {
                        to: home,
                        msg: Msg::InvalidateAck { page: page_id },
                    },
                ])
            }
            (Command::Recall { keep_shared }, Copy::Modified) => {
                (lp.copy, lp.lost) = if keep_shared {
                    (Copy::Shared, Some(Access::Write))
                } else {
                    *cached -= usize::from(homed_elsewhere);
                    (Copy::Invalid, None)
                };
                Ok(vec![Action::WriteBack {
                    to: home,
                    page,
                    keep_shared,
                }])
            }
            // The home sent these before our eviction notice reached it
            // (see the module documentation).
            (Command::Invalidate, Copy::Invalid) if lp.evicted == Some(Copy::Shared) => {
                lp.evicted = None;
                Ok(vec![Action::Send {
                    to: home,
                    msg: Msg::InvalidateAck { page: page_id },
                }])
            }
            (Command::Recall { .. }, Copy::Invalid) if lp.evicted == Some(Copy::Modified) => {
                lp.evicted = None;
                Ok(Vec::new())
            }
            (Command::Invalidate, _) => Err(Self::unexpected(
                page,
                home,
                "an invalidation of a copy not shared here",
            )),
            (Command::Recall { .. }, _) => Err(Self::unexpected(
                page,
                home,
                "a recall of a copy not held exclusively here",
            )),
        }
    }

    fn local_grant(
        &mut self,
        page: usize,
        from: Rank,
        write: bool,
        carries_bytes: bool,
        now: Time,
    ) -> Actions {
        if self.home_of(page) != from {
            return Err(Self::unexpected(
                page,
                from,
                "a grant from a rank that is not the page's home",
            ));
        }
        let hold = self.min_hold;
        let lp = self.local(page)?;
        if !write && carries_bytes {
            return self.local_read_grant(page, now);
        }
        if lp.pending != Some(Access::Write) {
            return Err(Self::unexpected(page, from, "a grant it did not ask for"));
        }
        lp.pending = None;
        lp.lost = None;
        lp.evicted = None;
        lp.held_until = now.saturating_add(hold);
        if lp.copy == Copy::Invalid && from != self.rank {
            self.cached += 1;
        }
        let lp = self.local(page)?;
        match (write, carries_bytes, lp.copy) {
            (true, false, Copy::Shared) => {
                lp.copy = Copy::Modified;
                Ok(vec![Action::MakeWritable { page }])
            }
            (true, true, Copy::Invalid) => {
                lp.copy = Copy::Modified;
                Ok(vec![Action::Install {
                    page,
                    writable: true,
                }])
            }
            _ => Err(Self::unexpected(
                page,
                from,
                "a grant that does not fit this rank's copy",
            )),
        }
    }

    /// A read grant from `page`'s home: the answer to this rank's read
    /// request, or a push (which may have crossed a request of its own:
    /// see the module documentation).
    fn local_read_grant(&mut self, page: usize, now: Time) -> Actions {
        let hold = self.min_hold;
        let home = self.home_of(page);
        let homed_elsewhere = home != self.rank;
        let lp = self.local(page)?;
        if lp.freeing {
            if lp.copy != Copy::Invalid || lp.pending.is_some() {
                return Err(Self::unexpected(
                    page,
                    home,
                    "a read grant for a page this rank asked for while freeing it",
                ));
            }
            // A read grant that crossed this rank's release for a free (a
            // push, or the answer to a request a push answered): declined
            // as an eviction, which the home's reset waits for.
            lp.evicted = Some(Copy::Shared);
            return Ok(vec![Action::Send {
                to: home,
                msg: Msg::Evicted { page: page as u64 },
            }]);
        }
        let asked = lp.pending == Some(Access::Read);
        if asked {
            lp.pending = None;
        }
        match lp.copy {
            Copy::Invalid => {
                lp.copy = Copy::Shared;
                lp.lost = None;
                lp.evicted = None;
                if asked {
                    // A thread waits for it: kept until it got to use it.
                    lp.held_until = now.saturating_add(hold);
                }
                self.cached += usize::from(homed_elsewhere);
                Ok(vec![Action::Install {
                    page,
                    writable: false,
                }])
            }
            Copy::Shared | Copy::Modified => Err(Self::unexpected(
                page,
                home,
                "a read grant for a page it holds",
            )),
        }
    }

    fn local_denied(&mut self, page: usize, from: Rank) -> Actions {
        if self.home_of(page) != from {
            return Err(Self::unexpected(
                page,
                from,
                "a denial from a rank that is not the page's home",
            ));
        }
        let lp = self.local(page)?;
        if lp.pending != Some(Access::Write) {
            return Err(Self::unexpected(
                page,
                from,
                "a denial of a write it did not ask for",
            ));
        }
        lp.pending = None;
        Ok(vec![Action::SealedWrite { page }])
    }

    // ---- timers ----

    /// When the next deferred command becomes due, if any.
    pub fn next_deadline(&self) -> Option<Time> {
        self.waiting
            .keys()
            .filter_map(|p| self.local.get(*p))
            // A hold a synchronization point ended is due at once.
            .map(|l| {
                if l.held_until <= self.holds_void_until {
                    0
                } else {
                    l.held_until
                }
            })
            .min()
    }

    /// The time holds are compared with at `now`: holds granted before the
    /// last synchronization point have ended, whatever their deadline.
    fn hold_clock(&self, now: Time) -> Time {
        now.max(self.holds_void_until)
    }

    /// The rank reached a synchronization point (a barrier entry, an
    /// unlock): the threads that faulted for the pages it holds got past
    /// their faults, so every hold granted until `now` ends, and the
    /// commands they deferred are executed. Without this, a neighbour's
    /// boundary row read just before a barrier keeps its writer waiting
    /// for the hold after it (the hold only guards a thread that has not
    /// used its page yet).
    pub fn end_holds(&mut self, now: Time) -> Actions {
        // A grant at `now` or later is held until `now + min_hold` or
        // later: it keeps its hold.
        self.holds_void_until = self
            .holds_void_until
            .max(now.saturating_add(self.min_hold).saturating_sub(1));
        self.on_tick(now)
    }

    /// Moves the clock's origin to `now`: hold deadlines become relative to
    /// it. Only differences of times matter to the protocol, so this changes
    /// nothing in its behaviour (the model checker uses it to fold states
    /// that differ only by the absolute time).
    pub fn rebase_clock(&mut self, now: Time) {
        // Holds ended by a synchronization point end for good, and a hold
        // granted from now on ends after `holds_void_until`: it is spent.
        let void = self.holds_void_until;
        for page in self.local.values_mut() {
            page.held_until = if page.held_until <= void {
                0
            } else {
                page.held_until.saturating_sub(now)
            };
        }
        self.holds_void_until = 0;
    }

    /// Executes deferred commands whose page is no longer held.
    pub fn on_tick(&mut self, now: Time) -> Actions {
        let due: Vec<usize> = self
            .waiting
            .keys()
            .copied()
            .filter(|p| {
                self.local
                    .get(*p)
                    .is_some_and(|l| l.held_until <= self.hold_clock(now))
            })
            .collect();
        let mut actions = Vec::new();
        for page in due {
            for command in self.waiting.remove(&page).unwrap_or_default() {
                actions.extend(self.execute(page, command)?);
            }
        }
        Ok(actions)
    }
}
