//! Running one shell command: its own process group, a timeout, cancel, and
//! stdout/stderr captured up to a cap.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Appended to output cut at the cap.
pub const TRUNCATED_MARKER: &str = "\n[output truncated by taskhost]\n";

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The process exited (any code).
    Exited,
    /// Killed at its timeout.
    TimedOut,
    /// Killed on request.
    Cancelled,
    /// Could not be started.
    SpawnFailed,
    /// Not started: its secret environment could not be decrypted here.
    SecretsUnreadable,
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// How it ended.
    pub ending: Ending,
    /// Exit code; 128 + signal when a signal ended it.
    pub exit_code: Option<i32>,
    /// Captured stdout.
    pub stdout: Vec<u8>,
    /// Captured stderr.
    pub stderr: Vec<u8>,
    /// Whether either stream was cut at the cap.
    pub truncated: bool,
    /// The run went past its timeout and was left running (kill_on_timeout
    /// off).
    pub overran: bool,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// How long it ran.
    pub duration: Duration,
}

/// The output a run has captured so far, shared with whoever shows it
/// live (`crate::live`): each stream's kept bytes (at most the cap), a
/// prefix of what is finally stored.
#[derive(Debug, Default)]
pub struct Capture {
    /// Kept stdout so far.
    pub stdout: std::sync::Mutex<Vec<u8>>,
    /// Kept stderr so far.
    pub stderr: std::sync::Mutex<Vec<u8>>,
}

impl Capture {
    /// Copies of both streams as they stand.
    pub fn snapshot(&self) -> (Vec<u8>, Vec<u8>) {
        let copy = |m: &std::sync::Mutex<Vec<u8>>| m.lock().map(|v| v.clone()).unwrap_or_default();
        (copy(&self.stdout), copy(&self.stderr))
    }

    /// Bytes captured so far, both streams together.
    pub fn captured(&self) -> usize {
        let len = |m: &std::sync::Mutex<Vec<u8>>| m.lock().map_or(0, |v| v.len());
        len(&self.stdout) + len(&self.stderr)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CommandSpec<'a> {
    /// Shell program and leading args, e.g. `["/bin/sh", "-c"]`.
    pub shell: &'a [String],
    /// The command text, passed as the shell's last argument.
    pub command: &'a str,
    /// The job's environment, after what the sandbox passes on of the
    /// worker's (nothing else of the worker's reaches the job).
    pub env: &'a BTreeMap<String, String>,
    /// Kill after this long.
    pub timeout: Option<Duration>,
    /// Bytes kept of each stream.
    pub output_cap: usize,
    /// Kill at the timeout (true), or only record the overrun (false).
    pub kill_on_timeout: bool,
    /// Who it runs as and within what limits (None: as the worker, no
    /// limits).
    pub sandbox: Option<&'a crate::sandbox::Sandbox>,
    /// Its working directory (None: the worker's).
    pub dir: Option<&'a std::path::Path>,
    /// Where the output is captured as it comes (None: a private one).
    pub capture: Option<std::sync::Arc<Capture>>,
    /// The job's own limits, which tighten the sandbox's.
    pub limits: Option<&'a taskhost_common::model::JobLimits>,
}

async fn read_capped<R: AsyncRead + Unpin>(
    mut reader: R,
    cap: usize,
    kept: std::sync::Arc<Capture>,
    stderr: bool,
) -> (Vec<u8>, bool) {
    let sink = || if stderr { &kept.stderr } else { &kept.stdout };
    let mut buf = [0u8; 8192];
    let mut truncated = false;
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let Ok(mut v) = sink().lock() else { break };
                let room = cap.saturating_sub(v.len());
                if n > room {
                    truncated = true;
                }
                // Past the cap keep draining, so the child never blocks on a
                // full pipe.
                v.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    let mut out = sink()
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    if truncated {
        out.extend_from_slice(TRUNCATED_MARKER.as_bytes());
    }
    (out, truncated)
}

fn kill_group(pgid: Option<u32>) {
    if let Some(pid) = pgid.and_then(|p| i32::try_from(p).ok()) {
        // ESRCH (group already gone) is the normal case after a clean exit.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Runs the command and waits for it, killing its whole process group on
/// timeout or cancel. When the main process exits, whatever it left running
/// in its group is killed too, so a finished job holds no resources.
pub async fn run(spec: CommandSpec<'_>, cancel: CancellationToken) -> Outcome {
    let started_at = Utc::now();
    let clock = Instant::now();
    if spec.shell.is_empty() {
        return spawn_failed(started_at, clock, "no shell configured".into());
    }
    let argv = match spec.sandbox {
        Some(s) => match s.argv(spec.shell, spec.command, spec.limits) {
            Ok(argv) => argv,
            Err(e) => return spawn_failed(started_at, clock, format!("taskhost: {e}\n")),
        },
        None => {
            let mut argv = spec.shell.to_vec();
            argv.push(spec.command.to_owned());
            argv
        }
    };
    let Some((program, args)) = argv.split_first() else {
        return spawn_failed(started_at, clock, "no shell configured".into());
    };
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = spec.sandbox.and_then(|s| s.spawn_ids()) {
        cmd.uid(uid).gid(gid);
    }
    if let Some(dir) = spec.dir {
        cmd.current_dir(dir);
    }
    // Only what the sandbox passes on and the job's own variables: the
    // worker's environment holds its credentials.
    cmd.env_clear();
    if let Some(s) = spec.sandbox {
        cmd.envs(s.env.iter().map(|(k, v)| (k, v)));
    }
    cmd.args(args)
        .envs(spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return spawn_failed(started_at, clock, format!("cannot start {program}: {e}\n")),
    };
    let pgid = child.id();
    let cap = spec.output_cap;
    let capture = spec.capture.clone().unwrap_or_default();
    let stdout = child
        .stdout
        .take()
        .map(|r| tokio::spawn(read_capped(r, cap, capture.clone(), false)));
    let stderr = child
        .stderr
        .take()
        .map(|r| tokio::spawn(read_capped(r, cap, capture.clone(), true)));

    let deadline = spec.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut overran = false;
    let (ending, status) = loop {
        let timeout = async {
            match deadline {
                Some(d) if !overran => tokio::time::sleep_until(d).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            status = child.wait() => break (Ending::Exited, status.ok()),
            () = timeout => {
                if spec.kill_on_timeout {
                    kill_group(pgid);
                    break (Ending::TimedOut, child.wait().await.ok());
                }
                // kill_on_timeout off: note the overrun and let it finish
                // (cancel still works).
                overran = true;
            }
            () = cancel.cancelled() => {
                kill_group(pgid);
                break (Ending::Cancelled, child.wait().await.ok());
            }
        }
    };
    kill_group(pgid);
    let duration = clock.elapsed();
    let collect = |h: Option<tokio::task::JoinHandle<(Vec<u8>, bool)>>| async move {
        match h {
            Some(h) => tokio::time::timeout(Duration::from_secs(5), h)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
            None => (Vec::new(), false),
        }
    };
    let ((out, t1), (err, t2)) = tokio::join!(collect(stdout), collect(stderr));
    let exit_code = status.and_then(|s| {
        use std::os::unix::process::ExitStatusExt;
        s.code().or_else(|| s.signal().map(|sig| 128 + sig))
    });
    Outcome {
        ending,
        exit_code,
        stdout: out,
        stderr: err,
        truncated: t1 || t2,
        overran,
        started_at,
        duration,
    }
}

fn spawn_failed(started_at: DateTime<Utc>, clock: Instant, message: String) -> Outcome {
    not_started(Ending::SpawnFailed, started_at, clock, message)
}

/// The outcome of a run that never started, with `message` as its stderr.
pub(crate) fn not_started(
    ending: Ending,
    started_at: DateTime<Utc>,
    clock: Instant,
    message: String,
) -> Outcome {
    Outcome {
        ending,
        exit_code: None,
        stdout: Vec::new(),
        stderr: message.into_bytes(),
        truncated: false,
        overran: false,
        started_at,
        duration: clock.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh() -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into()]
    }

    async fn go(cmd: &str, timeout: Option<Duration>, cap: usize) -> Outcome {
        let shell = sh();
        let env = BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]);
        run(
            CommandSpec {
                shell: &shell,
                command: cmd,
                env: &env,
                timeout,
                output_cap: cap,
                kill_on_timeout: true,
                sandbox: None,
                dir: None,
                capture: None,
                limits: None,
            },
            CancellationToken::new(),
        )
        .await
    }

    #[tokio::test]
    async fn captures_output_env_and_exit_code() {
        let o = go("echo $GREETING; echo oops >&2; exit 3", None, 1024).await;
        assert_eq!(o.ending, Ending::Exited);
        assert_eq!(o.exit_code, Some(3));
        assert_eq!(o.stdout, b"hello\n");
        assert_eq!(o.stderr, b"oops\n");
    }

    #[tokio::test]
    async fn output_is_capped_with_a_marker() {
        let o = go("head -c 100000 /dev/zero | tr '\\0' a", None, 1000).await;
        assert!(o.truncated);
        assert!(o.stdout.starts_with(&[b'a'; 1000]));
        assert!(o.stdout.ends_with(TRUNCATED_MARKER.as_bytes()));
    }

    #[tokio::test]
    async fn timeout_kills_the_group() {
        let started = Instant::now();
        let o = go(
            "sleep 30 & sleep 30; echo never",
            Some(Duration::from_millis(300)),
            1024,
        )
        .await;
        assert_eq!(o.ending, Ending::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(o.stdout.is_empty());
    }

    #[tokio::test]
    async fn missing_shell_is_a_spawn_failure() {
        let shell = vec!["/nonexistent/shell".to_owned()];
        let env = BTreeMap::new();
        let o = run(
            CommandSpec {
                shell: &shell,
                command: "true",
                env: &env,
                timeout: None,
                output_cap: 10,
                kill_on_timeout: true,
                sandbox: None,
                dir: None,
                capture: None,
                limits: None,
            },
            CancellationToken::new(),
        )
        .await;
        assert_eq!(o.ending, Ending::SpawnFailed);
        assert!(String::from_utf8_lossy(&o.stderr).contains("cannot start"));
    }

    #[tokio::test]
    async fn without_kill_on_timeout_the_run_finishes_and_the_overrun_is_noted() {
        let shell = sh();
        let env = BTreeMap::new();
        let o = run(
            CommandSpec {
                shell: &shell,
                command: "sleep 0.5; echo finished",
                env: &env,
                timeout: Some(Duration::from_millis(100)),
                output_cap: 100,
                kill_on_timeout: false,
                sandbox: None,
                dir: None,
                capture: None,
                limits: None,
            },
            CancellationToken::new(),
        )
        .await;
        assert_eq!(o.ending, Ending::Exited);
        assert_eq!(o.exit_code, Some(0));
        assert!(o.overran);
        assert_eq!(o.stdout, b"finished\n");
    }
}
