//! Faults served in the faulting thread (`DSM_FAULTS=sigbus`).
//!
//! With `UFFD_FEATURE_SIGBUS` the kernel queues no fault event: the thread
//! that touches a missing (or write-protected) page of the space gets a
//! SIGBUS instead. The process-wide handler installed here finds the shared
//! space the address belongs to and calls its server in that thread, which
//! runs the engine's fault path (the request leaves at once, or a page this
//! rank is home of is installed at once), then sleeps on a futex until a page
//! of the same bucket is installed, and returns: the access is retried, and
//! faults again if its page is still not there. No thread hand-off on the way
//! out, none at all for a page resolved locally.
//!
//! * [`Waiters`]: the futex words installs bump (one per bucket of pages),
//!   so threads parked in the handler wake when their page may be there.
//! * [`register`]: one entry per shared space in a fixed table (several
//!   spaces live in one process in the benchmarks), removed when the
//!   [`Registration`] is dropped, after every handler using it has left.
//!
//! A SIGBUS outside every registered space (or sent by a process) goes to
//! the handler that was installed before (Rust's stack-overflow reporter),
//! or ends the process as the default action would. The engine code the
//! handler runs must never touch the shared space's missing pages (it only
//! touches pages it holds), as with the fault thread.
//!
//! The handler is installed with `SA_NODEFER`: the thread's signal mask is
//! then the same in the handler as outside it, so neither the delivery nor
//! the return changes it, and a fault takes the process's signal lock twice
//! (the kernel's raise and delivery) instead of four times; with many
//! threads faulting at once that lock is what they queue on (bench
//! `concurrent_faults_mechanism`). SIGBUS is therefore not blocked while a
//! thread serves a fault: a fault raised meanwhile in that thread (by the
//! fault path, or by a program's signal handler that interrupted it) is
//! caught by a per-thread flag and ends the process with a message, as the
//! kernel ended it when it found SIGBUS blocked; a previous handler a
//! SIGBUS is passed on to runs with SIGBUS blocked, as before.

use std::cell::Cell;
use std::sync::atomic::{
    AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst,
};
use std::sync::OnceLock;
use std::time::Duration;

use crate::config::PAGE_SIZE;

/// Buckets of pages sharing a futex word: an install wakes only the threads
/// waiting on pages of its bucket.
const BUCKETS: usize = 64;

/// The futex words installs bump, and how many threads wait on each.
pub struct Waiters {
    epoch: [AtomicU32; BUCKETS],
    waiting: [AtomicU32; BUCKETS],
    /// Threads waiting for their page now, and up to how many of them a
    /// waiter polls (a quarter of the CPUs, at least one). Polling pays
    /// when one thread waits: its page is a round trip away and a sleep
    /// would add a wake-up to it. With more waiting, faults are in flight
    /// together and the CPUs are better spent bringing their pages: a
    /// polling waiter takes a CPU the receive and engine threads need
    /// (8 threads faulting at once on 2 CPUs: 0.80x the fault rate of one
    /// while one of them polled), so it stops polling once more threads
    /// wait (bench `concurrent_faults`).
    waiting_now: AtomicUsize,
    polling_limit: usize,
    /// The recent waits for a page that an install ended, in nanoseconds
    /// (a moving average; 0: none yet), for [`PagePoll::Adaptive`].
    typical_wait_ns: AtomicU64,
}

/// How long a faulting thread polls for its page before it sleeps
/// (`DSM_WAIT_SPIN_US`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagePoll {
    /// This long (`DSM_WAIT_SPIN_US` set; zero: it sleeps at once).
    Fixed(Duration),
    /// Twice as long as pages have recently taken to come, at least
    /// `floor` and at most [`MOST_PAGE_POLL`] (`auto`, where the ranks of
    /// this host have a CPU each): about a round trip on this machine and
    /// network, so a page that comes as fast as usual finds its thread
    /// awake, whether a round trip takes 10 µs (shared memory) or 1 ms
    /// (the soft-RoCE VM), where a sleeping thread's wake-up costs about as
    /// much again.
    Adaptive {
        /// The shortest poll: `DSM_WAIT_SPIN_US`'s `auto` value.
        floor: Duration,
    },
}

/// The longest poll [`PagePoll::Adaptive`] takes.
pub const MOST_PAGE_POLL: Duration = Duration::from_millis(2);

/// What a thread about to wait for a page has seen: its bucket's epoch
/// before it asked for the page; and whether it polls before it sleeps.
#[must_use]
pub struct WaitTicket {
    bucket: usize,
    epoch: u32,
    polls: bool,
}

impl WaitTicket {
    /// True when the wait polls for up to its spin before it sleeps (the
    /// waiter may then read its answer itself).
    pub fn polls(&self) -> bool {
        self.polls
    }
}

impl Default for Waiters {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Waiters {
            epoch: std::array::from_fn(|_| AtomicU32::new(0)),
            waiting: std::array::from_fn(|_| AtomicU32::new(0)),
            waiting_now: AtomicUsize::new(0),
            polling_limit: (cpus / 4).max(1),
            typical_wait_ns: AtomicU64::new(0),
        }
    }
}

impl Waiters {
    /// How long a thread about to wait for a page polls first, as `poll`
    /// says.
    pub fn poll_for(&self, poll: PagePoll) -> Duration {
        match poll {
            PagePoll::Fixed(spin) => spin,
            PagePoll::Adaptive { floor } => {
                let typical = Duration::from_nanos(self.typical_wait_ns.load(Relaxed));
                typical
                    .saturating_mul(2)
                    .clamp(floor, MOST_PAGE_POLL.max(floor))
            }
        }
    }

    /// A wait for a page that an install ended took `waited`, request
    /// included: counted in the moving average (weight 1/8) that
    /// [`PagePoll::Adaptive`] follows. Two threads recording at once may
    /// lose one sample, which an average can spare.
    pub fn waited(&self, waited: Duration) {
        let sample = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        let old = self.typical_wait_ns.load(Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.typical_wait_ns.store(new, Relaxed);
    }

    /// Called before the fault is served: any install of the page's bucket
    /// from now on ends the wait. The thread counts as waiting from here:
    /// only so many threads poll at once (`polling_limit`), the others
    /// sleep at once; polling is decided here, before the request leaves.
    pub fn prepare(&self, page: usize, spin: Duration) -> WaitTicket {
        let bucket = page % BUCKETS;
        let others = self.waiting_now.fetch_add(1, SeqCst);
        WaitTicket {
            bucket,
            epoch: self.epoch[bucket].load(SeqCst),
            polls: !spin.is_zero() && others < self.polling_limit,
        }
    }

    /// Sleeps until a page of the ticket's bucket was installed since the
    /// ticket was taken (at once if one was), or `timeout` passed; says
    /// whether one was (false: the time ran out). A ticket that polls first
    /// polls for up to `spin` (`DSM_WAIT_SPIN_US`) with `poll(spin, done)`
    /// (the waiter may receive its page itself meanwhile): an install seen
    /// then costs neither side a futex call nor a wake-up. The waiter
    /// counts itself before it looks at the epoch, and an install bumps the
    /// epoch before it looks at the count (both sequentially consistent):
    /// either the waiter sees the new epoch or the install sees the waiter.
    /// A fault served at once (its page installed by the fault path
    /// itself) costs no futex call.
    pub fn wait(
        &self,
        ticket: WaitTicket,
        spin: Duration,
        timeout: Duration,
        poll: impl FnOnce(Duration, &dyn Fn() -> bool),
    ) -> bool {
        let word = &self.epoch[ticket.bucket];
        if ticket.polls {
            poll(spin, &|| {
                word.load(SeqCst) != ticket.epoch
                    || self.waiting_now.load(SeqCst) > self.polling_limit
            });
        }
        self.waiting[ticket.bucket].fetch_add(1, SeqCst);
        if word.load(SeqCst) == ticket.epoch {
            let limit = libc::timespec {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_nsec: timeout.subsec_nanos() as libc::c_long,
            };
            // SAFETY: FUTEX_WAIT reads the live atomic word and sleeps while
            // it still holds `ticket.epoch`; `limit` lives across the call.
            // Any result (woken, changed, timed out, interrupted) ends the
            // wait: the caller retries the access either way.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    word.as_ptr(),
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    ticket.epoch,
                    &limit as *const libc::timespec,
                )
            };
        }
        self.waiting[ticket.bucket].fetch_sub(1, SeqCst);
        self.waiting_now.fetch_sub(1, SeqCst);
        word.load(SeqCst) != ticket.epoch
    }

    /// `count` consecutive pages from `first` were installed: each bucket
    /// they fall in is woken once.
    pub fn woken_run(&self, first: usize, count: usize) {
        for page in first..first + count.min(BUCKETS) {
            self.woken(page);
        }
    }

    /// `page` was installed (or made writable, or found present): wakes the
    /// threads waiting on its bucket.
    pub fn woken(&self, page: usize) {
        let bucket = page % BUCKETS;
        self.epoch[bucket].fetch_add(1, SeqCst);
        if self.waiting[bucket].load(SeqCst) > 0 {
            // SAFETY: FUTEX_WAKE on a live atomic word wakes its sleepers; it
            // reads nothing else.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.epoch[bucket].as_ptr(),
                    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                    i32::MAX,
                )
            };
        }
    }
}

/// Serves one fault of a space in the faulting thread: `(page, write)`.
pub type Server = Box<dyn Fn(usize, bool) + Send + Sync>;

/// One registered space; `start == end == 0` when the slot is free.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    /// Handlers currently using `server`.
    users: AtomicUsize,
    server: AtomicPtr<Server>,
}

/// Most shared spaces registered at once in one process.
const SLOTS: usize = 64;

static TABLE: [Slot; SLOTS] = [const {
    Slot {
        start: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
        users: AtomicUsize::new(0),
        server: AtomicPtr::new(std::ptr::null_mut()),
    }
}; SLOTS];

/// The SIGBUS action found when the handler was installed.
static PREVIOUS: OnceLock<Result<libc::sigaction, nix::errno::Errno>> = OnceLock::new();

/// A space whose faults the SIGBUS handler serves until this is dropped.
pub struct Registration {
    slot: usize,
}

/// Why the SIGBUS handler cannot serve a space's faults ([`register`]).
#[derive(Debug, thiserror::Error)]
pub enum SigbusError {
    /// Not x86-64: the handler could not tell reads from writes.
    #[error("DSM_FAULTS=sigbus reads the fault's write bit from the x86-64 signal context; use DSM_FAULTS=thread on this architecture")]
    Architecture,
    /// The thread starting the DSM blocks SIGBUS.
    #[error("SIGBUS is blocked in the thread starting the DSM (and so in the threads it starts): the kernel would end the process at the first page fault; unblock SIGBUS, or use DSM_FAULTS=thread")]
    Blocked,
    /// `sigaction` refused the handler.
    #[error("installing the SIGBUS handler: {0}")]
    Install(nix::errno::Errno),
    /// Every slot of the table of spaces is taken.
    #[error("more than {SLOTS} shared spaces in one process")]
    TableFull,
}

/// Serves the SIGBUS faults of `[start, start + len)` with `server`,
/// installing the process's handler the first time.
pub fn register(start: usize, len: usize, server: Server) -> Result<Registration, SigbusError> {
    if !cfg!(target_arch = "x86_64") {
        return Err(SigbusError::Architecture);
    }
    if sigbus_blocked_here() {
        return Err(SigbusError::Blocked);
    }
    if let Err(errno) = PREVIOUS.get_or_init(install_handler) {
        return Err(SigbusError::Install(*errno));
    }
    let server = Box::into_raw(Box::new(server));
    for (i, slot) in TABLE.iter().enumerate() {
        if slot
            .server
            .compare_exchange(std::ptr::null_mut(), server, SeqCst, SeqCst)
            .is_ok()
        {
            slot.end.store(start + len, SeqCst);
            slot.start.store(start, SeqCst);
            return Ok(Registration { slot: i });
        }
    }
    // SAFETY: the pointer came from Box::into_raw above and was published
    // nowhere.
    drop(unsafe { Box::from_raw(server) });
    Err(SigbusError::TableFull)
}

impl Drop for Registration {
    fn drop(&mut self) {
        let slot = &TABLE[self.slot];
        slot.start.store(0, SeqCst);
        slot.end.store(0, SeqCst);
        // A handler that saw the range before it was cleared holds `users`:
        // it leaves within its bounded wait.
        while slot.users.load(SeqCst) > 0 {
            std::thread::yield_now();
        }
        let server = slot.server.swap(std::ptr::null_mut(), SeqCst);
        if !server.is_null() {
            // SAFETY: `register` made it with Box::into_raw, no handler uses
            // it any more (users is 0 and the range is cleared), and the swap
            // took it out of the table, so it is freed once.
            drop(unsafe { Box::from_raw(server) });
        }
    }
}

/// Whether the calling thread blocks SIGBUS (threads inherit the mask of
/// the thread that creates them).
fn sigbus_blocked_here() -> bool {
    nix::sys::signal::SigSet::thread_get_mask()
        .is_ok_and(|mask| mask.contains(nix::sys::signal::Signal::SIGBUS))
}

fn install_handler() -> Result<libc::sigaction, nix::errno::Errno> {
    // SAFETY: zeroed sigaction structs are valid (empty mask, no flags).
    let (mut action, mut previous): (libc::sigaction, libc::sigaction) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
    action.sa_sigaction = handler as usize;
    // No SA_ONSTACK: the engine's fault path runs on the thread's own stack,
    // not on the small alternate stack Rust sets up for overflow reports.
    // SA_NODEFER: see the module's notes (the mask unchanged spares the
    // signal lock; `SERVING` stands in for the blocked SIGBUS).
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_NODEFER;
    // SAFETY: installs `on_sigbus` for SIGBUS and stores the previous action
    // in a live struct.
    if unsafe { libc::sigaction(libc::SIGBUS, &action, &mut previous) } != 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(previous)
}

/// Whether the fault that raised the signal was a write (x86-64: bit 1 of
/// the page-fault error code the kernel saves in the signal context).
fn fault_was_write(context: *mut libc::c_void) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: for a SA_SIGINFO handler the third argument is the
        // interrupted thread's ucontext_t.
        let context = unsafe { &*(context as *const libc::ucontext_t) };
        context.uc_mcontext.gregs[libc::REG_ERR as usize] & 2 != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // `register` refuses this mode elsewhere.
        let _ = context;
        true
    }
}

thread_local! {
    /// Set while this thread serves a fault of a space: SIGBUS is not
    /// blocked there (`SA_NODEFER`), so a nested one is told apart by this
    /// flag.
    static SERVING: Cell<bool> = const { Cell::new(false) };
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    // Sent by a process (kill, tgkill, sigqueue: si_code <= 0), not raised
    // by an access: no fault to serve.
    if code <= 0 {
        not_ours(signal, info, context);
        return;
    }
    if SERVING.with(Cell::get) {
        nested_fault();
        return;
    }
    for slot in &TABLE {
        if addr < slot.start.load(SeqCst) || addr >= slot.end.load(SeqCst) {
            continue;
        }
        slot.users.fetch_add(1, SeqCst);
        let start = slot.start.load(SeqCst);
        if addr >= start && addr < slot.end.load(SeqCst) {
            let server = slot.server.load(SeqCst);
            // SAFETY: a slot whose range is set holds a live server, and
            // `users` keeps `Registration::drop` from freeing it meanwhile.
            if let Some(server) = unsafe { server.as_ref() } {
                SERVING.with(|serving| serving.set(true));
                server((addr - start) / PAGE_SIZE, fault_was_write(context));
                SERVING.with(|serving| serving.set(false));
            }
        }
        slot.users.fetch_sub(1, SeqCst);
        return;
    }
    not_ours(signal, info, context);
}

/// A fault raised while this thread was serving one: its fault path, or a
/// signal handler of the program that interrupted it, touched memory it
/// must not (a missing page of the space, a truncated file). A SIGBUS
/// blocked in the handler made the kernel end the process; this says why
/// and ends it the same way, at once.
fn nested_fault() {
    const MESSAGE: &[u8] = b"dsm: SIGBUS while this thread served a page fault of the shared space \
(the fault path, or a signal handler that interrupted it, touched memory it must not): ending the process\n";
    // SAFETY: write(2), signal() and raise() are async-signal-safe; MESSAGE
    // is a static buffer of the given length. SIGBUS is not blocked here
    // (SA_NODEFER), so the raise with the default action ends the process.
    unsafe {
        libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        libc::raise(libc::SIGBUS);
    }
}

/// A SIGBUS of no shared space: the previous handler's, run as it would
/// have been without the DSM (SIGBUS and its own mask blocked: ours are
/// not, `SA_NODEFER`; a handler that leaves by `siglongjmp` restores the
/// mask it saved), or the default action (the retried access raises it
/// again, now fatal).
fn not_ours(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    if let Some(Ok(previous)) = PREVIOUS.get() {
        let handler = previous.sa_sigaction;
        if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
            let mut blocked = previous.sa_mask;
            // SAFETY: an uninitialised sigset_t is written by
            // pthread_sigmask before use.
            let mut before: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: sigaddset and pthread_sigmask (async-signal-safe) on
            // sets that live across the calls.
            unsafe {
                if previous.sa_flags & libc::SA_NODEFER == 0 {
                    libc::sigaddset(&mut blocked, libc::SIGBUS);
                }
                libc::pthread_sigmask(libc::SIG_BLOCK, &blocked, &mut before);
            }
            if previous.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: a SA_SIGINFO action's handler has this signature;
                // it was installed for SIGBUS and gets the kernel's own
                // arguments.
                let chained: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(handler) };
                chained(signal, info, context);
            } else {
                // SAFETY: as above, for a plain handler.
                let chained: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
                chained(signal);
            }
            // SAFETY: puts back the mask found above (async-signal-safe).
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut()) };
            return;
        }
    }
    // SAFETY: signal() is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

#[cfg(test)]
mod tests {
    use super::{PagePoll, Waiters, MOST_PAGE_POLL};
    use std::time::Duration;

    #[test]
    fn an_adaptive_poll_follows_twice_the_recent_waits_within_its_bounds() {
        let w = Waiters::default();
        let floor = Duration::from_micros(60);
        let adaptive = PagePoll::Adaptive { floor };
        assert_eq!(w.poll_for(adaptive), floor, "no wait seen yet");
        w.waited(Duration::from_micros(500));
        assert_eq!(w.poll_for(adaptive), Duration::from_micros(1000));
        for _ in 0..100 {
            w.waited(Duration::from_micros(10));
        }
        assert_eq!(w.poll_for(adaptive), floor, "fast pages: the floor");
        for _ in 0..100 {
            w.waited(Duration::from_millis(50));
        }
        assert_eq!(w.poll_for(adaptive), MOST_PAGE_POLL, "capped");
        let fixed = Duration::from_micros(7);
        assert_eq!(w.poll_for(PagePoll::Fixed(fixed)), fixed, "a set value");
    }
}
