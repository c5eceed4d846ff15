//! A byte stream from one process to another on the same host, through a
//! ring in shared memory: what the transport uses instead of a loopback
//! socket between co-located ranks (no system call per message while both
//! sides are busy, no trip through the TCP stack).
//!
//! The receiver creates the ring (a memfd) and tells the sender, over
//! their authenticated connection, its pid, the descriptor's number and a
//! nonce written in the ring's header; the sender opens the descriptor
//! through `/proc/<pid>/fd/<n>` (which the kernel allows only to processes
//! that could trace the receiver) and checks the nonce.
//!
//! One producer and one consumer. The producer copies bytes into the free
//! part of the ring and publishes them (`flush`) by advancing `head`; the
//! consumer copies published bytes out and frees them by advancing `tail`.
//! A side that finds nothing to do polls for a while, then sleeps on a
//! futex word in the ring that the other side wakes after it publishes
//! (each side stores its waiting flag before looking again, the other
//! stores its position before looking at the flag: one of them sees the
//! other). A peer that dies cannot wake anyone: sleeps are bounded, and
//! the transport marks the ring `broken` when the peer's connection ends.
//!
//! Threads of the reader's process other than its receive thread may
//! poll the ring for a while (a faulting thread waiting for its page):
//! they count themselves in the header (`pollers`), and the producer skips
//! its wake-up while any poll, so the answer costs no system call on
//! either side. A poller that stops wakes the receive thread if bytes are
//! left (it counts down before it looks at `head`, the producer stores
//! `head` before it looks at the count: one of them sees the other).

use std::fs::File;
use std::io::{Read, Write};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// Bytes of the ring's data area (a power of two).
pub const RING_BYTES: usize = 1 << 20;
/// Bytes before the data area: the nonce and the positions, each on its
/// own cache line.
const HEADER_BYTES: usize = 4096;
const NONCE_AT: usize = 0;
const HEAD_AT: usize = 64;
const TAIL_AT: usize = 128;
const CONSUMER_WAITING_AT: usize = 192;
const PRODUCER_WAITING_AT: usize = 256;
const POLLERS_AT: usize = 320;
/// Longest sleep before a side looks again (and at `broken`).
const SLEEP_STEP: Duration = Duration::from_millis(50);

/// Why a ring could not be made or opened.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// A system call failed.
    #[error("{what}: {errno}")]
    Sys {
        /// The call, as a phrase.
        what: &'static str,
        /// Its error.
        errno: nix::errno::Errno,
    },
    /// Opening the peer's ring through /proc failed.
    #[error("opening {path}: {source}")]
    Open {
        /// The /proc path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The ring opened holds another nonce than the peer announced.
    #[error("the ring opened is not the one announced (nonce mismatch)")]
    Nonce,
}

/// One process's mapping of a ring.
struct Mapping {
    base: NonNull<u8>,
    /// The memfd, kept open by the receiver so the sender can open it.
    fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory; every access to it goes
// through atomics (positions, flags) or copies of byte ranges that the
// ring protocol gives to one side at a time.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: the shared state is atomics, and each side's byte
// copies are done by the one `RingReader` or `RingWriter` that owns them.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map(fd: OwnedFd) -> Result<Mapping, RingError> {
        let len = NonZeroUsize::new(HEADER_BYTES + RING_BYTES).ok_or(RingError::Sys {
            what: "ring size",
            errno: nix::errno::Errno::EINVAL,
        })?;
        // SAFETY: a fresh shared mapping of the whole memfd (sized by its
        // creator), at an address the kernel picks: it aliases no Rust
        // object.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )
        }
        .map_err(|errno| RingError::Sys {
            what: "mapping the ring",
            errno,
        })?;
        Ok(Mapping {
            base: base.cast(),
            fd,
        })
    }

    fn at<T>(&self, offset: usize) -> &T {
        // SAFETY: `offset` is one of the header's fixed offsets, aligned
        // for T (an atomic) and inside the mapping, which lives as long as
        // `self`; atomics may be shared with the other process.
        unsafe { &*self.base.as_ptr().add(offset).cast::<T>() }
    }

    fn head(&self) -> &AtomicU64 {
        self.at(HEAD_AT)
    }

    fn tail(&self) -> &AtomicU64 {
        self.at(TAIL_AT)
    }

    fn consumer_waiting(&self) -> &AtomicU32 {
        self.at(CONSUMER_WAITING_AT)
    }

    fn producer_waiting(&self) -> &AtomicU32 {
        self.at(PRODUCER_WAITING_AT)
    }

    fn pollers(&self) -> &AtomicU32 {
        self.at(POLLERS_AT)
    }

    fn nonce(&self) -> [u8; 16] {
        let mut nonce = [0u8; 16];
        // SAFETY: 16 bytes of the header, written once by the creator
        // before it announced the ring.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(NONCE_AT), nonce.as_mut_ptr(), 16)
        };
        nonce
    }

    /// Copies `bytes` into the data area at stream position `at`.
    fn copy_in(&self, at: u64, bytes: &[u8]) {
        let start = (at % RING_BYTES as u64) as usize;
        let first = bytes.len().min(RING_BYTES - start);
        // SAFETY: the producer writes only free bytes (its caller checked
        // against `tail`), which the consumer does not read until `head`
        // publishes them; the ranges lie inside the data area.
        unsafe {
            let data = self.base.as_ptr().add(HEADER_BYTES);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), data.add(start), first);
            std::ptr::copy_nonoverlapping(bytes.as_ptr().add(first), data, bytes.len() - first);
        }
    }

    /// Copies the data area's bytes at stream position `at` into `out`.
    fn copy_out(&self, at: u64, out: &mut [u8]) {
        let start = (at % RING_BYTES as u64) as usize;
        let first = out.len().min(RING_BYTES - start);
        // SAFETY: the consumer reads only published bytes (below `head`,
        // loaded with Acquire), which the producer does not touch until
        // `tail` frees them; the ranges lie inside the data area.
        unsafe {
            let data = self.base.as_ptr().add(HEADER_BYTES);
            std::ptr::copy_nonoverlapping(data.add(start), out.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(data, out.as_mut_ptr().add(first), out.len() - first);
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of that length; nothing uses
        // it after its owner is dropped.
        let _ = unsafe { munmap(self.base.cast(), HEADER_BYTES + RING_BYTES) };
    }
}

/// Sleeps on `word` while it holds `value`, for at most `SLEEP_STEP`.
fn futex_wait(word: &AtomicU32, value: u32) {
    let step = libc::timespec {
        tv_sec: 0,
        tv_nsec: SLEEP_STEP.as_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT (shared, not private: the word is in memory two
    // processes map) on a live aligned u32, with a valid timeout; it only
    // reads the word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            value,
            &step as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes whoever sleeps on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a live aligned u32; it does not touch memory.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1, 0, 0, 0);
    }
}

/// Wakes the other side if it said it sleeps on `flag`.
fn wake_if_waiting(flag: &AtomicU32) {
    if flag.load(Ordering::SeqCst) != 0 {
        flag.store(0, Ordering::SeqCst);
        futex_wake(flag);
    }
}

/// Polls `ready` for `spin`, then sleeps on `flag` until `ready` or `broken`.
/// False if the ring broke first.
fn wait_until(
    ready: impl Fn() -> bool,
    flag: &AtomicU32,
    spin: Duration,
    broken: &AtomicBool,
) -> bool {
    let started = Instant::now();
    let mut polls = 0u32;
    loop {
        if ready() {
            return true;
        }
        if broken.load(Ordering::SeqCst) {
            return false;
        }
        polls += 1;
        if polls & 63 != 0 || started.elapsed() < spin {
            std::hint::spin_loop();
            continue;
        }
        flag.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if ready() {
            flag.store(0, Ordering::SeqCst);
            return true;
        }
        futex_wait(flag, 1);
        flag.store(0, Ordering::SeqCst);
    }
}

/// The receiving end: creates the ring; [`Read`] gives its bytes in order.
pub struct RingReader {
    ring: Arc<Mapping>,
    spin: Duration,
    broken: Arc<AtomicBool>,
    /// True while a read waits on an empty ring: everything read before
    /// was handed to (and handled by) the reader's caller.
    idle: Arc<AtomicBool>,
    /// Threads other than the reader's taking frames now
    /// ([`RingProbe::begin_taking`]).
    taking: Arc<AtomicUsize>,
}

impl RingReader {
    /// A new ring holding `nonce`, polled `spin` before sleeping; `broken`
    /// ends the waits (the peer is gone).
    pub fn create(
        nonce: [u8; 16],
        spin: Duration,
        broken: Arc<AtomicBool>,
    ) -> Result<RingReader, RingError> {
        let fd = nix::sys::memfd::memfd_create(c"dsm-ring", nix::sys::memfd::MFdFlags::empty())
            .map_err(|errno| RingError::Sys {
                what: "memfd_create for a ring",
                errno,
            })?;
        nix::unistd::ftruncate(&fd, (HEADER_BYTES + RING_BYTES) as i64).map_err(|errno| {
            RingError::Sys {
                what: "sizing a ring",
                errno,
            }
        })?;
        let ring = Mapping::map(fd)?;
        // SAFETY: the header's first 16 bytes, before anyone else knows
        // the ring.
        unsafe {
            std::ptr::copy_nonoverlapping(nonce.as_ptr(), ring.base.as_ptr().add(NONCE_AT), 16)
        };
        Ok(RingReader {
            ring: Arc::new(ring),
            spin,
            broken,
            idle: Arc::new(AtomicBool::new(false)),
            taking: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The descriptor number the sender opens through /proc.
    pub fn fd_number(&self) -> i32 {
        self.ring.fd.as_raw_fd()
    }

    /// The reader's view of its ring that other threads share: whether
    /// bytes wait, a wait for them, and polls by threads other than the
    /// reader's.
    pub fn probe(&self) -> RingProbe {
        RingProbe {
            ring: Arc::clone(&self.ring),
            idle: Arc::clone(&self.idle),
            taking: Arc::clone(&self.taking),
            spin: self.spin,
            broken: Arc::clone(&self.broken),
        }
    }

    /// Copies the next `out.len()` published bytes without consuming
    /// them; false if fewer are published.
    pub fn peek(&self, out: &mut [u8]) -> bool {
        let ring = &self.ring;
        let tail = ring.tail().load(Ordering::Relaxed);
        if ring.head().load(Ordering::Acquire) - tail < out.len() as u64 {
            return false;
        }
        ring.copy_out(tail, out);
        true
    }

    /// Bytes published and not read yet.
    pub fn published(&self) -> u64 {
        let ring = &self.ring;
        ring.head().load(Ordering::Acquire) - ring.tail().load(Ordering::Relaxed)
    }
}

/// A ring reader's state shared with other threads of its process (see
/// [`RingReader::probe`]).
pub struct RingProbe {
    ring: Arc<Mapping>,
    idle: Arc<AtomicBool>,
    taking: Arc<AtomicUsize>,
    spin: Duration,
    broken: Arc<AtomicBool>,
}

impl RingProbe {
    /// True when the reader waits on a ring with nothing published left
    /// and no other thread is taking frames from it: whatever came before
    /// was handled. (`taking` is read last: a thread that emptied the ring
    /// counted itself before it read, and hands on what it read, a goodbye
    /// say, before it stops counting.)
    pub fn waiting_for_more(&self) -> bool {
        self.idle.load(Ordering::SeqCst)
            && self.ring.tail().load(Ordering::SeqCst) == self.ring.head().load(Ordering::SeqCst)
            && self.taking.load(Ordering::SeqCst) == 0
    }

    /// A thread other than the reader's starts taking frames (it polls
    /// while it waits): until [`RingProbe::end_taking`], an empty ring does
    /// not count as handled, since what the thread read may not be yet.
    pub fn begin_taking(&self) {
        self.taking.fetch_add(1, Ordering::SeqCst);
    }

    /// Ends a [`RingProbe::begin_taking`], once what was read is handled.
    pub fn end_taking(&self) {
        self.taking.fetch_sub(1, Ordering::SeqCst);
    }

    /// True while bytes are published and not read yet.
    pub fn has_bytes(&self) -> bool {
        self.ring.head().load(Ordering::SeqCst) != self.ring.tail().load(Ordering::SeqCst)
    }

    /// Polls, then sleeps, until bytes are published (true) or the ring
    /// broke (false); the reader counts as idle meanwhile.
    pub fn wait_for_bytes(&self) -> bool {
        self.idle.store(true, Ordering::SeqCst);
        let ready = || self.has_bytes();
        let woken = wait_until(ready, self.ring.consumer_waiting(), self.spin, &self.broken);
        self.idle.store(false, Ordering::SeqCst);
        woken
    }

    /// A thread other than the reader's starts polling the ring: the
    /// producer stops waking the reader until [`RingProbe::stop_polling`].
    pub fn start_polling(&self) {
        self.ring.pollers().fetch_add(1, Ordering::SeqCst);
    }

    /// Ends a [`RingProbe::start_polling`]; a sleeping reader is woken if
    /// bytes are left for it.
    pub fn stop_polling(&self) {
        self.ring.pollers().fetch_sub(1, Ordering::SeqCst);
        if self.has_bytes() {
            wake_if_waiting(self.ring.consumer_waiting());
        }
    }
}

impl Read for RingReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let ring = &self.ring;
        let tail = ring.tail().load(Ordering::Relaxed);
        let ready = || ring.head().load(Ordering::Acquire) != tail;
        if !ready() {
            self.idle.store(true, Ordering::SeqCst);
            let woken = wait_until(ready, ring.consumer_waiting(), self.spin, &self.broken);
            self.idle.store(false, Ordering::SeqCst);
            if !woken {
                return Ok(0); // the peer is gone: end of stream
            }
        }
        let head = ring.head().load(Ordering::Acquire);
        let n = out.len().min((head - tail) as usize);
        ring.copy_out(tail, &mut out[..n]);
        ring.tail().store(tail + n as u64, Ordering::SeqCst);
        wake_if_waiting(ring.producer_waiting());
        Ok(n)
    }
}

/// The sending end: [`Write`] copies bytes in, `flush` publishes them.
pub struct RingWriter {
    ring: Mapping,
    /// Bytes copied in but not published yet.
    pending: u64,
    spin: Duration,
    broken: Arc<AtomicBool>,
}

impl RingWriter {
    /// Opens the ring the peer (process `pid`) announced as descriptor
    /// `fd` holding `nonce`.
    pub fn open(
        pid: u32,
        fd: i32,
        nonce: [u8; 16],
        spin: Duration,
        broken: Arc<AtomicBool>,
    ) -> Result<RingWriter, RingError> {
        let path = format!("/proc/{pid}/fd/{fd}");
        let file = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| RingError::Open { path, source })?;
        let ring = Mapping::map(OwnedFd::from(file))?;
        if ring.nonce() != nonce {
            return Err(RingError::Nonce);
        }
        Ok(RingWriter {
            ring,
            pending: 0,
            spin,
            broken,
        })
    }

    /// The flag that ends this writer's waits.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.broken)
    }

    fn broken_pipe() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the peer's ring is closed")
    }

    /// Free bytes now, past those copied in but not published.
    fn room(&self) -> usize {
        let head = self.ring.head().load(Ordering::Relaxed) + self.pending;
        let tail = self.ring.tail().load(Ordering::Acquire);
        RING_BYTES - (head - tail) as usize
    }

    /// Copies as much of `bytes` as fits now, unpublished; how much.
    pub fn write_now(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.room());
        let at = self.ring.head().load(Ordering::Relaxed) + self.pending;
        self.ring.copy_in(at, &bytes[..n]);
        self.pending += n as u64;
        n
    }

    /// Copies in as much of `slices`, in order, as fits now, unpublished;
    /// how much.
    pub fn write_slices_now(&mut self, slices: &[std::io::IoSlice<'_>]) -> usize {
        let mut taken = 0;
        for slice in slices {
            let n = self.write_now(slice);
            taken += n;
            if n < slice.len() {
                break;
            }
        }
        taken
    }

    /// Publishes what was copied in and wakes the reader if it sleeps.
    pub fn publish(&mut self) {
        if self.pending == 0 {
            return;
        }
        let head = self.ring.head().load(Ordering::Relaxed) + self.pending;
        self.pending = 0;
        self.ring.head().store(head, Ordering::SeqCst);
        // A thread of the reader's process polling the ring takes the bytes
        // (or wakes the reader when it stops).
        if self.ring.pollers().load(Ordering::SeqCst) == 0 {
            wake_if_waiting(self.ring.consumer_waiting());
        }
    }
}

impl Write for RingWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if bytes.is_empty() {
            return Ok(0);
        }
        loop {
            let n = self.write_now(bytes);
            if n > 0 {
                return Ok(n);
            }
            // Full: what is copied in must be readable for room to come.
            self.publish();
            let ring = &self.ring;
            let head = ring.head().load(Ordering::Relaxed);
            let room = || (head - ring.tail().load(Ordering::Acquire)) < RING_BYTES as u64;
            if !wait_until(room, ring.producer_waiting(), self.spin, &self.broken) {
                return Err(Self::broken_pipe());
            }
        }
    }

    /// Copies in every slice that fits now (a frame's header and parts in
    /// one go), else waits as `write` does.
    fn write_vectored(&mut self, slices: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let taken = self.write_slices_now(slices);
        if taken > 0 {
            return Ok(taken);
        }
        match slices.iter().find(|s| !s.is_empty()) {
            Some(first) => self.write(first),
            None => Ok(0),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(Self::broken_pipe());
        }
        self.publish();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(spin: Duration) -> (RingReader, RingWriter, Arc<AtomicBool>) {
        let broken = Arc::new(AtomicBool::new(false));
        let nonce = [7u8; 16];
        let reader = RingReader::create(nonce, spin, Arc::clone(&broken)).unwrap();
        let writer = RingWriter::open(
            std::process::id(),
            reader.fd_number(),
            nonce,
            spin,
            Arc::clone(&broken),
        )
        .unwrap();
        (reader, writer, broken)
    }

    #[test]
    fn bytes_arrive_in_order_across_many_wraps_with_sleeps_on_both_sides() {
        // No spin: every wait sleeps on the futex, the path a busy node takes.
        let (mut reader, mut writer, _) = pair(Duration::ZERO);
        let total: usize = 5 * RING_BYTES + 12345;
        let sender = std::thread::spawn(move || {
            let mut sent = 0usize;
            let mut chunk = 1usize;
            while sent < total {
                let n = chunk.min(total - sent);
                let bytes: Vec<u8> = (sent..sent + n).map(|i| (i % 251) as u8).collect();
                writer.write_all(&bytes).unwrap();
                writer.flush().unwrap();
                sent += n;
                chunk = chunk * 7 % 70_001 + 1;
            }
        });
        let mut got = vec![0u8; total];
        reader.read_exact(&mut got).unwrap();
        sender.join().unwrap();
        let wrong = got.iter().enumerate().find(|(i, b)| **b != (i % 251) as u8);
        assert_eq!(wrong, None);
    }

    #[test]
    fn an_emptied_ring_is_not_handled_while_another_thread_takes_from_it() {
        let (mut reader, mut writer, _) = pair(Duration::ZERO);
        let probe = reader.probe();
        // The reader's thread waits on the empty ring.
        let waiting = std::thread::spawn(move || {
            let mut one = [0u8; 1];
            reader.read_exact(&mut one).unwrap();
            one[0]
        });
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !probe.waiting_for_more() {
            assert!(std::time::Instant::now() < until, "the reader never waited");
            std::thread::yield_now();
        }
        // A poller took frames (the ring is as empty as before) but has not
        // handed them on yet: nothing may be taken for handled.
        probe.begin_taking();
        assert!(!probe.waiting_for_more());
        probe.end_taking();
        assert!(probe.waiting_for_more());
        writer.write_all(&[42]).unwrap();
        writer.flush().unwrap();
        assert_eq!(waiting.join().unwrap(), 42);
    }

    #[test]
    fn a_broken_ring_ends_both_sides_instead_of_waiting() {
        let (mut reader, mut writer, broken) = pair(Duration::from_micros(10));
        writer.write_all(&[1, 2, 3]).unwrap();
        writer.flush().unwrap();
        let mut three = [0u8; 3];
        reader.read_exact(&mut three).unwrap();
        broken.store(true, Ordering::SeqCst);
        let mut one = [0u8; 1];
        assert_eq!(reader.read(&mut one).unwrap(), 0, "end of stream");
        // A full ring with its reader gone: the writer fails, not waits.
        let big = vec![0u8; RING_BYTES + 1];
        assert!(writer.write_all(&big).is_err());
    }

    #[test]
    fn a_wrong_nonce_is_refused() {
        let broken = Arc::new(AtomicBool::new(false));
        let reader = RingReader::create([1; 16], Duration::ZERO, Arc::clone(&broken)).unwrap();
        let opened = RingWriter::open(
            std::process::id(),
            reader.fd_number(),
            [2; 16],
            Duration::ZERO,
            broken,
        );
        assert!(matches!(opened, Err(RingError::Nonce)));
    }
}
