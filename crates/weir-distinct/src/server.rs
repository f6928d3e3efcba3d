//! The worker's HTTP API:
//! - `POST /items`: a JSON array of `{"id", "tenant"}`; `200 {"accepted": n}` once all n
//!   items are durable (n counts duplicates too: they were accepted, and count once); they
//!   show in the counts within `worker_persist`. 400/413/415 with `{"error", "field"}` for a refused body, of which nothing is
//!   stored; 503 with `Retry-After` when a shard cannot be written (owned by another worker,
//!   or the disk failed), after which resending the same items is safe.
//! - `GET /items/{tenant}/count`: `{"count": N}`, one lookup.
//! - A shard found damaged answers both with 503 naming the shard, the file and the byte
//!   offset, and the header [`DAMAGED_HEADER`] (no other worker can do better: they all
//!   read the same files), until `weir distinct repair` moves the damage aside.
//! - `/healthz`: the process answers, `{"status": "ok", "pid", "damaged": [...]}` (the
//!   coordinator shows the damaged shards); `/readyz`: the store can be read and no shard
//!   is damaged; `/metrics`.

use std::sync::OnceLock;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use weir_runtime::http::ApiError;
use weir_runtime::logs::{escape, LogLimiter};
use weir_runtime::Shutdown;

use crate::config::{Database, DistinctConfig};
use crate::metric_names::{
    status_label, ITEMS_ACCEPTED, ITEMS_RECEIVED, REASONS, REJECTED, REQUESTS, REQUEST_SECONDS,
    ROUTES, STATUSES,
};
use crate::store::{PostgresStore, SqliteStore, Store, StoreError, StoreOptions};
use crate::validate::{
    is_json_content_type, parse_batch, Rejection, MAX_BODY_BYTES, MAX_FIELD_BYTES, MAX_ITEMS,
};

static STORE_ERRORS: LogLimiter = LogLimiter::per_second();

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the worker's HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Set on a 503 for a damaged shard (its number): the coordinator answers it at once
/// rather than trying other workers.
pub const DAMAGED_HEADER: &str = "weir-damaged-shard";

/// Tables of the Postgres store: `distinct_items`, `distinct_counts`.
pub const TABLE_PREFIX: &str = "distinct";

/// Opens the store `config` names.
pub async fn open_store(config: &DistinctConfig) -> Result<Store, ServeError> {
    let options = StoreOptions {
        fsync: config.fsync,
        // Folding takes time too: starting it at half the allowed delay keeps the count
        // within `worker_persist` of the acknowledgement.
        fold_after: config.worker_persist / 2,
        ..StoreOptions::default()
    };
    match &config.database {
        Database::Sqlite(root) => Ok(Store::Sqlite(SqliteStore::open(root, options)?)),
        // Postgres commits durably by its own settings; `fsync` is for the SQLite files.
        Database::Postgres(url) => Ok(Store::Postgres(
            PostgresStore::open(url, TABLE_PREFIX, options).await?,
        )),
    }
}

/// Opens the store, then [`serve`]s.
pub async fn run(
    listener: TcpListener,
    config: &DistinctConfig,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    let store = open_store(config).await?;
    serve(listener, store, shutdown).await
}

/// Serves the worker API on `listener` until `shutdown` is cancelled, then lets in-flight
/// requests finish (each is answered after its commit) and closes the store.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    // The router installs the Prometheus recorder; counters made before it would be no-ops.
    let app = router(store.clone());
    register_metrics();
    // The runtime's header, idle and body timeouts and connection cap, as on every listener.
    let limits = weir_runtime::http::ListenerLimits::default();
    let served = weir_runtime::http::serve(listener, app, limits, shutdown.token.clone()).await;
    store.close().await;
    Ok(served?)
}

/// The worker's routes over `store`.
pub fn router(store: Store) -> Router {
    Router::new()
        .route("/items", post(post_items))
        .route("/items/{tenant}/count", get(count))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(store)
        .merge(weir_runtime::http::metrics_router())
}

/// Every series at zero from the start, so a dashboard sees them before traffic.
pub fn register_metrics() {
    crate::metric_names::register();
    let _ = handles();
}

/// The handles the request path updates, made once (no lookup by name per request).
struct Handles {
    requests: Vec<(u16, metrics::Counter)>,
    rejected: Vec<(&'static str, metrics::Counter)>,
    /// In the order of [`ROUTES`].
    seconds: Vec<metrics::Histogram>,
    items_received: metrics::Counter,
    items_accepted: metrics::Counter,
}

fn handles() -> &'static Handles {
    static HANDLES: OnceLock<Handles> = OnceLock::new();
    HANDLES.get_or_init(|| Handles {
        requests: STATUSES
            .iter()
            .map(|&code| {
                let status = status_label(code);
                (code, metrics::counter!(REQUESTS, "status" => status))
            })
            .collect(),
        rejected: REASONS
            .iter()
            .map(|&reason| (reason, metrics::counter!(REJECTED, "reason" => reason)))
            .collect(),
        seconds: ROUTES
            .iter()
            .map(|&route| metrics::histogram!(REQUEST_SECONDS, "route" => route))
            .collect(),
        items_received: metrics::counter!(ITEMS_RECEIVED),
        items_accepted: metrics::counter!(ITEMS_ACCEPTED),
    })
}

/// A refused `POST /items`: its answer, and why (one of [`REASONS`]).
struct Refusal {
    reason: &'static str,
    response: Response,
}

impl Refusal {
    /// Boxed: a response is large, and refusals are the rare path.
    fn new(reason: &'static str, response: impl IntoResponse) -> Box<Self> {
        Box::new(Refusal {
            reason,
            response: response.into_response(),
        })
    }
}

async fn post_items(State(store): State<Store>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let handles = handles();
    let response = match accept(&store, &headers, body).await {
        Ok(response) => response,
        Err(refusal) => {
            let Refusal { reason, response } = *refusal;
            if let Some((_, counter)) = handles.rejected.iter().find(|(known, _)| *known == reason)
            {
                counter.increment(1);
            }
            response
        }
    };
    let status = response.status().as_u16();
    if let Some((_, counter)) = handles.requests.iter().find(|(code, _)| *code == status) {
        counter.increment(1);
    }
    handles.seconds[0].record(started.elapsed().as_secs_f64());
    response
}

/// 200 with the count of items, or why not.
async fn accept(store: &Store, headers: &HeaderMap, body: Body) -> Result<Response, Box<Refusal>> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if !is_json_content_type(content_type) {
        return Err(Refusal::new(
            "media_type",
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Type must be application/json",
            ),
        ));
    }
    let bytes = match weir_runtime::http::read_body(headers, body, MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(err) => return Err(Refusal::new(err.reason(), err.into_api_error())),
    };
    let batch = match parse_batch(&bytes, store.options().shards) {
        Ok(batch) => batch,
        Err(Rejection::TooManyItems(n)) => {
            return Err(Refusal::new(
                "too_many_items",
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("at most {MAX_ITEMS} items per request, got {n}"),
                )
                .with_field("items"),
            ))
        }
        Err(Rejection::Invalid { error, field }) => {
            let mut error = ApiError::bad_request(error);
            error.field = field;
            return Err(Refusal::new("invalid", error));
        }
    };
    let accepted = batch.items;
    handles().items_received.increment(accepted as u64);
    match store.insert_batch(batch).await {
        Ok(()) => {
            handles().items_accepted.increment(accepted as u64);
            Ok(Json(json!({ "accepted": accepted })).into_response())
        }
        Err(err) => Err(Refusal::new("unavailable", unavailable(err))),
    }
}

fn unavailable(err: StoreError) -> Response {
    weir_runtime::warn_limited!(STORE_ERRORS, error = %escape(err.to_string().as_bytes()), "items refused");
    let mut response =
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, err.to_string()).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    if let StoreError::Damaged(damage) = &err {
        response
            .headers_mut()
            .insert(DAMAGED_HEADER, HeaderValue::from(damage.shard));
    }
    response
}

fn damaged_json(store: &Store) -> Vec<serde_json::Value> {
    store
        .damaged()
        .into_iter()
        .map(|damage| {
            json!({
                "shard": damage.shard,
                "file": damage.file,
                "offset": damage.offset,
                "error": damage.to_string(),
            })
        })
        .collect()
}

async fn healthz(State(store): State<Store>) -> Response {
    Json(json!({
        "status": "ok",
        "pid": std::process::id(),
        "damaged": damaged_json(&store),
    }))
    .into_response()
}

async fn count(
    State(store): State<Store>,
    tenant: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let started = Instant::now();
    let response = match tenant {
        Ok(Path(tenant)) => count_of(&store, &tenant).await,
        Err(rejection) => bad_tenant(&rejection),
    };
    handles().seconds[1].record(started.elapsed().as_secs_f64());
    response
}

/// A tenant the path does not hold as UTF-8 (`%FF`): the JSON error shape, like every
/// other refusal, not the router's plain text.
pub(crate) fn bad_tenant(rejection: &axum::extract::rejection::PathRejection) -> Response {
    ApiError::bad_request(format!("the tenant in the path is not valid: {rejection}"))
        .with_field("tenant")
        .into_response()
}

async fn count_of(store: &Store, tenant: &str) -> Response {
    if tenant.is_empty() || tenant.len() > MAX_FIELD_BYTES {
        return ApiError::bad_request(format!(
            "must be a non-empty tenant of at most {MAX_FIELD_BYTES} bytes"
        ))
        .with_field("tenant")
        .into_response();
    }
    match store.count(tenant).await {
        Ok(count) => Json(json!({ "count": count })).into_response(),
        Err(err) => unavailable(err),
    }
}

async fn readyz(State(store): State<Store>) -> Response {
    // Part of the data is unreadable: some counts would be refused.
    let damaged = damaged_json(&store);
    if !damaged.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "ready": false,
                "error": format!("{} shard(s) damaged", damaged.len()),
                "damaged": damaged,
            })),
        )
            .into_response();
    }
    // Any tenant's count reads a shard file: proof the store can be read.
    match store.count("readyz").await {
        Ok(_) => (StatusCode::OK, "ready").into_response(),
        Err(err) => unavailable(err),
    }
}
