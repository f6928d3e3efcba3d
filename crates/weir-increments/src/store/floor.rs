//! The low-water mark of a stream: every entry id below it was applied (or dead-lettered)
//! and acknowledged, so a copy of such an entry still held by a worker that was paused,
//! or whose flush waited on a lock, is a duplicate whatever `<prefix>_applied` remembers.
//!
//! The mark lives in Postgres next to the totals. A flush reads it under a share lock in
//! its own transaction and records only the ids at or above it; pruning raises it under an
//! exclusive lock before it forgets the recorded ids below it. So an id is either below a
//! mark every later flush sees, or still recorded: pruning can never readmit a stale copy.

use crate::aggregate::EntryId;

/// How far the mark may move, from the consumer group's state in Redis: below the oldest
/// entry still pending (delivered, not acknowledged), and not beyond the last entry the
/// group delivered. Everything below was delivered and acknowledged, and an
/// acknowledgement only ever follows the commit that applied the entry (or its
/// dead-lettering).
pub fn candidate(oldest_pending: Option<EntryId>, last_delivered: EntryId) -> EntryId {
    let after_last = EntryId {
        ms: last_delivered.ms,
        seq: last_delivered.seq.saturating_add(1),
    };
    oldest_pending.map_or(after_last, |oldest| oldest.min(after_last))
}

/// The ids of a flush to record as applied: those at or above `floor`, sorted and without
/// repeats, so that concurrent flushes take the unique index in one order and cannot
/// deadlock. Also returns how many held ids were fenced off by the mark.
pub fn ids_to_record(ids: impl Iterator<Item = EntryId>, floor: EntryId) -> (Vec<EntryId>, usize) {
    let mut fenced = 0;
    let mut kept: Vec<EntryId> = ids
        .filter(|id| {
            let above = *id >= floor;
            fenced += usize::from(!above);
            above
        })
        .collect();
    kept.sort_unstable();
    kept.dedup();
    (kept, fenced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(ms: u64, seq: u64) -> EntryId {
        EntryId { ms, seq }
    }

    #[test]
    fn the_candidate_stops_at_the_oldest_pending_entry() {
        assert_eq!(candidate(Some(id(5, 2)), id(9, 0)), id(5, 2));
    }

    #[test]
    fn without_pending_entries_the_candidate_is_just_past_the_last_delivered() {
        assert_eq!(candidate(None, id(9, 0)), id(9, 1));
        // A group created at "0" that delivered nothing yet moves nothing.
        assert_eq!(candidate(None, id(0, 0)), id(0, 1));
    }

    #[test]
    fn an_undelivered_id_never_falls_below_the_candidate() {
        // Pending cannot be beyond the last delivered, but a bad reply must not let the
        // mark pass entries the group never handed out.
        assert_eq!(candidate(Some(id(20, 0)), id(9, 0)), id(9, 1));
    }

    #[test]
    fn ids_below_the_floor_are_fenced_and_the_rest_sorted_once() {
        let held = [id(7, 0), id(3, 1), id(9, 4), id(7, 0), id(5, 0)];
        let (kept, fenced) = ids_to_record(held.into_iter(), id(5, 0));
        assert_eq!(kept, vec![id(5, 0), id(7, 0), id(9, 4)]);
        assert_eq!(fenced, 1);
    }

    proptest! {
        #[test]
        fn every_held_id_is_either_recorded_or_fenced(
            raw in proptest::collection::vec((0u64..50, 0u64..4), 0..60),
            floor in (0u64..50, 0u64..4),
        ) {
            let held: Vec<EntryId> = raw.iter().map(|&(ms, seq)| id(ms, seq)).collect();
            let floor = id(floor.0, floor.1);
            let (kept, fenced) = ids_to_record(held.iter().copied(), floor);
            prop_assert!(kept.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(kept.iter().all(|k| *k >= floor));
            prop_assert_eq!(fenced, held.iter().filter(|h| **h < floor).count());
            for h in held.iter().filter(|h| **h >= floor) {
                prop_assert!(kept.contains(h));
            }
        }
    }
}
