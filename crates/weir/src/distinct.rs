//! `weir distinct worker`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use weir_distinct::config::{Database, Flags};
use weir_runtime::Shutdown;

#[derive(Subcommand)]
pub enum DistinctCommand {
    /// One worker: POST /items and GET /items/{tenant}/count over the shard store.
    Worker {
        #[command(flatten)]
        flags: Flags,
        /// The address to serve on (the worker's host:port in the config).
        #[arg(long, default_value = "127.0.0.1:5001")]
        listen: SocketAddr,
    },
    /// Load against a coordinator (started here, or `--url`), then check every count.
    Bench(weir_distinct::bench::BenchFlags),
}

pub async fn run(command: DistinctCommand, shutdown: Shutdown) -> anyhow::Result<ExitCode> {
    let (flags, listen) = match command {
        DistinctCommand::Worker { flags, listen } => (flags, listen),
        DistinctCommand::Bench(flags) => {
            let passed = weir_distinct::bench::run(flags, shutdown.token.clone()).await?;
            return Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    };
    let config = flags.load()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot bind the distinct worker to {listen}"))?;
    let store = match &config.database {
        Database::Sqlite(root) => format!("SQLite shards in {}", root.display()),
        Database::Postgres(_) => "Postgres".to_string(),
    };
    let addr = listener.local_addr()?;
    let opened = weir_distinct::server::open_store(&config).await?;
    // Announced once the store is open and the port bound: scripts wait for this line.
    println!("distinct worker: POST http://{addr}/items ({store})");
    weir_distinct::server::serve(listener, opened, shutdown.clone()).await?;
    shutdown.drain(Duration::from_secs(10)).await;
    Ok(ExitCode::SUCCESS)
}
