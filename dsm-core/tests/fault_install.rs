//! Installing runs of pages with userfaultfd (no DSM, no network): every
//! page of a read-only run holds its bytes and is write-protected, every
//! page of a run of zeros (a first touch) reads zeros and is writable, and
//! a page already present is left as it was.

// A test reports failure by panicking: unwrap is its assertion.
#![allow(clippy::unwrap_used)]

use dsm_core::fault::{Backing, FaultHandler, Region};
use dsm_core::PAGE_SIZE;

/// Free on x86-64 Linux processes in practice; `Region::map` refuses an
/// occupied range rather than replacing it.
const BASE: usize = 0x2a00_0000_0000;

/// The pagemap flags of the page at `addr`: (present, userfaultfd
/// write-protected).
fn pagemap_flags(addr: usize) -> (bool, bool) {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open("/proc/self/pagemap").expect("opening pagemap");
    f.seek(SeekFrom::Start((addr / PAGE_SIZE * 8) as u64))
        .expect("seeking pagemap");
    let mut entry = [0u8; 8];
    f.read_exact(&mut entry).expect("reading pagemap");
    let entry = u64::from_le_bytes(entry);
    (entry >> 63 & 1 == 1, entry >> 57 & 1 == 1)
}

#[test]
fn a_run_of_read_only_pages_is_mapped_around_a_page_already_present() {
    const PAGES: usize = 6;
    let region = Region::map(BASE, PAGES * PAGE_SIZE, Backing::Anonymous).expect("mapping");
    let faults = FaultHandler::register(&region, dsm_core::FaultDelivery::Events)
        .expect("registering userfaultfd");
    let page_of = |byte: u8| Box::new([byte; PAGE_SIZE]);
    // Page 3 is there first (a stale install the run must not overwrite).
    faults
        .install(3, &page_of(0xee))
        .expect("installing page 3");
    // A run over pages 1..=4: bytes 1, 2, 3, 4.
    let run: Vec<u8> = (1..=4u8).flat_map(|b| [b; PAGE_SIZE]).collect();
    faults
        .install_readonly_run(1, &run)
        .expect("installing the run");
    let bytes = region.bytes();
    for (page, want, write_protected) in
        [(1, 1u8, true), (2, 2, true), (3, 0xee, false), (4, 4, true)]
    {
        let addr = region.page_addr(page);
        let (present, wp) = pagemap_flags(addr);
        assert!(present, "page {page} is not present");
        assert_eq!(wp, write_protected, "page {page}'s write protection");
        let got =
            bytes[page * PAGE_SIZE + PAGE_SIZE / 2].load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(got, want, "page {page}'s bytes");
    }
    for page in [0, 5] {
        assert!(
            !pagemap_flags(region.page_addr(page)).0,
            "page {page} was mapped"
        );
    }
}

/// Whether the memfd frame behind the alias page at `addr` exists.
fn resident(addr: usize) -> bool {
    let mut vec = [0u8; 1];
    // SAFETY: `addr` is a page-aligned address of a live mapping and `vec`
    // holds the one byte mincore writes for one page.
    let rc = unsafe { libc::mincore(addr as *mut _, PAGE_SIZE, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec[0] & 1 == 1
}

#[test]
fn a_memfd_keeps_dropped_pages_up_to_its_limit_then_releases_them() {
    const PAGES: usize = 8;
    if let Err(e) = dsm_core::fault::memfd_supported() {
        eprintln!("skipped: {e}");
        return;
    }
    let region =
        Region::map(BASE + (64 << 20), PAGES * PAGE_SIZE, Backing::Memfd).expect("mapping");
    let faults = FaultHandler::register(&region, dsm_core::FaultDelivery::Events)
        .expect("registering userfaultfd")
        .retaining(3);
    let alias = region.alias().expect("a memfd has an alias");
    let run: Vec<u8> = (1..=5u8).flat_map(|b| [b; PAGE_SIZE]).collect();
    faults
        .install_readonly_run(0, &run)
        .expect("installing 0..5");
    faults.drop_run(0, 2).expect("dropping 0..2");
    assert_eq!(faults.retained_pages(), 2);
    assert!(resident(alias) && resident(alias + PAGE_SIZE), "kept");
    // Installed again: no longer counted as dropped.
    faults
        .install_readonly_run(1, &[9u8; PAGE_SIZE])
        .expect("installing 1 again");
    assert_eq!(faults.retained_pages(), 1);
    // 0, 2, 3, 4 dropped: past the limit of 3, every dropped frame goes.
    faults.drop_run(2, 3).expect("dropping 2..5");
    assert_eq!(faults.retained_pages(), 0);
    for page in [0, 2, 3, 4] {
        assert!(!resident(alias + page * PAGE_SIZE), "page {page} released");
    }
    assert!(resident(alias + PAGE_SIZE), "page 1, mapped, is kept");
    let bytes = region.bytes();
    let byte = |page: usize| bytes[page * PAGE_SIZE].load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(byte(1), 9, "the mapped page's bytes are intact");
    // A released page is installed again like a new one.
    faults
        .install_readonly_run(3, &[7u8; PAGE_SIZE])
        .expect("installing 3 again");
    assert_eq!(byte(3), 7);
}

#[test]
fn a_run_of_zero_pages_is_mapped_writable_around_a_page_already_present() {
    const PAGES: usize = 6;
    let region =
        Region::map(BASE + (128 << 20), PAGES * PAGE_SIZE, Backing::Anonymous).expect("mapping");
    let faults = FaultHandler::register(&region, dsm_core::FaultDelivery::Events)
        .expect("registering userfaultfd");
    // Page 3 is there first (a stale install the run must not overwrite).
    faults
        .install(3, &Box::new([0xee; PAGE_SIZE]))
        .expect("installing page 3");
    faults.install_zero_run(1, 4).expect("installing 1..5");
    let bytes = region.bytes();
    for (page, want) in [(1, 0u8), (2, 0), (3, 0xee), (4, 0)] {
        let (present, wp) = pagemap_flags(region.page_addr(page));
        assert!(
            present && !wp,
            "page {page}: present {present}, write-protected {wp}"
        );
        let byte = &bytes[page * PAGE_SIZE + PAGE_SIZE / 2];
        assert_eq!(byte.load(std::sync::atomic::Ordering::Relaxed), want);
        byte.store(7, std::sync::atomic::Ordering::Relaxed);
    }
    for page in [0, 5] {
        assert!(
            !pagemap_flags(region.page_addr(page)).0,
            "page {page} was mapped"
        );
    }
}

#[test]
fn a_memfd_run_of_zero_pages_zeroes_a_frame_kept_from_before() {
    const PAGES: usize = 6;
    if let Err(e) = dsm_core::fault::memfd_supported() {
        eprintln!("skipped: {e}");
        return;
    }
    let region =
        Region::map(BASE + (192 << 20), PAGES * PAGE_SIZE, Backing::Memfd).expect("mapping");
    let faults = FaultHandler::register(&region, dsm_core::FaultDelivery::Events)
        .expect("registering userfaultfd");
    let alias = region.alias().expect("a memfd has an alias");
    // Page 2 held bytes, then was dropped: its frame keeps them.
    faults
        .install_readonly_run(2, &[0x55; PAGE_SIZE])
        .expect("installing page 2");
    faults.drop_page(2).expect("dropping page 2");
    assert!(resident(alias + 2 * PAGE_SIZE), "page 2's frame is kept");
    // Page 1 gets a frame behind the tracking's back (written through
    // the alias): the run must still map it, zeroed.
    // SAFETY: page 1 of the alias mapping, which nothing else references;
    // the space does not map it.
    unsafe { std::ptr::write_bytes((alias + PAGE_SIZE) as *mut u8, 0x66, PAGE_SIZE) };
    // A run over pages without a frame (UFFDIO_ZEROPAGE), page 1 and
    // page 2 (their frames zeroed and mapped).
    faults.install_zero_run(0, 4).expect("installing 0..4");
    let bytes = region.bytes();
    for page in 0..4 {
        let (present, wp) = pagemap_flags(region.page_addr(page));
        assert!(
            present && !wp,
            "page {page}: present {present}, write-protected {wp}"
        );
        let byte = &bytes[page * PAGE_SIZE + PAGE_SIZE / 2];
        assert_eq!(
            byte.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "page {page}"
        );
        byte.store(7, std::sync::atomic::Ordering::Relaxed);
        assert!(
            resident(alias + page * PAGE_SIZE),
            "page {page} has a frame"
        );
    }
    for page in [4, 5] {
        assert!(
            !pagemap_flags(region.page_addr(page)).0,
            "page {page} was mapped"
        );
    }
}
