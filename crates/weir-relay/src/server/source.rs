//! The event source: one connection at a time, cut into lines, parsed, and handed to the
//! dispatcher one batch per read.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weir_runtime::Shutdown;

use weir_runtime::logs::LogLimiter;
use weir_runtime::warn_limited;

use super::{next_connection, SourceItem, SourceMessage};
use crate::config::{RelayConfig, SourceMode};
use crate::event::{self, Malformed};

pub(super) async fn accept_sources(
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
            warn_limited!(
                REFUSED_LOG,
                %peer,
                "refused a second event source: one is already connected"
            );
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
    let (position, next) = tokio::sync::oneshot::channel();
    if tx
        .send(SourceMessage::Started { peer, position })
        .await
        .is_err()
    {
        return;
    }
    let Ok(next) = next.await else { return };
    if config.source_mode == SourceMode::Resume {
        // A resuming source cannot know how far a relay that crashed had got (its state
        // file may be a few intervals behind what it delivered): it is told, and sends
        // everything from there. A source that never reads loses nothing: the line waits in
        // its receive buffer.
        let line = position_line(next);
        let told = tokio::select! {
            _ = token.cancelled() => return,
            told = stream.write_all(line.as_bytes()) => told,
        };
        if let Err(err) = told {
            warn_limited!(READ_ERROR_LOG, %peer, %err, "could not tell the event source where the stream continues");
        }
    }
    let max_line = config.max_line_length;
    let mut buf = vec![0u8; (64 * 1024).max(max_line * 2)];
    let mut filled = 0;
    let mut splitter = SourceLineSplitter::new(max_line);
    loop {
        let read = tokio::select! {
            _ = token.cancelled() => break,
            read = stream.read(&mut buf[filled..]) => read,
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) => {
                warn_limited!(READ_ERROR_LOG, %peer, %err, "event source read failed");
                break;
            }
        };
        // One clock read per read, shared by its events: their receipt time.
        let received = std::time::Instant::now();
        filled += n;
        let mut batch = Vec::with_capacity(filled / 16);
        let consumed = splitter.split(&buf[..filled], |item| {
            log_malformed(peer, &item);
            batch.push(item);
        });
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
        if !batch.is_empty() {
            let message = SourceMessage::Batch {
                items: batch,
                received,
            };
            if tx.send(message).await.is_err() {
                return;
            }
        }
    }
    // A line still open here was cut off by the disconnect: it is counted, never delivered.
    let mut batch = Vec::new();
    splitter.finish(&buf[..filled], |item| {
        log_malformed(peer, &item);
        batch.push(item);
    });
    if !batch.is_empty() {
        let received = std::time::Instant::now();
        let _ = tx
            .send(SourceMessage::Batch {
                items: batch,
                received,
            })
            .await;
    }
    let _ = tx.send(SourceMessage::Ended { peer }).await;
}

/// What a source is sent on connecting in resume mode: the first sequence number the relay
/// has not handled, the one to send first.
pub fn position_line(next: u64) -> String {
    format!("next|{next}\n")
}

static MALFORMED_LOG: LogLimiter = LogLimiter::per_second();
static REFUSED_LOG: LogLimiter = LogLimiter::per_second();
static READ_ERROR_LOG: LogLimiter = LogLimiter::per_second();

/// The reason is the relay's own words and the number was parsed, so no input bytes reach
/// the log.
fn log_malformed(peer: SocketAddr, item: &SourceItem) {
    if let SourceItem::Malformed(bad) = item {
        warn_limited!(MALFORMED_LOG, %peer, problem = %bad, "skipped a malformed line from the event source");
    }
}

/// Cuts the event source's byte stream into lines, turning over-long lines into malformed
/// items without ever buffering more than `max_line` bytes of one.
struct SourceLineSplitter {
    max_line: usize,
    /// Inside an over-long line whose start was already reported: skip to its end.
    discarding: bool,
}

impl SourceLineSplitter {
    fn new(max_line: usize) -> Self {
        SourceLineSplitter {
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

    /// Reports what is left when the source disconnects: a line without its terminator is
    /// incomplete (`2|P|2|5` may have been `2|P|2|50`), so it is malformed. Its sequence
    /// number is not claimed either, because the number itself may be cut short (`12` of
    /// `123|B`) and a resuming source may send the whole line again.
    fn finish(&mut self, rest: &[u8], emit: impl FnOnce(SourceItem)) {
        if !rest.is_empty() && !self.discarding {
            emit(SourceItem::Malformed(Malformed {
                seq: None,
                reason: "line cut off by the disconnect (no terminator)",
            }));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(
        max_line: usize,
        chunks: &[&[u8]],
    ) -> Vec<Result<u64, (Option<u64>, &'static str)>> {
        let mut splitter = SourceLineSplitter::new(max_line);
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
            split_all(64, &[b"1|B\n2|", b"S|3\r\n3|B\n"]),
            vec![Ok(1), Ok(2), Ok(3)]
        );
    }

    #[test]
    fn an_unterminated_last_line_is_malformed_and_claims_no_number() {
        assert_eq!(
            split_all(64, &[b"1|P|1|50\n2|P|2|5"]),
            vec![
                Ok(1),
                Err((None, "line cut off by the disconnect (no terminator)"))
            ]
        );
    }

    #[test]
    fn an_over_long_line_is_one_malformed_item_and_the_next_line_survives() {
        let long = format!("7|S|{}", "9".repeat(100));
        let out = split_all(32, &[long.as_bytes(), b"99999", b"\n8|B\n"]);
        assert_eq!(out, vec![Err((Some(7), "line too long")), Ok(8)]);
    }
}
