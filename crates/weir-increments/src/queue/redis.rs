//! Redis Streams: API replicas `XADD`, workers read through one consumer group.
//!
//! A worker acknowledges (`XACK`) only after the flush that applied an entry committed, so
//! an entry read by a worker that dies stays pending; other workers take it over with
//! `XAUTOCLAIM` once it has been idle for `claimIdleMs`. Entries delivered `maxDeliveries`
//! times without a commit, and entries that cannot be decoded, go to the dead-letter
//! stream with their reason instead of blocking the group.
//!
//! Redis can lose the stream and its group (a restart without persistence, a failover, a
//! `FLUSHALL`) while the API's `XADD`s recreate the stream at once. A worker that finds its
//! group gone (`NOGROUP`) says so loudly and recreates it from the start of the stream, so
//! everything accepted after the loss is still counted.
//!
//! Entries a worker read before the loss are in its memory only: the recreated group has
//! never heard of them, so its silence about them does not mean another worker took them
//! over. Every group is created with an epoch (a random value beside the stream, set in the
//! same script), and a worker remembers the epoch it knew before it read what it holds; at
//! a flush, if the epoch moved, the held entries the new group knows nothing of are kept
//! and applied unless the store's records say they were (see `store::fence`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};

use redis::aio::ConnectionManager;
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamClaimOptions, StreamClaimReply, StreamId,
    StreamInfoGroupsReply, StreamPendingCountReply, StreamPendingReply, StreamRangeReply,
    StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, Value};

use super::{Next, QueueError};
use crate::aggregate::{DeadLetter, EntryId, Item};
use crate::config::IncrementsConfig;
use crate::idempotency::Recorded;
use crate::metric_names::{DEAD_LETTERS, STREAM_LOST};
use crate::store::{floor, Owned, Store};
use crate::validate::Increment;

const ACK_CHUNK: usize = 1_000;

async fn connect(
    url: &str,
    response_timeout: Option<Duration>,
) -> Result<ConnectionManager, QueueError> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(response_timeout)
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    Ok(ConnectionManager::new_with_config(client, config).await?)
}

#[derive(Clone)]
pub struct RedisProducer {
    conn: ConnectionManager,
    stream: String,
    group: String,
    keyed: std::sync::Arc<redis::Script>,
    appends: mpsc::Sender<Append>,
    /// The backlog as last read ([`UNKNOWN_DEPTH`] before the first read or while Redis
    /// does not answer), refreshed every [`DEPTH_EVERY`] by [`watch_depth`].
    depth: Arc<AtomicU64>,
}

const UNKNOWN_DEPTH: u64 = u64::MAX;

/// How often an API process reads the backlog to apply `maxQueueDepth`: one `XINFO GROUPS`
/// per interval, not one per request; the limit may be overshot by what is appended
/// meanwhile.
pub const DEPTH_EVERY: Duration = Duration::from_millis(200);

/// Keeps `depth` current until every producer sharing it is gone.
async fn watch_depth(producer: RedisProducer) {
    let depth = Arc::downgrade(&producer.depth);
    let RedisProducer {
        conn,
        stream,
        group,
        ..
    } = producer;
    let mut tick = tokio::time::interval(DEPTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(depth) = depth.upgrade() else {
            return;
        };
        let read = tokio::time::timeout(Duration::from_secs(1), backlog(&conn, &stream, &group));
        let value = match read.await {
            Ok(Ok(backlog)) => backlog.unwrap_or(0),
            _ => UNKNOWN_DEPTH,
        };
        depth.store(value, Ordering::Relaxed);
    }
}

/// Entries `group` has not acknowledged: its lag plus its pending entries; every entry of
/// the stream while the group does not exist (nobody has read any); `None` without a
/// stream (nothing accepted since Redis started).
async fn backlog(
    conn: &ConnectionManager,
    stream: &str,
    group: &str,
) -> Result<Option<u64>, QueueError> {
    let mut conn = conn.clone();
    let groups: StreamInfoGroupsReply = match conn.xinfo_groups(stream).await {
        Ok(groups) => groups,
        // No stream yet: nothing was ever accepted.
        Err(err) if matches!(err.kind(), redis::ErrorKind::Server(_)) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    match unacknowledged(&groups, group) {
        Some(depth) => Ok(Some(depth)),
        None => Ok(Some(conn.xlen(stream).await?)),
    }
}

/// An increment waiting to be appended, and where to say it was.
type Append = (Increment, oneshot::Sender<Result<(), String>>);

/// Appends in flight at once. While one is out, arriving requests gather into the next, so
/// under load an entry holds many increments and at rest a lone request is appended at
/// once. One is the fastest on a machine the API shares with Redis: with 4 in flight the
/// entries held 6 increments on average and the API, Redis and the worker spent their CPU on
/// four times as many appends and reads (`weir increments bench`: 45-53 % of the bare
/// handler against 62-64 % with one, and lower latency too).
const APPENDS_IN_FLIGHT: usize = 1;

/// Increments gathered into one append at most (then split into entries, see
/// [`super::entry`]).
const MAX_APPEND: usize = 4 * super::entry::MAX_INCREMENTS;

/// Requests waiting for an append slot; more wait in their own tasks.
const APPEND_QUEUE: usize = 16_384;

/// Appends waiting increments, a pipeline of entries at a time. Ends when every producer
/// is dropped; appends in flight then finish, and their requests are answered.
async fn append_loop(conn: ConnectionManager, stream: String, mut waiting: mpsc::Receiver<Append>) {
    let slots = Arc::new(Semaphore::new(APPENDS_IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = waiting.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_APPEND {
            match waiting.try_recv() {
                Ok(append) => batch.push(append),
                Err(_) => break,
            }
        }
        let mut conn = conn.clone();
        let stream = stream.clone();
        tokio::spawn(async move {
            let (increments, replies): (Vec<Increment>, Vec<_>) = batch.into_iter().unzip();
            let entries: Vec<String> = super::entry::group(&increments)
                .iter()
                .map(|members| super::entry::encode(&increments, members))
                .collect();
            let outcome = append_entries(&mut conn, &stream, &entries)
                .await
                .map_err(|err| err.to_string());
            for reply in replies {
                // A request that gave up waiting has no one to tell.
                let _ = reply.send(outcome.clone());
            }
            drop(slot);
        });
    }
}

/// Appends `entries` to `stream`. A plain `XADD ... NOMKSTREAM` each, in one pipeline: no
/// script to run per entry. Only if the stream is missing (Redis lost it, or nothing was
/// ever appended) are the entries it refused appended by [`APPEND_ENTRY`], which creates
/// the stream the safe way.
async fn append_entries(
    conn: &mut ConnectionManager,
    stream: &str,
    entries: &[String],
) -> Result<(), redis::RedisError> {
    let mut pipe = redis::pipe();
    for entry in entries {
        pipe.cmd("XADD")
            .arg(stream)
            .arg("NOMKSTREAM")
            .arg("*")
            .arg(super::entry::BATCH_FIELD)
            .arg(entry);
    }
    let ids: Vec<Value> = pipe.query_async(conn).await?;
    let refused: Vec<&String> = entries
        .iter()
        .zip(&ids)
        .filter(|(_, id)| matches!(id, Value::Nil))
        .map(|(entry, _)| entry)
        .collect();
    if refused.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for entry in refused {
        pipe.cmd("EVAL")
            .arg(APPEND_ENTRY)
            .arg(1)
            .arg(stream)
            .arg(super::entry::BATCH_FIELD)
            .arg(entry)
            .ignore();
    }
    pipe.query_async(conn).await
}

/// Lua: the id to append to the stream `KEYS[stream_key]` with: `*`, except that a stream
/// that has to be created (Redis lost it) starts after the current millisecond. Left to
/// itself a new stream numbers its first entries from the same millisecond the lost one was
/// still using, so they would reuse ids the store has recorded as applied, and be skipped
/// as duplicates.
macro_rules! next_entry_id {
    () => {
        r"
local function next_entry_id(stream)
  if redis.call('EXISTS', stream) == 1 then return '*' end
  local now = redis.call('TIME')
  return (tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + 1) .. '-0'
end
"
    };
}

/// `XADD` of one entry, a lost stream recreated as `next_entry_id!` says.
const APPEND_ENTRY: &str = concat!(
    next_entry_id!(),
    r"
return redis.call('XADD', KEYS[1], next_entry_id(KEYS[1]), ARGV[1], ARGV[2])
"
);

/// A keyed request in one atomic step: if the key is stored, its fingerprint; else the
/// entry is appended (a lost stream recreated as `next_entry_id!` says) and the key
/// stored with it (expiring after the retention). Redis runs a script whole, so no crash
/// or concurrent request can see one without the other.
const KEYED_XADD: &str = concat!(
    next_entry_id!(),
    r"
local existing = redis.call('GET', KEYS[1])
if existing then return existing end
redis.call('XADD', KEYS[2], next_entry_id(KEYS[2]), 'k', ARGV[3], 'v', ARGV[4])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"
);

impl RedisProducer {
    pub async fn connect(config: &IncrementsConfig, url: &str) -> Result<Self, QueueError> {
        let conn = connect(url, Some(Duration::from_secs(5))).await?;
        let (appends, waiting) = mpsc::channel(APPEND_QUEUE);
        tokio::spawn(append_loop(conn.clone(), config.stream.clone(), waiting));
        let producer = RedisProducer {
            conn,
            stream: config.stream.clone(),
            group: config.group.clone(),
            keyed: std::sync::Arc::new(redis::Script::new(KEYED_XADD)),
            appends,
            depth: Arc::new(AtomicU64::new(UNKNOWN_DEPTH)),
        };
        tokio::spawn(watch_depth(producer.clone_for_watch()));
        Ok(producer)
    }

    /// A copy for [`watch_depth`] that does not keep the append loop alive.
    fn clone_for_watch(&self) -> RedisProducer {
        let (appends, _) = mpsc::channel(1);
        RedisProducer {
            appends,
            ..self.clone()
        }
    }

    /// The backlog as last read (see [`DEPTH_EVERY`]); `None` until it is known.
    pub fn depth(&self) -> Option<u64> {
        match self.depth.load(Ordering::Relaxed) {
            UNKNOWN_DEPTH => None,
            depth => Some(depth),
        }
    }

    /// Appends a keyed increment unless its key is stored (see [`KEYED_XADD`]). The keys
    /// live beside the stream (`<stream>:idempotency:<key>`), each expiring after `retention`.
    pub async fn enqueue_keyed(
        &self,
        key: &str,
        fingerprint: &str,
        increment: Increment,
        retention: Duration,
    ) -> Result<Recorded, QueueError> {
        let mut conn = self.conn.clone();
        let existing: Option<String> = self
            .keyed
            .key(format!("{}:idempotency:{key}", self.stream))
            .key(&self.stream)
            .arg(fingerprint)
            .arg(retention.as_millis().max(1) as u64)
            .arg(increment.key.hyphenated().to_string())
            .arg(increment.value)
            .invoke_async(&mut conn)
            .await?;
        Ok(match existing {
            Some(fingerprint) => Recorded::Existing(fingerprint),
            None => Recorded::Applied,
        })
    }

    /// Entries the workers have not acknowledged yet (see [`backlog`]), read now.
    pub async fn backlog(&self) -> Result<Option<u64>, QueueError> {
        let depth = backlog(&self.conn, &self.stream, &self.group).await?;
        self.depth.store(depth.unwrap_or(0), Ordering::Relaxed);
        Ok(depth)
    }

    /// Resolves once the entry holding `increment` is appended (see [`append_loop`]).
    pub async fn enqueue(&self, increment: Increment) -> Result<(), QueueError> {
        let (reply, appended) = oneshot::channel();
        self.appends
            .send((increment, reply))
            .await
            .map_err(|_| QueueError::Closed)?;
        match appended.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(QueueError::Append(err)),
            Err(_) => Err(QueueError::Closed),
        }
    }

    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }
}

pub struct RedisConsumer {
    conn: ConnectionManager,
    reader: ConnectionManager,
    stream: String,
    group: String,
    consumer: String,
    dead_stream: String,
    read_count: usize,
    max_deliveries: usize,
    claim_idle_ms: u64,
    last_claim: Option<Instant>,
    claim_cursor: String,
    streams_lost: u64,
    /// Entries were taken over since the last flush began (see `store::fence`).
    claimed: bool,
    /// The epoch of the group this worker read everything it holds from (or an older one):
    /// set at start, and after a flush left it holding nothing.
    epoch: Option<String>,
    /// The epoch the last ownership check found, adopted once that flush is acknowledged.
    checked_epoch: Option<Option<String>>,
    /// When the last read returned fewer entries than it asked for (see [`READ_LINGER`]).
    short_read_at: Option<Instant>,
}

/// How long the low-water mark stays put after a lost group is recreated: a worker paused across
/// the loss of the old group for up to this long still applies what it had read from it
/// (the mark moves by the new group's state, which knows nothing of those entries).
pub const LOST_GROUP_HOLD_MS: u64 = 60_000;

/// How long a worker lets entries gather after a read that found only a few: small beside
/// the flush interval, long enough for a busy stream to fill the next read with dozens.
const READ_LINGER: Duration = Duration::from_millis(10);

impl RedisConsumer {
    /// A consumer without a store: the group is created as it is (tests and tools).
    pub async fn connect(config: &IncrementsConfig, url: &str) -> Result<Self, QueueError> {
        Self::connect_with(config, url, None).await
    }

    /// A consumer of a worker: if the group has to be created, the store's low-water mark
    /// first comes down to the stream's first entry when the stream is a new one (see
    /// [`Self::recover_lost_group`]).
    pub async fn connect_with(
        config: &IncrementsConfig,
        url: &str,
        store: Option<&Store>,
    ) -> Result<Self, QueueError> {
        let conn = connect(url, Some(Duration::from_secs(5))).await?;
        // Reads block on the server, so they get their own connection without a timeout
        // shorter than the block.
        let reader = connect(url, Some(Duration::from_secs(30))).await?;
        metrics::counter!(STREAM_LOST).increment(0);
        let mut consumer = RedisConsumer {
            conn,
            reader,
            stream: config.stream.clone(),
            group: config.group.clone(),
            consumer: config.consumer_name(),
            dead_stream: config.dead_letter_stream(),
            read_count: config.read_count,
            max_deliveries: config.max_deliveries as usize,
            claim_idle_ms: config.claim_idle_ms,
            last_claim: None,
            claim_cursor: "0-0".into(),
            streams_lost: 0,
            claimed: false,
            epoch: None,
            checked_epoch: None,
            short_read_at: None,
        };
        consumer.epoch = consumer.ensure_group(store).await?;
        Ok(consumer)
    }

    /// Creates the group if it is missing. Its new ids follow Redis' clock, which may be
    /// behind the ids acknowledged before a loss: the store's mark comes down to a new
    /// stream's first entry first, or its entries would be taken for duplicates; only then
    /// is the group created, so no worker reads them before. Every worker that creates the
    /// group does the same, whichever gets there first. Returns the group's epoch.
    async fn ensure_group(&mut self, store: Option<&Store>) -> Result<Option<String>, QueueError> {
        if self.group_exists().await? {
            return self.current_epoch().await;
        }
        if let (Some(store), Some(first)) = (store, self.first_entry().await?) {
            store
                .lower_floor(&self.stream, first)
                .await
                .map_err(|err| QueueError::Mark(err.to_string()))?;
        }
        create_group(&mut self.conn, &self.stream, &self.group).await
    }

    async fn current_epoch(&mut self) -> Result<Option<String>, QueueError> {
        Ok(self.conn.get(epoch_key(&self.stream, &self.group)).await?)
    }

    async fn group_exists(&mut self) -> Result<bool, QueueError> {
        let groups: Result<StreamInfoGroupsReply, redis::RedisError> =
            self.conn.xinfo_groups(&self.stream).await;
        match groups {
            Ok(groups) => Ok(groups.groups.iter().any(|group| group.name == self.group)),
            // No stream, no group.
            Err(err) if matches!(err.kind(), redis::ErrorKind::Server(_)) => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// How many times this consumer found the stream or its group gone and recreated it.
    pub fn streams_lost(&self) -> u64 {
        self.streams_lost
    }

    /// The next entries; `QueueError::StreamLost` once the stream or the group is gone, for
    /// the worker to lower the store's mark and call [`Self::recover_lost_group`].
    pub async fn next(&mut self, wait: Duration) -> Result<Next, QueueError> {
        match self.read(wait).await {
            Err(QueueError::Redis(err)) if err.code() == Some("NOGROUP") => {
                Err(QueueError::StreamLost(self.stream.clone()))
            }
            other => other,
        }
    }

    /// The first entry of a stream recreated by the API's appends, or
    /// `None` if the stream is not new. A stream that ever lost an entry (`entries-added`
    /// above its length: trimmed after its ids were applied) is the old one that merely
    /// lost its group, and its old ids must stay below the mark; so must they on a Redis
    /// too old to say (before 7.0).
    async fn first_entry(&mut self) -> Result<Option<EntryId>, QueueError> {
        let info: Result<HashMap<String, Value>, redis::RedisError> = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&self.stream)
            .query_async(&mut self.conn)
            .await;
        let Ok(info) = info else {
            // No stream at all yet: nothing appended since the loss.
            return Ok(None);
        };
        let number = |name: &str| match info.get(name) {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        };
        if number("entries-added").is_none() || number("entries-added") != number("length") {
            return Ok(None);
        }
        let reply: StreamRangeReply = self.conn.xrange_count(&self.stream, "-", "+", 1).await?;
        Ok(reply.ids.first().and_then(|entry| entry.id.parse().ok()))
    }

    /// The entries this group had not delivered when the stream went are gone; the ones
    /// workers held are still flushed. Whatever the API appended since (its `XADD`
    /// recreated the stream) is read from the start, so none of it is left behind.
    pub async fn recover_lost_group(&mut self, store: Option<&Store>) -> Result<(), QueueError> {
        self.streams_lost += 1;
        metrics::counter!(STREAM_LOST).increment(1);
        tracing::error!(
            stream = %self.stream,
            group = %self.group,
            "the stream or its consumer group is gone (Redis restarted without persistence, \
             failed over or was flushed): increments accepted but not yet read are lost; \
             recreating the group to count everything accepted from now on"
        );
        self.claim_cursor = "0-0".into();
        if let Some(store) = store {
            let until = crate::queue::embedded::now_ms().saturating_add(LOST_GROUP_HOLD_MS);
            store
                .hold_floor(&self.stream, until as i64)
                .await
                .map_err(|err| QueueError::Mark(err.to_string()))?;
        }
        // The epoch stays the old one: what this worker holds was read from the lost group.
        self.ensure_group(store).await.map(|_| ())
    }

    async fn read(&mut self, mut wait: Duration) -> Result<Next, QueueError> {
        // After a read that found only a few entries, let more gather first: each read costs
        // Redis and this worker a round trip whatever it returns, and under a steady stream
        // of appends reads would otherwise come back with one or two entries each.
        if let Some(at) = self.short_read_at.take() {
            let linger = READ_LINGER.saturating_sub(at.elapsed()).min(wait);
            if !linger.is_zero() {
                tokio::time::sleep(linger).await;
                wait -= linger;
            }
        }
        let claim_every = Duration::from_millis(self.claim_idle_ms / 2 + 1);
        if self.last_claim.is_none_or(|at| at.elapsed() >= claim_every) {
            self.last_claim = Some(Instant::now());
            let claimed = self.claim().await?;
            if !claimed.is_empty() {
                return Ok(Next::Items(claimed));
            }
        }
        let options = StreamReadOptions::default()
            .group(&self.group, &self.consumer)
            .count(self.read_count)
            .block(wait.as_millis().max(1) as usize);
        let reply: Option<StreamReadReply> = self
            .reader
            .xread_options(&[&self.stream], &[">"], &options)
            .await?;
        let entries: Vec<StreamId> = reply
            .map(|reply| reply.keys.into_iter().flat_map(|key| key.ids).collect())
            .unwrap_or_default();
        if entries.is_empty() {
            return Ok(Next::Idle);
        }
        if entries.len() < self.read_count {
            self.short_read_at = Some(Instant::now());
        }
        let items = self.decode_all(entries).await?;
        Ok(if items.is_empty() {
            Next::Idle
        } else {
            Next::Items(items)
        })
    }

    async fn decode_all(&mut self, entries: Vec<StreamId>) -> Result<Vec<Item>, QueueError> {
        let mut items = Vec::with_capacity(entries.len());
        for entry in entries {
            match super::entry::decode(&entry.id, &entry.map) {
                Ok(decoded) => items.extend(decoded),
                Err(reason) => self.dead_letter(&entry, &reason).await?,
            }
        }
        Ok(items)
    }

    /// Dead-letters entries delivered too often, then takes over abandoned ones.
    async fn claim(&mut self) -> Result<Vec<Item>, QueueError> {
        let overdue: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("IDLE")
            .arg(self.claim_idle_ms)
            .arg("-")
            .arg("+")
            .arg(self.read_count)
            .query_async(&mut self.conn)
            .await?;
        let poisoned: Vec<String> = overdue
            .ids
            .iter()
            .filter(|pending| pending.times_delivered >= self.max_deliveries)
            .map(|pending| pending.id.clone())
            .collect();
        if !poisoned.is_empty() {
            let claimed: StreamClaimReply = self
                .conn
                .xclaim(
                    &self.stream,
                    &self.group,
                    &self.consumer,
                    self.claim_idle_ms,
                    &poisoned,
                )
                .await?;
            for entry in claimed.ids {
                let reason = format!(
                    "delivered {} times without being committed",
                    self.max_deliveries
                );
                self.dead_letter(&entry, &reason).await?;
            }
        }
        let reply: StreamAutoClaimReply = self
            .conn
            .xautoclaim_options(
                &self.stream,
                &self.group,
                &self.consumer,
                self.claim_idle_ms,
                &self.claim_cursor,
                StreamAutoClaimOptions::default().count(self.read_count),
            )
            .await?;
        self.claim_cursor = reply.next_stream_id;
        if !reply.claimed.is_empty() {
            self.claimed = true;
            tracing::info!(
                entries = reply.claimed.len(),
                "took over entries abandoned by another worker"
            );
        }
        self.decode_all(reply.claimed).await
    }

    async fn dead_letter(&mut self, entry: &StreamId, reason: &str) -> Result<(), QueueError> {
        let mut fields: Vec<(String, String)> = vec![
            ("id".into(), entry.id.clone()),
            ("reason".into(), reason.to_string()),
        ];
        for (name, value) in &entry.map {
            fields.push((format!("field:{name}"), value_text(value)));
        }
        // One MULTI/EXEC: a crash between the two would leave the entry pending, and its
        // next delivery would dead-letter it a second time.
        let () = redis::pipe()
            .atomic()
            .xadd(&self.dead_stream, "*", &fields)
            .ignore()
            .xack(&self.stream, &self.group, &[&entry.id])
            .ignore()
            .query_async(&mut self.conn)
            .await?;
        metrics::counter!(DEAD_LETTERS, "reason" => reason_label(reason)).increment(1);
        tracing::warn!(id = %entry.id, reason, "entry sent to the dead-letter stream");
        Ok(())
    }

    pub async fn publish_dead(&mut self, dead: &[DeadLetter]) -> Result<(), QueueError> {
        for letter in dead {
            let fields = [
                ("id", letter.id.to_string()),
                ("reason", letter.reason.clone()),
                ("field:k", letter.key.hyphenated().to_string()),
                ("field:v", letter.value.to_string()),
            ];
            let _: String = self.conn.xadd(&self.dead_stream, "*", &fields).await?;
        }
        Ok(())
    }

    pub async fn ack(&mut self, ids: &[EntryId]) -> Result<(), QueueError> {
        // The flush these ids came from committed and held everything this worker had read,
        // so nothing it holds now predates the epoch its last check saw.
        if let Some(epoch) = self.checked_epoch.take() {
            self.epoch = epoch;
        }
        for chunk in ids.chunks(ACK_CHUNK) {
            let ids: Vec<String> = chunk.iter().map(EntryId::to_string).collect();
            let _: i64 = self.conn.xack(&self.stream, &self.group, &ids).await?;
        }
        Ok(())
    }

    pub fn take_claimed(&mut self) -> bool {
        std::mem::take(&mut self.claimed)
    }

    /// Of `held` (sorted), the ids pending for this consumer, with `first_delivery_only`
    /// those delivered once, and, if the group was recreated since they were read, those it
    /// knows nothing of; `None` once the group is gone. Ids past the reply's bound count as
    /// not owned: released, they are claimed back later, never lost.
    async fn owned_now(
        &mut self,
        held: &[EntryId],
        first_delivery_only: bool,
    ) -> Result<Option<Owned>, QueueError> {
        let (Some(first), Some(last)) = (held.first(), held.last()) else {
            return Ok(Some(Owned::default()));
        };
        // In this order: a group recreated between the two is then seen as a new epoch.
        let reply: Result<(StreamPendingCountReply, Option<String>), redis::RedisError> =
            redis::pipe()
                .cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(first.to_string())
                .arg(last.to_string())
                .arg(held.len() * 2 + 1_000)
                .arg(&self.consumer)
                .get(epoch_key(&self.stream, &self.group))
                .query_async(&mut self.conn)
                .await;
        let (reply, epoch) = match reply {
            Ok(reply) => reply,
            Err(err) if err.code() == Some("NOGROUP") => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        let held_set: HashSet<&EntryId> = held.iter().collect();
        let mine: HashSet<EntryId> = reply
            .ids
            .iter()
            .filter_map(|pending| {
                let id = pending.id.parse::<EntryId>().ok()?;
                let counts = !first_delivery_only || pending.times_delivered == 1;
                (counts && held_set.contains(&id)).then_some(id)
            })
            .collect();
        let pending_for_me: HashSet<EntryId> = reply
            .ids
            .iter()
            .filter_map(|pending| pending.id.parse::<EntryId>().ok())
            .collect();
        let forgotten = if epoch == self.epoch {
            HashSet::new()
        } else {
            let unknown: Vec<EntryId> = held
                .iter()
                .filter(|id| !pending_for_me.contains(id))
                .copied()
                .collect();
            self.not_pending(&unknown).await?
        };
        if !forgotten.is_empty() {
            tracing::warn!(
                entries = forgotten.len(),
                "the consumer group was recreated while this worker held entries it had read: \
                 keeping them, to be applied unless the store recorded them"
            );
        }
        self.checked_epoch = Some(epoch);
        Ok(Some(Owned {
            ids: mine,
            forgotten,
        }))
    }

    /// Of `ids`, those pending for no consumer of the group.
    async fn not_pending(&mut self, ids: &[EntryId]) -> Result<HashSet<EntryId>, QueueError> {
        let mut out = HashSet::new();
        for chunk in ids.chunks(ACK_CHUNK) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("XPENDING")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg(id.to_string())
                    .arg(id.to_string())
                    .arg(1);
            }
            let replies: Vec<StreamPendingCountReply> = pipe.query_async(&mut self.conn).await?;
            out.extend(
                chunk
                    .iter()
                    .zip(replies)
                    .filter(|(_, reply)| reply.ids.is_empty())
                    .map(|(id, _)| *id),
            );
        }
        Ok(out)
    }

    /// Resets the idle time of entries still held (JUSTID does not count a delivery).
    pub async fn touch(&mut self, ids: &[EntryId]) -> Result<(), QueueError> {
        for chunk in ids.chunks(ACK_CHUNK) {
            let ids: Vec<String> = chunk.iter().map(EntryId::to_string).collect();
            let _: Value = self
                .conn
                .xclaim_options(
                    &self.stream,
                    &self.group,
                    &self.consumer,
                    0,
                    &ids,
                    StreamClaimOptions::default().with_justid(),
                )
                .await?;
        }
        Ok(())
    }

    /// Entries not yet acknowledged: never delivered (the group's lag) plus pending.
    pub async fn depth(&mut self) -> Result<u64, QueueError> {
        let groups: StreamInfoGroupsReply = self.conn.xinfo_groups(&self.stream).await?;
        Ok(unacknowledged(&groups, &self.group).unwrap_or(0))
    }

    /// Every entry below the returned id was delivered and acknowledged (see
    /// [`floor::candidate`]).
    pub async fn prune_bound(&mut self) -> Result<Option<EntryId>, QueueError> {
        let groups: StreamInfoGroupsReply = self.conn.xinfo_groups(&self.stream).await?;
        let Some(last) = groups
            .groups
            .iter()
            .find(|group| group.name == self.group)
            .and_then(|group| group.last_delivered_id.parse::<EntryId>().ok())
        else {
            return Ok(None);
        };
        let pending: StreamPendingReply = self.conn.xpending(&self.stream, &self.group).await?;
        let oldest = match pending {
            StreamPendingReply::Data(data) => data.start_id.parse::<EntryId>().ok(),
            _ => None,
        };
        Ok(Some(floor::candidate(oldest, last)))
    }

    /// Bounds the dead-letter stream: entries added before `before_ms`, then all but the
    /// newest `keep`. Its ids are the times they were added, which `MINID` compares.
    pub async fn trim_dead_letters(
        &mut self,
        before_ms: u64,
        keep: u64,
    ) -> Result<u64, QueueError> {
        let (expired, excess): (u64, u64) = redis::pipe()
            .cmd("XTRIM")
            .arg(&self.dead_stream)
            .arg("MINID")
            .arg(format!("{before_ms}-0"))
            .cmd("XTRIM")
            .arg(&self.dead_stream)
            .arg("MAXLEN")
            .arg(keep)
            .query_async(&mut self.conn)
            .await?;
        Ok(expired + excess)
    }

    /// Deletes the entries below `bound` (see `prune_bound`: all delivered and
    /// acknowledged) so the stream holds only what is still owed, not every increment ever
    /// accepted. Returns how many entries went.
    pub async fn trim_below(&mut self, bound: EntryId) -> Result<u64, QueueError> {
        let removed: u64 = redis::cmd("XTRIM")
            .arg(&self.stream)
            .arg("MINID")
            .arg(bound.to_string())
            .query_async(&mut self.conn)
            .await?;
        Ok(removed)
    }
}

impl crate::store::Fence for RedisConsumer {
    fn owned<'a>(
        &'a mut self,
        held: &'a [EntryId],
        first_delivery_only: bool,
    ) -> futures::future::BoxFuture<'a, Result<Option<Owned>, String>> {
        Box::pin(async move {
            self.owned_now(held, first_delivery_only)
                .await
                .map_err(|err| err.to_string())
        })
    }
}

/// Entries of `group` not acknowledged yet: never delivered (its lag) plus pending.
fn unacknowledged(groups: &StreamInfoGroupsReply, group: &str) -> Option<u64> {
    groups
        .groups
        .iter()
        .find(|info| info.name == group)
        .map(|info| (info.lag.unwrap_or(0) + info.pending) as u64)
}

/// Where the epoch of `group` on `stream` lives (see the module docs).
pub fn epoch_key(stream: &str, group: &str) -> String {
    format!("{stream}:group-epoch:{group}")
}

/// Lua: creates the group with a new epoch, in one step, or returns the epoch of the group
/// that exists already (`false` for one created before epochs).
const CREATE_GROUP: &str = r"
local created = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if type(created) == 'table' and created.err then
  if string.find(created.err, 'BUSYGROUP', 1, true) then return redis.call('GET', KEYS[2]) end
  return created
end
redis.call('SET', KEYS[2], ARGV[2])
return ARGV[2]
";

/// Creates the group at the start of the stream (and the stream if it is missing) with a
/// new epoch; a group that exists already is fine. Returns the group's epoch.
async fn create_group(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> Result<Option<String>, QueueError> {
    Ok(redis::Script::new(CREATE_GROUP)
        .key(stream)
        .key(epoch_key(stream, group))
        .arg(group)
        .arg(uuid::Uuid::new_v4().simple().to_string())
        .invoke_async(conn)
        .await?)
}

fn value_text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(text) => text.clone(),
        Value::Int(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

fn reason_label(reason: &str) -> &'static str {
    if reason.starts_with("delivered") {
        "max_deliveries"
    } else {
        "malformed"
    }
}
