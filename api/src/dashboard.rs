//! The browser dashboard: one self-contained page (no external assets)
//! that drives the same `/api/v1` endpoints with the user's key.

use axum::http::header;
use axum::response::{Html, IntoResponse, Redirect};

const PAGE: &str = include_str!("dashboard.html");

/// The dashboard
///
/// The browser dashboard: one self-contained page that calls `/api/v1` with
/// the key you give it.
#[utoipa::path(
    get,
    path = "/dashboard",
    operation_id = "dashboard",
    tag = "operations",
    responses((status = 200, description = "The page.", content_type = "text/html", body = String))
)]
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

/// Redirect to the dashboard
#[utoipa::path(
    get,
    path = "/",
    operation_id = "root",
    tag = "operations",
    responses((status = 303, description = "To `/dashboard`.",
               headers(("Location" = String, description = "`/dashboard`"))))
)]
pub(crate) async fn root() -> Redirect {
    Redirect::to("/dashboard")
}
