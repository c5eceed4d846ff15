//! Reliability and security of running jobs (issue 7): ranks killed at the
//! worst moments, hostile input on every port, a cut link between hosts,
//! listeners bound only where the job needs them, and a soak under attack.
//! Every case asserts exit codes, messages, a time bound, and that no
//! process of the test remains. docs/RELIABILITY.md lists them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use dsm_core::auth::{self, JobSecret};
use dsm_core::wire;
use dsm_tests::{
    assert_no_leftovers, await_wait_in_fault, bin, dsmexec, processes_with, scratch_dir,
    short_hostname, stop_process, unique_token,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Every survivor must have failed, naming the dead rank, within this.
const DETECTION_BOUND: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- helpers

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A child whose stdout and stderr lines are collected as they come.
struct Job {
    child: Child,
    lines: mpsc::Receiver<(bool, String)>,
    stdout: Vec<String>,
    stderr: Vec<String>,
    /// When each stderr line arrived.
    stderr_at: Vec<Instant>,
    deadline: Instant,
}

struct Ended {
    code: Option<i32>,
    stdout: Vec<String>,
    stderr: Vec<String>,
    stderr_at: Vec<Instant>,
}

impl Ended {
    fn dump(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code,
            self.stdout.join("\n"),
            self.stderr.join("\n")
        )
    }
}

impl Job {
    fn start(mut command: Command, limit: Duration) -> Job {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the job");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((true, line));
            }
        });
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send((false, line));
            }
        });
        Job {
            child,
            lines: rx,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stderr_at: Vec::new(),
            deadline: Instant::now() + limit,
        }
    }

    fn take(&mut self, (is_out, line): (bool, String)) {
        if is_out {
            self.stdout.push(line);
        } else {
            self.stderr.push(line);
            self.stderr_at.push(Instant::now());
        }
    }

    /// Waits until `count` stdout lines contain `needle`; returns them.
    fn await_stdout(&mut self, count: usize, needle: &str) -> Vec<String> {
        loop {
            let found: Vec<String> = self
                .stdout
                .iter()
                .filter(|l| l.contains(needle))
                .cloned()
                .collect();
            if found.len() >= count {
                return found;
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(item) => self.take(item),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "only {} of {count} lines with {needle:?} in time\n--- stdout\n{}\n--- stderr\n{}",
                        found.len(),
                        self.stdout.join("\n"),
                        self.stderr.join("\n")
                    );
                }
            }
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn finish(mut self) -> Ended {
        loop {
            while let Ok(item) = self.lines.try_recv() {
                self.take(item);
            }
            if let Some(status) = self.child.try_wait().expect("wait") {
                // The pipes close when the last writer (dsmexec) is gone.
                let drain = Instant::now() + Duration::from_secs(5);
                while let Ok(item) = self
                    .lines
                    .recv_timeout(drain.saturating_duration_since(Instant::now()))
                {
                    self.take(item);
                }
                return Ended {
                    code: status.code(),
                    stdout: self.stdout,
                    stderr: self.stderr,
                    stderr_at: self.stderr_at,
                };
            }
            if Instant::now() >= self.deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the job did not finish in time\n--- stdout\n{}\n--- stderr\n{}",
                    self.stdout.join("\n"),
                    self.stderr.join("\n")
                );
            }
            if let Ok(item) = self.lines.recv_timeout(Duration::from_millis(20)) {
                self.take(item);
            }
        }
    }
}

/// The field after `key` in a line like `rank 2 pid 1234 ready`.
fn field(line: &str, key: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// Addresses `pid` listens on (TCP, IPv4 and IPv6), from its descriptors and
/// the socket tables of its network namespace.
fn listening_addrs(pid: u32) -> Vec<SocketAddr> {
    let mut inodes = Vec::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.push(inode.to_string());
                }
            }
        }
    }
    let mut out = Vec::new();
    for (table, v6) in [("tcp", false), ("tcp6", true)] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" || !inodes.iter().any(|i| i == cols[9]) {
                continue;
            }
            let Some((ip_hex, port_hex)) = cols[1].split_once(':') else {
                continue;
            };
            let port = u16::from_str_radix(port_hex, 16).unwrap_or(0);
            let ip = if v6 {
                let mut bytes = [0u8; 16];
                for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                    let word = u32::from_str_radix(&ip_hex[i * 8..i * 8 + 8], 16).unwrap_or(0);
                    chunk.copy_from_slice(&word.to_ne_bytes());
                }
                IpAddr::from(bytes)
            } else {
                let word = u32::from_str_radix(ip_hex, 16).unwrap_or(0);
                IpAddr::from(word.to_ne_bytes())
            };
            out.push(SocketAddr::new(ip, port));
        }
    }
    out
}

fn assert_not_wildcard(pid: u32, what: &str) -> Vec<SocketAddr> {
    let addrs = listening_addrs(pid);
    assert!(
        addrs.iter().all(|a| !a.ip().is_unspecified()),
        "{what} (pid {pid}) listens on every interface: {addrs:?}"
    );
    addrs
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Processes of the test (`token` in their command line) running `exe_name`.
fn program_pids(token: &str, exe_name: &str) -> Vec<u32> {
    processes_with(token)
        .into_iter()
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|p| p.file_name().is_some_and(|n| n == exe_name))
                .unwrap_or(false)
        })
        .collect()
}

// ----------------------------------------------------------- hostile client

const ATTACK_READ_LIMIT: Duration = Duration::from_secs(15);

/// Reads until the server closes; true if it did within the limit.
fn closed_by_server(mut s: TcpStream) -> bool {
    let _ = s.set_read_timeout(Some(ATTACK_READ_LIMIT));
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
        if start.elapsed() > ATTACK_READ_LIMIT {
            return false;
        }
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    getrandom_fill(&mut v);
    v
}

fn getrandom_fill(buf: &mut [u8]) {
    // A fresh job secret is 32 random bytes: enough entropy for garbage.
    for chunk in buf.chunks_mut(32) {
        let s = JobSecret::generate().expect("random").to_hex();
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or(0);
        }
    }
}

/// One hostile connection of the given kind; returns whether the server
/// refused it (closed the connection) within the limit. `None`: could not
/// connect at all (the port is closed: refused by the kernel).
fn hostile(addr: SocketAddr, kind: &str, ident: &[u8]) -> Option<bool> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let frame = |kind: u8, payload: &[u8]| {
        let mut out = Vec::new();
        wire::write_frame(&mut out, kind, payload).expect("frame");
        out
    };
    match kind {
        "wrong-secret" => {
            let _ = s.set_read_timeout(Some(ATTACK_READ_LIMIT));
            let secret = JobSecret::generate().expect("random");
            return Some(auth::connect(&mut s, &secret, ident).is_err());
        }
        "random" => {
            let _ = s.write_all(&random_bytes(4096));
        }
        "truncated" => {
            let mut hello = frame(0xA1, &[7u8; 40]);
            hello.truncate(20);
            let _ = s.write_all(&hello);
            let _ = s.shutdown(Shutdown::Write);
        }
        "absurd-length" => {
            let mut header = frame(0xA1, b"");
            header[4..8].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
            let _ = s.write_all(&header);
            let _ = s.write_all(&[0u8; 1024]);
        }
        "replayed" => {
            // A hello, then a proof from another session (what a recording
            // replays): the acceptor's fresh nonce makes it wrong.
            let mut hello = random_bytes(32);
            hello.extend_from_slice(ident);
            let _ = s.write_all(&frame(0xA1, &hello));
            let _ = s.write_all(&frame(0xA3, &random_bytes(32)));
        }
        "silent" => {
            // Connect and say nothing: the handshake timeout closes it.
        }
        other => panic!("unknown attack {other}"),
    }
    Some(closed_by_server(s))
}

const ATTACKS: [&str; 6] = [
    "wrong-secret",
    "random",
    "truncated",
    "absurd-length",
    "replayed",
    "silent",
];

/// Every attack once against each address at the same time, plus a port
/// scan of `scan` connect/close pairs. Panics if a connection was not
/// refused; returns how many connections reached a listener.
fn attack_all(addrs: &[SocketAddr], ident: &[u8], scan: usize) -> usize {
    let mut handles = Vec::new();
    for &addr in addrs {
        for kind in ATTACKS {
            let ident = ident.to_vec();
            handles.push(thread::spawn(move || {
                (addr, kind, hostile(addr, kind, &ident))
            }));
        }
        handles.push(thread::spawn(move || {
            let mut reached = 0;
            for _ in 0..scan {
                if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                    reached += 1;
                }
            }
            (addr, "scan", Some(reached > 0))
        }));
    }
    let mut reached = 0;
    for h in handles {
        let (addr, kind, result) = h.join().expect("attack thread");
        match result {
            Some(true) => reached += 1,
            Some(false) => panic!("{addr}: the {kind} connection was not refused in time"),
            None => {}
        }
    }
    reached
}

// ------------------------------------------------- a rank killed (SIGKILL)

fn kill_scenario(mode: &str, victim: usize) {
    const N: usize = 4;
    let token = unique_token(&format!("kill{mode}"));
    let dir = scratch_dir(&token);
    let go = dir.join("go");
    let host = short_hostname();
    let mut cmd = dsmexec(
        &[
            "-n",
            &N.to_string(),
            "--grace",
            "20",
            &bin("dsmfault").display().to_string(),
            mode,
            &victim.to_string(),
            &go.display().to_string(),
        ],
        &dir,
    );
    cmd.env_remove("DSM_PEER_TIMEOUT");
    // A read fault asks the stopped home (else, co-located, it would copy
    // the page from the home's memory without waiting).
    cmd.env("DSM_DIRECT_READS", "off");
    let mut job = Job::start(cmd, Duration::from_secs(90));
    let ready = job.await_stdout(N, " ready");
    let pids: HashMap<u64, u64> = ready
        .iter()
        .filter_map(|l| Some((field(l, "rank")?, field(l, "pid")?)))
        .collect();
    let victim_pid = Pid::from_raw(pids[&(victim as u64)] as i32);
    match mode {
        "fault" => {
            let waiter = (victim + 1) % N;
            stop_process(victim_pid.as_raw());
            std::fs::write(&go, "").expect("go file");
            job.await_stdout(1, &format!("rank {waiter} touching"));
            // The waiter's main thread parks in its fault. Wait (bounded)
            // until it is there.
            await_wait_in_fault(pids[&(waiter as u64)], waiter);
        }
        "barrier" => {
            job.await_stdout(N - 1, "entering barrier");
            // Each survivor's main thread blocks in the barrier's wait.
        }
        _ => {}
    }
    let killed_at = Instant::now();
    kill(victim_pid, Signal::SIGKILL).expect("kill the victim");
    let out = job.finish();
    let took = killed_at.elapsed();
    eprintln!("{mode}: job ended {took:?} after the SIGKILL");
    let messages: Vec<&String> = out
        .stderr
        .iter()
        .filter(|l| l.starts_with("dsmexec:"))
        .collect();
    assert_eq!(out.code, Some(137), "{}", out.dump());
    assert_eq!(
        messages,
        [&format!(
            "dsmexec: rank {victim} (host {host}) was killed by signal 9 (SIGKILL)"
        )],
        "{}",
        out.dump()
    );
    // Survivors ignore SIGTERM: each ended by itself, on noticing the loss,
    // or dsmexec would have waited for its 20 s grace.
    for rank in (0..N).filter(|r| *r != victim) {
        let prefix = format!(
            "[{rank} {host} stderr] dsm: rank {rank} on {host}: lost rank {victim} on host {host}:"
        );
        assert!(
            out.stderr
                .iter()
                .any(|l| l.starts_with(&prefix) && l.ends_with("; aborting")),
            "rank {rank} did not report the loss of rank {victim}\n{}",
            out.dump()
        );
    }
    assert!(
        took < DETECTION_BOUND,
        "the survivors took {took:?} to fail (bound {DETECTION_BOUND:?})\n{}",
        out.dump()
    );
    assert_no_leftovers(&token, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rank_killed_while_others_compute() {
    kill_scenario("compute", 2);
}

#[test]
fn rank_killed_while_another_waits_in_a_fault_on_its_page() {
    kill_scenario("fault", 1);
}

#[test]
fn rank_killed_while_others_sit_in_a_barrier() {
    kill_scenario("barrier", 3);
}

// -------------------------------------------------------- hostile input

fn soak_ok(out: &Ended, host: &str, n: usize) {
    for rank in 0..n {
        let prefix = format!("[{rank} {host} stdout] rank {rank} soak ok ops ");
        assert!(
            out.stdout.iter().any(|l| l.starts_with(&prefix)),
            "rank {rank} did not finish exact\n{}",
            out.dump()
        );
    }
}

/// The DSM listeners while the job connects (the last rank held back):
/// bound to the job's address only, every hostile connection refused and
/// logged, memory bounded, results exact.
#[test]
fn hostile_input_on_dsm_ports_during_setup() {
    const N: usize = 4;
    let token = unique_token("dsmports");
    let dir = scratch_dir(&token);
    let go = dir.join("go");
    let host = short_hostname();
    let cmd = dsmexec(
        &[
            "-n",
            &N.to_string(),
            &bin("dsmsoak").display().to_string(),
            "2",
            "2",
            &go.display().to_string(),
        ],
        &dir,
    );
    let mut job = Job::start(cmd, Duration::from_secs(120));
    let line = job.await_stdout(1, "peers ").remove(0);
    let peers: Vec<SocketAddr> = line
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .split(',')
        .map(|a| a.parse().expect("peer address"))
        .collect();
    assert_eq!(peers.len(), N, "{line}");
    // Ranks 0..N-2 are in set-up, waiting for the last rank.
    let mut ranks: Vec<u32> = Vec::new();
    let until = Instant::now() + Duration::from_secs(30);
    while ranks.len() < N {
        assert!(Instant::now() < until, "the ranks did not all start");
        ranks = program_pids(&token, "dsmsoak");
        thread::sleep(Duration::from_millis(20));
    }
    for pid in &ranks {
        for a in assert_not_wildcard(*pid, "a rank") {
            assert!(a.ip().is_loopback(), "rank pid {pid} listens on {a}");
        }
    }
    let rss_before: Vec<u64> = ranks.iter().map(|p| rss_kib(*p)).collect();
    let reached = attack_all(&peers[..N - 1], b"dsm-tcp rank 3", 200);
    assert!(
        reached >= 3 * (ATTACKS.len() - 1),
        "only {reached} attacks reached a listener"
    );
    for (pid, before) in ranks.iter().zip(&rss_before) {
        let after = rss_kib(*pid);
        assert!(
            after < before + 64 * 1024,
            "rank pid {pid} grew from {before} to {after} KiB under attack"
        );
    }
    std::fs::write(&go, "").expect("go file");
    let out = job.finish();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    soak_ok(&out, &host, N);
    for rank in 0..N - 1 {
        let refused = out
            .stderr
            .iter()
            .filter(|l| {
                l.starts_with(&format!("[{rank} {host} stderr]"))
                    && l.contains("refused connection from 127.0.0.1")
            })
            .count();
        assert!(
            refused >= ATTACKS.len(),
            "rank {rank} logged {refused} refusals\n{}",
            out.dump()
        );
    }
    assert_no_leftovers(&token, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

/// dsmexec's control port while a slot is still starting (held by a fake
/// ssh): bound to the address facing the hosts, hostile connections refused
/// and logged, the job unaffected.
#[test]
fn hostile_input_on_the_launcher_port_during_startup() {
    let token = unique_token("ctlport");
    let dir = scratch_dir(&token);
    std::fs::write(dir.join("machines"), "localhost slots=3\n127.0.0.2\n").expect("machinefile");
    let ssh = format!("{} {}", bin("fakessh").display(), dir.display());
    let cmd = dsmexec(
        &[
            "--ssh",
            &ssh,
            "--startup-timeout",
            "60",
            "machines",
            &bin("dsmsoak").display().to_string(),
            "2",
            "2",
        ],
        &dir,
    );
    let job = Job::start(cmd, Duration::from_secs(120));
    let cmd_file = dir.join("ssh-127.0.0.2.cmd");
    let until = Instant::now() + Duration::from_secs(30);
    while !cmd_file.exists() {
        assert!(Instant::now() < until, "dsmexec never ran the fake ssh");
        thread::sleep(Duration::from_millis(20));
    }
    let remote = std::fs::read_to_string(&cmd_file).expect("remote command");
    let port_arg = remote
        .split_whitespace()
        .skip_while(|w| *w != "--connect")
        .nth(1)
        .expect("--connect in the remote command");
    let addr: SocketAddr = port_arg
        .trim_matches('\'')
        .parse()
        .expect("control address");
    let exec_pid = job.pid().as_raw() as u32;
    let listening = assert_not_wildcard(exec_pid, "dsmexec");
    assert!(
        listening.contains(&addr),
        "dsmexec listens on {listening:?}, not {addr}"
    );
    let before = rss_kib(exec_pid);
    let reached = attack_all(&[addr], b"dsmwrap slot 3", 300);
    assert!(
        reached >= ATTACKS.len() - 1,
        "only {reached} attacks reached dsmexec"
    );
    let after = rss_kib(exec_pid);
    assert!(
        after < before + 64 * 1024,
        "dsmexec grew from {before} to {after} KiB"
    );
    std::fs::write(dir.join("go"), "").expect("go file");
    let out = job.finish();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    // Local slots keep the machine file's name.
    let hosts = ["localhost", "localhost", "localhost", "127.0.0.2"];
    for (rank, h) in hosts.iter().enumerate() {
        let prefix = format!("[{rank} {h} stdout] rank {rank} soak ok ops ");
        assert!(
            out.stdout.iter().any(|l| l.starts_with(&prefix)),
            "rank {rank}: {}",
            out.dump()
        );
    }
    let refused = out
        .stderr
        .iter()
        .filter(|l| l.contains("refused control connection from 127.0.0.1"))
        .count();
    assert!(
        refused >= ATTACKS.len(),
        "{refused} refusals logged\n{}",
        out.dump()
    );
    assert_no_leftovers(&token, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The srun/mpirun rendezvous (rank 0's meeting port, as under `srun`):
/// listeners on the published addresses only, hostile connections
/// (including a genuine handshake replayed) refused and logged, results exact.
#[test]
fn hostile_input_on_the_rendezvous_port() {
    use std::os::unix::fs::PermissionsExt;
    const N: usize = 4;
    // (N ranks, started as srun would: SLURM_* variables, no dsmexec.)
    let token = unique_token("rvport");
    let dir = scratch_dir(&token);
    let rv = dir.join("rv");
    std::fs::create_dir(&rv).expect("rendezvous dir");
    std::fs::set_permissions(&rv, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let go = dir.join("go");
    let mut jobs: Vec<Job> = (0..N)
        .map(|rank| {
            let mut c = Command::new(bin("dsmsoak"));
            c.args(["2", "2", &go.display().to_string()])
                .current_dir(&dir)
                .env("SLURM_PROCID", rank.to_string())
                .env("SLURM_STEP_NUM_TASKS", N.to_string())
                .env("SLURM_STEP_ID", "0")
                .env("SLURM_JOB_ID", &token)
                .env("SLURM_CLUSTER_NAME", "reliability")
                .env("DSM_RENDEZVOUS_DIR", &rv)
                .env("DSM_RENDEZVOUS_TIMEOUT", "60");
            for v in [
                "DSM_RANK",
                "DSM_SIZE",
                "OMPI_COMM_WORLD_RANK",
                "DSM_RENDEZVOUS_ADDR",
            ] {
                c.env_remove(v);
            }
            Job::start(c, Duration::from_secs(120))
        })
        .collect();
    // Rank 0's file: the published addresses and the secret.
    let until = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let found = std::fs::read_dir(&rv)
            .ok()
            .and_then(|d| {
                d.flatten()
                    .find(|e| e.path().extension().is_some_and(|x| x == "rv"))
            })
            .and_then(|e| std::fs::read_to_string(e.path()).ok());
        if let Some(t) = found.filter(|t| t.contains("\naddr ")) {
            break t;
        }
        assert!(Instant::now() < until, "rank 0 never published its file");
        thread::sleep(Duration::from_millis(20));
    };
    let addrs: Vec<SocketAddr> = text
        .lines()
        .filter_map(|l| l.strip_prefix("addr ")?.parse().ok())
        .collect();
    let secret = text
        .lines()
        .find_map(|l| JobSecret::from_hex(l.strip_prefix("secret ")?))
        .expect("secret in the file");
    let rank0 = jobs[0].pid().as_raw() as u32;
    let listening = assert_not_wildcard(rank0, "rank 0 (rendezvous)");
    for a in &addrs {
        assert!(
            listening.contains(a),
            "{a} published but rank 0 listens on {listening:?}"
        );
    }
    let before = rss_kib(rank0);
    let reached = attack_all(&addrs, b"dsm-rendezvous rank 3", 200);
    assert!(
        reached >= ATTACKS.len() - 1,
        "only {reached} attacks reached rank 0"
    );

    // A genuine handshake with a bogus registration, then its replay.
    struct Recorder(TcpStream, Vec<u8>);
    impl Read for Recorder {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(b)
        }
    }
    impl Write for Recorder {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.1.extend_from_slice(b);
            self.0.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.flush()
        }
    }
    let s = TcpStream::connect(addrs[0]).expect("connect to the rendezvous");
    s.set_read_timeout(Some(ATTACK_READ_LIMIT))
        .expect("timeout");
    let mut rec = Recorder(s, Vec::new());
    auth::connect(&mut rec, &secret, b"dsm-rendezvous rank 3").expect("genuine handshake");
    wire::write_frame(&mut rec, 0xB1, b"not a registration").expect("bogus registration");
    let Recorder(s, recording) = rec;
    assert!(closed_by_server(s), "a bogus registration was kept open");
    let mut replay = TcpStream::connect(addrs[0]).expect("connect to the rendezvous");
    replay.write_all(&recording).expect("replay");
    assert!(
        closed_by_server(replay),
        "a replayed handshake was kept open"
    );
    let after = rss_kib(rank0);
    assert!(
        after < before + 64 * 1024,
        "rank 0 grew from {before} to {after} KiB"
    );

    std::fs::write(&go, "").expect("go file");
    let outs: Vec<Ended> = jobs.drain(..).map(Job::finish).collect();
    for (rank, out) in outs.iter().enumerate() {
        assert_eq!(out.code, Some(0), "rank {rank}: {}", out.dump());
        assert!(
            out.stdout
                .iter()
                .any(|l| l.starts_with(&format!("rank {rank} soak ok ops "))),
            "rank {rank}: {}",
            out.dump()
        );
    }
    let rejected = outs[0]
        .stderr
        .iter()
        .filter(|l| l.contains("rendezvous: rejected a connection from"))
        .count();
    assert!(
        rejected >= ATTACKS.len(),
        "rank 0 logged {rejected} rejections\n{}",
        outs[0].dump()
    );
    assert!(
        outs[0]
            .stderr
            .iter()
            .any(|l| l.contains("malformed registration")),
        "{}",
        outs[0].dump()
    );
    assert_no_leftovers(&token, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

// ----------------------------------------------------------------- soak

/// 8 ranks of randomized reads, writes and atomics for a bounded time
/// (DSM_SOAK_SECS, default 30) while a hostile client keeps connecting to
/// the job's ports with garbage: exact results, no error.
#[test]
fn soak_eight_ranks_under_hostile_connections() {
    const N: usize = 8;
    let secs: f64 = std::env::var("DSM_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30.0);
    let token = unique_token("soak");
    let dir = scratch_dir(&token);
    let go = dir.join("go");
    let host = short_hostname();
    let cmd = dsmexec(
        &[
            "-n",
            &N.to_string(),
            &bin("dsmsoak").display().to_string(),
            &secs.to_string(),
            "2",
            &go.display().to_string(),
        ],
        &dir,
    );
    let started = Instant::now();
    let mut job = Job::start(cmd, Duration::from_secs_f64(secs + 120.0));
    let line = job.await_stdout(1, "peers ").remove(0);
    let peers: Vec<SocketAddr> = line
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .split(',')
        .map(|a| a.parse().expect("peer address"))
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let stop = std::sync::Arc::clone(&stop);
        let peers = peers.clone();
        thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for (i, kind) in ["random", "absurd-length", "truncated", "replayed"]
                    .iter()
                    .enumerate()
                {
                    let addr = peers[(rounds as usize + i) % (N - 1)];
                    // Closed ports (after set-up) refuse at once: fine.
                    if let Some(refused) = hostile(addr, kind, b"dsm-tcp rank 7") {
                        assert!(refused, "{addr}: {kind} not refused");
                    }
                }
                rounds += 1;
                thread::sleep(Duration::from_millis(5));
            }
            rounds
        })
    };
    // Let garbage arrive during set-up too, then release the last rank.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until && !attacker.is_finished() {
        thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&go, "").expect("go file");
    let out = job.finish();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rounds = attacker.join().expect("the attacker panicked");
    eprintln!("soak: {:?}, {rounds} attack rounds", started.elapsed());
    assert_eq!(out.code, Some(0), "{}", out.dump());
    soak_ok(&out, &host, N);
    assert!(
        !out.stderr.iter().any(|l| l.contains("dsm: rank")),
        "{}",
        out.dump()
    );
    assert_no_leftovers(&token, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------ network-namespace cluster

struct Cluster {
    dir: PathBuf,
    ssh: String,
    namespaces: Vec<String>,
    hosts: Vec<String>,
}

impl Cluster {
    fn up(n: usize) -> Option<Cluster> {
        let required = std::env::var("DSM_TEST_REQUIRE_NETNS").is_ok_and(|v| v == "1");
        if !nix::unistd::geteuid().is_root() {
            assert!(
                !required,
                "DSM_TEST_REQUIRE_NETNS=1 but not running as root"
            );
            println!("SKIPPED: the link-cut test needs root (network namespaces)");
            eprintln!("SKIPPED: the link-cut test needs root (network namespaces)");
            return None;
        }
        let dir = std::env::temp_dir().join(unique_token("netnsrel"));
        // Another prefix and subnet than the SSH tests, which may run meanwhile.
        let status = Command::new(repo_root().join("scripts/netns-cluster.sh"))
            .args(["up", &n.to_string()])
            .arg(&dir)
            .env("DSM_NETNS_PREFIX", "dsmrel")
            .env("DSM_NETNS_SUBNET", "10.78.0")
            .status()
            .expect("run netns-cluster.sh");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let cluster = Cluster {
            ssh: read("ssh_command").trim().to_string(),
            namespaces: read("namespaces").lines().map(str::to_string).collect(),
            hosts: read("hosts").lines().map(str::to_string).collect(),
            dir,
        };
        if !status.success() {
            assert!(
                !required,
                "netns-cluster.sh up failed ({status}) and DSM_TEST_REQUIRE_NETNS=1"
            );
            println!("SKIPPED: netns-cluster.sh up failed ({status})");
            return None;
        }
        Some(cluster)
    }

    fn ip_in(&self, host: usize, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.namespaces[host], "ip"])
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/netns-cluster.sh"))
            .arg("down")
            .arg(&self.dir)
            .env("DSM_NETNS_PREFIX", "dsmrel")
            .status();
    }
}

/// A link cut (the third host's interface set down) while every rank
/// exchanges pages: the ranks that need that host fail within
/// DSM_PEER_TIMEOUT naming it, dsmexec exits non-zero, nothing hangs and no
/// process remains. The DSM and control listeners face the job's network.
#[test]
fn link_cut_between_hosts() {
    let Some(cluster) = Cluster::up(3) else {
        return;
    };
    const TIMEOUT_S: u64 = 4;
    let token = unique_token("linkcut");
    let machines = cluster.dir.join("machines");
    std::fs::write(&machines, cluster.hosts.join("\n") + "\n").expect("machinefile");
    let mut cmd = dsmexec(
        &[
            "--ssh",
            &cluster.ssh,
            "--grace",
            "2",
            &machines.display().to_string(),
            &bin("dsmfault").display().to_string(),
            "compute",
            "99",
            &token,
        ],
        &cluster.dir,
    );
    cmd.env("DSM_PEER_TIMEOUT", TIMEOUT_S.to_string());
    let mut job = Job::start(cmd, Duration::from_secs(120));
    job.await_stdout(3, " ready");
    // Listeners: dsmexec's control port is closed after start-up; the ranks'
    // DSM listeners too. What remains must not face every interface.
    assert_not_wildcard(job.pid().as_raw() as u32, "dsmexec");
    for pid in program_pids(&token, "dsmfault") {
        assert_not_wildcard(pid, "a rank");
    }
    let cut_at = Instant::now();
    assert!(
        cluster.ip_in(2, &["link", "set", "eth0", "down"]),
        "cutting the link"
    );
    let out = job.finish();
    let took = cut_at.elapsed();
    eprintln!("link cut: dsmexec ended {took:?} after the cut");
    let cut_host = &cluster.hosts[2];
    assert_ne!(out.code, Some(0), "{}", out.dump());
    assert!(out.code.is_some(), "{}", out.dump());
    let messages: Vec<&String> = out
        .stderr
        .iter()
        .filter(|l| l.starts_with("dsmexec:"))
        .collect();
    assert!(!messages.is_empty(), "{}", out.dump());
    // Each of ranks 0 and 1 reports the loss of the cut host, or of the
    // other one when that one, having named the cut host, ended first (its
    // closed connection can reach a rank before its own timeout expires).
    let loss_line = |rank: usize| {
        let host = &cluster.hosts[rank];
        let prefix = format!("[{rank} {host} stderr] dsm: rank {rank} on {host}: lost rank ");
        out.stderr
            .iter()
            .position(|l| l.starts_with(&prefix))
            .map(|i| (out.stderr[i][prefix.len()..].to_string(), out.stderr_at[i]))
    };
    let names_cut_host = |rank: usize| {
        loss_line(rank).is_some_and(|(lost, _)| lost.starts_with(&format!("2 on host {cut_host}:")))
    };
    assert!(
        names_cut_host(0) || names_cut_host(1),
        "no rank named the cut host\n{}",
        out.dump()
    );
    for rank in 0..2 {
        let other = 1 - rank;
        let Some((lost, at)) = loss_line(rank) else {
            panic!("rank {rank} reported no loss\n{}", out.dump());
        };
        assert!(
            names_cut_host(rank)
                || (lost.starts_with(&format!("{other} on host ")) && names_cut_host(other)),
            "rank {rank} named neither the cut host nor a rank that had: {lost}\n{}",
            out.dump()
        );
        let detected = at.saturating_duration_since(cut_at);
        eprintln!("link cut: rank {rank} reported the loss {detected:?} after the cut");
        // The timeout, plus keepalive's one-second granularity and the
        // output's way back through ssh; twice the timeout when the rank's
        // heartbeat thread was starved and forgave every silence
        // (`Liveness::forgive`).
        assert!(
            detected < Duration::from_secs(2 * TIMEOUT_S + 3),
            "rank {rank} took {detected:?} (DSM_PEER_TIMEOUT={TIMEOUT_S})\n{}",
            out.dump()
        );
    }
    // Detection within the timeout (+ the probe granularity; twice it
    // after a forgiving starved heartbeat thread), then the launcher's stop
    // (grace 2 s, 2 s linger) for the unreachable host.
    assert!(
        took < Duration::from_secs(2 * TIMEOUT_S + 12),
        "took {took:?}\n{}",
        out.dump()
    );
    // The rank behind the cut ends on its own timeout as well.
    assert_no_leftovers(&token, Duration::from_secs(TIMEOUT_S + 10));
    let _ = cluster.ip_in(2, &["link", "set", "eth0", "up"]);
}
