//! Application-level liveness: which peers have been heard from lately.
//!
//! TCP keepalive proves that a peer's *kernel* answers. A process that is
//! stopped (SIGSTOP, a debugger), wedged, or on a host swapping to death
//! still has a kernel that acknowledges, so its connections stay up while
//! the job waits on it forever. Each rank's transport therefore sends a
//! small heartbeat frame to every peer at a low rate from a thread of its
//! own (not the application's, which may compute for hours without calling
//! the DSM), and a peer from which nothing at all arrived for the peer
//! timeout is reported lost as "not responding".

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dsm_core::transport::NOT_RESPONDING;
use dsm_core::Rank;

/// Heartbeats per peer timeout: a live peer's silence stays far below the
/// timeout even when its heartbeat thread is scheduled late.
const BEATS_PER_TIMEOUT: u32 = 5;

/// How often a rank sends heartbeats and checks its peers' silence.
pub(crate) fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / BEATS_PER_TIMEOUT).clamp(Duration::from_millis(50), Duration::from_secs(4))
}

/// When each peer was last heard from, and which peers are still watched.
pub(crate) struct Liveness {
    epoch: Instant,
    timeout: Duration,
    /// Per peer: milliseconds since `epoch` when a frame last arrived.
    heard_ms: Vec<AtomicU64>,
    /// Per peer: no longer watched (it said goodbye, or was reported lost).
    retired: Vec<AtomicBool>,
}

impl Liveness {
    /// Every peer counts as heard from now; `me` is never watched.
    pub(crate) fn new(size: usize, me: Rank, timeout: Duration) -> Self {
        Liveness {
            epoch: Instant::now(),
            timeout,
            heard_ms: (0..size).map(|_| AtomicU64::new(0)).collect(),
            retired: (0..size).map(|peer| AtomicBool::new(peer == me)).collect(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Something arrived from `peer`.
    pub(crate) fn heard(&self, peer: Rank) {
        self.heard_ms[peer].store(self.now_ms(), Ordering::Relaxed);
    }

    /// Stops watching `peer`. True for the first caller only, so a loss is
    /// reported once whoever notices it first.
    pub(crate) fn retire(&self, peer: Rank) -> bool {
        !self.retired[peer].swap(true, Ordering::SeqCst)
    }

    /// Whether `peer` is still watched (not retired).
    pub(crate) fn watched(&self, peer: Rank) -> bool {
        !self.retired[peer].load(Ordering::SeqCst)
    }

    /// Counts every peer as heard from now: after this process itself was
    /// not running (stopped, starved), their silence was ours.
    pub(crate) fn forgive(&self) {
        let now = self.now_ms();
        for heard in &self.heard_ms {
            heard.store(now, Ordering::Relaxed);
        }
    }

    /// Watched peers silent for at least the timeout, the longest silent
    /// first (the likeliest cause when several are).
    pub(crate) fn silent(&self) -> Vec<(Rank, Duration)> {
        let now = self.now_ms();
        let mut silent: Vec<(Rank, Duration)> = self
            .heard_ms
            .iter()
            .enumerate()
            .filter(|(peer, _)| self.watched(*peer))
            .map(|(peer, heard)| {
                let quiet = now.saturating_sub(heard.load(Ordering::Relaxed));
                (peer, Duration::from_millis(quiet))
            })
            .filter(|(_, quiet)| *quiet >= self.timeout)
            .collect();
        silent.sort_by_key(|(_, quiet)| std::cmp::Reverse(*quiet));
        silent
    }
}

/// Why a silent peer is reported lost, for the people reading the message.
pub(crate) fn not_responding(silence: Duration, timeout: Duration) -> String {
    format!(
        "{NOT_RESPONDING}: nothing received for {:.1} s (DSM_PEER_TIMEOUT={} s) though its connection is up; the process is stopped, wedged or its host is swapping",
        silence.as_secs_f64(),
        timeout.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_silent_once_the_timeout_passed_without_news() {
        let live = Liveness::new(3, 0, Duration::ZERO);
        // A zero timeout: every watched peer is silent at once, never `me`.
        let silent: Vec<Rank> = live.silent().into_iter().map(|(p, _)| p).collect();
        assert_eq!(silent, vec![1, 2]);
        assert!(live.retire(1));
        assert!(!live.retire(1), "a loss is reported once");
        let silent: Vec<Rank> = live.silent().into_iter().map(|(p, _)| p).collect();
        assert_eq!(silent, vec![2]);

        let patient = Liveness::new(2, 0, Duration::from_secs(3600));
        patient.heard(1);
        assert!(patient.silent().is_empty());
    }

    #[test]
    fn the_interval_leaves_several_heartbeats_per_timeout() {
        assert_eq!(
            heartbeat_interval(Duration::from_secs(5)),
            Duration::from_secs(1)
        );
        assert_eq!(
            heartbeat_interval(Duration::from_secs(3600)),
            Duration::from_secs(4)
        );
        assert_eq!(
            heartbeat_interval(Duration::from_millis(100)),
            Duration::from_millis(50)
        );
    }
}
