//! `weir increments serve|api|worker` settings: defaults < `--config FILE` (JSON) <
//! environment < flags.
//!
//! The three settings most often injected by a platform keep their conventional variable
//! names as their keys (`DATABASE_URL`, `REDIS_URL`, `WEIR_INCREMENTS_API_KEYS`), so the same
//! name works in the file, in the environment and behind its flag.

use std::net::IpAddr;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IncrementsConfig {
    pub bind_address: IpAddr,
    pub port: u16,
    /// Where the embedded log and the SQLite file live.
    pub data_dir: PathBuf,
    /// Redis for the queue; unset: the embedded log (one process only).
    #[serde(rename = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Postgres for the totals; unset: `<dataDir>/increments.sqlite`.
    #[serde(rename = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Bearer API keys; empty: no authentication. A comma-separated string is accepted too.
    #[serde(rename = "WEIR_INCREMENTS_API_KEYS", deserialize_with = "keys")]
    pub api_keys: Vec<String>,
    /// Requests per second per API key (or per client address without auth); unset: none.
    pub rate_limit_per_second: Option<u32>,
    pub rate_limit_burst: Option<u32>,
    /// Prefix of the four tables (`<p>_counts`, `<p>_marks`, `<p>_applied`, `<p>_dead_letters`).
    pub table_prefix: String,
    pub stream: String,
    pub group: String,
    /// This worker's consumer name; unset: host name and process id.
    pub consumer: Option<String>,
    /// Unset: `<stream>:dead`.
    pub dead_letter_stream: Option<String>,
    /// Dead letters older than this are pruned (the store's table and the Redis stream).
    pub dead_letter_retention_secs: NonZeroU64,
    /// At most this many dead letters are kept (table rows per stream, stream entries), the
    /// oldest pruned first.
    pub dead_letter_max_rows: NonZeroU64,
    /// Flush once the oldest unflushed increment is this old.
    pub flush_interval_ms: u64,
    /// The promise: what is persisted is never older than this. Retries back off within it.
    pub max_staleness_ms: u64,
    /// Flush early once this many increments are held in memory.
    pub max_pending: usize,
    /// Entries read per XREADGROUP.
    pub read_count: usize,
    /// Keys per upsert statement.
    pub chunk_size: usize,
    /// A stream entry delivered this many times without a commit goes to the dead letters.
    pub max_deliveries: u64,
    /// Pending entries idle this long belong to a dead worker and are claimed.
    pub claim_idle_ms: u64,
    /// fsync the embedded log before answering 202. Off, a 202 still survives the death of
    /// any process (the write reached the kernel first); on, it also survives power loss,
    /// at the price of one disk sync per group of requests.
    pub fsync: bool,
    /// On start, move a damaged embedded log segment aside (to `<name>.damaged-<ms>`),
    /// keeping its records before the damage, instead of refusing to start.
    pub repair: bool,
    /// Accepted but unflushed increments above which the API answers 503.
    pub max_queue_depth: u64,
    /// Milliseconds a graceful shutdown keeps retrying its final flush.
    pub shutdown_flush_ms: u64,
}

/// A week: long enough to notice and replay, short enough that the table stays small.
const DEAD_LETTER_RETENTION_SECS: NonZeroU64 = NonZeroU64::new(7 * 24 * 3600).unwrap();
const DEAD_LETTER_MAX_ROWS: NonZeroU64 = NonZeroU64::new(1_000_000).unwrap();

impl Default for IncrementsConfig {
    fn default() -> Self {
        IncrementsConfig {
            bind_address: IpAddr::from([0, 0, 0, 0]),
            port: 3333,
            data_dir: PathBuf::from("./weir-data"),
            redis_url: None,
            database_url: None,
            api_keys: Vec::new(),
            rate_limit_per_second: None,
            rate_limit_burst: None,
            table_prefix: "increments".into(),
            stream: "weir:increments".into(),
            group: "weir-increments".into(),
            consumer: None,
            dead_letter_stream: None,
            dead_letter_retention_secs: DEAD_LETTER_RETENTION_SECS,
            dead_letter_max_rows: DEAD_LETTER_MAX_ROWS,
            flush_interval_ms: 1_000,
            max_staleness_ms: 10_000,
            max_pending: 1_000_000,
            read_count: 2_000,
            chunk_size: 5_000,
            max_deliveries: 5,
            claim_idle_ms: 5_000,
            fsync: false,
            repair: false,
            max_queue_depth: 10_000_000,
            shutdown_flush_ms: 5_000,
        }
    }
}

impl IncrementsConfig {
    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(
            self.flush_interval_ms
                .clamp(1, self.max_staleness_ms.max(1)),
        )
    }

    pub fn max_staleness(&self) -> Duration {
        Duration::from_millis(self.max_staleness_ms.max(1))
    }

    pub fn dead_letter_stream(&self) -> String {
        self.dead_letter_stream
            .clone()
            .unwrap_or_else(|| format!("{}:dead", self.stream))
    }

    pub fn consumer_name(&self) -> String {
        self.consumer.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "host".into());
            format!("{host}-{}", std::process::id())
        })
    }

    pub fn dead_letter_retention(&self) -> crate::store::DeadLetterRetention {
        crate::store::DeadLetterRetention {
            max_age: Duration::from_secs(self.dead_letter_retention_secs.get()),
            max_rows: self.dead_letter_max_rows.get(),
        }
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.data_dir.join("increments.sqlite")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.join("increments-log")
    }
}

fn keys<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Keys {
        One(String),
        Many(Vec<String>),
    }
    let list = match Keys::deserialize(deserializer)? {
        Keys::One(text) => text.split(',').map(str::to_string).collect(),
        Keys::Many(list) => list,
    };
    Ok(list
        .into_iter()
        .map(|key| key.trim().to_string())
        .filter(|key| !key.is_empty())
        .collect())
}

/// Environment variables honoured.
pub const ENV_KEYS: &[&str] = &["DATABASE_URL", "REDIS_URL", "WEIR_INCREMENTS_API_KEYS"];

/// Flags of `serve`, `api` and `worker`. All optional, so only typed flags override.
#[derive(Debug, Clone, Default, Serialize, clap::Args)]
#[serde(rename_all = "camelCase")]
pub struct IncrementsFlags {
    /// JSON config file (keys as in the README, e.g. {"port": 3333, "flushIntervalMs": 500}).
    #[arg(long = "config", value_name = "FILE")]
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
    /// Address the API binds to [default: 0.0.0.0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind_address: Option<IpAddr>,
    /// API port [default: 3333].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Directory of the embedded log and SQLite file [default: ./weir-data].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Redis Streams queue, e.g. redis://127.0.0.1:6379 [env: REDIS_URL; default: embedded].
    #[arg(long = "queue", value_name = "URL")]
    #[serde(rename = "REDIS_URL", skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Postgres, e.g. postgres://user@host/db [env: DATABASE_URL; default: SQLite].
    #[arg(long = "database", value_name = "URL")]
    #[serde(rename = "DATABASE_URL", skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Comma-separated bearer API keys [env: WEIR_INCREMENTS_API_KEYS; default: no auth].
    #[arg(long)]
    #[serde(
        rename = "WEIR_INCREMENTS_API_KEYS",
        skip_serializing_if = "Option::is_none"
    )]
    pub api_keys: Option<String>,
    /// Requests per second per API key or client address [default: unlimited].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_second: Option<u32>,
    /// Burst above the rate [default: the rate].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_burst: Option<u32>,
    /// Table name prefix [default: increments].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_prefix: Option<String>,
    /// Redis stream [default: weir:increments].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Redis consumer group [default: weir-increments].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Redis consumer name [default: host-pid].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Dead-letter stream [default: <stream>:dead].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_stream: Option<String>,
    /// Flush when the oldest held increment is this many ms old [default: 1000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_interval_ms: Option<u64>,
    /// Staleness bound in ms that retries stay within [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_staleness_ms: Option<u64>,
    /// Stream deliveries before an entry is dead-lettered [default: 5].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_deliveries: Option<u64>,
    /// Idle ms after which a dead worker's entries are claimed [default: 5000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim_idle_ms: Option<u64>,
    /// fsync the embedded log before each 202, to survive power loss too [default: false].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fsync: Option<bool>,
    /// Start even if the embedded log is damaged: move the damaged segment aside, keep the
    /// records before the damage, log what was lost [default: false, refuse to start].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<bool>,
}

impl IncrementsFlags {
    pub fn load(&self) -> Result<IncrementsConfig, weir_runtime::config::ConfigError> {
        weir_runtime::config::load(self.config_file.as_deref(), ENV_KEYS, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_flags_and_comma_separated_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(
            &path,
            r#"{"port": 4000, "flushIntervalMs": 250, "WEIR_INCREMENTS_API_KEYS": "a, b"}"#,
        )
        .unwrap();
        let flags = IncrementsFlags {
            config_file: Some(path),
            port: Some(4001),
            ..IncrementsFlags::default()
        };
        let config = flags.load().unwrap();
        assert_eq!(config.port, 4001);
        assert_eq!(config.flush_interval(), Duration::from_millis(250));
        assert_eq!(config.api_keys, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn a_zero_dead_letter_bound_is_refused_naming_its_key() {
        let dir = tempfile::tempdir().unwrap();
        for key in ["deadLetterRetentionSecs", "deadLetterMaxRows"] {
            let path = dir.path().join("c.json");
            std::fs::write(&path, format!(r#"{{"{key}": 0}}"#)).unwrap();
            let flags = IncrementsFlags {
                config_file: Some(path),
                ..IncrementsFlags::default()
            };
            let err = flags.load().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn repair_is_a_bare_flag_and_off_by_default() {
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            flags: IncrementsFlags,
        }
        let parse = |args: &[&str]| {
            <Serve as clap::Parser>::try_parse_from(args)
                .unwrap()
                .flags
                .load()
                .unwrap()
                .repair
        };
        assert!(!parse(&["serve"]));
        assert!(parse(&["serve", "--repair"]));
        assert!(!parse(&["serve", "--repair", "false"]));
    }

    #[test]
    fn the_flush_interval_never_exceeds_the_staleness_bound() {
        let config = IncrementsConfig {
            flush_interval_ms: 60_000,
            ..IncrementsConfig::default()
        };
        assert_eq!(config.flush_interval(), config.max_staleness());
    }
}
