//! Writes the state file off the dispatcher. Sorting the edges and waiting for `fsync` can
//! take many milliseconds on a large graph, and the dispatcher must keep routing meanwhile,
//! so it only takes a snapshot and hands it over. One write runs at a time; a snapshot handed
//! over while one runs replaces any older one still waiting; and the last snapshot is always
//! written before the writer ends.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::state::{self, StateLock, StreamState};

pub(super) struct StateWriter {
    latest: watch::Sender<Option<StreamState>>,
    task: JoinHandle<()>,
    /// How long the last write took (sort, serialise, fsync, rename), in microseconds.
    cost_micros: Arc<AtomicU64>,
}

impl StateWriter {
    /// Starts the writer, which holds `lock` until its last write is done.
    pub(super) fn spawn(path: PathBuf, lock: StateLock) -> Self {
        let (latest, rx) = watch::channel(None);
        let cost_micros = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(write_each_snapshot(path, rx, lock, cost_micros.clone()));
        StateWriter {
            latest,
            task,
            cost_micros,
        }
    }

    /// How long the last write took.
    pub(super) fn last_cost(&self) -> Duration {
        Duration::from_micros(self.cost_micros.load(Ordering::Relaxed))
    }

    /// Queues `snapshot` to be written, replacing one not yet started.
    pub(super) fn submit(&self, snapshot: StreamState) {
        self.latest.send_replace(Some(snapshot));
    }

    /// Writes `last` after whatever is running, then returns once it is on disk (or failed
    /// and was logged).
    pub(super) async fn finish(self, last: StreamState) {
        self.submit(last);
        drop(self.latest);
        if let Err(err) = self.task.await {
            tracing::error!(%err, "the state writer failed");
        }
    }
}

async fn write_each_snapshot(
    path: PathBuf,
    mut latest: watch::Receiver<Option<StreamState>>,
    _lock: StateLock,
    cost_micros: Arc<AtomicU64>,
) {
    // Ends once the sender is gone and its last value has been seen (and so written).
    while latest.changed().await.is_ok() {
        let Some(snapshot) = latest.borrow_and_update().clone() else {
            continue;
        };
        let path = path.clone();
        let started = Instant::now();
        let saved = tokio::task::spawn_blocking(move || state::save(&path, snapshot)).await;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        cost_micros.store(micros, Ordering::Relaxed);
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(%err, "could not save the relay state"),
            Err(err) => tracing::error!(%err, "the state writer failed"),
        }
    }
}
