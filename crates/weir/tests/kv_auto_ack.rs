//! `weir kv serve --acks auto` against the real RabbitMQ: the broker forgets each request
//! when it sends it, so kv must keep the queue's order while it pauses and resumes its
//! consumer to bound what it holds, and must apply everything it was sent before it stops.

mod kv_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kv_common::*;
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;

/// Requests waiting in the queue before kv starts, in the shutdown and cut tests.
const BACKLOG: usize = 50_000;

/// Scripts published before the server starts: a backlog the broker pushes at once, far
/// more than a window of two, so kv has to pause its consumer again and again.
#[tokio::test]
async fn auto_acks_keep_each_clients_order_across_consumer_pauses() {
    let Some(url) = amqp_url().await else { return };
    let queue = TestQueue::new(&url, "auto_order");
    queue.declare().await;
    let (clients, steps) = (4, 400);
    let replied = Arc::new(AtomicUsize::new(0));
    let scripts = start_scripts(&url, &queue.name, clients, steps, &replied).await;
    let (_connection, channel) = channel(&url).await;
    wait_for_ready(&channel, &queue.name, clients * steps).await;
    let metrics_addr = free_addr();
    let _server = Server::start(
        &url,
        &queue.name,
        &[
            "--durability",
            "none",
            "--acks",
            "auto",
            "--prefetch",
            "1",
            "--metrics-addr",
            &metrics_addr,
        ],
    )
    .await;
    for script in scripts {
        script.await.unwrap();
    }
    assert_eq!(replied.load(Ordering::Relaxed), clients * steps);
    assert_scripts_applied_once(&url, &queue.name, clients, steps).await;
    let (_, page) = http_get(&metrics_addr, "/metrics").expect("metrics answer");
    let pauses = page
        .lines()
        .find_map(|line| line.strip_prefix("weir_kv_consumer_pauses_total "))
        .and_then(|count| count.parse::<u64>().ok())
        .expect("the pause counter is served");
    assert!(pauses > 0, "a backlog of 1,600 never filled a window of 2");
}

/// SIGTERM while a backlog is being drained: every request that left the queue is applied
/// (it is in `--output`, in queue order), and every other one is still in the queue.
#[tokio::test]
async fn a_shutdown_with_auto_acks_applies_every_request_the_broker_sent() {
    let Some(url) = amqp_url().await else { return };
    let backlog = Backlog::prefill(&url, "auto_stop", BACKLOG).await;
    let (queue, channel, output) = (&backlog.queue, &backlog.channel, &backlog.output);
    let mut server = start_draining(&url, &queue.name, output).await;
    server.signal(libc::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .expect("the server stopped")
        .unwrap();
    assert!(status.success(), "{status}");

    let keys = applied_keys(output);
    let expected: Vec<String> = (0..keys.len()).map(|n| format!("k{n}")).collect();
    assert_eq!(keys, expected, "applied out of queue order");
    let left = weir_kv::server::ready_messages(channel, &queue.name)
        .await
        .unwrap() as usize;
    assert_eq!(
        keys.len() + left,
        BACKLOG,
        "{} applied and {left} left in the queue: requests were lost",
        keys.len()
    );
    assert!(left > 0, "the whole backlog was drained before the signal");
}

/// The broker connection cut while a backlog drains: what was on the wire or waiting in kv
/// may be lost (the broker forgot it when it sent it), but kv reconnects and drains the rest,
/// and what it applied is in queue order, each request once.
#[tokio::test]
async fn a_cut_connection_with_auto_acks_keeps_order_and_drains_the_rest() {
    let Some(url) = amqp_url().await else { return };
    let backlog = Backlog::prefill(&url, "auto_cut", BACKLOG).await;
    let (queue, channel, output) = (&backlog.queue, &backlog.channel, &backlog.output);
    let proxy = Proxy::start(&url).await;
    let _server = start_draining(&proxy.url, &queue.name, output).await;
    proxy.cut();
    let left_at_cut = weir_kv::server::ready_messages(channel, &queue.name)
        .await
        .unwrap();
    assert!(
        left_at_cut > 0,
        "the whole backlog was drained before the cut"
    );
    // kv came back and drained the rest.
    wait_for_ready(channel, &queue.name, 0).await;
    let mut client = requester(&url, &queue.name).await;
    let reply = client
        .call(br#"{"action": "get", "key": "missing"}"#, REPLY_TIMEOUT)
        .await
        .expect("kv answers after the cut");
    assert!(String::from_utf8_lossy(&reply).contains(r#""found":false"#));
    client.close().await;

    let numbers: Vec<usize> = applied_keys(output)
        .iter()
        .map(|key| key[1..].parse().unwrap())
        .collect();
    assert!(
        numbers.windows(2).all(|pair| pair[0] < pair[1]),
        "applied out of order or twice"
    );
    assert!(numbers.last().is_some_and(|&last| last < BACKLOG));
    eprintln!(
        "{} of {BACKLOG} applied; {} lost in flight at the cut",
        numbers.len(),
        BACKLOG - numbers.len()
    );
}

/// `weir kv serve --acks auto` writing `--output`, once it has applied its first requests.
async fn start_draining(url: &str, queue: &str, output: &std::path::Path) -> Server {
    let output_arg = output.to_str().unwrap();
    let server = Server::start(
        url,
        queue,
        &[
            "--durability",
            "none",
            "--acks",
            "auto",
            "--prefetch",
            "100",
            "--output",
            output_arg,
        ],
    )
    .await;
    wait_for("the first writes", Duration::from_secs(30), || {
        std::fs::metadata(output).is_ok_and(|meta| meta.len() > 0)
    })
    .await;
    server
}

/// A queue holding fire-and-forget adds of keys k0, k1, ..., and where `--output` goes.
struct Backlog {
    queue: TestQueue,
    channel: lapin::Channel,
    output: std::path::PathBuf,
    _connection: lapin::Connection,
    _dir: tempfile::TempDir,
}

impl Backlog {
    async fn prefill(url: &str, test: &str, count: usize) -> Backlog {
        let queue = TestQueue::new(url, test);
        queue.declare().await;
        let (connection, channel) = channel(url).await;
        prefill_adds(&channel, &queue.name, count).await;
        let dir = tempfile::tempdir().unwrap();
        Backlog {
            output: dir.path().join("applied.jsonl"),
            queue,
            channel,
            _connection: connection,
            _dir: dir,
        }
    }
}

/// `count` fire-and-forget adds of keys k0, k1, ..., all in the queue before it returns.
async fn prefill_adds(channel: &lapin::Channel, queue: &str, count: usize) {
    for n in 0..count {
        let body = format!(r#"{{"action": "add", "key": "k{n}", "value": "v"}}"#);
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }
    wait_for_ready(channel, queue, count).await;
}

/// The keys of the writes in an `--output` file, in the order applied.
fn applied_keys(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let write: serde_json::Value = serde_json::from_str(line).unwrap();
            write["key"].as_str().unwrap().to_string()
        })
        .collect()
}
