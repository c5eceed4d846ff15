//! The DSM core through dsmexec on loopback: the seed's example (Rust and
//! C), round robin, contention with exact counters, a 256 MiB space, 16
//! ranks, statistics, and start-up errors.

use std::path::Path;
use std::time::Duration;

use dsm_tests::{
    bin, compile_c, compile_c_example, dsmexec, run, scratch_dir, short_hostname, unique_token,
    Finished, ScratchDir,
};

const LIMIT: Duration = Duration::from_secs(240);

fn temp_dir(label: &str) -> ScratchDir {
    scratch_dir(&unique_token(label))
}

fn job(env: &[(&str, &str)], args: &[&str]) -> Finished {
    let dir = temp_dir("dsm");
    let mut command = dsmexec(args, &dir);
    for (k, v) in env {
        command.env(k, v);
    }
    run(command, LIMIT)
}

fn check_seed_example(program: &Path) {
    let host = short_hostname();
    let prog = program.display().to_string();
    for n in ["2", "4"] {
        let out = job(&[("DSM_STATS", "1")], &["-n", n, &prog]);
        assert_eq!(out.code, Some(0), "{out:?}");
        let n: usize = n.parse().unwrap();
        for rank in 0..n {
            let lines = out.lines_of(rank, &host, "stdout");
            assert_eq!(
                lines[0],
                format!("[{rank}] base address of the shared space: 0x40000000"),
                "{out:?}"
            );
            if rank == 1 {
                assert_eq!(lines[1], "[1] read 4242 from page 0");
            }
            let stats = out.lines_of(rank, &host, "stderr");
            assert!(
                stats
                    .iter()
                    .any(|l| l.starts_with(&format!("dsm stats rank {rank}: "))),
                "{out:?}"
            );
        }
        // Rank 1's read fault fetched page 0 from rank 0: by message, or
        // (co-located ranks, `DSM_DIRECT_READS`) from rank 0's memory.
        let stats1 = out.lines_of(1, &host, "stderr").join("\n");
        assert!(
            stats1.contains("faults read 1 ")
                && (stats1.contains("received 1 (4105 B)") || stats1.contains("direct reads 1 ")),
            "{stats1}"
        );
    }
}

#[test]
fn seed_example_in_rust() {
    check_seed_example(&bin("exemple"));
}

#[test]
fn seed_example_in_c() {
    let exe = compile_c_example("exemple");
    check_seed_example(&exe);
}

#[test]
fn round_robin_at_4_ranks() {
    let out = job(&[], &["-n", "4", &bin("roundrobin").display().to_string()]);
    out.expect_each_rank(4, "4 rounds over 100 pages verified");
}

#[test]
fn round_robin_at_16_ranks() {
    let out = job(&[], &["-n", "16", &bin("roundrobin").display().to_string()]);
    out.expect_each_rank(16, "16 rounds over 100 pages verified");
}

/// The latency programs of bench/README run as documented: the raw round
/// trip between the two processes names the path it took (rings by
/// default, TCP with `DSM_SHM=0`; each answer is checked 4 KiB), and
/// faultlat's faults read what the home sealed (it exits non-zero
/// otherwise).
#[test]
fn the_two_process_latency_programs_run_over_rings_and_tcp() {
    for (shm, path) in [("1", "shared-memory rings"), ("0", "TCP")] {
        let out = job(
            &[("DSM_SHM", shm)],
            &["-n", "2", &bin("rawlat").display().to_string(), "300"],
        );
        assert_eq!(out.code, Some(0), "{out:?}");
        let host = short_hostname();
        let line = format!("raw round trip 16 B / 4 KiB over {path}: median ");
        assert!(
            out.lines_of(1, &host, "stdout")
                .iter()
                .any(|l| l.starts_with(&line) && l.ends_with("(300 round trips)")),
            "{out:?}"
        );
    }
    let out = job(
        &[("DSM_PREFETCH", "0"), ("DSM_SPACE_SIZE", "16M")],
        &["-n", "2", &bin("faultlat").display().to_string(), "300"],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let host = short_hostname();
    assert!(
        out.lines_of(0, &host, "stdout")
            .iter()
            .any(|l| l.starts_with("remote read fault ") && l.contains("(299 faults")),
        "{out:?}"
    );
}

#[test]
fn a_256_mib_space_touched_by_all_ranks() {
    let out = job(
        &[("DSM_SPACE_SIZE", "256M")],
        &["-n", "4", &bin("roundrobin").display().to_string(), "64"],
    );
    out.expect_each_rank(4, "4 rounds over 65536 pages verified");
}

/// Eight threads of rank 1 fault at once on distinct pages homed at rank
/// 0 (`bench/c/threaded_faults.c`, no read-ahead: one remote fault each),
/// and their requests share messages: every value read is the one rank 0
/// wrote in that round (the program exits 1 otherwise), over TCP and over
/// the rings co-located ranks use.
#[test]
fn eight_threads_of_one_rank_fault_at_once_and_read_what_the_home_wrote() {
    let exe = compile_c("bench/c/threaded_faults.c", "threaded_faults");
    let exe = exe.display().to_string();
    for shm in ["0", "1"] {
        let out = job(
            &[
                ("DSM_PREFETCH", "0"),
                ("DSM_SHM", shm),
                ("DSM_SPACE_SIZE", "32M"),
            ],
            &["-n", "2", &exe, "-p", "200", "1", "8", "1", "8"],
        );
        assert_eq!(out.code, Some(0), "DSM_SHM={shm}: {out:?}");
        let host = short_hostname();
        let lines = out.lines_of(1, &host, "stdout");
        let rounds = lines
            .iter()
            .filter(|l| {
                l.starts_with("threads 8 faults 1600 ") || l.starts_with("threads 1 faults 200 ")
            })
            .count();
        assert_eq!(rounds, 4, "DSM_SHM={shm}: {out:?}");
        assert!(
            lines.iter().any(|l| l.starts_with("median ratio 8/1 ")),
            "DSM_SHM={shm}: {out:?}"
        );
    }
}

#[test]
fn contention_4_ranks_4_threads_10000_increments_exact() {
    let out = job(
        &[],
        &[
            "-n",
            "4",
            &bin("contention").display().to_string(),
            "4",
            "10000",
        ],
    );
    out.expect_each_rank(4, "all 16 counters are exactly 10000");
}

#[test]
fn contention_with_pages_moving_mid_loop_is_exact() {
    // No hold time and frequent yields: pages are taken away while threads
    // are between their load and their store.
    let out = job(
        &[("DSM_MIN_HOLD_US", "0")],
        &[
            "-n",
            "4",
            &bin("contention").display().to_string(),
            "4",
            "30000",
            "10",
        ],
    );
    out.expect_each_rank(4, "all 16 counters are exactly 30000");
}

#[test]
fn the_seed_protocol_stays_selectable() {
    let env = [("DSM_PROTOCOL", "migratory")];
    let out = job(&env, &["-n", "4", &bin("roundrobin").display().to_string()]);
    out.expect_each_rank(4, "4 rounds over 100 pages verified");
    let out = job(
        &[("DSM_PROTOCOL", "migratory"), ("DSM_MIN_HOLD_US", "0")],
        &[
            "-n",
            "4",
            &bin("contention").display().to_string(),
            "4",
            "30000",
            "10",
        ],
    );
    out.expect_each_rank(4, "all 16 counters are exactly 30000");
}

fn assert_start_error(env: &[(&str, &str)], args: &[&str], rank_message: &str) {
    let out = job(env, args);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains(rank_message),
        "expected {rank_message:?} in:\n{}",
        out.stderr
    );
    let launcher = out.launcher_messages();
    assert_eq!(launcher.len(), 1, "{out:?}");
    assert!(launcher[0].contains("exited with status 1"), "{launcher:?}");
}

#[test]
fn an_occupied_base_address_is_named_with_the_option_to_move_it() {
    let probe = bin("dsmprobe").display().to_string();
    assert_start_error(
        &[],
        &["-n", "2", &probe, "occupied"],
        "the shared space 0x40000000-0x40064000 overlaps an existing mapping (0x40000000-0x40001000",
    );
    let out = job(&[], &["-n", "2", &probe, "occupied"]);
    assert!(
        out.stderr.contains("move it with DSM_BASE"),
        "{}",
        out.stderr
    );
}

/// The space is the sum of the homes: a space far larger than the machine
/// starts (its tables grow with the pages touched); what must fit is each
/// rank's cache and what each host is home of, named when it does not.
#[test]
fn a_space_larger_than_the_machine_starts_and_what_must_fit_is_checked() {
    let probe = bin("dsmprobe").display().to_string();
    let program = bin("bigspace").display().to_string();
    for size in ["1T", "64T"] {
        // Every rank writes a page it is home of, the last reads them all:
        // the per-page tables cost nothing up front (at most 64 MiB
        // resident per rank, program and runtime included).
        let out = job(&[("DSM_SPACE_SIZE", size)], &["-n", "2", &program, "8K"]);
        assert_eq!(out.code, Some(0), "a {size} space: {out:?}");
        let line = out.lines_of(0, &short_hostname(), "stdout").join("\n");
        let rss: u64 = line
            .split_once("peak RSS ")
            .and_then(|(_, after)| after.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no peak RSS in {line:?}: {out:?}"));
        assert!(
            rss <= 64,
            "a {size} space: rank 0 peaked at {rss} MiB: {line}"
        );
    }
    assert_start_error(
        &[("DSM_SPACE_SIZE", "64T"), ("DSM_PROTOCOL", "migratory")],
        &["-n", "2", &probe, "join"],
        "the migratory protocol evicts nothing",
    );
    assert_start_error(
        &[("DSM_SPACE_SIZE", "1T"), ("DSM_CACHE_SIZE", "100T")],
        &["-n", "2", &probe, "join"],
        "lower DSM_CACHE_SIZE",
    );
    // 100 TiB homed at rank 1: refused at the allocation, naming the rank.
    let out = job(
        &[("DSM_SPACE_SIZE", "64T")],
        &["-n", "2", &probe, "alloc", "109951162777600"],
    );
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("rank 1 on ")
            && out
                .stderr
                .contains("a localized segment of 109951162777600 bytes")
            && out.stderr.contains("spread the data over more ranks"),
        "{}",
        out.stderr
    );
}

/// The user: a 1 TiB space, a small cache; every rank writes the
/// pages it is home of, one rank reads and checks them all. Its cache
/// evicts as it reads, so its peak memory stays near its home share plus
/// its cache.
#[test]
fn one_rank_reads_more_than_its_cache_holds_and_every_page_is_exact() {
    let program = bin("bigspace").display().to_string();
    let env = [("DSM_SPACE_SIZE", "1T"), ("DSM_CACHE_SIZE", "16M")];
    let out = job(&env, &["-n", "4", &program, "256M"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let line = out.lines_of(3, &short_hostname(), "stdout").join("\n");
    assert!(
        line.starts_with("bigspace exact: rank 3 checked 65536 pages x 1"),
        "{line}\n{out:?}"
    );
    let number_after = |key: &str| -> u64 {
        let (_, after) = line
            .split_once(key)
            .unwrap_or_else(|| panic!("{key} in {line}"));
        after.split_whitespace().next().unwrap().parse().unwrap()
    };
    assert!(number_after("evictions clean ") > 0, "{line}");
    // Home share 64 MiB + cache 16 MiB + the program and runtime.
    let peak = number_after("peak RSS ");
    assert!(peak < 64 + 16 + 128, "peak RSS {peak} MiB: {line}");
}

/// `--bind-to core` puts each rank's joining thread, and the threads it
/// starts afterwards, on its service CPU alone (rank mod the CPUs this
/// process may use, in order), as mpirun binds ranks; without it they keep
/// the launcher's CPUs.
#[test]
fn bind_to_core_puts_each_rank_on_its_service_cpu() {
    let probe = bin("dsmprobe").display().to_string();
    let host = short_hostname();
    let usable: Vec<String> = {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
        (0..nix::sched::CpuSet::count())
            .filter(|c| set.is_set(*c).unwrap_or(false))
            .map(|c| c.to_string())
            .collect()
    };
    let cpus_of = |out: &Finished, rank: usize| {
        out.lines_of(rank, &host, "stdout")
            .iter()
            .find_map(|l| {
                l.strip_prefix(&format!("rank {rank} cpus "))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("rank {rank} printed no CPUs: {out:?}"))
    };
    let out = job(&[], &["--bind-to", "core", "-n", "2", &probe, "affinity"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    for rank in 0..2 {
        let cpu = &usable[rank % usable.len()];
        assert_eq!(cpus_of(&out, rank), format!("{cpu} / {cpu}"), "{out:?}");
    }
    assert_start_error(
        &[("DSM_BIND", "socket")],
        &["-n", "2", &probe, "join"],
        "DSM_BIND=\"socket\": expected core or none",
    );
    let out = job(&[("DSM_BIND", "none")], &["-n", "2", &probe, "affinity"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let all = usable.join(",");
    for rank in 0..2 {
        assert_eq!(cpus_of(&out, rank), format!("{all} / {all}"), "{out:?}");
    }
}
