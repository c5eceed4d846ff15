//! Application kernels through dsmexec, each checked by the program against
//! a serial run of the same code: Jacobi 2-D (2048 x 2048, 50 iterations)
//! at 1, 2 and 4 ranks, dense matrix multiply, histogram with atomics;
//! and how many faults Jacobi's first touch of its rows takes. (Their
//! speed is measured in bench/, never asserted here.)

use std::time::Duration;

use dsm_core::StatsSnapshot;
use dsm_tests::{bin, dsmexec, run, scratch_dir, short_hostname, unique_token};

const LIMIT: Duration = Duration::from_secs(300);

fn kernel(ranks: usize, space: &str, args: &[&str]) -> String {
    kernel_with(ranks, &[("DSM_SPACE_SIZE", space)], args)
}

fn kernel_with(ranks: usize, env: &[(&str, &str)], args: &[&str]) -> String {
    let dir = scratch_dir(&unique_token("kernels"));
    let n = ranks.to_string();
    let prog = bin("kernels").display().to_string();
    let mut all = vec!["-n", n.as_str(), prog.as_str()];
    all.extend_from_slice(args);
    let mut command = dsmexec(&all, &dir);
    command.envs(env.iter().copied());
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

/// A rank's first touch of its own rows (pages homed at it, never touched)
/// maps 64 pages per fault (`DSM_POPULATE`), not one: each rank's two
/// 256-page blocks (512 rows of 512 doubles, split in two) cost 4 faults
/// each, and the other 63 pages of each fault are populated with it. With
/// `DSM_POPULATE=0`, every page faults. The results are the same.
#[test]
fn jacobi_first_touch_maps_each_ranks_rows_64_pages_per_fault() {
    let dir = scratch_dir(&unique_token("firsttouch"));
    for populate in ["64", "0"] {
        let stats = dir.join(format!("populate-{populate}-%r.json"));
        let stats = stats.display().to_string();
        let env = [
            ("DSM_SPACE_SIZE", "16M"),
            ("DSM_POPULATE", populate),
            ("DSM_STATS", "json"),
            ("DSM_STATS_FILE", stats.as_str()),
        ];
        let line = kernel_with(2, &env, &["jacobi", "512", "4"]);
        assert!(
            line.starts_with(
                "rank 0: jacobi 512x512, 4 iterations, 2 ranks: checksum 174784.406250 equals the serial run"
            ),
            "{line}"
        );
        for rank in 0..2 {
            let path = stats.replace("%r", &rank.to_string());
            let text = std::fs::read_to_string(&path).expect("the rank's statistics");
            let doc: StatsSnapshot = serde_json::from_str(&text).expect("a JSON document");
            if populate == "0" {
                assert_eq!(doc.pages_populated, 0, "rank {rank}: {doc:?}");
                assert!(doc.write_faults >= 512, "rank {rank}: {doc:?}");
            } else {
                assert_eq!(doc.pages_populated, 2 * 4 * 63, "rank {rank}: {doc:?}");
                assert!(doc.write_faults < 64, "rank {rank}: {doc:?}");
            }
        }
    }
}

/// A home pushes the rows a neighbour reads after each barrier (`DSM_PUSH`,
/// on by default): once the neighbour asked for a row again after losing
/// it to a write, the row comes with the barrier and the neighbour reads it
/// without a fault. The results equal the serial run's with and without,
/// and pushing takes most of the read faults away.
#[test]
fn jacobi_boundary_rows_are_pushed_to_the_neighbour_at_barriers() {
    let dir = scratch_dir(&unique_token("push"));
    let mut read_faults = Vec::new();
    for push in ["8", "0"] {
        let stats = dir.join(format!("push-{push}-%r.json"));
        let stats = stats.display().to_string();
        let env = [
            ("DSM_SPACE_SIZE", "16M"),
            ("DSM_PUSH", push),
            ("DSM_STATS", "json"),
            ("DSM_STATS_FILE", stats.as_str()),
        ];
        let line = kernel_with(2, &env, &["jacobi", "512", "40"]);
        assert!(
            line.starts_with("rank 0: jacobi 512x512, 40 iterations, 2 ranks: checksum ")
                && line.contains(" equals the serial run"),
            "{line}"
        );
        let mut faults = 0;
        for rank in 0..2 {
            let path = stats.replace("%r", &rank.to_string());
            let text = std::fs::read_to_string(&path).expect("the rank's statistics");
            let doc: StatsSnapshot = serde_json::from_str(&text).expect("a JSON document");
            if push == "0" {
                assert_eq!(doc.pages_pushed, 0, "rank {rank}: {doc:?}");
            } else {
                assert!(doc.pages_pushed >= 20, "rank {rank}: {doc:?}");
            }
            faults += doc.read_faults;
        }
        read_faults.push(faults);
    }
    assert!(
        read_faults[0] * 2 < read_faults[1],
        "read faults with pushes {} and without {}",
        read_faults[0],
        read_faults[1]
    );
}
