//! Sending shard groups to workers, and reading counts from them, with retries.
//!
//! A request's items are grouped by shard; the groups whose first choice is the same worker
//! go to it in one request, all workers at once. A group that fails (connection refused,
//! timeout, any non-2xx such as the 503 of a shard owned by another worker) is sent alone to
//! the next alive worker in its order, and when every one has failed, to the first again
//! after a backoff, until the deadline. Resending is always safe because a worker counts a
//! (tenant, id) once however often it receives it; so the coordinator answers 200 only when
//! every group has had a 2xx, and 503 otherwise, never a partial success.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, Method, Request};
use futures::future::join_all;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::time::Instant;

use super::metrics::FORWARD_RETRIES;
use super::pool::{Pool, Worker};
use super::routing::Backoff;
use crate::shard::Item;

/// What a 503 tells the client to wait before resending.
pub const RETRY_AFTER_SECONDS: &str = "1";

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How hard the coordinator tries.
#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions {
    /// From receiving a request to giving up on it with 503.
    pub deadline: Duration,
    /// One attempt on one worker, waiting for a permit included.
    pub attempt_timeout: Duration,
    /// Requests in flight to one worker at once.
    pub per_worker_concurrency: usize,
    /// Connecting to a worker: a dead local one refuses at once, a dead remote one may not.
    pub connect_timeout: Duration,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        ForwardOptions {
            deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(5),
            per_worker_concurrency: 64,
            connect_timeout: Duration::from_secs(1),
        }
    }
}

/// A client that keeps connections to the workers open between requests.
pub fn client(options: &ForwardOptions) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(options.connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(options.per_worker_concurrency)
        .build(connector)
}

/// Why one attempt failed.
#[derive(Debug)]
enum Failure {
    /// The worker is not there: routing skips it until a health check finds it again.
    Unreachable(String),
    /// It answered, but not 2xx (a 503 for a shard another worker holds, say).
    Answered(String),
    /// Anything else: too late, cut off.
    Failed(String),
    /// The shard is damaged: every worker reads the same files, so no other can do better,
    /// and the answer is given at once.
    Damaged(String),
}

/// One request to `worker`, bounded by `timeout` (the wait for a permit included). A 2xx
/// body is returned whole; reading it lets the connection go back to the pool.
async fn attempt(
    client: &HttpClient,
    worker: &Worker,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Bytes, Failure> {
    let exchange = async {
        let _permit = worker
            .permits
            .acquire()
            .await
            .map_err(|_| Failure::Failed("the worker's permits are closed".into()))?;
        let response = client.request(request).await.map_err(|err| {
            if err.is_connect() {
                Failure::Unreachable(error_chain(&err))
            } else {
                Failure::Failed(error_chain(&err))
            }
        })?;
        let status = response.status();
        let damaged = response
            .headers()
            .contains_key(crate::server::DAMAGED_HEADER);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| Failure::Failed(format!("reading the answer failed: {err}")))?
            .to_bytes();
        if status.is_success() {
            Ok(body)
        } else if damaged {
            // Whole (a few hundred bytes): it names the shard, the file and the offset.
            Err(Failure::Damaged(
                String::from_utf8_lossy(&body[..body.len().min(2048)]).into_owned(),
            ))
        } else {
            Err(Failure::Answered(format!(
                "answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )))
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Failure::Failed(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// An error and its causes on one line: the client's own message ("client error
/// (Connect)") says little without the cause ("Connection refused").
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[derive(Serialize)]
struct OutItem<'a> {
    id: &'a str,
    tenant: &'a str,
}

fn items_body(items: &[&Item]) -> Bytes {
    let out: Vec<OutItem> = items
        .iter()
        .map(|item| OutItem {
            id: &item.id,
            tenant: &item.tenant,
        })
        .collect();
    // Serialising borrowed strings into a Vec cannot fail.
    Bytes::from(serde_json::to_vec(&out).unwrap_or_default())
}

fn post(worker: &Worker, body: Bytes) -> Option<Request<Full<Bytes>>> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/items", worker.authority))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .ok()
}

/// Characters a path segment may hold as they are (RFC 3986 unreserved).
fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The shards that could not be placed before the deadline, with the last failure.
#[derive(Debug)]
pub struct Unplaced {
    pub shards: Vec<u16>,
    pub error: String,
}

pub struct Forwarder {
    pub client: HttpClient,
    pub pool: Arc<Pool>,
    pub options: ForwardOptions,
}

impl Forwarder {
    fn mark(&self, worker: &Worker, failure: &Failure) -> String {
        match failure {
            Failure::Unreachable(error) => {
                if worker.set_alive(false, Some(error.clone())) {
                    tracing::warn!(worker = %worker.name, %error, "worker unreachable, routing around it");
                    self.pool.publish_alive();
                }
                error.clone()
            }
            Failure::Answered(error) | Failure::Failed(error) | Failure::Damaged(error) => {
                error.clone()
            }
        }
    }

    /// Commits every group on some worker, or says which could not be placed in time.
    pub async fn post_items(&self, groups: BTreeMap<u16, Vec<Item>>) -> Result<(), Unplaced> {
        let deadline = Instant::now() + self.options.deadline;
        // First choice of each shard, groups with the same first choice in one request.
        let mut batches: Vec<(Arc<Worker>, Vec<u16>)> = Vec::new();
        let mut unrouted: Vec<u16> = Vec::new();
        for shard in groups.keys() {
            match self.pool.candidates(*shard).into_iter().next() {
                Some(worker) => match batches.iter_mut().find(|(w, _)| Arc::ptr_eq(w, &worker)) {
                    Some((_, shards)) => shards.push(*shard),
                    None => batches.push((worker, vec![*shard])),
                },
                None => unrouted.push(*shard),
            }
        }
        let first_pass = batches.into_iter().map(|(worker, shards)| {
            let groups = &groups;
            async move {
                let items: Vec<&Item> = shards.iter().flat_map(|s| &groups[s]).collect();
                let outcome = match post(&worker, items_body(&items)) {
                    Some(request) => {
                        attempt(&self.client, &worker, request, self.timeout(deadline)).await
                    }
                    None => Err(Failure::Failed("cannot build the request".into())),
                };
                match outcome {
                    Ok(_) => {
                        for shard in &shards {
                            self.pool.settle(*shard, &worker);
                        }
                        Vec::new()
                    }
                    Err(failure) => {
                        self.mark(&worker, &failure);
                        // A worker that answered refused the request whole for one of its
                        // shards (a worker commits shard by shard), so the others are
                        // tried on it again first; one that did not answer is skipped.
                        let again = shards.len() > 1
                            && matches!(failure, Failure::Answered(_) | Failure::Damaged(_));
                        let skip = (!again).then(|| worker.clone());
                        shards.into_iter().map(|s| (s, skip.clone())).collect()
                    }
                }
            }
        });
        let failed: Vec<(u16, Option<Arc<Worker>>)> =
            join_all(first_pass).await.into_iter().flatten().collect();
        metrics::counter!(FORWARD_RETRIES).increment(failed.len() as u64);
        let mut retry: Vec<(u16, Option<Arc<Worker>>)> =
            unrouted.into_iter().map(|shard| (shard, None)).collect();
        retry.extend(failed);
        if retry.is_empty() {
            return Ok(());
        }
        let retries = retry.into_iter().map(|(shard, failed)| {
            let body = items_body(&groups[&shard].iter().collect::<Vec<_>>());
            async move {
                let outcome = self
                    .place(shard, failed, deadline, true, |worker| {
                        let body = body.clone();
                        async move {
                            let request = post(&worker, body).ok_or_else(|| {
                                Failure::Failed("cannot build the request".into())
                            })?;
                            attempt(&self.client, &worker, request, self.timeout(deadline)).await
                        }
                    })
                    .await;
                outcome.map(|_| ()).map_err(|error| (shard, error))
            }
        });
        let mut unplaced = Unplaced {
            shards: Vec::new(),
            error: String::new(),
        };
        for outcome in join_all(retries).await {
            if let Err((shard, error)) = outcome {
                unplaced.shards.push(shard);
                unplaced.error = error;
            }
        }
        if unplaced.shards.is_empty() {
            Ok(())
        } else {
            Err(unplaced)
        }
    }

    /// `{"count": N}` for `tenant`, from its shard's writer or, failing that, any worker
    /// (every worker of one store can read every shard).
    pub async fn count(&self, tenant: &str, shard: u16) -> Result<Bytes, String> {
        let deadline = Instant::now() + self.options.deadline;
        let path = format!("/items/{}/count", encode_segment(tenant));
        // A read takes no lock: whoever answers is not the shard's owner for that.
        self.place(shard, None, deadline, false, |worker| {
            let path = path.clone();
            async move {
                let request = Request::builder()
                    .method(Method::GET)
                    .uri(format!("http://{}{path}", worker.authority))
                    .body(Full::new(Bytes::new()))
                    .map_err(|err| Failure::Failed(format!("cannot build the request: {err}")))?;
                attempt(&self.client, &worker, request, self.timeout(deadline)).await
            }
        })
        .await
    }

    fn timeout(&self, deadline: Instant) -> Duration {
        self.options
            .attempt_timeout
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1))
    }

    /// Tries `send` on `shard`'s candidates in order, skipping those that already failed
    /// this round (`failed` did before the first), then starts a new round after a backoff,
    /// until one succeeds or the deadline passes. A write that succeeds (`settles`) makes
    /// its worker the shard's known owner.
    async fn place<F, Fut>(
        &self,
        shard: u16,
        failed: Option<Arc<Worker>>,
        deadline: Instant,
        settles: bool,
        send: F,
    ) -> Result<Bytes, String>
    where
        F: Fn(Arc<Worker>) -> Fut,
        Fut: std::future::Future<Output = Result<Bytes, Failure>>,
    {
        let mut tried: Vec<Arc<Worker>> = failed.into_iter().collect();
        let mut backoff = Backoff::new(Duration::from_millis(25), Duration::from_millis(500));
        let mut last_error = String::from("no worker is alive");
        let mut attempts = 0u64;
        loop {
            let next = self
                .pool
                .candidates(shard)
                .into_iter()
                .find(|w| !tried.iter().any(|t| Arc::ptr_eq(t, w)));
            match next {
                Some(worker) => {
                    // The first attempt here is counted by the caller if it is a resend.
                    if attempts > 0 {
                        metrics::counter!(FORWARD_RETRIES).increment(1);
                    }
                    attempts += 1;
                    match send(worker.clone()).await {
                        Ok(body) => {
                            if settles {
                                self.pool.settle(shard, &worker);
                            }
                            return Ok(body);
                        }
                        Err(failure) => {
                            let error = self.mark(&worker, &failure);
                            last_error = format!("{}: {error}", worker.name);
                            if matches!(failure, Failure::Damaged(_)) {
                                return Err(last_error);
                            }
                            tried.push(worker);
                        }
                    }
                }
                None => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(last_error);
                    }
                    tokio::time::sleep(backoff.next_delay().min(left)).await;
                    tried.clear();
                }
            }
            if Instant::now() >= deadline {
                return Err(last_error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode_segment("tenant-1_a.b~"), "tenant-1_a.b~");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    #[test]
    fn bodies_are_the_worker_format() {
        let item = Item {
            tenant: "t\"1".into(),
            id: "x".into(),
        };
        let body = items_body(&[&item]);
        let parsed = crate::validate::parse_items(&body).unwrap();
        assert_eq!(parsed, vec![item]);
    }
}
