//! Crash tests of the real binary: `kill -9` in the middle of a load, restart, and compare
//! the persisted totals with exactly what was answered 202.
//!
//! Each client owns one key and has at most one request in flight, so the only requests
//! whose fate a client cannot know are the ones in flight at the instant of a kill: the
//! persisted total of a key must equal its acknowledged sum, plus at most those.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use uuid::Uuid;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

struct Proc {
    child: Child,
    addr: Option<SocketAddr>,
}

async fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut command = Command::new(WEIR);
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("WEIR_INCREMENTS_API_KEYS")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn weir");
    let mut addr = None;
    if args.contains(&"--port") {
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the server announced itself")
            .expect("read stdout")
            .expect("a line");
        let url = line.split("http://").nth(1).expect("an URL");
        addr = Some(url.split('/').next().unwrap().parse().expect("an address"));
    }
    Proc { child, addr }
}

impl Proc {
    async fn kill9(&mut self) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: plain kill(2) on a child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let _ = self.child.wait().await;
    }
}

/// One POST; Some(status) or None if the connection failed (server down or killed).
async fn post(addr: SocketAddr, key: &str, value: i64) -> Option<u16> {
    post_with(addr, key, value, "").await
}

/// One POST carrying `extra_headers` (each ending in CRLF).
async fn post_with(addr: SocketAddr, key: &str, value: i64, extra_headers: &str) -> Option<u16> {
    let body = format!(r#"{{"key":"{key}","value":{value}}}"#);
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let head = format!(
        "POST /increment HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw);
    text.split(' ').nth(1)?.parse().ok()
}

async fn get_total(addr: SocketAddr, key: &str) -> Option<i64> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let head = format!("GET /counts/{key} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw);
    let body = text.split("\r\n\r\n").nth(1)?;
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    json["total"].as_i64()
}

#[derive(Default, Debug, Clone)]
struct Tally {
    acknowledged: i64,
    /// Values of requests in flight when the server died: persisted or not, nobody knows.
    unknown: Vec<i64>,
    requests: u64,
}

/// A client hammering one key against whatever address `target` holds, until `stop`.
fn client(
    target: Arc<std::sync::Mutex<SocketAddr>>,
    key: String,
    stop: Arc<AtomicBool>,
    seed: i64,
) -> tokio::task::JoinHandle<Tally> {
    tokio::spawn(async move {
        let mut tally = Tally::default();
        let mut n = seed;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let value = 1 + n % 7;
            let addr = *target.lock().unwrap();
            match post(addr, &key, value).await {
                Some(202) => tally.acknowledged += value,
                Some(status) => panic!("unexpected status {status}"),
                None => {
                    tally.unknown.push(value);
                    // Wait for the restart instead of spinning.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            tally.requests += 1;
        }
        tally
    })
}

async fn settle(addr: SocketAddr, key: &str, tally: &Tally) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let total = get_total(addr, key).await.unwrap_or(-1);
        // Every subset of the unknown values is a legitimate outcome; wait for one.
        let extra = total - tally.acknowledged;
        if extra >= 0 && subset_sums_to(&tally.unknown, extra) {
            return total;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "key {key}: persisted {total}, acknowledged {}, unknown {:?}",
            tally.acknowledged,
            tally.unknown
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn subset_sums_to(values: &[i64], target: i64) -> bool {
    let target = target as usize;
    let mut reachable = vec![false; target + 1];
    reachable[0] = true;
    for &v in values {
        for t in (v as usize..=target).rev() {
            reachable[t] |= reachable[t - v as usize];
        }
    }
    reachable[target]
}

/// A client that retries each request with its Idempotency-Key until it is answered 202,
/// whatever happens to the server: its key's total must then be exactly what it sent.
fn keyed_client(
    target: Arc<std::sync::Mutex<SocketAddr>>,
    key: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(i64, u64)> {
    tokio::spawn(async move {
        let (mut sent, mut retries) = (0, 0);
        let mut n = 0i64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let value = 1 + n % 7;
            let header = format!("Idempotency-Key: {key}-{n}\r\n");
            loop {
                let addr = *target.lock().unwrap();
                match post_with(addr, &key, value, &header).await {
                    Some(202) => break,
                    // Down, or the first attempt still in flight: the same request again.
                    None | Some(409) | Some(503) => {
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Some(status) => panic!("unexpected status {status}"),
                }
            }
            sent += value;
        }
        (sent, retries)
    })
}

/// While clients load the server: three times, wait `every`, `kill -9` it, restart it on the
/// same arguments and point the clients at the new one. Returns the last server.
async fn kill_9_three_times(
    args: &[&str],
    mut server: Proc,
    target: &std::sync::Mutex<SocketAddr>,
    every: Duration,
) -> Proc {
    for _round in 0..3 {
        tokio::time::sleep(every).await;
        server.kill9().await;
        server = spawn(args, &[]).await;
        *target.lock().unwrap() = server.addr.unwrap();
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_retries_through_kill_9_count_every_request_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let args = [
        "increments",
        "serve",
        "--bind-address",
        "127.0.0.1",
        "--port",
        "0",
        "--data-dir",
        &data,
    ];
    let server = spawn(&args, &[]).await;
    let target = Arc::new(std::sync::Mutex::new(server.addr.unwrap()));
    let stop = Arc::new(AtomicBool::new(false));
    let keys: Vec<String> = (0..8).map(|_| Uuid::new_v4().to_string()).collect();
    let clients: Vec<_> = keys
        .iter()
        .map(|key| keyed_client(target.clone(), key.clone(), stop.clone()))
        .collect();
    let mut server = kill_9_three_times(&args, server, &target, Duration::from_millis(500)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total_retries = 0;
    for (key, handle) in keys.iter().zip(clients) {
        let (sent, retries) = handle.await.unwrap();
        total_retries += retries;
        let exact = Tally {
            acknowledged: sent,
            ..Tally::default()
        };
        settle(server.addr.unwrap(), key, &exact).await;
    }
    eprintln!("keyed: 3 kills, {total_retries} retries; every total is exactly what was sent");
    assert!(total_retries > 0, "the kills interrupted requests");
    server.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_embedded_server_mid_load_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let args = [
        "increments",
        "serve",
        "--bind-address",
        "127.0.0.1",
        "--port",
        "0",
        "--data-dir",
        &data,
        "--flush-interval-ms",
        "300",
    ];
    let server = spawn(&args, &[]).await;
    let target = Arc::new(std::sync::Mutex::new(server.addr.unwrap()));
    let stop = Arc::new(AtomicBool::new(false));
    let keys: Vec<String> = (0..8).map(|_| Uuid::new_v4().to_string()).collect();
    let clients: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| client(target.clone(), key.clone(), stop.clone(), i as i64))
        .collect();
    let mut server = kill_9_three_times(&args, server, &target, Duration::from_millis(700)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut requests = 0;
    let mut unknown = 0;
    for (key, handle) in keys.iter().zip(clients) {
        let tally = handle.await.unwrap();
        requests += tally.requests;
        unknown += tally.unknown.len();
        settle(server.addr.unwrap(), key, &tally).await;
    }
    eprintln!("embedded: {requests} requests, 3 kills, {unknown} in flight at a kill; every total matches");
    assert!(requests > 100, "the load actually ran ({requests})");
    server.kill9().await;
}

async fn engines() -> Option<(String, String)> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let redis_up =
        TcpStream::connect("127.0.0.1:6379").await.is_ok() || std::env::var("REDIS_URL").is_ok();
    let mut postgres = None;
    let candidates = match std::env::var("DATABASE_URL") {
        Ok(url) => vec![url],
        Err(_) => vec![
            "postgres://postgres@127.0.0.1:5432/test".to_string(),
            "postgres://root@127.0.0.1:5432/test".to_string(),
        ],
    };
    for url in candidates {
        if let Ok((_client, connection)) =
            tokio_postgres::connect(&url, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            postgres = Some(url);
            break;
        }
    }
    match (redis_up, postgres) {
        (true, Some(pg)) => Some((redis, pg)),
        _ if ci => panic!("Redis and Postgres are required when CI=true"),
        _ => {
            eprintln!("SKIPPED: Redis or Postgres unreachable");
            None
        }
    }
}

/// A scaled-out deployment of the real binary on its own stream and tables, removed when
/// the test ends, passed or failed.
struct Scaled {
    redis: String,
    postgres: String,
    stream: String,
    prefix: String,
    claim_idle_ms: u64,
}

impl Scaled {
    fn new(redis: String, postgres: String, claim_idle_ms: u64) -> Self {
        let suffix = Uuid::new_v4().simple().to_string();
        Scaled {
            redis,
            postgres,
            stream: format!("weir_crash_{suffix}"),
            prefix: format!("crash_{suffix}"),
            claim_idle_ms,
        }
    }

    fn args(&self, role: &[&str]) -> Vec<String> {
        let claim_idle = self.claim_idle_ms.to_string();
        let common = [
            "--queue",
            &self.redis,
            "--database",
            &self.postgres,
            "--stream",
            &self.stream,
            "--table-prefix",
            &self.prefix,
            "--claim-idle-ms",
            &claim_idle,
            "--flush-interval-ms",
            "300",
        ];
        role.iter()
            .chain(common.iter())
            .map(|s| s.to_string())
            .collect()
    }

    async fn api(&self) -> Proc {
        let args = self.args(&[
            "increments",
            "api",
            "--bind-address",
            "127.0.0.1",
            "--port",
            "0",
        ]);
        spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await
    }

    async fn worker(&self, name: &str) -> Proc {
        let args = self.args(&["increments", "worker", "--consumer", name]);
        spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await
    }

    async fn redis_conn(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.redis.as_str()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }

    async fn postgres_client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.postgres, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    /// The entries the group has delivered to `consumer` and not seen acknowledged.
    async fn held_by(&self, consumer: &str) -> Vec<String> {
        let reply: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg("weir-increments")
            .arg("-")
            .arg("+")
            .arg(1_000_000)
            .arg(consumer)
            .query_async(&mut self.redis_conn().await)
            .await
            .unwrap();
        reply.ids.into_iter().map(|pending| pending.id).collect()
    }

    /// Records of applied ids at or below `id` ("ms-seq"): id rows and fast-path batch rows.
    async fn recorded_up_to(&self, id: &str) -> i64 {
        let (ms, seq) = id.split_once('-').unwrap();
        let (ms, seq): (i64, i64) = (ms.parse().unwrap(), seq.parse().unwrap());
        self.postgres_client()
            .await
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM {p}_applied WHERE (ms, seq) <= ($1, $2))
                          + (SELECT count(*) FROM {p}_applied_batches WHERE (min_ms, min_seq) <= ($1, $2))",
                    p = self.prefix
                ),
                &[&ms, &seq],
            )
            .await
            .unwrap()
            .get(0)
    }
}

impl Drop for Scaled {
    fn drop(&mut self) {
        let (redis, postgres) = (self.redis.clone(), self.postgres.clone());
        let (stream, prefix) = (self.stream.clone(), self.prefix.clone());
        // Drop cannot await and runs inside the test's runtime: a thread with its own.
        let done = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok((client, connection)) =
                    tokio_postgres::connect(&postgres, tokio_postgres::NoTls).await
                {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!(
                            "SET lock_timeout = 5000; DROP TABLE IF EXISTS {prefix}_counts, {prefix}_marks, {prefix}_applied, {prefix}_dead_letters, {prefix}_idempotency_keys, {prefix}_flushes, {prefix}_applied_batches"
                        ))
                        .await;
                }
                if let Ok(client) = redis::Client::open(redis.as_str()) {
                    if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                        let _: Result<(), _> = redis::cmd("DEL")
                            .arg(&stream)
                            .arg(format!("{stream}:dead"))
                            .query_async(&mut conn)
                            .await;
                    }
                }
            });
        });
        let _ = done.join();
    }
}

impl Proc {
    fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: plain kill(2) on a child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Stops the process (SIGSTOP) at an instant it holds entries of the group: each
    /// attempt that finds it holding none lets it run again and retries.
    async fn stop_holding(&self, scaled: &Scaled, name: &str) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            self.signal(libc::SIGSTOP);
            let held = scaled.held_by(name).await;
            if !held.is_empty() {
                return held;
            }
            self.signal(libc::SIGCONT);
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} never held an entry"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Polls `probe` until it holds, failing with `what` after `limit`.
async fn wait_until<F, Fut>(limit: Duration, what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !probe().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Load {
    keys: Vec<String>,
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Tally>>,
}

impl Load {
    fn start(api: SocketAddr) -> Self {
        let target = Arc::new(std::sync::Mutex::new(api));
        let stop = Arc::new(AtomicBool::new(false));
        let keys: Vec<String> = (0..8).map(|_| Uuid::new_v4().to_string()).collect();
        let clients = keys
            .iter()
            .enumerate()
            .map(|(i, key)| client(target.clone(), key.clone(), stop.clone(), i as i64))
            .collect();
        Load {
            keys,
            stop,
            clients,
        }
    }

    /// Stops the clients and checks that every key's total is exactly its acknowledged
    /// sum (the API is never killed, so nothing is in doubt). Returns the request count.
    async fn settle_exactly(self, api: SocketAddr) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut requests = 0;
        for (key, handle) in self.keys.iter().zip(self.clients) {
            let tally = handle.await.unwrap();
            assert!(tally.unknown.is_empty(), "the API was never killed");
            requests += tally.requests;
            let total = settle(api, key, &tally).await;
            assert_eq!(total, tally.acknowledged, "key {key}");
        }
        requests
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_mid_load_loses_and_doubles_nothing() {
    let Some((redis, postgres)) = engines().await else {
        return;
    };
    let scaled = Scaled::new(redis, postgres, 1_000);
    let api = scaled.api().await;
    let mut doomed = scaled.worker("doomed").await;
    let _steady = scaled.worker("steady").await;
    let load = Load::start(api.addr.unwrap());
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Frozen first, so what it holds is known and cannot change before the kill.
    let held = doomed.stop_holding(&scaled, "doomed").await;
    doomed.kill9().await;
    eprintln!("killed a worker holding {} entries", held.len());
    // Its entries are taken over by the others and counted once.
    wait_until(
        Duration::from_secs(15),
        "the dead worker's entries were never claimed",
        || async { scaled.held_by("doomed").await.is_empty() },
    )
    .await;
    let mut reborn = scaled.worker("doomed").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let requests = load.settle_exactly(api.addr.unwrap()).await;
    eprintln!(
        "redis+postgres: {requests} requests, worker killed holding {} entries and restarted; every total exact",
        held.len()
    );
    assert!(requests > 100, "the load actually ran ({requests})");
    reborn.kill9().await;
}

/// A worker frozen past the claim threshold: the others take its entries over, apply and
/// acknowledge them, and prune their ids; then it wakes up and flushes the copies it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_past_the_claim_threshold_doubles_nothing() {
    let Some((redis, postgres)) = engines().await else {
        return;
    };
    let scaled = Scaled::new(redis, postgres, 1_000);
    let api = scaled.api().await;
    let api_b = scaled.api().await;
    let paused = scaled.worker("paused").await;
    let _steady = scaled.worker("steady").await;
    let load = Load::start(api.addr.unwrap());
    let other_load = Load::start(api_b.addr.unwrap());
    tokio::time::sleep(Duration::from_millis(800)).await;
    let held = paused.stop_holding(&scaled, "paused").await;
    let newest_held = held.last().unwrap().clone();
    wait_until(
        Duration::from_secs(15),
        "the paused worker's entries were never claimed",
        || async { scaled.held_by("paused").await.is_empty() },
    )
    .await;
    // The live worker applied them, acknowledged them and forgot their ids: only the
    // low-water mark still knows they were applied.
    wait_until(
        Duration::from_secs(20),
        "the applied ids were never pruned",
        || async { scaled.recorded_up_to(&newest_held).await == 0 },
    )
    .await;
    paused.signal(libc::SIGCONT);
    // Long enough for the woken worker to flush what it held (it is overdue at once).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let requests = load.settle_exactly(api.addr.unwrap()).await
        + other_load.settle_exactly(api_b.addr.unwrap()).await;
    eprintln!(
        "redis+postgres: {requests} requests, a worker paused holding {} entries; every total exact",
        held.len()
    );
}

/// A lock on the totals held longer than the claim threshold: flushes wait, their entries
/// go idle and are claimed by the other worker while the first may still commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_on_the_totals_past_the_claim_threshold_doubles_nothing() {
    let Some((redis, postgres)) = engines().await else {
        return;
    };
    let scaled = Scaled::new(redis, postgres, 1_000);
    let api = scaled.api().await;
    let mut workers = Vec::new();
    for name in ["a", "b", "c"] {
        workers.push(scaled.worker(name).await);
    }
    let load = Load::start(api.addr.unwrap());
    tokio::time::sleep(Duration::from_millis(800)).await;
    let holder = scaled.postgres_client().await;
    holder
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {}_counts IN ACCESS EXCLUSIVE MODE",
            scaled.prefix
        ))
        .await
        .unwrap();
    // Several claim thresholds and one prune interval of the workers.
    tokio::time::sleep(Duration::from_secs(6)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    tokio::time::sleep(Duration::from_millis(6_000)).await;
    let requests = load.settle_exactly(api.addr.unwrap()).await;
    eprintln!("redis+postgres: {requests} requests, totals locked for 6 s; every total exact");
}
