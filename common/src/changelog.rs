//! The `data_change` log: every change to tasks, task_schedule, nodes, jobs
//! and webhooks is written in the same transaction as the change, with the
//! old and new row as gzip-compressed JSON (flate2).

use std::cell::RefCell;
use std::io::Read;

use chrono::{DateTime, Utc};
use flate2::read::GzDecoder;
use flate2::{Compress, Compression, Crc, Decompress, FlushCompress, FlushDecompress, Status};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A row was created.
    Insert,
    /// A row was changed.
    Update,
    /// A row was removed.
    Delete,
}

impl Action {
    /// The stored word.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Insert => "INSERT",
            Action::Update => "UPDATE",
            Action::Delete => "DELETE",
        }
    }
}

/// Compresses the JSON text of `value` with gzip.
pub fn gzip_json(value: &Value) -> Vec<u8> {
    let text = serde_json::to_vec(value).unwrap_or_default();
    gzip(&text)
}

/// A row as JSON, for the change log: either a parsed value or the JSON
/// text Postgres produced (`to_jsonb(t.*)::text`). The hot path reads rows
/// as text and compresses the text as it is, so a job's change rows cost
/// no JSON parse or re-serialization in Rust.
pub trait RowJson: Sync + std::fmt::Debug {
    /// The row's JSON text.
    fn json_bytes(&self) -> std::borrow::Cow<'_, [u8]>;
}

impl RowJson for Value {
    fn json_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned(serde_json::to_vec(self).unwrap_or_default())
    }
}

impl RowJson for String {
    fn json_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.as_bytes())
    }
}

impl RowJson for str {
    fn json_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.as_bytes())
    }
}

fn gzip_row(row: &dyn RowJson) -> Vec<u8> {
    gzip(&row.json_bytes())
}

thread_local! {
    // A deflate stream allocates and zeroes a few hundred KiB of state; the
    // hot path compresses several small rows per job, so each thread keeps
    // one compressor and one decompressor and resets them between uses.
    static DEFLATE: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
    static INFLATE: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// The gzip member header taskhost writes: deflate, no flags, no time,
/// unknown OS (RFC 1952).
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// Compresses bytes into a gzip member at a fast level (the hot path
/// writes many), reusing this thread's compressor.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() / 2 + 64);
    out.extend_from_slice(&GZIP_HEADER);
    DEFLATE.with(|d| {
        let mut d = d.borrow_mut();
        d.reset();
        let start_in = d.total_in();
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            let consumed = (d.total_in() - start_in) as usize;
            // Compressing into a Vec with spare room cannot fail.
            match d.compress_vec(&bytes[consumed..], &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    let mut crc = Crc::new();
    crc.update(bytes);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out
}

/// Decompresses gzip bytes. Members with the plain header taskhost writes
/// are inflated with this thread's reused decompressor (and their CRC and
/// length checked); anything else goes through `GzDecoder`.
pub fn gunzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let plain = bytes.len() >= 18 && bytes[..4] == GZIP_HEADER[..4];
    if !plain {
        let mut out = Vec::with_capacity(bytes.len() * 3);
        GzDecoder::new(bytes).read_to_end(&mut out)?;
        return Ok(out);
    }
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let (body, trailer) = bytes[10..].split_at(bytes.len() - 18);
    let want_crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let want_len = u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);
    // The trailer's length is only a hint until the CRC is checked: start
    // small and never inflate past it.
    let limit = want_len as usize;
    let mut out = Vec::with_capacity(limit.min(body.len().saturating_mul(4) + 64));
    INFLATE.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        let start_in = d.total_in();
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            let consumed = (d.total_in() - start_in) as usize;
            let before = out.len();
            match d.decompress_vec(&body[consumed..], &mut out, FlushDecompress::Finish) {
                Ok(_) if out.len() > limit => {
                    return Err(invalid("gzip data longer than declared"));
                }
                Ok(Status::StreamEnd) => return Ok(()),
                Ok(_)
                    if out.len() == before
                        && (d.total_in() - start_in) as usize == consumed
                        && out.capacity() - out.len() >= 64 =>
                {
                    return Err(invalid("truncated gzip data"));
                }
                Ok(_) => {}
                Err(e) => return Err(invalid(&e.to_string())),
            }
        }
    })?;
    let mut crc = Crc::new();
    crc.update(&out);
    if crc.sum() != want_crc || out.len() as u32 != want_len {
        return Err(invalid("gzip checksum or length mismatch"));
    }
    Ok(out)
}

/// Decompresses and parses gzip-compressed JSON.
pub fn gunzip_json(bytes: &[u8]) -> std::io::Result<Value> {
    let raw = gunzip(bytes)?;
    serde_json::from_slice(&raw).map_err(std::io::Error::other)
}

/// One change to record.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    /// The table changed.
    pub table: &'a str,
    /// The primary key of the row, as text.
    pub record_id: String,
    /// What happened.
    pub action: Action,
    /// The row before (UPDATE, DELETE).
    pub old: Option<&'a dyn RowJson>,
    /// The row after (INSERT, UPDATE).
    pub new: Option<&'a dyn RowJson>,
    /// The user, node or process that made the change.
    pub changed_by: &'a str,
    /// The node that made the change, if a node did.
    pub node_id: Option<Uuid>,
    /// Why, in a few words.
    pub reason: Option<&'a str>,
}

/// Writes one `data_change` row on `conn`, which should be inside the
/// transaction that made the change. Returns its `change_seq`.
///
/// Call it *after* writing the row it describes: that write gives the
/// transaction its id before the change draws its sequence number, which
/// the feed's safe head relies on (see [`crate::sync`]).
pub async fn record(conn: &mut PgConnection, change: Change<'_>) -> Result<i64, sqlx::Error> {
    let old = change.old.map(gzip_row);
    let new = change.new.map(gzip_row);
    sqlx::query_scalar(
        "INSERT INTO data_change
             (change_id, table_name, record_id, action, old_data, new_data, changed_by, node_id, change_reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         RETURNING change_seq",
    )
    .bind(Uuid::now_v7())
    .bind(change.table)
    .bind(change.record_id)
    .bind(change.action.as_str())
    .bind(old)
    .bind(new)
    .bind(change.changed_by)
    .bind(change.node_id)
    .bind(change.reason)
    .fetch_one(conn)
    .await
}

/// Writes many `data_change` rows in one statement (in order, so their
/// `change_seq` follow the slice), with the same rule as [`record`]: after
/// the writes they describe, in the same transaction.
pub async fn record_many(
    conn: &mut PgConnection,
    changes: &[Change<'_>],
) -> Result<(), sqlx::Error> {
    if changes.is_empty() {
        return Ok(());
    }
    let n = changes.len();
    let mut ids = Vec::with_capacity(n);
    let mut tables = Vec::with_capacity(n);
    let mut records = Vec::with_capacity(n);
    let mut actions = Vec::with_capacity(n);
    let mut olds: Vec<Option<Vec<u8>>> = Vec::with_capacity(n);
    let mut news: Vec<Option<Vec<u8>>> = Vec::with_capacity(n);
    let mut bys = Vec::with_capacity(n);
    let mut nodes: Vec<Option<Uuid>> = Vec::with_capacity(n);
    let mut reasons: Vec<Option<&str>> = Vec::with_capacity(n);
    for c in changes {
        ids.push(Uuid::now_v7());
        tables.push(c.table);
        records.push(c.record_id.as_str());
        actions.push(c.action.as_str());
        olds.push(c.old.map(gzip_row));
        news.push(c.new.map(gzip_row));
        bys.push(c.changed_by);
        nodes.push(c.node_id);
        reasons.push(c.reason);
    }
    sqlx::query(
        "INSERT INTO data_change
             (change_id, table_name, record_id, action, old_data, new_data, changed_by, node_id, change_reason)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[],
                              $6::bytea[], $7::text[], $8::uuid[], $9::text[])",
    )
    .bind(ids)
    .bind(tables)
    .bind(records)
    .bind(actions)
    .bind(olds)
    .bind(news)
    .bind(bys)
    .bind(nodes)
    .bind(reasons)
    .execute(conn)
    .await?;
    Ok(())
}

/// A decoded `data_change` row, its old and new rows as parsed JSON.
pub type ChangeEntry = ChangeEntryOf<Value>;

/// The OpenAPI schema of a change's `action`.
pub fn action_schema() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["INSERT", "UPDATE", "DELETE"]))
        .build()
}

/// A decoded `data_change` row whose old and new rows are JSON text, not
/// parsed: what the events relay forwards (it never looks inside a row).
pub type RawChangeEntry = ChangeEntryOf<Box<serde_json::value::RawValue>>;

/// A decoded `data_change` row; `D` is how its rows are held.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ChangeEntry)]
pub struct ChangeEntryOf<D> {
    /// The feed cursor.
    pub change_seq: i64,
    /// Unique id of the change.
    pub change_id: Uuid,
    /// The table changed.
    pub table_name: String,
    /// The row's primary key.
    pub record_id: String,
    /// INSERT, UPDATE or DELETE.
    #[schema(schema_with = crate::changelog::action_schema)]
    pub action: String,
    /// The row before (UPDATE, DELETE), decoded: its columns by name.
    #[schema(value_type = Option<Object>)]
    pub old_data: Option<D>,
    /// The row after (INSERT, UPDATE), decoded.
    #[schema(value_type = Option<Object>)]
    pub new_data: Option<D>,
    /// Who made it.
    pub changed_by: String,
    /// When.
    pub changed_at: DateTime<Utc>,
    /// Which node, if any.
    pub node_id: Option<Uuid>,
    /// Why.
    pub change_reason: Option<String>,
}

#[derive(sqlx::FromRow)]
struct RawChange {
    change_seq: i64,
    change_id: Uuid,
    table_name: String,
    record_id: String,
    action: String,
    old_data: Option<Vec<u8>>,
    new_data: Option<Vec<u8>>,
    changed_by: String,
    changed_at: DateTime<Utc>,
    node_id: Option<Uuid>,
    change_reason: Option<String>,
}

/// How a stored row is decoded for a reader.
trait DecodeRow: Sized {
    fn decode_row(gz: &[u8]) -> Self;
}

// A row that cannot be decoded is reported as a JSON error value rather
// than hiding the whole feed.
fn decode_error(e: &dyn std::fmt::Display) -> Value {
    serde_json::json!({ "decodeError": e.to_string() })
}

impl DecodeRow for Value {
    fn decode_row(gz: &[u8]) -> Self {
        gunzip_json(gz).unwrap_or_else(|e| decode_error(&e))
    }
}

impl DecodeRow for Box<serde_json::value::RawValue> {
    fn decode_row(gz: &[u8]) -> Self {
        let text = gunzip(gz)
            .map_err(|e| e.to_string())
            .and_then(|b| String::from_utf8(b).map_err(|e| e.to_string()));
        text.and_then(|t| serde_json::value::RawValue::from_string(t).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| {
                serde_json::value::to_raw_value(&decode_error(&e))
                    .unwrap_or_else(|_| Box::<serde_json::value::RawValue>::default())
            })
    }
}

impl RawChange {
    fn decode<D: DecodeRow>(self) -> ChangeEntryOf<D> {
        let decode = |b: Option<Vec<u8>>| b.map(|b| D::decode_row(&b));
        ChangeEntryOf {
            change_seq: self.change_seq,
            change_id: self.change_id,
            table_name: self.table_name,
            record_id: self.record_id,
            action: self.action,
            old_data: decode(self.old_data),
            new_data: decode(self.new_data),
            changed_by: self.changed_by,
            changed_at: self.changed_at,
            node_id: self.node_id,
            change_reason: self.change_reason,
        }
    }
}

/// Reads every committed change after `since`, oldest first, without the
/// safe-head bound: right for a quiet log (tests, tools), not for a cursor
/// that must never skip a row (use [`read_between`]).
pub async fn read_since(
    conn: &mut PgConnection,
    table: Option<&str>,
    since: i64,
    limit: i64,
) -> Result<Vec<ChangeEntry>, sqlx::Error> {
    read_between(conn, table, since, i64::MAX, limit).await
}

/// Reads changes after `since` up to and including `upto` (the safe head,
/// see [`crate::sync::Watermark`]), oldest first, optionally of one table.
pub async fn read_between(
    conn: &mut PgConnection,
    table: Option<&str>,
    since: i64,
    upto: i64,
    limit: i64,
) -> Result<Vec<ChangeEntry>, sqlx::Error> {
    read_between_as(conn, table, since, upto, limit).await
}

/// [`read_between`] with the rows left as JSON text, for forwarding.
pub async fn read_between_raw(
    conn: &mut PgConnection,
    table: Option<&str>,
    since: i64,
    upto: i64,
    limit: i64,
) -> Result<Vec<RawChangeEntry>, sqlx::Error> {
    read_between_as(conn, table, since, upto, limit).await
}

async fn read_between_as<D: DecodeRow>(
    conn: &mut PgConnection,
    table: Option<&str>,
    since: i64,
    upto: i64,
    limit: i64,
) -> Result<Vec<ChangeEntryOf<D>>, sqlx::Error> {
    let rows: Vec<RawChange> = sqlx::query_as(
        "SELECT change_seq, change_id, table_name, record_id, action, old_data, new_data,
                changed_by, changed_at, node_id, change_reason
         FROM data_change
         WHERE change_seq > $1 AND change_seq <= $4
           AND ($2::text IS NULL OR table_name = $2)
         ORDER BY change_seq
         LIMIT $3",
    )
    .bind(since)
    .bind(table)
    .bind(limit)
    .bind(upto)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(RawChange::decode).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_standard_and_reuse_is_clean() {
        // Standard gzip: what we write, GzDecoder reads, and the other way.
        for text in [
            &b""[..],
            b"x",
            &[b'a'; 100_000],
            "é€ JSON {\"k\": 1}".as_bytes(),
        ] {
            let z = gzip(text);
            let mut plain = Vec::new();
            GzDecoder::new(&z[..]).read_to_end(&mut plain).unwrap();
            assert_eq!(plain, text);
            assert_eq!(gunzip(&z).unwrap(), text);
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), Compression::best());
            std::io::Write::write_all(&mut enc, text).unwrap();
            let theirs = enc.finish().unwrap();
            assert_eq!(gunzip(&theirs).unwrap(), text);
        }
        // A corrupted member is an error, not garbage.
        let mut z = gzip(b"hello hello hello");
        let n = z.len();
        z[n - 5] ^= 0xff;
        assert!(gunzip(&z).is_err());
        assert!(gunzip(&z[..12]).is_err());
    }

    #[test]
    fn gzip_round_trip() {
        let v = serde_json::json!({"a": 1, "b": ["x", null], "c": "é"});
        let z = gzip_json(&v);
        assert_eq!(&z[..2], &[0x1f, 0x8b], "gzip magic");
        assert_eq!(gunzip_json(&z).unwrap(), v);
    }
}
