//! The insertion-ordered map at the heart of kv: O(1) average add, get and remove, and
//! iteration in insertion order without sorting, in pages that a cursor resumes.
//!
//! Entries live in one vector in insertion order. A remove leaves a tombstone instead of
//! shifting what follows (that shift is what made the seed's remove O(n)), and the vector is
//! compacted once tombstones outnumber live entries, so the cost is O(1) amortized and at most
//! half the slots are ever dead. The index is a hash table of positions into that vector that
//! compares through the vector, so every key is stored once.
//!
//! What makes an operation cheap at a million keys is the number of cache misses, so:
//! - a key and its value share one allocation (one `malloc` per add, one `free` per remove,
//!   and a `get` reads its value from the cache line its key comparison already brought in);
//! - the index holds each key's 32-bit hash beside its position, so a probe that lands on
//!   another key is rejected without reading that key, and growing the table never reads a
//!   key again;
//! - each slot keeps the same hash, so compaction rebuilds the index from the vector alone.
//!
//! Every entry carries a sequence number, increasing with each insertion and never reused. A
//! page ends with the sequence number of its last entry as the cursor; since the vector is
//! sorted by sequence number, the next page starts with a binary search, and stays correct
//! whatever was added or removed in between.
//!
//! Re-adding a key that is present replaces its value **in place**: the key keeps its
//! position, as in an ordered dictionary. To move a key to the end, remove then add it.

use std::hash::BuildHasher;

use hashbrown::hash_table::{Entry, HashTable};
use hashbrown::DefaultHashBuilder;

/// A page cursor: the sequence number of the last entry a page returned.
pub type Cursor = u64;

/// A key and its value in one allocation: the key's bytes, then the value's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    text: Box<str>,
    key_len: u32,
}

impl Pair {
    fn new(key: &str, value: &str) -> Pair {
        let mut text = String::with_capacity(key.len() + value.len());
        text.push_str(key);
        text.push_str(value);
        Pair {
            text: text.into_boxed_str(),
            key_len: u32::try_from(key.len()).expect("keys are limited far below 4 GiB"),
        }
    }

    pub fn key(&self) -> &str {
        &self.text[..self.key_len as usize]
    }

    pub fn value(&self) -> &str {
        &self.text[self.key_len as usize..]
    }

    fn len(&self) -> usize {
        self.text.len()
    }
}

#[derive(Debug, Clone)]
struct Slot {
    seq: u64,
    hash: u32,
    /// `None` once removed: a tombstone, skipped by reads, dropped by compaction.
    pair: Option<Pair>,
}

/// An index entry: the slot's position and its key's hash.
#[derive(Debug, Clone, Copy)]
struct At {
    slot: u32,
    hash: u32,
}

/// The table's 64-bit hash from the stored 32 bits. hashbrown picks the bucket from the low
/// bits and its control byte from the top seven; multiplying by an odd constant spreads all
/// 32 bits into the top ones, so the control bytes still filter well.
fn widen(hash: u32) -> u64 {
    u64::from(hash).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// What [`Store::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    Inserted,
    Replaced,
}

/// One page of [`Store::page`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<'a> {
    pub items: Vec<(&'a str, &'a str)>,
    /// Where the next page starts, or `None` when this page reached the end.
    pub next: Option<Cursor>,
    /// The byte bound ended the page before its item limit (see [`Store::page_within`]).
    pub cut: bool,
}

#[derive(Clone)]
pub struct Store {
    slots: Vec<Slot>,
    index: HashTable<At>,
    hasher: DefaultHashBuilder,
    next_seq: u64,
    live: usize,
    bytes: usize,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            slots: Vec::new(),
            index: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            next_seq: 1,
            live: 0,
            bytes: 0,
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("len", &self.live)
            .field("slots", &self.slots.len())
            .finish()
    }
}

/// Whether index entry `at` holds `key`: the stored hash first, the key only on a match.
fn holds(slots: &[Slot], at: &At, hash: u32, key: &str) -> bool {
    at.hash == hash
        && slots[at.slot as usize]
            .pair
            .as_ref()
            .is_some_and(|pair| pair.key() == key)
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Bytes of keys and values held, for the store-size metric.
    pub fn payload_bytes(&self) -> usize {
        self.bytes
    }

    /// Makes room for `additional` more keys without growing (benchmarks use it to time
    /// the operation rather than a growth that a clone's exact capacity would force).
    pub fn reserve(&mut self, additional: usize) {
        self.slots.reserve(additional);
        self.index.reserve(additional, |at| widen(at.hash));
    }

    fn hash(&self, key: &str) -> u32 {
        // The high half: foldhash mixes best into its upper bits.
        (self.hasher.hash_one(key) >> 32) as u32
    }

    pub fn add(&mut self, key: &str, value: &str) -> Added {
        let hash = self.hash(key);
        let slots = &mut self.slots;
        match self.index.entry(
            widen(hash),
            |at| holds(slots, at, hash, key),
            |at| widen(at.hash),
        ) {
            Entry::Occupied(found) => {
                let slot = &mut slots[found.get().slot as usize];
                if let Some(pair) = slot.pair.as_mut() {
                    self.bytes = self.bytes - pair.len() + key.len() + value.len();
                    *pair = Pair::new(key, value);
                }
                Added::Replaced
            }
            Entry::Vacant(vacant) => {
                let at = u32::try_from(slots.len())
                    .expect("memory runs out long before four billion slots");
                vacant.insert(At { slot: at, hash });
                slots.push(Slot {
                    seq: self.next_seq,
                    hash,
                    pair: Some(Pair::new(key, value)),
                });
                self.next_seq += 1;
                self.live += 1;
                self.bytes += key.len() + value.len();
                Added::Inserted
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        let hash = self.hash(key);
        let at = self
            .index
            .find(widen(hash), |at| holds(&self.slots, at, hash, key))?;
        self.slots[at.slot as usize].pair.as_ref().map(Pair::value)
    }

    /// Removes `key`, returning its entry if it was present.
    pub fn remove(&mut self, key: &str) -> Option<Pair> {
        let hash = self.hash(key);
        let slots = &self.slots;
        let found = self
            .index
            .find_entry(widen(hash), |at| holds(slots, at, hash, key))
            .ok()?;
        let (at, _) = found.remove();
        let pair = self.slots[at.slot as usize].pair.take()?;
        self.live -= 1;
        self.bytes -= pair.len();
        if self.slots.len() - self.live > self.live.max(16) {
            self.compact();
        }
        Some(pair)
    }

    /// Every live entry in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.slots
            .iter()
            .filter_map(|slot| slot.pair.as_ref().map(|pair| (pair.key(), pair.value())))
    }

    /// Up to `limit` entries in insertion order, starting after `after` (the `next` of an
    /// earlier page) or at the beginning.
    pub fn page(&self, after: Option<Cursor>, limit: usize) -> Page<'_> {
        self.page_within(after, limit, usize::MAX, |_, _| 0)
    }

    /// [`page`](Self::page), ending early once the entries' `size` would pass `max_bytes`
    /// (`cut` is then set and `next` continues). The first entry is always taken, so a page
    /// always moves on.
    pub fn page_within(
        &self,
        after: Option<Cursor>,
        limit: usize,
        max_bytes: usize,
        size: impl Fn(&str, &str) -> usize,
    ) -> Page<'_> {
        let start = match after {
            Some(cursor) => self.slots.partition_point(|slot| slot.seq <= cursor),
            None => 0,
        };
        let live = self.slots[start..].iter().filter_map(|slot| {
            let pair = slot.pair.as_ref()?;
            Some((slot.seq, pair.key(), pair.value()))
        });
        let mut items = Vec::with_capacity(limit.min(self.live).min(4096));
        let mut last = None;
        let mut bytes = 0usize;
        // A next page only if a live entry remains past the last one returned.
        let mut more = false;
        let mut cut = false;
        for (seq, key, value) in live {
            if items.len() == limit {
                more = true;
                break;
            }
            let add = size(key, value);
            if !items.is_empty() && bytes.saturating_add(add) > max_bytes {
                more = true;
                cut = true;
                break;
            }
            bytes += add;
            items.push((key, value));
            last = Some(seq);
        }
        Page {
            items,
            next: if more { last } else { None },
            cut,
        }
    }

    /// Drops tombstones and rebuilds the index from the slots' stored hashes (no key is
    /// read). Runs when dead slots outnumber live ones, so its O(n) is paid for by the n
    /// removes before it.
    fn compact(&mut self) {
        self.slots.retain(|slot| slot.pair.is_some());
        self.slots.shrink_to(self.slots.len() * 2);
        self.index.clear();
        self.index.shrink_to(self.slots.len(), |at| widen(at.hash));
        for (slot, entry) in self.slots.iter().enumerate() {
            let at = At {
                slot: slot as u32,
                hash: entry.hash,
            };
            self.index
                .insert_unique(widen(at.hash), at, |at| widen(at.hash));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(store: &Store) -> Vec<&str> {
        store.iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn entries_come_back_in_insertion_order() {
        let mut store = Store::new();
        for key in ["O", "A", "Z", "B"] {
            assert_eq!(store.add(key, &key.to_lowercase()), Added::Inserted);
        }
        assert_eq!(keys(&store), ["O", "A", "Z", "B"]);
        assert_eq!(store.get("Z"), Some("z"));
        assert_eq!(store.get("missing"), None);
    }

    #[test]
    fn re_adding_a_key_replaces_its_value_and_keeps_its_place() {
        let mut store = Store::new();
        store.add("A", "1");
        store.add("B", "2");
        assert_eq!(store.add("A", "3"), Added::Replaced);
        assert_eq!(store.iter().collect::<Vec<_>>(), [("A", "3"), ("B", "2")]);
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn a_key_and_value_sharing_one_allocation_keep_their_boundary() {
        let mut store = Store::new();
        store.add("ab", "c");
        store.add("a", "bc");
        store.add("", "");
        assert_eq!(store.get("ab"), Some("c"));
        assert_eq!(store.get("a"), Some("bc"));
        assert_eq!(store.get(""), Some(""));
        assert_eq!(store.payload_bytes(), 6);
        let removed = store.remove("a").unwrap();
        assert_eq!((removed.key(), removed.value()), ("a", "bc"));
        assert_eq!(store.payload_bytes(), 3);
    }

    #[test]
    fn a_removed_key_added_again_goes_to_the_end() {
        let mut store = Store::new();
        store.add("A", "1");
        store.add("B", "2");
        assert_eq!(store.remove("A").as_ref().map(Pair::value), Some("1"));
        assert_eq!(store.remove("A"), None);
        store.add("A", "3");
        assert_eq!(keys(&store), ["B", "A"]);
    }

    #[test]
    fn pages_resume_from_their_cursor_even_after_removes() {
        let mut store = Store::new();
        for i in 0..10 {
            store.add(&format!("k{i}"), "v");
        }
        let first = store.page(None, 4);
        assert_eq!(
            first.items.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            ["k0", "k1", "k2", "k3"]
        );
        let first = first.next;
        // The cursor's own entry and the next one disappear before the next page.
        store.remove("k3");
        store.remove("k4");
        let second = store.page(first, 4);
        assert_eq!(
            second.items.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            ["k5", "k6", "k7", "k8"]
        );
        let third = store.page(second.next, 4);
        assert_eq!(
            third.items.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            ["k9"]
        );
        assert_eq!(third.next, None);
    }

    #[test]
    fn a_page_that_ends_exactly_at_the_last_entry_has_no_next() {
        let mut store = Store::new();
        store.add("A", "1");
        store.add("B", "2");
        assert_eq!(store.page(None, 2).next, None);
        store.add("C", "3");
        store.remove("C");
        assert_eq!(store.page(None, 2).next, None, "only a tombstone follows");
    }

    #[test]
    fn compaction_keeps_every_live_entry_findable() {
        let mut store = Store::new();
        for i in 0..1000 {
            store.add(&i.to_string(), &i.to_string());
        }
        for i in (0..1000).filter(|i| i % 10 != 0) {
            store.remove(&i.to_string());
        }
        assert!(store.slots.len() <= 2 * store.len().max(16) + 1);
        for i in (0..1000).step_by(10) {
            assert_eq!(store.get(&i.to_string()), Some(i.to_string().as_str()));
        }
        assert_eq!(store.len(), 100);
    }

    /// The model: a list of (key, value) pairs in order, with the same replace rule.
    #[derive(Debug, Clone)]
    enum Op {
        Add(u8, u8),
        Remove(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..32, any::<u8>()).prop_map(|(k, v)| Op::Add(k, v)),
            (0u8..32).prop_map(Op::Remove),
        ]
    }

    proptest! {
        #[test]
        fn behaves_like_an_ordered_list(ops in proptest::collection::vec(op(), 0..400), limit in 1usize..7, max_bytes in 0usize..12) {
            let mut store = Store::new();
            let mut model: Vec<(String, String)> = Vec::new();
            for op in ops {
                match op {
                    Op::Add(k, v) => {
                        let (k, v) = (k.to_string(), v.to_string());
                        match model.iter_mut().find(|(mk, _)| *mk == k) {
                            Some(entry) => entry.1 = v.clone(),
                            None => model.push((k.clone(), v.clone())),
                        }
                        store.add(&k, &v);
                    }
                    Op::Remove(k) => {
                        let k = k.to_string();
                        let expected = model.iter().position(|(mk, _)| *mk == k).map(|at| model.remove(at).1);
                        prop_assert_eq!(store.remove(&k).map(|pair| pair.value().to_string()), expected);
                    }
                }
                prop_assert_eq!(store.len(), model.len());
            }
            let all: Vec<(String, String)> = store.iter().map(|(k, v)| (k.into(), v.into())).collect();
            prop_assert_eq!(&all, &model);
            for (k, v) in &model {
                prop_assert_eq!(store.get(k), Some(v.as_str()));
            }
            // Paging through everything yields the same list.
            let mut paged = Vec::new();
            let mut cursor = None;
            loop {
                let page = store.page_within(cursor, limit, max_bytes, |k, v| k.len() + v.len());
                let bytes: usize = page.items.iter().map(|(k, v)| k.len() + v.len()).sum();
                prop_assert!(page.items.len() <= limit);
                prop_assert!(page.items.len() == 1 || bytes <= max_bytes);
                prop_assert!(!page.cut || page.next.is_some());
                paged.extend(page.items.iter().map(|(k, v)| (k.to_string(), v.to_string())));
                match page.next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            prop_assert_eq!(paged, model);
        }
    }

    fn apply(store: &mut Store, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Add(k, v) => {
                    store.add(&k.to_string(), &v.to_string());
                }
                Op::Remove(k) => {
                    store.remove(&k.to_string());
                }
            }
        }
    }

    fn sorted(store: &Store) -> Vec<(String, String)> {
        let mut items: Vec<(String, String)> =
            store.iter().map(|(k, v)| (k.into(), v.into())).collect();
        items.sort();
        items
    }

    #[test]
    fn a_run_applied_again_right_after_itself_can_move_a_removed_and_re_added_key() {
        // What a redelivered run without identities can do (see `dedupe`): `remove J; add J;
        // add K` leaves J before K once, K before J twice.
        let run = [Op::Remove(1), Op::Add(1, 0), Op::Add(2, 0)];
        let mut once = Store::new();
        apply(&mut once, &run);
        let mut twice = once.clone();
        apply(&mut twice, &run);
        assert_eq!(keys(&once), ["1", "2"]);
        assert_eq!(keys(&twice), ["2", "1"]);
        assert_eq!(sorted(&once), sorted(&twice));
    }

    proptest! {
        #[test]
        fn a_run_applied_again_right_after_itself_changes_no_key_s_value_or_presence(
            before in proptest::collection::vec(op(), 0..60),
            run in proptest::collection::vec(op(), 0..30),
        ) {
            let mut once = Store::new();
            apply(&mut once, &before);
            apply(&mut once, &run);
            let mut twice = once.clone();
            apply(&mut twice, &run);
            prop_assert_eq!(sorted(&once), sorted(&twice));
            // The order changes only if the run removes a key and adds it back.
            let re_adds = run.iter().enumerate().any(|(at, op)| match op {
                Op::Remove(k) => run[at..].iter().any(|later| matches!(later, Op::Add(j, _) if j == k)),
                Op::Add(..) => false,
            });
            if !re_adds {
                prop_assert_eq!(keys(&once), keys(&twice));
            }
        }
    }
}
