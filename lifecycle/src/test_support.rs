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

    fn runtime(&self, engine: &'static str) -> Result<Arc<dyn WasmRuntime<VmState>>, String> {
        WasmtimeWith(RuntimeConfig::default()).runtime(engine)
    }
}

/// Wasmtime run as the configuration says (e.g. with a call deadline).
pub(crate) struct WasmtimeWith(pub(crate) RuntimeConfig);

impl Engines for WasmtimeWith {
    fn available(&self) -> Vec<&'static str> {
        vec!["wasmtime"]
    }

    fn runtime(&self, _engine: &'static str) -> Result<Arc<dyn WasmRuntime<VmState>>, String> {
        let runtime =
            runtime_wasmtime::WasmtimeRuntime::new(self.0.clone()).map_err(|e| e.to_string())?;
        Ok(Arc::new(runtime))
    }
}

/// The built plugin corpus.
pub(crate) fn corpus() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist")
}

/// Loads a deployment from YAML, code from the corpus.
pub(crate) fn load(yaml: &str) -> Result<Plugins, LoadError> {
    load_on(yaml, &Wasmtime, SharedState::new())
}

/// Loads a deployment from YAML on `engines`, code from the corpus, its plugins sharing
/// `shared`.
pub(crate) fn load_on(
    yaml: &str,
    engines: &dyn Engines,
    shared: SharedState,
) -> Result<Plugins, LoadError> {
    let deployment = crate::parse(yaml).expect("valid configuration");
    Plugins::load(&deployment, engines, &corpus_options(), shared)
}

/// Load options taking code files from the corpus.
pub(crate) fn corpus_options() -> LoadOptions {
    LoadOptions {
        base_dir: corpus(),
        ..LoadOptions::default()
    }
}

/// `plugins/wat/<name>.wat` compiled, in base64 for `local.inline_bytes`.
pub(crate) fn wat_base64(name: &str) -> String {
    use base64::Engine as _;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../plugins/wat/{name}.wat"));
    let wasm = wat::parse_file(&path).expect("a valid WAT test plugin");
    base64::engine::general_purpose::STANDARD.encode(wasm)
}
