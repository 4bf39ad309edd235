//! Instances, their per-store environment and the host-function caller.

use std::ptr::NonNull;
use std::sync::Arc;

use runtime_api::{
    Caller, Error, ExportedFunctions, GuestFunction, GuestMemory, HostFunction, Instance,
    InterruptHandle, Trap, TrapKind, WasmTrapCode,
};
use wasmer::sys::vm::{LinearMemory, VMExtern, VMMemoryDefinition};
use wasmer::{AsStoreMut, Extern, FunctionEnv, FunctionEnvMut, Store};

use crate::call::{convert_error, host_function, GuestCall};
use crate::module::ExportedFunction;
use crate::stop::{self, FlagPtr, StopSlot, Ticker, WasmerInterruptHandle};

/// The address of an instance's memory definition (base pointer and current length), which
/// wasmer updates in place when the memory grows.
#[derive(Clone, Copy)]
struct MemoryDefinition(NonNull<VMMemoryDefinition>);

// SAFETY: the definition lives in the instance's `VMContext`, owned by the store that also owns
// the `Env` holding this pointer; it is only read by whoever holds the store.
unsafe impl Send for MemoryDefinition {}

impl MemoryDefinition {
    /// The memory as bytes.
    ///
    /// # Safety
    /// The instance must be alive and no guest code may run (or the memory grow) while the
    /// returned slice is in use.
    #[inline]
    unsafe fn bytes<'a>(self) -> &'a mut [u8] {
        // SAFETY: per the contract, the definition is alive and describes `current_length`
        // accessible bytes at `base`.
        unsafe {
            let definition = self.0.as_ref();
            if definition.current_length == 0 {
                return &mut [];
            }
            std::slice::from_raw_parts_mut(definition.base, definition.current_length)
        }
    }
}

/// How deeply host functions may nest calls back into the guest (the allocator calling a host
/// function that calls the allocator …). Every level takes a fresh guest stack from wasmer, which
/// aborts the process when it cannot get one; the ABI needs one level.
const MAX_NESTED_CALLS: u32 = 8;

/// What each store holds beside the embedder's state: the host functions' environment.
pub(crate) struct Env<S> {
    state: S,
    memory: Option<MemoryDefinition>,
    /// Guest functions resolved for this store, with the handle given out for each.
    functions: Vec<(GuestFunction, GuestCall)>,
    /// Calls into the guest currently made from host functions.
    nested_calls: u32,
}

impl<S> Env<S> {
    #[inline]
    fn memory(&mut self) -> GuestMemory<'_> {
        match self.memory {
            // SAFETY: the guest is not running while the host holds `&mut Env` (host functions
            // run with the guest suspended), and the borrow of `self` keeps the view from
            // outliving this host call.
            Some(memory) => GuestMemory::new(unsafe { memory.bytes() }),
            None => GuestMemory::empty(),
        }
    }

    /// The call behind `handle`, which must be one this store gave out: a handle of another
    /// instance with the same index may have another type.
    #[inline]
    fn function(&self, handle: GuestFunction) -> Result<&GuestCall, Trap> {
        match self.functions.get(handle.index() as usize) {
            Some((given, call)) if *given == handle => Ok(call),
            _ => Err(Trap::new(
                TrapKind::BadCall,
                "unknown guest function handle",
            )),
        }
    }
}

/// How instances of one linked module stop runaway calls.
#[derive(Clone, Default)]
pub(crate) struct StopConfig {
    /// The module was compiled with the stop-flag checks and the runtime wants them.
    pub(crate) enabled: bool,
    /// The ticker enforcing call deadlines, if they are configured.
    pub(crate) ticker: Option<Arc<Ticker>>,
    /// Hand out interrupt handles.
    pub(crate) interruptible: bool,
}

/// A wasmer store that may move between threads while none of its code runs.
///
/// wasmer 7 made `Store` `!Send` by dropping `Send` from the type of its "on called" handler
/// (wasmerio/wasmer#7001; 6.x stores were `Send`), and its VM objects are raw pointers. Moving
/// this store is nevertheless sound: no "on called" handler is ever set, every host function
/// closure is `Send + Sync`, the embedder state is `Send`, and wasmer's thread-local store context
/// only holds the store while a call runs on that thread (as do its trap handler and coroutine
/// stack); an `Instance` is used by one thread at a time, and a call never outlives the `&mut`
/// borrow that started it.
struct SendStore(Store);

// SAFETY: see the type's documentation.
unsafe impl Send for SendStore {}

/// Where a store keeps the host functions' environment.
///
/// wasmer finds a `FunctionEnv`'s data by looking it up in the store and checking its type on
/// every access; the embedder reaches its state several times per callback. The data is boxed
/// in the store's objects, so its address stays put for the store's life.
struct EnvData<S>(NonNull<Env<S>>);

// SAFETY: the pointer is only dereferenced by whoever holds the store that owns the data (see
// `WasmerInstance::env`), and the data itself is `Send` (wasmer requires it of a `FunctionEnv`).
unsafe impl<S: Send> Send for EnvData<S> {}

impl<S: Send + 'static> EnvData<S> {
    /// `env`'s data in `store`.
    fn of(env: &FunctionEnv<Env<S>>, store: &mut Store) -> Self {
        EnvData(NonNull::from(env.as_mut(store)))
    }
}

/// A wasmer instance with its store.
pub struct WasmerInstance<S: 'static> {
    store: SendStore,
    env: FunctionEnv<Env<S>>,
    /// `env`'s data, found again after every call into the guest (whose host functions reach
    /// the data through the store in the meantime).
    data: EnvData<S>,
    exports: Arc<ExportedFunctions<ExportedFunction>>,
    instance: wasmer::Instance,
    stop: Option<Arc<StopSlot>>,
    /// Keeps the ticker watching this instance's calls while it lives, even once the runtime
    /// that started the ticker is gone.
    _ticker: Option<Arc<Ticker>>,
    interruptible: bool,
    memory_limit: Option<usize>,
}

impl<S: Send + 'static> WasmerInstance<S> {
    pub(crate) fn new(
        engine: &wasmer::Engine,
        module: &wasmer::Module,
        host: &[HostFunction<S>],
        exports: Arc<ExportedFunctions<ExportedFunction>>,
        stop: &StopConfig,
        memory_limit: Option<usize>,
        state: S,
    ) -> Result<Self, Error> {
        let mut store = Store::new(engine.clone());
        let env = FunctionEnv::new(
            &mut store,
            Env {
                state,
                memory: None,
                functions: Vec::with_capacity(exports.len()),
                nested_calls: 0,
            },
        );
        let imports: Vec<Extern> = host
            .iter()
            .map(|function| Extern::Function(host_function(&mut store, &env, function)))
            .collect();
        let instance = wasmer::Instance::new_by_index(&mut store, module, &imports)
            .map_err(|e| Error::Instantiation(instantiation_message(e)))?;
        let memory = instance
            .exports
            .get_extern("memory")
            .and_then(|memory| memory_definition(&mut store, memory));
        env.as_mut(&mut store).memory = memory;
        let data = EnvData::of(&env, &mut store);
        let slot = if stop.enabled {
            let flag = instance
                .exports
                .get_extern(stop::STOP_FLAG_EXPORT)
                .and_then(|global| stop_flag(&mut store, global))
                .ok_or_else(|| {
                    Error::Instantiation("the module has no stop flag to enforce deadlines".into())
                })?;
            let slot = StopSlot::new();
            slot.attach(flag);
            if let Some(ticker) = &stop.ticker {
                ticker.register(&slot);
            }
            Some(slot)
        } else {
            None
        };
        let mut this = WasmerInstance {
            store: SendStore(store),
            env,
            data,
            exports,
            instance,
            stop: slot,
            _ticker: stop.ticker.clone(),
            interruptible: stop.interruptible,
            memory_limit,
        };
        // The middleware turned the start function into an export, so that it runs here,
        // under the deadline and interruptible, instead of unguarded inside `Instance::new`.
        if let Ok(start) = this.instance.exports.get_function(stop::START_EXPORT) {
            let start = start.clone();
            this.guarded(|store| start.call(store, &[]).map(drop))
                .map_err(|trap| Error::Instantiation(trap.to_string()))?;
        }
        Ok(this)
    }

    /// The host functions' environment, without a store lookup.
    #[inline]
    fn env(&mut self) -> &mut Env<S> {
        // SAFETY: `data` points at the environment boxed in the store's objects, which `self`
        // owns; `&mut self` keeps every other path to it (host functions, which only run inside
        // `guarded`) away for as long as the borrow lives, and `guarded` finds `data` again
        // after each call, so it is never used across one.
        unsafe { self.data.0.as_mut() }
    }

    /// Runs a top-level call into the guest under the instance's deadline and interrupt flag.
    fn guarded(
        &mut self,
        call: impl FnOnce(&mut Store) -> Result<(), wasmer::RuntimeError>,
    ) -> Result<(), Trap> {
        let outcome = self.guarded_call(call);
        self.data = EnvData::of(&self.env, &mut self.store.0);
        outcome
    }

    fn guarded_call(
        &mut self,
        call: impl FnOnce(&mut Store) -> Result<(), wasmer::RuntimeError>,
    ) -> Result<(), Trap> {
        let Some(slot) = &self.stop else {
            return call(&mut self.store.0).map_err(convert_error);
        };
        slot.begin();
        // Should a host function panic through the call, the guard still ends it, so that the
        // deadline does not stay armed for an instance the embedder keeps using.
        let mut guard = EndOnUnwind(Some(slot));
        let outcome = call(&mut self.store.0).map_err(convert_error);
        guard.0 = None;
        // Only the check's own trap may stand for a stop; any other failure leaves a pending
        // interrupt pending.
        let stop = slot.end(matches!(&outcome, Err(trap) if stop::is_check_trap(trap)));
        outcome.map_err(|trap| stop::reclassify(trap, stop))
    }
}

/// The message of an instantiation failure: a trap in the start function reads as the trap.
fn instantiation_message(error: wasmer::InstantiationError) -> String {
    match error {
        wasmer::InstantiationError::Start(trap) => convert_error(trap).to_string(),
        other => other.to_string(),
    }
}

/// The definition of an exported memory.
fn memory_definition(store: &mut Store, memory: &Extern) -> Option<MemoryDefinition> {
    let Extern::Memory(_) = memory else {
        return None;
    };
    let VMExtern::Memory(handle) = memory.to_vm_extern().unwrap_sys() else {
        return None;
    };
    let definition = handle.get(store.objects_mut().as_sys()).vmmemory();
    Some(MemoryDefinition(definition))
}

/// The address of the stop flag global.
fn stop_flag(store: &mut Store, global: &Extern) -> Option<FlagPtr> {
    let Extern::Global(_) = global else {
        return None;
    };
    let VMExtern::Global(handle) = global.to_vm_extern().unwrap_sys() else {
        return None;
    };
    let definition = handle.get(store.objects_mut().as_sys()).vmglobal();
    // SAFETY: the middleware declared the global as a mutable `i32`; its value is the first 4
    // bytes of the 16-byte aligned definition inside the instance's `VMContext`, which lives as
    // long as the store (the instance detaches the slot before the store is dropped).
    Some(unsafe { FlagPtr::new(definition.cast::<i32>()) })
}

impl<S: 'static> Drop for WasmerInstance<S> {
    fn drop(&mut self) {
        // Before the store (and the flag inside it) is freed.
        if let Some(slot) = &self.stop {
            slot.detach();
        }
    }
}

impl<S: Send + 'static> Instance<S> for WasmerInstance<S> {
    fn state(&mut self) -> &mut S {
        &mut self.env().state
    }

    fn function(&mut self, name: &str) -> Option<GuestFunction> {
        let exports = self.exports.clone();
        let ty = &exports.get(name)?.ty;
        let function = self.instance.exports.get_function(name).ok()?;
        let call = GuestCall::new(&mut self.store.0, function, ty)?;
        let env = self.env();
        let handle = GuestFunction::new(env.functions.len() as u32, ty);
        env.functions.push((handle, call));
        Some(handle)
    }

    fn call(
        &mut self,
        function: GuestFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap> {
        function.check_arity(args.len(), results.len())?;
        let env = self.env();
        // No guest call is in progress below a top-level one: a count a host function's panic
        // left raised (it unwinds past the nested call's decrement) starts again from zero.
        env.nested_calls = 0;
        let call = *env.function(function)?;
        // SAFETY: `call` was resolved in this instance's store (its `Env` holds only those), which
        // `guarded` lends to the call alone.
        self.guarded(|store| unsafe { call.call(store, args, results) })
    }

    fn memory_size(&mut self) -> usize {
        self.env().memory().len()
    }

    fn memory_limit(&self) -> Option<usize> {
        self.memory_limit
    }

    fn interrupt_handle(&self) -> Option<Arc<dyn InterruptHandle>> {
        match &self.stop {
            Some(slot) if self.interruptible => Some(Arc::new(WasmerInterruptHandle(slot.clone()))),
            _ => None,
        }
    }
}

/// Ends a top-level call on its slot if the call unwinds instead of returning.
struct EndOnUnwind<'a>(Option<&'a Arc<StopSlot>>);

impl Drop for EndOnUnwind<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.0 {
            slot.end(false);
        }
    }
}

/// The [`Caller`] handed to host functions.
///
/// The host function's environment is found once, when the host function starts: wasmer's
/// `FunctionEnvMut::data_mut` looks the environment up in the store and checks its type on every
/// use, and a Proxy-Wasm host call reaches its state several times.
pub(crate) struct WasmerCaller<'a, S: 'static> {
    env: FunctionEnvMut<'a, Env<S>>,
    /// `env`'s data, found through it and found again after every call into the guest.
    data: NonNull<Env<S>>,
}

impl<'a, S: Send + 'static> WasmerCaller<'a, S> {
    #[inline]
    pub(crate) fn new(mut env: FunctionEnvMut<'a, Env<S>>) -> Self {
        let data = NonNull::from(env.data_mut());
        WasmerCaller { env, data }
    }

    /// The environment, borrowed for as long as `self` is.
    #[inline]
    fn data(&mut self) -> &mut Env<S> {
        // SAFETY: `data` was derived from `env`, which holds the store (and so the environment,
        // boxed in the store's objects where it never moves) exclusively for this host call;
        // nothing else reaches the environment meanwhile except host functions of a nested
        // guest call, and `call` derives `data` afresh after one. The returned borrow is tied
        // to `&mut self`, so no two are live at once.
        unsafe { self.data.as_mut() }
    }
}

impl<S: Send + 'static> Caller<S> for WasmerCaller<'_, S> {
    #[inline]
    fn state(&mut self) -> &mut S {
        &mut self.data().state
    }

    #[inline]
    fn memory(&mut self) -> GuestMemory<'_> {
        self.data().memory()
    }

    #[inline]
    fn state_and_memory(&mut self) -> (&mut S, GuestMemory<'_>) {
        let env = self.data();
        let memory = match env.memory {
            // SAFETY: as in `Env::memory`; the memory bytes are not part of `Env`, so the view
            // and the state borrow are disjoint.
            Some(memory) => GuestMemory::new(unsafe { memory.bytes() }),
            None => GuestMemory::empty(),
        };
        (&mut env.state, memory)
    }

    fn call(
        &mut self,
        function: GuestFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap> {
        function.check_arity(args.len(), results.len())?;
        let (env, mut store) = self.env.data_and_store_mut();
        if env.nested_calls >= MAX_NESTED_CALLS {
            return Err(Trap::wasm(WasmTrapCode::StackOverflow));
        }
        let call = *env.function(function)?;
        env.nested_calls += 1;
        // SAFETY: `call` was resolved in this store (its `Env` holds only those), which this host
        // function holds and lends to the call alone; `env` is not used until it returns.
        let result = unsafe { call.call(&mut store, args, results) }.map_err(convert_error);
        let env = self.env.data_mut();
        env.nested_calls = env.nested_calls.saturating_sub(1);
        self.data = NonNull::from(env);
        result
    }
}
