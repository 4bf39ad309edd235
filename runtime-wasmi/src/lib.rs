//! The [wasmi](https://github.com/wasmi-labs/wasmi) interpreter behind [`runtime_api::WasmRuntime`].

use std::sync::Arc;

use runtime_api::{Capabilities, CompiledModule, Error, RuntimeConfig, WasmRuntime};

/// The wasmi interpreter.
pub struct WasmiRuntime {
    config: RuntimeConfig,
}

impl WasmiRuntime {
    /// An engine with the given configuration.
    pub fn new(config: RuntimeConfig) -> Result<Self, Error> {
        Ok(WasmiRuntime { config })
    }
}

impl<S: Send + 'static> WasmRuntime<S> for WasmiRuntime {
    fn name(&self) -> &'static str {
        "wasmi"
    }

    fn capabilities(&self) -> Capabilities {
        let _ = &self.config;
        Capabilities::default()
    }

    fn compile(&self, _wasm: &[u8]) -> Result<Arc<dyn CompiledModule<S>>, Error> {
        Err(Error::Unsupported("wasmi (work in progress)"))
    }
}
