//! `weir distinct bench`: load against the distinct API (`POST /items`,
//! `GET /items/{tenant}/count`), then a check that every count is exact.
//!
//! By default it starts its own coordinator (`weir distinct coordinator --config <yaml>`,
//! this same executable) with workers on free local ports and a temporary SQLite directory;
//! `--url` targets a running coordinator (or a single worker: the API is the same).
//!
//! The load: one phase per batch size, N keep-alive connections each posting batches for a
//! fixed time. Tenants and ids carry a per-run prefix, so a run starts from zero counts even
//! against a store that has data. A share of each batch re-posts items the same connection
//! had acknowledged before (the duplicates); a request that fails is resent unchanged until
//! acknowledged, as a client must. Then a phase of count reads, then the check: every
//! tenant's count must equal the distinct items sent to it, within `worker_persist` plus a
//! margin. Exit status: non-zero if any count is off or any batch was never acknowledged.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, Request, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchFlags {
    /// Target a running coordinator (or worker) at this base URL instead of starting one.
    #[arg(long)]
    pub url: Option<String>,
    /// Workers in the coordinator the bench starts.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Concurrent keep-alive connections posting (and reading counts).
    #[arg(long, default_value_t = 64)]
    pub senders: usize,
    /// Tenants the items are spread over.
    #[arg(long, default_value_t = 1000)]
    pub tenants: u64,
    /// Share of each batch that re-posts items already acknowledged (0 to 0.9).
    #[arg(long, default_value_t = 0.3)]
    pub duplicates: f64,
    /// Batch sizes, one load phase each.
    #[arg(long, value_delimiter = ',', default_value = "10,1000")]
    pub batches: Vec<usize>,
    /// Seconds of each load phase.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Seconds of the count-read phase.
    #[arg(long, default_value_t = 5.0)]
    pub count_seconds: f64,
    /// `worker_persist` of the started coordinator, and the delay the final check allows
    /// (plus `--margin`) for acknowledged items to show in the counts.
    #[arg(long, default_value_t = 1.0)]
    pub worker_persist: f64,
    /// Seconds allowed beyond `worker_persist` for the final check.
    #[arg(long, default_value_t = 10.0)]
    pub margin: f64,
    /// With `--url`: processes whose peak memory to report (their children too).
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// Also print the results as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid --url {0}: expected http://host:port")]
    Url(String),
    #[error("invalid flag: {0}")]
    Flag(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the coordinator did not become ready: {0}")]
    NotReady(String),
}

/// What one phase measured.
#[derive(Debug, Default, Clone)]
pub struct PhaseReport {
    pub name: String,
    pub requests: u64,
    pub items: u64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Requests answered non-2xx or failed on the wire (each was resent).
    pub retries: u64,
    /// Batches never acknowledged (the run fails).
    pub unacknowledged: u64,
}

impl PhaseReport {
    pub fn per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.items as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Peak resident memory of one process.
#[derive(Debug, Clone)]
pub struct ProcessMemory {
    pub pid: u32,
    pub name: String,
    pub peak_rss_bytes: u64,
}

pub async fn run(flags: BenchFlags, token: CancellationToken) -> Result<bool, BenchError> {
    if !(0.0..=0.9).contains(&flags.duplicates) {
        return Err(BenchError::Flag(
            "--duplicates must be from 0 to 0.9".into(),
        ));
    }
    if flags
        .batches
        .iter()
        .any(|b| *b == 0 || *b > crate::validate::MAX_ITEMS)
    {
        return Err(BenchError::Flag(format!(
            "--batches must be from 1 to {}",
            crate::validate::MAX_ITEMS
        )));
    }
    if flags.tenants == 0 || flags.senders == 0 {
        return Err(BenchError::Flag(
            "--tenants and --senders must be above 0".into(),
        ));
    }
    let (authority, coordinator) = match &flags.url {
        Some(url) => (authority_of(url)?, None),
        None => {
            let started = Coordinator::start(&flags).await?;
            (started.authority.clone(), Some(started))
        }
    };
    let result = measure(&flags, &authority, &token).await;
    let pids: Vec<u32> = match &coordinator {
        Some(c) => vec![c.child.id().unwrap_or(0)],
        None => flags.pids.clone(),
    };
    let memory = pids
        .iter()
        .flat_map(|pid| process_tree(*pid))
        .collect::<Vec<_>>();
    if let Some(coordinator) = coordinator {
        coordinator.stop().await;
    }
    let (phases, counts_ok, check) = result;
    print_table(&phases, &memory, &check);
    if flags.json {
        println!("{}", to_json(&phases, &memory, &check, counts_ok));
    }
    Ok(counts_ok && phases.iter().all(|p| p.unacknowledged == 0))
}

fn authority_of(url: &str) -> Result<String, BenchError> {
    url.strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/').to_string())
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
        .ok_or_else(|| BenchError::Url(url.to_string()))
}

/// The outcome of the final check.
#[derive(Debug, Clone, Default)]
pub struct Check {
    pub tenants: u64,
    pub distinct_items: u64,
    pub wrong: Vec<(String, u64, Option<u64>)>,
    pub seconds: f64,
}

async fn measure(
    flags: &BenchFlags,
    authority: &str,
    token: &CancellationToken,
) -> (Vec<PhaseReport>, bool, Check) {
    let run_id = run_id();
    let tenants: Arc<Vec<String>> = Arc::new(
        (0..flags.tenants)
            .map(|t| format!("b{run_id}-t{t}"))
            .collect(),
    );
    let mut expected = vec![0u64; tenants.len()];
    let mut phases = Vec::new();
    for (phase, batch) in flags.batches.iter().enumerate() {
        let (report, sent) = load_phase(flags, authority, &tenants, phase, *batch, token).await;
        for (tenant, n) in sent.iter().enumerate() {
            expected[tenant] += n;
        }
        phases.push(report);
    }
    if flags.count_seconds > 0.0 {
        phases.push(count_phase(flags, authority, &tenants, token).await);
    }
    let deadline = Duration::from_secs_f64(flags.worker_persist.max(0.0) + flags.margin.max(0.0));
    let check = check_counts(authority, &tenants, &expected, deadline).await;
    let ok = check.wrong.is_empty();
    (phases, ok, check)
}

/// A number that differs between runs (seconds and pid), for fresh tenant names.
fn run_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{:x}{:x}", secs & 0xff_ffff, std::process::id() & 0xffff)
}

/// The item generator of one connection. Item `k` of connection `c` is
/// (`tenant[mix(c, k) % tenants]`, `"c{c}p{phase}i{k}"`): new items take the next `k`;
/// duplicates re-post a `k` below `acked`, which was acknowledged before.
pub struct Generator {
    sender: usize,
    phase: usize,
    tenants: u64,
    duplicates: f64,
    next: u64,
    acked: u64,
    rng: u64,
}

impl Generator {
    pub fn new(sender: usize, phase: usize, tenants: u64, duplicates: f64) -> Self {
        Generator {
            sender,
            phase,
            tenants,
            duplicates,
            next: 0,
            acked: 0,
            rng: mix(sender as u64 + 1, phase as u64 + 7),
        }
    }

    pub fn tenant_of(&self, k: u64) -> usize {
        (mix(self.sender as u64, k) % self.tenants) as usize
    }

    /// One batch as (tenant index, k) pairs; `fresh` of them are new.
    pub fn batch(&mut self, size: usize) -> (Vec<(usize, u64)>, u64) {
        let mut items = Vec::with_capacity(size);
        let mut fresh = 0;
        for _ in 0..size {
            self.rng = mix(self.rng, 0x9e37);
            let roll = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
            let k = if self.acked > 0 && roll < self.duplicates {
                self.rng % self.acked
            } else {
                fresh += 1;
                self.next += 1;
                self.next - 1
            };
            items.push((self.tenant_of(k), k));
        }
        (items, fresh)
    }

    /// The batch was acknowledged: its new items may be repeated from now on.
    pub fn acknowledged(&mut self) {
        self.acked = self.next;
    }

    pub fn id(&self, k: u64) -> String {
        format!("c{}p{}i{k}", self.sender, self.phase)
    }
}

/// splitmix64 of two words: a cheap, well-spread mix.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(b)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn body_of(gen: &Generator, tenants: &[String], items: &[(usize, u64)]) -> String {
    let mut body = String::with_capacity(items.len() * 48 + 2);
    body.push('[');
    for (n, (tenant, k)) in items.iter().enumerate() {
        if n > 0 {
            body.push(',');
        }
        let _ = write!(
            body,
            r#"{{"id":"{}","tenant":"{}"}}"#,
            gen.id(*k),
            tenants[*tenant]
        );
    }
    body.push(']');
    body
}

struct Connection {
    authority: String,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Connection {
    fn new(authority: &str) -> Self {
        Connection {
            authority: authority.to_string(),
            sender: None,
        }
    }

    /// One request; (status, body), or `None` if the connection failed (it is re-opened on
    /// the next call).
    async fn send(&mut self, method: &str, path: &str, body: Bytes) -> Option<(u16, Bytes)> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = TcpStream::connect(&self.authority).await.ok()?;
            let _ = stream.set_nodelay(true);
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .ok()?;
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut()?;
        if sender.ready().await.is_err() {
            self.sender = None;
            return None;
        }
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .ok()?;
        match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                let body = response.into_body().collect().await.ok()?.to_bytes();
                Some((status, body))
            }
            Err(_) => {
                self.sender = None;
                None
            }
        }
    }
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let index = ((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[index]) / 1000.0
}

/// Most attempts for one batch before it counts as never acknowledged.
const ATTEMPTS: u32 = 50;

/// Posts batches of `batch` items on every connection for `flags.seconds`; returns the
/// report and, per tenant, the distinct items acknowledged.
async fn load_phase(
    flags: &BenchFlags,
    authority: &str,
    tenants: &Arc<Vec<String>>,
    phase: usize,
    batch: usize,
    token: &CancellationToken,
) -> (PhaseReport, Vec<u64>) {
    let until = Instant::now() + Duration::from_secs_f64(flags.seconds.max(0.1));
    let started = Instant::now();
    let tasks: Vec<_> = (0..flags.senders)
        .map(|sender| {
            let authority = authority.to_string();
            let tenants = tenants.clone();
            let token = token.clone();
            let (count, duplicates) = (flags.tenants, flags.duplicates);
            tokio::spawn(async move {
                let mut gen = Generator::new(sender, phase, count, duplicates);
                let mut conn = Connection::new(&authority);
                let mut latencies = Vec::new();
                let mut sent = vec![0u64; tenants.len()];
                let (mut items, mut retries, mut lost) = (0u64, 0u64, 0u64);
                while Instant::now() < until && !token.is_cancelled() {
                    let (pairs, _) = gen.batch(batch);
                    let body = Bytes::from(body_of(&gen, &tenants, &pairs));
                    let mut acknowledged = false;
                    for attempt in 0..ATTEMPTS {
                        let at = Instant::now();
                        let answer = conn.send("POST", "/items", body.clone()).await;
                        latencies.push(at.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        if answer.is_some_and(|(status, _)| (200..300).contains(&status)) {
                            acknowledged = true;
                            break;
                        }
                        retries += 1;
                        let pause = Duration::from_millis(20 * u64::from(attempt.min(10) + 1));
                        tokio::time::sleep(pause).await;
                    }
                    if !acknowledged {
                        // Its new items may or may not be stored: the check cannot be exact.
                        lost += 1;
                        break;
                    }
                    // New items each have their own k, so each counts once.
                    let fresh_from = gen.acked;
                    for (tenant, k) in &pairs {
                        if *k >= fresh_from {
                            sent[*tenant] += 1;
                        }
                    }
                    gen.acknowledged();
                    items += pairs.len() as u64;
                }
                (latencies, sent, items, retries, lost)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut sent = vec![0u64; tenants.len()];
    let mut report = PhaseReport {
        name: format!("POST batches of {batch}"),
        ..PhaseReport::default()
    };
    for task in tasks {
        if let Ok((lat, per_tenant, items, retries, lost)) = task.await {
            report.requests += lat.len() as u64;
            latencies.extend(lat);
            for (total, n) in sent.iter_mut().zip(per_tenant) {
                *total += n;
            }
            report.items += items;
            report.retries += retries;
            report.unacknowledged += lost;
        } else {
            report.unacknowledged += 1;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    report.p50_ms = percentile_ms(&latencies, 0.5);
    report.p99_ms = percentile_ms(&latencies, 0.99);
    (report, sent)
}

/// Reads counts of random tenants on every connection for `flags.count_seconds`.
async fn count_phase(
    flags: &BenchFlags,
    authority: &str,
    tenants: &Arc<Vec<String>>,
    token: &CancellationToken,
) -> PhaseReport {
    let until = Instant::now() + Duration::from_secs_f64(flags.count_seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..flags.senders)
        .map(|sender| {
            let authority = authority.to_string();
            let tenants = tenants.clone();
            let token = token.clone();
            tokio::spawn(async move {
                let mut conn = Connection::new(&authority);
                let mut latencies = Vec::new();
                let mut failed = 0u64;
                let mut rng = mix(sender as u64, 42);
                while Instant::now() < until && !token.is_cancelled() {
                    rng = mix(rng, 1);
                    let tenant = &tenants[(rng % tenants.len() as u64) as usize];
                    let at = Instant::now();
                    let answer = conn
                        .send("GET", &format!("/items/{tenant}/count"), Bytes::new())
                        .await;
                    latencies.push(at.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    if answer.is_none_or(|(status, _)| status != 200) {
                        failed += 1;
                    }
                }
                (latencies, failed)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut report = PhaseReport {
        name: "GET counts".into(),
        ..PhaseReport::default()
    };
    for task in tasks {
        if let Ok((lat, failed)) = task.await {
            latencies.extend(lat);
            report.retries += failed;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.requests = latencies.len() as u64;
    report.items = report.requests;
    latencies.sort_unstable();
    report.p50_ms = percentile_ms(&latencies, 0.5);
    report.p99_ms = percentile_ms(&latencies, 0.99);
    report
}

/// Reads every tenant's count until all equal `expected` or `deadline` passes.
async fn check_counts(
    authority: &str,
    tenants: &[String],
    expected: &[u64],
    deadline: Duration,
) -> Check {
    let started = Instant::now();
    let mut conn = Connection::new(authority);
    let mut pending: Vec<usize> = (0..tenants.len()).collect();
    let mut last: Vec<Option<u64>> = vec![None; tenants.len()];
    loop {
        let mut still = Vec::new();
        for &tenant in &pending {
            let path = format!("/items/{}/count", tenants[tenant]);
            let count = conn
                .send("GET", &path, Bytes::new())
                .await
                .filter(|(status, _)| *status == StatusCode::OK.as_u16())
                .and_then(|(_, body)| serde_json::from_slice::<serde_json::Value>(&body).ok())
                .and_then(|json| json["count"].as_u64());
            last[tenant] = count;
            if count != Some(expected[tenant]) {
                still.push(tenant);
            }
        }
        pending = still;
        if pending.is_empty() || started.elapsed() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Check {
        tenants: tenants.len() as u64,
        distinct_items: expected.iter().sum(),
        wrong: pending
            .iter()
            .map(|&t| (tenants[t].clone(), expected[t], last[t]))
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
    }
}

fn print_table(phases: &[PhaseReport], memory: &[ProcessMemory], check: &Check) {
    println!(
        "{:<22} {:>10} {:>12} {:>8} {:>12} {:>9} {:>9} {:>8}",
        "phase", "requests", "items", "seconds", "per second", "p50 ms", "p99 ms", "retries"
    );
    for phase in phases {
        println!(
            "{:<22} {:>10} {:>12} {:>8.1} {:>12.0} {:>9.2} {:>9.2} {:>8}",
            phase.name,
            phase.requests,
            phase.items,
            phase.seconds,
            phase.per_second(),
            phase.p50_ms,
            phase.p99_ms,
            phase.retries
        );
    }
    if !memory.is_empty() {
        println!("{:<8} {:<24} {:>14}", "pid", "process", "peak RSS MiB");
        for process in memory {
            println!(
                "{:<8} {:<24} {:>14.1}",
                process.pid,
                process.name,
                process.peak_rss_bytes as f64 / (1024.0 * 1024.0)
            );
        }
    }
    if check.wrong.is_empty() {
        println!(
            "check: all {} tenants count exactly their {} distinct items ({:.1}s after the load)",
            check.tenants, check.distinct_items, check.seconds
        );
    } else {
        println!(
            "CHECK FAILED: {} of {} tenants are off after {:.1}s",
            check.wrong.len(),
            check.tenants,
            check.seconds
        );
        for (tenant, expected, got) in check.wrong.iter().take(10) {
            println!("  {tenant}: expected {expected}, read {got:?}");
        }
    }
}

fn to_json(
    phases: &[PhaseReport],
    memory: &[ProcessMemory],
    check: &Check,
    ok: bool,
) -> serde_json::Value {
    serde_json::json!({
        "phases": phases.iter().map(|p| serde_json::json!({
            "name": p.name, "requests": p.requests, "items": p.items, "seconds": p.seconds,
            "per_second": p.per_second().round(), "p50_ms": p.p50_ms, "p99_ms": p.p99_ms,
            "retries": p.retries, "unacknowledged": p.unacknowledged,
        })).collect::<Vec<_>>(),
        "processes": memory.iter().map(|m| serde_json::json!({
            "pid": m.pid, "name": m.name, "peak_rss_bytes": m.peak_rss_bytes,
        })).collect::<Vec<_>>(),
        "check": { "tenants": check.tenants, "distinct_items": check.distinct_items,
                   "wrong": check.wrong.len(), "seconds": check.seconds },
        "passed": ok,
    })
}

/// `pid` and every process below it, each with its peak RSS (`VmHWM`).
pub fn process_tree(pid: u32) -> Vec<ProcessMemory> {
    let mut out = Vec::new();
    let mut queue = vec![pid];
    while let Some(pid) = queue.pop() {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|rest| rest.trim().to_string())
        };
        let peak_kib = field("VmHWM:")
            .and_then(|v| {
                v.split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .unwrap_or(0);
        let name = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| {
                raw.split(|b| *b == 0)
                    .filter(|part| !part.is_empty())
                    .skip(1)
                    .take(2)
                    .map(|part| String::from_utf8_lossy(part).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        out.push(ProcessMemory {
            pid,
            name: if name.is_empty() {
                field("Name:").unwrap_or_default()
            } else {
                name
            },
            peak_rss_bytes: peak_kib * 1024,
        });
        queue.extend(children_of(pid));
    }
    out
}

/// Direct children, from `/proc/<pid>/task/*/children`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            children.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    children.sort_unstable();
    children.dedup();
    children
}

/// A coordinator this bench started, with its temporary directory.
struct Coordinator {
    child: tokio::process::Child,
    authority: String,
    _dir: tempfile::TempDir,
}

/// A free local port: bound on port 0, then released for the child to take.
fn free_port() -> Result<u16, BenchError> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// The configuration the started coordinator reads.
pub fn coordinator_yaml(port: u16, workers: &[u16], dir: &Path, worker_persist: f64) -> String {
    let mut yaml = String::from("workers:\n");
    for port in workers {
        let _ = writeln!(yaml, "  - 127.0.0.1:{port}");
    }
    let quoted = |path: PathBuf| serde_json::Value::from(path.display().to_string()).to_string();
    let _ = writeln!(yaml, "database: {}", quoted(dir.join("db")));
    let _ = writeln!(yaml, "worker_logs: {}", quoted(dir.join("logs")));
    let _ = writeln!(yaml, "worker_persist: {worker_persist}");
    let _ = writeln!(yaml, "config_check: 5");
    let _ = writeln!(yaml, "port: {port}");
    yaml
}

impl Coordinator {
    async fn start(flags: &BenchFlags) -> Result<Self, BenchError> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let workers = (0..flags.workers.max(1))
            .map(|_| free_port())
            .collect::<Result<Vec<_>, _>>()?;
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            coordinator_yaml(port, &workers, dir.path(), flags.worker_persist),
        )?;
        let exe = std::env::current_exe()?;
        let log = std::fs::File::create(dir.path().join("coordinator.log"))?;
        let child = tokio::process::Command::new(exe)
            .args(["distinct", "coordinator", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        let authority = format!("127.0.0.1:{port}");
        let mut coordinator = Coordinator {
            child,
            authority,
            _dir: dir,
        };
        coordinator.wait_ready(Duration::from_secs(30)).await?;
        Ok(coordinator)
    }

    /// Waits until `/readyz` answers 200 (every worker up).
    async fn wait_ready(&mut self, within: Duration) -> Result<(), BenchError> {
        let started = Instant::now();
        let mut conn = Connection::new(&self.authority);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self._dir.path().join("coordinator.log"))
                    .unwrap_or_default();
                return Err(BenchError::NotReady(format!("it exited ({status}): {log}")));
            }
            if let Some((200, _)) = conn.send("GET", "/readyz", Bytes::new()).await {
                return Ok(());
            }
            if started.elapsed() > within {
                return Err(BenchError::NotReady(format!(
                    "no 200 from http://{}/readyz within {within:?}",
                    self.authority
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM (it stops its workers gracefully), then SIGKILL if it lingers.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid, which is not yet reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn the_url_must_be_plain_http() {
        assert_eq!(
            authority_of("http://127.0.0.1:5000/").unwrap(),
            "127.0.0.1:5000"
        );
        assert!(authority_of("https://x:1").is_err());
        assert!(authority_of("http://x:1/items").is_err());
    }

    #[test]
    fn the_yaml_names_every_worker() {
        let yaml = coordinator_yaml(5000, &[1, 2], Path::new("/tmp/x"), 0.5);
        assert!(yaml.contains("  - 127.0.0.1:1\n  - 127.0.0.1:2\n"));
        assert!(yaml.contains("worker_persist: 0.5"));
        assert!(yaml.contains("database: \"/tmp/x/db\""));
    }

    proptest! {
        /// Duplicates only repeat acknowledged items, and new items are numbered without
        /// gaps: so the distinct items acknowledged are exactly the `k` below `next`.
        #[test]
        fn duplicates_repeat_only_acknowledged_items(
            sizes in proptest::collection::vec(1usize..50, 1..20),
            duplicates in 0.0f64..0.9,
        ) {
            let mut gen = Generator::new(3, 1, 17, duplicates);
            let mut distinct = HashSet::new();
            for size in sizes {
                let acked = gen.acked;
                let (items, fresh) = gen.batch(size);
                prop_assert_eq!(items.len(), size);
                let new: Vec<_> = items.iter().filter(|(_, k)| *k >= acked).collect();
                prop_assert_eq!(new.len() as u64, fresh);
                for (tenant, k) in &items {
                    prop_assert_eq!(*tenant, gen.tenant_of(*k));
                    distinct.insert(*k);
                }
                gen.acknowledged();
                prop_assert_eq!(distinct.len() as u64, gen.next);
            }
        }
    }
}
