//! The collective free of a segment ([`crate::Dsm::free`]): every rank
//! calls it, and afterwards the segment's range holds nothing of it, at any
//! rank, so rank 0 may hand the range out again.
//!
//! Three steps, each a message from every rank to every rank (rank 0 only,
//! for the last), model-checked with the protocol (`tests/model_check.rs`):
//! 1. **Released**: once nothing is in flight for the segment's pages here
//!    (no request of its own, no deferred command), a rank gives up its
//!    copies of pages homed elsewhere (evictions: the directory stays exact,
//!    a writable copy goes home with its bytes) and drops its private pages,
//!    then tells every rank. Per-pair order puts its eviction notices ahead.
//! 2. **Reset**: a home that heard `Released` from every rank, once no
//!    transaction is left on its pages (an invalidation crossed by an
//!    eviction still awaits its acknowledgement), forgets their directory
//!    entries, its copies and its own mapping, and tells every rank: every
//!    command it sent about them is then ahead of that notice.
//! 3. **Forgotten**: a rank that heard `Reset` from a home forgets its
//!    state of the pages homed there; once it heard every home it forgets
//!    the segment, answers its caller and tells rank 0, which takes the
//!    range back once every rank has (it stopped answering lookups of it at
//!    step 2, so a stray access after the free is an error, never a page of
//!    the old segment).

use super::{Carried, Engine, Node, Reply};
use crate::error::DsmError;
use crate::proto::{FreeStep, Msg, SegmentInfo};
use crate::segment::kind_name;
use crate::{Rank, PAGE_SIZE};

/// A collective free under way at this rank, by its number.
pub(super) struct Freeing {
    segment: SegmentInfo,
    /// The first rank this rank heard of it from (itself, if it called
    /// first): named if another rank frees a different segment.
    first: Rank,
    /// This rank's own call, answered once the free is done here.
    reply: Option<Reply<()>>,
    /// This rank gave up its copies and sent `Released`.
    released: bool,
    /// Ranks whose `Released` arrived.
    released_by: Vec<bool>,
    /// This rank reset the pages it is home of and sent `Reset`.
    reset: bool,
    /// Homes whose `Reset` arrived.
    reset_by: Vec<bool>,
}

impl Freeing {
    fn new(segment: SegmentInfo, first: Rank, size: usize) -> Freeing {
        Freeing {
            segment,
            first,
            reply: None,
            released: false,
            released_by: vec![false; size],
            reset: false,
            reset_by: vec![false; size],
        }
    }

    fn pages(&self) -> std::ops::Range<usize> {
        let first = self.segment.first_page as usize;
        first..first + self.segment.pages as usize
    }

    /// Waiting on this rank's own progress (its requests or transactions
    /// in flight), not on another rank: the engine looks again shortly.
    fn stalled_here(&self) -> bool {
        (self.reply.is_some() && !self.released)
            || (!self.reset && self.released_by.iter().all(|r| *r))
    }
}

/// Rank 0's count of the ranks that forgot a freed segment.
pub(super) struct Forgetting {
    segment: SegmentInfo,
    ranks: Vec<bool>,
}

fn missing(ranks: &[bool]) -> String {
    let missing: Vec<String> = ranks
        .iter()
        .enumerate()
        .filter(|(_, done)| !**done)
        .map(|(r, _)| r.to_string())
        .collect();
    missing.join(", ")
}

impl Engine {
    /// This rank's call of the collective free of `segment`.
    pub(super) fn start_free(
        &mut self,
        segment: SegmentInfo,
        reply: Reply<()>,
    ) -> Result<(), DsmError> {
        let addr = self.base + segment.first_page as usize * PAGE_SIZE;
        let refuse = |why: String| {
            let _ = reply.send(Err(DsmError::Segment(why)));
            Ok(())
        };
        if !matches!(self.node, Node::Mrsw(_)) {
            return refuse(
                "segments need the multi-reader protocol (DSM_PROTOCOL=mrsw, the default)".into(),
            );
        }
        if segment.id == 0 {
            return refuse(format!(
                "{addr:#x} is heap memory used without a segment: only a segment from alloc or coalloc can be freed"
            ));
        }
        if self.freed_segments.contains(&segment.id) {
            return refuse(format!(
                "segment {} at {addr:#x} was freed already",
                segment.id
            ));
        }
        match self.registry.find(segment.first_page as usize) {
            Some(known) if *known != segment => {
                return refuse(format!(
                    "segment {} at {addr:#x} is not a segment of this job (segment {} is there)",
                    segment.id, known.id
                ))
            }
            Some(_) => {}
            None => self.register(segment),
        }
        self.free_epoch += 1;
        let epoch = self.free_epoch;
        let me = self.rank;
        self.freeing_entry(epoch, segment, me)?.reply = Some(reply);
        self.advance_frees()
    }

    /// The free numbered `epoch`, created on first word of it; an error if
    /// it frees another segment than `segment` (named by `from`).
    fn freeing_entry(
        &mut self,
        epoch: u64,
        segment: SegmentInfo,
        from: Rank,
    ) -> Result<&mut Freeing, DsmError> {
        let size = self.size;
        let base = self.base;
        let f = self
            .frees
            .entry(epoch)
            .or_insert_with(|| Freeing::new(segment, from, size));
        if f.segment != segment {
            let at = |s: &SegmentInfo| base + s.first_page as usize * PAGE_SIZE;
            return Err(DsmError::Segment(format!(
                "collective free {epoch}: rank {from} frees segment {} ({:#x}), rank {} segment {} ({:#x}); every rank must free the same segments in the same order",
                segment.id,
                at(&segment),
                f.first,
                f.segment.id,
                at(&f.segment)
            )));
        }
        Ok(f)
    }

    /// True while a free waits on this rank's own progress: the engine
    /// thread then looks again within a millisecond (requests it waits
    /// for may be answered in a receive thread, which does not wake it).
    pub(super) fn free_stalled(&self) -> bool {
        self.frees.values().any(Freeing::stalled_here)
    }

    /// True while a free of the segment holding `page` is under way here.
    pub(super) fn frees_page(&self, page: usize) -> bool {
        self.frees.values().any(|f| f.pages().contains(&page))
    }

    /// Takes every free under way as far as it can go now.
    pub(super) fn advance_frees(&mut self) -> Result<(), DsmError> {
        let epochs: Vec<u64> = self.frees.keys().copied().collect();
        for epoch in epochs {
            self.release_for_free(epoch)?;
            self.reset_for_free(epoch)?;
        }
        Ok(())
    }

    /// Step 1 of free `epoch`, once this rank called it and nothing is in
    /// flight here for the segment's pages.
    fn release_for_free(&mut self, epoch: u64) -> Result<(), DsmError> {
        let Some(f) = self.frees.get(&epoch) else {
            return Ok(());
        };
        let (pages, segment) = (f.pages(), f.segment);
        let Node::Mrsw(node) = &self.node else {
            return Ok(());
        };
        let ready = |p: usize| {
            if segment.release {
                self.release.free_ready(p)
            } else {
                node.free_ready(p)
            }
        };
        if f.reply.is_none() || f.released || !pages.clone().all(ready) {
            return Ok(());
        }
        // As an eviction: drops of consecutive pages go in runs, and their
        // frames back to the kernel.
        self.run_staged()?;
        self.batch_clock = Some(self.now());
        let released = pages.into_iter().try_for_each(|page| {
            let actions = if segment.release {
                // Writes to memory being freed are dropped with their twin.
                self.twins.remove(&page);
                self.release.release_for_free(page)
            } else {
                self.counted(|node| match node {
                    Node::Mrsw(n) => n.release_for_free(page),
                    Node::Migratory(_) => Ok(Vec::new()),
                })?
            };
            self.apply(actions, Carried::Nothing)
        });
        self.batch_clock = None;
        released?;
        self.run_staged()?;
        self.faults.release_dropped_frames()?;
        if let Some(f) = self.frees.get_mut(&epoch) {
            f.released = true;
        }
        self.free_step_to_all(FreeStep::Released, epoch, segment);
        Ok(())
    }

    /// Step 2 of free `epoch`, as the home of some of its pages, once every
    /// rank released them and no transaction is left on them.
    fn reset_for_free(&mut self, epoch: u64) -> Result<(), DsmError> {
        let Some(f) = self.frees.get(&epoch) else {
            return Ok(());
        };
        let (pages, segment) = (f.pages(), f.segment);
        if f.reset || !f.released_by.iter().all(|r| *r) {
            return Ok(());
        }
        let Node::Mrsw(node) = &self.node else {
            return Ok(());
        };
        let me = self.rank;
        if segment.release {
            // No directory: the master copies (private pages' too) are
            // forgotten, and dropped with the range below.
            for page in pages.clone() {
                self.release.reset_home_page(page);
            }
        }
        let homed: Vec<usize> = if segment.kind == 3 || segment.release {
            Vec::new() // private, or release-consistent: no directory
        } else {
            pages.clone().filter(|p| node.home_of(*p) == me).collect()
        };
        // The readers that copied them directly count (and say when they
        // released them) like any other.
        for &page in &homed {
            self.retract_direct(page)?;
        }
        let Node::Mrsw(node) = &self.node else {
            return Ok(());
        };
        if !homed.iter().all(|p| node.home_idle(*p)) {
            return Ok(());
        }
        self.consumers.forget(pages.clone());
        for page in homed {
            let actions = self.counted(|node| match node {
                Node::Mrsw(n) => n.reset_home_page(page),
                Node::Migratory(_) => Ok(Vec::new()),
            })?;
            self.apply(actions, Carried::Nothing)?;
            self.supersede_home_copy(page);
            self.protected_ahead.remove(page);
        }
        // Every page of the range is now unmapped here: those homed
        // elsewhere went in step 1 and none was asked for since.
        self.faults.drop_run(pages.start, pages.len())?;
        self.faults.release_dropped_frames()?;
        if let Some(f) = self.frees.get_mut(&epoch) {
            f.reset = true;
        }
        self.free_step_to_all(FreeStep::Reset, epoch, segment);
        Ok(())
    }

    fn free_step_to_all(&mut self, step: FreeStep, epoch: u64, segment: SegmentInfo) {
        let msg = Msg::Free {
            step,
            epoch,
            segment,
        }
        .header();
        for rank in 0..self.size {
            self.out.send(rank, msg.clone());
        }
    }

    /// A step of a collective free from rank `from`.
    pub(super) fn on_free_step(
        &mut self,
        from: Rank,
        step: FreeStep,
        epoch: u64,
        segment: SegmentInfo,
    ) -> Result<(), DsmError> {
        match step {
            FreeStep::Released => {
                let f = self.freeing_entry(epoch, segment, from)?;
                f.released_by[from] = true;
                let everyone = f.released_by.iter().all(|r| *r);
                if everyone && self.rank == 0 {
                    // Lookups of its pages find nothing from now on.
                    self.registry.retire(segment.first_page as usize);
                }
                self.reset_for_free(epoch)
            }
            FreeStep::Reset => {
                let f = self.freeing_entry(epoch, segment, from)?;
                if !f.released {
                    return Err(DsmError::Protocol(format!(
                        "rank {from} reset segment {} before this rank released it",
                        segment.id
                    )));
                }
                f.reset_by[from] = true;
                let pages = f.pages();
                let done = f.reset_by.iter().all(|r| *r);
                if from != self.rank && segment.kind != 3 && !segment.release {
                    if let Node::Mrsw(node) = &mut self.node {
                        for page in pages.clone() {
                            if node.home_of(page) == from {
                                node.forget_page(page, from)?;
                            }
                        }
                    }
                }
                if done {
                    self.finish_free(epoch, pages)?;
                }
                Ok(())
            }
            FreeStep::Forgotten => {
                if self.rank != 0 {
                    return Err(DsmError::Protocol(format!(
                        "rank {from} sent the end of a free to rank {}",
                        self.rank
                    )));
                }
                let size = self.size;
                let entry = self
                    .forgetting
                    .entry(segment.id)
                    .or_insert_with(|| Forgetting {
                        segment,
                        ranks: vec![false; size],
                    });
                entry.ranks[from] = true;
                if entry.ranks.iter().all(|r| *r) {
                    let done = self.forgetting.remove(&segment.id);
                    if let Some(done) = done {
                        self.registry.reclaim(done.segment);
                    }
                }
                Ok(())
            }
        }
    }

    /// Step 3's end at this rank: every home reset its pages.
    fn finish_free(&mut self, epoch: u64, pages: std::ops::Range<usize>) -> Result<(), DsmError> {
        let Some(f) = self.frees.remove(&epoch) else {
            return Ok(());
        };
        if let Node::Mrsw(node) = &mut self.node {
            node.forget_placement(pages.clone());
        }
        self.release.set_home(pages.clone(), None);
        self.rc.set(pages, None);
        self.registry.forget(&f.segment);
        self.freed_segments.insert(f.segment.id);
        self.out.send(
            0,
            Msg::Free {
                step: FreeStep::Forgotten,
                epoch,
                segment: f.segment,
            }
            .header(),
        );
        if let Some(reply) = f.reply {
            let _ = reply.send(Ok(()));
        }
        Ok(())
    }

    /// Lines for a hang report: the frees under way and whom they wait for.
    pub(super) fn frees_report(&self) -> Vec<String> {
        self.frees
            .iter()
            .map(|(epoch, f)| {
                let what = format!(
                    "free {epoch} of segment {} ({}, {:#x})",
                    f.segment.id,
                    kind_name(f.segment.kind),
                    self.base + f.segment.first_page as usize * PAGE_SIZE
                );
                if f.reply.is_none() {
                    format!("{what}: called by other ranks, not by this one yet")
                } else if !f.released {
                    let busy: Vec<String> = match &self.node {
                        Node::Mrsw(n) => f
                            .pages()
                            .filter(|p| !n.free_ready(*p))
                            .take(4)
                            .map(|p| format!("page {p}: {}", n.describe_page(p)))
                            .collect(),
                        Node::Migratory(_) => Vec::new(),
                    };
                    format!(
                        "{what}: waiting for this rank's requests in flight to end ({})",
                        busy.join("; ")
                    )
                } else if !f.released_by.iter().all(|r| *r) {
                    format!(
                        "{what}: waiting for rank(s) {} to call it",
                        missing(&f.released_by)
                    )
                } else {
                    format!(
                        "{what}: waiting for home rank(s) {} to reset their pages",
                        missing(&f.reset_by)
                    )
                }
            })
            .collect()
    }
}
