//! An SDK for native plugins compiled into the host, in the shape of the proxy-wasm Rust SDK.
//!
//! A plugin implements the same traits with the same methods ([`Context`], [`RootContext`],
//! [`HttpContext`], [`StreamContext`]) and declares itself in a [`main!`](crate::main) block that
//! calls [`set_log_level`], [`set_root_context`] or [`set_http_context`], as with the SDK. The
//! crate root answers to the SDK's paths (`traits`, `types`, `hostcalls`, `main!`, `set_*`, and
//! the `log` crate's `trace!`…`error!`), so a plugin's unmodified source compiles natively once
//! the names `proxy_wasm` and `log` stand for this crate:
//!
//! ```ignore
//! // lib.rs of the crate that compiles plugins in (see native-plugins):
//! extern crate native as proxy_wasm;
//! extern crate native as log;
//!
//! #[path = "../../plugins/rust/http_headers/src/lib.rs"]
//! mod http_headers;   // the plugin's own source: `proxy_wasm::main! {{ ... }}` there
//!                     // declares `http_headers::PLUGIN`, registered as `native:http_headers`
//! ```
//!
//! Every VM of a plugin gets its own contexts; nothing is global, so any number of plugins and
//! VMs share one binary. Host calls take native pointers and 64-bit sizes and go through the same
//! `abi` host functions as Wasm plugins. A panic in a callback is caught and fails the VM, as a
//! trap would. One difference from the Wasm SDK: contexts must be `Send`, since a VM may move
//! between threads (`Arc` where a Wasm plugin would use `Rc`).
//!
//! Every trait method of the proxy-wasm Rust SDK 0.2.5 is here, gRPC calls and streams and
//! foreign-function callbacks included.

mod dispatcher;
pub mod hostcalls;
mod logger;
pub mod traits;
pub mod types;

pub use dispatcher::{set_http_context, set_root_context, NativePlugin};
pub use logger::log;
pub use traits::{set_log_level, Context, HttpContext, RootContext, StreamContext};
pub use types::{
    Action, BufferType, Bytes, ContextType, GrpcStatusCode, LogLevel, MapType, MetricType,
    NewHttpContext, NewRootContext, PeerType, Status, StreamType,
};

/// Declares the plugin of this module, as the SDK's `proxy_wasm::main!`: the block runs when a VM
/// of the plugin starts and calls [`set_log_level`], [`set_root_context`] or
/// [`set_http_context`]. It expands to `pub const PLUGIN: NativePlugin`, named after the module.
#[macro_export]
macro_rules! main {
    ($code:block) => {
        /// This module's plugin, registered by the module's name (`native:NAME`).
        pub const PLUGIN: $crate::sdk::NativePlugin =
            $crate::sdk::NativePlugin::new(::core::module_path!(), || $code);
    };
}
