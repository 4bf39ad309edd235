//! A running VM: one instance of a plugin, its contexts, and the callbacks into it.

use std::time::Duration;

use runtime_api::{GuestFunction, Instance, InterruptHandle, Trap, TrapKind};

use crate::callbacks::{Callback, CALLBACKS, CALLBACK_COUNT};
use crate::shared::QueueOwner;
use crate::state::{ContextKind, Restriction, RootState};
use crate::stream::{Part, StreamKind, StreamState};
use crate::{
    AbiVersion, ContextId, DataAction, HeaderMap, HeadersAction, Host, HttpCallResponse, PeerType,
    Plugin, RootConfig, Status, VmState,
};

/// Why a call into a VM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The engine could not instantiate the module (its message already says so; being the
    /// error's own text rather than a wrapper keeps it from appearing twice in error chains).
    #[error(transparent)]
    Instantiate(#[from] runtime_api::Error),
    /// Plugin code trapped (or was stopped); the VM is now failed.
    #[error(
        "{callback} trapped in context {context}: {trap}{}",
        if *.out_of_memory { " (out of memory under the memory cap)" } else { "" }
    )]
    Trap {
        /// The export that was running.
        callback: &'static str,
        /// The context it ran for.
        context: ContextId,
        /// What stopped it.
        trap: Trap,
        /// The guest had run out of memory under the memory cap when it trapped (an SDK's
        /// allocator aborts when `memory.grow` fails). Where the engine says when the cap
        /// refuses a `memory.grow` (wasmtime, wasmi), that is what counts; elsewhere (wasmer,
        /// WAMR, V8, which enforce the cap as the memory's maximum) the memory's size tells:
        /// past half the cap, an allocator that doubles its heap (TinyGo's) can no longer grow,
        /// and one that grows by what it needs fails nearer the cap.
        out_of_memory: bool,
    },
    /// An earlier trap failed the VM; it runs no more plugin code.
    #[error("the VM failed earlier and runs no more plugin code ({0})")]
    Failed(String),
    /// The context does not exist (never created, or deleted).
    #[error("unknown context {0}")]
    UnknownContext(ContextId),
}

impl VmError {
    /// The trap behind the error, if plugin code trapped.
    pub fn trap(&self) -> Option<&Trap> {
        match self {
            VmError::Trap { trap, .. } => Some(trap),
            _ => None,
        }
    }
}

/// Wakes a VM waiting in [`Vm::wait_for_queue_ready`], from any thread.
#[derive(Clone, Debug)]
pub struct VmWaker(std::sync::mpsc::Sender<(u32, u32)>);

impl VmWaker {
    /// Wakes the VM (a no-op once the VM is gone).
    pub fn wake(&self) {
        let _ = self.0.send((0, 0));
    }
}

/// One instance of a plugin with its contexts.
///
/// A `Vm` is used by one thread at a time and may move between threads. Create as many as needed
/// from one [`Plugin`] (e.g. one per worker thread): they share the compiled, linked module and
/// the plugin's [`crate::SharedState`], and nothing else.
pub struct Vm {
    instance: Box<dyn Instance<VmState>>,
    callbacks: [Export; CALLBACK_COUNT],
    /// How many of the arguments a callback is given its export takes.
    callback_params: [usize; CALLBACK_COUNT],
    abi: AbiVersion,
    /// The first root context (the plugin's own).
    root: ContextId,
    next_context_id: u32,
    failure: Option<String>,
    /// Queues of this VM that received items, with the root context that registered each, to
    /// deliver as `proxy_on_queue_ready`.
    queue_ready: std::sync::mpsc::Receiver<(u32, u32)>,
}

/// A callback's export in the instance.
#[derive(Clone, Copy)]
enum Export {
    /// Not exported (or left out by the plugin's capability restriction): never called.
    Absent,
    /// Exported, not yet looked up in the instance: a module exports some twenty callbacks and a
    /// request calls a handful, and a lookup can cost more than a call (on wasmtime ~1.8 k
    /// instructions; all of them were nearly half of a VM start), so each is looked up at its
    /// first call.
    Unresolved,
    /// Looked up.
    Resolved(GuestFunction),
}

impl Drop for Vm {
    /// The VM's queues go to another VM that registered them, if one lives, with their items.
    fn drop(&mut self) {
        let state = self.instance.state();
        state.shared.release_queues(&state.queue_owner);
    }
}

impl Vm {
    /// Instantiates `plugin` with `host` as its view of the proxy, and runs the module's
    /// initialisation (`_initialize`, else `_start`, else `main(0, 0)`).
    pub fn new(plugin: &Plugin, host: Box<dyn Host>) -> Result<Vm, VmError> {
        let (notify, queue_ready) = std::sync::mpsc::channel();
        let state = VmState::new(
            host,
            plugin.abi,
            plugin.config.clone(),
            plugin.shared.clone(),
            QueueOwner::new(notify),
            // The VM's metric ids are its module's and VM id's, as Envoy's belong to a VM
            // (copies of one VM on other threads define theirs again).
            format!("{}/{}", plugin.module_serial, plugin.config.vm_id).into(),
        );
        let mut instance = plugin.linked.instantiate(state)?;
        let root = ContextId(1);
        instance.state().contexts.insert(
            root.0,
            ContextKind::Root(RootState::new(plugin.config.root())),
        );
        let mut callbacks = [Export::Absent; CALLBACK_COUNT];
        // Callbacks the plugin's capability restriction leaves out are never called, as if the
        // module did not export them.
        let allowed = |name: &str| match &plugin.config.allowed_capabilities {
            Some(allowed) if !allowed.is_empty() => allowed.contains(name),
            _ => true,
        };
        for ((slot, spec), params) in callbacks
            .iter_mut()
            .zip(CALLBACKS.iter())
            .zip(plugin.callback_params)
        {
            // A parameter count: exported, and of the module's ABI version (`check_exports`).
            if params.is_some() && allowed(spec.name) {
                *slot = Export::Unresolved;
            }
        }
        let allocator = instance
            .function("proxy_on_memory_allocate")
            .or_else(|| instance.function("malloc"));
        instance.state().allocator = allocator;
        let mut vm = Vm {
            instance,
            callbacks,
            callback_params: plugin.callback_params.map(|params| params.unwrap_or(0)),
            abi: plugin.abi,
            root,
            next_context_id: 2,
            failure: None,
            queue_ready,
        };
        vm.initialize()?;
        Ok(vm)
    }

    /// Runs the module's start function, which may call only WASI functions and `proxy_log`.
    fn initialize(&mut self) -> Result<(), VmError> {
        self.instance.state().restriction = Restriction::Start;
        let result = self.run_start_function();
        self.instance.state().restriction = Restriction::None;
        result
    }

    fn run_start_function(&mut self) -> Result<(), VmError> {
        let entry = ["_initialize", "_start"]
            .into_iter()
            .find_map(|name| Some((name, self.instance.function(name)?)));
        let result = match entry {
            Some((name, function))
                if function.param_count() == 0 && function.result_count() == 0 =>
            {
                (name, self.instance.call(function, &[], &mut []))
            }
            _ => match self.instance.function("main") {
                Some(main) if main.param_count() == 2 && main.result_count() == 1 => {
                    ("main", self.instance.call(main, &[0, 0], &mut [0]))
                }
                _ => return Ok(()),
            },
        };
        match result {
            // A command module's `_start` may end with `proc_exit(0)`: that is a normal end.
            (_, Ok(()))
            | (
                _,
                Err(Trap {
                    kind: TrapKind::Exit(0),
                    ..
                }),
            ) => Ok(()),
            (name, Err(trap)) => Err(self.fail(name, ContextId(0), trap)),
        }
    }

    fn fail(&mut self, callback: &'static str, context: ContextId, trap: Trap) -> VmError {
        let out_of_memory = matches!(trap.kind, TrapKind::Wasm) && self.memory_exhausted();
        let error = VmError::Trap {
            callback,
            context,
            trap,
            out_of_memory,
        };
        self.failure = Some(error.to_string());
        // A failed VM dequeues nothing more: its queues' notifications go to another VM that
        // registered them, if one lives.
        let state = self.instance.state();
        state.shared.release_queues(&state.queue_owner);
        // The host is told, as it is called elsewhere: never unwinding into the embedder (the
        // VM is failed already).
        let host = &mut state.host;
        if let Err(panic) =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| host.vm_failed()))
        {
            tracing::error!(
                "the host panicked when told its VM failed: {}",
                runtime_api::panic_message(&*panic)
            );
        }
        error
    }

    /// Whether the guest ran out of memory under the cap (see `VmError::Trap`).
    fn memory_exhausted(&mut self) -> bool {
        match self.instance.memory_grow_refused() {
            Some(refused) => refused,
            None => self
                .instance
                .memory_limit()
                .is_some_and(|limit| self.instance.memory_size() > limit / 2),
        }
    }

    /// Calls `callback` for `context`. A missing export is not an error: the result slots keep
    /// their defaults, which the callers choose to mean what the spec's default behaviour is.
    /// Returns whether `proxy_send_local_response` asked to stop the stream meanwhile.
    #[inline]
    fn call(
        &mut self,
        callback: Callback,
        context: ContextId,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<bool, VmError> {
        if let Some(failure) = &self.failure {
            return Err(VmError::Failed(failure.clone()));
        }
        let function = match self.callbacks[callback as usize] {
            Export::Resolved(function) => function,
            Export::Absent => return Ok(false),
            Export::Unresolved => match self.resolve(callback) {
                Some(function) => function,
                None => return Ok(false),
            },
        };
        let state = self.instance.state();
        state.effective_context = context;
        state.callback_context = context;
        state.callback = Some(callback);
        state.stop_iteration = false;
        let args = &args[..self.callback_params[callback as usize].min(args.len())];
        // A panic under the call (in the engine, in a host function, in the embedder's `Host`)
        // fails the VM as a trap does, instead of unwinding into the embedder: the VM is never
        // called again, so nothing the panic left half-done in it is seen (hence
        // `AssertUnwindSafe`; the embedder's `Host` is told of the failure, and must cope with
        // what its own panic left), and shared state is behind poison-tolerant locks.
        let instance = &mut self.instance;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            instance.call(function, args, results)
        }))
        .unwrap_or_else(|panic| {
            Err(Trap::host(format!(
                "panicked: {}",
                runtime_api::panic_message(&*panic)
            )))
        });
        let state = self.instance.state();
        state.callback = None;
        match result {
            Ok(()) => Ok(std::mem::take(&mut state.stop_iteration)),
            Err(trap) => Err(self.fail(CALLBACKS[callback as usize].name, context, trap)),
        }
    }

    /// Looks `callback` up in the instance, at its first call.
    #[cold]
    fn resolve(&mut self, callback: Callback) -> Option<GuestFunction> {
        let function = self.instance.function(CALLBACKS[callback as usize].name);
        self.callbacks[callback as usize] = match function {
            Some(function) => Export::Resolved(function),
            None => Export::Absent,
        };
        function
    }

    fn stream(&mut self, context: ContextId) -> Result<&mut StreamState, VmError> {
        match self.instance.state().contexts.get_mut(&context.0) {
            Some(ContextKind::Stream(stream)) => Ok(stream),
            _ => Err(VmError::UnknownContext(context)),
        }
    }

    fn check_stream(&mut self, context: ContextId) -> Result<(), VmError> {
        self.stream(context).map(|_| ())
    }

    /// Hands `part` of the stream to the plugin for one callback and lets go of it again if the
    /// callback returned `continues`.
    fn release_if(&mut self, context: ContextId, part: Part, continues: bool) {
        if continues {
            if let Ok(stream) = self.stream(context) {
                stream.release(part);
            }
        }
    }

    /// The filter state of a stream or connection: the properties the plugin set on it and the
    /// Envoy objects it set with `set_envoy_filter_state` (e.g. `envoy.tcp_proxy.cluster`), until
    /// the context is deleted. Empty for a root context or an unknown one.
    pub fn filter_state(&mut self, context: ContextId) -> &[crate::FilterStateObject] {
        match self.instance.state().contexts.get(&context.0) {
            Some(ContextKind::Stream(stream)) => stream.filter_state.objects(),
            _ => &[],
        }
    }

    /// Whether the plugin exports callback `name` (e.g. `proxy_on_response_body`), so that an
    /// embedder can skip work only that callback needs, such as passing bodies through a
    /// plugin that never looks at them.
    pub fn exports_callback(&self, name: &str) -> bool {
        CALLBACKS
            .iter()
            .position(|spec| spec.name == name)
            .is_some_and(|index| !matches!(self.callbacks[index], Export::Absent))
    }

    /// The ABI version the plugin was built for.
    pub fn abi_version(&self) -> AbiVersion {
        self.abi
    }

    /// Whether an earlier trap failed the VM (then every call returns [`VmError::Failed`]).
    pub fn is_failed(&self) -> bool {
        self.failure.is_some()
    }

    /// The plugin's own root context (the first; see [`Vm::add_root`] for others).
    pub fn root_context(&self) -> ContextId {
        self.root
    }

    /// Every root context, the plugin's own first.
    pub fn roots(&mut self) -> Vec<ContextId> {
        let mut roots: Vec<ContextId> = self
            .instance
            .state()
            .contexts
            .iter()
            .filter(|(_, kind)| matches!(kind, ContextKind::Root(_)))
            .map(|(id, _)| ContextId(*id))
            .collect();
        roots.sort();
        roots
    }

    /// Adds the root context of another plugin sharing this VM (as Envoy runs plugins with the
    /// same VM key in one VM): its own name, root id and configuration; start and configure it
    /// with [`Vm::start_root`] and [`Vm::configure_root`], and give it streams with
    /// [`Vm::create_http_context_for`].
    pub fn add_root(&mut self, config: RootConfig) -> ContextId {
        let root = self.next_id();
        self.instance
            .state()
            .contexts
            .insert(root.0, ContextKind::Root(RootState::new(config)));
        root
    }

    fn next_id(&mut self) -> ContextId {
        loop {
            let id = self.next_context_id;
            self.next_context_id = self.next_context_id.wrapping_add(1).max(2);
            if !self.instance.state().contexts.contains_key(&id) {
                return ContextId(id);
            }
        }
    }

    fn check_root(&mut self, root: ContextId) -> Result<(), VmError> {
        match self.instance.state().contexts.get(&root.0) {
            Some(ContextKind::Root(_)) => Ok(()),
            _ => Err(VmError::UnknownContext(root)),
        }
    }

    /// The embedder's host, to feed it data or read what plugins did.
    pub fn host(&mut self) -> &mut dyn Host {
        &mut *self.instance.state().host
    }

    /// The embedder's host as its concrete type, if it is a `T`.
    pub fn host_as<T: Host>(&mut self) -> Option<&mut T> {
        let host: &mut dyn std::any::Any = &mut *self.instance.state().host;
        host.downcast_mut::<T>()
    }

    /// A handle that stops a running callback from another thread, if the engine supports it.
    pub fn interrupt_handle(&self) -> Option<std::sync::Arc<dyn InterruptHandle>> {
        self.instance.interrupt_handle()
    }

    /// The guest's current linear memory size in bytes.
    pub fn memory_size(&mut self) -> usize {
        self.instance.memory_size()
    }

    /// The tick period the plugin's root context asked for with
    /// `proxy_set_tick_period_milliseconds`.
    pub fn tick_period(&mut self) -> Option<Duration> {
        let root = self.root;
        self.tick_period_of(root)
    }

    /// The tick period root context `root` asked for.
    pub fn tick_period_of(&mut self, root: ContextId) -> Option<Duration> {
        self.instance.state().tick_periods.get(&root.0).copied()
    }

    /// Creates the plugin's root context and calls `proxy_on_vm_start`. Returns whether the
    /// plugin accepted its VM configuration.
    pub fn start(&mut self) -> Result<bool, VmError> {
        let root = self.root;
        self.start_root(root)
    }

    /// Creates root context `root` in the plugin (`proxy_on_context_create`) and calls its
    /// `proxy_on_vm_start`, as Envoy does for every root context. Returns whether it accepted
    /// the VM configuration.
    pub fn start_root(&mut self, root: ContextId) -> Result<bool, VmError> {
        self.check_root(root)?;
        // As in Envoy, the plugin configuration is readable while the root context is created
        // and configured, not in `proxy_on_vm_start` (which must not depend on the plugin).
        self.with_plugin_configuration(|vm| {
            vm.call(
                Callback::ContextCreate,
                root,
                &[u64::from(root.0), 0],
                &mut [],
            )
        })?;
        let size = self.instance.state().config.vm_configuration.len() as u64;
        let mut ok = [1];
        self.call(Callback::VmStart, root, &[u64::from(root.0), size], &mut ok)?;
        Ok(ok[0] != 0)
    }

    fn with_plugin_configuration<T>(&mut self, call: impl FnOnce(&mut Self) -> T) -> T {
        self.instance.state().plugin_configuration_readable = true;
        let result = call(self);
        self.instance.state().plugin_configuration_readable = false;
        result
    }

    /// Calls `proxy_on_configure` on the plugin's root context. Returns whether the plugin
    /// accepted its configuration.
    pub fn configure(&mut self) -> Result<bool, VmError> {
        let root = self.root;
        self.configure_root(root)
    }

    /// Calls `proxy_on_configure` on root context `root` with its plugin's configuration.
    pub fn configure_root(&mut self, root: ContextId) -> Result<bool, VmError> {
        let size = match self.instance.state().contexts.get(&root.0) {
            Some(ContextKind::Root(state)) => state.config.plugin_configuration.len() as u64,
            _ => return Err(VmError::UnknownContext(root)),
        };
        let mut ok = [1];
        self.with_plugin_configuration(|vm| {
            vm.call(
                Callback::Configure,
                root,
                &[u64::from(root.0), size],
                &mut ok,
            )
        })?;
        Ok(ok[0] != 0)
    }

    /// Calls `proxy_on_tick` on the plugin's root context.
    pub fn tick(&mut self) -> Result<(), VmError> {
        let root = self.root;
        self.tick_root(root)
    }

    /// Calls `proxy_on_tick` on root context `root`.
    pub fn tick_root(&mut self, root: ContextId) -> Result<(), VmError> {
        self.check_root(root)?;
        self.call(Callback::Tick, root, &[u64::from(root.0)], &mut [])?;
        Ok(())
    }

    /// Creates a context for a new HTTP stream of the plugin's root context.
    pub fn create_http_context(&mut self) -> Result<ContextId, VmError> {
        let root = self.root;
        self.create_stream_context(root, StreamKind::Http)
    }

    /// Creates a context for a new HTTP stream of root context `root`.
    pub fn create_http_context_for(&mut self, root: ContextId) -> Result<ContextId, VmError> {
        self.check_root(root)?;
        self.create_stream_context(root, StreamKind::Http)
    }

    fn create_stream_context(
        &mut self,
        root: ContextId,
        kind: StreamKind,
    ) -> Result<ContextId, VmError> {
        let context = self.next_id();
        let contexts = &mut self.instance.state().contexts;
        let mut stream = StreamState::new(root, kind);
        if let Some(ContextKind::Root(root)) = contexts.get(&root.0) {
            stream.allow_on_headers_stop_iteration = root.config.allow_on_headers_stop_iteration;
        }
        contexts.insert(context.0, ContextKind::Stream(stream));
        self.call(
            Callback::ContextCreate,
            context,
            &[u64::from(context.0), u64::from(root.0)],
            &mut [],
        )?;
        Ok(context)
    }

    fn headers_callback(
        &mut self,
        callback: Callback,
        part: Part,
        context: ContextId,
        count: usize,
        end_of_stream: bool,
    ) -> Result<HeadersAction, VmError> {
        let allow = {
            let stream = self.stream(context)?;
            stream.deliver(part);
            stream.allow_on_headers_stop_iteration
        };
        let mut action = [0];
        // A 0.1.0 export of the spec's shape takes only the first two (see `callbacks`).
        let args = [u64::from(context.0), count as u64, u64::from(end_of_stream)];
        let stopped = self.call(callback, context, &args, &mut action)?;
        let action = if stopped {
            HeadersAction::StopAllAndWatermark
        } else {
            HeadersAction::from_headers_callback(action[0], allow)
        };
        self.release_if(context, part, action.continues());
        Ok(action)
    }

    fn body_callback(
        &mut self,
        callback: Callback,
        part: Part,
        context: ContextId,
        size: usize,
        end_of_stream: bool,
    ) -> Result<DataAction, VmError> {
        self.stream(context)?.deliver_body(part, end_of_stream);
        let mut action = [0];
        let stopped = self.call(
            callback,
            context,
            &[u64::from(context.0), size as u64, u64::from(end_of_stream)],
            &mut action,
        )?;
        let action = match part {
            Part::DownstreamData | Part::UpstreamData => {
                DataAction::from_network_callback(action[0])
            }
            _ if stopped => DataAction::StopNoBuffer,
            _ => DataAction::from_body_callback(action[0]),
        };
        self.release_if(context, part, action == DataAction::Continue);
        Ok(action)
    }

    fn trailers_callback(
        &mut self,
        callback: Callback,
        part: Part,
        context: ContextId,
        count: usize,
    ) -> Result<HeadersAction, VmError> {
        self.stream(context)?.deliver(part);
        let mut action = [0];
        let stopped = self.call(
            callback,
            context,
            &[u64::from(context.0), count as u64],
            &mut action,
        )?;
        let action = if stopped {
            HeadersAction::Pause
        } else {
            HeadersAction::from_trailers_callback(action[0])
        };
        self.release_if(context, part, action.continues());
        Ok(action)
    }

    /// Calls `proxy_on_request_headers` with the number of request headers.
    pub fn on_request_headers(
        &mut self,
        context: ContextId,
        headers: usize,
        end_of_stream: bool,
    ) -> Result<HeadersAction, VmError> {
        self.headers_callback(
            Callback::RequestHeaders,
            Part::RequestHeaders,
            context,
            headers,
            end_of_stream,
        )
    }

    /// Calls `proxy_on_request_body` with the size of the (buffered) body.
    pub fn on_request_body(
        &mut self,
        context: ContextId,
        size: usize,
        end_of_stream: bool,
    ) -> Result<DataAction, VmError> {
        self.body_callback(
            Callback::RequestBody,
            Part::RequestBody,
            context,
            size,
            end_of_stream,
        )
    }

    /// Calls `proxy_on_request_trailers` with the number of trailers.
    pub fn on_request_trailers(
        &mut self,
        context: ContextId,
        trailers: usize,
    ) -> Result<HeadersAction, VmError> {
        self.trailers_callback(
            Callback::RequestTrailers,
            Part::RequestTrailers,
            context,
            trailers,
        )
    }

    /// Calls `proxy_on_response_headers` with the number of response headers.
    pub fn on_response_headers(
        &mut self,
        context: ContextId,
        headers: usize,
        end_of_stream: bool,
    ) -> Result<HeadersAction, VmError> {
        self.headers_callback(
            Callback::ResponseHeaders,
            Part::ResponseHeaders,
            context,
            headers,
            end_of_stream,
        )
    }

    /// Calls `proxy_on_response_body` with the size of the (buffered) body.
    pub fn on_response_body(
        &mut self,
        context: ContextId,
        size: usize,
        end_of_stream: bool,
    ) -> Result<DataAction, VmError> {
        self.body_callback(
            Callback::ResponseBody,
            Part::ResponseBody,
            context,
            size,
            end_of_stream,
        )
    }

    /// Calls `proxy_on_response_trailers` with the number of trailers.
    pub fn on_response_trailers(
        &mut self,
        context: ContextId,
        trailers: usize,
    ) -> Result<HeadersAction, VmError> {
        self.trailers_callback(
            Callback::ResponseTrailers,
            Part::ResponseTrailers,
            context,
            trailers,
        )
    }

    /// Calls `proxy_on_log` when the stream is complete.
    pub fn on_log(&mut self, context: ContextId) -> Result<(), VmError> {
        self.check_stream(context)?;
        self.call(Callback::Log, context, &[u64::from(context.0)], &mut [])?;
        Ok(())
    }

    /// Calls `proxy_on_done`. Returns whether the context is done (`false`: it will call
    /// `proxy_done` later).
    pub fn on_done(&mut self, context: ContextId) -> Result<bool, VmError> {
        if !self.instance.state().contexts.contains_key(&context.0) {
            return Err(VmError::UnknownContext(context));
        }
        let mut done = [1];
        self.call(Callback::Done, context, &[u64::from(context.0)], &mut done)?;
        let done = done[0] != 0;
        let state = self.instance.state();
        if !done
            && matches!(state.contexts.get(&context.0), Some(ContextKind::Root(_)))
            && !state.pending_done.contains(&context)
        {
            state.pending_done.push(context);
        }
        Ok(done)
    }

    /// Whether the plugin's root context still owes a `proxy_done` after its `proxy_on_done`
    /// returned false.
    pub fn is_done_pending(&mut self) -> bool {
        let root = self.root;
        self.is_done_pending_for(root)
    }

    /// Whether root context `root` still owes a `proxy_done`.
    pub fn is_done_pending_for(&mut self, root: ContextId) -> bool {
        self.instance.state().pending_done.contains(&root)
    }

    /// The root context that made call `token` (the plugin's own if the token is unknown).
    fn callout_root(&mut self, token: u32, done: bool) -> ContextId {
        let roots = &mut self.instance.state().callout_roots;
        let root = if done {
            roots.remove(&token)
        } else {
            roots.get(&token).copied()
        };
        root.unwrap_or(self.root)
    }

    /// Sets what `proxy_get_status` reports to root context `root`.
    fn set_status(&mut self, root: ContextId, status: (u32, Vec<u8>)) {
        if let Some(ContextKind::Root(state)) = self.instance.state().contexts.get_mut(&root.0) {
            state.status = status;
        }
    }

    /// Forgets the message of root context `root`'s status (readable in one callback only).
    fn clear_status_message(&mut self, root: ContextId) {
        if let Some(ContextKind::Root(state)) = self.instance.state().contexts.get_mut(&root.0) {
            state.status.1.clear();
        }
    }

    /// Calls `proxy_on_delete` and forgets the context.
    pub fn on_delete(&mut self, context: ContextId) -> Result<(), VmError> {
        if !self.instance.state().contexts.contains_key(&context.0) {
            return Err(VmError::UnknownContext(context));
        }
        let result = self.call(Callback::Delete, context, &[u64::from(context.0)], &mut []);
        self.instance.state().contexts.remove(&context.0);
        result.map(|_| ())
    }

    /// Delivers the response to HTTP call `token` to the root context that dispatched it. The
    /// response's headers, body and trailers are readable while the callback runs.
    pub fn on_http_call_response(
        &mut self,
        token: u32,
        response: HttpCallResponse,
    ) -> Result<(), VmError> {
        let root = self.callout_root(token, true);
        let args = [
            u64::from(root.0),
            u64::from(token),
            response.headers.len() as u64,
            response.body.len() as u64,
            response.trailers.len() as u64,
        ];
        self.instance.state().http_call_response = Some(response);
        let result = self.call(Callback::HttpCallResponse, root, &args, &mut []);
        self.instance.state().http_call_response = None;
        result.map(|_| ())
    }

    /// Tells the root context that HTTP call `token` failed (reset, timed out, or no upstream):
    /// `proxy_on_http_call_response` with no headers, body or trailers, while `proxy_get_status`
    /// reports `BrokenConnection` (11) and "reset", as in Envoy. The code stays until a later
    /// failure or gRPC close replaces it; the message is readable in this callback only.
    pub fn on_http_call_failure(&mut self, token: u32) -> Result<(), VmError> {
        let root = self.callout_root(token, true);
        self.set_status(root, (Status::BrokenConnection.code(), b"reset".to_vec()));
        let args = [u64::from(root.0), u64::from(token), 0, 0, 0];
        let result = self.call(Callback::HttpCallResponse, root, &args, &mut []);
        self.clear_status_message(root);
        result.map(|_| ())
    }

    /// Delivers `proxy_on_queue_ready` for every notification of an item enqueued (from any
    /// thread) into a queue this VM's root context registered, up to now (one per item, except
    /// that none is sent while those not delivered yet cover every item waiting): items the
    /// plugin enqueues meanwhile (e.g. into its own queue) wait for the next call, so a plugin
    /// cannot keep this going forever. Call it from the VM's own thread, e.g. once per turn of
    /// the event loop. Returns how many notifications were delivered.
    pub fn dispatch_queue_ready(&mut self) -> Result<usize, VmError> {
        let pending: Vec<(u32, u32)> = self.queue_ready.try_iter().collect();
        self.deliver_queue_ready(&pending)
    }

    fn deliver_queue_ready(&mut self, pending: &[(u32, u32)]) -> Result<usize, VmError> {
        // Taken from the channel: an item enqueued from now on is told again, even if one of
        // these callbacks fails before its turn.
        if !pending.is_empty() {
            let state = self.instance.state();
            state
                .shared
                .queue_notices_taken(&state.queue_owner, pending);
        }
        let mut delivered = 0;
        // Root 0 is no context: it is a wake-up (see `VmWaker`).
        for (root, token) in pending.iter().filter(|(root, _)| *root != 0) {
            self.call(
                Callback::QueueReady,
                ContextId(*root),
                &[u64::from(*root), u64::from(*token)],
                &mut [],
            )?;
            delivered += 1;
        }
        Ok(delivered)
    }

    /// Waits up to `timeout` (without one, until something comes) for an item to be enqueued
    /// into a queue of this VM, or for a [`VmWaker`] to wake it, then delivers
    /// `proxy_on_queue_ready` as [`Vm::dispatch_queue_ready`] does. For a VM on a thread of its
    /// own (a singleton service), which sleeps between its events.
    pub fn wait_for_queue_ready(&mut self, timeout: Option<Duration>) -> Result<usize, VmError> {
        let first = match timeout {
            Some(timeout) => self.queue_ready.recv_timeout(timeout).ok(),
            // The VM holds a sender itself, so the channel never closes under it.
            None => self.queue_ready.recv().ok(),
        };
        let mut pending: Vec<(u32, u32)> = first.into_iter().collect();
        pending.extend(self.queue_ready.try_iter());
        self.deliver_queue_ready(&pending)
    }

    /// Has `wake` run, on the enqueuing thread, every time a notification is sent for an item
    /// enqueued into a queue this VM's root contexts registered (whenever they registered it),
    /// replacing any earlier wake-up. For a VM on a thread that does not sleep in [`Vm::wait_for_queue_ready`] (a
    /// proxy's worker with its own event loop): `wake` schedules [`Vm::dispatch_queue_ready`] on
    /// that thread, as Envoy posts `onQueueReady` to the registering worker's dispatcher. A
    /// plugin that enqueues into its own queue from `proxy_on_queue_ready` wakes its VM again
    /// at once: the embedder's loop should let its other work run between deliveries.
    pub fn set_queue_wake(&mut self, wake: crate::QueueWake) {
        let owner = &self.instance.state().queue_owner;
        *owner
            .wake
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(wake);
    }

    /// A handle that wakes [`Vm::wait_for_queue_ready`] from any thread.
    pub fn waker(&mut self) -> VmWaker {
        VmWaker(self.instance.state().queue_owner.notify.clone())
    }

    /// Calls `proxy_on_foreign_function` on the root context: the host invoking a function of the
    /// plugin, with `arguments` readable as the `CallData` buffer.
    pub fn on_foreign_function(
        &mut self,
        function_id: u32,
        arguments: Vec<u8>,
    ) -> Result<(), VmError> {
        self.on_foreign_function_for(self.root, function_id, arguments)
    }

    /// As [`Vm::on_foreign_function`], on root context `root`.
    pub fn on_foreign_function_for(
        &mut self,
        root: ContextId,
        function_id: u32,
        arguments: Vec<u8>,
    ) -> Result<(), VmError> {
        self.check_root(root)?;
        let args = [
            u64::from(root.0),
            u64::from(function_id),
            arguments.len() as u64,
        ];
        self.instance.state().call_data = Some(arguments);
        let result = self.call(Callback::ForeignFunction, root, &args, &mut []);
        self.instance.state().call_data = None;
        result.map(|_| ())
    }

    /// Calls a gRPC callback on the root context that made call `token`, with `value` after the
    /// token.
    fn grpc_callback(&mut self, callback: Callback, token: u32, value: u64) -> Result<(), VmError> {
        let root = self.callout_root(token, false);
        self.grpc_callback_for(callback, root, token, value)
    }

    /// [`Vm::grpc_callback`] for root context `root`, found already.
    fn grpc_callback_for(
        &mut self,
        callback: Callback,
        root: ContextId,
        token: u32,
        value: u64,
    ) -> Result<(), VmError> {
        self.call(
            callback,
            root,
            &[u64::from(root.0), u64::from(token), value],
            &mut [],
        )?;
        Ok(())
    }

    /// Delivers the initial metadata of gRPC call or stream `token`, readable as map type
    /// `GrpcReceiveInitialMetadata` while the callback runs.
    pub fn on_grpc_receive_initial_metadata(
        &mut self,
        token: u32,
        metadata: HeaderMap,
    ) -> Result<(), VmError> {
        let count = metadata.len() as u64;
        self.instance.state().grpc_initial_metadata = Some(metadata);
        let result = self.grpc_callback(Callback::GrpcReceiveInitialMetadata, token, count);
        self.instance.state().grpc_initial_metadata = None;
        result
    }

    /// Delivers a message of gRPC call or stream `token`, readable as the `GrpcReceiveBuffer`.
    pub fn on_grpc_receive(&mut self, token: u32, message: Vec<u8>) -> Result<(), VmError> {
        let root = self.callout_root(token, false);
        self.grpc_message(root, token, message)
    }

    /// Delivers `message` of gRPC call or stream `token` to root context `root`.
    fn grpc_message(
        &mut self,
        root: ContextId,
        token: u32,
        message: Vec<u8>,
    ) -> Result<(), VmError> {
        let size = message.len() as u64;
        self.instance.state().grpc_message = Some(message);
        let result = self.grpc_callback_for(Callback::GrpcReceive, root, token, size);
        self.instance.state().grpc_message = None;
        result
    }

    /// Delivers the reply of unary gRPC call `token` (its one message, as
    /// [`Vm::on_grpc_receive`]) and forgets the call: a unary call ends with its reply. It is
    /// forgotten first, so that the callback may open another call in its place.
    pub fn on_grpc_call_reply(&mut self, token: u32, message: Vec<u8>) -> Result<(), VmError> {
        let root = self.callout_root(token, true);
        self.instance.state().unary_grpc_calls.remove(&token);
        self.grpc_message(root, token, message)
    }

    /// Delivers the trailing metadata of gRPC call or stream `token`.
    pub fn on_grpc_receive_trailing_metadata(
        &mut self,
        token: u32,
        metadata: HeaderMap,
    ) -> Result<(), VmError> {
        let count = metadata.len() as u64;
        self.instance.state().grpc_trailing_metadata = Some(metadata);
        let result = self.grpc_callback(Callback::GrpcReceiveTrailingMetadata, token, count);
        self.instance.state().grpc_trailing_metadata = None;
        result
    }

    /// Closes gRPC call or stream `token` with a gRPC status code and message, which
    /// `proxy_get_status` reports: the code until a later close or failed HTTP call replaces it,
    /// the message in this callback only (as Envoy).
    pub fn on_grpc_close(
        &mut self,
        token: u32,
        status_code: u32,
        message: Vec<u8>,
    ) -> Result<(), VmError> {
        // Forgotten first, so that the callback may open another call in its place.
        let root = self.callout_root(token, true);
        self.instance.state().unary_grpc_calls.remove(&token);
        self.set_status(root, (status_code, message));
        let result =
            self.grpc_callback_for(Callback::GrpcClose, root, token, u64::from(status_code));
        self.clear_status_message(root);
        result
    }

    /// Creates a context for a new TCP connection of the plugin's root context.
    pub fn create_tcp_context(&mut self) -> Result<ContextId, VmError> {
        let root = self.root;
        self.create_stream_context(root, StreamKind::Tcp)
    }

    /// Creates a context for a new TCP connection of root context `root`.
    pub fn create_tcp_context_for(&mut self, root: ContextId) -> Result<ContextId, VmError> {
        self.check_root(root)?;
        self.create_stream_context(root, StreamKind::Tcp)
    }

    /// Calls `proxy_on_new_connection`.
    pub fn on_new_connection(&mut self, context: ContextId) -> Result<DataAction, VmError> {
        self.check_stream(context)?;
        let mut action = [0];
        self.call(
            Callback::NewConnection,
            context,
            &[u64::from(context.0)],
            &mut action,
        )?;
        Ok(DataAction::from_network_callback(action[0]))
    }

    /// Calls `proxy_on_downstream_data` with the size of the (buffered) downstream data.
    pub fn on_downstream_data(
        &mut self,
        context: ContextId,
        size: usize,
        end_of_stream: bool,
    ) -> Result<DataAction, VmError> {
        self.body_callback(
            Callback::DownstreamData,
            Part::DownstreamData,
            context,
            size,
            end_of_stream,
        )
    }

    /// Calls `proxy_on_upstream_data` with the size of the (buffered) upstream data.
    pub fn on_upstream_data(
        &mut self,
        context: ContextId,
        size: usize,
        end_of_stream: bool,
    ) -> Result<DataAction, VmError> {
        self.body_callback(
            Callback::UpstreamData,
            Part::UpstreamData,
            context,
            size,
            end_of_stream,
        )
    }

    /// Calls `proxy_on_downstream_connection_close`.
    pub fn on_downstream_connection_close(
        &mut self,
        context: ContextId,
        peer: PeerType,
    ) -> Result<(), VmError> {
        self.check_stream(context)?;
        self.call(
            Callback::DownstreamConnectionClose,
            context,
            &[u64::from(context.0), peer as u64],
            &mut [],
        )?;
        Ok(())
    }

    /// Calls `proxy_on_upstream_connection_close`.
    pub fn on_upstream_connection_close(
        &mut self,
        context: ContextId,
        peer: PeerType,
    ) -> Result<(), VmError> {
        self.check_stream(context)?;
        self.call(
            Callback::UpstreamConnectionClose,
            context,
            &[u64::from(context.0), peer as u64],
            &mut [],
        )?;
        Ok(())
    }
}
