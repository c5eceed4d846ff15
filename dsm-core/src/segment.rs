//! Segments of the shared space, after the ALMOS-MKH placement policy.
//!
//! The space is split in two halves. The lower half is the seed's fixed
//! space: page i's home is rank `i mod N`, no registration. The upper half
//! is the heap, carved into segments by [`crate::Dsm::alloc`] from any rank:
//! the reference rank (0) keeps the full segment list and hands out address
//! ranges (top down); other ranks learn a segment on their first fault or
//! message in it (on-demand registration). Every segment sits at the same
//! address on every rank, so pointers stored in shared memory work anywhere.
//!
//! | placement | home of its pages | behaviour |
//! | --- | --- | --- |
//! | `Distributed` | rank `page mod N` | coherent |
//! | `Localized(r)` | rank r | coherent |
//! | `Replicated` | its creator | coherent until `seal()`; then read-only copies everywhere, never invalidated; a store is an error naming the segment |
//! | `Private` | each rank | node-local: every rank has its own pages, no directory traffic |
//! | `File(path)` | its creator (which holds the file) | initial contents from the file; `sync()` writes the pages back |
//!
//! Heap pages may also be used directly, as the seed's programs use the
//! whole space: a lookup of a page outside every segment makes its chunk of
//! [`RAW_CHUNK`] pages "raw" (homes `page mod N`, like the lower half), and
//! the allocator never hands out a raw chunk afterwards.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::proto::{SegmentInfo, KIND_RELEASE};
use crate::Rank;

/// Where a segment's pages live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Page `p` homed at rank `p mod N`; coherent.
    Distributed,
    /// Every page homed at the given rank (a rank of the job); coherent.
    Localized(Rank),
    /// Homed at its creator; coherent until [`crate::Dsm::seal`], then
    /// read-only copies everywhere, never invalidated, and a store is an
    /// error naming the segment.
    Replicated,
    /// Node-local: every rank has its own pages, no directory traffic.
    Private,
    /// Homed at its creator, which reads the file: the pages start with its
    /// contents (the segment is at least the file's size), and
    /// [`crate::Dsm::sync`] writes them back.
    File(PathBuf),
}

/// How a segment's pages are kept coherent: the job's protocol
/// (`DSM_PROTOCOL`) unless the allocation chose ([`crate::Dsm::alloc_with`]).
/// A job under release consistency keeps its synchronization data (atomics,
/// flags spun on) in sequentially consistent segments; a sequentially
/// consistent job may put falsely shared arrays in release-consistent ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// One writer per page at a time, every access sequentially consistent
    /// (the multi-reader protocol); atomics work across ranks.
    Sequential,
    /// Several writers per page; writes reach other ranks at the writer's
    /// next barrier, lock or unlock, and are seen after the reader's next
    /// barrier or lock (see [`crate::coherence::release`]). Atomic
    /// read-modify-writes of one word by several ranks lose updates.
    Release,
}

impl Placement {
    /// Wire code and rank argument (`creator` for the kinds homed at it).
    pub(crate) fn code(&self, creator: Rank) -> (u8, u32) {
        match self {
            Placement::Distributed => (0, 0),
            Placement::Localized(r) => (1, *r as u32),
            Placement::Replicated => (2, creator as u32),
            Placement::Private => (3, 0),
            Placement::File(_) => (4, creator as u32),
        }
    }

    /// Lowercase name of the placement (`distributed`, `localized`, ...),
    /// for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Placement::Distributed => "distributed",
            Placement::Localized(_) => "localized",
            Placement::Replicated => "replicated",
            Placement::Private => "private",
            Placement::File(_) => "file",
        }
    }
}

/// A segment as a program sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub(crate) info: SegmentInfo,
    pub(crate) base: usize,
    /// The size asked for (the segment spans whole pages).
    pub(crate) len: usize,
}

impl Segment {
    /// Id given by the reference rank, unique in the job (from 1 up).
    pub fn id(&self) -> u32 {
        self.info.id
    }

    /// Address of the segment, the same on every rank.
    pub fn addr(&self) -> *mut u8 {
        (self.base + self.info.first_page as usize * crate::PAGE_SIZE) as *mut u8
    }

    /// Size in bytes: as asked (or the file's size, if larger).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if `len` is 0 (never for a segment from `Dsm::alloc`, which
    /// refuses empty ones).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its pages, as indices in the shared space (whole pages covering
    /// `len`).
    pub fn pages(&self) -> std::ops::Range<usize> {
        let first = self.info.first_page as usize;
        first..first + self.info.pages as usize
    }

    /// How its pages are kept coherent.
    pub fn consistency(&self) -> Consistency {
        if self.info.release {
            Consistency::Release
        } else {
            Consistency::Sequential
        }
    }

    /// Name of its placement, as [`Placement::name`].
    pub fn kind_name(&self) -> &'static str {
        kind_name(self.info.kind)
    }
}

/// Pages per raw chunk (see the module documentation).
pub const RAW_CHUNK: usize = 64;
/// Segments this large (128 KiB) or larger are carved one page apart
/// (see `Registry::carve`).
pub const COLOUR_MIN_PAGES: usize = 32;
/// Wire kind of a raw chunk.
pub(crate) const KIND_RAW: u8 = 5;

pub(crate) fn kind_name(kind: u8) -> &'static str {
    match kind {
        0 => "distributed",
        1 => "localized",
        2 => "replicated",
        3 => "private",
        4 => "file",
        KIND_RAW => "raw",
        _ => "unknown",
    }
}

/// The segments a rank knows, by first page.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    segments: BTreeMap<usize, SegmentInfo>,
    /// First page of the heap (the upper half of the space).
    pub heap_start: usize,
    /// Reference rank only: the lowest page handed out so far (top-down).
    heap_low: usize,
    next_id: u32,
    /// Reference rank only: chunks used directly, never to be allocated.
    raw_chunks: std::collections::BTreeSet<usize>,
    /// Reference rank only: ranges of freed segments above `heap_low`,
    /// by first page (their length in pages), handed out again first.
    free_ranges: BTreeMap<usize, usize>,
}

impl Registry {
    pub fn new(pages: usize) -> Registry {
        Registry {
            segments: BTreeMap::new(),
            heap_start: pages / 2,
            heap_low: pages,
            next_id: 1,
            raw_chunks: std::collections::BTreeSet::new(),
            free_ranges: BTreeMap::new(),
        }
    }

    pub fn in_heap(&self, page: usize) -> bool {
        page >= self.heap_start
    }

    pub fn find(&self, page: usize) -> Option<&SegmentInfo> {
        self.segments
            .range(..=page)
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| page < (s.first_page + s.pages) as usize)
    }

    pub fn insert(&mut self, info: SegmentInfo) {
        self.segments.insert(info.first_page as usize, info);
    }

    /// Reference rank: takes `pages` pages from a freed range that fits
    /// (the smallest), else carves them off the top of the free heap.
    /// `kind` is the request's: the placement, with [`KIND_RELEASE`] for a
    /// release-consistent segment.
    pub fn allocate(&mut self, pages: u64, kind: u8, rank: u32) -> Option<SegmentInfo> {
        let pages_usize = usize::try_from(pages).ok().filter(|p| *p > 0)?;
        let first = match self.take_free_range(pages_usize) {
            Some(first) => first,
            None => self.carve(pages_usize)?,
        };
        let info = SegmentInfo {
            id: self.next_id,
            first_page: first as u64,
            pages,
            kind: kind & !KIND_RELEASE,
            rank,
            release: kind & KIND_RELEASE != 0,
        };
        self.next_id += 1;
        self.insert(info);
        Some(info)
    }

    /// The top `pages` pages of the smallest freed range that holds them.
    fn take_free_range(&mut self, pages: usize) -> Option<usize> {
        let (&start, &len) = self
            .free_ranges
            .iter()
            .filter(|(_, len)| **len >= pages)
            .min_by_key(|(_, len)| **len)?;
        self.free_ranges.remove(&start);
        if len > pages {
            self.free_ranges.insert(start, len - pages);
        }
        Some(start + len - pages)
    }

    /// `pages` pages off the top of the never-allocated heap. A segment of
    /// [`COLOUR_MIN_PAGES`] or more is carved with one free page above it,
    /// left among the free ranges (a small segment may take it): without
    /// it, segments of equal sizes start at addresses equal modulo a large
    /// power of two, and a kernel reading one array while writing another
    /// (a Jacobi sweep) sees its streams evict each other from the same
    /// cache sets (measured: 2048² Jacobi sweeps 15-20% slower).
    fn carve(&mut self, pages: usize) -> Option<usize> {
        let gap = usize::from(pages >= COLOUR_MIN_PAGES);
        [pages + gap, pages].into_iter().find_map(|span| {
            let first = self
                .heap_low
                .checked_sub(span)
                .filter(|f| *f >= self.heap_start)?;
            if self
                .raw_chunks
                .range(first / RAW_CHUNK..=(self.heap_low - 1) / RAW_CHUNK)
                .next()
                .is_some()
            {
                return None;
            }
            if span > pages {
                self.free_ranges.insert(first + pages, span - pages);
            }
            self.heap_low = first;
            Some(first)
        })
    }

    /// Forgets `segment` (freed), if it is the one known at its place.
    pub fn forget(&mut self, segment: &SegmentInfo) {
        let first = segment.first_page as usize;
        if self
            .segments
            .get(&first)
            .is_some_and(|s| s.id == segment.id)
        {
            self.segments.remove(&first);
        }
    }

    /// Reference rank: the segment at `first` is being freed: lookups of
    /// its pages find nothing from now on (an access is an error), and its
    /// range is not handed out until `reclaim`.
    pub fn retire(&mut self, first: usize) {
        self.segments.remove(&first);
    }

    /// Reference rank: every rank forgot freed `segment`: its range may be
    /// handed out again, merged with the free ranges beside it; a free
    /// range at the bottom of the allocated heap goes back to it.
    pub fn reclaim(&mut self, segment: SegmentInfo) {
        let mut start = segment.first_page as usize;
        let mut len = segment.pages as usize;
        if let Some(next_len) = self.free_ranges.remove(&(start + len)) {
            len += next_len;
        }
        if let Some((&prev, &prev_len)) = self.free_ranges.range(..start).next_back() {
            if prev + prev_len == start {
                self.free_ranges.remove(&prev);
                start = prev;
                len += prev_len;
            }
        }
        if start == self.heap_low {
            self.heap_low += len;
        } else {
            self.free_ranges.insert(start, len);
        }
    }

    /// Reference rank: the segment holding `page`, or else the raw chunk
    /// around it (which from now on is never allocated).
    pub fn lookup(&mut self, page: usize) -> Option<SegmentInfo> {
        if let Some(found) = self.find(page) {
            return Some(*found);
        }
        if !self.in_heap(page) || page >= self.heap_low {
            return None;
        }
        let chunk = page / RAW_CHUNK;
        let first = (chunk * RAW_CHUNK).max(self.heap_start);
        let end = ((chunk + 1) * RAW_CHUNK).min(self.heap_low);
        self.raw_chunks.insert(chunk);
        let info = SegmentInfo {
            id: 0,
            first_page: first as u64,
            pages: (end - first) as u64,
            kind: KIND_RAW,
            rank: 0,
            // Raw chunks follow the job's protocol, whatever this says.
            release: false,
        };
        self.insert(info);
        Some(info)
    }

    /// Free heap pages left (reference rank).
    #[cfg(test)]
    pub fn free_pages(&self) -> usize {
        self.heap_low - self.heap_start + self.free_ranges.values().sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference rank's two steps of a free, once every rank forgot it.
    fn free(r: &mut Registry, segment: SegmentInfo) {
        r.retire(segment.first_page as usize);
        r.reclaim(segment);
    }

    #[test]
    fn top_down_allocation_and_lookup() {
        let mut r = Registry::new(100);
        let a = r.allocate(10, 0, 0).unwrap();
        let b = r.allocate(5, 1, 2).unwrap();
        assert_eq!((a.first_page, b.first_page), (90, 85));
        assert_eq!(r.find(92).map(|s| s.id), Some(a.id));
        assert_eq!(r.find(85).map(|s| s.id), Some(b.id));
        assert_eq!(r.find(84), None);
        assert!(
            r.allocate(36, 0, 0).is_none(),
            "only 35 heap pages are left"
        );
        assert!(r.allocate(0, 0, 0).is_none());
        assert_eq!(r.free_pages(), 35);
        assert!(r.in_heap(50) && !r.in_heap(49));
    }

    #[test]
    fn raw_use_of_heap_pages_blocks_allocation_there() {
        let mut r = Registry::new(1000); // heap: pages 500..1000
        let raw = r.lookup(600).unwrap();
        assert_eq!((raw.kind, raw.first_page, raw.pages), (KIND_RAW, 576, 64));
        assert_eq!(r.lookup(601), Some(raw));
        assert!(r.lookup(10).is_none(), "the lower half needs no lookup");
        assert!(r.allocate(300, 0, 0).is_some(), "pages 700..1000 are free");
        assert!(
            r.allocate(100, 0, 0).is_none(),
            "pages 600..700 overlap the raw chunk"
        );
        assert_eq!(
            r.allocate(59, 0, 0).map(|s| s.first_page),
            Some(640),
            "pages 640..699 are free (699 is the gap above the 300), the gap this one would want is not"
        );
    }

    #[test]
    fn large_segments_are_carved_a_page_apart_and_the_page_is_reused() {
        let mut r = Registry::new(2000); // heap: pages 1000..2000
        let a = r.allocate(256, 1, 0).unwrap();
        let b = r.allocate(256, 1, 1).unwrap();
        assert_eq!((a.first_page, b.first_page), (1743, 1486));
        assert_eq!(r.free_pages(), 488, "the two gaps are free pages");
        let small = r.allocate(1, 0, 0).unwrap();
        assert_eq!(small.first_page, 1742, "a one-page segment fills a gap");
        for freed in [a, b, small] {
            free(&mut r, freed);
        }
        assert_eq!(r.free_pages(), 1000, "gaps merge back with their segments");
        assert_eq!(
            r.allocate(1000, 0, 0).map(|s| s.first_page),
            Some(1000),
            "a segment as large as the heap still fits (no gap then)"
        );
    }

    #[test]
    fn freed_ranges_are_handed_out_again_and_merge() {
        let mut r = Registry::new(200); // heap: pages 100..200
        let a = r.allocate(10, 0, 0).unwrap(); // 190..200
        let b = r.allocate(20, 0, 0).unwrap(); // 170..190
        let c = r.allocate(10, 0, 0).unwrap(); // 160..170
        assert_eq!(r.free_pages(), 60);
        r.retire(b.first_page as usize);
        assert_eq!(r.find(175), None, "a retired segment is not found");
        assert_eq!(r.lookup(175), None, "nor made a raw chunk");
        assert_eq!(r.free_pages(), 60, "nor handed out before reclaim");
        r.reclaim(b);
        assert_eq!(r.free_pages(), 80);
        let d = r.allocate(5, 0, 0).unwrap();
        assert_eq!(d.first_page, 185, "the top of the freed range");
        assert_eq!(r.free_pages(), 75);
        free(&mut r, a);
        r.forget(&d);
        free(&mut r, d); // 170..200 free again, in one range
        assert_eq!(r.allocate(30, 0, 0).unwrap().first_page, 170);
        free(&mut r, c); // at the bottom: back to the never-allocated heap
        assert_eq!(r.free_pages(), 70);
        assert_eq!(r.allocate(70, 0, 0).unwrap().first_page, 100);
    }
}
