//! Transport security and least privilege (issue #10): the services reach
//! Postgres over TLS when `database.url` says `sslmode=require`, and refuse
//! to start, in one line, when `verify-full` cannot verify the server; they
//! reach RabbitMQ over TLS (`amqps://`, `amqp.tls_*`) through a
//! TLS-terminating proxy in front of the shared broker (which has no TLS
//! listener, and is left alone), with a client certificate, and say in one
//! line that the broker's certificate is not trusted without the CA file;
//! one RabbitMQ user per component with exactly the README's permissions
//! runs every path (jobs, cancel, task fires, the ingress, dead letters,
//! events); and the api logs no Authorization header.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use reqwest::Method;
use serde_json::json;
use taskhost_common::amqp;
use taskhost_common::model::Role;
use taskhost_testkit::{AMQP_URL, Api, PG_SERVER, TestEnv, call, get, job_id, submit};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use uuid::Uuid;

use crate::jobs::wait_dead;
use crate::startup::{one_error, run};

const JOB_WAIT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------ test PKI

/// A private CA made for one test; its files live in a directory removed
/// when it is dropped.
struct TestCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    der: rustls::pki_types::CertificateDer<'static>,
    /// The CA certificate as a PEM file.
    pem_file: PathBuf,
}

impl TestCa {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("taskhost-tls-{tag}-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("taskhost test CA {tag}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        let pem_file = dir.join("ca.pem");
        std::fs::write(&pem_file, cert.pem()).expect("write CA");
        Self {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            dir,
            pem_file,
        }
    }

    /// A certificate for `name` signed by this CA, for a server
    /// (`localhost`) or a client, with its PKCS#8 key.
    fn leaf(&self, name: &str, client: bool) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(vec![name.to_owned()]).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        (cert, key)
    }

    /// A client certificate and key written as PEM files.
    fn client_files(&self, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(name, true);
        let cert_file = self.dir.join(format!("{name}.crt"));
        let key_file = self.dir.join(format!("{name}.key"));
        std::fs::write(&cert_file, cert.pem()).expect("write client cert");
        std::fs::write(&key_file, key.serialize_pem()).expect("write client key");
        (cert_file, key_file)
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

// ------------------------------------------------------- the TLS proxy

/// Accepts TLS on 127.0.0.1:`port` (a `localhost` certificate of the test
/// CA) and forwards the plain bytes to the shared broker on 5672.
struct TlsProxy {
    port: u16,
    /// Completed TLS handshakes.
    handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_proxy(ca: &TestCa, require_client_cert: bool) -> TlsProxy {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (cert, key) = ca.leaf("localhost", false);
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS versions");
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der.clone()).expect("client CA");
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("client verifier");
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server TLS config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let port = listener.local_addr().expect("proxy addr").port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
    TlsProxy {
        port,
        handshakes,
        task,
    }
}

/// `/readyz` answers 200: the api reached Postgres and RabbitMQ.
async fn assert_ready(api: &Api) {
    let resp = api
        .http
        .get(format!("{}/readyz", api.base))
        .send()
        .await
        .expect("readyz");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, 200, "readyz: {text}");
}

async fn run_job(env: &TestEnv, api: &Api, key: &str, command: &str) -> Uuid {
    let (status, body) = submit(
        api,
        key,
        &json!({"jobName": "transport", "command": command}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = job_id(&body);
    assert_eq!(
        env.wait_terminal(id, JOB_WAIT).await,
        "succeeded",
        "job {id}"
    );
    id
}

// ------------------------------------------------------------ Postgres

/// `(ssl, count)` of the connections to this test's database whose
/// `application_name` is `app`.
async fn ssl_of(env: &TestEnv, app: &str) -> Vec<(bool, i64)> {
    sqlx::query_as(
        "SELECT s.ssl, count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.datname = $1 AND a.application_name = $2 GROUP BY s.ssl",
    )
    .bind(&env.db_name)
    .bind(app)
    .fetch_all(&env.pool)
    .await
    .expect("pg_stat_ssl")
}

/// Starts an api whose database URL is the loopback server with `query`
/// (empty, or ending in `&`) in front of its own `application_name`, has it
/// answer one request, and returns [`ssl_of`] its connections.
async fn ssl_of_an_api(env: &mut TestEnv, key: &str, name: &str, query: &str) -> Vec<(bool, i64)> {
    let app = format!("{}-{name}", env.prefix);
    let mut settings = env.settings.clone();
    settings.database.url = format!("{PG_SERVER}/{}?{query}application_name={app}", env.db_name);
    let api = env.start_api_with(settings).await;
    let (status, body) = get(&api, key, "/jobs/results").await;
    assert_eq!(status, 200, "{body}");
    ssl_of(env, &app).await
}

#[tokio::test]
async fn services_reach_postgres_over_tls_when_the_url_asks_for_it() {
    let mut env = TestEnv::new().await;
    let app = format!("{}-tls", env.prefix);
    env.settings.database.url = format!("{}?sslmode=require&application_name={app}", env.db_url());
    let api = env.start_api().await;
    env.start_worker("pg-tls", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    run_job(&env, &api, &key, "echo over tls").await;

    // The URL decides, and the check can tell: an api told
    // `sslmode=disable` talks to Postgres in the clear.
    let seen_clear = ssl_of_an_api(&mut env, &key, "clear", "sslmode=disable&").await;
    assert!(
        !seen_clear.is_empty() && seen_clear.iter().all(|(ssl, _)| !ssl),
        "sslmode=disable not honoured: {seen_clear:?}"
    );

    // A loopback URL that names no sslmode is in the clear too (the
    // default on this machine; README, "Transport security").
    let seen_default = ssl_of_an_api(&mut env, &key, "default", "").await;
    assert!(
        !seen_default.is_empty() && seen_default.iter().all(|(ssl, _)| !ssl),
        "a loopback URL without sslmode used TLS: {seen_default:?}"
    );

    let seen = ssl_of(&env, &app).await;
    assert!(
        seen.iter().all(|(ssl, _)| *ssl),
        "a service connection is not TLS: {seen:?}"
    );
    let tls: i64 = seen.iter().map(|(_, n)| n).sum();
    // At least the api's and the worker's pools (and the api's listener).
    assert!(tls >= 2, "only {tls} service connections seen: {seen:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn verify_full_against_a_foreign_ca_stops_the_services_in_one_line() {
    let env = TestEnv::new().await;
    let ca = TestCa::new("pg");
    let url = format!(
        "{PG_SERVER}/{}?sslmode=verify-full&sslrootcert={}",
        env.db_name,
        path(&ca.pem_file)
    );
    for service in ["worker", "api", "scheduler"] {
        let (out, took) = run(&env, &[service], &[("DATABASE_URL", &url)]).await;
        let line = one_error(&format!("{service} with an unverifiable server"), &out);
        assert!(took < Duration::from_secs(10), "{service}: took {took:?}");
        assert!(line.contains("TLS to PostgreSQL"), "{line}");
        assert!(line.contains(&env.db_name), "names the database: {line}");
        assert!(line.contains("sslrootcert"), "names the fix: {line}");
    }
    env.cleanup().await;
}

// ------------------------------------------------------------ RabbitMQ

fn amqps_url(port: u16) -> String {
    format!("amqps://guest:guest@localhost:{port}/%2f")
}

#[tokio::test]
async fn services_reach_rabbitmq_over_tls_with_a_private_ca_and_a_client_certificate() {
    let mut env = TestEnv::new().await;
    let ca = TestCa::new("mq");
    let proxy = tls_proxy(&ca, true).await;
    let (cert, key) = ca.client_files("taskhost");
    env.settings.amqp.url = amqps_url(proxy.port);
    env.settings.amqp.tls_ca_file = path(&ca.pem_file);
    env.settings.amqp.tls_client_cert_file = path(&cert);
    env.settings.amqp.tls_client_key_file = path(&key);
    env.settings.validate().expect("TLS settings");
    let api = env.start_api().await;
    env.start_worker("mq-tls", "default", "worker").await;
    env.start_scheduler().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    assert_ready(&api).await;
    run_job(&env, &api, &key, "echo over amqps").await;
    // The api's publisher, the worker's start-up checks, consumer and
    // publisher, the scheduler's ingress and publishers: all through TLS.
    let handshakes = proxy.handshakes.load(Ordering::SeqCst);
    assert!(handshakes >= 4, "only {handshakes} TLS connections");
    env.cleanup().await;
}

#[tokio::test]
async fn an_untrusted_broker_certificate_stops_the_services_in_one_line() {
    let env = TestEnv::new().await;
    let ca = TestCa::new("mq-untrusted");
    let proxy = tls_proxy(&ca, true).await;
    let url = format!("amqps://guest:s3cret@localhost:{}/%2f", proxy.port);
    for service in ["worker", "api", "scheduler"] {
        let (out, took) = run(&env, &[service], &[("AMQP_URL", &url)]).await;
        let line = one_error(&format!("{service} without the CA"), &out);
        assert!(took < Duration::from_secs(10), "{service}: took {took:?}");
        assert!(line.contains("not trusted"), "{line}");
        assert!(line.contains("TASKHOST__AMQP__TLS_CA_FILE"), "{line}");
        assert!(
            line.contains(&format!("amqps://guest:***@localhost:{}/%2f", proxy.port)),
            "names the endpoint: {line}"
        );
        assert!(!line.contains("s3cret"), "password shown: {line}");
    }
    // Trusted, but without the client certificate the proxy asks for.
    let ca_file = path(&ca.pem_file);
    let (out, _) = run(
        &env,
        &["worker"],
        &[
            ("AMQP_URL", &url),
            ("TASKHOST__AMQP__TLS_CA_FILE", &ca_file),
        ],
    )
    .await;
    let line = one_error("worker without a client certificate", &out);
    assert!(line.contains("RabbitMQ"), "{line}");
    assert!(line.contains("tls_client_cert_file"), "{line}");
    assert_eq!(
        proxy.handshakes.load(Ordering::SeqCst),
        0,
        "no connection got through"
    );
    env.cleanup().await;
}

// ---------------------------------------------------- least privilege

/// The README's `rabbitmqctl set_permissions` lines: component (the user
/// name after `taskhost-`) and its configure, write and read regexes.
fn documented_permissions() -> Vec<(String, [String; 3])> {
    let readme = include_str!("../../../README.md");
    let mut found = Vec::new();
    for line in readme.lines() {
        let Some(rest) = line
            .trim()
            .strip_prefix("rabbitmqctl set_permissions -p / taskhost-")
        else {
            continue;
        };
        let (component, rest) = rest.split_once(' ').expect("a user and three regexes");
        let quoted: Vec<String> = rest
            .split('\'')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        let [c, w, r]: [String; 3] = quoted.try_into().expect("three quoted regexes");
        found.push((component.to_owned(), [c, w, r]));
    }
    found
}

fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("rabbitmqctl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Deletes the test's broker users when dropped, even after a failure.
struct Users(Vec<String>);

impl Drop for Users {
    fn drop(&mut self) {
        for user in &self.0 {
            let _ = rabbitmqctl(&["delete_user", user]);
        }
    }
}

/// Whether a `basic.get` on `queue` as `url`'s user is refused.
async fn read_refused(url: &str, queue: &str) -> bool {
    let conn = amqp::connect(url, "least-privilege-probe")
        .await
        .expect("connect as the component's user");
    let ch = conn.create_channel().await.expect("channel");
    let got = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await;
    let _ = conn.close(200, "probe".into()).await;
    match got {
        Ok(_) => false,
        Err(e) => {
            let text = format!("{e} {e:?}");
            assert!(text.contains("ACCESS") || text.contains("403"), "{text}");
            true
        }
    }
}

/// A queue of the guest user that copies everything published to
/// `<p>.events` and `<p>.control`.
async fn tap(env: &TestEnv) -> String {
    let names = env.names();
    let conn = amqp::connect(AMQP_URL, "least-privilege-tap")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    for exchange in ["events", "control"] {
        amqp::declare_exchange(&ch, &names, exchange)
            .await
            .expect("declare");
    }
    let queue = format!("{}.tap", env.prefix);
    ch.queue_declare(
        queue.clone().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("tap queue");
    for exchange in [names.events(), names.control()] {
        ch.queue_bind(
            queue.clone().into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind tap");
    }
    let _ = conn.close(200, "done".into()).await;
    queue
}

/// The routing keys of every message in the tap so far.
async fn tapped(env: &TestEnv, queue: &str) -> Vec<String> {
    let mut keys = Vec::new();
    while let Some(msg) = env.get_one(queue).await {
        keys.push(msg.delivery.routing_key.to_string());
    }
    keys
}

/// The api's `/metrics` text.
async fn metrics(api: &Api) -> String {
    api.http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// The value of an unlabelled counter in `/metrics` text.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

async fn wait_task_run(env: &TestEnv, task: Uuid) -> Uuid {
    let deadline = Instant::now() + JOB_WAIT;
    loop {
        let id: Option<Uuid> = sqlx::query_scalar(
            "SELECT job_id FROM jobs WHERE task_id = $1 AND status = 'succeeded' LIMIT 1",
        )
        .bind(task)
        .fetch_optional(&env.pool)
        .await
        .expect("task runs");
        if let Some(id) = id {
            return id;
        }
        assert!(Instant::now() < deadline, "task {task} never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn one_broker_user_per_component_with_the_documented_permissions_runs_everything() {
    if Command::new("rabbitmqctl").arg("--help").output().is_err() {
        eprintln!("SKIPPED: rabbitmqctl is not on the PATH (the broker runs elsewhere)");
        return;
    }
    let mut env = TestEnv::new().await;
    let documented = documented_permissions();
    let components: Vec<&str> = documented.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(components, ["api", "scheduler", "worker"], "README lines");
    let password = Uuid::new_v4().simple().to_string();
    let mut users = Users(Vec::new());
    let mut url_of = std::collections::HashMap::new();
    for (component, regexes) in &documented {
        let user = format!("{}-{component}", env.prefix);
        rabbitmqctl(&["add_user", &user, &password]).expect("add user");
        users.0.push(user.clone());
        // The documented regexes, for this test's prefix.
        let [c, w, r] = regexes
            .clone()
            .map(|re| re.replace("taskhost", &env.prefix));
        rabbitmqctl(&["set_permissions", "-p", "/", &user, &c, &w, &r]).expect("set permissions");
        url_of.insert(
            component.clone(),
            format!("amqp://{user}:{password}@127.0.0.1:5672/%2f"),
        );
    }
    let tap = tap(&env).await;

    // Each component with its own user; the scheduler last, so the others
    // cannot lean on what it declares.
    let mut api_settings = env.settings.clone();
    api_settings.amqp.url = url_of["api"].clone();
    let api = env.start_api_with(api_settings).await;
    let mut worker_settings = env.worker_settings("least", "default", "worker");
    worker_settings.amqp.url = url_of["worker"].clone();
    env.start_worker_with(worker_settings).await;
    env.settings.amqp.url = url_of["scheduler"].clone();
    env.start_scheduler().await;

    let key = env.key("alice", &[Role::TaskManager, Role::Debug]).await;
    assert_ready(&api).await;
    // A job: api → work, worker consumes and publishes events.
    run_job(&env, &api, &key, "echo least privilege").await;

    // A cancel: api → control → the worker's control queue.
    let (status, body) = submit(
        &api,
        &key,
        &json!({"jobName": "long", "command": "sleep 30"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let long = job_id(&body);
    env.wait_status(long, "running", JOB_WAIT).await;
    let (status, body) = call(
        &api,
        Method::POST,
        &key,
        &format!("/jobs/{long}/cancel"),
        None,
    )
    .await;
    assert!(status < 300, "cancel: {status} {body}");
    assert_eq!(env.wait_terminal(long, JOB_WAIT).await, "cancelled");

    // A job no node matches, recorded dead by the api (its event too).
    let (status, body) = submit(
        &api,
        &key,
        &json!({"jobName": "nobody", "command": "true",
                "target": {"nodeGroup": "nobody", "fanout": "all"}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");

    // A job for a group no worker serves yet: the api creates its work
    // queue (with the dead-letter exchange, which RabbitMQ checks only when
    // a queue is created) and publishes it itself, not the outbox relay.
    let (status, body) = submit(
        &api,
        &key,
        &json!({"jobName": "later", "command": "true", "target": {"nodeGroup": "later"}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    env.wait_status(job_id(&body), "queued", JOB_WAIT).await;
    let metrics = metrics(&api).await;
    assert_eq!(
        metric(&metrics, "taskhost_publish_failures_total"),
        0,
        "the api's own publishes failed:\n{metrics}"
    );
    assert!(
        metric(&metrics, "taskhost_jobs_published_total") >= 3,
        "the api did not publish its jobs itself:\n{metrics}"
    );

    // A task fire: the scheduler → work.
    let (status, body) = call(
        &api,
        Method::POST,
        &key,
        "/tasks",
        Some(&json!({"taskName": "tick", "command": "echo tick", "schedule": "* * * * * *"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let task: Uuid = body["taskId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("taskId");
    wait_task_run(&env, task).await;
    let (status, body) = call(
        &api,
        Method::PUT,
        &key,
        &format!("/tasks/{task}"),
        Some(&json!({"enabled": false})),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // The ingress: another system publishes; the scheduler consumes
    // `<p>.submit`, accepts one and dead-letters the other to `<p>.dead`.
    let names = env.names();
    let queued = Uuid::now_v7();
    let body = json!({"userId": "alice", "jobName": "queued", "command": "echo queued"});
    env.publish_raw(
        &names.submit(),
        "submit",
        body.to_string().as_bytes(),
        Some("job.submit.v1"),
        Some(&queued.to_string()),
    )
    .await;
    assert_eq!(env.wait_terminal(queued, JOB_WAIT).await, "succeeded");
    let refused = Uuid::now_v7().to_string();
    env.publish_raw(
        &names.submit(),
        "submit",
        b"not json",
        Some("job.submit.v1"),
        Some(&refused),
    )
    .await;
    let mut dead = Vec::new();
    wait_dead(&env, &mut dead, &refused, JOB_WAIT).await;
    // A work message the worker refuses: the worker → `<p>.dead`.
    let bad_work = format!("{}:1", Uuid::now_v7());
    env.publish_raw(
        "",
        &names.work_queue("any"),
        b"not json",
        Some("job.run.v1"),
        Some(&bad_work),
    )
    .await;
    let msg = wait_dead(&env, &mut dead, &bad_work, JOB_WAIT).await;
    assert!(
        msg.reason.is_some(),
        "the worker's dead letter has a reason"
    );

    // Everyone's events arrived: the worker's job events, the api's
    // `job.dead`, the scheduler's change feed, the api's cancel command.
    let keys = tapped(&env, &tap).await;
    for want in [
        "job.running",
        "job.succeeded",
        "job.dead",
        "change.jobs.insert",
    ] {
        assert!(keys.iter().any(|k| k == want), "no {want} in {keys:?}");
    }
    assert!(
        keys.iter().any(|k| k.starts_with("node.")),
        "no cancel command in {keys:?}"
    );

    // And no more than that: the api and the worker cannot read the
    // ingress or the dead letters.
    for component in ["api", "worker"] {
        for queue in [names.submit(), names.dead()] {
            assert!(
                read_refused(&url_of[component], &queue).await,
                "{component} may read {queue}"
            );
        }
    }
    env.cleanup().await;
    drop(users);
}

// ------------------------------------------------------------ logging

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        self.0
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

// One thread, so the capturing subscriber sees the api's tasks too.
#[tokio::test(flavor = "current_thread")]
async fn the_api_logs_no_authorization_header_even_at_trace() {
    let mut env = TestEnv::new().await;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("trace,sqlx=info,lapin=info,reqwest=info,hyper_util::client=info")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let (status, body) = submit(&api, &key, &json!({"jobName": "logged", "command": "true"})).await;
    assert_eq!(status, 202, "{body}");
    // The key with its last character changed (to one it is not: a key
    // that ends in '0' would otherwise stay itself).
    let last = if key.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &key[..key.len() - 1]);
    assert_ne!(wrong, key);
    let (status, _) = get(&api, &wrong, "/jobs/results").await;
    assert_eq!(status, 401);
    let (status, _) = get(&api, "not-a-key-at-all", "/jobs/results").await;
    assert_eq!(status, 401);
    drop(guard);
    let logs = captured.text();
    // The capture works: the request spans are there.
    assert!(
        logs.contains("/api/v1/jobs/submit"),
        "nothing captured:\n{logs}"
    );
    let secret = key.rsplit('_').next().unwrap_or(&key);
    for leak in [key.as_str(), wrong.as_str(), secret, "not-a-key-at-all"] {
        assert!(!logs.contains(leak), "the logs hold a key:\n{logs}");
    }
    env.cleanup().await;
}
