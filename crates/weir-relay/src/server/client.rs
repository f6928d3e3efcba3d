//! User clients: read the id line, register with the dispatcher, then write whatever the
//! dispatcher queues until either side goes away.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
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
            QueuedBytes::new(queued_total.clone()),
            shutdown.token.clone(),
        );
        shutdown.tracker.spawn(session);
    }
}

static REJECTED_LOG: LogLimiter = LogLimiter::per_second();

async fn client_session(
    stream: TcpStream,
    peer: SocketAddr,
    conn: ConnId,
    config: Arc<RelayConfig>,
    control: mpsc::UnboundedSender<Control>,
    queued: QueuedBytes,
    token: CancellationToken,
) {
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
