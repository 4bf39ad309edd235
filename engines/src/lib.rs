//! The engines compiled into a pwhost build, by name: what the `pwhost` command and every proxy
//! integration (the Traffic Server plugin, `pwhost serve`) share, so that each of them offers the
//! same runtimes under the same names and loads native plugins the same way.
//!
//! * [`runtimes`]: the engines of this build (cargo features), created by pwhost name.
//! * [`plugins`]: loading a plugin from what a user names (a `.wasm` file, `native:NAME`, a
//!   proxy-wasm SDK shared library).
//! * [`BuildEngines`]: those engines as the `lifecycle` layer asks for them.

pub mod plugins;
pub mod runtimes;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use abi::VmState;
use lifecycle::Code;
use runtime_api::{RuntimeConfig, WasmRuntime};

/// This build's engines, as the `lifecycle` layer asks for them: each made once, on first use,
/// and shared by every plugin that runs on it.
pub struct BuildEngines {
    /// How every engine runs guests (deadline, memory cap).
    config: RuntimeConfig,
    made: Mutex<HashMap<&'static str, Arc<dyn WasmRuntime<VmState>>>>,
}

impl BuildEngines {
    /// This build's engines, each to run guests as `config` says.
    pub fn new(config: RuntimeConfig) -> BuildEngines {
        BuildEngines {
            config,
            made: Mutex::default(),
        }
    }
}

impl lifecycle::Engines for BuildEngines {
    /// Warns of the limits this build's engines were given (call deadline, interruption,
    /// memory cap) that a plugin's engine cannot keep.
    fn unenforced_limits(&self, plugins: &lifecycle::Plugins) -> Vec<String> {
        let mut warnings = Vec::new();
        let all = plugins
            .http_filters()
            .chain(plugins.network_filters())
            .chain(plugins.services());
        for plugin in all {
            let module = plugins.module(plugin);
            let limits = self.config.unkept_by(module.capabilities());
            if !limits.is_empty() {
                warnings.push(format!(
                    "plugin {:?}: the {} runtime cannot keep the {} set for plugins: its code \
                     runs without them",
                    plugins.config(plugin).display_name(),
                    module.runtime_name(),
                    limits.join(" or the ")
                ));
            }
        }
        warnings
    }

    fn available(&self) -> Vec<&'static str> {
        runtimes::available().to_vec()
    }

    fn runtime(&self, engine: &'static str) -> Result<Arc<dyn WasmRuntime<VmState>>, String> {
        // A poisoned lock only means another load panicked; the map is still whole.
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(runtime) = made.get(engine) {
            return Ok(Arc::clone(runtime));
        }
        let runtime = runtimes::create(engine, self.config.clone()).map_err(|e| e.to_string())?;
        made.insert(engine, Arc::clone(&runtime));
        Ok(runtime)
    }

    fn load_native(
        &self,
        runtime: &dyn WasmRuntime<VmState>,
        code: &Code,
        config: abi::PluginConfig,
        shared: abi::SharedState,
    ) -> Result<abi::Plugin, String> {
        let loaded = match code {
            Code::NativeName(name) => plugins::load(
                runtime,
                &format!("{}{name}", plugins::NATIVE_PREFIX),
                config,
                shared,
            ),
            Code::NativeLibrary { path, bytes, .. } => {
                plugins::load_library(runtime, path, Arc::clone(bytes), config, shared)
            }
            Code::Wasm(wasm) => {
                abi::Plugin::load(runtime, wasm, config, shared).map_err(anyhow::Error::from)
            }
        };
        loaded.map_err(|e| format!("{e:#}"))
    }
}
