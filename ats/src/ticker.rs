//! Timer ticks (`proxy_set_tick_period_milliseconds` → `proxy_on_tick`) for the VM copies of one
//! Traffic Server thread, delivered on that thread: one continuation per thread, scheduled
//! (`TSContScheduleOnThread`) for the earliest tick due among its copies' root contexts, and
//! nothing scheduled while no root context asked for ticks. The same continuation looks at the
//! transactions plugins hold while any is held: it ends those whose client reset its
//! connection and answers those held past the stream idle timeout.

use std::ffi::{c_int, c_void};
use std::time::{Duration, Instant};

use abi::ContextId;
use lifecycle::{CopyId, Generation};
use rustc_hash::FxHashMap;

use crate::socket::HELD_CLIENT_CHECK;
use crate::{diag, sys, with_thread, ThreadState};

/// The longest the ticker sleeps at once; what is due later (a stream idle timeout of years) is
/// looked at again then. Traffic Server adds the delay, in nanoseconds, to its clock: a huge one
/// overflows into the past, and the ticker would wake at once, again and again.
const LONGEST_SLEEP: Duration = Duration::from_secs(3600);

/// How early Traffic Server may run a scheduled event: one due within its nearest timer
/// bucket (5 ms) runs at once. A wake-up that early counts what is due by then as due, rather
/// than finding nothing due and going again.
const DUE_EARLY: Duration = Duration::from_millis(5);

/// The earlier of `current` (if any) and `due`.
pub(crate) fn earliest(current: Option<Instant>, due: Instant) -> Instant {
    current.map_or(due, |current| current.min(due))
}

/// One root context's timer.
struct Timer {
    period: Duration,
    due: Instant,
}

/// A thread's ticks.
pub(crate) struct Ticker {
    cont: sys::TSCont,
    thread: sys::TSEventThread,
    /// When the continuation is scheduled to run, and its action (to cancel it for an earlier
    /// tick).
    scheduled: Option<(Instant, sys::TSAction)>,
    /// By deployment, copy and root context (copy ids restart with each deployment's worker).
    timers: FxHashMap<(Generation, CopyId, u32), Timer>,
    /// When the transactions plugins hold are next to be looked at: the earliest of when a
    /// hold would pass the stream idle timeout and `clients_due`.
    hold_due: Option<Instant>,
    /// While a plugin holds a transaction in a hook: when its client's connection is next
    /// looked at (see [`crate::transaction::look_at_holds`]), [`HELD_CLIENT_CHECK`] after the
    /// last look, not at every wake-up (a plugin's ticks may wake the ticker far more often).
    clients_due: Option<Instant>,
}

impl Ticker {
    /// The ticker of the calling Traffic Server thread.
    pub(crate) fn for_this_thread() -> Ticker {
        // SAFETY: the handler is an `extern "C"` function for the life of the process; the
        // continuation gets its own mutex, as a scheduled continuation needs one.
        let cont = unsafe { sys::TSContCreate(Some(on_tick), sys::TSMutexCreate()) };
        Ticker {
            cont,
            // SAFETY: called on a Traffic Server event thread (a hook handler's).
            thread: unsafe { sys::TSEventThreadSelf() },
            scheduled: None,
            timers: FxHashMap::default(),
            hold_due: None,
            clients_due: None,
        }
    }

    /// Records root context `root`'s tick period in copy `copy` of deployment `generation` as
    /// the plugin set it (`None`: no ticks) and schedules the next tick if it is now the
    /// earliest.
    pub(crate) fn note(
        &mut self,
        generation: Generation,
        copy: CopyId,
        root: ContextId,
        period: Option<Duration>,
    ) {
        let key = (generation, copy, root.0);
        match period.filter(|p| !p.is_zero()) {
            Some(period) => {
                if self.timers.get(&key).is_some_and(|t| t.period == period) {
                    return;
                }
                self.timers.insert(
                    key,
                    Timer {
                        period,
                        due: Instant::now() + period,
                    },
                );
            }
            None => {
                if self.timers.remove(&key).is_none() {
                    return;
                }
            }
        }
        self.arm();
    }

    /// Records the tick periods of every root context of every copy on this thread (e.g. of
    /// services a new worker just started).
    pub(crate) fn note_all(&mut self, workers: &mut lifecycle::ThreadWorkers) {
        workers.for_each_worker(|generation, worker| {
            worker.for_each_copy(|copy, vm, roots| {
                for (_, root) in roots {
                    self.note(generation, copy, *root, vm.tick_period_of(*root));
                }
            });
        });
    }

    /// Schedules the continuation to run at once (without ticking what is not due), to pick up
    /// the held transactions and connections of a copy that failed outside their hooks.
    pub(crate) fn sweep_soon(&mut self) {
        self.schedule(Instant::now());
    }

    /// Has the continuation look at the held transactions by `due` (a hold began: its client
    /// is to be looked at, and later its stream idle timeout passes).
    pub(crate) fn look_at_holds_by(&mut self, due: Instant) {
        self.hold_due = Some(earliest(self.hold_due, due));
        self.schedule(due);
    }

    /// Schedules the continuation for the earliest tick or look at the held transactions due,
    /// unless it already runs by then.
    fn arm(&mut self) {
        let ticks = self.timers.values().map(|t| t.due);
        if let Some(earliest) = ticks.chain(self.hold_due).min() {
            self.schedule(earliest);
        }
    }

    /// Schedules the continuation to run at `earliest`, unless it already runs by then.
    fn schedule(&mut self, earliest: Instant) {
        if let Some((at, action)) = self.scheduled {
            if at <= earliest {
                return;
            }
            // SAFETY: the action was returned by the scheduling below and has not run (it
            // clears `scheduled` when it does).
            unsafe { sys::TSActionCancel(action) };
        }
        let now = Instant::now();
        let delay = earliest.saturating_duration_since(now).min(LONGEST_SLEEP);
        // Rounded up, as a wake-up before what is due finds nothing due (see `DUE_EARLY`).
        let delay_ms =
            sys::TSHRTime::try_from(delay.as_micros().div_ceil(1000)).unwrap_or(sys::TSHRTime::MAX);
        // SAFETY: the continuation and thread are this thread's, made in `for_this_thread`.
        let action = unsafe { sys::TSContScheduleOnThread(self.cont, delay_ms, self.thread) };
        self.scheduled = Some((now + delay, action));
    }
}

/// The tick continuation: ticks every root context that is due, looks at the transactions the
/// plugins hold (ending those whose client reset its connection, answering those held past
/// the stream idle timeout), then acts on what the plugins asked for their held transactions.
unsafe extern "C" fn on_tick(
    _cont: sys::TSCont,
    _event: sys::TSEvent,
    _data: *mut c_void,
) -> c_int {
    let outcome = std::panic::catch_unwind(|| {
        let pending = with_thread(tick_due).unwrap_or_default();
        crate::transaction::act_on(pending);
    });
    if outcome.is_err() {
        diag::error("a timer tick panicked");
    }
    0
}

/// Ticks the due root contexts of every copy of the thread; returns the transactions the
/// plugins continued, closed or answered meanwhile.
fn tick_due(state: &mut ThreadState) -> Vec<crate::host::Holder> {
    let ticker = &mut state.ticker;
    ticker.scheduled = None;
    let now = Instant::now();
    // What is due this soon counts as due now (see `DUE_EARLY`).
    let due_by = now + DUE_EARLY;
    // Each look finds the holds left and when the next of them would time out.
    ticker.hold_due = None;
    let hold_timeout = crate::stream_idle_timeout();
    let look_at_clients = ticker.clients_due.is_none_or(|due| due <= due_by);
    let mut held_in_hook = false;
    let look_at_holds = |vm: &mut abi::Vm,
                         hold_due: &mut Option<Instant>,
                         held_in_hook: &mut bool| {
        let holds = crate::transaction::look_at_holds(vm, due_by, hold_timeout, look_at_clients);
        if let Some(due) = holds.timeout_due {
            *hold_due = Some(earliest(*hold_due, due));
        }
        *held_in_hook |= holds.in_hook;
    };
    let mut pending = Vec::new();
    let mut seen = Vec::new();
    state.workers.for_each_worker(|generation, worker| {
        let mut failed = Vec::new();
        worker.for_each_copy(|copy, vm, roots| {
            for (plugin, root) in roots {
                let key = (generation, copy, root.0);
                seen.push(key);
                let Some(timer) = ticker.timers.get_mut(&key) else {
                    continue;
                };
                if timer.due > due_by || vm.is_failed() {
                    continue;
                }
                if let Err(error) = vm.tick_root(*root) {
                    diag::error(&format!("proxy_on_tick: {error}"));
                    failed.push((*plugin, error));
                }
                timer.due = now + timer.period;
            }
            for (_, root) in roots {
                // The plugin may have changed or stopped its period while ticking; a failed
                // VM ticks no more (its timer, kept, would be due at once, for ever: a spin).
                let period = vm
                    .tick_period_of(*root)
                    .filter(|p| !p.is_zero() && !vm.is_failed());
                let key = (generation, copy, root.0);
                match period {
                    Some(period) => {
                        if let Some(timer) = ticker.timers.get_mut(&key) {
                            if timer.period != period {
                                // A new period starts counting now, as `note` starts it.
                                *timer = Timer {
                                    period,
                                    due: now + period,
                                };
                            }
                        }
                    }
                    None => {
                        ticker.timers.remove(&key);
                    }
                }
            }
            look_at_holds(vm, &mut ticker.hold_due, &mut held_in_hook);
            crate::transaction::pending_in(vm, &mut pending);
        });
        // A copy replaced after it failed (a new transaction may come before this sweep)
        // still holds the transactions it held when it failed: they get its failure policy.
        worker.for_each_replaced_copy(|_, vm| {
            look_at_holds(vm, &mut ticker.hold_due, &mut held_in_hook);
            crate::transaction::pending_in(vm, &mut pending);
        });
        for (plugin, error) in failed {
            worker.root_failed(plugin, &error);
        }
    });
    ticker.clients_due = match (held_in_hook, look_at_clients) {
        (false, _) => None,
        (true, true) => Some(now + HELD_CLIENT_CHECK),
        (true, false) => ticker.clients_due,
    };
    if let Some(due) = ticker.clients_due {
        ticker.hold_due = Some(earliest(ticker.hold_due, due));
    }
    // Copies that went away (replaced or failed) tick no more.
    ticker.timers.retain(|key, _| seen.contains(key));
    ticker.arm();
    pending
}
