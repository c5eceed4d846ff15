//! `RdmaTransport`: one RC queue pair per peer, messages over SEND/RECV into
//! pre-posted receive buffers, one-sided RDMA READ/WRITE of registered
//! regions. Connection data travels over an already-connected bootstrap
//! transport (e.g. `TcpTransport`).
//!
//! * Messages are cut into fragments of at most `slot_size - 1` bytes, each
//!   with a one-byte header (more / last / goodbye). A per-peer lock keeps the
//!   fragments of one message together; RC delivers them in order.
//! * Receive buffers (`recv_depth` per peer) are reposted as soon as their
//!   bytes are copied out. A receiver out of buffers answers RNR and the
//!   sender's queue pair retries (rnr_retry = infinite): back-pressure, no loss.
//! * Every queue is bounded: send buffers (a pool), send-queue slots per peer
//!   (a semaphore), the inbox (`inbox_capacity` messages).
//! * A completion queue is armed (raises an event on the channel at its
//!   next completion) only by a thread about to sleep on it: while threads
//!   poll, a completion costs no event (soft-RoCE raises it inside the
//!   sender's post) and wakes no one.
//! * Two completion threads, both pinned to one CPU (`DSM_RDMA_POLL_CPU`,
//!   see [`PollCpu`]). The receive thread polls (`DSM_RDMA_SPIN_US`), then
//!   sleeps on its channel. A thread waiting for an answer may poll the
//!   receive queue itself ([`Transport::poll_answers`]): polling and handing
//!   on what it gives is done under one lock (`Shared::receiving`), which
//!   the receive thread never holds while it sleeps, so messages keep their
//!   order; while such a poll lives the receive thread neither polls nor
//!   arms the queue (`Shared::wait_out_pollers`). Send completions are settled by whoever needs one
//!   (`Shared::reap_sends`): a sender out of buffers or send-queue slots, a
//!   caller polling for its own READ or WRITE; the send completion thread
//!   sleeps on its channel only while such a thread waits (`SendWait`), and
//!   otherwise looks every `TICK` for a failed send to report.
//! * A message of up to 256 bytes (`INLINE_BYTES`, when the provider grants
//!   it) travels inline: copied into its SEND at post time, out of no send
//!   buffer.
//! * A reply produced in a receive thread (the consumer's inline handler)
//!   leaves from there when its buffer, send-queue slots and the peer's send
//!   lock are all free, a page by RDMA WRITE included
//!   (`Shared::try_send_page`): no hand-off to another thread.
//! * Pages ([`Transport::send_page`]) move by one-sided RDMA WRITE into the
//!   receiver's *landing arena* (one registered slot of 4096 bytes per page
//!   of the shared space, registered once at connect and announced in the
//!   setup exchange), followed on the same queue pair by a SEND of the
//!   message header with a page marker; `Shared::send_page` explains why
//!   this is race-free (an invariant of the DSM protocol).
//! * A peer is reported lost when a work request to it fails or when the
//!   bootstrap transport reports it lost, unless it said goodbye.
//! * Co-located peers (`DSM_RDMA_LOCAL=shm`, the default): a peer the
//!   bootstrap transport reaches through shared memory on this host
//!   ([`Transport::shares_memory_with`], the TCP transport's rings) gets
//!   every DSM message through it instead of the adapter's loopback; its
//!   queue pair stays connected for one-sided READ/WRITE and the goodbye.
//!   What the bootstrap transport receives is offered to the consumer's
//!   handler in its receive threads, or handed on in order by the
//!   bootstrap watcher (`boot_watch_loop`); `boot_order` keeps the two
//!   from overtaking each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, TrySendError};
use dsm_core::sched::ServiceSched;
use dsm_core::transport::{AnswerPoll, Incoming, InlineDelivery, PayloadPool, TrySent};
use dsm_core::{Message, Rank, Transport, TransportError};

use crate::verbs::{
    self, choose_gid_index, CompletionQueue, Context, MemoryRegion, PortConfig, ProtectionDomain,
    QpCaps, QpEndpoint, QueuePair, Segment, SendOp, VerbsError,
};

const FRAG_MORE: u8 = 1;
const FRAG_LAST: u8 = 2;
const FRAG_GOODBYE: u8 = 3;
/// A message whose page was RDMA-written into the receiver's landing arena:
/// `[FRAG_PAGE][page index: u64 LE][message header]`; the message delivered
/// is `header ++ arena[page * 4096 .. + 4096]`.
const FRAG_PAGE: u8 = 4;
/// Bytes of a page (the DSM's page size); the unit of the landing arena.
pub const PAGE_BYTES: usize = dsm_core::PAGE_SIZE;
/// Version 2: the endpoint message carries the landing arena.
const SETUP_MAGIC: &[u8; 8] = b"DSMRDMA2";
const SETUP_ENDPOINT: u8 = 1;
const SETUP_READY: u8 = 2;
/// Send-queue work request ids have the top bit set, receive ids never do.
const SEND_ID_BIT: u64 = 1 << 63;
const TICK: Duration = Duration::from_millis(100);

/// What failed in the RDMA transport. Converts into a [`TransportError`]
/// (a `Transport` error as is, anything else as `TransportError::Setup`).
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// A verbs call failed (no device, a device or queue pair error).
    #[error(transparent)]
    Verbs(#[from] VerbsError),
    /// The bootstrap transport failed, or a peer was lost.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Connecting the queue pairs failed (exchange with peers, threads).
    #[error("connection setup: {0}")]
    Setup(String),
    /// A bad option, environment value or argument (e.g. a range outside
    /// its region).
    #[error("{0}")]
    Invalid(String),
    /// A one-sided operation, or the wait for a send-queue slot, took
    /// longer than `RdmaOptions::op_timeout`.
    #[error("RDMA {op} with rank {rank} did not complete within {timeout:?}")]
    Timeout {
        /// `"READ"` or `"WRITE"`.
        op: &'static str,
        /// The peer the operation targeted.
        rank: Rank,
        /// The limit that passed.
        timeout: Duration,
    },
}

impl From<RdmaError> for TransportError {
    fn from(e: RdmaError) -> Self {
        match e {
            RdmaError::Transport(t) => t,
            other => TransportError::Setup(other.to_string()),
        }
    }
}

/// Tuning and device choice.
#[derive(Debug, Clone)]
pub struct RdmaOptions {
    /// Device name (default: first with an active port; `DSM_RDMA_DEVICE`).
    pub device: Option<String>,
    /// Port number (default: the device's first active port; `DSM_RDMA_PORT`).
    pub port: Option<u8>,
    /// GID index (default: first IPv4-mapped GID on RoCE; `DSM_RDMA_GID_INDEX`).
    pub gid_index: Option<u8>,
    /// Bytes per receive / send buffer (one fragment, header included).
    pub slot_size: usize,
    /// Receive buffers posted per peer.
    pub recv_depth: usize,
    /// Registered send buffers shared by all peers.
    pub send_buffers: usize,
    /// Largest message (bytes).
    pub max_message: usize,
    /// Messages queued for `recv` before the receive thread stops reposting.
    pub inbox_capacity: usize,
    /// How long connecting may take.
    pub setup_timeout: Duration,
    /// How long one READ / WRITE / buffer wait may take.
    pub op_timeout: Duration,
    /// How long the completion threads poll before sleeping on the
    /// completion channel (`DSM_RDMA_SPIN_US`): lower latency, more CPU.
    pub poll_spin: Duration,
    /// `DSM_RDMA_SPIN_US` unset or `auto`: [`crate::connect_job`] sets
    /// `poll_spin` from the CPUs the host has per co-located rank
    /// ([`auto_poll_spin`]).
    pub poll_spin_auto: bool,
    /// Host names per rank, for error messages (optional).
    pub hosts: Vec<String>,
    /// How pages given to [`Transport::send_page`] travel (`DSM_RDMA_PAGES`).
    pub pages: PageMode,
    /// Pages of this rank's landing arena (the shared space's size in pages;
    /// [`crate::connect_job`] sets it). 0, or `pages: PageMode::Send`: no
    /// arena, peers send our pages by SEND.
    pub landing_pages: usize,
    /// Where the completion threads run (`DSM_RDMA_POLL_CPU`).
    pub poll_cpu: PollCpu,
    /// How they ask to be scheduled (`DSM_SERVICE_SCHED`, like the rank's
    /// other service threads).
    pub poll_sched: ServiceSched,
    /// How messages reach co-located peers (`DSM_RDMA_LOCAL`).
    pub local: LocalPath,
}

/// How messages reach a peer on the same host (`DSM_RDMA_LOCAL=shm|rdma`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LocalPath {
    /// Through the bootstrap transport when it shares memory with the peer
    /// (the TCP transport's rings, `DSM_SHM`); over the adapter otherwise.
    #[default]
    Shm,
    /// Always over the adapter (its loopback for a co-located peer).
    Rdma,
}

/// How page data travels (`DSM_RDMA_PAGES=write|send`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PageMode {
    /// RDMA WRITE into the receiver's landing arena, then a SEND of the
    /// header with a page marker (the default).
    #[default]
    Write,
    /// Header and page together in SEND/RECV messages, like any message.
    Send,
}

/// Which CPU the completion threads are pinned to (`DSM_RDMA_POLL_CPU`):
/// by default the one `DSM_ENGINE_CPU=auto` gives the rank's fault engine,
/// so a rank's hot threads share one CPU and ranks on one machine spread
/// over the CPUs; a spinning poller then never takes time from another
/// rank's engine.
pub type PollCpu = dsm_core::sched::CpuChoice;

/// Pins the calling completion thread as `DSM_RDMA_POLL_CPU` says.
fn pin_poller(s: &Shared) {
    dsm_core::sched::enter_service_thread(s.opts.poll_cpu.for_rank(s.rank), s.opts.poll_sched);
}

impl Default for RdmaOptions {
    fn default() -> Self {
        RdmaOptions {
            device: None,
            port: None,
            gid_index: None,
            slot_size: 16 << 10,
            recv_depth: 64,
            send_buffers: 64,
            max_message: 256 << 20,
            inbox_capacity: 1 << 16,
            setup_timeout: Duration::from_secs(60),
            op_timeout: Duration::from_secs(30),
            poll_spin: SHARED_CPU_POLL_SPIN,
            poll_spin_auto: true,
            hosts: Vec::new(),
            pages: PageMode::default(),
            landing_pages: 0,
            poll_cpu: PollCpu::default(),
            poll_sched: ServiceSched::default(),
            local: LocalPath::default(),
        }
    }
}

/// The completion threads' poll where the host has a spare CPU per rank
/// for them, as HPC nodes dedicate cores to polling (MPI polls all the
/// time): an answer within it costs no wake-up of the thread that lands it.
pub const SPARE_CPU_POLL_SPIN: Duration = Duration::from_millis(1);

/// Their poll where ranks share the CPUs: short, as polling there takes
/// the CPU the ranks need.
pub const SHARED_CPU_POLL_SPIN: Duration = Duration::from_micros(50);

/// The completion threads' poll (`DSM_RDMA_SPIN_US=auto`) for a host running
/// `local_ranks` of the job's ranks: [`SPARE_CPU_POLL_SPIN`] if the process
/// may use two CPUs per local rank (one for the application, one for the
/// service threads), else [`SHARED_CPU_POLL_SPIN`].
pub fn auto_poll_spin(local_ranks: usize) -> Duration {
    if dsm_core::sched::spare_cpu_per_rank(local_ranks) {
        SPARE_CPU_POLL_SPIN
    } else {
        SHARED_CPU_POLL_SPIN
    }
}

impl RdmaOptions {
    /// Defaults overridden by the environment:
    ///
    /// | variable | meaning | default |
    /// | --- | --- | --- |
    /// | `DSM_RDMA_DEVICE` | device name, e.g. `rxe0`, `mlx5_0` | first with an active port |
    /// | `DSM_RDMA_PORT` | port number | the device's first active port |
    /// | `DSM_RDMA_GID_INDEX` | GID index | first IPv4-mapped GID on RoCE |
    /// | `DSM_RDMA_SPIN_US` | µs the receive completion thread polls before sleeping (the send completion thread too, while a thread waits for a send completion, and the caller of a READ or WRITE for its own), or `auto` ([`auto_poll_spin`]) | `auto` |
    /// | `DSM_RDMA_PAGES` | `write` (RDMA WRITE into the landing arena) or `send` (SEND/RECV) | `write` |
    /// | `DSM_RDMA_POLL_CPU` | `auto` (rank mod CPUs), `none`, or a CPU number | `auto` |
    /// | `DSM_RDMA_LOCAL` | co-located peers: `shm` (through the bootstrap transport's shared memory when it has it, `DSM_SHM`) or `rdma` (the adapter's loopback) | `shm` |
    /// | `DSM_SERVICE_SCHED` | `auto` (completion threads `SCHED_FIFO` 1 where permitted) or `fair` | `auto` |
    pub fn from_env() -> Result<Self, RdmaError> {
        Self::from_lookup(|n| std::env::var(n).ok())
    }

    /// [`RdmaOptions::from_env`] over any source of variables.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, RdmaError> {
        let mut o = RdmaOptions::default();
        let var = |n: &str| lookup(n).filter(|v| !v.trim().is_empty());
        o.device = var(crate::select::ENV_DEVICE);
        let num = |n: &str| -> Result<Option<u8>, RdmaError> {
            var(n)
                .map(|v| {
                    v.trim()
                        .parse()
                        .map_err(|_| RdmaError::Invalid(format!("{n}={v:?} is not a number 0-255")))
                })
                .transpose()
        };
        o.port = num("DSM_RDMA_PORT")?;
        o.gid_index = num("DSM_RDMA_GID_INDEX")?;
        if let Some(v) = var("DSM_RDMA_SPIN_US").filter(|v| v.trim() != "auto") {
            let us: u64 = v.trim().parse().map_err(|_| {
                RdmaError::Invalid(format!(
                    "DSM_RDMA_SPIN_US={v:?}: expected auto or a number of microseconds"
                ))
            })?;
            o.poll_spin = Duration::from_micros(us);
            o.poll_spin_auto = false;
        }
        if let Some(v) = var("DSM_RDMA_PAGES") {
            o.pages = match v.trim().to_ascii_lowercase().as_str() {
                "write" => PageMode::Write,
                "send" => PageMode::Send,
                _ => {
                    return Err(RdmaError::Invalid(format!(
                        "DSM_RDMA_PAGES={v:?}: expected write (the default) or send"
                    )))
                }
            };
        }
        if let Some(v) = var(ServiceSched::ENV) {
            o.poll_sched = ServiceSched::parse(&v).ok_or_else(|| {
                RdmaError::Invalid(format!(
                    "{}={v:?}: expected auto (real-time where permitted) or fair",
                    ServiceSched::ENV
                ))
            })?;
        }
        if let Some(v) = var("DSM_RDMA_LOCAL") {
            o.local = match v.trim().to_ascii_lowercase().as_str() {
                "shm" => LocalPath::Shm,
                "rdma" => LocalPath::Rdma,
                _ => {
                    return Err(RdmaError::Invalid(format!(
                        "DSM_RDMA_LOCAL={v:?}: expected shm (the default) or rdma"
                    )))
                }
            };
        }
        if let Some(v) = var("DSM_RDMA_POLL_CPU") {
            o.poll_cpu = PollCpu::parse(&v).ok_or_else(|| {
                RdmaError::Invalid(format!(
                    "DSM_RDMA_POLL_CPU={v:?}: expected auto, none or a CPU number"
                ))
            })?;
        }
        Ok(o)
    }
}

/// An opened device with its protection domain: register memory here before
/// connecting, so its keys are sent to the peers.
pub struct RdmaDevice {
    ctx: Arc<Context>,
    pd: Arc<ProtectionDomain>,
    port: PortConfig,
}

impl RdmaDevice {
    /// Opens the device and port `opts` name (default: the first active
    /// port), chooses its GID index and allocates a protection domain.
    pub fn open(opts: &RdmaOptions) -> Result<Arc<Self>, RdmaError> {
        let first = verbs::first_active_port(opts.device.as_deref())?;
        let ctx = Context::open(Some(&first.device))?;
        let port = opts.port.unwrap_or(first.port);
        let gid_index = choose_gid_index(&ctx, port, opts.gid_index)?;
        let pd = ProtectionDomain::new(&ctx)?;
        Ok(Arc::new(RdmaDevice {
            ctx,
            pd,
            port: PortConfig { port, gid_index },
        }))
    }

    /// The device's name, e.g. `rxe0`.
    pub fn name(&self) -> &str {
        self.ctx.name()
    }

    /// The port and GID index in use.
    pub fn port(&self) -> PortConfig {
        self.port
    }

    /// A new zeroed, registered buffer.
    pub fn alloc(&self, len: usize) -> Result<Arc<MemoryRegion>, RdmaError> {
        Ok(MemoryRegion::alloc(&self.pd, len)?)
    }

    /// Registers memory the caller owns (e.g. the DSM's shared space).
    ///
    /// # Safety
    /// See [`MemoryRegion::register`]: the range must stay mapped while the
    /// region (and the transport it is given to) is alive.
    pub unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
    ) -> Result<Arc<MemoryRegion>, RdmaError> {
        // SAFETY: the caller's contract is the same as `register`'s.
        Ok(unsafe { MemoryRegion::register(&self.pd, addr, len) }?)
    }
}

/// A region registered by a peer: enough to READ or WRITE it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Start address in the peer's address space.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Remote key the peer registered it with.
    pub rkey: u32,
}

/// A counting semaphore (send-queue slots).
struct Slots {
    /// Free slots, and how many threads wait for one.
    free: Mutex<(usize, usize)>,
    cv: Condvar,
}

impl Slots {
    fn new(n: usize) -> Self {
        Slots {
            free: Mutex::new((n, 0)),
            cv: Condvar::new(),
        }
    }

    fn acquire(&self, until: Instant) -> bool {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while free.0 == 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            free.1 += 1;
            free = self
                .cv
                .wait_timeout(free, left.min(TICK))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            free.1 -= 1;
        }
        free.0 -= 1;
        true
    }

    /// Takes a slot if one is free now.
    fn try_acquire(&self) -> bool {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let taken = free.0 > 0;
        if taken {
            free.0 -= 1;
        }
        taken
    }

    /// Gives a slot back; wakes a waiter only if there is one (a notify is
    /// a system call, paid per send completion otherwise).
    fn release(&self) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.0 += 1;
        if free.1 > 0 {
            self.cv.notify_one();
        }
    }
}

struct Peer {
    qp: Arc<QueuePair>,
    recv_mr: Arc<MemoryRegion>,
    send_lock: Mutex<()>,
    sq: Slots,
    lost: AtomicBool,
    said_goodbye: AtomicBool,
    regions: Vec<RemoteRegion>,
    /// The peer's landing arena (None: it has none, send it pages by SEND).
    arena: Option<RemoteRegion>,
}

/// Inline data asked for per queue pair: a message of up to this many
/// bytes (its fragment header included) is copied into its SEND at post
/// time, out of no send buffer (requests, acknowledgements, grants without
/// page bytes, barrier messages).
const INLINE_BYTES: usize = 256;

enum Pending {
    /// An inline SEND (no pool buffer); it took a send-queue slot.
    Inline { peer: Rank },
    /// The last of `wrs` work requests (a SEND, or an unsignaled WRITE then
    /// a SEND) from the pool buffer `slot`; each took a send-queue slot.
    Buffer { peer: Rank, slot: usize, wrs: usize },
    /// A READ / WRITE whose caller waits on `tx`.
    Waiter {
        peer: Rank,
        tx: Sender<Result<(), VerbsError>>,
    },
}

struct Shared {
    rank: Rank,
    size: usize,
    hosts: Vec<String>,
    opts: RdmaOptions,
    device: Arc<RdmaDevice>,
    peers: Vec<Option<Peer>>,
    local_regions: Vec<Arc<MemoryRegion>>,
    /// Our landing arena: peers RDMA WRITE the pages they send us here.
    arena: Option<Arc<MemoryRegion>>,
    pages_written: AtomicU64,
    pages_sent: AtomicU64,
    send_cq: Arc<CompletionQueue>,
    recv_cq: Arc<CompletionQueue>,
    /// Taken to poll `recv_cq` and hand on what it gives: by the receive
    /// completion thread, or by a thread polling for its answer
    /// ([`Transport::poll_answers`]); never held while sleeping.
    receiving: Mutex<Receiving>,
    send_mr: Arc<MemoryRegion>,
    pool: (Sender<usize>, Receiver<usize>),
    pending: Mutex<HashMap<u64, Pending>>,
    /// Taken to poll `send_cq` and settle what it gives (`reap_sends`): by a
    /// sender that needs a buffer or a send-queue slot, a caller waiting
    /// for its READ or WRITE, or the send completion thread.
    reaping: Mutex<Vec<verbs::Completion>>,
    /// How many threads wait for a send completion right now (see
    /// `SendWait`): while none does, `send_cq` stays unarmed, so a
    /// completion raises no event and wakes no thread.
    send_waiters: Mutex<usize>,
    send_waiters_cv: Condvar,
    /// How many threads poll `recv_cq` for their answers right now
    /// (`RdmaPoll`): while any does, the receive thread leaves the queue to
    /// them, unarmed, and waits on `pollers_cv` for the last to stop.
    pollers: Mutex<usize>,
    pollers_cv: Condvar,
    next_id: AtomicU64,
    inbox: (Sender<Incoming>, Receiver<Incoming>),
    /// Buffers large messages are reassembled into.
    payloads: PayloadPool,
    /// The consumer's handler each received message is offered to first.
    inline: OnceLock<InlineDelivery>,
    goodbyes: Mutex<usize>,
    goodbye_cv: Condvar,
    stop: AtomicBool,
    shut_down: AtomicBool,
    boot: Arc<dyn Transport>,
    /// Peers whose messages go through `boot` (co-located, `LocalPath::Shm`).
    via_boot: Vec<bool>,
    /// Held while a message received by `boot` is handed on (offered to the
    /// consumer's handler, or queued): one at a time, so none overtakes an
    /// earlier one of its sender.
    boot_order: Mutex<()>,
}

/// The RDMA transport. See the module documentation.
pub struct RdmaTransport {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Our queue pair for one peer, its receive buffers and what we told the peer.
type LocalQp = (Arc<QueuePair>, Arc<MemoryRegion>, QpEndpoint);
/// What one peer told us: its endpoint, its regions and its landing arena.
type RemoteInfo = Option<(QpEndpoint, Vec<RemoteRegion>, Option<RemoteRegion>)>;

/// How many pages have moved to peers, by each path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageCounts {
    /// By RDMA WRITE into the peer's landing arena (plus a SEND of the header).
    pub written: u64,
    /// In SEND messages (`DSM_RDMA_PAGES=send`, no arena at the peer, or a
    /// header too large for one buffer).
    pub sent: u64,
}

fn setup(msg: impl Into<String>) -> RdmaError {
    RdmaError::Setup(msg.into())
}

fn psn_seed(rank: Rank, peer: Rank) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos ^ (std::process::id() << 8) ^ ((rank as u32) << 12) ^ (peer as u32).rotate_left(20))
        & 0x00ff_ffff
}

fn encode_endpoint(
    ep: &QpEndpoint,
    regions: &[Arc<MemoryRegion>],
    arena: Option<&Arc<MemoryRegion>>,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(84 + regions.len() * 20);
    v.extend_from_slice(SETUP_MAGIC);
    v.push(SETUP_ENDPOINT);
    v.extend_from_slice(&ep.qpn.to_le_bytes());
    v.extend_from_slice(&ep.psn.to_le_bytes());
    v.extend_from_slice(&ep.lid.to_le_bytes());
    v.extend_from_slice(&ep.gid);
    v.extend_from_slice(&ep.mtu.to_le_bytes());
    v.push(u8::from(ep.ethernet));
    v.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    for r in regions {
        v.extend_from_slice(&r.addr().to_le_bytes());
        v.extend_from_slice(&(r.len() as u64).to_le_bytes());
        v.extend_from_slice(&r.rkey().to_le_bytes());
    }
    // The landing arena, last: length 0 = none.
    let (addr, len, rkey) = arena.map_or((0, 0, 0), |a| (a.addr(), a.len() as u64, a.rkey()));
    v.extend_from_slice(&addr.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&rkey.to_le_bytes());
    v
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
}

fn decode_endpoint(bytes: &[u8]) -> RemoteInfo {
    let mut c = Cursor(bytes.get(SETUP_MAGIC.len() + 1..)?);
    let qpn = u32::from_le_bytes(c.take()?);
    let psn = u32::from_le_bytes(c.take()?);
    let lid = u16::from_le_bytes(c.take()?);
    let gid = c.take::<16>()?;
    let mtu = u32::from_le_bytes(c.take()?);
    let ethernet = c.take::<1>()?[0] != 0;
    let n = u32::from_le_bytes(c.take()?) as usize;
    if n > c.0.len().saturating_sub(20) / 20 {
        return None;
    }
    let mut regions = Vec::with_capacity(n);
    for _ in 0..n {
        regions.push(RemoteRegion {
            addr: u64::from_le_bytes(c.take()?),
            len: u64::from_le_bytes(c.take()?),
            rkey: u32::from_le_bytes(c.take()?),
        });
    }
    let arena = RemoteRegion {
        addr: u64::from_le_bytes(c.take()?),
        len: u64::from_le_bytes(c.take()?),
        rkey: u32::from_le_bytes(c.take()?),
    };
    if !c.0.is_empty() || !arena.len.is_multiple_of(PAGE_BYTES as u64) {
        return None;
    }
    let arena = (arena.len > 0).then_some(arena);
    Some((
        QpEndpoint {
            qpn,
            psn,
            lid,
            gid,
            mtu,
            ethernet,
        },
        regions,
        arena,
    ))
}

/// The byte offset in a landing arena of `arena_pages` pages of the page a
/// `FRAG_PAGE` body names, and the message header that follows the index.
/// Garbage (short body, index out of the arena) is an error naming the
/// problem, never a panic or an access outside the arena.
fn decode_page_marker(body: &[u8], arena_pages: usize) -> Result<(usize, &[u8]), String> {
    let (index, header) = body
        .split_first_chunk::<8>()
        .ok_or_else(|| format!("page marker of {} bytes (needs 8)", body.len()))?;
    let page = u64::from_le_bytes(*index);
    usize::try_from(page)
        .ok()
        .filter(|p| *p < arena_pages)
        .map(|p| (p * PAGE_BYTES, header))
        .ok_or_else(|| {
            format!(
                "page marker names page {page}, outside our landing arena of {arena_pages} pages"
            )
        })
}

/// The SEND that follows a page's WRITE: `[FRAG_PAGE][page u64 LE][header]`.
fn encode_page_marker(page: usize, header: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + header.len());
    v.push(FRAG_PAGE);
    v.extend_from_slice(&(page as u64).to_le_bytes());
    v.extend_from_slice(header);
    v
}

fn ready_message() -> Vec<u8> {
    let mut v = SETUP_MAGIC.to_vec();
    v.push(SETUP_READY);
    v
}

impl RdmaTransport {
    /// Connects every pair of ranks of the job `boot` belongs to. `regions`
    /// (registered on `device`) are announced to every peer, which can then
    /// READ and WRITE them ([`RdmaTransport::remote_regions`]). With
    /// `opts.landing_pages > 0` (and `opts.pages == PageMode::Write`) a
    /// landing arena of that many pages is registered and announced too; if
    /// it cannot be registered (e.g. `RLIMIT_MEMLOCK`), a warning is logged
    /// and peers send this rank its pages by SEND.
    ///
    /// `boot` must not be used by anyone else meanwhile; afterwards the
    /// transport keeps it to learn about lost peers and closes it in `shutdown`.
    pub fn connect(
        boot: Arc<dyn Transport>,
        device: Arc<RdmaDevice>,
        regions: Vec<Arc<MemoryRegion>>,
        opts: &RdmaOptions,
    ) -> Result<Arc<Self>, RdmaError> {
        let rank = boot.rank();
        let size = boot.size();
        let deadline = Instant::now() + opts.setup_timeout;
        if opts.slot_size < 64 || opts.recv_depth == 0 || opts.send_buffers == 0 {
            return Err(RdmaError::Invalid(
                "slot_size >= 64, recv_depth and send_buffers > 0 are required".into(),
            ));
        }
        let peer_count = size.saturating_sub(1).max(1);
        let sq_depth = (opts.send_buffers + 16) as u32;
        let send_cq = CompletionQueue::new(&device.ctx, peer_count * sq_depth as usize)?;
        let recv_cq = CompletionQueue::new(&device.ctx, peer_count * opts.recv_depth)?;
        let send_mr = device.alloc(opts.send_buffers * opts.slot_size)?;
        let arena = match (opts.pages, opts.landing_pages) {
            (PageMode::Send, _) | (_, 0) => None,
            (PageMode::Write, pages) => match pages.checked_mul(PAGE_BYTES) {
                Some(len) => device
                    .alloc(len)
                    .inspect_err(|e| {
                        tracing::warn!(
                            "rank {rank}: no landing arena of {pages} pages ({e}); \
                             peers send this rank its pages by SEND"
                        )
                    })
                    .ok(),
                None => None,
            },
        };

        // Queue pairs with their receive buffers posted, and our endpoints.
        let mut qps: Vec<Option<LocalQp>> = (0..size).map(|_| None).collect();
        for (peer, slot) in qps.iter_mut().enumerate() {
            if peer == rank {
                continue;
            }
            let qp = QueuePair::new_rc(
                &device.pd,
                &send_cq,
                &recv_cq,
                QpCaps {
                    max_send_wr: sq_depth,
                    max_recv_wr: opts.recv_depth as u32,
                    max_inline_data: INLINE_BYTES as u32,
                },
                device.port,
            )?;
            let recv_mr = device.alloc(opts.recv_depth * opts.slot_size)?;
            for s in 0..opts.recv_depth {
                qp.post_recv(
                    recv_id(peer, s),
                    &Segment {
                        region: Arc::clone(&recv_mr),
                        offset: s * opts.slot_size,
                        len: opts.slot_size,
                    },
                )?;
            }
            let ep = verbs::local_endpoint(&device.ctx, &qp, psn_seed(rank, peer))?;
            boot.send(peer, &encode_endpoint(&ep, &regions, arena.as_ref()))?;
            *slot = Some((qp, recv_mr, ep));
        }

        // Collect the peers' endpoints (and early READY messages).
        let mut remote: Vec<RemoteInfo> = (0..size).map(|_| None).collect();
        let mut ready = vec![false; size];
        // What a peer sent on the bootstrap connection after its READY: a
        // peer that had every READY may already run its consumer, whose
        // first messages (a co-located DSM's frame offers) can come before
        // another peer's READY. Delivered first, in order, once set up.
        let mut after_ready: Vec<Message> = Vec::new();
        let mut wait_for = |remote: &mut Vec<RemoteInfo>,
                            ready: &mut Vec<bool>,
                            done: &dyn Fn(&[RemoteInfo], &[bool]) -> bool|
         -> Result<(), RdmaError> {
            while !done(remote, ready) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(setup(format!(
                        "rank {rank}: peers did not send their RDMA connection data within {:?}",
                        opts.setup_timeout
                    )));
                }
                let Some(msg) = boot.recv_timeout(left)? else {
                    continue;
                };
                let bad = || {
                    setup(format!(
                        "rank {rank}: unexpected bootstrap message from rank {} ({} bytes)",
                        msg.from,
                        msg.payload.len()
                    ))
                };
                if msg.from >= size || msg.from == rank {
                    return Err(bad());
                }
                if ready[msg.from] {
                    after_ready.push(msg);
                    continue;
                }
                if !msg.payload.starts_with(SETUP_MAGIC) {
                    return Err(bad());
                }
                match msg.payload.get(SETUP_MAGIC.len()) {
                    Some(&SETUP_ENDPOINT) if remote[msg.from].is_none() => {
                        remote[msg.from] = Some(decode_endpoint(&msg.payload).ok_or_else(bad)?);
                    }
                    Some(&SETUP_READY) if remote[msg.from].is_some() => ready[msg.from] = true,
                    _ => return Err(bad()),
                }
            }
            Ok(())
        };
        let all_endpoints =
            |r: &[RemoteInfo], _: &[bool]| (0..size).all(|p| p == rank || r[p].is_some());
        wait_for(&mut remote, &mut ready, &all_endpoints)?;

        for (peer, slot) in qps.iter().enumerate() {
            if let (Some((qp, _, ep)), Some((rep, _, _))) = (slot, &remote[peer]) {
                qp.connect(ep, rep).map_err(|e| {
                    setup(format!(
                        "rank {rank}: connecting the queue pair to rank {peer}: {e}"
                    ))
                })?;
            }
        }
        // Nobody sends before every queue pair of the job is ready to receive.
        for peer in (0..size).filter(|p| *p != rank) {
            boot.send(peer, &ready_message())?;
        }
        let all_ready = |_: &[RemoteInfo], r: &[bool]| (0..size).all(|p| p == rank || r[p]);
        wait_for(&mut remote, &mut ready, &all_ready)?;

        let peers = qps
            .into_iter()
            .zip(remote)
            .map(|(q, r)| {
                let (qp, recv_mr, _) = q?;
                let (_, regions, arena) = r?;
                Some(Peer {
                    qp,
                    recv_mr,
                    send_lock: Mutex::new(()),
                    sq: Slots::new(sq_depth as usize),
                    lost: AtomicBool::new(false),
                    said_goodbye: AtomicBool::new(false),
                    regions,
                    arena,
                })
            })
            .collect();
        let pool = crossbeam_channel::bounded(opts.send_buffers);
        for s in 0..opts.send_buffers {
            let _ = pool.0.send(s);
        }
        let hosts = (0..size)
            .map(|r| {
                opts.hosts
                    .get(r)
                    .cloned()
                    .unwrap_or_else(|| "?".to_string())
            })
            .collect();
        let via_boot: Vec<bool> = (0..size)
            .map(|r| r != rank && opts.local == LocalPath::Shm && boot.shares_memory_with(r))
            .collect();
        let shared = Arc::new(Shared {
            rank,
            size,
            hosts,
            opts: opts.clone(),
            device,
            peers,
            local_regions: regions,
            arena,
            pages_written: AtomicU64::new(0),
            pages_sent: AtomicU64::new(0),
            send_cq,
            recv_cq,
            receiving: Mutex::new(Receiving {
                partial: vec![Vec::new(); size],
                completions: Vec::with_capacity(RECEIVE_BATCH),
            }),
            send_mr,
            pool,
            pending: Mutex::new(HashMap::new()),
            reaping: Mutex::new(Vec::with_capacity(SEND_REAP_BATCH)),
            send_waiters: Mutex::new(0),
            send_waiters_cv: Condvar::new(),
            pollers: Mutex::new(0),
            pollers_cv: Condvar::new(),
            next_id: AtomicU64::new(0),
            inbox: crossbeam_channel::bounded(opts.inbox_capacity.max(1)),
            goodbyes: Mutex::new(0),
            goodbye_cv: Condvar::new(),
            stop: AtomicBool::new(false),
            shut_down: AtomicBool::new(false),
            payloads: PayloadPool::default(),
            inline: OnceLock::new(),
            via_boot,
            boot_order: Mutex::new(()),
            boot,
        });
        // Before any later bootstrap message can be delivered (no consumer
        // handler yet, no watching thread), so the order holds.
        for message in after_ready {
            shared.deliver(Ok(message));
        }
        if shared.via_boot.iter().any(|v| *v) {
            let weak = Arc::downgrade(&shared);
            let boot_inbox = shared.boot.inbox();
            shared
                .boot
                .deliver_inline(Box::new(move |message| match weak.upgrade() {
                    Some(s) => s.offer_from_boot(message, &boot_inbox),
                    None => Some(message),
                }));
        }
        let mut threads = Vec::new();
        let spawn = |name: &str, f: fn(Arc<Shared>), s: &Arc<Shared>| {
            let s = Arc::clone(s);
            thread::Builder::new()
                .name(name.to_string())
                .spawn(move || f(s))
                .map_err(|e| setup(format!("spawning {name}: {e}")))
        };
        let started = (|| -> Result<(), RdmaError> {
            threads.push(spawn("dsm-rdma-recv", recv_loop, &shared)?);
            threads.push(spawn("dsm-rdma-send", send_completion_loop, &shared)?);
            threads.push(spawn("dsm-rdma-boot", boot_watch_loop, &shared)?);
            Ok(())
        })();
        let out = Arc::new(RdmaTransport {
            shared,
            threads: Mutex::new(threads),
        });
        started?;
        Ok(out)
    }

    /// The device the transport was connected on.
    pub fn device(&self) -> &Arc<RdmaDevice> {
        &self.shared.device
    }

    /// Most bytes of a message (its one-byte fragment header included)
    /// sent inline, copied into the SEND at post time: the least any
    /// peer's queue pair was granted, at most 256 (0: none inline).
    pub fn inline_limit(&self) -> usize {
        self.shared
            .peers
            .iter()
            .flatten()
            .map(|p| p.qp.inline_limit().min(INLINE_BYTES))
            .min()
            .unwrap_or(0)
    }

    /// Pages of this rank's landing arena (0: none; peers send it pages by SEND).
    pub fn landing_pages(&self) -> usize {
        self.shared
            .arena
            .as_ref()
            .map_or(0, |a| a.len() / PAGE_BYTES)
    }

    /// Pages of `rank`'s landing arena, as it announced at connect.
    pub fn peer_landing_pages(&self, rank: Rank) -> usize {
        self.shared
            .peers
            .get(rank)
            .and_then(|p| p.as_ref())
            .and_then(|p| p.arena)
            .map_or(0, |a| (a.len / PAGE_BYTES as u64) as usize)
    }

    /// Pages sent to peers so far, by path.
    pub fn page_counts(&self) -> PageCounts {
        PageCounts {
            written: self.shared.pages_written.load(Ordering::Relaxed),
            sent: self.shared.pages_sent.load(Ordering::Relaxed),
        }
    }

    /// The regions `rank` announced at connection time (ours for our rank).
    pub fn remote_regions(&self, rank: Rank) -> Vec<RemoteRegion> {
        let s = &self.shared;
        if rank == s.rank {
            return s
                .local_regions
                .iter()
                .map(|r| RemoteRegion {
                    addr: r.addr(),
                    len: r.len() as u64,
                    rkey: r.rkey(),
                })
                .collect();
        }
        s.peers
            .get(rank)
            .and_then(|p| p.as_ref())
            .map(|p| p.regions.clone())
            .unwrap_or_default()
    }

    /// RDMA READ: `len` bytes at `remote_offset` of `rank`'s `remote` region
    /// into `local` at `local_offset`; returns once the data is there.
    pub fn read(
        &self,
        rank: Rank,
        remote: &RemoteRegion,
        remote_offset: u64,
        local: &Arc<MemoryRegion>,
        local_offset: usize,
        len: usize,
    ) -> Result<(), RdmaError> {
        self.one_sided(rank, remote, remote_offset, local, local_offset, len, false)
    }

    /// RDMA WRITE: `len` bytes of `local` at `local_offset` into `rank`'s
    /// `remote` region at `remote_offset`; returns once the peer's adapter
    /// acknowledged them.
    pub fn write(
        &self,
        rank: Rank,
        remote: &RemoteRegion,
        remote_offset: u64,
        local: &Arc<MemoryRegion>,
        local_offset: usize,
        len: usize,
    ) -> Result<(), RdmaError> {
        self.one_sided(rank, remote, remote_offset, local, local_offset, len, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn one_sided(
        &self,
        rank: Rank,
        remote: &RemoteRegion,
        remote_offset: u64,
        local: &Arc<MemoryRegion>,
        local_offset: usize,
        len: usize,
        write: bool,
    ) -> Result<(), RdmaError> {
        let s = &self.shared;
        let op_name = if write { "WRITE" } else { "READ" };
        local.check(local_offset, len)?;
        match remote_offset.checked_add(len as u64) {
            Some(end) if end <= remote.len => {}
            _ => {
                return Err(RdmaError::Invalid(format!(
                    "remote range {remote_offset}+{len} is outside the region of {} bytes",
                    remote.len
                )))
            }
        }
        if rank == s.rank {
            // Our own region: a local copy.
            let target = s
                .local_regions
                .iter()
                .find(|r| r.rkey() == remote.rkey && r.addr() == remote.addr)
                .ok_or_else(|| RdmaError::Invalid("no such local region".into()))?;
            let mut buf = vec![0; len];
            let (from, from_off, to, to_off) = if write {
                (local, local_offset, target, remote_offset as usize)
            } else {
                (target, remote_offset as usize, local, local_offset)
            };
            from.read_bytes(from_off, &mut buf)?;
            to.write_bytes(to_off, &buf)?;
            return Ok(());
        }
        let peer = s.peer(rank)?;
        s.check_usable(rank, peer)?;
        let deadline = Instant::now() + s.opts.op_timeout;
        if !s.acquire_sq(peer, deadline) {
            return Err(RdmaError::Timeout {
                op: op_name,
                rank,
                timeout: s.opts.op_timeout,
            });
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let id = s.new_id();
        s.pending_lock()
            .insert(id, Pending::Waiter { peer: rank, tx });
        let remote_addr = remote.addr + remote_offset;
        let op = if write {
            SendOp::RdmaWrite {
                remote_addr,
                rkey: remote.rkey,
            }
        } else {
            SendOp::RdmaRead {
                remote_addr,
                rkey: remote.rkey,
            }
        };
        let seg = Segment {
            region: Arc::clone(local),
            offset: local_offset,
            len,
        };
        if let Err(e) = peer.qp.post_send(id, op, &[seg]) {
            s.pending_lock().remove(&id);
            peer.sq.release();
            return Err(e.into());
        }
        match s.wait_for_completion(&rx, deadline) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(s.lose(rank, format!("RDMA {op_name} failed: {e}")).into()),
            // The request stays in `pending` (and its region in the queue
            // pair) until the device completes or flushes it.
            Err(_) => Err(RdmaError::Timeout {
                op: op_name,
                rank,
                timeout: s.opts.op_timeout,
            }),
        }
    }
}

fn recv_id(peer: Rank, slot: usize) -> u64 {
    ((peer as u64) << 32) | slot as u64
}

impl Shared {
    fn pending_lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_id(&self) -> u64 {
        SEND_ID_BIT | self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn peer(&self, rank: Rank) -> Result<&Peer, TransportError> {
        self.peers
            .get(rank)
            .and_then(|p| p.as_ref())
            .ok_or(TransportError::NoSuchRank {
                rank,
                size: self.size,
            })
    }

    fn lost_error(&self, rank: Rank, reason: impl Into<String>) -> TransportError {
        TransportError::PeerLost {
            rank,
            host: self.hosts.get(rank).cloned().unwrap_or_default(),
            reason: reason.into(),
        }
    }

    fn check_usable(&self, rank: Rank, peer: &Peer) -> Result<(), TransportError> {
        if self.shut_down.load(Ordering::SeqCst) || self.stop.load(Ordering::SeqCst) {
            return Err(TransportError::Shutdown);
        }
        if peer.lost.load(Ordering::SeqCst) {
            return Err(self.lost_error(rank, "the RDMA connection failed earlier"));
        }
        Ok(())
    }

    /// Marks `rank` lost (once, reported in the inbox unless it said goodbye
    /// or we are stopping) and returns the error for the caller.
    fn lose(&self, rank: Rank, reason: String) -> TransportError {
        let err = self.lost_error(rank, reason.clone());
        if let Ok(peer) = self.peer(rank) {
            if !peer.lost.swap(true, Ordering::SeqCst)
                && !peer.said_goodbye.load(Ordering::SeqCst)
                && !self.stop.load(Ordering::SeqCst)
            {
                tracing::warn!("rank {}: lost rank {rank}: {reason}", self.rank);
                let notice = Err(self.lost_error(rank, reason));
                if let Err(TrySendError::Full(notice)) = self.inbox.0.try_send(notice) {
                    // The notice must not be lost (the engine would wait
                    // for that rank forever), nor block this caller (which
                    // may be the thread that drains the inbox): a thread
                    // delivers it once there is room.
                    let inbox = self.inbox.0.clone();
                    let spawned = thread::Builder::new()
                        .name("dsm-rdma-lost".into())
                        .spawn(move || inbox.send(notice));
                    if let Err(e) = spawned {
                        tracing::error!(
                            "rank {}: cannot report the loss of rank {rank}: {e}",
                            self.rank
                        );
                    }
                }
                peer.qp.set_error();
            }
        }
        err
    }

    /// The bootstrap transport, when messages to `to` go through it.
    fn boot_for(&self, to: Rank) -> Option<&Arc<dyn Transport>> {
        self.via_boot
            .get(to)
            .copied()
            .unwrap_or(false)
            .then_some(&self.boot)
    }

    /// A message a co-located peer sent through the bootstrap transport,
    /// in its receive thread: offered to the consumer's handler only when
    /// nothing received by `boot` before it waits to be handed on (in
    /// `boot_inbox`, or in the watcher's hands); otherwise given back to be
    /// queued behind those.
    fn offer_from_boot(
        &self,
        message: Message,
        boot_inbox: &Receiver<Incoming>,
    ) -> Option<Message> {
        let Ok(_order) = self.boot_order.try_lock() else {
            return Some(message);
        };
        if !boot_inbox.is_empty() {
            return Some(message);
        }
        match self.inline.get() {
            Some(handler) => handler(message),
            None => Some(message),
        }
    }

    /// A message received from a peer: offered to the consumer's handler
    /// first, queued if it hands it back.
    fn deliver_received(&self, message: Message) {
        let message = match self.inline.get() {
            Some(handler) => match handler(message) {
                Some(message) => message,
                None => return,
            },
            None => message,
        };
        self.deliver(Ok(message));
    }

    /// Queues for `recv`, waiting while the inbox is full (back-pressure).
    fn deliver(&self, item: Incoming) {
        let mut item = item;
        loop {
            match self.inbox.0.send_timeout(item, TICK) {
                Ok(()) => return,
                Err(SendTimeoutError::Timeout(back)) => {
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    item = back;
                }
                Err(SendTimeoutError::Disconnected(_)) => return,
            }
        }
    }

    /// Where `send_page` can WRITE `page` for `to`: the peer and its arena,
    /// or None when the page must go by SEND (see [`PageCounts::sent`]).
    fn page_target(
        &self,
        to: Rank,
        page: usize,
        header_len: usize,
        data_len: usize,
    ) -> Option<(&Peer, RemoteRegion)> {
        if self.opts.pages != PageMode::Write
            || to == self.rank
            || data_len != PAGE_BYTES
            || PAGE_BYTES + 9 + header_len > self.opts.slot_size
            || PAGE_BYTES + header_len > self.opts.max_message
        {
            return None;
        }
        let peer = self.peer(to).ok()?;
        let arena = peer.arena?;
        let end = (page as u64)
            .checked_add(1)?
            .checked_mul(PAGE_BYTES as u64)?;
        (end <= arena.len).then_some((peer, arena))
    }

    /// `header ++ page` to `to`: the page by RDMA WRITE into `to`'s landing
    /// arena at `page * 4096`, then on the same queue pair (posted together,
    /// one doorbell) a SEND of `[FRAG_PAGE][page][header]`, both out of one
    /// pool buffer (page at its start, marker after it). Falls back to a
    /// plain SEND of `header ++ data` when the peer has no arena (or `page`
    /// is outside it, or the header does not fit one buffer).
    ///
    /// Why the receiver reads the right bytes from its arena slot:
    /// * RC ordering: the receiving adapter places the WRITE's data before it
    ///   completes the SEND posted after it on the same queue pair, and the
    ///   receive thread copies the slot out as soon as it sees that SEND's
    ///   completion (`Shared::landed`), before it hands the message on.
    /// * INVARIANT (of the DSM protocol, relied on here): two page transfers
    ///   of the same page to the same rank are never in flight at once. A
    ///   page moves to a rank as the answer to that rank's request (a grant)
    ///   or as a write-back to the page's home that the home asked for; the
    ///   next transfer of that page to that rank is causally after the
    ///   receiver's engine consumed the previous one (the rank requested
    ///   again, or the home's directory moved on after handling the
    ///   write-back). So no second WRITE into a slot, from any sender, starts
    ///   before the receive thread copied the first one out.
    ///
    /// A sender that broke the invariant could garble only the contents of
    /// the page it sends; the arena is only read through bounds-checked
    /// copies, and a marker naming a page outside it loses that peer.
    fn send_page(
        &self,
        to: Rank,
        header: &[u8],
        page: usize,
        data: &[u8],
    ) -> Result<(), TransportError> {
        let Some((peer, arena)) = self.page_target(to, page, header.len(), data.len()) else {
            if to != self.rank {
                self.pages_sent.fetch_add(1, Ordering::Relaxed);
            }
            return self.send_frame(to, FRAG_LAST, &[header, data]);
        };
        self.check_usable(to, peer)?;
        let _order = peer.send_lock.lock().unwrap_or_else(|p| p.into_inner());
        let slot = match self.take_buffer() {
            Ok(s) => s,
            Err(RecvTimeoutError::Timeout) => {
                return Err(self.lost_error(to, "no send buffer became free (peer not receiving?)"))
            }
            Err(RecvTimeoutError::Disconnected) => return Err(TransportError::Shutdown),
        };
        if !self.acquire_sq_pair(peer, Some(Instant::now() + self.opts.op_timeout)) {
            let _ = self.pool.0.try_send(slot);
            return Err(self.lose(
                to,
                format!("sending page {page} failed: the send queue stayed full"),
            ));
        }
        self.post_page(to, (peer, arena), slot, header, page, data)
    }

    /// `send_page` for a thread that must not wait: only if the peer's send
    /// lock, a send buffer and two send-queue slots are all free at once;
    /// `None` if the page would not go by RDMA WRITE.
    fn try_send_page(
        &self,
        to: Rank,
        header: &[u8],
        page: usize,
        data: &[u8],
    ) -> Option<Result<TrySent, TransportError>> {
        let (peer, arena) = self.page_target(to, page, header.len(), data.len())?;
        if let Err(e) = self.check_usable(to, peer) {
            return Some(Err(e));
        }
        let _order = match peer.send_lock.try_lock() {
            Ok(order) => order,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Some(Ok(TrySent::WouldWait)),
        };
        let Some(slot) = self.try_take_buffer() else {
            return Some(Ok(TrySent::WouldWait));
        };
        if !self.acquire_sq_pair(peer, None) {
            let _ = self.pool.0.try_send(slot);
            return Some(Ok(TrySent::WouldWait));
        }
        Some(
            self.post_page(to, (peer, arena), slot, header, page, data)
                .map(|()| TrySent::Sent),
        )
    }

    /// The two send-queue slots of a page's WRITE and marker SEND: waiting
    /// until `until`, or (`None`) only if both are free now; none held on
    /// failure.
    fn acquire_sq_pair(&self, peer: &Peer, until: Option<Instant>) -> bool {
        let one = || match until {
            Some(until) => self.acquire_sq(peer, until),
            None => self.try_acquire_sq(peer),
        };
        if !one() {
            return false;
        }
        if !one() {
            peer.sq.release();
            return false;
        }
        true
    }

    /// Posts the WRITE of `data` into `to`'s arena slot for `page` and the
    /// SEND of its marker, out of pool buffer `slot`, with two send-queue
    /// slots the caller holds (all given back if posting fails). The caller
    /// holds the peer's send lock.
    fn post_page(
        &self,
        to: Rank,
        (peer, arena): (&Peer, RemoteRegion),
        slot: usize,
        header: &[u8],
        page: usize,
        data: &[u8],
    ) -> Result<(), TransportError> {
        let base = slot * self.opts.slot_size;
        let marker = encode_page_marker(page, header);
        let posted = self
            .send_mr
            .write_bytes(base, data)
            .and_then(|_| self.send_mr.write_bytes(base + PAGE_BYTES, &marker))
            .and_then(|_| {
                let (write_id, send_id) = (self.new_id(), self.new_id());
                self.pending_lock().insert(
                    send_id,
                    Pending::Buffer {
                        peer: to,
                        slot,
                        wrs: 2,
                    },
                );
                let write = Segment {
                    region: Arc::clone(&self.send_mr),
                    offset: base,
                    len: PAGE_BYTES,
                };
                let send = Segment {
                    region: Arc::clone(&self.send_mr),
                    offset: base + PAGE_BYTES,
                    len: marker.len(),
                };
                let op = SendOp::RdmaWrite {
                    remote_addr: arena.addr + (page * PAGE_BYTES) as u64,
                    rkey: arena.rkey,
                };
                peer.qp
                    .post_send_pair((write_id, op, &[write]), (send_id, SendOp::Send, &[send]))
                    .inspect_err(|_| {
                        self.pending_lock().remove(&send_id);
                    })
            });
        if let Err(e) = posted {
            peer.sq.release();
            peer.sq.release();
            let _ = self.pool.0.try_send(slot);
            return Err(self.lose(to, format!("sending page {page} failed: {e}")));
        }
        self.pages_written.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The message a `FRAG_PAGE` body announces: its header, then the page
    /// copied out of our landing arena (see `send_page` for why the slot
    /// holds that page now).
    fn landed(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let arena = self
            .arena
            .as_ref()
            .ok_or("page marker, but this rank has no landing arena")?;
        let (offset, header) = decode_page_marker(body, arena.len() / PAGE_BYTES)?;
        let mut payload = Vec::with_capacity(header.len() + PAGE_BYTES);
        payload.extend_from_slice(header);
        arena
            .append_to(offset, PAGE_BYTES, &mut payload)
            .map_err(|e| e.to_string())?;
        Ok(payload)
    }

    fn send_frame(&self, to: Rank, kind_last: u8, parts: &[&[u8]]) -> Result<(), TransportError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total > self.opts.max_message {
            return Err(TransportError::TooLarge {
                len: total,
                max: self.opts.max_message,
            });
        }
        if to == self.rank {
            if kind_last == FRAG_GOODBYE {
                return Ok(());
            }
            if self.shut_down.load(Ordering::SeqCst) {
                return Err(TransportError::Shutdown);
            }
            self.deliver(Ok(Message {
                from: to,
                payload: parts.concat(),
            }));
            return Ok(());
        }
        let peer = self.peer(to)?;
        if kind_last != FRAG_GOODBYE {
            self.check_usable(to, peer)?;
        } else if peer.lost.load(Ordering::SeqCst) {
            return Err(self.lost_error(to, "the RDMA connection failed earlier"));
        }
        let chunk = self.opts.slot_size - 1;
        let _order = peer.send_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(frame) = self.inline_frame(peer, kind_last, parts) {
            let posted = if self.acquire_sq(peer, Instant::now() + self.opts.op_timeout) {
                self.post_inline(to, peer, frame.bytes())
            } else {
                Err(VerbsError::Invalid("the send queue stayed full".into()))
            };
            return posted.map_err(|e| self.lose(to, format!("send failed: {e}")));
        }
        let mut part = 0;
        let mut off = 0;
        let mut left = total;
        loop {
            let n = left.min(chunk);
            left -= n;
            let header = if left > 0 { FRAG_MORE } else { kind_last };
            let timeout =
                || self.lost_error(to, "no send buffer became free (peer not receiving?)");
            let slot = match self.take_buffer() {
                Ok(s) => s,
                Err(RecvTimeoutError::Timeout) => return Err(timeout()),
                Err(RecvTimeoutError::Disconnected) => return Err(TransportError::Shutdown),
            };
            let base = slot * self.opts.slot_size;
            // Gather `n` bytes of the parts into the buffer after the header.
            let mut filled = 0;
            let mut res = self.send_mr.write_bytes(base, &[header]);
            while res.is_ok() && filled < n {
                let p = parts[part];
                let take = (p.len() - off).min(n - filled);
                res = self
                    .send_mr
                    .write_bytes(base + 1 + filled, &p[off..off + take]);
                filled += take;
                off += take;
                if off == p.len() {
                    part += 1;
                    off = 0;
                }
            }
            // Skip empty parts so the cursor is on the next byte to send.
            while part < parts.len() && parts[part].len() == off {
                part += 1;
                off = 0;
            }
            let posted = res.and_then(|_| {
                if !self.acquire_sq(peer, Instant::now() + self.opts.op_timeout) {
                    return Err(VerbsError::Invalid("the send queue stayed full".into()));
                }
                self.post_buffer(to, peer, slot, n + 1)
            });
            if let Err(e) = posted {
                let _ = self.pool.0.try_send(slot);
                return Err(self.lose(to, format!("send failed: {e}")));
            }
            if left == 0 {
                return Ok(());
            }
        }
    }

    /// `[kind][parts...]` as one frame if it fits the peer's inline limit.
    fn inline_frame(&self, peer: &Peer, kind: u8, parts: &[&[u8]]) -> Option<InlineFrame> {
        let total = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
        if total > peer.qp.inline_limit().min(INLINE_BYTES) {
            return None;
        }
        let mut frame = InlineFrame {
            bytes: [0; INLINE_BYTES],
            len: 1,
        };
        frame.bytes[0] = kind;
        for part in parts {
            frame.bytes[frame.len..frame.len + part.len()].copy_from_slice(part);
            frame.len += part.len();
        }
        Some(frame)
    }

    /// Posts `frame` to `to` as an inline SEND, with a send-queue slot the
    /// caller holds (given back if posting fails).
    fn post_inline(&self, to: Rank, peer: &Peer, frame: &[u8]) -> Result<(), VerbsError> {
        let id = self.new_id();
        self.pending_lock().insert(id, Pending::Inline { peer: to });
        peer.qp.post_send_inline(id, frame).inspect_err(|_| {
            self.pending_lock().remove(&id);
            peer.sq.release();
        })
    }

    /// Posts a SEND of the first `len` bytes of send buffer `slot` to `to`,
    /// whose send-queue slot the caller holds (given back if posting fails).
    fn post_buffer(
        &self,
        to: Rank,
        peer: &Peer,
        slot: usize,
        len: usize,
    ) -> Result<(), VerbsError> {
        let id = self.new_id();
        self.pending_lock().insert(
            id,
            Pending::Buffer {
                peer: to,
                slot,
                wrs: 1,
            },
        );
        let seg = Segment {
            region: Arc::clone(&self.send_mr),
            offset: slot * self.opts.slot_size,
            len,
        };
        peer.qp
            .post_send(id, SendOp::Send, &[seg])
            .inspect_err(|_| {
                self.pending_lock().remove(&id);
                peer.sq.release();
            })
    }

    /// `send_frame` of a message that fits one send buffer, for a thread
    /// that must not wait: only if the peer's send lock, a send buffer and
    /// a send-queue slot are all free at once. Nothing here waits for the
    /// peer: a SEND the peer has no receive posted for is retried by the
    /// adapter, not by this thread.
    fn try_send_frame(&self, to: Rank, parts: &[&[u8]]) -> Result<TrySent, TransportError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if to == self.rank || total > self.opts.max_message {
            return self
                .send_frame(to, FRAG_LAST, parts)
                .map(|()| TrySent::Sent);
        }
        if total + 1 > self.opts.slot_size {
            return Ok(TrySent::WouldWait);
        }
        let peer = self.peer(to)?;
        self.check_usable(to, peer)?;
        let _order = match peer.send_lock.try_lock() {
            Ok(order) => order,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(TrySent::WouldWait),
        };
        if let Some(frame) = self.inline_frame(peer, FRAG_LAST, parts) {
            if !self.try_acquire_sq(peer) {
                return Ok(TrySent::WouldWait);
            }
            return match self.post_inline(to, peer, frame.bytes()) {
                Ok(()) => Ok(TrySent::Sent),
                Err(e) => Err(self.lose(to, format!("send failed: {e}"))),
            };
        }
        let Some(slot) = self.try_take_buffer() else {
            return Ok(TrySent::WouldWait);
        };
        if !self.try_acquire_sq(peer) {
            let _ = self.pool.0.try_send(slot);
            return Ok(TrySent::WouldWait);
        }
        let base = slot * self.opts.slot_size;
        let mut filled = 1;
        let mut res = self.send_mr.write_bytes(base, &[FRAG_LAST]);
        for part in parts {
            res = res.and_then(|_| self.send_mr.write_bytes(base + filled, part));
            filled += part.len();
        }
        let posted = res
            .inspect_err(|_| peer.sq.release())
            .and_then(|_| self.post_buffer(to, peer, slot, filled));
        if let Err(e) = posted {
            let _ = self.pool.0.try_send(slot);
            return Err(self.lose(to, format!("send failed: {e}")));
        }
        Ok(TrySent::Sent)
    }
}

/// A message small enough to travel inline, built on the stack.
struct InlineFrame {
    bytes: [u8; INLINE_BYTES],
    len: usize,
}

impl InlineFrame {
    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The receive side's state: each peer's message being reassembled from
/// its fragments, and the completions being handled.
struct Receiving {
    partial: Vec<Vec<u8>>,
    completions: Vec<verbs::Completion>,
}

/// A thread's poll of the receive completion queue (and of the rings of
/// co-located peers), see [`Transport::poll_answers`]. While one lives, the
/// receive thread neither polls nor arms the queue: what arrives costs no
/// event and wakes no thread.
struct RdmaPoll<'a> {
    shared: &'a Shared,
    rings: Option<Box<dyn AnswerPoll + 'a>>,
}

impl<'a> RdmaPoll<'a> {
    fn new(shared: &'a Shared, rings: Option<Box<dyn AnswerPoll + 'a>>) -> Self {
        *shared.pollers.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        RdmaPoll { shared, rings }
    }
}

impl Drop for RdmaPoll<'_> {
    fn drop(&mut self) {
        let mut pollers = self
            .shared
            .pollers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *pollers -= 1;
        if *pollers == 0 {
            self.shared.pollers_cv.notify_one();
        }
    }
}

impl AnswerPoll for RdmaPoll<'_> {
    fn receive(&mut self) {
        if let Some(rings) = self.rings.as_mut() {
            rings.receive();
        }
        let mut receiving = match self.shared.receiving.try_lock() {
            Ok(receiving) => receiving,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        // A failed poll is the completion thread's to report: it polls the
        // same queue next and ends the job.
        let _ = self.shared.take_receives(&mut receiving);
    }
}

/// Receive completions taken per poll.
const RECEIVE_BATCH: usize = 64;

/// Longest the receive thread leaves its queue to polling threads before
/// it looks itself: a poll is created before its thread takes the engine's
/// lock, and a thread blocked there polls nothing meanwhile.
const POLLERS_WAIT: Duration = Duration::from_millis(10);

fn recv_loop(s: Arc<Shared>) {
    pin_poller(&s);
    let mut looked_since = Instant::now();
    while !s.stop.load(Ordering::SeqCst) {
        let taken = {
            let mut receiving = s.receiving.lock().unwrap_or_else(|p| p.into_inner());
            s.take_receives(&mut receiving)
        };
        match taken {
            Err(e) => {
                tracing::error!("rank {}: receive completion queue: {e}", s.rank);
                return;
            }
            Ok(0) if s.wait_out_pollers() => looked_since = Instant::now(),
            Ok(0) if looked_since.elapsed() >= s.opts.poll_spin => {
                // Armed only now (see `CompletionQueue::arm`), then one
                // more look for what came before the arm.
                let armed = s.recv_cq.arm().and_then(|()| {
                    let mut receiving = s.receiving.lock().unwrap_or_else(|p| p.into_inner());
                    s.take_receives(&mut receiving)
                });
                // Sleeps without the lock: a polling thread may take what
                // arrives meanwhile (the event still ends this sleep).
                let slept = match armed {
                    Ok(0) => s.recv_cq.sleep_until_event(TICK),
                    other => other.map(drop),
                };
                if let Err(e) = slept {
                    tracing::error!("rank {}: receive completion queue: {e}", s.rank);
                    return;
                }
                looked_since = Instant::now();
            }
            Ok(0) => std::hint::spin_loop(),
            Ok(_) => looked_since = Instant::now(),
        }
    }
}

impl Shared {
    /// While threads poll the receive queue for their answers (`RdmaPoll`),
    /// waits (at most `POLLERS_WAIT`) for the last to stop; whether there
    /// were any.
    fn wait_out_pollers(&self) -> bool {
        let pollers = self.pollers.lock().unwrap_or_else(|p| p.into_inner());
        if *pollers == 0 {
            return false;
        }
        drop(
            self.pollers_cv
                .wait_timeout_while(pollers, POLLERS_WAIT, |n| *n > 0)
                .unwrap_or_else(|p| p.into_inner()),
        );
        true
    }

    /// Polls the receive completion queue once and hands on what it gives,
    /// in order (the caller holds `receiving`); how many completions.
    fn take_receives(&self, receiving: &mut Receiving) -> Result<usize, VerbsError> {
        let Receiving {
            partial,
            completions: wcs,
        } = receiving;
        wcs.clear();
        let taken = self.recv_cq.poll(wcs, RECEIVE_BATCH)?;
        for wc in wcs.iter() {
            let peer_rank = (wc.wr_id >> 32) as usize;
            let slot = (wc.wr_id & 0xffff_ffff) as usize;
            let Ok(peer) = self.peer(peer_rank) else {
                continue;
            };
            peer.qp.complete(wc.wr_id);
            if !wc.ok() {
                if !peer.said_goodbye.load(Ordering::SeqCst) {
                    self.lose(peer_rank, format!("receive failed: {}", wc.error()));
                }
                continue;
            }
            let base = slot * self.opts.slot_size;
            let len = (wc.byte_len as usize).min(self.opts.slot_size);
            let data = match peer.recv_mr.to_vec(base, len) {
                Ok(d) => d,
                Err(e) => {
                    self.lose(peer_rank, format!("receive buffer: {e}"));
                    continue;
                }
            };
            let repost = peer.qp.post_recv(
                wc.wr_id,
                &Segment {
                    region: Arc::clone(&peer.recv_mr),
                    offset: base,
                    len: self.opts.slot_size,
                },
            );
            if let Err(e) = repost {
                self.lose(peer_rank, format!("reposting a receive buffer: {e}"));
                continue;
            }
            let Some((&kind, body)) = data.split_first() else {
                self.lose(peer_rank, "empty RDMA message".into());
                continue;
            };
            let buf = &mut partial[peer_rank];
            if buf.len() + body.len() > self.opts.max_message {
                buf.clear();
                self.lose(peer_rank, "message exceeds the size limit".into());
                continue;
            }
            match kind {
                FRAG_MORE => {
                    if buf.capacity() == 0 {
                        // The first of several fragments: a large message.
                        *buf = self.payloads.take(PayloadPool::MIN_POOLED);
                    }
                    buf.extend_from_slice(body)
                }
                FRAG_LAST => {
                    buf.extend_from_slice(body);
                    let payload = std::mem::take(buf);
                    self.deliver_received(Message {
                        from: peer_rank,
                        payload,
                    });
                }
                FRAG_PAGE => {
                    if !buf.is_empty() {
                        buf.clear();
                        self.lose(
                            peer_rank,
                            "protocol error: page marker inside a message".into(),
                        );
                        continue;
                    }
                    match self.landed(body) {
                        Ok(payload) => self.deliver_received(Message {
                            from: peer_rank,
                            payload,
                        }),
                        Err(why) => {
                            self.lose(peer_rank, format!("protocol error: {why}"));
                        }
                    }
                }
                FRAG_GOODBYE => {
                    peer.said_goodbye.store(true, Ordering::SeqCst);
                    *self.goodbyes.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    self.goodbye_cv.notify_all();
                }
                other => {
                    self.lose(peer_rank, format!("unknown fragment kind {other}"));
                }
            }
        }
        Ok(taken)
    }
}

/// Send completions taken per poll.
const SEND_REAP_BATCH: usize = 64;

/// The send completion thread: settles send completions when no one else
/// does. While no thread waits for one (`Shared::send_waiters`), it looks
/// every `TICK` (for a failed send to report) and the queue stays unarmed:
/// a send's completion then costs no event and no wake-up, its buffer and
/// send-queue slot being taken back by the next sender that needs them.
fn send_completion_loop(s: Arc<Shared>) {
    pin_poller(&s);
    while !s.stop.load(Ordering::SeqCst) {
        let reaped = s.reap_sends();
        let waited = match reaped {
            Ok(0) => {
                let waiters = s.send_waiters.lock().unwrap_or_else(|p| p.into_inner());
                if *waiters == 0 {
                    drop(
                        s.send_waiters_cv
                            .wait_timeout(waiters, TICK)
                            .unwrap_or_else(|p| p.into_inner()),
                    );
                    Ok(())
                } else {
                    drop(waiters);
                    s.sleep_for_sends()
                }
            }
            other => other.map(drop),
        };
        if let Err(e) = waited {
            tracing::error!("rank {}: send completion queue: {e}", s.rank);
            return;
        }
    }
}

/// A thread waiting for a send completion (a free buffer or send-queue
/// slot, its READ or WRITE), for as long as it lives: the send completion
/// thread then sleeps on the armed queue instead of looking every `TICK`.
struct SendWait<'a>(&'a Shared);

impl<'a> SendWait<'a> {
    fn new(s: &'a Shared) -> Self {
        *s.send_waiters.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        s.send_waiters_cv.notify_all();
        SendWait(s)
    }
}

impl Drop for SendWait<'_> {
    fn drop(&mut self) {
        *self
            .0
            .send_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner()) -= 1;
    }
}

impl Shared {
    /// Polls the send completion queue once, unless another thread is, and
    /// settles what it gives: buffers back to the pool, send-queue slots
    /// released, waiting READs and WRITEs answered, a failed send losing
    /// its peer. How many completions.
    fn reap_sends(&self) -> Result<usize, VerbsError> {
        let mut wcs = match self.reaping.try_lock() {
            Ok(wcs) => wcs,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(0),
        };
        wcs.clear();
        let taken = self.send_cq.poll(&mut wcs, SEND_REAP_BATCH)?;
        for wc in wcs.iter() {
            // Unknown ids: the unsignaled WRITE of a page, reported only when
            // it failed; the SEND posted after it is flushed and reports that.
            let Some(p) = self.pending_lock().remove(&wc.wr_id) else {
                continue;
            };
            let (rank, wrs) = match &p {
                Pending::Buffer { peer, wrs, .. } => (*peer, *wrs),
                Pending::Inline { peer } | Pending::Waiter { peer, .. } => (*peer, 1),
            };
            if let Ok(peer) = self.peer(rank) {
                peer.qp.complete(wc.wr_id);
                for _ in 0..wrs {
                    peer.sq.release();
                }
            }
            match p {
                Pending::Buffer { slot, .. } => {
                    let _ = self.pool.0.try_send(slot);
                    if !wc.ok() {
                        self.lose(rank, format!("send failed: {}", wc.error()));
                    }
                }
                Pending::Inline { .. } => {
                    if !wc.ok() {
                        self.lose(rank, format!("send failed: {}", wc.error()));
                    }
                }
                Pending::Waiter { tx, .. } => {
                    let _ = tx.send(if wc.ok() { Ok(()) } else { Err(wc.error()) });
                }
            }
        }
        Ok(taken)
    }

    /// Polls the send completion queue for `poll_spin`, then arms it and
    /// sleeps until its next completion (or `TICK`).
    fn sleep_for_sends(&self) -> Result<(), VerbsError> {
        let start = Instant::now();
        while start.elapsed() < self.opts.poll_spin {
            if self.reap_sends()? > 0 {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        self.send_cq.arm()?;
        if self.reap_sends()? == 0 {
            self.send_cq.sleep_until_event(TICK)?;
        }
        Ok(())
    }

    /// The answer of a READ or WRITE this thread posted: polled for here
    /// (`poll_spin`), so that it costs no wake-up, then waited for.
    fn wait_for_completion(
        &self,
        rx: &Receiver<Result<(), VerbsError>>,
        deadline: Instant,
    ) -> Result<Result<(), VerbsError>, RecvTimeoutError> {
        let start = Instant::now();
        while start.elapsed() < self.opts.poll_spin {
            let _ = self.reap_sends();
            if let Ok(answer) = rx.try_recv() {
                return Ok(answer);
            }
            std::hint::spin_loop();
        }
        let _waiting = SendWait::new(self);
        let _ = self.reap_sends();
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
    }

    /// A free send buffer: at once if the pool has one, else after settling
    /// the send completions there are, else waiting for one (at most
    /// `op_timeout`).
    fn take_buffer(&self) -> Result<usize, RecvTimeoutError> {
        if let Some(slot) = self.try_take_buffer() {
            return Ok(slot);
        }
        let _waiting = SendWait::new(self);
        let _ = self.reap_sends();
        self.pool.1.recv_timeout(self.opts.op_timeout)
    }

    /// A free send buffer if there is one now, after settling the send
    /// completions there are if need be.
    fn try_take_buffer(&self) -> Option<usize> {
        if let Ok(slot) = self.pool.1.try_recv() {
            return Some(slot);
        }
        let _ = self.reap_sends();
        self.pool.1.try_recv().ok()
    }

    /// A send-queue slot of `peer`: at once if one is free, else after
    /// settling the send completions there are, else waiting until `until`.
    fn acquire_sq(&self, peer: &Peer, until: Instant) -> bool {
        if self.try_acquire_sq(peer) {
            return true;
        }
        let _waiting = SendWait::new(self);
        let _ = self.reap_sends();
        peer.sq.acquire(until)
    }

    /// A send-queue slot of `peer` if one is free now, after settling the
    /// send completions there are if need be.
    fn try_acquire_sq(&self, peer: &Peer) -> bool {
        if peer.sq.try_acquire() {
            return true;
        }
        let _ = self.reap_sends();
        peer.sq.try_acquire()
    }
}

/// Forwards the bootstrap transport's news of lost peers, and hands on in
/// order the messages co-located peers sent through it that its receive
/// threads could not hand to the consumer at once.
fn boot_watch_loop(s: Arc<Shared>) {
    let inbox = s.boot.inbox();
    while !s.stop.load(Ordering::SeqCst) {
        let mut ready = crossbeam_channel::Select::new();
        ready.recv(&inbox);
        if ready.ready_timeout(TICK).is_err() {
            continue;
        }
        let order = s.boot_order.lock().unwrap_or_else(|p| p.into_inner());
        let next = inbox.try_recv();
        match next {
            Err(crossbeam_channel::TryRecvError::Empty) => {}
            Err(crossbeam_channel::TryRecvError::Disconnected) => return,
            Ok(Ok(message)) => s.deliver_received(message),
            Ok(Err(TransportError::PeerLost { rank, reason, .. })) => {
                drop(order);
                let gone = s
                    .peer(rank)
                    .map(|p| p.said_goodbye.load(Ordering::SeqCst))
                    .unwrap_or(true);
                if !gone && !s.shut_down.load(Ordering::SeqCst) {
                    s.lose(rank, format!("{reason} (bootstrap connection)"));
                }
            }
            Ok(Err(_)) => return,
        }
    }
}

impl Transport for RdmaTransport {
    fn rank(&self) -> Rank {
        self.shared.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn send_parts(&self, to: Rank, parts: &[&[u8]]) -> Result<(), TransportError> {
        if let Some(boot) = self.shared.boot_for(to) {
            return boot.send_parts(to, parts);
        }
        self.shared.send_frame(to, FRAG_LAST, parts)
    }

    fn try_send_parts(&self, to: Rank, parts: &[&[u8]]) -> Result<TrySent, TransportError> {
        if let Some(boot) = self.shared.boot_for(to) {
            return boot.try_send_parts(to, parts);
        }
        self.shared.try_send_frame(to, parts)
    }

    /// Only co-located peers' messages can be left part-sent (by the
    /// bootstrap transport; a plain load when nothing is).
    fn finish_sends(&self) -> Result<(), TransportError> {
        self.shared.boot.finish_sends()
    }

    /// A page that would go by RDMA WRITE is posted if its send resources
    /// are all free now (`Shared::try_send_page`); one that would go by SEND
    /// is tried as such.
    fn try_send_page(
        &self,
        to: Rank,
        header: &[u8],
        page: usize,
        data: &[u8],
    ) -> Result<TrySent, TransportError> {
        if let Some(boot) = self.shared.boot_for(to) {
            return boot.try_send_page(to, header, page, data);
        }
        if let Some(tried) = self.shared.try_send_page(to, header, page, data) {
            return tried;
        }
        let sent = self.shared.try_send_frame(to, &[header, data])?;
        if sent == TrySent::Sent && to != self.shared.rank {
            self.shared.pages_sent.fetch_add(1, Ordering::Relaxed);
        }
        Ok(sent)
    }

    /// See `Shared::send_page`: the page by RDMA WRITE into the peer's
    /// landing arena, the header by SEND.
    fn send_page(
        &self,
        to: Rank,
        header: &[u8],
        page: usize,
        data: &[u8],
    ) -> Result<(), TransportError> {
        if let Some(boot) = self.shared.boot_for(to) {
            return boot.send_page(to, header, page, data);
        }
        self.shared.send_page(to, header, page, data)
    }

    fn shares_memory_with(&self, peer: Rank) -> bool {
        self.shared.boot_for(peer).is_some()
    }

    /// The receive completion queue, polled in the calling thread while the
    /// completion thread does not hold it, and the co-located peers' rings
    /// through the bootstrap transport (whose receive threads' handler,
    /// `offer_from_boot`, the frames the poller reads go through too).
    fn poll_answers(&self) -> Option<Box<dyn AnswerPoll + '_>> {
        let rings = if self.shared.via_boot.iter().any(|&v| v) {
            self.shared.boot.poll_answers()
        } else {
            None
        };
        Some(Box::new(RdmaPoll::new(&self.shared, rings)))
    }

    fn deliver_inline(&self, handler: InlineDelivery) -> bool {
        self.shared.inline.set(handler).is_ok()
    }

    fn inbox(&self) -> Receiver<Incoming> {
        self.shared.inbox.1.clone()
    }

    fn recv(&self) -> Result<Message, TransportError> {
        self.shared
            .inbox
            .1
            .recv()
            .map_err(|_| TransportError::Shutdown)?
    }

    fn recv_timeout(&self, timeout: Duration) -> Result<Option<Message>, TransportError> {
        match self.shared.inbox.1.recv_timeout(timeout) {
            Ok(Ok(m)) => Ok(Some(m)),
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(TransportError::Shutdown),
        }
    }

    fn recycle(&self, payload: Vec<u8>) {
        self.shared.payloads.give(payload);
    }

    fn shutdown(&self, timeout: Duration) -> Result<(), TransportError> {
        let s = &self.shared;
        if s.shut_down.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let counts = self.page_counts();
        if counts.written + counts.sent > 0 {
            tracing::info!(
                "rank {}: transport rdma: {} pages sent by RDMA WRITE, {} by SEND",
                s.rank,
                counts.written,
                counts.sent
            );
        }
        let deadline = Instant::now() + timeout;
        let mut first_error = None;
        let others: Vec<Rank> = (0..s.size).filter(|r| *r != s.rank).collect();
        for &peer in &others {
            if let Err(e) = s.send_frame(peer, FRAG_GOODBYE, &[]) {
                first_error.get_or_insert(e);
            }
        }
        // Wait for the peers' goodbyes, then for our own sends to be acknowledged.
        let mut count = s.goodbyes.lock().unwrap_or_else(|p| p.into_inner());
        while *count < others.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                first_error.get_or_insert(TransportError::Setup(format!(
                    "only {} of {} peers said goodbye within {timeout:?}",
                    *count,
                    others.len()
                )));
                break;
            }
            count = s
                .goodbye_cv
                .wait_timeout(count, left.min(TICK))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(count);
        {
            let _waiting = SendWait::new(s);
            while !s.pending_lock().is_empty() && Instant::now() < deadline {
                let _ = s.reap_sends();
                thread::sleep(Duration::from_millis(1));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = s.boot.shutdown(left.max(Duration::from_millis(100))) {
            first_error.get_or_insert(e);
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for RdmaTransport {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        // The last reference can go in one of these threads (the engine's
        // handler of inline deliveries holds the transport): it cannot
        // join itself, and is ending anyway.
        let current = std::thread::current().id();
        for t in threads {
            if t.thread().id() != current {
                let _ = t.join();
            }
        }
        // Queue pairs, regions, queues and the device go when `shared` does;
        // queue pairs first (they hold everything else).
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_round_trip_and_garbage() {
        let ep = QpEndpoint {
            qpn: 0x11,
            psn: 0xabcdef,
            lid: 7,
            gid: [3; 16],
            mtu: 3,
            ethernet: true,
        };
        let bytes = encode_endpoint(&ep, &[], None);
        let (back, regions, arena) = decode_endpoint(&bytes).unwrap();
        assert_eq!(back, ep);
        assert!(regions.is_empty());
        assert_eq!(arena, None);
        assert!(decode_endpoint(&bytes[..bytes.len() - 1]).is_none());
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode_endpoint(&long).is_none());
        // A region count larger than the bytes that follow is refused.
        let mut lying = bytes.clone();
        let n = lying.len() - 24;
        lying[n..n + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_endpoint(&lying).is_none());
    }

    #[test]
    fn endpoint_carries_the_landing_arena() {
        let ep = QpEndpoint {
            qpn: 1,
            psn: 2,
            lid: 0,
            gid: [9; 16],
            mtu: 5,
            ethernet: true,
        };
        let mut bytes = encode_endpoint(&ep, &[], None);
        let n = bytes.len();
        // Arena at 0x1000, 3 pages, rkey 77.
        bytes[n - 20..n - 12].copy_from_slice(&0x1000u64.to_le_bytes());
        bytes[n - 12..n - 4].copy_from_slice(&(3 * PAGE_BYTES as u64).to_le_bytes());
        bytes[n - 4..].copy_from_slice(&77u32.to_le_bytes());
        let (_, _, arena) = decode_endpoint(&bytes).unwrap();
        assert_eq!(
            arena,
            Some(RemoteRegion {
                addr: 0x1000,
                len: 3 * PAGE_BYTES as u64,
                rkey: 77
            })
        );
        // An arena that is not whole pages is refused.
        bytes[n - 12..n - 4].copy_from_slice(&4097u64.to_le_bytes());
        assert!(decode_endpoint(&bytes).is_none());
    }

    #[test]
    fn page_marker_round_trip_and_bounds() {
        let header = b"grant page 5";
        let wire = encode_page_marker(5, header);
        assert_eq!(wire[0], FRAG_PAGE);
        assert_eq!(wire.len(), 9 + header.len());
        let (offset, back) = decode_page_marker(&wire[1..], 6).unwrap();
        assert_eq!((offset, back), (5 * PAGE_BYTES, &header[..]));
        // The last page of the arena is fine, one past it is not.
        assert!(decode_page_marker(&wire[1..], 5).is_err());
        let last = encode_page_marker(99, b"");
        assert_eq!(
            decode_page_marker(&last[1..], 100).unwrap().0,
            99 * PAGE_BYTES
        );
        let err = decode_page_marker(&last[1..], 99).unwrap_err();
        assert!(err.contains("page 99") && err.contains("99 pages"), "{err}");
        // No arena at all.
        assert!(decode_page_marker(&last[1..], 0).is_err());
        // Huge indices cannot overflow the offset computation.
        let mut huge = vec![0u8; 8];
        huge.copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_page_marker(&huge, usize::MAX / PAGE_BYTES).is_err());
        huge.copy_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(decode_page_marker(&huge, 1000).is_err());
        // Short markers: every length below 8 is an error, not a panic.
        for len in 0..8 {
            let err = decode_page_marker(&wire[1..1 + len], 1 << 20).unwrap_err();
            assert!(err.contains("needs 8"), "{err}");
        }
        // An empty header is allowed.
        assert_eq!(decode_page_marker(&wire[1..9], 6).unwrap().1, b"");
    }

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |n| {
            vars.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        }
    }

    /// The error `RdmaOptions::from_lookup` gives for `name=value`.
    fn refused(name: &str, value: &str) -> String {
        RdmaOptions::from_lookup(lookup(&[(name, value)]))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn options_from_the_environment() {
        let o = RdmaOptions::from_lookup(lookup(&[])).unwrap();
        assert_eq!(o.pages, PageMode::Write);
        assert_eq!(o.poll_cpu, PollCpu::Auto);
        assert_eq!(o.landing_pages, 0);
        let o = RdmaOptions::from_lookup(lookup(&[
            ("DSM_RDMA_PAGES", " Send "),
            ("DSM_RDMA_POLL_CPU", "1"),
            ("DSM_RDMA_SPIN_US", "7"),
        ]))
        .unwrap();
        assert_eq!(o.pages, PageMode::Send);
        assert_eq!(o.poll_cpu, PollCpu::Fixed(1));
        assert_eq!(o.poll_spin, Duration::from_micros(7));
        assert!(!o.poll_spin_auto, "a number is kept as given");
        for auto in [None, Some("auto"), Some(" auto ")] {
            let vars: Vec<(&str, &str)> =
                auto.map(|a| ("DSM_RDMA_SPIN_US", a)).into_iter().collect();
            let o = RdmaOptions::from_lookup(lookup(&vars)).unwrap();
            assert!(o.poll_spin_auto, "{auto:?}: chosen at connect_job");
        }
        assert!(RdmaOptions::from_lookup(lookup(&[("DSM_RDMA_SPIN_US", "fast")])).is_err());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(
            auto_poll_spin(cpus + 1),
            SHARED_CPU_POLL_SPIN,
            "ranks outnumber the CPUs"
        );
        if cpus >= 2 {
            assert_eq!(
                auto_poll_spin(cpus / 2),
                SPARE_CPU_POLL_SPIN,
                "two CPUs per rank"
            );
        }
        let o = RdmaOptions::from_lookup(lookup(&[
            ("DSM_RDMA_PAGES", "write"),
            ("DSM_RDMA_POLL_CPU", "none"),
        ]))
        .unwrap();
        assert_eq!((o.pages, o.poll_cpu), (PageMode::Write, PollCpu::Unpinned));
        // Empty values are unset.
        let o = RdmaOptions::from_lookup(lookup(&[("DSM_RDMA_POLL_CPU", " ")])).unwrap();
        assert_eq!(o.poll_cpu, PollCpu::Auto);

        let err = refused("DSM_RDMA_POLL_CPU", "first");
        assert_eq!(
            err,
            "DSM_RDMA_POLL_CPU=\"first\": expected auto, none or a CPU number"
        );
        let err = refused("DSM_RDMA_POLL_CPU", "-1");
        assert!(err.contains("expected auto, none or a CPU number"), "{err}");
        let err = refused("DSM_RDMA_PAGES", "read");
        assert_eq!(
            err,
            "DSM_RDMA_PAGES=\"read\": expected write (the default) or send"
        );
        assert_eq!(
            RdmaOptions::from_lookup(lookup(&[])).unwrap().local,
            LocalPath::Shm
        );
        let o = RdmaOptions::from_lookup(lookup(&[("DSM_RDMA_LOCAL", " RDMA ")])).unwrap();
        assert_eq!(o.local, LocalPath::Rdma);
        let err = refused("DSM_RDMA_LOCAL", "tcp");
        assert_eq!(
            err,
            "DSM_RDMA_LOCAL=\"tcp\": expected shm (the default) or rdma"
        );
    }

    /// A page marker naming a page outside the receiver's arena loses the
    /// sender (a protocol error reported as `PeerLost`), never a panic or a
    /// read outside the arena. Needs a device (`scripts/rdma-vm-test.sh`).
    /// Two connected ranks with a 4-page landing arena and an inbox of
    /// `inbox_capacity` messages, or `None` (test skipped) without a device.
    fn pair_or_skip(test: &str, inbox_capacity: usize) -> Option<Vec<Arc<RdmaTransport>>> {
        if let Err(why) = crate::select::active_port() {
            if std::env::var("DSM_TEST_REQUIRE_RDMA").as_deref() == Ok("1") {
                panic!("DSM_TEST_REQUIRE_RDMA=1 but no RDMA device: {why}");
            }
            println!("SKIPPED {test}: no RDMA device ({why})");
            return None;
        }
        let boots = dsm_core::bootstrap::Bootstrap::loopback_group(2).unwrap();
        let hs: Vec<_> = boots
            .into_iter()
            .map(|b| {
                thread::spawn(move || {
                    let opts = RdmaOptions {
                        landing_pages: 4,
                        inbox_capacity,
                        // Both ranks share this host: keep them on the adapter.
                        local: LocalPath::Rdma,
                        ..RdmaOptions::from_env().unwrap()
                    };
                    let tcp = transport_tcp::TcpTransport::connect(
                        b,
                        &transport_tcp::TcpOptions::default(),
                    )
                    .unwrap();
                    let dev = RdmaDevice::open(&opts).unwrap();
                    RdmaTransport::connect(tcp, dev, Vec::new(), &opts).unwrap()
                })
            })
            .collect();
        Some(hs.into_iter().map(|h| h.join().unwrap()).collect())
    }

    #[test]
    fn page_marker_outside_the_arena_loses_the_peer() {
        let test = "page_marker_outside_the_arena_loses_the_peer";
        let Some(ts) = pair_or_skip(test, 1 << 16) else {
            return;
        };
        let (a, b) = (&ts[0], &ts[1]);
        let limit = Duration::from_secs(30);
        // A good page first (the last slot of the arena).
        a.send_page(1, b"h", 3, &[5; PAGE_BYTES]).unwrap();
        let m = b.recv_timeout(limit).unwrap().unwrap();
        assert_eq!(&m.payload[..1], b"h");
        assert!(m.payload[1..].iter().all(|x| *x == 5) && m.payload.len() == 1 + PAGE_BYTES);
        assert_eq!(a.page_counts().written, 1);
        // Page 4 is one past the arena: send_page itself falls back to SEND...
        a.send_page(1, b"h", 4, &[6; PAGE_BYTES]).unwrap();
        let m = b.recv_timeout(limit).unwrap().unwrap();
        assert!(m.payload[1..].iter().all(|x| *x == 6));
        assert_eq!(a.page_counts().sent, 1);
        // ...but a broken peer's marker for it is a protocol error.
        a.shared
            .send_frame(1, FRAG_PAGE, &[&4u64.to_le_bytes(), b"x"])
            .unwrap();
        match b.recv_timeout(limit) {
            Err(TransportError::PeerLost {
                rank: 0, reason, ..
            }) => {
                assert!(reason.contains("outside our landing arena"), "{reason}")
            }
            other => panic!("expected PeerLost, got {other:?}"),
        }
    }

    /// A peer lost while the inbox is full is still reported, after the
    /// messages queued before it (else the engine would wait forever).
    #[test]
    fn a_peer_lost_while_the_inbox_is_full_is_reported() {
        let test = "a_peer_lost_while_the_inbox_is_full_is_reported";
        let Some(ts) = pair_or_skip(test, 2) else {
            return;
        };
        let (a, b) = (&ts[0], &ts[1]);
        let limit = Duration::from_secs(30);
        a.send(1, b"one").unwrap();
        a.send(1, b"two").unwrap();
        a.shared
            .send_frame(1, FRAG_PAGE, &[&4u64.to_le_bytes(), b"x"])
            .unwrap();
        for want in [&b"one"[..], b"two"] {
            let m = b.recv_timeout(limit).unwrap().expect("a queued message");
            assert_eq!(m.payload, want);
        }
        match b.recv_timeout(limit) {
            Err(TransportError::PeerLost { rank: 0, .. }) => {}
            other => panic!("expected PeerLost, got {other:?}"),
        }
    }

    #[test]
    fn opening_a_device_without_rdma_is_a_clean_error() {
        if std::env::var("RXE_IN_VM").is_ok() || crate::rdma_available() {
            return;
        }
        let err = RdmaDevice::open(&RdmaOptions::default()).err().unwrap();
        assert!(
            matches!(err, RdmaError::Verbs(VerbsError::NoDevice(_))),
            "{err}"
        );
        eprintln!("as expected: {err}");
    }
}
