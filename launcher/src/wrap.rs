//! dsmwrap: runs on each host, between dsmexec and one rank's program.
//!
//! It reads the job secret from stdin (never from argv), connects back to
//! dsmexec and authenticates, checks that the program can run here, binds
//! the rank's DSM listener, reports it, waits for the peer table, then
//! starts the program with the bootstrap environment (see
//! `dsm_core::bootstrap`) and supervises it: signals and stop requests
//! from dsmexec reach the program's process group, its exit status goes
//! back to dsmexec, and if dsmexec disappears the program is stopped.

use std::io::{BufRead, BufWriter};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use dsm_core::auth::{self, JobSecret};
use dsm_core::bootstrap::{Bootstrap, PeerInfo};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{access, AccessFlags, Pid};

use crate::control::{self, ExecToWrap, ExitCause, WrapToExec};

/// Grace period when dsmexec vanished and nobody can tell us how long.
const ORPHAN_GRACE: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// dsmwrap's command line.
pub struct WrapArgs {
    /// `IP:PORT`, or `ssh-client:PORT` to take dsmexec's address from `SSH_CLIENT`.
    pub connect: String,
    /// This process's slot in the job (its rank).
    pub slot: usize,
    /// Directory to run the program in; one that cannot be entered is
    /// reported and the current one kept.
    pub cwd: Option<PathBuf>,
    /// The program, as given to dsmexec (see [`resolve_program`]).
    pub program: String,
    /// The program's arguments.
    pub args: Vec<String>,
}

/// Runs dsmwrap; returns the exit code (the program's, as a shell reports it).
pub fn run(args: WrapArgs) -> Result<i32> {
    let secret = read_secret()?;
    let addr = resolve_connect(&args.connect)?;
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("cannot reach dsmexec at {addr}"))?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    stream.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    auth::connect(&mut stream, &secret, &control::wrap_ident(args.slot))
        .with_context(|| format!("authenticating with dsmexec at {addr}"))?;
    stream.set_nodelay(true)?;
    let mut writer = BufWriter::new(stream.try_clone()?);
    let mut reader = stream.try_clone()?;
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into());

    if let Some(dir) = &args.cwd {
        if let Err(e) = std::env::set_current_dir(dir) {
            eprintln!(
                "dsmwrap: cannot enter {} on {hostname} ({e}); running in {}",
                dir.display(),
                std::env::current_dir()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default()
            );
        }
    }
    let program = match resolve_program(&args.program) {
        Ok(p) => p,
        Err(message) => {
            let msg = WrapToExec::ProgramError {
                slot: args.slot,
                hostname,
                message,
            };
            control::send(&mut writer, &msg)?;
            return Ok(127);
        }
    };

    let listener =
        TcpListener::bind((stream.local_addr()?.ip(), 0)).context("binding the DSM listener")?;
    control::send(
        &mut writer,
        &WrapToExec::Hello {
            slot: args.slot,
            hostname,
            listen: listener.local_addr()?,
        },
    )?;

    // From here on dsmexec may take as long as the slowest host to answer.
    stream.set_read_timeout(None)?;
    let launch = match control::recv::<ExecToWrap>(&mut reader) {
        Ok(launch @ ExecToWrap::Launch { .. }) => launch,
        Ok(_) => return Ok(0),  // stopped during start-up
        Err(_) => return Ok(1), // dsmexec went away during start-up
    };
    let ExecToWrap::Launch {
        rank,
        size,
        peers,
        hosts,
        env: extra_env,
        job_id,
    } = launch
    else {
        unreachable!("matched above")
    };

    let boot = Bootstrap {
        rank,
        size,
        peers: hosts
            .into_iter()
            .zip(peers)
            .map(|(host, addr)| PeerInfo { host, addr })
            .collect(),
        listener,
        secret,
        job_id,
    };
    let mut command = Command::new(&program);
    command
        .arg0(&args.program)
        .args(&args.args)
        .envs(extra_env)
        .stdin(Stdio::null())
        .process_group(0);
    // The secret goes to the program through a pipe it inherits.
    let inherited = boot
        .hand_over(&mut command)
        .context("preparing the program's start")?;
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    drop(inherited);
    let oom_kills_before = oom_kills();
    let pgid = Pid::from_raw(child.id() as i32);
    control::send(&mut writer, &WrapToExec::Started { pid: pgid.as_raw() })?;

    spawn_control_reader(reader, pgid);
    spawn_signal_forwarder(pgid)?;

    let status = child.wait().context("waiting for the program")?;
    let cause = ExitCause::from_status(status);
    // Whatever the program left behind in its process group goes with it.
    let _ = killpg(pgid, Signal::SIGKILL);
    let likely_cause = (cause == ExitCause::Signal(Signal::SIGKILL as i32)
        && oom_kills() > oom_kills_before)
        .then(|| {
            let host = nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "this host".into());
            format!("likely out of memory: the kernel's OOM killer ran on {host} meanwhile")
        });
    let _ = control::send(
        &mut writer,
        &WrapToExec::Exited {
            status: cause,
            likely_cause,
        },
    );
    Ok(cause.shell_code())
}

/// Processes the kernel's OOM killer has killed on this host since boot
/// (`oom_kill` in /proc/vmstat, counting the kills of every memory cgroup
/// too); 0 where the kernel does not say.
fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}

fn read_secret() -> Result<JobSecret> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .take_line(&mut line)
        .context("reading the job secret from stdin")?;
    JobSecret::from_hex(&line).ok_or_else(|| {
        anyhow!("no job secret on stdin: dsmwrap is started by dsmexec, not by hand")
    })
}

trait TakeLine {
    fn take_line(&mut self, line: &mut String) -> std::io::Result<usize>;
}

impl<R: BufRead> TakeLine for R {
    /// Reads one line of at most 128 bytes, so a wrong stdin cannot make us
    /// buffer without bound.
    fn take_line(&mut self, line: &mut String) -> std::io::Result<usize> {
        use std::io::Read;
        self.by_ref().take(128).read_line(line)
    }
}

fn resolve_connect(spec: &str) -> Result<SocketAddr> {
    if let Some(port) = spec.strip_prefix("ssh-client:") {
        // SSH_CLIENT = "client-ip client-port server-port": the address this
        // host saw dsmexec's ssh come from, hence one that routes back.
        let client = std::env::var("SSH_CLIENT")
            .context("--connect ssh-client: needs SSH_CLIENT (set by sshd)")?;
        let ip: IpAddr = client
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("SSH_CLIENT={client:?} has no address"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("bad port in --connect {spec}"))?;
        return Ok(SocketAddr::new(ip, port));
    }
    spec.to_socket_addrs()
        .with_context(|| format!("bad --connect address {spec:?}"))?
        .next()
        .ok_or_else(|| anyhow!("--connect {spec:?} resolves to no address"))
}

/// Finds the program as a shell would: a path if it contains a slash,
/// otherwise the first executable match in `PATH`.
pub fn resolve_program(program: &str) -> std::result::Result<PathBuf, String> {
    let runnable = |path: &Path| -> std::result::Result<(), String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.is_dir() {
            return Err(format!("{} is a directory", path.display()));
        }
        access(path, AccessFlags::X_OK).map_err(|_| format!("{} is not executable", path.display()))
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return runnable(&path).map(|_| path);
    }
    let search = std::env::var("PATH").unwrap_or_default();
    search
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| runnable(candidate).is_ok())
        .ok_or_else(|| format!("program {program:?} not found in PATH ({search})"))
}

/// Applies dsmexec's signal and stop requests; stops the program if the
/// control connection drops (dsmexec died or the network failed).
fn spawn_control_reader(mut reader: TcpStream, pgid: Pid) {
    thread::spawn(move || loop {
        match control::recv::<ExecToWrap>(&mut reader) {
            Ok(ExecToWrap::Signal { signo }) if signo == Signal::SIGUSR1 as i32 => {
                ask_for_hang_report(pgid)
            }
            Ok(ExecToWrap::Signal { signo }) => {
                if let Ok(sig) = Signal::try_from(signo) {
                    let _ = killpg(pgid, sig);
                }
            }
            Ok(ExecToWrap::Stop { grace_ms }) => stop(pgid, Duration::from_millis(grace_ms)),
            Ok(ExecToWrap::Launch { .. }) => {}
            Err(_) => {
                stop(pgid, ORPHAN_GRACE);
                return;
            }
        }
    });
}

/// Sends SIGUSR1 (a hang report) to the program, only if it catches it:
/// before the DSM is initialized its default action would end the rank.
fn ask_for_hang_report(pid: Pid) {
    if catches_signal(pid, Signal::SIGUSR1) {
        let _ = nix::sys::signal::kill(pid, Signal::SIGUSR1);
    } else {
        eprintln!("dsmwrap: the program does not catch SIGUSR1 (not a DSM program, or its DSM not started yet): no hang report");
    }
}

/// Whether process `pid` has a handler for `signal` (`SigCgt` in
/// /proc/PID/status: a hexadecimal mask, bit N-1 for signal N).
fn catches_signal(pid: Pid, signal: Signal) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal as i32 - 1)) != 0)
}

/// SIGTERM now, SIGKILL after `grace` unless the group is gone by then.
/// SIGCONT follows SIGTERM (as a shell's `kill` does for stopped jobs): a
/// stopped program, the usual reason a job is being stopped, would
/// otherwise keep its SIGTERM pending until the SIGKILL.
fn stop(pgid: Pid, grace: Duration) {
    if grace.is_zero() {
        let _ = killpg(pgid, Signal::SIGKILL);
        return;
    }
    let _ = killpg(pgid, Signal::SIGTERM);
    let _ = killpg(pgid, Signal::SIGCONT);
    thread::spawn(move || {
        thread::sleep(grace);
        let _ = killpg(pgid, Signal::SIGKILL);
    });
}

/// Signals sent to dsmwrap itself (e.g. by sshd or a batch system) go to the program.
fn spawn_signal_forwarder(pgid: Pid) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR1])?;
    thread::spawn(move || {
        for signo in signals.forever() {
            if signo == SIGUSR1 {
                ask_for_hang_report(pgid);
            } else if let Ok(sig) = Signal::try_from(signo) {
                let _ = killpg(pgid, sig);
            }
        }
    });
    Ok(())
}
