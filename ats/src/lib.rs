//! `pwhost_ats.so`: Proxy-Wasm plugins in Apache Traffic Server, on every pwhost engine.
//!
//! A global Traffic Server plugin, loaded from `plugin.config` as Traffic Server's own Wasm
//! plugin is, with the same YAML files:
//!
//! ```text
//! pwhost_ats.so [--deadline-ms=N] [--max-memory-mib=N] [--buffer-limit-bytes=N]
//!     [--stream-idle-timeout-ms=N] [--shared-data-bytes-per-vm-id=N]
//!     [--shared-queue-bytes-per-vm-id=N] [--shared-queues-per-vm-id=N]
//!     [--metric-names-per-vm-id=N] [--cache-dir=DIR] a.yaml [b.yaml ...]
//! ```
//!
//! Each file configures plugins as the `lifecycle` layer reads them (Traffic Server's
//! `config: {name, rootId, vmConfig: {vmId, runtime, code}, configuration}`, or Envoy's filter
//! blocks), chosen engine per file (`ats.wasm.runtime.wamr`, `envoy.wasm.runtime.v8`,
//! `wasmtime`, ...), plus an optional `upstreams:` map for HTTP callouts. Relative file names
//! are taken from Traffic Server's configuration directory.
//!
//! How it runs:
//! * Every Traffic Server thread that runs transactions has its own VM copy of every plugin
//!   (the `lifecycle` layer's [`lifecycle::Worker`], kept in a thread-local): no lock on the
//!   request path, unlike Traffic Server's plugin, which sends every transaction of every
//!   thread through one VM behind one mutex.
//! * Hooks map to callbacks: read request header → `proxy_on_request_headers` (filters in
//!   order); send response header → `proxy_on_response_headers` (in reverse order, as Envoy's
//!   encoder filters run; a local reply goes through them too); transaction close →
//!   `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`.
//! * Headers are read and edited in Traffic Server's own MIME heap ([`headers`]), with Envoy's
//!   pseudo-headers mapped onto the request line and status.
//! * A plugin's local reply is sent down Traffic Server's error path with its status, body and
//!   headers; a stream whose plugin failed gets the plugin's failure policy (503 fail-closed,
//!   or bypass).
//! * `traffic_ctl config reload` reads the files again: new transactions run in the new
//!   plugins, transactions in flight finish in the old ones ([`lifecycle::LivePlugins`]).
//! * Services (Envoy's `WasmService`): a singleton runs in one VM on a thread of its own; one
//!   without `singleton` has a VM copy on every net thread, started there when Traffic Server's
//!   ports are ready ([`warm`]), as Envoy starts it on every worker.
//! * Shared queues: an item enqueued from any thread wakes the thread whose copy registered the
//!   queue, which delivers `proxy_on_queue_ready` there ([`queue`]), filters and services alike.
//! * TCP (L4): a file's `tcp:` listener runs its network filters on every connection Traffic
//!   Server accepts there, proxied to the listener's upstream with Traffic Server's VIOs on the
//!   accepting net thread, as Envoy's network filters in front of `tcp_proxy` ([`connection`]).

mod answer;
mod body;
mod callout;
mod chunked;
mod config;
mod connection;
mod diag;
mod headers;
mod host;
mod queue;
mod socket;
mod stats;
mod sys;
mod ticker;
mod transaction;
mod warm;

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use engines::BuildEngines;
use lifecycle::{
    Generation, LivePlugins, PluginId, Plugins, SingletonService, ThreadWorkers, Ticking, Worker,
};
use runtime_api::RuntimeConfig;

use config::Upstreams;

/// The longest one plugin callback may run before it is stopped and its VM fails, unless
/// `--deadline-ms` says otherwise: a transaction thread is never held longer by a stuck plugin.
pub const DEFAULT_DEADLINE_MS: u64 = 1000;

/// What the plugin keeps for the life of the process.
struct Global {
    /// The plugins in force; replaced on reload.
    live: Arc<LivePlugins>,
    /// The upstreams of the plugins in force.
    upstreams: Mutex<Arc<Upstreams>>,
    /// The configuration files, as `plugin.config` names them (absolute).
    files: Vec<PathBuf>,
    /// The engines, made once.
    engines: BuildEngines,
    /// The singleton services of the plugins in force, each on a thread of its own.
    services: Mutex<Vec<SingletonService>>,
    /// Body bytes a plugin may keep buffered per transaction and direction.
    buffer_limit_bytes: usize,
    /// How long a plugin may hold a transaction without continuing, answering or closing it.
    stream_idle_timeout: Option<Duration>,
    /// Where remote and compiled code are kept between starts (`--cache-dir`), if anywhere.
    cache_dir: Option<PathBuf>,
}

/// Envoy's `per_connection_buffer_limit_bytes` default: 1 MiB.
const DEFAULT_BUFFER_LIMIT_BYTES: usize = 1 << 20;

/// Body bytes a plugin may keep buffered per transaction and direction (`--buffer-limit-bytes`).
pub(crate) fn buffer_limit_bytes() -> usize {
    GLOBAL.get().map_or(DEFAULT_BUFFER_LIMIT_BYTES, |global| {
        global.buffer_limit_bytes
    })
}

/// Envoy's `stream_idle_timeout` default: 5 min.
const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a plugin may hold a transaction without continuing, answering or closing it, or
/// the client sending more of a body whose headers it holds, before the transaction is
/// answered 408 (held past the hooks, its connection closes instead) (`--stream-idle-timeout-ms`;
/// `None`: for ever).
pub(crate) fn stream_idle_timeout() -> Option<Duration> {
    GLOBAL
        .get()
        .map_or(Some(DEFAULT_STREAM_IDLE_TIMEOUT), |global| {
            global.stream_idle_timeout
        })
}

/// Notes that a plugin began to hold a transaction at `since`: [`with_thread`] then has the
/// ticker look at it, for its client leaving and, later, the stream idle timeout passing
/// ([`transaction::look_at_holds`]).
pub(crate) fn hold_began(since: Instant) {
    // A timeout too long to add to the clock is none.
    let timeout_due = stream_idle_timeout().and_then(|timeout| since.checked_add(timeout));
    let clients_due = since + socket::HELD_CLIENT_CHECK;
    let due = timeout_due.map_or(clients_due, |due| due.min(clients_due));
    HOLD_DUE.with(|earlier| earlier.set(Some(ticker::earliest(earlier.get(), due))));
}

/// Starts the singleton services of `plugins`, each in its own VM on its own thread, ticking on
/// the clock and calling `upstreams`. Services without `singleton` run on every transaction
/// thread instead, as Envoy runs them on every worker ([`start_worker`]).
fn start_services(
    plugins: &Arc<Plugins>,
    upstreams: &Arc<Upstreams>,
) -> Result<Vec<SingletonService>, String> {
    let mut services = Vec::new();
    for plugin in plugins.singleton_services() {
        let name = plugins.config(plugin).display_name().to_string();
        let inbox = Arc::new(OnceLock::new());
        let service = SingletonService::spawn(
            Arc::clone(plugins),
            plugin,
            Box::new(host::AtsHost::for_service(
                &name,
                Arc::clone(upstreams),
                Arc::clone(&inbox),
            )),
            Ticking::Clock,
            Box::new(|_| Ok(())),
        );
        let service = match service {
            Ok(service) => service,
            Err(error) => {
                // Answers to calls its start made go nowhere, rather than wait for it.
                let _ = inbox.set(None);
                return Err(error.to_string());
            }
        };
        let _ = inbox.set(Some(service.inbox()));
        services.push(service);
    }
    Ok(services)
}

static GLOBAL: OnceLock<Global> = OnceLock::new();

/// What one Traffic Server thread keeps: its workers (VM copies) and its timer.
pub(crate) struct ThreadState {
    pub(crate) workers: ThreadWorkers,
    pub(crate) ticker: ticker::Ticker,
    /// The deployment whose copies' timers the ticker last looked at (see [`note_new_worker`]).
    ticking: Option<Generation>,
}

/// A thread's worker for `plugins`, calling the upstreams configured with them, with the
/// services that run on every worker (no `singleton`) started in it, as Envoy starts them on
/// each worker thread: each has its VM copy on every transaction thread, ticking there.
fn start_worker(plugins: Arc<Plugins>) -> Worker {
    let upstreams = GLOBAL
        .get()
        .map(|global| Arc::clone(&global.upstreams.lock().unwrap_or_else(|e| e.into_inner())))
        .unwrap_or_default();
    let services: Vec<PluginId> = plugins.worker_services().collect();
    let mut worker = Worker::new(Arc::clone(&plugins), move || {
        Box::new(host::AtsHost::new(Arc::clone(&upstreams)))
    })
    .on_queue_ready(queue::wake_for_this_thread());
    for service in services {
        // A service that fails to start is counted and logged; it gets its failure policy's
        // treatment as any copy does, and the thread serves on.
        if let Err(failure) = worker.start(service) {
            diag::error(&format!(
                "service {} did not start on this thread: {failure}",
                plugins.config(service).display_name()
            ));
        }
    }
    worker
}

/// Has the ticker learn the timers of the copies in force on this thread if they changed since
/// it last looked: the services a new worker started set their periods as they started, before
/// any transaction.
pub(crate) fn note_new_worker(state: &mut ThreadState) {
    let (generation, _) = state.workers.current();
    if state.ticking != Some(generation) {
        state.ticking = Some(generation);
        state.ticker.note_all(&mut state.workers);
    }
}

thread_local! {
    /// This Traffic Server thread's VM copies, made on its first transaction.
    static THREAD: RefCell<Option<ThreadState>> = const { RefCell::new(None) };
    /// A plugin failed in a transaction's or connection's callback on this thread since the
    /// last look (see [`plugin_failed`]).
    static PLUGIN_FAILED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The earliest a hold that began on this thread since the last look is to be looked at
    /// (see [`hold_began`]).
    static HOLD_DUE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Applies `plugin`'s failure policy to `error` in one of its callbacks for a transaction or
/// connection. The VM copy may hold other transactions and connections, which wait for a
/// continue that cannot come now: [`with_thread`] then has the ticker pick them up at once
/// (it looks at every copy's held streams, a failed copy's getting their failure policy).
pub(crate) fn plugin_failed(
    worker: &mut Worker,
    plugin: PluginId,
    error: &abi::VmError,
) -> lifecycle::OnFailure {
    PLUGIN_FAILED.with(|failed| failed.set(true));
    worker.failed(plugin, error)
}

/// Runs one plugin's last callbacks for a transaction or connection that is over, keeping a
/// panic there (a host bug: a plugin's own failures are errors, not panics) to that plugin.
/// The caller then still gives back the context's slot and its hold on the VM copy, and counts
/// the stream out of its deployment; a panic out of its loop would skip those for the
/// remaining plugins and keep a replaced deployment's VM copies alive for ever.
pub(crate) fn last_callbacks(plugin: &str, callbacks: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(callbacks)).is_err() {
        diag::error(&format!(
            "[{plugin}] the host panicked in the plugin's last callbacks; its context is ended"
        ));
    }
}

/// Runs `work` with this thread's state (made on first use). `None` before the plugin is
/// initialised, or if called re-entrantly (which the plugin never does: it reenables Traffic
/// Server only after its work here is done).
pub(crate) fn with_thread<R>(work: impl FnOnce(&mut ThreadState) -> R) -> Option<R> {
    let global = GLOBAL.get()?;
    THREAD.with(|cell| {
        let mut state = cell.try_borrow_mut().ok()?;
        let state = state.get_or_insert_with(|| ThreadState {
            // Each deployment's copies call the upstreams configured with it.
            workers: ThreadWorkers::new(Arc::clone(&global.live), Box::new(start_worker)),
            ticker: ticker::Ticker::for_this_thread(),
            ticking: None,
        });
        note_new_worker(state);
        let result = work(state);
        if PLUGIN_FAILED.with(|failed| failed.replace(false)) {
            state.ticker.sweep_soon();
        }
        if let Some(due) = HOLD_DUE.with(|due| due.take()) {
            state.ticker.look_at_holds_by(due);
        }
        Some(result)
    })
}

/// Runs `work` with this thread's workers (see [`with_thread`]).
pub(crate) fn with_workers<R>(work: impl FnOnce(&mut ThreadWorkers) -> R) -> Option<R> {
    with_thread(|state| work(&mut state.workers))
}

/// Runs `work` with the worker of deployment `generation` if this is `thread`, the thread
/// owning the VM copies of `subject` (a transaction or connection, named in the error when it
/// is not: the caller goes on without its plugins, or closes the connection).
pub(crate) fn in_worker<R>(
    thread: sys::TSEventThread,
    generation: Generation,
    subject: &str,
    work: impl FnOnce(&mut Worker) -> R,
) -> Option<R> {
    // SAFETY: the plugin's code runs on Traffic Server's event threads only.
    if unsafe { sys::TSEventThreadSelf() } != thread {
        diag::error(&format!(
            "{subject} ran on another thread than its VM copies'; its plugins cannot run there"
        ));
        return None;
    }
    with_workers(|workers| workers.worker(generation).map(work)).flatten()
}

/// The plugin's arguments.
struct Arguments {
    files: Vec<PathBuf>,
    runtime: RuntimeConfig,
    buffer_limit_bytes: usize,
    stream_idle_timeout: Option<Duration>,
    shared_limits: abi::SharedLimits,
    cache_dir: Option<PathBuf>,
}

fn parse_arguments(args: &[String]) -> Result<Arguments, String> {
    let mut files = Vec::new();
    let mut deadline_ms = DEFAULT_DEADLINE_MS;
    let mut runtime = RuntimeConfig::default();
    let mut buffer_limit_bytes = DEFAULT_BUFFER_LIMIT_BYTES;
    let mut stream_idle_timeout = Some(DEFAULT_STREAM_IDLE_TIMEOUT);
    let mut shared_limits = abi::SharedLimits::default();
    let mut cache_dir = None;
    for arg in args {
        let number = |value: &str| {
            value
                .parse::<u64>()
                .map_err(|_| format!("{arg}: expected a number"))
        };
        let as_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        if let Some(value) = arg.strip_prefix("--deadline-ms=") {
            deadline_ms = number(value)?;
        } else if let Some(value) = arg.strip_prefix("--max-memory-mib=") {
            runtime.max_memory_bytes = match number(value)? {
                0 => None,
                mib => Some(mib.saturating_mul(1 << 20)),
            };
        } else if let Some(value) = arg.strip_prefix("--buffer-limit-bytes=") {
            buffer_limit_bytes = match number(value)? {
                0 => return Err(format!("{arg}: must be at least 1")),
                bytes => usize::try_from(bytes).unwrap_or(usize::MAX),
            };
        } else if let Some(value) = arg.strip_prefix("--stream-idle-timeout-ms=") {
            stream_idle_timeout = match number(value)? {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            };
        } else if let Some(value) = arg.strip_prefix("--shared-data-bytes-per-vm-id=") {
            shared_limits.data_bytes_per_vm_id = as_usize(number(value)?);
        } else if let Some(value) = arg.strip_prefix("--shared-queue-bytes-per-vm-id=") {
            shared_limits.queue_bytes_per_vm_id = as_usize(number(value)?);
        } else if let Some(value) = arg.strip_prefix("--shared-queues-per-vm-id=") {
            shared_limits.queues_per_vm_id = as_usize(number(value)?);
        } else if let Some(value) = arg.strip_prefix("--metric-names-per-vm-id=") {
            shared_limits.metric_names_per_vm_id = as_usize(number(value)?);
        } else if let Some(value) = arg.strip_prefix("--cache-dir=") {
            if value.is_empty() {
                return Err(format!("{arg}: expected a directory"));
            }
            cache_dir = Some(config_path(value));
        } else if arg.starts_with("--") {
            return Err(format!(
                "unknown option {arg} (options: --deadline-ms=N, --max-memory-mib=N, \
                 --buffer-limit-bytes=N, --stream-idle-timeout-ms=N, \
                 --shared-data-bytes-per-vm-id=N, --shared-queue-bytes-per-vm-id=N, \
                 --shared-queues-per-vm-id=N, --metric-names-per-vm-id=N, --cache-dir=DIR)"
            ));
        } else {
            files.push(config_path(arg));
        }
    }
    runtime.call_deadline = (deadline_ms > 0).then(|| Duration::from_millis(deadline_ms));
    Ok(Arguments {
        files,
        runtime,
        buffer_limit_bytes,
        stream_idle_timeout,
        shared_limits,
        cache_dir,
    })
}

/// A file named in `plugin.config`: relative names are in Traffic Server's configuration
/// directory, as other plugins' files are.
fn config_path(name: &str) -> PathBuf {
    let path = PathBuf::from(name);
    if path.is_absolute() {
        return path;
    }
    // SAFETY: Traffic Server returns a NUL-terminated string it owns for the process's life.
    let dir = unsafe { sys::TSConfigDirGet() };
    if dir.is_null() {
        return path;
    }
    // SAFETY: as above.
    let dir = unsafe { CStr::from_ptr(dir) }
        .to_string_lossy()
        .into_owned();
    PathBuf::from(dir).join(path)
}

/// Traffic Server's entry point: registers the plugin, loads every configuration file and adds
/// the hooks. A configuration that cannot be loaded stops Traffic Server with the reason, as
/// Envoy refuses to start on one: transactions never run without the plugins they were meant
/// to pass through.
///
/// # Safety
/// Called by Traffic Server once, on its main thread, with `argc` C strings in `argv`.
#[no_mangle]
pub unsafe extern "C" fn TSPluginInit(argc: c_int, argv: *mut *const c_char) {
    let outcome = std::panic::catch_unwind(|| {
        // SAFETY: Traffic Server passes `argc` valid C strings.
        let args = unsafe { arguments(argc, argv) };
        init(&args)
    });
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(message)) => diag::emergency(&message),
        Err(_) => diag::emergency("initialisation panicked"),
    }
}

/// The plugin's arguments after its own name.
///
/// # Safety
/// `argv` must hold `argc` NUL-terminated strings (or be null).
unsafe fn arguments(argc: c_int, argv: *mut *const c_char) -> Vec<String> {
    if argv.is_null() {
        return Vec::new();
    }
    let count = usize::try_from(argc).unwrap_or(0);
    (1..count)
        .filter_map(|i| {
            // SAFETY: `i < argc`, and each entry is a C string (the caller's promise).
            let arg = unsafe { *argv.add(i) };
            (!arg.is_null()).then(|| {
                unsafe { CStr::from_ptr(arg) }
                    .to_string_lossy()
                    .into_owned()
            })
        })
        .collect()
}

fn init(args: &[String]) -> Result<(), String> {
    let info = sys::TSPluginRegistrationInfo {
        plugin_name: c"pwhost_ats".as_ptr(),
        vendor_name: c"pwhost".as_ptr(),
        support_email: c"".as_ptr(),
    };
    // SAFETY: `info` points at static strings; Traffic Server copies what it keeps.
    if unsafe { sys::TSPluginRegister(&info) } != sys::TS_SUCCESS {
        return Err("plugin registration failed".into());
    }
    let arguments = parse_arguments(args)?;
    // Before the services start: their calls wait for it.
    callout::watch_for_readiness();
    let engines = BuildEngines::new(arguments.runtime);
    let loaded = config::load(
        &arguments.files,
        &engines,
        config::Start::Fresh(arguments.shared_limits),
        arguments.cache_dir.as_deref(),
    )?;
    for warning in loaded.plugins.warnings() {
        diag::warning(warning);
    }
    for warning in lifecycle::Engines::unenforced_limits(&engines, &loaded.plugins) {
        diag::warning(&warning);
    }
    let names: Vec<String> = loaded
        .plugins
        .http_filters()
        .chain(loaded.plugins.network_filters())
        .map(|plugin| loaded.plugins.config(plugin).display_name().to_string())
        .collect();
    let live = Arc::new(LivePlugins::new(loaded.plugins));
    connection::note_deployment(&live.current().1, loaded.listeners);
    let upstreams = Arc::new(loaded.upstreams);
    let services = start_services(&live.current().1, &upstreams)?;
    let global = Global {
        live,
        upstreams: Mutex::new(upstreams),
        files: arguments.files,
        engines,
        services: Mutex::new(services),
        buffer_limit_bytes: arguments.buffer_limit_bytes,
        stream_idle_timeout: arguments.stream_idle_timeout,
        cache_dir: arguments.cache_dir,
    };
    if GLOBAL.set(global).is_err() {
        return Err("initialised twice".into());
    }
    // SAFETY: the handlers are `extern "C"` functions of the right type that live for the
    // process; the reload continuation gets a mutex so that reloads never run concurrently.
    unsafe {
        let requests = sys::TSContCreate(Some(transaction::on_read_request), std::ptr::null_mut());
        sys::TSHttpHookAdd(sys::TS_HTTP_READ_REQUEST_HDR_HOOK, requests);
        let reload = sys::TSContCreate(Some(on_reload), sys::TSMutexCreate());
        sys::TSMgmtUpdateRegister(reload, c"pwhost_ats".as_ptr());
    }
    // SAFETY: the handler is an `extern "C"` function of the right type; the continuation
    // lives for the process.
    unsafe {
        let cont = sys::TSContCreate(Some(on_ports_ready), std::ptr::null_mut());
        sys::TSLifecycleHookAdd(sys::TS_LIFECYCLE_PORTS_READY_HOOK, cont);
    }
    stats::start();
    diag::note(&format!("running {}", names.join(", ")));
    Ok(())
}

/// Traffic Server's threads run: the TCP listeners open, and the services of every worker
/// start on each thread. A listener that cannot open stops Traffic Server, as a configuration
/// error does.
unsafe extern "C" fn on_ports_ready(_: sys::TSCont, _: sys::TSEvent, _: *mut c_void) -> c_int {
    match std::panic::catch_unwind(connection::open_listeners) {
        Ok(Ok(())) => {}
        Ok(Err(message)) => diag::emergency(&message),
        Err(_) => diag::emergency("opening the TCP listeners panicked"),
    }
    let worker_services = GLOBAL
        .get()
        .is_some_and(|global| global.live.current().1.worker_services().next().is_some());
    if worker_services && std::panic::catch_unwind(warm::every_net_thread).is_err() {
        diag::error("starting the services of every thread panicked");
    }
    0
}

/// `traffic_ctl config reload`: reads the files again and puts the new plugins in force; a
/// configuration that cannot be loaded leaves the old one running, with the reason logged.
unsafe extern "C" fn on_reload(
    _cont: sys::TSCont,
    event: sys::TSEvent,
    _data: *mut c_void,
) -> c_int {
    if event != sys::TS_EVENT_MGMT_UPDATE {
        return 0;
    }
    let outcome = std::panic::catch_unwind(|| {
        let Some(global) = GLOBAL.get() else {
            return;
        };
        let (_, previous) = global.live.current();
        match config::load(
            &global.files,
            &global.engines,
            config::Start::Replacing(&previous),
            global.cache_dir.as_deref(),
        ) {
            Ok(loaded) => {
                // Said once the configuration is in force: a refused one's would mislead.
                let mut warnings = loaded.plugins.warnings().to_vec();
                warnings.extend(lifecycle::Engines::unenforced_limits(
                    &global.engines,
                    &loaded.plugins,
                ));
                if let Err(message) = connection::check_reload(&loaded.listeners) {
                    diag::error(&format!(
                        "reload failed, the previous configuration stays in force: {message}"
                    ));
                    return;
                }
                let plugins = Arc::new(loaded.plugins);
                let upstreams = Arc::new(loaded.upstreams);
                let services = match start_services(&plugins, &upstreams) {
                    Ok(services) => services,
                    Err(message) => {
                        diag::error(&format!(
                            "reload failed, the previous configuration stays in force: {message}"
                        ));
                        return;
                    }
                };
                // The upstreams first: a worker made for the new plugins must find theirs.
                *global.upstreams.lock().unwrap_or_else(|e| e.into_inner()) = upstreams;
                connection::note_deployment(&plugins, loaded.listeners);
                let generation = global.live.replace_shared(plugins);
                // The old services end as at shutdown (dropping them stops their threads).
                let old = std::mem::replace(
                    &mut *global.services.lock().unwrap_or_else(|e| e.into_inner()),
                    services,
                );
                drop(old);
                if global.live.current().1.worker_services().next().is_some() {
                    warm::every_net_thread();
                }
                for warning in &warnings {
                    diag::warning(warning);
                }
                diag::note(&format!(
                    "reloaded the configuration (deployment {})",
                    generation.0
                ));
            }
            Err(message) => diag::error(&format!(
                "reload failed, the previous configuration stays in force: {message}"
            )),
        }
    });
    if outcome.is_err() {
        diag::error("reload panicked; the previous configuration stays in force");
    }
    0
}
