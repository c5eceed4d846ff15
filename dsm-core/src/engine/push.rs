//! Pushing pages to their consumers at barriers (multi-reader protocol,
//! `DSM_PUSH`), for producer/consumer codes such as a stencil's boundary
//! rows, written by their home each step and read by a neighbour after the
//! barrier:
//!
//! * a reader that asks for a page again after losing it (to a write, or
//!   dropped) becomes one of its consumers at the home;
//! * at each barrier entry, after its writes, the home pushes every page
//!   it wrote since (its directory says: exclusive here) to its consumers
//!   that hold no copy (`Mrsw::push`): the copy travels ahead of the
//!   barrier's messages, and the consumer reads it after the barrier
//!   without a fault;
//! * at its next barrier entry the consumer drops the pushed copy (an
//!   eviction, the home told): the home's next write then takes no
//!   invalidation round trip, and is pushed again at the next barrier.
//!
//! So a step costs the consumer no fault and the home no interruption
//! mid-step. A reader that stops using a page is not told apart from one
//! that uses it (a mapped page's reads are invisible): after `limit`
//! pushes without a request of its own the pair expires, until the
//! reader asks again. A reader that asks again after its pair expired was
//! still consuming: its pair's limit doubles (up to `MOST_LIMIT_DOUBLINGS`
//! times), so a steady consumer faults once in `limit + 1` steps, then in
//! `2 limit + 1`, and so on, while one that stopped costs at most its
//! pair's limit in pages sent for nothing.

use rustc_hash::{FxHashMap, FxHashSet};

use super::protocol::Carried;
use super::{Engine, Node};
use crate::coherence::mrsw::{Copy, Directory};
use crate::error::DsmError;
use crate::stats::Stats;
use crate::Rank;

/// Most (page, reader) pairs remembered as lost, or as consumers whose
/// pushes expired: past it the record starts over (what it forgets costs
/// one fault more, not a wrong result).
const MOST_LOST: usize = 1 << 16;

/// How many times a consumer's limit doubles, each time it asks again
/// after its pushes expired: 8 pushes become at most 8 x 2^4 = 128.
const MOST_LIMIT_DOUBLINGS: u32 = 4;

/// A consumer: a (page, reader) pair asked for again after a loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Consumer {
    /// Pushes since the reader's last request.
    pushes: u32,
    /// Pushes without a request of its own before the pair expires.
    limit: u32,
    /// The pair reached its limit: no pushes until the reader asks again.
    expired: bool,
}

/// The home's record of which readers consume its pages, and the copies
/// pushed to this rank as a reader.
#[derive(Default)]
pub(super) struct Consumers {
    /// Pushes to a new consumer without a request of its own before the
    /// pair expires (0: pushing off).
    pub(super) limit: u32,
    /// (page, reader) pairs whose copy went (a write's invalidation, or
    /// the reader dropped it), not asked for since.
    lost: FxHashSet<(usize, Rank)>,
    /// Consumers, expired ones included (they keep their limit).
    pushes: FxHashMap<(usize, Rank), Consumer>,
    /// Pages other homes pushed to this rank, with the barriers it had
    /// passed when each arrived: a copy pushed at barrier `e` serves this
    /// rank's step after it and is dropped at its next barrier entry.
    received: Vec<(usize, u64)>,
}

impl Consumers {
    /// `reader` asked for `page` (homed here).
    pub(super) fn asked(&mut self, page: usize, reader: Rank) {
        if self.limit == 0 {
            return;
        }
        if let Some(consumer) = self.pushes.get_mut(&(page, reader)) {
            if consumer.expired {
                // Still reading: it faulted for want of a push.
                consumer.expired = false;
                consumer.limit = consumer
                    .limit
                    .saturating_mul(2)
                    .min(self.limit << MOST_LIMIT_DOUBLINGS);
            }
            consumer.pushes = 0;
        } else if self.lost.remove(&(page, reader)) {
            if self.pushes.len() >= MOST_LOST {
                self.pushes.retain(|_, c| !c.expired);
            }
            let consumer = Consumer {
                pushes: 0,
                limit: self.limit,
                expired: false,
            };
            self.pushes.insert((page, reader), consumer);
        }
    }

    /// `reader`'s copy of `page` (homed here) went: a write took it, or the
    /// reader dropped it.
    pub(super) fn lost(&mut self, page: usize, reader: Rank) {
        if self.limit == 0 || self.pushes.contains_key(&(page, reader)) {
            return;
        }
        if self.lost.len() >= MOST_LOST {
            self.lost.clear();
        }
        self.lost.insert((page, reader));
    }

    /// Whether to push `page` to its consumer `reader` now: false once it
    /// had its limit of pushes without a request of its own (the pair then
    /// expires, until the reader asks again). The caller counts the push
    /// with `pushed` if it happens.
    fn due(&mut self, page: usize, reader: Rank) -> bool {
        match self.pushes.get_mut(&(page, reader)) {
            Some(c) if c.expired => false,
            Some(c) if c.pushes < c.limit => true,
            Some(c) => {
                c.expired = true;
                false
            }
            None => false,
        }
    }

    /// `page` was pushed to its consumer `reader`.
    fn pushed(&mut self, page: usize, reader: Rank) {
        if let Some(c) = self.pushes.get_mut(&(page, reader)) {
            c.pushes += 1;
        }
    }

    /// A copy of `page` arrived that this rank did not ask for, after it
    /// passed `passed` barriers.
    pub(super) fn pushed_here(&mut self, page: usize, passed: u64) {
        self.received.push((page, passed));
    }

    /// The copies pushed here that served the step ending at barrier entry
    /// number `entry`: those that arrived after barrier `entry - 2` was
    /// passed (while this rank worked towards barrier `entry - 1` or waited
    /// in it, so pushed at it). One that arrived later is for the next step.
    fn served(&mut self, entry: u64) -> Vec<usize> {
        let (due, kept) = std::mem::take(&mut self.received)
            .into_iter()
            .partition(|(_, passed)| passed + 2 <= entry);
        self.received = kept;
        due.into_iter().map(|(page, _)| page).collect()
    }

    /// Forgets the pages of `pages` (a segment freed).
    pub(super) fn forget(&mut self, pages: std::ops::Range<usize>) {
        self.lost.retain(|(page, _)| !pages.contains(page));
        self.pushes.retain(|(page, _), _| !pages.contains(page));
        self.received.retain(|(page, _)| !pages.contains(page));
    }
}

impl Engine {
    /// A copy of `page` arrived that this rank did not ask for (a push).
    pub(super) fn pushed_here(&mut self, page: usize) {
        let passed = self.barrier_epoch - u64::from(self.barrier_waiter.is_some());
        self.consumers.pushed_here(page, passed);
    }

    /// At a barrier entry: drops the copies pushed here since the last one,
    /// pushes the pages written here since to their consumers, and carries
    /// out what the pushes asked of this rank itself (a write-protect of
    /// its own writable copy), so the copies leave ahead of the entry.
    pub(super) fn push_at_barrier(&mut self) -> Result<(), DsmError> {
        if self.consumers.limit == 0 {
            return Ok(());
        }
        let now = self.now();
        for page in self.consumers.served(self.barrier_epoch + 1) {
            let Node::Mrsw(node) = &mut self.node else {
                return Ok(());
            };
            if node.copy_of(page) == Some(Copy::Shared) && node.evictable(page, now) {
                let actions = node.evict_served_push(page, now)?;
                self.apply(actions, Carried::Nothing)?;
            }
        }
        if self.consumers.pushes.values().all(|c| c.expired) {
            return Ok(());
        }
        let me = self.rank;
        let Node::Mrsw(node) = &self.node else {
            return Ok(());
        };
        // Pages written here since their last push (or never pushed): their
        // consumers get them, all of them (the first push shares the page).
        let mut pairs: Vec<(usize, Rank)> = self
            .consumers
            .pushes
            .iter()
            .filter(|(_, c)| !c.expired)
            .map(|(pair, _)| *pair)
            .filter(|(page, _)| {
                node.directory(*page) == Some(&Directory::Exclusive(me))
                    && !self.rc.contains(*page)
                    && !self.frees_page(*page)
            })
            .collect();
        pairs.sort_unstable();
        for (page, reader) in pairs {
            if !self.consumers.due(page, reader) {
                continue;
            }
            self.retract_direct(page)?;
            let actions = self.counted(|node| match node {
                Node::Mrsw(n) => n.push(page, reader),
                Node::Migratory(_) => Ok(Vec::new()),
            })?;
            if !actions.is_empty() {
                self.consumers.pushed(page, reader);
                Stats::add(&self.stats.pages_pushed, 1);
                self.apply(actions, Carried::Nothing)?;
                // This rank's own copy is recalled through a message to
                // itself: handled now, the page is shared and the next
                // consumer's push finds no transaction under way.
                self.handle_own_messages()?;
            }
            self.publish_direct(page);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Consumers;

    fn consumers(limit: u32) -> Consumers {
        Consumers {
            limit,
            ..Consumers::default()
        }
    }

    #[test]
    fn a_reader_becomes_a_consumer_by_asking_again_after_a_loss() {
        let mut c = consumers(8);
        c.asked(3, 1);
        assert!(!c.due(3, 1), "a first request is no pattern yet");
        c.lost(3, 1);
        assert!(!c.due(3, 1));
        c.asked(3, 1);
        assert!(c.due(3, 1));
        assert!(!c.due(3, 2), "another reader is not one");
        assert!(!c.due(4, 1), "nor another page");
    }

    /// Pushes `page` to `reader` while due (its drop of each pushed copy
    /// told, as a consumer's barrier does); how many.
    fn push_until_expired(c: &mut Consumers, page: usize, reader: usize) -> u32 {
        let mut pushes = 0;
        while c.due(page, reader) {
            c.pushed(page, reader);
            // Its drop of the pushed copy does not make it new again.
            c.lost(page, reader);
            pushes += 1;
            assert!(pushes <= 1000, "a consumer's pushes never expire");
        }
        pushes
    }

    #[test]
    fn a_consumer_that_never_asks_expires_after_the_limit_until_it_asks_again() {
        let mut c = consumers(2);
        c.lost(7, 1);
        c.asked(7, 1);
        assert_eq!(push_until_expired(&mut c, 7, 1), 2, "limit reached");
        assert!(!c.due(7, 1), "and expired");
        c.asked(7, 1);
        assert!(c.due(7, 1), "asking again after it expired re-arms it");
        c.pushed(7, 1);
        c.asked(7, 1);
        c.pushed(7, 1);
        assert!(c.due(7, 1), "a request of its own resets the count");
    }

    #[test]
    fn a_consumer_that_keeps_asking_after_expiring_gets_doubling_limits_up_to_a_bound() {
        let mut c = consumers(2);
        c.lost(7, 1);
        c.asked(7, 1);
        let mut limits = Vec::new();
        for _ in 0..7 {
            limits.push(push_until_expired(&mut c, 7, 1));
            c.asked(7, 1);
        }
        assert_eq!(limits, [2, 4, 8, 16, 32, 32, 32]);
        // A request before the limit is reached keeps the limit.
        c.pushed(7, 1);
        c.asked(7, 1);
        assert_eq!(push_until_expired(&mut c, 7, 1), 32);
        // Another reader of the page starts at the base limit.
        c.lost(7, 2);
        c.asked(7, 2);
        assert_eq!(push_until_expired(&mut c, 7, 2), 2);
    }

    #[test]
    fn pushing_off_records_nothing() {
        let mut c = consumers(0);
        c.lost(1, 1);
        c.asked(1, 1);
        assert!(!c.due(1, 1));
    }

    #[test]
    fn a_pushed_copy_serves_the_step_after_the_barrier_it_was_pushed_at() {
        let mut c = consumers(8);
        // Passed 4 barriers: working towards entry 5 (or waiting in it);
        // the copy was pushed at barrier 5 and serves the step up to 6.
        c.pushed_here(10, 4);
        // Already past barrier 5: pushed at 5 all the same, arrived late.
        c.pushed_here(11, 5);
        assert!(c.served(5).is_empty());
        assert_eq!(c.served(6), vec![10]);
        assert_eq!(c.served(7), vec![11]);
    }

    #[test]
    fn a_freed_segment_s_pages_are_forgotten() {
        let mut c = consumers(8);
        c.lost(5, 1);
        c.asked(5, 1);
        c.lost(9, 1);
        c.pushed_here(6, 0);
        c.forget(4..8);
        assert!(!c.due(5, 1));
        assert!(c.served(10).is_empty());
        c.asked(9, 1);
        assert!(c.due(9, 1), "pages outside the range are kept");
    }
}
