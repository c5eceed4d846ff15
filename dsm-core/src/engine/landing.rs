//! Pages arriving: read grants mapped straight from the bytes received
//! (runs of consecutive pages in one system call), runs a receive thread
//! lands in their frames before the message is handled, and the staging of
//! page operations of one batch into one run (`Engine::run_staged`).

use super::protocol::{carried_page, filled_page, Carried};
use super::{Engine, Node};
use crate::coherence::mrsw::Copy;
use crate::coherence::Action;
use crate::config::PAGE_SIZE;
use crate::error::DsmError;
use crate::fault::FaultError;
use crate::proto::{Msg, PageData, Payload};
use crate::stats::Stats;
use crate::transport::Landing;
use crate::{proto, Rank};
use std::hash::BuildHasher;
use std::sync::Arc;

/// A run of read grants being landed in its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Landed {
    pub(super) from: Rank,
    pub(super) first: usize,
    pub(super) count: usize,
    /// What its notice carries.
    pub(super) token: u64,
}

/// Most pages a span write-protected ahead of a batch's read requests may
/// skip between two requested pages (`protect_ahead_of_reads`).
const SPAN_MAX_SKIP: usize = 64;

/// A page operation that one system call does for a run of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum RunOp {
    /// Map read-only copies (`UFFDIO_COPY` with write protection).
    #[default]
    InstallReadOnly,
    /// Drop invalidated copies (`MADV_DONTNEED`).
    Drop,
    /// Lift the write protection of upgraded copies.
    MakeWritable,
}

/// Consecutive pages `first..first + count` waiting for one `op` (and, to
/// install, their bytes): one TLB shootdown for the run instead of one per
/// page.
#[derive(Default)]
pub(super) struct StagedRun {
    pub(super) op: RunOp,
    pub(super) first: usize,
    pub(super) count: usize,
    pub(super) data: Vec<u8>,
}

impl StagedRun {
    /// True when `page` waits in this run for `op`.
    pub(super) fn holds(&self, op: RunOp, page: usize) -> bool {
        self.op == op && (self.first..self.first + self.count).contains(&page)
    }
}

/// Where the bytes of a run of read grants are.
#[derive(Clone, Copy)]
pub(super) enum RunBytes<'a> {
    /// In the message received, page after page.
    Received(&'a [u8]),
    /// Already in the pages' frames (this many pages), landed there by the
    /// transport.
    Landed(usize),
}

impl RunBytes<'_> {
    pub(super) fn count(&self) -> usize {
        match self {
            RunBytes::Received(pages) => pages.len() / PAGE_SIZE,
            RunBytes::Landed(count) => *count,
        }
    }
}

impl Engine {
    /// Read grants of consecutive pages (`proto::read_grant_run`): each page
    /// goes through the state machine as its own grant, and those whose only
    /// action is their read-only install are mapped straight from the
    /// received bytes, one `UFFDIO_COPY` per run: no copy per page.
    pub(super) fn on_read_grant_run(
        &mut self,
        from: Rank,
        first: usize,
        bytes: RunBytes<'_>,
    ) -> Result<(), DsmError> {
        let count = bytes.count();
        if (first..first + count).any(|page| self.segment_unknown(page)) {
            // Not what this rank asked for (it knows the segments of its
            // requests): the grants one by one, as the state machine and
            // parking expect them.
            for i in 0..count {
                let page = first + i;
                let grant = [
                    &Msg::grant_data_header_bytes(page, false)[..],
                    &self.run_page(bytes, first, i)[..],
                ]
                .concat();
                self.on_payload(from, &grant)?;
            }
            return Ok(());
        }
        // Page operations staged before the run come first.
        self.run_staged()?;
        let now = self.now();
        // Pages from `first + direct` up to the one handled are mapped
        // together once something else must happen.
        let mut direct = 0;
        for i in 0..count {
            let page = first + i;
            let rc = self.rc.contains(page);
            let actions = match &mut self.node {
                _ if rc => self.release.on_read_grant(from, page)?,
                Node::Mrsw(node) => {
                    let pushed = !node.awaits_read_grant(page, from);
                    let actions = node.on_read_grant(from, page, now)?;
                    if pushed {
                        self.pushed_here(page);
                    }
                    actions
                }
                Node::Migratory(_) => {
                    return Err(DsmError::Protocol(format!(
                        "rank {from} sent read grants of the multi-reader protocol, but this rank runs the migratory one"
                    )))
                }
            };
            self.received_page(page, PAGE_SIZE);
            if let [Action::Install {
                page: p,
                writable: false,
            }] = actions[..]
            {
                if p == page {
                    continue;
                }
            }
            if i > direct {
                self.install_run_part(bytes, first, direct..i)?;
            }
            direct = i + 1;
            let grant = Msg::Grant {
                page: page as u64,
                write: false,
                payload: Payload::Data(self.run_page(bytes, first, i)),
            };
            self.apply(actions, Carried::Msg(&grant))?;
            self.run_staged()?;
            if let Some(buffer) = grant.page_data().cloned() {
                drop(grant);
                self.recycle(buffer);
            }
        }
        if direct < count {
            self.install_run_part(bytes, first, direct..count)?;
        }
        Ok(())
    }

    /// Maps pages `first + parts` of a run of read grants, read-only.
    pub(super) fn install_run_part(
        &self,
        bytes: RunBytes<'_>,
        first: usize,
        part: std::ops::Range<usize>,
    ) -> Result<(), FaultError> {
        match bytes {
            RunBytes::Received(pages) => self.faults.install_readonly_run(
                first + part.start,
                &pages[part.start * PAGE_SIZE..part.end * PAGE_SIZE],
            ),
            RunBytes::Landed(_) => self
                .faults
                .install_landed_run(first + part.start, part.len()),
        }
    }

    /// The bytes of page `first + i` of a run of read grants, in a buffer.
    pub(super) fn run_page(&mut self, bytes: RunBytes<'_>, first: usize, i: usize) -> PageData {
        match bytes {
            RunBytes::Received(pages) => filled_page(
                &mut self.spare_pages,
                &pages[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
            ),
            RunBytes::Landed(_) => {
                let mut page = self.page_buffer();
                self.faults.copy_landed(first + i, Arc::make_mut(&mut page));
                page
            }
        }
    }

    /// In a receive thread, before the pages of a run of read grants from
    /// `from` are read: their frames to land them in, if this rank waits
    /// for exactly these grants (so nothing maps or writes those pages
    /// until the run is handled) and holds a memfd; otherwise `None`, and
    /// the run arrives in a buffer as usual. The notice the landing hands
    /// on is handled by `on_landed_run`.
    pub(super) fn land_read_grant_run(
        &mut self,
        from: Rank,
        first: usize,
        count: usize,
    ) -> Option<Box<dyn Landing>> {
        let Node::Mrsw(node) = &self.node else {
            return None;
        };
        let pages = first..first.checked_add(count)?;
        let overlaps = |l: &Landed| l.first < pages.end && pages.start < l.first + l.count;
        if !self.serving
            || self.reading_directly()
            || self.staged.count > 0
            || self.landing.iter().any(overlaps)
            || pages.clone().any(|p| !node.awaits_read_grant(p, from))
            || pages.clone().any(|p| self.segment_unknown(p))
        {
            return None;
        }
        self.landings_made += 1;
        let token = self.landing_tokens.hash_one(self.landings_made);
        let landing = self
            .faults
            .landing(first, count, proto::placed_read_run_notice(token))?;
        self.landing.push_back(Landed {
            from,
            first,
            count,
            token,
        });
        Stats::add(&self.stats.pages_landed, count as u64);
        Some(landing)
    }

    /// The notice a receive thread hands on once a run of read grants
    /// landed in its frames: the run's grants, handled as if they had
    /// arrived with their bytes. A notice naming no landing this rank made
    /// for that sender (one sent on the wire) is a protocol error.
    pub(super) fn on_landed_run(&mut self, from: Rank, token: u64) -> Result<(), DsmError> {
        let found = self
            .landing
            .iter()
            .position(|l| l.token == token && l.from == from);
        let Some(Landed { first, count, .. }) = found.and_then(|i| self.landing.remove(i)) else {
            return Err(DsmError::Protocol(format!(
                "from rank {from}: a notice of pages landed in their frames that this rank did not land (such notices never travel between ranks)"
            )));
        };
        self.on_read_grant_run(from, first, RunBytes::Landed(count))
    }

    /// Home: the read requests of a batch (a reader's read-ahead) for
    /// pages this rank holds writable are write-protected in one system
    /// call per span of such pages, before they are handled one by one:
    /// one TLB shootdown per span instead of one per page. A span may
    /// skip pages (a round-robin window asks each home for every Nth page)
    /// that this rank does not hold writable: protecting them changes
    /// nothing (a read-only copy is protected already; a page not mapped
    /// gets a marker with a memfd, which the next install replaces).
    pub(super) fn protect_ahead_of_reads(&mut self, parts: &[&[u8]]) -> Result<(), DsmError> {
        let Node::Mrsw(node) = &self.node else {
            return Ok(());
        };
        let now = self.now();
        // The pages to downgrade, by span, in order.
        let mut spans: Vec<Vec<usize>> = Vec::new();
        for page in parts.iter().filter_map(|p| proto::read_request_page(p)) {
            let page = page as usize;
            if self.protected_ahead.contains(page)
                || self.rc.contains(page)
                || !node.read_request_downgrades_here(page, now)
            {
                continue;
            }
            let extends = spans
                .last()
                .and_then(|span| span.last())
                .is_some_and(|&last| {
                    page > last
                        && page - last <= SPAN_MAX_SKIP
                        && !(last + 1..page).any(|q| node.copy_of(q) == Some(Copy::Modified))
                });
            match spans.last_mut() {
                Some(span) if extends => span.push(page),
                _ => spans.push(vec![page]),
            }
        }
        for span in spans.into_iter().filter(|span| span.len() > 1) {
            let (first, last) = (span[0], span[span.len() - 1]);
            self.faults.write_protect(first, last + 1 - first)?;
            // Only the pages asked for are protected ahead of a downgrade:
            // the others kept what they had.
            for page in span {
                self.protected_ahead.insert(page);
            }
        }
        Ok(())
    }

    pub(super) fn received_page(&mut self, page: usize, bytes: usize) {
        self.pages_since_memory_check += 1;
        Stats::add(&self.stats.pages_received, 1);
        Stats::add(&self.stats.bytes_received, bytes as u64);
        let elsewhere = match &self.node {
            _ if self.rc.contains(page) => self.release.home_of(page) != self.rank,
            Node::Mrsw(node) => node.home_of(page) != self.rank,
            Node::Migratory(_) => false,
        };
        if elsewhere {
            self.cache.installed(page);
            Stats::raise(
                &self.stats.peak_cached_bytes,
                (self.cached() * PAGE_SIZE) as u64,
            );
        }
        if let Some(start) = self.fetch_started.remove(&page) {
            self.stats.record_latency(start.elapsed());
        }
    }

    /// Does the staged run of page operations, if any.
    pub(super) fn run_staged(&mut self) -> Result<(), DsmError> {
        let StagedRun {
            op,
            first,
            count,
            ref data,
        } = self.staged;
        match op {
            _ if count == 0 => {}
            RunOp::InstallReadOnly => self.faults.install_readonly_run(first, data)?,
            RunOp::Drop => self.faults.drop_run(first, count)?,
            RunOp::MakeWritable => self.faults.make_writable_run(first, count)?,
        }
        self.staged.count = 0;
        self.staged.data.clear();
        self.publish_after_staged();
        Ok(())
    }

    /// In a batch, adds a page operation that can be done on a run of
    /// pages to the staged run (done first if this one does not extend
    /// it); false for every other action.
    pub(super) fn stage(
        &mut self,
        action: &Action,
        current: Carried<'_>,
    ) -> Result<bool, DsmError> {
        let (op, page) = match *action {
            Action::Install {
                page,
                writable: false,
            } => (RunOp::InstallReadOnly, page),
            Action::DropPage { page } => (RunOp::Drop, page),
            Action::MakeWritable { page } => (RunOp::MakeWritable, page),
            _ => return Ok(false),
        };
        if self.batch_clock.is_none() {
            return Ok(false);
        }
        match op {
            RunOp::InstallReadOnly => {}
            RunOp::Drop => {
                self.home_copy_bytes(page);
            }
            RunOp::MakeWritable => self.supersede_home_copy(page),
        }
        let run = &self.staged;
        if run.count > 0 && run.op == op && op != RunOp::InstallReadOnly && page + 1 == run.first {
            // The page just before the run (a fault's own page after the
            // run it regained): no bytes to put in front, so it joins it.
            self.staged.first = page;
            self.staged.count += 1;
            return Ok(true);
        }
        if run.count == 0 || run.op != op || run.first + run.count != page {
            self.run_staged()?;
            self.staged.op = op;
            self.staged.first = page;
        }
        if op == RunOp::InstallReadOnly {
            let data = carried_page(current, &self.zero_page, page)?;
            self.staged.data.extend_from_slice(data);
        }
        self.staged.count += 1;
        Ok(true)
    }
}
