//! The ingress queue `<p>.submit`: other systems publish `job.submit.v1`
//! messages; each takes the same path as `POST /jobs/submit`. A message that
//! cannot be accepted is dead-lettered with the reason in a header, and the
//! consumer keeps going.
//!
//! Up to [`IN_FLIGHT`] deliveries are handled at once; plain jobs among them
//! are accepted and published in batches, as the api does.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use sqlx::PgPool;
use taskhost_common::amqp::{self, Names, Publisher};
use taskhost_common::batch::Batcher;
use taskhost_common::jobs::{self, Accepted, NewJob, PlainJob, PublishBatcher};
use taskhost_common::messages::JOB_SUBMIT_V1;
use taskhost_common::metrics::BrokerLink;
use taskhost_common::model::{JobStatus, SubmitRequest, TriggeredBy};
use taskhost_common::{CancellationToken, Settings};
use taskhost_common::{db, keys, text};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span};
use uuid::Uuid;

/// Deliveries handled at once (and the consumer's prefetch).
const IN_FLIGHT: u16 = 64;

/// Tries of one message while Postgres is unreachable before it goes to
/// `<p>.dead` with the last error: with the pauses of [`handle`], about
/// ten minutes.
const RETRY_LIMIT: u32 = 65;

/// Messages counted by [`Ingress::retried`] at most; beyond, the counts
/// start over (a bound on memory, not on the tries).
const RETRY_TRACKED: usize = 100_000;

/// What the deliveries handled at once share.
struct Ingress {
    pool: PgPool,
    publisher: Arc<Publisher>,
    accepter: Batcher<PlainJob, Accepted>,
    published: PublishBatcher,
    /// `secrets.key`, which seals `secretEnv` values.
    secret_key: Option<taskhost_common::secrets::SecretKey>,
    /// Tries so far of messages that could not reach Postgres, by message id.
    retries: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl Ingress {
    fn new(pool: PgPool, settings: &Settings) -> Self {
        let publisher = Arc::new(Publisher::new(
            &settings.amqp,
            Names::new(settings.amqp.prefix.clone()),
            "taskhost-scheduler-ingress",
        ));
        let accepter = jobs::plain_accepter(pool.clone());
        let published = PublishBatcher::spawn(pool.clone(), publisher.clone());
        Self {
            pool,
            publisher,
            accepter,
            published,
            secret_key: settings.secrets.key(),
            retries: std::sync::Mutex::default(),
        }
    }

    /// Counts one more try of message `id`; returns the tries so far.
    fn retried(&self, id: &str) -> u32 {
        let Ok(mut retries) = self.retries.lock() else {
            return 1;
        };
        if retries.len() >= RETRY_TRACKED && !retries.contains_key(id) {
            retries.clear();
        }
        let tries = retries.entry(id.to_owned()).or_insert(0);
        *tries += 1;
        *tries
    }
}

/// What to do with one ingress message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted now, or already accepted before.
    Accepted(Uuid),
    /// Refused: dead-letter with this reason.
    Refused(String),
    /// Postgres is unavailable: requeue and try later.
    Retry(String),
}

/// Checks and accepts one message (its body, `type` and `message_id`).
async fn process(
    ing: &Ingress,
    body: &[u8],
    message_type: Option<&str>,
    message_id: Option<&str>,
) -> Verdict {
    if let Some(t) = message_type
        && t != JOB_SUBMIT_V1
    {
        return Verdict::Refused(format!(
            "unknown message type `{t}` (expected {JOB_SUBMIT_V1})"
        ));
    }
    let job_id = match message_id.map(str::parse::<Uuid>) {
        Some(Ok(id)) if !id.is_nil() => id,
        Some(_) => return Verdict::Refused("message_id must be a UUID (it is the job id)".into()),
        None => {
            return Verdict::Refused(
                "message_id is required (it is the job id and idempotency key)".into(),
            );
        }
    };
    let mut object = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => o,
        Ok(_) => return Verdict::Refused("body must be a JSON object".into()),
        Err(e) => return Verdict::Refused(format!("body is not valid JSON: {e}")),
    };
    // The one rule for text fields, as for HTTP bodies.
    if let Some(path) = text::nul_path(&Value::Object(object.clone())) {
        return Verdict::Refused(text::nul_refusal(&path));
    }
    let user_id = match object.remove("userId") {
        Some(Value::String(u)) if !u.trim().is_empty() => u,
        Some(_) => return Verdict::Refused("userId must be a non-empty string".into()),
        None => return Verdict::Refused("userId is required".into()),
    };
    let request: SubmitRequest = match serde_json::from_value(Value::Object(object)) {
        Ok(r) => r,
        Err(e) => return Verdict::Refused(format!("invalid body: {e}")),
    };
    let spec = match request.validate_with(ing.secret_key.as_ref()) {
        Ok(s) => s,
        Err(e) => return Verdict::Refused(format!("invalid body: {e}")),
    };
    let principal = match keys::principal_of_user(&ing.pool, &user_id).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Verdict::Refused(format!("unknown user `{user_id}` (no active API key)"));
        }
        Err(e) => return failed(&db::describe(&e)),
    };
    if !principal.has_any(spec.execution_mode.allowed_roles()) {
        return Verdict::Refused(format!(
            "user `{user_id}` may not submit {} jobs",
            spec.execution_mode
        ));
    }
    // Tracing: the work message's `publish` span, a child of the ingress
    // span; its traceparent is stored with the outbox row.
    let publish = taskhost_common::telemetry::publish_span(
        &ing.publisher.names().work(),
        &spec.target.routing_key(),
        job_id,
    );
    let accepted = if PlainJob::fits(&spec, None) {
        let plain = PlainJob {
            job_id,
            user_id: user_id.clone(),
            spec: spec.clone(),
            triggered_by: TriggeredBy::Queue,
            changed_by: user_id.clone(),
            traceparent: taskhost_common::telemetry::traceparent(&publish),
        };
        ing.accepter.call(plain).await
    } else {
        jobs::accept(
            &ing.pool,
            NewJob {
                job_id,
                user_id: &user_id,
                spec: &spec,
                triggered_by: TriggeredBy::Queue,
                idempotency_key: None,
                request_hash: None,
                changed_by: &user_id,
                task: None,
                rerun_of: None,
            },
        )
        .instrument(publish.clone())
        .await
        .map_err(|e| db::describe(&e))
    };
    match accepted {
        Ok(Accepted::Created {
            job_ids,
            outbox,
            status,
        }) => {
            if status == JobStatus::Dead {
                let events: Vec<_> = job_ids
                    .iter()
                    .map(|id| jobs::job_event(*id, JobStatus::Dead, 0, None, None))
                    .collect();
                jobs::publish_events(&ing.publisher, &events).await;
            } else if let Err(error) = ing
                .published
                .publish(outbox, "ingress")
                .instrument(publish)
                .await
            {
                tracing::warn!(%error, "fast-path publish failed; the relay will publish");
            }
            Verdict::Accepted(job_ids[0])
        }
        Ok(Accepted::Duplicate { job_id }) => {
            // A repeated message is the same job, but only for its owner: a
            // message_id naming another user's job is refused.
            match sqlx::query_scalar::<_, String>("SELECT user_id FROM jobs WHERE job_id = $1")
                .bind(job_id)
                .fetch_optional(&ing.pool)
                .await
            {
                Ok(Some(owner)) if owner != user_id => Verdict::Refused(format!(
                    "message_id {job_id} is the id of another user's job"
                )),
                Ok(_) => Verdict::Accepted(job_id),
                Err(e) => failed(&db::describe(&e)),
            }
        }
        Ok(Accepted::Conflict) => Verdict::Refused("conflicting duplicate".into()),
        Err(e) => failed(&e),
    }
}

/// A failed statement: tried again later only when Postgres could not be
/// reached; anything the message's data caused is refused with the reason.
fn failed(error: &str) -> Verdict {
    match error.strip_prefix(db::TRANSIENT) {
        Some(e) => Verdict::Retry(e.to_owned()),
        None => Verdict::Refused(format!("Postgres refused the job: {error}")),
    }
}

/// Consumes the ingress queue until shutdown, reconnecting after failures.
pub async fn run(
    pool: PgPool,
    settings: &Settings,
    broker: Arc<BrokerLink>,
    shutdown: CancellationToken,
) {
    let names = Names::new(settings.amqp.prefix.clone());
    let ing = Arc::new(Ingress::new(pool, settings));
    amqp::supervise(
        "the ingress consumer",
        "scheduler",
        &settings.amqp.url,
        &shutdown,
        || consume(&ing, settings, &names, &broker, &shutdown),
    )
    .await;
    ing.publisher.close().await;
}

async fn consume(
    ing: &Arc<Ingress>,
    settings: &Settings,
    names: &Names,
    broker: &Arc<BrokerLink>,
    shutdown: &CancellationToken,
) -> Result<(), lapin::Error> {
    let conn = amqp::connect(&settings.amqp, "taskhost-scheduler-ingress").await?;
    let ch = conn.create_channel().await?;
    amqp::declare_topology(&ch, names).await?;
    ch.basic_qos(IN_FLIGHT, BasicQosOptions::default()).await?;
    let slots = Arc::new(Semaphore::new(usize::from(IN_FLIGHT)));
    let tracker = TaskTracker::new();
    let mut consumer = ch
        .basic_consume(
            names.submit().into(),
            "taskhost-ingress".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %names.submit(), "ingress consuming");
    let _up = broker.connected();
    loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => {
                // Let the deliveries in hand finish (and be acked) first.
                tracker.close();
                let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
                let _ = conn.close(200, "scheduler stopping".into()).await;
                return Ok(());
            }
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e),
                None => return Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed))),
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let ing = ing.clone();
        tracker.spawn(async move {
            handle(&ing, delivery).await;
            drop(slot);
        });
    }
}

/// Tracing (README, "Tracing"): the consumer span of one ingress message,
/// a child of its `traceparent` (and `tracestate`) header when it has
/// one, else a new trace's root. Disabled when tracing is off.
fn ingress_span(ing: &Ingress, delivery: &lapin::message::Delivery, id: Option<&str>) -> Span {
    use taskhost_common::telemetry::{self, amqp_header};
    if !telemetry::enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "job.ingress",
        otel.name = format!("process {}", ing.publisher.names().submit()),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        "messaging.operation.type" = "process",
        messaging.destination.name = %ing.publisher.names().submit(),
        messaging.rabbitmq.destination.routing_key = %delivery.routing_key,
        messaging.message.id = id.unwrap_or_default(),
        job.id = id.unwrap_or_default(),
    );
    telemetry::set_parent(
        &span,
        amqp_header(&delivery.properties, telemetry::TRACEPARENT),
        amqp_header(&delivery.properties, telemetry::TRACESTATE),
    );
    span
}

async fn handle(ing: &Ingress, delivery: lapin::message::Delivery) {
    let kind = delivery.properties.kind().as_ref().map(|k| k.to_string());
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string());
    let span = ingress_span(ing, &delivery, id.as_deref());
    match process(ing, &delivery.data, kind.as_deref(), id.as_deref())
        .instrument(span)
        .await
    {
        Verdict::Accepted(job_id) => {
            tracing::info!(%job_id, "ingress job accepted");
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
        Verdict::Refused(reason) => amqp::dead_letter(&ing.publisher, &delivery, &reason).await,
        Verdict::Retry(error) => {
            let tries = id.as_deref().map_or(RETRY_LIMIT, |id| ing.retried(id));
            if tries >= RETRY_LIMIT {
                let reason = format!(
                    "not accepted after {tries} tries while Postgres was unreachable: {error}"
                );
                amqp::dead_letter(&ing.publisher, &delivery, &reason).await;
                return;
            }
            tracing::warn!(%error, tries, "ingress cannot reach Postgres; message requeued");
            // 1 s, 2 s, ... up to 10 s between tries: RETRY_LIMIT tries span
            // about ten minutes before the message is given up.
            tokio::time::sleep(Duration::from_secs(u64::from(tries.clamp(1, 10)))).await;
            amqp::requeue(&delivery).await;
        }
    }
}
