//! `weir relay check`: drives any follower-maze server with a deterministic event stream and
//! verifies, byte for byte, every notification each connected user receives.
//!
//! Pure and synchronous (unit-tested beside the code):
//! - [`rng`]: SplitMix64, our own so a seed means the same stream forever.
//! - [`stream`]: the events, their 16-byte packing and line format, the shuffled batches, the
//!   choice of connected users.
//! - [`expect`]: every connected user's expected notifications, from one pass over the stream.
//! - [`verify`]: one user's received lines against its expected stream; the first divergence.
//! - [`progress`]: counters and the progress line.
//! - [`report`]: the outcome and its printed summary.
//!
//! I/O: [`net`] (source thread, client tasks) and [`run`] here, which ties them together.
//!
//! A run walks the stream twice: first to compute the expectations (stored compactly, never
//! as lines), then again, identically, while sending. That keeps memory proportional to the
//! notifications of connected users rather than to the stream.

mod expect;
mod net;
mod progress;
mod report;
mod rng;
mod stream;
mod verify;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use report::{CheckReport, Generation, UserFailure};
pub use verify::{Divergence, Missing, Received};

use net::{Client, Note, Source, SourceEnd};
use progress::{Counters, Snapshot};
use stream::StreamParams;

/// Environment variables honoured, with the names the original verification program used.
pub const ENV_KEYS: &[&str] = &[
    "totalEvents",
    "concurrencyLevel",
    "numberOfUsers",
    "randomSeed",
    "timeout",
    "maxEventSourceBatchSize",
    "logInterval",
    "eventListenerPort",
    "clientListenerPort",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CheckConfig {
    /// Where the server listens.
    pub host: String,
    pub event_listener_port: u16,
    pub client_listener_port: u16,
    /// Events sent, with sequence numbers `1..=total_events`.
    pub total_events: u64,
    /// Users that connect.
    pub concurrency_level: u32,
    /// User ids are `1..=number_of_users`; unset means `concurrency_level * 10`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number_of_users: Option<u32>,
    pub random_seed: u64,
    /// Milliseconds a client waits for a due notification before the run fails.
    pub timeout: u64,
    /// Events are sent in shuffled batches of `1..=` this many consecutive sequence numbers.
    pub max_event_source_batch_size: u32,
    /// Milliseconds between progress lines when stderr is not a terminal.
    pub log_interval: u64,
    /// Terminate lines (events and client ids) with CRLF instead of LF.
    pub crlf: bool,
    /// Follows and unfollows also name random pairs: repeated follows, unfollows of missing
    /// edges.
    pub random_pairs: bool,
    /// Milliseconds between the last client id and the first event: the protocol has no ack,
    /// and servers register clients asynchronously.
    pub settle_ms: u64,
    /// Milliseconds to keep listening for extra notifications once all expected arrived.
    pub drain_ms: u64,
    /// Generate the stream and the expectations without connecting, and report their speed.
    pub dry_run: bool,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            host: "127.0.0.1".into(),
            event_listener_port: 9090,
            client_listener_port: 9099,
            total_events: 10_000_000,
            concurrency_level: 100,
            number_of_users: None,
            random_seed: 666,
            timeout: 20_000,
            max_event_source_batch_size: 100,
            log_interval: 1_000,
            crlf: false,
            random_pairs: false,
            settle_ms: 500,
            drain_ms: 300,
            dry_run: false,
        }
    }
}

impl CheckConfig {
    pub fn users(&self) -> u32 {
        self.number_of_users
            .unwrap_or_else(|| self.concurrency_level.saturating_mul(10))
    }

    fn validate(&self) -> Result<(), CheckError> {
        let invalid = |msg: String| Err(CheckError::InvalidConfig(msg));
        if self.total_events > stream::MAX_SEQ {
            return invalid(format!("totalEvents must be at most {}", stream::MAX_SEQ));
        }
        if self.concurrency_level == 0 {
            return invalid("concurrencyLevel must be at least 1".into());
        }
        if self.users() < self.concurrency_level {
            return invalid(format!(
                "numberOfUsers ({}) must be at least concurrencyLevel ({})",
                self.users(),
                self.concurrency_level
            ));
        }
        if self.max_event_source_batch_size == 0 {
            return invalid("maxEventSourceBatchSize must be at least 1".into());
        }
        if self.timeout == 0 || self.log_interval == 0 {
            return invalid("timeout and logInterval must be at least 1 ms".into());
        }
        Ok(())
    }

    fn stream_params(&self) -> StreamParams {
        StreamParams {
            total_events: self.total_events,
            users: self.users(),
            seed: self.random_seed,
            random_pairs: self.random_pairs,
        }
    }
}

/// `weir relay check` flags; each overrides the environment and the defaults only when given.
#[derive(Debug, Clone, Default, Serialize, clap::Args)]
#[serde(rename_all = "camelCase")]
pub struct CheckFlags {
    /// Host the server listens on [default: 127.0.0.1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Event source port [env: eventListenerPort, default: 9090].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_listener_port: Option<u16>,
    /// User client port [env: clientListenerPort, default: 9099].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_listener_port: Option<u16>,
    /// Events to send [env: totalEvents, default: 10000000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_events: Option<u64>,
    /// Users that connect [env: concurrencyLevel, default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency_level: Option<u32>,
    /// User ids range over 1..=N [env: numberOfUsers, default: concurrency level x 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number_of_users: Option<u32>,
    /// Seed of the stream and of the connected users [env: randomSeed, default: 666].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random_seed: Option<u64>,
    /// Milliseconds a client waits for a due notification [env: timeout, default: 20000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Largest shuffled batch of consecutive events [env: maxEventSourceBatchSize, default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_event_source_batch_size: Option<u32>,
    /// Milliseconds between progress lines when stderr is not a terminal [env: logInterval,
    /// default: 1000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_interval: Option<u64>,
    /// End lines (events and client ids) with CRLF instead of LF.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crlf: Option<bool>,
    /// Follows and unfollows also name random pairs (repeated follows, unfollows of missing
    /// edges).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random_pairs: Option<bool>,
    /// Milliseconds between the last client id and the first event [default: 500].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settle_ms: Option<u64>,
    /// Milliseconds to listen for extra notifications after the last expected one
    /// [default: 300].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_ms: Option<u64>,
    /// Only generate the stream and the expectations, and report how fast.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

impl CheckFlags {
    pub fn load(&self) -> Result<CheckConfig, weir_runtime::config::ConfigError> {
        weir_runtime::config::load(None, ENV_KEYS, self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    // The cause is part of the message rather than a `source`, so that a printed error chain
    // does not say it twice.
    #[error("cannot resolve {host}: {error}")]
    Resolve { host: String, error: std::io::Error },
    #[error("cannot connect user {user} to {addr}: {error}")]
    ConnectClient {
        user: u32,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot connect the event source to {addr}: {error}")]
    ConnectSource {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

/// Runs one check and prints its outcome (summary on stdout, progress on stderr).
pub async fn run(config: CheckConfig, token: CancellationToken) -> Result<CheckReport, CheckError> {
    config.validate()?;
    let params = config.stream_params();
    let users =
        stream::connected_users(config.random_seed, config.users(), config.concurrency_level);
    if config.dry_run {
        let report = tokio::task::spawn_blocking(move || report::dry_run(params, &users, &config))
            .await
            .map_err(|err| CheckError::Internal(err.to_string()))?;
        println!("{report}");
        return Ok(report);
    }

    let clients_addr = resolve(&config.host, config.client_listener_port).await?;
    let events_addr = resolve(&config.host, config.event_listener_port).await?;
    let mut outcome = Outcome::new(&config);

    let computing = tokio::task::spawn_blocking(move || expect::compute(params, &users));
    let expectations = tokio::select! {
        _ = token.cancelled() => return Ok(outcome.cancelled_early()),
        done = computing => done.map_err(|err| CheckError::Internal(err.to_string()))?,
    };
    outcome.expect(&expectations, &config);

    let streams = tokio::select! {
        _ = token.cancelled() => return Ok(outcome.cancelled_early()),
        streams = net::connect_clients(clients_addr, &expectations.users, config.crlf) => streams?,
    };
    tokio::select! {
        _ = token.cancelled() => return Ok(outcome.cancelled_early()),
        _ = tokio::time::sleep(Duration::from_millis(config.settle_ms)) => {}
    }
    let source_stream = net::connect_source(events_addr).await?;
    let run = Running::start(
        &config,
        &token,
        &outcome,
        streams,
        expectations.streams,
        source_stream,
    )?;
    let report = run.finish(&config, &token, outcome).await?;
    println!("{report}");
    Ok(report)
}

/// A user's watcher task: its check and why its stream ended.
type Watcher = tokio::task::JoinHandle<(verify::UserCheck, Missing)>;

/// The tasks of a run under way: one watcher per user, the source thread, the progress line.
struct Running {
    started: Instant,
    counters: Arc<Counters>,
    stop: CancellationToken,
    watchers: Vec<Watcher>,
    notes: mpsc::UnboundedReceiver<(usize, Note)>,
    stop_source: Arc<AtomicBool>,
    source_end: oneshot::Receiver<SourceEnd>,
    source_thread: std::thread::JoinHandle<()>,
    progress_stop: CancellationToken,
    progress_task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(
        config: &CheckConfig,
        token: &CancellationToken,
        outcome: &Outcome,
        streams: Vec<tokio::net::TcpStream>,
        expected: Vec<Vec<stream::GeneratedEvent>>,
        source_stream: std::net::TcpStream,
    ) -> Result<Running, CheckError> {
        let started = Instant::now();
        let counters = Arc::new(Counters::default());
        let stop = token.child_token();
        let (watchers, notes) = spawn_watchers(config, streams, expected, &stop, &counters);
        let stop_source = Arc::new(AtomicBool::new(false));
        let (source_tx, source_end) = oneshot::channel();
        let timeout = Duration::from_millis(config.timeout);
        let source_thread = net::spawn_source(
            Source {
                stream: source_stream,
                params: config.stream_params(),
                max_batch: config.max_event_source_batch_size,
                crlf: config.crlf,
                stall: timeout,
            },
            counters.clone(),
            stop_source.clone(),
            source_tx,
        )
        .inspect_err(|_| stop.cancel())?;
        let progress_stop = CancellationToken::new();
        let progress_task = tokio::spawn(show_progress(
            counters.clone(),
            outcome.events_total,
            outcome.notifications_expected,
            started,
            Duration::from_millis(config.log_interval),
            progress_stop.clone(),
        ));
        Ok(Running {
            started,
            counters,
            stop,
            watchers,
            notes,
            stop_source,
            source_end,
            source_thread,
            progress_stop,
            progress_task,
        })
    }

    /// Waits for the run to end, stops everything, and gathers each user's verdict.
    async fn finish(
        mut self,
        config: &CheckConfig,
        token: &CancellationToken,
        mut outcome: Outcome,
    ) -> Result<CheckReport, CheckError> {
        let (source_end, finished_at) = self.wait_for_end(config, token, &mut outcome).await;
        let elapsed = finished_at.unwrap_or_else(Instant::now) - self.started;
        self.stop.cancel();
        self.stop_source
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for (slot, watcher) in self.watchers.into_iter().enumerate() {
            let (check, ending) = watcher
                .await
                .map_err(|err| CheckError::Internal(err.to_string()))?;
            outcome.received += check.received();
            if let Some(divergence) = check.finish(ending) {
                outcome.failures.push(UserFailure {
                    user: outcome.users.get(slot).copied().unwrap_or_default(),
                    divergence,
                });
            }
        }
        // Users that went wrong first, those merely cut short by the end of the run after.
        outcome
            .failures
            .sort_by_key(|f| matches!(f.divergence.received, Received::Nothing(Missing::RunEnded)));
        // The source notices the stop flag within one write poll.
        if source_end.is_none() {
            if let Ok(SourceEnd::Failed(message)) = self.source_end.await {
                outcome.source_error = Some(message);
            }
        }
        let source_thread = self.source_thread;
        let _ = tokio::task::spawn_blocking(move || source_thread.join()).await;
        self.progress_stop.cancel();
        let _ = self.progress_task.await;
        outcome.events_sent = self.counters.events_sent();
        Ok(outcome.finish(elapsed))
    }

    /// Waits for: everyone settled and the source done (then drains), a timeout, a broken
    /// source, or Ctrl-C. Returns how the source ended, if it did, and when the run finished.
    async fn wait_for_end(
        &mut self,
        config: &CheckConfig,
        token: &CancellationToken,
        outcome: &mut Outcome,
    ) -> (Option<SourceEnd>, Option<Instant>) {
        let drain_for = Duration::from_millis(config.drain_ms);
        let mut unsettled = self.watchers.len();
        let mut source_end: Option<SourceEnd> = None;
        let mut drain_until: Option<tokio::time::Instant> = None;
        let mut finished_at: Option<Instant> = None;
        let mut notes_open = true;
        loop {
            if drain_until.is_none() && unsettled == 0 && source_end.is_some() {
                finished_at = Some(Instant::now());
                drain_until = Some(tokio::time::Instant::now() + drain_for);
            }
            let drain = async {
                match drain_until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = token.cancelled() => {
                    outcome.cancelled = true;
                    break;
                }
                _ = drain => break,
                note = self.notes.recv(), if notes_open => match note {
                    Some((_, Note::Settled)) => unsettled = unsettled.saturating_sub(1),
                    Some((_, Note::TimedOut)) => break,
                    None => {
                        notes_open = false;
                        unsettled = 0;
                    }
                },
                end = &mut self.source_end, if source_end.is_none() => {
                    let end = end.unwrap_or_else(|_| SourceEnd::Failed("the source thread died".into()));
                    if end == SourceEnd::Finished {
                        outcome.source_seconds = Some(self.started.elapsed().as_secs_f64());
                    }
                    if let SourceEnd::Failed(message) = &end {
                        outcome.source_error = Some(message.clone());
                        // Let what is already on the wire arrive, then stop.
                        drain_until.get_or_insert_with(|| tokio::time::Instant::now() + drain_for);
                    }
                    source_end = Some(end);
                }
            }
        }
        (source_end, finished_at)
    }
}

/// One watcher task per connected user, each checking its stream against `expected`.
fn spawn_watchers(
    config: &CheckConfig,
    streams: Vec<tokio::net::TcpStream>,
    expected: Vec<Vec<stream::GeneratedEvent>>,
    stop: &CancellationToken,
    counters: &Arc<Counters>,
) -> (Vec<Watcher>, mpsc::UnboundedReceiver<(usize, Note)>) {
    let (notes_tx, notes) = mpsc::unbounded_channel();
    let timeout = Duration::from_millis(config.timeout);
    // 64 KiB each for a normal run; less when thousands of users connect.
    let buffer = (16 << 20) / streams.len().max(1);
    let buffer = buffer.clamp(4 << 10, 64 << 10);
    let mut watchers = Vec::with_capacity(streams.len());
    for (slot, (stream, expected)) in streams.into_iter().zip(expected).enumerate() {
        let client = Client {
            stream,
            check: verify::UserCheck::new(expected, config.crlf),
            slot,
            timeout,
            buffer,
        };
        watchers.push(tokio::spawn(net::watch_client(
            client,
            stop.clone(),
            notes_tx.clone(),
            counters.clone(),
        )));
    }
    (watchers, notes)
}

/// What a run gathers before it becomes a [`CheckReport`].
struct Outcome {
    events_total: u64,
    users: Vec<u32>,
    notifications_expected: u64,
    expected_bytes: u64,
    events_sent: u64,
    received: u64,
    failures: Vec<UserFailure>,
    source_error: Option<String>,
    source_seconds: Option<f64>,
    cancelled: bool,
}

impl Outcome {
    /// Takes in what the run expects, and says so on stderr.
    fn expect(&mut self, expectations: &expect::Expectations, config: &CheckConfig) {
        self.expected_bytes = expectations.bytes();
        self.notifications_expected = expectations.total();
        self.users = expectations.users.clone();
        eprintln!(
            "relay check: {} events, {} users connected of {}, {} notifications expected ({} held)",
            config.total_events,
            expectations.users.len(),
            config.users(),
            expectations.total(),
            progress::bytes(expectations.bytes()),
        );
    }

    fn new(config: &CheckConfig) -> Outcome {
        Outcome {
            events_total: config.total_events,
            users: Vec::new(),
            notifications_expected: 0,
            expected_bytes: 0,
            events_sent: 0,
            received: 0,
            failures: Vec::new(),
            source_error: None,
            source_seconds: None,
            cancelled: false,
        }
    }

    fn cancelled_early(mut self) -> CheckReport {
        self.cancelled = true;
        let report = self.finish(Duration::ZERO);
        println!("{report}");
        report
    }

    fn finish(self, elapsed: Duration) -> CheckReport {
        let passed = !self.cancelled
            && self.source_error.is_none()
            && self.failures.is_empty()
            && self.events_sent == self.events_total;
        CheckReport {
            passed,
            cancelled: self.cancelled,
            dry_run: false,
            events_total: self.events_total,
            events_sent: self.events_sent,
            users: self.users.len(),
            notifications_expected: self.notifications_expected,
            notifications_received: self.received,
            seconds: elapsed.as_secs_f64(),
            failures: self.failures,
            source_error: self.source_error,
            source_seconds: self.source_seconds,
            expected_bytes: self.expected_bytes,
            peak_rss_bytes: report::peak_rss_bytes(),
            generation: None,
        }
    }
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, CheckError> {
    let resolve_error = |error| CheckError::Resolve {
        host: host.to_string(),
        error,
    };
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(resolve_error)?;
    addrs.next().ok_or_else(|| {
        resolve_error(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no address",
        ))
    })
}

async fn show_progress(
    counters: Arc<Counters>,
    events_total: u64,
    notifications_total: u64,
    started: Instant,
    interval: Duration,
    stop: CancellationToken,
) {
    let tty = std::io::stderr().is_terminal();
    let period = if tty {
        interval.min(Duration::from_millis(200))
    } else {
        interval
    };
    let snapshot = || Snapshot {
        events_sent: counters.events_sent(),
        events_total,
        notifications: counters.notifications(),
        notifications_total,
        elapsed: started.elapsed(),
    };
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {
                let mut err = std::io::stderr().lock();
                let _ = if tty {
                    write!(err, "\r{}\x1b[K", progress::bar(&snapshot()))
                } else {
                    writeln!(err, "relay check: {}", progress::line(&snapshot()))
                };
                let _ = err.flush();
            }
        }
    }
    if tty {
        eprintln!("\r{}\x1b[K", progress::bar(&snapshot()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seed_defaults() {
        let config = CheckConfig::default();
        assert_eq!(config.total_events, 10_000_000);
        assert_eq!(config.concurrency_level, 100);
        assert_eq!(config.users(), 1_000);
        assert_eq!(config.random_seed, 666);
        assert_eq!(config.timeout, 20_000);
        assert_eq!(config.max_event_source_batch_size, 100);
        assert_eq!(config.log_interval, 1_000);
        assert_eq!(
            (config.event_listener_port, config.client_listener_port),
            (9090, 9099)
        );
    }

    #[test]
    fn flags_override_only_what_was_typed() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            flags: CheckFlags,
        }
        let cli = Cli::parse_from([
            "check",
            "--total-events",
            "20",
            "--concurrency-level",
            "3",
            "--crlf",
            "--max-event-source-batch-size=7",
            "--random-pairs=false",
        ]);
        let config = cli.flags.load().unwrap();
        assert_eq!(config.total_events, 20);
        assert_eq!(config.concurrency_level, 3);
        assert_eq!(config.users(), 30, "numberOfUsers follows the concurrency");
        assert!(config.crlf);
        assert!(!config.random_pairs);
        assert_eq!(config.max_event_source_batch_size, 7);
        assert_eq!(config.settle_ms, 500);
    }

    #[test]
    fn the_seed_environment_variables_sit_between_defaults_and_flags() {
        // Names unused by the other tests in this module, which may share the process.
        std::env::set_var("randomSeed", "5");
        std::env::set_var("maxEventSourceBatchSize", "9");
        let flags = CheckFlags {
            max_event_source_batch_size: Some(3),
            ..CheckFlags::default()
        };
        let config = flags.load().unwrap();
        assert_eq!(config.random_seed, 5, "the environment beats the default");
        assert_eq!(
            config.max_event_source_batch_size, 3,
            "a flag beats the environment"
        );
    }

    #[test]
    fn impossible_settings_are_refused() {
        let too_few_users = CheckConfig {
            concurrency_level: 10,
            number_of_users: Some(5),
            ..CheckConfig::default()
        };
        assert!(matches!(
            too_few_users.validate(),
            Err(CheckError::InvalidConfig(_))
        ));
        let no_batch = CheckConfig {
            max_event_source_batch_size: 0,
            ..CheckConfig::default()
        };
        assert!(no_batch.validate().is_err());
        assert!(CheckConfig::default().validate().is_ok());
    }
}
