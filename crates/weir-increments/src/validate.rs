//! `POST /increment` bodies: exactly `{"key": "<uuid>", "value": <1..=i64::MAX>}`.
//!
//! Parsing goes through an ordered list of fields instead of a derived struct so that each
//! rule can name the field it concerns and say precisely what was wrong (serde's own
//! messages mention neither duplicates nor case mistakes).

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use uuid::Uuid;

/// One accepted increment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Increment {
    pub key: Uuid,
    pub value: i64,
}

/// Why a body was refused; every rejection is a 400 naming the field when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub error: String,
    pub field: Option<&'static str>,
}

impl Rejection {
    fn body(error: impl Into<String>) -> Self {
        Rejection {
            error: error.into(),
            field: None,
        }
    }

    fn field(field: &'static str, error: impl Into<String>) -> Self {
        Rejection {
            error: error.into(),
            field: Some(field),
        }
    }
}

/// Media types accepted for the body: `application/json`, parameters allowed.
pub fn is_json_content_type(header: Option<&str>) -> bool {
    let Some(header) = header else {
        return false;
    };
    let essence = header.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

struct Fields(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields = Vec::with_capacity(2);
                while let Some((name, value)) = map.next_entry::<String, Value>()? {
                    fields.push((name, value));
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// The shape of a valid body, for the common case: borrowed, no allocation. serde's derive
/// already refuses unknown and duplicate fields; anything it refuses takes the slow path,
/// whose only job is to say precisely why.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Plain<'a> {
    key: &'a str,
    value: i64,
}

/// Parses and validates one body.
pub fn parse_increment(body: &[u8]) -> Result<Increment, Rejection> {
    if let Ok(plain) = serde_json::from_slice::<Plain>(body) {
        if plain.key.len() == 36 && plain.value >= 1 {
            if let Ok(key) = Uuid::try_parse(plain.key) {
                return Ok(Increment {
                    key,
                    value: plain.value,
                });
            }
        }
    }
    explain(body)
}

fn explain(body: &[u8]) -> Result<Increment, Rejection> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Rejection::body("the body is empty; expected a JSON object"));
    }
    let Fields(fields) = serde_json::from_slice(body).map_err(|err| {
        Rejection::body(format!(
            "the body must be exactly one JSON object with no trailing data: {err}"
        ))
    })?;
    let mut key = None;
    let mut value = None;
    for (name, raw) in fields {
        let slot = match name.as_str() {
            "key" => &mut key,
            "value" => &mut value,
            other => {
                for known in ["key", "value"] {
                    if other.eq_ignore_ascii_case(known) {
                        return Err(Rejection::field(
                            known,
                            format!("unknown field \"{other}\"; field names are case-sensitive, use \"{known}\""),
                        ));
                    }
                }
                return Err(Rejection::body(format!(
                    "unknown field \"{other}\"; only \"key\" and \"value\" are allowed"
                )));
            }
        };
        if slot.is_some() {
            let field = if name == "key" { "key" } else { "value" };
            return Err(Rejection::field(
                field,
                format!("field \"{field}\" appears more than once"),
            ));
        }
        *slot = Some(raw);
    }
    let key = key.ok_or_else(|| Rejection::field("key", "missing field \"key\""))?;
    let value = value.ok_or_else(|| Rejection::field("value", "missing field \"value\""))?;
    Ok(Increment {
        key: parse_key(&key)?,
        value: parse_value(&value)?,
    })
}

fn parse_key(raw: &Value) -> Result<Uuid, Rejection> {
    let Value::String(text) = raw else {
        return Err(Rejection::field(
            "key",
            format!("must be a string holding a UUID, got {}", kind(raw)),
        ));
    };
    // Only the canonical hyphenated form: the other spellings uuid accepts (braced, URN,
    // 32 bare digits) would let one key be written several ways by different clients.
    if text.len() != 36 {
        return Err(Rejection::field(
            "key",
            "must be a UUID in the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx",
        ));
    }
    Uuid::try_parse(text).map_err(|err| Rejection::field("key", format!("must be a UUID: {err}")))
}

fn parse_value(raw: &Value) -> Result<i64, Rejection> {
    let Value::Number(number) = raw else {
        return Err(Rejection::field(
            "value",
            format!("must be an integer, got {}", kind(raw)),
        ));
    };
    if let Some(value) = number.as_i64() {
        return if value >= 1 {
            Ok(value)
        } else {
            Err(Rejection::field(
                "value",
                format!("must be at least 1, got {value}"),
            ))
        };
    }
    if number.as_u64().is_some() {
        return Err(Rejection::field(
            "value",
            format!("must be at most {} (a signed 64-bit integer)", i64::MAX),
        ));
    }
    // Neither i64 nor u64: a fraction, an exponent, or an integer beyond u64 (which
    // serde_json can only hand over as a float). Integral floats beyond the i64 range are
    // reported as out of range, everything else as not an integer.
    let float = number.as_f64().unwrap_or(f64::NAN);
    if float.is_finite() && float.fract() == 0.0 && float.abs() >= 9.223_372_036_854_776e18 {
        return Err(if float > 0.0 {
            Rejection::field(
                "value",
                format!("must be at most {} (a signed 64-bit integer)", i64::MAX),
            )
        } else {
            Rejection::field("value", format!("must be at least 1, got {number}"))
        });
    }
    Err(Rejection::field(
        "value",
        format!("must be an integer written without fraction or exponent, got {number}"),
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "7f1d6c1e-2b9a-4c55-9a4e-3f0d2b7c8e11";

    fn reject(body: &str) -> Rejection {
        match parse_increment(body.as_bytes()) {
            Ok(ok) => panic!("{body} was accepted as {ok:?}"),
            Err(rejection) => rejection,
        }
    }

    #[test]
    fn a_valid_body_is_accepted() {
        let body = format!(r#"{{"key": "{KEY}", "value": 42}}"#);
        let inc = parse_increment(body.as_bytes()).unwrap();
        assert_eq!(inc.key.to_string(), KEY);
        assert_eq!(inc.value, 42);
    }

    #[test]
    fn field_order_does_not_matter_and_i64_max_fits() {
        let body = format!(r#"{{"value": {}, "key": "{KEY}"}}"#, i64::MAX);
        assert_eq!(parse_increment(body.as_bytes()).unwrap().value, i64::MAX);
    }

    #[test]
    fn unknown_field() {
        let r = reject(&format!(r#"{{"key": "{KEY}", "value": 1, "extra": true}}"#));
        assert!(r.error.contains("unknown field \"extra\""), "{r:?}");
    }

    #[test]
    fn field_in_other_case() {
        let r = reject(&format!(r#"{{"Key": "{KEY}", "value": 1}}"#));
        assert_eq!(r.field, Some("key"));
        assert!(r.error.contains("case-sensitive"), "{r:?}");
        let r = reject(&format!(r#"{{"key": "{KEY}", "VALUE": 1}}"#));
        assert_eq!(r.field, Some("value"));
    }

    #[test]
    fn duplicate_field() {
        let r = reject(&format!(r#"{{"key": "{KEY}", "value": 1, "value": 2}}"#));
        assert_eq!(r.field, Some("value"));
        assert!(r.error.contains("more than once"), "{r:?}");
    }

    #[test]
    fn trailing_data() {
        let r = reject(&format!(r#"{{"key": "{KEY}", "value": 1}} {{}}"#));
        assert!(r.error.contains("trailing"), "{r:?}");
        assert_eq!(r.field, None);
    }

    #[test]
    fn not_json_and_not_an_object_and_empty() {
        assert!(reject("{\"key\":").error.contains("JSON object"));
        assert!(reject("[1, 2]").error.contains("JSON object"));
        assert!(reject("  ").error.contains("empty"));
    }

    #[test]
    fn key_of_wrong_type() {
        let r = reject(r#"{"key": 12, "value": 1}"#);
        assert_eq!(r.field, Some("key"));
        assert!(r.error.contains("got a number"), "{r:?}");
    }

    #[test]
    fn value_of_wrong_type() {
        for (raw, kind) in [
            ("\"5\"", "a string"),
            ("true", "a boolean"),
            ("null", "null"),
            ("[1]", "an array"),
        ] {
            let r = reject(&format!(r#"{{"key": "{KEY}", "value": {raw}}}"#));
            assert_eq!(r.field, Some("value"));
            assert!(r.error.contains(kind), "{raw}: {r:?}");
        }
    }

    #[test]
    fn fractional_and_exponent_values() {
        for raw in ["1.5", "1.0", "1e3"] {
            let r = reject(&format!(r#"{{"key": "{KEY}", "value": {raw}}}"#));
            assert_eq!(r.field, Some("value"));
            assert!(r.error.contains("integer"), "{raw}: {r:?}");
        }
    }

    #[test]
    fn zero() {
        let r = reject(&format!(r#"{{"key": "{KEY}", "value": 0}}"#));
        assert_eq!(r.field, Some("value"));
        assert!(r.error.contains("at least 1"), "{r:?}");
    }

    #[test]
    fn negative() {
        let r = reject(&format!(r#"{{"key": "{KEY}", "value": -3}}"#));
        assert!(r.error.contains("at least 1, got -3"), "{r:?}");
        let r = reject(&format!(
            r#"{{"key": "{KEY}", "value": -99999999999999999999999}}"#
        ));
        assert!(r.error.contains("at least 1"), "{r:?}");
    }

    #[test]
    fn above_i64() {
        for raw in [
            "9223372036854775808",
            "18446744073709551615",
            "99999999999999999999999",
        ] {
            let r = reject(&format!(r#"{{"key": "{KEY}", "value": {raw}}}"#));
            assert_eq!(r.field, Some("value"));
            assert!(
                r.error.contains("at most 9223372036854775807"),
                "{raw}: {r:?}"
            );
        }
    }

    #[test]
    fn not_a_uuid() {
        for raw in [
            "nope",
            "7f1d6c1e-2b9a-4c55-9a4e-3f0d2b7c8e1z",
            "7f1d6c1e2b9a4c559a4e3f0d2b7c8e11",
            "",
        ] {
            let r = reject(&format!(r#"{{"key": "{raw}", "value": 1}}"#));
            assert_eq!(r.field, Some("key"), "{raw}");
            assert!(r.error.contains("UUID"), "{raw}: {r:?}");
        }
    }

    #[test]
    fn missing_field() {
        let r = reject(r#"{"value": 1}"#);
        assert_eq!(
            (r.field, r.error.as_str()),
            (Some("key"), "missing field \"key\"")
        );
        let r = reject(&format!(r#"{{"key": "{KEY}"}}"#));
        assert_eq!(r.field, Some("value"));
    }

    proptest::proptest! {
        // The allocation-free path must accept exactly what the detailed path accepts.
        #[test]
        fn both_paths_agree(
            key in proptest::prop_oneof![
                proptest::strategy::Just(KEY.to_string()),
                "[0-9a-fA-F-]{30,40}",
                "\\PC{0,8}",
            ],
            value in proptest::prop_oneof![
                proptest::strategy::Just("0".to_string()),
                proptest::strategy::Just("9223372036854775807".to_string()),
                proptest::strategy::Just("9223372036854775808".to_string()),
                "-?[0-9]{1,20}",
                proptest::strategy::Just("1.0".to_string()),
            ],
            extra in proptest::prop_oneof![
                proptest::strategy::Just(""),
                proptest::strategy::Just(r#", "x": 1"#),
                proptest::strategy::Just(r#", "key": "a""#),
            ],
        ) {
            let body = format!(r#"{{"key": {}, "value": {value}{extra}}}"#, serde_json::json!(key));
            let fast = parse_increment(body.as_bytes());
            let slow = explain(body.as_bytes());
            proptest::prop_assert_eq!(fast.is_ok(), slow.is_ok(), "{}", body);
            if let (Ok(a), Ok(b)) = (fast, slow) {
                proptest::prop_assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn content_type_must_be_json() {
        assert!(is_json_content_type(Some("application/json")));
        assert!(is_json_content_type(Some(
            "Application/JSON; charset=utf-8"
        )));
        assert!(!is_json_content_type(Some("text/plain")));
        assert!(!is_json_content_type(Some("application/jsonx")));
        assert!(!is_json_content_type(None));
    }
}
