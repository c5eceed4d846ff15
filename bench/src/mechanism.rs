//! The kernel's fault mechanisms alone, without the DSM: a private mapping,
//! a signal handler installed for a while, and a region whose missing
//! faults the faulting thread serves itself (SIGBUS from a userfaultfd,
//! one `UFFDIO_COPY` of 4 KiB). `local_fault` times one such fault;
//! `concurrent_faults` measures how their rate grows with threads on this
//! machine: the limit a DSM whose faults never wait can reach.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering::SeqCst};

use dsm_core::PAGE_SIZE;
use nix::sys::mman::{madvise, mmap_anonymous, mprotect, munmap, MapFlags, MmapAdvise, ProtFlags};
use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};

/// An anonymous private mapping, unmapped on drop.
pub struct Mapping {
    addr: NonNull<c_void>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; threads only
// reach it through raw addresses, and it outlives every thread using it.
unsafe impl Send for Mapping {}
// SAFETY: as above; no Rust references into it are handed out.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// A new mapping of `len` bytes with protection `prot`.
    pub fn new(len: usize, prot: ProtFlags) -> Mapping {
        let size = std::num::NonZeroUsize::new(len).expect("non-empty mapping");
        // SAFETY: a new anonymous mapping at an address the kernel picks:
        // it cannot alias anything.
        let addr =
            unsafe { mmap_anonymous(None, size, prot, MapFlags::MAP_PRIVATE) }.expect("mmap");
        Mapping { addr, len }
    }

    /// A shared mapping of `len` bytes of `fd` from its start, readable
    /// and writable.
    pub fn shared(fd: BorrowedFd<'_>, len: usize) -> std::io::Result<Mapping> {
        let size = std::num::NonZeroUsize::new(len).ok_or(std::io::ErrorKind::InvalidInput)?;
        // SAFETY: a new shared mapping of the caller's file at an address
        // the kernel picks: it aliases only other mappings of that file.
        let addr = unsafe {
            nix::sys::mman::mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }?;
        Ok(Mapping { addr, len })
    }

    /// Its first byte's address.
    pub fn start(&self) -> usize {
        self.addr.as_ptr() as usize
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never: a mapping is not empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its first byte, as a pointer.
    pub fn as_ptr(&self) -> *mut c_void {
        self.addr.as_ptr()
    }

    /// Loads the first word of page `i` (faulting if it is absent).
    pub fn load(&self, i: usize) -> u64 {
        assert!(
            (i + 1) * PAGE_SIZE <= self.len,
            "page {i} out of the mapping"
        );
        let p = (self.start() + i * PAGE_SIZE) as *const u64;
        // SAFETY: page i lies inside the mapping (checked); whatever handler
        // serves its fault makes it readable before the load completes.
        unsafe { ptr::read_volatile(p) }
    }

    /// Drops every page's contents: the next access faults again.
    pub fn discard(&self) {
        // SAFETY: MADV_DONTNEED on our own private anonymous mapping, which
        // no Rust reference points into.
        unsafe { madvise(self.addr, self.len, MmapAdvise::MADV_DONTNEED) }.expect("madvise");
    }

    /// Sets the protection of the whole mapping.
    pub fn protect(&self, prot: ProtFlags) {
        // SAFETY: changes the protection of our own mapping, which no Rust
        // reference points into.
        unsafe { mprotect(self.addr, self.len, prot) }.expect("mprotect");
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and no thread uses it any more.
        let _ = unsafe { munmap(self.addr, self.len) };
    }
}

/// A SA_SIGINFO signal handler.
pub type SignalHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void);

/// Runs `body` with `handler` installed for `signal` (`SA_SIGINFO` and
/// `flags`), then puts back the handler found before (Rust's own, or the
/// DSM's).
pub fn with_signal_handler<T>(
    signal: libc::c_int,
    handler: SignalHandler,
    flags: libc::c_int,
    body: impl FnOnce() -> T,
) -> T {
    // SAFETY: zeroed sigaction structs are valid (empty mask, no flags).
    let (mut action, mut previous): (libc::sigaction, libc::sigaction) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    action.sa_sigaction = handler as usize;
    action.sa_flags = libc::SA_SIGINFO | flags;
    // SAFETY: the bench's handlers only use async-signal-safe calls on the
    // region their caller set up before; the previous action is restored
    // below.
    let rc = unsafe { libc::sigaction(signal, &action, &mut previous) };
    assert_eq!(rc, 0, "sigaction");
    let out = body();
    // SAFETY: puts back the action found above.
    unsafe { libc::sigaction(signal, &previous, ptr::null_mut()) };
    out
}

/// The byte every page of a [`SigbusCopy`] region holds once faulted in.
pub const SIGBUS_FILL: u8 = 5;

/// The userfaultfd and region the SIGBUS handler serves (-1 / 0 when none).
static SIGBUS_UFFD: AtomicI32 = AtomicI32::new(-1);
static SIGBUS_START: AtomicUsize = AtomicUsize::new(0);
static SIGBUS_END: AtomicUsize = AtomicUsize::new(0);
/// The 4 KiB the handler copies into each page.
static SIGBUS_SOURCE: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (start, end) = (SIGBUS_START.load(SeqCst), SIGBUS_END.load(SeqCst));
    if addr < start || addr >= end {
        // Not ours: the default action ends the process on the retried access.
        // SAFETY: signal() is async-signal-safe.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        return;
    }
    let mut copy = userfaultfd_sys::uffdio_copy {
        dst: (addr & !(PAGE_SIZE - 1)) as u64,
        src: SIGBUS_SOURCE.load(SeqCst) as u64,
        len: PAGE_SIZE as u64,
        // Nobody sleeps on the page in SIGBUS mode: no wake-up to do.
        mode: userfaultfd_sys::UFFDIO_COPY_MODE_DONTWAKE,
        copy: 0,
    };
    // SAFETY: UFFDIO_COPY (an ioctl: async-signal-safe) fills the missing
    // page of the registered region that faulted from a 4 KiB source that
    // lives until the handler is removed; `copy` lives across the call. A
    // failure leaves the page missing, and the retried access faults again.
    unsafe {
        libc::ioctl(
            SIGBUS_UFFD.load(SeqCst),
            userfaultfd_sys::UFFDIO_COPY as _,
            &mut copy,
        )
    };
}

/// A region of `pages` pages registered with a userfaultfd in SIGBUS mode:
/// while [`SigbusCopy::serve`] runs, a missing page faults in the thread
/// that touched it, whose SIGBUS handler installs it with one
/// `UFFDIO_COPY` of 4 KiB ([`SIGBUS_FILL`] bytes). No thread hand-off and
/// no change of the mapping's protection: the fewest steps a fault that
/// brings a page's bytes can take. One at a time per process (the handler
/// is process-wide).
pub struct SigbusCopy {
    uffd: Uffd,
    region: Mapping,
    source: Vec<u8>,
}

impl SigbusCopy {
    /// The region, or why this kernel cannot make it.
    pub fn new(pages: usize) -> Result<SigbusCopy, String> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .user_mode_only(true)
            .require_features(FeatureFlags::SIGBUS)
            .create()
            .map_err(|e| format!("no userfaultfd in SIGBUS mode ({e})"))?;
        let region = Mapping::new(
            pages * PAGE_SIZE,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
        );
        uffd.register_with_mode(region.as_ptr(), region.len(), RegisterMode::MISSING)
            .map_err(|e| format!("UFFDIO_REGISTER: {e}"))?;
        Ok(SigbusCopy {
            uffd,
            region,
            source: vec![SIGBUS_FILL; PAGE_SIZE],
        })
    }

    /// Runs `body` on the region with its faults served by the SIGBUS
    /// handler ([`Mapping::discard`] makes its pages missing again).
    pub fn serve<T>(&self, body: impl FnOnce(&Mapping) -> T) -> T {
        SIGBUS_SOURCE.store(self.source.as_ptr() as usize, SeqCst);
        SIGBUS_UFFD.store(self.uffd.as_raw_fd(), SeqCst);
        SIGBUS_START.store(self.region.start(), SeqCst);
        SIGBUS_END.store(self.region.start() + self.region.len(), SeqCst);
        // SA_NODEFER, as the DSM's handler: the signal mask left as it is
        // spares two of the four takes of the process's signal lock.
        let out = with_signal_handler(libc::SIGBUS, on_sigbus, libc::SA_NODEFER, || {
            body(&self.region)
        });
        SIGBUS_START.store(0, SeqCst);
        SIGBUS_END.store(0, SeqCst);
        SIGBUS_UFFD.store(-1, SeqCst);
        out
    }
}
