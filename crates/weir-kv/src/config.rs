//! `weir kv serve` settings: defaults < `--config FILE` (JSON) < environment < flags, then
//! validated, so a bad value stops the start naming its key instead of being clamped.
//!
//! The seed's variables keep working: `QUEUE_CONN_STRING` (below `AMQP_URL`) for the broker
//! and `QUEUE_NAME` for the queue.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// In memory only, as the seed: a restart starts empty.
    None,
    /// Journal written before each acknowledgement: survives the process dying.
    Log,
    /// Journal synced to disk before each acknowledgement: survives power loss too.
    Fsync,
}

/// When the broker may forget a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Acks {
    /// After the request is applied, logged and answered: a dropped connection or a crash
    /// loses nothing, the broker redelivers.
    Manual,
    /// As soon as the broker sends it (the seed's mode; only with durability none): the
    /// broker's cheapest delivery, but requests on the wire or waiting in kv when the
    /// connection drops or the process dies are lost.
    Auto,
}

/// Unknown keys are refused (a typo such as `snapshotAfterByte` would otherwise be ignored
/// and its default used without a word).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct KvConfig {
    #[serde(rename = "AMQP_URL")]
    pub amqp_url: String,
    #[serde(rename = "QUEUE_NAME")]
    pub queue: String,
    /// Unacknowledged requests the broker may send ahead; also the largest batch. With
    /// `acks: auto` the broker ignores it: kv then pauses consuming while it holds more than
    /// twice this many requests not yet handled.
    pub prefetch: u16,
    pub acks: Acks,
    pub data_dir: PathBuf,
    pub durability: Durability,
    /// Appends one JSON object per applied write (JSON Lines).
    pub output: Option<PathBuf>,
    /// Move a damaged journal or snapshot aside and start from what came before the damage.
    pub repair: bool,
    /// Journal bytes after which a snapshot is written and the journal restarts.
    pub snapshot_after_bytes: u64,
    /// Longest wait between reconnection attempts while the broker is away.
    pub reconnect_max_ms: u64,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            amqp_url: "amqp://127.0.0.1:5672/%2f".into(),
            queue: "weir.kv".into(),
            prefetch: 1000,
            acks: Acks::Manual,
            data_dir: PathBuf::from("./weir-data/kv"),
            durability: Durability::Log,
            output: None,
            repair: false,
            snapshot_after_bytes: 64 << 20,
            reconnect_max_ms: 5_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KvConfigError {
    #[error(transparent)]
    Load(#[from] weir_runtime::config::ConfigError),
    #[error("{key}: {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> KvConfigError {
    KvConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

impl KvConfig {
    pub fn validate(&self) -> Result<(), KvConfigError> {
        lapin::uri::AMQPUri::from_str(&self.amqp_url)
            .map_err(|err| invalid("amqpUrl (AMQP_URL)", format!("not an AMQP URL: {err}")))?;
        if self.queue.is_empty() || self.queue.len() > 200 {
            // 200 leaves room for the ".dead" suffix within AMQP's 255-byte names.
            return Err(invalid("queue (QUEUE_NAME)", "must be 1 to 200 bytes"));
        }
        if self.prefetch == 0 {
            return Err(invalid(
                "prefetch",
                "must be at least 1 (0 would mean unlimited)",
            ));
        }
        if self.snapshot_after_bytes < 1 << 20 {
            return Err(invalid("snapshotAfterBytes", "must be at least 1048576"));
        }
        if !(100..=600_000).contains(&self.reconnect_max_ms) {
            return Err(invalid("reconnectMaxMs", "must be 100 to 600000"));
        }
        if self.durability == Durability::None && self.repair {
            return Err(invalid(
                "repair",
                "needs a journal (durability log or fsync)",
            ));
        }
        if self.acks == Acks::Auto && self.durability != Durability::None {
            return Err(invalid(
                "acks",
                "auto needs durability none (a logged request is acknowledged only once it is logged)",
            ));
        }
        Ok(())
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }

    pub fn reconnect_max(&self) -> Duration {
        Duration::from_millis(self.reconnect_max_ms)
    }

    /// One line for start-up output and the `weir up` banner; the password is left out.
    pub fn describe(&self) -> String {
        let storage = match self.durability {
            Durability::None if self.acks == Acks::Auto => "none, in memory, auto-ack".to_string(),
            Durability::None => "none, in memory".to_string(),
            Durability::Log => format!("log, data dir {}", self.data_dir.display()),
            Durability::Fsync => format!("fsync, data dir {}", self.data_dir.display()),
        };
        format!(
            "kv: consuming {} on {} ({storage})",
            self.queue,
            without_password(&self.amqp_url)
        )
    }
}

/// `amqp://user:secret@host/vhost` as `amqp://user@host/vhost`, so it can be printed.
pub fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}@{host}{path}")
        }
        None => url.to_string(),
    }
}

pub const ENV_KEYS: &[&str] = &["AMQP_URL", "QUEUE_NAME"];

/// Flags of `weir kv serve`. All optional, so only typed flags override.
#[derive(Debug, Clone, Default, Serialize, clap::Args)]
#[serde(rename_all = "camelCase")]
pub struct KvFlags {
    /// JSON config file (keys as in the README, e.g. {"prefetch": 500}).
    #[arg(long = "config", value_name = "FILE")]
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
    /// RabbitMQ [env: AMQP_URL or QUEUE_CONN_STRING; default: amqp://127.0.0.1:5672/%2f].
    #[arg(long)]
    #[serde(rename = "AMQP_URL", skip_serializing_if = "Option::is_none")]
    pub amqp_url: Option<String>,
    /// Request queue, declared durable [env: QUEUE_NAME; default: weir.kv].
    #[arg(long)]
    #[serde(rename = "QUEUE_NAME", skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Requests the broker may send ahead of acknowledgements [default: 1000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<u16>,
    /// manual (acknowledged once applied; nothing lost) or auto (acknowledged on delivery,
    /// faster, loses what is in flight when the connection drops; durability none only)
    /// [default: manual].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acks: Option<Acks>,
    /// Where the snapshot and journal live [default: ./weir-data/kv].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// none (in memory), log (survives a crash), fsync (survives power loss) [default: log].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durability: Option<Durability>,
    /// Append each applied write to this file as JSON Lines.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
    /// Move a damaged journal aside and keep what came before the damage.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub repair: bool,
}

impl KvFlags {
    /// Loads the layers, with the seed's `QUEUE_CONN_STRING` under `AMQP_URL`, and validates.
    pub fn load(&self) -> Result<KvConfig, KvConfigError> {
        let mut config: KvConfig =
            weir_runtime::config::load(self.config_file.as_deref(), ENV_KEYS, self)?;
        let from_layers = self.amqp_url.is_some() || std::env::var_os("AMQP_URL").is_some();
        if !from_layers {
            if let Ok(seed) = std::env::var("QUEUE_CONN_STRING") {
                config.amqp_url = seed;
            }
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        KvConfig::default().validate().unwrap();
    }

    #[test]
    fn each_bad_value_is_named() {
        type Spoil = fn(&mut KvConfig);
        let cases: [(Spoil, &str); 5] = [
            (|c| c.prefetch = 0, "prefetch"),
            (|c| c.amqp_url = "http://nope".into(), "amqpUrl"),
            (|c| c.queue = String::new(), "queue"),
            (|c| c.snapshot_after_bytes = 10, "snapshotAfterBytes"),
            (|c| c.reconnect_max_ms = 0, "reconnectMaxMs"),
        ];
        for (spoil, key) in cases {
            let mut config = KvConfig::default();
            spoil(&mut config);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.starts_with(key), "{key}: {err}");
        }
    }

    #[test]
    fn printed_urls_leave_the_password_out() {
        assert_eq!(
            without_password("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(without_password("amqps://u:p@host"), "amqps://u@host");
        assert_eq!(
            without_password("amqp://127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        let config = KvConfig {
            amqp_url: "amqp://guest:s3cret@localhost/%2f".into(),
            ..KvConfig::default()
        };
        assert!(
            !config.describe().contains("s3cret"),
            "{}",
            config.describe()
        );
    }

    #[test]
    fn auto_acks_with_a_journal_are_refused() {
        let config = KvConfig {
            acks: Acks::Auto,
            ..KvConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.starts_with("acks"), "{err}");
        let in_memory = KvConfig {
            durability: Durability::None,
            ..config
        };
        in_memory.validate().unwrap();
    }

    #[test]
    fn repair_without_a_journal_is_refused() {
        let config = KvConfig {
            durability: Durability::None,
            repair: true,
            ..KvConfig::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("repair"));
    }

    #[test]
    fn an_unknown_key_in_the_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kv.json");
        std::fs::write(&file, r#"{"snapshotAfterByte": 1048576}"#).unwrap();
        let flags = KvFlags {
            config_file: Some(file.clone()),
            ..KvFlags::default()
        };
        let err = flags.load().expect_err("a typo is refused").to_string();
        assert!(err.contains("snapshotAfterByte"), "{err}");
        std::fs::write(&file, r#"{"snapshotAfterBytes": 1048576}"#).unwrap();
        let config = flags.load().expect("the right key is taken");
        assert_eq!(config.snapshot_after_bytes, 1 << 20);
    }
}
