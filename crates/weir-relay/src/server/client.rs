//! User clients: read the id line, register with the dispatcher, then write whatever the
//! dispatcher queues until either side goes away.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weir_runtime::logs::{escape, LogLimiter};
use weir_runtime::{warn_limited, Shutdown};

use super::{next_connection, ClientHandle, Control, QueuedBytes};
use crate::config::RelayConfig;
use crate::event;
use crate::router::ConnId;

pub(super) async fn accept_clients(
    listener: TcpListener,
    config: Arc<RelayConfig>,
    control: mpsc::UnboundedSender<Control>,
    queued_total: Arc<AtomicUsize>,
    shutdown: Shutdown,
) {
    // Validated at start; the fallback is never taken.
    let cap = config.client_cap().unwrap_or(usize::MAX);
    let open = Arc::new(AtomicUsize::new(0));
    let mut next_conn: ConnId = 0;
    loop {
        let Some((stream, peer)) =
            next_connection(&listener, &shutdown.token, "a user client").await
        else {
            return;
        };
        // Accepted and closed rather than left in the backlog: the peer learns at once, and
        // the descriptor it held is free again before the next accept.
        let Some(slot) = OpenSlot::take(&open, cap) else {
            drop(stream);
            let _ = control.send(Control::Refused);
            warn_limited!(
                REFUSED_LOG,
                %peer,
                max_clients = cap,
                "refused a user client: maxClients connections are open"
            );
            continue;
        };
        next_conn += 1;
        let accepted = Accepted {
            stream,
            peer,
            conn: next_conn,
            slot,
        };
        let session = client_session(
            accepted,
            config.clone(),
            control.clone(),
            QueuedBytes::new(queued_total.clone()),
            shutdown.token.clone(),
        );
        shutdown.tracker.spawn(session);
    }
}

/// A connection let in, with the place it holds.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    conn: ConnId,
    slot: OpenSlot,
}

/// One open client connection counted against `maxClients`, given back when dropped (so a
/// session that ends any way at all, panics included, frees its place).
struct OpenSlot(Arc<AtomicUsize>);

impl OpenSlot {
    fn take(open: &Arc<AtomicUsize>, cap: usize) -> Option<OpenSlot> {
        // Only the accept loop adds, so a plain load and add cannot overshoot the cap.
        if open.load(Ordering::Acquire) >= cap {
            return None;
        }
        open.fetch_add(1, Ordering::AcqRel);
        Some(OpenSlot(open.clone()))
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

static REFUSED_LOG: LogLimiter = LogLimiter::per_second();

static REJECTED_LOG: LogLimiter = LogLimiter::per_second();

async fn client_session(
    accepted: Accepted,
    config: Arc<RelayConfig>,
    control: mpsc::UnboundedSender<Control>,
    queued: QueuedBytes,
    token: CancellationToken,
) {
    let Accepted {
        stream,
        peer,
        conn,
        slot,
    } = accepted;
    let _ = stream.set_nodelay(true);
    let (mut reader, writer) = stream.into_split();
    let user = tokio::select! {
        _ = token.cancelled() => return,
        user = read_user_id(&mut reader, peer, &config) => user,
    };
    let Some(user) = user else {
        let _ = control.send(Control::Rejected);
        return;
    };
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
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
    write_until_gone(reader, writer, rx, &queued, &kick).await;
    // The socket is closed: its place is free before the dispatcher hears it is gone.
    drop(slot);
    let _ = control.send(Control::Disconnect { conn });
    tracing::debug!(%peer, user, conn, "user client disconnected");
}

/// The user id the client sends first, or `None` (logged) when it sends none in time or
/// something that is not one.
async fn read_user_id(
    reader: &mut OwnedReadHalf,
    peer: SocketAddr,
    config: &RelayConfig,
) -> Option<u64> {
    let line = tokio::time::timeout(
        config.client_id_timeout(),
        read_id_line(reader, config.max_line_length),
    )
    .await;
    match line {
        Ok(Ok(line)) => {
            let user = event::parse_user_id(&line);
            if user.is_none() {
                warn_limited!(REJECTED_LOG, %peer, line = %escape(line.trim_ascii()), "closed a client with an invalid user id");
            }
            user
        }
        Ok(Err(err)) => {
            warn_limited!(REJECTED_LOG, %peer, %err, "closed a client before it sent a user id");
            None
        }
        Err(_elapsed) => {
            warn_limited!(REJECTED_LOG, %peer, "closed a client that sent no user id in time");
            None
        }
    }
}

/// Writes what the dispatcher queues until the client goes away, the dispatcher lets go of
/// it (shutdown: all is written first), or it is kicked (nothing more is written). Whatever
/// is still queued at the end is discarded and taken off the queued bytes.
async fn write_until_gone(
    mut reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    queued: &QueuedBytes,
    kick: &CancellationToken,
) {
    let mut scratch = [0u8; 512];
    loop {
        tokio::select! {
            biased;
            _ = kick.cancelled() => break,
            bytes = rx.recv() => {
                // None: the dispatcher let go of this client (shutdown): all is written.
                let Some(bytes) = bytes else { break };
                let written = tokio::select! {
                    _ = kick.cancelled() => Err(()),
                    written = writer.write_all(&bytes) => written.map_err(|_| ()),
                };
                queued.sub(bytes.len());
                if written.is_err() {
                    break;
                }
            }
            read = reader.read(&mut scratch) => match read {
                // The client closed its side, or the connection broke: it is gone.
                Ok(0) | Err(_) => break,
                // Clients have nothing more to say; anything they send is ignored.
                Ok(_) => {}
            },
        }
    }
    // After close() no send can succeed, so every message is either drained here or was
    // refused to the dispatcher, which then takes its bytes off itself.
    rx.close();
    while let Ok(bytes) = rx.try_recv() {
        queued.sub(bytes.len());
    }
    drop(rx);
    let _ = writer.shutdown().await;
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
