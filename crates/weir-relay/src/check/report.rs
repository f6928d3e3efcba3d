//! The outcome of a check and how it reads on a terminal: the verdict first, then for each
//! failing user the first place its stream went wrong, then the numbers.

use std::time::Instant;

use serde::Serialize;

use super::expect;
use super::progress::{bytes, human, per_second};
use super::stream::{encode, Batches, StreamParams, MAX_LINE};
use super::verify::Divergence;
use super::CheckConfig;

/// Failing users listed in full; beyond this the summary only counts them.
const LISTED_FAILURES: usize = 20;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    /// Every connected user received exactly its expected stream, and every event was sent.
    pub passed: bool,
    /// Stopped by Ctrl-C (or the caller's token) before the end.
    pub cancelled: bool,
    /// Nothing was sent; only generation was measured (see `generation`).
    pub dry_run: bool,
    pub events_total: u64,
    pub events_sent: u64,
    /// Users connected.
    pub users: usize,
    pub notifications_expected: u64,
    /// Lines received by all users, extras included.
    pub notifications_received: u64,
    /// From the first event sent until the last user had everything (drain excluded).
    pub seconds: f64,
    /// Users whose stream went wrong or stopped short, each with its first divergence;
    /// those merely cut short by the end of the run come last.
    pub failures: Vec<UserFailure>,
    /// Why the event connection broke, if it did.
    pub source_error: Option<String>,
    /// When the last event was written, from the first: how fast the server took them in.
    pub source_seconds: Option<f64>,
    /// Heap bytes of the expected streams.
    pub expected_bytes: u64,
    /// Peak resident memory of this process (Linux only).
    pub peak_rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<Generation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserFailure {
    pub user: u32,
    pub divergence: Divergence,
}

/// Timings of a dry run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Generation {
    pub expectation_seconds: f64,
    pub stream_seconds: f64,
    pub stream_bytes: u64,
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(generation) = &self.generation {
            return self.fmt_dry_run(f, generation);
        }
        if self.passed {
            writeln!(f, "ALL NOTIFICATIONS RECEIVED")?;
        } else if self.cancelled {
            writeln!(f, "CANCELLED: not passed")?;
        } else {
            writeln!(
                f,
                "FAILED: {} of {} users got a wrong or incomplete stream",
                self.failures.len(),
                self.users
            )?;
        }
        if let Some(error) = &self.source_error {
            writeln!(f, "event source: {error}")?;
        }
        for failure in self.failures.iter().take(LISTED_FAILURES) {
            writeln!(f, "user {}: {}", failure.user, failure.divergence)?;
        }
        if self.failures.len() > LISTED_FAILURES {
            writeln!(
                f,
                "... and {} more users",
                self.failures.len() - LISTED_FAILURES
            )?;
        }
        let elapsed = std::time::Duration::from_secs_f64(self.seconds);
        write!(
            f,
            "events:        {} of {} sent ({} events/s)",
            self.events_sent,
            self.events_total,
            human(per_second(self.events_sent, elapsed))
        )?;
        if let Some(seconds) = self.source_seconds {
            write!(f, ", all written after {seconds:.3} s")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "notifications: {} received of {} expected, {} users ({} notifications/s)",
            self.notifications_received,
            self.notifications_expected,
            self.users,
            human(per_second(self.notifications_received, elapsed))
        )?;
        write!(f, "wall time:     {:.3} s", self.seconds)?;
        self.fmt_memory(f)
    }
}

impl CheckReport {
    fn fmt_dry_run(
        &self,
        f: &mut std::fmt::Formatter<'_>,
        generation: &Generation,
    ) -> std::fmt::Result {
        let expect = std::time::Duration::from_secs_f64(generation.expectation_seconds);
        let stream = std::time::Duration::from_secs_f64(generation.stream_seconds);
        writeln!(f, "DRY RUN: nothing sent")?;
        writeln!(
            f,
            "expectations:  {} notifications for {} users in {:.3} s ({} events/s)",
            self.notifications_expected,
            self.users,
            generation.expectation_seconds,
            human(per_second(self.events_total, expect))
        )?;
        write!(
            f,
            "stream:        {} events, {} in {:.3} s ({} events/s)",
            self.events_total,
            bytes(generation.stream_bytes),
            generation.stream_seconds,
            human(per_second(self.events_total, stream))
        )?;
        self.fmt_memory(f)
    }

    fn fmt_memory(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "\nmemory:        {} of expected streams",
            bytes(self.expected_bytes)
        )?;
        if let Some(rss) = self.peak_rss_bytes {
            write!(f, ", peak RSS {}", bytes(rss))?;
        }
        Ok(())
    }
}

/// Generates everything a run would, sends nothing, and times both passes.
pub fn dry_run(params: StreamParams, users: &[u32], config: &CheckConfig) -> CheckReport {
    let started = Instant::now();
    let expectations = expect::compute(params, users);
    let expectation_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let max_batch = config.max_event_source_batch_size;
    let flush_at = 256 * 1024;
    let mut out = Vec::with_capacity(flush_at + max_batch as usize * MAX_LINE);
    let mut stream_bytes = 0u64;
    let mut batches = Batches::new(params, max_batch);
    while let Some(batch) = batches.next_batch() {
        encode(batch, config.crlf, &mut out);
        if out.len() >= flush_at {
            stream_bytes += out.len() as u64;
            // Keeps the work from being optimised away, as a socket write would.
            std::hint::black_box(&out);
            out.clear();
        }
    }
    stream_bytes += out.len() as u64;
    let stream_seconds = started.elapsed().as_secs_f64();

    CheckReport {
        passed: true,
        cancelled: false,
        dry_run: true,
        events_total: params.total_events,
        events_sent: 0,
        users: users.len(),
        notifications_expected: expectations.total(),
        notifications_received: 0,
        seconds: expectation_seconds + stream_seconds,
        failures: Vec::new(),
        source_error: None,
        source_seconds: None,
        expected_bytes: expectations.bytes(),
        peak_rss_bytes: peak_rss_bytes(),
        generation: Some(Generation {
            expectation_seconds,
            stream_seconds,
            stream_bytes,
        }),
    }
}

/// Peak resident set size, from `/proc/self/status` (`None` elsewhere).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::verify::{Missing, Received};

    fn report() -> CheckReport {
        CheckReport {
            passed: true,
            cancelled: false,
            dry_run: false,
            events_total: 1_000,
            events_sent: 1_000,
            users: 3,
            notifications_expected: 50,
            notifications_received: 50,
            seconds: 0.5,
            failures: Vec::new(),
            source_error: None,
            source_seconds: Some(0.25),
            expected_bytes: 800,
            peak_rss_bytes: Some(10 << 20),
            generation: None,
        }
    }

    #[test]
    fn success_says_so_and_gives_the_rates() {
        let text = report().to_string();
        assert!(text.starts_with("ALL NOTIFICATIONS RECEIVED\n"), "{text}");
        assert!(
            text.contains("1000 of 1000 sent (2.00k events/s)"),
            "{text}"
        );
        assert!(text.contains("(100 notifications/s)"), "{text}");
        assert!(text.contains("peak RSS 10.0 MiB"), "{text}");
    }

    #[test]
    fn failure_lists_each_user_with_its_first_divergence() {
        let mut failed = report();
        failed.passed = false;
        failed.failures = vec![UserFailure {
            user: 42,
            divergence: Divergence {
                index: 3,
                expected: Some("7|B\n".into()),
                received: Received::Nothing(Missing::Timeout { ms: 2_000 }),
            },
        }];
        let text = failed.to_string();
        assert!(
            text.starts_with("FAILED: 1 of 3 users got a wrong or incomplete stream\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "user 42: at index 3: expected \"7|B\\n\", received nothing within timeout (2000 ms)"
            ),
            "{text}"
        );
    }

    #[test]
    fn vm_hwm_is_read_in_kib() {
        let status = "Name:\tweir\nVmPeak:\t  100 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2 << 20));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
    }
}
