//! The Proxy-Wasm ABI, written once over [`runtime_api`] and run unchanged on every engine.
//!
//! * [`Plugin::load`] compiles a module, detects its ABI version, checks its exports and links
//!   the host functions once.
//! * [`Vm::new`] instantiates it; the `Vm`'s methods are the spec's callbacks (root context
//!   start/configure, HTTP stream callbacks, HTTP call responses, ticks).
//! * The embedding proxy implements [`Host`]: headers, bodies, properties, local replies, time
//!   and logging. [`InMemoryHost`] is a complete implementation for tests and `pwhost run`.
//!
//! Every pointer and length a plugin passes is checked against its memory; a bad one returns
//! `INVALID_MEMORY_ACCESS` to the plugin and never reaches the host.

mod callbacks;
pub(crate) mod exports;
mod header_map;
mod host;
mod in_memory;
mod plugin;
mod shared;
mod state;
mod stream;
mod types;
mod version;
mod vm;

pub use exports::host_functions;
pub use header_map::{wire, HeaderMap};
pub use host::{GrpcRequest, Host, HttpCallRequest, HttpCallResponse, LocalResponse, PropertyPath};
pub use in_memory::{DispatchedCall, GrpcRecord, InMemoryHost, LogRecord, StreamRecord};
pub use plugin::{LoadError, Plugin, PluginConfig};
pub use shared::{ForeignFunction, Metric, MetricType, SharedState};
pub use state::VmState;
pub use types::{
    BufferType, ContextId, DataAction, HeadersAction, LogLevel, MapType, PeerType, Status,
    StreamType,
};
pub use version::AbiVersion;
pub use vm::{Vm, VmError};
