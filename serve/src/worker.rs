//! A worker thread's VM copies and timers.
//!
//! Pingora runs one single-threaded runtime per worker thread, so everything here is
//! thread-local: each listener's [`ThreadWorkers`] (its plugins' VM copies on this thread, made
//! on the thread's first stream for the listener) and a tick task per listener that delivers
//! `proxy_on_tick` to those copies.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi::ContextId;
use lifecycle::{CopyId, Generation, LivePlugins, ThreadWorkers, Worker};

use crate::admin::HostMetrics;
use crate::host::ServeHost;
use crate::routing::SharedRouting;

/// What every thread's copies of a listener's plugins share.
pub(crate) struct Listener {
    /// Its index: its workers' slot on each thread.
    pub(crate) index: usize,
    /// Its name, for metrics.
    pub(crate) name: String,
    /// The plugins in force.
    pub(crate) live: Arc<LivePlugins>,
    /// Where its traffic and its plugins' calls go (replaced by a reload).
    pub(crate) routing: SharedRouting,
    /// The proxy's own metrics.
    pub(crate) metrics: Arc<HostMetrics>,
}

thread_local! {
    /// This worker thread's VM copies, per listener.
    static WORKERS: RefCell<Vec<Option<ThreadWorkers>>> = const { RefCell::new(Vec::new()) };
}

/// How often a tick task looks for newly set tick periods when none is due sooner.
const IDLE_TICK_CHECK: Duration = Duration::from_millis(50);

/// Runs `work` with this thread's workers of `listener`, made on first use (with a tick task
/// on this thread's runtime). `None` if called re-entrantly, which the proxy never does.
pub(crate) fn with_workers<R>(
    listener: &Arc<Listener>,
    work: impl FnOnce(&mut ThreadWorkers) -> R,
) -> Option<R> {
    WORKERS.with(|cell| {
        let mut all = cell.try_borrow_mut().ok()?;
        if all.len() <= listener.index {
            all.resize_with(listener.index + 1, || None);
        }
        let workers = all[listener.index].get_or_insert_with(|| {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(tick_loop(Arc::clone(listener)));
            }
            let shared = Arc::clone(listener);
            ThreadWorkers::new(
                Arc::clone(&listener.live),
                Box::new(move |plugins| {
                    let shared = Arc::clone(&shared);
                    Worker::new(plugins, move || {
                        Box::new(ServeHost::new(Arc::clone(&shared)))
                    })
                }),
            )
        });
        Some(work(workers))
    })
}

/// Delivers `proxy_on_tick` to this thread's copies of `listener`'s plugins, each root
/// context at the period it set, for as long as the process runs.
async fn tick_loop(listener: Arc<Listener>) {
    let mut due: HashMap<(Generation, CopyId, ContextId), (Instant, Duration)> = HashMap::new();
    loop {
        let now = Instant::now();
        let mut seen = Vec::new();
        with_workers(&listener, |workers| {
            // A thread without traffic lets go of replaced plugins here.
            workers.refresh();
            workers.for_each_worker(|generation, worker| {
                worker.for_each_copy(|copy, vm, roots| {
                    for &(_, root) in roots {
                        let key = (generation, copy, root);
                        let period = vm.tick_period_of(root).filter(|p| !p.is_zero());
                        let Some(period) = period else {
                            due.remove(&key);
                            continue;
                        };
                        seen.push(key);
                        let entry = due.entry(key).or_insert((now + period, period));
                        if entry.1 != period {
                            // A new period starts counting now.
                            *entry = (now + period, period);
                        }
                        if entry.0 <= now && !vm.is_failed() {
                            if let Err(error) = vm.tick_root(root) {
                                tracing::error!("proxy_on_tick failed: {error}");
                                if let Some(host) = vm.host_as::<ServeHost>() {
                                    host.wake_all();
                                }
                            }
                            entry.0 = now + period;
                        }
                    }
                });
            });
        });
        // Copies that went away (replaced or failed) tick no more.
        due.retain(|key, _| seen.contains(key));
        let next = due
            .values()
            .map(|(at, _)| at.saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(IDLE_TICK_CHECK)
            .min(IDLE_TICK_CHECK);
        tokio::time::sleep(next).await;
    }
}
