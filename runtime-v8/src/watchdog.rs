//! Stopping runaway guests: call deadlines and interrupt handles, both through V8's
//! `TerminateExecution`, which any thread may call.
//!
//! Each watched instance has a [`CallWatch`]: whether a top-level call is running, and whether
//! (and why) it was stopped. Stoppers (the watchdog thread, interrupt handles) terminate a call
//! only while holding the watch's lock and seeing it run, and the instance marks each call as
//! ended under the same lock: so no stopper touches an instance after it is dropped, and none
//! terminates it between calls.
//!
//! V8 keeps a termination request with the state of the thread holding the isolate's
//! `v8::Locker`, which is saved, restored or set up afresh as threads take the lock. So a request
//! made as a call takes the lock may vanish, and one made as a call releases it may be saved for
//! later. The shim therefore records each request and renews it whenever it takes the lock; the
//! watchdog renews it on every tick while a stopped call still runs; and the instance cancels it,
//! under the isolate's lock, once the stopped call has ended: so a stop is never lost, and never
//! leaks into the next call.
//!
//! Deadlines are checked by one process-wide watchdog thread that wakes at a tenth of the
//! shortest deadline it watches (at least every millisecond, at most every 100 ms, and when an
//! instance is registered) and reads the CPU clock of the thread running each call. The first
//! look at a call counts as one whole tick, so a call is stopped between 90% and 110% of its
//! CPU deadline, like wasmtime's epoch ticks. The thread sleeps while no instance with a
//! deadline exists.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use runtime_api::{Error, InterruptHandle};

use crate::ffi;
use runtime_api::StopReason;

thread_local! {
    /// The calling thread's CPU clock (-1 if it has none), looked up once per thread.
    static CPU_CLOCK: i64 = current_thread_cpu_clock();
}

fn current_thread_cpu_clock() -> i64 {
    // SAFETY: the shim only asks the C library for the calling thread's clock id.
    unsafe { ffi::pwv8_current_thread_cpu_clock() }
}

/// The stop state of one instance.
pub(crate) struct CallWatch {
    state: Mutex<WatchState>,
    /// The instance's VM: terminated by stoppers, only while `state.alive`.
    vm: *mut ffi::RawVm,
    deadline: Option<Duration>,
}

// SAFETY: stoppers, on any thread, use `vm` only for `pwv8_vm_terminate`, which V8 allows from
// any thread, and only under the state lock while `alive` is set, i.e. before the instance's drop
// (which clears it under the same lock) deletes the VM. `pwv8_vm_cancel_terminate` is called only
// by the instance that owns the VM, in `end`. The rest is a mutex.
unsafe impl Send for CallWatch {}
// SAFETY: as above.
unsafe impl Sync for CallWatch {}

struct WatchState {
    /// The VM exists; cleared (for good) before it is deleted.
    alive: bool,
    /// A top-level call (or instantiation) runs.
    running: bool,
    /// The running call was terminated, for this reason.
    stopped: Option<StopReason>,
    /// An interrupt arrived while no call ran: the next call fails at once.
    interrupt_pending: bool,
    /// The CPU clock of the thread running the call.
    cpu_clock: i64,
    /// The watchdog's first look at the running call.
    first_seen: Option<Sample>,
}

/// A time reading: the running thread's CPU time, or wall time if that cannot be read.
#[derive(Clone, Copy)]
enum Sample {
    Cpu(i64),
    Wall(Instant),
}

impl Sample {
    fn take(cpu_clock: i64) -> Sample {
        if cpu_clock >= 0 {
            // SAFETY: reading a clock has no preconditions; an invalid clock gives -1.
            let nanos = unsafe { ffi::pwv8_cpu_time_ns(cpu_clock) };
            if nanos >= 0 {
                return Sample::Cpu(nanos);
            }
        }
        Sample::Wall(Instant::now())
    }

    /// The time from `self` to now, on the same clock.
    fn elapsed(self, cpu_clock: i64) -> Duration {
        match (self, Sample::take(cpu_clock)) {
            (Sample::Cpu(then), Sample::Cpu(now)) => {
                Duration::from_nanos(u64::try_from(now - then).unwrap_or(0))
            }
            (Sample::Wall(then), _) => then.elapsed(),
            // The CPU clock became unreadable: the thread is gone, so the call is not running.
            (Sample::Cpu(_), Sample::Wall(_)) => Duration::ZERO,
        }
    }
}

impl CallWatch {
    /// The watch of `vm`, with an optional call deadline.
    pub(crate) fn new(vm: *mut ffi::RawVm, deadline: Option<Duration>) -> Self {
        CallWatch {
            state: Mutex::new(WatchState {
                alive: true,
                running: false,
                stopped: None,
                interrupt_pending: false,
                cpu_clock: -1,
                first_seen: None,
            }),
            vm,
            deadline,
        }
    }

    fn lock(&self) -> MutexGuard<'_, WatchState> {
        // The state stays consistent whatever panicked while holding the lock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks a top-level call as started; fails (and starts nothing) if an interrupt is pending.
    #[inline]
    pub(crate) fn begin(&self) -> Result<(), StopReason> {
        let cpu_clock = match self.deadline {
            Some(_) => CPU_CLOCK.with(|clock| *clock),
            None => -1,
        };
        let mut state = self.lock();
        if std::mem::take(&mut state.interrupt_pending) {
            return Err(StopReason::Interrupted);
        }
        state.running = true;
        state.stopped = None;
        state.cpu_clock = cpu_clock;
        state.first_seen = None;
        Ok(())
    }

    /// Marks the top-level call as finished and returns why it was stopped, if it was; a
    /// termination requested for it is cancelled, so the instance runs calls again. Called by the
    /// instance once the call has returned.
    #[inline]
    pub(crate) fn end(&self) -> Option<StopReason> {
        let stopped = {
            let mut state = self.lock();
            state.running = false;
            state.stopped.take()
        };
        // No stopper terminates the VM from here on (no call runs), so this cancels the last
        // request. Outside the state lock: cancelling takes the isolate's lock, which the thread
        // of a call holds while it reads the state (`current_stop`).
        if stopped.is_some() {
            // SAFETY: the instance is alive (it is ending its own call) and its call returned, so
            // the shim may take the isolate's lock on this thread.
            unsafe { ffi::pwv8_vm_cancel_terminate(self.vm) };
        }
        stopped
    }

    /// Why the running call was stopped, if it was (for a nested call that was terminated).
    pub(crate) fn current_stop(&self) -> Option<StopReason> {
        self.lock().stopped
    }

    /// Stops the running call, or the next one if none runs.
    pub(crate) fn interrupt(&self) {
        let mut state = self.lock();
        if !state.alive {
            return;
        }
        if !state.running {
            state.interrupt_pending = true;
            return;
        }
        // Even if the call was stopped already: terminating again is harmless, and renews a
        // request V8 may have lost.
        // SAFETY: `alive` is set under the lock, so the VM exists.
        unsafe { ffi::pwv8_vm_terminate(self.vm) };
        state.stopped.get_or_insert(StopReason::Interrupted);
    }

    /// Stops the running call if it has used up its deadline, or renews the termination of a
    /// call that was stopped but still runs. `tick` is the watchdog's period.
    fn check_deadline(&self, tick: Duration) {
        let Some(deadline) = self.deadline else {
            return;
        };
        let mut state = self.lock();
        if !state.alive || !state.running {
            return;
        }
        if state.stopped.is_some() {
            // SAFETY: `alive` is set under the lock, so the VM exists.
            unsafe { ffi::pwv8_vm_terminate(self.vm) };
            return;
        }
        // The call ran for up to one tick before the first look: count a whole tick.
        let used = match state.first_seen {
            None => {
                state.first_seen = Some(Sample::take(state.cpu_clock));
                tick
            }
            Some(first) => first.elapsed(state.cpu_clock) + tick,
        };
        if used >= deadline {
            // SAFETY: `alive` is set under the lock, so the VM exists.
            unsafe { ffi::pwv8_vm_terminate(self.vm) };
            state.stopped = Some(StopReason::Deadline);
        }
    }

    /// Marks the VM as about to be deleted: no stopper touches it from now on.
    pub(crate) fn retire(&self) {
        let mut state = self.lock();
        state.alive = false;
        state.running = false;
    }
}

/// The [`InterruptHandle`] of a watched instance.
pub(crate) struct V8InterruptHandle(pub(crate) Arc<CallWatch>);

impl InterruptHandle for V8InterruptHandle {
    fn interrupt(&self) {
        self.0.interrupt();
    }
}

/// The watchdog: the watches with deadlines, and a condition to wake its thread.
struct Watchdog {
    registry: Mutex<Registry>,
    wake: Condvar,
}

struct Registry {
    next_id: u64,
    watches: BTreeMap<u64, Arc<CallWatch>>,
}

static WATCHDOG: Watchdog = Watchdog {
    registry: Mutex::new(Registry {
        next_id: 0,
        watches: BTreeMap::new(),
    }),
    wake: Condvar::new(),
};

impl Watchdog {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&'static self) {
        let mut registry = self.lock();
        loop {
            while registry.watches.is_empty() {
                registry = self
                    .wake
                    .wait(registry)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            let shortest = registry
                .watches
                .values()
                .filter_map(|watch| watch.deadline)
                .min()
                .unwrap_or(Duration::from_secs(1));
            // At most 100 ms, and woken by a new watch: one with a short deadline must not wait
            // out a long tick set for the others.
            let tick = (shortest / 10).clamp(Duration::from_millis(1), Duration::from_millis(100));
            registry = self
                .wake
                .wait_timeout(registry, tick)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            for watch in registry.watches.values() {
                watch.check_deadline(tick);
            }
        }
    }
}

/// Keeps a watch under the watchdog's eye until dropped.
pub(crate) struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        WATCHDOG.lock().watches.remove(&self.0);
    }
}

/// Has the watchdog check `watch`'s deadline until the registration is dropped.
pub(crate) fn register(watch: Arc<CallWatch>) -> Result<Registration, Error> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("pwhost-v8-watchdog".into())
                .spawn(|| WATCHDOG.run())
                .map(|_| ())
                .map_err(|e| format!("cannot start the V8 watchdog thread: {e}"))
        })
        .clone()
        .map_err(Error::Config)?;
    let mut registry = WATCHDOG.lock();
    let id = registry.next_id;
    registry.next_id += 1;
    registry.watches.insert(id, watch);
    WATCHDOG.wake.notify_one();
    Ok(Registration(id))
}
