//! RabbitMQ: names under the configurable prefix, idempotent declaration of
//! the topology, and a publisher with confirms that reconnects by itself.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;

/// Priority ceiling of the work queues: job priorities are 0-9
/// (docs/contract.md, "Queue topology").
pub const MAX_PRIORITY: u8 = 9;

/// Exchange and queue names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// Names under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full name of a logical exchange (`work`, `events`, ...).
    pub fn exchange(&self, logical: &str) -> String {
        format!("{}.{}", self.prefix, logical)
    }

    /// `<p>.work`.
    pub fn work(&self) -> String {
        self.exchange("work")
    }

    /// The work queue of a routing key: `<p>.work.<key>`.
    pub fn work_queue(&self, routing_key: &str) -> String {
        format!("{}.work.{}", self.prefix, routing_key)
    }

    /// `<p>.dead`, exchange and queue.
    pub fn dead(&self) -> String {
        self.exchange("dead")
    }

    /// `<p>.submit`, exchange and queue.
    pub fn submit(&self) -> String {
        self.exchange("submit")
    }

    /// `<p>.events`.
    pub fn events(&self) -> String {
        self.exchange("events")
    }

    /// `<p>.control`.
    pub fn control(&self) -> String {
        self.exchange("control")
    }

    /// The control queue of one worker process.
    pub fn control_queue(&self, node_id: uuid::Uuid) -> String {
        format!("{}.control.node.{}", self.prefix, node_id)
    }
}

/// Where the broker is and how to reach it: `amqp.url` and, for
/// `amqps://`, the TLS files of `amqp.tls_*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// `amqp://` (clear) or `amqps://` (TLS) URL.
    pub url: String,
    /// PEM of CA certificates trusted besides the webpki roots; empty: none.
    pub tls_ca_file: String,
    /// PEM client certificate (chain); empty: none.
    pub tls_client_cert_file: String,
    /// PEM (PKCS#8) key of the client certificate; empty: none.
    pub tls_client_key_file: String,
}

impl Endpoint {
    /// The URL with its password hidden, for messages and logs.
    pub fn shown(&self) -> String {
        crate::startup::redact(&self.url)
    }

    /// The TLS configuration: the CA file's certificates (added to the
    /// webpki roots) and the client identity, read now, so a reconnect
    /// picks up rotated files.
    fn tls_config(&self) -> std::io::Result<OwnedTLSConfig> {
        let read = |key: &str, path: &str| {
            std::fs::read(path).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot read {key} {path}: {e}"))
            })
        };
        let cert_chain = if self.tls_ca_file.is_empty() {
            None
        } else {
            let pem = read("amqp.tls_ca_file", &self.tls_ca_file)?;
            let text = String::from_utf8(pem).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("amqp.tls_ca_file {} is not PEM text", self.tls_ca_file),
                )
            })?;
            if !text.contains("-----BEGIN CERTIFICATE-----") {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "amqp.tls_ca_file {} holds no PEM certificate",
                        self.tls_ca_file
                    ),
                ));
            }
            Some(text)
        };
        let identity = if self.tls_client_cert_file.is_empty() {
            None
        } else {
            Some(OwnedIdentity::PKCS8 {
                pem: read("amqp.tls_client_cert_file", &self.tls_client_cert_file)?,
                key: read("amqp.tls_client_key_file", &self.tls_client_key_file)?,
            })
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }
}

impl From<&crate::config::AmqpSettings> for Endpoint {
    fn from(s: &crate::config::AmqpSettings) -> Self {
        Self {
            url: s.url.clone(),
            tls_ca_file: s.tls_ca_file.clone(),
            tls_client_cert_file: s.tls_client_cert_file.clone(),
            tls_client_key_file: s.tls_client_key_file.clone(),
        }
    }
}

impl From<&str> for Endpoint {
    fn from(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            ..Self::default()
        }
    }
}

impl From<String> for Endpoint {
    fn from(url: String) -> Self {
        Self {
            url,
            ..Self::default()
        }
    }
}

impl From<&String> for Endpoint {
    fn from(url: &String) -> Self {
        url.as_str().into()
    }
}

impl From<&Endpoint> for Endpoint {
    fn from(e: &Endpoint) -> Self {
        e.clone()
    }
}

/// Connects to the broker at `endpoint` (a URL, or `&settings.amqp` for
/// its TLS files too), asking for a [`HEARTBEAT_SECS`] heartbeat and [`FRAME_MAX`] frames.
/// `amqps://` connects over TLS, verifying the broker's certificate and
/// host name against the webpki roots and `amqp.tls_ca_file`. Reconnection
/// is the caller's loop (see [`Publisher`] and [`supervise`]), because
/// lapin's own recovery is still settling.
pub async fn connect(endpoint: impl Into<Endpoint>, name: &str) -> lapin::Result<Connection> {
    let endpoint = endpoint.into();
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let tls = endpoint.tls_config()?;
    // A handshake across a silent network (a partition) would otherwise
    // wait forever and the caller's reconnect loop would never try again.
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect_with_config(
            &with_defaults(&endpoint.url),
            props,
            tls,
            lapin::runtime::default_runtime()?,
        ),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no AMQP handshake within {} s", CONNECT_TIMEOUT.as_secs()),
        )
        .into()),
    }
}

/// Longest wait for a connection and its AMQP handshake.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Heartbeat asked of the broker unless `amqp.url` names one
/// (`?heartbeat=N`): a frozen or cut-off process loses its connection, and
/// the deliveries it holds go to another consumer, within about twice this.
pub const HEARTBEAT_SECS: u16 = 10;

/// Largest frame asked of the broker unless `amqp.url` names one
/// (`?frame_max=N`). lapin keeps a receive and a send buffer of 32 frames
/// per connection, zero-filled: at RabbitMQ's default (128 KiB) that is
/// 8 MiB per connection, at this size 2 MiB. Larger messages travel as
/// several frames (README, "Performance").
pub const FRAME_MAX: u32 = 32 * 1024;

/// `url` with the [`HEARTBEAT_SECS`] and [`FRAME_MAX`] defaults added where
/// it names neither.
fn with_defaults(url: &str) -> String {
    let mut url = url.to_owned();
    for (key, value) in [
        ("heartbeat", u32::from(HEARTBEAT_SECS)),
        ("frame_max", FRAME_MAX),
    ] {
        let named = url
            .split_once('?')
            .is_some_and(|(_, q)| q.split('&').any(|pair| pair.split('=').next() == Some(key)));
        if !named {
            let sep = if url.contains('?') { '&' } else { '?' };
            url = format!("{url}{sep}{key}={value}");
        }
    }
    url
}

fn durable() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// The logical exchanges under the prefix and their kinds
/// (docs/contract.md, "Queue topology").
pub const EXCHANGES: [(&str, ExchangeKind); 5] = [
    ("work", ExchangeKind::Direct),
    ("dead", ExchangeKind::Fanout),
    ("submit", ExchangeKind::Direct),
    ("events", ExchangeKind::Topic),
    ("control", ExchangeKind::Topic),
];

/// Declares the durable exchange `<p>.<logical>` (one of [`EXCHANGES`]);
/// an unknown logical name declares nothing. Each process declares only
/// the exchanges it uses, so a broker user needs configure permission on
/// those alone (README, "Transport security and least privilege").
pub async fn declare_exchange(ch: &Channel, names: &Names, logical: &str) -> lapin::Result<()> {
    let Some((_, kind)) = EXCHANGES.iter().find(|(name, _)| *name == logical) else {
        return Ok(());
    };
    ch.exchange_declare(
        names.exchange(logical).into(),
        kind.clone(),
        durable(),
        FieldTable::default(),
    )
    .await
}

/// Declares every exchange and the fixed queues (`<p>.dead`, `<p>.submit`,
/// `<p>.work.any`): what the scheduler, which consumes `<p>.submit` and
/// owns the dead letters, declares when it connects. Idempotent: declaring
/// twice with the same arguments is a no-op on the broker.
pub async fn declare_topology(ch: &Channel, names: &Names) -> lapin::Result<()> {
    for (logical, _) in &EXCHANGES {
        declare_exchange(ch, names, logical).await?;
    }

    ch.queue_declare(names.dead().into(), durable_queue(), FieldTable::default())
        .await?;
    ch.queue_bind(
        names.dead().into(),
        names.dead().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;

    // Messages the ingress consumer rejects without a reason header still
    // end up in the dead queue.
    let mut submit_args = FieldTable::default();
    submit_args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(names.dead())),
    );
    ch.queue_declare(names.submit().into(), durable_queue(), submit_args)
        .await?;
    ch.queue_bind(
        names.submit().into(),
        names.submit().into(),
        "submit".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;

    declare_work_queue(ch, names, "any").await
}

/// Declares the durable work queue of `routing_key` and binds it, so a job
/// for a target with no live worker waits instead of vanishing.
pub async fn declare_work_queue(
    ch: &Channel,
    names: &Names,
    routing_key: &str,
) -> lapin::Result<()> {
    let queue = names.work_queue(routing_key);
    let mut args = FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        AMQPValue::ShortShortUInt(MAX_PRIORITY),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(names.dead())),
    );
    ch.queue_declare(queue.clone().into(), durable_queue(), args)
        .await?;
    ch.queue_bind(
        queue.into(),
        names.work().into(),
        routing_key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Logical exchange under the prefix: `work`, `events`, `dead`, `control`, `submit`.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// The AMQP `type` property, e.g. `job.run.v1`.
    pub message_type: String,
    /// The AMQP `message_id` property.
    pub message_id: String,
    /// 0..=9.
    pub priority: u8,
    /// JSON body.
    pub payload: Vec<u8>,
    /// Extra headers, e.g. `x-taskhost-reason` on dead letters.
    pub headers: Vec<(String, String)>,
}

impl Outgoing {
    fn properties(&self) -> BasicProperties {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_priority(self.priority.min(MAX_PRIORITY))
            .with_type(ShortString::from(self.message_type.clone()))
            .with_message_id(ShortString::from(self.message_id.clone()))
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64);
        if !self.headers.is_empty() {
            let mut table = FieldTable::default();
            for (k, v) in &self.headers {
                table.insert(
                    k.clone().into(),
                    AMQPValue::LongString(LongString::from(v.clone())),
                );
            }
            props = props.with_headers(table);
        }
        props
    }
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker could not be reached or the channel failed.
    #[error("broker unavailable: {0}")]
    Broker(String),
    /// The broker refused the message.
    #[error("broker refused the message (nack)")]
    Nacked,
    /// Publishing took too long.
    #[error("publish timed out")]
    Timeout,
    /// The broker blocked publishing (a disk or memory alarm).
    #[error("the broker blocks publishing (a disk or memory resource alarm)")]
    Blocked,
}

struct Live {
    connection: Arc<Connection>,
    channel: Channel,
    declared: Arc<Mutex<Declared>>,
}

/// What a publisher's connection has declared so far.
#[derive(Default)]
struct Declared {
    /// Logical exchange names.
    exchanges: HashSet<String>,
    /// Work routing keys whose queue is declared.
    work_queues: HashSet<String>,
}

/// A shared publisher with confirms. It connects on first use and again after
/// any failure; callers keep the outbox row until a publish is confirmed, so a
/// failure here only delays a message.
pub struct Publisher {
    endpoint: Endpoint,
    names: Names,
    name: String,
    live: Mutex<Option<Live>>,
}

impl Publisher {
    /// A publisher that has not connected yet; `endpoint` is a URL, or
    /// `&settings.amqp` for its TLS files too. It declares each exchange
    /// the first time it publishes to it, and the work queue of each
    /// routing key it publishes work to, nothing else.
    pub fn new(
        endpoint: impl Into<Endpoint>,
        names: Names,
        connection_name: impl Into<String>,
    ) -> Self {
        Self {
            endpoint: endpoint.into(),
            names,
            name: connection_name.into(),
            live: Mutex::new(None),
        }
    }

    /// The names this publisher uses.
    pub fn names(&self) -> &Names {
        &self.names
    }

    async fn channel(&self) -> Result<(Channel, Arc<Mutex<Declared>>), lapin::Error> {
        let mut live = self.live.lock().await;
        if let Some(l) = live.as_ref()
            && l.connection.status().connected()
            && l.channel.status().connected()
        {
            return Ok((l.channel.clone(), l.declared.clone()));
        }
        if let Some(old) = live.take() {
            let _ = old.connection.close(200, "reconnecting".into()).await;
        }
        let connection = connect(&self.endpoint, &self.name).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let declared = Arc::new(Mutex::new(Declared::default()));
        *live = Some(Live {
            connection: Arc::new(connection),
            channel: channel.clone(),
            declared: declared.clone(),
        });
        Ok((channel, declared))
    }

    async fn reset(&self) {
        if let Some(old) = self.live.lock().await.take() {
            let _ = old.connection.close(200, "publish failed".into()).await;
        }
    }

    /// Whether the broker has blocked this publisher's connection
    /// (`connection.blocked`: a disk or memory alarm). Publishes would wait
    /// until the alarm clears, so they are not tried.
    pub async fn blocked(&self) -> bool {
        self.live
            .lock()
            .await
            .as_ref()
            .is_some_and(|l| l.connection.status().blocked())
    }

    /// Messages ready and consumers of each queue, as the broker answers a
    /// passive declare (None: no such queue, or the broker is away).
    pub async fn queue_depths(&self, queues: &[String]) -> Vec<Option<(u32, u32)>> {
        if self.channel().await.is_err() {
            return vec![None; queues.len()];
        }
        let connection = match self.live.lock().await.as_ref() {
            Some(l) => l.connection.clone(),
            None => return vec![None; queues.len()],
        };
        queue_depths(&connection, queues).await
    }

    /// Connects if needed; used by readiness checks. A blocked connection
    /// is not ready.
    pub async fn ensure_connected(&self) -> Result<(), PublishError> {
        match tokio::time::timeout(Duration::from_secs(3), self.channel()).await {
            Ok(Ok(_)) if self.blocked().await => Err(PublishError::Blocked),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(PublishError::Broker(e.to_string())),
            Err(_) => Err(PublishError::Timeout),
        }
    }

    /// Publishes every message with confirms in flight together and returns
    /// one result per message, in order.
    pub async fn publish_all(&self, messages: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        if self.blocked().await {
            // The outbox keeps them; the relay publishes once unblocked.
            return messages
                .iter()
                .map(|_| Err(PublishError::Blocked))
                .collect();
        }
        match tokio::time::timeout(Duration::from_secs(10), self.publish_all_inner(messages)).await
        {
            Ok(Ok(results)) => {
                if results
                    .iter()
                    .any(|r| matches!(r, Err(PublishError::Broker(_))))
                {
                    self.reset().await;
                }
                results
            }
            Ok(Err(e)) => {
                self.reset().await;
                let text = e.to_string();
                messages
                    .iter()
                    .map(|_| Err(PublishError::Broker(text.clone())))
                    .collect()
            }
            Err(_) => {
                self.reset().await;
                messages
                    .iter()
                    .map(|_| Err(PublishError::Timeout))
                    .collect()
            }
        }
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, message: &Outgoing) -> Result<(), PublishError> {
        self.publish_all(std::slice::from_ref(message))
            .await
            .pop()
            .unwrap_or(Err(PublishError::Timeout))
    }

    /// Declares, once per connection, the exchanges `messages` go to and
    /// the work queues of their work routing keys.
    async fn declare_for(
        &self,
        channel: &Channel,
        declared: &Mutex<Declared>,
        messages: &[Outgoing],
    ) -> Result<(), lapin::Error> {
        let mut declared = declared.lock().await;
        for m in messages {
            if !declared.exchanges.contains(&m.exchange) {
                declare_exchange(channel, &self.names, &m.exchange).await?;
                declared.exchanges.insert(m.exchange.clone());
            }
            if m.exchange == "work" && !declared.work_queues.contains(&m.routing_key) {
                declare_work_queue(channel, &self.names, &m.routing_key).await?;
                declared.work_queues.insert(m.routing_key.clone());
            }
        }
        Ok(())
    }

    async fn publish_all_inner(
        &self,
        messages: &[Outgoing],
    ) -> Result<Vec<Result<(), PublishError>>, lapin::Error> {
        let (channel, declared) = self.channel().await?;
        self.declare_for(&channel, &declared, messages).await?;
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            let confirm = channel
                .basic_publish(
                    self.names.exchange(&m.exchange).into(),
                    m.routing_key.clone().into(),
                    BasicPublishOptions::default(),
                    &m.payload,
                    m.properties(),
                )
                .await?;
            confirms.push(confirm);
        }
        let mut results = Vec::with_capacity(confirms.len());
        for confirm in confirms {
            results.push(match confirm.await {
                Ok(Confirmation::Ack(_)) | Ok(Confirmation::NotRequested) => Ok(()),
                Ok(Confirmation::Nack(_)) => Err(PublishError::Nacked),
                Err(e) => Err(PublishError::Broker(e.to_string())),
            });
        }
        Ok(results)
    }

    /// Publishes without waiting for the broker's confirms: for
    /// notifications (events) whose loss is acceptable, so they add no
    /// round trip to the caller's path.
    pub async fn publish_unconfirmed(&self, messages: &[Outgoing]) -> Result<(), PublishError> {
        let sent = async {
            let (channel, declared) = self.channel().await?;
            self.declare_for(&channel, &declared, messages).await?;
            for m in messages {
                // Dropping the confirm future is how lapin skips the wait.
                drop(
                    channel
                        .basic_publish(
                            self.names.exchange(&m.exchange).into(),
                            m.routing_key.clone().into(),
                            BasicPublishOptions::default(),
                            &m.payload,
                            m.properties(),
                        )
                        .await?,
                );
            }
            Ok::<(), lapin::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(5), sent).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.reset().await;
                Err(PublishError::Broker(e.to_string()))
            }
            Err(_) => {
                self.reset().await;
                Err(PublishError::Timeout)
            }
        }
    }

    /// Closes the connection.
    pub async fn close(&self) {
        if let Some(old) = self.live.lock().await.take() {
            let _ = old.connection.close(200, "shutdown".into()).await;
        }
    }
}

/// Gives a delivery back to its queue (nack with requeue). A failure means
/// the channel is gone, and the broker requeues the delivery itself.
pub async fn requeue(delivery: &lapin::message::Delivery) {
    let requeue = lapin::options::BasicNackOptions {
        requeue: true,
        ..lapin::options::BasicNackOptions::default()
    };
    if let Err(error) = delivery.acker.nack(requeue).await {
        tracing::debug!(%error, "could not requeue a delivery");
    }
}

/// Sends a delivery to `<p>.dead` with the reason in the
/// `x-taskhost-reason` header, keeping its body, type and id, then acks it.
/// If that publish fails the delivery is rejected without requeue, so the
/// queue's own dead-letter exchange takes it (without the reason).
pub async fn dead_letter(publisher: &Publisher, delivery: &lapin::message::Delivery, reason: &str) {
    use lapin::options::{BasicAckOptions, BasicNackOptions};
    // The queue it came from by its exchange's logical name (`work`,
    // `submit`): a bounded label.
    let source = match delivery.exchange.as_str().rsplit('.').next() {
        Some("submit") => "submit",
        _ => "work",
    };
    metrics::counter!("taskhost_dead_letters_total", "queue" => source).increment(1);
    tracing::warn!(reason, queue = source, routing_key = %delivery.routing_key, "message dead-lettered");
    let props = &delivery.properties;
    let msg = Outgoing {
        exchange: "dead".into(),
        routing_key: delivery.routing_key.to_string(),
        message_type: props
            .kind()
            .as_ref()
            .map_or_else(|| "unknown".to_owned(), |t| t.to_string()),
        message_id: props
            .message_id()
            .as_ref()
            .map_or_else(String::new, |m| m.to_string()),
        priority: 0,
        payload: delivery.data.clone(),
        headers: vec![(crate::messages::REASON_HEADER.to_owned(), reason.to_owned())],
    };
    let settled = if publisher.publish(&msg).await.is_ok() {
        delivery.acker.ack(BasicAckOptions::default()).await
    } else {
        let reject = BasicNackOptions {
            requeue: false,
            ..BasicNackOptions::default()
        };
        delivery.acker.nack(reject).await
    };
    if let Err(error) = settled {
        // The channel is gone; the broker redelivers and the next consumer
        // refuses the message again.
        tracing::debug!(%error, "could not settle a dead-lettered delivery");
    }
}

/// Runs `connection` (one broker connection's life) again and again until
/// it returns `Ok` or `shutdown` is cancelled: after a failure it waits
/// 200 ms, doubling up to 5 s, and a connection that lived more than 30 s
/// starts the backoff over. Shared by the worker's consumer and the
/// scheduler's ingress, so both recover from a broker restart alike.
pub async fn supervise<F, Fut>(
    what: &str,
    component: &'static str,
    url: &str,
    shutdown: &tokio_util::sync::CancellationToken,
    mut connection: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), lapin::Error>>,
{
    let mut backoff = Duration::from_millis(200);
    let endpoint = crate::startup::redact(url);
    while !shutdown.is_cancelled() {
        let connected_at = std::time::Instant::now();
        match connection().await {
            Ok(()) => return,
            Err(error) => {
                if connected_at.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(200);
                }
                metrics::counter!("taskhost_broker_reconnects_total", "component" => component)
                    .increment(1);
                tracing::warn!(%error, %endpoint, retry_in_ms = backoff.as_millis() as u64, "{what} lost its broker connection; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// `(ready messages, consumers)` of each queue, read on `connection` with
/// a passive declare each (None where the queue is missing or the broker
/// did not answer within 2 s). A passive declare of a missing queue
/// closes its channel, so the reads use a channel of their own, opened
/// again after a miss.
pub async fn queue_depths(connection: &Connection, queues: &[String]) -> Vec<Option<(u32, u32)>> {
    let mut out = Vec::with_capacity(queues.len());
    let mut channel = None;
    for queue in queues {
        if channel.is_none() {
            channel = connection.create_channel().await.ok();
        }
        let Some(ch) = channel.as_ref() else {
            out.push(None);
            continue;
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match tokio::time::timeout(
            Duration::from_secs(2),
            ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()),
        )
        .await
        {
            Ok(Ok(q)) => out.push(Some((q.message_count(), q.consumer_count()))),
            _ => {
                out.push(None);
                channel = None;
            }
        }
    }
    if let Some(ch) = channel {
        let _ = ch.close(200, "done".into()).await;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::with_defaults;

    #[test]
    fn a_heartbeat_and_a_frame_size_are_asked_for_unless_the_url_names_them() {
        assert_eq!(
            with_defaults("amqp://g:g@h:5672/%2f"),
            "amqp://g:g@h:5672/%2f?heartbeat=10&frame_max=32768"
        );
        assert_eq!(
            with_defaults("amqp://h/%2f?frame_max=8192"),
            "amqp://h/%2f?frame_max=8192&heartbeat=10"
        );
        assert_eq!(
            with_defaults("amqp://h/%2f?heartbeat=30"),
            "amqp://h/%2f?heartbeat=30&frame_max=32768"
        );
    }
}
