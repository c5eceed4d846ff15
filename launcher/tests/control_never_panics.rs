//! The control channel's decoder (`control::recv`) never panics: arbitrary
//! bytes, arbitrary JSON in valid frames, and truncations and mutations of
//! genuine messages give an error or a message.

// A test reports failure by panicking: unwrap is its assertion.
#![allow(clippy::unwrap_used)]

use std::io::BufWriter;
use std::net::{SocketAddr, TcpListener, TcpStream};

use dsm_core::wire;
use dsm_launcher::control::{self, ControlError, ExecToWrap, ExitCause, WrapToExec};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 1500,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    wire::write_frame(&mut out, kind, payload).expect("a Vec accepts writes");
    out
}

const KIND_CONTROL: u8 = 0x10;

fn decode_both(bytes: &[u8]) {
    let _ = control::recv::<WrapToExec>(&mut &bytes[..]);
    let _ = control::recv::<ExecToWrap>(&mut &bytes[..]);
}

fn samples() -> Vec<Vec<u8>> {
    let addr: SocketAddr = "10.1.2.3:4567".parse().expect("address");
    let wrap = [
        WrapToExec::Hello {
            slot: 3,
            hostname: "node\u{e9}".into(),
            listen: addr,
        },
        WrapToExec::ProgramError {
            slot: 1,
            hostname: "h".into(),
            message: "no such file".into(),
        },
        WrapToExec::Started { pid: 42 },
        WrapToExec::Exited {
            status: ExitCause::Signal(9),
            likely_cause: Some("out of memory".into()),
        },
    ];
    let exec = [
        ExecToWrap::Launch {
            rank: 1,
            size: 2,
            peers: vec![addr, addr],
            hosts: vec!["a".into(), "b".into()],
            env: vec![("DSM_LOG".into(), "warn".into())],
            job_id: "job".into(),
        },
        ExecToWrap::Signal { signo: 15 },
        ExecToWrap::Stop { grace_ms: 3000 },
    ];
    let mut out: Vec<Vec<u8>> = wrap
        .iter()
        .map(|m| frame(KIND_CONTROL, &serde_json::to_vec(m).expect("json")))
        .collect();
    out.extend(
        exec.iter()
            .map(|m| frame(KIND_CONTROL, &serde_json::to_vec(m).expect("json"))),
    );
    out
}

/// The genuine messages decode as themselves, through a real socket.
#[test]
fn genuine_messages_round_trip() {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
    let addr = listener.local_addr().expect("address");
    let client = TcpStream::connect(addr).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    let mut writer = BufWriter::new(client);
    let msg = WrapToExec::Started { pid: 7 };
    control::send(&mut writer, &msg).expect("send");
    assert_eq!(control::recv::<WrapToExec>(&mut server).expect("recv"), msg);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..128)) {
        decode_both(&input);
    }

    #[test]
    fn arbitrary_payloads_in_valid_frames(
        payload in proptest::collection::vec(any::<u8>(), 0..256),
        kind in any::<u8>(),
    ) {
        let bytes = frame(if kind % 2 == 0 { KIND_CONTROL } else { kind }, &payload);
        decode_both(&bytes);
    }

    #[test]
    fn json_shaped_garbage(text in "[{}\\[\\]\":,0-9a-zA-Z_ -]{0,120}") {
        decode_both(&frame(KIND_CONTROL, text.as_bytes()));
    }

    #[test]
    fn truncated_and_mutated_messages(
        which in any::<prop::sample::Index>(),
        cut in any::<usize>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let all = samples();
        let bytes = which.get(&all).clone();
        let cut = cut % bytes.len();
        let r = control::recv::<WrapToExec>(&mut &bytes[..cut]);
        prop_assert!(matches!(r, Err(ControlError::Wire(_))), "{r:?}");
        let mut mutated = bytes;
        let len = mutated.len();
        for (at, x) in edits {
            mutated[at % len] ^= x;
        }
        decode_both(&mutated);
    }
}
