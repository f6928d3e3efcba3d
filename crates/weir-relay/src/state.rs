//! The state file: the next expected sequence number and the follow graph, so that a
//! restarted relay continues the stream where it stopped instead of waiting for sequence 1.
//!
//! Written whole to a temporary file and renamed over the old one, so a crash mid-write
//! leaves the previous state, never a torn one.

use std::io::Write;
use std::path::Path;

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
    pub fn capture(next_sequence: u64, graph: &FollowGraph) -> Self {
        StreamState {
            version: FORMAT_VERSION,
            next_sequence,
            follows: graph.to_edges(),
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
    Ok(Some(state))
}

pub fn save(path: &Path, state: &StreamState) -> Result<(), StateError> {
    let fail = |source| StateError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let bytes = serde_json::to_vec(state).map_err(|err| fail(std::io::Error::other(err)))?;
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
        save(&path, &state).unwrap();
        let loaded = load(&path).unwrap().unwrap();
        assert_eq!(loaded, state);
        assert_eq!(loaded.graph(), graph);
        save(&path, &StreamState::capture(43, &FollowGraph::new())).unwrap();
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
}
