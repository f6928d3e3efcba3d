//! The reorder window: events arrive out of order and leave in sequence order.
//!
//! Slot `i` holds sequence number `next + i`. Memory is bounded by `max` slots, however
//! long the stream: an event that would land further ahead than that forces the window to
//! give up on the oldest missing numbers (a *gap*), which are reported so they can be
//! counted and logged rather than silently lost.

use std::collections::VecDeque;

/// What leaves the window, in sequence order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released<T> {
    Event(T),
    /// `count` sequence numbers starting at `first` never arrived and were skipped.
    Gap {
        first: u64,
        count: u64,
    },
}

/// What became of an inserted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Held, or released at once if it was next.
    Accepted,
    /// Its number was already released (or skipped): dropped.
    Stale,
    /// An event with that number is already held: the first one wins.
    Duplicate,
}

#[derive(Debug)]
pub struct ReorderWindow<T> {
    next: u64,
    slots: VecDeque<Option<T>>,
    held: usize,
    max: usize,
}

/// Above this many idle slots of capacity, an emptied window gives the memory back, so a
/// burst of disorder does not raise the resident size for the rest of an endless stream.
const SHRINK_ABOVE: usize = 4_096;

impl<T> ReorderWindow<T> {
    /// A window expecting `next` first and holding at most `max` (at least 1) slots.
    pub fn new(next: u64, max: usize) -> Self {
        ReorderWindow {
            next,
            slots: VecDeque::new(),
            held: 0,
            max: max.max(1),
        }
    }

    /// The sequence number the window waits for.
    pub fn next_expected(&self) -> u64 {
        self.next
    }

    /// How many events are held waiting for a missing number.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Starts over, expecting `next`, dropping anything held.
    pub fn reset(&mut self, next: u64) {
        self.next = next;
        self.slots.clear();
        self.held = 0;
        self.shrink_if_idle();
    }

    /// Inserts `item` with number `seq`; whatever becomes deliverable is pushed onto `out`
    /// in order.
    pub fn insert(&mut self, seq: u64, item: T, out: &mut Vec<Released<T>>) -> Insert {
        if seq < self.next {
            return Insert::Stale;
        }
        let max = self.max as u64;
        if seq - self.next >= max {
            // Make room: everything before `seq - max + 1` is given up on.
            self.release_below(seq - max + 1, out);
        }
        let offset = (seq - self.next) as usize;
        if offset >= self.slots.len() {
            self.slots.resize_with(offset + 1, || None);
        }
        let slot = &mut self.slots[offset];
        if slot.is_some() {
            return Insert::Duplicate;
        }
        *slot = Some(item);
        self.held += 1;
        self.release_ready(out);
        Insert::Accepted
    }

    /// Gives up on the missing numbers before the first held event, releasing it and
    /// whatever follows it contiguously. Used when a gap has waited too long.
    pub fn skip_gap(&mut self, out: &mut Vec<Released<T>>) {
        if let Some(first_held) = self.slots.iter().position(Option::is_some) {
            self.release_below(self.next + first_held as u64, out);
            self.release_ready(out);
        }
    }

    /// Releases everything held, skipping every gap: the stream has ended.
    pub fn drain_all(&mut self, out: &mut Vec<Released<T>>) {
        while self.held > 0 {
            self.skip_gap(out);
        }
        self.slots.clear();
        self.shrink_if_idle();
    }

    /// Releases the contiguous run of held events at the front.
    fn release_ready(&mut self, out: &mut Vec<Released<T>>) {
        while let Some(Some(_)) = self.slots.front() {
            if let Some(Some(item)) = self.slots.pop_front() {
                out.push(Released::Event(item));
                self.next += 1;
                self.held -= 1;
            }
        }
        self.shrink_if_idle();
    }

    /// Moves `next` up to `floor`, releasing held events and reporting missing runs.
    fn release_below(&mut self, floor: u64, out: &mut Vec<Released<T>>) {
        let mut gap_start = None;
        while self.next < floor {
            match self.slots.pop_front() {
                Some(Some(item)) => {
                    if let Some(first) = gap_start.take() {
                        out.push(Released::Gap {
                            first,
                            count: self.next - first,
                        });
                    }
                    out.push(Released::Event(item));
                    self.held -= 1;
                    self.next += 1;
                }
                Some(None) => {
                    gap_start.get_or_insert(self.next);
                    self.next += 1;
                }
                None => {
                    // Nothing is held beyond this point: jump straight to the floor, however
                    // far it is, without walking each missing number.
                    gap_start.get_or_insert(self.next);
                    self.next = floor;
                }
            }
        }
        if let Some(first) = gap_start {
            out.push(Released::Gap {
                first,
                count: self.next - first,
            });
        }
    }

    fn shrink_if_idle(&mut self) {
        if self.slots.is_empty() && self.slots.capacity() > SHRINK_ABOVE {
            self.slots.shrink_to(SHRINK_ABOVE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn released(window: &mut ReorderWindow<u64>, seqs: &[u64]) -> Vec<Released<u64>> {
        let mut out = Vec::new();
        for &seq in seqs {
            window.insert(seq, seq, &mut out);
        }
        out
    }

    fn events(out: &[Released<u64>]) -> Vec<u64> {
        out.iter()
            .filter_map(|r| match r {
                Released::Event(seq) => Some(*seq),
                Released::Gap { .. } => None,
            })
            .collect()
    }

    #[test]
    fn holds_until_the_gap_fills_then_releases_in_order() {
        let mut window = ReorderWindow::new(1, 100);
        assert!(released(&mut window, &[3, 2, 5]).is_empty());
        assert_eq!(window.held(), 3);
        assert_eq!(events(&released(&mut window, &[1])), vec![1, 2, 3]);
        assert_eq!(window.next_expected(), 4);
        assert_eq!(events(&released(&mut window, &[4])), vec![4, 5]);
        assert_eq!(window.held(), 0);
    }

    #[test]
    fn stale_and_duplicate_numbers_are_reported_not_released() {
        let mut window = ReorderWindow::new(1, 100);
        let mut out = Vec::new();
        assert_eq!(window.insert(1, 1, &mut out), Insert::Accepted);
        assert_eq!(window.insert(1, 1, &mut out), Insert::Stale);
        assert_eq!(window.insert(3, 3, &mut out), Insert::Accepted);
        assert_eq!(window.insert(3, 33, &mut out), Insert::Duplicate);
        assert_eq!(window.insert(2, 2, &mut out), Insert::Accepted);
        assert_eq!(events(&out), vec![1, 2, 3], "the first copy of 3 won");
    }

    #[test]
    fn a_full_window_skips_the_oldest_missing_numbers() {
        let mut window = ReorderWindow::new(1, 4);
        let out = released(&mut window, &[2, 3, 4]);
        assert!(out.is_empty());
        // 5 is 4 ahead of 1: the window gives up on 1.
        let out = released(&mut window, &[5]);
        assert_eq!(
            out,
            vec![
                Released::Gap { first: 1, count: 1 },
                Released::Event(2),
                Released::Event(3),
                Released::Event(4),
                Released::Event(5)
            ]
        );
    }

    #[test]
    fn a_far_jump_is_one_gap_not_a_walk() {
        let mut window = ReorderWindow::new(1, 10);
        let out = released(&mut window, &[u64::MAX - 1]);
        assert_eq!(
            out[0],
            Released::Gap {
                first: 1,
                count: u64::MAX - 11
            }
        );
        assert_eq!(window.held(), 1);
        assert_eq!(window.next_expected(), u64::MAX - 10);
    }

    #[test]
    fn skip_gap_releases_up_to_the_next_missing_number() {
        let mut window = ReorderWindow::new(1, 100);
        released(&mut window, &[3, 4, 7]);
        let mut out = Vec::new();
        window.skip_gap(&mut out);
        assert_eq!(
            out,
            vec![
                Released::Gap { first: 1, count: 2 },
                Released::Event(3),
                Released::Event(4)
            ]
        );
        assert_eq!(window.next_expected(), 5);
        assert_eq!(window.held(), 1);
    }

    #[test]
    fn drain_all_releases_everything_in_order() {
        let mut window = ReorderWindow::new(1, 100);
        released(&mut window, &[9, 3, 4, 7]);
        let mut out = Vec::new();
        window.drain_all(&mut out);
        assert_eq!(events(&out), vec![3, 4, 7, 9]);
        let skipped: u64 = out
            .iter()
            .map(|r| {
                if let Released::Gap { count, .. } = r {
                    *count
                } else {
                    0
                }
            })
            .sum();
        assert_eq!(skipped, 5, "1, 2, 5, 6 and 8");
        assert_eq!((window.held(), window.next_expected()), (0, 10));
    }

    proptest! {
        /// Any permutation in which no event is further than the window ahead of the
        /// lowest missing number comes out in order, with no gap.
        #[test]
        fn any_permutation_within_the_window_is_delivered_in_order(
            batches in proptest::collection::vec(
                (1usize..50).prop_flat_map(|len| Just((0..len as u64).collect::<Vec<_>>()).prop_shuffle()),
                1..40,
            )
        ) {
            let mut window = ReorderWindow::new(1, 64);
            let mut out = Vec::new();
            let mut base = 1;
            let mut expected = Vec::new();
            for batch in &batches {
                for offset in batch {
                    window.insert(base + offset, base + offset, &mut out);
                }
                expected.extend(base..base + batch.len() as u64);
                base += batch.len() as u64;
            }
            prop_assert_eq!(window.held(), 0);
            prop_assert!(out.iter().all(|r| matches!(r, Released::Event(_))));
            prop_assert_eq!(events(&out), expected);
        }

        /// Whatever arrives, releases are strictly increasing, every number below `next`
        /// is accounted for exactly once (event or gap), and the window stays bounded.
        #[test]
        fn releases_account_for_every_number_once(
            seqs in proptest::collection::vec(1u64..500, 0..300),
            max in 1usize..40,
        ) {
            let mut window = ReorderWindow::new(1, max);
            let mut out = Vec::new();
            for &seq in &seqs {
                window.insert(seq, seq, &mut out);
                prop_assert!(window.held() <= max);
            }
            window.drain_all(&mut out);
            let mut covered = 1u64;
            for r in &out {
                match r {
                    Released::Event(seq) => { prop_assert_eq!(*seq, covered); covered += 1; }
                    Released::Gap { first, count } => {
                        prop_assert_eq!(*first, covered);
                        prop_assert!(*count > 0);
                        covered += count;
                    }
                }
            }
            prop_assert_eq!(covered, window.next_expected());
        }
    }
}
