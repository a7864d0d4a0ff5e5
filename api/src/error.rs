//! The API's one error type: it owns the mapping to status codes and never
//! leaks internals to the client.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// What [`ApiError::Unavailable`] names when Postgres cannot be reached.
pub(crate) const DATABASE: &str = "the database";

/// Marks a response that found Postgres unreachable, so the api answers
/// the next requests at once until it is back (see `crate::health`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DatabaseDown;

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed (e.g. not JSON).
    #[error("{0}")]
    BadRequest(String),
    /// 422: the body is JSON but a field is wrong.
    #[error("{0}")]
    Invalid(String),
    /// 401: missing, malformed, unknown or revoked key.
    #[error("a valid API key is required (Authorization: Bearer <key>)")]
    Unauthorized,
    /// 403: the key's roles do not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: not found, or not yours.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 409: conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is larger than the limit.
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// 429: the key made too many requests; retry after the duration.
    #[error("too many requests for this key; retry in {} ms", .0.as_millis().max(1))]
    RateLimited(std::time::Duration),
    /// 503: a dependency is down.
    #[error("{0} is unavailable, try again shortly")]
    Unavailable(&'static str),
    /// 500: a bug or an unexpected database answer; logged, not shown.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub(crate) fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                tracing::warn!(error = %e, "postgres unavailable");
                ApiError::Unavailable(DATABASE)
            }
            sqlx::Error::Database(ref d)
                if d.code()
                    .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")) =>
            {
                tracing::warn!(error = %e, "postgres unavailable");
                ApiError::Unavailable(DATABASE)
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "request failed");
        }
        let body = crate::doc::ErrorBody {
            success: false,
            error: crate::doc::ErrorDetail {
                code,
                message: self.to_string(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let ApiError::Unavailable(what) = &self {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(1u64),
            );
            if *what == DATABASE {
                response.extensions_mut().insert(DatabaseDown);
            }
        }
        if let ApiError::RateLimited(wait) = &self {
            // Whole seconds, rounded up, as HTTP wants.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs.max(1)),
            );
        }
        response
    }
}
