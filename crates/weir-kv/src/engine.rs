//! One request in, its effects out: the store, the reply, the write to log, the dead letter.
//!
//! Synchronous and free of I/O, so the rules (in order, once, every request answered) are
//! tested without a broker; the broker loop only moves bytes in and effects out.

use crate::dedupe::{fingerprint, Unacked};
use crate::journal::{Write, WriteKind};
use crate::protocol::{self, Reply, Request};
use crate::store::{Added, Store};

/// What the broker delivered, as far as the engine cares.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub body: &'a [u8],
    pub redelivered: bool,
    pub correlation_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    pub message_id: Option<&'a str>,
}

/// What handling one request produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Handled {
    /// The JSON reply (sent only when the request has `reply_to`).
    pub reply: Vec<u8>,
    /// A new write to log before acknowledging.
    pub write: Option<Write>,
    /// Why the request goes to the dead-letter queue, if it does.
    pub dead_letter: Option<String>,
    /// The same as a metric label: one of [`protocol::Malformed::REASONS`], set exactly when
    /// `dead_letter` is.
    pub dead_letter_reason: Option<&'static str>,
    /// Metric labels.
    pub action: &'static str,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// A redelivered copy of a write already applied: answered, not applied again.
    Duplicate,
    Malformed,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Malformed => "malformed",
        }
    }
}

#[derive(Debug, Default)]
pub struct Engine {
    pub store: Store,
    last_op: u64,
    unacked: Unacked,
}

impl Engine {
    pub fn new(store: Store, last_op: u64, unacked: Vec<Write>) -> Self {
        Engine {
            store,
            last_op,
            unacked: Unacked::new(unacked),
        }
    }

    /// The number of the last write applied.
    pub fn last_op(&self) -> u64 {
        self.last_op
    }

    /// Writes applied and not yet known to be acknowledged.
    pub fn unacked_len(&self) -> usize {
        self.unacked.len()
    }

    /// A new broker session: unacknowledged writes may all be redelivered again.
    pub fn new_session(&mut self) {
        self.unacked.new_session();
    }

    /// Every delivery handled so far, up to write `op`, was acknowledged to the broker.
    /// Returns the op through which every write is acknowledged (what the journal may mark).
    pub fn acked_through(&mut self, op: u64) -> u64 {
        self.unacked.acked_through(op)
    }

    pub fn handle(&mut self, incoming: Incoming<'_>) -> Handled {
        let request = match protocol::parse(incoming.body) {
            Ok(request) => request,
            Err(malformed) => {
                let reason = malformed.to_string();
                return Handled {
                    reply: Reply::error(&reason).to_json(),
                    write: None,
                    dead_letter: Some(reason),
                    dead_letter_reason: Some(malformed.reason()),
                    action: "malformed",
                    outcome: Outcome::Malformed,
                };
            }
        };
        let action = request.action();
        if request.is_write() {
            let print = fingerprint(
                incoming.body,
                incoming.correlation_id,
                incoming.reply_to,
                incoming.message_id,
            );
            if let Some(done) = self.unacked.take_copy(incoming.redelivered, print) {
                return Handled {
                    reply: reply_for(&done),
                    write: None,
                    dead_letter: None,
                    dead_letter_reason: None,
                    action,
                    outcome: Outcome::Duplicate,
                };
            }
            let write = self.apply_write(request, print);
            self.unacked.applied(write.clone());
            return Handled {
                reply: reply_for(&write),
                write: Some(write),
                dead_letter: None,
                dead_letter_reason: None,
                action,
                outcome: Outcome::Applied,
            };
        }
        let reply = match &request {
            Request::Get { key } => Reply::got(key, self.store.get(key)).to_json(),
            Request::GetAll { limit, after } => {
                Reply::page(self.store.page(*after, *limit)).to_json()
            }
            Request::Add { .. } | Request::Remove { .. } => Vec::new(),
        };
        Handled {
            reply,
            write: None,
            dead_letter: None,
            dead_letter_reason: None,
            action,
            outcome: Outcome::Applied,
        }
    }

    fn apply_write(&mut self, request: Request, fingerprint: u64) -> Write {
        self.last_op += 1;
        let (outcome, kind) = match request {
            Request::Add { key, value } => (
                self.store.add(&key, &value) == Added::Replaced,
                WriteKind::Add { key, value },
            ),
            Request::Remove { key } => {
                (self.store.remove(&key).is_some(), WriteKind::Remove { key })
            }
            Request::Get { .. } | Request::GetAll { .. } => {
                unreachable!("only writes reach apply_write")
            }
        };
        Write {
            op: self.last_op,
            fingerprint,
            outcome,
            kind,
        }
    }
}

fn reply_for(write: &Write) -> Vec<u8> {
    match write.kind {
        WriteKind::Add { .. } => Reply::added(if write.outcome {
            Added::Replaced
        } else {
            Added::Inserted
        }),
        WriteKind::Remove { .. } => Reply::removed(write.outcome),
    }
    .to_json()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn incoming(body: &[u8], redelivered: bool) -> Incoming<'_> {
        Incoming {
            body,
            redelivered,
            correlation_id: Some("c"),
            reply_to: Some("r"),
            message_id: None,
        }
    }

    fn reply(handled: &Handled) -> Value {
        serde_json::from_slice(&handled.reply).unwrap()
    }

    #[test]
    fn requests_are_applied_in_order_and_answered() {
        let mut engine = Engine::default();
        let added = engine.handle(incoming(
            br#"{"action":"add","key":"A","value":"a"}"#,
            false,
        ));
        assert_eq!(reply(&added), json!({"ok": true, "replaced": false}));
        assert_eq!(added.write.as_ref().map(|w| w.op), Some(1));
        let got = engine.handle(incoming(br#"{"action":"get","key":"A"}"#, false));
        assert_eq!(
            reply(&got),
            json!({"ok": true, "found": true, "key": "A", "value": "a"})
        );
        assert_eq!(got.write, None, "reads are not logged");
        let removed = engine.handle(incoming(br#"{"action":"remove","key":"A"}"#, false));
        assert_eq!(reply(&removed), json!({"ok": true, "removed": true}));
        assert_eq!(engine.last_op(), 2);
    }

    #[test]
    fn a_malformed_request_is_answered_and_dead_lettered_without_touching_the_store() {
        let mut engine = Engine::default();
        let handled = engine.handle(incoming(br#"{"action":"put"}"#, false));
        assert_eq!(handled.outcome, Outcome::Malformed);
        assert_eq!(reply(&handled)["ok"], json!(false));
        assert!(handled
            .dead_letter
            .as_deref()
            .unwrap()
            .contains("unknown action"));
        assert_eq!(handled.dead_letter_reason, Some("unknown_action"));
        assert_eq!(engine.last_op(), 0);
    }

    #[test]
    fn a_redelivered_write_is_answered_as_before_and_not_applied_again() {
        let mut engine = Engine::default();
        let body = br#"{"action":"add","key":"A","value":"a"}"#;
        let first = engine.handle(incoming(body, false));
        engine.handle(incoming(br#"{"action":"remove","key":"A"}"#, false));
        // The connection dropped before the ack: both come back, flagged, in a new session.
        engine.new_session();
        let copy = engine.handle(incoming(body, true));
        assert_eq!(copy.outcome, Outcome::Duplicate);
        assert_eq!(copy.reply, first.reply);
        assert_eq!(copy.write, None);
        assert_eq!(engine.store.len(), 0, "A stays removed");
        assert_eq!(engine.last_op(), 2);
    }

    #[test]
    fn after_an_acknowledgement_a_redelivered_flag_alone_does_not_skip() {
        let mut engine = Engine::default();
        let body = br#"{"action":"add","key":"A","value":"a"}"#;
        engine.handle(incoming(body, false));
        engine.acked_through(1);
        let again = engine.handle(incoming(body, true));
        assert_eq!(again.outcome, Outcome::Applied);
        assert_eq!(engine.last_op(), 2);
    }
}
