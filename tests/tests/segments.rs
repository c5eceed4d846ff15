//! Segments, placement and locks through dsmexec: the ALMOS-MKH placement
//! kinds, on-demand registration (pointers built by one rank and followed
//! by another), sealed replicated segments, file segments, distributed
//! locks, and the C API (dsm_malloc, dsm_remote_malloc, dsm_lock).

use std::path::Path;
use std::time::Duration;

use dsm_tests::{
    bin, compile_c_example, dsmexec, run, scratch_dir, short_hostname, unique_token, Finished,
    ScratchDir,
};

const LIMIT: Duration = Duration::from_secs(180);

fn temp_dir() -> ScratchDir {
    scratch_dir(&unique_token("segments"))
}

fn job(n: usize, program: &Path, args: &[&str]) -> Finished {
    let n = n.to_string();
    let prog = program.display().to_string();
    let mut all = vec!["-n", n.as_str(), prog.as_str()];
    all.extend_from_slice(args);
    run(dsmexec(&all, &temp_dir()), LIMIT)
}

#[test]
fn placements_are_honoured_and_pointers_work_across_ranks() {
    for n in [3, 4] {
        let out = job(n, &bin("segments"), &["placement"]);
        out.expect_each_rank(n, "placement verified: localized pages served by rank 1, sealed re-reads free, private pages own, list of 200 nodes walked",
        );
    }
}

#[test]
fn a_collective_allocation_gives_every_rank_the_same_segment() {
    for n in [2, 4] {
        let out = job(n, &bin("segments"), &["collective"]);
        out.expect_each_rank(
            n,
            "collective segments verified: same addresses on every rank, sums exact",
        );
    }
}

#[test]
fn collective_allocations_with_different_arguments_end_the_job_naming_both() {
    let out = job(3, &bin("segments"), &["collective-mismatch"]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("collective allocation 1: rank ")
            && out
                .stderr
                .contains("every rank must call it with the same size and placement"),
        "{}",
        out.stderr
    );
}

/// `segments free ROUNDS` under `env`, in a 4 MiB space: its 2 MiB heap
/// holds fewer than a quarter of the rounds' segments unless freed ones
/// are handed out again.
fn free_job(n: usize, env: &[(&str, &str)]) -> Finished {
    let n_arg = n.to_string();
    let prog = bin("segments").display().to_string();
    let dir = temp_dir();
    let mut command = dsmexec(&["-n", &n_arg, &prog, "free", "40"], &dir);
    command
        .env("DSM_SPACE_SIZE", "4M")
        .envs(env.iter().copied());
    run(command, LIMIT)
}

#[test]
fn freed_segments_leave_nothing_behind_and_their_range_is_reused() {
    for (n, env) in [
        (2, vec![]),
        (4, vec![]),
        // Evictions cross the frees' releases, and faults go through the
        // fault thread.
        (3, vec![("DSM_CACHE_SIZE", "32K"), ("DSM_FAULTS", "thread")]),
    ] {
        let out = free_job(n, &env);
        out.expect_each_rank(
            n,
            "free verified: 40 rounds in 2 distinct places, new segments all zeros, values exact; segment_at found rank 1's segment",
        );
        assert!(
            out.stdout
                .contains("is not the address of a segment of this job")
                && out.stdout.contains("was freed already"),
            "{}",
            out.stdout
        );
    }
}

#[test]
fn frees_of_different_segments_end_the_job_naming_both() {
    let out = job(3, &bin("segments"), &["free-mismatch"]);
    assert_eq!(out.code, Some(70), "{out:?}");
    assert!(
        out.stderr.contains("collective free 1: rank ")
            && out
                .stderr
                .contains("every rank must free the same segments in the same order"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_store_to_a_sealed_segment_is_an_error_naming_it() {
    let out = job(3, &bin("segments"), &["sealed-write"]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("dsm: rank 1 on ")
            && out
                .stderr
                .contains("store to sealed replicated segment 1 at 0x")
            && out.stderr.contains("read-only after seal()"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_file_segment_loads_the_file_and_sync_writes_it_back() {
    let dir = temp_dir();
    let path = dir.join("data.bin");
    let len = 3 * 4096 + 100;
    let original: Vec<u8> = (0..len).map(|i| ((i * 7) % 251) as u8).collect();
    std::fs::write(&path, &original).unwrap();
    let out = job(3, &bin("segments"), &["file", &path.display().to_string()]);
    out.expect_each_rank(3, "file contents verified");
    let synced = std::fs::read(&path).unwrap();
    assert_eq!(synced.len(), len);
    let mut expected = original;
    expected[4096..4104].copy_from_slice(&0xD5D5_D5D5u64.to_le_bytes());
    assert!(
        synced == expected,
        "the synced file differs from the expected contents"
    );
}

#[test]
fn distributed_locks_give_mutual_exclusion() {
    let out = job(4, &bin("segments"), &["locks", "3", "300"]);
    out.expect_each_rank(4, "locks exact: 3600 increments");
}

#[test]
fn c_api_allocation_and_locks() {
    let exe = compile_c_example("locks");
    let out = job(4, &exe, &[]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let host = short_hostname();
    for rank in 0..4 {
        assert_eq!(
            out.lines_of(rank, &host, "stdout"),
            [format!(
                "[{rank}] counter = 800 under dsm_lock, block verified"
            )]
        );
    }
}
