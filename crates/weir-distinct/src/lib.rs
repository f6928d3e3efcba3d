//! The distinct service: exact distinct items per tenant.
//!
//! Pure logic, synchronous and unit-tested:
//! - [`shard`]: the stable tenant → shard hash, and a request's items grouped and encoded
//!   per shard.
//! - [`validate`]: one `POST /items` body to its items, or the exact reason not.
//! - [`config`]: the `config.yaml` keys, validated, and the plan of a reload.
//!
//! I/O at the edges:
//! - [`store`]: the shard stores (SQLite: per-shard logs folded into an index; Postgres),
//!   single writer per shard by lock.
//! - [`server`]: the worker's HTTP API and [`server::run`].
//! - [`bench`]: `weir distinct bench`, load and an exactness check over HTTP.

pub mod bench;
pub mod config;
pub mod server;
pub mod shard;
pub mod store;
pub mod validate;
