//! User clients: read the id line, register with the dispatcher, then write whatever the
//! dispatcher queues until either side goes away.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weir_runtime::Shutdown;

use super::{next_connection, ClientHandle, Control};
use crate::config::RelayConfig;
use crate::event;
use crate::router::ConnId;

pub(super) async fn accept_clients(
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
