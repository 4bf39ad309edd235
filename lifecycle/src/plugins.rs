//! Plugins loaded as a proxy runs them: one compiled module per VM key shared by the plugins
//! that have it (each with its own root context), one VM copy of each module per worker thread
//! made on the thread's first use, and the failure policy deciding what a stream gets when a
//! copy has failed.
//!
//! The embedder loads a [`config::Deployment`](crate::Deployment) once with [`Plugins::load`],
//! hands every worker thread a [`Worker`], and asks the worker, per stream, for the plugin's VM
//! ([`Worker::admit`]): no lock and no map lookup on that path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi::{ContextId, Host, InMemoryHost, QueueWake, RootConfig, SharedState, Vm, VmError};

use crate::code::{self, abi_config, Code, VmKey};
use crate::compiled::{self, CompilationCache, CompiledFrom};
use crate::config::{CodeSource, Deployment, FailurePolicy, PluginConfig, RemoteCode};
use crate::remote::{self, CodeCache};
use crate::runtime_name;

/// What an embedder provides: its engines.
pub trait Engines: Send + Sync {
    /// The engines compiled in, by pwhost name, in preference order.
    fn available(&self) -> Vec<&'static str>;

    /// The engine called `engine` (one of [`Engines::available`]), configured as the embedder
    /// runs plugins. The lifecycle layer compiles WebAssembly with it (from a precompiled
    /// section or the compilation cache where it can).
    fn runtime(
        &self,
        engine: &'static str,
    ) -> Result<Arc<dyn runtime_api::WasmRuntime<abi::VmState>>, String>;

    /// One warning per plugin of `plugins` whose engine cannot keep the limits this embedder
    /// runs plugins with (a call deadline, a memory cap), for a proxy to log at each load: a
    /// native plugin on the null runtime runs without them. By default none.
    fn unenforced_limits(&self, plugins: &Plugins) -> Vec<String> {
        let _ = plugins;
        Vec::new()
    }

    /// Loads native code ([`Code::NativeName`], [`Code::NativeLibrary`]) on `runtime` (the null
    /// runtime) as a plugin with `config`, sharing `shared`. By default, native code is refused.
    fn load_native(
        &self,
        runtime: &dyn runtime_api::WasmRuntime<abi::VmState>,
        code: &Code,
        config: abi::PluginConfig,
        shared: SharedState,
    ) -> Result<abi::Plugin, String> {
        let _ = (runtime, config, shared);
        Err(format!(
            "this host runs no native plugins ({code:?} is not WebAssembly)"
        ))
    }
}

/// Why a deployment could not be loaded. Nothing of it runs then.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A configuration problem found while loading (an engine not compiled in, unreadable code).
    #[error("{path}: {message}")]
    Config {
        /// The field path.
        path: String,
        /// The problem.
        message: String,
    },
    /// The engine refused the code.
    #[error("plugin {plugin:?}: {message}")]
    Module {
        /// The plugin's name.
        plugin: String,
        /// The engine's or the ABI's error.
        message: String,
    },
    /// The plugin refused its configuration, or trapped, when it was started to check it (as
    /// Envoy refuses to start a plugin whose `proxy_on_vm_start` or `proxy_on_configure` fails).
    #[error("plugin {plugin:?} rejected its configuration: {reason}")]
    Rejected {
        /// The plugin's name.
        plugin: String,
        /// What it did.
        reason: String,
    },
}

/// Which plugin of a [`Plugins`]: its index in the deployment (HTTP filters, then network
/// filters, then services, each in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PluginId(pub usize);

/// What a plugin's failures came to, across all worker threads.
#[derive(Debug, Default)]
pub struct Counters {
    /// VM copies failed by a trap in plugin code (other than running out of memory).
    pub failed_by_trap: AtomicU64,
    /// VM copies failed by running past the call deadline (or out of fuel, or interrupted).
    pub failed_by_deadline: AtomicU64,
    /// VM copies failed by a trap once the plugin had run out of memory under the memory cap
    /// (see `abi::VmError::Trap`'s `out_of_memory`).
    pub failed_by_memory_cap: AtomicU64,
    /// VM copies that could not be made or started on a thread.
    pub failed_to_start: AtomicU64,
    /// Fresh copies made after a failure (`FAIL_RELOAD`).
    pub reloads: AtomicU64,
    /// Streams that bypassed the failed plugin (`FAIL_OPEN`).
    pub bypassed: AtomicU64,
    /// Streams answered with a local 503 because the plugin had failed (`FAIL_CLOSED`, and
    /// `FAIL_RELOAD` while waiting to reload).
    pub closed: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters' values: (name, value), in a stable order, for reports and metrics.
    pub fn snapshot(&self) -> [(&'static str, u64); 7] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("failed_by_trap", get(&self.failed_by_trap)),
            ("failed_by_deadline", get(&self.failed_by_deadline)),
            ("failed_by_memory_cap", get(&self.failed_by_memory_cap)),
            ("failed_to_start", get(&self.failed_to_start)),
            ("reloads", get(&self.reloads)),
            ("bypassed", get(&self.bypassed)),
            ("closed", get(&self.closed)),
        ]
    }
}

/// Where a deployment's code comes from.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// The directory relative code file names are taken from (the configuration's, as Traffic
    /// Server does).
    pub base_dir: std::path::PathBuf,
    /// Where remote code is kept by sha256 (always in memory; on disk if it has a directory).
    pub code_cache: CodeCache,
    /// Where compiled code is kept for the next start, for engines that can load it back
    /// (none: every start compiles).
    pub compilation_cache: Option<CompilationCache>,
}

impl LoadOptions {
    /// Code file names taken from `base_dir`; remote code kept in memory and, with
    /// `cache_dir`, on disk in its `code/` beside the compiled code in its `compiled/` (the
    /// layout every embedder's `--cache-dir` shares); without it every start compiles.
    pub fn cached_in(base_dir: std::path::PathBuf, cache_dir: Option<&std::path::Path>) -> Self {
        LoadOptions {
            base_dir,
            code_cache: CodeCache::new(cache_dir.map(|dir| dir.join("code"))),
            compilation_cache: cache_dir.map(|dir| CompilationCache::new(dir.join("compiled"))),
        }
    }
}

/// What in `config` (a service's if `service`) is taken but does nothing, for the load's
/// warnings: Envoy accepts these silently, and so would a user's mistake go unseen.
fn configuration_warnings(config: &PluginConfig, service: bool) -> Vec<String> {
    let mut warnings = Vec::new();
    for name in config.allowed_capabilities.iter().flatten() {
        if !abi::is_capability(name) {
            warnings.push(format!(
                "{}: {name:?} is no host function or callback of any Proxy-Wasm ABI version, \
                 so it allows nothing (misspelt?)",
                config.field_path("capability_restriction_config.allowed_capabilities")
            ));
        }
    }
    if service && config.failure_policy != FailurePolicy::FailClosed {
        warnings.push(format!(
            "{}: has no effect on a service, whose VM stays failed once it fails (until a \
             restart, or an update that replaces the service)",
            config.field_path("failure_policy")
        ));
    }
    if let CodeSource::Remote(RemoteCode {
        cluster: Some(cluster),
        ..
    }) = &config.vm.code
    {
        warnings.push(format!(
            "{}: {cluster:?} is not used: the code is fetched from the URL itself (no cluster, \
             so none of its TLS or proxy settings)",
            config.field_path("vm_config.code.remote.http_uri.cluster")
        ));
    }
    warnings
}

/// A plugin's code for `engine`, local or remote (what went wrong with the remote code's disk
/// cache added to `warnings`).
fn read_code(
    config: &PluginConfig,
    engine: &str,
    options: &LoadOptions,
    warnings: &mut Vec<String>,
) -> Result<Code, LoadError> {
    let CodeSource::Remote(source) = &config.vm.code else {
        return code::read_local(&config.vm.code, engine, &options.base_dir).map_err(|error| {
            LoadError::Config {
                path: config.field_path("vm_config.code"),
                message: error.to_string(),
            }
        });
    };
    let fail = |message: String| LoadError::Config {
        path: config.field_path("vm_config.code.remote"),
        message,
    };
    if engine == "null" {
        return Err(fail(
            "the null runtime runs compiled-in plugins (local.inline_string), not fetched code"
                .into(),
        ));
    }
    let fetched = remote::load(
        source,
        &options.code_cache,
        config.vm.nack_on_code_cache_miss,
    )
    .map_err(|error| fail(error.to_string()))?;
    warnings.extend(fetched.warnings);
    Ok(Code::Wasm(fetched.code.to_vec()))
}

/// Compiles (or loads) `code` on `engine` as `config`'s plugin; with the compilation's
/// warnings.
fn compile(
    engines: &dyn Engines,
    engine: &'static str,
    code: &Code,
    config: &PluginConfig,
    options: &LoadOptions,
    shared: &SharedState,
) -> Result<(abi::Plugin, CompiledFrom, Vec<String>), String> {
    let runtime = engines.runtime(engine)?;
    let Code::Wasm(wasm) = code else {
        let plugin = engines.load_native(&*runtime, code, abi_config(config), shared.clone())?;
        return Ok((plugin, CompiledFrom::Native, Vec::new()));
    };
    let compiled = compiled::compile(
        &*runtime,
        wasm,
        config.vm.allow_precompiled,
        options.compilation_cache.as_ref(),
    )
    .map_err(|e| e.to_string())?;
    let plugin = abi::Plugin::from_module(
        &*runtime,
        compiled.module,
        abi_config(config),
        shared.clone(),
    )
    .map_err(|e| e.to_string())?;
    Ok((plugin, compiled.from, compiled.warnings))
}

/// Per module, the plugins whose root contexts it has, in root order.
fn users_of(modules: &[Module], entries: &[Entry]) -> Vec<Vec<PluginId>> {
    let mut users = vec![Vec::new(); modules.len()];
    for (index, entry) in entries.iter().enumerate() {
        let roots: &mut Vec<PluginId> = &mut users[entry.module];
        if roots.len() == entry.root {
            roots.push(PluginId(index));
        }
    }
    users
}

/// One compiled module and the plugins sharing it (one root context each).
struct Module {
    /// `None` for a plugin loaded by the embedder ([`Plugins::single`]).
    key: Option<VmKey>,
    /// A singleton service's VM: never shared, never copied onto workers.
    singleton: bool,
    plugin: abi::Plugin,
    /// Where its machine code came from.
    compiled_from: CompiledFrom,
    roots: Vec<RootConfig>,
}

/// A plugin: its configuration, its module and its root context's place in it.
struct Entry {
    config: PluginConfig,
    module: usize,
    root: usize,
    counters: Arc<Counters>,
}

/// The plugins of a deployment, loaded: compiled and linked once, shared by every worker.
pub struct Plugins {
    modules: Vec<Module>,
    /// Per module: the plugins whose root contexts it has, in root order.
    module_plugins: Vec<Vec<PluginId>>,
    entries: Vec<Entry>,
    http_filters: usize,
    network_filters: usize,
    shared: SharedState,
    /// What did not go as it could have while loading (see [`crate::compiled::Compiled`]).
    warnings: Vec<String>,
}

impl Plugins {
    /// Loads every plugin of `deployment`: plugins with the same [`VmKey`] share one module
    /// (and, per thread, one VM copy). Code comes as `options` say.
    /// Each module is started once, with every plugin's root context configured, to refuse a
    /// plugin that rejects its configuration or traps before any traffic comes.
    pub fn load(
        deployment: &Deployment,
        engines: &dyn Engines,
        options: &LoadOptions,
        shared: SharedState,
    ) -> Result<Plugins, LoadError> {
        Self::load_with(deployment, engines, options, shared, Vec::new(), Vec::new())
    }

    /// As [`Plugins::load`], for a deployment replacing `previous` (a configuration update):
    /// modules whose [`VmKey`] did not change are not compiled again. The new plugins get VM
    /// copies of their own all the same (see [`crate::LivePlugins`]); they share `previous`'s
    /// shared data and queues, and a plugin of a name `previous` had (of the same kind: HTTP
    /// filter, network filter or service) goes on counting in its [`Counters`], as a proxy's
    /// metrics by plugin name do across updates.
    pub fn load_replacing(
        previous: &Plugins,
        deployment: &Deployment,
        engines: &dyn Engines,
        options: &LoadOptions,
    ) -> Result<Plugins, LoadError> {
        let compiled = previous
            .modules
            .iter()
            .filter_map(|m| Some((m.key.clone()?, m.plugin.clone(), m.compiled_from)))
            .collect();
        let counters = previous
            .entries
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                let kind = kind_of(index, previous.http_filters, previous.network_filters);
                let name = entry.config.display_name().to_string();
                ((kind, name), Arc::clone(&entry.counters))
            })
            .collect();
        Self::load_with(
            deployment,
            engines,
            options,
            previous.shared.clone(),
            compiled,
            counters,
        )
    }

    fn load_with(
        deployment: &Deployment,
        engines: &dyn Engines,
        options: &LoadOptions,
        shared: SharedState,
        // Compiled once per key, even when a singleton service needs a VM of its own.
        mut compiled: Vec<(VmKey, abi::Plugin, CompiledFrom)>,
        // The counters of the plugins replaced, by kind and name, each taken once.
        mut counters: Vec<((usize, String), Arc<Counters>)>,
    ) -> Result<Plugins, LoadError> {
        let available = engines.available();
        let mut modules: Vec<Module> = Vec::new();
        let mut entries = Vec::new();
        let mut warnings = Vec::new();
        let filters = deployment.http_filters.len() + deployment.network_filters.len();
        for (index, config) in deployment.plugins().enumerate() {
            let singleton = index >= filters && deployment.services[index - filters].singleton;
            let engine =
                runtime_name::resolve(&config.vm.runtime, &available).map_err(|message| {
                    LoadError::Config {
                        path: config.field_path("vm_config.runtime"),
                        message,
                    }
                })?;
            let mut code_warnings = configuration_warnings(config, index >= filters);
            let code = read_code(config, engine, options, &mut code_warnings)?;
            warnings.extend(
                code_warnings
                    .into_iter()
                    .map(|w| format!("plugin {:?}: {w}", config.name)),
            );
            let key = VmKey::new(config, engine, &code);
            let shared_module = modules
                .iter()
                .position(|m| !m.singleton && m.key.as_ref() == Some(&key));
            let module = match shared_module {
                Some(index) if !singleton => {
                    modules[index].roots.push(abi_config(config).root());
                    index
                }
                _ => {
                    let (plugin, compiled_from) = match compiled.iter().find(|(k, ..)| *k == key) {
                        Some((_, plugin, from)) => (plugin.with_config(abi_config(config)), *from),
                        None => {
                            let (plugin, from, compile_warnings) = compile(
                                engines, engine, &code, config, options, &shared,
                            )
                            .map_err(|message| LoadError::Module {
                                plugin: config.name.clone(),
                                message,
                            })?;
                            warnings.extend(
                                compile_warnings
                                    .into_iter()
                                    .map(|w| format!("plugin {:?}: {w}", config.name)),
                            );
                            compiled.push((key.clone(), plugin.clone(), from));
                            (plugin, from)
                        }
                    };
                    modules.push(Module {
                        key: Some(key),
                        plugin,
                        compiled_from,
                        roots: vec![abi_config(config).root()],
                        singleton,
                    });
                    modules.len() - 1
                }
            };
            let kind = kind_of(
                index,
                deployment.http_filters.len(),
                deployment.network_filters.len(),
            );
            let name = config.display_name();
            let counted = counters
                .iter()
                .position(|((k, n), _)| *k == kind && n == name)
                .map(|at| counters.remove(at).1);
            entries.push(Entry {
                config: config.clone(),
                module,
                root: modules[module].roots.len() - 1,
                counters: counted.unwrap_or_default(),
            });
        }
        let plugins = Plugins {
            module_plugins: users_of(&modules, &entries),
            modules,
            entries,
            http_filters: deployment.http_filters.len(),
            network_filters: deployment.network_filters.len(),
            shared,
            warnings,
        };
        plugins.check()?;
        Ok(plugins)
    }

    /// Starts a throwaway copy of every module to refuse plugins that reject their
    /// configuration (Envoy's canary).
    fn check(&self) -> Result<(), LoadError> {
        for index in 0..self.modules.len() {
            let failure = match VmCopy::start(self, index, Box::new(InMemoryHost::new()), None) {
                Ok((_, None)) => continue,
                Ok((_, Some(failure))) | Err(failure) => failure,
            };
            return Err(LoadError::Rejected {
                plugin: self.entries[failure.plugin.0].config.name.clone(),
                reason: failure.to_string(),
            });
        }
        Ok(())
    }

    /// One plugin already loaded, as both the HTTP filter and the network filter of a
    /// deployment (one root context serves both), not checked at load: `pwhost run`'s
    /// shorthand for a plugin given on the command line, which reports a plugin refusing to
    /// start rather than refusing it.
    pub fn single(config: PluginConfig, plugin: abi::Plugin) -> Plugins {
        let shared = plugin.shared_state().clone();
        let counters = Arc::<Counters>::default();
        let entry = |config: PluginConfig| Entry {
            config,
            module: 0,
            root: 0,
            counters: Arc::clone(&counters),
        };
        Plugins {
            modules: vec![Module {
                key: None,
                singleton: false,
                // Native code runs unsandboxed; anything else the embedder compiled.
                compiled_from: if plugin.capabilities().sandboxed {
                    CompiledFrom::Bytecode
                } else {
                    CompiledFrom::Native
                },
                roots: vec![plugin.config().root()],
                plugin,
            }],
            module_plugins: vec![vec![PluginId(0)]],
            entries: vec![entry(config.clone()), entry(config)],
            http_filters: 1,
            network_filters: 1,
            shared,
            warnings: Vec::new(),
        }
    }

    /// The module `plugin` runs in.
    pub(crate) fn module_of(&self, plugin: PluginId) -> usize {
        self.entries[plugin.0].module
    }

    /// A module's plugins paired with their root contexts in a copy.
    pub(crate) fn roots_of(
        &self,
        module: usize,
        roots: &[ContextId],
    ) -> Vec<(PluginId, ContextId)> {
        self.module_plugins[module]
            .iter()
            .copied()
            .zip(roots.iter().copied())
            .collect()
    }

    /// The shared data, queues and metrics the plugins use.
    pub fn shared_state(&self) -> &SharedState {
        &self.shared
    }

    /// The HTTP filters, in chain order.
    pub fn http_filters(&self) -> impl Iterator<Item = PluginId> {
        (0..self.http_filters).map(PluginId)
    }

    /// The network filters, in chain order.
    pub fn network_filters(&self) -> impl Iterator<Item = PluginId> {
        (self.http_filters..self.http_filters + self.network_filters).map(PluginId)
    }

    /// The services.
    pub fn services(&self) -> impl Iterator<Item = PluginId> {
        (self.http_filters + self.network_filters..self.entries.len()).map(PluginId)
    }

    /// The services without `singleton`, which run on every worker, in the worker's VM copies
    /// (start them there with [`Worker::start`]).
    pub fn worker_services(&self) -> impl Iterator<Item = PluginId> + '_ {
        self.services().filter(|plugin| !self.is_singleton(*plugin))
    }

    /// The services with `singleton`, each of which runs in one VM on a thread of its own
    /// ([`crate::SingletonService`]).
    pub fn singleton_services(&self) -> impl Iterator<Item = PluginId> + '_ {
        self.services().filter(|plugin| self.is_singleton(*plugin))
    }

    /// Whether `plugin` is a singleton service (one VM, on a thread of its own).
    pub fn is_singleton(&self, plugin: PluginId) -> bool {
        self.modules[self.entries[plugin.0].module].singleton
    }

    /// A plugin's configuration.
    pub fn config(&self, plugin: PluginId) -> &PluginConfig {
        &self.entries[plugin.0].config
    }

    /// A plugin's counters.
    pub fn counters(&self, plugin: PluginId) -> &Arc<Counters> {
        &self.entries[plugin.0].counters
    }

    /// How many modules (distinct VM keys) the plugins share.
    pub fn module_count(&self) -> usize {
        self.modules.len()
    }

    /// The compiled module a plugin runs in.
    pub fn module(&self, plugin: PluginId) -> &abi::Plugin {
        &self.modules[self.entries[plugin.0].module].plugin
    }

    /// What did not go as it could have while loading (a precompiled section that does not
    /// fit, a compilation cache that cannot be written), one line each naming the plugin, for
    /// the embedder's log. None of it kept the plugins from loading.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Where the machine code of a plugin's module came from.
    pub fn compiled_from(&self, plugin: PluginId) -> CompiledFrom {
        self.modules[self.entries[plugin.0].module].compiled_from
    }
}

/// One VM copy of a module on a thread, with the root context of each plugin sharing it.
pub(crate) struct VmCopy {
    pub(crate) vm: Vm,
    pub(crate) roots: Vec<ContextId>,
}

/// Why a VM copy could not be started: which of its plugins, and what happened.
#[derive(Debug)]
pub struct StartFailure {
    /// The plugin whose root context failed (the first sharing the VM if the VM itself could
    /// not be made).
    pub plugin: PluginId,
    /// Which step failed.
    pub step: StartStep,
    /// The error, for a trap or a VM that could not be made; `None` when the plugin returned
    /// false.
    pub error: Option<VmError>,
}

/// The steps of starting a VM copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartStep {
    /// Instantiating the module and running its start function.
    Instantiate,
    /// `proxy_on_vm_start`.
    VmStart,
    /// `proxy_on_configure`.
    Configure,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.error, self.step) {
            (Some(error), _) => write!(f, "{error}"),
            (None, StartStep::VmStart) => f.write_str("its proxy_on_vm_start returned false"),
            (None, _) => f.write_str("its proxy_on_configure returned false"),
        }
    }
}

impl VmCopy {
    /// A new copy of `module` (number `index`) with every plugin's root context started and
    /// configured. A copy whose start failed is returned too, with why, so that its host can
    /// still be read (its logs say why).
    /// `queue_wake`, if given, is set before any root context starts, so it covers every queue
    /// they register.
    pub(crate) fn start(
        plugins: &Plugins,
        index: usize,
        host: Box<dyn Host>,
        queue_wake: Option<&QueueWake>,
    ) -> Result<(VmCopy, Option<StartFailure>), StartFailure> {
        let module = &plugins.modules[index];
        let users = &plugins.module_plugins[index];
        let mut vm = Vm::new(&module.plugin, host).map_err(|error| StartFailure {
            plugin: users[0],
            step: StartStep::Instantiate,
            error: Some(error),
        })?;
        if let Some(wake) = queue_wake {
            vm.set_queue_wake(Arc::clone(wake));
        }
        let mut roots = vec![vm.root_context()];
        for config in &module.roots[1..] {
            roots.push(vm.add_root(config.clone()));
        }
        let mut failure = None;
        for (root_index, root) in roots.iter().enumerate() {
            let plugin = users[root_index];
            let fail = |step, error| StartFailure {
                plugin,
                step,
                error,
            };
            match vm.start_root(*root) {
                Ok(true) => {}
                Ok(false) => failure = Some(fail(StartStep::VmStart, None)),
                Err(error) => failure = Some(fail(StartStep::VmStart, Some(error))),
            }
            if failure.is_some() {
                break;
            }
            match vm.configure_root(*root) {
                Ok(true) => {}
                Ok(false) => failure = Some(fail(StartStep::Configure, None)),
                Err(error) => failure = Some(fail(StartStep::Configure, Some(error))),
            }
            if failure.is_some() {
                break;
            }
        }
        Ok((VmCopy { vm, roots }, failure))
    }
}

/// What a stream gets from a plugin.
#[derive(Debug)]
pub enum Admission {
    /// Run the stream through the plugin, in the VM copy this handle holds; give the handle back
    /// with [`Worker::release`] when the stream ends.
    Run(StreamVm),
    /// The plugin failed: answer the stream with a local 503 (gRPC status 14 UNAVAILABLE for a
    /// gRPC request), details [`fail_stream_details`], as Envoy fails a stream closed.
    FailClosed,
    /// The plugin failed: pass the stream on without it.
    FailOpen,
}

/// The details Envoy gives a stream failed closed; [`fail_stream_details`] names the plugin.
pub const FAIL_STREAM_DETAILS: &str = "wasm_fail_stream";

/// The details of a stream failed closed by the plugin `name`: Envoy's
/// [`FAIL_STREAM_DETAILS`] with the plugin in braces (`wasm_fail_stream{my_plugin}`), as Envoy
/// adds what went wrong to other details (`upstream_reset_before_response_started{...}`), so
/// that an access log says which plugin failed. Whitespace becomes `_`, as Envoy keeps details
/// free of it.
pub fn fail_stream_details(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect();
    format!("{FAIL_STREAM_DETAILS}{{{name}}}")
}

/// The gRPC status of a stream failed closed (14 UNAVAILABLE), for a gRPC request.
pub const FAIL_STREAM_GRPC_STATUS: i32 = 14;

/// The gRPC status Envoy gives a local reply to a gRPC request when the plugin named none: its
/// HTTP status mapped as `Grpc::Utility::httpToGrpcStatus` maps it.
pub fn grpc_status_of_http(status: u32) -> i32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// A stream's hold on the VM copy it runs a plugin in, from [`Worker::admit`] to
/// [`Worker::release`]. The copy lives while a stream holds it, even once the plugin's copy on
/// the thread was replaced (a reload after a failure), so in-flight streams finish where they
/// started.
#[derive(Debug)]
#[must_use = "give the handle back with Worker::release when the stream ends"]
pub struct StreamVm {
    plugin: PluginId,
    copy: usize,
    generation: CopyId,
    root: ContextId,
}

/// Which VM copy: unique among the copies every worker of the process ever made, so that a
/// stream's handle used on another worker by mistake finds no copy there (see [`Worker::vm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CopyId(pub u64);

impl StreamVm {
    /// The plugin.
    pub fn plugin(&self) -> PluginId {
        self.plugin
    }

    /// The plugin's root context in the copy: create the stream's context for it
    /// ([`Vm::create_http_context_for`], [`Vm::create_tcp_context_for`]).
    pub fn root(&self) -> ContextId {
        self.root
    }

    /// The VM copy.
    pub fn copy(&self) -> CopyId {
        self.generation
    }
}

/// A VM copy on a worker, with how many streams hold it.
struct LiveCopy {
    copy: VmCopy,
    module: usize,
    generation: CopyId,
    streams: usize,
    /// Whether every root context started; a copy that did not is never admitted.
    started: bool,
    /// Whether it is its module's current copy on the worker (else it goes away with its last
    /// stream).
    current: bool,
    /// Whether the embedder ended its root contexts itself ([`Worker::roots_ended`]); if not,
    /// retiring the copy does.
    roots_ended: bool,
}

/// A source of time, so that tests can step through a reload backoff.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// Called with a VM copy about to go away (replaced and left by its last stream, or with its
/// worker) and its plugins' root contexts, e.g. to collect what its host recorded.
pub type RetireHook = Box<dyn FnMut(CopyId, &mut Vm, &[(PluginId, ContextId)]) + Send>;

/// A worker thread's view of the plugins: its own VM copy of each module, made on first use,
/// and the failure policy applied to streams when a copy has failed.
///
/// Streams find their copy by index ([`StreamVm`]), without a lock or a map lookup.
pub struct Worker {
    plugins: Arc<Plugins>,
    host: Box<dyn Fn() -> Box<dyn Host> + Send>,
    /// Every copy alive on this worker (current ones and replaced ones still held by streams).
    copies: Vec<Option<LiveCopy>>,
    /// Per module: its current copy in `copies`, if one was made.
    current: Vec<Option<usize>>,
    /// Per module: whether a copy was ever tried (a first failure to instantiate leaves none).
    tried: Vec<bool>,
    /// Per module: the reload backoff's state.
    reload: Vec<ReloadState>,
    /// Per plugin that does not reload (not `FAIL_RELOAD`): the copy it first ran on. Envoy's
    /// handle of such a plugin stays on its VM, so once that copy failed, the plugin stays
    /// failed, even when another plugin of the module (`FAIL_RELOAD`) made a fresh copy.
    first_copy: Vec<Option<CopyId>>,
    clock: Clock,
    on_retire: Option<RetireHook>,
    queue_wake: Option<QueueWake>,
}

#[derive(Clone, Copy)]
struct ReloadState {
    /// Consecutive reloads without a copy lasting `max_interval`.
    attempts: u32,
    /// When the current copy was made (or last failed to be).
    last_load: Instant,
    /// When this worker first saw the current copy failed (`None` while it has not): how long
    /// the copy ran is up to its failure, not up to its reload.
    failed_at: Option<Instant>,
    /// The wait before the next reload, jitter included, drawn once per failure: drawn anew
    /// at each admission, the earliest of many draws would come, and jitter would spread
    /// nothing under traffic.
    wait: Option<Duration>,
}

impl Worker {
    /// A worker whose VM copies get their hosts from `host` (one per copy).
    pub fn new(plugins: Arc<Plugins>, host: impl Fn() -> Box<dyn Host> + Send + 'static) -> Worker {
        let modules = plugins.modules.len();
        let entries = plugins.entries.len();
        let now = Instant::now();
        Worker {
            plugins,
            host: Box::new(host),
            copies: Vec::new(),
            current: vec![None; modules],
            tried: vec![false; modules],
            reload: vec![
                ReloadState {
                    attempts: 0,
                    last_load: now,
                    failed_at: None,
                    wait: None,
                };
                modules
            ],
            first_copy: vec![None; entries],
            clock: Arc::new(Instant::now),
            on_retire: None,
            queue_wake: None,
        }
    }

    /// The same worker with another clock (for tests of the reload backoff).
    pub fn with_clock(mut self, clock: Clock) -> Worker {
        let now = clock();
        for state in &mut self.reload {
            state.last_load = now;
        }
        self.clock = clock;
        self
    }

    /// The same worker, calling `hook` with each VM copy about to go away.
    pub fn on_retire(mut self, hook: RetireHook) -> Worker {
        self.on_retire = Some(hook);
        self
    }

    /// The same worker, with `wake` run (on the enqueuing thread, whichever it is) whenever an
    /// item is enqueued into a queue that one of its copies registered: `wake` has the
    /// worker's thread call [`Worker::dispatch_queue_ready`] soon, as Envoy posts
    /// `onQueueReady` to the registering worker. Without it, only threads that call
    /// [`Worker::dispatch_queue_ready`] of their own accord deliver queue notifications.
    pub fn on_queue_ready(mut self, wake: QueueWake) -> Worker {
        for live in self.copies.iter_mut().flatten() {
            live.copy.vm.set_queue_wake(Arc::clone(&wake));
        }
        self.queue_wake = Some(wake);
        self
    }

    /// Delivers `proxy_on_queue_ready` in every current copy on this worker for the items
    /// enqueued so far into queues its root contexts registered (on the worker's thread). A copy
    /// whose callback fails is failed like one failing under a stream: its plugins' failure
    /// policies apply to later streams. Returns the failures, by the plugin whose root context
    /// failed, for the embedder's log.
    pub fn dispatch_queue_ready(&mut self) -> Vec<(PluginId, VmError)> {
        let mut failures = Vec::new();
        for module in 0..self.current.len() {
            let Some(index) = self.current[module] else {
                continue;
            };
            let Some(live) = self.copies[index].as_mut() else {
                continue;
            };
            if !live.started || live.copy.vm.is_failed() {
                continue;
            }
            if let Err(error) = live.copy.vm.dispatch_queue_ready() {
                let roots = self.plugins.roots_of(module, &live.copy.roots);
                let plugin = failing_plugin(&roots, &error)
                    .unwrap_or(self.plugins.module_plugins[module][0]);
                count_failure(&self.plugins.entries[plugin.0].counters, &error);
                self.notice_failure(module);
                failures.push((plugin, error));
            }
        }
        failures
    }

    /// Records that a callback of `plugin`'s root context failed outside any stream (a timer
    /// tick, a queue notification or a call's answer the embedder delivered itself), so that its
    /// failure counters and reload backoff know of it; later streams get what the plugin's
    /// policy says, as after any failure.
    pub fn root_failed(&mut self, plugin: PluginId, error: &VmError) {
        let entry = &self.plugins.entries[plugin.0];
        count_failure(&entry.counters, error);
        let module = entry.module;
        self.notice_failure(module);
    }

    /// The plugins.
    pub fn plugins(&self) -> &Arc<Plugins> {
        &self.plugins
    }

    /// Makes `plugin`'s VM copy on this thread now, if not made yet, rather than on first use
    /// (e.g. to tick root contexts before traffic; a service that is not a singleton has no
    /// other use). Returns why it could not start. A singleton service runs on a thread of its
    /// own ([`crate::SingletonService`]), never on a worker.
    pub fn start(&mut self, plugin: PluginId) -> Result<(), StartFailure> {
        let module = self.plugins.entries[plugin.0].module;
        if self.tried[module] || self.plugins.modules[module].singleton {
            return Ok(());
        }
        let counters = Arc::clone(&self.plugins.entries[plugin.0].counters);
        self.make_copy(module, true, &counters)
    }

    /// What a new stream gets from `plugin`: its VM copy on this thread (made now if this is the
    /// thread's first use, or remade under `FAIL_RELOAD` once the backoff allows), or what the
    /// plugin's failure policy says when the copy has failed.
    pub fn admit(&mut self, plugin: PluginId) -> Admission {
        let entry = &self.plugins.entries[plugin.0];
        let module = entry.module;
        // Streams never go to a singleton service.
        if self.plugins.modules[module].singleton {
            return Admission::FailClosed;
        }
        let policy = entry.config.failure_policy;
        let counters = Arc::clone(&entry.counters);
        let root_index = entry.root;
        let stays = !matches!(policy, FailurePolicy::FailReload { .. });
        let generation = |worker: &Worker| {
            let index = worker.usable(module)?;
            Some(worker.copies[index].as_ref()?.generation)
        };
        // A plugin that does not reload, whose first copy failed (or went after failing).
        let left_failed =
            stays && self.first_copy[plugin.0].is_some_and(|first| generation(self) != Some(first));
        if !left_failed && self.usable(module).is_none() {
            let first_use = !self.tried[module];
            if first_use || self.may_reload(module, policy) {
                // A failure is counted, and applied below.
                let _ = self.make_copy(module, first_use, &counters);
            }
        }
        let usable = if left_failed {
            None
        } else {
            self.usable(module)
        };
        match usable {
            Some(index) => {
                let Some(live) = self.copies[index].as_mut() else {
                    unreachable!("a usable copy is alive");
                };
                live.streams += 1;
                let generation = live.generation;
                let root = live.copy.roots[root_index];
                if stays {
                    self.first_copy[plugin.0].get_or_insert(generation);
                }
                Admission::Run(StreamVm {
                    plugin,
                    copy: index,
                    generation,
                    root,
                })
            }
            None => match policy {
                FailurePolicy::FailOpen => {
                    Counters::add(&counters.bypassed);
                    Admission::FailOpen
                }
                FailurePolicy::FailClosed | FailurePolicy::FailReload { .. } => {
                    Counters::add(&counters.closed);
                    Admission::FailClosed
                }
            },
        }
    }

    /// The module's current copy, if it started and has not failed.
    fn usable(&self, module: usize) -> Option<usize> {
        let index = self.current[module]?;
        let live = self.copies[index].as_ref()?;
        (live.started && !live.copy.vm.is_failed()).then_some(index)
    }

    /// The VM a stream runs in (`None` only for a handle from another worker).
    pub fn vm(&mut self, stream: &StreamVm) -> Option<&mut Vm> {
        match self.copies.get_mut(stream.copy)? {
            Some(live) if live.generation == stream.generation => Some(&mut live.copy.vm),
            _ => None,
        }
    }

    /// Gives back a stream's hold on its VM copy: a replaced copy goes away with its last
    /// stream.
    pub fn release(&mut self, stream: StreamVm) {
        let Some(Some(live)) = self.copies.get_mut(stream.copy) else {
            return;
        };
        if live.generation != stream.generation {
            return;
        }
        live.streams = live.streams.saturating_sub(1);
        if live.streams == 0 && !live.current {
            self.retire(stream.copy);
        }
    }

    fn retire(&mut self, index: usize) {
        if let Some(mut live) = self.copies[index].take() {
            // A plugin's root context ends with its copy, as proxy-wasm-cpp-host ends a
            // plugin's when its handle goes (a configuration update, a worker's end):
            // `proxy_on_done`, then `proxy_on_delete` if it is done. One that still has work
            // pending gets no more time: the copy is going.
            if live.started && !live.roots_ended && !live.copy.vm.is_failed() {
                for &root in &live.copy.roots {
                    if let Ok(true) = live.copy.vm.on_done(root) {
                        let _ = live.copy.vm.on_delete(root);
                    }
                }
            }
            if let Some(hook) = &mut self.on_retire {
                let roots = self.plugins.roots_of(live.module, &live.copy.roots);
                hook(live.generation, &mut live.copy.vm, &roots);
            }
        }
    }

    /// Notes that the embedder ended the root contexts of every current copy itself (e.g.
    /// `proxy_on_done`, then timer ticks until `proxy_done`, as a test bench shuts down): when
    /// the copies go, nothing more is called in them.
    pub fn roots_ended(&mut self) {
        for index in self.current.iter().flatten() {
            if let Some(live) = self.copies[*index].as_mut() {
                live.roots_ended = true;
            }
        }
    }

    /// Calls `visit` with every current VM copy on this worker and its plugins' root contexts
    /// (for root work: timer ticks, queue notifications, shutdown).
    pub fn for_each_copy(
        &mut self,
        mut visit: impl FnMut(CopyId, &mut Vm, &[(PluginId, ContextId)]),
    ) {
        for module in 0..self.current.len() {
            let Some(index) = self.current[module] else {
                continue;
            };
            let Some(live) = self.copies[index].as_mut() else {
                continue;
            };
            let roots = self.plugins.roots_of(module, &live.copy.roots);
            visit(live.generation, &mut live.copy.vm, &roots);
        }
    }

    /// Calls `visit` with every VM copy on this worker that is no longer current but still
    /// serves streams (one replaced after it failed): a host that acts on what a copy's
    /// streams wait for (e.g. the failure policy for the streams it held when it failed) must
    /// visit these as well as the current ones.
    pub fn for_each_replaced_copy(&mut self, mut visit: impl FnMut(CopyId, &mut Vm)) {
        for live in self.copies.iter_mut().flatten() {
            if !live.current {
                visit(live.generation, &mut live.copy.vm);
            }
        }
    }

    /// The current VM copy `plugin` runs in on this worker and the plugin's root context in it,
    /// if one was made (started or not, failed or not).
    pub fn copy_of(&mut self, plugin: PluginId) -> Option<(CopyId, &mut Vm, ContextId)> {
        let entry = &self.plugins.entries[plugin.0];
        let index = self.current[entry.module]?;
        let live = self.copies[index].as_mut()?;
        Some((
            live.generation,
            &mut live.copy.vm,
            live.copy.roots[entry.root],
        ))
    }

    /// Whether a copy may be replaced now: only under `FAIL_RELOAD`, once as long has
    /// passed since the copy was made (as Envoy measures it, from the copy's load) as the
    /// backoff asks: the base interval, doubling with every reload in a row up to the max
    /// interval, which no wait exceeds. A copy that ran the max interval before it failed
    /// starts the sequence again. (Envoy's own `wasm.cc` waits the base interval plus jitter
    /// every time and ignores `max_interval`; pwhost uses both fields of the `BackoffStrategy`
    /// as their names say, so a plugin that fails again and again is retried less and less.)
    fn may_reload(&mut self, module: usize, policy: FailurePolicy) -> bool {
        let FailurePolicy::FailReload {
            base_interval,
            max_interval,
        } = policy
        else {
            return false;
        };
        let now = (self.clock)();
        let state = &mut self.reload[module];
        let failed_at = *state.failed_at.get_or_insert(now);
        // Measured up to the failure: a copy that failed at once and then waited out a long
        // backoff has not lasted, or the waits would fall back to the base interval every time
        // they reached the max.
        if failed_at.saturating_duration_since(state.last_load) >= max_interval {
            state.attempts = 0;
        }
        let lasted = now.saturating_duration_since(state.last_load);
        let attempts = state.attempts;
        let wait = *state
            .wait
            .get_or_insert_with(|| backoff(base_interval, max_interval, attempts));
        if lasted < wait {
            return false;
        }
        state.attempts = state.attempts.saturating_add(1);
        state.wait = None;
        true
    }

    /// Records when the module's current copy was first seen failed (for the reload backoff);
    /// a failure in a copy already replaced is not the current copy's.
    fn notice_failure(&mut self, module: usize) {
        if self.current[module].is_some() && self.usable(module).is_none() {
            let now = (self.clock)();
            self.reload[module].failed_at.get_or_insert(now);
        }
    }

    /// Makes a new current copy of `module`, replacing the one there (which goes away now, or
    /// with its last stream).
    fn make_copy(
        &mut self,
        module: usize,
        first_use: bool,
        counters: &Counters,
    ) -> Result<(), StartFailure> {
        let host = (self.host)();
        self.tried[module] = true;
        let now = (self.clock)();
        self.reload[module].last_load = now;
        self.reload[module].failed_at = None;
        self.reload[module].wait = None;
        if let Some(old) = self.current[module].take() {
            match self.copies[old].as_mut() {
                Some(live) if live.streams > 0 => live.current = false,
                Some(_) => self.retire(old),
                None => {}
            }
        }
        if !first_use {
            Counters::add(&counters.reloads);
        }
        let started = VmCopy::start(&self.plugins, module, host, self.queue_wake.as_ref());
        let (copy, failure) = match started {
            Ok(started) => started,
            Err(failure) => {
                Counters::add(&counters.failed_to_start);
                self.reload[module].failed_at = Some(now);
                return Err(failure);
            }
        };
        if failure.is_some() {
            Counters::add(&counters.failed_to_start);
            self.reload[module].failed_at = Some(now);
        }
        // Process-wide, not per worker: see `CopyId`.
        static NEXT_COPY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let generation = NEXT_COPY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let live = LiveCopy {
            copy,
            module,
            generation: CopyId(generation),
            streams: 0,
            started: failure.is_none(),
            current: true,
            roots_ended: false,
        };
        let index = match self.copies.iter().position(Option::is_none) {
            Some(free) => {
                self.copies[free] = Some(live);
                free
            }
            None => {
                self.copies.push(Some(live));
                self.copies.len() - 1
            }
        };
        self.current[module] = Some(index);
        failure.map_or(Ok(()), Err)
    }

    /// Records that a callback of `plugin` failed (the error a `Vm` method returned) while a
    /// stream was in its hands, and says what that stream gets by the plugin's policy: a local
    /// 503, or going on without the plugin. Later streams get what [`Worker::admit`] says.
    pub fn failed(&mut self, plugin: PluginId, error: &VmError) -> OnFailure {
        self.notice_failure(self.plugins.entries[plugin.0].module);
        let entry = &self.plugins.entries[plugin.0];
        let counters = &entry.counters;
        count_failure(counters, error);
        match entry.config.failure_policy {
            FailurePolicy::FailOpen => {
                Counters::add(&counters.bypassed);
                OnFailure::FailOpen
            }
            FailurePolicy::FailClosed | FailurePolicy::FailReload { .. } => {
                Counters::add(&counters.closed);
                OnFailure::FailClosed
            }
        }
    }
}

/// Which of a VM copy's plugins (its `roots`: plugin and root context) a failure of the copy
/// outside any stream is charged to: the one whose root context trapped, else the first.
pub fn failing_plugin(roots: &[(PluginId, ContextId)], error: &VmError) -> Option<PluginId> {
    let failed_root = match error {
        VmError::Trap { context, .. } => Some(*context),
        _ => None,
    };
    roots
        .iter()
        .find(|(_, root)| Some(*root) == failed_root)
        .or(roots.first())
        .map(|(plugin, _)| *plugin)
}

/// Counts a failure of a plugin's VM by its cause.
pub(crate) fn count_failure(counters: &Counters, error: &VmError) {
    if let VmError::Trap {
        out_of_memory: true,
        ..
    } = error
    {
        Counters::add(&counters.failed_by_memory_cap);
        return;
    }
    match error.trap().map(|t| &t.kind) {
        Some(
            runtime_api::TrapKind::DeadlineExceeded
            | runtime_api::TrapKind::Interrupted
            | runtime_api::TrapKind::OutOfFuel,
        ) => Counters::add(&counters.failed_by_deadline),
        Some(_) => Counters::add(&counters.failed_by_trap),
        // A call refused on an already failed VM (one another plugin sharing it failed) is no
        // new failure.
        None => {}
    }
}

/// What a stream gets from a plugin that failed while the stream was in its hands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// A local 503 (gRPC status 14 UNAVAILABLE for a gRPC request), details
    /// [`fail_stream_details`]; under `FAIL_RELOAD` too, as Envoy fails the stream in flight.
    FailClosed,
    /// The stream goes on without the plugin, with what the plugin had let through or held.
    FailOpen,
}

impl Drop for Worker {
    /// The copies go away: the current ones in module order, then any still held by streams.
    fn drop(&mut self) {
        for module in 0..self.current.len() {
            if let Some(index) = self.current[module].take() {
                self.retire(index);
            }
        }
        for index in 0..self.copies.len() {
            self.retire(index);
        }
    }
}

/// Which kind plugin number `index` is, in the order HTTP filters, network filters, services
/// (0, 1, 2), given how many HTTP and network filters come first.
fn kind_of(index: usize, http_filters: usize, network_filters: usize) -> usize {
    if index < http_filters {
        0
    } else if index < http_filters + network_filters {
        1
    } else {
        2
    }
}

/// The wait before reload attempt `attempts` (0 for the first): `base` doubling per attempt,
/// with the jitter of Envoy's reload backoff (up to half the wait more), and never more than
/// `max`, as Envoy's exponential backoff never waits past its max interval.
fn backoff(base: Duration, max: Duration, attempts: u32) -> Duration {
    let wait = base
        .saturating_mul(1u32.checked_shl(attempts.min(31)).unwrap_or(u32::MAX))
        .min(max);
    // The jitter only spreads waits over what is left below `max`: once the doubling reaches
    // it, every wait is `max`.
    wait + jitter((wait / 2).min(max.saturating_sub(wait)))
}

/// A random duration below `up_to`.
fn jitter(up_to: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let nanos = u64::try_from(up_to.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_nanos(random % nanos)
}

#[cfg(test)]
mod tests;
