//! `GET /api/v1/events/stream`: changes of jobs and nodes pushed to the
//! caller as Server-Sent Events, so a dashboard refreshes when something
//! happened instead of polling every view.
//!
//! The stream follows the change feed (`data_change`) from the caller's
//! cursor, polling it every [`POLL`] and never reading past the feed's safe
//! head ([`taskhost_common::sync::Watermark`]), so no change is skipped.
//! Each event is compact, `{table, action, recordId, changeSeq}`: a hint
//! to reload what it names, not the row itself. Several changes of one
//! row found in one poll arrive as one event (the last). Non-admin keys
//! get only changes of their own jobs (the row's `user_id`, read from the
//! logged row) and of nodes; admins get every job. A comment line every
//! [`HEARTBEAT`] keeps idle connections open through proxies and the api's
//! own idle timeout. The stream ends when the api shuts down.
//!
//! Browsers' `EventSource` cannot send an `Authorization` header, so the
//! dashboard reads this with `fetch` and a body reader; any SSE client that
//! can set headers works too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use taskhost_common::CancellationToken;
use taskhost_common::sync::Watermark;
use tokio::time::Instant;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// How often the stream looks for new changes.
pub(crate) const POLL: Duration = Duration::from_millis(500);
/// Longest silence before a comment line is sent.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(15);
/// Change rows read per look at most.
const BATCH: i64 = 500;
/// The tables whose changes are streamed.
const TABLES: [&str; 2] = ["jobs", "nodes"];

/// `GET /events/stream` parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct StreamQuery {
    /// Start after this `changeSeq` (the last event seen); default: the
    /// feed's head, i.e. only what happens from now on. `Last-Event-ID`
    /// does the same.
    #[param(minimum = 0)]
    since: Option<i64>,
}

/// One event: which row of which table changed, and how (the `data` of a
/// `change` event of the stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LiveEvent {
    table: String,
    action: String,
    record_id: String,
    change_seq: i64,
}

/// A change row as the stream reads it: no old or new row unless the
/// owner must be checked.
#[derive(sqlx::FromRow)]
struct ChangeRow {
    change_seq: i64,
    table_name: String,
    record_id: String,
    action: String,
    /// The logged job row (gzip JSON), fetched only for non-admins.
    row_data: Option<Vec<u8>>,
}

/// The one field of a logged job row the stream looks at.
#[derive(Deserialize)]
struct Owner {
    user_id: Option<String>,
}

/// Whether the logged row (gzip JSON) belongs to `user`. A row that cannot
/// be decoded belongs to nobody.
fn owned_by(row: Option<&[u8]>, user: &str) -> bool {
    let Some(gz) = row else { return false };
    taskhost_common::changelog::gunzip(gz)
        .ok()
        .and_then(|text| serde_json::from_slice::<Owner>(&text).ok())
        .and_then(|o| o.user_id)
        .is_some_and(|owner| owner == user)
}

/// Keeps the last change of each row, in feed order.
fn coalesce(events: Vec<LiveEvent>) -> Vec<LiveEvent> {
    let mut last: HashMap<(String, String), i64> = HashMap::new();
    for e in &events {
        last.insert((e.table.clone(), e.record_id.clone()), e.change_seq);
    }
    events
        .into_iter()
        .filter(|e| last.get(&(e.table.clone(), e.record_id.clone())) == Some(&e.change_seq))
        .collect()
}

/// The SSE frames of a batch of events.
fn frames(events: &[LiveEvent]) -> String {
    let mut out = String::new();
    for e in events {
        let data = serde_json::to_string(e).unwrap_or_default();
        out.push_str(&format!(
            "id: {}\nevent: change\ndata: {data}\n\n",
            e.change_seq
        ));
    }
    out
}

/// Where one stream stands.
struct Follower {
    pool: PgPool,
    watermark: Arc<Watermark>,
    /// `Some(user)`: only that user's jobs (a non-admin key).
    only_user: Option<String>,
    /// The last change looked at.
    cursor: i64,
    /// The first frame (`ready`) still to send.
    greeting: Option<String>,
    last_sent: Instant,
    stop: CancellationToken,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Follower {
    /// The next frames to send; None once the api shuts down.
    async fn next(&mut self) -> Result<Option<Bytes>, BoxError> {
        if let Some(hello) = self.greeting.take() {
            return Ok(Some(Bytes::from(hello)));
        }
        loop {
            if self.stop.is_cancelled() {
                return Ok(None);
            }
            let (events, full) = self.look().await?;
            if !events.is_empty() {
                self.last_sent = Instant::now();
                return Ok(Some(Bytes::from(frames(&events))));
            }
            if self.last_sent.elapsed() >= HEARTBEAT {
                self.last_sent = Instant::now();
                return Ok(Some(Bytes::from_static(b": heartbeat\n\n")));
            }
            if full {
                // A whole batch of other users' changes: read on at once.
                continue;
            }
            let wake = (self.last_sent + HEARTBEAT).min(Instant::now() + POLL);
            tokio::select! {
                () = self.stop.cancelled() => return Ok(None),
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Reads the changes after the cursor up to the safe head; returns the
    /// events the caller may see and whether the batch was full.
    async fn look(&mut self) -> Result<(Vec<LiveEvent>, bool), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let head = self.watermark.safe_head_local(&mut conn).await?;
        if head <= self.cursor {
            return Ok((Vec::new(), false));
        }
        let rows: Vec<ChangeRow> = sqlx::query_as(
            "SELECT change_seq, table_name, record_id, action,
                    CASE WHEN $3 AND table_name = 'jobs' THEN coalesce(new_data, old_data) END
                        AS row_data
             FROM data_change
             WHERE change_seq > $1 AND change_seq <= $2 AND table_name = ANY($4)
             ORDER BY change_seq LIMIT $5",
        )
        .bind(self.cursor)
        .bind(head)
        .bind(self.only_user.is_some())
        .bind(&TABLES[..])
        .bind(BATCH)
        .fetch_all(&mut *conn)
        .await?;
        drop(conn);
        let full = rows.len() as i64 >= BATCH;
        self.cursor = match rows.last() {
            Some(last) if full => last.change_seq,
            _ => head,
        };
        let events = rows
            .into_iter()
            .filter(|r| match &self.only_user {
                Some(user) if r.table_name == "jobs" => owned_by(r.row_data.as_deref(), user),
                _ => true,
            })
            .map(|r| LiveEvent {
                table: r.table_name,
                action: r.action,
                record_id: r.record_id,
                change_seq: r.change_seq,
            })
            .collect();
        Ok((coalesce(events), full))
    }
}

/// The starting point: `since`, else `Last-Event-ID`, else none.
fn start_from(q: &StreamQuery, headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let since = match q.since {
        Some(s) => Some(s),
        None => match headers.get("last-event-id") {
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<i64>().ok())
                    .ok_or_else(|| {
                        ApiError::Invalid("Last-Event-ID: not a changeSeq".to_owned())
                    })?,
            ),
            None => None,
        },
    };
    if since.is_some_and(|s| s < 0) {
        return Err(ApiError::Invalid("since must be 0 or more".to_owned()));
    }
    Ok(since)
}

/// Stream job and node changes
///
/// Server-Sent Events (`text/event-stream`) of job and node changes the
/// caller may see (admins: every job; others: their own; nodes for all),
/// from the change feed, until the api shuts down. It opens with
/// `event: ready` (`{changeSeq, headSeq}`), then sends `event: change` with
/// a `LiveEvent` as `data` and the change's `changeSeq` as `id`, and a
/// comment every 15 s. Reconnect with `Last-Event-ID` (or `since`) to go on
/// where it stopped.
#[utoipa::path(
    get,
    path = "/events/stream",
    operation_id = "streamEvents",
    tag = "console",
    params(
        StreamQuery,
        ("Last-Event-ID" = Option<i64>, Header, minimum = 0, description = "The `id` of the last event seen; like `since`.")
    ),
    responses(
        (status = 200, description = "The stream; each `change` event's data is a `LiveEvent`.",
         content_type = "text/event-stream", body = String,
         example = "retry: 3000\nevent: ready\ndata: {\"changeSeq\":41,\"headSeq\":41}\n\nid: 42\nevent: change\ndata: {\"table\":\"jobs\",\"action\":\"UPDATE\",\"recordId\":\"0193a5b2-7c1d-7e4f-9a2b-3c4d5e6f7a8b\",\"changeSeq\":42}\n\n"),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let since = start_from(&q, &headers)?;
    let head = {
        let mut conn = state.pool.acquire().await?;
        state.watermark.safe_head_local(&mut conn).await?
    };
    // A cursor beyond the head (say, from another database) starts at it.
    let cursor = since.map_or(head, |s| s.min(head));
    let greeting = format!(
        "retry: 3000\nevent: ready\ndata: {}\n\n",
        serde_json::json!({ "changeSeq": cursor, "headSeq": head })
    );
    let follower = Follower {
        pool: state.pool.clone(),
        watermark: state.watermark.clone(),
        only_user: (!caller.0.is_admin()).then(|| caller.user().to_owned()),
        cursor,
        greeting: Some(greeting),
        last_sent: Instant::now(),
        stop: state.streams.clone(),
    };
    let body = futures_util::stream::try_unfold(follower, |mut f| async move {
        match f.next().await {
            Ok(Some(piece)) => Ok(Some((piece, f))),
            Ok(None) => Ok(None),
            Err(error) => {
                tracing::warn!(%error, "event stream ended on an error");
                Err(error)
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(table: &str, id: &str, seq: i64) -> LiveEvent {
        LiveEvent {
            table: table.to_owned(),
            action: "UPDATE".to_owned(),
            record_id: id.to_owned(),
            change_seq: seq,
        }
    }

    #[test]
    fn a_row_changed_twice_in_one_look_is_one_event_the_last() {
        let out = coalesce(vec![
            ev("jobs", "a", 1),
            ev("jobs", "b", 2),
            ev("jobs", "a", 3),
            ev("nodes", "a", 4),
        ]);
        assert_eq!(
            out,
            vec![ev("jobs", "b", 2), ev("jobs", "a", 3), ev("nodes", "a", 4)]
        );
    }

    #[test]
    fn frames_are_sse_with_the_change_seq_as_id() {
        let text = frames(&[ev("jobs", "a", 7)]);
        assert_eq!(
            text,
            "id: 7\nevent: change\ndata: {\"table\":\"jobs\",\"action\":\"UPDATE\",\"recordId\":\"a\",\"changeSeq\":7}\n\n"
        );
    }

    #[test]
    fn the_owner_comes_from_the_logged_row() {
        let row = taskhost_common::changelog::gzip(br#"{"job_id":"x","user_id":"alice"}"#);
        assert!(owned_by(Some(&row), "alice"));
        assert!(!owned_by(Some(&row), "bob"));
        assert!(!owned_by(None, "alice"));
        assert!(!owned_by(Some(b"not gzip"), "alice"));
    }
}
