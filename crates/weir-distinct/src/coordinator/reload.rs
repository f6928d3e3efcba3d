//! The config re-read every `config_check` seconds and on SIGHUP. The interval is read
//! again after every reload, so a new `config_check` takes effect at once.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use weir_runtime::logs::LogLimiter;

use super::Coordinator;

/// A bad config is reported at most this often, however often it is re-read.
pub static BAD_CONFIG: LogLimiter = LogLimiter::new(Duration::from_secs(60), 1);

pub async fn reload_loop(coordinator: Arc<Coordinator>, stop: CancellationToken) {
    if coordinator.settings.loader.is_none() {
        return;
    }
    let mut hangups = hangups();
    loop {
        let every = coordinator.config().config_check;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = next_hangup(&mut hangups) => {
                tracing::info!("SIGHUP: re-reading the config");
            }
        }
        coordinator.reload().await;
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

#[cfg(unix)]
fn hangups() -> Hangups {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(stream) => Some(stream),
        Err(err) => {
            tracing::warn!(%err, "cannot listen for SIGHUP; the config is still re-read on its interval");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangups() -> Hangups {
    None
}

#[cfg(unix)]
async fn next_hangup(hangups: &mut Hangups) {
    match hangups {
        Some(stream) => {
            if stream.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangups) {
    std::future::pending::<()>().await
}
