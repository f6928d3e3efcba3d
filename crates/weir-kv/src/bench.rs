//! `weir kv bench`: what the kv server costs on top of the broker, measured in one run.
//!
//! Two parts, both against a `weir kv serve` child process (this same executable unless
//! `--server-bin` says otherwise) on queues of their own, deleted afterwards:
//! - round trips: 1, 4 and 16 clients, each sending one request and awaiting its reply;
//!   operations per second and p50/p99 latency.
//! - drains: a queue pre-filled with `--drain-messages` requests is drained once by a bare
//!   lapin consumer (same prefetch and acknowledgement mode, no parsing, no store) and once by
//!   the server, in three settings: transient with auto-ack against `--durability none`,
//!   persistent with manual acks against `--durability log`, and the latter with a reply per
//!   message. The server's RSS is sampled while it drains.
//!
//! The requests cycle through a fixed set of keys, so the store stays the same size and a
//! growing RSS would mean a leak, not data.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

use crate::client::{ClientError, ReplyQueue, Requester};

const KEYS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the kv server: {0}")]
    Server(String),
    #[error("interrupted")]
    Interrupted,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchFlags {
    /// RabbitMQ [env: AMQP_URL or QUEUE_CONN_STRING; default: amqp://127.0.0.1:5672/%2f].
    #[arg(long)]
    pub amqp_url: Option<String>,
    /// Client counts for the round-trip part.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub clients: Vec<usize>,
    /// Seconds of round trips per client count.
    #[arg(long, default_value_t = 5)]
    pub round_trip_secs: u64,
    /// Requests pre-filled for each drain.
    #[arg(long, default_value_t = 200_000)]
    pub drain_messages: usize,
    /// Prefetch of both the bare consumer and the server.
    #[arg(long, default_value_t = 1000)]
    pub prefetch: u16,
    /// The `weir` executable that serves [default: this one].
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
}

/// The three drain settings of the issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setting {
    TransientAutoAck,
    PersistentManualAck,
    PersistentWithReplies,
}

impl Setting {
    const ALL: [Setting; 3] = [
        Setting::TransientAutoAck,
        Setting::PersistentManualAck,
        Setting::PersistentWithReplies,
    ];

    fn label(self) -> &'static str {
        match self {
            Setting::TransientAutoAck => "transient, auto-ack vs --durability none",
            Setting::PersistentManualAck => "persistent, manual acks vs --durability log",
            Setting::PersistentWithReplies => "persistent, manual acks, reply each vs log",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Setting::TransientAutoAck => "transient",
            Setting::PersistentManualAck => "persistent",
            Setting::PersistentWithReplies => "replies",
        }
    }

    fn durability(self) -> &'static str {
        match self {
            Setting::TransientAutoAck => "none",
            _ => "log",
        }
    }

    fn persistent(self) -> bool {
        self != Setting::TransientAutoAck
    }

    fn replies(self) -> bool {
        self == Setting::PersistentWithReplies
    }
}

struct DrainResult {
    setting: Setting,
    bare_per_sec: f64,
    kv_per_sec: f64,
    kv_seconds: f64,
    rss_kib: Vec<u64>,
}

pub async fn run(flags: BenchFlags, token: CancellationToken) -> Result<(), BenchError> {
    let (url, _) = crate::client::resolve_target(flags.amqp_url.clone(), None);
    let run_id = format!("weir.kv.bench.{}", std::process::id());
    println!("round trips (each client: one request, await its reply, repeat; --durability log)");
    println!(
        "{:>8} {:>12} {:>10} {:>10}",
        "clients", "ops/s", "p50 ms", "p99 ms"
    );
    let queue = format!("{run_id}.rt");
    let mut server = Server::spawn(&flags, &url, &queue, "log").await?;
    for &clients in &flags.clients {
        let (per_sec, p50, p99) = round_trips(&url, &queue, clients, &flags, &token).await?;
        println!("{clients:>8} {per_sec:>12.0} {p50:>10.2} {p99:>10.2}");
    }
    server.stop().await;
    delete_queues(&url, &queue).await?;

    let mut results = Vec::new();
    for setting in Setting::ALL {
        if token.is_cancelled() {
            return Err(BenchError::Interrupted);
        }
        results.push(drain_both(&flags, &url, &run_id, setting).await?);
    }
    print_drains(&flags, &results);
    Ok(())
}

async fn round_trips(
    url: &str,
    queue: &str,
    clients: usize,
    flags: &BenchFlags,
    token: &CancellationToken,
) -> Result<(f64, f64, f64), BenchError> {
    let duration = Duration::from_secs(flags.round_trip_secs);
    let mut tasks = Vec::new();
    for client in 0..clients {
        let mut requester = Requester::connect(url, queue, ReplyQueue::Private).await?;
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let started = Instant::now();
            let mut n = 0usize;
            while started.elapsed() < duration && !token.is_cancelled() {
                let body = request_body(client * 1_000_003 + n);
                let sent = Instant::now();
                requester.call(&body, Duration::from_secs(10)).await?;
                latencies.push(sent.elapsed());
                n += 1;
            }
            requester.close().await;
            Ok::<_, ClientError>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        let joined = task
            .await
            .map_err(|err| BenchError::Server(format!("a client task failed: {err}")))?;
        latencies.extend(joined?);
    }
    latencies.sort_unstable();
    let percentile = |p: f64| -> f64 {
        let index = ((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1));
        latencies
            .get(index)
            .map_or(0.0, |latency| latency.as_secs_f64() * 1e3)
    };
    let per_sec = latencies.len() as f64 / duration.as_secs_f64();
    Ok((per_sec, percentile(0.50), percentile(0.99)))
}

/// About 56 bytes, like the issue's measurements; the key cycles so the store stays small.
fn request_body(n: usize) -> Vec<u8> {
    format!(
        r#"{{"action":"add","key":"k{:06}","value":"v{:06}"}}"#,
        n % KEYS,
        n % 1_000_000
    )
    .into_bytes()
}

async fn drain_both(
    flags: &BenchFlags,
    url: &str,
    run_id: &str,
    setting: Setting,
) -> Result<DrainResult, BenchError> {
    let bare_queue = format!("{run_id}.{}.bare", setting.slug());
    let kv_queue = format!("{run_id}.{}.kv", setting.slug());
    let replies = Replies::open(url).await?;

    prefill(
        url,
        &bare_queue,
        flags.drain_messages,
        setting,
        &replies.queue,
    )
    .await?;
    let started = Instant::now();
    bare_drain(url, &bare_queue, flags, setting, &replies).await?;
    let bare_seconds = started.elapsed().as_secs_f64();
    delete_queues(url, &bare_queue).await?;

    // The server drains the same requests plus one `get` at the end, whose reply says
    // everything before it was applied and acknowledged.
    prefill(
        url,
        &kv_queue,
        flags.drain_messages,
        setting,
        &replies.queue,
    )
    .await?;
    publish_marker(url, &kv_queue, &replies.queue).await?;
    let mut server = Server::spawn(flags, url, &kv_queue, setting.durability()).await?;
    let started = Instant::now();
    let expected = if setting.replies() {
        flags.drain_messages + 1
    } else {
        1
    };
    let rss_kib = replies.await_count(expected, server.pid).await?;
    let kv_seconds = started.elapsed().as_secs_f64();
    server.stop().await;
    delete_queues(url, &kv_queue).await?;
    replies.close().await;
    let messages = flags.drain_messages as f64;
    Ok(DrainResult {
        setting,
        bare_per_sec: messages / bare_seconds,
        kv_per_sec: messages / kv_seconds,
        kv_seconds,
        rss_kib,
    })
}

async fn channel(url: &str) -> Result<(Connection, Channel), BenchError> {
    let properties = ConnectionProperties::default().with_connection_name("weir-kv-bench".into());
    let connection = Connection::connect(url, properties).await?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Publishes with confirms, so the queue holds every message before the clock starts.
async fn prefill(
    url: &str,
    queue: &str,
    messages: usize,
    setting: Setting,
    reply_to: &ShortString,
) -> Result<(), BenchError> {
    let (connection, channel) = channel(url).await?;
    channel
        .queue_declare(queue.into(), durable(), FieldTable::default())
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut properties =
        BasicProperties::default().with_delivery_mode(if setting.persistent() { 2 } else { 1 });
    let mut pending = Vec::with_capacity(1000);
    for n in 0..messages {
        if setting.replies() {
            properties = properties
                .with_reply_to(reply_to.clone())
                .with_correlation_id(n.to_string().into());
        }
        let body = request_body(n);
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                properties.clone(),
            )
            .await?;
        pending.push(confirm);
        if pending.len() == 1000 {
            for confirm in pending.drain(..) {
                confirm.await?;
            }
        }
    }
    for confirm in pending {
        confirm.await?;
    }
    let _ = connection.close(200, "prefilled".into()).await;
    Ok(())
}

async fn publish_marker(url: &str, queue: &str, reply_to: &ShortString) -> Result<(), BenchError> {
    let (connection, channel) = channel(url).await?;
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            br#"{"action":"get","key":"k000000"}"#,
            BasicProperties::default()
                .with_reply_to(reply_to.clone())
                .with_correlation_id("marker".into()),
        )
        .await?
        .await?;
    let _ = connection.close(200, "marker".into()).await;
    Ok(())
}

/// The ceiling: consume in batches of what is ready, as the server does, without parsing.
async fn bare_drain(
    url: &str,
    queue: &str,
    flags: &BenchFlags,
    setting: Setting,
    replies: &Replies,
) -> Result<(), BenchError> {
    let (connection, channel) = channel(url).await?;
    channel
        .basic_qos(flags.prefetch, BasicQosOptions::default())
        .await?;
    let options = BasicConsumeOptions {
        no_ack: !setting.persistent(),
        exclusive: true,
        ..BasicConsumeOptions::default()
    };
    let mut consumer = channel
        .basic_consume(queue.into(), "bare".into(), options, FieldTable::default())
        .await?;
    let mut consumed = 0;
    while consumed < flags.drain_messages {
        let first = consumer.next().await.ok_or(ClientError::RepliesClosed)??;
        let mut batch = vec![first];
        while let Some(Some(Ok(delivery))) = consumer.next().now_or_never() {
            batch.push(delivery);
            if batch.len() == usize::from(flags.prefetch) {
                break;
            }
        }
        if setting.replies() {
            // Pipelined as the server does it.
            let publishes = batch.iter().filter_map(|delivery| {
                let reply_to = delivery.properties.reply_to().clone()?;
                let mut properties =
                    BasicProperties::default().with_content_type("application/json".into());
                if let Some(id) = delivery.properties.correlation_id() {
                    properties = properties.with_correlation_id(id.clone());
                }
                Some(channel.basic_publish(
                    "".into(),
                    reply_to,
                    BasicPublishOptions::default(),
                    br#"{"ok":true}"#,
                    properties,
                ))
            });
            futures::future::try_join_all(publishes).await?;
        }
        if let (true, Some(last)) = (setting.persistent(), batch.last()) {
            channel
                .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
        }
        consumed += batch.len();
    }
    if setting.replies() {
        replies.await_count(flags.drain_messages, None).await?;
    }
    let _ = connection.close(200, "drained".into()).await;
    Ok(())
}

/// The bench's own reply queue, counted as replies arrive.
struct Replies {
    connection: Connection,
    queue: ShortString,
    consumer: tokio::sync::Mutex<lapin::Consumer>,
}

impl Replies {
    async fn open(url: &str) -> Result<Self, BenchError> {
        let (connection, channel) = channel(url).await?;
        let private = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let declared = channel
            .queue_declare("".into(), private, FieldTable::default())
            .await?;
        let queue = declared.name().clone();
        let options = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let consumer = channel
            .basic_consume(queue.clone(), "".into(), options, FieldTable::default())
            .await?;
        Ok(Replies {
            connection,
            queue,
            consumer: tokio::sync::Mutex::new(consumer),
        })
    }

    /// Waits for `count` replies; with a server pid, samples its RSS (KiB) meanwhile.
    async fn await_count(&self, count: usize, server: Option<u32>) -> Result<Vec<u64>, BenchError> {
        let mut consumer = self.consumer.lock().await;
        let mut rss = Vec::new();
        let mut sample = tokio::time::interval(Duration::from_millis(250));
        let mut received = 0;
        while received < count {
            tokio::select! {
                next = consumer.next() => {
                    next.ok_or(ClientError::RepliesClosed)??;
                    received += 1;
                }
                _ = sample.tick() => {
                    if let Some(kib) = server.and_then(rss_kib) {
                        rss.push(kib);
                    }
                }
            }
        }
        if let Some(kib) = server.and_then(rss_kib) {
            rss.push(kib);
        }
        Ok(rss)
    }

    async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn delete_queues(url: &str, queue: &str) -> Result<(), BenchError> {
    let (connection, channel) = channel(url).await?;
    for name in [queue.to_string(), format!("{queue}.dead")] {
        channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await?;
    }
    let _ = connection.close(200, "cleaned up".into()).await;
    Ok(())
}

/// A `weir kv serve` child process with a data directory of its own.
struct Server {
    child: tokio::process::Child,
    pid: Option<u32>,
    data_dir: PathBuf,
}

impl Server {
    /// Returns once the server has printed its start-up line (store loaded).
    async fn spawn(
        flags: &BenchFlags,
        url: &str,
        queue: &str,
        durability: &str,
    ) -> Result<Self, BenchError> {
        let bin = match &flags.server_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()
                .map_err(|err| BenchError::Server(format!("cannot find this executable: {err}")))?,
        };
        let data_dir = std::env::temp_dir().join(format!("{queue}.data"));
        let mut child = tokio::process::Command::new(&bin)
            .args(["kv", "serve", "--amqp-url", url, "--queue", queue])
            .args(["--durability", durability, "--prefetch"])
            .arg(flags.prefetch.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| BenchError::Server(format!("cannot run {}: {err}", bin.display())))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Server("no stdout".into()))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        match lines.next_line().await {
            Ok(Some(line)) if line.starts_with("kv: consuming") => {}
            other => return Err(BenchError::Server(format!("did not start: {other:?}"))),
        }
        let pid = child.id();
        Ok(Server {
            child,
            pid,
            data_dir,
        })
    }

    async fn stop(&mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

fn print_drains(flags: &BenchFlags, results: &[DrainResult]) {
    println!();
    println!(
        "drain of {} pre-filled requests (prefetch {}, both in this run)",
        flags.drain_messages, flags.prefetch
    );
    println!(
        "{:<46} {:>10} {:>10} {:>8} {:>8} {:>24}",
        "setting", "bare /s", "kv /s", "kv/bare", "kv s", "kv RSS MiB first/max/last"
    );
    for result in results {
        let mib = |kib: Option<&u64>| kib.map_or(0.0, |kib| *kib as f64 / 1024.0);
        let rss = format!(
            "{:.0}/{:.0}/{:.0}",
            mib(result.rss_kib.first()),
            mib(result.rss_kib.iter().max()),
            mib(result.rss_kib.last())
        );
        println!(
            "{:<46} {:>10.0} {:>10.0} {:>7.0}% {:>8.2} {:>24}",
            result.setting.label(),
            result.bare_per_sec,
            result.kv_per_sec,
            100.0 * result.kv_per_sec / result.bare_per_sec,
            result.kv_seconds,
            rss
        );
    }
}
