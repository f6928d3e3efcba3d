//! The distinct service: exact distinct items per tenant.
//!
//! Pure logic, synchronous and unit-tested:
//! - [`shard`]: the stable tenant → shard hash and a request's items grouped by shard.
//! - [`validate`]: one `POST /items` body to its items, or the exact reason not.
//! - [`config`]: the `config.yaml` keys, validated, and the plan of a reload.
//!
//! I/O at the edges:
//! - [`store`]: the shard stores (SQLite), single writer per shard by lock, group commit.
//! - [`server`]: the worker's HTTP API and [`server::run`].

pub mod config;
pub mod server;
pub mod shard;
pub mod store;
pub mod validate;
