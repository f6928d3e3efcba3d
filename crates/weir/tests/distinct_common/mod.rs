//! What the distinct end-to-end tests share: a coordinator run as the real `weir` binary
//! with its worker processes, a small blocking HTTP client, and a load that resends every
//! refused request until it is acknowledged (resending is always safe).

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// Ports free right now (bound to port 0, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

pub fn write_config(dir: &Path, port: u16, workers: &[u16], extra: &str) -> PathBuf {
    let mut yaml = String::from("workers:\n");
    for w in workers {
        yaml.push_str(&format!("  - localhost:{w}\n"));
    }
    yaml.push_str(&format!(
        "database: db\nworker_logs: logs\nworker_persist: 1\nconfig_check: 0.5\nhealth_check: 0.2\nport: {port}\n{extra}"
    ));
    let path = dir.join("config.yaml");
    // Written whole and renamed, so a reload never reads half a file.
    let tmp = dir.join("config.yaml.tmp");
    std::fs::write(&tmp, yaml).expect("write config");
    std::fs::rename(&tmp, &path).expect("rename config");
    path
}

pub fn weir(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(WEIR);
    command
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .env_remove("WEIR_METRICS_ADDR");
    for key in [
        "WORKERS",
        "DATABASE",
        "WORKER_LOGS",
        "WORKER_PERSIST",
        "CONFIG_CHECK",
        "PORT",
        "FSYNC",
        "HEALTH_CHECK",
    ] {
        command.env_remove(format!("WEIR_DISTINCT_{key}"));
    }
    command
}

/// A running `weir distinct coordinator --config config.yaml` in `dir`.
pub struct Coordinator {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Coordinator {
    /// Starts it and waits for its announcement (printed once every worker answers).
    pub fn start(dir: &Path, port: u16) -> Coordinator {
        let mut child = weir(dir, &["distinct", "coordinator", "--config", "config.yaml"])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("coordinator.log"))
                    .expect("log file"),
            ))
            .spawn()
            .expect("spawn weir");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let line = stdout
                .lines()
                .map_while(Result::ok)
                .find(|l| l.contains("distinct: POST http://"));
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(90)).ok().flatten();
        assert!(
            line.is_some(),
            "the coordinator never announced itself: {}",
            std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default()
        );
        Coordinator {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// SIGTERM, and the exit status once it has stopped its workers.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        wait_exit(&mut self.child, Duration::from_secs(60))
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("poll") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request with `Connection: close`; `None` if the connection failed.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

pub fn items_json(pairs: &[(String, String)]) -> String {
    let items: Vec<serde_json::Value> = pairs
        .iter()
        .map(|(tenant, id)| serde_json::json!({"id": id, "tenant": tenant}))
        .collect();
    serde_json::Value::Array(items).to_string()
}

pub fn count(addr: SocketAddr, tenant: &str) -> u64 {
    let (status, body) = http(addr, "GET", &format!("/items/{tenant}/count"), "").expect("answer");
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    value["count"].as_u64().expect("a count")
}

pub fn health(addr: SocketAddr) -> serde_json::Value {
    let (status, body) = http(addr, "GET", "/", "").expect("answer");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

/// Waits for `check` on the health document, with a deadline.
pub fn wait_health(
    addr: SocketAddr,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let doc = health(addr);
        if check(&doc) {
            return doc;
        }
        assert!(Instant::now() < deadline, "never {what}: {doc}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn worker_pids(doc: &serde_json::Value) -> Vec<(String, i32)> {
    doc["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| Some((w["worker"].as_str()?.to_string(), w["pid"].as_i64()? as i32)))
        .collect()
}

/// Whether `pid` names a live process (a zombie waiting for its reaper counts as gone).
pub fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Posts until acknowledged; returns how many answers were not 200 on the way.
pub fn post_until_acknowledged(addr: SocketAddr, body: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut refused = 0;
    loop {
        match http(addr, "POST", "/items", body) {
            Some((200, _)) => return refused,
            Some((503, _)) | None => refused += 1,
            Some((status, body)) => panic!("POST /items answered {status}: {body}"),
        }
        assert!(Instant::now() < deadline, "never acknowledged");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A deterministic pseudo-random stream (no dependency needed for a test load).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// `threads` clients posting batches drawn from `tenants` × `ids` (so duplicate-heavy) until
/// `stop`, each batch resent until acknowledged. Returns every pair posted.
pub struct Load {
    pub stop: Arc<AtomicBool>,
    pub acknowledged: Arc<AtomicU64>,
    pub refused: Arc<AtomicU64>,
    handles: Vec<std::thread::JoinHandle<HashSet<(String, String)>>>,
}

impl Load {
    pub fn start(addr: SocketAddr, threads: usize, tenants: u64, ids: u64, batch: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let handles = (0..threads)
            .map(|t| {
                let stop = stop.clone();
                let acknowledged = acknowledged.clone();
                let refused = refused.clone();
                std::thread::spawn(move || {
                    let mut rng = Lcg(t as u64 + 1);
                    let mut sent = HashSet::new();
                    while !stop.load(Ordering::Relaxed) {
                        let pairs: Vec<(String, String)> = (0..batch)
                            .map(|_| {
                                (
                                    format!("tenant-{}", rng.below(tenants)),
                                    format!("id-{}", rng.below(ids)),
                                )
                            })
                            .collect();
                        refused.fetch_add(
                            post_until_acknowledged(addr, &items_json(&pairs)),
                            Ordering::Relaxed,
                        );
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                        sent.extend(pairs);
                    }
                    sent
                })
            })
            .collect();
        Load {
            stop,
            acknowledged,
            refused,
            handles,
        }
    }

    /// Waits until `more` further batches have been acknowledged.
    pub fn wait_batches(&self, more: u64) {
        let target = self.acknowledged.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.acknowledged.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "the load stalled");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn finish(self) -> HashSet<(String, String)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = HashSet::new();
        for handle in self.handles {
            all.extend(handle.join().expect("load thread"));
        }
        all
    }
}

/// Waits until `tenant`'s count is `want`: a worker counts an acknowledged item within
/// `worker_persist`. A count above `want` fails at once (counts never go down).
pub fn settled(addr: SocketAddr, tenant: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = count(addr, tenant);
        assert!(now <= want, "{tenant}: {now} > {want}");
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "{tenant}: {now}, never {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every tenant's count reaches exactly the distinct pairs posted for it.
pub fn assert_exact(addr: SocketAddr, posted: &HashSet<(String, String)>, tenants: u64) {
    for t in 0..tenants {
        let tenant = format!("tenant-{t}");
        let want = posted.iter().filter(|(tt, _)| *tt == tenant).count() as u64;
        settled(addr, &tenant, want);
    }
}
