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
pub const WRAP_IDENT_PREFIX: &str = "dsmwrap slot ";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum WrapToExec {
    Hello {
        slot: usize,
        hostname: String,
        /// Where this rank's DSM listener is bound.
        listen: SocketAddr,
    },
    /// The program cannot be run on this host (missing, not executable...).
    ProgramError {
        slot: usize,
        hostname: String,
        message: String,
    },
    Started {
        pid: i32,
    },
    Exited {
        status: ExitCause,
        /// What the host knows of why, when the status alone does not say
        /// (a SIGKILL while the kernel's OOM killer ran).
        #[serde(default)]
        likely_cause: Option<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ExecToWrap {
    Launch {
        rank: usize,
        size: usize,
        peers: Vec<SocketAddr>,
        hosts: Vec<String>,
        env: Vec<(String, String)>,
        job_id: String,
    },
    /// Deliver this signal to the program's process group.
    Signal { signo: i32 },
    /// SIGTERM the program now, SIGKILL after the grace period.
    Stop { grace_ms: u64 },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ExitCause {
    Code(i32),
    Signal(i32),
}

impl ExitCause {
    pub fn from_status(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitCause::Code(code),
            (None, Some(sig)) => ExitCause::Signal(sig),
            (None, None) => ExitCause::Code(255),
        }
    }

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

    pub fn describe(self) -> String {
        match self {
            ExitCause::Code(c) => format!("exited with status {c}"),
            ExitCause::Signal(s) => format!("was killed by signal {s} ({})", signal_name(s)),
        }
    }
}

pub fn signal_name(signo: i32) -> String {
    nix::sys::signal::Signal::try_from(signo)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {signo}"))
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("malformed control message: {0}")]
    Decode(#[from] serde_json::Error),
}

pub fn send<T: Serialize>(stream: &mut BufWriter<TcpStream>, msg: &T) -> Result<(), ControlError> {
    let bytes = serde_json::to_vec(msg)?;
    wire::write_frame(stream, KIND_CONTROL, &bytes).map_err(WireError::Io)?;
    stream.flush().map_err(WireError::Io)?;
    Ok(())
}

pub fn recv<T: for<'de> Deserialize<'de>>(
    stream: &mut impl std::io::Read,
) -> Result<T, ControlError> {
    let payload = wire::read_frame_of(stream, KIND_CONTROL, MAX_CONTROL_FRAME)?;
    Ok(serde_json::from_slice(&payload)?)
}

pub fn wrap_ident(slot: usize) -> Vec<u8> {
    format!("{WRAP_IDENT_PREFIX}{slot}").into_bytes()
}

pub fn slot_from_ident(ident: &[u8]) -> Option<usize> {
    std::str::from_utf8(ident)
        .ok()?
        .strip_prefix(WRAP_IDENT_PREFIX)?
        .parse()
        .ok()
}
