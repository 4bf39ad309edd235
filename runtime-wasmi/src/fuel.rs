//! Call deadlines and interruption through slices of fuel.
//!
//! wasmi offers nothing that stops a running guest from outside; the one hook into a running
//! guest is fuel. With a deadline or interruption configured, fuel metering is on and every call
//! runs on a slice of fuel. When the slice runs out, wasmi suspends the call (a resumable call)
//! and the host looks at the interrupt flag and the clock: it then either gives the call another
//! slice and resumes it, or drops it with a trap. The store stays usable either way.
//!
//! A slice is sized to take about [`SLICE_TARGET`] (less for short deadlines), so the clock is
//! read about a thousand times a second however fast the guest burns fuel; the size adapts to
//! what the guest does (host functions take time but no fuel). A deadline overshoots by at most
//! about one slice, and an interrupt takes effect within about one slice.
//!
//! Slices also keep builds with debug assertions from overflowing the native stack: see
//! [`BOUNDED_NATIVE_STACK`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime_api::{InterruptHandle, RuntimeConfig, Trap};

/// How long one slice of fuel should last.
const SLICE_TARGET: Duration = Duration::from_millis(1);

/// The shortest slice, so that a short deadline does not make the guest stop every few
/// instructions.
const MIN_SLICE_TARGET: Duration = Duration::from_micros(50);

/// Roughly how much fuel (about one unit per Wasm operator) an optimized wasmi burns per
/// millisecond on integer code: 1.7 to 2.9 million on the 2-core x86-64 build machine. Only the
/// first slice and the start function's budget use this estimate; later slices are sized from
/// measured time.
const FUEL_PER_MILLISECOND: u64 = 2_000_000;

/// Bounds of the adaptive slice size.
const MIN_SLICE_FUEL: u64 = 1_000;
const MAX_SLICE_FUEL: u64 = 1 << 32;

/// Whether this build must bound how many instructions a call runs between returns to the host.
///
/// wasmi runs instructions by tail calls from one handler to the next, relying on LLVM's
/// sibling-call optimization (it enables that dispatch when wasmi is optimized). With debug
/// assertions on, as in this workspace's dev profile (dependencies optimized, debug assertions
/// kept), the optimization does not happen: every executed instruction keeps a native stack
/// frame until the call returns or runs out of fuel, and a guest loop overflows the thread's
/// stack, which aborts the process. Such builds therefore always meter fuel, in slices of at
/// most [`BOUNDED_SLICE_FUEL`] (wasmi unwinds its handlers whenever a slice runs out), and run
/// start functions, which cannot be sliced, on a thread with a large stack.
pub(crate) const BOUNDED_NATIVE_STACK: bool = cfg!(debug_assertions);

/// The largest slice when the native stack must be bounded. Measured: a 2 MiB stack holds the
/// frames of 30 000 but not 100 000 units of fuel (20 to 70 bytes a unit). Every nested call
/// (see [`crate::instance::MAX_NESTED_CALLS`]) may hold a slice's frames on the stack.
const BOUNDED_SLICE_FUEL: u64 = 1024;

/// The stack of the thread that runs start functions when the native stack must be bounded, and
/// the start function's fuel then (at most about 70 bytes of stack per unit).
pub(crate) const BOUNDED_START_STACK_BYTES: usize = 256 << 20;
const BOUNDED_START_FUEL: u64 = 1_000_000;

/// What the configuration asks of fuel, shared by every store of a runtime.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FuelPolicy {
    deadline: Option<Duration>,
    slice_target: Duration,
    max_slice: u64,
    /// Instances give out interrupt handles (a deadline or interruption was asked for).
    interruptible: bool,
}

impl FuelPolicy {
    /// The policy for `config`, or `None` when neither a deadline nor interruption is asked for
    /// (fuel metering then stays off and costs nothing) and the native stack needs no bound.
    pub(crate) fn for_config(config: &RuntimeConfig) -> Option<Self> {
        let interruptible = config.call_deadline.is_some() || config.interruptible;
        if !interruptible && !BOUNDED_NATIVE_STACK {
            return None;
        }
        let slice_target = match config.call_deadline {
            // Ten slices per deadline bound the overshoot at about 10%.
            Some(deadline) => (deadline / 10).clamp(MIN_SLICE_TARGET, SLICE_TARGET),
            None => SLICE_TARGET,
        };
        let max_slice = if BOUNDED_NATIVE_STACK {
            BOUNDED_SLICE_FUEL
        } else {
            MAX_SLICE_FUEL
        };
        Some(FuelPolicy {
            deadline: config.call_deadline,
            slice_target,
            max_slice,
            interruptible,
        })
    }

    /// Whether instances give out interrupt handles.
    pub(crate) fn interruptible(&self) -> bool {
        self.interruptible
    }

    /// The fuel a start function may use. wasmi runs it inside instantiation, where calls cannot
    /// be suspended, so the deadline becomes a fixed budget; without a deadline it is unlimited.
    pub(crate) fn start_fuel(&self) -> u64 {
        let budget = match self.deadline {
            Some(deadline) => {
                let millis = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
                millis
                    .saturating_mul(FUEL_PER_MILLISECOND)
                    .max(MIN_SLICE_FUEL)
            }
            None => u64::MAX,
        };
        if BOUNDED_NATIVE_STACK {
            budget.min(BOUNDED_START_FUEL)
        } else {
            budget
        }
    }

    fn initial_slice(&self) -> u64 {
        let nanos = u64::try_from(self.slice_target.as_nanos()).unwrap_or(u64::MAX);
        (nanos.saturating_mul(FUEL_PER_MILLISECOND) / 1_000_000)
            .clamp(MIN_SLICE_FUEL, self.max_slice)
    }
}

/// One store's fuel bookkeeping.
pub(crate) struct FuelSlices {
    policy: FuelPolicy,
    /// The fuel of the next slice, adapted to how fast the guest burns it.
    slice: u64,
    /// When the current top-level call must stop.
    deadline_at: Option<Instant>,
    /// When the current slice began, if known.
    slice_started: Option<Instant>,
    interrupted: Arc<AtomicBool>,
}

impl FuelSlices {
    pub(crate) fn new(policy: FuelPolicy) -> Self {
        FuelSlices {
            policy,
            slice: policy.initial_slice(),
            deadline_at: None,
            slice_started: None,
            interrupted: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A handle that raises this store's interrupt flag.
    pub(crate) fn interrupt_handle(&self) -> Arc<dyn InterruptHandle> {
        Arc::new(WasmiInterruptHandle {
            interrupted: self.interrupted.clone(),
        })
    }

    /// Starts a top-level call: checks for a pending interrupt, starts the deadline clock and
    /// returns the fuel of the first slice.
    #[inline]
    pub(crate) fn begin_call(&mut self) -> Result<u64, Trap> {
        self.take_interrupt()?;
        match self.policy.deadline {
            Some(deadline) => {
                let now = Instant::now();
                // A deadline too far away to represent is no deadline.
                self.deadline_at = now.checked_add(deadline);
                self.slice_started = Some(now);
            }
            None => self.slice_started = None,
        }
        Ok(self.slice)
    }

    /// Called when a slice runs out: stops the call if it was interrupted or ran past its
    /// deadline, otherwise returns the fuel of the next slice (at least `required`, what the
    /// suspended instruction needs to proceed).
    pub(crate) fn next_slice(&mut self, required: u64) -> Result<u64, Trap> {
        self.take_interrupt()?;
        let now = Instant::now();
        if self.deadline_at.is_some_and(|at| now >= at) {
            return Err(Trap::deadline_exceeded());
        }
        if let Some(started) = self.slice_started {
            let took = now.saturating_duration_since(started).as_nanos().max(1);
            let target = self.policy.slice_target.as_nanos();
            let scaled = u128::from(self.slice).saturating_mul(target) / took;
            // Grow at most fourfold per slice, so that one fast slice (a guest that happened to
            // run in cache) does not make the next one overshoot a lot.
            let scaled = u64::try_from(scaled)
                .unwrap_or(u64::MAX)
                .min(self.slice.saturating_mul(4));
            self.slice = scaled.clamp(MIN_SLICE_FUEL, self.policy.max_slice);
        }
        self.slice_started = Some(now);
        Ok(self.slice.max(required))
    }

    #[inline]
    fn take_interrupt(&self) -> Result<(), Trap> {
        // A plain load first: the flag is almost never set, and a swap is a locked instruction.
        if self.interrupted.load(Ordering::Relaxed)
            && self.interrupted.swap(false, Ordering::AcqRel)
        {
            return Err(Trap::interrupted());
        }
        Ok(())
    }
}

/// Raises one store's interrupt flag; the store notices when its current slice of fuel runs out,
/// or at the start of its next call.
struct WasmiInterruptHandle {
    interrupted: Arc<AtomicBool>,
}

impl InterruptHandle for WasmiInterruptHandle {
    fn interrupt(&self) {
        self.interrupted.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime_api::TrapKind;

    fn policy(deadline_ms: Option<u64>, interruptible: bool) -> Option<FuelPolicy> {
        FuelPolicy::for_config(&RuntimeConfig {
            call_deadline: deadline_ms.map(Duration::from_millis),
            interruptible,
            ..RuntimeConfig::default()
        })
    }

    #[test]
    fn fuel_is_off_unless_a_deadline_interruption_or_the_stack_bound_needs_it() {
        assert_eq!(policy(None, false).is_some(), BOUNDED_NATIVE_STACK);
        assert!(policy(Some(10), false).unwrap().interruptible());
        assert!(policy(None, true).unwrap().interruptible());
    }

    #[test]
    fn the_start_function_budget_follows_the_deadline() {
        let cap = if BOUNDED_NATIVE_STACK {
            BOUNDED_START_FUEL
        } else {
            u64::MAX
        };
        let unlimited = policy(None, true).unwrap();
        assert_eq!(unlimited.start_fuel(), cap);
        let limited = policy(Some(10), false).unwrap();
        assert_eq!(limited.start_fuel(), (10 * FUEL_PER_MILLISECOND).min(cap));
    }

    #[test]
    fn slices_adapt_but_stay_within_their_bounds() {
        let policy = policy(Some(1000), false).unwrap();
        let mut slices = FuelSlices::new(policy);
        slices.begin_call().unwrap();
        for _ in 0..10 {
            let slice = slices.next_slice(0).unwrap();
            assert!((MIN_SLICE_FUEL..=policy.max_slice).contains(&slice));
        }
    }

    #[test]
    fn a_pending_interrupt_stops_the_next_call_once() {
        let mut slices = FuelSlices::new(policy(None, true).unwrap());
        slices.interrupt_handle().interrupt();
        assert_eq!(slices.begin_call().unwrap_err().kind, TrapKind::Interrupted);
        assert!(slices.begin_call().is_ok());
    }

    #[test]
    fn a_passed_deadline_stops_at_the_next_slice() {
        let mut slices = FuelSlices::new(policy(Some(0), false).unwrap());
        slices.begin_call().unwrap();
        assert_eq!(
            slices.next_slice(0).unwrap_err().kind,
            TrapKind::DeadlineExceeded
        );
    }

    #[test]
    fn a_slice_covers_what_the_suspended_instruction_needs() {
        let mut slices = FuelSlices::new(policy(None, true).unwrap());
        slices.begin_call().unwrap();
        assert_eq!(slices.next_slice(u64::MAX).unwrap(), u64::MAX);
    }
}
