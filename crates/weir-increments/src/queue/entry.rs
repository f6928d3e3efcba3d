//! What a stream entry holds: the increments of requests that arrived together.
//!
//! One `XADD` per request made Redis and its client the largest cost of a 202 (a command,
//! a reply and a wake-up each, and the worker reading every entry back). The API instead
//! gathers the requests waiting at the same moment into entries of up to
//! [`MAX_INCREMENTS`] increments, one field `kv` of `<uuid>:<value>` pairs joined by `,`.
//! Every request is answered 202 only once the entry holding it is appended.
//!
//! An entry is the unit of exactly once: a flush applies all of it or none (its id is
//! what the store records). Its keys are distinct, so an increment's dead letter is
//! named by (entry id, key). Entries of the single form `k`, `v` (keyed requests, and
//! streams written before batching) are read as before.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

use redis::Value;
use uuid::Uuid;

use crate::aggregate::{EntryId, Item};
use crate::validate::Increment;

/// Increments per entry at most: large enough that Redis' per-command cost vanishes,
/// small enough that an entry stays a few kilobytes.
pub const MAX_INCREMENTS: usize = 64;

/// The field of a batched entry.
pub const BATCH_FIELD: &str = "kv";

/// Splits increments, in arrival order, into entries of at most [`MAX_INCREMENTS`]
/// with distinct keys: an increment goes into the first entry that lacks its key.
pub fn group(increments: &[Increment]) -> Vec<Vec<usize>> {
    let mut entries: Vec<(HashSet<Uuid>, Vec<usize>)> = Vec::new();
    for (index, increment) in increments.iter().enumerate() {
        let open = entries.iter_mut().find(|(keys, members)| {
            members.len() < MAX_INCREMENTS && !keys.contains(&increment.key)
        });
        match open {
            Some((keys, members)) => {
                keys.insert(increment.key);
                members.push(index);
            }
            None => entries.push((HashSet::from([increment.key]), vec![index])),
        }
    }
    entries.into_iter().map(|(_, members)| members).collect()
}

/// The `kv` field of an entry holding `members` of `increments`.
pub fn encode(increments: &[Increment], members: &[usize]) -> String {
    let mut out = String::with_capacity(members.len() * 48);
    for (n, &index) in members.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        let increment = &increments[index];
        out.push_str(
            increment
                .key
                .hyphenated()
                .encode_lower(&mut Uuid::encode_buffer()),
        );
        // Writing to a String cannot fail.
        let _ = write!(out, ":{}", increment.value);
    }
    out
}

/// The increments of one entry, or why it cannot be counted (it goes to the dead letters
/// whole).
pub fn decode(id: &str, fields: &HashMap<String, Value>) -> Result<Vec<Item>, String> {
    let id: EntryId = id
        .parse()
        .map_err(|()| format!("malformed entry id {id:?}"))?;
    let field = |name: &str| fields.get(name);
    if let Some(batch) = field(BATCH_FIELD) {
        let text = text_of(batch).ok_or("malformed entry: kv is not text")?;
        return decode_batch(id, text);
    }
    let key = field("k")
        .and_then(text_of)
        .ok_or("malformed entry: no field k")?;
    let value = field("v")
        .and_then(text_of)
        .ok_or("malformed entry: no field v")?;
    Ok(vec![item(id, key, value)?])
}

fn decode_batch(id: EntryId, text: &str) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    let mut keys = HashSet::new();
    for pair in text.split(',') {
        let (key, value) = pair
            .split_once(':')
            .ok_or_else(|| format!("malformed entry: {pair:?} is not <key>:<value>"))?;
        let item = item(id, key, value)?;
        if !keys.insert(item.key) {
            return Err(format!("malformed entry: key {} appears twice", item.key));
        }
        items.push(item);
    }
    if items.len() > MAX_INCREMENTS {
        return Err(format!(
            "malformed entry: {} increments, at most {MAX_INCREMENTS}",
            items.len()
        ));
    }
    Ok(items)
}

fn item(id: EntryId, key: &str, value: &str) -> Result<Item, String> {
    let key =
        Uuid::try_parse(key).map_err(|err| format!("malformed entry: k is not a UUID: {err}"))?;
    let value: i64 = value
        .parse()
        .map_err(|err| format!("malformed entry: v is not an integer: {err}"))?;
    if value < 1 {
        return Err(format!(
            "malformed entry: v must be at least 1, got {value}"
        ));
    }
    Ok(Item { id, key, value })
}

fn text_of(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn increment(key: u128, value: i64) -> Increment {
        Increment {
            key: Uuid::from_u128(key),
            value,
        }
    }

    fn batch_fields(text: &str) -> HashMap<String, Value> {
        HashMap::from([(
            BATCH_FIELD.into(),
            Value::BulkString(text.as_bytes().to_vec()),
        )])
    }

    #[test]
    fn a_repeated_key_starts_a_second_entry() {
        let increments = [increment(1, 1), increment(2, 1), increment(1, 3)];
        assert_eq!(group(&increments), vec![vec![0, 1], vec![2]]);
    }

    #[test]
    fn a_full_entry_starts_another() {
        let increments: Vec<Increment> = (0..MAX_INCREMENTS as u128 + 1)
            .map(|key| increment(key, 1))
            .collect();
        let entries = group(&increments);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1], vec![MAX_INCREMENTS]);
    }

    #[test]
    fn single_entries_of_earlier_writers_still_read() {
        let fields = HashMap::from([
            (
                "k".to_string(),
                Value::BulkString(Uuid::from_u128(7).to_string().into_bytes()),
            ),
            ("v".to_string(), Value::BulkString(b"5".to_vec())),
        ]);
        let items = decode("10-2", &fields).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!((items[0].key, items[0].value), (Uuid::from_u128(7), 5));
        assert_eq!(items[0].id, EntryId { ms: 10, seq: 2 });
    }

    #[test]
    fn a_damaged_batch_is_refused_whole_with_its_reason() {
        let key = Uuid::from_u128(1);
        for (text, reason) in [
            (format!("{key}:1,{key}:2"), "appears twice"),
            (format!("{key}:0"), "at least 1"),
            (format!("{key}=1"), "not <key>:<value>"),
            ("nope:1".to_string(), "not a UUID"),
            (format!("{key}:x"), "not an integer"),
        ] {
            let err = decode("1-0", &batch_fields(&text)).unwrap_err();
            assert!(err.contains(reason), "{text}: {err}");
        }
        assert!(decode("x", &batch_fields(""))
            .unwrap_err()
            .contains("entry id"));
    }

    proptest! {
        #[test]
        fn every_increment_lands_in_exactly_one_entry_of_distinct_keys(
            raw in proptest::collection::vec((0u128..40, 1i64..i64::MAX), 0..300)
        ) {
            let increments: Vec<Increment> =
                raw.iter().map(|&(key, value)| increment(key, value)).collect();
            let entries = group(&increments);
            let mut seen = vec![0; increments.len()];
            for members in &entries {
                prop_assert!(!members.is_empty() && members.len() <= MAX_INCREMENTS);
                let text = encode(&increments, members);
                let items = decode("5-1", &batch_fields(&text)).map_err(TestCaseError::fail)?;
                prop_assert_eq!(items.len(), members.len());
                for (item, &index) in items.iter().zip(members) {
                    prop_assert_eq!(item.key, increments[index].key);
                    prop_assert_eq!(item.value, increments[index].value);
                    seen[index] += 1;
                }
            }
            prop_assert!(seen.iter().all(|&n| n == 1));
        }
    }
}
