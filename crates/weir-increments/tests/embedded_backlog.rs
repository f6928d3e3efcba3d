//! The embedded log is the queue: a backlog built while the store is down waits on disk,
//! so the process's memory stays flat however large it grows, and all of it lands once
//! the store is back. One test per file: the memory measure is the whole process's.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use weir_increments::config::IncrementsConfig;
use weir_increments::queue::{embedded, Consumer};
use weir_increments::store::Store;
use weir_increments::validate::Increment;
use weir_increments::worker::{Worker, WorkerHealth};

const KEYS: u128 = 100;
const WARM_UP: u64 = 50_000;
const BACKLOG: u64 = 2_000_000;
const SENDERS: u64 = 500;

fn vm_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap();
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kib * 1024
}

/// `count` increments of 1, spread over `KEYS` keys, from `SENDERS` concurrent clients.
async fn enqueue(producer: &embedded::Producer, count: u64) {
    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let producer = producer.clone();
        senders.push(tokio::spawn(async move {
            let mut n = sender;
            while n < count {
                let key = Uuid::from_u128(u128::from(n) % KEYS + 1);
                producer.enqueue(Increment { key, value: 1 }).await.unwrap();
                n += SENDERS;
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
}

/// Polls `probe` until true, failing after `limit`.
async fn until(limit: Duration, what: &str, mut probe: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !probe().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn persisted_total(store: &Store) -> i64 {
    let mut total = 0;
    for n in 1..=KEYS {
        if let Some(count) = store.count(Uuid::from_u128(n)).await.unwrap() {
            total += count.total;
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_million_backlog_while_sqlite_is_down_keeps_memory_flat_and_all_lands() {
    let dir = tempfile::tempdir().unwrap();
    let config = IncrementsConfig {
        data_dir: dir.path().to_path_buf(),
        flush_interval_ms: 50,
        max_pending: 10_000,
        ..IncrementsConfig::default()
    };
    let store = Store::open(&config).await.unwrap();
    let (producer, consumer) = embedded::open(&config.log_dir(), 0, false).unwrap();
    // Another connection holds the write lock: every flush fails after the busy timeout.
    let blocker = rusqlite::Connection::open(config.sqlite_path()).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let health = Arc::new(WorkerHealth::default());
    let worker = Worker::new(
        Consumer::Embedded(consumer),
        store.clone(),
        &config,
        health.clone(),
    );
    let token = CancellationToken::new();
    let running = tokio::spawn(worker.run(token.clone()));

    enqueue(&producer, WARM_UP).await;
    until(Duration::from_secs(30), "a failed flush", async || {
        health.snapshot().consecutive_failures > 0
    })
    .await;
    let before = vm_rss_bytes();
    enqueue(&producer, BACKLOG).await;
    let after = vm_rss_bytes();
    assert_eq!(producer.depth(), WARM_UP + BACKLOG, "all of it is queued");
    assert_eq!(persisted_total(&store).await, 0, "the store was down");
    // Held in memory, 2M increments take at least 80 MB; on disk, the process stays put.
    let grown = after.saturating_sub(before);
    assert!(
        grown < 32 << 20,
        "RSS grew by {} MiB with the backlog ({} -> {} MiB)",
        grown >> 20,
        before >> 20,
        after >> 20
    );

    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    let expected = (WARM_UP + BACKLOG) as i64;
    until(
        Duration::from_secs(120),
        "the backlog to land",
        async || persisted_total(&store).await == expected,
    )
    .await;
    assert_eq!(producer.depth(), 0);
    drop(producer);
    token.cancel();
    running.await.unwrap();
    assert_eq!(persisted_total(&store).await, expected, "and nothing twice");
}
