//! Where accepted increments wait for a worker: the embedded log (one process) or a
//! Redis stream (any number of API replicas and workers).

pub mod embedded;
pub mod entry;
pub mod redis;

use std::path::Path;
use std::time::Duration;

use crate::aggregate::{DeadLetter, EntryId, Item, Pending};
use crate::store::{Dedupe, Store};
use crate::validate::Increment;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue is closed")]
    Closed,
    #[error("cannot write to the log: {0}")]
    Write(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: damaged log record at byte {offset}: {detail}")]
    Damaged {
        path: String,
        offset: u64,
        detail: String,
    },
    #[error("{dir}: record {seq} is committed but no log segment holds it")]
    Missing { dir: String, seq: u64 },
    #[error("the log reader failed: {0}")]
    Reader(String),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("cannot append to the stream: {0}")]
    Append(String),
    #[error("the queue is full: {0} waiting (increments, or stream entries in Redis mode), at least maxQueueDepth")]
    Full(u64),
    #[error("the stream {0} or its consumer group is gone")]
    StreamLost(String),
    #[error("cannot lower the low-water mark before recreating the group: {0}")]
    Mark(String),
}

impl QueueError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        QueueError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// The API's side of the queue.
#[derive(Clone)]
pub enum Producer {
    Embedded(embedded::Producer),
    Redis(redis::RedisProducer),
}

impl Producer {
    /// Resolves once the increment is durable in the queue: the 202 may then be sent.
    pub async fn enqueue(&self, increment: Increment) -> Result<(), QueueError> {
        match self {
            Producer::Embedded(producer) => producer.enqueue(increment).await,
            Producer::Redis(producer) => producer.enqueue(increment).await,
        }
    }

    /// Unflushed increments (embedded) or unacknowledged entries (Redis, as last read),
    /// when this process knows.
    pub fn depth(&self) -> Option<u64> {
        match self {
            Producer::Embedded(producer) => Some(producer.depth()),
            Producer::Redis(producer) => producer.depth(),
        }
    }

    pub async fn check(&self) -> Result<(), QueueError> {
        match self {
            Producer::Embedded(producer) if producer.is_open() => Ok(()),
            Producer::Embedded(_) => Err(QueueError::Closed),
            Producer::Redis(producer) => producer.ping().await,
        }
    }
}

pub enum Next {
    Items(Vec<Item>),
    Idle,
    Closed,
}

/// The worker's side of the queue.
pub enum Consumer {
    Embedded(embedded::Consumer),
    Redis(Box<redis::RedisConsumer>),
}

impl Consumer {
    /// The name under which the store records what it applied.
    pub fn source(&self) -> String {
        match self {
            Consumer::Embedded(_) => "embedded".to_string(),
            Consumer::Redis(consumer) => consumer.stream().to_string(),
        }
    }

    pub fn dedupe(&self) -> Dedupe {
        match self {
            Consumer::Embedded(_) => Dedupe::Watermark,
            Consumer::Redis(_) => Dedupe::Ids,
        }
    }

    /// Waits at most `wait` for more increments. Cancel-safe in neither case is needed:
    /// the worker never drops this future, it bounds it with `wait` instead.
    pub async fn next(&mut self, wait: Duration) -> Result<Next, QueueError> {
        match self {
            // Only the wait is bounded by `wait`: the read itself then always completes.
            Consumer::Embedded(consumer) => match tokio::time::timeout(wait, consumer.wait()).await
            {
                Ok(true) => Ok(Next::Items(consumer.read().await?)),
                Ok(false) => Ok(Next::Closed),
                Err(_) => Ok(Next::Idle),
            },
            Consumer::Redis(consumer) => consumer.next(wait).await,
        }
    }

    /// Tells the queue that `pending` is committed, so it is never delivered again;
    /// `released` entries are another worker's now and left to it.
    pub async fn ack(&mut self, pending: &Pending, released: &[EntryId]) -> Result<(), QueueError> {
        match self {
            Consumer::Embedded(consumer) => {
                consumer.settled(pending.len as u64);
                match pending.max_seq() {
                    Some(seq) => consumer.release(seq),
                    None => Ok(()),
                }
            }
            Consumer::Redis(consumer) => {
                let released: std::collections::HashSet<&EntryId> = released.iter().collect();
                let ids: Vec<EntryId> = pending.ids().filter(|id| !released.contains(id)).collect();
                consumer.ack(&ids).await
            }
        }
    }

    /// Where a flush asks which held entries are still this worker's (Redis only: the
    /// embedded log has one consumer).
    pub fn fence(&mut self) -> Option<&mut dyn crate::store::Fence> {
        match self {
            Consumer::Embedded(_) => None,
            Consumer::Redis(consumer) => Some(consumer.as_mut()),
        }
    }

    /// Whether entries taken over from another worker arrived since the last call: the
    /// flush that holds them must take the exclusive path (see `store::fence`).
    pub fn take_claimed(&mut self) -> bool {
        match self {
            Consumer::Embedded(_) => false,
            Consumer::Redis(consumer) => consumer.take_claimed(),
        }
    }

    /// Copies increments the store dead-lettered to the dead-letter stream (Redis only;
    /// the embedded mode keeps them in the store's dead-letter table alone).
    pub async fn publish_dead(&mut self, dead: &[DeadLetter]) -> Result<(), QueueError> {
        match self {
            Consumer::Redis(consumer) if !dead.is_empty() => consumer.publish_dead(dead).await,
            _ => Ok(()),
        }
    }

    /// Keeps entries this worker holds from looking abandoned to the other workers.
    pub async fn keep_alive(&mut self, held: Vec<EntryId>) -> Result<(), QueueError> {
        match self {
            Consumer::Embedded(_) => Ok(()),
            Consumer::Redis(consumer) => consumer.touch(&held).await,
        }
    }

    /// Increments accepted and not yet committed.
    pub async fn depth(&mut self) -> Result<u64, QueueError> {
        match self {
            Consumer::Embedded(consumer) => Ok(consumer.depth()),
            Consumer::Redis(consumer) => consumer.depth().await,
        }
    }

    /// Below which id recorded entry ids may be forgotten (see `Store::prune_applied`).
    pub async fn prune_bound(&mut self) -> Result<Option<EntryId>, QueueError> {
        match self {
            Consumer::Embedded(_) => Ok(None),
            Consumer::Redis(consumer) => consumer.prune_bound().await,
        }
    }

    /// After `QueueError::StreamLost`: recreates the consumer group (Redis only), with the
    /// store's mark lowered first if the stream is a new one.
    pub async fn recover_lost_group(&mut self, store: &Store) -> Result<(), QueueError> {
        match self {
            Consumer::Embedded(_) => Ok(()),
            Consumer::Redis(consumer) => consumer.recover_lost_group(Some(store)).await,
        }
    }

    /// How many times the queue itself was found lost and recreated (Redis only).
    pub fn streams_lost(&self) -> u64 {
        match self {
            Consumer::Embedded(_) => 0,
            Consumer::Redis(consumer) => consumer.streams_lost(),
        }
    }

    /// Bounds the dead-letter stream (Redis only): see `RedisConsumer::trim_dead_letters`.
    pub async fn trim_dead_letters(
        &mut self,
        before_ms: u64,
        keep: u64,
    ) -> Result<u64, QueueError> {
        match self {
            Consumer::Embedded(_) => Ok(0),
            Consumer::Redis(consumer) => consumer.trim_dead_letters(before_ms, keep).await,
        }
    }

    /// Drops acknowledged entries below `bound` from the queue itself.
    pub async fn trim_below(&mut self, bound: EntryId) -> Result<u64, QueueError> {
        match self {
            Consumer::Embedded(_) => Ok(0),
            Consumer::Redis(consumer) => consumer.trim_below(bound).await,
        }
    }
}
