//! Core of the dsm distributed shared memory system.
//!
//! This crate owns what every layer shares: the launcher-to-process
//! [`bootstrap`] contract, the [`transport`] trait that `transport-tcp` and
//! `transport-rdma` implement, the versioned [`wire`] frame format and the
//! job-secret [`auth`] handshake.

pub mod auth;
pub mod board;
pub mod bootstrap;
pub mod coherence;
pub mod config;
pub mod dsm;
mod engine;
pub mod error;
pub mod fault;
pub mod hang;
pub mod logging;
pub mod memory;
mod outbox;
mod pages;
pub mod proto;
pub mod sched;
pub mod segment;
pub mod sigbus;
pub mod stats;
pub mod sync;
pub mod transport;
pub mod typed;
pub mod wire;

pub use bootstrap::{Bootstrap, BootstrapError, JobSecret};
pub use config::{Config, FaultDelivery, Protocol, PAGE_SIZE};
pub use dsm::{Dsm, DsmError};
pub use segment::{Consistency, Placement, Segment};
pub use stats::StatsSnapshot;
pub use transport::{Message, Rank, Transport, TransportError};
pub use typed::{Epoch, Locked, Reads, SharedArray};
