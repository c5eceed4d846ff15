//! The protocol driver: a message decoded (`Engine::handle`) goes to the
//! coherence state machine ([`crate::coherence`]), and its actions
//! (`Engine::apply`: send, install, protect, take away, reply to a waiting
//! API call) are carried out on the mapping and the outbox. Also the home's
//! own copies of pages (mapped or kept as bytes) and the page buffers
//! reused for them.

use super::{page_of, Engine, Node};
use crate::coherence::{twin, Action};
use crate::config::PAGE_SIZE;
use crate::error::DsmError;
use crate::fault::Installed;
use crate::outbox::PageSource;
use crate::proto::{Msg, PageData, PageDiffs, Payload};
use crate::stats::Stats;
use crate::{proto, Rank};
use std::sync::Arc;
use std::time::Instant;

/// The home's copy of a page no writer holds.
#[derive(Clone)]
pub(super) enum HomeCopy {
    /// Its bytes, kept here.
    Bytes(PageData),
    /// This rank's own read-only copy, in its mapping: the home wrote the
    /// page last and kept it shared, so read grants are sent straight from
    /// the mapping (no copy out). Copied out (`home_copy_bytes`) before the
    /// mapping of the page changes.
    Mapped,
}

/// Where the page bytes that the actions being applied install or keep
/// come from.
#[derive(Clone, Copy)]
pub(super) enum Carried<'a> {
    /// Nowhere: no action may need bytes.
    Nothing,
    /// The message being handled (a grant's or a write-back's bytes).
    Msg(&'a Msg),
    /// This rank's own copy, in its mapping (its write-back to itself).
    OwnCopy,
    /// A barrier release's diffs, ordered by page (release consistency).
    Updates(&'a PageDiffs),
}

/// Most spare page buffers kept (16 MiB): enough for a home to turn over a
/// large share of a 64 MiB stream without allocating.
const SPARE_PAGES: usize = 4096;

/// Most twins kept for reuse (256 KiB): enough for the pages a rank writes
/// between two releases in the kernels measured, small beside its cache.
const SPARE_TWINS: usize = 64;

/// A page holding `bytes`, in a spare buffer when there is one.
pub(super) fn filled_page(spares: &mut Vec<PageData>, bytes: &[u8]) -> PageData {
    if bytes.len() == PAGE_SIZE {
        if let Some(mut page) = spares.pop() {
            // Spares are unreferenced (`recycle`), so this always succeeds.
            if let Some(buffer) = Arc::get_mut(&mut page) {
                buffer.copy_from_slice(bytes);
                return page;
            }
        }
    }
    proto::page_from(bytes)
}

/// The page bytes carried by `current` (zeros for a zero grant).
pub(super) fn carried_page<'a>(
    current: Carried<'a>,
    zero_page: &'a [u8; PAGE_SIZE],
    page: usize,
) -> Result<&'a [u8; PAGE_SIZE], DsmError> {
    match current {
        Carried::Msg(Msg::PageGrant { data, .. }) => Ok(data.as_deref().unwrap_or(zero_page)),
        Carried::Msg(Msg::Grant {
            payload: Payload::Data(data),
            ..
        }) => Ok(data),
        Carried::Msg(Msg::Grant {
            payload: Payload::Zero,
            ..
        }) => Ok(zero_page),
        _ => Err(DsmError::Protocol(format!(
            "install of page {page} without a grant"
        ))),
    }
}

impl Engine {
    pub(super) fn handle(&mut self, from: Rank, msg: Msg, wire_len: usize) -> Result<(), DsmError> {
        match msg {
            Msg::BarrierEnter { .. } | Msg::BarrierRelease { .. } => {
                self.on_barrier_message(from, msg)
            }
            Msg::LockAcquire { .. } | Msg::LockRelease { .. } | Msg::LockGrant { .. } => {
                self.on_lock_message(from, msg)
            }
            Msg::AllocReq {
                ticket,
                pages,
                kind,
                rank,
            } => {
                let segment = if self.rank == 0 {
                    self.registry.allocate(pages, kind, rank)
                } else {
                    None
                };
                if let Some(info) = segment {
                    self.register(info);
                }
                self.out
                    .send(from, Msg::AllocReply { ticket, segment }.header());
                Ok(())
            }
            Msg::CoAllocReq {
                ticket,
                epoch,
                pages,
                kind,
                rank,
            } => self.on_coalloc_request(from, ticket, epoch, (pages, kind, rank)),
            Msg::AllocReply { ticket, segment } => {
                let Some((reply, contents)) = self.alloc_waiters.remove(&ticket) else {
                    return Err(DsmError::Protocol(format!(
                        "rank {from} answered an allocation nobody asked for"
                    )));
                };
                let Some(info) = segment else {
                    let _ = reply.send(Err(DsmError::Segment(
                        "the shared heap is full: allocate less, or enlarge the space (DSM_SPACE_SIZE; the heap is its upper half)"
                            .into(),
                    )));
                    return Ok(());
                };
                self.register(info);
                if let Some(contents) = contents {
                    self.load_contents(info, &contents);
                }
                let _ = reply.send(Ok(info));
                Ok(())
            }
            Msg::Lookup { page } => {
                let segment = self.registry.lookup(page as usize);
                self.out
                    .send(from, Msg::LookupReply { page, segment }.header());
                Ok(())
            }
            Msg::LookupReply { page, segment } => self.on_lookup_reply(page as usize, segment),
            Msg::FindSegment { page } => {
                let segment = self.registry.find(page as usize).copied();
                self.out
                    .send(from, Msg::FoundSegment { page, segment }.header());
                Ok(())
            }
            Msg::FoundSegment { page, segment } => {
                let page = page as usize;
                if let Ok(info) = self.segment_starting_at(page, segment) {
                    if self.registry.find(page).is_none() {
                        self.register(info);
                    }
                }
                for reply in self.finds.remove(&page).unwrap_or_default() {
                    let _ = reply.send(self.segment_starting_at(page, segment));
                }
                Ok(())
            }
            Msg::Free {
                step,
                epoch,
                segment,
            } => self.on_free_step(from, step, epoch, segment),
            Msg::PageRequest {
                page, requester, ..
            } => {
                let now = Instant::now();
                let actions = self.counted(|node| match node {
                    Node::Migratory(n) => n.on_request(page as usize, requester as usize, now),
                    Node::Mrsw(_) => Ok(Vec::new()),
                })?;
                self.apply(actions, Carried::Nothing)
            }
            Msg::PageGrant { page, .. } => {
                let page = page as usize;
                let actions = match &mut self.node {
                    Node::Migratory(n) => n.on_grant(page, from, Instant::now())?,
                    Node::Mrsw(_) => Vec::new(),
                };
                self.received_page(page, wire_len);
                self.apply(actions, Carried::Msg(&msg))
            }
            Msg::ShareFrames(offer) => {
                self.on_share_frames(from, &offer);
                Ok(())
            }
            msg => {
                let now = self.now();
                // A step of the page's home: co-located ranks stop reading
                // it directly until it is done (`direct.rs`).
                let home_step = page_of(&msg).filter(|p| {
                    !self.rc.contains(*p)
                        && matches!(&self.node, Node::Mrsw(n) if n.home_of(*p) == self.rank)
                });
                if let Some(page) = home_step {
                    self.retract_direct(page)?;
                }
                let actions = if page_of(&msg).is_some_and(|p| self.rc.contains(p)) {
                    self.release.on_message(from, &msg)?
                } else {
                    match msg {
                        Msg::ReadReq { page } if from != self.rank => {
                            self.consumers.asked(page as usize, from)
                        }
                        Msg::InvalidateAck { page } | Msg::Evicted { page }
                            if from != self.rank =>
                        {
                            self.consumers.lost(page as usize, from)
                        }
                        Msg::Grant {
                            page, write: false, ..
                        } if from != self.rank => {
                            if let Node::Mrsw(n) = &self.node {
                                if !n.awaits_read_grant(page as usize, from) {
                                    self.pushed_here(page as usize);
                                }
                            }
                        }
                        _ => {}
                    }
                    self.counted(|node| match node {
                        Node::Mrsw(n) => n.on_message(from, &msg, now),
                        Node::Migratory(_) => Ok(Vec::new()),
                    })?
                };
                if let Msg::Grant { page, .. } = msg {
                    self.received_page(page as usize, wire_len);
                }
                self.apply(actions, Carried::Msg(&msg))?;
                if let Some(page) = home_step {
                    self.publish_direct(page);
                }
                Ok(())
            }
        }
    }

    /// Keeps a page buffer nobody else references for the next page copied
    /// out or received (a 4 KiB allocation per page costs the allocator more
    /// than the copy: glibc consolidates its fast bins before every large
    /// request).
    pub(super) fn recycle(&mut self, mut buffer: PageData) {
        if Arc::get_mut(&mut buffer).is_some() && self.spare_pages.len() < SPARE_PAGES {
            self.spare_pages.push(buffer);
        }
    }

    /// A buffer for a page about to be copied out (its old bytes are all
    /// overwritten): a spare one, else a new one.
    pub(super) fn page_buffer(&mut self) -> PageData {
        self.spare_pages
            .pop()
            .unwrap_or_else(|| Arc::new([0u8; PAGE_SIZE]))
    }

    /// True when the home's copy of `page` is this rank's read-only mapping
    /// of it (never while the page is writable here).
    pub(super) fn home_copy_is_mapped(&self, page: usize) -> bool {
        matches!(self.backing.get(page), Some(HomeCopy::Mapped))
    }

    /// The home's copy of `page` as bytes (`None`: all zeros). One that
    /// lived in the mapping is copied out first, into the home's copy and
    /// into every queued grant that reads it: called before this rank's
    /// mapping of the page changes (dropped, made writable).
    pub(super) fn home_copy_bytes(&mut self, page: usize) -> Option<PageData> {
        match self.backing.get(page)? {
            HomeCopy::Bytes(data) => Some(data.clone()),
            HomeCopy::Mapped => {
                let mut data = self.page_buffer();
                self.faults.copy_out(page, Arc::make_mut(&mut data));
                self.out.copied_out(page, &data);
                self.backing.insert(page, HomeCopy::Bytes(data.clone()));
                Some(data)
            }
        }
    }

    /// This rank is about to write `page`: a home's copy of it is
    /// superseded by the writer's, as when a remote writer is granted the
    /// page (`GrantFromBacking`), and written back again before anyone else
    /// reads it. Only grants still queued that read the mapping need its
    /// bytes now (copying the whole copy out on every write the home makes
    /// cost a page buffer per page, freed again at the next read).
    pub(super) fn supersede_home_copy(&mut self, page: usize) {
        match self.backing.remove(page) {
            Some(HomeCopy::Mapped) if self.out.reads_mapping(page) => {
                let mut data = self.page_buffer();
                self.faults.copy_out(page, Arc::make_mut(&mut data));
                self.out.copied_out(page, &data);
            }
            Some(HomeCopy::Bytes(old)) => self.recycle(old),
            Some(HomeCopy::Mapped) | None => {}
        }
    }

    /// Release consistency, home: grants `to` a copy of `page` from the
    /// master copy, this rank's mapping (`mapped`), or zeros. Its words
    /// are copied out as atomics: the home's threads may write the page
    /// meanwhile (a racy program then reads either value of a word).
    fn grant_master_copy(&mut self, to: Rank, page: usize, mapped: bool) -> Result<(), DsmError> {
        if !mapped {
            let msg = Msg::Grant {
                page: page as u64,
                write: false,
                payload: Payload::Zero,
            };
            self.out.send(to, msg.header());
        } else {
            let mut data = self.page_buffer();
            twin::copy_words(self.faults.page_words(page), Arc::make_mut(&mut data))?;
            self.out.send_read_grant(to, page, PageSource::Bytes(data));
            Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
        }
        self.stats.page_sent(to);
        Ok(())
    }

    /// Release consistency: the words of `page` (write-protected by
    /// `protect_for_diffs`, so no store lands during the comparison) that
    /// differ from its twin, sent to the home (`to`) or, for a barrier
    /// entry (`None`), collected into it.
    fn send_diff(&mut self, to: Option<Rank>, page: usize) -> Result<(), DsmError> {
        let Some(twin) = self.twins.remove(&page) else {
            return Err(DsmError::Protocol(format!(
                "a diff of page {page}, which has no twin"
            )));
        };
        let runs = twin::diff(self.faults.mapped_page(page), &twin)?;
        if self.spare_twins.len() < SPARE_TWINS {
            self.spare_twins.push(twin);
        }
        if runs.is_empty() {
            let actions = self.release.diff_empty(page, to.is_none())?;
            return self.apply(actions, Carried::Nothing);
        }
        Stats::add(&self.stats.diffs_sent, 1);
        let words = runs.words() as u64;
        Stats::add(&self.stats.diff_words_sent, words);
        match to {
            Some(home) => {
                let msg = Msg::Diff {
                    page: page as u64,
                    runs,
                };
                self.out.send(home, msg.header());
            }
            None => self.barrier_updates.push((page as u64, runs)),
        }
        Ok(())
    }

    /// Applies actions outside a batch with their page operations staged
    /// into runs of consecutive pages, as a batch's are (one system call
    /// and one TLB shootdown per run); every one is done on return.
    pub(super) fn apply_in_runs(&mut self, actions: Vec<Action>) -> Result<(), DsmError> {
        self.in_runs(|this| this.apply(actions, Carried::Nothing))
    }

    /// Runs `work` as a batch's work runs: the page operations it applies
    /// are staged into runs of consecutive pages, and every one is done on
    /// return.
    pub(super) fn in_runs<T>(
        &mut self,
        work: impl FnOnce(&mut Self) -> Result<T, DsmError>,
    ) -> Result<T, DsmError> {
        self.run_staged()?;
        let outer = self.batch_clock.replace(self.now());
        let done = work(self);
        self.batch_clock = outer;
        let done = done?;
        self.run_staged()?;
        Ok(done)
    }

    /// Carries out the state machine's actions. `current` is the message
    /// being handled: its page bytes are what `Install*` maps and what
    /// `StoreBacking` keeps. Messages to this rank itself (it is the home
    /// of the page, or of the barrier or lock) are handled at once instead
    /// of looping through the transport: the same order as a loop-back
    /// (in order among themselves), without a thread hand-off.
    pub(super) fn apply(
        &mut self,
        actions: Vec<Action>,
        current: Carried<'_>,
    ) -> Result<(), DsmError> {
        for action in actions {
            if self.stage(&action, current)? {
                continue;
            }
            // Every other action comes after the page operations staged
            // before it, except a message: nothing leaves before the batch
            // is done, and one to this rank is handled through here.
            if !matches!(action, Action::Send { .. }) {
                self.run_staged()?;
            }
            match action {
                Action::Send { to, msg } if to == self.rank => self.handle(to, msg, 0)?,
                Action::Send { to, msg } => self.out.send(to, msg.header()),
                Action::GivePage { to, page, present } => {
                    if present {
                        let mut data = self.page_buffer();
                        self.faults.take(page, Arc::make_mut(&mut data))?;
                        self.out
                            .send_page(to, Msg::grant_header(page, true), page, data);
                        Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                    } else {
                        self.out.send(to, Msg::grant_header(page, false));
                    }
                    self.stats.page_sent(to);
                }
                Action::InstallGranted { page }
                | Action::Install {
                    page,
                    writable: true,
                } => {
                    let data = carried_page(current, &self.zero_page, page)?;
                    self.faults.install(page, data)?;
                }
                Action::Install {
                    page,
                    writable: false,
                } => {
                    let data = carried_page(current, &self.zero_page, page)?;
                    self.faults.install_readonly(page, data)?;
                }
                Action::InstallZero { page } => {
                    self.faults.install(page, &self.zero_page)?;
                }
                Action::InstallZeros { first, count } => {
                    self.faults.install_zero_run(first, count)?;
                }
                Action::MakeWritable { page } => {
                    self.supersede_home_copy(page);
                    self.faults.make_writable(page)?
                }
                Action::DropPage { page } => {
                    self.home_copy_bytes(page);
                    self.faults.drop_page(page)?
                }
                Action::WriteBack {
                    to,
                    page,
                    keep_shared: true,
                } if to == self.rank => {
                    // The home's own copy stays mapped read-only and is the
                    // home's copy from now on: nothing is copied out.
                    if !self.protected_ahead.remove(page) {
                        self.faults.write_protect(page, 1)?;
                    }
                    let rank = self.rank;
                    // A step of the home, also when a timer brings it (a
                    // recall deferred by the copy's hold, as a seal's).
                    self.retract_direct(page)?;
                    let actions = self.counted(|node| match node {
                        Node::Mrsw(n) => n.on_write_back(rank, page),
                        Node::Migratory(_) => Ok(Vec::new()),
                    })?;
                    self.apply(actions, Carried::OwnCopy)?;
                    self.publish_direct(page);
                }
                Action::WriteBack {
                    to,
                    page,
                    keep_shared,
                } => {
                    debug_assert!(!self.home_copy_is_mapped(page), "an exclusive copy");
                    // Copied once, into the buffer the write-back (and the
                    // home's copy it becomes) keeps.
                    let mut data = self.page_buffer();
                    let out = Arc::make_mut(&mut data);
                    if self.protected_ahead.remove(page) {
                        self.faults.copy_out(page, out);
                        if !keep_shared {
                            self.faults.drop_page(page)?;
                        }
                    } else if keep_shared {
                        self.faults.downgrade(page, out)?;
                    } else {
                        self.faults.take(page, out)?;
                    }
                    if to == self.rank {
                        let msg = Msg::WriteBack {
                            page: page as u64,
                            data,
                        };
                        self.handle(to, msg, 0)?;
                        continue;
                    }
                    self.out
                        .send_page(to, Msg::write_back_header(page), page, data);
                    self.stats.page_sent(to);
                    Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                }
                Action::EvictWriteBack { to, page } => {
                    let mut data = self.page_buffer();
                    self.faults.take(page, Arc::make_mut(&mut data))?;
                    self.out
                        .send_page(to, Msg::evicted_write_back_header(page), page, data);
                    self.stats.page_sent(to);
                    Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                    Stats::add(&self.stats.evictions_written_back, 1);
                    Stats::add(&self.stats.bytes_written_back, PAGE_SIZE as u64);
                }
                Action::StoreBacking { page } => {
                    let copy = match current {
                        Carried::Msg(
                            Msg::WriteBack { data, .. } | Msg::EvictedWriteBack { data, .. },
                        ) => HomeCopy::Bytes(data.clone()),
                        Carried::OwnCopy => HomeCopy::Mapped,
                        _ => {
                            return Err(DsmError::Protocol(format!(
                                "store of page {page} without a write-back"
                            )))
                        }
                    };
                    self.pages_since_memory_check += 1;
                    if let Some(HomeCopy::Bytes(old)) = self.backing.insert(page, copy) {
                        self.recycle(old);
                    }
                }
                Action::GrantFromBacking { to, page, write } => {
                    Stats::add(&self.stats.grants_served, 1);
                    if self.rc.contains(page) {
                        // The home's mapping is the master copy.
                        let mapped = self.release.mapped_here(page);
                        self.grant_master_copy(to, page, mapped)?;
                        continue;
                    }
                    if !write && to != self.rank && self.home_copy_is_mapped(page) {
                        self.out.send_read_grant(to, page, PageSource::Mapped);
                        Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                        self.stats.page_sent(to);
                        continue;
                    }
                    let data = self.home_copy_bytes(page);
                    if write {
                        // A writer's copy supersedes the home's: hand it over.
                        self.backing.remove(page);
                    }
                    if to == self.rank {
                        // The home's own write: once handled, nobody else
                        // holds these bytes, and the buffer serves again.
                        let spare = data.clone();
                        let payload = data.map(Payload::Data).unwrap_or(Payload::Zero);
                        let msg = Msg::Grant {
                            page: page as u64,
                            write,
                            payload,
                        };
                        self.handle(to, msg, 0)?;
                        if let Some(buffer) = spare {
                            self.recycle(buffer);
                        }
                        continue;
                    }
                    match data {
                        Some(data) if !write => {
                            self.out.send_read_grant(to, page, PageSource::Bytes(data));
                            Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                        }
                        Some(data) => {
                            self.out
                                .send_page(to, Msg::grant_data_header(page, write), page, data);
                            Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                        }
                        None => {
                            let msg = Msg::Grant {
                                page: page as u64,
                                write,
                                payload: Payload::Zero,
                            };
                            self.out.send(to, msg.header());
                        }
                    }
                    self.stats.page_sent(to);
                }
                Action::Wake { page } => self.faults.wake(page)?,
                Action::SealedWrite { page } => {
                    let segment = self.registry.find(page).map(|s| s.id).unwrap_or(0);
                    return Err(DsmError::SealedWrite {
                        segment,
                        addr: self.base + page * PAGE_SIZE,
                    });
                }
                Action::Settled { page } => self.settled(page)?,
                Action::TakeTwin { page } => {
                    // Installed write-protected (staged page operations
                    // done first): read in place.
                    self.run_staged()?;
                    let twin =
                        twin::take_twin(self.faults.mapped_page(page), self.spare_twins.pop())?;
                    self.twins.insert(page, twin);
                }
                Action::InstallTwinned { page } => {
                    let data = carried_page(current, &self.zero_page, page)?;
                    let twin = twin::take_twin(data, self.spare_twins.pop())?;
                    self.twins.insert(page, twin);
                    if self.faults.install(page, data)? == Installed::AlreadyPresent {
                        // The mapped bytes are not the grant's, so its twin
                        // would make their diff wrong: never by the
                        // protocol, and never silently.
                        return Err(DsmError::Protocol(format!(
                            "page {page} granted writable with a twin while already mapped"
                        )));
                    }
                }
                Action::SendDiff { to, page } => self.send_diff(Some(to), page)?,
                Action::CollectDiff { page } => self.send_diff(None, page)?,
                Action::ApplyUpdates { page } => {
                    let Carried::Updates(updates) = current else {
                        return Err(DsmError::Protocol(format!(
                            "barrier diffs of page {page} applied without a release"
                        )));
                    };
                    // Made writable first (the staged runs done).
                    self.run_staged()?;
                    let key = page as u64;
                    let first = updates.partition_point(|(p, _)| *p < key);
                    let words = self.faults.page_words(page);
                    let Some(twin) = self.twins.get_mut(&page) else {
                        return Err(DsmError::Protocol(format!(
                            "barrier diffs of page {page}, which has no twin"
                        )));
                    };
                    for (_, runs) in updates[first..].iter().take_while(|(p, _)| *p == key) {
                        twin::apply_unless_changed(words, twin, runs)?;
                    }
                }
                Action::Protect { page } => self.faults.write_protect(page, 1)?,
                Action::ApplyDiff { page } => {
                    self.run_staged()?;
                    let Carried::Msg(Msg::Diff { runs, .. }) = current else {
                        return Err(DsmError::Protocol(format!(
                            "a diff of page {page} applied without one"
                        )));
                    };
                    twin::apply(self.faults.page_words(page), runs)?;
                }
                Action::Released => self.released()?,
                Action::BarrierDiffsIn { epoch } => self.barrier_diffs_in(epoch)?,
            }
        }
        Ok(())
    }
}
