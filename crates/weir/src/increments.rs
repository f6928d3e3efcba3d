//! `weir increments serve|api|worker|bench`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use weir_increments::config::{IncrementsConfig, IncrementsFlags};
use weir_increments::Role;
use weir_runtime::Shutdown;

#[derive(Subcommand)]
pub enum IncrementsCommand {
    /// API and worker in one process; embedded log and SQLite unless --queue/--database.
    Serve(IncrementsFlags),
    /// API only (scale out behind a load balancer); needs --queue redis://...
    Api(IncrementsFlags),
    /// Worker only; needs --queue redis://... and usually --database postgres://...; with
    /// --port it serves /healthz, /readyz (ready while its flushes succeed) and /metrics.
    Worker(IncrementsFlags),
    /// Load generator: N keep-alive connections POSTing increments, or --bare to serve the
    /// ceiling (a handler that only answers 202).
    Bench(weir_increments::bench::BenchFlags),
}

pub async fn run(command: IncrementsCommand, shutdown: Shutdown) -> anyhow::Result<ExitCode> {
    let (flags, role) = match command {
        IncrementsCommand::Serve(flags) => (flags, Role::Serve),
        IncrementsCommand::Api(flags) => (flags, Role::Api),
        IncrementsCommand::Worker(flags) => (flags, Role::Worker),
        IncrementsCommand::Bench(flags) => {
            let passed = weir_increments::bench::run(flags, shutdown.token.clone()).await?;
            return Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    };
    // A worker serves nothing unless given a port: then its probes, ready while it can flush.
    let worker_probes = flags.port.is_some();
    let config = flags.load()?;
    let (listener, description) = match role {
        Role::Worker if !worker_probes => (None, None),
        Role::Worker => {
            let listener = bind(&config).await?;
            let description = format!(
                "increments worker: probes on http://{}/readyz",
                listener.local_addr()?
            );
            (Some(listener), Some(description))
        }
        _ => {
            let listener = bind(&config).await?;
            let description = describe(&config, &listener)?;
            (Some(listener), Some(description))
        }
    };
    let running = weir_increments::start(listener, config, role, shutdown.clone()).await?;
    // Announced only once it can take requests: scripts wait for this line.
    if let Some(description) = description {
        println!("{description}");
    }
    running.serve().await?;
    shutdown.drain(Duration::from_secs(10)).await;
    Ok(ExitCode::SUCCESS)
}

async fn bind(config: &IncrementsConfig) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = std::net::SocketAddr::new(config.bind_address, config.port);
    // A backlog of 1,024, not tokio's 128: a burst of connections must not be dropped.
    weir_runtime::http::bind(addr)
        .with_context(|| format!("cannot bind the increments API to {addr}"))
}

fn describe(
    config: &IncrementsConfig,
    listener: &tokio::net::TcpListener,
) -> anyhow::Result<String> {
    let store = match &config.database_url {
        Some(_) => "Postgres".to_string(),
        None => format!("SQLite {}", config.sqlite_path().display()),
    };
    let queue = match &config.redis_url {
        Some(_) => format!("Redis stream {}", config.stream),
        None => "embedded log".to_string(),
    };
    Ok(format!(
        "increments: POST http://{}/increment ({queue}, {store})",
        listener.local_addr()?
    ))
}

/// Starts the embedded serve mode for `weir up`: returns once the data directory is locked,
/// the log and SQLite are open and the port is bound, with the task that serves it.
pub async fn up(shutdown: &Shutdown) -> anyhow::Result<crate::up::Service> {
    let mut config = IncrementsFlags::default().load()?;
    // `weir up` is the embedded, single-machine mode whatever the environment says, with a
    // directory of its own beside the other services' under ./weir-data.
    config.redis_url = None;
    config.database_url = None;
    config.data_dir = config.data_dir.join("increments");
    let listener = bind(&config).await?;
    let description = describe(&config, &listener)?;
    let running =
        weir_increments::start(Some(listener), config, Role::Serve, shutdown.clone()).await?;
    let task = shutdown.tracker.spawn(async move {
        running.serve().await?;
        tracing::info!("increments stopped after its final flush");
        Ok(())
    });
    Ok(crate::up::Service {
        name: "increments",
        description,
        task,
    })
}
