//! The relay over real TCP on port 0, one behaviour per test.
//!
//! Synchronisation never sleeps: tests wait on the relay's own counters
//! (`RelayStats::wait_until`) or on bytes arriving, each bounded by a timeout so that a bug
//! fails the test instead of hanging it.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_relay::config::{RelayConfig, SourceMode};
use weir_relay::stats::Snapshot;
use weir_relay::{Listeners, RelayHandle};
use weir_runtime::Shutdown;

const PATIENCE: Duration = Duration::from_secs(10);

struct Relay {
    handle: Option<RelayHandle>,
    shutdown: Shutdown,
}

impl Relay {
    async fn start(config: RelayConfig) -> Relay {
        let listeners = Listeners {
            events: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            clients: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let shutdown = Shutdown::new();
        let handle = weir_relay::spawn(listeners, config, shutdown.clone()).unwrap();
        Relay {
            handle: Some(handle),
            shutdown,
        }
    }

    fn handle(&self) -> &RelayHandle {
        self.handle.as_ref().unwrap()
    }

    async fn source(&self) -> TcpStream {
        TcpStream::connect(self.handle().events_addr).await.unwrap()
    }

    /// Connects a client for `user` and waits until the relay has registered it.
    async fn client(&self, user: &str) -> TcpStream {
        let before = self.handle().stats.snapshot().clients_connected;
        let mut stream = TcpStream::connect(self.handle().clients_addr)
            .await
            .unwrap();
        stream.write_all(user.as_bytes()).await.unwrap();
        self.wait(|s| s.clients_connected > before).await;
        stream
    }

    async fn wait(&self, condition: impl Fn(&Snapshot) -> bool) -> Snapshot {
        within(self.handle().stats.wait_until(condition)).await
    }

    async fn stop(mut self) {
        self.shutdown.token.cancel();
        within(self.handle.take().unwrap().wait()).await.unwrap();
    }
}

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .expect("timed out")
}

fn config() -> RelayConfig {
    RelayConfig {
        event_listener_port: 0,
        client_listener_port: 0,
        ..RelayConfig::default()
    }
}

/// Reads until the stream holds `marker` (included) and returns everything read.
async fn read_until(stream: &mut TcpStream, marker: &str) -> String {
    let mut seen = Vec::new();
    within(async {
        let mut buf = vec![0u8; 64 * 1024];
        let marker = marker.as_bytes();
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before {marker:?}; got {:?}",
                String::from_utf8_lossy(&seen)
            );
            // Only the new bytes (and a marker's length before them) can complete the marker.
            let from = seen.len().saturating_sub(marker.len());
            seen.extend_from_slice(&buf[..n]);
            if seen[from..]
                .windows(marker.len())
                .any(|window| window == marker)
            {
                break;
            }
        }
    })
    .await;
    String::from_utf8(seen).unwrap()
}

/// Waits for the server to close `stream`.
async fn closed(stream: &mut TcpStream) {
    within(async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

#[tokio::test]
async fn events_arriving_out_of_order_are_delivered_in_order_byte_for_byte() {
    let relay = Relay::start(config()).await;
    let mut alice = relay.client("1\n").await;
    let mut bob = relay.client("2\r\n").await;
    let mut source = relay.source().await;
    // CRLF and LF mixed, out of order: 1 follows 2, 2 posts, 1 is messaged, broadcast.
    source
        .write_all(b"3|P|2|1\r\n2|S|2\n1|F|1|2\r\n4|B\n")
        .await
        .unwrap();
    assert_eq!(
        read_until(&mut alice, "4|B\n").await,
        "2|S|2\n3|P|2|1\r\n4|B\n"
    );
    assert_eq!(read_until(&mut bob, "4|B\n").await, "1|F|1|2\r\n4|B\n");
    relay.stop().await;
}

#[tokio::test]
async fn every_connection_of_a_user_receives_its_notifications() {
    let relay = Relay::start(config()).await;
    let mut first = relay.client("7\n").await;
    let mut second = relay.client(" 7 \n").await;
    let mut source = relay.source().await;
    source.write_all(b"1|P|3|7\n2|B\n").await.unwrap();
    assert_eq!(read_until(&mut first, "2|B").await, "1|P|3|7\n2|B\n");
    assert_eq!(read_until(&mut second, "2|B").await, "1|P|3|7\n2|B\n");
    relay.stop().await;
}

#[tokio::test]
async fn a_client_connecting_mid_stream_gets_only_later_notifications() {
    let relay = Relay::start(config()).await;
    let mut early = relay.client("1\n").await;
    let mut source = relay.source().await;
    // 5 follows 9 while 5 is offline: the follow is still recorded.
    source.write_all(b"1|B\n2|F|5|9\n").await.unwrap();
    read_until(&mut early, "1|B").await;
    relay.wait(|s| s.counts.events_delivered == 2).await;
    let mut late = relay.client("5\n").await;
    source.write_all(b"3|S|9\n4|B\n").await.unwrap();
    assert_eq!(read_until(&mut late, "4|B").await, "3|S|9\n4|B\n");
    relay.stop().await;
}

#[tokio::test]
async fn follows_are_a_set_and_unfollows_of_missing_edges_do_nothing() {
    let relay = Relay::start(config()).await;
    let mut follower = relay.client("1\n").await;
    let mut source = relay.source().await;
    source
        .write_all(b"1|U|1|2\n2|F|1|2\n3|F|1|2\n4|S|2\n5|U|1|2\n6|S|2\n7|B\n")
        .await
        .unwrap();
    assert_eq!(read_until(&mut follower, "7|B").await, "4|S|2\n7|B\n");
    relay.stop().await;
}

#[tokio::test]
async fn an_invalid_user_id_is_logged_counted_and_closed() {
    let relay = Relay::start(config()).await;
    let mut stream = TcpStream::connect(relay.handle().clients_addr)
        .await
        .unwrap();
    stream.write_all(b"not-a-number\n").await.unwrap();
    closed(&mut stream).await;
    relay
        .wait(|s| s.counts.clients_rejected == 1 && s.clients_connected == 0)
        .await;
    relay.stop().await;
}

#[tokio::test]
async fn clients_past_max_clients_are_refused_counted_and_the_source_still_gets_in() {
    let relay = Relay::start(RelayConfig {
        max_clients: Some(3),
        ..config()
    })
    .await;
    let mut clients = Vec::new();
    for user in 1..=3 {
        clients.push(relay.client(&format!("{user}\n")).await);
    }
    // A connection that has not sent its id yet holds a place too.
    for _ in 0..2 {
        let mut extra = TcpStream::connect(relay.handle().clients_addr)
            .await
            .unwrap();
        closed(&mut extra).await;
    }
    relay.wait(|s| s.counts.clients_refused == 2).await;
    let mut source = relay.source().await;
    source.write_all(b"1|B\n").await.unwrap();
    for client in &mut clients {
        assert_eq!(read_until(client, "1|B").await, "1|B\n");
    }
    // A place given back is a place another client can take.
    drop(clients.pop());
    relay.wait(|s| s.clients_connected == 2).await;
    let mut fourth = relay.client("4\n").await;
    source.write_all(b"2|B\n").await.unwrap();
    assert_eq!(read_until(&mut fourth, "2|B").await, "2|B\n");
    assert_eq!(relay.handle().stats.snapshot().counts.clients_refused, 2);
    relay.stop().await;
}

#[tokio::test]
async fn a_disconnected_client_is_removed_at_once() {
    let relay = Relay::start(config()).await;
    let gone = relay.client("1\n").await;
    let _stays = relay.client("2\n").await;
    drop(gone);
    relay.wait(|s| s.clients_connected == 1).await;
    relay.stop().await;
}

/// A client that sends its id and then never reads, with a tiny receive buffer so that the
/// relay's queue for it fills quickly.
async fn stuck_client(relay: &Relay, user: &str) -> TcpStream {
    let before = relay.handle().stats.snapshot().clients_connected;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    let mut stuck = socket.connect(relay.handle().clients_addr).await.unwrap();
    stuck.write_all(user.as_bytes()).await.unwrap();
    relay.wait(|s| s.clients_connected > before).await;
    stuck
}

/// Broadcasts `rounds` rounds of 50,000 events, each round read in full by `healthy` before
/// the next is sent, so only clients that do not read fall behind.
async fn broadcast_rounds(source: &mut TcpStream, healthy: &mut TcpStream, rounds: u64) {
    let per_round = 50_000u64;
    for round in 0..rounds {
        let mut lines = String::new();
        for seq in round * per_round + 1..=(round + 1) * per_round {
            lines.push_str(&format!("{seq}|B\n"));
        }
        source.write_all(lines.as_bytes()).await.unwrap();
        let last = format!("{}|B\n", (round + 1) * per_round);
        let received = read_until(healthy, &last).await;
        assert_eq!(
            received, lines,
            "round {round}: the healthy client got every broadcast"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_clients_over_the_queue_budget_are_dropped_largest_first_and_memory_returns() {
    let relay = Relay::start(RelayConfig {
        client_buffer: 4 << 20,
        max_queued_bytes: 4 << 20,
        ..config()
    })
    .await;
    let mut stuck = Vec::new();
    for user in ["1\n", "2\n", "3\n"] {
        stuck.push(stuck_client(&relay, user).await);
    }
    let mut healthy = relay.client("4\n").await;
    let mut source = relay.source().await;
    // Each stuck client is sent 8 MB. Three of them reach the 4 MiB budget together when
    // each holds a third of it, far below its own 4 MiB buffer: the largest goes, then the
    // next. The last one alone may reach its own buffer first (a slow-client drop) or the
    // budget with the healthy client's few bytes (a budget drop).
    broadcast_rounds(&mut source, &mut healthy, 20).await;
    let snapshot = relay
        .wait(|s| {
            s.counts.clients_dropped_queue_budget + s.counts.clients_dropped_slow == 3
                && s.clients_connected == 1
        })
        .await;
    assert!(
        snapshot.counts.clients_dropped_queue_budget >= 2,
        "{snapshot:?}"
    );
    for mut client in stuck {
        closed(&mut client).await;
    }
    // The dropped clients' queues are discarded, not kept: only the healthy client's
    // in-flight bytes (if any) may remain.
    source.write_all(b"1000001|B\n").await.unwrap();
    read_until(&mut healthy, "1000001|B\n").await;
    // Sessions take bytes off as they write or discard them, without waking anyone: poll.
    within(async {
        while relay.handle().stats.snapshot().queued_bytes != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_client_is_dropped_without_delaying_the_others() {
    let relay = Relay::start(RelayConfig {
        client_buffer: 1 << 20,
        ..config()
    })
    .await;
    let mut stuck = stuck_client(&relay, "1\n").await;
    let mut healthy = relay.client("2\n").await;
    let mut source = relay.source().await;
    // 8 MB for each client outgrow the stuck client's queue and socket buffers.
    broadcast_rounds(&mut source, &mut healthy, 20).await;
    let snapshot = relay.wait(|s| s.counts.clients_dropped_slow == 1).await;
    assert_eq!(snapshot.clients_connected, 1);
    closed(&mut stuck).await;
    relay.stop().await;
}

#[tokio::test]
async fn malformed_lines_are_counted_and_their_numbers_do_not_stall_the_stream() {
    let relay = Relay::start(RelayConfig {
        max_line_length: 64,
        ..config()
    })
    .await;
    let mut client = relay.client("1\n").await;
    let mut source = relay.source().await;
    let long = format!("5|S|{}\n", "1".repeat(200));
    let stream = [
        "2|X|1|1\n",   // unknown type: 2 counts as handled
        "1|B\n",       //
        "3|F|1\n",     // missing id: 3 counts as handled
        "garbage\n",   // no number at all
        "4|B|1|2|3\n", // extra fields
        long.as_str(), // over-long: 5 counts as handled
        "6|B\n",
    ]
    .concat();
    source.write_all(stream.as_bytes()).await.unwrap();
    assert_eq!(read_until(&mut client, "6|B").await, "1|B\n6|B\n");
    let snapshot = relay.wait(|s| s.counts.events_delivered == 2).await;
    assert_eq!(snapshot.counts.events_malformed, 5);
    assert_eq!(snapshot.counts.gaps_skipped, 0);
    relay.stop().await;
}

#[tokio::test]
async fn a_second_concurrent_source_is_refused_and_the_first_carries_on() {
    let relay = Relay::start(config()).await;
    let mut client = relay.client("1\n").await;
    let mut first = relay.source().await;
    first.write_all(b"1|B\n").await.unwrap();
    read_until(&mut client, "1|B").await;
    let mut second = relay.source().await;
    closed(&mut second).await;
    relay.wait(|s| s.counts.sources_refused == 1).await;
    first.write_all(b"2|B\n").await.unwrap();
    assert_eq!(read_until(&mut client, "2|B").await, "2|B\n");
    relay.stop().await;
}

#[tokio::test]
async fn in_reset_mode_a_new_source_starts_a_new_stream_with_an_empty_graph() {
    let relay = Relay::start(config()).await;
    let mut client = relay.client("1\n").await;
    let mut source = relay.source().await;
    // 1 follows 2; 4 never arrives, so 5 is held until the source leaves.
    source
        .write_all(b"1|F|1|2\n2|S|2\n3|B\n5|B\n")
        .await
        .unwrap();
    drop(source);
    assert_eq!(read_until(&mut client, "5|B").await, "2|S|2\n3|B\n5|B\n");
    let snapshot = relay.wait(|s| s.sources_connected == 0).await;
    assert_eq!(
        snapshot.counts.gaps_skipped, 1,
        "4 was skipped when the stream ended"
    );
    let mut source = relay.source().await;
    source.write_all(b"2|S|2\n1|B\n").await.unwrap();
    assert_eq!(
        read_until(&mut client, "1|B").await,
        "1|B\n",
        "the follow is gone, 1 is new"
    );
    relay.stop().await;
}

#[tokio::test]
async fn in_resume_mode_a_new_source_continues_the_stream_and_the_graph() {
    let relay = Relay::start(RelayConfig {
        source_mode: SourceMode::Resume,
        ..config()
    })
    .await;
    let mut client = relay.client("1\n").await;
    let mut source = relay.source().await;
    source.write_all(b"1|F|1|2\n2|B\n4|S|2\n").await.unwrap();
    assert_eq!(read_until(&mut client, "2|B").await, "2|B\n");
    drop(source);
    relay.wait(|s| s.sources_connected == 0).await;
    let mut source = relay.source().await;
    // 1 and 2 are old numbers now; 3 fills the gap and releases the held 4.
    source.write_all(b"1|B\n3|B\n").await.unwrap();
    assert_eq!(read_until(&mut client, "4|S|2").await, "3|B\n4|S|2\n");
    let snapshot = relay.wait(|s| s.counts.events_stale == 1).await;
    assert_eq!(snapshot.counts.gaps_skipped, 0);
    relay.stop().await;
}

#[tokio::test]
async fn in_resume_mode_a_source_is_told_where_the_stream_continues() {
    let relay = Relay::start(RelayConfig {
        source_mode: SourceMode::Resume,
        ..config()
    })
    .await;
    let mut source = relay.source().await;
    assert_eq!(read_until(&mut source, "\n").await, "next|1\n");
    // 3 is held behind the missing 2 when the source leaves: 2 is where it continues.
    source.write_all(b"1|B\n3|B\n").await.unwrap();
    relay.wait(|s| s.counts.events_received == 2).await;
    drop(source);
    relay.wait(|s| s.sources_connected == 0).await;
    let mut source = relay.source().await;
    assert_eq!(read_until(&mut source, "\n").await, "next|2\n");
    relay.stop().await;
}

fn state_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("relay.state")
}

#[tokio::test]
async fn the_state_file_carries_the_stream_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let with_state = || RelayConfig {
        state_file: Some(state_path(&dir)),
        source_mode: SourceMode::Resume,
        ..config()
    };

    let relay = Relay::start(with_state()).await;
    let mut client = relay.client("1\n").await;
    let mut source = relay.source().await;
    source.write_all(b"1|F|1|2\n2|B\n").await.unwrap();
    read_until(&mut client, "2|B").await;
    relay.stop().await;
    drop((client, source));

    let relay = Relay::start(with_state()).await;
    let mut client = relay.client("1\n").await;
    let mut source = relay.source().await;
    // 1 and 2 were handled before the restart; the follow of 2 by 1 survived.
    source.write_all(b"1|B\n3|S|2\n4|B\n").await.unwrap();
    assert_eq!(read_until(&mut client, "4|B").await, "3|S|2\n4|B\n");
    relay.stop().await;
}

#[tokio::test]
async fn a_full_window_skips_the_missing_number_instead_of_growing() {
    let relay = Relay::start(RelayConfig {
        max_window: 3,
        ..config()
    })
    .await;
    let mut client = relay.client("1\n").await;
    let mut source = relay.source().await;
    // 1 never comes; 4 does not fit behind it in a window of 3.
    source.write_all(b"2|B\n3|B\n4|B\n").await.unwrap();
    assert_eq!(read_until(&mut client, "4|B").await, "2|B\n3|B\n4|B\n");
    let snapshot = relay.wait(|s| s.counts.events_delivered == 3).await;
    assert_eq!(snapshot.counts.gaps_skipped, 1);
    assert_eq!(snapshot.reorder_window, 0);
    relay.stop().await;
}

#[tokio::test]
async fn a_gap_older_than_the_gap_timeout_is_skipped() {
    let relay = Relay::start(RelayConfig {
        gap_timeout_ms: Some(50),
        ..config()
    })
    .await;
    let mut client = relay.client("1\n").await;
    let mut source = relay.source().await;
    source.write_all(b"1|B\n3|B\n").await.unwrap();
    // The source stays connected: only the timeout can release 3.
    assert_eq!(read_until(&mut client, "3|B").await, "1|B\n3|B\n");
    assert_eq!(
        relay
            .wait(|s| s.counts.gaps_skipped == 1)
            .await
            .counts
            .events_delivered,
        2
    );
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn every_gap_whose_later_events_waited_the_timeout_is_given_up_at_once() {
    let timeout = Duration::from_millis(500);
    let relay = Relay::start(RelayConfig {
        gap_timeout_ms: Some(timeout.as_millis() as u64),
        ..config()
    })
    .await;
    let mut client = relay.client("1\n").await;
    let mut source = relay.source().await;
    // Twenty gaps: every odd number up to 39 is missing, and the source stays connected.
    let lines: String = (1..=20).map(|n| format!("{}|B\n", 2 * n)).collect();
    source.write_all(lines.as_bytes()).await.unwrap();
    relay.wait(|s| s.reorder_window == 20).await;
    // Time is paused: it moves only to the relay's next timer, so this is virtual time.
    let held = tokio::time::Instant::now();
    assert_eq!(read_until(&mut client, "40|B").await, lines);
    let waited = held.elapsed();
    assert!(
        waited < 2 * timeout,
        "twenty gaps took {waited:?}: one timeout each instead of one for all"
    );
    let snapshot = relay.wait(|s| s.counts.events_delivered == 20).await;
    assert_eq!(snapshot.counts.gaps_skipped, 20);
    relay.stop().await;
}

#[tokio::test]
async fn without_a_gap_timeout_a_connected_source_keeps_the_gap_open() {
    let relay = Relay::start(config()).await;
    let mut client = relay.client("1\n").await;
    let mut source = relay.source().await;
    source.write_all(b"1|B\n3|B\n").await.unwrap();
    read_until(&mut client, "1|B").await;
    let snapshot = relay.wait(|s| s.counts.events_received == 2).await;
    assert_eq!(
        (snapshot.reorder_window, snapshot.counts.gaps_skipped),
        (1, 0)
    );
    source.write_all(b"2|B\n").await.unwrap();
    assert_eq!(read_until(&mut client, "3|B").await, "2|B\n3|B\n");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_delivery_writes_everything_queued_then_closes_clients() {
    let relay = Relay::start(RelayConfig {
        client_buffer: 16 << 20,
        max_queued_bytes: 16 << 20,
        ..config()
    })
    .await;
    // Not read until the relay has stopped, with a tiny receive window, so most of its
    // notifications are still queued in the relay when shutdown begins.
    let mut client = stuck_client(&relay, "1\n").await;
    let mut source = relay.source().await;
    let total = 200_000u64;
    let mut lines = String::new();
    for seq in 1..=total {
        lines.push_str(&format!("{seq}|B\n"));
    }
    source.write_all(lines.as_bytes()).await.unwrap();
    let snapshot = relay.wait(|s| s.counts.events_delivered == total).await;
    assert!(
        snapshot.queued_bytes > 0,
        "shutdown must begin with notifications still queued: {snapshot:?}"
    );
    relay.stop().await;
    let mut all = String::new();
    within(client.read_to_string(&mut all)).await.unwrap();
    assert!(
        all == lines,
        "every queued notification was written, in order, before the close"
    );
}

#[tokio::test]
async fn a_line_cut_off_by_the_source_disconnecting_is_malformed_not_delivered() {
    let relay = Relay::start(config()).await;
    let mut five = relay.client("5\n").await;
    let mut source = relay.source().await;
    // `2|P|2|5` is the start of a message for 50, not a message for 5.
    source.write_all(b"1|P|1|50\n2|P|2|5").await.unwrap();
    drop(source);
    let snapshot = relay
        .wait(|s| s.counts.events_malformed == 1 && s.sources_connected == 0)
        .await;
    assert_eq!(snapshot.counts.events_delivered, 1);
    let mut source = relay.source().await;
    source.write_all(b"1|P|3|5\n").await.unwrap();
    assert_eq!(
        read_until(&mut five, "1|P|3|5\n").await,
        "1|P|3|5\n",
        "nothing of the cut-off line reached 5"
    );
    relay.stop().await;
}

#[tokio::test]
async fn one_implausibly_far_number_is_refused_and_the_stream_carries_on() {
    let relay = Relay::start(config()).await;
    let mut client = relay.client("1\n").await;
    let mut source = relay.source().await;
    let mut lines = String::from("1|B\n1000000000000|B\n");
    for seq in 2..=1000 {
        lines.push_str(&format!("{seq}|B\n"));
    }
    source.write_all(lines.as_bytes()).await.unwrap();
    let received = read_until(&mut client, "\n1000|B\n").await;
    assert_eq!(received.lines().count(), 1000);
    assert!(!received.contains("1000000000000|B"));
    let snapshot = relay.wait(|s| s.counts.events_delivered == 1000).await;
    assert_eq!(snapshot.counts.events_too_far_ahead, 1);
    assert_eq!(snapshot.counts.events_stale, 0);
    assert_eq!(snapshot.counts.gaps_skipped, 0);
    relay.stop().await;
}

#[tokio::test]
async fn a_state_file_in_reset_mode_is_refused_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let listeners = Listeners {
        events: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        clients: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let config = RelayConfig {
        state_file: Some(state_path(&dir)),
        source_mode: SourceMode::Reset,
        ..config()
    };
    let Err(err) = weir_relay::spawn(listeners, config, Shutdown::new()) else {
        panic!("a state file in reset mode started");
    };
    assert!(err.to_string().contains("stateFile"), "{err}");
}

#[tokio::test]
async fn a_second_relay_on_the_same_state_file_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let with_state = || RelayConfig {
        state_file: Some(state_path(&dir)),
        source_mode: SourceMode::Resume,
        ..config()
    };
    let first = Relay::start(with_state()).await;
    let listeners = Listeners {
        events: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        clients: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let Err(err) = weir_relay::spawn(listeners, with_state(), Shutdown::new()) else {
        panic!("two relays share one state file");
    };
    let message = err.to_string();
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    first.stop().await;
    Relay::start(with_state()).await.stop().await;
}

#[tokio::test]
async fn the_last_state_is_written_at_shutdown_even_between_intervals() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(RelayConfig {
        state_file: Some(state_path(&dir)),
        source_mode: SourceMode::Resume,
        state_interval_ms: 3_600_000,
        ..config()
    })
    .await;
    let mut source = relay.source().await;
    source.write_all(b"1|F|1|2\n2|B\n3|F|3|2\n").await.unwrap();
    relay.wait(|s| s.counts.events_delivered == 3).await;
    relay.stop().await;
    let saved = weir_relay::state::load(&state_path(&dir)).unwrap().unwrap();
    assert_eq!(saved.next_sequence, 4);
    assert_eq!(saved.follows, vec![(1, 2), (3, 2)]);
}

/// Everything logged on this thread while it lives. Tests on the default (current-thread)
/// runtime run the relay's tasks on this thread too.
struct CapturedLogs {
    text: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl CapturedLogs {
    fn start() -> CapturedLogs {
        let text = Arc::new(Mutex::new(Vec::new()));
        let sink = text.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || SharedWriter(sink.clone()))
            .finish();
        CapturedLogs {
            text,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap()).into_owned()
    }
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn client_logs_are_rate_limited_and_show_input_escaped() {
    let logs = CapturedLogs::start();
    let relay = Relay::start(config()).await;
    let started = Instant::now();
    let attempts = 50;
    for _ in 0..attempts {
        let mut stream = TcpStream::connect(relay.handle().clients_addr)
            .await
            .unwrap();
        stream.write_all(b"\x1b[31mevil\r\n").await.unwrap();
        closed(&mut stream).await;
    }
    relay.wait(|s| s.counts.clients_rejected == attempts).await;
    // Ten lines a second at most, whatever the number of bad clients.
    let allowed = 10 * (started.elapsed().as_secs() as usize + 1);
    let mut source = relay.source().await;
    source.write_all(b"1|B\n1|B\n").await.unwrap();
    relay.wait(|s| s.counts.events_stale == 1).await;
    relay.stop().await;
    let text = logs.text();
    let invalid = text
        .lines()
        .filter(|line| line.contains("invalid user id"))
        .count();
    assert!((1..=allowed).contains(&invalid), "{invalid} lines:\n{text}");
    assert!(
        !text.contains('\x1b'),
        "a raw escape reached the log:\n{text}"
    );
    assert!(text.contains("\\u{1b}[31mevil"), "{text}");
    assert!(
        text.contains("already handled"),
        "stale events are logged:\n{text}"
    );
}

/// The value of the first sample of the global recorder's page whose line starts with
/// `series` followed by a space.
fn sample(series: &str) -> Option<f64> {
    let page = weir_runtime::telemetry::prometheus().render();
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn held_events_age_in_the_gauge_and_their_wait_is_sampled_when_released() {
    let relay = Relay::start(config()).await;
    let mut source = relay.source().await;
    // A sampled number, held while every number before it is missing.
    let sampled = weir_relay::delivery::SAMPLE_EVERY;
    source
        .write_all(format!("{sampled}|B\n").as_bytes())
        .await
        .unwrap();
    relay.wait(|s| s.reorder_window == 1).await;
    // Nothing else arrives, yet the age keeps growing.
    let snapshot = relay.wait(|s| s.reorder_oldest_ms >= 1_000).await;
    assert_eq!(snapshot.reorder_window, 1);
    let held_for = Instant::now();
    let lines: String = (1..sampled).map(|seq| format!("{seq}|B\n")).collect();
    source.write_all(lines.as_bytes()).await.unwrap();
    let snapshot = relay
        .wait(|s| s.counts.events_delivered == sampled && s.reorder_window == 0)
        .await;
    assert_eq!(snapshot.reorder_oldest_ms, 0);
    assert!(held_for.elapsed() < Duration::from_secs(5));
    let sampled = sample("weir_relay_delivery_seconds_count").expect("a delivery sample");
    assert!(sampled >= 1.0, "{sampled}");
    let longest = sample("weir_relay_delivery_seconds{quantile=\"1\"}").expect("quantile 1");
    assert!(
        longest >= 1.0,
        "64 waited over a second, the histogram says {longest}"
    );
    relay.stop().await;
}
