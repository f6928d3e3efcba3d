//! Logs that remote input can trigger: rate-limited, and with the input's bytes escaped.
//!
//! A peer that sends 5,000 bad lines must not write 5,000 log lines (that is a disk-filling
//! attack and buries everything else), and bytes it chose must not reach an operator's
//! terminal as escape sequences or forge a second log line with a CR or LF. So every log site
//! that input can reach holds a [`LogLimiter`] (usually a `static`) and logs through
//! [`warn_limited!`](crate::warn_limited) or [`info_limited!`](crate::info_limited), and shows
//! the input through [`escape`].
//!
//! Counting stays exact: callers still bump their metric on every event, the limiter only
//! decides which events also get a line, and the next line says how many were left out.

use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `burst` lines per `period` from one log site.
#[derive(Debug)]
pub struct LogLimiter {
    period: Duration,
    burst: u32,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub const fn new(period: Duration, burst: u32) -> Self {
        LogLimiter {
            period,
            burst,
            state: Mutex::new(Window {
                started: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Ten lines a second: enough to see what is happening, too few to flood anything.
    pub const fn per_second() -> Self {
        Self::new(Duration::from_secs(1), 10)
    }

    /// `Some(n)` when this event may be logged, `n` being how many events were suppressed
    /// since the last line; `None` when it must be counted but not logged.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        // A poisoned lock only means a panic elsewhere while counting; the counts are still
        // usable, and logging must never be the thing that brings a service down.
        let mut window = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = window
            .started
            .is_none_or(|started| now.duration_since(started) >= self.period);
        if expired {
            window.started = Some(now);
            window.logged = 0;
        }
        if window.logged < self.burst {
            window.logged += 1;
            Some(std::mem::take(&mut window.suppressed))
        } else {
            window.suppressed += 1;
            None
        }
    }
}

/// Logs a WARN through `limiter`, adding a `suppressed` field (events not logged since the
/// last line). The rest is written as for `tracing::warn!`.
#[macro_export]
macro_rules! warn_limited {
    ($limiter:expr, $($rest:tt)+) => {
        if let Some(suppressed) = $limiter.allow() {
            ::tracing::warn!(suppressed, $($rest)+);
        }
    };
}

/// As [`warn_limited!`], at INFO.
#[macro_export]
macro_rules! info_limited {
    ($limiter:expr, $($rest:tt)+) => {
        if let Some(suppressed) = $limiter.allow() {
            ::tracing::info!(suppressed, $($rest)+);
        }
    };
}

/// How much of one input a log line shows.
const SHOWN: usize = 200;

/// `input` as text fit for a log line: invalid UTF-8 replaced, control characters (ESC, CR,
/// LF, DEL, ...) written as escapes, and anything past 200 characters cut with a count.
pub fn escape(input: &[u8]) -> String {
    let text = String::from_utf8_lossy(input);
    let mut out = String::with_capacity(text.len().min(SHOWN) + 8);
    for (shown, (at, c)) in text.char_indices().enumerate() {
        if shown == SHOWN {
            let _ = write!(out, "...({} more bytes)", text.len() - at);
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_then_the_rest_counted_until_the_period_ends() {
        let limiter = LogLimiter::new(Duration::from_secs(1), 3);
        let start = Instant::now();
        let allowed: Vec<_> = (0..10).map(|_| limiter.allow_at(start)).collect();
        assert_eq!(&allowed[..3], &[Some(0), Some(0), Some(0)]);
        assert!(allowed[3..].iter().all(Option::is_none));
        let later = start + Duration::from_secs(1);
        assert_eq!(
            limiter.allow_at(later),
            Some(7),
            "the next line reports the 7 left out"
        );
        assert_eq!(limiter.allow_at(later), Some(0));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            escape(b"a\x1b[31mred\r\nforged"),
            "a\\u{1b}[31mred\\r\\nforged"
        );
        assert_eq!(escape(b"tab\there\x7f"), "tab\\there\\u{7f}");
        assert_eq!(escape("été".as_bytes()), "été");
        assert_eq!(escape(b"\xff\xfe"), "\u{fffd}\u{fffd}");
    }

    #[test]
    fn long_input_is_cut_with_a_count() {
        let long = vec![b'x'; 250];
        let shown = escape(&long);
        assert!(shown.starts_with(&"x".repeat(200)), "{shown}");
        assert!(shown.ends_with("...(50 more bytes)"), "{shown}");
    }

    #[test]
    fn the_macro_goes_through_the_limiter() {
        static LIMITER: LogLimiter = LogLimiter::new(Duration::from_secs(3600), 1);
        for line in [b"one".as_slice(), b"two"] {
            crate::warn_limited!(LIMITER, line = %escape(line), "bad line");
        }
        assert_eq!(
            LIMITER.allow(),
            None,
            "the one line of the window went to the macro"
        );
    }
}
