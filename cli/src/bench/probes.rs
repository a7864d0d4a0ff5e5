//! What this machine does on its own, measured before every run: shell
//! spawns, Postgres commits, broker publishes and consumes, CPUs, memory.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use sqlx::PgPool;
use taskhost_common::amqp;
use taskhost_testkit::{AMQP_URL, TestEnv};
use taskhost_worker::sandbox::Switcher;

use super::report::Limit;

/// Each probe runs this long.
pub(crate) const PROBE: Duration = Duration::from_millis(1500);
/// Publisher confirms kept in flight.
pub(crate) const CONFIRM_WINDOW: usize = 1024;
/// Prefetch of the consume probe.
const CONSUME_PREFETCH: u16 = 500;
/// Rows per batch of the batched-insert probe.
const BATCH_ROWS: usize = 1000;

pub(crate) const SPAWN_SEQ: &str = "spawns_per_s";
pub(crate) const SPAWN_PAR: &str = "spawns_per_s_2_concurrent";
pub(crate) const SPAWN_SWITCHED: &str = "spawns_per_s_2_concurrent_as_nobody";
pub(crate) const PG_BATCH_ROWS: &str = "pg_batched_rows_per_s";
pub(crate) const PG_COMMITS: &str = "pg_single_row_commits_per_s";
pub(crate) const AMQP_CONFIRMS: &str = "amqp_confirmed_publishes_per_s";
pub(crate) const AMQP_ROUNDTRIP: &str = "amqp_publish_consume_ack_per_s";
pub(crate) const CPUS: &str = "cpus";
pub(crate) const MEM: &str = "memory_total_mib";

/// Runs every probe; progress on stderr.
pub(crate) async fn run(env: &TestEnv) -> anyhow::Result<Vec<Limit>> {
    let mut out = Vec::new();
    eprintln!("probe: sh -c true, sequential");
    out.push(Limit {
        key: SPAWN_SEQ,
        label: "sh -c true, sequential (runs/s)",
        value: spawns(1).await?,
    });
    eprintln!("probe: sh -c true, 2 concurrent spawners");
    out.push(Limit {
        key: SPAWN_PAR,
        label: "sh -c true, 2 concurrent spawners (runs/s)",
        value: spawns(2).await?,
    });
    // A root worker runs jobs as `nobody` through a user switch in front
    // of the shell (README, "Jobs run unprivileged and bounded"):
    // taskhost's launcher, else `setpriv`. One more exec per job, so this
    // spawn rate is the one a default worker can reach.
    let nobody = (65534, 65534);
    if nix::unistd::geteuid().is_root()
        && let Some(switcher) = Switcher::find(nobody)
    {
        let label = match switcher {
            Switcher::Launcher { .. } => "launcher (nobody) + sh -c true, 2 spawners (runs/s)",
            Switcher::Setpriv(_) => "setpriv (nobody) + sh -c true, 2 spawners (runs/s)",
        };
        eprintln!(
            "probe: {} (nobody) + sh -c true, 2 concurrent spawners",
            switcher.name()
        );
        let mut argv = switcher.prefix(nobody);
        argv.extend(["/bin/sh", "-c", "true"].map(String::from));
        out.push(Limit {
            key: SPAWN_SWITCHED,
            label,
            value: spawn_loops(2, argv).await?,
        });
    }
    // Own short-lived pool: closing it ends its backends, which flushes
    // their statistics before the run's transaction count starts.
    let pool = PgPool::connect_with(taskhost_common::db::connect_options(&env.db_url())?)
        .await
        .context("probe pool")?;
    eprintln!("probe: Postgres batched inserts");
    let pg = pg_probes(&pool).await;
    pool.close().await;
    let (rows, commits) = pg?;
    out.push(Limit {
        key: PG_BATCH_ROWS,
        label: "pg INSERT 1000-row UNNEST batches, committed (rows/s)",
        value: rows,
    });
    out.push(Limit {
        key: PG_COMMITS,
        label: "pg single-row INSERT+COMMIT, 1 connection (commits/s)",
        value: commits,
    });
    eprintln!("probe: broker confirmed publishes");
    out.push(Limit {
        key: AMQP_CONFIRMS,
        label: "amqp persistent publish + confirm (msgs/s)",
        value: amqp_confirms(&env.prefix).await?,
    });
    eprintln!("probe: broker publish + consume + ack");
    out.push(Limit {
        key: AMQP_ROUNDTRIP,
        label: "amqp publish + consume + ack, prefetch 500 (msgs/s)",
        value: amqp_roundtrip(&env.prefix).await?,
    });
    out.push(Limit {
        key: CPUS,
        label: "CPUs",
        value: cpus() as f64,
    });
    out.push(Limit {
        key: MEM,
        label: "memory total (MiB)",
        value: mem_total_mib() as f64,
    });
    Ok(out)
}

/// `sh -c true` runs per second with `spawners` concurrent loops.
async fn spawns(spawners: usize) -> anyhow::Result<f64> {
    spawn_loops(
        spawners,
        ["/bin/sh", "-c", "true"].map(String::from).to_vec(),
    )
    .await
}

/// Runs per second of `argv` with `spawners` concurrent loops.
async fn spawn_loops(spawners: usize, argv: Vec<String>) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..spawners {
        let argv = argv.clone();
        loops.push(tokio::spawn(async move {
            let mut n = 0u64;
            while t.elapsed() < PROBE {
                let status = tokio::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(std::process::Stdio::null())
                    .status()
                    .await?;
                if !status.success() {
                    bail!("{} failed: {status}", argv.join(" "));
                }
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for l in loops {
        total += l.await??;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

/// (batched rows/s, single-row commits/s), on a regular (WAL-logged) table
/// like the jobs table, dropped afterwards.
async fn pg_probes(pool: &PgPool) -> anyhow::Result<(f64, f64)> {
    sqlx::query("CREATE TABLE bench_probe (id bigserial PRIMARY KEY, v integer NOT NULL)")
        .execute(pool)
        .await?;
    let result = async {
        let mut conn = pool.acquire().await?;
        let batch: Vec<i32> = (0..BATCH_ROWS as i32).collect();
        let t = Instant::now();
        let mut rows = 0u64;
        while t.elapsed() < PROBE {
            sqlx::query("INSERT INTO bench_probe (v) SELECT unnest($1::int4[])")
                .bind(&batch)
                .execute(&mut *conn)
                .await?;
            rows += BATCH_ROWS as u64;
        }
        let rows_per_s = rows as f64 / t.elapsed().as_secs_f64();
        eprintln!("probe: Postgres single-row commits");
        // Each autocommit INSERT is its own transaction and WAL flush.
        let t = Instant::now();
        let mut commits = 0u64;
        while t.elapsed() < PROBE {
            sqlx::query("INSERT INTO bench_probe (v) VALUES ($1)")
                .bind(commits as i32)
                .execute(&mut *conn)
                .await?;
            commits += 1;
        }
        anyhow::Ok((rows_per_s, commits as f64 / t.elapsed().as_secs_f64()))
    }
    .await;
    let _ = sqlx::query("DROP TABLE IF EXISTS bench_probe")
        .execute(pool)
        .await;
    result
}

async fn durable_scratch_queue(ch: &lapin::Channel, name: &str) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(name.into(), durable, FieldTable::default())
        .await
        .map(|_| ())
}

/// Persistent publishes to a durable queue with up to CONFIRM_WINDOW
/// confirms in flight; acked messages per second.
async fn amqp_confirms(prefix: &str) -> anyhow::Result<f64> {
    let queue = format!("{prefix}.bench-probe-confirm");
    let conn = amqp::connect(AMQP_URL, "bench-probe").await?;
    let result = async {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        durable_scratch_queue(&ch, &queue).await?;
        let t = Instant::now();
        let acked = publish_for(&ch, &queue, PROBE).await?;
        let rate = acked as f64 / t.elapsed().as_secs_f64();
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        anyhow::Ok(rate)
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    result
}

/// Publishes 256-byte persistent messages to `queue` for `span` with a
/// confirm window; returns how many the broker acked.
async fn publish_for(ch: &lapin::Channel, queue: &str, span: Duration) -> anyhow::Result<u64> {
    let props = lapin::BasicProperties::default().with_delivery_mode(2);
    let payload = [0u8; 256];
    let mut in_flight = VecDeque::with_capacity(CONFIRM_WINDOW);
    let mut acked = 0u64;
    let t = Instant::now();
    while t.elapsed() < span {
        if in_flight.len() >= CONFIRM_WINDOW
            && let Some(c) = in_flight.pop_front()
        {
            acked += u64::from(matches!(c.await?, Confirmation::Ack(_)));
        }
        let c = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &payload,
                props.clone(),
            )
            .await?;
        in_flight.push_back(c);
    }
    for c in in_flight {
        acked += u64::from(matches!(c.await?, Confirmation::Ack(_)));
    }
    Ok(acked)
}

/// Publishes (confirmed, persistent, to a durable queue) while a consumer
/// with prefetch 500 acks every message; consumed messages per second.
async fn amqp_roundtrip(prefix: &str) -> anyhow::Result<f64> {
    let queue = format!("{prefix}.bench-probe-roundtrip");
    let conn = amqp::connect(AMQP_URL, "bench-probe").await?;
    let result = async {
        let pub_ch = conn.create_channel().await?;
        pub_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        durable_scratch_queue(&pub_ch, &queue).await?;
        let con_ch = conn.create_channel().await?;
        con_ch
            .basic_qos(CONSUME_PREFETCH, BasicQosOptions::default())
            .await?;
        let mut consumer = con_ch
            .basic_consume(
                queue.as_str().into(),
                "bench-probe".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumed = Arc::new(AtomicU64::new(0));
        let counter = consumed.clone();
        let consuming = tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                if d.acker.ack(BasicAckOptions::default()).await.is_err() {
                    break;
                }
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        let t = Instant::now();
        publish_for(&pub_ch, &queue, PROBE).await?;
        let rate = consumed.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
        consuming.abort();
        pub_ch
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        anyhow::Ok(rate)
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    result
}

pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn mem_total_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}
