//! Segments and placement, run through dsmexec (at least 3 ranks):
//!
//! * `segments placement`: rank 0 allocates a segment localized at rank 1,
//!   a replicated one (sealed), a private one and a distributed one holding
//!   a linked list; it publishes their addresses in the shared space and
//!   every rank checks the contents. Statistics prove the placement: every
//!   page of the localized segment was granted by rank 1, and reading the
//!   sealed segment again causes no traffic at all.
//! * `segments sealed-write`: rank 1 stores to a sealed segment and must be
//!   stopped with an error naming it.
//! * `segments file PATH`: rank 0 maps PATH as a file segment; every rank
//!   checks its bytes, the last rank changes one word, rank 0 syncs the file.
//! * `segments locks THREADS N`: every thread increments one counter N times
//!   under distributed lock 7, with a plain load and store.
//! * `segments collective`: every rank calls `coalloc` twice (a distributed
//!   segment and one localized at the last rank) and gets the same segments;
//!   each rank writes its share of the words, and every rank's sum over all
//!   of them is exact (with `alloc` on every rank, each would sum only its
//!   own segment).
//! * `segments collective-mismatch`: rank 1 asks for a different size: the
//!   job ends with an error naming both calls.
//! * `segments free ROUNDS`: ROUNDS times, every rank allocates three
//!   segments collectively (distributed, localized at the last rank,
//!   private), checks they read as zeros everywhere (nothing of a freed
//!   segment shows), writes its share, checks every rank's values, dirties
//!   pages of others' shares, and frees the three. More rounds than the
//!   heap holds without freeing. Then rank 1 allocates a segment of its
//!   own, the others find it by address (`segment_at`) and all free it; a
//!   second free and a bad address are errors.
//! * `segments free-mismatch`: rank 1 frees two segments in the other
//!   order: the job ends with an error naming both.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use dsm::{Dsm, Placement};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() {
    if let Err(e) = run() {
        eprintln!("{}: {e}", env!("CARGO_BIN_NAME"));
        std::process::exit(1);
    }
}

/// Word `i` of the raw (non-heap) shared space: where rank 0 publishes addresses.
fn raw(dsm: &Dsm, i: usize) -> &AtomicU64 {
    &dsm.words()[i]
}

/// The 64-bit word at an address published by another rank.
fn word_at(dsm: &Dsm, addr: u64) -> &AtomicU64 {
    &dsm.words()[(addr as usize - dsm.base() as usize) / 8]
}

/// `collective`: two collective segments, each rank writing every
/// size-th word from its rank on, every rank summing all of them.
fn collective(dsm: &Dsm) -> Result<String> {
    let (rank, size) = (dsm.rank(), dsm.size());
    const WORDS: usize = 3 * 512 + 17; // over several pages, not a whole number of them
    let spread = dsm.coalloc(WORDS * 8, Placement::Distributed)?;
    let at_last = dsm.coalloc(WORDS * 8, Placement::Localized(size - 1))?;
    // The same segments everywhere: rank 0 publishes its addresses.
    if rank == 0 {
        raw(dsm, 8).store(spread.addr() as u64, Relaxed);
        raw(dsm, 9).store(at_last.addr() as u64, Relaxed);
    }
    dsm.barrier()?;
    check(
        raw(dsm, 8).load(Relaxed) == spread.addr() as u64
            && raw(dsm, 9).load(Relaxed) == at_last.addr() as u64,
        || format!("rank {rank} got other segments than rank 0"),
    )?;
    for segment in [&spread, &at_last] {
        let words = &dsm.segment_words(segment)[..WORDS];
        for (i, word) in words.iter().enumerate().skip(rank).step_by(size) {
            word.store(i as u64 + 1, Relaxed);
        }
    }
    dsm.barrier()?;
    let expected = (WORDS * (WORDS + 1) / 2) as u64;
    for segment in [&spread, &at_last] {
        let sum: u64 = dsm.segment_words(segment)[..WORDS]
            .iter()
            .map(|w| w.load(Relaxed))
            .sum();
        check(sum == expected, || {
            format!(
                "rank {rank}: sum {sum} over segment {}, expected {expected}",
                segment.id()
            )
        })?;
    }
    dsm.barrier()?;
    Ok(format!(
        "collective segments verified: same addresses on every rank, sums exact ({expected})"
    ))
}

/// `free`: allocate, use and free collective segments ROUNDS times, then
/// free a segment of one rank's own found by address.
fn free_rounds(dsm: &Dsm, rounds: usize) -> Result<String> {
    let (rank, size) = (dsm.rank(), dsm.size());
    const WORDS: usize = 16 * 512; // 16 pages
    let value = |round: usize, i: usize| (round * WORDS + i) as u64 + 1;
    let mut addresses = std::collections::BTreeSet::new();
    for round in 0..rounds {
        let spread = dsm.coalloc(WORDS * 8, Placement::Distributed)?;
        let local = dsm.coalloc(WORDS * 8, Placement::Localized(size - 1))?;
        let private = dsm.coalloc(WORDS * 8, Placement::Private)?;
        addresses.extend([spread.addr() as usize, local.addr() as usize]);
        for segment in [&spread, &local, &private] {
            let words = dsm.segment_words(segment);
            if let Some((i, w)) = words.iter().enumerate().find(|(_, w)| w.load(Relaxed) != 0) {
                return Err(format!(
                    "round {round}: word {i} of a new {} segment reads {} at rank {rank}: left from a freed segment",
                    segment.kind_name(),
                    w.load(Relaxed)
                )
                .into());
            }
        }
        dsm.barrier()?; // every rank saw zeros before anyone writes
        for segment in [&spread, &local] {
            let words = dsm.segment_words(segment);
            for (i, word) in words.iter().enumerate().skip(rank).step_by(size) {
                word.store(value(round, i), Relaxed);
            }
        }
        for word in dsm.segment_words(&private) {
            word.store((rank * 1000 + round) as u64, Relaxed);
        }
        dsm.barrier()?;
        for segment in [&spread, &local] {
            let words = dsm.segment_words(segment);
            if let Some(i) = (0..WORDS).find(|i| words[*i].load(Relaxed) != value(round, *i)) {
                return Err(format!(
                    "round {round}: word {i} of the {} segment reads {} at rank {rank}, expected {}",
                    segment.kind_name(),
                    words[i].load(Relaxed),
                    value(round, i)
                )
                .into());
            }
        }
        check(
            dsm.segment_words(&private)
                .iter()
                .all(|w| w.load(Relaxed) == (rank * 1000 + round) as u64),
            || format!("round {round}: rank {rank}'s private segment changed"),
        )?;
        dsm.barrier()?; // every rank checked before anyone dirties
                        // Writable copies of pages homed elsewhere are held as the free
                        // begins: their bytes go home, then everything goes.
        for segment in [&spread, &local] {
            let page = (rank + round) % 16;
            dsm.segment_words(segment)[page * 512 + 7].store(u64::MAX, Relaxed);
        }
        dsm.free(spread)?;
        dsm.free(local)?;
        dsm.free(private)?;
    }
    // A segment of rank 1's own, handed to the others by its address.
    if rank == 1 {
        let own = dsm.alloc(3 * 4096, Placement::Localized(0))?;
        dsm.segment_words(&own)[5].store(55, Relaxed);
        raw(dsm, 12).store(own.addr() as u64, Relaxed);
    }
    dsm.barrier()?;
    let addr = raw(dsm, 12).load(Relaxed) as *const u8;
    let found = dsm.segment_at(addr)?;
    check(
        std::ptr::eq(found.addr(), addr) && found.len() == 3 * 4096,
        || format!("segment_at({addr:?}) found {:?}", found.addr()),
    )?;
    check(dsm.segment_words(&found)[5].load(Relaxed) == 55, || {
        "the handed-over segment's word 5 is not 55".into()
    })?;
    let inside = addr.wrapping_add(4096);
    let Err(not_a_segment) = dsm.segment_at(inside) else {
        return Err(format!("segment_at({inside:?}), inside a segment, succeeded").into());
    };
    dsm.free(found)?;
    let Err(twice) = dsm.free(found) else {
        return Err("a second free of a segment succeeded".into());
    };
    dsm.barrier()?;
    Ok(format!(
        "free verified: {rounds} rounds in {} distinct places, new segments all zeros, values exact; segment_at found rank 1's segment; errors: \"{not_a_segment}\"; \"{twice}\"",
        addresses.len()
    ))
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(what().into())
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("placement");
    let dsm = dsm::init_from_env()?;
    let (rank, size) = (dsm.rank(), dsm.size());
    let per_page = dsm.page_size() / 8;
    let message = match mode {
        "placement" => placement(&dsm)?,
        "sealed-write" => {
            if rank == 0 {
                let seg = dsm.alloc(4096, Placement::Replicated)?;
                dsm.segment_words(&seg)[0].store(1, Relaxed);
                dsm.seal(&seg)?;
                raw(&dsm, 2).store(seg.addr() as u64, Relaxed);
            }
            dsm.barrier()?;
            let addr = raw(&dsm, 2).load(Relaxed);
            if rank == 1 {
                word_at(&dsm, addr).store(2, Relaxed); // must not return
                return Err("a store to a sealed segment was allowed".into());
            }
            dsm.barrier()?;
            "unreachable".to_string()
        }
        "collective" => collective(&dsm)?,
        "free" => {
            let rounds = args.get(1).map_or(Ok(20), |r| r.parse())?;
            free_rounds(&dsm, rounds)?
        }
        "free-mismatch" => {
            let first = dsm.coalloc(4096, Placement::Distributed)?;
            let second = dsm.coalloc(4096, Placement::Distributed)?;
            let (a, b) = if rank == 1 {
                (second, first)
            } else {
                (first, second)
            };
            dsm.free(a)?; // the job ends here
            dsm.free(b)?;
            "unreachable".to_string()
        }
        "collective-mismatch" => {
            let bytes = if rank == 1 { 2 * 4096 } else { 4096 };
            dsm.coalloc(bytes, Placement::Distributed)?; // rank 0 ends the job
            dsm.barrier()?;
            "unreachable".to_string()
        }
        "file" => {
            let path = PathBuf::from(args.get(1).ok_or("usage: segments file PATH")?);
            if rank == 0 {
                let seg = dsm.alloc(0, Placement::File(path.clone()))?;
                raw(&dsm, 5).store(seg.addr() as u64, Relaxed);
                raw(&dsm, 6).store(seg.len() as u64, Relaxed);
                dsm.barrier()?; // addresses published
                dsm.barrier()?; // every rank checked the contents
                dsm.barrier()?; // the last rank changed a word
                dsm.sync(&seg, &path)?;
            } else {
                dsm.barrier()?;
                let (addr, len) = (
                    raw(&dsm, 5).load(Relaxed),
                    raw(&dsm, 6).load(Relaxed) as usize,
                );
                let start = (addr as usize - dsm.base() as usize) / 8;
                let words = &dsm.words()[start..start + len.div_ceil(8)];
                for (i, w) in words.iter().enumerate().take(len / 8) {
                    let expected =
                        u64::from_le_bytes(std::array::from_fn(|b| file_byte(i * 8 + b)));
                    let got = w.load(Relaxed);
                    check(got == expected, || {
                        format!("file word {i} is {got:#x}, expected {expected:#x}")
                    })?;
                }
                dsm.barrier()?;
                if rank == size - 1 {
                    words[per_page].store(0xD5_D5_D5_D5, Relaxed); // first word of the second page
                }
                dsm.barrier()?;
            }
            dsm.barrier()?;
            format!(
                "file contents verified{}",
                if rank == 0 { ", synced" } else { "" }
            )
        }
        "locks" => {
            let threads: u64 = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(4);
            let n: u64 = args.get(2).map(|a| a.parse()).transpose()?.unwrap_or(1000);
            let counter = raw(&dsm, 16);
            std::thread::scope(|s| -> Result<()> {
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        s.spawn(|| -> std::result::Result<(), dsm::DsmError> {
                            for _ in 0..n {
                                let _held = dsm.lock(7)?;
                                counter.store(counter.load(Relaxed) + 1, Relaxed);
                            }
                            Ok(())
                        })
                    })
                    .collect();
                for h in handles {
                    h.join().map_err(|_| "a thread panicked")??;
                }
                Ok(())
            })?;
            dsm.barrier()?;
            let (got, want) = (counter.load(Relaxed), size as u64 * threads * n);
            check(got == want, || format!("counter is {got}, expected {want}"))?;
            format!("locks exact: {got} increments")
        }
        other => return Err(format!("unknown mode {other}").into()),
    };
    let stats = dsm.finalize()?;
    println!(
        "rank {rank}: {message} ({} grants served)",
        stats.grants_served
    );
    Ok(())
}

/// The byte pattern of the test file.
pub fn file_byte(i: usize) -> u8 {
    (i.wrapping_mul(7) % 251) as u8
}

fn placement(dsm: &Dsm) -> Result<String> {
    let (rank, size) = (dsm.rank(), dsm.size());
    check(size >= 3, || "placement needs at least 3 ranks".into())?;
    let per_page = dsm.page_size() / 8;
    const LOCAL_PAGES: usize = 8;
    const REPLICATED_PAGES: usize = 4;
    const NODES: u64 = 200;
    if rank == 0 {
        // Localized at rank 1.
        let local = dsm.alloc(LOCAL_PAGES * 4096, Placement::Localized(1))?;
        for (p, chunk) in dsm.segment_words(&local).chunks(per_page).enumerate() {
            chunk[0].store(1000 + p as u64, Relaxed);
        }
        raw(dsm, 1).store(local.addr() as u64, Relaxed);
        // Replicated, written then sealed.
        let rep = dsm.alloc(REPLICATED_PAGES * 4096, Placement::Replicated)?;
        for (p, chunk) in dsm.segment_words(&rep).chunks(per_page).enumerate() {
            chunk[1].store(2000 + p as u64, Relaxed);
        }
        dsm.seal(&rep)?;
        raw(dsm, 2).store(rep.addr() as u64, Relaxed);
        // Private: one page per rank at the same address.
        let private = dsm.alloc(4096, Placement::Private)?;
        raw(dsm, 3).store(private.addr() as u64, Relaxed);
        // A linked list in a distributed segment: node = [value, next address].
        let list = dsm.alloc(NODES as usize * 16 * 3, Placement::Distributed)?;
        let words = dsm.segment_words(&list);
        let mut next = 0u64;
        for i in 0..NODES {
            let slot = ((i * 7) % NODES) as usize * 6; // scattered over the segment
            words[slot].store(i + 1, Relaxed);
            words[slot + 1].store(next, Relaxed);
            next = &words[slot] as *const AtomicU64 as u64;
        }
        raw(dsm, 4).store(next, Relaxed);
    }
    dsm.barrier()?;
    let local = raw(dsm, 1).load(Relaxed);
    // Every rank has read the address (its traffic is over) before anyone
    // takes the snapshot, and every snapshot is taken before anyone reads
    // the segment: only the localized reads fall between the snapshots.
    dsm.barrier()?;
    let before = dsm.stats();
    dsm.barrier()?;
    for p in 0..LOCAL_PAGES {
        let got = word_at(dsm, local + (p * 4096) as u64).load(Relaxed);
        check(got == 1000 + p as u64, || {
            format!("localized page {p} holds {got}")
        })?;
    }
    dsm.barrier()?;
    let served = dsm.stats().grants_served - before.grants_served;
    // Nobody moves on (to pages this rank may serve) before every rank
    // took its closing snapshot.
    dsm.barrier()?;
    raw(dsm, 32 + rank).store(served, Relaxed);

    // Replicated: the first pass fetches read-only copies, the second is free.
    let rep = raw(dsm, 2).load(Relaxed);
    let read_replicated = || -> Result<()> {
        for p in 0..REPLICATED_PAGES {
            let got = word_at(dsm, rep + (p * 4096 + 8) as u64).load(Relaxed);
            check(got == 2000 + p as u64, || {
                format!("replicated page {p} holds {got}")
            })?;
        }
        Ok(())
    };
    read_replicated()?;
    let after_first = dsm.stats();
    read_replicated()?;
    let after_second = dsm.stats();
    check(
        after_second.pages_received == after_first.pages_received
            && after_second.read_faults == after_first.read_faults,
        || "reading the sealed segment again caused traffic".into(),
    )?;

    // Private: each rank's own page.
    let private = word_at(dsm, raw(dsm, 3).load(Relaxed));
    private.store(rank as u64 + 77, Relaxed);
    dsm.barrier()?;
    let mine = private.load(Relaxed);
    check(mine == rank as u64 + 77, || {
        format!("private page holds {mine}, another rank's value")
    })?;

    // The linked list built by rank 0, walked here.
    let (mut node, mut sum, mut count) = (raw(dsm, 4).load(Relaxed), 0u64, 0u64);
    while node != 0 {
        sum += word_at(dsm, node).load(Relaxed);
        node = word_at(dsm, node + 8).load(Relaxed);
        count += 1;
        check(count <= NODES, || "the linked list does not end".into())?;
    }
    check(sum == NODES * (NODES + 1) / 2 && count == NODES, || {
        format!("list of {count} nodes sums to {sum}")
    })?;

    // Rank 0 checks who served the localized segment.
    dsm.barrier()?;
    if rank == 0 {
        let served: Vec<u64> = (0..size).map(|r| raw(dsm, 32 + r).load(Relaxed)).collect();
        // Rank 0 holds its written pages; every other rank (rank 1 too) reads each page once.
        let expected = (LOCAL_PAGES * (size - 1)) as u64;
        check(
            served[1] == expected && served.iter().enumerate().all(|(r, s)| r == 1 || *s == 0),
            || {
                format!("grants served per rank during the localized phase: {served:?}, expected {expected} at rank 1 only")
            },
        )?;
    }
    dsm.barrier()?;
    Ok(format!(
        "placement verified: localized pages served by rank 1, sealed re-reads free, private pages own, list of {NODES} nodes walked"
    ))
}
