use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use abi::{HeadersAction, InMemoryHost};

use super::*;
use crate::test_support::load;
use crate::{Admission, Worker};

/// A filter that enqueues each request's path into queue `events` of VM `svc`, and a singleton
/// service with VM id `svc` that registers the queue (and ticks every `tick_ms`).
fn filter_and_service(tick_ms: u64) -> Arc<Plugins> {
    let yaml = format!(
        r#"
- name: filter
  configuration: '{{"name": "filter", "enqueue": {{"vm_id": "svc", "queue": "events"}}}}'
  vm_config: {{vm_id: workers, code: {{local: {{filename: rust/chain_probe.wasm}}}}}}
{}"#,
        queue_service(tick_ms)
    );
    Arc::new(load(&yaml).expect("loads"))
}

/// The singleton service `svc` of [`filter_and_service`], as a configuration entry.
fn queue_service(tick_ms: u64) -> String {
    singleton_service(
        "svc",
        &format!(r#"'{{"name": "svc", "register_queue": "events", "tick_ms": {tick_ms}}}'"#),
        "rust/chain_probe.wasm",
    )
}

/// A singleton `WasmService` entry: plugin `name` (also its VM id) with `configuration` (YAML)
/// and code from `file` in the corpus.
fn singleton_service(name: &str, configuration: &str, file: &str) -> String {
    format!(
        r#"- name: envoy.bootstrap.wasm
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.wasm.v3.WasmService
    singleton: true
    config:
      name: {name}
      configuration: {configuration}
      vm_config: {{vm_id: {name}, code: {{local: {{filename: {file}}}}}}}
"#
    )
}

fn service_plugin(plugins: &Plugins) -> PluginId {
    plugins.services().next().expect("a service")
}

/// Runs one request with `path` through the filter on `worker`.
fn request(worker: &mut Worker, path: &str) {
    let Admission::Run(held) = worker.admit(PluginId(0)) else {
        panic!("admitted");
    };
    let vm = worker.vm(&held).unwrap();
    let stream = vm.create_http_context_for(held.root()).unwrap();
    let host = vm.host_as::<InMemoryHost>().unwrap();
    host.stream(stream)
        .request_headers
        .add(b":path", path.as_bytes());
    assert_eq!(
        vm.on_request_headers(stream, 1, true).unwrap(),
        HeadersAction::Continue
    );
    worker.release(held);
}

/// What the service dequeued, in order, by its log.
fn dequeued(vm: &mut Vm) -> Vec<String> {
    messages(vm)
        .into_iter()
        .filter(|m| m.contains("dequeued"))
        .collect()
}

fn messages(vm: &mut Vm) -> Vec<String> {
    let host = vm.host_as::<InMemoryHost>().unwrap();
    host.logs.iter().map(|l| l.message.clone()).collect()
}

fn no_hook() -> AfterCallback {
    Box::new(|_| Ok(()))
}

/// The service of `plugins`, ticking only when asked, over an in-memory host.
fn spawn_manual(plugins: &Arc<Plugins>) -> Result<SingletonService, SpawnError> {
    SingletonService::spawn(
        Arc::clone(plugins),
        service_plugin(plugins),
        Box::new(InMemoryHost::new()),
        Ticking::Manual,
        no_hook(),
    )
}

/// The service of `plugins`, ticking by the clock, with how many ticks it logged so far.
fn spawn_ticking(plugins: &Arc<Plugins>) -> (SingletonService, Arc<AtomicUsize>) {
    let ticks_seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&ticks_seen);
    let service = SingletonService::spawn(
        Arc::clone(plugins),
        service_plugin(plugins),
        Box::new(InMemoryHost::new()),
        Ticking::Clock,
        Box::new(move |vm| {
            let ticks = messages(vm).iter().filter(|m| m.contains("tick")).count();
            counter.store(ticks, Ordering::Relaxed);
            Ok(())
        }),
    )
    .unwrap();
    (service, ticks_seen)
}

/// Waits (at most 10 s) until `ticks_seen` reaches `ticks`.
fn wait_for_ticks(ticks_seen: &AtomicUsize, ticks: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while ticks_seen.load(Ordering::Relaxed) < ticks && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_singleton_service_receives_what_worker_filters_enqueue() {
    let plugins = filter_and_service(60_000);
    let service = spawn_manual(&plugins).expect("starts");
    // Two workers, each with its own copy of the filter, one service.
    let mut first = Worker::new(Arc::clone(&plugins), || Box::new(InMemoryHost::new()));
    let mut second = Worker::new(Arc::clone(&plugins), || Box::new(InMemoryHost::new()));
    request(&mut first, "/a");
    request(&mut second, "/b");
    service.sync();
    request(&mut first, "/c");
    let mut end = service.stop(0).expect("the thread ends cleanly");
    assert!(end.done);
    assert!(end.errors.is_empty(), "{:?}", end.errors);
    assert_eq!(
        dequeued(&mut end.vm),
        ["svc dequeued /a", "svc dequeued /b", "svc dequeued /c"],
        "everything enqueued before the stop is delivered"
    );
}

/// What the embedder's hook reports after a callback joins the service's errors, in order,
/// and the service goes on (it did not fail the VM).
#[test]
fn an_after_callback_error_joins_the_services_errors() {
    let plugins = filter_and_service(60_000);
    let mut calls = 0;
    let service = SingletonService::spawn(
        Arc::clone(&plugins),
        service_plugin(&plugins),
        Box::new(InMemoryHost::new()),
        Ticking::Manual,
        Box::new(move |_vm| {
            calls += 1;
            match calls {
                1 => Err(AfterError::Other(format!("hook call {calls} refused"))),
                _ => Ok(()),
            }
        }),
    )
    .expect("starts");
    let mut worker = Worker::new(Arc::clone(&plugins), || Box::new(InMemoryHost::new()));
    request(&mut worker, "/a");
    service.sync();
    request(&mut worker, "/b");
    service.sync();
    let mut end = service.stop(0).expect("the thread ends cleanly");
    assert_eq!(end.errors, ["hook call 1 refused"]);
    assert_eq!(
        dequeued(&mut end.vm),
        ["svc dequeued /a", "svc dequeued /b"]
    );
}

#[test]
fn work_posted_to_the_inbox_runs_on_the_service_thread_in_order() {
    let plugins = filter_and_service(60_000);
    let service = spawn_manual(&plugins).unwrap();
    let inbox = service.inbox();
    let ran = Arc::new(Mutex::new(Vec::new()));
    let record = |label: &'static str, fail: bool| -> VmWork {
        let ran = Arc::clone(&ran);
        Box::new(move |vm: &mut Vm| {
            let thread = std::thread::current().name().unwrap_or("").to_string();
            ran.lock().unwrap().push(format!("{label} on {thread}"));
            let _ = vm;
            if fail {
                return Err(VmError::Failed("the answer could not be delivered".into()));
            }
            Ok(())
        })
    };
    // Posted from another thread, as a proxy's client thread would.
    let from_elsewhere = inbox.clone();
    let first = record("first", false);
    std::thread::spawn(move || from_elsewhere.post(first))
        .join()
        .unwrap();
    inbox.post(record("second", true));
    inbox.post(record("third", false));
    service.sync();
    let end = service.stop(0).unwrap();
    assert_eq!(
        *ran.lock().unwrap(),
        [
            "first on wasm-service-svc",
            "second on wasm-service-svc",
            "third on wasm-service-svc"
        ]
    );
    // An error is recorded as a callback's; the VM did not trap, so it goes on and finishes.
    assert_eq!(end.errors, ["the VM failed earlier and runs no more plugin code (the answer could not be delivered)"]);
    assert!(end.done);
    // A stopped service drops what is posted.
    inbox.post(record("late", false));
    assert_eq!(ran.lock().unwrap().len(), 3);
}

#[test]
fn a_singleton_service_is_never_copied_onto_workers() {
    let plugins = filter_and_service(60_000);
    let service = service_plugin(&plugins);
    let mut worker = Worker::new(Arc::clone(&plugins), || Box::new(InMemoryHost::new()));
    worker.start(service).unwrap();
    assert!(matches!(worker.admit(service), Admission::FailClosed));
    let mut copies = 0;
    worker.for_each_copy(|_, _, _| copies += 1);
    assert_eq!(copies, 0);
}

#[test]
fn manual_ticks_arrive_when_asked_and_clock_ticks_by_the_period() {
    let plugins = filter_and_service(60_000);
    let service = spawn_manual(&plugins).unwrap();
    assert!(service.tick(), "delivered");
    assert!(service.tick(), "delivered");
    let mut end = service.stop(0).unwrap();
    let ticks: Vec<String> = messages(&mut end.vm)
        .into_iter()
        .filter(|m| m.contains("tick"))
        .collect();
    assert_eq!(ticks, ["svc tick 1", "svc tick 2"]);

    // With the clock and a 5 ms period, ticks keep coming without anyone asking.
    let plugins = filter_and_service(5);
    let (service, ticks_seen) = spawn_ticking(&plugins);
    wait_for_ticks(&ticks_seen, 3);
    assert!(ticks_seen.load(Ordering::Relaxed) >= 3);
    drop(service);
}

/// A tick period the plugin sets anew (here from a queue notification) counts from then, as
/// in Envoy: a service ticking every minute that asks for every 5 ms ticks within moments, not
/// once the minute has run out.
#[test]
fn a_new_tick_period_starts_counting_when_it_is_set() {
    let plugins = filter_and_service(60_000);
    let (service, ticks_seen) = spawn_ticking(&plugins);
    let mut worker = Worker::new(Arc::clone(&plugins), || Box::new(InMemoryHost::new()));
    request(&mut worker, "/tick_ms=5");
    wait_for_ticks(&ticks_seen, 3);
    assert!(
        ticks_seen.load(Ordering::Relaxed) >= 3,
        "ticks at the new period"
    );
    drop(service);
}

/// A service thread that panicked (in the embedder's hook after a callback) leaves no caller
/// waiting for it: ticks and syncs asked later return at once, and stopping it reports the
/// panic.
#[test]
fn a_service_whose_thread_panicked_answers_every_later_command_at_once() {
    let plugins = filter_and_service(60_000);
    let service = SingletonService::spawn(
        Arc::clone(&plugins),
        service_plugin(&plugins),
        Box::new(InMemoryHost::new()),
        Ticking::Manual,
        Box::new(|_| panic!("the embedder's hook panics")),
    )
    .unwrap();
    // This tick runs, and the hook after it takes the thread down.
    service.tick();
    let (answered, answer) = mpsc::channel();
    let asking = std::thread::spawn(move || {
        let ticked = service.tick();
        service.sync();
        let _ = answered.send((ticked, service.stop(0).is_none()));
    });
    let (ticked, stopped_by_panic) = answer
        .recv_timeout(Duration::from_secs(10))
        .expect("later commands return, not wait for a thread that is gone");
    assert!(!ticked, "no tick delivered");
    assert!(stopped_by_panic, "the end reports the panic");
    asking.join().unwrap();
}

#[test]
fn only_a_singleton_service_gets_a_thread() {
    let plugins = filter_and_service(60_000);
    let error = SingletonService::spawn(
        Arc::clone(&plugins),
        PluginId(0),
        Box::new(InMemoryHost::new()),
        Ticking::Manual,
        no_hook(),
    )
    .err()
    .expect("refused");
    assert_eq!(
        error.to_string(),
        "plugin \"filter\" is not a singleton service"
    );
}

#[test]
fn a_refused_configuration_update_leaves_the_running_service_its_queue() {
    let plugins = filter_and_service(60_000);
    let service = spawn_manual(&plugins).expect("starts");
    let mut worker = Worker::new(Arc::clone(&plugins), || Box::new(InMemoryHost::new()));
    request(&mut worker, "/before");
    service.sync();
    // The update's check starts the service's code once more, which registers the queue again,
    // and is then refused for another plugin: its copies go away, the running service stays.
    let update = [
        queue_service(60_000),
        singleton_service("cold", "''", "wat/refuse_vm_start.wasm"),
    ]
    .concat();
    let refused = Plugins::load_replacing(
        &plugins,
        &crate::parse(&update).expect("valid configuration"),
        &crate::test_support::Wasmtime,
        &crate::test_support::corpus_options(),
    );
    let refused = refused.err().expect("the update is refused");
    assert!(refused.to_string().contains("\"cold\""), "{refused}");
    request(&mut worker, "/after");
    let mut end = service.stop(0).expect("the thread ends cleanly");
    assert!(end.errors.is_empty(), "{:?}", end.errors);
    assert_eq!(
        dequeued(&mut end.vm),
        ["svc dequeued /before", "svc dequeued /after"],
        "the running service is still told of what the filter enqueues"
    );
}

/// The one service of `yaml`, started with `ticking`; what `look` finds on the service's
/// thread after each callback that did not fail comes through the receiver.
fn spawn_watched<T: Send + 'static>(
    yaml: &str,
    ticking: Ticking,
    look: impl Fn() -> T + Send + 'static,
) -> (SingletonService, mpsc::Receiver<T>) {
    let plugins = Arc::new(load(yaml).expect("loads"));
    let (seen, watched) = mpsc::channel();
    let service = SingletonService::spawn(
        Arc::clone(&plugins),
        service_plugin(&plugins),
        Box::new(InMemoryHost::new()),
        ticking,
        Box::new(move |_| {
            let _ = seen.send(look());
            Ok(())
        }),
    )
    .expect("starts");
    (service, watched)
}

/// The CPU time (user and system, in clock ticks) the thread at `task` (`/proc/<pid>/task/<tid>`)
/// has used.
#[cfg(target_os = "linux")]
fn cpu_ticks(task: &std::path::Path) -> u64 {
    let stat = std::fs::read_to_string(task.join("stat")).expect("the thread's stat");
    // After the command name (in parentheses), fields 3 on: utime and stime are 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("a command name") + 2..]
        .split(' ')
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[cfg(target_os = "linux")]
#[test]
fn a_service_that_failed_with_its_clock_ticking_waits_without_spinning() {
    // Ticks every 5 ms by the clock; the second tick traps, failing the VM while a tick is due.
    let yaml = singleton_service(
        "svc",
        r#"'{"name": "svc", "tick_ms": 5, "panic_at_tick": 2}'"#,
        "rust/chain_probe.wasm",
    );
    let (service, service_thread) = spawn_watched(&yaml, Ticking::Clock, || {
        std::fs::read_link("/proc/thread-self")
    });
    let task = service_thread
        .recv_timeout(Duration::from_secs(10))
        .expect("a first tick")
        .expect("/proc/thread-self");
    let task = std::path::Path::new("/proc").join(task);
    // Well past the failing tick, the thread should be asleep.
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(&task);
    std::thread::sleep(Duration::from_millis(500));
    let used = cpu_ticks(&task) - before;
    let end = service.stop(0).expect("the thread ends cleanly");
    assert!(!end.done, "a failed service does not finish");
    assert!(
        end.errors.iter().any(|e| e.contains("on_tick")),
        "{:?}",
        end.errors
    );
    // A spinning thread takes every tick of a core it gets (50 in 500 ms at 100 Hz).
    assert!(
        used <= 5,
        "the failed service's thread used {used} clock ticks of CPU in 500 ms"
    );
}

#[test]
fn a_service_named_with_a_nul_byte_starts() {
    let yaml = singleton_service(
        r#""svc\0x""#,
        r#"'{"name": "svc", "tick_ms": 60000}'"#,
        "rust/chain_probe.wasm",
    );
    let (service, service_thread) = spawn_watched(&yaml, Ticking::Manual, || {
        std::thread::current().name().map(str::to_string)
    });
    service.tick();
    let name = service_thread
        .recv_timeout(Duration::from_secs(10))
        .unwrap();
    assert_eq!(name.as_deref(), Some(r"wasm-service-svc\0x"));
    assert!(service.stop(0).expect("the thread ends cleanly").done);
}

#[test]
fn a_tick_asked_of_a_service_without_a_tick_period_is_not_delivered() {
    let yaml = singleton_service("svc", r#"'{"name": "svc"}'"#, "rust/chain_probe.wasm");
    let plugins = Arc::new(load(&yaml).expect("loads"));
    let service = spawn_manual(&plugins).expect("starts");
    assert!(!service.tick());
    let mut end = service.stop(0).expect("the thread ends cleanly");
    assert!(!messages(&mut end.vm).iter().any(|m| m.contains("tick")));
}
