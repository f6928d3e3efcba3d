//! The runtime every Weir service shares, so that each service only holds its own logic.
//!
//! - [`config`]: layered configuration (defaults < file < environment < flags).
//! - [`telemetry`]: tracing subscriber (pretty or JSON, `RUST_LOG`) and the Prometheus recorder.
//! - [`shutdown`]: SIGINT/SIGTERM wired to a `CancellationToken`, plus task tracking.
//! - [`http`]: axum helpers: JSON error bodies, `/metrics`, graceful serving.
//! - [`datadir`]: the lock that makes a data directory one process's own.
//! - [`logs`]: rate limits and escaping for log lines that remote input can trigger.
//! - [`recordlog`]: append-only record files that tell a torn tail from damage.

pub mod config;
pub mod datadir;
pub mod http;
pub mod logs;
pub mod recordlog;
pub mod shutdown;
pub mod telemetry;

pub use shutdown::Shutdown;
