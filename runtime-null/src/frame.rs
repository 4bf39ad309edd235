//! How native code finds the instance it runs in when it calls a host function.
//!
//! A WebAssembly engine hands host functions the calling instance. Native code has no such
//! handle, so each top-level [`crate::NullInstance`] call publishes a [`Frame`] in a
//! thread-local for its duration; [`call_host`] dispatches through it. Frames nest (a host
//! function may run another instance), each restoring the previous one when it ends.

use std::cell::{Cell, RefCell};
use std::ptr::NonNull;

use runtime_api::{Caller, GuestFunction, GuestMemory, HostFunction, Trap, TrapKind};

use crate::NativeInstance;

/// Dispatches host calls for the instance whose call is running.
pub(crate) trait HostDispatch {
    fn dispatch(&self, import: usize, slots: &mut [u64]) -> Result<(), Trap>;
}

thread_local! {
    static CURRENT: Cell<Option<NonNull<dyn HostDispatch>>> = const { Cell::new(None) };
}

/// Calls host function number `import` (its position in the module's
/// [`crate::NativeModule::imports`]) for the instance whose call is running on this thread.
///
/// Arguments are in `slots`; the result, if any, comes back in `slots[0]`. `slots` must be at
/// least as long as the function's parameter list (and at least 1 if it has a result).
///
/// Errors: no instance call is running on this thread (e.g. native code called from a thread of
/// its own), the host does not provide the function, or the host function failed in a way that
/// must stop the plugin. Native code cannot be unwound like a trapping WebAssembly guest, so
/// after such a failure the instance's current call returns the trap as soon as the native code
/// returns, and every further host call of that call fails.
pub fn call_host(import: usize, slots: &mut [u64]) -> Result<(), Trap> {
    let Some(frame) = CURRENT.with(Cell::get) else {
        return Err(Trap::new(
            TrapKind::BadCall,
            "host function called outside a call from the host (e.g. from a thread of the plugin's own)",
        ));
    };
    // SAFETY: a frame is published only by `FrameGuard::enter`, which takes it by reference and
    // removes it when the guard drops, before the frame goes out of scope; so a published
    // pointer always refers to a live frame of this thread. `dispatch` takes `&self`, so nested
    // host calls only ever create shared references to the frame.
    unsafe { frame.as_ref() }.dispatch(import, slots)
}

/// Whether a call of an instance is running on this thread, i.e. whether [`call_host`] has
/// an instance to call for.
pub fn in_instance_call() -> bool {
    CURRENT.with(|current| current.get().is_some())
}

/// The state of one top-level call of an instance, as host functions need it.
pub(crate) struct Frame<'a, S> {
    /// The instance's state, borrowed mutably by the instance's `call` for the frame's lifetime.
    state: NonNull<S>,
    host: &'a [Option<HostFunction<S>>],
    imports: &'a [runtime_api::Import],
    instance: &'a dyn NativeInstance,
    /// The first trap a host function raised; the call ends with it.
    trap: RefCell<Option<Trap>>,
}

impl<'a, S> Frame<'a, S> {
    pub(crate) fn new(
        state: &'a mut S,
        host: &'a [Option<HostFunction<S>>],
        imports: &'a [runtime_api::Import],
        instance: &'a dyn NativeInstance,
    ) -> Self {
        Frame {
            state: NonNull::from(state),
            host,
            imports,
            instance,
            trap: RefCell::new(None),
        }
    }

    /// The trap a host function raised during the call, if any.
    pub(crate) fn take_trap(&self) -> Option<Trap> {
        self.trap.borrow_mut().take()
    }
}

impl<S> HostDispatch for Frame<'_, S> {
    fn dispatch(&self, import: usize, slots: &mut [u64]) -> Result<(), Trap> {
        if let Some(trap) = &*self.trap.borrow() {
            return Err(trap.clone());
        }
        let result = self.dispatch_first(import, slots);
        if let Err(trap) = &result {
            self.trap.borrow_mut().get_or_insert_with(|| trap.clone());
        }
        result
    }
}

impl<S> Frame<'_, S> {
    /// Runs host function `import`; any failure will end the call.
    fn dispatch_first(&self, import: usize, slots: &mut [u64]) -> Result<(), Trap> {
        let function = match self.host.get(import) {
            Some(Some(function)) => function,
            Some(None) => {
                let name = &self.imports[import];
                return Err(Trap::new(
                    TrapKind::BadCall,
                    format!("the host does not provide {}.{}", name.module, name.name),
                ));
            }
            None => {
                return Err(Trap::new(
                    TrapKind::BadCall,
                    format!("no host function number {import}"),
                ))
            }
        };
        let needed = function
            .signature
            .params
            .len()
            .max(function.signature.results.len());
        if slots.len() < needed {
            return Err(Trap::new(
                TrapKind::BadCall,
                format!(
                    "{} needs {needed} slots, got {}",
                    function.name,
                    slots.len()
                ),
            ));
        }
        let mut caller = NullCaller { frame: self };
        (function.callback)(&mut caller, slots)
    }
}

/// Publishes a frame for the current thread until dropped.
pub(crate) struct FrameGuard {
    previous: Option<NonNull<dyn HostDispatch>>,
}

impl FrameGuard {
    /// Publishes `frame`. The guard must be dropped before `frame` (declare it after).
    pub(crate) fn enter<S>(frame: &Frame<'_, S>) -> Self {
        let dispatch: &dyn HostDispatch = frame;
        // SAFETY: only the lifetime is erased; the guard unpublishes the pointer on drop, and
        // the borrow checker keeps `frame` alive for as long as the guard that borrowed it is
        // in scope (callers hold the guard in a local declared after the frame).
        let dispatch: NonNull<dyn HostDispatch> = unsafe {
            std::mem::transmute::<NonNull<dyn HostDispatch + '_>, NonNull<dyn HostDispatch>>(
                NonNull::from(dispatch),
            )
        };
        FrameGuard {
            previous: CURRENT.with(|current| current.replace(Some(dispatch))),
        }
    }
}

impl Drop for FrameGuard {
    fn drop(&mut self) {
        CURRENT.with(|current| current.set(self.previous));
    }
}

/// What a host function sees of a native instance.
struct NullCaller<'f, 'a, S> {
    frame: &'f Frame<'a, S>,
}

impl<S> Caller<S> for NullCaller<'_, '_, S> {
    fn state(&mut self) -> &mut S {
        // SAFETY: the pointer comes from the `&mut S` the instance's `call` lent the frame for the
        // call's duration, and nothing else touches the state meanwhile. Host calls nest only
        // through `Caller::call`, which takes `&mut self`, so a nested host function's `&mut S`
        // never overlaps a live one from an outer host function.
        unsafe { &mut *self.frame.state.as_ptr() }
    }

    fn memory(&mut self) -> GuestMemory<'_> {
        // SAFETY: native plugins are trusted code (the null runtime's documented trust model):
        // they pass the host valid native pointers, as any native library must.
        unsafe { GuestMemory::native() }
    }

    fn state_and_memory(&mut self) -> (&mut S, GuestMemory<'_>) {
        // SAFETY: as in `memory`.
        let memory = unsafe { GuestMemory::native() };
        // SAFETY: as in `state`.
        (unsafe { &mut *self.frame.state.as_ptr() }, memory)
    }

    fn call(
        &mut self,
        function: GuestFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap> {
        function.check_arity(args.len(), results.len())?;
        self.frame.instance.call(function.index(), args, results)
    }
}
