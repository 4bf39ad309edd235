//! The [WebAssembly Micro Runtime](https://github.com/bytecodealliance/wasm-micro-runtime) behind [`runtime_api::WasmRuntime`].

use std::sync::Arc;

use runtime_api::{Capabilities, CompiledModule, Error, RuntimeConfig, WasmRuntime};

/// The WAMR fast interpreter.
pub struct WamrRuntime {
    config: RuntimeConfig,
}

impl WamrRuntime {
    /// An engine with the given configuration.
    pub fn new(config: RuntimeConfig) -> Result<Self, Error> {
        Ok(WamrRuntime { config })
    }
}

impl<S: Send + 'static> WasmRuntime<S> for WamrRuntime {
    fn name(&self) -> &'static str {
        "wamr"
    }

    fn capabilities(&self) -> Capabilities {
        let _ = &self.config;
        Capabilities::default()
    }

    fn compile(&self, _wasm: &[u8]) -> Result<Arc<dyn CompiledModule<S>>, Error> {
        Err(Error::Unsupported("wamr (work in progress)"))
    }
}
