//! Scenarios: scripted traffic for a plugin, and the report of what the plugin did with it.
//!
//! A scenario is JSON or YAML:
//!
//! ```yaml
//! vms: 1                  # VM copies of the plugin sharing shared data and queues
//! properties: [{path: [source, address], value: "10.0.0.1:1234"}]
//! ticks: 0                # timer ticks after configuration (if the plugin set a period)
//! http:
//!   - request_headers: [[":method", "GET"], [":path", "/"]]
//!     request_body: ["first chunk", "last chunk"]
//!     response_headers: [[":status", "200"]]
//!     http_call_responses: [{headers: [[":status", "200"]], body: "ok"}]
//!     grpc_call_responses: [{messages: ["reply"], status: 0}]
//!     vm: 0                # which VM copy handles it
//! tcp:
//!   - downstream: ["hello"]
//!     upstream: ["world"]
//! ```
//!
//! Each HTTP exchange runs through the plugin as a proxy would run it: request headers, body
//! chunks (the last one carries end-of-stream), trailers, then the same for the response, then
//! `on_log`, `on_done` and `on_delete`. A stream the plugin pauses resumes only when the plugin
//! continues it (typically from a callout response, which the runner answers from
//! `http_call_responses`/`grpc_call_responses` in order, or with the spec's failure callback when
//! none is left); otherwise it is reported as stalled. TCP connections run likewise: new
//! connection, downstream data, upstream data, both closes.

mod callouts;
mod http;
mod report;
mod tcp;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use abi::{InMemoryHost, Plugin, SharedState, Vm, VmError};
use serde::{Deserialize, Serialize};

pub use report::{
    FilterStateReport, GrpcCallReport, HttpCallReport, HttpReport, LocalResponseReport, LogReport,
    MetricReport, Report, TcpReport,
};

/// A header list as `[name, value]` pairs.
pub type Headers = Vec<(String, String)>;

/// Scripted traffic for one plugin.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// How many VM copies of the plugin to run (default 1); they share shared data and queues.
    #[serde(default = "one")]
    pub vms: usize,
    /// HTTP exchanges, run one after the other.
    #[serde(default)]
    pub http: Vec<HttpExchange>,
    /// TCP connections, run after the HTTP exchanges.
    #[serde(default)]
    pub tcp: Vec<TcpConnection>,
    /// Properties the host answers `proxy_get_property` with, before Envoy's attributes.
    #[serde(default)]
    pub properties: Vec<PropertyValue>,
    /// The proxy's identity, for `xds.node` (default: id `pwhost`, no metadata).
    #[serde(default)]
    pub node: Option<NodeConfig>,
    /// How many timer ticks to deliver after configuration (only while the plugin has a tick
    /// period set).
    #[serde(default)]
    pub ticks: u32,
    /// How many timer ticks to deliver at shutdown while a root context whose `proxy_on_done`
    /// returned false still owes `proxy_done`.
    #[serde(default)]
    pub shutdown_ticks: u32,
    /// Calls of the plugin's `proxy_on_foreign_function`, made after configuration.
    #[serde(default)]
    pub foreign_function_calls: Vec<ForeignFunctionCall>,
}

/// The host calling a function of the plugin (`proxy_on_foreign_function`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForeignFunctionCall {
    /// The function's id.
    pub function_id: u32,
    /// Its arguments, readable as the `CallData` buffer.
    #[serde(default)]
    pub arguments: String,
}

fn one() -> usize {
    1
}

/// One HTTP exchange.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpExchange {
    /// Which VM copy handles it (default 0).
    #[serde(default)]
    pub vm: usize,
    /// Request headers; default `GET /` to `localhost`.
    #[serde(default)]
    pub request_headers: Option<Headers>,
    /// Request body chunks.
    #[serde(default)]
    pub request_body: Vec<String>,
    /// Request trailers.
    #[serde(default)]
    pub request_trailers: Headers,
    /// Response headers from upstream; default `:status 200`.
    #[serde(default)]
    pub response_headers: Option<Headers>,
    /// Response body chunks.
    #[serde(default)]
    pub response_body: Vec<String>,
    /// Response trailers.
    #[serde(default)]
    pub response_trailers: Headers,
    /// Answers to the HTTP calls the plugin dispatches during this exchange, in order.
    #[serde(default)]
    pub http_call_responses: Vec<CallResponse>,
    /// Answers to the gRPC calls and streams the plugin opens during this exchange, in order.
    #[serde(default)]
    pub grpc_call_responses: Vec<GrpcResponse>,
    /// Timer ticks delivered to the exchange's VM after it ends, while its root context has a
    /// tick period (one the plugin may have set during the exchange).
    #[serde(default)]
    pub ticks_after: u32,
}

/// One TCP connection.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConnection {
    /// Which VM copy handles it (default 0).
    #[serde(default)]
    pub vm: usize,
    /// Data chunks from downstream; the last one ends the direction.
    #[serde(default)]
    pub downstream: Vec<String>,
    /// Data chunks from upstream; the last one ends the direction.
    #[serde(default)]
    pub upstream: Vec<String>,
    /// Answers to HTTP calls dispatched during the connection.
    #[serde(default)]
    pub http_call_responses: Vec<CallResponse>,
    /// Answers to gRPC calls dispatched during the connection.
    #[serde(default)]
    pub grpc_call_responses: Vec<GrpcResponse>,
    /// Timer ticks delivered to the connection's VM after it ends, while its root context has a
    /// tick period.
    #[serde(default)]
    pub ticks_after: u32,
}

/// The answer to one HTTP call.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallResponse {
    /// Response headers (include `:status`).
    #[serde(default)]
    pub headers: Headers,
    /// Response body.
    #[serde(default)]
    pub body: String,
    /// Response trailers.
    #[serde(default)]
    pub trailers: Headers,
}

/// The answer to one gRPC call or stream. A stream gets the initial metadata, messages,
/// trailing metadata, then the closing status. A unary call gets its messages as one reply
/// when `status` is 0, and only the closing status otherwise.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcResponse {
    /// Initial metadata (delivered only if not empty).
    #[serde(default)]
    pub initial_metadata: Headers,
    /// Messages, in order.
    #[serde(default)]
    pub messages: Vec<String>,
    /// Trailing metadata (delivered only if not empty).
    #[serde(default)]
    pub trailing_metadata: Headers,
    /// The gRPC status code (0 = OK).
    #[serde(default)]
    pub status: u32,
    /// The status message.
    #[serde(default)]
    pub message: String,
}

/// A property the host answers as given, before Envoy's attributes (so a scenario can set or
/// override any attribute).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyValue {
    /// Path segments, e.g. `["request", "path"]`.
    pub path: Vec<String>,
    /// The value, handed to the plugin encoded as Envoy encodes values of its type.
    pub value: Data,
}

/// A typed value in a scenario: a string, integer (8 little-endian bytes), double, boolean (one
/// byte), list or map (header pairs), as the plugin receives such values from Envoy.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Data {
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A double.
    Double(f64),
    /// A string.
    String(String),
    /// A list.
    List(Vec<Data>),
    /// A map.
    Map(BTreeMap<String, Data>),
}

impl Data {
    /// The value as the ABI's.
    pub fn to_value(&self) -> abi::Value<'static> {
        match self {
            Data::Bool(b) => abi::Value::Bool(*b),
            Data::Int(i) => abi::Value::Int(*i),
            Data::Double(d) => abi::Value::Double(*d),
            Data::String(s) => abi::Value::string(s.clone()),
            Data::List(items) => abi::Value::List(items.iter().map(Data::to_value).collect()),
            Data::Map(entries) => abi::Value::Map(
                entries
                    .iter()
                    .map(|(k, v)| (Cow::Owned(k.clone().into_bytes()), v.to_value()))
                    .collect(),
            ),
        }
    }
}

/// The proxy's identity (`xds.node`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// `xds.node.id`.
    #[serde(default)]
    pub id: String,
    /// `xds.node.cluster`.
    #[serde(default)]
    pub cluster: String,
    /// `xds.node.metadata`.
    #[serde(default)]
    pub metadata: BTreeMap<String, Data>,
}

impl Scenario {
    /// Parses a scenario from JSON or YAML text (YAML is a superset of JSON).
    pub fn parse(text: &str) -> Result<Scenario, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }

    /// The scenario used when none is given: one `GET /`.
    pub fn single_get() -> Scenario {
        Scenario {
            vms: 1,
            http: vec![HttpExchange::default()],
            ..Scenario::default()
        }
    }
}

/// What the host does when the VM fails (a trap) while a stream is in the plugin's hands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Answer the stream with a local 503 reply (never leave it hanging).
    #[default]
    FailClosed,
    /// Forward the stream as if the plugin were not there.
    FailOpen,
}

/// The foreign functions `pwhost run` offers plugins (`proxy_call_foreign_function`).
///
/// * `reverse`: the argument bytes reversed.
/// * `echo`: the argument bytes unchanged.
/// * `uppercase`: the argument with ASCII letters upper-cased.
pub fn register_builtin_foreign_functions(shared: &SharedState) {
    shared.register_foreign_function(
        "reverse",
        Arc::new(|_, args: &[u8]| Ok(args.iter().rev().copied().collect())),
    );
    shared.register_foreign_function("echo", Arc::new(|_, args: &[u8]| Ok(args.to_vec())));
    shared.register_foreign_function(
        "uppercase",
        Arc::new(|_, args: &[u8]| Ok(args.to_ascii_uppercase())),
    );
}

/// The addresses a scenario's connections come from and go to, as Envoy's stream info would
/// have them (a scenario's `properties` override any attribute).
const SOURCE_ADDRESS: &str = "127.0.0.1:50000";
const DESTINATION_ADDRESS: &str = "127.0.0.1:10000";
const UPSTREAM_ADDRESS: &str = "127.0.0.1:8080";

/// What a proxy knows of a new downstream connection `connection_id`.
fn connection_info(connection_id: u64, start_time: std::time::SystemTime) -> abi::StreamInfo {
    abi::StreamInfo {
        source_address: Some(SOURCE_ADDRESS.into()),
        destination_address: Some(DESTINATION_ADDRESS.into()),
        connection_id: Some(connection_id),
        mtls: Some(false),
        requested_server_name: Some(String::new()),
        start_time: Some(start_time),
        bytes_received: Some(0),
        bytes_sent: Some(0),
        ..abi::StreamInfo::default()
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub(crate) fn in_memory_host(vm: &mut Vm) -> &mut InMemoryHost {
    vm.host_as::<InMemoryHost>()
        .expect("scenario VMs run on an InMemoryHost")
}

/// Delivers pending queue notifications on every VM.
fn dispatch_queues(vms: &mut [Vm], errors: &mut Vec<String>) {
    for vm in vms.iter_mut().filter(|vm| !vm.is_failed()) {
        if let Err(error) = vm.dispatch_queue_ready() {
            errors.push(error.to_string());
        }
    }
}

/// Answers the calls a root context made (with the failure callback: nothing scripts them);
/// the error if it kept making them.
fn answer_root_calls(vm: &mut Vm) -> Result<(), String> {
    let mut callouts = callouts::Callouts::new(vm, &[], &[]);
    loop {
        match callouts.answer_next(vm) {
            Ok(true) => {}
            Ok(false) => return callouts.gave_up().map_or(Ok(()), Err),
            Err(error) => return Err(error.to_string()),
        }
    }
}

/// Delivers up to `ticks` timer ticks while the root context has a tick period, answering the
/// calls it makes meanwhile.
fn tick(vm: &mut Vm, ticks: u32) -> Result<(), String> {
    for _ in 0..ticks {
        if vm.is_failed() || vm.tick_period().is_none() {
            break;
        }
        vm.tick().map_err(|e| e.to_string())?;
        answer_root_calls(vm)?;
    }
    Ok(())
}

/// Delivers ticks and foreign function calls to one VM's root context.
fn run_root(vm: &mut Vm, scenario: &Scenario) -> Result<(), String> {
    for call in &scenario.foreign_function_calls {
        vm.on_foreign_function(call.function_id, call.arguments.clone().into_bytes())
            .map_err(|e| e.to_string())?;
    }
    tick(vm, scenario.ticks)
}

/// Ends a VM as a proxy does at shutdown: `proxy_on_done` on the root context; if it has work
/// pending, timer ticks (up to `shutdown_ticks`) and call answers until it calls
/// `proxy_done`; then `proxy_on_delete`, only for a root context that finished (as in
/// proxy-wasm-cpp-host, which never deletes one that did not). Returns whether it finished.
fn shut_down(vm: &mut Vm, scenario: &Scenario) -> Result<bool, String> {
    let root = vm.root_context();
    let mut done = vm.on_done(root).map_err(|e| e.to_string())?;
    let mut ticks = 0;
    while !done {
        answer_root_calls(vm)?;
        done = !vm.is_done_pending();
        if done || ticks >= scenario.shutdown_ticks || vm.tick_period().is_none() {
            break;
        }
        vm.tick().map_err(|e| e.to_string())?;
        ticks += 1;
    }
    if done {
        vm.on_delete(root).map_err(|e| e.to_string())?;
    }
    Ok(done)
}

/// Runs `scenario` through new VMs of `plugin` and reports what happened.
pub fn run(plugin: &Plugin, scenario: &Scenario, policy: FailurePolicy) -> Result<Report, VmError> {
    register_builtin_foreign_functions(plugin.shared_state());
    let mut vms = Vec::new();
    let mut report = Report {
        runtime: plugin.runtime_name().to_string(),
        abi_version: plugin.abi_version().to_string(),
        vm_start: true,
        configure: true,
        start_error: None,
        errors: Vec::new(),
        http: Vec::new(),
        tcp: Vec::new(),
        logs: Vec::new(),
        metrics: Vec::new(),
        shared_data: BTreeMap::new(),
        done: true,
    };
    for _ in 0..scenario.vms.max(1) {
        let mut host = InMemoryHost::new();
        for property in &scenario.properties {
            let value = property.value.to_value().encode().unwrap_or_default();
            host.properties
                .insert(property.path.join("\0").into_bytes(), value);
        }
        let node = scenario.node.clone().unwrap_or_else(|| NodeConfig {
            id: "pwhost".into(),
            ..NodeConfig::default()
        });
        host.node = Some(abi::Node {
            id: node.id,
            cluster: node.cluster,
            metadata: node
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.to_value()))
                .collect(),
        });
        let mut vm = Vm::new(plugin, Box::new(host))?;
        match vm.start() {
            Ok(true) => match vm.configure() {
                Ok(configured) => report.configure &= configured,
                Err(error) => {
                    report.configure = false;
                    report.start_error.get_or_insert_with(|| error.to_string());
                }
            },
            Ok(false) => report.vm_start = false,
            Err(error) => {
                report.vm_start = false;
                report.start_error.get_or_insert_with(|| error.to_string());
            }
        }
        vms.push(vm);
    }
    report.configure &= report.vm_start;
    dispatch_queues(&mut vms, &mut report.errors);
    if report.configure {
        for vm in &mut vms {
            if let Err(error) = run_root(vm, scenario) {
                report.errors.push(error.to_string());
            }
        }
        dispatch_queues(&mut vms, &mut report.errors);
    }
    let vm_count = vms.len();
    // Each exchange and connection comes on a downstream connection of its own.
    let mut connection_id = 0;
    for exchange in &scenario.http {
        connection_id += 1;
        let http = match vms.get_mut(exchange.vm) {
            Some(vm) => {
                let http =
                    http::run_exchange(vm, exchange, policy, report.configure, connection_id);
                if let Err(error) = tick(vm, exchange.ticks_after) {
                    report.errors.push(error.to_string());
                }
                http
            }
            None => HttpReport::no_such_vm(exchange.vm, vm_count),
        };
        report.http.push(http);
        dispatch_queues(&mut vms, &mut report.errors);
    }
    for connection in &scenario.tcp {
        connection_id += 1;
        let tcp = match vms.get_mut(connection.vm) {
            Some(vm) => {
                let tcp = tcp::run_connection(vm, connection, report.configure, connection_id);
                if let Err(error) = tick(vm, connection.ticks_after) {
                    report.errors.push(error.to_string());
                }
                tcp
            }
            None => TcpReport::no_such_vm(connection.vm, vm_count),
        };
        report.tcp.push(tcp);
        dispatch_queues(&mut vms, &mut report.errors);
    }
    for vm in vms.iter_mut().filter(|vm| !vm.is_failed()) {
        match shut_down(vm, scenario) {
            Ok(done) => report.done &= done,
            Err(error) => {
                report.done = false;
                report.errors.push(error.to_string());
            }
        }
    }
    for (index, vm) in vms.iter_mut().enumerate() {
        let host = in_memory_host(vm);
        report.logs.extend(host.logs.iter().map(|log| LogReport {
            level: log.level.as_str(),
            message: log.message.clone(),
            context_id: log.context.0,
            vm: index,
        }));
    }
    let shared = plugin.shared_state();
    report.metrics = shared
        .metrics_snapshot()
        .into_iter()
        .map(|m| MetricReport {
            name: m.name,
            metric_type: m.metric_type.as_str(),
            value: m.value,
        })
        .collect();
    report.shared_data = shared
        .data_snapshot(&plugin.config().vm_id)
        .into_iter()
        .map(|(k, v)| (lossy(&k), lossy(&v)))
        .collect();
    Ok(report)
}
