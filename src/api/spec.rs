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
use utoipa::openapi::path::ParameterIn;
use utoipa::{IntoParams, PartialSchema, ToSchema};

use super::auth::{self, Auth};
use super::error::ErrorBody;
use super::routes::inbox::session::{self, Sessions};
use crate::app::Context;
use crate::domain::Scope;

/// What one operation is, for callers and for the spec: every schema in it comes from
/// the Rust type that parses or serializes that part of the exchange.
#[derive(Debug, Clone)]
pub struct Op {
    pub tag: &'static str,
    pub summary: &'static str,
    /// `None`: open to anyone (or, with `session`, to an inbox session's user).
    pub scope: Option<Scope>,
    /// An end user's inbox session token, not an API key.
    session: bool,
    /// Path and query parameter objects.
    params: Vec<Value>,
    /// The request body: its media types, each with a schema.
    body: Vec<(&'static str, Value)>,
    /// Success answers: status, and the body's media type and schema (none: no body).
    answers: Vec<(u16, Option<(&'static str, Value)>)>,
    /// Error statuses the handler answers besides those the other parts imply.
    errors: Vec<u16>,
    /// Every named schema the operation refers to.
    components: Vec<(String, Value)>,
}

/// `T`'s schema and every named schema it refers to.
fn components<T: ToSchema>() -> Vec<(String, Value)> {
    let mut deps = Vec::new();
    T::schemas(&mut deps);
    std::iter::once((T::name().into_owned(), to_json(T::schema())))
        .chain(deps.into_iter().map(|(name, s)| (name, to_json(s))))
        .collect()
}

fn to_json<T: serde::Serialize>(v: T) -> Value {
    serde_json::to_value(v).unwrap_or_else(|e| panic!("an OpenAPI part does not serialize: {e}"))
}

impl Op {
    pub fn new(tag: &'static str, summary: &'static str, scope: Option<Scope>) -> Self {
        Self {
            tag,
            summary,
            scope,
            session: false,
            params: Vec::new(),
            body: Vec::new(),
            answers: Vec::new(),
            errors: Vec::new(),
            components: Vec::new(),
        }
    }

    /// A reference to `T`'s schema, with `T` and what it refers to among the components.
    fn refer<T: ToSchema>(&mut self) -> Value {
        self.components.extend(components::<T>());
        json!({"$ref": format!("#/components/schemas/{}", T::name())})
    }

    /// Needs an inbox session token (`Authorization: Bearer <token>`): the handler gets
    /// its user.
    pub fn session(mut self) -> Self {
        self.session = true;
        self
    }

    /// The query parameters `T` parses.
    pub fn query<T: IntoParams>(mut self) -> Self {
        self.params.extend(
            T::into_params(|| Some(ParameterIn::Query))
                .into_iter()
                .map(to_json),
        );
        self
    }

    /// A path parameter parsed as `T` (others are plain strings).
    pub fn path<T: PartialSchema>(mut self, name: &'static str) -> Self {
        self.params
            .push(json!({"name": name, "in": "path", "required": true,
                                 "schema": to_json(T::schema())}));
        self
    }

    /// A required request header.
    pub fn header(mut self, name: &'static str, description: &'static str) -> Self {
        self.params
            .push(json!({"name": name, "in": "header", "required": true,
                                 "description": description, "schema": {"type": "string"}}));
        self
    }

    /// A JSON request body parsed as `T`.
    pub fn body<T: ToSchema>(mut self) -> Self {
        let schema = self.refer::<T>();
        self.body.push(("application/json", schema));
        self
    }

    /// A request body of `media` (a form) with the fields of `T`.
    pub fn body_as<T: ToSchema>(mut self, media: &'static str) -> Self {
        let schema = self.refer::<T>();
        self.body.push((media, schema));
        self
    }

    /// A request body of another media type: a string (matching `pattern`, if given).
    pub fn body_media(mut self, media: &'static str, pattern: Option<&'static str>) -> Self {
        let mut schema = json!({"type": "string"});
        if let Some(pattern) = pattern {
            schema["pattern"] = json!(pattern);
        }
        self.body.push((media, schema));
        self
    }

    /// A success answer with a JSON body serialized from `T`.
    pub fn ok<T: ToSchema>(mut self, status: u16) -> Self {
        let schema = self.refer::<T>();
        self.answers
            .push((status, Some(("application/json", schema))));
        self
    }

    /// A success answer without a body.
    pub fn empty(mut self, status: u16) -> Self {
        self.answers.push((status, None));
        self
    }

    /// A success answer of another media type, as a string.
    pub fn ok_media(mut self, status: u16, media: &'static str) -> Self {
        self.answers
            .push((status, Some((media, json!({"type": "string"})))));
        self
    }

    /// Error statuses the other parts do not imply (e.g. 409, 415).
    pub fn errors(mut self, statuses: &[u16]) -> Self {
        self.errors.extend_from_slice(statuses);
        self
    }
}

/// Builds the router and the spec together.
pub struct Api {
    router: Router<Context>,
    auth: Arc<Auth>,
    sessions: Arc<Sessions>,
    ops: Vec<(Method, &'static str, Op)>,
}

impl Api {
    pub fn new(auth: Arc<Auth>, sessions: Arc<Sessions>) -> Self {
        Self {
            router: Router::new(),
            auth,
            sessions,
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
        if op.session {
            route = route.route_layer(from_fn_with_state(self.sessions.clone(), session::require));
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

fn operation(method: &Method, path: &str, op: &Op) -> Value {
    let mut params: Vec<Value> = path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .filter(|name| !op.params.iter().any(|p| p["in"] == "path" && p["name"] == *name))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    params.extend(op.params.iter().cloned());
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
    if !op.body.is_empty() {
        let content: Map<String, Value> = op
            .body
            .iter()
            .map(|(media, schema)| ((*media).to_owned(), json!({"schema": schema})))
            .collect();
        o.insert(
            "requestBody".into(),
            json!({"required": true, "content": content}),
        );
    }
    let mut responses: BTreeMap<String, Value> = BTreeMap::new();
    for (status, body) in &op.answers {
        let answer = match body {
            Some((media, schema)) => {
                // A status with two bodies (a repeat of either kind of event) has either.
                let schema = match responses.get(&status.to_string()) {
                    Some(earlier) => {
                        json!({"oneOf": [earlier["content"][*media]["schema"], schema]})
                    }
                    None => schema.clone(),
                };
                json!({"description": "success", "content": {*media: {"schema": schema}}})
            }
            None => json!({"description": "success"}),
        };
        responses.insert(status.to_string(), answer);
    }
    // What the other parts imply: any operation can fail on our side or find the database
    // away; a body can be malformed, too large or invalid; parameters can be invalid; an
    // id can name nothing; a scope brings 401, 403 and 429.
    let mut errors = vec![500, 503];
    if !op.body.is_empty() {
        errors.extend([400, 413, 422]);
    }
    if !op.params.is_empty() {
        errors.push(422);
    }
    if path.contains('{') {
        errors.push(404);
    }
    if op.session {
        errors.extend([401, 429]);
        o.insert("security".into(), json!([{"inbox": []}]));
    }
    if let Some(scope) = op.scope {
        errors.extend([401, 403, 429]);
        o.insert("security".into(), json!([{"bearer": [scope.as_str()]}]));
        o.insert("x-required-scope".into(), json!(scope.as_str()));
    }
    errors.extend(&op.errors);
    let error = json!({"description": "error", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{}", ErrorBody::name())}}}});
    for code in errors {
        responses
            .entry(code.to_string())
            .or_insert_with(|| error.clone());
    }
    o.insert("responses".into(), json!(responses));
    Value::Object(o)
}

fn openapi(ops: &[(Method, &'static str, Op)]) -> Value {
    let mut paths: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
    let mut schemas: BTreeMap<String, Value> = components::<ErrorBody>().into_iter().collect();
    for (method, path, op) in ops {
        for (name, schema) in &op.components {
            // Two body types of one name would share one schema: the document would lie
            // about one of them (a programming error every test's start would catch).
            if let Some(earlier) = schemas.insert(name.clone(), schema.clone()) {
                assert!(
                    &earlier == schema,
                    "two types named {name} in the API document; rename one"
                );
            }
        }
        paths
            .entry(path)
            .or_default()
            .insert(method.as_str().to_lowercase(), operation(method, path, op));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "herald",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Notification delivery: events, campaigns, delivery logs. \
                Send `Authorization: Bearer <key>`; each operation names the scope it needs \
                (`admin` may do everything).",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "inbox": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                    "description": "an end user's inbox session token (POST /v1/inbox/session)"},
            },
            "schemas": schemas,
        },
    })
}
