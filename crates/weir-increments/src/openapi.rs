//! The OpenAPI document served at `/openapi.json`. The API test walks every path and
//! method in it against a live server, so it cannot drift from the routes.

use serde_json::{json, Value};

pub fn document() -> Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let error_response = |description: &str| json!({"description": description, "content": {"application/json": {"schema": error}}});
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
                        "key": {"type": "string", "format": "uuid", "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"},
                        "value": {"type": "integer", "format": "int64", "minimum": 1, "maximum": i64::MAX}
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
                        "lastFlushAtMs": {"type": ["integer", "null"], "description": "commit time of this process's last flush, if it runs a worker"}
                    }
                }
            }
        },
        "paths": {
            "/increment": {"post": {
                "summary": "Add value to the total of key",
                "security": [{"bearer": []}, {}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Increment"}}}},
                "responses": {
                    "202": {"description": "Accepted and durable; persisted within the staleness bound"},
                    "400": error_response("The body breaks a rule; `field` names the field"),
                    "401": error_response("Missing or unknown bearer API key"),
                    "413": error_response("Body larger than 1 KiB"),
                    "415": error_response("Content-Type is not application/json"),
                    "429": error_response("Rate limit exceeded; see Retry-After"),
                    "503": error_response("The queue is full or unreachable; retry later")
                }
            }},
            "/counts/{key}": {"get": {
                "summary": "The persisted total of key",
                "security": [{"bearer": []}, {}],
                "parameters": [{"name": "key", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}}],
                "responses": {
                    "200": {"description": "The total (0 if never incremented)", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Count"}}}},
                    "400": error_response("key is not a UUID"),
                    "401": error_response("Missing or unknown bearer API key"),
                    "503": error_response("No database reachable from this process")
                }
            }},
            "/healthz": {"get": {"summary": "The process is alive", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Queue and database reachable", "responses": {
                "200": {"description": "ready"},
                "503": {"description": "not ready; the body says which part is down"}
            }}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}}
        }
    })
}
