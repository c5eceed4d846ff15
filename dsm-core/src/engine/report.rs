//! The engine's part of a hang report ([`crate::hang`]): what a waiting
//! thread waits for, in words, and the requests, barriers and locks the
//! engine has in flight.

use super::Engine;
use crate::config::PAGE_SIZE;
use crate::hang::WaitFor;
use std::time::Instant;

/// `1, 4, 7`: ranks for a report line.
fn list<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

impl Engine {
    /// A thread's wait, with what the engine knows of it.
    pub(crate) fn describe_wait(&self, what: WaitFor) -> String {
        match what {
            WaitFor::Page { page, write } => {
                let kind = if write { "write" } else { "read" };
                let home = match self.home_of(page) {
                    Some(home) if home == self.rank => "homed here".to_string(),
                    Some(home) => format!("homed at rank {home}"),
                    None => "migratory".to_string(),
                };
                format!(
                    "page {page} ({:#x}, {kind} fault, {home})",
                    self.base + page * PAGE_SIZE
                )
            }
            WaitFor::Barrier => format!(
                "barrier {} (arrivals counted at rank 0)",
                self.barrier_epoch
            ),
            WaitFor::Lock(lock) => {
                format!("lock {lock} (managed at rank {})", self.lock_home(lock))
            }
            WaitFor::Free(segment) => format!("the collective free of segment {segment}"),
        }
    }

    /// What this rank waits for and what it holds up for others, one line
    /// each, for a hang report: its requests in flight (pages, locks, its
    /// barrier), and as a manager the barriers and locks others wait on.
    pub(crate) fn waits_report(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if self.reading_directly() {
            lines.push(format!(
                "{} direct read(s) of a co-located home's pages under way (messages from other ranks wait for their end)",
                self.direct_reads_under_way()
            ));
        }
        let mut fetches: Vec<(&usize, &Instant)> = self.fetch_started.iter().collect();
        fetches.sort_by_key(|(_, started)| **started);
        for (page, started) in fetches {
            let addr = self.base + page * PAGE_SIZE;
            let from = match self.home_of(*page) {
                Some(home) => format!("home rank {home}"),
                None => "its owner".into(),
            };
            lines.push(format!(
                "page {page} ({addr:#x}) requested from {from} {:.1} s ago, not granted yet",
                started.elapsed().as_secs_f64()
            ));
        }
        let mut locks: Vec<u64> = self
            .lock_waiters
            .iter()
            .filter(|(ticket, _)| !self.grants_awaiting_diffs.iter().any(|(_, t)| t == *ticket))
            .map(|(_, (lock, _))| *lock)
            .collect();
        locks.sort_unstable();
        for lock in locks {
            lines.push(format!(
                "lock {lock} requested from rank {}, not granted yet",
                self.lock_home(lock)
            ));
        }
        if let Some(sync) = self.after_release.front() {
            lines.push(format!(
                "releasing before {}: {} diff(s) sent to their homes not acknowledged yet",
                sync.name(),
                self.release.diffs_unacknowledged()
            ));
        }
        for (barriers, ticket) in &self.grants_awaiting_diffs {
            if let Some((lock, _)) = self.lock_waiters.get(ticket) {
                lines.push(format!(
                    "lock {lock} granted, taken once the release of barrier {barriers} is handled here"
                ));
            }
        }
        let (held, complete) = self.release.copy_requests_held();
        if held > 0 {
            lines.push(format!(
                "{held} copy request(s) held back until the release of barrier {} is handled here",
                complete + 1
            ));
        }
        if self.barrier_waiter.is_some() {
            lines.push(format!(
                "in barrier {}, whose arrivals rank 0 counts",
                self.barrier_epoch
            ));
        }
        for (epoch, missing) in self.barrier_arrivals.incomplete(self.size) {
            lines.push(format!(
                "barrier {epoch} (counted here): waiting for rank(s) {}",
                list(missing.iter())
            ));
        }
        lines.extend(self.frees_report());
        for (lock, (holder, _), queue) in self.locks.contended() {
            lines.push(format!(
                "lock {lock} (managed here): held by rank {holder}; waiting: rank(s) {}",
                list(queue.iter().map(|(rank, _)| rank))
            ));
        }
        lines
    }
}
