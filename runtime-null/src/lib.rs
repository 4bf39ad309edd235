//! The null runtime: native functions in place of a WebAssembly module.

use std::sync::Arc;

use runtime_api::{Capabilities, CompiledModule, Error, RuntimeConfig, WasmRuntime};

/// The null runtime.
pub struct NullRuntime {
    config: RuntimeConfig,
}

impl NullRuntime {
    /// An engine with the given configuration.
    pub fn new(config: RuntimeConfig) -> Result<Self, Error> {
        Ok(NullRuntime { config })
    }
}

impl<S: Send + 'static> WasmRuntime<S> for NullRuntime {
    fn name(&self) -> &'static str {
        "null"
    }

    fn capabilities(&self) -> Capabilities {
        let _ = &self.config;
        Capabilities::default()
    }

    fn compile(&self, _wasm: &[u8]) -> Result<Arc<dyn CompiledModule<S>>, Error> {
        Err(Error::Unsupported("null (work in progress)"))
    }
}
