//! When `--gap-timeout-ms` gives up on missing sequence numbers.
//!
//! The rule: a missing number is given up on once an event *after* it has waited the timeout.
//! So when the timer fires, every gap below the highest number that has waited that long goes
//! at once, however many there are; giving up one gap per timeout would fall further behind
//! with every lost event of a steady stream.
//!
//! The timer keeps one entry per read that left events held: (receipt time, highest number
//! it left held). An accepted event stays held exactly while its number is at or above the
//! window's next expected one, so an entry whose number is below that is spent. To stay
//! bounded whatever the read rate, a read received within one [`GRAIN`] of the timeout after
//! the newest entry joins that entry instead; the entry then stands for reads received up to
//! a grain after its time, so it expires a grain late. That way a gap is never given up on
//! early, only up to a grain (1/64 of the timeout) late, and entries number at most about 64
//! per timeout.

use std::collections::VecDeque;
use std::ops::Add;
use std::time::Duration;

/// The fraction of the timeout by which reads are grouped.
pub const GRAIN: u32 = 64;

#[derive(Debug)]
pub struct GapTimer<I> {
    /// Timeout plus one grain: how long after an entry's time all its reads have waited the
    /// timeout.
    expiry: Duration,
    grain: Duration,
    /// Oldest first: (receipt time of the first read grouped here, highest number held).
    reads: VecDeque<(I, u64)>,
}

impl<I: Copy + Ord + Add<Duration, Output = I>> GapTimer<I> {
    pub fn new(timeout: Duration) -> Self {
        let grain = timeout / GRAIN;
        GapTimer {
            expiry: timeout + grain,
            grain,
            reads: VecDeque::new(),
        }
    }

    /// A read received at `received` left events held, the highest numbered `highest`.
    /// Reads are reported in the order they were received.
    pub fn held(&mut self, received: I, highest: u64) {
        if let Some((since, newest)) = self.reads.back_mut() {
            if received < *since + self.grain {
                *newest = (*newest).max(highest);
                return;
            }
        }
        self.reads.push_back((received, highest));
    }

    /// When the oldest entry still holding an event (one at or above `next_expected`) will
    /// have waited the timeout; spent entries in front of it are forgotten.
    pub fn deadline(&mut self, next_expected: u64) -> Option<I> {
        while self
            .reads
            .front()
            .is_some_and(|&(_, highest)| highest < next_expected)
        {
            self.reads.pop_front();
        }
        self.reads.front().map(|&(since, _)| since + self.expiry)
    }

    /// The highest number whose event has waited the timeout at `now`, if any: every
    /// missing number below it is to be given up on. Forgets the entries it read.
    pub fn expired(&mut self, now: I) -> Option<u64> {
        let mut highest = None;
        while let Some(&(since, newest)) = self.reads.front() {
            if since + self.expiry > now {
                break;
            }
            highest = highest.max(Some(newest));
            self.reads.pop_front();
        }
        highest
    }

    /// Forgets everything: the window was reset or drained.
    pub fn clear(&mut self) {
        self.reads.clear();
    }

    /// Entries kept (for tests of the bound).
    pub fn len(&self) -> usize {
        self.reads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.reads.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const TIMEOUT: Duration = Duration::from_millis(640);
    const GRAIN_LEN: Duration = Duration::from_millis(10);

    #[test]
    fn every_number_that_waited_the_timeout_expires_at_once() {
        let start = Instant::now();
        let mut timer = GapTimer::new(TIMEOUT);
        // Twenty reads, each leaving one event behind its own gap, within one grain.
        for (offset, seq) in (2..=40).step_by(2).enumerate() {
            timer.held(start + Duration::from_micros(offset as u64), seq);
        }
        assert_eq!(timer.len(), 1);
        let deadline = timer.deadline(1).unwrap();
        assert_eq!(deadline, start + TIMEOUT + GRAIN_LEN);
        assert_eq!(timer.expired(deadline - Duration::from_nanos(1)), None);
        assert_eq!(timer.expired(deadline), Some(40), "all twenty gaps at once");
        assert!(timer.is_empty());
    }

    #[test]
    fn a_number_is_never_given_up_on_before_a_later_event_waited_the_timeout() {
        let start = Instant::now();
        let mut timer = GapTimer::new(TIMEOUT);
        timer.held(start, 5);
        // Grouped with the first read, though received later: the entry expires late enough
        // for it too.
        timer.held(start + GRAIN_LEN - Duration::from_nanos(1), 9);
        timer.held(start + Duration::from_millis(300), 20);
        let first = timer.deadline(1).unwrap();
        assert!(first >= start + GRAIN_LEN + TIMEOUT - Duration::from_nanos(1));
        assert_eq!(timer.expired(first), Some(9));
        // 20 arrived 300 ms after 5: its gap gets its own full timeout.
        let second = timer.deadline(10).unwrap();
        assert_eq!(
            second,
            start + Duration::from_millis(300) + TIMEOUT + GRAIN_LEN
        );
        assert_eq!(timer.expired(second), Some(20));
    }

    #[test]
    fn spent_entries_do_not_set_a_deadline() {
        let start = Instant::now();
        let mut timer = GapTimer::new(TIMEOUT);
        timer.held(start, 5);
        timer.held(start + Duration::from_millis(100), 50);
        // The window moved past 5 on its own (the gap filled).
        assert_eq!(
            timer.deadline(6),
            Some(start + Duration::from_millis(100) + TIMEOUT + GRAIN_LEN)
        );
        assert_eq!(timer.deadline(51), None);
    }

    #[test]
    fn entries_stay_bounded_by_the_grain_whatever_the_read_rate() {
        let start = Instant::now();
        let mut timer = GapTimer::new(TIMEOUT);
        // A read every 100 µs for one timeout: 6,400 reads.
        for read in 0..6_400u64 {
            timer.held(start + Duration::from_micros(read * 100), read + 2);
        }
        assert!(timer.len() <= GRAIN as usize + 1, "{}", timer.len());
    }
}
