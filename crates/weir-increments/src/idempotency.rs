//! `Idempotency-Key` (IETF httpapi draft): a client that lost a 202 may send the same
//! request again with the same key, and it is counted once.
//!
//! Pure parts, unit- and property-tested: the header's value ([`parse_key`]), what makes two
//! requests "the same" ([`fingerprint`]), the answer to a repeat ([`decide`]), and the
//! per-process table of keys whose first request is still being written ([`InFlight`]).
//!
//! Where a key is remembered is the queue's business, because the key must become durable in
//! the same atomic step as its increment (else a crash between the two either loses the
//! increment or counts a retry twice): the embedded mode commits the key row and the total
//! in one store transaction, the Redis mode sets the key and appends the stream entry in one
//! script. Either way keys live outside the process, so they hold across restarts, `kill -9`
//! and several API processes, and are forgotten after the retention window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::validate::Increment;

/// Longest key accepted; the draft leaves it to the server, and a UUID is 36.
pub const MAX_KEY_BYTES: usize = 255;

/// Why an `Idempotency-Key` header was refused (a 400 naming the header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadKey(pub String);

/// The key a client sent: a Structured Field string (`"abc"`, as the draft defines it) or,
/// as most clients send it, the bare token. 1 to 255 visible ASCII characters.
pub fn parse_key(raw: &[u8]) -> Result<String, BadKey> {
    let text = std::str::from_utf8(raw)
        .map_err(|_| BadKey("the Idempotency-Key header must be ASCII text".into()))?
        .trim_matches([' ', '\t']);
    let key = match text.strip_prefix('"') {
        Some(rest) => unquote(rest)?,
        None => text.to_string(),
    };
    if key.is_empty() {
        return Err(BadKey("the Idempotency-Key header is empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(BadKey(format!(
            "the Idempotency-Key header must be at most {MAX_KEY_BYTES} characters"
        )));
    }
    if !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(BadKey(
            "the Idempotency-Key header must be visible ASCII characters".into(),
        ));
    }
    Ok(key)
}

/// The body of an sf-string after its opening quote: `\"` and `\\` are the only escapes.
fn unquote(rest: &str) -> Result<String, BadKey> {
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' if chars.as_str().is_empty() => return Ok(out),
            '"' => break,
            '\\' => match chars.next() {
                Some(escaped @ ('"' | '\\')) => out.push(escaped),
                _ => break,
            },
            c => out.push(c),
        }
    }
    Err(BadKey(
        "the Idempotency-Key header is not a valid quoted string".into(),
    ))
}

/// The key as stored: scoped by the caller's API key when auth is on, so two clients
/// choosing the same key never see each other's requests. The scope is the first 128 bits
/// of the API key's SHA-256: the key itself is not stored, and no two keys share a scope
/// (a 32-bit checksum did: colliding keys are found by brute force in under a second).
pub fn scoped(key: &str, api_key: Option<&str>) -> String {
    use sha2::Digest as _;
    match api_key {
        Some(api_key) => {
            let digest = sha2::Sha256::digest(api_key.as_bytes());
            let scope: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            format!("{scope}/{key}")
        }
        None => format!("-/{key}"),
    }
}

/// What makes a repeat "the same request": the increment it asks for, not its bytes, so a
/// client that re-serialises the body (other spacing, other field order) is still retrying.
pub fn fingerprint(increment: &Increment) -> String {
    format!("{}:{}", increment.key.hyphenated(), increment.value)
}

/// What a keyed request finds where keys are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The key was new: it is now stored with the increment, which was applied or queued.
    Applied,
    /// The key was already stored, for the request with this fingerprint.
    Existing(String),
}

/// The answer to a keyed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// 202: the increment was accepted now.
    Accepted,
    /// 202 again: the same request was accepted before; nothing is added.
    Replayed,
    /// 409: the same key's first request is still being written.
    InFlight,
    /// 422: the key was used for a different request.
    Mismatch,
}

/// The answer once the store was consulted.
pub fn decide(recorded: &Recorded, fingerprint: &str) -> Decision {
    match recorded {
        Recorded::Applied => Decision::Accepted,
        Recorded::Existing(stored) if stored == fingerprint => Decision::Replayed,
        Recorded::Existing(_) => Decision::Mismatch,
    }
}

/// Keys whose request this process is writing now. A repeat arriving meanwhile is answered
/// at once (409, or 422 for another body) instead of racing the first to the store, whose
/// answer it could not yet know. Bounded by the requests in flight.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    keys: Arc<Mutex<HashMap<String, String>>>,
}

/// Holds a key in [`InFlight`] until dropped, whatever way the request ends.
#[derive(Debug)]
pub struct InFlightGuard {
    keys: Arc<Mutex<HashMap<String, String>>>,
    key: String,
}

impl InFlight {
    /// Claims `key` for this request, or says why a request with it is already running.
    pub fn begin(&self, key: &str, fingerprint: &str) -> Result<InFlightGuard, Decision> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = keys.get(key) {
            return Err(if running == fingerprint {
                Decision::InFlight
            } else {
                Decision::Mismatch
            });
        }
        keys.insert(key.to_string(), fingerprint.to_string());
        Ok(InFlightGuard {
            keys: self.keys.clone(),
            key: key.to_string(),
        })
    }

    /// Tells whether any clone of this table is still held (its server is still running).
    pub fn liveness(&self) -> Liveness {
        Liveness(Arc::downgrade(&self.keys))
    }

    pub fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// See [`InFlight::liveness`].
#[derive(Debug)]
pub struct Liveness(Weak<Mutex<HashMap<String, String>>>);

impl Liveness {
    pub fn is_alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;

    #[test]
    fn keys_come_bare_or_as_structured_field_strings() {
        assert_eq!(parse_key(b"abc-123").unwrap(), "abc-123");
        assert_eq!(parse_key(b"  \"abc 123\" ").unwrap(), "abc 123");
        assert_eq!(parse_key(br#""a\"b\\c""#).unwrap(), r#"a"b\c"#);
        for bad in [
            &b""[..],
            b"\"\"",
            b"\"open",
            b"\"a\"b\"",
            b"\"a\\x\"",
            b"caf\xc3\xa9",
            b"tab\there",
        ] {
            assert!(
                parse_key(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_key(&[b'k'; MAX_KEY_BYTES]).is_ok());
        assert!(parse_key(&[b'k'; MAX_KEY_BYTES + 1]).is_err());
    }

    #[test]
    fn a_key_is_scoped_by_the_api_key_that_sent_it() {
        assert_ne!(scoped("k", Some("a")), scoped("k", Some("b")));
        assert_ne!(scoped("k", Some("a")), scoped("k", None));
        assert_eq!(scoped("k", None), scoped("k", None));
        assert!(!scoped("k", Some("secret")).contains("secret"));
    }

    #[test]
    fn api_keys_with_the_same_crc32c_have_their_own_scopes() {
        let (a, b) = ("tenant-1371838", "tenant-2000402");
        assert_eq!(crc32c::crc32c(a.as_bytes()), crc32c::crc32c(b.as_bytes()));
        assert_ne!(scoped("k", Some(a)), scoped("k", Some(b)));
    }

    #[test]
    fn a_repeat_is_replayed_only_for_the_same_increment() {
        let inc = |value| Increment {
            key: Uuid::from_u128(7),
            value,
        };
        let first = fingerprint(&inc(5));
        assert_eq!(decide(&Recorded::Applied, &first), Decision::Accepted);
        assert_eq!(
            decide(&Recorded::Existing(first.clone()), &fingerprint(&inc(5))),
            Decision::Replayed
        );
        assert_eq!(
            decide(&Recorded::Existing(first), &fingerprint(&inc(6))),
            Decision::Mismatch
        );
    }

    #[test]
    fn a_key_is_in_flight_until_its_guard_drops() {
        let in_flight = InFlight::default();
        let guard = in_flight.begin("k", "f1").unwrap();
        assert_eq!(in_flight.begin("k", "f1").unwrap_err(), Decision::InFlight);
        assert_eq!(in_flight.begin("k", "f2").unwrap_err(), Decision::Mismatch);
        assert!(in_flight.begin("other", "f1").is_ok());
        drop(guard);
        assert!(in_flight.is_empty());
        assert!(in_flight.begin("k", "f1").is_ok());
    }

    /// One attempt of one keyed request, as the server runs it: claim the key in this
    /// process, then the atomic record-or-read in the store, then release.
    #[derive(Debug)]
    enum Stage {
        Begun(InFlightGuard),
        Done,
    }

    proptest! {
        /// Any interleaving of any number of retries of N keyed requests, with the store's
        /// atomic step run at any point, yields exactly N increments; every attempt ends in
        /// 202 (accepted or replayed) or 409, never 422, because every retry repeats its body.
        #[test]
        fn retries_in_any_interleaving_count_each_request_once(
            attempts in proptest::collection::vec(1usize..5, 1..12),
            schedule in proptest::collection::vec(any::<prop::sample::Index>(), 0..200),
        ) {
            let in_flight = InFlight::default();
            let mut stored: HashMap<String, String> = HashMap::new();
            let mut counted: HashMap<u128, i64> = HashMap::new();
            // (request, stage) of every attempt still running, in start order.
            let mut running: Vec<(usize, Option<Stage>)> = Vec::new();
            let mut to_start: Vec<usize> = attempts
                .iter()
                .enumerate()
                .flat_map(|(request, &n)| std::iter::repeat_n(request, n))
                .collect();
            let mut answers = Vec::new();
            let increment = |request: usize| Increment { key: Uuid::from_u128(request as u128), value: 3 };
            let key = |request: usize| scoped(&format!("req-{request}"), None);
            let mut step = |pick: usize, to_start: &mut Vec<usize>, running: &mut Vec<(usize, Option<Stage>)>| {
                // Either start a waiting attempt or advance a running one.
                let choices = to_start.len() + running.len();
                let pick = pick % choices;
                if pick < to_start.len() {
                    let request = to_start.remove(pick);
                    let fp = fingerprint(&increment(request));
                    match in_flight.begin(&key(request), &fp) {
                        Ok(guard) => running.push((request, Some(Stage::Begun(guard)))),
                        Err(decision) => answers.push(decision),
                    }
                    return;
                }
                let index = pick - to_start.len();
                let (request, stage) = &mut running[index];
                match stage.take() {
                    Some(Stage::Begun(guard)) => {
                        let fp = fingerprint(&increment(*request));
                        let recorded = match stored.get(&key(*request)) {
                            Some(existing) => Recorded::Existing(existing.clone()),
                            None => {
                                stored.insert(key(*request), fp.clone());
                                *counted.entry(*request as u128).or_default() += 3;
                                Recorded::Applied
                            }
                        };
                        answers.push(decide(&recorded, &fp));
                        drop(guard);
                        *stage = Some(Stage::Done);
                    }
                    Some(Stage::Done) | None => {
                        running.remove(index);
                    }
                }
            };
            for pick in schedule {
                if to_start.is_empty() && running.is_empty() {
                    break;
                }
                step(pick.index(usize::MAX), &mut to_start, &mut running);
            }
            while !to_start.is_empty() || !running.is_empty() {
                step(0, &mut to_start, &mut running);
            }
            // The first attempt of a request always claims its key, so every request is
            // counted, and exactly once however its retries interleave.
            for request in 0..attempts.len() {
                let total = counted.get(&(request as u128)).copied().unwrap_or(0);
                prop_assert_eq!(total, 3, "request {}", request);
            }
            prop_assert!(answers.iter().all(|a| *a != Decision::Mismatch));
            let accepted = answers.iter().filter(|a| **a == Decision::Accepted).count();
            prop_assert_eq!(accepted, attempts.len());
            prop_assert!(in_flight.is_empty());
        }
    }
}
