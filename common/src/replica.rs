//! Replicas that follow the change feed (`taskhost sync`): a second
//! PostgreSQL database or an embedded SQLite file that holds a read copy of
//! some of the logged tables (tasks, task_schedule, nodes, jobs).
//!
//! - The target's schema is created from the source's catalog: the same
//!   column names (PostgreSQL: the same types; SQLite: INTEGER for integers
//!   and booleans, REAL for floats, TEXT for everything else, JSON and
//!   arrays as JSON text, timestamps as RFC 3339 UTC text), plus
//!   `taskhost_replica_state` (one cursor per table) and
//!   `taskhost_replica_conflicts`.
//! - A pass reads changes after the replica's cursor up to the source's safe
//!   head ([`crate::sync::Watermark`]) and applies them in `change_seq`
//!   order: INSERT and UPDATE upsert the new row by primary key, DELETE
//!   deletes by key. The cursor is written in the same target transaction
//!   as the rows, so a crash mid-batch neither skips nor doubles a change.
//! - A table the replica has no cursor for is first copied whole at a
//!   consistent snapshot of the source (see [`Replica::snapshot`]).
//! - The replica is read-only by contract. Before a change is applied, the
//!   replica's row is compared with the change's old row: when it is
//!   neither the old nor the new row, someone changed the replica; the
//!   conflict is logged, counted and listed (`sync verify`), and the
//!   source's row wins.
//! - Progress is also written on the source, in `sync_state` (consumer
//!   `replica:<name>`, one cursor per table), so `/sync/status` shows it.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgConnection, PgPool, Postgres, Row, Sqlite, SqlitePool, Transaction};

use crate::changelog;

/// `format!` for SQL built from catalog names (quoted with [`quote`]) and
/// numbers only, never from user text.
macro_rules! sqlf {
    ($($t:tt)*) => {
        sqlx::AssertSqlSafe(format!($($t)*))
    };
}
use crate::sync::{self, TABLES, Watermark};

/// Columns changed without a change record (a heartbeat, a lease renewal):
/// copied whenever a logged change carries them, but left out of conflict
/// detection and of `sync verify`, where they would always differ.
pub const UNLOGGED_COLUMNS: &[(&str, &str)] = &[
    ("nodes", "last_heartbeat"),
    ("nodes", "stats"),
    ("jobs", "claim_expiry"),
];

/// The prefix of a replica's consumer name in the source's `sync_state`.
pub const CONSUMER_PREFIX: &str = "replica:";

/// Changes one target transaction applies at most.
pub const DEFAULT_BATCH: i64 = 500;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A database (source or target) failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// The command was asked for something it cannot do.
    #[error("{0}")]
    Invalid(String),
}

type Result<T, E = ReplicaError> = std::result::Result<T, E>;

/// How a column's values are held on the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Int,
    Float,
    Bool,
    Json,
    Timestamp,
}

#[derive(Debug, Clone)]
struct Column {
    name: String,
    pg_type: String,
    kind: Kind,
    unlogged: bool,
}

/// One replicated table, as the source's catalog describes it.
#[derive(Debug, Clone)]
pub struct TableDef {
    name: String,
    pk: String,
    pk_type: String,
    columns: Vec<Column>,
}

fn kind_of(typname: &str) -> Kind {
    match typname {
        "int2" | "int4" | "int8" => Kind::Int,
        "float4" | "float8" | "numeric" => Kind::Float,
        "bool" => Kind::Bool,
        "json" | "jsonb" => Kind::Json,
        t if t.starts_with('_') => Kind::Json,
        "timestamptz" | "timestamp" => Kind::Timestamp,
        _ => Kind::Text,
    }
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Parses `--tables`: a comma-separated subset of the logged tables.
pub fn parse_tables(list: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if !TABLES.contains(&t) {
            return Err(ReplicaError::Invalid(format!(
                "--tables: {t:?} is not a logged table (one of {})",
                TABLES.join(", ")
            )));
        }
        if !out.iter().any(|o| o == t) {
            out.push(t.to_owned());
        }
    }
    if out.is_empty() {
        return Err(ReplicaError::Invalid(format!(
            "--tables: name at least one of {}",
            TABLES.join(", ")
        )));
    }
    Ok(out)
}

/// Reads the definition of `table` from the source's catalog.
pub async fn describe(conn: &mut PgConnection, table: &str) -> Result<TableDef> {
    let cols: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), t.typname::text
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
         WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    let pk: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
         FROM pg_index i
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
         WHERE i.indrelid = $1::regclass AND i.indisprimary",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    let [(pk, pk_type)] = <[(String, String); 1]>::try_from(pk)
        .map_err(|_| ReplicaError::Invalid(format!("{table} has no single-column primary key")))?;
    let columns = cols
        .into_iter()
        .map(|(name, pg_type, typname)| Column {
            unlogged: UNLOGGED_COLUMNS.contains(&(table, name.as_str())),
            kind: kind_of(&typname),
            name,
            pg_type,
        })
        .collect();
    Ok(TableDef {
        name: table.to_owned(),
        pk,
        pk_type,
        columns,
    })
}

/// A value in its replica-independent form: timestamps as RFC 3339 UTC
/// with microseconds, booleans as booleans (SQLite's 0/1 too), integers as
/// integers, JSON as JSON.
fn canon_value(kind: Kind, v: &Value) -> Value {
    match (kind, v) {
        (_, Value::Null) => Value::Null,
        (Kind::Bool, Value::Number(n)) => Value::Bool(n.as_i64().unwrap_or(0) != 0),
        (Kind::Int, Value::String(s)) => s.parse::<i64>().map_or(v.clone(), Value::from),
        (Kind::Float, Value::Number(n)) => n.as_f64().map_or(v.clone(), Value::from),
        (Kind::Timestamp, Value::String(s)) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) => Value::String(
                t.with_timezone(&Utc)
                    .to_rfc3339_opts(SecondsFormat::Micros, true),
            ),
            Err(_) => v.clone(),
        },
        _ => sort_keys(v),
    }
}

fn sort_keys(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, Value> =
                m.iter().map(|(k, v)| (k, sort_keys(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(sort_keys).collect()),
        other => other.clone(),
    }
}

/// A row (a JSON object from `to_jsonb`, a change, or the replica) in
/// canonical form: every column of the table, in table order.
fn canon_row(def: &TableDef, row: &Value) -> Map<String, Value> {
    def.columns
        .iter()
        .map(|c| {
            let v = row.get(&c.name).unwrap_or(&Value::Null);
            (c.name.clone(), canon_value(c.kind, v))
        })
        .collect()
}

/// The text two rows are compared by: the canonical row without the
/// unlogged columns, keys sorted.
fn compare_text(def: &TableDef, row: &Map<String, Value>) -> String {
    let kept: BTreeMap<&str, &Value> = def
        .columns
        .iter()
        .filter(|c| !c.unlogged)
        .map(|c| (c.name.as_str(), row.get(&c.name).unwrap_or(&Value::Null)))
        .collect();
    serde_json::to_string(&kept).unwrap_or_default()
}

fn pk_text(def: &TableDef, row: &Map<String, Value>) -> String {
    match row.get(&def.pk) {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

/// Where the replica lives.
#[derive(Debug, Clone)]
pub enum Target {
    /// Another PostgreSQL database.
    Postgres(PgPool),
    /// An SQLite file.
    Sqlite(SqlitePool),
}

enum TargetTx {
    Pg(Transaction<'static, Postgres>),
    Lite(Transaction<'static, Sqlite>),
}

/// A name for the replica derived from its URL: the database or file name
/// (never a password).
pub fn default_name(url: &str) -> String {
    let tail = url
        .split(['?', '#'])
        .next()
        .unwrap_or(url)
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(url);
    let tail = tail.strip_prefix("sqlite:").unwrap_or(tail);
    let stem = tail
        .strip_suffix(".sqlite3")
        .or_else(|| tail.strip_suffix(".sqlite"))
        .or_else(|| tail.strip_suffix(".db"))
        .unwrap_or(tail);
    let name: String = stem
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-@".contains(*c))
        .take(100)
        .collect();
    if name.is_empty() {
        "replica".to_owned()
    } else {
        name
    }
}

/// Checks a replica name: 1–100 of letters, digits and `._-@`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ReplicaError::Invalid(
            "--name must be 1 to 100 letters, digits or ._-@".into(),
        ))
    }
}

impl Target {
    /// Opens the target: a `postgres://` or `postgresql://` URL, or an
    /// SQLite file given as `sqlite:PATH`, `sqlite://PATH` or a plain path
    /// (created if missing).
    pub async fn open(url: &str) -> Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await?;
            return Ok(Target::Postgres(pool));
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        if path.is_empty() || path.contains("://") {
            return Err(ReplicaError::Invalid(
                "--into: give a postgres:// URL or an SQLite file (sqlite:PATH or a path)".into(),
            ));
        }
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        Ok(Target::Sqlite(pool))
    }

    async fn begin(&self) -> Result<TargetTx> {
        Ok(match self {
            Target::Postgres(p) => TargetTx::Pg(p.begin().await?),
            Target::Sqlite(p) => TargetTx::Lite(p.begin().await?),
        })
    }

    /// Creates (or completes) the replica's tables.
    async fn ensure_schema(&self, defs: &[TableDef]) -> Result<()> {
        match self {
            Target::Postgres(p) => {
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS taskhost_replica_state (
                         source_id       text NOT NULL,
                         table_name      text PRIMARY KEY,
                         last_change_seq bigint NOT NULL,
                         quiet_until     bigint NOT NULL DEFAULT 0,
                         conflicts       bigint NOT NULL DEFAULT 0,
                         applied_at      timestamptz NOT NULL DEFAULT now()
                     );
                     CREATE TABLE IF NOT EXISTS taskhost_replica_conflicts (
                         change_seq  bigint NOT NULL,
                         table_name  text NOT NULL,
                         record_id   text NOT NULL,
                         action      text NOT NULL,
                         detected_at timestamptz NOT NULL DEFAULT now()
                     );",
                )
                .execute(p)
                .await?;
                for d in defs {
                    let cols: Vec<String> = d
                        .columns
                        .iter()
                        .map(|c| format!("{} {}", quote(&c.name), c.pg_type))
                        .collect();
                    sqlx::raw_sql(sqlf!(
                        "CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))",
                        quote(&d.name),
                        cols.join(", "),
                        quote(&d.pk)
                    ))
                    .execute(p)
                    .await?;
                    for c in &d.columns {
                        sqlx::raw_sql(sqlf!(
                            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}",
                            quote(&d.name),
                            quote(&c.name),
                            c.pg_type
                        ))
                        .execute(p)
                        .await?;
                    }
                }
            }
            Target::Sqlite(p) => {
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS taskhost_replica_state (
                         source_id       TEXT NOT NULL,
                         table_name      TEXT PRIMARY KEY,
                         last_change_seq INTEGER NOT NULL,
                         quiet_until     INTEGER NOT NULL DEFAULT 0,
                         conflicts       INTEGER NOT NULL DEFAULT 0,
                         applied_at      TEXT NOT NULL
                     );
                     CREATE TABLE IF NOT EXISTS taskhost_replica_conflicts (
                         change_seq  INTEGER NOT NULL,
                         table_name  TEXT NOT NULL,
                         record_id   TEXT NOT NULL,
                         action      TEXT NOT NULL,
                         detected_at TEXT NOT NULL
                     );",
                )
                .execute(p)
                .await?;
                for d in defs {
                    let cols: Vec<String> = d
                        .columns
                        .iter()
                        .map(|c| format!("{} {}", quote(&c.name), sqlite_type(c.kind)))
                        .collect();
                    sqlx::raw_sql(sqlf!(
                        "CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))",
                        quote(&d.name),
                        cols.join(", "),
                        quote(&d.pk)
                    ))
                    .execute(p)
                    .await?;
                    let have: Vec<String> =
                        sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
                            .bind(&d.name)
                            .fetch_all(p)
                            .await?;
                    for c in d.columns.iter().filter(|c| !have.contains(&c.name)) {
                        sqlx::raw_sql(sqlf!(
                            "ALTER TABLE {} ADD COLUMN {} {}",
                            quote(&d.name),
                            quote(&c.name),
                            sqlite_type(c.kind)
                        ))
                        .execute(p)
                        .await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Every table's cursor: `(source_id, last_change_seq, quiet_until)`.
    async fn states(&self) -> Result<HashMap<String, (String, i64, i64)>> {
        let sql = "SELECT table_name, source_id, last_change_seq, quiet_until
                   FROM taskhost_replica_state";
        let rows: Vec<(String, String, i64, i64)> = match self {
            Target::Postgres(p) => sqlx::query_as(sql).fetch_all(p).await?,
            Target::Sqlite(p) => sqlx::query_as(sql).fetch_all(p).await?,
        };
        Ok(rows
            .into_iter()
            .map(|(t, s, c, q)| (t, (s, c, q)))
            .collect())
    }

    /// Every row of `def` on the replica, canonical, by primary key.
    async fn all_rows(&self, def: &TableDef) -> Result<BTreeMap<String, String>> {
        let texts: Vec<String> = match self {
            Target::Postgres(p) => {
                sqlx::query_scalar(sqlf!(
                    "SELECT to_jsonb(t)::text FROM {} t",
                    quote(&def.name)
                ))
                .fetch_all(p)
                .await?
            }
            Target::Sqlite(p) => {
                sqlx::query_scalar(sqlf!(
                    "SELECT {} FROM {}",
                    sqlite_json_object(def),
                    quote(&def.name)
                ))
                .fetch_all(p)
                .await?
            }
        };
        rows_by_key(def, &texts)
    }

    /// The conflicts recorded on the replica, newest first.
    async fn conflicts(&self, limit: i64) -> Result<(i64, Vec<(i64, String, String, String)>)> {
        let count_sql = "SELECT count(*) FROM taskhost_replica_conflicts";
        let list_sql = "SELECT change_seq, table_name, record_id, action
                        FROM taskhost_replica_conflicts ORDER BY change_seq DESC LIMIT ";
        Ok(match self {
            Target::Postgres(p) => (
                sqlx::query_scalar(count_sql).fetch_one(p).await?,
                sqlx::query_as(sqlf!("{list_sql}{limit}"))
                    .fetch_all(p)
                    .await?,
            ),
            Target::Sqlite(p) => (
                sqlx::query_scalar(count_sql).fetch_one(p).await?,
                sqlx::query_as(sqlf!("{list_sql}{limit}"))
                    .fetch_all(p)
                    .await?,
            ),
        })
    }
}

fn rows_by_key(def: &TableDef, texts: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for t in texts {
        let v: Value = serde_json::from_str(t)
            .map_err(|e| ReplicaError::Invalid(format!("{}: unreadable row: {e}", def.name)))?;
        let row = canon_row(def, &v);
        out.insert(pk_text(def, &row), compare_text(def, &row));
    }
    Ok(out)
}

fn sqlite_type(kind: Kind) -> &'static str {
    match kind {
        Kind::Int | Kind::Bool => "INTEGER",
        Kind::Float => "REAL",
        _ => "TEXT",
    }
}

/// `json_object(...)` of a row of `def` on SQLite, JSON columns embedded as
/// JSON.
fn sqlite_json_object(def: &TableDef) -> String {
    let parts: Vec<String> = def
        .columns
        .iter()
        .map(|c| {
            let key = c.name.replace('\'', "''");
            if c.kind == Kind::Json {
                format!("'{key}', json({})", quote(&c.name))
            } else {
                format!("'{key}', {}", quote(&c.name))
            }
        })
        .collect();
    format!("json_object({})", parts.join(", "))
}

impl TargetTx {
    /// Takes the replica's write lock for this transaction (PostgreSQL: an
    /// advisory lock; SQLite: its single writer lock) and reads the cursors.
    async fn lock_and_read_states(&mut self) -> Result<Vec<(String, (String, i64, i64))>> {
        let sql = "SELECT table_name, source_id, last_change_seq, quiet_until
                   FROM taskhost_replica_state";
        let rows: Vec<(String, String, i64, i64)> = match self {
            TargetTx::Pg(tx) => {
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext('taskhost_replica_state'))")
                    .execute(&mut **tx)
                    .await?;
                sqlx::query_as(sql).fetch_all(&mut **tx).await?
            }
            TargetTx::Lite(tx) => {
                // A write statement takes SQLite's write lock, even one that
                // changes no row.
                sqlx::query("UPDATE taskhost_replica_state SET applied_at = applied_at WHERE 0")
                    .execute(&mut **tx)
                    .await?;
                sqlx::query_as(sql).fetch_all(&mut **tx).await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(t, s, c, q)| (t, (s, c, q)))
            .collect())
    }

    async fn row(&mut self, def: &TableDef, key: &str) -> Result<Option<Map<String, Value>>> {
        let text: Option<String> = match self {
            TargetTx::Pg(tx) => {
                sqlx::query_scalar(sqlf!(
                    "SELECT to_jsonb(t)::text FROM {} t WHERE {} = CAST($1 AS {})",
                    quote(&def.name),
                    quote(&def.pk),
                    def.pk_type
                ))
                .bind(key)
                .fetch_optional(&mut **tx)
                .await?
            }
            TargetTx::Lite(tx) => {
                sqlx::query_scalar(sqlf!(
                    "SELECT {} FROM {} WHERE {} = ?",
                    sqlite_json_object(def),
                    quote(&def.name),
                    quote(&def.pk)
                ))
                .bind(key)
                .fetch_optional(&mut **tx)
                .await?
            }
        };
        Ok(match text {
            Some(t) => Some(canon_row(
                def,
                &serde_json::from_str(&t).map_err(|e| {
                    ReplicaError::Invalid(format!("{}: unreadable row: {e}", def.name))
                })?,
            )),
            None => None,
        })
    }

    async fn upsert(&mut self, def: &TableDef, row: &Map<String, Value>) -> Result<()> {
        let sets: Vec<String> = def
            .columns
            .iter()
            .filter(|c| c.name != def.pk)
            .map(|c| format!("{0} = EXCLUDED.{0}", quote(&c.name)))
            .collect();
        match self {
            TargetTx::Pg(tx) => {
                let cols: Vec<String> = def.columns.iter().map(|c| quote(&c.name)).collect();
                sqlx::query(sqlf!(
                    "INSERT INTO {t} ({cols}) SELECT {cols} FROM jsonb_populate_record(NULL::{t}, $1::jsonb)
                     ON CONFLICT ({pk}) DO UPDATE SET {sets}",
                    t = quote(&def.name),
                    cols = cols.join(", "),
                    pk = quote(&def.pk),
                    sets = sets.join(", ")
                ))
                .bind(Value::Object(row.clone()).to_string())
                .execute(&mut **tx)
                .await?;
            }
            TargetTx::Lite(tx) => {
                let cols: Vec<String> = def.columns.iter().map(|c| quote(&c.name)).collect();
                let marks = vec!["?"; cols.len()].join(", ");
                let sql = format!(
                    "INSERT INTO {} ({}) VALUES ({marks}) ON CONFLICT ({}) DO UPDATE SET {}",
                    quote(&def.name),
                    cols.join(", "),
                    quote(&def.pk),
                    sets.join(", ")
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
                for c in &def.columns {
                    let v = row.get(&c.name).unwrap_or(&Value::Null);
                    q = match (c.kind, v) {
                        (_, Value::Null) => q.bind(None::<String>),
                        (Kind::Bool, Value::Bool(b)) => q.bind(i64::from(*b)),
                        (Kind::Int, Value::Number(n)) if n.is_i64() => q.bind(n.as_i64()),
                        (Kind::Float, Value::Number(n)) => q.bind(n.as_f64()),
                        (Kind::Json, v) => q.bind(v.to_string()),
                        (_, Value::String(s)) => q.bind(s.clone()),
                        (_, v) => q.bind(v.to_string()),
                    };
                }
                q.execute(&mut **tx).await?;
            }
        }
        Ok(())
    }

    async fn delete(&mut self, def: &TableDef, key: &str) -> Result<()> {
        match self {
            TargetTx::Pg(tx) => {
                sqlx::query(sqlf!(
                    "DELETE FROM {} WHERE {} = CAST($1 AS {})",
                    quote(&def.name),
                    quote(&def.pk),
                    def.pk_type
                ))
                .bind(key)
                .execute(&mut **tx)
                .await?;
            }
            TargetTx::Lite(tx) => {
                sqlx::query(sqlf!(
                    "DELETE FROM {} WHERE {} = ?",
                    quote(&def.name),
                    quote(&def.pk)
                ))
                .bind(key)
                .execute(&mut **tx)
                .await?;
            }
        }
        Ok(())
    }

    async fn clear(&mut self, def: &TableDef) -> Result<()> {
        let sql = format!("DELETE FROM {}", quote(&def.name));
        match self {
            TargetTx::Pg(tx) => {
                sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                    .execute(&mut **tx)
                    .await?;
            }
            TargetTx::Lite(tx) => {
                sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Ok(())
    }

    async fn conflict(&mut self, seq: i64, table: &str, key: &str, action: &str) -> Result<()> {
        match self {
            TargetTx::Pg(tx) => {
                sqlx::query(
                    "INSERT INTO taskhost_replica_conflicts (change_seq, table_name, record_id, action)
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(seq)
                .bind(table)
                .bind(key)
                .bind(action)
                .execute(&mut **tx)
                .await?;
            }
            TargetTx::Lite(tx) => {
                sqlx::query(
                    "INSERT INTO taskhost_replica_conflicts
                         (change_seq, table_name, record_id, action, detected_at)
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(seq)
                .bind(table)
                .bind(key)
                .bind(action)
                .bind(now_text())
                .execute(&mut **tx)
                .await?;
            }
        }
        Ok(())
    }

    async fn set_state(
        &mut self,
        source_id: &str,
        table: &str,
        cursor: i64,
        quiet_until: i64,
        conflicts: i64,
    ) -> Result<()> {
        match self {
            TargetTx::Pg(tx) => {
                sqlx::query(
                    "INSERT INTO taskhost_replica_state
                         (source_id, table_name, last_change_seq, quiet_until, conflicts, applied_at)
                     VALUES ($1, $2, $3, $4, $5, now())
                     ON CONFLICT (table_name) DO UPDATE SET source_id = EXCLUDED.source_id,
                         last_change_seq = EXCLUDED.last_change_seq,
                         quiet_until = EXCLUDED.quiet_until,
                         conflicts = taskhost_replica_state.conflicts + EXCLUDED.conflicts,
                         applied_at = now()",
                )
                .bind(source_id)
                .bind(table)
                .bind(cursor)
                .bind(quiet_until)
                .bind(conflicts)
                .execute(&mut **tx)
                .await?;
            }
            TargetTx::Lite(tx) => {
                sqlx::query(
                    "INSERT INTO taskhost_replica_state
                         (source_id, table_name, last_change_seq, quiet_until, conflicts, applied_at)
                     VALUES (?, ?, ?, ?, ?, ?)
                     ON CONFLICT (table_name) DO UPDATE SET source_id = excluded.source_id,
                         last_change_seq = excluded.last_change_seq,
                         quiet_until = excluded.quiet_until,
                         conflicts = taskhost_replica_state.conflicts + excluded.conflicts,
                         applied_at = excluded.applied_at",
                )
                .bind(source_id)
                .bind(table)
                .bind(cursor)
                .bind(quiet_until)
                .bind(conflicts)
                .bind(now_text())
                .execute(&mut **tx)
                .await?;
            }
        }
        Ok(())
    }

    async fn commit(self) -> Result<()> {
        match self {
            TargetTx::Pg(tx) => tx.commit().await?,
            TargetTx::Lite(tx) => tx.commit().await?,
        }
        Ok(())
    }
}

fn now_text() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Identifies the source database: the cluster's system identifier and the
/// database name, so a replica refuses another source's feed.
pub async fn source_id(conn: &mut PgConnection) -> Result<String> {
    let system: Option<String> =
        sqlx::query_scalar("SELECT system_identifier::text FROM pg_control_system()")
            .fetch_optional(&mut *conn)
            .await
            .ok()
            .flatten();
    let db: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut *conn)
        .await?;
    Ok(format!(
        "{}:{db}",
        system.unwrap_or_else(|| "unknown".into())
    ))
}

/// One change as the replica applies it.
struct FeedChange {
    seq: i64,
    table: String,
    record_id: String,
    action: String,
    old: Option<Value>,
    new: Option<Value>,
}

async fn read_feed(
    conn: &mut PgConnection,
    tables: &[String],
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<Vec<FeedChange>> {
    let rows = sqlx::query(
        "SELECT change_seq, table_name, record_id, action, old_data, new_data
         FROM data_change
         WHERE change_seq > $1 AND change_seq <= $2 AND table_name = ANY($3)
         ORDER BY change_seq LIMIT $4",
    )
    .bind(after)
    .bind(upto)
    .bind(tables)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let decode = |seq: i64, b: Option<Vec<u8>>| -> Result<Option<Value>> {
        b.map(|b| {
            changelog::gunzip_json(&b).map_err(|e| {
                ReplicaError::Invalid(format!("change {seq}: unreadable row data: {e}"))
            })
        })
        .transpose()
    };
    rows.into_iter()
        .map(|r| {
            let seq: i64 = r.try_get("change_seq")?;
            Ok(FeedChange {
                seq,
                table: r.try_get("table_name")?,
                record_id: r.try_get("record_id")?,
                action: r.try_get("action")?,
                old: decode(seq, r.try_get("old_data")?)?,
                new: decode(seq, r.try_get("new_data")?)?,
            })
        })
        .collect()
}

/// What one [`Replica::run_once`] did.
#[derive(Debug, Default, Clone)]
pub struct PassSummary {
    /// Changes applied.
    pub applied: u64,
    /// Conflicts found (and overwritten by the source's rows).
    pub conflicts: u64,
    /// Tables copied whole (first sync).
    pub snapshots: Vec<(String, u64)>,
    /// The replica's cursor after the pass (the lowest of its tables').
    pub cursor: i64,
    /// The source's safe head the pass went up to.
    pub head: i64,
}

/// A replica being synced from a source.
pub struct Replica {
    source: PgPool,
    target: Target,
    defs: Vec<TableDef>,
    source_id: String,
    consumer: String,
    watermark: Watermark,
    batch: i64,
}

impl Replica {
    /// Prepares a replica: reads the tables' definitions from the source,
    /// creates the target's schema and checks the target follows this
    /// source (or none yet).
    pub async fn prepare(
        source: PgPool,
        target: Target,
        tables: &[String],
        name: &str,
        batch: i64,
    ) -> Result<Self> {
        check_name(name)?;
        let mut conn = source.acquire().await?;
        let mut defs = Vec::new();
        for t in tables {
            defs.push(describe(&mut conn, t).await?);
        }
        let source_id = source_id(&mut conn).await?;
        drop(conn);
        target.ensure_schema(&defs).await?;
        let replica = Self {
            source,
            target,
            defs,
            source_id,
            consumer: format!("{CONSUMER_PREFIX}{name}"),
            watermark: Watermark::new(),
            batch: batch.max(1),
        };
        replica.check_source().await?;
        Ok(replica)
    }

    async fn check_source(&self) -> Result<HashMap<String, (String, i64, i64)>> {
        let states = self.target.states().await?;
        if let Some((other, _, _)) = states.values().find(|(s, _, _)| *s != self.source_id) {
            return Err(ReplicaError::Invalid(format!(
                "the replica follows another source ({other}), not this one ({}); \
                 use a new target or empty this one",
                self.source_id
            )));
        }
        Ok(states)
    }

    /// Copies `def` whole from the source at one snapshot and sets its
    /// cursor. The safe head `h` is read first, then the snapshot is taken,
    /// so every change up to `h` is in the copy; changes after `h` that the
    /// snapshot already holds (up to the highest `m` it sees) are applied
    /// again later without being reported as conflicts.
    async fn snapshot(&self, def: &TableDef) -> Result<u64> {
        let mut conn = self.source.acquire().await?;
        let head = self.watermark.safe_head_local(&mut conn).await?;
        drop(conn);
        let mut src = self.source.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *src)
            .await?;
        let seen: Option<i64> = sqlx::query_scalar("SELECT max(change_seq) FROM data_change")
            .fetch_one(&mut *src)
            .await?;
        let rows: Vec<String> = sqlx::query_scalar(sqlf!(
            "SELECT to_jsonb(t)::text FROM {} t",
            quote(&def.name)
        ))
        .fetch_all(&mut *src)
        .await?;
        src.commit().await?;
        let mut tx = self.target.begin().await?;
        tx.clear(def).await?;
        for text in &rows {
            let v: Value = serde_json::from_str(text)
                .map_err(|e| ReplicaError::Invalid(format!("{}: {e}", def.name)))?;
            tx.upsert(def, &canon_row(def, &v)).await?;
        }
        let quiet = seen.unwrap_or(0).max(head);
        tx.set_state(&self.source_id, &def.name, head, quiet, 0)
            .await?;
        tx.commit().await?;
        tracing::info!(
            table = %def.name,
            rows = rows.len(),
            cursor = head,
            "replica: copied the table at a snapshot"
        );
        Ok(rows.len() as u64)
    }

    /// Applies everything up to the source's safe head, in batches, each in
    /// one target transaction with its cursor.
    pub async fn run_once(&self) -> Result<PassSummary> {
        let mut summary = PassSummary::default();
        let mut states = self.check_source().await?;
        for def in &self.defs {
            if !states.contains_key(&def.name) {
                let n = self.snapshot(def).await?;
                summary.snapshots.push((def.name.clone(), n));
            }
        }
        if !summary.snapshots.is_empty() {
            states = self.check_source().await?;
        }
        let mut cursors: HashMap<String, (i64, i64)> = self
            .defs
            .iter()
            .map(|d| {
                let (_, c, q) = states.get(&d.name).cloned().unwrap_or_default();
                (d.name.clone(), (c, q))
            })
            .collect();
        let names: Vec<String> = self.defs.iter().map(|d| d.name.clone()).collect();
        let mut conn = self.source.acquire().await?;
        let head = self.head(&mut conn).await?;
        summary.head = head;
        loop {
            let from = cursors.values().map(|c| c.0).min().unwrap_or(head);
            if from >= head {
                break;
            }
            let changes = read_feed(&mut conn, &names, from, head, self.batch).await?;
            let full = changes.len() as i64 >= self.batch;
            let upto = match changes.last() {
                Some(c) if full => c.seq,
                _ => head,
            };
            let mut tx = self.target.begin().await?;
            // Another syncer of this replica may have moved the cursors
            // since they were read: take the replica's write lock, then
            // read them again, so no change is applied twice.
            for (table, (_, c, q)) in tx.lock_and_read_states().await? {
                if let Some(mine) = cursors.get_mut(&table) {
                    *mine = (mine.0.max(c), q);
                }
            }
            let mut conflicts: HashMap<&str, i64> = HashMap::new();
            let half = changes.len() / 2;
            for (i, c) in changes.iter().enumerate() {
                if i == half && i > 0 {
                    // Tests kill the syncer here (`abort`): half a batch
                    // applied, nothing committed.
                    crate::failpoint::hit("replica.mid_batch");
                }
                let Some(def) = self.defs.iter().find(|d| d.name == c.table) else {
                    continue;
                };
                let (cursor, quiet) = cursors[&c.table];
                if c.seq <= cursor {
                    continue;
                }
                if self.apply(&mut tx, def, c, c.seq <= quiet).await? {
                    *conflicts.entry(def.name.as_str()).or_default() += 1;
                    summary.conflicts += 1;
                }
                summary.applied += 1;
            }
            for def in &self.defs {
                let (cursor, quiet) = cursors[&def.name];
                let next = cursor.max(upto);
                let n = conflicts.get(def.name.as_str()).copied().unwrap_or(0);
                tx.set_state(&self.source_id, &def.name, next, quiet, n)
                    .await?;
            }
            tx.commit().await?;
            for (cursor, _) in cursors.values_mut() {
                *cursor = (*cursor).max(upto);
            }
            self.report_progress(&mut conn, &cursors).await?;
            if !full {
                break;
            }
        }
        self.report_progress(&mut conn, &cursors).await?;
        summary.cursor = cursors.values().map(|c| c.0).min().unwrap_or(0);
        Ok(summary)
    }

    /// The safe head, waiting (up to 10 s) until it reaches every change
    /// committed when the pass began, so a pass takes what was there.
    async fn head(&self, conn: &mut PgConnection) -> Result<i64> {
        let visible: Option<i64> = sqlx::query_scalar("SELECT max(change_seq) FROM data_change")
            .fetch_one(&mut *conn)
            .await?;
        let visible = visible.unwrap_or(0);
        let started = std::time::Instant::now();
        loop {
            let head = self.watermark.safe_head_local(&mut *conn).await?;
            if head >= visible || started.elapsed() > Duration::from_secs(10) {
                return Ok(head);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn report_progress(
        &self,
        conn: &mut PgConnection,
        cursors: &HashMap<String, (i64, i64)>,
    ) -> Result<()> {
        for (table, (cursor, _)) in cursors {
            sync::set_cursor(&mut *conn, &self.consumer, table, *cursor).await?;
        }
        Ok(())
    }

    /// Applies one change; true when the replica's row had been changed
    /// there (a conflict, reported unless `quiet`).
    async fn apply(
        &self,
        tx: &mut TargetTx,
        def: &TableDef,
        c: &FeedChange,
        quiet: bool,
    ) -> Result<bool> {
        let old = c.old.as_ref().map(|v| canon_row(def, v));
        let new = c.new.as_ref().map(|v| canon_row(def, v));
        let key = new
            .as_ref()
            .or(old.as_ref())
            .map(|r| pk_text(def, r))
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| c.record_id.clone());
        let current = tx.row(def, &key).await?;
        let as_text = |r: &Option<Map<String, Value>>| r.as_ref().map(|r| compare_text(def, r));
        let (now, before, after) = (as_text(&current), as_text(&old), as_text(&new));
        let expected_before = if c.action == "INSERT" { None } else { before };
        let expected_after = if c.action == "DELETE" { None } else { after };
        let conflict = now != expected_before && now != expected_after;
        if conflict && !quiet {
            tracing::warn!(
                table = %def.name,
                key = %key,
                change_seq = c.seq,
                action = %c.action,
                "replica: conflict, the row was changed on the replica; the source's row wins"
            );
            tx.conflict(c.seq, &def.name, &key, &c.action).await?;
        }
        match (c.action.as_str(), &new) {
            ("DELETE", _) | (_, None) => tx.delete(def, &key).await?,
            (_, Some(row)) => tx.upsert(def, row).await?,
        }
        Ok(conflict && !quiet)
    }

    /// The tables' names, as given.
    pub fn tables(&self) -> Vec<String> {
        self.defs.iter().map(|d| d.name.clone()).collect()
    }

    /// Compares source and replica table by table.
    pub async fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut src = self.source.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *src)
            .await?;
        for def in &self.defs {
            let texts: Vec<String> = sqlx::query_scalar(sqlf!(
                "SELECT to_jsonb(t)::text FROM {} t",
                quote(&def.name)
            ))
            .fetch_all(&mut *src)
            .await?;
            let source = rows_by_key(def, &texts)?;
            let replica = self.target.all_rows(def).await?;
            let mut differing: Vec<String> = source
                .iter()
                .filter(|(k, v)| replica.get(*k) != Some(*v))
                .map(|(k, _)| k.clone())
                .collect();
            differing.extend(replica.keys().filter(|k| !source.contains_key(*k)).cloned());
            differing.sort();
            report.tables.push(TableVerify {
                table: def.name.clone(),
                source_rows: source.len() as u64,
                replica_rows: replica.len() as u64,
                source_checksum: checksum(&source),
                replica_checksum: checksum(&replica),
                differing,
            });
        }
        src.commit().await?;
        let (count, recent) = self.target.conflicts(20).await?;
        report.conflicts = count;
        report.recent_conflicts = recent;
        Ok(report)
    }
}

/// An order-independent checksum of a table's rows: the XOR of the SHA-256
/// of each row's canonical JSON (primary key and row).
fn checksum(rows: &BTreeMap<String, String>) -> String {
    let mut acc = [0u8; 32];
    for (k, v) in rows {
        let mut h = Sha256::new();
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        for (a, b) in acc.iter_mut().zip(h.finalize()) {
            *a ^= b;
        }
    }
    hex::encode(&acc[..8])
}

/// One table compared by `sync verify`.
#[derive(Debug, Clone)]
pub struct TableVerify {
    /// The table.
    pub table: String,
    /// Rows on the source.
    pub source_rows: u64,
    /// Rows on the replica.
    pub replica_rows: u64,
    /// Checksum of the source's rows.
    pub source_checksum: String,
    /// Checksum of the replica's rows.
    pub replica_checksum: String,
    /// Primary keys whose rows differ or are missing on one side.
    pub differing: Vec<String>,
}

/// What `sync verify` found.
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    /// Per table.
    pub tables: Vec<TableVerify>,
    /// Conflicts the replica has recorded in all.
    pub conflicts: i64,
    /// The newest of them: (change_seq, table, key, action).
    pub recent_conflicts: Vec<(i64, String, String, String)>,
}

impl VerifyReport {
    /// True when every table is equal.
    pub fn equal(&self) -> bool {
        self.tables.iter().all(|t| t.differing.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values() {
        assert_eq!(
            default_name("postgres://u:secret@h:5432/replica1"),
            "replica1"
        );
        assert_eq!(default_name("sqlite:///var/lib/th/copy.db"), "copy");
        assert_eq!(default_name("/tmp/x/node-a.sqlite"), "node-a");
        assert_eq!(
            canon_value(Kind::Timestamp, &Value::from("2026-11-30T21:00:00.5+01:00")),
            Value::from("2026-11-30T20:00:00.500000Z")
        );
        assert_eq!(canon_value(Kind::Bool, &Value::from(1)), Value::Bool(true));
        assert!(parse_tables("tasks,bogus").is_err());
        assert_eq!(
            parse_tables("tasks, nodes,tasks").unwrap(),
            ["tasks", "nodes"]
        );
    }
}
