//! The coordinator's OpenAPI document, served at `/openapi.json`. The coordinator's API
//! test walks every path in it against a live coordinator, so it cannot drift from the
//! routes.

use serde_json::{json, Value};

use crate::validate::{MAX_BODY_BYTES, MAX_FIELD_BYTES, MAX_ITEMS};

pub fn document() -> Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let error_response = |description: &str| json!({"description": description, "content": {"application/json": {"schema": error}}});
    let json_response = |description: &str, schema: Value| json!({"description": description, "content": {"application/json": {"schema": schema}}});
    let unavailable = json!({
        "description": "no worker could take it before the deadline; sending the same request again is safe",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        "content": {"application/json": {"schema": error}}
    });
    let field = json!({"type": "string", "minLength": 1, "maxLength": MAX_FIELD_BYTES, "description": format!("at most {MAX_FIELD_BYTES} bytes of UTF-8")});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Weir distinct",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Exact counts of distinct items per tenant. A 200 means every item of the request is durable and counted; each (tenant, id) counts once however often it is sent."
        },
        "components": {
            "schemas": {
                "Item": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["id", "tenant"],
                    "properties": {"id": field, "tenant": field}
                },
                "Items": {
                    "type": "array",
                    "maxItems": MAX_ITEMS,
                    "items": {"$ref": "#/components/schemas/Item"},
                    "description": format!("at most {MAX_ITEMS} items and {MAX_BODY_BYTES} bytes")
                },
                "Accepted": {
                    "type": "object",
                    "required": ["accepted"],
                    "properties": {"accepted": {"type": "integer", "minimum": 0, "description": "items in the request, duplicates included"}}
                },
                "Count": {
                    "type": "object",
                    "required": ["count"],
                    "properties": {"count": {"type": "integer", "minimum": 0}}
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}, "field": {"type": "string", "description": "the item and field at fault, as [3].tenant"}}
                },
                "Worker": {
                    "type": "object",
                    "required": ["worker", "alive", "local", "restarts"],
                    "properties": {
                        "worker": {"type": "string", "description": "host:port as configured"},
                        "alive": {"type": "boolean"},
                        "local": {"type": "boolean", "description": "on this host, so run by this coordinator"},
                        "pid": {"type": ["integer", "null"]},
                        "restarts": {"type": "integer"},
                        "shards": {"type": "integer", "description": "shards it last committed for this coordinator (it holds their locks)"},
                        "error": {"type": ["string", "null"], "description": "why it was last found down"},
                        "damaged": {"type": "array", "items": {"$ref": "#/components/schemas/Damage"}, "description": "damaged shards its last health answer listed"}
                    }
                },
                "Health": {
                    "type": "object",
                    "required": ["alive", "workers"],
                    "properties": {
                        "service": {"type": "string"},
                        "alive": {"type": "integer"},
                        "workers": {"type": "array", "items": {"$ref": "#/components/schemas/Worker"}},
                        "damaged": {"type": "array", "items": {"$ref": "#/components/schemas/Damage"}, "description": "shards whose files failed their checks: their counts and writes are answered 503 until `weir distinct repair`"},
                        "config_error": {"type": ["string", "null"], "description": "why the config file was last refused at a reload (the previous config stays in force)"}
                    }
                },
                "Damage": {
                    "type": "object",
                    "properties": {
                        "shard": {"type": "integer"},
                        "file": {"type": "string"},
                        "offset": {"type": "integer", "description": "byte offset in the file where the damage starts"},
                        "error": {"type": "string"}
                    }
                },
                "Readiness": {
                    "type": "object",
                    "required": ["ready", "alive", "workers", "failures"],
                    "properties": {
                        "ready": {"type": "boolean", "description": "at least one worker is alive and no shard is damaged"},
                        "alive": {"type": "integer"},
                        "workers": {"type": "integer"},
                        "failures": {"type": "array", "items": {"type": "object", "properties": {"worker": {"type": "string"}, "error": {"type": "string"}}}},
                        "damaged": {"type": "array", "items": {"$ref": "#/components/schemas/Damage"}}
                    }
                }
            }
        },
        "paths": {
            "/items": {"post": {
                "summary": "Count items, each (tenant, id) once",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Items"}}}},
                "responses": {
                    "200": json_response("every item is committed and counted", json!({"$ref": "#/components/schemas/Accepted"})),
                    "400": error_response("malformed or invalid; nothing of it is counted"),
                    "413": error_response("too many items or too large a body; nothing of it is counted"),
                    "415": error_response("the Content-Type is not application/json"),
                    "503": unavailable.clone()
                }
            }},
            "/items/{tenant}/count": {"get": {
                "summary": "Distinct items counted for a tenant",
                "parameters": [{"name": "tenant", "in": "path", "required": true, "schema": field}],
                "responses": {
                    "200": json_response("the count", json!({"$ref": "#/components/schemas/Count"})),
                    "400": error_response("the tenant is too long"),
                    "503": unavailable
                }
            }},
            "/": {"get": {
                "summary": "Every configured worker, alive or not",
                "responses": {"200": json_response("the workers", json!({"$ref": "#/components/schemas/Health"}))}
            }},
            "/healthz": {"get": {
                "summary": "The coordinator process answers",
                "responses": {"200": {"description": "ok", "content": {"text/plain": {"schema": {"type": "string"}}}}}
            }},
            "/readyz": {"get": {
                "summary": "Whether requests can be placed: at least one worker is alive and no shard is damaged",
                "responses": {
                    "200": json_response("ready", json!({"$ref": "#/components/schemas/Readiness"})),
                    "503": json_response("no worker is alive, or a shard is damaged", json!({"$ref": "#/components/schemas/Readiness"}))
                }
            }},
            "/metrics": {"get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}}
            }},
            "/openapi.json": {"get": {
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}
            }}
        }
    })
}
