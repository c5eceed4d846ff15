//! Bounding the memory a rank holds (`DSM_CACHE_SIZE`, the cgroup's
//! limit): the pages held from other homes in install order (`Cache`),
//! eviction of the oldest down to the low mark, and the periodic check of
//! the process's memory against its limit.

use super::protocol::Carried;
use super::{Engine, Node};
use crate::coherence::mrsw::Copy;
use crate::coherence::release::RcCopy;
use crate::config::PAGE_SIZE;
use crate::error::DsmError;
use crate::pages::PageSet;
use crate::stats::Stats;
use std::collections::VecDeque;

/// Pages received or stored (4 MiB) between two checks that memory is
/// not running out (`check_memory`: a read of /proc/meminfo, ~20 µs).
const MEMORY_CHECK_EVERY: usize = 1024;

/// Most pages that cannot go yet one eviction passes over (each goes to
/// the back). Without a bound, a rank over its cache bound whose oldest
/// pages cannot go (dirty release-consistent copies until the next
/// barrier, copies still in their minimum hold) walked all of them at
/// every event: a write of 16384 remote pages under a 4 MiB cache cost
/// 269 µs a page instead of 30.
const EVICT_PASS_MAX: usize = 64;

/// This rank's cache of pages homed elsewhere (`DSM_CACHE_SIZE`): past
/// `high` pages, the engine thread evicts down to `low`, in the background
/// of the faults; past `limit`, whoever holds the engine evicts at once.
/// Victims are taken oldest installed first (FIFO over the grants: a read
/// stream's consumed pages go first); a mapped page's accesses are not
/// visible to user space without privileges, so there is no reference bit
/// to give a second chance by. A page that cannot go yet (a request or a
/// command in flight, its minimum hold) goes to the back.
pub(super) struct Cache {
    pub(super) limit: usize,
    pub(super) high: usize,
    pub(super) low: usize,
    /// Pages installed from other homes, oldest first, each once (an
    /// entry may be stale: the page was invalidated since).
    pub(super) order: VecDeque<usize>,
    pub(super) queued: PageSet,
}

impl Cache {
    pub(super) fn new(pages: usize) -> Cache {
        Cache {
            limit: usize::MAX,
            high: usize::MAX,
            low: usize::MAX,
            order: VecDeque::new(),
            queued: PageSet::new(pages),
        }
    }

    /// At most `limit` pages (at least one); `usize::MAX`: no bound.
    pub(super) fn bound(&mut self, limit: usize) {
        let limit = limit.max(1);
        let margin = |share: usize| (limit / share).max(1);
        self.limit = limit;
        if self.bounded() {
            self.high = limit.saturating_sub(margin(16));
            self.low = limit.saturating_sub(margin(8));
        }
    }

    pub(super) fn bounded(&self) -> bool {
        self.limit != usize::MAX
    }

    /// `page`, homed elsewhere, was just granted here. Recorded without a
    /// bound too, so that one set later (`Dsm::set_cache_size`) finds its
    /// victims: one word per page held.
    pub(super) fn installed(&mut self, page: usize) {
        if self.queued.insert(page) {
            self.order.push_back(page);
        }
    }
}

impl Engine {
    /// Pages homed elsewhere held here.
    pub(super) fn cached(&self) -> usize {
        let sc = match &self.node {
            Node::Mrsw(n) => n.cached(),
            Node::Migratory(_) => 0,
        };
        sc + self.release.held()
    }

    /// True when the cache holds more than its background watermark: the
    /// engine thread should evict.
    pub(super) fn eviction_due(&self) -> bool {
        self.cache.bounded() && self.cached() > self.cache.high
    }

    /// Evicts the pages homed elsewhere that this rank holds, oldest first,
    /// until at most `target` are left or none can go now (as far as
    /// [`Engine::evict_oldest`] looks in one call).
    pub(super) fn evict_to(&mut self, target: usize) -> Result<(), DsmError> {
        if !self.cache.bounded() || self.cached() <= target {
            return Ok(());
        }
        self.run_staged()?;
        let now = self.now();
        // Drops of consecutive pages are staged into runs, as in a batch:
        // one TLB shootdown per run.
        self.batch_clock = Some(now);
        let evicted = self.evict_oldest(target, now);
        self.batch_clock = None;
        evicted?;
        self.run_staged()?;
        // The frames of what was dropped go back to the kernel now.
        self.faults.release_dropped_frames()?;
        Ok(())
    }

    /// Evicts the oldest pages that can go, until at most `target` are
    /// left, every page queued was looked at, or [`EVICT_PASS_MAX`] could
    /// not go: the next call goes on from there.
    pub(super) fn evict_oldest(&mut self, target: usize, now: u64) -> Result<(), DsmError> {
        let mut passed = 0;
        let pass_limit = self.cache.order.len().min(EVICT_PASS_MAX);
        while self.cached() > target && passed < pass_limit {
            let Some(page) = self.cache.order.pop_front() else {
                break;
            };
            self.cache.queued.remove(page);
            if self.rc.contains(page) {
                // Release consistency: a clean copy goes without a word (its
                // home keeps no directory); a dirty one sends its diff to its
                // home first (`Release::evict`), unless a release or a
                // barrier is under way; a fetch waits for its grant.
                let stat = match self.release.copy_of(page) {
                    Some(RcCopy::Invalid) | None => continue, // lost since
                    Some(RcCopy::Dirty) => &self.stats.evictions_written_back,
                    Some(_) => &self.stats.evictions_clean,
                };
                let actions = self.release.evict(page);
                if actions.is_empty() {
                    // Fetched, or dirty while a release or a barrier is
                    // under way: not now.
                    self.cache.installed(page);
                    passed += 1;
                    continue;
                }
                Stats::add(stat, 1);
                self.protect_for_diffs(&actions)?;
                self.apply(actions, Carried::Nothing)?;
                continue;
            }
            let Node::Mrsw(node) = &self.node else {
                return Ok(());
            };
            match node.copy_of(page) {
                Some(Copy::Invalid) | None => continue, // lost since
                Some(_) if !node.evictable(page, now) => {
                    self.cache.installed(page);
                    passed += 1;
                    continue;
                }
                Some(Copy::Shared) => Stats::add(&self.stats.evictions_clean, 1),
                Some(Copy::Modified) => {}
            }
            // Evictable, so it goes now: a direct copy the home never
            // counted goes with no notice.
            let unseen = self.unseen_direct_copy(page);
            let Node::Mrsw(node) = &mut self.node else {
                return Ok(());
            };
            let actions = match unseen {
                true => node.evict_unseen(page, now)?,
                false => node.evict(page, now)?,
            };
            self.apply(actions, Carried::Nothing)?;
        }
        Ok(())
    }

    /// Every [`MEMORY_CHECK_EVERY`] pages received or stored: a rank about
    /// to run out of memory (as home, or with a cache too large for what
    /// the node has left) ends the job saying so, rather than being killed
    /// by the kernel without a word.
    pub(super) fn check_memory(&mut self) -> Result<(), DsmError> {
        if self.pages_since_memory_check < MEMORY_CHECK_EVERY {
            return Ok(());
        }
        self.pages_since_memory_check = 0;
        match crate::memory::headroom() {
            Some(room) if room.exhausted() => Err(DsmError::OutOfMemory {
                available: room.available,
                total: room.total,
                scope: room.scope,
                cached: (self.cached() * PAGE_SIZE) as u64,
            }),
            _ => Ok(()),
        }
    }

    /// After serving an event outside the engine thread: checks memory
    /// (`check_memory`), and evicts in the calling thread only if the cache
    /// is over its limit (the engine thread did not keep up); true when the
    /// engine thread should evict in the background.
    pub(super) fn bound_memory(&mut self) -> Result<bool, DsmError> {
        self.check_memory()?;
        if !self.eviction_due() {
            return Ok(false);
        }
        if self.cached() > self.cache.limit {
            self.evict_to(self.cache.limit)?;
        }
        Ok(self.eviction_due())
    }
}
