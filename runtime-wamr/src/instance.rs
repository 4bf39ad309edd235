//! Instances, calls in both directions, and the host-function caller.
//!
//! Each instance owns one exec env for all its calls and a heap-allocated context whose address
//! is the exec env's user data (and the instance's custom data): the trampoline finds the
//! embedder's state, the host function table and the resolved exports there. The context is
//! only ever reached through its raw pointer, one field at a time, because the guest re-enters
//! it from inside calls the host is making.

use std::panic::AssertUnwindSafe;
use std::ptr::NonNull;
use std::sync::Arc;

use runtime_api::{
    Caller, Error, GuestFunction, GuestMemory, Instance, InterruptHandle, StopReason, Trap,
    TrapKind, WasmTrapCode, MAX_ARGS,
};
use wamrx_sys as sys;

use crate::global::{ensure_thread_env, thread_env_error, ContextHeader};
use crate::module::{c_buffer_text, LinkedInner};
use crate::trap::{current_exception, HOST_TRAP};
use crate::watchdog::{watchdog, CallWatch, Paused, WamrInterruptHandle};

/// How deeply host functions may call back into the guest. WAMR checks the native stack only
/// with a small margin (3 KiB) at guest function entries, which does not cover the Rust frames of
/// the host function and the trampoline between two guest levels: a guest that recurses through
/// a host function (the allocator calling a host function that calls the allocator …) could run
/// into the guard page and crash the process. The ABI needs one level; other engines allow 8.
const MAX_NESTED_CALLS: u32 = 8;

/// A guest function resolved once per instance: WAMR's handle and how to pass its values.
#[derive(Clone, Copy)]
struct ResolvedFunction {
    function: sys::wasm_function_inst_t,
    /// Bit `i` set: parameter `i` is an `i64`.
    i64_params: u32,
    i64_result: bool,
}

/// A function handed out by [`Instance::function`]: the handle, kept so that a handle of another
/// instance with the same index is refused, and the function it stands for.
#[derive(Clone, Copy)]
struct HandedOut {
    handle: GuestFunction,
    resolved: ResolvedFunction,
}

/// Where the instance's exported `memory` is.
#[derive(Clone, Copy)]
enum MemoryLookup {
    /// Not looked up yet (host functions WAMR runs while instantiating).
    Unknown,
    /// The module exports no memory called `memory`.
    None,
    /// The memory, and its page size in bytes (fixed per memory, so read once rather than on
    /// every access).
    Some(sys::wasm_memory_inst_t, u64),
}

/// Everything host functions reach through the exec env's user data.
#[repr(C)]
struct InstanceContext<S: 'static> {
    /// First, so that the type-erased trampoline can read it.
    header: ContextHeader,
    state: S,
    linked: Arc<LinkedInner<S>>,
    functions: Vec<HandedOut>,
    memory: MemoryLookup,
    /// The trap of a failed host function, while WAMR unwinds the guest.
    pending: Option<Trap>,
    /// How many calls from host functions into the guest are running.
    nested_calls: u32,
    watch: Option<Arc<CallWatch>>,
}

/// A WAMR instance with its exec env and the embedder's state.
pub struct WamrInstance<S: 'static> {
    context: NonNull<InstanceContext<S>>,
    module_inst: sys::wasm_module_inst_t,
    exec_env: sys::wasm_exec_env_t,
    watch: Option<Arc<CallWatch>>,
    /// Whether `watch` is registered with the watchdog.
    deadline_watched: bool,
}

// SAFETY: the instance is used by one thread at a time (`&mut self` for every call), and a WAMR
// instance and exec env may move between threads: WAMR records the calling thread's native
// stack bounds at the start of every call. The state `S` is `Send`; the rest is owned or `Sync`.
unsafe impl<S: Send + 'static> Send for WamrInstance<S> {}

impl<S: 'static> Drop for WamrInstance<S> {
    fn drop(&mut self) {
        if let Some(watch) = &self.watch {
            if self.deadline_watched {
                if let Ok(watchdog) = watchdog() {
                    watchdog.deregister(watch);
                }
            }
            // Interrupt handles may outlive the instance; they must find it gone.
            watch.retire();
        }
        ensure_thread_env();
        // SAFETY: no call is running (`&mut self`), no stopper will touch the instance any more
        // (retired above); the exec env belongs to the instance and is destroyed first; the
        // context was leaked from a box in `new` and nothing refers to it after these.
        unsafe {
            if !self.exec_env.is_null() {
                sys::wasm_runtime_destroy_exec_env(self.exec_env);
            }
            sys::wasm_runtime_deinstantiate(self.module_inst);
            drop(Box::from_raw(self.context.as_ptr()));
        }
    }
}

impl<S: Send + 'static> WamrInstance<S> {
    pub(crate) fn new(linked: Arc<LinkedInner<S>>, state: S) -> Result<Self, Error> {
        if !ensure_thread_env() {
            return Err(Error::Instantiation(thread_env_error()));
        }
        let settings = linked.settings.clone();
        let start = linked.start.clone();
        let module = linked.loaded.module;
        let context = NonNull::from(Box::leak(Box::new(InstanceContext {
            header: ContextHeader {
                dispatch: dispatch::<S>,
            },
            state,
            linked,
            functions: Vec::new(),
            memory: MemoryLookup::Unknown,
            pending: None,
            nested_calls: 0,
            watch: None,
        })));
        // SAFETY: `module` is loaded with its imports resolved (it was linked) and stays alive
        // (the context holds the linked module); `context` is a live allocation WAMR only passes
        // back to the trampoline; the error buffer's length is passed.
        let module_inst = unsafe {
            instantiate(
                module,
                settings.stack_size,
                settings.max_memory_pages,
                context,
            )
        };
        let module_inst = match module_inst {
            Ok(module_inst) => module_inst,
            Err(error) => {
                // SAFETY: WAMR made no instance, so nothing refers to the context.
                drop(unsafe { Box::from_raw(context.as_ptr()) });
                return Err(error);
            }
        };
        let mut instance = WamrInstance {
            context,
            module_inst,
            exec_env: std::ptr::null_mut(),
            watch: None,
            deadline_watched: false,
        };
        // SAFETY: the instance is alive; the name is NUL-terminated.
        let memory = unsafe { sys::wasm_runtime_lookup_memory(module_inst, c"memory".as_ptr()) };
        // SAFETY: the context is alive and no call is running.
        unsafe {
            (*context.as_ptr()).memory = if memory.is_null() {
                MemoryLookup::None
            } else {
                MemoryLookup::Some(memory, sys::wasm_memory_get_bytes_per_page(memory))
            };
        }
        if let Some(max) = settings.max_memory_bytes {
            // WAMR would silently raise a cap below the initial size to it; refuse instead, in
            // the words wasmtime uses, so the message is the same on every engine. The cap
            // applies to the module's memory whatever it is exported as, if at all.
            // SAFETY: the instance is alive and no call is running.
            let size = unsafe { default_memory_size(module_inst) } as u64;
            if size > max {
                return Err(Error::Instantiation(format!(
                    "memory minimum size of {} pages exceeds memory limits",
                    size.div_ceil(crate::PAGE_SIZE)
                )));
            }
        }
        // SAFETY: the instance is alive.
        let exec_env =
            unsafe { sys::wasm_runtime_create_exec_env(module_inst, settings.stack_size) };
        if exec_env.is_null() {
            return Err(Error::Instantiation(
                "WAMR could not create an execution environment (out of memory, or an auxiliary \
                 stack too small to share)"
                    .into(),
            ));
        }
        instance.exec_env = exec_env;
        // SAFETY: the exec env was just created for this instance; the context outlives it.
        unsafe {
            give_back_aux_stack(exec_env);
            sys::wasm_runtime_set_user_data(exec_env, context.as_ptr().cast());
        }
        if settings.deadline.is_some() || settings.interruptible {
            let watch = Arc::new(CallWatch::new(module_inst, settings.deadline));
            if settings.deadline.is_some() {
                watchdog()?.register(&watch);
                instance.deadline_watched = true;
            }
            // SAFETY: the context is alive and no call is running.
            unsafe { (*context.as_ptr()).watch = Some(watch.clone()) };
            instance.watch = Some(watch);
        }
        if let Some(start) = start {
            // SAFETY: the instance is alive and `start` is NUL-terminated.
            let function =
                unsafe { sys::wasm_runtime_lookup_function(module_inst, start.as_ptr()) };
            if function.is_null() {
                return Err(Error::Instantiation("the start function is missing".into()));
            }
            let resolved = ResolvedFunction {
                function,
                i64_params: 0,
                i64_result: false,
            };
            instance
                .call_resolved(resolved, &[], &mut [])
                .map_err(|trap| Error::Instantiation(format!("start function failed: {trap}")))?;
        }
        Ok(instance)
    }

    /// A top-level call: watched, and the exception cleared afterwards so the instance stays
    /// usable.
    fn call_resolved(
        &mut self,
        resolved: ResolvedFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap> {
        if !ensure_thread_env() {
            return Err(Trap::host(thread_env_error()));
        }
        if let Some(watch) = &self.watch {
            if !watch.begin() {
                if watch.end().is_some() {
                    self.clear_exception();
                }
                return Err(StopReason::Interrupted.trap());
            }
        }
        // SAFETY: the exec env and the function belong to this live instance, and the caller
        // matched the argument and result counts to the function's type.
        let completed = unsafe { invoke(self.exec_env, resolved, args, results) };
        let stopped = self.watch.as_ref().and_then(|watch| watch.end());
        if completed && stopped.is_none() {
            return Ok(());
        }
        // SAFETY: the context is alive; the call is over, so nothing else refers to it.
        let pending = unsafe { (*self.context.as_ptr()).pending.take() };
        let trap = match (completed, pending, stopped) {
            // The guest finished before it noticed the stop: its results stand.
            (true, _, _) => None,
            (false, Some(trap), _) => Some(trap),
            (false, None, Some(reason)) => Some(reason.trap()),
            // SAFETY: the call is over and no stopper acts after `end`.
            (false, None, None) => Some(unsafe { current_exception(self.module_inst) }),
        };
        self.clear_exception();
        trap.map_or(Ok(()), Err)
    }

    fn clear_exception(&mut self) {
        // SAFETY: the instance is alive and no stopper acts on it between calls.
        unsafe { sys::wasm_runtime_clear_exception(self.module_inst) };
    }
}

/// The size in bytes of the instance's memory (index 0: this build has no multi-memory), exported
/// or not; 0 if it has none.
///
/// # Safety
/// `module_inst` is a live instance.
unsafe fn default_memory_size(module_inst: sys::wasm_module_inst_t) -> usize {
    // SAFETY: per the contract.
    let memory = unsafe { sys::wasm_runtime_get_default_memory(module_inst) };
    if memory.is_null() {
        return 0;
    }
    // SAFETY: the memory belongs to the live instance.
    unsafe { memory_bytes(memory, sys::wasm_memory_get_bytes_per_page(memory)) }.1
}

/// Instantiates `module` with its memory capped and `context` as its custom data.
///
/// # Safety
/// `module` is a loaded, resolved module; `context` outlives the instance.
unsafe fn instantiate<S>(
    module: sys::wasm_module_t,
    stack_size: u32,
    max_memory_pages: u32,
    context: NonNull<InstanceContext<S>>,
) -> Result<sys::wasm_module_inst_t, Error> {
    let mut args = std::ptr::null_mut();
    // SAFETY: `args` is created, filled and destroyed here; the rest per the contract.
    unsafe {
        if !sys::wasm_runtime_instantiation_args_create(&mut args) || args.is_null() {
            return Err(Error::Instantiation("out of memory".into()));
        }
        sys::wasm_runtime_instantiation_args_set_default_stack_size(args, stack_size);
        // No WAMR-managed heap inside the guest's memory: the guest has its own allocator.
        sys::wasm_runtime_instantiation_args_set_host_managed_heap_size(args, 0);
        sys::wasm_runtime_instantiation_args_set_max_memory_pages(args, max_memory_pages);
        // Routes host functions WAMR itself runs while instantiating (before the exec env
        // exists) to this instance.
        sys::wasm_runtime_instantiation_args_set_custom_data(args, context.as_ptr().cast());
        let mut error = [0 as std::ffi::c_char; 256];
        let module_inst =
            sys::wasm_runtime_instantiate_ex2(module, args, error.as_mut_ptr(), error.len() as u32);
        sys::wasm_runtime_instantiation_args_destroy(args);
        if module_inst.is_null() {
            let pending = (*context.as_ptr()).pending.take();
            return Err(Error::Instantiation(match pending {
                Some(trap) => trap.to_string(),
                None => c_buffer_text(&error),
            }));
        }
        Ok(module_inst)
    }
}

/// With the thread manager, every exec env is a "cluster" that keeps a share of the module's
/// auxiliary (shadow) stack for threads pwhost never spawns: give the whole stack back to the
/// one exec env, so guests get the stack they were linked with, as on other engines. Public for
/// other hosts on raw WAMR beside this crate (the benchmarks' floor), so they run guests as
/// pwhost does.
///
/// # Safety
/// `exec_env` is a fresh exec env of a live instance, before any call.
pub unsafe fn give_back_aux_stack(exec_env: sys::wasm_exec_env_t) {
    // WAMR's internal (but exported) API for its thread manager; pinned by wamrx-sys =0.3.0.
    unsafe extern "C" {
        fn wasm_exec_env_get_aux_stack(
            exec_env: sys::wasm_exec_env_t,
            start_offset: *mut u64,
            size: *mut u32,
        ) -> bool;
        fn wasm_exec_env_set_aux_stack(
            exec_env: sys::wasm_exec_env_t,
            start_offset: u64,
            size: u32,
        ) -> bool;
    }
    let (mut start, mut size) = (0u64, 0u32);
    // SAFETY: per the contract; the getter reads the module's stack layout, and the setter
    // rewrites the stack pointer global to the stack's top (its initial value) and this exec
    // env's bounds, which is what instantiation left before the cluster took its share.
    unsafe {
        if wasm_exec_env_get_aux_stack(exec_env, &mut start, &mut size) {
            wasm_exec_env_set_aux_stack(exec_env, start, size);
        }
    }
}

/// Calls `resolved` on `exec_env` with `args`, writing `results`. Returns whether it completed
/// (otherwise the instance has an exception).
///
/// # Safety
/// `exec_env` is a live exec env of the instance `resolved.function` belongs to, and `args` and
/// `results` match the function's type (checked with [`GuestFunction::check_arity`]).
#[inline]
unsafe fn invoke(
    exec_env: sys::wasm_exec_env_t,
    resolved: ResolvedFunction,
    args: &[u64],
    results: &mut [u64],
) -> bool {
    // WAMR passes values in 32-bit cells: an `i64` takes two, in memory order.
    let mut cells = [0u32; 2 * MAX_ARGS];
    let mut used = 0;
    for (i, arg) in args.iter().enumerate().take(MAX_ARGS) {
        if resolved.i64_params & (1 << i) != 0 {
            // SAFETY: `used + 2 <= 2 * MAX_ARGS` since at most MAX_ARGS arguments are taken.
            unsafe {
                cells
                    .as_mut_ptr()
                    .add(used)
                    .cast::<u64>()
                    .write_unaligned(*arg)
            };
            used += 2;
        } else {
            cells[used] = *arg as u32;
            used += 1;
        }
    }
    // SAFETY: per the contract; `cells` holds `used` argument cells and room for a result.
    let completed = unsafe {
        sys::wasm_runtime_call_wasm(exec_env, resolved.function, used as u32, cells.as_mut_ptr())
    };
    if completed {
        if let Some(result) = results.first_mut() {
            *result = if resolved.i64_result {
                // SAFETY: the two cells hold the `i64` result in memory order.
                unsafe { cells.as_ptr().cast::<u64>().read_unaligned() }
            } else {
                u64::from(cells[0])
            };
        }
    }
    completed
}

/// Looks up a handle's resolved function. The whole handle must match the one handed out at its
/// index: a handle of another instance may share the index but stand for another function.
#[inline]
fn lookup(functions: &[HandedOut], handle: GuestFunction) -> Result<ResolvedFunction, Trap> {
    match functions.get(handle.index() as usize) {
        Some(handed_out) if handed_out.handle == handle => Ok(handed_out.resolved),
        _ => Err(unknown_handle()),
    }
}

/// The trap of a call through a handle [`lookup`] does not know (kept out of line, so that the
/// lookup itself inlines into every call).
#[cold]
#[inline(never)]
fn unknown_handle() -> Trap {
    Trap::new(TrapKind::BadCall, "unknown guest function handle")
}

impl<S: Send + 'static> Instance<S> for WamrInstance<S> {
    fn state(&mut self) -> &mut S {
        // SAFETY: the context is alive; `&mut self` keeps guest code (and so host functions)
        // from running while the reference lives.
        unsafe { &mut (*self.context.as_ptr()).state }
    }

    fn function(&mut self, name: &str) -> Option<GuestFunction> {
        let context = self.context.as_ptr();
        // SAFETY: the context is alive and no call is running.
        let linked = unsafe { &(*context).linked };
        let exported = linked.functions.get(name)?;
        // SAFETY: the instance is alive; the name is NUL-terminated.
        let function = unsafe {
            sys::wasm_runtime_lookup_function(self.module_inst, exported.wamr_name.as_ptr())
        };
        if function.is_null() {
            return None;
        }
        let handle = GuestFunction::new(
            // SAFETY: as above.
            unsafe { (*context).functions.len() } as u32,
            &exported.ty,
        );
        let resolved = ResolvedFunction {
            function,
            i64_params: exported.i64_params,
            i64_result: exported.i64_result,
        };
        // SAFETY: as above.
        unsafe { (*context).functions.push(HandedOut { handle, resolved }) };
        Some(handle)
    }

    fn call(
        &mut self,
        function: GuestFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap> {
        // SAFETY: the context is alive and no call is running.
        let resolved = lookup(unsafe { &(*self.context.as_ptr()).functions }, function)?;
        function.check_arity(args.len(), results.len())?;
        self.call_resolved(resolved, args, results)
    }

    fn memory_size(&mut self) -> usize {
        // SAFETY: the context is alive and no call is running.
        let memory = unsafe { (*self.context.as_ptr()).memory };
        match memory {
            // SAFETY: the memory belongs to this live instance.
            MemoryLookup::Some(memory, page_size) => unsafe { memory_bytes(memory, page_size) }.1,
            _ => 0,
        }
    }

    fn memory_limit(&self) -> Option<usize> {
        // SAFETY: the context lives as long as the instance, and `&self` means no call is
        // running; only its `linked`, which nothing writes, is read.
        let linked = unsafe { &(*self.context.as_ptr()).linked };
        linked
            .settings
            .max_memory_bytes
            .map(|max| usize::try_from(max).unwrap_or(usize::MAX))
    }

    fn interrupt_handle(&self) -> Option<Arc<dyn InterruptHandle>> {
        let watch = self.watch.clone()?;
        Some(Arc::new(WamrInterruptHandle { watch }))
    }
}

/// The base address and size of a linear memory, read fresh (`memory.grow` moves it).
///
/// # Safety
/// `memory` is a memory of a live instance and `page_size` its page size
/// (`wasm_memory_get_bytes_per_page`).
#[inline]
unsafe fn memory_bytes(memory: sys::wasm_memory_inst_t, page_size: u64) -> (*mut u8, usize) {
    // SAFETY: per the contract.
    unsafe {
        let base = sys::wasm_memory_get_base_address(memory).cast::<u8>();
        let pages = sys::wasm_memory_get_cur_page_count(memory);
        let size = pages
            .checked_mul(page_size)
            .and_then(|size| usize::try_from(size).ok())
            .filter(|size| *size <= isize::MAX as usize);
        match size {
            Some(size) if !base.is_null() => (base, size),
            _ => (base, 0),
        }
    }
}

/// The guest memory of the instance `context` belongs to, validated: a null base or an
/// impossible size gives an empty view.
///
/// # Safety
/// `context` and `exec_env` belong to a live instance, and no guest code runs while the returned
/// view is used.
unsafe fn guest_memory<'a, S>(
    context: *mut InstanceContext<S>,
    exec_env: sys::wasm_exec_env_t,
) -> GuestMemory<'a> {
    // SAFETY: per the contract.
    unsafe {
        let (memory, page_size) = match (*context).memory {
            MemoryLookup::Some(memory, page_size) => (memory, page_size),
            MemoryLookup::None => return GuestMemory::empty(),
            MemoryLookup::Unknown => {
                let module_inst = sys::wasm_runtime_get_module_inst(exec_env);
                let memory = sys::wasm_runtime_lookup_memory(module_inst, c"memory".as_ptr());
                if memory.is_null() {
                    return GuestMemory::empty();
                }
                (memory, sys::wasm_memory_get_bytes_per_page(memory))
            }
        };
        let (base, size) = memory_bytes(memory, page_size);
        if size == 0 {
            return GuestMemory::empty();
        }
        // The memory is the guest's alone (no shared memories in this build) and does not move
        // until guest code runs again.
        GuestMemory::new(std::slice::from_raw_parts_mut(base, size))
    }
}

/// Runs host function `symbol` for the instance of `header` (see `global::native_trampoline`).
///
/// # Safety
/// `header` starts a live `InstanceContext<S>`, `exec_env` runs its instance, and `args` points
/// at WAMR's argument slots for the import, which has the signature the host function was linked
/// with (at most [`MAX_ARGS`] parameters: WAMR then passes its 16-slot buffer).
unsafe fn dispatch<S: 'static>(
    header: NonNull<ContextHeader>,
    exec_env: sys::wasm_exec_env_t,
    symbol: u32,
    args: *mut u64,
) {
    let context = header.cast::<InstanceContext<S>>().as_ptr();
    // SAFETY: per the contract; `linked` is not mutated while the instance lives.
    let linked = unsafe { &(*context).linked };
    let entry = linked.host.get(symbol as usize).copied().flatten();
    let trap = match entry {
        Some(entry) => {
            // SAFETY: per the contract, `entry.slots` (at most MAX_ARGS) slots are valid and
            // nothing else touches them during the host call.
            let slots = unsafe { std::slice::from_raw_parts_mut(args, entry.slots) };
            let mut caller = WamrCaller { context, exec_env };
            // A panic must not unwind into C; it fails the guest instead.
            match std::panic::catch_unwind(AssertUnwindSafe(|| {
                (entry.callback)(&mut caller, slots)
            })) {
                Ok(Ok(())) => return,
                Ok(Err(trap)) => trap,
                Err(_) => Trap::host("host function panicked"),
            }
        }
        None => Trap::host("host function not linked for this instance"),
    };
    // SAFETY: per the contract; the trap is kept beside the exception that unwinds the guest.
    unsafe {
        (*context).pending = Some(trap);
        sys::wasm_runtime_set_exception(
            sys::wasm_runtime_get_module_inst(exec_env),
            HOST_TRAP.as_ptr(),
        );
    }
}

/// The [`Caller`] handed to host functions: the instance's context and the exec env calling.
struct WamrCaller<S: 'static> {
    context: *mut InstanceContext<S>,
    exec_env: sys::wasm_exec_env_t,
}

impl<S: 'static> Caller<S> for WamrCaller<S> {
    fn state(&mut self) -> &mut S {
        // SAFETY: the context is alive during the host call; the reference is tied to `&mut
        // self`, so it ends before `call` can run guest code.
        unsafe { &mut (*self.context).state }
    }

    fn memory(&mut self) -> GuestMemory<'_> {
        // SAFETY: the instance is alive during the host call; the view is tied to `&mut self`.
        unsafe { guest_memory(self.context, self.exec_env) }
    }

    fn state_and_memory(&mut self) -> (&mut S, GuestMemory<'_>) {
        // SAFETY: as in `state` and `memory`; the state and the linear memory are disjoint.
        unsafe {
            (
                &mut (*self.context).state,
                guest_memory(self.context, self.exec_env),
            )
        }
    }

    fn call(
        &mut self,
        function: GuestFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap> {
        // SAFETY: the context is alive during the host call.
        let resolved = lookup(unsafe { &(*self.context).functions }, function)?;
        function.check_arity(args.len(), results.len())?;
        // SAFETY: the context is alive during the host call; deeper levels have returned.
        let depth = unsafe { (*self.context).nested_calls };
        if depth >= MAX_NESTED_CALLS {
            return Err(Trap::wasm(WasmTrapCode::StackOverflow));
        }
        // SAFETY: as above.
        unsafe { (*self.context).nested_calls = depth + 1 };
        // SAFETY: the exec env runs this instance, which owns the function; arity checked.
        let completed = unsafe { invoke(self.exec_env, resolved, args, results) };
        // Restored whether the call completed or not: the limit counts levels in progress.
        // SAFETY: as above; the guest call is over.
        unsafe { (*self.context).nested_calls = depth };
        if completed {
            return Ok(());
        }
        // SAFETY: the context is alive during the host call.
        Err(unsafe { nested_failure(self.context, self.exec_env) })
    }
}

/// The trap of a failed nested call (from a host function into the guest). The exception is
/// cleared, so the outer guest code runs on if the host function recovers, unless the call was
/// stopped: then it stays set and the guest unwinds when the host function returns.
///
/// # Safety
/// `context` and `exec_env` belong to a live instance inside a host call.
unsafe fn nested_failure<S>(
    context: *mut InstanceContext<S>,
    exec_env: sys::wasm_exec_env_t,
) -> Trap {
    // SAFETY: per the contract.
    unsafe {
        let module_inst = sys::wasm_runtime_get_module_inst(exec_env);
        let pending = (*context).pending.take();
        let watch = (*context).watch.as_deref();
        let paused = watch.map_or(Paused::NotWatched, CallWatch::pause);
        let trap = match (pending, &paused) {
            (Some(trap), Paused::Stopped(_)) => trap,
            (None, Paused::Stopped(reason)) => reason.trap(),
            (Some(trap), _) => {
                sys::wasm_runtime_clear_exception(module_inst);
                trap
            }
            (None, _) => {
                let trap = current_exception(module_inst);
                sys::wasm_runtime_clear_exception(module_inst);
                trap
            }
        };
        if let (Some(watch), Paused::Running) = (watch, paused) {
            watch.resume();
        }
        trap
    }
}
