//! DSM messages between ranks, carried as transport payloads.
//!
//! Fixed little-endian layouts (first byte = message kind). The decoder
//! checks every length and never panics: a malformed message is an error
//! naming what was wrong.

use std::sync::Arc;

use crate::config::PAGE_SIZE;
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
/// Bytes of a run of read grants before its pages.
pub const READ_GRANT_RUN_HEAD: usize = 9;
/// Largest batch a sender builds (bytes); bigger sets go as several batches.
pub const BATCH_MAX_BYTES: usize = 256 << 10;

/// A segment as the registry describes it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SegmentInfo {
    pub id: u32,
    pub first_page: u64,
    pub pages: u64,
    /// 0 distributed, 1 localized, 2 replicated, 3 private, 4 file
    pub kind: u8,
    /// The localized rank, or the creator (replicated, file).
    pub rank: u32,
}

impl SegmentInfo {
    const LEN: usize = 4 + 8 + 8 + 1 + 4;

    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.first_page.to_le_bytes());
        out.extend_from_slice(&self.pages.to_le_bytes());
        out.push(self.kind);
        out.extend_from_slice(&self.rank.to_le_bytes());
    }

    fn get(b: &[u8]) -> SegmentInfo {
        SegmentInfo {
            id: u32_at(b, 0),
            first_page: u64_at(b, 4),
            pages: u64_at(b, 12),
            kind: b[20],
            rank: u32_at(b, 21),
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// `requester` wants page `page` (Migratory: ownership moves to it).
    PageRequest {
        page: u64,
        requester: u32,
        write: bool,
    },
    /// The page, for the requester; `None` means all zeros (never written).
    PageGrant {
        page: u64,
        data: Option<PageData>,
    },
    BarrierEnter {
        epoch: u64,
    },
    BarrierRelease {
        epoch: u64,
    },
    /// Multi-reader protocol, requester -> home.
    ReadReq {
        page: u64,
    },
    WriteReq {
        page: u64,
    },
    /// Home -> sharer: drop your read-only copy and acknowledge.
    Invalidate {
        page: u64,
    },
    InvalidateAck {
        page: u64,
    },
    /// Home -> exclusive owner: send the page back; keep a read-only copy if `keep_shared`.
    Recall {
        page: u64,
        keep_shared: bool,
    },
    /// Owner -> home, answering a recall.
    WriteBack {
        page: u64,
        data: PageData,
    },
    /// Reader -> home: this rank dropped its read-only copy to make room
    /// in its cache (`DSM_CACHE_SIZE`); it is no longer a sharer.
    Evicted {
        page: u64,
    },
    /// Owner -> home, unasked: this rank gave up its writable copy to make
    /// room in its cache; the bytes are the page's latest, and no copy is
    /// left here. Also answers a recall that crossed it.
    EvictedWriteBack {
        page: u64,
        data: PageData,
    },
    /// Home -> requester.
    Grant {
        page: u64,
        write: bool,
        payload: Payload,
    },
    /// Home -> requester: no writes to this page (a sealed segment).
    Denied {
        page: u64,
    },
    /// Locks, held at the lock's home rank; `ticket` tells apart the
    /// requests of one process.
    LockAcquire {
        lock: u64,
        ticket: u64,
    },
    LockGrant {
        lock: u64,
        ticket: u64,
    },
    LockRelease {
        lock: u64,
        ticket: u64,
    },
    /// Segment registry at the reference rank (0).
    AllocReq {
        ticket: u64,
        pages: u64,
        kind: u8,
        rank: u32,
    },
    AllocReply {
        ticket: u64,
        segment: Option<SegmentInfo>,
    },
    Lookup {
        page: u64,
    },
    LookupReply {
        page: u64,
        segment: Option<SegmentInfo>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("empty DSM message")]
    Empty,
    #[error("unknown DSM message kind {0}")]
    UnknownKind(u8),
    #[error("DSM message kind {kind} has {len} bytes, expected {expected}")]
    BadLength {
        kind: u8,
        len: usize,
        expected: usize,
    },
    #[error("malformed batch: {0}")]
    BadBatch(&'static str),
    #[error("malformed run of read grants: {0}")]
    BadRun(&'static str),
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
            Msg::BarrierEnter { epoch } => {
                out.push(BARRIER_ENTER);
                out.extend_from_slice(&epoch.to_le_bytes());
            }
            Msg::BarrierRelease { epoch } => {
                out.push(BARRIER_RELEASE);
                out.extend_from_slice(&epoch.to_le_bytes());
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
            Msg::LockAcquire { lock, ticket }
            | Msg::LockGrant { lock, ticket }
            | Msg::LockRelease { lock, ticket } => {
                out.push(match self {
                    Msg::LockAcquire { .. } => LOCK_ACQUIRE,
                    Msg::LockGrant { .. } => LOCK_GRANT,
                    _ => LOCK_RELEASE,
                });
                out.extend_from_slice(&lock.to_le_bytes());
                out.extend_from_slice(&ticket.to_le_bytes());
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
            Msg::AllocReply {
                ticket: key,
                segment,
            }
            | Msg::LookupReply { page: key, segment } => {
                out.push(if matches!(self, Msg::AllocReply { .. }) {
                    ALLOC_REPLY
                } else {
                    LOOKUP_REPLY
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
            BARRIER_ENTER | BARRIER_RELEASE => {
                expect(9)?;
                let epoch = u64_at(bytes, 1);
                Ok(if kind == BARRIER_ENTER {
                    Msg::BarrierEnter { epoch }
                } else {
                    Msg::BarrierRelease { epoch }
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
            DENIED | LOOKUP => {
                expect(9)?;
                let page = u64_at(bytes, 1);
                Ok(if kind == DENIED {
                    Msg::Denied { page }
                } else {
                    Msg::Lookup { page }
                })
            }
            LOCK_ACQUIRE | LOCK_GRANT | LOCK_RELEASE => {
                expect(17)?;
                let (lock, ticket) = (u64_at(bytes, 1), u64_at(bytes, 9));
                Ok(match kind {
                    LOCK_ACQUIRE => Msg::LockAcquire { lock, ticket },
                    LOCK_GRANT => Msg::LockGrant { lock, ticket },
                    _ => Msg::LockRelease { lock, ticket },
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
            ALLOC_REPLY | LOOKUP_REPLY => {
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
                Ok(if kind == ALLOC_REPLY {
                    Msg::AllocReply {
                        ticket: key,
                        segment,
                    }
                } else {
                    Msg::LookupReply { page: key, segment }
                })
            }
            GRANT_READ_RUN => Err(ProtoError::BadRun(
                "a run of read grants is read with read_grant_run, not decoded",
            )),
            other => Err(ProtoError::UnknownKind(other)),
        }
    }
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
        round_trip(Msg::BarrierEnter { epoch: 5 });
        round_trip(Msg::BarrierRelease { epoch: 6 });
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
            Msg::LockGrant { lock: 3, ticket: 4 },
            Msg::LockRelease { lock: 5, ticket: 6 },
            Msg::AllocReq {
                ticket: 1,
                pages: 10,
                kind: 1,
                rank: 3,
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
                }),
            },
            Msg::Lookup { page: 9 },
            Msg::LookupReply {
                page: 9,
                segment: Some(SegmentInfo {
                    id: 1,
                    first_page: 9,
                    pages: 1,
                    kind: 4,
                    rank: 0,
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
