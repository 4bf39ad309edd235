//! The null runtime: native code in place of a WebAssembly module.
//!
//! The counterpart of proxy-wasm-cpp-host's "null VM". A [`NativeModule`] describes native
//! functions as if they were a module's exports, and declares the host functions it may call as
//! imports; the runtime links and instantiates it through the same [`runtime_api`] traits as every
//! WebAssembly engine, so the Proxy-Wasm ABI runs on it unchanged.
//!
//! Native code calls host functions with [`call_host`], which finds the instance whose call is
//! running on this thread; native code that knows the host's state type may instead call the
//! host directly on that state with [`with_state`] (a typed fast path: no argument slots, no
//! data copied through the plugin's allocator). Guest "pointers" are native addresses
//! ([`runtime_api::GuestMemory::native`]): nothing is bounds-checked, no call can be interrupted
//! and no memory can be capped. Native plugins are trusted code, like the host itself; the
//! [`Capabilities`] this runtime reports say so, so that embedders can tell.
//!
//! This crate knows nothing of Proxy-Wasm: the native plugin SDK and the loader of proxy-wasm SDK
//! shared libraries live in `pwhost-native`.

mod frame;
mod instance;
mod module;
mod native;

use std::sync::Arc;

use runtime_api::{Capabilities, CompiledModule, Error, RuntimeConfig, WasmRuntime};

pub use frame::{call_host, in_instance_call, with_state};
pub use instance::NullInstance;
pub use module::{NullLinkedModule, NullModule};
pub use native::{NativeInstance, NativeModule};

/// The null runtime: runs [`NativeModule`]s, never WebAssembly.
pub struct NullRuntime {
    config: RuntimeConfig,
}

impl NullRuntime {
    /// A null runtime. `config`'s limits cannot be enforced on native code; they are kept only so
    /// [`NullRuntime::unenforced_limits`] can name them.
    pub fn new(config: RuntimeConfig) -> Result<Self, Error> {
        Ok(NullRuntime { config })
    }

    /// The limits `config` asked for that native code cannot be held to, as words for a warning.
    pub fn unenforced_limits(&self) -> Vec<&'static str> {
        self.config.unkept_by(WasmRuntime::<()>::capabilities(self))
    }

    /// Wraps a native module as a compiled module of this runtime, ready to link.
    pub fn load<S: Send + 'static>(
        &self,
        module: Arc<dyn NativeModule>,
    ) -> Arc<dyn CompiledModule<S>> {
        Arc::new(NullModule::new(module))
    }
}

impl<S: Send + 'static> WasmRuntime<S> for NullRuntime {
    fn name(&self) -> &'static str {
        "null"
    }

    fn capabilities(&self) -> Capabilities {
        // Native code runs on the host's own stack and address space: nothing can stop it,
        // cap its memory or check its pointers.
        Capabilities {
            interrupt: false,
            call_deadline: false,
            memory_limit: false,
            precompiled_modules: false,
            sandboxed: false,
        }
    }

    fn compile(&self, _wasm: &[u8]) -> Result<Arc<dyn CompiledModule<S>>, Error> {
        Err(Error::Unsupported(
            "running WebAssembly (the null runtime runs native plugins only)",
        ))
    }
}
