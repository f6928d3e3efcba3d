//! Every metric the increments service exports, with its help text, registered at zero when
//! a role starts (see `weir_runtime::telemetry::register_metrics`).

use weir_runtime::telemetry::{MetricKind, MetricSpec};

pub const REQUESTS: &str = "weir_increments_requests_total";
pub const QUEUE_DEPTH: &str = "weir_increments_queue_depth";
pub const WORKER_HELD: &str = "weir_increments_worker_held";
pub const BATCH_SIZE: &str = "weir_increments_batch_size";
pub const BATCH_KEYS: &str = "weir_increments_batch_keys";
pub const FLUSH_SECONDS: &str = "weir_increments_flush_seconds";
pub const STALENESS_SECONDS: &str = "weir_increments_staleness_seconds";
pub const STALENESS_MAX_SECONDS: &str = "weir_increments_staleness_max_seconds";
pub const DEAD_LETTERS: &str = "weir_increments_dead_letters_total";
pub const FLUSH_FAILURES: &str = "weir_increments_flush_failures_total";
pub const APPLIED: &str = "weir_increments_applied_total";
pub const DUPLICATES_SKIPPED: &str = "weir_increments_duplicates_skipped_total";
pub const FLUSH_FAILING: &str = "weir_increments_flush_failing";
pub const FLUSH_CONSECUTIVE_FAILURES: &str = "weir_increments_flush_consecutive_failures";
pub const LAST_FLUSH_TIMESTAMP: &str = "weir_increments_last_flush_timestamp_seconds";
pub const OLDEST_UNFLUSHED_AGE: &str = "weir_increments_oldest_unflushed_age_seconds";
pub const STREAM_LOST: &str = "weir_increments_stream_lost_total";
pub const LAST_COMMIT_TIMESTAMP: &str = "weir_increments_last_commit_timestamp_seconds";
pub const IDEMPOTENT_REPLAYS: &str = "weir_increments_idempotent_replays_total";
pub const IDEMPOTENCY_CONFLICTS: &str = "weir_increments_idempotency_conflicts_total";
pub const IDEMPOTENCY_KEYS_PRUNED: &str = "weir_increments_idempotency_keys_pruned_total";
pub const ENTRIES_RELEASED: &str = "weir_increments_entries_released_total";
pub const REJECTED: &str = "weir_increments_rejected_total";
pub const REQUEST_DURATION: &str = "weir_increments_request_duration_seconds";

/// Why a `POST /increment` was refused: the `reason` label of [`REJECTED`], every one at
/// zero from start-up. Every answer but 202 has exactly one.
pub const REJECT_REASONS: &[&str] = &[
    // 415, then the body reader's 413, 408 and 400 (`BodyError::reason`).
    "unsupported_media_type",
    "too_large",
    "timeout",
    "unreadable",
    // 400: the body (`validate::REASONS`), or the Idempotency-Key header.
    "invalid_json",
    "unknown_field",
    "duplicate_field",
    "missing_field",
    "invalid_key",
    "invalid_value",
    "invalid_idempotency_key",
    // 401 and 429 from the guard.
    "unauthorized",
    "rate_limited",
    // 409 and 422: the Idempotency-Key is in use.
    "in_flight",
    "mismatch",
    // 503: the queue is at its limit, or could not take the increment.
    "queue_full",
    "unavailable",
];

/// The `status` values of [`REQUESTS`] that exist at zero from start-up: every status
/// `POST /increment` answers.
pub const REQUEST_STATUSES: &[&str] = &[
    "202", "400", "401", "408", "409", "413", "415", "422", "429", "503",
];

const REJECTED_HELP: &str = "POST /increment requests refused, by reason (one for every answer but 202): unsupported_media_type (415); too_large, timeout, unreadable (the body: 413, 408, 400); invalid_json, unknown_field, duplicate_field, missing_field, invalid_key, invalid_value, invalid_idempotency_key (400); unauthorized (401); rate_limited (429); in_flight (409), mismatch (422) for an Idempotency-Key; queue_full, unavailable (503).";

const METRICS: &[MetricSpec] = &[
    (QUEUE_DEPTH, MetricKind::Gauge, "Increments accepted and not yet persisted (embedded log: unflushed records; Redis: stream entries, of up to 64 increments each, in the group's lag plus pending)."),
    (WORKER_HELD, MetricKind::Gauge, "Increments this worker holds in memory, waiting for its next flush."),
    (BATCH_SIZE, MetricKind::Histogram, "Increments per flush."),
    (BATCH_KEYS, MetricKind::Histogram, "Distinct keys per flush."),
    (FLUSH_SECONDS, MetricKind::Histogram, "Duration of one flush transaction."),
    (STALENESS_SECONDS, MetricKind::Histogram, "Age of a flush's oldest increment when it committed: from acceptance (the worker's receive time in Redis mode) to commit."),
    (STALENESS_MAX_SECONDS, MetricKind::Gauge, "The largest staleness any flush of this process has had."),
    (FLUSH_FAILURES, MetricKind::Counter, "Flushes that failed and were retried."),
    (APPLIED, MetricKind::Counter, "Increments added to the persisted totals."),
    (DUPLICATES_SKIPPED, MetricKind::Counter, "Redelivered increments recognised as already applied and skipped."),
    (FLUSH_FAILING, MetricKind::Gauge, "1 while the last flush attempt failed."),
    (FLUSH_CONSECUTIVE_FAILURES, MetricKind::Gauge, "Flush attempts failed in a row."),
    (LAST_FLUSH_TIMESTAMP, MetricKind::Gauge, "When this process's last successful flush committed (Unix seconds)."),
    (OLDEST_UNFLUSHED_AGE, MetricKind::Gauge, "Age of the oldest increment a failing flush holds."),
    (STREAM_LOST, MetricKind::Counter, "Times the Redis stream or its consumer group was found gone and recreated."),
    (LAST_COMMIT_TIMESTAMP, MetricKind::Gauge, "When any worker last committed a flush, read from the database (Unix seconds; 0 before the first)."),
    (IDEMPOTENT_REPLAYS, MetricKind::Counter, "Requests whose Idempotency-Key was already accepted with the same body: answered 202 again, nothing added."),
    (IDEMPOTENCY_KEYS_PRUNED, MetricKind::Counter, "Idempotency keys forgotten after their retention window."),
    (ENTRIES_RELEASED, MetricKind::Counter, "Held stream entries a flush left to the worker that had taken them over (this worker was paused or slow): not applied here, not acknowledged here."),
    (REQUEST_DURATION, MetricKind::Histogram, "Time to answer POST /increment, from the request's headers to its answer, whatever the answer."),
];

pub fn register() {
    weir_runtime::telemetry::register_metrics(METRICS);
    weir_runtime::telemetry::register_labelled_counters(
        REJECTED,
        REJECTED_HELP,
        "reason",
        REJECT_REASONS,
    );
    // Labelled families only: an unlabelled zero beside them would be a series no answer
    // ever moves.
    weir_runtime::telemetry::register_labelled_counters(
        REQUESTS,
        "POST /increment answers, by HTTP status.",
        "status",
        REQUEST_STATUSES,
    );
    weir_runtime::telemetry::register_labelled_counters(
        DEAD_LETTERS,
        "Increments moved to the dead letters, by reason: overflow (the total would pass i64), malformed (an entry that cannot be decoded), max_deliveries (an entry delivered too often without a commit).",
        "reason",
        DEAD_LETTER_REASONS,
    );
    weir_runtime::telemetry::register_labelled_counters(
        IDEMPOTENCY_CONFLICTS,
        "Requests refused for their Idempotency-Key, by reason: in_flight (409) or mismatch (422).",
        "reason",
        IDEMPOTENCY_CONFLICT_REASONS,
    );
}

/// The `reason` values of [`IDEMPOTENCY_CONFLICTS`].
pub const IDEMPOTENCY_CONFLICT_REASONS: &[&str] = &["in_flight", "mismatch"];

/// The `reason` values of [`DEAD_LETTERS`].
pub const DEAD_LETTER_REASONS: &[&str] = &["overflow", "malformed", "max_deliveries"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_help_and_exists_at_start() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, register);
        let text = handle.render();
        for &(name, kind, _) in METRICS {
            assert!(name.starts_with("weir_increments_"), "{name}");
            assert_eq!(
                name.ends_with("_total"),
                kind == MetricKind::Counter,
                "{name}"
            );
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no help for {name}:\n{text}"
            );
            if kind != MetricKind::Histogram {
                assert!(text.contains(&format!("\n{name} 0\n")), "{name}:\n{text}");
            }
        }
        assert!(text.contains(&format!("# HELP {REJECTED} ")), "{text}");
        for reason in REJECT_REASONS {
            assert!(
                text.contains(&format!("\n{REJECTED}{{reason=\"{reason}\"}} 0\n")),
                "{reason}:\n{text}"
            );
        }
    }

    #[test]
    fn every_status_exists_at_zero() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, register);
        let text = handle.render();
        for status in REQUEST_STATUSES {
            let series = format!("\n{REQUESTS}{{status=\"{status}\"}} 0\n");
            assert!(text.contains(&series), "{series}:\n{text}");
        }
        for reason in DEAD_LETTER_REASONS {
            let series = format!("\n{DEAD_LETTERS}{{reason=\"{reason}\"}} 0\n");
            assert!(text.contains(&series), "{series}:\n{text}");
        }
        for reason in IDEMPOTENCY_CONFLICT_REASONS {
            let series = format!("\n{IDEMPOTENCY_CONFLICTS}{{reason=\"{reason}\"}} 0\n");
            assert!(text.contains(&series), "{series}:\n{text}");
        }
        for family in [REQUESTS, DEAD_LETTERS, IDEMPOTENCY_CONFLICTS] {
            assert!(
                !text.contains(&format!("\n{family} ")),
                "{family} unlabelled:\n{text}"
            );
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "{family}:\n{text}"
            );
        }
    }

    #[test]
    fn every_reason_the_body_reader_and_validation_give_is_registered() {
        let given = weir_runtime::http::BodyError::REASONS
            .iter()
            .chain(crate::validate::REASONS.iter());
        for reason in given {
            assert!(REJECT_REASONS.contains(reason), "{reason}");
        }
    }
}
