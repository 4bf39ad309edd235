//! Plugins as a proxy runs them, over [`abi`]: the layer Envoy and Traffic Server get from
//! proxy-wasm-cpp-host's `wasm.cc`. It knows no engine (the embedder hands it the engines it
//! has) and no proxy.
//!
//! * [`config`]: Envoy's and Traffic Server's plugin configurations, parsed strictly.
//! * [`runtime_name`]: which engine a configured runtime name stands for.
//! * [`code`]: a plugin's code, and the [`VmKey`] plugins share a VM by.
//! * [`compiled`]: precompiled sections in modules and the compilation cache on disk.
//! * [`plugins`]: a deployment loaded ([`Plugins`]) and run on worker threads ([`Worker`]): VM
//!   sharing, per-thread copies, failure policies and their counters.
//! * [`reconfigure`]: configuration updates while traffic flows ([`LivePlugins`],
//!   [`ThreadWorkers`]).
//! * [`remote`]: remote code, fetched, checked and cached by sha256.
//! * [`services`]: singleton services, each in one VM on a thread of its own.

pub mod code;
pub mod compiled;
pub mod config;
pub mod files;
pub mod plugins;
pub mod reconfigure;
pub mod remote;
pub mod runtime_name;
pub mod services;
#[cfg(test)]
mod test_support;

pub use code::{abi_config, Code, CodeError, VmKey, MAX_NATIVE_LIBRARY_BYTES};
pub use compiled::{CompilationCache, CompiledFrom};
pub use config::{
    parse, CodeSource, ConfigError, Deployment, Environment, FailurePolicy, PluginConfig,
    RemoteCode, VmConfig, WasmService,
};
pub use plugins::{
    fail_stream_details, failing_plugin, grpc_status_of_http, Admission, CopyId, Counters, Engines,
    LoadError, LoadOptions, OnFailure, PluginId, Plugins, StartFailure, StartStep, StreamVm,
    Worker, FAIL_STREAM_DETAILS, FAIL_STREAM_GRPC_STATUS,
};
pub use reconfigure::{Generation, LivePlugins, ThreadWorkers, WorkerFactory};
pub use remote::{CodeCache, FetchError};
pub use services::{
    AfterCallback, AfterError, ServiceEnd, ServiceInbox, SingletonService, SpawnError, Ticking,
    VmWork,
};
