//! The OpenAPI document served at `/openapi.json`. The API test walks every path and
//! method in it against a live server, so it cannot drift from the routes.

use serde_json::{json, Value};

/// The one spelling of a key the API accepts, in the body and in the path alike.
const KEY_PATTERN: &str =
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

/// Exactly what the server accepts: a bare key (visible ASCII, inner spaces allowed, not
/// starting with a quote) or a quoted Structured Field string (`\"` and `\\` escaped), 1 to
/// 255 characters either way, with optional surrounding whitespace.
const IDEMPOTENCY_KEY_PATTERN: &str = r#"^[ \t]*([\x21\x23-\x7E]([\x20-\x7E]{0,253}[\x21-\x7E])?|"([\x20\x21\x23-\x5B\x5D-\x7E]|\\["\\]){1,255}")[ \t]*$"#;

pub fn document() -> Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let error_response = |description: &str| json!({"description": description, "content": {"application/json": {"schema": error}}});
    let json_response = |description: &str, schema: Value| json!({"description": description, "content": {"application/json": {"schema": schema}}});
    let readiness = json!({"$ref": "#/components/schemas/Readiness"});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Weir increments",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Increments summed per key and persisted at most ten seconds late, each exactly once."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Increment": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["key", "value"],
                    "properties": {
                        "key": {"type": "string", "format": "uuid", "pattern": KEY_PATTERN},
                        "value": {
                            "type": "integer", "format": "int64", "minimum": 1, "maximum": i64::MAX,
                            "description": "Any notation of an integer is accepted (12, 12.0, 1.2e1); a fractional part is refused."
                        }
                    }
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}, "field": {"type": "string"}}
                },
                "Count": {
                    "type": "object",
                    "required": ["key", "total"],
                    "properties": {
                        "key": {"type": "string", "format": "uuid"},
                        "total": {"type": "integer", "format": "int64"},
                        "updatedAtMs": {"type": ["integer", "null"], "description": "commit time of the last flush that changed this key"},
                        "lastFlushAtMs": {"type": ["integer", "null"], "description": "commit time of the last flush: this process's own if it runs a worker, else the latest any worker recorded in the database"}
                    }
                },
                "Readiness": {
                    "type": "object",
                    "required": ["ready", "queue", "database"],
                    "properties": {
                        "ready": {"type": "boolean", "description": "whether this process takes work: its queue accepts writes and is not full (a worker-only process: its flushes succeed)"},
                        "queue": {"type": "string"},
                        "queueDepth": {"type": ["integer", "null"], "description": "increments accepted and not yet persisted: the embedded log's unflushed records, or the Redis group's lag plus pending entries"},
                        "lastCommitAtMs": {"type": ["integer", "null"], "description": "when totals were last committed (ms since the epoch): this process's worker, or what the workers recorded in the database"},
                        "database": {"type": "string", "description": "reported only; a database outage does not make an API unready"},
                        "flush": {
                            "type": ["object", "null"],
                            "description": "the worker of this process, if any",
                            "properties": {
                                "failing": {"type": "boolean"},
                                "consecutiveFailures": {"type": "integer"},
                                "secondsSinceLastFlush": {"type": ["number", "null"]},
                                "oldestUnflushedAgeMs": {"type": ["integer", "null"]},
                                "stale": {"type": "boolean", "description": "increments older than the staleness bound are not yet persisted"},
                                "lastError": {"type": ["string", "null"]}
                            }
                        }
                    }
                }
            }
        },
        "paths": {
            "/increment": {"post": {
                "summary": "Add value to the total of key",
                "security": [{"bearer": []}, {}],
                "parameters": [{
                    "name": "Idempotency-Key", "in": "header", "required": false,
                    "description": "Makes a retry safe (IETF httpapi idempotency-key draft): a repeat with the same key and body within the retention window (idempotencyRetentionSecs, 24 h) answers 202 again, with Idempotent-Replayed: true, and adds nothing. 1 to 255 visible ASCII characters, bare or as a quoted Structured Field string. Keys are scoped by the bearer API key when auth is on.",
                    "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN}
                }],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Increment"}}}},
                "responses": {
                    "202": {
                        "description": "Accepted and durable; persisted within the staleness bound (with an Idempotency-Key: committed with its key)",
                        "headers": {"Idempotent-Replayed": {"description": "true when this is a repeat of an accepted request: nothing was added", "schema": {"type": "string", "enum": ["true"]}}}
                    },
                    "400": error_response("The body breaks a rule; `field` names the field"),
                    "401": error_response("Missing or unknown bearer API key"),
                    "408": error_response("The body did not arrive within bodyTimeoutMs"),
                    "413": error_response("Body larger than 1 KiB"),
                    "409": error_response("A request with this Idempotency-Key is still being processed; retry after Retry-After"),
                    "415": error_response("Content-Type is not application/json"),
                    "422": error_response("This Idempotency-Key was used for a different request"),
                    "429": error_response("Rate limit exceeded; see Retry-After"),
                    "503": error_response("The queue is full or unreachable; retry later")
                }
            }},
            "/counts/{key}": {"get": {
                "summary": "The persisted total of key",
                "security": [{"bearer": []}, {}],
                "parameters": [{"name": "key", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid", "pattern": KEY_PATTERN}}],
                "responses": {
                    "200": json_response("The total (0 if never incremented)", json!({"$ref": "#/components/schemas/Count"})),
                    "400": error_response("key is not a UUID in the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"),
                    "401": error_response("Missing or unknown bearer API key"),
                    "404": error_response("No key in the path"),
                    "429": error_response("Rate limit exceeded; see Retry-After"),
                    "503": error_response("No database reachable from this process")
                }
            }},
            "/healthz": {"get": {"summary": "The process is alive", "responses": {
                "200": json_response("alive", json!({"type": "object", "required": ["status"], "properties": {"status": {"const": "alive"}}}))
            }}},
            "/readyz": {"get": {"summary": "This process takes work (flush health is reported in the body)", "responses": {
                "200": json_response("ready", readiness.clone()),
                "503": json_response("not ready; the body says why", readiness)
            }}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}
            }}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": json_response("OpenAPI 3.1", json!({"type": "object"}))
            }}}
        }
    })
}
