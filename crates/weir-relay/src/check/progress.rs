//! Progress on stderr: a bar redrawn in place on a terminal, one plain line per interval
//! otherwise (so logs captured to a file stay readable). Counters are atomics bumped once per
//! buffer, not per line, so that counting never shows up next to sending and checking.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Counters {
    pub events_sent: AtomicU64,
    pub notifications: AtomicU64,
}

impl Counters {
    pub fn events_sent(&self) -> u64 {
        self.events_sent.load(Ordering::Relaxed)
    }

    pub fn notifications(&self) -> u64 {
        self.notifications.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub events_sent: u64,
    pub events_total: u64,
    pub notifications: u64,
    pub notifications_total: u64,
    pub elapsed: Duration,
}

const BAR_WIDTH: usize = 24;

/// `[#########...............]  37%  events 3.7M/10M (2.1M/s)  notifications 412k/1.1M (240k/s)`
pub fn bar(s: &Snapshot) -> String {
    let done = fraction(s.events_sent, s.events_total)
        .min(fraction(s.notifications, s.notifications_total));
    let filled = ((done * BAR_WIDTH as f64) as usize).min(BAR_WIDTH);
    format!(
        "[{}{}] {:>3.0}%  {}",
        "#".repeat(filled),
        ".".repeat(BAR_WIDTH - filled),
        done * 100.0,
        line(s)
    )
}

/// `events 3.7M/10M (2.1M/s)  notifications 412k/1.1M (240k/s)`
pub fn line(s: &Snapshot) -> String {
    format!(
        "events {}/{} ({}/s)  notifications {}/{} ({}/s)",
        human(s.events_sent as f64),
        human(s.events_total as f64),
        human(per_second(s.events_sent, s.elapsed)),
        human(s.notifications as f64),
        human(s.notifications_total as f64),
        human(per_second(s.notifications, s.elapsed)),
    )
}

fn fraction(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        1.0
    } else {
        part as f64 / whole as f64
    }
}

pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        0.0
    } else {
        count as f64 / secs
    }
}

/// Three significant digits and a k/M/G suffix.
pub fn human(value: f64) -> String {
    let (scaled, suffix) = if value >= 1e9 {
        (value / 1e9, "G")
    } else if value >= 1e6 {
        (value / 1e6, "M")
    } else if value >= 1e3 {
        (value / 1e3, "k")
    } else {
        return format!("{value:.0}");
    };
    if scaled >= 100.0 {
        format!("{scaled:.0}{suffix}")
    } else if scaled >= 10.0 {
        format!("{scaled:.1}{suffix}")
    } else {
        format!("{scaled:.2}{suffix}")
    }
}

/// `12.3 MiB`
pub fn bytes(value: u64) -> String {
    let v = value as f64;
    if v >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", v / (1u64 << 30) as f64)
    } else if v >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", v / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", v / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_numbers() {
        assert_eq!(human(0.0), "0");
        assert_eq!(human(999.0), "999");
        assert_eq!(human(1_500.0), "1.50k");
        assert_eq!(human(41_200.0), "41.2k");
        assert_eq!(human(10_000_000.0), "10.0M");
        assert_eq!(human(123_456_789.0), "123M");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }

    #[test]
    fn the_bar_follows_the_slower_of_the_two_counts() {
        let snapshot = Snapshot {
            events_sent: 10_000_000,
            events_total: 10_000_000,
            notifications: 250,
            notifications_total: 1_000,
            elapsed: Duration::from_secs(2),
        };
        let bar = bar(&snapshot);
        assert!(bar.starts_with("[######..................]  25%"), "{bar}");
        assert!(bar.contains("events 10.0M/10.0M (5.00M/s)"), "{bar}");
        assert!(bar.contains("notifications 250/1.00k (125/s)"), "{bar}");
    }

    #[test]
    fn nothing_to_do_is_complete() {
        let snapshot = Snapshot {
            events_sent: 0,
            events_total: 0,
            notifications: 0,
            notifications_total: 0,
            elapsed: Duration::ZERO,
        };
        assert!(bar(&snapshot).contains("100%"));
    }
}
