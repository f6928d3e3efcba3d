//! The embedded queue: an append-only log on local disk, written with group commit, and
//! read back by the worker from disk.
//!
//! Requests hand their increment to one writer thread; it appends everything that queued
//! up while the previous write was syncing, syncs once, and only then lets those requests
//! answer 202. So a 202 survives `kill -9` of the process (the bytes are in the kernel), and
//! with `fsync` also power loss, the sync cost then shared by every request in the group.
//!
//! The log is the queue: the writer only publishes "committed up to seq N", and the worker
//! reads the records from the segments in bounded chunks (`reader.rs`), so a backlog (a
//! database outage, a restart) waits on disk and memory stays flat however long it grows.
//!
//! Records are 40 bytes: accept time (ms), key, value, and a check that binds them to their
//! sequence number, so a torn or misplaced record is recognised. On start every segment is
//! checked (`recovery.rs`): a torn tail is cut (with a WARN), damage before the end refuses
//! the start unless `repair`. Segments are named by their first sequence number and
//! deleted once a flush whose watermark covers them has committed.

mod reader;
mod recovery;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use self::reader::ReadCursor;
use super::QueueError;
use crate::aggregate::{EntryId, Item};
use crate::validate::Increment;

const RECORD: usize = 40;
const SEGMENT_BYTES: u64 = 64 << 20;
const MAX_GROUP: usize = 16_384;
/// Records per read of the worker (640 KiB): what bounds the memory of the queue itself.
pub const READ_CHUNK: usize = 16_384;

type Reply = oneshot::Sender<Result<(), QueueError>>;

/// How the log is opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Sync every group before its 202.
    pub fsync: bool,
    /// Move a damaged segment aside (keeping its valid prefix) instead of refusing to start.
    pub repair: bool,
}

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

/// What the worker reads: the log above the watermark, as far as it is committed. It ends
/// when every producer is gone, the writer has stopped and everything was read.
pub struct Consumer {
    dir: PathBuf,
    /// The highest sequence number durable in the log (0: none yet).
    committed: watch::Receiver<u64>,
    cursor: ReadCursor,
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

    /// Waits until the log holds committed records not yet read: true, or false once the
    /// writer has stopped and everything was read. Cancel-safe.
    pub async fn wait(&mut self) -> bool {
        loop {
            if *self.committed.borrow_and_update() >= self.cursor.next_seq {
                return true;
            }
            if self.committed.changed().await.is_err() {
                return *self.committed.borrow() >= self.cursor.next_seq;
            }
        }
    }

    /// Reads at most [`READ_CHUNK`] committed records from disk, on a blocking thread.
    /// If this future is dropped midway, the position is unchanged and nothing is lost.
    pub async fn read(&mut self) -> Result<Vec<Item>, QueueError> {
        let upto = *self.committed.borrow();
        let fresh = self.cursor.fresh_copy();
        let mut cursor = std::mem::replace(&mut self.cursor, fresh);
        let (cursor, items) = tokio::task::spawn_blocking(move || {
            let items = cursor.read(upto, READ_CHUNK);
            (cursor, items)
        })
        .await
        .map_err(|err| QueueError::Reader(err.to_string()))?;
        self.cursor = cursor;
        items
    }

    /// Waits for committed records and reads a chunk of them; `None` once closed and read.
    pub async fn next(&mut self) -> Result<Option<Vec<Item>>, QueueError> {
        if self.wait().await {
            self.read().await.map(Some)
        } else {
            Ok(None)
        }
    }

    /// Reads a chunk of what is committed right now, on this thread; `None` if nothing.
    pub fn try_next(&mut self) -> Result<Option<Vec<Item>>, QueueError> {
        let upto = *self.committed.borrow();
        if upto < self.cursor.next_seq {
            return Ok(None);
        }
        self.cursor.read(upto, READ_CHUNK).map(Some)
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

/// Opens the log in `dir` without repairing: see [`open_with`].
pub fn open(dir: &Path, watermark: u64, fsync: bool) -> Result<(Producer, Consumer), QueueError> {
    open_with(
        dir,
        watermark,
        LogOptions {
            fsync,
            repair: false,
        },
    )
}

/// Opens the log in `dir`, after checking every segment; the consumer starts above
/// `watermark` (committed to the store up to it), so the worker replays the rest first.
pub fn open_with(
    dir: &Path,
    watermark: u64,
    options: LogOptions,
) -> Result<(Producer, Consumer), QueueError> {
    std::fs::create_dir_all(dir).map_err(|err| QueueError::io(dir, err))?;
    let recovered = recovery::recover(dir, watermark, options.repair)?;
    if recovered.pending > 0 {
        tracing::info!(
            records = recovered.pending,
            "replaying the embedded log above the committed watermark"
        );
    }
    let (base, path) = append_target(dir, &recovered);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|err| QueueError::io(&path, err))?;
    let written = file
        .metadata()
        .map_err(|err| QueueError::io(&path, err))?
        .len();
    let current_base = Arc::new(AtomicU64::new(base));
    let depth = Arc::new(AtomicU64::new(recovered.pending));
    let (committed_tx, committed_rx) = watch::channel(recovered.next_seq - 1);
    let (tx, rx) = mpsc::channel(MAX_GROUP);
    let writer = Writer {
        dir: dir.to_path_buf(),
        file,
        written,
        next_seq: recovered.next_seq,
        fsync: options.fsync,
        current_base: current_base.clone(),
        committed: committed_tx,
        depth: depth.clone(),
        unusable: None,
    };
    std::thread::Builder::new()
        .name("increments-log".into())
        .spawn(move || writer.run(rx))
        .map_err(|err| QueueError::io(dir, err))?;
    let producer = Producer {
        tx,
        depth: depth.clone(),
    };
    let consumer = Consumer {
        dir: dir.to_path_buf(),
        committed: committed_rx,
        cursor: ReadCursor::new(dir, watermark + 1),
        current_base,
        depth,
    };
    Ok((producer, consumer))
}

/// The segment new records go to: the last one if the next record lands right after its
/// last record (positions are sequence numbers) and it has room, else a fresh one.
fn append_target(dir: &Path, recovered: &recovery::Recovered) -> (u64, PathBuf) {
    let next_seq = recovered.next_seq;
    match &recovered.last {
        Some((base, path))
            if std::fs::metadata(path).map(|m| m.len()).unwrap_or(u64::MAX)
                == (next_seq - base) * RECORD as u64
                && (next_seq - base) * (RECORD as u64) < SEGMENT_BYTES =>
        {
            (*base, path.clone())
        }
        _ => (next_seq, segment_path(dir, next_seq)),
    }
}

struct Writer {
    dir: PathBuf,
    file: File,
    written: u64,
    next_seq: u64,
    fsync: bool,
    current_base: Arc<AtomicU64>,
    committed: watch::Sender<u64>,
    depth: Arc<AtomicU64>,
    /// Set once the file can no longer be kept aligned on records.
    unusable: Option<String>,
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
            for (n, (increment, _)) in group.iter().enumerate() {
                encode(&mut buf, self.next_seq + n as u64, now, increment);
            }
            match self.append(&buf) {
                Ok(()) => {
                    self.next_seq += group.len() as u64;
                    self.depth.fetch_add(group.len() as u64, Ordering::Relaxed);
                    // Published before the clients hear 202, so the queue depth a flush
                    // reports never misses an acknowledged increment.
                    self.committed.send_replace(self.next_seq - 1);
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
        if let Some(reason) = &self.unusable {
            return Err(std::io::Error::other(reason.clone()));
        }
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
                self.undo_failed_append();
                Err(err)
            }
        }
    }

    /// Cuts what a failed append left, so the next group starts on a record boundary. If
    /// that fails too, every later record would sit at the wrong position and read back as
    /// damage: the log then refuses all further writes instead.
    fn undo_failed_append(&mut self) {
        let len = self.file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
        match self.file.set_len(self.written) {
            Ok(()) => {
                if len > self.written {
                    tracing::warn!(
                        bytes = len - self.written,
                        "cut the partial write of a failed append (never acknowledged)"
                    );
                }
            }
            Err(err) => {
                tracing::error!(%err, "cannot cut a failed append; the log takes no more writes");
                self.unusable = Some(format!("a failed append could not be undone: {err}"));
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
    // record fails it with overwhelming probability. A change confined to one byte always
    // fails it: every FNV step and the avalanche are bijections of the 64-bit state.
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
    use std::sync::Mutex;

    use super::*;

    fn inc(n: u128, value: i64) -> Increment {
        Increment {
            key: Uuid::from_u128(n),
            value,
        }
    }

    fn drain(consumer: &mut Consumer) -> Vec<Item> {
        let mut out = Vec::new();
        while let Some(items) = consumer.try_next().unwrap() {
            if items.is_empty() {
                break;
            }
            out.extend(items);
        }
        out
    }

    fn seqs(items: &[Item]) -> Vec<u64> {
        items.iter().map(|item| item.id.seq).collect()
    }

    /// A segment as the writer leaves it: `count` records from `base`, value = seq.
    fn write_segment(dir: &Path, base: u64, count: u64) -> PathBuf {
        let mut buf = Vec::new();
        for seq in base..base + count {
            encode(&mut buf, seq, 1_700_000_000_000, &inc(1, seq as i64));
        }
        let path = segment_path(dir, base);
        std::fs::write(&path, buf).unwrap();
        path
    }

    fn flip_byte(path: &Path, offset: u64) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[offset as usize] ^= 0x20;
        std::fs::write(path, bytes).unwrap();
    }

    /// Runs `f` with the log lines it emits captured (no colours).
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Capture(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        (out, text)
    }

    #[tokio::test]
    async fn acknowledged_records_survive_a_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (producer, mut consumer) = open(dir.path(), 0, false).unwrap();
            for n in 1..=5 {
                producer.enqueue(inc(n, n as i64)).await.unwrap();
            }
            assert_eq!(drain(&mut consumer).len(), 5);
        }
        let segment = list_segments(dir.path()).unwrap()[0].1.clone();
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&[7u8; 17]).unwrap();
        drop(file);

        let (producer, mut consumer) = open(dir.path(), 2, false).unwrap();
        let replayed = drain(&mut consumer);
        assert_eq!(
            replayed
                .iter()
                .map(|i| (i.id.seq, i.value))
                .collect::<Vec<_>>(),
            vec![(3, 3), (4, 4), (5, 5)]
        );
        producer.enqueue(inc(9, 9)).await.unwrap();
        let next = consumer.next().await.unwrap().unwrap();
        assert_eq!(next[0].id.seq, 6, "sequence numbers continue after the cut");
    }

    #[test]
    fn a_truncated_last_record_is_cut_with_a_warning_keeping_every_complete_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_segment(dir.path(), 1, 1000);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(1000 * RECORD as u64 - 13).unwrap();
        drop(file);

        let (opened, logs) = logged(|| open(dir.path(), 0, false));
        let (_producer, mut consumer) = opened.unwrap();
        assert_eq!(seqs(&drain(&mut consumer)), (1..=999).collect::<Vec<_>>());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 999 * RECORD as u64);
        assert!(logs.contains("WARN"), "{logs}");
        assert!(
            logs.contains("torn tail") && logs.contains("bytes=27"),
            "{logs}"
        );
    }

    #[test]
    fn zeros_after_the_last_record_are_a_torn_tail_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_segment(dir.path(), 1, 10);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[0u8; 3 * RECORD]).unwrap();
        drop(file);

        let (_producer, mut consumer) = open(dir.path(), 0, false).unwrap();
        assert_eq!(drain(&mut consumer).len(), 10);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10 * RECORD as u64);
    }

    #[test]
    fn a_damaged_record_in_the_last_segment_refuses_the_start_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_segment(dir.path(), 1, 1000);
        let offset = 499 * RECORD as u64 + 20;
        flip_byte(&path, offset);

        let err = open(dir.path(), 0, false).err().unwrap();
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("byte 19960"), "{message}");
        assert!(message.contains("--repair"), "{message}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            40_000,
            "the evidence is left as it was"
        );
    }

    #[test]
    fn a_damaged_record_in_an_earlier_segment_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_segment(dir.path(), 1, 1000);
        write_segment(dir.path(), 1001, 1000);
        flip_byte(&first, 999 * RECORD as u64 + 3);

        let message = open(dir.path(), 0, false).err().unwrap().to_string();
        assert!(message.contains(&first.display().to_string()), "{message}");
        assert!(message.contains("byte 39960"), "{message}");
    }

    #[test]
    fn a_partial_record_at_the_end_of_an_earlier_segment_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_segment(dir.path(), 1, 10);
        write_segment(dir.path(), 11, 10);
        let file = OpenOptions::new().write(true).open(&first).unwrap();
        file.set_len(10 * RECORD as u64 - 1).unwrap();
        drop(file);

        assert!(matches!(
            open(dir.path(), 0, false),
            Err(QueueError::Damaged { offset: 360, .. })
        ));
    }

    #[test]
    fn repair_keeps_the_records_before_the_damage_and_moves_the_segment_aside() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_segment(dir.path(), 1, 1000);
        write_segment(dir.path(), 1001, 1000);
        flip_byte(&first, 499 * RECORD as u64 + 20);
        let original = std::fs::read(&first).unwrap();
        let options = LogOptions {
            fsync: false,
            repair: true,
        };

        let (opened, logs) = logged(|| open_with(dir.path(), 0, options));
        let (_producer, mut consumer) = opened.unwrap();
        let replayed = seqs(&drain(&mut consumer));
        let expected: Vec<u64> = (1..=499).chain(1001..=2000).collect();
        assert_eq!(replayed, expected);
        let aside: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.to_string_lossy().contains(".log.damaged-"))
            .collect();
        assert_eq!(aside.len(), 1, "moved aside, not deleted");
        assert_eq!(std::fs::read(&aside[0]).unwrap(), original);
        assert_eq!(
            std::fs::metadata(&first).unwrap().len(),
            499 * RECORD as u64
        );
        assert!(logs.contains("WARN") && logs.contains("REPAIRED"), "{logs}");
        assert!(logs.contains("bytes_lost=20040"), "{logs}");
        assert!(logs.contains("valid_records_lost=500"), "{logs}");
    }

    #[test]
    fn repairing_the_last_segment_continues_the_sequence_after_the_kept_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_segment(dir.path(), 1, 1000);
        flip_byte(&path, 499 * RECORD as u64 + 20);
        let options = LogOptions {
            fsync: false,
            repair: true,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (producer, mut consumer) = open_with(dir.path(), 0, options).unwrap();
        assert_eq!(drain(&mut consumer).len(), 499);
        runtime.block_on(producer.enqueue(inc(2, 2))).unwrap();
        assert_eq!(seqs(&drain(&mut consumer)), vec![500]);
    }

    #[test]
    fn the_reader_crosses_segments_and_skips_a_gap_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 1, READ_CHUNK as u64 + 5);
        let second = READ_CHUNK as u64 + 100;
        write_segment(dir.path(), second, 10);
        let (_producer, mut consumer) = open(dir.path(), 3, false).unwrap();
        assert_eq!(consumer.depth(), READ_CHUNK as u64 + 2 + 10);

        let first = consumer.try_next().unwrap().unwrap();
        assert_eq!(first.len(), READ_CHUNK, "one read never exceeds a chunk");
        assert_eq!(first[0].id.seq, 4);
        let rest = seqs(&drain(&mut consumer));
        let expected: Vec<u64> = (READ_CHUNK as u64 + 4..=READ_CHUNK as u64 + 5)
            .chain(second..second + 10)
            .collect();
        assert_eq!(rest, expected);
    }

    #[test]
    fn missing_records_between_segments_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 1, 10);
        write_segment(dir.path(), 21, 10);
        let (opened, logs) = logged(|| open(dir.path(), 0, false));
        let (_producer, mut consumer) = opened.unwrap();
        assert_eq!(drain(&mut consumer).len(), 20);
        assert!(
            logs.contains("WARN") && logs.contains("missing between"),
            "{logs}"
        );
        assert!(logs.contains("first_missing=11 last_missing=20"), "{logs}");
        let (_, quiet) = logged(|| open(dir.path(), 25, false).map(|_| ()));
        assert!(!quiet.contains("missing"), "below the watermark: {quiet}");
    }

    #[test]
    fn a_read_stops_at_a_record_damaged_after_the_start_and_reports_it_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_segment(dir.path(), 1, 10);
        let (_producer, mut consumer) = open(dir.path(), 0, false).unwrap();
        flip_byte(&path, 6 * RECORD as u64 + 1);
        assert_eq!(
            seqs(&consumer.try_next().unwrap().unwrap()),
            (1..=6).collect::<Vec<_>>()
        );
        for _ in 0..2 {
            assert!(matches!(
                consumer.try_next(),
                Err(QueueError::Damaged { offset: 240, .. })
            ));
        }
    }

    #[test]
    fn a_committed_record_missing_from_disk_is_an_error_not_an_empty_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_segment(dir.path(), 1, 10);
        let (_producer, mut consumer) = open(dir.path(), 0, false).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            consumer.try_next(),
            Err(QueueError::Missing { seq: 1, .. })
        ));
    }

    #[tokio::test]
    async fn the_consumer_reads_what_is_committed_and_closes_with_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (producer, mut consumer) = open(dir.path(), 0, false).unwrap();
        producer.enqueue(inc(1, 1)).await.unwrap();
        producer.enqueue(inc(1, 2)).await.unwrap();
        assert_eq!(seqs(&consumer.next().await.unwrap().unwrap()), vec![1, 2]);
        producer.enqueue(inc(1, 3)).await.unwrap();
        drop(producer);
        assert_eq!(seqs(&consumer.next().await.unwrap().unwrap()), vec![3]);
        assert!(consumer.next().await.unwrap().is_none(), "closed and read");
    }

    #[test]
    fn a_flipped_bit_fails_the_check() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, 1, &inc(3, 4));
        assert!(decode(&buf, 7).is_some());
        assert!(decode(&buf, 8).is_none(), "bound to its position");
        for byte in 0..RECORD {
            for bit in 0..8 {
                let mut flipped = buf.clone();
                flipped[byte] ^= 1 << bit;
                assert!(decode(&flipped, 7).is_none(), "byte {byte} bit {bit}");
            }
        }
    }
}
