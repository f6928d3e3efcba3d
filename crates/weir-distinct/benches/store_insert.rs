//! The store's insert path, with 30 % of items already stored (1,000 tenants).
//! `cargo bench -p weir-distinct --bench store_insert` prints items/s per case; `64
//! requesters` run concurrently, as a worker under load does, so concurrent requests share
//! a log write.
//!
//! Each case inserts for a fixed time and then flushes, and the time includes the flush: the
//! rate is of items folded into the index (counted), not only acknowledged. (A per-sample
//! harness would flush every short sample, a commit per shard each time, and measure that.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_distinct::shard::Item;
use weir_distinct::store::{SqliteStore, Store, StoreOptions};

const TENANTS: u64 = 1_000;
const REQUESTERS: usize = 64;
const SECONDS: u64 = 8;

/// Numbers handed out in order; a pair is a function of its number, so re-using an earlier
/// number re-posts an item already stored.
fn batch(next: &AtomicU64, size: usize) -> Vec<Item> {
    let start = next.fetch_add(size as u64, Ordering::Relaxed);
    (0..size as u64)
        .map(|k| {
            let n = start + k;
            // 3 in 10 are repeats of an item posted earlier (half as far along).
            let m = if n % 10 < 3 { n / 2 } else { n };
            Item {
                tenant: format!("tenant-{}", m % TENANTS),
                id: format!("item-{m}"),
            }
        })
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; a filter, if any, selects cases by name.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for size in [10usize, 1_000] {
        for parallel in [1usize, REQUESTERS] {
            let name = format!("store_insert/batch_{size}/{parallel}_requesters");
            if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
                continue;
            }
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::Sqlite(
                SqliteStore::open(dir.path(), StoreOptions::default()).expect("store"),
            );
            let next = Arc::new(AtomicU64::new(0));
            let inserted = Arc::new(AtomicU64::new(0));
            let (elapsed, flush) = runtime.block_on(async {
                let started = Instant::now();
                let until = started + Duration::from_secs(SECONDS);
                let tasks: Vec<_> = (0..parallel)
                    .map(|_| {
                        let store = store.clone();
                        let next = next.clone();
                        let inserted = inserted.clone();
                        tokio::spawn(async move {
                            while Instant::now() < until {
                                store.insert(batch(&next, size)).await.expect("insert");
                                inserted.fetch_add(size as u64, Ordering::Relaxed);
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("requester");
                }
                let flushing = Instant::now();
                store.flush().await.expect("flush");
                (started.elapsed(), flushing.elapsed())
            });
            runtime.block_on(store.close());
            let items = inserted.load(Ordering::Relaxed);
            println!(
                "{name}: {:.0} items/s ({items} items in {:.2} s, of which the closing flush {:.2} s)",
                items as f64 / elapsed.as_secs_f64(),
                elapsed.as_secs_f64(),
                flush.as_secs_f64()
            );
        }
    }
}
