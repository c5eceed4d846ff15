//! The transport trait: reliable, ordered messages between the ranks of a
//! job. `transport-tcp` and `transport-rdma` implement it; the layers above
//! never see sockets or queue pairs.

use std::time::Duration;

use crossbeam_channel::Receiver;

/// What a transport delivers: a message, or the news that a peer is gone.
pub type Incoming = Result<Message, TransportError>;

/// Index of a process in the job, `0..size`.
pub type Rank = usize;

/// One message as received: who sent it and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub from: Rank,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("lost rank {rank} on host {host}: {reason}")]
    PeerLost {
        rank: Rank,
        host: String,
        reason: String,
    },
    #[error("rank {rank} is outside the job (size {size})")]
    NoSuchRank { rank: Rank, size: usize },
    #[error("message of {len} bytes exceeds the transport's limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("connecting the job: {0}")]
    Setup(String),
    #[error("the transport was shut down")]
    Shutdown,
}

/// Reliable in-order delivery between every pair of ranks.
///
/// * Messages from one rank to another arrive in the order they were sent,
///   exactly once, or the receiver learns that the sender is lost.
/// * `send` may be called from several threads at once; each message is
///   delivered whole, never interleaved with another.
/// * Sending to oneself is allowed and loops back.
pub trait Transport: Send + Sync {
    fn rank(&self) -> Rank;
    fn size(&self) -> usize;

    /// Sends one message made of the concatenation of `parts` (a header and
    /// a page, say) without the caller having to copy them together.
    fn send_parts(&self, to: Rank, parts: &[&[u8]]) -> Result<(), TransportError>;

    fn send(&self, to: Rank, payload: &[u8]) -> Result<(), TransportError> {
        self.send_parts(to, &[payload])
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

    /// Says goodbye to every peer and closes the connections once their
    /// goodbyes arrived (or `timeout` passed). Messages already sent are
    /// delivered first.
    fn shutdown(&self, timeout: Duration) -> Result<(), TransportError>;
}
