//! Logs and metrics, set up once per process.
//!
//! Logs go to stderr, pretty for people or JSON for log shippers, filtered by `RUST_LOG`
//! (default `info`). Metrics use the `metrics` facade with a Prometheus recorder; services
//! only call `metrics::counter!` and friends and never see the exporter.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Installs the global tracing subscriber. Calling it twice is harmless (the second call is
/// ignored), which keeps tests that start several services simple.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes are for people at a terminal; in a file or a pipe they are noise.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _already_set = match format {
        LogFormat::Pretty => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use.
///
/// Histograms are summarised as quantiles; the recorder needs periodic upkeep to age them out,
/// which a background thread does so that no service has to remember.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .ok();
            handle
        })
        .clone()
}

/// What a metric is, for [`register_metrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    /// Rendered as a Prometheus summary (quantiles) by this recorder.
    Histogram,
}

/// One metric a service exposes: its name, kind and help text.
pub type MetricSpec = (&'static str, MetricKind, &'static str);

/// Installs the recorder, gives every metric of `specs` its help text, and creates it at
/// zero, so `rate()` and alerts work from the first scrape instead of the first occurrence.
/// Labelled metrics are created without labels' values; pass them pre-labelled where an
/// outcome should exist at zero.
pub fn register_metrics(specs: &[MetricSpec]) {
    let _installed = prometheus();
    for &(name, kind, help) in specs {
        match kind {
            MetricKind::Counter => {
                metrics::describe_counter!(name, help);
                metrics::counter!(name).increment(0);
            }
            MetricKind::Gauge => {
                metrics::describe_gauge!(name, help);
                metrics::gauge!(name).set(0.0);
            }
            MetricKind::Histogram => {
                metrics::describe_histogram!(name, help);
                let _created = metrics::histogram!(name);
            }
        }
    }
}

/// Installs the recorder, gives the counter family `name` its help text, and creates
/// `name{label="value"}` at zero for every one of `values`, so that every outcome (every
/// `reason`, say) exists from the first scrape and `rate()` works for each. No unlabelled
/// series is made: the family's `sum()` is its total.
///
/// Returns the counters in the order of `values`, for callers that count on a hot path and
/// keep the handles rather than look the series up by name each time. Calling it again (a
/// second service in the same process) resets nothing.
pub fn register_labelled_counters(
    name: &'static str,
    help: &'static str,
    label: &'static str,
    values: &[&'static str],
) -> Vec<metrics::Counter> {
    let _installed = prometheus();
    metrics::describe_counter!(name, help);
    values
        .iter()
        .map(|&value| {
            let counter = metrics::counter!(name, label => value);
            counter.increment(0);
            counter
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_counters_exist_at_zero_for_every_value_and_nothing_else() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let counters = metrics::with_local_recorder(&recorder, || {
            let counters = register_labelled_counters(
                "weir_test_rejected_total",
                "Things refused, by reason.",
                "reason",
                &["malformed", "stale"],
            );
            counters[1].increment(3);
            // Registering again (another service of the same process) keeps the counts.
            register_labelled_counters(
                "weir_test_rejected_total",
                "Things refused, by reason.",
                "reason",
                &["malformed", "stale"],
            );
            counters
        });
        assert_eq!(counters.len(), 2);
        let text = handle.render();
        assert!(
            text.contains("# HELP weir_test_rejected_total Things refused, by reason.\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE weir_test_rejected_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("weir_test_rejected_total{reason=\"malformed\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("weir_test_rejected_total{reason=\"stale\"} 3\n"),
            "{text}"
        );
        assert!(!text.contains("\nweir_test_rejected_total 0"), "{text}");
    }
}
