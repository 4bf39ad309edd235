//! The [wasmer](https://wasmer.io) engine behind [`runtime_api::WasmRuntime`].

use std::sync::Arc;

use runtime_api::{Capabilities, CompiledModule, Error, RuntimeConfig, WasmRuntime};

/// Which wasmer compiler translates modules to machine code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compiler {
    /// Cranelift: fast compile, good code.
    #[cfg(feature = "cranelift")]
    Cranelift,
    /// Singlepass: linear-time compile, slower code.
    #[cfg(feature = "singlepass")]
    Singlepass,
    /// LLVM: slow compile, the fastest code.
    #[cfg(feature = "llvm")]
    Llvm,
}

/// The wasmer engine.
pub struct WasmerRuntime {
    config: RuntimeConfig,
}

impl WasmerRuntime {
    /// An engine with the given configuration.
    pub fn new(compiler: Compiler, config: RuntimeConfig) -> Result<Self, Error> {
        let _ = compiler;
        Ok(WasmerRuntime { config })
    }
}

impl<S: Send + 'static> WasmRuntime<S> for WasmerRuntime {
    fn name(&self) -> &'static str {
        "wasmer"
    }

    fn capabilities(&self) -> Capabilities {
        let _ = &self.config;
        Capabilities::default()
    }

    fn compile(&self, _wasm: &[u8]) -> Result<Arc<dyn CompiledModule<S>>, Error> {
        Err(Error::Unsupported("wasmer (work in progress)"))
    }
}
