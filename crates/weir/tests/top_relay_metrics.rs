//! What `weir top` reads from a relay that just started: every relay metric, at zero, with its
//! help text, on the first scrape.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get_metrics(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn a_relay_exports_every_metric_with_help_text_before_its_first_event() {
    let metrics_port = free_port();
    let data_dir = tempfile::tempdir().unwrap();
    let mut relay = KillOnDrop(
        Command::new(WEIR)
            .args(["relay", "serve", "--metrics-addr"])
            .arg(format!("127.0.0.1:{metrics_port}"))
            .env("eventListenerPort", "0")
            .env("clientListenerPort", "0")
            .current_dir(data_dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The relay announces itself on stdout once it runs.
    let mut announcement = String::new();
    BufReader::new(relay.0.stdout.take().unwrap())
        .read_line(&mut announcement)
        .unwrap();
    assert!(announcement.starts_with("relay:"), "{announcement}");

    let page = get_metrics(metrics_port);
    for name in [
        "weir_relay_events_received_total",
        "weir_relay_notifications_sent_total",
        "weir_relay_clients_connected",
        "weir_relay_queued_bytes",
    ] {
        assert!(
            page.contains(&format!("# HELP {name} ")),
            "no help for {name}:\n{page}"
        );
        assert!(
            page.contains(&format!("\n{name} 0\n")),
            "{name} not at zero:\n{page}"
        );
    }
}
