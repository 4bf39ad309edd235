//! Starting every transaction thread's VM copies ahead of traffic, so that services without
//! `singleton` run on every thread from the start, as Envoy starts them on every worker.
//!
//! Traffic Server 9.2 has no call that runs a continuation on each thread of a pool; it assigns
//! a continuation scheduled on the net pool to the next thread in turn. So one continuation per
//! net thread is scheduled there, and one that lands on a thread already started tries again,
//! a bounded number of times in all. A thread these miss still starts its copies with its first
//! transaction or timer tick.

use std::collections::HashSet;
use std::ffi::{c_int, c_void, CStr};
use std::sync::Mutex;

use crate::{diag, sys, with_thread};

/// What the continuations of one warm-up share.
struct WarmUp {
    /// The threads started so far (by their `TSEventThread`, as an address).
    started: HashSet<usize>,
    /// How many net threads Traffic Server runs.
    wanted: usize,
    /// Reschedules left for continuations that landed on a started thread.
    retries: usize,
}

static WARM_UP: Mutex<Option<WarmUp>> = Mutex::new(None);

/// Starts this plugin's state (and so the VM copies and services of the plugins in force) on
/// every net thread, from those threads.
pub(crate) fn every_net_thread() {
    let wanted = net_threads();
    {
        let mut warm_up = WARM_UP.lock().unwrap_or_else(|e| e.into_inner());
        *warm_up = Some(WarmUp {
            started: HashSet::new(),
            wanted,
            retries: wanted * 4,
        });
    }
    for _ in 0..wanted {
        // SAFETY: the handler is an `extern "C"` function for the life of the process; a
        // continuation scheduled on a pool needs a mutex of its own; the continuation destroys
        // itself when it is done.
        unsafe {
            let cont = sys::TSContCreate(Some(on_thread), sys::TSMutexCreate());
            sys::TSContScheduleOnPool(cont, 0, sys::TS_THREAD_POOL_NET);
        }
    }
}

/// The number of net threads, as Traffic Server 9.2 works it out from `records.config`:
/// `proxy.config.exec_thread.limit`, or the processors times
/// `proxy.config.exec_thread.autoconfig.scale` when `autoconfig` is on (its default).
fn net_threads() -> usize {
    let int = |name: &CStr| {
        let mut value: sys::TSMgmtInt = 0;
        // SAFETY: `name` is a C string and `value` a place for the answer.
        (unsafe { sys::TSMgmtIntGet(name.as_ptr(), &mut value) } == sys::TS_SUCCESS)
            .then_some(value)
    };
    let float = |name: &CStr| {
        let mut value: sys::TSMgmtFloat = 0.0;
        // SAFETY: as above.
        (unsafe { sys::TSMgmtFloatGet(name.as_ptr(), &mut value) } == sys::TS_SUCCESS)
            .then_some(value)
    };
    let threads = if int(c"proxy.config.exec_thread.autoconfig").unwrap_or(1) != 0 {
        let processors = std::thread::available_parallelism().map_or(1, |n| n.get());
        let scale = float(c"proxy.config.exec_thread.autoconfig.scale").unwrap_or(1.0);
        (processors as f64 * f64::from(scale)) as usize
    } else {
        int(c"proxy.config.exec_thread.limit").map_or(1, |limit| limit.max(1) as usize)
    };
    // Bounded whatever the configuration says: each thread gets one continuation.
    threads.clamp(1, 1024)
}

/// One warm-up continuation, on the net thread Traffic Server gave it.
unsafe extern "C" fn on_thread(cont: sys::TSCont, _event: sys::TSEvent, _: *mut c_void) -> c_int {
    let again = std::panic::catch_unwind(|| {
        with_thread(|_| ());
        // SAFETY: a continuation's handler runs on an event thread.
        let thread = unsafe { sys::TSEventThreadSelf() } as usize;
        let mut warm_up = WARM_UP.lock().unwrap_or_else(|e| e.into_inner());
        let Some(warm_up) = warm_up.as_mut() else {
            return false;
        };
        let new = warm_up.started.insert(thread);
        if !new && warm_up.started.len() < warm_up.wanted && warm_up.retries > 0 {
            warm_up.retries -= 1;
            return true;
        }
        false
    })
    .unwrap_or_else(|_| {
        diag::error("starting a thread's VM copies panicked");
        false
    });
    if again {
        // SAFETY: the continuation is ours, not scheduled elsewhere (it is running now).
        unsafe { sys::TSContScheduleOnPool(cont, 1, sys::TS_THREAD_POOL_NET) };
    } else {
        // SAFETY: as above; nothing refers to it after this.
        unsafe { sys::TSContDestroy(cont) };
    }
    0
}
