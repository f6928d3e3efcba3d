//! The API and the embedded mode end to end, over real HTTP: every validation rule, the
//! status codes, auth, rate limiting, the OpenAPI document, and totals after a flush.

mod common;

use common::*;
use weir_increments::store::Store;
use weir_increments::Role;

const KEY: &str = "0b7c2f4e-8d1a-4f3b-9c6e-5a2d7e9f1b3c";

async fn embedded() -> (Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (start(base_config(dir.path()), Role::Serve).await, dir)
}

async fn assert_rejected(addr: std::net::SocketAddr, body: &str, field: Option<&str>, words: &str) {
    let reply = request(addr, "POST", "/increment", &[JSON], body.as_bytes()).await;
    assert_eq!(reply.status, 400, "{body} -> {}", reply.body);
    let json = reply.json();
    assert_eq!(json["field"].as_str(), field, "{body} -> {}", reply.body);
    let error = json["error"].as_str().unwrap_or_default();
    assert!(error.contains(words), "{body} -> {error}");
}

#[tokio::test]
async fn a_valid_increment_is_202_with_an_empty_body_and_is_persisted() {
    let (server, _dir) = embedded().await;
    for value in [1, 2, 39] {
        let reply = post_increment(server.addr, KEY, value).await;
        assert_eq!(reply.status, 202);
        assert_eq!(reply.body, "");
    }
    wait_for_total(server.addr, KEY, 42).await;
    let reply = request(server.addr, "GET", &format!("/counts/{KEY}"), &[], b"").await;
    assert!(reply.json()["updatedAtMs"].as_i64().is_some());
    server.stop().await;
}

#[tokio::test]
async fn every_validation_rule_answers_400_naming_the_field() {
    let (server, _dir) = embedded().await;
    let a = server.addr;
    assert_rejected(
        a,
        &format!(r#"{{"key":"{KEY}","value":1,"extra":1}}"#),
        None,
        "unknown field \"extra\"",
    )
    .await;
    assert_rejected(
        a,
        &format!(r#"{{"KEY":"{KEY}","value":1}}"#),
        Some("key"),
        "case-sensitive",
    )
    .await;
    assert_rejected(
        a,
        &format!(r#"{{"key":"{KEY}","value":1}}xyz"#),
        None,
        "trailing",
    )
    .await;
    assert_rejected(a, r#"{"key":7,"value":1}"#, Some("key"), "string").await;
    assert_rejected(
        a,
        &format!(r#"{{"key":"{KEY}","value":"1"}}"#),
        Some("value"),
        "got a string",
    )
    .await;
    assert_rejected(
        a,
        &format!(r#"{{"key":"{KEY}","value":0}}"#),
        Some("value"),
        "at least 1",
    )
    .await;
    assert_rejected(
        a,
        &format!(r#"{{"key":"{KEY}","value":-1}}"#),
        Some("value"),
        "at least 1",
    )
    .await;
    assert_rejected(
        a,
        &format!(r#"{{"key":"{KEY}","value":9223372036854775808}}"#),
        Some("value"),
        "at most",
    )
    .await;
    assert_rejected(a, r#"{"key":"not-a-uuid","value":1}"#, Some("key"), "UUID").await;
    assert_rejected(a, r#"{"value":1}"#, Some("key"), "missing").await;
    assert_rejected(
        a,
        &format!(r#"{{"key":"{KEY}"}}"#),
        Some("value"),
        "missing",
    )
    .await;
    assert_rejected(a, "", None, "empty").await;
    server.stop().await;
}

#[tokio::test]
async fn wrong_content_type_is_415() {
    let (server, _dir) = embedded().await;
    let body = format!(r#"{{"key":"{KEY}","value":1}}"#);
    for headers in [&[("Content-Type", "text/plain")][..], &[][..]] {
        let reply = request(server.addr, "POST", "/increment", headers, body.as_bytes()).await;
        assert_eq!(reply.status, 415, "{}", reply.body);
        assert!(reply.json()["error"]
            .as_str()
            .unwrap()
            .contains("application/json"));
    }
    server.stop().await;
}

#[tokio::test]
async fn a_body_over_one_kib_is_413_whether_declared_or_streamed() {
    let (server, _dir) = embedded().await;
    let padding = " ".repeat(1100);
    let body = format!(r#"{{"key":"{KEY}",{padding}"value":1}}"#);
    let reply = request(server.addr, "POST", "/increment", &[JSON], body.as_bytes()).await;
    assert_eq!(reply.status, 413, "{}", reply.body);
    assert!(reply.json()["error"].as_str().unwrap().contains("1024"));
    // Chunked: no Content-Length, so only the streaming limit can catch it.
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let reply = request(
        server.addr,
        "POST",
        "/increment",
        &[JSON, ("Transfer-Encoding", "chunked")],
        chunked.as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 413, "{reply:?}");
    server.stop().await;
}

#[tokio::test]
async fn bearer_keys_are_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path());
    config.api_keys = vec!["s3cret".into(), "other".into()];
    let server = start(config, Role::Serve).await;
    let body = format!(r#"{{"key":"{KEY}","value":1}}"#);
    let none = request(server.addr, "POST", "/increment", &[JSON], body.as_bytes()).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    let wrong = request(
        server.addr,
        "POST",
        "/increment",
        &[JSON, ("Authorization", "Bearer s3cre")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["error"], "unknown API key");
    let right = request(
        server.addr,
        "POST",
        "/increment",
        &[JSON, ("Authorization", "Bearer other")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(right.status, 202);
    for scheme in ["bearer", "BEARER"] {
        let auth = format!("{scheme} s3cret");
        let reply = request(
            server.addr,
            "POST",
            "/increment",
            &[JSON, ("Authorization", auth.as_str())],
            body.as_bytes(),
        )
        .await;
        assert_eq!(reply.status, 202, "{scheme}: {}", reply.body);
    }
    let health = request(server.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200, "probes stay open");
    server.stop().await;
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path());
    config.rate_limit_per_second = Some(1);
    config.rate_limit_burst = Some(2);
    let server = start(config, Role::Serve).await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..4 {
        let reply = post_increment(server.addr, KEY, 1).await;
        statuses.push(reply.status);
        if reply.status == 429 {
            retry_after = reply.header("retry-after").map(str::to_string);
            assert!(reply.json()["error"]
                .as_str()
                .unwrap()
                .contains("rate limit"));
        }
    }
    assert_eq!(&statuses[..2], &[202, 202]);
    assert!(statuses[2..].contains(&429), "{statuses:?}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    server.stop().await;
}

async fn post_from(addr: std::net::SocketAddr, forwarded_for: &str) -> u16 {
    let body = format!(r#"{{"key":"{KEY}","value":1}}"#);
    let headers = [JSON, ("X-Forwarded-For", forwarded_for)];
    request(addr, "POST", "/increment", &headers, body.as_bytes())
        .await
        .status
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_has_its_own_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path());
    config.rate_limit_per_second = Some(1);
    config.rate_limit_burst = Some(1);
    config.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    let server = start(config, Role::Serve).await;
    assert_eq!(post_from(server.addr, "198.51.100.1").await, 202);
    assert_eq!(
        post_from(server.addr, "198.51.100.2").await,
        202,
        "another client behind the same balancer"
    );
    assert_eq!(post_from(server.addr, "198.51.100.1").await, 429);
    // A client cannot escape its bucket by forging entries left of the balancer's.
    assert_eq!(
        post_from(server.addr, "203.0.113.9, 198.51.100.1").await,
        429
    );
    server.stop().await;
}

#[tokio::test]
async fn without_trusted_proxies_x_forwarded_for_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path());
    config.rate_limit_per_second = Some(1);
    config.rate_limit_burst = Some(1);
    let server = start(config, Role::Serve).await;
    assert_eq!(post_from(server.addr, "198.51.100.1").await, 202);
    assert_eq!(post_from(server.addr, "198.51.100.2").await, 429);
    server.stop().await;
}

#[tokio::test]
async fn an_overflowing_total_dead_letters_that_increment_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = base_config(dir.path());
    let server = start(config.clone(), Role::Serve).await;
    let other = "11111111-2222-4333-8444-555555555555";
    assert_eq!(
        post_increment(server.addr, KEY, i64::MAX - 5).await.status,
        202
    );
    assert_eq!(post_increment(server.addr, KEY, 10).await.status, 202);
    assert_eq!(post_increment(server.addr, KEY, 5).await.status, 202);
    assert_eq!(post_increment(server.addr, other, 3).await.status, 202);
    wait_for_total(server.addr, KEY, i64::MAX).await;
    wait_for_total(server.addr, other, 3).await;
    server.stop().await;
    let store = Store::open(&config).await.unwrap();
    let dead = store.dead_letters("embedded").await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].value, 10);
    assert!(dead[0].reason.contains("overflow"));
}

#[tokio::test]
async fn a_graceful_stop_flushes_everything_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path());
    config.flush_interval_ms = 60_000;
    config.max_staleness_ms = 60_000;
    config.claim_idle_ms = 120_000;
    let server = start(config.clone(), Role::Serve).await;
    for _ in 0..25 {
        assert_eq!(post_increment(server.addr, KEY, 2).await.status, 202);
    }
    server.stop().await;
    let store = Store::open(&config).await.unwrap();
    assert_eq!(
        store
            .count(KEY.parse().unwrap())
            .await
            .unwrap()
            .unwrap()
            .total,
        50
    );
}

#[tokio::test]
async fn probes_metrics_and_unknown_routes() {
    let (server, _dir) = embedded().await;
    assert_eq!(
        request(server.addr, "GET", "/healthz", &[], b"")
            .await
            .status,
        200
    );
    let ready = request(server.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.json()["database"], "ok");
    post_increment(server.addr, KEY, 1).await;
    wait_for_total(server.addr, KEY, 1).await;
    let metrics = request(server.addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(metrics.status, 200);
    for name in [
        "weir_increments_requests_total",
        "weir_increments_batch_size",
        "weir_increments_flush_seconds",
        "weir_increments_staleness_seconds",
        "weir_increments_flush_failing",
        "weir_increments_flush_consecutive_failures",
        "weir_increments_last_flush_timestamp_seconds",
        "weir_increments_oldest_unflushed_age_seconds",
        "weir_http_connections_open",
    ] {
        assert!(metrics.body.contains(name), "{name} missing from /metrics");
    }
    let missing = request(server.addr, "GET", "/nope", &[], b"").await;
    assert_eq!(missing.status, 404);
    let bad_key = request(server.addr, "GET", "/counts/xyz", &[], b"").await;
    assert_eq!(
        (bad_key.status, bad_key.json()["field"].as_str()),
        (400, Some("key"))
    );
    server.stop().await;
}

#[tokio::test]
async fn readyz_stays_ready_while_flushes_fail_says_so_and_is_503_once_the_queue_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path());
    config.max_queue_depth = 3;
    let server = start(config.clone(), Role::Serve).await;
    let first = request(server.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(first.status, 200, "{}", first.body);
    // Every flush fails from here on, while the database itself still answers a ping.
    let db = rusqlite::Connection::open(config.sqlite_path()).unwrap();
    db.execute_batch("ALTER TABLE increments_counts RENAME TO increments_counts_away")
        .unwrap();
    assert_eq!(post_increment(server.addr, KEY, 1).await.status, 202);
    let ready = eventually(|| async {
        let ready = request(server.addr, "GET", "/readyz", &[], b"").await;
        if ready.json()["flush"]["failing"] == true {
            Ok(ready)
        } else {
            Err(format!(
                "/readyz never reported failing flushes: {}",
                ready.body
            ))
        }
    })
    .await;
    assert_eq!(
        ready.status, 200,
        "the API still takes work: {}",
        ready.body
    );
    let body = ready.json();
    assert_eq!(body["ready"], true);
    assert!(body["flush"]["consecutiveFailures"].as_u64().unwrap() >= 1);
    assert!(
        body["flush"]["lastError"]
            .as_str()
            .unwrap()
            .contains("increments_counts"),
        "{body}"
    );
    assert!(body["flush"]["oldestUnflushedAgeMs"].as_u64().is_some());

    // Unflushed increments pile up to the limit: now the API cannot take more.
    for _ in 0..2 {
        assert_eq!(post_increment(server.addr, KEY, 1).await.status, 202);
    }
    let full = request(server.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(full.status, 503, "{}", full.body);
    assert!(
        full.json()["queue"].as_str().unwrap().starts_with("full"),
        "{}",
        full.body
    );
    assert_eq!(post_increment(server.addr, KEY, 1).await.status, 503);

    db.execute_batch("ALTER TABLE increments_counts_away RENAME TO increments_counts")
        .unwrap();
    wait_for_total(server.addr, KEY, 3).await;
    let healthy = request(server.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(healthy.status, 200, "{}", healthy.body);
    assert_eq!(healthy.json()["flush"]["failing"], false);
    server.stop().await;
}

#[tokio::test]
async fn every_error_axum_writes_itself_has_the_json_body() {
    let (server, _dir) = embedded().await;
    let wrong_method = request(server.addr, "GET", "/increment", &[], b"").await;
    assert_eq!(wrong_method.status, 405);
    assert!(wrong_method.json()["error"].is_string(), "{wrong_method:?}");
    assert_eq!(wrong_method.header("allow"), Some("POST"));
    let undecodable = request(server.addr, "GET", "/counts/%FF", &[], b"").await;
    assert_eq!(undecodable.status, 400, "{undecodable:?}");
    assert!(undecodable.json()["error"].is_string());
    let missing = request(server.addr, "GET", "/counts/", &[], b"").await;
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"].is_string());
    server.stop().await;
}

#[tokio::test]
async fn counts_accept_exactly_the_key_forms_increments_accept() {
    let (server, _dir) = embedded().await;
    let simple = KEY.replace('-', "");
    for other_form in [
        format!("{{{KEY}}}"),
        simple.clone(),
        format!("urn:uuid:{KEY}"),
    ] {
        let body = format!(r#"{{"key":"{other_form}","value":1}}"#);
        let post = request(server.addr, "POST", "/increment", &[JSON], body.as_bytes()).await;
        assert_eq!(post.status, 400, "POST {other_form}");
        let get = request(
            server.addr,
            "GET",
            &format!("/counts/{other_form}"),
            &[],
            b"",
        )
        .await;
        assert_eq!(
            (get.status, get.json()["field"].as_str()),
            (400, Some("key")),
            "GET {other_form}: {}",
            get.body
        );
    }
    let get = request(server.addr, "GET", &format!("/counts/{KEY}"), &[], b"").await;
    assert_eq!(get.status, 200, "{}", get.body);
    server.stop().await;
}

#[tokio::test]
async fn an_integer_in_any_notation_is_accepted() {
    let (server, _dir) = embedded().await;
    for literal in ["134217729.0", "2e0", "1.0E1"] {
        let body = format!(r#"{{"key":"{KEY}","value":{literal}}}"#);
        let reply = request(server.addr, "POST", "/increment", &[JSON], body.as_bytes()).await;
        assert_eq!(reply.status, 202, "{literal}: {}", reply.body);
    }
    wait_for_total(server.addr, KEY, 134_217_729 + 2 + 10).await;
    server.stop().await;
}

#[tokio::test]
async fn the_openapi_document_matches_the_live_routes() {
    let (server, _dir) = embedded().await;
    let doc = request(server.addr, "GET", "/openapi.json", &[], b"")
        .await
        .json();
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 6);
    for (path, operations) in paths {
        for (method, operation) in operations.as_object().expect("operations") {
            let concrete = path.replace("{key}", KEY);
            let body = format!(r#"{{"key":"{KEY}","value":1}}"#);
            let reply = request(
                server.addr,
                &method.to_uppercase(),
                &concrete,
                &[JSON],
                body.as_bytes(),
            )
            .await;
            let documented: Vec<&String> = operation["responses"]
                .as_object()
                .expect("responses")
                .keys()
                .collect();
            assert!(
                documented.contains(&&reply.status.to_string()),
                "{method} {path} answered {} which the document does not list ({documented:?})",
                reply.status
            );
        }
    }
    // The documented schema is the validator's: exactly these fields, nothing else.
    let schema = &doc["components"]["schemas"]["Increment"];
    assert_eq!(schema["additionalProperties"], false);
    assert_eq!(schema["required"], serde_json::json!(["key", "value"]));
    assert_eq!(schema["properties"]["value"]["minimum"], 1);
    assert_eq!(schema["properties"]["value"]["maximum"], i64::MAX);
    let responses = &paths["/increment"]["post"]["responses"];
    for code in ["202", "400", "401", "413", "415", "429"] {
        assert!(
            responses.get(code).is_some(),
            "/increment does not document {code}"
        );
    }
    server.stop().await;
}

/// The value of `series` (name and labels as the page writes them) on the /metrics page.
async fn metric(addr: std::net::SocketAddr, series: &str) -> f64 {
    let page = request(addr, "GET", "/metrics", &[], b"").await.body;
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn every_refused_increment_is_counted_once_by_its_reason_and_every_answer_timed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path());
    config.api_keys = vec!["k1".to_string()];
    let server = start(config, Role::Serve).await;
    let a = server.addr;
    let auth = ("Authorization", "Bearer k1");
    let rejected = |reason: &str| format!("weir_increments_rejected_total{{reason=\"{reason}\"}}");
    let answered = "weir_increments_request_duration_seconds_count";
    let reasons = [
        "unsupported_media_type",
        "too_large",
        "invalid_json",
        "unknown_field",
        "invalid_key",
        "invalid_value",
        "invalid_idempotency_key",
        "unauthorized",
    ];
    let mut before = Vec::new();
    for reason in reasons {
        before.push(metric(a, &rejected(reason)).await);
    }
    let answered_before = metric(a, answered).await;
    let good = format!(r#"{{"key":"{KEY}","value":1}}"#);
    type Case<'a> = (&'a [(&'a str, &'a str)], String, u16);
    let cases: [Case; 9] = [
        (&[auth], good.clone(), 415),
        (&[auth, JSON], format!("{good}{}", " ".repeat(2000)), 413),
        (&[auth, JSON], "[]".to_string(), 400),
        (
            &[auth, JSON],
            format!(r#"{{"key":"{KEY}","value":1,"x":1}}"#),
            400,
        ),
        (
            &[auth, JSON],
            r#"{"key":"nope","value":1}"#.to_string(),
            400,
        ),
        (
            &[auth, JSON],
            format!(r#"{{"key":"{KEY}","value":0}}"#),
            400,
        ),
        (&[auth, JSON, ("Idempotency-Key", "")], good.clone(), 400),
        (&[JSON], good.clone(), 401),
        (&[auth, JSON], good.clone(), 202),
    ];
    for (headers, body, status) in &cases {
        let reply = request(a, "POST", "/increment", headers, body.as_bytes()).await;
        assert_eq!(reply.status, *status, "{body}: {}", reply.body);
    }
    for (reason, before) in reasons.iter().zip(before) {
        assert_eq!(metric(a, &rejected(reason)).await - before, 1.0, "{reason}");
    }
    assert_eq!(
        metric(a, answered).await - answered_before,
        cases.len() as f64
    );
    server.stop().await;
}
