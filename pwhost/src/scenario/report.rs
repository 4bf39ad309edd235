//! What a scenario run reports (the JSON of `pwhost run`).

use std::collections::BTreeMap;

use serde::Serialize;

use super::Headers;

/// What happened to one HTTP exchange.
///
/// With one plugin, what the plugin did (its `actions`, calls, filter state and error) is in
/// the exchange's own fields. With a chain of plugins, each plugin's is in `filters`, in chain
/// order, and those fields hold what concerns the whole stream (its `error`: why it failed).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct HttpReport {
    /// Request headers as forwarded upstream (empty if never forwarded).
    pub request_headers: Headers,
    /// Request body as forwarded upstream.
    pub request_body: String,
    /// Request trailers as forwarded upstream.
    pub request_trailers: Headers,
    /// Response headers as sent downstream.
    pub response_headers: Headers,
    /// Response body as sent downstream.
    pub response_body: String,
    /// Response trailers as sent downstream.
    pub response_trailers: Headers,
    /// The local reply the plugin (or a fail-closed policy) sent instead.
    pub local_response: Option<LocalResponseReport>,
    /// HTTP calls the plugin dispatched during the exchange.
    pub http_calls: Vec<HttpCallReport>,
    /// gRPC calls and streams the plugin opened during the exchange.
    pub grpc_calls: Vec<GrpcCallReport>,
    /// The action the plugin returned from each callback (the last one, for bodies).
    pub actions: BTreeMap<&'static str, &'static str>,
    /// Whether the plugin paused the stream and never continued it.
    pub stalled: bool,
    /// Whether the plugin closed the stream (`proxy_close_stream`), which resets it.
    pub reset: bool,
    /// How often the plugin cleared the stream's route cache.
    pub route_cache_clears: u32,
    /// The stream's filter state when it ended: properties the plugin set (`wasm.NAME`) and
    /// Envoy objects (`set_envoy_filter_state`), by key.
    pub filter_state: BTreeMap<String, FilterStateReport>,
    /// The error that failed the VM during this exchange, if any.
    pub error: Option<String>,
    /// What in the scenario went unused (scripted call answers no call took); absent if
    /// nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// With a chain of plugins: what each did, in chain order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<FilterReport>,
}

/// What one plugin of a chain did with an exchange or connection.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct FilterReport {
    /// The plugin's name.
    pub plugin: String,
    /// The action the plugin returned from each callback (the last one, for bodies and data).
    pub actions: BTreeMap<&'static str, &'static str>,
    /// HTTP calls the plugin dispatched.
    pub http_calls: Vec<HttpCallReport>,
    /// gRPC calls and streams the plugin opened.
    pub grpc_calls: Vec<GrpcCallReport>,
    /// The plugin's filter state when the stream ended.
    pub filter_state: BTreeMap<String, FilterStateReport>,
    /// How often the plugin cleared the stream's route cache.
    pub route_cache_clears: u32,
    /// Whether the stream went on without the plugin: its failure policy is `FAIL_OPEN` and it
    /// had failed (before or during the stream).
    pub bypassed: bool,
    /// The error that failed the plugin's VM, or why the stream did not get the plugin.
    pub error: Option<String>,
}

/// One object of a stream's or connection's filter state.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FilterStateReport {
    /// The value (UTF-8, lossily).
    pub value: String,
    /// How long it lives: `filter_chain`, `downstream_request` or `downstream_connection`.
    pub span: &'static str,
}

impl FilterStateReport {
    /// The report of a context's filter state.
    pub(super) fn of(objects: &[abi::FilterStateObject]) -> BTreeMap<String, FilterStateReport> {
        objects
            .iter()
            .map(|object| {
                (
                    super::report_text(&object.key),
                    FilterStateReport {
                        value: super::report_text(&object.value),
                        span: object.span.as_str(),
                    },
                )
            })
            .collect()
    }
}

impl HttpReport {
    pub(super) fn no_such_vm(vm: usize, count: usize) -> Self {
        HttpReport {
            error: Some(no_such_vm(vm, count)),
            ..HttpReport::default()
        }
    }
}

fn no_such_vm(vm: usize, count: usize) -> String {
    format!("the scenario names VM {vm}, but runs {count} (vms: {count})")
}

/// What happened to one TCP connection.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct TcpReport {
    /// Downstream data as forwarded upstream.
    pub upstream_received: String,
    /// Upstream data as forwarded downstream.
    pub downstream_received: String,
    /// HTTP calls the plugin dispatched during the connection.
    pub http_calls: Vec<HttpCallReport>,
    /// gRPC calls and streams the plugin opened during the connection.
    pub grpc_calls: Vec<GrpcCallReport>,
    /// The action the plugin returned from each callback (the last one, for data).
    pub actions: BTreeMap<&'static str, &'static str>,
    /// Whether data the plugin paused was never continued.
    pub stalled: bool,
    /// Whether the proxy closed the connection because a plugin failed (fail closed).
    pub closed: bool,
    /// The connection's filter state when it ended (e.g. `envoy.tcp_proxy.cluster`), by key.
    pub filter_state: BTreeMap<String, FilterStateReport>,
    /// The error that failed the VM during this connection, if any.
    pub error: Option<String>,
    /// What in the scenario went unused (scripted call answers no call took); absent if
    /// nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// With a chain of plugins: what each did, in chain order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<FilterReport>,
}

impl TcpReport {
    pub(super) fn no_such_vm(vm: usize, count: usize) -> Self {
        TcpReport {
            error: Some(no_such_vm(vm, count)),
            ..TcpReport::default()
        }
    }
}

/// A local reply.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LocalResponseReport {
    /// HTTP status.
    pub status: u32,
    /// Extra headers.
    pub headers: Headers,
    /// Body.
    pub body: String,
    /// Status code details.
    pub details: String,
    /// gRPC status, if a gRPC reply.
    pub grpc_status: Option<i32>,
    /// With a chain of plugins: the plugin that sent it (or whose failure did).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
}

/// A dispatched HTTP call.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HttpCallReport {
    /// Upstream (cluster) name.
    pub upstream: String,
    /// Request headers.
    pub headers: Headers,
    /// Request body.
    pub body: String,
    /// Request trailers.
    pub trailers: Headers,
    /// Timeout in milliseconds.
    pub timeout_ms: u64,
}

/// A gRPC call or stream the plugin opened.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GrpcCallReport {
    /// Upstream (cluster) name.
    pub upstream: String,
    /// gRPC service.
    pub service: String,
    /// gRPC method.
    pub method: String,
    /// Initial metadata.
    pub initial_metadata: Headers,
    /// The request message of a unary call (`null` for a stream).
    pub message: Option<String>,
    /// The timeout of a unary call (`null` for a stream).
    pub timeout_ms: Option<u64>,
    /// Messages the plugin sent on a stream.
    pub sent: Vec<String>,
    /// Whether the plugin cancelled it.
    pub cancelled: bool,
    /// Whether the plugin closed it.
    pub closed: bool,
}

/// A log line.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LogReport {
    /// Level name.
    pub level: &'static str,
    /// Text.
    pub message: String,
    /// The context that wrote it.
    pub context_id: u32,
    /// The worker (VM copy) that wrote it.
    pub vm: usize,
    /// The plugin whose context wrote it.
    pub plugin: String,
}

/// A metric's final value.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MetricReport {
    /// The name the plugin defined.
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    #[serde(rename = "type")]
    pub metric_type: &'static str,
    /// The value (last recorded value for histograms).
    pub value: i64,
}

/// Everything a run produced.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// The engine.
    pub runtime: String,
    /// The plugin's ABI version.
    pub abi_version: String,
    /// Whether `proxy_on_vm_start` succeeded (on every VM copy).
    pub vm_start: bool,
    /// Whether `proxy_on_configure` succeeded (on every VM copy).
    pub configure: bool,
    /// The error that failed a VM while starting, if any.
    pub start_error: Option<String>,
    /// Failures in root-context callbacks outside any exchange (ticks, foreign function calls,
    /// queue notifications).
    pub errors: Vec<String>,
    /// One report per HTTP exchange.
    pub http: Vec<HttpReport>,
    /// One report per TCP connection.
    pub tcp: Vec<TcpReport>,
    /// Log lines in order, VM by VM.
    pub logs: Vec<LogReport>,
    /// Metrics in definition order.
    pub metrics: Vec<MetricReport>,
    /// Shared data of the (first) plugin's VM id.
    pub shared_data: BTreeMap<String, String>,
    /// Shared data of every VM id the plugins use, by VM id.
    pub shared_data_by_vm_id: BTreeMap<String, BTreeMap<String, String>>,
    /// Each plugin: what it is and what its failures came to.
    pub plugins: Vec<PluginReport>,
    /// Whether every VM's root context finished at shutdown: its `proxy_on_done` returned true,
    /// or it called `proxy_done` afterwards.
    pub done: bool,
}

/// A plugin of the run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PluginReport {
    /// Its name.
    pub name: String,
    /// `http_filter`, `network_filter` or `service`.
    pub kind: &'static str,
    /// Its root id.
    pub root_id: String,
    /// Its VM id.
    pub vm_id: String,
    /// The engine it runs on.
    pub runtime: String,
    /// Where its machine code came from: `bytecode` (compiled at load), `precompiled_section`
    /// (`allow_precompiled`), `compilation_cache` or `native`.
    pub compiled_from: &'static str,
    /// Its failure policy: `fail_closed`, `fail_open` or `fail_reload`.
    pub failure_policy: &'static str,
    /// What its failures came to (see `lifecycle::Counters`).
    pub counters: BTreeMap<&'static str, u64>,
}
