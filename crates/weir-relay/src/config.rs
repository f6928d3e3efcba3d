//! `weir relay serve` settings: defaults < `--config FILE` (JSON) < environment < flags.
//!
//! The port keys and environment variable names are the ones the follower-maze seeds use
//! (`eventListenerPort`, `clientListenerPort`), so existing scripts keep working.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a new event-source connection means for the stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SourceMode {
    /// A new source starts a new stream: sequence 1, empty follow graph.
    #[default]
    Reset,
    /// A new source continues the previous stream: same sequence, same follow graph.
    Resume,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RelayConfig {
    /// Address both listeners bind to.
    pub bind_address: IpAddr,
    pub event_listener_port: u16,
    pub client_listener_port: u16,
    /// Most events held for reordering. When an event arrives this far ahead of the next
    /// expected sequence number, the missing numbers are skipped (and counted) so memory
    /// stays bounded. Each held event costs about 80 bytes.
    pub max_window: usize,
    /// Furthest ahead of the next expected sequence number an event may be. Anything further
    /// is rejected (and counted) instead of making the window skip every number before it: one
    /// bad number must not turn the rest of the stream stale. Unset: ten times `max_window`.
    pub max_sequence_ahead: Option<u64>,
    /// Skip a missing sequence number once later events have waited this long for it.
    /// Unset: wait until the window is full or the source disconnects.
    pub gap_timeout_ms: Option<u64>,
    pub source_mode: SourceMode,
    /// Persist the next expected sequence number and the follow graph here, so a restarted
    /// server continues the stream where it stopped.
    pub state_file: Option<PathBuf>,
    /// How often the state file is rewritten while events flow.
    pub state_interval_ms: u64,
    /// Bytes queued for one client before it is considered stuck and disconnected.
    pub client_buffer: usize,
    /// Bytes queued for all clients together. Past it, the clients with the largest queues
    /// are dropped until the total is back under it, so stuck clients cannot take the
    /// machine's memory between them.
    pub max_queued_bytes: usize,
    /// Longest accepted line, terminator included, on either port.
    pub max_line_length: usize,
    /// How long a new client may take to send its user id.
    pub client_id_timeout_ms: u64,
    /// Most user client connections open at once, those still to send their id included;
    /// past it a new one is closed at once. Unset: the process's descriptor limit
    /// (`ulimit -n`) less [`RESERVED_DESCRIPTORS`], so clients alone can never exhaust the
    /// descriptors the source, the metrics page and the state file need.
    pub max_clients: Option<usize>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            bind_address: IpAddr::from([0, 0, 0, 0]),
            event_listener_port: 9090,
            client_listener_port: 9099,
            max_window: 100_000,
            max_sequence_ahead: None,
            gap_timeout_ms: None,
            source_mode: SourceMode::Reset,
            state_file: None,
            state_interval_ms: 1_000,
            client_buffer: 1 << 20,
            max_queued_bytes: 64 << 20,
            max_line_length: 1_024,
            client_id_timeout_ms: 10_000,
            max_clients: None,
        }
    }
}

/// A setting that cannot work, named by its key as written in the config file.
#[derive(Debug, thiserror::Error)]
pub enum RelayConfigError {
    #[error(transparent)]
    Load(#[from] weir_runtime::config::ConfigError),
    #[error("invalid configuration: {key} {problem}")]
    Invalid { key: &'static str, problem: String },
}

/// Shortest `maxLineLength`: room for a follow event with short ids and its terminator.
pub const MIN_LINE_LENGTH: usize = 16;

/// Descriptors user clients can never take: the event source (and a second one being
/// refused), both listeners, the metrics listener and a few scrapes, the state file, its
/// lock and temporary copy, the standard streams and the runtime's own.
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// How many windows ahead an event may be when `maxSequenceAhead` is unset.
const DEFAULT_WINDOWS_AHEAD: u64 = 10;

fn invalid(key: &'static str, problem: impl Into<String>) -> RelayConfigError {
    RelayConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

impl RelayConfig {
    /// Checks every setting once, at start, so that a zero or contradictory value is an
    /// error naming its key rather than something quietly bent into shape.
    pub fn validate(&self) -> Result<(), RelayConfigError> {
        self.window_capacity()?;
        let ahead = self.max_sequence_ahead();
        if ahead < self.max_window as u64 {
            return Err(invalid(
                "maxSequenceAhead",
                format!(
                    "must be at least maxWindow ({}), got {ahead}",
                    self.max_window
                ),
            ));
        }
        if self.gap_timeout_ms == Some(0) {
            return Err(invalid(
                "gapTimeoutMs",
                "must be at least 1 (leave it unset to wait for the window to fill)",
            ));
        }
        positive("stateIntervalMs", self.state_interval_ms)?;
        positive("clientIdTimeoutMs", self.client_id_timeout_ms)?;
        if self.max_line_length < MIN_LINE_LENGTH {
            return Err(invalid(
                "maxLineLength",
                format!(
                    "must be at least {MIN_LINE_LENGTH}, got {}",
                    self.max_line_length
                ),
            ));
        }
        if self.client_buffer < self.max_line_length {
            return Err(invalid(
                "clientBuffer",
                format!(
                    "must hold at least one line (maxLineLength {}), got {}",
                    self.max_line_length, self.client_buffer
                ),
            ));
        }
        if self.max_queued_bytes < self.client_buffer {
            return Err(invalid(
                "maxQueuedBytes",
                format!(
                    "must be at least clientBuffer ({}), got {}",
                    self.client_buffer, self.max_queued_bytes
                ),
            ));
        }
        self.client_cap()?;
        if self.state_file.is_some() && self.source_mode == SourceMode::Reset {
            return Err(invalid(
                "stateFile",
                "needs sourceMode resume: in reset mode every new source (and so the first \
                 one after a restart) starts a new stream, so there is nothing to carry over",
            ));
        }
        Ok(())
    }

    /// `maxClients`, or its default, checked against this process's descriptor limit.
    pub fn client_cap(&self) -> Result<usize, RelayConfigError> {
        client_cap(self.max_clients, descriptor_limit())
    }

    pub fn window_capacity(&self) -> Result<NonZeroUsize, RelayConfigError> {
        NonZeroUsize::new(self.max_window).ok_or_else(|| invalid("maxWindow", "must be at least 1"))
    }

    /// `maxSequenceAhead`, or its default derived from the window.
    pub fn max_sequence_ahead(&self) -> u64 {
        self.max_sequence_ahead
            .unwrap_or_else(|| (self.max_window as u64).saturating_mul(DEFAULT_WINDOWS_AHEAD))
    }

    pub fn gap_timeout(&self) -> Option<Duration> {
        self.gap_timeout_ms.map(Duration::from_millis)
    }

    pub fn state_interval(&self) -> Duration {
        Duration::from_millis(self.state_interval_ms)
    }

    pub fn client_id_timeout(&self) -> Duration {
        Duration::from_millis(self.client_id_timeout_ms)
    }
}

fn client_cap(max_clients: Option<usize>, limit: u64) -> Result<usize, RelayConfigError> {
    let room = limit.saturating_sub(RESERVED_DESCRIPTORS);
    let room_usize = usize::try_from(room).unwrap_or(usize::MAX);
    match max_clients {
        Some(0) => Err(invalid("maxClients", "must be at least 1")),
        Some(wanted) if wanted > room_usize => Err(invalid(
            "maxClients",
            format!(
                "must leave {RESERVED_DESCRIPTORS} of the {limit} descriptors this process may \
                 open (ulimit -n) to the event source, the metrics page and the state file: \
                 at most {room}, got {wanted}"
            ),
        )),
        Some(wanted) => Ok(wanted),
        None if room == 0 => Err(invalid(
            "maxClients",
            format!(
                "has no room: the descriptor limit (ulimit -n) is {limit} and \
                 {RESERVED_DESCRIPTORS} are kept for the event source, the metrics page and \
                 the state file; raise the limit"
            ),
        )),
        None => Ok(room_usize),
    }
}

/// The soft limit on open descriptors (`RLIM_INFINITY` reads as `u64::MAX`).
fn descriptor_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is handed, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        // Unknown: the kernel enforces whatever it is, and accept errors are survived.
        return u64::MAX;
    }
    limit.rlim_cur
}

fn positive(key: &'static str, value: u64) -> Result<(), RelayConfigError> {
    if value == 0 {
        return Err(invalid(key, "must be at least 1"));
    }
    Ok(())
}

/// Environment variables honoured, with the seeds' names.
pub const ENV_KEYS: &[&str] = &["eventListenerPort", "clientListenerPort"];

/// `weir relay serve` flags. Every flag is optional so that only what the user typed
/// overrides the file and the environment.
#[derive(Debug, Clone, Default, Serialize, clap::Args)]
#[serde(rename_all = "camelCase")]
pub struct ServeFlags {
    /// JSON config file (keys as in the README, e.g. {"eventListenerPort": 9090}).
    #[arg(long = "config", value_name = "FILE")]
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
    /// Address both listeners bind to [default: 0.0.0.0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind_address: Option<IpAddr>,
    /// Event source port [default: 9090].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_listener_port: Option<u16>,
    /// User client port [default: 9099].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_listener_port: Option<u16>,
    /// Most events held for reordering [default: 100000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_window: Option<usize>,
    /// Furthest ahead of the next expected number an event may be [default: 10 x max-window].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sequence_ahead: Option<u64>,
    /// Skip a missing sequence number after this many milliseconds [default: never].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap_timeout_ms: Option<u64>,
    /// What a new source connection does to the stream [default: reset].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_mode: Option<SourceMode>,
    /// Keep the stream position and follow graph in this file across restarts.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
    /// How often to rewrite the state file, in milliseconds [default: 1000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_interval_ms: Option<u64>,
    /// Bytes queued for one client before it is dropped as stuck [default: 1048576].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_buffer: Option<usize>,
    /// Bytes queued for all clients together before the largest queues are dropped
    /// [default: 67108864].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued_bytes: Option<usize>,
    /// Longest accepted line in bytes [default: 1024].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_line_length: Option<usize>,
    /// Milliseconds a new client may take to send its id [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id_timeout_ms: Option<u64>,
    /// Most user client connections at once [default: the descriptor limit less 64].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_clients: Option<usize>,
}

impl ServeFlags {
    /// The layered settings, validated.
    pub fn load(&self) -> Result<RelayConfig, RelayConfigError> {
        let config: RelayConfig =
            weir_runtime::config::load(self.config_file.as_deref(), ENV_KEYS, self)?;
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_config_file_format_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"eventListenerPort": 7070, "clientListenerPort": 7077}"#,
        )
        .unwrap();
        let flags = ServeFlags {
            config_file: Some(path),
            client_listener_port: Some(6066),
            ..ServeFlags::default()
        };
        let config = flags.load().unwrap();
        assert_eq!(config.event_listener_port, 7070);
        assert_eq!(config.client_listener_port, 6066, "a flag beats the file");
        assert_eq!(config.max_window, RelayConfig::default().max_window);
    }

    #[test]
    fn source_mode_reads_as_a_lowercase_word() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"sourceMode": "resume", "gapTimeoutMs": 250}"#).unwrap();
        let flags = ServeFlags {
            config_file: Some(path),
            ..ServeFlags::default()
        };
        let config = flags.load().unwrap();
        assert_eq!(config.source_mode, SourceMode::Resume);
        assert_eq!(config.gap_timeout(), Some(Duration::from_millis(250)));
    }

    fn rejected_key(config: RelayConfig) -> &'static str {
        match config.validate() {
            Err(RelayConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn the_defaults_are_valid() {
        RelayConfig::default().validate().unwrap();
        assert_eq!(RelayConfig::default().max_sequence_ahead(), 1_000_000);
    }

    #[test]
    fn zero_and_contradictory_values_are_errors_naming_their_key() {
        let base = RelayConfig::default;
        let cases = [
            (
                RelayConfig {
                    max_window: 0,
                    ..base()
                },
                "maxWindow",
            ),
            (
                RelayConfig {
                    state_interval_ms: 0,
                    ..base()
                },
                "stateIntervalMs",
            ),
            (
                RelayConfig {
                    client_id_timeout_ms: 0,
                    ..base()
                },
                "clientIdTimeoutMs",
            ),
            (
                RelayConfig {
                    gap_timeout_ms: Some(0),
                    ..base()
                },
                "gapTimeoutMs",
            ),
            (
                RelayConfig {
                    max_line_length: 3,
                    ..base()
                },
                "maxLineLength",
            ),
            (
                RelayConfig {
                    client_buffer: 0,
                    ..base()
                },
                "clientBuffer",
            ),
            (
                RelayConfig {
                    max_queued_bytes: 1_000,
                    ..base()
                },
                "maxQueuedBytes",
            ),
            (
                RelayConfig {
                    max_sequence_ahead: Some(10),
                    ..base()
                },
                "maxSequenceAhead",
            ),
            (
                RelayConfig {
                    state_file: Some("relay.state".into()),
                    source_mode: SourceMode::Reset,
                    ..base()
                },
                "stateFile",
            ),
            (
                RelayConfig {
                    max_clients: Some(0),
                    ..base()
                },
                "maxClients",
            ),
            (
                RelayConfig {
                    max_clients: Some(usize::MAX),
                    ..base()
                },
                "maxClients",
            ),
        ];
        for (config, key) in cases {
            assert_eq!(rejected_key(config), key);
        }
    }

    #[test]
    fn the_client_cap_leaves_descriptors_for_the_source_and_metrics() {
        assert_eq!(client_cap(None, 20_000).unwrap(), 20_000 - 64);
        assert_eq!(client_cap(Some(100), 20_000).unwrap(), 100);
        assert_eq!(client_cap(Some(19_936), 20_000).unwrap(), 19_936);
        let too_many = client_cap(Some(19_937), 20_000).unwrap_err().to_string();
        assert!(
            too_many.contains("maxClients") && too_many.contains("at most 19936"),
            "{too_many}"
        );
        let no_room = client_cap(None, 64).unwrap_err().to_string();
        assert!(no_room.contains("maxClients"), "{no_room}");
        assert_eq!(
            client_cap(None, u64::MAX).unwrap() as u64,
            u64::MAX - 64,
            "no limit: no cap worth the name"
        );
    }

    #[test]
    fn the_error_message_names_the_key_as_written_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"stateIntervalMs": 0}"#).unwrap();
        let flags = ServeFlags {
            config_file: Some(path),
            ..ServeFlags::default()
        };
        let message = flags.load().unwrap_err().to_string();
        assert_eq!(
            message,
            "invalid configuration: stateIntervalMs must be at least 1"
        );
    }
}
