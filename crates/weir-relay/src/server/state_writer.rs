//! Writes the state file off the dispatcher. Sorting the edges and waiting for `fsync` can
//! take many milliseconds on a large graph, and the dispatcher must keep routing meanwhile,
//! so it only takes a snapshot and hands it over. One write runs at a time; a snapshot handed
//! over while one runs replaces any older one still waiting; and the last snapshot is always
//! written before the writer ends.

use std::path::PathBuf;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::state::{self, StateLock, StreamState};

pub(super) struct StateWriter {
    latest: watch::Sender<Option<StreamState>>,
    task: JoinHandle<()>,
}

impl StateWriter {
    /// Starts the writer, which holds `lock` until its last write is done.
    pub(super) fn spawn(path: PathBuf, lock: StateLock) -> Self {
        let (latest, rx) = watch::channel(None);
        let task = tokio::spawn(write_each_snapshot(path, rx, lock));
        StateWriter { latest, task }
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
) {
    // Ends once the sender is gone and its last value has been seen (and so written).
    while latest.changed().await.is_ok() {
        let Some(snapshot) = latest.borrow_and_update().clone() else {
            continue;
        };
        let path = path.clone();
        match tokio::task::spawn_blocking(move || state::save(&path, snapshot)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(%err, "could not save the relay state"),
            Err(err) => tracing::error!(%err, "the state writer failed"),
        }
    }
}
