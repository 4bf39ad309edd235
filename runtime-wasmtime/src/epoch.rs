//! Epoch-based call deadlines and interruption.
//!
//! wasmtime checks an engine-wide epoch counter at function entries and loop heads. Every store
//! sets its deadline one tick ahead, so each tick runs the store's callback, which counts the ticks
//! the current call has used and looks at the store's interrupt flag. An interrupt also advances
//! the epoch at once, so it takes effect without waiting for the ticker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use runtime_api::{InterruptHandle, Trap};

/// A thread that advances the engine's epoch while call deadlines are configured.
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    /// How many ticks one call may use; `u32::MAX` when only interruption is configured.
    pub(crate) max_ticks: u32,
}

impl EpochTicker {
    pub(crate) fn start(engine: &wasmtime::Engine, deadline: Option<Duration>) -> Arc<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let Some(deadline) = deadline else {
            return Arc::new(EpochTicker {
                stop,
                max_ticks: u32::MAX,
            });
        };
        // Ten ticks per deadline bounds the overshoot at about 10%, with at most one wake-up per
        // millisecond.
        let tick = (deadline / 10).max(Duration::from_millis(1));
        let max_ticks = (deadline.as_nanos() / tick.as_nanos()).max(1) as u32;
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
                max_ticks: u32::MAX,
            });
        }
        Arc::new(EpochTicker { stop, max_ticks })
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
    pub(crate) ticks_used: u32,
    pub(crate) max_ticks: u32,
}

impl EpochState {
    pub(crate) fn new(max_ticks: u32) -> Self {
        EpochState {
            interrupted: Arc::new(AtomicBool::new(false)),
            ticks_used: 0,
            max_ticks,
        }
    }

    /// Called on every tick while the store runs guest code.
    pub(crate) fn on_tick(&mut self) -> Result<(), Trap> {
        if self.interrupted.swap(false, Ordering::AcqRel) {
            return Err(Trap::interrupted());
        }
        self.ticks_used = self.ticks_used.saturating_add(1);
        if self.ticks_used >= self.max_ticks {
            return Err(Trap::deadline_exceeded());
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
