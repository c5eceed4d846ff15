//! Where and how the DSM's service threads run (engine, fault reader,
//! transport receivers and completion pollers).
//!
//! A rank's service threads share one CPU ([`CpuChoice::Auto`]: `rank mod
//! CPUs`), so handing a message from a receiver to the engine, or an
//! engine's answer to the next message, is a wake-up on the same CPU; on
//! this project's 2-vCPU VM a wake-up across CPUs costs ~90 µs (an idle
//! vCPU has to be woken by the host) against ~5 µs on the same CPU.
//!
//! A service thread sleeps almost all the time and, when a message or a
//! fault arrives, must run at once: a peer (or an application thread of
//! this process) is waiting for its answer. When every CPU runs a compute
//! thread (one rank per core, or ranks oversubscribed) the fair scheduler
//! does not preempt the compute thread for it: measured on Jacobi at 2
//! ranks, a request waited 2.5-3 ms (until the compute thread's slice ran
//! out) for the other rank's receiver, against ~0.2 ms for the whole round
//! trip when that CPU was free. So, by default ([`ServiceSched::Auto`]),
//! service threads ask for `SCHED_FIFO` at the lowest real-time priority:
//! a woken service thread then runs at once. They only ever run briefly
//! (bounded polling, then sleep), and the kernel's real-time throttling
//! keeps 5% of each CPU for normal threads whatever happens. Without the
//! privilege (`CAP_SYS_NICE` or `ulimit -r` >= 1) they fall back to a short
//! fair-scheduler slice (`sched_setattr`, Linux 6.12+, unprivileged), which
//! helps less: the woken thread gets an earlier deadline, but preempts only
//! when the scheduler also finds it eligible.

use std::time::{Duration, Instant};

use crate::transport::{AnswerPoll, Rank};

/// Polls `done` for up to `spin` before a thread goes to sleep on what it
/// waits for: an event seen meanwhile costs no wake-up. True once `done`
/// held; a zero `spin` checks once. No system call but the vDSO clock, so
/// a signal handler may poll too.
pub fn poll_until(spin: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + spin;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// How long a waiting application thread polls flat out before it yields
/// its CPU between looks ([`poll_with_answers`]): about a round trip
/// between co-located ranks, so the common answer costs no system call.
pub const HOT_WAIT_POLL: Duration = Duration::from_micros(60);

/// A waiting application thread's poll (its faulted page, a barrier's or a
/// lock's answer): polls `done` for up to `spin`, handing on meanwhile what
/// `answers` (a [`crate::transport::Transport::poll_answers`]) can read.
/// After [`HOT_WAIT_POLL`] it yields its CPU between looks
/// (`sched_yield`): a thread of this CPU with work to do runs instead,
/// and a long wait (a barrier's partner still computing) is still seen at
/// once when nothing else runs, as MPI waits. Not for the real-time
/// service threads, whose yield would leave normal threads nothing.
/// Safe in a signal handler: no allocation, the vDSO clock and
/// `sched_yield` only.
pub fn poll_with_answers(
    answers: &mut Option<Box<dyn AnswerPoll + '_>>,
    spin: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let mut look = || {
        if let Some(answers) = answers.as_mut() {
            answers.receive();
        }
        done()
    };
    let start = Instant::now();
    if poll_until(spin.min(HOT_WAIT_POLL), &mut look) {
        return true;
    }
    let until = start + spin;
    while Instant::now() < until {
        std::thread::yield_now();
        if look() {
            return true;
        }
    }
    false
}

/// Which CPU a rank's service threads are pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuChoice {
    /// `rank mod` the number of CPUs this process may run on, taken in
    /// order: a rank's service threads share one CPU, and the ranks of one
    /// machine spread over its CPUs.
    #[default]
    Auto,
    /// Not pinned.
    Unpinned,
    /// This CPU number.
    Fixed(usize),
}

impl CpuChoice {
    /// Parses `auto`, `none` or a CPU number.
    pub fn parse(text: &str) -> Option<CpuChoice> {
        match text.trim() {
            "auto" => Some(CpuChoice::Auto),
            "none" => Some(CpuChoice::Unpinned),
            n => n.parse().ok().map(CpuChoice::Fixed),
        }
    }

    /// The CPU to pin to, if any, for `rank` when this process may run on
    /// the CPUs `cpus` (in order; empty: unknown).
    pub fn resolve(self, rank: Rank, cpus: &[usize]) -> Option<usize> {
        match self {
            CpuChoice::Auto if cpus.is_empty() => None,
            CpuChoice::Auto => Some(cpus[rank % cpus.len()]),
            CpuChoice::Unpinned => None,
            CpuChoice::Fixed(n) => Some(n),
        }
    }

    /// [`CpuChoice::resolve`] against the CPUs this process may run on now.
    pub fn for_rank(self, rank: Rank) -> Option<usize> {
        self.resolve(rank, &usable_cpus())
    }
}

/// The CPUs this process may run on, in order.
fn usable_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

/// Pins the calling thread (and the threads it creates from now on) to
/// `cpu`; false, and nothing changed, when that CPU is not usable. Service
/// threads, and with `DSM_BIND=core` the thread that starts the DSM.
pub(crate) fn pin_current_thread(cpu: usize) -> bool {
    core_affinity::get_core_ids()
        .and_then(|ids| ids.into_iter().find(|c| c.id == cpu))
        .is_some_and(core_affinity::set_for_current)
}

/// True when the process may use two CPUs per rank this host runs of the
/// job (`local_ranks`): one for the application, one for its service
/// threads, which may then poll instead of sleeping.
pub fn spare_cpu_per_rank(local_ranks: usize) -> bool {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    2 * local_ranks.max(1) <= cpus
}

/// What every service thread does first: move to its rank's service CPU
/// (when there is one; a CPU outside the process's affinity is reported and
/// the thread stays unpinned) and ask to be scheduled as `sched` says.
pub fn enter_service_thread(cpu: Option<usize>, sched: ServiceSched) {
    let realtime = sched == ServiceSched::Auto && prefer_realtime();
    if !realtime {
        prefer_short_slice(SERVICE_SLICE);
    }
    tracing::debug!(
        "{} runs {} on CPU {cpu:?}",
        std::thread::current().name().unwrap_or("a service thread"),
        if realtime {
            "SCHED_FIFO 1"
        } else {
            "with a short fair slice"
        }
    );
    if let Some(cpu) = cpu {
        if !pin_current_thread(cpu) {
            tracing::warn!(
                "cannot pin {} to CPU {cpu} (usable: {:?}); it runs unpinned",
                std::thread::current().name().unwrap_or("a service thread"),
                usable_cpus()
            );
        }
    }
}

/// How service threads ask to be scheduled (`DSM_SERVICE_SCHED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServiceSched {
    /// `SCHED_FIFO`, priority 1, where the process may; else a short fair
    /// slice.
    #[default]
    Auto,
    /// A short fair slice only: never a real-time policy.
    Fair,
}

impl ServiceSched {
    /// The variable that chooses it.
    pub const ENV: &'static str = "DSM_SERVICE_SCHED";

    /// Parses `auto` or `fair`.
    pub fn parse(text: &str) -> Option<ServiceSched> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(ServiceSched::Auto),
            "fair" => Some(ServiceSched::Fair),
            _ => None,
        }
    }
}

/// The slice asked for by service threads: short enough to preempt a
/// compute thread at once, long enough to handle a batch of messages.
const SERVICE_SLICE: Duration = Duration::from_micros(100);

/// Asks for `SCHED_FIFO` at the lowest priority for the calling thread.
/// Returns whether the kernel took it (it refuses without the privilege).
fn prefer_realtime() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: `param` is a valid sched_param for the duration of the call;
    // pid 0 is the calling thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

/// `struct sched_attr` as the kernel reads it (first version, 48 bytes).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Asks the scheduler to give the calling thread `slice` (a latency hint
/// for a thread that mostly sleeps). A kernel that refuses it (older than
/// 6.12) leaves the thread as it was.
fn prefer_short_slice(slice: Duration) {
    // The call sets nice too: keep the thread's current one.
    let nice = current_nice();
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime: slice.as_nanos().min(u64::MAX as u128) as u64,
        deadline: 0,
        period: 0,
    };
    // SAFETY: `attr` is a valid, initialized sched_attr whose `size` field
    // says how many bytes the kernel may read; pid 0 is this thread.
    unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
}

/// The calling thread's scheduling policy (`SCHED_OTHER`, `SCHED_FIFO`...).
#[cfg(test)]
fn current_policy() -> i32 {
    // SAFETY: sched_getscheduler only reads the scheduler's state; pid 0 is
    // the calling thread.
    unsafe { libc::sched_getscheduler(0) }
}

/// The calling thread's nice value (Linux keeps one per thread).
fn current_nice() -> i32 {
    // SAFETY: getpriority only reads the scheduler's state; who = 0 is the
    // calling thread.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_spreads_ranks_over_the_usable_cpus_in_order() {
        let two = [0, 1];
        assert_eq!(CpuChoice::Auto.resolve(0, &two), Some(0));
        assert_eq!(CpuChoice::Auto.resolve(1, &two), Some(1));
        assert_eq!(CpuChoice::Auto.resolve(5, &two), Some(1));
        // A restricted affinity mask: the rank's CPU comes from it.
        assert_eq!(CpuChoice::Auto.resolve(3, &[4, 6]), Some(6));
        assert_eq!(CpuChoice::Auto.resolve(3, &[]), None);
        assert_eq!(CpuChoice::Unpinned.resolve(3, &two), None);
        assert_eq!(CpuChoice::Fixed(7).resolve(0, &two), Some(7));
    }

    #[test]
    fn parses_auto_none_and_numbers_only() {
        assert_eq!(CpuChoice::parse(" auto"), Some(CpuChoice::Auto));
        assert_eq!(CpuChoice::parse("none"), Some(CpuChoice::Unpinned));
        assert_eq!(CpuChoice::parse("3"), Some(CpuChoice::Fixed(3)));
        assert_eq!(CpuChoice::parse("-1"), None);
        assert_eq!(CpuChoice::parse("first"), None);
    }

    #[test]
    fn parses_the_service_policies() {
        assert_eq!(ServiceSched::parse("auto"), Some(ServiceSched::Auto));
        assert_eq!(ServiceSched::parse(" FAIR "), Some(ServiceSched::Fair));
        assert_eq!(ServiceSched::parse("fifo"), None);
    }

    #[test]
    fn a_fair_service_thread_keeps_the_fair_policy() {
        std::thread::spawn(|| {
            enter_service_thread(None, ServiceSched::Fair);
            assert_eq!(current_policy(), libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn asking_for_a_short_slice_never_fails_the_thread() {
        // Whether the kernel honours it depends on its version; the call
        // must leave the thread running either way, with its nice value.
        let before = current_nice();
        std::thread::spawn(move || {
            prefer_short_slice(SERVICE_SLICE);
            assert_eq!(before, current_nice());
        })
        .join()
        .unwrap();
    }
}
