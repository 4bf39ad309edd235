//! What the crate's tests share: an engine (wasmtime) and the plugin corpus.

use std::path::Path;

use std::sync::Arc;

use abi::{SharedState, VmState};
use runtime_api::{RuntimeConfig, WasmRuntime};

use crate::{Engines, LoadError, LoadOptions, Plugins};

/// Engines for tests: wasmtime, from the plugin corpus and WAT.
pub(crate) struct Wasmtime;

impl Engines for Wasmtime {
    fn available(&self) -> Vec<&'static str> {
        vec!["wasmtime"]
    }

    fn runtime(&self, _engine: &'static str) -> Result<Arc<dyn WasmRuntime<VmState>>, String> {
        let runtime = runtime_wasmtime::WasmtimeRuntime::new(RuntimeConfig::default())
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(runtime))
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
