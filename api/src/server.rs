//! The accept loop and what bounds a connection (issue #10): a cap on open
//! connections, a header-read timeout, an idle keep-alive timeout, and an
//! accept loop that outlives running out of file descriptors.
//!
//! - **The cap waits, it does not refuse.** Every connection holds a permit
//!   of a semaphore of `api.max_connections`. With none left the loop stops
//!   calling `accept`: new connections wait in the kernel's listen backlog,
//!   where they hold none of our file descriptors, and are accepted in
//!   arrival order as open ones close. A client arriving while silent or
//!   slow connections fill the cap gets its answer late rather than an
//!   error, and the timeouts below bound how long any slot stays taken. The
//!   start of such a burst is logged once at WARN (at most once a minute),
//!   its end once at INFO.
//! - **Timeouts.** hyper's own `header_read_timeout` runs whenever hyper
//!   waits for a request head, between keep-alive requests too, so it cannot
//!   give an idle connection longer than a half-sent request. A watchdog per
//!   connection follows its phase instead: reading a head (closed
//!   `api.header_timeout_secs` after the accept, or after the first byte of
//!   a next request, however slowly the bytes trickle), handling (bounded by
//!   the router's request timeout), writing the response (closed after
//!   `api.idle_timeout_secs` without progress), idle between requests
//!   (closed after `api.idle_timeout_secs`).
//! - **Accept errors** never end the loop. Errors of the one new connection
//!   are skipped; out of file descriptors or memory (EMFILE, ENFILE,
//!   ENOBUFS, ENOMEM) the loop logs at WARN (at most once every 5 s, with
//!   how many it left out) and retries every 100 ms while the pending
//!   connections wait in the backlog; anything else, every second.
//! - **Shutdown** stops accepting, closes idle connections, lets requests in
//!   flight finish and waits for the connections to close, for the given
//!   drain time at most; what is left is then closed.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use nix::errno::Errno;
use taskhost_common::CancellationToken;
use taskhost_common::config::ApiSettings;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

/// Pause after an accept error for lack of file descriptors or memory.
const RESOURCE_PAUSE: Duration = Duration::from_millis(100);
/// Pause after any other accept error that is not the new connection's own.
const OTHER_PAUSE: Duration = Duration::from_secs(1);
/// Accept errors are logged at most this often.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(5);
/// "Connection cap reached" is logged at most this often.
const CAP_LOG_EVERY: Duration = Duration::from_secs(60);
/// File descriptors the process needs besides its connections (database
/// pool, broker, runtime, standard streams).
const RESERVED_FDS: u64 = 64;

/// The limits of [`accept_loop`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// `api.max_connections`.
    pub(crate) max_connections: usize,
    /// `api.header_timeout_secs`.
    pub(crate) header_timeout: Duration,
    /// `api.idle_timeout_secs`.
    pub(crate) idle_timeout: Duration,
    /// How long shutdown waits for open connections.
    pub(crate) drain: Duration,
}

impl Limits {
    pub(crate) fn new(api: &ApiSettings, drain: Duration) -> Self {
        Self {
            max_connections: api.max_connections.max(1),
            header_timeout: Duration::from_secs(api.header_timeout_secs),
            idle_timeout: Duration::from_secs(api.idle_timeout_secs),
            drain,
        }
    }
}

/// Warns at start-up when the open-file limit is below what
/// `api.max_connections` needs: past it, accepts fail with EMFILE (the loop
/// survives that, but connections wait longer than the cap says).
pub(crate) fn check_open_file_limit(max_connections: usize) {
    use nix::sys::resource::{Resource, getrlimit};
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let needed = (max_connections as u64).saturating_add(RESERVED_FDS);
    if soft < needed {
        tracing::warn!(
            open_file_limit = soft,
            max_connections,
            "api.max_connections = {max_connections} but this process may open only {soft} \
             files (ulimit -n); raise the limit to {needed} or more, or lower \
             api.max_connections (TASKHOST__API__MAX_CONNECTIONS)"
        );
    }
}

/// Accepts connections on `listener` and serves `app` on each until
/// `shutdown`, then drains (see the module documentation).
pub(crate) async fn accept_loop(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let force = CancellationToken::new();
    let mut cap_log = CapLog::new(limits.max_connections);
    let mut error_log = LogEvery::new(ACCEPT_LOG_EVERY);
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                cap_log.below_cap();
                permit
            }
            Err(_) => {
                cap_log.at_cap(Instant::now());
                tokio::select! {
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break, // never closed
                    },
                    () = shutdown.cancelled() => break,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, remote)) => {
                tokio::spawn(connection(
                    stream,
                    remote,
                    app.clone(),
                    limits,
                    permit,
                    shutdown.clone(),
                    force.clone(),
                ));
            }
            Err(error) => {
                drop(permit);
                let kind = AcceptError::classify(&error);
                let Some(pause) = kind.pause() else {
                    tracing::debug!(%error, "accept: the new connection failed; skipped");
                    continue;
                };
                if let Some(left_out) = error_log.hit(Instant::now()) {
                    match kind {
                        AcceptError::Resources => tracing::warn!(
                            %error,
                            left_out,
                            open = limits.max_connections - slots.available_permits(),
                            "cannot accept connections: {error}; retrying every {pause:?} \
                             while they wait (raise the open-file limit or lower \
                             api.max_connections)"
                        ),
                        _ => tracing::warn!(
                            %error,
                            left_out,
                            "cannot accept connections: {error}; retrying every {pause:?}"
                        ),
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shutdown.cancelled() => break,
                }
            }
        }
    }
    // Connections still in the backlog are refused from here on.
    drop(listener);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let open = limits.max_connections - slots.available_permits();
    if open > 0 {
        tracing::info!(open, "api draining connections");
    }
    if tokio::time::timeout(limits.drain, slots.acquire_many(all))
        .await
        .is_err()
    {
        let open = limits.max_connections - slots.available_permits();
        tracing::warn!(
            open,
            "{open} connection(s) still open {:?} after shutdown began; closing them",
            limits.drain
        );
        force.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), slots.acquire_many(all)).await;
    }
}

/// Serves one connection under its watchdog; the permit is its slot.
async fn connection(
    stream: TcpStream,
    remote: SocketAddr,
    app: Router,
    limits: Limits,
    _slot: tokio::sync::OwnedSemaphorePermit,
    shutdown: CancellationToken,
    force: CancellationToken,
) {
    let activity = Arc::new(Activity::new(limits, Instant::now()));
    let io = TokioIo::new(TrackedIo {
        stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            activity.set(Phase::Handling);
            let app = app.clone();
            let activity = activity.clone();
            async move {
                let response = match app.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                activity.set(Phase::Writing);
                Ok::<_, Infallible>(response.map(|body| ResponseBody {
                    body,
                    _done: Done(activity),
                }))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The watchdog below owns the timeouts (see the module documentation).
    builder.header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let mut draining = false;
    loop {
        let wake = activity.arm(Instant::now());
        let earlier = activity.earlier.notified();
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%remote, %error, "connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            () = force.cancelled() => return,
            () = earlier => {}
            () = tokio::time::sleep_until(wake) => {
                if let Some(phase) = activity.expired(Instant::now()) {
                    tracing::debug!(%remote, phase, "closing a connection that timed out");
                    return;
                }
            }
        }
    }
}

/// Where a connection stands, for its watchdog.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request's head, since the accept or since the first
    /// byte of a next request.
    Head { since: Instant },
    /// The router has the request.
    Handling,
    /// hyper writes the response.
    Writing,
    /// Kept alive, waiting for the next request.
    Idle { since: Instant },
}

/// A connection's phase and its last read or write, shared by the IO, the
/// service, the response body and the watchdog (all in the connection's
/// task, so the lock is never contended).
///
/// The watchdog sleeps until the time [`Activity::arm`] gives and looks
/// again; a change that brings the deadline before that wakes it early.
struct Activity {
    limits: Limits,
    state: Mutex<State>,
    earlier: Notify,
}

struct State {
    phase: Phase,
    last_io: Instant,
    /// When the watchdog looks next.
    wake: Instant,
}

impl State {
    /// When the watchdog is to look again and, if the connection is to be
    /// closed then, the phase that says so. A request the router handles
    /// is never closed here (the router's timeout bounds it).
    fn deadline(&self, limits: &Limits, now: Instant) -> (Instant, Option<&'static str>) {
        match self.phase {
            Phase::Head { since } => (since + limits.header_timeout, Some("reading headers")),
            Phase::Handling => (now + limits.idle_timeout, None),
            Phase::Writing => (
                self.last_io + limits.idle_timeout,
                Some("writing a response"),
            ),
            Phase::Idle { since } => (since + limits.idle_timeout, Some("idle")),
        }
    }
}

impl Activity {
    fn new(limits: Limits, now: Instant) -> Self {
        Self {
            limits,
            state: Mutex::new(State {
                phase: Phase::Head { since: now },
                last_io: now,
                wake: now,
            }),
            earlier: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// For the watchdog: when to look again.
    fn arm(&self, now: Instant) -> Instant {
        let mut state = self.lock();
        state.wake = state.deadline(&self.limits, now).0;
        state.wake
    }

    /// For the watchdog: the phase that says to close the connection now.
    fn expired(&self, now: Instant) -> Option<&'static str> {
        match self.lock().deadline(&self.limits, now) {
            (at, Some(phase)) if at <= now => Some(phase),
            _ => None,
        }
    }

    fn set(&self, phase: Phase) {
        let now = Instant::now();
        let mut state = self.lock();
        state.phase = phase;
        state.last_io = now;
        self.wake_if_earlier(state, now);
    }

    /// Bytes arrived: the first byte after an idle spell starts a head.
    /// (Bytes of a pipelined request that arrived while the previous one
    /// was handled leave the connection idle; the idle timeout bounds it.)
    fn read(&self) {
        let now = Instant::now();
        let mut state = self.lock();
        state.last_io = now;
        if let Phase::Idle { .. } = state.phase {
            state.phase = Phase::Head { since: now };
            self.wake_if_earlier(state, now);
        }
    }

    fn wrote(&self) {
        self.lock().last_io = Instant::now();
    }

    fn wake_if_earlier(&self, state: std::sync::MutexGuard<'_, State>, now: Instant) {
        let earlier = matches!(
            state.deadline(&self.limits, now),
            (at, Some(_)) if at < state.wake
        );
        drop(state);
        if earlier {
            self.earlier.notify_one();
        }
    }
}

/// The TCP stream, telling the [`Activity`] about reads and writes.
struct TrackedIo {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read();
        }
        result
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Marks the connection idle when hyper is done with the response (it drops
/// the body once the last byte is written).
struct Done(Arc<Activity>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.set(Phase::Idle {
            since: Instant::now(),
        });
    }
}

/// The router's response body, with the [`Done`] marker.
struct ResponseBody {
    body: Body,
    _done: Done,
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What an accept error means for the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcceptError {
    /// The new connection's own failure (reset, aborted, a pending network
    /// error Linux reports through accept(2)): skip it, accept the next.
    Connection,
    /// Out of file descriptors or memory: pause briefly, retry.
    Resources,
    /// Anything else: pause longer, retry.
    Other,
}

impl AcceptError {
    pub(crate) fn classify(error: &io::Error) -> Self {
        use io::ErrorKind as K;
        if matches!(
            error.kind(),
            K::ConnectionAborted
                | K::ConnectionReset
                | K::ConnectionRefused
                | K::Interrupted
                | K::WouldBlock
        ) {
            return Self::Connection;
        }
        match error.raw_os_error().map(Errno::from_raw) {
            Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM) => Self::Resources,
            // accept(2): "Linux accept() passes already-pending network
            // errors on the new socket as an error code from accept()";
            // EPERM is a firewall refusing the connection.
            Some(
                Errno::ENETDOWN
                | Errno::EPROTO
                | Errno::ENOPROTOOPT
                | Errno::EHOSTDOWN
                | Errno::ENONET
                | Errno::EHOSTUNREACH
                | Errno::EOPNOTSUPP
                | Errno::ENETUNREACH
                | Errno::EPERM,
            ) => Self::Connection,
            _ => Self::Other,
        }
    }

    /// How long the loop waits before the next accept; `None`: at once.
    pub(crate) fn pause(self) -> Option<Duration> {
        match self {
            Self::Connection => None,
            Self::Resources => Some(RESOURCE_PAUSE),
            Self::Other => Some(OTHER_PAUSE),
        }
    }
}

/// Lets one log line through per interval and counts the rest.
#[derive(Debug)]
pub(crate) struct LogEvery {
    every: Duration,
    last: Option<Instant>,
    left_out: u64,
}

impl LogEvery {
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            left_out: 0,
        }
    }

    /// `Some(lines left out since the last one)` when this one is to be
    /// logged.
    pub(crate) fn hit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            self.left_out += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.left_out))
    }
}

/// One WARN line when a burst reaches the connection cap (at most one per
/// [`CAP_LOG_EVERY`]) and one INFO line when it ends.
#[derive(Debug)]
pub(crate) struct CapLog {
    max: usize,
    in_burst: bool,
    logged: bool,
    waited: u64,
    every: LogEvery,
}

impl CapLog {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            in_burst: false,
            logged: false,
            waited: 0,
            every: LogEvery::new(CAP_LOG_EVERY),
        }
    }

    /// A connection is about to wait for a slot; true when this logged.
    pub(crate) fn at_cap(&mut self, now: Instant) -> bool {
        self.waited += 1;
        if self.in_burst {
            return false;
        }
        self.in_burst = true;
        self.waited = 1;
        self.logged = self.every.hit(now).is_some();
        if self.logged {
            tracing::warn!(
                max_connections = self.max,
                "connection cap reached (api.max_connections = {}); new connections wait",
                self.max
            );
        }
        self.logged
    }

    /// A slot was free without waiting; true when this logged.
    pub(crate) fn below_cap(&mut self) -> bool {
        if !std::mem::take(&mut self.in_burst) || !std::mem::take(&mut self.logged) {
            return false;
        }
        tracing::info!(
            max_connections = self.max,
            waited = self.waited,
            "connections below the cap again; {} waited for a slot",
            self.waited
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(errno: Errno) -> io::Error {
        io::Error::from_raw_os_error(errno as i32)
    }

    #[test]
    fn out_of_descriptors_pauses_briefly_and_retries() {
        for errno in [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM] {
            let kind = AcceptError::classify(&os(errno));
            assert_eq!(kind, AcceptError::Resources, "{errno}");
            let pause = kind.pause().expect("a pause");
            assert!(
                pause >= Duration::from_millis(50) && pause <= Duration::from_millis(100),
                "{pause:?}"
            );
        }
    }

    #[test]
    fn a_failed_new_connection_is_skipped_at_once() {
        for errno in [
            Errno::ECONNABORTED,
            Errno::ECONNRESET,
            Errno::EPROTO,
            Errno::ENETUNREACH,
            Errno::EINTR,
        ] {
            let kind = AcceptError::classify(&os(errno));
            assert_eq!(kind, AcceptError::Connection, "{errno}");
            assert_eq!(kind.pause(), None);
        }
    }

    #[test]
    fn other_errors_pause_longer_and_never_stop_the_loop() {
        let kind = AcceptError::classify(&os(Errno::EBADF));
        assert_eq!(kind, AcceptError::Other);
        assert_eq!(kind.pause(), Some(Duration::from_secs(1)));
        let kind = AcceptError::classify(&io::Error::other("strange"));
        assert_eq!(kind, AcceptError::Other);
    }

    #[test]
    fn accept_errors_are_logged_once_per_interval_with_a_count() {
        let t = Instant::now();
        let mut log = LogEvery::new(Duration::from_secs(5));
        assert_eq!(log.hit(t), Some(0));
        for ms in (100..5000).step_by(100) {
            assert_eq!(log.hit(t + Duration::from_millis(ms)), None);
        }
        assert_eq!(log.hit(t + Duration::from_secs(5)), Some(49));
        assert_eq!(log.hit(t + Duration::from_secs(6)), None);
    }

    #[test]
    fn the_cap_is_logged_once_per_burst_not_per_connection() {
        let t = Instant::now();
        let mut log = CapLog::new(4);
        assert!(log.at_cap(t));
        for _ in 0..1000 {
            assert!(!log.at_cap(t));
        }
        assert!(log.below_cap());
        assert!(!log.below_cap());
        // A new burst within the minute is not logged again, nor its end.
        assert!(!log.at_cap(t + Duration::from_secs(10)));
        assert!(!log.below_cap());
        // After it, it is.
        assert!(log.at_cap(t + Duration::from_secs(61)));
    }
}
