//! Faults delivered as SIGBUS to the faulting thread (no DSM, no network):
//! the handler finds the space, tells reads from writes (a missing page
//! read or written, a store to a write-protected page), parks a thread
//! until an install of its page wakes it, and leaves a SIGBUS outside
//! every space fatal (or to the handler installed before, run with SIGBUS
//! blocked as without the DSM); a fault inside a fault's service ends the
//! process with a message.

// A test reports failure by panicking: unwrap is its assertion.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsm_core::fault::{Backing, FaultHandler, Region};
use dsm_core::{sigbus, FaultDelivery, PAGE_SIZE};

/// Free on x86-64 Linux processes in practice; `Region::map` refuses an
/// occupied range rather than replacing it. Each test has its own.
const BASE: usize = 0x2b00_0000_0000;

fn sigbus_space(base: usize, pages: usize) -> Option<(Region, Arc<FaultHandler>)> {
    let region = Region::map(base, pages * PAGE_SIZE, Backing::Anonymous).expect("mapping");
    match FaultHandler::register(&region, FaultDelivery::Sigbus) {
        Ok(faults) => Some((region, Arc::new(faults))),
        Err(e) => {
            eprintln!("no userfaultfd in SIGBUS mode here ({e}): skipped");
            None
        }
    }
}

#[test]
fn faults_reach_the_faulting_threads_server_with_their_kind() {
    let Some((region, faults)) = sigbus_space(BASE, 4) else {
        return;
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server: sigbus::Server = {
        let (faults, seen) = (Arc::clone(&faults), Arc::clone(&seen));
        Box::new(move |page, write| {
            seen.lock().unwrap().push((page, write));
            if page == 3 {
                // Installed read-only below: the store lifts the protection.
                faults.make_writable(page).expect("lifting the protection");
            } else {
                faults
                    .install(page, &[page as u8 + 1; PAGE_SIZE])
                    .expect("installing");
            }
        })
    };
    let _registered =
        sigbus::register(region.base(), region.len(), server).expect("registering the space");
    faults
        .install_readonly(3, &[9; PAGE_SIZE])
        .expect("installing page 3 read-only");
    let bytes = region.bytes();
    assert_eq!(bytes[PAGE_SIZE].load(Relaxed), 2, "read of missing page 1");
    bytes[2 * PAGE_SIZE + 7].store(0x55, Relaxed);
    assert_eq!(
        bytes[2 * PAGE_SIZE].load(Relaxed),
        3,
        "page 2's other bytes"
    );
    assert_eq!(
        bytes[3 * PAGE_SIZE].load(Relaxed),
        9,
        "read of read-only page 3"
    );
    bytes[3 * PAGE_SIZE + 1].store(0x66, Relaxed);
    assert_eq!(bytes[3 * PAGE_SIZE + 1].load(Relaxed), 0x66);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(1, false), (2, true), (3, true)],
        "(page, write) of each fault: a read, a store to a missing page, a store to a write-protected one"
    );
}

#[test]
fn a_parked_thread_is_woken_by_the_install_of_its_page() {
    parked_thread_sees_the_install(BASE + (1 << 30), Duration::ZERO);
}

#[test]
fn a_polling_thread_sees_the_install_of_its_page() {
    // Polls far beyond the test's run: it never reaches the futex.
    parked_thread_sees_the_install(BASE + (4 << 30), Duration::from_secs(600));
}

/// A thread faults on page 1 and waits for it (polling up to `spin`
/// first); only the install of page 1 can end its wait.
fn parked_thread_sees_the_install(base: usize, spin: Duration) {
    let Some((region, faults)) = sigbus_space(base, 2) else {
        return;
    };
    let (fault_seen, faulted) = mpsc::channel();
    let server: sigbus::Server = {
        let faults = Arc::clone(&faults);
        let fault_seen = Mutex::new(fault_seen);
        Box::new(move |page, _write| {
            let waiters = faults.waiters().expect("SIGBUS delivery has waiters");
            let ticket = waiters.prepare(page, spin);
            let _ = fault_seen.lock().unwrap().send(page);
            // Far beyond the test's run: only the install ends this wait.
            let woken = waiters.wait(ticket, spin, Duration::from_secs(600), |spin, done| {
                dsm_core::sched::poll_until(spin, done);
            });
            assert!(woken, "the wait ended without an install");
        })
    };
    let _registered =
        sigbus::register(region.base(), region.len(), server).expect("registering the space");
    let reader = {
        let base = region.base();
        std::thread::spawn(move || {
            // SAFETY: page 1 of the registered region, live until joined.
            unsafe { std::ptr::read_volatile((base + PAGE_SIZE) as *const u64) }
        })
    };
    let page = faulted
        .recv_timeout(Duration::from_secs(60))
        .expect("the reader's fault reached the server");
    assert_eq!(page, 1);
    faults.install(1, &[7; PAGE_SIZE]).expect("installing");
    assert_eq!(reader.join().expect("reader"), 0x0707_0707_0707_0707);
}

/// Set in the child process a test runs ([`run_child`]).
const CHILD: &str = "DSM_SIGBUS_TEST_CHILD";

#[test]
fn a_sigbus_outside_the_space_still_ends_the_process() {
    if std::env::var_os(CHILD).is_some() {
        let Some((region, _faults)) = sigbus_space(BASE + (2 << 30), 1) else {
            std::process::exit(3);
        };
        let _registered = sigbus::register(region.base(), region.len(), Box::new(|_, _| {}))
            .expect("registering the space");
        eprintln!("child: touching a page past the end of an empty file");
        touch_past_the_end_of_a_file();
        std::process::exit(0);
    }
    let status = run_child("a_sigbus_outside_the_space_still_ends_the_process").status;
    use std::os::unix::process::ExitStatusExt;
    if status.code() == Some(3) {
        return; // no SIGBUS mode here: said by the child
    }
    assert_eq!(
        status.signal(),
        Some(libc::SIGBUS),
        "the child should die of SIGBUS, got {status:?}"
    );
}

/// Runs this test binary again as a child running only `test` (with
/// [`CHILD`] set) and returns how it ended.
fn run_child(test: &str) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--nocapture"])
        .env(CHILD, "1")
        .output()
        .expect("running the child")
}

#[test]
fn a_fault_inside_a_faults_service_ends_the_process_with_a_message() {
    if std::env::var_os(CHILD).is_some() {
        let Some((region, _faults)) = sigbus_space(BASE + (3 << 30), 2) else {
            std::process::exit(3);
        };
        let base = region.base();
        // A server that touches the space's other missing page: a bug the
        // handler must not serve (nor hang on).
        let server: sigbus::Server = Box::new(move |_, _| {
            // SAFETY: page 1 of the live region; its fault is the point.
            let _ = unsafe { std::ptr::read_volatile((base + PAGE_SIZE) as *const u8) };
        });
        let _registered =
            sigbus::register(region.base(), region.len(), server).expect("registering the space");
        // SAFETY: page 0 of the live region, missing: served by the server.
        let _ = unsafe { std::ptr::read_volatile(base as *const u8) };
        std::process::exit(0);
    }
    let out = run_child("a_fault_inside_a_faults_service_ends_the_process_with_a_message");
    use std::os::unix::process::ExitStatusExt;
    if out.status.code() == Some(3) {
        return; // no SIGBUS mode here: said by the child
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{stderr}");
    assert!(
        stderr.contains("dsm: SIGBUS while this thread served a page fault of the shared space"),
        "{stderr}"
    );
}

/// What the program's own SIGBUS handler saw: 10 if SIGBUS was blocked
/// while it ran, 11 if not.
extern "C" fn program_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: pthread_sigmask and _exit are async-signal-safe; the sets
    // live across the calls.
    unsafe {
        let mut now: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut now);
        let blocked = libc::sigismember(&now, libc::SIGBUS) == 1;
        libc::_exit(if blocked { 10 } else { 11 });
    }
}

#[test]
fn a_sigbus_outside_the_space_reaches_the_programs_handler_with_sigbus_blocked() {
    if std::env::var_os(CHILD).is_some() {
        // SAFETY: zeroed sigaction is valid; installs a handler that only
        // makes async-signal-safe calls, before the DSM chains to it.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = program_handler as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            assert_eq!(
                libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()),
                0
            );
        }
        let Some((region, _faults)) = sigbus_space(BASE + (4 << 30), 1) else {
            std::process::exit(3);
        };
        let _registered = sigbus::register(region.base(), region.len(), Box::new(|_, _| {}))
            .expect("registering the space");
        touch_past_the_end_of_a_file();
        std::process::exit(0);
    }
    let out =
        run_child("a_sigbus_outside_the_space_reaches_the_programs_handler_with_sigbus_blocked");
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(3) => {} // no SIGBUS mode here: said by the child
        code => assert_eq!(
            code,
            Some(10),
            "10: SIGBUS blocked in the program's handler\n{stderr}"
        ),
    }
}

/// Reads a page of a mapping past the end of an empty file: a real SIGBUS,
/// outside every space.
fn touch_past_the_end_of_a_file() {
    let file = tempfile_in_target();
    let map = unsafe_map_empty_file(&file);
    // SAFETY: the mapping is live; reading it raises SIGBUS, which the
    // caller expects to end the process.
    let _ = unsafe { std::ptr::read_volatile(map as *const u8) };
}

fn tempfile_in_target() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("dsm-sigbus-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("creating an empty file");
    let _ = std::fs::remove_file(&path);
    file
}

fn unsafe_map_empty_file(file: &std::fs::File) -> usize {
    use std::os::fd::AsRawFd;
    // SAFETY: a new shared mapping of one page of our own file at an
    // address the kernel picks.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE_SIZE,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap");
    addr as usize
}

#[test]
fn a_thread_that_blocks_sigbus_is_refused_with_the_cause() {
    let Some((region, _faults)) = sigbus_space(BASE + (3 << 30), 1) else {
        return;
    };
    let refused = std::thread::spawn(move || {
        let mut only_sigbus = nix::sys::signal::SigSet::empty();
        only_sigbus.add(nix::sys::signal::Signal::SIGBUS);
        only_sigbus.thread_block().expect("blocking SIGBUS");
        sigbus::register(region.base(), region.len(), Box::new(|_, _| {})).err()
    })
    .join()
    .expect("thread");
    let why = refused.expect("registering from a thread that blocks SIGBUS is refused");
    assert!(
        why.to_string().contains("SIGBUS is blocked")
            && why.to_string().contains("DSM_FAULTS=thread"),
        "{why}"
    );
}
