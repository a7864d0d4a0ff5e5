//! Tracing (README, "Tracing"): a job's run is the `job.run` span, a
//! child of the `traceparent` header its work message carries, so the
//! api's submit, the broker hop and the run join in one trace. Nothing
//! here runs when tracing is off.

use lapin::message::Delivery;
use taskhost_common::messages::JobRun;
use taskhost_common::model::JobStatus;
use taskhost_common::store::Claimed;
use taskhost_common::telemetry::{self, amqp_header};
use tracing::Span;
use tracing::field::Empty;

use crate::Ctx;

/// The span of one delivery's run: the `job` span the logs always had and,
/// with tracing on, exported as `job.run` (a consumer span under the
/// messaging conventions) with the job's attributes.
pub(crate) fn run_span(ctx: &Ctx, delivery: &Delivery, run: &JobRun) -> Span {
    if !telemetry::enabled() {
        return tracing::info_span!("job", job_id = %run.job_id, node_id = %ctx.node_id);
    }
    let span = tracing::info_span!(
        "job",
        job_id = %run.job_id,
        node_id = %ctx.node_id,
        otel.name = "job.run",
        otel.kind = "consumer",
        otel.status_code = Empty,
        job.id = %run.job_id,
        job.mode = run.execution_mode.as_str(),
        job.attempt = Empty,
        job.state = Empty,
        messaging.system = "rabbitmq",
        "messaging.operation.type" = "process",
        messaging.destination.name = %delivery.exchange,
        messaging.rabbitmq.destination.routing_key = %delivery.routing_key,
        messaging.message.id = %run.job_id,
    );
    telemetry::set_parent(
        &span,
        amqp_header(&delivery.properties, telemetry::TRACEPARENT),
        amqp_header(&delivery.properties, telemetry::TRACESTATE),
    );
    span
}

/// Records the claimed attempt and mode (Postgres is the source of truth)
/// on the current run span.
pub(crate) fn claimed(claimed: &Claimed) {
    if telemetry::enabled() {
        let span = Span::current();
        span.record("job.attempt", claimed.attempt);
        span.record("job.mode", claimed.execution_mode.as_str());
    }
}

/// Records how the run ended on the current run span: a job state, or
/// `lost` (another worker took the claim over) or `released` (handed back
/// at shutdown). Failed, timed-out and dead runs are errors.
pub(crate) fn ended(state: &str) {
    if telemetry::enabled() {
        let span = Span::current();
        span.record("job.state", state);
        if [JobStatus::Failed, JobStatus::TimedOut, JobStatus::Dead]
            .iter()
            .any(|s| s.as_str() == state)
        {
            span.record("otel.status_code", "ERROR");
        }
    }
}
