//! Exactly once over a Redis stream without a row per increment.
//!
//! Several workers read one consumer group. An entry is first delivered to one worker
//! (`XREADGROUP >`); if that worker goes quiet past `claimIdleMs` (dead, paused, stuck
//! behind a lock) another one takes it over (`XAUTOCLAIM`), and from then on two workers
//! may hold a copy. Recording every applied id in a unique table settles that, but costs
//! an index entry per increment, written and later deleted: most of Postgres' work.
//!
//! Instead, every Redis + Postgres flush takes an advisory lock on its stream inside its
//! transaction and, holding it, asks Redis which of its entries it still owns:
//!
//! - **Fast path** (a flush's first attempt holding only entries it read itself): the lock
//!   is *shared*, and an entry is applied only if it is still pending for this worker and
//!   was delivered exactly once, i.e. nobody else ever held it. The flush records its ids
//!   in one row of `<prefix>_applied_batches`.
//! - **Exclusive path** (a flush holding entries it claimed, or retrying after a failed
//!   attempt whose commit it cannot be sure of): the lock is *exclusive*, an entry is
//!   applied only if still pending for this worker, and not if a batch row, the
//!   `<prefix>_applied` table (where this path records its ids) or the low-water mark
//!   says it was applied.
//!
//! Why no entry is applied twice. Take two flushes A and B that both apply entry `e`.
//! Redis runs commands one at a time, and each flush saw `e` pending for itself while it
//! held the lock, so between the two checks `e` changed owner (a claim). Say A checked
//! first. The claim came after A's check and B's check after the claim, so B holds `e`
//! through a claim and cannot be on the fast path (`XAUTOCLAIM` counts a delivery; the
//! `JUSTID` refresh of held entries does not, but only a retrying flush refreshes, and a
//! retry is exclusive): B holds the exclusive lock, which it can only get once A, holding the lock in
//! either mode since before its check, has committed or rolled back. If A committed, B
//! finds A's record (a batch row or an `_applied` row) and skips `e`. Records are deleted
//! only below the low-water mark, which never passes an entry still pending; `e` is pending
//! for B, so its record is there. If A rolled back, only B applies `e`.
//!
//! A group lost and recreated (Redis restarted without persistence) knows nothing of the
//! entries workers had read from the old one; its silence about them does not mean another
//! worker took them over. When the group's epoch moved since a worker read what it holds,
//! the held entries pending for no consumer of the new group are *forgotten*, not released:
//! kept, and applied on the exclusive path unless a record or the mark says they were (the
//! mark is held still for a while after such a loss, so their records are still there).
//!
//! A flush whose commit failed in an unknown state retries on the exclusive path, so it
//! finds its own first attempt's record. Held entries that are no longer this worker's
//! are *released*: not applied and not acknowledged (the new owner's flush acknowledges
//! them). A worker paused inside its transaction is cut off by Postgres'
//! `idle_in_transaction_session_timeout`, so a claimer waits at most that long for the lock.

use std::collections::HashSet;

use crate::aggregate::EntryId;

/// The advisory lock of one stream's flushes: the counts table and the stream name
/// hashed, so two deployments sharing a database do not wait for each other.
pub fn lock_key(counts_table: &str, source: &str) -> i64 {
    let hash = crc32c::crc32c_append(crc32c::crc32c(counts_table.as_bytes()), source.as_bytes());
    i64::from(hash)
}

/// Held ids split into those to flush and those released to their new owner. `owned` is
/// `None` when the queue cannot say (the group is gone): then nothing is released, and
/// the records alone decide.
pub fn split(held: &[EntryId], owned: Option<&HashSet<EntryId>>) -> (Vec<EntryId>, Vec<EntryId>) {
    match owned {
        None => (held.to_vec(), Vec::new()),
        Some(owned) => held.iter().partition(|id| owned.contains(id)),
    }
}

/// A batch row's ids: 16 big-endian bytes each, in order.
pub fn pack(ids: &[EntryId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len() * 16);
    for id in ids {
        out.extend_from_slice(&id.ms.to_be_bytes());
        out.extend_from_slice(&id.seq.to_be_bytes());
    }
    out
}

/// The ids of a batch row; `None` if its length is not a whole number of ids (a row this
/// code did not write).
pub fn unpack(bytes: &[u8]) -> Option<Vec<EntryId>> {
    if !bytes.len().is_multiple_of(16) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(16)
            .map(|chunk| {
                let (ms, seq) = chunk.split_at(8);
                EntryId {
                    ms: u64::from_be_bytes(ms.try_into().unwrap_or_default()),
                    seq: u64::from_be_bytes(seq.try_into().unwrap_or_default()),
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(ms: u64, seq: u64) -> EntryId {
        EntryId { ms, seq }
    }

    #[test]
    fn entries_taken_over_are_released_and_the_rest_kept() {
        let held = [id(1, 0), id(2, 0), id(3, 0)];
        let owned: HashSet<EntryId> = [id(1, 0), id(3, 0)].into_iter().collect();
        let (kept, released) = split(&held, Some(&owned));
        assert_eq!(kept, vec![id(1, 0), id(3, 0)]);
        assert_eq!(released, vec![id(2, 0)]);
    }

    #[test]
    fn without_an_answer_from_the_queue_nothing_is_released() {
        let held = [id(1, 0), id(2, 0)];
        assert_eq!(split(&held, None), (held.to_vec(), Vec::new()));
    }

    #[test]
    fn a_row_of_the_wrong_length_is_not_read_as_ids() {
        assert_eq!(unpack(&[0; 15]), None);
        assert_eq!(unpack(&[]), Some(Vec::new()));
    }

    #[test]
    fn streams_and_deployments_have_their_own_locks() {
        assert_ne!(lock_key("a_counts", "s"), lock_key("b_counts", "s"));
        assert_ne!(lock_key("a_counts", "s"), lock_key("a_counts", "t"));
        assert_eq!(lock_key("a_counts", "s"), lock_key("a_counts", "s"));
    }

    proptest! {
        #[test]
        fn packed_ids_read_back_unchanged(raw in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..50)) {
            let ids: Vec<EntryId> = raw.into_iter().map(|(ms, seq)| id(ms, seq)).collect();
            prop_assert_eq!(unpack(&pack(&ids)), Some(ids));
        }

        #[test]
        fn every_held_id_is_kept_or_released_exactly_once(
            held in proptest::collection::btree_set((0u64..20, 0u64..3), 0..30),
            owned in proptest::collection::hash_set((0u64..20, 0u64..3), 0..30),
        ) {
            let held: Vec<EntryId> = held.into_iter().map(|(ms, seq)| id(ms, seq)).collect();
            let owned: HashSet<EntryId> = owned.into_iter().map(|(ms, seq)| id(ms, seq)).collect();
            let (kept, released) = split(&held, Some(&owned));
            prop_assert_eq!(kept.len() + released.len(), held.len());
            prop_assert!(kept.iter().all(|k| owned.contains(k)));
            prop_assert!(released.iter().all(|r| !owned.contains(r)));
        }
    }
}
