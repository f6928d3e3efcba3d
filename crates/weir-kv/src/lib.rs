//! The kv service: an insertion-ordered key-value store served over a message broker.
//!
//! Pure logic, synchronous and unit-tested:
//! - [`store`]: the insertion-ordered map (O(1) add, get and remove; paged ordered reads).
//! - [`protocol`]: the wire contract, one JSON request to a [`protocol::Request`] or the
//!   reason it is malformed, and the JSON replies.

pub mod protocol;
pub mod store;
