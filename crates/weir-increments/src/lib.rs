//! The increments service: `POST /increment` answers 202 once the increment is durable in
//! a queue; workers sum per key and persist the totals at most ten seconds late, each
//! increment exactly once, across crashes of any process.
//!
//! Pure logic, synchronous and unit-tested:
//! - [`validate`]: one request body to an [`validate::Increment`] or the exact reason not.
//! - [`aggregate`]: per-key sums, and the plan of one flush (duplicates skipped, overflows
//!   dead-lettered) that the stores apply inside their transaction.
//! - [`idempotency`]: the `Idempotency-Key` header, what counts as a repeat, and the answer.
//!
//! I/O at the edges:
//! - [`server`]: the axum API (auth, rate limit, `/readyz`, `/openapi.json` from [`openapi`]).
//! - [`queue`]: the embedded group-commit log ([`queue::embedded`]) or Redis Streams
//!   ([`queue::redis`]).
//! - [`store`]: SQLite ([`store::sqlite`]) or Postgres ([`store::postgres`]).
//! - [`worker`]: the read, sum, flush, acknowledge loop.
//! - [`keyed_writer`]: the embedded mode's keyed requests, group-committed with their keys.
//! - [`health`]: what `/readyz` reports; [`metric_names`]: every metric, with help text.
//! - [`bench`]: `weir increments bench`, the load generator and the bare 202 ceiling.
//!
//! [`config`] holds the settings; [`run`] starts any [`Role`].

pub mod aggregate;
pub mod bench;
pub mod config;
pub mod health;
pub mod idempotency;
pub mod keyed_writer;
pub mod metric_names;
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
    start(listener, config, role, shutdown).await?.serve().await
}

/// A started service: its data directory locked, its store and queue open, its worker
/// running. What can fail at start-up has failed by the time this exists, so a caller that
/// starts several services can tell "cannot start" from "stopped later".
pub struct Running {
    api: Option<(
        TcpListener,
        axum::Router,
        weir_runtime::http::ListenerLimits,
    )>,
    worker_done: Option<tokio::task::JoinHandle<()>>,
    token: tokio_util::sync::CancellationToken,
    // Held for the process's life: a second process on the same directory would number its
    // log records from the same place and lose half of what both acknowledged.
    _data_dir: Option<weir_runtime::datadir::DataDirLock>,
}

/// Opens everything `role` needs and starts its worker, without serving yet.
pub async fn start(
    listener: Option<TcpListener>,
    config: IncrementsConfig,
    role: Role,
    shutdown: Shutdown,
) -> Result<Running, IncrementsError> {
    config.validate()?;
    metric_names::register();
    let needs_store = role != Role::Api || config.database_url.is_some();
    let uses_data_dir =
        config.redis_url.is_none() || (needs_store && config.database_url.is_none());
    let data_dir = if uses_data_dir {
        Some(weir_runtime::datadir::lock(&config.data_dir, "--data-dir")?)
    } else {
        None
    };
    if role != Role::Worker && listener.is_none() {
        return Err(IncrementsError::NeedsListener(role));
    }
    let store = if needs_store {
        Some(Store::open(&config).await?)
    } else {
        None
    };
    let (producer, consumer) = open_queue(&config, role, store.as_ref()).await?;
    let mut health = None;
    let worker_done = match (consumer, store.clone()) {
        (Some(consumer), Some(store)) => {
            let state = Arc::new(WorkerHealth::default());
            health = Some(state.clone());
            let worker = Worker::new(consumer, store, &config, state);
            let token = shutdown.token.clone();
            Some(shutdown.tracker.spawn(async move {
                worker.run(token).await;
            }))
        }
        _ => None,
    };
    let api = match (
        http_router(&config, producer, listener.is_some(), store, health),
        listener,
    ) {
        (Some(router), Some(listener)) => Some((listener, router, config.listener_limits())),
        (Some(_), None) => return Err(IncrementsError::NeedsListener(role)),
        (None, _) => None,
    };
    Ok(Running {
        api,
        worker_done,
        token: shutdown.token.clone(),
        _data_dir: data_dir,
    })
}

async fn open_queue(
    config: &IncrementsConfig,
    role: Role,
    store: Option<&Store>,
) -> Result<(Option<Producer>, Option<Consumer>), IncrementsError> {
    match (&config.redis_url, role) {
        (None, Role::Serve) => {
            let store = store.ok_or(StoreError::Task("no store".into()))?;
            let watermark = store.watermark("embedded").await?;
            let options = queue::embedded::LogOptions {
                fsync: config.fsync,
                repair: config.repair,
            };
            let (producer, consumer) =
                queue::embedded::open_with(&config.log_dir(), watermark, options)?;
            Ok((
                Some(Producer::Embedded(producer)),
                Some(Consumer::Embedded(consumer)),
            ))
        }
        (None, role) => Err(IncrementsError::NeedsRedis(role)),
        (Some(url), role) => {
            let producer = if role == Role::Worker {
                None
            } else {
                Some(Producer::Redis(RedisProducer::connect(config, url).await?))
            };
            let consumer = if role == Role::Api {
                None
            } else {
                Some(Consumer::Redis(Box::new(
                    RedisConsumer::connect_with(config, url, store).await?,
                )))
            };
            Ok((producer, consumer))
        }
    }
}

impl Running {
    /// Serves the API (if this role has one) until the token is cancelled, then waits for
    /// the worker's final flush.
    pub async fn serve(self) -> Result<(), IncrementsError> {
        if let Some((listener, router, limits)) = self.api {
            let served =
                weir_runtime::http::serve(listener, router, limits, self.token.clone()).await;
            if let Err(err) = served {
                // Stop the worker too: without an API the embedded log never closes.
                self.token.cancel();
                return Err(err.into());
            }
        }
        if let Some(done) = self.worker_done {
            if let Err(err) = done.await {
                tracing::error!(%err, "worker task failed");
            }
        }
        Ok(())
    }
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
