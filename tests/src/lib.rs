//! Helpers for the multi-process tests: find the built binaries, run
//! dsmexec with a hard time limit, read its prefixed output, and check that
//! no process of a test survived.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A binary of the workspace, built by `cargo build --workspace --bins`
/// (scripts/test.sh does that before `cargo test`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --lib --bins`, as scripts/test.sh does)",
        path.display()
    );
    path
}

pub fn short_hostname() -> String {
    let name = nix::unistd::gethostname().expect("hostname");
    name.to_string_lossy()
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A token unique to one test run, passed to test programs so leftovers can
/// be found in /proc.
pub fn unique_token(label: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "dsmtest-{label}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    /// Lines of stdout (or stderr) carrying `[rank host stream] ` prefixes.
    pub fn lines_of(&self, rank: usize, host: &str, stream: &str) -> Vec<String> {
        let prefix = format!("[{rank} {host} {stream}] ");
        let text = if stream == "stdout" {
            &self.stdout
        } else {
            &self.stderr
        };
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(str::to_string)
            .collect()
    }

    /// dsmexec's own messages (lines starting with `dsmexec:`).
    pub fn launcher_messages(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("dsmexec:"))
            .collect()
    }
}

/// A running dsmexec whose stdout lines can be awaited one by one.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: thread::JoinHandle<String>,
    started: Instant,
    limit: Duration,
}

pub fn dsmexec(args: &[&str], cwd: &Path) -> Command {
    let mut c = Command::new(bin("dsmexec"));
    c.args(args).current_dir(cwd);
    c
}

impl Running {
    pub fn start(mut command: Command, limit: Duration) -> Running {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("start dsmexec");
        let out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Running {
            child,
            lines: rx,
            stdout: Vec::new(),
            stderr,
            started: Instant::now(),
            limit,
        }
    }

    fn deadline(&self) -> Instant {
        self.started + self.limit
    }

    /// Waits until `count` stdout lines satisfy `pred`, failing loudly at the time limit.
    pub fn await_lines(&mut self, count: usize, pred: impl Fn(&str) -> bool) {
        let mut seen = self.stdout.iter().filter(|l| pred(l)).count();
        while seen < count {
            let left = self.deadline().saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if pred(&line) {
                        seen += 1;
                    }
                    self.stdout.push(line);
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "only {seen} of {count} expected lines within {:?}; stdout so far:\n{}",
                        self.limit,
                        self.stdout.join("\n")
                    );
                }
            }
        }
    }

    /// The stdout lines received so far.
    pub fn stdout_lines(&self) -> &[String] {
        &self.stdout
    }

    /// Waits for dsmexec to exit; kills it and fails the test at the time limit.
    pub fn finish(mut self) -> Finished {
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let mut stdout = std::mem::take(&mut self.stdout);
                stdout.extend(self.lines.iter());
                let stderr = self.stderr.join().unwrap_or_default();
                return Finished {
                    code: status.code(),
                    stdout: stdout.join("\n") + "\n",
                    stderr,
                    elapsed: self.started.elapsed(),
                };
            }
            if Instant::now() >= self.deadline() {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "dsmexec did not finish within {:?}; stdout so far:\n{}",
                    self.limit,
                    self.stdout.join("\n")
                );
            }
            // Drain stdout while waiting so a chatty job never blocks on a full pipe.
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(20)) {
                self.stdout.push(line);
            }
        }
    }
}

/// Runs dsmexec to completion within `limit`.
pub fn run(command: Command, limit: Duration) -> Finished {
    Running::start(command, limit).finish()
}

/// Sends SIGSTOP to process `pid` and waits (at most 10 s, else panics)
/// until every one of its threads is stopped. `kill` returns before that:
/// one thread takes the signal and then stops the others, so on a loaded
/// machine another thread (a receive thread, scheduled first) may still
/// answer a message sent just after `kill` returned.
pub fn stop_process(pid: i32) {
    use nix::sys::signal::{kill, Signal};
    kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP)
        .unwrap_or_else(|e| panic!("SIGSTOP to {pid}: {e}"));
    let stopped = |tid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
            .ok()
            .and_then(|stat| {
                let after_comm = &stat[stat.rfind(')')? + 1..];
                after_comm
                    .split_whitespace()
                    .next()
                    .map(|state| state == "T" || state == "t")
            })
            // A thread gone (or unreadable) stops nothing.
            .unwrap_or(true)
    };
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap_or_else(|e| panic!("threads of {pid}: {e}"));
        let running: Vec<String> = tasks
            .flatten()
            .filter_map(|t| t.file_name().into_string().ok())
            .filter(|tid| !stopped(tid))
            .collect();
        if running.is_empty() {
            return;
        }
        assert!(
            Instant::now() < until,
            "threads {running:?} of {pid} still not stopped 10 s after SIGSTOP"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Waits (10 s at most, else panics naming `rank`) until thread `tid`,
/// which has just announced that it touches a page that cannot come,
/// sleeps inside its fault: in the kernel's userfaultfd handler
/// (`DSM_FAULTS=thread`), or on a futex in the SIGBUS handler (the
/// engine's lock, or its page's wait, the default delivery; the thread
/// takes no contended lock between its announcement and its fault). Needs
/// `/proc/<tid>/wchan` readable.
pub fn await_wait_in_fault(tid: u64, rank: usize) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let wchan = std::fs::read_to_string(format!("/proc/{tid}/wchan")).unwrap_or_default();
        if wchan.contains("userfault") || wchan.contains("futex") {
            return;
        }
        assert!(
            Instant::now() < until,
            "rank {rank} never waited in its page fault (wchan {wchan:?})"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A fresh, empty directory named `token` under the system's temporary
/// directory. With a `unique_token`, programs given a path inside it are
/// found by [`processes_with`] (their command line carries the token).
pub fn scratch_dir(token: &str) -> ScratchDir {
    let dir = std::env::temp_dir().join(token);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    ScratchDir(dir)
}

/// A test's scratch directory, removed when the test passes (a failing
/// test leaves it behind, for whoever looks into the failure).
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Live (non-zombie) processes whose command line contains `token`.
pub fn processes_with(token: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(token) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        if !matches!(state, Some("Z") | Some("X") | None) {
            found.push(pid);
        }
    }
    found
}

/// Asserts that no process carrying `token` remains, allowing `within` for
/// SIGKILLed processes to finish dying.
pub fn assert_no_leftovers(token: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = processes_with(token);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("processes of the test are still running: {left:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Compiles `examples/c/NAME.c` against the built libdsm (`cc`, rpath to
/// the target directory); returns the executable.
pub fn compile_c_example(name: &str) -> PathBuf {
    compile_c(&format!("examples/c/{name}.c"), &format!("{name}_c"))
}

/// Compiles the C program at `source` (relative to the repository root)
/// against the built libdsm and POSIX threads (`cc`, rpath to the target
/// directory) into the target directory as `exe_name`; returns its path.
/// Once per test process and name: tests running in parallel must not
/// start a program while another one's linker rewrites it.
pub fn compile_c(source: &str, exe_name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, exe)) = built.iter().find(|(name, _)| name == exe_name) {
        return exe.clone();
    }
    let exe = compile_c_now(source, exe_name);
    built.push((exe_name.to_string(), exe.clone()));
    exe
}

fn compile_c_now(source: &str, exe_name: &str) -> PathBuf {
    let out_dir = bin("dsmexec")
        .parent()
        .expect("target directory")
        .to_path_buf();
    assert!(
        out_dir.join("libdsm.so").exists(),
        "libdsm.so is missing: build it first (`cargo build --workspace --lib --bins`, as scripts/test.sh does)"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root");
    let exe = out_dir.join(exe_name);
    let status = Command::new("cc")
        .arg("-O1")
        .arg("-pthread")
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join(source))
        .arg("-L")
        .arg(&out_dir)
        .arg("-ldsm")
        .arg(format!("-Wl,-rpath,{}", out_dir.display()))
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("run the C compiler (cc)");
    assert!(status.success(), "compiling {source} against libdsm failed");
    exe
}

impl Finished {
    /// Asserts a clean exit and that every rank printed a line starting
    /// with `rank R: {text}` on stdout.
    pub fn expect_each_rank(&self, ranks: usize, text: &str) {
        assert_eq!(self.code, Some(0), "{self:?}");
        let host = short_hostname();
        for rank in 0..ranks {
            let lines = self.lines_of(rank, &host, "stdout");
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with(&format!("rank {rank}: {text}"))),
                "rank {rank}: {lines:?}\n{self:?}"
            );
        }
    }
}
