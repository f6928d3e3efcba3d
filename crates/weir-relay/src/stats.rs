//! The relay's counters, kept twice on purpose: as atomics that tests and operators can read
//! directly ([`RelayStats::snapshot`], [`RelayStats::wait_until`]), and as Prometheus metrics.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Counts gathered while handling one batch, published at once so the hot path touches no
/// shared memory per event.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub events_received: u64,
    pub events_delivered: u64,
    pub events_malformed: u64,
    pub events_stale: u64,
    pub events_too_far_ahead: u64,
    pub gaps_skipped: u64,
    pub notifications_sent: u64,
    pub clients_dropped_slow: u64,
    pub clients_dropped_queue_budget: u64,
    pub clients_rejected: u64,
    pub sources_refused: u64,
}

/// Everything at one instant.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub counts: Counts,
    pub clients_connected: u64,
    pub reorder_window: u64,
    pub sources_connected: u64,
    /// Bytes handed to client sessions and not yet written or discarded.
    pub queued_bytes: u64,
}

const EVENTS_TOO_FAR_AHEAD: &str = "weir_relay_events_too_far_ahead_total";
const CLIENTS_DROPPED_QUEUE_BUDGET: &str = "weir_relay_clients_dropped_queue_budget_total";

/// Metrics added since the first release, registered at zero on start so that dashboards
/// and alerts see them before the first occurrence.
const REGISTERED_AT_START: &[&str] = &[EVENTS_TOO_FAR_AHEAD, CLIENTS_DROPPED_QUEUE_BUDGET];
const QUEUED_BYTES: &str = "weir_relay_queued_bytes";

#[derive(Debug, Default)]
pub struct RelayStats {
    events_received: AtomicU64,
    events_delivered: AtomicU64,
    events_malformed: AtomicU64,
    events_stale: AtomicU64,
    events_too_far_ahead: AtomicU64,
    gaps_skipped: AtomicU64,
    notifications_sent: AtomicU64,
    clients_dropped_slow: AtomicU64,
    clients_dropped_queue_budget: AtomicU64,
    clients_rejected: AtomicU64,
    sources_refused: AtomicU64,
    clients_connected: AtomicU64,
    reorder_window: AtomicU64,
    sources_connected: AtomicU64,
    /// Live, shared with the client sessions, which take bytes off as they write them.
    queued_bytes: Arc<AtomicUsize>,
    changed: Notify,
}

impl RelayStats {
    /// `queued_bytes`: the count of bytes handed to client sessions and not yet written.
    pub fn new(queued_bytes: Arc<AtomicUsize>) -> Self {
        for name in REGISTERED_AT_START {
            metrics::counter!(*name).increment(0);
        }
        metrics::gauge!(QUEUED_BYTES).set(0.0);
        RelayStats {
            queued_bytes,
            ..Self::default()
        }
    }

    pub fn add(&self, counts: &Counts) {
        let pairs = [
            (
                &self.events_received,
                counts.events_received,
                "weir_relay_events_received_total",
            ),
            (
                &self.events_delivered,
                counts.events_delivered,
                "weir_relay_events_delivered_total",
            ),
            (
                &self.events_malformed,
                counts.events_malformed,
                "weir_relay_events_malformed_total",
            ),
            (
                &self.events_stale,
                counts.events_stale,
                "weir_relay_events_stale_total",
            ),
            (
                &self.events_too_far_ahead,
                counts.events_too_far_ahead,
                EVENTS_TOO_FAR_AHEAD,
            ),
            (
                &self.gaps_skipped,
                counts.gaps_skipped,
                "weir_relay_gaps_skipped_total",
            ),
            (
                &self.notifications_sent,
                counts.notifications_sent,
                "weir_relay_notifications_sent_total",
            ),
            (
                &self.clients_dropped_slow,
                counts.clients_dropped_slow,
                "weir_relay_clients_dropped_slow_total",
            ),
            (
                &self.clients_dropped_queue_budget,
                counts.clients_dropped_queue_budget,
                CLIENTS_DROPPED_QUEUE_BUDGET,
            ),
            (
                &self.clients_rejected,
                counts.clients_rejected,
                "weir_relay_clients_rejected_total",
            ),
            (
                &self.sources_refused,
                counts.sources_refused,
                "weir_relay_sources_refused_total",
            ),
        ];
        for (atomic, value, name) in pairs {
            if value > 0 {
                atomic.fetch_add(value, Ordering::Relaxed);
                metrics::counter!(name).increment(value);
            }
        }
        self.changed.notify_waiters();
    }

    pub fn set_gauges(&self, clients_connected: usize, reorder_window: usize) {
        let queued_bytes = self.queued_bytes.load(Ordering::Relaxed);
        metrics::gauge!(QUEUED_BYTES).set(queued_bytes as f64);
        self.clients_connected
            .store(clients_connected as u64, Ordering::Relaxed);
        self.reorder_window
            .store(reorder_window as u64, Ordering::Relaxed);
        metrics::gauge!("weir_relay_clients_connected").set(clients_connected as f64);
        metrics::gauge!("weir_relay_reorder_window").set(reorder_window as f64);
        self.changed.notify_waiters();
    }

    pub fn set_sources_connected(&self, sources: u64) {
        self.sources_connected.store(sources, Ordering::Relaxed);
        metrics::gauge!("weir_relay_sources_connected").set(sources as f64);
        self.changed.notify_waiters();
    }

    pub fn snapshot(&self) -> Snapshot {
        let load = |atomic: &AtomicU64| atomic.load(Ordering::Relaxed);
        Snapshot {
            counts: Counts {
                events_received: load(&self.events_received),
                events_delivered: load(&self.events_delivered),
                events_malformed: load(&self.events_malformed),
                events_stale: load(&self.events_stale),
                events_too_far_ahead: load(&self.events_too_far_ahead),
                gaps_skipped: load(&self.gaps_skipped),
                notifications_sent: load(&self.notifications_sent),
                clients_dropped_slow: load(&self.clients_dropped_slow),
                clients_dropped_queue_budget: load(&self.clients_dropped_queue_budget),
                clients_rejected: load(&self.clients_rejected),
                sources_refused: load(&self.sources_refused),
            },
            clients_connected: load(&self.clients_connected),
            reorder_window: load(&self.reorder_window),
            sources_connected: load(&self.sources_connected),
            queued_bytes: self.queued_bytes.load(Ordering::Relaxed) as u64,
        }
    }

    /// Resolves once `condition` holds: a readiness signal for tests and tools, so that
    /// nobody has to sleep and hope.
    pub async fn wait_until(&self, condition: impl Fn(&Snapshot) -> bool) -> Snapshot {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let snapshot = self.snapshot();
            if condition(&snapshot) {
                return snapshot;
            }
            notified.await;
        }
    }
}
