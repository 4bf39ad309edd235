//! The engines compiled into this build, by name.

use std::sync::Arc;

use abi::VmState;
use runtime_api::{RuntimeConfig, WasmRuntime};

/// The names of the engines compiled in, in preference order.
pub fn available() -> &'static [&'static str] {
    &[
        #[cfg(feature = "wasmtime")]
        "wasmtime",
    ]
}

/// The default engine: the first one compiled in.
pub fn default_name() -> Option<&'static str> {
    available().first().copied()
}

/// Creates the engine called `name` with `config`.
pub fn create(name: &str, config: RuntimeConfig) -> anyhow::Result<Arc<dyn WasmRuntime<VmState>>> {
    let _ = &config;
    match name {
        #[cfg(feature = "wasmtime")]
        "wasmtime" => Ok(Arc::new(runtime_wasmtime::WasmtimeRuntime::new(config)?)),
        other => anyhow::bail!(
            "unknown or not compiled-in runtime {other:?} (this build has: {})",
            available().join(", ")
        ),
    }
}
