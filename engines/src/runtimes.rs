//! The engines compiled into this build, by name.

use std::sync::Arc;

use abi::VmState;
use runtime_api::{RuntimeConfig, WasmRuntime};

/// The names of the engines compiled in, in preference order.
pub fn available() -> &'static [&'static str] {
    &[
        #[cfg(feature = "wasmtime")]
        "wasmtime",
        #[cfg(feature = "wasmer-cranelift")]
        "wasmer-cranelift",
        #[cfg(feature = "wasmer-singlepass")]
        "wasmer-singlepass",
        #[cfg(feature = "wasmer-llvm")]
        "wasmer-llvm",
        #[cfg(feature = "wasmi")]
        "wasmi",
        #[cfg(feature = "wamr")]
        "wamr",
        #[cfg(feature = "v8")]
        "v8",
        #[cfg(feature = "null")]
        "null",
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
        #[cfg(feature = "wasmer-cranelift")]
        "wasmer-cranelift" => Ok(Arc::new(runtime_wasmer::WasmerRuntime::new(
            runtime_wasmer::Compiler::Cranelift,
            config,
        )?)),
        #[cfg(feature = "wasmer-singlepass")]
        "wasmer-singlepass" => Ok(Arc::new(runtime_wasmer::WasmerRuntime::new(
            runtime_wasmer::Compiler::Singlepass,
            config,
        )?)),
        #[cfg(feature = "wasmer-llvm")]
        "wasmer-llvm" => Ok(Arc::new(runtime_wasmer::WasmerRuntime::new(
            runtime_wasmer::Compiler::Llvm,
            config,
        )?)),
        #[cfg(feature = "wasmi")]
        "wasmi" => Ok(Arc::new(runtime_wasmi::WasmiRuntime::new(config)?)),
        #[cfg(feature = "wamr")]
        "wamr" => Ok(Arc::new(runtime_wamr::WamrRuntime::new(config)?)),
        #[cfg(feature = "v8")]
        "v8" => Ok(Arc::new(runtime_v8::V8Runtime::new(config)?)),
        #[cfg(feature = "null")]
        "null" => Ok(Arc::new(runtime_null::NullRuntime::new(config)?)),
        other => anyhow::bail!(
            "unknown or not compiled-in runtime {other:?} (this build has: {})",
            available().join(", ")
        ),
    }
}
