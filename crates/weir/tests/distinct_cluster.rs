//! The distinct service end to end: `weir distinct coordinator` as a real process, running
//! its workers as real child processes on the embedded SQLite store, through crashes
//! (`kill -9` of a worker, of the coordinator) and config reloads, under load.

mod distinct_common;

use std::time::Duration;

use distinct_common::*;

#[test]
fn the_seed_sanity_scenario_with_four_worker_processes() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(5);
    write_config(dir.path(), ports[0], &ports[1..], "");
    let coordinator = Coordinator::start(dir.path(), ports[0]);
    let doc = health(coordinator.addr);
    assert_eq!(doc["alive"], 4, "{doc}");
    assert_eq!(worker_pids(&doc).len(), 4, "{doc}");
    let body = r#"[{"id":"1", "tenant": "t1"},
      {"id":"2", "tenant": "t2"},
      {"id":"2", "tenant": "t3"},
      {"id":"4", "tenant": "t1"}]"#;
    let (status, answer) = http(coordinator.addr, "POST", "/items", body).unwrap();
    assert_eq!(status, 200, "{answer}");
    settled(coordinator.addr, "t1", 2);
    settled(coordinator.addr, "t2", 1);
    settled(coordinator.addr, "t3", 1);
    // Each worker logs to its own file.
    for port in &ports[1..] {
        let log = dir.path().join(format!("logs/worker-localhost-{port}.log"));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("distinct worker: POST"),
            "{}: {text}",
            log.display()
        );
    }
    let pids = worker_pids(&doc);
    assert!(coordinator.stop().success());
    // A graceful stop takes the workers with it.
    assert!(pids.iter().all(|(_, pid)| !running(*pid)), "{pids:?}");
}

#[test]
fn concurrent_duplicate_heavy_load_counts_each_pair_once() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(5);
    write_config(dir.path(), ports[0], &ports[1..], "");
    let coordinator = Coordinator::start(dir.path(), ports[0]);
    let load = Load::start(coordinator.addr, 6, 40, 300, 200);
    load.wait_batches(150);
    let posted = load.finish();
    assert_exact(coordinator.addr, &posted, 40);
    assert!(coordinator.stop().success());
}

#[test]
fn kill_9_of_a_worker_under_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(5);
    write_config(dir.path(), ports[0], &ports[1..], "");
    let coordinator = Coordinator::start(dir.path(), ports[0]);
    let load = Load::start(coordinator.addr, 4, 64, 500, 100);
    load.wait_batches(40);
    let (victim, pid) = worker_pids(&health(coordinator.addr))[1].clone();
    // SAFETY: kill(2) with SIGKILL on the worker's pid, which its health report gave.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    load.wait_batches(40);
    // The supervisor starts it again, under a new pid.
    let doc = wait_health(coordinator.addr, "the worker restarted", |doc| {
        doc["workers"].as_array().unwrap().iter().any(|w| {
            w["worker"] == victim.as_str()
                && w["alive"] == true
                && w["restarts"].as_u64() >= Some(1)
                && w["pid"].as_i64() != Some(i64::from(pid))
        })
    });
    load.wait_batches(40);
    let posted = load.finish();
    assert_exact(coordinator.addr, &posted, 64);
    let metrics = http(coordinator.addr, "GET", "/metrics", "").unwrap().1;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("weir_distinct_coordinator_worker_restarts_total")
                && !l.ends_with(" 0")
        ),
        "{doc}\n{metrics}"
    );
    assert!(coordinator.stop().success());
}

#[test]
fn kill_9_of_the_coordinator_takes_its_workers_and_a_restart_comes_up() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(5);
    write_config(dir.path(), ports[0], &ports[1..], "");
    let coordinator = Coordinator::start(dir.path(), ports[0]);
    let first = items_json(&[("a".into(), "1".into()), ("b".into(), "1".into())]);
    assert_eq!(
        http(coordinator.addr, "POST", "/items", &first).unwrap().0,
        200
    );
    let pids = worker_pids(&health(coordinator.addr));
    assert_eq!(pids.len(), 4);
    coordinator.signal(libc::SIGKILL);
    drop(coordinator);
    // The kernel kills each worker when its parent dies.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pids.iter().any(|(_, pid)| running(*pid)) {
        assert!(
            std::time::Instant::now() < deadline,
            "workers outlived the coordinator: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Same config, same ports, same store: it comes up, and nothing acknowledged is lost.
    let coordinator = Coordinator::start(dir.path(), ports[0]);
    settled(coordinator.addr, "a", 1);
    let second = items_json(&[("a".into(), "1".into()), ("a".into(), "2".into())]);
    assert_eq!(
        http(coordinator.addr, "POST", "/items", &second).unwrap().0,
        200
    );
    settled(coordinator.addr, "a", 2);
    settled(coordinator.addr, "b", 1);
    assert!(coordinator.stop().success());
}

#[test]
fn a_reload_adds_and_removes_workers_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(5);
    let (port, a, b, c, d) = (ports[0], ports[1], ports[2], ports[3], ports[4]);
    write_config(dir.path(), port, &[a, b, c], "");
    let coordinator = Coordinator::start(dir.path(), port);
    let removed = worker_pids(&health(coordinator.addr))
        .into_iter()
        .find(|(name, _)| name.ends_with(&format!(":{a}")))
        .unwrap();
    let load = Load::start(coordinator.addr, 4, 64, 500, 100);
    load.wait_batches(30);
    // On its interval, and at once on SIGHUP.
    write_config(dir.path(), port, &[b, c, d], "");
    coordinator.signal(libc::SIGHUP);
    wait_health(coordinator.addr, "the new worker list", |doc| {
        let workers = doc["workers"].as_array().unwrap();
        workers.len() == 3
            && workers.iter().all(|w| w["alive"] == true)
            && workers
                .iter()
                .any(|w| w["worker"] == format!("localhost:{d}").as_str())
            && !workers
                .iter()
                .any(|w| w["worker"] == format!("localhost:{a}").as_str())
    });
    load.wait_batches(30);
    // The removed worker was stopped (SIGTERM: it drained and exited).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while running(removed.1) {
        assert!(
            std::time::Instant::now() < deadline,
            "{removed:?} still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And back, under the interval alone this time.
    write_config(dir.path(), port, &[a, b, c, d], "");
    wait_health(coordinator.addr, "four workers", |doc| {
        doc["workers"].as_array().unwrap().len() == 4 && doc["alive"] == 4
    });
    load.wait_batches(30);
    let posted = load.finish();
    assert_exact(coordinator.addr, &posted, 64);
    assert!(coordinator.stop().success());
}

#[test]
fn a_bad_value_stops_the_start_naming_the_key_and_a_reload_keeps_the_last_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    write_config(
        dir.path(),
        ports[0],
        &ports[1..],
        "fsync: false\nworker_persist: -1\n",
    );
    // The duplicate key is refused first: keep only the bad value.
    let text = std::fs::read_to_string(dir.path().join("config.yaml"))
        .unwrap()
        .replace("worker_persist: 1\n", "");
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    let out = weir(
        dir.path(),
        &["distinct", "coordinator", "--config", "config.yaml"],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("worker_persist"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("POST http://"));

    write_config(dir.path(), ports[0], &ports[1..], "");
    let coordinator = Coordinator::start(dir.path(), ports[0]);
    let before = health(coordinator.addr);
    let duplicated = [ports[1], ports[1]];
    write_config(dir.path(), ports[0], &duplicated, "");
    coordinator.signal(libc::SIGHUP);
    let doc = wait_health(coordinator.addr, "the reload refused", |doc| {
        doc["config_error"]
            .as_str()
            .is_some_and(|e| e.contains("workers"))
    });
    assert_eq!(doc["workers"], before["workers"]);
    let body = items_json(&[("t".into(), "1".into())]);
    assert_eq!(
        http(coordinator.addr, "POST", "/items", &body).unwrap().0,
        200
    );
    settled(coordinator.addr, "t", 1);
    assert!(coordinator.stop().success());
}
