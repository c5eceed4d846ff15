//! Synchronization: the barrier (arrivals counted at rank 0, the release
//! sent to every rank, the waiting caller answered) and locks (queued FIFO
//! at each lock's home, `lock mod size`, in [`crate::sync::LockTable`]; a
//! waiting caller answered with the ticket it releases the lock with).
//!
//! Under release consistency (`DSM_PROTOCOL=release`) each of them is also
//! a release (`synchronize`): before a lock request or an unlock leaves,
//! the rank's writes reach their homes, and its copies of other homes'
//! pages are dropped before a lock grant returns to the caller (the
//! acquire); a barrier entry carries the diffs of every page the rank
//! wrote (but for copies written while another of its threads holds a
//! lock, whose diffs go to their homes first, acknowledged), rank 0 merges
//! them and hands each rank its part with the release, and each writes
//! them into the copies it holds before the
//! barrier returns.

use super::protocol::Carried;
use super::{Engine, Node, Reply};
use crate::coherence::release::ReleaseFor;
use crate::coherence::twin;
use crate::coherence::Action;
use crate::error::DsmError;
use crate::proto::{DiffRuns, Msg, PageDiffs};
use crate::Rank;

/// A synchronization that goes on once this rank's release is done.
pub(crate) enum AfterRelease {
    /// Enter the barrier.
    Barrier(Reply<()>),
    /// Ask for the lock.
    Lock { lock: u64, reply: Reply<u64> },
    /// Let the lock go.
    Unlock { lock: u64, ticket: u64 },
    /// The barrier was passed (its diffs are in the copies): copies written
    /// under a lock that were dirty go, then the caller is answered.
    BarrierPassed(Reply<()>),
    /// The lock was granted: acquire, then answer the caller.
    LockGranted { ticket: u64, reply: Reply<u64> },
}

impl AfterRelease {
    /// What it is, for a hang report.
    pub(super) fn name(&self) -> &'static str {
        match self {
            AfterRelease::Barrier(_) => "a barrier entry",
            AfterRelease::Lock { .. } => "a lock request",
            AfterRelease::Unlock { .. } => "an unlock",
            AfterRelease::BarrierPassed(_) => "the return from a barrier passed",
            AfterRelease::LockGranted { .. } => "the acquire of a lock granted",
        }
    }

    /// A point the caller reached past its work on shared data (a barrier
    /// entry, an unlock): the pages its faults fetched were used.
    fn ends_holds(&self) -> bool {
        matches!(self, AfterRelease::Barrier(_) | AfterRelease::Unlock { .. })
    }

    /// A lock's acquire: it drops the copies, so no copy may be dirty
    /// then.
    fn acquires(&self) -> bool {
        matches!(self, AfterRelease::LockGranted { .. })
    }

    /// A barrier passed.
    fn passes_barrier(&self) -> bool {
        matches!(self, AfterRelease::BarrierPassed(_))
    }
}

impl Engine {
    /// Carries out a synchronization once this rank's release is done:
    /// one release at a time, in the order they were asked for, each taking
    /// the writes made before it (with no dirty copy, as under the
    /// sequentially consistent protocols, it is done at once). A barrier
    /// passed or a lock granted goes through here too, behind a thread's
    /// unlock still releasing: a lock's acquire releases the copies dirtied
    /// since the last release first, a barrier passed needs no release
    /// (but before it drops copies written under a lock that were dirty).
    pub(super) fn synchronize(&mut self, sync: AfterRelease) -> Result<(), DsmError> {
        if sync.ends_holds() {
            self.end_holds()?;
        }
        if matches!(sync, AfterRelease::Barrier(_)) {
            // After the holds end: pushed copies are dropped at once, and a
            // push recalls this rank's own writable copy at once.
            self.push_at_barrier()?;
        }
        self.after_release.push_back(sync);
        if self.after_release.len() == 1 {
            self.start_release()?;
        }
        Ok(())
    }

    /// Ends the minimum hold of the pages granted so far
    /// (`Mrsw::end_holds`): at a barrier entry or an unlock, a page read or
    /// written just before moves on at once, instead of making the next
    /// epoch's writer or reader wait out the hold.
    fn end_holds(&mut self) -> Result<(), DsmError> {
        let now = self.now();
        let actions = match &mut self.node {
            Node::Mrsw(node) => node.end_holds(now)?,
            // The seed's protocol keeps its holds as they are.
            Node::Migratory(_) => return Ok(()),
        };
        self.end_direct_holds();
        self.apply(actions, Carried::Nothing)
    }

    /// Sends the diffs of this rank's dirty copies for the first
    /// synchronization waiting; `released` follows once they are in (for a
    /// barrier entry, once they are collected: the entry carries them).
    fn start_release(&mut self) -> Result<(), DsmError> {
        let front = self.after_release.front();
        if front.is_some_and(AfterRelease::passes_barrier) && !self.release.lock_written_dirty() {
            // Nothing to release: the barrier's diffs are in the copies,
            // which stay dirty (twinned) for the next entry.
            return self.released();
        }
        let release_for = match front {
            // Another thread's writes under a lock it holds must be at the
            // homes when it lets the lock go, maybe before this barrier's
            // release: they go now, acknowledged.
            Some(AfterRelease::Barrier(_)) if self.locks_held > 0 => ReleaseFor::BarrierUnderLock,
            Some(AfterRelease::Barrier(_)) => ReleaseFor::Barrier,
            _ => ReleaseFor::Lock,
        };
        let actions = self.release.release(release_for)?;
        self.protect_for_diffs(&actions)?;
        self.apply(actions, Carried::Nothing)
    }

    /// Write-protects the pages whose diffs `actions` send, before any is
    /// compared with its twin (a store meanwhile waits in a fault): one
    /// system call per run of consecutive pages.
    pub(super) fn protect_for_diffs(&self, actions: &[Action]) -> Result<(), DsmError> {
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for action in actions {
            let (Action::SendDiff { page, .. } | Action::CollectDiff { page }) = *action else {
                continue;
            };
            match runs.last_mut() {
                Some(run) if run.end == page => run.end += 1,
                _ => runs.push(page..page + 1),
            }
        }
        for run in runs {
            self.faults.write_protect(run.start, run.len())?;
        }
        Ok(())
    }

    /// The release of the first synchronization waiting is done: it goes
    /// on, and the next one's release starts.
    pub(super) fn released(&mut self) -> Result<(), DsmError> {
        let Some(sync) = self.after_release.pop_front() else {
            return Err(DsmError::Protocol(
                "a release completed that no synchronization waited for".into(),
            ));
        };
        let drops_lock_written = sync.passes_barrier() && self.release.lock_written_dirty();
        if (sync.acquires() || drops_lock_written) && self.release.dirty_pages() > 0 {
            // Copies dirtied while the diffs travelled (another thread's
            // stores, a page that came back writable or took a barrier's
            // diffs): released too before the acquire, which drops every
            // copy.
            self.after_release.push_front(sync);
            return self.start_release();
        }
        self.go_on(sync)?;
        if !self.after_release.is_empty() {
            self.start_release()?;
        }
        Ok(())
    }

    fn go_on(&mut self, sync: AfterRelease) -> Result<(), DsmError> {
        match sync {
            AfterRelease::Barrier(reply) => self.start_barrier(reply),
            AfterRelease::Lock { lock, reply } => {
                self.acquire_lock(lock, reply);
                Ok(())
            }
            AfterRelease::Unlock { lock, ticket } => {
                self.locks_held = self.locks_held.saturating_sub(1);
                self.release_lock(lock, ticket);
                Ok(())
            }
            AfterRelease::BarrierPassed(reply) => {
                // The release's diffs are in the copies already; copies
                // written under a lock that were dirty then go now.
                let actions = self.release.drop_lock_written()?;
                self.apply_in_runs(actions)?;
                let _ = reply.send(Ok(()));
                Ok(())
            }
            AfterRelease::LockGranted { ticket, reply } => {
                // Release consistency: this rank's copies of other homes'
                // pages go (in runs of consecutive pages), so the next
                // access reads what the homes hold now.
                let actions = self.release.acquire()?;
                self.apply_in_runs(actions)?;
                self.locks_held += 1;
                let _ = reply.send(Ok(ticket));
                Ok(())
            }
        }
    }

    pub(super) fn on_barrier_message(&mut self, from: Rank, msg: Msg) -> Result<(), DsmError> {
        match msg {
            Msg::BarrierEnter {
                epoch,
                updates,
                lock_written,
            } => {
                if self.rank != 0 {
                    return Err(DsmError::Protocol(format!(
                        "rank {from} sent a barrier entry to rank {}",
                        self.rank
                    )));
                }
                let Some(arrivals) =
                    self.barrier_arrivals
                        .arrive(epoch, from, self.size, (updates, lock_written))
                else {
                    return Ok(());
                };
                let mut diffs = Vec::new();
                let mut lock_written = Vec::new();
                for (writer, (entry, pages)) in arrivals {
                    diffs.extend(entry.into_iter().map(|(page, runs)| (page, writer, runs)));
                    lock_written.extend(pages);
                }
                lock_written.sort_unstable();
                lock_written.dedup();
                let releases = self.merge_barrier_diffs(diffs)?;
                for (rank, updates) in releases.into_iter().enumerate() {
                    let release = Msg::BarrierRelease {
                        epoch,
                        updates,
                        lock_written: lock_written.clone(),
                    };
                    self.out.send(rank, release.header());
                }
                Ok(())
            }
            Msg::BarrierRelease {
                epoch,
                updates,
                lock_written,
            } => {
                // Every rank hears every release: it drops its copies of
                // pages written under locks, writes the diffs into the
                // copies and master copies it holds, then passes the
                // barrier (`Action::BarrierDiffsIn`).
                let mut pages: Vec<usize> = updates.iter().map(|(p, _)| *p as usize).collect();
                pages.dedup();
                let locked: Vec<usize> = lock_written.iter().map(|&p| p as usize).collect();
                if let Some(page) = pages
                    .iter()
                    .chain(&locked)
                    .copied()
                    .find(|&p| !self.rc.contains(p))
                {
                    return Err(DsmError::Protocol(format!(
                        "barrier {epoch}'s release names page {page}, which is not release-consistent"
                    )));
                }
                let actions = self.release.barrier_released(epoch, pages, locked)?;
                self.in_runs(|this| this.apply(actions, Carried::Updates(&updates)))
            }
            other => Err(DsmError::Protocol(format!(
                "from rank {from}: unexpected {other:?}"
            ))),
        }
    }

    /// Rank 0: each rank's part of a barrier's release from the diffs its
    /// entries carried, (page, writer, words): for every page, its diffs
    /// merged into one in the order every copy takes them (the home's
    /// first, then the other writers' by rank: a word in two diffs of one
    /// barrier was written under a lock by the later writer, after the
    /// home's master took the earlier unlock, or its own write); the home
    /// gets the merge of the others' only (its master has its own words,
    /// maybe under later ones from unlocks).
    fn merge_barrier_diffs(
        &self,
        mut diffs: Vec<(u64, Rank, DiffRuns)>,
    ) -> Result<Vec<PageDiffs>, DsmError> {
        let release = &self.release;
        diffs.sort_by_key(|&(page, writer, _)| {
            let home = release.home_of(page as usize);
            (page, writer != home, writer)
        });
        let mut releases = vec![Vec::new(); self.size];
        for page_diffs in diffs.chunk_by(|a, b| a.0 == b.0) {
            let page = page_diffs[0].0;
            let home = release.home_of(page as usize);
            let all = twin::merge(page_diffs.iter().map(|(_, _, runs)| runs))?;
            let others = page_diffs.iter().filter(|(_, writer, _)| *writer != home);
            let for_home = if page_diffs[0].1 == home {
                twin::merge(others.map(|(_, _, runs)| runs))?
            } else {
                all.clone()
            };
            for (rank, updates) in releases.iter_mut().enumerate() {
                let merged = if rank == home { &for_home } else { &all };
                if !merged.is_empty() {
                    updates.push((page, merged.clone()));
                }
            }
        }
        Ok(releases)
    }

    pub(super) fn start_barrier(&mut self, reply: Reply<()>) -> Result<(), DsmError> {
        self.barrier_epoch += 1;
        self.barrier_waiter = Some(reply);
        let enter = Msg::BarrierEnter {
            epoch: self.barrier_epoch,
            updates: std::mem::take(&mut self.barrier_updates),
            lock_written: self
                .release
                .take_lock_written()
                .into_iter()
                .map(|p| p as u64)
                .collect(),
        };
        self.out.send(0, enter.header());
        Ok(())
    }

    /// Barrier `epoch`'s release was handled here (its diffs are in): the
    /// barrier is passed here, if this rank waits at it, and the lock
    /// grants that waited for those diffs go on.
    pub(super) fn barrier_diffs_in(&mut self, epoch: u64) -> Result<(), DsmError> {
        if epoch == self.barrier_epoch {
            if let Some(waiter) = self.barrier_waiter.take() {
                self.synchronize(AfterRelease::BarrierPassed(waiter))?;
            }
        }
        let (ready, waiting) = std::mem::take(&mut self.grants_awaiting_diffs)
            .into_iter()
            .partition(|&(barriers, _)| barriers <= epoch);
        self.grants_awaiting_diffs = waiting;
        for (barriers, ticket) in ready {
            self.lock_granted(ticket, barriers)?;
        }
        Ok(())
    }

    /// The lock request `ticket` is granted, after a release by a rank
    /// that had passed `barriers` barriers: the caller takes it once every
    /// diff of those barriers is in here (a home's own threads read its
    /// master copy directly), with the acquire.
    fn lock_granted(&mut self, ticket: u64, barriers: u64) -> Result<(), DsmError> {
        if barriers > self.release.barriers_complete() {
            self.grants_awaiting_diffs.push((barriers, ticket));
            return Ok(());
        }
        self.release.lock_taken_after(barriers);
        match self.lock_waiters.remove(&ticket) {
            Some((_, reply)) => self.synchronize(AfterRelease::LockGranted { ticket, reply }),
            None => Ok(()),
        }
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
        let release = Msg::LockRelease {
            lock,
            ticket,
            barriers: self.release.barriers_passed(),
        };
        self.out.send(self.lock_home(lock), release.header());
    }

    /// Grants `lock` to the request `ticket` of `rank`.
    fn grant_lock(&mut self, rank: Rank, lock: u64, ticket: u64) {
        let grant = Msg::LockGrant {
            lock,
            ticket,
            barriers: self.locks.barriers(),
        };
        self.out.send(rank, grant.header());
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
                    self.grant_lock(rank, lock, ticket);
                }
            }
            Msg::LockRelease {
                lock,
                ticket,
                barriers,
            } => {
                let next = self
                    .locks
                    .release(lock, (from, ticket), barriers)
                    .map_err(|e| DsmError::Protocol(e.to_string()))?;
                if let Some((rank, ticket)) = next {
                    self.grant_lock(rank, lock, ticket);
                }
            }
            Msg::LockGrant {
                ticket, barriers, ..
            } => return self.lock_granted(ticket, barriers),
            other => {
                return Err(DsmError::Protocol(format!(
                    "from rank {from}: unexpected {other:?}"
                )))
            }
        }
        Ok(())
    }
}
