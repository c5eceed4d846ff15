//! The MPI baseline of the Jacobi kernel (issue 27): `bench/jacobi-vs-mpi.sh`
//! builds the C kernel for MPI and for dsm.h against the built libdsm, runs
//! both and the Rust `kernels jacobi` on small sizes, and fails unless
//! their checksums agree (MPI and DSM C bit for bit).
//!
//! Missing mpicc, mpirun or mpi.h skips the test with a SKIPPED line, or
//! fails it with DSM_TEST_REQUIRE_TOOLCHAINS=1.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dsm_tests::{assert_no_leftovers, bin, run, scratch_dir, unique_token};

const LIMIT: Duration = Duration::from_secs(240);

fn required() -> bool {
    std::env::var("DSM_TEST_REQUIRE_TOOLCHAINS").is_ok_and(|v| v == "1")
}

#[test]
fn jacobi_on_mpi_dsm_c_and_rust_gives_one_checksum() {
    let token = unique_token("mpibaseline");
    // TMPDIR: the script's scratch directory (and Open MPI's session
    // directory) in ours, so the ranks' command lines carry the token.
    let tmp = scratch_dir(&token);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root");
    let bin_dir = bin("dsmexec")
        .parent()
        .expect("target directory")
        .to_path_buf();
    let mut command = Command::new("timeout");
    command
        .args(["-k", "10", "200"])
        .arg(root.join("bench/jacobi-vs-mpi.sh"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .args(["--rounds", "1"]);
    if !required() {
        command.arg("--skip-missing");
    }
    command.args(["256", "5"]).env("TMPDIR", &*tmp);
    let out = run(command, LIMIT);
    assert_no_leftovers(&token, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&tmp);
    if let Some(line) = out.stdout.lines().find(|l| l.starts_with("SKIPPED:")) {
        eprintln!("SKIPPED: mpi_baseline: {line}");
        return;
    }
    assert_eq!(out.code, Some(0), "{out:?}");
    // 256 x 256, 5 sweeps: the serial checksum, exact in binary.
    assert!(
        out.stdout
            .lines()
            .any(|l| l == "checksums equal: 93255.64453125"),
        "{out:?}"
    );
    for name in ["mpi:", "dsm-c:", "rust:"] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with(&format!("round 1 {name}"))),
            "no {name} run: {out:?}"
        );
    }
}
