//! The state file: the next expected sequence number and the follow graph, so that a
//! restarted relay continues the stream where it stopped instead of waiting for sequence 1.
//!
//! Written whole to a temporary file and renamed over the old one, so a crash mid-write
//! leaves the previous state, never a torn one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::graph::FollowGraph;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the state file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the state file {path} is not valid: {source}")]
    Corrupt {
        path: String,
        source: serde_json::Error,
    },
    #[error(
        "the state file {path} has version {version}; this relay reads version {FORMAT_VERSION}"
    )]
    Version { path: String, version: u32 },
    #[error("cannot write the state file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot lock the state file {path}: {source}")]
    Lock {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the state file {path} is in use by another relay ({holder}); \
         a state file belongs to one process at a time"
    )]
    Locked { path: String, holder: String },
    #[error("the state file {path} is not valid: nextSequence must be at least 1")]
    ZeroSequence { path: String },
}

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamState {
    pub version: u32,
    pub next_sequence: u64,
    /// `(follower, followed)` pairs.
    pub follows: Vec<(u64, u64)>,
}

impl StreamState {
    /// The stream as it is now. The edges are not sorted here: [`save`] sorts them, off the
    /// task that routes events.
    pub fn capture(next_sequence: u64, graph: &FollowGraph) -> Self {
        StreamState {
            version: FORMAT_VERSION,
            next_sequence,
            follows: graph.unsorted_edges(),
        }
    }

    pub fn graph(&self) -> FollowGraph {
        FollowGraph::from_edges(self.follows.iter().copied())
    }
}

/// The saved state, or `None` when there is no file yet (a first start).
pub fn load(path: &Path) -> Result<Option<StreamState>, StateError> {
    let display = || path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Read {
                path: display(),
                source,
            })
        }
    };
    let state: StreamState =
        serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
            path: display(),
            source,
        })?;
    if state.version != FORMAT_VERSION {
        return Err(StateError::Version {
            path: display(),
            version: state.version,
        });
    }
    if state.next_sequence == 0 {
        return Err(StateError::ZeroSequence { path: display() });
    }
    Ok(Some(state))
}

/// Held while this process owns the state file; dropping it releases the lock.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Locks `<state file>.lock` for this process. Two relays on one state file would each
/// overwrite the other's position, so the second is refused and told who holds it. `flock`
/// dies with its process, `kill -9` included, so a lock is never stale.
pub fn lock(path: &Path) -> Result<StateLock, StateError> {
    let fail = |source| StateError::Lock {
        path: path.display().to_string(),
        source,
    };
    match weir_runtime::datadir::lock_file(&lock_path(path)).map_err(fail)? {
        Ok(file) => Ok(StateLock { _file: file }),
        Err(holder) => Err(StateError::Locked {
            path: path.display().to_string(),
            holder,
        }),
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

/// Writes `state` whole (edges sorted, so the file is stable) and makes it durable.
pub fn save(path: &Path, mut state: StreamState) -> Result<(), StateError> {
    state.follows.sort_unstable();
    let fail = |source| StateError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let bytes = serde_json::to_vec(&state).map_err(|err| fail(std::io::Error::other(err)))?;
    let mut file = std::fs::File::create(&tmp).map_err(fail)?;
    file.write_all(&bytes).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(fail)?;
    // The rename itself must reach the disk, or a power cut could bring back the old file.
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _best_effort = dir.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_a_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.state");
        assert_eq!(load(&path).unwrap(), None, "no file yet is a first start");
        let graph = FollowGraph::from_edges([(1, 2), (3, 2), (2, 1)]);
        let state = StreamState::capture(42, &graph);
        save(&path, state.clone()).unwrap();
        let loaded = load(&path).unwrap().unwrap();
        assert_eq!(loaded.follows, graph.to_edges(), "sorted on the way out");
        assert_eq!(loaded.graph(), graph);
        save(&path, StreamState::capture(43, &FollowGraph::new())).unwrap();
        assert_eq!(
            load(&path).unwrap().unwrap().next_sequence,
            43,
            "rewrites replace"
        );
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.state");
        std::fs::write(&path, b"{\"version\": 1, \"nextSeq").unwrap();
        assert!(matches!(load(&path), Err(StateError::Corrupt { .. })));
        std::fs::write(
            &path,
            br#"{"version": 9, "nextSequence": 1, "follows": []}"#,
        )
        .unwrap();
        assert!(matches!(
            load(&path),
            Err(StateError::Version { version: 9, .. })
        ));
    }

    #[test]
    fn a_second_owner_of_a_state_file_is_refused_and_told_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.state");
        let first = lock(&path).unwrap();
        // flock belongs to an open file, so a second open in this process contends just as
        // another process would.
        let err = lock(&path).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, StateError::Locked { .. }), "{message}");
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(first);
        lock(&path).expect("released with its owner");
    }

    #[test]
    fn a_zero_next_sequence_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.state");
        std::fs::write(
            &path,
            br#"{"version": 1, "nextSequence": 0, "follows": []}"#,
        )
        .unwrap();
        assert!(matches!(load(&path), Err(StateError::ZeroSequence { .. })));
    }
}
