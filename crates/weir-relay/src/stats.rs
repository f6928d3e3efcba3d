//! The relay's counters, kept twice on purpose: as atomics that tests and operators can read
//! directly ([`RelayStats::snapshot`], [`RelayStats::wait_until`]), and as Prometheus metrics.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;
use weir_runtime::telemetry::{MetricKind, MetricSpec};

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

const EVENTS_RECEIVED: &str = "weir_relay_events_received_total";
const EVENTS_DELIVERED: &str = "weir_relay_events_delivered_total";
const EVENTS_MALFORMED: &str = "weir_relay_events_malformed_total";
const EVENTS_STALE: &str = "weir_relay_events_stale_total";
const EVENTS_TOO_FAR_AHEAD: &str = "weir_relay_events_too_far_ahead_total";
const GAPS_SKIPPED: &str = "weir_relay_gaps_skipped_total";
const NOTIFICATIONS_SENT: &str = "weir_relay_notifications_sent_total";
const CLIENTS_DROPPED_SLOW: &str = "weir_relay_clients_dropped_slow_total";
const CLIENTS_DROPPED_QUEUE_BUDGET: &str = "weir_relay_clients_dropped_queue_budget_total";
const CLIENTS_REJECTED: &str = "weir_relay_clients_rejected_total";
const SOURCES_REFUSED: &str = "weir_relay_sources_refused_total";
const CLIENTS_CONNECTED: &str = "weir_relay_clients_connected";
const REORDER_WINDOW: &str = "weir_relay_reorder_window";
const SOURCES_CONNECTED: &str = "weir_relay_sources_connected";
const QUEUED_BYTES: &str = "weir_relay_queued_bytes";

/// Every metric the relay exports, with its help text. All of them are registered at zero when
/// the relay starts, so that `rate()` and alerts work from the first scrape rather than from
/// the first occurrence.
const METRICS: &[MetricSpec] = &[
    (EVENTS_RECEIVED, MetricKind::Counter, "Events read from the event source."),
    (EVENTS_DELIVERED, MetricKind::Counter, "Events released in sequence order and routed to their recipients."),
    (EVENTS_MALFORMED, MetricKind::Counter, "Event lines that could not be parsed and were skipped."),
    (EVENTS_STALE, MetricKind::Counter, "Events whose sequence number was already delivered (duplicates or late arrivals), dropped."),
    (EVENTS_TOO_FAR_AHEAD, MetricKind::Counter, "Events beyond the reorder window's capacity, dropped."),
    (GAPS_SKIPPED, MetricKind::Counter, "Missing sequence numbers given up on (waited too long, or the stream ended)."),
    (NOTIFICATIONS_SENT, MetricKind::Counter, "Notifications routed to connected user clients."),
    (CLIENTS_DROPPED_SLOW, MetricKind::Counter, "User clients disconnected because their own queue was full."),
    (CLIENTS_DROPPED_QUEUE_BUDGET, MetricKind::Counter, "User clients disconnected to keep the relay's total queued bytes within budget."),
    (CLIENTS_REJECTED, MetricKind::Counter, "User client connections closed without a valid user id line."),
    (SOURCES_REFUSED, MetricKind::Counter, "Event source connections refused because another source was connected."),
    (CLIENTS_CONNECTED, MetricKind::Gauge, "User clients connected now."),
    (REORDER_WINDOW, MetricKind::Gauge, "Events held in the reorder window, waiting for an earlier sequence number."),
    (SOURCES_CONNECTED, MetricKind::Gauge, "Event sources connected now (0 or 1)."),
    (QUEUED_BYTES, MetricKind::Gauge, "Bytes handed to user client sessions and not yet written or discarded."),
];

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
        weir_runtime::telemetry::register_metrics(METRICS);
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
                EVENTS_RECEIVED,
            ),
            (
                &self.events_delivered,
                counts.events_delivered,
                EVENTS_DELIVERED,
            ),
            (
                &self.events_malformed,
                counts.events_malformed,
                EVENTS_MALFORMED,
            ),
            (&self.events_stale, counts.events_stale, EVENTS_STALE),
            (
                &self.events_too_far_ahead,
                counts.events_too_far_ahead,
                EVENTS_TOO_FAR_AHEAD,
            ),
            (&self.gaps_skipped, counts.gaps_skipped, GAPS_SKIPPED),
            (
                &self.notifications_sent,
                counts.notifications_sent,
                NOTIFICATIONS_SENT,
            ),
            (
                &self.clients_dropped_slow,
                counts.clients_dropped_slow,
                CLIENTS_DROPPED_SLOW,
            ),
            (
                &self.clients_dropped_queue_budget,
                counts.clients_dropped_queue_budget,
                CLIENTS_DROPPED_QUEUE_BUDGET,
            ),
            (
                &self.clients_rejected,
                counts.clients_rejected,
                CLIENTS_REJECTED,
            ),
            (
                &self.sources_refused,
                counts.sources_refused,
                SOURCES_REFUSED,
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
        metrics::gauge!(CLIENTS_CONNECTED).set(clients_connected as f64);
        metrics::gauge!(REORDER_WINDOW).set(reorder_window as f64);
        self.changed.notify_waiters();
    }

    pub fn set_sources_connected(&self, sources: u64) {
        self.sources_connected.store(sources, Ordering::Relaxed);
        metrics::gauge!(SOURCES_CONNECTED).set(sources as f64);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders what a Prometheus scrape would see right after the relay's stats are created.
    fn exposition_at_start() -> String {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || RelayStats::new(Arc::default()));
        handle.render()
    }

    #[test]
    fn every_metric_is_exported_at_zero_with_help_text_before_any_event() {
        let text = exposition_at_start();
        for &(name, kind, _) in METRICS {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no help for {name}:\n{text}"
            );
            let kind = match kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
                MetricKind::Histogram => "summary",
            };
            assert!(
                text.contains(&format!("# TYPE {name} {kind}")),
                "{name}:\n{text}"
            );
            assert!(
                text.contains(&format!("\n{name} 0\n")),
                "{name} not at zero:\n{text}"
            );
        }
    }

    #[test]
    fn names_follow_the_weir_service_what_scheme() {
        for &(name, kind, help) in METRICS {
            assert!(name.starts_with("weir_relay_"), "{name}");
            assert_eq!(
                name.ends_with("_total"),
                kind == MetricKind::Counter,
                "{name}: counters and only counters end in _total"
            );
            assert!(!help.is_empty(), "{name}");
        }
    }

    #[test]
    fn every_name_the_relay_updates_is_in_the_table() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let stats = RelayStats::default();
            let all_ones = Counts {
                events_received: 1,
                events_delivered: 1,
                events_malformed: 1,
                events_stale: 1,
                events_too_far_ahead: 1,
                gaps_skipped: 1,
                notifications_sent: 1,
                clients_dropped_slow: 1,
                clients_dropped_queue_budget: 1,
                clients_rejected: 1,
                sources_refused: 1,
            };
            stats.add(&all_ones);
            stats.set_gauges(1, 1);
            stats.set_sources_connected(1);
        });
        let text = handle.render();
        let exported: Vec<&str> = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .filter_map(|line| line.split([' ', '{']).next())
            .collect();
        assert_eq!(exported.len(), METRICS.len(), "{text}");
        for name in exported {
            assert!(
                METRICS.iter().any(|&(known, _, _)| known == name),
                "{name} has no help text"
            );
        }
    }
}
