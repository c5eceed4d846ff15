//! dsm programs started by the schedulers HPC users have, unchanged: Slurm's
//! `srun` (and `sbatch`) on a one-node cluster started for the test
//! (scripts/slurm-cluster.sh), and Open MPI's `mpirun`. Ranks meet through
//! the rank-0 rendezvous of the `dsm-rendezvous` crate.
//!
//! Needs root (slurmd, and Debian's packages are installed when missing);
//! skipped otherwise, with a SKIPPED line. With DSM_TEST_REQUIRE_SLURM=1
//! (CI, as root) a missing piece is a failure instead.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dsm_tests::{bin, run, scratch_dir, unique_token, Finished};

/// Whole jobs take about a second here; the limit only guards against hangs.
const LIMIT: Duration = Duration::from_secs(90);
/// What the rendezvous may take in these tests (the default is 120 s).
const RENDEZVOUS_TIMEOUT: &str = "20";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn script() -> PathBuf {
    repo_root().join("scripts/slurm-cluster.sh")
}

fn required() -> bool {
    std::env::var("DSM_TEST_REQUIRE_SLURM").is_ok_and(|v| v == "1")
}

/// Skips (or fails when required) with `why`.
fn skip(what: &str, why: &str) {
    assert!(!required(), "{what}: {why} and DSM_TEST_REQUIRE_SLURM=1");
    eprintln!("SKIPPED: {what}: {why}");
}

/// Root, and the packages installed (by scripts/slurm-cluster.sh install).
fn prerequisites(what: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        skip(
            what,
            "needs root (slurmd, package installation); scripts/test.sh runs it as root in CI",
        );
        return false;
    }
    let status = Command::new("timeout")
        .args(["-k", "10", "900"])
        .arg(script())
        .arg("install")
        .status();
    match status {
        Ok(s) if s.success() => true,
        other => {
            skip(
                what,
                &format!("slurm-cluster.sh install failed ({other:?})"),
            );
            false
        }
    }
}

/// A private directory for the rendezvous files (mode 0700).
fn rendezvous_dir(base: &Path) -> PathBuf {
    let dir = base.join("rendezvous");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// The rendezvous left no secret behind.
fn assert_no_rendezvous_files(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "rendezvous files left in {}: {left:?}",
        dir.display()
    );
}

struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    rendezvous: PathBuf,
}

impl Cluster {
    fn up() -> Option<Cluster> {
        let what = "the Slurm test";
        if !prerequisites(what) {
            return None;
        }
        let dir = std::env::temp_dir().join(unique_token("slurm"));
        // Ports below the ephemeral range, distinct for concurrent test runs.
        let port = 16000 + (std::process::id() % 8000) * 2;
        let status = Command::new("timeout")
            .args(["-k", "5", "60"])
            .arg(script())
            .arg("up")
            .arg(&dir)
            .env("DSM_SLURM_PORT", port.to_string())
            .status()
            .expect("run slurm-cluster.sh");
        let cluster = Cluster {
            conf: dir.join("slurm.conf"),
            rendezvous: rendezvous_dir(&dir),
            dir,
        };
        if !status.success() {
            skip(what, &format!("slurm-cluster.sh up failed ({status})"));
            return None;
        }
        Some(cluster)
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args)
            .current_dir(&self.dir)
            .env("SLURM_CONF", &self.conf)
            .env("DSM_RENDEZVOUS_DIR", &self.rendezvous)
            .env("DSM_RENDEZVOUS_TIMEOUT", RENDEZVOUS_TIMEOUT);
        c
    }

    fn srun(&self, args: &[&str]) -> Finished {
        run(self.command("srun", args), LIMIT)
    }

    /// Runs a batch job to its end: its exit code and output.
    fn sbatch(&self, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
        let output = self.dir.join(unique_token("batch"));
        let output_arg = output.display().to_string();
        let mut command = self.command("sbatch", &["--wait", "--output", &output_arg]);
        command.args(args).envs(env.iter().copied());
        let out = run(command, LIMIT);
        let text = std::fs::read_to_string(&output).unwrap_or_default();
        (out.code, format!("{text}\n(sbatch: {out:?})"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("down").arg(&self.dir).status();
    }
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

fn check_seed_example(out: &Finished, label: impl Fn(usize) -> String) {
    assert_eq!(out.code, Some(0), "{out:?}");
    let stdout = lines(&out.stdout);
    for rank in 0..4 {
        let line = format!(
            "{}[{rank}] base address of the shared space: 0x40000000",
            label(rank)
        );
        assert!(stdout.contains(&line.as_str()), "no {line:?}: {out:?}");
    }
    let read = format!("{}[1] read 4242 from page 0", label(1));
    assert!(stdout.contains(&read.as_str()), "no {read:?}: {out:?}");
}

fn check_roundrobin(out: &Finished, label: impl Fn(usize) -> String) {
    assert_eq!(out.code, Some(0), "{out:?}");
    for rank in 0..4 {
        let start = format!(
            "{}rank {rank}: 4 rounds over 100 pages verified (",
            label(rank)
        );
        assert!(
            out.stdout.lines().any(|l| l.starts_with(&start)),
            "no {start:?}: {out:?}"
        );
    }
}

fn check_roundrobin_output(output: &str) {
    for rank in 0..4 {
        let start = format!("rank {rank}: 4 rounds over 100 pages verified (");
        assert!(
            output.lines().any(|l| l.starts_with(&start)),
            "no {start:?} in the job output:\n{output}"
        );
    }
}

#[test]
fn jobs_under_slurm() {
    let Some(cluster) = Cluster::up() else { return };
    let exemple = bin("exemple").display().to_string();
    let roundrobin = bin("roundrobin").display().to_string();
    let dsmdie = bin("dsmdie").display().to_string();
    // srun --label prefixes each line with the task id: SLURM_PROCID must be the DSM rank.
    let label = |rank: usize| format!("{rank}: ");

    let out = cluster.srun(&["--label", "-n", "4", &exemple]);
    check_seed_example(&out, label);
    let out = cluster.srun(&["--label", "-n", "4", &roundrobin]);
    check_roundrobin(&out, label);
    assert_no_rendezvous_files(&cluster.rendezvous);

    // sbatch with the example script: the batch step itself is not a rank,
    // its srun step is the job.
    let script = repo_root().join("scripts/sbatch-example.sh");
    let (code, output) = cluster.sbatch(&[&script.display().to_string(), &roundrobin], &[]);
    assert_eq!(code, Some(0), "job output:\n{output}");
    check_roundrobin_output(&output);

    // mpirun inside a batch job: Open MPI's ranks, not the allocation's task ids.
    let as_root = [
        ("OMPI_ALLOW_RUN_AS_ROOT", "1"),
        ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
    ];
    let wrap = format!("mpirun {roundrobin}");
    let (code, output) = cluster.sbatch(&["-n", "4", "--wrap", &wrap], &as_root);
    assert_eq!(code, Some(0), "job output:\n{output}");
    check_roundrobin_output(&output);

    // The program run by the batch script itself (no srun): a clear refusal.
    let (code, output) = cluster.sbatch(&["-n", "2", "--wrap", &exemple], &[]);
    assert_ne!(code, Some(0), "job output:\n{output}");
    assert!(
        output.contains("start the program with `srun PROGRAM`"),
        "{output}"
    );

    // A task killed in a running job: the others notice, name it and end;
    // srun names it too.
    let out = cluster.srun(&["--label", "-n", "4", &dsmdie, "2", "after"]);
    assert!(!matches!(out.code, Some(0) | None), "{out:?}");
    assert!(lines(&out.stdout).contains(&"2: rank 2 dying"), "{out:?}");
    assert!(out.stderr.contains("task 2: Killed"), "{out:?}");
    for rank in [0, 1, 3] {
        let lost = format!("{rank}: dsm: rank {rank} on ");
        assert!(
            out.stderr
                .lines()
                .any(|l| l.starts_with(&lost) && l.contains("lost rank 2 on host")),
            "rank {rank} did not name rank 2: {out:?}"
        );
    }
    assert!(out.stderr.contains("Exited with exit code 70"), "{out:?}");
    assert!(out.elapsed < Duration::from_secs(30), "{out:?}");

    // A task stopped (SIGSTOP) in a running job: the others name it as not
    // responding after DSM_PEER_TIMEOUT and end; with --kill-on-bad-exit
    // srun then ends the stopped task too (without it srun would wait for
    // the stopped task, as for any).
    let mut command = cluster.command("srun", &["-K", "--label", "-n", "4", &dsmdie, "2", "stop"]);
    command.env("DSM_PEER_TIMEOUT", "3");
    let out = run(command, LIMIT);
    assert!(!matches!(out.code, Some(0) | None), "{out:?}");
    assert!(
        lines(&out.stdout).contains(&"2: rank 2 stopping"),
        "{out:?}"
    );
    // Whoever notices first names rank 2; a rank whose check comes after
    // the first survivor's exit may report that exit instead.
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("lost rank 2 on host") && l.contains("not responding")),
        "nobody named rank 2 as not responding: {out:?}"
    );
    assert!(out.elapsed < Duration::from_secs(30), "{out:?}");

    // A task that dies before joining: rank 0 names it when the
    // rendezvous times out, and tells the others.
    let mut command = cluster.command("srun", &["--label", "-n", "4", &dsmdie, "2", "before"]);
    // Long enough for ranks 1 and 3 to register on a loaded machine (only
    // rank 2 is then named), short against the default (120 s).
    command.env("DSM_RENDEZVOUS_TIMEOUT", "10");
    let out = run(command, LIMIT);
    assert!(!matches!(out.code, Some(0) | None), "{out:?}");
    assert!(
        out.stderr.contains("task 2: Exited with exit code 3"),
        "{out:?}"
    );
    for rank in [0, 1, 3] {
        let prefix = format!("{rank}: dsmdie: joining the job: rank ");
        assert!(
            out.stderr.lines().any(|l| l.starts_with(&prefix)
                && l.contains("rank 2 of 4 did not register within 10 s")),
            "rank {rank} did not name rank 2: {out:?}"
        );
    }
    assert!(out.elapsed < Duration::from_secs(40), "{out:?}");
    // With --kill-on-bad-exit, srun ends the step at once (the others would
    // wait out the default rendezvous timeout, 120 s).
    let out = cluster.srun(&["-K", "-n", "4", &dsmdie, "2", "before"]);
    assert!(!matches!(out.code, Some(0) | None), "{out:?}");
    assert!(
        out.stderr.contains("task 2: Exited with exit code 3"),
        "{out:?}"
    );
    assert!(out.elapsed < Duration::from_secs(30), "{out:?}");
    // Killed while waiting, rank 0 could not remove its file: it is private
    // (0600), and the next rank 0 publishing there removes it once expired.
    for entry in std::fs::read_dir(&cluster.rendezvous).unwrap().flatten() {
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{:?}", entry.path());
        std::fs::remove_file(entry.path()).unwrap();
    }
}

fn mpirun(dir: &Path, rendezvous: &Path, args: &[&str]) -> Finished {
    mpirun_with(dir, rendezvous, args, &[])
}

/// `mpirun` with extra environment variables for the ranks.
fn mpirun_with(dir: &Path, rendezvous: &Path, args: &[&str], env: &[(&str, &str)]) -> Finished {
    let mut c = Command::new("mpirun");
    for (name, value) in env.iter() {
        // Open MPI forwards variables named with -x.
        c.env(name, value).args(["-x", name]);
    }
    c.args(["-np", "4", "--oversubscribe"])
        .args(args)
        .current_dir(dir)
        // As root Open MPI refuses to start without these.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("DSM_RENDEZVOUS_DIR", rendezvous)
        .env("DSM_RENDEZVOUS_TIMEOUT", RENDEZVOUS_TIMEOUT);
    // A Slurm allocation around the test run would make mpirun use it.
    for (name, _) in std::env::vars() {
        if name.starts_with("SLURM_") {
            c.env_remove(name);
        }
    }
    run(c, LIMIT)
}

#[test]
fn jobs_under_mpirun() {
    if !prerequisites("the mpirun test") {
        return;
    }
    let dir = scratch_dir(&unique_token("mpirun"));
    let rendezvous = rendezvous_dir(&dir);
    let no_label = |_: usize| String::new();

    let out = mpirun(&dir, &rendezvous, &[&bin("exemple").display().to_string()]);
    check_seed_example(&out, no_label);
    let out = mpirun(
        &dir,
        &rendezvous,
        &[&bin("roundrobin").display().to_string()],
    );
    check_roundrobin(&out, no_label);

    // A killed rank ends the job, with a message naming it.
    let out = mpirun(
        &dir,
        &rendezvous,
        &[&bin("dsmdie").display().to_string(), "2", "after"],
    );
    assert!(!matches!(out.code, Some(0) | None), "{out:?}");
    assert!(lines(&out.stdout).contains(&"rank 2 dying"), "{out:?}");
    // Whoever notices first names rank 2: the other ranks ("lost rank 2"),
    // or mpirun ("process rank 2 ... exited on signal 9") when it stopped
    // them before they noticed.
    assert!(
        out.stderr.contains("lost rank 2 on host") || out.stderr.contains("process rank 2 "),
        "{out:?}"
    );
    assert!(out.elapsed < Duration::from_secs(30), "{out:?}");

    // A stopped rank: the others name it as not responding; mpirun then
    // ends the job, the stopped rank included.
    let command_env = [("DSM_PEER_TIMEOUT", "3")];
    let out = mpirun_with(
        &dir,
        &rendezvous,
        &[&bin("dsmdie").display().to_string(), "2", "stop"],
        &command_env,
    );
    assert!(!matches!(out.code, Some(0) | None), "{out:?}");
    assert!(lines(&out.stdout).contains(&"rank 2 stopping"), "{out:?}");
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("lost rank 2 on host") && l.contains("not responding")),
        "{out:?}"
    );
    assert!(out.elapsed < Duration::from_secs(30), "{out:?}");
    assert_no_rendezvous_files(&rendezvous);
    let _ = std::fs::remove_dir_all(&dir);
}
