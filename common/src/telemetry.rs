//! Structured logs with `tracing`: human on a terminal, JSON otherwise or
//! when asked; and, when `telemetry.otlp_endpoint` is set, traces exported
//! over OTLP/HTTP (README, "Tracing").
//!
//! A trace follows a job across the hop: the api's `job.submit` span (a
//! child of the request's `traceparent`, if any) is the parent of a
//! `publish` span, whose W3C `traceparent` is stored on the outbox row
//! (written by the same INSERT) and sent as an AMQP header of the work
//! message; the worker's `job.run` span is its child. With no endpoint
//! configured, [`enabled`] is false and the callers make no span, read no
//! header and write no `traceparent` (one relaxed atomic load per job).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings, TelemetrySettings};

/// The W3C trace context header, in HTTP requests and AMQP messages.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C vendor trace state header (HTTP requests, ingress messages).
pub const TRACESTATE: &str = "tracestate";

/// Whether this process exports spans (set once by [`init_traced`]).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are made and exported. False unless
/// `telemetry.otlp_endpoint` is set: then no span is made and no trace
/// context is read or written.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Installs the global subscriber; a second call is a no-op.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json_logs(settings) {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
}

fn json_logs(settings: &LogSettings) -> bool {
    match settings.format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    }
}

/// The trace exporter of a process; [`Tracing::shutdown`] exports what is
/// still buffered. Without an endpoint it holds nothing.
#[must_use = "call shutdown() at exit, or spans still buffered are lost"]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// Exports the spans still buffered and stops the exporter (waits for
    /// the collector's answer, bounded by the exporter's timeout).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        ENABLED.store(false, Ordering::Relaxed);
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "could not export the last spans");
        }
    }
}

/// Installs the global subscriber: the logs of [`init`] and, when
/// `telemetry.otlp_endpoint` is set, an OpenTelemetry layer whose spans a
/// batch processor exports over OTLP/HTTP (JSON) from its own thread.
/// `component` is the default `service.name` (`taskhost-api`, ...). Fails
/// only when the exporter cannot be built (an endpoint that is not a URL).
pub fn init_traced(
    log: &LogSettings,
    telemetry: &TelemetrySettings,
    component: &str,
) -> Result<Tracing, String> {
    if !telemetry.enabled() {
        init(log);
        return Ok(Tracing { provider: None });
    }
    let url = telemetry.traces_url();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(url.clone())
        .build()
        .map_err(|e| {
            format!(
                "telemetry.otlp_endpoint {}: cannot export traces there: {e}",
                crate::startup::redact(&url)
            )
        })?;
    let service = if telemetry.service_name.trim().is_empty() {
        component.to_owned()
    } else {
        telemetry.service_name.trim().to_owned()
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            telemetry.sample_ratio,
        ))))
        .with_resource(resource)
        .build();
    let installed = subscriber(log, &provider).try_init();
    if installed.is_err() {
        // A subscriber was installed before (tests): this one's spans
        // would go nowhere.
        let _ = provider.shutdown();
        return Ok(Tracing { provider: None });
    }
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(endpoint = %crate::startup::redact(&url), service = %service, sample_ratio = telemetry.sample_ratio, "exporting traces over OTLP");
    Ok(Tracing {
        provider: Some(provider),
    })
}

/// The logs of [`init`] and the OpenTelemetry layer of `provider`, each
/// with its own filter: the logs keep `log.level`, and only taskhost's own
/// spans are exported (not its dependencies', and no log events).
fn subscriber(
    log: &LogSettings,
    provider: &SdkTracerProvider,
) -> impl tracing::Subscriber + Send + Sync + 'static {
    // The filter is asked for every taskhost span (`sometimes`), never
    // cached as `always`: with an `always` interest on both layers the
    // span macros skip `enabled`, and tracing-subscriber 0.3 then decides
    // the per-layer filters from stale state, so some spans never reached
    // this layer (they had no trace context).
    let ours =
        |meta: &tracing::Metadata<'_>| meta.is_span() && meta.target().starts_with("taskhost");
    let filter = tracing_subscriber::filter::dynamic_filter_fn(move |meta, _| ours(meta))
        .with_callsite_filter(move |meta| {
            if ours(meta) {
                tracing::subscriber::Interest::sometimes()
            } else {
                tracing::subscriber::Interest::never()
            }
        });
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("taskhost"))
        .with_filter(filter);
    let filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json_logs(log) {
        fmt.json()
            .flatten_event(true)
            .with_current_span(true)
            .with_filter(filter)
            .boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    tracing_subscriber::registry().with(fmt).with(otel)
}

/// The W3C context of an incoming request or message.
struct Carrier<'a> {
    traceparent: &'a str,
    tracestate: Option<&'a str>,
}

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(self.traceparent),
            TRACESTATE => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// Makes `span` a child of the W3C `traceparent` (with its `tracestate`)
/// that came with a request or message. Without one, or with one that does
/// not parse, `span` starts a new trace (or stays in its current one).
/// Call it before the span is entered.
pub fn set_parent(span: &Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if !enabled() || span.is_disabled() {
        return;
    }
    let Some(traceparent) = traceparent.map(str::trim).filter(|t| !t.is_empty()) else {
        return;
    };
    let cx = TraceContextPropagator::new().extract(&Carrier {
        traceparent,
        tracestate,
    });
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The W3C `traceparent` of `span` (`00-<trace id>-<span id>-<flags>`),
/// to carry to the next hop; None when tracing is off.
pub fn traceparent(span: &Span) -> Option<String> {
    if !enabled() || span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let otel = cx.span();
    let sc = otel.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The `traceparent` of the current span (see [`traceparent`]); None when
/// tracing is off or no span is current.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    traceparent(&Span::current())
}

/// A producer span for publishing the work message of `job_id` to the
/// exchange `destination` (its full name) under `routing_key`, named
/// `publish <destination>` after the OpenTelemetry messaging conventions.
/// A disabled span when tracing is off.
pub fn publish_span(destination: &str, routing_key: &str, job_id: uuid::Uuid) -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(
        "publish",
        otel.name = format!("publish {destination}"),
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        "messaging.operation.type" = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = %destination,
        messaging.rabbitmq.destination.routing_key = %routing_key,
        messaging.message.id = %job_id,
        job.id = %job_id,
        taskhost.outbox.relay = tracing::field::Empty,
    )
}

/// A string AMQP header of a delivery (`traceparent`, `tracestate`).
pub fn amqp_header<'a>(properties: &'a lapin::BasicProperties, name: &str) -> Option<&'a str> {
    use lapin::types::AMQPValue;
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::Carrier;
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    #[test]
    fn a_w3c_traceparent_parses_and_a_bad_one_does_not() {
        let good = Carrier {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            tracestate: Some("vendor=1"),
        };
        let cx = TraceContextPropagator::new().extract(&good);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.trace_state().get("vendor"), Some("1"));
        for bad in [
            "",
            "00-xyz",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let cx = TraceContextPropagator::new().extract(&Carrier {
                traceparent: bad,
                tracestate: None,
            });
            assert!(!cx.span().span_context().is_valid(), "{bad}");
        }
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;
    use tracing::Instrument;

    #[test]
    fn a_child_span_is_in_its_parents_trace() {
        let provider = SdkTracerProvider::builder().build();
        let log = LogSettings {
            format: LogFormat::Json,
            level: "info".into(),
        };
        ENABLED.store(true, Ordering::Relaxed);
        let _d = tracing::subscriber::set_default(subscriber(&log, &provider));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let parent = tracing::info_span!("parent");
            set_parent(
                &parent,
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                None,
            );
            async {
                tokio::task::yield_now().await;
                let child = publish_span("x.work", "any", uuid::Uuid::nil());
                let tp = traceparent(&child).expect("traceparent");
                assert!(
                    tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                    "{tp}"
                );
            }
            .instrument(parent)
            .await;
        });
    }
}
