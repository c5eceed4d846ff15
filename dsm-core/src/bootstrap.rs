//! What a process learns from its launcher.
//!
//! `dsmwrap` starts every rank with these environment variables (documented
//! in `docs/ARCHITECTURE.md`; the names are the constants below):
//!
//! | variable | meaning |
//! | --- | --- |
//! | `DSM_RANK`, `DSM_SIZE` | this process's rank and the number of ranks |
//! | `DSM_PEERS` | comma-separated `ip:port` of every rank's DSM listener, in rank order |
//! | `DSM_HOSTS` | comma-separated host name of every rank, in rank order |
//! | `DSM_LISTEN_FD` | inherited descriptor of this rank's already-listening TCP socket |
//! | `DSM_SECRET_FD` | inherited pipe holding the job secret (64 hex digits); read once, then closed |
//! | `DSM_JOB_ID` | short job identifier for logs |
//!
//! The secret travels through a pipe, never through argv or the environment,
//! so `ps` and `/proc/PID/environ` never show it.
//!
//! [`Bootstrap::from_launcher_env`] reads them. A process started by a
//! scheduler instead (Slurm's `srun`, Open MPI's `mpirun`) builds the same
//! [`Bootstrap`] through a rendezvous with rank 0: that is the launcher's
//! business, done by the `dsm-rendezvous` crate, whose `bootstrap_from_env`
//! takes whichever of the two started the process (it reports its
//! failures here as [`BootstrapError::Join`]).

use std::fs::File;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::stat::{fstat, SFlag};

pub use crate::auth::JobSecret;
use crate::transport::Rank;

/// This process's rank, `0..DSM_SIZE`.
pub const ENV_RANK: &str = "DSM_RANK";
/// Number of ranks in the job.
pub const ENV_SIZE: &str = "DSM_SIZE";
/// Comma-separated `ip:port` of every rank's DSM listener, in rank order.
pub const ENV_PEERS: &str = "DSM_PEERS";
/// Comma-separated host name of every rank, in rank order.
pub const ENV_HOSTS: &str = "DSM_HOSTS";
/// Inherited descriptor of this rank's already-listening TCP socket.
pub const ENV_LISTEN_FD: &str = "DSM_LISTEN_FD";
/// Inherited pipe holding the job secret (64 hex digits).
pub const ENV_SECRET_FD: &str = "DSM_SECRET_FD";
/// Short job identifier for logs (optional).
pub const ENV_JOB_ID: &str = "DSM_JOB_ID";

/// The launcher's hand-over can be taken once per process: the descriptors
/// become owned objects and must not be wrapped twice.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Why a process could not join its job.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    /// Joining the job another way than through dsmexec's hand-over failed,
    /// or no launcher started this process: the typed error of the crate
    /// that tried (`dsm_rendezvous::JoinError`, under srun or mpirun), which
    /// this crate cannot name (it sits below it).
    Join(Box<dyn std::error::Error + Send + Sync>),
    #[error("{name}={value:?} is invalid: {why}")]
    /// A launcher variable has an unusable value.
    BadVariable {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    #[error("{0} is required but not set (was the program started by dsmwrap?)")]
    /// A required launcher variable (named) is unset.
    Missing(&'static str),
    #[error("the launcher hand-over was already taken by an earlier bootstrap in this process (Bootstrap::from_launcher_env, dsm_rendezvous::bootstrap_from_env)")]
    /// The hand-over can be taken once per process, and already was.
    AlreadyTaken,
    #[error("reading the job secret from descriptor {fd}: {source}")]
    /// The secret pipe could not be read, or did not hold a valid secret.
    Secret {
        /// The pipe's descriptor.
        fd: RawFd,
        /// The read error, or `InvalidData` for a malformed secret.
        source: io::Error,
    },
    #[error("cannot create a loopback listener: {0}")]
    /// Binding a loopback listener failed ([`Bootstrap::loopback_group`]).
    Listener(io::Error),
    #[error("handing the job over to a child process: {0}")]
    /// Preparing the hand-over to a child failed ([`Bootstrap::hand_over`]).
    HandOver(io::Error),
}

/// The descriptors a child started by [`Bootstrap::hand_over`] inherits;
/// dropping them closes this process's copies.
pub struct InheritedFds {
    _fds: [OwnedFd; 2],
}

/// One rank as the peer table lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Host name, for messages.
    pub host: String,
    /// Address of the rank's DSM listener.
    pub addr: SocketAddr,
}

/// Everything a rank needs to join its job.
#[derive(Debug)]
pub struct Bootstrap {
    /// This process's rank, below `size`.
    pub rank: Rank,
    /// Number of ranks in the job.
    pub size: usize,
    /// Every rank, this one included, in rank order (`size` entries).
    pub peers: Vec<PeerInfo>,
    /// This rank's listener, bound and listening before the program started.
    pub listener: TcpListener,
    /// The job secret every connection authenticates with.
    pub secret: JobSecret,
    /// Short job identifier for logs; may be empty.
    pub job_id: String,
}

fn var(name: &'static str) -> Result<String, BootstrapError> {
    std::env::var(name).map_err(|_| BootstrapError::Missing(name))
}

fn bad(name: &'static str, value: &str, why: impl Into<String>) -> BootstrapError {
    BootstrapError::BadVariable {
        name,
        value: value.to_string(),
        why: why.into(),
    }
}

fn parse_number(name: &'static str) -> Result<usize, BootstrapError> {
    let value = var(name)?;
    value
        .trim()
        .parse()
        .map_err(|_| bad(name, &value, "expected a non-negative integer"))
}

/// Takes ownership of an inherited descriptor after checking that it is
/// open and of the expected file type, and marks it close-on-exec so it does
/// not leak into the program's own children. Callers hold `TAKEN`.
fn take_inherited_fd(name: &'static str, expect: SFlag) -> Result<OwnedFd, BootstrapError> {
    let value = var(name)?;
    let fd: RawFd = value
        .trim()
        .parse()
        .map_err(|_| bad(name, &value, "expected a file descriptor number"))?;
    if fd < 3 {
        return Err(bad(name, &value, "descriptors 0-2 are stdio"));
    }
    // SAFETY: F_GETFD only queries the descriptor table; any integer is valid input.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad(name, &value, "descriptor is not open"));
    }
    // SAFETY: the descriptor is open (checked above), dsmwrap handed it to this
    // process for this sole purpose, and `TAKEN` ensures it is wrapped once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let stat = fstat(&owned).map_err(|e| bad(name, &value, format!("fstat: {e}")))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != expect {
        return Err(bad(name, &value, "descriptor has the wrong file type"));
    }
    fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| bad(name, &value, format!("fcntl: {e}")))?;
    Ok(owned)
}

impl Bootstrap {
    /// dsmexec's hand-over (see the module documentation): `Ok(None)` when
    /// `DSM_RANK` is unset (dsmexec did not start this process). It can be
    /// taken once per process.
    pub fn from_launcher_env() -> Result<Option<Self>, BootstrapError> {
        if std::env::var_os(ENV_RANK).is_none() {
            return Ok(None);
        }
        let rank = parse_number(ENV_RANK)?;
        let size = parse_number(ENV_SIZE)?;
        if size == 0 || rank >= size {
            return Err(bad(
                ENV_RANK,
                &rank.to_string(),
                format!("must be below {ENV_SIZE}={size}"),
            ));
        }
        let peers_text = var(ENV_PEERS)?;
        let addrs: Vec<SocketAddr> = peers_text
            .split(',')
            .map(|a| a.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e| bad(ENV_PEERS, &peers_text, format!("{e}")))?;
        let hosts_text = var(ENV_HOSTS)?;
        let hosts: Vec<&str> = hosts_text.split(',').collect();
        if addrs.len() != size || hosts.len() != size {
            return Err(bad(
                ENV_PEERS,
                &peers_text,
                format!(
                    "{} addresses and {} hosts for {size} ranks",
                    addrs.len(),
                    hosts.len()
                ),
            ));
        }
        let peers = hosts
            .iter()
            .zip(addrs)
            .map(|(host, addr)| PeerInfo {
                host: host.to_string(),
                addr,
            })
            .collect();
        let job_id = std::env::var(ENV_JOB_ID).unwrap_or_default();

        if TAKEN.swap(true, Ordering::SeqCst) {
            return Err(BootstrapError::AlreadyTaken);
        }
        let listener = TcpListener::from(take_inherited_fd(ENV_LISTEN_FD, SFlag::S_IFSOCK)?);
        let secret_fd = take_inherited_fd(ENV_SECRET_FD, SFlag::S_IFIFO)?;
        let secret_fd_number = secret_fd.as_raw_fd();
        let mut secret_pipe = File::from(secret_fd);
        let mut text = String::new();
        secret_pipe
            .read_to_string(&mut text)
            .map_err(|source| BootstrapError::Secret {
                fd: secret_fd_number,
                source,
            })?;
        let secret = JobSecret::from_hex(&text).ok_or_else(|| BootstrapError::Secret {
            fd: secret_fd_number,
            source: io::Error::new(io::ErrorKind::InvalidData, "not a 64-digit hex secret"),
        })?;
        Ok(Some(Bootstrap {
            rank,
            size,
            peers,
            listener,
            secret,
            job_id,
        }))
    }

    /// A whole job inside one process, on loopback: for tests and benchmarks
    /// of transports without a launcher.
    pub fn loopback_group(size: usize) -> Result<Vec<Bootstrap>, BootstrapError> {
        let secret = JobSecret::generate()
            .map_err(|e| BootstrapError::Listener(io::Error::other(e.to_string())))?;
        let listeners = (0..size)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<io::Result<Vec<_>>>()
            .map_err(BootstrapError::Listener)?;
        let peers = listeners
            .iter()
            .map(|l| {
                Ok(PeerInfo {
                    host: "localhost".to_string(),
                    addr: l.local_addr()?,
                })
            })
            .collect::<io::Result<Vec<_>>>()
            .map_err(BootstrapError::Listener)?;
        Ok(listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| Bootstrap {
                rank,
                size,
                peers: peers.clone(),
                listener,
                secret: secret.clone(),
                job_id: "loopback".to_string(),
            })
            .collect())
    }

    /// Makes `command` start a program that joins the job as this rank
    /// ([`Bootstrap::from_launcher_env`] in it), as dsmwrap hands a rank
    /// over: the `DSM_*` variables, the listener and a pipe holding the
    /// secret, inherited. Keep the returned descriptors until the child is
    /// spawned, then drop them. Until then any program this process starts
    /// inherits them too: call it where no other thread starts one
    /// meanwhile.
    pub fn hand_over(self, command: &mut Command) -> Result<InheritedFds, BootstrapError> {
        let failed = |e: nix::Error| BootstrapError::HandOver(e.into());
        let (secret_read, secret_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(failed)?;
        // 64 hex digits: far below a pipe's buffer, so this cannot block.
        nix::unistd::write(&secret_write, self.secret.to_hex().as_bytes()).map_err(failed)?;
        drop(secret_write);
        let listener = OwnedFd::from(self.listener);
        for fd in [secret_read.as_fd(), listener.as_fd()] {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).map_err(failed)?;
        }
        let join = |items: Vec<String>| items.join(",");
        command
            .env(ENV_RANK, self.rank.to_string())
            .env(ENV_SIZE, self.size.to_string())
            .env(
                ENV_PEERS,
                join(self.peers.iter().map(|p| p.addr.to_string()).collect()),
            )
            .env(
                ENV_HOSTS,
                join(self.peers.iter().map(|p| p.host.clone()).collect()),
            )
            .env(ENV_LISTEN_FD, listener.as_raw_fd().to_string())
            .env(ENV_SECRET_FD, secret_read.as_raw_fd().to_string())
            .env(ENV_JOB_ID, self.job_id);
        Ok(InheritedFds {
            _fds: [listener, secret_read],
        })
    }

    /// Host name of `rank`, for messages.
    pub fn host_of(&self, rank: Rank) -> &str {
        self.peers.get(rank).map(|p| p.host.as_str()).unwrap_or("?")
    }
}
