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
use taskhost_testkit::TestEnv;

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

/// A chromedriver process with one browser session.
struct Browser {
    driver: Child,
    http: reqwest::Client,
    session: String,
}

impl Browser {
    async fn start() -> Self {
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

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
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

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().expect("element id").to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
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

    async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Waits until `script` returns something other than null/false/"".
    async fn wait_for(&self, what: &str, script: &str, args: Value) -> Value {
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

    async fn quit(mut self) {
        let _ = self.http.delete(&self.session).send().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Submits a job through the page's form and returns the job id it shows.
async fn submit_through_form(b: &Browser, name: &str, command: &str) -> String {
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
