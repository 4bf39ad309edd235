//! The VM's context model and failure handling, on wasmtime with the corpus' WAT modules.

use std::path::Path;

use abi::{ContextId, HeadersAction, InMemoryHost, Plugin, PluginConfig, SharedState, Vm, VmError};
use runtime_api::RuntimeConfig;
use runtime_wasmtime::WasmtimeRuntime;

fn load(wat_file: &str, shared: SharedState) -> Plugin {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/wat")
        .join(wat_file);
    let wasm = wat::parse_file(&path).expect("corpus WAT parses");
    let runtime = WasmtimeRuntime::new(RuntimeConfig::default()).expect("engine");
    Plugin::load(&runtime, &wasm, PluginConfig::default(), shared).expect("plugin loads")
}

fn started(plugin: &Plugin) -> Vm {
    let mut vm = Vm::new(plugin, Box::new(InMemoryHost::new())).expect("instantiates");
    assert!(vm.start().expect("starts"));
    assert!(vm.configure().expect("configures"));
    vm
}

#[test]
fn root_context_is_1_and_streams_count_up_from_2() {
    let plugin = load("minimal.wat", SharedState::new());
    let mut vm = started(&plugin);
    assert_eq!(vm.root_context(), ContextId(1));
    assert_eq!(vm.create_http_context().unwrap(), ContextId(2));
    assert_eq!(vm.create_http_context().unwrap(), ContextId(3));
}

#[test]
fn callbacks_on_unknown_or_deleted_contexts_are_refused() {
    let plugin = load("minimal.wat", SharedState::new());
    let mut vm = started(&plugin);
    assert!(matches!(
        vm.on_request_headers(ContextId(42), 0, true),
        Err(VmError::UnknownContext(ContextId(42)))
    ));
    let stream = vm.create_http_context().unwrap();
    vm.on_delete(stream).unwrap();
    assert!(matches!(
        vm.on_request_headers(stream, 0, true),
        Err(VmError::UnknownContext(_))
    ));
    assert!(matches!(
        vm.on_request_headers(vm.root_context(), 0, true),
        Err(VmError::UnknownContext(_))
    ));
}

#[test]
fn headers_added_by_the_plugin_reach_the_host() {
    let plugin = load("minimal.wat", SharedState::new());
    let mut vm = started(&plugin);
    let stream = vm.create_http_context().unwrap();
    vm.host_as::<InMemoryHost>()
        .unwrap()
        .stream(stream)
        .request_headers
        .add(b":path", b"/");
    assert_eq!(
        vm.on_request_headers(stream, 1, true).unwrap(),
        HeadersAction::Continue
    );
    let host = vm.host_as::<InMemoryHost>().unwrap();
    assert_eq!(
        host.stream(stream).request_headers.get(b"x-minimal"),
        Some(&b"1"[..])
    );
}

#[test]
fn a_trap_fails_the_vm_and_later_calls_are_refused() {
    let plugin = load("trap_in_request_headers.wat", SharedState::new());
    let mut vm = started(&plugin);
    let stream = vm.create_http_context().unwrap();
    let error = vm.on_request_headers(stream, 0, true).unwrap_err();
    assert!(error.trap().is_some(), "{error}");
    assert!(vm.is_failed());
    assert!(matches!(vm.create_http_context(), Err(VmError::Failed(_))));
}

#[test]
fn vms_of_one_plugin_are_independent_instances() {
    let plugin = load("trap_in_request_headers.wat", SharedState::new());
    let mut failed = started(&plugin);
    let stream = failed.create_http_context().unwrap();
    let _ = failed.on_request_headers(stream, 0, true);
    assert!(failed.is_failed());
    let mut healthy = started(&plugin);
    assert!(!healthy.is_failed());
    assert_eq!(healthy.create_http_context().unwrap(), ContextId(2));
}

#[test]
fn a_deadline_stops_a_runaway_callback() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/wat/infinite_loop.wat");
    let wasm = wat::parse_file(&path).unwrap();
    let config = RuntimeConfig {
        call_deadline: Some(std::time::Duration::from_millis(50)),
        ..Default::default()
    };
    let runtime = WasmtimeRuntime::new(config).unwrap();
    let plugin =
        Plugin::load(&runtime, &wasm, PluginConfig::default(), SharedState::new()).unwrap();
    let mut vm = started(&plugin);
    let stream = vm.create_http_context().unwrap();
    let error = vm.on_request_headers(stream, 0, true).unwrap_err();
    assert_eq!(
        error.trap().map(|t| t.kind.clone()),
        Some(runtime_api::TrapKind::DeadlineExceeded)
    );
}

#[test]
fn an_interrupt_from_another_thread_stops_a_running_callback() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/wat/infinite_loop.wat");
    let wasm = wat::parse_file(&path).unwrap();
    let config = RuntimeConfig {
        interruptible: true,
        ..Default::default()
    };
    let runtime = WasmtimeRuntime::new(config).unwrap();
    let plugin =
        Plugin::load(&runtime, &wasm, PluginConfig::default(), SharedState::new()).unwrap();
    let mut vm = started(&plugin);
    let handle = vm.interrupt_handle().expect("wasmtime can interrupt");
    let stream = vm.create_http_context().unwrap();
    let interrupter = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        handle.interrupt();
    });
    let error = vm.on_request_headers(stream, 0, true).unwrap_err();
    interrupter.join().unwrap();
    assert_eq!(
        error.trap().map(|t| t.kind.clone()),
        Some(runtime_api::TrapKind::Interrupted)
    );
}

/// A Rust SDK plugin from the built corpus (`bash plugins/build.sh`).
fn corpus_plugin(name: &str, config: PluginConfig) -> Plugin {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist/rust")
        .join(format!("{name}.wasm"));
    let wasm = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `bash plugins/build.sh`)", path.display()));
    let runtime = WasmtimeRuntime::new(RuntimeConfig::default()).expect("engine");
    Plugin::load(&runtime, &wasm, config, SharedState::new()).expect("plugin loads")
}

/// Runs one request through a stream of `root` and returns its request headers.
fn request_through(vm: &mut Vm, root: ContextId) -> Vec<(String, String)> {
    let stream = vm.create_http_context_for(root).unwrap();
    vm.host_as::<InMemoryHost>()
        .unwrap()
        .stream(stream)
        .request_headers
        .add(b":path", b"/");
    assert_eq!(
        vm.on_request_headers(stream, 1, true).unwrap(),
        HeadersAction::Continue
    );
    vm.host_as::<InMemoryHost>()
        .unwrap()
        .stream(stream)
        .request_headers
        .to_string_pairs()
}

#[test]
fn plugins_sharing_a_vm_each_get_a_root_context_with_their_own_configuration() {
    let first = PluginConfig {
        name: "first".into(),
        plugin_configuration: br#"{"header": "x-first", "value": "1"}"#.to_vec(),
        ..PluginConfig::default()
    };
    let plugin = corpus_plugin("plugin_config", first);
    let mut vm = started(&plugin);
    let second = vm.add_root(abi::RootConfig {
        name: "second".into(),
        plugin_configuration: br#"{"header": "x-second", "value": "2"}"#.to_vec(),
        ..abi::RootConfig::default()
    });
    assert_ne!(second, vm.root_context());
    assert!(vm.start_root(second).unwrap());
    assert!(vm.configure_root(second).unwrap());
    assert_eq!(vm.roots(), vec![vm.root_context(), second]);
    let root = vm.root_context();
    let from_first = request_through(&mut vm, root);
    let from_second = request_through(&mut vm, second);
    assert!(
        from_first.contains(&("x-first".into(), "1".into())),
        "{from_first:?}"
    );
    assert!(!from_first.iter().any(|(k, _)| k == "x-second"));
    assert!(
        from_second.contains(&("x-second".into(), "2".into())),
        "{from_second:?}"
    );
    assert!(!from_second.iter().any(|(k, _)| k == "x-first"));
    assert!(matches!(
        vm.create_http_context_for(ContextId(999)),
        Err(VmError::UnknownContext(_))
    ));
}
