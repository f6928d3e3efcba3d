//! The wire contract: one JSON request per message body, one JSON reply per request.
//!
//! Requests are the seed's input.json rows: `{"action": "add", "key": "A", "value": "a"}`,
//! `remove`, `get`, and `getall` (with optional `limit` and `after`). The seed's client also
//! sends `timestamp` and, from a struct with every field, empty `key`/`value` strings on
//! actions that do not use them; both are accepted. Anything else (an unknown field, a
//! missing or non-string key, a limit out of range) is malformed, with a reason that goes back
//! to the client and into the dead-letter header.

use serde::{Deserialize, Serialize};

use crate::store::{Added, Cursor, Page};

pub const MAX_KEY_BYTES: usize = 1024;
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
pub const DEFAULT_PAGE: usize = 1_000;
pub const MAX_PAGE: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Add { key: String, value: String },
    Remove { key: String },
    Get { key: String },
    GetAll { limit: usize, after: Option<Cursor> },
}

impl Request {
    /// The action's name, as a metric label.
    pub fn action(&self) -> &'static str {
        match self {
            Request::Add { .. } => "add",
            Request::Remove { .. } => "remove",
            Request::Get { .. } => "get",
            Request::GetAll { .. } => "getall",
        }
    }

    /// Whether applying it changes the store (and so must be logged before it is acked).
    pub fn is_write(&self) -> bool {
        matches!(self, Request::Add { .. } | Request::Remove { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("the body is not a JSON object with known fields: {0}")]
    Json(String),
    #[error("unknown action {0:?}: expected add, remove, get or getall")]
    UnknownAction(String),
    #[error("{action} needs a non-empty string \"{field}\"")]
    Missing {
        action: &'static str,
        field: &'static str,
    },
    #[error("{action} does not take \"{field}\"")]
    Unexpected {
        action: &'static str,
        field: &'static str,
    },
    #[error("\"{field}\" is {len} bytes, more than the {max} allowed")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("\"limit\" must be between 1 and {MAX_PAGE}, not {0}")]
    Limit(u64),
}

impl Malformed {
    /// Every value [`Malformed::reason`] gives, for registering a `reason` label at zero.
    pub const REASONS: [&'static str; 6] = [
        "invalid_json",
        "unknown_action",
        "missing_field",
        "unexpected_field",
        "too_long",
        "bad_limit",
    ];

    /// Why, as a metric label value: the kind of mistake, without the request's own text.
    pub fn reason(&self) -> &'static str {
        match self {
            Malformed::Json(_) => "invalid_json",
            Malformed::UnknownAction(_) => "unknown_action",
            Malformed::Missing { .. } => "missing_field",
            Malformed::Unexpected { .. } => "unexpected_field",
            Malformed::TooLong { .. } => "too_long",
            Malformed::Limit(_) => "bad_limit",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    action: String,
    key: Option<String>,
    value: Option<String>,
    // Sent by the seed's client; carries no meaning here.
    #[serde(rename = "timestamp")]
    _timestamp: Option<serde::de::IgnoredAny>,
    limit: Option<u64>,
    after: Option<Cursor>,
}

/// Parses and validates one request body.
pub fn parse(body: &[u8]) -> Result<Request, Malformed> {
    let raw: Raw = serde_json::from_slice(body).map_err(|err| Malformed::Json(err.to_string()))?;
    match raw.action.as_str() {
        "add" => {
            unused("add", "limit", raw.limit.is_some())?;
            unused("add", "after", raw.after.is_some())?;
            let key = required("add", "key", raw.key, MAX_KEY_BYTES)?;
            // An empty value is a value; only its absence is missing.
            let value = raw.value.ok_or(Malformed::Missing {
                action: "add",
                field: "value",
            })?;
            within("value", &value, MAX_VALUE_BYTES)?;
            Ok(Request::Add { key, value })
        }
        action @ ("remove" | "get") => {
            let action = if action == "get" { "get" } else { "remove" };
            unused(action, "value", non_empty(&raw.value))?;
            unused(action, "limit", raw.limit.is_some())?;
            unused(action, "after", raw.after.is_some())?;
            let key = required(action, "key", raw.key, MAX_KEY_BYTES)?;
            Ok(if action == "get" {
                Request::Get { key }
            } else {
                Request::Remove { key }
            })
        }
        "getall" => {
            unused("getall", "key", non_empty(&raw.key))?;
            unused("getall", "value", non_empty(&raw.value))?;
            let limit = match raw.limit {
                None => DEFAULT_PAGE,
                Some(limit @ 1..=10_000) => limit as usize,
                Some(other) => return Err(Malformed::Limit(other)),
            };
            Ok(Request::GetAll {
                limit,
                after: raw.after,
            })
        }
        other => Err(Malformed::UnknownAction(other.chars().take(64).collect())),
    }
}

fn non_empty(field: &Option<String>) -> bool {
    field.as_deref().is_some_and(|text| !text.is_empty())
}

fn unused(action: &'static str, field: &'static str, present: bool) -> Result<(), Malformed> {
    if present {
        Err(Malformed::Unexpected { action, field })
    } else {
        Ok(())
    }
}

fn required(
    action: &'static str,
    field: &'static str,
    text: Option<String>,
    max: usize,
) -> Result<String, Malformed> {
    let text = text
        .filter(|text| !text.is_empty())
        .ok_or(Malformed::Missing { action, field })?;
    within(field, &text, max)?;
    Ok(text)
}

fn within(field: &'static str, text: &str, max: usize) -> Result<(), Malformed> {
    if text.len() > max {
        Err(Malformed::TooLong {
            field,
            len: text.len(),
            max,
        })
    } else {
        Ok(())
    }
}

/// The most a `getall` page's items take once encoded. RabbitMQ refuses a message over its
/// `max_message_size` (128 MiB by default), and a refused reply would end the session and
/// bring the request back forever; a page of 10,000 values of 64 KiB of control characters
/// is about 4 GB escaped. One item alone (a key and value at their limits) is at most about
/// 400 KB, so a page always holds at least one.
pub const MAX_PAGE_BYTES: usize = 4 << 20;

/// The bytes `{"key":…,"value":…},` takes in a reply: the JSON escaping of both strings
/// counted exactly as `serde_json` writes it.
pub fn item_json_bytes(key: &str, value: &str) -> usize {
    r#"{"key":,"value":},"#.len() + json_string_bytes(key) + json_string_bytes(value)
}

fn json_string_bytes(text: &str) -> usize {
    2 + text
        .bytes()
        .map(|byte| match byte {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// What the server answers. Every reply has `ok`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Reply<'a> {
    Added {
        ok: bool,
        replaced: bool,
    },
    Removed {
        ok: bool,
        removed: bool,
    },
    Got {
        ok: bool,
        found: bool,
        key: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        value: Option<&'a str>,
    },
    Items {
        ok: bool,
        items: Vec<Item<'a>>,
        next: Option<Cursor>,
        /// Set when the page stopped at [`MAX_PAGE_BYTES`] before its limit.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    Error {
        ok: bool,
        error: String,
    },
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Item<'a> {
    pub key: &'a str,
    pub value: &'a str,
}

impl<'a> Reply<'a> {
    pub fn added(added: Added) -> Self {
        Reply::Added {
            ok: true,
            replaced: added == Added::Replaced,
        }
    }

    pub fn removed(removed: bool) -> Self {
        Reply::Removed { ok: true, removed }
    }

    pub fn got(key: &'a str, value: Option<&'a str>) -> Self {
        Reply::Got {
            ok: true,
            found: value.is_some(),
            key,
            value,
        }
    }

    pub fn page(page: Page<'a>) -> Self {
        Reply::Items {
            ok: true,
            items: page
                .items
                .into_iter()
                .map(|(key, value)| Item { key, value })
                .collect(),
            next: page.next,
            truncated: page.cut,
        }
    }

    pub fn error(error: impl ToString) -> Self {
        Reply::Error {
            ok: false,
            error: error.to_string(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these plain structs of strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| br#"{"ok":false,"error":"internal"}"#.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(body: serde_json::Value) -> Result<Request, Malformed> {
        parse(body.to_string().as_bytes())
    }

    #[test]
    fn the_seeds_rows_parse() {
        assert_eq!(
            request(json!({"action": "add", "key": "O", "value": "o"})),
            Ok(Request::Add {
                key: "O".into(),
                value: "o".into()
            })
        );
        assert_eq!(
            request(json!({"action": "getall"})),
            Ok(Request::GetAll {
                limit: DEFAULT_PAGE,
                after: None
            })
        );
        assert_eq!(
            request(json!({"action": "get", "key": "O"})),
            Ok(Request::Get { key: "O".into() })
        );
        assert_eq!(
            request(json!({"action": "remove", "key": "O"})),
            Ok(Request::Remove { key: "O".into() })
        );
    }

    #[test]
    fn the_seed_clients_extra_fields_are_accepted() {
        assert_eq!(
            request(
                json!({"action": "get", "key": "O", "value": "", "timestamp": "2023-01-01T00:00:00Z"})
            ),
            Ok(Request::Get { key: "O".into() })
        );
        assert_eq!(
            request(json!({"action": "getall", "key": "", "value": "", "timestamp": 17})),
            Ok(Request::GetAll {
                limit: DEFAULT_PAGE,
                after: None
            })
        );
    }

    #[test]
    fn paging_fields_are_read_and_bounded() {
        assert_eq!(
            request(json!({"action": "getall", "limit": 10, "after": 42})),
            Ok(Request::GetAll {
                limit: 10,
                after: Some(42)
            })
        );
        assert_eq!(
            request(json!({"action": "getall", "limit": 0})),
            Err(Malformed::Limit(0))
        );
        assert_eq!(
            request(json!({"action": "getall", "limit": 10_001})),
            Err(Malformed::Limit(10_001))
        );
    }

    #[test]
    fn malformed_requests_say_what_is_wrong() {
        let cases = [
            (
                json!({"action": "add", "key": "A"}),
                "add needs a non-empty string \"value\"",
            ),
            (
                json!({"action": "add", "value": "a"}),
                "add needs a non-empty string \"key\"",
            ),
            (
                json!({"action": "get", "key": ""}),
                "get needs a non-empty string \"key\"",
            ),
            (
                json!({"action": "remove", "key": "A", "value": "x"}),
                "remove does not take \"value\"",
            ),
            (
                json!({"action": "getall", "key": "A"}),
                "getall does not take \"key\"",
            ),
            (
                json!({"action": "add", "key": "A", "value": "a", "limit": 3}),
                "add does not take \"limit\"",
            ),
            (
                json!({"action": "put", "key": "A"}),
                "unknown action \"put\"",
            ),
        ];
        for (body, expected) in cases {
            let err = request(body.clone()).expect_err(&body.to_string());
            assert!(err.to_string().starts_with(expected), "{body}: {err}");
        }
        for body in [
            &b"not json"[..],
            b"[1,2]",
            br#"{"action":"get","key":"A","extra":1}"#,
            br#"{"action":"get","key":7}"#,
        ] {
            assert!(
                matches!(parse(body), Err(Malformed::Json(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn every_mistake_has_one_of_the_listed_reasons() {
        let cases = [
            (&br#"not json"#[..], "invalid_json"),
            (br#"{"action":"get","key":"A","extra":1}"#, "invalid_json"),
            (br#"{"action":"put","key":"A"}"#, "unknown_action"),
            (br#"{"action":"add","key":"A"}"#, "missing_field"),
            (
                br#"{"action":"get","key":"A","limit":3}"#,
                "unexpected_field",
            ),
            (br#"{"action":"getall","limit":0}"#, "bad_limit"),
        ];
        for (body, reason) in cases {
            let err = parse(body).expect_err("malformed");
            assert_eq!(err.reason(), reason, "{}", String::from_utf8_lossy(body));
            assert!(Malformed::REASONS.contains(&reason));
        }
        let long = format!(
            r#"{{"action":"get","key":"{}"}}"#,
            "k".repeat(MAX_KEY_BYTES + 1)
        );
        assert_eq!(parse(long.as_bytes()).unwrap_err().reason(), "too_long");
    }

    #[test]
    fn oversized_keys_and_values_are_refused() {
        let long_key = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(
            request(json!({"action": "get", "key": long_key})),
            Err(Malformed::TooLong { field: "key", .. })
        ));
        let long_value = "v".repeat(MAX_VALUE_BYTES + 1);
        assert!(matches!(
            request(json!({"action": "add", "key": "A", "value": long_value})),
            Err(Malformed::TooLong { field: "value", .. })
        ));
        assert!(
            request(json!({"action": "add", "key": "A", "value": ""})).is_ok(),
            "an empty value is a value"
        );
    }

    #[test]
    fn replies_have_the_documented_shapes() {
        let json =
            |reply: Reply| serde_json::from_slice::<serde_json::Value>(&reply.to_json()).unwrap();
        assert_eq!(
            json(Reply::got("A", Some("a"))),
            json!({"ok": true, "found": true, "key": "A", "value": "a"})
        );
        assert_eq!(
            json(Reply::got("A", None)),
            json!({"ok": true, "found": false, "key": "A"})
        );
        assert_eq!(
            json(Reply::added(Added::Replaced)),
            json!({"ok": true, "replaced": true})
        );
        assert_eq!(
            json(Reply::removed(false)),
            json!({"ok": true, "removed": false})
        );
        assert_eq!(
            json(Reply::page(Page {
                items: vec![("A", "a")],
                next: Some(3),
                cut: false,
            })),
            json!({"ok": true, "items": [{"key": "A", "value": "a"}], "next": 3})
        );
        assert_eq!(
            json(Reply::page(Page {
                items: vec![("A", "a")],
                next: Some(3),
                cut: true,
            })),
            json!({"ok": true, "items": [{"key": "A", "value": "a"}], "next": 3, "truncated": true})
        );
        assert_eq!(
            json(Reply::page(Page {
                items: vec![],
                next: None,
                cut: false,
            })),
            json!({"ok": true, "items": [], "next": null})
        );
        assert_eq!(
            json(Reply::error("bad")),
            json!({"ok": false, "error": "bad"})
        );
    }

    #[test]
    fn an_item_s_size_is_what_serde_json_writes() {
        for (key, value) in [
            ("A", "a"),
            ("q\"uote", "back\\slash"),
            ("\u{1}", "\n\t\u{7f}é\u{1f}"),
        ] {
            let item = serde_json::to_vec(&Item { key, value }).unwrap();
            assert_eq!(
                item_json_bytes(key, value),
                item.len() + 1,
                "{key:?} {value:?}"
            );
        }
    }
}
