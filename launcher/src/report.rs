//! `dsmexec --stats-report FILE`: every rank's statistics (`DSM_STATS=json`,
//! collected from the ranks' stderr as lines starting
//! `dsm_core::stats::JSON_LINE_PREFIX`) gathered into one self-contained
//! HTML page: a table of the counters, the rank-to-rank page traffic as a
//! heat map, and each rank's remote fault latency histogram (SVG drawn with
//! plotters), with the ranks' JSON documents embedded as they came.

use std::fmt::Write as _;
use std::path::Path;

use dsm_core::StatsSnapshot;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

/// One rank's statistics as the report uses them.
pub struct RankStats {
    /// The rank the statistics are from.
    pub rank: usize,
    /// The host it ran on.
    pub host: String,
    /// The JSON document the rank printed.
    pub json: String,
    /// The same document, parsed.
    pub stats: StatsSnapshot,
}

impl RankStats {
    /// Reads a rank's JSON document; an error names what is wrong.
    pub fn parse(rank: usize, host: &str, json: &str) -> Result<RankStats, String> {
        let stats: StatsSnapshot = serde_json::from_str(json)
            .map_err(|e| format!("rank {rank}'s statistics are not valid JSON: {e}"))?;
        Ok(RankStats {
            rank,
            host: host.to_string(),
            json: json.to_string(),
            stats,
        })
    }
}

/// Writes the report for `ranks` (those that sent statistics) of a job of
/// `size` ranks to `path`.
pub fn write(path: &Path, size: usize, ranks: &[RankStats]) -> Result<(), String> {
    let html = render(size, ranks)?;
    std::fs::write(path, html).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn draw_error(e: impl std::fmt::Display) -> String {
    format!("drawing the report: {e}")
}

/// The page-traffic matrix: `matrix[from][to]` pages.
fn traffic(size: usize, ranks: &[RankStats]) -> Vec<Vec<u64>> {
    let mut matrix = vec![vec![0u64; size]; size];
    for r in ranks.iter().filter(|r| r.rank < size) {
        for (to, pages) in r.stats.pages_sent_to.iter().enumerate().take(size) {
            matrix[r.rank][to] = *pages;
        }
    }
    matrix
}

fn heat_map(matrix: &[Vec<u64>]) -> Result<String, String> {
    let n = matrix.len().max(1);
    let max = matrix.iter().flatten().copied().max().unwrap_or(0).max(1);
    let side = (60 * n as u32).clamp(320, 900);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (side + 90, side + 70)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "pages sent (row: from rank, column: to rank)",
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d((0..n).into_segmented(), (0..n).into_segmented())
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("to rank")
            .y_desc("from rank")
            .draw()
            .map_err(draw_error)?;
        let cells = matrix.iter().enumerate().flat_map(|(from, row)| {
            row.iter().enumerate().map(move |(to, pages)| {
                let shade = (*pages as f64 / max as f64).sqrt();
                let color = RGBColor(
                    (255.0 - 225.0 * shade) as u8,
                    (255.0 - 160.0 * shade) as u8,
                    255 - (60.0 * shade) as u8,
                );
                Rectangle::new(
                    [
                        (SegmentValue::Exact(to), SegmentValue::Exact(from)),
                        (SegmentValue::Exact(to + 1), SegmentValue::Exact(from + 1)),
                    ],
                    color.filled(),
                )
            })
        });
        chart.draw_series(cells).map_err(draw_error)?;
        if n <= 16 {
            let labels = matrix.iter().enumerate().flat_map(|(from, row)| {
                row.iter().enumerate().map(move |(to, pages)| {
                    Text::new(
                        pages.to_string(),
                        (SegmentValue::CenterOf(to), SegmentValue::CenterOf(from)),
                        ("sans-serif", 12),
                    )
                })
            });
            chart.draw_series(labels).map_err(draw_error)?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

/// A bucket's lower bound, for an axis label: `2^i` ns.
fn bucket_label(i: usize) -> String {
    let ns = 1u64 << i.min(63);
    match ns {
        0..=999 => format!("{ns} ns"),
        1_000..=999_999 => format!("{} µs", ns / 1_000),
        1_000_000..=999_999_999 => format!("{} ms", ns / 1_000_000),
        _ => format!("{} s", ns / 1_000_000_000),
    }
}

fn histogram(rank: &RankStats) -> Result<String, String> {
    let buckets = &rank.stats.fault_latency_histogram;
    let used: Vec<usize> = (0..buckets.len()).filter(|i| buckets[*i] > 0).collect();
    let (lo, hi) = match (used.first(), used.last()) {
        (Some(lo), Some(hi)) => (*lo, *hi + 1),
        _ => (10, 20),
    };
    let top = buckets.iter().copied().max().unwrap_or(0).max(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (520, 260)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "rank {} ({}): remote fault latency, {} faults",
                    rank.rank, rank.host, rank.stats.fault_latency_samples
                ),
                ("sans-serif", 14),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d((lo..hi).into_segmented(), 0u64..top + top / 10 + 1)
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("latency (bucket from)")
            .y_desc("faults")
            .x_label_formatter(&|v| match v {
                SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => bucket_label(*i),
                SegmentValue::Last => String::new(),
            })
            .draw()
            .map_err(draw_error)?;
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .style(RGBColor(60, 110, 190).filled())
                    .margin(2)
                    .data((lo..hi).map(|i| (i, buckets.get(i).copied().unwrap_or(0)))),
            )
            .map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The HTML page.
fn render(size: usize, ranks: &[RankStats]) -> Result<String, String> {
    let matrix = traffic(size, ranks);
    let mut html = String::new();
    let us = |d: std::time::Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>dsm statistics</title>\n\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #bbb;padding:2px 8px;text-align:right}}</style></head><body>\n\
         <h1>dsm statistics: {size} ranks</h1>\n"
    );
    let missing: Vec<String> = (0..size)
        .filter(|r| !ranks.iter().any(|s| s.rank == *r))
        .map(|r| r.to_string())
        .collect();
    if !missing.is_empty() {
        let _ = writeln!(
            html,
            "<p>No statistics from rank(s) {} (they did not finalize).</p>",
            missing.join(", ")
        );
    }
    html.push_str(
        "<h2>Counters</h2>\n<table id=\"counters\"><tr><th>rank</th><th>host</th><th>read faults</th>\
         <th>write faults</th><th>pages sent</th><th>pages received</th><th>bytes sent</th>\
         <th>bytes received</th><th>pages prefetched</th><th>evictions</th>\
         <th>fault p50 µs</th><th>fault p99 µs</th></tr>\n",
    );
    for r in ranks {
        let s = &r.stats;
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            r.rank,
            escape(&r.host),
            s.read_faults,
            s.write_faults,
            s.pages_sent,
            s.pages_received,
            s.bytes_sent,
            s.bytes_received,
            s.pages_prefetched,
            s.evictions_clean + s.evictions_written_back,
            us(s.fault_latency_p50),
            us(s.fault_latency_p99),
        );
    }
    html.push_str("</table>\n<h2>Page traffic</h2>\n");
    html.push_str(&heat_map(&matrix)?);
    html.push_str("\n<table id=\"traffic\"><tr><th>from \\ to</th>");
    for to in 0..size {
        let _ = write!(html, "<th>{to}</th>");
    }
    html.push_str("</tr>\n");
    for (from, row) in matrix.iter().enumerate() {
        let _ = write!(html, "<tr><th>{from}</th>");
        for pages in row {
            let _ = write!(html, "<td>{pages}</td>");
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n<h2>Remote fault latency</h2>\n");
    for r in ranks {
        html.push_str(&histogram(r)?);
        html.push('\n');
    }
    html.push_str("<h2>The ranks' JSON documents</h2>\n<script type=\"application/json\" id=\"dsm-stats\">\n[");
    for (i, r) in ranks.iter().enumerate() {
        if i > 0 {
            html.push_str(",\n");
        }
        // Inside <script>, only "</" could end the element early.
        html.push_str(&r.json.replace("</", "<\\/"));
    }
    html.push_str("]\n</script>\n</body></html>\n");
    Ok(html)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(rank: usize, sent_to: Vec<u64>) -> RankStats {
        let stats = StatsSnapshot {
            rank,
            pages_sent: sent_to.iter().sum(),
            pages_sent_to: sent_to,
            fault_latency_histogram: vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 9, 1],
            fault_latency_samples: 13,
            ..StatsSnapshot::default()
        };
        let json = stats.to_json();
        RankStats::parse(rank, "node<1>", &json).expect("parses back")
    }

    #[test]
    fn the_report_holds_the_matrix_the_pictures_and_the_documents() {
        let ranks = [rank(0, vec![0, 5]), rank(1, vec![7, 0])];
        let html = render(2, &ranks).expect("rendered");
        assert_eq!(
            html.matches("<svg").count(),
            3,
            "a heat map and two histograms"
        );
        assert!(html.contains("<tr><th>0</th><td>0</td><td>5</td></tr>"));
        assert!(html.contains("<tr><th>1</th><td>7</td><td>0</td></tr>"));
        assert!(html.contains("node&lt;1&gt;"), "host names are escaped");
        assert!(html.contains("\"pages_sent_to\":[0,5]"));
    }

    #[test]
    fn a_rank_without_statistics_is_named() {
        let html = render(3, &[rank(0, vec![0, 1, 1])]).expect("rendered");
        assert!(html.contains("No statistics from rank(s) 1, 2"));
    }

    #[test]
    fn bucket_labels_read_as_durations() {
        assert_eq!(bucket_label(0), "1 ns");
        assert_eq!(bucket_label(10), "1 µs");
        assert_eq!(bucket_label(16), "65 µs");
        assert_eq!(bucket_label(30), "1 s");
    }
}
