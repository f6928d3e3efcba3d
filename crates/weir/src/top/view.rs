//! Drawing a [`View`]: the terminal screen (ratatui) and the plain-text snapshot of `--once`.

use std::fmt::Write as _;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Row, Sparkline, Table, Tabs};
use ratatui::Frame;

use super::model::{ServiceView, View};

/// What the person at the keyboard chose, kept apart from what was scraped.
#[derive(Debug, Clone, Default)]
pub struct Screen {
    pub selected: usize,
    pub paused: bool,
    pub interval_seconds: f64,
}

/// Marks an endpoint that did not answer, in the screen and in the snapshot alike.
pub const DOWN: &str = "DOWN";

/// `1234.5` as `1.2k`: rates and counts read at a glance.
pub fn format_number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1e9 {
        format!("{:.1}G", value / 1e9)
    } else if magnitude >= 1e6 {
        format!("{:.1}M", value / 1e6)
    } else if magnitude >= 1e4 {
        format!("{:.1}k", value / 1e3)
    } else if value.fract() == 0.0 || magnitude >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// A gauge or quantile in the unit its name announces (`_seconds`, `_bytes`).
pub fn format_measure(label: &str, value: f64) -> String {
    let name = label.split('{').next().unwrap_or(label);
    if name.ends_with("_seconds") {
        if value.abs() < 1.0 {
            format!("{:.1}ms", value * 1e3)
        } else {
            format!("{value:.2}s")
        }
    } else if name.ends_with("_bytes") {
        let mut scaled = value;
        let mut unit = 0;
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        while scaled.abs() >= 1024.0 && unit + 1 < UNITS.len() {
            scaled /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            format!("{scaled:.0}B")
        } else {
            format!("{scaled:.1}{}", UNITS[unit])
        }
    } else {
        format_number(value)
    }
}

fn format_quantile(label: &str, value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format_measure(label, value))
}

/// The rows of one service's table: rates, gauges, then quantiles.
fn service_rows(service: &ServiceView) -> Vec<[String; 3]> {
    let mut rows = Vec::new();
    for rate in &service.rates {
        rows.push([
            rate.label.clone(),
            format!("{}/s", format_number(rate.value)),
            String::new(),
        ]);
    }
    for gauge in &service.gauges {
        rows.push([
            gauge.label.clone(),
            format_measure(&gauge.label, gauge.value),
            String::new(),
        ]);
    }
    for quantile in &service.quantiles {
        rows.push([
            quantile.label.clone(),
            format!("p50 {}", format_quantile(&quantile.label, quantile.p50)),
            format!("p99 {}", format_quantile(&quantile.label, quantile.p99)),
        ]);
    }
    rows
}

pub fn render(frame: &mut Frame, view: &View, screen: &Screen) {
    let endpoints_height = view.endpoints.len() as u16 + 2;
    let [header, tabs, body, spark, endpoints] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(6),
        Constraint::Length(endpoints_height),
    ])
    .areas(frame.area());
    render_header(frame, header, view, screen);
    let titles: Vec<String> = view.services.iter().map(|s| s.name.clone()).collect();
    let selected = screen.selected.min(view.services.len().saturating_sub(1));
    frame.render_widget(
        Tabs::new(titles)
            .select(selected)
            .highlight_style(Style::default().add_modifier(Modifier::REVERSED)),
        tabs,
    );
    match view.services.get(selected) {
        Some(service) => {
            render_service(frame, body, service);
            render_sparkline(frame, spark, service, screen);
        }
        None => frame.render_widget(
            Paragraph::new("no weir metrics yet: waiting for an endpoint to answer")
                .block(Block::default().borders(Borders::ALL)),
            body,
        ),
    }
    render_endpoints(frame, endpoints, view);
}

fn render_header(frame: &mut Frame, area: Rect, view: &View, screen: &Screen) {
    let down = view.endpoints.iter().filter(|e| !e.up).count();
    let mut spans = vec![Span::styled(
        "weir top",
        Style::default().add_modifier(Modifier::BOLD),
    )];
    // Before the help text, which a narrow terminal cuts off.
    if screen.paused {
        spans.push(Span::styled("  PAUSED", Style::default().fg(Color::Yellow)));
    }
    spans.push(Span::raw(format!(
        "  {} endpoint(s), {down} down, every {}s  q quit  ←/→ tab service  p pause",
        view.endpoints.len(),
        screen.interval_seconds
    )));
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn render_service(frame: &mut Frame, area: Rect, service: &ServiceView) {
    let main_rate = service.main_rate.as_deref();
    let rows = service_rows(service).into_iter().map(|cells| {
        // The rate the sparkline follows stands out; labelled series of it too.
        let is_main = main_rate
            .is_some_and(|main| cells[0] == main || cells[0].starts_with(&format!("{main}{{")));
        let row = Row::new(cells);
        if is_main {
            row.style(Style::default().add_modifier(Modifier::BOLD))
        } else {
            row
        }
    });
    let table = Table::new(
        rows,
        [
            Constraint::Percentage(50),
            Constraint::Percentage(25),
            Constraint::Percentage(25),
        ],
    )
    .block(
        Block::default()
            .borders(Borders::ALL)
            .title(format!(" {} ", service.name)),
    );
    frame.render_widget(table, area);
}

fn render_sparkline(frame: &mut Frame, area: Rect, service: &ServiceView, screen: &Screen) {
    let title = match (&service.main_rate, service.history.last()) {
        (Some(name), Some(latest)) => format!(
            " {name}/s over the last {}s: {}/s ",
            (service.history.len() as f64 * screen.interval_seconds).round(),
            format_number(*latest)
        ),
        _ => " no main rate yet ".to_owned(),
    };
    // Hundredths, so that rates below one per second still draw.
    let data: Vec<u64> = service
        .history
        .iter()
        .map(|rate| (rate.max(0.0) * 100.0).round() as u64)
        .collect();
    frame.render_widget(
        Sparkline::default()
            .block(Block::default().borders(Borders::ALL).title(title))
            .data(&data)
            .style(Style::default().fg(Color::Green)),
        area,
    );
}

fn render_endpoints(frame: &mut Frame, area: Rect, view: &View) {
    let lines: Vec<Line> = view
        .endpoints
        .iter()
        .map(|endpoint| {
            if endpoint.up {
                Line::from(vec![
                    Span::styled("up   ", Style::default().fg(Color::Green)),
                    Span::raw(endpoint.url.clone()),
                ])
            } else {
                Line::from(vec![
                    Span::styled(format!("{DOWN} "), Style::default().fg(Color::Red)),
                    Span::raw(format!(
                        "{}  {}",
                        endpoint.url,
                        endpoint.error.as_deref().unwrap_or("no answer yet")
                    )),
                ])
            }
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" endpoints ")),
        area,
    );
}

/// The `--once` snapshot: every service, then every endpoint.
pub fn plain_text(view: &View) -> String {
    let mut text = String::new();
    for service in &view.services {
        let _ = writeln!(text, "{}", service.name);
        for [label, first, second] in service_rows(service) {
            let line = format!("  {label:<48} {first:>14} {second:>14}");
            let _ = writeln!(text, "{}", line.trim_end());
        }
    }
    for endpoint in &view.endpoints {
        match (&endpoint.up, &endpoint.error) {
            (true, _) => {
                let _ = writeln!(text, "up   {}", endpoint.url);
            }
            (false, error) => {
                let reason = error.as_deref().unwrap_or("no answer yet");
                let _ = writeln!(text, "{DOWN} {}  {reason}", endpoint.url);
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::model::{EndpointView, QuantileReading, Reading};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn sample_view() -> View {
        View {
            endpoints: vec![
                EndpointView {
                    url: "http://127.0.0.1:9100/metrics".to_owned(),
                    up: true,
                    error: None,
                },
                EndpointView {
                    url: "http://127.0.0.1:9200/metrics".to_owned(),
                    up: false,
                    error: Some("Connection refused".to_owned()),
                },
            ],
            services: vec![
                ServiceView {
                    name: "increments".to_owned(),
                    main_rate: Some("requests".to_owned()),
                    rates: vec![Reading {
                        label: "requests{status=202}".to_owned(),
                        value: 10577.0,
                    }],
                    gauges: vec![Reading {
                        label: "staleness_max_seconds".to_owned(),
                        value: 1.413,
                    }],
                    quantiles: vec![QuantileReading {
                        label: "flush_seconds".to_owned(),
                        p50: Some(0.0165),
                        p99: None,
                    }],
                    history: vec![10000.0, 10577.0],
                },
                ServiceView {
                    name: "relay".to_owned(),
                    main_rate: Some("events_received".to_owned()),
                    rates: vec![Reading {
                        label: "events_received".to_owned(),
                        value: 250.0,
                    }],
                    gauges: vec![Reading {
                        label: "clients_connected".to_owned(),
                        value: 42.0,
                    }],
                    quantiles: Vec::new(),
                    history: vec![0.0, 125.0, 250.0],
                },
            ],
        }
    }

    /// The screen as lines of text, one per terminal row.
    fn draw(view: &View, screen: &Screen, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| render(frame, view, screen)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        (0..height)
            .map(|y| (0..width).map(|x| buffer[(x, y)].symbol()).collect())
            .collect()
    }

    fn row_with<'a>(lines: &'a [String], text: &str) -> &'a str {
        lines
            .iter()
            .find(|line| line.contains(text))
            .unwrap_or_else(|| panic!("no {text:?} on the screen:\n{}", lines.join("\n")))
    }

    fn screen(selected: usize) -> Screen {
        Screen {
            selected,
            paused: false,
            interval_seconds: 1.0,
        }
    }

    #[test]
    fn the_selected_service_shows_its_rates_gauges_and_quantiles() {
        let lines = draw(&sample_view(), &screen(0), 100, 24);
        assert!(row_with(&lines, "requests{status=202}").contains("10.6k/s"));
        assert!(row_with(&lines, "staleness_max_seconds").contains("1.41s"));
        let flush = row_with(&lines, "flush_seconds");
        assert!(
            flush.contains("p50 16.5ms") && flush.contains("p99 -"),
            "{flush}"
        );
        assert!(row_with(&lines, "requests/s over the last 2s").contains("10.6k/s"));
        // The other service is only a tab.
        assert!(row_with(&lines, "increments").contains("relay"));
        assert!(!lines.iter().any(|line| line.contains("clients_connected")));
    }

    #[test]
    fn moving_to_another_tab_shows_that_service() {
        let lines = draw(&sample_view(), &screen(1), 100, 24);
        assert!(row_with(&lines, "events_received ").contains("250/s"));
        assert!(row_with(&lines, "clients_connected").contains("42"));
    }

    #[test]
    fn the_selected_tab_is_highlighted() {
        let mut terminal = Terminal::new(TestBackend::new(100, 24)).unwrap();
        terminal
            .draw(|frame| render(frame, &sample_view(), &screen(1)))
            .unwrap();
        let buffer = terminal.backend().buffer();
        let tabs: String = (0..100).map(|x| buffer[(x, 1)].symbol()).collect();
        let relay_at = tabs.find("relay").unwrap() as u16;
        let increments_at = tabs.find("increments").unwrap() as u16;
        let reversed = |x| buffer[(x, 1)].modifier.contains(Modifier::REVERSED);
        assert!(reversed(relay_at));
        assert!(!reversed(increments_at));
    }

    #[test]
    fn the_main_rate_stands_out() {
        let mut terminal = Terminal::new(TestBackend::new(100, 24)).unwrap();
        terminal
            .draw(|frame| render(frame, &sample_view(), &screen(0)))
            .unwrap();
        let buffer = terminal.backend().buffer();
        let bold_at_start_of = |text: &str| {
            let y = (0..24)
                .find(|&y| {
                    let line: String = (0..100).map(|x| buffer[(x, y)].symbol()).collect();
                    line.contains(text)
                })
                .unwrap();
            buffer[(1, y)].modifier.contains(Modifier::BOLD)
        };
        assert!(bold_at_start_of("requests{status=202}"));
        assert!(!bold_at_start_of("staleness_max_seconds"));
    }

    #[test]
    fn endpoints_that_do_not_answer_are_marked_down_with_the_reason() {
        let lines = draw(&sample_view(), &screen(0), 100, 24);
        let down = row_with(&lines, ":9200/metrics");
        assert!(
            down.contains(DOWN) && down.contains("Connection refused"),
            "{down}"
        );
        assert!(row_with(&lines, ":9100/metrics").contains("up"));
        assert!(!row_with(&lines, ":9100/metrics").contains(DOWN));
        assert!(row_with(&lines, "weir top").contains("2 endpoint(s), 1 down"));
    }

    #[test]
    fn pause_is_shown_in_the_header() {
        let paused = Screen {
            paused: true,
            ..screen(0)
        };
        assert!(draw(&sample_view(), &paused, 100, 24)[0].contains("PAUSED"));
        // Even where the help text does not fit.
        assert!(draw(&sample_view(), &paused, 30, 24)[0].contains("PAUSED"));
        assert!(!draw(&sample_view(), &screen(0), 100, 24)[0].contains("PAUSED"));
    }

    #[test]
    fn a_small_or_empty_screen_draws_without_panicking() {
        draw(&sample_view(), &screen(7), 20, 5);
        let empty = View {
            endpoints: Vec::new(),
            services: Vec::new(),
        };
        let lines = draw(&empty, &screen(0), 80, 12);
        row_with(&lines, "no weir metrics yet");
    }

    #[test]
    fn units_follow_the_metric_name() {
        assert_eq!(
            format_measure("queued_bytes", 3.0 * 1024.0 * 1024.0),
            "3.0MiB"
        );
        assert_eq!(format_measure("queued_bytes", 12.0), "12B");
        assert_eq!(format_measure("flush_seconds", 0.0021), "2.1ms");
        assert_eq!(format_measure("clients_connected", 12345.0), "12.3k");
        assert_eq!(format_number(0.5), "0.5");
        assert_eq!(format_number(3361.5), "3362");
    }

    #[test]
    fn the_plain_snapshot_lists_every_service_and_endpoint() {
        let text = plain_text(&sample_view());
        assert!(text.contains("relay\n"), "{text}");
        assert!(text
            .lines()
            .any(|l| l.contains("events_received") && l.ends_with("250/s")));
        assert!(text.contains("DOWN http://127.0.0.1:9200/metrics  Connection refused"));
    }
}
