//! The admin listener: `/stats/prometheus` (every plugin metric with Envoy's names, and the
//! proxy's own), `/ready`, `/config_dump`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::reload::Reloader;

/// The proxy's own metrics, counted on the request path.
pub(crate) struct HostMetrics {
    /// Requests received, by listener.
    pub(crate) requests: Family<ListenerLabel, Counter>,
    /// TCP connections accepted, by listener.
    pub(crate) connections: Family<ListenerLabel, Counter>,
    /// Responses sent whole, by listener and status code.
    pub(crate) responses: Family<ResponseLabels, Counter>,
    /// Streams that ended without a whole response (the client saw a reset or a closed
    /// connection), by listener and cause: with `requests`, every stream is accounted for.
    pub(crate) resets: Family<ResetLabels, Counter>,
    /// Requests whose headers did not come within the listener's `request_headers_timeout`
    /// (each also a request, and a response with code 408), by listener.
    pub(crate) header_timeouts: Family<ListenerLabel, Counter>,
    /// Plugin stream contexts alive now (each stream has one per plugin until it ends).
    pub(crate) live_contexts: Gauge,
    /// HTTP streams and TCP connections being served.
    pub(crate) in_flight: crate::drain::InFlight,
    /// VM copies alive, by whose they are (a listener's, on the workers, or a service's).
    pub(crate) vm_copies: Family<VmOwnerLabel, Gauge>,
    /// How long HTTP calls and unary gRPC calls took to be answered (or to fail), by kind,
    /// cluster and outcome.
    pub(crate) callouts: Family<CalloutLabels, Histogram, fn() -> Histogram>,
}

impl Default for HostMetrics {
    fn default() -> Self {
        HostMetrics {
            requests: Family::default(),
            connections: Family::default(),
            responses: Family::default(),
            resets: Family::default(),
            header_timeouts: Family::default(),
            live_contexts: Gauge::default(),
            in_flight: crate::drain::InFlight::default(),
            vm_copies: Family::default(),
            callouts: Family::new_with_constructor(callout_histogram),
        }
    }
}

/// Callout latency buckets: 0.5 ms to about 16 s, doubling.
fn callout_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl HostMetrics {
    /// Records a callout that took `took`.
    pub(crate) fn callout(
        &self,
        kind: &'static str,
        cluster: &str,
        answered: bool,
        took: std::time::Duration,
    ) {
        let labels = CalloutLabels {
            kind,
            cluster: cluster.to_string(),
            outcome: if answered { "answered" } else { "failed" },
        };
        self.callouts
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }
}

/// Whose a VM copy is: `listener/NAME` (a copy on a worker) or `service/NAME`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct VmOwnerLabel {
    pub(crate) owner: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CalloutLabels {
    kind: &'static str,
    cluster: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ListenerLabel {
    pub(crate) listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResponseLabels {
    pub(crate) listener: String,
    pub(crate) code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResetLabels {
    pub(crate) listener: String,
    /// `plugin` (a plugin closed the stream), `client` (the client went away or sent
    /// something unusable), `upstream` (it failed after the response had begun), `proxy`.
    pub(crate) cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabel {
    pub(crate) outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    listener: String,
    plugin: String,
    outcome: String,
}

/// The plugins' metrics, read when scraped: they are defined by the plugins as they run.
struct PluginMetrics {
    /// Where the listeners in force are.
    reloader: Arc<Reloader>,
    /// The plugin metrics left out for a name another one has, warned about once each.
    warned: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for PluginMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginMetrics").finish_non_exhaustive()
    }
}

/// Envoy's Prometheus name for a plugin's metric: its `wasmcustom.` prefix, `envoy_` in front,
/// anything but letters, digits and `_` as `_`.
fn envoy_name(name: &str) -> String {
    let mut out = String::from("envoy_wasmcustom_");
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        }
    }));
    out
}

impl Collector for PluginMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // One store for the process: every listener's plugins share it.
        encode_plugin_metrics(
            self.reloader.shared.metrics_snapshot(),
            &mut encoder,
            &self.warned,
        )?;
        let mut failures = encoder.encode_descriptor(
            "pwhost_plugin_streams",
            "streams a plugin failed or let through by its failure policy, and VM failures by cause",
            None,
            MetricType::Counter,
        )?;
        // Plugins of one name in one chain (two unnamed ones are both `plugin`) count in one
        // series, theirs added up: two samples with the same labels would be refused.
        let mut totals: Vec<(FailureLabels, u64)> = Vec::new();
        for (listener, live) in self.reloader.plugins_in_force() {
            let (_, plugins) = live.current();
            for plugin in plugins.http_filters().chain(plugins.network_filters()) {
                let name = plugins.config(plugin).display_name().to_string();
                for (outcome, value) in plugins.counters(plugin).snapshot() {
                    let labels = FailureLabels {
                        listener: listener.clone(),
                        plugin: name.clone(),
                        outcome: outcome.to_string(),
                    };
                    match totals.iter_mut().find(|(known, _)| *known == labels) {
                        Some((_, total)) => *total = total.saturating_add(value),
                        None => totals.push((labels, value)),
                    }
                }
            }
        }
        for (labels, value) in totals {
            ConstCounter::new(value).encode(failures.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Encodes the plugins' metrics under Envoy's names. Two metrics whose names Prometheus would
/// read as one (`a.b` and `a_b`, a counter `x` and a gauge `x_total`, a counter and a gauge of
/// one name) would make every scraper refuse the whole page: the first keeps the name, the
/// others are left out (with a warning, once per name).
fn encode_plugin_metrics(
    metrics: Vec<abi::Metric>,
    encoder: &mut DescriptorEncoder,
    warned: &Mutex<HashSet<String>>,
) -> Result<(), std::fmt::Error> {
    let mut taken: HashSet<String> = HashSet::new();
    for metric in metrics {
        let family = envoy_name(&metric.name);
        let family = match metric.metric_type {
            // The encoder adds `_total` to a counter's name.
            abi::MetricType::Counter => {
                family.strip_suffix("_total").unwrap_or(&family).to_string()
            }
            _ => family,
        };
        let samples: Vec<String> = match metric.metric_type {
            abi::MetricType::Counter => vec![format!("{family}_total")],
            abi::MetricType::Gauge => vec![family.clone()],
            abi::MetricType::Histogram => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|suffix| format!("{family}{suffix}"))
                .collect(),
        };
        let names: Vec<&String> = std::iter::once(&family).chain(&samples).collect();
        if names.iter().any(|name| taken.contains(*name)) {
            let mut warned = warned.lock().unwrap_or_else(PoisonError::into_inner);
            if warned.insert(metric.name.clone()) {
                tracing::warn!(
                    metric = %metric.name,
                    "a plugin metric's Prometheus name {family} is another metric's: left out"
                );
            }
            continue;
        }
        taken.extend(names.into_iter().cloned());
        match metric.metric_type {
            abi::MetricType::Counter => {
                let value = u64::try_from(metric.value).unwrap_or(0);
                let counter = ConstCounter::new(value);
                let descriptor = encoder.encode_descriptor(
                    &family,
                    "plugin counter",
                    None,
                    counter.metric_type(),
                )?;
                counter.encode(descriptor)?;
            }
            abi::MetricType::Gauge => {
                let gauge = ConstGauge::new(metric.value);
                let descriptor = encoder.encode_descriptor(
                    &family,
                    "plugin gauge",
                    None,
                    gauge.metric_type(),
                )?;
                gauge.encode(descriptor)?;
            }
            abi::MetricType::Histogram => {
                let histogram = metric.histogram.unwrap_or_default();
                let mut cumulative = 0;
                let buckets: Vec<(f64, u64)> = abi::HISTOGRAM_BUCKETS
                    .iter()
                    .zip(histogram.buckets)
                    .map(|(&bound, count)| {
                        cumulative += count;
                        let bound = if bound == u64::MAX {
                            f64::INFINITY
                        } else {
                            bound as f64
                        };
                        (bound, cumulative)
                    })
                    .collect();
                let mut descriptor = encoder.encode_descriptor(
                    &family,
                    "plugin histogram",
                    None,
                    MetricType::Histogram,
                )?;
                descriptor.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    histogram.sum as f64,
                    histogram.count,
                    &buckets,
                    None,
                )?;
            }
        }
    }
    Ok(())
}

/// The admin listener's application.
pub(crate) struct Admin {
    registry: Registry,
    reloader: Arc<Reloader>,
    /// Held by the `POST /reload` being handled.
    reload_turn: tokio::sync::Mutex<()>,
}

impl Admin {
    pub(crate) fn new(host: &HostMetrics, reloader: Arc<Reloader>) -> Admin {
        let mut registry = Registry::default();
        registry.register(
            "pwhost_requests",
            "requests received, by listener",
            host.requests.clone(),
        );
        registry.register(
            "pwhost_responses",
            "responses sent whole, by listener and status code",
            host.responses.clone(),
        );
        registry.register(
            "pwhost_resets",
            "HTTP streams ended without a whole response (reset, or the connection closed), by \
             listener and cause (plugin: a plugin closed the stream; client: the client went \
             away; upstream: the upstream failed after the response had begun; proxy: other)",
            host.resets.clone(),
        );
        registry.register(
            "pwhost_request_header_timeouts",
            "requests whose headers did not come within the listener's request_headers_timeout \
             (answered 408), by listener",
            host.header_timeouts.clone(),
        );
        registry.register(
            "pwhost_connections",
            "TCP connections accepted, by listener",
            host.connections.clone(),
        );
        registry.register(
            "pwhost_live_stream_contexts",
            "plugin stream (HTTP) and connection (TCP) contexts alive now",
            host.live_contexts.clone(),
        );
        registry.register(
            "pwhost_in_flight",
            "HTTP streams and TCP connections being served now",
            host.in_flight.gauge(),
        );
        registry.register(
            "pwhost_vm_copies",
            "VM copies alive, by owner (listener/NAME: on the workers; service/NAME)",
            host.vm_copies.clone(),
        );
        registry.register(
            "pwhost_callout_duration_seconds",
            "time from a plugin's HTTP or unary gRPC call to its answer or failure, by kind \
             (http, grpc), cluster and outcome (answered; failed: no HTTP response, or a gRPC \
             status other than OK)",
            host.callouts.clone(),
        );
        registry.register(
            "pwhost_reloads",
            "configuration reloads, by outcome (done, refused)",
            reloader.reloads.clone(),
        );
        registry.register_collector(Box::new(PluginMetrics {
            reloader: Arc::clone(&reloader),
            warned: Mutex::default(),
        }));
        Admin {
            registry,
            reloader,
            reload_turn: tokio::sync::Mutex::default(),
        }
    }

    fn prometheus(&self) -> (u16, &'static str, Vec<u8>) {
        let mut text = String::new();
        match prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            Ok(()) => (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text.into_bytes(),
            ),
            Err(_) => (500, "text/plain", b"cannot encode the metrics\n".to_vec()),
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        // The request's headers are in: their deadline stops. The next request's starts with
        // its first byte; a request whose body is not all read (the admin reads none) keeps no
        // connection, since the rest of the body would start that deadline (as in the proxy).
        let clock = session
            .digest()
            .and_then(|digest| digest.socket_digest.as_ref())
            .and_then(|socket| crate::connections::of(socket).headers);
        if let Some(clock) = clock {
            clock.headers_received();
            if session.is_body_done() {
                clock.request_ended();
            } else {
                session.set_keepalive(None);
            }
        }
        let path = session.req_header().uri.path().to_string();
        let method = &session.req_header().method;
        // Reading is GET (or HEAD); the one change is POST.
        let read = *method == http::Method::GET || *method == http::Method::HEAD;
        let post = *method == http::Method::POST;
        let (allow, allowed) = match path.as_str() {
            "/stats/prometheus" | "/ready" | "/config_dump" => ("GET, HEAD", read),
            "/reload" => ("POST", post),
            _ => ("", true),
        };
        let (status, content_type, body) = match path.as_str() {
            _ if !allowed => (
                405,
                "text/plain",
                format!("{method} is not allowed here: {allow}\n").into_bytes(),
            ),
            "/stats/prometheus" => self.prometheus(),
            "/ready" => (200, "text/plain", b"LIVE\n".to_vec()),
            "/config_dump" => (
                200,
                "application/yaml",
                self.reloader.text.load().as_bytes().to_vec(),
            ),
            "/reload" => {
                // A reload compiles plugins (and may fetch their code): off this thread, whose
                // other requests (readiness, metrics) go on meanwhile. Reloads asked here wait
                // their turn without a thread each.
                let _turn = self.reload_turn.lock().await;
                let reloader = Arc::clone(&self.reloader);
                match tokio::task::spawn_blocking(move || reloader.reload()).await {
                    Ok(Ok(())) => (200, "text/plain", b"reloaded\n".to_vec()),
                    Ok(Err(error)) => (400, "text/plain", format!("{error}\n").into_bytes()),
                    Err(_) => (
                        500,
                        "text/plain",
                        b"the reload failed unexpectedly\n".to_vec(),
                    ),
                }
            }
            _ => (404, "text/plain", b"not found\n".to_vec()),
        };
        let mut response = http::Response::builder().status(status);
        if status == 405 {
            response = response.header(http::header::ALLOW, allow);
        }
        response
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plugin metrics of a fixed list, as the admin listener encodes them.
    #[derive(Debug)]
    struct Fixed(Vec<abi::Metric>);

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            encode_plugin_metrics(self.0.clone(), &mut encoder, &Mutex::default())
        }
    }

    fn metric(name: &str, metric_type: abi::MetricType, value: i64) -> abi::Metric {
        abi::Metric {
            name: name.to_string(),
            metric_type,
            value,
            histogram: (metric_type == abi::MetricType::Histogram).then(Default::default),
        }
    }

    #[test]
    fn plugin_metrics_prometheus_would_read_as_one_are_sent_once_and_the_page_stays_valid() {
        use abi::MetricType::{Counter, Gauge, Histogram};
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed(vec![
            metric("requests.seen", Counter, 3),
            // The same Prometheus name as the first.
            metric("requests_seen", Counter, 4),
            // A gauge reading as the first counter's sample.
            metric("requests_seen_total", Gauge, 5),
            metric("latency", Histogram, 0),
            // A counter reading as the histogram's count.
            metric("latency_count", Counter, 6),
            metric("in_flight", Gauge, 7),
        ])));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoded");
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
        assert_eq!(
            types,
            [
                "# TYPE envoy_wasmcustom_requests_seen counter",
                "# TYPE envoy_wasmcustom_latency histogram",
                "# TYPE envoy_wasmcustom_in_flight gauge",
            ],
            "{text}"
        );
        // Each sample name once: the first of the colliding metrics keeps it.
        assert!(
            text.contains("envoy_wasmcustom_requests_seen_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("envoy_wasmcustom_latency_count 0\n"),
            "{text}"
        );
        assert!(text.contains("envoy_wasmcustom_in_flight 7\n"), "{text}");
        let samples: Vec<&str> = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split([' ', '{']).next())
            .filter(|name| !name.ends_with("_bucket"))
            .collect();
        let unique: HashSet<&&str> = samples.iter().collect();
        assert_eq!(unique.len(), samples.len(), "{text}");
    }
}
