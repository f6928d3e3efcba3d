//! Fetching `/metrics` over HTTP and turning the exposition text into [`model::Scrape`].

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::model::{Scrape, Series, SeriesValue};

/// Bodies larger than this are refused: a metrics page is kilobytes, and a wrong URL must not
/// make `weir top` buffer anything large.
const MAX_BODY_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("not an http:// URL: {0}")]
    BadUrl(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Http(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("the body exceeds {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("cannot parse the exposition format: {0}")]
    Parse(String),
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Checks a URL given on the command line, so that a typo is an error at start rather than an
/// endpoint shown as down forever.
pub fn parse_url(url: &str) -> Result<hyper::Uri, ScrapeError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| ScrapeError::BadUrl(url.to_owned()))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(ScrapeError::BadUrl(url.to_owned()));
    }
    Ok(uri)
}

/// GETs one metrics page and parses it.
pub async fn scrape(
    client: &HttpClient,
    uri: hyper::Uri,
    timeout: Duration,
) -> Result<Scrape, ScrapeError> {
    let fetch = async {
        let response = client
            .get(uri)
            .await
            .map_err(|err| ScrapeError::Http(root_cause(&err)))?;
        if !response.status().is_success() {
            return Err(ScrapeError::Status(response.status().as_u16()));
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|err| {
                if err.is::<http_body_util::LengthLimitError>() {
                    ScrapeError::TooLarge
                } else {
                    ScrapeError::Http(err.to_string())
                }
            })?
            .to_bytes();
        Ok(body)
    };
    let body = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| ScrapeError::Timeout(timeout))??;
    parse_exposition(&String::from_utf8_lossy(&body))
}

/// The innermost cause says why ("Connection refused"); hyper's outer layers ("client error
/// (Connect)", "tcp connect error") only say where, and would crowd the screen.
fn root_cause(err: &dyn std::error::Error) -> String {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// The Prometheus text format into series; untyped samples (the `_sum` and `_count` of
/// summaries and histograms among them) are left out, as `weir top` has no use for them.
pub fn parse_exposition(text: &str) -> Result<Scrape, ScrapeError> {
    let lines = text.lines().map(|line| Ok(line.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines)
        .map_err(|err| ScrapeError::Parse(err.to_string()))?;
    let series = parsed
        .samples
        .into_iter()
        .filter_map(|sample| {
            let value = match sample.value {
                prometheus_parse::Value::Counter(value) => SeriesValue::Counter(value),
                prometheus_parse::Value::Gauge(value) => SeriesValue::Gauge(value),
                prometheus_parse::Value::Summary(quantiles) => {
                    SeriesValue::Summary(quantiles.iter().map(|q| (q.quantile, q.count)).collect())
                }
                prometheus_parse::Value::Histogram(buckets) => {
                    let mut buckets: Vec<(f64, f64)> =
                        buckets.iter().map(|b| (b.less_than, b.count)).collect();
                    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                    SeriesValue::Histogram(buckets)
                }
                prometheus_parse::Value::Untyped(_) => return None,
            };
            let mut labels: Vec<(String, String)> = sample
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.sort();
            Some(Series {
                name: sample.metric,
                labels,
                value,
            })
        })
        .collect();
    Ok(Scrape { series })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_gauges_summaries_and_histograms() {
        let text = "\
# HELP weir_relay_events_received_total Events read.
# TYPE weir_relay_events_received_total counter
weir_relay_events_received_total 42
# TYPE weir_relay_clients_connected gauge
weir_relay_clients_connected 3
# TYPE weir_increments_flush_seconds summary
weir_increments_flush_seconds{quantile=\"0.5\"} 0.002
weir_increments_flush_seconds{quantile=\"0.99\"} 0.01
weir_increments_flush_seconds_sum 1
weir_increments_flush_seconds_count 300
# TYPE weir_kv_batch_seconds histogram
weir_kv_batch_seconds_bucket{le=\"0.1\"} 1
weir_kv_batch_seconds_bucket{le=\"+Inf\"} 2
weir_kv_batch_seconds_sum 1
weir_kv_batch_seconds_count 2
";
        let scrape = parse_exposition(text).unwrap();
        let find = |name: &str| {
            scrape
                .series
                .iter()
                .find(|series| series.name == name)
                .map(|series| series.value.clone())
        };
        assert_eq!(
            find("weir_relay_events_received_total"),
            Some(SeriesValue::Counter(42.0))
        );
        assert_eq!(
            find("weir_relay_clients_connected"),
            Some(SeriesValue::Gauge(3.0))
        );
        assert_eq!(
            find("weir_increments_flush_seconds"),
            Some(SeriesValue::Summary(vec![(0.5, 0.002), (0.99, 0.01)]))
        );
        assert_eq!(
            find("weir_kv_batch_seconds"),
            Some(SeriesValue::Histogram(vec![
                (0.1, 1.0),
                (f64::INFINITY, 2.0)
            ]))
        );
        assert_eq!(find("weir_increments_flush_seconds_count"), None);
    }

    #[test]
    fn only_plain_http_urls_with_a_host_are_accepted() {
        assert!(parse_url("http://127.0.0.1:9100/metrics").is_ok());
        assert!(parse_url("https://127.0.0.1:9100/metrics").is_err());
        assert!(parse_url("127.0.0.1:9100").is_err());
    }
}
