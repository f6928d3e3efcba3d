//! The coordinator's HTTP API:
//! - `POST /items`: validated here exactly as a worker would (400/413/415 with
//!   `{"error", "field"}`, nothing forwarded), then each shard's items to its worker;
//!   `200 {"accepted": n}` once every shard's worker has committed, else 503 with
//!   `Retry-After` (resending the same items is then safe).
//! - `GET /items/{tenant}/count`: `{"count": N}` from a worker.
//! - `GET /`: every configured worker, alive or not, and the damaged shards (`damaged`).
//!   `/healthz`: the process answers. `/readyz`: at least one worker is alive (any worker
//!   can take any shard whose owner has died) and no shard is damaged (its counts and
//!   writes are refused), with the failing workers and damaged shards listed. `/metrics`,
//!   `/openapi.json`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use weir_runtime::http::ApiError;
use weir_runtime::logs::{escape, LogLimiter};

use super::forward::RETRY_AFTER_SECONDS;
use super::metrics::{answered, GROUPS_IN_FLIGHT, ITEMS_ACCEPTED, ITEMS_RECEIVED, REJECTED};
use super::Coordinator;
use crate::shard::{group_by_shard, shard_of, SHARDS};
use crate::validate::{
    is_json_content_type, parse_items, Rejection, MAX_BODY_BYTES, MAX_FIELD_BYTES, MAX_ITEMS,
};

static UNPLACED: LogLimiter = LogLimiter::per_second();

pub fn router(coordinator: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/", get(health))
        .route("/items", post(post_items))
        .route("/items/{tenant}/count", get(count))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(
            "/openapi.json",
            get(|| async { Json(crate::openapi::document()) }),
        )
        .with_state(coordinator)
        .merge(weir_runtime::http::metrics_router())
}

fn unavailable(error: String) -> Response {
    let mut response = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, error).into_response();
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECONDS),
    );
    response
}

fn rejected(reason: &'static str, error: ApiError) -> Response {
    rejected_response(reason, error.into_response())
}

fn rejected_response(reason: &'static str, response: Response) -> Response {
    metrics::counter!(REJECTED, "reason" => reason).increment(1);
    response
}

/// Shard groups being forwarded, counted in [`GROUPS_IN_FLIGHT`] until dropped (also when
/// the client goes away and the request is abandoned).
struct InFlight(f64);

impl InFlight {
    fn new(groups: usize) -> Self {
        let groups = groups as f64;
        metrics::gauge!(GROUPS_IN_FLIGHT).increment(groups);
        InFlight(groups)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(GROUPS_IN_FLIGHT).decrement(self.0);
    }
}

async fn post_items(
    State(coordinator): State<Arc<Coordinator>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let response = accept(&coordinator, &headers, body).await;
    answered("items", response.status().as_u16(), started);
    response
}

async fn accept(coordinator: &Coordinator, headers: &HeaderMap, body: Body) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if !is_json_content_type(content_type) {
        return rejected(
            "media_type",
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Type must be application/json",
            ),
        );
    }
    let bytes = match weir_runtime::http::read_body(headers, body, MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(err) => return rejected_response(err.reason(), err.into_api_error()),
    };
    let items = match parse_items(&bytes) {
        Ok(items) => items,
        Err(Rejection::TooManyItems(n)) => {
            return rejected(
                "too_many_items",
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("at most {MAX_ITEMS} items per request, got {n}"),
                )
                .with_field("items"),
            )
        }
        Err(Rejection::Invalid { error, field }) => {
            let mut error = ApiError::bad_request(error);
            error.field = field;
            return rejected("invalid", error);
        }
    };
    let received = items.len();
    metrics::counter!(ITEMS_RECEIVED).increment(received as u64);
    let groups = group_by_shard(items, SHARDS);
    let _in_flight = InFlight::new(groups.len());
    match coordinator.forwarder.post_items(groups).await {
        Ok(()) => {
            metrics::counter!(ITEMS_ACCEPTED).increment(received as u64);
            Json(json!({ "accepted": received })).into_response()
        }
        Err(unplaced) => {
            weir_runtime::warn_limited!(
                UNPLACED,
                shards = ?unplaced.shards,
                error = %escape(unplaced.error.as_bytes()),
                "items not placed before the deadline, answered 503"
            );
            rejected_response(
                "unavailable",
                unavailable(format!(
                    "no worker committed shard(s) {:?} in time: {}; resending the same items is safe",
                    unplaced.shards, unplaced.error
                )),
            )
        }
    }
}

async fn count(
    State(coordinator): State<Arc<Coordinator>>,
    tenant: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let started = Instant::now();
    let tenant = match tenant {
        Ok(Path(tenant)) => tenant,
        Err(rejection) => {
            let response = crate::server::bad_tenant(&rejection);
            answered("count", response.status().as_u16(), started);
            return response;
        }
    };
    let response = if tenant.is_empty() || tenant.len() > MAX_FIELD_BYTES {
        ApiError::bad_request(format!(
            "must be a non-empty tenant of at most {MAX_FIELD_BYTES} bytes"
        ))
        .with_field("tenant")
        .into_response()
    } else {
        let shard = shard_of(&tenant, SHARDS);
        match coordinator.forwarder.count(&tenant, shard).await {
            Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(error) => {
                weir_runtime::warn_limited!(UNPLACED, error = %escape(error.as_bytes()), "no worker answered a count");
                unavailable(format!("no worker answered: {error}"))
            }
        }
    };
    answered("count", response.status().as_u16(), started);
    response
}

async fn health(State(coordinator): State<Arc<Coordinator>>) -> Response {
    let table = coordinator.pool.table();
    let workers: Vec<_> = table
        .workers
        .iter()
        .map(|w| {
            let mut report = w.report();
            report["shards"] = json!(coordinator.pool.shards_of(w));
            report
        })
        .collect();
    let alive = table.workers.iter().filter(|w| w.is_alive()).count();
    Json(json!({
        "service": "distinct coordinator",
        "alive": alive,
        "workers": workers,
        "damaged": damaged_shards(&table),
        "config_error": coordinator.reload_error(),
    }))
    .into_response()
}

/// Each damaged shard once, as the alive workers report it (every worker reads the same
/// files, so they agree).
fn damaged_shards(table: &super::pool::Table) -> Vec<serde_json::Value> {
    let mut seen = std::collections::BTreeMap::new();
    for worker in table.workers.iter().filter(|w| w.is_alive()) {
        for damage in worker.damaged() {
            if let Some(shard) = damage.get("shard").and_then(serde_json::Value::as_u64) {
                seen.entry(shard).or_insert(damage);
            }
        }
    }
    seen.into_values().collect()
}

async fn readyz(State(coordinator): State<Arc<Coordinator>>) -> Response {
    let table = coordinator.pool.table();
    let alive = table.workers.iter().filter(|w| w.is_alive()).count();
    let failures: Vec<_> = table
        .workers
        .iter()
        .filter(|w| !w.is_alive())
        .map(|w| {
            json!({
                "worker": w.name,
                "error": w.last_error().unwrap_or_else(|| "not checked yet".into()),
            })
        })
        .collect();
    let damaged = damaged_shards(&table);
    let ready = alive > 0 && damaged.is_empty();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "ready": ready,
            "alive": alive,
            "workers": table.workers.len(),
            "failures": failures,
            "damaged": damaged,
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_in_flight_until_their_request_is_answered_or_dropped() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let gauge = || {
            let text = handle.render();
            text.lines()
                .find_map(|line| line.strip_prefix(GROUPS_IN_FLIGHT)?.strip_prefix(' '))
                .map(|value| value.parse::<f64>().unwrap())
        };
        metrics::with_local_recorder(&recorder, || {
            let first = InFlight::new(3);
            let second = InFlight::new(2);
            assert_eq!(gauge(), Some(5.0));
            drop(first);
            assert_eq!(gauge(), Some(2.0));
            drop(second);
            assert_eq!(gauge(), Some(0.0));
        });
    }
}
