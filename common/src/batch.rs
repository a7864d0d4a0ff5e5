//! Group commit: requests from many tasks that arrive together are handled
//! as one batch (one transaction, a few set-based statements; no per-job
//! commit at load, see docs/contract.md, "Performance targets"). The api
//! batches plain submissions; the worker batches claims and run endings.
//!
//! A [`Batcher`] takes requests from many tasks. Whenever a runner is free
//! it takes everything waiting (up to a maximum) as one batch, so batches
//! grow with the load and a lone request goes through at once, with no
//! timer. If a batch fails as a whole (a deadlock, a dropped connection),
//! each of its requests is tried again alone, so one bad request never
//! fails the others.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

type Reply<A> = oneshot::Sender<Result<A, String>>;

/// Waits for an item on `rx`, then gathers into `buf` whatever else arrives
/// within `linger` of it, up to `max` items in all. Returns how many it
/// took: 0 only when every sender is gone and nothing was waiting (a
/// lingering batch ends early, and is returned, when the senders go).
pub async fn gather<T>(
    rx: &mut mpsc::UnboundedReceiver<T>,
    buf: &mut Vec<T>,
    max: usize,
    linger: std::time::Duration,
) -> usize {
    let start = buf.len();
    if rx.recv_many(buf, max).await == 0 {
        return 0;
    }
    let deadline = tokio::time::Instant::now() + linger;
    while buf.len() - start < max {
        let room = max - (buf.len() - start);
        match tokio::time::timeout_at(deadline, rx.recv_many(buf, room)).await {
            Ok(n) if n > 0 => {}
            _ => break, // the deadline, or every sender gone
        }
    }
    buf.len() - start
}

/// Batches requests of type `R` answered with `A`.
pub struct Batcher<R, A> {
    tx: mpsc::Sender<(R, Reply<A>)>,
}

impl<R: Clone + Send + 'static, A: Send + 'static> Batcher<R, A> {
    /// Starts the batching task: at most `runners` batches of at most `max`
    /// requests run at once, each through `run`, which answers every
    /// request of its batch in order or fails the batch as a whole.
    pub fn spawn<F, Fut>(max: usize, runners: usize, run: F) -> Self
    where
        F: Fn(Vec<R>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<A>, String>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<(R, Reply<A>)>(4096);
        let run = Arc::new(run);
        let free = Arc::new(Semaphore::new(runners.max(1)));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = free.clone().acquire_owned().await else {
                    return;
                };
                let Some(first) = rx.recv().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < max {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let run = run.clone();
                tokio::spawn(async move {
                    run_batch(&*run, batch).await;
                    drop(permit);
                });
            }
        });
        Self { tx }
    }

    /// Sends one request and waits for its answer.
    pub async fn call(&self, request: R) -> Result<A, String> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((request, reply))
            .await
            .map_err(|_| "the batcher stopped".to_owned())?;
        answer
            .await
            .unwrap_or_else(|_| Err("the batcher stopped".to_owned()))
    }
}

async fn run_batch<R, A, F, Fut>(run: &F, batch: Vec<(R, Reply<A>)>)
where
    R: Clone,
    F: Fn(Vec<R>) -> Fut,
    Fut: Future<Output = Result<Vec<A>, String>>,
{
    let requests: Vec<R> = batch.iter().map(|(r, _)| r.clone()).collect();
    let size = requests.len();
    match run(requests).await {
        Ok(answers) if answers.len() == size => {
            for ((_, reply), answer) in batch.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Ok(_) => {
            for (_, reply) in batch {
                let _ = reply.send(Err("a batch answered the wrong number of requests".into()));
            }
        }
        Err(error) if size == 1 => {
            for (_, reply) in batch {
                let _ = reply.send(Err(error.clone()));
            }
        }
        Err(error) => {
            tracing::debug!(%error, size, "batch failed; trying its requests one by one");
            for (request, reply) in batch {
                let answer = run(vec![request])
                    .await
                    .and_then(|mut a| a.pop().ok_or_else(|| "no answer".to_owned()));
                let _ = reply.send(answer);
            }
        }
    }
}
