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

/// One request's items, encoded per shard in the form a shard's log stores them:
/// `[tenant length: u16 LE][tenant][id length: u16 LE][id]` per item. Encoding straight from
/// the parsed body costs no allocation per item, and the bytes are both what is appended to
/// the log and what waits in memory to be folded into the index.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    /// (shard, encoded items), in the order shards first appeared.
    pub groups: Vec<(u16, Vec<u8>)>,
    /// Items pushed, duplicates included.
    pub items: usize,
    slots: Vec<u32>,
}

const NO_SLOT: u32 = u32::MAX;

impl Batch {
    pub fn new(shards: u16) -> Self {
        Batch {
            groups: Vec::new(),
            items: 0,
            slots: vec![NO_SLOT; usize::from(shards.max(1))],
        }
    }

    /// Adds one item. Fields are at most [`crate::validate::MAX_FIELD_BYTES`] bytes, which
    /// the u16 lengths hold with room to spare.
    pub fn push(&mut self, tenant: &str, id: &str) {
        let shard = shard_of(tenant, self.slots.len() as u16);
        let slot = &mut self.slots[usize::from(shard)];
        if *slot == NO_SLOT {
            *slot = self.groups.len() as u32;
            self.groups.push((shard, Vec::new()));
        }
        encode_item(&mut self.groups[*slot as usize].1, tenant, id);
        self.items += 1;
    }

    pub fn from_items(items: &[Item], shards: u16) -> Self {
        let mut batch = Batch::new(shards);
        for item in items {
            batch.push(&item.tenant, &item.id);
        }
        batch
    }
}

pub fn encode_item(buf: &mut Vec<u8>, tenant: &str, id: &str) {
    for field in [tenant, id] {
        let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&field.as_bytes()[..usize::from(len)]);
    }
}

/// Encoded items that do not decode: a log record whose checksum matched but whose content
/// is not what this version writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed encoded items at byte {0}")]
pub struct Malformed(pub usize);

/// The (tenant, id) pairs of encoded items, borrowed, appended to `out`.
pub fn decode_items<'a>(
    mut buf: &'a [u8],
    out: &mut Vec<(&'a str, &'a str)>,
) -> Result<(), Malformed> {
    let total = buf.len();
    while !buf.is_empty() {
        let at = total - buf.len();
        let (tenant, rest) = decode_field(buf).ok_or(Malformed(at))?;
        let (id, rest) = decode_field(rest).ok_or(Malformed(at))?;
        out.push((tenant, id));
        buf = rest;
    }
    Ok(())
}

fn decode_field(buf: &[u8]) -> Option<(&str, &[u8])> {
    let len = usize::from(u16::from_le_bytes([*buf.first()?, *buf.get(1)?]));
    let field = buf.get(2..2 + len)?;
    let text = std::str::from_utf8(field).ok()?;
    Some((text, &buf[2 + len..]))
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
        /// Encoding then decoding gives back every pair, each in its tenant's shard's group.
        #[test]
        fn a_batch_decodes_to_what_was_pushed(
            pairs in proptest::collection::vec((".{1,12}", ".{1,12}"), 0..40),
            shards in 1u16..=64,
        ) {
            let mut batch = Batch::new(shards);
            for (tenant, id) in &pairs {
                batch.push(tenant, id);
            }
            prop_assert_eq!(batch.items, pairs.len());
            let mut decoded = Vec::new();
            for (shard, bytes) in &batch.groups {
                let mut group = Vec::new();
                decode_items(bytes, &mut group).unwrap();
                for (tenant, _) in &group {
                    prop_assert_eq!(shard_of(tenant, shards), *shard);
                }
                decoded.extend(group.into_iter().map(|(t, i)| (t.to_string(), i.to_string())));
            }
            let mut expected = pairs.clone();
            expected.sort();
            decoded.sort();
            prop_assert_eq!(decoded, expected);
        }

        /// Cut or corrupted bytes are refused, never read as other items past the damage.
        #[test]
        fn truncated_items_are_malformed(tenant in ".{1,8}", id in ".{1,8}", cut in 1usize..4) {
            let mut buf = Vec::new();
            encode_item(&mut buf, &tenant, &id);
            let short = &buf[..buf.len() - cut.min(buf.len())];
            let mut out = Vec::new();
            prop_assert!(decode_items(short, &mut out).is_err());
        }

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
