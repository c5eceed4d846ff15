//! More data than one rank's cache holds: every rank writes the pages it is
//! home of among the first TOTAL bytes of the space (the seed's round-robin
//! layout: page i at rank i mod N), then one rank (the last) reads all of
//! them in order and checks every word of every page; its cache
//! (`DSM_CACHE_SIZE`) evicts what it read to make room for what comes.
//!
//! `bigspace TOTAL [PASSES]` (TOTAL: bytes, or with a unit K M G). Prints
//! one line per rank: pages checked, the read's throughput, the reader's
//! peak resident memory and eviction counts.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

fn main() {
    if let Err(e) = run() {
        eprintln!("{}: {e}", env!("CARGO_BIN_NAME"));
        std::process::exit(1);
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn parse_bytes(text: &str) -> Option<usize> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let factor = match unit.to_ascii_uppercase().as_str() {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    digits.parse::<usize>().ok()?.checked_mul(factor)
}

/// The value every word of `page` holds: its index, mixed so that a page
/// holding another page's bytes (or zeros) cannot pass.
fn word_of(page: usize, word: usize) -> u64 {
    ((page as u64) << 20 | word as u64) ^ 0x9E37_79B9_7F4A_7C15
}

/// The process's peak resident memory, from /proc/self/status (VmHWM).
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib << 10)
        })
        .unwrap_or(0)
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let total = args
        .first()
        .and_then(|a| parse_bytes(a))
        .ok_or("usage: bigspace TOTAL [PASSES] (TOTAL such as 256M or 6G)")?;
    let passes: usize = args.get(1).map(|p| p.parse()).transpose()?.unwrap_or(1);
    let dsm = dsm::init_from_env()?;
    let (rank, size) = (dsm.rank(), dsm.size());
    let per_page = dsm.page_size() / 8;
    let pages = total / dsm.page_size();
    // The lower half is the seed's fixed space, homed round-robin.
    if pages > dsm.len() / dsm.page_size() / 2 {
        return Err(format!(
            "{total} bytes do not fit the space's lower half ({} bytes): raise DSM_SPACE_SIZE",
            dsm.len() / 2
        )
        .into());
    }
    let words = dsm.words();
    for page in (rank..pages).step_by(size) {
        for (w, word) in words[page * per_page..(page + 1) * per_page]
            .iter()
            .enumerate()
        {
            word.store(word_of(page, w), Relaxed);
        }
    }
    let written_rss = peak_rss_bytes();
    dsm.barrier()?;
    let reader = size - 1;
    let mut summary = format!(
        "bigspace: rank {rank} wrote {} pages it is home of (peak RSS {} MiB)",
        (rank..pages).step_by(size).count(),
        written_rss >> 20
    );
    if rank == reader {
        let started = Instant::now();
        for _ in 0..passes {
            for page in 0..pages {
                let got = &words[page * per_page..(page + 1) * per_page];
                for (w, word) in got.iter().enumerate() {
                    let v = word.load(Relaxed);
                    if v != word_of(page, w) {
                        return Err(format!(
                            "page {page} word {w} holds {v:#x}, expected {:#x}",
                            word_of(page, w)
                        )
                        .into());
                    }
                }
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let stats = dsm.stats();
        summary = format!(
            "bigspace exact: rank {rank} checked {pages} pages x {passes} ({} MiB each pass) at {:.0} MB/s; peak RSS {} MiB; evictions clean {} written back {}; peak cached {} MiB",
            total >> 20,
            (total * passes) as f64 / seconds / 1e6,
            peak_rss_bytes() >> 20,
            stats.evictions_clean,
            stats.evictions_written_back,
            stats.peak_cached_bytes >> 20
        );
    }
    dsm.barrier()?;
    println!("{summary}");
    dsm.finalize()?;
    Ok(())
}
