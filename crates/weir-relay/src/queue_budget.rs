//! The cap on bytes queued for all clients together.
//!
//! Each client's queue is capped on its own (`clientBuffer`), but many stuck clients under
//! that cap can still hold the machine's memory between them. When their total is over the
//! budget, the clients with the largest queues go first: they are the furthest behind and
//! free the most memory each, so the fewest clients are dropped.

use crate::router::ConnId;

/// Which connections to drop so that what stays queued is at most `budget` bytes, given each
/// connection's queued bytes. Largest queues first; ties broken by connection id, oldest
/// first, so the choice is deterministic.
pub fn over_budget(mut queues: Vec<(ConnId, usize)>, budget: usize) -> Vec<ConnId> {
    let mut total: usize = queues
        .iter()
        .fold(0usize, |sum, (_, queued)| sum.saturating_add(*queued));
    if total <= budget {
        return Vec::new();
    }
    queues.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut dropped = Vec::new();
    for (conn, queued) in queues {
        if total <= budget {
            break;
        }
        total -= queued;
        dropped.push(conn);
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn under_budget_nobody_is_dropped() {
        assert!(over_budget(vec![(1, 10), (2, 20)], 30).is_empty());
        assert!(over_budget(Vec::new(), 0).is_empty());
    }

    #[test]
    fn the_largest_queues_go_first_until_the_rest_fits() {
        let queues = vec![(1, 10), (2, 50), (3, 30), (4, 30), (5, 5)];
        assert_eq!(over_budget(queues.clone(), 100), vec![2]);
        assert_eq!(over_budget(queues.clone(), 40), vec![2, 3, 4]);
        assert_eq!(over_budget(queues, 0), vec![2, 3, 4, 1, 5]);
    }

    proptest! {
        #[test]
        fn what_stays_fits_and_no_smaller_queue_goes_before_a_larger_one(
            queued in proptest::collection::vec(0usize..1_000, 0..50),
            budget in 0usize..20_000,
        ) {
            let queues: Vec<(ConnId, usize)> =
                queued.iter().enumerate().map(|(i, q)| (i as ConnId, *q)).collect();
            let dropped = over_budget(queues.clone(), budget);
            let kept: usize = queues
                .iter()
                .filter(|(conn, _)| !dropped.contains(conn))
                .map(|(_, q)| q)
                .sum();
            prop_assert!(kept <= budget);
            let smallest_dropped = dropped.iter().map(|c| queued[*c as usize]).min();
            let largest_kept = queues
                .iter()
                .filter(|(conn, _)| !dropped.contains(conn))
                .map(|(_, q)| *q)
                .max();
            if let (Some(dropped), Some(kept)) = (smallest_dropped, largest_kept) {
                prop_assert!(dropped >= kept);
            }
        }
    }
}
