//! Each worker's health check, on its own interval: `GET /healthz` with a short timeout.
//! A worker is routed to only while its last check (or request) succeeded. The answer also
//! lists the shards the worker found damaged, which `GET /` and `/readyz` show.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, Request};
use http_body_util::{BodyExt, Full};

use super::forward::HttpClient;
use super::pool::{Pool, Worker};

/// While a worker is down it is checked this often at least, so a restarted one takes
/// traffic again soon after it listens, whatever the configured interval.
const DOWN_INTERVAL: Duration = Duration::from_millis(200);

/// Checks `worker` every `interval` until its `stop` token is cancelled.
pub async fn check_loop(
    client: HttpClient,
    pool: Arc<Pool>,
    worker: Arc<Worker>,
    interval: Duration,
) {
    let timeout = interval.min(Duration::from_secs(1));
    loop {
        let verdict = check(&client, &worker, timeout).await;
        let alive = verdict.is_ok();
        if let Ok(damaged) = &verdict {
            worker.set_damaged(damaged.clone());
        }
        if worker.set_alive(alive, verdict.err()) {
            pool.publish_alive();
            if alive {
                tracing::info!(worker = %worker.name, "worker is alive");
            } else {
                tracing::warn!(worker = %worker.name, error = worker.last_error().unwrap_or_default(), "worker is down");
            }
        }
        let wait = if alive {
            interval
        } else {
            interval.min(DOWN_INTERVAL)
        };
        tokio::select! {
            _ = worker.stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn check(
    client: &HttpClient,
    worker: &Worker,
    timeout: Duration,
) -> Result<Vec<serde_json::Value>, String> {
    let request = Request::builder()
        .method(Method::GET)
        .uri(format!("http://{}/healthz", worker.authority))
        .body(Full::new(Bytes::new()))
        .map_err(|err| err.to_string())?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|err| super::forward::error_chain(&err))?;
        let status = response.status();
        // Read to the end so the connection can be reused.
        let body = response
            .into_body()
            .collect()
            .await
            .map(|body| body.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            Ok(damaged_of(&body))
        } else {
            Err(format!("GET /healthz answered {status}"))
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no health answer within {} ms",
                timeout.as_millis()
            ))
        })
}

/// The `damaged` list of a worker's health answer (none from a worker that does not say).
fn damaged_of(body: &[u8]) -> Vec<serde_json::Value> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|answer| answer.get("damaged")?.as_array().cloned())
        .unwrap_or_default()
}
