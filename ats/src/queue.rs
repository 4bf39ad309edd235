//! Queue notifications (`proxy_on_queue_ready`) for the VM copies of one Traffic Server thread,
//! delivered on that thread, as Envoy posts them to the registering worker's dispatcher.
//!
//! An item may be enqueued from any thread (another net thread's transaction, a singleton
//! service's thread). The copies of each thread carry a wake-up ([`wake_for_this_thread`]) that
//! schedules a delivery on the thread (`TSContScheduleOnThread`) unless one is already
//! scheduled; the delivery hands every notification pending in the thread's copies to the
//! plugins, then acts on what they asked for their held transactions, as a timer tick does.
//!
//! Each delivery is a continuation of its own, with a mutex of its own, destroyed when it has
//! run: scheduling takes the continuation's mutex, which a long-lived continuation would hold
//! for a whole delivery, so a net thread enqueueing would wait for another thread's plugin
//! callbacks, and two threads enqueueing into each other's queues from their deliveries would
//! wait for each other for good.

use std::cell::{Cell, OnceCell};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use abi::QueueWake;

use crate::{diag, sys, with_thread, ThreadState};

/// How long to wait before trying again when the thread's state was busy (never expected: the
/// delivery runs from the event loop, not inside a hook).
const RETRY_MS: sys::TSHRTime = 10;

/// The delay of a delivery asked for from within a delivery (a plugin enqueueing from
/// `proxy_on_queue_ready`): Traffic Server runs immediate events of a thread until none is
/// left before it looks at the network again, so a plugin refilling its own queue would
/// otherwise hold its thread for good; a timed event lets the thread's I/O run in between.
const FROM_DELIVERY_MS: sys::TSHRTime = 1;

thread_local! {
    /// Whether a delivery is running on this thread.
    static DELIVERING: Cell<bool> = const { Cell::new(false) };
}

/// One thread's deliveries.
struct QueueTarget {
    thread: sys::TSEventThread,
    /// Whether a delivery is scheduled and has not started yet: enqueues meanwhile are
    /// delivered by it.
    scheduled: AtomicBool,
}

// SAFETY: the event thread is a Traffic Server handle that lives for the process; Traffic
// Server's scheduling calls take it from any thread known to it (the wake-up registers a foreign
// thread first), and the flag is atomic.
unsafe impl Send for QueueTarget {}
// SAFETY: as for `Send`: nothing in it is mutated but through the atomic flag.
unsafe impl Sync for QueueTarget {}

impl QueueTarget {
    /// Schedules a delivery in `delay_ms` unless one is scheduled already.
    fn wake(&'static self, delay_ms: sys::TSHRTime) {
        // Read-modify-write on both sides (here and in `on_queue_ready`): a wake-up that finds
        // a delivery scheduled has its item seen by that delivery, whose clearing swap reads
        // (and so synchronises with) this one.
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        if !crate::callout::ensure_traffic_server_thread() {
            self.scheduled.store(false, Ordering::Release);
            diag::error("a queue notification could not be scheduled from this thread");
            return;
        }
        let data: *const QueueTarget = self;
        // SAFETY: the handler is an `extern "C"` function for the life of the process; the new
        // continuation has a mutex of its own (no other thread ever takes it), its data is this
        // target, which lives for the process, and the handler destroys it after its one run.
        // This thread is known to Traffic Server (checked above); the event thread lives for
        // the process.
        unsafe {
            let cont = sys::TSContCreate(Some(on_queue_ready), sys::TSMutexCreate());
            sys::TSContDataSet(cont, data.cast_mut().cast());
            sys::TSContScheduleOnThread(cont, delay_ms, self.thread);
        }
    }
}

thread_local! {
    /// This Traffic Server thread's queue wake-up, made on first use.
    static WAKE: OnceCell<QueueWake> = const { OnceCell::new() };
}

/// The wake-up for the VM copies of the calling Traffic Server thread (made on first use): set on
/// every worker of the thread ([`lifecycle::Worker::on_queue_ready`]).
pub(crate) fn wake_for_this_thread() -> QueueWake {
    WAKE.with(|wake| {
        Arc::clone(wake.get_or_init(|| {
            // One per thread for the life of the process (threads are never destroyed).
            let target: &'static QueueTarget = Box::leak(Box::new(QueueTarget {
                // SAFETY: called on a Traffic Server event thread (a worker is made by a hook or
                // a scheduled event).
                thread: unsafe { sys::TSEventThreadSelf() },
                scheduled: AtomicBool::new(false),
            }));
            Arc::new(move || {
                let delay = if DELIVERING.with(Cell::get) {
                    FROM_DELIVERY_MS
                } else {
                    0
                };
                target.wake(delay)
            }) as QueueWake
        }))
    })
}

/// A delivery: hands the thread's pending notifications to the plugins, acts on what they
/// asked for their held transactions, and destroys its continuation.
unsafe extern "C" fn on_queue_ready(
    cont: sys::TSCont,
    _event: sys::TSEvent,
    _data: *mut c_void,
) -> c_int {
    // SAFETY: the data was set to a `QueueTarget` that lives for the process before the
    // continuation was scheduled.
    let target: &'static QueueTarget = unsafe { &*sys::TSContDataGet(cont).cast::<QueueTarget>() };
    DELIVERING.with(|delivering| delivering.set(true));
    let outcome = std::panic::catch_unwind(|| {
        // Cleared first: an item enqueued while this runs schedules another delivery.
        target.scheduled.swap(false, Ordering::AcqRel);
        match with_thread(deliver) {
            Some(pending) => crate::transaction::act_on(pending),
            None => target.wake(RETRY_MS),
        }
    });
    DELIVERING.with(|delivering| delivering.set(false));
    if outcome.is_err() {
        diag::error("a queue notification panicked");
    }
    // SAFETY: this continuation's one event has run; nothing else refers to it.
    unsafe { sys::TSContDestroy(cont) };
    0
}

/// Delivers the pending notifications of every copy of the thread; returns the transactions
/// the plugins continued, closed or answered meanwhile.
fn deliver(state: &mut ThreadState) -> Vec<crate::host::Holder> {
    let mut pending = Vec::new();
    state.workers.for_each_worker(|_, worker| {
        for (plugin, error) in worker.dispatch_queue_ready() {
            let name = worker.plugins().config(plugin).display_name().to_string();
            diag::error(&format!("{name}: proxy_on_queue_ready: {error}"));
        }
        worker.for_each_copy(|_, vm, _| crate::transaction::pending_in(vm, &mut pending));
    });
    // The plugins may have started or changed their timers meanwhile.
    state.ticker.note_all(&mut state.workers);
    pending
}
