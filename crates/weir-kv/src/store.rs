//! The insertion-ordered map at the heart of kv: O(1) average add, get and remove, and
//! iteration in insertion order without sorting, in pages that a cursor resumes.
//!
//! Entries live in one vector in insertion order. A remove leaves a tombstone instead of
//! shifting what follows (that shift is what made the seed's remove O(n)), and the vector is
//! compacted once tombstones outnumber live entries, so the cost is O(1) amortized and at most
//! half the slots are ever dead. The index is a hash table of positions into that vector that
//! hashes and compares through the vector, so every key is stored once.
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

#[derive(Debug, Clone)]
struct Slot {
    seq: u64,
    /// `None` once removed: a tombstone, skipped by reads, dropped by compaction.
    entry: Option<(Box<str>, Box<str>)>,
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
}

#[derive(Clone)]
pub struct Store {
    slots: Vec<Slot>,
    index: HashTable<usize>,
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

fn key_of(slot: &Slot) -> &str {
    slot.entry.as_ref().map_or("", |(key, _)| key)
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

    pub fn add(&mut self, key: &str, value: &str) -> Added {
        let hash = self.hasher.hash_one(key);
        let slots = &mut self.slots;
        match self.index.entry(
            hash,
            |&at| key_of(&slots[at]) == key,
            |&at| self.hasher.hash_one(key_of(&slots[at])),
        ) {
            Entry::Occupied(found) => {
                if let Some((_, old)) = slots[*found.get()].entry.as_mut() {
                    self.bytes = self.bytes - old.len() + value.len();
                    *old = value.into();
                }
                Added::Replaced
            }
            Entry::Vacant(vacant) => {
                vacant.insert(slots.len());
                slots.push(Slot {
                    seq: self.next_seq,
                    entry: Some((key.into(), value.into())),
                });
                self.next_seq += 1;
                self.live += 1;
                self.bytes += key.len() + value.len();
                Added::Inserted
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        let hash = self.hasher.hash_one(key);
        let at = self
            .index
            .find(hash, |&at| key_of(&self.slots[at]) == key)?;
        self.slots[*at].entry.as_ref().map(|(_, value)| &**value)
    }

    /// Removes `key`, returning its value if it was present.
    pub fn remove(&mut self, key: &str) -> Option<Box<str>> {
        let hash = self.hasher.hash_one(key);
        let slots = &self.slots;
        let found = self
            .index
            .find_entry(hash, |&at| key_of(&slots[at]) == key)
            .ok()?;
        let (at, _) = found.remove();
        let (key, value) = self.slots[at].entry.take()?;
        self.live -= 1;
        self.bytes -= key.len() + value.len();
        if self.slots.len() - self.live > self.live.max(16) {
            self.compact();
        }
        Some(value)
    }

    /// Every live entry in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.slots
            .iter()
            .filter_map(|slot| slot.entry.as_ref().map(|(k, v)| (&**k, &**v)))
    }

    /// Up to `limit` entries in insertion order, starting after `after` (the `next` of an
    /// earlier page) or at the beginning.
    pub fn page(&self, after: Option<Cursor>, limit: usize) -> Page<'_> {
        let start = match after {
            Some(cursor) => self.slots.partition_point(|slot| slot.seq <= cursor),
            None => 0,
        };
        let mut live = self.slots[start..].iter().filter_map(|slot| {
            let (key, value) = slot.entry.as_ref()?;
            Some((slot.seq, &**key, &**value))
        });
        let taken: Vec<_> = live.by_ref().take(limit).collect();
        // A next page only if a live entry remains past the last one returned.
        let next = match live.next() {
            Some(_) => taken.last().map(|(seq, _, _)| *seq),
            None => None,
        };
        Page {
            items: taken.into_iter().map(|(_, k, v)| (k, v)).collect(),
            next,
        }
    }

    /// Drops tombstones and re-points the index. Runs when dead slots outnumber live ones,
    /// so its O(n) is paid for by the n removes before it.
    fn compact(&mut self) {
        self.slots.retain(|slot| slot.entry.is_some());
        self.slots.shrink_to(self.slots.len() * 2);
        self.index.clear();
        self.index.shrink_to(self.slots.len(), |_| 0);
        for (at, slot) in self.slots.iter().enumerate() {
            let hash = self.hasher.hash_one(key_of(slot));
            let slots = &self.slots;
            self.index.insert_unique(hash, at, |&other| {
                self.hasher.hash_one(key_of(&slots[other]))
            });
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
    fn a_removed_key_added_again_goes_to_the_end() {
        let mut store = Store::new();
        store.add("A", "1");
        store.add("B", "2");
        assert_eq!(store.remove("A").as_deref(), Some("1"));
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
        fn behaves_like_an_ordered_list(ops in proptest::collection::vec(op(), 0..400), limit in 1usize..7) {
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
                        prop_assert_eq!(store.remove(&k).map(String::from), expected);
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
                let page = store.page(cursor, limit);
                paged.extend(page.items.iter().map(|(k, v)| (k.to_string(), v.to_string())));
                match page.next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            prop_assert_eq!(paged, model);
        }
    }
}
