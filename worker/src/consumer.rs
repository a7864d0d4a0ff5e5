//! One broker connection's life: declare the topology and this node's
//! queues, consume work and control messages until shutdown (then drain
//! while the channel is still open for acks) or until the connection fails.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::select_all;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use taskhost_common::amqp;
use taskhost_common::messages::Control;
use uuid::Uuid;

use crate::{Ctx, StopReason, job, running_count};

fn queue_keys(ctx: &Ctx) -> Vec<String> {
    let w = &ctx.settings.worker;
    vec![
        "any".to_owned(),
        format!("group.{}", w.group),
        format!("role.{}", w.role),
        format!("group.{}.role.{}", w.group, w.role),
        format!("node.{}", ctx.node_id),
    ]
}

/// One connection's life: declare, consume until shutdown (then drain while
/// the channel is still open for acks) or until the connection fails.
pub(crate) async fn consume(ctx: &Arc<Ctx>) -> Result<(), lapin::Error> {
    let conn = amqp::connect(
        &ctx.settings.amqp.url,
        &format!("taskhost-worker@{}", ctx.node_name),
    )
    .await?;
    let ch = conn.create_channel().await?;
    amqp::declare_topology(&ch, &ctx.names).await?;
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
    let control_ch = conn.create_channel().await?;
    let control_queue = ctx.names.control_queue(ctx.node_id);
    control_ch
        .queue_declare(
            control_queue.clone().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
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
    let mut work = select_all(consumers);
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
                    let ctx2 = ctx.clone();
                    ctx.tracker.spawn(async move { job::handle(ctx2, delivery).await });
                }
                Some(Err(e)) => return Err(e),
                None => return Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed))),
            },
            Some(msg) = control.next() => {
                if let Ok(msg) = msg {
                    on_control(ctx, &msg.data);
                }
            }
        }
    }
}

fn on_control(ctx: &Ctx, data: &[u8]) {
    match serde_json::from_slice::<Control>(data) {
        Ok(Control::Cancel { job_id }) => {
            if let Some(r) = ctx
                .running
                .lock()
                .ok()
                .as_ref()
                .and_then(|m| m.get(&job_id))
            {
                tracing::info!(%job_id, "cancel received");
                r.stop(StopReason::Cancelled);
            }
        }
        Err(error) => tracing::warn!(%error, "ignoring malformed control message"),
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

pub(crate) async fn ack(delivery: &Delivery) {
    if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
        // The channel is gone: the broker redelivers, and the redelivery
        // finds the job finished and is acked without running again.
        tracing::debug!(%error, "ack failed");
    }
}

pub(crate) async fn requeue(delivery: &Delivery) {
    let _ = delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await;
}
