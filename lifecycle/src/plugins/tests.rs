use std::path::Path;
use std::sync::Mutex;

use abi::{HeadersAction, InMemoryHost};

use super::*;
use crate::test_support::{corpus, load, Wasmtime};

fn config_plugin(name: &str, vm_id: &str, header: &str) -> String {
    format!(
        "- name: {name}\n  configuration: '{{\"header\": \"{header}\", \"value\": \"{name}\"}}'\n  vm_config: {{vm_id: {vm_id}, code: {{local: {{filename: rust/plugin_config.wasm}}}}}}\n"
    )
}

fn worker(plugins: Plugins) -> Worker {
    Worker::new(Arc::new(plugins), || Box::new(InMemoryHost::new()))
}

/// Runs request headers through `plugin` and returns them as the plugin left them.
fn request(worker: &mut Worker, plugin: PluginId) -> Result<Vec<(String, String)>, String> {
    let Admission::Run(held) = worker.admit(plugin) else {
        return Err("not admitted".into());
    };
    let result = run_request(worker, &held);
    worker.release(held);
    result
}

fn run_request(worker: &mut Worker, held: &StreamVm) -> Result<Vec<(String, String)>, String> {
    let plugin = held.plugin();
    let vm = worker.vm(held).expect("this worker's copy");
    let stream = vm
        .create_http_context_for(held.root())
        .map_err(|e| e.to_string())?;
    let host = vm.host_as::<InMemoryHost>().expect("in-memory host");
    host.stream(stream).request_headers.add(b":path", b"/");
    let action = vm.on_request_headers(stream, 1, true);
    let headers = vm
        .host_as::<InMemoryHost>()
        .expect("in-memory host")
        .stream(stream)
        .request_headers
        .to_string_pairs();
    match action {
        Ok(HeadersAction::Continue) => Ok(headers),
        Ok(other) => Err(format!("{other:?}")),
        Err(error) => {
            let _ = worker.failed(plugin, &error);
            Err(error.to_string())
        }
    }
}

#[test]
fn plugins_with_one_vm_key_share_a_module_and_each_keeps_its_configuration() {
    let yaml = [
        config_plugin("a", "shared", "x-a"),
        config_plugin("b", "shared", "x-b"),
        config_plugin("c", "other", "x-c"),
    ]
    .concat();
    let plugins = load(&yaml).unwrap();
    assert_eq!(
        plugins.module_count(),
        2,
        "a and b share one VM, c has its own"
    );
    let mut worker = worker(plugins);
    for (plugin, header) in [(0, "x-a"), (1, "x-b"), (2, "x-c")] {
        let headers = request(&mut worker, PluginId(plugin)).unwrap();
        let own: Vec<_> = headers
            .iter()
            .filter(|(k, _)| k.starts_with("x-"))
            .collect();
        assert_eq!(own.len(), 1, "{headers:?}");
        assert_eq!(own[0].0, header);
    }
}

#[test]
fn a_plugin_that_rejects_its_configuration_is_refused_at_load_by_name() {
    let yaml = "- name: picky\n  configuration: 'not json'\n  vm_config: {code: {local: {filename: rust/plugin_config.wasm}}}\n";
    let error = load(yaml).err().expect("refused").to_string();
    assert_eq!(
        error,
        "plugin \"picky\" rejected its configuration: its proxy_on_configure returned false"
    );
    let missing = "- {name: gone, vm_config: {code: {local: {filename: no/such.wasm}}}}";
    let error = load(missing).err().expect("refused").to_string();
    assert!(
        error.starts_with("[0].vm_config.code: cannot read "),
        "{error}"
    );
}

fn trapping(policy: &str) -> Plugins {
    let wat =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/wat/trap_in_request_headers.wat");
    let wasm = wat::parse_file(wat).unwrap();
    let base64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(wasm)
    };
    load(&format!(
        "{{name: trap, {policy} vm_config: {{code: {{local: {{inline_bytes: {base64}}}}}}}}}"
    ))
    .unwrap()
}

#[test]
fn fail_closed_answers_every_later_stream_with_a_local_reply() {
    let mut worker = worker(trapping("failure_policy: FAIL_CLOSED,"));
    let plugin = PluginId(0);
    assert!(request(&mut worker, plugin)
        .unwrap_err()
        .contains("trapped"));
    assert!(matches!(worker.admit(plugin), Admission::FailClosed));
    assert!(matches!(worker.admit(plugin), Admission::FailClosed));
    let counters = worker.plugins().counters(plugin).snapshot();
    assert_eq!(counters[0], ("failed_by_trap", 1));
    assert_eq!(
        counters[5],
        ("closed", 3),
        "the failing stream and the two after it"
    );
}

#[test]
fn fail_open_passes_later_streams_on_without_the_plugin() {
    let mut worker = worker(trapping("fail_open: true,"));
    let plugin = PluginId(0);
    assert!(request(&mut worker, plugin).is_err());
    assert!(matches!(worker.admit(plugin), Admission::FailOpen));
    assert_eq!(
        worker.plugins().counters(plugin).snapshot()[4],
        ("bypassed", 2),
        "the failing stream and the one after it"
    );
}

#[test]
fn fail_reload_makes_a_fresh_copy_with_a_backoff_that_doubles() {
    let now = Arc::new(Mutex::new(Instant::now()));
    let clock: Clock = {
        let now = Arc::clone(&now);
        Arc::new(move || *now.lock().unwrap())
    };
    let advance = |by: Duration| *now.lock().unwrap() += by;
    let plugins = trapping(
        "failure_policy: FAIL_RELOAD, reload_config: {backoff: {base_interval: 1s, max_interval: 60s}},",
    );
    let mut worker = worker(plugins).with_clock(clock);
    let plugin = PluginId(0);
    // The first copy fails at once: the first reload waits for the base interval (and its
    // jitter, at most half of it) since the copy was made.
    assert!(request(&mut worker, plugin).is_err());
    assert!(matches!(worker.admit(plugin), Admission::FailClosed));
    advance(Duration::from_millis(999));
    assert!(matches!(worker.admit(plugin), Admission::FailClosed));
    advance(Duration::from_millis(501));
    assert!(
        request(&mut worker, plugin).is_err(),
        "a fresh copy, which traps again"
    );
    assert_eq!(
        worker.plugins().counters(plugin).snapshot()[3],
        ("reloads", 1)
    );
    // The second reload waits twice as long.
    advance(Duration::from_millis(1999));
    assert!(matches!(worker.admit(plugin), Admission::FailClosed));
    advance(Duration::from_millis(1001));
    assert!(matches!(worker.admit(plugin), Admission::Run(_)));
    assert_eq!(
        worker.plugins().counters(plugin).snapshot()[3],
        ("reloads", 2)
    );
}

#[test]
fn each_worker_thread_has_its_own_copy() {
    let plugins = Arc::new(trapping("failure_policy: FAIL_CLOSED,"));
    let mut here = Worker::new(Arc::clone(&plugins), || Box::new(InMemoryHost::new()));
    assert!(request(&mut here, PluginId(0)).is_err());
    assert!(matches!(here.admit(PluginId(0)), Admission::FailClosed));
    // The copy of another thread has not failed.
    let other = std::thread::spawn(move || {
        let mut there = Worker::new(plugins, || Box::new(InMemoryHost::new()));
        matches!(there.admit(PluginId(0)), Admission::Run(_))
    });
    assert!(other.join().unwrap());
}

#[test]
fn a_replaced_copy_stays_with_its_streams_and_goes_away_with_the_last() {
    let now = Arc::new(Mutex::new(Instant::now()));
    let clock: Clock = {
        let now = Arc::clone(&now);
        Arc::new(move || *now.lock().unwrap())
    };
    let retired = Arc::new(Mutex::new(0));
    let plugins = trapping(
        "failure_policy: FAIL_RELOAD, reload_config: {backoff: {base_interval: 1s, max_interval: 60s}},",
    );
    let mut worker = worker(plugins).with_clock(clock).on_retire({
        let retired = Arc::clone(&retired);
        Box::new(move |_copy, _vm, _roots| *retired.lock().unwrap() += 1)
    });
    let plugin = PluginId(0);
    let Admission::Run(in_flight) = worker.admit(plugin) else {
        panic!("the first copy is admitted");
    };
    // Another stream fails the copy; after the backoff a new stream gets a fresh copy.
    assert!(request(&mut worker, plugin).is_err());
    *now.lock().unwrap() += Duration::from_secs(2);
    let Admission::Run(fresh) = worker.admit(plugin) else {
        panic!("a fresh copy after the backoff");
    };
    assert!(!worker.vm(&fresh).unwrap().is_failed());
    // The stream that started on the old copy still finds it (failed), not the fresh one.
    assert!(worker.vm(&in_flight).unwrap().is_failed());
    assert_eq!(*retired.lock().unwrap(), 0, "the old copy is still held");
    worker.release(in_flight);
    assert_eq!(*retired.lock().unwrap(), 1, "gone with its last stream");
    worker.release(fresh);
    assert_eq!(*retired.lock().unwrap(), 1, "the current copy stays");
    drop(worker);
    assert_eq!(*retired.lock().unwrap(), 2, "and goes with the worker");
}

#[test]
fn a_copy_that_cannot_start_on_a_thread_says_which_plugin_and_why() {
    // `Plugins::single` skips the check at load, so the refusal shows on the worker.
    let wasm = std::fs::read(corpus().join("rust/plugin_config.wasm")).unwrap();
    let config = crate::parse("- {name: picky, configuration: 'not json', vm_config: {code: {local: {inline_string: x}}}}")
        .unwrap()
        .http_filters
        .remove(0);
    let runtime = Wasmtime.runtime("wasmtime").unwrap();
    let loaded =
        abi::Plugin::load(&*runtime, &wasm, abi_config(&config), SharedState::new()).unwrap();
    let mut worker = worker(Plugins::single(config, loaded));
    let failure = worker.start(PluginId(0)).unwrap_err();
    assert_eq!(failure.plugin, PluginId(0));
    assert_eq!(failure.step, StartStep::Configure);
    assert_eq!(failure.to_string(), "its proxy_on_configure returned false");
    assert!(matches!(worker.admit(PluginId(0)), Admission::FailClosed));
    assert_eq!(
        worker.plugins().counters(PluginId(0)).snapshot()[2],
        ("failed_to_start", 1)
    );
}

#[test]
fn a_worker_is_woken_to_deliver_the_queue_notifications_of_its_copies() {
    let plugins = Arc::new(
        load("- name: queue\n  vm_config: {vm_id: q, code: {local: {filename: rust/shared_queue.wasm}}}\n")
            .unwrap(),
    );
    // Each copy registers the queue as it starts; the last to register owns the notifications.
    let mut producer = worker_of(&plugins);
    let Admission::Run(producing) = producer.admit(PluginId(0)) else {
        panic!("admitted");
    };
    let (wake_tx, wake_rx) = std::sync::mpsc::channel();
    let mut owner = worker_of(&plugins).on_queue_ready(Arc::new(move || {
        let _ = wake_tx.send(());
    }));
    let Admission::Run(owning) = owner.admit(PluginId(0)) else {
        panic!("admitted");
    };
    owner.release(owning);
    assert!(wake_rx.try_recv().is_err(), "nothing enqueued yet");

    // The producer's stream enqueues its path.
    run_request(&mut producer, &producing).unwrap();
    producer.release(producing);
    wake_rx.try_recv().expect("the owner's worker was woken");
    assert!(owner.dispatch_queue_ready().is_empty());
    let (_, vm, _) = owner.copy_of(PluginId(0)).expect("the owner's copy");
    let logs: Vec<String> = vm
        .host_as::<InMemoryHost>()
        .expect("in-memory host")
        .logs
        .iter()
        .map(|l| l.message.clone())
        .collect();
    assert!(logs.contains(&"dequeued: /".to_string()), "{logs:?}");
}

fn worker_of(plugins: &Arc<Plugins>) -> Worker {
    Worker::new(Arc::clone(plugins), || Box::new(InMemoryHost::new()))
}
