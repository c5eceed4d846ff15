//! Round robin: in round k, rank k writes k into every page of the shared
//! space; after a barrier every rank reads every page and checks it. One
//! round per rank. Exits non-zero on the first wrong value.
//!
//! `roundrobin [STRIDE]`: with STRIDE > 1, first every rank fills the pages
//! it owns at start (so all ranks together touch the whole space) and every
//! rank checks every STRIDE-th page; then the rounds use every STRIDE-th page.

use std::sync::atomic::Ordering::Relaxed;

fn main() {
    if let Err(e) = run() {
        eprintln!("{}: {e}", env!("CARGO_BIN_NAME"));
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let dsm = dsm::init_from_env()?;
    let (rank, size) = (dsm.rank(), dsm.size());
    let words = dsm.words();
    let per_page = dsm.page_size() / 8;
    let pages = words.len() / per_page;
    // Two words per page: its first and its last, each with a distinct value.
    let value = |round: usize, page: usize, last: bool| {
        ((round as u64) << 40) | ((page as u64) << 1) | last as u64
    };
    let stride: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1)
        .max(1);
    if stride > 1 {
        const FILL: usize = 1 << 20;
        for page in (rank..pages).step_by(size) {
            words[page * per_page].store(value(FILL, page, false), Relaxed);
        }
        dsm.barrier()?;
        for page in (0..pages).step_by(stride) {
            let got = words[page * per_page].load(Relaxed);
            if got != value(FILL, page, false) {
                return Err(
                    format!("rank {rank}: after the fill, page {page} holds {got:#x}").into(),
                );
            }
        }
        dsm.barrier()?;
    }
    for round in 0..size {
        if rank == round {
            for page in (0..pages).step_by(stride) {
                words[page * per_page].store(value(round, page, false), Relaxed);
                words[page * per_page + per_page - 1].store(value(round, page, true), Relaxed);
            }
        }
        dsm.barrier()?;
        for page in (0..pages).step_by(stride) {
            for (index, last) in [
                (page * per_page, false),
                (page * per_page + per_page - 1, true),
            ] {
                let got = words[index].load(Relaxed);
                if got != value(round, page, last) {
                    return Err(format!(
                        "rank {rank}, round {round}: page {page} holds {got:#x}, expected {:#x}",
                        value(round, page, last)
                    )
                    .into());
                }
            }
        }
        dsm.barrier()?;
    }
    let stats = dsm.finalize()?;
    println!(
        "rank {rank}: {size} rounds over {pages} pages verified ({} pages received)",
        stats.pages_received
    );
    Ok(())
}
