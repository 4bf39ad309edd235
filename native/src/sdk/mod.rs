//! An SDK for native plugins compiled into the host, in the shape of the proxy-wasm Rust SDK.
//!
//! A plugin implements the same traits with the same methods ([`Context`], [`RootContext`],
//! [`HttpContext`], [`StreamContext`]) and is declared with a [`NativePlugin`] whose set-up
//! function does what the SDK's `proxy_wasm::main!` block does. Porting a Wasm plugin:
//!
//! ```ignore
//! // proxy-wasm SDK                              // pwhost native SDK
//! use proxy_wasm::traits::*;                     use native::sdk::*;
//! use proxy_wasm::types::*;
//! use log::info;                                 use native::info;
//! proxy_wasm::main! {{                            pub const PLUGIN: NativePlugin =
//!     proxy_wasm::set_log_level(LogLevel::Info);     NativePlugin::new("my_plugin", |setup| {
//!     proxy_wasm::set_root_context(|_| ...);          setup.set_log_level(LogLevel::Info);
//! }}                                                  setup.set_root_context(|_| ...);
//!                                                 });
//! ```
//!
//! The host registers the plugin by name (`native:my_plugin`). Every VM of it gets its own
//! contexts; nothing is global, so any number of plugins and VMs share one binary. Host calls take
//! native pointers and 64-bit sizes and go through the same `abi` host functions as Wasm
//! plugins. A panic in a callback is caught and fails the VM, as a trap would.
//!
//! Not yet in this SDK: gRPC calls and streams, and foreign-function callbacks (calling foreign
//! functions is supported).

mod dispatcher;
mod hostcalls;
mod logger;
mod traits;
mod types;

pub use dispatcher::{NativePlugin, Setup};
pub use logger::log;
pub use traits::{set_log_level, Context, HttpContext, RootContext, StreamContext};
pub use types::{
    Action, BufferType, Bytes, ContextType, GrpcStatusCode, LogLevel, MapType, MetricType,
    NewHttpContext, NewRootContext, PeerType, Status, StreamType,
};

/// Metrics, as the SDK's `hostcalls::define_metric` and friends.
pub mod metrics {
    pub use super::hostcalls::{define_metric, get_metric, increment_metric, record_metric};
}
