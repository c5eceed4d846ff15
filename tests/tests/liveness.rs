//! Liveness (issue 23): a rank that stops answering without dying (SIGSTOP:
//! its kernel still acknowledges TCP) is reported as not responding within
//! DSM_PEER_TIMEOUT and the job ends, while a rank that computes for long
//! without a DSM call is never declared lost; a stuck job's ranks say what
//! their threads wait for (SIGUSR1 to dsmexec, or DSM_HANG_REPORT_S).
//! docs/RELIABILITY.md lists these cases.

use std::time::{Duration, Instant};

use dsm_tests::{
    assert_no_leftovers, await_wait_in_fault, bin, dsmexec, scratch_dir, short_hostname,
    stop_process, unique_token, Running,
};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The peer timeout the stop scenarios run under.
const TIMEOUT_S: u64 = 3;

/// The pid rank `rank` printed (`rank R pid P ready`) among `lines`.
fn pid_of(lines: &[String], rank: usize) -> Pid {
    let pid = lines
        .iter()
        .filter(|l| field(l, "rank") == Some(rank as u32))
        .find_map(|l| field(l, "pid"))
        .expect("the rank's pid");
    Pid::from_raw(pid as i32)
}

/// The value after `key ` in `line` (`rank 2 pid 1234 ready`).
fn field(line: &str, key: &str) -> Option<u32> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == key)?;
    words.next()?.parse().ok()
}

/// Starts `dsmfault MODE` on 3 ranks, SIGSTOPs rank `victim` once every
/// rank is at work, and checks that the job ends within the peer timeout
/// plus 5 s, dsmexec naming the stopped rank as not responding, with no
/// process left; a SIGCONT afterwards finds nothing to continue.
fn stop_scenario(mode: &str, victim: usize) {
    const N: usize = 3;
    let token = unique_token(&format!("stop{mode}"));
    let dir = scratch_dir(&token);
    let host = short_hostname();
    let mut cmd = dsmexec(
        &[
            "-n",
            &N.to_string(),
            "--grace",
            "2",
            &bin("dsmfault").display().to_string(),
            mode,
            &victim.to_string(),
            &dir.join("unused").display().to_string(),
        ],
        &dir,
    );
    cmd.env("DSM_PEER_TIMEOUT", TIMEOUT_S.to_string());
    let mut job = Running::start(cmd, Duration::from_secs(90));
    job.await_lines(N, |l| l.ends_with(" ready"));
    if mode == "barrier" {
        job.await_lines(N - 1, |l| l.contains("entering barrier"));
    }
    let victim_pid = pid_of(job.stdout_lines(), victim);
    let stopped_at = Instant::now();
    stop_process(victim_pid.as_raw());
    let out = job.finish();
    let took = stopped_at.elapsed();
    eprintln!("{mode}: job ended {took:?} after the SIGSTOP");
    let messages = out.launcher_messages();
    assert_ne!(out.code, Some(0), "{out:?}");
    let expected = format!("dsmexec: rank {victim} (host {host}) is not responding");
    assert!(
        messages.first().is_some_and(|m| m.starts_with(&expected)),
        "dsmexec's first message should start with {expected:?}: {messages:?}\n{out:?}"
    );
    // Within the timeout in the common case; twice it when a survivor's
    // heartbeat thread was starved (late by three intervals) and forgave
    // every silence (`Liveness::forgive`), plus the exit and the teardown.
    assert!(
        took < Duration::from_secs(2 * TIMEOUT_S + 7),
        "the job took {took:?} to end after the SIGSTOP (DSM_PEER_TIMEOUT={TIMEOUT_S})\n{out:?}"
    );
    assert_no_leftovers(&token, Duration::from_secs(10));
    assert_eq!(
        kill(victim_pid, Signal::SIGCONT),
        Err(Errno::ESRCH),
        "the stopped rank outlived the job"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stopped_rank_is_reported_while_the_others_compute() {
    stop_scenario("compute", 1);
}

#[test]
fn a_stopped_rank_is_reported_while_the_others_sit_in_a_barrier() {
    stop_scenario("barrier", 2);
}

/// A minute of computation without a single DSM call, on more threads than
/// CPUs, under a 5 s peer timeout: nobody is declared lost, and the totals
/// that need every rank are exact.
#[test]
fn a_long_computation_without_dsm_calls_is_not_a_lost_rank() {
    const N: usize = 3;
    let seconds: u64 = std::env::var("DSM_TEST_QUIET_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let token = unique_token("quiet");
    let dir = scratch_dir(&token);
    let host = short_hostname();
    let mut cmd = dsmexec(
        &[
            "-n",
            &N.to_string(),
            &bin("dsmfault").display().to_string(),
            "quiet",
            &seconds.to_string(),
            &dir.join("unused").display().to_string(),
        ],
        &dir,
    );
    cmd.env("DSM_PEER_TIMEOUT", "5");
    let out = Running::start(cmd, Duration::from_secs(seconds + 60)).finish();
    assert_eq!(out.code, Some(0), "{out:?}");
    for rank in 0..N {
        assert_eq!(
            out.lines_of(rank, &host, "stdout")
                .last()
                .map(String::as_str),
            Some(format!("rank {rank} total {N}").as_str()),
            "{out:?}"
        );
    }
    assert_no_leftovers(&token, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

/// How a hang report is asked for.
#[derive(Clone, Copy, PartialEq)]
enum Ask {
    /// SIGUSR1 to dsmexec, once the thread waits.
    Signal,
    /// DSM_HANG_REPORT_S=1: the rank reports by itself.
    Threshold,
}

/// Rank 2 reads page 1 while its home, rank 1, is stopped: the hang report
/// of rank 2 names the page, its address and its home; then the job ends
/// on the peer timeout as for any stopped rank.
fn hang_report_scenario(ask: Ask) {
    const N: usize = 3;
    let (victim, waiter) = (1usize, 2usize);
    let token = unique_token("hang");
    let dir = scratch_dir(&token);
    let go = dir.join("go");
    let host = short_hostname();
    let mut cmd = dsmexec(
        &[
            "-n",
            &N.to_string(),
            &bin("dsmfault").display().to_string(),
            "fault",
            &victim.to_string(),
            &go.display().to_string(),
        ],
        &dir,
    );
    // Long enough for the report to be asked for on a loaded machine.
    cmd.env("DSM_PEER_TIMEOUT", "8").env("DSM_FAULTS", "sigbus");
    // The read asks the stopped home (else, co-located, it would copy the
    // page from the home's memory without waiting).
    cmd.env("DSM_DIRECT_READS", "off");
    cmd.env(
        "DSM_HANG_REPORT_S",
        if ask == Ask::Threshold { "1" } else { "off" },
    );
    let mut job = Running::start(cmd, Duration::from_secs(60));
    job.await_lines(N, |l| l.ends_with(" ready"));
    let (victim_pid, waiter_pid) = (
        pid_of(job.stdout_lines(), victim),
        pid_of(job.stdout_lines(), waiter),
    );
    stop_process(victim_pid.as_raw());
    std::fs::write(&go, "").expect("go file");
    job.await_lines(1, |l| l.contains(&format!("rank {waiter} touching")));
    if ask == Ask::Signal {
        await_wait_in_fault(waiter_pid.as_raw() as u64, waiter);
        kill(Pid::from_raw(job.child.id() as i32), Signal::SIGUSR1).expect("SIGUSR1 to dsmexec");
    }
    let out = job.finish();
    let report = out.lines_of(waiter, &host, "stderr");
    let why = match ask {
        Ask::Signal => "on SIGUSR1",
        Ask::Threshold => "a wait passed DSM_HANG_REPORT_S=1",
    };
    assert!(
        report.iter().any(|l| l
            == &format!("dsm: rank {waiter} on {host}: hang report ({why}): 1 thread(s) waiting")),
        "{report:#?}\n{out:?}"
    );
    let page = format!(
        "page {victim} (0x{:x}, read fault, homed at rank {victim})",
        0x4000_0000 + victim * 4096
    );
    let thread_line =
        format!("dsm: rank {waiter}: thread {waiter_pid} (dsmfault) waits for {page} for ");
    assert!(
        report.iter().any(|l| l.starts_with(&thread_line)),
        "no line starting {thread_line:?}\n{report:#?}"
    );
    assert!(
        report.iter().any(
            |l| l.starts_with(&format!("dsm: rank {waiter}: page {victim} ("))
                && l.contains(&format!("requested from home rank {victim}"))
        ),
        "no line for the request in flight\n{report:#?}"
    );
    if ask == Ask::Signal {
        assert!(
            out.launcher_messages()
                .iter()
                .any(|m| m.starts_with("dsmexec: SIGUSR1")),
            "{out:?}"
        );
    }
    assert!(
        out.launcher_messages()
            .iter()
            .any(|m| m.starts_with(&format!(
                "dsmexec: rank {victim} (host {host}) is not responding"
            ))),
        "{out:?}"
    );
    assert_no_leftovers(&token, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigusr1_to_dsmexec_makes_a_blocked_rank_name_the_page_and_home_it_waits_for() {
    hang_report_scenario(Ask::Signal);
}

#[test]
fn a_wait_past_dsm_hang_report_s_is_reported_by_the_rank_itself() {
    hang_report_scenario(Ask::Threshold);
}

/// Release consistency's side of a hang report: an unlock whose release
/// waits for a stopped home's acknowledgement of a diff says so (the
/// barrier behind it waits too).
#[test]
fn a_hang_report_names_a_release_waiting_for_its_diffs() {
    const N: usize = 3;
    let (victim, waiter) = (1usize, 2usize);
    let token = unique_token("hangrelease");
    let dir = scratch_dir(&token);
    let go = dir.join("go");
    let host = short_hostname();
    let mut cmd = dsmexec(
        &[
            "-n",
            &N.to_string(),
            &bin("dsmfault").display().to_string(),
            "release",
            &victim.to_string(),
            &go.display().to_string(),
        ],
        &dir,
    );
    cmd.env("DSM_PEER_TIMEOUT", "6")
        .env("DSM_HANG_REPORT_S", "1")
        .env("DSM_PROTOCOL", "release");
    let mut job = Running::start(cmd, Duration::from_secs(60));
    job.await_lines(N, |l| l.contains(" ready ("));
    let victim_pid = pid_of(job.stdout_lines(), victim);
    stop_process(victim_pid.as_raw());
    std::fs::write(&go, "").expect("go file");
    job.await_lines(1, |l| l.contains(&format!("rank {waiter} touching")));
    let out = job.finish();
    let report = out.lines_of(waiter, &host, "stderr");
    assert!(
        report.iter().any(|l| l
            == &format!(
                "dsm: rank {waiter}: releasing before an unlock: 1 diff(s) sent to their homes not acknowledged yet"
            )),
        "{report:#?}\n{out:?}"
    );
    assert_no_leftovers(&token, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The barrier's side of a hang report: rank 0, which counts arrivals,
/// names the rank that never came.
#[test]
fn a_hang_report_names_the_ranks_a_barrier_waits_for() {
    const N: usize = 3;
    let victim = 1usize;
    let token = unique_token("hangbarrier");
    let dir = scratch_dir(&token);
    let host = short_hostname();
    let mut cmd = dsmexec(
        &[
            "-n",
            &N.to_string(),
            &bin("dsmfault").display().to_string(),
            "barrier",
            &victim.to_string(),
            &dir.join("unused").display().to_string(),
        ],
        &dir,
    );
    cmd.env("DSM_PEER_TIMEOUT", "4")
        .env("DSM_HANG_REPORT_S", "1");
    let mut job = Running::start(cmd, Duration::from_secs(60));
    job.await_lines(N, |l| l.ends_with(" ready"));
    job.await_lines(N - 1, |l| l.contains("entering barrier"));
    let victim_pid = pid_of(job.stdout_lines(), victim);
    // Stopped only so that the job ends (on the peer timeout) after the
    // reports: the barrier waits for it either way.
    stop_process(victim_pid.as_raw());
    let out = job.finish();
    let rank0 = out.lines_of(0, &host, "stderr");
    assert!(
        rank0.iter().any(|l| l.starts_with("dsm: rank 0: barrier ")
            && l.ends_with("(counted here): waiting for rank(s) 1")),
        "{rank0:#?}\n{out:?}"
    );
    let rank2 = out.lines_of(2, &host, "stderr");
    assert!(
        rank2
            .iter()
            .any(|l| l.starts_with("dsm: rank 2: thread ") && l.contains("waits for barrier ")),
        "{rank2:#?}"
    );
    assert_no_leftovers(&token, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rank that exits with status 0 without finalize while the others still
/// need it: it says so itself, and dsmexec names it as the cause.
#[test]
fn a_rank_that_exits_without_finalize_is_named_as_the_cause() {
    const N: usize = 3;
    let victim = 1usize;
    let token = unique_token("leave");
    let dir = scratch_dir(&token);
    let host = short_hostname();
    let cmd = dsmexec(
        &[
            "-n",
            &N.to_string(),
            &bin("dsmfault").display().to_string(),
            "leave",
            &victim.to_string(),
            &dir.join("unused").display().to_string(),
        ],
        &dir,
    );
    let out = Running::start(cmd, Duration::from_secs(60)).finish();
    assert_eq!(out.code, Some(70), "{out:?}");
    let expected = format!(
        "dsmexec: rank {victim} (host {host}) exited with status 0 without finalize while the job ran; rank "
    );
    assert!(
        out.launcher_messages()
            .first()
            .is_some_and(|m| m.starts_with(&expected)),
        "expected a first line starting {expected:?}\n{out:?}"
    );
    assert!(
        out.lines_of(victim, &host, "stderr")
            .iter()
            .any(|l| l.starts_with(&format!(
                "dsm: rank {victim} on {host}: exiting without finalize while the job runs"
            ))),
        "{out:?}"
    );
    assert_no_leftovers(&token, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}
