//! Export and import of tasks (README, "Export and import"): tasks exported
//! from one system import into a fresh one unchanged (export → import →
//! export gives the same file), a dry run prints the diff and writes
//! nothing, the upsert goes by (app, name), secrets never leave in clear,
//! and a wrong file is refused whole with 422 naming the task.

use reqwest::Method;
use serde_json::{Value, json};
use taskhost_common::model::Role;
use taskhost_testkit::{TEST_SECRETS_KEY, TestEnv, call, get};

use crate::tasks::taskhost;

const SECRET: &str = "s3cr3t-value-never-in-a-file";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_exported_from_one_system_import_into_a_fresh_one_unchanged() {
    let mut source = TestEnv::new().await;
    source.set_secrets_key(TEST_SECRETS_KEY);
    let api = source.start_api().await;
    let key = source.key("alice", &[Role::TaskManager]).await;
    for body in [
        json!({"taskName": "nightly", "appName": "billing", "command": "echo bill",
               "schedule": "0 2 * * *", "timezone": "Europe/Berlin", "assignedNodeGroup": "prod",
               "timeoutSeconds": 600, "maxRetries": 2, "tags": ["money"],
               "environment": {"REGION": "eu"}, "secretEnvironment": {"TOKEN": SECRET},
               "limits": {"memoryMb": 256}}),
        json!({"taskName": "cleanup", "appName": "billing", "command": "echo clean",
               "schedule": "@hourly", "enabled": false, "description": "old rows"}),
        json!({"taskName": "ping", "command": "echo ping", "schedule": "*/5 * * * *",
               "fanout": "all", "assignedNodeRole": "edge", "misfirePolicy": "skip"}),
    ] {
        let (status, answer) = call(&api, Method::POST, &key, "/tasks", Some(&body)).await;
        assert_eq!(status, 201, "{answer}");
    }
    // A chain: the file names the upstream by app and name, not by id.
    let (_, listed) = get(&api, &key, "/tasks").await;
    let nightly_id = listed["tasks"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["taskName"] == "nightly"))
        .map(|t| t["taskId"].clone())
        .unwrap_or_default();
    let (status, answer) = call(
        &api,
        Method::POST,
        &key,
        "/tasks",
        Some(
            &json!({"taskName": "report", "appName": "billing", "command": "echo report",
                     "schedule": "@daily", "enabled": false,
                     "after": {"taskId": nightly_id, "on": "succeeded"}}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let conn = ["--url", api.base.as_str(), "--key", key.as_str()];
    let (code, exported, stderr) = taskhost(&[&["tasks", "export"][..], &conn[..]].concat()).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("exported 5 task(s)"), "{stderr}");
    let file: Value = serde_json::from_str(&exported).expect("the export is JSON");
    assert_eq!(file["format"], "taskhost.tasks");
    assert_eq!(file["version"], 1);
    let names: Vec<String> = file["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| format!("{}/{}", t["appName"], t["taskName"]).replace('"', ""))
        .collect();
    assert_eq!(
        names,
        [
            "billing/cleanup",
            "billing/nightly",
            "billing/report",
            "default/ping",
            "taskhost/diagnostics"
        ]
    );
    assert!(!exported.contains(SECRET), "a secret left in clear");
    assert!(
        file["tasks"][1]["secretEnvironmentSealed"].is_string(),
        "{exported}"
    );
    assert_eq!(
        file["tasks"][2]["after"],
        json!([{"appName": "billing", "taskName": "nightly", "on": "succeeded"}]),
        "{exported}"
    );
    assert!(
        !exported.contains("taskId") && !exported.contains("createdAt"),
        "no ids or times: {exported}"
    );
    let (code, billing, _) =
        taskhost(&[&["tasks", "export", "--app", "billing"][..], &conn[..]].concat()).await;
    assert_eq!(code, 0);
    let billing: Value = serde_json::from_str(&billing).expect("JSON");
    assert_eq!(billing["tasks"].as_array().map(Vec::len), Some(3));

    // A fresh system with the same secrets.key.
    let mut target = TestEnv::new().await;
    target.set_secrets_key(TEST_SECRETS_KEY);
    let api2 = target.start_api().await;
    let key2 = target.key("bob", &[Role::TaskManager]).await;
    let conn2 = ["--url", api2.base.as_str(), "--key", key2.as_str()];
    let path = std::env::temp_dir().join(format!("{}-tasks.json", target.names().prefix()));
    std::fs::write(&path, &exported).expect("write the file");
    let path = path.display().to_string();

    let (code, out, stderr) = taskhost(
        &[
            &["tasks", "import", path.as_str(), "--dry-run"][..],
            &conn2[..],
        ]
        .concat(),
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "+ billing/cleanup",
            "+ billing/nightly",
            "+ billing/report",
            "+ default/ping",
            "= taskhost/diagnostics"
        ]
    );
    assert!(
        stderr.contains("dry run, nothing written: 4 created, 0 updated, 1 unchanged"),
        "{stderr}"
    );
    let (_, listed) = get(&api2, &key2, "/tasks").await;
    assert_eq!(listed["count"], 1, "a dry run wrote: {listed}");

    let (code, _, stderr) =
        taskhost(&[&["tasks", "import", path.as_str()][..], &conn2[..]].concat()).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("4 created, 0 updated, 1 unchanged"),
        "{stderr}"
    );
    let (code, again, _) = taskhost(&[&["tasks", "export"][..], &conn2[..]].concat()).await;
    assert_eq!(code, 0);
    assert_eq!(
        again, exported,
        "export → import → export is not the same file"
    );
    // The imported secret opens on the target: its names show, masked.
    let (_, listed) = get(&api2, &key2, "/tasks").await;
    let nightly = listed["tasks"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["taskName"] == "nightly"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        nightly["secretEnvironment"],
        json!({"TOKEN": "***"}),
        "{nightly}"
    );
    assert!(nightly["nextRun"].is_string(), "scheduled: {nightly}");

    // A change on the target shows in a dry run as a diff, and the import
    // puts the file's version back (upsert by app and name).
    let id = nightly["taskId"].as_str().unwrap_or_default().to_owned();
    let (status, _) = call(
        &api2,
        Method::PUT,
        &key2,
        &format!("/tasks/{id}"),
        Some(&json!({"schedule": "0 3 * * *", "description": "changed here"})),
    )
    .await;
    assert_eq!(status, 200);
    let (code, out, _) = taskhost(
        &[
            &["tasks", "import", path.as_str(), "--dry-run"][..],
            &conn2[..],
        ]
        .concat(),
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        out.contains("~ billing/nightly: description, schedule"),
        "{out}"
    );
    assert!(out.contains("= billing/cleanup"), "{out}");
    let (code, _, stderr) =
        taskhost(&[&["tasks", "import", path.as_str()][..], &conn2[..]].concat()).await;
    assert_eq!(code, 0);
    assert!(
        stderr.contains("0 created, 1 updated, 4 unchanged"),
        "{stderr}"
    );
    let (_, again, _) = taskhost(&[&["tasks", "export"][..], &conn2[..]].concat()).await;
    assert_eq!(again, exported);
    let _ = std::fs::remove_file(&path);
    source.cleanup().await;
    target.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_task_file_is_refused_whole_with_the_task_named() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let nobody = env.key("bob", &[]).await;
    let task = |name: &str, schedule: &str| {
        json!({"appName": "a", "taskName": name, "command": "true", "executionMode": "pool",
               "schedule": schedule, "timezone": "UTC", "enabled": true, "fanout": "one",
               "priority": 5, "maxRetries": 0, "retryDelaySeconds": 60, "killOnTimeout": true,
               "misfirePolicy": "catch_up", "overlapPolicy": "skip", "noNodePolicy": "fail",
               "description": "", "tags": [], "parameters": {}, "environment": {}})
    };
    let import = |body: Value| {
        let (api, key) = (&api, &key);
        async move { call(api, Method::POST, key, "/tasks/import", Some(&body)).await }
    };
    // The second task is wrong: nothing is written, and the answer names it.
    let (status, body) = import(json!({"format": "taskhost.tasks", "version": 1,
        "tasks": [task("good", "@hourly"), task("bad", "61 * * * *")]}))
    .await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("tasks[1] (a/bad)") && message.contains("schedule"),
        "{message}"
    );
    let (_, listed) = get(&api, &key, "/tasks").await;
    assert_eq!(listed["count"], 1, "a refused file wrote: {listed}");

    let (status, body) =
        import(json!({"format": "taskhost.tasks", "version": 2, "tasks": []})).await;
    assert_eq!(status, 422);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("version"),
        "{body}"
    );
    let (status, body) = import(json!({"format": "taskhost.tasks", "version": 1,
        "tasks": [task("twice", "@daily"), task("twice", "@daily")]}))
    .await;
    assert_eq!(status, 422, "{body}");
    // A sealed secret this system cannot open (it has no secrets.key).
    let mut sealed = task("secret", "@daily");
    sealed["secretEnvironmentSealed"] = json!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let (status, body) =
        import(json!({"format": "taskhost.tasks", "version": 1, "tasks": [sealed]})).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("secrets.key"),
        "{body}"
    );
    let (status, body) = get(&api, &key, "/tasks/export?app=").await;
    assert_eq!(status, 422, "an empty app: {body}");
    // Roles: exporting and importing need a task writer.
    let (status, _) = get(&api, &nobody, "/tasks/export").await;
    assert_eq!(status, 403);
    let (status, _) = call(
        &api,
        Method::POST,
        &nobody,
        "/tasks/import",
        Some(&json!({"format": "taskhost.tasks", "version": 1, "tasks": []})),
    )
    .await;
    assert_eq!(status, 403);
    env.cleanup().await;
}
