//! Native plugins compiled into pwhost: corpus plugins ported from the proxy-wasm Rust SDK to
//! `native::sdk` (compare `plugins/rust/NAME/src/lib.rs`: the port changes only the `use` lines
//! and the registration), each registered by name for `--plugin native:NAME`.

use native::sdk::NativePlugin;

mod http_headers;
mod lifecycle_bench;
mod local_response;

/// Every compiled-in plugin.
pub const PLUGINS: &[NativePlugin] = &[
    http_headers::PLUGIN,
    lifecycle_bench::PLUGIN,
    local_response::PLUGIN,
];

/// The compiled-in plugin called `name`.
pub fn find(name: &str) -> Option<NativePlugin> {
    PLUGINS.iter().find(|p| p.name() == name).copied()
}
