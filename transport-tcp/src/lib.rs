//! TCP transport: every pair of ranks is connected once (the higher rank
//! connects to the lower one's listener), each connection authenticated by
//! the job-secret handshake of [`dsm_core::auth`], TCP_NODELAY, frames in the
//! [`dsm_core::wire`] format.
//!
//! One reader thread per peer decodes frames and queues them for `recv`;
//! senders write whole frames under a per-peer lock, so any number of
//! threads may send at once. A peer that closes without its goodbye frame is
//! reported as lost, with its rank and host; so is one from which nothing
//! arrived for the peer timeout (see `liveness`): a thread of each rank
//! sends heartbeats while the application computes.
//!
//! Ranks on the same host send their frames through rings in shared memory
//! instead (`shm`, `ring`; `DSM_SHM=0` keeps them on TCP): the same frames,
//! the same reader loop, and the connection only says when the peer ends.

mod liveness;
mod ring;
mod shm;

pub use shm::{auto_spin, AUTO_SHM_SPIN, ENV_SHM, ENV_SHM_SPIN_US};

use std::io::{BufRead, BufReader, BufWriter, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use dsm_core::auth::{self, JobSecret};
use dsm_core::bootstrap::{Bootstrap, PeerInfo};
use dsm_core::sched::ServiceSched;
use dsm_core::transport::PayloadPool;
use dsm_core::transport::{AnswerPoll, InlineDelivery, PayloadPlacement, TrySent};
use dsm_core::wire::{self, WireError};
use dsm_core::{Message, Rank, Transport, TransportError};
use liveness::Liveness;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::MsgFlags;

const KIND_DATA: u8 = 1;
const KIND_GOODBYE: u8 = 2;
/// A heartbeat: no payload, only proof that the sender's process runs.
const KIND_ALIVE: u8 = 3;
/// At most this many unauthenticated connections are handled at once; more
/// are closed immediately, so a port scan cannot exhaust threads.
const MAX_PENDING_HANDSHAKES: usize = 64;
const IDENT_PREFIX: &str = "dsm-tcp rank ";

/// Environment variable: seconds after which a silent peer (dead link, host
/// gone without closing its connections) is reported as lost.
pub const ENV_PEER_TIMEOUT: &str = "DSM_PEER_TIMEOUT";
/// Default for [`TcpOptions::peer_timeout`].
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(20);
/// Bounds accepted for `DSM_PEER_TIMEOUT` (keepalive works in whole seconds).
const PEER_TIMEOUT_RANGE: (f64, f64) = (1.0, 3600.0);

/// Settings of a [`TcpTransport`]: timeouts, message size limit and where
/// its receive threads run. [`TcpOptions::default`] reads the environment.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// How long connecting the whole job may take.
    pub connect_timeout: Duration,
    /// How long one connection may take to authenticate.
    pub handshake_timeout: Duration,
    /// Largest message accepted from a peer (bytes).
    pub max_message: usize,
    /// A peer is reported as `PeerLost` when nothing arrived from it for
    /// this long (every rank sends heartbeats meanwhile, see `liveness`),
    /// or when its connection acknowledged nothing for this long (TCP
    /// keepalive plus TCP_USER_TIMEOUT): a stopped process, a cut link or a
    /// vanished host is detected even when neither side has anything to send.
    pub peer_timeout: Duration,
    /// CPU the receive threads are pinned to: the rank's engine CPU, so a
    /// received message reaches the engine by a wake-up on the same CPU
    /// (`None`: not pinned).
    pub receiver_cpu: Option<usize>,
    /// How the receive threads ask to be scheduled (see `dsm_core::sched`).
    pub receiver_sched: ServiceSched,
    /// Ranks on the same host talk through rings in shared memory
    /// (`DSM_SHM`, default on) rather than loopback TCP.
    pub shared_memory: bool,
    /// How long a ring's reader polls before it sleeps (`DSM_SHM_SPIN_US`);
    /// `None`: [`shm::auto_spin`] for the ranks on this host.
    pub shm_spin: Option<Duration>,
}

/// A bad value in the transport's environment settings.
#[derive(Debug, thiserror::Error)]
#[error("{name}={value:?}: {why}")]
pub struct OptionsError {
    /// The environment variable, e.g. `DSM_PEER_TIMEOUT`.
    pub name: &'static str,
    /// Its value as set.
    pub value: String,
    /// What is wrong with the value.
    pub why: String,
}

/// Parses a `DSM_PEER_TIMEOUT` value (seconds, fractions allowed).
pub fn parse_peer_timeout(text: &str) -> Result<Duration, OptionsError> {
    let bad = |why: String| OptionsError {
        name: ENV_PEER_TIMEOUT,
        value: text.to_string(),
        why,
    };
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| bad("expected a number of seconds".into()))?;
    let (lo, hi) = PEER_TIMEOUT_RANGE;
    if !(lo..=hi).contains(&secs) {
        return Err(bad(format!("must be between {lo} and {hi} seconds")));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl TcpOptions {
    /// The defaults, with `DSM_PEER_TIMEOUT`, `DSM_SHM` and
    /// `DSM_SHM_SPIN_US` applied when set.
    pub fn from_env() -> Result<Self, OptionsError> {
        let mut opts = TcpOptions::builtin();
        if let Ok(text) = std::env::var(ENV_PEER_TIMEOUT) {
            if !text.trim().is_empty() {
                opts.peer_timeout = parse_peer_timeout(&text)?;
            }
        }
        opts.shared_memory = shm::enabled_from_env()?;
        opts.shm_spin = shm::spin_from_env()?;
        Ok(opts)
    }

    /// The defaults, ignoring the environment.
    pub fn builtin() -> Self {
        TcpOptions {
            connect_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_message: 256 << 20,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            receiver_cpu: None,
            receiver_sched: ServiceSched::Auto,
            shared_memory: true,
            shm_spin: None,
        }
    }
}

impl Default for TcpOptions {
    /// [`TcpOptions::from_env`]; a bad setting is reported on stderr and
    /// the built-in defaults used instead (`dsm::init` refuses it).
    fn default() -> Self {
        TcpOptions::from_env().unwrap_or_else(|e| {
            eprintln!("dsm: ignoring {e}; using the built-in defaults");
            TcpOptions::builtin()
        })
    }
}

/// Keepalive and user timeout so that a silent peer fails within `timeout`:
/// the first probe after half of it idle, three more spread over the rest;
/// TCP_USER_TIMEOUT ends the connection once nothing was acknowledged for
/// `timeout`, whether data or probes are outstanding.
fn set_peer_timeout(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    let secs = timeout.as_secs_f64();
    let idle = Duration::from_secs_f64((secs / 2.0).max(1.0));
    let interval = Duration::from_secs_f64((secs / 6.0).max(1.0));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(3);
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(timeout))
}

type Inbox = (
    Sender<Result<Message, TransportError>>,
    Receiver<Result<Message, TransportError>>,
);

struct Peer {
    writer: Mutex<PeerWriter>,
    /// The same socket, to shut down while a writer may hold the lock
    /// (blocked on a peer that stopped reading).
    socket: TcpStream,
}

/// Where a peer's frames go: its connection, or the ring of a co-located
/// pair.
enum Link {
    Tcp(BufWriter<TcpStream>),
    Ring(ring::RingWriter),
}

impl Write for Link {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Tcp(s) => s.write(bytes),
            Link::Ring(r) => r.write(bytes),
        }
    }

    fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Link::Tcp(s) => s.write_vectored(slices),
            Link::Ring(r) => r.write_vectored(slices),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Link::Tcp(s) => s.flush(),
            Link::Ring(r) => r.flush(),
        }
    }
}

impl Link {
    /// One attempt at sending `frame` that never waits: the bytes taken.
    fn send_now(&mut self, frame: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Link::Tcp(s) => send_now(s.get_ref(), frame),
            Link::Ring(r) => {
                let taken = r.write_slices_now(frame);
                r.publish();
                Ok(taken)
            }
        }
    }

    /// Nothing written and kept back (every writer flushes its frame).
    fn nothing_buffered(&self) -> bool {
        match self {
            Link::Tcp(s) => s.buffer().is_empty(),
            Link::Ring(_) => true,
        }
    }
}

/// The sending side of a connection.
struct PeerWriter {
    link: Link,
    /// The end of a message `try_send_parts` could write only part of:
    /// written before anything else.
    unfinished: Vec<u8>,
}

impl PeerWriter {
    /// Writes the end of a message left unfinished, waiting as needed.
    fn finish(&mut self) -> std::io::Result<()> {
        if !self.unfinished.is_empty() {
            self.link.write_all(&self.unfinished)?;
            self.link.flush()?;
            self.unfinished.clear();
        }
        Ok(())
    }

    /// Writes as much of an unfinished message's end as the socket takes
    /// now; true when nothing is left.
    fn try_finish(&mut self) -> std::io::Result<bool> {
        if self.unfinished.is_empty() {
            return Ok(true);
        }
        let frame = [IoSlice::new(&self.unfinished)];
        let written = self.link.send_now(&frame)?;
        self.unfinished.drain(..written);
        Ok(self.unfinished.is_empty())
    }
}

/// One `sendmsg` that never waits: the bytes the socket took (0 when it
/// had no room, or no kernel memory for the call, in which case a thread
/// that may wait sends them instead).
fn send_now(stream: &TcpStream, frame: &[IoSlice<'_>]) -> std::io::Result<usize> {
    let flags = (MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL).bits();
    let socket = socket2::SockRef::from(stream);
    loop {
        match socket.send_vectored_with_flags(frame, flags) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(0),
            Err(e)
                if matches!(
                    nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                    nix::errno::Errno::EMSGSIZE
                        | nix::errno::Errno::ENOBUFS
                        | nix::errno::Errno::ENOMEM
                ) =>
            {
                return Ok(0)
            }
            Err(e) => return Err(e),
        }
    }
}

/// Counts goodbyes received so `shutdown` can wait for every peer's.
struct Goodbyes {
    count: Mutex<usize>,
    arrived: Condvar,
}

/// The TCP [`Transport`] of one rank: an authenticated connection to every
/// other rank, a reader thread per peer and a heartbeat thread. Built by
/// [`TcpTransport::connect`].
pub struct TcpTransport {
    rank: Rank,
    peers_info: Vec<PeerInfo>,
    peers: Vec<Option<Peer>>,
    inbox: Inbox,
    goodbyes: Arc<Goodbyes>,
    /// Buffers the reader threads receive large messages into.
    payloads: Arc<PayloadPool>,
    /// The consumer's handler the reader threads offer each message to.
    inline: Arc<OnceLock<InlineDelivery>>,
    /// The consumer's choice of where received bytes land.
    placement: Arc<OnceLock<PayloadPlacement>>,
    /// Set when a peer's writer may hold the end of an unfinished message.
    unfinished: AtomicBool,
    max_message: usize,
    shut_down: AtomicBool,
    /// When each peer was last heard from.
    liveness: Arc<Liveness>,
    peer_timeout: Duration,
    /// The peers whose frames go through rings in shared memory.
    shared_memory: Vec<bool>,
    /// Their rings' frames, which waiting threads may read themselves.
    ring_intakes: Vec<Arc<RingIntake>>,
}

fn setup_err(msg: impl Into<String>) -> TransportError {
    TransportError::Setup(msg.into())
}

fn ident_for(rank: Rank) -> Vec<u8> {
    format!("{IDENT_PREFIX}{rank}").into_bytes()
}

fn rank_from_ident(ident: &[u8]) -> Option<Rank> {
    std::str::from_utf8(ident)
        .ok()?
        .strip_prefix(IDENT_PREFIX)?
        .parse()
        .ok()
}

impl TcpTransport {
    /// Connects this rank to every other rank of the job described by `boot`.
    pub fn connect(boot: Bootstrap, opts: &TcpOptions) -> Result<Arc<Self>, TransportError> {
        let Bootstrap {
            rank,
            size,
            peers: peers_info,
            listener,
            secret,
            ..
        } = boot;
        let deadline = Instant::now() + opts.connect_timeout;

        // Higher ranks connect to us; accept them in the background while we
        // connect to the lower ones.
        let expected_higher = size - rank - 1;
        let (acc_tx, acc_rx) = crossbeam_channel::unbounded();
        let acceptor = {
            let secret = secret.clone();
            let handshake_timeout = opts.handshake_timeout;
            thread::Builder::new()
                .name("dsm-tcp-accept".into())
                .spawn(move || {
                    accept_loop(
                        listener,
                        rank,
                        size,
                        expected_higher,
                        &secret,
                        handshake_timeout,
                        deadline,
                        acc_tx,
                    )
                })
                .map_err(|e| setup_err(format!("spawning the acceptor: {e}")))?
        };

        let mut streams: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        for (lower, info) in peers_info.iter().enumerate().take(rank) {
            let stream = connect_to(lower, info, rank, &secret, opts.handshake_timeout, deadline)?;
            streams[lower] = Some(stream);
        }
        let accepted = acceptor
            .join()
            .map_err(|_| setup_err("the acceptor thread panicked"))?;
        accepted?;
        for (higher, stream) in acc_rx.try_iter() {
            streams[higher] = Some(stream);
        }
        let mut rings = shm::negotiate(
            rank,
            &peers_info,
            &mut streams,
            opts.shared_memory,
            opts.shm_spin,
        )?;
        let shared_memory: Vec<bool> = rings.iter().map(Option::is_some).collect();

        let inbox: Inbox = crossbeam_channel::unbounded();
        let goodbyes = Arc::new(Goodbyes {
            count: Mutex::new(0),
            arrived: Condvar::new(),
        });
        let max_frame = u32::try_from(opts.max_message).unwrap_or(u32::MAX);
        let (receiver_cpu, receiver_sched) = (opts.receiver_cpu, opts.receiver_sched);
        let payloads = Arc::new(PayloadPool::default());
        let inline = Arc::new(OnceLock::new());
        let placement = Arc::new(OnceLock::new());
        let liveness = Arc::new(Liveness::new(size, rank, opts.peer_timeout));
        let mut peers = Vec::with_capacity(size);
        let mut ring_intakes = Vec::new();
        for (peer_rank, stream) in streams.into_iter().enumerate() {
            let Some(stream) = stream else {
                peers.push(None);
                continue;
            };
            let io = |e: std::io::Error| {
                setup_err(format!(
                    "configuring the connection to rank {peer_rank}: {e}"
                ))
            };
            stream.set_nodelay(true).map_err(io)?;
            set_peer_timeout(&stream, opts.peer_timeout).map_err(io)?;
            stream.set_read_timeout(None).map_err(io)?;
            stream.set_write_timeout(None).map_err(io)?;
            let read_half = stream.try_clone().map_err(io)?;
            let socket = stream.try_clone().map_err(io)?;
            let host = peers_info[peer_rank].host.clone();
            let tx = inbox.0.clone();
            let goodbyes = Arc::clone(&goodbyes);
            let payloads = Arc::clone(&payloads);
            let inline = Arc::clone(&inline);
            let placement = Arc::clone(&placement);
            let liveness = Arc::clone(&liveness);
            let said_goodbye = Arc::new(AtomicBool::new(false));
            let (link, incoming) = match rings[peer_rank].take() {
                Some(shm::Rings {
                    reader,
                    writer,
                    reader_stop,
                    writer_stop,
                }) => {
                    let probe = reader.probe();
                    let said_goodbye = Arc::clone(&said_goodbye);
                    let (tx, liveness, host) = (tx.clone(), Arc::clone(&liveness), host.clone());
                    thread::Builder::new()
                        .name(format!("dsm-shm-watch{peer_rank}"))
                        .spawn(move || {
                            let stops = (&*reader_stop, &*writer_stop);
                            shm::watch_connection(
                                read_half,
                                &probe,
                                stops,
                                &said_goodbye,
                                |reason| {
                                    if liveness.retire(peer_rank) {
                                        let _ = tx.send(Err(TransportError::PeerLost {
                                            rank: peer_rank,
                                            host,
                                            reason,
                                        }));
                                    }
                                },
                            )
                        })
                        .map_err(|e| setup_err(format!("spawning a watcher: {e}")))?;
                    (Link::Ring(writer), Incoming::Ring(reader))
                }
                None => (
                    Link::Tcp(BufWriter::with_capacity(64 << 10, stream)),
                    Incoming::Tcp(read_half),
                ),
            };
            let delivery = Delivery {
                inbox: tx,
                inline,
                placement,
                payloads,
                liveness,
            };
            let ends = Ends {
                host,
                goodbyes,
                said_goodbye,
            };
            // A ring's frames are shared with the threads that poll it.
            let read: Box<dyn FnOnce() + Send> = match incoming {
                Incoming::Ring(reader) => {
                    let intake = Arc::new(RingIntake {
                        probe: reader.probe(),
                        frames: Mutex::new(Frames::new(
                            reader, 0, peer_rank, max_frame, delivery, ends,
                        )),
                    });
                    ring_intakes.push(Arc::clone(&intake));
                    Box::new(move || intake.serve())
                }
                Incoming::Tcp(stream) => {
                    Box::new(move || read_loop(stream, peer_rank, max_frame, delivery, ends))
                }
            };
            thread::Builder::new()
                .name(format!("dsm-tcp-rx{peer_rank}"))
                .spawn(move || {
                    dsm_core::sched::enter_service_thread(receiver_cpu, receiver_sched);
                    read();
                })
                .map_err(|e| setup_err(format!("spawning a reader: {e}")))?;
            peers.push(Some(Peer {
                writer: Mutex::new(PeerWriter {
                    link,
                    unfinished: Vec::new(),
                }),
                socket,
            }));
        }
        let transport = Arc::new(TcpTransport {
            rank,
            peers_info,
            peers,
            inbox,
            goodbyes,
            payloads,
            inline,
            placement,
            unfinished: AtomicBool::new(false),
            max_message: opts.max_message,
            shut_down: AtomicBool::new(false),
            liveness,
            peer_timeout: opts.peer_timeout,
            shared_memory,
            ring_intakes,
        });
        let watched = Arc::downgrade(&transport);
        thread::Builder::new()
            .name("dsm-tcp-alive".into())
            .spawn(move || watch_peers(watched))
            .map_err(|e| setup_err(format!("spawning the heartbeat thread: {e}")))?;
        Ok(transport)
    }

    /// Sends `peer` a heartbeat unless that would wait: a peer whose
    /// socket is full has data on its way, or is the one not reading.
    fn send_heartbeat(&self, to: Rank) -> Result<(), TransportError> {
        let Ok(peer) = self.peer(to) else {
            return Ok(());
        };
        let mut w = match peer.writer.try_lock() {
            Ok(w) => w,
            // Another thread is writing to it: that proves as much.
            Err(TryLockError::WouldBlock) => return Ok(()),
            Err(TryLockError::Poisoned(_)) => {
                return Err(self.lost(to, "a sender panicked mid-frame"))
            }
        };
        // Checked under the lock `shutdown` takes to say goodbye: nothing
        // may follow a goodbye.
        if self.shut_down.load(Ordering::SeqCst) {
            return Ok(());
        }
        let sent = w.try_finish().and_then(|done| {
            if !done {
                return Ok(());
            }
            let header = wire::header_for(KIND_ALIVE, &[])?.encode();
            let written = w.link.send_now(&[IoSlice::new(&header)])?;
            if written > 0 && written < header.len() {
                w.unfinished.extend_from_slice(&header[written..]);
            }
            Ok(())
        });
        if !w.unfinished.is_empty() {
            // Sent by the next writer, `finish_sends`, or the next beat.
            self.unfinished.store(true, Ordering::SeqCst);
        }
        sent.map_err(|e| self.lost(to, format!("send failed: {e}")))
    }

    /// Reports `peer` lost for its silence, once, and shuts its connection
    /// so that no thread stays blocked writing to it.
    fn declare_unresponsive(&self, peer: Rank, silence: Duration) {
        if !self.liveness.retire(peer) {
            return;
        }
        let reason = liveness::not_responding(silence, self.peer_timeout);
        tracing::debug!("rank {}: rank {peer}: {reason}", self.rank);
        let _ = self.inbox.0.send(Err(self.lost(peer, reason)));
        if let Ok(p) = self.peer(peer) {
            let _ = p.socket.shutdown(Shutdown::Both);
        }
    }

    fn lost(&self, rank: Rank, reason: impl ToString) -> TransportError {
        TransportError::PeerLost {
            rank,
            host: self.peers_info[rank].host.clone(),
            reason: reason.to_string(),
        }
    }

    fn write_to(&self, to: Rank, kind: u8, parts: &[&[u8]]) -> Result<(), TransportError> {
        let peer = self.peer(to)?;
        // A poisoned lock means another sender panicked mid-frame: the stream
        // may hold half a frame, so the connection cannot be used any more.
        let mut w = peer
            .writer
            .lock()
            .map_err(|_| self.lost(to, "a sender panicked mid-frame"))?;
        w.finish()
            .and_then(|_| wire::write_frame_parts(&mut w.link, kind, parts))
            .and_then(|_| w.link.flush())
            .map_err(|e| self.lost(to, format!("send failed: {e}")))
    }

    fn peer(&self, to: Rank) -> Result<&Peer, TransportError> {
        let size = self.size();
        self.peers
            .get(to)
            .ok_or(TransportError::NoSuchRank { rank: to, size })?
            .as_ref()
            .ok_or(TransportError::NoSuchRank { rank: to, size })
    }

    /// Checks a message about to be sent: its size, and that the transport
    /// is still up.
    fn check_send(&self, parts: &[&[u8]]) -> Result<(), TransportError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.max_message {
            return Err(TransportError::TooLarge {
                len,
                max: self.max_message,
            });
        }
        if self.shut_down.load(Ordering::SeqCst) {
            return Err(TransportError::Shutdown);
        }
        Ok(())
    }

    /// Loops a message back to this rank's own inbox.
    fn send_to_self(&self, parts: &[&[u8]]) -> Result<(), TransportError> {
        let payload = parts.concat();
        self.inbox
            .0
            .send(Ok(Message {
                from: self.rank,
                payload,
            }))
            .map_err(|_| TransportError::Shutdown)
    }
}

#[allow(clippy::too_many_arguments)]
fn accept_loop(
    listener: TcpListener,
    my_rank: Rank,
    size: usize,
    expected: usize,
    secret: &JobSecret,
    handshake_timeout: Duration,
    deadline: Instant,
    out: Sender<(Rank, TcpStream)>,
) -> Result<(), TransportError> {
    if expected == 0 {
        return Ok(());
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| setup_err(format!("listener: {e}")))?;
    let (done_tx, done_rx) =
        crossbeam_channel::unbounded::<(SocketAddr, Result<(Rank, TcpStream), String>)>();
    // A finished handshake also writes a byte here, so the poll below
    // returns at once instead of at its next step.
    let (woken, wake) = std::os::unix::net::UnixStream::pair()
        .and_then(|(r, w)| r.set_nonblocking(true).map(|()| (r, Arc::new(w))))
        .map_err(|e| setup_err(format!("wake-up socket pair: {e}")))?;
    let pending = Arc::new(AtomicUsize::new(0));
    let mut connected = vec![false; size];
    let mut count = 0;
    while count < expected {
        let now = Instant::now();
        if now >= deadline {
            let missing: Vec<String> = (my_rank + 1..size)
                .filter(|r| !connected[*r])
                .map(|r| r.to_string())
                .collect();
            return Err(setup_err(format!(
                "rank(s) {} did not connect to rank {my_rank} in time",
                missing.join(", ")
            )));
        }
        // Wait for a new connection or a finished handshake, in short steps.
        let step = (deadline - now).min(Duration::from_millis(50));
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(woken.as_fd(), PollFlags::POLLIN),
        ];
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(step).unwrap_or(PollTimeout::MAX),
        );
        let mut drained = [0u8; 64];
        while matches!((&woken).read(&mut drained), Ok(n) if n > 0) {}
        loop {
            match listener.accept() {
                Ok((stream, addr)) => {
                    if pending.load(Ordering::SeqCst) >= MAX_PENDING_HANDSHAKES {
                        tracing::warn!(
                            "refused connection from {addr}: too many pending handshakes"
                        );
                        continue;
                    }
                    pending.fetch_add(1, Ordering::SeqCst);
                    let secret = secret.clone();
                    let done = done_tx.clone();
                    let wake = Arc::clone(&wake);
                    let pending = Arc::clone(&pending);
                    let spawned =
                        thread::Builder::new()
                            .name("dsm-tcp-auth".into())
                            .spawn(move || {
                                let result = authenticate_incoming(
                                    stream,
                                    &secret,
                                    my_rank,
                                    size,
                                    handshake_timeout,
                                );
                                pending.fetch_sub(1, Ordering::SeqCst);
                                let _ = done.send((addr, result));
                                let _ = (&*wake).write(&[1]);
                            });
                    if spawned.is_err() {
                        tracing::warn!("refused connection from {addr}: cannot spawn a thread");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    break;
                }
            }
        }
        for (addr, result) in done_rx.try_iter() {
            match result {
                Ok((rank, stream)) if !connected[rank] => {
                    connected[rank] = true;
                    count += 1;
                    let _ = out.send((rank, stream));
                }
                Ok((rank, _)) => {
                    tracing::warn!(
                        "refused connection from {addr}: rank {rank} is already connected"
                    )
                }
                Err(why) => tracing::warn!("refused connection from {addr}: {why}"),
            }
        }
    }
    // Dropping the listener here closes the port: later connection attempts
    // are refused by the kernel.
    Ok(())
}

fn authenticate_incoming(
    mut stream: TcpStream,
    secret: &JobSecret,
    my_rank: Rank,
    size: usize,
    timeout: Duration,
) -> Result<(Rank, TcpStream), String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let ident = auth::accept(&mut stream, secret).map_err(|e| e.to_string())?;
    match rank_from_ident(&ident) {
        Some(rank) if rank > my_rank && rank < size => Ok((rank, stream)),
        _ => Err(format!(
            "authenticated peer announced an unexpected identity {:?}",
            String::from_utf8_lossy(&ident)
        )),
    }
}

fn connect_to(
    peer: Rank,
    info: &PeerInfo,
    my_rank: Rank,
    secret: &JobSecret,
    handshake_timeout: Duration,
    deadline: Instant,
) -> Result<TcpStream, TransportError> {
    let fail = |why: String| {
        setup_err(format!(
            "rank {my_rank} cannot connect to rank {peer} on {} ({}): {why}",
            info.host, info.addr
        ))
    };
    let mut stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail("timed out".into()));
        }
        match TcpStream::connect_timeout(&info.addr, left) {
            Ok(s) => break s,
            // The listener exists before any rank starts, but be lenient with
            // transient refusals (e.g. a SYN backlog overflow at large scale).
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                thread::sleep(Duration::from_millis(20).min(left));
            }
            Err(e) => return Err(fail(e.to_string())),
        }
    };
    let io = |e: std::io::Error| fail(e.to_string());
    stream
        .set_read_timeout(Some(handshake_timeout))
        .map_err(io)?;
    stream
        .set_write_timeout(Some(handshake_timeout))
        .map_err(io)?;
    auth::connect(&mut stream, secret, &ident_for(my_rank)).map_err(|e| fail(e.to_string()))?;
    Ok(stream)
}

/// Longest message `try_send_parts` takes: a longer one (a run of pages)
/// would often be left part-written and its rest copied aside, where the
/// thread that may wait sends it straight from its pages.
const TRY_SEND_MAX: usize = 64 << 10;

/// Most pieces one `sendmsg` takes (Linux's `UIO_MAXIOV`): a batch of many
/// small messages has more, and is left to the thread that may wait (whose
/// vectored writes go in several calls).
const MAX_IOVECS: usize = 1024;

/// The heartbeat thread: beats to every watched peer each interval and
/// reports the ones silent for the peer timeout. Ends with the transport.
fn watch_peers(transport: Weak<TcpTransport>) {
    let Some(interval) = transport
        .upgrade()
        .map(|t| liveness::heartbeat_interval(t.peer_timeout))
    else {
        return;
    };
    let mut last = Instant::now();
    loop {
        thread::sleep(interval);
        let Some(t) = transport.upgrade() else { return };
        if t.shut_down.load(Ordering::SeqCst) {
            return;
        }
        // Woken far later than asked: this process was stopped or starved,
        // so its readers could not hear anyone either.
        if last.elapsed() > 3 * interval {
            t.liveness.forgive();
        }
        last = Instant::now();
        for peer in 0..t.size() {
            if t.liveness.watched(peer) {
                if let Err(e) = t.send_heartbeat(peer) {
                    tracing::debug!("rank {}: heartbeat to rank {peer}: {e}", t.rank);
                }
            }
        }
        for (peer, silence) in t.liveness.silent() {
            t.declare_unresponsive(peer, silence);
        }
    }
}

/// Where a reader thread hands what it received.
struct Delivery {
    inbox: Sender<Result<Message, TransportError>>,
    /// Offered each message first, once the consumer has set it.
    inline: Arc<OnceLock<InlineDelivery>>,
    /// Asked where each message's bytes go, once the consumer has set it.
    placement: Arc<OnceLock<PayloadPlacement>>,
    payloads: Arc<PayloadPool>,
    liveness: Arc<Liveness>,
}

impl Delivery {
    /// False once the consumer is gone.
    fn message(&self, message: Message) -> bool {
        let message = match self.inline.get() {
            Some(handler) => match handler(message) {
                Some(message) => message,
                None => return true,
            },
            None => message,
        };
        self.inbox.send(Ok(message)).is_ok()
    }

    /// A data frame's `len`-byte payload: read straight into the memory the
    /// consumer's placement gives for it (the payload is then the message
    /// its landing hands back), or else into a pooled buffer.
    fn payload<R: Read>(
        &self,
        reader: &mut BufReader<R>,
        from: Rank,
        len: usize,
    ) -> Result<Vec<u8>, String> {
        let placement = self.placement.get().filter(|p| len > p.head_len);
        let Some(placement) = placement else {
            return wire::read_payload_into(reader, len, self.payloads.take(len))
                .map_err(|e| e.to_string());
        };
        let mut head = [0u8; PayloadPlacement::MAX_HEAD];
        let head = &mut head[..placement.head_len];
        wire::read_exact_into(reader, head).map_err(|e| e.to_string())?;
        let Some(mut landing) = (placement.place)(from, head, len) else {
            return wire::read_rest_into(reader, head, len, self.payloads.take(len))
                .map_err(|e| e.to_string());
        };
        let rest = landing.bytes();
        if rest.len() != len - head.len() {
            return Err(format!(
                "the consumer placed {} bytes of a {len}-byte message after its {}-byte head",
                rest.len(),
                head.len()
            ));
        }
        // What the reader holds already, then the rest straight from the
        // socket: the buffer would add a copy of every byte through it.
        let buffered = reader.buffer();
        let early = buffered.len().min(rest.len());
        rest[..early].copy_from_slice(&buffered[..early]);
        reader.consume(early);
        wire::read_exact_into(reader.get_mut(), &mut rest[early..]).map_err(|e| e.to_string())?;
        Ok(landing.landed())
    }
}

/// What a reader reads: the connection, or a co-located pair's ring.
enum Incoming {
    Tcp(TcpStream),
    Ring(ring::RingReader),
}

/// How a reader's stream ends: the peer's host (for a loss), the goodbye
/// count `shutdown` waits on, and the flag the ring's watcher reads.
struct Ends {
    host: String,
    goodbyes: Arc<Goodbyes>,
    said_goodbye: Arc<AtomicBool>,
}

/// The frames of one peer's stream, read and handed on one at a time: by
/// the peer's receive thread, or for a ring, by a thread polling it while
/// it waits ([`Transport::poll_answers`]).
struct Frames<R: Read> {
    reader: BufReader<R>,
    from: Rank,
    max_frame: u32,
    delivery: Delivery,
    ends: Ends,
    said_goodbye: bool,
    /// Set once the stream ended (and was reported if it had to be).
    ended: bool,
}

impl<R: Read> Frames<R> {
    /// `buffer` bytes of read-ahead: none for a ring, whose bytes are in
    /// memory already (and must stay there for [`Frames::whole_frame_ready`]).
    fn new(
        stream: R,
        buffer: usize,
        from: Rank,
        max_frame: u32,
        delivery: Delivery,
        ends: Ends,
    ) -> Self {
        Frames {
            reader: BufReader::with_capacity(buffer, stream),
            from,
            max_frame,
            delivery,
            ends,
            said_goodbye: false,
            ended: false,
        }
    }

    /// Reported once, unless the heartbeat thread reported the peer first
    /// (and shut the connection, which ends the stream).
    fn report_lost(&mut self, reason: String) {
        self.ended = true;
        if self.delivery.liveness.retire(self.from) {
            let _ = self.delivery.inbox.send(Err(TransportError::PeerLost {
                rank: self.from,
                host: self.ends.host.clone(),
                reason,
            }));
        }
    }

    /// Reads one frame (waiting for it) and hands it on; false once the
    /// stream ended.
    fn next(&mut self) -> bool {
        if self.ended {
            return false;
        }
        let from = self.from;
        let header = match wire::read_header(&mut self.reader, self.max_frame) {
            Ok(h) => h,
            Err(WireError::Closed) if self.said_goodbye => {
                self.ended = true;
                return false;
            }
            Err(WireError::Closed) => {
                self.report_lost(dsm_core::transport::CLOSED_WITHOUT_GOODBYE.into());
                return false;
            }
            Err(e) => {
                self.report_lost(e.to_string());
                return false;
            }
        };
        let liveness = &self.delivery.liveness;
        liveness.heard(from);
        let len = header.len as usize;
        let payload = if header.kind == KIND_DATA && !self.said_goodbye {
            self.delivery.payload(&mut self.reader, from, len)
        } else {
            wire::read_payload_into(&mut self.reader, len, self.delivery.payloads.take(len))
                .map_err(|e| e.to_string())
        };
        let payload = match payload {
            Ok(payload) => payload,
            Err(e) => {
                self.report_lost(e);
                return false;
            }
        };
        // A long payload kept the sender's writer (and its heartbeats) busy.
        self.delivery.liveness.heard(from);
        match header.kind {
            KIND_DATA if !self.said_goodbye => {
                if !self.delivery.message(Message { from, payload }) {
                    self.ended = true;
                    return false;
                }
            }
            KIND_ALIVE if !self.said_goodbye && payload.is_empty() => {}
            KIND_GOODBYE if !self.said_goodbye => {
                self.said_goodbye = true;
                self.ends.said_goodbye.store(true, Ordering::SeqCst);
                self.delivery.liveness.retire(from);
                let goodbyes = &self.ends.goodbyes;
                let mut count = goodbyes.count.lock().unwrap_or_else(|p| p.into_inner());
                *count += 1;
                goodbyes.arrived.notify_all();
            }
            kind => {
                let said = self.said_goodbye;
                self.report_lost(format!(
                    "protocol violation: frame kind {kind} after goodbye={said}"
                ));
                return false;
            }
        }
        true
    }
}

impl Frames<ring::RingReader> {
    /// True when a whole frame is published (it can be read without
    /// waiting), or a malformed header is (reading it reports it).
    fn whole_frame_ready(&self) -> bool {
        let ring = self.reader.get_ref();
        let mut header = [0u8; wire::HEADER_LEN];
        if !ring.peek(&mut header) {
            return false;
        }
        match wire::FrameHeader::decode(&header, self.max_frame) {
            Ok(h) => ring.published() >= (wire::HEADER_LEN + h.len as usize) as u64,
            Err(_) => true,
        }
    }
}

/// A co-located peer's ring and the frames read from it, shared by its
/// receive thread and the threads polling it.
struct RingIntake {
    frames: Mutex<Frames<ring::RingReader>>,
    probe: ring::RingProbe,
}

impl RingIntake {
    /// The receive thread's loop: waits for bytes without holding the
    /// frames (a polling thread may take them meanwhile), then reads while
    /// any are left.
    fn serve(&self) {
        loop {
            let open = self.probe.wait_for_bytes();
            let mut frames = self.frames.lock().unwrap_or_else(|p| p.into_inner());
            // A broken ring: `next` reads what is left, then the end.
            while !open || self.probe.has_bytes() {
                if !frames.next() {
                    return;
                }
            }
            if frames.ended {
                return;
            }
        }
    }

    /// Hands on the whole frames published now, unless the receive thread
    /// is reading them; whether it could look.
    fn take_whole_frames(&self) -> bool {
        let mut frames = match self.frames.try_lock() {
            Ok(frames) => frames,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        // Counted while it reads: the connection's watcher must not take an
        // emptied ring for a handled one before a goodbye read here is.
        self.probe.begin_taking();
        while !frames.ended && frames.whole_frame_ready() {
            frames.next();
        }
        self.probe.end_taking();
        true
    }
}

/// A thread's poll of the rings (see [`Transport::poll_answers`]).
struct RingPoll<'a> {
    rings: &'a [Arc<RingIntake>],
    /// A bit per ring still polled.
    polled: u64,
}

impl AnswerPoll for RingPoll<'_> {
    fn receive(&mut self) {
        for (i, ring) in self.rings.iter().enumerate() {
            let bit = 1u64 << i;
            // A ring whose receive thread is reading is left to it: it may
            // wait in the middle of a frame for a wake-up the poll holds back.
            if self.polled & bit != 0 && ring.probe.has_bytes() && !ring.take_whole_frames() {
                ring.probe.stop_polling();
                self.polled &= !bit;
            }
        }
    }
}

impl Drop for RingPoll<'_> {
    fn drop(&mut self) {
        for (i, ring) in self.rings.iter().enumerate() {
            if self.polled & (1u64 << i) != 0 {
                ring.probe.stop_polling();
            }
        }
    }
}

fn read_loop(stream: TcpStream, from: Rank, max_frame: u32, delivery: Delivery, ends: Ends) {
    let mut frames = Frames::new(stream, 64 << 10, from, max_frame, delivery, ends);
    while frames.next() {}
}

impl Transport for TcpTransport {
    fn rank(&self) -> Rank {
        self.rank
    }

    fn size(&self) -> usize {
        self.peers_info.len()
    }

    fn send_parts(&self, to: Rank, parts: &[&[u8]]) -> Result<(), TransportError> {
        self.check_send(parts)?;
        if to == self.rank {
            return self.send_to_self(parts);
        }
        self.write_to(to, KIND_DATA, parts)
    }

    /// One non-blocking `sendmsg` of the whole frame, when no other thread
    /// is sending to `to` and no earlier message is unfinished; what the
    /// socket did not take is kept for the next writer.
    fn try_send_parts(&self, to: Rank, parts: &[&[u8]]) -> Result<TrySent, TransportError> {
        self.check_send(parts)?;
        if to == self.rank {
            self.send_to_self(parts)?;
            return Ok(TrySent::Sent);
        }
        let peer = self.peer(to)?;
        let mut w = match peer.writer.try_lock() {
            Ok(w) => w,
            Err(TryLockError::WouldBlock) => return Ok(TrySent::WouldWait),
            Err(TryLockError::Poisoned(_)) => {
                return Err(self.lost(to, "a sender panicked mid-frame"))
            }
        };
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if !w.unfinished.is_empty() || len > TRY_SEND_MAX || parts.len() + 1 > MAX_IOVECS {
            return Ok(TrySent::WouldWait);
        }
        // Every writer flushes its frame before it lets go of the lock.
        debug_assert!(w.link.nothing_buffered());
        let header = wire::header_for(KIND_DATA, parts)
            .map_err(|e| self.lost(to, format!("send failed: {e}")))?
            .encode();
        let frame: Vec<IoSlice<'_>> = std::iter::once(&header[..])
            .chain(parts.iter().copied())
            .map(IoSlice::new)
            .collect();
        let total: usize = frame.iter().map(|s| s.len()).sum();
        let written = w
            .link
            .send_now(&frame)
            .map_err(|e| self.lost(to, format!("send failed: {e}")))?;
        if written == 0 {
            return Ok(TrySent::WouldWait);
        }
        if written == total {
            return Ok(TrySent::Sent);
        }
        // The frame is begun: its rest must follow before anything else.
        let mut skip = written;
        for slice in &frame {
            let taken = skip.min(slice.len());
            w.unfinished.extend_from_slice(&slice[taken..]);
            skip -= taken;
        }
        drop(w);
        self.unfinished.store(true, Ordering::SeqCst);
        Ok(TrySent::Started)
    }

    fn finish_sends(&self) -> Result<(), TransportError> {
        // Called before every flush: a plain load when nothing is left
        // (the usual case), no write to the shared flag.
        if !self.unfinished.load(Ordering::SeqCst) || !self.unfinished.swap(false, Ordering::SeqCst)
        {
            return Ok(());
        }
        for (rank, peer) in self.peers.iter().enumerate() {
            let Some(peer) = peer else { continue };
            let mut w = peer
                .writer
                .lock()
                .map_err(|_| self.lost(rank, "a sender panicked mid-frame"))?;
            w.finish()
                .map_err(|e| self.lost(rank, format!("send failed: {e}")))?;
        }
        Ok(())
    }

    fn deliver_inline(&self, handler: InlineDelivery) -> bool {
        self.inline.set(handler).is_ok()
    }

    fn place_payloads(&self, placement: PayloadPlacement) -> bool {
        placement.head_len <= PayloadPlacement::MAX_HEAD && self.placement.set(placement).is_ok()
    }

    fn inbox(&self) -> Receiver<dsm_core::transport::Incoming> {
        self.inbox.1.clone()
    }

    fn recv(&self) -> Result<Message, TransportError> {
        self.inbox.1.recv().map_err(|_| TransportError::Shutdown)?
    }

    fn recv_timeout(&self, timeout: Duration) -> Result<Option<Message>, TransportError> {
        match self.inbox.1.recv_timeout(timeout) {
            Ok(m) => m.map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(TransportError::Shutdown),
        }
    }

    fn poll_answers(&self) -> Option<Box<dyn AnswerPoll + '_>> {
        // Rings past the 64th are left to their receive threads.
        let rings = &self.ring_intakes[..self.ring_intakes.len().min(64)];
        if rings.is_empty() {
            return None;
        }
        for ring in rings {
            ring.probe.start_polling();
        }
        Some(Box::new(RingPoll {
            rings,
            polled: u64::MAX >> (64 - rings.len()),
        }))
    }

    fn shares_memory_with(&self, peer: Rank) -> bool {
        self.shared_memory.get(peer).copied().unwrap_or(false)
    }

    fn recycle(&self, payload: Vec<u8>) {
        self.payloads.give(payload);
    }

    fn shutdown(&self, timeout: Duration) -> Result<(), TransportError> {
        if self.shut_down.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut first_error = None;
        for (rank, peer) in self.peers.iter().enumerate() {
            let Some(peer) = peer else { continue };
            let sent = self.write_to(rank, KIND_GOODBYE, &[]);
            // After the goodbye (on the ring of a co-located pair too).
            if let Ok(_w) = peer.writer.lock() {
                let _ = peer.socket.shutdown(Shutdown::Write);
            }
            if let Err(e) = sent {
                first_error.get_or_insert(e);
            }
        }
        let others = self.size() - 1;
        let deadline = Instant::now() + timeout;
        let mut count = self
            .goodbyes
            .count
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while *count < others {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                first_error.get_or_insert(TransportError::Setup(format!(
                    "only {} of {others} peers said goodbye within {timeout:?}",
                    *count
                )));
                break;
            }
            count = self
                .goodbyes
                .arrived
                .wait_timeout(count, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for TcpTransport {
    /// Closing both directions wakes the reader threads, and peers see the
    /// connection end (as a loss unless `shutdown` said goodbye first). It
    /// goes through the socket's clone, not the writer: a writer blocked on
    /// a peer that stopped reading would hold its lock forever.
    fn drop(&mut self) {
        for peer in self.peers.iter().flatten() {
            let _ = peer.socket.shutdown(Shutdown::Both);
        }
    }
}
