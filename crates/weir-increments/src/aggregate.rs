//! Summing per key in memory, and deciding what one flush applies.
//!
//! The worker pushes every delivered increment into an [`Aggregator`]; a flush takes its
//! content as a [`Pending`] (keys sorted, so every store locks rows in the same order and
//! concurrent workers cannot deadlock) and the store turns it into a [`Plan`] inside its
//! transaction, once it knows which entries were already applied and the current totals.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

/// Where an increment sits in its queue: a Redis stream id (`ms-seq`), or for the
/// embedded log the accept time in milliseconds and the log sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl std::str::FromStr for EntryId {
    type Err = ();
    fn from_str(text: &str) -> Result<Self, ()> {
        let (ms, seq) = text.split_once('-').ok_or(())?;
        Ok(EntryId {
            ms: ms.parse().map_err(|_| ())?,
            seq: seq.parse().map_err(|_| ())?,
        })
    }
}

/// One increment as delivered by a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    pub id: EntryId,
    pub key: Uuid,
    pub value: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyEntries {
    /// Exact sum (i128 cannot overflow for fewer than 2^64 entries).
    pub sum: i128,
    pub entries: Vec<(EntryId, i64)>,
}

/// Increments received since the last flush, summed per key.
#[derive(Debug, Default)]
pub struct Aggregator {
    keys: HashMap<Uuid, KeyEntries>,
    len: usize,
    oldest_ms: Option<u64>,
    lowest_id: Option<EntryId>,
}

impl Aggregator {
    /// Holds an item dated by its id (the embedded log's ids are this process's accept time).
    pub fn push(&mut self, item: Item) {
        self.push_received(item, item.id.ms);
    }

    /// Holds an item dated `received_ms` by this process's clock: a Redis stream id is
    /// Redis' clock, which may differ from ours or step, and would make a flush due an hour
    /// late or on every read.
    pub fn push_received(&mut self, item: Item, received_ms: u64) {
        let slot = self.keys.entry(item.key).or_default();
        slot.sum += i128::from(item.value);
        slot.entries.push((item.id, item.value));
        self.len += 1;
        self.oldest_ms = Some(self.oldest_ms.map_or(received_ms, |ms| ms.min(received_ms)));
        self.lowest_id = Some(self.lowest_id.map_or(item.id, |id| id.min(item.id)));
    }

    /// The lowest entry id held: the low-water mark must not pass it while it is held.
    pub fn lowest_id(&self) -> Option<EntryId> {
        self.lowest_id
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Accept time (ms since the epoch) of the oldest increment held, which bounds staleness.
    pub fn oldest_ms(&self) -> Option<u64> {
        self.oldest_ms
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Empties the aggregator into a flush.
    pub fn take(&mut self) -> Pending {
        let mut keys: Vec<(Uuid, KeyEntries)> = self.keys.drain().collect();
        keys.sort_unstable_by_key(|(key, _)| *key);
        let pending = Pending {
            keys,
            len: self.len,
            oldest_ms: self.oldest_ms,
        };
        self.len = 0;
        self.oldest_ms = None;
        self.lowest_id = None;
        pending
    }
}

/// The content of one flush, keys in ascending order.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    pub keys: Vec<(Uuid, KeyEntries)>,
    pub len: usize,
    pub oldest_ms: Option<u64>,
}

impl Pending {
    pub fn ids(&self) -> impl Iterator<Item = EntryId> + '_ {
        self.keys
            .iter()
            .flat_map(|(_, entries)| entries.entries.iter().map(|(id, _)| *id))
    }

    pub fn max_seq(&self) -> Option<u64> {
        self.ids().map(|id| id.seq).max()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// An increment that cannot be applied, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: EntryId,
    pub key: Uuid,
    pub value: i64,
    pub reason: String,
}

/// What one flush writes: a delta per key (ascending), and the increments set aside.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub deltas: Vec<(Uuid, i64)>,
    pub dead: Vec<DeadLetter>,
    pub applied: usize,
    /// Entries already applied by an earlier flush (a redelivery after a crash).
    pub duplicates: usize,
}

/// Which entries of a flush are new. An entry holds at most one increment per key, so
/// each (id, key) is new at most once: an entry delivered twice into the same flush (a
/// worker reclaiming its own entry) is still counted once, and every key of it counts.
pub enum Fresh {
    All,
    /// Entries with a sequence number above this mark are new (the embedded log).
    AboveSeq(u64),
    /// Exactly these ids are new (what the store had not recorded yet).
    Ids(HashSet<EntryId>),
}

impl Fresh {
    fn take(&self, id: EntryId, key: Uuid, seen: &mut HashSet<(EntryId, Uuid)>) -> bool {
        match self {
            Fresh::All => true,
            Fresh::AboveSeq(mark) => id.seq > *mark && seen.insert((id, key)),
            Fresh::Ids(ids) => ids.contains(&id) && seen.insert((id, key)),
        }
    }
}

/// Why an increment was dead-lettered instead of added.
pub fn overflow_reason(total: i64, value: i64) -> String {
    format!("total would overflow a signed 64-bit integer ({total} + {value})")
}

/// Decides a flush: skips what was applied before, and sends to the dead letters any
/// increment that would push its key's total past `i64::MAX`, without holding back the
/// other increments of that key or any other key.
pub fn plan(pending: &Pending, fresh: Fresh, base: impl Fn(&Uuid) -> i64) -> Plan {
    let mut out = Plan::default();
    let mut seen = HashSet::new();
    for (key, entries) in &pending.keys {
        let start = base(key);
        let mut total = start;
        for &(id, value) in &entries.entries {
            if !fresh.take(id, *key, &mut seen) {
                out.duplicates += 1;
                continue;
            }
            match total.checked_add(value) {
                Some(next) => {
                    total = next;
                    out.applied += 1;
                }
                None => out.dead.push(DeadLetter {
                    id,
                    key: *key,
                    value,
                    reason: overflow_reason(total, value),
                }),
            }
        }
        if total != start {
            // Totals only grow (every value is >= 1), so the delta fits in an i64.
            out.deltas.push((*key, total - start));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item(n: u64, key: u128, value: i64) -> Item {
        Item {
            id: EntryId { ms: n, seq: n },
            key: Uuid::from_u128(key),
            value,
        }
    }

    #[test]
    fn every_key_of_an_entry_counts_once_however_often_it_is_delivered() {
        let id = EntryId { ms: 7, seq: 0 };
        let mut agg = Aggregator::default();
        for _ in 0..2 {
            for key in 1..=3 {
                agg.push(Item {
                    id,
                    key: Uuid::from_u128(key),
                    value: 2,
                });
            }
        }
        let pending = agg.take();
        let plan = plan(&pending, Fresh::Ids(HashSet::from([id])), |_| 0);
        assert_eq!((plan.applied, plan.duplicates), (3, 3));
        assert!(plan.deltas.iter().all(|&(_, delta)| delta == 2));
    }

    #[test]
    fn an_overflowing_increment_is_set_aside_and_the_rest_applies() {
        let mut agg = Aggregator::default();
        agg.push(item(1, 1, 5));
        agg.push(item(2, 1, i64::MAX));
        agg.push(item(3, 1, 7));
        agg.push(item(4, 2, 9));
        let pending = agg.take();
        let plan = plan(&pending, Fresh::All, |_| 0);
        assert_eq!(plan.dead.len(), 1);
        assert_eq!(plan.dead[0].id.seq, 2);
        assert_eq!(
            plan.deltas,
            vec![(Uuid::from_u128(1), 12), (Uuid::from_u128(2), 9)]
        );
    }

    #[test]
    fn redelivered_entries_are_applied_once() {
        let mut agg = Aggregator::default();
        agg.push(item(1, 1, 5));
        agg.push(item(1, 1, 5));
        agg.push(item(2, 1, 3));
        let pending = agg.take();
        let fresh = Fresh::Ids([EntryId { ms: 1, seq: 1 }].into_iter().collect());
        let plan = plan(&pending, fresh, |_| 100);
        assert_eq!(plan.deltas, vec![(Uuid::from_u128(1), 5)]);
        assert_eq!(plan.duplicates, 2);
        let plan2 = super::plan(&pending, Fresh::AboveSeq(1), |_| 0);
        assert_eq!(plan2.deltas, vec![(Uuid::from_u128(1), 3)]);
    }

    #[test]
    fn an_item_received_is_dated_by_its_receipt_not_by_its_id() {
        let mut agg = Aggregator::default();
        let far_future = EntryId {
            ms: 10_000_000,
            seq: 0,
        };
        let item = Item {
            id: far_future,
            key: Uuid::from_u128(1),
            value: 1,
        };
        agg.push_received(item, 500);
        agg.push_received(
            Item {
                id: EntryId { ms: 3, seq: 0 },
                ..item
            },
            700,
        );
        assert_eq!(agg.oldest_ms(), Some(500));
        assert_eq!(agg.take().oldest_ms, Some(500));
    }

    proptest! {
        // A simple model: per key, apply increments in order, skipping any that would
        // overflow. The aggregator + plan must agree with it exactly, keys must come out
        // sorted, and nothing may be lost: applied + dead + duplicates == delivered.
        #[test]
        fn plan_matches_the_sequential_model(
            items in proptest::collection::vec((0u128..6, prop_oneof![1i64..1000, (i64::MAX / 3)..=i64::MAX]), 0..200),
            bases in proptest::collection::vec(prop_oneof![0i64..10, (i64::MAX - 1000)..=i64::MAX], 6),
            redelivered in proptest::collection::vec(0usize..200, 0..20),
        ) {
            let mut agg = Aggregator::default();
            for (n, (key, value)) in items.iter().enumerate() {
                agg.push(item(n as u64 + 1, *key, *value));
            }
            for n in &redelivered {
                if let Some((key, value)) = items.get(*n) {
                    agg.push(item(*n as u64 + 1, *key, *value));
                }
            }
            let pending = agg.take();
            prop_assert!(agg.is_empty());
            prop_assert!(pending.keys.windows(2).all(|w| w[0].0 < w[1].0));
            let plan = plan(&pending, Fresh::AboveSeq(0), |key| bases[key.as_u128() as usize]);

            let mut model: HashMap<u128, i64> = HashMap::new();
            let mut model_dead = 0;
            for (key, value) in &items {
                let total = model.entry(*key).or_insert(bases[*key as usize]);
                match total.checked_add(*value) {
                    Some(next) => *total = next,
                    None => model_dead += 1,
                }
            }
            prop_assert_eq!(plan.dead.len(), model_dead);
            prop_assert_eq!(plan.applied + plan.dead.len(), items.len());
            prop_assert_eq!(plan.applied + plan.dead.len() + plan.duplicates, pending.len);
            for (key, delta) in &plan.deltas {
                let k = key.as_u128();
                prop_assert_eq!(bases[k as usize].checked_add(*delta), Some(model[&k]));
            }
            let changed = model.iter().filter(|(k, v)| **v != bases[**k as usize]).count();
            prop_assert_eq!(plan.deltas.len(), changed);
        }
    }
}
