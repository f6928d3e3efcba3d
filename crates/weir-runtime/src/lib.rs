//! The runtime every Weir service shares, so that each service only holds its own logic.
//!
//! - [`config`]: layered configuration (defaults < file < environment < flags).
//! - [`telemetry`]: tracing subscriber (pretty or JSON, `RUST_LOG`) and the Prometheus recorder.
//! - [`shutdown`]: SIGINT/SIGTERM wired to a `CancellationToken`, plus task tracking.
//! - [`http`]: axum helpers: JSON error bodies, `/metrics`, graceful serving.

pub mod config;
pub mod http;
pub mod shutdown;
pub mod telemetry;

pub use shutdown::Shutdown;
