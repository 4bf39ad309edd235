//! What the crate's tests share: an engine (wasmtime) and the plugin corpus.

use std::path::Path;

use abi::SharedState;
use runtime_api::{RuntimeConfig, WasmRuntime};

use crate::{Code, Engines, LoadError, LoadOptions, Plugins};

/// Engines for tests: wasmtime, from the plugin corpus and WAT.
pub(crate) struct Wasmtime;

impl Engines for Wasmtime {
    fn available(&self) -> Vec<&'static str> {
        vec!["wasmtime"]
    }

    fn load(
        &self,
        _engine: &'static str,
        code: &Code,
        config: abi::PluginConfig,
        shared: SharedState,
    ) -> Result<abi::Plugin, String> {
        let Code::Wasm(wasm) = code else {
            return Err("wasm only".into());
        };
        let runtime = runtime_wasmtime::WasmtimeRuntime::new(RuntimeConfig::default())
            .map_err(|e| e.to_string())?;
        let runtime: &dyn WasmRuntime<abi::VmState> = &runtime;
        abi::Plugin::load(runtime, wasm, config, shared).map_err(|e| e.to_string())
    }
}

/// The built plugin corpus.
pub(crate) fn corpus() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist")
}

/// Loads a deployment from YAML, code from the corpus.
pub(crate) fn load(yaml: &str) -> Result<Plugins, LoadError> {
    let deployment = crate::parse(yaml).expect("valid configuration");
    let options = LoadOptions {
        base_dir: corpus(),
        ..LoadOptions::default()
    };
    Plugins::load(&deployment, &Wasmtime, &options, SharedState::new())
}
