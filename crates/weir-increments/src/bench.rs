//! `weir increments bench`: N keep-alive HTTP/1 connections (hyper) POSTing increments for
//! a fixed time, reporting requests/s and latency percentiles; `--bare` instead serves a
//! handler that only answers 202, the ceiling any real handler is measured against.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchFlags {
    /// Target base URL, e.g. http://127.0.0.1:3333
    #[arg(long, default_value = "http://127.0.0.1:3333")]
    pub url: String,
    /// Serve a bare 202 handler on this address instead of generating load.
    #[arg(long)]
    pub bare: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("not built yet")]
    Missing,
}

pub async fn run(_flags: BenchFlags, _token: CancellationToken) -> Result<bool, BenchError> {
    Err(BenchError::Missing)
}
