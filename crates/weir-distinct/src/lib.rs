//! The distinct service: exact distinct items per tenant.
//!
//! Pure logic, synchronous and unit-tested:
//! - [`shard`]: the stable tenant → shard hash, and a request's items grouped and encoded
//!   per shard.
//! - [`validate`]: one `POST /items` body to its items, or the exact reason not.
//! - [`config`]: the `config.yaml` keys, validated, and the plan of a reload.
//! - [`coordinator::routing`]: which worker writes a shard (rendezvous order), backoff.
//! - [`openapi`]: the coordinator's OpenAPI document.
//!
//! I/O at the edges:
//! - [`store`]: the shard stores (SQLite: per-shard logs folded into an index; Postgres),
//!   single writer per shard by lock.
//! - [`server`]: the worker's HTTP API and [`server::run`].
//! - [`coordinator`]: the coordinator's HTTP API, its routing and retries, the worker
//!   processes it supervises, health checks and config reloads; [`coordinator::run`].
//! - [`bench`]: `weir distinct bench`, load and an exactness check over HTTP.

pub mod bench;
pub mod config;
pub mod coordinator;
pub mod metric_names;
pub mod openapi;
pub mod server;
pub mod shard;
pub mod store;
pub mod validate;
