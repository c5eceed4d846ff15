//! Test helper for DSM start-up errors, run through dsmexec:
//! `dsmprobe occupied` maps something at the shared space's address first,
//! then joins the job (which must refuse to map over it);
//! `dsmprobe join` just joins and finalizes.

use std::num::NonZeroUsize;

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let config = dsm::Config::from_env().unwrap_or_else(|e| {
        eprintln!("dsmprobe: {e}");
        std::process::exit(1)
    });
    if mode == "occupied" {
        use nix::sys::mman::{MapFlags, ProtFlags};
        // SAFETY: a fresh anonymous mapping at an address nothing else uses yet.
        let taken = unsafe {
            nix::sys::mman::mmap_anonymous(
                NonZeroUsize::new(config.base),
                NonZeroUsize::new(4096).unwrap(),
                ProtFlags::PROT_READ,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_FIXED_NOREPLACE,
            )
        };
        taken.expect("occupy the shared space's address");
    }
    match dsm::init(config).and_then(|d| d.finalize()) {
        Ok(_) => println!("joined and finalized"),
        Err(e) => {
            eprintln!("dsmprobe: {e}");
            std::process::exit(1)
        }
    }
}
