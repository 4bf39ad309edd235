//! Plugins loaded as a proxy runs them: one compiled module per VM key shared by the plugins
//! that have it (each with its own root context), one VM copy of each module per worker thread
//! made on the thread's first use, and the failure policy deciding what a stream gets when a
//! copy has failed.
//!
//! The embedder loads a [`config::Deployment`](crate::Deployment) once with [`Plugins::load`],
//! hands every worker thread a [`Worker`], and asks the worker, per stream, for the plugin's VM
//! ([`Worker::admit`]): no lock and no map lookup on that path.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi::{ContextId, Host, InMemoryHost, RootConfig, SharedState, Vm, VmError};

use crate::code::{self, abi_config, Code, VmKey};
use crate::config::{Deployment, FailurePolicy, PluginConfig};
use crate::runtime_name;

/// What an embedder provides: its engines.
pub trait Engines: Send + Sync {
    /// The engines compiled in, by pwhost name, in preference order.
    fn available(&self) -> Vec<&'static str>;

    /// Compiles and links `code` on `engine` as a plugin with `config`, sharing `shared`.
    fn load(
        &self,
        engine: &'static str,
        code: &Code,
        config: abi::PluginConfig,
        shared: SharedState,
    ) -> Result<abi::Plugin, String>;
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
    /// VM copies failed by a trap in plugin code.
    pub failed_by_trap: AtomicU64,
    /// VM copies failed by running past the call deadline (or being interrupted).
    pub failed_by_deadline: AtomicU64,
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
    pub fn snapshot(&self) -> [(&'static str, u64); 6] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("failed_by_trap", get(&self.failed_by_trap)),
            ("failed_by_deadline", get(&self.failed_by_deadline)),
            ("failed_to_start", get(&self.failed_to_start)),
            ("reloads", get(&self.reloads)),
            ("bypassed", get(&self.bypassed)),
            ("closed", get(&self.closed)),
        ]
    }
}

/// One compiled module and the plugins sharing it (one root context each).
struct Module {
    key: VmKey,
    plugin: abi::Plugin,
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
    entries: Vec<Entry>,
    http_filters: usize,
    network_filters: usize,
    shared: SharedState,
}

impl Plugins {
    /// Loads every plugin of `deployment`: plugins with the same [`VmKey`] share one module
    /// (and, per thread, one VM copy). Relative code file names are taken from `base_dir`.
    /// Each module is started once, with every plugin's root context configured, to refuse a
    /// plugin that rejects its configuration or traps before any traffic comes.
    pub fn load(
        deployment: &Deployment,
        engines: &dyn Engines,
        base_dir: &Path,
        shared: SharedState,
    ) -> Result<Plugins, LoadError> {
        let available = engines.available();
        let mut modules: Vec<Module> = Vec::new();
        let mut entries = Vec::new();
        for config in deployment.plugins() {
            let engine =
                runtime_name::resolve(&config.vm.runtime, &available).map_err(|message| {
                    LoadError::Config {
                        path: config.field_path("vm_config.runtime"),
                        message,
                    }
                })?;
            let code = code::read_local(&config.vm.code, engine, base_dir).map_err(|error| {
                LoadError::Config {
                    path: config.field_path("vm_config.code"),
                    message: error.to_string(),
                }
            })?;
            let key = VmKey::new(config, engine, &code);
            let module = match modules.iter().position(|m| m.key == key) {
                Some(index) => {
                    modules[index].roots.push(abi_config(config).root());
                    index
                }
                None => {
                    let plugin = engines
                        .load(engine, &code, abi_config(config), shared.clone())
                        .map_err(|message| LoadError::Module {
                            plugin: config.name.clone(),
                            message,
                        })?;
                    modules.push(Module {
                        key,
                        plugin,
                        roots: vec![abi_config(config).root()],
                    });
                    modules.len() - 1
                }
            };
            entries.push(Entry {
                config: config.clone(),
                module,
                root: modules[module].roots.len() - 1,
                counters: Arc::default(),
            });
        }
        let plugins = Plugins {
            modules,
            entries,
            http_filters: deployment.http_filters.len(),
            network_filters: deployment.network_filters.len(),
            shared,
        };
        plugins.check()?;
        Ok(plugins)
    }

    /// Starts a throwaway copy of every module to refuse plugins that reject their
    /// configuration (Envoy's canary).
    fn check(&self) -> Result<(), LoadError> {
        for (index, module) in self.modules.iter().enumerate() {
            let name_of = |root: usize| {
                self.entries
                    .iter()
                    .find(|e| e.module == index && e.root == root)
                    .map(|e| e.config.name.clone())
                    .unwrap_or_default()
            };
            if let Err((root, reason)) = VmCopy::start(module, Box::new(InMemoryHost::new())) {
                return Err(LoadError::Rejected {
                    plugin: name_of(root),
                    reason,
                });
            }
        }
        Ok(())
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
}

/// One VM copy of a module on a thread, with the root context of each plugin sharing it.
struct VmCopy {
    vm: Vm,
    roots: Vec<ContextId>,
}

impl VmCopy {
    /// A new copy with every plugin's root context started and configured; on failure, which
    /// root failed and why.
    fn start(module: &Module, host: Box<dyn Host>) -> Result<VmCopy, (usize, String)> {
        let mut vm = Vm::new(&module.plugin, host).map_err(|e| (0, e.to_string()))?;
        let mut roots = vec![vm.root_context()];
        for config in &module.roots[1..] {
            roots.push(vm.add_root(config.clone()));
        }
        for (index, root) in roots.iter().enumerate() {
            let fail = |what: &str| (index, format!("its {what} returned false"));
            match vm.start_root(*root) {
                Ok(true) => {}
                Ok(false) => return Err(fail("proxy_on_vm_start")),
                Err(error) => return Err((index, error.to_string())),
            }
            match vm.configure_root(*root) {
                Ok(true) => {}
                Ok(false) => return Err(fail("proxy_on_configure")),
                Err(error) => return Err((index, error.to_string())),
            }
        }
        Ok(VmCopy { vm, roots })
    }
}

/// What a stream gets from a plugin.
pub enum Admission<'a> {
    /// Run the stream through the plugin: its VM copy on this thread and its root context.
    Run {
        /// The VM copy.
        vm: &'a mut Vm,
        /// The plugin's root context in it.
        root: ContextId,
    },
    /// The plugin failed: answer the stream with a local 503 (gRPC status 14 UNAVAILABLE for a
    /// gRPC request), details `wasm_fail_stream`, as Envoy fails a stream closed.
    FailClosed,
    /// The plugin failed: pass the stream on without it.
    FailOpen,
}

/// The details of a stream failed closed, as Envoy writes them.
pub const FAIL_STREAM_DETAILS: &str = "wasm_fail_stream";

/// Where a module's copy on a thread stands.
enum Slot {
    /// Not made yet on this thread.
    Empty,
    /// Ready (or failed: see `Vm::is_failed`).
    Ready(Box<VmCopy>),
    /// Could not be made; retried under `FAIL_RELOAD` as a failed copy is.
    Broken,
}

/// A source of time, so that tests can step through a reload backoff.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// A worker thread's view of the plugins: its own VM copy of each module, made on first use.
pub struct Worker {
    plugins: Arc<Plugins>,
    host: Box<dyn Fn() -> Box<dyn Host> + Send>,
    slots: Vec<Slot>,
    /// Per module: when the copy last failed, how many reloads in a row, when it may reload.
    reload: Vec<ReloadState>,
    clock: Clock,
}

#[derive(Clone, Copy)]
struct ReloadState {
    /// Consecutive reloads without a copy lasting `max_interval`.
    attempts: u32,
    /// When the current copy was made (or last failed to be).
    last_load: Instant,
}

impl Worker {
    /// A worker whose VM copies get their hosts from `host` (one per copy).
    pub fn new(plugins: Arc<Plugins>, host: impl Fn() -> Box<dyn Host> + Send + 'static) -> Worker {
        let modules = plugins.modules.len();
        let now = Instant::now();
        Worker {
            plugins,
            host: Box::new(host),
            slots: (0..modules).map(|_| Slot::Empty).collect(),
            reload: vec![
                ReloadState {
                    attempts: 0,
                    last_load: now,
                };
                modules
            ],
            clock: Arc::new(Instant::now),
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

    /// The plugins.
    pub fn plugins(&self) -> &Arc<Plugins> {
        &self.plugins
    }

    /// What a new stream gets from `plugin`: its VM copy on this thread (made now if this is the
    /// thread's first use, or remade under `FAIL_RELOAD` once the backoff allows), or what the
    /// plugin's failure policy says when the copy has failed.
    pub fn admit(&mut self, plugin: PluginId) -> Admission<'_> {
        let entry = &self.plugins.entries[plugin.0];
        let module = entry.module;
        let policy = entry.config.failure_policy;
        let counters = Arc::clone(&entry.counters);
        let root_index = entry.root;
        let usable = match &self.slots[module] {
            Slot::Ready(copy) => !copy.vm.is_failed(),
            Slot::Empty | Slot::Broken => false,
        };
        if !usable {
            let first_use = matches!(self.slots[module], Slot::Empty);
            if first_use || self.may_reload(module, policy) {
                self.make_copy(module, first_use, &counters);
            }
        }
        match &mut self.slots[module] {
            Slot::Ready(copy) if !copy.vm.is_failed() => Admission::Run {
                root: copy.roots[root_index],
                vm: &mut copy.vm,
            },
            _ => match policy {
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

    /// Whether a failed copy may be replaced now: only under `FAIL_RELOAD`, once as long has
    /// passed since the copy was made as the backoff asks (as Envoy, which measures from the
    /// copy's load): the base interval, doubling with every reload in a row up to the max
    /// interval. A copy that lasted the max interval starts the sequence again.
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
        let lasted = now.saturating_duration_since(state.last_load);
        if lasted >= max_interval {
            state.attempts = 0;
        }
        if lasted < backoff(base_interval, max_interval, state.attempts) {
            return false;
        }
        state.attempts = state.attempts.saturating_add(1);
        true
    }

    fn make_copy(&mut self, module: usize, first_use: bool, counters: &Counters) {
        let host = (self.host)();
        self.reload[module].last_load = (self.clock)();
        match VmCopy::start(&self.plugins.modules[module], host) {
            Ok(copy) => {
                self.slots[module] = Slot::Ready(Box::new(copy));
                if !first_use {
                    Counters::add(&counters.reloads);
                }
            }
            Err(_) => {
                Counters::add(&counters.failed_to_start);
                self.slots[module] = Slot::Broken;
            }
        }
    }

    /// Records that a callback of `plugin` failed its VM copy (the error a `Vm` method
    /// returned), for the plugin's counters; the next [`Worker::admit`] applies its policy.
    pub fn failed(&mut self, plugin: PluginId, error: &VmError) {
        let counters = &self.plugins.entries[plugin.0].counters;
        match error.trap().map(|t| &t.kind) {
            Some(runtime_api::TrapKind::DeadlineExceeded | runtime_api::TrapKind::Interrupted) => {
                Counters::add(&counters.failed_by_deadline)
            }
            Some(_) => Counters::add(&counters.failed_by_trap),
            // A call refused on an already failed VM is no new failure.
            None => {}
        }
    }
}

/// The wait before reload attempt `attempts` (0 for the first): `base` doubling per attempt,
/// at most `max`, with Envoy's jitter (up to half the wait more).
fn backoff(base: Duration, max: Duration, attempts: u32) -> Duration {
    let wait = base
        .saturating_mul(1u32.checked_shl(attempts.min(31)).unwrap_or(u32::MAX))
        .min(max);
    wait + jitter(wait / 2)
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
