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

/// Writes what a worker that died before folding would leave: `records` in the shard's
/// first log, each a group of encoded items.
fn leave_log(root: &std::path::Path, tenant: &str, records: &[&[&str]]) -> std::path::PathBuf {
    let shard = shard_of(tenant, StoreOptions::default().shards);
    let dir = root.join(format!("shard-{shard:02}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("log-0");
    let mut log = weir_runtime::recordlog::RecordWriter::open(&path, 0).unwrap();
    for ids in records {
        let mut payload = Vec::new();
        for id in *ids {
            weir_distinct::shard::encode_item(&mut payload, tenant, id);
        }
        log.append(&payload);
    }
    log.commit(true).unwrap();
    path
}

#[tokio::test]
async fn items_left_in_a_log_are_counted_when_the_store_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = leave_log(dir.path(), "orphan", &[&["1", "2"], &["2", "3"]]);
    // A write cut short by the crash: never acknowledged, so cut.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut file, &[9, 0, 0, 0, 1, 2]).unwrap();
    drop(file);

    let store = open(dir.path());
    assert_eq!(store.count("orphan").await.unwrap(), 3);
    // Folded logs are emptied: a later owner folds nothing again (and would count nothing
    // twice if it did).
    assert!(std::fs::metadata(&path).unwrap().len() <= 8);
    store
        .insert(vec![item("orphan", "3"), item("orphan", "4")])
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert_eq!(store.count("orphan").await.unwrap(), 4);
    store.close().await;
}

#[tokio::test]
async fn a_damaged_log_is_refused_with_its_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = leave_log(dir.path(), "damaged", &[&["1"], &["2"]]);
    // Flip a byte of the first record's payload: intact records follow, so it is damage.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8 + 8 + 3] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let store = open(dir.path());
    let err = store
        .insert(vec![item("damaged", "3")])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("log-0") && err.contains("byte 8"), "{err}");
    // Nothing was dropped to get past it.
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(store.count("damaged").await.unwrap(), 0);
    store.close().await;
}

#[tokio::test]
async fn with_a_delay_items_are_counted_by_a_flush_and_by_close() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        fold_after: std::time::Duration::from_secs(3600),
        ..StoreOptions::default()
    };
    let store = Store::Sqlite(SqliteStore::open(dir.path(), options).unwrap());
    store
        .insert(vec![item("late", "1"), item("late", "2")])
        .await
        .unwrap();
    assert_eq!(
        store.count("late").await.unwrap(),
        0,
        "folded before its time"
    );
    store.flush().await.unwrap();
    assert_eq!(store.count("late").await.unwrap(), 2);
    store
        .insert(vec![item("late", "2"), item("late", "3")])
        .await
        .unwrap();
    store.close().await;
    let store = Store::Sqlite(SqliteStore::open(dir.path(), options).unwrap());
    assert_eq!(store.count("late").await.unwrap(), 3);
    store.close().await;
}
