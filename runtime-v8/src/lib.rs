//! [V8](https://v8.dev), as Debian ships it in libnode, behind [`runtime_api::WasmRuntime`].

use std::sync::Arc;

use runtime_api::{Capabilities, CompiledModule, Error, RuntimeConfig, WasmRuntime};

/// The V8 engine.
pub struct V8Runtime {
    config: RuntimeConfig,
}

impl V8Runtime {
    /// An engine with the given configuration.
    pub fn new(config: RuntimeConfig) -> Result<Self, Error> {
        Ok(V8Runtime { config })
    }
}

impl<S: Send + 'static> WasmRuntime<S> for V8Runtime {
    fn name(&self) -> &'static str {
        "v8"
    }

    fn capabilities(&self) -> Capabilities {
        let _ = &self.config;
        Capabilities::default()
    }

    fn compile(&self, _wasm: &[u8]) -> Result<Arc<dyn CompiledModule<S>>, Error> {
        Err(Error::Unsupported("v8 (work in progress)"))
    }
}
