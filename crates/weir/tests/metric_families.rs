//! Every service's fresh /metrics page, read from the real binary right after it announced
//! itself: every family is named `weir_<service>_<what>` (or `weir_http_<what>` for the
//! shared listener), counters and only counters end in `_total`, durations are in seconds,
//! every family has help text and a series from start-up, and each service has the families
//! the metrics issue asks of all of them where they apply: received, accepted, rejected by
//! reason, queue depth, a latency histogram, staleness.
//!
//! kv needs RabbitMQ (AMQP_URL, default the local guest account): without it the kv test is
//! skipped, except under CI=true, where it fails.

mod kv_common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// A family as the page declares it.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: Option<String>,
    /// Each sample line: the series (name and labels) and its value.
    samples: Vec<(String, String)>,
}

/// Families by name, from a Prometheus text page.
fn families(page: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_owned()).or_default().help = Some(help.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("a TYPE line has a kind");
            families.entry(name.to_owned()).or_default().kind = kind.to_owned();
        } else if !line.is_empty() && !line.starts_with('#') {
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            let name = series.split('{').next().unwrap_or(series);
            // A summary's `_sum` and `_count` belong to it.
            let family = [name.strip_suffix("_sum"), name.strip_suffix("_count")]
                .into_iter()
                .flatten()
                .find(|base| {
                    families
                        .get(*base)
                        .is_some_and(|family| family.kind == "summary")
                })
                .unwrap_or(name);
            families
                .entry(family.to_owned())
                .or_default()
                .samples
                .push((series.to_owned(), value.to_owned()));
        }
    }
    families
}

/// Words that name a time: a metric using one must say its unit, and the unit is seconds.
const TIME_WORDS: [&str; 9] = [
    "duration",
    "latency",
    "lag",
    "age",
    "staleness",
    "elapsed",
    "wait",
    "delay",
    "time",
];
/// Units Prometheus' conventions replace (by seconds and bytes).
const FOREIGN_UNITS: [&str; 9] = [
    "ms",
    "millis",
    "milliseconds",
    "us",
    "micros",
    "microseconds",
    "ns",
    "nanoseconds",
    "kb",
];

/// Checks the naming scheme and help text of every family on `page` of `service`.
fn assert_scheme(service: &str, page: &str) -> BTreeMap<String, Family> {
    let families = families(page);
    assert!(!families.is_empty(), "{service}: an empty page");
    let own = format!("weir_{service}_");
    for (name, family) in &families {
        assert!(
            name.starts_with(&own) || name.starts_with("weir_http_"),
            "{service}: {name} is not weir_{service}_<what> nor weir_http_<what>"
        );
        assert!(
            ["counter", "gauge", "summary", "histogram"].contains(&family.kind.as_str()),
            "{service}: {name} has no TYPE (or an unknown one): {family:?}"
        );
        assert_eq!(
            name.ends_with("_total"),
            family.kind == "counter",
            "{service}: {name} is a {}; counters and only counters end in _total",
            family.kind
        );
        assert!(
            family.help.as_deref().is_some_and(|help| !help.is_empty()),
            "{service}: {name} has no # HELP"
        );
        assert!(
            !family.samples.is_empty(),
            "{service}: {name} has no series at start-up, so rate() has nothing to start from"
        );
        let words: Vec<&str> = name.split('_').collect();
        if words.iter().any(|word| TIME_WORDS.contains(word)) {
            assert!(
                words.contains(&"seconds"),
                "{service}: {name} is a time without its unit (_seconds)"
            );
        }
        for word in &words {
            assert!(
                !FOREIGN_UNITS.contains(word),
                "{service}: {name} uses {word}; durations are in seconds, sizes in bytes"
            );
        }
        if family.kind == "histogram" || family.kind == "summary" {
            let base = words.last().copied();
            assert!(
                matches!(base, Some("seconds" | "bytes" | "size" | "keys")),
                "{service}: the distribution {name} names no unit or count"
            );
        }
    }
    families
}

/// The family `name`, which must exist, with the kind `kind`.
fn family<'a>(families: &'a BTreeMap<String, Family>, name: &str, kind: &str) -> &'a Family {
    let found = families
        .get(name)
        .unwrap_or_else(|| panic!("no {name} among {:?}", families.keys()));
    assert_eq!(found.kind, kind, "{name}");
    found
}

/// The counter family `name` with a series at zero for each `label="value"` of `values`.
fn assert_labelled_at_zero(
    families: &BTreeMap<String, Family>,
    name: &str,
    label: &str,
    values: &[&str],
) {
    let found = family(families, name, "counter");
    for value in values {
        let series = format!("{name}{{{label}=\"{value}\"}}");
        assert!(
            found
                .samples
                .iter()
                .any(|(s, v)| *s == series && v.as_str() == "0"),
            "{series} is not at zero from start-up: {:?}",
            found.samples
        );
    }
}

/// A service run as the real binary; SIGTERM (then SIGKILL) on drop, so that a coordinator
/// stops its worker processes.
struct Service {
    child: Child,
    name: &'static str,
}

impl Service {
    /// Starts `weir args...` in `dir` and waits for the first line on stdout that starts with
    /// `announcement`.
    fn start(name: &'static str, dir: &Path, args: &[&str], announcement: &str) -> Service {
        let mut child = Command::new(WEIR)
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .env("eventListenerPort", "0")
            .env("clientListenerPort", "0")
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .env_remove("WEIR_METRICS_ADDR")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn weir");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, rx) = std::sync::mpsc::channel();
        let wanted = announcement.to_owned();
        std::thread::spawn(move || {
            let line = stdout
                .lines()
                .map_while(Result::ok)
                .find(|line| line.starts_with(&wanted));
            let _ = tx.send(line);
        });
        let service = Service { child, name };
        let line = rx.recv_timeout(Duration::from_secs(90)).ok().flatten();
        assert!(line.is_some(), "{name} never announced itself");
        service
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    eprintln!("{} did not stop on SIGTERM; killed", self.name);
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// `GET /metrics` on `addr`, the body of a 200.
fn metrics_page(addr: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics address");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

#[test]
fn relay_families() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let _relay = Service::start(
        "relay",
        dir.path(),
        &["relay", "serve", "--metrics-addr", &addr],
        "relay:",
    );
    let families = assert_scheme("relay", &metrics_page(&addr));
    family(&families, "weir_relay_events_received_total", "counter");
    family(&families, "weir_relay_events_delivered_total", "counter");
    assert_labelled_at_zero(
        &families,
        "weir_relay_events_rejected_total",
        "reason",
        &["malformed", "stale", "too_far_ahead"],
    );
    family(&families, "weir_relay_reorder_window", "gauge");
    family(&families, "weir_relay_queued_bytes", "gauge");
    family(&families, "weir_relay_delivery_seconds", "summary");
    family(&families, "weir_relay_reorder_oldest_seconds", "gauge");
}

#[test]
fn increments_families() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr = format!("127.0.0.1:{}", free_port());
    let _increments = Service::start(
        "increments",
        dir.path(),
        &[
            "increments",
            "serve",
            "--port",
            "0",
            "--data-dir",
            data.to_str().unwrap(),
            "--metrics-addr",
            &addr,
        ],
        "increments:",
    );
    let families = assert_scheme("increments", &metrics_page(&addr));
    // Received and accepted: every answer by status, 202 the accepted ones.
    let requests = family(&families, "weir_increments_requests_total", "counter");
    assert!(
        requests
            .samples
            .iter()
            .any(|(series, _)| series == r#"weir_increments_requests_total{status="202"}"#),
        "{requests:?}"
    );
    assert_labelled_at_zero(
        &families,
        "weir_increments_rejected_total",
        "reason",
        weir_increments::metric_names::REJECT_REASONS,
    );
    family(&families, "weir_increments_queue_depth", "gauge");
    family(
        &families,
        "weir_increments_request_duration_seconds",
        "summary",
    );
    family(&families, "weir_increments_staleness_seconds", "summary");
    family(&families, "weir_increments_staleness_max_seconds", "gauge");
}

#[test]
fn distinct_worker_families() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr = format!("127.0.0.1:{}", free_port());
    let _worker = Service::start(
        "distinct worker",
        dir.path(),
        &[
            "distinct",
            "worker",
            "--listen",
            &addr,
            "--database",
            data.to_str().unwrap(),
        ],
        "distinct worker:",
    );
    let families = assert_scheme("distinct", &metrics_page(&addr));
    family(&families, "weir_distinct_items_received_total", "counter");
    family(&families, "weir_distinct_items_accepted_total", "counter");
    assert_labelled_at_zero(
        &families,
        "weir_distinct_rejected_total",
        "reason",
        &weir_distinct::metric_names::REASONS,
    );
    family(&families, "weir_distinct_pending_bytes", "gauge");
    family(
        &families,
        "weir_distinct_request_duration_seconds",
        "summary",
    );
    family(&families, "weir_distinct_fold_lag_seconds", "gauge");
}

#[test]
fn distinct_coordinator_families() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let worker = format!("127.0.0.1:{}", free_port());
    let _coordinator = Service::start(
        "distinct coordinator",
        dir.path(),
        &[
            "distinct",
            "coordinator",
            "--port",
            "0",
            "--workers",
            &worker,
            "--database",
            dir.path().join("data").to_str().unwrap(),
            "--worker-logs",
            dir.path().join("logs").to_str().unwrap(),
            "--metrics-addr",
            &addr,
        ],
        "distinct:",
    );
    let families = assert_scheme("distinct", &metrics_page(&addr));
    let name = |what: &str| format!("weir_distinct_coordinator_{what}");
    family(&families, &name("items_received_total"), "counter");
    family(&families, &name("items_accepted_total"), "counter");
    assert_labelled_at_zero(
        &families,
        &name("rejected_total"),
        "reason",
        &weir_distinct::metric_names::REASONS,
    );
    family(&families, &name("groups_in_flight"), "gauge");
    family(&families, &name("request_duration_seconds"), "summary");
}

#[tokio::test]
async fn kv_families() {
    let Some(url) = kv_common::amqp_url().await else {
        return;
    };
    let queue = kv_common::TestQueue::new(&url, "families");
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let _server = kv_common::Server::start(
        &url,
        &queue.name,
        &[
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--metrics-addr",
            &addr,
        ],
    )
    .await;
    let page = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || metrics_page(&addr)
    })
    .await
    .unwrap();
    let families = assert_scheme("kv", &page);
    // Received and accepted: every request by action and outcome.
    let requests = family(&families, "weir_kv_requests_total", "counter");
    assert!(
        requests
            .samples
            .iter()
            .any(|(series, _)| series.contains(r#"outcome="applied""#)),
        "{requests:?}"
    );
    assert_labelled_at_zero(
        &families,
        "weir_kv_dead_letters_total",
        "reason",
        &weir_kv::protocol::Malformed::REASONS,
    );
    family(&families, "weir_kv_queue_depth", "gauge");
    family(&families, "weir_kv_batch_seconds", "summary");
}

#[test]
fn the_checks_catch_what_the_scheme_forbids() {
    let bad = [
        "# HELP weir_relay_events_received Events.\n# TYPE weir_relay_events_received counter\nweir_relay_events_received 0\n",
        "# HELP weir_relay_lag_ms Lag.\n# TYPE weir_relay_lag_ms gauge\nweir_relay_lag_ms 0\n",
        "# HELP weir_relay_fold_lag Lag.\n# TYPE weir_relay_fold_lag gauge\nweir_relay_fold_lag 0\n",
        "# TYPE weir_relay_clients gauge\nweir_relay_clients 0\n",
        "# HELP weir_kv_clients Clients.\n# TYPE weir_kv_clients gauge\nweir_kv_clients 0\n",
        "# HELP weir_relay_clients Clients.\n# TYPE weir_relay_clients gauge\n",
    ];
    for page in bad {
        let caught = std::panic::catch_unwind(|| assert_scheme("relay", page));
        assert!(caught.is_err(), "not caught:\n{page}");
    }
    let good = "# HELP weir_relay_delivery_seconds Wait.\n# TYPE weir_relay_delivery_seconds summary\nweir_relay_delivery_seconds{quantile=\"0.5\"} 0\nweir_relay_delivery_seconds_sum 0\nweir_relay_delivery_seconds_count 0\n";
    let families = assert_scheme("relay", good);
    assert_eq!(families["weir_relay_delivery_seconds"].samples.len(), 3);
}
