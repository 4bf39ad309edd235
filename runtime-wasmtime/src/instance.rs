//! Instances and the host-function caller.

use std::mem::MaybeUninit;
use std::sync::Arc;

use runtime_api::{
    Caller, Error, ExportedFunctions, GuestFunction, GuestMemory, Instance, InterruptHandle,
    RuntimeConfig, TableEntries, Trap, MAX_ARGS,
};
use wasmtime::{
    AsContextMut, Func, Memory, Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline, ValRaw,
};

use crate::epoch::{EpochState, EpochTicker, WasmtimeInterruptHandle};
use crate::module::{convert_error, ExportedFunction};

/// [`runtime_api::MAX_TABLE_ENTRIES`] as a size.
const MAX_TABLE_ENTRIES: usize = runtime_api::MAX_TABLE_ENTRIES as usize;
/// A guest function resolved once: the wasmtime handle and how to pass its values.
#[derive(Clone, Copy)]
pub(crate) struct ResolvedFunction {
    /// The handle given out for it: a handle of another instance may have the same index but
    /// another type, and `call_unchecked` relies on the type.
    handle: GuestFunction,
    func: Func,
    /// Bit `i` set: parameter `i` is an `i64`.
    i64_params: u32,
    i64_result: bool,
}

/// What each store holds beside the embedder's state.
pub(crate) struct StoreData<S> {
    state: S,
    memory: Option<Memory>,
    functions: Vec<ResolvedFunction>,
    limits: CapWatch,
    epoch: Option<EpochState>,
}

/// wasmtime's own limits, noting when the memory cap refuses a `memory.grow`.
struct CapWatch {
    limits: StoreLimits,
    cap: Option<usize>,
    refused: bool,
    /// The entries of the instance's tables, all together.
    table_entries: TableEntries,
}

impl wasmtime::ResourceLimiter for CapWatch {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        // Refused by the cap, not by the module's own maximum.
        if !allowed && self.cap.is_some_and(|cap| desired > cap) {
            self.refused = true;
        }
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Each table within the limit, and all of them together.
        Ok(self.limits.table_growing(current, desired, maximum)?
            && self.table_entries.growing(current, desired))
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
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

/// A wasmtime instance with its store.
pub struct WasmtimeInstance<S: 'static> {
    store: Store<StoreData<S>>,
    instance: wasmtime::Instance,
    exports: Arc<ExportedFunctions<ExportedFunction>>,
    interrupt: Option<Arc<dyn InterruptHandle>>,
    memory_limit: Option<usize>,
}

impl<S: Send + 'static> WasmtimeInstance<S> {
    pub(crate) fn new(
        pre: &wasmtime::InstancePre<StoreData<S>>,
        exports: Arc<ExportedFunctions<ExportedFunction>>,
        config: &RuntimeConfig,
        epoch: Option<&EpochTicker>,
        state: S,
    ) -> Result<Self, Error> {
        let mut limits = StoreLimitsBuilder::new().table_elements(MAX_TABLE_ENTRIES);
        let memory_limit = config
            .max_memory_bytes
            .map(|max| usize::try_from(max).unwrap_or(usize::MAX));
        if let Some(max) = memory_limit {
            limits = limits.memory_size(max);
        }
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
            epoch: epoch.map(|ticker| EpochState::new(ticker.deadline)),
        };
        let engine = pre.module().engine().clone();
        let mut store = Store::new(&engine, data);
        store.limiter(|data| &mut data.limits);
        let mut interrupt: Option<Arc<dyn InterruptHandle>> = None;
        if let Some(epoch) = &store.data().epoch {
            interrupt = Some(Arc::new(WasmtimeInterruptHandle {
                engine: engine.clone(),
                interrupted: epoch.interrupted.clone(),
            }));
            store.epoch_deadline_callback(|mut store| {
                match store.data_mut().epoch.as_mut().map(EpochState::on_tick) {
                    Some(Err(trap)) => Err(wasmtime::Error::new(trap)),
                    _ => Ok(UpdateDeadline::Continue(1)),
                }
            });
            store.set_epoch_deadline(1);
        }
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| Error::Instantiation(format!("{e:#}")))?;
        let memory = instance.get_memory(&mut store, "memory");
        store.data_mut().memory = memory;
        Ok(WasmtimeInstance {
            store,
            instance,
            exports,
            interrupt,
            memory_limit,
        })
    }
}

/// Calls `function` of the store with `args`, writing `results`.
fn call_resolved<T: 'static>(
    mut store: impl AsContextMut<Data = T>,
    resolved: ResolvedFunction,
    handle: GuestFunction,
    args: &[u64],
    results: &mut [u64],
) -> Result<(), Trap> {
    handle.check_arity(args.len(), results.len())?;
    let used = args.len().max(results.len());
    let mut raw = [MaybeUninit::<ValRaw>::uninit(); MAX_ARGS];
    for (i, slot) in raw.iter_mut().enumerate().take(used) {
        let arg = args.get(i).copied().unwrap_or(0);
        let value = if resolved.i64_params & (1 << i) != 0 {
            ValRaw::u64(arg)
        } else {
            ValRaw::u32(arg as u32)
        };
        *slot = MaybeUninit::new(value);
    }
    let slots = std::ptr::slice_from_raw_parts_mut(raw.as_mut_ptr().cast::<ValRaw>(), used);
    // SAFETY: the first `used` slots were initialised above; `resolved.func` belongs to this store
    // (it was resolved from this store's instance); `lookup` matched the handle to the one given
    // out for it and `check_arity` the argument and result counts to its type; each argument is encoded with the type recorded at resolution; only
    // functions of integer types are resolved, so no reference values are involved.
    unsafe { resolved.func.call_unchecked(store.as_context_mut(), slots) }
        .map_err(convert_error)?;
    for (i, result) in results.iter_mut().enumerate() {
        // SAFETY: the slot was initialised above and the call wrote the results over it.
        let raw = unsafe { raw[i].assume_init_ref() };
        *result = if resolved.i64_result {
            raw.get_u64()
        } else {
            u64::from(raw.get_u32())
        };
    }
    Ok(())
}

fn lookup<S>(data: &StoreData<S>, handle: GuestFunction) -> Result<ResolvedFunction, Trap> {
    match data.functions.get(handle.index() as usize) {
        Some(resolved) if resolved.handle == handle => Ok(*resolved),
        _ => Err(Trap::new(
            runtime_api::TrapKind::BadCall,
            "unknown guest function handle",
        )),
    }
}

impl<S: Send + 'static> Instance<S> for WasmtimeInstance<S> {
    fn state(&mut self) -> &mut S {
        &mut self.store.data_mut().state
    }

    fn function(&mut self, name: &str) -> Option<GuestFunction> {
        let exported = self.exports.get(name)?;
        let func = self
            .instance
            .get_module_export(&mut self.store, &exported.export)?
            .into_func()?;
        let handle = GuestFunction::new(self.store.data().functions.len() as u32, &exported.ty);
        let resolved = ResolvedFunction {
            handle,
            func,
            i64_params: exported.i64_params,
            i64_result: exported.i64_result,
        };
        self.store.data_mut().functions.push(resolved);
        Some(handle)
    }

    fn call(
        &mut self,
        function: GuestFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap> {
        let resolved = lookup(self.store.data(), function)?;
        if let Some(epoch) = &mut self.store.data_mut().epoch {
            epoch.first_tick = None;
            self.store.set_epoch_deadline(1);
        }
        call_resolved(&mut self.store, resolved, function, args, results)
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
pub(crate) struct WasmtimeCaller<'a, S: 'static> {
    pub(crate) caller: wasmtime::Caller<'a, StoreData<S>>,
}

impl<S: 'static> Caller<S> for WasmtimeCaller<'_, S> {
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
        let resolved = lookup(self.caller.data(), function)?;
        call_resolved(&mut self.caller, resolved, function, args, results)
    }
}
