//! Slow and idle clients cannot take the API down: a slowloris crowd, idle keep-alives and
//! a trickled body are all cut off after their timeouts, and real requests are answered
//! while they last.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_increments::Role;

const KEY: &str = "0b7c2f4e-8d1a-4f3b-9c6e-5a2d7e9f1b3c";
const TIMEOUT_MS: u64 = 600;
/// How long past its timeout a slow connection may still be open: scheduling on a busy
/// two-core machine, not a second allowance.
const SLACK: Duration = Duration::from_secs(3);

/// Writes `head` a byte at a time until the server closes the connection; returns how
/// long the connection lived.
async fn slowloris(stream: TcpStream, head: &'static [u8]) -> Duration {
    let started = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let trickle = async move {
        for byte in head.iter().cycle() {
            if writer.write_all(std::slice::from_ref(byte)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = trickle => {}
        _ = wait_closed(&mut reader) => {}
    }
    started.elapsed()
}

async fn wait_closed(reader: &mut tokio::net::tcp::OwnedReadHalf) {
    let mut buf = [0u8; 512];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

async fn idle(stream: TcpStream) -> Duration {
    let started = Instant::now();
    let (mut reader, _writer) = stream.into_split();
    wait_closed(&mut reader).await;
    started.elapsed()
}

/// `/healthz` answers within a second. Its connection is accepted after every connection
/// opened before it, so this also paces the crowd to what the listen backlog holds.
async fn assert_healthy(addr: SocketAddr) {
    let health = tokio::time::timeout(
        Duration::from_secs(1),
        request(addr, "GET", "/healthz", &[], b""),
    )
    .await
    .expect("/healthz answered during the attack");
    assert_eq!(health.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_crowd_does_not_stop_the_api_and_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path());
    config.header_timeout_ms = TIMEOUT_MS;
    config.idle_timeout_ms = TIMEOUT_MS;
    config.body_timeout_ms = TIMEOUT_MS;
    let server = start(config, Role::Serve).await;
    let addr = server.addr;

    let mut slow = Vec::new();
    for batch in 0..10 {
        for _ in 0..30 {
            let stream = TcpStream::connect(addr).await.unwrap();
            slow.push(tokio::spawn(slowloris(
                stream,
                b"POST /increment HTTP/1.1\r\nHost: x\r\nX-Padding: ",
            )));
        }
        for _ in 0..20 {
            let stream = TcpStream::connect(addr).await.unwrap();
            slow.push(tokio::spawn(idle(stream)));
        }
        if batch == 0 {
            // Headers complete, then a chunked body one byte per 100 ms, forever.
            let stream = TcpStream::connect(addr).await.unwrap();
            slow.push(tokio::spawn(slowloris(
                stream,
                b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n \r\n",
            )));
        }
        assert_healthy(addr).await;
    }

    // With the whole crowd connected, real requests are still answered at once.
    for _ in 0..5 {
        assert_healthy(addr).await;
        let accepted = tokio::time::timeout(Duration::from_secs(1), post_increment(addr, KEY, 1))
            .await
            .expect("/increment answered during the attack");
        assert_eq!(accepted.status, 202, "{}", accepted.body);
    }

    let limit = Duration::from_millis(TIMEOUT_MS) + SLACK;
    for (index, connection) in slow.into_iter().enumerate() {
        let lived = tokio::time::timeout(limit + SLACK, connection)
            .await
            .unwrap_or_else(|_| panic!("slow connection {index} was never closed"))
            .unwrap();
        assert!(
            lived >= Duration::from_millis(TIMEOUT_MS / 2),
            "connection {index} closed after only {lived:?}"
        );
        assert!(lived <= limit, "connection {index} lived {lived:?}");
    }
    wait_for_total(addr, KEY, 5).await;
    server.stop().await;
}
