//! The kv service: an insertion-ordered key-value store served over a message broker.
//!
//! Pure logic, synchronous and unit-tested:
//! - [`store`]: the insertion-ordered map (O(1) add, get and remove; paged ordered reads).
//! - [`protocol`]: the wire contract, one JSON request to a [`protocol::Request`] or the
//!   reason it is malformed, and the JSON replies.
//! - [`dedupe`]: which redelivered requests were already applied.
//! - [`engine`]: one request to its effects (store, reply, journal write, dead letter).
//!
//! I/O at the edges:
//! - [`journal`]: the data directory, a snapshot plus an append-only journal of writes.
//! - [`output`]: `--output FILE`, one JSON line per write, reconciled with the journal.
//! - [`server`]: the broker loop: consume, apply in order, log, reply, acknowledge.
//! - [`auto_ack`]: `--acks auto`, deliveries of an auto-ack consumer with a bound on what kv
//!   holds (the broker's prefetch window does not apply to them).
//!
//! Tools: [`client`] (request-reply over the broker, `weir kv client`) and [`bench`](mod@bench) (the load
//! tool, `weir kv bench`).
//!
//! [`config`] holds the settings, validated at start.

pub mod auto_ack;
pub mod bench;
pub mod client;
pub mod config;
pub mod dedupe;
pub mod engine;
pub mod journal;
pub mod output;
pub mod protocol;
pub mod server;
pub mod store;
