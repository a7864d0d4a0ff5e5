//! A fuzz suite of our own (#10): every parser and validator of outside
//! input, fed seeded random input, in bounded time, in the ordinary test run.
//!
//! What is fed, and through what:
//! - the ingress message `job.submit.v1`: the part of `process` in
//!   `scheduler/src/ingress.rs` before Postgres (JSON object, NUL check,
//!   `userId`, `SubmitRequest`, `validate`), mirrored by [`ingress`];
//! - the HTTP bodies `SubmitRequest` (`POST /jobs/submit`) and `TaskRequest`
//!   (`POST /tasks`, `PUT /tasks/{id}`) through the api's door
//!   (`parse_json` in `api/src/jobs.rs`, mirrored by [`http_body`]) and their
//!   validators (`SubmitRequest::validate`, `Task::from_request`,
//!   `Task::apply`); `SubmitRequest` also without the door;
//! - the worker's `job.run.v1` (`JobRun`, `worker/src/job.rs`) and
//!   `control.v1` (`Control`, `worker/src/consumer.rs`), and `JobEvent`;
//! - cron schedules (`Schedule::parse`), and `text::nul_path` /
//!   `text::may_hold_nul`.
//!
//! Properties: (1) nothing panics, for arbitrary bytes, arbitrary JSON,
//! objects of the known field names with arbitrary values, and mutations of
//! valid messages (bytes flipped, inserted, deleted; values replaced by other
//! JSON types, huge strings, deep nesting, NUL, unicode, numbers out of
//! range); (2) valid generated messages are accepted, and whatever parses
//! round-trips (serialize, parse, equal); (3) whatever a validator accepts
//! keeps the rules of README "HTTP API" and "Submitting over RabbitMQ"
//! (lengths, ranges, names, targets, no NUL anywhere in the input JSON) and
//! is the input's own values; (4) `nul_path` finds a NUL wherever one was put
//! into a JSON value, and the door's cheap test sees every NUL the walk sees.
//!
//! Also: the HTTP and the queue reading of the same job agree, `JobSubmit`
//! reads what the ingress accepts, cron fire times move strictly forward,
//! and no case takes longer than [`CASE_TIME_LIMIT`] (a parser that spins on
//! some input is a finding too).
//!
//! Every property runs a fixed number of cases from a fixed seed (about 2 s
//! for all of them on 2 idle cores in the debug profile). Override with
//! `TASKHOST_FUZZ_SEED` (decimal or `0x` hex; `random` draws one per
//! property) and `TASKHOST_FUZZ_CASES` (cases of every property). Each
//! property prints its seed, time, slowest case and how many inputs each
//! reader accepted (`--nocapture`). A failure names the seed and the case;
//! `TASKHOST_FUZZ_CASE=<n>` runs that case alone and prints its input:
//!
//! ```sh
//! TASKHOST_FUZZ_SEED=0x... TASKHOST_FUZZ_CASE=17 cargo test -p taskhost-common --test fuzz <property> -- --nocapture
//! ```

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use taskhost_common::messages::{Control, JobEvent, JobRun, JobSubmit};
use taskhost_common::model::{
    ExecutionMode, Fanout, INLINE_COMMANDS, JobSpec, JobStatus, SubmitRequest, Target, limits,
};
use taskhost_common::schedule::Schedule;
use taskhost_common::tasks::{MAX_RETRIES, MAX_RETRY_DELAY, Task, TaskRequest};
use taskhost_common::text;
use uuid::Uuid;

// ---------------------------------------------------------------- runner

/// The seed when `TASKHOST_FUZZ_SEED` is not set.
const DEFAULT_SEED: u64 = 0x7a5c_0010_f022_2026;

/// Longest one case may take: a parser that takes longer on some input is a
/// finding too (and far above what any case needs on a loaded machine).
const CASE_TIME_LIMIT: Duration = Duration::from_secs(5);

fn seed() -> u64 {
    match std::env::var("TASKHOST_FUZZ_SEED") {
        Err(_) => DEFAULT_SEED,
        Ok(s) if s.trim() == "random" => rand::random(),
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
                None => s.replace('_', "").parse(),
            };
            parsed.unwrap_or_else(|_| panic!("TASKHOST_FUZZ_SEED=`{s}` is not a u64"))
        }
    }
}

fn env_usize(name: &str) -> Option<usize> {
    let s = std::env::var(name).ok()?;
    Some(
        s.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}=`{s}` is not a count")),
    )
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Each case has its own seed, from the run's seed, the property and the
/// case number, so one case can be run alone.
fn case_seed(seed: u64, property: &str, case: usize) -> u64 {
    let mut h = splitmix(seed);
    for b in property.bytes() {
        h = splitmix(h ^ u64::from(b));
    }
    splitmix(h ^ case as u64)
}

/// What a case was working on, shown when it fails.
#[derive(Default)]
struct Note(String);

impl Note {
    fn bytes(&mut self, what: &str, bytes: &[u8]) {
        self.0 = format!("{what}: {}", String::from_utf8_lossy(bytes));
    }
    fn debug(&mut self, what: &str, v: &impl Debug) {
        self.0 = format!("{what}: {v:?}");
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &s[..end], s.len())
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(not a string)".into())
}

type Outcome = Result<(), String>;

thread_local! {
    /// How many inputs each reader accepted in this thread's property: a
    /// fuzz that never gets past the parsers tests little.
    static ACCEPTED: std::cell::RefCell<BTreeMap<&'static str, usize>> =
        const { std::cell::RefCell::new(BTreeMap::new()) };
}

fn accepted(what: &'static str) {
    ACCEPTED.with(|a| *a.borrow_mut().entry(what).or_default() += 1);
}

/// Runs `cases` cases of `property` (or `TASKHOST_FUZZ_CASES`, or the one
/// `TASKHOST_FUZZ_CASE`); fails naming the seed and the case.
fn fuzz(property: &str, cases: usize, mut case: impl FnMut(&mut StdRng, &mut Note) -> Outcome) {
    let seed = seed();
    let cases = env_usize("TASKHOST_FUZZ_CASES").unwrap_or(cases);
    let only = env_usize("TASKHOST_FUZZ_CASE");
    ACCEPTED.with(|a| a.borrow_mut().clear());
    let started = Instant::now();
    let mut slowest = (Duration::ZERO, 0);
    for i in only.map_or(0..cases, |only| only..only + 1) {
        let mut rng = StdRng::seed_from_u64(case_seed(seed, property, i));
        let mut note = Note::default();
        let t = Instant::now();
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| case(&mut rng, &mut note)));
        let took = t.elapsed();
        if only.is_some() {
            eprintln!("case {i} took {took:?}; {}", shorten(&note.0, 4000));
        }
        slowest = slowest.max((took, i));
        let failure = match outcome {
            Ok(Ok(())) if took > CASE_TIME_LIMIT => Some(format!("took {took:?}")),
            Ok(Ok(())) => None,
            Ok(Err(message)) => Some(message),
            Err(p) => Some(format!("panicked: {}", panic_text(p.as_ref()))),
        };
        if let Some(failure) = failure {
            panic!(
                "fuzz property `{property}` failed at case {i} of {cases}: {}\n  {}\n  \
                 reproduce: TASKHOST_FUZZ_SEED={seed:#x} TASKHOST_FUZZ_CASE={i} \
                 cargo test -p taskhost-common --test fuzz {property}",
                shorten(&failure, 2000),
                shorten(&note.0, 2000),
            );
        }
    }
    let accepted = ACCEPTED.with(|a| {
        a.borrow()
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    eprintln!(
        "fuzz {property}: {cases} cases, seed {seed:#x}, {:?} (slowest case {} took {:?}); \
         accepted: {accepted}",
        started.elapsed(),
        slowest.1,
        slowest.0
    );
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

// ------------------------------------------------------- the entry points

/// `process` in `scheduler/src/ingress.rs`, up to `validate` (what follows
/// needs Postgres). Keep in step with it.
fn ingress(body: &[u8]) -> Result<(String, SubmitRequest, JobSpec), String> {
    let mut object = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => o,
        Ok(_) => return Err("body must be a JSON object".into()),
        Err(e) => return Err(format!("body is not valid JSON: {e}")),
    };
    if let Some(path) = text::nul_path(&Value::Object(object.clone())) {
        return Err(text::nul_refusal(&path));
    }
    let user_id = match object.remove("userId") {
        Some(Value::String(u)) if !u.trim().is_empty() => u,
        Some(_) => return Err("userId must be a non-empty string".into()),
        None => return Err("userId is required".into()),
    };
    let request: SubmitRequest =
        serde_json::from_value(Value::Object(object)).map_err(|e| format!("invalid body: {e}"))?;
    let spec = request
        .clone()
        .validate()
        .map_err(|e| format!("invalid body: {e}"))?;
    Ok((user_id, request, spec))
}

/// `parse_json` in `api/src/jobs.rs`, the door of every HTTP body: NUL
/// anywhere is refused, then the typed parse. Keep in step with it.
fn http_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    http_door(body)?;
    let mut de = serde_json::Deserializer::from_slice(body);
    T::deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| format!("invalid body: {e}"))
}

/// The NUL check of `parse_json`.
fn http_door(body: &[u8]) -> Result<(), String> {
    if text::may_hold_nul(body) {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => {
                if let Some(path) = text::nul_path(&v) {
                    return Err(text::nul_refusal(&path));
                }
            }
            Err(e) => return Err(format!("body is not valid JSON: {e}")),
        }
    }
    Ok(())
}

// ------------------------------------------------------------ invariants

/// `^[a-z0-9][a-z0-9_-]{0,63}$`, written out again rather than calling
/// `model::is_valid_name`.
fn name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name.len() <= 64
}

/// `[A-Za-z_][A-Za-z0-9_]*`, at most 128 bytes.
fn env_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 128
}

/// The rules every validated job keeps, whatever it came from.
fn check_spec(spec: &JobSpec) -> Outcome {
    let name_chars = spec.job_name.chars().count();
    ensure!(
        (1..=limits::JOB_NAME_MAX).contains(&name_chars),
        "a jobName of {name_chars} characters was accepted"
    );
    ensure!(
        spec.job_name.trim() == spec.job_name,
        "jobName `{}` keeps surrounding whitespace",
        spec.job_name
    );
    ensure!(
        !spec.command.trim().is_empty(),
        "a blank command was accepted"
    );
    ensure!(
        spec.command.len() <= limits::COMMAND_MAX,
        "a command of {} bytes was accepted",
        spec.command.len()
    );
    ensure!(
        spec.description.chars().count() <= limits::DESCRIPTION_MAX,
        "a description of {} characters was accepted",
        spec.description.chars().count()
    );
    if spec.execution_mode == ExecutionMode::Inline {
        ensure!(
            INLINE_COMMANDS.contains(&spec.command.trim()),
            "inline command `{}` is not a built-in",
            spec.command
        );
    }
    if let Some(t) = spec.timeout_seconds {
        ensure!(
            (1..=limits::TIMEOUT_MAX).contains(&t),
            "timeoutSeconds {t} was accepted"
        );
    }
    ensure!(
        (0..=9).contains(&spec.priority),
        "priority {} was accepted",
        spec.priority
    );
    check_target(&spec.target)?;
    ensure!(
        spec.env.len() <= limits::ENV_MAX,
        "{} env variables were accepted",
        spec.env.len()
    );
    for name in spec.env.keys() {
        ensure!(env_name_ok(name), "env name `{name}` was accepted");
    }
    let texts = [&spec.job_name, &spec.command, &spec.description]
        .into_iter()
        .chain(spec.target.node_group.iter())
        .chain(spec.target.node_role.iter())
        .chain(spec.env.keys())
        .chain(spec.env.values());
    for t in texts {
        ensure!(!t.contains('\0'), "`{t:?}` holding NUL was accepted");
    }
    Ok(())
}

fn check_target(t: &Target) -> Outcome {
    if t.node_id.is_some() {
        ensure!(
            t.node_group.is_none() && t.node_role.is_none(),
            "nodeId with nodeGroup or nodeRole was accepted: {t:?}"
        );
    }
    for n in t.node_group.iter().chain(t.node_role.iter()) {
        ensure!(name_ok(n), "group or role `{n}` was accepted");
    }
    // The routing key is a topic key of words: no wildcard, no empty word.
    let key = t.routing_key();
    ensure!(
        !key.is_empty()
            && key
                .split('.')
                .all(|w| !w.is_empty() && !w.contains(['*', '#']))
            && key.split('.').count() <= 4,
        "routing key `{key}` of {t:?}"
    );
    Ok(())
}

/// A validated job is the request's own values.
fn check_spec_of(spec: &JobSpec, req: &SubmitRequest) -> Outcome {
    check_spec(spec)?;
    ensure!(spec.job_name == req.job_name.trim(), "jobName changed");
    ensure!(spec.command == req.command, "command changed");
    ensure!(
        spec.description == req.description.clone().unwrap_or_default(),
        "description changed"
    );
    let mode = match &req.execution_mode {
        None => ExecutionMode::Pool,
        Some(m) => m
            .parse()
            .map_err(|e| format!("executionMode `{m}` was accepted: {e}"))?,
    };
    ensure!(spec.execution_mode == mode, "executionMode changed");
    ensure!(
        spec.timeout_seconds.map(i64::from) == req.timeout_seconds,
        "timeoutSeconds {:?} became {:?}",
        req.timeout_seconds,
        spec.timeout_seconds
    );
    ensure!(
        i64::from(spec.priority) == req.priority.unwrap_or(5),
        "priority {:?} became {}",
        req.priority,
        spec.priority
    );
    let t = req.target.clone().unwrap_or_default();
    let fanout = match &t.fanout {
        None => Fanout::One,
        Some(f) => f
            .parse()
            .map_err(|e| format!("fanout `{f}` was accepted: {e}"))?,
    };
    let expected = Target {
        node_id: t.node_id,
        node_group: t.node_group,
        node_role: t.node_role,
        fanout,
    };
    ensure!(spec.target == expected, "target {:?} changed", req.target);
    ensure!(
        spec.env == req.env.clone().unwrap_or_default(),
        "env changed"
    );
    Ok(())
}

/// The rules every validated task keeps.
fn check_task(task: &Task) -> Outcome {
    for (field, v) in [("taskName", &task.task_name), ("appName", &task.app_name)] {
        let n = v.chars().count();
        ensure!((1..=200).contains(&n), "a {field} of {n} characters");
        ensure!(v.trim() == v, "{field} `{v}` keeps surrounding whitespace");
    }
    Schedule::parse(&task.schedule, &task.timezone)
        .map_err(|e| format!("a task with a bad schedule was accepted: {e}"))?;
    task.validate()
        .map_err(|e| format!("an accepted task does not validate: {e}"))?;
    let spec = task
        .job_spec()
        .map_err(|e| format!("an accepted task has no job: {e}"))?;
    check_spec(&spec)?;
    ensure!(
        spec.target == task.target(),
        "the job's target is not the task's"
    );
    ensure!(
        (0..=MAX_RETRIES).contains(&i64::from(task.max_retries)),
        "maxRetries {}",
        task.max_retries
    );
    ensure!(
        (0..=MAX_RETRY_DELAY).contains(&i64::from(task.retry_delay_seconds)),
        "retryDelaySeconds {}",
        task.retry_delay_seconds
    );
    ensure!(task.parameters.is_object(), "parameters not an object");
    ensure!(
        task.tags
            .as_array()
            .is_some_and(|t| t.iter().all(Value::is_string)),
        "tags {} not an array of strings",
        task.tags
    );
    ensure!(
        task.environment
            .as_object()
            .is_some_and(|e| e.values().all(Value::is_string)),
        "environment not an object of strings"
    );
    Ok(())
}

/// A task made from `req` is the request's own values.
fn check_task_of(task: &Task, req: &TaskRequest) -> Outcome {
    check_task(task)?;
    let trimmed = |v: &Option<String>, default: &str| {
        v.as_deref()
            .map_or(default.to_owned(), |s| s.trim().to_owned())
    };
    ensure!(
        task.task_name == trimmed(&req.task_name, ""),
        "taskName changed"
    );
    ensure!(
        task.app_name == trimmed(&req.app_name, "default"),
        "appName changed"
    );
    ensure!(
        task.command == req.command.clone().unwrap_or_default(),
        "command changed"
    );
    ensure!(
        task.schedule == trimmed(&req.schedule, ""),
        "schedule changed"
    );
    ensure!(
        task.timezone == trimmed(&req.timezone, "UTC"),
        "timezone changed"
    );
    ensure!(
        i64::from(task.priority) == req.priority.unwrap_or(5),
        "priority {:?} became {}",
        req.priority,
        task.priority
    );
    ensure!(
        task.timeout_seconds.map(i64::from) == req.timeout_seconds.flatten(),
        "timeoutSeconds {:?} became {:?}",
        req.timeout_seconds,
        task.timeout_seconds
    );
    ensure!(
        i64::from(task.max_retries) == req.max_retries.unwrap_or(0),
        "maxRetries changed"
    );
    ensure!(
        task.assigned_node_id == req.assigned_node_id.flatten()
            && task.assigned_node_group == req.assigned_node_group.clone().flatten()
            && task.assigned_node_role == req.assigned_node_role.clone().flatten(),
        "assignment changed"
    );
    Ok(())
}

/// `v` serializes, parses back, and is the same.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(v: &T, what: &str) -> Outcome {
    round_trip_by(v, what, |a, b| a == b)
}

/// The same for a type without `PartialEq`, compared by `same`.
fn round_trip_by<T: Serialize + DeserializeOwned + Debug>(
    v: &T,
    what: &str,
    same: impl Fn(&T, &T) -> bool,
) -> Outcome {
    let (text, back) = serialized_and_back(v, what)?;
    if !same(v, &back) {
        return Err(round_trip_changed(what, v, &text, &back));
    }
    Ok(())
}

fn same_job_submit(a: &JobSubmit, b: &JobSubmit) -> bool {
    a.user_id == b.user_id && a.request == b.request
}

fn same_task(a: &Task, b: &Task) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// Equal values, and the fields that may be cleared are absent (`None`) or
/// named (`Some`) alike: `null` clears them, absent leaves them.
fn same_task_request(a: &TaskRequest, b: &TaskRequest) -> bool {
    let named = |r: &TaskRequest| {
        [
            r.assigned_node_id.is_some(),
            r.assigned_node_group.is_some(),
            r.assigned_node_role.is_some(),
            r.timeout_seconds.is_some(),
        ]
    };
    named(a) == named(b) && serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

fn serialized_and_back<T: Serialize + DeserializeOwned>(
    v: &T,
    what: &str,
) -> Result<(Vec<u8>, T), String> {
    let text = serde_json::to_vec(v).map_err(|e| format!("{what} does not serialize: {e}"))?;
    let back = serde_json::from_slice(&text).map_err(|e| {
        format!(
            "{what} does not parse back: {e}: {}",
            shorten(&String::from_utf8_lossy(&text), 600)
        )
    })?;
    Ok((text, back))
}

fn round_trip_changed<T: Debug>(what: &str, v: &T, text: &[u8], back: &T) -> String {
    format!(
        "{what} changed in a round trip:\n    {}\n -> {}\n -> {}",
        shorten(&format!("{v:?}"), 600),
        shorten(&String::from_utf8_lossy(text), 600),
        shorten(&format!("{back:?}"), 600)
    )
}

/// A valid task to apply `PUT` bodies to.
fn base_task() -> Task {
    let req = TaskRequest {
        task_name: Some("base".into()),
        command: Some("echo hi".into()),
        schedule: Some("*/5 * * * *".into()),
        assigned_node_group: Some(Some("prod".into())),
        timeout_seconds: Some(Some(600)),
        ..Default::default()
    };
    Task::from_request(req, "fuzz").expect("the base task is valid")
}

/// Feeds `bytes` to every parser, and checks what each accepts.
fn exercise(bytes: &[u8]) -> Outcome {
    let value = serde_json::from_slice::<Value>(bytes).ok();
    let nul_in_input = value.as_ref().and_then(text::nul_path);
    // (4) The door's cheap test sees every NUL the walk sees.
    if let Some(path) = &nul_in_input {
        ensure!(
            text::may_hold_nul(bytes),
            "may_hold_nul misses the NUL at {path}"
        );
    }

    // The ingress message.
    if let Ok((user, req, spec)) = ingress(bytes) {
        accepted("ingress");
        ensure!(!user.trim().is_empty(), "a blank userId was accepted");
        ensure!(
            nul_in_input.is_none(),
            "ingress accepted a NUL at {nul_in_input:?}"
        );
        check_spec_of(&spec, &req)?;
        round_trip(&req, "SubmitRequest")?;
        // The documented type of the message reads the same job (from the
        // parsed value, as the ingress: a repeated key is the last one).
        let typed: JobSubmit = serde_json::from_value(value.clone().unwrap_or_default())
            .map_err(|e| format!("ingress accepts what JobSubmit refuses: {e}"))?;
        ensure!(
            typed.user_id == user && typed.request == req,
            "JobSubmit reads another job than ingress: {typed:?}"
        );
    }
    if let Ok(typed) = serde_json::from_slice::<JobSubmit>(bytes) {
        round_trip_by(&typed, "JobSubmit", same_job_submit)?;
    }

    // The HTTP bodies: `serde_json::from_slice` is the typed parse of
    // `parse_json`, which takes them only through its door.
    let through_door = http_door(bytes).is_ok();
    if through_door {
        ensure!(nul_in_input.is_none(), "the door let through a NUL");
    }

    // POST /jobs/submit, through the door and without it: validate() alone
    // refuses NUL in every field.
    if let Ok(req) = serde_json::from_slice::<SubmitRequest>(bytes) {
        round_trip(&req, "SubmitRequest")?;
        if let Ok(spec) = req.clone().validate() {
            accepted("POST /jobs/submit");
            check_spec_of(&spec, &req)?;
            ensure!(
                nul_in_input.is_none(),
                "validate() accepted a NUL at {nul_in_input:?}"
            );
        }
    }

    // POST /tasks and PUT /tasks/{id}.
    if let Ok(req) = serde_json::from_slice::<TaskRequest>(bytes) {
        round_trip_by(&req, "TaskRequest", same_task_request)?;
        if through_door {
            if let Ok(task) = Task::from_request(req.clone(), "fuzz") {
                accepted("POST /tasks");
                check_task_of(&task, &req)?;
                round_trip_by(&task, "Task", same_task)?;
            }
            let mut task = base_task();
            if task.apply(req).is_ok() {
                accepted("PUT /tasks");
                check_task(&task)?;
            }
        }
    }

    // The worker's messages, and events.
    if let Ok(run) = serde_json::from_slice::<JobRun>(bytes) {
        accepted("job.run.v1");
        round_trip(&run, "JobRun")?;
    }
    if let Ok(control) = serde_json::from_slice::<Control>(bytes) {
        accepted("control.v1");
        round_trip(&control, "Control")?;
    }
    if let Ok(event) = serde_json::from_slice::<JobEvent>(bytes) {
        accepted("JobEvent");
        round_trip(&event, "JobEvent")?;
    }
    Ok(())
}

// ------------------------------------------------------------ generators

/// Text that has broken parsers before: empty, whitespace of every kind,
/// NUL and its spellings, quotes, escapes, unicode from every plane.
const PIECES: &[&str] = &[
    "",
    " ",
    "\t",
    "\n",
    "\r\n",
    "\0",
    "a",
    "Z",
    "_",
    "-",
    ".",
    "*",
    "#",
    "/",
    "\\",
    "\"",
    "'",
    "\\u0000",
    "%00",
    "\u{1}",
    "\u{1f}",
    "\u{7f}",
    "\u{a0}",
    "\u{ad}",
    "é",
    "ß",
    "日本語",
    "🦀",
    "👩‍👩‍👧",
    "\u{200b}",
    "\u{202e}",
    "\u{2028}",
    "\u{3000}",
    "\u{feff}",
    "\u{fffd}",
    "\u{10ffff}",
    "e\u{301}",
    "null",
    "true",
    "0",
    "-1",
    "1e999",
    "99999999999999999999",
    "${HOME}",
    "$(id)",
    "`id`",
    "; rm -rf /",
    "'; DROP TABLE jobs; --",
    "<script>",
    "..",
    "../../etc/passwd",
];

/// Words the validators know, and near misses of them.
const WORDS: &[&str] = &[
    "pool",
    "background",
    "inline",
    "Runspace",
    "BackgroundJob",
    "MainLoop",
    "Pool",
    "INLINE",
    " pool",
    "noop",
    "diagnostics",
    " noop ",
    "Noop",
    "one",
    "all",
    "ALL",
    "catch_up",
    "skip",
    "allow",
    "fail",
    "hold",
    "CatchUp",
    "UTC",
    "utc",
    "Europe/Berlin",
    "America/New_York",
    "Mars/Base",
    "* * * * *",
    "*/5 * * * * *",
    "@hourly",
    "@reboot",
    "prod",
    "gpu",
    "Bad Group",
    "a.b",
    "-x",
    "_x",
    "x*",
    "x#",
    "HOME",
    "PATH",
    "1ABC",
    "A-B",
    "00000000-0000-0000-0000-000000000000",
    "0193b4c2-3f1e-7a0b-8c9d-0123456789ab",
    "0193b4c2-3f1e-7a0b-8c9d-0123456789a",
    "{0193b4c2-3f1e-7a0b-8c9d-0123456789ab}",
    "2026-11-30T12:00:00Z",
    "2026-11-30T12:00:00.123456789+14:00",
    "2016-12-31T23:59:60Z",
    "0000-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999999Z",
    "+10000-01-01T00:00:00Z",
    "2026-02-30T00:00:00Z",
    "cancel",
    "Cancel",
    "pending",
    "timed_out",
    "succeeded",
];

/// Integers and floats at the edges of every range a field has.
fn edge_number(rng: &mut StdRng) -> Value {
    const INTS: &[i64] = &[
        0,
        1,
        -1,
        5,
        9,
        10,
        20,
        21,
        100,
        101,
        128,
        200,
        201,
        2000,
        2001,
        32_767,
        32_768,
        -32_768,
        -32_769,
        65_536,
        86_400,
        86_401,
        604_800,
        604_801,
        i32::MAX as i64,
        i32::MAX as i64 + 1,
        i32::MIN as i64,
        i32::MIN as i64 - 1,
        i64::MAX,
        i64::MIN,
    ];
    match rng.random_range(0..10) {
        0..=5 => json!(*INTS.choose(rng).expect("not empty")),
        6 => json!(u64::MAX - rng.random_range(0..3)),
        7 => json!(rng.random::<i64>()),
        8 => json!(
            [
                0.5,
                -0.0,
                1.0,
                5.0,
                1e300,
                -1e300,
                f64::MIN_POSITIVE,
                9.999_999_999
            ]
            .choose(rng)
            .copied()
            .unwrap_or(0.5)
        ),
        _ => json!(rng.random_range(-1000..1000)),
    }
}

/// Any char, NUL included, weighted toward ASCII.
fn any_char(rng: &mut StdRng) -> char {
    match rng.random_range(0..10) {
        0..=5 => char::from(rng.random_range(0x20u8..0x7f)),
        6 => char::from(rng.random_range(0u8..0x20)),
        7 => char::from_u32(rng.random_range(0x80..0x800)).unwrap_or('é'),
        8 => char::from_u32(rng.random_range(0x800..0x1_0000)).unwrap_or('日'),
        _ => char::from_u32(rng.random_range(0x1_0000..0x11_0000)).unwrap_or('🦀'),
    }
}

/// A string at or around a length limit (in chars or bytes).
fn huge(rng: &mut StdRng) -> String {
    // The limits of names (64, 128), jobName (200), description (2000),
    // command (64 KiB), and now and then a whole body (api.max_body_bytes).
    let len = match rng.random_range(0..40) {
        0 => 256 * 1024,
        1..=8 => *[65_535usize, 65_536, 65_537]
            .choose(rng)
            .expect("not empty"),
        _ => *[
            63usize, 64, 65, 127, 128, 129, 199, 200, 201, 1999, 2000, 2001,
        ]
        .choose(rng)
        .expect("not empty"),
    };
    // NUL (six bytes as JSON, `\u0000`) only in the shorter ones: a long
    // run of them costs time and finds nothing a short one does not.
    let fills: &[&str] = if len > 2001 {
        &["a", "é", "日", "🦀", " "]
    } else {
        &["a", "é", "日", "🦀", " ", "\0", "x\0"]
    };
    let fill = *fills.choose(rng).expect("not empty");
    if len > 65_537 || rng.random_bool(0.5) {
        // `len` bytes (cut at a char boundary) rather than `len` fills.
        let mut s = fill.repeat(len.div_ceil(fill.len()));
        let mut end = len.min(s.len());
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s
    } else {
        fill.repeat(len)
    }
}

/// Any string: the pieces above, words, random chars, huge ones.
fn nasty(rng: &mut StdRng) -> String {
    match rng.random_range(0..20) {
        18 if rng.random_ratio(1, 3) => huge(rng),
        0 => String::new(),
        1..=8 => (0..rng.random_range(1..6))
            .map(|_| *PIECES.choose(rng).expect("not empty"))
            .collect(),
        9..=12 => (*WORDS.choose(rng).expect("not empty")).to_owned(),
        13..=17 => (0..rng.random_range(0..40))
            .map(|_| any_char(rng))
            .collect(),
        _ => Uuid::from_u128(rng.random()).to_string(),
    }
}

/// Any JSON value, `depth` levels deep at most.
fn arb_json(rng: &mut StdRng, depth: u32) -> Value {
    if depth == 0 || rng.random_bool(0.5) {
        return match rng.random_range(0..8) {
            0 => Value::Null,
            1 => Value::Bool(rng.random()),
            2 | 3 => edge_number(rng),
            _ => Value::String(nasty(rng)),
        };
    }
    if rng.random_bool(0.4) {
        Value::Array(
            (0..rng.random_range(0..5))
                .map(|_| arb_json(rng, depth - 1))
                .collect(),
        )
    } else {
        Value::Object(
            (0..rng.random_range(0..6))
                .map(|_| (nasty(rng), arb_json(rng, depth - 1)))
                .collect(),
        )
    }
}

const SUBMIT_FIELDS: &[&str] = &[
    "jobName",
    "command",
    "description",
    "executionMode",
    "timeoutSeconds",
    "priority",
    "target",
    "env",
];
const TARGET_FIELDS: &[&str] = &["nodeId", "nodeGroup", "nodeRole", "fanout"];
const TASK_FIELDS: &[&str] = &[
    "taskName",
    "appName",
    "command",
    "executionMode",
    "schedule",
    "timezone",
    "enabled",
    "assignedNodeId",
    "assignedNodeGroup",
    "assignedNodeRole",
    "fanout",
    "priority",
    "timeoutSeconds",
    "maxRetries",
    "retryDelaySeconds",
    "killOnTimeout",
    "misfirePolicy",
    "overlapPolicy",
    "noNodePolicy",
    "description",
    "tags",
    "parameters",
    "after",
    "environment",
];
const RUN_FIELDS: &[&str] = &[
    "job_id",
    "attempt",
    "command",
    "execution_mode",
    "timeout_seconds",
    "env",
    "priority",
    "submitted_at",
];
const EVENT_FIELDS: &[&str] = &[
    "eventId", "jobId", "status", "attempt", "nodeId", "exitCode", "at",
];

/// A value a field of ours might be given: plausible or not.
fn field_value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..10) {
        0..=2 => Value::String((*WORDS.choose(rng).expect("not empty")).to_owned()),
        3 => edge_number(rng),
        4 => Value::Null,
        5 => soup(rng, TARGET_FIELDS),
        6 => Value::Object(
            (0..rng.random_range(0..4))
                .map(|_| (nasty(rng), Value::String(nasty(rng))))
                .collect(),
        ),
        _ => arb_json(rng, 2),
    }
}

/// An object of known field names (`keys`, now and then another) with
/// values of any kind: it gets past the parsers far more often than
/// random JSON and so reaches the validators.
fn soup(rng: &mut StdRng, keys: &[&str]) -> Value {
    let mut m = Map::new();
    for _ in 0..rng.random_range(0..keys.len() + 2) {
        let key = if rng.random_bool(0.9) {
            (*keys.choose(rng).expect("not empty")).to_owned()
        } else {
            nasty(rng)
        };
        m.insert(key, field_value(rng));
    }
    Value::Object(m)
}

/// Text without NUL, `0..=max` chars.
fn clean_text(rng: &mut StdRng, max: usize) -> String {
    let n = rng.random_range(0..=max);
    (0..n)
        .map(|_| match any_char(rng) {
            '\0' => '0',
            c => c,
        })
        .collect()
}

/// Non-blank text without NUL, at most `max` chars once trimmed (often
/// exactly `max`), maybe with whitespace around it.
fn clean_line(rng: &mut StdRng, max: usize) -> String {
    let mut s = if rng.random_ratio(1, 20) {
        ["é", "x", "日", "🦀"]
            .choose(rng)
            .expect("not empty")
            .repeat(max)
    } else {
        clean_text(rng, max.min(60))
    };
    if s.trim().is_empty() {
        s = "x".into();
    }
    if rng.random_ratio(1, 5) {
        s = format!(" \t{s}\u{3000}");
    }
    s
}

fn valid_name(rng: &mut StdRng) -> String {
    const FIRST: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    const REST: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_-";
    let len = if rng.random_ratio(1, 10) {
        64
    } else {
        rng.random_range(1..=12)
    };
    let mut s = String::from(char::from(*FIRST.choose(rng).expect("not empty")));
    while s.len() < len {
        s.push(char::from(*REST.choose(rng).expect("not empty")));
    }
    s
}

fn valid_env(rng: &mut StdRng) -> BTreeMap<String, String> {
    const FIRST: &[u8] = b"ABCXYZabcxyz_";
    const REST: &[u8] = b"ABCXYZabcxyz_0123456789";
    let n = if rng.random_ratio(1, 20) {
        limits::ENV_MAX
    } else {
        rng.random_range(0..5)
    };
    let mut env = BTreeMap::new();
    while env.len() < n {
        let len = if rng.random_ratio(1, 20) {
            128
        } else {
            rng.random_range(1..=10)
        };
        let mut name = String::from(char::from(*FIRST.choose(rng).expect("not empty")));
        while name.len() < len {
            name.push(char::from(*REST.choose(rng).expect("not empty")));
        }
        env.insert(name, clean_text(rng, 30));
    }
    env
}

/// Absent, `null`, or a value made by `v`.
fn maybe(
    rng: &mut StdRng,
    m: &mut Map<String, Value>,
    key: &str,
    v: impl FnOnce(&mut StdRng) -> Value,
) {
    match rng.random_range(0..4) {
        0 => {}
        1 => {
            m.insert(key.into(), Value::Null);
        }
        _ => {
            m.insert(key.into(), v(rng));
        }
    }
}

/// Absent or a value made by `v`, half the time each.
fn half(
    rng: &mut StdRng,
    m: &mut Map<String, Value>,
    key: &str,
    v: impl FnOnce(&mut StdRng) -> Value,
) {
    if rng.random_bool(0.5) {
        m.insert(key.into(), v(rng));
    }
}

fn valid_mode_and_command(rng: &mut StdRng) -> (Option<&'static str>, String) {
    let mode = *[
        None,
        Some("pool"),
        Some("background"),
        Some("inline"),
        Some("Runspace"),
        Some("BackgroundJob"),
        Some("MainLoop"),
    ]
    .choose(rng)
    .expect("not empty");
    let command = if matches!(mode, Some("inline" | "MainLoop")) {
        let c = *INLINE_COMMANDS.choose(rng).expect("not empty");
        if rng.random_bool(0.3) {
            format!(" {c}\n")
        } else {
            c.to_owned()
        }
    } else if rng.random_ratio(1, 30) {
        "x".repeat(limits::COMMAND_MAX)
    } else {
        clean_line(rng, 200)
    };
    (mode, command)
}

/// A `POST /jobs/submit` body the README says is valid.
fn valid_submit(rng: &mut StdRng) -> Value {
    let mut m = Map::new();
    m.insert(
        "jobName".into(),
        json!(clean_line(rng, limits::JOB_NAME_MAX)),
    );
    let (mode, command) = valid_mode_and_command(rng);
    m.insert("command".into(), json!(command));
    if let Some(mode) = mode {
        m.insert("executionMode".into(), json!(mode));
    }
    let description = if rng.random_ratio(1, 20) {
        "é".repeat(limits::DESCRIPTION_MAX)
    } else {
        clean_text(rng, 80)
    };
    maybe(rng, &mut m, "description", |_| json!(description));
    let timeout = *[1, 60, 3600, limits::TIMEOUT_MAX]
        .choose(rng)
        .expect("not empty");
    maybe(rng, &mut m, "timeoutSeconds", |_| json!(timeout));
    maybe(rng, &mut m, "priority", |rng| {
        json!(rng.random_range(0..=9))
    });
    let mut t = Map::new();
    if rng.random_bool(0.3) {
        t.insert("nodeId".into(), json!(Uuid::from_u128(rng.random())));
        if rng.random_bool(0.2) {
            t.insert("nodeGroup".into(), Value::Null);
        }
    } else {
        maybe(rng, &mut t, "nodeGroup", |rng| json!(valid_name(rng)));
        maybe(rng, &mut t, "nodeRole", |rng| json!(valid_name(rng)));
    }
    maybe(rng, &mut t, "fanout", |rng| {
        json!(["one", "all"].choose(rng))
    });
    maybe(rng, &mut m, "target", |_| Value::Object(t));
    maybe(rng, &mut m, "env", |rng| json!(valid_env(rng)));
    Value::Object(m)
}

/// A `job.submit.v1` body the README says is valid.
fn valid_job_submit(rng: &mut StdRng) -> Value {
    let mut v = valid_submit(rng);
    if let Value::Object(m) = &mut v {
        m.insert("userId".into(), json!(clean_line(rng, 40)));
    }
    v
}

/// A cron field: `*`, `*/n`, `a`, `a-b`, `a,b`, `a-b/n` within `lo..=hi`.
fn cron_field(rng: &mut StdRng, lo: u32, hi: u32) -> String {
    let mut a = rng.random_range(lo..=hi);
    let mut b = rng.random_range(lo..=hi);
    if a > b {
        std::mem::swap(&mut a, &mut b);
    }
    let n = rng.random_range(1..=(hi - lo + 1));
    match rng.random_range(0..6) {
        0 => "*".into(),
        1 => format!("*/{n}"),
        2 => a.to_string(),
        3 => format!("{a}-{b}"),
        4 => format!("{a},{b}"),
        _ => format!("{a}-{b}/{n}"),
    }
}

/// A schedule that fires (days of the month up to 28, so every month has
/// them).
fn valid_schedule(rng: &mut StdRng) -> String {
    if rng.random_ratio(1, 6) {
        return (*["@hourly", "@daily", "@weekly", "@monthly", "@yearly"]
            .choose(rng)
            .expect("not empty"))
        .to_owned();
    }
    let mut fields = vec![
        cron_field(rng, 0, 59),
        cron_field(rng, 0, 23),
        cron_field(rng, 1, 28),
        cron_field(rng, 1, 12),
        cron_field(rng, 0, 6),
    ];
    if rng.random_bool(0.3) {
        fields.insert(0, cron_field(rng, 0, 59));
    }
    fields.join(" ")
}

fn valid_timezone(rng: &mut StdRng) -> String {
    chrono_tz::TZ_VARIANTS
        .choose(rng)
        .expect("not empty")
        .name()
        .to_owned()
}

/// A `POST /tasks` body the README says is valid.
fn valid_task(rng: &mut StdRng) -> Value {
    let mut m = Map::new();
    m.insert("taskName".into(), json!(clean_line(rng, 200)));
    if rng.random_bool(0.5) {
        m.insert("appName".into(), json!(clean_line(rng, 200)));
    }
    let (mode, command) = valid_mode_and_command(rng);
    m.insert("command".into(), json!(command));
    if let Some(mode) = mode {
        m.insert("executionMode".into(), json!(mode));
    }
    m.insert("schedule".into(), json!(valid_schedule(rng)));
    if rng.random_bool(0.7) {
        m.insert("timezone".into(), json!(valid_timezone(rng)));
    }
    if rng.random_bool(0.5) {
        m.insert("enabled".into(), json!(rng.random::<bool>()));
    }
    if rng.random_bool(0.3) {
        maybe(rng, &mut m, "assignedNodeId", |rng| {
            json!(Uuid::from_u128(rng.random()))
        });
    } else {
        maybe(rng, &mut m, "assignedNodeGroup", |rng| {
            json!(valid_name(rng))
        });
        maybe(rng, &mut m, "assignedNodeRole", |rng| {
            json!(valid_name(rng))
        });
    }
    let pick = |rng: &mut StdRng, a: &str, b: &str| json!(if rng.random() { a } else { b });
    half(rng, &mut m, "fanout", |rng| pick(rng, "one", "all"));
    half(rng, &mut m, "priority", |rng| {
        json!(rng.random_range(0..=9))
    });
    half(rng, &mut m, "maxRetries", |rng| {
        json!(rng.random_range(0..=MAX_RETRIES))
    });
    half(rng, &mut m, "retryDelaySeconds", |rng| {
        json!(rng.random_range(0..=MAX_RETRY_DELAY))
    });
    half(rng, &mut m, "killOnTimeout", |rng| {
        json!(rng.random::<bool>())
    });
    half(rng, &mut m, "misfirePolicy", |rng| {
        pick(rng, "catch_up", "skip")
    });
    half(rng, &mut m, "overlapPolicy", |rng| {
        pick(rng, "skip", "allow")
    });
    half(rng, &mut m, "noNodePolicy", |rng| pick(rng, "fail", "hold"));
    let timeout = *[1, 60, limits::TIMEOUT_MAX].choose(rng).expect("not empty");
    maybe(rng, &mut m, "timeoutSeconds", |_| json!(timeout));
    if rng.random_bool(0.5) {
        m.insert("description".into(), json!(clean_text(rng, 80)));
    }
    if rng.random_bool(0.5) {
        let tags: Vec<String> = (0..rng.random_range(0..4))
            .map(|_| clean_text(rng, 10))
            .collect();
        m.insert("tags".into(), json!(tags));
    }
    if rng.random_bool(0.5) {
        m.insert("environment".into(), json!(valid_env(rng)));
    }
    if rng.random_bool(0.5) {
        // Declared parameters (README, "Chains and parameters"): each with
        // a default, so the schedule can run the task.
        let mut p = serde_json::Map::new();
        // Each is a variable of the run too, so they fit the environment's limit.
        let env_len = m
            .get("environment")
            .and_then(Value::as_object)
            .map_or(0, |e| e.len());
        let room = limits::ENV_MAX.saturating_sub(env_len).min(3);
        for i in 0..rng.random_range(0..=room) {
            let def = match rng.random_range(0..4) {
                0 => json!({"type": "string", "default": clean_text(rng, 20)}),
                1 => json!({"type": "int", "default": rng.random_range(-1000i64..1000)}),
                2 => json!({"type": "bool", "default": rng.random_bool(0.5)}),
                _ => {
                    json!({"type": "enum", "values": ["a", "b"], "default": "b", "required": true})
                }
            };
            p.insert(format!("p{i}"), def);
        }
        m.insert("parameters".into(), Value::Object(p));
    }
    Value::Object(m)
}

/// Any instant chrono can print and read back as RFC 3339 (years 0 to
/// 9999, any nanosecond).
fn timestamp(rng: &mut StdRng) -> DateTime<Utc> {
    let min = Utc
        .with_ymd_and_hms(0, 1, 1, 0, 0, 0)
        .single()
        .expect("a valid date")
        .timestamp();
    let max = Utc
        .with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
        .single()
        .expect("a valid date")
        .timestamp();
    let secs = if rng.random_bool(0.5) {
        rng.random_range(min..=max)
    } else {
        rng.random_range(1_700_000_000..1_900_000_000)
    };
    DateTime::from_timestamp(secs, rng.random_range(0..1_000_000_000)).expect("in range")
}

fn any_mode(rng: &mut StdRng) -> ExecutionMode {
    *ExecutionMode::ALL.choose(rng).expect("not empty")
}

/// A `job.run.v1` as the scheduler or api would publish it (any values of
/// the types: the worker takes the job from its claim, not the message).
fn valid_run(rng: &mut StdRng) -> JobRun {
    let mut env = BTreeMap::new();
    for _ in 0..rng.random_range(0..4) {
        env.insert(nasty(rng), nasty(rng));
    }
    JobRun {
        job_id: Uuid::from_u128(rng.random()),
        attempt: rng.random(),
        command: nasty(rng),
        execution_mode: any_mode(rng),
        timeout_seconds: rng.random_bool(0.5).then(|| rng.random()),
        env,
        priority: rng.random(),
        submitted_at: timestamp(rng),
    }
}

fn valid_event(rng: &mut StdRng) -> JobEvent {
    let job_id = Uuid::from_u128(rng.random());
    let status = *JobStatus::ALL.choose(rng).expect("not empty");
    let attempt = rng.random();
    JobEvent {
        event_id: format!("{job_id}:{attempt}:{status}"),
        job_id,
        status,
        attempt,
        node_id: rng.random_bool(0.5).then(|| Uuid::from_u128(rng.random())),
        exit_code: rng.random_bool(0.5).then(|| rng.random()),
        at: timestamp(rng),
    }
}

// ------------------------------------------------------------- mutations

fn strip_nul(v: &mut Value) {
    match v {
        Value::String(s) => *s = s.replace('\0', "0"),
        Value::Array(items) => items.iter_mut().for_each(strip_nul),
        Value::Object(map) => {
            let old = std::mem::take(map);
            for (k, mut item) in old {
                strip_nul(&mut item);
                map.insert(k.replace('\0', "0"), item);
            }
        }
        _ => {}
    }
}

/// `s` with `c` put in at a random char boundary.
fn insert_at(rng: &mut StdRng, s: &str, c: char) -> String {
    let bounds: Vec<usize> = (0..=s.len()).filter(|&i| s.is_char_boundary(i)).collect();
    let at = *bounds.choose(rng).expect("not empty");
    format!("{}{c}{}", &s[..at], &s[at..])
}

/// One change somewhere in `v`: a value of another type, NUL, a huge
/// string, an edge number, a field removed, renamed or added, deep nesting.
fn mutate_value(rng: &mut StdRng, v: &mut Value) {
    let descend = match v {
        Value::Object(m) => !m.is_empty() && rng.random_bool(0.8),
        Value::Array(a) => !a.is_empty() && rng.random_bool(0.7),
        _ => false,
    };
    if descend {
        match v {
            Value::Object(m) => {
                let n = rng.random_range(0..m.len());
                if let Some(child) = m.values_mut().nth(n) {
                    mutate_value(rng, child);
                }
            }
            Value::Array(a) => {
                let n = rng.random_range(0..a.len());
                mutate_value(rng, &mut a[n]);
            }
            _ => {}
        }
        return;
    }
    if rng.random_bool(0.6) {
        return same_type_other_value(rng, v);
    }
    match rng.random_range(0..12) {
        0 => *v = arb_json(rng, 2),
        1 => *v = field_value(rng),
        2 => match v {
            Value::String(s) => *s = insert_at(rng, s, '\0'),
            other => *other = json!("\0"),
        },
        3 => match v {
            Value::String(s) => {
                let c = any_char(rng);
                *s = insert_at(rng, s, c);
            }
            other => *other = Value::String(nasty(rng)),
        },
        4 => *v = Value::String(huge(rng)),
        5 => *v = edge_number(rng),
        6 => *v = Value::Null,
        7 => {
            // Deep nesting, around serde_json's recursion limit (128).
            for _ in 0..rng.random_range(1..140) {
                *v = if rng.random_bool(0.5) {
                    json!([v.take()])
                } else {
                    json!({ "a": v.take() })
                };
            }
        }
        8 => {
            // A number as a string, a string as a number, a value in an
            // array.
            *v = match v.take() {
                Value::Number(n) => Value::String(n.to_string()),
                Value::String(s) => s
                    .trim()
                    .parse::<i64>()
                    .map_or_else(|_| json!([s]), |n| json!(n)),
                other => json!([other]),
            };
        }
        _ => {
            if let Value::Object(m) = v {
                let keys: Vec<String> = m.keys().cloned().collect();
                match (rng.random_range(0..4), keys.choose(rng)) {
                    (0, Some(k)) => {
                        m.remove(k);
                    }
                    (1, Some(k)) => {
                        // Renamed: other case, snake_case, a NUL in it.
                        let item = m.remove(k).unwrap_or_default();
                        let renamed = match rng.random_range(0..3) {
                            0 => k.to_lowercase(),
                            1 => k.chars().fold(String::new(), |mut s, c| {
                                if c.is_ascii_uppercase() {
                                    s.push('_');
                                }
                                s.push(c.to_ascii_lowercase());
                                s
                            }),
                            _ => insert_at(rng, k, '\0'),
                        };
                        m.insert(renamed, item);
                    }
                    _ => {
                        let key = if rng.random_bool(0.5) {
                            (*[SUBMIT_FIELDS, TASK_FIELDS, TARGET_FIELDS, RUN_FIELDS]
                                .choose(rng)
                                .expect("not empty")
                                .choose(rng)
                                .expect("not empty"))
                            .to_owned()
                        } else {
                            nasty(rng)
                        };
                        m.insert(key, field_value(rng));
                    }
                }
            } else {
                *v = arb_json(rng, 3);
            }
        }
    }
}

/// A value of the same JSON type that the parsers take and the validators
/// must judge: other text (words, names, huge, blank), numbers at the edges
/// of the ranges, an entry more.
fn same_type_other_value(rng: &mut StdRng, v: &mut Value) {
    match v {
        Value::String(s) => {
            *s = match rng.random_range(0..6) {
                0 => (*WORDS.choose(rng).expect("not empty")).to_owned(),
                1 => huge(rng),
                2 => (*[" ", "", "\t\n", "\u{3000}", "\0"]
                    .choose(rng)
                    .expect("not empty"))
                .to_owned(),
                3 => format!(" {s} "),
                4 => s.to_uppercase(),
                _ => nasty(rng),
            }
        }
        Value::Number(_) => *v = edge_number(rng),
        Value::Bool(b) => *b = !*b,
        Value::Object(m) => {
            // An env entry, a target field, or a field of any message.
            let key = match rng.random_range(0..3) {
                0 => nasty(rng),
                1 => (*TARGET_FIELDS.choose(rng).expect("not empty")).to_owned(),
                _ => (*SUBMIT_FIELDS.choose(rng).expect("not empty")).to_owned(),
            };
            let value = if rng.random_bool(0.7) {
                Value::String(nasty(rng))
            } else {
                field_value(rng)
            };
            m.insert(key, value);
            if rng.random_ratio(1, 10) {
                for i in 0..=limits::ENV_MAX {
                    m.insert(format!("V{i}"), json!("x"));
                }
            }
        }
        Value::Array(a) => a.push(Value::String(nasty(rng))),
        Value::Null => *v = field_value(rng),
    }
}

/// Byte-level damage: bits flipped, bytes and tokens put in, ranges cut or
/// doubled, the end cut off.
fn mutate_bytes(rng: &mut StdRng, b: &mut Vec<u8>) {
    const TOKENS: &[&[u8]] = &[
        b"\\u0000",
        b"\\U0000",
        b"\\ud800",
        b"\\udc00\\ud800",
        b"\\uD83E\\uDD80",
        b"\\",
        b"\"",
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"null",
        b"1e999",
        b"-0",
        b"18446744073709551616",
        b"\0",
        b"\xff",
        b"\xc3",
        b"\xef\xbb\xbf",
        b" ",
        b"\"userId\":\"u\",",
        b"\"jobName\":\"n\",",
    ];
    for _ in 0..rng.random_range(1..=4) {
        let len = b.len();
        let at = rng.random_range(0..=len);
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = at.min(len - 1);
                b[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = at.min(len - 1);
                b[i] = rng.random();
            }
            2 => b.insert(at, rng.random()),
            3 => {
                let t = TOKENS.choose(rng).expect("not empty");
                b.splice(at..at, t.iter().copied());
            }
            4 if len > 0 => {
                let end = (at + rng.random_range(1..=8)).min(len);
                b.drain(at.min(len)..end);
            }
            5 if len > 0 => {
                let end = (at + rng.random_range(1..=32)).min(len);
                let chunk = b[at.min(len)..end].to_vec();
                b.splice(at..at, chunk);
            }
            6 => b.truncate(at),
            _ => {
                if len > 1 {
                    let j = rng.random_range(0..len);
                    b.swap(at.min(len - 1), j);
                }
            }
        }
    }
}

/// `v` as bytes, damaged or not: the value mutated, then maybe the bytes.
fn mutated(rng: &mut StdRng, mut v: Value) -> Vec<u8> {
    mutate(rng, &mut v);
    as_bytes(rng, &v)
}

/// One to three changes, now and then none.
fn mutate(rng: &mut StdRng, v: &mut Value) {
    if rng.random_ratio(1, 10) {
        return;
    }
    for _ in 0..rng.random_range(1..=3) {
        match v {
            Value::Object(m) if rng.random_bool(0.4) => at_a_limit(rng, m),
            _ => mutate_value(rng, v),
        }
    }
}

/// Sets one field of a job or task body to a value just inside or just
/// outside one of its rules (README "HTTP API", "Recurring tasks"): what a
/// validator must judge right, and random values reach too seldom.
fn at_a_limit(rng: &mut StdRng, m: &mut Map<String, Value>) {
    let task = m.contains_key("taskName") || m.contains_key("schedule");
    let pick = |rng: &mut StdRng, values: &[Value]| values.choose(rng).cloned().unwrap_or_default();
    let max_t = i64::from(limits::TIMEOUT_MAX);
    match rng.random_range(0..12) {
        11 => {
            // A NUL in one string somewhere (a value, a key, an env entry).
            let mut v = Value::Object(std::mem::take(m));
            insert_nul(rng, &mut v, "");
            if let Value::Object(o) = v {
                *m = o;
            }
        }
        0 => {
            let v = pick(
                rng,
                &[json!(-1), json!(0), json!(9), json!(10), json!(32_768)],
            );
            m.insert("priority".into(), v);
        }
        1 => {
            let v = pick(
                rng,
                &[
                    json!(0),
                    json!(1),
                    json!(max_t),
                    json!(max_t + 1),
                    json!(-1),
                ],
            );
            m.insert("timeoutSeconds".into(), v);
        }
        2 => {
            let n = limits::JOB_NAME_MAX;
            let v = pick(
                rng,
                &[
                    json!("x".repeat(n)),
                    json!("é".repeat(n + 1)),
                    json!(format!("  {}\t", "日".repeat(n))),
                    json!(""),
                    json!(" \u{3000} "),
                ],
            );
            m.insert(if task { "taskName" } else { "jobName" }.into(), v);
        }
        3 => {
            let n = limits::COMMAND_MAX;
            let choices = [
                (None, "x".repeat(n)),
                (None, "x".repeat(n + 1)),
                (None, format!("{}é", "x".repeat(n - 2))),
                (None, " \n ".to_owned()),
                (Some("inline"), "noop".to_owned()),
                (Some("MainLoop"), " diagnostics\n".to_owned()),
                (Some("inline"), "echo hi".to_owned()),
                (Some("inline"), "NOOP".to_owned()),
            ];
            let (mode, command) = choices.choose(rng).cloned().expect("not empty");
            m.insert("command".into(), json!(command));
            if let Some(mode) = mode {
                m.insert("executionMode".into(), json!(mode));
            }
        }
        4 => {
            let n = limits::DESCRIPTION_MAX;
            let v = pick(rng, &[json!("é".repeat(n)), json!("é".repeat(n + 1))]);
            m.insert("description".into(), v);
        }
        5 => {
            let mut env = valid_env(rng);
            match rng.random_range(0..3) {
                0 => {
                    let more = rng.random_range(limits::ENV_MAX..=limits::ENV_MAX + 1);
                    for i in 0..more {
                        env.insert(format!("V{i}"), "x".into());
                    }
                    while env.len() > more {
                        env.pop_first();
                    }
                }
                1 => {
                    let len = rng.random_range(128..=129);
                    env.insert("A".repeat(len), "x".into());
                }
                _ => {
                    let name = *["1A", "A-B", "", "_ok", "é", "A B", "a1"]
                        .choose(rng)
                        .expect("not empty");
                    env.insert(name.into(), "x".into());
                }
            }
            m.insert(if task { "environment" } else { "env" }.into(), json!(env));
        }
        6 | 7 => {
            // nodeId with a group or role; names at and over the pattern.
            let valid = json!(valid_name(rng));
            let name = pick(
                rng,
                &[
                    valid,
                    json!("a".repeat(64)),
                    json!("a".repeat(65)),
                    json!("Prod"),
                    json!("a.b"),
                    json!("-x"),
                    json!("x*"),
                    json!("x#"),
                    Value::Null,
                ],
            );
            let id = json!(Uuid::from_u128(rng.random()));
            let which = rng.random_range(0..3);
            if task {
                let keys = ["assignedNodeId", "assignedNodeGroup", "assignedNodeRole"];
                if which == 0 {
                    m.insert(keys[0].into(), id);
                }
                m.insert(keys[1 + rng.random_range(0..2)].into(), name);
            } else {
                let target = m
                    .entry("target")
                    .and_modify(|t| {
                        if !t.is_object() {
                            *t = json!({});
                        }
                    })
                    .or_insert_with(|| json!({}));
                if let Value::Object(t) = target {
                    if which == 0 {
                        t.insert("nodeId".into(), id);
                    }
                    let key = ["nodeGroup", "nodeRole"][rng.random_range(0..2)];
                    t.insert(key.into(), name);
                }
            }
        }
        8 => {
            let (key, words): (&str, &[&str]) = *[
                (
                    "executionMode",
                    &["pool", "Pool", "Runspace", "runspace", "background "][..],
                ),
                ("fanout", &["one", "all", "ALL", "every"][..]),
                (
                    "misfirePolicy",
                    &["catch_up", "skip", "catch-up", "CatchUp"][..],
                ),
                ("overlapPolicy", &["skip", "allow", "Allow"][..]),
                ("noNodePolicy", &["fail", "hold", "wait"][..]),
            ]
            .choose(rng)
            .expect("not empty");
            let word = json!(words.choose(rng));
            if key == "fanout" && !task {
                if let Some(Value::Object(t)) = m.get_mut("target") {
                    t.insert(key.into(), word);
                } else {
                    m.insert("target".into(), json!({ "fanout": word }));
                }
            } else {
                m.insert(key.into(), word);
            }
        }
        9 => {
            let (key, v) = *[
                ("maxRetries", -1),
                ("maxRetries", 0),
                ("maxRetries", MAX_RETRIES),
                ("maxRetries", MAX_RETRIES + 1),
                ("retryDelaySeconds", -1),
                ("retryDelaySeconds", 0),
                ("retryDelaySeconds", MAX_RETRY_DELAY),
                ("retryDelaySeconds", MAX_RETRY_DELAY + 1),
            ]
            .choose(rng)
            .expect("not empty");
            m.insert(key.into(), json!(v));
        }
        _ => {
            let (key, v) = [
                ("schedule", json!("0 0 31 2 *")),
                ("schedule", json!("60 * * * *")),
                ("schedule", json!(" @daily ")),
                ("schedule", json!("* * * * * * *")),
                ("timezone", json!(" Europe/Berlin ")),
                ("timezone", json!("europe/berlin")),
                ("appName", json!(" ")),
                ("appName", json!("a".repeat(201))),
                ("tags", json!(["a", 1])),
                ("parameters", json!([])),
                ("parameters", json!("x")),
                ("enabled", json!("true")),
            ]
            .choose(rng)
            .cloned()
            .expect("not empty");
            m.insert(key.into(), v);
        }
    }
}

/// `v` as JSON text, compact or pretty, now and then damaged.
fn as_bytes(rng: &mut StdRng, v: &Value) -> Vec<u8> {
    let mut bytes = if rng.random_bool(0.2) {
        serde_json::to_vec_pretty(v)
    } else {
        serde_json::to_vec(v)
    }
    .expect("serializes");
    if rng.random_bool(0.25) {
        mutate_bytes(rng, &mut bytes);
    }
    bytes
}

// -------------------------------------------------------------- properties

#[test]
fn arbitrary_bytes_never_panic() {
    fuzz("arbitrary_bytes_never_panic", 3000, |rng, note| {
        let bytes: Vec<u8> = match rng.random_range(0..3) {
            // Raw bytes.
            0 => (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
            // JSON-ish token soup.
            1 => {
                const T: &[&str] = &[
                    "{",
                    "}",
                    "[",
                    "]",
                    ",",
                    ":",
                    "\"",
                    "null",
                    "true",
                    "1",
                    "-",
                    "e",
                    ".",
                    "\\u0000",
                    "\"jobName\"",
                    "\"command\"",
                    "\"userId\"",
                    "\"job_id\"",
                    "\"command\":\"cancel\"",
                    "\"x\"",
                    " ",
                ];
                (0..rng.random_range(0..30))
                    .flat_map(|_| T.choose(rng).expect("not empty").bytes())
                    .collect()
            }
            // A valid message of any kind, damaged.
            _ => {
                let mut b = serde_json::to_vec(&any_message(rng)).expect("serializes");
                mutate_bytes(rng, &mut b);
                b
            }
        };
        note.bytes("bytes", &bytes);
        exercise(&bytes)
    });
}

#[test]
fn arbitrary_json_never_panics() {
    fuzz("arbitrary_json_never_panics", 1200, |rng, note| {
        let v = match rng.random_range(0..8) {
            0 | 1 => arb_json(rng, 4),
            2 => soup(rng, SUBMIT_FIELDS),
            3 => {
                let mut v = soup(rng, SUBMIT_FIELDS);
                if let Value::Object(m) = &mut v {
                    m.insert("userId".into(), field_value(rng));
                }
                v
            }
            4 | 5 => soup(rng, TASK_FIELDS),
            6 => {
                let keys = if rng.random() {
                    RUN_FIELDS
                } else {
                    EVENT_FIELDS
                };
                soup(rng, keys)
            }
            _ => {
                let mut v = soup(rng, &["job_id", "command"]);
                if let Value::Object(m) = &mut v {
                    m.insert("command".into(), json!("cancel"));
                }
                v
            }
        };
        let bytes = serde_json::to_vec(&v).expect("serializes");
        note.bytes("json", &bytes);
        exercise(&bytes)
    });
}

fn any_message(rng: &mut StdRng) -> Value {
    match rng.random_range(0..6) {
        0 => valid_job_submit(rng),
        1 => valid_submit(rng),
        2 => valid_task(rng),
        3 => serde_json::to_value(valid_run(rng)).expect("serializes"),
        4 => serde_json::to_value(Control::Cancel {
            job_id: Uuid::from_u128(rng.random()),
        })
        .expect("serializes"),
        _ => serde_json::to_value(valid_event(rng)).expect("serializes"),
    }
}

#[test]
fn mutated_submit_messages() {
    fuzz("mutated_submit_messages", 700, |rng, note| {
        // The same damaged job as a `POST /jobs/submit` body and, with a
        // `userId` (mostly valid), as a `job.submit.v1` message.
        let mut v = valid_submit(rng);
        mutate(rng, &mut v);
        let body = as_bytes(rng, &v);
        note.bytes("body", &body);
        exercise(&body)?;
        let mut user = json!(clean_line(rng, 40));
        if rng.random_ratio(1, 4) {
            mutate_value(rng, &mut user);
        }
        let Value::Object(mut m) = v else {
            return Ok(());
        };
        let body = serde_json::to_vec(&m).expect("serializes");
        m.insert("userId".into(), user.clone());
        let v = Value::Object(m);
        let message = as_bytes(rng, &v);
        note.bytes("message", &message);
        exercise(&message)?;
        // Over HTTP and over the queue, the same job is accepted alike.
        if user
            .as_str()
            .is_some_and(|u| !u.trim().is_empty() && !u.contains('\0'))
        {
            let message = serde_json::to_vec(&v).expect("serializes");
            note.bytes("message", &message);
            let over_http = http_body::<SubmitRequest>(&body)
                .and_then(|r| r.validate().map_err(|e| e.to_string()));
            let over_queue = ingress(&message).map(|(_, _, spec)| spec);
            ensure!(
                over_http.as_ref().ok() == over_queue.as_ref().ok(),
                "over HTTP: {over_http:?}; over the queue: {over_queue:?}"
            );
        }
        Ok(())
    });
}

#[test]
fn mutated_task_requests() {
    fuzz("mutated_task_requests", 1000, |rng, note| {
        let v = valid_task(rng);
        let bytes = mutated(rng, v);
        note.bytes("body", &bytes);
        exercise(&bytes)
    });
}

#[test]
fn mutated_run_control_and_event_messages() {
    fuzz(
        "mutated_run_control_and_event_messages",
        1200,
        |rng, note| {
            let v = match rng.random_range(0..3) {
                0 => serde_json::to_value(valid_run(rng)).expect("serializes"),
                1 => serde_json::to_value(Control::Cancel {
                    job_id: Uuid::from_u128(rng.random()),
                })
                .expect("serializes"),
                _ => serde_json::to_value(valid_event(rng)).expect("serializes"),
            };
            let bytes = mutated(rng, v);
            note.bytes("message", &bytes);
            exercise(&bytes)
        },
    );
}

#[test]
fn valid_messages_are_accepted_and_round_trip() {
    fuzz(
        "valid_messages_are_accepted_and_round_trip",
        400,
        |rng, note| {
            // job.submit.v1: accepted as it is, by both readings.
            let v = valid_job_submit(rng);
            let bytes = serde_json::to_vec(&v).expect("serializes");
            note.bytes("job.submit.v1", &bytes);
            let (user, req, spec) = ingress(&bytes).map_err(|e| format!("refused: {e}"))?;
            check_spec_of(&spec, &req)?;
            ensure!(
                Some(user.as_str()) == v["userId"].as_str(),
                "userId changed"
            );
            let typed: JobSubmit = serde_json::from_value(v.clone())
                .map_err(|e| format!("JobSubmit refuses a valid message: {e}"))?;
            round_trip_by(&typed, "JobSubmit", same_job_submit)?;
            exercise(&bytes)?;

            // POST /jobs/submit.
            let v = valid_submit(rng);
            let bytes = serde_json::to_vec(&v).expect("serializes");
            note.bytes("submit body", &bytes);
            let req: SubmitRequest = http_body(&bytes)?;
            round_trip(&req, "SubmitRequest")?;
            round_trip(&req.target, "TargetRequest")?;
            let spec = req
                .clone()
                .validate()
                .map_err(|e| format!("refused: {e}"))?;
            check_spec_of(&spec, &req)?;
            round_trip(&spec.target, "Target")?;

            // POST /tasks, and the same body as a PUT.
            let v = valid_task(rng);
            let bytes = serde_json::to_vec(&v).expect("serializes");
            note.bytes("task body", &bytes);
            let req: TaskRequest = http_body(&bytes)?;
            round_trip_by(&req, "TaskRequest", same_task_request)?;
            let task =
                Task::from_request(req.clone(), "fuzz").map_err(|e| format!("refused: {e}"))?;
            check_task_of(&task, &req)?;
            round_trip_by(&task, "Task", same_task)?;
            let mut put = base_task();
            put.apply(req).map_err(|e| format!("PUT refused: {e}"))?;
            check_task(&put)?;

            // The worker's messages and events.
            let run = valid_run(rng);
            note.debug("job.run.v1", &run);
            round_trip(&run, "JobRun")?;
            let control = Control::Cancel {
                job_id: Uuid::from_u128(rng.random()),
            };
            round_trip(&control, "Control")?;
            let event = valid_event(rng);
            note.debug("event", &event);
            round_trip(&event, "JobEvent")
        },
    );
}

#[test]
fn schedules_never_panic_nor_hang() {
    const TOKENS: &[&str] = &[
        "*",
        "?",
        "L",
        "W",
        "LW",
        "15W",
        "5L",
        "5#3",
        "5#6",
        "MON#9",
        "0",
        "-1",
        "60",
        "24",
        "32",
        "0-0",
        "5-1",
        "*/0",
        "0/0",
        "*/99999",
        "1-",
        "-",
        ",",
        "/",
        "*/",
        "**",
        "SUN-SAT",
        "MON-FRI",
        "JAN-DEC",
        "FEB",
        "xyz",
        "1,2,3,4,5,6,7,8,9,10",
        "99999999999999999999",
        "4294967296",
        "18446744073709551616",
        "1-59/7",
        "0-23/0",
        "@hourly",
        "@reboot",
        "@",
        "",
        ",",
        ",,",
        "*,",
        ",5",
    ];
    fuzz("schedules_never_panic_nor_hang", 3000, |rng, note| {
        let pattern = match rng.random_range(0..4) {
            0 => nasty(rng),
            1 => (0..rng.random_range(0..8))
                .map(|_| *TOKENS.choose(rng).expect("not empty"))
                .collect::<Vec<_>>()
                .join(*[" ", "  ", "\t", ""].choose(rng).expect("not empty")),
            _ => {
                let mut fields: Vec<String> =
                    valid_schedule(rng).split(' ').map(str::to_owned).collect();
                for _ in 0..rng.random_range(0..=2) {
                    let i = rng.random_range(0..fields.len());
                    match rng.random_range(0..6) {
                        0 => fields[i] = (*TOKENS.choose(rng).expect("not empty")).to_owned(),
                        1 => fields[i] = nasty(rng),
                        // A list with empty items, or with nothing else.
                        5 => fields[i] = format!("{},", fields[i].repeat(rng.random_range(0..2))),
                        2 => fields.push((*TOKENS.choose(rng).expect("not empty")).to_owned()),
                        3 if fields.len() > 1 => {
                            fields.remove(i);
                        }
                        _ => {
                            let c = any_char(rng);
                            fields[i] = insert_at(rng, &fields[i], c);
                        }
                    }
                }
                fields.join(" ")
            }
        };
        let tz = match rng.random_range(0..4) {
            0 | 1 => valid_timezone(rng),
            2 => (*["UTC", " UTC ", "utc", "UTC\0", "Etc/GMT+14", "+05:00", ""]
                .choose(rng)
                .expect("not empty"))
            .to_owned(),
            _ => nasty(rng),
        };
        note.debug("schedule, timezone", &(&pattern, &tz));
        if let Ok(s) = Schedule::parse(&pattern, &tz) {
            accepted("schedule");
            // Fire times are strictly after the time asked about, also when
            // asked about a fire time (how the scheduler steps through them).
            let now = Utc::now();
            let next = s.next_after(now);
            ensure!(
                next.is_some_and(|n| n > now),
                "an accepted schedule fires at {next:?}, not after {now}"
            );
            let mut at = next.unwrap_or(now);
            for _ in 0..3 {
                match s.next_after(at) {
                    Some(n) => {
                        ensure!(n > at, "after {at} it fires at {n}");
                        at = n;
                    }
                    None => break,
                }
            }
        }
        // The whole task path too.
        let req = TaskRequest {
            task_name: Some("t".into()),
            command: Some("true".into()),
            schedule: Some(pattern),
            timezone: Some(tz),
            ..Default::default()
        };
        if let Ok(task) = Task::from_request(req.clone(), "fuzz") {
            accepted("POST /tasks");
            check_task_of(&task, &req)?;
        }
        Ok(())
    });
}

/// Puts one NUL somewhere in `v` (a string, a key, or a value replaced by a
/// string); returns the path `nul_path` should name.
fn insert_nul(rng: &mut StdRng, v: &mut Value, path: &str) -> String {
    fn shown(path: &str) -> String {
        if path.is_empty() {
            "the body".into()
        } else {
            path.to_owned()
        }
    }
    match v {
        Value::Object(map) if !map.is_empty() && rng.random_bool(0.7) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let k = keys.choose(rng).expect("not empty").clone();
            let mut p = path.to_owned();
            if !p.is_empty() {
                p.push('.');
            }
            if rng.random_bool(0.25) {
                let item = map.remove(&k).unwrap_or_default();
                let k = insert_at(rng, &k, '\0');
                p.push_str(&k.replace('\0', "\\u0000"));
                map.insert(k, item);
                return format!("{} (a key)", shown(&p));
            }
            p.push_str(&k);
            let item = map.get_mut(&k).expect("a key of the map");
            insert_nul(rng, item, &p)
        }
        Value::Array(items) if !items.is_empty() && rng.random_bool(0.7) => {
            let i = rng.random_range(0..items.len());
            insert_nul(rng, &mut items[i], &format!("{path}[{i}]"))
        }
        Value::String(s) => {
            *s = insert_at(rng, s, '\0');
            shown(path)
        }
        other => {
            let s = clean_text(rng, 5);
            *other = Value::String(insert_at(rng, &s, '\0'));
            shown(path)
        }
    }
}

#[test]
fn nul_path_finds_every_nul() {
    fuzz("nul_path_finds_every_nul", 1200, |rng, note| {
        let mut v = if rng.random_bool(0.5) {
            arb_json(rng, 5)
        } else {
            any_message(rng)
        };
        strip_nul(&mut v);
        note.debug("clean", &v);
        ensure!(
            text::nul_path(&v).is_none(),
            "a NUL where there is none: {:?}",
            text::nul_path(&v)
        );
        let expected = insert_nul(rng, &mut v, "");
        note.debug("with a NUL", &v);
        let found = text::nul_path(&v);
        ensure!(
            found.as_deref() == Some(expected.as_str()),
            "nul_path says {found:?}, the NUL is at {expected:?}"
        );
        // As a body: the cheap test sees it, the door and the ingress refuse
        // it, naming the same path.
        for bytes in [
            serde_json::to_vec(&v).expect("serializes"),
            serde_json::to_vec_pretty(&v).expect("serializes"),
        ] {
            ensure!(text::may_hold_nul(&bytes), "may_hold_nul misses it");
            let back: Value = serde_json::from_slice(&bytes).unwrap();
            ensure!(
                text::nul_path(&back).as_deref() == Some(expected.as_str()),
                "the parsed body has it elsewhere"
            );
            let refusal = text::nul_refusal(&expected);
            ensure!(
                http_body::<SubmitRequest>(&bytes).err().as_ref() == Some(&refusal),
                "the door does not refuse it by its path"
            );
            ensure!(http_body::<TaskRequest>(&bytes).is_err(), "a task took it");
            if v.is_object() {
                ensure!(
                    ingress(&bytes).err().as_ref() == Some(&refusal),
                    "the ingress does not refuse it by its path"
                );
            }
            exercise(&bytes)?;
        }
        Ok(())
    });
}

// ------------------------------------------------------------ regressions

/// Found by `valid_messages_are_accepted_and_round_trip`: a `TaskRequest`
/// serialized the fields it left alone (`None`) as `null`, and `null` is
/// how a `PUT` clears the assignment and the timeout, so sending a
/// serialized request that only changed the priority cleared both.
#[test]
fn a_serialized_task_request_leaves_alone_what_it_does_not_name() {
    let only_priority = TaskRequest {
        priority: Some(3),
        ..Default::default()
    };
    let body = serde_json::to_value(&only_priority).expect("serializes");
    for key in [
        "assignedNodeId",
        "assignedNodeGroup",
        "assignedNodeRole",
        "timeoutSeconds",
    ] {
        assert_eq!(body.get(key), None, "{key} in {body}");
    }
    let mut task = base_task();
    task.apply(serde_json::from_value(body).unwrap()).unwrap();
    assert_eq!(task.priority, 3);
    assert_eq!(task.assigned_node_group.as_deref(), Some("prod"));
    assert_eq!(task.timeout_seconds, Some(600));

    // `Some(None)` is still `null`, and still clears.
    let clear = TaskRequest {
        assigned_node_group: Some(None),
        timeout_seconds: Some(None),
        ..Default::default()
    };
    let body = serde_json::to_value(&clear).expect("serializes");
    assert_eq!(body.get("assignedNodeGroup"), Some(&Value::Null));
    assert_eq!(body.get("timeoutSeconds"), Some(&Value::Null));
    task.apply(serde_json::from_value(body).unwrap()).unwrap();
    assert_eq!(task.assigned_node_group, None);
    assert_eq!(task.timeout_seconds, None);
    round_trip_by(&clear, "TaskRequest", same_task_request).unwrap();
    round_trip_by(&only_priority, "TaskRequest", same_task_request).unwrap();
}
