//! Read-ahead: a sequential read stream detected (`Stream`) and the pages
//! ahead of it requested in growing windows (`DSM_PREFETCH`), and pages
//! lost with a faulting one (taken by another rank's write) asked back
//! together.

use super::protocol::Carried;
use super::{Engine, Node};
use crate::error::DsmError;
use crate::stats::Stats;

/// Consecutive read faults after the first before read-ahead starts: the
/// fifth fault in a row. Shorter runs (up to 16 KiB, such as a stencil
/// reading a neighbour's row) are not streams; pages fetched for nothing
/// cost their writer an invalidation later.
const STREAM_MIN_RUN: usize = 4;

/// Pages a read stream may skip between two faults and still go on: pages
/// already held in between (this rank's own pages of a round-robin space,
/// one in N) fault no more, so a stream over the default layout faults on
/// N - 1 pages of every N.
const STREAM_MAX_SKIP: usize = 16;

/// Most pages asked back after one fault (`regain_after`): 64 KiB.
const REGAIN_MAX: usize = 16;

/// Sequential read-stream detection for prefetch.
#[derive(Default)]
pub(super) struct Stream {
    /// Most pages to request ahead (0: prefetch off).
    pub(super) max_depth: usize,
    pub(super) last_page: Option<usize>,
    /// Consecutive read faults on consecutive pages.
    pub(super) run: usize,
    /// Pages up to here (exclusive) were already requested ahead.
    pub(super) requested_to: usize,
}

impl Stream {
    /// Pages up to `to` (exclusive) were asked for another way: a fault
    /// among them, or just after, continues the stream.
    pub(super) fn requested(&mut self, to: usize) {
        self.requested_to = self.requested_to.max(to);
    }

    /// True once the faults make a stream (read-ahead would start).
    pub(super) fn streaming(&self) -> bool {
        self.max_depth > 0 && self.run >= STREAM_MIN_RUN
    }

    /// Records a read fault; returns the pages to request ahead.
    pub(super) fn on_read_fault(&mut self, page: usize) -> std::ops::Range<usize> {
        // The next page, or a page of the window requested ahead (those
        // before it arrived in time and never faulted), or one a few pages
        // on (those between were held already): the stream goes on.
        let sequential = self.last_page.is_some_and(|last| {
            page > last && page <= self.requested_to.max(last + 1 + STREAM_MAX_SKIP)
        });
        self.run = if sequential { self.run + 1 } else { 0 };
        self.last_page = Some(page);
        if !sequential {
            self.requested_to = page + 1;
        }
        if self.max_depth == 0 || self.run < STREAM_MIN_RUN {
            return page + 1..page + 1;
        }
        // The window starts at one page and doubles as the stream goes on,
        // up to max_depth: a short run (a stencil reading a neighbour's
        // 4-page row) fetches little it will not use, and each page fetched
        // for nothing costs its writer an invalidation later.
        let depth = (1usize << (self.run - STREAM_MIN_RUN).min(10)).min(self.max_depth);
        let from = self.requested_to.max(page + 1);
        let to = page + 1 + depth;
        self.requested_to = self.requested_to.max(to);
        from..to.max(from)
    }
}

impl Engine {
    /// Asks back the pages after a faulting one that this rank lost with
    /// it (`Mrsw::regain_ahead`), within its segment.
    /// Returns how many pages after `page` it asked for.
    pub(super) fn regain_after(&mut self, page: usize, write: bool) -> Result<usize, DsmError> {
        let Node::Mrsw(node) = &mut self.node else {
            return Ok(0);
        };
        if node.lost(page).is_none() {
            return Ok(0); // the usual fault: no segment lookup
        }
        let end = match self.registry.find(page) {
            Some(segment) => (segment.first_page + segment.pages) as usize,
            None => page + 1 + REGAIN_MAX,
        };
        let actions = node.regain_ahead(page, write, end.min(page + 1 + REGAIN_MAX))?;
        let regained = actions.len();
        Stats::add(&self.stats.pages_regained, regained as u64);
        self.apply(actions, Carried::Nothing)?;
        Ok(regained)
    }

    /// Requests read-only copies of the pages `ahead` of a sequential read
    /// stream, within the space and within pages whose segment is known here
    /// (under release consistency too: clean copies, dropped at the next
    /// acquire like any).
    pub(super) fn prefetch(&mut self, ahead: std::ops::Range<usize>) -> Result<(), DsmError> {
        for next in ahead {
            let known = !self.registry.in_heap(next) || self.registry.find(next).is_some();
            if self.rc.contains(next) {
                if !known {
                    break;
                }
                let actions = self.release.prefetch(next)?;
                Stats::add(&self.stats.pages_prefetched, actions.len() as u64);
                self.apply(actions, Carried::Nothing)?;
                continue;
            }
            let Node::Mrsw(node) = &mut self.node else {
                return Ok(());
            };
            if !known || node.copy_of(next).is_none() {
                break;
            }
            let actions = node.prefetch(next)?;
            Stats::add(&self.stats.pages_prefetched, actions.len() as u64);
            self.apply(actions, Carried::Nothing)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Stream;

    #[test]
    pub(super) fn a_sequential_stream_is_read_ahead_in_growing_windows() {
        let mut s = Stream {
            max_depth: 16,
            ..Stream::default()
        };
        assert!(
            s.on_read_fault(10).is_empty(),
            "a first fault is not a stream"
        );
        for p in 11..14 {
            assert!(
                s.on_read_fault(p).is_empty(),
                "four faults in a row are not yet a stream"
            );
        }
        assert_eq!(s.on_read_fault(14), 15..16, "window 1");
        assert_eq!(
            s.on_read_fault(15),
            16..18,
            "nothing requested twice, window 2"
        );
        assert_eq!(s.on_read_fault(16), 18..21, "window 4");
        assert_eq!(s.on_read_fault(17), 21..26, "window 8");
        assert_eq!(s.on_read_fault(18), 26..35, "window 16");
        assert_eq!(s.on_read_fault(19), 35..36, "capped at 16 ahead");
        assert_eq!(
            s.on_read_fault(27),
            36..44,
            "a fault inside the window requested ahead continues the stream"
        );
        assert!(s.on_read_fault(100).is_empty(), "a jump ends the stream");
        // Pages 101..117 asked back with the fault on 100: the fault just
        // after them is the stream's second, and the fifth starts a window.
        s.requested(117);
        for p in 117..120 {
            assert!(s.on_read_fault(p).is_empty());
        }
        assert_eq!(s.on_read_fault(120), 121..122, "window 1");
        let mut off = Stream::default();
        for p in 0..10 {
            assert!(
                off.on_read_fault(p).is_empty(),
                "depth 0 turns prefetch off"
            );
        }
    }
}
