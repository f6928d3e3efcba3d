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
    config.chunk_size = 3;
    let store = Store::open(&config).await.unwrap();
    let pending = Arc::new(items(20, 7).take());
    let expected: i64 = (1..=20).sum();
    for dedupe in [Dedupe::Ids, Dedupe::Watermark] {
        let source = format!("{dedupe:?}");
        let first = store
            .flush(&source, dedupe, pending.clone(), 1)
            .await
            .unwrap();
        assert_eq!((first.applied, first.duplicates, first.keys), (20, 0, 7));
        // The commit happened but the ack was lost: the same entries come back.
        let again = store
            .flush(&source, dedupe, pending.clone(), 2)
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
    drop_tables(&config).await;
}

#[tokio::test]
async fn overflow_is_dead_lettered_in_the_same_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = pg_config(dir.path()).await else {
        return;
    };
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
        .flush("s", Dedupe::Ids, Arc::new(agg.take()), 1)
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
    drop_tables(&config).await;
}

#[tokio::test]
async fn serve_with_postgres_persists_totals() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = pg_config(dir.path()).await else {
        return;
    };
    let server = start(config.clone(), Role::Serve).await;
    let key = Uuid::new_v4().to_string();
    for value in 1..=10 {
        assert_eq!(post_increment(server.addr, &key, value).await.status, 202);
    }
    wait_for_total(server.addr, &key, 55).await;
    server.stop().await;
    drop_tables(&config).await;
}

#[tokio::test]
async fn postgres_going_away_and_coming_back_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut config) = pg_config(dir.path()).await else {
        return;
    };
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
    drop_tables(&direct).await;
}
