//! Which shard a tenant belongs to, and a request's items grouped by shard.
//!
//! A tenant's items all live in one shard so that one writer (the holder of that shard's
//! lock) decides alone whether an item is new: that is what makes counts exact without any
//! coordination between workers. The shard of a tenant is persisted implicitly (its rows
//! are in that shard's store), so the hash must never change: FNV-1a 64 with its standard
//! constants, written out here rather than taken from a crate whose output could change.

use std::collections::BTreeMap;

/// Shards in a store. Fixed once a store has data: changing it would move tenants away
/// from their rows.
pub const SHARDS: u16 = 64;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The stable 64-bit hash tenants are sharded by.
pub fn tenant_hash(tenant: &str) -> u64 {
    tenant.bytes().fold(FNV_OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// The shard (`0..shards`) that owns `tenant`.
pub fn shard_of(tenant: &str, shards: u16) -> u16 {
    // Guarded by config validation; a zero here would be a programming error, not input.
    debug_assert!(shards > 0);
    (tenant_hash(tenant) % u64::from(shards.max(1))) as u16
}

/// One (tenant, id) pair.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Item {
    pub tenant: String,
    pub id: String,
}

/// `items` grouped by shard, each group sorted and without duplicates, so that a store
/// inserts in key order (B-tree pages are visited once, in sequence) and never sees the
/// same pair twice in one batch.
pub fn group_by_shard(items: Vec<Item>, shards: u16) -> BTreeMap<u16, Vec<Item>> {
    let mut groups: BTreeMap<u16, Vec<Item>> = BTreeMap::new();
    for item in items {
        groups
            .entry(shard_of(&item.tenant, shards))
            .or_default()
            .push(item);
    }
    for group in groups.values_mut() {
        sort_dedup(group);
    }
    groups
}

/// Sorts `items` by (tenant, id) and drops repeats.
pub fn sort_dedup(items: &mut Vec<Item>) {
    items.sort_unstable();
    items.dedup();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item(tenant: &str, id: &str) -> Item {
        Item {
            tenant: tenant.into(),
            id: id.into(),
        }
    }

    /// Pinned values: if these change, every existing store's tenants move shards and their
    /// counts restart from zero.
    #[test]
    fn the_hash_never_changes() {
        assert_eq!(tenant_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(tenant_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            shard_of("tenant1", SHARDS),
            (tenant_hash("tenant1") % 64) as u16
        );
    }

    #[test]
    fn groups_are_sorted_and_deduplicated() {
        let items = vec![item("t", "b"), item("t", "a"), item("t", "b")];
        let groups = group_by_shard(items, SHARDS);
        assert_eq!(groups.len(), 1);
        let group = groups.values().next().unwrap();
        assert_eq!(group, &vec![item("t", "a"), item("t", "b")]);
    }

    proptest! {
        #[test]
        fn grouping_keeps_every_distinct_pair_once_in_its_tenants_shard(
            pairs in proptest::collection::vec(("[a-d]{1,2}", "[a-c]{1,2}"), 0..60),
            shards in 1u16..=64,
        ) {
            let items: Vec<Item> = pairs.iter().map(|(t, i)| item(t, i)).collect();
            let mut expected = items.clone();
            sort_dedup(&mut expected);
            let groups = group_by_shard(items, shards);
            let mut seen = Vec::new();
            for (shard, group) in &groups {
                prop_assert!(*shard < shards);
                prop_assert!(group.windows(2).all(|w| w[0] < w[1]));
                for it in group {
                    prop_assert_eq!(shard_of(&it.tenant, shards), *shard);
                }
                seen.extend(group.iter().cloned());
            }
            sort_dedup(&mut seen);
            prop_assert_eq!(seen, expected);
        }
    }
}
