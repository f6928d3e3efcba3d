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
    let body = format!(r#"{{"key":"{key}","value":{value}}}"#);
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let head = format!(
        "POST /increment HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
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
    let mut server = spawn(&args, &[]).await;
    let target = Arc::new(std::sync::Mutex::new(server.addr.unwrap()));
    let stop = Arc::new(AtomicBool::new(false));
    let keys: Vec<String> = (0..8).map(|_| Uuid::new_v4().to_string()).collect();
    let clients: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| client(target.clone(), key.clone(), stop.clone(), i as i64))
        .collect();
    for _round in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        server.kill9().await;
        server = spawn(&args, &[]).await;
        *target.lock().unwrap() = server.addr.unwrap();
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_mid_load_loses_and_doubles_nothing() {
    let Some((redis, postgres)) = engines().await else {
        return;
    };
    let suffix = Uuid::new_v4().simple().to_string();
    let stream = format!("weir_crash_{suffix}");
    let prefix = format!("crash_{suffix}");
    let common = [
        "--queue",
        &redis,
        "--database",
        &postgres,
        "--stream",
        &stream,
        "--table-prefix",
        &prefix,
        "--claim-idle-ms",
        "1000",
        "--flush-interval-ms",
        "300",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        extra
            .iter()
            .chain(common.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let api_args = with(&[
        "increments",
        "api",
        "--bind-address",
        "127.0.0.1",
        "--port",
        "0",
    ]);
    let api = spawn(
        &api_args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    )
    .await;
    let worker_args = |name: &str| with(&["increments", "worker", "--consumer", name]);
    let start_worker = |name: &'static str| {
        let args = worker_args(name);
        async move { spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await }
    };
    let mut doomed = start_worker("doomed").await;
    let steady = start_worker("steady").await;
    let target = Arc::new(std::sync::Mutex::new(api.addr.unwrap()));
    let stop = Arc::new(AtomicBool::new(false));
    let keys: Vec<String> = (0..8).map(|_| Uuid::new_v4().to_string()).collect();
    let clients: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| client(target.clone(), key.clone(), stop.clone(), i as i64))
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    doomed.kill9().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut reborn = start_worker("doomed").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    let mut requests = 0;
    for (key, handle) in keys.iter().zip(clients) {
        let tally = handle.await.unwrap();
        assert!(tally.unknown.is_empty(), "the API was never killed");
        requests += tally.requests;
        let total = settle(api.addr.unwrap(), key, &tally).await;
        assert_eq!(total, tally.acknowledged);
    }
    eprintln!(
        "redis+postgres: {requests} requests, worker killed and restarted; every total exact"
    );
    assert!(requests > 100, "the load actually ran ({requests})");
    reborn.kill9().await;
    drop(steady);
    drop(api);
    if let Ok((client, connection)) =
        tokio_postgres::connect(&postgres, tokio_postgres::NoTls).await
    {
        tokio::spawn(connection);
        let _ = client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {prefix}_counts, {prefix}_marks, {prefix}_applied, {prefix}_dead_letters"
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
}
