//! Installing runs of read-only pages with userfaultfd (no DSM, no
//! network): every page of the run holds its bytes and is write-protected,
//! and a page already present is left as it was.

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
