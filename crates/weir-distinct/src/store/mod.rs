//! The shard stores (SQLite files, or Postgres tables): each tenant's items live in one shard, and only the process holding a
//! shard's lock writes it, so whether an item is new is decided in one place.
//!
//! A write commits the rows and the per-tenant counts in one transaction before it returns,
//! so an acknowledged item is durable and already counted; reading a count is one
//! primary-key lookup.

pub mod postgres;
pub mod sqlite;

use crate::shard::{group_by_shard, Item};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the shard: the caller should send its items to that process.
    #[error("shard {shard} is owned by another worker: {reason}")]
    Busy { shard: u16, reason: String },
    #[error("shard {shard}: {source}")]
    Sqlite { shard: u16, source: rusqlite::Error },
    #[error("shard {shard}: the commit failed: {message}")]
    Commit { shard: u16, message: String },
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
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            shards: crate::shard::SHARDS,
            fsync: false,
            max_group_items: 50_000,
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
        let groups = group_by_shard(items, self.options().shards);
        let writes = groups.into_iter().map(|(shard, items)| async move {
            match self {
                Store::Sqlite(store) => store.insert_shard(shard, items).await,
                Store::Postgres(store) => store.insert_shard(shard, items).await,
            }
        });
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

    /// The number of distinct items ever stored for `tenant`.
    pub async fn count(&self, tenant: &str) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(store) => store.count(tenant).await,
            Store::Postgres(store) => store.count(tenant).await,
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
