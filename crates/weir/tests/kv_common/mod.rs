//! What the kv integration tests share: the broker of this machine (skipped when away, a
//! failure under CI=true), queues that are deleted afterwards, `weir kv serve` child
//! processes, a TCP proxy that can cut the server's broker connection, and a model of the
//! store to compare with.

#![allow(dead_code)]

use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use weir_kv::client::{ReplyQueue, Requester};

pub const WEIR: &str = env!("CARGO_BIN_EXE_weir");
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// A reachable broker URL (AMQP_URL, else the local guest account), or None with a note.
pub async fn amqp_url() -> Option<String> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let connecting = Connection::connect(&url, ConnectionProperties::default());
    let failure = match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(Ok(connection)) => {
            let _ = connection.close(200, "probe".into()).await;
            return Some(url);
        }
        Ok(Err(err)) => err.to_string(),
        Err(_) => "timed out".to_string(),
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("RabbitMQ is required when CI=true: {failure}");
    }
    eprintln!("SKIPPED: RabbitMQ unreachable ({failure})");
    None
}

pub async fn channel(url: &str) -> (Connection, Channel) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    (connection, channel)
}

/// A unique request queue; it and its dead-letter queue are deleted on drop.
pub struct TestQueue {
    pub url: String,
    pub name: String,
}

impl TestQueue {
    pub fn new(url: &str, test: &str) -> Self {
        TestQueue {
            url: url.to_string(),
            name: format!("weir.kv.test.{test}.{}", uuid::Uuid::new_v4().simple()),
        }
    }

    pub fn dead(&self) -> String {
        format!("{}.dead", self.name)
    }

    /// Declares both queues as the server would, so requests can be sent before it starts.
    pub async fn declare(&self) {
        let (connection, channel) = channel(&self.url).await;
        for queue in [self.name.clone(), self.dead()] {
            let durable = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(queue.into(), durable, FieldTable::default())
                .await
                .expect("declare");
        }
        let _ = connection.close(200, "declared".into()).await;
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let url = self.url.clone();
        let queues = [self.name.clone(), self.dead()];
        // Drop cannot await, and may run inside the test's runtime: a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let Ok(connection) =
                    Connection::connect(&url, ConnectionProperties::default()).await
                else {
                    return;
                };
                if let Ok(channel) = connection.create_channel().await {
                    for queue in queues {
                        let _ = channel
                            .queue_delete(queue.into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                let _ = connection.close(200, "cleaned up".into()).await;
            });
        })
        .join();
    }
}

/// A `weir kv serve` child process, killed on drop.
pub struct Server {
    pub child: Child,
}

impl Server {
    /// Returns once the server printed its start-up line (data dir locked, store loaded).
    pub async fn start(url: &str, queue: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(WEIR)
            .args(["kv", "serve", "--amqp-url", url, "--queue", queue])
            .args(extra)
            .env("RUST_LOG", "warn")
            .env_remove("AMQP_URL")
            .env_remove("QUEUE_NAME")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn weir kv serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the server announced itself")
            .expect("read stdout")
            .expect("a line");
        assert!(line.starts_with("kv: consuming"), "{line}");
        Server { child }
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
    }

    pub fn signal(&mut self, signal: libc::c_int) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: plain kill(2) on a child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

/// Every item of the store, page by page, in insertion order.
pub async fn get_all(requester: &mut Requester) -> Vec<(String, String)> {
    let mut items = Vec::new();
    let mut after = serde_json::Value::Null;
    loop {
        let mut request = serde_json::json!({"action": "getall", "limit": 10_000});
        if !after.is_null() {
            request["after"] = after.clone();
        }
        let body = serde_json::to_vec(&request).unwrap();
        let reply = requester.call(&body, REPLY_TIMEOUT).await.expect("getall");
        let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(reply["ok"], true, "{reply}");
        for item in reply["items"].as_array().expect("items") {
            items.push((
                item["key"].as_str().unwrap().to_string(),
                item["value"].as_str().unwrap().to_string(),
            ));
        }
        after = reply["next"].clone();
        if after.is_null() {
            return items;
        }
    }
}

pub async fn requester(url: &str, queue: &str) -> Requester {
    Requester::connect(url, queue, ReplyQueue::Private)
        .await
        .expect("connect a client")
}

/// One write of a client's script, in groups of four: add `a`, remove `a`, add `a`, add `b`
/// (keys fresh for each group), leaving `a` before `b`. Applying any suffix of a group a
/// second time (a request redelivered after it was applied) moves `a` after `b`, so a
/// double apply shows in the order even though every write on its own is idempotent.
pub fn scripted_write(client: usize, step: usize) -> serde_json::Value {
    let group = step / 4;
    let a = format!("{client}-a{group}");
    let b = format!("{client}-b{group}");
    match step % 4 {
        0 | 2 => serde_json::json!({"action": "add", "key": a, "value": format!("v{step}")}),
        1 => serde_json::json!({"action": "remove", "key": a}),
        _ => serde_json::json!({"action": "add", "key": b, "value": format!("v{step}")}),
    }
}

/// What the store must hold for one client after its first `steps` writes, each applied
/// once, in order (re-adding a key keeps its place, removing it forgets the place).
pub fn scripted_model(client: usize, steps: usize) -> Vec<(String, String)> {
    let mut model: Vec<(String, String)> = Vec::new();
    for step in 0..steps {
        let write = scripted_write(client, step);
        let key = write["key"].as_str().unwrap().to_string();
        if write["action"] == "add" {
            let value = format!("v{step}");
            match model.iter_mut().find(|(k, _)| *k == key) {
                Some(item) => item.1 = value,
                None => model.push((key, value)),
            }
        } else {
            model.retain(|(k, _)| *k != key);
        }
    }
    model
}

/// The items of one client's keys, in store order.
pub fn items_of(items: &[(String, String)], client: usize) -> Vec<(String, String)> {
    let prefix = format!("{client}-");
    items
        .iter()
        .filter(|(key, _)| key.starts_with(&prefix))
        .cloned()
        .collect()
}

/// A TCP proxy to the broker whose connections can be cut, to drop the server's session
/// without touching anyone else's.
pub struct Proxy {
    pub url: String,
    accept: JoinHandle<()>,
    pipes: std::sync::Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    held: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub async fn start(broker_url: &str) -> Proxy {
        let mut uri = lapin::uri::AMQPUri::from_str(broker_url).expect("AMQP URL");
        let upstream = format!("{}:{}", uri.authority.host, uri.authority.port);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        uri.authority.host = "127.0.0.1".into();
        uri.authority.port = listener.local_addr().unwrap().port();
        let pipes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accepted = pipes.clone();
        let held = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let holding = held.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let held = holding.clone();
                let pipe = tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = inbound.into_split();
                    let (mut broker_read, mut broker_write) = outbound.into_split();
                    let up = tokio::io::copy(&mut client_read, &mut broker_write);
                    let down = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let read = broker_read.read(&mut buf).await?;
                            if read == 0 {
                                return Ok::<(), std::io::Error>(());
                            }
                            if held.load(std::sync::atomic::Ordering::SeqCst) {
                                // Held: what the broker sent stays here until the cut.
                                std::future::pending::<()>().await;
                            }
                            client_write.write_all(&buf[..read]).await?;
                        }
                    };
                    let _ = tokio::join!(up, down);
                });
                accepted.lock().unwrap().push(pipe);
            }
        });
        Proxy {
            url: uri.to_string(),
            accept,
            pipes,
            held,
        }
    }

    /// From now on, nothing the broker sends reaches the client (what the client sends still
    /// reaches the broker): deliveries are sent, as the broker sees it, and never received.
    pub fn hold(&self) {
        self.held.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Drops every connection through the proxy; new ones are still accepted.
    pub fn cut(&self) {
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// One client sending its whole script at once (publishes pipelined, each with a
/// correlation id = its step), then collecting replies until every step was answered.
/// `replied` counts replies across clients, so a test can act in the middle of the load.
pub async fn run_script(
    url: String,
    queue: String,
    client: usize,
    steps: usize,
    replied: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
    let (connection, channel) = channel(&url).await;
    let private = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let reply_queue = channel
        .queue_declare("".into(), private, FieldTable::default())
        .await
        .expect("reply queue")
        .name()
        .clone();
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let mut replies = channel
        .basic_consume(
            reply_queue.clone(),
            "".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
        .expect("consume replies");
    tokio::spawn(async move {
        for step in 0..steps {
            let body = serde_json::to_vec(&scripted_write(client, step)).unwrap();
            let properties = lapin::BasicProperties::default()
                .with_reply_to(reply_queue.clone())
                .with_correlation_id(step.to_string().into());
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await
                .expect("publish");
        }
        let mut answered = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while answered.len() < steps {
            let reply = tokio::time::timeout_at(deadline, replies.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("client {client}: {} of {steps} answered", answered.len())
                })
                .expect("replies open")
                .expect("a reply");
            let step: usize = reply
                .properties
                .correlation_id()
                .as_ref()
                .expect("correlation id")
                .as_str()
                .parse()
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&reply.data).unwrap();
            assert_eq!(body["ok"], true, "{body}");
            // A reply sent just before a crash is sent again for the redelivered copy.
            if answered.insert(step) {
                replied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _ = connection.close(200, "done".into()).await;
    })
}

/// [`run_script`] for clients 0 to `clients - 1`, all publishing at once.
pub async fn start_scripts(
    url: &str,
    queue: &str,
    clients: usize,
    steps: usize,
    replied: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut scripts = Vec::new();
    for client in 0..clients {
        let script = run_script(
            url.to_string(),
            queue.to_string(),
            client,
            steps,
            replied.clone(),
        );
        scripts.push(script.await);
    }
    scripts
}

/// An address on loopback that nothing listens on (for a child process to bind).
pub fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .to_string()
}

/// Polls the queue until exactly `count` messages are ready in it, failing after 60 s.
pub async fn wait_for_ready(channel: &Channel, queue: &str, count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ready = weir_kv::server::ready_messages(channel, queue).await;
        if ready.expect("read the queue's depth") as usize == count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {count} ready in {queue}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `done` until it holds, failing after `within`.
pub async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// After every script finished: each client's keys are in the store exactly as its writes,
/// applied once each and in order, leave them.
pub async fn assert_scripts_applied_once(url: &str, queue: &str, clients: usize, steps: usize) {
    let mut reader = requester(url, queue).await;
    let items = get_all(&mut reader).await;
    for client in 0..clients {
        assert_eq!(
            items_of(&items, client),
            scripted_model(client, steps),
            "client {client}"
        );
    }
    let expected: usize = (0..clients).map(|c| scripted_model(c, steps).len()).sum();
    assert_eq!(items.len(), expected);
    reader.close().await;
}

/// The `--output` file holds one line per write, numbered 1, 2, 3... without a gap or a
/// repeat, and each client's lines are its script's writes in order, each once.
pub fn assert_output_lists_each_write_once(path: &std::path::Path, clients: usize, steps: usize) {
    let text = std::fs::read_to_string(path).expect("read the output file");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    let ops: Vec<u64> = lines
        .iter()
        .map(|l| l["op"].as_u64().expect("op"))
        .collect();
    let expected: Vec<u64> = (1..=(clients * steps) as u64).collect();
    if ops != expected {
        let mut seen = std::collections::HashMap::new();
        for op in &ops {
            *seen.entry(*op).or_insert(0) += 1;
        }
        let repeated: Vec<_> = seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(op, _)| op)
            .collect();
        panic!(
            "{} lines for {} writes; first repeated ops {:?}",
            ops.len(),
            expected.len(),
            &repeated[..repeated.len().min(10)]
        );
    }
    for client in 0..clients {
        let prefix = format!("{client}-");
        let written: Vec<serde_json::Value> = lines
            .iter()
            .filter(|l| l["key"].as_str().is_some_and(|k| k.starts_with(&prefix)))
            .map(|l| {
                let mut write = serde_json::json!({"action": l["action"], "key": l["key"]});
                if l["action"] == "add" {
                    write["value"] = l["value"].clone();
                }
                write
            })
            .collect();
        let script: Vec<serde_json::Value> = (0..steps)
            .map(|step| scripted_write(client, step))
            .collect();
        assert_eq!(written, script, "client {client}'s output lines");
    }
}

/// `GET path` over plain HTTP/1.0: the status line and the body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(String, String)> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    std::io::Write::write_fmt(
        &mut stream,
        format_args!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )?;
    let mut response = String::new();
    std::io::Read::read_to_string(&mut stream, &mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

/// A server whose log lines (stderr) the test reads.
pub struct LoggingServer {
    pub server: Server,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
}

impl Server {
    pub async fn start_logging(url: &str, queue: &str, extra: &[&str]) -> LoggingServer {
        let mut child = Command::new(WEIR)
            .args([
                "kv",
                "serve",
                "--amqp-url",
                url,
                "--queue",
                queue,
                "--log-format",
                "json",
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .env_remove("AMQP_URL")
            .env_remove("QUEUE_NAME")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn weir kv serve");
        let stderr = child.stderr.take().expect("stderr");
        LoggingServer {
            server: Server { child },
            lines: BufReader::new(stderr).lines(),
        }
    }
}

impl LoggingServer {
    pub async fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no log line with {needle:?}"))
                .expect("read stderr")
                .unwrap_or_else(|| panic!("the server exited before logging {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }
}
