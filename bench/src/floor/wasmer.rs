//! The wasmer floor: the least a correct Proxy-Wasm host on raw wasmer must do to run
//! `lifecycle_bench`, with any of wasmer's three compilers (the rules all floors follow are in
//! [`super`]).
//!
//! Why it is a fair floor for pwhost on wasmer (`runtime_wasmer` with
//! `RuntimeConfig::default()`):
//!
//! * Same engine, same compiled code: one wasmer engine per module, built as pwhost builds it
//!   (`EngineBuilder` with the compiler's default config, the threads proposal off, no
//!   middleware since the default config has neither a deadline nor interruption) and with the
//!   same memory cap (1 GiB) as a [`Tunables`] that lowers each memory's maximum. The cap only
//!   acts when a memory is created or grown, never on a call.
//! * The same per-instance mechanism as pwhost: a new `Store` per instance, every import created
//!   in it in import order and the instance made with `Instance::new_by_index` (wasmer has no
//!   pre-instantiation across stores, so this is the least any host can do).
//! * Host functions use wasmer's only typed binding, `Function::new_typed_with_env` over a
//!   [`FunctionEnv`] (native arguments, no value vectors), as pwhost's do.
//! * Guest memory is read through the memory's `VMMemoryDefinition`, as pwhost does: two loads
//!   per access and no store lookup. (`Memory::view` would look the memory up in the store on
//!   every host call and still need an `unsafe` slice to compare keys in place.)
//! * Calls into the guest take the cheapest path wasmer 7.4.2 offers ([`GuestCalls`]): by
//!   default wasmer's own call trampoline, entered once per request under one store-context
//!   entry ([`GuestCalls::Trampoline`]); [`GuestCalls::Typed`] is the ordinary
//!   `TypedFunction::call`. pwhost takes the trampoline too, but installs the store context
//!   once per call (`runtime_api::Instance::call` is one callback).
//! * It does only the host calls the plugin makes (`proxy_log`, `proxy_get_header_map_value`,
//!   `proxy_add_header_map_value`); the module's other imports return `UNIMPLEMENTED` (12).
//! * It still does what any correct host must: bounds-checks every guest pointer, validates the
//!   log level and map type, allocates reply buffers with the plugin's allocator and writes
//!   values straight into guest memory, in the same [`BenchStream`] as pwhost's bench host.
//!
//! What it leaves out is what pwhost adds for generality: the engine-neutral `runtime_api`
//! layer (argument slots, the `dyn Host` indirection, guest function handles checked per call),
//! context bookkeeping, per-call status plumbing and, for long values, the second header lookup
//! after allocation.
//!
//! # Why the guest calls bypass `TypedFunction::call`
//!
//! Each `TypedFunction::call` (wasmer 7.4.2, `sys` backend) looks the function up in the store,
//! pushes the store on wasmer's thread-local store-context stack and "pauses" it, runs the guest
//! on a coroutine stack under a trap-handler context (`wasmer_call_trampoline`), then pops the
//! context again: about 610 instructions for a call to an empty function, of which about 220 are
//! the store-context bookkeeping and about 100 the lookups, against about 230 for wasmtime's
//! `TypedFunc::call`. A call nested in a host function (the allocator) costs about 665, since
//! its coroutine stack comes from a global lock-free pool instead of the thread's cache.
//!
//! The store context only has to be installed while guest code runs, so that host functions can
//! find their store: `StoreMut::parked` installs it for as long as a closure runs (it is "the
//! same thing `Function::call` does before entering Wasm", says its documentation), and
//! `wasmer::sys::vm::wasmer_call_trampoline` is the public entry point `TypedFunction::call`
//! itself uses. `RawFunc` resolves a function's trampoline, body and context once per instance
//! (after checking its type), and [`FloorVm::request`] makes the request's six calls under one
//! `parked`; the nested allocator call parks its host function's store, as `TypedFunction::call`
//! would. What remains per call is wasmer's coroutine switch and trap-handler set-up, which no
//! public API avoids; host functions likewise always run through `on_host_stack` and
//! `catch_unwind` (about 250 instructions per guest-to-host call, 45 on wasmtime). On
//! `lifecycle_bench` (6 callbacks, 11 allocator calls and 13 host calls per request) the
//! trampoline path saves about 3,300 of 26,900 instructions per request (callgrind, cranelift).

use std::marker::PhantomData;
use std::ptr::NonNull;

use abi::{LogLevel, MapType};
use runtime_api::RuntimeConfig;
use wasmer::sys::vm::{
    wasmer_call_trampoline, LinearMemory, TrapHandlerFn, VMCallerCheckedAnyfunc, VMConfig,
    VMExtern, VMMemoryDefinition,
};
use wasmer::sys::{EngineBuilder, Features, NativeEngineExt};
use wasmer::{
    AsStoreMut, AsStoreRef, Exports, Extern, ExternType, Function, FunctionEnv, FunctionEnvMut,
    FunctionType, RuntimeError, Store, Type, TypedFunction, Value,
};

use super::{
    add_value, find_value, outcome, return_value, slice, FloorEngine, FloorInstance, BAD_ARGUMENT,
    IMPLEMENTED, INTERNAL_FAILURE, INVALID_MEMORY_ACCESS, OK, UNIMPLEMENTED,
};
use crate::{BenchHeaders, BenchStream, RequestOutcome, REQUEST_HEADERS, RESPONSE_HEADERS};

/// wasmer's compilers, named as pwhost's runtimes `wasmer-cranelift`, `wasmer-singlepass` and
/// `wasmer-llvm`. Every variant always exists; [`floor`] refuses one whose cargo feature is off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compiler {
    /// Cranelift (feature `wasmer-cranelift`).
    Cranelift,
    /// Singlepass (feature `wasmer-singlepass`).
    Singlepass,
    /// LLVM (feature `wasmer-llvm`).
    Llvm,
}

impl Compiler {
    /// The compiler's default configuration, as pwhost's `Compiler::config` makes it; an error
    /// if this build does not have the compiler.
    fn config(self) -> anyhow::Result<Box<dyn wasmer::sys::CompilerConfig>> {
        match self {
            #[cfg(feature = "wasmer-cranelift")]
            Compiler::Cranelift => Ok(Box::new(wasmer::sys::Cranelift::new())),
            #[cfg(feature = "wasmer-singlepass")]
            Compiler::Singlepass => Ok(Box::new(wasmer::sys::Singlepass::new())),
            #[cfg(feature = "wasmer-llvm")]
            Compiler::Llvm => Ok(Box::new(wasmer::sys::LLVM::new())),
            #[allow(unreachable_patterns)]
            other => anyhow::bail!(
                "the wasmer floor with {other:?} needs the bench crate's wasmer-{} feature",
                format!("{other:?}").to_lowercase()
            ),
        }
    }
}

/// The address of an instance's memory definition (base pointer and current length), which
/// wasmer updates in place when the memory grows.
#[derive(Clone, Copy)]
struct MemoryDefinition(NonNull<VMMemoryDefinition>);

// SAFETY: wasmer requires a `FunctionEnv`'s data to be `Send`. The definition lives in the
// instance's `VMContext`, owned by the store that also owns the `FloorState` holding this
// pointer, and it is only dereferenced by whoever holds that store mutably.
unsafe impl Send for MemoryDefinition {}

impl MemoryDefinition {
    /// The definition of `memory`, an export of an instance in `store`.
    fn of(store: &mut Store, memory: &Extern) -> Option<Self> {
        let Extern::Memory(_) = memory else {
            return None;
        };
        let VMExtern::Memory(handle) = memory.to_vm_extern().unwrap_sys() else {
            return None;
        };
        Some(MemoryDefinition(
            handle.get(store.objects_mut().as_sys()).vmmemory(),
        ))
    }

    /// The memory as bytes.
    ///
    /// # Safety
    /// The instance must be alive, and neither guest code may run nor the memory grow while the
    /// returned slice is in use.
    #[inline]
    unsafe fn bytes<'a>(self) -> &'a mut [u8] {
        // SAFETY: per the contract, the definition is alive and describes `current_length`
        // accessible bytes at `base`, which nothing else accesses meanwhile.
        unsafe {
            let definition = self.0.as_ref();
            if definition.current_length == 0 {
                return &mut [];
            }
            std::slice::from_raw_parts_mut(definition.base, definition.current_length)
        }
    }
}

/// How the floor calls into the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuestCalls {
    /// `TypedFunction::call` for every call: wasmer installs and removes its
    /// store context and looks the function up in the store on each call.
    Typed,
    /// wasmer's call trampoline, resolved once per instance, entered with the store context
    /// installed once per request (and once per allocator call, from within the host
    /// function): the cheapest correct path wasmer 7.4.2 has. The default.
    #[default]
    Trampoline,
}

/// The argument and result slots of a trampoline call: wasmer's `RawValue` (a 16-byte `repr(C)`
/// union, not re-exported by `wasmer`), of which the floor only uses the `i32` at offset 0.
/// [`RawFunc::new`] checks the size and alignment against wasmer's own type.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
union Slot {
    i32: i32,
    bytes: [u8; 16],
}

/// The most slots one trampoline call uses: the callbacks take at most three `i32`s.
const SLOTS: usize = 3;

/// A guest function of `N` `i32` parameters and at most one `i32` result, called through
/// wasmer's trampoline: what `TypedFunction::call` does, less the per-call store lookups and
/// store-context bookkeeping, which the caller does once around a batch of calls.
#[derive(Clone, Copy)]
struct RawFunc<const N: usize> {
    anyfunc: VMCallerCheckedAnyfunc,
    /// The store's custom signal handler (wasmer passes it to every call; none by default).
    handler: Option<*const TrapHandlerFn<'static>>,
    /// The engine's guest stack size (`Tunables::vmconfig`).
    stack_size: Option<usize>,
}

// SAFETY: wasmer requires a `FunctionEnv`'s data (which holds the allocator) to be `Send`. The
// pointers lead into the instance's `VMContext` and the engine's code, owned by the store that
// also owns this value; they are only used by whoever holds that store mutably.
unsafe impl<const N: usize> Send for RawFunc<N> {}

impl<const N: usize> RawFunc<N> {
    /// The export `name` of an instance in `store`, if it is a function of `N` `i32` parameters
    /// and at most one `i32` result.
    fn new(store: &mut Store, exports: &Exports, name: &str) -> anyhow::Result<Self> {
        let function = exports.get_function(name)?;
        let ty = function.ty(store);
        anyhow::ensure!(
            ty.params() == [Type::I32; N] && ty.results().iter().all(|t| *t == Type::I32),
            "{name} is {ty}, not {N} i32 parameters"
        );
        anyhow::ensure!(N <= SLOTS && ty.results().len() <= 1, "{name} is {ty}");
        let raw = Value::I32(0).as_raw(store);
        assert!(
            std::mem::size_of_val(&raw) == std::mem::size_of::<Slot>()
                && std::mem::align_of_val(&raw) <= std::mem::align_of::<Slot>(),
            "wasmer's RawValue changed layout"
        );
        let VMExtern::Function(handle) = Extern::Function(function.clone())
            .to_vm_extern()
            .unwrap_sys()
        else {
            anyhow::bail!("{name} is not a wasmer sys function");
        };
        // SAFETY: the handle belongs to this store (the instance's exports), whose objects hold
        // the function's `anyfunc` record; it is copied out, and what it points to (the
        // instance's `VMContext`, the compiled body and trampoline) lives as long as the store.
        let anyfunc = unsafe {
            *handle
                .get(store.objects_mut().as_sys())
                .anyfunc
                .as_ptr()
                .as_ref()
        };
        Ok(RawFunc {
            anyfunc,
            handler: store.as_store_ref().signal_handler(),
            stack_size: store.engine().tunables().vmconfig().wasm_stack_size,
        })
    }

    /// Calls the function with `args`; its result (0 if it has none).
    ///
    /// # Safety
    /// The store the function was resolved in must be alive and installed as the thread's
    /// current store context (`StoreMut::parked`), and held by no one else, for the whole call:
    /// host functions the guest calls find their store there.
    #[inline]
    unsafe fn call(&self, args: [i32; N]) -> Result<i32, RuntimeError> {
        let mut slots = [Slot { bytes: [0; 16] }; SLOTS];
        for (slot, arg) in slots.iter_mut().zip(args) {
            *slot = Slot { i32: arg };
        }
        let config = VMConfig {
            wasm_stack_size: self.stack_size,
        };
        // SAFETY: `new` checked that the function takes `N <= SLOTS` `i32`s and returns at most
        // one `i32`, so its trampoline reads and writes within `slots`, laid out as wasmer's
        // `RawValue`s; the `anyfunc` record is the function's own and, per this function's
        // contract, its instance is alive and its store installed for host functions.
        unsafe {
            wasmer_call_trampoline(
                self.handler,
                &config,
                self.anyfunc.vmctx,
                self.anyfunc.call_trampoline,
                self.anyfunc.func_ptr,
                slots.as_mut_ptr().cast(),
            )?;
            Ok(slots[0].i32)
        }
    }
}

/// The plugin's allocator (`proxy_on_memory_allocate`, else `malloc`), as the floor calls it.
enum Allocator {
    Typed(TypedFunction<i32, i32>),
    Trampoline(RawFunc<1>),
}

/// The per-instance state of the floor host: the [`FunctionEnv`] of its host functions.
pub struct FloorState<M: BenchHeaders> {
    stream: BenchStream<M>,
    /// The context host calls act on (the callback's context).
    effective_context: u32,
    memory: Option<MemoryDefinition>,
    malloc: Option<Allocator>,
    /// Allocator calls in progress (see [`MAX_NESTED_CALLS`]).
    nested_calls: u32,
}

/// How deeply host functions may call back into the guest, as `runtime-wasmer` allows: every
/// level takes a fresh guest stack, and wasmer aborts the process when it cannot get one.
const MAX_NESTED_CALLS: u32 = 8;

impl<M: BenchHeaders> FloorState<M> {
    /// The stream the instance serves.
    pub fn stream(&self) -> &BenchStream<M> {
        &self.stream
    }

    /// The guest memory and the stream, borrowed apart.
    #[inline]
    fn memory_and_stream(&mut self) -> Option<(&mut [u8], &mut BenchStream<M>, u32)> {
        let memory = self.memory?;
        // SAFETY: host functions run with the guest suspended, the memory bytes are not part of
        // `self`, and the slice lives no longer than this `&mut self` borrow, which ends before
        // the host function calls back into the guest (callers re-borrow after `allocate`).
        let bytes = unsafe { memory.bytes() };
        Some((bytes, &mut self.stream, self.effective_context))
    }
}

/// `proxy_log(level, message_data, message_size)`.
fn proxy_log<M: BenchHeaders>(
    mut env: FunctionEnvMut<'_, FloorState<M>>,
    level: i32,
    ptr: i32,
    len: i32,
) -> i32 {
    let Some(level) = LogLevel::from_raw(u64::from(level as u32)) else {
        return BAD_ARGUMENT;
    };
    let Some((bytes, stream, _)) = env.data_mut().memory_and_stream() else {
        return INTERNAL_FAILURE;
    };
    let Some(message) = slice(bytes, ptr, len) else {
        return INVALID_MEMORY_ACCESS;
    };
    stream.log(level, &String::from_utf8_lossy(message));
    OK
}

/// `proxy_get_header_map_value(map_type, key_data, key_size, return_value_data,
/// return_value_size)`: looks the key up once, allocates with the plugin's allocator, copies the
/// value into guest memory and writes the pointer and size.
fn proxy_get_header_map_value<M: BenchHeaders>(
    mut env: FunctionEnvMut<'_, FloorState<M>>,
    map_type: i32,
    key_ptr: i32,
    key_len: i32,
    return_data: i32,
    return_size: i32,
) -> Result<i32, RuntimeError> {
    let Some(map_type) = MapType::from_raw(u64::from(map_type as u32)) else {
        return Ok(BAD_ARGUMENT);
    };
    let found = {
        let Some((bytes, stream, context)) = env.data_mut().memory_and_stream() else {
            return Ok(INTERNAL_FAILURE);
        };
        match find_value(bytes, stream, context, map_type, key_ptr, key_len) {
            Ok(found) => found,
            Err(status) => return Ok(status),
        }
    };
    let len = found.1;
    let pointer = if len == 0 {
        0
    } else {
        allocate(&mut env, len)?
    };
    if len > 0 && pointer == 0 {
        return Ok(INTERNAL_FAILURE);
    }
    // The allocator may have grown the memory: the view is taken afresh.
    let Some((bytes, stream, context)) = env.data_mut().memory_and_stream() else {
        return Ok(INTERNAL_FAILURE);
    };
    Ok(return_value(
        bytes,
        stream,
        context,
        map_type,
        found,
        pointer as u32,
        return_data,
        return_size,
    ))
}

/// Allocates `len` bytes with the plugin's allocator; 0 if it has none (or `len` does not fit
/// an `i32`). A trap in the allocator is the host call's trap.
#[inline]
fn allocate<M: BenchHeaders>(
    env: &mut FunctionEnvMut<'_, FloorState<M>>,
    len: usize,
) -> Result<i32, RuntimeError> {
    let Ok(len) = i32::try_from(len) else {
        return Ok(0);
    };
    let (state, mut store) = env.data_and_store_mut();
    if state.nested_calls >= MAX_NESTED_CALLS {
        return Err(RuntimeError::new(
            "host functions nested calls into the guest too deeply",
        ));
    }
    state.nested_calls += 1;
    let result = match &state.malloc {
        // A `TypedFunction` is a store handle (an id and an index): cloning it copies two words.
        Some(Allocator::Typed(malloc)) => malloc.clone().call(&mut store, len),
        Some(Allocator::Trampoline(malloc)) => {
            let malloc = *malloc;
            // `parked` makes this host function's own store borrow the thread's current store
            // context while the allocator runs, exactly as `TypedFunction::call` would: should
            // the allocator call a host function, that one's store borrow derives from ours.
            // SAFETY: the allocator was resolved in this store, which is alive (we hold it) and
            // installed by `parked` for the call; `store` is not used until it returns.
            store.parked(|| unsafe { malloc.call([len]) })
        }
        None => Ok(0),
    };
    let state = env.data_mut();
    state.nested_calls = state.nested_calls.saturating_sub(1);
    result
}

/// `proxy_add_header_map_value(map_type, key_data, key_size, value_data, value_size)`.
fn proxy_add_header_map_value<M: BenchHeaders>(
    mut env: FunctionEnvMut<'_, FloorState<M>>,
    map_type: i32,
    key_ptr: i32,
    key_len: i32,
    value_ptr: i32,
    value_len: i32,
) -> i32 {
    let Some(map_type) = MapType::from_raw(u64::from(map_type as u32)) else {
        return BAD_ARGUMENT;
    };
    let Some((bytes, stream, context)) = env.data_mut().memory_and_stream() else {
        return INTERNAL_FAILURE;
    };
    add_value(
        bytes, stream, context, map_type, key_ptr, key_len, value_ptr, value_len,
    )
}

/// What each import of the module is bound to, resolved once per module.
enum Binding {
    Log,
    GetHeaderMapValue,
    AddHeaderMapValue,
    /// Any other function: returns `UNIMPLEMENTED` (or nothing, if it has no result).
    Unimplemented(FunctionType),
}

/// `lifecycle_bench` compiled once, with its imports resolved in import order.
pub struct FloorPlugin<M: BenchHeaders> {
    /// Kept for the module's lifetime: wasmer frees a module's code with its engine.
    engine: wasmer::Engine,
    module: wasmer::Module,
    imports: Vec<Binding>,
    calls: GuestCalls,
    _headers: PhantomData<fn() -> M>,
}

/// The wasmer floor of `wasm`, compiled with `compiler`, calling the guest the cheapest way
/// ([`GuestCalls::Trampoline`]): an error if this build lacks the compiler or the module does
/// not compile or link.
pub fn floor<M: BenchHeaders>(
    compiler: Compiler,
    wasm: &[u8],
) -> anyhow::Result<Box<dyn FloorEngine<M>>> {
    Ok(Box::new(FloorPlugin::<M>::new(
        compiler,
        wasm,
        GuestCalls::default(),
    )?))
}

impl<M: BenchHeaders> FloorPlugin<M> {
    /// Compiles `wasm` with `compiler` in its own engine, configured as pwhost's wasmer runtime
    /// configures it by default, and resolves its imports; its instances call the guest by
    /// `calls`.
    pub fn new(compiler: Compiler, wasm: &[u8], calls: GuestCalls) -> anyhow::Result<Self> {
        // pwhost's default runtime: no stop-check middleware (no deadline, not interruptible),
        // the threads proposal off, the memory cap as tunables.
        let config = RuntimeConfig::default();
        anyhow::ensure!(
            config.call_deadline.is_none() && !config.interruptible,
            "the wasmer floor models a default configuration without stop checks"
        );
        let mut features = Features::new();
        features.threads(false);
        let mut engine: wasmer::Engine = EngineBuilder::new(compiler.config()?)
            .set_features(Some(features))
            .engine()
            .into();
        // pwhost's own tunables: the same memory (and table) caps, the same memory styles.
        engine.set_tunables(runtime_wasmer::CappedTunables::new(config.max_memory_bytes));
        let module = wasmer::Module::from_binary(&engine, wasm)?;
        let imports = module
            .imports()
            .map(|import| {
                let ExternType::Function(ty) = import.ty() else {
                    anyhow::bail!("the floor imports functions only, not {}", import.name());
                };
                Ok(match (import.module(), import.name()) {
                    ("env", "proxy_log") => Binding::Log,
                    ("env", "proxy_get_header_map_value") => Binding::GetHeaderMapValue,
                    ("env", "proxy_add_header_map_value") => Binding::AddHeaderMapValue,
                    (_, name) => {
                        debug_assert!(import.module() != "env" || !IMPLEMENTED.contains(&name));
                        Binding::Unimplemented(ty.clone())
                    }
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(FloorPlugin {
            engine,
            module,
            imports,
            calls,
            _headers: PhantomData,
        })
    }

    /// A new instance, initialised, started and configured: `_initialize` (if exported),
    /// `proxy_on_context_create(1, 0)`, `proxy_on_vm_start(1, 0)`, `proxy_on_configure(1, 0)`.
    pub fn instantiate(&self) -> anyhow::Result<FloorVm<M>> {
        let mut store = Store::new(self.engine.clone());
        let env = FunctionEnv::new(
            &mut store,
            FloorState {
                stream: BenchStream::<M>::new(),
                effective_context: 0,
                memory: None,
                malloc: None,
                nested_calls: 0,
            },
        );
        let imports: Vec<Extern> = self
            .imports
            .iter()
            .map(|binding| {
                Extern::Function(match binding {
                    Binding::Log => Function::new_typed_with_env(&mut store, &env, proxy_log::<M>),
                    Binding::GetHeaderMapValue => Function::new_typed_with_env(
                        &mut store,
                        &env,
                        proxy_get_header_map_value::<M>,
                    ),
                    Binding::AddHeaderMapValue => Function::new_typed_with_env(
                        &mut store,
                        &env,
                        proxy_add_header_map_value::<M>,
                    ),
                    Binding::Unimplemented(ty) => {
                        let returns = !ty.results().is_empty();
                        Function::new(&mut store, ty, move |_| {
                            Ok(if returns {
                                vec![Value::I32(UNIMPLEMENTED)]
                            } else {
                                Vec::new()
                            })
                        })
                    }
                })
            })
            .collect();
        let instance = wasmer::Instance::new_by_index(&mut store, &self.module, &imports)?;
        let exports = &instance.exports;
        let memory = exports
            .get_extern("memory")
            .and_then(|memory| MemoryDefinition::of(&mut store, memory));
        // The allocator pwhost uses too: `proxy_on_memory_allocate`, else `malloc`.
        let allocator = if exports.contains("proxy_on_memory_allocate") {
            "proxy_on_memory_allocate"
        } else {
            "malloc"
        };
        let (malloc, callbacks) = match self.calls {
            GuestCalls::Typed => (
                Allocator::Typed(exports.get_typed_function(&store, allocator)?),
                Callbacks::Typed(TypedCallbacks::new(&store, exports)?),
            ),
            GuestCalls::Trampoline => (
                Allocator::Trampoline(RawFunc::new(&mut store, exports, allocator)?),
                Callbacks::Trampoline(RawCallbacks::new(&mut store, exports)?),
            ),
        };
        let state = env.as_mut(&mut store);
        state.memory = memory;
        state.malloc = Some(malloc);
        let mut vm = FloorVm {
            store,
            env,
            callbacks,
            _instance: instance,
            next_context: 2,
        };
        vm.start()?;
        Ok(vm)
    }
}

impl<M: BenchHeaders> FloorEngine<M> for FloorPlugin<M> {
    fn instantiate(&self) -> anyhow::Result<Box<dyn FloorInstance<M>>> {
        Ok(Box::new(FloorPlugin::instantiate(self)?))
    }
}

/// The callbacks the floor calls as `TypedFunction`s, resolved once per instance.
struct TypedCallbacks {
    initialize: Option<TypedFunction<(), ()>>,
    context_create: TypedFunction<(i32, i32), ()>,
    vm_start: TypedFunction<(i32, i32), i32>,
    configure: TypedFunction<(i32, i32), i32>,
    request_headers: TypedFunction<(i32, i32, i32), i32>,
    response_headers: TypedFunction<(i32, i32, i32), i32>,
    log: TypedFunction<i32, ()>,
    done: TypedFunction<i32, i32>,
    delete: TypedFunction<i32, ()>,
}

impl TypedCallbacks {
    fn new(store: &Store, exports: &Exports) -> anyhow::Result<Self> {
        Ok(TypedCallbacks {
            initialize: exports.get_typed_function(store, "_initialize").ok(),
            context_create: exports.get_typed_function(store, "proxy_on_context_create")?,
            vm_start: exports.get_typed_function(store, "proxy_on_vm_start")?,
            configure: exports.get_typed_function(store, "proxy_on_configure")?,
            request_headers: exports.get_typed_function(store, "proxy_on_request_headers")?,
            response_headers: exports.get_typed_function(store, "proxy_on_response_headers")?,
            log: exports.get_typed_function(store, "proxy_on_log")?,
            done: exports.get_typed_function(store, "proxy_on_done")?,
            delete: exports.get_typed_function(store, "proxy_on_delete")?,
        })
    }
}

/// The callbacks the floor calls through wasmer's trampoline, resolved once per instance.
struct RawCallbacks {
    initialize: Option<RawFunc<0>>,
    context_create: RawFunc<2>,
    vm_start: RawFunc<2>,
    configure: RawFunc<2>,
    request_headers: RawFunc<3>,
    response_headers: RawFunc<3>,
    log: RawFunc<1>,
    done: RawFunc<1>,
    delete: RawFunc<1>,
}

impl RawCallbacks {
    fn new(store: &mut Store, exports: &Exports) -> anyhow::Result<Self> {
        Ok(RawCallbacks {
            initialize: if exports.contains("_initialize") {
                Some(RawFunc::new(store, exports, "_initialize")?)
            } else {
                None
            },
            context_create: RawFunc::new(store, exports, "proxy_on_context_create")?,
            vm_start: RawFunc::new(store, exports, "proxy_on_vm_start")?,
            configure: RawFunc::new(store, exports, "proxy_on_configure")?,
            request_headers: RawFunc::new(store, exports, "proxy_on_request_headers")?,
            response_headers: RawFunc::new(store, exports, "proxy_on_response_headers")?,
            log: RawFunc::new(store, exports, "proxy_on_log")?,
            done: RawFunc::new(store, exports, "proxy_on_done")?,
            delete: RawFunc::new(store, exports, "proxy_on_delete")?,
        })
    }
}

/// The callbacks of an instance, by [`GuestCalls`]. Kept inline (the instance itself is boxed by
/// [`FloorEngine::instantiate`]): a box here would add a pointer chase to every request.
#[allow(clippy::large_enum_variant)]
enum Callbacks {
    Typed(TypedCallbacks),
    Trampoline(RawCallbacks),
}

/// One started floor instance: its store, host environment and callbacks.
pub struct FloorVm<M: BenchHeaders> {
    store: Store,
    env: FunctionEnv<FloorState<M>>,
    callbacks: Callbacks,
    /// Owns the instance's exports for as long as the store runs it.
    _instance: wasmer::Instance,
    next_context: u32,
}

impl<M: BenchHeaders> FloorVm<M> {
    /// `_initialize` (if exported), `proxy_on_context_create(1, 0)`, `proxy_on_vm_start(1, 0)`,
    /// `proxy_on_configure(1, 0)`, all on the root context 1 (`_initialize` on none).
    fn start(&mut self) -> Result<(), RuntimeError> {
        let store = &mut self.store;
        match &self.callbacks {
            Callbacks::Typed(callbacks) => {
                if let Some(initialize) = &callbacks.initialize {
                    self.env.as_mut(store).effective_context = 0;
                    initialize.call(store)?;
                }
                self.env.as_mut(store).effective_context = 1;
                callbacks.context_create.call(store, 1, 0)?;
                callbacks.vm_start.call(store, 1, 0)?;
                callbacks.configure.call(store, 1, 0)?;
            }
            Callbacks::Trampoline(callbacks) => {
                let env = &self.env;
                if let Some(initialize) = &callbacks.initialize {
                    env.as_mut(store).effective_context = 0;
                    // SAFETY: resolved in this store, which `parked` installs (and we hold).
                    store
                        .as_store_mut()
                        .parked(|| unsafe { initialize.call([]) })?;
                }
                env.as_mut(store).effective_context = 1;
                // SAFETY: resolved in this store, which `parked` installs (and we hold) for all
                // three calls.
                store.as_store_mut().parked(|| unsafe {
                    callbacks.context_create.call([1, 0])?;
                    callbacks.vm_start.call([1, 0])?;
                    callbacks.configure.call([1, 0])
                })?;
            }
        }
        Ok(())
    }

    /// One full request, the same callback sequence as [`crate::pwhost_request`]:
    /// `proxy_on_context_create(ctx, 1)`, `proxy_on_request_headers(ctx, 10, 0)`,
    /// `proxy_on_response_headers(ctx, 3, 0)`, `proxy_on_log`, `proxy_on_done`,
    /// `proxy_on_delete`.
    #[inline]
    pub fn request(&mut self) -> Result<RequestOutcome, RuntimeError> {
        let context = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(2);
        let ctx = context as i32;
        let store = &mut self.store;
        let env = &self.env;
        // The effective context is set once: every callback of the request is on `context`.
        env.as_mut(store).effective_context = context;
        let (request, response) = match &self.callbacks {
            Callbacks::Typed(callbacks) => {
                callbacks.context_create.call(store, ctx, 1)?;
                env.as_mut(store).stream.begin(context);
                let request =
                    callbacks
                        .request_headers
                        .call(store, ctx, REQUEST_HEADERS.len() as i32, 0)?;
                let response = callbacks.response_headers.call(
                    store,
                    ctx,
                    RESPONSE_HEADERS.len() as i32,
                    0,
                )?;
                callbacks.log.call(store, ctx)?;
                callbacks.done.call(store, ctx)?;
                callbacks.delete.call(store, ctx)?;
                (request, response)
            }
            // SAFETY: every function was resolved in this store, which `parked` installs as the
            // thread's store context for the whole request (and which we hold mutably).
            Callbacks::Trampoline(callbacks) => store.as_store_mut().parked(|| unsafe {
                callbacks.context_create.call([ctx, 1])?;
                // The parked store is lendable here: no host function holds it between calls.
                wasmer::Store::with_current(|store| env.as_mut(store).stream.begin(context))
                    .expect("the parked store is current");
                let request =
                    callbacks
                        .request_headers
                        .call([ctx, REQUEST_HEADERS.len() as i32, 0])?;
                let response =
                    callbacks
                        .response_headers
                        .call([ctx, RESPONSE_HEADERS.len() as i32, 0])?;
                callbacks.log.call([ctx])?;
                callbacks.done.call([ctx])?;
                callbacks.delete.call([ctx])?;
                Ok::<_, RuntimeError>((request, response))
            })?,
        };
        Ok(outcome(request, response))
    }

    /// The instance's host state.
    pub fn state(&self) -> &FloorState<M> {
        self.env.as_ref(&self.store)
    }
}

impl<M: BenchHeaders> FloorInstance<M> for FloorVm<M> {
    fn request(&mut self) -> anyhow::Result<RequestOutcome> {
        Ok(FloorVm::request(self)?)
    }

    fn stream(&self) -> &BenchStream<M> {
        self.state().stream()
    }
}
