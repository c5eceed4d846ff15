//! Direct reads between co-located ranks: a home's board of readable pages.
//!
//! A rank that is a page's home publishes, per page, one word in a memfd
//! of its own (its board) while the page's current bytes are in its space's
//! memfd frame, mapped there (read-only, or writable by this rank alone,
//! below), and no transaction runs on it. A
//! co-located rank (the same kernel; the pair already talks over rings)
//! then reads such a page straight from the home's frame, with no message
//! and no thread of the home woken:
//!
//! 1. join: compare-and-swap its bit into the word's joiners, only while the
//!    word says readable and does not count it among the readers already;
//! 2. copy the page out of the home's space memfd (`pread`);
//! 3. check the word still holds the version it joined: the copy is the
//!    page's current bytes, and the home will count the reader.
//!
//! The home, before any step of its protocol on the page, retracts the word
//! (clears all but the version, taking the joiners, whom it adds to the
//! page's readers) and after the step publishes it again if the state
//! allows, with a new version and the readers it knows among the co-located
//! ranks (`members`). A reader the home already counts never joins: a read
//! grant may then be on its way to it (a push). A reader whose check fails
//! was taken by a retraction: it is counted, holds nothing, and says so as
//! an eviction would. The protocol's side is in `coherence::mrsw` (the
//! model checker runs it); this module is the shared memory.
//!
//! A page the home holds writable (it wrote it last, nobody else holds a
//! copy) is published too, marked writable, with the end of the home's
//! hold on it. A reader then first write-protects the home's mapping of it
//! itself, through the home's userfaultfd, and joins the very publication
//! it saw (a 64-bit count of publications beside the word tells, where the
//! word's version may have wrapped): from then on a store of the home
//! faults, and the home's fault retracts the page, counts the reader,
//! write-protects its mapping itself and asks for the page back as any
//! writer would. A reader that write-protected the page but did not join
//! leaves a protection the home's fault lifts again (the page then held
//! anew, so that the faulting thread stores first). A reader waits out the
//! home's hold (the page goes by message meanwhile), as a request would.
//! A page whose upgrade a batch staged is published once the staged run
//! made it writable (`engine::direct`).
//!
//! The board and the space's memfd are opened by the reader through
//! `/proc/<pid>/fd/<n>`, the userfaultfd with `pidfd_getfd` (allowed only
//! to processes that could trace the home), after an offer on the pair's
//! authenticated connection that names them and a random nonce written in
//! the board's header.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{fence, AtomicU64, Ordering};

use crate::config::PAGE_SIZE;

/// A board word's layout and the steps on it, as pure functions of the
/// word (the model checker runs them on plain integers).
pub mod word {
    /// Most co-located readers one home's board serves (one joiner bit and
    /// one member bit each).
    pub const MAX_READERS: usize = 24;
    const JOINERS: u64 = (1 << MAX_READERS) - 1;
    const MEMBERS_SHIFT: u32 = MAX_READERS as u32;
    const MEMBERS: u64 = JOINERS << MEMBERS_SHIFT;
    const READABLE: u64 = 1 << (2 * MAX_READERS);
    const WRITABLE: u64 = READABLE << 1;
    const VERSION_SHIFT: u32 = 2 * MAX_READERS as u32 + 2;
    /// The version's bits (the rest of the word).
    pub const VERSION: u64 = !0 << VERSION_SHIFT;

    /// The word that publishes a page again after `old`: readable, the next
    /// version, `members` (bits of the readers the home counts), no joiner;
    /// `writable`: the home's mapping of the page is writable (a reader
    /// write-protects it before it joins).
    pub fn published(old: u64, members: u64, writable: bool) -> u64 {
        let version = (old & VERSION).wrapping_add(1 << VERSION_SHIFT) & VERSION;
        let writable = if writable { WRITABLE } else { 0 };
        version | READABLE | writable | ((members << MEMBERS_SHIFT) & MEMBERS)
    }

    /// True when the publication is of a page the home holds writable.
    pub fn writable(word: u64) -> bool {
        word & WRITABLE != 0
    }

    /// True when `now` is the publication `seen` still (joiners aside).
    pub fn same_publication(now: u64, seen: u64) -> bool {
        let publication = VERSION | READABLE | WRITABLE;
        now & publication == seen & publication
    }

    /// The word's version.
    pub fn version(word: u64) -> u64 {
        word >> VERSION_SHIFT
    }

    /// The word with its version replaced by `version` (the model checker
    /// numbers versions afresh: only their equality matters).
    pub fn with_version(word: u64, version: u64) -> u64 {
        (word & !VERSION) | ((version << VERSION_SHIFT) & VERSION)
    }

    /// The word once retracted: the version only.
    pub fn retracted(word: u64) -> u64 {
        word & VERSION
    }

    /// The readers that joined, as bits.
    pub fn joiners(word: u64) -> u64 {
        word & JOINERS
    }

    /// True while the page may be read from the home's frame.
    pub fn readable(word: u64) -> bool {
        word & READABLE != 0
    }

    /// The word with reader `bit` joined, if it may join: the page is
    /// readable, the home does not count it already, and it has not joined
    /// this publication before (an eviction notice of that copy may be on
    /// its way: the home must count it once, before the notice).
    pub fn joined(word: u64, bit: usize) -> Option<u64> {
        let member = 1u64 << (MEMBERS_SHIFT as usize + bit);
        let joiner = 1u64 << bit;
        (bit < MAX_READERS && readable(word) && word & (member | joiner) == 0)
            .then_some(word | joiner)
    }

    /// True when `now` is still the publication the reader joined (`at`):
    /// its copy is current and it is counted as it joined.
    pub fn still(now: u64, at: u64) -> bool {
        readable(now) && same_publication(now, at)
    }
}

/// What can go wrong setting up a board or reading a peer's.
#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    /// The memfd or its mapping could not be made.
    #[error("creating the board of readable pages: {0}")]
    Create(String),
    /// A peer's board or space could not be opened or is not what it said.
    #[error("opening rank {rank}'s {what}: {detail}")]
    Open {
        /// The peer.
        rank: usize,
        /// Which of its files.
        what: &'static str,
        /// Why.
        detail: String,
    },
}

const MAGIC: u64 = u64::from_le_bytes(*b"DSMBOARD");
/// Header words: magic, nonce, pages, the time up to which the home's holds
/// are void (`OwnBoard::end_holds`); the page words start one page in,
/// then the pages' hold ends, then their counts of publications.
const HEADER_BYTES: usize = PAGE_SIZE;
const HOLDS_VOID_UNTIL: usize = 3;

/// A board's memory: a shared mapping of its memfd, the words after the
/// header.
struct Mapping {
    addr: usize,
    len: usize,
    pages: usize,
}

impl Mapping {
    /// The bytes of one array of a word per page, whole pages.
    fn array_bytes(pages: usize) -> Option<usize> {
        pages.div_ceil(PAGE_SIZE / 8).checked_mul(PAGE_SIZE)
    }

    /// The board's bytes for `pages` pages (`None`: beyond any size).
    fn bytes_for(pages: usize) -> Option<usize> {
        Self::array_bytes(pages)?
            .checked_mul(3)?
            .checked_add(HEADER_BYTES)
    }

    /// Its length is the board's size, which the creator set with
    /// `ftruncate` (checked by the opener).
    fn map(fd: &OwnedFd, pages: usize) -> Result<Mapping, nix::errno::Errno> {
        let len = Self::bytes_for(pages).ok_or(nix::errno::Errno::EOVERFLOW)?;
        let addr = crate::fault::map_shared_anywhere(fd, len)?;
        Ok(Mapping { addr, len, pages })
    }

    fn header(&self, index: usize) -> &AtomicU64 {
        debug_assert!(index <= HOLDS_VOID_UNTIL);
        // SAFETY: the header's first words, inside the live mapping, 8-byte
        // aligned (page aligned base); shared memory other processes write
        // only through atomics.
        unsafe { &*((self.addr + index * 8) as *const AtomicU64) }
    }

    /// The word of `page`, if the board covers it.
    fn word(&self, page: usize) -> Option<&AtomicU64> {
        self.array_word(0, page)
    }

    /// The end of the home's hold on `page` (`CLOCK_MONOTONIC` nanoseconds),
    /// if the board covers it.
    fn hold_end(&self, page: usize) -> Option<&AtomicU64> {
        self.array_word(1, page)
    }

    /// How many times `page` was published (never wraps).
    fn publications(&self, page: usize) -> Option<&AtomicU64> {
        self.array_word(2, page)
    }

    /// The word of `page` in the page array `array` (0: the words, 1: the
    /// hold ends, 2: the publication counts).
    fn array_word(&self, array: usize, page: usize) -> Option<&AtomicU64> {
        let start = HEADER_BYTES + array * Self::array_bytes(self.pages)?;
        (array < 3 && page < self.pages).then(|| {
            // SAFETY: inside the live mapping (`bytes_for` covers the three
            // arrays), 8-byte aligned; touched only through atomics.
            unsafe { &*((self.addr + start + page * 8) as *const AtomicU64) }
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Some(ptr) = std::ptr::NonNull::new(self.addr as *mut std::ffi::c_void) {
            // SAFETY: this mapping is ours; the references into it borrow
            // `self`, so none outlive it.
            let _ = unsafe { nix::sys::mman::munmap(ptr, self.len) };
        }
    }
}

/// A home's own board.
pub struct OwnBoard {
    memfd: OwnedFd,
    mapping: Mapping,
    nonce: u64,
}

impl OwnBoard {
    /// A board for a space of `pages` pages, nothing readable.
    pub fn create(pages: usize) -> Result<OwnBoard, BoardError> {
        let fail =
            |what: &str, e: &dyn std::fmt::Display| BoardError::Create(format!("{what}: {e}"));
        let memfd =
            nix::sys::memfd::memfd_create(c"dsm-board", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map_err(|e| fail("memfd_create", &e))?;
        let len = Mapping::bytes_for(pages).ok_or_else(|| fail("sizing it", &"too many pages"))?;
        nix::unistd::ftruncate(&memfd, len as i64).map_err(|e| fail("sizing it", &e))?;
        let mapping = Mapping::map(&memfd, pages).map_err(|e| fail("mapping it", &e))?;
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| fail("its nonce", &e))?;
        let nonce = u64::from_le_bytes(nonce);
        mapping.header(0).store(MAGIC, Ordering::Relaxed);
        mapping.header(1).store(nonce, Ordering::Relaxed);
        mapping.header(2).store(pages as u64, Ordering::Release);
        Ok(OwnBoard {
            memfd,
            mapping,
            nonce,
        })
    }

    /// The descriptor number a peer opens through `/proc`.
    pub fn fd_number(&self) -> i32 {
        self.memfd.as_raw_fd()
    }

    /// The nonce in the header, which the peer checks.
    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    /// Before a step of the protocol on `page`: nobody may read it from
    /// the frame any more; returns the bits of the readers that joined.
    pub fn retract(&self, page: usize) -> u64 {
        let joiners = self.mapping.word(page).map_or(0, |w| {
            word::joiners(w.fetch_and(word::VERSION, Ordering::SeqCst))
        });
        // Readers see the retraction before any change of the frame that
        // follows (a full fence on every architecture, not only x86).
        fence(Ordering::SeqCst);
        joiners
    }

    /// After a step: `page` may be read from the frame, by readers other
    /// than `members` (bits of the readers counted already). `hold_end`:
    /// the home holds the page writable, and its hold ends then
    /// (`monotonic_ns`). Call only while retracted (no joiner can be set
    /// then).
    pub fn publish(&self, page: usize, members: u64, hold_end: Option<u64>) {
        let m = &self.mapping;
        if let (Some(w), Some(hold), Some(count)) =
            (m.word(page), m.hold_end(page), m.publications(page))
        {
            let old = w.load(Ordering::Relaxed);
            debug_assert!(!word::readable(old), "published twice");
            if let Some(end) = hold_end {
                hold.store(end, Ordering::Relaxed);
            }
            // Before the word: a reader that sees this publication sees
            // its count (the word's store releases both).
            count.fetch_add(1, Ordering::Relaxed);
            w.store(
                word::published(old, members, hold_end.is_some()),
                Ordering::SeqCst,
            );
        }
    }

    /// The home's holds granted before `now` (`monotonic_ns`) are over (a
    /// barrier entry or an unlock: `Mrsw::end_holds`).
    pub fn end_holds(&self, now: u64) {
        self.mapping
            .header(HOLDS_VOID_UNTIL)
            .fetch_max(now, Ordering::Release);
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process of a host,
/// in which a home writes its holds' ends on its board.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// A co-located home's board and space, opened by a reader.
pub struct PeerFrames {
    board: Mapping,
    space: File,
    /// The home's userfaultfd, through which this rank write-protects a
    /// page the home holds writable (`None`: such pages are asked for).
    home_faults: Option<crate::fault::PeerFaults>,
    /// This rank's bit on that board.
    bit: usize,
}

/// What a reader saw of a page's word before joining (`PeerFrames::look`).
#[derive(Debug, Clone, Copy)]
pub struct Look {
    seen: u64,
    /// The page's count of publications when seen.
    before: u64,
}

impl Look {
    /// The home holds the page writable: this rank write-protects it in
    /// the home's mapping before it joins (`PeerFrames::protect`).
    pub fn needs_protection(&self) -> bool {
        word::writable(self.seen)
    }
}

/// What a home offers a co-located reader (sent over their connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// The home's process.
    pub pid: u32,
    /// Its space's memfd, as a descriptor number in that process.
    pub space_fd: i32,
    /// The inode of that memfd (checked once opened).
    pub space_inode: u64,
    /// Its board's memfd, as a descriptor number.
    pub board_fd: i32,
    /// The nonce in the board's header.
    pub nonce: u64,
    /// Pages the board covers.
    pub pages: u64,
    /// The reader's bit on the board.
    pub bit: u8,
    /// The home's userfaultfd, as a descriptor number.
    pub faults_fd: i32,
    /// Where the home maps its space.
    pub base: u64,
}

impl PeerFrames {
    /// Opens what rank `rank` offered.
    pub fn open(rank: usize, offer: &Offer) -> Result<PeerFrames, BoardError> {
        let fail = |what: &'static str, detail: String| BoardError::Open { rank, what, detail };
        // Non-blocking, and only a regular file (a memfd is one): if the
        // home's process is gone and its pid reused, the descriptor may be
        // anything, a FIFO whose open would block the engine.
        let open = |fd: i32, write: bool, what: &'static str| {
            use std::os::unix::fs::OpenOptionsExt;
            let path = format!("/proc/{}/fd/{fd}", offer.pid);
            let file = File::options()
                .read(true)
                .write(write)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(&path)
                .map_err(|e| fail(what, format!("{path}: {e}")))?;
            let meta = file
                .metadata()
                .map_err(|e| fail(what, format!("{path}: {e}")))?;
            if !meta.is_file() {
                return Err(fail(what, format!("{path} is not a memfd")));
            }
            Ok((file, meta))
        };
        // The home's process first: once its board checks out below, the
        // pid was the home's all along (a pid is reused only after its
        // process is gone, which makes the descriptor useless).
        let home_process = crate::fault::PeerFaults::process(offer.pid);
        if usize::from(offer.bit) >= word::MAX_READERS {
            return Err(fail(
                "board",
                format!("reader bit {} out of range", offer.bit),
            ));
        }
        let (board_file, meta) = open(offer.board_fd, true, "board")?;
        let size = meta.len();
        let pages = usize::try_from(offer.pages).map_err(|e| fail("board", e.to_string()))?;
        if Mapping::bytes_for(pages).is_none_or(|need| size < need as u64) {
            return Err(fail(
                "board",
                format!("{size} bytes, short for {pages} pages"),
            ));
        }
        let board = Mapping::map(&OwnedFd::from(board_file), pages)
            .map_err(|e| fail("board", format!("mapping it: {e}")))?;
        let (magic, nonce, covered) = (
            board.header(0).load(Ordering::Relaxed),
            board.header(1).load(Ordering::Relaxed),
            board.header(2).load(Ordering::Acquire),
        );
        if covered != offer.pages {
            return Err(fail(
                "board",
                format!("it covers {covered} pages, not the {} offered", offer.pages),
            ));
        }
        if magic != MAGIC || nonce != offer.nonce {
            return Err(fail(
                "board",
                "not the board offered (nonce differs)".into(),
            ));
        }
        let (space, meta) = open(offer.space_fd, false, "space")?;
        if meta.ino() != offer.space_inode {
            return Err(fail(
                "space",
                "not the memfd offered (inode differs)".into(),
            ));
        }
        // Without it, pages the home holds writable are asked for.
        let home_faults = home_process
            .and_then(|process| {
                crate::fault::PeerFaults::take(&process, offer.faults_fd, offer.base, pages)
            })
            .inspect_err(|e| {
                tracing::warn!(
                    "taking rank {rank}'s userfaultfd (pidfd_getfd): {e}: the pages it writes are asked for by message (a kernel with Yama ptrace_scope >= 1 refuses it between sibling processes)"
                )
            })
            .ok();
        Ok(PeerFrames {
            board,
            space,
            home_faults,
            bit: usize::from(offer.bit),
        })
    }

    /// Step 1 for one page: `look`, `protect` if it must be, `join_looked`.
    /// The word joined, for `finish` (the engine does these steps for a
    /// run of pages at once).
    #[cfg(test)]
    fn join(&self, page: usize, now: u64) -> Option<u64> {
        let look = self.look(page, now)?;
        if look.needs_protection() && !self.protect(page, 1) {
            return None;
        }
        self.join_looked(page, look)
    }

    /// Step 1a: whether this rank may join `page`'s readers: the home
    /// publishes it and does not count this rank already; for a page the
    /// home holds writable, its hold is over (at `now`, `monotonic_ns`)
    /// and this rank can write-protect it. What was seen, for the join.
    pub fn look(&self, page: usize, now: u64) -> Option<Look> {
        let seen = self.board.word(page)?.load(Ordering::SeqCst);
        let before = self.board.publications(page)?.load(Ordering::SeqCst);
        word::joined(seen, self.bit)?;
        if word::writable(seen) {
            let hold_end = self.board.hold_end(page)?.load(Ordering::Relaxed);
            let void = self.board.header(HOLDS_VOID_UNTIL).load(Ordering::Acquire);
            if hold_end > now.max(void) || self.home_faults.is_none() {
                return None;
            }
        }
        Some(Look { seen, before })
    }

    /// Step 1b, for the pages the home holds writable (`Look::
    /// needs_protection`): write-protects `count` pages from `first` in the
    /// home's mapping, one system call (one TLB shootdown) for them all.
    /// False if it could not (nothing to join then).
    pub fn protect(&self, first: usize, count: usize) -> bool {
        let covered = first
            .checked_add(count)
            .is_some_and(|end| end <= self.board.pages);
        covered
            && self
                .home_faults
                .as_ref()
                .is_some_and(|faults| faults.write_protect(first, count).is_ok())
    }

    /// Step 1c: joins `page`'s readers in the very publication `look` saw
    /// (protected since, if the home holds it writable); `None` if the home
    /// retracted or published it again meanwhile.
    pub fn join_looked(&self, page: usize, look: Look) -> Option<u64> {
        let w = self.board.word(page)?;
        let count = self.board.publications(page)?;
        let Look { seen, before } = look;
        let writable = word::writable(seen);
        if writable && count.load(Ordering::SeqCst) != before {
            // Published again since it was seen: the protection may have
            // been lifted before it landed.
            return None;
        }
        let mut current = seen;
        let joined = loop {
            if !word::same_publication(current, seen) {
                return None;
            }
            let joined = word::joined(current, self.bit)?;
            match w.compare_exchange_weak(current, joined, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => break joined,
                Err(now) => current = now,
            }
        };
        if writable && count.load(Ordering::SeqCst) != before {
            // Published again between the check above and the join (the
            // version wrapped around to the one seen). The bit taken back;
            // if the home counted it already, the check after the copy
            // fails, and the home protected its own mapping when it
            // counted it (it never relies on this protection).
            if self.withdraw(page) {
                return None;
            }
        }
        Some(joined)
    }

    /// Step 2: the bytes of the pages from `first` in the home's frames,
    /// as many as `out` holds (whole pages).
    pub fn copy(&self, first: usize, out: &mut [u8]) -> std::io::Result<()> {
        debug_assert_eq!(out.len() % PAGE_SIZE, 0);
        self.space.read_exact_at(out, (first * PAGE_SIZE) as u64)
    }

    /// Before this rank drops its copy of `page`: true when its joiner bit
    /// was still set (taken back now: the home never counted this rank,
    /// and hears nothing of the drop); false when the home counted it.
    pub fn withdraw(&self, page: usize) -> bool {
        let joiner = 1u64 << self.bit;
        self.board
            .word(page)
            .is_some_and(|w| w.fetch_and(!joiner, Ordering::SeqCst) & joiner != 0)
    }

    /// Step 3: true when the copy is current and this rank counted as a
    /// reader; false when the home retracted the page meanwhile (this rank
    /// is then counted all the same, and holds nothing).
    pub fn finish(&self, page: usize, joined: u64) -> bool {
        // The copy's loads come before the check's.
        fence(Ordering::SeqCst);
        self.board
            .word(page)
            .is_some_and(|w| word::still(w.load(Ordering::SeqCst), joined))
    }
}

/// The inode of a descriptor (a space's memfd, for an offer).
pub fn inode_of(fd: &impl AsFd) -> Option<u64> {
    nix::sys::stat::fstat(fd.as_fd()).ok().map(|s| s.st_ino)
}

#[cfg(test)]
mod tests {
    use super::word::*;
    use super::*;

    #[test]
    fn a_reader_joins_only_a_readable_page_it_is_not_counted_on() {
        let w = published(0, 0b10, false);
        assert!(readable(w));
        let joined = joined(w, 0).expect("readable, not a member");
        assert_eq!(joiners(joined), 1);
        assert!(super::word::joined(w, 1).is_none(), "a member never joins");
        assert!(super::word::joined(retracted(w), 0).is_none());
        assert!(still(joined, joined));
        assert!(
            super::word::joined(joined, 0).is_none(),
            "once a publication"
        );
    }

    #[test]
    fn a_retraction_or_a_new_publication_fails_the_check() {
        let w = published(0, 0, false);
        let joined = joined(w, 3).expect("joins");
        let retracted = retracted(joined);
        assert!(!still(retracted, joined));
        assert!(
            !still(published(retracted, 0, false), joined),
            "a new version"
        );
        assert_eq!(joiners(joined), 1 << 3);
    }

    #[test]
    fn versions_wrap_without_touching_the_other_fields() {
        let mut w = 0;
        for _ in 0..(1 << 16) {
            w = published(retracted(w), 0, false);
        }
        assert!(readable(w));
        assert_eq!(joiners(w), 0);
    }

    #[test]
    fn a_reader_opens_a_board_and_reads_what_the_home_publishes() {
        let pages = 10;
        let home = OwnBoard::create(pages).expect("board");
        let space = nix::sys::memfd::memfd_create(c"space", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
        nix::unistd::ftruncate(&space, (pages * PAGE_SIZE) as i64).expect("size");
        let file = File::from(space.try_clone().expect("dup"));
        file.write_all_at(&[7u8; PAGE_SIZE], (3 * PAGE_SIZE) as u64)
            .expect("write");
        let offer = Offer {
            pid: std::process::id(),
            space_fd: space.as_raw_fd(),
            space_inode: inode_of(&space).expect("inode"),
            board_fd: home.fd_number(),
            nonce: home.nonce(),
            pages: pages as u64,
            bit: 2,
            faults_fd: -1,
            base: 0,
        };
        let reader = PeerFrames::open(1, &offer).expect("opens");
        assert!(reader.join(3, 0).is_none(), "nothing published yet");
        home.publish(3, 0, None);
        let joined = reader.join(3, 0).expect("published");
        let mut page = [0u8; PAGE_SIZE];
        reader.copy(3, &mut page[..]).expect("copy");
        assert_eq!(page[0], 7);
        assert!(reader.finish(3, joined));
        assert!(reader.withdraw(3), "not counted yet: taken back");
        assert_eq!(home.retract(3), 0);
        home.publish(3, 0, None);
        let joined = reader.join(3, 0).expect("published again");
        assert_eq!(home.retract(3), 1 << 2, "the home counts the reader");
        assert!(!reader.withdraw(3), "counted: the drop is told");
        assert!(!reader.finish(3, joined));
        assert!(reader.join(99, 0).is_none(), "beyond the board");
        let wrong = Offer {
            nonce: offer.nonce ^ 1,
            ..offer
        };
        assert!(PeerFrames::open(1, &wrong).is_err());
    }
}
