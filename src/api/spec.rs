//! The route table: every route's method, path, scope and documentation declared once, so
//! the router, the scope checks and `/openapi.json` are built from the same lines.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::handler::Handler;
use axum::http::Method;
use axum::middleware::from_fn_with_state;
use axum::routing::{on, MethodFilter};
use axum::Router;
use serde_json::{json, Map, Value};

use super::auth::{self, Auth};
use crate::app::Context;
use crate::domain::Scope;

/// What one operation is, for callers and for the spec.
#[derive(Debug, Clone)]
pub struct Op {
    pub tag: &'static str,
    pub summary: &'static str,
    /// `None`: open to anyone.
    pub scope: Option<Scope>,
    /// Query parameters: (name, description).
    pub query: &'static [(&'static str, &'static str)],
    /// The request body's schema (a name under `components.schemas`).
    pub body: Option<&'static str>,
    /// The success status, and the response schema (if JSON).
    pub ok: (u16, Option<&'static str>),
    /// The success body's media type when it is not JSON.
    pub media: Option<&'static str>,
}

impl Op {
    pub fn new(tag: &'static str, summary: &'static str, scope: Option<Scope>) -> Self {
        Self {
            tag,
            summary,
            scope,
            query: &[],
            body: None,
            ok: (200, None),
            media: None,
        }
    }
    pub fn query(mut self, params: &'static [(&'static str, &'static str)]) -> Self {
        self.query = params;
        self
    }
    pub fn body(mut self, schema: &'static str) -> Self {
        self.body = Some(schema);
        self
    }
    pub fn ok(mut self, status: u16, schema: Option<&'static str>) -> Self {
        self.ok = (status, schema);
        self
    }
    pub fn media(mut self, media: &'static str) -> Self {
        self.media = Some(media);
        self
    }
}

/// Builds the router and the spec together.
pub struct Api {
    router: Router<Context>,
    auth: Arc<Auth>,
    ops: Vec<(Method, &'static str, Op)>,
}

impl Api {
    pub fn new(auth: Arc<Auth>) -> Self {
        Self {
            router: Router::new(),
            auth,
            ops: Vec::new(),
        }
    }

    /// Adds one operation: its handler, behind its scope check, and its spec entry.
    pub fn route<H, T>(mut self, method: Method, path: &'static str, op: Op, handler: H) -> Self
    where
        H: Handler<T, Context>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone())
            .unwrap_or_else(|_| panic!("unsupported method {method}"));
        let mut route = on(filter, handler);
        if let Some(scope) = op.scope {
            route = route.route_layer(from_fn_with_state(
                (self.auth.clone(), scope),
                auth::require,
            ));
        }
        self.router = self.router.route(path, route);
        self.ops.push((method, path, op));
        self
    }

    pub fn get<H: Handler<T, Context>, T: 'static>(self, path: &'static str, op: Op, h: H) -> Self {
        self.route(Method::GET, path, op, h)
    }
    pub fn post<H: Handler<T, Context>, T: 'static>(
        self,
        path: &'static str,
        op: Op,
        h: H,
    ) -> Self {
        self.route(Method::POST, path, op, h)
    }
    pub fn put<H: Handler<T, Context>, T: 'static>(self, path: &'static str, op: Op, h: H) -> Self {
        self.route(Method::PUT, path, op, h)
    }
    pub fn patch<H: Handler<T, Context>, T: 'static>(
        self,
        path: &'static str,
        op: Op,
        h: H,
    ) -> Self {
        self.route(Method::PATCH, path, op, h)
    }
    pub fn delete<H: Handler<T, Context>, T: 'static>(
        self,
        path: &'static str,
        op: Op,
        h: H,
    ) -> Self {
        self.route(Method::DELETE, path, op, h)
    }

    /// The router and the OpenAPI document of exactly its routes.
    pub fn finish(self) -> (Router<Context>, Value) {
        let spec = openapi(&self.ops);
        (self.router, spec)
    }
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn operation(method: &Method, path: &str, op: &Op) -> Value {
    let mut params: Vec<Value> = path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    params.extend(op.query.iter().map(|(name, description)| {
        json!({"name": name, "in": "query", "required": false,
               "description": description, "schema": {"type": "string"}})
    }));
    let mut o = Map::new();
    o.insert("tags".into(), json!([op.tag]));
    o.insert("summary".into(), json!(op.summary));
    o.insert(
        "operationId".into(),
        json!(format!(
            "{}{}",
            method.as_str().to_lowercase(),
            path.replace(['/', '{', '}', '-'], "_")
        )),
    );
    if !params.is_empty() {
        o.insert("parameters".into(), json!(params));
    }
    if let Some(body) = op.body {
        o.insert(
            "requestBody".into(),
            json!({"required": true, "content": {"application/json": {"schema": schema_ref(body)}}}),
        );
    }
    let mut responses = Map::new();
    let ok = match (op.media, op.ok.1) {
        (Some(media), _) => {
            json!({"description": "success", "content": {media: {"schema": {"type": "string"}}}})
        }
        (None, Some(schema)) => {
            json!({"description": "success", "content": {"application/json": {"schema": schema_ref(schema)}}})
        }
        (None, None) => json!({"description": "success"}),
    };
    responses.insert(op.ok.0.to_string(), ok);
    let error = json!({"description": "error", "content": {"application/json": {"schema": schema_ref("Error")}}});
    let mut errors = vec!["500"];
    if op.body.is_some() || !op.query.is_empty() {
        errors.extend(["400", "422"]);
    }
    if path.contains('{') {
        errors.push("404");
    }
    if let Some(scope) = op.scope {
        errors.extend(["401", "403", "429"]);
        o.insert("security".into(), json!([{"bearer": [scope.as_str()]}]));
        o.insert("x-required-scope".into(), json!(scope.as_str()));
    }
    for code in errors {
        responses.insert(code.into(), error.clone());
    }
    o.insert("responses".into(), Value::Object(responses));
    Value::Object(o)
}

fn openapi(ops: &[(Method, &'static str, Op)]) -> Value {
    let mut paths: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
    for (method, path, op) in ops {
        paths
            .entry(path)
            .or_default()
            .insert(method.as_str().to_lowercase(), operation(method, path, op));
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "herald",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Notification delivery: events, campaigns, delivery logs. \
                Send `Authorization: Bearer <key>`; each operation names the scope it needs \
                (`admin` may do everything).",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
    })
}

/// The shapes of the main bodies (the handlers parse them; these describe them).
fn schemas() -> Value {
    let string = json!({"type": "string"});
    let time = json!({"type": "string", "format": "date-time"});
    let status = json!({"type": "string", "enum": ["queued", "sending", "sent", "failed", "retrying", "dead", "skipped", "deferred"]});
    let channel = json!({"type": "string", "enum": ["email", "sms", "push", "webhook"]});
    json!({
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string", "description": "stable, for programs"},
                "message": {"type": "string", "description": "for people"},
                "details": {"type": "array", "items": {"type": "object", "properties": {
                    "field": string, "message": string}}}}}}},
        "Event": {"type": "object", "required": ["event_type", "recipients"], "properties": {
            "event_id": {"type": "string", "description": "UUID; a repeat returns the original answer"},
            "event_type": string,
            "priority": {"type": "string", "enum": ["high", "normal", "low"]},
            "recipients": {"type": "object", "properties": {
                "user_ids": {"type": "array", "items": string},
                "group_id": string,
                "segment": {"type": "object", "properties": {"locale": string, "tag": string}}}},
            "channels": {"type": "array", "items": channel},
            "payload": {"type": "object"},
            "send_at": time}},
        "Accepted": {"type": "object", "properties": {"notification_id": string, "status": string}},
        "Notification": {"type": "object", "properties": {
            "notification_id": string, "event_id": string, "event_type": string,
            "priority": string, "status": string, "created_at": time, "send_at": time,
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}}}},
        "Delivery": {"type": "object", "properties": {
            "delivery_id": string, "notification_id": string, "event_type": string,
            "user_id": string, "channel": channel, "priority": string, "schedule_id": string,
            "status": status, "reason": string, "provider": string,
            "attempts": {"type": "integer"}, "last_error": string,
            "created_at": time, "updated_at": time, "sent_at": time}},
        "DeliveryDetail": {"allOf": [{"$ref": "#/components/schemas/Delivery"}, {"type": "object",
            "properties": {"attempt_log": {"type": "array", "items": {"type": "object", "properties": {
                "attempt_id": string, "provider": string, "status": status,
                "started_at": time, "finished_at": time, "duration_ms": {"type": "integer"},
                "error": string, "response": {"type": "object"}}}}}}]},
        "DeliveryPage": {"type": "object", "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Delivery"}},
            "next_cursor": {"type": "string", "nullable": true,
                "description": "pass as `cursor` for the next page; null on the last"}}},
        "Stats": {"type": "object", "properties": {
            "since": time, "until": time, "resolution": string,
            "group_by": {"type": "array", "items": string},
            "total": {"type": "integer"},
            "rows": {"type": "array", "items": {"type": "object", "description": "the group_by dimensions and `count`"}},
            "channels": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                "sent": {"type": "integer"}, "failed": {"type": "integer"}, "dead": {"type": "integer"},
                "skipped": {"type": "integer"}, "pending": {"type": "integer"},
                "success_rate": {"type": "number", "nullable": true},
                "send_latency_ms": {"type": "object", "properties": {
                    "p50": {"type": "integer"}, "p90": {"type": "integer"}, "p99": {"type": "integer"}}}}}}}},
        "Schedule": {"type": "object", "required": ["cron", "timezone", "event_type", "recipients"], "properties": {
            "name": string, "cron": {"type": "string", "description": "5 fields, or @daily etc."},
            "timezone": {"type": "string", "description": "IANA zone, e.g. Europe/Berlin"},
            "start_at": time, "end_at": time, "event_type": string,
            "priority": {"type": "string", "enum": ["high", "normal", "low"]},
            "recipients": {"type": "object"}, "channels": {"type": "array", "items": channel},
            "payload": {"type": "object"},
            "misfire_policy": {"type": "string", "enum": ["skip", "fire_once", "fire_all"]}}},
        "User": {"type": "object", "properties": {
            "email": string, "phone": string, "push_tokens": {"type": "array", "items": string},
            "tags": {"type": "array", "items": string}, "first_name": string, "last_name": string,
            "locale": string, "timezone": string, "preferences": {"type": "object"}}},
        "Group": {"type": "object", "properties": {"name": string, "user_ids": {"type": "array", "items": string}}},
        "Template": {"type": "object", "required": ["source"], "properties": {"locale": string, "part": string, "source": string}},
        "TemplatePreview": {"type": "object", "properties": {"event_type": string, "channel": channel,
            "locale": string, "payload": {"type": "object"}, "user": {"type": "object"},
            "content": {"type": "array"},
            "draft": {"type": "object", "description": "unsaved parts (the Template fields) to render instead of the stored ones"}}},
        "DeadLetter": {"type": "object", "properties": {"dead_letter_id": string, "delivery_id": string,
            "notification_id": string, "channel": channel, "status": status, "reason": string,
            "last_error": string, "attempts": {"type": "integer"}, "created_at": time, "replayed_at": time}},
        "CronPreview": {"type": "object", "required": ["cron"], "properties": {
            "cron": string, "timezone": string, "start_at": time, "end_at": time,
            "count": {"type": "integer", "minimum": 1, "maximum": 100}}},
        "ReplayFilter": {"type": "object", "properties": {"notification_id": string, "channel": channel, "reason": string}},
        "NewKey": {"type": "object", "required": ["name", "scopes"], "properties": {"name": string,
            "scopes": {"type": "array", "items": {"type": "string", "enum": ["events:write", "campaigns:write", "logs:read", "admin"]}},
            "rate_per_sec": {"type": "number"}}},
        "Key": {"type": "object", "properties": {"key_id": string, "name": string,
            "scopes": {"type": "array", "items": string}, "rate_per_sec": {"type": "number"},
            "created_at": time, "revoked_at": time,
            "key": {"type": "string", "description": "only in the answer to its creation"}}},
        "Object": {"type": "object"},
    })
}
