//! Reading committed records back from the segments, a bounded chunk at a time: the log
//! itself is the queue, so a backlog waits on disk, not in memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{decode, list_segments, QueueError, RECORD};
use crate::aggregate::Item;

/// The segment being read, kept open between reads.
#[derive(Debug)]
struct OpenSegment {
    base: u64,
    path: PathBuf,
    file: File,
    /// Base of the following segment, if there was one when this one was opened.
    next_base: Option<u64>,
}

impl OpenSegment {
    fn covers(&self, seq: u64) -> bool {
        self.base <= seq && self.next_base.is_none_or(|next| seq < next)
    }
}

/// Where the next read starts. Cheap to rebuild from `next_seq` alone, which is why a
/// cancelled read loses nothing but an open file handle.
#[derive(Debug)]
pub(super) struct ReadCursor {
    dir: PathBuf,
    pub next_seq: u64,
    segment: Option<OpenSegment>,
}

impl ReadCursor {
    pub fn new(dir: &Path, next_seq: u64) -> Self {
        ReadCursor {
            dir: dir.to_path_buf(),
            next_seq,
            segment: None,
        }
    }

    /// A cursor at the same position without the open file (what is left if a read is lost).
    pub fn fresh_copy(&self) -> Self {
        ReadCursor::new(&self.dir, self.next_seq)
    }

    /// Reads at most `max` records, in sequence order, up to `upto` (committed) inclusive.
    /// Sequence numbers missing from the log (a segment cut short by `--repair`) are
    /// skipped; they were reported when the repair moved them aside.
    pub fn read(&mut self, upto: u64, max: usize) -> Result<Vec<Item>, QueueError> {
        let mut items = Vec::new();
        match self.fill(upto, max, &mut items) {
            Ok(()) => {}
            // Deliver what was read before the failure; the cursor stops at the record that
            // failed, so the next read reports it again.
            Err(_) if !items.is_empty() => return Ok(items),
            Err(err) => return Err(err),
        }
        if items.is_empty() && max > 0 && self.next_seq <= upto {
            // Committed but on no segment: without this error the worker would spin.
            return Err(QueueError::Missing {
                dir: self.dir.display().to_string(),
                seq: self.next_seq,
            });
        }
        Ok(items)
    }

    fn fill(&mut self, upto: u64, max: usize, items: &mut Vec<Item>) -> Result<(), QueueError> {
        let mut relisted_without_progress = false;
        while self.next_seq <= upto && items.len() < max {
            let positioned = self
                .segment
                .as_ref()
                .is_some_and(|s| s.covers(self.next_seq));
            if !positioned && !self.locate()? {
                break;
            }
            if self.next_seq > upto {
                break;
            }
            let want = (upto - self.next_seq + 1).min((max - items.len()) as u64);
            let before = items.len();
            let segment_done = self.read_segment(want, items)?;
            if items.len() > before {
                relisted_without_progress = false;
            } else if segment_done {
                // The writer may have started a segment since this one was opened.
                if relisted_without_progress {
                    break;
                }
                relisted_without_progress = true;
                self.segment = None;
            }
        }
        Ok(())
    }

    /// Opens the segment holding `next_seq` (or the first one after it, skipping a gap).
    /// False if the log holds nothing at or after `next_seq`.
    fn locate(&mut self) -> Result<bool, QueueError> {
        self.segment = None;
        let segments = list_segments(&self.dir)?;
        let at = segments.partition_point(|(base, _)| *base <= self.next_seq);
        let index = if at > 0 { at - 1 } else { 0 };
        let Some((base, path)) = segments.get(index) else {
            return Ok(false);
        };
        let next_base = segments.get(index + 1).map(|(base, _)| *base);
        if *base > self.next_seq {
            self.next_seq = *base;
        }
        let file = File::open(path).map_err(|err| QueueError::io(path, err))?;
        self.segment = Some(OpenSegment {
            base: *base,
            path: path.clone(),
            file,
            next_base,
        });
        Ok(true)
    }

    /// Appends up to `want` records of the open segment to `items`. True if the segment
    /// holds nothing more at `next_seq` right now.
    fn read_segment(&mut self, want: u64, items: &mut Vec<Item>) -> Result<bool, QueueError> {
        let Some(segment) = self.segment.as_mut() else {
            return Ok(true);
        };
        let io = |err| QueueError::io(&segment.path, err);
        let position = self.next_seq - segment.base;
        let records = segment.file.metadata().map_err(io)?.len() / RECORD as u64;
        let count = records.saturating_sub(position).min(want);
        if count == 0 {
            if let Some(next) = segment.next_base {
                self.next_seq = self.next_seq.max(next);
                self.segment = None;
                return Ok(false);
            }
            return Ok(true);
        }
        let offset = position * RECORD as u64;
        let mut buf = vec![0u8; count as usize * RECORD];
        segment
            .file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| segment.file.read_exact(&mut buf))
            .map_err(|err| QueueError::io(&segment.path, err))?;
        items.reserve(count as usize);
        for (n, record) in buf.chunks_exact(RECORD).enumerate() {
            match decode(record, self.next_seq) {
                Some(item) => items.push(item),
                None => {
                    return Err(QueueError::Damaged {
                        path: segment.path.display().to_string(),
                        offset: offset + (n * RECORD) as u64,
                        detail: "a record written whole no longer passes its check".to_string(),
                    })
                }
            }
            self.next_seq += 1;
        }
        Ok(false)
    }
}
