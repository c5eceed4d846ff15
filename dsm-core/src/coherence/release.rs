//! Release consistency with multiple writers: false sharing without
//! ping-pong (`DSM_PROTOCOL=release`, or segments allocated with
//! `Consistency::Release`; the engine's side is in `engine/sync.rs` and
//! `engine/protocol.rs`).
//!
//! Every page has a home whose own mapping is the page's master copy: the
//! home reads and writes it in place. Other ranks keep copies, and several
//! ranks may write the same page at once:
//!
//! * read fault: `CopyReq` to the home, whose grant (`Grant`, read) is
//!   installed write-protected (a clean copy). The first grant of a master
//!   copy write-protects it too: from then on the home's stores to it are
//!   twinned like a copy's, so that they reach the copies;
//! * write fault: on a clean copy (or a protected master), the rank keeps
//!   a twin of the page (its bytes as they are) and makes it writable, with
//!   no message (a dirty copy); on no copy, it fetches one first;
//! * lock release (before an unlock or a lock request): every dirty copy
//!   is write-protected and compared with its twin, and the words that
//!   differ go to the home (`Diff`), which writes them into its master copy
//!   and acknowledges each (`DiffAck`); the release is done once all are,
//!   so whoever takes the lock next finds the writes at the homes. The
//!   pages are remembered for the next barrier entry (`lock_written`);
//! * lock acquire: every clean copy of a page homed elsewhere is dropped,
//!   so the next access fetches what the homes hold now; those this rank
//!   wrote since are asked for again at once, to come back writable with a
//!   twin. No copy is dirty then: the engine releases again first if one
//!   became dirty since the release;
//! * barrier: the entry carries the diffs of every dirty copy and twinned
//!   master copy (each protected again), and the pages its lock releases
//!   wrote ([`ReleaseFor::Barrier`]; while another thread of the rank holds
//!   a lock, the copies' diffs go to their homes, acknowledged, instead:
//!   [`ReleaseFor::BarrierUnderLock`]). Once every rank entered, rank 0
//!   merges each page's diffs (the home's first, then the others' by rank)
//!   and the release carries the merges to every rank (to a page's home,
//!   the merge of the others'). Each rank writes them into the copies and
//!   master copies it holds, and their twins, but for the words it changed
//!   since the twin (later ones); the copies stay mapped: no copy is
//!   dropped, no page fetched again, and the pages written last step are
//!   writable at once. Copies of pages written under a lock go (their
//!   homes have those words). A rank's copy request carries the barriers
//!   whose release it handled, and the home answers it once it handled
//!   them too; a fetch in flight when its page's diffs arrive is asked
//!   again.
//!
//! What programs see: a data-race-free program (conflicting accesses of
//! different ranks ordered by locks or barriers) sees sequential
//! consistency. A racy one may read stale words (a copy fetched before
//! another rank's write is read until the next barrier or lock), and two
//! ranks writing the same word between two synchronizations leave one of
//! the two values, never a mix of bytes of a word.
//!
//! Checked exhaustively in `tests/model_check_release.rs` (no lost diff;
//! data-race-free programs read what sequential consistency allows).

use std::collections::{BTreeMap, BTreeSet};

use super::{Action, CoherenceError};
use crate::pages::{PageSet, PageTable};
use crate::proto::{Msg, Payload};
use crate::Rank;

/// `Release::home` of a page whose home is the default, `page mod size`.
const DEFAULT_HOME: u32 = u32::MAX;

/// A rank's copy of a page homed elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RcCopy {
    /// No copy: any access faults.
    Invalid,
    /// A read request is in flight. `write`: a store waits for it (the copy
    /// becomes dirty on arrival). `stale`: an acquire happened since it was
    /// sent, so its grant may predate writes this rank must now see.
    Fetching {
        /// A store waits for the copy.
        write: bool,
        /// Asked for before the last acquire.
        stale: bool,
    },
    /// A write-protected copy, identical to the home's when fetched.
    Clean,
    /// A writable copy with its twin: the words that differ from the twin
    /// are this rank's writes since the copy was taken.
    Dirty,
}

/// A master copy that other ranks may hold copies of (one was granted):
/// its home's writes are tracked with a twin, as a copy's are, so that
/// they reach the copies with the home's barrier diffs. A master copy
/// never granted is written freely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Master {
    /// Write-protected: the home's next store takes a twin.
    Protected,
    /// Writable, with its twin.
    Twinned,
}

/// What a release is for ([`Release::release`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseFor {
    /// A lock request or an unlock: the dirty copies' diffs go to their
    /// homes, acknowledged.
    Lock,
    /// A barrier entry: the diffs of the dirty copies and twinned master
    /// copies are collected into it.
    Barrier,
    /// A barrier entry while another thread of the rank holds a lock: the
    /// copies' diffs go to their homes, acknowledged, as for a lock (that
    /// thread's writes must be at the homes when it lets the lock go,
    /// which may be before the barrier's release), the masters' are
    /// collected.
    BarrierUnderLock,
}

/// What a rank's release is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
struct Releasing {
    /// Diffs sent and not yet acknowledged.
    acks_due: usize,
    /// A release waits for them (`Action::Released` once they are in).
    waiting: bool,
}

/// The release-consistent, multiple-writer protocol at one rank: pure
/// state (events in, [`Action`]s out), as [`super::Mrsw`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Release {
    rank: Rank,
    size: usize,
    /// This rank's copy of every page homed elsewhere.
    local: PageTable<RcCopy>,
    /// Home rank of every page; `DEFAULT_HOME`: `page mod size`.
    home: PageTable<u32>,
    /// Pages homed here that this rank has mapped (its master copies).
    mapped_here: BTreeSet<usize>,
    /// Pages homed elsewhere that this rank holds or fetches: what a lock's
    /// acquire drops (kept apart so an acquire costs the copies, not the
    /// space).
    held: BTreeSet<usize>,
    /// Pages with a twin (dirty copies), in page order.
    dirty: BTreeSet<usize>,
    /// Pages whose diffs were sent or collected since the last barrier
    /// passed or lock acquire: the next lock acquire asks their homes for
    /// them again at once (an iterative program writes the same pages every
    /// step), one round trip for all instead of one fault after another.
    /// A barrier keeps the copies, so it starts the set again.
    written: BTreeSet<usize>,
    /// Clean copies dropped (by a lock's acquire, or as written under a
    /// lock at a barrier) and not asked for since (pages read in an
    /// earlier step): a fault on one asks for the run of them after
    /// it too, up to `REFETCH_RUN` pages, in one round trip (a stencil
    /// reading a neighbour's row again, in grids that alternate).
    dropped: PageSet,
    /// Master copies granted to other ranks (see [`Master`]).
    masters: BTreeMap<usize, Master>,
    /// Pages whose diffs this rank's lock releases sent to their homes
    /// since its last barrier entry (what the next entry names: the other
    /// ranks' copies of them go at that barrier).
    lock_written: BTreeSet<usize>,
    /// Copies a barrier said were written under a lock that were dirty
    /// when its release was handled: dropped once released (acknowledged)
    /// before the barrier returns.
    drop_after_release: BTreeSet<usize>,
    /// Dirty copies evicted whose diffs are not acknowledged yet
    /// ([`Release::evict`]): at most one a page (its next grant comes after
    /// the acknowledgement, on the same link).
    evicting: BTreeSet<usize>,
    /// Pages the diffs being sent added to `lock_written` (a page may be
    /// there already from an earlier release of the interval): an empty
    /// diff takes out only those.
    lock_written_now: BTreeSet<usize>,
    /// Between this rank's barrier entry and its handling of that
    /// barrier's release: its entry may carry a diff of a dirty copy, and
    /// a later diff of the same page sent to the home now would go under
    /// that older one in the merge.
    in_barrier: bool,
    releasing: Releasing,
    /// Barriers whose release this rank handled (what its copy requests
    /// carry), or that a lock's earlier holder had passed.
    passed: u64,
    /// The last barrier whose release this rank handled: its diffs are in
    /// the copies and master copies here.
    complete: u64,
    /// Copy requests of ranks past a barrier not complete here: (sender,
    /// page, barriers the sender passed), in order of arrival.
    deferred: Vec<(Rank, usize, u64)>,
}

/// Most pages a fault on a dropped copy asks for with it (64 KiB).
const REFETCH_RUN: usize = 16;

type Actions = Result<Vec<Action>, CoherenceError>;

impl Release {
    /// Rank `rank` of a job of `size` ranks over a space of `pages` pages,
    /// nothing held and every page at its default home (`page mod size`).
    pub fn new(rank: Rank, size: usize, pages: usize) -> Self {
        Release {
            rank,
            size,
            local: PageTable::new(pages, RcCopy::Invalid),
            home: PageTable::new(pages, DEFAULT_HOME),
            mapped_here: BTreeSet::new(),
            held: BTreeSet::new(),
            dirty: BTreeSet::new(),
            written: BTreeSet::new(),
            dropped: PageSet::new(pages),
            masters: BTreeMap::new(),
            lock_written: BTreeSet::new(),
            drop_after_release: BTreeSet::new(),
            evicting: BTreeSet::new(),
            lock_written_now: BTreeSet::new(),
            in_barrier: false,
            releasing: Releasing::default(),
            passed: 0,
            complete: 0,
            deferred: Vec::new(),
        }
    }

    /// The home rank of `page`.
    pub fn home_of(&self, page: usize) -> Rank {
        match self.home.get(page) {
            Some(&home) if home != DEFAULT_HOME => home as Rank,
            _ => page % self.size,
        }
    }

    /// Places `pages` at `home` (a segment's placement), before any traffic
    /// about them, on every rank; `None`: back at their default home (a
    /// segment freed).
    pub fn set_home(&mut self, pages: std::ops::Range<usize>, home: impl Into<Option<Rank>>) {
        let home = home.into().map_or(DEFAULT_HOME, |h| h as u32);
        for p in pages {
            if let Some(h) = self.home.get_mut(p) {
                *h = home;
            }
        }
    }

    /// Pages of the space.
    pub fn pages(&self) -> usize {
        self.local.pages()
    }

    /// This rank's copy of `page` (homed elsewhere).
    pub fn copy_of(&self, page: usize) -> Option<RcCopy> {
        self.local.get(page).copied()
    }

    /// True when `page`, homed here, is mapped here (its master copy holds
    /// bytes); false: it is all zeros.
    pub fn mapped_here(&self, page: usize) -> bool {
        self.mapped_here.contains(&page)
    }

    /// Pages homed elsewhere held or being fetched here.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Diffs sent and not acknowledged yet.
    pub fn diffs_unacknowledged(&self) -> usize {
        self.releasing.acks_due
    }

    /// Barriers this rank passed, as its copy requests say.
    pub fn barriers_passed(&self) -> u64 {
        self.passed
    }

    /// The last barrier whose release this rank handled (its diffs are
    /// in here).
    pub fn barriers_complete(&self) -> u64 {
        self.complete
    }

    /// A lock taken after a rank that had passed `barriers` barriers let it
    /// go: what that rank saw, this one must (its copy requests say it
    /// passed them too, so homes answer once those barriers' diffs are in).
    pub fn lock_taken_after(&mut self, barriers: u64) {
        self.passed = self.passed.max(barriers);
    }

    /// Copy requests held back until a barrier's release is handled here,
    /// and the last barrier handled (for a hang report).
    pub fn copy_requests_held(&self) -> (usize, u64) {
        (self.deferred.len(), self.complete)
    }

    /// Pages holding writes not yet sent to their homes.
    pub fn dirty_pages(&self) -> usize {
        self.dirty.len()
    }

    /// Nothing in flight: no fetch, no unacknowledged diff, no release
    /// waiting, no request waiting for a barrier's release.
    pub fn quiescent(&self) -> bool {
        self.releasing == Releasing::default()
            && self.deferred.is_empty()
            && self.drop_after_release.is_empty()
            && self
                .held
                .iter()
                .all(|&p| !matches!(self.local.get(p), Some(RcCopy::Fetching { .. })))
    }

    fn check(&self, page: usize) -> Result<(), CoherenceError> {
        if page < self.pages() {
            Ok(())
        } else {
            Err(CoherenceError::NoSuchPage {
                page,
                pages: self.pages(),
            })
        }
    }

    fn set(&mut self, page: usize, copy: RcCopy) {
        if let Some(c) = self.local.get_mut(page) {
            *c = copy;
        }
        if copy == RcCopy::Invalid {
            self.held.remove(&page);
        } else {
            self.held.insert(page);
        }
        if copy == RcCopy::Dirty {
            self.dirty.insert(page);
        } else {
            self.dirty.remove(&page);
        }
    }

    /// A fault on `page` (a store if `write`).
    pub fn on_fault(&mut self, page: usize, write: bool) -> Actions {
        self.check(page)?;
        let home = self.home_of(page);
        if home == self.rank {
            // The master copy: mapped once, never taken away; writable
            // unless granted to others: then protected at each barrier
            // entry and twinned again at the home's first store (or when
            // diffs are written into it).
            if self.mapped_here.insert(page) {
                return Ok(vec![Action::InstallZero { page }]);
            }
            if write && self.masters.get(&page) == Some(&Master::Protected) {
                self.masters.insert(page, Master::Twinned);
                return Ok(vec![
                    Action::TakeTwin { page },
                    Action::MakeWritable { page },
                ]);
            }
            return Ok(vec![Action::Wake { page }]);
        }
        let copy = self.copy_of(page).unwrap_or(RcCopy::Invalid);
        Ok(match copy {
            RcCopy::Invalid => {
                self.set(
                    page,
                    RcCopy::Fetching {
                        write,
                        stale: false,
                    },
                );
                let mut asks = vec![self.copy_request(page)];
                if self.dropped.remove(page) {
                    // The pages dropped with it after it, read last step:
                    // most likely read again now.
                    for next in page + 1..(page + 1 + REFETCH_RUN).min(self.pages()) {
                        if !self.dropped.contains(next) {
                            break;
                        }
                        asks.extend(self.prefetch(next)?);
                    }
                }
                asks
            }
            RcCopy::Fetching { write: w, stale } => {
                self.set(
                    page,
                    RcCopy::Fetching {
                        write: w || write,
                        stale,
                    },
                );
                Vec::new()
            }
            RcCopy::Clean if write => {
                self.set(page, RcCopy::Dirty);
                vec![Action::TakeTwin { page }, Action::MakeWritable { page }]
            }
            RcCopy::Clean | RcCopy::Dirty => vec![Action::Wake { page }],
        })
    }

    /// Read-ahead of `page` (a sequential read stream): asked for as a
    /// read fault would ask, when it is homed elsewhere and neither held
    /// nor asked for already; no actions otherwise. Nobody waits for it:
    /// its grant installs a clean copy, as another thread's read would.
    pub fn prefetch(&mut self, page: usize) -> Actions {
        self.check(page)?;
        let home = self.home_of(page);
        if home == self.rank || self.copy_of(page).unwrap_or(RcCopy::Invalid) != RcCopy::Invalid {
            return Ok(Vec::new());
        }
        self.dropped.remove(page);
        self.set(
            page,
            RcCopy::Fetching {
                write: false,
                stale: false,
            },
        );
        Ok(vec![self.copy_request(page)])
    }

    /// The request for a copy of `page` to its home, which answers once
    /// it has every diff of the barriers this rank passed.
    fn copy_request(&self, page: usize) -> Action {
        Action::Send {
            to: self.home_of(page),
            msg: Msg::CopyReq {
                page: page as u64,
                barriers: self.passed,
            },
        }
    }

    /// A message from `from`.
    pub fn on_message(&mut self, from: Rank, msg: &Msg) -> Actions {
        if from >= self.size {
            return Err(CoherenceError::BadRequester {
                page: 0,
                requester: from,
            });
        }
        match *msg {
            Msg::CopyReq { page, barriers } => {
                let page = self.page_homed_here(page, from, "a copy request")?;
                if barriers > self.complete {
                    // The sender handled a barrier's release that this rank
                    // has not: answered once its diffs are in here.
                    self.deferred.push((from, page, barriers));
                    return Ok(Vec::new());
                }
                Ok(self.grant_master(from, page))
            }
            Msg::Grant {
                page,
                write: false,
                ref payload,
            } if !matches!(payload, Payload::Upgrade) => self.on_read_grant(from, page as usize),
            Msg::Diff { page, .. } => {
                let page = self.page_homed_here(page, from, "a diff")?;
                // Into the master's twinned mapping: the words reach the
                // other copies with the home's next barrier diff.
                let mut actions = self.twin_master(page);
                actions.push(Action::ApplyDiff { page });
                actions.push(Action::Send {
                    to: from,
                    msg: Msg::DiffAck { page: page as u64 },
                });
                Ok(actions)
            }
            Msg::DiffAck { page } => {
                if self.releasing.acks_due == 0 || self.home_of(page as usize) != from {
                    return Err(CoherenceError::Unexpected {
                        page: page as usize,
                        from,
                        what: "an acknowledgement of a diff it was not sent",
                    });
                }
                self.evicting.remove(&(page as usize));
                self.lock_written_now.remove(&(page as usize));
                self.releasing.acks_due -= 1;
                Ok(self.release_done())
            }
            _ => Err(CoherenceError::Unexpected {
                page: 0,
                from,
                what: "a message of another protocol",
            }),
        }
    }

    /// Grants `to` a copy of the master of `page`: the first grant
    /// write-protects it (mapping it first, zeros, if never touched), so
    /// that the home's stores from then on are twinned.
    fn grant_master(&mut self, to: Rank, page: usize) -> Vec<Action> {
        let mut actions = Vec::with_capacity(3);
        if let std::collections::btree_map::Entry::Vacant(new) = self.masters.entry(page) {
            new.insert(Master::Protected);
            if self.mapped_here.insert(page) {
                actions.push(Action::InstallZero { page });
            }
            actions.push(Action::Protect { page });
        }
        actions.push(Action::GrantFromBacking {
            to,
            page,
            write: false,
        });
        actions
    }

    /// Makes the master of `page` writable with its twin, mapping it
    /// first (zeros) if never touched, to write diffs into it.
    fn twin_master(&mut self, page: usize) -> Vec<Action> {
        let mut actions = Vec::with_capacity(4);
        if self.mapped_here.insert(page) {
            actions.push(Action::InstallZero { page });
        }
        match self.masters.insert(page, Master::Twinned) {
            Some(Master::Twinned) => {}
            Some(Master::Protected) => {
                actions.extend([Action::TakeTwin { page }, Action::MakeWritable { page }])
            }
            None => actions.extend([
                // Written freely so far: protected before its twin is read.
                Action::Protect { page },
                Action::TakeTwin { page },
                Action::MakeWritable { page },
            ]),
        }
        actions
    }

    fn page_homed_here(
        &self,
        page: u64,
        from: Rank,
        what: &'static str,
    ) -> Result<usize, CoherenceError> {
        let page = page as usize;
        self.check(page)?;
        if self.home_of(page) != self.rank || from == self.rank {
            return Err(CoherenceError::Unexpected { page, from, what });
        }
        Ok(page)
    }

    /// The home's grant of a copy of `page` (its bytes travel beside:
    /// the state machine does not need them).
    pub fn on_read_grant(&mut self, from: Rank, page: usize) -> Actions {
        self.check(page)?;
        let copy = self.copy_of(page).unwrap_or(RcCopy::Invalid);
        let RcCopy::Fetching { write, stale } = copy else {
            return Err(CoherenceError::Unexpected {
                page,
                from,
                what: "a grant it did not ask for",
            });
        };
        if from != self.home_of(page) {
            return Err(CoherenceError::Unexpected {
                page,
                from,
                what: "a grant of a page it is not home of",
            });
        }
        if stale {
            // Asked for before the last acquire: the home has more now.
            self.set(
                page,
                RcCopy::Fetching {
                    write,
                    stale: false,
                },
            );
            return Ok(vec![self.copy_request(page)]);
        }
        if write {
            // Its twin is the granted bytes: mapped writable at once.
            self.set(page, RcCopy::Dirty);
            return Ok(vec![Action::InstallTwinned { page }]);
        }
        self.set(page, RcCopy::Clean);
        Ok(vec![Action::Install {
            page,
            writable: false,
        }])
    }

    /// A release (before an unlock, a barrier, a lock request): the dirty
    /// copies' diffs go to their homes, each copy clean again. The release
    /// is done when [`Action::Released`] comes out, now or once the last
    /// acknowledgement arrives. One release at a time.
    ///
    /// For a barrier entry, the diffs of its dirty copies (but under a
    /// lock another thread holds) and of its twinned master copies are
    /// collected into the entry ([`Action::CollectDiff`]) instead, and
    /// reach every rank with the barrier's release ([`ReleaseFor`]).
    pub fn release(&mut self, release_for: ReleaseFor) -> Actions {
        if self.releasing.waiting {
            return Err(CoherenceError::Unexpected {
                page: 0,
                from: self.rank,
                what: "a release while another waits",
            });
        }
        let mut actions = Vec::with_capacity(self.dirty.len() + 1);
        let dirty = std::mem::take(&mut self.dirty);
        for &page in &dirty {
            if let Some(c) = self.local.get_mut(page) {
                *c = RcCopy::Clean;
            }
            self.written.insert(page);
        }
        // Only the barrier's release ends `in_barrier`: a lock's release
        // in between (another thread's) leaves it set.
        if release_for != ReleaseFor::Lock {
            self.in_barrier = true;
        }
        self.lock_written_now.clear();
        let (mut collected, sent) = if release_for == ReleaseFor::Barrier {
            (dirty, BTreeSet::new())
        } else {
            (BTreeSet::new(), dirty)
        };
        // The collected diffs come first: the last sent one, if empty,
        // completes the release at once, and the entry then leaves
        // (`Action::Released`); it must carry them.
        if release_for != ReleaseFor::Lock {
            for (&page, master) in self.masters.iter_mut() {
                if *master == Master::Twinned {
                    *master = Master::Protected;
                    collected.insert(page);
                }
            }
            actions.extend(
                collected
                    .into_iter()
                    .map(|page| Action::CollectDiff { page }),
            );
        }
        for &page in &sent {
            self.name_lock_written(page);
        }
        self.releasing.acks_due += sent.len();
        actions.extend(sent.into_iter().map(|page| Action::SendDiff {
            to: self.home_of(page),
            page,
        }));
        self.releasing.waiting = true;
        actions.extend(self.release_done());
        Ok(actions)
    }

    /// The diff of `page` (an [`Action::SendDiff`] or
    /// [`Action::CollectDiff`] of the release under way) turned out empty:
    /// nothing changed since the twin, nothing is sent, and the page is not
    /// one this rank writes every step (the next lock's acquire does not
    /// ask for it again).
    pub fn diff_empty(&mut self, page: usize, collected: bool) -> Actions {
        let written = self.written.remove(&page) | self.evicting.remove(&page);
        if collected {
            return Ok(Vec::new());
        }
        if self.releasing.acks_due == 0 || !written {
            return Err(CoherenceError::Unexpected {
                page,
                from: self.rank,
                what: "an empty diff it did not send",
            });
        }
        if self.lock_written_now.remove(&page) {
            self.lock_written.remove(&page);
        }
        self.releasing.acks_due -= 1;
        Ok(self.release_done())
    }

    /// `page`'s diff is being sent to its home: the next entry names it
    /// (`lock_written`), and an empty diff takes it out again only if this
    /// one put it there (`lock_written_now`).
    fn name_lock_written(&mut self, page: usize) {
        if self.lock_written.insert(page) {
            self.lock_written_now.insert(page);
        }
    }

    /// The pages whose diffs this rank's lock releases sent since its last
    /// barrier entry, for the entry being sent (none left after).
    pub fn take_lock_written(&mut self) -> Vec<usize> {
        self.lock_written_now.clear();
        std::mem::take(&mut self.lock_written).into_iter().collect()
    }

    /// Barrier `epoch` was released, carrying the diffs of `pages` (in
    /// order, each once) and naming `lock_written`, pages written under
    /// locks before some rank's entry: the copies of those go (their homes
    /// have the words; a dirty one once released, see
    /// [`Release::drop_lock_written`]). The copies and master copies this rank holds
    /// take them ([`Action::ApplyUpdates`], twinned and writable first, so
    /// that only this rank's own stores differ from the twin), a fetch of
    /// one in flight is asked again when its grant arrives (it may have
    /// been answered before the home took the diffs; a page no diff names
    /// did not change), and the copy requests of
    /// ranks past the barrier are answered. [`Action::BarrierDiffsIn`]
    /// ends the actions. Barriers are released in order, each once every
    /// rank entered it.
    pub fn barrier_released(
        &mut self,
        epoch: u64,
        pages: impl IntoIterator<Item = usize>,
        lock_written: impl IntoIterator<Item = usize>,
    ) -> Actions {
        if epoch <= self.complete {
            return Err(CoherenceError::Unexpected {
                page: 0,
                from: 0,
                what: "a barrier released twice, or before the one before it",
            });
        }
        self.in_barrier = false;
        let mut drops = Vec::new();
        for page in lock_written {
            self.check(page)?;
            if self.home_of(page) == self.rank {
                continue;
            }
            match self.copy_of(page).unwrap_or(RcCopy::Invalid) {
                RcCopy::Clean => {
                    self.set(page, RcCopy::Invalid);
                    self.dropped.insert(page);
                    drops.push(Action::DropPage { page });
                }
                RcCopy::Dirty => {
                    self.drop_after_release.insert(page);
                }
                RcCopy::Fetching { write, .. } => {
                    self.set(page, RcCopy::Fetching { write, stale: true })
                }
                RcCopy::Invalid => {}
            }
        }
        let mut twins = Vec::new();
        let mut applies = Vec::new();
        for page in pages {
            self.check(page)?;
            if self.home_of(page) == self.rank {
                twins.extend(self.twin_master(page));
                applies.push(Action::ApplyUpdates { page });
                continue;
            }
            match self.copy_of(page).unwrap_or(RcCopy::Invalid) {
                RcCopy::Clean => {
                    self.set(page, RcCopy::Dirty);
                    twins.extend([Action::TakeTwin { page }, Action::MakeWritable { page }]);
                    applies.push(Action::ApplyUpdates { page });
                }
                RcCopy::Dirty => applies.push(Action::ApplyUpdates { page }),
                RcCopy::Fetching { write, .. } => {
                    self.set(page, RcCopy::Fetching { write, stale: true })
                }
                RcCopy::Invalid => {}
            }
        }
        // The drops first, every twin taken next, then the protections
        // lifted (in runs of consecutive pages), then the words written.
        let (writable, twins): (Vec<Action>, Vec<Action>) = twins
            .into_iter()
            .partition(|a| matches!(a, Action::MakeWritable { .. }));
        let mut actions = drops;
        actions.extend(twins);
        actions.extend(writable);
        actions.extend(applies);
        self.complete = epoch;
        self.passed = self.passed.max(epoch);
        // The copies written before stay mapped and writable: a lock's
        // acquire after this asks again only for pages written since.
        self.written.clear();
        let deferred = std::mem::take(&mut self.deferred);
        for (to, page, barriers) in deferred {
            if barriers > epoch {
                self.deferred.push((to, page, barriers));
            } else {
                actions.extend(self.grant_master(to, page));
            }
        }
        actions.push(Action::BarrierDiffsIn { epoch });
        Ok(actions)
    }

    fn release_done(&mut self) -> Vec<Action> {
        if self.releasing.waiting && self.releasing.acks_due == 0 {
            self.releasing.waiting = false;
            vec![Action::Released]
        } else {
            Vec::new()
        }
    }

    /// True when a barrier's release named a copy written under a lock
    /// that was dirty here: the caller releases (acknowledged) before
    /// [`Release::drop_lock_written`].
    pub fn lock_written_dirty(&self) -> bool {
        !self.drop_after_release.is_empty()
    }

    /// Drops the copies a barrier's release named as written under a lock
    /// that were dirty then (released since: clean now, their writes at
    /// their homes; the caller releases first, [`Release::lock_written_dirty`]).
    pub fn drop_lock_written(&mut self) -> Actions {
        if self.drop_after_release.is_empty() {
            return Ok(Vec::new());
        }
        if self.releasing.waiting || !self.dirty.is_empty() {
            return Err(CoherenceError::Unexpected {
                page: self.dirty.first().copied().unwrap_or(0),
                from: self.rank,
                what: "a drop of copies written under a lock before their release",
            });
        }
        let mut actions = Vec::new();
        for page in std::mem::take(&mut self.drop_after_release) {
            if self.copy_of(page) == Some(RcCopy::Clean) {
                self.set(page, RcCopy::Invalid);
                self.dropped.insert(page);
                actions.push(Action::DropPage { page });
            }
        }
        Ok(actions)
    }

    /// The acquire of a lock granted: every copy of a page homed elsewhere
    /// is dropped, and those this rank wrote since the last acquire are
    /// asked for again at once, writable (most likely written again); a
    /// fetch in flight is asked again when its grant arrives. It follows a
    /// completed release with no copy dirty since (the caller releases
    /// again while one is: another thread's write, a copy that came back
    /// writable, or one a barrier's diffs went into): a dirty copy would
    /// keep words older than the acquire. (A barrier needs no acquire: its
    /// release brings every diff to the copies, [`Release::barrier_released`].)
    pub fn acquire(&mut self) -> Actions {
        if self.releasing.waiting || !self.dirty.is_empty() {
            return Err(CoherenceError::Unexpected {
                page: self.dirty.first().copied().unwrap_or(0),
                from: self.rank,
                what: "an acquire before its release completed",
            });
        }
        let mut actions = Vec::new();
        let mut refetch = Vec::new();
        let held = std::mem::take(&mut self.held);
        let written = std::mem::take(&mut self.written);
        for page in held {
            match self.copy_of(page) {
                Some(RcCopy::Fetching { write, .. }) => {
                    self.set(page, RcCopy::Fetching { write, stale: true });
                }
                Some(RcCopy::Clean) if written.contains(&page) => {
                    // Written last step, most likely written again: it
                    // comes back writable, with its twin (an empty diff at
                    // the next release says it was not).
                    let fetching = RcCopy::Fetching {
                        write: true,
                        stale: false,
                    };
                    self.set(page, fetching);
                    actions.push(Action::DropPage { page });
                    refetch.push(self.copy_request(page));
                }
                Some(RcCopy::Clean) => {
                    self.set(page, RcCopy::Invalid);
                    self.dropped.insert(page);
                    actions.push(Action::DropPage { page });
                }
                Some(RcCopy::Dirty | RcCopy::Invalid) | None => {}
            }
        }
        // Every drop first: the requests leave after them.
        actions.extend(refetch);
        Ok(actions)
    }

    /// True when a collective free may take `page` away here: no fetch of
    /// it in flight, and no diff waiting for its acknowledgement (which
    /// names a page whose home is about to be forgotten).
    pub fn free_ready(&self, page: usize) -> bool {
        !self.releasing.waiting
            && !self.evicting.contains(&page)
            && !matches!(self.copy_of(page), Some(RcCopy::Fetching { .. }))
    }

    /// A collective free's first step: this rank's copy of `page` goes,
    /// writes to it included (the memory is being freed).
    pub fn release_for_free(&mut self, page: usize) -> Vec<Action> {
        self.written.remove(&page);
        self.dropped.remove(page);
        self.lock_written.remove(&page);
        self.lock_written_now.remove(&page);
        self.drop_after_release.remove(&page);
        // A master's twin goes with the copies' (the engine drops them all):
        // writable and untracked again, its home's writes to freed memory
        // are not sent.
        if self.masters.remove(&page) == Some(Master::Protected) {
            return vec![Action::MakeWritable { page }];
        }
        match self.copy_of(page) {
            Some(RcCopy::Clean | RcCopy::Dirty) => {
                self.set(page, RcCopy::Invalid);
                vec![Action::DropPage { page }]
            }
            _ => Vec::new(),
        }
    }

    /// A collective free's second step at a page's home (or a private
    /// page's rank): its master copy is forgotten (the engine unmaps it).
    pub fn reset_home_page(&mut self, page: usize) {
        self.mapped_here.remove(&page);
        self.masters.remove(&page);
    }

    /// Gives up a copy to make room (a bounded cache). A clean copy is
    /// dropped. A dirty one is released alone, as a lock's release would:
    /// its diff goes to its home, acknowledged (the caller write-protects
    /// the page first, as for any [`Action::SendDiff`]), the copy is
    /// dropped at once, and the next barrier entry names the page among
    /// those written under a lock (the other ranks' copies of it go at that
    /// barrier). A later fetch of the page reaches the home after the diff
    /// (one link, in order); a release waits for the acknowledgement like
    /// its own. Nothing, and no change, for a copy being fetched or absent,
    /// and for a dirty one while a release waits (which then waits only
    /// for the evictions before it: a thread streaming stores cannot hold
    /// it back) or between this rank's barrier entry and its release (the
    /// entry may carry an older diff of the page, which the merge would
    /// put over this one at the home).
    pub fn evict(&mut self, page: usize) -> Vec<Action> {
        match self.copy_of(page) {
            Some(RcCopy::Clean) => {
                self.set(page, RcCopy::Invalid);
                vec![Action::DropPage { page }]
            }
            Some(RcCopy::Dirty) if !self.releasing.waiting && !self.in_barrier => {
                self.set(page, RcCopy::Invalid);
                self.lock_written_now.clear();
                self.name_lock_written(page);
                self.evicting.insert(page);
                self.releasing.acks_due += 1;
                vec![
                    Action::SendDiff {
                        to: self.home_of(page),
                        page,
                    },
                    Action::DropPage { page },
                ]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::DiffRuns;

    fn grant(page: u64) -> Msg {
        Msg::Grant {
            page,
            write: false,
            payload: Payload::Zero,
        }
    }

    #[test]
    fn two_writers_of_one_page_write_at_once_and_send_diffs_at_release() {
        // Page 0 is homed at rank 0; ranks 1 and 2 both write it.
        let mut a = Release::new(1, 3, 4);
        let mut b = Release::new(2, 3, 4);
        for node in [&mut a, &mut b] {
            let actions = node.on_fault(0, true).unwrap();
            assert_eq!(
                actions,
                vec![Action::Send {
                    to: 0,
                    msg: Msg::CopyReq {
                        page: 0,
                        barriers: 0
                    }
                }]
            );
            let actions = node.on_message(0, &grant(0)).unwrap();
            assert_eq!(actions, vec![Action::InstallTwinned { page: 0 }]);
            assert_eq!(node.copy_of(0), Some(RcCopy::Dirty));
        }
        let released = a.release(ReleaseFor::Lock).unwrap();
        assert_eq!(released, vec![Action::SendDiff { to: 0, page: 0 }]);
        assert!(!a.quiescent());
        assert_eq!(
            a.on_message(0, &Msg::DiffAck { page: 0 }).unwrap(),
            vec![Action::Released]
        );
        assert!(a.quiescent());
        assert_eq!(a.copy_of(0), Some(RcCopy::Clean));
        // Written since the last acquire: dropped and asked for again,
        // to come back writable with its twin.
        assert_eq!(
            a.acquire().unwrap(),
            vec![
                Action::DropPage { page: 0 },
                Action::Send {
                    to: 0,
                    msg: Msg::CopyReq {
                        page: 0,
                        barriers: 0
                    }
                }
            ]
        );
        assert!(!a.quiescent());
        let back = a.on_message(0, &grant(0)).unwrap();
        assert_eq!(back, vec![Action::InstallTwinned { page: 0 }]);
        assert_eq!(a.copy_of(0), Some(RcCopy::Dirty));
        // Not written this time: its diff is empty, nothing is sent, and
        // the next acquire only drops it.
        assert_eq!(
            a.release(ReleaseFor::Lock).unwrap(),
            vec![Action::SendDiff { to: 0, page: 0 }]
        );
        assert_eq!(a.diff_empty(0, false).unwrap(), vec![Action::Released]);
        assert!(a.diff_empty(0, false).is_err());
        assert_eq!(a.acquire().unwrap(), vec![Action::DropPage { page: 0 }]);
    }

    /// The read requests among `actions`, by page.
    fn asked(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send {
                    msg: Msg::CopyReq { page, .. },
                    ..
                } => Some(*page),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_fault_on_a_copy_the_acquire_dropped_asks_for_the_run_dropped_with_it() {
        let mut node = Release::new(1, 2, 8);
        node.set_home(0..8, 0);
        for page in 0..4 {
            assert_eq!(asked(&node.on_fault(page, false).unwrap()), [page as u64]);
            node.on_message(0, &grant(page as u64)).unwrap();
        }
        assert_eq!(
            node.release(ReleaseFor::Lock).unwrap(),
            vec![Action::Released]
        );
        assert_eq!(asked(&node.acquire().unwrap()), Vec::<u64>::new());
        // Pages 1-3 read last step, dropped together: asked for together.
        assert_eq!(asked(&node.on_fault(1, false).unwrap()), [1, 2, 3]);
        // Already on their way: a fault on one waits for it.
        assert!(asked(&node.on_fault(2, false).unwrap()).is_empty());
        // Page 0 (before the fault) on its own fault; page 4 was never read.
        assert_eq!(asked(&node.on_fault(0, false).unwrap()), [0]);
        assert_eq!(asked(&node.on_fault(4, false).unwrap()), [4]);
        assert!(node.on_fault(5, false).is_ok());
        assert!((0..8).all(|p| !node.dropped.contains(p)));
        // Pages dropped at an earlier acquire still count: grids that
        // alternate read one row one step, another the next.
        for page in 6..8 {
            node.on_fault(page, false).unwrap();
        }
        for page in 0..8 {
            node.on_message(0, &grant(page)).unwrap();
        }
        node.acquire().unwrap();
        node.acquire().unwrap();
        assert_eq!(asked(&node.on_fault(6, false).unwrap()), [6, 7]);
    }

    #[test]
    fn the_home_applies_a_diff_and_acknowledges_it() {
        let mut home = Release::new(0, 2, 2);
        let diff = Msg::Diff {
            page: 0,
            runs: DiffRuns::new(),
        };
        assert_eq!(
            home.on_message(1, &diff).unwrap(),
            vec![
                // Never touched at its home: mapped first, then twinned
                // (the words reach the copies with its next barrier diff).
                Action::InstallZero { page: 0 },
                Action::Protect { page: 0 },
                Action::TakeTwin { page: 0 },
                Action::MakeWritable { page: 0 },
                Action::ApplyDiff { page: 0 },
                Action::Send {
                    to: 1,
                    msg: Msg::DiffAck { page: 0 }
                }
            ]
        );
        assert!(home.mapped_here(0));
        assert_eq!(home.on_message(1, &diff).unwrap().len(), 2);
        // Not its page: a protocol error, not a silent write.
        assert!(home
            .on_message(
                1,
                &Msg::Diff {
                    page: 1,
                    runs: DiffRuns::new(),
                }
            )
            .is_err());
    }

    #[test]
    fn a_barrier_carries_the_diffs_into_every_copy_and_answers_ranks_past_it() {
        // Rank 1 writes page 0 (homed at rank 0) and enters barrier 1: its
        // diff is collected into the entry.
        let mut writer = Release::new(1, 3, 2);
        writer.on_fault(0, true).unwrap();
        writer.on_message(0, &grant(0)).unwrap();
        assert_eq!(
            writer.release(ReleaseFor::Barrier).unwrap(),
            vec![Action::CollectDiff { page: 0 }, Action::Released]
        );
        assert_eq!(writer.copy_of(0), Some(RcCopy::Clean));
        // The release brings it back: the copy is twinned, made writable
        // and takes the barrier's diffs; no acquire drops it.
        assert_eq!(
            writer.barrier_released(1, [0], []).unwrap(),
            vec![
                Action::TakeTwin { page: 0 },
                Action::MakeWritable { page: 0 },
                Action::ApplyUpdates { page: 0 },
                Action::BarrierDiffsIn { epoch: 1 }
            ]
        );
        assert_eq!(writer.copy_of(0), Some(RcCopy::Dirty));
        assert_eq!(writer.barriers_passed(), 1);
        // Rank 2 handled the release before the home: its request waits.
        let mut home = Release::new(0, 3, 2);
        let ask = Msg::CopyReq {
            page: 0,
            barriers: 1,
        };
        assert_eq!(home.on_message(2, &ask).unwrap(), Vec::new());
        assert!(!home.quiescent());
        assert_eq!(
            home.barrier_released(1, [0], []).unwrap(),
            vec![
                // Never touched at its home: mapped and protected first,
                Action::InstallZero { page: 0 },
                Action::Protect { page: 0 },
                Action::TakeTwin { page: 0 },
                Action::MakeWritable { page: 0 },
                Action::ApplyUpdates { page: 0 },
                // then the request answered.
                Action::GrantFromBacking {
                    to: 2,
                    page: 0,
                    write: false
                },
                Action::BarrierDiffsIn { epoch: 1 }
            ]
        );
        assert!(home.quiescent());
        // The twinned master's diff goes with the home's next entry.
        assert_eq!(
            home.release(ReleaseFor::Barrier).unwrap(),
            vec![Action::CollectDiff { page: 0 }, Action::Released]
        );
        // A request of a rank behind is answered at once; a barrier
        // released twice is an error.
        let behind = Msg::CopyReq {
            page: 0,
            barriers: 0,
        };
        assert_eq!(home.on_message(1, &behind).unwrap().len(), 1);
        assert!(home.barrier_released(1, [], []).is_err());
        // Nothing carried: passed at once.
        assert_eq!(
            home.barrier_released(2, [], []).unwrap(),
            vec![Action::BarrierDiffsIn { epoch: 2 }]
        );
    }

    #[test]
    fn a_master_granted_once_twins_its_home_s_stores() {
        let mut home = Release::new(0, 2, 2);
        assert_eq!(
            home.on_fault(0, true).unwrap(),
            vec![Action::InstallZero { page: 0 }]
        );
        // Written freely until its first copy leaves, write-protected first.
        assert_eq!(
            home.on_fault(0, true).unwrap(),
            vec![Action::Wake { page: 0 }]
        );
        let ask = Msg::CopyReq {
            page: 0,
            barriers: 0,
        };
        assert_eq!(
            home.on_message(1, &ask).unwrap(),
            vec![
                Action::Protect { page: 0 },
                Action::GrantFromBacking {
                    to: 1,
                    page: 0,
                    write: false
                }
            ]
        );
        assert_eq!(home.on_message(1, &ask).unwrap().len(), 1);
        // The next store takes a twin, whose diff the entry collects.
        assert_eq!(
            home.on_fault(0, true).unwrap(),
            vec![
                Action::TakeTwin { page: 0 },
                Action::MakeWritable { page: 0 }
            ]
        );
        assert_eq!(
            home.release(ReleaseFor::Lock).unwrap(),
            vec![Action::Released]
        );
        assert_eq!(
            home.release(ReleaseFor::Barrier).unwrap(),
            vec![Action::CollectDiff { page: 0 }, Action::Released]
        );
        assert_eq!(home.diff_empty(0, true).unwrap(), Vec::new());
        // A lock's diff goes into the twinned master (acknowledged).
        let diff = Msg::Diff {
            page: 0,
            runs: DiffRuns::new(),
        };
        assert_eq!(
            home.on_message(1, &diff).unwrap(),
            vec![
                Action::TakeTwin { page: 0 },
                Action::MakeWritable { page: 0 },
                Action::ApplyDiff { page: 0 },
                Action::Send {
                    to: 1,
                    msg: Msg::DiffAck { page: 0 }
                }
            ]
        );
    }

    #[test]
    fn copies_written_under_a_lock_go_at_the_barrier_a_dirty_one_once_released() {
        // Rank 1 holds pages 0 (clean) and 1 (dirty: another thread wrote
        // it during the barrier); the barrier names both as written under
        // a lock by another rank.
        let mut node = Release::new(1, 2, 2);
        node.set_home(0..2, 0);
        for page in 0..2 {
            node.on_fault(page, false).unwrap();
            node.on_message(0, &grant(page as u64)).unwrap();
        }
        node.on_fault(1, true).unwrap();
        assert_eq!(
            node.barrier_released(1, [], [0, 1]).unwrap(),
            vec![
                Action::DropPage { page: 0 },
                Action::BarrierDiffsIn { epoch: 1 }
            ]
        );
        assert!(node.lock_written_dirty());
        assert!(!node.quiescent());
        // Released (acknowledged) first, then dropped.
        assert!(node.drop_lock_written().is_err());
        assert_eq!(
            node.release(ReleaseFor::Lock).unwrap(),
            vec![Action::SendDiff { to: 0, page: 1 }]
        );
        assert_eq!(
            node.on_message(0, &Msg::DiffAck { page: 1 }).unwrap(),
            vec![Action::Released]
        );
        assert_eq!(
            node.drop_lock_written().unwrap(),
            vec![Action::DropPage { page: 1 }]
        );
        assert!(node.quiescent());
        assert_eq!(node.take_lock_written(), vec![1]);
        // A fault asks for both again, in one run.
        assert_eq!(asked(&node.on_fault(0, false).unwrap()), [0, 1]);
    }

    #[test]
    fn a_lock_taken_after_a_rank_past_a_barrier_asks_as_if_past_it_too() {
        // Rank 1's thread takes a lock that rank 2 released after passing
        // barrier 3, while rank 1's own barrier thread has not passed it:
        // the copy it asks for must hold barrier 3's diffs.
        let mut node = Release::new(1, 3, 2);
        assert_eq!(node.barriers_passed(), 0);
        node.lock_taken_after(3);
        node.acquire().unwrap();
        assert_eq!(
            node.on_fault(0, false).unwrap(),
            vec![Action::Send {
                to: 0,
                msg: Msg::CopyReq {
                    page: 0,
                    barriers: 3
                }
            }]
        );
        // Passing an older barrier later does not lower it.
        node.barrier_released(2, [], []).unwrap();
        assert_eq!(node.barriers_passed(), 3);
    }

    #[test]
    fn an_evicted_dirty_copy_sends_its_diff_and_the_next_release_waits_for_it() {
        // Page 0 is homed at rank 0; rank 1 writes it, then its cache
        // gives it up.
        let mut a = Release::new(1, 2, 8);
        a.on_fault(0, true).unwrap();
        a.on_message(0, &grant(0)).unwrap();
        assert_eq!(a.copy_of(0), Some(RcCopy::Dirty));
        assert_eq!(
            a.evict(0),
            vec![
                Action::SendDiff { to: 0, page: 0 },
                Action::DropPage { page: 0 }
            ]
        );
        assert_eq!(a.copy_of(0), Some(RcCopy::Invalid));
        assert_eq!(a.held(), 0);
        assert!(!a.quiescent());
        assert!(!a.free_ready(0), "a free waits for the acknowledgement");
        // A barrier's release waits for it, and its entry names the page.
        assert_eq!(a.release(ReleaseFor::Barrier).unwrap(), Vec::new());
        assert_eq!(
            a.on_message(0, &Msg::DiffAck { page: 0 }).unwrap(),
            vec![Action::Released]
        );
        assert_eq!(a.take_lock_written(), vec![0]);
        assert!(a.quiescent());
        // Between the entry and the barrier's release a dirty copy stays:
        // the entry may carry an older diff of it.
        a.on_fault(2, true).unwrap();
        a.on_message(0, &grant(2)).unwrap();
        assert!(a.evict(2).is_empty());
        assert_eq!(
            a.barrier_released(1, Vec::new(), Vec::new()).unwrap(),
            vec![Action::BarrierDiffsIn { epoch: 1 }]
        );
        // An unwritten dirty copy's diff is empty: nothing to wait for.
        assert_eq!(a.evict(2).len(), 2);
        assert_eq!(a.diff_empty(2, false).unwrap(), Vec::new());
        assert!(a.quiescent());
        assert!(a.take_lock_written().is_empty());
        // While a release waits, a dirty copy stays: the release waits only
        // for the evictions before it.
        a.on_fault(6, true).unwrap();
        a.on_message(0, &grant(6)).unwrap();
        a.on_fault(0, true).unwrap();
        a.on_message(0, &grant(0)).unwrap();
        assert_eq!(
            a.release(ReleaseFor::Lock).unwrap(),
            vec![
                Action::SendDiff { to: 0, page: 0 },
                Action::SendDiff { to: 0, page: 6 }
            ]
        );
        a.on_fault(2, true).unwrap();
        a.on_message(0, &grant(2)).unwrap();
        assert!(a.evict(2).is_empty());
        // Nothing else goes: no copy, or one on its way.
        assert!(a.evict(4).is_empty());
        a.on_fault(4, false).unwrap();
        assert!(a.evict(4).is_empty());
    }

    #[test]
    fn an_entry_under_a_lock_collects_the_masters_before_an_empty_diff_completes_it() {
        // Rank 0 is home of page 0 (granted once, then written: twinned)
        // and holds a writable copy of page 1, homed at rank 1.
        let mut a = Release::new(0, 2, 2);
        a.on_fault(0, true).unwrap();
        let ask = Msg::CopyReq {
            page: 0,
            barriers: 0,
        };
        a.on_message(1, &ask).unwrap();
        a.on_fault(0, true).unwrap();
        a.on_fault(1, true).unwrap();
        a.on_message(1, &grant(1)).unwrap();
        // Another thread holds a lock: the copy's diff goes home, the
        // master's is collected, first.
        assert_eq!(
            a.release(ReleaseFor::BarrierUnderLock).unwrap(),
            vec![
                Action::CollectDiff { page: 0 },
                Action::SendDiff { to: 1, page: 1 }
            ]
        );
        // The copy was not written: its empty diff completes the release,
        // after the master's diff was collected.
        assert_eq!(a.diff_empty(1, false).unwrap(), vec![Action::Released]);
        // A lock's release during the barrier leaves the barrier's window
        // open: a dirty copy is not evicted until its release is handled.
        assert_eq!(a.release(ReleaseFor::Lock).unwrap(), vec![Action::Released]);
        a.on_fault(1, true).unwrap();
        assert!(a.evict(1).is_empty());
        a.barrier_released(1, Vec::new(), Vec::new()).unwrap();
        assert_eq!(a.evict(1).len(), 2);
    }

    #[test]
    fn a_release_with_nothing_dirty_is_done_at_once() {
        let mut node = Release::new(1, 2, 2);
        assert_eq!(
            node.release(ReleaseFor::Lock).unwrap(),
            vec![Action::Released]
        );
        assert_eq!(node.acquire().unwrap(), Vec::new());
    }

    #[test]
    fn a_fetch_that_crossed_an_acquire_is_asked_again() {
        let mut node = Release::new(1, 2, 2);
        node.on_fault(0, false).unwrap();
        node.release(ReleaseFor::Lock).unwrap();
        node.acquire().unwrap();
        assert_eq!(
            node.on_message(0, &grant(0)).unwrap(),
            vec![Action::Send {
                to: 0,
                msg: Msg::CopyReq {
                    page: 0,
                    barriers: 0
                }
            }]
        );
        assert_eq!(
            node.on_message(0, &grant(0)).unwrap(),
            vec![Action::Install {
                page: 0,
                writable: false
            }]
        );
    }

    #[test]
    fn unasked_grants_and_acknowledgements_are_errors() {
        let mut node = Release::new(1, 2, 2);
        assert!(node.on_message(0, &grant(0)).is_err());
        assert!(node.on_message(0, &Msg::DiffAck { page: 0 }).is_err());
        assert!(node.on_message(5, &grant(0)).is_err());
    }
}
