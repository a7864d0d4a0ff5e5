//! The dashboard in a real browser: headless Chromium driven over the W3C
//! WebDriver protocol (chromedriver), against a real api and worker.
//! A user types a key, submits a job, sees it finish, reads its output;
//! output that looks like HTML is shown as text, never run; a bad key is
//! refused with a clear message.
//!
//! Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium
//! chromium-driver`; `scripts/test` installs them when it can).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskhost_common::model::Role;
use taskhost_testkit::{TestEnv, call, get, job_id, submit};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(names: &[&str]) -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
            .map(|p| p.display().to_string())
    })
}

/// A chromedriver process with one browser session (also drives `/docs`,
/// `docs_page.rs`).
pub(crate) struct Browser {
    driver: Child,
    http: reqwest::Client,
    session: String,
}

impl Browser {
    pub(crate) async fn start() -> Self {
        let driver_bin = find_program(&["chromedriver"]).expect(
            "chromedriver is not installed: apt-get install chromium chromium-driver \
             (scripts/test does this when it runs as root)",
        );
        let chrome = find_program(&["chromium", "chromium-browser", "google-chrome"])
            .expect("chromium is not installed: apt-get install chromium chromium-driver");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let resp: Value = http
            .post(format!("{base}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chrome,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1280,900"]
                }
            }}}))
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("session JSON");
        let session = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {resp}"))
            .to_owned();
        Self {
            driver,
            http,
            session: format!("{base}/session/{session}"),
        }
    }

    pub(crate) async fn cmd(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp: Value = req
            .send()
            .await
            .expect("webdriver request")
            .json()
            .await
            .expect("webdriver JSON");
        if let Some(err) = resp["value"]["error"].as_str() {
            panic!(
                "webdriver {method} {path}: {err}: {}",
                resp["value"]["message"]
            );
        }
        resp["value"].clone()
    }

    pub(crate) async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    pub(crate) async fn element(&self, css: &str) -> String {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().expect("element id").to_owned()
    }

    pub(crate) async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/clear"),
            Some(json!({})),
        )
        .await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    pub(crate) async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    pub(crate) async fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Waits until `script` returns something other than null/false/"".
    pub(crate) async fn wait_for(&self, what: &str, script: &str, args: Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.js(script, args.clone()).await;
            if !(v.is_null() || v == json!(false) || v == json!("")) {
                return v;
            }
            if Instant::now() > deadline {
                let shown = self
                    .js(
                        "return document.body ? document.body.innerText.slice(0, 3000) : ''",
                        json!([]),
                    )
                    .await;
                panic!("timed out waiting for {what}; the page shows:\n{shown}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Saves a PNG of the page when `TASKHOST_SCREENSHOT` names a file (for
    /// looking at the page while working on it).
    async fn screenshot_if_asked(&self) {
        use base64::Engine as _;
        let Ok(path) = std::env::var("TASKHOST_SCREENSHOT") else {
            return;
        };
        let png = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .expect("base64 screenshot");
        std::fs::write(path, bytes).expect("write screenshot");
    }

    /// Saves a PNG of the page as `<dir>/<name>` when
    /// `TASKHOST_SCREENSHOT_DIR` names a directory: the README's pictures
    /// come from `TASKHOST_SCREENSHOT_DIR=$PWD/docs/img cargo nextest run
    /// -p taskhost --test suite -E 'test(an_admin_sees)'`.
    async fn screenshot_into_dir(&self, name: &str) {
        use base64::Engine as _;
        let Ok(dir) = std::env::var("TASKHOST_SCREENSHOT_DIR") else {
            return;
        };
        // Let the last refresh and layout settle.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let png = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .expect("base64 screenshot");
        std::fs::write(std::path::Path::new(&dir).join(name), bytes).expect("write screenshot");
    }

    /// Resizes the browser window.
    async fn window(&self, width: u32, height: u32) {
        self.cmd(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await;
    }

    pub(crate) async fn quit(mut self) {
        let _ = self.http.delete(&self.session).send().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Opens a view by its address (`#jobs`, `#job/<id>`, ...) and waits
/// until its panel shows.
async fn show(b: &Browser, hash: &str) {
    let view = hash.split('/').next().unwrap_or(hash).to_owned();
    b.js("location.hash = '#' + arguments[0];", json!([hash]))
        .await;
    b.wait_for(
        &format!("the {view} view"),
        "const p = document.querySelector(`[data-panel=\"${arguments[0]}\"]`);
         return p && !p.hidden;",
        json!([view]),
    )
    .await;
}

/// Submits a job through the page's form (in the Jobs view, folded
/// away under "Submit a job") and returns the job id it shows.
async fn submit_through_form(b: &Browser, name: &str, command: &str) -> String {
    show(b, "jobs").await;
    b.js(
        "document.querySelector('#submit-panel').open = true;",
        json!([]),
    )
    .await;
    b.type_into("#job-name", name).await;
    b.type_into("#job-command", command).await;
    b.click("#submit-button").await;
    b.wait_for(
        "the submitted job id",
        "const r = document.querySelector('#submit-result');
         const id = r && r.dataset.jobId;
         return id && id !== arguments[0] ? id : null;",
        json!([""]),
    )
    .await;
    b.js(
        "return document.querySelector('#submit-result').dataset.jobId",
        json!([]),
    )
    .await
    .as_str()
    .expect("job id")
    .to_owned()
}

/// Waits for the job's row in the results table to say `status`, opens
/// it, and waits for its detail pane to show output containing `expect`.
async fn open_finished(b: &Browser, job: &str, status: &str, expect: &str) {
    b.wait_for(
        &format!("job {job} listed as {status}"),
        "const row = document.querySelector(`#results-table tr[data-job-id=\"${arguments[0]}\"]`);
         return row && row.textContent.includes(arguments[1]);",
        json!([job, status]),
    )
    .await;
    // The table is rebuilt as it refreshes, so find and click the row in
    // one step inside the page (a found element can go stale before a
    // separate click).
    b.wait_for(
        "a click on the job's row",
        "const row = document.querySelector(`#results-table tr[data-job-id=\"${arguments[0]}\"]`);
         if (!row) return false;
         row.click();
         return true;",
        json!([job]),
    )
    .await;
    b.wait_for(
        &format!("the job's output to show {expect:?}"),
        "const o = document.querySelector('#job-output');
         const d = document.querySelector('#job-detail');
         return o && d && d.textContent.includes(arguments[0]) && o.textContent.includes(arguments[1]);",
        json!([job, expect]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_submits_and_reads_a_job_in_a_real_browser() {
    // scripts/test sets this only when it was not allowed to install the
    // browser (README, "Running the tests"), and says so in its summary.
    if std::env::var_os("TASKHOST_TEST_SKIP_BROWSER").is_some() {
        eprintln!("SKIPPED: chromium/chromedriver are not installed (scripts/test --install)");
        return;
    }
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("browser", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let b = Browser::start().await;

    // / leads to the dashboard; readiness shows without a key.
    b.goto(&format!("{}/", api.base)).await;
    let url = b.cmd(reqwest::Method::GET, "/url", None).await;
    assert!(
        url.as_str().unwrap_or_default().ends_with("/dashboard"),
        "{url}"
    );
    b.wait_for(
        "the health line to say ready",
        "return document.querySelector('#health').textContent.trim() === 'ready';",
        json!([]),
    )
    .await;

    // A bad key is refused in words.
    b.type_into("#key", "thk_not_a_key").await;
    b.click("#use-key").await;
    b.wait_for(
        "the refusal of a bad key",
        "return document.body.innerText.includes('key refused');",
        json!([]),
    )
    .await;

    // The real key: submit, watch it finish, read the output.
    b.type_into("#key", &key).await;
    b.click("#use-key").await;
    // The header says who the key is; admin views are not offered.
    b.wait_for(
        "alice's identity, without the admin tabs",
        "const u = document.querySelector('#me-user');
         return u && u.textContent === 'alice'
           && document.querySelector('#me-roles').textContent === 'task_manager'
           && document.querySelector('[data-tab=changes]').hidden
           && document.querySelector('[data-tab=sync]').hidden;",
        json!([]),
    )
    .await;
    let job = submit_through_form(&b, "from-the-browser", "echo hello from the browser").await;
    open_finished(&b, &job, "succeeded", "hello from the browser").await;
    let stored: String = sqlx::query_scalar("SELECT user_id FROM jobs WHERE job_id = $1::uuid")
        .bind(&job)
        .fetch_one(&env.pool)
        .await
        .expect("the job the page submitted");
    assert_eq!(stored, "alice");

    // Output that looks like markup is shown as text and never runs.
    let job = submit_through_form(
        &b,
        "markup",
        r#"echo '<img src=x onerror="window.__owned=1"><b id=injected>bold</b>'"#,
    )
    .await;
    open_finished(&b, &job, "succeeded", "<img src=x").await;
    let owned = b
        .js(
            "return [window.__owned === undefined, document.querySelector('#injected') === null]",
            json!([]),
        )
        .await;
    assert_eq!(
        owned,
        json!([true, true]),
        "job output was rendered as HTML"
    );

    b.screenshot_if_asked().await;
    b.quit().await;
    env.cleanup().await;
}

/// Waits until no job of the test is still pending, queued or running.
async fn wait_all_done(env: &TestEnv) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE status IN ('pending', 'queued', 'running')",
        )
        .fetch_one(&env.pool)
        .await
        .expect("count open jobs");
        if open == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{open} jobs never finished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The job ids a page of the Jobs view shows, top to bottom.
const SHOWN_IDS: &str =
    "return [...document.querySelectorAll('#results-table tbody tr[data-job-id]')]
     .map(r => r.dataset.jobId);";

/// Waits until the Jobs view shows exactly `ids`, in order.
async fn wait_for_page(b: &Browser, what: &str, ids: &[String]) {
    b.wait_for(
        what,
        &format!(
            "const shown = (() => {{ {SHOWN_IDS} }})();
             return JSON.stringify(shown) === JSON.stringify(arguments[0]);"
        ),
        json!([ids]),
    )
    .await;
}

fn page_ids(page: &Value) -> Vec<String> {
    page["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("jobs in {page}"))
        .iter()
        .map(|j| j["jobId"].as_str().expect("jobId").to_owned())
        .collect()
}

/// Fails unless the page is no wider than the window (tables scroll in
/// their own boxes).
async fn assert_no_sideways_scroll(b: &Browser, view: &str) {
    let v = b
        .js(
            "return [document.documentElement.scrollWidth, window.innerWidth];",
            json!([]),
        )
        .await;
    let (scroll, inner) = (v[0].as_i64().expect("width"), v[1].as_i64().expect("width"));
    assert!(inner <= 440, "the window is {inner} px wide, not a phone's");
    assert!(
        scroll <= inner,
        "the {view} view scrolls sideways at {inner} px: the page is {scroll} px wide"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_sees_the_system_finds_jobs_watches_output_and_steers_tasks_in_a_real_browser() {
    if std::env::var_os("TASKHOST_TEST_SKIP_BROWSER").is_some() {
        eprintln!("SKIPPED: chromium/chromedriver are not installed (scripts/test --install)");
        return;
    }
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("console", "default", "worker").await;
    let alice = env.key("alice", &[Role::TaskManager]).await;
    let admin = env.key("root", &[Role::SystemAdmin]).await;

    // More than two pages of alice's quick jobs, and one of root's that fails.
    for i in 0..60 {
        let (status, body) = submit(
            &api,
            &alice,
            &json!({"jobName": format!("quick-{i}"), "command": "true"}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
    }
    let (status, body) = submit(
        &api,
        &admin,
        &json!({"jobName": "broken-import", "command": "echo broken; exit 3"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let failed = job_id(&body).to_string();
    let (status, task) = call(
        &api,
        reqwest::Method::POST,
        &admin,
        "/tasks",
        Some(
            &json!({"taskName": "nightly-report", "command": "echo report",
                     "schedule": "0 3 * * *", "timezone": "Europe/Berlin"}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{task}");
    let task_id = task["taskId"].as_str().expect("taskId").to_owned();
    // Two pages of its history (20 a page).
    for _ in 0..21 {
        let (status, body) = call(
            &api,
            reqwest::Method::POST,
            &admin,
            &format!("/tasks/{task_id}/run"),
            None,
        )
        .await;
        assert_eq!(status, 202, "{body}");
    }
    wait_all_done(&env).await;
    let succeeded = 60 + 21;

    let b = Browser::start().await;
    b.window(1400, 900).await;
    b.goto(&format!("{}/dashboard", api.base)).await;
    b.type_into("#key", &admin).await;
    b.click("#use-key").await;

    // Home is the overview: who I am, counts by state (zeros shown) equal
    // to the API's, the throughput chart, recent failures, live updates.
    b.wait_for(
        "who the key is",
        "const u = document.querySelector('#me-user'), r = document.querySelector('#me-roles');
         return u && r && u.textContent === 'root' && r.textContent.includes('system_admin');",
        json!([]),
    )
    .await;
    let (status, ov) = get(&api, &admin, "/overview").await;
    assert_eq!(status, 200, "{ov}");
    let counts: serde_json::Map<String, Value> = ov["jobsByState"]
        .as_object()
        .expect("jobsByState")
        .iter()
        .map(|(k, v)| (k.clone(), json!(v.as_i64().expect("count").to_string())))
        .collect();
    assert_eq!(counts.len(), 8, "{ov}");
    assert_eq!(counts["succeeded"], json!(succeeded.to_string()), "{ov}");
    assert_eq!(counts["running"], json!("0"), "{ov}");
    b.wait_for(
        "the counts by state of /overview",
        "const shown = {};
         for (const c of document.querySelectorAll('#state-counts [data-state]'))
           shown[c.dataset.state] = c.querySelector('.n').textContent;
         return JSON.stringify(Object.keys(shown).sort().map(k => [k, shown[k]]))
           === JSON.stringify(Object.keys(arguments[0]).sort().map(k => [k, arguments[0][k]]));",
        json!([counts]),
    )
    .await;
    let per_minute: i64 = ov["throughput"]["perMinute"]
        .as_array()
        .expect("perMinute")
        .iter()
        .map(|b| b["succeeded"].as_i64().expect("succeeded"))
        .sum();
    assert_eq!(per_minute, succeeded, "{ov}");
    let chart = b
        .wait_for(
            "the per-minute chart",
            "const s = document.querySelector('#throughput svg');
             return s && s.dataset.unit === 'minute'
               && [s.dataset.buckets, s.querySelectorAll('g.bucket').length, s.dataset.succeeded, s.dataset.failed,
                   s.querySelectorAll('rect.ok').length > 0];",
            json!([]),
        )
        .await;
    assert_eq!(chart, json!(["60", 60, succeeded.to_string(), "1", true]));
    b.click("#tp-hour").await;
    let chart = b
        .wait_for(
            "the per-hour chart",
            "const s = document.querySelector('#throughput svg');
             return s && s.dataset.unit === 'hour' && [s.querySelectorAll('g.bucket').length, s.dataset.succeeded];",
            json!([]),
        )
        .await;
    assert_eq!(chart, json!([24, succeeded.to_string()]));
    b.click("#tp-minute").await;
    b.wait_for(
        "the failed job among recent failures",
        "return !!document.querySelector(`#failures-table tr[data-job-id=\"${arguments[0]}\"]`);",
        json!([failed]),
    )
    .await;
    b.wait_for(
        "the event stream to be up",
        "return document.querySelector('#live-status').dataset.mode === 'sse';",
        json!([]),
    )
    .await;
    b.screenshot_into_dir("dashboard-overview-1400.png").await;

    // Jobs: alice's succeeded ones, 25 a page; forward twice and back.
    show(&b, "jobs").await;
    b.js(
        "const l = document.querySelector('#f-limit'); l.value = '25';
         l.dispatchEvent(new Event('change', { bubbles: true }));",
        json!([]),
    )
    .await;
    b.click("#f-status input[value=\"succeeded\"]").await;
    b.type_into("#f-user", "alice").await;
    b.click("#f-apply").await;
    let (_, p1) = get(&api, &admin, "/jobs?status=succeeded&user=alice&limit=25").await;
    let cursor = p1["nextCursor"].as_str().expect("a second page").to_owned();
    let (_, p2) = get(
        &api,
        &admin,
        &format!("/jobs?status=succeeded&user=alice&limit=25&cursor={cursor}"),
    )
    .await;
    let cursor = p2["nextCursor"].as_str().expect("a third page").to_owned();
    let (_, p3) = get(
        &api,
        &admin,
        &format!("/jobs?status=succeeded&user=alice&limit=25&cursor={cursor}"),
    )
    .await;
    let (p1, p2, p3) = (page_ids(&p1), page_ids(&p2), page_ids(&p3));
    assert_eq!((p1.len(), p2.len(), p3.len()), (25, 25, 10));
    wait_for_page(&b, "page 1 of the succeeded jobs", &p1).await;
    let shown = b
        .js(
            "const rows = [...document.querySelectorAll('#results-table tbody tr')];
             return [[...new Set(rows.map(r => r.cells[1].textContent))],
                     [...new Set(rows.map(r => r.cells[0].querySelector('.muted').textContent))]];",
            json!([]),
        )
        .await;
    assert_eq!(shown, json!([["succeeded"], ["alice"]]));
    b.click("#jobs-next").await;
    wait_for_page(&b, "page 2", &p2).await;
    b.click("#jobs-next").await;
    wait_for_page(&b, "page 3", &p3).await;
    let next_disabled = b
        .js(
            "return document.querySelector('#jobs-next').disabled;",
            json!([]),
        )
        .await;
    assert_eq!(next_disabled, json!(true), "a page after the last");
    b.click("#jobs-newer").await;
    wait_for_page(&b, "page 2 again", &p2).await;
    b.click("#jobs-newer").await;
    wait_for_page(&b, "page 1 again", &p1).await;

    // A running job: its output shows while it runs.
    b.click("#f-clear").await;
    let (status, body) = submit(
        &api,
        &admin,
        &json!({"jobName": "ticker",
                "command": "for i in $(seq 8); do echo tick-$i; sleep 0.5; done; echo oops >&2"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let ticker = job_id(&body);
    // It appears in the list (pushed, not polled) and is opened from there.
    b.wait_for(
        "a click on the running job's row",
        "const row = document.querySelector(`#results-table tr[data-job-id=\"${arguments[0]}\"]`);
         if (!row) return false;
         row.click();
         return true;",
        json!([ticker.to_string()]),
    )
    .await;
    b.wait_for(
        "tick-1 in the output box",
        "const o = document.querySelector('#job-output');
         return o && o.textContent.includes('tick-1');",
        json!([]),
    )
    .await;
    let status_then = env.job_status(ticker).await;
    assert_eq!(
        status_then.as_deref(),
        Some("running"),
        "the output appeared only after the job ended"
    );
    let shown = b
        .wait_for(
            "the job's end",
            "const d = document.querySelector('#job-detail');
             const o = document.querySelector('#job-output').textContent;
             const e = document.querySelector('#job-stderr').textContent;
             return d.dataset.status === 'succeeded' && o.includes('tick-8') && e.includes('oops') && [o, e];",
            json!([]),
        )
        .await;
    let stdout = shown[0].as_str().expect("stdout");
    assert_eq!(
        stdout.matches("tick-").count(),
        8,
        "each line once: {stdout:?}"
    );
    assert_eq!(shown[1], json!("oops\n"), "stderr in its own box");

    // Re-run the failed job from the overview's failures; the new job
    // links back to it. Deleting it asks first.
    show(&b, "overview").await;
    b.wait_for(
        "a click on the failure",
        "const row = document.querySelector(`#failures-table tr[data-job-id=\"${arguments[0]}\"]`);
         if (!row) return false;
         row.click();
         return true;",
        json!([failed]),
    )
    .await;
    b.wait_for(
        "the failed job's view",
        "const d = document.querySelector('#job-detail');
         return d.dataset.jobId === arguments[0] && d.dataset.status === 'failed'
           && !document.querySelector('#job-rerun').hidden;",
        json!([failed]),
    )
    .await;
    b.click("#job-rerun").await;
    let rerun = b
        .wait_for(
            "the re-run's view, linked to the original",
            "const d = document.querySelector('#job-detail');
             const link = document.querySelector('#job-rerun-of');
             return d.dataset.jobId && d.dataset.jobId !== arguments[0] && link
               && link.dataset.jobId === arguments[0] && d.dataset.jobId;",
            json!([failed]),
        )
        .await;
    let rerun: uuid::Uuid = rerun.as_str().expect("id").parse().expect("uuid");
    let linked: Option<uuid::Uuid> =
        sqlx::query_scalar("SELECT rerun_of FROM jobs WHERE job_id = $1")
            .bind(rerun)
            .fetch_one(&env.pool)
            .await
            .expect("the re-run's row");
    assert_eq!(linked.map(|u| u.to_string()), Some(failed.clone()));
    assert_eq!(
        env.wait_terminal(rerun, Duration::from_secs(30)).await,
        "failed"
    );
    b.wait_for(
        "the re-run's end in its view",
        "return document.querySelector('#job-detail').dataset.status === 'failed'
           && !document.querySelector('#job-delete').disabled;",
        json!([]),
    )
    .await;
    b.click("#job-delete").await;
    b.wait_for(
        "the confirmation",
        "return document.querySelector('#confirm-dialog').open;",
        json!([]),
    )
    .await;
    b.click("#confirm-cancel").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        env.job_status(rerun).await.is_some(),
        "deleted without a yes"
    );
    b.click("#job-delete").await;
    b.wait_for(
        "the confirmation",
        "return document.querySelector('#confirm-dialog').open;",
        json!([]),
    )
    .await;
    b.click("#confirm-ok").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.job_status(rerun).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the confirmed delete did not happen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Tasks: disable, then enable again, from the list.
    show(&b, "tasks").await;
    for (want, enabled) in [("false", false), ("true", true)] {
        b.wait_for(
            "a click on the task's toggle",
            "const row = document.querySelector(`#tasks-table tr[data-task-id=\"${arguments[0]}\"]`);
             const t = row && row.querySelector('button.toggle');
             if (!t || t.disabled || row.dataset.enabled === arguments[1]) return false;
             t.click();
             return true;",
            json!([task_id, want]),
        )
        .await;
        b.wait_for(
            &format!("the task shown enabled = {enabled}"),
            "const row = document.querySelector(`#tasks-table tr[data-task-id=\"${arguments[0]}\"]`);
             return row && row.dataset.enabled === arguments[1]
               && row.querySelector('button.toggle').getAttribute('aria-pressed') === arguments[1];",
            json!([task_id, want]),
        )
        .await;
        let stored: bool = sqlx::query_scalar("SELECT enabled FROM tasks WHERE task_id = $1::uuid")
            .bind(&task_id)
            .fetch_one(&env.pool)
            .await
            .expect("task row");
        assert_eq!(stored, enabled);
    }
    // Its page: schedule, and history (attempt, node) paged with `before`.
    let (_, h1) = get(&api, &admin, &format!("/tasks/{task_id}/history?limit=20")).await;
    let before = h1["nextBefore"].as_i64().expect("a second history page");
    let (_, h2) = get(
        &api,
        &admin,
        &format!("/tasks/{task_id}/history?limit=20&before={before}"),
    )
    .await;
    let history_ids = |page: &Value| -> Vec<String> {
        page["history"]
            .as_array()
            .expect("history")
            .iter()
            .map(|h| h["historyId"].as_i64().expect("historyId").to_string())
            .collect()
    };
    let (h1, h2) = (history_ids(&h1), history_ids(&h2));
    assert_eq!((h1.len(), h2.len()), (20, 1));
    let shown_history = "return JSON.stringify([...document.querySelectorAll('#task-history tbody tr[data-history-id]')]
                           .map(r => r.dataset.historyId)) === JSON.stringify(arguments[0]);";
    b.wait_for(
        "a click on the task's row",
        "const row = document.querySelector(`#tasks-table tr[data-task-id=\"${arguments[0]}\"]`);
         if (!row) return false;
         row.cells[0].click();
         return true;",
        json!([task_id]),
    )
    .await;
    b.wait_for(
        "the task's page",
        "const s = document.querySelector('#task-schedule');
         return !document.querySelector('#task-detail').hidden
           && document.querySelector('#task-title').textContent.includes('nightly-report')
           && s.textContent.includes('Next run');",
        json!([]),
    )
    .await;
    b.wait_for("history page 1", shown_history, json!([h1]))
        .await;
    let row = b
        .js(
            "const r = document.querySelector('#task-history tbody tr');
             return [r.cells[1].textContent, r.cells[2].textContent, r.cells[3].textContent];",
            json!([]),
        )
        .await;
    assert_eq!(
        row,
        json!(["1", format!("{}-console", env.prefix), "succeeded"]),
        "attempt, node name, state"
    );
    b.click("#history-older").await;
    b.wait_for("history page 2", shown_history, json!([h2]))
        .await;
    b.click("#history-newer").await;
    b.wait_for("history page 1 again", shown_history, json!([h1]))
        .await;

    // Create a task in the form, edit it, delete it (after a yes).
    show(&b, "tasks").await;
    b.click("#task-new").await;
    b.wait_for(
        "the empty task form",
        "return !document.querySelector('[data-panel=taskform]').hidden;",
        json!([]),
    )
    .await;
    b.type_into("#t-name", "weekly-cleanup").await;
    b.type_into("#t-schedule", "0 4 * * 0").await;
    b.type_into("#t-timezone", "UTC").await;
    b.type_into("#t-command", "echo cleanup").await;
    b.click("#task-save").await;
    let created = b
        .wait_for(
            "the new task's page",
            "const t = document.querySelector('#task-title');
             return !document.querySelector('#task-detail').hidden && t.textContent.includes('weekly-cleanup')
               && location.hash.split('/')[1];",
            json!([]),
        )
        .await;
    let created = created.as_str().expect("task id").to_owned();
    b.click("#task-edit").await;
    b.wait_for(
        "the form filled with the task",
        "return document.querySelector('#t-name').value === 'weekly-cleanup'
           && document.querySelector('#t-schedule').value === '0 4 * * 0';",
        json!([]),
    )
    .await;
    b.type_into("#t-schedule", "30 5 * * 0").await;
    b.click("#task-save").await;
    b.wait_for(
        "the edited task's page",
        "return !document.querySelector('#task-detail').hidden
           && document.querySelector('#task-fields').textContent.includes('30 5 * * 0');",
        json!([]),
    )
    .await;
    let schedule: String =
        sqlx::query_scalar("SELECT schedule FROM tasks WHERE task_id = $1::uuid")
            .bind(&created)
            .fetch_one(&env.pool)
            .await
            .expect("the created task");
    assert_eq!(schedule, "30 5 * * 0");
    b.click("#task-delete").await;
    b.wait_for(
        "the confirmation",
        "return document.querySelector('#confirm-dialog').open;",
        json!([]),
    )
    .await;
    b.click("#confirm-ok").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE task_id = $1::uuid")
            .bind(&created)
            .fetch_one(&env.pool)
            .await
            .expect("count");
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the confirmed task delete did not happen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 420 px: every view fits; wide tables scroll inside their boxes.
    b.window(420, 900).await;
    for view in [
        "overview".to_owned(),
        "jobs".to_owned(),
        format!("job/{ticker}"),
        "tasks".to_owned(),
        format!("task/{task_id}"),
        "taskform/new".to_owned(),
        "nodes".to_owned(),
        "changes".to_owned(),
        "sync".to_owned(),
    ] {
        show(&b, &view).await;
        b.wait_for(
            "the view's content",
            "const p = [...document.querySelectorAll('[data-panel]')].find(p => !p.hidden);
             return p && !p.querySelector('tbody:empty') && p.innerText.length > 40;",
            json!([]),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_no_sideways_scroll(&b, &view).await;
        if view == "overview" {
            b.screenshot_into_dir("dashboard-overview-420.png").await;
        }
        if view == "jobs" {
            let boxed = b
                .js(
                    "const w = document.querySelector('#results-table').parentElement;
                     return getComputedStyle(w).overflowX === 'auto' && w.scrollWidth > w.clientWidth;",
                    json!([]),
                )
                .await;
            assert_eq!(boxed, json!(true), "the jobs table scrolls in its own box");
        }
    }

    b.quit().await;
    env.cleanup().await;
}
