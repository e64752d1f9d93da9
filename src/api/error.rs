//! API errors: a stable code and a clear message for the client; the cause chain for the logs.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

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

/// Every error answer's body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs (e.g. `validation_failed`, `not_found`, `unauthorized`).
    code: &'static str,
    /// For people.
    message: String,
    /// One entry per invalid field, when the request had invalid fields.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    details: Vec<FieldError>,
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
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                details: self.details,
            },
        };
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

/// Reads the whole body (bounded) so that every body error has herald's error shape:
/// 413 only for a body over the limit; one that could not be read (the client went away
/// mid-body, a broken chunked encoding) is 400 `body_unreadable`.
pub async fn read_body(req: Request, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| {
            let source: &(dyn std::error::Error + 'static) = &e;
            let mut chain = std::iter::successors(Some(source), |e| e.source());
            if chain.any(|e| e.is::<http_body_util::LengthLimitError>()) {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the request body is over {limit} bytes"),
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "body_unreadable",
                    "the request body could not be read to its end",
                )
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    #[tokio::test]
    async fn only_a_body_over_the_limit_is_413_and_a_broken_one_is_400() {
        let over = Request::new(Body::from(vec![b'x'; 2048]));
        let e = read_body(over, 1024).await.expect_err("over the limit");
        assert_eq!(
            (e.status, e.code),
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        );

        let chunks: Vec<Result<&'static [u8], std::io::Error>> = vec![
            Ok(b"{\"event_type\":"),
            Err(std::io::Error::other("the client went away")),
        ];
        let broken = Request::new(Body::from_stream(futures::stream::iter(chunks)));
        let e = read_body(broken, 1024).await.expect_err("unreadable");
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, "body_unreadable")
        );
    }

    #[test]
    fn a_panicking_handler_answers_500_internal_error() {
        let response = panicked(Box::new("boom"));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
