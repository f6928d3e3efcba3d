//! `weir kv bench`: what the kv server costs on top of the broker, measured in one run.
//!
//! Two parts, both against a `weir kv serve` child process (this same executable unless
//! `--server-bin` says otherwise) on queues of their own, deleted afterwards:
//! - round trips: 1, 4 and 16 clients, each sending one request and awaiting its reply;
//!   operations per second and p50/p99 latency.
//! - drains: a queue pre-filled with `--drain-messages` requests is drained once by a bare
//!   lapin consumer (same prefetch and acknowledgement mode, no parsing, no store) and once by
//!   the server, in the issue's three settings: transient with auto-ack against `--durability
//!   none --acks auto`, persistent with manual acks against `--durability log`, and the latter
//!   with a reply per message (plus, on request, transient with manual acks on both sides,
//!   against `--durability none`). The server's RSS is sampled while it drains. With
//!   `--rounds N` every setting is drained N times, the bare consumer and the server taking
//!   turns to go first, and the medians are printed: on a shared machine one pair of drains
//!   says little.
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
    /// Rounds of the drains; the bare consumer and the server alternate going first.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Only the drains, not the round trips.
    #[arg(long)]
    pub drains_only: bool,
    /// Which drain settings to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "transient,persistent,replies"
    )]
    pub settings: Vec<Setting>,
    /// The `weir` executable that serves [default: this one].
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
}

/// The drain settings: the issue's three, and transient with acks on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Setting {
    /// Transient messages: the bare consumer auto-acks, the server runs `--durability none
    /// --acks auto`.
    #[value(name = "transient")]
    TransientAutoAck,
    /// Persistent messages, manual acks, the server runs `--durability log`.
    #[value(name = "persistent")]
    PersistentManualAck,
    /// As `persistent`, with a reply published per message.
    #[value(name = "replies")]
    PersistentWithReplies,
    /// Transient messages with manual acks on both sides: what acknowledging costs.
    #[value(name = "transient-acked")]
    TransientManualAck,
}

impl Setting {
    const ALL: [Setting; 4] = [
        Setting::TransientAutoAck,
        Setting::TransientManualAck,
        Setting::PersistentManualAck,
        Setting::PersistentWithReplies,
    ];

    fn label(self) -> &'static str {
        match self {
            Setting::TransientAutoAck => "transient, auto-ack vs none, --acks auto",
            Setting::TransientManualAck => "transient, manual acks vs --durability none",
            Setting::PersistentManualAck => "persistent, manual acks vs --durability log",
            Setting::PersistentWithReplies => "persistent, manual acks, reply each vs log",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Setting::TransientAutoAck => "transient",
            Setting::TransientManualAck => "transient-acked",
            Setting::PersistentManualAck => "persistent",
            Setting::PersistentWithReplies => "replies",
        }
    }

    fn durability(self) -> &'static str {
        match self {
            Setting::TransientAutoAck | Setting::TransientManualAck => "none",
            _ => "log",
        }
    }

    fn persistent(self) -> bool {
        matches!(
            self,
            Setting::PersistentManualAck | Setting::PersistentWithReplies
        )
    }

    /// Whether the bare consumer acknowledges (the server always does).
    fn bare_acks(self) -> bool {
        self != Setting::TransientAutoAck
    }

    /// The server's `--acks`: the bare consumer's acknowledgement mode.
    fn server_acks(self) -> &'static str {
        if self.bare_acks() {
            "manual"
        } else {
            "auto"
        }
    }

    fn replies(self) -> bool {
        self == Setting::PersistentWithReplies
    }
}

struct DrainResult {
    setting: Setting,
    round: u32,
    bare_first: bool,
    bare_per_sec: f64,
    kv_per_sec: f64,
    kv_seconds: f64,
    rss_kib: Vec<u64>,
}

pub async fn run(flags: BenchFlags, token: CancellationToken) -> Result<(), BenchError> {
    let (url, _) = crate::client::resolve_target(flags.amqp_url.clone(), None);
    let run_id = format!("weir.kv.bench.{}", std::process::id());
    if !flags.drains_only {
        println!(
            "round trips (each client: one request, await its reply, repeat; --durability log)"
        );
        println!(
            "{:>8} {:>12} {:>10} {:>10}",
            "clients", "ops/s", "p50 ms", "p99 ms"
        );
        let queue = format!("{run_id}.rt");
        let mut server = Server::spawn(&flags, &url, &queue, "log", "manual").await?;
        for &clients in &flags.clients {
            let (per_sec, p50, p99) = round_trips(&url, &queue, clients, &flags, &token).await?;
            println!("{clients:>8} {per_sec:>12.0} {p50:>10.2} {p99:>10.2}");
        }
        server.stop().await;
        delete_queues(&url, &queue).await?;
        println!();
    }

    println!(
        "drain of {} pre-filled requests (prefetch {}, bare consumer and server in this run)",
        flags.drain_messages, flags.prefetch
    );
    print_drain_header();
    let mut results = Vec::new();
    for round in 0..flags.rounds {
        for &setting in &flags.settings {
            if token.is_cancelled() {
                return Err(BenchError::Interrupted);
            }
            let bare_first = round % 2 == 0;
            let result = drain_both(&flags, &url, &run_id, setting, round, bare_first).await?;
            print_drain(&result);
            results.push(result);
        }
    }
    if flags.rounds > 1 {
        print_medians(&results);
    }
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
    round: u32,
    bare_first: bool,
) -> Result<DrainResult, BenchError> {
    let replies = Replies::open(url).await?;
    let queue = |who: &str| format!("{run_id}.{}.{round}.{who}", setting.slug());
    let (bare_per_sec, (kv_per_sec, kv_seconds, rss_kib)) = if bare_first {
        let bare = bare_drain_timed(flags, url, &queue("bare"), setting, &replies).await?;
        (
            bare,
            kv_drain_timed(flags, url, &queue("kv"), setting, &replies).await?,
        )
    } else {
        let kv = kv_drain_timed(flags, url, &queue("kv"), setting, &replies).await?;
        (
            bare_drain_timed(flags, url, &queue("bare"), setting, &replies).await?,
            kv,
        )
    };
    replies.close().await;
    Ok(DrainResult {
        setting,
        round,
        bare_first,
        bare_per_sec,
        kv_per_sec,
        kv_seconds,
        rss_kib,
    })
}

/// Requests per second of the bare consumer.
async fn bare_drain_timed(
    flags: &BenchFlags,
    url: &str,
    queue: &str,
    setting: Setting,
    replies: &Replies,
) -> Result<f64, BenchError> {
    prefill(url, queue, flags.drain_messages, setting, &replies.queue).await?;
    settle().await;
    let started = Instant::now();
    bare_drain(url, queue, flags, setting, replies).await?;
    let seconds = started.elapsed().as_secs_f64();
    delete_queues(url, queue).await?;
    Ok(flags.drain_messages as f64 / seconds)
}

/// Requests per second of the server, the drain's seconds and its RSS samples (KiB).
async fn kv_drain_timed(
    flags: &BenchFlags,
    url: &str,
    queue: &str,
    setting: Setting,
    replies: &Replies,
) -> Result<(f64, f64, Vec<u64>), BenchError> {
    // The server drains the same requests plus one `get` at the end, whose reply says
    // everything before it was applied and acknowledged.
    prefill(url, queue, flags.drain_messages, setting, &replies.queue).await?;
    publish_marker(url, queue, &replies.queue).await?;
    settle().await;
    let mut server = Server::spawn(
        flags,
        url,
        queue,
        setting.durability(),
        setting.server_acks(),
    )
    .await?;
    let started = Instant::now();
    let expected = if setting.replies() {
        flags.drain_messages + 1
    } else {
        1
    };
    let rss_kib = replies.await_count(expected, server.pid).await?;
    let seconds = started.elapsed().as_secs_f64();
    server.stop().await;
    delete_queues(url, queue).await?;
    Ok((flags.drain_messages as f64 / seconds, seconds, rss_kib))
}

/// Lets the broker finish with a prefill (its queue process keeps writing for a while after
/// the last confirm) before the clock starts, so neither drain competes with it.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
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
        no_ack: !setting.bare_acks(),
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
        if let (true, Some(last)) = (setting.bare_acks(), batch.last()) {
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
        acks: &str,
    ) -> Result<Self, BenchError> {
        let bin = match &flags.server_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()
                .map_err(|err| BenchError::Server(format!("cannot find this executable: {err}")))?,
        };
        let data_dir = std::env::temp_dir().join(format!("{queue}.data"));
        let mut child = tokio::process::Command::new(&bin)
            .args(["kv", "serve", "--amqp-url", url, "--queue", queue])
            .args(["--durability", durability, "--acks", acks, "--prefetch"])
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

fn print_drain_header() {
    println!(
        "{:<46} {:>5} {:>10} {:>10} {:>8} {:>8} {:>14}",
        "setting", "round", "bare /s", "kv /s", "kv/bare", "kv s", "kv RSS MiB"
    );
}

/// RSS samples (KiB) as "first/max/last" MiB.
fn rss_summary(kib: &[u64]) -> String {
    let mib = |kib: Option<&u64>| kib.map_or(0.0, |kib| *kib as f64 / 1024.0);
    format!(
        "{:.0}/{:.0}/{:.0}",
        mib(kib.first()),
        mib(kib.iter().max()),
        mib(kib.last())
    )
}

fn print_drain(result: &DrainResult) {
    let first = if result.bare_first { "b" } else { "k" };
    println!(
        "{:<46} {:>4}{first} {:>10.0} {:>10.0} {:>7.0}% {:>8.2} {:>14}",
        result.setting.label(),
        result.round + 1,
        result.bare_per_sec,
        result.kv_per_sec,
        100.0 * result.kv_per_sec / result.bare_per_sec,
        result.kv_seconds,
        rss_summary(&result.rss_kib)
    );
}

/// Per setting: the median bare and kv rates, and the median of the rounds' ratios.
fn print_medians(results: &[DrainResult]) {
    println!();
    println!("medians over the rounds (RSS first/max/last: first/max/last of every round)");
    for setting in Setting::ALL {
        let rounds: Vec<&DrainResult> = results.iter().filter(|r| r.setting == setting).collect();
        if rounds.is_empty() {
            continue;
        }
        let pick =
            |value: fn(&DrainResult) -> f64| median(rounds.iter().map(|r| value(r)).collect());
        let rss: Vec<u64> = rounds
            .iter()
            .flat_map(|r| r.rss_kib.iter().copied())
            .collect();
        println!(
            "{:<46} {:>5} {:>10.0} {:>10.0} {:>7.0}% {:>8.2} {:>14}",
            setting.label(),
            "med",
            pick(|r| r.bare_per_sec),
            pick(|r| r.kv_per_sec),
            100.0 * pick(|r| r.kv_per_sec / r.bare_per_sec),
            pick(|r| r.kv_seconds),
            rss_summary(&rss)
        );
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }
}
