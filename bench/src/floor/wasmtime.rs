//! The wasmtime floor: the least a correct Proxy-Wasm host on raw wasmtime must do to run
//! `lifecycle_bench`, written by hand for this one plugin (the rules all floors follow are in
//! [`super`]).
//!
//! Why it is a fair floor for pwhost on wasmtime:
//!
//! * Same engine, same compiled code: one `wasmtime::Engine` with wasmtime's defaults (plus
//!   epoch interruption or the pooling allocator exactly when pwhost's runtime turns them on).
//! * Everything is resolved once: host functions are bound with `Linker::func_wrap` (typed,
//!   no slot marshalling), the module is pre-instantiated once (`InstancePre`), and each
//!   instance resolves its memory, `malloc` and callbacks once as `TypedFunc`s.
//! * It does only the host calls the plugin makes (`proxy_log`, `proxy_get_header_map_value`,
//!   `proxy_add_header_map_value`); the module's other imports return `UNIMPLEMENTED` (12).
//! * It still does what any correct host must: bounds-checks every guest pointer (safe slice
//!   indexing), validates the log level and the message's UTF-8, allocates reply buffers with
//!   the plugin's allocator and writes values straight into guest memory.
//! * Its embedder data work is identical to pwhost's bench host: the same [`BenchStream`] in the
//!   same header storage `M`, restored the same way, and the same log counter.
//!
//! What it leaves out is what pwhost adds for generality: the engine-neutral `runtime_api`
//! layer, the `dyn Host` indirection, context bookkeeping, per-call status plumbing and the
//! second header lookup after allocation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use abi::{HeaderMap, LogLevel, MapType};
use wasmtime::{
    Caller, Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Memory,
    Module, PoolingAllocationConfig, Store, TypedFunc, Val,
};

use super::{
    add_value, find_value, outcome, return_value, slice, BAD_ARGUMENT, IMPLEMENTED,
    INTERNAL_FAILURE, INVALID_MEMORY_ACCESS, OK, UNIMPLEMENTED,
};
use crate::{BenchHeaders, BenchStream, RequestOutcome, REQUEST_HEADERS, RESPONSE_HEADERS};

/// How the floor's engine is configured, mirroring the pwhost runtime it is compared with.
#[derive(Clone, Copy, Debug, Default)]
pub struct FloorOptions {
    /// A deadline per top-level call, enforced with epoch interruption: a ticker thread
    /// advances the epoch every `deadline / 10` (as pwhost's wasmtime runtime does) and every
    /// top-level call is given a deadline ten ticks ahead.
    pub deadline: Option<Duration>,
    /// Use the pooling instance allocator with room for this many instances (as
    /// `runtime_wasmtime::WasmtimeOptions::pooling_instances`).
    pub pooling_instances: Option<u32>,
}

/// A thread advancing an engine's epoch at a fixed period until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: &Engine, period: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let engine = engine.clone();
        let thread = std::thread::Builder::new()
            .name("floor-epoch".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(period);
                    engine.increment_epoch();
                }
            })
            .expect("spawn the epoch ticker");
        EpochTicker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The per-instance state of the floor host.
pub struct FloorState<M: BenchHeaders = HeaderMap> {
    stream: BenchStream<M>,
    /// The context host calls act on (the callback's context).
    effective_context: u32,
    memory: Option<Memory>,
    malloc: Option<TypedFunc<i32, i32>>,
}

impl<M: BenchHeaders> FloorState<M> {
    /// The stream the instance serves.
    pub fn stream(&self) -> &BenchStream<M> {
        &self.stream
    }
}

/// `lifecycle_bench` compiled and linked once against the floor's host functions.
pub struct FloorPlugin<M: BenchHeaders = HeaderMap> {
    pre: InstancePre<FloorState<M>>,
    engine: Engine,
    /// Ticks ahead for each top-level call's deadline, when deadlines are on.
    deadline_ticks: Option<u64>,
    _ticker: Option<EpochTicker>,
}

/// `proxy_log(level, message_data, message_size)`.
fn proxy_log<M: BenchHeaders>(
    mut caller: Caller<'_, FloorState<M>>,
    level: i32,
    ptr: i32,
    len: i32,
) -> i32 {
    let Some(level) = LogLevel::from_raw(u64::from(level as u32)) else {
        return BAD_ARGUMENT;
    };
    let Some(memory) = caller.data().memory else {
        return INTERNAL_FAILURE;
    };
    let (bytes, state) = memory.data_and_store_mut(&mut caller);
    let Some(message) = slice(bytes, ptr, len) else {
        return INVALID_MEMORY_ACCESS;
    };
    state.stream.log(level, &String::from_utf8_lossy(message));
    OK
}

/// `proxy_get_header_map_value(map_type, key_data, key_size, return_value_data,
/// return_value_size)`: looks the key up once, allocates with the plugin's `malloc`, copies the
/// value into guest memory and writes the pointer and size.
fn proxy_get_header_map_value<M: BenchHeaders>(
    mut caller: Caller<'_, FloorState<M>>,
    map_type: i32,
    key_ptr: i32,
    key_len: i32,
    return_data: i32,
    return_size: i32,
) -> wasmtime::Result<i32> {
    let Some(map_type) = MapType::from_raw(u64::from(map_type as u32)) else {
        return Ok(BAD_ARGUMENT);
    };
    let Some(memory) = caller.data().memory else {
        return Ok(INTERNAL_FAILURE);
    };
    let found = {
        let (bytes, state) = memory.data_and_store_mut(&mut caller);
        let context = state.effective_context;
        match find_value(
            bytes,
            &mut state.stream,
            context,
            map_type,
            key_ptr,
            key_len,
        ) {
            Ok(found) => found,
            Err(status) => return Ok(status),
        }
    };
    let len = found.1;
    let pointer = if len == 0 {
        0
    } else {
        allocate(&mut caller, len)?
    };
    if len > 0 && pointer == 0 {
        return Ok(INTERNAL_FAILURE);
    }
    let (bytes, state) = memory.data_and_store_mut(&mut caller);
    let context = state.effective_context;
    Ok(return_value(
        bytes,
        &mut state.stream,
        context,
        map_type,
        found,
        pointer as u32,
        return_data,
        return_size,
    ))
}

/// Allocates `len` bytes with the plugin's allocator; 0 if it has none.
///
/// The `TypedFunc` is moved out of the state for the call and put back after, instead of
/// being cloned: a clone copies its `FuncType`, whose registered-type reference count costs
/// more than the rest of the host call.
#[inline]
fn allocate<M: BenchHeaders>(
    caller: &mut Caller<'_, FloorState<M>>,
    len: usize,
) -> wasmtime::Result<i32> {
    let Some(malloc) = caller.data_mut().malloc.take() else {
        return Ok(0);
    };
    let result = malloc.call(&mut *caller, len as i32);
    caller.data_mut().malloc = Some(malloc);
    result
}

/// `proxy_add_header_map_value(map_type, key_data, key_size, value_data, value_size)`.
fn proxy_add_header_map_value<M: BenchHeaders>(
    mut caller: Caller<'_, FloorState<M>>,
    map_type: i32,
    key_ptr: i32,
    key_len: i32,
    value_ptr: i32,
    value_len: i32,
) -> i32 {
    let Some(map_type) = MapType::from_raw(u64::from(map_type as u32)) else {
        return BAD_ARGUMENT;
    };
    let Some(memory) = caller.data().memory else {
        return INTERNAL_FAILURE;
    };
    let (bytes, state) = memory.data_and_store_mut(&mut caller);
    let context = state.effective_context;
    add_value(
        bytes,
        &mut state.stream,
        context,
        map_type,
        key_ptr,
        key_len,
        value_ptr,
        value_len,
    )
}

impl<M: BenchHeaders> FloorPlugin<M> {
    /// Compiles `wasm` and links it: the three host functions the plugin uses, and
    /// `UNIMPLEMENTED` for every other function import.
    pub fn new(wasm: &[u8], options: FloorOptions) -> wasmtime::Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(options.deadline.is_some());
        if let Some(instances) = options.pooling_instances {
            let mut pooling = PoolingAllocationConfig::default();
            pooling.total_core_instances(instances);
            pooling.total_memories(instances);
            pooling.total_tables(instances);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        }
        let engine = Engine::new(&config)?;
        let module = Module::from_binary(&engine, wasm)?;

        let mut linker = Linker::new(&engine);
        linker.func_wrap("env", "proxy_log", proxy_log::<M>)?;
        linker.func_wrap(
            "env",
            "proxy_get_header_map_value",
            proxy_get_header_map_value::<M>,
        )?;
        linker.func_wrap(
            "env",
            "proxy_add_header_map_value",
            proxy_add_header_map_value::<M>,
        )?;
        for import in module.imports() {
            let ExternType::Func(ty) = import.ty() else {
                continue;
            };
            if import.module() == "env" && IMPLEMENTED.contains(&import.name()) {
                continue;
            }
            linker.func_new(import.module(), import.name(), ty, |_, _, results| {
                if let Some(result) = results.first_mut() {
                    *result = Val::I32(UNIMPLEMENTED);
                }
                Ok(())
            })?;
        }
        let pre = linker.instantiate_pre(&module)?;

        let (deadline_ticks, ticker) = match options.deadline {
            Some(deadline) => {
                let period = (deadline / 10).max(Duration::from_millis(1));
                let ticks = (deadline.as_nanos() / period.as_nanos()).max(1) as u64;
                (Some(ticks), Some(EpochTicker::start(&engine, period)))
            }
            None => (None, None),
        };
        Ok(FloorPlugin {
            pre,
            engine,
            deadline_ticks,
            _ticker: ticker,
        })
    }

    /// A new instance, initialised, started and configured: `_initialize` (if exported),
    /// `proxy_on_context_create(1, 0)`, `proxy_on_vm_start(1, 0)`, `proxy_on_configure(1, 0)`.
    pub fn instantiate(&self) -> wasmtime::Result<FloorVm<M>> {
        let state = FloorState {
            stream: BenchStream::<M>::new(),
            effective_context: 0,
            memory: None,
            malloc: None,
        };
        let mut store = Store::new(&self.engine, state);
        if let Some(ticks) = self.deadline_ticks {
            store.set_epoch_deadline(ticks);
        }
        let instance = self.pre.instantiate(&mut store)?;
        let memory = instance.get_memory(&mut store, "memory");
        // The allocator pwhost uses too: `proxy_on_memory_allocate`, else `malloc`.
        let malloc = instance
            .get_typed_func(&mut store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func(&mut store, "malloc"))?;
        store.data_mut().memory = memory;
        store.data_mut().malloc = Some(malloc);
        let initialize = instance
            .get_typed_func::<(), ()>(&mut store, "_initialize")
            .ok();
        let callbacks = Callbacks {
            context_create: instance.get_typed_func(&mut store, "proxy_on_context_create")?,
            vm_start: instance.get_typed_func(&mut store, "proxy_on_vm_start")?,
            configure: instance.get_typed_func(&mut store, "proxy_on_configure")?,
            request_headers: instance.get_typed_func(&mut store, "proxy_on_request_headers")?,
            response_headers: instance.get_typed_func(&mut store, "proxy_on_response_headers")?,
            log: instance.get_typed_func(&mut store, "proxy_on_log")?,
            done: instance.get_typed_func(&mut store, "proxy_on_done")?,
            delete: instance.get_typed_func(&mut store, "proxy_on_delete")?,
        };
        let mut vm = FloorVm {
            store,
            callbacks,
            deadline_ticks: self.deadline_ticks,
            next_context: 2,
        };
        if let Some(initialize) = initialize {
            vm.arm(0);
            initialize.call(&mut vm.store, ())?;
        }
        vm.arm(1);
        vm.callbacks.context_create.call(&mut vm.store, (1, 0))?;
        vm.arm(1);
        vm.callbacks.vm_start.call(&mut vm.store, (1, 0))?;
        vm.arm(1);
        vm.callbacks.configure.call(&mut vm.store, (1, 0))?;
        Ok(vm)
    }
}

/// The callbacks the floor calls, resolved once per instance.
struct Callbacks {
    context_create: TypedFunc<(i32, i32), ()>,
    vm_start: TypedFunc<(i32, i32), i32>,
    configure: TypedFunc<(i32, i32), i32>,
    request_headers: TypedFunc<(i32, i32, i32), i32>,
    response_headers: TypedFunc<(i32, i32, i32), i32>,
    log: TypedFunc<i32, ()>,
    done: TypedFunc<i32, i32>,
    delete: TypedFunc<i32, ()>,
}

/// One started floor instance.
pub struct FloorVm<M: BenchHeaders = HeaderMap> {
    store: Store<FloorState<M>>,
    callbacks: Callbacks,
    deadline_ticks: Option<u64>,
    next_context: u32,
}

impl<M: BenchHeaders> FloorVm<M> {
    /// Prepares a top-level call for `context`: sets the effective context and, when deadlines
    /// are on, the call's epoch deadline.
    #[inline]
    fn arm(&mut self, context: u32) {
        self.store.data_mut().effective_context = context;
        if let Some(ticks) = self.deadline_ticks {
            self.store.set_epoch_deadline(ticks);
        }
    }

    /// One full request, the same callback sequence as [`crate::pwhost_request`]:
    /// `proxy_on_context_create(ctx, 1)`, `proxy_on_request_headers(ctx, 10, 0)`,
    /// `proxy_on_response_headers(ctx, 3, 0)`, `proxy_on_log`, `proxy_on_done`,
    /// `proxy_on_delete`.
    #[inline]
    pub fn request(&mut self) -> wasmtime::Result<RequestOutcome> {
        let context = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(2);
        let ctx = context as i32;
        self.arm(context);
        self.callbacks
            .context_create
            .call(&mut self.store, (ctx, 1))?;
        self.store.data_mut().stream.begin(context);
        self.arm(context);
        let request = self
            .callbacks
            .request_headers
            .call(&mut self.store, (ctx, REQUEST_HEADERS.len() as i32, 0))?;
        self.arm(context);
        let response = self
            .callbacks
            .response_headers
            .call(&mut self.store, (ctx, RESPONSE_HEADERS.len() as i32, 0))?;
        self.arm(context);
        self.callbacks.log.call(&mut self.store, ctx)?;
        self.arm(context);
        self.callbacks.done.call(&mut self.store, ctx)?;
        self.arm(context);
        self.callbacks.delete.call(&mut self.store, ctx)?;
        Ok(outcome(request, response))
    }

    /// The instance's host state.
    pub fn state(&self) -> &FloorState<M> {
        self.store.data()
    }

    /// The guest's linear memory size in bytes.
    pub fn memory_size(&self) -> usize {
        self.store
            .data()
            .memory
            .map_or(0, |memory| memory.data_size(&self.store))
    }

    /// The guest's linear memory base and size, for residency measurements.
    pub fn memory_region(&self) -> Option<(*const u8, usize)> {
        let memory = self.store.data().memory?;
        Some((
            memory.data_ptr(&self.store).cast_const(),
            memory.data_size(&self.store),
        ))
    }
}
