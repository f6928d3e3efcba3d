//! `weir top`: a live view of every running Weir service, read from their metrics pages.
//!
//! - `model.rs`: scrapes to rates, gauges, quantiles and history (pure).
//! - `scrape.rs`: HTTP and the exposition format.
//! - `view.rs`: the terminal screen and the plain-text snapshot.
//! - `mod.rs`: flags, the scrape loop and the keyboard.

pub mod model;
pub mod scrape;
pub mod view;

use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use tokio_util::sync::CancellationToken;
use weir_runtime::Shutdown;

use model::{Model, Observation, View};
use scrape::HttpClient;
use view::Screen;

/// A minute of history at the default interval.
const HISTORY_SECONDS: f64 = 60.0;

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// A metrics page to watch; repeat it for several processes. Default: the address of
    /// `weir up`'s metrics, http://127.0.0.1:9100/metrics.
    #[arg(long = "url", value_name = "URL")]
    urls: Vec<String>,
    /// Seconds between scrapes (0.1 to 60).
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Print one plain-text snapshot (two scrapes an interval apart, for rates) and exit.
    #[arg(long, conflicts_with = "json")]
    once: bool,
    /// Print one snapshot as a JSON document and exit.
    #[arg(long)]
    json: bool,
}

struct TopConfig {
    uris: Vec<hyper::Uri>,
    urls: Vec<String>,
    interval: Duration,
}

impl TopArgs {
    fn load(self) -> anyhow::Result<TopConfig> {
        if !(0.1..=60.0).contains(&self.interval) {
            anyhow::bail!(
                "--interval must be between 0.1 and 60 seconds, not {}",
                self.interval
            );
        }
        let urls = if self.urls.is_empty() {
            vec![format!(
                "http://{}/metrics",
                crate::up::DEFAULT_METRICS_ADDR
            )]
        } else {
            self.urls
        };
        let uris = urls
            .iter()
            .map(|url| scrape::parse_url(url).map_err(|err| anyhow::anyhow!("--url: {err}")))
            .collect::<anyhow::Result<_>>()?;
        Ok(TopConfig {
            uris,
            urls,
            interval: Duration::from_secs_f64(self.interval),
        })
    }
}

pub async fn run(args: TopArgs, shutdown: Shutdown) -> anyhow::Result<ExitCode> {
    let (once, json) = (args.once, args.json);
    let config = args.load()?;
    if once || json {
        return snapshot(&config, json).await;
    }
    live(config, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Scrapes every endpoint at once; each answer or failure in the order of the URLs.
async fn scrape_round(
    client: &HttpClient,
    config: &TopConfig,
    started: Instant,
) -> Vec<Observation> {
    let scrapes = config.uris.iter().map(|uri| async {
        let result = scrape::scrape(client, uri.clone(), config.interval)
            .await
            .map_err(|err| err.to_string());
        Observation {
            at_seconds: started.elapsed().as_secs_f64(),
            result,
        }
    });
    futures::future::join_all(scrapes).await
}

fn history_len(interval: Duration) -> usize {
    (HISTORY_SECONDS / interval.as_secs_f64()).ceil() as usize
}

async fn snapshot(config: &TopConfig, json: bool) -> anyhow::Result<ExitCode> {
    let client = scrape::http_client();
    let started = Instant::now();
    let mut model = Model::new(&config.urls, history_len(config.interval));
    model.observe_round(scrape_round(&client, config, started).await);
    tokio::time::sleep(config.interval).await;
    model.observe_round(scrape_round(&client, config, started).await);
    let view = model.view();
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", view::plain_text(&view));
    }
    // Scripts can tell "nothing answered" from the output's status alone.
    Ok(if view.endpoints.iter().any(|endpoint| endpoint.up) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn live(config: TopConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let (views, received) = mpsc::channel();
    let stop = shutdown.token.child_token();
    let interval_seconds = config.interval.as_secs_f64();
    let ui_stop = stop.clone();
    let ui = tokio::task::spawn_blocking(move || ui_loop(received, interval_seconds, ui_stop));
    let scraper = tokio::spawn(scrape_loop(config, views, stop.clone()));
    let outcome = ui.await;
    stop.cancel();
    let _ = scraper.await;
    outcome??;
    Ok(())
}

async fn scrape_loop(config: TopConfig, views: mpsc::Sender<View>, stop: CancellationToken) {
    let client = scrape::http_client();
    let started = Instant::now();
    let mut model = Model::new(&config.urls, history_len(config.interval));
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let round = tokio::select! {
            _ = stop.cancelled() => return,
            round = scrape_round(&client, &config, started) => round,
        };
        model.observe_round(round);
        if views.send(model.view()).is_err() {
            return;
        }
    }
}

/// What a key press asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAction {
    Quit,
    Redraw,
}

/// Applies one key press to the screen state.
pub fn on_key(screen: &mut Screen, key: KeyEvent, services: usize) -> KeyAction {
    let last = services.saturating_sub(1);
    match key.code {
        KeyCode::Char('q') | KeyCode::Esc => return KeyAction::Quit,
        // Raw mode turns Ctrl-C into a key press instead of a signal.
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
            return KeyAction::Quit
        }
        KeyCode::Char('p') => screen.paused = !screen.paused,
        KeyCode::Right | KeyCode::Down | KeyCode::Tab => {
            screen.selected = if screen.selected >= last {
                0
            } else {
                screen.selected + 1
            };
        }
        KeyCode::Left | KeyCode::Up | KeyCode::BackTab => {
            screen.selected = if screen.selected == 0 || screen.selected > last {
                last
            } else {
                screen.selected - 1
            };
        }
        _ => {}
    }
    KeyAction::Redraw
}

/// Puts the terminal back however the screen loop ends; a panic is covered by the hook
/// `ratatui::try_init` installs.
struct RestoreTerminal;

impl Drop for RestoreTerminal {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

fn ui_loop(
    views: mpsc::Receiver<View>,
    interval_seconds: f64,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let _restore = RestoreTerminal;
    let mut terminal = ratatui::try_init()?;
    let mut screen = Screen {
        interval_seconds,
        ..Screen::default()
    };
    let mut view = View {
        endpoints: Vec::new(),
        services: Vec::new(),
    };
    while !stop.is_cancelled() {
        loop {
            match views.try_recv() {
                Ok(latest) if !screen.paused => view = latest,
                Ok(_) => {}
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
            }
        }
        terminal.draw(|frame| view::render(frame, &view, &screen))?;
        // Short enough that a new scrape shows promptly; a resize redraws on the next turn.
        if !event::poll(Duration::from_millis(100))? {
            continue;
        }
        if let Event::Key(key) = event::read()? {
            if key.kind == KeyEventKind::Press
                && on_key(&mut screen, key, view.services.len()) == KeyAction::Quit
            {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn press(screen: &mut Screen, code: KeyCode, services: usize) -> KeyAction {
        on_key(screen, KeyEvent::new(code, KeyModifiers::NONE), services)
    }

    #[test]
    fn arrows_and_tab_cycle_through_the_services() {
        let mut screen = Screen::default();
        press(&mut screen, KeyCode::Tab, 3);
        press(&mut screen, KeyCode::Right, 3);
        assert_eq!(screen.selected, 2);
        press(&mut screen, KeyCode::Right, 3);
        assert_eq!(screen.selected, 0);
        press(&mut screen, KeyCode::Left, 3);
        assert_eq!(screen.selected, 2);
        // A service that went away leaves the selection past the end: back steps onto the last.
        press(&mut screen, KeyCode::Left, 1);
        assert_eq!(screen.selected, 0);
    }

    #[test]
    fn p_pauses_and_resumes_and_q_or_ctrl_c_quits() {
        let mut screen = Screen::default();
        assert_eq!(press(&mut screen, KeyCode::Char('p'), 1), KeyAction::Redraw);
        assert!(screen.paused);
        press(&mut screen, KeyCode::Char('p'), 1);
        assert!(!screen.paused);
        assert_eq!(press(&mut screen, KeyCode::Char('q'), 1), KeyAction::Quit);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(on_key(&mut screen, ctrl_c, 1), KeyAction::Quit);
        assert_eq!(press(&mut screen, KeyCode::Char('c'), 1), KeyAction::Redraw);
    }

    #[test]
    fn a_bad_interval_or_url_is_an_error_naming_the_flag() {
        let args = |interval: f64, url: &str| TopArgs {
            urls: vec![url.to_owned()],
            interval,
            once: false,
            json: false,
        };
        let err = args(0.0, "http://127.0.0.1:1/metrics")
            .load()
            .err()
            .unwrap();
        assert!(err.to_string().contains("--interval"), "{err}");
        let err = args(1.0, "localhost:9100").load().err().unwrap();
        assert!(err.to_string().contains("--url"), "{err}");
        let config = TopArgs {
            urls: Vec::new(),
            ..args(1.0, "")
        }
        .load()
        .unwrap();
        assert_eq!(
            config.urls,
            vec!["http://127.0.0.1:9100/metrics".to_owned()]
        );
        assert_eq!(history_len(config.interval), 60);
    }
}
