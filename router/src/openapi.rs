//! Hand-written OpenAPI 3.1 description of the HTTP API. `tests` below checks that every
//! registered route is described and every described route is registered.

use serde_json::{json, Value};

pub fn document() -> Value {
    let err = json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    // The OIP routes answer with the protocol's own error shape: {"error": "message"}.
    let oip_err = json!({"description": "error", "content": {"application/json": {"schema": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Prism router", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Multimodal inference front door: per-modality replica choice, parallel fan-out, fusion, graceful degradation. Send `Authorization: Bearer <token>` to /v1/* and /admin/* unless auth is off."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["type", "message"], "properties": {
                    "type": {"type": "string", "enum": ["invalid_json", "validation", "invalid_request_error", "unknown_modality", "payload_too_large", "headers_too_large", "unsupported_media_type", "unauthorized", "rate_limited", "unavailable", "timeout", "request_timeout", "conflict", "fusion", "not_found", "method_not_allowed", "internal"]},
                    "message": {"type": "string"},
                    "param": {"type": "string", "description": "the request field at fault (OpenAI routes)"},
                    "code": {"type": "string", "description": "e.g. model_not_found (OpenAI routes)"}}}}},
                "Model": {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
                    "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": {"type": "string"},
                    "kind": {"type": "string", "enum": ["pipeline", "modality", "node"]}, "modality": {"type": "string", "description": "where a request naming this model is routed"}}},
                "Input": {"description": "A bare string (text-like modalities) or an object with exactly one field.",
                    "oneOf": [{"type": "string"}, {"type": "object", "additionalProperties": false, "properties": {
                        "text": {"type": "string"}, "image_base64": {"type": "string", "contentEncoding": "base64"},
                        "audio_base64": {"type": "string", "contentEncoding": "base64"},
                        "embeddings": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "number"}}}}}]},
                "InferRequest": {"type": "object", "required": ["inputs"], "additionalProperties": false, "properties": {
                    "inputs": {"type": "object", "description": "modality name (text, image, audio, or any modality of the pipeline) -> input", "additionalProperties": {"$ref": "#/components/schemas/Input"}},
                    "timeout_ms": {"type": "integer", "minimum": 1, "description": "tighter than routing.timeoutMs"},
                    "de_fusion": {"type": "boolean"}}},
                "Replica": {"type": "object", "required": ["node", "endpoint", "revision"], "properties": {"node": {"type": "string"}, "endpoint": {"type": "string"}, "revision": {"type": "string"}}},
                "InferResponse": {"type": "object", "required": ["id", "pipeline", "generation", "strategy", "modalities", "timings"], "properties": {
                    "id": {"type": "string"}, "pipeline": {"type": "string"}, "generation": {"type": "integer"},
                    "strategy": {"type": "string", "enum": ["weighted", "attention", "late", "early"]},
                    "embedding": {"type": "array", "items": {"type": "number"}},
                    "modalities": {"type": "object", "additionalProperties": {"type": "object", "required": ["embedding", "replica", "weight", "attempts", "latency_ms"], "properties": {
                        "embedding": {"type": "array", "items": {"type": "number"}}, "replica": {"$ref": "#/components/schemas/Replica"},
                        "weight": {"type": "number"}, "attempts": {"type": "integer"}, "latency_ms": {"type": "number"}}}},
                    "contributions": {"type": "object", "additionalProperties": {"type": "number"}},
                    "fusion_replica": {"$ref": "#/components/schemas/Replica"},
                    "timings": {"type": "object", "properties": {"route_ms": {"type": "number"}, "fanout_ms": {"type": "number"}, "fuse_ms": {"type": "number"}, "memory_ms": {"type": "number"}, "total_ms": {"type": "number"}}},
                    "recorded": {"type": "boolean", "description": "memory on: true once this request is durably in the memory log; false if that write failed"},
                    "degraded": {"type": "object", "required": ["missing", "reason"], "properties": {"missing": {"type": "array", "items": {"type": "string"}}, "reason": {"type": "string"}, "cached": {"type": "boolean"}}}}},
                "EmbeddingsRequest": {"type": "object", "required": ["input"], "properties": {
                    "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 2048}]},
                    "model": {"type": "string", "maxLength": 256, "description": "the pipeline name (its text modality), a modality name, or a node name: GET /v1/models; absent: text"},
                    "encoding_format": {"type": "string", "enum": ["float", "base64"], "description": "base64: little-endian float32 bytes"},
                    "dimensions": {"type": "integer", "minimum": 1, "description": "keep the first N components, renormalised to unit length"}, "user": {"type": "string"}}},
                "EmbeddingsResponse": {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
                    "object": {"const": "list"},
                    "data": {"type": "array", "items": {"type": "object", "properties": {"object": {"const": "embedding"}, "index": {"type": "integer"}, "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string", "contentEncoding": "base64"}]}}}},
                    "model": {"type": "string"},
                    "usage": {"type": "object", "description": "the node tokenizer's count, special tokens included (0 for models without tokens)", "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}}}},
                "RoutingTable": {"type": "object", "required": ["pipeline", "generation", "modalities"], "properties": {
                    "pipeline": {"type": "string"}, "generation": {"type": "integer", "minimum": 0},
                    "modalities": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "object", "required": ["endpoint", "node", "revision", "weight", "accuracy", "ready"], "properties": {
                        "endpoint": {"type": "string"}, "node": {"type": "string"}, "revision": {"type": "string"}, "weight": {"type": "number"}, "accuracy": {"type": "number"}, "ready": {"type": "boolean"}}}}}}},
                "ReloadResponse": {"type": "object", "properties": {"applied": {"type": "boolean"}, "generation": {"type": "integer"}}},
                "SearchRequest": {"type": "object", "additionalProperties": false, "description": "`vector` (searched against `modality`'s vectors, default the fused ones) or `input` embedded by `modality`'s node",
                    "properties": {"modality": {"type": "string"}, "input": {"$ref": "#/components/schemas/Input"}, "vector": {"type": "array", "items": {"type": "number"}}, "k": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10}}},
                "SearchResponse": {"type": "object", "required": ["key", "exact", "hits"], "properties": {"key": {"type": "string"}, "exact": {"type": "boolean"},
                    "hits": {"type": "array", "items": {"type": "object", "required": ["id", "pipeline", "similarity", "atMs"], "properties": {"id": {"type": "string"}, "pipeline": {"type": "string"}, "similarity": {"type": "number"}, "atMs": {"type": "integer"}}}}}},
                "CorrectionRequest": {"type": "object", "required": ["requestId"], "additionalProperties": false, "description": "exactly one of `rating` and `correct`",
                    "properties": {"requestId": {"type": "string"}, "rating": {"type": "number", "minimum": 0, "maximum": 1}, "correct": {"type": "boolean"}, "answer": {"description": "the right answer, exported with the training set"}}},
                "CorrectionResponse": {"type": "object", "properties": {"requestId": {"type": "string"}, "rating": {"type": "number"},
                    "replicas": {"type": "array", "items": {"type": "object", "properties": {"node": {"type": "string"}, "revision": {"type": "string"}, "accuracy": {"type": "number", "description": "A_i of that revision after this correction"}}}}}}
            }
        },
        "paths": {
            "/v1/infer": {"post": {"summary": "Embed one multimodal item: fan out, fuse, degrade", "security": [{"bearer": []}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}}},
                "responses": {"200": {"description": "answer (check `degraded`)", "headers": {"x-request-id": {"schema": {"type": "string"}}}, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferResponse"}}}},
                              "400": err, "401": err, "408": err, "413": err, "415": err, "422": err, "429": err, "431": err, "503": err, "504": err}}},
            "/v1/embeddings": {"post": {"summary": "OpenAI-compatible text embeddings", "security": [{"bearer": []}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingsRequest"}}}},
                "responses": {"200": {"description": "embeddings", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingsResponse"}}}},
                              "400": err, "401": err, "404": err, "413": err, "415": err, "422": err, "429": err, "431": err, "503": err}}},
            "/v1/models": {"get": {"summary": "The valid `model` names (OpenAI-compatible list)", "security": [{"bearer": []}],
                "responses": {"200": {"description": "{object: list, data: [Model]}"}, "401": err, "431": err}}},
            "/v1/models/{id}": {"get": {"summary": "One model", "security": [{"bearer": []}],
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "model", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}}, "400": err, "401": err, "404": err}}},
            "/v1/routing-table": {"get": {"summary": "Routing table in force", "security": [{"bearer": []}],
                "responses": {"200": {"description": "table", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RoutingTable"}}}}, "401": err}}},
            "/admin/routing-table": {"put": {"summary": "Hot-reload the routing table (only strictly newer generations apply)", "security": [{"bearer": []}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RoutingTable"}}}},
                "responses": {"200": {"description": "applied, or the same table again (applied=false)", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReloadResponse"}}}},
                              "400": err, "401": err, "409": err, "422": err}}},
            "/v1/memory/search": {"post": {"summary": "Past requests nearest by meaning (cosine; HNSW once a pipeline holds 2048+ vectors, `exact` says which)", "security": [{"bearer": []}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SearchRequest"}}}},
                "responses": {"200": {"description": "hits, best first", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SearchResponse"}}}},
                              "400": err, "401": err, "404": err, "408": err, "413": err, "422": err, "503": err}}},
            "/v1/memory/corrections": {
                "post": {"summary": "Correct a past answer: stored durably, updates the serving revisions' accuracy", "security": [{"bearer": []}],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CorrectionRequest"}}}},
                    "responses": {"201": {"description": "stored", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CorrectionResponse"}}}},
                                  "400": err, "401": err, "404": err, "408": err, "422": err, "503": err}},
                "get": {"summary": "The corrections as a training set (inputs as logged, per-modality vectors, replicas)", "security": [{"bearer": []}],
                    "responses": {"200": {"description": "{corrections: [...]}, oldest first"}, "401": err, "404": err}}},
            "/v1/memory/records/{id}": {"get": {"summary": "One logged request with its corrections", "security": [{"bearer": []}],
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "record"}, "401": err, "404": err}}},
            "/v2": {"get": {"summary": "Open Inference Protocol v2: server metadata (name, version, extensions)", "security": [{"bearer": []}],
                "responses": {"200": {"description": "{name, version, extensions}"}, "401": err}}},
            "/v2/health/live": {"get": {"summary": "OIP liveness", "responses": {"200": {"description": "alive"}}}},
            "/v2/health/ready": {"get": {"summary": "OIP readiness (as /ready)", "responses": {"200": {"description": "ready"}, "503": oip_err}}},
            "/v2/models/{name}": {"get": {"summary": "OIP model metadata: inputs (one per modality) and the FP32 [batch, dim] `embedding` output", "security": [{"bearer": []}],
                "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "{name, versions, platform, inputs, outputs}"}, "401": err, "404": oip_err}}},
            "/v2/models/{name}/ready": {"get": {"summary": "OIP model readiness", "security": [{"bearer": []}],
                "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "ready"}, "401": err, "404": oip_err, "503": oip_err}}},
            "/v2/models/{name}/infer": {"post": {"summary": "OIP inference: JSON tensors, or the binary tensor data extension (Inference-Header-Content-Length)", "security": [{"bearer": []}],
                "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["inputs"]}}, "application/octet-stream": {"description": "JSON header (its length in Inference-Header-Content-Length) then the inputs' binary data"}}},
                "responses": {"200": {"description": "{model_name, model_version, id?, parameters?, outputs: [embedding]}, binary outputs appended after the JSON header"},
                              "400": oip_err, "401": err, "404": oip_err, "413": oip_err, "415": err, "429": err, "431": err, "503": oip_err, "504": oip_err}}},
            "/live": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
            "/ready": {"get": {"summary": "Readiness: a routing table with a routable replica is loaded", "responses": {"200": {"description": "ready"}, "503": err}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_and_every_documented_route_exists() {
        let doc = document();
        let paths = doc["paths"].as_object().expect("paths");
        let routes = crate::http::routes();
        assert!(routes.len() >= 8);
        for (method, path) in &routes {
            assert!(
                paths.get(*path).and_then(|p| p.get(*method)).is_some(),
                "{method} {path} is served but not in openapi.json"
            );
        }
        for (path, ops) in paths {
            for method in ops.as_object().expect("ops").keys() {
                assert!(
                    routes.iter().any(|(m, p)| p == path && m == method),
                    "{method} {path} is documented but not served"
                );
            }
        }
    }
}
