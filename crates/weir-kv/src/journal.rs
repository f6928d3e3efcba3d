//! The data directory: a snapshot of the store plus an append-only journal of the writes
//! since, so the store survives a restart and `kill -9`, and a request is acknowledged to the
//! broker only once its write is in the journal.
//!
//! Every write gets an operation number. The journal also records how far the broker has been
//! acknowledged ("acked through N"), so after a crash the server knows which applied writes the
//! broker will deliver again: with the identities of their requests, in order, they are handed
//! to the dedupe in [`crate::dedupe`], and the redelivered copies of requests with an identity
//! are answered without being applied twice (applying a suffix of writes again can reorder the
//! store, so replays are not harmless).
//!
//! Files: `snapshot` and `journal`, both [`weir_runtime::recordlog`] files, so a torn tail of
//! the journal is cut with a warning and damage refuses to start (or, with repair, is moved
//! aside). A new snapshot is written beside the old one, synced and renamed over it, then the
//! journal starts afresh; writes already in the snapshot are skipped on replay, so a crash
//! between the two steps loses nothing.
//!
//! A snapshot can therefore never be legitimately short: it ends with a trailer holding its
//! entry count, and one without it (cut anywhere), or with a torn tail, is damage. The journal
//! starts with a header naming the snapshot it continues (the snapshot's operation number), so
//! a snapshot that is missing, or older than the journal needs, is refused naming both files.
//! `--repair` starts from what there is instead, with a warning.

use std::path::{Path, PathBuf};

use weir_runtime::recordlog::{self, RecordLogError, RecordWriter, Scan};

use crate::store::Store;

const SNAPSHOT: &str = "snapshot";
const SNAPSHOT_NEXT: &str = "snapshot.next";
const JOURNAL: &str = "journal";
/// Larger than any record: a key and value at their limits plus framing.
const MAX_RECORD: usize = 128 * 1024;

const ADD: u8 = b'A';
const REMOVE: u8 = b'R';
const ACKED: u8 = b'K';
/// The header of snapshots written before trailers: no trailer is required of them.
const SNAPSHOT_HEADER_UNCHECKED: u8 = b'S';
/// The header of a snapshot that ends with a [`SNAPSHOT_TRAILER`].
const SNAPSHOT_HEADER: u8 = b'V';
const SNAPSHOT_TRAILER: u8 = b'T';
const ENTRY: u8 = b'E';
/// The first record of a journal: the operation of the snapshot it continues.
const JOURNAL_HEADER: u8 = b'H';

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Log(#[from] RecordLogError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{snapshot} and {journal} do not match: {problem}; refusing to start (--repair starts from what is there, losing what is missing)")]
    Mismatch {
        snapshot: PathBuf,
        journal: PathBuf,
        problem: String,
    },
    #[error("{path}: {problem}: the snapshot is damaged (a snapshot is synced before it is renamed into place, so it is never legitimately short); refusing to start (--repair starts from what it holds)")]
    ShortSnapshot { path: PathBuf, problem: String },
}

/// One logged write: what it did, what it answered, and the identity of the request that
/// asked for it ([`crate::dedupe::identity`], 0 for none), so a redelivered copy can be
/// answered the same way without applying. Journals written before identities hold a hash
/// of the body there: it matches no identity, so their copies are applied again, not lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub op: u64,
    pub identity: u64,
    /// `add` replaced a value; `remove` found the key.
    pub outcome: bool,
    pub kind: WriteKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteKind {
    Add { key: String, value: String },
    Remove { key: String },
}

/// What opening the directory recovered.
pub struct Recovered {
    pub store: Store,
    /// The last operation number used.
    pub last_op: u64,
    /// Writes applied but not known to be acknowledged, oldest first: the broker may deliver
    /// their requests again.
    pub unacked: Vec<Write>,
    /// The operation the snapshot holds the store as of (0 without one).
    pub snapshot_op: u64,
    /// The journal's writes past the `tail_after` given to [`Journal::open`], oldest first
    /// (what `--output` may lack).
    pub tail: Vec<Write>,
}

pub struct Journal {
    dir: PathBuf,
    writer: RecordWriter,
    scratch: Vec<u8>,
}

impl Journal {
    /// Loads the snapshot and replays the journal. With `repair`, a damaged file is moved
    /// aside and what came before the damage is kept; without it, damage is an error. With
    /// `tail_after`, the writes past that operation are returned too.
    pub fn open(
        dir: &Path,
        repair: bool,
        tail_after: Option<u64>,
    ) -> Result<(Journal, Recovered), JournalError> {
        let mut recovered = Recovered {
            store: Store::new(),
            last_op: 0,
            unacked: Vec::new(),
            snapshot_op: 0,
            tail: Vec::new(),
        };
        let snapshot_path = dir.join(SNAPSHOT);
        let journal_path = dir.join(JOURNAL);
        let mut snapshot_op = 0;
        let snapshot_exists = snapshot_path.exists();
        if snapshot_exists {
            let mut loaded = SnapshotLoad::default();
            let scan = read_with_repair(&snapshot_path, repair, |payload| {
                load_snapshot_record(payload, &mut recovered.store, &mut loaded)
            })?;
            snapshot_op = loaded.op;
            if let Some(problem) = loaded.problem(scan.torn_bytes) {
                let err = JournalError::ShortSnapshot {
                    path: snapshot_path.clone(),
                    problem,
                };
                if !repair {
                    return Err(err);
                }
                tracing::warn!(%err, keys = recovered.store.len(), "kv --repair: starting from what the snapshot holds");
            }
            recordlog::cut_torn_tail(&snapshot_path, &scan)?;
        }
        recovered.last_op = snapshot_op;
        recovered.snapshot_op = snapshot_op;
        let mut acked_through = snapshot_op;
        let mut valid_len = 0;
        let mut continues: Option<u64> = None;
        let mut first_op: Option<u64> = None;
        let journal_exists = journal_path.exists();
        if journal_exists {
            let scan = read_with_repair(&journal_path, repair, |payload| {
                if payload.first() == Some(&JOURNAL_HEADER) {
                    continues = Some(Fields(&payload[1..]).u64()?);
                    return Ok(());
                }
                if first_op.is_none() && matches!(payload.first(), Some(&ADD | &REMOVE)) {
                    first_op = Some(Fields(&payload[1..]).u64()?);
                }
                replay(
                    payload,
                    snapshot_op,
                    tail_after,
                    &mut recovered,
                    &mut acked_through,
                )
            })?;
            recordlog::cut_torn_tail(&journal_path, &scan)?;
            valid_len = scan.valid_len;
        }
        // The journal continues the snapshot at `continues` (a journal from before headers:
        // its first write follows the snapshot it continues).
        let needed = continues.or(first_op.map(|op| op - 1)).unwrap_or(0);
        let problem = if needed > 0 && !snapshot_exists {
            Some(format!(
                "the journal continues a snapshot at operation {needed}, and there is no snapshot"
            ))
        } else if needed > snapshot_op {
            Some(format!(
                "the journal continues a snapshot at operation {needed}, and the snapshot is at {snapshot_op}"
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            let err = JournalError::Mismatch {
                snapshot: snapshot_path.clone(),
                journal: journal_path.clone(),
                problem,
            };
            if !repair {
                return Err(err);
            }
            tracing::warn!(%err, keys = recovered.store.len(), "kv --repair: starting from what is there");
        }
        recovered.unacked.retain(|write| write.op > acked_through);
        let mut writer = RecordWriter::open(&journal_path, valid_len)?;
        if !journal_exists {
            writer.append(&journal_header(snapshot_op));
            writer.commit(true)?;
        }
        Ok((
            Journal {
                dir: dir.to_path_buf(),
                writer,
                scratch: Vec::new(),
            },
            recovered,
        ))
    }

    /// Frames a write for the next [`commit`](Self::commit).
    pub fn append(&mut self, write: &Write) {
        self.scratch.clear();
        encode_write(write, &mut self.scratch);
        self.writer.append(&self.scratch);
    }

    /// Records that the broker was acknowledged through operation `op`.
    pub fn append_acked(&mut self, op: u64) {
        self.scratch.clear();
        self.scratch.push(ACKED);
        self.scratch.extend_from_slice(&op.to_le_bytes());
        self.writer.append(&self.scratch);
    }

    /// Writes everything appended in one system call; with `sync`, waits for the disk too.
    pub fn commit(&mut self, sync: bool) -> Result<(), JournalError> {
        Ok(self.writer.commit(sync)?)
    }

    /// Bytes in the journal since the last snapshot.
    pub fn len(&self) -> u64 {
        self.writer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writer.is_empty()
    }

    /// Encodes `store` as of operation `op` for [`install_snapshot`](Self::install_snapshot).
    /// Cheap enough to run on the apply path (one pass, one buffer); the file work is not.
    pub fn encode_snapshot(store: &Store, op: u64) -> Vec<u8> {
        let mut framed = RecordBuffer::default();
        let mut header = vec![SNAPSHOT_HEADER];
        header.extend_from_slice(&op.to_le_bytes());
        framed.push(&header);
        let mut entry = Vec::new();
        let mut entries = 0u64;
        for (key, value) in store.iter() {
            entry.clear();
            entry.push(ENTRY);
            put_str(&mut entry, key);
            put_str(&mut entry, value);
            framed.push(&entry);
            entries += 1;
        }
        let mut trailer = vec![SNAPSHOT_TRAILER];
        trailer.extend_from_slice(&entries.to_le_bytes());
        framed.push(&trailer);
        framed.bytes
    }

    /// Writes an encoded snapshot beside the current one, syncs it, and renames it over the
    /// old one. Blocking file work: run it off the apply path. The journal may be reset
    /// afterwards with [`reset`](Self::reset).
    pub fn install_snapshot(dir: &Path, encoded: &[u8]) -> Result<(), JournalError> {
        let next = dir.join(SNAPSHOT_NEXT);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { path, source }
        };
        let mut file = std::fs::File::create(&next).map_err(io(&next))?;
        std::io::Write::write_all(&mut file, recordlog::MAGIC).map_err(io(&next))?;
        std::io::Write::write_all(&mut file, encoded).map_err(io(&next))?;
        file.sync_all().map_err(io(&next))?;
        let target = dir.join(SNAPSHOT);
        std::fs::rename(&next, &target).map_err(io(&target))?;
        std::fs::File::open(dir)
            .and_then(|handle| handle.sync_all())
            .map_err(io(dir))
    }

    /// Starts an empty journal once a snapshot (at operation `snapshot_op`) holds everything
    /// it had; the new journal's header names that snapshot. Writes appended but not
    /// committed are lost, so call it right after a commit.
    pub fn reset(&mut self, snapshot_op: u64) -> Result<(), JournalError> {
        let path = self.dir.join(JOURNAL);
        let fresh = self.dir.join("journal.next");
        let _ = std::fs::remove_file(&fresh);
        let mut writer = RecordWriter::open(&fresh, 0)?;
        writer.append(&journal_header(snapshot_op));
        writer.commit(true)?;
        std::fs::rename(&fresh, &path).map_err(|source| JournalError::Io {
            path: path.clone(),
            source,
        })?;
        self.writer = writer;
        Ok(())
    }
}

fn read_with_repair<F>(path: &Path, repair: bool, mut each: F) -> Result<Scan, JournalError>
where
    F: FnMut(&[u8]) -> Result<(), String>,
{
    match recordlog::scan(path, MAX_RECORD, &mut each) {
        Err(RecordLogError::Damaged { offset, .. }) if repair => {
            // Keep what came before the damage: copy it to a fresh file, move the original
            // aside for inspection. The records before `offset` were already applied above.
            let aside = recordlog::move_aside(path)?;
            let kept = std::fs::read(&aside)
                .map(|bytes| bytes[..offset as usize].to_vec())
                .map_err(|source| JournalError::Io {
                    path: aside.clone(),
                    source,
                })?;
            std::fs::write(path, &kept).map_err(|source| JournalError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(Scan {
                records: 0,
                valid_len: offset,
                torn_bytes: 0,
            })
        }
        other => Ok(other?),
    }
}

#[derive(Default)]
struct RecordBuffer {
    bytes: Vec<u8>,
}

impl RecordBuffer {
    fn push(&mut self, payload: &[u8]) {
        self.bytes
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.bytes
            .extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        self.bytes.extend_from_slice(payload);
    }
}

fn encode_write(write: &Write, out: &mut Vec<u8>) {
    match &write.kind {
        WriteKind::Add { key, value } => {
            out.push(ADD);
            put_head(out, write);
            put_str(out, key);
            put_str(out, value);
        }
        WriteKind::Remove { key } => {
            out.push(REMOVE);
            put_head(out, write);
            put_str(out, key);
        }
    }
}

fn put_head(out: &mut Vec<u8>, write: &Write) {
    out.extend_from_slice(&write.op.to_le_bytes());
    out.extend_from_slice(&write.identity.to_le_bytes());
    out.push(u8::from(write.outcome));
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Reads the fields of one record in order; every read says what was expected, because a
/// record that passed its CRC but does not decode is a bug worth a precise message.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn u64(&mut self) -> Result<u64, String> {
        let (head, rest) = self
            .0
            .split_first_chunk::<8>()
            .ok_or("record ends inside a number")?;
        self.0 = rest;
        Ok(u64::from_le_bytes(*head))
    }

    fn flag(&mut self) -> Result<bool, String> {
        let (&byte, rest) = self.0.split_first().ok_or("record ends inside a flag")?;
        self.0 = rest;
        Ok(byte != 0)
    }

    fn str(&mut self) -> Result<&'a str, String> {
        let (len, rest) = self
            .0
            .split_first_chunk::<4>()
            .ok_or("record ends inside a length")?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err("record ends inside a string".into());
        }
        let (text, rest) = rest.split_at(len);
        self.0 = rest;
        std::str::from_utf8(text).map_err(|_| "a string is not UTF-8".into())
    }
}

fn journal_header(snapshot_op: u64) -> Vec<u8> {
    let mut header = vec![JOURNAL_HEADER];
    header.extend_from_slice(&snapshot_op.to_le_bytes());
    header
}

pub fn decode_write(payload: &[u8]) -> Result<Option<Write>, String> {
    let (&tag, rest) = payload.split_first().ok_or("empty record")?;
    let mut fields = Fields(rest);
    let kind = match tag {
        ADD | REMOVE => tag,
        ACKED | JOURNAL_HEADER => return Ok(None),
        other => return Err(format!("unknown record type {other:#04x}")),
    };
    let op = fields.u64()?;
    let identity = fields.u64()?;
    let outcome = fields.flag()?;
    let key = fields.str()?.to_string();
    let kind = if kind == ADD {
        let value = fields.str()?.to_string();
        WriteKind::Add { key, value }
    } else {
        WriteKind::Remove { key }
    };
    Ok(Some(Write {
        op,
        identity,
        outcome,
        kind,
    }))
}

fn replay(
    payload: &[u8],
    snapshot_op: u64,
    tail_after: Option<u64>,
    recovered: &mut Recovered,
    acked_through: &mut u64,
) -> Result<(), String> {
    if payload.first() == Some(&ACKED) {
        let op = Fields(&payload[1..]).u64()?;
        *acked_through = (*acked_through).max(op);
        // Writes are in op order, so the acknowledged ones are a prefix.
        let acked = recovered.unacked.partition_point(|write| write.op <= op);
        recovered.unacked.drain(..acked);
        return Ok(());
    }
    let Some(write) = decode_write(payload)? else {
        return Ok(());
    };
    if write.op <= snapshot_op {
        return Ok(());
    }
    match &write.kind {
        WriteKind::Add { key, value } => {
            recovered.store.add(key, value);
        }
        WriteKind::Remove { key } => {
            recovered.store.remove(key);
        }
    }
    recovered.last_op = write.op;
    if tail_after.is_some_and(|after| write.op > after) {
        recovered.tail.push(write.clone());
    }
    recovered.unacked.push(write);
    Ok(())
}

/// What loading a snapshot found, to tell a complete one from a short one.
#[derive(Default)]
struct SnapshotLoad {
    op: u64,
    /// The header says a trailer ends the file.
    checked: bool,
    entries: u64,
    trailer: Option<u64>,
}

impl SnapshotLoad {
    /// Why the snapshot is not complete, if it is not.
    fn problem(&self, torn_bytes: u64) -> Option<String> {
        if !self.checked {
            return None;
        }
        if torn_bytes > 0 {
            return Some(format!("it ends inside a record ({torn_bytes} bytes)"));
        }
        match self.trailer {
            None => Some(format!(
                "it has no trailer: it ends after {} entries",
                self.entries
            )),
            Some(count) if count != self.entries => Some(format!(
                "its trailer counts {count} entries, it holds {}",
                self.entries
            )),
            Some(_) => None,
        }
    }
}

fn load_snapshot_record(
    payload: &[u8],
    store: &mut Store,
    loaded: &mut SnapshotLoad,
) -> Result<(), String> {
    let (&tag, rest) = payload.split_first().ok_or("empty record")?;
    let mut fields = Fields(rest);
    if loaded.trailer.is_some() {
        return Err("a record after the snapshot's trailer".into());
    }
    match tag {
        SNAPSHOT_HEADER | SNAPSHOT_HEADER_UNCHECKED => {
            loaded.op = fields.u64()?;
            loaded.checked = tag == SNAPSHOT_HEADER;
        }
        ENTRY => {
            let key = fields.str()?;
            let value = fields.str()?;
            store.add(key, value);
            loaded.entries += 1;
        }
        SNAPSHOT_TRAILER => loaded.trailer = Some(fields.u64()?),
        other => return Err(format!("unknown snapshot record type {other:#04x}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(op: u64, key: &str, value: &str) -> Write {
        Write {
            op,
            identity: op * 100,
            outcome: false,
            kind: WriteKind::Add {
                key: key.into(),
                value: value.into(),
            },
        }
    }

    fn remove(op: u64, key: &str) -> Write {
        Write {
            op,
            identity: op * 100,
            outcome: true,
            kind: WriteKind::Remove { key: key.into() },
        }
    }

    fn items(store: &Store) -> Vec<(String, String)> {
        store.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    #[test]
    fn writes_survive_a_reopen_with_the_unacknowledged_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut journal, recovered) = Journal::open(dir.path(), false, None).unwrap();
            assert!(recovered.store.is_empty());
            journal.append(&add(1, "A", "a"));
            journal.append(&add(2, "B", "b"));
            journal.append_acked(2);
            journal.append(&remove(3, "A"));
            journal.append(&add(4, "C", "c"));
            journal.commit(false).unwrap();
        }
        let (_, recovered) = Journal::open(dir.path(), false, None).unwrap();
        assert_eq!(
            items(&recovered.store),
            [("B".into(), "b".into()), ("C".into(), "c".into())]
        );
        assert_eq!(recovered.last_op, 4);
        assert_eq!(recovered.unacked, [remove(3, "A"), add(4, "C", "c")]);
        assert!(recovered.tail.is_empty(), "no tail asked for");
        // What an output file that ends at op 1 lacks, acknowledged or not.
        let (_, recovered) = Journal::open(dir.path(), false, Some(1)).unwrap();
        let tail: Vec<u64> = recovered.tail.iter().map(|w| w.op).collect();
        assert_eq!(tail, [2, 3, 4]);
    }

    #[test]
    fn a_snapshot_replaces_the_journal_and_a_crash_between_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path(), false, None).unwrap();
        let mut store = Store::new();
        for (op, key) in [(1, "A"), (2, "B"), (3, "C")] {
            journal.append(&add(op, key, "v"));
            store.add(key, "v");
        }
        journal.append_acked(3);
        journal.commit(false).unwrap();
        let encoded = Journal::encode_snapshot(&store, 3);
        Journal::install_snapshot(dir.path(), &encoded).unwrap();
        // Crash here: the journal still holds ops 1..3, which the snapshot covers.
        let (mut journal, recovered) = Journal::open(dir.path(), false, None).unwrap();
        assert_eq!(recovered.store.len(), 3);
        assert_eq!(recovered.last_op, 3);
        assert!(recovered.unacked.is_empty());
        journal.reset(3).unwrap();
        journal.append(&add(4, "D", "v"));
        journal.commit(false).unwrap();
        let (_, recovered) = Journal::open(dir.path(), false, None).unwrap();
        let keys: Vec<_> = recovered.store.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(keys, ["A", "B", "C", "D"]);
        assert_eq!(recovered.unacked, [add(4, "D", "v")]);
    }

    #[test]
    fn damage_refuses_to_open_and_repair_keeps_what_came_before() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut journal, _) = Journal::open(dir.path(), false, None).unwrap();
            for op in 1..=10 {
                journal.append(&add(op, &format!("k{op}"), "v"));
            }
            journal.commit(false).unwrap();
        }
        let path = dir.path().join(JOURNAL);
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = Journal::open(dir.path(), false, None)
            .err()
            .expect("damage refused");
        assert!(err.to_string().contains("damaged record at byte"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "left untouched");

        let (_, recovered) = Journal::open(dir.path(), true, None).unwrap();
        let kept = recovered.store.len();
        assert!((1..10).contains(&kept), "kept {kept} of 10");
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.file_name().to_string_lossy().contains(".damaged-"))
            .collect();
        assert_eq!(aside.len(), 1, "the damaged journal is kept aside");
    }

    fn store_of(keys: u64) -> Store {
        let mut store = Store::new();
        for op in 1..=keys {
            store.add(&format!("k{op}"), "v");
        }
        store
    }

    /// A data dir whose snapshot holds ops 1..=100 and whose journal adds 101 and 102.
    fn snapshotted(dir: &Path) {
        let (mut journal, _) = Journal::open(dir, false, None).unwrap();
        let store = store_of(100);
        Journal::install_snapshot(dir, &Journal::encode_snapshot(&store, 100)).unwrap();
        journal.reset(100).unwrap();
        journal.append(&add(101, "k101", "v"));
        journal.append(&add(102, "k102", "v"));
        journal.commit(false).unwrap();
    }

    #[test]
    fn a_flipped_byte_in_the_last_journal_record_is_damage_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        snapshotted(dir.path());
        let path = dir.path().join(JOURNAL);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let err = Journal::open(dir.path(), false, None)
            .err()
            .expect("a complete record with a bad checksum is refused");
        let text = err.to_string();
        assert!(text.contains("damaged record at byte"), "{text}");
        assert!(text.contains("journal"), "names the file: {text}");
        assert!(!text.contains("mid-write"), "{text}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing cut");
    }

    #[test]
    fn a_short_snapshot_is_refused_naming_it_and_repair_starts_from_what_it_holds() {
        for cut in [0.5, 0.999] {
            let dir = tempfile::tempdir().unwrap();
            snapshotted(dir.path());
            let path = dir.path().join(SNAPSHOT);
            let bytes = std::fs::read(&path).unwrap();
            let short = (bytes.len() as f64 * cut) as usize;
            std::fs::write(&path, &bytes[..short]).unwrap();
            let err = Journal::open(dir.path(), false, None)
                .err()
                .expect("a short snapshot is refused");
            let text = err.to_string();
            assert!(text.contains("snapshot"), "{text}");
            assert!(text.contains("--repair"), "{text}");
            assert_eq!(std::fs::read(&path).unwrap().len(), short, "left as it was");
            let (_, recovered) = Journal::open(dir.path(), true, None).unwrap();
            assert!(
                recovered.store.len() <= 102,
                "what the snapshot held, and the journal"
            );
        }
        // Cut exactly at a record boundary (the trailer alone missing) is short too.
        let dir = tempfile::tempdir().unwrap();
        snapshotted(dir.path());
        let path = dir.path().join(SNAPSHOT);
        let bytes = std::fs::read(&path).unwrap();
        let trailer = 4 + 4 + 1 + 8;
        std::fs::write(&path, &bytes[..bytes.len() - trailer]).unwrap();
        let err = Journal::open(dir.path(), false, None)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("no trailer"), "{err}");
    }

    #[test]
    fn a_missing_or_older_snapshot_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        snapshotted(dir.path());
        let path = dir.path().join(SNAPSHOT);
        let complete = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let err = Journal::open(dir.path(), false, None)
            .err()
            .expect("a missing snapshot is refused");
        let text = err.to_string();
        assert!(text.contains("no snapshot"), "{text}");
        assert!(
            text.contains("snapshot") && text.contains("journal"),
            "{text}"
        );
        // An older snapshot in its place.
        let older = Journal::encode_snapshot(&store_of(50), 50);
        Journal::install_snapshot(dir.path(), &older).unwrap();
        let err = Journal::open(dir.path(), false, None)
            .err()
            .expect("an older snapshot is refused");
        assert!(err.to_string().contains("the snapshot is at 50"), "{err}");
        // The right one back: everything is there.
        std::fs::write(&path, &complete).unwrap();
        let (_, recovered) = Journal::open(dir.path(), false, None).unwrap();
        assert_eq!(recovered.store.len(), 102);
        assert_eq!(recovered.last_op, 102);
    }
}
