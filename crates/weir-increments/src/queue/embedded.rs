//! The embedded queue: an append-only log on local disk, written with group commit.
//!
//! Requests hand their increment to one writer thread; it appends everything that queued
//! up while the previous write was syncing, syncs once, and only then lets those requests
//! answer 202. So a 202 survives `kill -9` of the process (the bytes are in the kernel), and
//! with `fsync` also power loss, the sync cost then shared by every request in the group.
//!
//! Records are 40 bytes: accept time (ms), key, value, and a check that binds them to their
//! sequence number, so a torn tail from a crash mid-write is recognised and cut off.
//! Segments are named by their first sequence number and deleted once a flush whose
//! watermark covers them has committed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::QueueError;
use crate::aggregate::{EntryId, Item};
use crate::validate::Increment;

const RECORD: usize = 40;
const SEGMENT_BYTES: u64 = 64 << 20;
const MAX_GROUP: usize = 16_384;

type Reply = oneshot::Sender<Result<(), QueueError>>;

/// Appends increments; cloned into every request handler.
#[derive(Clone)]
pub struct Producer {
    tx: mpsc::Sender<(Increment, Reply)>,
    depth: Arc<AtomicU64>,
}

impl Producer {
    pub async fn enqueue(&self, increment: Increment) -> Result<(), QueueError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send((increment, reply))
            .await
            .map_err(|_| QueueError::Closed)?;
        wait.await.map_err(|_| QueueError::Closed)?
    }

    pub fn is_open(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Increments written to the log and not yet committed to the store.
    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed)
    }
}

/// What the worker reads: first the recovered tail of the log, then every committed group.
/// It ends when every producer is gone and the writer has stopped.
pub struct Consumer {
    rx: mpsc::UnboundedReceiver<Vec<Item>>,
    dir: PathBuf,
    current_base: Arc<AtomicU64>,
    depth: Arc<AtomicU64>,
}

impl Consumer {
    /// `count` increments were committed to the store.
    pub fn settled(&self, count: u64) {
        let _ = self
            .depth
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                Some(d.saturating_sub(count))
            });
    }

    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed)
    }

    pub async fn next(&mut self) -> Option<Vec<Item>> {
        self.rx.recv().await
    }

    pub fn try_next(&mut self) -> Option<Vec<Item>> {
        self.rx.try_recv().ok()
    }

    /// Deletes the segments whose every record is at or below `seq`.
    pub fn release(&self, seq: u64) -> Result<(), QueueError> {
        let current = self.current_base.load(Ordering::Acquire);
        let segments = list_segments(&self.dir)?;
        for pair in segments.windows(2) {
            let (base, path) = &pair[0];
            let next_base = pair[1].0;
            if *base != current && next_base.saturating_sub(1) <= seq {
                std::fs::remove_file(path).map_err(|err| QueueError::io(path, err))?;
            }
        }
        Ok(())
    }
}

/// Opens the log in `dir`, returning the records above `watermark` (already committed to
/// the store up to it) so that the worker applies them first.
pub fn open(dir: &Path, watermark: u64, fsync: bool) -> Result<(Producer, Consumer), QueueError> {
    std::fs::create_dir_all(dir).map_err(|err| QueueError::io(dir, err))?;
    let segments = list_segments(dir)?;
    let mut recovered = Vec::new();
    let mut next_seq = watermark + 1;
    let mut current: Option<(u64, PathBuf)> = None;
    let last = segments.len().saturating_sub(1);
    for (index, (base, path)) in segments.iter().enumerate() {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut file| file.read_to_end(&mut bytes))
            .map_err(|err| QueueError::io(path, err))?;
        let mut valid = 0;
        for (n, record) in bytes.chunks(RECORD).enumerate() {
            let seq = base + n as u64;
            match decode(record, seq) {
                Some(item) => {
                    if seq > watermark {
                        recovered.push(item);
                    }
                    valid += RECORD;
                }
                None => break,
            }
        }
        if valid < bytes.len() {
            if index != last {
                return Err(QueueError::Corrupt(path.display().to_string()));
            }
            // A torn tail: those requests never got their 202, so cutting it loses nothing.
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|file| file.set_len(valid as u64))
                .map_err(|err| QueueError::io(path, err))?;
        }
        next_seq = next_seq.max(base + (valid / RECORD) as u64);
        current = Some((*base, path.clone()));
    }
    // Reuse the last segment only if the next record lands right after its last one
    // (positions are sequence numbers); otherwise start a fresh segment.
    let (base, path) = match current {
        Some((base, path))
            if std::fs::metadata(&path)
                .map(|m| m.len())
                .unwrap_or(u64::MAX)
                == (next_seq - base) * RECORD as u64
                && (next_seq - base) * (RECORD as u64) < SEGMENT_BYTES =>
        {
            (base, path)
        }
        _ => (next_seq, segment_path(dir, next_seq)),
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|err| QueueError::io(&path, err))?;
    let current_base = Arc::new(AtomicU64::new(base));
    let depth = Arc::new(AtomicU64::new(recovered.len() as u64));
    let (tx, rx) = mpsc::channel(MAX_GROUP);
    let (items_tx, items_rx) = mpsc::unbounded_channel();
    if !recovered.is_empty() {
        tracing::info!(
            records = recovered.len(),
            "replaying the embedded log above the committed watermark"
        );
        let _ = items_tx.send(recovered);
    }
    let writer = Writer {
        dir: dir.to_path_buf(),
        file,
        written: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
        next_seq,
        fsync,
        current_base: current_base.clone(),
        items: items_tx,
        depth: depth.clone(),
    };
    std::thread::Builder::new()
        .name("increments-log".into())
        .spawn(move || writer.run(rx))
        .map_err(|err| QueueError::io(dir, err))?;
    Ok((
        Producer {
            tx,
            depth: depth.clone(),
        },
        Consumer {
            rx: items_rx,
            dir: dir.to_path_buf(),
            current_base,
            depth,
        },
    ))
}

struct Writer {
    dir: PathBuf,
    file: File,
    written: u64,
    next_seq: u64,
    fsync: bool,
    current_base: Arc<AtomicU64>,
    items: mpsc::UnboundedSender<Vec<Item>>,
    depth: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<(Increment, Reply)>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        let mut buf = Vec::with_capacity(MAX_GROUP * RECORD);
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(next) => group.push(next),
                    Err(_) => break,
                }
            }
            let now = now_ms();
            buf.clear();
            let mut items = Vec::with_capacity(group.len());
            for (n, (increment, _)) in group.iter().enumerate() {
                let seq = self.next_seq + n as u64;
                encode(&mut buf, seq, now, increment);
                items.push(Item {
                    id: EntryId { ms: now, seq },
                    key: increment.key,
                    value: increment.value,
                });
            }
            match self.append(&buf) {
                Ok(()) => {
                    self.next_seq += group.len() as u64;
                    self.depth.fetch_add(group.len() as u64, Ordering::Relaxed);
                    // The worker sees the group before the clients hear 202, so the queue
                    // depth a flush reports never misses an acknowledged increment.
                    let _ = self.items.send(items);
                    for (_, reply) in group.drain(..) {
                        let _ = reply.send(Ok(()));
                    }
                }
                Err(err) => {
                    tracing::error!(%err, "cannot append to the embedded log");
                    for (_, reply) in group.drain(..) {
                        let _ = reply.send(Err(QueueError::Write(err.to_string())));
                    }
                }
            }
            if self.written >= SEGMENT_BYTES {
                if let Err(err) = self.roll() {
                    tracing::error!(%err, "cannot start a new log segment");
                }
            }
        }
        if let Err(err) = self.file.sync_all() {
            tracing::error!(%err, "cannot sync the embedded log on close");
        }
    }

    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let result = self.file.write_all(buf).and_then(|()| {
            if self.fsync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => {
                self.written += buf.len() as u64;
                Ok(())
            }
            Err(err) => {
                // Cut a partial write so the next group starts on a record boundary.
                let _ = self.file.set_len(self.written);
                Err(err)
            }
        }
    }

    fn roll(&mut self) -> std::io::Result<()> {
        let path = segment_path(&self.dir, self.next_seq);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        self.file.sync_all()?;
        self.file = file;
        self.written = 0;
        self.current_base.store(self.next_seq, Ordering::Release);
        // The directory entry of the new segment must survive a power loss too.
        File::open(&self.dir).and_then(|dir| dir.sync_all())
    }
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, QueueError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|err| QueueError::io(dir, err))? {
        let entry = entry.map_err(|err| QueueError::io(dir, err))?;
        let path = entry.path();
        let base = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(".log"))
            .and_then(|stem| stem.parse::<u64>().ok());
        if let Some(base) = base {
            out.push((base, path));
        }
    }
    out.sort();
    Ok(out)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn check(seq: u64, ms: u64, key: &[u8; 16], value: i64) -> u64 {
    // FNV-1a over every field, then a final avalanche: cheap, and any torn or misplaced
    // record fails it with overwhelming probability.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(&seq.to_le_bytes());
    feed(&ms.to_le_bytes());
    feed(key);
    feed(&value.to_le_bytes());
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

fn encode(buf: &mut Vec<u8>, seq: u64, ms: u64, increment: &Increment) {
    let key = increment.key.into_bytes();
    buf.extend_from_slice(&ms.to_le_bytes());
    buf.extend_from_slice(&key);
    buf.extend_from_slice(&increment.value.to_le_bytes());
    buf.extend_from_slice(&check(seq, ms, &key, increment.value).to_le_bytes());
}

fn decode(record: &[u8], seq: u64) -> Option<Item> {
    if record.len() != RECORD {
        return None;
    }
    let ms = u64::from_le_bytes(record[0..8].try_into().ok()?);
    let key: [u8; 16] = record[8..24].try_into().ok()?;
    let value = i64::from_le_bytes(record[24..32].try_into().ok()?);
    let stored = u64::from_le_bytes(record[32..40].try_into().ok()?);
    (stored == check(seq, ms, &key, value) && value >= 1).then(|| Item {
        id: EntryId { ms, seq },
        key: Uuid::from_bytes(key),
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inc(n: u128, value: i64) -> Increment {
        Increment {
            key: Uuid::from_u128(n),
            value,
        }
    }

    async fn drain(consumer: &mut Consumer) -> Vec<Item> {
        let mut out = Vec::new();
        while let Some(items) = consumer.try_next() {
            out.extend(items);
        }
        out
    }

    #[tokio::test]
    async fn acknowledged_records_survive_a_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (producer, mut consumer) = open(dir.path(), 0, false).unwrap();
            for n in 1..=5 {
                producer.enqueue(inc(n, n as i64)).await.unwrap();
            }
            assert_eq!(drain(&mut consumer).await.len(), 5);
        }
        let segment = list_segments(dir.path()).unwrap()[0].1.clone();
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&[7u8; 17]).unwrap();
        drop(file);

        let (producer, mut consumer) = open(dir.path(), 2, false).unwrap();
        let replayed = drain(&mut consumer).await;
        assert_eq!(
            replayed
                .iter()
                .map(|i| (i.id.seq, i.value))
                .collect::<Vec<_>>(),
            vec![(3, 3), (4, 4), (5, 5)]
        );
        producer.enqueue(inc(9, 9)).await.unwrap();
        let next = consumer.next().await.unwrap();
        assert_eq!(next[0].id.seq, 6, "sequence numbers continue after the cut");
    }

    #[test]
    fn a_flipped_bit_fails_the_check() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, 1, &inc(3, 4));
        assert!(decode(&buf, 7).is_some());
        assert!(decode(&buf, 8).is_none(), "bound to its position");
        buf[20] ^= 1;
        assert!(decode(&buf, 7).is_none());
    }
}
