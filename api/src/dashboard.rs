//! The browser dashboard: one self-contained page (no external assets)
//! that drives the same `/api/v1` endpoints with the user's key.

use axum::http::header;
use axum::response::{Html, IntoResponse, Redirect};

const PAGE: &str = include_str!("dashboard.html");

pub(crate) async fn page() -> impl IntoResponse {
    (
        [
            // The page only talks to its own origin and runs its own script.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Html(PAGE),
    )
}

pub(crate) async fn root() -> Redirect {
    Redirect::to("/dashboard")
}
