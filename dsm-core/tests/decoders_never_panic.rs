//! The decoders of everything a peer can send never panic: arbitrary bytes,
//! and truncations and mutations of valid frames, give an error or a value.
//! Bounded case counts keep this a few seconds in `cargo test`.

// A test reports failure by panicking: unwrap is its assertion.
#![allow(clippy::unwrap_used)]

use std::io::{self, Read, Write};

use dsm_core::auth::{self, JobSecret};
use dsm_core::proto::{self, DiffRuns, Msg, PageDiffs, Payload, SegmentInfo};
use dsm_core::wire::{self, WireError};
use dsm_core::PAGE_SIZE;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A stream whose reads come from `input` (in chunks of `chunk` bytes, as a
/// socket may deliver them) and whose writes are discarded.
struct Scripted<'a> {
    input: &'a [u8],
    chunk: usize,
    written: usize,
}

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk.max(1)).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Scripted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    wire::write_frame(&mut out, kind, payload).expect("a Vec accepts writes");
    out
}

fn arb_segment() -> impl Strategy<Value = Option<SegmentInfo>> {
    proptest::option::of(
        (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u8>(),
            any::<u32>(),
            any::<bool>(),
        )
            .prop_map(|(id, first_page, pages, kind, rank, release)| SegmentInfo {
                id,
                first_page,
                pages,
                kind,
                rank,
                release,
            }),
    )
}

fn page(fill: u8) -> std::sync::Arc<[u8; PAGE_SIZE]> {
    std::sync::Arc::new([fill; PAGE_SIZE])
}

/// The words of a page changed: up to 8, at distinct indices.
fn arb_runs() -> impl Strategy<Value = DiffRuns> {
    proptest::collection::btree_map(0usize..512, any::<u64>(), 0..8).prop_map(|words| {
        let mut runs = DiffRuns::new();
        for (index, value) in words {
            runs.push(index, value);
        }
        runs
    })
}

/// A barrier message's diffs: up to 4 pages.
fn arb_page_diffs() -> impl Strategy<Value = PageDiffs> {
    proptest::collection::vec((any::<u64>(), arb_runs()), 0..4)
}

/// Valid messages of every kind.
fn arb_msg() -> impl Strategy<Value = Msg> {
    let p = any::<u64>();
    prop_oneof![
        (p, any::<u32>(), any::<bool>()).prop_map(|(page, requester, write)| {
            Msg::PageRequest {
                page,
                requester,
                write,
            }
        }),
        (p, proptest::option::of(any::<u8>())).prop_map(|(pg, fill)| Msg::PageGrant {
            page: pg,
            data: fill.map(page),
        }),
        (p, arb_page_diffs(), proptest::collection::vec(p, 0..3)).prop_map(
            |(epoch, updates, lock_written)| Msg::BarrierEnter {
                epoch,
                updates,
                lock_written
            }
        ),
        (p, arb_page_diffs(), proptest::collection::vec(p, 0..3)).prop_map(
            |(epoch, updates, lock_written)| Msg::BarrierRelease {
                epoch,
                updates,
                lock_written
            }
        ),
        (p, arb_runs()).prop_map(|(page, runs)| Msg::Diff { page, runs }),
        p.prop_map(|page| Msg::ReadReq { page }),
        (p, any::<u64>()).prop_map(|(page, barriers)| Msg::CopyReq { page, barriers }),
        p.prop_map(|page| Msg::WriteReq { page }),
        p.prop_map(|page| Msg::Invalidate { page }),
        p.prop_map(|page| Msg::InvalidateAck { page }),
        (p, any::<bool>()).prop_map(|(page, keep_shared)| Msg::Recall { page, keep_shared }),
        (p, any::<u8>()).prop_map(|(pg, fill)| Msg::WriteBack {
            page: pg,
            data: page(fill)
        }),
        (p, any::<bool>(), 0u8..3, any::<u8>()).prop_map(|(pg, write, which, fill)| {
            Msg::Grant {
                page: pg,
                write,
                payload: match which {
                    0 => Payload::Data(page(fill)),
                    // An upgrade only ever grants a write.
                    2 if write => Payload::Upgrade,
                    _ => Payload::Zero,
                },
            }
        }),
        p.prop_map(|page| Msg::Denied { page }),
        (p, any::<u64>()).prop_map(|(lock, ticket)| Msg::LockAcquire { lock, ticket }),
        (p, any::<u64>(), any::<u64>()).prop_map(|(lock, ticket, barriers)| Msg::LockGrant {
            lock,
            ticket,
            barriers
        }),
        (p, any::<u64>(), any::<u64>()).prop_map(|(lock, ticket, barriers)| {
            Msg::LockRelease {
                lock,
                ticket,
                barriers,
            }
        }),
        (p, any::<u64>(), any::<u8>(), any::<u32>()).prop_map(|(ticket, pages, kind, rank)| {
            Msg::AllocReq {
                ticket,
                pages,
                kind,
                rank,
            }
        }),
        (p, arb_segment()).prop_map(|(ticket, segment)| Msg::AllocReply { ticket, segment }),
        p.prop_map(|page| Msg::Lookup { page }),
        (p, arb_segment()).prop_map(|(page, segment)| Msg::LookupReply { page, segment }),
    ]
}

/// Applies byte edits (position modulo the length, xor value) to `bytes`.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)]) -> Vec<u8> {
    if bytes.is_empty() {
        return bytes;
    }
    for &(at, x) in edits {
        let i = at % bytes.len();
        bytes[i] ^= x;
    }
    bytes
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn read_frame_survives_arbitrary_bytes(
        input in proptest::collection::vec(any::<u8>(), 0..64),
        max in any::<u32>(),
        chunk in 1usize..16,
    ) {
        // The bound keeps the allocation small whatever the header claims.
        let max = max % 4096;
        let mut s = Scripted { input: &input, chunk, written: 0 };
        let _ = wire::read_frame(&mut s, max);
    }

    #[test]
    fn read_frame_checks_magic_version_and_length_first(
        header in proptest::array::uniform8(any::<u8>()),
    ) {
        // A header claiming up to 4 GiB with a 1 KiB bound: refused before
        // allocating, or read as a truncated frame when it is small.
        match wire::read_frame(&mut &header[..], 1024) {
            Err(WireError::BadMagic(_)) | Err(WireError::BadVersion(_))
            | Err(WireError::TooLong { .. }) | Err(WireError::Truncated) => {}
            Ok((_, payload)) => prop_assert!(payload.is_empty()),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn truncated_and_mutated_frames_are_errors_or_frames(
        kind in any::<u8>(),
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        cut in any::<usize>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    ) {
        let bytes = frame(kind, &payload);
        let cut = cut % (bytes.len() + 1);
        let truncated = &bytes[..cut];
        let r = wire::read_frame(&mut &truncated[..], 1024);
        if cut == 0 {
            prop_assert!(matches!(r, Err(WireError::Closed)));
        } else if cut < bytes.len() {
            prop_assert!(matches!(r, Err(WireError::Truncated)), "{r:?}");
        }
        let mutated = mutate(bytes, &edits);
        let _ = wire::read_frame(&mut &mutated[..], 1024);
    }

    #[test]
    fn msg_decode_survives_arbitrary_bytes(
        first in any::<u8>(),
        rest in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        // Lead with a byte so every message kind is reached often.
        let mut bytes = vec![first % 32];
        bytes.extend(rest);
        let _ = Msg::decode(&bytes);
        let _ = Msg::decode(&bytes[1..]);
        let _ = proto::batch_parts(&bytes);
        let _ = proto::read_grant_run(&bytes);
    }

    #[test]
    fn read_grant_run_survives_any_first_page_and_length(
        first in any::<u64>(),
        len in 0usize..3 * PAGE_SIZE + 2,
    ) {
        let mut bytes = proto::read_grant_run_header(0).to_vec();
        bytes[1..9].copy_from_slice(&first.to_le_bytes());
        bytes.resize(9 + len, 7);
        if let Ok(Some((from, pages))) = proto::read_grant_run(&bytes) {
            prop_assert_eq!(from as u64, first);
            prop_assert!(!pages.is_empty() && pages.len() % PAGE_SIZE == 0);
            prop_assert!(from.checked_add(pages.len() / PAGE_SIZE).is_some());
        }
    }

    #[test]
    fn batch_split_of_valid_truncated_and_mutated_batches(
        msgs in proptest::collection::vec(arb_msg(), 1..5),
        cut in any::<usize>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let encoded: Vec<Vec<u8>> = msgs.iter().map(Msg::encode).collect();
        let as_parts: Vec<[&[u8]; 1]> = encoded.iter().map(|e| [&e[..]]).collect();
        let refs: Vec<&[&[u8]]> = as_parts.iter().map(|p| &p[..]).collect();
        let mut lengths = Vec::new();
        let bytes: Vec<u8> = proto::batch_pieces(&refs, &mut lengths).concat();
        let parts = proto::batch_parts(&bytes).expect("a valid batch splits");
        let decoded: Vec<Msg> = parts.iter().map(|p| Msg::decode(p).expect("decodes")).collect();
        prop_assert_eq!(decoded, msgs);
        let cut = cut % bytes.len();
        let _ = proto::batch_parts(&bytes[..cut]);
        let _ = proto::batch_parts(&mutate(bytes, &edits));
    }

    #[test]
    fn msg_decode_of_valid_truncated_and_mutated_messages(
        msg in arb_msg(),
        cut in any::<usize>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let bytes = msg.encode();
        prop_assert_eq!(Msg::decode(&bytes).ok(), Some(msg));
        let cut = cut % bytes.len();
        prop_assert!(Msg::decode(&bytes[..cut]).is_err());
        let _ = Msg::decode(&mutate(bytes.clone(), &edits));
        let mut longer = bytes;
        longer.push(0);
        let _ = Msg::decode(&longer);
    }

    #[test]
    fn auth_accept_survives_arbitrary_streams(
        input in proptest::collection::vec(any::<u8>(), 0..200),
        chunk in 1usize..64,
    ) {
        let secret = JobSecret::from_bytes([7; 32]);
        let mut s = Scripted { input: &input, chunk, written: 0 };
        prop_assert!(auth::accept(&mut s, &secret).is_err());
    }

    #[test]
    fn auth_accept_refuses_well_framed_garbage(
        hello in proptest::collection::vec(any::<u8>(), 0..600),
        proof in proptest::collection::vec(any::<u8>(), 0..64),
        kinds in (any::<u8>(), any::<u8>()),
        cut in any::<usize>(),
    ) {
        // Frames with valid headers (sometimes the right kinds) but no
        // knowledge of the secret: never accepted, never a panic.
        let secret = JobSecret::from_bytes([9; 32]);
        let (k1, k2) = if kinds.0 % 2 == 0 { (0xA1, 0xA3) } else { kinds };
        let mut input = frame(k1, &hello);
        input.extend(frame(k2, &proof));
        let cut = cut % (input.len() + 1);
        let mut s = Scripted { input: &input[..cut], chunk: 4096, written: 0 };
        prop_assert!(auth::accept(&mut s, &secret).is_err());
    }

    #[test]
    fn auth_connect_survives_arbitrary_answers(
        input in proptest::collection::vec(any::<u8>(), 0..200),
        framed in any::<bool>(),
    ) {
        let secret = JobSecret::from_bytes([3; 32]);
        let input = if framed { frame(0xA2, &input) } else { input };
        let mut s = Scripted { input: &input, chunk: 4096, written: 0 };
        prop_assert!(auth::connect(&mut s, &secret, b"rank 1").is_err());
    }
}

/// A replayed handshake: a recording of a successful exchange, played back
/// to a fresh acceptor, is refused (the acceptor's nonce is new).
#[test]
fn replayed_handshake_is_refused() {
    use std::os::unix::net::UnixStream;
    let secret = JobSecret::generate().expect("random secret");
    let (mut client, mut server) = UnixStream::pair().expect("socket pair");
    let s2 = secret.clone();
    let acceptor = std::thread::spawn(move || auth::accept(&mut server, &s2));
    // Record what the connector sends.
    struct Recorder<'a> {
        inner: &'a mut UnixStream,
        sent: Vec<u8>,
    }
    impl Read for Recorder<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read(buf)
        }
    }
    impl Write for Recorder<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(buf);
            self.inner.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }
    let mut rec = Recorder {
        inner: &mut client,
        sent: Vec::new(),
    };
    auth::connect(&mut rec, &secret, b"rank 1").expect("genuine handshake");
    let recording = rec.sent;
    assert_eq!(
        acceptor.join().expect("acceptor thread").expect("accepted"),
        b"rank 1"
    );
    let mut replay = Scripted {
        input: &recording,
        chunk: 4096,
        written: 0,
    };
    assert!(matches!(
        auth::accept(&mut replay, &secret),
        Err(auth::AuthError::BadProof)
    ));
}
