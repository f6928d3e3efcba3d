//! A restart over a large unflushed log streams it: opening the log and reading the first
//! chunk keeps the process's memory flat, however much is waiting. (Its own file: the
//! memory measure is the whole process's.)

use uuid::Uuid;
use weir_increments::queue::embedded;
use weir_increments::validate::Increment;

const BACKLOG: u64 = 1_000_000;
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

/// What a previous run acknowledged and never flushed.
async fn unflushed_log(dir: &std::path::Path) {
    let (producer, mut consumer) = embedded::open(dir, 0, false).unwrap();
    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let producer = producer.clone();
        senders.push(tokio::spawn(async move {
            let mut n = sender;
            while n < BACKLOG {
                let key = Uuid::from_u128(u128::from(n % 100) + 1);
                producer.enqueue(Increment { key, value: 1 }).await.unwrap();
                n += SENDERS;
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    drop(producer);
    // Reading to the end also waits for the writer to have stopped.
    while consumer.next().await.unwrap().is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_million_unflushed_increments_streams_them_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    unflushed_log(dir.path()).await;

    let before = vm_rss_bytes();
    let (_producer, mut consumer) = embedded::open(dir.path(), 0, false).unwrap();
    assert_eq!(consumer.depth(), BACKLOG);
    let first = consumer.next().await.unwrap().unwrap();
    let after = vm_rss_bytes();
    assert_eq!(first.len(), embedded::READ_CHUNK);
    assert_eq!(first[0].id.seq, 1);
    // Loaded whole, a million records take at least 40 MB (and the segment as much again).
    let grown = after.saturating_sub(before);
    assert!(
        grown < 16 << 20,
        "RSS grew by {} MiB opening the log ({} -> {} MiB)",
        grown >> 20,
        before >> 20,
        after >> 20
    );
    let mut read = first.len() as u64;
    while let Some(items) = consumer.try_next().unwrap() {
        read += items.len() as u64;
    }
    assert_eq!(read, BACKLOG, "and all of it is there to read");
}
