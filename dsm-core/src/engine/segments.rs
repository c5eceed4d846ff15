//! Segments on demand: events about pages of a segment this rank does not
//! know yet are parked, rank 0 (the reference rank) is asked, and they are
//! replayed in order once the segment is registered; allocation and
//! collective allocation at rank 0; a file segment's initial contents.

use super::protocol::{Carried, HomeCopy};
use super::{Engine, Node, Reply};
use crate::coherence::Action;
use crate::config::PAGE_SIZE;
use crate::error::DsmError;
use crate::fault::Fault;
use crate::proto::{Msg, SegmentInfo, KIND_RELEASE};
use crate::segment::{kind_name, KIND_RAW};
use crate::{proto, Message, Rank};
use rustc_hash::FxHashSet;
use std::path::PathBuf;

/// An event waiting for its segment to be registered.
pub(super) enum Parked {
    Fault(Fault),
    Message(Message),
}

/// Rank 0's record of a collective allocation under way: the arguments
/// of the first rank that asked (every rank must pass the same) and who
/// asked, with the ticket to answer each under.
pub(super) struct PendingCoAlloc {
    pub(super) pages: u64,
    pub(super) kind: u8,
    pub(super) rank: u32,
    pub(super) first: Rank,
    pub(super) askers: Vec<(Rank, u64)>,
}

/// A seal or sync waiting for its pages to settle at this home.
pub(super) struct Settling {
    pub(super) pages: FxHashSet<usize>,
    pub(super) reply: Reply<()>,
    /// For a sync: the file to write once every page is current.
    pub(super) write_to: Option<SyncFile>,
}

/// A sync's file and the segment's bytes gathered for it.
pub(super) struct SyncFile {
    pub(super) path: PathBuf,
    /// The file's length (the segment's last page may hold more).
    pub(super) len: usize,
    /// The segment's first page.
    pub(super) first: usize,
    /// Each page's bytes as they were when it settled (a page written again
    /// before the last one settles has left the home's copy).
    pub(super) contents: Vec<u8>,
}

impl Engine {
    /// True when `page` is in a heap segment this rank does not know yet:
    /// events about it wait (`park`) until the segment is looked up.
    pub(super) fn segment_unknown(&self, page: usize) -> bool {
        matches!(self.node, Node::Mrsw(_))
            && self.registry.in_heap(page)
            && self.registry.find(page).is_none()
    }

    /// Parks an event about a page of an unknown segment and looks the
    /// segment up (once per page).
    pub(super) fn park(&mut self, page: usize, event: Parked) {
        let first = !self.parked.contains_key(&page);
        self.parked.entry(page).or_default().push(event);
        if first {
            self.out.send(0, Msg::Lookup { page: page as u64 }.header());
        }
    }

    /// Makes a segment known to this rank's state machine.
    pub(super) fn register(&mut self, info: SegmentInfo) {
        self.registry.insert(info);
        let range = info.first_page as usize..(info.first_page + info.pages) as usize;
        if let Node::Mrsw(node) = &mut self.node {
            match info.kind {
                1 | 2 | 4 => node.set_home(range.clone(), info.rank as Rank),
                3 => node.set_private(range.clone()),
                _ => {}
            }
        }
        match info.kind {
            1 | 2 | 4 => self.release.set_home(range.clone(), info.rank as Rank),
            // Under release consistency each rank is the home of its own
            // private pages: mapped at first touch, never a message.
            3 => self.release.set_home(range.clone(), self.rank),
            _ => {}
        }
        if info.kind != KIND_RAW {
            self.rc.set(range, Some(info.release));
        }
    }

    /// Puts a file's bytes into this home's copies of the segment's pages.
    pub(super) fn load_contents(&mut self, info: SegmentInfo, contents: &[u8]) {
        for (i, chunk) in contents
            .chunks(PAGE_SIZE)
            .enumerate()
            .take(info.pages as usize)
        {
            if chunk.iter().all(|b| *b == 0) {
                continue;
            }
            self.backing.insert(
                info.first_page as usize + i,
                HomeCopy::Bytes(proto::page_from(chunk)),
            );
        }
    }

    /// `segment_at`'s answer: `segment`, if it is one and starts at `page`.
    pub(super) fn segment_starting_at(
        &self,
        page: usize,
        segment: Option<SegmentInfo>,
    ) -> Result<SegmentInfo, DsmError> {
        match segment {
            Some(info) if info.id != 0 && info.first_page as usize == page => Ok(info),
            _ => Err(DsmError::Segment(format!(
                "{:#x} is not the address of a segment of this job (as alloc or coalloc returned it)",
                self.base + page * PAGE_SIZE
            ))),
        }
    }

    pub(super) fn on_lookup_reply(
        &mut self,
        page: usize,
        segment: Option<SegmentInfo>,
    ) -> Result<(), DsmError> {
        let Some(info) = segment else {
            let addr = self.base + page * PAGE_SIZE;
            return Err(DsmError::Unallocated { addr });
        };
        self.register(info);
        let range = info.first_page as usize..(info.first_page + info.pages) as usize;
        let pages: Vec<usize> = self.parked.range(range).map(|(p, _)| *p).collect();
        for p in pages {
            for event in self.parked.remove(&p).unwrap_or_default() {
                match event {
                    Parked::Fault(f) => self.on_fault(f)?,
                    Parked::Message(m) => self.on_message(m)?,
                }
            }
        }
        Ok(())
    }

    /// Seal (`seal`) or flush every page of a segment homed here; replies
    /// (after writing `len` bytes to the file `write_to`, for a sync) once
    /// all are settled.
    pub(super) fn settle_segment(
        &mut self,
        segment: SegmentInfo,
        reply: Reply<()>,
        write_to: Option<(PathBuf, usize)>,
        seal: bool,
    ) -> Result<(), DsmError> {
        let range = segment.first_page as usize..(segment.first_page + segment.pages) as usize;
        let write_to = write_to.map(|(path, len)| SyncFile {
            path,
            len,
            first: range.start,
            contents: vec![0; range.len() * PAGE_SIZE],
        });
        self.settling.push(Settling {
            pages: range.clone().collect(),
            reply,
            write_to,
        });
        for page in range {
            self.retract_direct(page)?;
            let actions = match &mut self.node {
                Node::Mrsw(n) if seal => n.seal(page)?,
                Node::Mrsw(n) => n.settle(page)?,
                Node::Migratory(_) => vec![Action::Settled { page }],
            };
            self.apply(actions, Carried::Nothing)?;
            self.publish_direct(page);
        }
        Ok(())
    }

    pub(super) fn settled(&mut self, page: usize) -> Result<(), DsmError> {
        let Some(i) = self.settling.iter().position(|s| s.pages.contains(&page)) else {
            return Ok(());
        };
        let settling = &mut self.settling[i];
        settling.pages.remove(&page);
        if let Some(file) = &mut settling.write_to {
            let at = (page - file.first) * PAGE_SIZE;
            let current = match self.backing.get(page) {
                Some(HomeCopy::Bytes(b)) => &b[..],
                Some(HomeCopy::Mapped) => self.faults.mapped_page(page),
                None => &self.zero_page[..],
            };
            file.contents[at..at + PAGE_SIZE].copy_from_slice(current);
        }
        if !settling.pages.is_empty() {
            return Ok(());
        }
        let done = self.settling.remove(i);
        let result = match done.write_to {
            Some(SyncFile {
                path,
                len,
                mut contents,
                ..
            }) => {
                contents.truncate(len);
                std::fs::write(&path, &contents)
                    .map_err(|e| DsmError::Segment(format!("writing {} back: {e}", path.display())))
            }
            None => Ok(()),
        };
        let _ = done.reply.send(result);
        Ok(())
    }

    /// Sends rank 0 the request `make(ticket)` for a segment, its answer
    /// (`AllocReply`) to go to `reply` (with `contents` loaded into the
    /// segment, for a file). False, having answered `reply` with the error,
    /// under the migratory protocol, which has no segments.
    pub(super) fn ask_rank0_for_segment(
        &mut self,
        reply: Reply<SegmentInfo>,
        contents: Option<Vec<u8>>,
        kind: u8,
        make: impl FnOnce(u64) -> Msg,
    ) -> bool {
        let placement = kind & !KIND_RELEASE;
        let refused = match self.node {
            Node::Mrsw(_) if kind & KIND_RELEASE != 0 && matches!(placement, 2 | 4) => Some(format!(
                "a release-consistent {} segment cannot exist: sealing and file sync need sequential consistency (allocate it with Consistency::Sequential, or DSM_SEQUENTIAL in C)",
                kind_name(placement)
            )),
            Node::Mrsw(_) => None,
            Node::Migratory(_) => Some(
                "segments need the multi-reader protocol (DSM_PROTOCOL=mrsw, the default) or release consistency (DSM_PROTOCOL=release)".into(),
            ),
        };
        if let Some(why) = refused {
            let _ = reply.send(Err(DsmError::Segment(why)));
            return false;
        }
        let ticket = self.ticket();
        self.alloc_waiters.insert(ticket, (reply, contents));
        self.out.send(0, make(ticket).header());
        true
    }

    /// Rank 0: rank `from`'s part of collective allocation `epoch`. Once
    /// every rank has asked, with the same arguments, the segment is
    /// allocated once and every rank answered with it; different arguments
    /// are a program error that ends the job, naming both calls.
    pub(super) fn on_coalloc_request(
        &mut self,
        from: Rank,
        ticket: u64,
        epoch: u64,
        (pages, kind, rank): (u64, u8, u32),
    ) -> Result<(), DsmError> {
        if self.rank != 0 {
            return Err(DsmError::Protocol(format!(
                "rank {from} sent a collective allocation to rank {}",
                self.rank
            )));
        }
        let pending = self.coallocs.entry(epoch).or_insert(PendingCoAlloc {
            pages,
            kind,
            rank,
            first: from,
            askers: Vec::new(),
        });
        if (pending.pages, pending.kind, pending.rank) != (pages, kind, rank) {
            let describe = |pages: u64, kind: u8, rank: u32| match kind {
                1 => format!("{pages} page(s) localized at rank {rank}"),
                _ => format!("{pages} page(s) {}", kind_name(kind)),
            };
            return Err(DsmError::Segment(format!(
                "collective allocation {epoch}: rank {from} asked for {}, rank {} for {}; every rank must call it with the same size and placement, in the same order",
                describe(pages, kind, rank),
                pending.first,
                describe(pending.pages, pending.kind, pending.rank)
            )));
        }
        if pending.askers.iter().any(|(r, _)| *r == from) {
            return Err(DsmError::Protocol(format!(
                "rank {from} asked twice for collective allocation {epoch}"
            )));
        }
        pending.askers.push((from, ticket));
        if pending.askers.len() < self.size {
            return Ok(());
        }
        let Some(done) = self.coallocs.remove(&epoch) else {
            return Ok(());
        };
        let segment = self.registry.allocate(done.pages, done.kind, done.rank);
        if let Some(info) = segment {
            self.register(info);
        }
        for (asker, ticket) in done.askers {
            self.out
                .send(asker, Msg::AllocReply { ticket, segment }.header());
        }
        Ok(())
    }
}
