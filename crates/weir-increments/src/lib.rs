//! The increments service: `POST /increment` answers 202 once the increment is durable in
//! a queue; workers sum per key and persist the totals at most ten seconds late, each
//! increment exactly once, across crashes of any process.
//!
//! Pure logic, synchronous and unit-tested:
//! - [`validate`]: one request body to an [`validate::Increment`] or the exact reason not.
//! - [`aggregate`]: per-key sums, and the plan of one flush (duplicates skipped, overflows
//!   dead-lettered) that the stores apply inside their transaction.
//!
//! I/O at the edges:
//! - [`server`]: the axum API (auth, rate limit, `/readyz`, `/openapi.json` from [`openapi`]).
//! - [`queue`]: the embedded group-commit log ([`queue::embedded`]) or Redis Streams
//!   ([`queue::redis`]).
//! - [`store`]: SQLite ([`store::sqlite`]) or Postgres ([`store::postgres`]).
//! - [`worker`]: the read, sum, flush, acknowledge loop.
//! - [`bench`]: `weir increments bench`, the load generator and the bare 202 ceiling.
//!
//! [`config`] holds the settings; [`run`] starts any [`Role`].

pub mod aggregate;
pub mod bench;
pub mod config;
pub mod health;
pub mod openapi;
pub mod proxy;
pub mod queue;
pub mod server;
pub mod store;
pub mod validate;
pub mod worker;

use std::sync::Arc;

use tokio::net::TcpListener;
use weir_runtime::Shutdown;

use crate::config::IncrementsConfig;
use crate::queue::redis::{RedisConsumer, RedisProducer};
use crate::queue::{Consumer, Producer, QueueError};
use crate::store::{Store, StoreError};
use crate::worker::{Worker, WorkerHealth};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// API and worker in one process (the only role the embedded queue allows).
    Serve,
    /// API only: needs Redis.
    Api,
    /// Worker only: needs Redis.
    Worker,
}

#[derive(Debug, thiserror::Error)]
pub enum IncrementsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("the {0:?} role needs a Redis queue (--queue redis://... or REDIS_URL)")]
    NeedsRedis(Role),
    #[error("the {0:?} role needs a listener")]
    NeedsListener(Role),
    #[error("the API server failed: {0}")]
    Serve(#[from] std::io::Error),
    #[error(transparent)]
    DataDir(#[from] weir_runtime::datadir::DataDirError),
    #[error("invalid configuration: {0}")]
    Config(#[from] config::InvalidConfig),
}

/// Starts `role` and returns when it has stopped: after `shutdown.token` is cancelled, the
/// API stops accepting and drains, then the worker flushes and acknowledges what it holds.
pub async fn run(
    listener: Option<TcpListener>,
    config: IncrementsConfig,
    role: Role,
    shutdown: Shutdown,
) -> Result<(), IncrementsError> {
    config.validate()?;
    health::register_metrics();
    let token = shutdown.token.clone();
    let needs_store = role != Role::Api || config.database_url.is_some();
    let uses_data_dir =
        config.redis_url.is_none() || (needs_store && config.database_url.is_none());
    // Held until this function returns: a second process on the same directory would number
    // its log records from the same place and lose half of what both acknowledged.
    let _data_dir = if uses_data_dir {
        Some(weir_runtime::datadir::lock(&config.data_dir, "--data-dir")?)
    } else {
        None
    };
    let store = if needs_store {
        Some(Store::open(&config).await?)
    } else {
        None
    };
    let (producer, consumer) = match (&config.redis_url, role) {
        (None, Role::Serve) => {
            let store = store.as_ref().ok_or(StoreError::Task("no store".into()))?;
            let watermark = store.watermark("embedded").await?;
            let (producer, consumer) =
                queue::embedded::open(&config.log_dir(), watermark, config.fsync)?;
            (
                Some(Producer::Embedded(producer)),
                Some(Consumer::Embedded(consumer)),
            )
        }
        (None, role) => return Err(IncrementsError::NeedsRedis(role)),
        (Some(url), role) => {
            let producer = if role == Role::Worker {
                None
            } else {
                Some(Producer::Redis(RedisProducer::connect(&config, url).await?))
            };
            let consumer = if role == Role::Api {
                None
            } else {
                Some(Consumer::Redis(Box::new(
                    RedisConsumer::connect(&config, url).await?,
                )))
            };
            (producer, consumer)
        }
    };
    let mut health = None;
    let worker_done = match (consumer, store.clone()) {
        (Some(consumer), Some(store)) => {
            let state = Arc::new(WorkerHealth::default());
            health = Some(state.clone());
            let worker = Worker::new(consumer, store, &config, state);
            let token = token.clone();
            Some(shutdown.tracker.spawn(async move {
                worker.run(token).await;
            }))
        }
        _ => None,
    };
    let router = http_router(&config, producer, listener.is_some(), store, health);
    if let Some(router) = router {
        let listener = listener.ok_or(IncrementsError::NeedsListener(role))?;
        let limits = config.listener_limits();
        let served = weir_runtime::http::serve(listener, router, limits, token.clone()).await;
        if let Err(err) = served {
            // Stop the worker too: without an API the embedded log never closes.
            token.cancel();
            return Err(err.into());
        }
    }
    if let Some(done) = worker_done {
        if let Err(err) = done.await {
            tracing::error!(%err, "worker task failed");
        }
    }
    Ok(())
}

/// What this process serves over HTTP: the API when it has a producer, else (a worker
/// given a listener) the probes.
fn http_router(
    config: &IncrementsConfig,
    producer: Option<Producer>,
    has_listener: bool,
    store: Option<Store>,
    health: Option<Arc<WorkerHealth>>,
) -> Option<axum::Router> {
    match (producer, has_listener, health) {
        (Some(producer), _, health) => {
            let state = server::AppState::new(config, producer, store, health);
            Some(server::router(state))
        }
        // A worker given a listener answers probes: ready while it can flush.
        (None, true, Some(health)) => {
            store.map(|store| server::worker_router(store, health, config))
        }
        (None, _, _) => None,
    }
}
