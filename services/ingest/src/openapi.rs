//! The OpenAPI document a running ingest serves at `GET /openapi.json`.
//!
//! The routes are described next to their handlers (`utoipa`); what only the running
//! configuration knows is filled in here, so that the document says exactly what this
//! server answers: the pipeline's stream names as an `enum`, one publish operation per
//! stream with that stream's own event rules (its key pointer and its JSON Schema), the
//! workshop and chat paths only when their streams exist, the `ms` limit of `/v1/work`,
//! and the API-key schemes with their `401` answers when keys are required.

use serde_json::{Map, Value, json};
use sluice_core::StreamSettings;
use sluice_core::envelope::MAX_ID_LEN;

/// What the running server decides about its document.
#[derive(Debug, Clone, Copy)]
pub struct Served<'a> {
    /// The pipeline's streams.
    pub streams: &'a [&'a StreamSettings],
    /// The stream `POST /v1/messages` publishes to (`--messages-stream`).
    pub messages_stream: &'a str,
    /// The longest `ms` of `POST /v1/work` (`--work-max-ms`).
    pub work_max_ms: u64,
    /// The most events in one request (`--max-batch-events`).
    pub max_batch_events: usize,
    /// Whether every API request needs a key (`--api-keys-file`).
    pub api_keys: bool,
}

/// The template of the per-stream publish operations in the described routes.
const PUBLISH_TEMPLATE: &str = "/v1/streams/{stream}/events";
/// The workshop paths and the stream each publishes to.
const WORKSHOP: [(&str, &str); 2] = [
    ("/api/visit/v1/", "visit"),
    ("/api/activity/v1/", "activity"),
];
/// An event id given as text: what `validate_id` accepts (no white space, no control
/// characters, 1 to 128 characters).
pub const ID_PATTERN: &str = r"^[^\s\u0000-\u001f\u007f-\u009f]+$";

/// `doc` (the described routes) completed for the server `served` describes.
pub fn complete(mut doc: Value, served: &Served) -> Value {
    let names: Vec<&str> = served.streams.iter().map(|s| s.name.as_str()).collect();
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return doc;
    };
    let template = paths
        .remove(PUBLISH_TEMPLATE)
        .and_then(|mut item| item.get_mut("post").map(Value::take))
        .unwrap_or_default();
    for stream in served.streams {
        let mut post = publish_operation(&template, stream, served.max_batch_events);
        let name = &stream.name;
        post["operationId"] = json!(format!("publish_{name}"));
        post["summary"] = json!(format!("Publish events to the stream `{name}`."));
        paths.insert(
            format!("/v1/streams/{name}/events"),
            json!({ "post": post }),
        );
    }
    for (path, name) in WORKSHOP {
        let stream = served.streams.iter().find(|s| s.name == name);
        match (stream, paths.get_mut(path).and_then(|i| i.get_mut("post"))) {
            (Some(stream), Some(post)) => {
                // The parameters, body and answers of the stream's publish operation.
                let mut full = publish_operation(&template, stream, served.max_batch_events);
                for field in ["operationId", "summary", "description"] {
                    full[field] = post[field].take();
                }
                *post = full;
            }
            _ => {
                paths.remove(path);
            }
        }
    }
    if !names.contains(&served.messages_stream) {
        paths.remove("/v1/messages");
    }
    for operation in operations(paths) {
        for parameter in parameters(operation) {
            match (parameter["in"].as_str(), parameter["name"].as_str()) {
                (Some("path"), Some("stream")) => {
                    parameter["schema"] = json!({"type": "string", "enum": names});
                }
                (Some("query"), Some("ms")) => {
                    parameter["schema"]["maximum"] = json!(served.work_max_ms);
                }
                _ => {}
            }
        }
        if served.api_keys {
            operation["responses"]["401"] = json!({
                "description": "No valid API key",
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
            });
        }
    }
    if served.api_keys {
        doc["components"]["securitySchemes"] = json!({
            "bearer": {"type": "http", "scheme": "bearer", "description": "An API key as `Authorization: Bearer <key>`"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "An API key as `X-Api-Key: <key>`"},
        });
        doc["security"] = json!([{"bearer": []}, {"apiKey": []}]);
    }
    doc
}

/// Every operation of every path.
fn operations(paths: &mut Map<String, Value>) -> impl Iterator<Item = &mut Value> {
    paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut())
        .filter(|op| op.get("responses").is_some())
}

fn parameters(operation: &mut Value) -> impl Iterator<Item = &mut Value> {
    operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

/// The publish operation of `stream`, made from the described template.
fn publish_operation(template: &Value, stream: &StreamSettings, max_batch: usize) -> Value {
    let mut post = template.clone();
    if let Some(list) = post.get_mut("parameters").and_then(Value::as_array_mut) {
        // The stream is in the path; a stream with a key pointer takes each event's key
        // from the event, never from a header.
        list.retain(|p| {
            p["name"] != "stream" && !(stream.key.is_some() && p["name"] == crate::http::KEY_HEADER)
        });
    }
    set_event_body(&mut post, stream, max_batch);
    post
}

fn set_event_body(post: &mut Value, stream: &StreamSettings, max_batch: usize) {
    let event = event_schema(stream);
    post["requestBody"] = json!({
        "description": format!(
            "One event of the stream `{}`, an array of 1 to {max_batch} of them, or NDJSON (one event per line)",
            stream.name
        ),
        "required": true,
        "content": {
            "application/json": {"schema": {"oneOf": [
                event,
                {"type": "array", "items": event, "minItems": 1, "maxItems": max_batch},
            ]}},
            "application/x-ndjson": {"schema": {"type": "string", "description": "Events of this schema, one JSON object per line"}},
        },
    });
}

/// The JSON Schema of one event of `stream`: an object; its `id`, when present, a valid
/// event id; the value at the stream's key pointer present and scalar; and whatever the
/// stream's own schema requires.
pub fn event_schema(stream: &StreamSettings) -> Value {
    let mut all = Vec::new();
    if let Some(pointer) = &stream.key {
        all.push(at_pointer(
            pointer,
            json!({"type": ["string", "number", "boolean"]}),
        ));
    }
    if let Some(schema) = &stream.schema {
        all.push(schema.clone());
    }
    let mut event = json!({
        "type": "object",
        "properties": {"id": {
            "description": "The event id (a new UUIDv7 when absent)",
            "oneOf": [
                {"type": "string", "minLength": 1, "maxLength": MAX_ID_LEN, "pattern": ID_PATTERN},
                {"type": "integer", "minimum": i64::MIN, "maximum": u64::MAX},
            ],
        }},
    });
    if !all.is_empty() {
        event["allOf"] = Value::Array(all);
    }
    event
}

/// A schema requiring `leaf` at the JSON pointer `pointer` (objects all the way down).
fn at_pointer(pointer: &str, leaf: Value) -> Value {
    pointer
        .split('/')
        .skip(1)
        .map(|token| token.replace("~1", "/").replace("~0", "~"))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .fold(leaf, |inner, token| {
            json!({"type": "object", "required": [token], "properties": {token: inner}})
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(yaml: &str) -> StreamSettings {
        let settings = sluice_core::PipelineSettings::from_yaml(&format!(
            "streams:\n  - {}",
            yaml.replace('\n', "\n    ")
        ))
        .expect("settings");
        settings.streams[0].clone()
    }

    fn template() -> Value {
        serde_json::to_value(crate::http::openapi()).expect("json")
    }

    fn served<'a>(streams: &'a [&'a StreamSettings], api_keys: bool) -> Served<'a> {
        Served {
            streams,
            messages_stream: "messages",
            work_max_ms: 250,
            max_batch_events: 7,
            api_keys,
        }
    }

    #[test]
    fn each_stream_has_its_publish_operation_and_the_names_are_an_enum() {
        let visit = stream("name: visit\nkey: /user/id\n");
        let orders = stream("name: orders\n");
        let doc = complete(template(), &served(&[&visit, &orders], false));
        let paths = doc["paths"].as_object().expect("paths");
        assert!(!paths.contains_key(PUBLISH_TEMPLATE));
        let post = &paths["/v1/streams/visit/events"]["post"];
        assert_eq!(post["operationId"], "publish_visit");
        let names: Vec<&str> = post["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert!(!names.contains(&"stream"), "{names:?}");
        assert!(
            !names.contains(&"x-sluice-key"),
            "a keyed stream: {names:?}"
        );
        let unkeyed = &paths["/v1/streams/orders/events"]["post"]["parameters"];
        assert!(unkeyed.to_string().contains("x-sluice-key"));
        let body = &post["requestBody"]["content"]["application/json"]["schema"]["oneOf"];
        assert_eq!(body[1]["maxItems"], 7);
        assert_eq!(
            body[0]["allOf"][0],
            json!({"type": "object", "required": ["user"], "properties": {"user":
                {"type": "object", "required": ["id"], "properties": {"id":
                    {"type": ["string", "number", "boolean"]}}}}})
        );
        let record = &paths["/v1/streams/{stream}/records/{id}"]["get"]["parameters"][0];
        assert_eq!(record["schema"]["enum"], json!(["visit", "orders"]));
        // The workshop path of `visit` stays, with its body; `activity` and the chat do not.
        assert!(paths["/api/visit/v1/"]["post"]["requestBody"].is_object());
        assert!(!paths.contains_key("/api/activity/v1/"));
        assert!(!paths.contains_key("/v1/messages"));
        let work = doc["paths"]["/v1/work"]["post"]["parameters"][0].clone();
        assert_eq!(
            (work["in"].as_str(), work["required"].as_bool()),
            (Some("query"), Some(true))
        );
        assert_eq!(work["schema"]["maximum"], 250);
        assert!(doc.get("security").is_none());
    }

    #[test]
    fn required_keys_add_the_schemes_and_a_401_everywhere() {
        let messages = stream("name: messages\nkey: /touser\n");
        let doc = complete(template(), &served(&[&messages], true));
        assert!(doc["paths"]["/v1/messages"].is_object());
        assert_eq!(doc["security"], json!([{"bearer": []}, {"apiKey": []}]));
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("item") {
                assert!(
                    op["responses"]["401"].is_object(),
                    "{method} {path} does not list 401"
                );
            }
        }
    }

    #[test]
    fn an_event_schema_keeps_the_stream_schema_and_the_id_rules() {
        let s = stream("name: points\nschema: {type: object, required: [lat]}\n");
        let event = event_schema(&s);
        assert_eq!(
            event["allOf"],
            json!([{"type": "object", "required": ["lat"]}])
        );
        let id = &event["properties"]["id"]["oneOf"][0];
        assert_eq!(id["maxLength"], MAX_ID_LEN);
        let escaped = at_pointer("/a~1b/c~0d", json!(true));
        assert_eq!(escaped["required"], json!(["a/b"]));
        assert_eq!(escaped["properties"]["a/b"]["required"], json!(["c~d"]));
    }
}
