//! `weir up`: every service at once, each with its embedded defaults, until Ctrl-C.
//!
//! All or nothing, as a supervisor expects: if any service cannot start (a port taken, a data
//! directory locked by another process or not writable), the ones already started are drained
//! and `weir up` exits non-zero naming the service and the cause. The banner is printed only
//! once every service is listening. A service that stops on its own later takes the others
//! down the same way, so a process that is up always runs every service it announced.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio::task::{JoinHandle, JoinSet};
use weir_runtime::Shutdown;

pub const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9100);

#[derive(clap::Args)]
pub struct UpArgs {
    /// Seconds to wait for services to drain after Ctrl-C.
    #[arg(long, default_value_t = 15)]
    grace_secs: u64,
}

/// A service that has started: everything that can fail at start-up has succeeded.
pub struct Service {
    pub name: &'static str,
    /// One line for the banner: where it listens and what it stores.
    pub description: String,
    /// Ends when the service stops: after the shutdown token, or on a failure.
    pub task: JoinHandle<anyhow::Result<()>>,
}

pub async fn run(args: UpArgs, shutdown: Shutdown) -> anyhow::Result<ExitCode> {
    let grace = Duration::from_secs(args.grace_secs);
    let services = match start_all(&shutdown).await {
        Ok(services) => services,
        Err(failure) => {
            eprintln!("error: weir up: {failure:#}");
            shutdown.drain(grace).await;
            return Ok(ExitCode::FAILURE);
        }
    };
    announce(&services);

    let stopped_early = supervise(services, &shutdown).await;
    let drained = shutdown.drain(grace).await;
    if !drained {
        eprintln!("some services did not drain within {}s", args.grace_secs);
    }
    match stopped_early {
        Some(failure) => {
            eprintln!("error: weir up: {failure:#}");
            Ok(ExitCode::FAILURE)
        }
        None if drained => Ok(ExitCode::SUCCESS),
        None => Ok(ExitCode::FAILURE),
    }
}

/// Prints where each service listens. A closed stdout (`weir up | head -1`) must not take
/// the services down with it, so write errors are ignored rather than panicking as
/// `println!` would.
fn announce(services: &[Service]) {
    let mut banner = String::from("weir is up:\n");
    for service in services {
        banner.push_str(&format!("  {}\n", service.description));
    }
    banner.push_str(&format!(
        "  metrics: GET http://{DEFAULT_METRICS_ADDR}/metrics (unless --metrics-addr says otherwise)\n"
    ));
    banner.push_str("Ctrl-C to stop.\n");
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(banner.as_bytes())
        .and_then(|()| stdout.flush());
}

/// Starts the services one after another; the first failure is returned with the service's
/// name, and whatever started before it is left for the caller's drain to stop.
async fn start_all(shutdown: &Shutdown) -> anyhow::Result<Vec<Service>> {
    let relay = crate::relay::up(shutdown)
        .await
        .context("relay cannot start")?;
    let increments = crate::increments::up(shutdown)
        .await
        .context("increments cannot start")?;
    let kv = crate::kv::up(shutdown).await.context("kv cannot start")?;
    let distinct = crate::distinct::up(shutdown)
        .await
        .context("distinct cannot start")?;
    Ok(vec![relay, increments, kv, distinct])
}

/// Waits for the shutdown signal, or for a service to stop before it: that one is returned
/// as the failure that ends the process.
async fn supervise(services: Vec<Service>, shutdown: &Shutdown) -> Option<anyhow::Error> {
    let mut running = JoinSet::new();
    for service in services {
        running.spawn(async move {
            let outcome = match service.task.await {
                Ok(Ok(())) => anyhow::anyhow!("stopped unexpectedly"),
                Ok(Err(err)) => err,
                Err(join) => anyhow::Error::new(join),
            };
            outcome.context(format!("{} stopped", service.name))
        });
    }
    tokio::select! {
        // A service that ends because of the signal is not a failure.
        biased;
        _ = shutdown.token.cancelled() => None,
        Some(ended) = running.join_next() => Some(match ended {
            Ok(failure) => failure,
            Err(join) => anyhow::Error::new(join).context("a service supervisor failed"),
        }),
    }
}
