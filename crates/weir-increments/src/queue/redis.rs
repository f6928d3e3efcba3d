//! Redis Streams: API replicas `XADD`, workers read through one consumer group.
//!
//! A worker acknowledges (`XACK`) only after the flush that applied an entry committed, so
//! an entry read by a worker that dies stays pending; other workers take it over with
//! `XAUTOCLAIM` once it has been idle for `claimIdleMs`. Entries delivered `maxDeliveries`
//! times without a commit, and entries that cannot be decoded, go to the dead-letter
//! stream with their reason instead of blocking the group.

use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamClaimOptions, StreamClaimReply, StreamId,
    StreamInfoGroupsReply, StreamPendingCountReply, StreamPendingReply, StreamReadOptions,
    StreamReadReply,
};
use redis::{AsyncCommands, Value};
use uuid::Uuid;

use super::{Next, QueueError};
use crate::aggregate::{DeadLetter, EntryId, Item};
use crate::config::IncrementsConfig;
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
}

impl RedisProducer {
    pub async fn connect(config: &IncrementsConfig, url: &str) -> Result<Self, QueueError> {
        Ok(RedisProducer {
            conn: connect(url, Some(Duration::from_secs(5))).await?,
            stream: config.stream.clone(),
        })
    }

    pub async fn enqueue(&self, increment: Increment) -> Result<(), QueueError> {
        // Concurrent requests share one multiplexed connection, so their XADDs are
        // pipelined on the wire without any batching code here.
        let mut conn = self.conn.clone();
        let _: String = conn
            .xadd(
                &self.stream,
                "*",
                &[
                    ("k", increment.key.hyphenated().to_string()),
                    ("v", increment.value.to_string()),
                ],
            )
            .await?;
        Ok(())
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
}

impl RedisConsumer {
    pub async fn connect(config: &IncrementsConfig, url: &str) -> Result<Self, QueueError> {
        let mut conn = connect(url, Some(Duration::from_secs(5))).await?;
        // Reads block on the server, so they get their own connection without a timeout
        // shorter than the block.
        let reader = connect(url, Some(Duration::from_secs(30))).await?;
        let created: Result<(), redis::RedisError> = conn
            .xgroup_create_mkstream(&config.stream, &config.group, "0")
            .await;
        if let Err(err) = created {
            if err.code() != Some("BUSYGROUP") {
                return Err(err.into());
            }
        }
        Ok(RedisConsumer {
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
        })
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub async fn next(&mut self, wait: Duration) -> Result<Next, QueueError> {
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
            match decode(&entry) {
                Ok(item) => items.push(item),
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
        let _: String = self.conn.xadd(&self.dead_stream, "*", &fields).await?;
        let _: i64 = self
            .conn
            .xack(&self.stream, &self.group, &[&entry.id])
            .await?;
        metrics::counter!("increments_dead_letters_total", "reason" => reason_label(reason))
            .increment(1);
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
        for chunk in ids.chunks(ACK_CHUNK) {
            let ids: Vec<String> = chunk.iter().map(EntryId::to_string).collect();
            let _: i64 = self.conn.xack(&self.stream, &self.group, &ids).await?;
        }
        Ok(())
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
        Ok(groups
            .groups
            .iter()
            .find(|group| group.name == self.group)
            .map_or(0, |group| (group.lag.unwrap_or(0) + group.pending) as u64))
    }

    /// Every entry below the returned id that was ever delivered has been acknowledged:
    /// it is below the group's oldest pending entry, and was delivered before we looked.
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
        let after_last = EntryId {
            ms: last.ms,
            seq: last.seq.saturating_add(1),
        };
        let pending: StreamPendingReply = self.conn.xpending(&self.stream, &self.group).await?;
        Ok(Some(match pending {
            StreamPendingReply::Data(data) => data
                .start_id
                .parse::<EntryId>()
                .map_or(after_last, |oldest| oldest.min(after_last)),
            _ => after_last,
        }))
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

fn decode(entry: &StreamId) -> Result<Item, String> {
    let id: EntryId = entry
        .id
        .parse()
        .map_err(|()| format!("malformed entry id {:?}", entry.id))?;
    let key = entry
        .map
        .get("k")
        .map(value_text)
        .ok_or("malformed entry: no field k")?;
    let key =
        Uuid::try_parse(&key).map_err(|err| format!("malformed entry: k is not a UUID: {err}"))?;
    let value = entry
        .map
        .get("v")
        .map(value_text)
        .ok_or("malformed entry: no field v")?;
    let value: i64 = value
        .parse()
        .map_err(|err| format!("malformed entry: v is not an integer: {err}"))?;
    if value < 1 {
        return Err(format!(
            "malformed entry: v must be at least 1, got {value}"
        ));
    }
    Ok(Item { id, key, value })
}
