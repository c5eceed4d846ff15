//! dsmexec's job runner: start every slot's dsmwrap, collect their hellos,
//! hand out ranks and the peer table, forward output and signals, and turn
//! the ranks' fates into one exit status.
//!
//! Everything that happens (a connection, a control message, a process
//! exit, a signal) becomes an `Event` on one channel, handled by one loop:
//! no shared mutable state between threads.

use std::io::{BufWriter, Write};
use std::net::{
    IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket,
};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use dsm_core::auth::{self, JobSecret};
use dsm_core::dsm::EXIT_FATAL;
use dsm_core::stats::JSON_LINE_PREFIX;
use dsm_core::transport::LostPeer;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::control::{self, signal_name, ExecToWrap, ExitCause, WrapToExec};
use crate::machinefile::{self, Slot};
use crate::output::{self, LastLine, Stream};
use crate::report;
use crate::EXIT_USAGE;

/// Time a wrapper's control connection gets to deliver its last message
/// after its process ended.
const LINGER: Duration = Duration::from_secs(2);
/// Time given to output pipes to drain after every process ended.
const DRAIN: Duration = Duration::from_secs(3);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many control connections authenticate at once; more are
/// closed at once.
const MAX_PENDING_HANDSHAKES: usize = 64;
/// A wrapper that exits during start-up may have sent its reason just
/// before; the message travels a different path than the exit, so wait
/// this long for it before reporting the bare exit.
const LAST_WORDS: Duration = Duration::from_millis(500);
/// How long a rank's exit with `EXIT_FATAL` that names a peer whose
/// connection closed is held back for that peer's own report (killed,
/// crashed, exited): the peer is the cause, and should be what dsmexec
/// names. A survivor already waits `SECONDARY_FAILURE_DELAY` (0.5 s) before
/// it exits; a victim's dsmwrap that ran late on a loaded machine still
/// gets this long.
const OWN_REPORT_WAIT: Duration = Duration::from_secs(2);

/// Forwarded to every rank, which prints a hang report; the job goes on.
const HANG_REPORT_SIGNAL: i32 = signal_hook::consts::SIGUSR1;

/// Everything dsmexec was asked to do.
pub struct JobSpec {
    /// One entry per process; the index is the rank.
    pub slots: Vec<Slot>,
    /// The program each rank runs (a path, or a name looked up in `PATH` on
    /// each host).
    pub program: String,
    /// The program's arguments.
    pub args: Vec<String>,
    /// The ssh command and its options, already split into words.
    pub ssh: Vec<String>,
    /// Path of dsmwrap, on this machine and on every remote host.
    pub wrap: PathBuf,
    /// Directory the ranks run in.
    pub cwd: PathBuf,
    /// Prefix each forwarded output line with `[RANK HOST stdout|stderr] `.
    pub prefix: bool,
    /// Time the ranks get to exit after a failure or a forwarded signal,
    /// between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Time every slot gets to start and connect back (also the ssh
    /// `ConnectTimeout`).
    pub startup_timeout: Duration,
    /// Variables exported to every rank.
    pub env: Vec<(String, String)>,
    /// Address dsmexec listens on for control connections (`None`: the one
    /// facing the remote hosts, 127.0.0.1 for a local job).
    pub bind: Option<IpAddr>,
    /// Display name of local slots when no machine file named them.
    pub local_name: Option<String>,
    /// Where to write the statistics report (`--stats-report`).
    pub stats_report: Option<PathBuf>,
}

enum Event {
    Connected {
        slot: usize,
        stream: TcpStream,
        first: WrapToExec,
    },
    FromWrap {
        slot: usize,
        msg: WrapToExec,
    },
    WrapGone {
        slot: usize,
        reason: String,
    },
    ProcessExited {
        slot: usize,
        status: ExitStatus,
    },
    Signal(i32),
}

/// Why the job ends unsuccessfully: the first of these wins.
#[derive(Debug, Clone)]
enum Outcome {
    RankFailed { cause: ExitCause },
    RankLost { code: i32 },
    Interrupted(i32),
    StartFailed,
}

struct Proc {
    host: String,
    local: bool,
    /// The local process: dsmwrap itself, or the ssh running it remotely.
    pid: Pid,
    process_status: Option<ExitStatus>,
    process_exited_at: Option<Instant>,
    control: Option<BufWriter<TcpStream>>,
    control_gone: bool,
    listen: Option<SocketAddr>,
    program_pid: Option<Pid>,
    result: Option<ExitCause>,
    last_stderr: LastLine,
    /// The rank's JSON statistics lines, with `--stats-report`.
    stats: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn finished(&self) -> bool {
        self.process_status.is_some() && (self.control_gone || self.control.is_none())
    }

    fn send(&mut self, msg: &ExecToWrap) {
        if let Some(w) = &mut self.control {
            if control::send(w, msg).is_err() {
                self.close_control();
            }
        }
    }

    fn close_control(&mut self) {
        if let Some(w) = self.control.take() {
            let _ = w.get_ref().shutdown(Shutdown::Both);
        }
    }

    /// Last resort: kill what we can reach from here.
    fn kill_hard(&mut self) {
        if self.process_status.is_some() {
            return;
        }
        if self.local {
            if let Some(pid) = self.program_pid {
                let _ = killpg(pid, Signal::SIGKILL);
            }
            let _ = killpg(self.pid, Signal::SIGKILL);
        } else {
            // Killing ssh closes the control connection; the remote dsmwrap
            // then kills its program (it already got Stop with no grace).
            let _ = kill(self.pid, Signal::SIGKILL);
        }
    }
}

struct Runner {
    spec: JobSpec,
    procs: Vec<Proc>,
    events: Receiver<Event>,
    events_tx: Sender<Event>,
    /// Cleared when start-up ends: the acceptor then closes the port.
    accepting: Arc<AtomicBool>,
    outputs: Vec<JoinHandle<()>>,
    outcome: Option<Outcome>,
    /// A survivor's failure waiting for its lost peer's report
    /// (`OWN_REPORT_WAIT`).
    held_back: Option<HeldBack>,
    job_id: String,
}

/// A rank's failure held back until `until` for the report of `peer`,
/// the rank it lost.
struct HeldBack {
    slot: usize,
    status: ExitCause,
    likely_cause: Option<String>,
    peer: usize,
    until: Instant,
}

fn say(msg: impl AsRef<str>) {
    let _ = writeln!(std::io::stderr().lock(), "dsmexec: {}", msg.as_ref());
}

/// Runs the job; returns dsmexec's exit code.
pub fn run(spec: JobSpec) -> i32 {
    match start(spec) {
        Ok(mut runner) => runner.drive(),
        Err(message) => {
            say(message);
            EXIT_USAGE
        }
    }
}

/// The address dsmexec listens on and the address each slot connects to.
struct AddressPlan {
    bind: IpAddr,
    connect: Vec<String>,
}

fn host_without_user(host: &str) -> &str {
    let host = host.rsplit('@').next().unwrap_or(host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The local address the kernel would use to reach `host`, if it resolves here.
fn local_ip_towards(host: &str) -> Option<IpAddr> {
    let target = (host_without_user(host), 22)
        .to_socket_addrs()
        .ok()?
        .next()?;
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .ok()?;
    let probe = UdpSocket::bind(any).ok()?;
    probe.connect(target).ok()?;
    Some(probe.local_addr().ok()?.ip())
}

fn plan_addresses(slots: &[Slot], locals: &[bool], bind: Option<IpAddr>) -> AddressPlan {
    let remote_ips: Vec<Option<IpAddr>> = slots
        .iter()
        .zip(locals)
        .filter(|(_, local)| !**local)
        .map(|(s, _)| local_ip_towards(&s.host))
        .collect();
    let first_known = remote_ips.iter().flatten().next().copied();
    let all_same = remote_ips.iter().all(|ip| *ip == first_known);
    let bind = bind.unwrap_or(match (remote_ips.is_empty(), first_known) {
        (true, _) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        (false, Some(ip)) if all_same => ip,
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    let connect = slots
        .iter()
        .zip(locals)
        .map(|(slot, local)| {
            let ip = if bind.is_unspecified() {
                if *local {
                    Some(first_known.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)))
                } else {
                    local_ip_towards(&slot.host)
                }
            } else {
                Some(bind)
            };
            // None: the remote dsmwrap takes our address from SSH_CLIENT.
            ip.map(|ip| ip.to_string())
                .unwrap_or_else(|| "ssh-client".into())
        })
        .collect();
    AddressPlan { bind, connect }
}

fn connect_arg(host_part: &str, port: u16) -> String {
    match host_part.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host_part}:{port}"),
    }
}

fn start(spec: JobSpec) -> Result<Runner, String> {
    let this_host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let locals: Vec<bool> = spec
        .slots
        .iter()
        .map(|s| machinefile::is_local(&s.host, &this_host))
        .collect();
    let plan = plan_addresses(&spec.slots, &locals, spec.bind);
    let listener = TcpListener::bind((plan.bind, 0)).map_err(|e| {
        format!(
            "cannot listen on {}: {e} (choose another address with --bind)",
            plan.bind
        )
    })?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let secret =
        JobSecret::generate().map_err(|e| format!("no randomness for the job secret: {e}"))?;
    // A label for logs, drawn separately from the secret.
    let job_id = JobSecret::generate()
        .map(|s| s.to_hex()[..8].to_string())
        .unwrap_or_else(|_| format!("{:08x}", std::process::id()));

    let (tx, rx) = crossbeam_channel::unbounded();
    let accepting = Arc::new(AtomicBool::new(true));
    spawn_acceptor(
        listener,
        secret.clone(),
        spec.slots.len(),
        tx.clone(),
        Arc::clone(&accepting),
    )?;
    spawn_signal_listener(tx.clone())?;

    let mut runner = Runner {
        procs: Vec::new(),
        events: rx,
        events_tx: tx.clone(),
        accepting: Arc::clone(&accepting),
        outputs: Vec::new(),
        outcome: None,
        held_back: None,
        job_id,
        spec,
    };
    for (slot, (local, connect)) in locals.iter().zip(&plan.connect).enumerate() {
        let connect = connect_arg(connect, port);
        if let Err(message) = runner.spawn_slot(slot, *local, &connect, &secret, &tx) {
            // Reported once by `run`; stop the slots already started.
            runner.outcome = Some(Outcome::StartFailed);
            runner.stop_all(Duration::ZERO);
            runner.wait_all(Instant::now() + runner.spec.grace + LINGER);
            return Err(message);
        }
    }
    Ok(runner)
}

fn spawn_acceptor(
    listener: TcpListener,
    secret: JobSecret,
    slots: usize,
    events: Sender<Event>,
    accepting: Arc<AtomicBool>,
) -> Result<(), String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    thread::Builder::new()
        .name("dsmexec-accept".into())
        .spawn(move || {
            let pending = Arc::new(AtomicUsize::new(0));
            while accepting.load(Ordering::SeqCst) {
                let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(200u16));
                while let Ok((stream, peer)) = listener.accept() {
                    // Bounded: a flood of silent connections cannot pile up threads.
                    if pending.load(Ordering::SeqCst) >= MAX_PENDING_HANDSHAKES {
                        tracing::warn!(
                            "refused control connection from {peer}: too many pending handshakes"
                        );
                        continue;
                    }
                    pending.fetch_add(1, Ordering::SeqCst);
                    let secret = secret.clone();
                    let events = events.clone();
                    let accepting = Arc::clone(&accepting);
                    let in_flight = Arc::clone(&pending);
                    let spawned = thread::Builder::new().spawn(move || {
                        let greeted = greet(stream, &secret, slots);
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        match greeted {
                            Ok((slot, stream, first)) => {
                                let _ = events.send(Event::Connected {
                                    slot,
                                    stream,
                                    first,
                                });
                            }
                            // Once start-up is over (or aborted), late wrappers being cut off is expected.
                            Err(why) if accepting.load(Ordering::SeqCst) => {
                                tracing::warn!("refused control connection from {peer}: {why}")
                            }
                            Err(_) => {}
                        }
                    });
                    if spawned.is_err() {
                        pending.fetch_sub(1, Ordering::SeqCst);
                        tracing::warn!(
                            "refused control connection from {peer}: cannot spawn a thread"
                        );
                    }
                }
            }
        })
        .map_err(|e| format!("cannot spawn the acceptor: {e}"))?;
    Ok(())
}

/// Authenticates one incoming control connection and reads its first message.
fn greet(
    mut stream: TcpStream,
    secret: &JobSecret,
    slots: usize,
) -> Result<(usize, TcpStream, WrapToExec), String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let ident = auth::accept(&mut stream, secret).map_err(|e| e.to_string())?;
    let slot = control::slot_from_ident(&ident)
        .filter(|s| *s < slots)
        .ok_or_else(|| format!("unexpected identity {:?}", String::from_utf8_lossy(&ident)))?;
    let first = control::recv::<WrapToExec>(&mut stream).map_err(|e| e.to_string())?;
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    Ok((slot, stream, first))
}

fn spawn_signal_listener(events: Sender<Event>) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR1])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    thread::Builder::new()
        .name("dsmexec-signals".into())
        .spawn(move || {
            for signo in signals.forever() {
                if events.send(Event::Signal(signo)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| format!("cannot spawn the signal thread: {e}"))?;
    Ok(())
}

impl Runner {
    fn name(&self, slot: usize) -> String {
        format!("rank {slot} (host {})", self.procs[slot].host)
    }

    fn spawn_slot(
        &mut self,
        slot: usize,
        local: bool,
        connect: &str,
        secret: &JobSecret,
        events: &Sender<Event>,
    ) -> Result<(), String> {
        let spec = &self.spec;
        let host = match (&spec.local_name, local) {
            (Some(name), true) => name.clone(),
            _ => spec.slots[slot].host.clone(),
        };
        let mut wrap_args: Vec<String> = vec![
            "--connect".into(),
            connect.into(),
            "--slot".into(),
            slot.to_string(),
            "--cwd".into(),
            spec.cwd.display().to_string(),
            "--".into(),
            spec.program.clone(),
        ];
        wrap_args.extend(spec.args.iter().cloned());
        let mut command = if local {
            let mut c = Command::new(&spec.wrap);
            c.args(&wrap_args);
            c
        } else {
            let mut words = vec![spec.wrap.display().to_string()];
            words.extend(wrap_args);
            let quoted: Vec<String> = words
                .iter()
                .map(|w| shlex::try_quote(w).map(|q| q.into_owned()))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("cannot quote the remote command: {e}"))?;
            let mut c = Command::new(&spec.ssh[0]);
            c.args(&spec.ssh[1..])
                .args(["-o", "BatchMode=yes"])
                .arg("-o")
                .arg(format!(
                    "ConnectTimeout={}",
                    spec.startup_timeout.as_secs().max(1)
                ))
                .arg(&spec.slots[slot].host)
                .arg(format!("exec {}", quoted.join(" ")));
            c
        };
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let what = if local { "dsmwrap" } else { "ssh" };
        let mut child: Child = command.spawn().map_err(|e| {
            let path = if local {
                spec.wrap.display().to_string()
            } else {
                spec.ssh[0].clone()
            };
            format!("cannot start {what} ({path}) for rank {slot} on {host}: {e}")
        })?;
        if let Some(mut stdin) = child.stdin.take() {
            // A wrapper that died at once shows up as an exit event below.
            let _ = writeln!(stdin, "{}", secret.to_hex());
        }
        let last_stderr = LastLine::default();
        let prefix = |stream: Stream| {
            spec.prefix
                .then(|| format!("[{slot} {host} {}] ", stream.name()))
        };
        if let Some(out) = child.stdout.take() {
            let p = prefix(Stream::Stdout);
            self.outputs.push(thread::spawn(move || {
                output::forward(out, Stream::Stdout, p, LastLine::default(), None)
            }));
        }
        let stats = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.stderr.take() {
            let p = prefix(Stream::Stderr);
            let last = Arc::clone(&last_stderr);
            let collect = spec.stats_report.as_ref().map(|_| output::Collect {
                marker: JSON_LINE_PREFIX,
                lines: Arc::clone(&stats),
            });
            self.outputs.push(thread::spawn(move || {
                output::forward(err, Stream::Stderr, p, last, collect)
            }));
        }
        let pid = Pid::from_raw(child.id() as i32);
        let events = events.clone();
        thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = events.send(Event::ProcessExited { slot, status });
            }
        });
        self.procs.push(Proc {
            host,
            local,
            pid,
            process_status: None,
            process_exited_at: None,
            control: None,
            control_gone: false,
            listen: None,
            program_pid: None,
            result: None,
            last_stderr,
            stats,
        });
        Ok(())
    }

    fn drive(&mut self) -> i32 {
        let started = self.startup();
        self.accepting.store(false, Ordering::SeqCst);
        if started {
            self.launch();
        }
        self.run_to_end();
        self.drain_outputs();
        if started {
            self.write_stats_report();
        }
        match &self.outcome {
            None => 0,
            Some(Outcome::StartFailed) => EXIT_USAGE,
            Some(Outcome::Interrupted(sig)) => 128 + sig,
            Some(Outcome::RankFailed { cause, .. }) => cause.shell_code(),
            Some(Outcome::RankLost { code, .. }) => *code,
        }
    }

    fn fail(&mut self, outcome: Outcome, message: String) {
        if self.outcome.is_none() {
            say(message);
            self.outcome = Some(outcome);
            self.accepting.store(false, Ordering::SeqCst);
        }
    }

    /// Waits until every slot connected back and said hello.
    fn startup(&mut self) -> bool {
        let deadline = Instant::now() + self.spec.startup_timeout;
        loop {
            if self.procs.iter().all(|p| p.listen.is_some()) {
                return true;
            }
            if self.outcome.is_some() {
                return false;
            }
            if let Some(slot) = self.silently_exited() {
                let p = &self.procs[slot];
                let what = if p.local { "dsmwrap" } else { "ssh" };
                let last = p.last_stderr.lock().map(|l| l.clone()).unwrap_or_default();
                let detail = if last.is_empty() {
                    String::new()
                } else {
                    format!(": {last}")
                };
                let cause = p
                    .process_status
                    .map(ExitCause::from_status)
                    .map(ExitCause::describe)
                    .unwrap_or_default();
                let message = format!("cannot start {}: {what} {cause}{detail}", self.name(slot));
                self.fail(Outcome::StartFailed, message);
                return false;
            }
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            if left.is_zero() {
                self.report_late_slots();
                return false;
            }
            let event = match self.events.recv_timeout(left) {
                Ok(e) => e,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => continue,
            };
            match event {
                Event::Connected {
                    slot,
                    stream,
                    first,
                } => self.connected(slot, stream, first),
                Event::ProcessExited { slot, status } => self.process_exited(slot, status),
                Event::WrapGone { slot, reason } => {
                    self.procs[slot].control_gone = true;
                    self.fail(
                        Outcome::StartFailed,
                        format!(
                            "{} dropped its control connection during start-up: {reason}",
                            self.name(slot)
                        ),
                    );
                }
                Event::FromWrap { .. } => {}
                Event::Signal(signo) if signo == HANG_REPORT_SIGNAL => {
                    say("SIGUSR1 during start-up: no rank runs yet, no hang report")
                }
                Event::Signal(signo) => self.fail(
                    Outcome::Interrupted(signo),
                    format!("interrupted by {} during start-up", signal_name(signo)),
                ),
            }
        }
    }

    /// A slot whose process ended before it said hello, long enough ago
    /// that its last message (if any) would have arrived.
    fn silently_exited(&self) -> Option<usize> {
        self.procs.iter().position(|p| {
            p.listen.is_none()
                && p.process_exited_at
                    .is_some_and(|t| t.elapsed() >= LAST_WORDS)
        })
    }

    fn report_late_slots(&mut self) {
        let late: Vec<String> = (0..self.procs.len())
            .filter(|s| self.procs[*s].listen.is_none())
            .map(|s| self.name(s))
            .collect();
        let message = format!(
            "{} did not connect back within {:?}; check that the host is reachable, that {} exists there, and that it can reach this machine",
            late.join(", "),
            self.spec.startup_timeout,
            self.spec.wrap.display()
        );
        self.fail(Outcome::StartFailed, message);
    }

    fn connected(&mut self, slot: usize, stream: TcpStream, first: WrapToExec) {
        if self.procs[slot].control.is_some() || self.procs[slot].control_gone {
            tracing::warn!("second control connection for slot {slot} refused");
            return;
        }
        let reader = match stream.try_clone() {
            Ok(r) => r,
            Err(e) => {
                self.fail(Outcome::StartFailed, format!("{}: {e}", self.name(slot)));
                return;
            }
        };
        self.procs[slot].control = Some(BufWriter::new(stream));
        spawn_control_reader(slot, reader, self.events_tx.clone());
        match first {
            WrapToExec::Hello {
                listen, hostname, ..
            } => {
                tracing::debug!("slot {slot} on {hostname} listens on {listen}");
                self.procs[slot].listen = Some(listen);
            }
            WrapToExec::ProgramError { message, .. } => self.fail(
                Outcome::StartFailed,
                format!("cannot run the program for {}: {message}", self.name(slot)),
            ),
            other => self.fail(
                Outcome::StartFailed,
                format!("{} sent {other:?} before its hello", self.name(slot)),
            ),
        }
    }

    fn launch(&mut self) {
        let peers: Vec<SocketAddr> = self.procs.iter().filter_map(|p| p.listen).collect();
        let hosts: Vec<String> = self.procs.iter().map(|p| p.host.clone()).collect();
        let size = self.procs.len();
        for rank in 0..size {
            let msg = ExecToWrap::Launch {
                rank,
                size,
                peers: peers.clone(),
                hosts: hosts.clone(),
                env: self.spec.env.clone(),
                job_id: self.job_id.clone(),
            };
            self.procs[rank].send(&msg);
        }
    }

    fn process_exited(&mut self, slot: usize, status: ExitStatus) {
        let p = &mut self.procs[slot];
        p.process_status = Some(status);
        p.process_exited_at = Some(Instant::now());
    }

    fn stop_all(&mut self, grace: Duration) {
        let grace_ms = grace.as_millis() as u64;
        for p in &mut self.procs {
            if p.process_status.is_none() {
                p.send(&ExecToWrap::Stop { grace_ms });
                if p.control.is_none() && p.listen.is_none() {
                    // Never connected: nothing to ask, stop the process itself.
                    p.kill_hard();
                }
            }
        }
    }

    /// Handles events until every process ended, escalating to SIGKILL when
    /// the ranks do not stop in time.
    fn run_to_end(&mut self) {
        let mut kill_at: Option<Instant> = None;
        let mut give_up_at: Option<Instant> = None;
        if self.outcome.is_some() {
            self.stop_all(Duration::ZERO);
            kill_at = Some(Instant::now() + LINGER);
        }
        while !self.procs.iter().all(Proc::finished) {
            let now = Instant::now();
            if let Some(t) = kill_at {
                if now >= t {
                    kill_at = None;
                    give_up_at = Some(now + self.spec.grace + LINGER);
                    for p in &mut self.procs {
                        p.send(&ExecToWrap::Stop { grace_ms: 0 });
                        p.kill_hard();
                    }
                }
            }
            if give_up_at.is_some_and(|t| now >= t) {
                let left: Vec<String> = (0..self.procs.len())
                    .filter(|s| !self.procs[*s].finished())
                    .map(|s| self.name(s))
                    .collect();
                say(format!("giving up waiting for {}", left.join(", ")));
                return;
            }
            for p in &mut self.procs {
                if p.process_exited_at.is_some_and(|t| now >= t + LINGER) && !p.control_gone {
                    p.close_control();
                    p.control_gone = true;
                }
            }
            let failed_before = self.outcome.is_some();
            let Ok(event) = self.events.recv_timeout(Duration::from_millis(100)) else {
                self.settle(failed_before, &mut kill_at);
                continue;
            };
            match event {
                Event::Connected {
                    slot,
                    stream,
                    first,
                } => self.connected(slot, stream, first),
                Event::FromWrap { slot, msg } => match msg {
                    WrapToExec::Started { pid } => {
                        self.procs[slot].program_pid = Some(Pid::from_raw(pid))
                    }
                    WrapToExec::Exited {
                        status,
                        likely_cause,
                    } => {
                        self.procs[slot].result = Some(status);
                        if !status.success() {
                            self.rank_failed(slot, status, likely_cause);
                        }
                    }
                    WrapToExec::Hello { .. } | WrapToExec::ProgramError { .. } => {}
                },
                Event::WrapGone { slot, reason } => {
                    self.procs[slot].control_gone = true;
                    self.procs[slot].control = None;
                    if self.procs[slot].result.is_none() && self.procs[slot].listen.is_some() {
                        let code = self.procs[slot]
                            .process_status
                            .map(|s| ExitCause::from_status(s).shell_code())
                            .filter(|c| *c != 0)
                            .unwrap_or(255);
                        let message = format!("lost contact with {}: {reason}", self.name(slot));
                        self.fail(Outcome::RankLost { code }, message);
                    }
                }
                Event::ProcessExited { slot, status } => self.process_exited(slot, status),
                Event::Signal(signo) if signo == HANG_REPORT_SIGNAL => {
                    say("SIGUSR1: every rank prints what its threads wait for");
                    for p in &mut self.procs {
                        p.send(&ExecToWrap::Signal { signo });
                    }
                }
                Event::Signal(signo) => {
                    if matches!(self.outcome, Some(Outcome::Interrupted(_))) {
                        say(format!(
                            "second {}: killing every rank now",
                            signal_name(signo)
                        ));
                        kill_at = Some(Instant::now());
                        continue;
                    }
                    let message = format!(
                        "received {}, forwarding it to every rank",
                        signal_name(signo)
                    );
                    self.fail(Outcome::Interrupted(signo), message);
                    for p in &mut self.procs {
                        p.send(&ExecToWrap::Signal { signo });
                    }
                    kill_at.get_or_insert(Instant::now() + self.spec.grace);
                }
            }
            self.settle(failed_before, &mut kill_at);
        }
        // Every process ended: a failure still held back is the job's.
        self.release_held_back(Instant::now());
    }

    /// After an event (or a quiet 100 ms): a held-back failure whose time
    /// came becomes the job's, and a failure new since `failed_before`
    /// (other than a forwarded signal) stops every rank, SIGKILL after the
    /// grace.
    fn settle(&mut self, failed_before: bool, kill_at: &mut Option<Instant>) {
        self.release_held_back(Instant::now());
        if !failed_before
            && self.outcome.is_some()
            && !matches!(self.outcome, Some(Outcome::Interrupted(_)))
        {
            let grace = self.spec.grace;
            self.stop_all(grace);
            *kill_at = Some(Instant::now() + grace + LINGER);
        }
    }

    /// `slot` failed with `status`: the job's failure, unless it is a
    /// survivor's exit naming a lost peer that has not reported yet (held
    /// back for it), or another such exit while one is held back.
    fn rank_failed(&mut self, slot: usize, status: ExitCause, likely_cause: Option<String>) {
        if self.outcome.is_none() {
            if let Some(peer) = self.unreported_lost_peer(slot, status) {
                if self.held_back.is_none() {
                    self.held_back = Some(HeldBack {
                        slot,
                        status,
                        likely_cause,
                        peer,
                        until: Instant::now() + OWN_REPORT_WAIT,
                    });
                }
                return;
            }
        }
        let message = self.failure_message(slot, status, likely_cause);
        self.fail(Outcome::RankFailed { cause: status }, message);
    }

    /// The rank `slot` ended for losing (status `EXIT_FATAL`, its last
    /// line naming it), when that rank neither reported nor ended yet and
    /// its connection closed (its process ended: its report is on the way;
    /// a silent or unreachable peer may never report).
    fn unreported_lost_peer(&self, slot: usize, status: ExitCause) -> Option<usize> {
        if status != ExitCause::Code(EXIT_FATAL) {
            return None;
        }
        let last = self.procs[slot]
            .last_stderr
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        let lost = LostPeer::find_in(&last).filter(LostPeer::closed)?;
        let peer = self.procs.get(lost.rank)?;
        (peer.result.is_none() && peer.process_status.is_none()).then_some(lost.rank)
    }

    /// Ends a hold-back once its peer reported or ended, or its time ran
    /// out: the held failure becomes the job's if none came first.
    fn release_held_back(&mut self, now: Instant) {
        let Some(held) = &self.held_back else {
            return;
        };
        let peer = &self.procs[held.peer];
        let over = self.outcome.is_some()
            || peer.result.is_some()
            || peer.process_status.is_some()
            || now >= held.until;
        if !over {
            return;
        }
        if let Some(held) = self.held_back.take() {
            let message = self.failure_message(held.slot, held.status, held.likely_cause);
            self.fail(Outcome::RankFailed { cause: held.status }, message);
        }
    }

    /// What to say about `slot` failing with `status`. A rank that ended
    /// because it lost a peer names that peer when the peer is the cause
    /// and has no failure of its own to report: it stopped responding, or
    /// it exited with status 0 without finalize while others needed it.
    fn failure_message(
        &self,
        slot: usize,
        status: ExitCause,
        likely_cause: Option<String>,
    ) -> String {
        let last = self.procs[slot]
            .last_stderr
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        let lost = LostPeer::find_in(&last)
            .filter(|_| status == ExitCause::Code(EXIT_FATAL))
            .and_then(|lost| Some((self.procs.get(lost.rank)?, lost)));
        match lost {
            Some((peer, lost)) if lost.not_responding() => format!(
                "rank {} (host {}) is {} (reported by rank {slot}, which {}); stopping the job",
                lost.rank,
                peer.host,
                lost.reason,
                status.describe()
            ),
            Some((peer, lost)) if peer.result.is_some_and(ExitCause::success) => format!(
                "rank {} (host {}) exited with status 0 without finalize while the job ran; rank {slot} lost it ({}) and {}",
                lost.rank,
                peer.host,
                lost.reason,
                status.describe()
            ),
            _ => match likely_cause {
                Some(cause) => format!("{} {}, {cause}", self.name(slot), status.describe()),
                None => format!("{} {}", self.name(slot), status.describe()),
            },
        }
    }

    fn wait_all(&mut self, until: Instant) {
        while !self.procs.iter().all(|p| p.process_status.is_some()) {
            let left = until.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::ProcessExited { slot, status }) => self.process_exited(slot, status),
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    /// With `--stats-report`: gathers the ranks' statistics into the
    /// report. A failure to write it is said, and does not change the
    /// job's status.
    fn write_stats_report(&self) {
        let Some(path) = &self.spec.stats_report else {
            return;
        };
        let mut ranks = Vec::new();
        for (rank, p) in self.procs.iter().enumerate() {
            let lines = p.stats.lock().map(|l| l.clone()).unwrap_or_default();
            if let Some(json) = lines.last() {
                match report::RankStats::parse(rank, &p.host, json) {
                    Ok(stats) => ranks.push(stats),
                    Err(e) => say(format!("--stats-report: {e}")),
                }
            }
        }
        match report::write(path, self.procs.len(), &ranks) {
            Ok(()) => say(format!(
                "statistics of {} of {} rank(s) written to {}",
                ranks.len(),
                self.procs.len(),
                path.display()
            )),
            Err(e) => say(format!("--stats-report: {e}")),
        }
    }

    /// Lets the output threads reach end of file, within a bound: a stray
    /// grandchild holding a pipe open must not keep dsmexec alive.
    fn drain_outputs(&mut self) {
        let deadline = Instant::now() + DRAIN;
        for handle in self.outputs.drain(..) {
            while !handle.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
    }
}

fn spawn_control_reader(slot: usize, mut stream: TcpStream, events: Sender<Event>) {
    thread::spawn(move || loop {
        match control::recv::<WrapToExec>(&mut stream) {
            Ok(msg) => {
                if events.send(Event::FromWrap { slot, msg }).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = events.send(Event::WrapGone {
                    slot,
                    reason: e.to_string(),
                });
                return;
            }
        }
    });
}
