//! Where totals are persisted: a SQLite file (embedded default) or Postgres.
//!
//! Every flush is one transaction that (1) decides which entries are new, by the log
//! watermark or by recording each stream entry id, (2) reads and locks the current totals
//! of its keys in ascending order, (3) applies the [`plan`](crate::aggregate::plan), and (4)
//! records what it applied. A crash between the commit and the queue acknowledgement
//! therefore never counts an increment twice: the redelivered entries are recognised.

pub mod fence;
pub mod floor;
pub mod postgres;
pub mod sqlite;

use std::collections::HashSet;
use std::sync::Arc;

use uuid::Uuid;

use crate::aggregate::{DeadLetter, EntryId, Pending};
use crate::config::IncrementsConfig;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {}", describe_postgres(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres pool: {0}")]
    Pool(String),
    #[error("invalid table prefix {0:?}: use letters, digits and underscores")]
    TablePrefix(String),
    #[error("a database value is out of range: {0}")]
    Range(String),
    #[error("the database task failed: {0}")]
    Task(String),
    #[error("cannot ask the queue which entries this worker still owns: {0}")]
    Fence(String),
    #[error("cannot create {0}: {1}")]
    Io(String, std::io::Error),
}

/// How a flush tells new entries from ones it applied before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dedupe {
    /// The embedded log: one consumer, entries in sequence order; a per-source high-water
    /// mark is enough and costs one row.
    Watermark,
    /// A Redis stream: several workers, entries interleaved and reclaimed out of order;
    /// every applied id is recorded.
    Ids,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushReport {
    pub applied: usize,
    pub duplicates: usize,
    pub keys: usize,
    pub dead: Vec<DeadLetter>,
    /// Held entries another worker has taken over since they were read (this worker was
    /// paused or slow): neither applied nor to be acknowledged here, they are the new
    /// owner's.
    pub released: Vec<EntryId>,
}

/// What the queue says of the entries a worker holds (see [`Fence`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    /// Still pending for this worker (with `first_delivery_only`, and delivered once).
    pub ids: HashSet<EntryId>,
    /// Read from a consumer group that has since been lost and recreated, and unknown to
    /// the new one: still this worker's to apply, but only the store's records can say
    /// whether it already did, so they go by the exclusive path.
    pub forgotten: HashSet<EntryId>,
}

/// Whether a worker still owns the entries it holds, asked inside the flush transaction
/// (see [`fence`]).
pub trait Fence: Send {
    /// Which of `held` (sorted, no repeats) are still this worker's; with
    /// `first_delivery_only`, only those never delivered to any other worker count as
    /// pending for it. `None` when the queue cannot say (its group is gone).
    fn owned<'a>(
        &'a mut self,
        held: &'a [EntryId],
        first_delivery_only: bool,
    ) -> futures::future::BoxFuture<'a, Result<Option<Owned>, String>>;
}

/// A flush's fencing: the queue to ask, and whether the flush must take the exclusive
/// path (see [`fence`]).
pub struct Fencing<'a> {
    pub fence: &'a mut dyn Fence,
    pub exclusive: bool,
}

/// One keyed request for [`Store::apply_keyed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedIncrement {
    /// The scoped key ([`crate::idempotency::scoped`]).
    pub key: String,
    pub fingerprint: String,
    pub increment: crate::validate::Increment,
}

/// Source of the dead letters of keyed increments (a total past i64), whose id is the time
/// and the key's CRC-32C: unique per key within its retention.
pub const KEYED_SOURCE: &str = "idempotency";

/// The dead letter of a keyed increment that would take its total past i64.
fn keyed_dead_letter(keyed: &KeyedIncrement, total: i64, now_ms: i64) -> DeadLetter {
    DeadLetter {
        id: EntryId {
            ms: u64::try_from(now_ms).unwrap_or(0),
            seq: u64::from(crc32c::crc32c(keyed.key.as_bytes())),
        },
        key: keyed.increment.key,
        value: keyed.increment.value,
        reason: crate::aggregate::overflow_reason(total, keyed.increment.value),
    }
}

/// How many dead letters a store keeps: whichever bound is hit first prunes the oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterRetention {
    pub max_age: std::time::Duration,
    pub max_rows: u64,
}

/// The persisted total of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    pub total: i64,
    /// When the last flush that changed this key committed (ms since the epoch).
    pub updated_ms: i64,
}

/// Table names, validated once so that they can be spliced into SQL.
#[derive(Debug, Clone)]
pub struct Tables {
    pub counts: String,
    pub marks: String,
    pub applied: String,
    pub dead: String,
    /// One row per fast-path flush of a Redis stream: the ids it applied (see [`fence`]).
    pub batches: String,
    /// `Idempotency-Key`s of the embedded mode, with the request each was used for.
    pub keys: String,
    /// When each writing process last committed, for `/readyz` of processes that do not
    /// flush themselves.
    pub flushes: String,
}

impl Tables {
    pub fn new(prefix: &str) -> Result<Self, StoreError> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 40
            && prefix
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(StoreError::TablePrefix(prefix.to_string()));
        }
        Ok(Tables {
            counts: format!("{prefix}_counts"),
            marks: format!("{prefix}_marks"),
            applied: format!("{prefix}_applied"),
            dead: format!("{prefix}_dead_letters"),
            batches: format!("{prefix}_applied_batches"),
            keys: format!("{prefix}_idempotency_keys"),
            flushes: format!("{prefix}_flushes"),
        })
    }
}

#[derive(Clone)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PostgresStore),
}

impl Store {
    /// Opens (and migrates) the database the config names.
    pub async fn open(config: &IncrementsConfig) -> Result<Store, StoreError> {
        let tables = Tables::new(&config.table_prefix)?;
        match &config.database_url {
            Some(url) => Ok(Store::Postgres(
                postgres::PostgresStore::open(
                    url,
                    tables,
                    config.chunk_size,
                    flush_timeout(config),
                )
                .await?,
            )),
            None => Ok(Store::Sqlite(
                sqlite::SqliteStore::open(&config.sqlite_path(), tables)
                    .await?
                    .with_keyed_fsync(config.fsync),
            )),
        }
    }

    pub async fn flush(
        &self,
        source: &str,
        dedupe: Dedupe,
        pending: Arc<Pending>,
        now_ms: i64,
        fencing: Option<Fencing<'_>>,
    ) -> Result<FlushReport, StoreError> {
        match (self, fencing) {
            // One SQLite file has one writing process: no other worker can hold a copy.
            (Store::Sqlite(store), _) => store.flush(source, dedupe, pending, now_ms).await,
            (Store::Postgres(store), Some(fencing)) if dedupe == Dedupe::Ids => {
                store.flush_fenced(source, &pending, now_ms, fencing).await
            }
            (Store::Postgres(store), _) => store.flush(source, dedupe, &pending, now_ms).await,
        }
    }

    /// The highest log sequence number applied for `source` (0 if none).
    pub async fn watermark(&self, source: &str) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(store) => store.watermark(source).await,
            Store::Postgres(store) => store.watermark(source).await,
        }
    }

    pub async fn count(&self, key: Uuid) -> Result<Option<Count>, StoreError> {
        match self {
            Store::Sqlite(store) => store.count(key).await,
            Store::Postgres(store) => store.count(key).await,
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(store) => store.ping().await,
            Store::Postgres(store) => store.ping().await,
        }
    }

    /// Forgets recorded ids below `below`: they were acknowledged and cannot come back.
    pub async fn prune_applied(&self, source: &str, below: EntryId) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(store) => store.prune_applied(source, below).await,
            Store::Postgres(store) => store.prune_applied(source, below).await,
        }
    }

    /// Lowers the low-water mark of `source` to at most `first` (see [`floor`]): after the
    /// stream was lost and recreated, its new ids follow Redis' clock, which may now be
    /// behind the old mark.
    pub async fn lower_floor(&self, source: &str, first: EntryId) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(_) => Ok(()),
            Store::Postgres(store) => store.lower_floor(source, first).await,
        }
    }

    /// Keeps the low-water mark of `source` where it is until `until_ms`: a consumer group
    /// was just (re)created, and workers may still hold entries read from the lost one,
    /// which the new group's state, from which the mark moves, knows nothing of. (SQLite
    /// has one worker, whose own held entries bound its pruning.)
    pub async fn hold_floor(&self, source: &str, until_ms: i64) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(_) => Ok(()),
            Store::Postgres(store) => store.hold_floor(source, until_ms).await,
        }
    }

    /// Deletes dead letters older than `retention.max_age`, then all but the newest
    /// `retention.max_rows`, so the table stays bounded whatever goes wrong for how long.
    /// Returns how many went.
    pub async fn prune_dead_letters(
        &self,
        source: &str,
        now_ms: i64,
        retention: DeadLetterRetention,
    ) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(store) => store.prune_dead_letters(now_ms, retention).await,
            Store::Postgres(store) => {
                let max_age_ms = i64::try_from(retention.max_age.as_millis()).unwrap_or(i64::MAX);
                let before_ms = now_ms.saturating_sub(max_age_ms);
                store
                    .prune_dead_letters(source, before_ms, retention.max_rows)
                    .await
            }
        }
    }

    /// Records each keyed request's key and, if the key is new, adds its increment to the
    /// total, in one transaction: the key and its effect become durable together. Returns
    /// what each request found, in order.
    pub async fn apply_keyed(
        &self,
        batch: Vec<KeyedIncrement>,
        now_ms: i64,
    ) -> Result<Vec<crate::idempotency::Recorded>, StoreError> {
        match self {
            Store::Sqlite(store) => store.apply_keyed(batch, now_ms).await,
            Store::Postgres(store) => store.apply_keyed(batch, now_ms).await,
        }
    }

    /// Forgets keys older than `before_ms`, and the commit times of writers silent since
    /// then. Returns how many keys went.
    pub async fn prune_keys(&self, before_ms: i64) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(store) => store.prune_keys(before_ms).await,
            Store::Postgres(store) => store.prune_keys(before_ms).await,
        }
    }

    /// When any process last committed to this database (ms since the epoch).
    pub async fn last_commit_ms(&self) -> Result<Option<i64>, StoreError> {
        match self {
            Store::Sqlite(store) => store.last_commit_ms().await,
            Store::Postgres(store) => store.last_commit_ms().await,
        }
    }

    /// Dead letters recorded for `source`, oldest first (for operators and tests).
    pub async fn dead_letters(&self, source: &str) -> Result<Vec<DeadLetter>, StoreError> {
        match self {
            Store::Sqlite(store) => store.dead_letters(source).await,
            Store::Postgres(store) => store.dead_letters(source).await,
        }
    }
}

/// How long a flush may wait for a lock or one statement before it gives up and retries:
/// half the claim threshold, so a flush stuck behind a lock is abandoned (its entries kept
/// and refreshed) before other workers would take its entries over.
fn flush_timeout(config: &IncrementsConfig) -> std::time::Duration {
    std::time::Duration::from_millis(config.claim_idle_ms / 2)
}

/// The SQLSTATE and message of a database error (`db error` alone says nothing), or the
/// client error with its cause.
fn describe_postgres(err: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    match err.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!(": {detail}"));
            }
            text
        }
        None => match err.source() {
            Some(cause) => format!("{err}: {cause}"),
            None => err.to_string(),
        },
    }
}

pub(crate) fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Range(value.to_string()))
}

pub(crate) fn to_u64(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Range(value.to_string()))
}
