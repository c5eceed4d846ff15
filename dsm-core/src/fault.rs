//! The shared mapping and its userfaultfd: the only place that touches the
//! kernel's memory interfaces. Everything `unsafe` about pages lives here.
//!
//! * [`Region`]: the shared space, mapped at its fixed address with
//!   `MAP_FIXED_NOREPLACE` (never over an existing mapping), with
//!   transparent huge pages off (pages move one by one). Its memory is
//!   either private anonymous memory ([`Backing::Anonymous`]) or a memfd
//!   mapped twice ([`Backing::Memfd`]): the shared space, and an alias no
//!   fault is ever reported on, where page bytes are written before the
//!   page is mapped (and where a one-sided transport can land them).
//! * [`FaultHandler`]: a userfaultfd registered for missing and
//!   write-protect faults on the region (and minor faults with a memfd);
//!   installs pages (UFFDIO_COPY, or a write to the alias and
//!   UFFDIO_CONTINUE), takes them away (write-protect, copy out,
//!   `MADV_DONTNEED`), wakes waiting threads, and reads fault events.
//!   With [`FaultDelivery::Sigbus`] the kernel raises SIGBUS in the faulting
//!   thread instead of queueing events (`crate::sigbus`), and every install
//!   also wakes the threads parked in that handler.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicU8};
use std::sync::{Arc, Mutex};

use userfaultfd::{Event, FaultKind, FeatureFlags, ReadWrite, RegisterMode, Uffd, UffdBuilder};

pub use crate::config::FaultDelivery;
use crate::config::{DEFAULT_RETAINED_PAGES, PAGE_SIZE};
use crate::pages::PageSet;
use crate::sigbus::{SigbusError, Waiters};
use crate::transport::Landing;
use smallvec::SmallVec;

/// A failure of the shared mapping or its userfaultfd. The messages name
/// the setting or kernel feature to check.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// Something is already mapped where the shared space must go.
    #[error("the shared space {start:#x}-{end:#x} overlaps an existing mapping{what}; move it with DSM_BASE (e.g. DSM_BASE=0x{suggest:x})")]
    RangeTaken {
        /// Address of the space's first byte.
        start: usize,
        /// Address one past its last byte.
        end: usize,
        /// The mapping found there, from /proc/self/maps (`" (range name)"`,
        /// or empty if none was found).
        what: String,
        /// A base to try instead: the first 1 GiB boundary after `end`.
        suggest: usize,
    },
    /// `mmap` of the space, or of its memfd alias, failed.
    #[error("cannot map the shared space {start:#x}-{end:#x} ({size} bytes): {errno}; {hint}")]
    MapFailed {
        /// Requested address of the first byte (0 for the alias: anywhere).
        start: usize,
        /// Address one past the last byte (the length, for the alias).
        end: usize,
        /// Length in bytes.
        size: usize,
        /// What `mmap` returned.
        errno: nix::errno::Errno,
        /// What to check (`DSM_BASE`, `DSM_SPACE_SIZE`, `ulimit -v`).
        hint: &'static str,
    },
    /// The kernel denies this user a userfaultfd (EPERM).
    #[error("userfaultfd is not permitted for this user ({detail}): allow it with `sysctl vm.unprivileged_userfaultfd=1`, or give read-write access to /dev/userfaultfd (e.g. `setfacl -m u:$USER:rw /dev/userfaultfd`), or run as root")]
    UffdForbidden {
        /// How opening one failed (device, system call).
        detail: String,
    },
    /// The kernel has no userfaultfd (ENOSYS).
    #[error("this kernel has no userfaultfd (ENOSYS): dsm needs Linux >= 5.7 built with CONFIG_USERFAULTFD")]
    UffdMissing,
    /// Setting up the userfaultfd failed otherwise; the text says why.
    #[error("userfaultfd setup failed: {0}")]
    Uffd(String),
    /// SIGBUS delivery (`DSM_FAULTS=sigbus`) cannot be set up
    /// ([`crate::sigbus::register`]).
    #[error("userfaultfd setup failed: {0}")]
    Sigbus(#[from] SigbusError),
    /// Registering the anonymous space for missing and write-protect
    /// faults failed (typically a kernel older than 5.7); the text is the
    /// cause.
    #[error("registering the shared space with userfaultfd (missing + write-protect) failed: {0}; dsm needs Linux >= 5.7 (write-protect on anonymous memory)")]
    Register(String),
    /// A userfaultfd operation on mapped pages (copy, write-protect,
    /// unprotect, wake) failed.
    #[error("installing page at {addr:#x} failed: {detail}")]
    Install {
        /// Address of the first page concerned.
        addr: usize,
        /// The operation and the error it got.
        detail: String,
    },
    /// A memfd-backed space (`DSM_BACKING=memfd`) cannot be set up on this
    /// kernel; the text says which step failed.
    #[error("a memfd-backed shared space (DSM_BACKING=memfd) is not available here: {0}; use DSM_BACKING=anon (or auto)")]
    MemfdUnsupported(String),
    /// A raw page ioctl or `madvise` failed.
    #[error("{op} on page at {addr:#x} failed: {errno}")]
    PageOp {
        /// The operation (`"UFFDIO_CONTINUE"`, `"MADV_DONTNEED"`, ...).
        op: &'static str,
        /// Address of the first page concerned.
        addr: usize,
        /// What the system call returned.
        errno: nix::errno::Errno,
    },
}

/// What the shared space's pages are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory; pages installed with UFFDIO_COPY.
    Anonymous,
    /// A memfd mapped at the space and again at an alias; pages are
    /// written through the alias and mapped with UFFDIO_CONTINUE.
    Memfd,
}

/// `UFFDIO_CONTINUE_MODE_WP` (Linux 6.4+): map the page write-protected.
const CONTINUE_MODE_WP: u64 = 1 << 1;

/// The shared space's virtual memory.
#[derive(Debug)]
pub struct Region {
    base: usize,
    len: usize,
    /// With a memfd: the second mapping of the same pages.
    alias: Option<Arc<Alias>>,
}

/// The second mapping of a memfd-backed space, and the memfd. Shared by the
/// region, its fault handler and the landings made in it, and unmapped when
/// the last of them is gone: a receive thread still landing bytes in it
/// never writes to memory unmapped under it.
#[derive(Debug)]
struct Alias {
    addr: usize,
    len: usize,
    memfd: OwnedFd,
}

impl Drop for Alias {
    fn drop(&mut self) {
        if let Some(ptr) = std::ptr::NonNull::new(self.addr as *mut std::ffi::c_void) {
            // SAFETY: this mapping is ours alone; every holder of a pointer
            // into it holds this `Alias`.
            let _ = unsafe { nix::sys::mman::munmap(ptr, self.len) };
        }
    }
}

/// Describes whatever already lives in `[start, end)`, from /proc/self/maps.
fn occupant(start: usize, end: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let Some(range) = fields.next() else { continue };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        if a < end && b > start {
            let name = fields.nth(4).unwrap_or("[anonymous]");
            return format!(" ({a:#x}-{b:#x} {name})");
        }
    }
    String::new()
}

impl Region {
    /// Maps `len` bytes at exactly `base`, failing if anything is there.
    pub fn map(base: usize, len: usize, backing: Backing) -> Result<Region, FaultError> {
        use nix::sys::mman::{MapFlags, ProtFlags};
        let end = base.saturating_add(len);
        let Some(length) = std::num::NonZeroUsize::new(len) else {
            return Err(FaultError::MapFailed {
                start: base,
                end,
                size: len,
                errno: nix::errno::Errno::EINVAL,
                hint: "the size must be at least one page",
            });
        };
        let memfd = match backing {
            Backing::Anonymous => None,
            Backing::Memfd => Some(sized_memfd(len)?),
        };
        let mapped = match &memfd {
            None => {
                let flags = MapFlags::MAP_PRIVATE
                    | MapFlags::MAP_ANONYMOUS
                    | MapFlags::MAP_NORESERVE
                    | MapFlags::MAP_FIXED_NOREPLACE;
                // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing
                // mapping, so no memory the program uses can be affected; the
                // result is checked.
                unsafe {
                    nix::sys::mman::mmap_anonymous(
                        std::num::NonZeroUsize::new(base),
                        length,
                        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                        flags,
                    )
                }
            }
            Some(fd) => {
                let flags = MapFlags::MAP_SHARED | MapFlags::MAP_FIXED_NOREPLACE;
                // SAFETY: as above, over our own memfd of `len` bytes.
                unsafe {
                    nix::sys::mman::mmap(
                        std::num::NonZeroUsize::new(base),
                        length,
                        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                        flags,
                        fd,
                        0,
                    )
                }
            }
        };
        let ptr = match mapped {
            Ok(p) => p.as_ptr() as usize,
            Err(nix::errno::Errno::EEXIST) => {
                return Err(FaultError::RangeTaken {
                    start: base,
                    end,
                    what: occupant(base, end),
                    suggest: (end + (1 << 30)) & !((1 << 30) - 1),
                })
            }
            Err(errno) => {
                let hint = match errno {
                    nix::errno::Errno::ENOMEM => "the size is larger than this machine or its address-space limits allow (check DSM_SPACE_SIZE and `ulimit -v`)",
                    nix::errno::Errno::EINVAL => "the address or size is not valid here (check DSM_BASE and DSM_SPACE_SIZE)",
                    _ => "check DSM_BASE and DSM_SPACE_SIZE",
                };
                return Err(FaultError::MapFailed {
                    start: base,
                    end,
                    size: len,
                    errno,
                    hint,
                });
            }
        };
        let mut region = Region {
            base: ptr,
            len,
            alias: None,
        };
        if ptr != base {
            // A kernel without MAP_FIXED_NOREPLACE treats the address as a hint.
            drop(region);
            return Err(FaultError::RangeTaken {
                start: base,
                end,
                what: occupant(base, end),
                suggest: (end + (1 << 30)) & !((1 << 30) - 1),
            });
        }
        if let Some(fd) = memfd {
            let alias = map_shared_anywhere(&fd, len).map_err(|errno| FaultError::MapFailed {
                start: 0,
                end: len,
                size: len,
                errno,
                hint: "mapping the memfd's second view failed (address space limits? check `ulimit -v`)",
            })?;
            region.alias = Some(Arc::new(Alias {
                addr: alias,
                len,
                memfd: fd,
            }));
        }
        // Pages move one by one: a transparent huge page would make a 4 KiB
        // transfer drop 2 MiB. Failure only costs performance.
        // SAFETY: the range is the mapping created above.
        let _ = unsafe {
            nix::sys::mman::madvise(
                std::ptr::NonNull::new_unchecked(base as *mut _),
                len,
                nix::sys::mman::MmapAdvise::MADV_NOHUGEPAGE,
            )
        };
        Ok(region)
    }

    /// Address of the space's first byte (the same on every rank).
    pub fn base(&self) -> usize {
        self.base
    }

    /// What the space's pages are made of: a memfd if it has an alias.
    pub fn backing(&self) -> Backing {
        if self.alias.is_some() {
            Backing::Memfd
        } else {
            Backing::Anonymous
        }
    }

    /// With a memfd: the memfd itself (co-located ranks read pages from it,
    /// `crate::board`).
    pub fn memfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.alias.as_ref().map(|a| a.memfd.as_fd())
    }

    /// With a memfd: the address of the alias mapping (same length as the
    /// space), where page bytes are written before they are mapped. A
    /// transport may register it to land pages there.
    pub fn alias(&self) -> Option<usize> {
        self.alias.as_ref().map(|alias| alias.addr)
    }

    /// Length of the space in bytes (whole pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the space has no bytes (never, once mapped).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pages of the space.
    pub fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }

    /// Address of the first byte of `page` (not checked against the length).
    pub fn page_addr(&self, page: usize) -> usize {
        self.base + page * PAGE_SIZE
    }

    /// The whole region as 64-bit atomics, for safe shared access.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the region is mapped, page-aligned, readable and writable
        // for as long as `self` lives (the borrow ties the slice to it); the
        // fault engine makes every access succeed; atomics permit shared
        // mutation from any thread.
        unsafe { std::slice::from_raw_parts(self.base as *const AtomicU64, self.len / 8) }
    }

    /// The whole region as bytes (atomics, for safe shared access).
    pub fn bytes(&self) -> &[AtomicU8] {
        // SAFETY: as for `words`.
        unsafe { std::slice::from_raw_parts(self.base as *const AtomicU8, self.len) }
    }

    /// The page holding `addr`, if it is inside the region.
    pub fn page_of(&self, addr: usize) -> Option<usize> {
        (addr >= self.base && addr < self.base + self.len).then(|| (addr - self.base) / PAGE_SIZE)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let Some(ptr) = std::ptr::NonNull::new(self.base as *mut std::ffi::c_void) {
            // SAFETY: the region owns this mapping; references into it
            // borrow the owner (Dsm), so none outlive it. (The alias goes
            // with its last holder.)
            let _ = unsafe { nix::sys::mman::munmap(ptr, self.len) };
        }
    }
}

/// Maps `len` bytes of `fd` shared, readable and writable, where the kernel
/// picks (the alias of a memfd-backed space, a board of readable pages);
/// returns the address.
pub(crate) fn map_shared_anywhere(fd: &OwnedFd, len: usize) -> Result<usize, nix::errno::Errno> {
    use nix::sys::mman::{MapFlags, ProtFlags};
    let length = std::num::NonZeroUsize::new(len).ok_or(nix::errno::Errno::EINVAL)?;
    // SAFETY: a new shared mapping of a memfd at an address the kernel
    // picks: it cannot replace anything.
    let mapped = unsafe {
        nix::sys::mman::mmap(
            None,
            length,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd,
            0,
        )
    }?;
    Ok(mapped.as_ptr() as usize)
}

/// A co-located home's userfaultfd, duplicated into this process
/// (`pidfd_getfd`), through which a reader write-protects a page in the
/// home's mapping (`board`: a direct read of a page the home holds
/// writable). Its ioctls act on the home's address space.
pub(crate) struct PeerFaults {
    uffd: Uffd,
    /// Where the home maps its space.
    base: usize,
}

/// A process, by a pidfd (`PeerFaults::process`).
pub(crate) struct PeerProcess(OwnedFd);

impl PeerFaults {
    /// Process `pid`, held by a pidfd: whatever becomes of the pid, the
    /// pidfd names that process.
    pub(crate) fn process(pid: u32) -> Result<PeerProcess, nix::errno::Errno> {
        let pid = libc::pid_t::try_from(pid).map_err(|_| nix::errno::Errno::ESRCH)?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if pidfd < 0 {
            return Err(nix::errno::Errno::last());
        }
        // SAFETY: the system call just returned this descriptor; we own it.
        Ok(PeerProcess(unsafe { OwnedFd::from_raw_fd(pidfd as i32) }))
    }

    /// Takes descriptor `fd` of `process`, which must be a userfaultfd, for
    /// a space of `pages` pages mapped at `base` there.
    pub(crate) fn take(
        process: &PeerProcess,
        fd: i32,
        base: u64,
        pages: usize,
    ) -> Result<PeerFaults, nix::errno::Errno> {
        let base = usize::try_from(base).map_err(|_| nix::errno::Errno::EINVAL)?;
        let fits = pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| base.checked_add(len))
            .is_some();
        if base % PAGE_SIZE != 0 || !fits {
            return Err(nix::errno::Errno::EINVAL);
        }
        // SAFETY: pidfd_getfd takes a pidfd, a descriptor number in that
        // process and flags, and returns a new descriptor (close-on-exec)
        // or -1.
        let taken = unsafe { libc::syscall(libc::SYS_pidfd_getfd, process.0.as_raw_fd(), fd, 0) };
        if taken < 0 {
            return Err(nix::errno::Errno::last());
        }
        // SAFETY: as above: a new descriptor we own.
        let taken = unsafe { OwnedFd::from_raw_fd(taken as i32) };
        let link = std::fs::read_link(format!("/proc/self/fd/{}", taken.as_raw_fd()))
            .map_err(|_| nix::errno::Errno::EBADF)?;
        if link.as_os_str() != "anon_inode:[userfaultfd]" {
            return Err(nix::errno::Errno::EBADF);
        }
        // SAFETY: a userfaultfd we own (checked just above).
        let uffd = unsafe { Uffd::from_raw_fd(taken.into_raw_fd()) };
        Ok(PeerFaults { uffd, base })
    }

    /// Write-protects the home's mapping of `count` pages from `first` (its
    /// stores fault from now on; the TLBs are flushed when this returns).
    /// The pages are below the space's end (`take`).
    pub(crate) fn write_protect(
        &self,
        first: usize,
        count: usize,
    ) -> Result<(), userfaultfd::Error> {
        let addr = self.base + first * PAGE_SIZE;
        self.uffd.write_protect(addr as *mut _, count * PAGE_SIZE)
    }
}

/// A new memfd of `len` bytes (its pages exist once written).
fn sized_memfd(len: usize) -> Result<OwnedFd, FaultError> {
    let fd = nix::sys::memfd::memfd_create(c"dsm-space", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(|e| FaultError::MemfdUnsupported(format!("memfd_create: {e}")))?;
    nix::unistd::ftruncate(&fd, len as i64).map_err(|e| {
        FaultError::MemfdUnsupported(format!("sizing the memfd to {len} bytes: {e}"))
    })?;
    Ok(fd)
}

/// Whether this kernel supports everything a memfd-backed space needs:
/// missing, minor and write-protect faults on shared memory, and
/// UFFDIO_CONTINUE mapping a page write-protected (Linux 6.4+). Tried on
/// a scratch one-page mapping.
pub fn memfd_supported() -> Result<(), FaultError> {
    let region = Region::map_scratch()?;
    let handler = FaultHandler::register(&region, FaultDelivery::Events)?;
    // The page is not in the memfd yet: a kernel that knows the mode fails
    // with EFAULT, one that does not with EINVAL.
    let (rc, _) = handler.continue_pages(region.base, PAGE_SIZE, CONTINUE_MODE_WP);
    match (rc, nix::errno::Errno::last()) {
        (0, _) => Ok(()),
        (_, nix::errno::Errno::EINVAL) => Err(FaultError::MemfdUnsupported(
            "this kernel's UFFDIO_CONTINUE cannot map pages write-protected (needs Linux 6.4 or later)".into(),
        )),
        _ => Ok(()),
    }
}

impl Region {
    /// One memfd-backed page anywhere, for [`memfd_supported`].
    fn map_scratch() -> Result<Region, FaultError> {
        let fd = sized_memfd(PAGE_SIZE)?;
        let failed = |e| FaultError::MemfdUnsupported(format!("mapping a memfd: {e}"));
        let mut region = Region {
            base: map_shared_anywhere(&fd, PAGE_SIZE).map_err(failed)?,
            len: PAGE_SIZE,
            alias: None,
        };
        let alias = map_shared_anywhere(&fd, PAGE_SIZE).map_err(failed)?;
        region.alias = Some(Arc::new(Alias {
            addr: alias,
            len: PAGE_SIZE,
            memfd: fd,
        }));
        Ok(region)
    }
}

/// A page fault reported by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Page index in the shared space.
    pub page: usize,
    /// The access was a store (always so for a write-protect fault).
    pub write: bool,
    /// A store to a write-protected page (rather than an access to a missing one).
    pub write_protect: bool,
}

/// Whether an install found the page already present (a benign race).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// The page was mapped by this call.
    Fresh,
    /// The page was already mapped; the call only woke its waiters.
    AlreadyPresent,
}

/// The userfaultfd of a [`Region`]: installs, protects and drops its pages,
/// wakes the threads waiting on them, and reads fault events.
pub struct FaultHandler {
    uffd: Uffd,
    base: usize,
    len: usize,
    /// With a memfd: the alias where page bytes are written before mapping.
    alias: Option<usize>,
    /// The mapping `alias` points into, kept alive by every landing in it.
    alias_mapping: Option<Arc<Alias>>,
    /// With SIGBUS delivery: the futex words of the threads waiting in the
    /// SIGBUS handler.
    waiters: Option<Waiters>,
    /// With a memfd: which pages have a frame in it.
    frames: Option<Mutex<Frames>>,
    /// Anonymous memory: [`ZERO_RUN_PAGES`] pages of zeros, the source of
    /// `install_zero_run`'s copies (allocated on first use, never written:
    /// its pages stay the kernel's zero page).
    zeros: std::sync::OnceLock<Box<[u8]>>,
}

/// Most pages of zeros one `UFFDIO_COPY` of `install_zero_run` maps with
/// anonymous memory (256 KiB, [`crate::config::DEFAULT_POPULATE`]).
pub const ZERO_RUN_PAGES: usize = crate::config::DEFAULT_POPULATE;

/// The frames of a memfd-backed space. A page dropped keeps its frame: when
/// it is fetched again, its bytes are written over it through the alias
/// and `UFFDIO_CONTINUE` maps it (no allocation, no memory-cgroup charge),
/// which makes a stream over pages invalidated since their last read
/// faster (`bench/README.md`). A page with no frame is filled by
/// `UFFDIO_COPY`, which allocates the frame with its bytes in one step (a
/// write through the alias would first fault in and zero a new frame). Past
/// `limit` dropped frames, all of them are released (`MADV_REMOVE` on the
/// alias), so a rank holds at most its mapped pages plus `limit` frames, as
/// with anonymous memory plus a bounded cache.
struct Frames {
    /// Pages whose frame is in the memfd: installed since their last release.
    held: PageSet,
    /// Of those, the pages dropped (not mapped in the space).
    dropped: PageSet,
    dropped_count: usize,
    limit: usize,
}

/// Pages `start..start + count` of a run to install, which all have a
/// frame in the memfd (`framed`) or none.
struct Segment {
    start: usize,
    count: usize,
    framed: bool,
}

/// Pages of the alias a transport receives bytes into
/// ([`FaultHandler::landing`]).
struct AliasLanding {
    /// Kept mapped while bytes may land in it.
    mapping: Arc<Alias>,
    offset: usize,
    len: usize,
    notice: Vec<u8>,
}

impl Landing for AliasLanding {
    fn bytes(&mut self) -> &mut [u8] {
        debug_assert!(self.offset + self.len <= self.mapping.len);
        // SAFETY: pages of the alias, which `mapping` keeps mapped. The
        // caller of `FaultHandler::landing` knew that the space does not map
        // them and nothing else writes them until the notice is handled, so
        // this is the only reference to them (unique, as `&mut self` is).
        unsafe {
            std::slice::from_raw_parts_mut((self.mapping.addr + self.offset) as *mut u8, self.len)
        }
    }

    fn landed(self: Box<Self>) -> Vec<u8> {
        self.notice
    }
}

fn create_uffd(delivery: FaultDelivery) -> Result<Uffd, FaultError> {
    let sigbus = delivery == FaultDelivery::Sigbus;
    let mut builder = UffdBuilder::new();
    builder
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(true);
    if sigbus {
        builder.require_features(FeatureFlags::SIGBUS);
    }
    match builder.create() {
        Ok(uffd) => Ok(uffd),
        // UFFDIO_API refuses a feature the kernel lacks with EINVAL.
        Err(userfaultfd::Error::SystemError(errno)) if sigbus && errno as i32 == libc::EINVAL => Err(FaultError::Uffd(
            "this kernel's userfaultfd has no SIGBUS mode (Linux >= 4.14): use DSM_FAULTS=thread"
                .into(),
        )),
        // The crate does not fall back to the system call when the device
        // exists but is not accessible: do it here.
        Err(userfaultfd::Error::OpenDevUserfaultfd(e)) => {
            uffd_by_syscall(sigbus).map_err(|errno| match errno {
                nix::errno::Errno::EPERM => FaultError::UffdForbidden {
                    detail: format!("/dev/userfaultfd: {e}; userfaultfd(2): EPERM"),
                },
                nix::errno::Errno::ENOSYS => FaultError::UffdMissing,
                other => {
                    FaultError::Uffd(format!("/dev/userfaultfd: {e}; userfaultfd(2): {other}"))
                }
            })
        }
        Err(userfaultfd::Error::SystemError(errno)) if errno as i32 == libc::EPERM => {
            Err(FaultError::UffdForbidden {
                detail: "userfaultfd(2): EPERM".into(),
            })
        }
        Err(userfaultfd::Error::SystemError(errno)) if errno as i32 == libc::ENOSYS => {
            Err(FaultError::UffdMissing)
        }
        Err(e) => Err(FaultError::Uffd(e.to_string())),
    }
}

fn uffd_by_syscall(sigbus: bool) -> Result<Uffd, nix::errno::Errno> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | userfaultfd_sys::UFFD_USER_MODE_ONLY as i32;
    // SAFETY: the userfaultfd system call takes flags only and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(nix::errno::Errno::last());
    }
    // SAFETY: the system call just returned this descriptor; we own it.
    let uffd = unsafe { Uffd::from_raw_fd(fd as i32) };
    let mut api = userfaultfd_sys::uffdio_api {
        api: userfaultfd_sys::UFFD_API,
        features: if sigbus {
            userfaultfd_sys::UFFD_FEATURE_SIGBUS
        } else {
            0
        },
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a pointer to a uffdio_api that lives across the call.
    let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), userfaultfd_sys::UFFDIO_API as _, &mut api) };
    if rc < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(uffd)
}

impl FaultHandler {
    /// Registers the whole region for missing and write-protect faults
    /// (and minor faults: a memfd page that exists but is not mapped),
    /// reported as events or as SIGBUS in the faulting thread.
    pub fn register(region: &Region, delivery: FaultDelivery) -> Result<FaultHandler, FaultError> {
        let uffd = create_uffd(delivery)?;
        let alias = region.alias();
        let mut mode = RegisterMode::MISSING | RegisterMode::WRITE_PROTECT;
        if alias.is_some() {
            mode |= RegisterMode::MINOR;
        }
        uffd.register_with_mode(region.base as *mut _, region.len, mode)
            .map_err(|e| {
                let detail = format!("{e} ({:?})", std::error::Error::source(&e));
                if alias.is_some() {
                    FaultError::MemfdUnsupported(format!(
                        "registering shared memory for missing, minor and write-protect faults: {detail}"
                    ))
                } else {
                    FaultError::Register(detail)
                }
            })?;
        Ok(FaultHandler {
            uffd,
            base: region.base,
            len: region.len,
            alias,
            alias_mapping: region.alias.clone(),
            waiters: (delivery == FaultDelivery::Sigbus).then(Waiters::default),
            frames: alias.map(|_| {
                Mutex::new(Frames {
                    held: PageSet::new(region.pages()),
                    dropped: PageSet::new(region.pages()),
                    dropped_count: 0,
                    limit: DEFAULT_RETAINED_PAGES,
                })
            }),
            zeros: std::sync::OnceLock::new(),
        })
    }

    /// With a memfd: keeps at most `pages` dropped pages' frames (0: every
    /// dropped page is released at once).
    pub fn retaining(self, pages: usize) -> FaultHandler {
        if let Some(frames) = &self.frames {
            lock_frames(frames).limit = pages;
        }
        self
    }

    /// Frames of dropped pages the memfd holds (0 without one).
    pub fn retained_pages(&self) -> usize {
        self.frames
            .as_ref()
            .map_or(0, |f| lock_frames(f).dropped_count)
    }

    /// Pages `first..first + count` are about to be installed: splits them
    /// into segments with and without a frame, and records that they all
    /// have one, in use.
    /// (A run mixes the two at most at its edges: no allocation per install.)
    fn claim_frames(
        &self,
        frames: &Mutex<Frames>,
        first: usize,
        count: usize,
    ) -> SmallVec<[Segment; 2]> {
        let mut frames = lock_frames(frames);
        let mut segments: SmallVec<[Segment; 2]> = SmallVec::new();
        for page in first..first + count {
            let framed = frames.held.contains(page);
            match segments.last_mut() {
                Some(segment) if segment.framed == framed => segment.count += 1,
                _ => segments.push(Segment {
                    start: page,
                    count: 1,
                    framed,
                }),
            }
            frames.held.insert(page);
            if frames.dropped.remove(page) {
                frames.dropped_count -= 1;
            }
        }
        segments
    }

    /// Pages `first..first + count` were dropped: their frames stay in the
    /// memfd, up to the limit; past it, every dropped frame is released.
    fn retain(&self, first: usize, count: usize) -> Result<(), FaultError> {
        let (Some(frames), Some(alias)) = (&self.frames, self.alias) else {
            return Ok(());
        };
        let mut frames = lock_frames(frames);
        for page in first..first + count {
            if frames.held.contains(page) && frames.dropped.insert(page) {
                frames.dropped_count += 1;
            }
        }
        if frames.dropped_count <= frames.limit {
            return Ok(());
        }
        Self::release(&mut frames, alias)
    }

    /// Gives the frames of every dropped page back to the kernel now (an
    /// eviction: the cache's bound is about memory, so its frames must go).
    pub fn release_dropped_frames(&self) -> Result<(), FaultError> {
        let (Some(frames), Some(alias)) = (&self.frames, self.alias) else {
            return Ok(());
        };
        let mut frames = lock_frames(frames);
        if frames.dropped_count == 0 {
            return Ok(());
        }
        Self::release(&mut frames, alias)
    }

    /// Releases every dropped page's frame (`MADV_REMOVE` on the alias).
    fn release(frames: &mut Frames, alias: usize) -> Result<(), FaultError> {
        frames.dropped_count = 0;
        for run in frames.dropped.take_runs() {
            let addr = alias + run.start * PAGE_SIZE;
            // SAFETY: the range is pages of the alias mapping of our memfd,
            // none of them mapped in the space (dropped, not installed since:
            // callers hold the engine's state, which orders drops and
            // installs); removing them frees their frames, and the next
            // install writes the page's bytes into a new one.
            unsafe {
                nix::sys::mman::madvise(
                    std::ptr::NonNull::new_unchecked(addr as *mut _),
                    run.len() * PAGE_SIZE,
                    nix::sys::mman::MmapAdvise::MADV_REMOVE,
                )
            }
            .map_err(|errno| FaultError::PageOp {
                op: "MADV_REMOVE",
                addr,
                errno,
            })?;
            for page in run {
                frames.held.remove(page);
            }
        }
        Ok(())
    }

    /// The SIGBUS handler's futex words (SIGBUS delivery only).
    pub fn waiters(&self) -> Option<&Waiters> {
        self.waiters.as_ref()
    }

    /// Threads parked in the SIGBUS handler for `page` may go on (nothing
    /// to do with event delivery: the kernel's install wakes them).
    fn woken(&self, page: usize) {
        if let Some(waiters) = &self.waiters {
            waiters.woken(page);
        }
    }

    /// Runs a page-installing ioctl (`ioctl` returns its result) until it is
    /// done: EAGAIN and EINTR are retried; EEXIST means the page is already
    /// there (a stale fault), so the waiters are woken.
    fn run_install(
        &self,
        page: usize,
        op: &'static str,
        mut ioctl: impl FnMut() -> libc::c_int,
    ) -> Result<Installed, FaultError> {
        loop {
            if ioctl() == 0 {
                return Ok(Installed::Fresh);
            }
            match nix::errno::Errno::last() {
                nix::errno::Errno::EEXIST => {
                    self.wake(page)?;
                    return Ok(Installed::AlreadyPresent);
                }
                nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR => continue,
                errno => {
                    return Err(FaultError::PageOp {
                        op,
                        addr: self.addr(page),
                        errno,
                    })
                }
            }
        }
    }

    /// Installs `data` at `page` of a memfd-backed space (write-protected
    /// unless `writable`; see [`Frames`]): through the alias and
    /// `UFFDIO_CONTINUE` if the page has a frame, else by `UFFDIO_COPY`.
    fn continue_page(
        &self,
        alias: usize,
        frames: &Mutex<Frames>,
        page: usize,
        data: &[u8; PAGE_SIZE],
        writable: bool,
    ) -> Result<Installed, FaultError> {
        let addr = self.addr(page);
        let framed = self
            .claim_frames(frames, page, 1)
            .first()
            .is_some_and(|segment| segment.framed);
        if !framed {
            let mode = if writable {
                0
            } else {
                userfaultfd_sys::UFFDIO_COPY_MODE_WP
            };
            match self.run_install(page, "UFFDIO_COPY (memfd)", || {
                self.copy_pages(addr, data, mode).0
            }) {
                // EEXIST: mapped already (a stale install), or a frame this
                // tracking missed. Mapping it through the alias is right
                // in both cases, where taking it as mapped would leave it
                // faulting forever in the second.
                Ok(Installed::AlreadyPresent) => {}
                installed => return installed,
            }
        }
        self.write_alias(alias, page, data);
        let mode = if writable { 0 } else { CONTINUE_MODE_WP };
        self.run_install(page, "UFFDIO_CONTINUE", || {
            self.continue_pages(addr, PAGE_SIZE, mode).0
        })
    }

    /// Writes `bytes` (whole pages) into the memfd's pages from `first`
    /// through the alias.
    fn write_alias(&self, alias: usize, first: usize, bytes: &[u8]) {
        debug_assert!(first * PAGE_SIZE + bytes.len() <= self.len);
        // SAFETY: the alias pages are memory of the region's memfd, which no
        // Rust reference points into. Their view in the space is not mapped
        // (the protocol installs only pages this rank does not hold), except
        // for a stale install, where it already holds these very bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (alias + first * PAGE_SIZE) as *mut u8,
                bytes.len(),
            )
        };
    }

    /// One UFFDIO_CONTINUE of `len` bytes at `addr` (pages of the region
    /// whose frames the memfd holds) with `mode` (`CONTINUE_MODE_WP`:
    /// mapped write-protected): the ioctl's result, and the bytes it mapped
    /// (or a negative errno).
    fn continue_pages(&self, addr: usize, len: usize, mode: u64) -> (libc::c_int, i64) {
        debug_assert!(addr + len <= self.base + self.len);
        let mut cont = userfaultfd_sys::uffdio_continue {
            range: userfaultfd_sys::uffdio_range {
                start: addr as u64,
                len: len as u64,
            },
            mode,
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE maps the memfd's existing pages over a range
        // of the registered region and writes the result into `cont`, which
        // lives across the call.
        let result = unsafe {
            libc::ioctl(
                self.uffd.as_raw_fd(),
                userfaultfd_sys::UFFDIO_CONTINUE as _,
                &mut cont,
            )
        };
        (result, cont.mapped)
    }

    /// `continue_page` for a run of read-only pages: each segment of pages
    /// with a frame written through the alias in one copy and mapped by one
    /// `UFFDIO_CONTINUE`, each segment without one filled by one
    /// `UFFDIO_COPY` (a page already mapped is skipped and its waiters
    /// woken).
    fn continue_readonly_run(
        &self,
        alias: usize,
        frames: &Mutex<Frames>,
        first: usize,
        data: &[u8],
    ) -> Result<(), FaultError> {
        debug_assert!(data.len().is_multiple_of(PAGE_SIZE));
        debug_assert!(first * PAGE_SIZE + data.len() <= self.len);
        for segment in self.claim_frames(frames, first, data.len() / PAGE_SIZE) {
            let from = (segment.start - first) * PAGE_SIZE;
            let bytes = &data[from..from + segment.count * PAGE_SIZE];
            let start = self.addr(segment.start);
            if !segment.framed {
                self.map_run(
                    segment.start,
                    bytes.len(),
                    "UFFDIO_COPY (memfd run)",
                    |done| {
                        self.copy_pages(
                            start + done,
                            &bytes[done..],
                            userfaultfd_sys::UFFDIO_COPY_MODE_WP,
                        )
                    },
                )?;
                continue;
            }
            self.write_alias(alias, segment.start, bytes);
            self.map_run(
                segment.start,
                bytes.len(),
                "UFFDIO_CONTINUE (write-protected run)",
                |done| self.continue_pages(start + done, bytes.len() - done, CONTINUE_MODE_WP),
            )?;
        }
        Ok(())
    }

    /// Lets a transport receive the bytes of pages `first..first + count`
    /// (a run of read grants) straight into their frames, which saves
    /// copying them from a receive buffer: claims the frames, allocates the
    /// missing ones in one call, and returns their memory in the alias, which
    /// hands back `notice` once the bytes have landed. `None` without a
    /// memfd, or for pages outside the space. [`FaultHandler::install_landed_run`]
    /// then maps them.
    ///
    /// The caller must know from the protocol that the space does not map
    /// these pages and that nothing else writes them until the notice is
    /// handled (this rank is waiting for their read grants).
    pub fn landing(&self, first: usize, count: usize, notice: Vec<u8>) -> Option<Box<dyn Landing>> {
        let (Some(mapping), Some(frames)) = (&self.alias_mapping, &self.frames) else {
            return None;
        };
        let end = first.checked_add(count)?;
        if count == 0 || end > self.len / PAGE_SIZE {
            return None;
        }
        for segment in self.claim_frames(frames, first, count) {
            if !segment.framed {
                // Frames allocated here, in one call, rather than by a
                // page fault each as the bytes land. If the call fails,
                // they are.
                // SAFETY: pages of the alias mapping of our memfd, which no
                // Rust reference points into; populating only allocates
                // zeroed frames for pages that have none.
                unsafe {
                    libc::madvise(
                        (mapping.addr + segment.start * PAGE_SIZE) as *mut libc::c_void,
                        segment.count * PAGE_SIZE,
                        libc::MADV_POPULATE_WRITE,
                    )
                };
            }
        }
        Some(Box::new(AliasLanding {
            mapping: Arc::clone(mapping),
            offset: first * PAGE_SIZE,
            len: count * PAGE_SIZE,
            notice,
        }))
    }

    /// Maps pages whose bytes a [`FaultHandler::landing`] received,
    /// write-protected (read-only copies), and wakes the threads waiting on
    /// them.
    pub fn install_landed_run(&self, first: usize, count: usize) -> Result<(), FaultError> {
        let start = self.addr(first);
        let len = count * PAGE_SIZE;
        let mapped = self.map_run(first, len, "UFFDIO_CONTINUE (landed run)", |done| {
            self.continue_pages(start + done, len - done, CONTINUE_MODE_WP)
        });
        if let Some(waiters) = &self.waiters {
            waiters.woken_run(first, count);
        }
        mapped
    }

    /// The bytes a landing received for `page`, copied into `out`.
    pub fn copy_landed(&self, page: usize, out: &mut [u8; PAGE_SIZE]) {
        let Some(alias) = self.alias else {
            return;
        };
        debug_assert!((page + 1) * PAGE_SIZE <= self.len);
        // SAFETY: a page of the alias mapping of our memfd; its bytes landed
        // and nothing writes them until the page is installed.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (alias + page * PAGE_SIZE) as *const u8,
                out.as_mut_ptr(),
                PAGE_SIZE,
            )
        };
    }

    /// Maps a run of `len` bytes from page `first` with `ioctl` (given the
    /// bytes done so far; returns its result and the bytes it mapped, or a
    /// negative errno): a call that stops part way goes on from there, a
    /// page already mapped is skipped and its waiters woken, EAGAIN and
    /// EINTR are retried.
    fn map_run(
        &self,
        first: usize,
        len: usize,
        op: &'static str,
        mut ioctl: impl FnMut(usize) -> (libc::c_int, i64),
    ) -> Result<(), FaultError> {
        let mut done = 0usize;
        while done < len {
            let (result, mapped) = ioctl(done);
            if result == 0 {
                return Ok(());
            }
            let errno = nix::errno::Errno::last();
            if mapped > 0 {
                done += mapped as usize;
                continue;
            }
            match errno {
                nix::errno::Errno::EEXIST => {
                    self.wake(first + done / PAGE_SIZE)?;
                    done += PAGE_SIZE;
                }
                nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR => {}
                errno => {
                    return Err(FaultError::PageOp {
                        op,
                        addr: self.addr(first) + done,
                        errno,
                    })
                }
            }
        }
        Ok(())
    }

    /// The userfaultfd's descriptor (non-blocking), to poll for fault events.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by `self.uffd`, which outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.uffd.as_raw_fd()) }
    }

    /// Where the space is mapped.
    pub fn base(&self) -> usize {
        self.base
    }

    fn addr(&self, page: usize) -> usize {
        debug_assert!(page * PAGE_SIZE < self.len);
        self.base + page * PAGE_SIZE
    }

    /// Next pending fault, `None` when there is none right now.
    pub fn next_fault(&self) -> Result<Option<Fault>, FaultError> {
        loop {
            match self.uffd.read_event() {
                Ok(None) => return Ok(None),
                Ok(Some(Event::Pagefault { kind, rw, addr, .. })) => {
                    let addr = addr as usize;
                    if addr < self.base || addr >= self.base + self.len {
                        continue;
                    }
                    let write_protect = matches!(kind, FaultKind::WriteProtected);
                    return Ok(Some(Fault {
                        page: (addr - self.base) / PAGE_SIZE,
                        write: rw == ReadWrite::Write || write_protect,
                        write_protect,
                    }));
                }
                // Fork/remap/remove/unmap events are not requested.
                Ok(Some(_)) => continue,
                Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EAGAIN => {
                    return Ok(None)
                }
                Err(e) => return Err(FaultError::Uffd(format!("reading fault events: {e}"))),
            }
        }
    }

    /// Maps `data` at `page` (writable) and wakes the threads waiting on it.
    pub fn install(&self, page: usize, data: &[u8; PAGE_SIZE]) -> Result<Installed, FaultError> {
        let installed = self.install_writable(page, data);
        self.woken(page);
        installed
    }

    fn install_writable(
        &self,
        page: usize,
        data: &[u8; PAGE_SIZE],
    ) -> Result<Installed, FaultError> {
        if let (Some(alias), Some(frames)) = (self.alias, &self.frames) {
            return self.continue_page(alias, frames, page, data, true);
        }
        let addr = self.addr(page);
        loop {
            // SAFETY: `data` is a live page-sized buffer and `addr` a page of
            // the registered region; UFFDIO_COPY only fills a missing page.
            let result = unsafe {
                self.uffd
                    .copy(data.as_ptr() as *const _, addr as *mut _, PAGE_SIZE, true)
            };
            match result {
                Ok(_) => return Ok(Installed::Fresh),
                Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                    // Already present (a stale fault): make sure nobody sleeps on it.
                    self.wake(page)?;
                    return Ok(Installed::AlreadyPresent);
                }
                // EAGAIN: the address space changed under the copy; retry.
                Err(userfaultfd::Error::PartiallyCopied(_)) => continue,
                Err(e) => {
                    return Err(FaultError::Install {
                        addr,
                        detail: e.to_string(),
                    })
                }
            }
        }
    }

    /// Maps `data` at `page` write-protected (a read-only copy): one
    /// UFFDIO_COPY with MODE_WP, so no thread ever sees it writable.
    pub fn install_readonly(
        &self,
        page: usize,
        data: &[u8; PAGE_SIZE],
    ) -> Result<Installed, FaultError> {
        let installed = match (self.alias, &self.frames) {
            (Some(alias), Some(frames)) => self.continue_page(alias, frames, page, data, false),
            _ => {
                let addr = self.addr(page);
                self.run_install(page, "UFFDIO_COPY (write-protected)", || {
                    self.copy_pages(addr, data, userfaultfd_sys::UFFDIO_COPY_MODE_WP)
                        .0
                })
            }
        };
        self.woken(page);
        installed
    }

    /// One UFFDIO_COPY of `src` to `addr` (a page of the region; `src`
    /// whole pages that fit in it) with `mode` (`UFFDIO_COPY_MODE_WP`: the
    /// pages mapped write-protected): the ioctl's result, and the bytes it
    /// mapped (or a negative errno).
    fn copy_pages(&self, addr: usize, src: &[u8], mode: u64) -> (libc::c_int, i64) {
        debug_assert!(addr + src.len() <= self.base + self.len);
        let mut copy = userfaultfd_sys::uffdio_copy {
            dst: addr as u64,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes from the live slice `src`
        // into pages of the registered region (the caller's range), and
        // writes its progress into `copy`, which lives across the call.
        let result = unsafe {
            libc::ioctl(
                self.uffd.as_raw_fd(),
                userfaultfd_sys::UFFDIO_COPY as _,
                &mut copy,
            )
        };
        (result, copy.copy)
    }

    /// Maps consecutive pages from `first` write-protected (read-only
    /// copies) with their bytes in `data`, in as few UFFDIO_COPY calls as
    /// the kernel allows, and wakes the threads waiting on them. A page
    /// already present (a stale fault) is skipped and its waiters woken.
    pub fn install_readonly_run(&self, first: usize, data: &[u8]) -> Result<(), FaultError> {
        let installed = self.map_readonly_run(first, data);
        if let Some(waiters) = &self.waiters {
            waiters.woken_run(first, data.len() / PAGE_SIZE);
        }
        installed
    }

    fn map_readonly_run(&self, first: usize, data: &[u8]) -> Result<(), FaultError> {
        if let (Some(alias), Some(frames)) = (self.alias, &self.frames) {
            return self.continue_readonly_run(alias, frames, first, data);
        }
        let start = self.addr(first);
        self.map_run(
            first,
            data.len(),
            "UFFDIO_COPY (write-protected run)",
            |done| {
                self.copy_pages(
                    start + done,
                    &data[done..],
                    userfaultfd_sys::UFFDIO_COPY_MODE_WP,
                )
            },
        )
    }

    /// Maps pages `first..first + count`, all zeros and writable (pages
    /// never touched, taken at once by a first touch, `Mrsw::populate_ahead`),
    /// in as few system calls as the kernel allows, and wakes the threads
    /// waiting on them. With a memfd, a page with no frame gets a zeroed one
    /// from `UFFDIO_ZEROPAGE` (no copy); one that kept its frame is zeroed
    /// through the alias and mapped by `UFFDIO_CONTINUE`. Anonymous memory
    /// is filled by `UFFDIO_COPY` from a buffer of zeros, up to
    /// [`ZERO_RUN_PAGES`] pages per call (its `UFFDIO_ZEROPAGE` maps the
    /// shared zero page, which each page's first store would then copy in
    /// a fault of its own). A page already present is skipped and its
    /// waiters woken.
    pub fn install_zero_run(&self, first: usize, count: usize) -> Result<(), FaultError> {
        let mapped = self.map_zero_run(first, count);
        if let Some(waiters) = &self.waiters {
            waiters.woken_run(first, count);
        }
        mapped
    }

    fn map_zero_run(&self, first: usize, count: usize) -> Result<(), FaultError> {
        debug_assert!((first + count) * PAGE_SIZE <= self.len);
        if let (Some(alias), Some(frames)) = (self.alias, &self.frames) {
            for segment in self.claim_frames(frames, first, count) {
                let start = self.addr(segment.start);
                let len = segment.count * PAGE_SIZE;
                if segment.framed {
                    self.continue_zeros(alias, segment.start, segment.count)?;
                    continue;
                }
                let mut done = 0;
                while done < len {
                    let (result, mapped) = self.zero_pages(start + done, len - done);
                    if result == 0 {
                        break;
                    }
                    let errno = nix::errno::Errno::last();
                    if mapped > 0 {
                        done += mapped as usize;
                        continue;
                    }
                    match errno {
                        // A frame this tracking missed (or, were the page
                        // mapped, which the protocol rules out, a page
                        // holding what it should): as in `continue_page`,
                        // zeroed and mapped through the alias.
                        nix::errno::Errno::EEXIST => {
                            self.continue_zeros(alias, segment.start + done / PAGE_SIZE, 1)?;
                            done += PAGE_SIZE;
                        }
                        nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR => {}
                        errno => {
                            return Err(FaultError::PageOp {
                                op: "UFFDIO_ZEROPAGE (memfd run)",
                                addr: start + done,
                                errno,
                            })
                        }
                    }
                }
            }
            return Ok(());
        }
        let zeros = self
            .zeros
            .get_or_init(|| vec![0u8; ZERO_RUN_PAGES * PAGE_SIZE].into_boxed_slice());
        for part in (first..first + count).step_by(ZERO_RUN_PAGES) {
            let len = (first + count - part).min(ZERO_RUN_PAGES) * PAGE_SIZE;
            let start = self.addr(part);
            self.map_run(part, len, "UFFDIO_COPY (zeros)", |done| {
                self.copy_pages(start + done, &zeros[done..len], 0)
            })?;
        }
        Ok(())
    }

    /// Zeroes the frames of `count` pages from `first` of a memfd-backed
    /// space through the alias and maps them writable with
    /// `UFFDIO_CONTINUE` (a page already mapped is skipped and its waiters
    /// woken).
    fn continue_zeros(&self, alias: usize, first: usize, count: usize) -> Result<(), FaultError> {
        let (start, len) = (self.addr(first), count * PAGE_SIZE);
        // SAFETY: pages of the alias mapping of our memfd, which no Rust
        // reference points into; their view in the space is not mapped
        // (this rank holds no copy of them: the protocol maps zeros only
        // over pages never touched).
        unsafe { std::ptr::write_bytes((alias + first * PAGE_SIZE) as *mut u8, 0, len) };
        self.map_run(first, len, "UFFDIO_CONTINUE (zeros)", |done| {
            self.continue_pages(start + done, len - done, 0)
        })
    }

    /// One UFFDIO_ZEROPAGE of `len` bytes at `addr` (missing pages of the
    /// region; with a memfd, pages without a frame, which it allocates
    /// zeroed and maps writable): the ioctl's result, and the bytes it
    /// mapped (or a negative errno).
    fn zero_pages(&self, addr: usize, len: usize) -> (libc::c_int, i64) {
        debug_assert!(addr + len <= self.base + self.len);
        let mut zero = userfaultfd_sys::uffdio_zeropage {
            range: userfaultfd_sys::uffdio_range {
                start: addr as u64,
                len: len as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE fills missing pages of a range of the
        // registered region with zeros and writes its progress into `zero`,
        // which lives across the call.
        let result = unsafe {
            libc::ioctl(
                self.uffd.as_raw_fd(),
                userfaultfd_sys::UFFDIO_ZEROPAGE as _,
                &mut zero,
            )
        };
        (result, zero.zeropage)
    }

    /// Lifts the write protection of a read-only copy and wakes the writers.
    pub fn make_writable(&self, page: usize) -> Result<(), FaultError> {
        self.make_writable_run(page, 1)
    }

    /// `make_writable` for `count` pages from `first`, in one system call:
    /// one TLB shootdown for the whole run.
    pub fn make_writable_run(&self, first: usize, count: usize) -> Result<(), FaultError> {
        let addr = self.addr(first);
        let lifted = self
            .uffd
            .remove_write_protection(addr as *mut _, count * PAGE_SIZE, true)
            .map_err(|e| FaultError::Install {
                addr,
                detail: format!("remove write protection: {e}"),
            });
        if let Some(waiters) = &self.waiters {
            waiters.woken_run(first, count);
        }
        lifted
    }

    /// Turns our writable copy into a read-only one and copies it into
    /// `out` (the page stays mapped, read-only).
    pub fn downgrade(&self, page: usize, out: &mut [u8; PAGE_SIZE]) -> Result<(), FaultError> {
        self.write_protect(page, 1)?;
        self.copy_out(page, out);
        Ok(())
    }

    /// Write-protects `count` present pages from `first` in one system
    /// call: one TLB shootdown for the whole run.
    pub fn write_protect(&self, first: usize, count: usize) -> Result<(), FaultError> {
        let addr = self.addr(first);
        self.uffd
            .write_protect(addr as *mut _, count * PAGE_SIZE)
            .map_err(|e| FaultError::Install {
                addr,
                detail: format!("write-protect: {e}"),
            })
    }

    /// Copies a present, write-protected page into `out`.
    pub fn copy_out(&self, page: usize, out: &mut [u8; PAGE_SIZE]) {
        let addr = self.addr(page);
        // SAFETY: the page is present (caller's invariant) so reading it
        // cannot fault; it is write-protected, so no thread changes it while
        // it is copied (writers block in a fault this engine resolves later).
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), PAGE_SIZE) };
    }

    /// The bytes of a present, write-protected page, read in place (the
    /// home sends its own read-only copy without copying it out; a
    /// release-consistent copy is twinned and diffed).
    pub fn mapped_page(&self, page: usize) -> &[u8] {
        let addr = self.addr(page);
        // SAFETY: the page is present (caller's invariant: the engine's
        // home copy that lives in the mapping) so reading it cannot fault;
        // it is write-protected, and the engine copies it out before it
        // lifts the protection or drops it, so its bytes do not change while
        // the slice lives (borrowed from the engine, under the engine's lock,
        // which every change of the mapping takes).
        unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) }
    }

    /// The words of a present page, read and written in place as atomics
    /// (the release-consistent protocol's twins, diffs, and a home's
    /// master copy that its own threads write meanwhile). The caller
    /// guarantees the page is present: an access to a missing page would
    /// wait for the engine that makes it.
    pub fn page_words(&self, page: usize) -> &[AtomicU64] {
        let addr = self.addr(page);
        // SAFETY: the page lies in the region, which stays mapped while
        // the handler lives (the borrow ties the slice to it); it is
        // page-aligned, so 8-byte aligned; atomics allow the application's
        // threads to read and write the same words meanwhile.
        unsafe { std::slice::from_raw_parts(addr as *const AtomicU64, PAGE_SIZE / 8) }
    }

    /// Takes the page away from this process: writes are stopped first
    /// (write-protect), then the contents are copied into `out`, then the
    /// page is dropped so the next access faults again.
    ///
    /// The caller guarantees the page is present (it tracks this).
    pub fn take(&self, page: usize, out: &mut [u8; PAGE_SIZE]) -> Result<(), FaultError> {
        self.downgrade(page, out)?;
        self.drop_page(page)
    }

    /// Drops the page: the next access raises a missing fault.
    pub fn drop_page(&self, page: usize) -> Result<(), FaultError> {
        self.drop_run(page, 1)
    }

    /// `drop_page` for `count` pages from `first`, in one system call: one
    /// TLB shootdown for the whole run.
    pub fn drop_run(&self, first: usize, count: usize) -> Result<(), FaultError> {
        debug_assert!((first + count) * PAGE_SIZE <= self.len);
        let addr = self.addr(first);
        // SAFETY: the range is `count` pages of the region (callers pass
        // pages of the space); dropping them only discards contents this
        // process no longer owns.
        unsafe {
            nix::sys::mman::madvise(
                std::ptr::NonNull::new_unchecked(addr as *mut _),
                count * PAGE_SIZE,
                nix::sys::mman::MmapAdvise::MADV_DONTNEED,
            )
        }
        .map_err(|errno| FaultError::PageOp {
            op: "MADV_DONTNEED",
            addr,
            errno,
        })?;
        self.retain(first, count)
    }

    /// Wakes threads waiting on `page` (after a race made their fault moot).
    pub fn wake(&self, page: usize) -> Result<(), FaultError> {
        let addr = self.addr(page);
        self.woken(page);
        self.uffd
            .wake(addr as *mut _, PAGE_SIZE)
            .map_err(|e| FaultError::Install {
                addr,
                detail: format!("wake: {e}"),
            })
    }
}

fn lock_frames(frames: &Mutex<Frames>) -> std::sync::MutexGuard<'_, Frames> {
    frames.lock().unwrap_or_else(|p| p.into_inner())
}

impl AsFd for FaultHandler {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd()
    }
}
