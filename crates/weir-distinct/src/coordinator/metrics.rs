//! The coordinator's metrics, each described and set to zero when it starts.

pub const ITEMS_RECEIVED: &str = "weir_distinct_coordinator_items_received_total";
pub const ITEMS_ACCEPTED: &str = "weir_distinct_coordinator_items_accepted_total";
pub const REQUESTS: &str = "weir_distinct_coordinator_requests_total";
pub const REJECTED: &str = "weir_distinct_coordinator_rejected_total";
pub const FORWARD_RETRIES: &str = "weir_distinct_coordinator_forward_retries_total";
pub const WORKERS_ALIVE: &str = "weir_distinct_coordinator_workers_alive";
pub const WORKER_RESTARTS: &str = "weir_distinct_coordinator_worker_restarts_total";
pub const REQUEST_SECONDS: &str = "weir_distinct_coordinator_request_duration_seconds";
pub const GROUPS_IN_FLIGHT: &str = "weir_distinct_coordinator_groups_in_flight";

/// Statuses the coordinator answers, by route.
pub const ITEMS_STATUSES: [u16; 6] = [200, 400, 408, 413, 415, 503];
pub const COUNT_STATUSES: [u16; 3] = [200, 400, 503];
/// Why `POST /items` was refused: the worker's reasons (one for every answer but 200).
pub const REASONS: [&str; 7] = crate::metric_names::REASONS;

pub fn register() {
    metrics::describe_counter!(
        ITEMS_RECEIVED,
        "Items in POST /items bodies that passed validation."
    );
    metrics::describe_counter!(
        ITEMS_ACCEPTED,
        "Items acknowledged with 200: every one committed by its shard's worker."
    );
    metrics::describe_counter!(
        REQUESTS,
        "Requests answered, by route (items, count) and HTTP status."
    );
    metrics::describe_counter!(
        REJECTED,
        "POST /items requests refused, by reason (one for every answer but 200): invalid, too_many_items, too_large, timeout, unreadable, media_type (refused before forwarding), unavailable (no worker committed every shard in time)."
    );
    metrics::describe_gauge!(
        GROUPS_IN_FLIGHT,
        "Shard groups of POST /items being forwarded to workers now (a request's items make one group per shard)."
    );
    metrics::describe_counter!(
        FORWARD_RETRIES,
        "Shard groups sent again to another worker (or the same after a backoff) after a failure."
    );
    metrics::describe_gauge!(
        WORKERS_ALIVE,
        "Workers whose last health check (or request) succeeded."
    );
    metrics::describe_counter!(
        WORKER_RESTARTS,
        "Local worker processes started again after they exited or failed to start."
    );
    metrics::describe_histogram!(
        REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "Time to answer a request, by route."
    );
    metrics::counter!(ITEMS_RECEIVED).absolute(0);
    metrics::counter!(ITEMS_ACCEPTED).absolute(0);
    for status in ITEMS_STATUSES {
        metrics::counter!(REQUESTS, "route" => "items", "status" => status.to_string()).absolute(0);
    }
    for status in COUNT_STATUSES {
        metrics::counter!(REQUESTS, "route" => "count", "status" => status.to_string()).absolute(0);
    }
    for reason in REASONS {
        metrics::counter!(REJECTED, "reason" => reason).absolute(0);
    }
    metrics::counter!(FORWARD_RETRIES).absolute(0);
    metrics::gauge!(WORKERS_ALIVE).set(0.0);
    // Not reset: requests of an earlier coordinator in this process may still be under way.
    metrics::gauge!(GROUPS_IN_FLIGHT).increment(0.0);
    metrics::counter!(WORKER_RESTARTS).absolute(0);
    for route in ["items", "count"] {
        // Touching the histogram makes the series exist before the first request.
        let _ = metrics::histogram!(REQUEST_SECONDS, "route" => route);
    }
}

pub fn answered(route: &'static str, status: u16, started: std::time::Instant) {
    metrics::counter!(REQUESTS, "route" => route, "status" => status.to_string()).increment(1);
    metrics::histogram!(REQUEST_SECONDS, "route" => route).record(started.elapsed().as_secs_f64());
}
