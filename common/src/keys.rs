//! API keys: only the SHA-256 of a key is stored; the key itself is shown
//! once, when it is created.

use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::model::Role;

/// Every key starts with this, so leaked keys are easy to find in text.
pub const KEY_PREFIX: &str = "thk_";

/// The SHA-256 of a key, as stored.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random key: `thk_<8 hex>_<48 hex>`; the first part is its public
/// prefix.
pub fn generate_key() -> (String, String) {
    let mut bytes = [0u8; 28];
    rand::rng().fill_bytes(&mut bytes);
    let prefix = hex::encode(&bytes[..4]);
    let secret = hex::encode(&bytes[4..]);
    (format!("{KEY_PREFIX}{prefix}_{secret}"), prefix)
}

/// A stored key, without its secret.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    /// Key id.
    pub key_id: Uuid,
    /// Owner.
    pub user_id: String,
    /// A label.
    pub name: String,
    /// Public prefix of the key.
    pub prefix: String,
    /// Roles.
    pub roles: Vec<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last authenticated.
    pub last_used_at: Option<DateTime<Utc>>,
    /// Revoked.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Who a request or message acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user.
    pub user_id: String,
    /// The key used, if any (queue ingress has none).
    pub key_id: Option<Uuid>,
    /// Roles granted.
    pub roles: Vec<Role>,
}

impl Principal {
    /// True when any of `roles` is held.
    pub fn has_any(&self, roles: &[Role]) -> bool {
        self.roles.iter().any(|r| roles.contains(r))
    }

    /// True for system_admin or site_admin.
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r.is_admin())
    }
}

/// Why a key could not be created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A role name is not known.
    #[error("unknown role: {0}")]
    UnknownRole(String),
    /// The user id is empty or too long.
    #[error("user id must be 1 to 200 characters")]
    BadUser,
    /// Postgres failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Parses a comma-separated role list, refusing unknown names.
pub fn parse_roles(list: &str) -> Result<Vec<Role>, KeyError> {
    let mut roles = Vec::new();
    for r in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let role: Role = r.parse().map_err(|_| {
            KeyError::UnknownRole(format!(
                "`{r}` (known: {})",
                Role::ALL
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    Ok(roles)
}

/// Creates a key and returns it with the secret, which is not stored.
pub async fn create(
    pool: &PgPool,
    user_id: &str,
    roles: &[Role],
    name: &str,
) -> Result<(ApiKey, String), KeyError> {
    let user_id = user_id.trim();
    if user_id.is_empty() || user_id.chars().count() > 200 {
        return Err(KeyError::BadUser);
    }
    let (key, prefix) = generate_key();
    let roles: Vec<String> = roles.iter().map(|r| r.as_str().to_owned()).collect();
    let row: ApiKey = sqlx::query_as(
        "INSERT INTO api_keys (key_id, user_id, name, prefix, secret_sha256, roles)
         VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING key_id, user_id, name, prefix, roles, created_at, last_used_at, revoked_at",
    )
    .bind(Uuid::now_v7())
    .bind(user_id)
    .bind(name)
    .bind(&prefix)
    .bind(hash_key(&key))
    .bind(&roles)
    .fetch_one(pool)
    .await?;
    Ok((row, key))
}

/// Every key, newest first.
pub async fn list(pool: &PgPool) -> Result<Vec<ApiKey>, sqlx::Error> {
    sqlx::query_as(
        "SELECT key_id, user_id, name, prefix, roles, created_at, last_used_at, revoked_at
         FROM api_keys ORDER BY created_at DESC",
    )
    .fetch_all(pool)
    .await
}

/// Revokes a key; false when no active key has that id.
pub async fn revoke(pool: &PgPool, key_id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL",
    )
    .bind(key_id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

fn roles_of(names: &[String]) -> Vec<Role> {
    names.iter().filter_map(|r| r.parse().ok()).collect()
}

/// How stale `last_used_at` may get before an authentication refreshes it.
/// Writing it on every request would make every request with one key queue
/// on that key's row lock.
const LAST_USED_GRANULARITY_SECS: f64 = 60.0;

/// The principal of an active key, or None for an unknown or revoked one.
/// `last_used_at` is refreshed at most once a minute, in the background.
pub async fn authenticate(pool: &PgPool, key: &str) -> Result<Option<Principal>, sqlx::Error> {
    if !key.starts_with(KEY_PREFIX) || key.len() > 128 {
        return Ok(None);
    }
    let row: Option<(Uuid, String, Vec<String>, bool)> = sqlx::query_as(
        "SELECT key_id, user_id, roles,
                last_used_at IS NULL OR last_used_at < now() - make_interval(secs => $2)
         FROM api_keys
         WHERE secret_sha256 = $1 AND revoked_at IS NULL",
    )
    .bind(hash_key(key))
    .bind(LAST_USED_GRANULARITY_SECS)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(key_id, user_id, roles, stale)| {
        if stale {
            let pool = pool.clone();
            tokio::spawn(async move {
                let done = sqlx::query(
                    "UPDATE api_keys SET last_used_at = now()
                     WHERE key_id = $1 AND (last_used_at IS NULL OR last_used_at < now() - make_interval(secs => $2))",
                )
                .bind(key_id)
                .bind(LAST_USED_GRANULARITY_SECS)
                .execute(&pool)
                .await;
                if let Err(error) = done {
                    tracing::debug!(%error, %key_id, "could not record key use");
                }
            });
        }
        Principal {
            user_id,
            key_id: Some(key_id),
            roles: roles_of(&roles),
        }
    }))
}

/// The principal of a user who owns at least one active key (queue ingress
/// acts with the union of that user's roles), or None for an unknown user.
pub async fn principal_of_user(
    pool: &PgPool,
    user_id: &str,
) -> Result<Option<Principal>, sqlx::Error> {
    let keys: Vec<Vec<String>> =
        sqlx::query_scalar("SELECT roles FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL")
            .bind(user_id)
            .fetch_all(pool)
            .await?;
    if keys.is_empty() {
        return Ok(None);
    }
    let mut roles: Vec<Role> = Vec::new();
    for role in keys.iter().flat_map(|k| roles_of(k)) {
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    Ok(Some(Principal {
        user_id: user_id.to_owned(),
        key_id: None,
        roles,
    }))
}
