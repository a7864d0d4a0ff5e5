//! Bounded output in list answers (issue #10): `/jobs/results` and
//! `/tasks/{id}/history` entries carry previews of at most 4 KiB with the
//! whole sizes, the whole output streams from `/jobs/{id}/output` (owner
//! only) and `/tasks/{id}/history/{historyId}/output`, byte for byte, and
//! the results of 50 jobs with megabytes of output each stay small.
//!
//! Finished jobs are written straight into the database (a job row and its
//! final history row, output gzip-compressed as the worker stores it), so a
//! test can hold megabytes of output without running anything; one test
//! runs a real command on a worker to cover what the worker writes.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use taskhost_common::changelog::gzip;
use taskhost_common::model::Role;
use taskhost_common::tasks::{self, TaskRequest};
use taskhost_testkit::{Api, TestEnv, get, job_id, submit};
use uuid::Uuid;

/// The preview bound the api promises (api/src/output.rs, README).
const PREVIEW: usize = 4096;

/// `n` bytes of log-like text with multi-byte characters, so that a cut at
/// 4096 bytes can land inside one.
fn text(tag: &str, n: usize) -> Vec<u8> {
    let mut out = String::with_capacity(n + 64);
    let mut i = 0u64;
    while out.len() < n {
        out.push_str(&format!(
            "{tag} {i:08} é ✓ 日本 {:016x}\n",
            i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ));
        i += 1;
    }
    let mut end = n;
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    out.truncate(end);
    out.into_bytes()
}

/// A finished job of `user` whose final attempt printed `stdout` and
/// `stderr` (stored gzip-compressed, as the worker does). Returns the job
/// id and its history row id.
async fn finished_job(
    pool: &PgPool,
    user: &str,
    task: Option<Uuid>,
    stdout: &[u8],
    stderr: &[u8],
) -> (Uuid, i64) {
    let job = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO jobs (job_id, user_id, job_name, command, status, attempt, task_id,
                           started_at, completed_at, exit_code, success)
         VALUES ($1, $2, 'loud', 'print a lot', 'succeeded', 1, $3, now(), now(), 0, true)",
    )
    .bind(job)
    .bind(user)
    .bind(task)
    .execute(pool)
    .await
    .expect("insert job");
    let history = history_row(pool, job, task, 1, true, stdout, stderr).await;
    (job, history)
}

/// One history row of an attempt of `job`.
async fn history_row(
    pool: &PgPool,
    job: Uuid,
    task: Option<Uuid>,
    attempt: i32,
    is_final: bool,
    stdout: &[u8],
    stderr: &[u8],
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO task_history (task_id, job_id, attempt, start_time, duration_ms, state,
                                   is_final, exit_code, output, error)
         VALUES ($1, $2, $3, now(), 1500, $4, $5, $6, $7, $8)
         RETURNING history_id",
    )
    .bind(task)
    .bind(job)
    .bind(attempt)
    .bind(if is_final { "succeeded" } else { "failed" })
    .bind(is_final)
    .bind(if is_final { 0 } else { 1 })
    .bind(gzip(stdout))
    .bind(gzip(stderr))
    .fetch_one(pool)
    .await
    .expect("insert history")
}

/// GET of an `/api/v1` path as raw bytes: `(status, content type, body)`.
async fn get_raw(api: &Api, key: &str, path: &str) -> (u16, String, Vec<u8>) {
    let resp = api
        .http
        .get(api.v1(path))
        .bearer_auth(key)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.bytes().await.expect("whole body").to_vec();
    (status, ct, body)
}

/// Asserts that `entry[field]` is a preview of `full`: at most the bound,
/// a prefix of it cut on a character, with the whole size beside it.
fn assert_preview(entry: &Value, field: &str, full: &[u8]) {
    let preview = entry[field]
        .as_str()
        .unwrap_or_else(|| panic!("`{field}` is not a string: {entry}"));
    let full_text = std::str::from_utf8(full).expect("test text is UTF-8");
    assert!(
        preview.len() <= PREVIEW,
        "`{field}` preview is {} bytes, over {PREVIEW}",
        preview.len()
    );
    assert!(
        full_text.starts_with(preview),
        "`{field}` is not the start of the stream"
    );
    assert_eq!(
        entry[format!("{field}Bytes")],
        full.len() as u64,
        "`{field}Bytes`"
    );
    let cut = full.len() > PREVIEW;
    if cut {
        // Cut on the character boundary at or below the bound.
        assert!(preview.len() > PREVIEW - 4, "{}", preview.len());
    } else {
        assert_eq!(preview.as_bytes(), full);
    }
    assert_eq!(
        entry[format!("{field}PreviewTruncated")],
        cut,
        "`{field}PreviewTruncated`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_entries_carry_bounded_previews_and_whole_sizes() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let big_out = text("out", 3_000_000);
    let big_err = text("err", 1_200_000);
    let (big, _) = finished_job(&env.pool, "alice", None, &big_out, &big_err).await;
    let (small, _) = finished_job(&env.pool, "alice", None, b"hello\n", b"").await;
    let (quiet_err, _) = finished_job(&env.pool, "alice", None, b"", b"oops\n").await;

    let (status, res) = get(&api, &key, "/jobs/results").await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["count"], 3, "{res}");
    let entry = |id: Uuid| {
        res["results"]
            .as_array()
            .and_then(|r| r.iter().find(|e| e["jobId"] == id.to_string()))
            .unwrap_or_else(|| panic!("job {id} missing from results"))
            .clone()
    };

    let e = entry(big);
    assert_preview(&e, "output", &big_out);
    assert_preview(&e, "error", &big_err);
    // stdout and stderr each once: `output` is stdout alone in a list.
    assert!(
        !e["output"].as_str().unwrap_or_default().contains("err "),
        "stderr is in the output preview"
    );
    assert_eq!(e["status"], "succeeded");
    assert_eq!(e["runtime"], 1.5);
    assert_eq!(e["outputTruncated"], false, "the worker's cap flag");

    let e = entry(small);
    assert_preview(&e, "output", b"hello\n");
    assert_eq!(e["error"], Value::Null, "empty stderr is null: {e}");
    assert_eq!(e["errorBytes"], 0, "{e}");
    assert_eq!(e["errorPreviewTruncated"], false, "{e}");

    let e = entry(quiet_err);
    assert_eq!(e["output"], "", "{e}");
    assert_eq!(e["outputBytes"], 0, "{e}");
    assert_preview(&e, "error", b"oops\n");

    // GET /jobs/{id} keeps its whole-output contract: stdout then stderr.
    let (status, job) = get(&api, &key, &format!("/jobs/{big}")).await;
    assert_eq!(status, 200);
    let mut both = big_out.clone();
    both.extend_from_slice(&big_err);
    assert!(
        job["output"].as_str().map(str::as_bytes) == Some(&both[..]),
        "GET /jobs/{{id}} output is not stdout then stderr"
    );
    assert!(job["error"].as_str().map(str::as_bytes) == Some(&big_err[..]));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_of_fifty_jobs_with_megabytes_of_output_stay_small() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    // The case: jobs that printed 4 MB to each stream, kept at the
    // default 1 MiB cap: 157 MB of results before.
    let marker = b"\n[output truncated by taskhost]\n";
    let mut out = text("out", 1 << 20);
    out.extend_from_slice(marker);
    let mut err = text("err", 1 << 20);
    err.extend_from_slice(marker);
    let (gz_out, gz_err) = (gzip(&out), gzip(&err));
    for _ in 0..50 {
        let job = Uuid::now_v7();
        sqlx::query(
            "WITH j AS (
                 INSERT INTO jobs (job_id, user_id, job_name, command, status, attempt,
                                   started_at, completed_at, exit_code, success)
                 VALUES ($1, 'alice', 'loud', 'yes | head -c 4000000', 'succeeded', 1,
                         now(), now(), 0, true)
                 RETURNING job_id)
             INSERT INTO task_history (job_id, attempt, state, exit_code, output, error,
                                       output_truncated)
             SELECT job_id, 1, 'succeeded', 0, $2, $3, true FROM j",
        )
        .bind(job)
        .bind(&gz_out)
        .bind(&gz_err)
        .execute(&env.pool)
        .await
        .expect("insert a loud job");
    }

    let (status, _, body) = get_raw(&api, &key, "/jobs/results?maxResults=1000").await;
    assert_eq!(status, 200);
    // 50 entries of two 4 KiB previews and their fields: well under 1 MB
    // (it was 157 MB).
    assert!(
        body.len() < 600_000,
        "results of 50 loud jobs are {} bytes",
        body.len()
    );
    let res: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(res["count"], 50);
    for e in res["results"].as_array().into_iter().flatten() {
        assert_preview(e, "output", &out);
        assert_preview(e, "error", &err);
        assert_eq!(e["outputTruncated"], true, "the worker's cap flag: {e}");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_output_streams_byte_exact_to_its_owner_and_admins_only() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let alice = env.key("alice", &[Role::TaskManager]).await;
    let bob = env.key("bob", &[Role::TaskManager]).await;
    let admin = env.key("root", &[Role::SystemAdmin]).await;

    let out = text("out", 5_000_000);
    // Not UTF-8 at all: the stream is the bytes as captured.
    let err: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (job, _) = finished_job(&env.pool, "alice", None, &out, &err).await;

    let (status, ct, body) = get_raw(&api, &alice, &format!("/jobs/{job}/output")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(ct.starts_with("text/plain"), "content type {ct}");
    assert!(body == out, "stdout came back as {} bytes", body.len());
    let (status, _, body) =
        get_raw(&api, &alice, &format!("/jobs/{job}/output?stream=stdout")).await;
    assert_eq!(status, 200);
    assert!(body == out, "stream=stdout");
    let (status, _, body) =
        get_raw(&api, &alice, &format!("/jobs/{job}/output?stream=stderr")).await;
    assert_eq!(status, 200);
    assert!(body == err, "stderr came back as {} bytes", body.len());

    // Another user's job, a malformed or unknown id: 404, exactly as
    // GET /jobs/{id} answers. An admin sees every job (the console).
    let (status, body) = get(&api, &bob, &format!("/jobs/{job}/output")).await;
    assert_eq!(status, 404, "bob: {body}");
    assert_eq!(body["error"]["code"], "not_found", "bob: {body}");
    let (status, _) = get(&api, &bob, &format!("/jobs/{job}")).await;
    assert_eq!(status, 404, "bob: GET /jobs/{{id}}");
    let (status, _, body) = get_raw(&api, &admin, &format!("/jobs/{job}/output")).await;
    assert_eq!(status, 200, "an admin reads any job's output");
    assert!(body == out, "the admin's copy");
    let (status, _) = get(&api, &admin, &format!("/jobs/{job}")).await;
    assert_eq!(status, 200, "an admin: GET /jobs/{{id}}");
    let (status, _) = get(&api, &alice, "/jobs/not-a-uuid/output").await;
    assert_eq!(status, 404);
    let (status, _) = get(&api, &alice, &format!("/jobs/{}/output", Uuid::now_v7())).await;
    assert_eq!(status, 404);

    // A bad stream name is a bad query.
    let (status, body) = get(&api, &alice, &format!("/jobs/{job}/output?stream=both")).await;
    assert_eq!(status, 422, "{body}");

    // A job of hers with no output yet (never ran): 404 naming the output.
    let (status, body) = submit(
        &api,
        &alice,
        &json!({"jobName": "later", "command": "true"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let waiting = job_id(&body);
    let (status, body) = get(&api, &alice, &format!("/jobs/{waiting}/output")).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["message"], "job output not found", "{body}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_history_entries_are_bounded_and_each_attempt_streams() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let reader = env.key("carol", &[Role::Debug]).await;
    let task = tasks::create(
        &env.pool,
        TaskRequest {
            task_name: Some("loud".to_owned()),
            command: Some("print a lot".to_owned()),
            schedule: Some("0 3 * * *".to_owned()),
            ..Default::default()
        },
        "alice",
    )
    .await
    .expect("create task")
    .task_id;

    // A run whose first attempt failed and was retried.
    let first_out = text("first", 2_000_000);
    let first_err = text("first-err", 10_000);
    let out = text("out", 2_500_000);
    let (job, last) = finished_job(&env.pool, "alice", Some(task), &out, b"").await;
    let first = history_row(&env.pool, job, Some(task), 0, false, &first_out, &first_err).await;

    let (status, res) = get(&api, &reader, &format!("/tasks/{task}/history")).await;
    assert_eq!(status, 200, "{res}");
    let entries = res["history"].as_array().expect("history");
    assert_eq!(entries.len(), 2, "{res}");
    let by_id = |id: i64| {
        entries
            .iter()
            .find(|e| e["historyId"] == id)
            .unwrap_or_else(|| panic!("history {id} missing"))
    };
    assert_preview(by_id(last), "output", &out);
    assert_eq!(by_id(last)["error"], Value::Null);
    assert_eq!(by_id(last)["errorBytes"], 0);
    assert_preview(by_id(first), "output", &first_out);
    assert_preview(by_id(first), "error", &first_err);

    // Any key reads a history entry's whole output, as it reads the history
    // (the job is alice's; carol reads it here, not through /jobs).
    for (id, stream, want) in [
        (last, "stdout", &out[..]),
        (first, "stdout", &first_out[..]),
        (first, "stderr", &first_err[..]),
    ] {
        let path = format!("/tasks/{task}/history/{id}/output?stream={stream}");
        let (status, ct, body) = get_raw(&api, &reader, &path).await;
        assert_eq!(status, 200, "{path}");
        assert!(ct.starts_with("text/plain"), "{path}: {ct}");
        assert!(body == want, "{path}: {} bytes back", body.len());
    }
    let (status, _) = get(&api, &reader, &format!("/jobs/{job}/output")).await;
    assert_eq!(status, 404, "a job's own endpoint stays owner-only");

    // The entry must belong to the task named in the path.
    let other = tasks::create(
        &env.pool,
        TaskRequest {
            task_name: Some("other".to_owned()),
            command: Some("true".to_owned()),
            schedule: Some("0 4 * * *".to_owned()),
            ..Default::default()
        },
        "alice",
    )
    .await
    .expect("create task")
    .task_id;
    let (status, body) = get(
        &api,
        &reader,
        &format!("/tasks/{other}/history/{last}/output"),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = get(&api, &reader, &format!("/tasks/{task}/history/x/output")).await;
    assert_eq!(status, 404);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_run_with_megabytes_of_output_reads_back_whole_and_previewed() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let mut s = env.worker_settings("loud", "default", "worker");
    s.worker.output_cap_bytes = 8 << 20;
    env.start_worker_with(s).await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let (status, body) = submit(
        &api,
        &key,
        &json!({"jobName": "loud", "command": "seq 1 600000; seq 1 100000 >&2"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = job_id(&body);
    assert_eq!(
        env.wait_terminal(id, Duration::from_secs(30)).await,
        "succeeded"
    );
    let seq = |n: u32| -> Vec<u8> {
        (1..=n)
            .map(|i| format!("{i}\n"))
            .collect::<String>()
            .into_bytes()
    };
    let (out, err) = (seq(600_000), seq(100_000));

    let (status, res) = get(&api, &key, "/jobs/results").await;
    assert_eq!(status, 200, "{res}");
    let e = &res["results"][0];
    assert_preview(e, "output", &out);
    assert_preview(e, "error", &err);

    let (status, _, body) = get_raw(&api, &key, &format!("/jobs/{id}/output")).await;
    assert_eq!(status, 200);
    assert!(
        body == out,
        "stdout: {} bytes back of {}",
        body.len(),
        out.len()
    );
    let (status, _, body) = get_raw(&api, &key, &format!("/jobs/{id}/output?stream=stderr")).await;
    assert_eq!(status, 200);
    assert!(
        body == err,
        "stderr: {} bytes back of {}",
        body.len(),
        err.len()
    );
    env.cleanup().await;
}
