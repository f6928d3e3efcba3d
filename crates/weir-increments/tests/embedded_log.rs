//! The embedded log across a crash, through `run`: a damaged record refuses the start
//! naming the file and offset; `repair` starts, keeps what precedes the damage and
//! moves the damaged segment aside.

mod common;

use common::*;
use uuid::Uuid;
use weir_increments::queue::embedded;
use weir_increments::validate::Increment;
use weir_increments::Role;

const KEY: &str = "0b7c2f4e-8d1a-4f3b-9c6e-5a2d7e9f1b3c";
const RECORD: u64 = 40;

/// 1000 acknowledged increments of 1, then the process "dies" before any flush.
async fn acknowledged_but_unflushed(log_dir: &std::path::Path) -> std::path::PathBuf {
    let (producer, mut consumer) = embedded::open(log_dir, 0, false).unwrap();
    let key = Uuid::parse_str(KEY).unwrap();
    for _ in 0..1000 {
        producer.enqueue(Increment { key, value: 1 }).await.unwrap();
    }
    drop(producer);
    // The log closes once its writer has stopped; everything is on disk by then.
    while consumer.next().await.unwrap().is_some() {}
    let mut segments: Vec<_> = std::fs::read_dir(log_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    segments.sort();
    segments.remove(0)
}

#[tokio::test]
async fn a_damaged_record_refuses_the_start_and_repair_keeps_what_precedes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path());
    let segment = acknowledged_but_unflushed(&config.log_dir()).await;
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), 1000 * RECORD);
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[(499 * RECORD + 20) as usize] ^= 0x01;
    std::fs::write(&segment, &bytes).unwrap();

    let refused = start(config.clone(), Role::Serve).await;
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(10), refused.handle).await;
    let err = stopped
        .expect("refused to start rather than serving")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains(&segment.display().to_string()), "{err}");
    assert!(err.contains("byte 19960"), "{err}");
    assert_eq!(std::fs::read(&segment).unwrap(), bytes, "left as it was");

    config.repair = true;
    let server = start(config.clone(), Role::Serve).await;
    wait_for_total(server.addr, KEY, 499).await;
    assert_eq!(post_increment(server.addr, KEY, 1).await.status, 202);
    wait_for_total(server.addr, KEY, 500).await;
    server.stop().await;
    let moved: Vec<_> = std::fs::read_dir(config.log_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().contains(".damaged-"))
        .collect();
    assert_eq!(moved.len(), 1);
    assert_eq!(
        std::fs::read(&moved[0]).unwrap(),
        bytes,
        "moved aside intact"
    );
}
