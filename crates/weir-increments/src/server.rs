//! The HTTP API (axum): validation, auth, rate limiting, and the 202 that waits for the
//! queue to hold the increment durably.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use serde_json::json;
use subtle::ConstantTimeEq;
use weir_runtime::http::ApiError;

use crate::config::IncrementsConfig;
use crate::health::{flush_status, is_ready, WorkerHealth};
use crate::idempotency::{decide, fingerprint, parse_key, scoped, BadKey, Decision, InFlight};
use crate::keyed_writer::KeyedWriter;
use crate::metric_names::{
    IDEMPOTENCY_CONFLICTS, IDEMPOTENT_REPLAYS, LAST_COMMIT_TIMESTAMP, QUEUE_DEPTH, REJECTED,
    REJECT_REASONS, REQUESTS, REQUEST_DURATION, REQUEST_STATUSES,
};
use crate::proxy::{client_address, Cidr};
use crate::queue::embedded::now_ms;
use crate::queue::{Producer, QueueError};
use crate::store::KeyedIncrement;
use crate::store::Store;
use crate::validate::{is_json_content_type, parse_increment, parse_key_text, Increment};

pub const BODY_LIMIT: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LimitKey {
    ApiKey(Arc<str>),
    Address(IpAddr),
}

/// What every handler shares. Cloned per request by axum's `State`, so it is one `Arc`.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub producer: Producer,
    pub store: Option<Store>,
    pub worker: Option<Arc<WorkerHealth>>,
    api_keys: Arc<Vec<Arc<str>>>,
    limiter: Option<Arc<DefaultKeyedRateLimiter<LimitKey>>>,
    max_queue_depth: u64,
    max_staleness_ms: u64,
    trusted_proxies: Arc<[Cidr]>,
    in_flight: InFlight,
    /// The embedded mode's writer of keyed requests (Redis keeps keys beside the stream).
    keyed: Option<KeyedWriter>,
    idempotency_retention: Duration,
}

impl AppState {
    pub fn new(
        config: &IncrementsConfig,
        producer: Producer,
        store: Option<Store>,
        worker: Option<Arc<WorkerHealth>>,
    ) -> Self {
        // Said at every start: whether a request needs a key should never be a surprise.
        match config.api_keys.len() {
            0 => tracing::info!(
                "authentication is off: WEIR_INCREMENTS_API_KEYS (--api-keys) is not set"
            ),
            keys => tracing::info!(keys, "authentication is on: a bearer API key is required"),
        }
        let limiter = config.rate_limit_per_second.and_then(|rate| {
            let rate = std::num::NonZeroU32::new(rate)?;
            let burst = config
                .rate_limit_burst
                .and_then(std::num::NonZeroU32::new)
                .unwrap_or(rate);
            Some(Arc::new(DefaultKeyedRateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            )))
        });
        let keyed = match (&producer, &store) {
            (Producer::Embedded(_), Some(store)) => Some(KeyedWriter::start(store.clone())),
            _ => None,
        };
        AppState(Arc::new(Shared {
            store,
            worker,
            api_keys: Arc::new(
                config
                    .api_keys
                    .iter()
                    .map(|k| Arc::from(k.as_str()))
                    .collect(),
            ),
            limiter,
            max_queue_depth: config.max_queue_depth,
            max_staleness_ms: config.max_staleness_ms,
            trusted_proxies: config.trusted_proxies.iter().copied().collect(),
            in_flight: InFlight::default(),
            keyed,
            idempotency_retention: config.idempotency_retention(),
            producer,
        }))
    }
}

pub fn router(state: AppState) -> Router {
    if let Some(limiter) = state.limiter.clone() {
        // Forget idle clients now and then so the limiter's memory stays bounded.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                if Arc::strong_count(&limiter) == 1 {
                    return;
                }
                limiter.retain_recent();
            }
        });
    }
    spawn_observer(&state);
    let mut guarded = Router::new()
        .route("/increment", post(increment))
        .route("/counts/{key}", get(count));
    // Without auth or a limit the guard has nothing to do; leaving it out saves a boxed
    // middleware per request on the hot path.
    if !state.api_keys.is_empty() || state.limiter.is_some() {
        guarded = guarded.route_layer(middleware::from_fn_with_state(state.clone(), guard));
    }
    Router::new()
        .merge(guarded)
        .route(
            "/healthz",
            get(|| async { Json(json!({"status": "alive"})) }),
        )
        .route("/readyz", get(readyz))
        .route(
            "/openapi.json",
            get(|| async { Json(crate::openapi::document()) }),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .with_state(state)
        .merge(weir_runtime::http::metrics_router())
        .layer(middleware::map_response(json_errors))
}

/// Gives every error the API's JSON body, including the ones axum writes itself (405 for
/// a wrong method, a path it cannot decode, ...), which come as plain text or empty.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| is_json_content_type(Some(value)));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let message = match std::str::from_utf8(&text).map(str::trim) {
        Ok(text) if !text.is_empty() => text.to_string(),
        _ => status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_lowercase(),
    };
    let mut json = ApiError::new(status, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            json.headers_mut().insert(name.clone(), value.clone());
        }
    }
    json
}

/// Counts one `POST /increment` answer by status. Handles of the usual statuses are
/// registered once, so the hot path does no label hashing or allocation.
fn count_status(status: StatusCode) {
    static COUNTERS: OnceLock<Vec<(u16, metrics::Counter)>> = OnceLock::new();
    let counters = COUNTERS.get_or_init(|| {
        REQUEST_STATUSES
            .iter()
            .filter_map(|&label| {
                let code = label.parse().ok()?;
                Some((code, metrics::counter!(REQUESTS, "status" => label)))
            })
            .collect()
    });
    match counters.iter().find(|(code, _)| *code == status.as_u16()) {
        Some((_, counter)) => counter.increment(1),
        None => metrics::counter!(REQUESTS, "status" => status.as_str().to_owned()).increment(1),
    }
}

/// A refused `POST /increment`: its answer, and why (one of [`REJECT_REASONS`]).
struct Refusal {
    reason: &'static str,
    response: Response,
}

impl Refusal {
    /// Boxed: a response is large, and refusals are the rare path.
    fn new(reason: &'static str, response: impl IntoResponse) -> Box<Self> {
        debug_assert!(REJECT_REASONS.contains(&reason), "{reason}");
        Box::new(Refusal {
            reason,
            response: response.into_response(),
        })
    }
}

/// Counts one refused `POST /increment` by reason, through handles made once.
fn count_rejected(reason: &'static str) {
    static COUNTERS: OnceLock<Vec<(&'static str, metrics::Counter)>> = OnceLock::new();
    let counters = COUNTERS.get_or_init(|| {
        REJECT_REASONS
            .iter()
            .map(|&reason| (reason, metrics::counter!(REJECTED, "reason" => reason)))
            .collect()
    });
    match counters.iter().find(|(known, _)| *known == reason) {
        Some((_, counter)) => counter.increment(1),
        None => metrics::counter!(REJECTED, "reason" => reason).increment(1),
    }
}

/// Counts one `POST /increment` answer (by status, by reason if refused) and its duration.
fn answered(answer: Result<Response, Box<Refusal>>, started: Instant) -> Response {
    static DURATION: OnceLock<metrics::Histogram> = OnceLock::new();
    let response = match answer {
        Ok(response) => response,
        Err(refusal) => {
            let Refusal { reason, response } = *refusal;
            count_rejected(reason);
            response
        }
    };
    count_status(response.status());
    DURATION
        .get_or_init(|| metrics::histogram!(REQUEST_DURATION))
        .record(started.elapsed().as_secs_f64());
    response
}

/// Auth, then rate limiting (per API key when auth is on, else per client address).
async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let is_increment = request.uri().path() == "/increment";
    let started = Instant::now();
    match check(&state, &request) {
        Some(refusal) if is_increment => answered(Err(refusal), started),
        Some(refusal) => refusal.response,
        None => next.run(request).await,
    }
}

fn check(state: &AppState, request: &Request) -> Option<Box<Refusal>> {
    let mut limit_key = None;
    if !state.api_keys.is_empty() {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token);
        let Some(presented) = presented else {
            return Some(unauthorized(
                "missing bearer API key (Authorization: Bearer <key>)",
            ));
        };
        // Every configured key is compared, in constant time, so timing reveals neither
        // which key matched nor how much of a guess was right.
        let mut matched: Option<&Arc<str>> = None;
        for key in state.api_keys.iter() {
            if bool::from(key.as_bytes().ct_eq(presented.as_bytes())) {
                matched = Some(key);
            }
        }
        let Some(matched) = matched else {
            return Some(unauthorized("unknown API key"));
        };
        limit_key = Some(LimitKey::ApiKey(matched.clone()));
    }
    if let Some(limiter) = &state.limiter {
        let key = limit_key
            .unwrap_or_else(|| LimitKey::Address(crate::proxy::bucket(client_of(state, request))));
        if let Err(not_until) = limiter.check_key(&key) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut response = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("rate limit exceeded; retry in {seconds} s"),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            return Some(Refusal::new("rate_limited", response));
        }
    }
    None
}

/// The token of an `Authorization: Bearer <token>` header. The scheme name is
/// case-insensitive (RFC 7235), so `bearer` and `BEARER` work too.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The address a request is rate-limited by: the peer, or behind trusted proxies the
/// client they name in `X-Forwarded-For`.
fn client_of(state: &AppState, request: &Request) -> IpAddr {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |info| info.0.ip());
    if state.trusted_proxies.is_empty() {
        return peer;
    }
    let forwarded = request
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        // A value that is not text cannot name an address; as "" it ends the walk there.
        .map(|value| value.to_str().unwrap_or(""));
    client_address(&state.trusted_proxies, peer, forwarded)
}

fn unauthorized(message: &str) -> Box<Refusal> {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Refusal::new("unauthorized", response)
}

async fn increment(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    answered(accept(&state, &headers, body).await, started)
}

/// 202, or why not.
async fn accept(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Box<Refusal>> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if !is_json_content_type(content_type) {
        return Err(Refusal::new(
            "unsupported_media_type",
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Type must be application/json",
            ),
        ));
    }
    let bytes = match weir_runtime::http::read_body(headers, body, BODY_LIMIT).await {
        Ok(bytes) => bytes,
        Err(err) => return Err(Refusal::new(err.reason(), err.into_api_error())),
    };
    let increment = match parse_increment(&bytes) {
        Ok(increment) => increment,
        Err(rejection) => {
            let mut error = ApiError::bad_request(rejection.error);
            error.field = rejection.field.map(str::to_string);
            return Err(Refusal::new(rejection.reason, error));
        }
    };
    // A keyed request of the embedded mode goes straight to the store, not into the log.
    let queued =
        !(headers.contains_key(IDEMPOTENCY_KEY) && matches!(state.producer, Producer::Embedded(_)));
    if let Some(depth) = state.producer.depth().filter(|_| queued) {
        if depth >= state.max_queue_depth {
            return Err(unavailable(QueueError::Full(depth)));
        }
    }
    if let Some(raw) = headers.get(IDEMPOTENCY_KEY) {
        return accept_keyed(state, headers, raw.as_bytes(), increment).await;
    }
    match state.producer.enqueue(increment).await {
        Ok(()) => Ok(StatusCode::ACCEPTED.into_response()),
        Err(err) => Err(unavailable(err)),
    }
}

const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A request with an `Idempotency-Key`: its key and increment become durable together, or
/// the key is found and the request answered as a repeat (see [`crate::idempotency`]).
async fn accept_keyed(
    state: &AppState,
    headers: &HeaderMap,
    raw: &[u8],
    increment: Increment,
) -> Result<Response, Box<Refusal>> {
    let key = match parse_key(raw) {
        Ok(key) => key,
        Err(BadKey(message)) => {
            return Err(Refusal::new(
                "invalid_idempotency_key",
                ApiError::bad_request(message).with_field("Idempotency-Key"),
            ))
        }
    };
    // The guard has checked the key already; here it only scopes the idempotency key.
    let api_key = (!state.api_keys.is_empty())
        .then(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(bearer_token)
        })
        .flatten();
    let key = scoped(&key, api_key);
    let fingerprint = fingerprint(&increment);
    let _claim = match state.in_flight.begin(&key, &fingerprint) {
        Ok(claim) => claim,
        Err(decision) => return answer_keyed(decision),
    };
    let recorded = match (&state.producer, &state.keyed) {
        (Producer::Redis(producer), _) => producer
            .enqueue_keyed(&key, &fingerprint, increment, state.idempotency_retention)
            .await
            .map_err(|err| err.to_string()),
        (Producer::Embedded(_), Some(writer)) => writer
            .apply(KeyedIncrement {
                key,
                fingerprint: fingerprint.clone(),
                increment,
            })
            .await
            .map_err(|err| err.to_string()),
        (Producer::Embedded(_), None) => Err("this process has no store for keys".to_string()),
    };
    match recorded {
        Ok(recorded) => answer_keyed(decide(&recorded, &fingerprint)),
        Err(err) => {
            weir_runtime::warn_limited!(REFUSED_LOG, %err, "keyed increment refused");
            let mut response = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot record the increment: {err}"),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Err(Refusal::new("unavailable", response))
        }
    }
}

fn answer_keyed(decision: Decision) -> Result<Response, Box<Refusal>> {
    match decision {
        Decision::Accepted => Ok(StatusCode::ACCEPTED.into_response()),
        Decision::Replayed => {
            metrics::counter!(IDEMPOTENT_REPLAYS).increment(1);
            let mut response = StatusCode::ACCEPTED.into_response();
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(response)
        }
        Decision::InFlight => {
            metrics::counter!(IDEMPOTENCY_CONFLICTS, "reason" => "in_flight").increment(1);
            let mut response = ApiError::new(
                StatusCode::CONFLICT,
                "a request with this Idempotency-Key is still being processed; retry it",
            )
            .with_field("Idempotency-Key")
            .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Err(Refusal::new("in_flight", response))
        }
        Decision::Mismatch => {
            metrics::counter!(IDEMPOTENCY_CONFLICTS, "reason" => "mismatch").increment(1);
            Err(Refusal::new(
                "mismatch",
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "this Idempotency-Key was used for a different request",
                )
                .with_field("Idempotency-Key"),
            ))
        }
    }
}

static REFUSED_LOG: weir_runtime::logs::LogLimiter = weir_runtime::logs::LogLimiter::per_second();

fn unavailable(err: QueueError) -> Box<Refusal> {
    // Once per request while the queue is down or full: a sample is enough, the status
    // counter has the count.
    weir_runtime::warn_limited!(REFUSED_LOG, %err, "increment refused");
    let reason = match err {
        QueueError::Full(_) => "queue_full",
        _ => "unavailable",
    };
    let mut response = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("cannot queue the increment: {err}"),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    Refusal::new(reason, response)
}

async fn count(State(state): State<AppState>, Path(key): Path<String>) -> Response {
    // Exactly the forms POST accepts, so one key is never spelled two ways.
    let key = match parse_key_text(&key) {
        Ok(key) => key,
        Err(rejection) => {
            return ApiError::bad_request(rejection.error)
                .with_field("key")
                .into_response()
        }
    };
    let Some(store) = &state.store else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this process has no database configured",
        )
        .into_response();
    };
    let last_flush = last_commit_ms(state.worker.as_deref(), Some(store)).await;
    match store.count(key).await {
        Ok(count) => Json(json!({
            "key": key,
            "total": count.map_or(0, |c| c.total),
            "updatedAtMs": count.map(|c| c.updated_ms),
            "lastFlushAtMs": last_flush,
        }))
        .into_response(),
        Err(err) => {
            // A read gives up after its statement timeout (a locked table, an outage): tell
            // the client when to come back instead of holding its connection.
            let mut response =
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("database: {err}"))
                    .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            response
        }
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    readiness(
        Some(&state.producer),
        state.store.as_ref(),
        state.worker.as_deref(),
        state.max_queue_depth,
        state.max_staleness_ms,
    )
    .await
}

/// When totals were last committed: this process's own flushes when it has a worker, else
/// (an `api` process) what the workers recorded in the database.
async fn last_commit_ms(worker: Option<&WorkerHealth>, store: Option<&Store>) -> Option<i64> {
    if let Some(worker) = worker {
        let ms = worker.last_flush_ms.load(Ordering::Relaxed);
        return (ms > 0).then_some(ms as i64);
    }
    let store = store?;
    match tokio::time::timeout(Duration::from_secs(1), store.last_commit_ms()).await {
        Ok(Ok(ms)) => ms,
        _ => None,
    }
}

/// The queue's backlog (the embedded log's unflushed records, or the Redis group's lag plus
/// pending entries) and the last commit time, also set as gauges.
async fn observe(
    producer: &Producer,
    store: Option<&Store>,
    worker: Option<&WorkerHealth>,
) -> (Option<u64>, Option<i64>) {
    let depth = match producer {
        Producer::Embedded(producer) => Some(producer.depth()),
        Producer::Redis(producer) => {
            match tokio::time::timeout(Duration::from_secs(1), producer.backlog()).await {
                Ok(Ok(depth)) => depth,
                _ => None,
            }
        }
    };
    if let Some(depth) = depth {
        metrics::gauge!(QUEUE_DEPTH).set(depth as f64);
    }
    let last_commit = last_commit_ms(worker, store).await;
    if let Some(ms) = last_commit {
        metrics::gauge!(LAST_COMMIT_TIMESTAMP).set(ms as f64 / 1000.0);
    }
    (depth, last_commit)
}

/// Keeps the backlog and last-commit gauges of an `api` process current between probes:
/// nothing else in such a process would move them.
fn spawn_observer(state: &AppState) {
    if state.worker.is_some() {
        return;
    }
    // Ends once the router (every clone of the state) is gone.
    let serving = state.in_flight.liveness();
    let (producer, store) = (state.producer.clone(), state.store.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            if !serving.is_alive() {
                return;
            }
            observe(&producer, store.as_ref(), None).await;
        }
    });
}

/// `/healthz`, `/readyz` and `/metrics` for a worker-only process: ready while it can flush.
pub fn worker_router(store: Store, worker: Arc<WorkerHealth>, config: &IncrementsConfig) -> Router {
    let max_staleness_ms = config.max_staleness_ms;
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({"status": "alive"})) }),
        )
        .route(
            "/readyz",
            get(move || async move {
                readiness(None, Some(&store), Some(&worker), 0, max_staleness_ms).await
            }),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .merge(weir_runtime::http::metrics_router())
}

/// Ready means "can take work" (see [`crate::health`]); the body also reports the
/// database and the flushes, which do not decide it.
async fn readiness(
    producer: Option<&Producer>,
    store: Option<&Store>,
    worker: Option<&WorkerHealth>,
    max_queue_depth: u64,
    max_staleness_ms: u64,
) -> Response {
    let budget = Duration::from_secs(1);
    let queue = match producer {
        None => None,
        Some(producer) => Some(match tokio::time::timeout(budget, producer.check()).await {
            Ok(Ok(())) => match producer.depth() {
                Some(depth) if depth >= max_queue_depth => {
                    format!("full ({depth} waiting, maxQueueDepth {max_queue_depth})")
                }
                _ => "ok".to_string(),
            },
            Ok(Err(err)) => err.to_string(),
            Err(_) => "timed out".to_string(),
        }),
    };
    let database = match store {
        None => "not used by this process".to_string(),
        Some(store) => match tokio::time::timeout(budget, store.ping()).await {
            Ok(Ok(())) => "ok".to_string(),
            Ok(Err(err)) => err.to_string(),
            Err(_) => "timed out".to_string(),
        },
    };
    let flush = worker.map(|worker| flush_status(&worker.snapshot(), now_ms(), max_staleness_ms));
    let ready = is_ready(queue.as_ref().map(|queue| queue == "ok"), flush.as_ref());
    let (depth, last_commit) = match producer {
        Some(producer) => observe(producer, store, worker).await,
        None => (None, last_commit_ms(worker, store).await),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "queue": queue.unwrap_or_else(|| "not used by this process".to_string()),
        "queueDepth": depth,
        "database": database,
        "lastCommitAtMs": last_commit,
        "flush": flush,
    });
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for header in [
            "Bearer k1",
            "bearer k1",
            "BEARER k1",
            "BeArEr   k1  ",
            "Bearer\tk1",
        ] {
            assert_eq!(bearer_token(header), Some("k1"), "{header:?}");
        }
        for header in ["Basic k1", "Bearer", "Bearer ", "Bearerk1", "Token k1"] {
            assert_eq!(bearer_token(header), None, "{header:?}");
        }
    }
}
