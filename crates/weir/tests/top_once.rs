//! `weir top --once` and `--json` against a stand-in metrics endpoint and a closed port: the
//! real binary, its HTTP client and parser, with no service to start.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// Serves a relay-like metrics page whose event counter grows by 100 at every scrape.
fn fake_relay_metrics() -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let scrapes = Arc::new(AtomicU64::new(0));
    let counted = scrapes.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|read| read > 2) {
                line.clear();
            }
            let scrape = counted.fetch_add(1, Ordering::SeqCst);
            let body = format!(
                "# HELP weir_relay_events_received_total Events read.\n\
                 # TYPE weir_relay_events_received_total counter\n\
                 weir_relay_events_received_total {}\n\
                 # TYPE weir_relay_clients_connected gauge\n\
                 weir_relay_clients_connected 7\n",
                scrape * 100
            );
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, scrapes)
}

/// A port nothing listens on: bound, then released.
fn closed_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    drop(listener);
    url
}

fn top(args: &[&str]) -> (bool, String) {
    let output = Command::new(WEIR).arg("top").args(args).output().unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
    )
}

#[test]
fn once_prints_rates_gauges_and_the_endpoints_that_are_down() {
    let (up, scrapes) = fake_relay_metrics();
    let down = closed_url();
    let (success, text) = top(&["--once", "--interval", "0.2", "--url", &up, "--url", &down]);
    assert!(success, "{text}");
    assert_eq!(scrapes.load(Ordering::SeqCst), 2, "two scrapes, for rates");
    assert!(text.starts_with("relay\n"), "{text}");
    let events = text
        .lines()
        .find(|line| line.trim_start().starts_with("events_received "))
        .unwrap_or_else(|| panic!("no event rate in:\n{text}"));
    assert!(!events.ends_with(" 0/s"), "{events}");
    assert!(text
        .lines()
        .any(|line| line.contains("clients_connected") && line.ends_with(" 7")));
    assert!(text.contains(&format!("up   {up}")), "{text}");
    // The reason, not hyper's layers around it.
    assert!(
        text.contains(&format!("DOWN {down}  Connection refused")),
        "{text}"
    );
}

#[test]
fn json_is_one_document_with_the_rate_per_second() {
    let (up, _) = fake_relay_metrics();
    let (success, text) = top(&["--json", "--interval", "0.2", "--url", &up]);
    assert!(success, "{text}");
    let view: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(view["endpoints"][0]["up"], true);
    let relay = &view["services"][0];
    assert_eq!(relay["name"], "relay");
    assert_eq!(relay["rates"][0]["label"], "events_received");
    // 100 events over at least the 0.2 s interval.
    let rate = relay["rates"][0]["value"].as_f64().unwrap();
    assert!(rate > 0.0 && rate <= 500.0 + 1e-6, "{rate}");
}

#[test]
fn nothing_answering_is_a_failure_for_scripts_but_still_a_snapshot() {
    let down = closed_url();
    let (success, text) = top(&["--once", "--interval", "0.1", "--url", &down]);
    assert!(!success);
    assert!(text.contains(&format!("DOWN {down}")), "{text}");
}

#[test]
fn the_metrics_address_exported_for_weir_up_is_read_not_bound() {
    let (up, _) = fake_relay_metrics();
    let addr = up
        .trim_start_matches("http://")
        .trim_end_matches("/metrics");
    let output = Command::new(WEIR)
        .args(["top", "--once", "--interval", "0.1", "--url", &up])
        .env("WEIR_METRICS_ADDR", addr)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
}
