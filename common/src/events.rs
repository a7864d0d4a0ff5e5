//! Job events on `<p>.events`, published in batches.
//!
//! Every state change of a job is an event (`JobEvent`). Sending one AMQP
//! message per event would cost the broker three or four messages per job
//! on top of the work message, so events travel in batches instead: a
//! sink gathers whatever events arrive while the previous batch is being
//! published and sends them as one `job.events.v1` message per status,
//! routed `job.<status>`, with the events in the order they happened. A
//! batch gathers for at most 50 ms after its first event, so at load one
//! message carries dozens or hundreds of events and a lone event is at most
//! 50 ms late.
//!
//! Events are notifications: they are published without confirms and a
//! failure is logged, never retried. The durable record is `task_history`
//! and `data_change`, whose feed is relayed with confirms, in order.

use std::sync::Arc;

use chrono::Utc;
use serde::Serialize;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::amqp::{Outgoing, Publisher};
use crate::messages::{JOB_EVENTS_V1, JobEvent};
use crate::model::JobStatus;

/// Events one message carries at most.
const MAX_PER_MESSAGE: usize = 1000;
/// How long a batch waits for more events after its first one.
const LINGER: std::time::Duration = std::time::Duration::from_millis(50);

/// The body of a `job.events.v1` message.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Batch<'a> {
    events: &'a [&'a JobEvent],
}

/// The event of one state change.
pub fn job_event(
    job_id: Uuid,
    status: JobStatus,
    attempt: i32,
    node_id: Option<Uuid>,
    exit_code: Option<i32>,
) -> JobEvent {
    JobEvent {
        event_id: format!("{job_id}:{attempt}:{status}"),
        job_id,
        status,
        attempt,
        node_id,
        exit_code,
        at: Utc::now(),
    }
}

/// The messages that carry `events`: one per status (and per
/// [`MAX_PER_MESSAGE`] events), in the order each status first appears.
pub fn messages(events: &[JobEvent]) -> Vec<Outgoing> {
    let mut statuses: Vec<JobStatus> = Vec::new();
    for e in events {
        if !statuses.contains(&e.status) {
            statuses.push(e.status);
        }
    }
    let mut out = Vec::new();
    for status in statuses {
        let of_status: Vec<&JobEvent> = events.iter().filter(|e| e.status == status).collect();
        for chunk in of_status.chunks(MAX_PER_MESSAGE) {
            let payload = serde_json::to_vec(&Batch { events: chunk }).unwrap_or_default();
            out.push(Outgoing {
                exchange: "events".into(),
                routing_key: format!("job.{status}"),
                message_type: JOB_EVENTS_V1.into(),
                message_id: Uuid::now_v7().to_string(),
                priority: 0,
                payload,
                headers: vec![("x-event-count".into(), chunk.len().to_string())],
            });
        }
    }
    out
}

/// Gathers job events from any task and publishes them in batches.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::UnboundedSender<JobEvent>,
}

impl EventSink {
    /// Starts the publishing task; it ends when every sink is dropped.
    pub fn spawn(publisher: Arc<Publisher>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<JobEvent>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            // Whatever else happens within the linger joins a batch, so a
            // steady stream costs a few messages a second per status, not
            // one per burst of claims.
            while crate::batch::gather(&mut rx, &mut batch, 4 * MAX_PER_MESSAGE, LINGER).await > 0 {
                let out = messages(&batch);
                if let Err(error) = publisher.publish_unconfirmed(&out).await {
                    tracing::debug!(%error, count = batch.len(), "job events not published");
                }
                batch.clear();
            }
        });
        Self { tx }
    }

    /// Queues one event.
    pub fn send(&self, event: JobEvent) {
        // The receiver lives as long as any sink; a send after it stopped
        // (process shutdown) is dropped like an unpublished event.
        let _ = self.tx.send(event);
    }

    /// Queues several events, in order.
    pub fn send_all(&self, events: impl IntoIterator<Item = JobEvent>) {
        for e in events {
            self.send(e);
        }
    }
}
