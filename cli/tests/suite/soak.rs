//! A bounded soak: jobs arrive continuously over HTTP and the queue while
//! the worker processes are killed with SIGKILL and restarted every few
//! seconds. Nothing accepted is lost, nothing runs to two final records,
//! and the memory of the api and of the workers is printed at the start
//! and the end. `TASKHOST_SOAK_SECS` (default 15) makes it longer.

use std::collections::HashSet;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use taskhost_common::messages::JOB_SUBMIT_V1;
use taskhost_common::model::Role;
use taskhost_testkit::{TestEnv, job_id};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_taskhost");

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_with_workers_killed_and_restarted_loses_and_doubles_nothing() {
    let secs: u64 = std::env::var("TASKHOST_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let names = [format!("{}-s0", env.prefix), format!("{}-s1", env.prefix)];
    let spawn =
        |env: &TestEnv, name: &str| env.spawn_binary(BIN, &["worker", "--node-name", name], &[]);
    let mut workers = Workers(names.iter().map(|n| spawn(&env, n)).collect());
    for n in &names {
        env.wait_node(n).await;
    }
    let api_rss_start = rss_mib(std::process::id());
    let worker_rss_start: Vec<f64> = workers.0.iter().map(|c| rss_mib(c.id())).collect();

    let stop = Arc::new(AtomicBool::new(false));
    // HTTP submissions, ~40/s.
    let http = {
        let (stop, api_http, url, key) = (
            stop.clone(),
            api.http.clone(),
            api.v1("/jobs/submit"),
            key.clone(),
        );
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = json!({"jobName": format!("http-{i}"), "command": "sleep 0.2; echo ok"});
                if let Ok(resp) = api_http
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await
                    && resp.status().as_u16() == 202
                    && let Ok(v) = resp.json::<serde_json::Value>().await
                {
                    ids.push(job_id(&v));
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            ids
        })
    };
    // Queue submissions, ~10/s, each confirmed by the broker.
    let mut queued = Vec::new();
    let t = Instant::now();
    let mut next_kill = Instant::now() + Duration::from_secs(3);
    let mut victim = 0;
    let mut kills = 0;
    while t.elapsed() < Duration::from_secs(secs) {
        let id = Uuid::now_v7();
        env.publish_raw(
            &env.names().submit(),
            "submit",
            json!({"userId": "alice", "jobName": "q", "command": "sleep 0.2; echo ok"})
                .to_string()
                .as_bytes(),
            Some(JOB_SUBMIT_V1),
            Some(&id.to_string()),
        )
        .await;
        queued.push(id);
        if Instant::now() >= next_kill {
            // SIGKILL one worker mid-run and start it again at once.
            let _ = workers.0[victim].kill();
            let _ = workers.0[victim].wait();
            workers.0[victim] = spawn(&env, &names[victim]);
            victim = 1 - victim;
            kills += 1;
            next_kill = Instant::now() + Duration::from_secs(3);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut accepted = http.await.expect("http submitter");
    let over_http = accepted.len();
    accepted.extend(queued.iter().copied());
    assert!(over_http > 0 && kills > 0, "the soak did something");

    let mut lost = 0;
    for id in &accepted {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            match env.job_status(*id).await.as_deref() {
                Some("succeeded") => break,
                Some(s) if Instant::now() > deadline => {
                    panic!("job {id} still {s} after the soak")
                }
                None if Instant::now() > deadline => {
                    lost += 1;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    let doubled = env.doubled_final_rows().await;
    let finals: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT job_id) FROM task_history WHERE is_final AND job_id = ANY($1)",
    )
    .bind(&accepted)
    .fetch_one(&env.pool)
    .await
    .expect("finals");
    let unique: HashSet<&Uuid> = accepted.iter().collect();
    let api_rss_end = rss_mib(std::process::id());
    let worker_rss_end: Vec<f64> = workers.0.iter().map(|c| rss_mib(c.id())).collect();
    println!(
        "soak: {secs} s, {} jobs accepted ({over_http} over HTTP, {} over the queue), \
         {kills} worker kills; lost = {lost}, doubled = {doubled}; \
         api (test process) RSS {api_rss_start:.1} → {api_rss_end:.1} MiB; \
         worker RSS {worker_rss_start:.1?} → {worker_rss_end:.1?} MiB (restarted workers start over)",
        unique.len(),
        queued.len()
    );
    assert_eq!(lost, 0, "accepted jobs lost");
    assert_eq!(doubled, 0, "jobs with two final records");
    assert_eq!(
        finals as usize,
        unique.len(),
        "every accepted job has its final record"
    );
    drop(workers);
    env.cleanup().await;
}
