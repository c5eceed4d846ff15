//! dsmexec with local processes: output forwarding, exit statuses, signals,
//! bad input, and no process left behind.

use std::time::Duration;

use dsm_tests::{
    assert_no_leftovers, bin, dsmexec, run, scratch_dir, short_hostname, unique_token, Running,
    ScratchDir,
};

const LIMIT: Duration = Duration::from_secs(60);

fn temp_dir(label: &str) -> ScratchDir {
    scratch_dir(&unique_token(label))
}

fn testprog() -> String {
    bin("testprog").display().to_string()
}

#[test]
fn truc_lines_arrive_with_rank_host_and_stream_for_1_4_8_ranks() {
    let dir = temp_dir("truc");
    std::fs::write(dir.join("titi"), "bonjour\n").unwrap();
    let truc = bin("truc").display().to_string();
    let host = short_hostname();
    for n in [1usize, 4, 8] {
        let out = run(
            dsmexec(&["-n", &n.to_string(), &truc, "alpha", "b c"], &dir),
            LIMIT,
        );
        assert_eq!(out.code, Some(0), "{out:?}");
        for rank in 0..n {
            let stdout = out.lines_of(rank, &host, "stdout");
            assert_eq!(
                stdout,
                [
                    format!("cwd: {}", dir.display()),
                    "argc: 3".to_string(),
                    "titi: opened, 8 bytes: bonjour".to_string()
                ],
                "rank {rank} of {n}: {out:?}"
            );
            let stderr = out.lines_of(rank, &host, "stderr");
            assert_eq!(
                stderr,
                [
                    format!("argv[0]: {truc}"),
                    "argv[1]: alpha".into(),
                    "argv[2]: b c".into()
                ]
            );
        }
        // Nothing else was printed.
        assert_eq!(out.stdout.lines().count(), 3 * n);
        assert_eq!(out.stderr.lines().count(), 3 * n);
    }
}

#[test]
fn no_prefix_prints_lines_as_they_are() {
    let dir = temp_dir("noprefix");
    let truc = bin("truc").display().to_string();
    let out = run(dsmexec(&["--no-prefix", "-n", "2", &truc], &dir), LIMIT);
    assert_eq!(out.code, Some(0));
    assert_eq!(
        out.stdout.lines().filter(|l| *l == "argc: 1").count(),
        2,
        "{out:?}"
    );
    assert!(!out.stdout.contains('['));
}

#[test]
fn all_to_all_over_tcp_at_4_and_8_ranks() {
    let dir = temp_dir("alltoall");
    let host = short_hostname();
    let prog = bin("alltoall").display().to_string();
    for n in [4usize, 8] {
        let out = run(
            dsmexec(&["-n", &n.to_string(), &prog, "300000"], &dir),
            LIMIT,
        );
        assert_eq!(out.code, Some(0), "{out:?}");
        for rank in 0..n {
            assert_eq!(
                out.lines_of(rank, &host, "stdout"),
                [format!(
                    "rank {rank} on {host}: {} messages from every other rank verified",
                    n - 1
                )]
            );
        }
    }
}

#[test]
fn megabytes_of_output_written_just_before_exit_are_all_forwarded() {
    let dir = temp_dir("spew");
    let token = unique_token("spew");
    let host = short_hostname();
    const LINES: usize = 20_000; // ~2 MiB of stdout per rank
    let out = run(
        dsmexec(
            &["-n", "3", &testprog(), &token, "spew", &LINES.to_string()],
            &dir,
        ),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for rank in 0..3 {
        let stdout = out.lines_of(rank, &host, "stdout");
        let stderr = out.lines_of(rank, &host, "stderr");
        assert_eq!(stdout.len(), LINES, "rank {rank} stdout");
        assert_eq!(stderr.len(), LINES, "rank {rank} stderr");
        let pad = "x".repeat(100);
        for (i, line) in stdout.iter().enumerate() {
            assert_eq!(*line, format!("rank {rank} out {i} {pad}"));
        }
        for (i, line) in stderr.iter().enumerate() {
            assert_eq!(*line, format!("rank {rank} err {i}"));
        }
    }
}

#[test]
fn a_failing_rank_sets_the_status_and_the_others_are_stopped() {
    let dir = temp_dir("fail");
    let token = unique_token("fail");
    let host = short_hostname();
    let out = run(
        dsmexec(&["-n", "4", &testprog(), &token, "fail", "2", "3"], &dir),
        LIMIT,
    );
    assert_eq!(out.code, Some(3), "{out:?}");
    assert_eq!(
        out.launcher_messages(),
        [format!(
            "dsmexec: rank 2 (host {host}) exited with status 3"
        )]
    );
    assert_no_leftovers(&token, Duration::from_secs(5));
}

#[test]
fn a_rank_killed_by_a_signal_is_named_with_the_signal() {
    let dir = temp_dir("raise");
    let token = unique_token("raise");
    let host = short_hostname();
    let out = run(
        dsmexec(&["-n", "3", &testprog(), &token, "raise", "1", "9"], &dir),
        LIMIT,
    );
    assert_eq!(out.code, Some(128 + 9), "{out:?}");
    assert_eq!(
        out.launcher_messages(),
        [format!(
            "dsmexec: rank 1 (host {host}) was killed by signal 9 (SIGKILL)"
        )]
    );
    assert_no_leftovers(&token, Duration::from_secs(5));
}

#[test]
fn ranks_ignoring_sigterm_are_killed_after_the_grace_period() {
    let dir = temp_dir("ignore");
    let token = unique_token("ignore");
    let mut job = Running::start(
        dsmexec(
            // Long enough for every rank to print that it ignored the
            // SIGTERM before the SIGKILL, on a loaded machine too.
            &["--grace", "3", "-n", "3", &testprog(), &token, "ignore"],
            &dir,
        ),
        LIMIT,
    );
    job.await_lines(3, |l| l.contains("ready pid"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(job.child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let out = job.finish();
    assert_eq!(out.code, Some(128 + 15), "{out:?}");
    assert_eq!(out.stdout.matches("ignored SIGTERM").count(), 3, "{out:?}");
    assert_no_leftovers(&token, Duration::from_secs(5));
}

#[test]
fn sigint_and_sigterm_reach_every_rank() {
    for (signal, name) in [
        (nix::sys::signal::SIGTERM, "SIGTERM"),
        (nix::sys::signal::SIGINT, "SIGINT"),
    ] {
        let dir = temp_dir("signal");
        let token = unique_token("signal");
        let mut job = Running::start(
            dsmexec(&["-n", "4", &testprog(), &token, "wait"], &dir),
            LIMIT,
        );
        job.await_lines(4, |l| l.contains("ready pid"));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(job.child.id() as i32), signal).unwrap();
        let out = job.finish();
        assert_eq!(out.code, Some(128 + signal as i32), "{out:?}");
        let host = short_hostname();
        for rank in 0..4 {
            assert!(
                out.lines_of(rank, &host, "stdout")
                    .contains(&format!("caught {name}")),
                "rank {rank} did not get {name}: {out:?}"
            );
        }
        assert_no_leftovers(&token, Duration::from_secs(5));
    }
}

#[test]
fn killing_dsmexec_stops_every_rank_and_their_children() {
    let dir = temp_dir("orphan");
    let token = unique_token("orphan");
    let mut job = Running::start(
        dsmexec(&["-n", "2", &testprog(), &token, "orphan"], &dir),
        LIMIT,
    );
    job.await_lines(2, |l| l.contains("ready pid"));
    job.child.kill().unwrap(); // SIGKILL: dsmexec cannot clean up itself
    let _ = job.child.wait();
    // dsmwrap notices the lost control connection: SIGTERM, then SIGKILL
    // after its grace period (3 s) for the grandchild that ignores SIGTERM.
    assert_no_leftovers(&token, Duration::from_secs(10));
}

fn assert_usage_error(args: &[&str], expect: &str) {
    let dir = temp_dir("usage");
    let out = run(dsmexec(args, &dir), LIMIT);
    assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {lines:?}");
    assert!(lines[0].starts_with("dsmexec: "), "{lines:?}");
    assert!(
        lines[0].contains(expect),
        "{args:?}: {:?} does not mention {expect:?}",
        lines[0]
    );
}

#[test]
fn bad_input_gets_one_line_and_exit_code_2() {
    let dir = temp_dir("badinput");
    let empty = dir.join("empty");
    std::fs::write(&empty, "# only a comment\n\n").unwrap();
    let bad = dir.join("bad");
    std::fs::write(&bad, "localhost\nnode2 cpus=4\n").unwrap();
    let empty = empty.display().to_string();
    let bad = bad.display().to_string();
    assert_usage_error(
        &["/no/such/machinefile", "true"],
        "cannot read machine file /no/such/machinefile",
    );
    assert_usage_error(&[&empty, "true"], "lists no hosts");
    assert_usage_error(&[&bad, "true"], "line 2: unknown attribute \"cpus=4\"");
    assert_usage_error(&["--frobnicate", "-n", "2", "true"], "--frobnicate");
    assert_usage_error(&["-n", "0", "true"], "-n 0");
    assert_usage_error(&["-n", "2"], "missing PROGRAM");
    assert_usage_error(&["-n", "2", "/no/such/program"], "/no/such/program");
    assert_usage_error(
        &["-n", "2", "no-such-program-anywhere"],
        "not found in PATH",
    );
}

#[test]
fn an_unresolvable_host_is_named_quickly() {
    let dir = temp_dir("unreachable");
    let file = dir.join("machines");
    std::fs::write(&file, "localhost\nno-such-host.invalid\n").unwrap();
    let out = run(
        dsmexec(
            &[
                "--startup-timeout",
                "10",
                &file.display().to_string(),
                "true",
            ],
            &dir,
        ),
        LIMIT,
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    let messages = out.launcher_messages();
    assert_eq!(messages.len(), 1, "{out:?}");
    assert!(
        messages[0].contains("rank 1 (host no-such-host.invalid)"),
        "{messages:?}"
    );
    assert!(
        out.elapsed < Duration::from_secs(30),
        "took {:?}",
        out.elapsed
    );
}
