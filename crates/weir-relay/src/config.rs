//! `weir relay serve` settings: defaults < `--config FILE` (JSON) < environment < flags.
//!
//! The port keys and environment variable names are the ones the follower-maze seeds use
//! (`eventListenerPort`, `clientListenerPort`), so existing scripts keep working.

use std::net::IpAddr;
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
    /// Longest accepted line, terminator included, on either port.
    pub max_line_length: usize,
    /// How long a new client may take to send its user id.
    pub client_id_timeout_ms: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            bind_address: IpAddr::from([0, 0, 0, 0]),
            event_listener_port: 9090,
            client_listener_port: 9099,
            max_window: 100_000,
            gap_timeout_ms: None,
            source_mode: SourceMode::Reset,
            state_file: None,
            state_interval_ms: 1_000,
            client_buffer: 1 << 20,
            max_line_length: 1_024,
            client_id_timeout_ms: 10_000,
        }
    }
}

impl RelayConfig {
    pub fn gap_timeout(&self) -> Option<Duration> {
        self.gap_timeout_ms.map(Duration::from_millis)
    }

    pub fn state_interval(&self) -> Duration {
        Duration::from_millis(self.state_interval_ms.max(1))
    }

    pub fn client_id_timeout(&self) -> Duration {
        Duration::from_millis(self.client_id_timeout_ms)
    }
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
    /// Longest accepted line in bytes [default: 1024].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_line_length: Option<usize>,
    /// Milliseconds a new client may take to send its id [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id_timeout_ms: Option<u64>,
}

impl ServeFlags {
    pub fn load(&self) -> Result<RelayConfig, weir_runtime::config::ConfigError> {
        weir_runtime::config::load(self.config_file.as_deref(), ENV_KEYS, self)
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
}
