//! Coherence state machines: pure logic, no sockets, no kernel. The engine
//! feeds them events (local faults, messages, timer ticks) and carries out
//! the [`Action`]s they return, so the same code runs in the DSM, in the
//! randomized simulations and in the exhaustive model checker
//! (`tests/model_check.rs` of dsm-core).
//!
//! * [`mrsw::Mrsw`]: the default, sequentially consistent multi-reader /
//!   single-writer protocol with a directory at each page's home.
//! * [`migratory::Migratory`]: the seed's single-owner protocol.
//! * [`release::Release`]: release consistency with multiple writers
//!   (twins and diffs), for false sharing (`DSM_PROTOCOL=release`, or per
//!   segment); [`twin`]: its twins and diffs of page words.

pub mod migratory;
pub mod mrsw;
pub mod release;
pub mod twin;

pub use migratory::Migratory;
pub use mrsw::Mrsw;

use crate::proto::Msg;
use crate::Rank;

/// An effect a state machine asks the engine to carry out: it touches the
/// mapping, the network or the waiting threads, which the machine never does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send a control message.
    Send {
        /// Destination rank (possibly this one).
        to: Rank,
        /// The message.
        msg: Msg,
    },
    /// Give `page` to `to`: copy it out of memory and drop it if `present`,
    /// else send it as all zeros (it was never touched here).
    GivePage {
        /// The new owner.
        to: Rank,
        /// Page index in the shared space.
        page: usize,
        /// Mapped here (holds bytes), rather than owned but never touched.
        present: bool,
    },
    /// Map the page that just arrived (the grant being handled).
    InstallGranted {
        /// Page index in the shared space.
        page: usize,
    },
    /// Map a zero page: first touch of a page we own that was never written.
    InstallZero {
        /// Page index in the shared space.
        page: usize,
    },
    /// Map pages `first..first + count`, all zeros and writable, in one
    /// system call: never touched, they were taken by this rank at once
    /// (a first touch populating ahead at their home, `Mrsw::populate_ahead`,
    /// or private pages).
    InstallZeros {
        /// The first page (the one faulted on).
        first: usize,
        /// Pages of the run (at least one).
        count: usize,
    },
    /// Wake threads whose fault turned out to be moot.
    Wake {
        /// Page index in the shared space.
        page: usize,
    },
    /// Multi-reader: map the page carried by the grant being handled
    /// (its bytes, or zeros), read-only or writable.
    Install {
        /// Page index in the shared space.
        page: usize,
        /// Map it writable (a write grant) rather than write-protected.
        writable: bool,
    },
    /// Multi-reader upgrade: lift the write protection of our read-only copy.
    MakeWritable {
        /// Page index in the shared space.
        page: usize,
    },
    /// Drop our read-only copy (invalidation).
    DropPage {
        /// Page index in the shared space.
        page: usize,
    },
    /// Send our exclusive copy to the home: write-protect it, copy it out,
    /// and drop it unless `keep_shared` (then it stays mapped read-only).
    WriteBack {
        /// The page's home.
        to: Rank,
        /// Page index in the shared space.
        page: usize,
        /// Keep the copy mapped read-only instead of dropping it.
        keep_shared: bool,
    },
    /// Eviction of our writable copy (multi-reader): write-protect it, copy
    /// it out, drop it and release its frame, and send the bytes to the
    /// home (`Msg::EvictedWriteBack`).
    EvictWriteBack {
        /// The page's home.
        to: Rank,
        /// Page index in the shared space.
        page: usize,
    },
    /// Home: keep the page carried by the write-back being handled.
    StoreBacking {
        /// Page index in the shared space.
        page: usize,
    },
    /// Home: grant `to` the page from the home's copy (zeros if never written).
    GrantFromBacking {
        /// The requester.
        to: Rank,
        /// Page index in the shared space.
        page: usize,
        /// A write grant (exclusive copy) rather than a read-only copy.
        write: bool,
    },
    /// A store hit a sealed page: the application made an error.
    SealedWrite {
        /// Page index in the shared space.
        page: usize,
    },
    /// Release consistency: keep a twin of `page` (its bytes as they are
    /// now), before it is made writable.
    TakeTwin {
        /// Page index in the shared space.
        page: usize,
    },
    /// Release consistency: map the granted bytes of `page` (fetched to be
    /// written) writable, keeping a twin of them: `Install`, `TakeTwin`
    /// and `MakeWritable` in one step.
    InstallTwinned {
        /// Page index in the shared space.
        page: usize,
    },
    /// Release consistency: write-protect `page`, compare it with its twin,
    /// send the words that differ to `to` (`Msg::Diff`, acknowledged by
    /// `Msg::DiffAck`), drop the twin.
    SendDiff {
        /// The page's home.
        to: usize,
        /// Page index in the shared space.
        page: usize,
    },
    /// Release consistency, before a barrier entry: write-protect `page`
    /// (a copy or a master copy), compare it with its twin, add the words
    /// that differ to the entry (`Msg::BarrierEnter::updates`), drop the
    /// twin.
    CollectDiff {
        /// Page index in the shared space.
        page: usize,
    },
    /// Release consistency, home: write the diff being handled into the
    /// home's copy of `page` (mapping it first, zeros, if never touched).
    ApplyDiff {
        /// Page index in the shared space.
        page: usize,
    },
    /// Release consistency: write the merged diff of `page` that the
    /// barrier release being handled carries into this rank's copy (or
    /// master copy: the merge of the others' diffs) and into its twin,
    /// but for the words this rank changed since the twin (later ones:
    /// `twin::apply_unless_changed`); twinned and writable by the actions
    /// before.
    ApplyUpdates {
        /// Page index in the shared space.
        page: usize,
    },
    /// Release consistency, home: write-protect the master copy of `page`
    /// before its first copy leaves, so the home's next store takes a twin
    /// (its writes then reach the copies with its barrier diffs).
    Protect {
        /// Page index in the shared space.
        page: usize,
    },
    /// Release consistency: every diff of the release is acknowledged (or,
    /// for a barrier entry, collected); the synchronization waiting on it
    /// may go on.
    Released,
    /// Release consistency: barrier `epoch`'s release was handled here (its
    /// diffs written into the copies and master copies this rank holds):
    /// the barrier may be passed here.
    BarrierDiffsIn {
        /// The barrier's number.
        epoch: u64,
    },
    /// The home finished sealing or flushing `page`: no writable copy is
    /// left and the home's copy is current.
    Settled {
        /// Page index in the shared space.
        page: usize,
    },
}

/// An event a state machine cannot accept: a bad page or rank, or a
/// message that breaks the protocol (a bug or a corrupted peer, not a
/// condition to retry).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoherenceError {
    /// The page index is not below the number of pages of the space.
    #[error("page {page} is outside the shared space ({pages} pages)")]
    NoSuchPage {
        /// The page asked about.
        page: usize,
        /// Pages of the space.
        pages: usize,
    },
    /// Migratory: a page arrived that this rank is not fetching, or already owns.
    #[error("rank {from} granted page {page}, which this rank did not request")]
    UnexpectedGrant {
        /// The page granted.
        page: usize,
        /// The rank that sent it.
        from: Rank,
    },
    /// A message claims to come from a rank not below the job's size.
    #[error("request for page {page} from rank {requester}, outside the job")]
    BadRequester {
        /// The page asked for (0 from `Mrsw::on_message`, which checks the
        /// sender before the message).
        page: usize,
        /// The out-of-range rank.
        requester: Rank,
    },
    /// Multi-reader: a message that the page's state at this rank does
    /// not allow (wrong sender, not asked for, or of another protocol).
    #[error("rank {from} sent {what} for page {page}, which does not fit its state here")]
    Unexpected {
        /// The page concerned (0 for a message of another protocol).
        page: usize,
        /// The sender.
        from: Rank,
        /// What was received, as a phrase ("an unexpected write-back").
        what: &'static str,
    },
}

/// Counters the state machine keeps itself.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProtocolCounters {
    /// Requests passed on to a probable owner (migratory).
    pub forwarded: u64,
    /// Requests queued until the page is free: behind the home's
    /// transaction in progress (multi-reader), or until the page's own
    /// fetch or hold ends (migratory).
    pub deferred: u64,
    /// Read-only copies a home handed to ranks that did not ask
    /// (multi-reader `push`).
    pub pushed: u64,
}
