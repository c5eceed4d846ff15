//! Hang reports: what a rank's threads wait for, on demand (SIGUSR1, which
//! dsmexec forwards to every rank) and when a wait passes
//! `DSM_HANG_REPORT_S`. Without it, a stuck job needs a debugger on every
//! node to say which page, lock or barrier it is stuck on.
//!
//! Each thread keeps its own record of the wait it is in and since when
//! (a slot of atomics only it writes, so the fault path takes no lock;
//! [`Waiting`] names a rank's records): a page fault (registered by the
//! SIGBUS handler at each entry; a thread whose page has not come retries
//! the access every few tens of milliseconds, so its record stays fresh),
//! a barrier, a lock. The report
//! joins those records to the engine's own state (requests in flight, and
//! what this rank holds up for others: barrier arrivals it counts, locks
//! it manages), which `crate::engine` writes as lines.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A thread out of its fault handler for longer than this has its page (a
/// thread still waiting re-enters the handler every `SIGNAL_WAIT`).
const RETRY_WINDOW: Duration = Duration::from_secs(1);

/// Environment variable: seconds a wait may last before the rank prints a
/// hang report by itself (`0` or `off`: never).
pub const ENV_HANG_REPORT: &str = "DSM_HANG_REPORT_S";
/// Default for [`ENV_HANG_REPORT`]: long enough that a rank waiting at a
/// barrier for a slower one is not reported, short enough to be seen
/// within a batch allocation.
pub const DEFAULT_HANG_REPORT: Duration = Duration::from_secs(300);

/// What a thread waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    /// A page fault on shared page `page`.
    Page {
        /// Page number in the shared space.
        page: usize,
        /// A write fault (else a read fault).
        write: bool,
    },
    /// A barrier of the job.
    Barrier,
    /// Distributed lock with this id.
    Lock(u64),
    /// The collective free of the segment with this id.
    Free(u32),
}

impl WaitFor {
    /// As two words for a thread's slot: a kind (never 0) and a value.
    fn encode(self) -> (u8, u64) {
        match self {
            WaitFor::Page { page, write } => (1 + u8::from(write), page as u64),
            WaitFor::Barrier => (3, 0),
            WaitFor::Lock(lock) => (4, lock),
            WaitFor::Free(segment) => (5, u64::from(segment)),
        }
    }

    fn decode(kind: u8, value: u64) -> Option<WaitFor> {
        match kind {
            1 | 2 => Some(WaitFor::Page {
                page: value as usize,
                write: kind == 2,
            }),
            3 => Some(WaitFor::Barrier),
            4 => Some(WaitFor::Lock(value)),
            5 => u32::try_from(value).ok().map(WaitFor::Free),
            _ => None,
        }
    }
}

/// One thread's wait, written only by that thread, so the fault path takes
/// no lock: relaxed atomics (a report may read a record mid-update, which a
/// diagnostic tolerates; the thread's own reads are exact).
#[derive(Default)]
struct Slot {
    tid: AtomicI32,
    /// The [`Waiting`] the wait belongs to (its id; 0: no wait).
    owner: AtomicU64,
    /// [`WaitFor::encode`].
    kind: AtomicU8,
    value: AtomicU64,
    /// Nanoseconds since [`clock`]'s origin.
    since_ns: AtomicU64,
    /// When it last left the wait (meaningful when not `inside`).
    left_ns: AtomicU64,
    /// Inside the wait now (a fault handler, a barrier call).
    inside: AtomicBool,
    /// Its thread has ended.
    gone: AtomicBool,
}

impl Slot {
    fn live(&self, owner: u64, now_ns: u64) -> bool {
        self.owner.load(Relaxed) == owner
            && (self.inside.load(Relaxed)
                || now_ns.saturating_sub(self.left_ns.load(Relaxed))
                    < RETRY_WINDOW.as_nanos() as u64)
    }
}

/// Every thread's slot, registered at its first wait.
static SLOTS: Mutex<Vec<Arc<Slot>>> = Mutex::new(Vec::new());

/// Nanoseconds since the first call in this process.
fn clock() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The calling thread's slot; marked gone when the thread ends.
struct MySlot(Arc<Slot>);

impl MySlot {
    fn new() -> MySlot {
        let slot = Arc::new(Slot::default());
        slot.tid.store(nix::unistd::gettid().as_raw(), Relaxed);
        SLOTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&slot));
        MySlot(slot)
    }
}

impl Drop for MySlot {
    fn drop(&mut self) {
        self.0.gone.store(true, Relaxed);
    }
}

thread_local! {
    static MINE: MySlot = MySlot::new();
}

/// One thread's wait as a report shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadReport {
    /// The thread's kernel id (`gettid`).
    pub tid: i32,
    /// What it waits for.
    pub what: WaitFor,
    /// How long it has waited so far (retried faults included).
    pub waited: Duration,
}

/// The waits of a rank's threads (each thread keeps its own record; this
/// names the rank's among them).
#[derive(Debug)]
pub struct Waiting {
    id: u64,
}

impl Default for Waiting {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Waiting {
            id: NEXT.fetch_add(1, Relaxed),
        }
    }
}

impl Waiting {
    /// The calling thread enters a wait for `what`: a continuation of its
    /// previous one if that was for the same thing and recent (a fault
    /// retried), else a new one.
    pub fn enter(&self, what: WaitFor) {
        let now = clock();
        let (kind, value) = what.encode();
        // A thread past its thread-local teardown goes unrecorded.
        let _ = MINE.try_with(|mine| {
            let slot = &mine.0;
            let same = slot.live(self.id, now)
                && WaitFor::decode(slot.kind.load(Relaxed), slot.value.load(Relaxed)) == Some(what);
            if !same {
                slot.since_ns.store(now, Relaxed);
                slot.kind.store(kind, Relaxed);
                slot.value.store(value, Relaxed);
            }
            slot.left_ns.store(now, Relaxed);
            slot.inside.store(true, Relaxed);
            slot.owner.store(self.id, Relaxed);
        });
    }

    /// The calling thread leaves its wait for now: a fault handler returns
    /// to retry the access, which may fault again.
    pub fn pause(&self) {
        let _ = MINE.try_with(|mine| {
            mine.0.left_ns.store(clock(), Relaxed);
            mine.0.inside.store(false, Relaxed);
        });
    }

    /// The calling thread's wait is over.
    pub fn leave(&self) {
        let _ = MINE.try_with(|mine| {
            mine.0.inside.store(false, Relaxed);
            mine.0.owner.store(0, Relaxed);
        });
    }

    /// Registers a wait for the caller until the guard is dropped.
    pub fn guard(&self, what: WaitFor) -> WaitGuard<'_> {
        self.enter(what);
        WaitGuard { waiting: self }
    }

    /// The threads waiting now, the longest first; forgets ended threads.
    pub fn snapshot(&self) -> Vec<ThreadReport> {
        let now = clock();
        let mut slots = SLOTS.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|slot| !slot.gone.load(Relaxed));
        let mut waits: Vec<ThreadReport> = slots
            .iter()
            .filter(|slot| slot.live(self.id, now))
            .filter_map(|slot| {
                let what = WaitFor::decode(slot.kind.load(Relaxed), slot.value.load(Relaxed))?;
                Some(ThreadReport {
                    tid: slot.tid.load(Relaxed),
                    what,
                    waited: Duration::from_nanos(now.saturating_sub(slot.since_ns.load(Relaxed))),
                })
            })
            .collect();
        waits.sort_by_key(|w| std::cmp::Reverse(w.waited));
        waits
    }
}

/// See [`Waiting::guard`].
pub struct WaitGuard<'a> {
    waiting: &'a Waiting,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.waiting.leave();
    }
}

impl std::fmt::Display for WaitFor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitFor::Page { page, write } => {
                let kind = if *write { "write" } else { "read" };
                write!(f, "page {page} ({kind} fault)")
            }
            WaitFor::Barrier => write!(f, "a barrier"),
            WaitFor::Lock(lock) => write!(f, "lock {lock}"),
            WaitFor::Free(segment) => write!(f, "the free of segment {segment}"),
        }
    }
}

/// Where this process stands in its job, for what it says as it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Membership {
    /// Not in a job, or left it by finalize.
    Out,
    /// In the job as this rank on this host, not finalized: an exit now
    /// takes this rank's pages from the others, and is reported.
    In {
        rank: crate::Rank,
        host: String,
        /// The process that joined: a child it forks inherits the atexit
        /// hook but is not the rank.
        pid: u32,
    },
    /// Ending for a failure, whose line must stay the rank's last (the
    /// launcher reads it): no more reports.
    Failing,
}

/// Reports are written holding it, so none can follow a failure's line.
static MEMBERSHIP: Mutex<Membership> = Mutex::new(Membership::Out);

fn membership() -> std::sync::MutexGuard<'static, Membership> {
    MEMBERSHIP.lock().unwrap_or_else(|p| p.into_inner())
}

/// This process joined the job as `rank` on `host`: from now until
/// [`left_job`], an exit is reported as one without finalize.
pub(crate) fn joined_job(rank: crate::Rank, host: &str) {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain function with no arguments, which
        // stays valid for the life of the process, to run at exit().
        if unsafe { libc::atexit(report_exit_without_finalize) } != 0 {
            tracing::debug!("atexit refused: exits without finalize go unreported");
        }
    });
    *membership() = Membership::In {
        rank,
        host: host.to_string(),
        pid: std::process::id(),
    };
}

/// This process left the job by finalize (or is dropping its DSM, and
/// said so): its exit is no longer news.
pub(crate) fn left_job() {
    let mut state = membership();
    if *state != Membership::Failing {
        *state = Membership::Out;
    }
}

/// Prints, once, that the process leaves the job without finalize, if it
/// does; true if it did.
pub(crate) fn report_leaving_without_finalize() -> bool {
    let mut state = membership();
    let Membership::In { rank, host, pid } = &*state else {
        return false;
    };
    if *pid != std::process::id() {
        return false;
    }
    eprintln!(
        "dsm: rank {rank} on {host}: exiting without finalize while the job runs: the other ranks lose the pages this rank holds; call finalize (dsm_finalize) before the program ends"
    );
    *state = Membership::Out;
    true
}

extern "C" fn report_exit_without_finalize() {
    report_leaving_without_finalize();
}

/// Stops every hang report of this process, and the report of an exit
/// without finalize: it is ending for a failure, whose message is already
/// out. Returns once no report is being written.
pub fn process_ending() {
    *membership() = Membership::Failing;
}

fn ending() -> bool {
    *membership() == Membership::Failing
}

/// How often the reporter looks for SIGUSR1 and for waits past the
/// threshold.
const REPORT_TICK: Duration = Duration::from_millis(250);

/// What the reporter thread needs.
pub(crate) struct Reporter {
    pub rank: crate::Rank,
    pub host: String,
    pub threshold: Option<Duration>,
    pub waiting: std::sync::Arc<Waiting>,
    /// Lines describing the threads' waits and the engine's state; `None`
    /// when the engine could not be reached in time (it is then named as
    /// busy, and the threads' waits shown alone).
    #[allow(clippy::type_complexity)]
    pub describe: Box<dyn Fn(&[ThreadReport]) -> Option<Vec<String>> + Send>,
    /// Closed (or sent to) when the rank finalizes.
    pub stop: crossbeam_channel::Receiver<()>,
}

impl Reporter {
    /// Runs until `stop`: prints a report on each SIGUSR1, and when a
    /// wait passed the threshold (again each threshold while it lasts).
    pub(crate) fn run(self, signals: &mut signal_hook::iterator::Signals) {
        let mut last_automatic: Option<Instant> = None;
        loop {
            match self.stop.recv_timeout(REPORT_TICK) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            if ending() {
                return;
            }
            if signals.pending().count() > 0 {
                self.print("on SIGUSR1");
                continue;
            }
            let Some(threshold) = self.threshold else {
                continue;
            };
            let longest = self.waiting.snapshot().first().map(|w| w.waited);
            let due = last_automatic.is_none_or(|t| t.elapsed() >= threshold);
            if longest.is_some_and(|w| w >= threshold) && due {
                last_automatic = Some(Instant::now());
                self.print(&format!(
                    "a wait passed {ENV_HANG_REPORT}={}",
                    threshold.as_secs_f64()
                ));
            }
        }
    }

    fn print(&self, why: &str) {
        let threads = self.waiting.snapshot();
        let lines = (self.describe)(&threads).unwrap_or_else(|| {
            let mut lines = vec![
                "the engine is busy (its lock held for over 1 s): its state is not shown"
                    .to_string(),
            ];
            lines.extend(threads.iter().map(|w| {
                format!(
                    "thread {} ({}) waits for {} since {:.1} s",
                    w.tid,
                    thread_name(w.tid),
                    w.what,
                    w.waited.as_secs_f64()
                )
            }));
            lines
        });
        let mut text = format!(
            "dsm: rank {} on {}: hang report ({why}): {} thread(s) waiting\n",
            self.rank,
            self.host,
            threads.len()
        );
        for line in lines {
            text.push_str(&format!("dsm: rank {}: {line}\n", self.rank));
        }
        // One write, so the lines of one report stay together.
        use std::io::Write;
        let state = membership();
        if *state != Membership::Failing {
            let _ = std::io::stderr().lock().write_all(text.as_bytes());
        }
    }
}

/// A thread's name as the kernel knows it (`comm`), for the report.
pub fn thread_name(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Parses a `DSM_HANG_REPORT_S` value: seconds, or `0`/`off` for never.
pub fn parse_threshold(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let secs: f64 = text
        .parse()
        .map_err(|_| "expected a number of seconds, or off".to_string())?;
    if secs == 0.0 {
        return Ok(None);
    }
    Duration::try_from_secs_f64(secs)
        .map(Some)
        .map_err(|_| "expected a number of seconds, or off".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retried_fault_continues_its_wait_and_a_finished_one_is_forgotten() {
        let waiting = Waiting::default();
        let page = WaitFor::Page {
            page: 5,
            write: false,
        };
        waiting.enter(page);
        let first = waiting.snapshot();
        waiting.pause();
        waiting.enter(page);
        let again = waiting.snapshot();
        assert_eq!(again.len(), 1);
        assert!(again[0].waited >= first[0].waited, "the wait continued");
        waiting.enter(WaitFor::Lock(3));
        assert_eq!(waiting.snapshot()[0].what, WaitFor::Lock(3));
        {
            let _barrier = waiting.guard(WaitFor::Barrier);
            assert_eq!(waiting.snapshot()[0].what, WaitFor::Barrier);
        }
        assert!(waiting.snapshot().is_empty());
    }

    #[test]
    fn thresholds() {
        assert_eq!(parse_threshold("off"), Ok(None));
        assert_eq!(parse_threshold("0"), Ok(None));
        assert_eq!(
            parse_threshold("2.5"),
            Ok(Some(Duration::from_millis(2500)))
        );
        assert!(parse_threshold("soon").is_err());
        assert!(parse_threshold("-1").is_err());
        assert!(parse_threshold("1e30").is_err());
    }
}
