//! `weir distinct` settings: the seed's `config.yaml` keys, layered as defaults < YAML file
//! < environment (`WEIR_DISTINCT_<KEY>`) < flags, then validated into a typed
//! [`DistinctConfig`]. The same path runs at start and at every reload, so a value refused
//! at start is refused at reload too (where the caller keeps the last good config).
//!
//! [`diff`] turns two validated configs into a [`ReloadPlan`].

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::Serialized;
use figment::value::{Dict, Value};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML: {source}")]
    Yaml {
        path: String,
        source: serde_norway::Error,
    },
    #[error("config file {0}: the top level must be a mapping of keys to values")]
    NotAMapping(String),
    #[error("invalid configuration: {0}")]
    Layers(#[from] Box<figment::Error>),
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error(
        "config file {0} is empty: a reload that would set every key to its default is refused \
         (an editor that truncates before writing does this); the running config is kept"
    )]
    Empty(String),
    #[error(
        "database: changed from {old} to {new}; where the data lives changes only with a \
         restart, so the running config is kept"
    )]
    DatabaseMoved { old: String, new: String },
}

impl ConfigError {
    fn invalid(key: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key,
            message: message.into(),
        }
    }
}

/// The keys as written, before validation. Numbers are read as floats so that
/// `worker_persist: -1` reaches validation (and is named there) instead of failing as a
/// type error, and fractions of seconds stay possible.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    #[serde(deserialize_with = "list_or_commas")]
    pub workers: Vec<String>,
    pub database: String,
    pub worker_logs: String,
    pub worker_persist: f64,
    pub config_check: f64,
    /// The coordinator's port.
    pub port: u16,
    /// Sync every commit to disk (SQLite `synchronous=FULL`): survives power loss, not only
    /// the death of a process.
    pub fsync: bool,
    /// Seconds between the coordinator's health checks of each worker.
    pub health_check: f64,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            workers: (5001..=5004)
                .map(|port| format!("localhost:{port}"))
                .collect(),
            database: "./weir-data/distinct".into(),
            worker_logs: "./weir-data/distinct-logs".into(),
            worker_persist: 1.0,
            config_check: 5.0,
            port: 5000,
            fsync: false,
            health_check: 1.0,
        }
    }
}

/// Keys an environment variable may set, each as `WEIR_DISTINCT_<KEY in capitals>`.
pub const KEYS: [&str; 8] = [
    "workers",
    "database",
    "worker_logs",
    "worker_persist",
    "config_check",
    "port",
    "fsync",
    "health_check",
];

/// Longest `worker_persist` or `config_check`: a typo of minutes for seconds would
/// otherwise silently mean "never".
const MAX_SECONDS: f64 = 24.0 * 3600.0;

/// Where the shards live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// A directory on this host holding one SQLite file per shard.
    Sqlite(PathBuf),
    /// A Postgres URL, for workers on several hosts.
    Postgres(String),
}

/// A worker's `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for WorkerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl WorkerAddr {
    /// `host:port` or `[ipv6]:port`; the port is 1..=65535, the host a name or an address.
    pub fn parse(text: &str) -> Result<Self, String> {
        let malformed = || format!("{text:?} is not host:port");
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, port) = rest.split_once("]:").ok_or_else(malformed)?;
            host.parse::<std::net::Ipv6Addr>()
                .map_err(|_| malformed())?;
            (host, port)
        } else {
            let (host, port) = text.rsplit_once(':').ok_or_else(malformed)?;
            let name_like = host.split('.').all(|label| {
                !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
            if !name_like {
                return Err(malformed());
            }
            (host, port)
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| format!("{text:?}: the port must be a number from 1 to 65535"))?;
        Ok(WorkerAddr {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// Whether this worker runs on this host (and so is the coordinator's to spawn).
    /// `hostname` is this machine's name.
    pub fn is_local(&self, hostname: &str) -> bool {
        match self.host.parse::<IpAddr>() {
            Ok(ip) => ip.is_loopback() || ip.is_unspecified(),
            Err(_) => self.host == "localhost" || self.host.eq_ignore_ascii_case(hostname),
        }
    }

    /// Where a local worker listens: its IP as written, loopback for `localhost`, every
    /// interface for this machine's name (other hosts reach it by that name).
    pub fn listen_addr(&self) -> SocketAddr {
        match self.host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, self.port),
            Err(_) if self.host == "localhost" => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port)
            }
            Err(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), self.port),
        }
    }

    /// The `host:port` a client on this host connects to. A local worker is reached on
    /// loopback whatever its name, so that `localhost` resolving to `::1` first, or this
    /// machine's name to an outside address, cannot miss a worker listening on 127.0.0.1.
    pub fn connect_authority(&self, hostname: &str) -> String {
        if !self.is_local(hostname) {
            return self.to_string();
        }
        match self.listen_addr().ip() {
            IpAddr::V6(ip) if !ip.is_unspecified() => format!("[{ip}]:{}", self.port),
            IpAddr::V6(_) => format!("[::1]:{}", self.port),
            IpAddr::V4(ip) if !ip.is_unspecified() => format!("{ip}:{}", self.port),
            IpAddr::V4(_) => format!("127.0.0.1:{}", self.port),
        }
    }

    /// Two spellings of one local port (`localhost:5001`, `127.0.0.1:5001`) are one worker.
    pub fn identity(&self, hostname: &str) -> (String, u16) {
        let host = if self.is_local(hostname) {
            String::new()
        } else {
            self.host.clone()
        };
        (host, self.port)
    }
}

/// The validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DistinctConfig {
    pub workers: Vec<WorkerAddr>,
    pub database: Database,
    pub worker_logs: PathBuf,
    /// The largest delay before an acknowledged item shows in the count. Workers commit
    /// before they acknowledge, so the delay is in fact the commit time; this bounds how
    /// long a worker may hold items to group them into one commit.
    pub worker_persist: Duration,
    pub config_check: Duration,
    pub port: u16,
    pub fsync: bool,
    /// How often the coordinator asks each worker `GET /healthz`.
    pub health_check: Duration,
}

impl RawConfig {
    /// Checks every key, naming the first that is wrong.
    pub fn validate(&self, hostname: &str) -> Result<DistinctConfig, ConfigError> {
        let mut workers = Vec::with_capacity(self.workers.len());
        let mut seen = HashSet::new();
        for text in &self.workers {
            let worker = WorkerAddr::parse(text.trim())
                .map_err(|msg| ConfigError::invalid("workers", msg))?;
            if worker.is_local(hostname) && worker.port == self.port {
                return Err(ConfigError::invalid(
                    "workers",
                    format!(
                        "{text:?} is on this host at the coordinator's own port {}",
                        self.port
                    ),
                ));
            }
            if !seen.insert(worker.identity(hostname)) {
                return Err(ConfigError::invalid(
                    "workers",
                    format!("{text:?} is listed twice (a worker is one host and port)"),
                ));
            }
            workers.push(worker);
        }
        if workers.is_empty() {
            return Err(ConfigError::invalid("workers", "list at least one worker"));
        }
        Ok(DistinctConfig {
            workers,
            database: database(&self.database)?,
            worker_logs: non_empty_path("worker_logs", &self.worker_logs)?,
            worker_persist: seconds("worker_persist", self.worker_persist, true)?,
            config_check: seconds("config_check", self.config_check, false)?,
            port: self.port,
            fsync: self.fsync,
            health_check: seconds("health_check", self.health_check, false)?,
        })
    }
}

fn database(text: &str) -> Result<Database, ConfigError> {
    let text = text.trim();
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        return Ok(Database::Postgres(text.to_string()));
    }
    if text.contains("://") {
        return Err(ConfigError::invalid(
            "database",
            format!("{text:?}: expected a directory or a postgres:// URL"),
        ));
    }
    non_empty_path("database", text).map(Database::Sqlite)
}

fn non_empty_path(key: &'static str, text: &str) -> Result<PathBuf, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError::invalid(key, "must name a directory"));
    }
    Ok(PathBuf::from(text))
}

fn seconds(key: &'static str, value: f64, zero_allowed: bool) -> Result<Duration, ConfigError> {
    let low_ok = if zero_allowed {
        value >= 0.0
    } else {
        value > 0.0
    };
    if !value.is_finite() || !low_ok || value > MAX_SECONDS {
        let low = if zero_allowed { "from 0" } else { "above 0" };
        return Err(ConfigError::invalid(
            key,
            format!("must be a number of seconds {low} up to {MAX_SECONDS}, got {value}"),
        ));
    }
    Ok(Duration::from_secs_f64(value))
}

fn list_or_commas<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        List(Vec<String>),
        Commas(String),
    }
    Ok(match Form::deserialize(deserializer)? {
        Form::List(list) => list,
        Form::Commas(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// Reads the layers. `env` looks a variable up by name (the process environment in
/// production, a map in tests); `flags` holds only the flags a user typed.
pub fn load_raw<F: Serialize>(
    file: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
    flags: &F,
) -> Result<RawConfig, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
    if let Some(path) = file {
        figment = figment.merge(Serialized::defaults(read_yaml(path)?));
    }
    figment
        .merge(Serialized::defaults(environment(env)))
        .merge(Serialized::defaults(flags))
        .extract()
        .map_err(|err| ConfigError::Layers(Box::new(err)))
}

/// For a reload: as [`load`], but a file that is empty (or sets no key) is refused, since
/// taking it would swap every worker and the store for the defaults.
pub fn load_for_reload<F: Serialize>(
    file: Option<&Path>,
    flags: &F,
) -> Result<DistinctConfig, ConfigError> {
    if let Some(path) = file {
        if let serde_norway::Value::Mapping(keys) = read_yaml(path)? {
            if keys.is_empty() {
                return Err(ConfigError::Empty(path.display().to_string()));
            }
        }
    }
    load(file, flags)
}

/// How a store is named in messages: a Postgres URL without its credentials.
pub fn describe_database(database: &Database) -> String {
    match database {
        Database::Sqlite(root) => root.display().to_string(),
        Database::Postgres(url) => match url.split_once('@') {
            Some((_, host)) => format!("postgres://…@{host}"),
            None => url.clone(),
        },
    }
}

/// [`load_raw`] from the process environment, then [`RawConfig::validate`].
pub fn load<F: Serialize>(file: Option<&Path>, flags: &F) -> Result<DistinctConfig, ConfigError> {
    load_raw(file, |key| std::env::var(key).ok(), flags)?.validate(&hostname())
}

/// This machine's name, for telling local workers from remote ones.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_default()
}

fn read_yaml(path: &Path) -> Result<serde_norway::Value, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let value: serde_norway::Value =
        serde_norway::from_str(&text).map_err(|source| ConfigError::Yaml {
            path: shown.clone(),
            source,
        })?;
    match value {
        serde_norway::Value::Null => Ok(serde_norway::Value::Mapping(Default::default())),
        serde_norway::Value::Mapping(_) => Ok(value),
        _ => Err(ConfigError::NotAMapping(shown)),
    }
}

fn environment(env: impl Fn(&str) -> Option<String>) -> Dict {
    KEYS.iter()
        .filter_map(|key| {
            let raw = env(&format!("WEIR_DISTINCT_{}", key.to_ascii_uppercase()))?;
            // Parsed as figment parses env values: "5" is a number, "true" a bool.
            let value: Value = raw.parse().unwrap_or_else(|_| Value::from(raw.clone()));
            Some((key.to_string(), value))
        })
        .collect()
}

/// Flags of `weir distinct worker` (the coordinator has these and more): each overrides its key.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct Flags {
    /// The YAML config file (the seed's `config.yaml` keys).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// A directory for the SQLite shards, or a postgres:// URL.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// Seconds: the largest delay before an acknowledged item shows in the count.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_persist: Option<f64>,
    /// Sync every SQLite commit to disk (survives power loss, not only process death).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fsync: Option<bool>,
}

impl Flags {
    /// The validated config: defaults < `--config` < environment < these flags.
    pub fn load(&self) -> Result<DistinctConfig, ConfigError> {
        load(self.config.as_deref(), self)
    }
}

/// Flags of `weir distinct coordinator`: the worker's, plus the keys only a coordinator reads.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct CoordinatorFlags {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: Flags,
    /// Workers, as host:port separated by commas (replaces the file's list).
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<String>>,
    /// The directory of the workers' log files, one per worker.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_logs: Option<String>,
    /// Seconds between re-reads of the config file (SIGHUP re-reads it at once).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_check: Option<f64>,
    /// Seconds between health checks of each worker.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<f64>,
    /// The coordinator's port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl CoordinatorFlags {
    /// The validated config: defaults < `--config` < environment < these flags. Run again
    /// at every reload, so flags and environment keep overriding the file.
    pub fn load(&self) -> Result<DistinctConfig, ConfigError> {
        load(self.common.config.as_deref(), self)
    }

    /// [`load`](Self::load) for a reload: an empty file is refused ([`load_for_reload`]).
    pub fn reload(&self) -> Result<DistinctConfig, ConfigError> {
        load_for_reload(self.common.config.as_deref(), self)
    }
}

/// What a reload changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// Local workers that are new: spawn them.
    pub spawn: Vec<WorkerAddr>,
    /// Local workers no longer listed: stop them gracefully (SIGTERM).
    pub stop: Vec<WorkerAddr>,
    /// Local workers listed before and after, running on unchanged settings.
    pub keep: Vec<WorkerAddr>,
    /// Local workers listed before and after whose settings changed (store, durability,
    /// persist delay, log directory): stop them gracefully, then spawn them again.
    pub restart: Vec<WorkerAddr>,
    /// Workers on other hosts: route to them and check their health, never spawn them.
    pub remote: Vec<WorkerAddr>,
}

/// The plan that takes the workers of `old` to those of `new`.
pub fn diff(old: &DistinctConfig, new: &DistinctConfig, hostname: &str) -> ReloadPlan {
    let local = |config: &DistinctConfig| -> Vec<WorkerAddr> {
        config
            .workers
            .iter()
            .filter(|w| w.is_local(hostname))
            .cloned()
            .collect()
    };
    let before = local(old);
    let after = local(new);
    let same_identity =
        |a: &WorkerAddr, b: &WorkerAddr| a.identity(hostname) == b.identity(hostname);
    let worker_settings_changed = old.database != new.database
        || old.fsync != new.fsync
        || old.worker_persist != new.worker_persist
        || old.worker_logs != new.worker_logs;
    let mut plan = ReloadPlan::default();
    for worker in &after {
        match before.iter().find(|b| same_identity(b, worker)) {
            None => plan.spawn.push(worker.clone()),
            Some(_) if worker_settings_changed => plan.restart.push(worker.clone()),
            Some(_) => plan.keep.push(worker.clone()),
        }
    }
    plan.stop = before
        .into_iter()
        .filter(|b| !after.iter().any(|a| same_identity(a, b)))
        .collect();
    plan.remote = new
        .workers
        .iter()
        .filter(|w| !w.is_local(hostname))
        .cloned()
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Serialize, Default)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    }

    fn yaml(dir: &tempfile::TempDir, body: &str) -> PathBuf {
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, body).unwrap();
        path
    }

    fn from_yaml(body: &str) -> Result<DistinctConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = yaml(&dir, body);
        load_raw(Some(&path), |_| None, &Flags::default())?.validate("box1")
    }

    fn key_of(err: ConfigError) -> String {
        match err {
            ConfigError::Invalid { key, .. } => key.to_string(),
            other => other.to_string(),
        }
    }

    #[test]
    fn a_reload_of_an_empty_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        for body in ["", "\n  \n", "{}\n", "# all commented out\n"] {
            let path = yaml(&dir, body);
            let err = load_for_reload(Some(&path), &Flags::default()).unwrap_err();
            assert!(matches!(err, ConfigError::Empty(_)), "{body:?}: {err}");
            assert!(err.to_string().contains("config.yaml"), "{err}");
        }
        let path = yaml(&dir, SEED);
        assert!(load_for_reload(Some(&path), &Flags::default()).is_ok());
    }

    const SEED: &str = "workers:\n  - localhost:5001\n  - localhost:5002\n  - localhost:5003\n  - localhost:5004\ndatabase: db/\nworker_logs: logs/\nworker_persist: 2\nconfig_check: 5\n";

    #[test]
    fn the_seed_config_loads() {
        let config = from_yaml(SEED).unwrap();
        assert_eq!(config.workers.len(), 4);
        assert_eq!(config.workers[0].to_string(), "localhost:5001");
        assert_eq!(config.database, Database::Sqlite("db/".into()));
        assert_eq!(config.worker_persist, Duration::from_secs(2));
        assert_eq!(config.config_check, Duration::from_secs(5));
        assert_eq!(config.port, 5000);
    }

    #[test]
    fn an_empty_file_means_the_defaults() {
        let config = from_yaml("").unwrap();
        assert_eq!(config, RawConfig::default().validate("box1").unwrap());
    }

    #[test]
    fn env_overrides_the_file_and_flags_override_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = yaml(&dir, SEED);
        let env: HashMap<String, String> = [
            ("WEIR_DISTINCT_WORKERS", "a:1, b:2"),
            ("WEIR_DISTINCT_WORKER_PERSIST", "0.5"),
            ("WEIR_DISTINCT_PORT", "7000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let flags = Flags { port: Some(7001) };
        let raw = load_raw(Some(&path), |k| env.get(k).cloned(), &flags).unwrap();
        let config = raw.validate("box1").unwrap();
        assert_eq!(config.workers.len(), 2);
        assert_eq!(config.worker_persist, Duration::from_millis(500));
        assert_eq!(config.port, 7001);
        assert_eq!(config.database, Database::Sqlite("db/".into()));
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let cases = [
            ("worker_persist: -1", "worker_persist"),
            ("config_check: 0", "config_check"),
            ("config_check: .nan", "config_check"),
            ("workers: [localhost]", "workers"),
            ("workers: ['localhost:0']", "workers"),
            ("workers: ['local host:80']", "workers"),
            ("workers: ['localhost:5001', '127.0.0.1:5001']", "workers"),
            ("workers: []", "workers"),
            ("database: ''", "database"),
            ("database: 'mysql://x'", "database"),
            ("worker_logs: ' '", "worker_logs"),
            ("health_check: 0", "health_check"),
            ("workers: ['localhost:5000']", "workers"),
        ];
        for (body, key) in cases {
            let err = from_yaml(body).unwrap_err();
            assert_eq!(key_of(err), key, "{body}");
        }
    }

    #[test]
    fn type_errors_and_unknown_keys_name_the_key() {
        let err = from_yaml("worker_persist: soon").unwrap_err().to_string();
        assert!(err.contains("worker_persist"), "{err}");
        let err = from_yaml("worker_persit: 2").unwrap_err().to_string();
        assert!(err.contains("worker_persit"), "{err}");
    }

    #[test]
    fn malformed_yaml_and_missing_files_are_errors() {
        assert!(matches!(
            from_yaml("workers: [").unwrap_err(),
            ConfigError::Yaml { .. }
        ));
        assert!(matches!(
            from_yaml("- a").unwrap_err(),
            ConfigError::NotAMapping(_)
        ));
        let err = load_raw(
            Some(Path::new("/nonexistent/c.yaml")),
            |_| None,
            &Flags::default(),
        );
        assert!(matches!(err.unwrap_err(), ConfigError::Read { .. }));
    }

    #[test]
    fn addresses_parse_strictly() {
        let v6 = WorkerAddr::parse("[::1]:5001").unwrap();
        assert!(v6.is_local("box1"));
        assert_eq!(v6.to_string(), "[::1]:5001");
        assert!(WorkerAddr::parse("Box1:80").unwrap().is_local("box1"));
        assert!(!WorkerAddr::parse("10.0.0.2:80").unwrap().is_local("box1"));
        for bad in [
            "",
            ":80",
            "host:",
            "host:65536",
            "http://host:80",
            "::1:80",
            "a..b:1",
        ] {
            assert!(WorkerAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_workers_listen_and_are_reached_on_loopback() {
        let named = WorkerAddr::parse("localhost:5001").unwrap();
        assert_eq!(named.listen_addr().to_string(), "127.0.0.1:5001");
        assert_eq!(named.connect_authority("box1"), "127.0.0.1:5001");
        let this_host = WorkerAddr::parse("box1:5002").unwrap();
        assert_eq!(this_host.listen_addr().to_string(), "0.0.0.0:5002");
        assert_eq!(this_host.connect_authority("box1"), "127.0.0.1:5002");
        let v6 = WorkerAddr::parse("[::1]:5003").unwrap();
        assert_eq!(v6.connect_authority("box1"), "[::1]:5003");
        let far = WorkerAddr::parse("far:5004").unwrap();
        assert_eq!(far.connect_authority("box1"), "far:5004");
    }

    fn with_workers(workers: &[&str]) -> DistinctConfig {
        RawConfig {
            workers: workers.iter().map(|w| w.to_string()).collect(),
            ..RawConfig::default()
        }
        .validate("box1")
        .unwrap()
    }

    fn names(list: &[WorkerAddr]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_reload_spawns_added_and_stops_removed_local_workers_only() {
        let old = with_workers(&["localhost:5001", "localhost:5002", "far:5001"]);
        let new = with_workers(&["127.0.0.1:5002", "localhost:5003", "far:5001", "other:5009"]);
        let plan = diff(&old, &new, "box1");
        assert_eq!(names(&plan.spawn), ["localhost:5003"]);
        assert_eq!(names(&plan.stop), ["localhost:5001"]);
        assert_eq!(names(&plan.keep), ["127.0.0.1:5002"]);
        assert!(plan.restart.is_empty());
        assert_eq!(names(&plan.remote), ["far:5001", "other:5009"]);
    }

    #[test]
    fn a_changed_store_restarts_kept_workers() {
        let old = with_workers(&["localhost:5001"]);
        let mut new = old.clone();
        new.database = Database::Sqlite("elsewhere".into());
        let plan = diff(&old, &new, "box1");
        assert_eq!(names(&plan.restart), ["localhost:5001"]);
        assert!(plan.keep.is_empty() && plan.spawn.is_empty() && plan.stop.is_empty());
    }

    #[test]
    fn an_unchanged_config_changes_nothing() {
        let config = with_workers(&["localhost:5001", "far:1"]);
        let plan = diff(&config, &config, "box1");
        assert_eq!(names(&plan.keep), ["localhost:5001"]);
        assert!(plan.spawn.is_empty() && plan.stop.is_empty() && plan.restart.is_empty());
    }
}
