//! `POST /items` bodies: a JSON array of at most [`MAX_ITEMS`] objects, each with exactly
//! `id` and `tenant`, both non-empty strings of at most [`MAX_FIELD_BYTES`] bytes.
//!
//! A body is accepted or refused whole: nothing of a refused request is counted. The common
//! case (a valid body) goes through a borrowed derive; anything it refuses takes a slow path
//! whose only job is to name the offending item and field (`[3].tenant`).

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::shard::{Batch, Item};

/// Items per request: bounds the work and memory one request can cause.
pub const MAX_ITEMS: usize = 10_000;
/// Bytes of one `id` or `tenant`.
pub const MAX_FIELD_BYTES: usize = 256;
/// Bytes of one body: [`MAX_ITEMS`] items with both fields at their longest, escaped
/// characters aside, fit with room to spare.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// 400: malformed or invalid; `field` names the item and field when there is one.
    Invalid {
        error: String,
        field: Option<String>,
    },
    /// 413: more than [`MAX_ITEMS`] items.
    TooManyItems(usize),
}

impl Rejection {
    fn body(error: impl Into<String>) -> Self {
        Rejection::Invalid {
            error: error.into(),
            field: None,
        }
    }

    fn field(field: String, error: impl Into<String>) -> Self {
        Rejection::Invalid {
            error: error.into(),
            field: Some(field),
        }
    }
}

/// Media types accepted for the body: `application/json`, parameters allowed.
pub fn is_json_content_type(header: Option<&str>) -> bool {
    header
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Plain<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    tenant: Cow<'a, str>,
}

/// Parses and validates one body straight into its items encoded per shard: fields are
/// borrowed from the body (copied once, into the encoding), so a valid body costs no
/// allocation per item. Duplicates are kept: the store drops them.
pub fn parse_batch(body: &[u8], shards: u16) -> Result<Batch, Rejection> {
    if let Ok(plain) = serde_json::from_slice::<Vec<Plain>>(body) {
        if plain.len() > MAX_ITEMS {
            return Err(Rejection::TooManyItems(plain.len()));
        }
        if plain
            .iter()
            .all(|p| acceptable(&p.id) && acceptable(&p.tenant))
        {
            let mut batch = Batch::new(shards);
            for p in &plain {
                batch.push(&p.tenant, &p.id);
            }
            return Ok(batch);
        }
    }
    explain(body).map(|items| Batch::from_items(&items, shards))
}

/// Parses and validates one body into its items (duplicates kept: the store drops them).
pub fn parse_items(body: &[u8]) -> Result<Vec<Item>, Rejection> {
    if let Ok(plain) = serde_json::from_slice::<Vec<Plain>>(body) {
        if plain.len() > MAX_ITEMS {
            return Err(Rejection::TooManyItems(plain.len()));
        }
        if plain
            .iter()
            .all(|p| acceptable(&p.id) && acceptable(&p.tenant))
        {
            return Ok(plain
                .into_iter()
                .map(|p| Item {
                    tenant: p.tenant.into_owned(),
                    id: p.id.into_owned(),
                })
                .collect());
        }
    }
    explain(body)
}

fn acceptable(text: &str) -> bool {
    !text.is_empty() && text.len() <= MAX_FIELD_BYTES
}

fn explain(body: &[u8]) -> Result<Vec<Item>, Rejection> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Rejection::body(
            "the body is empty; expected a JSON array of items",
        ));
    }
    let elements: Vec<Element> = serde_json::from_slice(body).map_err(|err| {
        Rejection::body(format!(
            "the body must be exactly one JSON array of {{\"id\", \"tenant\"}} objects: {err}"
        ))
    })?;
    if elements.len() > MAX_ITEMS {
        return Err(Rejection::TooManyItems(elements.len()));
    }
    elements
        .into_iter()
        .enumerate()
        .map(|(index, element)| explain_item(index, element))
        .collect()
}

fn explain_item(index: usize, element: Element) -> Result<Item, Rejection> {
    let fields = match element {
        Element::Object(fields) => fields,
        Element::Other(kind) => {
            return Err(Rejection::field(
                format!("[{index}]"),
                format!("each item must be an object with \"id\" and \"tenant\", got {kind}"),
            ))
        }
    };
    let mut id = None;
    let mut tenant = None;
    for (name, value) in fields {
        let slot = match name.as_str() {
            "id" => &mut id,
            "tenant" => &mut tenant,
            other => {
                return Err(Rejection::field(
                    format!("[{index}].{other}"),
                    format!("unknown field \"{other}\"; only \"id\" and \"tenant\" are allowed (case-sensitive)"),
                ))
            }
        };
        if slot.is_some() {
            return Err(Rejection::field(
                format!("[{index}].{name}"),
                format!("field \"{name}\" appears more than once"),
            ));
        }
        *slot = Some(value);
    }
    Ok(Item {
        id: explain_text(index, "id", id)?,
        tenant: explain_text(index, "tenant", tenant)?,
    })
}

fn explain_text(index: usize, name: &str, value: Option<Value>) -> Result<String, Rejection> {
    let field = format!("[{index}].{name}");
    match value {
        None => Err(Rejection::field(field, format!("missing field \"{name}\""))),
        Some(Value::String(text)) if text.is_empty() => {
            Err(Rejection::field(field, "must not be empty"))
        }
        Some(Value::String(text)) if text.len() > MAX_FIELD_BYTES => Err(Rejection::field(
            field,
            format!(
                "must be at most {MAX_FIELD_BYTES} bytes, got {}",
                text.len()
            ),
        )),
        Some(Value::String(text)) => Ok(text),
        Some(other) => Err(Rejection::field(
            field,
            format!("must be a string, got {}", kind(&other)),
        )),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One array element as written: an object's fields in order (duplicates kept, so they can
/// be named), or what else it was.
enum Element {
    Object(Vec<(String, Value)>),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Element {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ElementVisitor)
    }
}

struct ElementVisitor;

impl<'de> Visitor<'de> for ElementVisitor {
    type Value = Element;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Element, A::Error> {
        let mut fields = Vec::with_capacity(2);
        while let Some(entry) = map.next_entry::<String, Value>()? {
            fields.push(entry);
        }
        Ok(Element::Object(fields))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Element::Other("an array"))
    }

    fn visit_str<E>(self, _: &str) -> Result<Element, E> {
        Ok(Element::Other("a string"))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Element, E> {
        Ok(Element::Other("a boolean"))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Element, E> {
        Ok(Element::Other("a number"))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Element, E> {
        Ok(Element::Other("a number"))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Element, E> {
        Ok(Element::Other("a number"))
    }

    fn visit_unit<E>(self) -> Result<Element, E> {
        Ok(Element::Other("null"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn field_of(body: &str) -> Option<String> {
        match parse_items(body.as_bytes()) {
            Err(Rejection::Invalid { field, .. }) => field,
            other => panic!("expected a 400 for {body}, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_body_keeps_every_item_in_order() {
        let items =
            parse_items(br#"[{"id":"1","tenant":"t1"},{"tenant":"t2","id":"\u00e9"}]"#).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].id, "é");
        assert_eq!(items[1].tenant, "t2");
    }

    #[test]
    fn an_empty_array_is_accepted() {
        assert_eq!(parse_items(b"[]").unwrap(), vec![]);
    }

    #[test]
    fn not_an_array_is_refused_without_a_field() {
        assert_eq!(field_of(r#"{"id":"1","tenant":"t"}"#), None);
        assert_eq!(field_of(""), None);
        assert_eq!(field_of(r#"[{"id":"1","tenant":"t"}] x"#), None);
    }

    #[test]
    fn each_rule_names_the_item_and_field() {
        assert_eq!(
            field_of(r#"[{"id":"1","tenant":"t"}, 3]"#).as_deref(),
            Some("[1]")
        );
        assert_eq!(field_of(r#"[{"tenant":"t"}]"#).as_deref(), Some("[0].id"));
        assert_eq!(field_of(r#"[{"id":"1"}]"#).as_deref(), Some("[0].tenant"));
        assert_eq!(
            field_of(r#"[{"id":"","tenant":"t"}]"#).as_deref(),
            Some("[0].id")
        );
        assert_eq!(
            field_of(r#"[{"id":1,"tenant":"t"}]"#).as_deref(),
            Some("[0].id")
        );
        assert_eq!(
            field_of(r#"[{"id":"1","tenant":"t","x":1}]"#).as_deref(),
            Some("[0].x")
        );
        assert_eq!(
            field_of(r#"[{"id":"1","id":"2","tenant":"t"}]"#).as_deref(),
            Some("[0].id")
        );
        assert_eq!(
            field_of(r#"[{"id":"1","Tenant":"t"}]"#).as_deref(),
            Some("[0].Tenant")
        );
    }

    #[test]
    fn field_length_is_counted_in_bytes() {
        let at_limit = "é".repeat(MAX_FIELD_BYTES / 2);
        let over = format!("{at_limit}x");
        let ok = format!(r#"[{{"id":"{at_limit}","tenant":"t"}}]"#);
        assert!(parse_items(ok.as_bytes()).is_ok());
        let bad = format!(r#"[{{"id":"1","tenant":"{over}"}}]"#);
        assert_eq!(field_of(&bad).as_deref(), Some("[0].tenant"));
    }

    #[test]
    fn too_many_items_is_a_413() {
        let one = r#"{"id":"1","tenant":"t"}"#;
        let body = format!("[{}]", vec![one; MAX_ITEMS + 1].join(","));
        assert_eq!(
            parse_items(body.as_bytes()),
            Err(Rejection::TooManyItems(MAX_ITEMS + 1))
        );
        let body = format!("[{}]", vec![one; MAX_ITEMS].join(","));
        assert_eq!(parse_items(body.as_bytes()).unwrap().len(), MAX_ITEMS);
    }

    #[test]
    fn content_type_must_be_json() {
        assert!(is_json_content_type(Some(
            "application/json; charset=utf-8"
        )));
        assert!(is_json_content_type(Some("Application/JSON")));
        assert!(!is_json_content_type(Some("text/plain")));
        assert!(!is_json_content_type(None));
    }

    #[test]
    fn a_batch_holds_what_parse_items_returns() {
        let body =
            br#"[{"id":"1","tenant":"t1"},{"tenant":"t2","id":"\u00e9"},{"id":"1","tenant":"t1"}]"#;
        let items = parse_items(body).unwrap();
        assert_eq!(
            parse_batch(body, 64).unwrap(),
            Batch::from_items(&items, 64)
        );
        assert_eq!(parse_batch(b"[]", 64).unwrap().items, 0);
        assert!(matches!(
            parse_batch(br#"[{"id":"","tenant":"t"}]"#, 64),
            Err(Rejection::Invalid { .. })
        ));
    }

    proptest! {
        /// Whatever the body, the answer is either every item exactly as sent or a refusal:
        /// never a part of the request.
        #[test]
        fn a_body_is_accepted_whole_or_refused(
            items in proptest::collection::vec(
                (proptest::option::of("[a-z]{0,3}"), proptest::option::of(".{0,3}"), any::<bool>()),
                0..8,
            )
        ) {
            let mut json_items = Vec::new();
            let mut all_valid = true;
            for (id, tenant, extra) in &items {
                let mut object = serde_json::Map::new();
                if let Some(id) = id { object.insert("id".into(), Value::from(id.clone())); }
                if let Some(t) = tenant { object.insert("tenant".into(), Value::from(t.clone())); }
                if *extra { object.insert("extra".into(), Value::from(1)); }
                all_valid &= id.as_ref().is_some_and(|s| !s.is_empty())
                    && tenant.as_ref().is_some_and(|s| !s.is_empty())
                    && !extra;
                json_items.push(Value::Object(object));
            }
            let body = serde_json::to_vec(&Value::Array(json_items)).unwrap();
            match parse_items(&body) {
                Ok(parsed) => {
                    prop_assert!(all_valid);
                    prop_assert_eq!(parsed.len(), items.len());
                    for (parsed, (id, tenant, _)) in parsed.iter().zip(&items) {
                        prop_assert_eq!(Some(&parsed.id), id.as_ref());
                        prop_assert_eq!(Some(&parsed.tenant), tenant.as_ref());
                    }
                }
                Err(_) => prop_assert!(!all_valid),
            }
        }
    }
}
