//! The relay's I/O: two listeners, one source session at a time, one session per client,
//! and the dispatcher task that owns all routing state.
//!
//! ```text
//! source socket -> source session (split lines, parse) --batches--> dispatcher
//! client socket -> client session (read id) --connect/disconnect--> dispatcher
//! dispatcher (reorder window, follow graph, router) --bytes per batch--> client sessions
//! ```
//!
//! Only the dispatcher touches routing state, so there are no locks; batching keeps the
//! per-event cost to parsing, one window slot and one memcpy per notification.
//!
//! - `mod.rs`: binding, start-up, the messages between tasks.
//! - `source.rs`: the event source session and its line splitter.
//! - `client.rs`: user client sessions.
//! - `dispatcher.rs`: the task that orders, routes and hands out bytes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir_runtime::Shutdown;

mod client;
mod dispatcher;
mod source;
mod state_writer;

use client::accept_clients;
use dispatcher::Dispatcher;
use source::accept_sources;

use crate::config::{RelayConfig, RelayConfigError};
use crate::event::{Event, Malformed};
use crate::router::ConnId;
use crate::state::{self, StateError};
use crate::stats::RelayStats;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    // Causes are part of each message and not also a `source()`, which `{:#}` would print
    // a second time.
    #[error("cannot bind {what} on {addr}: {error}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot read a listener's address: {0}")]
    Address(std::io::Error),
    #[error(transparent)]
    Config(#[from] RelayConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the relay task failed: {0}")]
    Task(tokio::task::JoinError),
}

/// The two listening sockets, bound before the relay starts so callers (and tests, on port
/// 0) know the addresses.
pub struct Listeners {
    pub events: TcpListener,
    pub clients: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &RelayConfig) -> Result<Listeners, RelayError> {
        let events = bind(
            config.bind_address,
            config.event_listener_port,
            "the event source port",
        )
        .await?;
        let clients = bind(
            config.bind_address,
            config.client_listener_port,
            "the user client port",
        )
        .await?;
        Ok(Listeners { events, clients })
    }
}

async fn bind(
    ip: std::net::IpAddr,
    port: u16,
    what: &'static str,
) -> Result<TcpListener, RelayError> {
    let addr = SocketAddr::new(ip, port);
    TcpListener::bind(addr)
        .await
        .map_err(|error| RelayError::Bind { what, addr, error })
}

/// A running relay.
pub struct RelayHandle {
    pub stats: Arc<RelayStats>,
    pub events_addr: SocketAddr,
    pub clients_addr: SocketAddr,
    dispatcher: JoinHandle<()>,
}

impl RelayHandle {
    /// Resolves when the relay has stopped (after `shutdown.token` is cancelled and the
    /// final flush is done).
    pub async fn wait(self) -> Result<(), RelayError> {
        self.dispatcher.await.map_err(RelayError::Task)?;
        Ok(())
    }
}

/// Runs the relay until `shutdown.token` is cancelled, then delivers what is deliverable,
/// saves the state file, and returns.
pub async fn run(
    listeners: Listeners,
    config: RelayConfig,
    shutdown: Shutdown,
) -> Result<(), RelayError> {
    spawn(listeners, config, shutdown)?.wait().await
}

/// Starts the relay's tasks (tracked by `shutdown.tracker`) and returns at once.
pub fn spawn(
    listeners: Listeners,
    config: RelayConfig,
    shutdown: Shutdown,
) -> Result<RelayHandle, RelayError> {
    config.validate()?;
    // Locked before it is read: another relay could be about to overwrite it.
    let (saved, state_lock) = match &config.state_file {
        Some(path) => {
            let lock = state::lock(path)?;
            (state::load(path)?, Some((path.clone(), lock)))
        }
        None => (None, None),
    };
    if let Some(saved) = &saved {
        tracing::info!(
            next_sequence = saved.next_sequence,
            follows = saved.follows.len(),
            "continuing the stream from the state file"
        );
    }
    let queued_total = Arc::new(AtomicUsize::new(0));
    let stats = Arc::new(RelayStats::new(queued_total.clone()));
    let events_addr = listeners.events.local_addr().map_err(RelayError::Address)?;
    let clients_addr = listeners
        .clients
        .local_addr()
        .map_err(RelayError::Address)?;
    let config = Arc::new(config);
    // Bounded: a source faster than the dispatcher waits in TCP, not in memory.
    let (source_tx, source_rx) = mpsc::channel(16);
    let (control_tx, control_rx) = mpsc::unbounded_channel();

    let state_writer = state_lock.map(|(path, lock)| state_writer::StateWriter::spawn(path, lock));
    let dispatcher = Dispatcher::new(
        config.clone(),
        stats.clone(),
        saved,
        state_writer,
        queued_total.clone(),
    )?;
    let token = shutdown.token.clone();
    let dispatcher = shutdown
        .tracker
        .spawn(dispatcher.run(control_rx, source_rx, token));

    shutdown.tracker.spawn(accept_sources(
        listeners.events,
        config.clone(),
        source_tx,
        shutdown.clone(),
    ));
    let tracker = shutdown.tracker.clone();
    tracker.spawn(accept_clients(
        listeners.clients,
        config,
        control_tx,
        queued_total,
        shutdown,
    ));
    Ok(RelayHandle {
        stats,
        events_addr,
        clients_addr,
        dispatcher,
    })
}

/// Bytes handed to client sessions and not yet written (or dropped): one connection's, and
/// every connection's together. Every message is added before it is sent and subtracted
/// exactly once: by the session when it writes or discards it, or by the dispatcher when
/// the send fails because the session is already gone.
#[derive(Clone)]
struct QueuedBytes {
    client: Arc<AtomicUsize>,
    total: Arc<AtomicUsize>,
}

impl QueuedBytes {
    fn new(total: Arc<AtomicUsize>) -> Self {
        QueuedBytes {
            client: Arc::new(AtomicUsize::new(0)),
            total,
        }
    }

    fn client(&self) -> usize {
        self.client.load(Ordering::Acquire)
    }

    fn add(&self, len: usize) {
        self.client.fetch_add(len, Ordering::AcqRel);
        self.total.fetch_add(len, Ordering::AcqRel);
    }

    fn sub(&self, len: usize) {
        self.client.fetch_sub(len, Ordering::AcqRel);
        self.total.fetch_sub(len, Ordering::AcqRel);
    }
}

/// What the dispatcher holds for each client connection.
struct ClientHandle {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: QueuedBytes,
    /// Cancelled to make the session close at once, without writing what is queued.
    kick: CancellationToken,
}

enum Control {
    Connect {
        conn: ConnId,
        user: u64,
        handle: ClientHandle,
    },
    Disconnect {
        conn: ConnId,
    },
    Rejected,
    /// A client connection closed at once: `maxClients` were open.
    Refused,
}

enum SourceItem {
    Event(Event),
    Malformed(Malformed),
}

enum SourceMessage {
    /// A source connected. `position` is told the number the stream continues from, once
    /// the dispatcher has taken the source on (so no event of it is read before).
    Started {
        peer: SocketAddr,
        position: tokio::sync::oneshot::Sender<u64>,
    },
    /// The items of one read, and when that read returned (their receipt time).
    Batch {
        items: Vec<SourceItem>,
        received: std::time::Instant,
    },
    Ended {
        peer: SocketAddr,
    },
    Refused,
}

static ACCEPT_LOG: weir_runtime::logs::LogLimiter = weir_runtime::logs::LogLimiter::per_second();

/// The next connection, or `None` once shutdown begins. A failed accept (out of file
/// descriptors, say) is logged and retried after a pause, rather than spinning.
async fn next_connection(
    listener: &TcpListener,
    token: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = token.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(err) => weir_runtime::warn_limited!(ACCEPT_LOG, %err, "accepting {what} failed"),
            },
        }
        tokio::select! {
            _ = token.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}
