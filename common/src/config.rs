//! Typed settings, layered by the `config` crate: built-in defaults, then an
//! optional TOML file, then `TASKHOST__SECTION__KEY` environment variables
//! (the bare `DATABASE_URL` and `AMQP_URL` are honoured too).
//!
//! This is the one way in for configuration: nothing else reads the
//! environment for settings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Environment variable naming the optional TOML file.
pub const CONFIG_FILE_ENV: &str = "TASKHOST_CONFIG";

/// The largest accepted `api.max_connections`.
pub const MAX_API_CONNECTIONS: usize = 1_000_000;

/// A configuration problem, reported as one line naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `config` crate could not read or deserialize a source.
    #[error("configuration error: {0}")]
    Load(#[from] config::ConfigError),
    /// A value was read but is not acceptable.
    #[error("configuration error: `{key}` {message}")]
    Invalid {
        /// The dotted key, e.g. `worker.concurrency`.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// All settings of every process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// PostgreSQL.
    pub database: DatabaseSettings,
    /// RabbitMQ.
    pub amqp: AmqpSettings,
    /// The HTTP API.
    pub api: ApiSettings,
    /// Worker nodes.
    pub worker: WorkerSettings,
    /// The scheduler.
    pub scheduler: SchedulerSettings,
    /// Pruning of old rows.
    pub retention: RetentionSettings,
    /// The change feed relay onto `<p>.events`.
    pub sync: SyncSettings,
    /// Logging.
    pub log: LogSettings,
    /// Secret environment values.
    pub secrets: SecretsSettings,
    /// Tracing across the hop, exported over OTLP (README, "Tracing").
    pub telemetry: TelemetrySettings,
    /// Webhook notifications (README, "Notifications (webhooks)").
    pub notifications: NotificationSettings,
}

/// Webhook notifications (README, "Notifications (webhooks)").
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationSettings {
    /// The HMAC-SHA256 key that signs every delivery
    /// (`X-Taskhost-Signature`). Empty (the default): webhooks cannot be
    /// created and nothing is delivered. The api and the schedulers need
    /// the same value.
    pub secret: String,
    /// Attempts of one delivery before it is marked `failed`.
    pub max_attempts: u32,
    /// Milliseconds between the scheduler's delivery passes.
    pub interval_ms: u64,
}

// The secret never appears in logs or debug output.
impl std::fmt::Debug for NotificationSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = if self.secret.is_empty() {
            "\"\""
        } else {
            "***"
        };
        f.debug_struct("NotificationSettings")
            .field("secret", &format_args!("{shown}"))
            .field("max_attempts", &self.max_attempts)
            .field("interval_ms", &self.interval_ms)
            .finish()
    }
}

/// Traces exported over OTLP/HTTP (README, "Tracing").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Base URL of an OTLP/HTTP collector, e.g. `http://127.0.0.1:4318`;
    /// spans are posted as JSON to `<endpoint>/v1/traces`. Empty (the
    /// default): no spans are made or exported and no trace context is
    /// carried. `OTEL_EXPORTER_OTLP_ENDPOINT` is honoured too.
    pub otlp_endpoint: String,
    /// The `service.name` of this process's spans. Empty (the default):
    /// `taskhost-api`, `taskhost-worker`, `taskhost-scheduler` or
    /// `taskhost-standalone`. `OTEL_SERVICE_NAME` is honoured too.
    pub service_name: String,
    /// Share of new traces recorded, 0.0 to 1.0. A trace that arrives with
    /// a `traceparent` follows its sampled flag instead.
    pub sample_ratio: f64,
}

/// Secret environment values (README, "Secrets").
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsSettings {
    /// Base64 of 32 random bytes (`head -c32 /dev/urandom | base64`): the
    /// ChaCha20-Poly1305 key that seals `secretEnv` and `secretEnvironment`
    /// values at rest. Empty (the default): requests carrying secret values
    /// are refused. The api, the scheduler (queue ingress) and the workers
    /// need the same key; a new key makes secrets sealed under the old one
    /// unreadable.
    pub key: String,
}

// The key never appears in logs or debug output.
impl std::fmt::Debug for SecretsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = if self.key.trim().is_empty() {
            "\"\""
        } else {
            "***"
        };
        f.debug_struct("SecretsSettings")
            .field("key", &format_args!("{shown}"))
            .finish()
    }
}

impl SecretsSettings {
    /// The parsed key; `None` when none is configured (or, in settings that
    /// skipped [`Settings::validate`], when it is not valid).
    pub fn key(&self) -> Option<crate::secrets::SecretKey> {
        crate::secrets::SecretKey::parse(&self.key).ok().flatten()
    }
}

/// The built-in relay that publishes the change feed as
/// `change.<table>.<action>` events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSettings {
    /// Whether the scheduler publishes the change feed onto `<p>.events`.
    pub relay_events: bool,
    /// Milliseconds between relay passes.
    pub interval_ms: u64,
    /// Changes published per pass at most.
    pub batch: u32,
}

/// How long finished work is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Days a succeeded job (and its history) is kept.
    pub success_days: u32,
    /// Days a job that did not succeed (and its history) is kept.
    pub failure_days: u32,
    /// Days a `data_change` row is kept.
    pub change_days: u32,
    /// Seconds between pruning passes.
    pub interval_secs: u64,
}

/// PostgreSQL settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Connection URL; the database name is the last path segment.
    pub url: String,
    /// Pool size of each process.
    pub max_connections: u32,
    /// How long a query waits for a pooled connection, in seconds.
    pub acquire_timeout_secs: u64,
}

/// RabbitMQ settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// Connection URL: `amqp://` in the clear, `amqps://` over TLS.
    pub url: String,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// Deliveries of one job message before it is dead-lettered.
    pub delivery_limit: u32,
    /// With `amqps://`: a PEM file of CA certificates to trust besides the
    /// built-in webpki roots (a private CA). Empty: the webpki roots alone.
    pub tls_ca_file: String,
    /// With `amqps://`: a PEM certificate (chain) this process presents to
    /// a broker that asks for client certificates. Empty: none. Needs
    /// `tls_client_key_file`.
    pub tls_client_cert_file: String,
    /// With `amqps://`: the PEM (PKCS#8, unencrypted) private key of
    /// `tls_client_cert_file`. Empty: none.
    pub tls_client_key_file: String,
}

/// HTTP API settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Address to listen on.
    pub bind: String,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Requests a second one API key may make (a token bucket); 0 turns
    /// the limit off.
    pub rate_limit_per_sec: u32,
    /// Requests one API key may make in a burst above the rate.
    pub rate_limit_burst: u32,
    /// Connections open at once at most. At the cap the api stops
    /// accepting: new connections wait in the kernel's listen backlog and
    /// are served as open ones close.
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's complete headers,
    /// counted from its accept, or on a kept-alive connection from the
    /// first byte of the next request; then it is closed.
    pub header_timeout_secs: u64,
    /// Seconds a kept-alive connection may wait for its next request, and
    /// a response may go without any progress, before it is closed.
    pub idle_timeout_secs: u64,
}

/// Worker node settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// The node's name; its id is kept per name.
    pub node_name: String,
    /// The node's group.
    pub group: String,
    /// The node's role.
    pub role: String,
    /// Slots for `pool` and `inline` jobs.
    pub concurrency: usize,
    /// Slots for `background` jobs, counted apart from `concurrency`.
    pub background_slots: usize,
    /// Deliveries the worker holds at once (AMQP prefetch); 0 means
    /// `concurrency`. At `concurrency`, jobs wait in the broker, where
    /// priorities apply, until a slot is free. Larger, a burst of short
    /// jobs fills bigger batches (more throughput), but up to
    /// `prefetch − concurrency` jobs wait in this worker instead, where a
    /// later higher-priority job cannot pass them.
    pub prefetch: usize,
    /// The shell a command is handed to, split on whitespace (`/bin/sh -c`).
    pub shell: String,
    /// Seconds between heartbeats.
    pub heartbeat_secs: u64,
    /// Seconds a claim on a running job lasts unless renewed.
    pub claim_lease_secs: u64,
    /// Largest captured stdout (and, apart, stderr) of one run, in bytes.
    pub output_cap_bytes: usize,
    /// Timeout of `pool` jobs that name none, in seconds.
    pub default_timeout_secs: u64,
    /// Seconds a SIGTERM waits for running jobs before they are killed.
    pub drain_timeout_secs: u64,
    /// The user jobs run as. Empty: `nobody` when the worker runs as root,
    /// else the worker's own user. `root` keeps root (an explicit opt-in).
    pub run_as: String,
    /// CPU seconds one job may use (RLIMIT_CPU); 0: no limit.
    pub job_cpu_secs: u64,
    /// Address space of one job's processes in MiB (RLIMIT_AS); 0: no limit.
    pub job_memory_mb: u64,
    /// Open files of one job's processes (RLIMIT_NOFILE); 0: inherit.
    pub job_max_files: u64,
    /// Processes of the job's user (RLIMIT_NPROC, counted per user, so it
    /// bounds a fork bomb; root ignores it); 0: inherit.
    pub job_max_processes: u64,
    /// Where each run gets its own working directory (emptied afterwards
    /// and kept as a spare for a later run); empty: `$TMPDIR/taskhost-jobs`.
    pub work_dir: String,
    /// Names of the worker's environment variables a job inherits,
    /// separated by spaces or commas; `NAME*` matches a prefix. Nothing
    /// else of the worker's environment reaches a job, and never a variable
    /// taskhost reads itself (`TASKHOST*` and the [`BARE_ENV`] names),
    /// whatever this lists.
    pub pass_env: String,
    /// Where `taskhost worker` serves `/livez`, `/readyz` and `/metrics`
    /// (`host:port`), or `off`. Not used by `taskhost standalone`, whose
    /// api serves the whole process's metrics.
    pub metrics_bind: String,
}

/// The variables without the `TASKHOST` prefix that settings are read
/// from: (bare name, the specific one that wins over it, the setting).
pub const BARE_ENV: [(&str, &str, &str); 4] = [
    ("DATABASE_URL", "TASKHOST__DATABASE__URL", "database.url"),
    ("AMQP_URL", "TASKHOST__AMQP__URL", "amqp.url"),
    (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "TASKHOST__TELEMETRY__OTLP_ENDPOINT",
        "telemetry.otlp_endpoint",
    ),
    (
        "OTEL_SERVICE_NAME",
        "TASKHOST__TELEMETRY__SERVICE_NAME",
        "telemetry.service_name",
    ),
];

/// What a job inherits of the worker's environment by default
/// (`worker.pass_env`): where to find programs, the locale and the zone.
pub const DEFAULT_PASS_ENV: &str = "PATH LANG LANGUAGE LC_* TZ";

/// Scheduler settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSettings {
    /// Milliseconds between passes of the outbox relay.
    pub relay_interval_ms: u64,
    /// Age in milliseconds an outbox row must reach before the relay takes
    /// it, so the api's own fast-path publish goes first.
    pub relay_grace_ms: u64,
    /// Seconds between passes of the reaper (dead nodes, expired claims).
    pub reaper_interval_secs: u64,
    /// Missed heartbeats after which a node is marked dead.
    pub dead_after_missed_heartbeats: u32,
    /// Longest sleep of the scheduler's tick loop, in milliseconds. The
    /// loop sleeps until the earliest due fire time of an enabled task and
    /// wakes at once when a task is written (NOTIFY `taskhost_tasks`); this
    /// bounds the sleep as a safety net (a lost notification, a held task).
    pub tick_ms: u64,
    /// A fire time older than this many seconds counts as missed (misfire).
    pub misfire_grace_secs: u64,
    /// Where `taskhost scheduler` serves `/livez`, `/readyz` and `/metrics`
    /// (`host:port`), or `off`. Not used by `taskhost standalone`.
    pub metrics_bind: String,
}

/// Log output settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `auto` (human on a terminal, JSON otherwise), `json` or `human`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `taskhost_worker=debug,info`.
    pub level: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human on a terminal, JSON otherwise.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Human,
}

impl Settings {
    /// Loads settings from the process environment and the file named by
    /// `file` or, failing that, by `TASKHOST_CONFIG`.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::load_from(file, &env)
    }

    /// Loads settings from an explicit environment map (tests use this).
    pub fn load_from(
        file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let file: Option<PathBuf> = file
            .map(Path::to_path_buf)
            .or_else(|| env.get(CONFIG_FILE_ENV).map(PathBuf::from));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut builder = config::Config::builder()
            .set_default(
                "database.url",
                "postgres://postgres@127.0.0.1:5432/taskhost",
            )?
            .set_default("database.max_connections", 10)?
            .set_default("database.acquire_timeout_secs", 5)?
            .set_default("amqp.url", "amqp://guest:guest@127.0.0.1:5672/%2f")?
            .set_default("amqp.prefix", "taskhost")?
            .set_default("amqp.delivery_limit", 5)?
            .set_default("amqp.tls_ca_file", "")?
            .set_default("amqp.tls_client_cert_file", "")?
            .set_default("amqp.tls_client_key_file", "")?
            .set_default("api.bind", "127.0.0.1:8080")?
            .set_default("api.max_body_bytes", 256 * 1024)?
            .set_default("api.rate_limit_per_sec", 1000)?
            .set_default("api.rate_limit_burst", 2000)?
            .set_default("api.max_connections", 1024)?
            .set_default("api.header_timeout_secs", 10)?
            .set_default("api.idle_timeout_secs", 60)?
            .set_default("worker.node_name", crate::hostname())?
            .set_default("worker.group", "default")?
            .set_default("worker.role", "worker")?
            .set_default("worker.concurrency", cpus as u64)?
            .set_default("worker.background_slots", 4)?
            .set_default("worker.prefetch", 0)?
            .set_default("worker.shell", "/bin/sh -c")?
            .set_default("worker.heartbeat_secs", 5)?
            .set_default("worker.claim_lease_secs", 30)?
            .set_default("worker.output_cap_bytes", 1024 * 1024)?
            .set_default("worker.default_timeout_secs", 3600)?
            .set_default("worker.drain_timeout_secs", 30)?
            .set_default("worker.run_as", "")?
            .set_default("worker.job_cpu_secs", 0)?
            .set_default("worker.job_memory_mb", 0)?
            .set_default("worker.job_max_files", 4096)?
            .set_default("worker.job_max_processes", 4096)?
            .set_default("worker.work_dir", "")?
            .set_default("worker.pass_env", DEFAULT_PASS_ENV)?
            .set_default("worker.metrics_bind", "0.0.0.0:9464")?
            .set_default("scheduler.relay_interval_ms", 500)?
            .set_default("scheduler.relay_grace_ms", 2000)?
            .set_default("scheduler.reaper_interval_secs", 5)?
            .set_default("scheduler.dead_after_missed_heartbeats", 3)?
            .set_default("scheduler.tick_ms", 1000)?
            .set_default("scheduler.misfire_grace_secs", 60)?
            .set_default("scheduler.metrics_bind", "0.0.0.0:9465")?
            .set_default("retention.success_days", 7)?
            .set_default("retention.failure_days", 30)?
            .set_default("retention.change_days", 30)?
            .set_default("retention.interval_secs", 3600)?
            .set_default("sync.relay_events", true)?
            .set_default("sync.interval_ms", 250)?
            .set_default("sync.batch", 500)?
            .set_default("log.format", "auto")?
            .set_default("log.level", "info,sqlx=warn,lapin=warn")?
            .set_default("secrets.key", "")?
            .set_default("telemetry.otlp_endpoint", "")?
            .set_default("telemetry.service_name", "")?
            .set_default("telemetry.sample_ratio", 1.0)?
            .set_default("notifications.secret", "")?
            .set_default("notifications.max_attempts", 12)?
            .set_default("notifications.interval_ms", 1000)?;
        if let Some(path) = &file {
            builder = builder.add_source(config::File::from(path.as_path()).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("TASKHOST")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(
                    env.iter()
                        .filter(|(k, _)| k.starts_with("TASKHOST__"))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                )),
        );
        // The bare names are honoured unless the specific one is set too.
        for (bare, specific, key) in BARE_ENV {
            if !env.contains_key(specific) {
                builder = builder.set_override_option(key, env.get(bare).cloned())?;
            }
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values the types alone do not; call again after overriding fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        if !self.database.url.starts_with("postgres://")
            && !self.database.url.starts_with("postgresql://")
        {
            return Err(invalid(
                "database.url",
                "must start with postgres:// or postgresql://",
            ));
        }
        if !self.amqp.url.starts_with("amqp://") && !self.amqp.url.starts_with("amqps://") {
            return Err(invalid("amqp.url", "must start with amqp:// or amqps://"));
        }
        self.amqp.validate_tls()?;
        if !crate::model::is_valid_name(&self.amqp.prefix) {
            return Err(invalid(
                "amqp.prefix",
                "must match ^[a-z0-9][a-z0-9_-]{0,63}$",
            ));
        }
        if self.api.bind.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "api.bind",
                format!(
                    "`{}` is not an address such as 127.0.0.1:8080",
                    self.api.bind
                ),
            ));
        }
        for (key, value) in [
            ("worker.group", &self.worker.group),
            ("worker.role", &self.worker.role),
        ] {
            if !crate::model::is_valid_name(value) {
                return Err(invalid(
                    key,
                    format!("`{value}` must match ^[a-z0-9][a-z0-9_-]{{0,63}}$"),
                ));
            }
        }
        if self.worker.node_name.trim().is_empty() {
            return Err(invalid("worker.node_name", "must not be empty"));
        }
        for (key, value) in [
            ("worker.concurrency", self.worker.concurrency as u64),
            (
                "worker.background_slots",
                self.worker.background_slots as u64,
            ),
            ("worker.heartbeat_secs", self.worker.heartbeat_secs),
            ("worker.claim_lease_secs", self.worker.claim_lease_secs),
            (
                "database.max_connections",
                u64::from(self.database.max_connections),
            ),
            ("amqp.delivery_limit", u64::from(self.amqp.delivery_limit)),
            ("scheduler.tick_ms", self.scheduler.tick_ms),
            (
                "retention.success_days",
                u64::from(self.retention.success_days),
            ),
            (
                "retention.failure_days",
                u64::from(self.retention.failure_days),
            ),
            (
                "retention.change_days",
                u64::from(self.retention.change_days),
            ),
            ("retention.interval_secs", self.retention.interval_secs),
            ("sync.interval_ms", self.sync.interval_ms),
            ("sync.batch", u64::from(self.sync.batch)),
            ("api.max_connections", self.api.max_connections as u64),
            ("api.header_timeout_secs", self.api.header_timeout_secs),
            ("api.idle_timeout_secs", self.api.idle_timeout_secs),
            (
                "notifications.max_attempts",
                u64::from(self.notifications.max_attempts),
            ),
            ("notifications.interval_ms", self.notifications.interval_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.api.max_connections > MAX_API_CONNECTIONS {
            return Err(invalid(
                "api.max_connections",
                format!("must be at most {MAX_API_CONNECTIONS}"),
            ));
        }
        if self.worker.shell.split_whitespace().next().is_none() {
            return Err(invalid(
                "worker.shell",
                "must name a program, e.g. `/bin/sh -c`",
            ));
        }
        if let Err(message) = crate::secrets::SecretKey::parse(&self.secrets.key) {
            return Err(invalid(
                "secrets.key",
                format!(
                    "{message} (TASKHOST__SECRETS__KEY); make one with \
                     `head -c32 /dev/urandom | base64`"
                ),
            ));
        }
        self.telemetry.validate()?;
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a tracing filter", self.log.level),
            ));
        }
        Ok(())
    }
}

impl AmqpSettings {
    /// The TLS files make sense only together with `amqps://`, and a client
    /// certificate only with its key.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let tls = [
            ("amqp.tls_ca_file", &self.tls_ca_file),
            ("amqp.tls_client_cert_file", &self.tls_client_cert_file),
            ("amqp.tls_client_key_file", &self.tls_client_key_file),
        ];
        if !self.url.starts_with("amqps://")
            && let Some((key, _)) = tls.iter().find(|(_, v)| !v.is_empty())
        {
            return Err(ConfigError::Invalid {
                key,
                message: "is set but amqp.url does not start with amqps:// (TLS); use amqps://"
                    .into(),
            });
        }
        if self.tls_client_cert_file.is_empty() != self.tls_client_key_file.is_empty() {
            return Err(ConfigError::Invalid {
                key: "amqp.tls_client_key_file",
                message: "and amqp.tls_client_cert_file must be set together".into(),
            });
        }
        Ok(())
    }
}

impl TelemetrySettings {
    /// Whether spans are made and exported.
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.trim().is_empty()
    }

    /// Where spans are posted: the endpoint with `/v1/traces` appended
    /// (unless it already ends so), as for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn traces_url(&self) -> String {
        let base = self.otlp_endpoint.trim();
        if base.ends_with("/v1/traces") {
            base.to_owned()
        } else {
            format!("{}/v1/traces", base.trim_end_matches('/'))
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let endpoint = self.otlp_endpoint.trim();
        let url = endpoint.starts_with("http://") || endpoint.starts_with("https://");
        if !endpoint.is_empty() && !url {
            return Err(ConfigError::Invalid {
                key: "telemetry.otlp_endpoint",
                message: format!(
                    "`{}` must be an http:// or https:// URL of an OTLP/HTTP collector, \
                     e.g. http://127.0.0.1:4318 (or empty: no tracing)",
                    crate::startup::redact(endpoint)
                ),
            });
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(ConfigError::Invalid {
                key: "telemetry.sample_ratio",
                message: format!("{} must be from 0.0 to 1.0", self.sample_ratio),
            });
        }
        Ok(())
    }
}

impl WorkerSettings {
    /// The shell program and its leading arguments, e.g. `["/bin/sh", "-c"]`.
    pub fn shell_argv(&self) -> Vec<String> {
        self.shell.split_whitespace().map(str::to_owned).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::load_from(None, &env)
    }

    #[test]
    fn notifications_defaults_env_and_a_secret_kept_out_of_debug() {
        let s = load(&[]).expect("defaults");
        assert_eq!(s.notifications.secret, "");
        assert_eq!(s.notifications.max_attempts, 12);
        assert_eq!(s.notifications.interval_ms, 1000);
        let s = load(&[
            ("TASKHOST__NOTIFICATIONS__SECRET", "hush-hush-42"),
            ("TASKHOST__NOTIFICATIONS__MAX_ATTEMPTS", "3"),
        ])
        .expect("notifications env");
        assert_eq!(s.notifications.secret, "hush-hush-42");
        assert_eq!(s.notifications.max_attempts, 3);
        let shown = format!("{s:?}");
        assert!(!shown.contains("hush-hush-42"), "{shown}");
        assert!(shown.contains("NotificationSettings"), "{shown}");
        let err = load(&[("TASKHOST__NOTIFICATIONS__MAX_ATTEMPTS", "0")]).expect_err("0 attempts");
        assert!(
            err.to_string().contains("notifications.max_attempts"),
            "{err}"
        );
    }

    #[test]
    fn amqp_tls_files_default_to_empty() {
        let s = load(&[]).expect("defaults");
        assert_eq!(s.amqp.tls_ca_file, "");
        assert_eq!(s.amqp.tls_client_cert_file, "");
        assert_eq!(s.amqp.tls_client_key_file, "");
    }

    #[test]
    fn amqp_tls_files_need_amqps() {
        let err = load(&[("TASKHOST__AMQP__TLS_CA_FILE", "/etc/ca.pem")])
            .expect_err("a CA file with amqp:// is refused");
        assert!(
            err.to_string().contains("`amqp.tls_ca_file`") && err.to_string().contains("amqps://"),
            "{err}"
        );
        let s = load(&[
            ("TASKHOST__AMQP__URL", "amqps://u:p@mq.example:5671/%2f"),
            ("TASKHOST__AMQP__TLS_CA_FILE", "/etc/ca.pem"),
        ])
        .expect("amqps with a CA file");
        assert_eq!(s.amqp.tls_ca_file, "/etc/ca.pem");
    }

    #[test]
    fn telemetry_is_off_by_default_and_takes_the_otel_endpoint() {
        let s = load(&[]).expect("defaults");
        assert!(!s.telemetry.enabled());
        assert_eq!(s.telemetry.sample_ratio, 1.0);
        let s = load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318/")]).expect("otel env");
        assert!(s.telemetry.enabled());
        assert_eq!(s.telemetry.traces_url(), "http://otel:4318/v1/traces");
        let s = load(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318"),
            (
                "TASKHOST__TELEMETRY__OTLP_ENDPOINT",
                "https://c.example/v1/traces",
            ),
        ])
        .expect("both");
        assert_eq!(s.telemetry.traces_url(), "https://c.example/v1/traces");
        let err =
            load(&[("TASKHOST__TELEMETRY__OTLP_ENDPOINT", "otel:4318")]).expect_err("no scheme");
        assert!(err.to_string().contains("telemetry.otlp_endpoint"), "{err}");
        let err = load(&[("TASKHOST__TELEMETRY__SAMPLE_RATIO", "1.5")]).expect_err("ratio");
        assert!(err.to_string().contains("telemetry.sample_ratio"), "{err}");
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let err = load(&[
            ("TASKHOST__AMQP__URL", "amqps://u:p@mq.example:5671/%2f"),
            ("TASKHOST__AMQP__TLS_CLIENT_CERT_FILE", "/etc/me.pem"),
        ])
        .expect_err("a certificate without a key is refused");
        assert!(err.to_string().contains("tls_client_key_file"), "{err}");
    }
}
