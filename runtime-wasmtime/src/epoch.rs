//! Epoch-based call deadlines and interruption.
//!
//! wasmtime checks an engine-wide epoch counter at function entries and loop heads. Every store
//! sets its deadline one tick ahead, so each tick runs the store's callback, which looks at the
//! store's interrupt flag and at the wall clock. An interrupt also advances the epoch at once,
//! so it takes effect without waiting for the ticker.
//!
//! The deadline is measured by the clock, from the first tick the call sees (it began before
//! that tick, so no call is stopped early), not by counting ticks: on a saturated machine the
//! ticker thread is scheduled late, and lateness counted over a deadline's ten ticks would add
//! up, where by the clock a stop is late by at most two ticks and two of the ticker's wake-ups.
//! Reading the clock only on ticks keeps it off the call path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime_api::{InterruptHandle, Trap};

/// A thread that advances the engine's epoch while call deadlines are configured.
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    /// How long one call may run; `None` when only interruption is configured.
    pub(crate) deadline: Option<Duration>,
}

impl EpochTicker {
    pub(crate) fn start(engine: &wasmtime::Engine, deadline: Option<Duration>) -> Arc<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let Some(deadline) = deadline else {
            return Arc::new(EpochTicker {
                stop,
                deadline: None,
            });
        };
        // Ten ticks per deadline bound the overshoot at about 20% (the first tick a call sees and
        // the one after its deadline), with at most one wake-up per millisecond.
        let tick = (deadline / 10).max(Duration::from_millis(1));
        let engine = engine.clone();
        let thread_stop = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("pwhost-epoch".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            });
        if spawned.is_err() {
            // Without a ticker deadlines cannot fire; interruption still works.
            return Arc::new(EpochTicker {
                stop,
                deadline: None,
            });
        }
        Arc::new(EpochTicker {
            stop,
            deadline: Some(deadline),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Per-store epoch bookkeeping.
pub(crate) struct EpochState {
    pub(crate) interrupted: Arc<AtomicBool>,
    /// When the current call saw its first tick (`None` until it does; reset by every call).
    pub(crate) first_tick: Option<Instant>,
    /// How long one call may run, if deadlines are configured.
    deadline: Option<Duration>,
}

impl EpochState {
    pub(crate) fn new(deadline: Option<Duration>) -> Self {
        EpochState {
            interrupted: Arc::new(AtomicBool::new(false)),
            first_tick: None,
            deadline,
        }
    }

    /// Called on every tick while the store runs guest code.
    pub(crate) fn on_tick(&mut self) -> Result<(), Trap> {
        if self.interrupted.swap(false, Ordering::AcqRel) {
            return Err(Trap::interrupted());
        }
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let now = Instant::now();
        match self.first_tick {
            None => self.first_tick = Some(now),
            Some(first) if now.duration_since(first) >= deadline => {
                return Err(Trap::deadline_exceeded())
            }
            Some(_) => {}
        }
        Ok(())
    }
}

/// Interrupts one store: raises its flag and advances the epoch so the store notices now.
pub(crate) struct WasmtimeInterruptHandle {
    pub(crate) engine: wasmtime::Engine,
    pub(crate) interrupted: Arc<AtomicBool>,
}

impl InterruptHandle for WasmtimeInterruptHandle {
    fn interrupt(&self) {
        self.interrupted.store(true, Ordering::Release);
        self.engine.increment_epoch();
    }
}
