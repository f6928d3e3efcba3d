//! `weir up` runs kv: with the broker of this machine one add/get round trip goes through it
//! on a queue of the test's own; with the broker unreachable `weir up` still comes up and
//! serves the others while kv reports itself disconnected and keeps retrying.
//!
//! `weir up` serves no kv `/readyz` of its own (only the shared metrics listener), so kv's
//! readiness is read from `weir_kv_broker_connected` on that page. The increments port of
//! `weir up` is fixed (3333): the cases run one after the other in one test, each waiting for
//! the port to be free first.

mod kv_common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kv_common::{amqp_url, free_addr, http_get, requester, TestQueue, REPLY_TIMEOUT, WEIR};

const INCREMENTS_PORT: u16 = 3333;

/// A `weir up` child, killed on drop.
struct Up {
    child: Child,
    metrics: String,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `weir up` in `dir` with kv on `amqp_url` and `queue`, the relay on ephemeral ports
/// and metrics on a free one; returns once the banner is printed.
fn start_up(dir: &std::path::Path, amqp_url: &str, queue: &str) -> Up {
    wait_until(
        "the increments port to be free",
        Duration::from_secs(120),
        || TcpListener::bind(("0.0.0.0", INCREMENTS_PORT)).is_ok(),
    );
    let metrics = free_addr();
    let mut child = Command::new(WEIR)
        .args(["--metrics-addr", &metrics, "up", "--grace-secs", "5"])
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("QUEUE_CONN_STRING")
        .env("eventListenerPort", "0")
        .env("clientListenerPort", "0")
        .env("AMQP_URL", amqp_url)
        .env("QUEUE_NAME", queue)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn weir up");
    let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let up = Up { child, metrics };
    let banner = std::io::BufRead::lines(stdout)
        .map_while(Result::ok)
        .find(|line| line.contains("weir is up"));
    assert!(banner.is_some(), "weir up never announced itself");
    up
}

/// The value of an unlabelled sample on a metrics page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

fn kv_connected(up: &Up) -> Option<f64> {
    let (_, page) = http_get(&up.metrics, "/metrics").ok()?;
    sample(&page, "weir_kv_broker_connected")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_up_serves_kv_and_keeps_running_while_the_broker_is_away() {
    let Some(url) = amqp_url().await else { return };

    // With the broker: one round trip through kv on the test's own queue.
    let queue = TestQueue::new(&url, "up");
    let dir = tempfile::tempdir().unwrap();
    {
        let mut up = start_up(dir.path(), &url, &queue.name);
        let mut client = requester(&url, &queue.name).await;
        let added = client
            .call(
                br#"{"action":"add","key":"up-A","value":"a"}"#,
                REPLY_TIMEOUT,
            )
            .await
            .expect("add answered");
        let added: serde_json::Value = serde_json::from_slice(&added).unwrap();
        assert_eq!(added, serde_json::json!({"ok": true, "replaced": false}));
        let got = client
            .call(br#"{"action":"get","key":"up-A"}"#, REPLY_TIMEOUT)
            .await
            .expect("get answered");
        let got: serde_json::Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(
            got,
            serde_json::json!({"ok": true, "found": true, "key": "up-A", "value": "a"})
        );
        client.close().await;
        assert_eq!(kv_connected(&up), Some(1.0));
        assert!(
            dir.path().join("weir-data/kv").is_dir(),
            "kv keeps its data under weir up's ./weir-data"
        );
        assert!(up.child.try_wait().unwrap().is_none(), "weir up exited");
    }

    // Without it (a closed port): up anyway, the others answer, kv reports no broker.
    let dir = tempfile::tempdir().unwrap();
    let mut up = start_up(dir.path(), "amqp://127.0.0.1:1/%2f", &queue.name);
    let page = http_get(&up.metrics, "/metrics").expect("metrics answer");
    assert_eq!(sample(&page.1, "weir_kv_broker_connected"), Some(0.0));
    wait_until("kv to retry", Duration::from_secs(30), || {
        http_get(&up.metrics, "/metrics")
            .ok()
            .and_then(|(_, page)| sample(&page, "weir_kv_reconnects_total"))
            .is_some_and(|retries| retries >= 2.0)
    });
    let (status, _) = http_get(&format!("127.0.0.1:{INCREMENTS_PORT}"), "/healthz")
        .expect("increments answers while the broker is away");
    assert!(status.contains(" 200"), "{status}");
    assert!(up.child.try_wait().unwrap().is_none(), "weir up exited");
    assert_eq!(kv_connected(&up), Some(0.0));
}
