//! One broker connection's life: declare the topology and this node's
//! queues, consume work and control messages until shutdown (then drain
//! while the channel is still open for acks) or until the connection fails.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::select_all;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use taskhost_common::amqp;
use taskhost_common::messages::{CONTROL_V1, Control, REASON_HEADER};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{Ctx, StopReason, job, running_count};

pub(crate) fn queue_keys(ctx: &Ctx) -> Vec<String> {
    let w = &ctx.settings.worker;
    vec![
        "any".to_owned(),
        format!("group.{}", w.group),
        format!("role.{}", w.role),
        format!("group.{}.role.{}", w.group, w.role),
        format!("node.{}", ctx.node_id),
    ]
}

/// Declares the node's control queue, exclusive to this connection: while
/// one process holds it, another with the same node id is refused
/// (`RESOURCE_LOCKED`). Returns its name.
pub(crate) async fn declare_control_queue(
    ch: &lapin::Channel,
    names: &amqp::Names,
    node_id: Uuid,
) -> Result<String, lapin::Error> {
    let queue = names.control_queue(node_id);
    ch.queue_declare(
        queue.clone().into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    Ok(queue)
}

/// One connection's life: declare, consume until shutdown (then drain while
/// the channel is still open for acks) or until the connection fails.
pub(crate) async fn consume(ctx: &Arc<Ctx>) -> Result<(), lapin::Error> {
    // The first life goes on the start-up identity check's connection,
    // which has held the node's control queue since the check.
    let identity = ctx
        .identity
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .filter(|c| c.status().connected());
    let conn = Arc::new(match identity {
        Some(conn) => conn,
        None => {
            amqp::connect(
                &ctx.settings.amqp,
                &format!("taskhost-worker@{}", ctx.node_name),
            )
            .await?
        }
    });
    let ch = conn.create_channel().await?;
    // Only what this node binds to; its publisher declares the exchanges
    // it publishes to, and the scheduler the rest (least privilege).
    for exchange in ["work", "control"] {
        amqp::declare_exchange(&ch, &ctx.names, exchange).await?;
    }
    // The node's exclusive control queue first: when another process holds
    // it (a second worker with this node name), fail before consuming work.
    let control_ch = conn.create_channel().await?;
    let control_queue = declare_control_queue(&control_ch, &ctx.names, ctx.node_id).await?;
    for key in [format!("node.{}", ctx.node_id), "all".to_owned()] {
        control_ch
            .queue_bind(
                control_queue.clone().into(),
                ctx.names.control().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let keys = queue_keys(ctx);
    for key in &keys {
        amqp::declare_work_queue(&ch, &ctx.names, key).await?;
    }
    // global = true: one prefetch window shared by all consumers of the
    // channel, equal to the pool slots, so queued jobs wait in the broker
    // (where priorities apply) rather than in this process. Background jobs
    // are acked once claimed, so they do not hold the window for long.
    let w = &ctx.settings.worker;
    let prefetch = if w.prefetch == 0 {
        w.concurrency
    } else {
        w.prefetch
    };
    let prefetch = prefetch.min(u16::MAX as usize) as u16;
    ch.basic_qos(prefetch, BasicQosOptions { global: true })
        .await?;
    let mut consumers = Vec::new();
    let mut tags = Vec::new();
    for key in &keys {
        let tag = format!("{}.{}.{}", ctx.node_name, key, Uuid::new_v4().simple());
        let c = ch
            .basic_consume(
                ctx.names.work_queue(key).into(),
                tag.clone().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tags.push(tag);
        consumers.push(c);
    }
    let mut control = control_ch
        .basic_consume(
            control_queue.into(),
            format!("{}.control", ctx.node_name).into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queues = ?keys, prefetch, "consuming");
    let _up = ctx.broker.connected();
    let mut work = select_all(consumers);
    let acks = Acks::spawn();
    let _depths = DepthReader::spawn(ctx, &conn);
    loop {
        tokio::select! {
            () = ctx.shutdown.cancelled() => {
                for tag in &tags {
                    let _ = ch.basic_cancel(tag.clone().into(), BasicCancelOptions::default()).await;
                }
                drain(ctx).await;
                let _ = conn.close(200, "worker stopping".into()).await;
                return Ok(());
            }
            next = work.next() => match next {
                Some(Ok(delivery)) => {
                    let (ctx2, acks) = (ctx.clone(), acks.clone());
                    ctx.tracker.spawn(async move { job::handle(ctx2, acks, delivery).await });
                }
                Some(Err(e)) => return Err(e),
                None => return Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed))),
            },
            Some(msg) = control.next() => {
                if let Ok(msg) = msg {
                    on_control(ctx, &msg);
                }
            }
        }
    }
}

/// Reads the work queues' depths every heartbeat on the consumer's
/// connection, for as long as this connection's life (dropped: stopped).
struct DepthReader(tokio::task::JoinHandle<()>);

impl DepthReader {
    fn spawn(ctx: &Arc<Ctx>, conn: &Arc<lapin::Connection>) -> Self {
        let (ctx, conn) = (ctx.clone(), conn.clone());
        Self(tokio::spawn(async move {
            let every = Duration::from_secs(ctx.settings.worker.heartbeat_secs.max(1));
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                crate::record_queue_depths(&ctx, &conn).await;
            }
        }))
    }
}

impl Drop for DepthReader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn on_control(ctx: &Ctx, delivery: &Delivery) {
    let kind = delivery.properties.kind().as_ref().map(|k| k.to_string());
    let parsed = match kind.as_deref() {
        Some(k) if k != CONTROL_V1 => Err(format!(
            "unknown message type `{k}` (expected {CONTROL_V1})"
        )),
        _ => serde_json::from_slice::<Control>(&delivery.data)
            .map_err(|e| format!("invalid {CONTROL_V1} message: {e}")),
    };
    match parsed {
        Ok(Control::Cancel { job_id }) => {
            if job::stop_running(ctx, job_id, StopReason::Cancelled) {
                tracing::info!(%job_id, "cancel received");
            }
        }
        Err(reason) => {
            // Refused like a work message: kept in `<p>.dead` with the
            // reason. The control queue is consumed without acks, so there
            // is nothing to settle; a failed publish only loses the copy.
            tracing::warn!(%reason, routing_key = %delivery.routing_key, "control message refused");
            let msg = amqp::Outgoing {
                exchange: "dead".into(),
                routing_key: delivery.routing_key.to_string(),
                message_type: kind.unwrap_or_else(|| "unknown".to_owned()),
                message_id: delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map_or_else(String::new, |m| m.to_string()),
                priority: 0,
                payload: delivery.data.clone(),
                headers: vec![(REASON_HEADER.to_owned(), reason)],
            };
            let publisher = ctx.publisher.clone();
            tokio::spawn(async move {
                if let Err(error) = publisher.publish(&msg).await {
                    tracing::warn!(%error, "refused control message not dead-lettered");
                }
            });
        }
    }
}

/// Waits for in-flight jobs; after the drain timeout, kills them and hands
/// them back.
pub(crate) async fn drain(ctx: &Ctx) {
    ctx.tracker.close();
    let limit = Duration::from_secs(ctx.settings.worker.drain_timeout_secs);
    if tokio::time::timeout(limit, ctx.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            running = running_count(ctx),
            "drain timeout; stopping running jobs"
        );
        if let Ok(running) = ctx.running.lock() {
            for r in running.values() {
                r.stop(StopReason::Shutdown);
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), ctx.tracker.wait()).await;
    }
}

/// Settles the deliveries of one channel. Acks go through a task that
/// takes every ack waiting at once: when they continue the run of settled
/// delivery tags (tags are consecutive on a channel, from 1), one
/// `basic.ack` with `multiple` settles them all (a batch of jobs recorded
/// together is acked with one frame); the rest are acked one by one at
/// once, so a long job never holds back the acks of later ones. A
/// `multiple` ack never covers a tag that is not settled: every tag below
/// the one it names is either in the same batch or already settled.
pub(crate) struct Acks {
    settled: Mutex<Settled>,
    tx: mpsc::UnboundedSender<AckRequest>,
}

/// Which delivery tags of the channel are settled.
#[derive(Default)]
struct Settled {
    /// Every tag up to here is settled.
    floor: u64,
    /// Settled tags above the floor.
    above: BTreeSet<u64>,
}

impl Settled {
    fn settle(&mut self, tag: u64) {
        if tag > self.floor {
            self.above.insert(tag);
        }
        while self.above.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
    }

    /// How many of `sorted` (ascending, unsettled) continue the settled
    /// run from the floor, each tag in between being settled already.
    fn continuing(&self, sorted: &[u64]) -> usize {
        let mut next = self.floor + 1;
        let mut covered = 0;
        for &tag in sorted {
            while next < tag && self.above.contains(&next) {
                next += 1;
            }
            if tag != next {
                break;
            }
            covered += 1;
            next += 1;
        }
        covered
    }
}

/// One ack to send, and who waits for it to be sent.
type AckRequest = (u64, lapin::Acker, oneshot::Sender<()>);

impl Acks {
    /// Starts the ack task of one channel (it ends with the last handle).
    pub(crate) fn spawn() -> Arc<Self> {
        let (tx, mut rx) = mpsc::unbounded_channel::<AckRequest>();
        let acks = Arc::new(Self {
            settled: Mutex::new(Settled::default()),
            tx,
        });
        let weak = Arc::downgrade(&acks);
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, 4096).await > 0 {
                let Some(acks) = weak.upgrade() else { return };
                batch.sort_unstable_by_key(|(tag, _, _)| *tag);
                let tags: Vec<u64> = batch.iter().map(|(t, _, _)| *t).collect();
                let covered = acks.settled.lock().map_or(0, |s| s.continuing(&tags));
                if covered > 1 {
                    let multiple = BasicAckOptions { multiple: true };
                    if let Err(error) = batch[covered - 1].1.ack(multiple).await {
                        tracing::debug!(%error, "ack failed");
                    }
                } else if covered == 1 {
                    settle_one(&batch[0].1).await;
                }
                for (_, acker, _) in &batch[covered..] {
                    settle_one(acker).await;
                }
                if let Ok(mut s) = acks.settled.lock() {
                    for tag in tags {
                        s.settle(tag);
                    }
                }
                drop(acks);
                for (_, _, sent) in batch.drain(..) {
                    let _ = sent.send(());
                }
            }
        });
        acks
    }

    /// Acks a delivery, possibly together with others; returns once the
    /// ack is sent (so a drained worker has sent all its acks).
    pub(crate) async fn ack(&self, delivery: &Delivery) {
        let (sent, done) = oneshot::channel();
        let request = (delivery.delivery_tag, delivery.acker.clone(), sent);
        if self.tx.send(request).is_err() || done.await.is_err() {
            settle_one(&delivery.acker).await;
        }
    }

    /// Gives a delivery back to its queue. It counts as settled only once
    /// its nack is sent, so no `multiple` ack can cover it meanwhile.
    pub(crate) async fn requeue(&self, delivery: &Delivery) {
        amqp::requeue(delivery).await;
        self.settle(delivery);
    }

    /// Sends a delivery to `<p>.dead` with its reason.
    pub(crate) async fn dead_letter(
        &self,
        publisher: &taskhost_common::amqp::Publisher,
        delivery: &Delivery,
        reason: &str,
    ) {
        amqp::dead_letter(publisher, delivery, reason).await;
        self.settle(delivery);
    }

    fn settle(&self, delivery: &Delivery) {
        if let Ok(mut s) = self.settled.lock() {
            s.settle(delivery.delivery_tag);
        }
    }
}

async fn settle_one(acker: &lapin::Acker) {
    if let Err(error) = acker.ack(BasicAckOptions::default()).await {
        // The channel is gone: the broker redelivers, and the redelivery
        // finds the job finished and is acked without running again.
        tracing::debug!(%error, "ack failed");
    }
}

#[cfg(test)]
mod tests {
    use super::Settled;

    #[test]
    fn a_multiple_ack_covers_only_settled_tags() {
        let mut s = Settled::default();
        // 1 and 2 settle together: both covered.
        assert_eq!(s.continuing(&[1, 2]), 2);
        s.settle(1);
        s.settle(2);
        // 4 and 5 while 3 is out (running, or not yet handed to a job):
        // nothing may be acked with `multiple`.
        assert_eq!(s.continuing(&[4, 5]), 0);
        s.settle(4);
        s.settle(5);
        assert_eq!(s.floor, 2);
        // 3 settles: the run continues over 4 and 5 (already settled) to 6.
        assert_eq!(s.continuing(&[3, 6, 8]), 2);
        s.settle(3);
        s.settle(6);
        s.settle(8);
        assert_eq!(s.floor, 6);
        // 7 is still out, so 9 is acked alone.
        assert_eq!(s.continuing(&[9]), 0);
    }
}
