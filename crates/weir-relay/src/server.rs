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

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir_runtime::Shutdown;

use crate::config::{RelayConfig, SourceMode};
use crate::event::{self, Event, Malformed};
use crate::graph::FollowGraph;
use crate::reorder::{Insert, Released, ReorderWindow};
use crate::router::{ConnId, Router};
use crate::state::{self, StateError, StreamState};
use crate::stats::{Counts, RelayStats};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read a listener's address: {0}")]
    Address(std::io::Error),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the relay task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
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
        .map_err(|source| RelayError::Bind { what, addr, source })
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
        self.dispatcher.await?;
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
    let saved = match &config.state_file {
        Some(path) => state::load(path)?,
        None => None,
    };
    if let Some(saved) = &saved {
        tracing::info!(
            next_sequence = saved.next_sequence,
            follows = saved.follows.len(),
            "continuing the stream from the state file"
        );
    }
    let stats = Arc::new(RelayStats::default());
    let events_addr = listeners.events.local_addr().map_err(RelayError::Address)?;
    let clients_addr = listeners
        .clients
        .local_addr()
        .map_err(RelayError::Address)?;
    let config = Arc::new(config);
    // Bounded: a source faster than the dispatcher waits in TCP, not in memory.
    let (source_tx, source_rx) = mpsc::channel(16);
    let (control_tx, control_rx) = mpsc::unbounded_channel();

    let dispatcher = Dispatcher::new(config.clone(), stats.clone(), saved);
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
        shutdown,
    ));
    Ok(RelayHandle {
        stats,
        events_addr,
        clients_addr,
        dispatcher,
    })
}

/// What the dispatcher holds for each client connection.
struct ClientHandle {
    tx: mpsc::UnboundedSender<Bytes>,
    /// Bytes handed to the session and not yet written to the socket.
    queued: Arc<AtomicUsize>,
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
}

enum SourceItem {
    Event(Event),
    Malformed(Malformed),
}

enum SourceMessage {
    Started { peer: SocketAddr },
    Batch(Vec<SourceItem>),
    Ended { peer: SocketAddr },
    Refused,
}

/// A held window slot: an event, or a sequence number whose line was malformed and which is
/// released as handled so the stream does not stall on it.
enum Slot {
    Event(Event),
    Skip,
}

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
                Err(err) => tracing::warn!(%err, "accepting {what} failed"),
            },
        }
        tokio::select! {
            _ = token.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// Event source

async fn accept_sources(
    listener: TcpListener,
    config: Arc<RelayConfig>,
    tx: mpsc::Sender<SourceMessage>,
    shutdown: Shutdown,
) {
    let active = Arc::new(AtomicBool::new(false));
    loop {
        let Some((stream, peer)) =
            next_connection(&listener, &shutdown.token, "an event source").await
        else {
            return;
        };
        if active.swap(true, Ordering::AcqRel) {
            tracing::warn!(%peer, "refused a second event source: one is already connected");
            let _ = tx.send(SourceMessage::Refused).await;
            drop(stream);
            continue;
        }
        let session = source_session(
            stream,
            peer,
            config.clone(),
            tx.clone(),
            shutdown.token.clone(),
        );
        let active = active.clone();
        shutdown.tracker.spawn(async move {
            session.await;
            active.store(false, Ordering::Release);
        });
    }
}

/// Reads lines, parses them, and hands them over in batches (one per read).
async fn source_session(
    mut stream: TcpStream,
    peer: SocketAddr,
    config: Arc<RelayConfig>,
    tx: mpsc::Sender<SourceMessage>,
    token: CancellationToken,
) {
    if tx.send(SourceMessage::Started { peer }).await.is_err() {
        return;
    }
    let max_line = config.max_line_length.max(16);
    let mut buf = vec![0u8; (64 * 1024).max(max_line * 2)];
    let mut filled = 0;
    let mut splitter = LineSplitter::new(max_line);
    let mut log = LogLimiter::new("malformed line from the event source");
    loop {
        let read = tokio::select! {
            _ = token.cancelled() => break,
            read = stream.read(&mut buf[filled..]) => read,
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) => {
                tracing::warn!(%peer, %err, "event source read failed");
                break;
            }
        };
        filled += n;
        let mut batch = Vec::with_capacity(filled / 16);
        let consumed = splitter.split(&buf[..filled], |item| {
            if let SourceItem::Malformed(bad) = &item {
                log.note(bad);
            }
            batch.push(item);
        });
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
        if !batch.is_empty() && tx.send(SourceMessage::Batch(batch)).await.is_err() {
            return;
        }
    }
    // The last line may lack its terminator; it is still an event.
    let mut batch = Vec::new();
    splitter.finish(&buf[..filled], |item| {
        if let SourceItem::Malformed(bad) = &item {
            log.note(bad);
        }
        batch.push(item);
    });
    if !batch.is_empty() {
        let _ = tx.send(SourceMessage::Batch(batch)).await;
    }
    log.flush();
    let _ = tx.send(SourceMessage::Ended { peer }).await;
}

/// Cuts a byte stream into lines, turning over-long lines into malformed items without
/// ever buffering more than `max_line` bytes of one.
struct LineSplitter {
    max_line: usize,
    /// Inside an over-long line whose start was already reported: skip to its end.
    discarding: bool,
}

impl LineSplitter {
    fn new(max_line: usize) -> Self {
        LineSplitter {
            max_line,
            discarding: false,
        }
    }

    /// Emits every complete line in `data` and returns how many bytes were consumed.
    fn split(&mut self, data: &[u8], mut emit: impl FnMut(SourceItem)) -> usize {
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', data) {
            let line = &data[start..=end];
            start = end + 1;
            if std::mem::take(&mut self.discarding) {
                continue;
            }
            emit(self.item(line));
        }
        let rest = &data[start..];
        if rest.len() >= self.max_line {
            if !self.discarding {
                emit(too_long(rest));
                self.discarding = true;
            }
            return data.len();
        }
        start
    }

    fn finish(&mut self, rest: &[u8], emit: impl FnOnce(SourceItem)) {
        if !rest.is_empty() && !self.discarding {
            emit(self.item(rest));
        }
    }

    fn item(&self, line: &[u8]) -> SourceItem {
        if line.len() > self.max_line {
            return too_long(line);
        }
        match event::parse(line) {
            Ok(event) => SourceItem::Event(event),
            Err(bad) => SourceItem::Malformed(bad),
        }
    }
}

fn too_long(line: &[u8]) -> SourceItem {
    SourceItem::Malformed(Malformed {
        seq: event::leading_seq(line),
        reason: "line too long",
    })
}

/// Logs the first few problems of each second and counts the rest, so a stream of garbage
/// cannot flood the logs.
struct LogLimiter {
    what: &'static str,
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    const PER_SECOND: u32 = 10;

    fn new(what: &'static str) -> Self {
        LogLimiter {
            what,
            window_start: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    fn note(&mut self, detail: &dyn std::fmt::Display) {
        if self.window_start.elapsed() >= Duration::from_secs(1) {
            self.flush();
            self.window_start = Instant::now();
            self.logged = 0;
        }
        if self.logged < Self::PER_SECOND {
            self.logged += 1;
            tracing::warn!(%detail, "skipped a {}", self.what);
        } else {
            self.suppressed += 1;
        }
    }

    fn flush(&mut self) {
        if self.suppressed > 0 {
            tracing::warn!(
                count = self.suppressed,
                "skipped more of: {} (not logged one by one)",
                self.what
            );
            self.suppressed = 0;
        }
    }
}

// ---------------------------------------------------------------------------------------
// User clients

async fn accept_clients(
    listener: TcpListener,
    config: Arc<RelayConfig>,
    control: mpsc::UnboundedSender<Control>,
    shutdown: Shutdown,
) {
    let mut next_conn: ConnId = 0;
    loop {
        let Some((stream, peer)) =
            next_connection(&listener, &shutdown.token, "a user client").await
        else {
            return;
        };
        next_conn += 1;
        let session = client_session(
            stream,
            peer,
            next_conn,
            config.clone(),
            control.clone(),
            shutdown.token.clone(),
        );
        shutdown.tracker.spawn(session);
    }
}

async fn client_session(
    stream: TcpStream,
    peer: SocketAddr,
    conn: ConnId,
    config: Arc<RelayConfig>,
    control: mpsc::UnboundedSender<Control>,
    token: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let user = tokio::select! {
        _ = token.cancelled() => return,
        line = tokio::time::timeout(config.client_id_timeout(), read_id_line(&mut reader, config.max_line_length)) => {
            match line {
                Ok(Ok(line)) => match event::parse_user_id(&line) {
                    Some(user) => user,
                    None => {
                        tracing::warn!(%peer, line = %String::from_utf8_lossy(&line).trim(), "closed a client with an invalid user id");
                        let _ = control.send(Control::Rejected);
                        return;
                    }
                },
                Ok(Err(err)) => {
                    tracing::warn!(%peer, %err, "closed a client before it sent a user id");
                    let _ = control.send(Control::Rejected);
                    return;
                }
                Err(_elapsed) => {
                    tracing::warn!(%peer, "closed a client that sent no user id in time");
                    let _ = control.send(Control::Rejected);
                    return;
                }
            }
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let queued = Arc::new(AtomicUsize::new(0));
    let kick = CancellationToken::new();
    let handle = ClientHandle {
        tx,
        queued: queued.clone(),
        kick: kick.clone(),
    };
    if control
        .send(Control::Connect { conn, user, handle })
        .is_err()
    {
        return;
    }
    tracing::debug!(%peer, user, conn, "user client connected");
    let mut scratch = [0u8; 512];
    loop {
        tokio::select! {
            biased;
            _ = kick.cancelled() => break,
            bytes = rx.recv() => {
                // None: the dispatcher let go of this client (shutdown): all is written.
                let Some(bytes) = bytes else { break };
                let written = tokio::select! {
                    _ = kick.cancelled() => break,
                    written = writer.write_all(&bytes) => written,
                };
                if written.is_err() {
                    break;
                }
                queued.fetch_sub(bytes.len(), Ordering::AcqRel);
            }
            read = reader.read(&mut scratch) => match read {
                // The client closed its side, or the connection broke: it is gone.
                Ok(0) | Err(_) => break,
                // Clients have nothing more to say; anything they send is ignored.
                Ok(_) => {}
            },
        }
    }
    let _ = writer.shutdown().await;
    let _ = control.send(Control::Disconnect { conn });
    tracing::debug!(%peer, user, conn, "user client disconnected");
}

/// Reads up to and including the first `\n` (or to EOF), refusing lines over `max`.
async fn read_id_line(
    reader: &mut (impl AsyncReadExt + Unpin),
    max: usize,
) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: the id line is tiny, and reading past it would swallow nothing useful
    // but would complicate ownership of the read half.
    loop {
        if reader.read(&mut byte).await? == 0 {
            if line.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed",
                ));
            }
            return Ok(line);
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return Ok(line);
        }
        if line.len() > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "user id line too long",
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Dispatcher

struct Dispatcher {
    config: Arc<RelayConfig>,
    stats: Arc<RelayStats>,
    router: Router<ClientHandle>,
    window: ReorderWindow<Slot>,
    released: Vec<Released<Slot>>,
    counts: Counts,
    /// The first source after a start continues a stream loaded from the state file, even
    /// in reset mode: that is what the state file is for.
    continue_saved_stream: bool,
    /// When the current head gap started blocking held events, and at which number.
    blocked: Option<(u64, tokio::time::Instant)>,
    state_dirty: bool,
    gap_log: LogLimiter,
}

impl Dispatcher {
    fn new(config: Arc<RelayConfig>, stats: Arc<RelayStats>, saved: Option<StreamState>) -> Self {
        let (next, graph, continue_saved_stream) = match saved {
            Some(saved) => (saved.next_sequence, saved.graph(), true),
            None => (1, FollowGraph::new(), false),
        };
        Dispatcher {
            window: ReorderWindow::new(next, config.max_window),
            router: Router::new(graph),
            config,
            stats,
            released: Vec::new(),
            counts: Counts::default(),
            continue_saved_stream,
            blocked: None,
            state_dirty: false,
            gap_log: LogLimiter::new("missing sequence number"),
        }
    }

    async fn run(
        mut self,
        mut control: mpsc::UnboundedReceiver<Control>,
        mut source: mpsc::Receiver<SourceMessage>,
        token: CancellationToken,
    ) {
        let mut state_tick = tokio::time::interval(self.config.state_interval());
        state_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let gap_timeout = self.config.gap_timeout();
        loop {
            let gap_deadline = match (gap_timeout, self.blocked) {
                (Some(timeout), Some((_, since))) => Some(since + timeout),
                _ => None,
            };
            tokio::select! {
                biased;
                _ = token.cancelled() => break,
                Some(message) = control.recv() => self.on_control(message),
                Some(message) = source.recv() => self.on_source(message),
                _ = sleep_until(gap_deadline), if gap_deadline.is_some() => {
                    let mut released = std::mem::take(&mut self.released);
                    self.window.skip_gap(&mut released);
                    self.released = released;
                    self.deliver_released();
                }
                _ = state_tick.tick(), if self.config.state_file.is_some() => self.save_state().await,
            }
            self.publish();
        }
        // Shutdown: what the sources already read is accepted; route it, then let go of
        // every client so its session writes what is queued and closes.
        source.close();
        while let Some(message) = source.recv().await {
            self.on_source(message);
        }
        while let Ok(message) = control.try_recv() {
            self.on_control(message);
        }
        self.save_state().await;
        let clients = self.router.drain_clients();
        self.publish();
        tracing::info!(clients = clients.len(), "relay stopped");
    }

    fn on_control(&mut self, message: Control) {
        match message {
            Control::Connect { conn, user, handle } => self.router.connect(conn, user, handle),
            Control::Disconnect { conn } => {
                self.router.disconnect(conn);
            }
            Control::Rejected => self.counts.clients_rejected += 1,
        }
    }

    fn on_source(&mut self, message: SourceMessage) {
        match message {
            SourceMessage::Started { peer } => {
                let resume = self.config.source_mode == SourceMode::Resume
                    || std::mem::take(&mut self.continue_saved_stream);
                self.stats.set_sources_connected(1);
                if !resume {
                    self.window.reset(1);
                    self.router.graph_mut().clear();
                    self.blocked = None;
                }
                tracing::info!(
                    %peer,
                    next_sequence = self.window.next_expected(),
                    "stream {}",
                    if resume { "continues" } else { "starts" }
                );
            }
            SourceMessage::Batch(items) => self.on_batch(items),
            SourceMessage::Ended { peer } => {
                if self.config.source_mode == SourceMode::Reset {
                    // The stream is over: nothing can fill the gaps any more.
                    let mut released = std::mem::take(&mut self.released);
                    self.window.drain_all(&mut released);
                    self.released = released;
                    self.deliver_released();
                }
                tracing::info!(
                    %peer,
                    next_sequence = self.window.next_expected(),
                    held = self.window.held(),
                    "source gone; everything deliverable was delivered"
                );
                self.stats.set_sources_connected(0);
                self.state_dirty = true;
            }
            SourceMessage::Refused => self.counts.sources_refused += 1,
        }
    }

    fn on_batch(&mut self, items: Vec<SourceItem>) {
        let mut released = std::mem::take(&mut self.released);
        for item in items {
            let (seq, slot) = match item {
                SourceItem::Event(event) => {
                    self.counts.events_received += 1;
                    (event.seq, Slot::Event(event))
                }
                SourceItem::Malformed(bad) => {
                    self.counts.events_malformed += 1;
                    match bad.seq {
                        Some(seq) => (seq, Slot::Skip),
                        None => continue,
                    }
                }
            };
            match self.window.insert(seq, slot, &mut released) {
                Insert::Accepted => {}
                Insert::Stale | Insert::Duplicate => self.counts.events_stale += 1,
            }
        }
        self.released = released;
        self.deliver_released();
    }

    /// Routes everything the window released, then hands each client its bytes.
    fn deliver_released(&mut self) {
        for released in self.released.drain(..) {
            match released {
                Released::Event(Slot::Event(event)) => {
                    self.counts.events_delivered += 1;
                    self.counts.notifications_sent += self.router.route(&event) as u64;
                }
                Released::Event(Slot::Skip) => {}
                Released::Gap { first, count } => {
                    self.counts.gaps_skipped += count;
                    self.gap_log.note(&format_args!(
                        "skipped {count} missing sequence number(s) from {first}"
                    ));
                }
            }
        }
        let limit = self.config.client_buffer;
        let dropped = self.router.flush(|client, bytes| {
            let len = bytes.len();
            if client.queued.load(Ordering::Acquire) + len > limit {
                return false;
            }
            client.queued.fetch_add(len, Ordering::AcqRel);
            // A closed channel means the session is already leaving; its disconnect follows.
            let _ = client.tx.send(Bytes::from(bytes));
            true
        });
        for (conn, client) in dropped {
            client.kick.cancel();
            self.counts.clients_dropped_slow += 1;
            tracing::warn!(conn, limit, "dropped a client that fell too far behind");
        }
        self.state_dirty = true;
        self.update_blocked();
    }

    fn update_blocked(&mut self) {
        if self.window.held() == 0 {
            self.blocked = None;
            return;
        }
        let next = self.window.next_expected();
        match self.blocked {
            Some((blocked_at, _)) if blocked_at == next => {}
            _ => self.blocked = Some((next, tokio::time::Instant::now())),
        }
    }

    fn publish(&mut self) {
        self.stats.add(&std::mem::take(&mut self.counts));
        self.stats
            .set_gauges(self.router.client_count(), self.window.held());
    }

    async fn save_state(&mut self) {
        let Some(path) = self.config.state_file.clone() else {
            return;
        };
        if !std::mem::take(&mut self.state_dirty) {
            return;
        }
        let snapshot = StreamState::capture(self.window.next_expected(), self.router.graph());
        let saved = tokio::task::spawn_blocking(move || state::save(&path, &snapshot)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::error!(%err, "could not save the relay state");
                self.state_dirty = true;
            }
            Err(err) => {
                tracing::error!(%err, "the state writer failed");
                self.state_dirty = true;
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(
        max_line: usize,
        chunks: &[&[u8]],
    ) -> Vec<Result<u64, (Option<u64>, &'static str)>> {
        let mut splitter = LineSplitter::new(max_line);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut collect = |item: SourceItem| match item {
            SourceItem::Event(event) => out.push(Ok(event.seq)),
            SourceItem::Malformed(bad) => out.push(Err((bad.seq, bad.reason))),
        };
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            let consumed = splitter.split(&buf, &mut collect);
            buf.drain(..consumed);
        }
        splitter.finish(&buf, &mut collect);
        out
    }

    #[test]
    fn lines_split_across_reads_are_joined() {
        assert_eq!(
            split_all(64, &[b"1|B\n2|", b"S|3\r\n3|B"]),
            vec![Ok(1), Ok(2), Ok(3)]
        );
    }

    #[test]
    fn an_over_long_line_is_one_malformed_item_and_the_next_line_survives() {
        let long = format!("7|S|{}", "9".repeat(100));
        let out = split_all(32, &[long.as_bytes(), b"99999", b"\n8|B\n"]);
        assert_eq!(out, vec![Err((Some(7), "line too long")), Ok(8)]);
    }
}
