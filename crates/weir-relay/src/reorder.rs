//! The reorder window: events arrive out of order and leave in sequence order.
//!
//! Slot `i` holds sequence number `next + i`. Memory is bounded by `max` slots, however
//! long the stream: an event that would land further ahead than that forces the window to
//! give up on the oldest missing numbers (a *gap*), which are reported so they can be
//! counted and logged rather than silently lost. An event implausibly far ahead (more than
//! `max_ahead` past the next expected number) is refused instead: skipping everything before
//! it would turn the rest of an honest stream stale because of one bad number.
//!
//! The cursor never wraps: numbers stop at [`MAX_SEQUENCE`], so the one after the last still
//! fits in a `u64`, and a window that delivered it takes nothing more.

use std::collections::VecDeque;
use std::num::NonZeroUsize;

use crate::event::MAX_SEQUENCE;

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
    /// Further ahead of the next expected number than the window accepts: dropped, and the
    /// window is left as it was.
    TooFarAhead,
}

#[derive(Debug)]
pub struct ReorderWindow<T> {
    next: u64,
    slots: VecDeque<Option<T>>,
    held: usize,
    max: usize,
    max_ahead: u64,
}

/// Above this many idle slots of capacity, an emptied window gives the memory back, so a
/// burst of disorder does not raise the resident size for the rest of an endless stream.
const SHRINK_ABOVE: usize = 4_096;

impl<T> ReorderWindow<T> {
    /// A window expecting `next` first, holding at most `max` slots, and refusing numbers
    /// more than `max_ahead` past the next expected one.
    pub fn new(next: u64, max: NonZeroUsize, max_ahead: u64) -> Self {
        ReorderWindow {
            next,
            slots: VecDeque::new(),
            held: 0,
            max: max.get(),
            max_ahead,
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
        let Some(ahead) = seq.checked_sub(self.next) else {
            return Insert::Stale;
        };
        if ahead > self.max_ahead || seq > MAX_SEQUENCE {
            return Insert::TooFarAhead;
        }
        let max = self.max as u64;
        if ahead >= max {
            // Make room: everything before `seq - max + 1` is given up on. `seq >= max`
            // because `seq - next >= max`.
            self.release_below(seq - max + 1, out);
        }
        // Below `max` now, which is a `usize`.
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

    /// Gives up on every missing number below `seq` and releases everything up to it, and
    /// whatever follows contiguously. Used when the event numbered `seq` has waited too long:
    /// every gap before it goes at once. Nothing happens if `seq` was already passed.
    pub fn give_up_through(&mut self, seq: u64, out: &mut Vec<Released<T>>) {
        if seq < self.next {
            return;
        }
        // `seq` is a held number, so at most MAX_SEQUENCE: the floor fits.
        self.release_below(seq.saturating_add(1), out);
        self.release_ready(out);
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
                self.advance();
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
                    self.advance();
                }
                Some(None) => {
                    gap_start.get_or_insert(self.next);
                    self.advance();
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

    /// Steps past the number just handled. Held numbers are at most [`MAX_SEQUENCE`], so this
    /// reaches `u64::MAX` at most, meaning "every number is handled"; saturating rather than
    /// wrapping keeps that true even if the invariant were broken.
    fn advance(&mut self) {
        self.next = self.next.saturating_add(1);
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

    fn new_window(next: u64, max: usize) -> ReorderWindow<u64> {
        ReorderWindow::new(next, NonZeroUsize::new(max).unwrap(), u64::MAX)
    }

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
        let mut window = new_window(1, 100);
        assert!(released(&mut window, &[3, 2, 5]).is_empty());
        assert_eq!(window.held(), 3);
        assert_eq!(events(&released(&mut window, &[1])), vec![1, 2, 3]);
        assert_eq!(window.next_expected(), 4);
        assert_eq!(events(&released(&mut window, &[4])), vec![4, 5]);
        assert_eq!(window.held(), 0);
    }

    #[test]
    fn stale_and_duplicate_numbers_are_reported_not_released() {
        let mut window = new_window(1, 100);
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
        let mut window = new_window(1, 4);
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
        let mut window = new_window(1, 10);
        let out = released(&mut window, &[MAX_SEQUENCE - 2]);
        assert_eq!(
            out[0],
            Released::Gap {
                first: 1,
                count: MAX_SEQUENCE - 12
            }
        );
        assert_eq!(window.held(), 1);
        assert_eq!(window.next_expected(), MAX_SEQUENCE - 11);
    }

    #[test]
    fn a_number_too_far_ahead_is_refused_and_the_stream_carries_on() {
        let mut window = ReorderWindow::new(1, NonZeroUsize::new(10).unwrap(), 100);
        let mut out = Vec::new();
        assert_eq!(window.insert(1, 1, &mut out), Insert::Accepted);
        assert_eq!(
            window.insert(1_000_000_000_000, 0, &mut out),
            Insert::TooFarAhead
        );
        for seq in 2..=1000 {
            assert_eq!(window.insert(seq, seq, &mut out), Insert::Accepted, "{seq}");
        }
        assert_eq!(events(&out), (1..=1000).collect::<Vec<_>>());
        assert_eq!(
            window.insert(1001 + 101, 0, &mut out),
            Insert::TooFarAhead,
            "101 past the next expected 1001"
        );
        assert_eq!(window.insert(1001 + 100, 0, &mut out), Insert::Accepted);
    }

    #[test]
    fn the_last_number_is_delivered_once_and_the_cursor_never_wraps() {
        let mut window = new_window(MAX_SEQUENCE, 10);
        let mut out = Vec::new();
        assert_eq!(
            window.insert(MAX_SEQUENCE, MAX_SEQUENCE, &mut out),
            Insert::Accepted
        );
        assert_eq!(events(&out), vec![MAX_SEQUENCE]);
        assert_eq!(window.next_expected(), MAX_SEQUENCE + 1);
        for past in [MAX_SEQUENCE + 1, u64::MAX] {
            assert_eq!(
                window.insert(past, 0, &mut out),
                Insert::TooFarAhead,
                "past the last number there is nothing"
            );
        }
        assert_eq!(window.insert(1, 1, &mut out), Insert::Stale);
        assert_eq!(window.next_expected(), MAX_SEQUENCE + 1, "no wrap to 0");
        let mut fresh = new_window(MAX_SEQUENCE - 2, 2);
        assert_eq!(fresh.insert(u64::MAX, 0, &mut out), Insert::TooFarAhead);
        out.clear();
        fresh.insert(MAX_SEQUENCE, MAX_SEQUENCE, &mut out);
        fresh.drain_all(&mut out);
        assert_eq!(fresh.next_expected(), MAX_SEQUENCE + 1);
        assert_eq!(events(&out), vec![MAX_SEQUENCE]);
    }

    #[test]
    fn skip_gap_releases_up_to_the_next_missing_number() {
        let mut window = new_window(1, 100);
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
    fn give_up_through_releases_every_gap_below_the_number_at_once() {
        let mut window = new_window(1, 100);
        released(&mut window, &[2, 4, 6, 8, 9, 12]);
        let mut out = Vec::new();
        window.give_up_through(6, &mut out);
        assert_eq!(events(&out), vec![2, 4, 6]);
        assert_eq!(window.next_expected(), 7, "7 is missing and 6 is not late");
        out.clear();
        window.give_up_through(3, &mut out);
        assert!(out.is_empty(), "already passed");
        window.give_up_through(8, &mut out);
        assert_eq!(events(&out), vec![8, 9], "9 follows 8 contiguously");
        assert_eq!((window.next_expected(), window.held()), (10, 1));
    }

    #[test]
    fn drain_all_releases_everything_in_order() {
        let mut window = new_window(1, 100);
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
            let mut window = new_window(1, 64);
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
            max_ahead in 40u64..600,
        ) {
            let mut window = ReorderWindow::new(1, NonZeroUsize::new(max).unwrap(), max_ahead);
            let mut out = Vec::new();
            for &seq in &seqs {
                let next = window.next_expected();
                let outcome = window.insert(seq, seq, &mut out);
                prop_assert!(window.held() <= max);
                prop_assert_eq!(
                    outcome == Insert::TooFarAhead,
                    seq >= next && seq - next > max_ahead
                );
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
