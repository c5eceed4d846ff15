//! A local page fault with no network, three ways, measured in the same run:
//!
//! * `local_fault/sigsegv_mprotect_4KiB`: the seed's mechanism. The region
//!   is `PROT_NONE`; the SIGSEGV handler makes the faulting page readable
//!   and writable with `mprotect` and copies 4 KiB into it (the seed copies
//!   the page it fetched), all in the faulting thread.
//! * `local_fault/uffd_copy_4KiB` and `.../uffd_copy_4KiB_same_cpu`: a
//!   missing fault on a userfaultfd-registered region, resolved by a handler
//!   thread blocked in `read()` on the userfaultfd with one `UFFDIO_COPY`
//!   of 4 KiB (which wakes the faulting thread). First unpinned, then with
//!   the faulting thread and the handler pinned to the same CPU.
//! * `local_fault/uffd_sigbus_copy_4KiB`: the fault resolved in the
//!   faulting thread, as the seed does, but with userfaultfd: the uffd is
//!   created with `UFFD_FEATURE_SIGBUS`, so a missing fault raises SIGBUS in
//!   the faulting thread instead of queueing an event, and the SIGBUS
//!   handler installs the page with one `UFFDIO_COPY` of 4 KiB. No thread
//!   hand-off and no change of the mapping's protection.
//! * `local_fault/uffd_continue_4KiB_same_cpu`: the zero-copy alternative
//!   for pages that arrive in registered memory: a memfd mapped twice, the
//!   bytes already written through the second mapping (as a one-sided RDMA
//!   WRITE into a landing arena would place them), and a minor fault on the
//!   registered mapping resolved with `UFFDIO_CONTINUE` (no copy). Its ratio
//!   to `uffd_copy_4KiB_same_cpu` says which install is cheaper.
//! * `local_fault/dsm_1_rank_read_fault` and `..._same_cpu`: the same
//!   through the DSM with a single rank (fault reader thread -> engine ->
//!   the rank's own directory -> install), the application thread unpinned,
//!   then pinned to the engine's CPU. The page was never written, so the
//!   install is a zero page. `..._sigbus`: the same with the fault served
//!   by the faulting thread's SIGBUS handler (`DSM_FAULTS=sigbus`), no
//!   thread hand-off at all, unpinned. These three take one fault per page
//!   (`DSM_POPULATE=0`): a first touch would otherwise map the pages after
//!   the faulting one with it (below).
//! * `local_fault/dsm_1_rank_first_touch_per_page` and
//!   `..._one_fault_per_page`: a one-rank DSM allocates a 64 MiB segment
//!   homed at itself (`Placement::Localized(0)`), and the time to store one
//!   word to each of its pages, in order, is divided by its 16384 pages (a
//!   rank initializing its own rows). The first with the default
//!   `DSM_POPULATE` (each fault maps 64 never-touched pages at once,
//!   `Mrsw::populate_ahead`), the second with `DSM_POPULATE=0`, one fault
//!   and one install per page as before; the segment is freed (untimed)
//!   after each pass. SIGBUS delivery (the default), unpinned.
//!
//! Every other timed figure is one load from a page not yet present. Making
//! the pages absent again is not timed: `MADV_DONTNEED` (+ `PROT_NONE` for
//! the SIGSEGV region), or a new one-rank DSM once all its pages were read.

use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use dsm_bench::mechanism::{with_signal_handler, Mapping, SigbusCopy};
use dsm_bench::{config, print_figures, print_ratio, transports, Samples, WORDS_PER_PAGE};
use dsm_core::segment::Placement;
use dsm_core::{Config, Dsm, FaultDelivery, PAGE_SIZE};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::sys::mman::ProtFlags;
use nix::unistd::Pid;
use userfaultfd::{Event, RegisterMode, Uffd, UffdBuilder};

/// Pages touched before the region is reset (16 MiB).
const PAGES: usize = 4096;
/// Pages of the one-rank DSM's space (64 MiB) before it is started anew.
const DSM_PAGES: usize = 16384;

// ---- the seed's mechanism: SIGSEGV + mprotect ----

/// The region the SIGSEGV handler serves (0, 0 when none).
static SEGV_START: AtomicUsize = AtomicUsize::new(0);
static SEGV_END: AtomicUsize = AtomicUsize::new(0);
/// The 4 KiB the handler copies into each page.
static SEGV_SOURCE: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_segv(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (start, end) = (SEGV_START.load(SeqCst), SEGV_END.load(SeqCst));
    if addr < start || addr >= end {
        // Not ours: restore the default action; returning re-executes the
        // access, which then ends the process as it would have.
        // SAFETY: signal() is async-signal-safe.
        unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
        return;
    }
    let page = addr & !(PAGE_SIZE - 1);
    // SAFETY: `page` is a page of the bench's PROT_NONE region (checked
    // above), which only the bench thread touches; mprotect is
    // async-signal-safe; the source buffer is 4 KiB that lives until the
    // handler is removed, and does not overlap the region.
    unsafe {
        libc::mprotect(
            page as *mut libc::c_void,
            PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
        );
        ptr::copy_nonoverlapping(
            SEGV_SOURCE.load(SeqCst) as *const u8,
            page as *mut u8,
            PAGE_SIZE,
        );
    }
}

/// Times first loads of the pages of `region`, each faulting once and
/// resolved by whatever serves the region's faults; every PAGES pages
/// `reset` makes them absent again (untimed).
fn time_loads(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    out: &Samples,
    region: &Mapping,
    reset: impl Fn(&Mapping),
) {
    let mut next = 0;
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if next == PAGES {
                    reset(region);
                    next = 0;
                }
                let (d, v) = out.time(|| region.load(next));
                assert_eq!(v, 0x0505_0505_0505_0505);
                next += 1;
                total += d;
            }
            total
        })
    });
}

fn sigsegv_mprotect(g: &mut BenchmarkGroup<'_, WallTime>, out: &Samples) {
    let source = vec![5u8; PAGE_SIZE];
    let region = Mapping::new(PAGES * PAGE_SIZE, ProtFlags::PROT_NONE);
    SEGV_SOURCE.store(source.as_ptr() as usize, SeqCst);
    SEGV_START.store(region.start(), SeqCst);
    SEGV_END.store(region.start() + region.len(), SeqCst);
    with_signal_handler(libc::SIGSEGV, on_segv, 0, || {
        time_loads(g, "sigsegv_mprotect_4KiB", out, &region, |r| {
            r.discard();
            r.protect(ProtFlags::PROT_NONE);
        })
    });
    SEGV_START.store(0, SeqCst);
    SEGV_END.store(0, SeqCst);
    drop(region);
    drop(source);
}

// ---- userfaultfd: missing fault, UFFDIO_COPY by a handler thread ----

fn current_affinity() -> CpuSet {
    sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity")
}

fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).expect("CPU number");
    sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// Serves the faults of `uffd` on a thread (pinned to `cpu` if given): each
/// faulting page is resolved by `resolve` (false: it was already there, so
/// its waiters are woken); the fault on `stop_page` ends the thread.
fn spawn_handler(
    uffd: Arc<Uffd>,
    cpu: Option<usize>,
    stop_page: usize,
    resolve: impl Fn(&Uffd, usize) -> bool + Send + 'static,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        if let Some(cpu) = cpu {
            pin(cpu);
        }
        loop {
            let addr = match uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => addr,
                Ok(_) => continue,
                Err(e) => {
                    eprintln!("local_fault: reading the userfaultfd: {e}");
                    return;
                }
            };
            let page = addr as usize & !(PAGE_SIZE - 1);
            if !resolve(&uffd, page) {
                // EEXIST: another fault on the same page was served first.
                let _ = uffd.wake(page as *mut libc::c_void, PAGE_SIZE);
            }
            if page == stop_page {
                return;
            }
        }
    })
}

/// Times first loads of the pages of `region` (the current thread pinned to
/// `cpu` if given), each resolved by `handler`; every PAGES pages the region
/// is emptied again (untimed); the last page, loaded at the end, stops the
/// handler.
fn time_first_loads(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    cpu: Option<usize>,
    out: &Samples,
    region: &Mapping,
    handler: thread::JoinHandle<()>,
) {
    let saved = current_affinity();
    if let Some(cpu) = cpu {
        pin(cpu);
    }
    // Discarding unmaps the pages (a memfd keeps them: the next access is
    // a minor fault again).
    time_loads(g, name, out, region, Mapping::discard);
    sched_setaffinity(Pid::from_raw(0), &saved).expect("sched_setaffinity");
    region.load(PAGES);
    handler.join().expect("uffd handler");
}

/// A userfaultfd for a benchmark, or `None` (said, and the benchmark
/// skipped) where this process may not create one.
fn new_uffd(name: &str) -> Option<Arc<Uffd>> {
    match UffdBuilder::new()
        .close_on_exec(true)
        .user_mode_only(true)
        .create()
    {
        Ok(u) => Some(Arc::new(u)),
        Err(e) => {
            eprintln!("local_fault: no userfaultfd ({e}); {name} skipped");
            None
        }
    }
}

fn uffd_copy(g: &mut BenchmarkGroup<'_, WallTime>, name: &str, cpu: Option<usize>, out: &Samples) {
    let Some(uffd) = new_uffd(name) else {
        return;
    };
    // PAGES pages, then one page whose fault tells the handler to stop.
    let region = Mapping::new(
        (PAGES + 1) * PAGE_SIZE,
        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
    );
    uffd.register_with_mode(region.as_ptr(), region.len(), RegisterMode::MISSING)
        .expect("UFFDIO_REGISTER");
    let stop_page = region.start() + PAGES * PAGE_SIZE;
    let source = vec![5u8; PAGE_SIZE];
    let handler = spawn_handler(Arc::clone(&uffd), cpu, stop_page, move |uffd, page| {
        // SAFETY: `page` is a page of the registered region (only its faults
        // reach this uffd), absent since it faulted; the source is 4 KiB of
        // our own.
        unsafe {
            uffd.copy(
                source.as_ptr().cast(),
                page as *mut libc::c_void,
                PAGE_SIZE,
                true,
            )
        }
        .is_ok()
    });
    time_first_loads(g, name, cpu, out, &region, handler);
}

// ---- userfaultfd in SIGBUS mode: UFFDIO_COPY in the faulting thread ----

fn uffd_sigbus_copy(g: &mut BenchmarkGroup<'_, WallTime>, name: &str, out: &Samples) {
    let mechanism = match SigbusCopy::new(PAGES) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("local_fault: {e}; {name} skipped");
            return;
        }
    };
    mechanism.serve(|region| time_loads(g, name, out, region, Mapping::discard));
}

// ---- userfaultfd: minor fault on a memfd, UFFDIO_CONTINUE ----

/// A memfd mapped twice (shared): `view` is registered for minor faults,
/// `alias` is where page bytes are written (as an RDMA WRITE into a
/// registered landing arena would place them). Unmapped and closed on drop.
struct TwiceMapped {
    view: Mapping,
    alias: Mapping,
    _fd: std::os::fd::OwnedFd,
}

impl TwiceMapped {
    fn new(len: usize) -> std::io::Result<TwiceMapped> {
        use std::os::fd::{AsFd, FromRawFd, OwnedFd};
        // SAFETY: memfd_create takes a NUL-terminated name and flags and
        // returns a new descriptor (checked), which we then own.
        let fd = unsafe { libc::memfd_create(c"dsm-bench".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        nix::unistd::ftruncate(fd.as_fd(), len as i64)?;
        let map = || Mapping::shared(fd.as_fd(), len);
        let (view, alias) = (map()?, map()?);
        Ok(TwiceMapped {
            view,
            alias,
            _fd: fd,
        })
    }
}

fn uffd_continue(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    cpu: Option<usize>,
    out: &Samples,
) {
    let Some(uffd) = new_uffd(name) else {
        return;
    };
    let memory = match TwiceMapped::new((PAGES + 1) * PAGE_SIZE) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("local_fault: no memfd ({e}); {name} skipped");
            return;
        }
    };
    // The bytes are in place before any fault (written through the alias,
    // so they sit in the page cache): the fault only maps them.
    for i in 0..=PAGES {
        let p = (memory.alias.start() + i * PAGE_SIZE) as *mut u8;
        // SAFETY: page i of the alias mapping, which nothing else references.
        unsafe { ptr::write_bytes(p, 5, PAGE_SIZE) };
    }
    if let Err(e) =
        uffd.register_with_mode(memory.view.as_ptr(), memory.view.len(), RegisterMode::MINOR)
    {
        eprintln!("local_fault: no minor faults on shmem ({e}); {name} skipped");
        return;
    }
    let stop_page = memory.view.start() + PAGES * PAGE_SIZE;
    let handler = spawn_handler(Arc::clone(&uffd), cpu, stop_page, |uffd, page| {
        uffd.r#continue(page as *mut libc::c_void, PAGE_SIZE, true)
            .is_ok()
    });
    time_first_loads(g, name, cpu, out, &memory.view, handler);
}

// ---- the DSM with one rank ----

fn dsm_one_rank(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    (same_cpu, faults): (bool, FaultDelivery),
    out: &Samples,
) {
    let start = || {
        let t = transports(1).pop().expect("one transport");
        // One fault per page: no read-ahead and no first touch mapping the
        // pages after the faulting one (a sequential walk would otherwise
        // find most pages already there).
        let config = Config {
            prefetch: 0,
            populate: 0,
            faults,
            ..config(0, DSM_PAGES)
        };
        let space = Dsm::prepare(&config).expect("mapping the space (userfaultfd)");
        Dsm::start(space, t, vec!["localhost".into()], config).expect("starting the DSM")
    };
    let saved = current_affinity();
    if same_cpu {
        // The engine of rank 0 runs on CPU 0 (`rank mod CPUs`).
        pin(0);
    }
    let mut dsm = Some(start());
    let mut next = 0;
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if next == DSM_PAGES {
                    if let Some(old) = dsm.take() {
                        old.finalize().expect("finalize");
                    }
                    dsm = Some(start());
                    next = 0;
                }
                let words = dsm.as_ref().expect("a DSM").words();
                let w = &words[next * WORDS_PER_PAGE];
                let (d, v) = out.time(|| w.load(Relaxed));
                assert_eq!(v, 0);
                next += 1;
                total += d;
            }
            total
        })
    });
    if let Some(d) = dsm.take() {
        d.finalize().expect("finalize");
    }
    sched_setaffinity(Pid::from_raw(0), &saved).expect("sched_setaffinity");
}

/// Pages of the segment the first-touch figures write (64 MiB).
const FIRST_TOUCH_PAGES: usize = 16384;

/// A one-rank DSM stores one word to each page of a fresh segment homed at
/// itself; `out` gets each pass's time per page. `populate`: most pages a
/// first touch maps (`DSM_POPULATE`).
fn dsm_first_touch(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    populate: usize,
    out: &Samples,
) {
    let t = transports(1).pop().expect("one transport");
    // The heap, where segments go, is the upper half of the space.
    let config = Config {
        populate,
        ..config(0, 4 * FIRST_TOUCH_PAGES)
    };
    let space = Dsm::prepare(&config).expect("mapping the space (userfaultfd)");
    let dsm = Dsm::start(space, t, vec!["localhost".into()], config).expect("starting the DSM");
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let segment = dsm
                    .alloc(FIRST_TOUCH_PAGES * PAGE_SIZE, Placement::Localized(0))
                    .expect("alloc");
                let words = dsm.segment_words(&segment);
                let start = Instant::now();
                for page in 0..FIRST_TOUCH_PAGES {
                    words[page * WORDS_PER_PAGE].store(1, Relaxed);
                }
                let took = start.elapsed();
                out.push(took / FIRST_TOUCH_PAGES as u32);
                total += took;
                dsm.free(segment).expect("free");
            }
            total
        })
    });
    dsm.finalize().expect("finalize");
}

fn local_fault(c: &mut Criterion) {
    let suite = "local_fault";
    let [segv, uffd, uffd_pinned, cont_pinned, dsm, dsm_pinned, sigbus, dsm_sigbus, touch, touch_each] =
        std::array::from_fn(|_| Samples::default());
    let mut g = c.benchmark_group(suite);
    sigsegv_mprotect(&mut g, &segv);
    uffd_copy(&mut g, "uffd_copy_4KiB", None, &uffd);
    uffd_copy(&mut g, "uffd_copy_4KiB_same_cpu", Some(0), &uffd_pinned);
    uffd_continue(&mut g, "uffd_continue_4KiB_same_cpu", Some(0), &cont_pinned);
    uffd_sigbus_copy(&mut g, "uffd_sigbus_copy_4KiB", &sigbus);
    let (events, sigbus_mode) = (FaultDelivery::Events, FaultDelivery::Sigbus);
    dsm_one_rank(&mut g, "dsm_1_rank_read_fault", (false, events), &dsm);
    let name = "dsm_1_rank_read_fault_same_cpu";
    dsm_one_rank(&mut g, name, (true, events), &dsm_pinned);
    let name = "dsm_1_rank_read_fault_sigbus";
    dsm_one_rank(&mut g, name, (false, sigbus_mode), &dsm_sigbus);
    let populate = Config::default().populate;
    dsm_first_touch(&mut g, "dsm_1_rank_first_touch_per_page", populate, &touch);
    let name = "dsm_1_rank_first_touch_one_fault_per_page";
    dsm_first_touch(&mut g, name, 0, &touch_each);
    g.finish();
    let rows = [
        ("sigsegv_mprotect_4KiB", &segv),
        ("uffd_copy_4KiB", &uffd),
        ("uffd_copy_4KiB_same_cpu", &uffd_pinned),
        ("uffd_continue_4KiB_same_cpu", &cont_pinned),
        ("dsm_1_rank_read_fault", &dsm),
        ("dsm_1_rank_read_fault_same_cpu", &dsm_pinned),
        ("uffd_sigbus_copy_4KiB", &sigbus),
        ("dsm_1_rank_read_fault_sigbus", &dsm_sigbus),
    ];
    print_figures(suite, &rows);
    for row in &rows[1..] {
        print_ratio(suite, *row, rows[0]);
    }
    // How a page that arrived in a landing buffer is best installed.
    print_ratio(suite, rows[3], rows[2]);
    // A first touch of a rank's own pages, per page: populating ahead
    // against one fault per page.
    let touch_rows = [
        ("dsm_1_rank_first_touch_per_page", &touch),
        ("dsm_1_rank_first_touch_one_fault_per_page", &touch_each),
    ];
    print_figures(suite, &touch_rows);
    print_ratio(suite, touch_rows[0], touch_rows[1]);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = local_fault
}
criterion_main!(benches);
