//! DSM messages between ranks, carried as transport payloads.
//!
//! Fixed little-endian layouts (first byte = message kind). The decoder
//! checks every length and never panics: a malformed message is an error
//! naming what was wrong.

use std::sync::Arc;

use crate::config::{PAGE_SIZE, PAGE_WORDS};
use crate::Rank;

const REQUEST: u8 = 1;
const GRANT: u8 = 2;
const GRANT_ZERO: u8 = 3;
const BARRIER_ENTER: u8 = 4;
const BARRIER_RELEASE: u8 = 5;
const READ_REQ: u8 = 6;
const WRITE_REQ: u8 = 7;
const INVALIDATE: u8 = 8;
const INVALIDATE_ACK: u8 = 9;
const RECALL: u8 = 10;
/// Grants of the multi-reader protocol: access (read/write) x payload.
const GRANT_READ: u8 = 11;
const GRANT_READ_ZERO: u8 = 12;
const GRANT_WRITE: u8 = 13;
const GRANT_WRITE_ZERO: u8 = 14;
const GRANT_UPGRADE: u8 = 15;
const WRITE_BACK: u8 = 16;
const DENIED: u8 = 17;
const LOCK_ACQUIRE: u8 = 20;
const LOCK_GRANT: u8 = 21;
const LOCK_RELEASE: u8 = 22;
const ALLOC_REQ: u8 = 23;
const ALLOC_REPLY: u8 = 24;
const LOOKUP: u8 = 25;
const LOOKUP_REPLY: u8 = 26;
/// Several messages to one rank in one transport message (see [`batch_parts`]).
pub const BATCH: u8 = 27;
/// Read grants of consecutive pages from one home, their bytes back to back
/// (see [`read_grant_run`]).
const GRANT_READ_RUN: u8 = 28;
/// Never on the wire: what a receive thread hands on in place of a run of
/// read grants whose bytes it received straight into their pages' frames
/// (see [`placed_read_run`]).
const PLACED_READ_RUN: u8 = 29;
/// Multi-reader eviction: a reader dropped its copy / an owner gave its
/// writable copy back (with the bytes), to make room in its cache.
const EVICTED: u8 = 30;
const EVICTED_WRITE_BACK: u8 = 31;
const COALLOC_REQ: u8 = 32;
const FREE_STEP: u8 = 33;
const FIND_SEGMENT: u8 = 34;
const FOUND_SEGMENT: u8 = 35;
/// Release consistency: a writer's changed words of a page, and the home's
/// acknowledgement (see [`crate::coherence::release`]).
const DIFF: u8 = 36;
const DIFF_ACK: u8 = 37;
const COPY_REQ: u8 = 38;
const SHARE_FRAMES: u8 = 39;
/// Bytes of a run of read grants before its pages.
pub const READ_GRANT_RUN_HEAD: usize = 9;
/// Largest batch a sender builds (bytes); bigger sets go as several batches.
pub const BATCH_MAX_BYTES: usize = 256 << 10;

/// A segment as the registry describes it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SegmentInfo {
    /// Id given by the reference rank, from 1 up; 0 for a raw chunk.
    pub id: u32,
    /// Index of its first page in the shared space.
    pub first_page: u64,
    /// Number of pages it spans.
    pub pages: u64,
    /// 0 distributed, 1 localized, 2 replicated, 3 private, 4 file, 5 raw
    /// chunk.
    pub kind: u8,
    /// The localized rank, or the creator (replicated, file); 0 otherwise.
    pub rank: u32,
    /// Its pages are release-consistent (`coherence::release`) rather than
    /// sequentially consistent.
    pub release: bool,
}

/// Set in the kind of an allocation request for a release-consistent
/// segment (the registry keeps it as [`SegmentInfo::release`]).
pub const KIND_RELEASE: u8 = 0x80;

impl SegmentInfo {
    const LEN: usize = 4 + 8 + 8 + 1 + 4 + 1;

    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.first_page.to_le_bytes());
        out.extend_from_slice(&self.pages.to_le_bytes());
        out.push(self.kind);
        out.extend_from_slice(&self.rank.to_le_bytes());
        out.push(u8::from(self.release));
    }

    fn get(b: &[u8]) -> SegmentInfo {
        SegmentInfo {
            id: u32_at(b, 0),
            first_page: u64_at(b, 4),
            pages: u64_at(b, 12),
            kind: b[20],
            rank: u32_at(b, 21),
            release: b[25] != 0,
        }
    }
}

/// The steps of the collective free of a segment ([`Msg::Free`]), in
/// order: each rank sends every rank the first, each home sends every rank
/// the second, each rank sends rank 0 the third.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FreeStep {
    /// The sender gave up its copies of the segment's pages (after their
    /// eviction notices, which therefore reach each home first).
    Released,
    /// The sender, having heard `Released` from every rank, reset the
    /// pages it is home of (after every command it sent about them).
    Reset,
    /// The sender heard `Reset` from every rank and forgot the segment:
    /// once every rank has, rank 0 may hand its range out again.
    Forgotten,
}

impl FreeStep {
    fn code(self) -> u8 {
        match self {
            FreeStep::Released => 1,
            FreeStep::Reset => 2,
            FreeStep::Forgotten => 3,
        }
    }

    fn from_code(code: u8) -> Option<FreeStep> {
        match code {
            1 => Some(FreeStep::Released),
            2 => Some(FreeStep::Reset),
            3 => Some(FreeStep::Forgotten),
            _ => None,
        }
    }
}

/// What a multi-reader grant carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The page's bytes.
    Data(PageData),
    /// All zeros (never written anywhere).
    Zero,
    /// No bytes: the requester already holds a valid read-only copy.
    Upgrade,
}

/// A DSM message: [`Msg::header`] and [`Msg::page_data`] (or
/// [`Msg::encode`]) give its wire bytes, [`Msg::decode`] reads them back.
/// Page numbers are indices in the shared space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// `requester` wants page `page` (Migratory: ownership moves to it).
    /// Sent to the probable owner, forwarded along the hints.
    PageRequest {
        /// The page wanted.
        page: u64,
        /// The rank that faulted (kept when the request is forwarded).
        requester: u32,
        /// Write access wanted; the migratory protocol always sets it (the
        /// page moves either way).
        write: bool,
    },
    /// Migratory, owner -> requester: the page and its ownership.
    PageGrant {
        /// The page granted.
        page: u64,
        /// Its bytes; `None` means all zeros (never written).
        data: Option<PageData>,
    },
    /// Any rank -> rank 0: this rank reached barrier `epoch`.
    BarrierEnter {
        /// The barrier's number: every rank counts its barriers from 1.
        epoch: u64,
        /// Release consistency: the diffs of the pages this rank wrote
        /// since its last barrier entry (its copies and its master copies),
        /// one per page, in page order.
        updates: PageDiffs,
        /// Release consistency: the pages whose diffs this rank's lock
        /// releases sent to their homes since its last barrier entry.
        lock_written: Vec<u64>,
    },
    /// Rank 0 -> every rank (itself too): all ranks reached barrier `epoch`.
    BarrierRelease {
        /// The barrier's number, as in its `BarrierEnter`.
        epoch: u64,
        /// Release consistency: for every page some entry wrote, in page
        /// order, its entries' diffs merged into one (the home's first,
        /// then the other writers' by rank); to the page's home, without
        /// its own (its master may hold later words, from unlocks).
        updates: PageDiffs,
        /// Release consistency: every entry's `lock_written`, in order,
        /// each page once: the copies of them go (their homes have the
        /// words).
        lock_written: Vec<u64>,
    },
    /// Multi-reader protocol, requester -> home: a read-only copy of `page`.
    ReadReq {
        /// The page wanted.
        page: u64,
    },
    /// Multi-reader, requester -> home: a writable copy of `page` (an
    /// upgrade if the requester holds a read-only copy).
    WriteReq {
        /// The page wanted.
        page: u64,
    },
    /// Home -> sharer: drop your read-only copy and acknowledge.
    Invalidate {
        /// The page to drop.
        page: u64,
    },
    /// Sharer -> home, answering `Invalidate`: the read-only copy is gone.
    InvalidateAck {
        /// The page invalidated.
        page: u64,
    },
    /// Home -> exclusive owner: send the page back; keep a read-only copy if `keep_shared`.
    Recall {
        /// The page recalled.
        page: u64,
        /// Keep a read-only copy (for a reader, or a seal or flush);
        /// otherwise drop it (for a writer).
        keep_shared: bool,
    },
    /// Owner -> home, answering a recall.
    WriteBack {
        /// The page written back.
        page: u64,
        /// Its latest bytes.
        data: PageData,
    },
    /// Reader -> home: this rank dropped its read-only copy to make room
    /// in its cache (`DSM_CACHE_SIZE`); it is no longer a sharer.
    Evicted {
        /// The page dropped.
        page: u64,
    },
    /// Owner -> home, unasked: this rank gave up its writable copy to make
    /// room in its cache; the bytes are the page's latest, and no copy is
    /// left here. Also answers a recall that crossed it.
    EvictedWriteBack {
        /// The page given back.
        page: u64,
        /// Its latest bytes.
        data: PageData,
    },
    /// Home -> requester, answering `ReadReq` or `WriteReq`.
    Grant {
        /// The page granted.
        page: u64,
        /// A writable (exclusive) copy if true, else a read-only one.
        write: bool,
        /// The page's contents; `Payload::Upgrade` only with `write`.
        payload: Payload,
    },
    /// Home -> requester: no writes to this page (a sealed segment).
    Denied {
        /// The page whose write request is refused.
        page: u64,
    },
    /// Locks, held at the lock's home rank; `ticket` tells apart the
    /// requests of one process. Requester -> home: take `lock`.
    LockAcquire {
        /// The lock's id (its home is rank `lock mod N`).
        lock: u64,
        /// The requesting process's number for this request.
        ticket: u64,
    },
    /// Home -> requester: `lock` is now held by the request `ticket`.
    LockGrant {
        /// The lock's id.
        lock: u64,
        /// The ticket of the request granted.
        ticket: u64,
        /// The most barriers a releaser of a lock homed here had passed:
        /// the requester takes the lock once every diff of those barriers
        /// reached it, and asks homes for copies as if it had passed them
        /// (barrier diffs are not acknowledged, so a write released by a
        /// barrier, then ordered by a lock, may still be on its way).
        barriers: u64,
    },
    /// Holder -> home: `lock` is free again; the next in line gets it.
    LockRelease {
        /// The lock's id.
        lock: u64,
        /// The ticket it was granted under.
        ticket: u64,
        /// Barriers the releasing rank passed.
        barriers: u64,
    },
    /// Segment registry at the reference rank (0). Any rank -> rank 0:
    /// carve a segment off the heap.
    AllocReq {
        /// The asking process's number for this request, echoed in the reply.
        ticket: u64,
        /// Size of the segment, in pages.
        pages: u64,
        /// Placement code, as [`SegmentInfo::kind`].
        kind: u8,
        /// Placement's rank, as [`SegmentInfo::rank`].
        rank: u32,
    },
    /// Any rank -> rank 0: this rank's part of collective allocation
    /// number `epoch` (every rank calls it, in the same order, with the
    /// same arguments); rank 0 allocates once all ranks have asked and
    /// answers each with `AllocReply`.
    CoAllocReq {
        /// The asking process's number for this request, echoed in the reply.
        ticket: u64,
        /// The collective allocation's number, counted by each rank.
        epoch: u64,
        /// Size of the segment, in pages.
        pages: u64,
        /// Placement code, as [`SegmentInfo::kind`].
        kind: u8,
        /// Placement's rank, as [`SegmentInfo::rank`].
        rank: u32,
    },
    /// Rank 0 -> requester, answering `AllocReq` or `CoAllocReq`.
    AllocReply {
        /// The request's ticket.
        ticket: u64,
        /// The new segment; `None` if it could not be allocated (heap full).
        segment: Option<SegmentInfo>,
    },
    /// Any rank -> rank 0: which segment holds heap page `page`? Sent on a
    /// first fault or message about a page of a segment this rank does not
    /// know yet.
    Lookup {
        /// The page looked up.
        page: u64,
    },
    /// Rank 0 -> requester, answering `Lookup`.
    LookupReply {
        /// The page looked up.
        page: u64,
        /// The segment holding it, or the raw chunk around it; `None` if
        /// the page is not in the heap (an access to unallocated memory).
        segment: Option<SegmentInfo>,
    },
    /// Any rank -> rank 0: which segment holds heap page `page`? Unlike
    /// `Lookup`, a page outside every segment is not made raw: the answer
    /// is then `None`.
    FindSegment {
        /// The page looked up.
        page: u64,
    },
    /// Rank 0 -> requester, answering `FindSegment`.
    FoundSegment {
        /// The page looked up.
        page: u64,
        /// The segment holding it, if any.
        segment: Option<SegmentInfo>,
    },
    /// A step of the collective free of `segment`, this rank's free number
    /// `epoch` (every rank frees the same segments in the same order).
    Free {
        /// Which step.
        step: FreeStep,
        /// The free's number, counted by each rank.
        epoch: u64,
        /// The segment being freed.
        segment: SegmentInfo,
    },
    /// Release consistency, writer -> home: the words of `page` the writer
    /// changed since it took its twin, for the home to write into its copy.
    Diff {
        /// The page.
        page: u64,
        /// The changed words.
        runs: DiffRuns,
    },
    /// Release consistency, rank -> home: a copy of `page`, for a rank that
    /// passed `barriers` barriers: answered (`Grant`, read) once every diff
    /// of those barriers reached the home.
    CopyReq {
        /// The page wanted.
        page: u64,
        /// Barriers the requester passed.
        barriers: u64,
    },
    /// A home -> a co-located rank (one that shares memory with it): its
    /// board of readable pages and its space's memfd, to open through
    /// `/proc` for direct reads ([`crate::board`]).
    ShareFrames(crate::board::Offer),
    /// Release consistency, home -> writer: the diff of `page` is applied.
    DiffAck {
        /// The page.
        page: u64,
    },
}

/// Pages and the words of each that changed, as barrier messages carry
/// them ([`Msg::BarrierEnter`], [`Msg::BarrierRelease`]).
pub type PageDiffs = Vec<(u64, DiffRuns)>;

/// The words of a page a writer changed ([`Msg::Diff`]): runs of
/// consecutive words, in increasing order, none empty, none overlapping.
/// Kept flat (one list of run heads, one of words) so that a diff of many
/// scattered words costs two allocations, not one per run (ranks writing
/// interleaved slots make a run of every word they wrote).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct DiffRuns {
    /// Each run's first word and length in words.
    heads: Vec<(u16, u16)>,
    /// The runs' new values, run after run, little-endian as in memory.
    words: Vec<u64>,
}

impl DiffRuns {
    /// No word changed.
    pub fn new() -> DiffRuns {
        DiffRuns::default()
    }

    /// Adds word `index` of the page, changed to `value`: it extends the
    /// last run when it follows it. Words are added in increasing order.
    pub fn push(&mut self, index: usize, value: u64) {
        match self.heads.last_mut() {
            Some((first, len)) if *first as usize + *len as usize == index => *len += 1,
            _ => self.heads.push((index as u16, 1)),
        }
        self.words.push(value);
    }

    /// True when no word changed.
    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// Words changed.
    pub fn words(&self) -> usize {
        self.words.len()
    }

    /// Each run as its first word's index and its values, in order.
    pub fn runs(&self) -> impl Iterator<Item = (usize, &[u64])> {
        let mut rest = &self.words[..];
        self.heads.iter().map(move |&(first, len)| {
            let (run, tail) = rest.split_at((len as usize).min(rest.len()));
            rest = tail;
            (first as usize, run)
        })
    }

    /// Bytes the runs take on the wire after the page number.
    fn wire_len(&self) -> usize {
        2 + 4 * self.heads.len() + 8 * self.words.len()
    }

    /// On the wire: the run count, then each run's first word, word count
    /// and words.
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.heads.len() as u16).to_le_bytes());
        for (first, words) in self.runs() {
            out.extend_from_slice(&(first as u16).to_le_bytes());
            out.extend_from_slice(&(words.len() as u16).to_le_bytes());
            for word in words {
                out.extend_from_slice(&word.to_le_bytes());
            }
        }
    }

    /// The runs [`DiffRuns::put`] wrote at `at` in a message of `kind`, and
    /// where they end; runs in order, inside the page, none empty.
    fn read(bytes: &[u8], at: usize, kind: u8) -> Result<(DiffRuns, usize), ProtoError> {
        let bad = |what: &'static str| ProtoError::BadField { kind, what };
        let count = bytes.get(at..at + 2).ok_or(bad("diff run count"))?;
        let count = u16::from_le_bytes([count[0], count[1]]) as usize;
        let mut at = at + 2;
        // At most a page of words, and no more than the bytes left hold.
        let words = (bytes.len().saturating_sub(at) / 8).min(PAGE_WORDS);
        let mut runs = DiffRuns {
            heads: Vec::with_capacity(count.min(PAGE_WORDS)),
            words: Vec::with_capacity(words),
        };
        let mut next_free = 0usize;
        for _ in 0..count {
            let head = bytes.get(at..at + 4).ok_or(bad("diff run header"))?;
            let first = u16::from_le_bytes([head[0], head[1]]) as usize;
            let len = u16::from_le_bytes([head[2], head[3]]) as usize;
            if len == 0 || first < next_free || first + len > PAGE_WORDS {
                return Err(bad("diff run (empty, out of order or beyond the page)"));
            }
            at += 4;
            let body = bytes.get(at..at + 8 * len).ok_or(bad("diff run words"))?;
            runs.words.extend(
                body.chunks_exact(8)
                    .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])),
            );
            runs.heads.push((first as u16, len as u16));
            at += 8 * len;
            next_free = first + len;
        }
        Ok((runs, at))
    }
}

/// Why bytes received are not a well-formed DSM message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// No bytes at all.
    #[error("empty DSM message")]
    Empty,
    /// The first byte is no message kind [`Msg::decode`] knows.
    #[error("unknown DSM message kind {0}")]
    UnknownKind(u8),
    /// The length does not fit the kind's fixed layout.
    #[error("DSM message kind {kind} has {len} bytes, expected {expected}")]
    BadLength {
        /// The message kind (first byte).
        kind: u8,
        /// Bytes received.
        len: usize,
        /// Bytes the layout needs (at least that many, for a reply shorter
        /// than its fixed part).
        expected: usize,
    },
    /// A batch [`batch_parts`] refuses; says what is wrong.
    #[error("malformed batch: {0}")]
    BadBatch(&'static str),
    /// A run of read grants [`read_grant_run`] refuses (or one given to
    /// [`Msg::decode`]); says what is wrong.
    #[error("malformed run of read grants: {0}")]
    BadRun(&'static str),
    /// A field holds a value its kind does not define.
    #[error("DSM message kind {kind} has an invalid {what}")]
    BadField {
        /// The message kind (first byte).
        kind: u8,
        /// The field, as a phrase ("free step").
        what: &'static str,
    },
}

/// A batch on the wire: the kind byte [`BATCH`], then for every message its
/// length (4 bytes, little-endian) and its bytes. The messages are handled
/// in order, exactly as if they had arrived one by one.
///
/// The wire pieces of a batch of `messages` (each given as its parts), in
/// order, for `Transport::send_parts`; `lengths` holds the length prefixes
/// the pieces borrow.
pub fn batch_pieces<'a>(messages: &[&[&'a [u8]]], lengths: &'a mut Vec<[u8; 4]>) -> Vec<&'a [u8]> {
    lengths.clear();
    lengths.extend(messages.iter().map(|parts| {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        (len as u32).to_le_bytes()
    }));
    let lengths: &'a [[u8; 4]] = lengths;
    let mut pieces: Vec<&'a [u8]> = Vec::with_capacity(1 + messages.len() * 3);
    pieces.push(&[BATCH]);
    for (parts, len) in messages.iter().zip(lengths) {
        pieces.push(len);
        pieces.extend_from_slice(parts);
    }
    pieces
}

/// A page's bytes, shared with no copy between the home's copy, the
/// messages that carry it and the outbox.
pub type PageData = Arc<[u8; PAGE_SIZE]>;

/// A page holding `bytes` (at most a page), zeros after them. A whole page
/// is copied into its new buffer once, with no zeroing first.
pub fn page_from(bytes: &[u8]) -> PageData {
    if let Ok(page) = PageData::try_from(Arc::<[u8]>::from(bytes)) {
        return page;
    }
    let mut page = Arc::new([0u8; PAGE_SIZE]);
    Arc::make_mut(&mut page)[..bytes.len()].copy_from_slice(bytes);
    page
}

/// The page of a multi-reader read request, read without decoding the
/// message (a batch's requests are looked at before they are handled).
pub fn read_request_page(bytes: &[u8]) -> Option<u64> {
    match bytes {
        [READ_REQ, page @ ..] => Some(u64::from_le_bytes(page.try_into().ok()?)),
        _ => None,
    }
}

/// Header of a run of read grants for the pages from `first`, whose bytes
/// follow it back to back (one piece per page): to the receiver, the grants
/// of those pages in order, but mapped straight from the received bytes
/// with one `UFFDIO_COPY` (no copy per page).
pub fn read_grant_run_header(first: usize) -> [u8; 9] {
    let mut out = [GRANT_READ_RUN; 9];
    out[1..].copy_from_slice(&(first as u64).to_le_bytes());
    out
}

/// A run of read grants: its first page and the bytes of its pages (a
/// whole number of pages, at least one); `None` for any other message.
pub fn read_grant_run(bytes: &[u8]) -> Result<Option<(usize, &[u8])>, ProtoError> {
    let [GRANT_READ_RUN, rest @ ..] = bytes else {
        return Ok(None);
    };
    let Some((first, pages)) = rest.split_first_chunk::<8>() else {
        return Err(ProtoError::BadRun("truncated header"));
    };
    if pages.is_empty() || pages.len() % PAGE_SIZE != 0 {
        return Err(ProtoError::BadRun("not a whole number of pages"));
    }
    let first = usize::try_from(u64::from_le_bytes(*first))
        .ok()
        .filter(|first| first.checked_add(pages.len() / PAGE_SIZE).is_some())
        .ok_or(ProtoError::BadRun(
            "pages past the end of the address space",
        ))?;
    Ok(Some((first, pages)))
}

/// A lone read grant carrying its page (`Msg::Grant` with `write: false`
/// and the page's bytes): its page and the bytes, without decoding them
/// into a page buffer; `None` for any other message.
pub fn read_grant(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let [GRANT_READ, rest @ ..] = bytes else {
        return None;
    };
    let (page, data) = rest.split_first_chunk::<8>()?;
    let page = usize::try_from(u64::from_le_bytes(*page)).ok()?;
    (data.len() == PAGE_SIZE).then_some((page, data))
}

/// From the first [`READ_GRANT_RUN_HEAD`] bytes of a `len`-byte message
/// (all a receive thread has read of it yet): the first page and the
/// number of pages of a run of read grants; `None` for any other message,
/// or a run that [`read_grant_run`] would refuse.
pub fn read_grant_run_head(head: &[u8], len: usize) -> Option<(usize, usize)> {
    let [GRANT_READ_RUN, first @ ..] = head else {
        return None;
    };
    let first = u64::from_le_bytes(first.try_into().ok()?);
    let bytes = len.checked_sub(READ_GRANT_RUN_HEAD)?;
    if bytes == 0 || bytes % PAGE_SIZE != 0 {
        return None;
    }
    let first = usize::try_from(first).ok()?;
    let count = bytes / PAGE_SIZE;
    first.checked_add(count)?;
    Some((first, count))
}

/// The message standing for a run of read grants whose bytes are already
/// in the pages' frames: only `token`, which names the landing to the
/// engine that made it (and which no other process knows).
pub fn placed_read_run_notice(token: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    out.push(PLACED_READ_RUN);
    out.extend_from_slice(&token.to_le_bytes());
    out
}

/// The token of a [`placed_read_run_notice`]; `None` for any other
/// message.
pub fn placed_read_run(bytes: &[u8]) -> Option<u64> {
    let [PLACED_READ_RUN, token @ ..] = bytes else {
        return None;
    };
    Some(u64::from_le_bytes(token.try_into().ok()?))
}

/// The messages of a batch, in order. A batch inside a batch, an empty
/// batch or a length running past the end is an error.
pub fn batch_parts(bytes: &[u8]) -> Result<Vec<&[u8]>, ProtoError> {
    if bytes.first() != Some(&BATCH) {
        return Err(ProtoError::BadBatch("not a batch"));
    }
    let mut rest = &bytes[1..];
    let mut parts = Vec::new();
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(ProtoError::BadBatch("truncated length"));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len == 0 || len > tail.len() {
            return Err(ProtoError::BadBatch("a message length runs past the end"));
        }
        let (part, tail) = tail.split_at(len);
        if part[0] == BATCH {
            return Err(ProtoError::BadBatch("a batch inside a batch"));
        }
        parts.push(part);
        rest = tail;
    }
    if parts.is_empty() {
        return Err(ProtoError::BadBatch("no messages"));
    }
    Ok(parts)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

impl Msg {
    /// A migratory `PageRequest` by `requester` for `page`.
    pub fn request(page: usize, requester: Rank, write: bool) -> Msg {
        Msg::PageRequest {
            page: page as u64,
            requester: requester as u32,
            write,
        }
    }

    /// Header of a grant whose page bytes (if `with_data`) follow as a second part.
    pub fn grant_header(page: usize, with_data: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(9);
        out.push(if with_data { GRANT } else { GRANT_ZERO });
        out.extend_from_slice(&(page as u64).to_le_bytes());
        out
    }

    /// The message's fixed header; a grant's page bytes follow it as a second
    /// part (so the page is never copied into a message buffer).
    pub fn header(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        match self {
            Msg::PageRequest {
                page,
                requester,
                write,
            } => {
                out.push(REQUEST);
                out.extend_from_slice(&page.to_le_bytes());
                out.extend_from_slice(&requester.to_le_bytes());
                out.push(*write as u8);
            }
            Msg::PageGrant { page, data } => {
                return Msg::grant_header(*page as usize, data.is_some())
            }
            Msg::BarrierEnter {
                epoch,
                updates,
                lock_written,
            } => put_barrier(&mut out, BARRIER_ENTER, *epoch, updates, lock_written),
            Msg::BarrierRelease {
                epoch,
                updates,
                lock_written,
            } => put_barrier(&mut out, BARRIER_RELEASE, *epoch, updates, lock_written),
            Msg::CopyReq { page, barriers } => {
                Msg::page_only(&mut out, COPY_REQ, *page);
                out.extend_from_slice(&barriers.to_le_bytes());
            }
            Msg::ShareFrames(offer) => {
                out.push(SHARE_FRAMES);
                out.extend_from_slice(&offer.pid.to_le_bytes());
                out.extend_from_slice(&offer.space_fd.to_le_bytes());
                out.extend_from_slice(&offer.space_inode.to_le_bytes());
                out.extend_from_slice(&offer.board_fd.to_le_bytes());
                out.extend_from_slice(&offer.nonce.to_le_bytes());
                out.extend_from_slice(&offer.pages.to_le_bytes());
                out.push(offer.bit);
                out.extend_from_slice(&offer.faults_fd.to_le_bytes());
                out.extend_from_slice(&offer.base.to_le_bytes());
            }
            Msg::ReadReq { page } => Msg::page_only(&mut out, READ_REQ, *page),
            Msg::WriteReq { page } => Msg::page_only(&mut out, WRITE_REQ, *page),
            Msg::Invalidate { page } => Msg::page_only(&mut out, INVALIDATE, *page),
            Msg::InvalidateAck { page } => Msg::page_only(&mut out, INVALIDATE_ACK, *page),
            Msg::Recall { page, keep_shared } => {
                Msg::page_only(&mut out, RECALL, *page);
                out.push(*keep_shared as u8);
            }
            Msg::WriteBack { page, .. } => Msg::page_only(&mut out, WRITE_BACK, *page),
            Msg::Evicted { page } => Msg::page_only(&mut out, EVICTED, *page),
            Msg::EvictedWriteBack { page, .. } => {
                Msg::page_only(&mut out, EVICTED_WRITE_BACK, *page)
            }
            Msg::Denied { page } => Msg::page_only(&mut out, DENIED, *page),
            Msg::LockAcquire { lock, ticket } => {
                out.push(LOCK_ACQUIRE);
                out.extend_from_slice(&lock.to_le_bytes());
                out.extend_from_slice(&ticket.to_le_bytes());
            }
            Msg::LockGrant {
                lock,
                ticket,
                barriers,
            }
            | Msg::LockRelease {
                lock,
                ticket,
                barriers,
            } => {
                out.reserve(25);
                out.push(match self {
                    Msg::LockGrant { .. } => LOCK_GRANT,
                    _ => LOCK_RELEASE,
                });
                out.extend_from_slice(&lock.to_le_bytes());
                out.extend_from_slice(&ticket.to_le_bytes());
                out.extend_from_slice(&barriers.to_le_bytes());
            }
            Msg::AllocReq {
                ticket,
                pages,
                kind,
                rank,
            } => {
                out.push(ALLOC_REQ);
                out.extend_from_slice(&ticket.to_le_bytes());
                out.extend_from_slice(&pages.to_le_bytes());
                out.push(*kind);
                out.extend_from_slice(&rank.to_le_bytes());
            }
            Msg::CoAllocReq {
                ticket,
                epoch,
                pages,
                kind,
                rank,
            } => {
                out.push(COALLOC_REQ);
                out.extend_from_slice(&ticket.to_le_bytes());
                out.extend_from_slice(&epoch.to_le_bytes());
                out.extend_from_slice(&pages.to_le_bytes());
                out.push(*kind);
                out.extend_from_slice(&rank.to_le_bytes());
            }
            Msg::AllocReply {
                ticket: key,
                segment,
            }
            | Msg::LookupReply { page: key, segment }
            | Msg::FoundSegment { page: key, segment } => {
                out.push(match self {
                    Msg::AllocReply { .. } => ALLOC_REPLY,
                    Msg::LookupReply { .. } => LOOKUP_REPLY,
                    _ => FOUND_SEGMENT,
                });
                out.extend_from_slice(&key.to_le_bytes());
                match segment {
                    Some(seg) => {
                        out.push(1);
                        seg.put(&mut out);
                    }
                    None => out.push(0),
                }
            }
            Msg::Lookup { page } => Msg::page_only(&mut out, LOOKUP, *page),
            Msg::FindSegment { page } => Msg::page_only(&mut out, FIND_SEGMENT, *page),
            Msg::DiffAck { page } => Msg::page_only(&mut out, DIFF_ACK, *page),
            Msg::Diff { page, runs } => {
                out.reserve(9 + runs.wire_len());
                Msg::page_only(&mut out, DIFF, *page);
                runs.put(&mut out);
            }
            Msg::Free {
                step,
                epoch,
                segment,
            } => {
                out.push(FREE_STEP);
                out.push(step.code());
                out.extend_from_slice(&epoch.to_le_bytes());
                segment.put(&mut out);
            }
            Msg::Grant {
                page,
                write,
                payload,
            } => {
                let kind = match (write, payload) {
                    (false, Payload::Data(_)) => GRANT_READ,
                    (false, _) => GRANT_READ_ZERO,
                    (true, Payload::Data(_)) => GRANT_WRITE,
                    (true, Payload::Zero) => GRANT_WRITE_ZERO,
                    (true, Payload::Upgrade) => GRANT_UPGRADE,
                };
                Msg::page_only(&mut out, kind, *page)
            }
        }
        out
    }

    fn page_only(out: &mut Vec<u8>, kind: u8, page: u64) {
        out.push(kind);
        out.extend_from_slice(&page.to_le_bytes());
    }

    /// Header of a multi-reader grant whose page bytes follow as a second part.
    pub fn grant_data_header(page: usize, write: bool) -> Vec<u8> {
        Msg::grant_data_header_bytes(page, write).to_vec()
    }

    /// [`Msg::grant_data_header`] in an array (no allocation).
    pub fn grant_data_header_bytes(page: usize, write: bool) -> [u8; 9] {
        let mut out = [if write { GRANT_WRITE } else { GRANT_READ }; 9];
        out[1..].copy_from_slice(&(page as u64).to_le_bytes());
        out
    }

    /// Header of a write-back whose page bytes follow as a second part.
    pub fn write_back_header(page: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(9);
        Msg::page_only(&mut out, WRITE_BACK, page as u64);
        out
    }

    /// Header of an eviction's write-back whose page bytes follow as a
    /// second part.
    pub fn evicted_write_back_header(page: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(9);
        Msg::page_only(&mut out, EVICTED_WRITE_BACK, page as u64);
        out
    }

    /// The page bytes that follow the header on the wire, if any.
    pub fn page_data(&self) -> Option<&PageData> {
        match self {
            Msg::PageGrant { data: Some(d), .. } => Some(d),
            Msg::WriteBack { data, .. } | Msg::EvictedWriteBack { data, .. } => Some(data),
            Msg::Grant {
                payload: Payload::Data(d),
                ..
            } => Some(d),
            _ => None,
        }
    }

    /// Header and page bytes concatenated: the whole message as sent.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.header();
        if let Some(d) = self.page_data() {
            out.extend_from_slice(&d[..]);
        }
        out
    }

    /// Decodes one whole message (header and any page bytes), copying the
    /// page it carries into a new buffer. Batches ([`batch_parts`]), runs of
    /// read grants ([`read_grant_run`]) and placed-run notices
    /// ([`placed_read_run`]) are errors here.
    pub fn decode(bytes: &[u8]) -> Result<Msg, ProtoError> {
        Msg::decode_with(bytes, &mut page_from)
    }

    /// [`Msg::decode`], with the page a message carries (exactly a page of
    /// bytes) made by `make_page`: the engine fills a spare buffer instead
    /// of allocating one.
    pub fn decode_with(
        bytes: &[u8],
        make_page: &mut dyn FnMut(&[u8]) -> PageData,
    ) -> Result<Msg, ProtoError> {
        let kind = *bytes.first().ok_or(ProtoError::Empty)?;
        let expect = |expected: usize| {
            if bytes.len() == expected {
                Ok(())
            } else {
                Err(ProtoError::BadLength {
                    kind,
                    len: bytes.len(),
                    expected,
                })
            }
        };
        match kind {
            REQUEST => {
                expect(14)?;
                Ok(Msg::PageRequest {
                    page: u64_at(bytes, 1),
                    requester: u32_at(bytes, 9),
                    write: bytes[13] != 0,
                })
            }
            GRANT => {
                expect(9 + PAGE_SIZE)?;
                let data = make_page(&bytes[9..]);
                Ok(Msg::PageGrant {
                    page: u64_at(bytes, 1),
                    data: Some(data),
                })
            }
            GRANT_ZERO => {
                expect(9)?;
                Ok(Msg::PageGrant {
                    page: u64_at(bytes, 1),
                    data: None,
                })
            }
            BARRIER_ENTER => {
                let (epoch, updates, lock_written) = decode_barrier(bytes)?;
                Ok(Msg::BarrierEnter {
                    epoch,
                    updates,
                    lock_written,
                })
            }
            BARRIER_RELEASE => {
                let (epoch, updates, lock_written) = decode_barrier(bytes)?;
                Ok(Msg::BarrierRelease {
                    epoch,
                    updates,
                    lock_written,
                })
            }
            SHARE_FRAMES => {
                expect(50)?;
                Ok(Msg::ShareFrames(crate::board::Offer {
                    pid: u32_at(bytes, 1),
                    space_fd: u32_at(bytes, 5) as i32,
                    space_inode: u64_at(bytes, 9),
                    board_fd: u32_at(bytes, 17) as i32,
                    nonce: u64_at(bytes, 21),
                    pages: u64_at(bytes, 29),
                    bit: bytes[37],
                    faults_fd: u32_at(bytes, 38) as i32,
                    base: u64_at(bytes, 42),
                }))
            }
            COPY_REQ => {
                expect(17)?;
                Ok(Msg::CopyReq {
                    page: u64_at(bytes, 1),
                    barriers: u64_at(bytes, 9),
                })
            }
            READ_REQ | WRITE_REQ | INVALIDATE | INVALIDATE_ACK | EVICTED => {
                expect(9)?;
                let page = u64_at(bytes, 1);
                Ok(match kind {
                    READ_REQ => Msg::ReadReq { page },
                    WRITE_REQ => Msg::WriteReq { page },
                    INVALIDATE => Msg::Invalidate { page },
                    EVICTED => Msg::Evicted { page },
                    _ => Msg::InvalidateAck { page },
                })
            }
            RECALL => {
                expect(10)?;
                Ok(Msg::Recall {
                    page: u64_at(bytes, 1),
                    keep_shared: bytes[9] != 0,
                })
            }
            WRITE_BACK | EVICTED_WRITE_BACK | GRANT_READ | GRANT_WRITE => {
                expect(9 + PAGE_SIZE)?;
                let page = u64_at(bytes, 1);
                let data = make_page(&bytes[9..]);
                Ok(match kind {
                    WRITE_BACK => Msg::WriteBack { page, data },
                    EVICTED_WRITE_BACK => Msg::EvictedWriteBack { page, data },
                    _ => Msg::Grant {
                        page,
                        write: kind == GRANT_WRITE,
                        payload: Payload::Data(data),
                    },
                })
            }
            GRANT_READ_ZERO | GRANT_WRITE_ZERO | GRANT_UPGRADE => {
                expect(9)?;
                Ok(Msg::Grant {
                    page: u64_at(bytes, 1),
                    write: kind != GRANT_READ_ZERO,
                    payload: if kind == GRANT_UPGRADE {
                        Payload::Upgrade
                    } else {
                        Payload::Zero
                    },
                })
            }
            DENIED | LOOKUP | FIND_SEGMENT => {
                expect(9)?;
                let page = u64_at(bytes, 1);
                Ok(match kind {
                    DENIED => Msg::Denied { page },
                    LOOKUP => Msg::Lookup { page },
                    _ => Msg::FindSegment { page },
                })
            }
            LOCK_ACQUIRE => {
                expect(17)?;
                Ok(Msg::LockAcquire {
                    lock: u64_at(bytes, 1),
                    ticket: u64_at(bytes, 9),
                })
            }
            LOCK_GRANT | LOCK_RELEASE => {
                expect(25)?;
                let (lock, ticket, barriers) =
                    (u64_at(bytes, 1), u64_at(bytes, 9), u64_at(bytes, 17));
                Ok(if kind == LOCK_GRANT {
                    Msg::LockGrant {
                        lock,
                        ticket,
                        barriers,
                    }
                } else {
                    Msg::LockRelease {
                        lock,
                        ticket,
                        barriers,
                    }
                })
            }
            ALLOC_REQ => {
                expect(22)?;
                Ok(Msg::AllocReq {
                    ticket: u64_at(bytes, 1),
                    pages: u64_at(bytes, 9),
                    kind: bytes[17],
                    rank: u32_at(bytes, 18),
                })
            }
            COALLOC_REQ => {
                expect(30)?;
                Ok(Msg::CoAllocReq {
                    ticket: u64_at(bytes, 1),
                    epoch: u64_at(bytes, 9),
                    pages: u64_at(bytes, 17),
                    kind: bytes[25],
                    rank: u32_at(bytes, 26),
                })
            }
            ALLOC_REPLY | LOOKUP_REPLY | FOUND_SEGMENT => {
                if bytes.len() < 10 {
                    return Err(ProtoError::BadLength {
                        kind,
                        len: bytes.len(),
                        expected: 10,
                    });
                }
                let key = u64_at(bytes, 1);
                let segment = match bytes[9] {
                    0 => {
                        expect(10)?;
                        None
                    }
                    _ => {
                        expect(10 + SegmentInfo::LEN)?;
                        Some(SegmentInfo::get(&bytes[10..]))
                    }
                };
                Ok(match kind {
                    ALLOC_REPLY => Msg::AllocReply {
                        ticket: key,
                        segment,
                    },
                    LOOKUP_REPLY => Msg::LookupReply { page: key, segment },
                    _ => Msg::FoundSegment { page: key, segment },
                })
            }
            FREE_STEP => {
                expect(10 + SegmentInfo::LEN)?;
                let step = FreeStep::from_code(bytes[1]).ok_or(ProtoError::BadField {
                    kind,
                    what: "free step",
                })?;
                Ok(Msg::Free {
                    step,
                    epoch: u64_at(bytes, 2),
                    segment: SegmentInfo::get(&bytes[10..]),
                })
            }
            DIFF_ACK => {
                expect(9)?;
                Ok(Msg::DiffAck {
                    page: u64_at(bytes, 1),
                })
            }
            DIFF => decode_diff(bytes),
            GRANT_READ_RUN => Err(ProtoError::BadRun(
                "a run of read grants is read with read_grant_run, not decoded",
            )),
            other => Err(ProtoError::UnknownKind(other)),
        }
    }
}

/// A [`Msg::Diff`]: page, then its runs ([`DiffRuns::put`]).
fn decode_diff(bytes: &[u8]) -> Result<Msg, ProtoError> {
    if bytes.len() < 11 {
        return Err(ProtoError::BadLength {
            kind: DIFF,
            len: bytes.len(),
            expected: 11,
        });
    }
    let (runs, at) = DiffRuns::read(bytes, 9, DIFF)?;
    if at != bytes.len() {
        return Err(ProtoError::BadLength {
            kind: DIFF,
            len: bytes.len(),
            expected: at,
        });
    }
    Ok(Msg::Diff {
        page: u64_at(bytes, 1),
        runs,
    })
}

/// A barrier message: kind, epoch, diff count, then each diff's page and
/// runs, then the count of pages written under locks and each page.
fn put_barrier(out: &mut Vec<u8>, kind: u8, epoch: u64, updates: &PageDiffs, locked: &[u64]) {
    let diffs: usize = updates.iter().map(|(_, r)| 8 + r.wire_len()).sum();
    out.reserve(17 + diffs + 8 * locked.len());
    out.push(kind);
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&(updates.len() as u32).to_le_bytes());
    for (page, runs) in updates {
        out.extend_from_slice(&page.to_le_bytes());
        runs.put(out);
    }
    out.extend_from_slice(&(locked.len() as u32).to_le_bytes());
    for page in locked {
        out.extend_from_slice(&page.to_le_bytes());
    }
}

/// The fields of a barrier message ([`put_barrier`]).
fn decode_barrier(bytes: &[u8]) -> Result<(u64, PageDiffs, Vec<u64>), ProtoError> {
    let kind = bytes.first().copied().unwrap_or(0);
    if bytes.len() < 13 {
        return Err(ProtoError::BadLength {
            kind,
            len: bytes.len(),
            expected: 13,
        });
    }
    let count = u32_at(bytes, 9) as usize;
    let mut at = 13;
    // Each diff takes at least 10 bytes: no allocation beyond the message.
    let mut updates = Vec::with_capacity(count.min(bytes.len() / 10));
    for _ in 0..count {
        let page =
            bytes
                .get(at..at + 8)
                .map(|_| u64_at(bytes, at))
                .ok_or(ProtoError::BadField {
                    kind,
                    what: "page of a barrier's diff",
                })?;
        let (runs, next) = DiffRuns::read(bytes, at + 8, kind)?;
        updates.push((page, runs));
        at = next;
    }
    let count = bytes.get(at..at + 4).ok_or(ProtoError::BadField {
        kind,
        what: "count of pages written under locks",
    })?;
    let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
    let expected = (at + 4).saturating_add(count.saturating_mul(8));
    if bytes.len() != expected {
        return Err(ProtoError::BadLength {
            kind,
            len: bytes.len(),
            expected,
        });
    }
    let locked = bytes[at + 4..]
        .chunks_exact(8)
        .map(|p| u64_at(p, 0))
        .collect();
    Ok((u64_at(bytes, 1), updates, locked))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(msg: Msg) {
        let bytes = msg.encode();
        assert_eq!(Msg::decode(&bytes).unwrap(), msg);
        // Every truncation is an error, never a panic.
        for cut in 0..bytes.len() {
            assert!(Msg::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn messages_round_trip() {
        round_trip(Msg::request(7, 3, true));
        round_trip(Msg::PageGrant {
            page: 9,
            data: None,
        });
        let mut page = Arc::new([0u8; PAGE_SIZE]);
        Arc::make_mut(&mut page)[4095] = 42;
        round_trip(Msg::PageGrant {
            page: 9,
            data: Some(page),
        });
        round_trip(Msg::BarrierEnter {
            epoch: 5,
            updates: Vec::new(),
            lock_written: Vec::new(),
        });
        let mut runs = DiffRuns::new();
        for (i, v) in [(0, 1), (2, 2), (511, u64::MAX)] {
            runs.push(i, v);
        }
        round_trip(Msg::BarrierEnter {
            epoch: 5,
            updates: vec![(1, runs.clone()), (7, DiffRuns::new())],
            lock_written: vec![3],
        });
        round_trip(Msg::BarrierRelease {
            epoch: 6,
            updates: vec![(1, runs.clone()), (1, runs), (9, DiffRuns::new())],
            lock_written: vec![2, u64::MAX],
        });
        round_trip(Msg::CopyReq {
            page: 3,
            barriers: 9,
        });
        round_trip(Msg::ShareFrames(crate::board::Offer {
            pid: 41,
            space_fd: 7,
            space_inode: u64::MAX - 3,
            board_fd: -1,
            nonce: 0x0123_4567_89ab_cdef,
            pages: 1 << 28,
            bit: 23,
            faults_fd: 12,
            base: 0x4000_0000,
        }));
        let page = Arc::new([7u8; PAGE_SIZE]);
        for m in [
            Msg::ReadReq { page: 1 },
            Msg::WriteReq { page: 2 },
            Msg::Invalidate { page: 3 },
            Msg::InvalidateAck { page: 4 },
            Msg::Recall {
                page: 5,
                keep_shared: true,
            },
            Msg::WriteBack {
                page: 6,
                data: page.clone(),
            },
            Msg::Evicted { page: 6 },
            Msg::EvictedWriteBack {
                page: 6,
                data: page.clone(),
            },
            Msg::Grant {
                page: 7,
                write: false,
                payload: Payload::Data(page.clone()),
            },
            Msg::Grant {
                page: 7,
                write: false,
                payload: Payload::Zero,
            },
            Msg::Grant {
                page: 7,
                write: true,
                payload: Payload::Data(page),
            },
            Msg::Grant {
                page: 7,
                write: true,
                payload: Payload::Zero,
            },
            Msg::Grant {
                page: 7,
                write: true,
                payload: Payload::Upgrade,
            },
            Msg::Denied { page: 8 },
            Msg::LockAcquire { lock: 1, ticket: 2 },
            Msg::LockGrant {
                lock: 3,
                ticket: 4,
                barriers: 7,
            },
            Msg::LockRelease {
                lock: 5,
                ticket: 6,
                barriers: 8,
            },
            Msg::AllocReq {
                ticket: 1,
                pages: 10,
                kind: 1,
                rank: 3,
            },
            Msg::CoAllocReq {
                ticket: 4,
                epoch: 2,
                pages: 10,
                kind: 0,
                rank: 0,
            },
            Msg::AllocReply {
                ticket: 1,
                segment: None,
            },
            Msg::AllocReply {
                ticket: 2,
                segment: Some(SegmentInfo {
                    id: 3,
                    first_page: 50,
                    pages: 4,
                    kind: 2,
                    rank: 1,
                    release: false,
                }),
            },
            Msg::Lookup { page: 9 },
            Msg::FindSegment { page: 10 },
            Msg::DiffAck { page: 12 },
            Msg::Diff {
                page: 13,
                runs: {
                    let mut runs = DiffRuns::new();
                    for (i, v) in [(0, 1), (1, 2), (511, u64::MAX)] {
                        runs.push(i, v);
                    }
                    runs
                },
            },
            Msg::Diff {
                page: 13,
                runs: DiffRuns::new(),
            },
            Msg::FoundSegment {
                page: 10,
                segment: None,
            },
            Msg::Free {
                step: FreeStep::Reset,
                epoch: 3,
                segment: SegmentInfo {
                    id: 2,
                    first_page: 40,
                    pages: 8,
                    kind: 1,
                    rank: 1,
                    release: true,
                },
            },
            Msg::LookupReply {
                page: 9,
                segment: Some(SegmentInfo {
                    id: 1,
                    first_page: 9,
                    pages: 1,
                    kind: 4,
                    rank: 0,
                    release: false,
                }),
            },
            Msg::LookupReply {
                page: 9,
                segment: None,
            },
        ] {
            round_trip(m);
        }
        assert_eq!(Msg::decode(&[99]), Err(ProtoError::UnknownKind(99)));
    }

    #[test]
    fn batches_split_into_their_messages_in_order() {
        let page = [5u8; PAGE_SIZE];
        let read = Msg::ReadReq { page: 3 }.header();
        let grant = Msg::grant_data_header(4, false);
        let mut lengths = Vec::new();
        let pieces = batch_pieces(&[&[&read], &[&grant, &page]], &mut lengths);
        let wire: Vec<u8> = pieces.concat();
        let parts = batch_parts(&wire).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(Msg::decode(parts[0]).unwrap(), Msg::ReadReq { page: 3 });
        assert_eq!(
            Msg::decode(parts[1]).unwrap(),
            Msg::Grant {
                page: 4,
                write: false,
                payload: Payload::Data(Arc::new(page)),
            }
        );
        for cut in 1..wire.len() {
            let _ = batch_parts(&wire[..cut]);
        }
        assert!(batch_parts(&[BATCH]).is_err(), "empty");
        assert!(batch_parts(&[BATCH, 0, 0, 0, 0]).is_err(), "zero length");
        assert!(
            batch_parts(&[BATCH, 5, 0, 0, 0, BATCH, 1, 0, 0, 0]).is_err(),
            "nested"
        );
        assert!(
            batch_parts(&[BATCH, 9, 0, 0, 0, 1]).is_err(),
            "past the end"
        );
    }

    #[test]
    fn a_run_of_read_grants_is_its_first_page_and_whole_pages() {
        let pages = [[1u8; PAGE_SIZE], [2u8; PAGE_SIZE]].concat();
        let wire = [&read_grant_run_header(40)[..], &pages].concat();
        assert_eq!(read_grant_run(&wire), Ok(Some((40, &pages[..]))));
        assert_eq!(read_grant_run(&Msg::ReadReq { page: 1 }.header()), Ok(None));
        assert!(Msg::decode(&wire).is_err(), "not a single message");
        for cut in [1, 9, 10, 9 + PAGE_SIZE + 1] {
            assert!(read_grant_run(&wire[..cut]).is_err(), "cut at {cut}");
        }
        let far = [&read_grant_run_header(usize::MAX)[..], &pages].concat();
        assert!(read_grant_run(&far).is_err(), "pages past usize::MAX");
    }

    #[test]
    fn a_run_is_recognised_from_its_head_as_read_grant_run_reads_it() {
        let pages = [[1u8; PAGE_SIZE], [2u8; PAGE_SIZE]].concat();
        let wire = [&read_grant_run_header(40)[..], &pages].concat();
        let head = &wire[..READ_GRANT_RUN_HEAD];
        assert_eq!(read_grant_run_head(head, wire.len()), Some((40, 2)));
        for len in [READ_GRANT_RUN_HEAD, READ_GRANT_RUN_HEAD + PAGE_SIZE - 1, 3] {
            assert_eq!(read_grant_run_head(head, len), None, "length {len}");
        }
        let far = read_grant_run_header(usize::MAX);
        assert_eq!(read_grant_run_head(&far, wire.len()), None);
        let other = Msg::ReadReq { page: 1 }.header();
        assert_eq!(read_grant_run_head(&other, wire.len()), None);
    }

    #[test]
    fn a_placed_run_notice_carries_its_token_and_is_no_wire_message() {
        let notice = placed_read_run_notice(0x0123_4567_89ab_cdef);
        assert_eq!(placed_read_run(&notice), Some(0x0123_4567_89ab_cdef));
        assert_eq!(placed_read_run(&notice[..8]), None);
        assert_eq!(placed_read_run(&read_grant_run_header(7)), None);
        assert!(Msg::decode(&notice).is_err());
    }
}
