//! The Postgres store against the machine's Postgres, each test on its own tables:
//! exactly-once bookkeeping, chunked upserts, overflow, and Postgres going away mid-load
//! (through a proxy in the test, so the shared server keeps running for everyone else).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use uuid::Uuid;
use weir_increments::aggregate::{Aggregator, EntryId, Item};
use weir_increments::config::IncrementsConfig;
use weir_increments::store::{Dedupe, Store};
use weir_increments::Role;

async fn pg_config(dir: &std::path::Path) -> Option<IncrementsConfig> {
    let url = postgres_url().await?;
    let mut config = base_config(dir);
    config.database_url = Some(url);
    config.table_prefix = unique("t");
    Some(config)
}

fn items(n: u64, keys: u128) -> Aggregator {
    let mut agg = Aggregator::default();
    for i in 1..=n {
        agg.push(Item {
            id: EntryId {
                ms: 1_000 + i,
                seq: i,
            },
            key: Uuid::from_u128(1 + i as u128 % keys),
            value: i as i64,
        });
    }
    agg
}

#[tokio::test]
async fn a_redelivered_flush_is_applied_once_in_both_modes() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut config) = pg_config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    config.chunk_size = 3;
    let store = Store::open(&config).await.unwrap();
    let pending = Arc::new(items(20, 7).take());
    let expected: i64 = (1..=20).sum();
    for dedupe in [Dedupe::Ids, Dedupe::Watermark] {
        let source = format!("{dedupe:?}");
        let first = store
            .flush(&source, dedupe, pending.clone(), 1, None)
            .await
            .unwrap();
        assert_eq!((first.applied, first.duplicates, first.keys), (20, 0, 7));
        // The commit happened but the ack was lost: the same entries come back.
        let again = store
            .flush(&source, dedupe, pending.clone(), 2, None)
            .await
            .unwrap();
        assert_eq!((again.applied, again.duplicates), (0, 20), "{dedupe:?}");
    }
    let mut total = 0;
    for key in 0..7u128 {
        total += store
            .count(Uuid::from_u128(1 + key))
            .await
            .unwrap()
            .map_or(0, |c| c.total);
    }
    assert_eq!(
        total,
        2 * expected,
        "each mode applied everything exactly once"
    );
    assert_eq!(store.watermark("Watermark").await.unwrap(), 20);
    let pruned = store
        .prune_applied("Ids", EntryId { ms: 1_011, seq: 0 })
        .await
        .unwrap();
    assert_eq!(pruned, 10);
}

#[tokio::test]
async fn overflow_is_dead_lettered_in_the_same_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = pg_config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let store = Store::open(&config).await.unwrap();
    let key = Uuid::from_u128(9);
    let mut agg = Aggregator::default();
    for (seq, value) in [(1, i64::MAX - 1), (2, 5), (3, 1)] {
        agg.push(Item {
            id: EntryId { ms: 1, seq },
            key,
            value,
        });
    }
    agg.push(Item {
        id: EntryId { ms: 1, seq: 4 },
        key: Uuid::from_u128(10),
        value: 4,
    });
    let report = store
        .flush("s", Dedupe::Ids, Arc::new(agg.take()), 1, None)
        .await
        .unwrap();
    assert_eq!(report.dead.len(), 1);
    assert_eq!(store.count(key).await.unwrap().unwrap().total, i64::MAX);
    assert_eq!(
        store
            .count(Uuid::from_u128(10))
            .await
            .unwrap()
            .unwrap()
            .total,
        4
    );
    let dead = store.dead_letters("s").await.unwrap();
    assert_eq!((dead.len(), dead[0].value), (1, 5));
}

#[tokio::test]
async fn serve_with_postgres_persists_totals() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = pg_config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let server = start(config.clone(), Role::Serve).await;
    let key = Uuid::new_v4().to_string();
    for value in 1..=10 {
        assert_eq!(post_increment(server.addr, &key, value).await.status, 202);
    }
    wait_for_total(server.addr, &key, 55).await;
    server.stop().await;
}

#[tokio::test]
async fn postgres_going_away_and_coming_back_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut config) = pg_config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let url: tokio_postgres::Config = config.database_url.clone().unwrap().parse().unwrap();
    let target = SocketAddr::from((
        [127, 0, 0, 1],
        url.get_ports().first().copied().unwrap_or(5432),
    ));
    let (via, switch) = proxy(target).await;
    let user = url.get_user().unwrap_or("postgres");
    let db = url.get_dbname().unwrap_or("test");
    config.database_url = Some(format!("postgres://{user}@{via}/{db}"));
    config.max_staleness_ms = 2_000;
    let server = start(config.clone(), Role::Serve).await;
    let key = Uuid::new_v4().to_string();
    let mut accepted = 0;
    for round in 0..3 {
        if round == 1 {
            switch.send_replace(false);
        }
        for _ in 0..50 {
            let reply = post_increment(server.addr, &key, 3).await;
            assert_eq!(
                reply.status, 202,
                "accepting while the database is down: {}",
                reply.body
            );
            accepted += 3;
        }
        if round == 1 {
            // A flush has to fail before the worker knows the database is gone. The API
            // still takes work (the queue holds it), so it stays ready and says why.
            eventually(|| async {
                let ready = request(server.addr, "GET", "/readyz", &[], b"").await;
                match ready.status {
                    200 if ready.json()["flush"]["failing"] == true => Ok(()),
                    _ => Err(format!(
                        "/readyz never reported the database down: {}",
                        ready.body
                    )),
                }
            })
            .await;
            switch.send_replace(true);
        }
    }
    // The backlog lands within the service's promise (10 s), retries included: a backoff
    // that outgrew the staleness budget would miss it.
    let restored = std::time::Instant::now();
    wait_for_total(server.addr, &key, accepted).await;
    assert!(
        restored.elapsed() < Duration::from_secs(10),
        "{:?}",
        restored.elapsed()
    );
    server.stop().await;
    let direct = IncrementsConfig {
        database_url: Some(format!("postgres://{user}@{target}/{db}")),
        ..config
    };
    let store = Store::open(&direct).await.unwrap();
    let total = store
        .count(key.parse().unwrap())
        .await
        .unwrap()
        .unwrap()
        .total;
    assert_eq!(total, accepted, "exactly what was accepted, no more");
}

async fn total_of(store: &Store, keys: u128) -> i64 {
    let mut total = 0;
    for key in 0..keys {
        total += store
            .count(Uuid::from_u128(1 + key))
            .await
            .unwrap()
            .map_or(0, |c| c.total);
    }
    total
}

/// The paused-worker double count without a clock: a stale copy of entries that were
/// applied, acknowledged and then forgotten by pruning comes back in a later flush.
#[tokio::test]
async fn a_stale_copy_of_pruned_entries_is_fenced_by_the_low_water_mark() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = pg_config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let Store::Postgres(store) = Store::open(&config).await.unwrap() else {
        panic!("a Postgres store");
    };
    let stale = Arc::new(items(20, 7).take());
    let live = store.flush("s", Dedupe::Ids, &stale, 1).await.unwrap();
    assert_eq!(live.applied, 20);
    // The live worker acknowledged everything; pruning forgets the ids below 1011-0.
    let mark = EntryId { ms: 1_011, seq: 0 };
    assert_eq!(store.prune_applied("s", mark).await.unwrap(), 10);
    assert_eq!(store.floor("s").await.unwrap(), mark);
    // A lower candidate (a group recreated after a loss) never moves the mark back.
    store
        .prune_applied("s", EntryId { ms: 5, seq: 0 })
        .await
        .unwrap();
    assert_eq!(store.floor("s").await.unwrap(), mark);
    // The paused worker resumes and flushes the copies it held all along.
    let resumed = store.flush("s", Dedupe::Ids, &stale, 2).await.unwrap();
    assert_eq!((resumed.applied, resumed.duplicates), (0, 20));
    assert_eq!(
        total_of(&Store::Postgres(store), 7).await,
        (1..=20).sum::<i64>()
    );
}

#[tokio::test]
async fn concurrent_flushes_of_the_same_entries_count_them_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = pg_config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let store = Store::open(&config).await.unwrap();
    let pending = Arc::new(items(200, 13).take());
    let (a, b) = tokio::join!(
        store.flush("s", Dedupe::Ids, pending.clone(), 1, None),
        store.flush("s", Dedupe::Ids, pending.clone(), 1, None)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.applied + b.applied, 200);
    assert_eq!(a.duplicates + b.duplicates, 200);
    assert_eq!(total_of(&store, 13).await, (1..=200).sum::<i64>());
}

/// Holds `LOCK TABLE ... IN ACCESS EXCLUSIVE MODE` in an open transaction until dropped.
async fn lock_table(url: &str, table: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
        ))
        .await
        .unwrap();
    client
}

#[tokio::test]
async fn a_flush_behind_a_lock_gives_up_before_the_claim_threshold_and_names_the_sqlstate() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut config) = pg_config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    config.claim_idle_ms = 600;
    let store = Store::open(&config).await.unwrap();
    let holder = lock_table(
        config.database_url.as_deref().unwrap(),
        &format!("{}_counts", config.table_prefix),
    )
    .await;
    let started = std::time::Instant::now();
    let pending = Arc::new(items(5, 2).take());
    let failed = tokio::time::timeout(
        Duration::from_secs(5),
        store.flush("s", Dedupe::Ids, pending.clone(), 1, None),
    )
    .await
    .expect("the flush gave up instead of waiting for the lock")
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    let text = failed.to_string();
    assert!(text.contains("SQLSTATE 55P03"), "{text}");
    drop(holder);
    // Nothing of the abandoned flush stuck: the retry applies everything.
    let retried = store
        .flush("s", Dedupe::Ids, pending, 2, None)
        .await
        .unwrap();
    assert_eq!(retried.applied, 5);
}

#[tokio::test]
async fn dead_letters_are_pruned_by_age_then_by_count() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = pg_config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let Store::Postgres(store) = Store::open(&config).await.unwrap() else {
        panic!("a Postgres store");
    };
    let (client, connection) = tokio_postgres::connect(
        config.database_url.as_deref().unwrap(),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    // Ten dead letters of "s" recorded at 100, 200, ... 1000 ms, one of another source.
    client
        .batch_execute(&format!(
            "INSERT INTO {p}_dead_letters (source, ms, seq, key, value, reason, at_ms)
             SELECT 's', n, 0, gen_random_uuid(), n, 'test', n * 100 FROM generate_series(1, 10) AS n;
             INSERT INTO {p}_dead_letters VALUES ('other', 1, 0, gen_random_uuid(), 1, 'test', 0);",
            p = config.table_prefix
        ))
        .await
        .unwrap();
    // Older than 350 ms: three go; then only the newest four of the other seven stay.
    assert_eq!(store.prune_dead_letters("s", 350, 4).await.unwrap(), 6);
    let left: Vec<u64> = store
        .dead_letters("s")
        .await
        .unwrap()
        .iter()
        .map(|d| d.id.ms)
        .collect();
    assert_eq!(left, vec![7, 8, 9, 10]);
    assert_eq!(store.prune_dead_letters("s", 0, 4).await.unwrap(), 0);
    assert_eq!(store.dead_letters("other").await.unwrap().len(), 1);
}

#[tokio::test]
async fn reading_a_total_behind_a_lock_fails_within_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = pg_config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let store = Store::open(&config).await.unwrap();
    let holder = lock_table(
        config.database_url.as_deref().unwrap(),
        &format!("{}_counts", config.table_prefix),
    )
    .await;
    let failed = tokio::time::timeout(Duration::from_secs(10), store.count(Uuid::from_u128(1)))
        .await
        .expect("the read gave up instead of queueing behind the lock")
        .unwrap_err();
    assert!(failed.to_string().contains("SQLSTATE 57014"), "{failed}");
    drop(holder);
    assert_eq!(store.count(Uuid::from_u128(1)).await.unwrap(), None);
}

/// The embedded queue over Postgres: a keyed request's key and increment commit together;
/// a repeat finds the key, and several keys for one counter share its overflow check.
#[tokio::test]
async fn keyed_increments_commit_with_their_keys_in_postgres() {
    use weir_increments::idempotency::Recorded;
    use weir_increments::store::KeyedIncrement;
    use weir_increments::validate::Increment;
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = pg_config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let store = Store::open(&config).await.unwrap();
    let keyed = |name: &str, counter: u128, value: i64| KeyedIncrement {
        key: format!("-/{name}"),
        fingerprint: format!("{counter}:{value}"),
        increment: Increment {
            key: Uuid::from_u128(counter),
            value,
        },
    };
    let first = store
        .apply_keyed(
            vec![
                keyed("a", 1, 5),
                keyed("b", 1, i64::MAX - 10),
                keyed("c", 1, 20),
                keyed("d", 2, 7),
            ],
            1_000,
        )
        .await
        .unwrap();
    assert_eq!(first, vec![Recorded::Applied; 4]);
    // "c" would take counter 1 past i64: dead-lettered, its key still recorded.
    let totals = || async {
        let mut out = Vec::new();
        for counter in [1u128, 2] {
            let count = store.count(Uuid::from_u128(counter)).await.unwrap();
            out.push(count.map_or(0, |c| c.total));
        }
        out
    };
    assert_eq!(totals().await, vec![i64::MAX - 5, 7]);
    assert_eq!(store.dead_letters("idempotency").await.unwrap().len(), 1);
    let again = store
        .apply_keyed(vec![keyed("a", 1, 5), keyed("d", 2, 9)], 2_000)
        .await
        .unwrap();
    assert_eq!(
        again,
        vec![
            Recorded::Existing("1:5".into()),
            Recorded::Existing("2:7".into())
        ]
    );
    assert_eq!(totals().await, vec![i64::MAX - 5, 7]);
    assert_eq!(store.last_commit_ms().await.unwrap(), Some(2_000));
}
