//! Wire messages. Every message carries its versioned AMQP `type`; a consumer
//! refuses types it does not know.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{ExecutionMode, JobStatus, SubmitRequest};

/// `type` of a work message.
pub const JOB_RUN_V1: &str = "job.run.v1";
/// `type` of an ingress message.
pub const JOB_SUBMIT_V1: &str = "job.submit.v1";
/// `type` of a batch of job events (`{"events": [JobEvent, ...]}`).
pub const JOB_EVENTS_V1: &str = "job.events.v1";
/// `type` of a control command.
pub const CONTROL_V1: &str = "control.v1";
/// Header that says why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-taskhost-reason";

/// A unit of work on `<p>.work` (`job.run.v1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRun {
    /// The job.
    pub job_id: Uuid,
    /// The attempt number when it was published; the claim increments it.
    pub attempt: i32,
    /// The command.
    pub command: String,
    /// How to run it.
    pub execution_mode: ExecutionMode,
    /// Seconds before the run is killed.
    pub timeout_seconds: Option<i32>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// 0..=9.
    pub priority: i16,
    /// When the job was accepted.
    pub submitted_at: DateTime<Utc>,
}

/// An ingress message on `<p>.submit` (`job.submit.v1`): the HTTP body plus
/// the submitting user.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSubmit {
    /// The user the job belongs to; must own an active API key.
    pub user_id: String,
    /// The same fields as `POST /jobs/submit`.
    #[serde(flatten)]
    pub request: SubmitRequest,
}

/// A job state change, carried in a `job.events.v1` batch on `<p>.events`
/// under routing key `job.<status>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobEvent {
    /// `<jobId>:<attempt>:<status>`: the same state change always has the
    /// same id, so a consumer deduplicates by it.
    pub event_id: String,
    /// The job.
    pub job_id: Uuid,
    /// Its new status.
    pub status: JobStatus,
    /// The attempt.
    pub attempt: i32,
    /// The node that ran it, if any.
    pub node_id: Option<Uuid>,
    /// The exit code, when it exited.
    pub exit_code: Option<i32>,
    /// When.
    pub at: DateTime<Utc>,
}

/// A command for running jobs on `<p>.control`, routing key `node.<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Control {
    /// Stop the job, killing its process group.
    Cancel {
        /// The job.
        job_id: Uuid,
    },
}
