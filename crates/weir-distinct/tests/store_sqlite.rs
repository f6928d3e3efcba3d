//! The SQLite shard store: exact under concurrent duplicates, durable across a restart, and
//! one writer per shard.

use std::collections::{HashMap, HashSet};

use weir_distinct::shard::{shard_of, Item};
use weir_distinct::store::{SqliteStore, Store, StoreError, StoreOptions};

fn item(tenant: impl Into<String>, id: impl Into<String>) -> Item {
    Item {
        tenant: tenant.into(),
        id: id.into(),
    }
}

fn open(root: &std::path::Path) -> Store {
    Store::Sqlite(SqliteStore::open(root, StoreOptions::default()).unwrap())
}

/// A deterministic stream of pairs from a small space, so most are repeats.
fn pairs(seed: u64, n: usize) -> Vec<Item> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            item(
                format!("t{}", state % 23),
                format!("i{}", (state >> 8) % 300),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicate_heavy_inserts_count_each_pair_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut expected: HashMap<String, HashSet<String>> = HashMap::new();
    let mut tasks = Vec::new();
    for writer in 0..16u64 {
        let store = store.clone();
        let mut batches = Vec::new();
        for batch in 0..20u64 {
            let items = pairs(writer * 1_000 + batch, 250);
            for it in &items {
                expected
                    .entry(it.tenant.clone())
                    .or_default()
                    .insert(it.id.clone());
            }
            batches.push(items);
        }
        tasks.push(tokio::spawn(async move {
            for items in batches {
                store.insert(items).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    store.flush().await.unwrap();
    assert!(expected.values().map(HashSet::len).sum::<usize>() < 16 * 20 * 250 / 2);
    for (tenant, ids) in &expected {
        assert_eq!(
            store.count(tenant).await.unwrap(),
            ids.len() as u64,
            "{tenant}"
        );
    }
    assert_eq!(store.count("never-posted").await.unwrap(), 0);
    store.close().await;
}

#[tokio::test]
async fn a_restart_keeps_counts_and_reposting_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let batch = vec![
        item("a", "1"),
        item("a", "2"),
        item("b", "1"),
        item("a", "1"),
    ];
    let store = open(dir.path());
    store.insert(batch.clone()).await.unwrap();
    store.close().await;

    let store = open(dir.path());
    assert_eq!(store.count("a").await.unwrap(), 2);
    assert_eq!(store.count("b").await.unwrap(), 1);
    store.insert(batch).await.unwrap();
    store.insert(vec![item("a", "3")]).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(store.count("a").await.unwrap(), 3);
    assert_eq!(store.count("b").await.unwrap(), 1);
    store.close().await;
}

#[tokio::test]
async fn a_second_writer_of_a_shard_is_refused_but_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    let second = open(dir.path());
    first.insert(vec![item("shared", "1")]).await.unwrap();
    first.flush().await.unwrap();

    let err = second.insert(vec![item("shared", "2")]).await.unwrap_err();
    let shard = shard_of("shared", StoreOptions::default().shards);
    assert!(
        matches!(err, StoreError::Busy { shard: s, .. } if s == shard),
        "{err}"
    );
    assert_eq!(second.count("shared").await.unwrap(), 1);

    // Released with its owner: the second store takes the shard over.
    first.close().await;
    second.insert(vec![item("shared", "2")]).await.unwrap();
    second.flush().await.unwrap();
    assert_eq!(second.count("shared").await.unwrap(), 2);
    second.close().await;
}

#[tokio::test]
async fn a_database_path_that_is_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db");
    std::fs::write(&file, b"x").unwrap();
    let err = SqliteStore::open(&file, StoreOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a directory"), "{err}");
}
