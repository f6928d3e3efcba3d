//! Start-up failures of the real binary: each exits non-zero and says which service could not
//! start and why, before announcing anything.

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// Starts `weir args...` in `dir` with the engines' variables cleared, the relay on
/// ephemeral ports, kv pointed at a closed port (starting must not need, or touch, a real
/// broker), and stdout and stderr piped.
fn spawn_weir(dir: &std::path::Path, args: &[&str]) -> Child {
    Command::new(WEIR)
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env("eventListenerPort", "0")
        .env("clientListenerPort", "0")
        .env("AMQP_URL", "amqp://127.0.0.1:1/%2f")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn weir")
}

/// Runs `weir args...` as [`spawn_weir`] does, killing it if it has not exited within 60 s.
fn run_weir(dir: &std::path::Path, args: &[&str]) -> Output {
    let mut child = spawn_weir(dir, args);
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("poll weir").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect weir's output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_second_increments_process_on_one_data_dir_exits_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The holder is this test process: flock contends between open files, not processes.
    let _held = weir_runtime::datadir::lock(&data, "--data-dir").unwrap();
    let data_arg = data.to_str().unwrap();
    let out = run_weir(
        dir.path(),
        &["increments", "serve", "--port", "0", "--data-dir", data_arg],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", std::process::id())),
        "{stderr}"
    );
    assert!(stderr.contains("--data-dir"), "{stderr}");
    assert!(
        !text(&out.stdout).contains("POST http://"),
        "announced before it could start"
    );
}

#[test]
fn a_data_dir_that_is_a_file_is_named_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    std::fs::write(&file, b"not a directory").unwrap();
    let out = run_weir(
        dir.path(),
        &[
            "increments",
            "serve",
            "--port",
            "0",
            "--data-dir",
            file.to_str().unwrap(),
        ],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("--data-dir").count(), 1, "{stderr}");
    assert!(stderr.contains("is not a directory"), "{stderr}");
}

/// The `weir up` cases share the fixed increments port (3333), so they run in one test, one
/// after another.
#[test]
fn weir_up_fails_naming_the_service_that_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = ["--metrics-addr", "127.0.0.1:0", "up", "--grace-secs", "5"];

    // The data directory is held by another process.
    let held = weir_runtime::datadir::lock(&dir.path().join("weir-data/increments"), "x").unwrap();
    let out = run_weir(dir.path(), &metrics);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("increments cannot start"), "{stderr}");
    assert!(stderr.contains("in use by another process"), "{stderr}");
    assert!(
        !text(&out.stdout).contains("weir is up"),
        "banner before failure"
    );
    drop(held);

    // The increments port is taken (by this test, or by whatever else holds it).
    let taken = TcpListener::bind("0.0.0.0:3333");
    let out = run_weir(dir.path(), &metrics);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("increments cannot start"), "{stderr}");
    assert!(stderr.contains("3333"), "{stderr}");
    assert!(
        !text(&out.stdout).contains("weir is up"),
        "banner before failure"
    );
    drop(taken);

    // With nothing in the way it comes up, and a SIGTERM drains it to a clean exit.
    let mut child = spawn_weir(dir.path(), &metrics);
    let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let banner = std::io::BufRead::lines(stdout)
        .map_while(Result::ok)
        .find(|line| line.contains("weir is up"));
    assert!(banner.is_some(), "weir up never announced itself");
    // kv, with no broker, logs its reconnection: a log line written to a pipe, which must
    // carry no colour codes (they are for terminals).
    let stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let found = std::io::BufRead::lines(stderr)
            .map_while(Result::ok)
            .find(|line| line.contains("reconnecting"));
        let _ = line_tx.send(found);
    });
    let warning = line_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("kv logged its reconnection")
        .expect("a reconnection line");
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        !warning.contains('\u{1b}'),
        "colour codes in a pipe: {warning:?}"
    );
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().expect("weir up exits");
    assert!(status.success(), "{status}");
}

#[test]
fn kv_refuses_auto_acks_with_a_journal_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_weir(dir.path(), &["kv", "serve", "--acks", "auto"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("acks: auto needs durability none"),
        "{stderr}"
    );
    assert!(!text(&out.stdout).contains("kv: consuming"));
}
