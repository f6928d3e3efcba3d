//! Redis Streams + Postgres against the machine's engines, each test with its own stream,
//! group and tables: API replicas and workers sharing them, takeover of a dead worker's
//! entries, a crash between commit and ack, and both kinds of dead letters.

mod common;

use std::time::Duration;

use common::*;
use redis::AsyncCommands;
use uuid::Uuid;
use weir_increments::aggregate::{EntryId, Item};
use weir_increments::config::IncrementsConfig;
use weir_increments::queue::redis::RedisConsumer;
use weir_increments::queue::{Next, QueueError};
use weir_increments::store::{Dedupe, Store};
use weir_increments::Role;

async fn config(dir: &std::path::Path) -> Option<IncrementsConfig> {
    let redis = redis_url().await?;
    let postgres = postgres_url().await?;
    let mut config = base_config(dir);
    config.redis_url = Some(redis);
    config.database_url = Some(postgres);
    config.table_prefix = unique("t");
    config.stream = unique("weir_test_stream");
    config.group = "g".into();
    config.claim_idle_ms = 300;
    Some(config)
}

async fn redis_conn(config: &IncrementsConfig) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(config.redis_url.clone().unwrap()).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// Appends one entry as an API replica would (`k`, `v`), returning its id.
async fn add_entry(
    conn: &mut redis::aio::MultiplexedConnection,
    config: &IncrementsConfig,
    key: &str,
    value: i64,
) -> String {
    conn.xadd(
        &config.stream,
        "*",
        &[("k", key.to_string()), ("v", value.to_string())],
    )
    .await
    .unwrap()
}

/// One read by `consumer`, which must deliver something.
async fn read_batch(consumer: &mut RedisConsumer) -> Vec<Item> {
    match consumer.next(Duration::from_millis(200)).await.unwrap() {
        Next::Items(items) => items,
        _ => panic!("no entries"),
    }
}

async fn total(store: &Store, key: Uuid) -> i64 {
    store.count(key).await.unwrap().map_or(0, |c| c.total)
}

async fn wait_for_store_total(store: &Store, key: Uuid, expected: i64) {
    eventually(|| async {
        match total(store, key).await {
            actual if actual == expected => Ok(()),
            actual => Err(format!("total of {key} is {actual} not {expected}")),
        }
    })
    .await
}

async fn pending_count(config: &IncrementsConfig) -> usize {
    let mut conn = redis_conn(config).await;
    let reply: redis::streams::StreamPendingReply =
        conn.xpending(&config.stream, &config.group).await.unwrap();
    reply.count()
}

fn worker(config: &IncrementsConfig, name: &str) -> IncrementsConfig {
    IncrementsConfig {
        consumer: Some(name.to_string()),
        ..config.clone()
    }
}

#[tokio::test]
async fn api_replicas_and_workers_share_redis_and_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let api_a = start(config.clone(), Role::Api).await;
    let api_b = start(config.clone(), Role::Api).await;
    let w1 = start(worker(&config, "w1"), Role::Worker).await;
    let w2 = start(worker(&config, "w2"), Role::Worker).await;
    let keys: Vec<String> = (0..5).map(|_| Uuid::new_v4().to_string()).collect();
    for n in 0..200 {
        let api = if n % 2 == 0 { api_a.addr } else { api_b.addr };
        let reply = post_increment(api, &keys[n % 5], 1 + n as i64 % 3).await;
        assert_eq!(reply.status, 202, "{}", reply.body);
    }
    let expected = |k: usize| {
        (0..200)
            .filter(|n| n % 5 == k)
            .map(|n| 1 + n as i64 % 3)
            .sum::<i64>()
    };
    for (k, key) in keys.iter().enumerate() {
        wait_for_total(api_a.addr, key, expected(k)).await;
    }
    let ready = request(api_a.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    for running in [api_a, api_b, w1, w2] {
        running.stop().await;
    }
    assert_eq!(pending_count(&config).await, 0, "every entry acknowledged");
}

#[tokio::test]
async fn a_dead_workers_entries_are_taken_over_and_a_crash_after_commit_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let url = config.redis_url.clone().unwrap();
    let store = Store::open(&config).await.unwrap();
    let mut conn = redis_conn(&config).await;
    let key = Uuid::new_v4();
    // Two consumers that will "die": one right after reading, one after committing.
    let mut read_only = RedisConsumer::connect(&worker(&config, "dead-reader"), &url)
        .await
        .unwrap();
    let mut committed = RedisConsumer::connect(&worker(&config, "dead-committer"), &url)
        .await
        .unwrap();
    for value in 1..=10i64 {
        add_entry(&mut conn, &config, &key.to_string(), value).await;
    }
    let first = read_batch(&mut committed).await;
    assert_eq!(first.len(), 10);
    let mut agg = weir_increments::aggregate::Aggregator::default();
    for item in &first[..6] {
        agg.push(*item);
    }
    // Commit six (on the fast path: the worker read them itself), never ack them, and
    // "crash": their entries stay pending, and the survivor's claim must find the record.
    let stream = committed.stream().to_string();
    store
        .flush(
            &stream,
            Dedupe::Ids,
            std::sync::Arc::new(agg.take()),
            1,
            Some(weir_increments::store::Fencing {
                fence: &mut committed,
                exclusive: false,
            }),
        )
        .await
        .unwrap();
    drop(committed);
    for value in 11..=12i64 {
        add_entry(&mut conn, &config, &key.to_string(), value).await;
    }
    assert_eq!(read_batch(&mut read_only).await.len(), 2);
    drop(read_only);
    assert_eq!(total(&store, key).await, 21);

    let survivor = start(worker(&config, "survivor"), Role::Worker).await;
    wait_for_store_total(&store, key, (1..=12).sum()).await;
    survivor.stop().await;
    assert_eq!(
        total(&store, key).await,
        78,
        "each entry counted exactly once"
    );
    assert_eq!(pending_count(&config).await, 0);
}

#[tokio::test]
async fn acknowledged_entries_are_trimmed_and_pending_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let url = config.redis_url.clone().unwrap();
    let mut conn = redis_conn(&config).await;
    let mut consumer = RedisConsumer::connect(&worker(&config, "w"), &url)
        .await
        .unwrap();
    let key = Uuid::new_v4();
    for value in 1..=10i64 {
        add_entry(&mut conn, &config, &key.to_string(), value).await;
    }
    let read = read_batch(&mut consumer).await;
    assert_eq!(read.len(), 10);
    // Acknowledge the first six and a later one: the trim stops at the oldest still owed.
    let acked: Vec<_> = read[..6].iter().chain(&read[8..9]).map(|i| i.id).collect();
    consumer.ack(&acked).await.unwrap();
    let bound = consumer.prune_bound().await.unwrap().unwrap();
    assert_eq!(bound, read[6].id);
    assert_eq!(consumer.trim_below(bound).await.unwrap(), 6);
    let left: redis::streams::StreamRangeReply = conn.xrange_all(&config.stream).await.unwrap();
    let left: Vec<String> = left.ids.into_iter().map(|e| e.id).collect();
    let expected: Vec<String> = read[6..].iter().map(|i| i.id.to_string()).collect();
    assert_eq!(left, expected, "pending entries and those after them stay");
    assert_eq!(pending_count(&config).await, 3);
}

#[tokio::test]
async fn malformed_and_over_delivered_entries_go_to_the_dead_letter_stream() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut config) = config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    config.max_deliveries = 3;
    let url = config.redis_url.clone().unwrap();
    let store = Store::open(&config).await.unwrap();
    let mut conn = redis_conn(&config).await;
    let key = Uuid::new_v4();
    add_entry(&mut conn, &config, "not-a-uuid", 1).await;
    let poison = add_entry(&mut conn, &config, &key.to_string(), 1000).await;
    // The poison entry is read by a worker that keeps dying before its commit.
    let mut doomed = RedisConsumer::connect(&worker(&config, "doomed"), &url)
        .await
        .unwrap();
    let _ = doomed.next(Duration::from_millis(200)).await.unwrap();
    drop(doomed);
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&config.stream)
        .arg(&config.group)
        .arg("doomed")
        .arg(0)
        .arg(&poison)
        .arg("RETRYCOUNT")
        .arg(5)
        .query_async(&mut conn)
        .await
        .unwrap();
    add_entry(&mut conn, &config, &key.to_string(), 7).await;
    let full = Uuid::new_v4();
    for value in [i64::MAX, 1] {
        add_entry(&mut conn, &config, &full.to_string(), value).await;
    }

    let survivor = start(worker(&config, "survivor"), Role::Worker).await;
    wait_for_store_total(&store, key, 7).await;
    let dead = eventually(|| {
        let mut conn = conn.clone();
        let stream = config.dead_letter_stream();
        async move {
            let dead: redis::streams::StreamRangeReply = conn.xrange_all(stream).await.unwrap();
            match dead.ids.len() {
                3.. => Ok(dead),
                n => Err(format!("{n} dead letters, expected 3")),
            }
        }
    })
    .await;
    survivor.stop().await;
    let reasons: Vec<String> = dead
        .ids
        .iter()
        .filter_map(|e| e.get::<String>("reason"))
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("overflow")),
        "{reasons:?}"
    );
    assert_eq!(
        total(&store, full).await,
        i64::MAX,
        "the overflowing increment alone was set aside"
    );
    assert!(
        reasons.iter().any(|r| r.contains("not a UUID")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("delivered 3 times")),
        "{reasons:?}"
    );
    assert_eq!(
        total(&store, key).await,
        7,
        "the poison entry was not applied"
    );
    assert_eq!(pending_count(&config).await, 0);
}

#[tokio::test]
async fn redis_going_away_is_a_503_and_readyz_says_so_then_service_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut config) = config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let direct = config.clone();
    let raw = direct.redis_url.clone().unwrap();
    let authority = raw
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap()
        .rsplit('@')
        .next()
        .unwrap()
        .to_string();
    let target = if authority.contains(':') {
        authority
    } else {
        format!("{authority}:6379")
    };
    let target: std::net::SocketAddr = tokio::net::lookup_host(target)
        .await
        .unwrap()
        .next()
        .unwrap();
    let (via, switch) = proxy(target).await;
    config.redis_url = Some(format!("redis://{via}"));
    let server = start(config.clone(), Role::Serve).await;
    let key = Uuid::new_v4().to_string();
    let mut accepted = 0;
    for _ in 0..20 {
        assert_eq!(post_increment(server.addr, &key, 2).await.status, 202);
        accepted += 2;
    }
    switch.send_replace(false);
    let refused = post_increment(server.addr, &key, 5).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.header("retry-after"), Some("1"));
    let ready = request(server.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_ne!(ready.json()["queue"], "ok");
    switch.send_replace(true);
    // The connection manager reconnects on its own; the first requests may still see it down.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut resumed = 0;
    while resumed < 20 {
        let reply = post_increment(server.addr, &key, 3).await;
        match reply.status {
            202 => {
                accepted += 3;
                resumed += 1;
            }
            503 => assert!(tokio::time::Instant::now() < deadline, "never resumed"),
            other => panic!("unexpected {other}: {}", reply.body),
        }
    }
    wait_for_total(server.addr, &key, accepted).await;
    server.stop().await;
}

#[tokio::test]
async fn a_worker_recreates_a_lost_stream_and_reads_what_came_after() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let url = config.redis_url.clone().unwrap();
    let mut conn = redis_conn(&config).await;
    let mut consumer = RedisConsumer::connect(&worker(&config, "w"), &url)
        .await
        .unwrap();
    let key = Uuid::new_v4();
    add_entry(&mut conn, &config, &key.to_string(), 1).await;
    assert_eq!(read_batch(&mut consumer).await.len(), 1);
    // Redis loses everything; the API's next XADD recreates the stream without the group.
    let _: () = conn.del(&config.stream).await.unwrap();
    let after = add_entry(&mut conn, &config, &key.to_string(), 2).await;
    match consumer.next(Duration::from_millis(50)).await {
        Err(QueueError::StreamLost(stream)) => assert_eq!(stream, config.stream),
        other => panic!("the loss went unnoticed: {:?}", other.map(|_| ())),
    }
    consumer.recover_lost_group(None).await.unwrap();
    let read = read_batch(&mut consumer).await;
    assert_eq!(read.len(), 1);
    assert_eq!((read[0].id.to_string(), read[0].value), (after, 2));
    assert_eq!(consumer.streams_lost(), 1, "the loss is reported once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_accepted_after_the_stream_is_deleted_under_load_are_all_counted() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let store = Store::open(&config).await.unwrap();
    let api = start(config.clone(), Role::Api).await;
    let worker = start(worker(&config, "w"), Role::Worker).await;
    let key = Uuid::new_v4();
    let deleted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (deleted, stop) = (deleted.clone(), stop.clone());
        tokio::spawn(async move {
            // (accepted before the deletion, accepted by requests sent after it)
            let (mut before, mut after) = (0i64, 0i64);
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let value = 1 + n % 5;
                let sent_after = deleted.load(std::sync::atomic::Ordering::SeqCst);
                let reply = post_increment(api.addr, &key.to_string(), value).await;
                assert_eq!(reply.status, 202, "{}", reply.body);
                if sent_after {
                    after += value;
                } else {
                    before += value;
                }
            }
            (before, after, api)
        })
    };
    wait_until_positive(&store, key).await;
    let flushed_before = total(&store, key).await;
    let mut conn = redis_conn(&config).await;
    let _: () = conn.del(&config.stream).await.unwrap();
    deleted.store(true, std::sync::atomic::Ordering::SeqCst);
    eventually(|| async {
        match total(&store, key).await {
            t if t > flushed_before + 100 => Ok(()),
            t => Err(format!("nothing counted since the loss (total {t})")),
        }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (before, after, api) = client.await.unwrap();
    assert!(after > 0, "the load went on after the deletion");
    // Whatever was flushed before the loss stays; every 202 sent after it is counted; of
    // the ones accepted before it, those still unread in the deleted stream are lost.
    eventually(|| async {
        match total(&store, key).await {
            t if t >= flushed_before + after && t <= before + after => Ok(()),
            t => Err(format!(
                "total {t}: flushed before {flushed_before}, accepted before {before}, after {after}"
            )),
        }
    })
    .await;
    worker.stop().await;
    api.stop().await;
    let final_total = total(&store, key).await;
    assert!(final_total >= flushed_before + after, "{final_total}");
}

async fn wait_until_positive(store: &Store, key: Uuid) {
    eventually(|| async {
        match total(store, key).await {
            0 => Err(format!("nothing flushed for {key}")),
            _ => Ok(()),
        }
    })
    .await
}

#[tokio::test]
async fn the_dead_letter_stream_is_trimmed_by_age_then_by_length() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let url = config.redis_url.clone().unwrap();
    let mut consumer = RedisConsumer::connect(&worker(&config, "w"), &url)
        .await
        .unwrap();
    let mut conn = redis_conn(&config).await;
    for ms in 1..=10u64 {
        let _: String = conn
            .xadd(
                config.dead_letter_stream(),
                format!("{}-0", ms * 100),
                &[("reason", "test")],
            )
            .await
            .unwrap();
    }
    // Added before 350 ms: three go; then the newest four of the other seven stay.
    assert_eq!(consumer.trim_dead_letters(350, 4).await.unwrap(), 6);
    let left: redis::streams::StreamRangeReply =
        conn.xrange_all(config.dead_letter_stream()).await.unwrap();
    let left: Vec<String> = left.ids.into_iter().map(|e| e.id).collect();
    assert_eq!(left, vec!["700-0", "800-0", "900-0", "1000-0"]);
}

#[tokio::test]
async fn an_entry_dated_an_hour_ahead_by_redis_is_flushed_on_the_workers_clock() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let store = Store::open(&config).await.unwrap();
    let mut conn = redis_conn(&config).await;
    let key = Uuid::new_v4();
    // Redis' clock an hour ahead of the worker's (or stepped back since): the entry's id.
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 3_600_000;
    let _: String = conn
        .xadd(
            &config.stream,
            format!("{ahead}-0"),
            &[("k", key.to_string()), ("v", "5".to_string())],
        )
        .await
        .unwrap();
    let worker = start(worker(&config, "w"), Role::Worker).await;
    wait_for_store_total(&store, key, 5).await;
    worker.stop().await;
}

#[tokio::test]
async fn a_stream_that_only_lost_its_group_keeps_its_old_ids_below_the_mark() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let url = config.redis_url.clone().unwrap();
    let Store::Postgres(store) = Store::open(&config).await.unwrap() else {
        panic!("a Postgres store");
    };
    let mut conn = redis_conn(&config).await;
    let mut consumer = RedisConsumer::connect(&worker(&config, "w"), &url)
        .await
        .unwrap();
    for value in 1..=3 {
        add_entry(&mut conn, &config, &Uuid::new_v4().to_string(), value).await;
    }
    let read = read_batch(&mut consumer).await;
    // Two entries were applied and acknowledged and their ids pruned; the trim of the
    // stream lagged behind (it failed once), so the stream still starts below the mark.
    consumer.ack(&[read[0].id, read[1].id]).await.unwrap();
    consumer.trim_below(read[1].id).await.unwrap();
    store
        .prune_applied(&config.stream, read[2].id)
        .await
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&config.stream)
        .arg(&config.group)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(matches!(
        consumer.next(Duration::from_millis(50)).await,
        Err(QueueError::StreamLost(_))
    ));
    consumer
        .recover_lost_group(Some(&Store::Postgres(store.clone())))
        .await
        .unwrap();
    assert_eq!(
        store.floor(&config.stream).await.unwrap(),
        read[2].id,
        "the old entry still in the stream stays below the mark"
    );
}

#[tokio::test]
async fn a_stream_recreated_behind_the_mark_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    let store = Store::open(&config).await.unwrap();
    let worker = start(worker(&config, "w"), Role::Worker).await;
    // Entries up to an hour from now were applied and acknowledged before the loss: the
    // Redis that recreates the stream has a clock behind that one.
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 3_600_000;
    store
        .prune_applied(&config.stream, EntryId { ms: ahead, seq: 0 })
        .await
        .unwrap();
    let mut conn = redis_conn(&config).await;
    let _: () = conn.del(&config.stream).await.unwrap();
    let key = Uuid::new_v4();
    add_entry(&mut conn, &config, &key.to_string(), 4).await;
    wait_for_store_total(&store, key, 4).await;
    worker.stop().await;
}

/// Moves every pending entry of the group to `to`, as a worker's `XAUTOCLAIM` would once
/// their owner went quiet (this counts a delivery, as the real claim does).
async fn claim_all(config: &IncrementsConfig, ids: &[EntryId], to: &str) {
    let mut conn = redis_conn(config).await;
    let ids: Vec<String> = ids.iter().map(EntryId::to_string).collect();
    let _: redis::Value = conn
        .xclaim(&config.stream, &config.group, to, 0, &ids)
        .await
        .unwrap();
}

async fn fenced_flush(
    store: &Store,
    consumer: &mut RedisConsumer,
    items: &[Item],
    exclusive: bool,
) -> weir_increments::store::FlushReport {
    let mut agg = weir_increments::aggregate::Aggregator::default();
    items.iter().for_each(|item| agg.push(*item));
    let stream = consumer.stream().to_string();
    store
        .flush(
            &stream,
            Dedupe::Ids,
            std::sync::Arc::new(agg.take()),
            1,
            Some(weir_increments::store::Fencing {
                fence: consumer,
                exclusive,
            }),
        )
        .await
        .unwrap()
}

/// A store, one key, and `count` entries of it (values 1 to `count`) on a fresh stream:
/// the start of the fencing tests. `None` when the engines are unreachable outside CI.
struct Fenced {
    // Dropped in this order: the store's connections before the tables go.
    store: Store,
    key: Uuid,
    config: IncrementsConfig,
    _cleanup: Cleanup,
    _dir: tempfile::TempDir,
}

impl Fenced {
    async fn with_entries(count: i64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path()).await?;
        let cleanup = Cleanup::new(&config);
        let store = Store::open(&config).await.unwrap();
        let mut conn = redis_conn(&config).await;
        let key = Uuid::new_v4();
        for value in 1..=count {
            add_entry(&mut conn, &config, &key.to_string(), value).await;
        }
        Some(Fenced {
            store,
            key,
            config,
            _cleanup: cleanup,
            _dir: dir,
        })
    }

    async fn consumer(&self, name: &str) -> RedisConsumer {
        let url = self.config.redis_url.clone().unwrap();
        RedisConsumer::connect(&worker(&self.config, name), &url)
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn a_paused_workers_copies_taken_over_applied_and_pruned_are_released_not_counted() {
    let Some(fx) = Fenced::with_entries(10).await else {
        return;
    };
    let (store, config, key) = (&fx.store, &fx.config, fx.key);
    let mut paused = fx.consumer("paused").await;
    let mut live = fx.consumer("live").await;
    let held = read_batch(&mut paused).await;
    assert_eq!(held.len(), 10);
    let ids: Vec<EntryId> = held.iter().map(|item| item.id).collect();

    // While "paused" sleeps, "live" takes the entries over, applies them, acknowledges
    // them and prunes what it recorded below the new low-water mark.
    claim_all(config, &ids, "live").await;
    let applied = fenced_flush(store, &mut live, &held, true).await;
    assert_eq!((applied.applied, applied.released.len()), (10, 0));
    live.ack(&ids).await.unwrap();
    let bound = live.prune_bound().await.unwrap().unwrap();
    store.prune_applied(live.stream(), bound).await.unwrap();
    assert_eq!(total(store, key).await, 55);

    // "paused" wakes up and flushes its copies on the fast path: they are not its own
    // any more, so they are released, and nothing is counted twice.
    let resumed = fenced_flush(store, &mut paused, &held, false).await;
    assert_eq!(resumed.applied, 0);
    assert_eq!(resumed.released.len(), 10);
    // So does a retry on the exclusive path, which reads the records.
    let retried = fenced_flush(store, &mut paused, &held, true).await;
    assert_eq!((retried.applied, retried.released.len()), (0, 10));
    assert_eq!(total(store, key).await, 55, "each entry counted once");
}

#[tokio::test]
async fn a_retry_after_a_commit_it_could_not_confirm_counts_nothing_twice() {
    let Some(fx) = Fenced::with_entries(4).await else {
        return;
    };
    let (store, config, key) = (&fx.store, &fx.config, fx.key);
    let mut consumer = fx.consumer("w").await;
    let held = read_batch(&mut consumer).await;
    let first = fenced_flush(store, &mut consumer, &held, false).await;
    assert_eq!(first.applied, 4);
    // The commit went through but its answer was lost: the worker retries exclusively.
    let retry = fenced_flush(store, &mut consumer, &held, true).await;
    assert_eq!((retry.applied, retry.duplicates), (0, 4));
    // A copy delivered twice (claimed back after a long stall) is never on the fast path.
    let ids: Vec<EntryId> = held.iter().map(|item| item.id).collect();
    claim_all(config, &ids, "w").await;
    let fast = fenced_flush(store, &mut consumer, &held, false).await;
    assert_eq!((fast.applied, fast.released.len()), (0, 4));
    assert_eq!(total(store, key).await, 10);
}

/// A flush as the worker makes it: its first attempt on the fast path, then the exclusive
/// path while that fails.
async fn flush_as_worker(
    store: &Store,
    consumer: &mut RedisConsumer,
    items: &[Item],
) -> weir_increments::store::FlushReport {
    let mut agg = weir_increments::aggregate::Aggregator::default();
    items.iter().for_each(|item| agg.push(*item));
    let pending = std::sync::Arc::new(agg.take());
    let stream = consumer.stream().to_string();
    let mut exclusive = false;
    loop {
        let fencing = weir_increments::store::Fencing {
            fence: &mut *consumer,
            exclusive,
        };
        match store
            .flush(&stream, Dedupe::Ids, pending.clone(), 1, Some(fencing))
            .await
        {
            Ok(report) => return report,
            Err(err) if !exclusive => {
                eprintln!("first attempt: {err}");
                exclusive = true;
            }
            Err(err) => panic!("the exclusive path failed: {err}"),
        }
    }
}

#[tokio::test]
async fn entries_read_before_redis_lost_the_stream_are_applied_by_the_worker_holding_them() {
    let Some(fx) = Fenced::with_entries(10).await else {
        return;
    };
    let (store, config, key) = (&fx.store, &fx.config, fx.key);
    let mut paused = fx.consumer("paused").await;
    let mut live = fx.consumer("live").await;
    let held = read_batch(&mut paused).await;
    assert_eq!(held.len(), 10);

    // Redis loses the stream and its group while "paused" holds the entries; the API's next
    // append recreates the stream, and "live" finds the group gone first and recreates it.
    let mut conn = redis_conn(config).await;
    let _: () = conn.del(&config.stream).await.unwrap();
    let later = Uuid::new_v4();
    add_entry(&mut conn, config, &later.to_string(), 100).await;
    assert!(matches!(
        live.next(Duration::from_millis(50)).await,
        Err(QueueError::StreamLost(_))
    ));
    live.recover_lost_group(Some(store)).await.unwrap();
    let after = read_batch(&mut live).await;
    let flushed = flush_as_worker(store, &mut live, &after).await;
    assert_eq!(flushed.applied, 1);
    live.ack(&[after[0].id]).await.unwrap();
    // "live" prunes by the new group's state, which knows nothing of the old entries.
    let bound = live.prune_bound().await.unwrap().unwrap();
    store.prune_applied(live.stream(), bound).await.unwrap();

    // "paused" wakes: the new group knows nothing of its entries, and nobody else has them.
    let resumed = flush_as_worker(store, &mut paused, &held).await;
    assert_eq!((resumed.applied, resumed.released.len()), (10, 0));
    assert_eq!(
        total(store, key).await,
        55,
        "every entry read before the loss"
    );
    assert_eq!(total(store, later).await, 100);
    // A retry of the same flush (its commit unconfirmed) finds the records.
    let retried = fenced_flush(store, &mut paused, &held, true).await;
    assert_eq!(retried.applied, 0);
    assert_eq!(total(store, key).await, 55, "each entry counted once");
}

#[tokio::test]
async fn a_worker_that_recreates_the_lost_group_itself_still_applies_what_it_held() {
    let Some(fx) = Fenced::with_entries(4).await else {
        return;
    };
    let (store, config, key) = (&fx.store, &fx.config, fx.key);
    let mut consumer = fx.consumer("w").await;
    let held = read_batch(&mut consumer).await;
    let mut conn = redis_conn(config).await;
    let _: () = conn.del(&config.stream).await.unwrap();
    add_entry(&mut conn, config, &Uuid::new_v4().to_string(), 1).await;
    assert!(matches!(
        consumer.next(Duration::from_millis(50)).await,
        Err(QueueError::StreamLost(_))
    ));
    consumer.recover_lost_group(Some(store)).await.unwrap();
    let report = flush_as_worker(store, &mut consumer, &held).await;
    assert_eq!((report.applied, report.released.len()), (4, 0));
    assert_eq!(total(store, key).await, 10);
}

#[tokio::test]
async fn max_queue_depth_holds_in_redis_mode_until_a_worker_drains_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut config) = config(dir.path()).await else {
        return;
    };
    let _cleanup = Cleanup::new(&config);
    config.max_queue_depth = 5;
    let store = Store::open(&config).await.unwrap();
    // No worker yet: every entry appended waits.
    let api = start(config.clone(), Role::Api).await;
    let key = Uuid::new_v4();
    let mut accepted = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let refused = loop {
        let reply = post_increment(api.addr, &key.to_string(), 1).await;
        match reply.status {
            202 => accepted += 1,
            503 => break reply,
            other => panic!("unexpected {other}: {}", reply.body),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "maxQueueDepth 5 never refused a request ({accepted} accepted)"
        );
    };
    assert!(refused.body.contains("maxQueueDepth"), "{}", refused.body);
    assert_eq!(refused.header("retry-after"), Some("1"));
    let ready = request(api.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(
        ready.json()["queue"].as_str().unwrap().starts_with("full"),
        "{}",
        ready.body
    );
    // A keyed request would append too: refused the same way.
    let keyed = request(
        api.addr,
        "POST",
        "/increment",
        &[JSON, ("Idempotency-Key", "while-full")],
        format!(r#"{{"key": "{key}", "value": 1}}"#).as_bytes(),
    )
    .await;
    assert_eq!(keyed.status, 503, "{}", keyed.body);

    // A worker drains the stream: the API is ready and accepts again.
    let worker = start(worker(&config, "w"), Role::Worker).await;
    eventually(|| async {
        let ready = request(api.addr, "GET", "/readyz", &[], b"").await;
        match ready.status {
            200 => Ok(()),
            _ => Err(format!("never ready again: {}", ready.body)),
        }
    })
    .await;
    let reply = post_increment(api.addr, &key.to_string(), 1).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    wait_for_store_total(&store, key, accepted + 1).await;
    worker.stop().await;
    api.stop().await;
}
