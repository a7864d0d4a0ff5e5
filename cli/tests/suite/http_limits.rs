//! Connections cannot lock the api out (issue #10): a connection that does
//! not finish its request headers is closed after `api.header_timeout_secs`,
//! an idle kept-alive one after `api.idle_timeout_secs`, at most
//! `api.max_connections` are open (more wait for a slot), and running out
//! of file descriptors does not stop the accept loop. Raw TCP from the
//! test, the real api; the last test runs the `taskhost api` binary under
//! `prlimit --nofile=64:64`.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use taskhost_testkit::{Api, TestEnv};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_taskhost");
/// Timers fire within this of their setting, on a busy 2-core machine too.
const SLACK: Duration = Duration::from_secs(3);
const LIVEZ: &[u8] = b"GET /livez HTTP/1.1\r\nHost: taskhost\r\n\r\n";

/// `127.0.0.1:<port>` of a running api.
fn addr(api: &Api) -> String {
    api.base.trim_start_matches("http://").to_owned()
}

async fn connect(addr: &str) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

/// Reads until the server closes the connection (EOF or an error); the time
/// that took, or `None` if it is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return t.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// Reads one HTTP/1.1 response with a Content-Length body; its status.
async fn read_response(stream: &mut TcpStream) -> u16 {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("response within 10 s")
            .expect("read response");
        assert_eq!(n, 1, "connection closed in the response head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("utf-8 head");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.expect("read body");
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_finish_its_headers_is_closed_after_the_header_timeout() {
    let mut env = TestEnv::new().await;
    let mut settings = env.settings.clone();
    settings.api.header_timeout_secs = 1;
    settings.api.idle_timeout_secs = 60;
    let api = env.start_api_with(settings).await;
    let addr = addr(&api);

    // Silent from the start; half a request line, then nothing.
    let mut silent = connect(&addr).await;
    let mut half = connect(&addr).await;
    half.write_all(b"GET /liv").await.expect("write");
    // Headers trickling in, a byte every 100 ms: progress does not extend
    // the time a client has for its headers.
    let (mut trickle_read, mut trickle_write) = connect(&addr).await.into_split();
    let trickler = tokio::spawn(async move {
        let head = b"GET /livez HTTP/1.1\r\nHost: taskhost\r\nX-Slow: ";
        for i in 0..600 {
            let byte = head.get(i).copied().unwrap_or(b'a');
            if trickle_write.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    let within = Duration::from_secs(1) + SLACK;
    let (silent_took, half_took) = tokio::join!(
        closed_within(&mut silent, within),
        closed_within(&mut half, within)
    );
    for (what, took) in [("silent", silent_took), ("half request line", half_took)] {
        let took = took.unwrap_or_else(|| panic!("{what} connection still open after {within:?}"));
        assert!(
            took >= Duration::from_millis(500),
            "{what}: closed after {took:?}, before the 1 s header timeout"
        );
    }
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(within, async {
        loop {
            match trickle_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a connection trickling its headers is still open after {within:?}"
    );
    trickler.abort();

    // The api itself is fine.
    let resp = api.http.get(format!("{}/livez", api.base)).send().await;
    assert_eq!(resp.expect("livez").status().as_u16(), 200);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let mut env = TestEnv::new().await;
    let mut settings = env.settings.clone();
    // Shorter than the idle timeout on purpose: the wait between requests
    // is governed by the idle timeout alone.
    settings.api.header_timeout_secs = 1;
    settings.api.idle_timeout_secs = 3;
    let api = env.start_api_with(settings).await;
    let mut conn = connect(&addr(&api)).await;

    conn.write_all(LIVEZ).await.expect("write");
    assert_eq!(read_response(&mut conn).await, 200);
    // Idle for longer than the header timeout: still open.
    assert_eq!(
        closed_within(&mut conn, Duration::from_secs(2)).await,
        None,
        "an idle kept-alive connection was closed before api.idle_timeout_secs"
    );
    // And still usable: keep-alive works.
    conn.write_all(LIVEZ).await.expect("write");
    assert_eq!(read_response(&mut conn).await, 200);
    // Then idle past the idle timeout: closed.
    let within = Duration::from_secs(3) + SLACK;
    let took = closed_within(&mut conn, within)
        .await
        .unwrap_or_else(|| panic!("idle connection still open after {within:?}"));
    assert!(
        took >= Duration::from_secs(2),
        "closed after {took:?} idle, before the 3 s idle timeout"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_a_new_connection_waits_for_a_slot_and_is_answered() {
    let mut env = TestEnv::new().await;
    let mut settings = env.settings.clone();
    settings.api.max_connections = 4;
    settings.api.header_timeout_secs = 2;
    let api = env.start_api_with(settings).await;
    let addr = addr(&api);

    // Four silent connections take every slot.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(connect(&addr).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A fifth waits, and is answered once the header timeout frees a slot.
    let t = Instant::now();
    let mut fifth = connect(&addr).await;
    fifth.write_all(LIVEZ).await.expect("write");
    assert_eq!(read_response(&mut fifth).await, 200);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(1),
        "answered after {waited:?}: the 4 silent connections should hold every slot"
    );
    assert!(
        waited <= Duration::from_secs(2) + SLACK,
        "answered only after {waited:?}"
    );
    for (i, conn) in silent.iter_mut().enumerate() {
        assert!(
            closed_within(conn, SLACK).await.is_some(),
            "silent connection {i} still open"
        );
    }
    // With the slots free again, answers come at once.
    let t = Instant::now();
    let resp = api.http.get(format!("{}/livez", api.base)).send().await;
    assert_eq!(resp.expect("livez").status().as_u16(), 200);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    env.cleanup().await;
}

/// A TCP port nothing listens on (yet).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_survives_running_out_of_file_descriptors_and_livez_answers() {
    let Some(prlimit) = which("prlimit") else {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    };
    let env = TestEnv::new().await;
    let bind = format!("127.0.0.1:{}", free_port());
    let mut cmd = tokio::process::Command::new(prlimit);
    cmd.args(["--nofile=64:64", BIN, "api"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.env())
        .env("TASKHOST__API__BIND", &bind)
        .env("TASKHOST__API__HEADER_TIMEOUT_SECS", "2")
        .env("TASKHOST__LOG__FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn prlimit taskhost api");
    let logs = Arc::new(Mutex::new(Vec::<String>::new()));
    let stderr = child.stderr.take().expect("stderr");
    let collector = {
        let logs = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                logs.lock().expect("logs").push(line);
            }
        })
    };
    let dump = |logs: &Arc<Mutex<Vec<String>>>| logs.lock().expect("logs").join("\n");

    let http = || {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client")
    };
    let livez = format!("http://{bind}/livez");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("api exited at start-up: {status}\n{}", dump(&logs));
        }
        if let Ok(resp) = http().get(&livez).send().await
            && resp.status().as_u16() == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "api not up within 20 s\n{}",
            dump(&logs)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 100 silent connections: more than the process may open files.
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(connect(&bind).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // While they are all still open on our side, /livez answers: the
    // accepted ones are closed by the header timeout, the accept loop keeps
    // going and takes the waiting ones, then ours.
    let t = Instant::now();
    let resp = http().get(&livez).send().await;
    let status = resp
        .unwrap_or_else(|e| panic!("livez under 100 silent connections: {e}\n{}", dump(&logs)))
        .status();
    assert_eq!(status.as_u16(), 200);
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "livez took {:?}",
        t.elapsed()
    );
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the api died\n{}",
        dump(&logs)
    );
    let elapsed = started.elapsed();
    drop(silent);

    let lines: Vec<Value> = logs
        .lock()
        .expect("logs")
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let warns = |needle: &str| {
        lines
            .iter()
            .filter(|l| {
                l["level"] == "WARN" && l["message"].as_str().is_some_and(|m| m.contains(needle))
            })
            .count()
    };
    // Start-up said the limit is too low for api.max_connections.
    assert_eq!(warns("may open only 64 files"), 1, "{}", dump(&logs));
    // The accept errors were logged at WARN, at most once every 5 s.
    let emfile = warns("Too many open files");
    let most = usize::try_from(elapsed.as_secs() / 5).unwrap_or(usize::MAX) + 2;
    assert!(
        (1..=most).contains(&emfile),
        "{emfile} EMFILE lines in {elapsed:?}\n{}",
        dump(&logs)
    );
    assert!(!dump(&logs).contains("panicked"), "{}", dump(&logs));

    // And it still stops cleanly.
    let pid = Pid::from_raw(i32::try_from(child.id().expect("pid")).expect("pid fits i32"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap_or_else(|_| panic!("api did not exit within 15 s of SIGTERM\n{}", dump(&logs)))
        .expect("wait");
    assert!(status.success(), "exited with {status}\n{}", dump(&logs));
    let _ = collector.await;
    env.cleanup().await;
}

/// The path of `program` on PATH.
fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}
