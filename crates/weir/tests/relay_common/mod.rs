//! Starting `weir relay serve` as a real process for the relay's process-level tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// Long enough for a loaded machine; a bug fails the test instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A relay process, killed (SIGKILL) if the test ends without stopping it.
pub struct RelayProcess {
    pub child: Child,
    pub events: SocketAddr,
    pub clients: SocketAddr,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RelayProcess {
    /// Starts `weir relay serve ARGS` on loopback ports chosen by the kernel, under a
    /// descriptor limit of `nofile` if given, and returns once it has announced itself.
    pub fn start(args: &[&str], nofile: Option<u32>) -> RelayProcess {
        let mut command = match nofile {
            Some(limit) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(WEIR);
                sh
            }
            None => Command::new(WEIR),
        };
        command
            .args(["relay", "serve", "--bind-address", "127.0.0.1"])
            .args(["--event-listener-port", "0", "--client-listener-port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().expect("weir starts");
        // The relay announces itself on stdout once it runs (the state file locked and read).
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = |after: &str| -> SocketAddr {
            let rest = &line[line.find(after).unwrap_or_else(|| panic!("{line}")) + after.len()..];
            rest.split([',', '\n'])
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let events = addr("event source on ");
        let clients = addr("user clients on ");
        RelayProcess {
            child,
            events,
            clients,
        }
    }

    /// SIGKILL: nothing is flushed, saved or closed by the relay itself.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// A user client that has sent its id.
pub fn client(addr: SocketAddr, user: u64) -> TcpStream {
    let mut stream = connect(addr);
    stream.write_all(format!("{user}\n").as_bytes()).unwrap();
    stream
}

/// Reads until the stream holds `marker` (included) and returns everything read.
pub fn read_until(stream: &mut TcpStream, marker: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    while !String::from_utf8_lossy(&seen).contains(marker) {
        let n = stream.read(&mut buf).unwrap_or_else(|err| {
            panic!(
                "{err} before {marker:?}; got {:?}",
                String::from_utf8_lossy(&seen)
            )
        });
        assert!(
            n > 0,
            "closed before {marker:?}; got {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(seen).unwrap()
}

/// Whether the server closed `stream` (EOF or reset) within the patience.
pub fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

pub fn get_metrics(port: u16) -> String {
    let mut stream = connect(SocketAddr::from(([127, 0, 0, 1], port)));
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// Waits until the relay's metrics page has the sample `series value`: the relay has no
/// acknowledgement of a client's id, so this is how a test knows it was registered.
pub fn wait_for_sample(port: u16, series: &str, value: u64) {
    let wanted = format!("\n{series} {value}\n");
    let started = std::time::Instant::now();
    loop {
        let page = get_metrics(port);
        if page.contains(&wanted) {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{series} never reached {value}:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
