//! Test helper for DSM start-up errors, run through dsmexec:
//! `dsmprobe occupied` maps something at the shared space's address first,
//! then joins the job (which must refuse to map over it);
//! `dsmprobe join` just joins and finalizes;
//! `dsmprobe alloc BYTES` joins, and rank 0 allocates a segment of BYTES
//! homed at the last rank;
//! `dsmprobe affinity` joins, then prints `rank R cpus A / B`: the CPUs
//! the joining thread (A) and a thread started after it (B) may run on.

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
    let bytes: Option<usize> = (mode == "alloc")
        .then(|| std::env::args().nth(2)?.parse().ok())
        .flatten();
    let run = |d: dsm::Dsm| {
        if mode == "affinity" {
            let cpus = || {
                let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
                    .expect("sched_getaffinity");
                (0..nix::sched::CpuSet::count())
                    .filter(|c| set.is_set(*c).unwrap_or(false))
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let later = std::thread::spawn(cpus)
                .join()
                .expect("a thread started later");
            println!("rank {} cpus {} / {later}", d.rank(), cpus());
        }
        if let (Some(bytes), 0) = (bytes, d.rank()) {
            let home = d.size() - 1;
            d.alloc(bytes, dsm::Placement::Localized(home))?;
        }
        d.finalize()
    };
    match dsm::init(config).and_then(run) {
        Ok(_) => println!("joined and finalized"),
        Err(e) => {
            eprintln!("dsmprobe: {e}");
            std::process::exit(1)
        }
    }
}
