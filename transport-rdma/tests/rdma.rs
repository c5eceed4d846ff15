//! Tests that need an RDMA device (the rxe VM: `scripts/rdma-vm-test.sh`).
//!
//! Without a device each test prints a SKIPPED line and passes, unless
//! `DSM_TEST_REQUIRE_RDMA=1`, where it fails.

// A test reports failure by panicking: unwrap is its assertion.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dsm_core::auth::JobSecret;
use dsm_core::bootstrap::{Bootstrap, PeerInfo};
use dsm_core::transport::{AnswerPoll, Incoming, InlineDelivery, PayloadPlacement, TrySent};
use dsm_core::{Transport, TransportError};
use transport_rdma::{LocalPath, MemoryRegion, PageMode, RdmaDevice, RdmaOptions, RdmaTransport};
use transport_tcp::{TcpOptions, TcpTransport};

const LIMIT: Duration = Duration::from_secs(60);
const REGION: usize = 1 << 20;

fn device_or_skip(test: &str) -> bool {
    match transport_rdma::select::active_port() {
        Ok(_) => true,
        Err(why) => {
            if std::env::var("DSM_TEST_REQUIRE_RDMA").as_deref() == Ok("1") {
                panic!("{test}: DSM_TEST_REQUIRE_RDMA=1 but no RDMA device: {why}");
            }
            println!("SKIPPED {test}: no RDMA device ({why}); run scripts/rdma-vm-test.sh");
            false
        }
    }
}

fn pattern(rank: usize, i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (rank * 101)) as u8
}

struct Rank {
    t: Arc<RdmaTransport>,
    region: Arc<MemoryRegion>,
}

/// The environment's options with every peer over the adapter, even a
/// co-located one (these in-process ranks share a host): what most tests
/// exercise.
fn over_adapter() -> RdmaOptions {
    RdmaOptions {
        local: LocalPath::Rdma,
        ..RdmaOptions::from_env().unwrap()
    }
}

fn rdma_over(boot: Bootstrap) -> Rank {
    rdma_with(boot, over_adapter())
}

fn rdma_with(boot: Bootstrap, opts: RdmaOptions) -> Rank {
    let rank = boot.rank;
    let tcp = TcpTransport::connect(boot, &TcpOptions::default()).unwrap();
    let dev = RdmaDevice::open(&opts).unwrap();
    let region = dev.alloc(REGION).unwrap();
    let fill: Vec<u8> = (0..REGION).map(|i| pattern(rank, i)).collect();
    region.write_bytes(0, &fill).unwrap();
    let t = RdmaTransport::connect(tcp, dev, vec![Arc::clone(&region)], &opts).unwrap();
    Rank { t, region }
}

fn job(size: usize) -> Vec<Rank> {
    job_with(size, |_| over_adapter())
}

/// A job whose rank `r` connects with `opts(r)`.
fn job_with(size: usize, opts: impl Fn(usize) -> RdmaOptions) -> Vec<Rank> {
    job_on_hosts(&vec!["localhost"; size], opts)
}

/// A job of one rank per entry of `hosts`, which the peer table gives as
/// each rank's host (ranks of one host name share memory).
fn job_on_hosts(hosts: &[&str], opts: impl Fn(usize) -> RdmaOptions) -> Vec<Rank> {
    let mut boots = Bootstrap::loopback_group(hosts.len()).unwrap();
    for boot in &mut boots {
        for (peer, host) in boot.peers.iter_mut().zip(hosts) {
            peer.host = host.to_string();
        }
    }
    let hs: Vec<_> = boots
        .into_iter()
        .map(|b| {
            let o = opts(b.rank);
            thread::spawn(move || rdma_with(b, o))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

fn shutdown_all(ranks: Vec<Rank>) {
    let hs: Vec<_> = ranks
        .into_iter()
        .map(|r| thread::spawn(move || r.t.shutdown(Duration::from_secs(20)).unwrap()))
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

#[test]
fn two_ranks_read_write_send_recv() {
    if !device_or_skip("two_ranks_read_write_send_recv") {
        return;
    }
    let ranks = job(2);
    let (a, b) = (&ranks[0], &ranks[1]);
    let remote_b = a.t.remote_regions(1)[0];
    assert_eq!(remote_b.len, REGION as u64);

    // READ 4 KiB at offset 8192 of rank 1 into rank 0's scratch buffer.
    let scratch = a.t.device().alloc(64 << 10).unwrap();
    a.t.read(1, &remote_b, 8192, &scratch, 100, 4096).unwrap();
    let got = scratch.to_vec(100, 4096).unwrap();
    let want: Vec<u8> = (8192..8192 + 4096).map(|i| pattern(1, i)).collect();
    assert_eq!(got, want, "RDMA READ data");

    // A larger READ (whole region of 1 MiB minus an offset).
    let big = a.t.device().alloc(REGION).unwrap();
    a.t.read(1, &remote_b, 1, &big, 0, REGION - 1).unwrap();
    let want: Vec<u8> = (1..REGION).map(|i| pattern(1, i)).collect();
    assert_eq!(big.to_vec(0, REGION - 1).unwrap(), want);

    // WRITE 4 KiB into rank 1's region, then tell it over SEND/RECV.
    let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    scratch.write_bytes(0, &data).unwrap();
    a.t.write(1, &remote_b, 65536, &scratch, 0, 4096).unwrap();
    a.t.send(1, b"written").unwrap();
    let m = b.t.recv_timeout(LIMIT).unwrap().expect("message");
    assert_eq!((m.from, m.payload.as_slice()), (0, &b"written"[..]));
    assert_eq!(
        b.region.to_vec(65536, 4096).unwrap(),
        data,
        "RDMA WRITE data"
    );

    // Reply with a fragmented message made of parts.
    let head = [7u8; 10];
    let page: Vec<u8> = (0..100_000).map(|i| (i % 253) as u8).collect();
    b.t.send_parts(0, &[&head, &page]).unwrap();
    let m = a.t.recv_timeout(LIMIT).unwrap().expect("reply");
    assert_eq!(m.from, 1);
    assert_eq!(&m.payload[..10], &head);
    assert_eq!(&m.payload[10..], &page[..]);

    // Self-send loops back; out-of-range is refused.
    a.t.send(0, b"me").unwrap();
    assert_eq!(a.t.recv_timeout(LIMIT).unwrap().unwrap().payload, b"me");
    assert!(a
        .t
        .read(1, &remote_b, REGION as u64, &scratch, 0, 1)
        .is_err());
    assert!(a.t.send(5, b"x").is_err());
    shutdown_all(ranks);
}

#[test]
fn many_messages_from_many_threads_arrive_whole_and_in_order() {
    if !device_or_skip("many_messages_from_many_threads_arrive_whole_and_in_order") {
        return;
    }
    let ranks = job(3);
    messages_arrive_whole_and_in_order(&ranks, 500);
    shutdown_all(ranks);
}

/// Every rank's 3 threads send every rank (itself too) `per_thread`
/// messages, every 50th of 40 000 bytes (fragmented), thread 0 trying
/// `try_send_parts` first; each rank checks every message whole and in
/// order per sending thread.
fn messages_arrive_whole_and_in_order(ranks: &[Rank], per_thread: u32) {
    const THREADS: usize = 3;
    let n = ranks.len();
    let ts: Vec<Arc<RdmaTransport>> = ranks.iter().map(|r| Arc::clone(&r.t)).collect();
    let start = Instant::now();
    let tries = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for t in &ts {
        for th in 0..THREADS {
            let t = Arc::clone(t);
            let tries_taken = Arc::clone(&tries);
            senders.push(thread::spawn(move || {
                for seq in 0..per_thread {
                    for to in 0..n {
                        // Every 50th message is large (fragmented).
                        let len = if seq % 50 == 0 {
                            40_000
                        } else {
                            16 + (seq as usize % 64)
                        };
                        let mut msg = vec![(seq % 256) as u8; len];
                        msg[..4].copy_from_slice(&(t.rank() as u32).to_le_bytes());
                        msg[4..8].copy_from_slice(&(th as u32).to_le_bytes());
                        msg[8..12].copy_from_slice(&seq.to_le_bytes());
                        // Thread 0 tries the non-blocking send first (a
                        // receive thread's way), and sends as usual what
                        // it refuses (every large message, say).
                        let tried =
                            th == 0 && t.try_send_parts(to, &[&msg]).unwrap() == TrySent::Sent;
                        if tried {
                            tries_taken.fetch_add(1, Ordering::Relaxed);
                        } else {
                            t.send(to, &msg).unwrap();
                        }
                    }
                }
            }));
        }
    }
    let receivers: Vec<_> = ts
        .iter()
        .map(|t| {
            let t = Arc::clone(t);
            thread::spawn(move || {
                let mut next = vec![[0u32; THREADS]; n];
                for _ in 0..(n * THREADS) as u32 * per_thread {
                    let m = t.recv_timeout(LIMIT).unwrap().expect("message");
                    let p = &m.payload;
                    let from = u32::from_le_bytes(p[..4].try_into().unwrap()) as usize;
                    let th = u32::from_le_bytes(p[4..8].try_into().unwrap()) as usize;
                    let seq = u32::from_le_bytes(p[8..12].try_into().unwrap());
                    assert_eq!(from, m.from);
                    assert_eq!(seq, next[from][th], "order from rank {from} thread {th}");
                    next[from][th] += 1;
                    let len = if seq % 50 == 0 {
                        40_000
                    } else {
                        16 + (seq as usize % 64)
                    };
                    assert_eq!(p.len(), len);
                    assert!(p[12..].iter().all(|b| *b == (seq % 256) as u8));
                }
            })
        })
        .collect();
    for h in senders {
        h.join().unwrap();
    }
    for h in receivers {
        h.join().unwrap();
    }
    let total = n * n * THREADS * per_thread as usize;
    let tries = tries.load(Ordering::Relaxed);
    println!(
        "{total} messages among {n} ranks in {:?}, {tries} sent by try_send_parts",
        start.elapsed()
    );
    assert!(tries > 0, "try_send_parts never sent a message");
}

/// Ranks 0-1 on one host and 2-3 on another (`DSM_RDMA_LOCAL=shm`): each
/// pair of a host talks through the bootstrap transport's rings, every
/// other pair over the adapter, in one job; messages (sent, tried,
/// fragmented) and pages keep their order and bytes on both paths.
#[test]
fn co_located_ranks_talk_through_shared_memory_the_others_over_rdma() {
    if !device_or_skip("co_located_ranks_talk_through_shared_memory_the_others_over_rdma") {
        return;
    }
    const PAGES: usize = 16;
    let hosts = ["h0", "h0", "h1", "h1"];
    let ranks = job_on_hosts(&hosts, |_| RdmaOptions {
        local: LocalPath::Shm,
        landing_pages: PAGES,
        ..RdmaOptions::from_env().unwrap()
    });
    for (me, rank) in ranks.iter().enumerate() {
        for peer in 0..hosts.len() {
            assert_eq!(
                rank.t.shares_memory_with(peer),
                peer != me && hosts[peer] == hosts[me],
                "rank {me}: is rank {peer} reached through shared memory?"
            );
        }
    }
    messages_arrive_whole_and_in_order(&ranks, 300);
    // Every rank sends every other rank all pages, then a small message;
    // each receiver consumes one sender at a time.
    let ts: Vec<Arc<RdmaTransport>> = ranks.iter().map(|r| Arc::clone(&r.t)).collect();
    for to in 0..ts.len() {
        for from in (0..ts.len()).filter(|f| *f != to) {
            let t = Arc::clone(&ts[from]);
            let sender = thread::spawn(move || {
                for page in 0..PAGES {
                    t.send_page(to, &page_header(from, page), page, &page_bytes(from, page))
                        .unwrap();
                }
                t.send(to, b"pages done").unwrap();
            });
            for page in 0..PAGES {
                expect_page(&ts[to], from, from, page);
            }
            let m = ts[to]
                .recv_timeout(LIMIT)
                .unwrap()
                .expect("after the pages");
            assert_eq!((m.from, m.payload.as_slice()), (from, &b"pages done"[..]));
            sender.join().unwrap();
        }
    }
    drop(ts);
    shutdown_all(ranks);
}

/// A bootstrap transport that passes everything on to its TCP transport,
/// with two hooks for forcing an order: it holds its second message to
/// `hold.0` (the READY that follows the endpoint) until `hold.1` gives the
/// go, and gives `seen.1` the go once it received a message equal to
/// `seen.0`.
struct Hooked {
    inner: Arc<TcpTransport>,
    hold: Option<(usize, crossbeam_channel::Receiver<()>)>,
    sent_to_held: AtomicUsize,
    seen: Option<(&'static [u8], crossbeam_channel::Sender<()>)>,
}

impl Hooked {
    fn new(inner: Arc<TcpTransport>) -> Hooked {
        Hooked {
            inner,
            hold: None,
            sent_to_held: AtomicUsize::new(0),
            seen: None,
        }
    }

    fn received(&self, m: &dsm_core::Message) {
        if let Some((payload, go)) = &self.seen {
            if m.payload == *payload {
                go.send(()).unwrap();
            }
        }
    }
}

impl Transport for Hooked {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn send_parts(&self, to: usize, parts: &[&[u8]]) -> Result<(), TransportError> {
        if let Some((peer, go)) = &self.hold {
            if to == *peer && self.sent_to_held.fetch_add(1, Ordering::SeqCst) == 1 {
                go.recv_timeout(LIMIT).expect("the go within the limit");
            }
        }
        self.inner.send_parts(to, parts)
    }
    fn try_send_parts(&self, to: usize, parts: &[&[u8]]) -> Result<TrySent, TransportError> {
        self.inner.try_send_parts(to, parts)
    }
    fn try_send_page(
        &self,
        to: usize,
        header: &[u8],
        page: usize,
        data: &[u8],
    ) -> Result<TrySent, TransportError> {
        self.inner.try_send_page(to, header, page, data)
    }
    fn finish_sends(&self) -> Result<(), TransportError> {
        self.inner.finish_sends()
    }
    fn send_page(
        &self,
        to: usize,
        header: &[u8],
        page: usize,
        data: &[u8],
    ) -> Result<(), TransportError> {
        self.inner.send_page(to, header, page, data)
    }
    fn inbox(&self) -> crossbeam_channel::Receiver<Incoming> {
        self.inner.inbox()
    }
    fn recv(&self) -> Result<dsm_core::Message, TransportError> {
        let m = self.inner.recv()?;
        self.received(&m);
        Ok(m)
    }
    fn recv_timeout(&self, timeout: Duration) -> Result<Option<dsm_core::Message>, TransportError> {
        let m = self.inner.recv_timeout(timeout)?;
        if let Some(m) = &m {
            self.received(m);
        }
        Ok(m)
    }
    fn deliver_inline(&self, handler: InlineDelivery) -> bool {
        self.inner.deliver_inline(handler)
    }
    fn place_payloads(&self, placement: PayloadPlacement) -> bool {
        self.inner.place_payloads(placement)
    }
    fn poll_answers(&self) -> Option<Box<dyn AnswerPoll + '_>> {
        self.inner.poll_answers()
    }
    fn shares_memory_with(&self, peer: usize) -> bool {
        self.inner.shares_memory_with(peer)
    }
    fn recycle(&self, payload: Vec<u8>) {
        self.inner.recycle(payload)
    }
    fn shutdown(&self, timeout: Duration) -> Result<(), TransportError> {
        self.inner.shutdown(timeout)
    }
}

/// Ranks 0 and 1 share a host (their messages go through the rings of the
/// bootstrap connection), rank 2 is elsewhere. Rank 2's READY to rank 1 is
/// held back until rank 1's bootstrap connection has received a message
/// rank 0 sent once set up (as a DSM's frame offer is its first): rank 1
/// gets it while it still waits for that READY. Its setup completes, and
/// the message is the first it receives.
#[test]
fn a_message_sent_before_another_peers_ready_arrives_after_setup() {
    if !device_or_skip("a_message_sent_before_another_peers_ready_arrives_after_setup") {
        return;
    }
    const EARLY: &[u8] = b"sent before rank 2's READY";
    let mut boots = Bootstrap::loopback_group(3).unwrap();
    for boot in &mut boots {
        for (peer, host) in boot.peers.iter_mut().zip(["h0", "h0", "h1"]) {
            peer.host = host.to_string();
        }
    }
    let opts = RdmaOptions {
        local: LocalPath::Shm,
        ..RdmaOptions::from_env().unwrap()
    };
    let (go, wait_for_go) = crossbeam_channel::bounded(1);
    let setups: Vec<_> = boots
        .into_iter()
        .map(|boot| {
            let (opts, go, wait_for_go) = (opts.clone(), go.clone(), wait_for_go.clone());
            thread::spawn(move || {
                let rank = boot.rank;
                let mut hooked =
                    Hooked::new(TcpTransport::connect(boot, &TcpOptions::default()).unwrap());
                match rank {
                    1 => hooked.seen = Some((EARLY, go)),
                    2 => hooked.hold = Some((1, wait_for_go)),
                    _ => {}
                }
                let dev = RdmaDevice::open(&opts).unwrap();
                let region = dev.alloc(REGION).unwrap();
                let t =
                    RdmaTransport::connect(Arc::new(hooked), dev, vec![Arc::clone(&region)], &opts);
                Rank {
                    t: t.unwrap_or_else(|e| panic!("rank {rank}: setup: {e}")),
                    region,
                }
            })
        })
        .collect();
    let mut setups = setups.into_iter();
    let rank0 = setups.next().unwrap().join().unwrap();
    assert!(rank0.t.shares_memory_with(1));
    rank0.t.send(1, EARLY).unwrap();
    let rest: Vec<Rank> = setups.map(|s| s.join().unwrap()).collect();
    let m = rest[0]
        .t
        .recv_timeout(LIMIT)
        .unwrap()
        .expect("rank 0's message");
    assert_eq!((m.from, m.payload.as_slice()), (0, EARLY));
    shutdown_all(std::iter::once(rank0).chain(rest).collect());
}

/// A thread polling for answers (`poll_answers`, as a faulting thread
/// does) and the receive completion thread (and the rings' receive thread,
/// for a co-located sender) share what arrives: rank 1 of ranks on hosts
/// h0, h0, h1 gets messages from rank 0 through the rings and from rank 2
/// over the adapter (small ones and fragmented ones) while its main thread
/// polls on and off; every message is handled once, whole, in its sender's
/// order, whoever took it.
#[test]
fn a_polling_thread_and_the_completion_thread_keep_each_senders_order() {
    if !device_or_skip("a_polling_thread_and_the_completion_thread_keep_each_senders_order") {
        return;
    }
    const MESSAGES: u32 = 600;
    let ranks = job_on_hosts(&["h0", "h0", "h1"], |_| RdmaOptions {
        local: LocalPath::Shm,
        ..RdmaOptions::from_env().unwrap()
    });
    let (handled_tx, handled_rx) = crossbeam_channel::unbounded();
    assert!(ranks[1]
        .t
        .deliver_inline(Box::new(move |m: dsm_core::Message| {
            let seq = u32::from_le_bytes(m.payload[..4].try_into().unwrap());
            let fill = (seq % 251) as u8 ^ m.from as u8;
            assert!(m.payload[4..].iter().all(|b| *b == fill), "message intact");
            handled_tx
                .send((m.from, seq, thread::current().id()))
                .unwrap();
            None
        })));
    // Every 40th message is fragmented.
    let len = |seq: u32| match seq % 40 {
        0 => 40_000,
        _ => 16 + seq as usize % 64,
    };
    let senders: Vec<_> = [0usize, 2]
        .into_iter()
        .map(|from| {
            let t = Arc::clone(&ranks[from].t);
            thread::spawn(move || {
                for seq in 0..MESSAGES {
                    let mut msg = vec![(seq % 251) as u8 ^ from as u8; len(seq)];
                    msg[..4].copy_from_slice(&seq.to_le_bytes());
                    t.send(1, &msg).unwrap();
                }
            })
        })
        .collect();
    let poller = thread::current().id();
    let mut next = [0u32; 3];
    let mut by_poller = [0u32; 3];
    let deadline = Instant::now() + LIMIT;
    while next[0] < MESSAGES || next[2] < MESSAGES {
        assert!(Instant::now() < deadline, "stuck at {next:?}");
        let mut poll = ranks[1]
            .t
            .poll_answers()
            .expect("the receive queue can be polled");
        for _ in 0..200 {
            poll.receive();
        }
        drop(poll);
        while let Ok((from, seq, by)) = handled_rx.try_recv() {
            assert_eq!(seq, next[from], "order of rank {from}'s messages");
            next[from] += 1;
            by_poller[from] += u32::from(by == poller);
        }
    }
    for sender in senders {
        sender.join().unwrap();
    }
    println!(
        "of {MESSAGES} messages each, the polling thread handled {} from rank 0 (rings), {} from rank 2 (adapter)",
        by_poller[0], by_poller[2]
    );
    shutdown_all(ranks);
}

/// The bytes of page `page` in version `v` (distinct per page and version).
fn page_bytes(v: usize, page: usize) -> Vec<u8> {
    (0..4096)
        .map(|i: usize| (i.wrapping_mul(7) ^ page.wrapping_mul(13) ^ v.wrapping_mul(101)) as u8)
        .collect()
}

fn page_header(v: usize, page: usize) -> Vec<u8> {
    // Headers of varying length, like the DSM's grant / write-back headers.
    let mut h = format!("v{v} page {page}:").into_bytes();
    h.resize(h.len() + (v + page) % 23, b'.');
    h
}

fn expect_page(t: &RdmaTransport, from: usize, v: usize, page: usize) {
    let m = t.recv_timeout(LIMIT).unwrap().expect("page message");
    assert_eq!(m.from, from, "sender of v{v} page {page}");
    let h = page_header(v, page);
    assert_eq!(
        &m.payload[..h.len()],
        &h[..],
        "header of v{v} page {page} from {from}"
    );
    assert!(
        m.payload[h.len()..] == page_bytes(v, page)[..],
        "data of v{v} page {page} from rank {from} differs"
    );
}

/// `send_page` by RDMA WRITE into the landing arena: payloads arrive byte
/// for byte as `header ++ page`, in order with other messages, from two
/// senders at once (one writing, one in `DSM_RDMA_PAGES=send` mode), many
/// pages back to back and the same page over and over (each consumed before
/// the next is sent, as the DSM protocol guarantees).
#[test]
fn pages_by_rdma_write_arrive_whole_and_in_order() {
    if !device_or_skip("pages_by_rdma_write_arrive_whole_and_in_order") {
        return;
    }
    const PAGES: usize = 64;
    let ranks = job_with(3, |r| RdmaOptions {
        landing_pages: PAGES,
        // Rank 2 has no arena and sends its pages by SEND.
        pages: if r == 2 {
            PageMode::Send
        } else {
            PageMode::Write
        },
        ..over_adapter()
    });
    let ts: Vec<Arc<RdmaTransport>> = ranks.iter().map(|r| Arc::clone(&r.t)).collect();
    assert_eq!(ts[1].landing_pages(), PAGES);
    assert_eq!(ts[0].peer_landing_pages(1), PAGES);
    assert_eq!(ts[2].landing_pages(), 0);
    assert_eq!(ts[0].peer_landing_pages(2), 0);

    // Ranks 0 and 2 send rank 1 every page back to back (0 the even pages,
    // 2 the odd ones: never the same page to the same rank at once), each
    // round after rank 1 consumed the previous one; a large fragmented
    // message and a small one after every 8th page keep their place.
    for v in 0..3 {
        let senders: Vec<_> = [0usize, 2]
            .into_iter()
            .map(|me| {
                let t = Arc::clone(&ts[me]);
                thread::spawn(move || {
                    for page in (0..PAGES).filter(|p| p % 2 == me / 2) {
                        t.send_page(1, &page_header(v, page), page, &page_bytes(v, page))
                            .unwrap();
                        if page % 8 < 2 {
                            t.send(1, &vec![page as u8; 40_000]).unwrap();
                            t.send(1, &[me as u8, page as u8]).unwrap();
                        }
                    }
                })
            })
            .collect();
        // What each sender sends, in order: its pages, each followed by the
        // two messages when page % 8 < 2. The two streams interleave freely.
        let expected = |me: usize| -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            for page in (0..PAGES).filter(|p| p % 2 == me / 2) {
                out.push([page_header(v, page), page_bytes(v, page)].concat());
                if page % 8 < 2 {
                    out.push(vec![page as u8; 40_000]);
                    out.push(vec![me as u8, page as u8]);
                }
            }
            out
        };
        let want = [expected(0), Vec::new(), expected(2)];
        let mut next = [0usize; 3];
        for _ in 0..want[0].len() + want[2].len() {
            let m = ts[1].recv_timeout(LIMIT).unwrap().expect("message");
            let i = next[m.from];
            assert!(
                want[m.from].get(i) == Some(&m.payload),
                "round {v}: message {i} from rank {} differs ({} bytes)",
                m.from,
                m.payload.len()
            );
            next[m.from] += 1;
        }
        for s in senders {
            s.join().unwrap();
        }
    }

    // The same page, again and again, each consumed before the next goes;
    // rank 1 answers with the same page into rank 0's arena.
    for v in 0..200 {
        ts[0]
            .send_page(1, &page_header(v, 7), 7, &page_bytes(v, 7))
            .unwrap();
        expect_page(&ts[1], 0, v, 7);
        ts[1]
            .send_page(0, &page_header(v + 1000, 7), 7, &page_bytes(v + 1000, 7))
            .unwrap();
        expect_page(&ts[0], 1, v + 1000, 7);
    }

    // Outside the peer's arena, to a rank without one, and to oneself: SEND.
    ts[0]
        .send_page(1, &page_header(1, PAGES), PAGES, &page_bytes(1, PAGES))
        .unwrap();
    expect_page(&ts[1], 0, 1, PAGES);
    ts[0]
        .send_page(2, &page_header(2, 3), 3, &page_bytes(2, 3))
        .unwrap();
    expect_page(&ts[2], 0, 2, 3);
    ts[0]
        .send_page(0, &page_header(3, 3), 3, &page_bytes(3, 3))
        .unwrap();
    expect_page(&ts[0], 0, 3, 3);

    let (c0, c1, c2) = (
        ts[0].page_counts(),
        ts[1].page_counts(),
        ts[2].page_counts(),
    );
    println!("pages by WRITE / SEND: rank 0 {c0:?}, rank 1 {c1:?}, rank 2 {c2:?}");
    assert_eq!(c0.written, 3 * PAGES as u64 / 2 + 200);
    assert_eq!(c0.sent, 2);
    assert_eq!((c1.written, c1.sent), (200, 0));
    assert_eq!((c2.written, c2.sent), (0, 3 * PAGES as u64 / 2));
    drop(ts);
    shutdown_all(ranks);
}

/// One rank of the cross-process test (run by `cross_process_read_write_send`).
#[test]
#[ignore]
fn cross_process_child() {
    let Ok(rank) = std::env::var("DSM_RDMA_CHILD_RANK") else {
        return;
    };
    let rank: usize = rank.parse().unwrap();
    let ports: Vec<u16> = std::env::var("DSM_RDMA_CHILD_PORTS")
        .unwrap()
        .split(',')
        .map(|p| p.parse().unwrap())
        .collect();
    let peers: Vec<PeerInfo> = ports
        .iter()
        .map(|p| PeerInfo {
            host: "localhost".into(),
            addr: format!("127.0.0.1:{p}").parse().unwrap(),
        })
        .collect();
    let listener = TcpListener::bind(peers[rank].addr).unwrap();
    let boot = Bootstrap {
        rank,
        size: 2,
        peers,
        listener,
        secret: JobSecret::from_hex(&"ab".repeat(32)).unwrap(),
        job_id: "rdma-cross".into(),
    };
    let me = rdma_over(boot);
    if rank == 1 {
        let remote = me.t.remote_regions(0)[0];
        let buf = me.t.device().alloc(8192).unwrap();
        me.t.read(0, &remote, 4096, &buf, 0, 4096).unwrap();
        let want: Vec<u8> = (4096..8192).map(|i| pattern(0, i)).collect();
        assert_eq!(buf.to_vec(0, 4096).unwrap(), want);
        buf.write_bytes(0, &[0x5a; 4096]).unwrap();
        me.t.write(0, &remote, 0, &buf, 0, 4096).unwrap();
        me.t.send(0, b"wrote page 0").unwrap();
        let m = me.t.recv_timeout(LIMIT).unwrap().unwrap();
        assert_eq!(m.payload, b"checked");
    } else {
        let m = me.t.recv_timeout(LIMIT).unwrap().unwrap();
        assert_eq!(m.payload, b"wrote page 0");
        assert!(me
            .region
            .to_vec(0, 4096)
            .unwrap()
            .iter()
            .all(|b| *b == 0x5a));
        me.t.send(1, b"checked").unwrap();
    }
    me.t.shutdown(Duration::from_secs(20)).unwrap();
    println!("cross-process rank {rank}: OK");
}

#[test]
fn cross_process_read_write_send() {
    if !device_or_skip("cross_process_read_write_send") {
        return;
    }
    // Both listeners held until both ports are read: two distinct ports.
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    drop(listeners);
    let ports = format!("{},{}", ports[0], ports[1]);
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(&exe)
                .args(["--exact", "cross_process_child", "--ignored", "--nocapture"])
                .env("DSM_RDMA_CHILD_RANK", rank.to_string())
                .env("DSM_RDMA_CHILD_PORTS", &ports)
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, mut c) in children.into_iter().enumerate() {
        let status = c.wait().unwrap();
        assert!(status.success(), "rank {rank} process: {status}");
    }
}
