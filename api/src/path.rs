//! Path parameters as text, for handlers that parse their ids themselves.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

/// The route's path parameters as sent (percent-decoded). A parameter that
/// is not UTF-8 once decoded (`/jobs/%FF`) cannot name anything, so the
/// whole value is left empty (`String::default()`), which every id parser
/// refuses: the handler answers its own 404, as for any malformed id,
/// instead of axum's plain-text 400.
pub(crate) struct RawPath<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for RawPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Default + Send,
{
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let value = Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| v)
            .unwrap_or_default();
        Ok(RawPath(value))
    }
}
