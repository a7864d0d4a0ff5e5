//! Per-job costs: Postgres transactions (pg_stat_database) and broker
//! messages (counted by temporary queues bound to the prefix's exchanges).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sqlx::PgPool;
use taskhost_common::amqp::{self, Names};
use taskhost_testkit::{AMQP_URL, PG_SERVER};

/// Transactions the bench itself ran on the bench database (its polls and
/// reads), subtracted from the pg_stat_database delta.
pub(crate) static OWN_XACTS: AtomicU64 = AtomicU64::new(0);

/// Counts one of the bench's own statements (each is one autocommit
/// transaction).
pub(crate) fn own() {
    OWN_XACTS.fetch_add(1, Ordering::Relaxed);
}

/// What the services published, by exchange.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Published {
    pub(crate) work: u64,
    pub(crate) events: u64,
    pub(crate) control: u64,
    pub(crate) dead: u64,
}

impl Published {
    pub(crate) fn total(&self) -> u64 {
        self.work + self.events + self.control + self.dead
    }
}

/// Running meters, started before the first service.
pub(crate) struct Meter {
    stats: PgPool,
    db_name: String,
    xacts_before: i64,
    own_before: u64,
    conn: lapin::Connection,
    counts: Arc<[AtomicU64; 4]>,
    consumers: Vec<tokio::task::JoinHandle<()>>,
}

/// What the meters read at the end.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Costs {
    /// Transactions of the services (bench's own subtracted).
    pub(crate) xacts: i64,
    pub(crate) published: Published,
}

async fn xacts(stats: &PgPool, db_name: &str) -> anyhow::Result<i64> {
    // The statistics snapshot is per transaction; each autocommit query
    // reads a fresh one.
    let v: Option<i64> = sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database WHERE datname = $1",
    )
    .bind(db_name)
    .fetch_optional(stats)
    .await
    .context("read pg_stat_database")?;
    Ok(v.unwrap_or(0))
}

impl Meter {
    /// Starts counting: reads the transaction baseline (from the `postgres`
    /// database, so the reads are not counted) and binds one temporary
    /// exclusive queue per exchange: `<p>.events` (`#`), `<p>.work`
    /// (`any`, the routing key of every bench job), `<p>.control` (`#`),
    /// `<p>.dead` (fanout).
    pub(crate) async fn start(db_name: &str, names: &Names) -> anyhow::Result<Self> {
        let stats = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{PG_SERVER}/postgres"))
            .await
            .context("connect to the postgres database for statistics")?;
        let conn = amqp::connect(AMQP_URL, "bench-meter").await?;
        let ch = conn.create_channel().await?;
        amqp::declare_topology(&ch, names).await?;
        let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
        let mut consumers = Vec::new();
        for (i, (exchange, key)) in [
            (names.work(), "any"),
            (names.events(), "#"),
            (names.control(), "#"),
            (names.dead(), ""),
        ]
        .into_iter()
        .enumerate()
        {
            let q = ch
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let qname = q.name().clone();
            ch.queue_bind(
                qname.clone(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            let mut consumer = ch
                .basic_consume(
                    qname,
                    format!("bench-count-{i}").into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let counts = counts.clone();
            consumers.push(tokio::spawn(async move {
                while let Some(Ok(_)) = consumer.next().await {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let xacts_before = xacts(&stats, db_name).await?;
        Ok(Self {
            stats,
            db_name: db_name.to_owned(),
            xacts_before,
            own_before: OWN_XACTS.load(Ordering::Relaxed),
            conn,
            counts,
            consumers,
        })
    }

    /// Messages counted so far.
    pub(crate) fn published(&self) -> Published {
        let c = |i: usize| self.counts[i].load(Ordering::Relaxed);
        Published {
            work: c(0),
            events: c(1),
            control: c(2),
            dead: c(3),
        }
    }

    /// Reads the end figures. Call after every service stopped and the
    /// bench's own pool closed: a backend flushes its statistics when it
    /// exits, while an idle one may hold them for up to 10 s.
    pub(crate) async fn finish(self) -> anyhow::Result<Costs> {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let _ = sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(&self.stats)
            .await;
        let after = xacts(&self.stats, &self.db_name).await?;
        let own = OWN_XACTS.load(Ordering::Relaxed) - self.own_before;
        let published = self.published();
        let _ = self.conn.close(200, "done".into()).await;
        for c in &self.consumers {
            c.abort();
        }
        self.stats.close().await;
        Ok(Costs {
            xacts: after - self.xacts_before - own as i64,
            published,
        })
    }
}
