//! Captured output, bounded (issue #10).
//!
//! A `task_history` row keeps a run's stdout (`output`) and stderr
//! (`error`) as gzip members, each up to `worker.output_cap_bytes`
//! uncompressed. Two ways to read them, neither of which holds a whole
//! output in memory:
//!
//! - **Previews** for list answers (`GET /jobs/results`,
//!   `GET /tasks/{id}/history`): the query fetches only the first
//!   [`HEAD_BYTES`] of each compressed value and its last 4 bytes (Postgres
//!   reads just those slices of a TOASTed value). The head is inflated up to
//!   [`PREVIEW_BYTES`] of text; the last 4 bytes are the gzip trailer's
//!   ISIZE, the uncompressed length mod 2^32 (RFC 1952): exact, since a
//!   stored stream is at most `worker.output_cap_bytes` plus a marker, and
//!   any cap under 4 GiB keeps it so (the default is 1 MiB). Sizes are
//!   therefore not stored in columns of their own: the trailer has them for
//!   every row, old ones included.
//! - **Streams** of one whole output (`GET /jobs/{id}/output`,
//!   `GET /tasks/{id}/history/{historyId}/output`): the compressed value is
//!   read in [`CHUNK_BYTES`] slices, one short query each (no connection is
//!   held while the client reads), and inflated into pieces of at most
//!   32 KiB as the client takes them.

use std::io::{Read, Write};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use flate2::bufread::GzDecoder;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::path::RawPath;
use crate::state::AppState;

/// Most bytes of text in one preview (`output` or `error` of a list entry).
pub(crate) const PREVIEW_BYTES: usize = 4096;

/// Compressed bytes fetched for a preview. Deflate spends at most 15 bits
/// on a literal and a few hundred bytes on a block header, so 4 KiB of text
/// never needs more than about 8 KiB of stream; twice that leaves room.
const HEAD_BYTES: i32 = 16 * 1024;

/// Compressed bytes read per query while streaming a whole output.
const CHUNK_BYTES: i32 = 128 * 1024;

/// The preview columns of `task_history h`, for a list query.
pub(crate) const PREVIEW_COLUMNS: &str = "substring(h.output FROM 1 FOR 16384) AS output_head,
     substring(h.output FROM greatest(octet_length(h.output) - 3, 1)) AS output_tail,
     substring(h.error FROM 1 FOR 16384) AS error_head,
     substring(h.error FROM greatest(octet_length(h.error) - 3, 1)) AS error_tail";

const _: () = assert!(HEAD_BYTES == 16384, "PREVIEW_COLUMNS spells HEAD_BYTES out");

/// What a list query fetches of one row's output: heads and trailers.
#[derive(Debug, Default, sqlx::FromRow)]
pub(crate) struct PreviewColumns {
    output_head: Option<Vec<u8>>,
    output_tail: Option<Vec<u8>>,
    error_head: Option<Vec<u8>>,
    error_tail: Option<Vec<u8>>,
}

/// The bounded output fields of a list entry.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Previews {
    /// Start of stdout: at most [`PREVIEW_BYTES`] bytes, cut on a UTF-8
    /// boundary. `None` when the attempt left no output row.
    output: Option<String>,
    /// Length of the whole stored stdout, in bytes.
    output_bytes: Option<u64>,
    /// `output` is shorter than the stored stdout.
    output_preview_truncated: bool,
    /// Start of stderr, bounded like `output`; `None` when empty.
    error: Option<String>,
    /// Length of the whole stored stderr, in bytes.
    error_bytes: Option<u64>,
    /// `error` is shorter than the stored stderr.
    error_preview_truncated: bool,
}

impl PreviewColumns {
    /// Turns the fetched slices into previews and sizes.
    pub(crate) fn previews(&mut self) -> Previews {
        let out = preview(self.output_head.take(), self.output_tail.take());
        let err = preview(self.error_head.take(), self.error_tail.take());
        let (error, error_preview_truncated) = match err.text {
            Some(e) if !e.is_empty() => (Some(e), err.cut),
            _ => (None, false),
        };
        Previews {
            output: out.text,
            output_bytes: out.bytes,
            output_preview_truncated: out.cut,
            error,
            error_bytes: err.bytes,
            error_preview_truncated,
        }
    }
}

/// One stream's preview.
#[derive(Debug, PartialEq)]
struct Preview {
    text: Option<String>,
    bytes: Option<u64>,
    cut: bool,
}

/// The gzip trailer's ISIZE: the uncompressed length mod 2^32.
fn isize_of(tail: &[u8]) -> Option<u64> {
    let t: [u8; 4] = tail.try_into().ok()?;
    Some(u64::from(u32::from_le_bytes(t)))
}

/// The preview of one stream from the head of its gzip member and its last
/// 4 bytes. Inflates at most [`PREVIEW_BYTES`]; a head that ends before that
/// (a stream longer than [`HEAD_BYTES`]) yields what it holds.
fn preview(head: Option<Vec<u8>>, tail: Option<Vec<u8>>) -> Preview {
    let Some(head) = head else {
        return Preview {
            text: None,
            bytes: None,
            cut: false,
        };
    };
    let size = tail.as_deref().and_then(isize_of);
    let mut raw = Vec::with_capacity(PREVIEW_BYTES.min(size.unwrap_or(0) as usize));
    let read = GzDecoder::new(head.as_slice())
        .take(PREVIEW_BYTES as u64)
        .read_to_end(&mut raw);
    if let Err(e) = read
        && raw.is_empty()
    {
        // Not gzip: say so, as GET /jobs/{id} does, rather than hiding the
        // entry.
        return Preview {
            text: Some(format!("<output could not be decoded: {e}>")),
            bytes: size,
            cut: false,
        };
    }
    let size = size.unwrap_or(raw.len() as u64);
    let cut = (raw.len() as u64) < size;
    Preview {
        text: Some(bounded_text(raw, cut)),
        bytes: Some(size),
        cut,
    }
}

/// Text of at most [`PREVIEW_BYTES`] bytes from the start of a stream.
/// When the stream goes on, a character split at the end is dropped rather
/// than shown as U+FFFD; invalid bytes elsewhere become U+FFFD, and the
/// result is cut again on a character boundary if that made it longer.
fn bounded_text(mut raw: Vec<u8>, cut: bool) -> String {
    if cut
        && let Err(e) = std::str::from_utf8(&raw)
        && e.error_len().is_none()
    {
        raw.truncate(e.valid_up_to());
    }
    let mut text = match String::from_utf8(raw) {
        Ok(t) => t,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    };
    if text.len() > PREVIEW_BYTES {
        let mut end = PREVIEW_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Which stream of a run to send.
#[derive(Debug, Clone, Copy, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Stream {
    /// Standard output (the `output` column).
    #[default]
    Stdout,
    /// Standard error (the `error` column).
    Stderr,
}

impl Stream {
    fn column(self) -> &'static str {
        match self {
            Stream::Stdout => "output",
            Stream::Stderr => "error",
        }
    }

    fn live_column(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct OutputQuery {
    /// Which stream: `stdout` (default) or `stderr`.
    #[serde(default)]
    #[param(inline)]
    stream: Stream,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct JobOutputQuery {
    /// Which stream: `stdout` (default) or `stderr`.
    #[serde(default)]
    #[param(inline)]
    stream: Stream,
    /// Follow a running job's output until it ends (default false).
    #[serde(default)]
    follow: bool,
}

/// A job's whole output
///
/// The final attempt's whole stdout (default) or stderr as `text/plain`,
/// streamed; with `follow=true`, what a running job has printed so far and
/// then the rest as it comes, until the job ends. Visible exactly as
/// `GET /jobs/{jobId}` is: to the job's owner and to admins (anyone else
/// gets 404), and 404 for a job with no ended attempt (unless followed).
#[utoipa::path(
    get,
    path = "/jobs/{jobId}/output",
    operation_id = "getJobOutput",
    tag = "jobs",
    params(crate::doc::JobIdPath, JobOutputQuery),
    responses(
        (status = 200, description = "The stream's bytes as captured (`nosniff`), sent as they are read.",
         content_type = "text/plain", body = String, example = "hello from node-1\n"),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn job_output(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
    query: Result<Query<JobOutputQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let job_id: Uuid = raw.parse().map_err(|_| ApiError::NotFound("job"))?;
    if q.follow {
        let visible: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM jobs WHERE job_id = $1 AND (user_id = $2 OR $3)")
                .bind(job_id)
                .bind(caller.user())
                .bind(caller.0.is_admin())
                .fetch_optional(&state.pool)
                .await?;
        if visible.is_none() {
            return Err(ApiError::NotFound("job"));
        }
        return Ok(follow_response(
            state.pool.clone(),
            state.streams.clone(),
            job_id,
            q.stream,
        ));
    }
    let row: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT h.history_id, octet_length(h.{col})::int8
         FROM jobs j LEFT JOIN task_history h ON h.job_id = j.job_id AND h.is_final
         WHERE j.job_id = $1 AND (j.user_id = $2 OR $3)",
        col = q.stream.column()
    )))
    .bind(job_id)
    .bind(caller.user())
    .bind(caller.0.is_admin())
    .fetch_optional(&state.pool)
    .await?;
    match row {
        None => Err(ApiError::NotFound("job")),
        Some((Some(history_id), Some(len))) => Ok(stream_response(
            state.pool.clone(),
            history_id,
            q.stream,
            len,
        )),
        // Not finished, never ran, or no stream stored.
        Some(_) => Err(ApiError::NotFound("job output")),
    }
}

/// How often a follower looks for new output.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// Where a follower stands.
struct Following {
    pool: PgPool,
    /// Cancelled when the api shuts down: the follow ends (the client sees
    /// the response end before the job did and may follow again).
    stop: taskhost_common::CancellationToken,
    job_id: Uuid,
    stream: Stream,
    /// The attempt whose output is being sent, and how much of it was sent.
    attempt: Option<i32>,
    sent: usize,
    done: bool,
}

/// One look at a followed job: its state, the final stream if it ended,
/// the live copy of the running attempt otherwise.
#[derive(sqlx::FromRow)]
struct FollowRow {
    status: String,
    final_attempt: Option<i32>,
    final_stream: Option<Vec<u8>>,
    live_attempt: Option<i32>,
    live_stream: Option<Vec<u8>>,
}

impl Following {
    /// The next piece to send (None: the job ended and all was sent).
    async fn next(&mut self) -> Result<Option<Bytes>, BoxError> {
        loop {
            if self.done {
                return Ok(None);
            }
            let row: Option<FollowRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT j.status, h.attempt AS final_attempt, h.{hist} AS final_stream,
                        l.attempt AS live_attempt, l.{live} AS live_stream
                 FROM jobs j
                 LEFT JOIN task_history h ON h.job_id = j.job_id AND h.is_final
                 LEFT JOIN job_output_live l ON l.job_id = j.job_id AND l.attempt = j.attempt
                 WHERE j.job_id = $1",
                hist = self.stream.column(),
                live = self.stream.live_column(),
            )))
            .bind(self.job_id)
            .fetch_optional(&self.pool)
            .await?;
            let Some(row) = row else {
                // Deleted while followed.
                self.done = true;
                return Ok(None);
            };
            if let Some(attempt) = row.final_attempt {
                // Ended: the stored copy (at most the output cap) is the
                // truth; send what the follower has not seen of it.
                self.done = true;
                let whole = match row.final_stream {
                    Some(gz) => taskhost_common::changelog::gunzip(&gz)?,
                    None => Vec::new(),
                };
                let mut piece = self.switch_to(attempt);
                piece.extend_from_slice(whole.get(self.sent..).unwrap_or_default());
                return Ok(Some(Bytes::from(piece)));
            }
            let terminal = ["succeeded", "failed", "timed_out", "cancelled", "dead"];
            if terminal.contains(&row.status.as_str()) {
                // Ended without a stored run (cancelled before it started).
                self.done = true;
                return Ok(None);
            }
            if let (Some(attempt), Some(live)) = (row.live_attempt, row.live_stream) {
                let mut piece = self.switch_to(attempt);
                if live.len() > self.sent {
                    piece.extend_from_slice(&live[self.sent..]);
                    self.sent = live.len();
                }
                if !piece.is_empty() {
                    return Ok(Some(Bytes::from(piece)));
                }
            }
            tokio::select! {
                () = tokio::time::sleep(FOLLOW_POLL) => {}
                () = self.stop.cancelled() => {
                    self.done = true;
                    return Ok(None);
                }
            }
        }
    }

    /// Starts following `attempt`; a line marks a new attempt after an
    /// earlier one was shown (a retry).
    fn switch_to(&mut self, attempt: i32) -> Vec<u8> {
        match self.attempt {
            Some(a) if a == attempt => Vec::new(),
            Some(_) => {
                self.attempt = Some(attempt);
                self.sent = 0;
                format!("\n[taskhost: attempt {attempt}]\n").into_bytes()
            }
            None => {
                self.attempt = Some(attempt);
                Vec::new()
            }
        }
    }
}

/// A chunked `text/plain` answer that follows a job's output until it ends.
fn follow_response(
    pool: PgPool,
    stop: taskhost_common::CancellationToken,
    job_id: Uuid,
    stream: Stream,
) -> Response {
    let state = Following {
        pool,
        stop,
        job_id,
        stream,
        attempt: None,
        sent: 0,
        done: false,
    };
    let body = futures_util::stream::try_unfold(state, |mut s| async move {
        match s.next().await {
            Ok(Some(piece)) => Ok(Some((piece, s))),
            Ok(None) => Ok(None),
            Err(error) => {
                tracing::warn!(%error, job_id = %s.job_id, "following output failed");
                Err(error)
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// A task run's whole output
///
/// One history entry's (any attempt's) whole stdout (default) or stderr as
/// `text/plain`, streamed. Readable by any key, like the history it belongs
/// to.
#[utoipa::path(
    get,
    path = "/tasks/{taskId}/history/{historyId}/output",
    operation_id = "getTaskHistoryOutput",
    tag = "tasks",
    params(crate::doc::HistoryPath, OutputQuery),
    responses(
        (status = 200, description = "The stream's bytes as captured (`nosniff`), sent as they are read.",
         content_type = "text/plain", body = String, example = "report written\n"),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn history_output(
    State(state): State<AppState>,
    _caller: Caller,
    RawPath((raw_task, raw_history)): RawPath<(String, String)>,
    query: Result<Query<OutputQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let task_id: Uuid = raw_task.parse().map_err(|_| ApiError::NotFound("task"))?;
    let history_id: i64 = raw_history
        .parse()
        .map_err(|_| ApiError::NotFound("history entry"))?;
    let row: Option<Option<i64>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT octet_length({col})::int8 FROM task_history WHERE history_id = $1 AND task_id = $2",
        col = q.stream.column()
    )))
    .bind(history_id)
    .bind(task_id)
    .fetch_optional(&state.pool)
    .await?;
    match row {
        None => Err(ApiError::NotFound("history entry")),
        Some(Some(len)) => Ok(stream_response(
            state.pool.clone(),
            history_id,
            q.stream,
            len,
        )),
        Some(None) => Err(ApiError::NotFound("history entry output")),
    }
}

/// A `text/plain` answer that inflates the stored stream as it is sent.
/// A failure half-way (the row deleted meanwhile, corrupt data) aborts the
/// body, so the client sees an incomplete response, never a silently short
/// one.
fn stream_response(pool: PgPool, history_id: i64, stream: Stream, len: i64) -> Response {
    let state = Streaming {
        pool,
        history_id,
        stream,
        len,
        offset: 0,
        chunk: Vec::new(),
        pos: 0,
        inflater: Inflater::new(),
        done: false,
    };
    let body = futures_util::stream::try_unfold(state, |mut s| async move {
        match s.next().await {
            Ok(Some(piece)) => Ok(Some((piece, s))),
            Ok(None) => Ok(None),
            Err(error) => {
                tracing::warn!(%error, history_id = s.history_id, "streaming output failed");
                Err(error)
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            // Job output is never rendered as HTML on the api's origin.
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Streaming {
    pool: PgPool,
    history_id: i64,
    stream: Stream,
    /// Compressed length of the stored value.
    len: i64,
    /// Compressed bytes fetched so far.
    offset: i64,
    chunk: Vec<u8>,
    pos: usize,
    inflater: Inflater,
    done: bool,
}

impl Streaming {
    /// The next piece of text, `None` at the end.
    async fn next(&mut self) -> Result<Option<Bytes>, BoxError> {
        loop {
            if self.done {
                return Ok(None);
            }
            if self.pos < self.chunk.len() {
                let (used, out) = self.inflater.feed(&self.chunk[self.pos..])?;
                self.pos += used;
                if !out.is_empty() {
                    return Ok(Some(Bytes::from(out)));
                }
                continue;
            }
            if self.offset < self.len {
                let chunk: Option<Vec<u8>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT substring({} FROM $2 FOR $3) FROM task_history WHERE history_id = $1",
                    self.stream.column()
                )))
                .bind(self.history_id)
                // substring takes int4; a bytea is under 1 GB.
                .bind(i32::try_from(self.offset + 1)?)
                .bind(CHUNK_BYTES)
                .fetch_optional(&self.pool)
                .await?
                .flatten();
                let chunk = chunk
                    .filter(|c| !c.is_empty())
                    .ok_or("the output was deleted while it was being sent")?;
                self.offset += chunk.len() as i64;
                self.chunk = chunk;
                self.pos = 0;
                continue;
            }
            self.done = true;
            let rest = self.inflater.finish()?;
            return Ok((!rest.is_empty()).then(|| Bytes::from(rest)));
        }
    }
}

/// Inflates one gzip member fed in pieces, handing out its text in pieces
/// of at most 32 KiB (flate2's writer buffer), however well it compressed.
pub(crate) struct Inflater {
    decoder: flate2::write::GzDecoder<Vec<u8>>,
}

impl Inflater {
    pub(crate) fn new() -> Self {
        Self {
            decoder: flate2::write::GzDecoder::new(Vec::new()),
        }
    }

    /// Feeds compressed bytes; returns how many were used and the text that
    /// came out. Call again with the rest until all is used.
    pub(crate) fn feed(&mut self, input: &[u8]) -> std::io::Result<(usize, Vec<u8>)> {
        let used = self.decoder.write(input)?;
        if used == 0 && !input.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "data after the end of the gzip stream",
            ));
        }
        Ok((used, std::mem::take(self.decoder.get_mut())))
    }

    /// Ends the stream (checking its CRC and length) and returns the last
    /// text.
    pub(crate) fn finish(&mut self) -> std::io::Result<Vec<u8>> {
        self.decoder.try_finish()?;
        Ok(std::mem::take(self.decoder.get_mut()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskhost_common::changelog::gzip;

    fn text(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| format!("line {i} é ✓\n"))
            .collect::<String>()
            .into_bytes()[..n]
            .to_vec()
    }

    fn tail(gz: &[u8]) -> Vec<u8> {
        gz[gz.len() - 4..].to_vec()
    }

    #[test]
    fn preview_is_bounded_and_cut_on_a_character() {
        let raw = text(1_000_000);
        let gz = gzip(&raw);
        let head = gz[..gz.len().min(HEAD_BYTES as usize)].to_vec();
        let p = preview(Some(head), Some(tail(&gz)));
        let t = p.text.expect("text");
        assert!(t.len() <= PREVIEW_BYTES && t.len() > PREVIEW_BYTES - 4);
        assert!(raw.starts_with(t.as_bytes()));
        assert_eq!(p.bytes, Some(1_000_000));
        assert!(p.cut);
    }

    #[test]
    fn short_output_is_whole() {
        let gz = gzip(b"hello\n");
        let p = preview(Some(gz.clone()), Some(tail(&gz)));
        assert_eq!(
            p,
            Preview {
                text: Some("hello\n".into()),
                bytes: Some(6),
                cut: false
            }
        );
        let empty = gzip(b"");
        let p = preview(Some(empty.clone()), Some(tail(&empty)));
        assert_eq!(p.text.as_deref(), Some(""));
        assert_eq!(p.bytes, Some(0));
    }

    #[test]
    fn incompressible_output_previews_from_the_head() {
        // Random bytes (a pseudo-random sequence) compress to more than
        // they are: the head must still hold 4 KiB of them.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let raw: Vec<u8> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let gz = gzip(&raw);
        let head = gz[..HEAD_BYTES as usize].to_vec();
        let p = preview(Some(head), Some(tail(&gz)));
        let t = p.text.expect("text");
        assert!(t.len() <= PREVIEW_BYTES, "{}", t.len());
        assert!(t.len() >= PREVIEW_BYTES - 3, "{}", t.len());
        assert_eq!(p.bytes, Some(200_000));
        assert!(p.cut);
    }

    #[test]
    fn no_row_and_garbage() {
        assert_eq!(preview(None, None).text, None);
        let p = preview(Some(b"not gzip at all".to_vec()), Some(b"atal".to_vec()));
        assert!(
            p.text
                .expect("text")
                .starts_with("<output could not be decoded")
        );
    }

    #[test]
    fn inflater_in_any_pieces_gives_back_the_bytes() {
        let raw = text(300_000);
        let gz = gzip(&raw);
        for piece in [1, 3, 7, 4096, 100_000, gz.len()] {
            let mut inf = Inflater::new();
            let mut out = Vec::new();
            for chunk in gz.chunks(piece) {
                let mut pos = 0;
                while pos < chunk.len() {
                    let (used, text) = inf.feed(&chunk[pos..]).expect("feed");
                    assert!(text.len() <= 32 * 1024, "piece of {}", text.len());
                    out.extend_from_slice(&text);
                    pos += used;
                }
            }
            out.extend_from_slice(&inf.finish().expect("finish"));
            assert!(out == raw, "pieces of {piece}: {} bytes back", out.len());
        }
    }

    #[test]
    fn inflater_refuses_a_cut_or_damaged_stream() {
        let gz = gzip(&text(50_000));
        let mut inf = Inflater::new();
        let mut pos = 0;
        let cut = &gz[..gz.len() - 6];
        while pos < cut.len() {
            pos += inf.feed(&cut[pos..]).expect("feed").0;
        }
        assert!(inf.finish().is_err(), "a cut stream must not end cleanly");

        let mut bad = gz.clone();
        let n = bad.len();
        bad[n - 8] ^= 0xff; // the CRC
        let mut inf = Inflater::new();
        let mut pos = 0;
        while pos < bad.len() {
            pos += inf.feed(&bad[pos..]).expect("feed").0;
        }
        assert!(inf.finish().is_err(), "a wrong CRC must not end cleanly");
    }
}
