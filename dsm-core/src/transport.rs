//! The transport trait: reliable, ordered messages between the ranks of a
//! job. `transport-tcp` and `transport-rdma` implement it; the layers above
//! never see sockets or queue pairs.

use std::sync::Mutex;
use std::time::Duration;

use crossbeam_channel::Receiver;

/// What a transport delivers: a message, or the news that a peer is gone.
pub type Incoming = Result<Message, TransportError>;

/// Index of a process in the job, `0..size`.
pub type Rank = usize;

/// One message as received: who sent it and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The sending rank.
    pub from: Rank,
    /// The message's bytes, as sent.
    pub payload: Vec<u8>,
}

/// Why a transport could not send or deliver.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("lost rank {rank} on host {host}: {reason}")]
    /// The connection to a rank failed, closed without goodbye, or went
    /// silent for the peer timeout (reason starting with [`NOT_RESPONDING`]).
    PeerLost {
        /// The lost rank.
        rank: Rank,
        /// Its host name.
        host: String,
        /// What happened.
        reason: String,
    },
    #[error("rank {rank} is outside the job (size {size})")]
    /// A rank not in `0..size` was addressed.
    NoSuchRank {
        /// The rank addressed.
        rank: Rank,
        /// Number of ranks in the job.
        size: usize,
    },
    #[error("message of {len} bytes exceeds the transport's limit of {max} bytes")]
    /// A message longer than the transport can carry.
    TooLarge {
        /// Message length, bytes.
        len: usize,
        /// The transport's limit, bytes.
        max: usize,
    },
    #[error("connecting the job: {0}")]
    /// Connecting the ranks of the job failed.
    Setup(String),
    #[error("the transport was shut down")]
    /// The transport was shut down; nothing more is sent or received.
    Shutdown,
}

/// How a transport's [`TransportError::PeerLost`] reason begins when the
/// peer's connection is up but nothing arrived from it for the peer
/// timeout (a stopped or wedged process).
pub const NOT_RESPONDING: &str = "not responding";

/// A [`TransportError::PeerLost`] reason: the peer's end of the connection
/// closed without the goodbye of a clean shutdown (its process ended).
pub const CLOSED_WITHOUT_GOODBYE: &str = "connection closed without goodbye (process died?)";

/// A peer loss as a rank reports it (`lost rank R on host H: reason`),
/// read back from that text: the launcher names the lost rank from the
/// line of the rank that noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostPeer {
    /// The lost rank.
    pub rank: Rank,
    /// Its host name.
    pub host: String,
    /// Why it was lost, without a trailing `; aborting`.
    pub reason: String,
}

impl LostPeer {
    /// The first `lost rank R on host H: reason` in `line`, the reason
    /// without a trailing `; aborting`.
    pub fn find_in(line: &str) -> Option<LostPeer> {
        let (_, rest) = line.split_once("lost rank ")?;
        let (rank, rest) = rest.split_once(" on host ")?;
        let (host, reason) = rest.split_once(": ")?;
        Some(LostPeer {
            rank: rank.parse().ok()?,
            host: host.to_string(),
            reason: reason.trim_end_matches("; aborting").to_string(),
        })
    }

    /// Whether the peer was lost for its silence rather than a closed
    /// or failed connection.
    pub fn not_responding(&self) -> bool {
        self.reason.starts_with(NOT_RESPONDING)
    }

    /// Whether the peer's end of the connection closed or was reset: its
    /// process most likely ended, and has a status of its own to report
    /// (where a timed-out connection says the peer may be unreachable).
    pub fn closed(&self) -> bool {
        self.reason.starts_with(CLOSED_WITHOUT_GOODBYE) || self.reason.contains("reset by peer")
    }
}

/// A consumer's handler for messages as they arrive, run in the transport's
/// receive thread (see [`Transport::deliver_inline`]): it handles the
/// message there and returns `None`, or hands it back (`Some`) to be queued
/// for [`Transport::recv`] as usual. It must never block on the network:
/// a receive thread waiting to send could deadlock two ranks whose socket
/// buffers are full in both directions.
pub type InlineDelivery = Box<dyn Fn(Message) -> Option<Message> + Send + Sync>;

/// A thread's poll of the links it reads itself (see
/// [`Transport::poll_answers`]); dropping it ends the poll, and a receive
/// thread takes over what is left.
pub trait AnswerPoll {
    /// Hands on the messages that arrived whole and that no receive thread
    /// is reading. It never waits for the network (at most for room in the
    /// transport's queue of received messages, as a receive thread does),
    /// so a SIGBUS handler may call it.
    fn receive(&mut self);
}

/// What [`Transport::try_send_parts`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrySent {
    /// Sent whole.
    Sent,
    /// Taken, but part of it waits to be written: by the next send to the
    /// same rank, or [`Transport::finish_sends`].
    Started,
    /// Nothing sent: the message would have had to wait.
    WouldWait,
}

/// Memory a consumer gave a transport for the rest of a message being
/// received (see [`Transport::place_payloads`]).
pub trait Landing: Send {
    /// Where the bytes after the message's head go: exactly as many as
    /// remain of it.
    fn bytes(&mut self) -> &mut [u8];
    /// Once every byte has landed: the message to deliver in its place.
    fn landed(self: Box<Self>) -> Vec<u8>;
}

/// A consumer's choice, made in a receive thread from a message's first
/// `head_len` bytes, of where the rest of it goes: `place(from, head,
/// len)` for a message of `len` bytes (more than `head_len`) returns
/// memory for its last `len - head_len` bytes, or `None` to receive it into
/// a buffer as usual. The rules of [`InlineDelivery`] apply: it must never
/// block on the network.
pub struct PayloadPlacement {
    /// Bytes read before asking `place`; at most [`PayloadPlacement::MAX_HEAD`].
    pub head_len: usize,
    /// The choice: `(from, head, len)` to memory for the rest, or `None`.
    #[allow(clippy::type_complexity)]
    pub place: Box<dyn Fn(Rank, &[u8], usize) -> Option<Box<dyn Landing>> + Send + Sync>,
}

impl PayloadPlacement {
    /// Longest head a transport reads before asking.
    pub const MAX_HEAD: usize = 64;
}

/// Reliable in-order delivery between every pair of ranks.
///
/// * Messages from one rank to another arrive in the order they were sent,
///   exactly once, or the receiver learns that the sender is lost.
/// * `send` may be called from several threads at once; each message is
///   delivered whole, never interleaved with another.
/// * Sending to oneself is allowed and loops back.
pub trait Transport: Send + Sync {
    /// This process's rank.
    fn rank(&self) -> Rank;
    /// Number of ranks in the job.
    fn size(&self) -> usize;

    /// Sends one message made of the concatenation of `parts` (a header and
    /// a page, say) without the caller having to copy them together.
    fn send_parts(&self, to: Rank, parts: &[&[u8]]) -> Result<(), TransportError>;

    /// Sends one message to `to`.
    fn send(&self, to: Rank, payload: &[u8]) -> Result<(), TransportError> {
        self.send_parts(to, &[payload])
    }

    /// [`Transport::send_parts`] for a thread that must never wait on the
    /// network (a receive thread, see [`InlineDelivery`]): sends the
    /// message only if that takes no waiting, and otherwise returns
    /// [`TrySent::WouldWait`] having sent nothing (another thread is sending
    /// to `to`, or its connection cannot take the message now). A message
    /// the connection took only part of is [`TrySent::Started`]: its rest
    /// goes before the next message to `to`, and `finish_sends` sends it.
    /// Transports that cannot tell never take one.
    fn try_send_parts(&self, to: Rank, parts: &[&[u8]]) -> Result<TrySent, TransportError> {
        let _ = (to, parts);
        Ok(TrySent::WouldWait)
    }

    /// [`Transport::send_page`] the way of [`Transport::try_send_parts`]. A
    /// transport whose `send_page` moves the page one-sided may refuse
    /// ([`TrySent::WouldWait`]) rather than send it another way.
    fn try_send_page(
        &self,
        to: Rank,
        header: &[u8],
        page: usize,
        data: &[u8],
    ) -> Result<TrySent, TransportError> {
        let _ = page;
        self.try_send_parts(to, &[header, data])
    }

    /// Writes the rest of every message [`Transport::try_send_parts`] took
    /// only part of, waiting as `send_parts` does.
    fn finish_sends(&self) -> Result<(), TransportError> {
        Ok(())
    }

    /// Sends `header` followed by the contents of shared page `page`. The
    /// receiver gets the same message as from `send_parts(to, &[header,
    /// data])`; a transport with one-sided writes may move `data` straight
    /// into the receiver's registered memory for that page instead of
    /// through a message buffer.
    fn send_page(
        &self,
        to: Rank,
        header: &[u8],
        page: usize,
        data: &[u8],
    ) -> Result<(), TransportError> {
        let _ = page;
        self.send_parts(to, &[header, data])
    }

    /// The queue of incoming messages, for consumers that wait on several
    /// sources at once (`crossbeam_channel::select!`). `recv` reads the same queue.
    fn inbox(&self) -> Receiver<Incoming>;

    /// Blocks until a message from any rank arrives. A peer that disappears
    /// without saying goodbye is reported as `PeerLost`.
    fn recv(&self) -> Result<Message, TransportError>;

    /// Like `recv`, giving up with `Ok(None)` after `timeout`.
    fn recv_timeout(&self, timeout: Duration) -> Result<Option<Message>, TransportError>;

    /// Offers each message received from a peer to `handler` first, in the
    /// receive thread, before queueing it: a consumer that can handle it at
    /// once saves the wake-up of the thread that reads the queue. Messages a
    /// rank sends itself are always queued. Returns false (and drops the
    /// handler) if this transport does not support it, or one is already
    /// set.
    fn deliver_inline(&self, handler: InlineDelivery) -> bool {
        drop(handler);
        false
    }

    /// Lets `placement` choose where the bytes of each message received
    /// from a peer land, before they are read: a consumer receiving pages
    /// straight into their final memory saves a copy. The message delivered
    /// (queued, or offered to the [`Transport::deliver_inline`] handler) is
    /// then the one the [`Landing`] hands back, in the same order as every
    /// other. Returns false (and drops `placement`) if this transport does
    /// not support it, one is already set, or `head_len` exceeds
    /// [`PayloadPlacement::MAX_HEAD`].
    fn place_payloads(&self, placement: PayloadPlacement) -> bool {
        drop(placement);
        false
    }

    /// A poll of the links whose messages the calling thread may read
    /// itself (rings in shared memory), for a thread about to wait for an
    /// answer: from now until the poll is dropped, what arrives on them
    /// wakes no receive thread, and [`AnswerPoll::receive`] hands it on in
    /// the calling thread, exactly as the receive threads would (offered to
    /// the [`Transport::deliver_inline`] handler, in order). The answer
    /// then costs neither a receive thread's wake-up nor the waiter's.
    /// Drop the poll before sleeping: while it lives, nothing arriving on
    /// those links wakes anyone. `None` where no link allows it.
    fn poll_answers(&self) -> Option<Box<dyn AnswerPoll + '_>> {
        None
    }

    /// True when messages to and from `peer` go through shared memory on
    /// this host (a co-located rank), not the network: a transport built
    /// on this one may route that pair through it.
    fn shares_memory_with(&self, peer: Rank) -> bool {
        let _ = peer;
        false
    }

    /// Gives back a received message's bytes once the consumer is done
    /// with them, for the transport to receive into again.
    fn recycle(&self, payload: Vec<u8>) {
        drop(payload);
    }

    /// Says goodbye to every peer and closes the connections once their
    /// goodbyes arrived (or `timeout` passed). Messages already sent are
    /// delivered first.
    fn shutdown(&self, timeout: Duration) -> Result<(), TransportError>;
}

/// Spare buffers for the payloads of large received messages, handed back
/// through [`Transport::recycle`]. A fresh buffer of a few hundred KiB (a
/// run of read grants) comes from the allocator as pages it must fault in
/// and zero, and goes back to the kernel when freed: on a cold scan that
/// cost the receiving thread more than the socket copy. Small buffers are
/// left to the allocator, whose caches serve them well.
#[derive(Default)]
pub struct PayloadPool {
    spare: Mutex<Vec<Vec<u8>>>,
}

impl PayloadPool {
    /// Smaller payloads are not pooled.
    pub const MIN_POOLED: usize = 16 << 10;
    /// Larger ones are rare; holding them is not worth the memory.
    pub const MAX_POOLED: usize = 4 << 20;
    /// Most bytes of spare capacity held.
    pub const MAX_SPARE_BYTES: usize = 8 << 20;

    /// An empty buffer with room for at least `len` bytes.
    pub fn take(&self, len: usize) -> Vec<u8> {
        if !(Self::MIN_POOLED..=Self::MAX_POOLED).contains(&len) {
            return Vec::with_capacity(len);
        }
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        match spare.iter().position(|b| b.capacity() >= len) {
            Some(i) => spare.swap_remove(i),
            // Rounded up so that a buffer serves the next message of a
            // similar size too.
            None => Vec::with_capacity(len.next_multiple_of(Self::MIN_POOLED)),
        }
    }

    /// Keeps `buffer` for a later [`PayloadPool::take`], if it is worth it
    /// and there is room.
    pub fn give(&self, mut buffer: Vec<u8>) {
        let capacity = buffer.capacity();
        if !(Self::MIN_POOLED..=Self::MAX_POOLED).contains(&capacity) {
            return;
        }
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        let held: usize = spare.iter().map(Vec::capacity).sum();
        if held + capacity <= Self::MAX_SPARE_BYTES {
            buffer.clear();
            spare.push(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_reads_back_from_its_message() {
        let error = TransportError::PeerLost {
            rank: 12,
            host: "node-3.cluster".into(),
            reason: format!("{NOT_RESPONDING}: nothing received for 5.0 s"),
        };
        let line = format!("dsm: rank 0 on node-1: {error}; aborting");
        let lost = LostPeer::find_in(&line).expect("found");
        assert_eq!(lost.rank, 12);
        assert_eq!(lost.host, "node-3.cluster");
        assert_eq!(lost.reason, "not responding: nothing received for 5.0 s");
        assert!(lost.not_responding());
        assert_eq!(LostPeer::find_in("rank 2 exited with status 1"), None);
    }

    #[test]
    fn a_large_buffer_given_back_is_taken_again() {
        let pool = PayloadPool::default();
        let mut first = pool.take(256 << 10);
        assert!(first.capacity() >= 256 << 10);
        first.extend_from_slice(&[7; 100]);
        let address = first.as_ptr();
        pool.give(first);
        let again = pool.take(200 << 10);
        assert_eq!(again.as_ptr(), address, "the spare buffer is reused");
        assert!(again.is_empty(), "and handed out empty");
        // Too small for the next request: a new buffer.
        pool.give(again);
        assert!(pool.take(300 << 10).capacity() >= 300 << 10);
    }

    #[test]
    fn small_and_huge_buffers_are_left_to_the_allocator() {
        let pool = PayloadPool::default();
        pool.give(Vec::with_capacity(64));
        pool.give(Vec::with_capacity(PayloadPool::MAX_POOLED + 1));
        assert!(pool.spare.lock().unwrap().is_empty());
    }

    #[test]
    fn spare_capacity_is_bounded() {
        let pool = PayloadPool::default();
        let size = 1 << 20;
        for _ in 0..2 * PayloadPool::MAX_SPARE_BYTES / size {
            pool.give(Vec::with_capacity(size));
        }
        let held: usize = pool.spare.lock().unwrap().iter().map(Vec::capacity).sum();
        assert!(held <= PayloadPool::MAX_SPARE_BYTES);
        assert!(held >= PayloadPool::MAX_SPARE_BYTES - size);
    }
}
