//! The checker's sockets: the event source (a dedicated thread with a blocking socket, since
//! generating and writing big buffers is all it does and it must outrun any server) and the
//! user clients (tokio tasks, one per user, each checking its own lines as they arrive).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::progress::Counters;
use super::stream::{encode, Batches, StreamParams, MAX_LINE};
use super::verify::{Missing, ReceivedLineSplitter, UserCheck};
use super::CheckError;

/// Clients connecting at once: enough to be quick, few enough not to overflow a server's
/// accept backlog.
const CONNECT_AT_ONCE: usize = 64;

/// Connects one client per user and sends its id line, all before any event is sent.
pub async fn connect_clients(
    addr: SocketAddr,
    users: &[u32],
    crlf: bool,
) -> Result<Vec<TcpStream>, CheckError> {
    let terminator = if crlf { "\r\n" } else { "\n" };
    let mut streams: Vec<Option<TcpStream>> = (0..users.len()).map(|_| None).collect();
    let mut pending = JoinSet::new();
    let mut queue = users.iter().copied().enumerate();
    loop {
        while pending.len() < CONNECT_AT_ONCE {
            let Some((slot, user)) = queue.next() else {
                break;
            };
            let id_line = format!("{user}{terminator}");
            pending.spawn(async move {
                let connected = async {
                    let mut stream = TcpStream::connect(addr).await?;
                    stream.write_all(id_line.as_bytes()).await?;
                    Ok::<_, std::io::Error>(stream)
                };
                (slot, user, connected.await)
            });
        }
        let Some(joined) = pending.join_next().await else {
            break;
        };
        let (slot, user, connected) =
            joined.map_err(|err| CheckError::Internal(err.to_string()))?;
        let stream = connected.map_err(|error| CheckError::ConnectClient { user, addr, error })?;
        streams[slot] = Some(stream);
    }
    Ok(streams.into_iter().flatten().collect())
}

pub async fn connect_source(addr: SocketAddr) -> Result<std::net::TcpStream, CheckError> {
    let connect_error = |error| CheckError::ConnectSource { addr, error };
    let stream = TcpStream::connect(addr).await.map_err(connect_error)?;
    let stream = stream.into_std().map_err(connect_error)?;
    stream.set_nonblocking(false).map_err(connect_error)?;
    Ok(stream)
}

#[derive(Debug)]
pub enum Note {
    /// The user needs nothing more (all arrived, diverged, or its connection ended).
    Settled,
    /// The user waited `timeout` for a due notification.
    TimedOut,
}

pub struct Client {
    pub stream: TcpStream,
    pub check: UserCheck,
    pub slot: usize,
    pub timeout: Duration,
    pub buffer: usize,
}

/// How often a user whose next notification has not been sent yet looks again.
const DUE_POLL: Duration = Duration::from_millis(50);

/// Reads and checks one user's notifications until `stop`, the connection ends, or a due
/// notification does not come within the timeout. Keeps reading after the stream is complete,
/// both to catch extras and so that a server is never held up by a checker that stopped
/// reading.
///
/// The timeout only runs while the next expected notification is due, that is once its event
/// has been written: a user whose next notification is millions of events away is not failed
/// for a slow server's silence.
pub async fn watch_client(
    client: Client,
    stop: CancellationToken,
    notes: mpsc::UnboundedSender<(usize, Note)>,
    counters: Arc<Counters>,
) -> (UserCheck, Missing) {
    let Client {
        mut stream,
        mut check,
        slot,
        timeout,
        buffer,
    } = client;
    let mut buf = vec![0u8; buffer];
    let mut lines = ReceivedLineSplitter::default();
    let mut settled = check.is_settled();
    if settled {
        let _ = notes.send((slot, Note::Settled));
    }
    let mut last_data = tokio::time::Instant::now();
    let mut due_since: Option<tokio::time::Instant> = None;
    let ending = loop {
        let due = check
            .next_seq()
            .is_some_and(|seq| seq <= counters.events_sent());
        let deadline = read_deadline(settled, due, &mut due_since, last_data, timeout);
        let read = async {
            match deadline {
                None => Ok(stream.read(&mut buf).await),
                Some(at) => tokio::time::timeout_at(at, stream.read(&mut buf)).await,
            }
        };
        let read = tokio::select! {
            biased;
            _ = stop.cancelled() => break Missing::RunEnded,
            read = read => read,
        };
        match read {
            Err(_elapsed) if due => {
                break Missing::Timeout {
                    ms: timeout.as_millis() as u64,
                }
            }
            Err(_elapsed) => continue,
            Ok(Ok(0)) => break Missing::Closed,
            Ok(Ok(n)) => {
                last_data = tokio::time::Instant::now();
                due_since = None;
                let count = lines.push(&buf[..n], |line| check.feed(line));
                counters.notifications.fetch_add(count, Ordering::Relaxed);
            }
            Ok(Err(err)) => {
                break Missing::Error {
                    message: err.to_string(),
                }
            }
        }
        if !settled && check.is_settled() {
            settled = true;
            let _ = notes.send((slot, Note::Settled));
        }
    };
    let count = lines.finish(|line| check.feed(line));
    counters.notifications.fetch_add(count, Ordering::Relaxed);
    if !settled {
        let note = match ending {
            Missing::Timeout { .. } => Note::TimedOut,
            _ => Note::Settled,
        };
        let _ = notes.send((slot, note));
    }
    (check, ending)
}

/// How long the next read may wait: forever once settled; `timeout` past the later of the
/// last data and the moment the next notification fell due; otherwise until the next look at
/// whether it is due yet.
fn read_deadline(
    settled: bool,
    due: bool,
    due_since: &mut Option<tokio::time::Instant>,
    last_data: tokio::time::Instant,
    timeout: Duration,
) -> Option<tokio::time::Instant> {
    let now = tokio::time::Instant::now();
    if settled {
        None
    } else if due {
        let since = *due_since.get_or_insert(now);
        Some(since.max(last_data) + timeout)
    } else {
        Some(now + DUE_POLL)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEnd {
    /// Every event was written and the connection closed.
    Finished,
    /// Told to stop before the end.
    Stopped,
    Failed(String),
}

pub struct Source {
    pub stream: std::net::TcpStream,
    pub params: StreamParams,
    pub max_batch: u32,
    pub crlf: bool,
    /// Give up when the server has not read a byte for this long.
    pub stall: Duration,
}

/// Bytes gathered before each write: large writes are what lets one thread outrun a server.
const FLUSH_AT: usize = 256 * 1024;
/// How often a blocked write looks at the stop flag.
const WRITE_POLL: Duration = Duration::from_millis(100);

pub fn spawn_source(
    source: Source,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    done: oneshot::Sender<SourceEnd>,
) -> Result<std::thread::JoinHandle<()>, CheckError> {
    std::thread::Builder::new()
        .name("relay-check-source".into())
        .spawn(move || {
            let end = match send_stream(source, &counters, &stop) {
                Ok(end) => end,
                Err(err) => SourceEnd::Failed(err),
            };
            let _ = done.send(end);
        })
        .map_err(|err| CheckError::Internal(format!("cannot start the source thread: {err}")))
}

fn send_stream(
    source: Source,
    counters: &Counters,
    stop: &AtomicBool,
) -> Result<SourceEnd, String> {
    let Source {
        mut stream,
        params,
        max_batch,
        crlf,
        stall,
    } = source;
    stream
        .set_write_timeout(Some(WRITE_POLL))
        .map_err(|err| format!("cannot set a write timeout: {err}"))?;
    let mut batches = Batches::new(params, max_batch);
    let mut out = Vec::with_capacity(FLUSH_AT + max_batch as usize * MAX_LINE);
    let mut unflushed = 0u64;
    loop {
        let batch = batches.next_batch();
        if let Some(batch) = batch {
            encode(batch, crlf, &mut out);
            unflushed += batch.len() as u64;
            if out.len() < FLUSH_AT {
                continue;
            }
        }
        if !out.is_empty() {
            if !write_fully(&mut stream, &out, stop, stall, counters.events_sent())? {
                return Ok(SourceEnd::Stopped);
            }
            counters.events_sent.fetch_add(unflushed, Ordering::Relaxed);
            unflushed = 0;
            out.clear();
        }
        if batch.is_none() {
            break;
        }
    }
    // Tells the server the stream is complete; errors here change nothing already sent.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(SourceEnd::Finished)
}

/// Returns `Ok(false)` when stopped first.
fn write_fully(
    stream: &mut std::net::TcpStream,
    mut buf: &[u8],
    stop: &AtomicBool,
    stall: Duration,
    sent_before: u64,
) -> Result<bool, String> {
    let mut progress = Instant::now();
    while !buf.is_empty() {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match stream.write(buf) {
            Ok(0) => {
                return Err(format!(
                    "the server closed the event connection after {sent_before} events"
                ))
            }
            Ok(n) => {
                buf = &buf[n..];
                progress = Instant::now();
            }
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                if progress.elapsed() >= stall {
                    return Err(format!(
                        "the server read no event for {} ms (after {sent_before} events)",
                        stall.as_millis()
                    ));
                }
            }
            Err(err) => {
                return Err(format!(
                    "the event connection failed after {sent_before} events: {err}"
                ))
            }
        }
    }
    Ok(true)
}
