//! The store's operations at 10k, 100k and 1M keys. Keys are made before timing starts, so
//! what is measured is the store, not the allocation of the request's strings.
//!
//! `add` and `remove` run on a copy of the filled store made outside the timing. A copy has
//! exactly the capacity it needs, so `add` reserves room in the untimed setup too: otherwise
//! its first insert would copy the whole vector (or rehash the whole index), a cost a store
//! that grew by inserting pays once per doubling, not once per 10,000 adds. `churn` is the
//! honest whole: at a steady size it removes the oldest key and adds it back at the end, so
//! growth, tombstones and their compaction are all inside the timing, amortized as they are
//! in service.
//!
//! Time is the benchmark thread's CPU time, not the wall clock: on a machine shared with
//! other builds, a wall clock mostly measures how often this thread was descheduled.

use std::hint::black_box;

use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use weir_kv::store::Store;

const SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];
const BATCH: usize = 10_000;

fn keys(count: usize, prefix: &str) -> Vec<String> {
    // Spread like real keys rather than sequential ones, so the hash table is not flattered.
    (0..count)
        .map(|i| {
            format!(
                "{prefix}-{:016x}",
                (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            )
        })
        .collect()
}

fn filled(keys: &[String]) -> Store {
    let mut store = Store::new();
    for key in keys {
        store.add(key, "value-of-about-thirty-bytes...");
    }
    store
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`), reported like wall time.
struct ThreadCpuTime;

fn thread_cpu_now() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; this clock exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

static WALL: WallTime = WallTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu_now()
    }

    fn end(&self, started: Duration) -> Duration {
        thread_cpu_now().saturating_sub(started)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        WALL.formatter()
    }
}

fn bench(c: &mut Criterion<ThreadCpuTime>) {
    for size in SIZES {
        let present = keys(size, "k");
        let fresh = keys(BATCH, "new");
        let store = filled(&present);
        let mut group = c.benchmark_group(format!("store/{size}"));

        group.throughput(Throughput::Elements(1));
        let mut at = 0;
        group.bench_function("get", |b| {
            b.iter(|| {
                at = (at + 7919) % size;
                black_box(store.get(&present[at]))
            })
        });

        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function("add", |b| {
            b.iter_batched_ref(
                || {
                    let mut store = store.clone();
                    store.reserve(BATCH);
                    store
                },
                |store| {
                    for key in &fresh {
                        store.add(key, "value");
                    }
                },
                BatchSize::PerIteration,
            )
        });
        group.bench_function("remove", |b| {
            b.iter_batched_ref(
                || store.clone(),
                |store| {
                    for key in present.iter().step_by(size / BATCH) {
                        black_box(store.remove(key));
                    }
                },
                BatchSize::PerIteration,
            )
        });

        // Per iteration one remove and one add.
        group.throughput(Throughput::Elements(2));
        let mut churned = store.clone();
        let mut oldest = 0;
        group.bench_function("churn", |b| {
            b.iter(|| {
                let key = &present[oldest];
                oldest = (oldest + 1) % size;
                black_box(churned.remove(key));
                black_box(churned.add(key, "value"))
            })
        });
        drop(churned);

        group.throughput(Throughput::Elements(1_000));
        let mut cursor = 0u64;
        group.bench_function("page_of_1000", |b| {
            b.iter(|| {
                cursor = (cursor + 104_729) % (size as u64 - 1_000);
                black_box(store.page(Some(cursor), 1_000).items.len())
            })
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpuTime).sample_size(20);
    targets = bench
}
criterion_main!(benches);
