//! The host-side state of one VM, which every host function receives.

use std::sync::Arc;
use std::time::Duration;

use runtime_api::GuestFunction;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::callbacks::Callback;
use crate::filter_state::PropertyDeclaration;
use crate::shared::QueueOwner;
use crate::stream::StreamState;
use crate::{
    AbiVersion, ContextId, HeaderMap, Host, HttpCallResponse, PluginConfig, RootConfig, SharedState,
};

/// What kind of context an id names.
pub(crate) enum ContextKind {
    Root(RootState),
    Stream(StreamState),
}

/// A root context: one plugin of the VM.
pub(crate) struct RootState {
    /// Its plugin's name, root id and configuration.
    pub(crate) config: Arc<RootConfig>,
    /// What `proxy_get_status` reports: the code of the last failed HTTP call (11, "reset") or
    /// closed gRPC call, 0 before any. The message is readable only in the callback that set it.
    pub(crate) status: (u32, Vec<u8>),
    /// Properties it declared (`declare_property`), by name.
    pub(crate) declarations: FxHashMap<Vec<u8>, PropertyDeclaration>,
}

impl RootState {
    pub(crate) fn new(config: RootConfig) -> Self {
        RootState {
            config: Arc::new(config),
            status: (0, Vec::new()),
            declarations: FxHashMap::default(),
        }
    }
}

/// Host functions a plugin may call while the host is inside code of the plugin that must not
/// act on the proxy: its start function, or its allocator running for a host call's reply.
/// Anything else traps and fails the VM, as proxy-wasm-cpp-host does on V8 (here on every
/// engine). The lists are proxy-wasm-cpp-host's widened where real toolchains need it: the start
/// function may call every WASI function (cpp-host lists nine), the allocator may also poll
/// (Go's runtime does), and Emscripten's memory-growth notice is allowed in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Restriction {
    /// No restriction.
    None,
    /// `_initialize` / `_start` / `main`: WASI and `proxy_log` only.
    Start,
    /// `proxy_on_memory_allocate` / `malloc` for a reply: logging, time and WASI `poll_oneoff`
    /// (which Go's runtime may call from its allocator).
    Allocator,
}

impl Restriction {
    /// Whether the host function `module.name` may run under this restriction.
    pub(crate) fn allows(self, module: &str, name: &str) -> bool {
        let wasi = matches!(module, "wasi_snapshot_preview1" | "wasi_unstable");
        match self {
            Restriction::None => true,
            Restriction::Start => wasi || is_notification(name) || name == "proxy_log",
            Restriction::Allocator => {
                is_notification(name)
                    || name == "proxy_log"
                    || (wasi && matches!(name, "fd_write" | "clock_time_get" | "poll_oneoff"))
            }
        }
    }

    /// The functions allowed, for error messages.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Restriction::None => "any host function",
            Restriction::Start => "WASI functions and proxy_log",
            Restriction::Allocator => "proxy_log, fd_write, clock_time_get and poll_oneoff",
        }
    }
}

/// Emscripten's memory-growth notice comes from the allocator itself (sbrk) and does nothing.
fn is_notification(name: &str) -> bool {
    name == "emscripten_notify_memory_growth"
}

/// The per-VM state the engine keeps beside the guest and hands to host functions.
///
/// It is created by [`crate::Vm`]; embedders reach the [`Host`] inside through
/// [`crate::Vm::host`].
pub struct VmState {
    pub(crate) host: Box<dyn Host>,
    /// The module's ABI version (a few answers differ for 0.1.0, as in Envoy).
    pub(crate) abi: AbiVersion,
    pub(crate) config: Arc<PluginConfig>,
    pub(crate) shared: SharedState,
    /// The guest's allocator, resolved once at start.
    pub(crate) allocator: Option<GuestFunction>,
    /// The context that host calls act on: the callback's context unless the plugin switched it
    /// with `proxy_set_effective_context`.
    pub(crate) effective_context: ContextId,
    /// The context the running callback was called for (what `proxy_set_effective_context(0)`
    /// goes back to).
    pub(crate) callback_context: ContextId,
    /// The callback running now (`None` between callbacks and while the module starts).
    pub(crate) callback: Option<Callback>,
    /// Host functions the plugin may call right now.
    pub(crate) restriction: Restriction,
    /// The capabilities the plugin is restricted to, if any (see
    /// [`PluginConfig::allowed_capabilities`]); `None` when unrestricted.
    pub(crate) allowed_capabilities: Option<Arc<std::collections::BTreeSet<String>>>,
    /// Set by `proxy_send_local_response`: the running callback's result is overridden to stop
    /// the stream (proxy-wasm-cpp-host's `stopNextIteration`).
    pub(crate) stop_iteration: bool,
    /// Every live context; a hash map keyed by id, so lookups cost no tree walk.
    pub(crate) contexts: FxHashMap<u32, ContextKind>,
    /// The HTTP call response being delivered, readable while `proxy_on_http_call_response` runs.
    pub(crate) http_call_response: Option<HttpCallResponse>,
    /// The tick period each root context asked for.
    pub(crate) tick_periods: FxHashMap<u32, Duration>,
    /// Root contexts whose `proxy_on_done` returned false: they owe a `proxy_done`.
    pub(crate) pending_done: Vec<ContextId>,
    /// Where queues this VM registers send their "ready" notifications.
    pub(crate) queue_owner: QueueOwner,
    /// Which root context made each pending HTTP or gRPC call, by token: answers go there.
    pub(crate) callout_roots: FxHashMap<u32, ContextId>,
    /// What owns the metric ids this VM defines (see [`SharedState::define_metric_for`]).
    pub(crate) metric_owner: Arc<str>,
    /// The pending calls of `callout_roots` that are unary gRPC calls: closing one cancels it,
    /// and no callback comes.
    pub(crate) unary_grpc_calls: FxHashSet<u32>,
    /// Arguments of the foreign function call being delivered (`CallData` buffer).
    pub(crate) call_data: Option<Vec<u8>>,
    /// gRPC initial metadata being delivered (map type 4).
    pub(crate) grpc_initial_metadata: Option<HeaderMap>,
    /// gRPC trailing metadata being delivered (map type 5).
    pub(crate) grpc_trailing_metadata: Option<HeaderMap>,
    /// The gRPC message being delivered (`GrpcReceiveBuffer`).
    pub(crate) grpc_message: Option<Vec<u8>>,
    /// Whether the plugin configuration is readable: only while the root context is created
    /// and configured, as in Envoy.
    pub(crate) plugin_configuration_readable: bool,
    /// Data of foreign functions kept per VM (e.g. compiled CEL expressions), by type.
    pub(crate) foreign_data: FxHashMap<std::any::TypeId, Box<dyn std::any::Any + Send>>,
    /// The host's limits the plugin has been told it met (see [`VmState::tell_limit`]).
    limits_told: Vec<Limit>,
}

/// A limit of the host that Envoy does not have, met by a plugin: its call fails with a status
/// that alone would not say why (the README's host function and foreign function tables give
/// each), so the plugin's log says it once (see [`VmState::tell_limit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Limit {
    /// A metric name over [`crate::shared::MAX_METRIC_NAME_BYTES`].
    MetricName,
    /// A new metric past [`crate::shared::MAX_METRICS`] names.
    MetricCount,
    /// A CEL expression too long, or nested too deep.
    ExpressionSize,
    /// A CEL expression with a comprehension (`all`, `exists`, `exists_one`, `map`, `filter`).
    ExpressionComprehension,
    /// A string or bytes value too long for a CEL expression to read.
    ExpressionValue,
    /// A VM id's shared data at [`crate::SharedLimits::data_bytes_per_vm_id`].
    SharedData,
    /// A VM id's waiting queue items at [`crate::SharedLimits::queue_bytes_per_vm_id`].
    QueueBytes,
    /// A VM id's queues at [`crate::SharedLimits::queues_per_vm_id`].
    Queues,
    /// A queue name over [`crate::SharedLimits::QUEUE_NAME_BYTES`].
    QueueName,
    /// A property path over `MAX_PROPERTY_PATH_BYTES` (`crate::exports::properties`).
    PropertyPath,
    /// A stream's properties past [`crate::filter_state::MAX_FILTER_STATE_OBJECTS`] or
    /// [`crate::filter_state::MAX_FILTER_STATE_BYTES`].
    FilterState,
    /// A root context's property declarations past
    /// [`crate::filter_state::MAX_DECLARATIONS`] or [`crate::filter_state::MAX_DECLARATION_BYTES`].
    PropertyDeclarations,
    /// A VM's compiled CEL expressions past `MAX_PROGRAMS` (`crate::foreign::expressions`).
    ExpressionCount,
    /// A VM's open calls at [`crate::MAX_OPEN_CALLS`].
    OpenCalls,
    /// A stream's header writes past [`crate::MAX_HEADER_BYTES_WRITTEN`].
    HeaderBytes,
    /// A body or message buffer grown past [`crate::MAX_BODY_BYTES`].
    BodyBytes,
    /// A call's body or message over [`crate::MAX_BODY_BYTES`].
    CallBytes,
    /// Foreign function arguments over [`crate::MAX_FOREIGN_ARGUMENT_BYTES`].
    ForeignArguments,
}

impl VmState {
    pub(crate) fn new(
        host: Box<dyn Host>,
        abi: AbiVersion,
        config: Arc<PluginConfig>,
        shared: SharedState,
        queue_owner: QueueOwner,
        metric_owner: Arc<str>,
    ) -> Self {
        VmState {
            metric_owner,
            host,
            abi,
            shared,
            allocator: None,
            effective_context: ContextId(0),
            callback_context: ContextId(0),
            callback: None,
            restriction: Restriction::None,
            allowed_capabilities: config
                .allowed_capabilities
                .as_ref()
                .filter(|allowed| !allowed.is_empty())
                .map(|allowed| Arc::new(allowed.clone())),
            config: Arc::clone(&config),
            stop_iteration: false,
            contexts: FxHashMap::default(),
            http_call_response: None,
            tick_periods: FxHashMap::default(),
            pending_done: Vec::new(),
            queue_owner,
            callout_roots: FxHashMap::default(),
            unary_grpc_calls: FxHashSet::default(),
            call_data: None,
            grpc_initial_metadata: None,
            grpc_trailing_metadata: None,
            grpc_message: None,
            plugin_configuration_readable: false,
            foreign_data: FxHashMap::default(),
            limits_told: Vec::new(),
        }
    }

    /// Tells the plugin, through its log, that it met `limit` (`why`: the limit and the
    /// status it got): once per VM and limit, so that a plugin calling in a loop does not flood
    /// the proxy's log.
    #[cold]
    pub(crate) fn tell_limit(&mut self, limit: Limit, why: impl FnOnce() -> String) {
        if self.limits_told.contains(&limit) {
            return;
        }
        self.limits_told.push(limit);
        let context = self.effective_context;
        self.host.log(
            context,
            crate::LogLevel::Warn,
            &format!("pwhost limit: {}", why()),
        );
    }

    /// The root context of the effective context (itself if it is a root).
    pub(crate) fn effective_root(&self) -> ContextId {
        match self.contexts.get(&self.effective_context.0) {
            Some(ContextKind::Stream(stream)) => stream.root,
            _ => self.effective_context,
        }
    }

    /// The root context the plugin acts on (the effective context's root).
    pub(crate) fn effective_root_state(&mut self) -> Option<&mut RootState> {
        let root = self.effective_root();
        match self.contexts.get_mut(&root.0) {
            Some(ContextKind::Root(state)) => Some(state),
            _ => None,
        }
    }

    /// The configuration of the plugin the effective context belongs to.
    pub(crate) fn effective_root_config(&self) -> Option<&RootConfig> {
        match self.contexts.get(&self.effective_root().0) {
            Some(ContextKind::Root(state)) => Some(&state.config),
            _ => None,
        }
    }

    /// The stream the plugin acts on, or `None` if the effective context is a root context.
    pub(crate) fn effective_stream(&mut self) -> Option<&mut StreamState> {
        match self.contexts.get_mut(&self.effective_context.0) {
            Some(ContextKind::Stream(stream)) => Some(stream),
            _ => None,
        }
    }
}
