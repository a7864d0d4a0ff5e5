//! `Authorization: Bearer <key>` → the caller's principal.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use taskhost_common::keys::Principal;
use taskhost_common::model::Role;

use crate::error::ApiError;
use crate::state::AppState;

/// The authenticated caller.
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub(crate) Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthorized)?;
        // The scheme is case-insensitive (RFC 9110 §11.1): Bearer, bearer, BEARER.
        let key = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .ok_or(ApiError::Unauthorized)?;
        let principal = state
            .keys
            .authenticate(&state.pool, key)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        if let Some(note) = parts.extensions.get::<crate::metrics::AccessNote>() {
            note.key(principal.key_id);
        }
        if let Some(key_id) = principal.key_id
            && let Err(wait) = state.limiter.check(key_id)
        {
            crate::metrics::rate_limited();
            return Err(ApiError::RateLimited(wait));
        }
        Ok(Caller(principal))
    }
}

impl Caller {
    /// The user id.
    pub(crate) fn user(&self) -> &str {
        &self.0.user_id
    }

    /// Fails with 403 unless one of `roles` is held.
    pub(crate) fn require_any(&self, roles: &[Role], what: &str) -> Result<(), ApiError> {
        if self.0.has_any(roles) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "{what} needs one of the roles: {}",
                roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }

    /// Fails with 403 unless an admin role is held.
    pub(crate) fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        self.require_any(&[Role::SystemAdmin, Role::SiteAdmin], what)
    }
}
