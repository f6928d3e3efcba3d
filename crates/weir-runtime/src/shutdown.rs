//! Graceful shutdown: one `CancellationToken` says "stop", one `TaskTracker` says "everyone
//! has stopped". Services hand both to every task they spawn, and each task reaches a safe
//! state (flush, ack, close) before it returns.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The pair every long-running task receives.
#[derive(Clone, Default)]
pub struct Shutdown {
    pub token: CancellationToken,
    pub tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// A token whose cancellation follows this one but can also be cancelled on its own,
    /// for a part of a service that stops before the rest (a listener, a connection).
    pub fn child_token(&self) -> CancellationToken {
        self.token.child_token()
    }

    /// Cancels the token on the first SIGINT or SIGTERM. A second signal exits at once, for
    /// an operator who does not want to wait for a drain.
    pub fn cancel_on_signal(&self) {
        let token = self.token.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received, draining (send it again to exit now)");
            token.cancel();
            wait_for_signal().await;
            tracing::warn!("second shutdown signal, exiting without draining");
            std::process::exit(130);
        });
    }

    /// Cancels, then waits for every tracked task, at most `grace`. Returns whether all tasks
    /// finished in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM (what service managers send).
pub async fn wait_for_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_tracked_tasks_to_reach_a_safe_state() {
        let shutdown = Shutdown::new();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(1);
        let token = shutdown.token.clone();
        shutdown.tracker.spawn(async move {
            token.cancelled().await;
            // Stands for a final flush that must happen before the process exits.
            done_tx.send(()).await.unwrap();
        });
        assert!(shutdown.drain(Duration::from_secs(5)).await);
        assert!(
            done_rx.try_recv().is_ok(),
            "the task finished its flush before drain returned"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_after_the_grace_period() {
        let shutdown = Shutdown::new();
        shutdown.tracker.spawn(std::future::pending::<()>());
        assert!(!shutdown.drain(Duration::from_secs(1)).await);
    }
}
