//! Loading a plugin: compile, check its ABI and exports, link the host functions once.

use std::sync::Arc;

use runtime_api::{
    Capabilities, CompiledModule, ExternKind, LinkedModule, Signature, ValType, WasmRuntime,
};

use crate::callbacks::{CALLBACKS, CALLBACK_COUNT};
use crate::exports::host_functions;
use crate::{AbiVersion, SharedState, VmState};

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The engine rejected the module, or linking failed.
    #[error(transparent)]
    Runtime(#[from] runtime_api::Error),
    /// The module exports no `proxy_abi_version_*` marker.
    #[error("module declares no Proxy-Wasm ABI version (no proxy_abi_version_* export)")]
    MissingAbiVersion,
    /// The module exports a marker for a version this host does not implement.
    #[error("unsupported Proxy-Wasm ABI version marker {0} (supported: 0.1.0, 0.2.0, 0.2.1)")]
    UnknownAbiVersion(String),
    /// The module exports markers of two different versions.
    #[error("module declares two Proxy-Wasm ABI versions, {0} and {1}")]
    ConflictingAbiVersions(AbiVersion, AbiVersion),
    /// The module exports no linear memory called `memory`.
    #[error("module exports no linear memory named \"memory\"")]
    MissingMemory,
    /// The module exports no allocator the host can use to return data.
    #[error("module exports neither proxy_on_memory_allocate nor malloc, so the host cannot return data to it")]
    MissingAllocator,
    /// An export the ABI calls has the wrong type.
    #[error("export {name} has type {found}, but ABI {abi} requires {expected}")]
    BadExport {
        /// The export's name.
        name: String,
        /// The type the ABI requires (or the types it accepts, joined with "or").
        expected: String,
        /// The module's type.
        found: String,
        /// The module's ABI version.
        abi: AbiVersion,
    },
}

/// Who a plugin is, and the configuration it is given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginConfig {
    /// The plugin's name (property `plugin_name`).
    pub name: String,
    /// The root id that selects the plugin's root context in the module (property
    /// `plugin_root_id`).
    pub root_id: String,
    /// The VM id that scopes shared data and queues (property `plugin_vm_id`).
    pub vm_id: String,
    /// The VM configuration, read by `proxy_on_vm_start`.
    pub vm_configuration: Vec<u8>,
    /// The plugin configuration, read by `proxy_on_configure`.
    pub plugin_configuration: Vec<u8>,
    /// Envoy's `capability_restriction_config.allowed_capabilities`: when set and not empty,
    /// only these host functions (`proxy_log`, `fd_write`, ...) and callbacks
    /// (`proxy_on_request_headers`, ...) are the plugin's. Any other `proxy_*` host function
    /// logs an error and returns `INTERNAL_FAILURE`, any other WASI function returns
    /// `ENOTCAPABLE`, and any other callback is never called, as in proxy-wasm-cpp-host. The
    /// allocator and the module's start functions are always allowed.
    pub allowed_capabilities: Option<std::collections::BTreeSet<String>>,
    /// Environment variables visible through WASI `environ_get`; nothing else of the host's
    /// environment is exposed.
    pub environment: Vec<(String, String)>,
    /// Let `StopIteration` from a header callback stop only the headers, so body chunks and
    /// trailers still reach the plugin (Envoy's `allow_on_headers_stop_iteration`). Off by
    /// default, as in Envoy: the host then treats it as `StopAllIterationAndWatermark`.
    pub allow_on_headers_stop_iteration: bool,
}

/// One plugin of a VM: what selects and configures its root context. A VM runs one root
/// context per plugin sharing it (see [`crate::Vm::add_root`]); each gets its own name, root
/// id and configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RootConfig {
    /// The plugin's name (property `plugin_name`).
    pub name: String,
    /// The root id that selects the plugin's root context in the module (property
    /// `plugin_root_id`).
    pub root_id: String,
    /// The plugin configuration, read by `proxy_on_configure`.
    pub plugin_configuration: Vec<u8>,
    /// Envoy's `allow_on_headers_stop_iteration` for this plugin's streams (see
    /// [`PluginConfig::allow_on_headers_stop_iteration`]).
    pub allow_on_headers_stop_iteration: bool,
}

impl PluginConfig {
    /// The configuration of the plugin's own root context.
    pub fn root(&self) -> RootConfig {
        RootConfig {
            name: self.name.clone(),
            root_id: self.root_id.clone(),
            plugin_configuration: self.plugin_configuration.clone(),
            allow_on_headers_stop_iteration: self.allow_on_headers_stop_iteration,
        }
    }
}

/// A plugin compiled and linked once; create any number of [`crate::Vm`]s from it, on any thread.
/// Cloning it is cheap: clones share the compiled module and the shared state.
#[derive(Clone)]
pub struct Plugin {
    pub(crate) linked: Arc<dyn LinkedModule<VmState>>,
    pub(crate) abi: AbiVersion,
    /// How many parameters each callback the module exports takes (its type was checked at
    /// load; 0.1.0 header callbacks come in two shapes); `None` for one it does not export or
    /// that its ABI version does not have.
    pub(crate) callback_params: [Option<usize>; CALLBACK_COUNT],
    pub(crate) config: Arc<PluginConfig>,
    pub(crate) shared: SharedState,
    pub(crate) runtime: &'static str,
    pub(crate) capabilities: Capabilities,
    /// This process's number for the linked module (shared by clones and
    /// [`Plugin::with_config`]): with the VM id, what owns the VM's metric ids.
    pub(crate) module_serial: u64,
}

/// The number the next linked module gets (see [`Plugin::module_serial`]).
static NEXT_MODULE_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Plugin {
    /// Compiles `wasm` with `runtime`, checks it is a Proxy-Wasm module this host can run, and
    /// links the host functions of its ABI version.
    pub fn load(
        runtime: &dyn WasmRuntime<VmState>,
        wasm: &[u8],
        config: PluginConfig,
        shared: SharedState,
    ) -> Result<Plugin, LoadError> {
        let module = runtime.compile(wasm)?;
        Self::from_module(runtime, module, config, shared)
    }

    /// As [`Plugin::load`], for a module the caller compiled (or loaded precompiled).
    pub fn from_module(
        runtime: &dyn WasmRuntime<VmState>,
        module: Arc<dyn CompiledModule<VmState>>,
        config: PluginConfig,
        shared: SharedState,
    ) -> Result<Plugin, LoadError> {
        let abi = AbiVersion::detect(module.exports())?;
        let callback_params = check_exports(&*module, abi)?;
        let linked = module.link(host_functions(abi))?;
        Ok(Plugin {
            linked,
            abi,
            callback_params,
            config: Arc::new(config),
            shared,
            runtime: runtime.name(),
            capabilities: runtime.capabilities(),
            module_serial: NEXT_MODULE_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// This plugin's compiled module with another configuration: for a plugin that shares the
    /// code but needs VMs of its own (e.g. a singleton service with the filters' VM key).
    pub fn with_config(&self, config: PluginConfig) -> Plugin {
        Plugin {
            config: Arc::new(config),
            ..self.clone()
        }
    }

    /// Whether `other` runs the same compiled, linked module (a clone, or
    /// [`Plugin::with_config`] of this one).
    pub fn shares_module_with(&self, other: &Plugin) -> bool {
        Arc::ptr_eq(&self.linked, &other.linked)
    }

    /// The module's ABI version.
    pub fn abi_version(&self) -> AbiVersion {
        self.abi
    }

    /// The plugin's configuration.
    pub fn config(&self) -> &PluginConfig {
        &self.config
    }

    /// The name of the engine the plugin runs on.
    pub fn runtime_name(&self) -> &'static str {
        self.runtime
    }

    /// What that engine can do.
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// The shared data and metrics this plugin's VMs use.
    pub fn shared_state(&self) -> &SharedState {
        &self.shared
    }
}

const ALLOCATOR: Signature = Signature::new(&[ValType::I32], &[ValType::I32]);

/// Checks the module's memory, allocator and callbacks; returns each callback's parameter count.
fn check_exports(
    module: &dyn CompiledModule<VmState>,
    abi: AbiVersion,
) -> Result<[Option<usize>; CALLBACK_COUNT], LoadError> {
    let exports = module.exports();
    let function_type = |name: &str| {
        exports
            .iter()
            .find(|e| e.name == name)
            .map(|e| match &e.kind {
                ExternKind::Function(ty) => Ok(ty.clone()),
                other => Err(other.describe().to_string()),
            })
    };
    if !exports
        .iter()
        .any(|e| e.name == "memory" && e.kind == ExternKind::Memory)
    {
        return Err(LoadError::MissingMemory);
    }
    let mut has_allocator = false;
    for name in ["proxy_on_memory_allocate", "malloc"] {
        match function_type(name) {
            Some(Ok(ty)) if ALLOCATOR.matches(&ty) => has_allocator = true,
            Some(Ok(ty)) if name == "proxy_on_memory_allocate" => {
                return Err(LoadError::BadExport {
                    name: name.into(),
                    expected: ALLOCATOR.to_string(),
                    found: ty.to_string(),
                    abi,
                })
            }
            _ => {}
        }
    }
    if !has_allocator {
        return Err(LoadError::MissingAllocator);
    }
    let mut params = [None; CALLBACK_COUNT];
    for (callback, params) in CALLBACKS.iter().zip(&mut params) {
        if !callback.in_abi(abi) {
            continue;
        }
        let accepted = callback.signatures(abi);
        let found = match function_type(callback.name) {
            None => continue,
            Some(Ok(ty)) => match accepted.iter().find(|s| s.matches(&ty)) {
                Some(signature) => {
                    *params = Some(signature.params.len());
                    continue;
                }
                None => ty.to_string(),
            },
            Some(Err(kind)) => kind,
        };
        let expected: Vec<String> = accepted.iter().map(ToString::to_string).collect();
        return Err(LoadError::BadExport {
            name: callback.name.into(),
            expected: expected.join(" or "),
            found,
            abi,
        });
    }
    Ok(params)
}

/// Whether `name` is something `allowed_capabilities` can name: a callback or a host function
/// (WASI's included) of some Proxy-Wasm ABI version, or an allocator or start function (always
/// allowed). Any other name allows nothing, so a configuration naming one is most likely
/// misspelt.
pub fn is_capability(name: &str) -> bool {
    const ALWAYS_ALLOWED: [&str; 5] = [
        "proxy_on_memory_allocate",
        "malloc",
        "_initialize",
        "_start",
        "main",
    ];
    let versions = [AbiVersion::V0_1_0, AbiVersion::V0_2_0, AbiVersion::V0_2_1];
    ALWAYS_ALLOWED.contains(&name)
        || versions.into_iter().any(|abi| {
            crate::callbacks::callback_exports(abi).any(|(callback, _)| callback == name)
                || crate::exports::host_functions(abi)
                    .iter()
                    .any(|function| function.name == name)
        })
}
