//! The state file: the next expected sequence number and the follow graph, so that a
//! restarted relay continues the stream where it stopped instead of waiting for sequence 1.
//!
//! Written whole to a temporary file and renamed over the old one, so a crash mid-write
//! leaves the previous state, never a torn one.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::MAX_SEQUENCE;
use crate::graph::FollowGraph;

/// Each message names the file and says what is wrong in full. The underlying error is in
/// the message and deliberately not also a `source()`: `anyhow`'s `{:#}` prints the chain, and
/// would print it twice ("X: X").
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the state file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("the state file {path} is not valid: {error}")]
    Corrupt {
        path: String,
        error: serde_json::Error,
    },
    #[error(
        "the state file {path} has version {version}; this relay reads version {FORMAT_VERSION}"
    )]
    Version { path: String, version: u32 },
    #[error("cannot write the state file {path}: {error}")]
    Write { path: String, error: std::io::Error },
    #[error("cannot lock the state file {path}: {error}")]
    Lock { path: String, error: std::io::Error },
    #[error(
        "the state file {path} is in use by another relay ({holder}); \
         a state file belongs to one process at a time"
    )]
    Locked { path: String, holder: String },
    /// Well-formed JSON that no relay writes: refused like a bad config value, naming the
    /// field, rather than making every later event stale or the graph nonsense.
    #[error("the state file {path} is not valid: {problem}")]
    Invalid { path: String, problem: String },
}

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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
        Err(error) => {
            return Err(StateError::Read {
                path: display(),
                error,
            })
        }
    };
    let state: StreamState =
        serde_json::from_slice(&bytes).map_err(|error| StateError::Corrupt {
            path: display(),
            error,
        })?;
    if state.version != FORMAT_VERSION {
        return Err(StateError::Version {
            path: display(),
            version: state.version,
        });
    }
    if let Err(problem) = state.check() {
        return Err(StateError::Invalid {
            path: display(),
            problem,
        });
    }
    Ok(Some(state))
}

impl StreamState {
    /// What a relay could have written: a next number in the sequence range (or just past
    /// its end), and edges sorted, each once, none a self-follow (the graph records none).
    fn check(&self) -> Result<(), String> {
        let most = MAX_SEQUENCE + 1;
        if !(1..=most).contains(&self.next_sequence) {
            return Err(format!(
                "nextSequence must be between 1 and {most} (sequence numbers end at \
                 {MAX_SEQUENCE}), got {}",
                self.next_sequence
            ));
        }
        for (index, &(follower, followed)) in self.follows.iter().enumerate() {
            if follower == followed {
                return Err(format!(
                    "follows[{index}] is a self-follow ({follower}, {followed}); the relay \
                     records none"
                ));
            }
            if index > 0 && self.follows[index - 1] >= (follower, followed) {
                return Err(format!(
                    "follows[{index}] ({follower}, {followed}) is repeated or out of order; \
                     the relay writes each edge once, sorted"
                ));
            }
        }
        Ok(())
    }
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
    let fail = |error| StateError::Lock {
        path: path.display().to_string(),
        error,
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

/// How many times its own cost a save waits before the next one: saving takes at most about
/// a tenth of the time, however large the graph.
pub const SAVE_COST_FACTOR: u32 = 10;

/// How long after a save the next may start: `interval`, or longer when a save costs more
/// than a tenth of it (`cost`: copying the graph plus writing the file, as last measured).
/// A graph of millions of edges is then rewritten every few seconds instead of every
/// second; the file is further behind, and a source resumes from it (see `next|N`).
pub fn save_spacing(interval: Duration, cost: Duration) -> Duration {
    interval.max(cost.saturating_mul(SAVE_COST_FACTOR))
}

/// Writes `state` whole (edges sorted, so the file is stable) and makes it durable.
pub fn save(path: &Path, mut state: StreamState) -> Result<(), StateError> {
    state.follows.sort_unstable();
    let fail = |error| StateError::Write {
        path: path.display().to_string(),
        error,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let file = std::fs::File::create(&tmp).map_err(fail)?;
    // Streamed: a 3M-edge graph is 41 MB of JSON, which need not exist in memory at once.
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    serde_json::to_writer(&mut out, &state).map_err(|err| fail(std::io::Error::other(err)))?;
    let file = out.into_inner().map_err(|err| fail(err.into_error()))?;
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
    fn a_save_that_costs_more_than_a_tenth_of_the_interval_spaces_the_next_out() {
        let second = Duration::from_secs(1);
        assert_eq!(save_spacing(second, Duration::from_millis(20)), second);
        assert_eq!(save_spacing(second, Duration::from_millis(100)), second);
        assert_eq!(
            save_spacing(second, Duration::from_millis(450)),
            Duration::from_millis(4_500)
        );
    }

    /// `cargo test --release -p weir-relay -- --ignored --nocapture cost_of_a_large_state`:
    /// what one save of a 3M-edge graph costs (the README's figures).
    #[test]
    #[ignore]
    fn cost_of_a_large_state() {
        let edges = 3_000_000u64;
        let graph = FollowGraph::from_edges((0..edges).map(|i| (i % 1_000 + 1, i / 1_000 + 1)));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.state");
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let state = StreamState::capture(123_456_789, &graph);
            let captured = started.elapsed();
            save(&path, state).unwrap();
            let size = std::fs::metadata(&path).unwrap().len();
            println!(
                "{edges} edges: capture {captured:?}, capture + sort + write + fsync {:?}, {size} bytes",
                started.elapsed()
            );
        }
        let started = std::time::Instant::now();
        let loaded = load(&path).unwrap().unwrap();
        let graph = loaded.graph();
        println!(
            "load and rebuild: {:?}, {} edges",
            started.elapsed(),
            graph.edges()
        );
    }

    /// The message and every `source()` after it, as `anyhow` prints them with `{:#}`.
    fn chain(err: &dyn std::error::Error) -> String {
        let mut text = err.to_string();
        let mut cause = err.source();
        while let Some(next) = cause {
            text.push_str(": ");
            text.push_str(&next.to_string());
            cause = next.source();
        }
        text
    }

    fn refusal(json: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.state");
        std::fs::write(&path, json).unwrap();
        match load(&path) {
            Err(err @ StateError::Invalid { .. }) => chain(&err),
            other => panic!("{json} was not refused as invalid: {other:?}"),
        }
    }

    #[test]
    fn a_state_no_relay_writes_is_refused_naming_the_field() {
        let max = MAX_SEQUENCE + 1;
        for next in [0, max + 1, 1_000_000_000_000_000_000, u64::MAX] {
            let text = refusal(&format!(
                r#"{{"version": 1, "nextSequence": {next}, "follows": []}}"#
            ));
            assert!(text.contains("nextSequence"), "{text}");
        }
        let text = refusal(r#"{"version": 1, "nextSequence": 5, "follows": [[1, 2], [3, 3]]}"#);
        assert!(text.contains("follows[1] is a self-follow"), "{text}");
        let text = refusal(r#"{"version": 1, "nextSequence": 5, "follows": [[1, 2], [1, 2]]}"#);
        assert!(text.contains("follows[1] (1, 2) is repeated"), "{text}");
        let text = refusal(r#"{"version": 1, "nextSequence": 5, "follows": [[3, 2], [1, 2]]}"#);
        assert!(text.contains("out of order"), "{text}");
        // The largest value a relay can write is accepted.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.state");
        std::fs::write(
            &path,
            format!(r#"{{"version": 1, "nextSequence": {max}, "follows": [[1, 2]]}}"#),
        )
        .unwrap();
        assert_eq!(load(&path).unwrap().unwrap().next_sequence, max);
    }

    #[test]
    fn unknown_fields_are_refused_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.state");
        std::fs::write(
            &path,
            br#"{"version": 1, "nextSequence": 5, "follows": [], "nextSeq": 9}"#,
        )
        .unwrap();
        let err = load(&path).unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err:?}");
        assert!(chain(&err).contains("unknown field `nextSeq`"), "{err}");
    }

    #[test]
    fn the_cause_of_a_refusal_is_printed_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.state");
        std::fs::write(&path, b"{\"version\": 1, \"nextSeq").unwrap();
        let text = chain(&load(&path).unwrap_err());
        assert_eq!(text.matches("EOF while parsing").count(), 1, "{text}");
        let unreadable = dir.path().join("a-directory");
        std::fs::create_dir(&unreadable).unwrap();
        let text = chain(&load(&unreadable).unwrap_err());
        assert_eq!(text.matches("Is a directory").count(), 1, "{text}");
    }
}
