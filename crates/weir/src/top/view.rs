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
    } else if value.fract() == 0.0 {
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
    spans.push(Span::raw(format!(
        "  {} endpoint(s), {down} down, every {}s  q quit  ←/→ tab service  p pause",
        view.endpoints.len(),
        screen.interval_seconds
    )));
    if screen.paused {
        spans.push(Span::styled("  PAUSED", Style::default().fg(Color::Yellow)));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn render_service(frame: &mut Frame, area: Rect, service: &ServiceView) {
    let rows = service_rows(service).into_iter().map(Row::new);
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
