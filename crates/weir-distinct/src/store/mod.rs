//! The shard stores (SQLite files, or Postgres tables): each tenant's items live in one
//! shard, and only the process holding a shard's lock writes it, so whether an item is new
//! is decided in one place.
//!
//! An acknowledged item is durable. SQLite acknowledges once the items are appended to the
//! shard's log and counts them within `fold_after` (see [`sqlite`]); Postgres commits the
//! rows and the per-tenant counts in one transaction before it answers. Either way reading
//! a count is one primary-key lookup.

pub mod postgres;
pub mod repair;
pub mod sqlite;

use std::time::Duration;

use crate::shard::{decode_items, group_by_shard, Batch, Item};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// A shard whose files fail their checks: acknowledged items are in it that cannot be
/// read, so neither its count nor a write to it can be trusted until it is repaired.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Damage {
    pub shard: u16,
    /// The damaged file.
    pub file: String,
    /// Where in it the damage starts.
    pub offset: u64,
    pub reason: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "shard {} is damaged: {} at byte {}: {}; its counts and writes are refused until \
             `weir distinct repair --shard {}` moves the damage aside",
            self.shard, self.file, self.offset, self.reason, self.shard
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Damaged(Damage),
    /// Another process holds the shard: the caller should send its items to that process.
    #[error("shard {shard} is owned by another worker: {reason}")]
    Busy { shard: u16, reason: String },
    #[error("shard {shard}: {source}")]
    Sqlite { shard: u16, source: rusqlite::Error },
    #[error("shard {shard}: the commit failed: {message}")]
    Commit { shard: u16, message: String },
    #[error("shard {shard}'s log: {message}")]
    Log { shard: u16, message: String },
    #[error("shard {shard}: {source}")]
    Open {
        shard: u16,
        source: weir_runtime::datadir::DataDirError,
    },
    #[error("shard {0}'s writer has stopped")]
    WriterGone(u16),
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("database {path}: {message}")]
    Database { path: String, message: String },
    #[error("a blocking store task failed: {0}")]
    Task(String),
}

/// How a store writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Shards in the store; must be the same for every process sharing it.
    pub shards: u16,
    /// Sync each commit to disk (survives power loss); without it a commit survives the
    /// death of any process but not of the machine.
    pub fsync: bool,
    /// Most items one group commit takes from the requests waiting for a shard: bounds a
    /// transaction's memory and how long it keeps later requests waiting.
    pub max_group_items: usize,
    /// The longest an acknowledged item waits in a shard's log before it is counted
    /// (`worker_persist`); zero counts it before the acknowledgement. SQLite only.
    pub fold_after: Duration,
    /// Threads folding logged items into the SQLite index.
    pub folders: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            shards: crate::shard::SHARDS,
            fsync: false,
            max_group_items: 50_000,
            fold_after: Duration::from_millis(500),
            folders: 2,
        }
    }
}

/// A store, whichever engine is behind it.
#[derive(Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl Store {
    /// Makes `items` durable and counted. Items already stored count nothing, so sending
    /// the same items again (a retry after any failure) is always safe. On an error some
    /// shards may have committed; the caller answers non-2xx and a retry completes the rest.
    pub async fn insert(&self, items: Vec<Item>) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(store) => {
                store
                    .insert_batch(Batch::from_items(&items, self.options().shards))
                    .await
            }
            Store::Postgres(store) => Self::insert_postgres(store, items).await,
        }
    }

    /// As [`insert`](Self::insert), for items already encoded per shard (the request path:
    /// no allocation per item).
    pub async fn insert_batch(&self, batch: Batch) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(store) => store.insert_batch(batch).await,
            Store::Postgres(store) => {
                let mut pairs = Vec::with_capacity(batch.items);
                for (shard, bytes) in &batch.groups {
                    decode_items(bytes, &mut pairs).map_err(|err| StoreError::Log {
                        shard: *shard,
                        message: err.to_string(),
                    })?;
                }
                let items = pairs
                    .into_iter()
                    .map(|(tenant, id)| Item {
                        tenant: tenant.to_string(),
                        id: id.to_string(),
                    })
                    .collect();
                Self::insert_postgres(store, items).await
            }
        }
    }

    async fn insert_postgres(store: &PostgresStore, items: Vec<Item>) -> Result<(), StoreError> {
        let groups = group_by_shard(items, store.options().shards);
        let writes = groups
            .into_iter()
            .map(|(shard, items)| store.insert_shard(shard, items));
        // Shards commit in parallel, each on its own writer.
        for result in futures::future::join_all(writes).await {
            result?;
        }
        Ok(())
    }

    pub fn options(&self) -> StoreOptions {
        match self {
            Store::Sqlite(store) => store.options(),
            Store::Postgres(store) => store.options(),
        }
    }

    /// Counts every item acknowledged so far (SQLite folds what its logs hold; Postgres
    /// counts at once).
    pub async fn flush(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(store) => store.flush().await,
            Store::Postgres(_) => Ok(()),
        }
    }

    /// The number of distinct items ever stored for `tenant`.
    pub async fn count(&self, tenant: &str) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(store) => store.count(tenant).await,
            Store::Postgres(store) => store.count(tenant).await,
        }
    }

    /// The shards known to be damaged (SQLite; Postgres checks its own pages).
    pub fn damaged(&self) -> Vec<Damage> {
        match self {
            Store::Sqlite(store) => store.damaged(),
            Store::Postgres(_) => Vec::new(),
        }
    }

    /// Stops every writer after it has committed what it holds.
    pub async fn close(self) {
        match self {
            Store::Sqlite(store) => store.close().await,
            Store::Postgres(store) => store.close().await,
        }
    }
}
