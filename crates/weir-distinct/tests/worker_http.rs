//! The worker's HTTP API over real connections.

mod common;

use std::collections::{HashMap, HashSet};

use common::{config, count, flip_byte, items_json, leave_log, post_items, request, Worker};
use weir_distinct::shard::shard_of;
use weir_distinct::store::StoreOptions;

fn pair(tenant: &str, id: &str) -> (String, String) {
    (tenant.to_string(), id.to_string())
}

#[tokio::test]
async fn posted_items_are_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let worker = Worker::start(config(dir.path())).await;
    let body = items_json(&[
        pair("t1", "1"),
        pair("t2", "2"),
        pair("t3", "2"),
        pair("t1", "4"),
    ]);
    let reply = post_items(worker.addr, &body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json(), serde_json::json!({"accepted": 4}));
    assert_eq!(post_items(worker.addr, &body).await.status, 200);
    assert_eq!(count(worker.addr, "t1").await, 2);
    assert_eq!(count(worker.addr, "t2").await, 1);
    assert_eq!(count(worker.addr, "nobody").await, 0);
    worker.stop().await;
}

#[tokio::test]
async fn refused_bodies_say_why_and_count_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let worker = Worker::start(config(dir.path())).await;
    // The first item is valid: a refusal must not store it.
    let bad = r#"[{"id":"1","tenant":"r"},{"id":"","tenant":"r"}]"#;
    let reply = post_items(worker.addr, bad).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["field"], "[1].id");

    let reply = request(
        worker.addr,
        "POST",
        "/items",
        &[("Content-Type", "text/plain")],
        b"[]",
    )
    .await;
    assert_eq!(reply.status, 415);
    assert!(reply.json()["error"].is_string());

    let one = r#"{"id":"1","tenant":"r"}"#;
    let many = format!("[{}]", vec![one; 10_001].join(","));
    let reply = post_items(worker.addr, &many).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.json()["field"], "items");

    let huge = vec![b' '; 9 * 1024 * 1024];
    let reply = request(
        worker.addr,
        "POST",
        "/items",
        &[("Content-Type", "application/json")],
        &huge,
    )
    .await;
    assert_eq!(reply.status, 413);

    let long = "x".repeat(257);
    let reply = request(
        worker.addr,
        "GET",
        &format!("/items/{long}/count"),
        &[],
        b"",
    )
    .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["field"], "tenant");

    assert_eq!(count(worker.addr, "r").await, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_overlapping_posts_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let worker = Worker::start(config(dir.path())).await;
    let mut expected: HashMap<String, HashSet<String>> = HashMap::new();
    let mut tasks = Vec::new();
    for client in 0..8 {
        let mut bodies = Vec::new();
        for batch in 0..10 {
            let pairs: Vec<(String, String)> = (0..100)
                .map(|n| {
                    let tenant = format!("c{}", (client * 7 + batch * 3 + n) % 11);
                    let id = format!("{}", (n * 13 + batch) % 97);
                    (tenant, id)
                })
                .collect();
            for (tenant, id) in &pairs {
                expected
                    .entry(tenant.clone())
                    .or_default()
                    .insert(id.clone());
            }
            bodies.push(items_json(&pairs));
        }
        let addr = worker.addr;
        tasks.push(tokio::spawn(async move {
            for body in bodies {
                let reply = post_items(addr, &body).await;
                assert_eq!(reply.status, 200, "{}", reply.body);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    for (tenant, ids) in &expected {
        assert_eq!(
            count(worker.addr, tenant).await,
            ids.len() as u64,
            "{tenant}"
        );
    }
    worker.stop().await;
}

#[tokio::test]
async fn a_shard_owned_by_another_worker_is_a_503_to_retry_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let owner = Worker::start(config(dir.path())).await;
    let other = Worker::start(config(dir.path())).await;
    let body = items_json(&[pair("owned", "1")]);
    assert_eq!(post_items(owner.addr, &body).await.status, 200);

    let reply = post_items(other.addr, &items_json(&[pair("owned", "2")])).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.header("retry-after"), Some("1"));
    // Any worker reads any shard.
    assert_eq!(count(other.addr, "owned").await, 1);

    owner.stop().await;
    let reply = post_items(other.addr, &items_json(&[pair("owned", "2")])).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(count(other.addr, "owned").await, 2);
    other.stop().await;
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let dir = tempfile::tempdir().unwrap();
    let worker = Worker::start(config(dir.path())).await;
    assert_eq!(
        request(worker.addr, "GET", "/healthz", &[], b"")
            .await
            .status,
        200
    );
    assert_eq!(
        request(worker.addr, "GET", "/readyz", &[], b"")
            .await
            .status,
        200
    );
    worker.stop().await;
}

/// Every status series exists from the start (other tests in this process share the
/// global recorder, so only presence is checked, not values).
#[tokio::test]
async fn metrics_count_requests_by_status_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let worker = Worker::start(config(dir.path())).await;
    assert_eq!(post_items(worker.addr, "[").await.status, 400);
    let metrics = request(worker.addr, "GET", "/metrics", &[], b"").await.body;
    for status in [200, 400, 413, 415, 503] {
        let series = format!(r#"weir_distinct_requests_total{{status="{status}"}}"#);
        assert!(metrics.contains(&series), "{series} missing from {metrics}");
    }
    for series in [
        "weir_distinct_items_accepted_total",
        "weir_distinct_items_folded_total",
        r#"weir_distinct_folds_total{status="error"}"#,
        "weir_distinct_pending_bytes",
        "# HELP weir_distinct_requests_total",
    ] {
        assert!(metrics.contains(series), "{series} missing from {metrics}");
    }
    worker.stop().await;
}

#[tokio::test]
async fn with_worker_persist_items_show_in_the_count_within_it() {
    let dir = tempfile::tempdir().unwrap();
    let persist = std::time::Duration::from_millis(200);
    let worker = Worker::start(common::config_persist(dir.path(), persist)).await;
    let pairs: Vec<_> = (0..50)
        .map(|n| pair("slow", &(n % 20).to_string()))
        .collect();
    assert_eq!(
        post_items(worker.addr, &items_json(&pairs)).await.status,
        200
    );
    // Generous against a loaded machine; the point is that it arrives, exactly.
    let counted =
        common::count_within(worker.addr, "slow", 20, std::time::Duration::from_secs(10)).await;
    assert_eq!(counted, 20);
    worker.stop().await;
}

/// The value of `series` (name and labels as written) on the worker's /metrics page.
async fn metric(addr: std::net::SocketAddr, series: &str) -> f64 {
    let page = request(addr, "GET", "/metrics", &[], b"").await.body;
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
        .parse()
        .unwrap()
}

/// Under cargo test other tests share the recorder, so counts are compared as at least.
#[tokio::test]
async fn the_fold_lag_shows_how_long_items_wait_and_refusals_are_counted_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    // Items wait about 1 s (half of worker_persist) before a fold counts them.
    let persist = std::time::Duration::from_secs(2);
    let worker = Worker::start(common::config_persist(dir.path(), persist)).await;
    let a = worker.addr;
    let body = items_json(&[pair("lag", "1"), pair("lag", "2")]);
    assert_eq!(post_items(a, &body).await.status, 200);
    let started = std::time::Instant::now();
    let mut waited = 0.0;
    while waited < 0.3 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the fold lag never grew"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        waited = metric(a, "weir_distinct_fold_lag_seconds").await;
    }
    // Folded and counted: nothing waits any more.
    assert_eq!(
        common::count_within(a, "lag", 2, std::time::Duration::from_secs(10)).await,
        2
    );
    let started = std::time::Instant::now();
    while metric(a, "weir_distinct_fold_lag_seconds").await > 0.0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the fold lag stayed up after the fold"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(metric(a, "weir_distinct_items_received_total").await >= 2.0);
    assert_eq!(post_items(a, "[").await.status, 400);
    let plain = request(
        a,
        "POST",
        "/items",
        &[("Content-Type", "text/plain")],
        b"[]",
    )
    .await;
    assert_eq!(plain.status, 415);
    for reason in ["invalid", "media_type"] {
        let series = format!("weir_distinct_rejected_total{{reason=\"{reason}\"}}");
        assert!(metric(a, &series).await >= 1.0, "{series}");
    }
    let timed = r#"weir_distinct_request_duration_seconds_count{route="items"}"#;
    assert!(metric(a, timed).await >= 3.0);
    worker.stop().await;
}

/// Polls `path` until it answers `status`.
async fn wait_status(addr: std::net::SocketAddr, path: &str, status: u16) -> common::Reply {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let reply = request(addr, "GET", path, &[], b"").await;
        if reply.status == status {
            return reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never {status}: {reply:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_damaged_shard_answers_503_for_counts_and_writes_until_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = leave_log(dir.path(), "hurt", &[&["1"], &["2"]]);
    flip_byte(&path, 8 + 8 + 3);
    let shard = shard_of("hurt", StoreOptions::default().shards);
    let worker = Worker::start(config(dir.path())).await;

    let read = request(worker.addr, "GET", "/items/hurt/count", &[], b"").await;
    assert_eq!(read.status, 503, "{}", read.body);
    assert_eq!(
        read.header("weir-damaged-shard"),
        Some(shard.to_string().as_str())
    );
    let error = read.json()["error"].as_str().unwrap().to_string();
    assert!(
        error.contains(&format!("shard {shard} is damaged")) && error.contains("log-0 at byte 8"),
        "{error}"
    );
    let write = post_items(worker.addr, &items_json(&[pair("hurt", "3")])).await;
    assert_eq!(write.status, 503, "{}", write.body);
    assert_eq!(write.json()["error"].as_str(), Some(error.as_str()));
    // The other shards are not held up by it.
    let other = (0..)
        .map(|n| format!("fine{n}"))
        .find(|t| shard_of(t, StoreOptions::default().shards) != shard)
        .unwrap();
    let fine = post_items(worker.addr, &items_json(&[pair(&other, "1")])).await;
    assert_eq!(fine.status, 200, "{}", fine.body);

    let ready = request(worker.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(ready.json()["damaged"][0]["shard"], shard);
    assert_eq!(ready.json()["damaged"][0]["offset"], 8);
    let health = request(worker.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["damaged"][0]["shard"], shard);
    assert_eq!(
        metric(worker.addr, "weir_distinct_damaged_shards").await,
        1.0
    );

    let done = weir_distinct::store::repair::repair(dir.path(), 64, None).unwrap();
    assert_eq!(
        done.len(),
        2,
        "the damaged shard and the written one: {done:?}"
    );
    wait_status(worker.addr, "/readyz", 200).await;
    // The damaged record held item 1; item 2 was intact and is counted.
    assert_eq!(count(worker.addr, "hurt").await, 1);
    let write = post_items(worker.addr, &items_json(&[pair("hurt", "3")])).await;
    assert_eq!(write.status, 200, "{}", write.body);
    assert_eq!(count(worker.addr, "hurt").await, 2);
    worker.stop().await;
}

#[tokio::test]
async fn a_tenant_that_is_not_utf8_is_a_json_400() {
    let dir = tempfile::tempdir().unwrap();
    let worker = Worker::start(config(dir.path())).await;
    let reply = request(worker.addr, "GET", "/items/%FF/count", &[], b"").await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.json()["field"], "tenant", "{}", reply.body);
    worker.stop().await;
}
