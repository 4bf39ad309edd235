//! Stopping runaway guests: call deadlines and interrupt handles, both through
//! `wasm_runtime_terminate`.
//!
//! WAMR can stop an instance from another thread: `wasm_runtime_terminate` (with the thread
//! manager built in) sets the instance's exception and a flag its interpreter checks at every
//! branch. What WAMR cannot do is say *why*, or make sure the exception is not set on an instance
//! that finished its call meanwhile (or was destroyed). So each watched instance has a
//! [`CallWatch`]: one atomic state word that the owning thread and the stoppers (the shared
//! watchdog thread, interrupt handles) move between states with compare-and-swap:
//!
//! * `IDLE` – no call; stoppers leave it alone (an interrupt is remembered for the next call).
//! * `RUNNING(start)` – a top-level call started at coarse time `start`; a stopper may claim it.
//! * `RUNNING(start) | BUSY` – the owner is reading or clearing the exception after a nested call
//!   failed; stoppers wait for the next tick.
//! * `STOPPING` – a stopper is inside `wasm_runtime_terminate`; the owner waits before reading
//!   or clearing the exception.
//! * `STOPPED` – the current call was terminated, for the recorded [`StopReason`].
//! * `DEAD` – the instance is gone; nothing may touch it.
//!
//! A top-level call costs the owner one store and one compare-and-swap. Deadlines are checked by
//! one process-wide watchdog thread that ticks at a tenth of the shortest deadline it watches and
//! keeps a coarse millisecond clock, so a call is stopped between 90% and 110% of its deadline
//! (wall time: WAMR has no CPU clock), as with wasmtime's epoch ticks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use runtime_api::{Error, InterruptHandle};
use wamrx_sys as sys;

use crate::global::ensure_thread_env;
use runtime_api::StopReason;

const IDLE: u64 = u64::MAX;
const DEAD: u64 = u64::MAX - 1;
const STOPPING: u64 = u64::MAX - 2;
const STOPPED: u64 = u64::MAX - 3;
/// Set on a running state while the owner handles a nested failure.
const BUSY: u64 = 1 << 62;

const NO_REASON: u8 = 0;
const REASON_DEADLINE: u8 = 1;
const REASON_INTERRUPTED: u8 = 2;

/// Whether `state` is a running call that no one else is handling.
fn is_running(state: u64) -> bool {
    state < BUSY
}

/// The stop state of one instance.
pub(crate) struct CallWatch {
    state: AtomicU64,
    reason: AtomicU8,
    interrupt_requested: AtomicBool,
    /// The call deadline in milliseconds (`u64::MAX`: none).
    deadline_ms: u64,
    /// This watch's index in the watchdog's list, while registered (changed under its lock).
    slot: AtomicUsize,
    module_inst: sys::wasm_module_inst_t,
}

// SAFETY: `module_inst` is only passed to `wasm_runtime_terminate`, which WAMR allows from any
// thread, and only while the state word proves a call is running, i.e. the instance is alive
// (see `try_stop`); everything else is atomic.
unsafe impl Send for CallWatch {}
// SAFETY: as above.
unsafe impl Sync for CallWatch {}

/// What [`CallWatch::pause`] found.
pub(crate) enum Paused {
    /// The call runs on; stoppers are held off until [`CallWatch::resume`].
    Running,
    /// The call was stopped (its exception is the stop, and must stay set).
    Stopped(StopReason),
    /// No top-level call is being watched (e.g. the start function during instantiation).
    NotWatched,
}

impl CallWatch {
    /// The watch of `module_inst`, with an optional call deadline.
    pub(crate) fn new(module_inst: sys::wasm_module_inst_t, deadline: Option<Duration>) -> Self {
        CallWatch {
            state: AtomicU64::new(IDLE),
            reason: AtomicU8::new(NO_REASON),
            interrupt_requested: AtomicBool::new(false),
            deadline_ms: deadline.map_or(u64::MAX, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
            }),
            slot: AtomicUsize::new(usize::MAX),
            module_inst,
        }
    }

    /// Marks a top-level call as started. Returns `false` (and starts nothing) if an interrupt
    /// is pending: the call must fail with [`StopReason::Interrupted`].
    #[inline]
    pub(crate) fn begin(&self) -> bool {
        self.state.store(coarse_now_ms(), Ordering::SeqCst);
        // After publishing the running state: an interrupt raised after this point sees it and
        // stops the call itself.
        !self.interrupt_requested.swap(false, Ordering::SeqCst)
    }

    /// Marks the top-level call as finished, waiting for a stopper that is terminating it.
    /// Returns why it was stopped, if it was. No stopper acts on the instance afterwards.
    ///
    /// An interrupt requested until then was meant for this call: it stopped it, or came too
    /// late (the call had finished, or its deadline had stopped it), so it is forgotten rather
    /// than stopping the next call. One requested afterwards finds the instance idle and stops
    /// the next call, as an interrupt between calls should.
    #[inline]
    pub(crate) fn end(&self) -> Option<StopReason> {
        loop {
            let state = self.state.load(Ordering::Acquire);
            if is_running(state) {
                if self
                    .state
                    .compare_exchange(state, IDLE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.interrupt_requested.store(false, Ordering::SeqCst);
                    return None;
                }
            } else if state == STOPPING {
                wait_a_little();
            } else if state == STOPPED {
                self.state.store(IDLE, Ordering::Release);
                self.interrupt_requested.store(false, Ordering::SeqCst);
                return Some(self.stop_reason());
            } else {
                // IDLE (or BUSY left behind, which the owner never does): nothing ran.
                self.state.store(IDLE, Ordering::Release);
                return None;
            }
        }
    }

    /// Holds stoppers off while the owner inspects or clears the exception after a nested call
    /// failed.
    pub(crate) fn pause(&self) -> Paused {
        loop {
            let state = self.state.load(Ordering::Acquire);
            if is_running(state) {
                if self
                    .state
                    .compare_exchange(state, state | BUSY, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return Paused::Running;
                }
            } else if state == STOPPING {
                wait_a_little();
            } else if state == STOPPED {
                return Paused::Stopped(self.stop_reason());
            } else {
                return Paused::NotWatched;
            }
        }
    }

    /// Lets stoppers act again after [`CallWatch::pause`] returned [`Paused::Running`]; an
    /// interrupt that came meanwhile is applied now.
    pub(crate) fn resume(&self) {
        let state = self.state.load(Ordering::Acquire);
        if state & BUSY != 0 && state != IDLE && state < STOPPED {
            self.state.store(state & !BUSY, Ordering::Release);
        }
        if self.interrupt_requested.load(Ordering::SeqCst) {
            self.try_stop(StopReason::Interrupted, |_| true);
        }
    }

    /// Marks the instance destroyed: no stopper touches it from now on.
    pub(crate) fn retire(&self) {
        loop {
            let state = self.state.load(Ordering::Acquire);
            if state == STOPPING {
                wait_a_little();
            } else if self
                .state
                .compare_exchange(state, DEAD, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        }
    }

    /// Asks the current (or next) call to stop with [`StopReason::Interrupted`].
    pub(crate) fn interrupt(&self) {
        self.interrupt_requested.store(true, Ordering::SeqCst);
        self.try_stop(StopReason::Interrupted, |_| true);
    }

    /// Terminates the running call if `should_stop(start)` holds for it. Only a stopper that
    /// moves the state from running to `STOPPING` touches the instance, and the owner cannot end
    /// the call (let alone destroy the instance) until it has moved on to `STOPPED`.
    fn try_stop(&self, reason: StopReason, should_stop: impl Fn(u64) -> bool) -> bool {
        let state = self.state.load(Ordering::Acquire);
        if !is_running(state) || !should_stop(state) {
            return false;
        }
        if self
            .state
            .compare_exchange(state, STOPPING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        let code = match reason {
            StopReason::Deadline => REASON_DEADLINE,
            StopReason::Interrupted => REASON_INTERRUPTED,
        };
        self.reason.store(code, Ordering::Relaxed);
        // Termination works without this thread's WAMR environment on the supported
        // platforms, so a failure here is no reason to let the guest run on.
        ensure_thread_env();
        // SAFETY: the state was a running call when it became STOPPING, so the owner is inside
        // that call (it waits in `end` while the state is STOPPING): the instance is alive.
        unsafe { sys::wasm_runtime_terminate(self.module_inst) };
        self.state.store(STOPPED, Ordering::Release);
        true
    }

    fn stop_reason(&self) -> StopReason {
        match self.reason.load(Ordering::Relaxed) {
            REASON_INTERRUPTED => StopReason::Interrupted,
            _ => StopReason::Deadline,
        }
    }
}

/// Lets a stopper finish `wasm_runtime_terminate` (a few locks: microseconds).
fn wait_a_little() {
    std::thread::yield_now();
}

/// Stops a running call of one instance from another thread.
pub(crate) struct WamrInterruptHandle {
    pub(crate) watch: Arc<CallWatch>,
}

impl InterruptHandle for WamrInterruptHandle {
    fn interrupt(&self) {
        self.watch.interrupt();
    }
}

/// Milliseconds since the watchdog's epoch, as of its last tick (or registration).
static COARSE_MS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn precise_now_ms() -> u64 {
    // Far below BUSY for any realistic uptime.
    u64::try_from(epoch().elapsed().as_millis())
        .unwrap_or(BUSY - 1)
        .min(BUSY - 1)
}

#[inline]
fn coarse_now_ms() -> u64 {
    COARSE_MS.load(Ordering::Relaxed)
}

/// The watches with deadlines, and how many have each deadline (the shortest sets the tick).
struct Watched {
    watches: Vec<Arc<CallWatch>>,
    deadlines: BTreeMap<u64, usize>,
}

/// The process-wide watchdog thread and what it watches.
pub(crate) struct Watchdog {
    watched: Mutex<Watched>,
    wake: Condvar,
}

static WATCHDOG: OnceLock<Result<Arc<Watchdog>, String>> = OnceLock::new();

/// The watchdog, started on first use.
pub(crate) fn watchdog() -> Result<Arc<Watchdog>, Error> {
    WATCHDOG
        .get_or_init(|| {
            let watchdog = Arc::new(Watchdog {
                watched: Mutex::new(Watched {
                    watches: Vec::new(),
                    deadlines: BTreeMap::new(),
                }),
                wake: Condvar::new(),
            });
            let thread_watchdog = watchdog.clone();
            std::thread::Builder::new()
                .name("pwhost-wamr-watchdog".into())
                .spawn(move || thread_watchdog.run())
                .map_err(|e| format!("cannot start the WAMR watchdog thread: {e}"))?;
            Ok(watchdog)
        })
        .clone()
        .map_err(Error::Config)
}

impl Watchdog {
    fn lock(&self) -> MutexGuard<'_, Watched> {
        // The list stays consistent across every operation below.
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts watching the deadline of `watch`.
    pub(crate) fn register(&self, watch: &Arc<CallWatch>) {
        let mut watched = self.lock();
        // A clock frozen while nothing was watched would make the first call look overdue.
        COARSE_MS.store(precise_now_ms(), Ordering::Relaxed);
        watch.slot.store(watched.watches.len(), Ordering::Relaxed);
        watched.watches.push(watch.clone());
        *watched.deadlines.entry(watch.deadline_ms).or_insert(0) += 1;
        self.wake.notify_one();
    }

    /// Stops watching `watch`; the watchdog does not touch it afterwards.
    pub(crate) fn deregister(&self, watch: &CallWatch) {
        let mut watched = self.lock();
        let slot = watch.slot.load(Ordering::Relaxed);
        let registered = watched
            .watches
            .get(slot)
            .is_some_and(|w| std::ptr::eq(&**w, watch));
        if !registered {
            return;
        }
        watched.watches.swap_remove(slot);
        if let Some(moved) = watched.watches.get(slot) {
            moved.slot.store(slot, Ordering::Relaxed);
        }
        if let Some(count) = watched.deadlines.get_mut(&watch.deadline_ms) {
            *count -= 1;
            if *count == 0 {
                watched.deadlines.remove(&watch.deadline_ms);
            }
        }
    }

    fn run(&self) {
        let mut watched = self.lock();
        loop {
            let Some(&shortest) = watched.deadlines.keys().next() else {
                watched = self
                    .wake
                    .wait(watched)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            let tick = Duration::from_millis((shortest / 10).clamp(1, 100));
            watched = self
                .wake
                .wait_timeout(watched, tick)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            let now = precise_now_ms();
            COARSE_MS.store(now, Ordering::Relaxed);
            for watch in &watched.watches {
                watch.try_stop(StopReason::Deadline, |start| {
                    now.saturating_sub(start) >= watch.deadline_ms
                });
            }
        }
    }
}
