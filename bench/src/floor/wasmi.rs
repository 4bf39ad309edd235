//! The wasmi floor: the least a correct Proxy-Wasm host on raw wasmi must do to run
//! `lifecycle_bench`, written by hand for this one plugin (the rules all floors follow are in
//! [`super`]; [`super::wasmtime`] is the reference this one copies).
//!
//! Why it is a fair floor for pwhost on wasmi (`runtime-wasmi` with `RuntimeConfig::default()`):
//!
//! * Same engine, same configuration: one wasmi `Engine` per module, configured as
//!   `runtime_wasmi::WasmiRuntime::new` does: wasmi's defaults, the same custom fuel costs, the
//!   same number of cached execution stacks, and fuel metering exactly when pwhost turns it on
//!   (never in optimized builds without a deadline; always in builds with debug assertions,
//!   where wasmi's dispatch keeps a native frame per instruction and pwhost runs every call in
//!   slices of [`BOUNDED_SLICE_FUEL`]).
//! * Same per-instance setup: a `Store` per instance with the same `StoreLimits` resource
//!   limiter (the 1 GiB memory cap of `RuntimeConfig::default()` and the table cap), imports
//!   resolved by `Linker::instantiate_and_start` as pwhost does (wasmi 2 has no `InstancePre`).
//! * Everything is resolved once: host functions are bound with `Linker::func_wrap` (typed
//!   native arguments, no slot marshalling), and each instance resolves its memory, allocator and
//!   callbacks once as `TypedFunc`s (which are `Copy` in wasmi: no reference count per call).
//! * It does only the host calls the plugin makes (`proxy_log`, `proxy_get_header_map_value`,
//!   `proxy_add_header_map_value`); the module's other imports return `UNIMPLEMENTED` (12).
//! * It still does what any correct host on wasmi must: bounds-checks every guest pointer,
//!   validates the log level and the map type, decodes the message as UTF-8 (lossily, as pwhost
//!   does), allocates reply buffers with the plugin's allocator, writes values straight into
//!   guest memory, and bounds how deeply host functions call back into the guest (wasmi's
//!   recursion limit does not see a guest recursing through a host function, and running out of
//!   native stack would abort the process; pwhost has the same counter).
//! * Its embedder data work is identical to pwhost's bench host: the same [`BenchStream`] in the
//!   same header storage `M`, restored the same way, and the same log counter.
//!
//! What it leaves out is what pwhost adds for generality: the engine-neutral `runtime_api`
//! layer (guest-function handles looked up per call, arguments and results passed as `u64`
//! slots, host functions reached through a callback pointer), the `dyn Host` indirection,
//! context bookkeeping, per-call status plumbing and (for long values) the second header lookup
//! after allocation.

use abi::{LogLevel, MapType};
use runtime_api::RuntimeConfig;
use wasmi::{
    AsContextMut, Caller, Config, CustomFuelCosts, Engine, ExternType, Linker, Memory, Module,
    Store, StoreLimits, StoreLimitsBuilder, TrapCode, TypedFunc, TypedResumableCall, Val,
    WasmParams, WasmResults,
};

use super::{
    add_value, find_value, outcome, return_value, slice, FloorEngine, FloorInstance, BAD_ARGUMENT,
    IMPLEMENTED, INTERNAL_FAILURE, INVALID_MEMORY_ACCESS, OK, UNIMPLEMENTED,
};
use crate::{BenchHeaders, BenchStream, RequestOutcome, REQUEST_HEADERS, RESPONSE_HEADERS};

/// Whether calls run in slices of fuel, as `runtime_wasmi` does in builds with debug assertions
/// (its `BOUNDED_NATIVE_STACK`): there wasmi's instruction handlers do not tail-call, so an
/// unsliced guest loop would overflow the native stack. Optimized builds run without fuel.
const BOUNDED_NATIVE_STACK: bool = cfg!(debug_assertions);

/// The fuel of one slice when the native stack is bounded (`runtime_wasmi`'s
/// `BOUNDED_SLICE_FUEL`).
const BOUNDED_SLICE_FUEL: u64 = 1024;

/// The start function's fuel when the native stack is bounded (`runtime_wasmi`'s
/// `BOUNDED_START_FUEL`; `lifecycle_bench` has no start function).
const BOUNDED_START_FUEL: u64 = 1_000_000;

/// The most elements one table may grow to, as `runtime_wasmi`'s limiter allows.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// How deeply host functions may call back into the guest, as in `runtime_wasmi`: each level
/// takes native stack that wasmi's own recursion limit does not count. The ABI needs one level
/// (the allocator, called from `proxy_get_header_map_value`).
const MAX_NESTED_CALLS: u32 = 8;

/// The per-instance state of the floor host: what host functions reach through their
/// `Caller`.
struct State<M: BenchHeaders> {
    stream: BenchStream<M>,
    /// The context host calls act on (the callback's context).
    effective_context: u32,
    memory: Option<Memory>,
    /// The plugin's allocator: `proxy_on_memory_allocate`, else `malloc`.
    malloc: Option<TypedFunc<i32, i32>>,
    /// How many calls from host functions into the guest are running.
    nested_calls: u32,
    /// The store's resource limiter (the memory and table caps).
    limits: StoreLimits,
}

/// `lifecycle_bench` compiled once, with a linker holding the floor's host functions.
struct WasmiFloor<M: BenchHeaders> {
    module: Module,
    linker: Linker<State<M>>,
    /// The memory cap of `RuntimeConfig::default()`, for each store's limiter.
    max_memory_bytes: Option<u64>,
}

/// The wasmi floor of `wasm`, configured as pwhost's wasmi runtime is with
/// `RuntimeConfig::default()`.
pub fn floor<M: BenchHeaders>(wasm: &[u8]) -> anyhow::Result<Box<dyn FloorEngine<M>>> {
    Ok(Box::new(WasmiFloor::<M>::new(
        wasm,
        RuntimeConfig::default(),
    )?))
}

/// Runs `func` to completion. Without fuel (optimized builds) this is the plain typed call;
/// with fuel slicing (debug assertions) each slice that runs out is followed by another, as
/// pwhost's runtime does when no deadline or interruption is configured.
#[inline]
fn run<T, Params: WasmParams, Results: WasmResults>(
    mut ctx: impl AsContextMut<Data = T>,
    func: TypedFunc<Params, Results>,
    params: Params,
) -> Result<Results, wasmi::Error> {
    if !BOUNDED_NATIVE_STACK {
        return func.call(ctx, params);
    }
    let mut call = func.call_resumable(&mut ctx, params)?;
    loop {
        call = match call {
            TypedResumableCall::Finished(results) => return Ok(results),
            TypedResumableCall::HostTrap(trap) => {
                return Err(wasmi::Error::new(trap.host_error().to_string()))
            }
            TypedResumableCall::OutOfFuel(paused) => {
                let fuel = BOUNDED_SLICE_FUEL.max(paused.required_fuel());
                ctx.as_context_mut().set_fuel(fuel)?;
                paused.resume(&mut ctx)?
            }
        };
    }
}

/// `proxy_log(level, message_data, message_size)`.
fn proxy_log<M: BenchHeaders>(
    mut caller: Caller<'_, State<M>>,
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
/// return_value_size)`: looks the key up once, allocates with the plugin's allocator, copies the
/// value into guest memory and writes the pointer and size.
fn proxy_get_header_map_value<M: BenchHeaders>(
    mut caller: Caller<'_, State<M>>,
    map_type: i32,
    key_ptr: i32,
    key_len: i32,
    return_data: i32,
    return_size: i32,
) -> Result<i32, wasmi::Error> {
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
        let Ok(size) = i32::try_from(len) else {
            return Ok(INTERNAL_FAILURE);
        };
        let pointer = allocate(&mut caller, size)?;
        if pointer == 0 {
            return Ok(INTERNAL_FAILURE);
        }
        pointer
    };
    // The allocator may have grown the memory: borrow it again.
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

/// Allocates `size` bytes with the plugin's allocator; 0 if it has none. A call nested deeper
/// than [`MAX_NESTED_CALLS`] (a guest recursing through host functions) traps with a stack
/// overflow instead of exhausting the native stack.
#[inline]
fn allocate<M: BenchHeaders>(
    caller: &mut Caller<'_, State<M>>,
    size: i32,
) -> Result<i32, wasmi::Error> {
    let state = caller.data_mut();
    let Some(malloc) = state.malloc else {
        return Ok(0);
    };
    if state.nested_calls >= MAX_NESTED_CALLS {
        return Err(TrapCode::StackOverflow.into());
    }
    state.nested_calls += 1;
    let result = run(&mut *caller, malloc, size);
    caller.data_mut().nested_calls -= 1;
    result
}

/// `proxy_add_header_map_value(map_type, key_data, key_size, value_data, value_size)`.
fn proxy_add_header_map_value<M: BenchHeaders>(
    mut caller: Caller<'_, State<M>>,
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

impl<M: BenchHeaders> WasmiFloor<M> {
    /// Compiles `wasm` with the engine configuration of `runtime_wasmi::WasmiRuntime::new(config)`
    /// (for a `config` without deadline or interruption) and links it: the three host functions
    /// the plugin uses, and `UNIMPLEMENTED` for every other function import.
    fn new(wasm: &[u8], config: RuntimeConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(
            config.call_deadline.is_none() && !config.interruptible,
            "the wasmi floor mirrors pwhost's runtime without deadlines or interruption"
        );
        let mut wasmi_config = Config::default();
        wasmi_config.consume_fuel(BOUNDED_NATIVE_STACK);
        wasmi_config.fuel_cost(CustomFuelCosts {
            bytes_copied_per_fuel: 64,
            fuel_per_bytes_translated: 0,
            fuel_per_bytes_validated: 0,
        });
        // pwhost keeps enough finished execution stacks for every thread and nested call, so
        // that no call allocates one.
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
        wasmi_config.set_max_cached_stacks(threads.saturating_mul(4).max(8));
        // One engine per module, as pwhost does (wasmi frees code only with its engine).
        let engine = Engine::new(&wasmi_config);
        let module = Module::new(&engine, wasm)?;

        let mut linker = Linker::new(&engine);
        // A module may import the same function twice; pwhost allows it too.
        linker.allow_shadowing(true);
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
            // Never called by `lifecycle_bench` on the measured paths, so the untyped form is
            // fine here.
            linker.func_new(
                import.module(),
                import.name(),
                ty.clone(),
                |_, _, results| {
                    if let Some(result) = results.first_mut() {
                        *result = Val::I32(UNIMPLEMENTED);
                    }
                    Ok(())
                },
            )?;
        }
        Ok(WasmiFloor {
            module,
            linker,
            max_memory_bytes: config.max_memory_bytes,
        })
    }

    /// A new instance, initialised, started and configured: `_initialize` (if exported),
    /// `proxy_on_context_create(1, 0)`, `proxy_on_vm_start(1, 0)`, `proxy_on_configure(1, 0)`.
    fn start(&self) -> anyhow::Result<WasmiFloorVm<M>> {
        let mut limits = StoreLimitsBuilder::new().table_elements(MAX_TABLE_ELEMENTS);
        if let Some(max) = self.max_memory_bytes {
            limits = limits.memory_size(usize::try_from(max).unwrap_or(usize::MAX));
        }
        let state = State {
            stream: BenchStream::<M>::new(),
            effective_context: 0,
            memory: None,
            malloc: None,
            nested_calls: 0,
            limits: limits.build(),
        };
        let mut store = Store::new(self.module.engine(), state);
        store.limiter(|state| &mut state.limits);
        if BOUNDED_NATIVE_STACK {
            store.set_fuel(BOUNDED_START_FUEL)?;
        }
        let instance = self
            .linker
            .instantiate_and_start(&mut store, &self.module)?;
        let memory = instance.get_memory(&store, "memory");
        // The allocator pwhost uses too: `proxy_on_memory_allocate`, else `malloc`.
        let malloc = instance
            .get_typed_func(&store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func(&store, "malloc"))?;
        store.data_mut().memory = memory;
        store.data_mut().malloc = Some(malloc);
        let initialize = instance
            .get_typed_func::<(), ()>(&store, "_initialize")
            .ok();
        let callbacks = Callbacks {
            context_create: instance.get_typed_func(&store, "proxy_on_context_create")?,
            vm_start: instance.get_typed_func(&store, "proxy_on_vm_start")?,
            configure: instance.get_typed_func(&store, "proxy_on_configure")?,
            request_headers: instance.get_typed_func(&store, "proxy_on_request_headers")?,
            response_headers: instance.get_typed_func(&store, "proxy_on_response_headers")?,
            log: instance.get_typed_func(&store, "proxy_on_log")?,
            done: instance.get_typed_func(&store, "proxy_on_done")?,
            delete: instance.get_typed_func(&store, "proxy_on_delete")?,
        };
        let mut vm = WasmiFloorVm {
            store,
            callbacks,
            next_context: 2,
        };
        if let Some(initialize) = initialize {
            vm.arm(0)?;
            run(&mut vm.store, initialize, ())?;
        }
        vm.arm(1)?;
        run(&mut vm.store, vm.callbacks.context_create, (1, 0))?;
        vm.arm(1)?;
        run(&mut vm.store, vm.callbacks.vm_start, (1, 0))?;
        vm.arm(1)?;
        run(&mut vm.store, vm.callbacks.configure, (1, 0))?;
        Ok(vm)
    }
}

impl<M: BenchHeaders> FloorEngine<M> for WasmiFloor<M> {
    fn instantiate(&self) -> anyhow::Result<Box<dyn FloorInstance<M>>> {
        Ok(Box::new(self.start()?))
    }
}

/// The callbacks the floor calls, resolved once per instance (`TypedFunc` is `Copy`).
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
struct WasmiFloorVm<M: BenchHeaders> {
    store: Store<State<M>>,
    callbacks: Callbacks,
    next_context: u32,
}

impl<M: BenchHeaders> WasmiFloorVm<M> {
    /// Prepares a top-level call for `context`: sets the effective context and, when calls run
    /// in fuel slices, the first slice (as pwhost's runtime does per top-level call).
    #[inline]
    fn arm(&mut self, context: u32) -> Result<(), wasmi::Error> {
        self.store.data_mut().effective_context = context;
        if BOUNDED_NATIVE_STACK {
            self.store.set_fuel(BOUNDED_SLICE_FUEL)?;
        }
        Ok(())
    }

    /// One full request, the same callback sequence as [`crate::pwhost_request`]:
    /// `proxy_on_context_create(ctx, 1)`, `proxy_on_request_headers(ctx, 10, 0)`,
    /// `proxy_on_response_headers(ctx, 3, 0)`, `proxy_on_log`, `proxy_on_done`,
    /// `proxy_on_delete`.
    #[inline]
    fn serve(&mut self) -> Result<RequestOutcome, wasmi::Error> {
        let context = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(2);
        let ctx = context as i32;
        self.arm(context)?;
        run(&mut self.store, self.callbacks.context_create, (ctx, 1))?;
        self.store.data_mut().stream.begin(context);
        self.arm(context)?;
        let request = run(
            &mut self.store,
            self.callbacks.request_headers,
            (ctx, REQUEST_HEADERS.len() as i32, 0),
        )?;
        self.arm(context)?;
        let response = run(
            &mut self.store,
            self.callbacks.response_headers,
            (ctx, RESPONSE_HEADERS.len() as i32, 0),
        )?;
        self.arm(context)?;
        run(&mut self.store, self.callbacks.log, ctx)?;
        self.arm(context)?;
        run(&mut self.store, self.callbacks.done, ctx)?;
        self.arm(context)?;
        run(&mut self.store, self.callbacks.delete, ctx)?;
        Ok(outcome(request, response))
    }
}

impl<M: BenchHeaders> FloorInstance<M> for WasmiFloorVm<M> {
    fn request(&mut self) -> anyhow::Result<RequestOutcome> {
        Ok(self.serve()?)
    }

    fn stream(&self) -> &BenchStream<M> {
        &self.store.data().stream
    }
}
