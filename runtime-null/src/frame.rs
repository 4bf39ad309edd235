//! How native code finds the instance it runs in when it calls a host function.
//!
//! A WebAssembly engine hands host functions the calling instance. Native code has no such
//! handle, so each top-level [`crate::NullInstance`] call publishes a [`Frame`] in a
//! thread-local for its duration; [`call_host`] dispatches through it, and [`with_state`] lends
//! native code the instance's state for a typed host call. Frames nest (a host function may run
//! another instance), each restoring the previous one when it ends.

use std::any::TypeId;
use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::ptr::NonNull;

use runtime_api::{Caller, GuestFunction, GuestMemory, HostFunction, Trap, TrapKind};

use crate::NativeInstance;

/// Dispatches host calls for the instance whose call is running.
pub(crate) trait HostDispatch {
    fn dispatch(&self, import: usize, slots: &mut [u64]) -> Result<(), Trap>;

    /// The frame's parts that do not depend on the state's type.
    fn core(&self) -> &FrameCore;
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
/// its own), the host does not provide the function, the state is in use (by a [`with_state`]
/// closure, or by a host function calling this directly instead of through its
/// [`runtime_api::Caller`]), or the host function failed in a way that must stop the plugin.
/// Native code cannot be unwound like a trapping WebAssembly guest, so after such a failure the
/// instance's current call returns the trap as soon as the native code returns, and every
/// further host call of that call fails.
pub fn call_host(import: usize, slots: &mut [u64]) -> Result<(), Trap> {
    let Some(frame) = CURRENT.with(Cell::get) else {
        return Err(outside_a_call());
    };
    // SAFETY: a frame is published only by `FrameGuard::enter`, which takes it by reference and
    // removes it when the guard drops, before the frame goes out of scope; so a published
    // pointer always refers to a live frame of this thread. `dispatch` takes `&self`, so nested
    // host calls only ever create shared references to the frame.
    unsafe { frame.as_ref() }.dispatch(import, slots)
}

/// Runs `f` on the state of the instance whose call is running on this thread: the typed
/// counterpart of [`call_host`], for native code that knows its host's state type and calls the
/// host's functions directly (no argument slots, no numbered dispatch, no "guest memory").
///
/// A trap `f` returns ends the instance's call as a host function's trap does: it is returned
/// here, and the call fails with it as soon as the native code returns.
///
/// Errors: no instance call is running on this thread, the instance's state is not an `S`, a
/// host function of the call trapped before, or the state is in use: `f` is running already (a
/// nested `with_state` or [`call_host`] from within `f`), or a host function is (one that calls
/// `with_state` itself instead of going through [`runtime_api::Caller`]). Such calls fail instead
/// of aliasing the state.
pub fn with_state<S: 'static, R>(f: impl FnOnce(&mut S) -> Result<R, Trap>) -> Result<R, Trap> {
    let Some(frame) = CURRENT.with(Cell::get) else {
        return Err(outside_a_call());
    };
    // SAFETY: as in `call_host`: a published frame is live and only shared references to it
    // are made.
    let core = unsafe { frame.as_ref() }.core();
    if core.state_type != TypeId::of::<S>() {
        return Err(Trap::new(
            TrapKind::BadCall,
            "typed host call for a state of another type than the instance's",
        ));
    }
    core.check_reachable()?;
    let _lent = UseGuard::set(&core.in_use, InUse::Lent);
    // SAFETY: the pointer is the frame's state, lent by the instance's `call` for the frame's
    // lifetime, and of type `S` (checked above). No other reference to it is live: the state
    // was `InUse::Free` (checked above), i.e. no host function and no other `with_state` is
    // using it — a host function that reaches native code does so through `Caller::call`,
    // which frees the state only after the borrow checker ended the host function's borrows.
    // While `f` runs the state is `Lent`, so `dispatch` and a nested `with_state` refuse.
    let state = unsafe { core.state.cast::<S>().as_mut() };
    // A panic in the host's code is the call's trap, as in `dispatch`, not the plugin's.
    core.record(host_code(|| f(state)))
}

/// Runs the host's code for a native plugin's call: a panic in it is its trap, never unwound
/// into the plugin's code (through an SDK library's `extern "C"` frames it would abort).
/// Whatever it left half done belongs to a VM that fails with the trap.
fn host_code<R>(run: impl FnOnce() -> Result<R, Trap>) -> Result<R, Trap> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|panic| {
        Err(Trap::host(format!(
            "a host function panicked: {}",
            runtime_api::panic_message(&*panic)
        )))
    })
}

fn outside_a_call() -> Trap {
    Trap::new(
        TrapKind::BadCall,
        "host function called outside a call from the host (e.g. from a thread of the plugin's own)",
    )
}

/// Whether a call of an instance is running on this thread, i.e. whether [`call_host`] has
/// an instance to call for.
pub fn in_instance_call() -> bool {
    CURRENT.with(|current| current.get().is_some())
}

/// Who is using a frame's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InUse {
    /// Nobody: native code runs, and may call a host function or [`with_state`].
    Free,
    /// A host function, through a `NullCaller`.
    HostFunction,
    /// [`with_state`]'s closure.
    Lent,
}

/// Sets who uses a frame's state until dropped, then restores who did before (also when a
/// panic unwinds).
struct UseGuard<'c> {
    cell: &'c Cell<InUse>,
    previous: InUse,
}

impl<'c> UseGuard<'c> {
    fn set(cell: &'c Cell<InUse>, in_use: InUse) -> Self {
        UseGuard {
            cell,
            previous: cell.replace(in_use),
        }
    }
}

impl Drop for UseGuard<'_> {
    fn drop(&mut self) {
        self.cell.set(self.previous);
    }
}

/// What a frame holds whatever its instance's state type.
pub(crate) struct FrameCore {
    /// The instance's state, borrowed mutably by the instance's `call` for the frame's lifetime.
    state: NonNull<()>,
    /// The state's type, for [`with_state`].
    state_type: TypeId,
    /// Who uses the state now: one user at a time, so no two `&mut` to it are ever live.
    in_use: Cell<InUse>,
    /// The first trap a host function raised; the call ends with it.
    trap: RefCell<Option<Trap>>,
}

impl FrameCore {
    /// Fails if the call may not reach the state now: a host function trapped before, or the
    /// state is in use.
    fn check_reachable(&self) -> Result<(), Trap> {
        if let Some(trap) = &*self.trap.borrow() {
            return Err(trap.clone());
        }
        let user = match self.in_use.get() {
            InUse::Free => return Ok(()),
            InUse::Lent => "a typed host call",
            InUse::HostFunction => "a host function (it may re-enter only through its caller)",
        };
        Err(Trap::new(
            TrapKind::BadCall,
            format!("host call made while the instance's state is in use by {user}"),
        ))
    }

    /// Keeps the first trap of the call; the call ends with it.
    fn record<T>(&self, result: Result<T, Trap>) -> Result<T, Trap> {
        if let Err(trap) = &result {
            self.trap.borrow_mut().get_or_insert_with(|| trap.clone());
        }
        result
    }
}

/// The state of one top-level call of an instance, as host functions need it.
pub(crate) struct Frame<'a, S> {
    core: FrameCore,
    host: &'a [Option<HostFunction<S>>],
    imports: &'a [runtime_api::Import],
    instance: &'a dyn NativeInstance,
}

impl<'a, S: 'static> Frame<'a, S> {
    pub(crate) fn new(
        state: &'a mut S,
        host: &'a [Option<HostFunction<S>>],
        imports: &'a [runtime_api::Import],
        instance: &'a dyn NativeInstance,
    ) -> Self {
        Frame {
            core: FrameCore {
                state: NonNull::from(state).cast(),
                state_type: TypeId::of::<S>(),
                in_use: Cell::new(InUse::Free),
                trap: RefCell::new(None),
            },
            host,
            imports,
            instance,
        }
    }

    /// The trap a host function raised during the call, if any.
    pub(crate) fn take_trap(&self) -> Option<Trap> {
        self.core.trap.borrow_mut().take()
    }
}

impl<S> HostDispatch for Frame<'_, S> {
    fn dispatch(&self, import: usize, slots: &mut [u64]) -> Result<(), Trap> {
        self.core.check_reachable()?;
        let _host_function = UseGuard::set(&self.core.in_use, InUse::HostFunction);
        // A panic in a host function is its trap, as on every engine: native code calling
        // through an `extern "C"` symbol cannot be unwound through (the process would abort).
        let outcome = host_code(|| self.dispatch_first(import, slots));
        self.core.record(outcome)
    }

    fn core(&self) -> &FrameCore {
        &self.core
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

/// Publishes a frame for the current thread until dropped; it borrows the frame (`'f`), so the
/// frame outlives it.
pub(crate) struct FrameGuard<'f> {
    previous: Option<NonNull<dyn HostDispatch>>,
    frame: PhantomData<&'f ()>,
}

impl<'f> FrameGuard<'f> {
    /// Publishes `frame` until the guard drops.
    ///
    /// # Safety
    /// The guard must be dropped, never leaked (`mem::forget`), and guards must drop in the
    /// reverse order of their `enter`s (each restores the frame published before it): this
    /// crate's one caller holds its guard in a local it drops before reading the frame's trap.
    pub(crate) unsafe fn enter<S>(frame: &'f Frame<'_, S>) -> Self {
        let dispatch: &dyn HostDispatch = frame;
        // SAFETY: only the lifetime is erased. The guard borrows `frame` for `'f`, so the
        // borrow checker keeps the frame alive while the guard exists, and the guard
        // unpublishes the pointer when it drops (never leaked, in order: the caller's promise).
        let dispatch: NonNull<dyn HostDispatch> = unsafe {
            std::mem::transmute::<NonNull<dyn HostDispatch + '_>, NonNull<dyn HostDispatch>>(
                NonNull::from(dispatch),
            )
        };
        FrameGuard {
            previous: CURRENT.with(|current| current.replace(Some(dispatch))),
            frame: PhantomData,
        }
    }
}

impl Drop for FrameGuard<'_> {
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
        // call's duration (so it is an `S`), and nothing else touches the state meanwhile: a
        // `NullCaller` exists only while its host function runs, which `dispatch` started with the
        // state free and marked `InUse::HostFunction`, so `with_state` and other host calls
        // refuse. Only `Caller::call` frees the state for native code, and it takes `&mut self`,
        // so every `&mut S` this caller handed out has ended by then.
        unsafe { self.frame.core.state.cast::<S>().as_mut() }
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
        (
            unsafe { self.frame.core.state.cast::<S>().as_mut() },
            memory,
        )
    }

    fn call(
        &mut self,
        function: GuestFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap> {
        function.check_arity(args.len(), results.len())?;
        // The host function's borrows of the state ended (this takes `&mut self`): the native
        // code it calls may use the state, until it returns.
        let _free = UseGuard::set(&self.frame.core.in_use, InUse::Free);
        self.frame.instance.call(function.index(), args, results)
    }
}
