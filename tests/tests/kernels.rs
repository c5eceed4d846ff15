//! Application kernels through dsmexec, each checked by the program against
//! a serial run of the same code: Jacobi 2-D (2048 x 2048, 50 iterations)
//! at 1, 2 and 4 ranks, dense matrix multiply, histogram with atomics.
//! (Their speed is measured in bench/, never asserted here.)

use std::time::Duration;

use dsm_tests::{bin, dsmexec, run, short_hostname, unique_token};

const LIMIT: Duration = Duration::from_secs(300);

fn kernel(ranks: usize, space: &str, args: &[&str]) -> String {
    let dir = std::env::temp_dir().join(unique_token("kernels"));
    std::fs::create_dir_all(&dir).unwrap();
    let n = ranks.to_string();
    let prog = bin("kernels").display().to_string();
    let mut all = vec!["-n", n.as_str(), prog.as_str()];
    all.extend_from_slice(args);
    let mut command = dsmexec(&all, &dir);
    command.env("DSM_SPACE_SIZE", space);
    let out = run(command, LIMIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines = out.lines_of(0, &short_hostname(), "stdout");
    assert_eq!(lines.len(), 1, "{out:?}");
    eprintln!("{}", lines[0]);
    lines[0].clone()
}

#[test]
fn jacobi_2048_matches_the_serial_run_at_1_2_and_4_ranks() {
    for ranks in [1, 2, 4] {
        let line = kernel(ranks, "256M", &["jacobi", "2048", "50"]);
        assert!(
            line.starts_with(&format!(
                "rank 0: jacobi 2048x2048, 50 iterations, {ranks} ranks: checksum 1828768.154534 equals the serial run"
            )),
            "{line}"
        );
    }
}

#[test]
fn matrix_multiply_matches_the_serial_product() {
    for ranks in [1, 2, 4] {
        let line = kernel(ranks, "16M", &["matmul", "256"]);
        assert!(
            line.starts_with(&format!(
                "rank 0: matmul 256x256, {ranks} ranks: every element equals the serial product"
            )),
            "{line}"
        );
    }
}

#[test]
fn histogram_with_atomics_matches_the_serial_histogram() {
    let line = kernel(4, "1M", &["histogram", "100000"]);
    assert!(
        line.starts_with("rank 0: histogram of 400000 values in 256 buckets, 4 ranks: equals the serial histogram"),
        "{line}"
    );
}
