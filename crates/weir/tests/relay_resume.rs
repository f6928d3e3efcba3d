//! A resuming source after the relay is killed with SIGKILL: the relay tells the source where
//! the stream continues, the source sends everything from there, and nothing stalls or is
//! lost, follows included.

mod relay_common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

use relay_common::{client, connect, free_port, read_until, wait_for_sample, RelayProcess};

/// User 100 follows every multiple of 3 (`3k|F|100|3k`), each of those users then posts a
/// status (`3k+1|S|3k`), and user 1 messages 100 (`3k+2|P|1|100`). So 100 is notified of
/// every number that is not a multiple of 3 (but 1, a status of user 0, whom nobody follows),
/// and every status reaches it only if the follow just before it was applied.
fn event(seq: u64) -> String {
    match seq % 3 {
        0 => format!("{seq}|F|100|{seq}\n"),
        1 => format!("{seq}|S|{}\n", seq - 1),
        _ => format!("{seq}|P|1|100\n"),
    }
}

fn events(from: u64, to: u64) -> String {
    (from..=to).map(event).collect()
}

/// What user 100 receives of the events `from..=to`.
fn notifications(from: u64, to: u64) -> String {
    (from..=to)
        .filter(|seq| seq % 3 != 0 && *seq != 1)
        .map(event)
        .collect()
}

/// Connects a source and reads the relay's first line: where the stream continues.
fn resuming_source(relay: &RelayProcess) -> (TcpStream, u64) {
    let source = connect(relay.events);
    let mut line = String::new();
    BufReader::new(source.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    let next = line
        .strip_prefix("next|")
        .and_then(|rest| rest.strip_suffix('\n'))
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no position line from the relay: {line:?}"));
    (source, next)
}

/// A relay with its metrics page, and user 100 connected to it.
fn start(args: &[&str]) -> (RelayProcess, TcpStream) {
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut all = args.to_vec();
    all.extend(["--metrics-addr", &metrics_addr]);
    let relay = RelayProcess::start(&all, None);
    let user = client(relay.clients, 100);
    wait_for_sample(metrics_port, "weir_relay_clients_connected", 1);
    (relay, user)
}

#[test]
fn after_a_kill_9_the_source_learns_the_saved_position_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("relay.state");
    let state = state.to_str().unwrap();
    // Saved only when it stops cleanly: the file is as far behind as a kill -9 can leave it.
    let args = [
        "--source-mode",
        "resume",
        "--state-file",
        state,
        "--state-interval-ms",
        "3600000",
    ];

    // Each run ends on a message to 100, so once 100 has it every event sent was handled.
    let (relay, mut user) = start(&args);
    let (mut source, next) = resuming_source(&relay);
    assert_eq!(next, 1, "a new stream");
    source.write_all(events(1, 599).as_bytes()).unwrap();
    assert_eq!(read_until(&mut user, "599|P"), notifications(1, 599));
    relay.stop();

    let (relay, mut user) = start(&args);
    let (mut source, next) = resuming_source(&relay);
    assert_eq!(next, 600, "saved on the clean stop");
    source.write_all(events(600, 1499).as_bytes()).unwrap();
    assert_eq!(read_until(&mut user, "1499|P"), notifications(600, 1499));
    relay.kill9();

    // The file still says 600: the 900 events handled before the kill are not in it.
    let (relay, mut user) = start(&args);
    let (mut source, next) = resuming_source(&relay);
    assert_eq!(next, 600);
    source.write_all(events(next, 3000).as_bytes()).unwrap();
    // The statuses of 600..=1499 reach 100 only if their follows, sent again, were applied.
    assert_eq!(read_until(&mut user, "2999|P"), notifications(next, 3000));
    relay.stop();
}
