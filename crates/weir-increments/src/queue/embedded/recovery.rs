//! What `open` does with the segments it finds: check every record, cut a torn tail, and
//! refuse (or, with `repair`, move aside) a segment damaged before its end.
//!
//! A crash mid-write leaves at most the end of the last segment incomplete; after a power
//! loss the file may also end in zeros (its size reached the disk before its data). Both
//! are a torn tail: those records never got their 202, so cutting them loses nothing.
//! Anything else that fails the check (a bad record followed by good ones, garbage in
//! complete records, a bad record in an earlier segment) is damage to acknowledged
//! increments, which the service must never drop on its own.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::{decode, list_segments, now_ms, QueueError, RECORD};

/// Records checked per read while scanning (1.25 MiB): the scan never holds a segment.
const SCAN_CHUNK: usize = 32_768;

/// What the records of one segment look like, from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct SegmentScan {
    pub len: u64,
    /// Records before the first one that fails the check.
    pub valid_prefix: u64,
    /// Records after the first failure that pass the check.
    pub valid_after: u64,
    /// Complete records from the first failure on that fail the check and are not zeros.
    pub garbage_after: u64,
}

impl SegmentScan {
    /// Byte offset of the first record that fails the check.
    pub fn damage_offset(&self) -> u64 {
        self.valid_prefix * RECORD as u64
    }

    pub fn lost_bytes(&self) -> u64 {
        self.len - self.damage_offset()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Intact,
    TornTail,
    Damaged,
}

/// Pure: a torn tail is only ever at the end of the last segment, with nothing valid and
/// nothing but zeros (or one partial record) after the cut.
pub(super) fn classify(scan: &SegmentScan, is_last: bool) -> Verdict {
    if scan.damage_offset() == scan.len {
        Verdict::Intact
    } else if is_last && scan.valid_after == 0 && scan.garbage_after == 0 {
        Verdict::TornTail
    } else {
        Verdict::Damaged
    }
}

/// What the log holds once checked: where the writer continues and how much is unflushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Recovered {
    pub next_seq: u64,
    /// Records above the watermark, i.e. accepted and not yet in the store.
    pub pending: u64,
    pub last: Option<(u64, PathBuf)>,
}

/// Checks every segment in `dir` (streaming, whatever its size). Refuses to go on past a
/// damaged segment unless `repair`.
pub(super) fn recover(dir: &Path, watermark: u64, repair: bool) -> Result<Recovered, QueueError> {
    let segments = list_segments(dir)?;
    let mut recovered = Recovered {
        next_seq: watermark + 1,
        pending: 0,
        last: None,
    };
    let final_index = segments.len().saturating_sub(1);
    for (index, (base, path)) in segments.iter().enumerate() {
        let scan = scan_segment(path, *base)?;
        match classify(&scan, index == final_index) {
            Verdict::Intact => {}
            Verdict::TornTail => cut_tail(path, &scan)?,
            Verdict::Damaged if repair => move_aside(path, *base, &scan)?,
            Verdict::Damaged => return Err(damaged(path, &scan)),
        }
        warn_of_a_gap(
            recovered.last.as_ref(),
            recovered.next_seq,
            *base,
            watermark,
        );
        let end = base + scan.valid_prefix;
        recovered.pending += end.saturating_sub((*base).max(watermark + 1));
        recovered.next_seq = recovered.next_seq.max(end);
        recovered.last = Some((*base, path.clone()));
    }
    Ok(recovered)
}

/// Sequence numbers above the watermark that no segment holds were acknowledged and are
/// gone (a segment deleted by hand, or cut short by an earlier repair): say so loudly.
fn warn_of_a_gap(previous: Option<&(u64, PathBuf)>, end: u64, base: u64, watermark: u64) {
    let first_missing = end.max(watermark + 1);
    if let (Some((_, previous)), true) = (previous, first_missing < base) {
        tracing::warn!(
            after = %previous.display(),
            first_missing,
            last_missing = base - 1,
            "records above the committed watermark are missing between two log segments"
        );
    }
}

pub(super) fn scan_segment(path: &Path, base: u64) -> Result<SegmentScan, QueueError> {
    let io = |err| QueueError::io(path, err);
    let mut file = File::open(path).map_err(io)?;
    let mut scan = SegmentScan {
        len: file.metadata().map_err(io)?.len(),
        ..SegmentScan::default()
    };
    let mut failed = false;
    let mut buf = vec![0u8; SCAN_CHUNK * RECORD];
    let mut seq = base;
    loop {
        let filled = read_full(&mut file, &mut buf).map_err(io)?;
        for record in buf[..filled].chunks_exact(RECORD) {
            let valid = decode(record, seq).is_some();
            match (failed, valid) {
                (false, true) => scan.valid_prefix += 1,
                (true, true) => scan.valid_after += 1,
                (_, false) => {
                    failed = true;
                    if record.iter().any(|byte| *byte != 0) {
                        scan.garbage_after += 1;
                    }
                }
            }
            seq += 1;
        }
        if filled < buf.len() {
            return Ok(scan);
        }
    }
}

/// Fills `buf` unless the file ends first; returns how much it filled.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

fn cut_tail(path: &Path, scan: &SegmentScan) -> Result<(), QueueError> {
    tracing::warn!(
        segment = %path.display(),
        offset = scan.damage_offset(),
        bytes = scan.lost_bytes(),
        records_kept = scan.valid_prefix,
        "cutting a torn tail off the embedded log (an interrupted write, never acknowledged)"
    );
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|file| {
            file.set_len(scan.damage_offset())?;
            file.sync_all()
        })
        .map_err(|err| QueueError::io(path, err))
}

fn damaged(path: &Path, scan: &SegmentScan) -> QueueError {
    QueueError::Damaged {
        path: path.display().to_string(),
        offset: scan.damage_offset(),
        detail: format!(
            "{} valid records before it, {} valid records after it; refusing to start so that \
             no acknowledged increment is dropped silently. Keep a copy of the log directory, \
             then start with --repair to move this segment aside and keep the records before \
             the damage",
            scan.valid_prefix, scan.valid_after
        ),
    }
}

/// Renames the damaged segment to `<name>.damaged-<ms>` (kept, never deleted) and puts a
/// copy of its valid prefix in its place.
fn move_aside(path: &Path, base: u64, scan: &SegmentScan) -> Result<(), QueueError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".damaged-{}", now_ms()));
    let aside = path.with_file_name(name);
    std::fs::rename(path, &aside).map_err(|err| QueueError::io(path, err))?;
    copy_prefix(&aside, path, scan.damage_offset())?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|err| QueueError::io(dir, err))?;
    let first_lost = base + scan.valid_prefix;
    tracing::warn!(
        segment = %path.display(),
        moved_to = %aside.display(),
        offset = scan.damage_offset(),
        records_kept = scan.valid_prefix,
        bytes_lost = scan.lost_bytes(),
        records_lost = scan.lost_bytes().div_ceil(RECORD as u64),
        valid_records_lost = scan.valid_after,
        first_lost_seq = first_lost,
        "REPAIRED a damaged embedded log segment: the records from the damage to the end of \
         the segment are NOT replayed; the original file is kept for inspection"
    );
    Ok(())
}

fn copy_prefix(from: &Path, to: &Path, bytes: u64) -> Result<(), QueueError> {
    let mut source = File::open(from).map_err(|err| QueueError::io(from, err))?;
    let mut target = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(to)
        .map_err(|err| QueueError::io(to, err))?;
    std::io::copy(&mut (&mut source).take(bytes), &mut target)
        .and_then(|_| target.flush())
        .and_then(|()| target.sync_all())
        .map_err(|err| QueueError::io(to, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(len: u64, valid_prefix: u64, valid_after: u64, garbage_after: u64) -> SegmentScan {
        SegmentScan {
            len,
            valid_prefix,
            valid_after,
            garbage_after,
        }
    }

    #[test]
    fn only_an_incomplete_or_zeroed_end_of_the_last_segment_is_a_torn_tail() {
        let r = RECORD as u64;
        assert_eq!(classify(&scan(10 * r, 10, 0, 0), true), Verdict::Intact);
        assert_eq!(
            classify(&scan(10 * r + 7, 10, 0, 0), true),
            Verdict::TornTail
        );
        assert_eq!(
            classify(&scan(12 * r, 10, 0, 0), true),
            Verdict::TornTail,
            "zeros"
        );
        assert_eq!(
            classify(&scan(10 * r + 7, 10, 0, 0), false),
            Verdict::Damaged
        );
        assert_eq!(classify(&scan(12 * r, 10, 1, 1), true), Verdict::Damaged);
        assert_eq!(
            classify(&scan(11 * r, 10, 0, 1), true),
            Verdict::Damaged,
            "garbage"
        );
    }
}
