//! A worker thread's VM copies and timers.
//!
//! Pingora runs one single-threaded runtime per worker thread, so everything here is
//! thread-local: each listener's [`ThreadWorkers`] (its plugins' VM copies on this thread, made
//! on the thread's first stream for the listener), a tick task per listener that delivers
//! `proxy_on_tick` to those copies, and a queue task that delivers `proxy_on_queue_ready` to
//! them when an item is enqueued (from any thread) into a queue one of them registered. A
//! listener a reload removed or started anew is retired: each thread lets go of its copies, and
//! its two tasks end, once the thread's last stream of it ended.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi::{ContextId, QueueWake};
use lifecycle::{CopyId, Generation, LivePlugins, PluginId, ThreadWorkers, Worker};
use rustc_hash::FxHashMap;
use tokio::sync::Notify;

use crate::admin::HostMetrics;
use crate::host::ServeHost;
use crate::routing::SharedRouting;

/// What every thread's copies of a listener's plugins share.
pub(crate) struct Listener {
    /// Its slot: its workers' place on each thread, and its routes' in the routing. A listener
    /// keeps its slot for its life; no other listener ever has it.
    pub(crate) index: usize,
    /// Whose copies these are, for metrics: `listener/NAME`, or `services` for the copies of
    /// the services without `singleton`.
    pub(crate) owner: String,
    /// The plugins in force.
    pub(crate) live: Arc<LivePlugins>,
    /// Where its traffic and its plugins' calls go (replaced by a reload).
    pub(crate) routing: SharedRouting,
    /// The proxy's own metrics.
    pub(crate) metrics: Arc<HostMetrics>,
    /// A reload removed the listener or replaced it by a new one: no new connection comes.
    pub(crate) retired: AtomicBool,
}

impl Listener {
    /// A listener in slot `index`, its copies counted under `owner`.
    pub(crate) fn new(
        index: usize,
        owner: String,
        live: Arc<LivePlugins>,
        routing: SharedRouting,
        metrics: Arc<HostMetrics>,
    ) -> Listener {
        Listener {
            index,
            owner,
            live,
            routing,
            metrics,
            retired: AtomicBool::new(false),
        }
    }

    /// Retires the listener: see [`Listener::retired`].
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }
}

/// A thread's workers of one listener, and how to wake their queue task.
struct ThreadEntry {
    workers: ThreadWorkers,
    queue_ready: Arc<Notify>,
}

thread_local! {
    /// This worker thread's VM copies, by listener slot.
    static WORKERS: RefCell<FxHashMap<usize, ThreadEntry>> = RefCell::default();
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
        let entry = all.entry(listener.index).or_insert_with(|| {
            let queue_ready = Arc::new(Notify::new());
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(tick_loop(Arc::clone(listener)));
                runtime.spawn(queue_loop(Arc::clone(listener), Arc::clone(&queue_ready)));
            }
            let wake = Arc::clone(&queue_ready);
            let wake: QueueWake = Arc::new(move || wake.notify_one());
            let shared = Arc::clone(listener);
            let workers = ThreadWorkers::new(
                Arc::clone(&listener.live),
                Box::new(move |plugins| {
                    let shared = Arc::clone(&shared);
                    Worker::new(plugins, move || {
                        Box::new(ServeHost::new(Arc::clone(&shared)))
                    })
                    .on_queue_ready(Arc::clone(&wake))
                }),
            );
            ThreadEntry {
                workers,
                queue_ready,
            }
        });
        Some(work(&mut entry.workers))
    })
}

/// As [`with_workers`], with this thread's workers of `listener` only if it has them (`None`
/// if not, or if called re-entrantly).
pub(crate) fn with_existing_workers<R>(
    listener: &Listener,
    work: impl FnOnce(&mut ThreadWorkers) -> R,
) -> Option<R> {
    WORKERS.with(|cell| {
        let mut all = cell.try_borrow_mut().ok()?;
        let entry = all.get_mut(&listener.index)?;
        Some(work(&mut entry.workers))
    })
}

/// Lets go of this thread's workers of a retired listener once none of its streams is in
/// flight here. Returns whether the thread has none left (the listener's tasks end then).
fn let_go_if_retired(listener: &Listener) -> bool {
    if !listener.retired.load(Ordering::Relaxed) {
        return false;
    }
    let taken = WORKERS.with(|cell| {
        let mut all = cell.try_borrow_mut().ok()?;
        if all.get(&listener.index)?.workers.in_flight() > 0 {
            return Some(None);
        }
        Some(all.remove(&listener.index))
    });
    match taken {
        // Dropped outside the borrow: a copy's drop may reach this thread's workers.
        Some(Some(entry)) => {
            entry.queue_ready.notify_one();
            drop(entry);
            true
        }
        Some(None) => false,
        None => true,
    }
}

/// Delivers `proxy_on_tick` to this thread's copies of `listener`'s plugins, each root
/// context at the period it set, until the thread lets go of them (the listener retired).
async fn tick_loop(listener: Arc<Listener>) {
    let mut due: HashMap<(Generation, CopyId, ContextId), (Instant, Duration)> = HashMap::new();
    loop {
        if let_go_if_retired(&listener) {
            return;
        }
        let now = Instant::now();
        let mut seen = Vec::new();
        let ticked = with_existing_workers(&listener, |workers| {
            // A thread without traffic lets go of replaced plugins here.
            workers.refresh();
            workers.for_each_worker(|generation, worker| {
                let mut failed = Vec::new();
                worker.for_each_copy(|copy, vm, roots| {
                    for &(plugin, root) in roots {
                        let key = (generation, copy, root);
                        // A failed VM ticks no more: its entry, never due again, would make this
                        // loop spin.
                        let period = vm
                            .tick_period_of(root)
                            .filter(|p| !p.is_zero() && !vm.is_failed());
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
                                failed.push((plugin, error));
                            }
                            entry.0 = now + period;
                        }
                    }
                });
                for (plugin, error) in failed {
                    worker.root_failed(plugin, &error);
                }
            });
        });
        if ticked.is_none() {
            // The thread let go of the listener's copies.
            return;
        }
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

/// Delivers `proxy_on_queue_ready` to this thread's copies of `listener`'s plugins each time
/// `queue_ready` is notified (an enqueue on any thread into a queue they registered), as Envoy
/// posts it to the registering worker's dispatcher.
async fn queue_loop(listener: Arc<Listener>, queue_ready: Arc<Notify>) {
    loop {
        queue_ready.notified().await;
        let ours = WORKERS.with(|cell| {
            cell.try_borrow().is_ok_and(|all| {
                all.get(&listener.index)
                    .is_some_and(|entry| Arc::ptr_eq(&entry.queue_ready, &queue_ready))
            })
        });
        if !ours {
            // The thread let go of the copies this task served.
            return;
        }
        with_existing_workers(&listener, |workers| {
            workers.for_each_worker(|_, worker| {
                let failures = worker.dispatch_queue_ready();
                for (plugin, error) in &failures {
                    let name = worker.plugins().config(*plugin).display_name().to_string();
                    tracing::error!("{name}: proxy_on_queue_ready failed: {error}");
                }
            });
        });
        // A plugin that enqueues again from `proxy_on_queue_ready` notifies again at once, and
        // tokio's `Notify` does not count against the task's budget: yield, so that the
        // thread's streams and ticks run between rounds.
        tokio::task::yield_now().await;
    }
}

/// Starts the services without `singleton` of `view` (their plugins) on `workers` threads of
/// their own, one VM copy per thread as Envoy has one per worker: each thread runs an event loop
/// like a listener's worker thread, which ticks the copies, delivers their queue notifications
/// and answers their calls, for as long as the process runs. A copy that does not start is
/// logged (its failure policy applies as for any copy) and its thread serves on.
pub(crate) fn start_service_workers(workers: usize, view: &Arc<Listener>, services: &[PluginId]) {
    for index in 0..workers.max(1) {
        let view = Arc::clone(view);
        let services = services.to_vec();
        let spawned = std::thread::Builder::new()
            .name(format!("wasm-services-{index}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::error!("no runtime for the services of worker {index}: {error}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    with_workers(&view, |workers| {
                        let (_, worker) = workers.current();
                        for &service in &services {
                            if let Err(failure) = worker.start(service) {
                                tracing::error!(
                                    "service {} did not start on worker {index}: {failure}",
                                    worker.plugins().config(service).display_name()
                                );
                            }
                        }
                    });
                    std::future::pending::<()>().await
                });
            });
        if let Err(error) = spawned {
            tracing::error!("cannot start a thread for the services of worker {index}: {error}");
        }
    }
}
