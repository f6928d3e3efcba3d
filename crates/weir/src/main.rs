//! `weir`: one binary for every Weir service.
//!
//! - `main.rs`: global flags, telemetry set-up, dispatch to a subcommand.
//! - `up.rs`: `weir up`, every service at once with embedded defaults.
//! - `relay.rs`: `weir relay serve|check`.
//! - `increments.rs`: `weir increments serve|api|worker|bench`.
//! - `top/`: `weir top`, a live view of the services' metrics.
//! - `distinct.rs`: `weir distinct worker|coordinator`.
//! - `kv.rs`: `weir kv serve|client|bench`.

mod distinct;
mod increments;
mod kv;
mod relay;
mod top;
mod up;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weir_runtime::telemetry::{self, LogFormat};
use weir_runtime::Shutdown;

/// jemalloc with its background threads gives freed memory back to the system on its own, within
/// seconds, even while every thread of the process is idle. Measured with
/// scripts/relay-stuck-clients.sh (500 clients that never read, 1M broadcasts): glibc's malloc
/// still held 267-569 MiB 15 s after the clients were gone (the freed notification buffers are
/// spread over its per-thread arenas), mimalloc 709 MiB (idle threads never purge), jemalloc
/// 18 MiB. Throughput of scripts/relay-e2e.sh was the same within this machine's noise.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Event-driven back-end services, their load tools and verifiers"
)]
struct Cli {
    /// Log format on stderr; the level comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty, env = "WEIR_LOG_FORMAT")]
    log_format: LogFormat,

    /// Serve Prometheus metrics on this address (GET /metrics). `weir up` defaults to
    /// 127.0.0.1:9100; other commands serve none unless asked.
    #[arg(long, global = true, env = "WEIR_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start every service with embedded defaults and print where each listens.
    Up(up::UpArgs),
    /// The follower-maze event relay and its verifier.
    #[command(subcommand)]
    Relay(relay::RelayCommand),
    /// The increments service, its workers and its load tool.
    #[command(subcommand)]
    Increments(increments::IncrementsCommand),
    /// A live view of running services, read from their metrics pages.
    Top(top::TopArgs),
    /// The distinct service: exact distinct items per tenant.
    #[command(subcommand)]
    Distinct(distinct::DistinctCommand),
    /// The insertion-ordered store served over RabbitMQ, its client and its load tool.
    #[command(subcommand)]
    Kv(kv::KvCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let shutdown = Shutdown::new();
    shutdown.cancel_on_signal();
    let metrics_addr = match (&cli.command, cli.metrics_addr) {
        (Command::Up(_), None) => Some(up::DEFAULT_METRICS_ADDR),
        // A viewer serves nothing: with WEIR_METRICS_ADDR exported for `weir up`, binding it
        // here would fail or take the address `weir top` is about to read.
        (Command::Top(_), _) => None,
        // kv serve adds /healthz and /readyz to the same listener, so it binds its own.
        (Command::Kv(kv::KvCommand::Serve(_)), _) => None,
        (_, addr) => addr,
    };
    if let Some(addr) = metrics_addr {
        let listener = weir_runtime::http::bind(addr)
            .map_err(|err| anyhow::anyhow!("cannot bind the metrics address {addr}: {err}"))?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
        // Installed before any service starts, or the metrics a service registers at zero on
        // start-up go to no recorder and appear only once they change.
        telemetry::prometheus();
        let token = shutdown.token.clone();
        shutdown.tracker.spawn(async move {
            if let Err(err) = weir_runtime::http::serve_metrics(listener, token).await {
                tracing::error!(%err, "metrics endpoint stopped");
            }
        });
    }
    match cli.command {
        Command::Up(args) => up::run(args, shutdown).await,
        Command::Relay(command) => relay::run(command, shutdown).await,
        Command::Increments(command) => increments::run(command, shutdown).await,
        Command::Top(args) => top::run(args, shutdown).await,
        Command::Distinct(command) => distinct::run(command, shutdown).await,
        Command::Kv(command) => kv::run(command, shutdown, cli.metrics_addr).await,
    }
}
