//! Stopping a running guest: call deadlines and interruption from another thread.
//!
//! wasmer has no epoch counter. Instead a module middleware ([`StopCheck`]) gives every module
//! one extra `i32` global, the *stop flag*, and checks it at every function entry and loop header
//! (where wasmtime checks its epoch): `global.get $stop; if; unreachable; end`. The guest only ever
//! reads the flag, so the host can raise it from any thread by storing 1 into the global's slot in
//! the instance's `VMContext`; the guest then traps at its next check, and the host turns that trap
//! into the trap of its [`StopReason`] according to who raised it.
//!
//! A plain `global.get` is not enough for the optimising compilers, which may read the flag once
//! and keep it in a register (measured: a spinning loop was never stopped):
//! * cranelift's redundant-load elimination reuses an earlier load of the flag when no store to
//!   the same alias region (wasmer puts globals in the "table" region) lies in between, so each
//!   check first stores 0 into a second, private global ([`CheckStyle::ScratchStore`]);
//! * LLVM's `gvn` hoists the loop-invariant load out of the loop (wasmer tags every global with
//!   its own TBAA type, so no store aliases it), so each check first does a sequentially
//!   consistent `i32.atomic.load` of linear memory address 0, which LLVM must not move loads
//!   across and which on x86-64 is a plain `mov` ([`CheckStyle::AtomicLoad`]). This needs a
//!   memory of at least one page; modules without one are refused when deadlines or interruption
//!   are configured.
//!
//! Singlepass reads the global on every check as written.
//!
//! Deadlines: a ticker thread wakes ten times per deadline and raises the flag of every
//! registered instance whose current call it has seen running for the deadline by the clock,
//! counted from the first wake-up that saw the call (which began before it, so no call is
//! stopped early). Each call only stores its serial number; the clock is read on the ticker's
//! wake-ups alone. Counting wake-ups instead would let their lateness add up on a saturated
//! machine, where by the clock a stop is late by at most two ticks and two wake-ups.
//!
//! Why not wasmer's own tools (measured on this machine, see the crate's tests and the report):
//! * the `Metering` middleware of `wasmer-middlewares` counts instructions, not time; setting its
//!   counter to zero from another thread does not work because the guest reads *and writes* the
//!   counter on every block: the core running the guest forwards its own pending store to its
//!   next load and then overwrites the host's zero (a spinning loop was never stopped on cranelift
//!   or LLVM, and only after up to a second on singlepass); it also costs a read-modify-write on
//!   every branch instead of a load at loop headers;
//! * `experimental-host-interrupt` works on all three compilers, but it is a crate-wide feature
//!   that registers every call in a global map and looks the store up again on every host
//!   function return: guest→host calls went from 27 to 43 ns and host→guest calls from 37 to
//!   82 ns, whether or not a deadline is configured; and its signal may land inside a libcall.

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use runtime_api::{InterruptHandle, StopReason, Trap, TrapKind, WasmTrapCode};
use wasmer::sys::{FunctionMiddleware, MiddlewareError, MiddlewareReaderState, ModuleMiddleware};
use wasmer::wasmparser::{BlockType, MemArg, Operator};
use wasmer::{
    ExportIndex, GlobalInit, GlobalType, LocalFunctionIndex, ModuleInfo, Mutability, Type,
};

/// The export name under which the middleware publishes the stop flag.
pub(crate) const STOP_FLAG_EXPORT: &str = "__pwhost_stop";

/// The export name under which the middleware publishes the module's start function, which it
/// takes out of the module so that the instance runs it under the deadline.
pub(crate) const START_EXPORT: &str = "__pwhost_start";

/// What each check does before reading the flag, so that the compiler cannot reuse an earlier
/// read (see the module documentation).
/// Builds without some compiler never construct its style.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    not(all(feature = "cranelift", feature = "singlepass", feature = "llvm")),
    allow(dead_code)
)]
pub(crate) enum CheckStyle {
    /// Read the flag (singlepass).
    Plain,
    /// Store 0 into a private scratch global, then read the flag (cranelift).
    ScratchStore,
    /// `i32.atomic.load` linear memory address 0 and drop it, then read the flag (LLVM).
    AtomicLoad,
}

impl CheckStyle {
    /// The byte that records the style in precompiled artifacts.
    pub(crate) fn tag(self) -> u8 {
        match self {
            CheckStyle::Plain => b'p',
            CheckStyle::ScratchStore => b's',
            CheckStyle::AtomicLoad => b'a',
        }
    }
}

/// The globals (and memory) the checks use, fixed per module.
#[derive(Clone, Copy, Debug)]
struct CheckIndexes {
    flag: u32,
    /// The scratch global of [`CheckStyle::ScratchStore`].
    scratch: u32,
}

/// The module middleware that adds the stop flag and its checks.
///
/// It remembers the flag's global index between `transform_module_info` and the per-function
/// middlewares, so one instance serves one module: the runtime builds a fresh engine (and so a
/// fresh middleware) for every module it compiles.
#[derive(Debug)]
pub(crate) struct StopCheck {
    style: CheckStyle,
    indexes: Mutex<Option<CheckIndexes>>,
}

impl StopCheck {
    /// A middleware inserting checks of the given style.
    pub(crate) fn new(style: CheckStyle) -> Self {
        StopCheck {
            style,
            indexes: Mutex::new(None),
        }
    }
}

impl ModuleMiddleware for StopCheck {
    fn generate_function_middleware<'a>(
        &self,
        _: LocalFunctionIndex,
    ) -> Box<dyn FunctionMiddleware<'a> + 'a> {
        let indexes = *self.indexes.lock().unwrap_or_else(|e| e.into_inner());
        Box::new(FunctionStopCheck {
            style: self.style,
            indexes,
            entered: false,
        })
    }

    fn transform_module_info(&self, info: &mut ModuleInfo) -> Result<(), MiddlewareError> {
        let mut slot = self.indexes.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Err(MiddlewareError::new(
                "StopCheck",
                "one StopCheck middleware cannot serve two modules",
            ));
        }
        if self.style == CheckStyle::AtomicLoad {
            // Memory 0 is the first one; memories never shrink below their minimum.
            let has_a_page = info
                .memories
                .values()
                .next()
                .is_some_and(|memory| memory.minimum.0 >= 1);
            if !has_a_page {
                return Err(MiddlewareError::new(
                    "StopCheck",
                    "wasmer-llvm enforces call deadlines and interrupts only in modules with a \
                     linear memory of at least one page",
                ));
            }
        }
        let flag = info
            .globals
            .push(GlobalType::new(Type::I32, Mutability::Var));
        info.global_initializers.push(GlobalInit::I32Const(0));
        info.exports
            .insert(STOP_FLAG_EXPORT.to_string(), ExportIndex::Global(flag));
        let scratch = info
            .globals
            .push(GlobalType::new(Type::I32, Mutability::Var));
        info.global_initializers.push(GlobalInit::I32Const(0));
        if let Some(start) = info.start_function.take() {
            info.exports
                .insert(START_EXPORT.to_string(), ExportIndex::Function(start));
        }
        *slot = Some(CheckIndexes {
            flag: flag.as_u32(),
            scratch: scratch.as_u32(),
        });
        Ok(())
    }
}

/// Inserts the check at the function's entry and at the top of every loop body.
#[derive(Debug)]
struct FunctionStopCheck {
    style: CheckStyle,
    /// `None` only if wasmer compiled functions without transforming the module first, which it
    /// never does; the functions then get no checks rather than a panic.
    indexes: Option<CheckIndexes>,
    entered: bool,
}

impl FunctionStopCheck {
    fn check<'a>(&self, state: &mut MiddlewareReaderState<'a>) {
        let Some(indexes) = self.indexes else {
            return;
        };
        match self.style {
            CheckStyle::Plain => {}
            CheckStyle::ScratchStore => state.extend([
                Operator::I32Const { value: 0 },
                Operator::GlobalSet {
                    global_index: indexes.scratch,
                },
            ]),
            CheckStyle::AtomicLoad => state.extend([
                Operator::I32Const { value: 0 },
                Operator::I32AtomicLoad {
                    memarg: MemArg {
                        align: 2,
                        max_align: 2,
                        offset: 0,
                        memory: 0,
                    },
                },
                Operator::Drop,
            ]),
        }
        state.extend([
            Operator::GlobalGet {
                global_index: indexes.flag,
            },
            Operator::If {
                blockty: BlockType::Empty,
            },
            Operator::Unreachable,
            Operator::End,
        ]);
    }
}

impl<'a> FunctionMiddleware<'a> for FunctionStopCheck {
    fn feed(
        &mut self,
        operator: Operator<'a>,
        state: &mut MiddlewareReaderState<'a>,
    ) -> Result<(), MiddlewareError> {
        if !self.entered {
            self.entered = true;
            self.check(state);
        }
        let is_loop = matches!(operator, Operator::Loop { .. });
        state.push_operator(operator);
        if is_loop {
            self.check(state);
        }
        Ok(())
    }
}

/// `call` while no call runs.
const IDLE: u64 = u64::MAX;
/// `call` once the ticker has raised the flag for the current call.
const FIRED: u64 = u64::MAX - 1;

/// The address of an instance's stop flag.
#[derive(Clone, Copy)]
pub(crate) struct FlagPtr(NonNull<i32>);

// SAFETY: the pointer is only dereferenced atomically, and only while the instance that owns the
// slot is alive (see `StopSlot::detach`).
unsafe impl Send for FlagPtr {}

impl FlagPtr {
    /// # Safety
    /// `ptr` must point at an `i32` global of a live instance, aligned for atomic access.
    pub(crate) unsafe fn new(ptr: NonNull<i32>) -> Self {
        FlagPtr(ptr)
    }

    fn store(self, value: i32) {
        // SAFETY: `FlagPtr::new`'s contract; the guest reads the same 4 aligned bytes with plain
        // loads, which on every supported target observe an aligned atomic store whole.
        unsafe { AtomicI32::from_ptr(self.0.as_ptr()) }.store(value, Ordering::Release);
    }
}

/// The stop state of one instance, shared with its interrupt handle and the ticker.
pub(crate) struct StopSlot {
    /// The instance's stop flag while the instance lives; writers from other threads hold this
    /// lock, so the instance can take the pointer away before it is freed.
    flag: Mutex<Option<FlagPtr>>,
    /// The serial number of the current top-level call; [`IDLE`] or [`FIRED`].
    call: AtomicU64,
    /// The serial number of the last call (written only by the thread running the instance).
    serial: AtomicU64,
    /// An interrupt was requested and not yet consumed by a trapping call.
    interrupt: AtomicBool,
}

impl fmt::Debug for StopSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StopSlot")
            .field("call", &self.call)
            .field("interrupt", &self.interrupt)
            .finish_non_exhaustive()
    }
}

impl StopSlot {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(StopSlot {
            flag: Mutex::new(None),
            call: AtomicU64::new(IDLE),
            serial: AtomicU64::new(0),
            interrupt: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<FlagPtr>> {
        self.flag.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects the slot to its instance's flag (once, right after instantiation).
    pub(crate) fn attach(&self, flag: FlagPtr) {
        let mut slot = self.lock();
        if self.interrupt.load(Ordering::Acquire) {
            flag.store(1);
        }
        *slot = Some(flag);
    }

    /// Disconnects the slot before the instance is freed; later raises do nothing.
    pub(crate) fn detach(&self) {
        *self.lock() = None;
    }

    /// Marks the start of a top-level call, with a serial number of its own so that the ticker
    /// tells it from the call before.
    #[inline]
    pub(crate) fn begin(&self) {
        // Only this instance's thread writes the serial: no read-modify-write needed. It stays
        // below `FIRED` for longer than any process runs (2^64 calls).
        let serial = self.serial.load(Ordering::Relaxed) + 1;
        self.serial.store(serial, Ordering::Relaxed);
        self.call.store(serial, Ordering::Release);
    }

    /// Marks the end of a top-level call; says why the flag was raised during it, if it was and
    /// the call ended with the check's trap (`trapped`), and lowers the flag again (a pending interrupt stays raised for the next call
    /// when this one finished before noticing it).
    #[inline]
    pub(crate) fn end(&self, trapped: bool) -> Option<StopReason> {
        let fired = self.call.swap(IDLE, Ordering::AcqRel) == FIRED;
        if !(fired || trapped && self.interrupt.load(Ordering::Acquire)) {
            return None;
        }
        self.end_slow(fired, trapped)
    }

    #[cold]
    fn end_slow(&self, fired: bool, trapped: bool) -> Option<StopReason> {
        // The raiser stores the flag under the lock: taking it waits for a store in flight.
        let slot = self.lock();
        let interrupted = trapped && self.interrupt.swap(false, Ordering::AcqRel);
        let still_pending = self.interrupt.load(Ordering::Acquire);
        if let Some(flag) = *slot {
            flag.store(i32::from(still_pending));
        }
        match (trapped, fired, interrupted) {
            (false, _, _) => None,
            (true, true, _) => Some(StopReason::Deadline),
            (true, false, true) => Some(StopReason::Interrupted),
            (true, false, false) => None,
        }
    }

    /// The ticker's look at the slot at `now`: `seen` is the call it saw running last time and
    /// when it first saw it; the flag is raised once that same call has run for `deadline`.
    fn watch(&self, seen: &mut Option<(u64, Instant)>, now: Instant, deadline: Duration) {
        let call = self.call.load(Ordering::Acquire);
        if call >= FIRED {
            *seen = None;
            return;
        }
        match *seen {
            Some((serial, first)) if serial == call => {
                if now.duration_since(first) < deadline {
                    return;
                }
            }
            _ => {
                *seen = Some((call, now));
                return;
            }
        }
        let slot = self.lock();
        if self
            .call
            .compare_exchange(call, FIRED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            if let Some(flag) = *slot {
                flag.store(1);
            }
        }
    }

    /// Requests an interrupt of the current (or next) call.
    fn interrupt(&self) {
        let slot = self.lock();
        self.interrupt.store(true, Ordering::Release);
        if let Some(flag) = *slot {
            flag.store(1);
        }
    }
}

/// Whether `trap` may be the check's trap (`unreachable`), directly or passed on by a host
/// function that called into the guest.
pub(crate) fn is_check_trap(trap: &Trap) -> bool {
    trap.kind == TrapKind::Wasm && trap.message == WasmTrapCode::Unreachable.message()
}

/// Turns a trap of a call during which the flag was raised into the stop it stands for.
///
/// Only the trap the check raises (`unreachable`) is reinterpreted, also when it comes back
/// through a host function that called into the guest; any other trap, a host error or an exit
/// stays what it is.
pub(crate) fn reclassify(trap: Trap, stop: Option<StopReason>) -> Trap {
    match stop {
        Some(reason) if is_check_trap(&trap) => reason.trap(),
        _ => trap,
    }
}

/// The interrupt handle of one instance.
pub(crate) struct WasmerInterruptHandle(pub(crate) Arc<StopSlot>);

impl InterruptHandle for WasmerInterruptHandle {
    fn interrupt(&self) {
        self.0.interrupt();
    }
}

/// A registered slot and the ticker's memory of it: the call it saw running and when it first
/// saw it.
type Watched = (Weak<StopSlot>, Option<(u64, Instant)>);

/// What the ticker thread and the instances share.
struct TickerShared {
    stop: AtomicBool,
    slots: Mutex<Vec<Watched>>,
}

/// A thread that wakes ten times per deadline and stops the calls that overran it.
pub(crate) struct Ticker {
    shared: Arc<TickerShared>,
    /// How long one call may run.
    deadline: Duration,
}

impl fmt::Debug for Ticker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticker")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Ticker {
    /// Starts the ticker for calls of at most `deadline`; `None` if no thread can be started.
    pub(crate) fn start(deadline: Duration) -> Option<Arc<Self>> {
        // Ten ticks per deadline bound the overshoot at about 20% (the first wake-up that sees a
        // call and the one after its deadline), with at most one wake-up per millisecond (as
        // the wasmtime engine does).
        let tick = (deadline / 10).max(Duration::from_millis(1));
        let shared = Arc::new(TickerShared {
            stop: AtomicBool::new(false),
            slots: Mutex::new(Vec::new()),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("pwhost-wasmer-deadline".into())
            .spawn(move || {
                while !thread_shared.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    let now = Instant::now();
                    let mut slots = thread_shared
                        .slots
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    slots.retain_mut(|(slot, seen)| match slot.upgrade() {
                        Some(slot) => {
                            slot.watch(seen, now, deadline);
                            true
                        }
                        None => false,
                    });
                }
            })
            .ok()?;
        Some(Arc::new(Ticker { shared, deadline }))
    }

    /// Has the ticker watch `slot` for as long as it lives.
    pub(crate) fn register(&self, slot: &Arc<StopSlot>) {
        self.shared
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((Arc::downgrade(slot), None));
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}
