//! The relay's counters, kept twice on purpose: as atomics that tests and operators can read
//! directly ([`RelayStats::snapshot`], [`RelayStats::wait_until`]), and as Prometheus metrics.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
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
    pub clients_refused: u64,
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
    /// Age of the oldest event held in the reorder window, in milliseconds (0 when empty).
    pub reorder_oldest_ms: u64,
}

const EVENTS_RECEIVED: &str = "weir_relay_events_received_total";
const EVENTS_DELIVERED: &str = "weir_relay_events_delivered_total";
const EVENTS_REJECTED: &str = "weir_relay_events_rejected_total";
const GAPS_SKIPPED: &str = "weir_relay_gaps_skipped_total";
const NOTIFICATIONS_SENT: &str = "weir_relay_notifications_sent_total";
const CLIENTS_DROPPED_SLOW: &str = "weir_relay_clients_dropped_slow_total";
const CLIENTS_DROPPED_QUEUE_BUDGET: &str = "weir_relay_clients_dropped_queue_budget_total";
const CLIENTS_REJECTED: &str = "weir_relay_clients_rejected_total";
const CLIENTS_REFUSED: &str = "weir_relay_clients_refused_total";
const SOURCES_REFUSED: &str = "weir_relay_sources_refused_total";
const CLIENTS_CONNECTED: &str = "weir_relay_clients_connected";
const REORDER_WINDOW: &str = "weir_relay_reorder_window";
const REORDER_OLDEST_SECONDS: &str = "weir_relay_reorder_oldest_seconds";
const SOURCES_CONNECTED: &str = "weir_relay_sources_connected";
const QUEUED_BYTES: &str = "weir_relay_queued_bytes";
const DELIVERY_SECONDS: &str = "weir_relay_delivery_seconds";

/// The `reason` values of `weir_relay_events_rejected_total`, in the order of
/// [`RelayStats`]' handles: every one exists at zero from start-up.
pub const REJECT_REASONS: [&str; 3] = ["malformed", "stale", "too_far_ahead"];

const EVENTS_REJECTED_HELP: &str = "Events read from the source and not delivered, by reason: malformed (the line could not be parsed), stale (its number was already delivered: a duplicate or a late arrival), too_far_ahead (beyond the reorder window's reach).";

/// Every unlabelled metric the relay exports, with its help text. All of them (and every
/// reason of `weir_relay_events_rejected_total`) are registered at zero when the relay
/// starts, so that `rate()` and alerts work from the first scrape rather than from the first
/// occurrence.
const METRICS: &[MetricSpec] = &[
    (EVENTS_RECEIVED, MetricKind::Counter, "Events read from the event source."),
    (EVENTS_DELIVERED, MetricKind::Counter, "Events released in sequence order and routed to their recipients."),
    (GAPS_SKIPPED, MetricKind::Counter, "Missing sequence numbers given up on (waited too long, or the stream ended)."),
    (NOTIFICATIONS_SENT, MetricKind::Counter, "Notifications routed to connected user clients."),
    (CLIENTS_DROPPED_SLOW, MetricKind::Counter, "User clients disconnected because their own queue was full."),
    (CLIENTS_DROPPED_QUEUE_BUDGET, MetricKind::Counter, "User clients disconnected to keep the relay's total queued bytes within budget."),
    (CLIENTS_REJECTED, MetricKind::Counter, "User client connections closed without a valid user id line."),
    (CLIENTS_REFUSED, MetricKind::Counter, "User client connections closed at once because maxClients connections were open."),
    (SOURCES_REFUSED, MetricKind::Counter, "Event source connections refused because another source was connected."),
    (CLIENTS_CONNECTED, MetricKind::Gauge, "User clients connected now."),
    (REORDER_WINDOW, MetricKind::Gauge, "Events held in the reorder window, waiting for an earlier sequence number."),
    (REORDER_OLDEST_SECONDS, MetricKind::Gauge, "Age of the oldest event held in the reorder window (since the read that brought it); 0 when the window is empty. Refreshed at least every second."),
    (SOURCES_CONNECTED, MetricKind::Gauge, "Event sources connected now (0 or 1)."),
    (QUEUED_BYTES, MetricKind::Gauge, "Bytes handed to user client sessions and not yet written or discarded."),
    (DELIVERY_SECONDS, MetricKind::Histogram, "From an event's receipt (the read that brought it) to its release in sequence order. Sampled: an event whose sequence number is a multiple of 16, at most one per 100 ms."),
];

/// The exporter's handles, made once when the relay starts: publishing a batch then costs
/// an atomic add per counter, with no lookup of the series by name.
#[derive(Debug)]
struct Handles {
    events_received: Counter,
    events_delivered: Counter,
    /// In the order of [`REJECT_REASONS`].
    events_rejected: [Counter; 3],
    gaps_skipped: Counter,
    notifications_sent: Counter,
    clients_dropped_slow: Counter,
    clients_dropped_queue_budget: Counter,
    clients_rejected: Counter,
    clients_refused: Counter,
    sources_refused: Counter,
    clients_connected: Gauge,
    reorder_window: Gauge,
    reorder_oldest_seconds: Gauge,
    sources_connected: Gauge,
    queued_bytes: Gauge,
    delivery_seconds: Histogram,
}

impl Handles {
    /// Registers every metric at zero with its help text, and keeps the handles.
    fn register() -> Self {
        weir_runtime::telemetry::register_metrics(METRICS);
        let rejected = weir_runtime::telemetry::register_labelled_counters(
            EVENTS_REJECTED,
            EVENTS_REJECTED_HELP,
            "reason",
            &REJECT_REASONS,
        );
        let [malformed, stale, too_far_ahead]: [Counter; 3] = rejected
            .try_into()
            .unwrap_or_else(|_| unreachable!("one counter per reason"));
        Handles {
            events_received: metrics::counter!(EVENTS_RECEIVED),
            events_delivered: metrics::counter!(EVENTS_DELIVERED),
            events_rejected: [malformed, stale, too_far_ahead],
            gaps_skipped: metrics::counter!(GAPS_SKIPPED),
            notifications_sent: metrics::counter!(NOTIFICATIONS_SENT),
            clients_dropped_slow: metrics::counter!(CLIENTS_DROPPED_SLOW),
            clients_dropped_queue_budget: metrics::counter!(CLIENTS_DROPPED_QUEUE_BUDGET),
            clients_rejected: metrics::counter!(CLIENTS_REJECTED),
            clients_refused: metrics::counter!(CLIENTS_REFUSED),
            sources_refused: metrics::counter!(SOURCES_REFUSED),
            clients_connected: metrics::gauge!(CLIENTS_CONNECTED),
            reorder_window: metrics::gauge!(REORDER_WINDOW),
            reorder_oldest_seconds: metrics::gauge!(REORDER_OLDEST_SECONDS),
            sources_connected: metrics::gauge!(SOURCES_CONNECTED),
            queued_bytes: metrics::gauge!(QUEUED_BYTES),
            delivery_seconds: metrics::histogram!(DELIVERY_SECONDS),
        }
    }
}

#[derive(Debug)]
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
    clients_refused: AtomicU64,
    sources_refused: AtomicU64,
    clients_connected: AtomicU64,
    reorder_window: AtomicU64,
    reorder_oldest_ms: AtomicU64,
    sources_connected: AtomicU64,
    /// Live, shared with the client sessions, which take bytes off as they write them.
    queued_bytes: Arc<AtomicUsize>,
    changed: Notify,
    handles: Handles,
}

impl RelayStats {
    /// Registers every metric at zero. `queued_bytes`: the count of bytes handed to client
    /// sessions and not yet written.
    pub fn new(queued_bytes: Arc<AtomicUsize>) -> Self {
        let handles = Handles::register();
        let zero = || AtomicU64::new(0);
        RelayStats {
            events_received: zero(),
            events_delivered: zero(),
            events_malformed: zero(),
            events_stale: zero(),
            events_too_far_ahead: zero(),
            gaps_skipped: zero(),
            notifications_sent: zero(),
            clients_dropped_slow: zero(),
            clients_dropped_queue_budget: zero(),
            clients_rejected: zero(),
            clients_refused: zero(),
            sources_refused: zero(),
            clients_connected: zero(),
            reorder_window: zero(),
            reorder_oldest_ms: zero(),
            sources_connected: zero(),
            queued_bytes,
            changed: Notify::new(),
            handles,
        }
    }

    pub fn add(&self, counts: &Counts) {
        let h = &self.handles;
        let [malformed, stale, too_far_ahead] = &h.events_rejected;
        let pairs = [
            (
                &self.events_received,
                counts.events_received,
                &h.events_received,
            ),
            (
                &self.events_delivered,
                counts.events_delivered,
                &h.events_delivered,
            ),
            (&self.events_malformed, counts.events_malformed, malformed),
            (&self.events_stale, counts.events_stale, stale),
            (
                &self.events_too_far_ahead,
                counts.events_too_far_ahead,
                too_far_ahead,
            ),
            (&self.gaps_skipped, counts.gaps_skipped, &h.gaps_skipped),
            (
                &self.notifications_sent,
                counts.notifications_sent,
                &h.notifications_sent,
            ),
            (
                &self.clients_dropped_slow,
                counts.clients_dropped_slow,
                &h.clients_dropped_slow,
            ),
            (
                &self.clients_dropped_queue_budget,
                counts.clients_dropped_queue_budget,
                &h.clients_dropped_queue_budget,
            ),
            (
                &self.clients_rejected,
                counts.clients_rejected,
                &h.clients_rejected,
            ),
            (
                &self.clients_refused,
                counts.clients_refused,
                &h.clients_refused,
            ),
            (
                &self.sources_refused,
                counts.sources_refused,
                &h.sources_refused,
            ),
        ];
        for (atomic, value, counter) in pairs {
            if value > 0 {
                atomic.fetch_add(value, Ordering::Relaxed);
                counter.increment(value);
            }
        }
        self.changed.notify_waiters();
    }

    /// `reorder_oldest`: how long the oldest event held in the window has waited.
    pub fn set_gauges(
        &self,
        clients_connected: usize,
        reorder_window: usize,
        reorder_oldest: Duration,
    ) {
        let h = &self.handles;
        let queued_bytes = self.queued_bytes.load(Ordering::Relaxed);
        h.queued_bytes.set(queued_bytes as f64);
        self.clients_connected
            .store(clients_connected as u64, Ordering::Relaxed);
        self.reorder_window
            .store(reorder_window as u64, Ordering::Relaxed);
        self.reorder_oldest_ms
            .store(reorder_oldest.as_millis() as u64, Ordering::Relaxed);
        h.clients_connected.set(clients_connected as f64);
        h.reorder_window.set(reorder_window as f64);
        h.reorder_oldest_seconds.set(reorder_oldest.as_secs_f64());
        self.changed.notify_waiters();
    }

    pub fn set_sources_connected(&self, sources: u64) {
        self.sources_connected.store(sources, Ordering::Relaxed);
        self.handles.sources_connected.set(sources as f64);
        self.changed.notify_waiters();
    }

    /// One sampled event's wait from receipt to release.
    pub fn record_delivery(&self, wait: Duration) {
        self.handles.delivery_seconds.record(wait.as_secs_f64());
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
                clients_refused: load(&self.clients_refused),
                sources_refused: load(&self.sources_refused),
            },
            clients_connected: load(&self.clients_connected),
            reorder_window: load(&self.reorder_window),
            sources_connected: load(&self.sources_connected),
            queued_bytes: self.queued_bytes.load(Ordering::Relaxed) as u64,
            reorder_oldest_ms: load(&self.reorder_oldest_ms),
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
            let kind_name = match kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
                MetricKind::Histogram => "summary",
            };
            assert!(
                text.contains(&format!("# TYPE {name} {kind_name}")),
                "{name}:\n{text}"
            );
            let zero = match kind {
                MetricKind::Histogram => format!("\n{name}_count 0\n"),
                _ => format!("\n{name} 0\n"),
            };
            assert!(text.contains(&zero), "{name} not at zero:\n{text}");
        }
        assert!(
            text.contains(&format!("# HELP {EVENTS_REJECTED} ")),
            "{text}"
        );
        for reason in REJECT_REASONS {
            assert!(
                text.contains(&format!("\n{EVENTS_REJECTED}{{reason=\"{reason}\"}} 0\n")),
                "{reason} not at zero:\n{text}"
            );
        }
    }

    #[test]
    fn names_follow_the_weir_service_what_scheme() {
        let labelled = (EVENTS_REJECTED, MetricKind::Counter, EVENTS_REJECTED_HELP);
        for &(name, kind, help) in METRICS.iter().chain([&labelled]) {
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
        let stats = metrics::with_local_recorder(&recorder, || RelayStats::new(Arc::default()));
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
            clients_refused: 1,
            sources_refused: 1,
        };
        // The handles were made with the relay's stats: no lookup by name afterwards.
        stats.add(&all_ones);
        stats.set_gauges(1, 1, Duration::from_millis(1500));
        stats.set_sources_connected(1);
        stats.record_delivery(Duration::from_millis(2));
        let text = handle.render();
        let exported: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .filter_map(|line| line.split([' ', '{']).next())
            .map(|name| {
                name.strip_suffix("_sum")
                    .or_else(|| name.strip_suffix("_count"))
                    .unwrap_or(name)
            })
            .collect();
        assert_eq!(exported.len(), METRICS.len() + 1, "{text}");
        for name in exported {
            assert!(
                name == EVENTS_REJECTED || METRICS.iter().any(|&(known, _, _)| known == name),
                "{name} has no help text"
            );
        }
        for reason in REJECT_REASONS {
            assert!(
                text.contains(&format!("{EVENTS_REJECTED}{{reason=\"{reason}\"}} 1\n")),
                "{reason}:\n{text}"
            );
        }
        assert!(
            text.contains(&format!("\n{REORDER_OLDEST_SECONDS} 1.5\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("\n{DELIVERY_SECONDS}_count 1\n")),
            "{text}"
        );
        assert_eq!(stats.snapshot().reorder_oldest_ms, 1500);
    }
}
