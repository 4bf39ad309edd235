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

mod attributes;
mod callbacks;
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
pub use exports::host_functions;
pub use filter_state::{
    is_envoy_object, FilterStateObject, FilterStateSource, LifeSpan, PropertyDeclaration,
    PropertyType,
};
pub use foreign::{ForeignCall, ForeignFunction};
pub use header_map::{wire, HeaderMap};
pub use host::{GrpcRequest, Host, HttpCallRequest, HttpCallResponse, LocalResponse, PropertyPath};
pub use in_memory::{DispatchedCall, GrpcRecord, InMemoryHost, LogRecord, StreamRecord};
pub use plugin::{LoadError, Plugin, PluginConfig, RootConfig};
pub use shared::{Metric, MetricType, SharedState};
pub use state::VmState;
pub use types::{
    BufferType, ContextId, DataAction, HeadersAction, LogLevel, MapType, PeerType, Status,
    StreamType,
};
pub use value::Value;
pub use version::AbiVersion;
pub use vm::{Vm, VmError, VmWaker};
