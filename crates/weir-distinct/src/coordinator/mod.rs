//! `weir distinct coordinator`: the front door on :5000 that validates requests, routes
//! each shard's items to one worker, and runs the worker processes of this host.
//!
//! Pure logic, unit-tested: [`routing`] (rendezvous order, backoff).
//! I/O: [`pool`] (the workers, alive or not, and each shard's owner), [`forward`] (the
//! HTTP client and the retries), [`health`] (each worker's health check), [`supervisor`]
//! (local worker processes), [`reload`] (the config file re-read, and SIGHUP), [`server`]
//! (the HTTP API).

pub mod forward;
pub mod health;
pub mod metrics;
pub mod pool;
pub mod reload;
pub mod routing;
pub mod server;
pub mod supervisor;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use weir_runtime::Shutdown;

use crate::config::{diff, ConfigError, DistinctConfig, WorkerAddr};
use forward::{ForwardOptions, Forwarder};
use pool::{Pool, Worker};
use supervisor::{Spawner, SupervisorOptions, WorkerProgram};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("worker {worker} did not start: {reason}")]
    WorkerStart { worker: String, reason: String },
    #[error("cannot start the thread that starts workers: {0}")]
    Spawner(std::io::Error),
    #[error("the coordinator's HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Re-reads the config (file, environment, flags) for a reload.
pub type Loader = Arc<dyn Fn() -> Result<DistinctConfig, ConfigError> + Send + Sync>;

/// Everything the coordinator needs besides its listener.
#[derive(Clone)]
pub struct Settings {
    pub config: DistinctConfig,
    /// `None`: the config never changes while running (no reload loop, no SIGHUP).
    pub loader: Option<Loader>,
    /// `None`: local workers are not spawned, only routed to and checked (someone else
    /// runs them).
    pub program: Option<WorkerProgram>,
    /// This machine's name, to tell local workers from remote ones.
    pub hostname: String,
    pub forward: ForwardOptions,
    pub supervisor: SupervisorOptions,
    /// How long start-up waits for every local worker's first process to answer.
    pub start_timeout: Duration,
}

impl Settings {
    pub fn new(config: DistinctConfig) -> Self {
        Settings {
            config,
            loader: None,
            program: None,
            hostname: crate::config::hostname(),
            forward: ForwardOptions::default(),
            supervisor: SupervisorOptions::default(),
            start_timeout: Duration::from_secs(30),
        }
    }
}

/// A worker's background tasks: its health check, and its process if it is ours.
struct Running {
    worker: Arc<Worker>,
    tasks: Vec<JoinHandle<()>>,
}

pub struct Coordinator {
    pub pool: Arc<Pool>,
    pub forwarder: Forwarder,
    settings: Settings,
    spawner: Option<Spawner>,
    config: Mutex<DistinctConfig>,
    /// Why the last reload was refused, until one succeeds.
    reload_error: Mutex<Option<String>>,
    running: tokio::sync::Mutex<HashMap<(String, u16), Running>>,
}

impl Coordinator {
    /// Starts the workers of `settings.config` and waits until every local one answers its
    /// health check (an exit or a timeout first is an error naming the worker).
    pub async fn start(settings: Settings) -> Result<Arc<Self>, CoordinatorError> {
        // The recorder first: metrics registered before it exists would go nowhere.
        let _ = weir_runtime::telemetry::prometheus();
        metrics::register();
        let pool = Arc::new(Pool::default());
        let forwarder = Forwarder {
            client: forward::client(&settings.forward),
            pool: pool.clone(),
            options: settings.forward,
        };
        let spawner = match settings.program {
            Some(_) => Some(Spawner::start().map_err(CoordinatorError::Spawner)?),
            None => None,
        };
        let coordinator = Arc::new(Coordinator {
            pool,
            forwarder,
            config: Mutex::new(settings.config.clone()),
            reload_error: Mutex::new(None),
            spawner,
            settings,
            running: tokio::sync::Mutex::new(HashMap::new()),
        });
        let config = coordinator.settings.config.clone();
        coordinator.apply(None, &config).await;
        if coordinator.spawner.is_some() {
            if let Err(err) = coordinator.wait_started().await {
                coordinator.stop_all().await;
                return Err(err);
            }
        }
        Ok(coordinator)
    }

    pub fn config(&self) -> DistinctConfig {
        match self.config.lock() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn identity(&self, worker: &WorkerAddr) -> (String, u16) {
        worker.identity(&self.settings.hostname)
    }

    /// Takes the workers from `old` (none at start) to `new`: routing changes first, so a
    /// removed worker gets nothing new while it finishes what it holds; then removed and
    /// restarted local workers get SIGTERM and added ones are spawned.
    async fn apply(&self, old: Option<&DistinctConfig>, new: &DistinctConfig) {
        let hostname = self.settings.hostname.clone();
        let mut running = self.running.lock().await;
        let plan = old.map(|old| diff(old, new, &hostname));
        let restart: Vec<(String, u16)> = plan
            .iter()
            .flat_map(|p| p.restart.iter().map(|w| self.identity(w)))
            .collect();
        let mut table = Vec::with_capacity(new.workers.len());
        let mut kept = HashMap::new();
        let mut started = Vec::new();
        for addr in &new.workers {
            let id = self.identity(addr);
            match running.remove(&id) {
                Some(entry) if !restart.contains(&id) => {
                    table.push(entry.worker.clone());
                    kept.insert(id, entry);
                }
                previous => {
                    let worker = Arc::new(Worker::new(
                        addr.clone(),
                        &hostname,
                        self.settings.forward.per_worker_concurrency,
                    ));
                    table.push(worker.clone());
                    started.push((id, worker, previous));
                }
            }
        }
        // Whatever is left in `running` is no longer configured.
        let removed: Vec<Running> = running.drain().map(|(_, r)| r).collect();
        self.pool.replace(table);
        for gone in &removed {
            tracing::info!(worker = %gone.worker.name, "worker removed from the config, stopping it");
            gone.worker.stop.cancel();
        }
        for (id, worker, previous) in started {
            // A restarted worker's old process must be gone before the new one binds its port.
            let previous = previous.map(|entry| {
                tracing::info!(worker = %entry.worker.name, "worker settings changed, restarting it");
                entry.worker.stop.cancel();
                entry.tasks
            });
            let tasks = self.start_worker(worker.clone(), new, previous.unwrap_or_default());
            kept.insert(id, Running { worker, tasks });
        }
        *running = kept;
        if let Ok(mut config) = self.config.lock() {
            *config = new.clone();
        }
    }

    fn start_worker(
        &self,
        worker: Arc<Worker>,
        config: &DistinctConfig,
        previous: Vec<JoinHandle<()>>,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(health::check_loop(
            self.forwarder.client.clone(),
            self.pool.clone(),
            worker.clone(),
            config.health_check,
        )));
        if let (true, Some(program), Some(spawner)) =
            (worker.local, &self.settings.program, &self.spawner)
        {
            let args = supervisor::worker_args(config, &worker.addr);
            let log = supervisor::log_path(&config.worker_logs, &worker.addr);
            let supervise = supervisor::supervise(
                spawner.clone(),
                program.clone(),
                args,
                log,
                self.pool.clone(),
                worker.clone(),
                self.settings.supervisor,
            );
            tasks.push(tokio::spawn(async move {
                for task in previous {
                    let _ = task.await;
                }
                supervise.await;
            }));
        }
        tasks
    }

    /// Every local worker alive, or the first that exited or did not answer in time.
    async fn wait_started(&self) -> Result<(), CoordinatorError> {
        let deadline = tokio::time::Instant::now() + self.settings.start_timeout;
        let config = self.config();
        loop {
            let table = self.pool.table();
            let local: Vec<&Arc<Worker>> = table.workers.iter().filter(|w| w.local).collect();
            if let Some(failed) = local
                .iter()
                .find(|w| w.restarts.load(Ordering::Relaxed) > 0)
            {
                let log = supervisor::log_path(&config.worker_logs, &failed.addr);
                return Err(CoordinatorError::WorkerStart {
                    worker: failed.name.clone(),
                    reason: format!(
                        "{} (its log, {}: {})",
                        failed.last_error().unwrap_or_else(|| "it exited".into()),
                        log.display(),
                        last_line(&log)
                    ),
                });
            }
            if local.iter().all(|w| w.is_alive()) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let waiting: Vec<&str> = local
                    .iter()
                    .filter(|w| !w.is_alive())
                    .map(|w| w.name.as_str())
                    .collect();
                return Err(CoordinatorError::WorkerStart {
                    worker: waiting.join(", "),
                    reason: format!(
                        "no health answer within {} s",
                        self.settings.start_timeout.as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every worker process (SIGTERM, then SIGKILL after the grace period) and every
    /// health check, and waits for them.
    pub async fn stop_all(&self) {
        let mut running = self.running.lock().await;
        self.pool.replace(Vec::new());
        let entries: Vec<Running> = running.drain().map(|(_, r)| r).collect();
        for entry in &entries {
            entry.worker.stop.cancel();
        }
        for entry in entries {
            for task in entry.tasks {
                let _ = task.await;
            }
        }
    }

    /// Re-reads the config; a bad one is logged and the current one stays.
    pub async fn reload(&self) {
        let Some(loader) = &self.settings.loader else {
            return;
        };
        let old = self.config();
        // Moving the store under running workers would serve counts from an empty one and
        // strand what was acknowledged in the old one.
        let loaded = loader().and_then(|new| {
            if new.database == old.database {
                Ok(new)
            } else {
                Err(ConfigError::DatabaseMoved {
                    old: crate::config::describe_database(&old.database),
                    new: crate::config::describe_database(&new.database),
                })
            }
        });
        if let Ok(mut last) = self.reload_error.lock() {
            *last = loaded.as_ref().err().map(ToString::to_string);
        }
        match loaded {
            Ok(new) => {
                if new == old {
                    return;
                }
                if new.port != old.port {
                    tracing::warn!(
                        old = old.port,
                        new = new.port,
                        "port changed in the config: the coordinator keeps listening on the old one until restarted"
                    );
                }
                tracing::info!(workers = new.workers.len(), "config changed, applying it");
                self.apply(Some(&old), &new).await;
            }
            Err(err) => {
                weir_runtime::warn_limited!(
                    reload::BAD_CONFIG,
                    error = %err,
                    "the config file is refused; keeping the last good config"
                );
            }
        }
    }
}

impl Coordinator {
    /// Why the config file was last refused, while it still is.
    pub fn reload_error(&self) -> Option<String> {
        self.reload_error.lock().ok().and_then(|e| e.clone())
    }
}

fn last_line(path: &std::path::Path) -> String {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            text.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "empty".into())
}

/// Starts the workers, serves the API on `listener` until `shutdown`, lets in-flight
/// requests finish, then stops the workers.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: Shutdown,
) -> Result<(), CoordinatorError> {
    let coordinator = Coordinator::start(settings).await?;
    serve(listener, coordinator, shutdown).await
}

/// Serves an already started coordinator, then stops its workers.
pub async fn serve(
    listener: TcpListener,
    coordinator: Arc<Coordinator>,
    shutdown: Shutdown,
) -> Result<(), CoordinatorError> {
    let reloads = tokio::spawn(reload::reload_loop(
        coordinator.clone(),
        shutdown.token.clone(),
    ));
    let app = server::router(coordinator.clone());
    let limits = weir_runtime::http::ListenerLimits::default();
    let served = weir_runtime::http::serve(listener, app, limits, shutdown.token.clone()).await;
    reloads.abort();
    coordinator.stop_all().await;
    Ok(served?)
}
