//! The OpenAPI document, derived from the code.
//!
//! Every route is registered through `utoipa_axum::routes!` (see
//! `crate::routes`), which takes its path, methods and operation from the
//! handler's `#[utoipa::path]`; the schemas come from the request and answer
//! types (`#[derive(ToSchema)]`, in this crate and in
//! `taskhost_common::model` / `tasks`). This module holds what is not any
//! one handler's: the document's info, tags and security scheme, the error
//! body and the shared error responses, the answers every `/api/v1` route or
//! every route with a body can give ([`finish`]), and the few JSON Schema
//! rules utoipa has no attribute for (fields that exclude each other).
//!
//! To document a new route: annotate its handler with `#[utoipa::path]`
//! (`operation_id`, `tag`, `responses` for its own statuses; 401, 429, 500
//! and 503 of `/api/v1`, and 400 and 413 of a body, are added here), derive
//! `ToSchema` on what it takes and answers, and register it with
//! `routes!(module::handler)` in `crate::routes`. `api/openapi.json` is
//! then regenerated with `taskhost openapi > api/openapi.json`.

use std::sync::OnceLock;

use serde::Serialize;
use serde_json::{Value, json};
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{OpenApi, ToSchema};

/// The body of every error the API itself answers.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Error)]
pub(crate) struct ErrorBody {
    /// Always `false`.
    #[schema(schema_with = always_false)]
    pub(crate) success: bool,
    pub(crate) error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable machine-readable code: `bad_request` 400, `invalid` 422,
    /// `unauthorized` 401, `forbidden` 403, `not_found` 404,
    /// `method_not_allowed` 405, `conflict` 409, `too_large` 413,
    /// `rate_limited` 429, `unavailable` 503, `internal` 500.
    #[schema(schema_with = error_codes)]
    pub(crate) code: &'static str,
    /// Human-readable explanation; internals are never shown (a 500 says
    /// only `internal error`).
    pub(crate) message: String,
}

/// Every `error.code` the api answers (`crate::error`, and the 405 of
/// `crate::json_errors`).
pub(crate) const ERROR_CODES: &[&str] = &[
    "bad_request",
    "invalid",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "conflict",
    "too_large",
    "rate_limited",
    "unavailable",
    "internal",
];

fn error_codes() -> utoipa::openapi::schema::Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(ERROR_CODES.iter().copied()))
        .build()
}

fn always_false() -> utoipa::openapi::schema::Object {
    ObjectBuilder::new()
        .schema_type(Type::Boolean)
        .enum_values(Some([false]))
        .build()
}

/// `{"success": true}`, the start of every successful JSON answer.
pub(crate) fn always_true() -> utoipa::openapi::schema::Object {
    ObjectBuilder::new()
        .schema_type(Type::Boolean)
        .enum_values(Some([true]))
        .build()
}

/// A shared error response (`#/components/responses/<Name>`), with an
/// example of its body.
macro_rules! error_response {
    ($(#[$meta:meta])* $name:ident, $code:literal, $description:literal, $example:literal) => {
        $(#[$meta])*
        pub(crate) struct $name;

        impl<'r> utoipa::ToResponse<'r> for $name {
            fn response() -> (&'r str, RefOr<Response>) {
                (stringify!($name), error_response($code, $description, $example))
            }
        }
    };
}

fn error_response(code: &str, description: &str, example: &str) -> RefOr<Response> {
    let mut response = ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Error")))
            .example(Some(
                json!({ "success": false, "error": { "code": code, "message": example } }),
            ))
            .build(),
    );
    let retry_after = match code {
        "rate_limited" => Some("Seconds to wait before retrying."),
        "unavailable" => Some("Seconds to wait before retrying (1)."),
        _ => None,
    };
    if let Some(description) = retry_after {
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(1)),
                ))
                .description(Some(description))
                .build(),
        );
    }
    response.build().into()
}

error_response!(
    /// 400.
    BadRequest,
    "bad_request",
    "Malformed request: the body is not JSON (or empty), or a header is malformed.",
    "body is not valid JSON: expected value at line 1 column 1"
);
error_response!(
    /// 401.
    Unauthorized,
    "unauthorized",
    "Missing, malformed, unknown or revoked API key.",
    "a valid API key is required (Authorization: Bearer <key>)"
);
error_response!(
    /// 403.
    Forbidden,
    "forbidden",
    "The key's roles do not allow this.",
    "execution mode `inline` needs one of the roles: debug"
);
error_response!(
    /// 404.
    NotFound,
    "not_found",
    "Not found, or not yours (a malformed id also answers 404).",
    "job not found"
);
error_response!(
    /// 409.
    Conflict,
    "conflict",
    "Conflicts with the current state.",
    "Idempotency-Key was already used with a different request body"
);
error_response!(
    /// 413.
    TooLarge,
    "too_large",
    "The body is larger than `api.max_body_bytes` (default 256 KiB).",
    "request body is larger than 262144 bytes"
);
error_response!(
    /// 422.
    Invalid,
    "invalid",
    "The body or query is well-formed but a field is wrong, missing or unknown; the message names it.",
    "jobName: must not be empty"
);
error_response!(
    /// 429.
    RateLimited,
    "rate_limited",
    "The key spent its request budget (`api.rate_limit_per_sec`, `api.rate_limit_burst`); `Retry-After` says when to try again.",
    "too many requests for this key; retry in 1 ms"
);
error_response!(
    /// 500.
    Internal,
    "internal",
    "An unexpected failure; logged on the server, not shown.",
    "internal error"
);
error_response!(
    /// 503.
    Unavailable,
    "unavailable",
    "A dependency (the database) is down, or the request took longer than 30 s; try again shortly.",
    "the database is unavailable, try again shortly"
);

/// The document's parts that belong to no one handler.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "taskhost API",
        description = "Distributed job runner: submit jobs, read results, manage recurring tasks.

JSON over HTTP; field names are camelCase; integers are written without a fraction (`3`, not `3.0`, which answers 422).

**Authentication:** every `/api/v1` route needs `Authorization: Bearer <key>` (keys look like `thk_<8 hex>_<48 hex>`, made with `taskhost keys create`); `/livez`, `/readyz`, `/metrics`, `/openapi.json`, `/docs` and `/dashboard` are open. On `/docs`, press **Authorize** and paste the key.

**Errors** answer `{\"success\": false, \"error\": {\"code\", \"message\"}}`: 400 `bad_request` (not JSON), 422 `invalid` (a wrong, missing or unknown field or query parameter), 401 `unauthorized`, 403 `forbidden`, 404 `not_found` (also for another user's job, a malformed id, or an unknown route), 409 `conflict`, 413 `too_large`, 429 `rate_limited`, 503 `unavailable`, 500 `internal`. A method a route does not support answers 405 `method_not_allowed` with an `Allow` header.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    servers((url = "/", description = "This server")),
    tags(
        (name = "jobs", description = "Submit jobs, read and delete your results, cancel, re-run."),
        (name = "tasks", description = "Recurring tasks: CRUD, schedule, history, run now."),
        (name = "nodes", description = "The worker node registry."),
        (name = "changes", description = "The change feed and its consumers (admin)."),
        (name = "console", description = "The operator console: the system at a glance, who the key is, live events."),
        (name = "webhooks", description = "Notification webhooks and their delivery log (admin)."),
        (name = "operations", description = "Health, readiness, metrics and this documentation (open)."),
    ),
    components(
        // `LiveEvent`: the data of the event stream's `change` events, which
        // no JSON answer carries.
        schemas(ErrorBody, crate::live::LiveEvent),
        responses(
            BadRequest,
            Unauthorized,
            Forbidden,
            NotFound,
            Conflict,
            TooLarge,
            Invalid,
            RateLimited,
            Internal,
            Unavailable
        )
    ),
    modifiers(&Security)
)]
pub(crate) struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearerAuth",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("thk_<8 hex>_<48 hex>")
                    .description(Some(
                        "An API key created with `taskhost keys create`; its roles (debug, \
                         task_manager, system_admin, site_admin) decide what it may do.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as JSON text, built once.
pub fn json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut text = serde_json::to_string_pretty(&document()).unwrap_or_else(|e| {
            // Serializing a `Value` cannot fail; say so if it ever does.
            format!("{{\"error\": \"the OpenAPI document could not be written: {e}\"}}")
        });
        text.push('\n');
        text
    })
}

/// The whole document: [`ApiDoc`], every route of [`crate::routes`], then
/// [`finish`].
pub fn document() -> Value {
    let (_, api) = crate::routes(None).split_for_parts();
    let mut doc = serde_json::to_value(api).unwrap_or(Value::Null);
    finish(&mut doc);
    doc
}

/// An optional body (`request_body = Option<T>`) may be left out; when it
/// is sent it is an object (`crate::jobs::parse_json`), never `null`, so
/// its schema is `T` alone.
fn optional_body_is_not_null(body: &mut Value) {
    if body["required"] == Value::Bool(true) {
        return;
    }
    let Some(content) = body["content"].as_object_mut() else {
        return;
    };
    for media in content.values_mut() {
        let schema = &mut media["schema"];
        let not_null = schema["oneOf"].as_array().and_then(|alts| {
            let rest: Vec<&Value> = alts.iter().filter(|a| a["type"] != "null").collect();
            (rest.len() == 1 && alts.len() == 2).then(|| rest[0].clone())
        });
        if let Some(one) = not_null {
            *schema = one;
        }
    }
}

/// Renames a component schema and every reference to it.
fn rename_schema(doc: &mut Value, from: &str, to: &str) {
    fn refs(v: &mut Value, from: &str, to: &str) {
        match v {
            Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    if k == "$ref" && child.as_str() == Some(from) {
                        *child = Value::from(to);
                    } else {
                        refs(child, from, to);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|c| refs(c, from, to)),
            _ => {}
        }
    }
    let Some(schemas) = doc["components"]["schemas"].as_object_mut() else {
        return;
    };
    if let Some(schema) = schemas.remove(from) {
        schemas.insert(to.to_owned(), schema);
    }
    refs(
        doc,
        &format!("#/components/schemas/{from}"),
        &format!("#/components/schemas/{to}"),
    );
}

const HTTP_METHODS: &[&str] = &["get", "put", "post", "delete", "patch"];

fn response_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/responses/{name}") })
}

/// What no one handler says:
///
/// - `/api/v1` needs a key (the `Caller` extractor): 401, and 429 (the
///   per-key budget, `crate::ratelimit`), and like every handler that
///   reads Postgres 500 and 503 (also `crate::health`'s fast 503). Other
///   routes are open (`security: []`).
/// - A body is read by `crate::jobs::parse_json` (400 for not JSON) under
///   `DefaultBodyLimit` (413).
/// - A path id that names nothing (or is malformed) answers 404.
/// - The rules between fields that utoipa has no attribute for.
fn finish(doc: &mut Value) {
    doc["security"] = json!([{ "bearerAuth": [] }]);
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            let keyed = path.starts_with("/api/v1/");
            for method in HTTP_METHODS {
                let Some(op) = item.get_mut(*method) else {
                    continue;
                };
                let mut add = Vec::new();
                if keyed {
                    add.extend([
                        ("401", "Unauthorized"),
                        ("429", "RateLimited"),
                        ("500", "Internal"),
                        ("503", "Unavailable"),
                    ]);
                } else {
                    op["security"] = json!([]);
                }
                if let Some(body) = op.get_mut("requestBody") {
                    add.extend([("400", "BadRequest"), ("413", "TooLarge")]);
                    optional_body_is_not_null(body);
                }
                if path.contains('{') {
                    add.push(("404", "NotFound"));
                }
                if let Some(responses) = op["responses"].as_object_mut() {
                    for (status, name) in add {
                        responses
                            .entry(status)
                            .or_insert_with(|| response_ref(name));
                    }
                    responses.sort_keys();
                }
            }
        }
    }
    // `ChangeEntryOf<D>` is generic (its rows are decoded or raw); the api
    // answers it decoded.
    rename_schema(doc, "ChangeEntry_Value", "ChangeEntry");
    let schemas = &mut doc["components"]["schemas"];
    // `taskhost_common::model::validate_target`: one node by id, or a
    // group and/or role.
    if let Some(target) = schemas.get_mut("TargetRequest") {
        target["not"] = json!({
            "anyOf": [
                { "required": ["nodeId", "nodeGroup"], "properties": { "nodeId": { "type": "string" }, "nodeGroup": { "type": "string" } } },
                { "required": ["nodeId", "nodeRole"], "properties": { "nodeId": { "type": "string" }, "nodeRole": { "type": "string" } } }
            ]
        });
    }
    // `taskhost_common::tasks`: the same for a task's assignment.
    if let Some(update) = schemas.get_mut("TaskUpdate") {
        update["not"] = json!({
            "anyOf": [
                { "required": ["assignedNodeId", "assignedNodeGroup"], "properties": { "assignedNodeId": { "type": "string" }, "assignedNodeGroup": { "type": "string" } } },
                { "required": ["assignedNodeId", "assignedNodeRole"], "properties": { "assignedNodeId": { "type": "string" }, "assignedNodeRole": { "type": "string" } } }
            ]
        });
    }
    // An inline job or task runs only a built-in (`INLINE_COMMANDS`).
    let builtins = taskhost_common::model::INLINE_COMMANDS.join("|");
    let inline_aliases: Vec<&str> = taskhost_common::model::ExecutionMode::INPUTS
        .iter()
        .copied()
        .filter(|m| m.parse() == Ok(taskhost_common::model::ExecutionMode::Inline))
        .collect();
    for name in ["SubmitJob", "TaskUpdate"] {
        if let Some(schema) = schemas.get_mut(name) {
            schema["if"] = json!({
                "required": ["executionMode"],
                "properties": { "executionMode": { "enum": inline_aliases } }
            });
            schema["then"] = json!({
                "properties": { "command": { "pattern": format!(r"^\s*({builtins})\s*$") } }
            });
        }
    }
    // A new task: `taskhost_common::tasks::Task::from_request_with` needs
    // these three; the rest take their defaults.
    if let Some(update) = schemas.get("TaskUpdate").cloned() {
        let mut create = update;
        create["required"] = json!(["taskName", "command", "schedule"]);
        create["description"] = json!(
            "Body of `POST /api/v1/tasks`: `taskName`, `command` and `schedule` are required; \
             the rest take their defaults. Optional fields may be null (same as absent). \
             Unknown fields are refused with 422; `assignedNodeId` cannot be combined with \
             `assignedNodeGroup` or `assignedNodeRole`."
        );
        create["example"] = json!({
            "taskName": "nightly-report",
            "appName": "reports",
            "command": "echo report",
            "schedule": "0 2 * * *",
            "timezone": "UTC",
            "assignedNodeGroup": "default",
            "timeoutSeconds": 600
        });
        schemas["TaskCreate"] = create;
    }
    if let Some(schemas) = schemas.as_object_mut() {
        schemas.sort_keys();
    }
}

/// The masked secret environment of a job or task: its names, each with
/// `***`, or null when it has none.
pub(crate) fn secret_names() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{AdditionalProperties, SchemaType};
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Object, Type::Null]))
        .additional_properties(Some(AdditionalProperties::RefOr(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["***"]))
                .into(),
        )))
        .description(Some(
            "The secret variables' names, each with `***` (values are never shown); null when none.",
        ))
        .examples([json!({ "TOKEN": "***" })])
        .build()
}

// Path parameters, shared by the routes that take them. Only their
// OpenAPI form is used: handlers read ids as text (`crate::path`), so a
// malformed one is their own 404.

/// `{jobId}`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct JobIdPath {
    /// The job id (UUID). A malformed id answers 404.
    #[param(rename = "jobId")]
    job_id: uuid::Uuid,
}

/// `{taskId}`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct TaskIdPath {
    /// The task id (UUID). A malformed id answers 404. The built-in
    /// `diagnostics` task is 00000000-0000-7000-8000-000000000001.
    #[param(rename = "taskId", example = "00000000-0000-7000-8000-000000000001")]
    task_id: uuid::Uuid,
}

/// `{webhookId}`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct WebhookIdPath {
    /// The webhook id (UUID). A malformed id answers 404.
    #[param(rename = "webhookId")]
    webhook_id: uuid::Uuid,
}

/// `{nodeId}`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct NodeIdPath {
    /// The node id (UUID). A malformed id answers 404.
    #[param(rename = "nodeId")]
    node_id: uuid::Uuid,
}

/// `{taskId}` and `{historyId}`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct HistoryPath {
    /// The task id (UUID). A malformed id answers 404.
    #[param(rename = "taskId")]
    task_id: uuid::Uuid,
    /// A history entry's `historyId` (from `GET /api/v1/tasks/{taskId}/history`).
    /// A malformed id, or one of another task, answers 404.
    #[param(rename = "historyId")]
    history_id: i64,
}

/// The body of `POST /tasks`: a [`TaskRequest`] with `taskName`, `command`
/// and `schedule` required ([`finish`] writes its schema). Only its OpenAPI
/// form is used.
///
/// [`TaskRequest`]: taskhost_common::tasks::TaskRequest
#[derive(ToSchema)]
#[schema(as = TaskCreate)]
#[allow(dead_code)]
pub(crate) struct TaskCreateBody(taskhost_common::tasks::TaskRequest);
