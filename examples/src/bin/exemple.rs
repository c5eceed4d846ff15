//! The seed's example in Rust: every rank prints the base of the shared
//! space; rank 0 writes a value in page 0 (which it owns at start) and
//! rank 1 reads it through a page fault.

use std::sync::atomic::Ordering::Relaxed;

fn main() {
    if let Err(e) = run() {
        eprintln!("{}: {e}", env!("CARGO_BIN_NAME"));
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let dsm = dsm::init_from_env()?;
    let rank = dsm.rank();
    println!(
        "[{rank}] base address of the shared space: {:p}",
        dsm.base()
    );
    let value = &dsm.words()[0]; // page 0
    if rank == 0 {
        value.store(4242, Relaxed);
    }
    dsm.barrier()?;
    let mut ok = true;
    if rank == 1 {
        let read = value.load(Relaxed);
        println!("[{rank}] read {read} from page 0");
        ok = read == 4242;
    }
    dsm.finalize()?;
    if !ok {
        return Err("rank 1 did not read the value rank 0 wrote".into());
    }
    Ok(())
}
