//! `weir relay serve` and `weir relay check`.

use std::process::ExitCode;

use clap::Subcommand;
use weir_relay::check::CheckFlags;
use weir_relay::config::ServeFlags;
use weir_relay::Listeners;
use weir_runtime::Shutdown;

#[derive(Subcommand)]
pub enum RelayCommand {
    /// Run the relay: event source on 9090, user clients on 9099.
    Serve(ServeFlags),
    /// Drive any follower-maze server with a deterministic stream and verify every
    /// notification each connected user receives.
    Check(CheckFlags),
}

pub async fn run(command: RelayCommand, shutdown: Shutdown) -> anyhow::Result<ExitCode> {
    match command {
        RelayCommand::Serve(flags) => {
            let config = flags.load()?;
            let listeners = Listeners::bind(&config).await?;
            let description = describe(&listeners)?;
            let relay = weir_relay::spawn(listeners, config, shutdown.clone())?;
            // Announced only once it runs (the state file locked and loaded): scripts wait
            // for this line.
            println!("{description}");
            relay.wait().await?;
            shutdown.drain(std::time::Duration::from_secs(10)).await;
            Ok(ExitCode::SUCCESS)
        }
        RelayCommand::Check(flags) => {
            let config = flags.load()?;
            let report = weir_relay::check::run(config, shutdown.token.clone()).await?;
            Ok(if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Starts the relay with its defaults for `weir up`: returns once both ports are bound and
/// the relay's tasks are running, with the task that ends when it stops.
pub async fn up(shutdown: &Shutdown) -> anyhow::Result<crate::up::Service> {
    let config = ServeFlags::default().load()?;
    let listeners = Listeners::bind(&config).await?;
    let description = describe(&listeners)?;
    let relay = weir_relay::spawn(listeners, config, shutdown.clone())?;
    let task = shutdown.tracker.spawn(async move {
        relay.wait().await?;
        Ok(())
    });
    Ok(crate::up::Service {
        name: "relay",
        description,
        task,
    })
}

fn describe(listeners: &Listeners) -> std::io::Result<String> {
    Ok(format!(
        "relay: event source on {}, user clients on {}",
        listeners.events.local_addr()?,
        listeners.clients.local_addr()?
    ))
}
