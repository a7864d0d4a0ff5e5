//! `GET /api/v1/events/stream`: job and node changes pushed as
//! Server-Sent Events, read as a dashboard reads them (a streamed body
//! with the key in the `Authorization` header). A job submitted after the
//! stream opened shows up within seconds; another user's job never reaches
//! a non-admin; an admin sees everyone's; the stream ends when the api
//! shuts down.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskhost_common::model::Role;
use taskhost_testkit::{Api, TestEnv, job_id, submit};

/// One SSE connection, split into events as the bytes come.
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

/// One event: its `event:` name (`message` when absent) and its `data:`.
#[derive(Debug)]
struct Event {
    name: String,
    data: Value,
}

impl Sse {
    async fn open(api: &Api, key: &str) -> Self {
        let resp = reqwest::Client::new()
            .get(api.v1("/events/stream"))
            .bearer_auth(key)
            .send()
            .await
            .expect("open the event stream");
        assert_eq!(resp.status(), 200);
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        Self {
            resp,
            buf: String::new(),
        }
    }

    /// The next event (comments skipped), or None when the stream ended or
    /// nothing came before `deadline`.
    async fn next(&mut self, deadline: Instant) -> Option<Event> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let mut name = "message".to_owned();
                let mut data = String::new();
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if data.is_empty() {
                    continue; // a comment (heartbeat) or a bare retry line
                }
                let data = serde_json::from_str(&data)
                    .unwrap_or_else(|e| panic!("event data {data:?} is not JSON: {e}"));
                return Some(Event { name, data });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.resp.chunk()).await {
                Ok(Ok(Some(bytes))) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// Reads events until `done` says so or `within` passes; returns every
    /// change event read.
    async fn collect_until(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while !done(&seen) {
            match self.next(deadline).await {
                Some(e) if e.name == "change" => seen.push(e.data),
                Some(_) => {}
                None => break,
            }
        }
        seen
    }
}

fn job_ids_in(events: &[Value]) -> BTreeSet<String> {
    events
        .iter()
        .filter(|e| e["table"] == "jobs")
        .filter_map(|e| e["recordId"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_pushes_own_job_and_node_changes_and_hides_other_users_jobs() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let alice = env.key("alice", &[Role::TaskManager]).await;
    let bob = env.key("bob", &[Role::TaskManager]).await;
    let admin = env.key("root", &[Role::SystemAdmin]).await;

    // No key, no stream.
    let resp = reqwest::Client::new()
        .get(api.v1("/events/stream"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401);

    let mut as_alice = Sse::open(&api, &alice).await;
    let mut as_admin = Sse::open(&api, &admin).await;
    for s in [&mut as_alice, &mut as_admin] {
        let first = s
            .next(Instant::now() + Duration::from_secs(5))
            .await
            .expect("a first event");
        assert_eq!(first.name, "ready", "{first:?}");
        assert!(first.data["changeSeq"].is_i64(), "{first:?}");
    }

    // A worker that registers after the streams opened: a node change.
    env.start_worker("w1", "default", "worker").await;
    let node_id: String =
        sqlx::query_scalar("SELECT node_id::text FROM nodes WHERE node_name = $1")
            .bind(format!("{}-w1", env.prefix))
            .fetch_one(&env.pool)
            .await
            .expect("node row");

    // Bob's job first, then Alice's: Alice's stream must carry hers and
    // never his, though his changes come earlier in the feed.
    let (status, body) = submit(&api, &bob, &json!({"jobName": "bobs", "command": "true"})).await;
    assert_eq!(status, 202, "{body}");
    let bobs = job_id(&body).to_string();
    let (status, body) = submit(
        &api,
        &alice,
        &json!({"jobName": "alices", "command": "echo hi"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let alices = job_id(&body).to_string();
    env.wait_terminal(job_id(&body), Duration::from_secs(30))
        .await;
    let ended = Instant::now();

    // Her job's last change (its end) must arrive, and the node's.
    let last_change: i64 = sqlx::query_scalar(
        "SELECT max(change_seq) FROM data_change WHERE table_name = 'jobs' AND record_id = $1",
    )
    .bind(&alices)
    .fetch_one(&env.pool)
    .await
    .expect("her job's changes");
    let seen = as_alice
        .collect_until(Duration::from_secs(10), |seen| {
            seen.iter().any(|e| e["changeSeq"] == last_change)
                && seen.iter().any(|e| e["table"] == "nodes")
        })
        .await;
    let delay = ended.elapsed();
    let ids = job_ids_in(&seen);
    assert!(ids.contains(&alices), "alice's job not pushed: {seen:?}");
    assert!(
        seen.iter()
            .any(|e| e["changeSeq"] == last_change && e["recordId"] == alices.as_str()),
        "her job's end not pushed: {seen:?}"
    );
    assert!(!ids.contains(&bobs), "bob's job reached alice: {seen:?}");
    assert!(
        seen.iter()
            .any(|e| e["table"] == "nodes" && e["recordId"] == node_id.as_str()),
        "the new node not pushed: {seen:?}"
    );
    assert!(
        delay < Duration::from_secs(5),
        "the job's end was pushed {delay:?} after it ended"
    );
    // Every event is compact and in feed order.
    let seqs: Vec<i64> = seen
        .iter()
        .filter_map(|e| e["changeSeq"].as_i64())
        .collect();
    assert_eq!(seqs.len(), seen.len(), "{seen:?}");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    for e in &seen {
        let keys: BTreeSet<&str> = e
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["action", "changeSeq", "recordId", "table"]),
            "{e}"
        );
    }

    // The admin sees both users' jobs.
    let seen = as_admin
        .collect_until(Duration::from_secs(10), |seen| {
            let ids = job_ids_in(seen);
            ids.contains(&alices) && ids.contains(&bobs)
        })
        .await;
    let ids = job_ids_in(&seen);
    assert!(
        ids.contains(&alices) && ids.contains(&bobs),
        "admin missed a job: {seen:?}"
    );

    // Resuming from a cursor replays what came after it, still filtered.
    let resp = reqwest::Client::new()
        .get(api.v1("/events/stream?since=0"))
        .bearer_auth(&alice)
        .send()
        .await
        .expect("resume");
    let mut resumed = Sse {
        resp,
        buf: String::new(),
    };
    let seen = resumed
        .collect_until(Duration::from_secs(10), |seen| {
            job_ids_in(seen).contains(&alices)
        })
        .await;
    let ids = job_ids_in(&seen);
    assert!(ids.contains(&alices) && !ids.contains(&bobs), "{seen:?}");
    drop(resumed);

    // Shutdown ends the stream rather than waiting for it.
    let stopping = Instant::now();
    env.stop(0).await;
    let ended = as_alice
        .collect_until(Duration::from_secs(10), |_| false)
        .await;
    assert!(
        stopping.elapsed() < Duration::from_secs(12),
        "the api waited {:?} for an open event stream",
        stopping.elapsed()
    );
    drop(ended);
    env.cleanup().await;
}
