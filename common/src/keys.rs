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
/// Every api forgets its cached authentications when the revocation commits
/// (see [`KeyCache`]).
pub async fn revoke(pool: &PgPool, key_id: Uuid) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL",
    )
    .bind(key_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(REVOKED_CHANNEL)
        .bind(key_id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
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

/// The channel a revocation is announced on (`NOTIFY`, sent when the
/// revoking transaction commits).
pub const REVOKED_CHANNEL: &str = "taskhost_keys";

/// How long an authentication is remembered. A revoked key is refused as
/// soon as the api hears the revocation's `NOTIFY` (milliseconds); this is
/// the bound when that notification is lost (the listener reconnecting).
pub const CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(2);

/// Keys remembered at most; past it the cache starts over.
const CACHE_MAX: usize = 10_000;

type CacheEntry = (std::time::Instant, Option<Principal>);

/// Remembers recent authentications (by the key's SHA-256, never the key),
/// so the hot path does not query Postgres on every request. Unknown keys
/// are remembered too, so a flood of made-up keys costs one query per key
/// per [`CACHE_TTL`].
#[derive(Debug, Default)]
pub struct KeyCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, CacheEntry>>,
    /// Bumped by every [`KeyCache::clear`], so a lookup that began before a
    /// revocation cannot put its stale answer back afterwards.
    generation: std::sync::atomic::AtomicU64,
}

impl KeyCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The principal of an active key, from the cache when it is fresh.
    pub async fn authenticate(
        &self,
        pool: &PgPool,
        key: &str,
    ) -> Result<Option<Principal>, sqlx::Error> {
        if !key.starts_with(KEY_PREFIX) || key.len() > 128 {
            return Ok(None);
        }
        let hash = hash_key(key);
        if let Ok(entries) = self.entries.lock()
            && let Some((at, principal)) = entries.get(&hash)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(principal.clone());
        }
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let principal = authenticate(pool, key).await?;
        if let Ok(mut entries) = self.entries.lock()
            && self.generation.load(std::sync::atomic::Ordering::SeqCst) == generation
        {
            if entries.len() >= CACHE_MAX {
                entries.clear();
            }
            entries.insert(hash, (std::time::Instant::now(), principal.clone()));
        }
        Ok(principal)
    }

    /// Forgets everything (a key was revoked somewhere).
    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            entries.clear();
        }
    }

    /// Clears `cache` on every revocation announced on
    /// [`REVOKED_CHANNEL`], for as long as anyone else holds the cache. The
    /// listener has its own connection and reconnects with a backoff; while
    /// it is down, entries still expire after [`CACHE_TTL`].
    pub async fn follow_revocations(cache: std::sync::Weak<Self>, url: String) {
        use std::time::Duration;
        let alive = |c: &std::sync::Weak<Self>| c.strong_count() > 0;
        let clear = |c: &std::sync::Weak<Self>| {
            if let Some(c) = c.upgrade() {
                c.clear();
            }
        };
        let mut backoff = Duration::from_millis(250);
        while alive(&cache) {
            let connected = async {
                let pool = crate::db::listener_pool(&url)?;
                let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
                listener.listen(REVOKED_CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            }
            .await;
            match connected {
                Ok(mut listener) => {
                    backoff = Duration::from_millis(250);
                    // Anything revoked while it was away is forgotten now.
                    clear(&cache);
                    while alive(&cache) {
                        // Wake now and then to notice the api has gone.
                        match tokio::time::timeout(Duration::from_secs(2), listener.try_recv())
                            .await
                        {
                            Err(_) => {}
                            Ok(Ok(_)) => clear(&cache),
                            Ok(Err(error)) => {
                                tracing::warn!(%error, "key revocation listener failed; reconnecting");
                                break;
                            }
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "key revocation listener cannot connect; retrying");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
