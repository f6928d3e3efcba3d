//! The relay's per-event work, measured alone: parsing a line, passing through the reorder
//! window, and routing to clients. `cargo bench -p weir-relay --bench hot_path`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use weir_relay::event::{parse, Event};
use weir_relay::reorder::ReorderWindow;
use weir_relay::router::Router;

const EVENTS: u64 = 100_000;

/// A stream shaped like the verifier's: mostly status updates, some follows and messages,
/// shuffled in batches of up to 100.
fn stream() -> Vec<String> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut lines: Vec<String> = (1..=EVENTS)
        .map(|seq| {
            let (a, b) = (next() % 1000 + 1, next() % 1000 + 1);
            match next() % 100 {
                0..=14 => format!("{seq}|F|{a}|{b}\n"),
                15..=29 => format!("{seq}|U|{a}|{b}\n"),
                30..=44 => format!("{seq}|P|{a}|{b}\n"),
                _ => format!("{seq}|S|{a}\n"),
            }
        })
        .collect();
    for chunk in lines.chunks_mut(100) {
        for i in (1..chunk.len()).rev() {
            chunk.swap(i, (next() % (i as u64 + 1)) as usize);
        }
    }
    lines
}

fn bench(c: &mut Criterion) {
    let lines = stream();
    let events: Vec<Event> = lines
        .iter()
        .map(|line| parse(line.as_bytes()).unwrap())
        .collect();
    let mut group = c.benchmark_group("relay");
    group.throughput(Throughput::Elements(EVENTS));

    group.bench_function("parse", |b| {
        b.iter(|| {
            lines
                .iter()
                .filter(|line| parse(line.as_bytes()).is_ok())
                .count()
        })
    });

    group.bench_function("reorder", |b| {
        b.iter_batched(
            || events.clone(),
            |events| {
                let mut window =
                    ReorderWindow::new(1, std::num::NonZeroUsize::new(100_000).unwrap(), u64::MAX);
                let mut out = Vec::with_capacity(256);
                let mut released = 0;
                for event in events {
                    window.insert(event.seq, event, &mut out);
                    released += out.len();
                    out.clear();
                }
                released
            },
            BatchSize::LargeInput,
        )
    });

    group.bench_function("route_100_clients_of_1000_users", |b| {
        let mut ordered = events.clone();
        ordered.sort_by_key(|event| event.seq);
        b.iter_batched(
            || {
                let mut router = Router::default();
                for user in 1..=100u64 {
                    router.connect(user, user * 10, ());
                }
                router
            },
            |mut router| {
                let mut bytes = 0;
                for chunk in ordered.chunks(3_000) {
                    for event in chunk {
                        router.route(event);
                    }
                    router.flush(|_, pending| {
                        bytes += pending.len();
                        true
                    });
                }
                bytes
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
