//! Loading a plugin from what the user names: a WebAssembly file, a compiled-in native plugin
//! (`native:NAME`) or a native proxy-wasm SDK library (`.so`), on a given engine.

use std::path::Path;

use abi::{Plugin, PluginConfig, SharedState, VmState};
use anyhow::Context as _;
use runtime_api::WasmRuntime;

/// The prefix naming a compiled-in native plugin.
pub const NATIVE_PREFIX: &str = "native:";

/// Whether `plugin` names native code (a compiled-in plugin or a shared library), which only the
/// `null` runtime runs.
pub fn is_native(plugin: &str) -> bool {
    plugin.starts_with(NATIVE_PREFIX)
        || Path::new(plugin)
            .extension()
            .is_some_and(|e| e == "so" || e == "dylib")
}

/// The names of the compiled-in native plugins.
pub fn native_plugins() -> Vec<&'static str> {
    #[cfg(feature = "null")]
    {
        native_plugins::PLUGINS.iter().map(|p| p.name()).collect()
    }
    #[cfg(not(feature = "null"))]
    {
        Vec::new()
    }
}

/// Loads `plugin` on `runtime`.
pub fn load(
    runtime: &dyn WasmRuntime<VmState>,
    plugin: &str,
    config: PluginConfig,
    shared: SharedState,
) -> anyhow::Result<Plugin> {
    if runtime.name() == "null" {
        return load_native(runtime, plugin, config, shared);
    }
    if is_native(plugin) {
        anyhow::bail!("{plugin} is native code, which only the null runtime runs (--runtime null)");
    }
    let wasm = lifecycle::files::read_regular_file(Path::new(plugin))
        .with_context(|| format!("cannot read plugin {plugin}"))?;
    Ok(Plugin::load(runtime, &wasm, config, shared)?)
}

#[cfg(feature = "null")]
fn load_native(
    runtime: &dyn WasmRuntime<VmState>,
    plugin: &str,
    config: PluginConfig,
    shared: SharedState,
) -> anyhow::Result<Plugin> {
    let native: std::sync::Arc<dyn runtime_null::NativeModule> = if let Some(name) =
        plugin.strip_prefix(NATIVE_PREFIX)
    {
        native_plugins::find(name)
            .with_context(|| {
                format!(
                    "no compiled-in native plugin {name:?} (this build has: {})",
                    native_plugins().join(", ")
                )
            })?
            .module()
    } else if !plugin.ends_with(".wasm") {
        // Read as a configuration's library is: a regular file (a FIFO would block for
        // ever, `/dev/zero` fill memory), at most the library limit.
        let path = Path::new(plugin);
        let bytes =
            lifecycle::files::read_regular_file_up_to(path, lifecycle::MAX_NATIVE_LIBRARY_BYTES)
                .with_context(|| format!("cannot read {plugin}"))?;
        // SAFETY: the user asked to run this library; native plugins are trusted code (the
        // null runtime's trust model, stated in the README and `pwhost run --help`).
        std::sync::Arc::new(unsafe {
            native::SdkLibrary::from_bytes(path, std::sync::Arc::new(bytes))
        }?)
    } else {
        anyhow::bail!(
            "the null runtime runs native plugins (native:NAME or a .so built with the \
                 proxy-wasm SDK), not {plugin}"
        );
    };
    let module = std::sync::Arc::new(runtime_null::NullModule::new(native));
    Ok(Plugin::from_module(runtime, module, config, shared)?)
}

/// Loads the native plugin library read from `path` (its `bytes`) on `runtime`, the null
/// runtime.
#[cfg(feature = "null")]
pub fn load_library(
    runtime: &dyn WasmRuntime<VmState>,
    path: &Path,
    bytes: std::sync::Arc<Vec<u8>>,
    config: PluginConfig,
    shared: SharedState,
) -> anyhow::Result<Plugin> {
    anyhow::ensure!(
        runtime.name() == "null",
        "{} is native code, which only the null runtime runs",
        path.display()
    );
    // SAFETY: as in `load_native`: native plugins are trusted code.
    let library = unsafe { native::SdkLibrary::from_bytes(path, bytes) }?;
    let module = std::sync::Arc::new(runtime_null::NullModule::new(std::sync::Arc::new(library)));
    Ok(Plugin::from_module(runtime, module, config, shared)?)
}

/// Without the null runtime, no native library loads.
#[cfg(not(feature = "null"))]
pub fn load_library(
    _runtime: &dyn WasmRuntime<VmState>,
    path: &Path,
    _bytes: std::sync::Arc<Vec<u8>>,
    _config: PluginConfig,
    _shared: SharedState,
) -> anyhow::Result<Plugin> {
    anyhow::bail!(
        "cannot load {}: this build has no null runtime",
        path.display()
    )
}

#[cfg(not(feature = "null"))]
fn load_native(
    _runtime: &dyn WasmRuntime<VmState>,
    plugin: &str,
    _config: PluginConfig,
    _shared: SharedState,
) -> anyhow::Result<Plugin> {
    anyhow::bail!("cannot load {plugin}: this build has no null runtime")
}
