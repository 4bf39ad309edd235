//! Scenarios: scripted traffic for plugins, and the report of what the plugins did with it.
//!
//! A scenario is JSON or YAML:
//!
//! ```yaml
//! vms: 1                  # workers (run in turn on one thread), each with its own VM copy of every plugin's VM
//! properties: [{path: [source, address], value: "10.0.0.1:1234"}]
//! ticks: 0                # timer ticks after configuration (if the plugin set a period)
//! http:
//!   - request_headers: [[":method", "GET"], [":path", "/"]]
//!     request_body: ["first chunk", "last chunk"]
//!     response_headers: [[":status", "200"]]
//!     http_call_responses: [{headers: [[":status", "200"]], body: "ok"}]
//!     grpc_call_responses: [{messages: ["reply"], status: 0}]
//!     vm: 0                # which worker handles it
//!     delay_ms: 0          # wall-clock wait before it
//! tcp:
//!   - downstream: ["hello"]
//!     upstream: ["world"]
//! ```
//!
//! The plugins run as a proxy runs them (see [`lifecycle`]): one plugin given on the command
//! line, or a configuration's HTTP filter chain and network filter chain. Each HTTP exchange
//! runs through the HTTP filters as Envoy runs a stream: request headers, body chunks (the
//! last one carries end-of-stream), trailers, in chain order; then the same for the response
//! in reverse order; then `on_log`, `on_done` and `on_delete`. A stream a plugin pauses resumes
//! only when the plugin continues it (typically from a callout response, which the runner
//! answers from `http_call_responses`/`grpc_call_responses` in the order the calls were made,
//! or with the spec's failure callback when none is left); otherwise it is reported as stalled.
//! TCP connections run likewise through the network filters: new connection, downstream data,
//! upstream data, both closes.

mod callouts;
mod http;
mod report;
mod tcp;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use abi::{ContextId, InMemoryHost, LogRecord, Plugin, SharedState, Vm, VmError};
use lifecycle::{
    CopyId, PluginId, Plugins, SingletonService, StartFailure, StartStep, Ticking, Worker,
};
use serde::{Deserialize, Serialize};

pub use report::{
    FilterReport, FilterStateReport, GrpcCallReport, HttpCallReport, HttpReport,
    LocalResponseReport, LogReport, MetricReport, PluginReport, Report, TcpReport,
};

/// A header list as `[name, value]` pairs.
pub type Headers = Vec<(String, String)>;

/// Scripted traffic for one plugin.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// How many VM copies of the plugin to run (default 1, at most [`MAX_VMS`]); they share
    /// shared data and queues.
    #[serde(default = "one", deserialize_with = "vm_count")]
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
    /// period set); at most [`MAX_TICKS`].
    #[serde(default, deserialize_with = "tick_count")]
    pub ticks: u32,
    /// How many timer ticks to deliver at shutdown while a root context whose `proxy_on_done`
    /// returned false still owes `proxy_done`; at most [`MAX_TICKS`].
    #[serde(default, deserialize_with = "tick_count")]
    pub shutdown_ticks: u32,
    /// Calls of the plugin's `proxy_on_foreign_function`, made after configuration.
    #[serde(default)]
    pub foreign_function_calls: Vec<ForeignFunctionCall>,
    /// Clocks and random bytes the same on every run, so that reports compare (across
    /// engines, or with a recorded one); absent, the system's.
    #[serde(default)]
    pub reproducible: Option<Reproducible>,
}

/// A run's fixed clocks and random seed (see [`abi::Reproducible`]): the wall clock starts at
/// `start_unix_nanos` and both clocks move 1 µs with every reading.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Reproducible {
    /// The wall clock's first reading, in nanoseconds since the Unix epoch (default
    /// 2026-01-01T00:00:00Z).
    #[serde(default = "new_year_2026")]
    pub start_unix_nanos: u64,
    /// The seed of the random bytes (default 0).
    #[serde(default)]
    pub random_seed: u64,
}

fn new_year_2026() -> u64 {
    1_767_225_600_000_000_000
}

/// The host calling a function of the plugin (`proxy_on_foreign_function`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForeignFunctionCall {
    /// The function's id.
    pub function_id: u32,
    /// Its arguments, readable as the `CallData` buffer.
    #[serde(default)]
    pub arguments: Bytes,
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
    pub request_body: Vec<Bytes>,
    /// Request trailers.
    #[serde(default)]
    pub request_trailers: Headers,
    /// Response headers from upstream; default `:status 200`.
    #[serde(default)]
    pub response_headers: Option<Headers>,
    /// Response body chunks.
    #[serde(default)]
    pub response_body: Vec<Bytes>,
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
    /// tick period (one the plugin may have set during the exchange); at most [`MAX_TICKS`].
    #[serde(default, deserialize_with = "tick_count")]
    pub ticks_after: u32,
    /// Wall-clock milliseconds to wait before the exchange (e.g. for a `FAIL_RELOAD` backoff to
    /// pass); at most [`MAX_DELAY_MS`].
    #[serde(default, deserialize_with = "delay")]
    pub delay_ms: u64,
    /// The name of the route the request took (`xds.route_name`); none: not routed, as a
    /// stream no route matched in Envoy (`NOT_FOUND`).
    #[serde(default)]
    pub route_name: Option<String>,
    /// The upstream cluster the request went to (`xds.cluster_name`); none: `NOT_FOUND`.
    #[serde(default)]
    pub cluster_name: Option<String>,
}

/// The longest wait a scenario may ask for before an exchange, so a run stays short.
pub const MAX_DELAY_MS: u64 = 10_000;

/// The most timer ticks a scenario may ask for in one place, so a run stays short.
pub const MAX_TICKS: u32 = 100_000;

/// The most VM copies a scenario may ask for (each holds a copy of every plugin).
pub const MAX_VMS: usize = 256;

/// A number read from a scenario, refused (with the limit) past `max` or below `min`. The
/// check runs inside the number's own deserialization, so that the error names the field and
/// its line (`shutdown_ticks: invalid value: … at line 3 column 17`).
fn bounded<'de, D, T>(deserializer: D, min: T, max: T, what: &'static str) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64> + Into<u64> + Copy,
{
    struct Bounded {
        min: u64,
        max: u64,
        what: &'static str,
    }
    impl serde::de::Visitor<'_> for Bounded {
        type Value = u64;
        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(formatter, "{} from {} to {}", self.what, self.min, self.max)
        }
        fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<u64, E> {
            if value < self.min || value > self.max {
                return Err(E::invalid_value(
                    serde::de::Unexpected::Unsigned(value),
                    &self,
                ));
            }
            Ok(value)
        }
        fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<u64, E> {
            match u64::try_from(value) {
                Ok(value) => self.visit_u64(value),
                Err(_) => Err(E::invalid_value(
                    serde::de::Unexpected::Signed(value),
                    &self,
                )),
            }
        }
    }
    let bounds = Bounded {
        min: min.into(),
        max: max.into(),
        what,
    };
    let value = deserializer.deserialize_u64(bounds)?;
    // In range, so it fits the field's type.
    T::try_from(value).map_err(|_| serde::de::Error::custom(format!("{what} out of range")))
}

fn vm_count<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    bounded(deserializer, 1, MAX_VMS as u64, "a VM count").map(|n: u64| n as usize)
}

fn tick_count<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    bounded(deserializer, 0, MAX_TICKS, "a tick count")
}

fn delay<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    bounded(deserializer, 0, MAX_DELAY_MS, "a delay in milliseconds")
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
    pub downstream: Vec<Bytes>,
    /// Data chunks from upstream; the last one ends the direction.
    #[serde(default)]
    pub upstream: Vec<Bytes>,
    /// Answers to HTTP calls dispatched during the connection.
    #[serde(default)]
    pub http_call_responses: Vec<CallResponse>,
    /// Answers to gRPC calls dispatched during the connection.
    #[serde(default)]
    pub grpc_call_responses: Vec<GrpcResponse>,
    /// Timer ticks delivered to the connection's VM after it ends, while its root context has a
    /// tick period; at most [`MAX_TICKS`].
    #[serde(default, deserialize_with = "tick_count")]
    pub ticks_after: u32,
    /// The upstream cluster the connection goes to (`xds.cluster_name`, as Envoy's TCP proxy
    /// reports it); none: `NOT_FOUND`.
    #[serde(default)]
    pub cluster_name: Option<String>,
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
    pub body: Bytes,
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
    pub messages: Vec<Bytes>,
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

/// Bytes a scenario gives the plugin (a body chunk, TCP data, a call's answer, a gRPC message,
/// a foreign function's arguments): text as written (`"hello"`), or any bytes as base64
/// (`{base64: "CgVhbGljZQ=="}`), e.g. a protobuf message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl From<&str> for Bytes {
    fn from(text: &str) -> Self {
        Bytes(text.as_bytes().to_vec())
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BytesVisitor;
        impl<'de> serde::de::Visitor<'de> for BytesVisitor {
            type Value = Bytes;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("text, or {base64: \"...\"} for any bytes")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Bytes, E> {
                Ok(Bytes::from(text))
            }
            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Bytes, E> {
                Ok(Bytes(text.into_bytes()))
            }
            // An empty YAML value (`body:`) is no bytes, as it was an empty string.
            fn visit_unit<E: serde::de::Error>(self) -> Result<Bytes, E> {
                Ok(Bytes::default())
            }
            // A number or a boolean is refused, not turned into text: YAML reads `1.0`,
            // `0x1F` or `TRUE` as values whose text is not what was written.
            fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<Bytes, E> {
                Err(E::custom(format!(
                    "{value} is a boolean: quote it to send its text"
                )))
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Bytes, E> {
                Err(E::custom(format!(
                    "{value} is a number: quote it to send its text"
                )))
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Bytes, E> {
                Err(E::custom(format!(
                    "{value} is a number: quote it to send its text"
                )))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Bytes, E> {
                Err(E::custom("a number: quote it to send its text"))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Bytes, A::Error> {
                use base64::Engine as _;
                use serde::de::Error as _;
                let Some(key) = map.next_key::<String>()? else {
                    return Err(A::Error::custom("an empty map: write {base64: \"...\"}"));
                };
                if key != "base64" {
                    return Err(A::Error::unknown_field(&key, &["base64"]));
                }
                let encoded: String = map.next_value()?;
                if let Some(other) = map.next_key::<String>()? {
                    return Err(match other.as_str() {
                        "base64" => A::Error::duplicate_field("base64"),
                        _ => A::Error::custom(format!(
                            "{other:?} beside base64: {{base64: \"...\"}} has one key"
                        )),
                    });
                }
                // Encoders wrap lines (`base64` at 76 columns, YAML block scalars).
                let encoded: String = encoded.split_ascii_whitespace().collect();
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map(Bytes)
                    .map_err(|e| A::Error::custom(format!("base64: {e}")))
            }
        }
        deserializer.deserialize_any(BytesVisitor)
    }
}

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        use serde::ser::SerializeMap as _;
        match std::str::from_utf8(&self.0) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(
                    "base64",
                    &base64::engine::general_purpose::STANDARD.encode(&self.0),
                )?;
                map.end()
            }
        }
    }
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

/// A typed value in a scenario: a string, integer (8 little-endian bytes; unsigned above
/// `i64`'s range), double, boolean (one byte), list or map (header pairs), as the plugin
/// receives such values from Envoy.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Data {
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// An integer above `i64`'s range (8 little-endian bytes, unsigned), rather than a double.
    Uint(u64),
    /// A double.
    Double(f64),
    /// A string.
    String(String),
    /// A list.
    List(Vec<Data>),
    /// Bytes that are not text (e.g. a serialized protobuf message), as `{base64: "..."}`.
    Bytes(Bytes),
    /// A map.
    Map(BTreeMap<String, Data>),
}

impl Data {
    /// The value as the ABI's.
    pub fn to_value(&self) -> abi::Value<'static> {
        match self {
            Data::Bool(b) => abi::Value::Bool(*b),
            Data::Int(i) => abi::Value::Int(*i),
            Data::Uint(u) => abi::Value::Uint(*u),
            Data::Double(d) => abi::Value::Double(*d),
            Data::String(s) => abi::Value::string(s.clone()),
            Data::List(items) => abi::Value::List(items.iter().map(Data::to_value).collect()),
            Data::Bytes(bytes) => abi::Value::Bytes(Cow::Owned(bytes.0.clone())),
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

/// What the host does when the VM fails (a trap) while a stream is in the plugin's hands, for a
/// plugin given on the command line (a configuration file says it with `failure_policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Answer the stream with a local 503 reply (never leave it hanging).
    #[default]
    FailClosed,
    /// Forward the stream as if the plugin were not there.
    FailOpen,
}

impl FailurePolicy {
    fn to_lifecycle(self) -> lifecycle::FailurePolicy {
        match self {
            FailurePolicy::FailClosed => lifecycle::FailurePolicy::FailClosed,
            FailurePolicy::FailOpen => lifecycle::FailurePolicy::FailOpen,
        }
    }
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
const SOURCE_ADDRESS: SocketAddr = loopback(50000);
const DESTINATION_ADDRESS: SocketAddr = loopback(10000);
const UPSTREAM_ADDRESS: SocketAddr = loopback(8080);

const fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// What a proxy knows of a new downstream connection `connection_id`.
fn connection_info(connection_id: u64, start_time: std::time::SystemTime) -> abi::StreamInfo {
    abi::StreamInfo {
        source_address: Some(SOURCE_ADDRESS),
        destination_address: Some(DESTINATION_ADDRESS),
        connection_id: Some(connection_id),
        mtls: Some(false),
        requested_server_name: Some(String::new()),
        start_time: Some(start_time),
        bytes_received: Some(0),
        bytes_sent: Some(0),
        ..abi::StreamInfo::default()
    }
}

/// `bytes` as report text, nothing lost: as they are if they are UTF-8; otherwise with every
/// byte that is no part of a UTF-8 character written `\xNN`, and every backslash `\\`.
fn report_text(bytes: &[u8]) -> String {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return text.to_string();
    }
    let mut text = String::with_capacity(bytes.len() + 16);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => text.push_str("\\\\"),
                c => text.push(c),
            }
        }
        for byte in chunk.invalid() {
            text.push_str(&format!("\\x{byte:02x}"));
        }
    }
    text
}

/// `map`'s fields as report text, by [`report_text`].
fn pairs(map: &abi::HeaderMap) -> Vec<(String, String)> {
    map.iter()
        .map(|(name, value)| (report_text(name), report_text(value)))
        .collect()
}

pub(crate) fn in_memory_host(vm: &mut Vm) -> &mut InMemoryHost {
    vm.host_as::<InMemoryHost>()
        .expect("scenario VMs run on an InMemoryHost")
}

/// The record of a stream (or connection) `context` in the host of the VM copy `held` names.
pub(crate) fn stream_record<'s>(
    worker: &'s mut lifecycle::Worker,
    held: Option<&lifecycle::StreamVm>,
    context: ContextId,
) -> Result<&'s mut abi::StreamRecord, VmError> {
    let vm = held
        .and_then(|held| worker.vm(held))
        .ok_or_else(no_vm_on_worker)?;
    Ok(in_memory_host(vm).stream(context))
}

/// What a stage whose plugin holds no VM copy on the worker gets.
pub(crate) fn no_vm_on_worker() -> VmError {
    VmError::Failed("the plugin has no VM on this worker".into())
}

/// The host of every VM copy of a run: the scenario's properties and node.
fn scenario_host(scenario: &Scenario) -> InMemoryHost {
    let mut host = InMemoryHost::new();
    host.reproducible = scenario.reproducible.as_ref().map(|fixed| {
        abi::Reproducible::new(
            std::time::UNIX_EPOCH + std::time::Duration::from_nanos(fixed.start_unix_nanos),
            fixed.random_seed,
        )
    });
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
    host
}

/// Runs root work on every current VM copy of `worker` that has not failed: `work` gets the VM
/// and one root context; the calls the root makes get the failure callback (nothing scripts
/// them). Errors go to `errors`.
fn each_root(
    worker: &mut Worker,
    errors: &mut Vec<String>,
    mut work: impl FnMut(&mut Vm, ContextId) -> Result<(), VmError>,
) {
    let mut failed = Vec::new();
    worker.for_each_copy(|_, vm, roots| {
        for (plugin, root) in roots {
            if vm.is_failed() {
                return;
            }
            let mark = callouts::calls_mark(vm);
            let outcome =
                work(vm, *root).and_then(|()| callouts::answer_root_calls_noting(vm, mark, errors));
            // A callback failing the VM, the root's own or one answering its calls, counts
            // as the plugin's failure.
            if let Err(error) = outcome {
                errors.push(error.to_string());
                failed.push((*plugin, error));
            }
        }
    });
    // The failures count as a proxy's would (the plugins' counters in the report).
    for (plugin, error) in failed {
        worker.root_failed(plugin, &error);
    }
}

/// Delivers pending queue notifications on every VM copy of every worker.
fn dispatch_queues(workers: &mut [Worker], errors: &mut Vec<String>) {
    for worker in workers {
        let mut failed = Vec::new();
        worker.for_each_copy(|_, vm, roots| {
            if vm.is_failed() {
                return;
            }
            let mark = callouts::calls_mark(vm);
            let outcome = vm
                .dispatch_queue_ready()
                .and_then(|_| callouts::answer_root_calls_noting(vm, mark, errors));
            if let Err(error) = outcome {
                errors.push(error.to_string());
                if let Some(plugin) = lifecycle::failing_plugin(roots, &error) {
                    failed.push((plugin, error));
                }
            }
        });
        for (plugin, error) in failed {
            worker.root_failed(plugin, &error);
        }
    }
}

/// Delivers up to `ticks` timer ticks to every root context of `worker` that has a tick period.
fn tick(worker: &mut Worker, ticks: u32, errors: &mut Vec<String>) {
    for _ in 0..ticks {
        let mut ticking = false;
        each_root(worker, errors, |vm, root| {
            if vm.tick_period_of(root).is_none() {
                return Ok(());
            }
            ticking = true;
            vm.tick_root(root)
        });
        if !ticking {
            break;
        }
    }
}

/// Ends a root context as a proxy does at shutdown: `proxy_on_done`; if it has work pending,
/// timer ticks (up to `shutdown_ticks`) and call answers until it calls `proxy_done`; then
/// `proxy_on_delete`, only for a root context that finished (as in proxy-wasm-cpp-host, which
/// never deletes one that did not). Returns whether it finished.
fn shut_down(vm: &mut Vm, root: ContextId, scenario: &Scenario) -> Result<bool, String> {
    let mark = callouts::calls_mark(vm);
    let mut done = vm.on_done(root).map_err(|e| e.to_string())?;
    let mut ticks = 0;
    let mut mark = mark;
    while !done {
        callouts::answer_root_calls(vm, mark).map_err(|e| e.to_string())?;
        done = !vm.is_done_pending_for(root);
        if done || ticks >= scenario.shutdown_ticks || vm.tick_period_of(root).is_none() {
            break;
        }
        mark = callouts::calls_mark(vm);
        vm.tick_root(root).map_err(|e| e.to_string())?;
        ticks += 1;
    }
    if done {
        vm.on_delete(root).map_err(|e| e.to_string())?;
    }
    Ok(done)
}

/// Records a VM copy that did not start in the report; an error if it could not be made at
/// all.
fn record_start_failure(report: &mut Report, failure: StartFailure) -> Result<(), VmError> {
    match (failure.step, failure.error) {
        (StartStep::Instantiate, Some(error)) => return Err(error),
        (StartStep::Instantiate | StartStep::VmStart, error) => {
            report.vm_start = false;
            if let Some(error) = error {
                report.start_error.get_or_insert_with(|| error.to_string());
            }
        }
        (StartStep::Configure, error) => {
            report.configure = false;
            if let Some(error) = error {
                report.start_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    Ok(())
}

/// The calls a singleton service's root makes get the failure callback after each of its
/// callbacks (nothing scripts them), as root calls on the workers do; what that answering
/// fails with (a budget spent, a callback failing the VM) joins the service's errors.
fn answer_service_calls() -> lifecycle::AfterCallback {
    let mut mark = (0, 0);
    Box::new(move |vm| {
        let answered = callouts::answer_root_calls(vm, mark);
        mark = callouts::calls_mark(vm);
        answered.map_err(|error| match error {
            callouts::RootCallsError::Vm(error) => lifecycle::AfterError::Vm(error),
            callouts::RootCallsError::Budget(message) => lifecycle::AfterError::Other(message),
        })
    })
}

/// Which plugin wrote what on one worker, per VM copy: its root contexts and the streams it
/// was given (copies and contexts are numbered per worker).
type Owners = HashMap<(CopyId, ContextId), PluginId>;

/// The log lines of VM copies gone away, with the copy and its roots' plugins.
type Retired = Arc<Mutex<Vec<(usize, CopyId, Vec<LogRecord>, Vec<(PluginId, ContextId)>)>>>;

/// Runs `scenario` through the plugins of a one-plugin deployment: `plugin`, given on the
/// command line, as its HTTP and network filter, failing by `policy`. Unlike a deployment from
/// a configuration file, a plugin that refuses to start is reported (`vm_start`, `configure`,
/// its logs), not refused.
pub fn run(plugin: &Plugin, scenario: &Scenario, policy: FailurePolicy) -> Result<Report, VmError> {
    let config = plugin.config();
    let plugin_config = lifecycle::PluginConfig {
        path: String::new(),
        name: config.name.clone(),
        root_id: config.root_id.clone(),
        vm: lifecycle::VmConfig {
            vm_id: config.vm_id.clone(),
            runtime: plugin.runtime_name().to_string(),
            code: lifecycle::CodeSource::String(String::new()),
            configuration: config.vm_configuration.clone(),
            allow_precompiled: false,
            nack_on_code_cache_miss: false,
            environment: lifecycle::Environment {
                host_env_keys: Vec::new(),
                key_values: config.environment.iter().cloned().collect(),
            },
        },
        configuration: config.plugin_configuration.clone(),
        failure_policy: policy.to_lifecycle(),
        allowed_capabilities: None,
        allow_on_headers_stop_iteration: config.allow_on_headers_stop_iteration,
    };
    let plugins = Arc::new(Plugins::single(plugin_config, plugin.clone()));
    run_plugins(&plugins, scenario)
}

/// Runs `scenario` through `plugins` as a proxy runs them: `vms` workers (run in turn on this
/// thread), each with its own VM copy of every plugin's VM, made and started before traffic; each HTTP exchange
/// through the HTTP filter chain, each TCP connection through the network filter chain, on
/// the worker the exchange names. Returns an error only if a VM copy cannot be made at all.
pub fn run_plugins(plugins: &Arc<Plugins>, scenario: &Scenario) -> Result<Report, VmError> {
    register_builtin_foreign_functions(plugins.shared_state());
    let http_chain: Vec<PluginId> = plugins.http_filters().collect();
    let network_chain: Vec<PluginId> = plugins.network_filters().collect();
    let first = http_chain
        .first()
        .or(network_chain.first())
        .copied()
        .unwrap_or(PluginId(0));
    let retired: Retired = Arc::default();
    let mut report = Report {
        runtime: plugins.module(first).runtime_name().to_string(),
        abi_version: plugins.module(first).abi_version().to_string(),
        vm_start: true,
        configure: true,
        start_error: None,
        errors: Vec::new(),
        http: Vec::new(),
        tcp: Vec::new(),
        logs: Vec::new(),
        metrics: Vec::new(),
        shared_data: BTreeMap::new(),
        shared_data_by_vm_id: BTreeMap::new(),
        plugins: Vec::new(),
        done: true,
    };
    let services: Vec<PluginId> = plugins.services().collect();
    let worker_plugins: Vec<PluginId> = http_chain
        .iter()
        .chain(&network_chain)
        .copied()
        .chain(plugins.worker_services())
        .collect();
    let mut workers = Vec::new();
    let mut owners: Vec<Owners> = Vec::new();
    // What the copies' hosts are made from (not the traffic, which may be large), shared by
    // the workers.
    let host_scenario = Arc::new(Scenario {
        properties: scenario.properties.clone(),
        node: scenario.node.clone(),
        reproducible: scenario.reproducible.clone(),
        ..Scenario::default()
    });
    for index in 0..scenario.vms.max(1) {
        let host_scenario = Arc::clone(&host_scenario);
        let retired = Arc::clone(&retired);
        let mut worker = Worker::new(Arc::clone(plugins), move || {
            Box::new(scenario_host(&host_scenario))
        })
        .on_retire(Box::new(move |copy, vm, roots| {
            let logs = std::mem::take(&mut in_memory_host(vm).logs);
            if let Ok(mut retired) = retired.lock() {
                retired.push((index, copy, logs, roots.to_vec()));
            }
        }));
        // Every plugin's copy on every worker is made before traffic, as Envoy does when a
        // configuration arrives; so are services that run on every worker.
        for plugin in worker_plugins.iter() {
            if let Err(failure) = worker.start(*plugin) {
                record_start_failure(&mut report, failure)?;
            }
        }
        let mut owned = Owners::new();
        worker.for_each_copy(|copy, _, roots| {
            for (plugin, root) in roots {
                owned.insert((copy, *root), *plugin);
            }
        });
        owners.push(owned);
        workers.push(worker);
    }
    // Singleton services: one VM each, on a thread of its own, ticked only when the scenario
    // says so (runs repeat exactly).
    let mut singletons = Vec::new();
    for service in plugins.singleton_services() {
        match SingletonService::spawn(
            Arc::clone(plugins),
            service,
            Box::new(scenario_host(scenario)),
            Ticking::Manual,
            answer_service_calls(),
        ) {
            Ok(running) => singletons.push((service, running)),
            Err(lifecycle::SpawnError::Start(_, failure)) => {
                record_start_failure(&mut report, *failure)?
            }
            Err(error) => report.errors.push(error.to_string()),
        }
    }
    report.configure &= report.vm_start;
    dispatch_queues(&mut workers, &mut report.errors);
    if report.configure {
        for worker in &mut workers {
            for call in &scenario.foreign_function_calls {
                each_root(worker, &mut report.errors, |vm, root| {
                    vm.on_foreign_function_for(root, call.function_id, call.arguments.0.clone())
                });
            }
            tick(worker, scenario.ticks, &mut report.errors);
        }
        for (_, service) in &singletons {
            // As on the workers: only while the service has a tick period.
            for _ in 0..scenario.ticks {
                if !service.tick() {
                    break;
                }
            }
        }
        dispatch_queues(&mut workers, &mut report.errors);
    }
    let worker_count = workers.len();
    // Each exchange and connection comes on a downstream connection of its own.
    let mut connection_id = 0;
    for exchange in &scenario.http {
        connection_id += 1;
        if exchange.delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(
                exchange.delay_ms.min(MAX_DELAY_MS),
            ));
        }
        let http = match workers.get_mut(exchange.vm) {
            Some(worker) => {
                let owners = &mut owners[exchange.vm];
                let http = http::run_exchange(worker, &http_chain, exchange, connection_id, owners);
                tick(worker, exchange.ticks_after, &mut report.errors);
                http
            }
            None => HttpReport::no_such_vm(exchange.vm, worker_count),
        };
        report.http.push(http);
        dispatch_queues(&mut workers, &mut report.errors);
        for (_, service) in &singletons {
            service.sync();
        }
    }
    for connection in &scenario.tcp {
        connection_id += 1;
        let tcp = match workers.get_mut(connection.vm) {
            Some(worker) => {
                let tcp = tcp::run_connection(
                    worker,
                    &network_chain,
                    connection,
                    connection_id,
                    &mut owners[connection.vm],
                );
                tick(worker, connection.ticks_after, &mut report.errors);
                tcp
            }
            None => TcpReport::no_such_vm(connection.vm, worker_count),
        };
        report.tcp.push(tcp);
        dispatch_queues(&mut workers, &mut report.errors);
        for (_, service) in &singletons {
            service.sync();
        }
    }
    for worker in &mut workers {
        let mut errors = Vec::new();
        let mut done = true;
        worker.for_each_copy(|_, vm, roots| {
            for (_, root) in roots {
                if vm.is_failed() {
                    return;
                }
                match shut_down(vm, *root, scenario) {
                    Ok(finished) => done &= finished,
                    Err(error) => {
                        done = false;
                        errors.push(error);
                    }
                }
            }
        });
        worker.roots_ended();
        report.done &= done;
        report.errors.extend(errors);
    }
    // Singleton services stop last, with everything the workers enqueued delivered; their VMs
    // are numbered after the workers.
    let mut service_logs = Vec::new();
    for (index, (service, running)) in singletons.into_iter().enumerate() {
        let Some(mut end) = running.stop(scenario.shutdown_ticks) else {
            report.errors.push(format!(
                "service {:?}: its thread panicked",
                plugins.config(service).name
            ));
            continue;
        };
        report.done &= end.done;
        // Named after the service: its thread's errors come from no exchange or worker.
        let name = &plugins.config(service).name;
        report.errors.extend(
            end.errors
                .into_iter()
                .map(|error| format!("service {name:?}: {error}")),
        );
        let logs = std::mem::take(&mut in_memory_host(&mut end.vm).logs);
        service_logs.push((workers.len() + index, service, logs));
    }
    report.plugins = plugin_reports(plugins);
    // The copies go away: their logs are collected, worker by worker.
    drop(workers);
    let mut retired = std::mem::take(&mut *retired.lock().unwrap_or_else(|e| e.into_inner()));
    retired.sort_by_key(|(worker, ..)| *worker);
    for (worker, copy, logs, roots) in retired {
        let owner_of = |context: ContextId| {
            roots
                .iter()
                .find(|(_, root)| *root == context)
                .map(|(plugin, _)| *plugin)
                .or_else(|| owners[worker].get(&(copy, context)).copied())
                // The VM's own lines (its start function) are its first plugin's.
                .or_else(|| roots.first().map(|(plugin, _)| *plugin))
        };
        report.logs.extend(logs.into_iter().map(|log| {
            LogReport {
                level: log.level.as_str(),
                message: log.message,
                context_id: log.context.0,
                vm: worker,
                plugin: owner_of(log.context)
                    .map(|plugin| plugins.config(plugin).name.clone())
                    .unwrap_or_default(),
            }
        }));
    }
    for (vm, service, logs) in service_logs {
        report.logs.extend(logs.into_iter().map(|log| LogReport {
            level: log.level.as_str(),
            message: log.message,
            context_id: log.context.0,
            vm,
            plugin: plugins.config(service).name.clone(),
        }));
    }
    let shared = plugins.shared_state();
    report.metrics = shared
        .metrics_snapshot()
        .into_iter()
        .map(|m| MetricReport {
            name: m.name,
            metric_type: m.metric_type.as_str(),
            value: m.value,
        })
        .collect();
    let shared_data = |vm_id: &str| -> BTreeMap<String, String> {
        shared
            .data_snapshot(vm_id)
            .into_iter()
            .map(|(k, v)| (report_text(&k), report_text(&v)))
            .collect()
    };
    report.shared_data = shared_data(&plugins.config(first).vm.vm_id);
    for plugin in http_chain.iter().chain(&network_chain).chain(&services) {
        let vm_id = &plugins.config(*plugin).vm.vm_id;
        report
            .shared_data_by_vm_id
            .entry(vm_id.clone())
            .or_insert_with(|| shared_data(vm_id));
    }
    Ok(report)
}

/// Each plugin of `plugins`, for the report.
fn plugin_reports(plugins: &Plugins) -> Vec<PluginReport> {
    let kinds = plugins
        .http_filters()
        .map(|p| (p, "http_filter"))
        .chain(plugins.network_filters().map(|p| (p, "network_filter")))
        .chain(plugins.services().map(|p| (p, "service")));
    let mut reports: Vec<(&Arc<lifecycle::Counters>, PluginReport)> = Vec::new();
    for (plugin, kind) in kinds {
        // One plugin serving as both filters (`pwhost run`'s shorthand) is reported once.
        let counters = plugins.counters(plugin);
        if let Some((_, seen)) = reports.iter_mut().find(|(c, _)| Arc::ptr_eq(c, counters)) {
            seen.kind = "http_and_network_filter";
            continue;
        }
        let config = plugins.config(plugin);
        reports.push((
            counters,
            PluginReport {
                name: config.name.clone(),
                kind,
                root_id: config.root_id.clone(),
                vm_id: config.vm.vm_id.clone(),
                runtime: plugins.module(plugin).runtime_name().to_string(),
                compiled_from: plugins.compiled_from(plugin).as_str(),
                failure_policy: match config.failure_policy {
                    lifecycle::FailurePolicy::FailClosed => "fail_closed",
                    lifecycle::FailurePolicy::FailOpen => "fail_open",
                    lifecycle::FailurePolicy::FailReload { .. } => "fail_reload",
                },
                counters: counters.snapshot().into_iter().collect(),
            },
        ));
    }
    reports.into_iter().map(|(_, report)| report).collect()
}

#[cfg(test)]
mod tests {
    use super::report_text;

    /// Report text loses nothing: UTF-8 as it is; otherwise the other bytes as `\xNN`, and
    /// backslashes doubled, so that two values that are not UTF-8 never read the same (text
    /// that spells `\xNN` itself reads as such a value would).
    #[test]
    fn report_text_keeps_bytes_that_are_not_utf8() {
        assert_eq!(report_text("plain € \\x41".as_bytes()), "plain € \\x41");
        assert_eq!(report_text(b"\xff\xfe"), "\\xff\\xfe");
        assert_eq!(report_text(b"\x08\x96\x01"), "\u{8}\\x96\u{1}");
        assert_eq!(report_text(b"a\\b\xff"), "a\\\\b\\xff");
        assert_ne!(report_text(b"\xff"), report_text(b"\xfe"));
    }
}
