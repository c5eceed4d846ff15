//! Joining a dsm job started by a scheduler (Slurm `srun`, Open MPI
//! `mpirun`) instead of dsmexec, and [`bootstrap_from_env`]: the
//! [`Bootstrap`] of this process, whichever launcher started it.
//!
//! This is the launcher's business, not the DSM's: `dsm-core` only reads
//! dsmexec's hand-over ([`Bootstrap::from_launcher_env`]); this crate
//! recognises the schedulers and builds the same [`Bootstrap`] without
//! dsmexec. `dsm::init` calls [`bootstrap_from_env`].
//!
//! A scheduler gives each process its rank and the job size, but no
//! listening socket and no secret. The ranks meet through rank 0:
//!
//! 1. Rank 0 creates the job secret, binds one rendezvous listener on each
//!    address it publishes (never on every interface unless
//!    `DSM_RENDEZVOUS_BIND=any`), and publishes those addresses and the
//!    secret in `DIR/KEY.rv`: DIR is `DSM_RENDEZVOUS_DIR`
//!    (default `$HOME/.dsm/rendezvous`), a directory private to the user
//!    (mode 0700) on a file system every node sees; the file is written
//!    under a temporary name with mode 0600 and renamed into place. KEY
//!    names the job step (`slurm-CLUSTER-JOB.STEP`,
//!    `ompi-JOBID-HASH`), so concurrent jobs never meet.
//! 2. Every other rank waits for the file, connects to one of the published
//!    addresses, authenticates with the secret (the handshake of
//!    [`dsm_core::auth`]), binds its DSM listener on the local address of that
//!    connection (the address facing rank 0) and registers: rank, size,
//!    host, port.
//! 3. When every rank has registered, rank 0 removes the file, binds its DSM
//!    listener on the address the others reached it on (every interface only
//!    when they reached it on different addresses, or when asked), and sends
//!    each rank the peer table; rank 0's entry carries the address that rank
//!    reached it on. Any failure (a rank missing at the deadline, sizes that
//!    disagree) is sent to every registered rank, so they all report it.
//!    A rank 0 killed during the rendezvous leaves its file behind; the file
//!    carries its expiry time, and the next rank 0 to publish in the same
//!    directory removes the expired ones.
//!
//! Everything is bounded by `DSM_RENDEZVOUS_TIMEOUT` (seconds, default
//! 120): waiting for the file, reaching rank 0, waiting for the table.
//! `DSM_RENDEZVOUS_ADDR` (comma-separated IPs) replaces the addresses rank 0
//! publishes (by default: its host name's addresses, its other interfaces'
//! IPv4 addresses, then 127.0.0.1).
//!
//! The modules: `detect` (which scheduler started this process: [`detect`]),
//! `settings` (the `DSM_RENDEZVOUS_*` variables: [`Settings`]) and `meet`
//! (the file and the registrations: [`join`]); the vocabulary they share
//! ([`SchedulerJob`], [`RendezvousError`]) is defined here.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dsm_core::bootstrap::{Bootstrap, BootstrapError, ENV_RANK};

mod detect;
mod meet;
mod settings;

pub use detect::{detect, detect_with};
pub use meet::join;
pub use settings::{Settings, DEFAULT_TIMEOUT, ENV_ADDR, ENV_BIND, ENV_DIR, ENV_TIMEOUT};

/// The scheduler variables that say this process is a task of a job step.
const SCHEDULER_RANKS: [&str; 2] = ["OMPI_COMM_WORLD_RANK", "SLURM_PROCID"];

/// A process joins its job once: a second rendezvous would meet nobody.
/// (dsmexec's hand-over has its own guard in `dsm-core`.)
static JOINED: AtomicBool = AtomicBool::new(false);

/// True when this process was started by a launcher: dsmexec (`DSM_RANK`),
/// or a scheduler this crate can meet through (srun, mpirun).
pub fn launched() -> bool {
    std::env::var_os(ENV_RANK).is_some()
        || SCHEDULER_RANKS
            .iter()
            .any(|v| std::env::var_os(v).is_some())
}

/// Joins the job, whichever launcher started this process: reads dsmexec's
/// hand-over when `DSM_RANK` is set ([`Bootstrap::from_launcher_env`]), or
/// meets the other ranks through rank 0 when `srun` or `mpirun` started it
/// ([`detect`], [`join`]; this blocks until every rank has arrived, at most
/// `DSM_RENDEZVOUS_TIMEOUT`).
pub fn bootstrap_from_env() -> Result<Bootstrap, JoinError> {
    if let Some(boot) = Bootstrap::from_launcher_env()? {
        return Ok(boot);
    }
    let Some(job) = detect()? else {
        return Err(JoinError::NotLaunched);
    };
    if JOINED.swap(true, Ordering::SeqCst) {
        return Err(BootstrapError::AlreadyTaken.into());
    }
    let settings = Settings::from_env()?;
    Ok(join(&job, &settings)?)
}

/// Why a process could not join its job ([`bootstrap_from_env`]).
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("no launcher started this program ({ENV_RANK}, SLURM_PROCID and OMPI_COMM_WORLD_RANK are unset): start it with e.g. `dsmexec -n 4 PROGRAM`, `dsmexec MACHINEFILE PROGRAM`, `srun -n 4 PROGRAM` or `mpirun -np 4 PROGRAM`")]
    /// Neither dsmexec nor a known scheduler started this process.
    NotLaunched,
    #[error(transparent)]
    /// dsmexec's hand-over is unusable, or this process already joined.
    Bootstrap(#[from] BootstrapError),
    #[error("joining the job: {0}")]
    /// Meeting the other ranks through rank 0 failed (srun, mpirun).
    Rendezvous(#[from] RendezvousError),
}

/// For callers whose errors hold `dsm-core`'s (`dsm::init`): a hand-over
/// error stays itself, the others are boxed in [`BootstrapError::Join`].
impl From<JoinError> for BootstrapError {
    fn from(e: JoinError) -> BootstrapError {
        match e {
            JoinError::Bootstrap(e) => e,
            other => BootstrapError::Join(Box::new(other)),
        }
    }
}

/// Which scheduler started this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    /// Slurm's `srun`.
    Slurm,
    /// Open MPI's `mpirun`.
    OpenMpi,
}

impl std::fmt::Display for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scheduler::Slurm => "srun",
            Scheduler::OpenMpi => "mpirun",
        })
    }
}

/// This process's place in a job started by a scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerJob {
    /// The scheduler that started this process.
    pub scheduler: Scheduler,
    /// This process's rank, below `size`.
    pub rank: usize,
    /// Number of ranks in the job step.
    pub size: usize,
    /// Names the rendezvous file: identical on every rank of the job step,
    /// different for any other step.
    pub key: String,
    /// Job label for logs.
    pub job_id: String,
    /// This rank's host name, for messages.
    pub host: String,
}

/// Why a rank could not join a scheduler-started job.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("{name} is required when started by {scheduler} but not set")]
    /// A variable the scheduler should have set is unset.
    Missing {
        /// The scheduler detected.
        scheduler: Scheduler,
        /// The variable.
        name: &'static str,
    },
    #[error("{name}={value:?} is invalid: {why}")]
    /// A variable has an unusable value.
    BadVariable {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    #[error("SLURM_PROCID is set but SLURM_STEP_ID is not: this is the batch script itself, not a job step; start the program with `srun PROGRAM` (or dsmexec / mpirun)")]
    /// Running in a Slurm batch script rather than in a job step.
    BatchStep,
    #[error("rendezvous directory {dir}: {why}")]
    /// The rendezvous directory cannot be named (no `HOME`), created or
    /// used, or is not private to the user.
    Directory {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    #[error("rendezvous file {path}: {why}")]
    /// A rendezvous file could not be written, read or parsed, or was
    /// published for another job (key or size).
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    #[error("rank {rank}: rank 0's rendezvous file {path} did not appear within {secs} s; is rank 0 running, and is {ENV_DIR} ({dir}) on a file system shared by every node of the job?", secs = .waited.as_secs())]
    /// Rank 0's file did not appear before the deadline.
    NoFile {
        /// This rank.
        rank: usize,
        /// The file waited for.
        path: PathBuf,
        /// The rendezvous directory.
        dir: PathBuf,
        /// How long this rank waited.
        waited: Duration,
    },
    #[error("rank {rank}: cannot reach rank 0 on host {host} at {addrs} (from {path}) within {secs} s: {last}", secs = .waited.as_secs())]
    /// Rank 0 published its addresses but none answered before the deadline.
    Unreachable {
        /// This rank.
        rank: usize,
        /// Rank 0's host, as published.
        host: String,
        /// The published addresses, comma-separated.
        addrs: String,
        /// The rendezvous file.
        path: PathBuf,
        /// How long this rank tried.
        waited: Duration,
        /// The last connection error.
        last: String,
    },
    #[error("rank {rank}: rank 0 on host {host} ended the rendezvous: {why}")]
    /// Rank 0 ended the rendezvous with an error, or the exchange with it
    /// failed (no peer table in time, a malformed one).
    FromRankZero {
        /// This rank.
        rank: usize,
        /// Rank 0's host.
        host: String,
        /// Rank 0's message, or what went wrong.
        why: String,
    },
    #[error("rank 0: {missing} of {size} did not register within {secs} s (rendezvous file {path}); did they start, and do they see {ENV_DIR} ({dir})?", secs = .waited.as_secs())]
    /// Rank 0: some ranks had not registered by the deadline.
    Incomplete {
        /// The missing ranks, as text (`rank 3`, `ranks 2, 5`).
        missing: String,
        /// Number of ranks in the job.
        size: usize,
        /// The rendezvous file.
        path: PathBuf,
        /// The rendezvous directory.
        dir: PathBuf,
        /// How long rank 0 waited.
        waited: Duration,
    },
    #[error(
        "rank 0: rank {rank} on host {host} says the job has {theirs} ranks, rank 0 says {ours}"
    )]
    /// Rank 0: a rank registered with another job size.
    SizeMismatch {
        /// The registering rank.
        rank: usize,
        /// Its host.
        host: String,
        /// The size it reported.
        theirs: usize,
        /// Rank 0's size.
        ours: usize,
    },
    #[error("rendezvous: {what}: {source}")]
    /// An I/O operation of the rendezvous failed.
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RendezvousError {
    let what = what.into();
    move |source| RendezvousError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_errors_keep_their_messages_through_bootstrap_error() {
        let not_launched = BootstrapError::from(JoinError::NotLaunched);
        assert!(matches!(not_launched, BootstrapError::Join(_)));
        assert!(
            not_launched
                .to_string()
                .starts_with("no launcher started this program (DSM_RANK, SLURM_PROCID"),
            "{not_launched}"
        );
        let rendezvous = BootstrapError::from(JoinError::from(RendezvousError::BatchStep));
        assert!(
            rendezvous
                .to_string()
                .starts_with("joining the job: SLURM_PROCID is set"),
            "{rendezvous}"
        );
        // A hand-over error is itself again, not boxed.
        let hand_over = BootstrapError::from(JoinError::from(BootstrapError::Missing("DSM_SIZE")));
        assert!(matches!(hand_over, BootstrapError::Missing("DSM_SIZE")));
    }
}
