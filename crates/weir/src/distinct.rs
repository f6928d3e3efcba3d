//! `weir distinct worker`, `coordinator` and `repair`, and distinct's part of `weir up`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use weir_distinct::config::{CoordinatorFlags, Database, DistinctConfig, Flags, RawConfig};
use weir_distinct::coordinator::supervisor::WorkerProgram;
use weir_distinct::coordinator::{Coordinator, Settings};
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
    /// The coordinator on :5000: routes each tenant's items to one worker, runs the workers
    /// of this host as child processes, re-reads the config every config_check seconds and
    /// on SIGHUP.
    Coordinator {
        #[command(flatten)]
        flags: CoordinatorFlags,
    },
    /// Gets a damaged SQLite shard going again: moves each damaged log aside (kept as
    /// `<log>.damaged-<unix time>`), keeps every intact record, and says which bytes it
    /// dropped. Safe while the service runs: a shard a worker holds is left alone.
    Repair {
        #[command(flatten)]
        flags: Flags,
        /// Only this shard (every shard by default).
        #[arg(long)]
        shard: Option<u16>,
    },
    /// Load against a coordinator (started here, or `--url`), then check every count.
    Bench(weir_distinct::bench::BenchFlags),
}

pub async fn run(command: DistinctCommand, shutdown: Shutdown) -> anyhow::Result<ExitCode> {
    match command {
        DistinctCommand::Worker { flags, listen } => worker(flags, listen, shutdown).await,
        DistinctCommand::Coordinator { flags } => coordinator(flags, shutdown).await,
        DistinctCommand::Repair { flags, shard } => repair(&flags, shard),
        DistinctCommand::Bench(flags) => {
            let passed = weir_distinct::bench::run(flags, shutdown.token.clone()).await?;
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

async fn worker(flags: Flags, listen: SocketAddr, shutdown: Shutdown) -> anyhow::Result<ExitCode> {
    let config = flags.load()?;
    let listener = weir_runtime::http::bind(listen)
        .with_context(|| format!("cannot bind the distinct worker to {listen}"))?;
    let addr = listener.local_addr()?;
    let opened = weir_distinct::server::open_store(&config).await?;
    // Announced once the store is open and the port bound: scripts wait for this line.
    println!(
        "distinct worker: POST http://{addr}/items ({})",
        describe_store(&config)
    );
    weir_distinct::server::serve(listener, opened, shutdown.clone()).await?;
    shutdown.drain(Duration::from_secs(10)).await;
    Ok(ExitCode::SUCCESS)
}

fn repair(flags: &Flags, shard: Option<u16>) -> anyhow::Result<ExitCode> {
    use weir_distinct::store::repair::ShardRepair;
    let config = flags.load()?;
    let Database::Sqlite(root) = &config.database else {
        anyhow::bail!(
            "repair is for the SQLite store (database: a directory); Postgres checks its own data"
        );
    };
    if !root.is_dir() {
        anyhow::bail!("database {}: no such directory", root.display());
    }
    let shards = weir_distinct::store::StoreOptions::default().shards;
    let done = weir_distinct::store::repair::repair(root, shards, shard)?;
    let mut repaired = 0;
    for (shard, outcome) in &done {
        match outcome {
            ShardRepair::Clean => {}
            ShardRepair::Held(holder) => {
                println!("shard {shard:02}: held by {holder}, so it opened cleanly; left alone")
            }
            ShardRepair::Repaired(logs) => {
                repaired += 1;
                for log in logs {
                    println!("shard {shard:02}: {log}");
                }
            }
        }
    }
    println!(
        "{} shard(s) checked in {}, {repaired} repaired",
        done.len(),
        root.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn describe_store(config: &DistinctConfig) -> String {
    match &config.database {
        Database::Sqlite(root) => format!("SQLite shards in {}", root.display()),
        Database::Postgres(_) => "Postgres".to_string(),
    }
}

/// The worker processes run this same binary.
fn worker_program() -> anyhow::Result<WorkerProgram> {
    let exe = std::env::current_exe().context("cannot find this program to run workers")?;
    Ok(WorkerProgram {
        exe,
        args: vec!["distinct".into(), "worker".into()],
    })
}

async fn start(
    config: DistinctConfig,
    loader: Option<weir_distinct::coordinator::Loader>,
) -> anyhow::Result<(tokio::net::TcpListener, Arc<Coordinator>, String)> {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), config.port);
    let listener = weir_runtime::http::bind(addr)
        .with_context(|| format!("cannot bind the distinct coordinator to {addr}"))?;
    let local = listener.local_addr()?;
    let mut settings = Settings::new(config.clone());
    settings.loader = loader;
    settings.program = Some(worker_program()?);
    let coordinator = Coordinator::start(settings).await?;
    let hostname = weir_distinct::config::hostname();
    let here = config
        .workers
        .iter()
        .filter(|w| w.is_local(&hostname))
        .count();
    let description = format!(
        "distinct: POST http://{local}/items ({} workers, {here} run here; {})",
        config.workers.len(),
        describe_store(&config)
    );
    Ok((listener, coordinator, description))
}

async fn coordinator(flags: CoordinatorFlags, shutdown: Shutdown) -> anyhow::Result<ExitCode> {
    let config = flags.load()?;
    let reload_flags = flags.clone();
    let loader: weir_distinct::coordinator::Loader = Arc::new(move || reload_flags.reload());
    let (listener, coordinator, description) = start(config, Some(loader)).await?;
    println!("{description}");
    weir_distinct::coordinator::serve(listener, coordinator, shutdown.clone()).await?;
    shutdown.drain(Duration::from_secs(20)).await;
    Ok(ExitCode::SUCCESS)
}

/// Distinct in `weir up`: the coordinator on :5000 and four workers on 5001-5004, on the
/// embedded SQLite store under ./weir-data/distinct.
pub async fn up(shutdown: &Shutdown) -> anyhow::Result<crate::up::Service> {
    let config = RawConfig {
        database: "./weir-data/distinct".into(),
        worker_logs: "./weir-data/distinct/logs".into(),
        ..RawConfig::default()
    }
    .validate(&weir_distinct::config::hostname())?;
    let (listener, coordinator, description) = start(config, None).await?;
    let shutdown_for_task = shutdown.clone();
    let task = shutdown.tracker.spawn(async move {
        weir_distinct::coordinator::serve(listener, coordinator, shutdown_for_task).await?;
        tracing::info!("distinct stopped");
        Ok(())
    });
    Ok(crate::up::Service {
        name: "distinct",
        description,
        task,
    })
}
