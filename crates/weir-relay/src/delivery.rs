//! How long events wait in the relay, measured without a clock read per event.
//!
//! The source session reads the clock once per read, and every event of that read shares
//! its receipt time. From there:
//! - Delivery latency is sampled: an accepted event whose sequence number is a multiple of
//!   [`SAMPLE_EVERY`], received at least [`SAMPLE_GAP`] after the last sample, is remembered
//!   with its receipt time, and when the window's next expected number passes it (it was
//!   released, delivered or skipped over), its wait is reported. Choosing by number rather
//!   than by position keeps the sample independent of how the stream is shuffled. The gap
//!   keeps samples under 64 between two drains of the exporter (its upkeep every 5 s, or a
//!   scrape): `metrics-exporter-prometheus` 0.18 drains a histogram's newest block of 64
//!   first, and a summary with no bucket yet (at start, or after a minute without samples)
//!   then drops every older sample, so a burst of thousands would show as its last few.
//! - The age of the oldest held event comes from one entry per read that still has an event
//!   in the window: (receipt time, highest number accepted from it). An accepted event is
//!   held exactly while its number is at or above the next expected one, so the first entry
//!   whose highest number is still ahead is the oldest read with an event held.
//!
//! Both are bounded: past [`MAX_SAMPLES`] pending samples new ones are not taken, and past
//! [`MAX_READS`] entries a read is merged into the newest entry (whose older receipt time
//! then stands for it: the age can only be overstated, never missed).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

/// An event whose number is a multiple of this may have its delivery latency recorded.
pub const SAMPLE_EVERY: u64 = 16;
/// At most one sample per this long (of receipt time): 10 per second, 50 per upkeep.
pub const SAMPLE_GAP: Duration = Duration::from_millis(100);
/// Sampled events held at once, at most.
pub const MAX_SAMPLES: usize = 4_096;
/// Reads with an event still held, remembered separately, at most.
pub const MAX_READS: usize = 1_024;

#[derive(Debug, Default)]
pub struct DeliveryClock {
    /// Sampled events not yet released: (number, receipt), lowest number first.
    samples: BinaryHeap<Reverse<(u64, Instant)>>,
    /// Reads with (possibly) an event still held, oldest first: (receipt, highest accepted).
    reads: VecDeque<(Instant, u64)>,
    /// No sample is taken from a read received before this.
    next_sample: Option<Instant>,
}

impl DeliveryClock {
    /// Whether the event numbered `seq` is one whose latency is recorded.
    #[inline]
    pub fn is_sampled(seq: u64) -> bool {
        seq.is_multiple_of(SAMPLE_EVERY)
    }

    /// An event numbered `seq` ([`DeliveryClock::is_sampled`]), received at `received`, was
    /// accepted by the window: it becomes a sample unless the last one is too recent.
    pub fn sample(&mut self, seq: u64, received: Instant) {
        if self.next_sample.is_some_and(|next| received < next) {
            return;
        }
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(Reverse((seq, received)));
            self.next_sample = Some(received + SAMPLE_GAP);
        }
    }

    /// A read received at `received` is handled: `highest` is the highest number the window
    /// accepted from it (`None` if it accepted none), `next_expected` the window's cursor now.
    pub fn read(&mut self, received: Instant, highest: Option<u64>, next_expected: u64) {
        let Some(highest) = highest.filter(|&highest| highest >= next_expected) else {
            // Nothing of this read is held.
            return;
        };
        if self.reads.len() >= MAX_READS {
            if let Some(newest) = self.reads.back_mut() {
                newest.1 = newest.1.max(highest);
                return;
            }
        }
        self.reads.push_back((received, highest));
    }

    /// Every number below `next_expected` has left the window: each sample among them is
    /// passed to `record` with its wait until `now()` (read once, and only if needed), and
    /// reads with nothing held any more are forgotten.
    pub fn released(
        &mut self,
        next_expected: u64,
        now: impl FnOnce() -> Instant,
        mut record: impl FnMut(Duration),
    ) {
        let mut now = Some(now);
        let mut at = None;
        while let Some(&Reverse((seq, received))) = self.samples.peek() {
            if seq >= next_expected {
                break;
            }
            self.samples.pop();
            let at = *at.get_or_insert_with(|| (now.take().expect("read once"))());
            record(at.saturating_duration_since(received));
        }
        while self
            .reads
            .front()
            .is_some_and(|&(_, highest)| highest < next_expected)
        {
            self.reads.pop_front();
        }
    }

    /// When the oldest event still held was received, if one is.
    pub fn oldest_held(&self) -> Option<Instant> {
        self.reads.front().map(|&(received, _)| received)
    }

    /// The window dropped everything it held (a new stream starts).
    pub fn clear(&mut self) {
        self.samples.clear();
        self.reads.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn a_sample_is_recorded_once_the_cursor_passes_it() {
        let t0 = Instant::now();
        let mut clock = DeliveryClock::default();
        let (first, second) = (SAMPLE_EVERY, 2 * SAMPLE_EVERY);
        assert!(DeliveryClock::is_sampled(first) && !DeliveryClock::is_sampled(first + 1));
        clock.sample(first, t0);
        clock.sample(second, ms(t0, 150));
        let mut waits = Vec::new();
        clock.released(first, || ms(t0, 50), |wait| waits.push(wait));
        assert!(waits.is_empty(), "the first is still the next expected");
        clock.released(first + 1, || ms(t0, 100), |wait| waits.push(wait));
        assert_eq!(waits, [Duration::from_millis(100)]);
        clock.released(1_000, || ms(t0, 400), |wait| waits.push(wait));
        assert_eq!(waits[1], Duration::from_millis(250));
        assert_eq!(waits.len(), 2);
    }

    #[test]
    fn samples_are_at_least_the_gap_apart() {
        let t0 = Instant::now();
        let mut clock = DeliveryClock::default();
        for n in 1..=20u64 {
            // Two sampled numbers per read, a read every 30 ms.
            let received = ms(t0, 30 * n);
            clock.sample(2 * n * SAMPLE_EVERY, received);
            clock.sample((2 * n + 1) * SAMPLE_EVERY, received);
        }
        let mut received = Vec::new();
        clock.released(u64::MAX, || ms(t0, 1_000), |wait| received.push(wait));
        // Reads at 30, 150, 270, ... 570 ms: one sample every four reads.
        assert_eq!(received.len(), 5, "{received:?}");
    }

    #[test]
    fn the_clock_is_not_read_when_nothing_is_released() {
        let mut clock = DeliveryClock::default();
        clock.sample(10 * SAMPLE_EVERY, Instant::now());
        clock.released(10, || panic!("no clock read needed"), |_| {});
    }

    #[test]
    fn the_oldest_held_read_is_the_first_with_a_number_still_ahead() {
        let t0 = Instant::now();
        let mut clock = DeliveryClock::default();
        // Read 1 brings 3 and 5 (1 and 2 missing), read 2 brings 2 (1 still missing).
        clock.read(t0, Some(5), 1);
        clock.read(ms(t0, 10), Some(2), 1);
        assert_eq!(clock.oldest_held(), Some(t0));
        // 1 arrives in read 3: 1, 2, 3 are released, 5 is held (4 missing).
        clock.read(ms(t0, 20), Some(1), 4);
        clock.released(4, Instant::now, |_| {});
        assert_eq!(clock.oldest_held(), Some(t0), "5 came with the first read");
        clock.released(6, Instant::now, |_| {});
        assert_eq!(clock.oldest_held(), None);
        // A read whose events were all released at once is not remembered.
        clock.read(ms(t0, 30), Some(6), 7);
        clock.read(ms(t0, 30), None, 7);
        assert_eq!(clock.oldest_held(), None);
    }

    #[test]
    fn memory_is_bounded_and_the_age_only_overstated() {
        let t0 = Instant::now();
        let mut clock = DeliveryClock::default();
        for n in 0..(MAX_READS as u64 + 10) {
            clock.read(ms(t0, n), Some(100 + n), 1);
        }
        assert_eq!(clock.reads.len(), MAX_READS);
        let gap = SAMPLE_GAP.as_millis() as u64;
        for n in 0..(MAX_SAMPLES as u64 + 10) {
            clock.sample(SAMPLE_EVERY * (n + 1), ms(t0, gap * n));
        }
        assert_eq!(clock.samples.len(), MAX_SAMPLES);
        // Everything but the merged reads is released: the newest entry, which stands for
        // them with its own (older) receipt time, stays.
        clock.released(100 + MAX_READS as u64, Instant::now, |_| {});
        assert_eq!(
            clock.oldest_held(),
            Some(ms(t0, MAX_READS as u64 - 1)),
            "the merged reads keep the entry they were merged into"
        );
        clock.released(u64::MAX, Instant::now, |_| {});
        assert_eq!(clock.oldest_held(), None);
        assert!(clock.samples.is_empty());
    }
}
