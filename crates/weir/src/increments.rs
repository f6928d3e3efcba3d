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
    /// Worker only; needs --queue redis://... and usually --database postgres://...
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
    let config = flags.load()?;
    let listener = if role == Role::Worker {
        None
    } else {
        let listener = bind(&config).await?;
        println!("{}", describe(&config, &listener)?);
        Some(listener)
    };
    weir_increments::run(listener, config, role, shutdown.clone()).await?;
    shutdown.drain(Duration::from_secs(10)).await;
    Ok(ExitCode::SUCCESS)
}

async fn bind(config: &IncrementsConfig) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = std::net::SocketAddr::new(config.bind_address, config.port);
    tokio::net::TcpListener::bind(addr)
        .await
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

/// Starts the embedded serve mode in the background of `weir up`.
pub async fn up(shutdown: &Shutdown) -> anyhow::Result<Vec<String>> {
    let mut config = IncrementsFlags::default().load()?;
    // `weir up` is the embedded, single-machine mode whatever the environment says.
    config.redis_url = None;
    config.database_url = None;
    let listener = bind(&config).await?;
    let description = describe(&config, &listener)?;
    let shutdown_for_task = shutdown.clone();
    shutdown.tracker.spawn(async move {
        match weir_increments::run(Some(listener), config, Role::Serve, shutdown_for_task).await {
            Ok(()) => tracing::info!("increments stopped after its final flush"),
            Err(err) => tracing::error!(%err, "increments stopped"),
        }
    });
    Ok(vec![description])
}
