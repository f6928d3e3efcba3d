//! The SQLite dead-letter table stays within its retention: the worker prunes it on start
//! and then periodically.

mod common;

use std::num::NonZeroU64;

use common::*;
use weir_increments::store::Store;
use weir_increments::Role;

const DAY_MS: i64 = 24 * 3600 * 1000;

#[tokio::test]
async fn the_worker_prunes_expired_and_excess_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path());
    config.dead_letter_retention_secs = NonZeroU64::new(7 * 24 * 3600).unwrap();
    config.dead_letter_max_rows = NonZeroU64::new(3).unwrap();
    let store = Store::open(&config).await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Two older than the retention, then five recent ones of which only three may stay.
    let ages_days = [30, 8, 6, 5, 4, 3, 2];
    let conn = rusqlite::Connection::open(config.sqlite_path()).unwrap();
    for (seq, days) in ages_days.iter().enumerate() {
        conn.execute(
            "INSERT INTO increments_dead_letters (source, ms, seq, key, value, reason, at_ms)
             VALUES ('embedded', 1, ?1, '0b7c2f4e-8d1a-4f3b-9c6e-5a2d7e9f1b3c', 1, 'overflow', ?2)",
            rusqlite::params![seq as i64, now - days * DAY_MS],
        )
        .unwrap();
    }
    drop(conn);

    let server = start(config.clone(), Role::Serve).await;
    let kept = eventually(|| async {
        let letters = store.dead_letters("embedded").await.unwrap();
        if letters.len() == 3 {
            Ok(letters)
        } else {
            Err(format!("{} dead letters kept, want 3", letters.len()))
        }
    })
    .await;
    let seqs: Vec<u64> = kept.iter().map(|letter| letter.id.seq).collect();
    assert_eq!(seqs, vec![4, 5, 6], "the newest three");
    server.stop().await;
}
