//! Telling a redelivered request that was already applied from one that was not.
//!
//! The server is the queue's only consumer and applies in delivery order, acknowledging in
//! batches after the journal commit. If it dies (or loses its connection) between applying
//! and acknowledging, the broker puts the unacknowledged deliveries back at their places and
//! delivers them again, flagged `redelivered`, in their original order, ahead of anything new.
//! Acks are cumulative, so the broker has a prefix of what kv applied: the redeliveries start
//! with the applied writes whose ack was lost, then come requests that were delivered but never
//! applied (they sat in kv's socket buffer when it died, and kv cannot know how many).
//!
//! A body says nothing about which of the two a redelivery is: identical bodies are normal
//! (a fire-and-forget client adding the same key twice). So requests are matched by
//! **identity** only: the request's `message_id` when it has one, else its `reply_to` with its
//! `correlation_id` when it has a correlation id ([`identity`]). The writes applied but not
//! known to be acknowledged are remembered with their request's identity (from the journal
//! after a crash); a redelivered request with an identity is a copy when it matches one of
//! them, in order: a match drops the entries before it (their acks reached the broker), and a
//! later copy can only match a later entry. A copy is answered from the write it made (the
//! same reply as the first time) and not applied again.
//!
//! A redelivered write without an identity cannot be told from a new one, so it is applied
//! (again): at least once, never lost. What a repeat can do is exactly what the client
//! sending that run of requests twice in a row would do (see the tests of [`Unacked`]): every
//! key ends with the value and presence the run's last write on it gives, and only the order
//! of keys can differ, when the run removed and re-added a key.
//!
//! A matched entry is kept until the ack of its copy is known to have reached the broker:
//! if the connection is lost again first, the copy is redelivered once more, and must be
//! recognised again. Each broker session starts matching from the oldest entry again.

use std::collections::VecDeque;
use std::hash::Hasher;

use crate::journal::Write;

/// The identity of a request without one: never matched.
pub const NO_IDENTITY: u64 = 0;

/// The identity of one request, as stored with its write ([`Write::identity`]): its
/// `message_id`, else its `reply_to` and `correlation_id` when it has a correlation id, else
/// [`NO_IDENTITY`]. The body is not part of it. Stable across processes and versions (FxHash
/// has no random seed), since it is stored; never [`NO_IDENTITY`] for a request with one.
pub fn identity(
    correlation_id: Option<&str>,
    reply_to: Option<&str>,
    message_id: Option<&str>,
) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    match (message_id, correlation_id) {
        (Some(message_id), _) => {
            hasher.write_u8(b'm');
            put(&mut hasher, message_id);
        }
        (None, Some(correlation_id)) => {
            hasher.write_u8(b'c');
            put(&mut hasher, reply_to.unwrap_or(""));
            put(&mut hasher, correlation_id);
        }
        (None, None) => return NO_IDENTITY,
    }
    hasher.finish().max(1)
}

/// Length-prefixed, so ("ab", "") and ("a", "b") differ.
fn put(hasher: &mut rustc_hash::FxHasher, part: &str) {
    hasher.write_usize(part.len());
    hasher.write(part.as_bytes());
}

/// The writes applied but not known to be acknowledged, in three groups, each in op order:
/// from before this broker session, those whose redelivered copy was seen (`matched`) and
/// those whose copy may still come (`awaiting`); and those applied in this session.
#[derive(Debug, Default)]
pub struct Unacked {
    matched: VecDeque<Write>,
    awaiting: VecDeque<Write>,
    applied: VecDeque<Write>,
}

impl Unacked {
    pub fn new(writes: impl IntoIterator<Item = Write>) -> Self {
        Unacked {
            awaiting: writes.into_iter().collect(),
            ..Unacked::default()
        }
    }

    pub fn len(&self) -> usize {
        self.matched.len() + self.awaiting.len() + self.applied.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A write was applied and is waiting for its acknowledgement.
    pub fn applied(&mut self, write: Write) {
        self.applied.push_back(write);
    }

    /// Every delivery handled so far was acknowledged (and the broker has the ack); the last
    /// write among them is `op`. Writes whose copy has not come yet stay: the ack did not
    /// cover them. Returns the op through which every write is now acknowledged.
    pub fn acked_through(&mut self, op: u64) -> u64 {
        self.matched.clear();
        while self.applied.front().is_some_and(|write| write.op <= op) {
            self.applied.pop_front();
        }
        match self.awaiting.front() {
            Some(oldest) => op.min(oldest.op.saturating_sub(1)),
            None => op,
        }
    }

    /// A new broker session: everything still here may be redelivered again, from the start.
    pub fn new_session(&mut self) {
        let mut all = std::mem::take(&mut self.matched);
        all.append(&mut self.awaiting);
        all.append(&mut self.applied);
        self.awaiting = all;
    }

    /// For a delivery with this identity: the write it already made, if it is a redelivered
    /// copy of an applied request. Entries passed over on the way were acknowledged before
    /// the broker forgot the rest, and are dropped; so are all that still await a copy once
    /// a fresh delivery comes, since the broker sends every redelivery ahead of anything new.
    /// A request without an identity is never a copy, and passes nothing over.
    pub fn take_copy(&mut self, redelivered: bool, identity: u64) -> Option<Write> {
        if !redelivered {
            self.awaiting.clear();
            return None;
        }
        if identity == NO_IDENTITY {
            return None;
        }
        let at = self
            .awaiting
            .iter()
            .position(|write| write.identity == identity)?;
        self.awaiting.drain(..at);
        let copy = self.awaiting.pop_front()?;
        self.matched.push_back(copy.clone());
        Some(copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::WriteKind;

    fn write(op: u64, identity: u64) -> Write {
        Write {
            op,
            identity,
            outcome: false,
            kind: WriteKind::Remove { key: "k".into() },
        }
    }

    #[test]
    fn a_fresh_delivery_is_never_a_copy_and_ends_the_redeliveries() {
        let mut unacked = Unacked::new([write(1, 10)]);
        unacked.applied(write(2, 20));
        assert_eq!(unacked.take_copy(false, 10), None);
        assert_eq!(unacked.len(), 1, "only the write of this session is left");
        assert_eq!(unacked.take_copy(true, 10), None);
    }

    #[test]
    fn an_ack_during_the_redeliveries_keeps_the_writes_whose_copy_is_yet_to_come() {
        // The copies come over two batches, each acknowledged on its own.
        let mut unacked = Unacked::new([write(1, 10), write(2, 20), write(3, 30)]);
        unacked.new_session();
        assert_eq!(unacked.take_copy(true, 10).map(|w| w.op), Some(1));
        assert_eq!(
            unacked.acked_through(3),
            1,
            "2 and 3 are not acknowledged yet"
        );
        assert_eq!(unacked.take_copy(true, 20).map(|w| w.op), Some(2));
        assert_eq!(unacked.take_copy(true, 30).map(|w| w.op), Some(3));
        assert_eq!(unacked.acked_through(3), 3);
        assert!(unacked.is_empty());
    }

    #[test]
    fn redelivered_copies_match_in_order_and_identical_requests_are_told_apart() {
        // Two identical requests (identity 10), the first applied, the second not.
        let mut unacked = Unacked::new([write(1, 10), write(2, 20)]);
        assert_eq!(unacked.take_copy(true, 10).map(|w| w.op), Some(1));
        assert_eq!(unacked.take_copy(true, 20).map(|w| w.op), Some(2));
        assert_eq!(
            unacked.take_copy(true, 10),
            None,
            "the second copy was never applied"
        );
    }

    #[test]
    fn entries_acknowledged_before_the_crash_are_passed_over() {
        let mut unacked = Unacked::new([write(1, 10), write(2, 20), write(3, 30)]);
        // 1 and 2 were acknowledged but the marker did not reach the journal.
        assert_eq!(unacked.take_copy(true, 30).map(|w| w.op), Some(3));
        assert_eq!(unacked.len(), 1, "3 waits for the ack of its copy");
    }

    #[test]
    fn a_copy_redelivered_again_after_another_lost_connection_is_still_a_copy() {
        let mut unacked = Unacked::new([write(1, 10), write(2, 20)]);
        assert_eq!(unacked.take_copy(true, 10).map(|w| w.op), Some(1));
        assert_eq!(unacked.take_copy(true, 20).map(|w| w.op), Some(2));
        // The connection is lost before the copies' ack reached the broker.
        unacked.new_session();
        assert_eq!(unacked.take_copy(true, 10).map(|w| w.op), Some(1));
        assert_eq!(unacked.take_copy(true, 20).map(|w| w.op), Some(2));
        assert_eq!(unacked.acked_through(2), 2);
        assert!(unacked.is_empty());
    }

    #[test]
    fn acknowledgements_drop_what_they_cover() {
        let mut unacked = Unacked::default();
        for op in 1..=5 {
            unacked.applied(write(op, op * 10));
        }
        assert_eq!(unacked.acked_through(3), 3);
        assert_eq!(unacked.len(), 2);
        assert_eq!(unacked.take_copy(true, 20), None);
    }

    #[test]
    fn the_identity_is_the_message_id_else_reply_to_and_correlation_id_never_the_body() {
        let by_message = identity(Some("c1"), Some("r"), Some("m1"));
        assert_eq!(by_message, identity(None, None, Some("m1")));
        assert_ne!(by_message, identity(None, None, Some("m2")));
        let by_correlation = identity(Some("c1"), Some("r"), None);
        assert_ne!(by_correlation, identity(Some("c2"), Some("r"), None));
        assert_ne!(by_correlation, identity(Some("c1"), Some("r2"), None));
        assert_ne!(by_correlation, NO_IDENTITY);
        assert_ne!(
            identity(Some(""), Some("ab"), None),
            identity(Some("b"), Some("a"), None)
        );
        assert_eq!(identity(None, Some("r"), None), NO_IDENTITY);
        assert_eq!(identity(None, None, None), NO_IDENTITY);
    }

    #[test]
    fn a_redelivered_write_without_identity_is_never_a_copy_and_passes_nothing_over() {
        // The issue's case: two identical bodies, no properties; the first applied, its ack
        // lost, the second never applied. Neither may be answered as a copy.
        let mut unacked = Unacked::new([write(1, NO_IDENTITY), write(2, 20)]);
        assert_eq!(unacked.take_copy(true, NO_IDENTITY), None);
        assert_eq!(unacked.take_copy(true, NO_IDENTITY), None);
        assert_eq!(unacked.len(), 2, "nothing was passed over");
        assert_eq!(unacked.take_copy(true, 20).map(|w| w.op), Some(2));
    }
}
