//! Instances and the host-function caller.

use std::sync::Arc;

use runtime_api::{
    Caller, Error, ExportedFunctions, GuestFunction, GuestMemory, Instance, InterruptHandle,
    RuntimeConfig, TableEntries, Trap, TrapKind, WasmTrapCode,
};
use wasmi::{AsContextMut, Memory, Store, StoreLimits, StoreLimitsBuilder};

use crate::call::{convert_error, GuestCall};
use crate::fuel::{FuelPolicy, FuelSlices, BOUNDED_NATIVE_STACK, BOUNDED_START_STACK_BYTES};
use crate::module::ExportedFunction;

/// How deeply host functions may call back into the guest. wasmi gives every nested call a stack
/// of its own, so its recursion limit does not see a guest that recurses through a host function
/// (the allocator calling a host function that calls the allocator …); each level takes native
/// stack (about 4 KiB optimized, 15 KiB in debug builds, plus what the host function uses), and
/// running out of it would abort the process. The ABI needs one level.
pub(crate) const MAX_NESTED_CALLS: u32 = 8;

/// [`runtime_api::MAX_TABLE_ENTRIES`] as a size.
const MAX_TABLE_ENTRIES: usize = runtime_api::MAX_TABLE_ENTRIES as usize;

/// A guest function resolved for this store: the handle given out for it, and how to call it.
#[derive(Clone, Copy)]
struct ResolvedFunction {
    handle: GuestFunction,
    call: GuestCall,
}

/// What each store holds beside the embedder's state.
pub(crate) struct StoreData<S> {
    state: S,
    memory: Option<Memory>,
    functions: Vec<ResolvedFunction>,
    limits: CapWatch,
    /// How many calls from host functions into the guest are running.
    nested_calls: u32,
    /// Fuel slicing, when a deadline or interruption is configured (or the native stack must be
    /// bounded, see [`BOUNDED_NATIVE_STACK`]).
    pub(crate) fuel: Option<FuelSlices>,
}

/// wasmi's own limits, noting when the memory cap refuses a `memory.grow`.
struct CapWatch {
    limits: StoreLimits,
    cap: Option<usize>,
    refused: bool,
    /// The entries of the instance's tables, all together.
    table_entries: TableEntries,
}

impl wasmi::ResourceLimiter for CapWatch {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool, wasmi_core::LimiterError> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        // Refused by the cap, not by the module's own maximum.
        if !allowed && self.cap.is_some_and(|cap| desired > cap) {
            self.refused = true;
        }
        Ok(allowed)
    }

    fn memory_grow_failed(
        &mut self,
        error: &wasmi::errors::MemoryError,
    ) -> Result<(), wasmi_core::LimiterError> {
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool, wasmi_core::LimiterError> {
        // Each table within the limit, and all of them together.
        Ok(self.limits.table_growing(current, desired, maximum)?
            && self.table_entries.growing(current, desired))
    }

    fn table_grow_failed(
        &mut self,
        error: &wasmi::errors::TableError,
    ) -> Result<(), wasmi_core::LimiterError> {
        self.table_entries.growth_failed();
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// A wasmi instance with its store.
pub struct WasmiInstance<S: 'static> {
    store: Store<StoreData<S>>,
    instance: wasmi::Instance,
    exports: Arc<ExportedFunctions<ExportedFunction>>,
    interrupt: Option<Arc<dyn InterruptHandle>>,
    memory_limit: Option<usize>,
}

impl<S: Send + 'static> WasmiInstance<S> {
    pub(crate) fn new(
        linker: &wasmi::Linker<StoreData<S>>,
        module: &wasmi::Module,
        exports: Arc<ExportedFunctions<ExportedFunction>>,
        config: &RuntimeConfig,
        has_start: bool,
        fuel: Option<FuelPolicy>,
        state: S,
    ) -> Result<Self, Error> {
        let mut limits = StoreLimitsBuilder::new().table_elements(MAX_TABLE_ENTRIES);
        let memory_limit = config
            .max_memory_bytes
            .map(|max| usize::try_from(max).unwrap_or(usize::MAX));
        if let Some(max) = memory_limit {
            limits = limits.memory_size(max);
        }
        let slices = fuel.map(FuelSlices::new);
        let interrupt = match (&slices, fuel) {
            (Some(slices), Some(policy)) if policy.interruptible() => {
                Some(slices.interrupt_handle())
            }
            _ => None,
        };
        let data = StoreData {
            state,
            memory: None,
            functions: Vec::with_capacity(exports.len()),
            limits: CapWatch {
                limits: limits.build(),
                cap: memory_limit,
                refused: false,
                table_entries: TableEntries::default(),
            },
            nested_calls: 0,
            fuel: slices,
        };
        let mut store = Store::new(module.engine(), data);
        store.limiter(|data| &mut data.limits);
        if let Some(policy) = fuel {
            store
                .set_fuel(policy.start_fuel())
                .map_err(|e| Error::Config(e.to_string()))?;
        }
        let instance = if has_start && BOUNDED_NATIVE_STACK {
            instantiate_on_large_stack(linker, module, &mut store)?
        } else {
            linker.instantiate_and_start(&mut store, module)
        }
        .map_err(|e| instantiation_error(&e))?;
        let memory = instance.get_memory(&store, "memory");
        store.data_mut().memory = memory;
        Ok(WasmiInstance {
            store,
            instance,
            exports,
            interrupt,
            memory_limit,
        })
    }
}

/// Instantiates on a thread with a large stack, for builds where wasmi's instruction dispatch
/// keeps a native frame per executed instruction (see [`BOUNDED_NATIVE_STACK`]): the start
/// function runs inside instantiation, where calls cannot be suspended to unwind the stack.
fn instantiate_on_large_stack<S: Send + 'static>(
    linker: &wasmi::Linker<StoreData<S>>,
    module: &wasmi::Module,
    store: &mut Store<StoreData<S>>,
) -> Result<Result<wasmi::Instance, wasmi::Error>, Error> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("pwhost-wasmi-start".into())
            .stack_size(BOUNDED_START_STACK_BYTES)
            .spawn_scoped(scope, || linker.instantiate_and_start(store, module))
            .map_err(|e| Error::Instantiation(format!("cannot start a thread: {e}")))?;
        thread
            .join()
            .map_err(|_| Error::Instantiation("the start function's thread panicked".into()))
    })
}

/// Why instantiation failed, in the words a trap would use if the start function trapped.
#[cold]
fn instantiation_error(error: &wasmi::Error) -> Error {
    if error.as_trap_code() == Some(wasmi::TrapCode::OutOfFuel) {
        return Error::Instantiation("the start function used up its fuel budget".into());
    }
    if error.as_trap_code().is_some() || error.downcast_ref::<crate::host::HostTrap>().is_some() {
        return Error::Instantiation(convert_error(error).to_string());
    }
    Error::Instantiation(error.to_string())
}

/// The resolved function behind `handle`, if `handle` was given out by this store.
#[inline]
fn lookup<S>(data: &StoreData<S>, handle: GuestFunction) -> Result<GuestCall, Trap> {
    match data.functions.get(handle.index() as usize) {
        Some(resolved) if resolved.handle == handle => Ok(resolved.call),
        _ => Err(unknown_handle()),
    }
}

#[cold]
fn unknown_handle() -> Trap {
    Trap::new(TrapKind::BadCall, "unknown guest function handle")
}

impl<S: Send + 'static> Instance<S> for WasmiInstance<S> {
    fn state(&mut self) -> &mut S {
        &mut self.store.data_mut().state
    }

    fn function(&mut self, name: &str) -> Option<GuestFunction> {
        let exported = self.exports.get(name)?;
        let func = self.instance.get_func(&self.store, name)?;
        let call = GuestCall::resolve(&self.store, func, exported);
        let index = u32::try_from(self.store.data().functions.len()).ok()?;
        let handle = GuestFunction::new(index, &exported.ty);
        self.store
            .data_mut()
            .functions
            .push(ResolvedFunction { handle, call });
        Some(handle)
    }

    fn call(
        &mut self,
        function: GuestFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap> {
        let call = lookup(self.store.data(), function)?;
        function.check_arity(args.len(), results.len())?;
        if let Some(slices) = &mut self.store.data_mut().fuel {
            let fuel = slices.begin_call()?;
            self.store.set_fuel(fuel).map_err(|e| convert_error(&e))?;
        }
        call.call(self.store.as_context_mut(), args, results)
    }

    fn memory_size(&mut self) -> usize {
        match self.store.data().memory {
            Some(memory) => memory.data_size(&self.store),
            None => 0,
        }
    }

    fn memory_limit(&self) -> Option<usize> {
        self.memory_limit
    }

    fn memory_grow_refused(&self) -> Option<bool> {
        Some(self.store.data().limits.refused)
    }

    fn interrupt_handle(&self) -> Option<Arc<dyn InterruptHandle>> {
        self.interrupt.clone()
    }
}

/// The [`Caller`] handed to host functions.
pub(crate) struct WasmiCaller<'a, S: 'static> {
    pub(crate) caller: wasmi::Caller<'a, StoreData<S>>,
}

impl<S: 'static> Caller<S> for WasmiCaller<'_, S> {
    fn state(&mut self) -> &mut S {
        &mut self.caller.data_mut().state
    }

    fn memory(&mut self) -> GuestMemory<'_> {
        match self.caller.data().memory {
            Some(memory) => GuestMemory::new(memory.data_mut(&mut self.caller)),
            None => GuestMemory::empty(),
        }
    }

    fn state_and_memory(&mut self) -> (&mut S, GuestMemory<'_>) {
        match self.caller.data().memory {
            Some(memory) => {
                let (bytes, data) = memory.data_and_store_mut(&mut self.caller);
                (&mut data.state, GuestMemory::new(bytes))
            }
            None => (&mut self.caller.data_mut().state, GuestMemory::empty()),
        }
    }

    fn call(
        &mut self,
        function: GuestFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap> {
        let call = lookup(self.caller.data(), function)?;
        function.check_arity(args.len(), results.len())?;
        let data = self.caller.data_mut();
        if data.nested_calls >= MAX_NESTED_CALLS {
            return Err(Trap::wasm(WasmTrapCode::StackOverflow));
        }
        data.nested_calls += 1;
        let result = call.call(self.caller.as_context_mut(), args, results);
        let data = self.caller.data_mut();
        data.nested_calls = data.nested_calls.saturating_sub(1);
        result
    }
}
