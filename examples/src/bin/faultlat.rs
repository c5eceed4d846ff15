//! Remote read fault latency, measured by the application: rank 1 fills a
//! replicated segment of PAGES pages and seals it (its home copy is then
//! current: a read is exactly one request and one 4 KiB grant); rank 0
//! touches each page once and reports the mean and median time per fault, beside the
//! mean time of an empty barrier (two messages through rank 0's engine) in
//! the same run. `faultlat [PAGES]` (default 2000), exactly 2 ranks.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use dsm::Placement;

fn main() {
    if let Err(e) = run() {
        eprintln!("{}: {e}", env!("CARGO_BIN_NAME"));
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let pages: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2000);
    let dsm = dsm::init_from_env()?;
    if dsm.size() != 2 {
        return Err("faultlat needs exactly 2 ranks".into());
    }
    let words = dsm.words();
    let per_page = dsm.page_size() / 8;
    if dsm.rank() == 1 {
        let seg = dsm.alloc(pages * dsm.page_size(), Placement::Replicated)?;
        for (p, page) in dsm.segment_words(&seg).chunks(per_page).enumerate() {
            page[0].store(p as u64 + 1, Relaxed);
        }
        dsm.seal(&seg)?;
        words[0].store(seg.addr() as u64, Relaxed);
    }
    dsm.barrier()?;
    let start_word = (words[0].load(Relaxed) as usize - dsm.base() as usize) / 8;
    let mut line = None;
    if dsm.rank() == 0 {
        // Warm the segment registration with the first page.
        let _ = words[start_word].load(Relaxed);
        let mut each = Vec::with_capacity(pages);
        let t = Instant::now();
        for p in 1..pages {
            let one = Instant::now();
            let v = words[start_word + p * per_page].load(Relaxed);
            each.push(one.elapsed());
            if v != p as u64 + 1 {
                return Err(format!("page {p} holds {v}").into());
            }
        }
        let fault = t.elapsed().as_secs_f64() * 1e6 / (pages - 1) as f64;
        each.sort();
        let median = each
            .get(each.len() / 2)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6);
        line = Some((fault, median));
    }
    dsm.barrier()?;
    let t = Instant::now();
    const BARRIERS: usize = 500;
    for _ in 0..BARRIERS {
        dsm.barrier()?;
    }
    let barrier = t.elapsed().as_secs_f64() * 1e6 / BARRIERS as f64;
    let stats = dsm.finalize()?;
    if let Some((fault, median)) = line {
        println!(
            "remote read fault {fault:.1} us/page, median {median:.1} us ({} faults, {} read directly from the home's memory, engine p50 {:.1} us over those asked by message); empty barrier {barrier:.1} us; ratio {:.2}",
            pages - 1,
            stats.direct_reads,
            stats.fault_latency_p50.as_secs_f64() * 1e6,
            fault / barrier
        );
    }
    Ok(())
}
