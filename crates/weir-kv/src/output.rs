//! `--output FILE`: one JSON line per applied write (the seed's output.json, made
//! machine-readable), each write exactly once, in the order applied.
//!
//! Every line carries its write's operation number, `op`, the same number the journal
//! gives it. The lines of a batch are written only after the batch's journal commit, so
//! after a crash the file may lag the journal but not lead it (except after a power loss
//! without `fsync`, where either file may lose its tail). On start the file is reconciled
//! with the journal:
//!
//! - a torn last line (no newline) is cut, with a warning;
//! - lines past the journal's last operation are cut (their writes were never logged; the
//!   requests are redelivered and get those numbers again);
//! - writes the journal holds past the file's last line are appended.
//!
//! So each operation number appears once, and the lines from the first onwards are
//! consecutive. The journal keeps only the writes since its last snapshot, and the file is
//! synced before every snapshot, so it never lags further than the journal reaches; a new or
//! emptied file on an existing data dir starts after the snapshot, with a warning naming the
//! missing operations. Any other line that is not ours refuses to start, naming the file and
//! the byte offset.
//!
//! With `--durability none` there is no journal: the file is only cut of a torn line, and
//! operation numbers continue from its last line, so they stay unique within the file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use crate::journal::{Write, WriteKind};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("--output {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--output {path}: the line at byte {offset} is not a kv write ({reason}); refusing to \
         append to a file that is not ours"
    )]
    Foreign {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

/// The output file, open for appending, and its lines not yet written.
pub struct Output {
    path: PathBuf,
    file: File,
    pending: Vec<u8>,
    /// The operation number of the last line in the file.
    last_op: u64,
}

/// One write as its output line, newline included.
pub fn line(write: &Write, out: &mut Vec<u8>) {
    let value = match &write.kind {
        WriteKind::Add { key, value } => serde_json::json!({
            "op": write.op, "action": "add", "key": key, "value": value, "replaced": write.outcome,
        }),
        WriteKind::Remove { key } => serde_json::json!({
            "op": write.op, "action": "remove", "key": key, "removed": write.outcome,
        }),
    };
    // Writing JSON into a Vec cannot fail: the values are plain strings, numbers and bools.
    let _ = serde_json::to_writer(&mut *out, &value);
    out.push(b'\n');
}

/// The operation number of one line (without its newline).
pub fn op_of(line: &[u8]) -> Result<u64, String> {
    #[derive(serde::Deserialize)]
    struct Numbered {
        op: u64,
    }
    serde_json::from_slice::<Numbered>(line)
        .map(|numbered| numbered.op)
        .map_err(|err| err.to_string())
}

impl Output {
    /// Opens (or creates) the file and cuts a torn last line.
    pub fn open(path: &Path) -> Result<Output, OutputError> {
        let io = |source| OutputError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let complete = match last_newline(&mut file, len).map_err(io)? {
            Some(at) => at + 1,
            None => 0,
        };
        if complete < len {
            tracing::warn!(path = %path.display(), offset = complete, bytes = len - complete, "kv --output ends in a torn line (a crash while writing it); cutting it");
            file.set_len(complete).map_err(io)?;
        }
        let mut output = Output {
            path: path.to_path_buf(),
            file,
            pending: Vec::new(),
            last_op: 0,
        };
        if let Some((offset, text)) = output.line_before(complete)? {
            output.last_op = op_of(&text).map_err(|reason| output.foreign(offset, reason))?;
        }
        Ok(output)
    }

    /// The operation number of the file's last line, 0 for an empty file.
    pub fn last_op(&self) -> u64 {
        self.last_op
    }

    /// Cuts every line past operation `through`.
    pub fn cut_after(&mut self, through: u64) -> Result<(), OutputError> {
        let mut end = self.file_len()?;
        let mut cut = 0u64;
        while let Some((offset, text)) = self.line_before(end)? {
            let op = op_of(&text).map_err(|reason| self.foreign(offset, reason))?;
            if op <= through {
                break;
            }
            end = offset;
            cut += 1;
        }
        if cut > 0 {
            tracing::warn!(path = %self.path.display(), lines = cut, through, "kv --output had lines the journal does not; cutting them");
            self.file.set_len(end).map_err(|source| self.io(source))?;
        }
        self.last_op = self.last_op.min(through);
        Ok(())
    }

    /// Queues a write's line for the next [`flush`](Self::flush).
    pub fn push(&mut self, write: &Write) {
        line(write, &mut self.pending);
        self.last_op = write.op;
    }

    /// Writes the queued lines in one call.
    pub fn flush(&mut self) -> Result<(), OutputError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all(&self.pending);
        self.pending.clear();
        result.map_err(|source| self.io(source))
    }

    /// Waits for the disk: the journal is about to forget writes that only this file and
    /// the snapshot will hold.
    pub fn sync(&mut self) -> Result<(), OutputError> {
        self.flush()?;
        self.file.sync_data().map_err(|source| self.io(source))
    }

    fn file_len(&self) -> Result<u64, OutputError> {
        Ok(self
            .file
            .metadata()
            .map_err(|source| self.io(source))?
            .len())
    }

    /// The complete line ending just before byte `end` (which follows a newline), with its
    /// offset, or None at the start of the file.
    fn line_before(&mut self, end: u64) -> Result<Option<(u64, Vec<u8>)>, OutputError> {
        if end == 0 {
            return Ok(None);
        }
        let start = match last_newline(&mut self.file, end - 1).map_err(|s| self.io(s))? {
            Some(at) => at + 1,
            None => 0,
        };
        let mut text = vec![0; (end - 1 - start) as usize];
        self.file
            .seek(SeekFrom::Start(start))
            .and_then(|_| self.file.read_exact(&mut text))
            .map_err(|source| self.io(source))?;
        Ok(Some((start, text)))
    }

    fn io(&self, source: std::io::Error) -> OutputError {
        OutputError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn foreign(&self, offset: u64, reason: String) -> OutputError {
        OutputError::Foreign {
            path: self.path.clone(),
            offset,
            reason,
        }
    }
}

/// The offset of the last newline before byte `end`, reading backwards in blocks (lines
/// can be long, files longer: neither is read whole).
fn last_newline(file: &mut File, end: u64) -> std::io::Result<Option<u64>> {
    const BLOCK: u64 = 64 * 1024;
    let mut block = vec![0u8; BLOCK as usize];
    let mut to = end;
    while to > 0 {
        let from = to.saturating_sub(BLOCK);
        let chunk = &mut block[..(to - from) as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(chunk)?;
        if let Some(at) = chunk.iter().rposition(|&byte| byte == b'\n') {
            return Ok(Some(from + at as u64));
        }
        to = from;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(op: u64, key: &str) -> Write {
        Write {
            op,
            identity: 0,
            outcome: false,
            kind: WriteKind::Add {
                key: key.into(),
                value: "v".into(),
            },
        }
    }

    fn ops(path: &Path) -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| op_of(line.as_bytes()).unwrap())
            .collect()
    }

    #[test]
    fn lines_carry_their_operation_number() {
        let mut out = Vec::new();
        line(&add(7, "A"), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with('\n'));
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"op": 7, "action": "add", "key": "A", "value": "v", "replaced": false})
        );
    }

    #[test]
    fn a_torn_line_is_cut_and_the_last_op_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut output = Output::open(&path).unwrap();
        assert_eq!(output.last_op(), 0);
        for op in 1..=3 {
            output.push(&add(op, "A"));
        }
        output.flush().unwrap();
        drop(output);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"op":4,"act"#).unwrap();
        let output = Output::open(&path).unwrap();
        assert_eq!(output.last_op(), 3);
        assert_eq!(ops(&path), [1, 2, 3]);
    }

    #[test]
    fn lines_past_the_journal_are_cut_across_block_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut output = Output::open(&path).unwrap();
        // Long lines, so the backward reads cross blocks.
        for op in 1..=20 {
            output.push(&add(op, &"k".repeat(10_000 + op as usize)));
        }
        output.flush().unwrap();
        output.cut_after(12).unwrap();
        assert_eq!(output.last_op(), 12);
        output.push(&add(13, "B"));
        output.flush().unwrap();
        assert_eq!(ops(&path), (1..=13).collect::<Vec<_>>());
        assert_eq!(Output::open(&path).unwrap().last_op(), 13);
    }

    #[test]
    fn a_file_that_is_not_ours_is_refused_with_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "{\"op\":1}\nsome log line\n").unwrap();
        let err = Output::open(&path).err().expect("refused");
        assert!(err.to_string().contains("at byte 9"), "{err}");
    }
}
