//! `weir increments bench`: N keep-alive HTTP/1 connections (hyper) POSTing increments for
//! a fixed time, reporting requests/s and latency percentiles, then (with `--verify`)
//! waiting until every key's persisted total equals what was answered 202. `--bare ADDR`
//! instead serves a handler that only answers 202: the ceiling for the same load.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, Request, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchFlags {
    /// Target base URL.
    #[arg(long, default_value = "http://127.0.0.1:3333")]
    pub url: String,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Distinct keys (fresh UUIDs per run).
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// Bearer API key to send.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Send a fresh `Idempotency-Key` with every request (to measure what keys cost).
    #[arg(long)]
    pub idempotency_keys: bool,
    /// After the load, wait until every persisted total equals the acknowledged sum.
    #[arg(long)]
    pub verify: bool,
    /// Serve a bare 202 handler on this address (until Ctrl-C) instead of generating load.
    #[arg(long, value_name = "ADDR")]
    pub bare: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid --url {0}: expected http://host:port")]
    Url(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("building a request: {0}")]
    Request(#[from] axum::http::Error),
}

#[derive(Default)]
struct ConnStats {
    latencies_us: Vec<u32>,
    statuses: HashMap<u16, u64>,
    errors: u64,
    acknowledged: HashMap<usize, i64>,
}

impl ConnStats {
    fn merge(&mut self, other: ConnStats) {
        self.latencies_us.extend(other.latencies_us);
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.errors += other.errors;
        for (key, sum) in other.acknowledged {
            *self.acknowledged.entry(key).or_default() += sum;
        }
    }

    /// The latency (ms) under which a share `p` of the requests were answered.
    fn percentile_ms(&self, p: f64) -> f64 {
        let count = self.latencies_us.len();
        if count == 0 {
            return 0.0;
        }
        let index = ((count as f64 * p).ceil() as usize).clamp(1, count) - 1;
        f64::from(self.latencies_us[index]) / 1000.0
    }
}

pub async fn run(flags: BenchFlags, token: CancellationToken) -> Result<bool, BenchError> {
    if let Some(addr) = flags.bare {
        return serve_bare(addr, token).await.map(|()| true);
    }
    let authority = flags
        .url
        .strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/').to_string())
        .ok_or_else(|| BenchError::Url(flags.url.clone()))?;
    let keys: Arc<Vec<String>> = Arc::new(
        (0..flags.keys.max(1))
            .map(|_| Uuid::new_v4().to_string())
            .collect(),
    );
    let started = Instant::now();
    let mut total = generate(&flags, &authority, &keys, token).await;
    let elapsed = started
        .elapsed()
        .min(Duration::from_secs(flags.duration_secs.max(1)));
    total.latencies_us.sort_unstable();
    let count = total.latencies_us.len();
    let accepted = total.statuses.get(&202).copied().unwrap_or(0);
    let rps = count as f64 / elapsed.as_secs_f64();
    println!(
        "{count} requests in {:.1}s over {} connections: {rps:.0} req/s, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        elapsed.as_secs_f64(),
        flags.connections,
        total.percentile_ms(0.5),
        total.percentile_ms(0.99),
        total.percentile_ms(1.0)
    );
    let mut statuses: Vec<_> = total.statuses.iter().collect();
    statuses.sort();
    println!(
        "statuses: {statuses:?}; connection errors: {}",
        total.errors
    );
    let mut passed = total.errors == 0 && accepted as usize == count;
    if flags.verify {
        passed &= verify(
            &authority,
            &keys,
            &total.acknowledged,
            flags.api_key.as_deref(),
        )
        .await;
    }
    let staleness = scrape(&authority, "weir_increments_staleness_max_seconds").await;
    if let Some(staleness) = &staleness {
        println!("largest staleness the service measured: {staleness} s");
    }
    println!(
        "{}",
        serde_json::json!({
            "requests": count, "rps": rps.round(), "p50_ms": total.percentile_ms(0.5),
            "p99_ms": total.percentile_ms(0.99), "max_ms": total.percentile_ms(1.0),
            "accepted": accepted, "errors": total.errors, "passed": passed,
            "max_staleness_s": staleness.and_then(|s| s.parse::<f64>().ok()),
        })
    );
    Ok(passed)
}

/// Runs the load on every connection until the duration is over; their stats summed.
async fn generate(
    flags: &BenchFlags,
    authority: &str,
    keys: &Arc<Vec<String>>,
    token: CancellationToken,
) -> ConnStats {
    let until = Instant::now() + Duration::from_secs(flags.duration_secs);
    let mut tasks = Vec::new();
    for conn in 0..flags.connections.max(1) {
        let authority = authority.to_string();
        let keys = keys.clone();
        let api_key = flags.api_key.clone();
        let token = token.clone();
        let keyed = flags.idempotency_keys;
        tasks.push(tokio::spawn(async move {
            load(
                conn,
                &authority,
                &keys,
                api_key.as_deref(),
                keyed,
                until,
                token,
            )
            .await
        }));
    }
    let mut total = ConnStats::default();
    for task in tasks {
        match task.await {
            Ok(Ok(stats)) => total.merge(stats),
            Ok(Err(err)) => {
                eprintln!("a connection failed: {err}");
                total.errors += 1;
            }
            Err(err) => eprintln!("a load task panicked: {err}"),
        }
    }
    total
}

async fn load(
    conn: usize,
    authority: &str,
    keys: &[String],
    api_key: Option<&str>,
    keyed: bool,
    until: Instant,
    token: CancellationToken,
) -> Result<ConnStats, BenchError> {
    // Unique per run, so keys of an earlier run are never replayed.
    let run = Uuid::new_v4().simple();
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|err| BenchError::Connect(authority.to_string(), err))?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut stats = ConnStats::default();
    let mut n = conn;
    while Instant::now() < until && !token.is_cancelled() {
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let key_index = (n >> 17) % keys.len();
        let value = 1 + (n >> 40) as i64 % 5;
        let body = format!(r#"{{"key":"{}","value":{value}}}"#, keys[key_index]);
        let mut request = Request::post("/increment")
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = api_key {
            request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        if keyed {
            request = request.header("idempotency-key", format!("bench-{run}-{conn}-{n:x}"));
        }
        let request = request.body(Full::new(Bytes::from(body)))?;
        let sent = Instant::now();
        match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                let _ = response.into_body().collect().await;
                stats
                    .latencies_us
                    .push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                *stats.statuses.entry(status).or_default() += 1;
                if status == 202 {
                    *stats.acknowledged.entry(key_index).or_default() += value;
                }
            }
            Err(err) => {
                stats.errors += 1;
                eprintln!("connection {conn}: {err}");
                break;
            }
        }
    }
    Ok(stats)
}

/// One GET on a fresh connection; the body if the status is 200.
async fn get(authority: &str, path: &str, api_key: Option<&str>) -> Option<String> {
    let stream = TcpStream::connect(authority).await.ok()?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    let mut request = Request::get(path).header(header::HOST, authority);
    if let Some(key) = api_key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::new())).ok()?)
        .await
        .ok()?;
    if response.status() != StatusCode::OK {
        return None;
    }
    let body = response.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8(body.to_vec()).ok()
}

async fn scrape(authority: &str, metric: &str) -> Option<String> {
    let text = get(authority, "/metrics", None).await?;
    text.lines()
        .find(|line| line.starts_with(metric))
        .and_then(|line| line.split_whitespace().last())
        .map(str::to_string)
}

async fn verify(
    authority: &str,
    keys: &[String],
    acknowledged: &HashMap<usize, i64>,
    api_key: Option<&str>,
) -> bool {
    let started = Instant::now();
    let mut remaining: Vec<(usize, i64)> = acknowledged.iter().map(|(k, v)| (*k, *v)).collect();
    while !remaining.is_empty() && started.elapsed() < Duration::from_secs(30) {
        let mut still = Vec::new();
        for (index, expected) in remaining {
            let body = get(authority, &format!("/counts/{}", keys[index]), api_key).await;
            let total = body
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .and_then(|json| json["total"].as_i64());
            if total != Some(expected) {
                still.push((index, expected));
            }
        }
        remaining = still;
        if !remaining.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if remaining.is_empty() {
        println!(
            "verified: all {} keys persisted exactly their acknowledged sums ({:.1}s after the load)",
            acknowledged.len(),
            started.elapsed().as_secs_f64()
        );
        true
    } else {
        println!(
            "VERIFY FAILED: {} keys differ from their acknowledged sums",
            remaining.len()
        );
        false
    }
}

async fn serve_bare(addr: SocketAddr, token: CancellationToken) -> Result<(), BenchError> {
    let listener = weir_runtime::http::bind(addr)?;
    println!(
        "bare 202 handler on http://{}/increment",
        listener.local_addr()?
    );
    let router = axum::Router::new().route("/increment", post(|| async { StatusCode::ACCEPTED }));
    let limits = weir_runtime::http::ListenerLimits::default();
    weir_runtime::http::serve(listener, router, limits, token).await?;
    Ok(())
}
