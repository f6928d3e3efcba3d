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
use weir_runtime::http::ListenerLimits;

use crate::proxy::Cidr;

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
    /// Bearer API keys; absent: no authentication. A comma-separated string is accepted
    /// too. Present but naming no key is refused: a typo must not turn auth off.
    #[serde(
        rename = "WEIR_INCREMENTS_API_KEYS",
        deserialize_with = "keys",
        // Absent, not `[]`, in the defaults layer: only a list someone wrote reaches `keys`.
        skip_serializing_if = "Vec::is_empty"
    )]
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
    /// How long an `Idempotency-Key` is remembered (the draft's retention window).
    pub idempotency_retention_secs: NonZeroU64,
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
    /// Load balancers (addresses or networks) whose `X-Forwarded-For` names the client, for
    /// the per-address rate limit. A comma-separated string is accepted too.
    #[serde(deserialize_with = "networks")]
    pub trusted_proxies: Vec<Cidr>,
    /// From the first byte of a request to the end of its headers.
    pub header_timeout_ms: u64,
    /// A connection without a request under way is closed after this long.
    pub idle_timeout_ms: u64,
    /// From the end of the headers to the end of the body.
    pub body_timeout_ms: u64,
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
}

/// A week: long enough to notice and replay, short enough that the table stays small.
const DEAD_LETTER_RETENTION_SECS: NonZeroU64 = NonZeroU64::new(7 * 24 * 3600).unwrap();
const IDEMPOTENCY_RETENTION_SECS: NonZeroU64 = NonZeroU64::new(24 * 3600).unwrap();
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
            idempotency_retention_secs: IDEMPOTENCY_RETENTION_SECS,
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
            trusted_proxies: Vec::new(),
            header_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            body_timeout_ms: 30_000,
            max_connections: 10_000,
        }
    }
}

/// A setting that cannot work, named by its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidConfig {
    #[error("{key} must be at least {min}, got {value}")]
    TooSmall {
        key: &'static str,
        min: u64,
        value: u64,
    },
    #[error("{key} must exceed {other} ({key} = {value}, {other} = {limit})")]
    MustExceed {
        key: &'static str,
        value: u64,
        other: &'static str,
        limit: u64,
    },
    #[error("{key} must not exceed {other} ({key} = {value}, {other} = {limit})")]
    MustNotExceed {
        key: &'static str,
        value: u64,
        other: &'static str,
        limit: u64,
    },
    #[error("{key} {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn at_least(key: &'static str, value: u64, min: u64) -> Result<(), InvalidConfig> {
    if value < min {
        return Err(InvalidConfig::TooSmall { key, min, value });
    }
    Ok(())
}

impl IncrementsConfig {
    /// Checks every rule a setting must meet, alone and with the others, so that the parts
    /// built from the config can trust it.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        self.validate_worker()?;
        self.validate_api()
    }

    fn validate_worker(&self) -> Result<(), InvalidConfig> {
        at_least("flushIntervalMs", self.flush_interval_ms, 1)?;
        at_least("maxStalenessMs", self.max_staleness_ms, 1)?;
        if self.flush_interval_ms > self.max_staleness_ms {
            // A flush that only starts after the promise has expired cannot keep it.
            return Err(InvalidConfig::MustNotExceed {
                key: "flushIntervalMs",
                value: self.flush_interval_ms,
                other: "maxStalenessMs",
                limit: self.max_staleness_ms,
            });
        }
        if self.redis_url.is_some() && self.claim_idle_ms <= self.flush_interval_ms {
            // Entries wait up to a flush interval before they are acknowledged; claiming
            // them sooner would hand a live worker's entries to another one. The embedded
            // log has one reader and no claims: there the setting means nothing.
            return Err(InvalidConfig::MustExceed {
                key: "claimIdleMs",
                value: self.claim_idle_ms,
                other: "flushIntervalMs",
                limit: self.flush_interval_ms,
            });
        }
        at_least("maxPending", self.max_pending as u64, 1)?;
        at_least("readCount", self.read_count as u64, 1)?;
        at_least("chunkSize", self.chunk_size as u64, 1)?;
        at_least("maxDeliveries", self.max_deliveries, 1)?;
        crate::store::Tables::new(&self.table_prefix).map_err(|_| InvalidConfig::Invalid {
            key: "tablePrefix",
            reason: format!(
                "must be 1 to 40 letters, digits or _, not starting with a digit, got {:?}",
                self.table_prefix
            ),
        })?;
        for (key, value) in [("stream", &self.stream), ("group", &self.group)] {
            if value.is_empty() {
                return Err(InvalidConfig::Invalid {
                    key,
                    reason: "must not be empty".into(),
                });
            }
        }
        Ok(())
    }

    fn validate_api(&self) -> Result<(), InvalidConfig> {
        at_least("maxQueueDepth", self.max_queue_depth, 1)?;
        if let Some(rate) = self.rate_limit_per_second {
            at_least("rateLimitPerSecond", rate.into(), 1)?;
        }
        if let Some(burst) = self.rate_limit_burst {
            at_least("rateLimitBurst", burst.into(), 1)?;
            if self.rate_limit_per_second.is_none() {
                return Err(InvalidConfig::Invalid {
                    key: "rateLimitBurst",
                    reason: "needs rateLimitPerSecond".into(),
                });
            }
        }
        at_least("headerTimeoutMs", self.header_timeout_ms, 1)?;
        at_least("idleTimeoutMs", self.idle_timeout_ms, 1)?;
        at_least("bodyTimeoutMs", self.body_timeout_ms, 1)?;
        at_least("maxConnections", self.max_connections as u64, 1)?;
        Ok(())
    }

    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms)
    }

    pub fn max_staleness(&self) -> Duration {
        Duration::from_millis(self.max_staleness_ms)
    }

    pub fn listener_limits(&self) -> ListenerLimits {
        ListenerLimits {
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            body_timeout: Duration::from_millis(self.body_timeout_ms),
            max_connections: self.max_connections,
        }
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

    pub fn idempotency_retention(&self) -> Duration {
        Duration::from_secs(self.idempotency_retention_secs.get())
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
    let keys: Vec<String> = list
        .into_iter()
        .map(|key| key.trim().to_string())
        .filter(|key| !key.is_empty())
        .collect();
    if keys.is_empty() {
        return Err(serde::de::Error::custom(
            "WEIR_INCREMENTS_API_KEYS (--api-keys) is set but names no key; list at least \
             one key, or unset it to run without authentication",
        ));
    }
    Ok(keys)
}

fn networks<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Cidr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Networks {
        One(String),
        Many(Vec<String>),
    }
    let list = match Networks::deserialize(deserializer)? {
        Networks::One(text) => text.split(',').map(str::to_string).collect(),
        Networks::Many(list) => list,
    };
    list.iter()
        .map(|network| network.trim())
        .filter(|network| !network.is_empty())
        .map(|network| network.parse().map_err(serde::de::Error::custom))
        .collect()
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
    /// Comma-separated load balancer addresses or networks whose X-Forwarded-For names the
    /// client, e.g. 10.0.0.0/8,192.168.1.5 [default: none].
    #[arg(long, value_name = "LIST")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_proxies: Option<String>,
    // headerTimeoutMs, idleTimeoutMs, bodyTimeoutMs and maxConnections are set in the
    // --config file only: tuned rarely, and every flag here grows the CLI's command enum.
}

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Read(#[from] weir_runtime::config::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(#[from] InvalidConfig),
}

impl IncrementsFlags {
    pub fn load(&self) -> Result<IncrementsConfig, LoadError> {
        let config: IncrementsConfig =
            weir_runtime::config::load(self.config_file.as_deref(), ENV_KEYS, self)?;
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_key_list_that_is_present_but_blank_is_refused_naming_the_key() {
        for blank in [" , ", ",", "", " "] {
            let flags = IncrementsFlags {
                api_keys: Some(blank.to_string()),
                ..IncrementsFlags::default()
            };
            let err = flags.load().unwrap_err().to_string();
            assert!(err.contains("WEIR_INCREMENTS_API_KEYS"), "{blank:?}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, r#"{"WEIR_INCREMENTS_API_KEYS": []}"#).unwrap();
        let flags = IncrementsFlags {
            config_file: Some(path),
            ..IncrementsFlags::default()
        };
        let err = flags.load().unwrap_err().to_string();
        assert!(err.contains("WEIR_INCREMENTS_API_KEYS"), "{err}");
        // Absent: no authentication, as documented.
        let config = IncrementsFlags::default().load().unwrap();
        assert!(config.api_keys.is_empty());
    }

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

    fn invalid(config: IncrementsConfig) -> String {
        match config.validate() {
            Ok(()) => panic!("{config:?} was accepted"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn a_zero_dead_letter_bound_is_refused_naming_its_key() {
        let dir = tempfile::tempdir().unwrap();
        for key in [
            "deadLetterRetentionSecs",
            "deadLetterMaxRows",
            "idempotencyRetentionSecs",
        ] {
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
    fn the_defaults_are_valid() {
        IncrementsConfig::default().validate().unwrap();
    }

    #[test]
    fn a_flush_interval_beyond_the_staleness_bound_is_refused_not_clamped() {
        let err = invalid(IncrementsConfig {
            flush_interval_ms: 60_000,
            claim_idle_ms: 120_000,
            ..IncrementsConfig::default()
        });
        assert!(
            err.contains("flushIntervalMs must not exceed maxStalenessMs"),
            "{err}"
        );
    }

    #[test]
    fn claim_idle_must_exceed_the_flush_interval_where_there_are_claims() {
        let err = invalid(IncrementsConfig {
            claim_idle_ms: 1_000,
            redis_url: Some("redis://127.0.0.1:6379".into()),
            ..IncrementsConfig::default()
        });
        assert!(
            err.contains("claimIdleMs must exceed flushIntervalMs"),
            "{err}"
        );
        // The embedded log has one reader and claims nothing.
        let embedded = IncrementsConfig {
            claim_idle_ms: 1_000,
            ..IncrementsConfig::default()
        };
        assert_eq!(embedded.validate(), Ok(()));
    }

    #[test]
    fn zeros_are_refused_with_the_key_name() {
        type Breaks = fn(&mut IncrementsConfig);
        let cases: [(&str, Breaks); 13] = [
            ("flushIntervalMs", |c| c.flush_interval_ms = 0),
            ("maxStalenessMs", |c| c.max_staleness_ms = 0),
            ("maxPending", |c| c.max_pending = 0),
            ("readCount", |c| c.read_count = 0),
            ("chunkSize", |c| c.chunk_size = 0),
            ("maxDeliveries", |c| c.max_deliveries = 0),
            ("maxQueueDepth", |c| c.max_queue_depth = 0),
            ("rateLimitPerSecond", |c| c.rate_limit_per_second = Some(0)),
            ("headerTimeoutMs", |c| c.header_timeout_ms = 0),
            ("idleTimeoutMs", |c| c.idle_timeout_ms = 0),
            ("bodyTimeoutMs", |c| c.body_timeout_ms = 0),
            ("maxConnections", |c| c.max_connections = 0),
            ("rateLimitBurst", |c| {
                c.rate_limit_per_second = Some(5);
                c.rate_limit_burst = Some(0);
            }),
        ];
        for (key, breaks) in cases {
            let mut config = IncrementsConfig::default();
            breaks(&mut config);
            let err = invalid(config);
            assert!(err.starts_with(&format!("{key} must be at least")), "{err}");
        }
    }

    #[test]
    fn a_burst_needs_a_rate() {
        let err = invalid(IncrementsConfig {
            rate_limit_burst: Some(10),
            ..IncrementsConfig::default()
        });
        assert!(
            err.contains("rateLimitBurst needs rateLimitPerSecond"),
            "{err}"
        );
    }

    #[test]
    fn names_are_checked() {
        let err = invalid(IncrementsConfig {
            table_prefix: "x; drop".into(),
            ..IncrementsConfig::default()
        });
        assert!(err.starts_with("tablePrefix"), "{err}");
        let err = invalid(IncrementsConfig {
            stream: String::new(),
            ..IncrementsConfig::default()
        });
        assert!(err.starts_with("stream must not be empty"), "{err}");
    }

    #[test]
    fn load_refuses_an_invalid_file_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, r#"{"flushIntervalMs": 0}"#).unwrap();
        let flags = IncrementsFlags {
            config_file: Some(path),
            ..IncrementsFlags::default()
        };
        let err = flags.load().unwrap_err().to_string();
        assert!(err.contains("flushIntervalMs must be at least 1"), "{err}");
    }

    #[test]
    fn listener_limits_come_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(
            &path,
            r#"{"headerTimeoutMs": 5000, "idleTimeoutMs": 7000, "bodyTimeoutMs": 9000, "maxConnections": 10}"#,
        )
        .unwrap();
        let flags = IncrementsFlags {
            config_file: Some(path),
            ..IncrementsFlags::default()
        };
        let limits = flags.load().unwrap().listener_limits();
        assert_eq!(
            limits,
            ListenerLimits {
                header_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(7),
                body_timeout: Duration::from_secs(9),
                max_connections: 10,
            }
        );
    }

    #[test]
    fn trusted_proxies_are_parsed_from_a_flag_and_refused_when_malformed() {
        let flags = IncrementsFlags {
            trusted_proxies: Some("10.0.0.0/8, 192.168.1.5".into()),
            ..IncrementsFlags::default()
        };
        let config = flags.load().unwrap();
        let shown: Vec<String> = config
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ["10.0.0.0/8", "192.168.1.5/32"]);
        let flags = IncrementsFlags {
            trusted_proxies: Some("10.0.0.0/8,not-an-ip".into()),
            ..IncrementsFlags::default()
        };
        let err = flags.load().unwrap_err().to_string();
        assert!(
            err.contains("trustedProxies") && err.contains("not-an-ip"),
            "{err}"
        );
    }
}
