//! Statistics for people (issue 24): `DSM_STATS=json` writes each rank's
//! statistics as one JSON document (stderr, or `DSM_STATS_FILE` with `%r`
//! for the rank), and `dsmexec --stats-report FILE` gathers them into an
//! HTML page whose numbers must be the ranks' own.

use std::time::Duration;

use dsm_core::StatsSnapshot;
use dsm_tests::{bin, dsmexec, run, scratch_dir, unique_token};

const RANKS: usize = 3;
const LIMIT: Duration = Duration::from_secs(60);

/// The cells of the report's table `id`, row by row (header cells out).
fn table(html: &str, id: &str) -> Vec<Vec<String>> {
    let start = html
        .find(&format!("<table id=\"{id}\">"))
        .unwrap_or_else(|| panic!("no table {id}"));
    let end = start + html[start..].find("</table>").expect("table end");
    html[start..end]
        .split("<tr>")
        .skip(1)
        .map(|row| {
            row.split("<td>")
                .skip(1)
                .map(|cell| cell.split("</td>").next().unwrap_or("").to_string())
                .collect::<Vec<String>>()
        })
        .filter(|cells| !cells.is_empty())
        .collect()
}

#[test]
fn the_stats_report_shows_the_numbers_the_ranks_sent() {
    let dir = scratch_dir(&unique_token("statsreport"));
    let report = dir.join("report.html");
    let mut cmd = dsmexec(
        &[
            "--stats-report",
            &report.display().to_string(),
            "-n",
            &RANKS.to_string(),
            &bin("roundrobin").display().to_string(),
        ],
        &dir,
    );
    cmd.env_remove("DSM_STATS");
    let out = run(cmd, LIMIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        !out.stderr.contains("dsm-stats-json"),
        "the JSON lines leaked into the output: {out:?}"
    );
    assert!(
        out.launcher_messages().iter().any(|m| m.contains(&format!(
            "statistics of {RANKS} of {RANKS} rank(s) written to"
        ))),
        "{out:?}"
    );
    let html = std::fs::read_to_string(&report).expect("the report");
    assert_eq!(
        html.matches("<svg").count(),
        1 + RANKS,
        "a heat map and a histogram per rank"
    );

    // The documents the ranks sent, as embedded in the page.
    let start = html.find("id=\"dsm-stats\">").expect("embedded JSON") + "id=\"dsm-stats\">".len();
    let end = start + html[start..].find("</script>").expect("script end");
    let docs: Vec<StatsSnapshot> =
        serde_json::from_str(html[start..end].trim()).expect("the embedded JSON parses");
    assert_eq!(docs.len(), RANKS);

    let traffic = table(&html, "traffic");
    let counters = table(&html, "counters");
    for (rank, doc) in docs.iter().enumerate() {
        assert_eq!(doc.rank, rank);
        assert_eq!(doc.pages_sent_to.len(), RANKS);
        assert_eq!(
            doc.pages_sent_to.iter().sum::<u64>(),
            doc.pages_sent,
            "rank {rank}: per-destination pages add up to the total"
        );
        assert_eq!(doc.pages_sent_to[rank], 0, "rank {rank} sent itself pages");
        assert!(doc.pages_received > 0, "rank {rank} received nothing");
        assert_eq!(
            doc.fault_latency_histogram.iter().sum::<u64>(),
            doc.fault_latency_samples,
            "rank {rank}: the histogram counts every timed fault"
        );
        let row: Vec<u64> = traffic[rank]
            .iter()
            .map(|c| c.parse().expect("a number"))
            .collect();
        assert_eq!(row, doc.pages_sent_to, "heat map row {rank}");
        assert_eq!(counters[rank][0], rank.to_string());
        assert_eq!(counters[rank][2], doc.read_faults.to_string());
        assert_eq!(counters[rank][4], doc.pages_sent.to_string());
        assert_eq!(counters[rank][5], doc.pages_received.to_string());
    }
    // Every page one rank received, another sent.
    let sent: u64 = docs.iter().map(|d| d.pages_sent).sum();
    assert!(sent > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dsm_stats_json_writes_one_file_per_rank() {
    let dir = scratch_dir(&unique_token("statsjson"));
    let mut cmd = dsmexec(
        &[
            "-n",
            &RANKS.to_string(),
            &bin("roundrobin").display().to_string(),
        ],
        &dir,
    );
    cmd.env("DSM_STATS", "json")
        .env("DSM_STATS_FILE", dir.join("stats-%r.json"));
    let out = run(cmd, LIMIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    for rank in 0..RANKS {
        let path = dir.join(format!("stats-{rank}.json"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let doc: StatsSnapshot = serde_json::from_str(&text).expect("a JSON document");
        assert_eq!(doc.rank, rank);
        assert!(text.contains("\"fault_latency_p50_ns\":"), "{text}");
        assert!(doc.read_faults + doc.write_faults > 0, "{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
