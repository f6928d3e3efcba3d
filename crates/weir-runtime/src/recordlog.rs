//! Append-only record files that tell a torn tail from damage.
//!
//! A file starts with an 8-byte magic naming the format, then records of
//! `[payload length: u32 LE][crc32c of payload: u32 LE][payload]`. A crash (or a power loss
//! with writes still in the page cache) can leave the last record short (its header or payload
//! cut off by the end of the file) or the file's tail unwritten (zeros), and that is expected:
//! the tail is cut, loudly. A complete record whose checksum fails is never a torn tail, even
//! when it is the last one: a `write` either reached the file or did not, so a whole record
//! with wrong bytes was changed after it was written. That, and any failed record with intact
//! records after it, is damage, and the data behind it was acknowledged: reading refuses with
//! the file and byte offset, and only an explicit repair moves the file aside (never deletes
//! it) to keep what came before the damage.
//!
//! Zero-length payloads are not allowed, so a run of zero bytes (an unwritten tail) is never
//! mistaken for records.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"WEIRLOG1";
const HEADER: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum RecordLogError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a Weir record file (it does not start with {MAGIC:?})")]
    Format { path: PathBuf },
    #[error(
        "{path}: damaged record at byte {offset} ({reason}); refusing it rather than drop \
         acknowledged data"
    )]
    Damaged {
        path: PathBuf,
        offset: u64,
        reason: &'static str,
    },
    #[error("{path}: record at byte {offset} was refused by its reader: {reason}")]
    Rejected {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

impl RecordLogError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        RecordLogError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What reading a file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    pub records: u64,
    /// Where the intact records end: the length to keep.
    pub valid_len: u64,
    /// Bytes after them that belong to an incomplete last record or an unwritten tail.
    pub torn_bytes: u64,
}

/// Reads every intact record of `path` in order, handing each payload to `each` (which may
/// refuse it with a reason). Never changes the file. A payload longer than `max_record` is
/// treated as a failed check, like a wrong CRC.
pub fn scan<F>(path: &Path, max_record: usize, mut each: F) -> Result<Scan, RecordLogError>
where
    F: FnMut(&[u8]) -> Result<(), String>,
{
    let file = File::open(path).map_err(|err| RecordLogError::io(path, err))?;
    let file_len = file
        .metadata()
        .map_err(|err| RecordLogError::io(path, err))?
        .len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    match reader.read_exact(&mut magic) {
        Ok(()) if &magic == MAGIC => {}
        // A crash between creating the file and writing its magic leaves a torn header.
        Err(err) if err.kind() == ErrorKind::UnexpectedEof => {
            return Ok(Scan {
                records: 0,
                valid_len: 0,
                torn_bytes: file_len,
            })
        }
        Err(err) => return Err(RecordLogError::io(path, err)),
        Ok(()) => {
            return Err(RecordLogError::Format {
                path: path.to_path_buf(),
            })
        }
    }
    let mut offset = MAGIC.len() as u64;
    let mut records = 0;
    let mut payload = Vec::new();
    loop {
        match next_record(&mut reader, &mut payload, max_record) {
            Ok(Some(())) => {}
            Ok(None) => break,
            Err(Bad::Io(err)) => return Err(RecordLogError::io(path, err)),
            Err(Bad::Check(reason)) => {
                if reason == CHECKSUM_MISMATCH || intact_record_after(path, offset + 1, max_record)?
                {
                    return Err(RecordLogError::Damaged {
                        path: path.to_path_buf(),
                        offset,
                        reason,
                    });
                }
                break;
            }
        }
        each(&payload).map_err(|reason| RecordLogError::Rejected {
            path: path.to_path_buf(),
            offset,
            reason,
        })?;
        offset += (HEADER + payload.len()) as u64;
        records += 1;
    }
    Ok(Scan {
        records,
        valid_len: offset,
        torn_bytes: file_len - offset,
    })
}

enum Bad {
    Io(std::io::Error),
    Check(&'static str),
}

/// The one failed check that a crash cannot cause: the record is all there.
const CHECKSUM_MISMATCH: &str = "checksum mismatch on a complete record";

/// `Ok(None)` at a clean end of file.
fn next_record(
    reader: &mut impl Read,
    payload: &mut Vec<u8>,
    max_record: usize,
) -> Result<Option<()>, Bad> {
    let mut header = [0u8; HEADER];
    match read_full(reader, &mut header).map_err(Bad::Io)? {
        0 => return Ok(None),
        HEADER => {}
        _ => return Err(Bad::Check("incomplete header")),
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > max_record {
        return Err(Bad::Check("impossible length"));
    }
    payload.resize(len, 0);
    if read_full(reader, payload).map_err(Bad::Io)? < len {
        return Err(Bad::Check("incomplete payload"));
    }
    if crc32c::crc32c(payload) != crc {
        return Err(Bad::Check(CHECKSUM_MISMATCH));
    }
    Ok(Some(()))
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

/// Whether any intact record starts at or after `from`: if one does, the failed record was
/// not the end of what was written, so it is damage and not a torn tail. Only runs after a
/// failed check, and a torn tail is shorter than one record, so the search is short either
/// way (damage is followed by an intact record within one record's length).
fn intact_record_after(path: &Path, from: u64, max_record: usize) -> Result<bool, RecordLogError> {
    let mut file = File::open(path).map_err(|err| RecordLogError::io(path, err))?;
    file.seek(SeekFrom::Start(from))
        .map_err(|err| RecordLogError::io(path, err))?;
    let mut rest = Vec::new();
    file.read_to_end(&mut rest)
        .map_err(|err| RecordLogError::io(path, err))?;
    Ok((0..rest.len()).any(|at| {
        let mut payload = Vec::new();
        matches!(
            next_record(&mut &rest[at..], &mut payload, max_record),
            Ok(Some(()))
        )
    }))
}

/// Cuts `path` to `valid_len` after a scan found a torn tail, saying so at WARN: a cut is
/// never silent.
pub fn cut_torn_tail(path: &Path, scan: &Scan) -> Result<(), RecordLogError> {
    if scan.torn_bytes == 0 {
        return Ok(());
    }
    tracing::warn!(
        path = %path.display(),
        bytes = scan.torn_bytes,
        kept_records = scan.records,
        "cutting an incomplete record at the end of the file (a crash mid-write)"
    );
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|err| RecordLogError::io(path, err))?;
    file.set_len(scan.valid_len)
        .and_then(|()| file.sync_all())
        .map_err(|err| RecordLogError::io(path, err))
}

/// Moves a damaged file aside as `<name>.damaged-<unix seconds>` (kept for inspection) and
/// returns the new path.
pub fn move_aside(path: &Path) -> Result<PathBuf, RecordLogError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".damaged-{stamp}"));
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside).map_err(|err| RecordLogError::io(path, err))?;
    tracing::warn!(
        from = %path.display(),
        to = %aside.display(),
        "moved a damaged file aside; what it held after the damage is not loaded"
    );
    Ok(aside)
}

/// Appends records to one file. Records are framed in memory by [`append`](Self::append) and
/// reach the file in one write per [`commit`](Self::commit), so a group of records costs one
/// system call (and one sync, when asked).
pub struct RecordWriter {
    path: PathBuf,
    file: File,
    pending: Vec<u8>,
    len: u64,
}

impl RecordWriter {
    /// Opens `path` for appending after `valid_len` bytes (from a [`scan`]), or creates it
    /// with its magic when it does not exist.
    pub fn open(path: &Path, valid_len: u64) -> Result<Self, RecordLogError> {
        let io = |err| RecordLogError::io(path, err);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut len = valid_len;
        if len < MAGIC.len() as u64 {
            file.set_len(0).map_err(io)?;
            file.write_all(MAGIC).map_err(io)?;
            len = MAGIC.len() as u64;
        }
        file.seek(SeekFrom::Start(len)).map_err(io)?;
        Ok(RecordWriter {
            path: path.to_path_buf(),
            file,
            pending: Vec::new(),
            len,
        })
    }

    /// Frames one record (non-empty) for the next commit.
    pub fn append(&mut self, payload: &[u8]) {
        debug_assert!(!payload.is_empty(), "zero-length records are not allowed");
        self.pending
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.pending
            .extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        self.pending.extend_from_slice(payload);
    }

    /// Writes what was appended; with `sync`, also waits for the disk. After a write error
    /// the file is cut back to its last commit, so a retry never leaves half a group behind.
    pub fn commit(&mut self, sync: bool) -> Result<(), RecordLogError> {
        if !self.pending.is_empty() {
            if let Err(err) = self.file.write_all(&self.pending) {
                let _ = self.file.set_len(self.len);
                let _ = self.file.seek(SeekFrom::Start(self.len));
                return Err(RecordLogError::io(&self.path, err));
            }
            self.len += self.pending.len() as u64;
            self.pending.clear();
        }
        if sync {
            self.file
                .sync_data()
                .map_err(|err| RecordLogError::io(&self.path, err))?;
        }
        Ok(())
    }

    /// Bytes in the file, as of the last commit.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len <= MAGIC.len() as u64
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 16;

    fn write(path: &Path, payloads: &[&[u8]]) {
        let mut writer = RecordWriter::open(path, 0).unwrap();
        for payload in payloads {
            writer.append(payload);
        }
        writer.commit(true).unwrap();
    }

    fn read(path: &Path) -> Result<(Vec<Vec<u8>>, Scan), RecordLogError> {
        let mut seen = Vec::new();
        let scan = scan(path, MAX, |payload| {
            seen.push(payload.to_vec());
            Ok(())
        })?;
        Ok((seen, scan))
    }

    fn records(count: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| format!("record number {i:04}").into_bytes())
            .collect()
    }

    fn write_records(path: &Path, count: usize) -> Vec<Vec<u8>> {
        let all = records(count);
        write(path, &all.iter().map(Vec::as_slice).collect::<Vec<_>>());
        all
    }

    #[test]
    fn what_is_written_is_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let all = write_records(&path, 100);
        let (seen, scan) = read(&path).unwrap();
        assert_eq!(seen, all);
        assert_eq!(scan.records, 100);
        assert_eq!(scan.torn_bytes, 0);
        assert_eq!(scan.valid_len, std::fs::metadata(&path).unwrap().len());
    }

    #[test]
    fn an_incomplete_last_record_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let all = write_records(&path, 10);
        let full = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(full - 5).unwrap();
        let (seen, scan) = read(&path).unwrap();
        assert_eq!(seen, all[..9]);
        assert_eq!(scan.torn_bytes, (HEADER + all[9].len() - 5) as u64);
        cut_torn_tail(&path, &scan).unwrap();
        let (again, clean) = read(&path).unwrap();
        assert_eq!(again, all[..9]);
        assert_eq!(clean.torn_bytes, 0);
    }

    #[test]
    fn an_unwritten_zero_tail_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let all = write_records(&path, 3);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[0u8; 4096]).unwrap();
        let (seen, scan) = read(&path).unwrap();
        assert_eq!(seen, all);
        assert_eq!(scan.torn_bytes, 4096);
    }

    #[test]
    fn a_flipped_byte_before_intact_records_is_damage_named_with_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let all = write_records(&path, 1000);
        let record_len = (HEADER + all[0].len()) as u64;
        // A byte in the payload of record 500, then one in the length of record 700.
        for (record, within) in [(500u64, HEADER as u64 + 3), (700, 1)] {
            let mut bytes = std::fs::read(&path).unwrap();
            let at = MAGIC.len() as u64 + record * record_len;
            bytes[(at + within) as usize] ^= 0x40;
            let damaged = dir.path().join(format!("damaged-{record}"));
            std::fs::write(&damaged, &bytes).unwrap();
            let before = std::fs::metadata(&damaged).unwrap().len();
            match read(&damaged) {
                Err(RecordLogError::Damaged { offset, path, .. }) => {
                    assert_eq!(offset, at);
                    assert_eq!(path, damaged);
                }
                other => panic!("record {record}: expected damage, got {other:?}"),
            }
            assert_eq!(
                std::fs::metadata(&damaged).unwrap().len(),
                before,
                "file untouched"
            );
        }
    }

    #[test]
    fn a_flipped_byte_in_the_complete_last_record_is_damage_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let all = write_records(&path, 3);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - all[2].len() - HEADER;
        let end = bytes.len();
        bytes[end - 2] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        match read(&path) {
            Err(RecordLogError::Damaged { offset, reason, .. }) => {
                assert_eq!(offset, last as u64);
                assert_eq!(reason, CHECKSUM_MISMATCH);
            }
            other => panic!("expected damage, got {other:?}"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "file untouched");
    }

    #[test]
    fn a_damaged_file_is_moved_aside_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        write_records(&path, 2);
        let aside = move_aside(&path).unwrap();
        assert!(!path.exists());
        assert!(aside.exists());
        assert!(aside.to_string_lossy().contains(".damaged-"));
    }

    #[test]
    fn another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, b"something else entirely").unwrap();
        assert!(matches!(read(&path), Err(RecordLogError::Format { .. })));
    }

    #[test]
    fn appending_after_a_scan_continues_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        write(&path, &[b"one", b"two"]);
        let (_, scan) = read(&path).unwrap();
        let mut writer = RecordWriter::open(&path, scan.valid_len).unwrap();
        writer.append(b"three");
        writer.commit(false).unwrap();
        let (seen, _) = read(&path).unwrap();
        assert_eq!(seen, [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
    }

    #[test]
    fn a_reader_can_refuse_a_record_and_is_told_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        write(&path, &[b"good", b"bad"]);
        let err = scan(&path, MAX, |payload| {
            if payload == b"bad" {
                Err("not a known operation".into())
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(
            matches!(err, RecordLogError::Rejected { offset, .. } if offset == 8 + 12),
            "{err}"
        );
    }
}
