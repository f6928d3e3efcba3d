//! `weir up`: every service at once, each with its embedded defaults, until Ctrl-C.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use weir_runtime::Shutdown;

pub const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9100);

#[derive(clap::Args)]
pub struct UpArgs {
    /// Seconds to wait for services to drain after Ctrl-C.
    #[arg(long, default_value_t = 15)]
    grace_secs: u64,
}

pub async fn run(args: UpArgs, shutdown: Shutdown) -> anyhow::Result<ExitCode> {
    let mut lines = vec![crate::relay::up(&shutdown).await?];
    lines.extend(crate::increments::up(&shutdown).await?);
    println!("weir is up:");
    for line in &lines {
        println!("  {line}");
    }
    println!("  metrics: GET http://{DEFAULT_METRICS_ADDR}/metrics (unless --metrics-addr says otherwise)");
    println!("Ctrl-C to stop.");
    shutdown.token.cancelled().await;
    if shutdown.drain(Duration::from_secs(args.grace_secs)).await {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("some services did not drain within {}s", args.grace_secs);
        Ok(ExitCode::FAILURE)
    }
}
