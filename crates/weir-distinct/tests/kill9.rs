//! A worker killed with SIGKILL in the middle of a load loses nothing it acknowledged, and
//! its shards are free at once for the next worker.
//!
//! The worker runs as a child process: this test binary started again with
//! `WEIR_DISTINCT_CHILD_DB` set, which turns `child_worker` into a worker that prints its
//! address and serves until killed.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{config, config_persist, count, items_json, post_items, try_post_items, Worker};

const CHILD_DB: &str = "WEIR_DISTINCT_CHILD_DB";

#[test]
fn child_worker() {
    let Ok(db) = std::env::var(CHILD_DB) else {
        return; // Only a worker when started by the test below.
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("ADDR={}", listener.local_addr().unwrap());
        // Nothing is folded before the kill: every acknowledged item is only in the logs,
        // and the next worker must find it there.
        let config = config_persist(std::path::Path::new(&db), Duration::from_secs(3600));
        weir_distinct::server::run(listener, &config, weir_runtime::Shutdown::new())
            .await
            .unwrap();
    });
}

/// Kills its child on drop, so a failing test leaves no process behind.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_worker(db: &std::path::Path) -> (Child, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_worker", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB, db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Child(child);
    let addr = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.split_once("ADDR=").map(|(_, a)| a.trim().to_string()))
        .expect("the child prints its address");
    (child, addr.parse().unwrap())
}

fn batch(client: u64, round: u64) -> Vec<(String, String)> {
    (0..200u64)
        .map(|n| {
            let key = client * 1_000_003 + round * 211 + n;
            // Every third item repeats one another client also sends.
            let id = if n % 3 == 0 { n } else { key };
            (format!("k{}", key % 37), format!("i{id}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_load_loses_no_acknowledged_item() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_worker(dir.path());
    let (answered, mut progress) = tokio::sync::watch::channel(0usize);
    let answered = Arc::new(answered);
    let mut clients = Vec::new();
    for client in 0..6u64 {
        let answered = answered.clone();
        clients.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for round in 0.. {
                let pairs = batch(client, round);
                match try_post_items(addr, &items_json(&pairs)).await {
                    Some(reply) if reply.status == 200 => {
                        acknowledged.push(pairs);
                        answered.send_modify(|n| *n += 1);
                    }
                    // The worker died with this request unanswered: the client must resend.
                    _ => return (acknowledged, pairs),
                }
            }
            unreachable!("the loop ends when the worker dies")
        }));
    }
    // Kill without warning once the load is well under way.
    tokio::time::timeout(Duration::from_secs(30), progress.wait_for(|n| *n >= 30))
        .await
        .expect("the worker answered too little")
        .unwrap();
    child.0.kill().unwrap();
    child.0.wait().unwrap();

    let mut acknowledged: HashMap<String, HashSet<String>> = HashMap::new();
    let mut everything = acknowledged.clone();
    let mut retries = Vec::new();
    for client in clients {
        let (acked, unanswered) = client.await.unwrap();
        for (tenant, id) in acked.iter().flatten() {
            acknowledged
                .entry(tenant.clone())
                .or_default()
                .insert(id.clone());
        }
        for (tenant, id) in acked.iter().flatten().chain(&unanswered) {
            everything
                .entry(tenant.clone())
                .or_default()
                .insert(id.clone());
        }
        retries.push(unanswered);
    }
    assert!(
        !acknowledged.is_empty(),
        "the load was killed before any answer"
    );

    // The next worker takes the shards at once (the kernel freed the locks) and finds every
    // acknowledged item.
    let worker = Worker::start(config(dir.path())).await;
    for (tenant, ids) in &acknowledged {
        let counted = count(worker.addr, tenant).await;
        assert!(
            counted >= ids.len() as u64,
            "{tenant}: {counted} < {}",
            ids.len()
        );
    }
    // Clients resend what was never answered, as they must; then every count is exact.
    for pairs in retries {
        assert_eq!(
            post_items(worker.addr, &items_json(&pairs)).await.status,
            200
        );
    }
    for (tenant, ids) in &everything {
        assert_eq!(
            count(worker.addr, tenant).await,
            ids.len() as u64,
            "{tenant}"
        );
    }
    worker.stop().await;
}
