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
    /// One of [`REASONS`], for the `reason` label of the rejection counter.
    pub reason: &'static str,
}

/// Not exactly one JSON object (empty, not JSON, an array, trailing data).
pub const INVALID_JSON: &str = "invalid_json";
/// A member other than `key` and `value` (a case mistake included).
pub const UNKNOWN_FIELD: &str = "unknown_field";
pub const DUPLICATE_FIELD: &str = "duplicate_field";
pub const MISSING_FIELD: &str = "missing_field";
/// `key` is not a string holding a canonical UUID.
pub const INVALID_KEY: &str = "invalid_key";
/// `value` is not an integer from 1 to `i64::MAX`.
pub const INVALID_VALUE: &str = "invalid_value";
/// Every reason a body is refused for.
pub const REASONS: [&str; 6] = [
    INVALID_JSON,
    UNKNOWN_FIELD,
    DUPLICATE_FIELD,
    MISSING_FIELD,
    INVALID_KEY,
    INVALID_VALUE,
];

impl Rejection {
    fn body(reason: &'static str, error: impl Into<String>) -> Self {
        Rejection {
            error: error.into(),
            field: None,
            reason,
        }
    }

    fn field(reason: &'static str, field: &'static str, error: impl Into<String>) -> Self {
        Rejection {
            error: error.into(),
            field: Some(field),
            reason,
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
        return Err(Rejection::body(
            INVALID_JSON,
            "the body is empty; expected a JSON object",
        ));
    }
    let Fields(fields) = serde_json::from_slice(body).map_err(|err| {
        Rejection::body(
            INVALID_JSON,
            format!("the body must be exactly one JSON object with no trailing data: {err}"),
        )
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
                            UNKNOWN_FIELD,
                            known,
                            format!("unknown field \"{other}\"; field names are case-sensitive, use \"{known}\""),
                        ));
                    }
                }
                return Err(Rejection::body(
                    UNKNOWN_FIELD,
                    format!("unknown field \"{other}\"; only \"key\" and \"value\" are allowed"),
                ));
            }
        };
        if slot.is_some() {
            let field = if name == "key" { "key" } else { "value" };
            return Err(Rejection::field(
                DUPLICATE_FIELD,
                field,
                format!("field \"{field}\" appears more than once"),
            ));
        }
        *slot = Some(raw);
    }
    let key = key.ok_or_else(|| Rejection::field(MISSING_FIELD, "key", "missing field \"key\""))?;
    let value =
        value.ok_or_else(|| Rejection::field(MISSING_FIELD, "value", "missing field \"value\""))?;
    let key = parse_key(&key)?;
    let text = std::str::from_utf8(body).unwrap_or_default();
    let literals = member_literals(text);
    let literal = literals
        .iter()
        .find(|(name, _)| name == "value")
        .map(|(_, literal)| *literal);
    Ok(Increment {
        key,
        value: parse_value(&value, literal)?,
    })
}

fn parse_key(raw: &Value) -> Result<Uuid, Rejection> {
    let Value::String(text) = raw else {
        return Err(Rejection::field(
            INVALID_KEY,
            "key",
            format!("must be a string holding a UUID, got {}", kind(raw)),
        ));
    };
    parse_key_text(text)
}

/// A key as the API accepts it anywhere (body or path).
pub fn parse_key_text(text: &str) -> Result<Uuid, Rejection> {
    // Only the canonical hyphenated form: the other spellings uuid accepts (braced, URN,
    // 32 bare digits) would let one key be written several ways by different clients.
    if text.len() != 36 {
        return Err(Rejection::field(
            INVALID_KEY,
            "key",
            "must be a UUID in the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx",
        ));
    }
    Uuid::try_parse(text)
        .map_err(|err| Rejection::field(INVALID_KEY, "key", format!("must be a UUID: {err}")))
}

fn parse_value(raw: &Value, literal: Option<&str>) -> Result<i64, Rejection> {
    let Value::Number(_) = raw else {
        return Err(Rejection::field(
            INVALID_VALUE,
            "value",
            format!("must be an integer, got {}", kind(raw)),
        ));
    };
    // serde_json hands over anything beyond i64 as a rounded float, so the decision is taken
    // on the literal as written: 12, 12.0 and 1.2e1 are the same integer, 1.5 is none.
    let literal = literal.unwrap_or_default();
    match integer_literal(literal) {
        Literal::Integer(value) if value >= 1 => Ok(value),
        Literal::Integer(_) | Literal::BelowRange => Err(Rejection::field(
            INVALID_VALUE,
            "value",
            format!("must be at least 1, got {literal}"),
        )),
        Literal::AboveRange => Err(Rejection::field(
            INVALID_VALUE,
            "value",
            format!("must be at most {} (a signed 64-bit integer)", i64::MAX),
        )),
        Literal::Fraction => Err(Rejection::field(
            INVALID_VALUE,
            "value",
            format!("must be an integer (no fractional part), got {literal}"),
        )),
    }
}

/// What a JSON number literal denotes, exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Literal {
    Integer(i64),
    AboveRange,
    BelowRange,
    Fraction,
}

/// Reads a JSON number literal (`-?int(.frac)?([eE][+-]?exp)?`, as serde_json has already
/// checked) in exact decimal arithmetic.
fn integer_literal(text: &str) -> Literal {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], &unsigned[at + 1..]),
        None => (unsigned, "0"),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    // An exponent too large for i64 is still just "very large" or "very small".
    let exponent =
        exponent
            .trim_start_matches('+')
            .parse::<i64>()
            .unwrap_or(if exponent.starts_with('-') {
                i64::MIN / 2
            } else {
                i64::MAX / 2
            });
    let digits: String = whole.chars().chain(fraction.chars()).collect();
    let digits = digits.trim_start_matches('0');
    let mut scale = exponent.saturating_sub(fraction.len() as i64);
    let mut significant = digits;
    while scale < 0 && significant.ends_with('0') {
        significant = &significant[..significant.len() - 1];
        scale += 1;
    }
    if significant.is_empty() {
        return Literal::Integer(0);
    }
    if scale < 0 {
        return Literal::Fraction;
    }
    let out_of_range = if negative {
        Literal::BelowRange
    } else {
        Literal::AboveRange
    };
    // i64::MAX has 19 digits: anything longer cannot fit.
    if significant.len() as i64 + scale > 19 {
        return out_of_range;
    }
    let mut magnitude: u128 = 0;
    for digit in significant.bytes() {
        magnitude = magnitude * 10 + u128::from(digit - b'0');
    }
    magnitude *= 10u128.pow(scale as u32);
    match i64::try_from(magnitude) {
        Ok(value) if negative => Literal::Integer(-value),
        Ok(value) => Literal::Integer(value),
        Err(_) => out_of_range,
    }
}

/// The literal text of each top-level member of `body`, a JSON object serde_json has
/// already accepted, keyed by the member's (unescaped) name.
fn member_literals(body: &str) -> Vec<(String, &str)> {
    let bytes = body.as_bytes();
    let mut members = Vec::with_capacity(2);
    let Some(mut at) = body.find('{').map(|open| open + 1) else {
        return members;
    };
    loop {
        at = skip_whitespace(bytes, at);
        if bytes.get(at) != Some(&b'"') {
            return members;
        }
        let name_end = skip_value(bytes, at);
        let name: String = serde_json::from_str(&body[at..name_end]).unwrap_or_default();
        at = skip_whitespace(bytes, name_end) + 1; // the ':'
        at = skip_whitespace(bytes, at);
        let value_end = skip_value(bytes, at);
        members.push((name, &body[at..value_end]));
        at = skip_whitespace(bytes, value_end) + 1; // the ',' or the '}'
    }
}

fn skip_whitespace(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

/// The end of the JSON value starting at `at`.
fn skip_value(bytes: &[u8], mut at: usize) -> usize {
    let mut depth = 0usize;
    let mut in_string = false;
    while let Some(&byte) = bytes.get(at) {
        at += 1;
        match (in_string, byte) {
            (true, b'\\') => at += 1,
            (true, b'"') => {
                in_string = false;
                if depth == 0 {
                    return at;
                }
            }
            (true, _) => {}
            (false, b'"') => in_string = true,
            (false, b'{' | b'[') => depth += 1,
            (false, b'}' | b']') if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    return at;
                }
            }
            (false, b',' | b'}' | b']') if depth == 0 => return at - 1,
            (false, byte) if depth == 0 && byte.is_ascii_whitespace() => return at - 1,
            (false, _) => {}
        }
    }
    at
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
    fn fractional_values_are_refused() {
        for raw in ["1.5", "1e-1", "1.25e1", "1.00000000000000000001"] {
            let r = reject(&format!(r#"{{"key": "{KEY}", "value": {raw}}}"#));
            assert_eq!(r.field, Some("value"));
            assert!(r.error.contains("no fractional part"), "{raw}: {r:?}");
        }
    }

    #[test]
    fn integral_values_are_accepted_in_any_notation() {
        for (raw, expected) in [
            ("1.0", 1),
            ("1e3", 1000),
            ("1.20E1", 12),
            ("134217729.0", 134_217_729),
            ("9.223372036854775807e18", i64::MAX),
            ("0.5e1", 5),
        ] {
            let body = format!(r#"{{"key": "{KEY}", "value": {raw}}}"#);
            let accepted = parse_increment(body.as_bytes());
            assert_eq!(accepted.map(|i| i.value), Ok(expected), "{raw}");
        }
        let r = reject(&format!(
            r#"{{"key": "{KEY}", "value": 9.223372036854775808e18}}"#
        ));
        assert!(r.error.contains("at most"), "{r:?}");
        let r = reject(&format!(r#"{{"key": "{KEY}", "value": 0.0e5}}"#));
        assert!(r.error.contains("at least 1"), "{r:?}");
        let r = reject(&format!(r#"{{"key": "{KEY}", "value": -1e300}}"#));
        assert!(r.error.contains("at least 1"), "{r:?}");
    }

    #[test]
    fn literals_are_read_exactly() {
        assert_eq!(integer_literal("0"), Literal::Integer(0));
        assert_eq!(integer_literal("-0.0"), Literal::Integer(0));
        assert_eq!(integer_literal("-12e0"), Literal::Integer(-12));
        assert_eq!(integer_literal("1e19"), Literal::AboveRange);
        assert_eq!(
            integer_literal("1e99999999999999999999"),
            Literal::AboveRange
        );
        assert_eq!(integer_literal("-1e19"), Literal::BelowRange);
        assert_eq!(
            integer_literal("1e-99999999999999999999"),
            Literal::Fraction
        );
        assert_eq!(
            integer_literal("0e-99999999999999999999"),
            Literal::Integer(0)
        );
        assert_eq!(integer_literal("100e-2"), Literal::Integer(1));
        assert_eq!(integer_literal("101e-2"), Literal::Fraction);
    }

    #[test]
    fn member_literals_keep_the_text_as_written() {
        let body =
            r#" { "k\u0065y" : "a,}" , "nested": {"value": [1, {"x": "]"}]}, "value":1.50e1 } "#;
        let members = member_literals(body);
        let names: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["key", "nested", "value"]);
        assert_eq!(members[0].1, r#""a,}""#);
        assert_eq!(members[1].1, r#"{"value": [1, {"x": "]"}]}"#);
        assert_eq!(members[2].1, "1.50e1");
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
        // Exact reading agrees with i64 wherever i64 can say.
        #[test]
        fn literals_agree_with_plain_integers(value: i64) {
            proptest::prop_assert_eq!(integer_literal(&value.to_string()), Literal::Integer(value));
        }

        #[test]
        fn literals_agree_with_scaled_integers(value in -1_000_000i64..1_000_000, zeros in 0usize..6) {
            let text = format!("{value}{}e-{zeros}", "0".repeat(zeros));
            proptest::prop_assert_eq!(integer_literal(&text), Literal::Integer(value));
        }
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
                "-?[0-9]{1,3}(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,2})?",
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
    fn every_rejection_names_its_reason() {
        for (body, reason) in [
            ("  ".to_string(), INVALID_JSON),
            ("[1]".to_string(), INVALID_JSON),
            (
                format!(r#"{{"key": "{KEY}", "value": 1}} {{}}"#),
                INVALID_JSON,
            ),
            (format!(r#"{{"Key": "{KEY}", "value": 1}}"#), UNKNOWN_FIELD),
            (
                format!(r#"{{"key": "{KEY}", "value": 1, "x": 1}}"#),
                UNKNOWN_FIELD,
            ),
            (
                format!(r#"{{"key": "{KEY}", "key": "{KEY}", "value": 1}}"#),
                DUPLICATE_FIELD,
            ),
            (r#"{"value": 1}"#.to_string(), MISSING_FIELD),
            (format!(r#"{{"key": "{KEY}"}}"#), MISSING_FIELD),
            (r#"{"key": 1, "value": 1}"#.to_string(), INVALID_KEY),
            (r#"{"key": "nope", "value": 1}"#.to_string(), INVALID_KEY),
            (
                r#"{"key": "7f1d6c1e-2b9a-4c55-9a4e-3f0d2b7c8e1z", "value": 1}"#.to_string(),
                INVALID_KEY,
            ),
            (
                format!(r#"{{"key": "{KEY}", "value": "1"}}"#),
                INVALID_VALUE,
            ),
            (format!(r#"{{"key": "{KEY}", "value": 0}}"#), INVALID_VALUE),
            (
                format!(r#"{{"key": "{KEY}", "value": 1.5}}"#),
                INVALID_VALUE,
            ),
            (
                format!(r#"{{"key": "{KEY}", "value": 1e19}}"#),
                INVALID_VALUE,
            ),
        ] {
            assert_eq!(reject(&body).reason, reason, "{body}");
            assert!(REASONS.contains(&reason));
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
