//! Singleton services: a plugin with no streams (Envoy's `envoy.bootstrap.wasm` with
//! `singleton: true`) running in one VM on a thread of its own, which sleeps until its next
//! timer tick or until a worker's plugin enqueues into one of its queues.
//!
//! A service without `singleton` runs on every worker instead: start it there with
//! [`Worker::start`](crate::Worker::start) and deliver its ticks and queue notifications in the
//! worker's loop, as for any root context.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use abi::{ContextId, Host, Vm, VmError, VmWaker};

use crate::plugins::{count_failure, StartFailure, StartStep, VmCopy};
use crate::{PluginId, Plugins};

/// Where a singleton service's timer ticks come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ticking {
    /// The wall clock, at the period the plugin set (a proxy).
    Clock,
    /// Only [`SingletonService::tick`] (a test bench that wants runs to repeat exactly).
    Manual,
}

/// Called on the service's thread after each callback of its plugin, e.g. to answer the calls
/// the plugin made (the embedder's host recorded them). Its error joins the service's errors
/// ([`ServiceEnd::errors`]) in order, and one from a callback that failed the VM counts as the
/// plugin's failure, as a callback's own does.
pub type AfterCallback = Box<dyn FnMut(&mut Vm) -> Result<(), AfterError> + Send>;

/// Why an [`AfterCallback`] stopped short.
#[derive(Debug, thiserror::Error)]
pub enum AfterError {
    /// A callback of the plugin's that the hook made failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Anything else (e.g. the plugin made more calls than the embedder answers).
    #[error("{0}")]
    Other(String),
}

/// Work for a service's VM from another thread, e.g. delivering the answer of an HTTP call
/// the embedder's client received on one of its own threads.
pub type VmWork = Box<dyn FnOnce(&mut Vm) -> Result<(), VmError> + Send>;

enum Command {
    /// A timer tick; the flag turns `true` if one was delivered.
    Tick(Arc<std::sync::atomic::AtomicBool>),
    Sync,
    Run(VmWork),
    Stop {
        shutdown_ticks: u32,
    },
}

/// The commands waiting for a service's thread, each with a sender its caller may wait on.
#[derive(Default)]
struct CommandQueue {
    waiting: VecDeque<(Command, mpsc::Sender<()>)>,
    /// The thread has ended (stopped, failed to start, or panicked): commands are dropped at
    /// once, so that no caller waits for a thread that is gone.
    closed: bool,
}

impl CommandQueue {
    /// Queues `command`, unless the thread has ended: then `done` is dropped, which is the
    /// caller's answer.
    fn push(commands: &Mutex<CommandQueue>, command: Command, done: mpsc::Sender<()>) {
        let mut queue = commands
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !queue.closed {
            queue.waiting.push_back((command, done));
        }
    }
}

type Commands = Arc<Mutex<CommandQueue>>;

/// Closes a service's command queue when its thread ends, however it ends (a panic in the
/// embedder's hook or in posted work included), dropping what waits in it.
struct CloseOnExit(Commands);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        let waiting = {
            let mut queue = self
                .0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            queue.closed = true;
            std::mem::take(&mut queue.waiting)
        };
        // Dropped outside the lock: the work's own drop may run anything.
        drop(waiting);
    }
}

/// A singleton service running on its own thread. Stopping it (or dropping it) ends the VM as a
/// proxy does at shutdown.
pub struct SingletonService {
    waker: VmWaker,
    commands: Commands,
    thread: Option<JoinHandle<Option<ServiceEnd>>>,
}

/// A handle that hands work to a running singleton service's VM from any thread, without
/// waiting for it (see [`SingletonService::inbox`]).
#[derive(Clone)]
pub struct ServiceInbox {
    waker: VmWaker,
    commands: Commands,
}

impl ServiceInbox {
    /// Queues `work` for the service's thread, which runs it on the VM between callbacks, in
    /// the order posted. Its outcome counts as a callback's (an error is recorded in the
    /// service's errors and failure counters). Dropped without running if the service has
    /// stopped or its VM failed.
    pub fn post(&self, work: VmWork) {
        let (done, _) = mpsc::channel();
        CommandQueue::push(&self.commands, Command::Run(work), done);
        self.waker.wake();
    }
}

/// What a singleton service left when it stopped.
pub struct ServiceEnd {
    /// Its VM (its host holds what it recorded).
    pub vm: Vm,
    /// The plugin's root context.
    pub root: ContextId,
    /// Failures of its callbacks.
    pub errors: Vec<String>,
    /// Whether its root context finished at shutdown (`proxy_on_done` returned true, or it
    /// called `proxy_done` in time).
    pub done: bool,
}

/// Why a singleton service did not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The plugin is not a singleton service.
    #[error("plugin {0:?} is not a singleton service")]
    NotSingleton(String),
    /// No thread could be made for it.
    #[error("cannot start a thread for service {0:?}: {1}")]
    Thread(String, std::io::Error),
    /// Its VM did not start.
    #[error("service {0:?} did not start: {1}")]
    Start(String, Box<StartFailure>),
}

impl SingletonService {
    /// Starts `plugin` (a singleton service of `plugins`) in a VM of its own on a new thread,
    /// with `host` as its view of the proxy. Returns once the VM started, or why it did not.
    pub fn spawn(
        plugins: Arc<Plugins>,
        plugin: PluginId,
        host: Box<dyn Host>,
        ticking: Ticking,
        after: AfterCallback,
    ) -> Result<SingletonService, SpawnError> {
        let name = plugins.config(plugin).name.clone();
        if !plugins.is_singleton(plugin) {
            return Err(SpawnError::NotSingleton(name));
        }
        let commands: Commands = Arc::default();
        let (started, start) = mpsc::sync_channel(1);
        let thread_commands = Arc::clone(&commands);
        let thread = std::thread::Builder::new()
            // A thread name cannot hold a NUL (the spawn would panic), a plugin name can.
            .name(format!("wasm-service-{}", name.replace('\0', "\\0")))
            .spawn(move || {
                let _close = CloseOnExit(Arc::clone(&thread_commands));
                let module = plugins.module_of(plugin);
                let VmCopy { mut vm, roots } = match VmCopy::start(&plugins, module, host, None) {
                    Ok((copy, None)) => copy,
                    Ok((_, Some(failure))) | Err(failure) => {
                        let _ = started.send(Err(failure));
                        return None;
                    }
                };
                let _ = started.send(Ok(vm.waker()));
                let mut service = ServiceLoop {
                    plugins,
                    plugin,
                    root: roots[0],
                    errors: Vec::new(),
                    after,
                    failed: false,
                };
                let done = service.run(&mut vm, &thread_commands, ticking);
                Some(ServiceEnd {
                    vm,
                    root: service.root,
                    errors: service.errors,
                    done,
                })
            })
            .map_err(|error| SpawnError::Thread(name.clone(), error))?;
        match start.recv() {
            Ok(Ok(waker)) => Ok(SingletonService {
                waker,
                commands,
                thread: Some(thread),
            }),
            Ok(Err(failure)) => {
                let _ = thread.join();
                Err(SpawnError::Start(name, Box::new(failure)))
            }
            // The thread ended without a word: it panicked.
            Err(_) => Err(SpawnError::Start(
                name,
                Box::new(StartFailure {
                    plugin,
                    step: StartStep::Instantiate,
                    error: Some(VmError::Failed("the service thread panicked".into())),
                }),
            )),
        }
    }

    /// Sends a command and waits until the service thread carried it out.
    fn command(&self, command: Command) {
        let (done, wait) = mpsc::channel();
        CommandQueue::push(&self.commands, command, done);
        self.waker.wake();
        // An error means the thread is gone (or went while the command waited): nothing to
        // wait for.
        let _ = wait.recv();
    }

    /// Delivers one timer tick now if the plugin has a tick period (with [`Ticking::Manual`];
    /// with the clock, an extra one), and returns once it was delivered: `false` if none was
    /// (no tick period, or the VM failed).
    pub fn tick(&self) -> bool {
        let ticked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.command(Command::Tick(Arc::clone(&ticked)));
        ticked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A handle for other threads to hand work to the service's VM, e.g. answers to the calls
    /// its plugin made. Work for a service that has stopped is dropped.
    pub fn inbox(&self) -> ServiceInbox {
        ServiceInbox {
            waker: self.waker.clone(),
            commands: Arc::clone(&self.commands),
        }
    }

    /// Returns once every queue notification pending now was delivered.
    pub fn sync(&self) {
        self.command(Command::Sync);
    }

    /// Stops the service as a proxy does at shutdown: pending queue notifications, then
    /// `proxy_on_done`; if the plugin has work pending, up to `shutdown_ticks` timer ticks
    /// while it owes `proxy_done`; `proxy_on_delete` if it finished. `None` if the thread
    /// panicked.
    pub fn stop(mut self, shutdown_ticks: u32) -> Option<ServiceEnd> {
        self.finish(shutdown_ticks)
    }

    fn finish(&mut self, shutdown_ticks: u32) -> Option<ServiceEnd> {
        let thread = self.thread.take()?;
        let (done, _) = mpsc::channel();
        CommandQueue::push(&self.commands, Command::Stop { shutdown_ticks }, done);
        self.waker.wake();
        thread.join().ok().flatten()
    }
}

impl Drop for SingletonService {
    fn drop(&mut self) {
        self.finish(0);
    }
}

/// The service thread's state.
struct ServiceLoop {
    plugins: Arc<Plugins>,
    plugin: PluginId,
    root: ContextId,
    errors: Vec<String>,
    after: AfterCallback,
    /// Whether the VM failed (then it gets no more callbacks).
    failed: bool,
}

impl ServiceLoop {
    /// Runs one callback's outcome through the failure bookkeeping and the embedder's hook.
    fn after<T>(&mut self, vm: &mut Vm, outcome: Result<T, VmError>) {
        if let Err(error) = outcome {
            if !self.failed {
                count_failure(self.plugins.counters(self.plugin), &error);
                self.errors.push(error.to_string());
            }
        }
        self.failed |= vm.is_failed();
        if self.failed {
            return;
        }
        if let Err(error) = (self.after)(vm) {
            if let AfterError::Vm(failure) = &error {
                count_failure(self.plugins.counters(self.plugin), failure);
            }
            self.errors.push(error.to_string());
            self.failed |= vm.is_failed();
        }
    }

    /// A timer tick, if the plugin has a tick period; whether one was delivered.
    fn tick(&mut self, vm: &mut Vm) -> bool {
        if self.failed || vm.tick_period_of(self.root).is_none() {
            return false;
        }
        let outcome = vm.tick_root(self.root);
        self.after(vm, outcome);
        true
    }

    /// Serves commands, queue notifications and (with the clock) ticks until told to stop;
    /// then shuts down. Returns whether the root context finished.
    fn run(&mut self, vm: &mut Vm, commands: &Mutex<CommandQueue>, ticking: Ticking) -> bool {
        // When the next tick is due, and the period that was counted from.
        let mut next_tick: Option<(Instant, Duration)> = None;
        loop {
            let pending: Vec<_> = commands
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .waiting
                .drain(..)
                .collect();
            for (command, done) in pending {
                match command {
                    Command::Tick(ticked) => {
                        if self.tick(vm) {
                            ticked.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Command::Sync => {
                        if !self.failed {
                            let outcome = vm.dispatch_queue_ready();
                            self.after(vm, outcome);
                        }
                    }
                    Command::Run(work) => {
                        if !self.failed {
                            let outcome = work(vm);
                            self.after(vm, outcome);
                        }
                    }
                    Command::Stop { shutdown_ticks } => return self.shut_down(vm, shutdown_ticks),
                }
                let _ = done.send(());
            }
            let now = Instant::now();
            if ticking == Ticking::Clock && !self.failed {
                match (vm.tick_period_of(self.root), next_tick) {
                    (None, _) => next_tick = None,
                    // A new period (set by any callback) starts counting now, as in Envoy: a
                    // shorter one does not wait for the longer one to run out.
                    (Some(period), None) => next_tick = Some((now + period, period)),
                    (Some(period), Some((_, counted))) if period != counted => {
                        next_tick = Some((now + period, period))
                    }
                    (Some(period), Some((at, _))) if now >= at => {
                        self.tick(vm);
                        next_tick = Some((now + period, period));
                    }
                    (Some(_), Some(_)) => {}
                }
            }
            let timeout = next_tick.map(|(at, _)| at.saturating_duration_since(Instant::now()));
            if self.failed {
                // Nothing more to deliver and no tick to run (a tick that was due would be due
                // for ever, a spin): only commands wake the thread.
                let _ = vm.wait_for_queue_ready(None);
                continue;
            }
            let outcome = vm.wait_for_queue_ready(timeout);
            if !matches!(outcome, Ok(0)) {
                self.after(vm, outcome);
            }
        }
    }

    fn shut_down(&mut self, vm: &mut Vm, shutdown_ticks: u32) -> bool {
        if self.failed {
            return false;
        }
        let outcome = vm.dispatch_queue_ready();
        self.after(vm, outcome);
        if self.failed {
            return false;
        }
        let outcome = vm.on_done(self.root);
        let mut done = matches!(outcome, Ok(true));
        self.after(vm, outcome);
        let mut ticks = 0;
        while !done && !self.failed {
            done = !vm.is_done_pending_for(self.root);
            if done || ticks >= shutdown_ticks || vm.tick_period_of(self.root).is_none() {
                break;
            }
            self.tick(vm);
            ticks += 1;
        }
        if done && !self.failed {
            let outcome = vm.on_delete(self.root);
            self.after(vm, outcome);
        }
        done && !self.failed
    }
}

#[cfg(test)]
mod tests;
