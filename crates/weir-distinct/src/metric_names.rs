//! Every metric a distinct worker exports, with its help text, registered at zero when it
//! starts serving (see `weir_runtime::telemetry::register_metrics`). The coordinator's are in
//! `coordinator::metrics`.

use weir_runtime::telemetry::{MetricKind, MetricSpec};

pub const REQUESTS: &str = "weir_distinct_requests_total";
pub const ITEMS_RECEIVED: &str = "weir_distinct_items_received_total";
pub const ITEMS_ACCEPTED: &str = "weir_distinct_items_accepted_total";
pub const ITEMS_FOLDED: &str = "weir_distinct_items_folded_total";
pub const REJECTED: &str = "weir_distinct_rejected_total";
pub const FOLDS: &str = "weir_distinct_folds_total";
pub const PENDING_BYTES: &str = "weir_distinct_pending_bytes";
pub const FOLD_LAG: &str = "weir_distinct_fold_lag_seconds";
pub const DAMAGED_SHARDS: &str = "weir_distinct_damaged_shards";
pub const REQUEST_SECONDS: &str = "weir_distinct_request_duration_seconds";

/// Statuses `POST /items` answers: the `status` label of [`REQUESTS`].
pub const STATUSES: [u16; 6] = [200, 400, 408, 413, 415, 503];
/// Why `POST /items` was refused: the `reason` label of [`REJECTED`] (the coordinator's
/// too), one for every answer but 200. `invalid` (400: the items), `too_many_items` (413),
/// `too_large`, `timeout`, `unreadable` (the body reader's 413, 408, 400), `media_type`
/// (415), `unavailable` (503: the store could not take them).
pub const REASONS: [&str; 7] = [
    "invalid",
    "too_many_items",
    "too_large",
    "timeout",
    "unreadable",
    "media_type",
    "unavailable",
];
/// The routes [`REQUEST_SECONDS`] times.
pub const ROUTES: [&str; 2] = ["items", "count"];
/// Outcomes of a fold: the `status` label of [`FOLDS`].
pub const FOLD_STATUSES: [&str; 2] = ["ok", "error"];

const METRICS: &[MetricSpec] = &[
    (ITEMS_RECEIVED, MetricKind::Counter, "Items in POST /items bodies that passed validation."),
    (ITEMS_ACCEPTED, MetricKind::Counter, "Items acknowledged (durable), duplicates included."),
    (ITEMS_FOLDED, MetricKind::Counter, "Acknowledged items folded from the shard logs into the index (and so counted)."),
    (PENDING_BYTES, MetricKind::Gauge, "Bytes of acknowledged items logged and not yet folded into the index."),
    (DAMAGED_SHARDS, MetricKind::Gauge, "Shards whose files failed their checks: their counts and writes are refused until `weir distinct repair` (see GET /readyz)."),
    (FOLD_LAG, MetricKind::Gauge, "Age of the oldest acknowledged item waiting for a fold into its shard's index (so not yet counted); 0 when none waits, and with the Postgres store, which counts at commit."),
];

const REQUESTS_HELP: &str = "POST /items requests answered, by HTTP status.";
const REJECTED_HELP: &str = "POST /items requests refused, by reason (one for every answer but 200): invalid, too_many_items, too_large, timeout, unreadable, media_type, unavailable.";
const FOLDS_HELP: &str = "Folds of a shard's logged items into its index, by status.";
const REQUEST_SECONDS_HELP: &str = "Time to answer a request, by route (items, count).";

/// Every series at zero from the start, so a dashboard sees them before traffic.
pub fn register() {
    weir_runtime::telemetry::register_metrics(METRICS);
    let statuses = STATUSES.map(status_label);
    weir_runtime::telemetry::register_labelled_counters(
        REQUESTS,
        REQUESTS_HELP,
        "status",
        &statuses,
    );
    weir_runtime::telemetry::register_labelled_counters(
        REJECTED,
        REJECTED_HELP,
        "reason",
        &REASONS,
    );
    weir_runtime::telemetry::register_labelled_counters(
        FOLDS,
        FOLDS_HELP,
        "status",
        &FOLD_STATUSES,
    );
    metrics::describe_histogram!(
        REQUEST_SECONDS,
        metrics::Unit::Seconds,
        REQUEST_SECONDS_HELP
    );
    for route in ROUTES {
        // Touching the histogram makes the series exist before the first request.
        let _created = metrics::histogram!(REQUEST_SECONDS, "route" => route);
    }
}

/// A status as a label value, without allocating: every one of [`STATUSES`].
pub fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        408 => "408",
        413 => "413",
        415 => "415",
        503 => "503",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_help_and_exists_at_start_under_the_scheme() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, register);
        let text = handle.render();
        let labelled = [REQUESTS, REJECTED, FOLDS];
        let names = METRICS
            .iter()
            .map(|&(name, _, _)| name)
            .chain(labelled)
            .chain([REQUEST_SECONDS]);
        for name in names {
            assert!(name.starts_with("weir_distinct_"), "{name}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no help for {name}:\n{text}"
            );
        }
        for &(name, kind, _) in METRICS {
            assert_eq!(name.ends_with("_total"), kind == MetricKind::Counter);
            assert!(text.contains(&format!("\n{name} 0\n")), "{name}:\n{text}");
        }
        for status in STATUSES {
            assert_ne!(status_label(status), "other");
            let series = format!("{REQUESTS}{{status=\"{status}\"}} 0\n");
            assert!(text.contains(&series), "{series}:\n{text}");
        }
        for reason in REASONS {
            let series = format!("{REJECTED}{{reason=\"{reason}\"}} 0\n");
            assert!(text.contains(&series), "{series}:\n{text}");
        }
        for route in ROUTES {
            let series = format!("{REQUEST_SECONDS}_count{{route=\"{route}\"}} 0\n");
            assert!(text.contains(&series), "{series}:\n{text}");
        }
    }

    #[test]
    fn the_body_readers_reasons_are_registered() {
        for reason in weir_runtime::http::BodyError::REASONS {
            assert!(REASONS.contains(&reason), "{reason}");
        }
    }
}
