//! DSM messages between ranks, carried as transport payloads.
//!
//! Fixed little-endian layouts (first byte = message kind). The decoder
//! checks every length and never panics: a malformed message is an error
//! naming what was wrong.

use crate::config::PAGE_SIZE;
use crate::Rank;

const REQUEST: u8 = 1;
const GRANT: u8 = 2;
const GRANT_ZERO: u8 = 3;
const BARRIER_ENTER: u8 = 4;
const BARRIER_RELEASE: u8 = 5;

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
        data: Option<Box<[u8; PAGE_SIZE]>>,
    },
    BarrierEnter {
        epoch: u64,
    },
    BarrierRelease {
        epoch: u64,
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
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Msg, ProtoError> {
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
                let mut data = Box::new([0u8; PAGE_SIZE]);
                data.copy_from_slice(&bytes[9..]);
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
            other => Err(ProtoError::UnknownKind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(msg: Msg) {
        let mut bytes = msg.header();
        if let Msg::PageGrant { data: Some(d), .. } = &msg {
            bytes.extend_from_slice(&d[..]);
        }
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
        let mut page = Box::new([0u8; PAGE_SIZE]);
        page[4095] = 42;
        round_trip(Msg::PageGrant {
            page: 9,
            data: Some(page),
        });
        round_trip(Msg::BarrierEnter { epoch: 5 });
        round_trip(Msg::BarrierRelease { epoch: 6 });
        assert_eq!(Msg::decode(&[99]), Err(ProtoError::UnknownKind(99)));
    }
}
