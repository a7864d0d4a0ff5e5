//! `/docs` in a real browser (headless Chromium over WebDriver, as the
//! dashboard tests): the page renders the document with its markdown
//! (no raw backticks) and examples, a user enters a key under Authorize,
//! submits a job with "Try it out"/"Execute" and sees the 202, and the page
//! loads nothing from any other host.

use serde_json::{Value, json};
use taskhost_common::model::Role;
use taskhost_testkit::{TestEnv, get};

use crate::dashboard::Browser;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_submits_a_job_from_the_api_reference() {
    if std::env::var_os("TASKHOST_TEST_SKIP_BROWSER").is_some() {
        eprintln!("SKIPPED: chromium/chromedriver are not installed (scripts/test --install)");
        return;
    }
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let b = Browser::start().await;

    b.goto(&format!("{}/docs", api.base)).await;
    b.wait_for(
        "the submit operation",
        "return !!document.querySelector('#operations-jobs-submitJob');",
        json!([]),
    )
    .await;

    // Markdown is rendered: the description's `code` is code, not
    // backticks.
    let info = b
        .wait_for(
            "the document's description",
            "const i = document.querySelector('.information-container .info');
             return i && i.querySelector('code') ? i.innerText : null;",
            json!([]),
        )
        .await;
    let info = info.as_str().unwrap_or_default();
    assert!(info.contains("Authorization"), "{info}");
    assert!(
        !info.contains('`'),
        "raw backticks in the description: {info}"
    );

    // Authorize with the key.
    b.click("button.authorize").await;
    b.wait_for(
        "the key field",
        "return !!document.querySelector('.modal-ux input');",
        json!([]),
    )
    .await;
    b.type_into(".modal-ux input", &key).await;
    b.click(".modal-ux .auth-btn-wrapper button.authorize")
        .await;
    b.wait_for(
        "the key to be taken",
        "return !!document.querySelector('.modal-ux .auth-btn-wrapper button.logout, .modal-ux .btn-done');",
        json!([]),
    )
    .await;
    b.js(
        "const done = document.querySelector('.modal-ux .btn-done') || document.querySelector('.modal-ux .close-modal');
         done.click();",
        json!([]),
    )
    .await;

    // Open "Submit a job": the example body is there, ready to send.
    b.js(
        "const op = document.querySelector('#operations-jobs-submitJob');
         (op.querySelector('.opblock-summary-control') || op.querySelector('.opblock-summary')).click();",
        json!([]),
    )
    .await;
    let example = b
        .wait_for(
            "the example body",
            "const t = document.querySelector('#operations-jobs-submitJob textarea.body-param__text');
             return t ? t.value : null;",
            json!([]),
        )
        .await;
    let example = example.as_str().unwrap_or_default();
    assert!(
        example.contains("echo hello from $(hostname)"),
        "the submit example is not shown: {example}"
    );
    let body: Value = serde_json::from_str(example).expect("the example is JSON");
    assert_eq!(body["jobName"], "hello");

    b.click("#operations-jobs-submitJob button.execute").await;
    let status = b
        .wait_for(
            "the live response",
            "const s = document.querySelector('#operations-jobs-submitJob .live-responses-table .response .response-col_status');
             return s ? s.innerText.trim() : null;",
            json!([]),
        )
        .await;
    assert_eq!(status, json!("202"), "the page shows {status}");
    let answer = b
        .js(
            "const r = document.querySelector('#operations-jobs-submitJob .live-responses-table .response .response-col_description');
             return r ? r.innerText : '';",
            json!([]),
        )
        .await;
    let answer = answer.as_str().unwrap_or_default();
    assert!(answer.contains("jobId"), "the page shows {answer}");

    // The job is alice's, made with her key.
    let (status, jobs) = get(&api, &key, "/jobs?name=hello").await;
    assert_eq!(status, 200, "{jobs}");
    assert_eq!(jobs["count"], 1, "{jobs}");
    assert_eq!(jobs["jobs"][0]["userId"], "alice");
    let shown_id = jobs["jobs"][0]["jobId"].as_str().unwrap_or_default();
    assert!(
        answer.contains(shown_id),
        "{answer} does not name {shown_id}"
    );

    // Everything the page loaded came from the api itself.
    let loaded = b
        .js(
            "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href]);",
            json!([]),
        )
        .await;
    let loaded: Vec<String> = serde_json::from_value(loaded).expect("urls");
    assert!(loaded.len() >= 4, "{loaded:?}");
    let elsewhere: Vec<&String> = loaded
        .iter()
        .filter(|u| !u.starts_with(&format!("{}/", api.base)))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "loaded from other hosts: {elsewhere:?}"
    );

    b.quit().await;
    env.cleanup().await;
}
