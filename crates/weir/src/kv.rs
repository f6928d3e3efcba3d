//! `weir kv serve|client|bench`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use weir_kv::client::ClientFlags;
use weir_kv::config::KvFlags;
use weir_runtime::Shutdown;

#[derive(Subcommand)]
pub enum KvCommand {
    /// Serve the store over RabbitMQ: requests from --queue, a reply to each reply_to.
    Serve(KvFlags),
    /// Send each request of an input.json array in order and print each reply (JSON Lines).
    Client(ClientFlags),
    /// Round trips with 1, 4 and 16 clients, then queue drains against a bare consumer.
    Bench(weir_kv::bench::BenchFlags),
}

pub async fn run(
    command: KvCommand,
    shutdown: Shutdown,
    metrics_addr: Option<SocketAddr>,
) -> anyhow::Result<ExitCode> {
    match command {
        KvCommand::Serve(flags) => serve(flags, shutdown, metrics_addr).await,
        KvCommand::Client(flags) => {
            let all_ok = weir_kv::client::run(flags, shutdown.token.clone()).await?;
            Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        KvCommand::Bench(flags) => {
            weir_kv::bench::run(flags, shutdown.token.clone()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn serve(
    flags: KvFlags,
    shutdown: Shutdown,
    metrics_addr: Option<SocketAddr>,
) -> anyhow::Result<ExitCode> {
    let config = flags.load()?;
    let description = config.describe();
    if metrics_addr.is_some() {
        // The recorder goes in before start registers every metric at zero; installed
        // later, those registrations are lost and a metric appears only once it changes.
        weir_runtime::telemetry::prometheus();
    }
    let running = weir_kv::server::start(config, &shutdown)?;
    if let Some(addr) = metrics_addr {
        let listener = weir_runtime::http::bind(addr)
            .map_err(|err| anyhow::anyhow!("cannot bind the metrics address {addr}: {err}"))?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics, health on /healthz and /readyz");
        let router = weir_runtime::http::metrics_router()
            .merge(weir_kv::server::health_router(running.health()));
        let token = shutdown.token.clone();
        shutdown.tracker.spawn(async move {
            let limits = weir_runtime::http::ListenerLimits::default();
            if let Err(err) = weir_runtime::http::serve(listener, router, limits, token).await {
                tracing::error!(%err, "metrics endpoint stopped");
            }
        });
    }
    // Announced once the store is loaded; the broker is connected (and reconnected) by serve.
    println!("{description}");
    running.serve().await?;
    shutdown.drain(Duration::from_secs(10)).await;
    Ok(ExitCode::SUCCESS)
}

/// Starts kv for `weir up`: returns once the data directory is locked and the store loaded.
/// The broker is not needed to start: while it is away kv keeps reconnecting with backoff
/// and the other services run on.
pub async fn up(shutdown: &Shutdown) -> anyhow::Result<crate::up::Service> {
    let config = KvFlags::default().load()?;
    let description = config.describe();
    let running = weir_kv::server::start(config, shutdown)?;
    let task = shutdown.tracker.spawn(async move {
        running.serve().await?;
        tracing::info!("kv stopped");
        Ok(())
    });
    Ok(crate::up::Service {
        name: "kv",
        description,
        task,
    })
}
