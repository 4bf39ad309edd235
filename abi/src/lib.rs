//! The Proxy-Wasm ABI, written once over [`runtime_api`] and run unchanged on every engine.
//!
//! * [`Plugin::load`] compiles a module, detects its ABI version, checks its exports and links
//!   the host functions once.
//! * [`Vm::new`] instantiates it; the `Vm`'s methods are the spec's callbacks (root context
//!   start/configure, HTTP stream callbacks, HTTP call responses, ticks).
//! * The embedding proxy implements [`Host`]: headers, bodies, what it knows of streams
//!   ([`StreamInfo`]) and of itself ([`Node`]), local replies, time and logging.
//!   [`InMemoryHost`] is a complete implementation for tests and `pwhost run`.
//! * Where a plugin can tell, the ABI behaves as Envoy does: which maps and bodies a plugin may
//!   reach when, Envoy's attributes as properties, filter state, and Envoy's foreign functions
//!   (registered in every [`SharedState`]).
//!
//! Every pointer and length a plugin passes is checked against its memory; a bad one returns
//! `INVALID_MEMORY_ACCESS` to the plugin and never reaches the host.
//!
//! # Embedding: the proxy's own header maps, lent
//!
//! A proxy keeps its headers in its own structure. It lends them to the ABI for each host call
//! through [`Headers`] (as proxy-wasm-cpp-host's `ContextBase` does): the ABI serializes straight
//! from the proxy's storage into guest memory and parses edits straight into it, so nothing is
//! copied into a map of pwhost's before a callback and back after it. [`HeaderMap`] is the
//! in-memory implementation [`InMemoryHost`] uses.
//!
//! ```
//! use abi::{BufferType, ContextId, Headers, Host, LogLevel, MapType, Plugin, PluginConfig};
//!
//! /// The proxy's request: its pseudo-headers in fields of their own (empty: absent), the rest
//! /// in a list.
//! struct ProxyRequest {
//!     method: Vec<u8>,
//!     path: Vec<u8>,
//!     fields: Vec<(Vec<u8>, Vec<u8>)>,
//! }
//!
//! impl ProxyRequest {
//!     fn pseudo(&self) -> [(&'static [u8], &[u8]); 2] {
//!         [(b":method", &self.method), (b":path", &self.path)]
//!     }
//!     fn pseudo_mut(&mut self, name: &[u8]) -> Option<&mut Vec<u8>> {
//!         match name {
//!             b":method" => Some(&mut self.method),
//!             b":path" => Some(&mut self.path),
//!             _ => None,
//!         }
//!     }
//! }
//!
//! impl Headers for ProxyRequest {
//!     fn len(&self) -> usize {
//!         self.pseudo().iter().filter(|(_, v)| !v.is_empty()).count() + self.fields.len()
//!     }
//!     fn get(&self, name: &[u8]) -> Option<&[u8]> {
//!         if let Some((_, value)) = self.pseudo().into_iter().find(|(k, _)| *k == name) {
//!             return (!value.is_empty()).then_some(value);
//!         }
//!         let found = self.fields.iter().find(|(k, _)| k.eq_ignore_ascii_case(name));
//!         found.map(|(_, v)| v.as_slice())
//!     }
//!     fn for_each(&self, visit: &mut dyn FnMut(&[u8], &[u8])) {
//!         for (name, value) in self.pseudo().into_iter().filter(|(_, v)| !v.is_empty()) {
//!             visit(name, value);
//!         }
//!         for (name, value) in &self.fields {
//!             visit(name, value);
//!         }
//!     }
//!     fn add(&mut self, name: &[u8], value: &[u8]) {
//!         match self.pseudo_mut(name) {
//!             Some(field) => *field = value.to_vec(),
//!             None => self.fields.push((name.to_ascii_lowercase(), value.to_vec())),
//!         }
//!     }
//!     fn replace(&mut self, name: &[u8], value: &[u8]) {
//!         let first = self.fields.iter().position(|(k, _)| k.eq_ignore_ascii_case(name));
//!         match first {
//!             Some(first) => {
//!                 // The first entry gets the value; later ones of the name go.
//!                 self.fields[first].1 = value.to_vec();
//!                 let mut index = 0;
//!                 self.fields.retain(|(k, _)| {
//!                     index += 1;
//!                     index - 1 <= first || !k.eq_ignore_ascii_case(name)
//!                 });
//!             }
//!             None => self.add(name, value),
//!         }
//!     }
//!     fn remove(&mut self, name: &[u8]) {
//!         match self.pseudo_mut(name) {
//!             Some(field) => field.clear(),
//!             None => self.fields.retain(|(k, _)| !k.eq_ignore_ascii_case(name)),
//!         }
//!     }
//!     fn clear(&mut self) {
//!         self.method.clear();
//!         self.path.clear();
//!         self.fields.clear();
//!     }
//! }
//!
//! /// The proxy's side of one VM: here, one request at a time.
//! struct Proxy {
//!     request: ProxyRequest,
//! }
//!
//! impl Host for Proxy {
//!     fn log(&mut self, _context: ContextId, _level: LogLevel, message: &str) {
//!         println!("plugin: {message}");
//!     }
//!     fn header_map(&mut self, _context: ContextId, map: MapType) -> Option<&mut dyn Headers> {
//!         match map {
//!             MapType::HttpRequestHeaders => Some(&mut self.request),
//!             _ => None,
//!         }
//!     }
//!     fn buffer(&mut self, _context: ContextId, _buffer: BufferType) -> Option<&mut Vec<u8>> {
//!         None
//!     }
//!     fn send_local_response(&mut self, _: ContextId, _: abi::LocalResponse) -> abi::Status {
//!         abi::Status::Unimplemented
//!     }
//!     fn continue_stream(&mut self, _: ContextId, _: abi::StreamType) -> abi::Status {
//!         abi::Status::Unimplemented
//!     }
//!     fn close_stream(&mut self, _: ContextId, _: abi::StreamType) -> abi::Status {
//!         abi::Status::Unimplemented
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A plugin that adds `x-minimal: 1` to every request (the corpus's minimal.wat).
//! let wasm = wat::parse_file(concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/wat/minimal.wat"))?;
//! let runtime = runtime_wasmtime::WasmtimeRuntime::new(Default::default())?;
//! let plugin = Plugin::load(&runtime, &wasm, PluginConfig::default(), abi::SharedState::new())?;
//! let proxy = Proxy {
//!     request: ProxyRequest { method: b"GET".to_vec(), path: b"/".to_vec(), fields: Vec::new() },
//! };
//! // One VM per worker thread, started once.
//! let mut vm = abi::Vm::new(&plugin, Box::new(proxy))?;
//! vm.start()?;
//! vm.configure()?;
//! // Per request.
//! let stream = vm.create_http_context()?;
//! vm.on_request_headers(stream, 2, true)?;
//! let request = &vm.host_as::<Proxy>().expect("the proxy").request;
//! assert_eq!(request.get(b"x-minimal"), Some(&b"1"[..]));
//! # Ok(())
//! # }
//! ```

mod attributes;
mod callbacks;
pub mod direct;
pub(crate) mod exports;
mod filter_state;
mod foreign;
mod header_map;
mod host;
mod in_memory;
mod plugin;
mod shared;
mod state;
mod stream;
mod types;
mod value;
mod version;
mod vm;

pub use attributes::{Node, StreamInfo};
pub use callbacks::callback_exports;
pub use exports::buffers::MAX_BODY_BYTES;
pub use exports::calls::{MAX_FOREIGN_ARGUMENT_BYTES, MAX_OPEN_CALLS};
pub use exports::host_functions;
pub use filter_state::{
    is_envoy_object, FilterStateObject, FilterStateSource, LifeSpan, PropertyDeclaration,
    PropertyType,
};
pub use foreign::{ForeignCall, ForeignFunction};
pub use header_map::{wire, HeaderMap, Headers};
pub use host::{GrpcRequest, Host, HttpCallRequest, HttpCallResponse, LocalResponse, PropertyPath};
pub use in_memory::{
    DispatchedCall, GrpcRecord, InMemoryHost, LogRecord, Reproducible, StreamRecord,
};
pub use plugin::{is_capability, LoadError, Plugin, PluginConfig, RootConfig};
pub use shared::{
    Histogram, Metric, MetricType, QueueWake, SharedLimits, SharedState, HISTOGRAM_BUCKETS,
    MAX_METRICS, MAX_METRICS_PER_VM_ID, MAX_METRIC_NAME_BYTES,
};
pub use state::VmState;
pub use stream::MAX_HEADER_BYTES_WRITTEN;
pub use types::{
    BufferType, ContextId, DataAction, HeadersAction, LogLevel, MapType, PeerType, Status,
    StreamType,
};
pub use value::Value;
pub use version::AbiVersion;
pub use vm::{Vm, VmError, VmWaker};

/// How many host calls plugins have made in this process, on every engine and VM (those a
/// capability restriction refused included).
#[cfg(feature = "host-call-count")]
pub fn host_calls_made() -> u64 {
    exports::HOST_CALLS.load(std::sync::atomic::Ordering::Relaxed)
}
