//! Telling a redelivered request that was already applied from one that was not.
//!
//! The server is the queue's only consumer and applies in delivery order, acknowledging in
//! batches after the journal commit. If it dies (or loses its connection) between applying
//! and acknowledging, the broker delivers those requests again, flagged `redelivered`, in
//! their original order, ahead of anything new. Applying them again is not harmless: replaying
//! a suffix of adds and removes can move keys in the insertion order. So the writes applied
//! but not yet acknowledged are remembered (from the journal after a crash), each with a
//! fingerprint of its request, and a redelivered request is matched against them in order.
//!
//! Matching skips forward: a write whose acknowledgement reached the broker just before the
//! crash is not redelivered, and its entry is passed over. A redelivered request that matches
//! nothing was never applied and is applied now. Two identical requests (same body and
//! properties) are told apart by order: the first copy matches the first entry, the second
//! copy finds that entry already matched.
//!
//! A matched entry is kept until the ack of its copy is known to have reached the broker:
//! if the connection is lost again first, the copy is redelivered once more, and must be
//! recognised again. Each broker session starts matching from the oldest entry again.

use std::collections::VecDeque;
use std::hash::Hasher;

use crate::journal::Write;

/// Fingerprint of one request: its body and the properties that make it distinct. Stable
/// across processes and versions (FxHash has no random seed), since it is stored.
pub fn fingerprint(
    body: &[u8],
    correlation_id: Option<&str>,
    reply_to: Option<&str>,
    message_id: Option<&str>,
) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    hasher.write(body);
    for part in [correlation_id, reply_to, message_id] {
        // Length-prefixed, so ("ab", "") and ("a", "b") differ.
        let part = part.unwrap_or("");
        hasher.write_usize(part.len());
        hasher.write(part.as_bytes());
    }
    hasher.finish()
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

    /// For a delivery with this fingerprint: the write it already made, if it is a
    /// redelivered copy of an applied request. Entries passed over on the way were
    /// acknowledged before the broker forgot the rest, and are dropped; so are all that
    /// still await a copy once a fresh delivery comes, since the broker sends every
    /// redelivery ahead of anything new.
    pub fn take_copy(&mut self, redelivered: bool, fingerprint: u64) -> Option<Write> {
        if !redelivered {
            self.awaiting.clear();
            return None;
        }
        let at = self
            .awaiting
            .iter()
            .position(|write| write.fingerprint == fingerprint)?;
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

    fn write(op: u64, fingerprint: u64) -> Write {
        Write {
            op,
            fingerprint,
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
        // Two identical requests (fingerprint 10), the first applied, the second not.
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
    fn fingerprints_cover_body_and_properties() {
        let base = fingerprint(b"{}", Some("c1"), Some("r"), None);
        assert_eq!(base, fingerprint(b"{}", Some("c1"), Some("r"), None));
        assert_ne!(base, fingerprint(b"{} ", Some("c1"), Some("r"), None));
        assert_ne!(base, fingerprint(b"{}", Some("c2"), Some("r"), None));
        assert_ne!(
            fingerprint(b"", Some("ab"), Some(""), None),
            fingerprint(b"", Some("a"), Some("b"), None)
        );
    }
}
