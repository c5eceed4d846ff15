//! Coherence state machines: pure logic, no sockets, no kernel. The engine
//! feeds them events (local faults, messages, timer ticks) and carries out
//! the [`Action`]s they return, so the same code runs in the DSM, in the
//! randomized simulations and in the exhaustive model checker
//! (`tests/model_check.rs` of dsm-core).
//!
//! * [`mrsw::Mrsw`]: the default, sequentially consistent multi-reader /
//!   single-writer protocol with a directory at each page's home.
//! * [`migratory::Migratory`]: the seed's single-owner protocol.

pub mod migratory;
pub mod mrsw;

pub use migratory::Migratory;
pub use mrsw::Mrsw;

use crate::proto::Msg;
use crate::Rank;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send a control message.
    Send { to: Rank, msg: Msg },
    /// Give `page` to `to`: copy it out of memory and drop it if `present`,
    /// else send it as all zeros (it was never touched here).
    GivePage {
        to: Rank,
        page: usize,
        present: bool,
    },
    /// Map the page that just arrived (the grant being handled).
    InstallGranted { page: usize },
    /// Map a zero page: first touch of a page we own that was never written.
    InstallZero { page: usize },
    /// Wake threads whose fault turned out to be moot.
    Wake { page: usize },
    /// Multi-reader: map the page carried by the grant being handled
    /// (its bytes, or zeros), read-only or writable.
    Install { page: usize, writable: bool },
    /// Multi-reader upgrade: lift the write protection of our read-only copy.
    MakeWritable { page: usize },
    /// Drop our read-only copy (invalidation).
    DropPage { page: usize },
    /// Send our exclusive copy to the home: write-protect it, copy it out,
    /// and drop it unless `keep_shared` (then it stays mapped read-only).
    WriteBack {
        to: Rank,
        page: usize,
        keep_shared: bool,
    },
    /// Eviction of our writable copy (multi-reader): write-protect it, copy
    /// it out, drop it and release its frame, and send the bytes to the
    /// home (`Msg::EvictedWriteBack`).
    EvictWriteBack { to: Rank, page: usize },
    /// Home: keep the page carried by the write-back being handled.
    StoreBacking { page: usize },
    /// Home: grant `to` the page from the home's copy (zeros if never written).
    GrantFromBacking { to: Rank, page: usize, write: bool },
    /// A store hit a sealed page: the application made an error.
    SealedWrite { page: usize },
    /// The home finished sealing or flushing `page`: no writable copy is
    /// left and the home's copy is current.
    Settled { page: usize },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoherenceError {
    #[error("page {page} is outside the shared space ({pages} pages)")]
    NoSuchPage { page: usize, pages: usize },
    #[error("rank {from} granted page {page}, which this rank did not request")]
    UnexpectedGrant { page: usize, from: Rank },
    #[error("request for page {page} from rank {requester}, outside the job")]
    BadRequester { page: usize, requester: Rank },
    #[error("rank {from} sent {what} for page {page}, which does not fit its state here")]
    Unexpected {
        page: usize,
        from: Rank,
        what: &'static str,
    },
}

/// Counters the state machine keeps itself.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProtocolCounters {
    pub forwarded: u64,
    pub deferred: u64,
}
