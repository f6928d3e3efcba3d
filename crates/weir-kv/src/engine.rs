//! One request in, its effects out: the store, the reply, the write to log, the dead letter.
//!
//! Synchronous and free of I/O, so the rules (in order, once, every request answered) are
//! tested without a broker; the broker loop only moves bytes in and effects out.

use crate::dedupe::{identity, Unacked};
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
            let id = identity(
                incoming.correlation_id,
                incoming.reply_to,
                incoming.message_id,
            );
            if let Some(done) = self.unacked.take_copy(incoming.redelivered, id) {
                return Handled {
                    reply: reply_for(&done),
                    write: None,
                    dead_letter: None,
                    dead_letter_reason: None,
                    action,
                    outcome: Outcome::Duplicate,
                };
            }
            let write = self.apply_write(request, id);
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
            Request::GetAll { limit, after } => Reply::page(self.store.page_within(
                *after,
                *limit,
                protocol::MAX_PAGE_BYTES,
                protocol::item_json_bytes,
            ))
            .to_json(),
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

    fn apply_write(&mut self, request: Request, identity: u64) -> Write {
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
            identity,
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

    #[test]
    fn an_unapplied_identical_write_after_a_crash_is_applied_not_taken_for_a_copy() {
        // The issue's scenario, fire-and-forget (no properties): `remove X; add X; fillers;
        // remove X; add END`. The first four were applied, their ack lost with the process;
        // `remove X` and `add END` were delivered but never applied.
        let remove = br#"{"action":"remove","key":"X"}"#;
        let add = br#"{"action":"add","key":"X","value":"x"}"#;
        let filler = br#"{"action":"add","key":"F","value":"f"}"#;
        let end = br#"{"action":"add","key":"END","value":"e"}"#;
        let bare = |body: &'static [u8], redelivered| Incoming {
            body,
            redelivered,
            correlation_id: None,
            reply_to: None,
            message_id: None,
        };
        let mut engine = Engine::default();
        let mut written = Vec::new();
        for body in [&remove[..], add, filler] {
            written.extend(engine.handle(bare(body, false)).write);
        }
        // Restart from the journal: all three writes unacknowledged.
        let mut engine = Engine::new(engine.store.clone(), engine.last_op(), written);
        engine.new_session();
        for body in [&remove[..], add, filler, remove, end] {
            let handled = engine.handle(bare(body, true));
            assert_eq!(handled.outcome, Outcome::Applied);
        }
        let keys: Vec<&str> = engine.store.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["F", "END"], "X was removed last");
    }

    #[test]
    fn an_identified_copy_is_answered_as_the_first_time_and_an_identical_request_is_not_a_copy() {
        let body = br#"{"action":"add","key":"A","value":"a"}"#;
        let with_id = |id: &'static str, redelivered| Incoming {
            body,
            redelivered,
            correlation_id: None,
            reply_to: None,
            message_id: Some(id),
        };
        let mut engine = Engine::default();
        let first = engine.handle(with_id("m1", false));
        engine.new_session();
        let copy = engine.handle(with_id("m1", true));
        assert_eq!(copy.outcome, Outcome::Duplicate);
        assert_eq!(copy.reply, first.reply, "the same answer as the first time");
        let other = engine.handle(with_id("m2", true));
        assert_eq!(
            other.outcome,
            Outcome::Applied,
            "same body, another identity"
        );
        assert_eq!(reply(&other), json!({"ok": true, "replaced": true}));
    }

    #[test]
    fn a_page_of_large_escaped_values_is_cut_by_bytes_and_continues() {
        // The issue's case: 400 values of 64 KiB of control characters, about 157 MB once
        // escaped, over the broker's largest message.
        let mut engine = Engine::default();
        let value = "\u{1}".repeat(64 * 1024);
        for i in 0..400 {
            engine.store.add(&format!("k{i}"), &value);
        }
        let mut seen = 0;
        let mut after = serde_json::Value::Null;
        loop {
            let mut request = json!({"action": "getall", "limit": 10_000});
            if !after.is_null() {
                request["after"] = after.clone();
            }
            let body = serde_json::to_vec(&request).unwrap();
            let handled = engine.handle(incoming(&body, false));
            assert!(
                handled.reply.len() <= protocol::MAX_PAGE_BYTES + 100,
                "a reply of {} bytes",
                handled.reply.len()
            );
            let page = reply(&handled);
            let items = page["items"].as_array().unwrap();
            assert!(!items.is_empty());
            for item in items {
                assert_eq!(item["key"], format!("k{seen}"));
                seen += 1;
            }
            after = page["next"].clone();
            if after.is_null() {
                assert_eq!(page.get("truncated"), None, "the last page ended by itself");
                break;
            }
            assert_eq!(page["truncated"], true);
        }
        assert_eq!(seen, 400);
    }

    mod crash_model {
        //! The engine between a simulated broker and a simulated journal: requests full of
        //! identical bodies, some with an identity and some without, delivered with a
        //! prefetch window, handled in batches, with crashes (before or after the journal
        //! commit), cut connections and lost acks at generated points. The broker does what
        //! RabbitMQ does for one consumer: cumulative acks, and unacknowledged deliveries put
        //! back at the head of the queue, in order, flagged redelivered.

        use std::collections::VecDeque;

        use proptest::prelude::*;

        use super::super::*;

        #[derive(Debug, Clone)]
        struct Req {
            body: Vec<u8>,
            /// 0: none, 1: message_id, 2: reply_to + correlation_id.
            identity: u8,
            tag: usize,
        }

        fn to_incoming<'a>(
            req: &'a Req,
            redelivered: bool,
            message_ids: &'a [String],
            correlation_ids: &'a [String],
        ) -> Incoming<'a> {
            let mut incoming = Incoming {
                body: &req.body,
                redelivered,
                correlation_id: None,
                reply_to: None,
                message_id: None,
            };
            match req.identity {
                1 => incoming.message_id = Some(&message_ids[req.tag]),
                2 => {
                    incoming.reply_to = Some("replies");
                    incoming.correlation_id = Some(&correlation_ids[req.tag]);
                }
                _ => {}
            }
            incoming
        }

        fn req() -> impl Strategy<Value = (u8, u8, u8, u8)> {
            // (action, key, value, identity kind): few keys and values, so bodies repeat.
            (0u8..5, 0u8..3, 0u8..2, 0u8..3)
        }

        fn body(action: u8, key: u8, value: u8) -> Vec<u8> {
            match action {
                0 | 1 => format!(r#"{{"action":"add","key":"k{key}","value":"v{value}"}}"#),
                2 | 3 => format!(r#"{{"action":"remove","key":"k{key}"}}"#),
                _ => format!(r#"{{"action":"get","key":"k{key}"}}"#),
            }
            .into_bytes()
        }

        /// What happens after a handled batch (a fault is taken from the generated list,
        /// which ends; after it, every batch is committed, acknowledged and confirmed).
        #[derive(Debug, Clone, Copy)]
        enum Fault {
            CrashBeforeCommit,
            CrashBeforeAck,
            AckLostAndCut,
            AckLostAndCrash,
            AckArrivedThenCut,
            AckArrivedThenCrash,
            Confirm,
            NoConfirm,
        }

        fn fault() -> impl Strategy<Value = Fault> {
            prop_oneof![
                Just(Fault::CrashBeforeCommit),
                Just(Fault::CrashBeforeAck),
                Just(Fault::AckLostAndCut),
                Just(Fault::AckLostAndCrash),
                Just(Fault::AckArrivedThenCut),
                Just(Fault::AckArrivedThenCrash),
                Just(Fault::Confirm),
                Just(Fault::NoConfirm),
            ]
        }

        /// What survives a crash: the store and writes as of the last journal commit, and
        /// the acknowledged mark as of the last commit after it was set.
        #[derive(Clone)]
        struct Durable {
            store: Store,
            last_op: u64,
            journal: Vec<Write>,
            acked: u64,
        }

        struct Kv {
            engine: Engine,
            durable: Durable,
            /// An acknowledged mark waiting for the next commit.
            mark: Option<u64>,
            /// The last write covered by an ack sent and not yet confirmed.
            ack_unconfirmed: Option<u64>,
        }

        impl Kv {
            fn crash(&mut self) {
                let durable = &self.durable;
                let unacked = durable
                    .journal
                    .iter()
                    .filter(|w| w.op > durable.acked)
                    .cloned()
                    .collect();
                self.engine = Engine::new(durable.store.clone(), durable.last_op, unacked);
                self.engine.new_session();
                self.mark = None;
                self.ack_unconfirmed = None;
            }

            fn cut(&mut self) {
                self.engine.new_session();
                self.ack_unconfirmed = None;
            }

            fn commit(&mut self, writes: &[Write]) {
                self.durable.journal.extend_from_slice(writes);
                self.durable.store = self.engine.store.clone();
                self.durable.last_op = self.engine.last_op();
                if let Some(mark) = self.mark.take() {
                    self.durable.acked = mark;
                }
            }

            fn confirm(&mut self) {
                if let Some(op) = self.ack_unconfirmed.take() {
                    self.mark = Some(self.engine.acked_through(op));
                }
            }
        }

        fn model_apply(model: &mut Vec<(String, String)>, request: &Request) {
            match request {
                Request::Add { key, value } => match model.iter_mut().find(|(k, _)| k == key) {
                    Some(item) => item.1 = value.clone(),
                    None => model.push((key.clone(), value.clone())),
                },
                Request::Remove { key } => model.retain(|(k, _)| k != key),
                Request::Get { .. } | Request::GetAll { .. } => {}
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn identified_writes_apply_once_and_none_is_ever_lost(
                reqs in proptest::collection::vec(req(), 1..40),
                faults in proptest::collection::vec(fault(), 0..12),
                prefetch in 1usize..6,
                batch_cut in proptest::collection::vec(1usize..6, 1..8),
            ) {
                let reqs: Vec<Req> = reqs
                    .iter()
                    .enumerate()
                    .map(|(tag, &(action, key, value, identity))| Req {
                        body: body(action, key, value),
                        identity,
                        tag,
                    })
                    .collect();
                let message_ids: Vec<String> = (0..reqs.len()).map(|t| format!("m{t}")).collect();
                let correlation_ids: Vec<String> = (0..reqs.len()).map(|t| format!("c{t}")).collect();
                // The broker: ready (request, redelivered) and delivered-unacknowledged.
                let mut ready: VecDeque<(usize, bool)> = (0..reqs.len()).map(|t| (t, false)).collect();
                let mut delivered: VecDeque<(usize, bool)> = VecDeque::new();
                let mut kv = Kv {
                    engine: Engine::default(),
                    durable: Durable { store: Store::new(), last_op: 0, journal: Vec::new(), acked: 0 },
                    mark: None,
                    ack_unconfirmed: None,
                };
                // kv's side of the window: delivered, not yet handled.
                let mut inbox: VecDeque<(usize, bool)> = VecDeque::new();
                let mut faults = faults.into_iter();
                let mut sizes = batch_cut.iter().cycle();
                let mut model: Vec<(String, String)> = Vec::new();
                let mut applied = vec![0usize; reqs.len()];
                let mut first_reply: Vec<Option<Vec<u8>>> = vec![None; reqs.len()];
                let mut rounds = 0;
                while !(ready.is_empty() && delivered.is_empty()) {
                    rounds += 1;
                    prop_assert!(rounds < 10_000, "no progress");
                    while delivered.len() < prefetch {
                        let Some(next) = ready.pop_front() else { break };
                        delivered.push_back(next);
                        inbox.push_back(next);
                    }
                    let take = (*sizes.next().unwrap()).min(inbox.len());
                    let batch: Vec<(usize, bool)> = inbox.drain(..take).collect();
                    let mut handled = Vec::new();
                    for &(tag, redelivered) in &batch {
                        handled.push((tag, kv.engine.handle(to_incoming(&reqs[tag], redelivered, &message_ids, &correlation_ids))));
                    }
                    let fault = faults.next();
                    let requeue = |ready: &mut VecDeque<(usize, bool)>, delivered: &mut VecDeque<(usize, bool)>, inbox: &mut VecDeque<(usize, bool)>| {
                        inbox.clear();
                        for (tag, _) in delivered.drain(..).rev() {
                            ready.push_front((tag, true));
                        }
                    };
                    if let Some(Fault::CrashBeforeCommit) = fault {
                        kv.crash();
                        requeue(&mut ready, &mut delivered, &mut inbox);
                        continue;
                    }
                    let writes: Vec<Write> = handled.iter().filter_map(|(_, h)| h.write.clone()).collect();
                    kv.commit(&writes);
                    // Committed: these handlings happened, whatever comes next.
                    for (tag, handled) in &handled {
                        let Ok(request) = protocol::parse(&reqs[*tag].body) else { continue };
                        if !request.is_write() {
                            continue;
                        }
                        if reqs[*tag].identity != 0 && applied[*tag] > 0 {
                            prop_assert_eq!(handled.outcome, Outcome::Duplicate, "request {} applied twice", tag);
                            prop_assert_eq!(Some(&handled.reply), first_reply[*tag].as_ref());
                        } else {
                            prop_assert_eq!(handled.outcome, Outcome::Applied, "request {} taken for a copy", tag);
                            model_apply(&mut model, &request);
                            applied[*tag] += 1;
                            first_reply[*tag].get_or_insert_with(|| handled.reply.clone());
                        }
                    }
                    let ack_arrives = |delivered: &mut VecDeque<(usize, bool)>| {
                        delivered.drain(..batch.len());
                    };
                    match fault {
                        Some(Fault::CrashBeforeAck) | Some(Fault::AckLostAndCrash) => {
                            kv.crash();
                            requeue(&mut ready, &mut delivered, &mut inbox);
                        }
                        Some(Fault::AckLostAndCut) => {
                            kv.cut();
                            requeue(&mut ready, &mut delivered, &mut inbox);
                        }
                        Some(Fault::AckArrivedThenCut) => {
                            ack_arrives(&mut delivered);
                            kv.cut();
                            requeue(&mut ready, &mut delivered, &mut inbox);
                        }
                        Some(Fault::AckArrivedThenCrash) => {
                            ack_arrives(&mut delivered);
                            kv.crash();
                            requeue(&mut ready, &mut delivered, &mut inbox);
                        }
                        Some(Fault::NoConfirm) => {
                            ack_arrives(&mut delivered);
                            kv.ack_unconfirmed = Some(kv.engine.last_op());
                        }
                        Some(Fault::Confirm | Fault::CrashBeforeCommit) | None => {
                            ack_arrives(&mut delivered);
                            kv.ack_unconfirmed = Some(kv.engine.last_op());
                            kv.confirm();
                        }
                    }
                }
                let store: Vec<(String, String)> = kv
                    .engine
                    .store
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                prop_assert_eq!(store, model, "the store, in order");
                for (tag, req) in reqs.iter().enumerate() {
                    let is_write = protocol::parse(&req.body).is_ok_and(|r| r.is_write());
                    if !is_write {
                        continue;
                    }
                    prop_assert!(applied[tag] >= 1, "request {} never applied", tag);
                    if req.identity != 0 {
                        prop_assert_eq!(applied[tag], 1, "request {} with an identity", tag);
                    }
                }
            }
        }
    }
}
