//! [`DsmError`]: why a DSM call, or the DSM itself, failed. Its own module
//! so that every layer that fails (the engine, the API) names it without
//! depending on the API's module.

use crate::bootstrap::BootstrapError;
use crate::coherence::twin::DiffError;
use crate::coherence::CoherenceError;
use crate::config::ConfigError;
use crate::fault::FaultError;
use crate::{Rank, TransportError};

/// Why a DSM call (or the DSM itself) failed. Each message names the
/// problem and, where there is one, the setting that fixes it.
#[derive(Debug, thiserror::Error)]
pub enum DsmError {
    /// A bad `DSM_*` setting.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The process was not started by a launcher, or its start-up data is wrong.
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// Mapping the space or an operation on its pages (userfaultfd) failed.
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// A peer was lost, or the transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The coherence protocol met an event its state forbids.
    #[error("coherence: {0}")]
    Coherence(#[from] CoherenceError),
    /// A diff that does not fit a page (release consistency).
    #[error("diff: {0}")]
    Diff(#[from] DiffError),
    /// A peer sent a message this rank's state forbids.
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("the shared space ({size} bytes) is larger than this machine's memory ({ram} bytes RAM + {swap} bytes swap), and the migratory protocol evicts nothing (any rank may end up holding every page); lower DSM_SPACE_SIZE, or use DSM_PROTOCOL=mrsw (the default), whose per-rank cache is bounded by DSM_CACHE_SIZE")]
    /// The space cannot fit this machine under the migratory protocol.
    TooLarge {
        /// Bytes of the space.
        size: usize,
        /// Bytes of RAM on this machine.
        ram: u64,
        /// Bytes of swap on this machine.
        swap: u64,
    },
    #[error("rank {rank} on {host}: {what} needs {need} bytes on {host}, which has {memory} bytes of RAM + swap; {fix}")]
    /// Something would not fit in a host's memory (checked at start and at
    /// each allocation).
    NoRoom {
        /// The rank that checked.
        rank: Rank,
        /// The host that lacks the room.
        host: String,
        /// What needs it.
        what: String,
        /// Bytes needed on that host.
        need: u64,
        /// Bytes of RAM + swap of a node.
        memory: u64,
        /// The setting to change.
        fix: &'static str,
    },
    #[error("out of memory: {available} bytes left of {total} in {scope}, while this rank holds {cached} bytes of other ranks' pages (its cache) beside the pages it is home of; spread the data over more ranks or hosts, or lower DSM_CACHE_SIZE")]
    /// The rank is about to run out of memory (checked as pages arrive).
    OutOfMemory {
        /// Bytes left.
        available: u64,
        /// Bytes in all.
        total: u64,
        /// Where: the node, or the rank's memory cgroup.
        scope: &'static str,
        /// Bytes of other ranks' pages this rank holds.
        cached: u64,
    },
    /// A service thread (fault reader, engine) could not start or failed.
    #[error("the fault reader failed: {0}")]
    FaultReader(String),
    /// The engine has stopped (after a fatal error, or at finalize).
    #[error("the DSM engine has stopped")]
    Stopped,
    #[error("store to sealed replicated segment {segment} at {addr:#x}: the segment is read-only after seal()")]
    /// A store to a sealed replicated segment.
    SealedWrite {
        /// The segment's id.
        segment: u32,
        /// The address stored to.
        addr: usize,
    },
    #[error("access to unallocated shared memory at {addr:#x} (the upper half of the space is the heap: allocate with dsm.alloc / dsm_malloc first)")]
    /// An access to heap memory no segment covers.
    Unallocated {
        /// The address accessed.
        addr: usize,
    },
    /// An allocation or a segment operation was refused (heap full, wrong
    /// rank, not a replicated segment...).
    #[error("{0}")]
    Segment(String),
}
