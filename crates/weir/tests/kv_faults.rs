//! Faults under load against the real RabbitMQ: `kill -9` of `weir kv serve` with a data
//! dir, and the server's broker connection cut (through a proxy, so no one else's
//! connection is touched). Clients publish whole scripts pipelined; afterwards every request
//! has been answered and each client's keys are exactly what its writes, applied once each
//! and in order, leave. A write applied twice shows in the order of the keys (see
//! `scripted_write`).

mod kv_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kv_common::*;

const CLIENTS: usize = 4;
const STEPS: usize = 4_000;
/// Enough writes for the journal to pass the smallest `snapshotAfterBytes` (1 MiB).
const KILL_STEPS: usize = 8_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_under_load_loses_nothing_acknowledged_and_applies_nothing_twice() {
    let Some(url) = amqp_url().await else { return };
    let queue = TestQueue::new(&url, "kill9");
    queue.declare().await;
    let data_dir = tempfile::tempdir().unwrap();
    let dir = data_dir.path().to_str().unwrap().to_string();
    // Outside the data dir, as a user would put it.
    let output_dir = tempfile::tempdir().unwrap();
    let output = output_dir.path().join("output.jsonl");
    let output_path = output.to_str().unwrap().to_string();
    // The smallest journal allowed, so snapshots are taken while the load runs.
    let config = output_dir.path().join("kv.json");
    std::fs::write(&config, r#"{"snapshotAfterBytes": 1048576}"#).unwrap();
    let config = config.to_str().unwrap().to_string();
    let args = [
        "--data-dir",
        &dir,
        "--output",
        &output_path,
        "--config",
        &config,
    ];
    let mut server = Server::start(&url, &queue.name, &args).await;
    let replied = Arc::new(AtomicUsize::new(0));
    let scripts = start_scripts(&url, &queue.name, CLIENTS, KILL_STEPS, &replied).await;

    for kill_at in [CLIENTS * KILL_STEPS / 4, CLIENTS * KILL_STEPS / 2] {
        wait_for("replies before the kill", Duration::from_secs(60), || {
            replied.load(Ordering::Relaxed) >= kill_at
        })
        .await;
        server.kill9();
        let _ = server.child.wait().await;
        server = Server::start(&url, &queue.name, &args).await;
    }
    for script in scripts {
        script.await.unwrap();
    }
    assert_scripts_applied_once(&url, &queue.name, CLIENTS, KILL_STEPS).await;
    assert!(
        data_dir.path().join("snapshot").exists(),
        "the load should have made the journal pass snapshotAfterBytes"
    );

    // And the restarted store is the same again from disk alone.
    server.kill9();
    let _ = server.child.wait().await;
    let _server = Server::start(&url, &queue.name, &args).await;
    assert_scripts_applied_once(&url, &queue.name, CLIENTS, KILL_STEPS).await;
    // The output file, reconciled with the journal at each start, lists every write once.
    assert_output_lists_each_write_once(&output, CLIENTS, KILL_STEPS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_broker_connection_under_load_loses_nothing_and_applies_nothing_twice() {
    let Some(url) = amqp_url().await else { return };
    let queue = TestQueue::new(&url, "cut");
    queue.declare().await;
    let proxy = Proxy::start(&url).await;
    let _server = Server::start(&proxy.url, &queue.name, &["--durability", "none"]).await;
    let replied = Arc::new(AtomicUsize::new(0));
    let scripts = start_scripts(&url, &queue.name, CLIENTS, STEPS, &replied).await;

    for cut_at in [CLIENTS * STEPS / 4, CLIENTS * STEPS / 2] {
        wait_for("replies before the cut", Duration::from_secs(60), || {
            replied.load(Ordering::Relaxed) >= cut_at
        })
        .await;
        proxy.cut();
    }
    for script in scripts {
        script.await.unwrap();
    }
    assert_scripts_applied_once(&url, &queue.name, CLIENTS, STEPS).await;
}

/// The issue's case, fire-and-forget with identical bodies and no properties: `remove X; add
/// X; 300 fillers` applied and acknowledged (the broker has the ack), `remove X; add END`
/// delivered but never applied when kv is killed. The redelivered `remove X` is not a copy
/// of the first one: it must be applied, so X is gone at the end and every write is in
/// `--output` once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_write_delivered_but_not_applied_before_a_kill_9_is_applied() {
    use lapin::options::BasicPublishOptions;
    let Some(url) = amqp_url().await else { return };
    let queue = TestQueue::new(&url, "identical");
    queue.declare().await;
    let data_dir = tempfile::tempdir().unwrap();
    let dir = data_dir.path().to_str().unwrap().to_string();
    let output_dir = tempfile::tempdir().unwrap();
    let output = output_dir.path().join("output.jsonl");
    let output_path = output.to_str().unwrap().to_string();
    let remove_x = br#"{"action":"remove","key":"X"}"#.to_vec();
    let add_x = br#"{"action":"add","key":"X","value":"x"}"#.to_vec();
    let filler = br#"{"action":"add","key":"F","value":"f"}"#.to_vec();
    let end = br#"{"action":"add","key":"END","value":"e"}"#.to_vec();
    let mut first = vec![remove_x.clone(), add_x];
    first.extend(std::iter::repeat_n(filler, 300));
    let (connection, publisher) = channel(&url).await;
    let publish = |bodies: Vec<Vec<u8>>| {
        let publisher = publisher.clone();
        let queue = queue.name.clone();
        async move {
            for body in bodies {
                publisher
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        lapin::BasicProperties::default(),
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("published");
            }
        }
    };
    publish(first).await;
    // The window is the first run exactly: the broker sends the rest only once it has the
    // ack of all of it.
    let proxy = Proxy::start(&url).await;
    let args = [
        "--data-dir",
        &dir,
        "--output",
        &output_path,
        "--prefetch",
        "302",
    ];
    let mut server = Server::start(&proxy.url, &queue.name, &args).await;
    let lines = || {
        std::fs::read_to_string(&output)
            .map(|text| text.lines().count())
            .unwrap_or(0)
    };
    wait_for(
        "the first 302 writes applied",
        Duration::from_secs(60),
        || lines() == 302,
    )
    .await;
    proxy.hold();
    publish(vec![remove_x, end]).await;
    // Delivered (so the broker had the ack of the first 302) and held in the proxy.
    wait_for_ready(&publisher, &queue.name, 0).await;
    server.kill9();
    let _ = server.child.wait().await;
    // The dead server's connection closes, and the broker puts the two back.
    drop(proxy);
    let _server = Server::start(&url, &queue.name, &args).await;
    let mut reader = requester(&url, &queue.name).await;
    let items = get_all(&mut reader).await;
    reader.close().await;
    assert_eq!(
        items,
        [
            ("F".to_string(), "f".to_string()),
            ("END".to_string(), "e".to_string())
        ],
        "the second remove X was applied"
    );
    assert_eq!(lines(), 304, "every write once in --output");
    let _ = connection.close(200, "done".into()).await;
}
