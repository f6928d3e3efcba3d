//! Readiness and flush health.
//!
//! `/readyz` answers one question for a load balancer: can this process take work? An API
//! (or `serve`) process is ready while its queue accepts writes and is not full; a database
//! outage does not make it unready, because accepted increments wait durably in the queue
//! and are flushed once the database is back (that is the outage promise, and a balancer
//! that pulled every API would break it). A worker-only process is ready while its flushes
//! succeed.
//!
//! Whether flushes succeed is reported separately, in the `/readyz` body and in metrics, for
//! operators and alerts: failing or not, consecutive failures, time since the last good
//! flush, and the age of the oldest increment not yet persisted against the staleness bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::metric_names::{
    FLUSH_CONSECUTIVE_FAILURES, FLUSH_FAILING, LAST_FLUSH_TIMESTAMP, OLDEST_UNFLUSHED_AGE,
};

/// What the worker records and `/readyz` reads.
#[derive(Debug, Default)]
pub struct WorkerHealth {
    /// Commit time of the last successful flush (ms since the epoch), 0 before the first.
    pub last_flush_ms: AtomicU64,
    /// The largest staleness any flush has had, for the `weir_increments_staleness_max_seconds`
    /// gauge.
    pub max_staleness_ms: AtomicU64,
    /// Times the Redis stream or its group was found gone and recreated (see the ERROR log).
    pub streams_lost: AtomicU64,
    consecutive_failures: AtomicU64,
    /// Enqueue time of the oldest increment a failing flush holds, 0 when none.
    held_since_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl WorkerHealth {
    pub fn flush_succeeded(&self, now_ms: u64) {
        self.last_flush_ms.store(now_ms, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.held_since_ms.store(0, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        metrics::gauge!(FLUSH_FAILING).set(0.0);
        metrics::gauge!(FLUSH_CONSECUTIVE_FAILURES).set(0.0);
        metrics::gauge!(LAST_FLUSH_TIMESTAMP).set(now_ms as f64 / 1000.0);
        metrics::gauge!(OLDEST_UNFLUSHED_AGE).set(0.0);
    }

    /// `held_since_ms`: enqueue time of the oldest increment the failed flush holds.
    pub fn flush_failed(&self, error: String, held_since_ms: Option<u64>, now_ms: u64) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let held_since = held_since_ms.unwrap_or(0);
        self.held_since_ms.store(held_since, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
        metrics::gauge!(FLUSH_FAILING).set(1.0);
        metrics::gauge!(FLUSH_CONSECUTIVE_FAILURES).set(failures as f64);
        let age_ms = if held_since == 0 {
            0
        } else {
            now_ms.saturating_sub(held_since)
        };
        metrics::gauge!(OLDEST_UNFLUSHED_AGE).set(age_ms as f64 / 1000.0);
    }

    pub fn snapshot(&self) -> FlushSnapshot {
        let nonzero = |value: u64| (value > 0).then_some(value);
        FlushSnapshot {
            streams_lost: self.streams_lost.load(Ordering::Relaxed),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            last_flush_ms: nonzero(self.last_flush_ms.load(Ordering::Relaxed)),
            held_since_ms: nonzero(self.held_since_ms.load(Ordering::Relaxed)),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// The worker's health at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushSnapshot {
    /// Times the Redis stream or its group was lost and recreated since start.
    pub streams_lost: u64,
    pub consecutive_failures: u64,
    pub last_flush_ms: Option<u64>,
    pub held_since_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// The `flush` part of the `/readyz` body.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlushStatus {
    /// The last flush attempt failed.
    pub failing: bool,
    pub consecutive_failures: u64,
    pub seconds_since_last_flush: Option<f64>,
    /// Age of the oldest increment a failing flush holds.
    pub oldest_unflushed_age_ms: Option<u64>,
    /// That age is beyond `maxStalenessMs`: the staleness promise is broken.
    pub stale: bool,
    pub last_error: Option<String>,
    /// Times the Redis stream or its group was lost and recreated since start: what was
    /// accepted but not yet read at such a moment is gone (see the ERROR log).
    pub streams_lost: u64,
}

pub fn flush_status(snapshot: &FlushSnapshot, now_ms: u64, max_staleness_ms: u64) -> FlushStatus {
    let failing = snapshot.consecutive_failures > 0;
    let age = snapshot
        .held_since_ms
        .filter(|_| failing)
        .map(|since| now_ms.saturating_sub(since));
    FlushStatus {
        failing,
        consecutive_failures: snapshot.consecutive_failures,
        seconds_since_last_flush: snapshot
            .last_flush_ms
            .map(|at| now_ms.saturating_sub(at) as f64 / 1000.0),
        oldest_unflushed_age_ms: age,
        stale: age.is_some_and(|age| age > max_staleness_ms),
        last_error: snapshot.last_error.clone().filter(|_| failing),
        streams_lost: snapshot.streams_lost,
    }
}

/// Whether a process takes work. `queue`: `None` without an API in this process, else
/// whether the queue accepts writes and is not full. `flush`: `None` without a worker.
pub fn is_ready(queue: Option<bool>, flush: Option<&FlushStatus>) -> bool {
    match (queue, flush) {
        (Some(queue_ok), _) => queue_ok,
        (None, Some(flush)) => !flush.failing,
        (None, None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing(failures: u64, held_since_ms: Option<u64>) -> FlushSnapshot {
        FlushSnapshot {
            consecutive_failures: failures,
            last_flush_ms: Some(1_000),
            held_since_ms,
            last_error: Some("database is read-only".into()),
            ..FlushSnapshot::default()
        }
    }

    #[test]
    fn a_healthy_worker_reports_time_since_its_last_flush() {
        let snapshot = FlushSnapshot {
            last_flush_ms: Some(1_000),
            ..FlushSnapshot::default()
        };
        let status = flush_status(&snapshot, 3_500, 10_000);
        assert!(!status.failing && !status.stale);
        assert_eq!(status.seconds_since_last_flush, Some(2.5));
        assert_eq!(status.oldest_unflushed_age_ms, None);
        assert_eq!(status.last_error, None);
    }

    #[test]
    fn failing_flushes_become_stale_past_the_bound() {
        let status = flush_status(&failing(3, Some(5_000)), 14_000, 10_000);
        assert!(status.failing && !status.stale);
        assert_eq!(status.oldest_unflushed_age_ms, Some(9_000));
        assert_eq!(status.last_error.as_deref(), Some("database is read-only"));
        let status = flush_status(&failing(9, Some(5_000)), 15_001, 10_000);
        assert!(status.stale);
    }

    #[test]
    fn an_api_is_ready_while_its_queue_takes_writes_whatever_the_flushes() {
        let broken = flush_status(&failing(50, Some(1)), 60_000, 10_000);
        assert!(is_ready(Some(true), Some(&broken)));
        assert!(!is_ready(Some(false), None));
        assert!(!is_ready(
            Some(false),
            Some(&flush_status(&FlushSnapshot::default(), 1, 1))
        ));
    }

    #[test]
    fn a_worker_only_process_is_ready_while_it_can_flush() {
        let healthy = flush_status(&FlushSnapshot::default(), 1, 10_000);
        assert!(is_ready(None, Some(&healthy)));
        let broken = flush_status(&failing(1, None), 1, 10_000);
        assert!(!is_ready(None, Some(&broken)));
    }

    #[test]
    fn health_records_failures_then_clears_them_on_success() {
        let health = WorkerHealth::default();
        health.flush_failed("boom".into(), Some(100), 200);
        health.flush_failed("boom again".into(), Some(100), 300);
        let snapshot = health.snapshot();
        assert_eq!(snapshot.consecutive_failures, 2);
        assert_eq!(snapshot.held_since_ms, Some(100));
        assert_eq!(snapshot.last_error.as_deref(), Some("boom again"));
        health.flush_succeeded(400);
        assert_eq!(
            health.snapshot(),
            FlushSnapshot {
                last_flush_ms: Some(400),
                ..FlushSnapshot::default()
            }
        );
    }
}
