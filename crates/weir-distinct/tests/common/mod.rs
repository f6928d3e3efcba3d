//! What the integration tests share: a raw HTTP/1.1 client (so malformed requests can be
//! sent as they are) and a worker started on port 0.

#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weir_distinct::config::{Database, DistinctConfig, RawConfig};
use weir_runtime::Shutdown;

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|err| panic!("{err}: {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request with `Connection: close` and reads the whole answer.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    try_request(addr, method, path, headers, body)
        .await
        .expect("an answer")
}

/// As [`request`], but `None` when the server is gone before it answers.
pub async fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Reply> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.ok()?;
    // The server may answer (413) and close before reading a large body.
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Some(Reply {
        status,
        headers,
        body: body.to_string(),
    })
}

pub async fn post_items(addr: SocketAddr, body: &str) -> Reply {
    request(
        addr,
        "POST",
        "/items",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await
}

pub async fn try_post_items(addr: SocketAddr, body: &str) -> Option<Reply> {
    try_request(
        addr,
        "POST",
        "/items",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await
}

pub async fn count(addr: SocketAddr, tenant: &str) -> u64 {
    let reply = request(addr, "GET", &format!("/items/{tenant}/count"), &[], b"").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["count"].as_u64().expect("a count")
}

pub fn items_json(pairs: &[(String, String)]) -> String {
    let items: Vec<serde_json::Value> = pairs
        .iter()
        .map(|(tenant, id)| serde_json::json!({"id": id, "tenant": tenant}))
        .collect();
    serde_json::Value::Array(items).to_string()
}

/// A worker's config over `database` with `worker_persist: 0`: items are counted before
/// they are acknowledged, so a test reads exact counts right after a 200.
pub fn config(database: &std::path::Path) -> DistinctConfig {
    config_persist(database, std::time::Duration::ZERO)
}

pub fn config_persist(
    database: &std::path::Path,
    worker_persist: std::time::Duration,
) -> DistinctConfig {
    let mut config = RawConfig::default()
        .validate("test")
        .expect("defaults are valid");
    config.database = Database::Sqlite(database.to_path_buf());
    config.worker_persist = worker_persist;
    config
}

/// Reads `tenant`'s count until it is `expected` (acknowledged items show within
/// `worker_persist`) or `within` passes; returns the last count read.
pub async fn count_within(
    addr: SocketAddr,
    tenant: &str,
    expected: u64,
    within: std::time::Duration,
) -> u64 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let counted = count(addr, tenant).await;
        if counted == expected || tokio::time::Instant::now() >= deadline {
            return counted;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Writes what a worker that died before folding would leave: `records` in the first log
/// of `tenant`'s shard, each a group of encoded items. Returns the log's path.
pub fn leave_log(root: &std::path::Path, tenant: &str, records: &[&[&str]]) -> std::path::PathBuf {
    let shards = weir_distinct::store::StoreOptions::default().shards;
    let shard = weir_distinct::shard::shard_of(tenant, shards);
    let dir = root.join(format!("shard-{shard:02}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("log-0");
    let mut log = weir_runtime::recordlog::RecordWriter::open(&path, 0).unwrap();
    for ids in records {
        let mut payload = Vec::new();
        for id in *ids {
            weir_distinct::shard::encode_item(&mut payload, tenant, id);
        }
        log.append(&payload);
    }
    log.commit(true).unwrap();
    path
}

/// Flips every bit of the byte at `offset` of `path`, as a failing disk or a stray write
/// would; returns the file's new bytes.
pub fn flip_byte(path: &std::path::Path, offset: usize) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= 0xff;
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// A worker on port 0; cancel `shutdown.token` and await the handle to stop it.
pub struct Worker {
    pub addr: SocketAddr,
    pub shutdown: Shutdown,
    pub done: tokio::task::JoinHandle<Result<(), weir_distinct::server::ServeError>>,
}

impl Worker {
    pub async fn start(config: DistinctConfig) -> Worker {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = Shutdown::new();
        let token = shutdown.clone();
        let done =
            tokio::spawn(async move { weir_distinct::server::run(listener, &config, token).await });
        Worker {
            addr,
            shutdown,
            done,
        }
    }

    pub async fn stop(self) {
        self.shutdown.token.cancel();
        self.done.await.expect("join").expect("worker ran");
    }
}
