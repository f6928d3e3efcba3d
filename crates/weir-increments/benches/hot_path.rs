//! The increments service's per-request and per-flush work, measured alone: validating a
//! body, summing increments per key, and planning a flush (duplicates skipped, overflow set
//! aside). `cargo bench -p weir-increments --bench hot_path`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use uuid::Uuid;
use weir_increments::aggregate::{plan, Aggregator, EntryId, Fresh, Item};
use weir_increments::validate::parse_increment;

const ITEMS: u64 = 100_000;
const KEYS: u128 = 1_000;

fn key(n: u128) -> Uuid {
    Uuid::from_u128(0x9c4e_3b4e_6c55_4a4e_9a0f_0000_0000_0000 | n)
}

/// What a flush holds under the README's load: 100,000 increments over 1000 keys.
fn items() -> Vec<Item> {
    (0..ITEMS)
        .map(|seq| Item {
            id: EntryId { ms: 1, seq },
            key: key(u128::from(seq) * 7919 % KEYS),
            value: (seq % 9 + 1) as i64,
        })
        .collect()
}

fn validate(c: &mut Criterion) {
    let bodies: Vec<Vec<u8>> = (0..1000)
        .map(|n| format!(r#"{{"key": "{}", "value": {}}}"#, key(n), n + 1).into_bytes())
        .collect();
    let mut group = c.benchmark_group("increments");
    group.throughput(Throughput::Elements(bodies.len() as u64));
    group.bench_function("validate a body", |b| {
        b.iter(|| {
            for body in &bodies {
                std::hint::black_box(parse_increment(body).ok());
            }
        })
    });
    group.finish();
}

fn aggregate(c: &mut Criterion) {
    let items = items();
    let mut group = c.benchmark_group("increments");
    group.throughput(Throughput::Elements(ITEMS));
    group.bench_function("sum per key", |b| {
        b.iter_batched(
            || items.clone(),
            |items| {
                let mut aggregator = Aggregator::default();
                for item in items {
                    aggregator.push(item);
                }
                aggregator.take()
            },
            BatchSize::LargeInput,
        )
    });
    let mut aggregator = Aggregator::default();
    for item in &items {
        aggregator.push(*item);
    }
    let pending = aggregator.take();
    group.bench_function("plan a flush (embedded watermark)", |b| {
        b.iter(|| plan(&pending, Fresh::AboveSeq(ITEMS / 10), |_| 0))
    });
    let fresh: std::collections::HashSet<EntryId> = items
        .iter()
        .skip(ITEMS as usize / 10)
        .map(|i| i.id)
        .collect();
    group.bench_function("plan a flush (applied stream ids)", |b| {
        b.iter_batched(
            || Fresh::Ids(fresh.clone()),
            |fresh| plan(&pending, fresh, |_| 0),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, validate, aggregate);
criterion_main!(benches);
