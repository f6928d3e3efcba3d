//! From scraped samples to what `weir top` shows: pure functions, no I/O, no clock.
//!
//! A service is recognised by its metric prefix, `weir_<service>_`. Several endpoints may expose the
//! same service (N api processes, M workers): their counter rates and gauges are summed, except
//! gauges in seconds (staleness), where the worst endpoint is what matters, and quantiles, where
//! the worst endpoint is shown for the same reason.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::Serialize;

/// One time series of one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// Sorted by label name, so that the same series compares equal across scrapes.
    pub labels: Vec<(String, String)>,
    pub value: SeriesValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SeriesValue {
    Counter(f64),
    Gauge(f64),
    /// (quantile, value) pairs as a summary exports them.
    Summary(Vec<(f64, f64)>),
    /// (upper bound, cumulative count) pairs, the last one `+Inf`.
    Histogram(Vec<(f64, f64)>),
}

/// One scrape of one endpoint: every series it exported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    pub series: Vec<Series>,
}

/// What scraping one endpoint gave, at `at_seconds` on the caller's monotonic clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub at_seconds: f64,
    pub result: Result<Scrape, String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct View {
    pub endpoints: Vec<EndpointView>,
    pub services: Vec<ServiceView>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EndpointView {
    pub url: String,
    pub up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServiceView {
    pub name: String,
    /// The rate the sparkline follows, also listed in `rates`.
    pub main_rate: Option<String>,
    pub rates: Vec<Reading>,
    pub gauges: Vec<Reading>,
    pub quantiles: Vec<QuantileReading>,
    /// The main rate at each of the last scrapes, oldest first.
    pub history: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Reading {
    /// The metric name without `weir_<service>_` and `_total`, with its labels.
    pub label: String,
    pub value: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QuantileReading {
    pub label: String,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// The service a metric belongs to and its name within the service.
pub fn service_of(metric: &str) -> Option<(&str, &str)> {
    if let Some(rest) = metric.strip_prefix("weir_") {
        let (service, what) = rest.split_once('_')?;
        if service.is_empty() || what.is_empty() {
            return None;
        }
        return Some((service, what));
    }
    None
}

/// The counter whose rate a service's sparkline follows: what the service exists to do.
fn main_counter(service: &str) -> Option<&'static str> {
    match service {
        "relay" => Some("events_received"),
        "increments" | "kv" => Some("requests"),
        "distinct" => Some("coordinator_items_accepted"),
        _ => None,
    }
}

/// The increase of a counter between two scrapes. A counter lower than before was reset (the
/// process restarted): everything it counts now is new, as in Prometheus' `rate()`.
pub fn counter_increase(previous: f64, current: f64) -> f64 {
    if current < previous {
        current
    } else {
        current - previous
    }
}

/// Per-second rate of a counter, or `None` when no time passed.
pub fn counter_rate(previous: f64, current: f64, seconds: f64) -> Option<f64> {
    (seconds > 0.0).then(|| counter_increase(previous, current) / seconds)
}

/// The `q` quantile of a cumulative histogram, interpolating linearly inside the bucket, as
/// Prometheus' `histogram_quantile` does. `None` without observations.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total;
    let mut lower_bound = 0.0;
    let mut count_below = 0.0;
    for &(upper_bound, count) in buckets {
        if count >= rank {
            if upper_bound.is_infinite() {
                // Nothing is known above the highest finite bound.
                return Some(lower_bound);
            }
            let in_bucket = count - count_below;
            if in_bucket <= 0.0 {
                return Some(upper_bound);
            }
            return Some(
                lower_bound + (upper_bound - lower_bound) * (rank - count_below) / in_bucket,
            );
        }
        lower_bound = upper_bound;
        count_below = count;
    }
    None
}

/// The observations made between two scrapes of a histogram; the whole histogram when the
/// previous scrape is missing or the process restarted.
fn histogram_delta(previous: Option<&[(f64, f64)]>, current: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let Some(previous) = previous else {
        return current.to_vec();
    };
    let same_bounds =
        previous.len() == current.len() && previous.iter().zip(current).all(|(p, c)| p.0 == c.0);
    let reset = previous.iter().zip(current).any(|(p, c)| c.1 < p.1);
    if !same_bounds || reset {
        return current.to_vec();
    }
    previous
        .iter()
        .zip(current)
        .map(|(p, c)| (c.0, c.1 - p.1))
        .collect()
}

fn quantile_from_summary(quantiles: &[(f64, f64)], wanted: f64) -> Option<f64> {
    quantiles
        .iter()
        .find(|(q, _)| (q - wanted).abs() < 1e-9)
        .map(|&(_, value)| value)
        .filter(|value| value.is_finite())
}

fn display_label(what: &str, labels: &[(String, String)]) -> String {
    let what = what.strip_suffix("_total").unwrap_or(what);
    if labels.is_empty() {
        return what.to_owned();
    }
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{what}{{{}}}", labels.join(","))
}

/// One service's readings from one endpoint, before endpoints are combined.
#[derive(Default)]
struct Readings {
    rates: BTreeMap<String, f64>,
    gauges: BTreeMap<String, f64>,
    quantiles: BTreeMap<String, (Option<f64>, Option<f64>)>,
    main_rate: Option<f64>,
}

type SeriesKey<'a> = (&'a str, &'a [(String, String)]);

fn index(scrape: &Scrape) -> HashMap<SeriesKey<'_>, &SeriesValue> {
    scrape
        .series
        .iter()
        .map(|series| {
            (
                (series.name.as_str(), series.labels.as_slice()),
                &series.value,
            )
        })
        .collect()
}

/// Readings per service from two consecutive scrapes of one endpoint, `seconds` apart.
/// Without a previous scrape there are gauges and quantiles but no rates yet.
fn endpoint_readings(
    previous: Option<&Scrape>,
    current: &Scrape,
    seconds: f64,
) -> BTreeMap<String, Readings> {
    let mut by_service: BTreeMap<String, Readings> = BTreeMap::new();
    let previous_values = previous.map(index).unwrap_or_default();
    for series in &current.series {
        let Some((service, what)) = service_of(&series.name) else {
            continue;
        };
        let readings = by_service.entry(service.to_owned()).or_default();
        let label = display_label(what, &series.labels);
        let old = previous_values
            .get(&(series.name.as_str(), series.labels.as_slice()))
            .copied();
        match &series.value {
            SeriesValue::Counter(now) => {
                if previous.is_none() {
                    continue;
                }
                // A series absent from the previous scrape was created since, from zero.
                let before = match old {
                    Some(SeriesValue::Counter(before)) => *before,
                    _ => 0.0,
                };
                if let Some(rate) = counter_rate(before, *now, seconds) {
                    *readings.rates.entry(label).or_default() += rate;
                    let base = what.strip_suffix("_total").unwrap_or(what);
                    if main_counter(service) == Some(base) {
                        *readings.main_rate.get_or_insert(0.0) += rate;
                    }
                }
            }
            SeriesValue::Gauge(value) => {
                readings.gauges.insert(label, *value);
            }
            SeriesValue::Summary(quantiles) => {
                let p50 = quantile_from_summary(quantiles, 0.5);
                let p99 = quantile_from_summary(quantiles, 0.99);
                readings.quantiles.insert(label, (p50, p99));
            }
            SeriesValue::Histogram(buckets) => {
                let old_buckets = match old {
                    Some(SeriesValue::Histogram(old)) => Some(old.as_slice()),
                    _ => None,
                };
                let recent = histogram_delta(old_buckets, buckets);
                let p50 = histogram_quantile(0.5, &recent);
                let p99 = histogram_quantile(0.99, &recent);
                readings.quantiles.insert(label, (p50, p99));
            }
        }
    }
    by_service
}

fn worst(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn merge(into: &mut Readings, from: Readings) {
    for (label, rate) in from.rates {
        *into.rates.entry(label).or_default() += rate;
    }
    for (label, value) in from.gauges {
        // Lag is as bad as the worst endpoint's; counts of things add up.
        let is_duration = label
            .split('{')
            .next()
            .is_some_and(|name| name.ends_with("_seconds"));
        into.gauges
            .entry(label)
            .and_modify(|seen| {
                *seen = if is_duration {
                    seen.max(value)
                } else {
                    *seen + value
                }
            })
            .or_insert(value);
    }
    for (label, (p50, p99)) in from.quantiles {
        let entry = into.quantiles.entry(label).or_insert((None, None));
        *entry = (worst(entry.0, p50), worst(entry.1, p99));
    }
    if let Some(rate) = from.main_rate {
        *into.main_rate.get_or_insert(0.0) += rate;
    }
}

/// The last two scrapes of one endpoint.
#[derive(Debug, Clone, Default)]
struct Endpoint {
    url: String,
    previous: Option<(f64, Scrape)>,
    latest: Option<(f64, Scrape)>,
    error: Option<String>,
}

/// Everything `weir top` remembers between scrapes: the last two scrapes of every endpoint and
/// the main rate of every service over the last `history_len` rounds.
#[derive(Debug, Clone)]
pub struct Model {
    endpoints: Vec<Endpoint>,
    history: BTreeMap<String, VecDeque<f64>>,
    history_len: usize,
}

impl Model {
    pub fn new(urls: &[String], history_len: usize) -> Self {
        Model {
            endpoints: urls
                .iter()
                .map(|url| Endpoint {
                    url: url.clone(),
                    ..Endpoint::default()
                })
                .collect(),
            history: BTreeMap::new(),
            history_len,
        }
    }

    /// Takes one scrape of every endpoint, in the order of the URLs given to [`Model::new`].
    pub fn observe_round(&mut self, observations: Vec<Observation>) {
        for (endpoint, observation) in self.endpoints.iter_mut().zip(observations) {
            match observation.result {
                Ok(scrape) => {
                    endpoint.previous = endpoint.latest.take();
                    endpoint.latest = Some((observation.at_seconds, scrape));
                    endpoint.error = None;
                }
                Err(error) => {
                    // A process that comes back may have restarted: rates start afresh.
                    endpoint.previous = None;
                    endpoint.latest = None;
                    endpoint.error = Some(error);
                }
            }
        }
        let services = self.combined_readings();
        for (service, readings) in &services {
            if let Some(rate) = readings.main_rate {
                let history = self.history.entry(service.clone()).or_default();
                history.push_back(rate);
                while history.len() > self.history_len {
                    history.pop_front();
                }
            }
        }
    }

    fn combined_readings(&self) -> BTreeMap<String, Readings> {
        let mut services: BTreeMap<String, Readings> = BTreeMap::new();
        for endpoint in &self.endpoints {
            let Some((now, latest)) = &endpoint.latest else {
                continue;
            };
            let previous = endpoint.previous.as_ref();
            let seconds = previous.map_or(0.0, |(then, _)| now - then);
            let readings = endpoint_readings(previous.map(|(_, scrape)| scrape), latest, seconds);
            for (service, readings) in readings {
                merge(services.entry(service).or_default(), readings);
            }
        }
        services
    }

    pub fn view(&self) -> View {
        let endpoints = self
            .endpoints
            .iter()
            .map(|endpoint| EndpointView {
                url: endpoint.url.clone(),
                up: endpoint.error.is_none() && endpoint.latest.is_some(),
                error: endpoint.error.clone(),
            })
            .collect();
        let services = self
            .combined_readings()
            .into_iter()
            .map(|(name, readings)| self.service_view(name, readings))
            .collect();
        View {
            endpoints,
            services,
        }
    }

    fn service_view(&self, name: String, readings: Readings) -> ServiceView {
        let to_readings = |map: BTreeMap<String, f64>| {
            map.into_iter()
                .map(|(label, value)| Reading { label, value })
                .collect()
        };
        let main_rate = main_counter(&name)
            .filter(|_| readings.main_rate.is_some())
            .map(str::to_owned);
        let history = self
            .history
            .get(&name)
            .map(|history| history.iter().copied().collect())
            .unwrap_or_default();
        ServiceView {
            main_rate,
            rates: to_readings(readings.rates),
            gauges: to_readings(readings.gauges),
            quantiles: readings
                .quantiles
                .into_iter()
                .map(|(label, (p50, p99))| QuantileReading { label, p50, p99 })
                .collect(),
            history,
            name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn counter(name: &str, labels: &[(&str, &str)], value: f64) -> Series {
        Series {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value: SeriesValue::Counter(value),
        }
    }

    fn gauge(name: &str, value: f64) -> Series {
        Series {
            name: name.to_owned(),
            labels: Vec::new(),
            value: SeriesValue::Gauge(value),
        }
    }

    fn up(at_seconds: f64, series: Vec<Series>) -> Observation {
        Observation {
            at_seconds,
            result: Ok(Scrape { series }),
        }
    }

    fn down(at_seconds: f64) -> Observation {
        Observation {
            at_seconds,
            result: Err("Connection refused".to_owned()),
        }
    }

    fn relay(at_seconds: f64, received: f64, clients: f64) -> Observation {
        up(
            at_seconds,
            vec![
                counter("weir_relay_events_received_total", &[], received),
                gauge("weir_relay_clients_connected", clients),
            ],
        )
    }

    fn urls(count: usize) -> Vec<String> {
        (0..count)
            .map(|i| format!("http://127.0.0.1:{}/metrics", 9100 + i))
            .collect()
    }

    fn service<'a>(view: &'a View, name: &str) -> &'a ServiceView {
        view.services
            .iter()
            .find(|service| service.name == name)
            .unwrap_or_else(|| panic!("no service {name} in {view:?}"))
    }

    fn reading(readings: &[Reading], label: &str) -> Option<f64> {
        readings.iter().find(|r| r.label == label).map(|r| r.value)
    }

    #[test]
    fn services_are_named_by_their_metric_prefix() {
        assert_eq!(
            service_of("weir_relay_events_received_total"),
            Some(("relay", "events_received_total"))
        );
        assert_eq!(service_of("weir_kv_store_keys"), Some(("kv", "store_keys")));
        assert_eq!(
            service_of("weir_increments_requests_total"),
            Some(("increments", "requests_total"))
        );
        assert_eq!(service_of("weir_relay"), None);
        assert_eq!(service_of("process_cpu_seconds_total"), None);
    }

    #[test]
    fn rate_is_the_increase_over_the_seconds_between_scrapes() {
        assert_eq!(counter_rate(100.0, 150.0, 0.5), Some(100.0));
        assert_eq!(counter_rate(100.0, 100.0, 1.0), Some(0.0));
        assert_eq!(counter_rate(100.0, 150.0, 0.0), None);
    }

    #[test]
    fn a_counter_that_went_down_was_reset_and_counts_from_zero() {
        assert_eq!(counter_increase(1000.0, 20.0), 20.0);
        assert_eq!(counter_rate(1000.0, 20.0, 2.0), Some(10.0));
    }

    #[test]
    fn histogram_quantiles_interpolate_inside_the_bucket() {
        let buckets = [(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(histogram_quantile(0.5, &buckets), Some(0.1));
        let p99 = histogram_quantile(0.99, &buckets).unwrap();
        assert!((p99 - 0.198).abs() < 1e-9, "{p99}");
        assert_eq!(
            histogram_quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]),
            None
        );
        // Above the highest finite bound nothing is known but that bound.
        assert_eq!(
            histogram_quantile(0.99, &[(0.1, 1.0), (f64::INFINITY, 10.0)]),
            Some(0.1)
        );
    }

    #[test]
    fn histogram_quantiles_follow_recent_observations_only() {
        let series = |buckets: Vec<(f64, f64)>| Series {
            name: "weir_kv_batch_seconds".to_owned(),
            labels: Vec::new(),
            value: SeriesValue::Histogram(buckets),
        };
        let mut model = Model::new(&urls(1), 60);
        // A thousand fast batches long ago, then ten slow ones since the last scrape.
        model.observe_round(vec![up(
            0.0,
            vec![series(vec![
                (0.01, 1000.0),
                (1.0, 1000.0),
                (f64::INFINITY, 1000.0),
            ])],
        )]);
        model.observe_round(vec![up(
            1.0,
            vec![series(vec![
                (0.01, 1000.0),
                (1.0, 1010.0),
                (f64::INFINITY, 1010.0),
            ])],
        )]);
        let view = model.view();
        let quantile = &service(&view, "kv").quantiles[0];
        assert_eq!(quantile.label, "batch_seconds");
        assert!(quantile.p50.unwrap() > 0.01, "{quantile:?}");
    }

    #[test]
    fn summaries_give_their_p50_and_p99() {
        let mut model = Model::new(&urls(1), 60);
        model.observe_round(vec![up(
            0.0,
            vec![Series {
                name: "weir_increments_flush_seconds".to_owned(),
                labels: Vec::new(),
                value: SeriesValue::Summary(vec![
                    (0.0, 0.001),
                    (0.5, 0.002),
                    (0.99, 0.01),
                    (1.0, 0.02),
                ]),
            }],
        )]);
        let view = model.view();
        let quantile = &service(&view, "increments").quantiles[0];
        assert_eq!((quantile.p50, quantile.p99), (Some(0.002), Some(0.01)));
    }

    #[test]
    fn rates_need_two_scrapes() {
        let mut model = Model::new(&urls(1), 60);
        model.observe_round(vec![relay(0.0, 100.0, 3.0)]);
        let view = model.view();
        let relay_view = service(&view, "relay");
        assert!(relay_view.rates.is_empty());
        assert_eq!(reading(&relay_view.gauges, "clients_connected"), Some(3.0));

        model.observe_round(vec![relay(2.0, 300.0, 4.0)]);
        let view = model.view();
        let relay_view = service(&view, "relay");
        assert_eq!(reading(&relay_view.rates, "events_received"), Some(100.0));
        assert_eq!(relay_view.main_rate.as_deref(), Some("events_received"));
        assert_eq!(relay_view.history, vec![100.0]);
    }

    #[test]
    fn a_restarted_process_gives_a_rate_from_zero_not_a_negative_one() {
        let mut model = Model::new(&urls(1), 60);
        model.observe_round(vec![relay(0.0, 5000.0, 0.0)]);
        model.observe_round(vec![relay(1.0, 30.0, 0.0)]);
        let view = model.view();
        assert_eq!(
            reading(&service(&view, "relay").rates, "events_received"),
            Some(30.0)
        );
    }

    #[test]
    fn labelled_counters_keep_their_labels_and_new_series_count_from_zero() {
        let mut model = Model::new(&urls(1), 60);
        let ok = |value| {
            counter(
                "weir_increments_requests_total",
                &[("status", "202")],
                value,
            )
        };
        let busy = |value| {
            counter(
                "weir_increments_requests_total",
                &[("status", "503")],
                value,
            )
        };
        model.observe_round(vec![up(0.0, vec![ok(10.0)])]);
        model.observe_round(vec![up(1.0, vec![ok(40.0), busy(5.0)])]);
        let view = model.view();
        let increments = service(&view, "increments");
        assert_eq!(
            reading(&increments.rates, "requests{status=202}"),
            Some(30.0)
        );
        assert_eq!(
            reading(&increments.rates, "requests{status=503}"),
            Some(5.0)
        );
        // The main rate is every request, whatever its status.
        assert_eq!(increments.history, vec![35.0]);
    }

    #[test]
    fn a_down_endpoint_is_shown_down_and_the_others_still_count() {
        let mut model = Model::new(&urls(2), 60);
        model.observe_round(vec![relay(0.0, 0.0, 1.0), down(0.0)]);
        model.observe_round(vec![relay(1.0, 10.0, 1.0), down(1.0)]);
        let view = model.view();
        assert!(view.endpoints[0].up);
        assert!(!view.endpoints[1].up);
        assert_eq!(
            view.endpoints[1].error.as_deref(),
            Some("Connection refused")
        );
        assert_eq!(
            reading(&service(&view, "relay").rates, "events_received"),
            Some(10.0)
        );
    }

    #[test]
    fn an_endpoint_that_comes_back_starts_its_rates_afresh() {
        let mut model = Model::new(&urls(1), 60);
        model.observe_round(vec![relay(0.0, 0.0, 0.0)]);
        model.observe_round(vec![down(1.0)]);
        assert!(model.view().services.is_empty());
        model.observe_round(vec![relay(2.0, 1000.0, 0.0)]);
        assert!(service(&model.view(), "relay").rates.is_empty());
    }

    #[test]
    fn endpoints_of_one_service_add_up_but_lag_is_the_worst_one() {
        let worker = |at, applied, depth, staleness| {
            up(
                at,
                vec![
                    counter("weir_increments_applied_total", &[], applied),
                    gauge("weir_increments_queue_depth", depth),
                    gauge("weir_increments_staleness_max_seconds", staleness),
                ],
            )
        };
        let mut model = Model::new(&urls(2), 60);
        model.observe_round(vec![worker(0.0, 0.0, 0.0, 0.0), worker(0.0, 0.0, 0.0, 0.0)]);
        model.observe_round(vec![
            worker(1.0, 10.0, 3.0, 0.5),
            worker(1.0, 20.0, 4.0, 2.0),
        ]);
        let view = model.view();
        let increments = service(&view, "increments");
        assert_eq!(reading(&increments.rates, "applied"), Some(30.0));
        assert_eq!(reading(&increments.gauges, "queue_depth"), Some(7.0));
        assert_eq!(
            reading(&increments.gauges, "staleness_max_seconds"),
            Some(2.0)
        );
    }

    /// A relay page with the metric families every service now has: rejections by reason,
    /// a latency summary, and an age gauge; and a distinct worker's summary by route.
    fn page(rejected_stale: u64, oldest: f64) -> Scrape {
        let text = format!(
            "# HELP weir_relay_events_rejected_total Rejected.\n\
             # TYPE weir_relay_events_rejected_total counter\n\
             weir_relay_events_rejected_total{{reason=\"malformed\"}} 0\n\
             weir_relay_events_rejected_total{{reason=\"stale\"}} {rejected_stale}\n\
             # HELP weir_relay_delivery_seconds Wait.\n\
             # TYPE weir_relay_delivery_seconds summary\n\
             weir_relay_delivery_seconds{{quantile=\"0.5\"}} 0.002\n\
             weir_relay_delivery_seconds{{quantile=\"0.99\"}} 0.25\n\
             weir_relay_delivery_seconds_sum 1\n\
             weir_relay_delivery_seconds_count 100\n\
             # HELP weir_relay_reorder_oldest_seconds Age.\n\
             # TYPE weir_relay_reorder_oldest_seconds gauge\n\
             weir_relay_reorder_oldest_seconds {oldest}\n\
             # HELP weir_distinct_request_duration_seconds Time.\n\
             # TYPE weir_distinct_request_duration_seconds summary\n\
             weir_distinct_request_duration_seconds{{route=\"items\",quantile=\"0.5\"}} 0.01\n\
             weir_distinct_request_duration_seconds{{route=\"items\",quantile=\"0.99\"}} 0.03\n\
             weir_distinct_request_duration_seconds_sum{{route=\"items\"}} 1\n\
             weir_distinct_request_duration_seconds_count{{route=\"items\"}} 60\n"
        );
        crate::top::scrape::parse_exposition(&text).unwrap()
    }

    #[test]
    fn rejections_by_reason_latency_summaries_and_ages_are_shown() {
        let mut model = Model::new(&urls(2), 60);
        model.observe_round(vec![
            Observation {
                at_seconds: 0.0,
                result: Ok(page(10, 0.5)),
            },
            Observation {
                at_seconds: 0.0,
                result: Ok(page(0, 0.0)),
            },
        ]);
        model.observe_round(vec![
            Observation {
                at_seconds: 2.0,
                result: Ok(page(30, 0.5)),
            },
            Observation {
                at_seconds: 2.0,
                result: Ok(page(4, 3.0)),
            },
        ]);
        let view = model.view();
        let relay = service(&view, "relay");
        assert_eq!(
            reading(&relay.rates, "events_rejected{reason=stale}"),
            Some(12.0),
            "10/s and 2/s"
        );
        assert_eq!(
            reading(&relay.rates, "events_rejected{reason=malformed}"),
            Some(0.0)
        );
        assert_eq!(
            reading(&relay.gauges, "reorder_oldest_seconds"),
            Some(3.0),
            "the worst endpoint's age"
        );
        let delivery = relay
            .quantiles
            .iter()
            .find(|q| q.label == "delivery_seconds")
            .expect("delivery quantiles");
        assert_eq!((delivery.p50, delivery.p99), (Some(0.002), Some(0.25)));
        let distinct = service(&view, "distinct");
        let items = distinct
            .quantiles
            .iter()
            .find(|q| q.label == "request_duration_seconds{route=items}")
            .expect("quantiles by route");
        assert_eq!((items.p50, items.p99), (Some(0.01), Some(0.03)));
    }

    #[test]
    fn history_keeps_the_last_minute_only() {
        let mut model = Model::new(&urls(1), 3);
        for second in 0..6 {
            model.observe_round(vec![relay(second as f64, (second * second) as f64, 0.0)]);
        }
        // Rates 1, 3, 5, 7, 9: the last three stay.
        assert_eq!(service(&model.view(), "relay").history, vec![5.0, 7.0, 9.0]);
    }

    proptest! {
        #[test]
        fn a_counter_never_increases_by_a_negative_amount(previous in 0.0..1e12f64, current in 0.0..1e12f64) {
            prop_assert!(counter_increase(previous, current) >= 0.0);
        }

        #[test]
        fn quantiles_grow_with_q_and_stay_within_the_finite_bounds(
            counts in proptest::collection::vec(0.0..1000.0f64, 1..8),
            low in 0.0..0.5f64,
            high in 0.5..1.0f64,
        ) {
            let mut cumulative = 0.0;
            let mut buckets: Vec<(f64, f64)> = counts
                .iter()
                .enumerate()
                .map(|(i, count)| {
                    cumulative += count;
                    ((i + 1) as f64, cumulative)
                })
                .collect();
            buckets.push((f64::INFINITY, cumulative));
            if let (Some(a), Some(b)) = (histogram_quantile(low, &buckets), histogram_quantile(high, &buckets)) {
                prop_assert!(a <= b, "{a} > {b}");
                prop_assert!((0.0..=counts.len() as f64).contains(&b));
            }
        }
    }
}
