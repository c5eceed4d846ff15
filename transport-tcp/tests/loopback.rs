//! The TCP transport inside one process: a whole job on loopback.

// A test reports failure by panicking: unwrap is its assertion.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use dsm_core::auth::{self, JobSecret};
use dsm_core::bootstrap::Bootstrap;
use dsm_core::transport::{Landing, PayloadPlacement, TrySent};
use dsm_core::{Transport, TransportError};
use transport_tcp::{TcpOptions, TcpTransport};

const RECV_LIMIT: Duration = Duration::from_secs(30);

fn job(size: usize) -> Vec<Arc<TcpTransport>> {
    let boots = Bootstrap::loopback_group(size).unwrap();
    connect_all(boots)
}

fn connect_all(boots: Vec<Bootstrap>) -> Vec<Arc<TcpTransport>> {
    let opts = TcpOptions {
        connect_timeout: Duration::from_secs(20),
        ..TcpOptions::default()
    };
    connect_with(boots, &opts)
}

fn connect_with(boots: Vec<Bootstrap>, opts: &TcpOptions) -> Vec<Arc<TcpTransport>> {
    let handles: Vec<_> = boots
        .into_iter()
        .map(|b| {
            let opts = opts.clone();
            thread::spawn(move || TcpTransport::connect(b, &opts).unwrap())
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn recv(t: &TcpTransport) -> dsm_core::Message {
    t.recv_timeout(RECV_LIMIT)
        .unwrap()
        .expect("no message within the time limit")
}

/// Ranks 0 and 1 on one host, 2 on another: only the pair of the same host
/// talks through shared memory, and says so (what the RDMA transport routes
/// by); messages between every pair still arrive.
#[test]
fn only_ranks_of_one_host_share_memory() {
    let hosts = ["h0", "h0", "h1"];
    let mut boots = Bootstrap::loopback_group(hosts.len()).unwrap();
    for boot in &mut boots {
        for (peer, host) in boot.peers.iter_mut().zip(hosts) {
            peer.host = host.to_string();
        }
    }
    let opts = TcpOptions {
        connect_timeout: Duration::from_secs(20),
        shared_memory: true,
        ..TcpOptions::builtin()
    };
    let ranks = connect_with(boots, &opts);
    for (me, t) in ranks.iter().enumerate() {
        for peer in 0..hosts.len() {
            assert_eq!(
                t.shares_memory_with(peer),
                peer != me && hosts[peer] == hosts[me],
                "rank {me}: shares memory with rank {peer}?"
            );
        }
        for to in (0..hosts.len()).filter(|to| *to != me) {
            t.send(to, &[me as u8, to as u8]).unwrap();
        }
    }
    for (me, t) in ranks.iter().enumerate() {
        let mut from: Vec<usize> = (0..hosts.len() - 1)
            .map(|_| {
                let m = recv(t);
                assert_eq!(m.payload, [m.from as u8, me as u8]);
                m.from
            })
            .collect();
        from.sort_unstable();
        let others: Vec<usize> = (0..hosts.len()).filter(|r| *r != me).collect();
        assert_eq!(from, others);
    }
    let ends: Vec<_> = ranks
        .into_iter()
        .map(|t| thread::spawn(move || t.shutdown(RECV_LIMIT).unwrap()))
        .collect();
    for end in ends {
        end.join().unwrap();
    }
}

#[test]
fn many_small_messages_arrive_in_order_between_all_pairs() {
    const N: usize = 4;
    const PER_PEER: u32 = 2000;
    let ranks = job(N);
    let workers: Vec<_> = ranks
        .iter()
        .cloned()
        .map(|t| {
            thread::spawn(move || {
                for seq in 0..PER_PEER {
                    for to in 0..N {
                        let msg = [t.rank() as u32, to as u32, seq];
                        let bytes: Vec<u8> = msg.iter().flat_map(|v| v.to_le_bytes()).collect();
                        t.send(to, &bytes).unwrap();
                    }
                }
                let mut next = [0u32; N];
                for _ in 0..N as u32 * PER_PEER {
                    let m = recv(&t);
                    let word = |i: usize| {
                        u32::from_le_bytes(m.payload[4 * i..4 * i + 4].try_into().unwrap())
                    };
                    assert_eq!(word(0) as usize, m.from);
                    assert_eq!(word(1) as usize, t.rank());
                    assert_eq!(word(2), next[m.from], "out of order from {}", m.from);
                    next[m.from] += 1;
                }
                assert_eq!(next, [PER_PEER; N]);
                t.shutdown(RECV_LIMIT).unwrap();
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn large_payload_arrives_intact() {
    let ranks = job(2);
    let big: Vec<u8> = (0..8 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let sender = {
        let t = Arc::clone(&ranks[1]);
        let big = big.clone();
        thread::spawn(move || t.send_parts(0, &[&big[..100], &big[100..]]).unwrap())
    };
    let m = recv(&ranks[0]);
    sender.join().unwrap();
    assert_eq!(m.from, 1);
    assert!(m.payload == big, "payload corrupted");
}

#[test]
fn recycled_buffers_carry_each_message_intact() {
    // Sizes that reuse a recycled buffer, outgrow it, and fall outside the
    // pooled range, each message with its own contents.
    let ranks = job(2);
    let sizes = [
        300 << 10,
        20 << 10,
        290 << 10,
        1 << 20,
        64,
        5 << 20,
        256 << 10,
    ];
    let message = |i: usize, len: usize| -> Vec<u8> {
        (0..len)
            .map(|j| (j * 31 + i * 7 + (j >> 12)) as u8)
            .collect()
    };
    let sender = {
        let t = Arc::clone(&ranks[1]);
        thread::spawn(move || {
            for round in 0..3 {
                for (i, len) in sizes.iter().enumerate() {
                    t.send(0, &message(round * 10 + i, *len)).unwrap();
                }
            }
        })
    };
    for round in 0..3 {
        for (i, len) in sizes.iter().enumerate() {
            let m = recv(&ranks[0]);
            assert!(
                m.payload == message(round * 10 + i, *len),
                "message {i} of round {round} corrupted"
            );
            ranks[0].recycle(m.payload);
        }
    }
    sender.join().unwrap();
}

#[test]
fn concurrent_senders_never_interleave_frames() {
    const THREADS: u32 = 4;
    const EACH: u32 = 1000;
    let ranks = job(2);
    let senders: Vec<_> = (0..THREADS)
        .map(|tid| {
            let t = Arc::clone(&ranks[1]);
            thread::spawn(move || {
                for seq in 0..EACH {
                    // Different lengths per thread so an interleaving would corrupt framing.
                    let mut msg = vec![tid as u8; 16 + tid as usize * 300];
                    msg[..4].copy_from_slice(&seq.to_le_bytes());
                    t.send(0, &msg).unwrap();
                }
            })
        })
        .collect();
    let mut next = vec![0u32; THREADS as usize];
    for _ in 0..THREADS * EACH {
        let m = recv(&ranks[0]);
        let tid = m.payload[4] as usize;
        assert_eq!(m.payload.len(), 16 + tid * 300);
        assert!(m.payload[4..].iter().all(|b| *b as usize == tid));
        assert_eq!(
            u32::from_le_bytes(m.payload[..4].try_into().unwrap()),
            next[tid]
        );
        next[tid] += 1;
    }
    for s in senders {
        s.join().unwrap();
    }
}

#[test]
fn intruders_are_refused_and_the_job_still_connects() {
    let boots = Bootstrap::loopback_group(3).unwrap();
    let target = boots[0].peers[0].addr;
    // Before the real ranks connect: a wrong secret, garbage, and a silent socket.
    let mut wrong = TcpStream::connect(target).unwrap();
    wrong.set_read_timeout(Some(RECV_LIMIT)).unwrap();
    let intruder = thread::spawn(move || {
        auth::connect(
            &mut wrong,
            &JobSecret::generate().unwrap(),
            b"dsm-tcp rank 2",
        )
    });
    let mut garbage = TcpStream::connect(target).unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let _silent = TcpStream::connect(target).unwrap();

    let ranks = connect_all(boots);
    assert!(
        intruder.join().unwrap().is_err(),
        "a wrong secret was accepted"
    );
    ranks[2].send(0, b"still fine").unwrap();
    let m = recv(&ranks[0]);
    assert_eq!((m.from, &m.payload[..]), (2, &b"still fine"[..]));
}

#[test]
fn a_vanished_peer_is_reported_with_its_rank() {
    let mut ranks = job(2);
    let gone = ranks.pop().unwrap();
    drop(gone);
    match ranks[0].recv_timeout(RECV_LIMIT) {
        Err(TransportError::PeerLost { rank: 1, host, .. }) => assert_eq!(host, "localhost"),
        other => panic!("expected PeerLost for rank 1, got {other:?}"),
    }
}

#[test]
fn sending_to_self_loops_back_and_bad_ranks_are_refused() {
    let ranks = job(1);
    ranks[0].send(0, b"me").unwrap();
    assert_eq!(recv(&ranks[0]).payload, b"me");
    assert!(matches!(
        ranks[0].send(5, b"x"),
        Err(TransportError::NoSuchRank { rank: 5, size: 1 })
    ));
}

/// A thread polling the rings (`poll_answers`, as a faulting thread waiting
/// for its page does) hands on what arrives whole, in the order sent, and
/// the receive thread takes the rest whenever no poll is on: every message
/// is handled exactly once, in order, whoever reads it, including messages
/// larger than the ring, which only the receive thread can read.
#[test]
fn a_thread_polling_the_rings_and_the_receive_thread_share_them_in_order() {
    const MESSAGES: u32 = 3000;
    let opts = TcpOptions {
        connect_timeout: Duration::from_secs(20),
        shared_memory: true,
        ..TcpOptions::builtin()
    };
    let ranks = connect_with(Bootstrap::loopback_group(2).unwrap(), &opts);
    assert!(ranks[1].shares_memory_with(0));
    let (handled_tx, handled_rx) = crossbeam_channel::unbounded();
    assert!(
        ranks[1].deliver_inline(Box::new(move |m: dsm_core::Message| {
            let seq = u32::from_le_bytes(m.payload[..4].try_into().unwrap());
            let fill = (seq % 251) as u8;
            assert!(
                m.payload[4..].iter().all(|b| *b == fill),
                "message {seq} intact"
            );
            handled_tx.send((seq, thread::current().id())).unwrap();
            None
        }))
    );
    // Sizes of the second phase, by sequence number past the first.
    let size = |seq: u32| match seq % 100 {
        0 => (3 << 20) / 2, // larger than the 1 MiB ring
        n if n % 7 == 0 => 64 << 10,
        n if n % 2 == 0 => 4096 + 4,
        _ => 16,
    };
    let poller = thread::current().id();
    // (next expected, handled by the polling thread)
    let mut handled = (0u32, 0usize);
    let mut take_handled = || {
        while let Ok((seq, by)) = handled_rx.try_recv() {
            assert_eq!(seq, handled.0, "handled out of order");
            handled.0 += 1;
            handled.1 += usize::from(by == poller);
        }
        handled
    };
    let send = |seq: u32, len: usize| {
        let mut message = vec![(seq % 251) as u8; len];
        message[..4].copy_from_slice(&seq.to_le_bytes());
        ranks[0].send(1, &message).unwrap();
    };
    let deadline = std::time::Instant::now() + RECV_LIMIT;
    // First with a poll on before the messages leave, as a faulting thread
    // polls before its request leaves: the producer does not wake the
    // receive thread, so once it sleeps the poller takes everything. It may
    // still be awake from the set-up on a loaded machine: rounds of small
    // messages until the poller took some.
    const ROUND: u32 = 10;
    let mut first = 0u32;
    let mut seen = take_handled();
    while seen.1 == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the polling thread handled none of {first} messages"
        );
        let mut poll = ranks[1].poll_answers().expect("rings can be polled");
        (first..first + ROUND).for_each(|seq| send(seq, 16 + (seq % 50) as usize));
        first += ROUND;
        while seen.0 < first {
            assert!(std::time::Instant::now() < deadline, "stuck at {seen:?}");
            poll.receive();
            seen = take_handled();
        }
    }
    // Then polls on and off while a sender streams.
    thread::scope(|s| {
        s.spawn(|| (first..MESSAGES).for_each(|seq| send(seq, size(seq - first))));
        while seen.0 < MESSAGES {
            assert!(std::time::Instant::now() < deadline, "stuck at {seen:?}");
            let mut poll = ranks[1].poll_answers().expect("rings can be polled");
            for _ in 0..300 {
                poll.receive();
            }
            drop(poll);
            seen = take_handled();
        }
    });
    let by_poller = seen.1;
    assert!(
        by_poller < MESSAGES as usize,
        "the receive thread handled none (not even the large messages)"
    );
    thread::scope(|s| {
        for t in &ranks {
            s.spawn(|| t.shutdown(RECV_LIMIT).unwrap());
        }
    });
}

#[test]
fn an_inline_handler_sees_each_message_first_and_what_it_hands_back_is_queued() {
    const MESSAGES: u32 = 1000;
    let ranks = job(2);
    let (handled_tx, handled_rx) = crossbeam_channel::unbounded();
    // Odd sequence numbers are handled in the receive thread; even ones are
    // handed back and must reach `recv`, in order, and nothing else.
    assert!(
        ranks[1].deliver_inline(Box::new(move |m: dsm_core::Message| {
            let seq = u32::from_le_bytes(m.payload[..4].try_into().unwrap());
            if seq % 2 == 1 {
                handled_tx.send(seq).unwrap();
                None
            } else {
                Some(m)
            }
        }))
    );
    assert!(
        !ranks[1].deliver_inline(Box::new(Some)),
        "a second handler is refused"
    );
    for seq in 0..MESSAGES {
        ranks[0].send(1, &seq.to_le_bytes()).unwrap();
    }
    // A message to oneself is always queued.
    ranks[1].send(1, &u32::MAX.to_le_bytes()).unwrap();
    let mut queued = Vec::new();
    while queued.len() < MESSAGES as usize / 2 + 1 {
        let m = recv(&ranks[1]);
        queued.push(u32::from_le_bytes(m.payload[..4].try_into().unwrap()));
    }
    let from_peer: Vec<u32> = queued.iter().copied().filter(|&s| s != u32::MAX).collect();
    assert_eq!(from_peer, (0..MESSAGES).step_by(2).collect::<Vec<_>>());
    assert!(queued.contains(&u32::MAX));
    let handled: Vec<u32> = (0..MESSAGES / 2)
        .map(|_| handled_rx.recv_timeout(RECV_LIMIT).unwrap())
        .collect();
    assert_eq!(handled, (1..MESSAGES).step_by(2).collect::<Vec<_>>());
    thread::scope(|s| {
        for t in &ranks {
            s.spawn(|| t.shutdown(RECV_LIMIT).unwrap());
        }
    });
}

/// Receives the rest of a message into its own buffer and hands back
/// `placed`, the head, then those bytes.
struct TestLanding {
    head: Vec<u8>,
    rest: Vec<u8>,
}

impl Landing for TestLanding {
    fn bytes(&mut self) -> &mut [u8] {
        &mut self.rest
    }

    fn landed(self: Box<Self>) -> Vec<u8> {
        [&b"placed"[..], &self.head, &self.rest].concat()
    }
}

#[test]
fn a_placement_receives_the_messages_it_takes_in_its_memory_in_order() {
    const HEAD: usize = 4;
    let ranks = job(2);
    // Messages whose head starts with `P` land in a `TestLanding`; the
    // others are received as usual. Sizes mix small messages with large
    // ones, so a landing starts both inside the reader's buffer and past it.
    let placement = PayloadPlacement {
        head_len: HEAD,
        place: Box::new(|from, head, len| {
            assert_eq!(from, 0);
            (head[0] == b'P').then(|| {
                Box::new(TestLanding {
                    head: head.to_vec(),
                    rest: vec![0; len - head.len()],
                }) as Box<dyn Landing>
            })
        }),
    };
    assert!(ranks[1].place_payloads(placement));
    let too_long = PayloadPlacement {
        head_len: PayloadPlacement::MAX_HEAD + 1,
        place: Box::new(|_, _, _| None),
    };
    assert!(
        !ranks[0].place_payloads(too_long),
        "a head too long is refused"
    );
    let message = |i: usize| -> Vec<u8> {
        let len = [3, 5, 100, 70_000, 300_000][i % 5];
        let kind = if i.is_multiple_of(3) { b'P' } else { b'Q' };
        let mut m: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8).collect();
        m[0] = kind;
        m
    };
    const MESSAGES: usize = 60;
    let sender = Arc::clone(&ranks[0]);
    let sending = thread::spawn(move || {
        for i in 0..MESSAGES {
            sender.send(1, &message(i)).unwrap();
        }
    });
    for i in 0..MESSAGES {
        let sent = message(i);
        let got = recv(&ranks[1]).payload;
        if sent[0] == b'P' && sent.len() > HEAD {
            assert_eq!(&got[..6], b"placed", "message {i} was placed");
            assert_eq!(&got[6..], &sent[..], "message {i} landed whole");
        } else {
            assert_eq!(got, sent, "message {i} was received as usual");
        }
    }
    sending.join().unwrap();
    thread::scope(|s| {
        for t in &ranks {
            s.spawn(|| t.shutdown(RECV_LIMIT).unwrap());
        }
    });
}

#[test]
fn try_send_takes_what_it_can_without_waiting_and_keeps_order() {
    let ranks = job(2);
    // Rank 1's reader stops at the first message until released (its
    // placement waits), so rank 0's socket fills up. Messages rank 0 tries
    // to send are sent, begun (their end kept), or refused; plain sends
    // after them, and finish_sends, complete the stream, which must arrive
    // whole and in order.
    let (release, gate) = crossbeam_channel::bounded::<()>(1);
    let gate = std::sync::Mutex::new(Some(gate));
    assert!(ranks[1].place_payloads(PayloadPlacement {
        head_len: 4,
        place: Box::new(move |_, _, _| {
            if let Some(gate) = gate.lock().unwrap().take() {
                gate.recv_timeout(RECV_LIMIT).expect("released");
            }
            None
        }),
    }));
    let message = |i: u32| -> Vec<u8> {
        let mut m = vec![(i % 251) as u8; 16 << 10];
        m[..4].copy_from_slice(&i.to_le_bytes());
        m
    };
    let mut sent = Vec::new();
    let mut outcomes = [0usize; 3];
    for i in 0..2000u32 {
        match ranks[0].try_send_parts(1, &[&message(i)]).unwrap() {
            TrySent::Sent => outcomes[0] += 1,
            TrySent::Started => outcomes[1] += 1,
            TrySent::WouldWait => {
                outcomes[2] += 1;
                continue;
            }
        }
        sent.push(i);
    }
    assert!(outcomes[2] > 0, "the socket never filled: {outcomes:?}");
    release.send(()).unwrap();
    let (receiver, sender) = (Arc::clone(&ranks[1]), Arc::clone(&ranks[0]));
    let finishing = thread::spawn(move || {
        sender.finish_sends().unwrap();
        sender.send(1, &message(u32::MAX)).unwrap();
    });
    for &i in &sent {
        assert_eq!(recv(&receiver).payload, message(i), "message {i}");
    }
    assert_eq!(recv(&receiver).payload, message(u32::MAX));
    finishing.join().unwrap();
    // Too large to try, or in more pieces than one call takes: refused,
    // nothing sent; the same pieces sent by `send_parts` arrive whole.
    let large = vec![1u8; 1 << 20];
    assert_eq!(
        ranks[0].try_send_parts(1, &[&large]).unwrap(),
        TrySent::WouldWait
    );
    let pieces: Vec<[u8; 2]> = (0..1500u16).map(|i| i.to_le_bytes()).collect();
    let parts: Vec<&[u8]> = pieces.iter().map(|p| &p[..]).collect();
    assert_eq!(
        ranks[0].try_send_parts(1, &parts).unwrap(),
        TrySent::WouldWait
    );
    ranks[0].send_parts(1, &parts).unwrap();
    assert_eq!(recv(&ranks[1]).payload, parts.concat());
    assert_eq!(ranks[0].try_send_parts(0, &[b"me"]).unwrap(), TrySent::Sent);
    assert_eq!(recv(&ranks[0]).payload, b"me");
    thread::scope(|s| {
        for t in &ranks {
            s.spawn(|| t.shutdown(RECV_LIMIT).unwrap());
        }
    });
}

/// A peer whose connection is up but whose process sends nothing (stopped,
/// wedged): reported lost as not responding once the peer timeout passed,
/// not before.
#[test]
fn a_connected_but_silent_peer_is_reported_not_responding() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let mut boots = Bootstrap::loopback_group(2).unwrap();
    let silent = boots.pop().unwrap();
    let opts = TcpOptions {
        peer_timeout: TIMEOUT,
        // The hand-made peer does not set up shared memory.
        shared_memory: false,
        ..TcpOptions::builtin()
    };
    // Before the transport exists: its clock of rank 1's silence starts later.
    let connected = std::time::Instant::now();
    let real = thread::spawn(move || TcpTransport::connect(boots.pop().unwrap(), &opts).unwrap());
    // Rank 1 joins by hand and then never says a thing.
    let mut stream = TcpStream::connect(silent.peers[0].addr).unwrap();
    auth::connect(&mut stream, &silent.secret, b"dsm-tcp rank 1").unwrap();
    let rank0 = real.join().unwrap();
    match rank0.recv_timeout(RECV_LIMIT) {
        Err(TransportError::PeerLost {
            rank: 1, reason, ..
        }) => {
            assert!(reason.contains("not responding"), "{reason}");
            assert!(
                connected.elapsed() >= TIMEOUT,
                "reported after {:?}, before the timeout",
                connected.elapsed()
            );
        }
        other => panic!("expected rank 1 not responding, got {other:?}"),
    }
    // Reported once, though the connection was shut since.
    assert!(matches!(
        rank0.recv_timeout(Duration::from_millis(300)),
        Ok(None)
    ));
    drop(stream);
}

/// Ranks with nothing to say to each other for many peer timeouts are not
/// lost: their heartbeat threads speak for them.
#[test]
fn idle_ranks_stay_connected_through_heartbeats() {
    // Short, for a short test, but several scheduling delays long.
    const TIMEOUT: Duration = Duration::from_secs(1);
    let boots = Bootstrap::loopback_group(3).unwrap();
    let opts = TcpOptions {
        peer_timeout: TIMEOUT,
        ..TcpOptions::builtin()
    };
    let ranks: Vec<_> = boots
        .into_iter()
        .map(|b| {
            let opts = opts.clone();
            thread::spawn(move || TcpTransport::connect(b, &opts).unwrap())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    // Three timeouts of silence from the application, one per rank in turn.
    for rank in &ranks {
        assert!(
            matches!(rank.recv_timeout(TIMEOUT), Ok(None)),
            "rank {} lost a peer while idle",
            rank.rank()
        );
    }
    ranks[2].send(0, b"after the quiet").unwrap();
    let m = recv(&ranks[0]);
    assert_eq!((m.from, &m.payload[..]), (2, &b"after the quiet"[..]));
    let shutdowns: Vec<_> = ranks
        .into_iter()
        .map(|t| thread::spawn(move || t.shutdown(RECV_LIMIT)))
        .collect();
    for s in shutdowns {
        s.join().unwrap().unwrap();
    }
}
