//! Synchronization: the barrier (arrivals counted at rank 0, the release
//! sent to every rank, the waiting caller answered) and locks (queued FIFO
//! at each lock's home, `lock mod size`, in [`crate::sync::LockTable`]; a
//! waiting caller answered with the ticket it releases the lock with).

use super::{Engine, Reply};
use crate::error::DsmError;
use crate::proto::Msg;
use crate::Rank;

impl Engine {
    pub(super) fn on_barrier_message(&mut self, from: Rank, msg: Msg) -> Result<(), DsmError> {
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

    pub(super) fn start_barrier(&mut self, reply: Reply<()>) -> Result<(), DsmError> {
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

    /// An API call's lock request, sent to the lock's home.
    pub(super) fn acquire_lock(&mut self, lock: u64, reply: Reply<u64>) {
        let ticket = self.ticket();
        self.lock_waiters.insert(ticket, (lock, reply));
        self.out.send(
            self.lock_home(lock),
            Msg::LockAcquire { lock, ticket }.header(),
        );
    }

    /// An API call's release of a lock it holds with `ticket`.
    pub(super) fn release_lock(&mut self, lock: u64, ticket: u64) {
        self.out.send(
            self.lock_home(lock),
            Msg::LockRelease { lock, ticket }.header(),
        );
    }

    /// The rank that queues `lock`'s requests.
    pub(super) fn lock_home(&self, lock: u64) -> Rank {
        (lock % self.size as u64) as Rank
    }

    /// A lock message: at the home, a request queued or granted and a
    /// release handing the lock to the next in line; at the requester, the
    /// grant answering its waiting caller.
    pub(super) fn on_lock_message(&mut self, from: Rank, msg: Msg) -> Result<(), DsmError> {
        match msg {
            Msg::LockAcquire { lock, ticket } => {
                if let Some((rank, ticket)) = self.locks.acquire(lock, (from, ticket)) {
                    self.out
                        .send(rank, Msg::LockGrant { lock, ticket }.header());
                }
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
            }
            Msg::LockGrant { ticket, .. } => {
                if let Some((_, waiter)) = self.lock_waiters.remove(&ticket) {
                    let _ = waiter.send(Ok(ticket));
                }
            }
            other => {
                return Err(DsmError::Protocol(format!(
                    "from rank {from}: unexpected {other:?}"
                )))
            }
        }
        Ok(())
    }
}
