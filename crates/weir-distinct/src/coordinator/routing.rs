//! Which worker writes a shard: rendezvous (highest-random-weight) hashing over the workers
//! that are alive, and the backoff between attempts.
//!
//! Every shard has exactly one writer at a time (the worker holding its lock), and a tenant
//! lives in exactly one shard, so sending a shard's items always to the same worker is what
//! makes a count exact without any coordination between workers, and it keeps that worker's
//! writes for the shard in one queue where they are committed in groups. Rendezvous hashing
//! gives every shard a preference order over the workers that depends only on the shard and
//! the worker's name: when a worker leaves, only its own shards move (each to its next
//! choice), and when one joins it takes only the shards it now ranks first for.

use std::time::Duration;

/// The weight of `worker` (its configured `host:port`) for `shard`: FNV-1a over the name
/// and the shard, then a 64-bit finaliser so that names differing only in their last byte
/// (`:5001`, `:5002`) do not get correlated weights.
pub fn weight(worker: &str, shard: u16) -> u64 {
    let mut hash = crate::shard::tenant_hash(worker);
    for byte in shard.to_be_bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(hash)
}

/// The splitmix64 finaliser.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The indices of `workers` in the order `shard` prefers them: highest weight first, ties
/// (which need two names to hash alike) broken by name so every coordinator agrees.
pub fn preference<S: AsRef<str>>(shard: u16, workers: &[S]) -> Vec<usize> {
    let mut ranked: Vec<(u64, &str, usize)> = workers
        .iter()
        .enumerate()
        .map(|(index, name)| (weight(name.as_ref(), shard), name.as_ref(), index))
        .collect();
    ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.into_iter().map(|(_, _, index)| index).collect()
}

/// Exponential backoff with a cap, forgotten after a stable period: between forwarding
/// attempts, and between restarts of a worker process that keeps exiting.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff {
            first,
            cap,
            next: first,
        }
    }

    /// The delay to wait now; the one after it doubles, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.cap);
        delay
    }

    /// Back to the first delay (the process ran long enough to count as healthy).
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(ports: &[u16]) -> Vec<String> {
        ports.iter().map(|p| format!("localhost:{p}")).collect()
    }

    #[test]
    fn weights_are_pinned() {
        // A change here moves shards between workers: harmless for correctness (a busy shard
        // is retried on its owner) but it would be a silent behaviour change.
        assert_eq!(weight("localhost:5001", 0), weight("localhost:5001", 0));
        assert_ne!(weight("localhost:5001", 0), weight("localhost:5002", 0));
        assert_ne!(weight("localhost:5001", 0), weight("localhost:5001", 1));
    }

    #[test]
    fn four_workers_share_64_shards_roughly_evenly() {
        let workers = names(&[5001, 5002, 5003, 5004]);
        let mut owned = [0usize; 4];
        for shard in 0..crate::shard::SHARDS {
            owned[preference(shard, &workers)[0]] += 1;
        }
        assert!(owned.iter().all(|n| *n >= 6), "{owned:?}");
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<u128> = (0..4).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }

    proptest! {
        #[test]
        fn a_preference_is_a_permutation(ports in proptest::collection::btree_set(1u16.., 0..8), shard in 0u16..64) {
            let workers = names(&ports.into_iter().collect::<Vec<_>>());
            let mut order = preference(shard, &workers);
            order.sort_unstable();
            prop_assert_eq!(order, (0..workers.len()).collect::<Vec<_>>());
        }

        #[test]
        fn removing_a_worker_moves_only_its_own_shards(
            ports in proptest::collection::btree_set(1u16.., 2..8),
            gone in 0usize..8,
        ) {
            let before = names(&ports.into_iter().collect::<Vec<_>>());
            let gone = gone % before.len();
            let after: Vec<String> = before.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, n)| n.clone()).collect();
            for shard in 0..64u16 {
                let old = &before[preference(shard, &before)[0]];
                let new = &after[preference(shard, &after)[0]];
                if old != &before[gone] {
                    prop_assert_eq!(old, new);
                } else {
                    // It moves to its second choice.
                    prop_assert_eq!(new, &before[preference(shard, &before)[1]]);
                }
            }
        }

        #[test]
        fn adding_a_worker_moves_shards_only_to_it(
            ports in proptest::collection::btree_set(1u16..60000, 1..8),
            added in 60000u16..,
        ) {
            let before = names(&ports.into_iter().collect::<Vec<_>>());
            let mut after = before.clone();
            after.push(format!("localhost:{added}"));
            for shard in 0..64u16 {
                let old = &before[preference(shard, &before)[0]];
                let new = &after[preference(shard, &after)[0]];
                prop_assert!(old == new || new == after.last().unwrap());
            }
        }
    }
}
