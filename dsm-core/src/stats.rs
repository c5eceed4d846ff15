//! Per-rank statistics: fault counts, page traffic, fault latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Latency samples kept for percentiles; beyond this, every other sample is kept.
const MAX_SAMPLES: usize = 1 << 20;
/// Fault latency histogram buckets: bucket i counts latencies in
/// [2^i, 2^(i+1)) ns (bucket 0 also holds 0), the last everything longer.
pub const LATENCY_BUCKETS: usize = 40;

/// One rank's counters, bumped by the engine (relaxed atomics) and read
/// with [`Stats::snapshot`].
#[derive(Default)]
pub struct Stats {
    /// Faults on a load handled by the engine.
    pub read_faults: AtomicU64,
    /// Faults on a store (missing or read-only page) handled by the engine.
    pub write_faults: AtomicU64,
    /// Pages sent to other ranks: grants, given pages and write-backs
    /// (zero pages included).
    pub pages_sent: AtomicU64,
    /// Page grants received (with bytes, zeros or an upgrade).
    pub pages_received: AtomicU64,
    /// Bytes of page contents sent (`PAGE_SIZE` per page that carried them).
    pub bytes_sent: AtomicU64,
    /// Bytes of the messages that brought those grants, as received.
    pub bytes_received: AtomicU64,
    /// Requests passed on along a probable-owner hint (migratory protocol).
    pub requests_forwarded: AtomicU64,
    /// Requests queued until their page was free
    /// (`ProtocolCounters::deferred`).
    pub requests_deferred: AtomicU64,
    /// Pages this rank granted as their home (multi-reader protocol).
    pub grants_served: AtomicU64,
    /// Read-only copies requested ahead of a sequential read stream.
    pub pages_prefetched: AtomicU64,
    /// Pages asked back with a faulting one, lost with it (same access).
    pub pages_regained: AtomicU64,
    /// Read-only copies this rank pushed as their home to readers that
    /// consume them, at barrier entries (`DSM_PUSH`).
    pub pages_pushed: AtomicU64,
    /// Never-touched pages mapped with a first touch of the page before
    /// them (`DSM_POPULATE`): faults saved.
    pub pages_populated: AtomicU64,
    /// Read faults served by copying the page from its co-located home's
    /// frame (`DSM_DIRECT_READS`), and direct reads given up (the home
    /// retracted the page during the copy).
    pub direct_reads: AtomicU64,
    /// Direct reads given up after the home counted this rank.
    pub direct_reads_given_up: AtomicU64,
    /// Direct reads of pages their home held writable (this rank
    /// write-protected them in the home's mapping first).
    pub direct_reads_protected: AtomicU64,
    /// Transport messages that carried several DSM messages.
    pub batches_sent: AtomicU64,
    /// Messages received and handled in the transport's receive thread.
    pub messages_inline: AtomicU64,
    /// Pages received by the transport straight into their frames.
    pub pages_landed: AtomicU64,
    /// Read-only copies of pages homed elsewhere dropped to bound the cache.
    pub evictions_clean: AtomicU64,
    /// Writable copies given back to their home to bound the cache (under
    /// release consistency, their diffs sent).
    pub evictions_written_back: AtomicU64,
    /// Bytes of those write-backs (whole pages; a release-consistent
    /// copy's diff counts among the diffs sent).
    pub bytes_written_back: AtomicU64,
    /// Most bytes of pages homed elsewhere held at once.
    pub peak_cached_bytes: AtomicU64,
    /// Diffs of dirty copies sent to their homes (release consistency).
    pub diffs_sent: AtomicU64,
    /// Words those diffs carried.
    pub diff_words_sent: AtomicU64,
    /// Pages sent to each rank (the job's traffic matrix is every rank's row).
    pages_sent_to: Box<[AtomicU64]>,
    /// Remote fault latencies by power-of-two bucket (`LATENCY_BUCKETS`).
    latency_buckets: Box<[AtomicU64]>,
    latencies_ns: Mutex<Samples>,
}

#[derive(Default)]
struct Samples {
    values: Vec<u64>,
    seen: u64,
}

/// A copy of the counters at one moment, with latency percentiles.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    /// The rank these counters belong to.
    pub rank: usize,
    /// Faults on a load handled by the engine.
    pub read_faults: u64,
    /// Faults on a store handled by the engine.
    pub write_faults: u64,
    /// Pages sent to other ranks (grants, given pages, write-backs).
    pub pages_sent: u64,
    /// Page grants received.
    pub pages_received: u64,
    /// Bytes of page contents sent.
    pub bytes_sent: u64,
    /// Bytes of the messages that brought page grants.
    pub bytes_received: u64,
    /// Requests passed on along a probable-owner hint (migratory).
    pub requests_forwarded: u64,
    /// Requests queued until their page was free.
    pub requests_deferred: u64,
    /// Pages this rank granted as their home (multi-reader).
    pub grants_served: u64,
    /// Read-only copies requested ahead of a sequential read stream.
    pub pages_prefetched: u64,
    /// Pages asked back with a faulting one, lost with it.
    pub pages_regained: u64,
    /// Read-only copies pushed to their consumers at barrier entries.
    #[serde(default)]
    pub pages_pushed: u64,
    /// Never-touched pages mapped with a first touch of the page before them.
    #[serde(default)]
    pub pages_populated: u64,
    /// Read faults served from a co-located home's frame.
    #[serde(default)]
    pub direct_reads: u64,
    /// Direct reads given up (the home retracted the page meanwhile).
    #[serde(default)]
    pub direct_reads_given_up: u64,
    /// Direct reads of pages their home held writable.
    #[serde(default)]
    pub direct_reads_protected: u64,
    /// Transport messages that carried several DSM messages.
    pub batches_sent: u64,
    /// Messages handled in the transport's receive thread.
    pub messages_inline: u64,
    /// Pages received by the transport straight into their frames.
    pub pages_landed: u64,
    /// Read-only copies dropped to bound the cache.
    pub evictions_clean: u64,
    /// Writable copies given back to their home to bound the cache (under
    /// release consistency, their diffs sent).
    pub evictions_written_back: u64,
    /// Diffs of dirty copies sent to their homes (release consistency).
    #[serde(default)]
    pub diffs_sent: u64,
    /// Words those diffs carried.
    #[serde(default)]
    pub diff_words_sent: u64,
    /// Bytes of those write-backs.
    pub bytes_written_back: u64,
    /// Most bytes of pages homed elsewhere held at once.
    pub peak_cached_bytes: u64,
    /// Remote fault latency (fault seen by the engine -> page installed).
    #[serde(rename = "fault_latency_p50_ns", with = "nanoseconds")]
    pub fault_latency_p50: Duration,
    /// 90th percentile of the remote fault latency.
    #[serde(rename = "fault_latency_p90_ns", with = "nanoseconds")]
    pub fault_latency_p90: Duration,
    /// 99th percentile of the remote fault latency.
    #[serde(rename = "fault_latency_p99_ns", with = "nanoseconds")]
    pub fault_latency_p99: Duration,
    /// Longest remote fault latency among the samples kept.
    #[serde(rename = "fault_latency_max_ns", with = "nanoseconds")]
    pub fault_latency_max: Duration,
    /// Remote faults timed; past 2^20, percentiles come from a subsample.
    pub fault_latency_samples: u64,
    /// Pages this rank sent to each rank, by rank.
    #[serde(default)]
    pub pages_sent_to: Vec<u64>,
    /// Remote faults by latency: entry i counts those in [2^i, 2^(i+1)) ns.
    #[serde(default)]
    pub fault_latency_histogram: Vec<u64>,
}

impl Stats {
    /// Counters for a rank of a job of `size` ranks.
    pub fn new(size: usize) -> Stats {
        let counters = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect();
        Stats {
            pages_sent_to: counters(size),
            latency_buckets: counters(LATENCY_BUCKETS),
            ..Stats::default()
        }
    }

    /// A page sent to rank `to`.
    pub fn page_sent(&self, to: usize) {
        Stats::add(&self.pages_sent, 1);
        if let Some(counter) = self.pages_sent_to.get(to) {
            Stats::add(counter, 1);
        }
    }

    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Raises `counter` to `n` if it is lower (a peak).
    pub fn raise(counter: &AtomicU64, n: u64) {
        counter.fetch_max(n, Ordering::Relaxed);
    }

    /// Records one remote fault's latency: its histogram bucket, and a
    /// sample for the percentiles (every other one once 2^20 are kept).
    pub fn record_latency(&self, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        let bucket = (ns.max(1).ilog2() as usize).min(LATENCY_BUCKETS - 1);
        if let Some(counter) = self.latency_buckets.get(bucket) {
            Stats::add(counter, 1);
        }
        let mut s = self.latencies_ns.lock().unwrap_or_else(|p| p.into_inner());
        s.seen += 1;
        if s.values.len() < MAX_SAMPLES {
            s.values.push(d.as_nanos() as u64);
        } else if s.seen.is_multiple_of(2) {
            let i = (s.seen as usize / 2) % MAX_SAMPLES;
            s.values[i] = d.as_nanos() as u64;
        }
    }

    /// The counters now, labelled with `rank`, and the latency percentiles
    /// of the samples kept (zero without any).
    pub fn snapshot(&self, rank: usize) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (mut values, seen) = {
            let s = self.latencies_ns.lock().unwrap_or_else(|p| p.into_inner());
            (s.values.clone(), s.seen)
        };
        values.sort_unstable();
        let pct = |p: f64| -> Duration {
            if values.is_empty() {
                return Duration::ZERO;
            }
            let i = ((values.len() - 1) as f64 * p).round() as usize;
            Duration::from_nanos(values[i])
        };
        StatsSnapshot {
            rank,
            read_faults: get(&self.read_faults),
            write_faults: get(&self.write_faults),
            pages_sent: get(&self.pages_sent),
            pages_received: get(&self.pages_received),
            bytes_sent: get(&self.bytes_sent),
            bytes_received: get(&self.bytes_received),
            requests_forwarded: get(&self.requests_forwarded),
            requests_deferred: get(&self.requests_deferred),
            grants_served: get(&self.grants_served),
            pages_prefetched: get(&self.pages_prefetched),
            pages_regained: get(&self.pages_regained),
            pages_pushed: get(&self.pages_pushed),
            pages_populated: get(&self.pages_populated),
            direct_reads: get(&self.direct_reads),
            direct_reads_given_up: get(&self.direct_reads_given_up),
            direct_reads_protected: get(&self.direct_reads_protected),
            batches_sent: get(&self.batches_sent),
            messages_inline: get(&self.messages_inline),
            pages_landed: get(&self.pages_landed),
            evictions_clean: get(&self.evictions_clean),
            evictions_written_back: get(&self.evictions_written_back),
            bytes_written_back: get(&self.bytes_written_back),
            peak_cached_bytes: get(&self.peak_cached_bytes),
            diffs_sent: get(&self.diffs_sent),
            diff_words_sent: get(&self.diff_words_sent),
            fault_latency_p50: pct(0.5),
            fault_latency_p90: pct(0.9),
            fault_latency_p99: pct(0.99),
            fault_latency_max: values
                .last()
                .map(|v| Duration::from_nanos(*v))
                .unwrap_or_default(),
            fault_latency_samples: seen,
            pages_sent_to: self.pages_sent_to.iter().map(get).collect(),
            fault_latency_histogram: self.latency_buckets.iter().map(get).collect(),
        }
    }
}

/// Durations in JSON as whole nanoseconds (fields named `..._ns`).
mod nanoseconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_nanos().min(u64::MAX as u128) as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_nanos)
    }
}

/// How a line of stderr carrying a rank's JSON statistics begins
/// (`DSM_STATS=json` without `DSM_STATS_FILE`): `dsmexec --stats-report`
/// collects these lines.
pub const JSON_LINE_PREFIX: &str = "dsm-stats-json: ";

impl StatsSnapshot {
    /// The snapshot as one JSON document (`DSM_STATS=json`); durations in
    /// whole nanoseconds.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

impl std::fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        write!(
            f,
            "dsm stats rank {}: faults read {} write {}; pages sent {} ({} B) received {} ({} B); requests forwarded {} deferred {}; grants served as home {}; pages prefetched {} regained {} pushed {} populated {}; direct reads {} ({} write-protected at the home) given up {}; batches sent {}; messages handled on receipt {}; pages received in place {}; evictions clean {} written back {} ({} B), peak cached {} B; diffs sent {} ({} words); remote fault latency us p50 {:.1} p90 {:.1} p99 {:.1} max {:.1} ({} faults)",
            self.rank,
            self.read_faults,
            self.write_faults,
            self.pages_sent,
            self.bytes_sent,
            self.pages_received,
            self.bytes_received,
            self.requests_forwarded,
            self.requests_deferred,
            self.grants_served,
            self.pages_prefetched,
            self.pages_regained,
            self.pages_pushed,
            self.pages_populated,
            self.direct_reads,
            self.direct_reads_protected,
            self.direct_reads_given_up,
            self.batches_sent,
            self.messages_inline,
            self.pages_landed,
            self.evictions_clean,
            self.evictions_written_back,
            self.bytes_written_back,
            self.peak_cached_bytes,
            self.diffs_sent,
            self.diff_words_sent,
            us(self.fault_latency_p50),
            us(self.fault_latency_p90),
            us(self.fault_latency_p99),
            us(self.fault_latency_max),
            self.fault_latency_samples
        )
    }
}
