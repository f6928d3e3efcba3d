//! `weir distinct repair`: the explicit, offline-safe way past a damaged SQLite shard.
//!
//! A shard whose log fails its checks is refused for reads and writes (see [`super::sqlite`]),
//! because acknowledged items are in the damaged part. Repair takes the shard's lock (a
//! damaged shard is held by no worker: opening it failed), reads each log whole, keeps every
//! intact record (those before the damage and any found after it), moves the damaged file
//! aside as `<log>.damaged-<unix seconds>` (never deleted, for inspection), writes the kept
//! records to a fresh log, folds them into the index (so the shard's counts are complete
//! for what was kept before any reader is let back in), and reports exactly which byte
//! ranges it dropped: the items written there are lost, and the report says so.
//!
//! The shard's damage mark (which makes every reader refuse its counts) is removed last.
//!
//! A short last record (a crash mid-write, never acknowledged) is not damage: it is left for
//! the normal open, which cuts it.

use std::path::{Path, PathBuf};

use weir_runtime::datadir::{self, DataDirError};
use weir_runtime::recordlog::{self, RecordWriter, MAGIC};

use super::sqlite::{LOG_FILES, MAX_RECORD};
use super::StoreError;
use crate::shard::decode_items;

const HEADER: usize = 8;

/// What repair did to one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardRepair {
    /// Every log passed its checks: nothing was changed.
    Clean,
    /// A worker holds the shard, so it opened cleanly: nothing to repair.
    Held(String),
    /// Damaged logs, each moved aside and rewritten with what was intact.
    Repaired(Vec<LogRepair>),
}

/// One damaged log and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRepair {
    pub file: PathBuf,
    /// Where the damaged file now is.
    pub aside: PathBuf,
    pub kept_records: u64,
    pub kept_items: usize,
    /// Byte ranges `[start, end)` of the damaged file that held no intact record: the items
    /// written there are lost.
    pub dropped: Vec<(u64, u64)>,
}

impl std::fmt::Display for LogRepair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<String> = self
            .dropped
            .iter()
            .map(|(start, end)| format!("{start}..{end}"))
            .collect();
        let bytes: u64 = self.dropped.iter().map(|(start, end)| end - start).sum();
        write!(
            f,
            "{}: dropped {bytes} damaged byte(s) at {} (the items written there are lost); \
             kept and counted {} intact record(s) with {} item(s); the damaged file is kept as {}",
            self.file.display(),
            ranges.join(", "),
            self.kept_records,
            self.kept_items,
            self.aside.display()
        )
    }
}

/// Repairs shard `only`, or every shard of the store under `root`.
pub fn repair(
    root: &Path,
    shards: u16,
    only: Option<u16>,
) -> Result<Vec<(u16, ShardRepair)>, StoreError> {
    if let Some(shard) = only.filter(|&s| s >= shards) {
        return Err(StoreError::Task(format!(
            "there is no shard {shard} (shards are 0 to {})",
            shards - 1
        )));
    }
    let mut done = Vec::new();
    for shard in 0..shards {
        if only.is_some_and(|only| only != shard) {
            continue;
        }
        let dir = root.join(format!("shard-{shard:02}"));
        if !dir.is_dir() {
            continue;
        }
        done.push((shard, repair_shard(shard, &dir)?));
    }
    Ok(done)
}

fn repair_shard(shard: u16, dir: &Path) -> Result<ShardRepair, StoreError> {
    let _lock = match datadir::lock(dir, "database") {
        Ok(lock) => lock,
        Err(DataDirError::Locked { holder, .. }) => return Ok(ShardRepair::Held(holder)),
        Err(source) => return Err(StoreError::Open { shard, source }),
    };
    let log_error = |err: recordlog::RecordLogError| StoreError::Log {
        shard,
        message: err.to_string(),
    };
    let mut repaired = Vec::new();
    for name in LOG_FILES {
        let path = dir.join(name);
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let salvage = salvage(&bytes);
        if salvage.dropped.is_empty() {
            continue;
        }
        let aside = recordlog::move_aside(&path).map_err(log_error)?;
        let mut writer = RecordWriter::open(&path, 0).map_err(log_error)?;
        let mut kept_items = 0;
        for &(start, end) in &salvage.kept {
            let payload = &bytes[start..end];
            let mut items = Vec::new();
            // Checked by `salvage`.
            let _ = decode_items(payload, &mut items);
            kept_items += items.len();
            writer.append(payload);
        }
        writer.commit(true).map_err(log_error)?;
        let report = LogRepair {
            file: path,
            aside,
            kept_records: salvage.kept.len() as u64,
            kept_items,
            dropped: salvage.dropped,
        };
        tracing::warn!(shard, "{report}");
        repaired.push(report);
    }
    if !repaired.is_empty() {
        // Count what was kept before readers are let back in, so no count is short.
        let options = super::StoreOptions {
            fsync: true,
            ..super::StoreOptions::default()
        };
        super::sqlite::open_locked(shard, dir, options)?;
    }
    // The logs pass their checks now: readers may trust the index again.
    super::sqlite::clear_damage_mark(dir);
    Ok(if repaired.is_empty() {
        ShardRepair::Clean
    } else {
        ShardRepair::Repaired(repaired)
    })
}

/// The intact records of a log file (payload ranges) and the damaged ranges between them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Salvage {
    kept: Vec<(usize, usize)>,
    dropped: Vec<(u64, u64)>,
}

/// A record at the start of `rest`: its payload's length if it is whole, its checksum
/// matches and its items decode; otherwise whether it is at least complete.
enum Record {
    Intact(usize),
    /// All its bytes are there and they are wrong: damage, never a torn write.
    Bad,
    /// Cut off by the end of the file, or an impossible length.
    Short,
}

fn record_at(rest: &[u8]) -> Record {
    if rest.len() < HEADER {
        return Record::Short;
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len == 0 || len > MAX_RECORD || rest.len() < HEADER + len {
        return Record::Short;
    }
    let payload = &rest[HEADER..HEADER + len];
    if crc32c::crc32c(payload) != crc || decode_items(payload, &mut Vec::new()).is_err() {
        return Record::Bad;
    }
    Record::Intact(len)
}

fn salvage(bytes: &[u8]) -> Salvage {
    let mut out = Salvage::default();
    if bytes.len() < MAGIC.len() {
        // A torn header: the normal open rewrites it.
        return out;
    }
    let mut at = MAGIC.len();
    if &bytes[..MAGIC.len()] != MAGIC {
        // Not a log as written: whatever intact records it holds are searched for below.
        at = 0;
    }
    let mut damaged_from: Option<usize> = (at == 0).then_some(0);
    while at < bytes.len() {
        match record_at(&bytes[at..]) {
            Record::Intact(len) => {
                if let Some(from) = damaged_from.take() {
                    out.dropped.push((from as u64, at as u64));
                }
                out.kept.push((at + HEADER, at + HEADER + len));
                at += HEADER + len;
            }
            verdict => {
                let next = (at + 1..bytes.len())
                    .find(|&next| matches!(record_at(&bytes[next..]), Record::Intact(_)));
                match (next, verdict) {
                    // The last record, cut short: a torn tail, not damage.
                    (None, Record::Short) if damaged_from.is_none() => break,
                    (None, _) => {
                        out.dropped
                            .push((damaged_from.unwrap_or(at) as u64, bytes.len() as u64));
                        damaged_from = None;
                        break;
                    }
                    (Some(next), _) => {
                        damaged_from.get_or_insert(at);
                        at = next;
                    }
                }
            }
        }
    }
    if let Some(from) = damaged_from {
        out.dropped.push((from as u64, bytes.len() as u64));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(records: &[&[(&str, &str)]]) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = MAGIC.to_vec();
        let mut starts = Vec::new();
        for items in records {
            let mut payload = Vec::new();
            for (tenant, id) in *items {
                crate::shard::encode_item(&mut payload, tenant, id);
            }
            starts.push(bytes.len());
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
            bytes.extend_from_slice(&payload);
        }
        (bytes, starts)
    }

    #[test]
    fn an_intact_log_drops_nothing() {
        let (bytes, _) = log(&[&[("t", "1")], &[("t", "2"), ("t", "3")]]);
        let found = salvage(&bytes);
        assert_eq!(found.kept.len(), 2);
        assert!(found.dropped.is_empty());
    }

    #[test]
    fn a_damaged_middle_record_is_dropped_and_the_ones_after_it_kept() {
        let (mut bytes, starts) = log(&[&[("t", "1")], &[("t", "2")], &[("t", "3")]]);
        bytes[starts[1] + HEADER + 2] ^= 0xff;
        let found = salvage(&bytes);
        assert_eq!(found.kept.len(), 2);
        assert_eq!(found.dropped, vec![(starts[1] as u64, starts[2] as u64)]);
    }

    #[test]
    fn a_complete_last_record_that_fails_its_check_is_damage() {
        let (mut bytes, starts) = log(&[&[("t", "1")], &[("t", "2")]]);
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        let found = salvage(&bytes);
        assert_eq!(found.kept.len(), 1);
        assert_eq!(found.dropped, vec![(starts[1] as u64, bytes.len() as u64)]);
    }

    #[test]
    fn a_short_last_record_is_a_torn_tail_not_damage() {
        let (mut bytes, _) = log(&[&[("t", "1")], &[("t", "2")]]);
        bytes.truncate(bytes.len() - 2);
        let found = salvage(&bytes);
        assert_eq!(found.kept.len(), 1);
        assert!(found.dropped.is_empty());
    }
}
