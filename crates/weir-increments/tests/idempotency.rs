//! `Idempotency-Key` over real HTTP: a repeat is 202 and adds nothing, another body under the
//! same key is 422, a repeat racing its first is 409 or a replay; across a restart of the
//! embedded server, and across two `api` processes sharing Redis and Postgres.

mod common;

use common::*;
use weir_increments::Role;

const KEY: &str = "4f7d3a2c-1b6e-4c8a-9e2f-7d5b3c1a9e8f";

async fn post_keyed(addr: std::net::SocketAddr, idempotency_key: &str, value: i64) -> Reply {
    let body = format!(r#"{{"key": "{KEY}", "value": {value}}}"#);
    request(
        addr,
        "POST",
        "/increment",
        &[JSON, ("Idempotency-Key", idempotency_key)],
        body.as_bytes(),
    )
    .await
}

#[tokio::test]
async fn a_repeat_is_replayed_another_body_is_422_and_a_restart_remembers_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(base_config(dir.path()), Role::Serve).await;
    let first = post_keyed(server.addr, "order-1", 5).await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(first.header("idempotent-replayed"), None);
    let again = post_keyed(server.addr, "\"order-1\"", 5).await;
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let other = post_keyed(server.addr, "order-1", 6).await;
    assert_eq!(other.status, 422, "{}", other.body);
    assert_eq!(other.json()["field"], "Idempotency-Key");
    let bad = post_keyed(server.addr, "", 5).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    // Unkeyed requests are unaffected and count every time.
    assert_eq!(post_increment(server.addr, KEY, 1).await.status, 202);
    assert_eq!(post_keyed(server.addr, "order-2", 10).await.status, 202);
    wait_for_total(server.addr, KEY, 16).await;
    server.stop().await;

    let server = start(base_config(dir.path()), Role::Serve).await;
    let after = post_keyed(server.addr, "order-1", 5).await;
    assert_eq!(after.status, 202, "{}", after.body);
    assert_eq!(after.header("idempotent-replayed"), Some("true"));
    assert_eq!(post_keyed(server.addr, "order-1", 7).await.status, 422);
    assert_eq!(post_increment(server.addr, KEY, 1).await.status, 202);
    wait_for_total(server.addr, KEY, 17).await;
    let metrics = request(server.addr, "GET", "/metrics", &[], b"").await;
    assert!(
        metrics
            .body
            .contains("weir_increments_idempotent_replays_total 2"),
        "{}",
        metrics.body
    );
    server.stop().await;
}

#[tokio::test]
async fn two_api_keys_with_the_same_crc32c_do_not_share_idempotency_keys() {
    // Two keys an operator could hand to two tenants, with one CRC-32C (0x23e73430).
    let tenants = ["tenant-1371838", "tenant-2000402"];
    let dir = tempfile::tempdir().unwrap();
    let config = weir_increments::config::IncrementsConfig {
        api_keys: tenants.iter().map(|t| t.to_string()).collect(),
        ..base_config(dir.path())
    };
    let server = start(config, Role::Serve).await;
    for (tenant, value) in tenants.iter().zip([10, 5]) {
        let bearer = format!("Bearer {tenant}");
        let body = format!(r#"{{"key": "{KEY}", "value": {value}}}"#);
        let reply = request(
            server.addr,
            "POST",
            "/increment",
            &[
                JSON,
                ("Authorization", &bearer),
                ("Idempotency-Key", "order-1"),
            ],
            body.as_bytes(),
        )
        .await;
        // The second tenant's request is its own, not a different body under the first's key.
        assert_eq!(reply.status, 202, "{tenant}: {}", reply.body);
        assert_eq!(reply.header("idempotent-replayed"), None, "{tenant}");
    }
    let bearer = format!("Bearer {}", tenants[0]);
    eventually(|| async {
        let reply = request(
            server.addr,
            "GET",
            &format!("/counts/{KEY}"),
            &[("Authorization", &bearer)],
            b"",
        )
        .await;
        match reply.json()["total"].as_i64() {
            Some(15) => Ok(()),
            _ => Err(format!("both tenants' increments: {}", reply.body)),
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn concurrent_repeats_of_one_key_count_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(base_config(dir.path()), Role::Serve).await;
    let attempts: Vec<_> = (0..32)
        .map(|_| tokio::spawn(post_keyed(server.addr, "burst", 3)))
        .collect();
    let mut statuses = Vec::new();
    for attempt in attempts {
        statuses.push(attempt.await.unwrap().status);
    }
    assert!(
        statuses.iter().all(|s| *s == 202 || *s == 409),
        "{statuses:?}"
    );
    assert!(statuses.contains(&202), "{statuses:?}");
    // A last retry after the race is a replay; the total holds one increment.
    assert_eq!(post_keyed(server.addr, "burst", 3).await.status, 202);
    assert_eq!(post_increment(server.addr, KEY, 1).await.status, 202);
    wait_for_total(server.addr, KEY, 4).await;
    server.stop().await;
}

#[tokio::test]
async fn keys_hold_across_api_processes_sharing_redis() {
    let dir = tempfile::tempdir().unwrap();
    let (Some(redis), Some(postgres)) = (redis_url().await, postgres_url().await) else {
        return;
    };
    let mut config = base_config(dir.path());
    config.redis_url = Some(redis);
    config.database_url = Some(postgres);
    config.table_prefix = unique("t");
    config.stream = unique("weir_test_stream");
    let _cleanup = Cleanup::new(&config);
    let api_a = start(config.clone(), Role::Api).await;
    let api_b = start(config.clone(), Role::Api).await;
    let worker = start(config.clone(), Role::Worker).await;
    assert_eq!(post_keyed(api_a.addr, "k-1", 5).await.status, 202);
    let replay = post_keyed(api_b.addr, "k-1", 5).await;
    assert_eq!(replay.status, 202, "{}", replay.body);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(post_keyed(api_b.addr, "k-1", 9).await.status, 422);
    assert_eq!(post_keyed(api_b.addr, "k-2", 2).await.status, 202);
    wait_for_total(api_a.addr, KEY, 7).await;
    // An API process reports what the workers committed, read from Postgres.
    let counts = request(api_a.addr, "GET", &format!("/counts/{KEY}"), &[], b"").await;
    assert!(
        counts.json()["lastFlushAtMs"].as_i64().is_some(),
        "{}",
        counts.body
    );
    let ready = request(api_b.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert!(
        ready.json()["lastCommitAtMs"].as_i64().is_some(),
        "{}",
        ready.body
    );
    assert_eq!(ready.json()["queueDepth"], 0, "{}", ready.body);
    for running in [api_a, api_b, worker] {
        running.stop().await;
    }
}
