//! The store's insert path, with 30 % of items already stored (1,000 tenants).
//! `cargo bench -p weir-distinct` prints items/s as criterion's throughput; `parallel` runs
//! 64 concurrent requesters, as a worker under load does, so concurrent requests share a
//! log write. Folding into the index runs during the measurement; appends wait whenever
//! the oldest unfolded item is older than `worker_persist` (1 s), so acknowledgements
//! cannot run far ahead of what is counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use weir_distinct::shard::Item;
use weir_distinct::store::{SqliteStore, Store, StoreOptions};

const TENANTS: u64 = 1_000;
const REQUESTERS: usize = 64;

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

fn insert(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("store_insert");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    for size in [10usize, 1_000] {
        for parallel in [1usize, REQUESTERS] {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::Sqlite(
                SqliteStore::open(dir.path(), StoreOptions::default()).expect("store"),
            );
            let next = Arc::new(AtomicU64::new(0));
            group.throughput(Throughput::Elements((size * parallel) as u64));
            let id = BenchmarkId::new(format!("batch_{size}"), format!("{parallel}_requesters"));
            group.bench_function(id, |b| {
                b.iter_custom(|rounds| {
                    runtime.block_on(async {
                        let started = Instant::now();
                        let tasks: Vec<_> = (0..parallel)
                            .map(|_| {
                                let store = store.clone();
                                let next = next.clone();
                                tokio::spawn(async move {
                                    for _ in 0..rounds {
                                        store.insert(batch(&next, size)).await.expect("insert");
                                    }
                                })
                            })
                            .collect();
                        for task in tasks {
                            task.await.expect("requester");
                        }
                        let elapsed = started.elapsed();
                        // Outside the time: a flush costs a commit per shard, which would
                        // swamp short samples. Folds still run during the sample, and
                        // appends wait once the oldest unfolded item is `2 × fold_after`
                        // old, so the rate is what folding sustains, give or take that.
                        store.flush().await.expect("flush");
                        elapsed
                    })
                })
            });
            runtime.block_on(store.close());
        }
    }
    group.finish();
}

criterion_group!(benches, insert);
criterion_main!(benches);
