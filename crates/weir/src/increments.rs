//! `weir increments ...` (the service lands in its own change).

use std::process::ExitCode;

use clap::Subcommand;
use weir_runtime::Shutdown;

#[derive(Subcommand)]
pub enum IncrementsCommand {
    /// API and worker in one process (not available yet).
    Serve,
}

pub async fn run(command: IncrementsCommand, _shutdown: Shutdown) -> anyhow::Result<ExitCode> {
    match command {
        IncrementsCommand::Serve => anyhow::bail!("the increments service is not built yet"),
    }
}

/// Lines describing what `weir up` started for this service.
pub async fn up(_shutdown: &Shutdown) -> anyhow::Result<Vec<String>> {
    Ok(Vec::new())
}
