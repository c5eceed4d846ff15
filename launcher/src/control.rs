//! The control channel between dsmexec and each dsmwrap: one authenticated
//! TCP connection per process, JSON messages in `dsm_core::wire` frames.
//!
//! ```text
//! wrap -> exec   Hello { .. } | ProgramError { .. }   (right after authentication)
//! exec -> wrap   Launch { rank, size, peers, .. }
//! wrap -> exec   Started { pid }
//! exec -> wrap   Signal { signo } | Stop { grace_ms }  (any time)
//! wrap -> exec   Exited { status, likely_cause }
//! ```
//! If the connection drops, dsmwrap stops its program: no process outlives
//! its launcher.

use std::io::{BufWriter, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use dsm_core::wire::{self, WireError};
use serde::{Deserialize, Serialize};

const KIND_CONTROL: u8 = 0x10;
const MAX_CONTROL_FRAME: u32 = 16 << 20;
/// Identity a dsmwrap announces in the authentication handshake, followed
/// by its slot number (see [`wrap_ident`]).
pub const WRAP_IDENT_PREFIX: &str = "dsmwrap slot ";

/// A message from dsmwrap to dsmexec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum WrapToExec {
    /// The wrapper is ready: the program can run here and its rank's DSM
    /// listener is bound.
    Hello {
        /// The wrapper's slot.
        slot: usize,
        /// This host's name.
        hostname: String,
        /// Where this rank's DSM listener is bound.
        listen: SocketAddr,
    },
    /// The program cannot be run on this host (missing, not executable...).
    ProgramError {
        /// The wrapper's slot.
        slot: usize,
        /// This host's name.
        hostname: String,
        /// Why the program cannot run.
        message: String,
    },
    /// The program was started.
    Started {
        /// Its pid, also its process group id.
        pid: i32,
    },
    /// The program ended.
    Exited {
        /// How it ended.
        status: ExitCause,
        /// What the host knows of why, when the status alone does not say
        /// (a SIGKILL while the kernel's OOM killer ran).
        #[serde(default)]
        likely_cause: Option<String>,
    },
}

/// A message from dsmexec to dsmwrap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ExecToWrap {
    /// Every slot said hello: start the program as this rank.
    Launch {
        /// The wrapper's rank.
        rank: usize,
        /// Number of ranks in the job.
        size: usize,
        /// Each rank's DSM listener, indexed by rank.
        peers: Vec<SocketAddr>,
        /// Each rank's host name, indexed by rank (for messages).
        hosts: Vec<String>,
        /// Variables to set in the program's environment.
        env: Vec<(String, String)>,
        /// The job's label for logs (not a secret).
        job_id: String,
    },
    /// Deliver this signal to the program's process group.
    Signal {
        /// The signal number.
        signo: i32,
    },
    /// SIGTERM the program now, SIGKILL after the grace period.
    Stop {
        /// The grace period in milliseconds (0: SIGKILL at once).
        grace_ms: u64,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ExitCause {
    /// It exited with this status.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitCause {
    /// From a process's exit status (`Code(255)` if it says neither).
    pub fn from_status(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitCause::Code(code),
            (None, Some(sig)) => ExitCause::Signal(sig),
            (None, None) => ExitCause::Code(255),
        }
    }

    /// Whether the process exited with status 0.
    pub fn success(self) -> bool {
        self == ExitCause::Code(0)
    }

    /// The shell's convention: a signal death is 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitCause::Code(c) => c,
            ExitCause::Signal(s) => 128 + s,
        }
    }

    /// How it ended, as a predicate for messages: "exited with status 1",
    /// "was killed by signal 9 (SIGKILL)".
    pub fn describe(self) -> String {
        match self {
            ExitCause::Code(c) => format!("exited with status {c}"),
            ExitCause::Signal(s) => format!("was killed by signal {s} ({})", signal_name(s)),
        }
    }
}

/// The name of a signal, e.g. `SIGTERM` (`signal N` when unknown).
pub fn signal_name(signo: i32) -> String {
    nix::sys::signal::Signal::try_from(signo)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {signo}"))
}

/// A failure on the control connection.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Reading or writing a frame failed (I/O error, closed connection,
    /// frame of the wrong kind or too large).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A frame's JSON could not be encoded or decoded.
    #[error("malformed control message: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Writes `msg` as one JSON control frame and flushes it.
pub fn send<T: Serialize>(stream: &mut BufWriter<TcpStream>, msg: &T) -> Result<(), ControlError> {
    let bytes = serde_json::to_vec(msg)?;
    wire::write_frame(stream, KIND_CONTROL, &bytes).map_err(WireError::Io)?;
    stream.flush().map_err(WireError::Io)?;
    Ok(())
}

/// Reads the next control frame and decodes its JSON (frames up to 16 MiB).
pub fn recv<T: for<'de> Deserialize<'de>>(
    stream: &mut impl std::io::Read,
) -> Result<T, ControlError> {
    let payload = wire::read_frame_of(stream, KIND_CONTROL, MAX_CONTROL_FRAME)?;
    Ok(serde_json::from_slice(&payload)?)
}

/// The identity dsmwrap of `slot` authenticates with.
pub fn wrap_ident(slot: usize) -> Vec<u8> {
    format!("{WRAP_IDENT_PREFIX}{slot}").into_bytes()
}

/// The slot an identity from [`wrap_ident`] names, if it is one.
pub fn slot_from_ident(ident: &[u8]) -> Option<usize> {
    std::str::from_utf8(ident)
        .ok()?
        .strip_prefix(WRAP_IDENT_PREFIX)?
        .parse()
        .ok()
}
