//! Co-located ranks: the transport's messages between two ranks on the
//! same host go through rings in shared memory (`ring`) instead of their
//! loopback connection, which then only tells each side when the other
//! ends (its reader sees the end of the stream).
//!
//! Set up once the connections are authenticated, over them (unless
//! `DSM_SHM=0`, which must then hold for the whole job): each rank offers
//! every peer of its host (same host name in the peer table) a ring to
//! write into; a rank that received an offer from a peer on the same boot
//! of the same kernel opens it and says whether it could. A pair uses its rings only if both sides opened
//! theirs; otherwise it keeps to the connection. Every rank sends each
//! frame to all its co-located peers before reading theirs, so the
//! exchange never waits in a circle.

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dsm_core::bootstrap::PeerInfo;
use dsm_core::wire;
use dsm_core::{Rank, TransportError};

use crate::ring::{RingProbe, RingReader, RingWriter};
use crate::{setup_err, OptionsError};

/// Environment variable: `0` (or `off`) keeps co-located ranks on their
/// loopback connections.
pub const ENV_SHM: &str = "DSM_SHM";
/// Environment variable: microseconds a ring's reader (or a writer facing
/// a full ring) polls before it sleeps.
pub const ENV_SHM_SPIN_US: &str = "DSM_SHM_SPIN_US";
/// The poll of a ring's reader where the host has a CPU for it (see
/// [`auto_spin`]).
pub const AUTO_SHM_SPIN: Duration = Duration::from_micros(20);

/// A ring reader's poll for a host running `local_ranks` of the job's
/// ranks: [`AUTO_SHM_SPIN`] if the process may use two CPUs per local rank
/// (one for the application, one for the service threads), else none: a
/// polling reader would take the CPU the rank it waits for needs (on 2
/// CPUs and 2 ranks, a read fault took 31 us without polling, 52 us
/// polling 20 us and 250 us polling 200 us).
pub fn auto_spin(local_ranks: usize) -> Duration {
    if dsm_core::sched::spare_cpu_per_rank(local_ranks) {
        AUTO_SHM_SPIN
    } else {
        Duration::ZERO
    }
}

/// Frame kind of the set-up exchange (on the connection, before any data).
pub(crate) const KIND_SHM: u8 = 4;
const OFFER: u8 = 1;
const ACCEPT: u8 = 2;

/// `DSM_SHM`: whether to offer rings to co-located peers.
pub(crate) fn enabled_from_env() -> Result<bool, OptionsError> {
    let Ok(text) = std::env::var(ENV_SHM) else {
        return Ok(true);
    };
    match text.trim() {
        "" | "1" | "on" | "yes" => Ok(true),
        "0" | "off" | "no" => Ok(false),
        _ => Err(OptionsError {
            name: ENV_SHM,
            value: text,
            why: "expected 1 (rings between co-located ranks, the default) or 0 (loopback TCP)"
                .into(),
        }),
    }
}

/// `DSM_SHM_SPIN_US`, if set.
pub(crate) fn spin_from_env() -> Result<Option<Duration>, OptionsError> {
    let Ok(text) = std::env::var(ENV_SHM_SPIN_US) else {
        return Ok(None);
    };
    // `auto` (as for the other polls) or nothing: the rule of `auto_spin`.
    if text.trim().is_empty() || text.trim() == "auto" {
        return Ok(None);
    }
    let micros: u64 = text.trim().parse().map_err(|_| OptionsError {
        name: ENV_SHM_SPIN_US,
        value: text.clone(),
        why: "expected a number of microseconds (0: sleep at once) or `auto`".into(),
    })?;
    Ok(Some(Duration::from_micros(micros.min(1_000_000))))
}

/// The two rings of a co-located pair, seen from one side.
pub(crate) struct Rings {
    /// The peer writes, this rank reads.
    pub reader: RingReader,
    /// This rank writes, the peer reads.
    pub writer: RingWriter,
    /// Set when the peer's connection ended: the reader's waits end.
    pub reader_stop: Arc<AtomicBool>,
    /// Set when the peer is lost: the writer's waits fail (after a
    /// goodbye, this rank still sends its own).
    pub writer_stop: Arc<AtomicBool>,
}

/// This kernel's boot: two processes share memory only on the same one.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn nonce() -> Result<[u8; 16], TransportError> {
    let mut nonce = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut nonce))
        .map_err(|e| setup_err(format!("reading /dev/urandom for a ring's nonce: {e}")))?;
    Ok(nonce)
}

/// Sets up rings with every co-located peer that takes part: `streams`
/// holds the authenticated connections (blocking, with the handshake's
/// timeouts); entry r of the result is the rings to use with rank r.
pub(crate) fn negotiate(
    me: Rank,
    peers_info: &[PeerInfo],
    streams: &mut [Option<TcpStream>],
    offer: bool,
    spin: Option<Duration>,
) -> Result<Vec<Option<Rings>>, TransportError> {
    let size = peers_info.len();
    let co_located: Vec<Rank> = (0..size)
        .filter(|r| *r != me && peers_info[*r].host == peers_info[me].host)
        .filter(|r| streams[*r].is_some())
        .collect();
    let mut rings: Vec<Option<Rings>> = (0..size).map(|_| None).collect();
    if co_located.is_empty() || !offer {
        return Ok(rings);
    }
    let spin = spin.unwrap_or_else(|| auto_spin(co_located.len() + 1));
    let boot = boot_id();
    let fail = |peer: Rank, what: &str, e: &dyn std::fmt::Display| {
        setup_err(format!(
            "setting up shared memory with rank {peer} on {}: {what}: {e} (DSM_SHM must be the same on every rank)",
            peers_info[peer].host
        ))
    };
    let stream =
        |streams: &mut [Option<TcpStream>], peer: Rank| -> Result<TcpStream, TransportError> {
            let s = streams[peer]
                .as_ref()
                .ok_or_else(|| setup_err(format!("no connection to rank {peer}")))?;
            s.try_clone()
                .map_err(|e| fail(peer, "cloning the connection", &e))
        };
    // 1. Offer each peer a ring to write into (or decline).
    let mut offered: Vec<Option<(RingReader, Arc<AtomicBool>)>> = (0..size).map(|_| None).collect();
    for &peer in &co_located {
        let mut s = stream(streams, peer)?;
        let frame = {
            let reader_stop = Arc::new(AtomicBool::new(false));
            let nonce = nonce()?;
            let reader = RingReader::create(nonce, spin, Arc::clone(&reader_stop))
                .map_err(|e| fail(peer, "creating a ring", &e))?;
            let mut frame = vec![OFFER];
            frame.extend_from_slice(&std::process::id().to_le_bytes());
            frame.extend_from_slice(&reader.fd_number().to_le_bytes());
            frame.extend_from_slice(&nonce);
            frame.extend_from_slice(boot.as_bytes());
            offered[peer] = Some((reader, reader_stop));
            frame
        };
        wire::write_frame_parts(&mut s, KIND_SHM, &[&frame])
            .map_err(|e| fail(peer, "sending the offer", &e))?;
    }
    // 2. Open each peer's ring if it offered one, and say whether it worked.
    let mut opened: Vec<Option<RingWriter>> = (0..size).map(|_| None).collect();
    for &peer in &co_located {
        let mut s = stream(streams, peer)?;
        let frame = read_frame(&mut s).map_err(|e| fail(peer, "reading its offer", &e))?;
        if let (Some(_), Some(&OFFER)) = (&offered[peer], frame.first()) {
            if frame.len() < 25 {
                return Err(fail(peer, "reading its offer", &"too short"));
            }
            let pid = u32::from_le_bytes([frame[1], frame[2], frame[3], frame[4]]);
            let fd = i32::from_le_bytes([frame[5], frame[6], frame[7], frame[8]]);
            let mut nonce = [0u8; 16];
            nonce.copy_from_slice(&frame[9..25]);
            let same_boot = !boot.is_empty() && frame[25..] == *boot.as_bytes();
            if same_boot {
                let writer_stop = Arc::new(AtomicBool::new(false));
                match RingWriter::open(pid, fd, nonce, spin, writer_stop) {
                    Ok(writer) => opened[peer] = Some(writer),
                    Err(e) => tracing::warn!(
                        "rank {me}: keeping to TCP with rank {peer} on the same host: {e}"
                    ),
                }
            }
        }
        let accept = [ACCEPT, u8::from(opened[peer].is_some())];
        wire::write_frame_parts(&mut s, KIND_SHM, &[&accept])
            .map_err(|e| fail(peer, "answering its offer", &e))?;
    }
    // 3. Rings for the pairs where both sides opened theirs.
    for &peer in &co_located {
        let mut s = stream(streams, peer)?;
        let frame = read_frame(&mut s).map_err(|e| fail(peer, "reading its answer", &e))?;
        let they_opened = frame.len() == 2 && frame[0] == ACCEPT && frame[1] == 1;
        if let (true, Some(writer), Some((reader, reader_stop))) =
            (they_opened, opened[peer].take(), offered[peer].take())
        {
            rings[peer] = Some(Rings {
                writer_stop: writer.stop_flag(),
                reader,
                writer,
                reader_stop,
            });
        }
    }
    let with: Vec<String> = (0..size)
        .filter(|r| rings[*r].is_some())
        .map(|r| r.to_string())
        .collect();
    if !with.is_empty() {
        tracing::info!("rank {me}: shared memory with rank(s) {}", with.join(", "));
    }
    Ok(rings)
}

/// One set-up frame's payload.
fn read_frame(s: &mut TcpStream) -> Result<Vec<u8>, String> {
    let header = wire::read_header(s, 4096).map_err(|e| e.to_string())?;
    if header.kind != KIND_SHM {
        return Err(format!("frame kind {} during the set-up", header.kind));
    }
    wire::read_payload_into(s, header.len as usize, Vec::new()).map_err(|e| e.to_string())
}

/// The connection of a pair that talks through rings carries nothing
/// more: this waits for its end (the peer closed it, or died, or the
/// transport shut it) and marks the rings broken. A peer that did not say
/// goodbye on its ring first is lost: `report_lost` says so, and the
/// writer's waits end too.
pub(crate) fn watch_connection(
    mut socket: TcpStream,
    ring: &RingProbe,
    (reader_stop, writer_stop): (&AtomicBool, &AtomicBool),
    said_goodbye: &AtomicBool,
    report_lost: impl FnOnce(String),
) {
    let mut byte = [0u8; 1];
    let why = match socket.read(&mut byte) {
        Ok(0) => dsm_core::transport::CLOSED_WITHOUT_GOODBYE.to_string(),
        Ok(_) => "protocol violation: data on the connection of a pair using shared memory".into(),
        Err(e) => format!("connection failed: {e}"),
    };
    // A goodbye went on the ring before the connection was shut: its
    // reader takes it once through what came before. A reader that used
    // everything published and waits for more got none.
    while !said_goodbye.load(Ordering::SeqCst) && !ring.waiting_for_more() {
        std::thread::sleep(Duration::from_millis(1));
    }
    if !said_goodbye.load(Ordering::SeqCst) {
        report_lost(why);
        writer_stop.store(true, Ordering::SeqCst);
    }
    reader_stop.store(true, Ordering::SeqCst);
}
