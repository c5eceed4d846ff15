//! Release consistency with multiple writers: false sharing without
//! ping-pong (`DSM_PROTOCOL=release`, or segments allocated with
//! `Consistency::Release`; the engine's side is in `engine/sync.rs` and
//! `engine/protocol.rs`).
//!
//! Every page has a home whose own mapping is the page's master copy: the
//! home reads and writes it in place and never faults on it again. Other
//! ranks keep copies, and several ranks may write the same page at once:
//!
//! * read fault: `CopyReq` to the home, whose grant (`Grant`, read) is
//!   installed write-protected (a clean copy);
//! * write fault: on a clean copy, the rank keeps a twin of the page (its
//!   bytes as they are) and makes it writable, with no message (a dirty
//!   copy); on no copy, it fetches one first, then does the same;
//! * release (before an unlock, a barrier, a lock request): every dirty
//!   copy is write-protected and compared with its twin, and the words that
//!   differ go to the home (`Diff`), which writes them into its master copy.
//!   Before an unlock or a lock request the home acknowledges each
//!   (`DiffAck`) and the release is done once all are, so whoever
//!   synchronizes with this rank afterwards finds the writes at the homes.
//!   Before a barrier entry nothing waits: the entry counts the diffs sent
//!   to each home, the barrier's release tells each home how many it gets,
//!   and a home passes the barrier, and answers a request of a rank that
//!   passed it (`CopyReq` carries the barriers its sender passed), only
//!   once they are all applied;
//! * acquire (after a lock grant, a barrier's release): every clean copy
//!   of a page homed elsewhere is dropped, so the next access fetches what
//!   the homes hold now; those this rank wrote since the last acquire are
//!   asked for again at once, to come back writable with a twin (iterative
//!   programs write the same pages each step; an empty diff at the next
//!   release is not sent, and stops that). A fetch in flight across the
//!   acquire may carry bytes of before it: its grant is not installed, the
//!   page is asked for again. No copy is dirty at an acquire: the engine
//!   releases again first if one became dirty since the release.
//!
//! What programs see: a data-race-free program (conflicting accesses of
//! different ranks ordered by locks or barriers) sees sequential
//! consistency. A racy one may read stale words (a copy fetched before
//! another rank's write is read until the next acquire), and two ranks
//! writing the same word between two synchronizations leave one of the two
//! values (the last diff the home applied), never a mix of bytes of a word.
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

/// The diffs barrier entries carry without acknowledgement: those this
/// rank's release for its next entry sent, and, as a home, those that
/// reached it and the requests that wait for them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
struct BarrierDiffs {
    /// Diffs sent by the release for this rank's next barrier entry, per
    /// home (what the entry carries).
    sent: BTreeMap<Rank, u32>,
    /// Diffs applied here, per barrier not yet complete here.
    applied: BTreeMap<u64, u32>,
    /// The last barrier whose diffs to this rank are all applied.
    complete: u64,
    /// The barrier released and the diffs its entries carried here, while
    /// some have yet to arrive.
    awaited: Option<(u64, u32)>,
    /// Copy requests of ranks past a barrier not complete here: (sender,
    /// page, barriers the sender passed), in order of arrival.
    deferred: Vec<(Rank, usize, u64)>,
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
    /// Pages homed elsewhere that this rank holds or fetches: what an
    /// acquire drops (kept apart so an acquire costs the copies, not the
    /// space).
    held: BTreeSet<usize>,
    /// Pages with a twin (dirty copies), in page order.
    dirty: BTreeSet<usize>,
    /// Pages whose diffs were sent since the last acquire: the next
    /// acquire asks their homes for them again at once (an iterative
    /// program writes the same pages every step), one round trip for all
    /// instead of one fault after another.
    written: BTreeSet<usize>,
    /// Clean copies acquires dropped and not asked for since (pages read
    /// in an earlier step): a fault on one asks for the run of them after
    /// it too, up to `REFETCH_RUN` pages, in one round trip (a stencil
    /// reading a neighbour's row again, in grids that alternate).
    dropped: PageSet,
    releasing: Releasing,
    /// Barriers this rank passed (what its copy requests carry).
    passed: u64,
    barrier_diffs: BarrierDiffs,
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
            releasing: Releasing::default(),
            passed: 0,
            barrier_diffs: BarrierDiffs::default(),
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

    /// The last barrier whose diffs to this rank are all in.
    pub fn barriers_complete(&self) -> u64 {
        self.barrier_diffs.complete
    }

    /// A lock taken after a rank that had passed `barriers` barriers let it
    /// go: what that rank saw, this one must (its copy requests say it
    /// passed them too, so homes answer once those barriers' diffs are in).
    pub fn lock_taken_after(&mut self, barriers: u64) {
        self.passed = self.passed.max(barriers);
    }

    /// The barrier released whose diffs to this rank are not all in yet,
    /// as (barrier, diffs applied, diffs due): what a hang report says.
    pub fn barrier_diffs_awaited(&self) -> Option<(u64, u32, u32)> {
        let diffs = &self.barrier_diffs;
        let (epoch, due) = diffs.awaited?;
        let applied = diffs.applied.get(&epoch).copied().unwrap_or(0);
        Some((epoch, applied, due))
    }

    /// Copy requests held back until a barrier's diffs are in here, and
    /// the last barrier complete here (for a hang report).
    pub fn copy_requests_held(&self) -> (usize, u64) {
        let diffs = &self.barrier_diffs;
        (diffs.deferred.len(), diffs.complete)
    }

    /// Pages holding writes not yet sent to their homes.
    pub fn dirty_pages(&self) -> usize {
        self.dirty.len()
    }

    /// Nothing in flight: no fetch, no unacknowledged diff, no release
    /// waiting, no request waiting for a barrier's diffs.
    pub fn quiescent(&self) -> bool {
        self.releasing == Releasing::default()
            && self.barrier_diffs.awaited.is_none()
            && self.barrier_diffs.deferred.is_empty()
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
            // The master copy: mapped once, writable, never taken away.
            if self.mapped_here.insert(page) {
                return Ok(vec![Action::InstallZero { page }]);
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
                if barriers > self.barrier_diffs.complete {
                    // Diffs of a barrier the sender passed may still be on
                    // their way here: answered once they are in.
                    self.barrier_diffs.deferred.push((from, page, barriers));
                    return Ok(Vec::new());
                }
                // A page its home never touched is all zeros: granted as such.
                Ok(vec![Action::GrantFromBacking {
                    to: from,
                    page,
                    write: false,
                }])
            }
            Msg::Grant {
                page,
                write: false,
                ref payload,
            } if !matches!(payload, Payload::Upgrade) => self.on_read_grant(from, page as usize),
            Msg::Diff { page, barrier, .. } => {
                let page = self.page_homed_here(page, from, "a diff")?;
                let mut actions = Vec::with_capacity(3);
                if self.mapped_here.insert(page) {
                    // Never touched here: mapped (zeros) to take the words.
                    actions.push(Action::InstallZero { page });
                }
                actions.push(Action::ApplyDiff { page });
                match barrier {
                    None => actions.push(Action::Send {
                        to: from,
                        msg: Msg::DiffAck { page: page as u64 },
                    }),
                    Some(epoch) => {
                        if epoch <= self.barrier_diffs.complete {
                            return Err(CoherenceError::Unexpected {
                                page,
                                from,
                                what: "a diff of a barrier whose diffs were all in",
                            });
                        }
                        *self.barrier_diffs.applied.entry(epoch).or_default() += 1;
                        actions.extend(self.barrier_diffs_in());
                    }
                }
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
    /// `barrier: Some(epoch)`: the release of this rank's entry into
    /// barrier `epoch`. Its diffs are not acknowledged: the release is done
    /// once they are sent, and [`Release::take_barrier_diffs`] gives the
    /// count per home that the entry carries.
    pub fn release(&mut self, barrier: Option<u64>) -> Actions {
        if self.releasing.waiting {
            return Err(CoherenceError::Unexpected {
                page: 0,
                from: self.rank,
                what: "a release while another waits",
            });
        }
        let mut actions = Vec::with_capacity(self.dirty.len() + 1);
        for page in std::mem::take(&mut self.dirty) {
            if let Some(c) = self.local.get_mut(page) {
                *c = RcCopy::Clean;
            }
            self.written.insert(page);
            let to = self.home_of(page);
            if barrier.is_some() {
                *self.barrier_diffs.sent.entry(to).or_default() += 1;
            }
            actions.push(Action::SendDiff { to, page, barrier });
        }
        if barrier.is_none() {
            self.releasing.acks_due += actions.len();
        }
        self.releasing.waiting = true;
        actions.extend(self.release_done());
        Ok(actions)
    }

    /// The diff of `page` (an [`Action::SendDiff`] of the release under
    /// way, for `barrier` as it said) turned out empty: nothing changed
    /// since the twin, nothing is sent, and the page is not one this rank
    /// writes every step (the next acquire does not ask for it again).
    pub fn diff_empty(&mut self, page: usize, barrier: Option<u64>) -> Actions {
        let not_sent = CoherenceError::Unexpected {
            page,
            from: self.rank,
            what: "an empty diff it did not send",
        };
        if barrier.is_some() {
            // Counted for the entry, not acknowledged: uncounted again.
            let home = self.home_of(page);
            let Some(count) = self.barrier_diffs.sent.get_mut(&home).filter(|n| **n > 0) else {
                return Err(not_sent);
            };
            if !self.written.remove(&page) {
                return Err(not_sent);
            }
            *count -= 1;
            if *count == 0 {
                self.barrier_diffs.sent.remove(&home);
            }
            return Ok(Vec::new());
        }
        if self.releasing.acks_due == 0 || !self.written.remove(&page) {
            return Err(not_sent);
        }
        self.releasing.acks_due -= 1;
        Ok(self.release_done())
    }

    /// The diffs the release for this rank's barrier entry sent, per home
    /// (none left counted after).
    pub fn take_barrier_diffs(&mut self) -> Vec<(Rank, u32)> {
        std::mem::take(&mut self.barrier_diffs.sent)
            .into_iter()
            .collect()
    }

    /// Barrier `epoch` was released; its entries carried `due` diffs to
    /// this rank. [`Action::BarrierDiffsIn`] comes out once they are all
    /// applied (now, or as the last arrives), with the copies requested by
    /// ranks past the barrier, held back until then. Barriers are released
    /// in order, each once every rank entered it.
    pub fn barrier_released(&mut self, epoch: u64, due: u32) -> Actions {
        if epoch <= self.barrier_diffs.complete || self.barrier_diffs.awaited.is_some() {
            return Err(CoherenceError::Unexpected {
                page: 0,
                from: 0,
                what: "a barrier released twice, or before the one before it",
            });
        }
        self.barrier_diffs.awaited = Some((epoch, due));
        Ok(self.barrier_diffs_in())
    }

    /// Completes the barrier awaited if every diff it carried here is in:
    /// answers the requests that waited for it.
    fn barrier_diffs_in(&mut self) -> Vec<Action> {
        let diffs = &mut self.barrier_diffs;
        let Some((epoch, due)) = diffs.awaited else {
            return Vec::new();
        };
        if diffs.applied.get(&epoch).copied().unwrap_or(0) < due {
            return Vec::new();
        }
        diffs.awaited = None;
        diffs.complete = epoch;
        diffs.applied.retain(|&e, _| e > epoch);
        let mut actions = Vec::new();
        diffs.deferred.retain(|&(to, page, barriers)| {
            if barriers > epoch {
                return true;
            }
            actions.push(Action::GrantFromBacking {
                to,
                page,
                write: false,
            });
            false
        });
        actions.push(Action::BarrierDiffsIn { epoch });
        actions
    }

    fn release_done(&mut self) -> Vec<Action> {
        if self.releasing.waiting && self.releasing.acks_due == 0 {
            self.releasing.waiting = false;
            vec![Action::Released]
        } else {
            Vec::new()
        }
    }

    /// An acquire (after a lock grant, a barrier's release): every copy of
    /// a page homed elsewhere is dropped, and those this rank wrote since
    /// the last acquire are asked for again at once, writable (most likely
    /// written again); a fetch in flight is asked again when its grant
    /// arrives. It follows a completed release with no copy dirty since
    /// (the caller releases again while one is: another thread's write, or
    /// a copy that came back writable): a dirty copy would keep words older
    /// than the acquire.
    ///
    /// `barrier: Some(epoch)`: the acquire of barrier `epoch` passed (the
    /// requests that follow carry it); `None`: of a lock granted.
    pub fn acquire(&mut self, barrier: Option<u64>) -> Actions {
        if self.releasing.waiting || !self.dirty.is_empty() {
            return Err(CoherenceError::Unexpected {
                page: self.dirty.first().copied().unwrap_or(0),
                from: self.rank,
                what: "an acquire before its release completed",
            });
        }
        if let Some(epoch) = barrier {
            self.passed = self.passed.max(epoch);
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
        !self.releasing.waiting && !matches!(self.copy_of(page), Some(RcCopy::Fetching { .. }))
    }

    /// A collective free's first step: this rank's copy of `page` goes,
    /// writes to it included (the memory is being freed).
    pub fn release_for_free(&mut self, page: usize) -> Vec<Action> {
        self.written.remove(&page);
        self.dropped.remove(page);
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
    }

    /// Drops a clean copy to make room (a bounded cache). `None`, and
    /// nothing done, for a copy that is dirty, being fetched, or absent.
    pub fn evict(&mut self, page: usize) -> Option<Action> {
        if self.copy_of(page) != Some(RcCopy::Clean) {
            return None;
        }
        self.set(page, RcCopy::Invalid);
        Some(Action::DropPage { page })
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
        let released = a.release(None).unwrap();
        assert_eq!(
            released,
            vec![Action::SendDiff {
                to: 0,
                page: 0,
                barrier: None
            }]
        );
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
            a.acquire(None).unwrap(),
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
            a.release(None).unwrap(),
            vec![Action::SendDiff {
                to: 0,
                page: 0,
                barrier: None
            }]
        );
        assert_eq!(a.diff_empty(0, None).unwrap(), vec![Action::Released]);
        assert!(a.diff_empty(0, None).is_err());
        assert_eq!(a.acquire(None).unwrap(), vec![Action::DropPage { page: 0 }]);
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
        assert_eq!(node.release(None).unwrap(), vec![Action::Released]);
        assert_eq!(asked(&node.acquire(None).unwrap()), Vec::<u64>::new());
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
        node.acquire(None).unwrap();
        node.acquire(None).unwrap();
        assert_eq!(asked(&node.on_fault(6, false).unwrap()), [6, 7]);
    }

    #[test]
    fn the_home_applies_a_diff_and_acknowledges_it() {
        let mut home = Release::new(0, 2, 2);
        let diff = Msg::Diff {
            page: 0,
            runs: DiffRuns::new(),
            barrier: None,
        };
        assert_eq!(
            home.on_message(1, &diff).unwrap(),
            vec![
                // Never touched at its home: mapped first.
                Action::InstallZero { page: 0 },
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
                    barrier: None,
                }
            )
            .is_err());
    }

    #[test]
    fn a_home_answers_ranks_past_a_barrier_once_its_diffs_are_in() {
        // Rank 1 writes page 0 (homed at rank 0) and enters barrier 1: its
        // diff travels unacknowledged, counted in the entry.
        let mut writer = Release::new(1, 3, 2);
        writer.on_fault(0, true).unwrap();
        writer.on_message(0, &grant(0)).unwrap();
        assert_eq!(
            writer.release(Some(1)).unwrap(),
            vec![
                Action::SendDiff {
                    to: 0,
                    page: 0,
                    barrier: Some(1)
                },
                Action::Released
            ]
        );
        assert_eq!(writer.take_barrier_diffs(), vec![(0, 1)]);
        assert!(writer.take_barrier_diffs().is_empty());
        // Rank 2 passed the barrier before the diff reached the home: its
        // request waits, as does the home's own passing.
        let mut home = Release::new(0, 3, 2);
        let ask = Msg::CopyReq {
            page: 0,
            barriers: 1,
        };
        assert_eq!(home.on_message(2, &ask).unwrap(), Vec::new());
        assert_eq!(home.barrier_released(1, 1).unwrap(), Vec::new());
        assert!(!home.quiescent());
        let diff = Msg::Diff {
            page: 0,
            runs: DiffRuns::new(),
            barrier: Some(1),
        };
        assert_eq!(
            home.on_message(1, &diff).unwrap(),
            vec![
                Action::InstallZero { page: 0 },
                Action::ApplyDiff { page: 0 },
                Action::GrantFromBacking {
                    to: 2,
                    page: 0,
                    write: false
                },
                Action::BarrierDiffsIn { epoch: 1 }
            ]
        );
        assert!(home.quiescent());
        // A request of a rank behind is answered at once; a late diff of a
        // barrier complete is an error.
        let behind = Msg::CopyReq {
            page: 0,
            barriers: 0,
        };
        assert_eq!(home.on_message(1, &behind).unwrap().len(), 1);
        assert!(home.on_message(1, &diff).is_err());
        // Nothing carried: passed at once.
        assert_eq!(
            home.barrier_released(2, 0).unwrap(),
            vec![Action::BarrierDiffsIn { epoch: 2 }]
        );
    }

    #[test]
    fn a_lock_taken_after_a_rank_past_a_barrier_asks_as_if_past_it_too() {
        // Rank 1's thread takes a lock that rank 2 released after passing
        // barrier 3, while rank 1's own barrier thread has not passed it:
        // the copy it asks for must hold barrier 3's diffs.
        let mut node = Release::new(1, 3, 2);
        assert_eq!(node.barriers_passed(), 0);
        node.lock_taken_after(3);
        node.acquire(None).unwrap();
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
        node.acquire(Some(2)).unwrap();
        assert_eq!(node.barriers_passed(), 3);
    }

    #[test]
    fn a_release_with_nothing_dirty_is_done_at_once() {
        let mut node = Release::new(1, 2, 2);
        assert_eq!(node.release(None).unwrap(), vec![Action::Released]);
        assert_eq!(node.acquire(None).unwrap(), Vec::new());
    }

    #[test]
    fn a_fetch_that_crossed_an_acquire_is_asked_again() {
        let mut node = Release::new(1, 2, 2);
        node.on_fault(0, false).unwrap();
        node.release(None).unwrap();
        node.acquire(None).unwrap();
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
