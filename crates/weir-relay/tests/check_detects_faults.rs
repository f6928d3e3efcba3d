//! `weir relay check` against a small reference relay written here, and against deliberately
//! broken variants of it: the check must pass on the first, and on each of the others fail
//! at exactly the place the relay went wrong.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weir_relay::check::{self, CheckConfig, CheckReport, Missing, Received};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    /// Skip the n-th notification (1-based, counted over all users in delivery order).
    Drop(usize),
    /// Deliver the n-th notification after the next one for the same user.
    Swap(usize),
    /// Send the n-th notification twice.
    Duplicate(usize),
    /// No reordering: apply events as they arrive.
    ArrivalOrder,
    /// Deliver nothing after the n-th notification.
    StopAfter(usize),
}

/// What a faulty relay did, for the assertions: the user, the position in that user's correct
/// stream, the line concerned, and the line that user got in its place (if any).
#[derive(Debug, Clone, Default)]
struct Sabotage {
    user: u32,
    index: usize,
    line: String,
    replaced_by: Option<String>,
}

type Registry = Arc<Mutex<BTreeMap<u32, mpsc::UnboundedSender<Vec<u8>>>>>;

struct Relay {
    events_port: u16,
    clients_port: u16,
    sabotage: Arc<Mutex<Option<Sabotage>>>,
}

async fn start_relay(fault: Fault, first_event: Option<CancellationToken>) -> Relay {
    let events = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let clients = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = Relay {
        events_port: events.local_addr().unwrap().port(),
        clients_port: clients.local_addr().unwrap().port(),
        sabotage: Arc::default(),
    };
    let registry: Registry = Arc::default();

    let accepting = registry.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = clients.accept().await {
            let registry = accepting.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut id = String::new();
                BufReader::new(read).read_line(&mut id).await.unwrap();
                let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
                registry
                    .lock()
                    .unwrap()
                    .insert(id.trim().parse().unwrap(), tx);
                while let Some(bytes) = rx.recv().await {
                    if write.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            });
        }
    });

    let mut dispatcher = Dispatcher {
        fault,
        registry,
        sabotage: relay.sabotage.clone(),
        next: 1,
        pending: BTreeMap::new(),
        followers: HashMap::new(),
        delivered: HashMap::new(),
        count: 0,
        held: None,
    };
    tokio::spawn(async move {
        let (stream, _) = events.accept().await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).await.unwrap() > 0 {
            if let Some(token) = &first_event {
                token.cancel();
            }
            dispatcher.receive(std::mem::take(&mut line));
        }
    });
    relay
}

struct Dispatcher {
    fault: Fault,
    registry: Registry,
    sabotage: Arc<Mutex<Option<Sabotage>>>,
    next: u64,
    pending: BTreeMap<u64, Vec<u8>>,
    followers: HashMap<u32, BTreeSet<u32>>,
    /// Notifications each user should have had so far: its position in its correct stream.
    delivered: HashMap<u32, usize>,
    count: usize,
    held: Option<(u32, Vec<u8>)>,
}

impl Dispatcher {
    fn receive(&mut self, line: Vec<u8>) {
        if self.fault == Fault::ArrivalOrder {
            return self.apply(line);
        }
        let text = String::from_utf8_lossy(&line);
        let seq: u64 = text.split('|').next().unwrap().parse().unwrap();
        self.pending.insert(seq, line);
        while let Some(line) = self.pending.remove(&self.next) {
            self.next += 1;
            self.apply(line);
        }
    }

    fn apply(&mut self, line: Vec<u8>) {
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let fields: Vec<&str> = text.split('|').collect();
        let id = |i: usize| -> u32 { fields[i].parse().unwrap() };
        let recipients: Vec<u32> = match fields[1] {
            "F" => {
                self.followers.entry(id(3)).or_default().insert(id(2));
                vec![id(3)]
            }
            "U" => {
                if let Some(set) = self.followers.get_mut(&id(3)) {
                    set.remove(&id(2));
                }
                vec![]
            }
            "B" => self.registry.lock().unwrap().keys().copied().collect(),
            "P" => vec![id(3)],
            "S" => self
                .followers
                .get(&id(2))
                .map(|set| set.iter().copied().collect())
                .unwrap_or_default(),
            other => panic!("unknown event kind {other}"),
        };
        for user in recipients {
            self.notify(user, &line);
        }
    }

    fn notify(&mut self, user: u32, line: &[u8]) {
        let Some(tx) = self.registry.lock().unwrap().get(&user).cloned() else {
            return;
        };
        self.count += 1;
        let index = *self
            .delivered
            .entry(user)
            .and_modify(|i| *i += 1)
            .or_insert(1)
            - 1;
        let text = String::from_utf8_lossy(line).into_owned();
        let mut sabotage = self.sabotage.lock().unwrap();
        if let Some(s) = sabotage.as_mut() {
            if s.user == user && s.replaced_by.is_none() {
                s.replaced_by = Some(text.clone());
            }
        }
        let record = || {
            Some(Sabotage {
                user,
                index,
                line: text.clone(),
                replaced_by: None,
            })
        };
        match self.fault {
            Fault::Drop(n) if n == self.count => *sabotage = record(),
            Fault::Swap(n) if n == self.count => {
                *sabotage = record();
                self.held = Some((user, line.to_vec()));
            }
            Fault::StopAfter(n) if self.count > n => {}
            _ => {
                let _ = tx.send(line.to_vec());
                if let Fault::Duplicate(n) = self.fault {
                    if n == self.count {
                        *sabotage = record();
                        let _ = tx.send(line.to_vec());
                    }
                }
                if self.held.as_ref().is_some_and(|(held, _)| *held == user) {
                    if let Some((_, held)) = self.held.take() {
                        let _ = tx.send(held);
                    }
                }
            }
        }
    }
}

fn config(relay: &Relay) -> CheckConfig {
    CheckConfig {
        event_listener_port: relay.events_port,
        client_listener_port: relay.clients_port,
        total_events: 20_000,
        concurrency_level: 20,
        timeout: 2_000,
        settle_ms: 200,
        drain_ms: 300,
        log_interval: 60_000,
        ..CheckConfig::default()
    }
}

async fn check_against(
    fault: Fault,
    tweak: impl FnOnce(&mut CheckConfig),
) -> (CheckReport, Option<Sabotage>) {
    let relay = start_relay(fault, None).await;
    let mut config = config(&relay);
    tweak(&mut config);
    let report = check::run(config, CancellationToken::new()).await.unwrap();
    let sabotage = relay.sabotage.lock().unwrap().clone();
    (report, sabotage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_relay_passes() {
    let (report, _) = check_against(Fault::None, |_| {}).await;
    assert!(report.passed, "{report}");
    assert_eq!(report.events_sent, 20_000);
    assert_eq!(report.users, 20);
    assert!(report.notifications_expected > 300, "{report}");
    assert_eq!(report.notifications_received, report.notifications_expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_relay_passes_with_crlf_random_pairs_and_unbatched_order() {
    let (report, _) = check_against(Fault::None, |c| {
        c.crlf = true;
        c.random_pairs = true;
        c.random_seed = 7;
        c.max_event_source_batch_size = 1;
    })
    .await;
    assert!(report.passed, "{report}");
    let (report, _) = check_against(Fault::None, |c| c.max_event_source_batch_size = 1_000).await;
    assert!(report.passed, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_notification_is_reported_where_it_was_due() {
    let (report, sabotage) = check_against(Fault::Drop(100), |_| {}).await;
    let sabotage = sabotage.expect("the relay dropped one notification");
    assert!(!report.passed, "{report}");
    assert_eq!(report.failures.len(), 1, "{report}");
    let failure = &report.failures[0];
    assert_eq!(failure.user, sabotage.user);
    assert_eq!(failure.divergence.index, sabotage.index);
    assert_eq!(
        failure.divergence.expected.as_deref(),
        Some(sabotage.line.as_str())
    );
    let received = match sabotage.replaced_by {
        Some(next) => Received::Line(next),
        None => Received::Nothing(Missing::Timeout { ms: 2_000 }),
    };
    assert_eq!(failure.divergence.received, received, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_notifications_are_reported_at_the_first_of_the_two() {
    let (report, sabotage) = check_against(Fault::Swap(100), |_| {}).await;
    let sabotage = sabotage.expect("the relay held one notification back");
    let next = sabotage
        .replaced_by
        .clone()
        .expect("the user had a later notification");
    assert!(!report.passed, "{report}");
    assert_eq!(report.failures.len(), 1, "{report}");
    let failure = &report.failures[0];
    assert_eq!(failure.user, sabotage.user);
    assert_eq!(failure.divergence.index, sabotage.index);
    assert_eq!(
        failure.divergence.expected.as_deref(),
        Some(sabotage.line.as_str())
    );
    assert_eq!(failure.divergence.received, Received::Line(next));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_is_reported_right_after_the_original() {
    let (report, sabotage) = check_against(Fault::Duplicate(100), |_| {}).await;
    let sabotage = sabotage.expect("the relay sent one notification twice");
    assert!(!report.passed, "{report}");
    assert_eq!(report.failures.len(), 1, "{report}");
    let failure = &report.failures[0];
    assert_eq!(failure.user, sabotage.user);
    assert_eq!(failure.divergence.index, sabotage.index + 1);
    assert_eq!(failure.divergence.received, Received::Line(sabotage.line));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extra_notification_after_the_last_is_caught_by_the_drain() {
    // One user gets a line twice at the very end of its stream: only the drain can see it.
    let (report, _) = check_against(Fault::None, |_| {}).await;
    let last = report.notifications_expected as usize;
    let (report, sabotage) = check_against(Fault::Duplicate(last), |_| {}).await;
    let sabotage = sabotage.expect("the relay duplicated the last notification");
    assert!(!report.passed, "{report}");
    let failure = &report.failures[0];
    assert_eq!(failure.user, sabotage.user);
    assert_eq!(failure.divergence.index, sabotage.index + 1);
    assert_eq!(failure.divergence.expected, None, "{report}");
    assert_eq!(failure.divergence.received, Received::Line(sabotage.line));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivering_in_arrival_order_fails() {
    let (report, _) = check_against(Fault::ArrivalOrder, |_| {}).await;
    assert!(!report.passed, "{report}");
    assert!(report.failures.len() > 5, "{report}");
    assert!(report
        .failures
        .iter()
        .all(|f| matches!(f.divergence.received, Received::Line(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_goes_quiet_times_out() {
    let (report, _) = check_against(Fault::StopAfter(50), |c| c.timeout = 500).await;
    assert!(!report.passed, "{report}");
    assert!(
        report
            .failures
            .iter()
            .any(|f| f.divergence.received == Received::Nothing(Missing::Timeout { ms: 500 })),
        "{report}"
    );
    assert!(report
        .to_string()
        .contains("nothing within timeout (500 ms)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_reports_what_was_seen_and_does_not_pass() {
    let token = CancellationToken::new();
    let relay = start_relay(Fault::StopAfter(0), Some(token.clone())).await;
    let mut config = config(&relay);
    config.timeout = 60_000;
    let report = check::run(config, token).await.unwrap();
    assert!(report.cancelled);
    assert!(!report.passed, "{report}");
    assert!(report.to_string().starts_with("CANCELLED"));
}

#[tokio::test]
async fn nobody_listening_is_an_error_not_a_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let config = CheckConfig {
        event_listener_port: port,
        client_listener_port: port,
        total_events: 10,
        concurrency_level: 2,
        ..CheckConfig::default()
    };
    let err = check::run(config, CancellationToken::new()).await.err();
    assert!(
        matches!(err, Some(check::CheckError::ConnectClient { .. })),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_dry_run_connects_nowhere_and_expects_what_a_real_run_expects() {
    let config = CheckConfig {
        event_listener_port: 1,
        client_listener_port: 1,
        total_events: 20_000,
        concurrency_level: 20,
        dry_run: true,
        ..CheckConfig::default()
    };
    let report = check::run(config, CancellationToken::new()).await.unwrap();
    assert!(report.passed && report.dry_run, "{report}");
    assert_eq!(report.events_sent, 0);
    let generation = report.generation.clone().expect("dry runs time generation");
    assert!(generation.stream_bytes > 20_000 * 8, "{report}");
    // The same settings against the reference relay expect the same notifications.
    let (real, _) = check_against(Fault::None, |_| {}).await;
    assert_eq!(real.notifications_expected, report.notifications_expected);
}
