//! API errors: a stable code and a clear message for the client; the cause chain for the logs.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::domain::FieldError;

/// An error answer: `{"error": {"code", "message", "details"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<FieldError>,
    /// Logged, never sent.
    pub cause: Option<anyhow::Error>,
    /// Sent as `Retry-After` (seconds).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            cause: None,
            retry_after: None,
        }
    }

    /// The same error, telling the client when to try again.
    pub fn retry_after(self, secs: u64) -> Self {
        Self {
            retry_after: Some(secs.max(1)),
            ..self
        }
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "{what} `{}` does not exist",
                crate::domain::truncate(id, 64)
            ),
        )
    }

    pub fn validation(details: Vec<FieldError>) -> Self {
        let message = match details.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            many => format!("{} fields are invalid", many.len()),
        };
        Self {
            details,
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                message,
            )
        }
    }

    pub fn internal(cause: anyhow::Error) -> Self {
        Self {
            cause: Some(cause),
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "something went wrong on our side; it has been logged",
            )
        }
    }

    pub fn unavailable(cause: anyhow::Error) -> Self {
        Self {
            cause: Some(cause),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                "the database cannot take this right now; nothing was written, try again",
            )
        }
    }
}

/// A handler that panicked: 500 `internal_error`, with the panic's message logged as its
/// cause. The process and the other requests go on.
pub fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = crate::supervise::panic_message(&*panic);
    ApiError::internal(anyhow::anyhow!("the handler panicked: {what}")).into_response()
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        // A failure of the moment (the database unreachable, or the documents held by
        // another transaction) is worth a retry by the client.
        if crate::batch::is_temporary(&e) {
            Self::unavailable(e)
        } else {
            Self::internal(e)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Some(cause) = &self.cause {
            // The one place an API failure is logged, with its whole cause chain.
            tracing::error!(
                code = self.code,
                error = format!("{cause:#}"),
                "request failed"
            );
        }
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if !self.details.is_empty() {
            body["error"]["details"] = json!(self.details);
        }
        let mut response = (self.status, Json(body)).into_response();
        // Every 503 says when to come back; a 429 says so through `retry_after`.
        let retry_after = self
            .retry_after
            .or((self.status == StatusCode::SERVICE_UNAVAILABLE).then_some(1));
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

/// Reads the whole body (bounded) so that every body error has herald's error shape.
pub async fn read_body(req: Request, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is over {limit} bytes"),
            )
        })
}

/// A JSON body whose every rejection is an `ApiError` (malformed JSON, wrong shape, too big).
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(1024 * 1024, |l| l.0);
        let bytes = read_body(req, limit).await?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("the body is not valid JSON: {e}"),
            )
        })?;
        serde_json::from_value(value)
            .map(JsonBody)
            .map_err(|e| ApiError::validation(vec![FieldError::new("body", e.to_string())]))
    }
}

/// Query parameters whose every rejection is an `ApiError` (unknown or malformed field).
pub struct QueryParams<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for QueryParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| QueryParams(q.0))
            .map_err(|e| ApiError::validation(vec![FieldError::new("query", e.body_text())]))
    }
}

/// The configured body limit, put on each request by the router.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);
