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
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("rank {rank} released lock {lock} (ticket {ticket}) which it does not hold")]
pub struct NotHeld {
    pub lock: u64,
    pub rank: Rank,
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

    /// A release by the holder; returns the next holder to grant, in FIFO order.
    pub fn release(&mut self, lock: u64, who: Holder) -> Result<Option<Holder>, NotHeld> {
        let not_held = NotHeld {
            lock,
            rank: who.0,
            ticket: who.1,
        };
        let state = self.locks.get_mut(&lock).ok_or(not_held.clone())?;
        if state.holder != Some(who) {
            return Err(not_held);
        }
        state.holder = state.queue.pop_front();
        let next = state.holder;
        if next.is_none() {
            self.locks.remove(&lock);
        }
        Ok(next)
    }
}

/// Rank 0's count of barrier arrivals per epoch.
#[derive(Debug, Default)]
pub struct BarrierCounter {
    arrivals: HashMap<u64, usize>,
}

impl BarrierCounter {
    /// Counts one arrival; true when all `size` ranks have arrived.
    pub fn arrive(&mut self, epoch: u64, size: usize) -> bool {
        let n = self.arrivals.entry(epoch).or_insert(0);
        *n += 1;
        if *n == size {
            self.arrivals.remove(&epoch);
            return true;
        }
        false
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
            t.release(7, (2, 20)),
            Err(NotHeld {
                lock: 7,
                rank: 2,
                ticket: 20
            })
        );
        assert_eq!(t.release(7, (1, 10)), Ok(Some((2, 20))));
        assert_eq!(t.release(7, (2, 20)), Ok(Some((0, 30))));
        assert_eq!(t.release(7, (0, 30)), Ok(None));
        assert!(t.release(7, (0, 30)).is_err());
    }

    #[test]
    fn barrier_releases_at_the_last_arrival() {
        let mut b = BarrierCounter::default();
        assert!(!b.arrive(1, 3));
        assert!(!b.arrive(1, 3));
        assert!(b.arrive(1, 3));
        assert!(b.arrive(2, 1));
    }
}
