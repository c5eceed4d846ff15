//! dsmexec over real SSH onto a cluster of network namespaces on this
//! machine (scripts/netns-cluster.sh): one sshd per "host", each with its
//! own address and hostname. Needs root; scripts/test.sh sets
//! DSM_TEST_REQUIRE_NETNS=1 when run as root so that CI cannot skip it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dsm_tests::{assert_no_leftovers, bin, dsmexec, run, unique_token};

const LIMIT: Duration = Duration::from_secs(120);
const HOSTS: [&str; 3] = ["10.77.0.2", "10.77.0.3", "10.77.0.4"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

struct Cluster {
    dir: PathBuf,
    ssh: String,
}

impl Cluster {
    fn up() -> Option<Cluster> {
        let required = std::env::var("DSM_TEST_REQUIRE_NETNS").is_ok_and(|v| v == "1");
        if !nix::unistd::geteuid().is_root() {
            assert!(
                !required,
                "DSM_TEST_REQUIRE_NETNS=1 but not running as root"
            );
            eprintln!("SKIPPED: the SSH cluster test needs root (network namespaces); scripts/test.sh runs it as root in CI");
            return None;
        }
        let dir = std::env::temp_dir().join(unique_token("netns"));
        let script = repo_root().join("scripts/netns-cluster.sh");
        let status = Command::new(&script)
            .args(["up", "3"])
            .arg(&dir)
            .status()
            .expect("run netns-cluster.sh");
        let cluster = Cluster {
            ssh: std::fs::read_to_string(dir.join("ssh_command"))
                .unwrap_or_default()
                .trim()
                .to_string(),
            dir,
        };
        if !status.success() {
            assert!(
                !required,
                "netns-cluster.sh up failed ({status}) and DSM_TEST_REQUIRE_NETNS=1"
            );
            eprintln!("SKIPPED: netns-cluster.sh up failed ({status})");
            return None;
        }
        Some(cluster)
    }

    fn machinefile(&self, name: &str, text: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = repo_root().join("scripts/netns-cluster.sh");
        let _ = Command::new(script).arg("down").arg(&self.dir).status();
    }
}

#[test]
fn jobs_across_three_ssh_hosts() {
    let Some(cluster) = Cluster::up() else { return };
    let ssh = cluster.ssh.clone();
    let machines = cluster.machinefile(
        "machines",
        &format!(
            "# three hosts, four ranks\n{}\n{} slots=2\n{}\n",
            HOSTS[0], HOSTS[1], HOSTS[2]
        ),
    );
    let rank_host = [HOSTS[0], HOSTS[1], HOSTS[1], HOSTS[2]];
    let node_name = ["dsmnode1", "dsmnode2", "dsmnode2", "dsmnode3"];
    let testprog = bin("testprog").display().to_string();

    // Every rank runs on its own host, listens on that host's address, and
    // its output comes back prefixed with that host.
    let out = run(
        dsmexec(
            &["--ssh", &ssh, &machines, &testprog, "t", "hostname"],
            &cluster.dir,
        ),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    for (rank, host) in rank_host.into_iter().enumerate() {
        let lines = out.lines_of(rank, host, "stdout");
        assert_eq!(lines.len(), 1, "rank {rank}: {out:?}");
        let expected_prefix = format!("host {} listen {}:", node_name[rank], host);
        assert!(
            lines[0].starts_with(&expected_prefix),
            "rank {rank}: {:?}",
            lines[0]
        );
    }

    // truc: the working directory follows the job, arguments arrive intact.
    std::fs::write(cluster.dir.join("titi"), "salut\n").unwrap();
    let truc = bin("truc").display().to_string();
    let out = run(
        dsmexec(
            &["--ssh", &ssh, &machines, &truc, "x y", "$HOME"],
            &cluster.dir,
        ),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    for (rank, host) in rank_host.into_iter().enumerate() {
        assert_eq!(
            out.lines_of(rank, host, "stdout"),
            [
                format!("cwd: {}", cluster.dir.display()),
                "argc: 3".into(),
                "titi: opened, 6 bytes: salut".into()
            ]
        );
        // The remote login shell may print first (a shell start-up file's
        // warnings are the rank's stderr too): the program's lines end it.
        let stderr = out.lines_of(rank, host, "stderr");
        let program: [String; 3] = [
            format!("argv[0]: {truc}"),
            "argv[1]: x y".into(),
            "argv[2]: $HOME".into(),
        ];
        assert!(stderr.ends_with(&program), "{stderr:?}");
    }

    // All-to-all connections cross the namespaces.
    let alltoall = bin("alltoall").display().to_string();
    let out = run(
        dsmexec(
            &["--ssh", &ssh, &machines, &alltoall, "200000"],
            &cluster.dir,
        ),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    for (rank, host) in rank_host.into_iter().enumerate() {
        assert_eq!(
            out.lines_of(rank, host, "stdout"),
            [format!(
                "rank {rank} on {}: 3 messages from every other rank verified",
                host
            )]
        );
    }

    // A DSM job mixing transports: ranks 1 and 2 share a host and talk
    // through rings in shared memory, every other pair over TCP between
    // the namespaces; the sums are exact.
    let segments = bin("segments").display().to_string();
    let mut mixed = dsmexec(
        &["--ssh", &ssh, &machines, &segments, "collective"],
        &cluster.dir,
    );
    mixed.env("DSM_LOG", "info");
    let out = run(mixed, LIMIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    for (rank, host) in rank_host.into_iter().enumerate() {
        let stdout = out.lines_of(rank, host, "stdout");
        assert!(
            stdout.len() == 1
                && stdout[0].starts_with(&format!(
                    "rank {rank}: collective segments verified: same addresses on every rank, sums exact"
                )),
            "rank {rank}: {stdout:?}"
        );
        let shared = out
            .lines_of(rank, host, "stderr")
            .into_iter()
            .filter(|l| l.contains("shared memory with rank(s)"))
            .collect::<Vec<_>>();
        let expected: Vec<String> = match rank {
            1 => vec!["rank 1: shared memory with rank(s) 2".into()],
            2 => vec!["rank 2: shared memory with rank(s) 1".into()],
            _ => vec![],
        };
        assert!(
            shared.len() == expected.len()
                && shared
                    .iter()
                    .zip(&expected)
                    .all(|(l, e)| l.ends_with(e.as_str())),
            "rank {rank}: {shared:?}"
        );
    }

    // A remote rank that exits 3 fails the job with its status; the others stop.
    let token = unique_token("sshfail");
    let out = run(
        dsmexec(
            &[
                "--ssh", &ssh, &machines, &testprog, &token, "fail", "3", "3",
            ],
            &cluster.dir,
        ),
        LIMIT,
    );
    assert_eq!(out.code, Some(3), "{out:?}");
    assert_eq!(
        out.launcher_messages(),
        [format!(
            "dsmexec: rank 3 (host {}) exited with status 3",
            HOSTS[2]
        )]
    );
    assert_no_leftovers(&token, Duration::from_secs(10));

    // A remote rank killed by a signal.
    let token = unique_token("sshkill");
    let out = run(
        dsmexec(
            &[
                "--ssh", &ssh, &machines, &testprog, &token, "raise", "1", "9",
            ],
            &cluster.dir,
        ),
        LIMIT,
    );
    assert_eq!(out.code, Some(137), "{out:?}");
    assert_eq!(
        out.launcher_messages(),
        [format!(
            "dsmexec: rank 1 (host {}) was killed by signal 9 (SIGKILL)",
            HOSTS[1]
        )]
    );
    assert_no_leftovers(&token, Duration::from_secs(10));

    // A program missing on the hosts is reported with the host.
    let out = run(
        dsmexec(&["--ssh", &ssh, &machines, "/no/such/prog"], &cluster.dir),
        LIMIT,
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    let messages = out.launcher_messages();
    assert_eq!(messages.len(), 1, "{out:?}");
    assert!(
        messages[0].contains("/no/such/prog") && messages[0].contains("(host 10.77.0."),
        "{messages:?}"
    );

    // An unreachable host (nobody at that address) is named within the bound.
    let unreachable = cluster.machinefile("unreachable", &format!("{}\n10.77.0.99\n", HOSTS[0]));
    let out = run(
        dsmexec(
            &[
                "--ssh",
                &ssh,
                "--startup-timeout",
                "4",
                &unreachable,
                &testprog,
                "t",
                "hostname",
            ],
            &cluster.dir,
        ),
        LIMIT,
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    let messages = out.launcher_messages();
    assert_eq!(messages.len(), 1, "{out:?}");
    assert!(
        messages[0].contains("rank 1 (host 10.77.0.99)"),
        "{messages:?}"
    );
    assert!(
        out.elapsed < Duration::from_secs(20),
        "took {:?}",
        out.elapsed
    );
}
