//! Configuration updates while traffic flows: new streams go to the new plugins, each in new VM
//! copies, while streams in flight finish on the copies they started in; the old copies go
//! away with their last stream, as Envoy drains a filter chain replaced by a listener update.
//!
//! The embedder publishes deployments through one [`LivePlugins`], and each worker thread keeps
//! a [`ThreadWorkers`]: per stream, it asks [`ThreadWorkers::for_new_stream`] for the worker to
//! admit the stream's plugins on (one atomic load when nothing changed), keeps the returned
//! [`Generation`] with the stream, and after releasing the stream's holds calls
//! [`ThreadWorkers::stream_ended`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{Plugins, Worker};

/// Which deployment of a [`LivePlugins`] a stream runs in: 0 for the first, one more with
/// every replacement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

/// The plugins in force, replaceable while worker threads serve streams.
pub struct LivePlugins {
    current: Mutex<Arc<Plugins>>,
    /// The number of the deployment in `current`; read without the lock on every stream.
    generation: AtomicU64,
}

impl LivePlugins {
    /// `plugins` as deployment 0.
    pub fn new(plugins: Plugins) -> LivePlugins {
        LivePlugins::new_shared(Arc::new(plugins))
    }

    /// As [`LivePlugins::new`], for plugins already shared, e.g. with the singleton services
    /// started for them.
    pub fn new_shared(plugins: Arc<Plugins>) -> LivePlugins {
        LivePlugins {
            current: Mutex::new(plugins),
            generation: AtomicU64::new(0),
        }
    }

    /// Puts `plugins` in force: streams that start from now on run in them. Returns the new
    /// deployment's number.
    pub fn replace(&self, plugins: Plugins) -> Generation {
        self.replace_shared(Arc::new(plugins))
    }

    /// As [`LivePlugins::replace`], for plugins already shared, e.g. with the singleton services
    /// started for them before they were put in force.
    pub fn replace_shared(&self, plugins: Arc<Plugins>) -> Generation {
        // A poisoned lock means a replacement panicked; the value in it is still whole.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        *current = plugins;
        let next = self.generation.load(Ordering::Relaxed) + 1;
        // Published while the lock is held, so a reader seeing `next` finds these plugins.
        self.generation.store(next, Ordering::Release);
        Generation(next)
    }

    /// The plugins in force and their deployment number.
    pub fn current(&self) -> (Generation, Arc<Plugins>) {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        (
            Generation(self.generation.load(Ordering::Acquire)),
            Arc::clone(&current),
        )
    }

    /// The number of the deployment in force.
    pub fn deployment(&self) -> Generation {
        Generation(self.generation.load(Ordering::Acquire))
    }
}

/// Makes a worker for a deployment's plugins on the thread (with its hosts, clock and hooks).
pub type WorkerFactory = Box<dyn FnMut(Arc<Plugins>) -> Worker + Send>;

/// A worker and how many streams that started on it have not ended.
struct Tenure {
    generation: Generation,
    worker: Worker,
    streams: usize,
}

/// One worker thread's workers: the one of the deployment in force, and older ones until their
/// last stream ends.
///
/// Streams are counted here, from [`ThreadWorkers::for_new_stream`] to
/// [`ThreadWorkers::stream_ended`], whatever they hold: a stream that was failed open or closed,
/// or that admits its plugins later, keeps its worker too.
pub struct ThreadWorkers {
    live: Arc<LivePlugins>,
    make: WorkerFactory,
    current: Tenure,
    /// Replaced workers whose streams are still in flight.
    draining: Vec<Tenure>,
}

impl ThreadWorkers {
    /// A thread's workers for the plugins `live` has in force, each made by `make`.
    pub fn new(live: Arc<LivePlugins>, mut make: WorkerFactory) -> ThreadWorkers {
        let (generation, plugins) = live.current();
        let worker = make(plugins);
        ThreadWorkers {
            live,
            make,
            current: Tenure {
                generation,
                worker,
                streams: 0,
            },
            draining: Vec::new(),
        }
    }

    /// The worker a new stream runs on, and its deployment's generation to keep with the
    /// stream: the deployment in force (the thread switches to it now if it was replaced).
    /// Every call starts a stream: end it with [`ThreadWorkers::stream_ended`].
    pub fn for_new_stream(&mut self) -> (Generation, &mut Worker) {
        self.refresh();
        self.current.streams += 1;
        (self.current.generation, &mut self.current.worker)
    }

    /// Switches to the deployment in force if it was replaced: the replaced worker goes away
    /// now if no stream of it is in flight, else with its last stream. Called by
    /// [`ThreadWorkers::for_new_stream`] and [`ThreadWorkers::current`]; a thread without
    /// traffic calls it on its timer so that it lets go of replaced plugins.
    #[inline]
    pub fn refresh(&mut self) {
        if self.live.deployment() != self.current.generation {
            self.switch();
        }
    }

    #[cold]
    fn switch(&mut self) {
        let (generation, plugins) = self.live.current();
        let fresh = Tenure {
            generation,
            worker: (self.make)(plugins),
            streams: 0,
        };
        let old = std::mem::replace(&mut self.current, fresh);
        if old.streams > 0 {
            self.draining.push(old);
        }
        // Else the old worker, and its copies, go away now.
    }

    /// The worker of a stream that started in `generation` (`None` once every stream of that
    /// generation has ended and its worker is gone).
    pub fn worker(&mut self, generation: Generation) -> Option<&mut Worker> {
        if self.current.generation == generation {
            return Some(&mut self.current.worker);
        }
        self.draining
            .iter_mut()
            .find(|tenure| tenure.generation == generation)
            .map(|tenure| &mut tenure.worker)
    }

    /// Says that a stream of `generation` ended (after it released its holds): a replaced
    /// worker goes away, with its VM copies, with its last stream.
    pub fn stream_ended(&mut self, generation: Generation) {
        if self.current.generation == generation {
            self.current.streams = self.current.streams.saturating_sub(1);
            return;
        }
        if let Some(index) = self
            .draining
            .iter()
            .position(|tenure| tenure.generation == generation)
        {
            let tenure = &mut self.draining[index];
            tenure.streams = tenure.streams.saturating_sub(1);
            if tenure.streams == 0 {
                self.draining.swap_remove(index);
            }
        }
    }

    /// The worker of the deployment in force (switching to it first if it was replaced), e.g.
    /// to tick its copies.
    pub fn current(&mut self) -> (Generation, &mut Worker) {
        self.refresh();
        (self.current.generation, &mut self.current.worker)
    }

    /// Calls `visit` with every worker of the thread, the current one first, then replaced ones
    /// still finishing streams (for root work their streams may wait on: timer ticks, queue
    /// notifications, call answers).
    pub fn for_each_worker(&mut self, mut visit: impl FnMut(Generation, &mut Worker)) {
        visit(self.current.generation, &mut self.current.worker);
        for tenure in &mut self.draining {
            visit(tenure.generation, &mut tenure.worker);
        }
    }

    /// How many replaced workers still have streams in flight.
    pub fn draining(&self) -> usize {
        self.draining.len()
    }

    /// How many streams are in flight on the thread's workers, old and current: from
    /// [`ThreadWorkers::for_new_stream`] to [`ThreadWorkers::stream_ended`].
    pub fn in_flight(&self) -> usize {
        self.current.streams + self.draining.iter().map(|t| t.streams).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use abi::InMemoryHost;

    use super::*;
    use crate::test_support::load;
    use crate::{Admission, PluginId, StreamVm};

    fn config(name: &str) -> String {
        format!(
            "- {{name: p, configuration: '{{\"name\": \"{name}\"}}', vm_config: {{code: {{local: {{filename: rust/chain_probe.wasm}}}}}}}}"
        )
    }

    /// Counts the VM copies that went away.
    fn threads(live: &Arc<LivePlugins>, retired: &Arc<AtomicUsize>) -> ThreadWorkers {
        let retired = Arc::clone(retired);
        ThreadWorkers::new(
            Arc::clone(live),
            Box::new(move |plugins| {
                let retired = Arc::clone(&retired);
                Worker::new(plugins, || Box::new(InMemoryHost::new())).on_retire(Box::new(
                    move |_, _, _| {
                        retired.fetch_add(1, Ordering::Relaxed);
                    },
                ))
            }),
        )
    }

    /// Admits a stream on the deployment in force; returns its deployment, hold and the name
    /// the plugin's configuration gives it.
    fn admit(threads: &mut ThreadWorkers) -> (Generation, StreamVm, String) {
        let (deployment, worker) = threads.for_new_stream();
        let Admission::Run(held) = worker.admit(PluginId(0)) else {
            panic!("admitted");
        };
        let name = worker.plugins().config(PluginId(0)).configuration.clone();
        (deployment, held, String::from_utf8(name).unwrap())
    }

    fn end(threads: &mut ThreadWorkers, deployment: Generation, held: StreamVm) {
        threads.worker(deployment).unwrap().release(held);
        threads.stream_ended(deployment);
    }

    #[test]
    fn new_streams_get_new_copies_while_streams_in_flight_finish_on_the_old_ones() {
        let first = load(&config("one")).unwrap();
        let live = Arc::new(LivePlugins::new(first));
        let retired = Arc::new(AtomicUsize::new(0));
        let mut threads = threads(&live, &retired);
        let (old, in_flight, name) = admit(&mut threads);
        assert!(name.contains("one"));

        let (_, current) = live.current();
        let second = Plugins::load_replacing(
            &current,
            &crate::parse(&config("two")).unwrap(),
            &crate::test_support::Wasmtime,
            &crate::LoadOptions {
                base_dir: crate::test_support::corpus(),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(live.replace(second), Generation(1));

        let (new, fresh, name) = admit(&mut threads);
        assert!(name.contains("two"));
        assert_ne!(new, old);
        assert_eq!(threads.draining(), 1, "the old worker waits for its stream");
        assert_eq!(threads.in_flight(), 2, "one stream on each worker");
        assert_eq!(retired.load(Ordering::Relaxed), 0);
        // The stream in flight still has its VM.
        assert!(threads.worker(old).unwrap().vm(&in_flight).is_some());

        end(&mut threads, old, in_flight);
        assert_eq!(threads.draining(), 0);
        assert_eq!(
            retired.load(Ordering::Relaxed),
            1,
            "the old copy went with its stream"
        );
        end(&mut threads, new, fresh);
        assert_eq!(threads.in_flight(), 0);
        assert_eq!(retired.load(Ordering::Relaxed), 1, "the current copy stays");
        drop(threads);
        assert_eq!(retired.load(Ordering::Relaxed), 2);
    }

    fn replace_with(live: &LivePlugins, name: &str) {
        let (_, current) = live.current();
        let next = Plugins::load_replacing(
            &current,
            &crate::parse(&config(name)).unwrap(),
            &crate::test_support::Wasmtime,
            &crate::LoadOptions {
                base_dir: crate::test_support::corpus(),
                ..Default::default()
            },
        )
        .unwrap();
        live.replace(next);
    }

    #[test]
    fn a_stream_holding_no_copy_keeps_its_worker_until_it_ends() {
        let live = Arc::new(LivePlugins::new(load(&config("one")).unwrap()));
        let retired = Arc::new(AtomicUsize::new(0));
        let mut threads = threads(&live, &retired);
        // A stream that has not admitted its plugin yet (or was failed open or closed).
        let (old, _) = threads.for_new_stream();
        replace_with(&live, "two");
        let (new, _) = threads.for_new_stream();
        assert_ne!(new, old);
        assert!(threads.worker(old).is_some(), "its worker waits for it");
        threads.stream_ended(old);
        assert!(threads.worker(old).is_none());
        threads.stream_ended(new);
    }

    #[test]
    fn an_idle_thread_lets_go_of_a_replaced_deployment_when_it_looks() {
        let live = Arc::new(LivePlugins::new(load(&config("one")).unwrap()));
        let retired = Arc::new(AtomicUsize::new(0));
        let mut threads = threads(&live, &retired);
        let (deployment, held, _) = admit(&mut threads);
        end(&mut threads, deployment, held);
        replace_with(&live, "two");
        let (generation, worker) = threads.current();
        assert_eq!(generation, Generation(1));
        let name = worker.plugins().config(PluginId(0)).configuration.clone();
        assert!(String::from_utf8(name).unwrap().contains("two"));
        assert_eq!(retired.load(Ordering::Relaxed), 1, "the old copy is gone");
        let mut seen = Vec::new();
        threads.for_each_worker(|generation, _| seen.push(generation));
        assert_eq!(seen, [Generation(1)]);
    }

    #[test]
    fn a_replaced_deployment_without_streams_goes_at_once_and_code_is_not_compiled_again() {
        let first = load(&config("one")).unwrap();
        let first_module = first.module(PluginId(0)).clone();
        let live = Arc::new(LivePlugins::new(first));
        let retired = Arc::new(AtomicUsize::new(0));
        let mut threads = threads(&live, &retired);
        let (deployment, held, _) = admit(&mut threads);
        end(&mut threads, deployment, held);
        for round in 0..3 {
            let (_, current) = live.current();
            let next = Plugins::load_replacing(
                &current,
                &crate::parse(&config(&format!("round {round}"))).unwrap(),
                &crate::test_support::Wasmtime,
                &crate::LoadOptions {
                    base_dir: crate::test_support::corpus(),
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(
                next.module(PluginId(0)).shares_module_with(&first_module),
                "the compiled module is reused"
            );
            live.replace(next);
            let (deployment, held, name) = admit(&mut threads);
            assert!(name.contains(&format!("round {round}")));
            end(&mut threads, deployment, held);
            assert_eq!(threads.draining(), 0);
        }
        assert_eq!(retired.load(Ordering::Relaxed), 3);
    }
}
