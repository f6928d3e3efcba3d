//! The wire contract of `weir kv serve`, spoken with lapin against the real RabbitMQ: replies
//! and correlation ids (private queues and direct reply-to), per-client order under many
//! concurrent clients, malformed requests dead-lettered while good ones flow, and one
//! consumer per queue.

mod kv_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kv_common::*;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use weir_kv::client::{ReplyQueue, Requester};

#[tokio::test]
async fn a_reply_carries_the_correlation_id_and_content_type() {
    let Some(url) = amqp_url().await else { return };
    let queue = TestQueue::new(&url, "reply");
    queue.declare().await;
    let _server = Server::start(&url, &queue.name, &["--durability", "none"]).await;

    let (_connection, channel) = channel(&url).await;
    let private = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let reply_queue = channel
        .queue_declare("".into(), private, FieldTable::default())
        .await
        .unwrap()
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
        .unwrap();
    for (id, body) in [
        (
            "first",
            r#"{"action": "add", "key": "A", "value": "a", "timestamp": 1700000000}"#,
        ),
        ("second", r#"{"action": "get", "key": "A"}"#),
    ] {
        let properties = BasicProperties::default()
            .with_reply_to(reply_queue.clone())
            .with_correlation_id(id.into());
        channel
            .basic_publish(
                "".into(),
                queue.name.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                properties,
            )
            .await
            .unwrap();
    }
    let mut answers = Vec::new();
    for _ in 0..2 {
        let reply = tokio::time::timeout(REPLY_TIMEOUT, replies.next())
            .await
            .expect("a reply in time")
            .unwrap()
            .unwrap();
        assert_eq!(
            reply.properties.content_type().as_ref().map(|t| t.as_str()),
            Some("application/json")
        );
        let id = reply
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .to_string();
        let body: serde_json::Value = serde_json::from_slice(&reply.data).unwrap();
        answers.push((id, body));
    }
    assert_eq!(
        answers[0],
        (
            "first".to_string(),
            serde_json::json!({"ok": true, "replaced": false})
        )
    );
    assert_eq!(
        answers[1],
        (
            "second".to_string(),
            serde_json::json!({"ok": true, "found": true, "key": "A", "value": "a"})
        )
    );
}

#[tokio::test]
async fn direct_reply_to_works() {
    let Some(url) = amqp_url().await else { return };
    let queue = TestQueue::new(&url, "direct");
    let _server = Server::start(&url, &queue.name, &["--durability", "none"]).await;

    let mut client = Requester::connect(&url, &queue.name, ReplyQueue::Direct)
        .await
        .unwrap();
    let added = client
        .call(
            br#"{"action": "add", "key": "B", "value": "b"}"#,
            REPLY_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&added).unwrap()["ok"],
        true
    );
    let all = client
        .call(br#"{"action": "getall"}"#, REPLY_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&all).unwrap(),
        serde_json::json!({"ok": true, "items": [{"key": "B", "value": "b"}], "next": null})
    );
    client.close().await;
}

/// Each client publishes its whole script without waiting, so a server that applied
/// requests in parallel (as the seed's five workers did) would reorder them.
#[tokio::test]
async fn many_concurrent_clients_each_keep_their_order() {
    let Some(url) = amqp_url().await else { return };
    let queue = TestQueue::new(&url, "order");
    queue.declare().await;
    let _server = Server::start(&url, &queue.name, &["--durability", "none"]).await;
    let (clients, steps) = (12, 300);
    let replied = Arc::new(AtomicUsize::new(0));
    let scripts = start_scripts(&url, &queue.name, clients, steps, &replied).await;
    for script in scripts {
        script.await.unwrap();
    }
    assert_eq!(replied.load(Ordering::Relaxed), clients * steps);
    assert_scripts_applied_once(&url, &queue.name, clients, steps).await;
}

#[tokio::test]
async fn malformed_requests_are_dead_lettered_with_a_reason_while_good_ones_flow() {
    let Some(url) = amqp_url().await else { return };
    let queue = TestQueue::new(&url, "dead");
    let _server = Server::start(&url, &queue.name, &["--durability", "none"]).await;
    let mut client = requester(&url, &queue.name).await;
    let bad: [&[u8]; 4] = [
        b"not json",
        br#"{"action": "drop", "key": "A"}"#,
        br#"{"action": "add", "key": "A"}"#,
        br#"{"action": "getall", "limit": 0}"#,
    ];
    for (n, body) in bad.iter().enumerate() {
        let reply = client.call(body, REPLY_TIMEOUT).await.unwrap();
        let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(reply["ok"], false, "{reply}");
        assert!(
            reply["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{reply}"
        );
        let good = format!(r#"{{"action": "add", "key": "k{n}", "value": "v"}}"#);
        let reply = client.call(good.as_bytes(), REPLY_TIMEOUT).await.unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&reply).unwrap()["ok"],
            true
        );
    }
    let keys: Vec<String> = get_all(&mut client)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["k0", "k1", "k2", "k3"]);

    let (_connection, channel) = channel(&url).await;
    for body in bad {
        let dead = channel
            .basic_get(queue.dead().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("a dead letter for each malformed request");
        assert_eq!(dead.delivery.data, body);
        let headers = dead.delivery.properties.headers().clone().expect("headers");
        let reason = headers.inner().get("x-weir-reason").expect("x-weir-reason");
        assert!(
            matches!(reason, AMQPValue::LongString(text) if !text.to_string().is_empty()),
            "{reason:?}"
        );
    }
    client.close().await;
}

/// A malformed request whose header is near the frame size: its dead-letter copy (with a
/// reason added) would be over it and close the connection, bringing the request back
/// forever. The copy drops that header and says so, and the queue goes on.
#[tokio::test]
async fn a_dead_letter_of_a_request_with_a_huge_header_drops_it_and_the_queue_goes_on() {
    let Some(url) = amqp_url().await else { return };
    let queue = TestQueue::new(&url, "hugeheader");
    queue.declare().await;
    let _server = Server::start(&url, &queue.name, &["--durability", "none"]).await;
    let (_connection, channel) = channel(&url).await;
    let mut headers = FieldTable::default();
    headers.insert(
        "huge".into(),
        AMQPValue::LongString("h".repeat(131_000).into()),
    );
    channel
        .basic_publish(
            "".into(),
            queue.name.as_str().into(),
            BasicPublishOptions::default(),
            b"not json",
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let mut client = requester(&url, &queue.name).await;
    let reply = client
        .call(
            br#"{"action": "add", "key": "after", "value": "v"}"#,
            REPLY_TIMEOUT,
        )
        .await
        .expect("answered after the malformed request");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&reply).unwrap()["ok"],
        true
    );
    let dead = channel
        .basic_get(queue.dead().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the dead letter");
    assert_eq!(dead.delivery.data, b"not json");
    let headers = dead.delivery.properties.headers().clone().expect("headers");
    let headers = headers.inner();
    assert!(!headers.contains_key("huge"));
    assert_eq!(
        headers.get("x-weir-dropped-headers"),
        Some(&AMQPValue::LongString("huge".into()))
    );
    assert!(headers.contains_key("x-weir-reason"));
    client.close().await;
}

#[tokio::test]
async fn a_second_server_on_the_same_queue_is_refused_and_takes_over_when_the_first_dies() {
    let Some(url) = amqp_url().await else { return };
    let queue = TestQueue::new(&url, "exclusive");
    let first_dir = tempfile::tempdir().unwrap();
    let second_dir = tempfile::tempdir().unwrap();
    let data_dir = |dir: &tempfile::TempDir| dir.path().to_str().unwrap().to_string();
    let mut first = Server::start(&url, &queue.name, &["--data-dir", &data_dir(&first_dir)]).await;
    let mut client = requester(&url, &queue.name).await;
    client
        .call(
            br#"{"action": "add", "key": "first", "value": "1"}"#,
            REPLY_TIMEOUT,
        )
        .await
        .unwrap();

    let mut second =
        Server::start_logging(&url, &queue.name, &["--data-dir", &data_dir(&second_dir)]).await;
    second.wait_for_log("kv lost the broker").await;
    assert!(
        second.server.is_running(),
        "the second server keeps retrying"
    );
    let (_connection, channel) = channel(&url).await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.name.as_str().into(), passive, FieldTable::default())
        .await
        .unwrap();
    assert_eq!(declared.consumer_count(), 1);
    // Still the first server's store answering.
    let all = get_all(&mut client).await;
    assert_eq!(all, [("first".to_string(), "1".to_string())]);

    first.kill9();
    // The second one gets the queue on a retry, with its own (empty) store.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let all = get_all(&mut client).await;
        if all.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second server never took over"
        );
    }
    client.close().await;
}

#[tokio::test]
async fn every_metric_is_served_at_zero_from_the_start_and_readyz_follows_the_broker() {
    let Some(url) = amqp_url().await else { return };
    let queue = TestQueue::new(&url, "metrics");
    let addr = free_addr();
    let _server = Server::start(
        &url,
        &queue.name,
        &["--durability", "none", "--metrics-addr", &addr],
    )
    .await;
    let (status, page) = http_get(&addr, "/metrics").expect("metrics answer");
    assert!(status.contains(" 200"), "{status}");
    for sample in [
        r#"weir_kv_requests_total{action="add",outcome="applied"} 0"#,
        r#"weir_kv_requests_total{action="malformed",outcome="malformed"} 0"#,
        r#"weir_kv_dead_letters_total{reason="invalid_json"} 0"#,
        r#"weir_kv_dead_letters_total{reason="bad_limit"} 0"#,
        "weir_kv_queue_depth 0",
        "weir_kv_reconnects_total 0",
        "weir_kv_consumer_pauses_total 0",
    ] {
        assert!(
            page.lines().any(|line| line == sample),
            "no {sample:?} in\n{page}"
        );
    }
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), page.as_bytes()).unwrap();
    assert!(
        promtool.wait().unwrap().success(),
        "promtool check metrics:\n{page}"
    );
    wait_for("ready", Duration::from_secs(30), || {
        http_get(&addr, "/readyz").is_ok_and(|(status, _)| status.contains(" 200"))
    })
    .await;
}

#[tokio::test]
async fn the_depth_probe_reads_the_messages_waiting_in_the_request_queue() {
    let Some(url) = amqp_url().await else { return };
    let queue = TestQueue::new(&url, "depth");
    queue.declare().await;
    let (_connection, channel) = channel(&url).await;
    let ready = weir_kv::server::ready_messages(&channel, &queue.name);
    assert_eq!(ready.await.unwrap(), 0);
    for n in 0..3 {
        let body = format!(r#"{{"action": "get", "key": "k{n}"}}"#);
        channel
            .basic_publish(
                "".into(),
                queue.name.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }
    wait_for_ready(&channel, &queue.name, 3).await;
    // A passive declare creates nothing: a queue that is not there is an error, not 0.
    let (_other, probe) = kv_common::channel(&url).await;
    let missing = format!("{}.missing", queue.name);
    assert!(weir_kv::server::ready_messages(&probe, &missing)
        .await
        .is_err());
}
