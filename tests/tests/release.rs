//! Release consistency (`DSM_PROTOCOL=release`) through dsmexec: false
//! sharing with exact counts (C and Rust), threads of one rank writing the
//! same pages, locks and barriers as the points where writes become
//! visible, collective segments, Jacobi bit for bit, and the segments the
//! mode refuses with an error that names the fix.

use std::path::Path;
use std::time::Duration;

use dsm_tests::Finished;
use dsm_tests::{
    bin, compile_c, compile_c_example, dsmexec, run, scratch_dir, short_hostname, unique_token,
};

const LIMIT: Duration = Duration::from_secs(180);

/// `program args` on `n` ranks under release consistency, with `env`.
fn release_job(n: usize, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Finished {
    let dir = scratch_dir(&unique_token("release"));
    let n = n.to_string();
    let prog = program.display().to_string();
    let mut all = vec!["-n", n.as_str(), prog.as_str()];
    all.extend_from_slice(args);
    let mut command = dsmexec(&all, &dir);
    command
        .env("DSM_PROTOCOL", "release")
        .env("DSM_SPACE_SIZE", "64M");
    for (k, v) in env {
        command.env(k, v);
    }
    run(command, LIMIT)
}

/// Each rank's own counters interleaved in the same pages (every rank
/// checks every counter after the last barrier: the program exits 1 on a
/// wrong one); the words travel as diffs, not as pages taken away.
#[test]
fn false_sharing_counters_are_exact_and_travel_as_diffs() {
    let exe = compile_c("bench/c/falseshare.c", "falseshare");
    let host = short_hostname();
    for n in [2, 4] {
        let out = release_job(
            n,
            &exe,
            &["-i", "50000", "-c", "512", "-b", "5000"],
            &[("DSM_STATS", "1")],
        );
        assert_eq!(out.code, Some(0), "{n} ranks: {out:?}");
        let line = out.lines_of(0, &host, "stdout").join("\n");
        assert!(
            line.starts_with(&format!(
                "falseshare ranks {n} increments 50000 counters 512 pages {n} barriers 11 "
            )),
            "{line}"
        );
        for rank in 0..n {
            let stats = out.lines_of(rank, &host, "stderr").join("\n");
            // Every rank wrote the n pages in each of the 10 epochs that
            // end with a barrier of the loop: one diff per page homed
            // elsewhere and epoch, and one of its own page's once another
            // rank fetched it (the last barrier has nothing new).
            let diffs = diffs_sent(&stats);
            assert!(
                ((n - 1) * 10..=n * 10).contains(&diffs),
                "rank {rank}: {stats}"
            );
        }
    }
}

#[test]
fn the_rust_false_sharing_kernel_counts_exactly() {
    let out = release_job(4, &bin("kernels"), &["falseshare", "40000", "100"], &[]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let line = out.lines_of(0, &short_hostname(), "stdout").join("\n");
    assert!(line.contains("every counter exact"), "{line}");
}

/// Four threads of each rank write their own counters of two shared pages
/// at once (one twin per page and rank, written by all its threads) and
/// yield mid-loop; after the barrier every counter is exact everywhere.
#[test]
fn threads_of_every_rank_write_the_same_pages_and_lose_nothing() {
    let out = release_job(4, &bin("contention"), &["4", "10000", "100"], &[]);
    out.expect_each_rank(4, "all 16 counters are exactly 10000");
}

/// A counter incremented under a lock with a plain load and store: each
/// unlock sends the increment home, each lock grant drops the stale copy.
/// Threads of one rank ask for the lock while another's release is under
/// way (the releases queue in order).
#[test]
fn locks_order_plain_increments_exactly() {
    let out = release_job(4, &bin("segments"), &["locks", "3", "200"], &[]);
    out.expect_each_rank(4, "locks exact: 2400 increments");
    let exe = compile_c_example("locks");
    let out = release_job(3, &exe, &[], &[]);
    assert_eq!(out.code, Some(0), "{out:?}");
    for rank in 0..3 {
        let lines = out.lines_of(rank, &short_hostname(), "stdout");
        assert!(
            lines
                .iter()
                .any(|l| l == &format!("[{rank}] counter = 600 under dsm_lock, block verified")),
            "{out:?}"
        );
    }
}

/// Forty rounds of collective segments (distributed, localized, private)
/// allocated, written, checked, dirtied and freed in a heap that holds a
/// quarter of them: no copy, twin or master copy of a freed segment is
/// left, the range comes back all zeros; also with a tiny cache (evictions
/// cross the frees) and faults through the fault thread.
#[test]
fn freed_release_segments_leave_nothing_behind() {
    for (n, env) in [
        (2, vec![]),
        (4, vec![]),
        (3, vec![("DSM_CACHE_SIZE", "32K"), ("DSM_FAULTS", "thread")]),
    ] {
        let mut env = env;
        env.push(("DSM_SPACE_SIZE", "4M"));
        let out = release_job(n, &bin("segments"), &["free", "40"], &env);
        out.expect_each_rank(
            n,
            "free verified: 40 rounds in 2 distinct places, new segments all zeros, values exact",
        );
    }
}

#[test]
fn collective_segments_give_exact_sums() {
    let out = release_job(4, &bin("segments"), &["collective"], &[]);
    out.expect_each_rank(4, "collective segments verified");
}

#[test]
fn jacobi_matches_the_serial_run_bit_for_bit() {
    let out = release_job(3, &bin("kernels"), &["jacobi", "192", "12"], &[]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let line = out.lines_of(0, &short_hostname(), "stdout").join("\n");
    assert!(line.contains("equals the serial run"), "{line}");
}

/// A cache of 64 pages while every rank reads a space of 2048: clean
/// copies are evicted without a message, every value read is right.
#[test]
fn clean_copies_are_evicted_to_bound_the_cache() {
    let out = release_job(
        3,
        &bin("roundrobin"),
        &[],
        &[
            ("DSM_CACHE_SIZE", "64p"),
            ("DSM_SPACE_SIZE", "8M"),
            ("DSM_STATS", "1"),
        ],
    );
    out.expect_each_rank(3, "3 rounds over 2048 pages verified");
    let stats = out.lines_of(1, &short_hostname(), "stderr").join("\n");
    let evicted: u64 = stats
        .split("evictions clean ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(evicted > 1000, "{stats}");
}

/// Every rank writes its counters in 32 shared pages each epoch through
/// a cache of 8: dirty copies are evicted mid-epoch (their diffs sent to
/// their homes, acknowledged, the copies named at the next barrier), the
/// cache stays near its bound, and every counter is exact.
#[test]
fn dirty_copies_send_their_diffs_to_bound_the_cache() {
    let exe = compile_c("bench/c/falseshare.c", "falseshare");
    let out = release_job(
        4,
        &exe,
        &["-i", "20000", "-c", "4096", "-b", "2000"],
        &[("DSM_CACHE_SIZE", "8p"), ("DSM_STATS", "1")],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    for rank in 0..4 {
        let stats = out.lines_of(rank, &short_hostname(), "stderr").join("\n");
        let field = |name: &str| -> u64 {
            stats
                .split(name)
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {name:?} in {stats}"))
        };
        assert!(field(" written back ") > 0, "rank {rank}: {stats}");
        // Dirty copies kept until the barrier took the peak to 19-20
        // pages. A batch of grants may land before the next eviction, so
        // the peak may be a few pages past 8 (11 measured).
        assert!(field("peak cached ") <= 16 * 4096, "rank {rank}: {stats}");
    }
}

/// Atomic read-modify-writes of several ranks need one writer at a time:
/// the histogram's buckets are a sequentially consistent segment of the
/// release-consistent job, and every bucket is exact.
#[test]
fn atomics_in_a_sequential_segment_of_a_release_job_are_exact() {
    let out = release_job(4, &bin("kernels"), &["histogram", "20000"], &[]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let line = out.lines_of(0, &short_hostname(), "stdout").join("\n");
    assert!(line.contains("equals the serial histogram"), "{line}");
}

/// A release-consistent segment in a job of the default protocol
/// (`DSM_RELEASE` in C): exact counts, its words travel as diffs.
#[test]
fn a_release_segment_in_a_sequential_job_counts_exactly() {
    let exe = compile_c("bench/c/falseshare.c", "falseshare");
    let dir = scratch_dir(&unique_token("release"));
    let prog = exe.display().to_string();
    let args = ["-n", "3", &prog, "-i", "30000", "-b", "3000", "-r"];
    let mut command = dsmexec(&args, &dir);
    command.env("DSM_SPACE_SIZE", "64M").env("DSM_STATS", "1");
    let out = run(command, LIMIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    let stats = out.lines_of(1, &short_hostname(), "stderr").join("\n");
    assert!((20..=30).contains(&diffs_sent(&stats)), "{stats}");
}

/// The count of diffs a rank's statistics line says it sent.
fn diffs_sent(stats: &str) -> usize {
    stats
        .split("diffs sent ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no diff count in {stats}"))
}

/// Sealing needs a single writer: a replicated segment of the job's
/// default (release) consistency is refused, naming the fix.
#[test]
fn a_replicated_segment_is_refused_with_the_fix() {
    let out = release_job(3, &bin("segments"), &["placement"], &[]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let stderr = out.lines_of(0, &short_hostname(), "stderr").join("\n");
    assert!(
        stderr.contains(
            "a release-consistent replicated segment cannot exist: sealing and file sync need sequential consistency (allocate it with Consistency::Sequential, or DSM_SEQUENTIAL in C)"
        ),
        "{stderr}"
    );
}
