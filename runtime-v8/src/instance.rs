//! Instances, the host-function caller, and the way back from V8 into Rust.
//!
//! The embedder's state and everything host functions reach live in one heap allocation
//! ([`InstanceData`]) whose address the shim hands back to [`host_trampoline`]. While a call runs,
//! Rust holds no reference into it across the call into V8: the outer call and every host
//! function (however deeply nested through [`Caller::call`]) go through the raw pointer and keep
//! their references short, so re-entrant calls never alias a live `&mut`.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::Arc;

use runtime_api::{
    Caller, Error, GuestFunction, GuestMemory, HostCallback, Instance, InterruptHandle, StopReason,
    Trap, TrapKind,
};

use crate::ffi;
use crate::module::{ModuleShared, V8LinkedModule};
use crate::trap;
use crate::watchdog::{self, CallWatch, Registration, V8InterruptHandle};

/// What host functions reach: the state, the pending trap, the VM.
pub(crate) struct InstanceData<S> {
    state: S,
    /// The host function of each import.
    callbacks: Arc<[HostCallback<S>]>,
    /// The trap a host function returned, while the guest unwinds (a JS exception carries it
    /// through V8, but only as a marker).
    pending_trap: Option<Trap>,
    vm: *mut ffi::RawVm,
    /// The handles given out by [`Instance::function`], by shim index.
    functions: Vec<GuestFunction>,
    watch: Option<Arc<CallWatch>>,
}

/// A V8 instance: its own isolate and context, and the module instantiated in it.
pub struct V8Instance<S: 'static> {
    data: NonNull<InstanceData<S>>,
    vm: *mut ffi::RawVm,
    shared: Arc<ModuleShared>,
    watch: Option<Arc<CallWatch>>,
    registration: Option<Registration>,
}

// SAFETY: the instance owns its VM and its data exclusively. The VM's isolate is entered only
// under a `v8::Locker` (the shim takes one on every entry from the host and sets the thread's
// stack limit), which is V8's way of letting an isolate move between threads; the state is
// `Send`; the host callbacks are plain function pointers.
unsafe impl<S: Send + 'static> Send for V8Instance<S> {}

impl<S: Send + 'static> V8Instance<S> {
    pub(crate) fn new(linked: &V8LinkedModule<S>, state: S) -> Result<Self, Error> {
        let shared = &linked.shared;
        if let Some(reason) = &shared.settings.over_memory_limit {
            return Err(Error::Instantiation(reason.clone()));
        }
        let mut message = ffi::Message::new();
        // SAFETY: no preconditions beyond an initialised V8, which creating the runtime did.
        let vm = unsafe { ffi::pwv8_vm_new(message.as_out()) };
        if vm.is_null() {
            return Err(Error::Instantiation(
                message.text_or("cannot create a V8 isolate"),
            ));
        }
        let settings = &shared.settings;
        let watch = (settings.interruptible || settings.call_deadline.is_some())
            .then(|| Arc::new(CallWatch::new(vm, settings.call_deadline)));
        let data = Box::new(InstanceData {
            state,
            callbacks: linked.callbacks.clone(),
            pending_trap: None,
            vm,
            functions: Vec::new(),
            watch: watch.clone(),
        });
        // From here on, dropping `instance` releases everything.
        let mut instance = V8Instance {
            data: NonNull::from(Box::leak(data)),
            vm,
            shared: shared.clone(),
            watch,
            registration: None,
        };
        if let Some(watch) = &instance.watch {
            if settings.call_deadline.is_some() {
                instance.registration = Some(watchdog::register(watch.clone())?);
            }
        }
        instance.instantiate(linked)?;
        Ok(instance)
    }

    /// Instantiates the module in the VM, running its start function as a watched call.
    fn instantiate(&mut self, linked: &V8LinkedModule<S>) -> Result<(), Error> {
        let imports: Vec<ffi::RawImport> = linked
            .imports
            .iter()
            .map(|import| ffi::RawImport {
                module: import.module.as_ptr(),
                module_len: import.module.len(),
                name: import.name.as_ptr(),
                name_len: import.name.len(),
                shape: import.shape,
            })
            .collect();
        if let Some(watch) = &self.watch {
            watch
                .begin()
                .map_err(|reason| Error::Instantiation(reason.trap().to_string()))?;
        }
        let mut message = ffi::Message::new();
        // SAFETY: the VM is fresh and owned by `self`; `imports` (and the strings it points
        // into, owned by `linked`) outlive the call; `host_trampoline::<S>` is given the
        // `InstanceData<S>` it expects, which lives until the VM is deleted (see `drop`).
        let status = unsafe {
            ffi::pwv8_vm_instantiate(
                self.vm,
                self.shared.code.raw(),
                imports.as_ptr(),
                imports.len(),
                host_trampoline::<S>,
                self.data.as_ptr().cast::<c_void>(),
                message.as_out(),
            )
        };
        let stopped = self.end_call(status);
        // SAFETY: no other reference into the data is live.
        unsafe { outcome(self.data.as_ptr(), status, &message, stopped) }
            .map_err(|trap| Error::Instantiation(trap.to_string()))
    }

    /// Ends a top-level call: returns why it was stopped, and makes sure no termination outlives
    /// it (a stop is cancelled by the watch; a heap exhaustion by this).
    fn end_call(&self, status: i32) -> Option<StopReason> {
        let stopped = self.watch.as_ref().and_then(|watch| watch.end());
        if status == ffi::TERMINATED && stopped.is_none() {
            // SAFETY: the VM is alive and its call returned, so the shim may take the isolate's
            // lock on this thread.
            unsafe { ffi::pwv8_vm_cancel_terminate(self.vm) };
        }
        stopped
    }
}

/// Checks that `function` is a handle this instance gave out.
fn check_handle(functions: &[GuestFunction], function: GuestFunction) -> Result<(), Trap> {
    if functions.get(function.index() as usize) == Some(&function) {
        Ok(())
    } else {
        Err(Trap::new(
            TrapKind::BadCall,
            "unknown guest function handle",
        ))
    }
}

/// Calls `function` through the shim: from the host (`nested == false`) or from inside a host
/// function.
///
/// # Safety
/// `data` points to the live `InstanceData` of the VM, and no reference into it is live.
unsafe fn call_guest<S>(
    data: *mut InstanceData<S>,
    function: GuestFunction,
    args: &[u64],
    results: &mut [u64],
    nested: bool,
) -> (i32, ffi::Message) {
    let mut message = ffi::Message::new();
    // SAFETY: the caller guarantees `data` is live; `args` and `results` are valid for the
    // lengths passed (which `check_arity` matched to the function's shape in the shim).
    let status = unsafe {
        ffi::pwv8_vm_call(
            (*data).vm,
            function.index(),
            args.as_ptr(),
            args.len() as u32,
            results.as_mut_ptr(),
            results.len() as u32,
            i32::from(nested),
            message.as_out(),
        )
    };
    (status, message)
}

/// The result of a call into V8 that ended with `status`. A trap a host function returned comes
/// first, unchanged, even if the guest caught the exception that carried it.
///
/// # Safety
/// `data` points to the live `InstanceData` of the VM, and no reference into it is live.
unsafe fn outcome<S>(
    data: *mut InstanceData<S>,
    status: i32,
    message: &ffi::Message,
    stopped: Option<StopReason>,
) -> Result<(), Trap> {
    // SAFETY: the caller guarantees `data` is live and unaliased.
    if let Some(trap) = unsafe { (*data).pending_trap.take() } {
        return Err(trap);
    }
    match status {
        ffi::OK => Ok(()),
        ffi::THROWN => Err(trap::from_exception(&message.text_or("exception"))),
        ffi::TERMINATED => Err(match stopped {
            Some(reason) => reason.trap(),
            // SAFETY: as above; the VM lives as long as the data.
            None if unsafe { ffi::pwv8_vm_heap_exhausted((*data).vm) } != 0 => {
                trap::heap_exhausted()
            }
            None => Trap::host("V8 terminated the call"),
        }),
        _ => Err(Trap::host(message.text_or("the V8 shim failed"))),
    }
}

/// The shim's way back into Rust: runs host function `index` of the instance whose data is
/// `context` on `count` argument slots.
///
/// Returns 0, or 1 after storing the trap the guest must unwind with. A panicking host function
/// becomes a trap too: unwinding into V8's frames is not possible.
///
/// # Safety
/// `context` is the `InstanceData<S>` given to `pwv8_vm_instantiate` with this function, and
/// `slots` points to `count` writable slots.
unsafe extern "C" fn host_trampoline<S: 'static>(
    context: *mut c_void,
    index: u32,
    slots: *mut u64,
    count: u32,
) -> i32 {
    let data = context.cast::<InstanceData<S>>();
    // SAFETY: the shim passes back the data pointer it was given, which is live while its VM
    // runs; this short borrow ends before the callback runs.
    let callbacks = unsafe { &(*data).callbacks };
    let Some(callback) = callbacks.get(index as usize).copied() else {
        // SAFETY: as above.
        unsafe { (*data).pending_trap = Some(Trap::host("call of an unknown host function")) };
        return 1;
    };
    // SAFETY: the shim passes `count` (at least 1) slots of its own stack, unaliased.
    let slots = unsafe { std::slice::from_raw_parts_mut(slots, count as usize) };
    let mut caller = V8Caller { data };
    let trap = match catch_unwind(AssertUnwindSafe(|| callback(&mut caller, slots))) {
        Ok(Ok(())) => return 0,
        Ok(Err(trap)) => trap,
        Err(_) => Trap::host("a host function panicked"),
    };
    // SAFETY: as above; the caller's borrows ended with the callback.
    unsafe { (*data).pending_trap = Some(trap) };
    1
}

/// The guest memory of `vm` as a view, valid until the next call into the guest.
///
/// # Safety
/// `vm` is live; nothing else accesses its memory while the view lives (guest code runs only
/// through calls that need the borrow the view's lifetime is tied to).
unsafe fn memory_view<'a>(vm: *mut ffi::RawVm, nested: bool) -> GuestMemory<'a> {
    let mut base = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: the caller guarantees `vm` is live; the out-pointers are valid.
    let status = unsafe { ffi::pwv8_vm_memory(vm, i32::from(nested), &mut base, &mut len) };
    if status != ffi::OK || base.is_null() || len == 0 {
        return GuestMemory::empty();
    }
    // SAFETY: the shim returned the live backing store of the instance's memory, `len` bytes at
    // `base`; V8 moves or frees it only when the memory grows, i.e. while guest code runs, which
    // cannot happen while the view borrows the instance or caller.
    GuestMemory::new(unsafe { std::slice::from_raw_parts_mut(base, len) })
}

impl<S: Send + 'static> Instance<S> for V8Instance<S> {
    fn state(&mut self) -> &mut S {
        // SAFETY: `&mut self` excludes every other access to the data (no call is running).
        unsafe { &mut self.data.as_mut().state }
    }

    fn function(&mut self, name: &str) -> Option<GuestFunction> {
        let exported = self.shared.functions.get(name)?;
        // SAFETY: the VM is live; the name is a valid (pointer, length) pair.
        let index = unsafe {
            ffi::pwv8_vm_export_function(self.vm, name.as_ptr().cast(), name.len(), exported.shape)
        };
        let index = u32::try_from(index).ok()?;
        let handle = GuestFunction::new(index, &exported.ty);
        // SAFETY: `&mut self` excludes every other access to the data.
        let functions = unsafe { &mut self.data.as_mut().functions };
        // The shim numbers functions in the order they are resolved, as this list does.
        if index as usize != functions.len() {
            return None;
        }
        functions.push(handle);
        Some(handle)
    }

    fn call(
        &mut self,
        function: GuestFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap> {
        let data = self.data.as_ptr();
        // SAFETY: `&mut self` excludes every other access to the data; this borrow ends here.
        check_handle(unsafe { &(*data).functions }, function)?;
        function.check_arity(args.len(), results.len())?;
        if let Some(watch) = &self.watch {
            watch.begin().map_err(StopReason::trap)?;
        }
        // SAFETY: the data is live and no reference into it is held across the call.
        let (status, message) = unsafe { call_guest(data, function, args, results, false) };
        let stopped = self.end_call(status);
        // SAFETY: as above.
        unsafe { outcome(data, status, &message, stopped) }
    }

    fn memory_size(&mut self) -> usize {
        // SAFETY: the VM is live and no call is running.
        unsafe { memory_view(self.vm, false) }.len()
    }

    fn memory_limit(&self) -> Option<usize> {
        self.shared.settings.memory_limit
    }

    fn interrupt_handle(&self) -> Option<Arc<dyn InterruptHandle>> {
        let watch = self.watch.clone()?;
        Some(Arc::new(V8InterruptHandle(watch)))
    }
}

impl<S: 'static> Drop for V8Instance<S> {
    fn drop(&mut self) {
        if let Some(watch) = &self.watch {
            watch.retire();
        }
        self.registration = None;
        // SAFETY: the VM is deleted once, after no stopper can reach it any more (retired); no
        // call is running (`&mut self`).
        unsafe { ffi::pwv8_vm_delete(self.vm) };
        // SAFETY: the data was leaked from a `Box` in `new`, and the VM that pointed to it is
        // gone, so nothing else refers to it.
        drop(unsafe { Box::from_raw(self.data.as_ptr()) });
    }
}

/// The [`Caller`] handed to host functions.
struct V8Caller<S> {
    data: *mut InstanceData<S>,
}

impl<S: 'static> Caller<S> for V8Caller<S> {
    fn state(&mut self) -> &mut S {
        // SAFETY: the data is live while the host function runs, and the returned borrow of
        // `self` keeps this caller from being used (e.g. to call the guest) while it lives.
        unsafe { &mut (*self.data).state }
    }

    fn memory(&mut self) -> GuestMemory<'_> {
        // SAFETY: the VM is live while the host function runs; the view borrows `self`.
        unsafe { memory_view((*self.data).vm, true) }
    }

    fn state_and_memory(&mut self) -> (&mut S, GuestMemory<'_>) {
        // SAFETY: as in `state` and `memory`; the state and the guest memory are disjoint.
        unsafe {
            let memory = memory_view((*self.data).vm, true);
            (&mut (*self.data).state, memory)
        }
    }

    fn call(
        &mut self,
        function: GuestFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap> {
        let data = self.data;
        // SAFETY: the data is live; this borrow ends here.
        check_handle(unsafe { &(*data).functions }, function)?;
        function.check_arity(args.len(), results.len())?;
        // SAFETY: the data is live and no reference into it is held across the call (`&mut
        // self` ended every borrow handed out by this caller).
        let (status, message) = unsafe { call_guest(data, function, args, results, true) };
        let stopped = match status {
            // SAFETY: the watch is only read; the data is live.
            ffi::TERMINATED => unsafe { (*data).watch.as_ref() }.and_then(|w| w.current_stop()),
            _ => None,
        };
        // SAFETY: as above.
        unsafe { outcome(data, status, &message, stopped) }
    }
}
