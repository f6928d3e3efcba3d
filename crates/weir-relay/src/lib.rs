//! The follower-maze relay: one event source, many user clients, every notification
//! delivered in sequence order, in memory bounded by how far out of order the stream is.
//!
//! Pure logic, synchronous and unit-tested:
//! - [`event`]: one source line to an [`event::Event`] (or a reason it is malformed).
//! - [`reorder`]: the bounded reorder window and its gap policy.
//! - [`gap_timer`]: when `--gap-timeout-ms` gives up on missing numbers.
//! - [`graph`]: who follows whom.
//! - [`router`]: which connected clients an event notifies, batching their bytes.
//! - [`queue_budget`]: which clients to drop when all queues together are over the cap.
//! - [`state`]: the state file (next sequence number and follow graph) across restarts.
//! - [`delivery`]: how long events wait between their receipt and their release, sampled.
//!
//! I/O at the edges:
//! - [`server`]: the listeners, the source session, client sessions, and the dispatcher
//!   (one file each under `server/`).
//! - [`stats`]: counters for tests and Prometheus.
//! - [`check`]: `weir relay check`, the load generator and verifier for any relay.
//!
//! [`config`] holds the settings of the server.

pub mod check;
pub mod config;
pub mod delivery;
pub mod event;
pub mod gap_timer;
pub mod graph;
pub mod queue_budget;
pub mod reorder;
pub mod router;
pub mod server;
pub mod state;
pub mod stats;

pub use server::{run, spawn, Listeners, RelayError, RelayHandle};
