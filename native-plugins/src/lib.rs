//! The corpus's Rust plugins compiled into pwhost, from their own unchanged sources
//! (`plugins/rust/NAME/src/lib.rs`, which the corpus also builds to Wasm and to SDK libraries),
//! each registered by name for `--plugin native:NAME`.
//!
//! The sources are written against the crates.io `proxy-wasm` SDK and the `log` crate; here both
//! names stand for pwhost's native SDK, whose crate root answers to the same paths (raw `proxy_*`
//! imports, as `abi_coverage` declares, bind to pwhost's exported host functions). Left out:
//! `wasi_calls`, which is about the WASI imports of a Wasm build.

// The names the plugin sources use for the SDK and for the `log` macros.
extern crate native as log;
extern crate native as proxy_wasm;

use native::sdk::NativePlugin;

#[path = "../../plugins/rust/abi_coverage/src/lib.rs"]
mod abi_coverage;
#[path = "../../plugins/rust/body_rewrite/src/lib.rs"]
mod body_rewrite;
#[path = "../../plugins/rust/chain_probe/src/lib.rs"]
mod chain_probe;
#[path = "../../plugins/rust/envoy_attributes/src/lib.rs"]
mod envoy_attributes;
#[path = "../../plugins/rust/envoy_foreign/src/lib.rs"]
mod envoy_foreign;
#[path = "../../plugins/rust/envoy_rules/src/lib.rs"]
mod envoy_rules;
#[path = "../../plugins/rust/foreign_call/src/lib.rs"]
mod foreign_call;
#[path = "../../plugins/rust/grpc_call/src/lib.rs"]
mod grpc_call;
#[path = "../../plugins/rust/grpc_stream/src/lib.rs"]
mod grpc_stream;
#[path = "../../plugins/rust/http_call/src/lib.rs"]
mod http_call;
#[path = "../../plugins/rust/http_headers/src/lib.rs"]
mod http_headers;
#[path = "../../plugins/rust/lifecycle_bench/src/lib.rs"]
mod lifecycle_bench;
#[path = "../../plugins/rust/local_response/src/lib.rs"]
mod local_response;
#[path = "../../plugins/rust/metrics/src/lib.rs"]
mod metrics;
#[path = "../../plugins/rust/panics/src/lib.rs"]
mod panics;
#[path = "../../plugins/rust/plugin_config/src/lib.rs"]
mod plugin_config;
#[path = "../../plugins/rust/properties/src/lib.rs"]
mod properties;
#[path = "../../plugins/rust/root_http_call/src/lib.rs"]
mod root_http_call;
#[path = "../../plugins/rust/shared_data/src/lib.rs"]
mod shared_data;
#[path = "../../plugins/rust/shared_queue/src/lib.rs"]
mod shared_queue;
#[path = "../../plugins/rust/tcp_filter/src/lib.rs"]
mod tcp_filter;
#[path = "../../plugins/rust/timers/src/lib.rs"]
mod timers;

/// Every compiled-in plugin.
pub const PLUGINS: &[NativePlugin] = &[
    abi_coverage::PLUGIN,
    body_rewrite::PLUGIN,
    chain_probe::PLUGIN,
    envoy_attributes::PLUGIN,
    envoy_foreign::PLUGIN,
    envoy_rules::PLUGIN,
    foreign_call::PLUGIN,
    grpc_call::PLUGIN,
    grpc_stream::PLUGIN,
    http_call::PLUGIN,
    http_headers::PLUGIN,
    lifecycle_bench::PLUGIN,
    local_response::PLUGIN,
    metrics::PLUGIN,
    panics::PLUGIN,
    plugin_config::PLUGIN,
    properties::PLUGIN,
    root_http_call::PLUGIN,
    shared_data::PLUGIN,
    shared_queue::PLUGIN,
    tcp_filter::PLUGIN,
    timers::PLUGIN,
];

/// The compiled-in plugin called `name`.
pub fn find(name: &str) -> Option<NativePlugin> {
    PLUGINS.iter().find(|p| p.name() == name).copied()
}
