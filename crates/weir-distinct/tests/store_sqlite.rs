//! The SQLite shard store: exact under concurrent duplicates, durable across a restart, and
//! one writer per shard.

mod common;

use std::collections::{HashMap, HashSet};

use common::{flip_byte, leave_log};
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

/// Offsets in a log: the 8-byte magic, then per record an 8-byte header and the payload
/// (2 + tenant + 2 + id bytes per item).
fn record_len(tenant: &str, ids: &[&str]) -> usize {
    8 + ids
        .iter()
        .map(|id| 4 + tenant.len() + id.len())
        .sum::<usize>()
}

fn expect_damaged(err: StoreError, shard: u16, offset: u64) -> String {
    match &err {
        StoreError::Damaged(damage) => {
            assert_eq!(damage.shard, shard, "{err}");
            assert_eq!(damage.offset, offset, "{err}");
            assert!(damage.file.ends_with("log-0"), "{err}");
        }
        other => panic!("not damage: {other}"),
    }
    err.to_string()
}

#[tokio::test]
async fn a_damaged_log_refuses_reads_and_writes_with_its_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = leave_log(dir.path(), "damaged", &[&["1"], &["2"]]);
    let shard = shard_of("damaged", StoreOptions::default().shards);
    // Flip a byte of the first record's payload: intact records follow, so it is damage.
    let bytes = flip_byte(&path, 8 + 8 + 3);

    let store = open(dir.path());
    let write = store.insert(vec![item("damaged", "3")]).await.unwrap_err();
    let text = expect_damaged(write, shard, 8);
    assert!(text.contains("weir distinct repair"), "{text}");
    // A count without the logged items would be wrong in silence: refused the same way.
    let read = store.count("damaged").await.unwrap_err();
    expect_damaged(read, shard, 8);
    assert_eq!(store.damaged().len(), 1);
    assert_eq!(store.damaged()[0].shard, shard);
    // Nothing was dropped to get past it.
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    store.close().await;
}

#[tokio::test]
async fn a_complete_last_record_that_fails_its_check_is_damage_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = leave_log(dir.path(), "lastbad", &[&["1"], &["2"], &["3"]]);
    let shard = shard_of("lastbad", StoreOptions::default().shards);
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    // The last byte of the last record: the record is whole, so no crash made it.
    flip_byte(&path, len - 1);

    let store = open(dir.path());
    let last = (8 + 2 * record_len("lastbad", &["1"])) as u64;
    expect_damaged(store.count("lastbad").await.unwrap_err(), shard, last);
    expect_damaged(
        store.insert(vec![item("lastbad", "4")]).await.unwrap_err(),
        shard,
        last,
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, len);
    store.close().await;
}

#[tokio::test]
async fn repair_moves_the_damage_aside_keeps_every_intact_record_and_the_shard_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = leave_log(dir.path(), "mend", &[&["1", "2"], &["3"], &["4", "5"]]);
    let shard = shard_of("mend", StoreOptions::default().shards);
    let second = 8 + record_len("mend", &["1", "2"]);
    let third = second + record_len("mend", &["3"]);
    let damaged = flip_byte(&path, second + 9);
    let store = open(dir.path());
    assert!(store.count("mend").await.is_err());

    // The running store holds no lock on a damaged shard, so repair runs beside it.
    let done = weir_distinct::store::repair::repair(dir.path(), 64, Some(shard)).unwrap();
    let weir_distinct::store::repair::ShardRepair::Repaired(logs) = &done[0].1 else {
        panic!("not repaired: {done:?}");
    };
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].dropped, vec![(second as u64, third as u64)]);
    assert_eq!((logs[0].kept_records, logs[0].kept_items), (2, 4));
    // The damaged file is kept whole for inspection.
    assert_eq!(std::fs::read(&logs[0].aside).unwrap(), damaged);

    // The store notices the repair on its own (its check of unfolded logs); no restart.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let counted = loop {
        match store.count("mend").await {
            Ok(n) => break n,
            Err(err) => assert!(std::time::Instant::now() < deadline, "{err}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        counted, 4,
        "items 1, 2, 4, 5 kept; 3 was in the damaged record"
    );
    assert!(store.damaged().is_empty());
    store.insert(vec![item("mend", "6")]).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(store.count("mend").await.unwrap(), 5);
    store.close().await;

    // A second repair finds nothing to do.
    let again = weir_distinct::store::repair::repair(dir.path(), 64, Some(shard)).unwrap();
    assert_eq!(again[0].1, weir_distinct::store::repair::ShardRepair::Clean);
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
