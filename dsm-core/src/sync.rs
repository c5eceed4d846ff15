//! Synchronisation state, as pure data structures the engine drives:
//! distributed locks held at each lock's home rank (FIFO, no spinning over
//! the network: a waiter sends one request and is granted in turn) and the
//! barrier counter kept by rank 0.

use std::collections::{HashMap, VecDeque};

use crate::Rank;

/// One lock request: the rank and its per-process ticket.
pub type Holder = (Rank, u64);

#[derive(Debug, Default)]
struct LockState {
    holder: Option<Holder>,
    queue: VecDeque<Holder>,
}

/// The locks this rank is home of.
#[derive(Debug, Default)]
pub struct LockTable {
    locks: HashMap<u64, LockState>,
    /// The most barriers a rank releasing one of these locks had passed
    /// (what every grant carries: one number for all the locks, which
    /// makes a taker wait at most for a barrier every rank entered).
    barriers: u64,
}

/// A release of a lock by a request that does not hold it (a protocol
/// error).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("rank {rank} released lock {lock} (ticket {ticket}) which it does not hold")]
pub struct NotHeld {
    /// The lock's id.
    pub lock: u64,
    /// The releasing rank.
    pub rank: Rank,
    /// The ticket it released under.
    pub ticket: u64,
}

impl LockTable {
    /// A request; returns who to grant now (the requester, if the lock was free).
    pub fn acquire(&mut self, lock: u64, who: Holder) -> Option<Holder> {
        let state = self.locks.entry(lock).or_default();
        if state.holder.is_none() {
            state.holder = Some(who);
            return Some(who);
        }
        state.queue.push_back(who);
        None
    }

    /// The most barriers a releaser of these locks had passed, for grants.
    pub fn barriers(&self) -> u64 {
        self.barriers
    }

    /// A release by the holder, which had passed `barriers` barriers;
    /// returns the next holder to grant, in FIFO order.
    pub fn release(
        &mut self,
        lock: u64,
        who: Holder,
        barriers: u64,
    ) -> Result<Option<Holder>, NotHeld> {
        let not_held = NotHeld {
            lock,
            rank: who.0,
            ticket: who.1,
        };
        let state = self.locks.get_mut(&lock).ok_or(not_held.clone())?;
        if state.holder != Some(who) {
            return Err(not_held);
        }
        self.barriers = self.barriers.max(barriers);
        state.holder = state.queue.pop_front();
        let next = state.holder;
        if next.is_none() {
            self.locks.remove(&lock);
        }
        Ok(next)
    }

    /// Locks someone waits for: each with its holder and its queue, in
    /// order of lock id (for hang reports).
    pub fn contended(&self) -> Vec<(u64, Holder, Vec<Holder>)> {
        let mut contended: Vec<(u64, Holder, Vec<Holder>)> = self
            .locks
            .iter()
            .filter(|(_, state)| !state.queue.is_empty())
            .filter_map(|(lock, state)| {
                Some((*lock, state.holder?, state.queue.iter().copied().collect()))
            })
            .collect();
        contended.sort_by_key(|(lock, ..)| *lock);
        contended
    }
}

/// Rank 0's record of barrier arrivals per epoch: who arrived, so that a
/// hang report can name who did not, and what their entries carry (release
/// consistency: their diffs), which the release hands to every rank.
#[derive(Debug)]
pub struct BarrierCounter<T> {
    arrivals: HashMap<u64, Arrivals<T>>,
}

impl<T> Default for BarrierCounter<T> {
    fn default() -> Self {
        BarrierCounter {
            arrivals: HashMap::new(),
        }
    }
}

#[derive(Debug)]
struct Arrivals<T> {
    ranks: Vec<Rank>,
    /// What the entries carried, with the rank of each.
    carried: Vec<(Rank, T)>,
}

impl<T> Default for Arrivals<T> {
    fn default() -> Self {
        Arrivals {
            ranks: Vec::new(),
            carried: Vec::new(),
        }
    }
}

impl<T> BarrierCounter<T> {
    /// Counts `rank`'s arrival, with what its entry carries. Once all
    /// `size` ranks have arrived: what every entry carried, with its rank,
    /// in order of arrival.
    pub fn arrive(
        &mut self,
        epoch: u64,
        rank: Rank,
        size: usize,
        carried: T,
    ) -> Option<Vec<(Rank, T)>> {
        let arrived = self.arrivals.entry(epoch).or_default();
        arrived.carried.push((rank, carried));
        arrived.ranks.push(rank);
        if arrived.ranks.len() == size {
            return self.arrivals.remove(&epoch).map(|a| a.carried);
        }
        None
    }

    /// Barriers some ranks reached and others not yet: each epoch with the
    /// ranks still missing, in order of epoch.
    pub fn incomplete(&self, size: usize) -> Vec<(u64, Vec<Rank>)> {
        let mut incomplete: Vec<(u64, Vec<Rank>)> = self
            .arrivals
            .iter()
            .map(|(epoch, arrived)| {
                let missing = (0..size).filter(|r| !arrived.ranks.contains(r)).collect();
                (*epoch, missing)
            })
            .collect();
        incomplete.sort_by_key(|(epoch, _)| *epoch);
        incomplete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_are_granted_in_fifo_order() {
        let mut t = LockTable::default();
        assert_eq!(t.acquire(7, (1, 10)), Some((1, 10)));
        assert_eq!(t.acquire(7, (2, 20)), None);
        assert_eq!(t.acquire(7, (0, 30)), None);
        assert_eq!(t.acquire(8, (2, 21)), Some((2, 21)));
        assert_eq!(
            t.release(7, (2, 20), 0),
            Err(NotHeld {
                lock: 7,
                rank: 2,
                ticket: 20
            })
        );
        assert_eq!(t.release(7, (1, 10), 3), Ok(Some((2, 20))));
        assert_eq!(t.release(7, (2, 20), 1), Ok(Some((0, 30))));
        assert_eq!(t.barriers(), 3);
        assert_eq!(t.release(7, (0, 30), 0), Ok(None));
        assert!(t.release(7, (0, 30), 9).is_err());
        assert_eq!(t.barriers(), 3);
    }

    #[test]
    fn barrier_releases_at_the_last_arrival() {
        let mut b = BarrierCounter::default();
        assert_eq!(b.arrive(1, 2, 3, 'a'), None);
        assert_eq!(b.arrive(1, 0, 3, 'b'), None);
        assert_eq!(b.incomplete(3), vec![(1, vec![1])]);
        assert_eq!(
            b.arrive(1, 1, 3, 'c'),
            Some(vec![(2, 'a'), (0, 'b'), (1, 'c')])
        );
        assert!(b.incomplete(3).is_empty());
        assert_eq!(b.arrive(2, 0, 1, 'd'), Some(vec![(0, 'd')]));
    }

    #[test]
    fn contended_locks_show_holder_and_queue() {
        let mut t = LockTable::default();
        t.acquire(3, (0, 1));
        t.acquire(9, (1, 2));
        t.acquire(9, (2, 3));
        t.acquire(9, (0, 4));
        assert_eq!(t.contended(), vec![(9, (1, 2), vec![(2, 3), (0, 4)])]);
    }
}
