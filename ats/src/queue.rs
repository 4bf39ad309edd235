//! Queue notifications (`proxy_on_queue_ready`) for the VM copies of one Traffic Server thread,
//! delivered on that thread, as Envoy posts them to the registering worker's dispatcher.
//!
//! An item may be enqueued from any thread (another net thread's transaction, a singleton
//! service's thread). The copies of each thread carry a wake-up ([`wake_for_this_thread`]) that
//! schedules the thread's one queue continuation (`TSContScheduleOnThread`) unless it is already
//! scheduled; the continuation delivers every notification pending in the thread's copies, then
//! acts on what the plugins asked for their held transactions, as a timer tick does.

use std::cell::OnceCell;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use abi::QueueWake;

use crate::{diag, sys, with_thread, ThreadState};

/// How long to wait before trying again when the thread's state was busy (never expected: the
/// continuation runs from the event loop, not inside a hook).
const RETRY_MS: sys::TSHRTime = 10;

/// One thread's queue continuation.
struct QueueTarget {
    cont: sys::TSCont,
    thread: sys::TSEventThread,
    /// Whether the continuation is scheduled and has not started delivering yet: enqueues
    /// meanwhile are delivered by that run.
    scheduled: AtomicBool,
}

// SAFETY: the continuation and the event thread are Traffic Server handles that live for the
// process (never destroyed); Traffic Server's scheduling calls take them from any thread known to
// it (the wake-up registers a foreign thread first), and the flag is atomic.
unsafe impl Send for QueueTarget {}
// SAFETY: as for `Send`: nothing in it is mutated but through the atomic flag.
unsafe impl Sync for QueueTarget {}

impl QueueTarget {
    /// Schedules the continuation now unless it already is.
    fn wake(&self) {
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        if !crate::callout::ensure_traffic_server_thread() {
            self.scheduled.store(false, Ordering::Release);
            diag::error("a queue notification could not be scheduled from this thread");
            return;
        }
        // SAFETY: the continuation and thread live for the process; this thread is known to
        // Traffic Server (checked above).
        unsafe { sys::TSContScheduleOnThread(self.cont, 0, self.thread) };
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
            // SAFETY: the handler is an `extern "C"` function for the life of the process; the
            // continuation gets its own mutex, as a scheduled continuation needs one; called on a
            // Traffic Server event thread (a worker is made by a hook or a scheduled event).
            let target = unsafe {
                let cont = sys::TSContCreate(Some(on_queue_ready), sys::TSMutexCreate());
                Arc::new(QueueTarget {
                    cont,
                    thread: sys::TSEventThreadSelf(),
                    scheduled: AtomicBool::new(false),
                })
            };
            // SAFETY: the continuation's data is the target, kept alive for the process by the
            // reference leaked here (the continuation is never destroyed).
            unsafe { sys::TSContDataSet(target.cont, Arc::into_raw(Arc::clone(&target)) as _) };
            Arc::new(move || target.wake()) as QueueWake
        }))
    })
}

/// The queue continuation: delivers the thread's pending notifications, then acts on what the
/// plugins asked for their held transactions.
unsafe extern "C" fn on_queue_ready(
    cont: sys::TSCont,
    _event: sys::TSEvent,
    _data: *mut c_void,
) -> c_int {
    let outcome = std::panic::catch_unwind(|| {
        // SAFETY: the data was set to a leaked `Arc<QueueTarget>` when the continuation was
        // made, and is never released.
        let target = unsafe { &*sys::TSContDataGet(cont).cast::<QueueTarget>() };
        // Cleared first: an item enqueued while this runs schedules another run.
        target.scheduled.store(false, Ordering::Release);
        match with_thread(deliver) {
            Some(pending) => crate::transaction::act_on(pending),
            None => target.wake_later(),
        }
    });
    if outcome.is_err() {
        diag::error("a queue notification panicked");
    }
    0
}

impl QueueTarget {
    /// Schedules the continuation again shortly.
    fn wake_later(&self) {
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            // SAFETY: as in `wake`; called on the target's own thread.
            unsafe { sys::TSContScheduleOnThread(self.cont, RETRY_MS, self.thread) };
        }
    }
}

/// Delivers the pending notifications of every copy of the thread; returns the transactions
/// the plugins continued, closed or answered meanwhile.
fn deliver(state: &mut ThreadState) -> Vec<sys::TSCont> {
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
