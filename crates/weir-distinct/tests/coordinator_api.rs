//! The coordinator's HTTP API over real connections, routing to workers started in this
//! process on port 0 (the coordinator spawns nothing here: `program` is `None`).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{count, flip_byte, items_json, leave_log, post_items, request, Worker};
use tokio::net::TcpListener;
use weir_distinct::config::{Database, DistinctConfig, RawConfig};
use weir_distinct::coordinator::{self, Coordinator, Settings};
use weir_runtime::Shutdown;

struct Cluster {
    addr: SocketAddr,
    coordinator: Arc<Coordinator>,
    shutdown: Shutdown,
    served: tokio::task::JoinHandle<Result<(), coordinator::CoordinatorError>>,
    workers: Vec<Option<Worker>>,
    _dir: tempfile::TempDir,
}

fn worker_config(dir: &std::path::Path, workers: Vec<String>) -> DistinctConfig {
    let mut config = RawConfig {
        workers,
        health_check: 0.2,
        ..RawConfig::default()
    }
    .validate("test")
    .expect("valid");
    config.database = Database::Sqlite(dir.to_path_buf());
    config
}

/// `live` workers on one store, plus `dead` addresses where nothing listens.
async fn cluster(live: usize, dead: usize, deadline: Duration) -> Cluster {
    cluster_in(tempfile::tempdir().unwrap(), live, dead, deadline).await
}

/// As [`cluster`], on a store already in `dir`.
async fn cluster_in(
    dir: tempfile::TempDir,
    live: usize,
    dead: usize,
    deadline: Duration,
) -> Cluster {
    let mut workers = Vec::new();
    let mut names = Vec::new();
    for _ in 0..live {
        let worker = Worker::start(worker_config(dir.path(), vec!["127.0.0.1:1".into()])).await;
        names.push(worker.addr.to_string());
        workers.push(Some(worker));
    }
    for _ in 0..dead {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        names.push(closed.local_addr().unwrap().to_string());
    }
    let mut settings = Settings::new(worker_config(dir.path(), names));
    settings.forward.deadline = deadline;
    let coordinator = Coordinator::start(settings).await.expect("starts");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let served = tokio::spawn(coordinator::serve(
        listener,
        coordinator.clone(),
        shutdown.clone(),
    ));
    let cluster = Cluster {
        addr,
        coordinator,
        shutdown,
        served,
        workers,
        _dir: dir,
    };
    cluster.wait_alive(live).await;
    cluster
}

impl Cluster {
    async fn health(&self) -> serde_json::Value {
        let reply = request(self.addr, "GET", "/", &[], b"").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json()
    }

    /// Waits until the coordinator sees exactly `n` workers alive.
    async fn wait_alive(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let health = self.health().await;
            if health["alive"].as_u64() == Some(n as u64) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never {n} alive: {health}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        self.shutdown.token.cancel();
        self.served.await.unwrap().unwrap();
        for worker in self.workers.iter_mut().filter_map(Option::take) {
            worker.stop().await;
        }
    }
}

/// Waits until `tenant`'s count is `want`: a worker counts an acknowledged item within
/// `worker_persist`. A count above `want` fails at once (counts never go down).
async fn settled(addr: SocketAddr, tenant: &str, want: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = count(addr, tenant).await;
        assert!(now <= want, "{tenant}: {now} > {want}");
        if now == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{tenant}: {now}, never {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pairs(tenants: usize, ids: usize) -> Vec<(String, String)> {
    (0..tenants)
        .flat_map(|t| (0..ids).map(move |i| (format!("tenant-{t}"), format!("item-{i}"))))
        .collect()
}

#[tokio::test]
async fn the_seed_sanity_scenario_counts_exactly() {
    let cluster = cluster(4, 0, Duration::from_secs(10)).await;
    let body = r#"[{"id":"1", "tenant": "t1"},
      {"id":"2", "tenant": "t2"},
      {"id":"2", "tenant": "t3"},
      {"id":"4", "tenant": "t1"}]"#;
    let reply = post_items(cluster.addr, body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json(), serde_json::json!({"accepted": 4}));
    assert_eq!(post_items(cluster.addr, body).await.status, 200);
    settled(cluster.addr, "t1", 2).await;
    settled(cluster.addr, "t2", 1).await;
    settled(cluster.addr, "t3", 1).await;
    settled(cluster.addr, "nobody", 0).await;
    // A tenant that needs escaping in a path reaches the worker intact.
    let odd = r#"[{"id":"1","tenant":"a b/c?d"}]"#;
    assert_eq!(post_items(cluster.addr, odd).await.status, 200);
    settled(cluster.addr, "a%20b%2Fc%3Fd", 1).await;
    // Each shard written is held by exactly one worker.
    let shards: HashSet<u16> = ["t1", "t2", "t3", "a b/c?d"]
        .iter()
        .map(|t| weir_distinct::shard::shard_of(t, weir_distinct::shard::SHARDS))
        .collect();
    let held: u64 = cluster.health().await["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["shards"].as_u64().unwrap())
        .sum();
    assert_eq!(held, shards.len() as u64);
    cluster.stop().await;
}

#[tokio::test]
async fn concurrent_duplicate_heavy_posts_count_each_pair_once() {
    let cluster = cluster(4, 0, Duration::from_secs(10)).await;
    let all = pairs(50, 40);
    let mut posts = Vec::new();
    for round in 0..16 {
        // Every request repeats a third of the others' items, and itself.
        let mut batch: Vec<(String, String)> =
            all.iter().skip(round * 50).take(400).cloned().collect();
        batch.extend(all.iter().step_by(3).take(100).cloned());
        batch.extend(batch.clone().into_iter().take(50));
        let body = items_json(&batch);
        let addr = cluster.addr;
        posts.push(tokio::spawn(async move { post_items(addr, &body).await }));
    }
    let mut expected = HashSet::new();
    for round in 0..16 {
        expected.extend(all.iter().skip(round * 50).take(400).cloned());
        expected.extend(all.iter().step_by(3).take(100).cloned());
    }
    for post in posts {
        let reply = post.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    for t in 0..50 {
        let tenant = format!("tenant-{t}");
        let want = expected.iter().filter(|(tt, _)| *tt == tenant).count() as u64;
        settled(cluster.addr, &tenant, want).await;
    }
    cluster.stop().await;
}

#[tokio::test]
async fn refused_bodies_are_answered_by_the_coordinator_and_forward_nothing() {
    let cluster = cluster(2, 0, Duration::from_secs(10)).await;
    let bad = r#"[{"id":"1","tenant":"r"},{"id":"","tenant":"r"}]"#;
    let reply = post_items(cluster.addr, bad).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["field"], "[1].id");
    let reply = request(
        cluster.addr,
        "POST",
        "/items",
        &[("Content-Type", "text/plain")],
        br#"[{"id":"1","tenant":"r"}]"#,
    )
    .await;
    assert_eq!(reply.status, 415);
    let one = r#"{"id":"1","tenant":"r"}"#;
    let many = format!("[{}]", vec![one; 10_001].join(","));
    let reply = post_items(cluster.addr, &many).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.json()["field"], "items");
    let reply = request(
        cluster.addr,
        "POST",
        "/items",
        &[
            ("Content-Type", "application/json"),
            ("Content-Length", "9000000"),
        ],
        b"",
    )
    .await;
    assert_eq!(reply.status, 413);
    let long = "x".repeat(257);
    let reply = request(
        cluster.addr,
        "GET",
        &format!("/items/{long}/count"),
        &[],
        b"",
    )
    .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["field"], "tenant");
    settled(cluster.addr, "r", 0).await;
    let metrics = request(cluster.addr, "GET", "/metrics", &[], b"")
        .await
        .body;
    for reason in ["invalid", "media_type", "too_many_items", "too_large"] {
        let line = format!("weir_distinct_coordinator_rejected_total{{reason=\"{reason}\"}} ");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&line) && !l.ends_with(" 0")),
            "{reason} not counted:\n{metrics}"
        );
    }
    cluster.stop().await;
}

#[tokio::test]
async fn with_no_worker_alive_a_post_is_a_503_with_retry_after_and_not_ready() {
    let cluster = cluster(0, 2, Duration::from_millis(300)).await;
    let reply = post_items(cluster.addr, r#"[{"id":"1","tenant":"t"}]"#).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert!(reply.json()["error"].as_str().unwrap().contains("safe"));
    let metrics = request(cluster.addr, "GET", "/metrics", &[], b"")
        .await
        .body;
    let unavailable = r#"weir_distinct_coordinator_rejected_total{reason="unavailable"} "#;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(unavailable) && !l.ends_with(" 0")),
        "the 503 is not counted:\n{metrics}"
    );
    let reply = request(cluster.addr, "GET", "/items/t/count", &[], b"").await;
    assert_eq!(reply.status, 503);
    let ready = request(cluster.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 503);
    let ready = ready.json();
    assert_eq!(ready["ready"], false);
    assert_eq!(ready["failures"].as_array().unwrap().len(), 2);
    let health = cluster.health().await;
    let workers = health["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    assert!(workers
        .iter()
        .all(|w| w["alive"] == false && w["error"].is_string()));
    cluster.stop().await;
}

#[tokio::test]
async fn a_worker_that_stops_is_routed_around_and_counts_stay_exact() {
    let mut cluster = cluster(3, 0, Duration::from_secs(10)).await;
    let all = pairs(64, 20);
    let (first, second) = all.split_at(all.len() / 2);
    for chunk in first.chunks(100) {
        assert_eq!(
            post_items(cluster.addr, &items_json(chunk)).await.status,
            200
        );
    }
    // Its shards' locks go with it; the coordinator finds out by a refused connection or
    // its next health check, and sends those shards to their next choice.
    cluster.workers[1].take().unwrap().stop().await;
    for chunk in second.chunks(100).chain(first.chunks(100)) {
        let reply = post_items(cluster.addr, &items_json(chunk)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    cluster.wait_alive(2).await;
    for t in 0..64 {
        settled(cluster.addr, &format!("tenant-{t}"), 20).await;
    }
    let health = cluster.health().await;
    assert_eq!(health["workers"].as_array().unwrap().len(), 3);
    assert_eq!(
        cluster
            .coordinator
            .pool
            .table()
            .workers
            .iter()
            .filter(|w| w.is_alive())
            .count(),
        2
    );
    cluster.stop().await;
}

#[tokio::test]
async fn every_documented_route_answers_a_documented_status() {
    let cluster = cluster(1, 0, Duration::from_secs(10)).await;
    let reply = request(cluster.addr, "GET", "/openapi.json", &[], b"").await;
    assert_eq!(reply.status, 200);
    let document = reply.json();
    let paths = document["paths"].as_object().unwrap();
    assert!(paths.len() >= 7);
    for (path, methods) in paths {
        for (method, operation) in methods.as_object().unwrap() {
            let concrete = path.replace("{tenant}", "t1");
            let (headers, body): (&[(&str, &str)], &[u8]) = if method == "post" {
                (
                    &[("Content-Type", "application/json")],
                    br#"[{"id":"1","tenant":"t1"}]"#,
                )
            } else {
                (&[], b"")
            };
            let reply = request(
                cluster.addr,
                &method.to_uppercase(),
                &concrete,
                headers,
                body,
            )
            .await;
            let documented = operation["responses"].as_object().unwrap();
            assert!(
                documented.contains_key(&reply.status.to_string()),
                "{method} {path} answered {} (documented: {:?})",
                reply.status,
                documented.keys().collect::<Vec<_>>()
            );
        }
    }
    cluster.stop().await;
}

#[tokio::test]
async fn every_metric_exists_at_start_with_help_text() {
    let cluster = cluster(1, 0, Duration::from_secs(10)).await;
    let page = request(cluster.addr, "GET", "/metrics", &[], b"")
        .await
        .body;
    for name in [
        "weir_distinct_coordinator_items_received_total",
        "weir_distinct_coordinator_items_accepted_total",
        "weir_distinct_coordinator_requests_total",
        "weir_distinct_coordinator_rejected_total",
        "weir_distinct_coordinator_forward_retries_total",
        "weir_distinct_coordinator_workers_alive",
        "weir_distinct_coordinator_worker_restarts_total",
        "weir_distinct_coordinator_request_duration_seconds",
    ] {
        assert!(
            page.contains(&format!("# HELP {name} ")),
            "{name} has no help:\n{page}"
        );
    }
    assert!(
        page.contains("weir_distinct_coordinator_workers_alive 1"),
        "{page}"
    );
    cluster.stop().await;
}

#[tokio::test]
async fn a_shard_held_by_another_worker_is_found_and_remembered() {
    use weir_distinct::coordinator::routing::preference;
    use weir_distinct::shard::{shard_of, SHARDS};
    let cluster = cluster(2, 0, Duration::from_secs(10)).await;
    let names: Vec<String> = cluster
        .coordinator
        .pool
        .table()
        .workers
        .iter()
        .map(|w| w.name.clone())
        .collect();
    let first_choice = |tenant: &str| preference(shard_of(tenant, SHARDS), &names)[0];
    // Tenants whose shards prefer the first worker, one of which the second takes first.
    let tenants: Vec<String> = (0..)
        .map(|i| format!("held-{i}"))
        .filter(|t| first_choice(t) == 0)
        .take(5)
        .collect();
    let second = cluster.workers[1].as_ref().unwrap().addr;
    let direct = items_json(&[(tenants[0].clone(), "0".into())]);
    assert_eq!(post_items(second, &direct).await.status, 200);
    let retries = |page: &str| -> u64 {
        page.lines()
            .find(|l| l.starts_with("weir_distinct_coordinator_forward_retries_total "))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let before = retries(
        &request(cluster.addr, "GET", "/metrics", &[], b"")
            .await
            .body,
    );
    let batch: Vec<(String, String)> = tenants
        .iter()
        .flat_map(|t| (0..3).map(move |i| (t.clone(), i.to_string())))
        .collect();
    let reply = post_items(cluster.addr, &items_json(&batch)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let after = retries(
        &request(cluster.addr, "GET", "/metrics", &[], b"")
            .await
            .body,
    );
    assert!(after > before, "the busy shard was not retried elsewhere");
    // Now known to live on the second worker: sent there first, no retry.
    let more = items_json(&[(tenants[0].clone(), "9".into())]);
    assert_eq!(post_items(cluster.addr, &more).await.status, 200);
    let last = retries(
        &request(cluster.addr, "GET", "/metrics", &[], b"")
            .await
            .body,
    );
    assert_eq!(last, after);
    settled(cluster.addr, &tenants[0], 4).await;
    for tenant in &tenants[1..] {
        settled(cluster.addr, tenant, 3).await;
    }
    cluster.stop().await;
}

#[tokio::test]
async fn a_damaged_shard_is_shown_fails_readiness_and_is_answered_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = leave_log(dir.path(), "hurt", &[&["1"], &["2"]]);
    flip_byte(&path, 8 + 8 + 3);
    let shard = weir_distinct::shard::shard_of("hurt", weir_distinct::shard::SHARDS);
    // Were a damaged shard retried on other workers until the deadline, this test would
    // hang past the runner's limit: each answer below must come at once.
    let cluster = cluster_in(dir, 2, 0, Duration::from_secs(600)).await;

    let health = cluster.health().await;
    assert_eq!(health["damaged"][0]["shard"], shard, "{health}");
    assert_eq!(health["damaged"][0]["offset"], 8, "{health}");
    let ready = request(cluster.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(ready.json()["damaged"][0]["shard"], shard);

    let read = request(cluster.addr, "GET", "/items/hurt/count", &[], b"").await;
    assert_eq!(read.status, 503, "{}", read.body);
    let error = read.json()["error"].as_str().unwrap().to_string();
    assert!(
        error.contains(&format!("shard {shard} is damaged")) && error.contains("at byte 8"),
        "{error}"
    );
    let pairs = vec![("hurt".to_string(), "3".to_string())];
    let write = post_items(cluster.addr, &items_json(&pairs)).await;
    assert_eq!(write.status, 503, "{}", write.body);
    assert!(
        write.json()["error"]
            .as_str()
            .unwrap()
            .contains(&format!("shard {shard} is damaged")),
        "{}",
        write.body
    );
    cluster.stop().await;
}

#[tokio::test]
async fn a_reload_that_moves_the_database_is_refused_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let worker = Worker::start(worker_config(dir.path(), vec!["127.0.0.1:1".into()])).await;
    let names = vec![worker.addr.to_string()];
    let moved = worker_config(elsewhere.path(), names.clone());
    let mut settings = Settings::new(worker_config(dir.path(), names));
    settings.loader = Some(Arc::new(move || Ok(moved.clone())));
    let coordinator = Coordinator::start(settings).await.expect("starts");

    coordinator.reload().await;
    let error = coordinator.reload_error().expect("refused");
    assert!(error.starts_with("database: changed from"), "{error}");
    assert_eq!(
        coordinator.config().database,
        Database::Sqlite(dir.path().to_path_buf()),
        "the running config was replaced"
    );
    coordinator.stop_all().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_tenant_that_is_not_utf8_is_a_json_400() {
    let cluster = cluster(1, 0, Duration::from_secs(10)).await;
    let reply = request(cluster.addr, "GET", "/items/%FF/count", &[], b"").await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.json()["field"], "tenant", "{}", reply.body);
    cluster.stop().await;
}
