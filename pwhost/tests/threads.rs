//! VMs on several threads: queue notifications reach the registering VM on its own thread, and
//! a VM taking over a queue hears of the items waiting in it.

use std::path::Path;
use std::sync::{mpsc, Arc};

use abi::{InMemoryHost, Plugin, PluginConfig, SharedState, Vm};
use pwhost::runtimes;
use runtime_api::RuntimeConfig;

/// The corpus's `shared_queue` plugin on the default engine: every VM registers queue
/// `events` as it starts, every request enqueues its path, and the registering root context
/// logs `dequeued: <path>` for each item.
fn shared_queue_plugin() -> Arc<Plugin> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist/rust/shared_queue.wasm");
    let wasm = std::fs::read(&path).expect("run `bash plugins/build.sh` first");
    let name = runtimes::default_name().expect("an engine");
    let runtime = runtimes::create(name, RuntimeConfig::default()).unwrap();
    Arc::new(
        Plugin::load(
            &*runtime,
            &wasm,
            PluginConfig::default(),
            SharedState::new(),
        )
        .unwrap(),
    )
}

#[test]
fn queue_ready_is_delivered_on_the_registering_vms_thread() {
    let plugin = shared_queue_plugin();

    // Every VM of this plugin registers the queue when it starts; the last one to register owns
    // the notifications. The producer starts first, so the owner (started second) owns them.
    let (producer_started_tx, producer_started_rx) = mpsc::channel();
    let (owner_registered_tx, owner_registered_rx) = mpsc::channel();
    let (enqueued_tx, enqueued_rx) = mpsc::channel::<()>();
    let producer_plugin = plugin.clone();
    let producer = std::thread::spawn(move || {
        let mut vm = Vm::new(&producer_plugin, Box::new(InMemoryHost::new())).unwrap();
        assert!(vm.start().unwrap() && vm.configure().unwrap());
        producer_started_tx.send(()).unwrap();
        owner_registered_rx.recv().unwrap();
        let stream = vm.create_http_context().unwrap();
        let host = vm.host_as::<InMemoryHost>().unwrap();
        host.stream(stream)
            .request_headers
            .add(b":path", b"/from-another-thread");
        vm.on_request_headers(stream, 1, true).unwrap();
        assert_eq!(
            vm.dispatch_queue_ready().unwrap(),
            0,
            "the producer no longer owns the queue"
        );
        enqueued_tx.send(()).unwrap();
    });

    producer_started_rx.recv().unwrap();
    let owner_plugin = plugin.clone();
    let owner = std::thread::spawn(move || {
        let mut vm = Vm::new(&owner_plugin, Box::new(InMemoryHost::new())).unwrap();
        assert!(vm.start().unwrap() && vm.configure().unwrap());
        owner_registered_tx.send(()).unwrap();
        enqueued_rx.recv().unwrap();
        let delivered = vm.dispatch_queue_ready().unwrap();
        let host = vm.host_as::<InMemoryHost>().unwrap();
        let logs: Vec<String> = host.logs.iter().map(|l| l.message.clone()).collect();
        (delivered, logs)
    });

    producer.join().unwrap();
    // Delivered by the owner's VM, on its thread; the producer's VM delivered nothing (above).
    let (delivered, logs) = owner.join().unwrap();
    assert_eq!(delivered, 1);
    assert!(
        logs.contains(&"dequeued: /from-another-thread".to_string()),
        "{logs:?}"
    );
}

#[test]
fn a_queue_wake_tells_the_owner_when_another_thread_enqueues() {
    let plugin = shared_queue_plugin();
    // Every VM of this plugin registers the queue when it starts and the last one owns its
    // notifications: the producer starts first.
    let mut producer = Vm::new(&plugin, Box::new(InMemoryHost::new())).unwrap();
    assert!(producer.start().unwrap() && producer.configure().unwrap());

    // The owner's thread runs an event loop of its own (here: a channel it reads) instead of
    // sleeping in `wait_for_queue_ready`: the wake-up it set is what tells it to dispatch.
    let (wake_tx, wake_rx) = mpsc::channel::<std::thread::ThreadId>();
    let (owner_registered_tx, owner_registered_rx) = mpsc::channel();
    let owner_plugin = plugin.clone();
    let owner = std::thread::spawn(move || {
        let mut vm = Vm::new(&owner_plugin, Box::new(InMemoryHost::new())).unwrap();
        let wake_tx = std::sync::Mutex::new(wake_tx);
        vm.set_queue_wake(Arc::new(move || {
            let _ = wake_tx.lock().unwrap().send(std::thread::current().id());
        }));
        assert!(vm.start().unwrap() && vm.configure().unwrap());
        owner_registered_tx.send(()).unwrap();
        let woken_from = wake_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("woken when the producer enqueued");
        let delivered = vm.dispatch_queue_ready().unwrap();
        let host = vm.host_as::<InMemoryHost>().unwrap();
        let logs: Vec<String> = host.logs.iter().map(|l| l.message.clone()).collect();
        (woken_from, delivered, logs)
    });

    owner_registered_rx.recv().unwrap();
    let stream = producer.create_http_context().unwrap();
    let host = producer.host_as::<InMemoryHost>().unwrap();
    host.stream(stream).request_headers.add(b":path", b"/woken");
    producer.on_request_headers(stream, 1, true).unwrap();

    let (woken_from, delivered, logs) = owner.join().unwrap();
    assert_eq!(
        woken_from,
        std::thread::current().id(),
        "the wake-up runs on the enqueuing thread"
    );
    assert_eq!(delivered, 1);
    assert!(logs.contains(&"dequeued: /woken".to_string()), "{logs:?}");
}

#[test]
fn a_vm_taking_over_a_queue_that_holds_items_is_told_of_them_at_once() {
    let plugin = shared_queue_plugin();
    // The first VM registers the queue and one of its requests enqueues an item, but the VM goes
    // away before delivering it (as a copy that failed, or one a reload replaced).
    let mut first = Vm::new(&plugin, Box::new(InMemoryHost::new())).unwrap();
    assert!(first.start().unwrap() && first.configure().unwrap());
    let stream = first.create_http_context().unwrap();
    first
        .host_as::<InMemoryHost>()
        .unwrap()
        .stream(stream)
        .request_headers
        .add(b":path", b"/left-behind");
    first.on_request_headers(stream, 1, true).unwrap();
    drop(first);

    // The VM registering the queue next is told of the item without another enqueue.
    let mut next = Vm::new(&plugin, Box::new(InMemoryHost::new())).unwrap();
    assert!(next.start().unwrap() && next.configure().unwrap());
    assert_eq!(next.dispatch_queue_ready().unwrap(), 1);
    let host = next.host_as::<InMemoryHost>().unwrap();
    let logs: Vec<String> = host.logs.iter().map(|l| l.message.clone()).collect();
    assert!(
        logs.contains(&"dequeued: /left-behind".to_string()),
        "{logs:?}"
    );
    // Nothing is announced twice.
    assert_eq!(next.dispatch_queue_ready().unwrap(), 0);
}
