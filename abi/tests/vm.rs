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

/// An embedder whose `Host` panics when a plugin reaches for a header map.
struct PanickingHost;

impl abi::Host for PanickingHost {
    fn log(&mut self, _: ContextId, _: abi::LogLevel, _: &str) {}

    fn header_map(&mut self, _: ContextId, _: abi::MapType) -> Option<&mut dyn abi::Headers> {
        panic!("the embedder's bug");
    }

    fn buffer(&mut self, _: ContextId, _: abi::BufferType) -> Option<&mut Vec<u8>> {
        None
    }

    fn send_local_response(&mut self, _: ContextId, _: abi::LocalResponse) -> abi::Status {
        abi::Status::Ok
    }

    fn continue_stream(&mut self, _: ContextId, _: abi::StreamType) -> abi::Status {
        abi::Status::Ok
    }

    fn close_stream(&mut self, _: ContextId, _: abi::StreamType) -> abi::Status {
        abi::Status::Ok
    }
}

#[test]
fn a_panic_under_a_callback_fails_the_vm_like_a_trap_instead_of_unwinding() {
    let plugin = load("minimal.wat", SharedState::new());
    let mut vm = Vm::new(&plugin, Box::new(PanickingHost)).expect("instantiates");
    assert!(vm.start().expect("starts"));
    let stream = vm.create_http_context().unwrap();
    // minimal.wat adds a request header: the host's map lookup panics.
    let error = vm.on_request_headers(stream, 0, true).unwrap_err();
    let trap = error.trap().expect("a trap");
    assert!(trap.message.contains("the embedder's bug"), "{error}");
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

/// A probe plugin: `imports` and `data` as given, and a request headers callback that runs
/// `body`, then continues. `body` may call `$status` (stores a call's status, or errno, plus 48
/// at an address: `0` for success) and `$report` (adds a request header whose name is at
/// `name`, `size` bytes, and whose value is the byte at `at`).
fn probe_module(imports: &str, data: &str, body: &str) -> String {
    format!(
        r#"(module
  {imports}
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  {data}
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 16384)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func $status (param $at i32) (param $status i32)
    (i32.store8 (local.get $at) (i32.add (i32.const 48) (local.get $status))))
  (func $report (param $name i32) (param $size i32) (param $at i32)
    (drop (call $add (i32.const 0) (local.get $name) (local.get $size) (local.get $at) (i32.const 1))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    {body}
    i32.const 0))"#
    )
}

/// What a probe plugin left: the request headers it added in each request, and the host's log.
struct Probe {
    requests: Vec<Vec<(String, String)>>,
    logs: Vec<(abi::LogLevel, String)>,
}

impl Probe {
    /// The value of a header the probe added, the same in every request.
    fn value(&self, name: &str) -> Option<&str> {
        let mut values = self.requests.iter().map(|headers| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        });
        let first = values.next().flatten();
        assert!(
            values.all(|value| value == first),
            "{name} differs between requests: {:?}",
            self.requests
        );
        first
    }

    /// The log's messages.
    fn messages(&self) -> Vec<&str> {
        self.logs
            .iter()
            .map(|(_, message)| message.as_str())
            .collect()
    }
}

/// Runs `requests` requests through one VM of the probe plugin `module`.
fn run_probe(module: &str, config: PluginConfig, shared: SharedState, requests: usize) -> Probe {
    let wasm = wat::parse_str(module).unwrap();
    let runtime = WasmtimeRuntime::new(RuntimeConfig::default()).unwrap();
    let plugin = Plugin::load(&runtime, &wasm, config, shared).unwrap();
    let mut vm = started(&plugin);
    let mut added = Vec::new();
    for _ in 0..requests {
        let stream = vm.create_http_context().unwrap();
        let host = vm.host_as::<InMemoryHost>().unwrap();
        host.stream(stream).request_headers.add(b":path", b"/");
        vm.on_request_headers(stream, 1, true).unwrap();
        let host = vm.host_as::<InMemoryHost>().unwrap();
        let headers = host
            .stream(stream)
            .request_headers
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .filter(|(k, _)| k != ":path")
            .collect();
        added.push(headers);
    }
    let host = vm.host_as::<InMemoryHost>().unwrap();
    let logs = host
        .logs
        .iter()
        .map(|log| (log.level, log.message.clone()))
        .collect();
    Probe {
        requests: added,
        logs,
    }
}

/// Runs a probe that, on request headers, calls WASI `fd_write` and `proxy_log` and reports
/// what each returned (`x-fd-write`, `x-log`), with `allowed` capabilities.
fn probe_capabilities(allowed: Option<&[&str]>) -> Probe {
    let module = probe_module(
        r#"(import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 0) "x-fd-write")
  (data (i32.const 16) "x-log")
  (data (i32.const 32) "hello\n")
  (data (i32.const 48) "\20\00\00\00\06\00\00\00")"#,
        "(call $status (i32.const 64)
      (call $fd_write (i32.const 1) (i32.const 48) (i32.const 1) (i32.const 56)))
    (call $status (i32.const 65) (call $log (i32.const 2) (i32.const 32) (i32.const 5)))
    (call $report (i32.const 0) (i32.const 10) (i32.const 64))
    (call $report (i32.const 16) (i32.const 5) (i32.const 65))",
    );
    let config = PluginConfig {
        allowed_capabilities: allowed.map(|names| names.iter().map(|n| n.to_string()).collect()),
        ..PluginConfig::default()
    };
    run_probe(&module, config, SharedState::new(), 1)
}

#[test]
fn without_a_capability_restriction_every_host_function_acts() {
    for allowed in [None, Some(&[][..])] {
        let probe = probe_capabilities(allowed);
        assert_eq!(probe.value("x-fd-write"), Some("0"), "fd_write succeeds");
        assert_eq!(probe.value("x-log"), Some("0"), "proxy_log returns OK");
        assert_eq!(
            probe.messages(),
            ["hello", "hello"],
            "an empty restriction is none, as in Envoy"
        );
    }
}

#[test]
fn restricted_host_functions_log_and_answer_as_proxy_wasm_cpp_host_stubs() {
    let allowed = [
        "proxy_on_context_create",
        "proxy_on_request_headers",
        "proxy_add_header_map_value",
    ];
    let probe = probe_capabilities(Some(&allowed));
    assert_eq!(probe.value("x-fd-write"), Some("|"), "ENOTCAPABLE (76)");
    assert_eq!(probe.value("x-log"), Some(":"), "INTERNAL_FAILURE (10)");
    assert_eq!(
        probe.messages(),
        [
            "Attempted call to restricted WASI capability: fd_write",
            "Attempted call to restricted proxy-wasm capability: proxy_log",
        ]
    );
}

#[test]
fn restricted_callbacks_are_never_called() {
    let probe = probe_capabilities(Some(&["proxy_on_context_create", "proxy_log"]));
    assert!(
        probe.requests.iter().all(Vec::is_empty),
        "proxy_on_request_headers did not run: {:?}",
        probe.requests
    );
    assert!(probe.logs.is_empty());
}

#[test]
fn an_embedder_can_ask_which_callbacks_a_plugin_exports() {
    let plugin = load("minimal.wat", SharedState::new());
    let vm = started(&plugin);
    assert!(vm.exports_callback("proxy_on_request_headers"));
    assert!(!vm.exports_callback("proxy_on_response_body"));
    assert!(!vm.exports_callback("not_a_callback"));
}

/// Runs, over `shared`, two requests of a probe that defines a metric with a name longer than
/// the host keeps (twice: `x-long`, `x-again`) and one with a new name (`x-new`).
fn probe_metric_limits(shared: SharedState) -> Probe {
    let module = probe_module(
        r#"(import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 6000) "x-long")
  (data (i32.const 6016) "x-again")
  (data (i32.const 6032) "x-new")
  (data (i32.const 6048) "fresh")"#,
        ";; A name of 5000 bytes (the first 5000 of memory), over MAX_METRIC_NAME_BYTES.
    (call $status (i32.const 6100) (call $define (i32.const 0) (i32.const 0) (i32.const 5000) (i32.const 6200)))
    (call $status (i32.const 6101) (call $define (i32.const 0) (i32.const 0) (i32.const 5000) (i32.const 6200)))
    (call $status (i32.const 6102) (call $define (i32.const 0) (i32.const 6048) (i32.const 5) (i32.const 6200)))
    (call $report (i32.const 6000) (i32.const 6) (i32.const 6100))
    (call $report (i32.const 6016) (i32.const 7) (i32.const 6101))
    (call $report (i32.const 6032) (i32.const 5) (i32.const 6102))",
    );
    run_probe(&module, PluginConfig::default(), shared, 2)
}

/// The host's own limits (which Envoy does not have) answer with the ABI's statuses, and the
/// plugin's log says why, once per VM and limit, however often the plugin meets them.
#[test]
fn a_plugin_meeting_a_metric_limit_is_told_why_once() {
    let probe = probe_metric_limits(SharedState::new());
    // BAD_ARGUMENT (2) for the long name, OK for a new one while names are left.
    assert_eq!(probe.value("x-long"), Some("2"));
    assert_eq!(probe.value("x-again"), Some("2"));
    assert_eq!(probe.value("x-new"), Some("0"));
    let logs = &probe.logs;
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert_eq!(logs[0].0, abi::LogLevel::Warn);
    assert!(
        logs[0].1.contains("at most 4096 bytes") && logs[0].1.contains("this one 5000"),
        "{logs:?}"
    );

    // Every name the process keeps is taken: a new one is INTERNAL_FAILURE (10), said once.
    let shared = SharedState::new();
    for i in 0..abi::MAX_METRICS {
        shared
            .define_metric(abi::MetricType::Counter, &format!("metric_{i}"))
            .unwrap();
    }
    let probe = probe_metric_limits(shared);
    assert_eq!(probe.value("x-long"), Some("2"));
    assert_eq!(probe.value("x-new"), Some(":"));
    let logs = probe.messages();
    assert_eq!(logs.len(), 2, "{logs:?}");
    assert!(
        logs[1].contains("at most 65536 metric names") && logs[1].contains("(fresh)"),
        "{logs:?}"
    );
}

/// A metric name within 4 KiB as sent, but past it once its invalid UTF-8 is replaced (each
/// byte by U+FFFD, three bytes), is refused as too long, and the plugin is told so.
#[test]
fn a_metric_name_past_the_limit_once_its_invalid_utf8_is_replaced_is_told_too() {
    let module = probe_module(
        r#"(import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))"#,
        &format!(
            r#"(data (i32.const 0) "x-status")
  (data (i32.const 1024) "{}")"#,
            "\\ff".repeat(1400)
        ),
        "(call $status (i32.const 16)
      (call $define (i32.const 0) (i32.const 1024) (i32.const 1400) (i32.const 32)))
    (call $report (i32.const 0) (i32.const 8) (i32.const 16))",
    );
    let probe = run_probe(&module, PluginConfig::default(), SharedState::new(), 1);
    assert_eq!(probe.value("x-status"), Some("2"), "BAD_ARGUMENT");
    let logs = probe.messages();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(
        logs[0].contains("at most 4096 bytes (this one 4200, its invalid UTF-8 replaced)"),
        "{logs:?}"
    );
}

/// Shared data and queues live outside the plugin's VM, out of its memory cap's sight: what
/// fits is stored; past the limits a plugin gets INTERNAL_FAILURE, and its log says why, once
/// per limit.
#[test]
fn a_plugin_filling_shared_data_or_queues_past_the_limits_is_refused_and_told_why_once() {
    let shared = SharedState::with_limits(abi::SharedLimits {
        // The 100-byte value (its 1-byte key and 128 bytes: 229) fits, the 200-byte one
        // (329) does not beside it.
        data_bytes_per_vm_id: 300,
        // Twice the 100-byte item (228 each) fits, the 200-byte one (328) never beside them.
        queue_bytes_per_vm_id: 500,
        queues_per_vm_id: 1,
        ..abi::SharedLimits::default()
    });
    // Shared data of 100 bytes under key `q` and of 200 under `r`; queue `q` registered and 100
    // and 200 bytes enqueued there; queue `r` registered, and one with a 4097-byte name.
    let module = probe_module(
        r#"(import "env" "proxy_set_shared_data" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $register (param i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 6000) "x-set-small")
  (data (i32.const 6016) "x-set-large")
  (data (i32.const 6032) "x-enqueue-small")
  (data (i32.const 6048) "x-enqueue-large")
  (data (i32.const 6064) "x-register-r")
  (data (i32.const 6080) "qr")
  (data (i32.const 6112) "x-register-long")"#,
        "(call $status (i32.const 6100)
      (call $set (i32.const 6080) (i32.const 1) (i32.const 0) (i32.const 100) (i32.const 0)))
    (call $status (i32.const 6101)
      (call $set (i32.const 6081) (i32.const 1) (i32.const 0) (i32.const 200) (i32.const 0)))
    (drop (call $register (i32.const 6080) (i32.const 1) (i32.const 6200)))
    (call $status (i32.const 6102)
      (call $enqueue (i32.load (i32.const 6200)) (i32.const 0) (i32.const 100)))
    (call $status (i32.const 6103)
      (call $enqueue (i32.load (i32.const 6200)) (i32.const 0) (i32.const 200)))
    (call $status (i32.const 6104) (call $register (i32.const 6081) (i32.const 1) (i32.const 6204)))
    (call $status (i32.const 6105) (call $register (i32.const 0) (i32.const 4097) (i32.const 6204)))
    (call $report (i32.const 6000) (i32.const 11) (i32.const 6100))
    (call $report (i32.const 6016) (i32.const 11) (i32.const 6101))
    (call $report (i32.const 6032) (i32.const 15) (i32.const 6102))
    (call $report (i32.const 6048) (i32.const 15) (i32.const 6103))
    (call $report (i32.const 6064) (i32.const 12) (i32.const 6104))
    (call $report (i32.const 6112) (i32.const 15) (i32.const 6105))",
    );
    let probe = run_probe(&module, PluginConfig::default(), shared.clone(), 2);
    // OK (0) for what fits, INTERNAL_FAILURE (10) for the rest, in both requests.
    assert_eq!(probe.value("x-set-small"), Some("0"));
    assert_eq!(probe.value("x-set-large"), Some(":"));
    assert_eq!(probe.value("x-enqueue-small"), Some("0"));
    assert_eq!(probe.value("x-enqueue-large"), Some(":"));
    assert_eq!(probe.value("x-register-r"), Some(":"));
    // BAD_ARGUMENT (2) for a name over 4 KiB.
    assert_eq!(probe.value("x-register-long"), Some("2"));
    assert!(shared.get("", b"q").is_some(), "what fits is stored");
    assert_eq!(shared.get("", b"r"), None, "what does not is not");
    let logs = probe.messages();
    assert_eq!(logs.len(), 4, "{logs:?}");
    assert!(
        logs[0].contains("proxy_set_shared_data: the shared data of a VM id is at most 300 bytes"),
        "{logs:?}"
    );
    assert!(
        logs[1].contains(
            "proxy_enqueue_shared_queue: the queues of the queue's VM id hold at most 500 bytes"
        ),
        "{logs:?}"
    );
    assert!(
        logs[2].contains("proxy_register_shared_queue: a VM id has at most 1 queues"),
        "{logs:?}"
    );
    assert!(
        logs[3].contains("a queue name has at most 4096 bytes (this one 4097)"),
        "{logs:?}"
    );
}

/// `fd_write` takes every byte of at most 1024 buffers per call (libc's limit), so a program
/// that does not look at the count loses nothing unsaid, and logs at most 1 MiB of them, then
/// how many bytes it did not log: buffers naming the same memory over and over do not make the
/// host copy gigabytes inside one call.
#[test]
fn fd_write_takes_every_byte_of_1024_buffers_and_logs_at_most_1_mib() {
    let module = probe_module(
        r#"(import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 0) "x-bytes")
  (data (i32.const 8) "x-count")
  (data (i32.const 24) "x-total")"#,
        "(drop (memory.grow (i32.const 2)))
    ;; 2000 buffers at 65536, each the whole first page (no line end in it): 1024 taken whole
    (local.set 0 (i32.const 0))
    (block (loop
      (i32.store (i32.add (i32.const 65536) (i32.mul (local.get 0) (i32.const 8))) (i32.const 0))
      (i32.store (i32.add (i32.const 65540) (i32.mul (local.get 0) (i32.const 8))) (i32.const 65536))
      (local.set 0 (i32.add (local.get 0) (i32.const 1)))
      (br_if 1 (i32.ge_u (local.get 0) (i32.const 2000)))
      (br 0)))
    (drop (call $fd_write (i32.const 1) (i32.const 65536) (i32.const 2000) (i32.const 40)))
    (call $status (i32.const 16) (i32.ne (i32.load (i32.const 40)) (i32.const 67108864)))
    ;; 2000 buffers of one byte (the \"x\" at 0) each: 1024 are taken
    (local.set 0 (i32.const 0))
    (block (loop
      (i32.store (i32.add (i32.const 65540) (i32.mul (local.get 0) (i32.const 8))) (i32.const 1))
      (local.set 0 (i32.add (local.get 0) (i32.const 1)))
      (br_if 1 (i32.ge_u (local.get 0) (i32.const 2000)))
      (br 0)))
    (drop (call $fd_write (i32.const 1) (i32.const 65536) (i32.const 2000) (i32.const 40)))
    (call $status (i32.const 17) (i32.ne (i32.load (i32.const 40)) (i32.const 1024)))
    ;; 1024 buffers of 4 MiB each: the count cannot say 4 GiB, so the last is not taken
    (drop (memory.grow (i32.const 63)))
    (local.set 0 (i32.const 0))
    (block (loop
      (i32.store (i32.add (i32.const 65540) (i32.mul (local.get 0) (i32.const 8))) (i32.const 4194304))
      (local.set 0 (i32.add (local.get 0) (i32.const 1)))
      (br_if 1 (i32.ge_u (local.get 0) (i32.const 1024)))
      (br 0)))
    (drop (call $fd_write (i32.const 1) (i32.const 65536) (i32.const 1024) (i32.const 40)))
    (call $status (i32.const 18) (i32.ne (i32.load (i32.const 40)) (i32.const -4194304)))
    (call $report (i32.const 0) (i32.const 7) (i32.const 16))
    (call $report (i32.const 8) (i32.const 7) (i32.const 17))
    (call $report (i32.const 24) (i32.const 7) (i32.const 18))",
    );
    let probe = run_probe(&module, PluginConfig::default(), SharedState::new(), 1);
    assert_eq!(probe.value("x-bytes"), Some("0"), "64 MiB taken");
    assert_eq!(probe.value("x-count"), Some("0"), "1024 buffers taken");
    assert_eq!(
        probe.value("x-total"),
        Some("0"),
        "1023 buffers of 4 MiB taken (4,290,772,992 bytes)"
    );
    let logs = probe.messages();
    let lengths: Vec<usize> = logs.iter().map(|line| line.len()).collect();
    assert_eq!(
        lengths[0],
        1 << 20,
        "1 MiB of the first write logged: {lengths:?}"
    );
    assert_eq!(
        logs[1],
        "[pwhost: 66060288 more bytes of this write not logged]"
    );
    assert_eq!(
        logs[2],
        "x".repeat(1024),
        "a write under 1 MiB is logged whole"
    );
    assert_eq!(lengths[3], 1 << 20, "{lengths:?}");
    assert_eq!(
        logs[4],
        "[pwhost: 4289724416 more bytes of this write not logged]"
    );
    assert_eq!(logs.len(), 5, "{lengths:?}");
}

/// A property path over 64 KiB names nothing: `NOT_FOUND` to read, `BAD_ARGUMENT` to set, and
/// the plugin is told why once (its segments are not collected first).
#[test]
fn a_property_path_over_64_kib_is_refused_and_the_plugin_told_why_once() {
    let module = probe_module(
        r#"(import "env" "proxy_get_property" (func $get (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_property" (func $set (param i32 i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 0) "x-get")
  (data (i32.const 8) "x-set")"#,
        "(drop (memory.grow (i32.const 2)))
    (call $status (i32.const 16)
      (call $get (i32.const 1024) (i32.const 100000) (i32.const 32) (i32.const 36)))
    (call $status (i32.const 17)
      (call $set (i32.const 1024) (i32.const 100000) (i32.const 0) (i32.const 1)))
    (call $report (i32.const 0) (i32.const 5) (i32.const 16))
    (call $report (i32.const 8) (i32.const 5) (i32.const 17))",
    );
    let probe = run_probe(&module, PluginConfig::default(), SharedState::new(), 1);
    assert_eq!(probe.value("x-get"), Some("1"), "NOT_FOUND");
    assert_eq!(probe.value("x-set"), Some("2"), "BAD_ARGUMENT");
    let logs = probe.messages();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(
        logs[0].contains("a property path has at most 65536 bytes (this one has 100000)"),
        "{logs:?}"
    );
}

/// A log message over 1 MiB is cut there, saying how much was left out.
#[test]
fn a_log_message_over_1_mib_is_cut_saying_how_much_was_left_out() {
    let module = probe_module(
        r#"(import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))"#,
        "",
        "(drop (memory.grow (i32.const 31)))
    (drop (call $log (i32.const 2) (i32.const 0) (i32.const 2000000)))",
    );
    let probe = run_probe(&module, PluginConfig::default(), SharedState::new(), 1);
    let logs = probe.messages();
    assert_eq!(logs.len(), 1);
    assert!(
        logs[0].ends_with(" [pwhost: 951424 more bytes of this message not logged]"),
        "{}",
        &logs[0][logs[0].len().saturating_sub(80)..]
    );
    assert_eq!(
        logs[0].len(),
        (1 << 20) + " [pwhost: 951424 more bytes of this message not logged]".len()
    );
}

/// A stream keeps at most 4096 properties (`proxy_set_property`): past it a new one is
/// `INTERNAL_FAILURE` and the plugin is told why once; setting one it has still works.
#[test]
fn a_stream_keeps_at_most_4096_properties() {
    let module = probe_module(
        r#"(import "env" "proxy_set_property" (func $set (param i32 i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 0) "x-last")
  (data (i32.const 8) "x-again")"#,
        ";; 5000 properties named by a 4-byte counter at 100
    (local.set 0 (i32.const 0))
    (block (loop
      (i32.store (i32.const 100) (local.get 0))
      (local.set 1 (call $set (i32.const 100) (i32.const 4) (i32.const 0) (i32.const 0)))
      (local.set 0 (i32.add (local.get 0) (i32.const 1)))
      (br_if 1 (i32.ge_u (local.get 0) (i32.const 5000)))
      (br 0)))
    (call $status (i32.const 16) (local.get 1))
    ;; the first one again
    (i32.store (i32.const 100) (i32.const 0))
    (call $status (i32.const 17) (call $set (i32.const 100) (i32.const 4) (i32.const 0) (i32.const 3)))
    (call $report (i32.const 0) (i32.const 6) (i32.const 16))
    (call $report (i32.const 8) (i32.const 7) (i32.const 17))",
    );
    let probe = run_probe(&module, PluginConfig::default(), SharedState::new(), 1);
    assert_eq!(probe.value("x-last"), Some(":"), "INTERNAL_FAILURE (10)");
    assert_eq!(probe.value("x-again"), Some("0"), "OK");
    let logs = probe.messages();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(
        logs[0].contains("a stream keeps at most 4096 properties"),
        "{logs:?}"
    );
}

/// `InMemoryHost` keeps at most 64 MiB of log, each line counting 64 bytes beside its message
/// (so empty lines are bounded too); later lines are counted in a last line saying so, and once
/// its reader takes the log it keeps lines again.
#[test]
fn the_in_memory_host_keeps_64_mib_of_log_and_counts_the_rest() {
    use abi::Host as _;
    let mut host = InMemoryHost::default();
    host.log_level = abi::LogLevel::Trace;
    let megabyte = "x".repeat(1 << 20);
    for _ in 0..70 {
        host.log(ContextId(1), abi::LogLevel::Info, &megabyte);
    }
    assert_eq!(
        host.logs.len(),
        64,
        "63 lines of 1 MiB and 64 bytes, and the count"
    );
    let last = host.logs.last().map(|log| log.message.as_str());
    assert_eq!(
        last,
        Some("pwhost: 7 more log lines not kept (the log keeps at most 64 MiB)")
    );
    let _taken = std::mem::take(&mut host.logs);
    host.log(ContextId(1), abi::LogLevel::Info, "again");
    assert_eq!(host.logs.len(), 1);
    assert_eq!(host.logs[0].message, "again");
    let _taken = std::mem::take(&mut host.logs);
    for _ in 0..1_100_000 {
        host.log(ContextId(1), abi::LogLevel::Info, "");
    }
    assert_eq!(
        host.logs.len(),
        (64 << 20) / 64 + 1,
        "a million empty lines, and the count"
    );
    let last = host.logs.last().map(|log| log.message.as_str());
    assert_eq!(
        last,
        Some("pwhost: 51424 more log lines not kept (the log keeps at most 64 MiB)")
    );
}

/// A probe defining 9,000 counters named `aaaaaaaa`, `baaaaaaa`, ... (a counter's nibbles as
/// letters), reporting the last status in `x-last`.
fn probe_metric_names() -> String {
    probe_module(
        r#"(import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 0) "x-last")"#,
        "(local.set 0 (i32.const 0))
    (block (loop
      ;; the name at 100: eight letters, one per nibble of the counter
      (local.set 2 (i32.const 0))
      (block (loop
        (i32.store8 (i32.add (i32.const 100) (local.get 2))
          (i32.add (i32.const 97)
            (i32.and (i32.shr_u (local.get 0) (i32.mul (local.get 2) (i32.const 4))) (i32.const 15))))
        (local.set 2 (i32.add (local.get 2) (i32.const 1)))
        (br_if 1 (i32.ge_u (local.get 2) (i32.const 8)))
        (br 0)))
      (local.set 1 (call $define (i32.const 0) (i32.const 100) (i32.const 8) (i32.const 200)))
      (local.set 0 (i32.add (local.get 0) (i32.const 1)))
      (br_if 1 (i32.ge_u (local.get 0) (i32.const 9000)))
      (br 0)))
    (call $status (i32.const 16) (local.get 1))
    (call $report (i32.const 0) (i32.const 6) (i32.const 16))",
    )
}

/// One VM id adds at most 8192 metric names: past them a new name is `INTERNAL_FAILURE` and the
/// plugin is told why, while another VM id still has room, and defining names others added
/// costs it nothing.
#[test]
fn a_vm_id_adds_at_most_8192_metric_names_and_leaves_room_for_others() {
    let shared = SharedState::new();
    let config = |vm_id: &str| PluginConfig {
        vm_id: vm_id.to_string(),
        ..PluginConfig::default()
    };
    let probe = run_probe(&probe_metric_names(), config("greedy"), shared.clone(), 1);
    assert_eq!(probe.value("x-last"), Some(":"), "INTERNAL_FAILURE (10)");
    let logs = probe.messages();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(
        logs[0].contains("a VM id adds at most 8192 metric names"),
        "{logs:?}"
    );
    // The same 9,000 names from another VM id: 8,192 exist already, 808 are its own.
    let probe = run_probe(&probe_metric_names(), config("other"), shared, 1);
    assert_eq!(probe.value("x-last"), Some("0"), "OK");
    assert!(probe.messages().is_empty(), "{:?}", probe.messages());
    // A proxy whose plugins need more says so (`metric_names_per_vm_id`).
    let roomy = SharedState::with_limits(abi::SharedLimits {
        metric_names_per_vm_id: 10_000,
        ..abi::SharedLimits::default()
    });
    let probe = run_probe(&probe_metric_names(), config("greedy"), roomy, 1);
    assert_eq!(probe.value("x-last"), Some("0"), "OK");
}

/// A VM keeps at most 4096 compiled CEL expressions (`expr_create` without `expr_delete`):
/// past them a new one is `INTERNAL_FAILURE`, and the plugin is told why once.
#[test]
fn a_vm_keeps_at_most_4096_cel_expressions() {
    let module = probe_module(
        r#"(import "env" "proxy_call_foreign_function" (func $foreign (param i32 i32 i32 i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 0) "x-last")
  (data (i32.const 100) "expr_create")
  (data (i32.const 120) "1 + 1")"#,
        "(local.set 0 (i32.const 0))
    (block (loop
      (local.set 1 (call $foreign (i32.const 100) (i32.const 11) (i32.const 120) (i32.const 5)
        (i32.const 0) (i32.const 0)))
      (local.set 0 (i32.add (local.get 0) (i32.const 1)))
      (br_if 1 (i32.ge_u (local.get 0) (i32.const 4100)))
      (br 0)))
    (call $status (i32.const 16) (local.get 1))
    (call $report (i32.const 0) (i32.const 6) (i32.const 16))",
    );
    let probe = run_probe(&module, PluginConfig::default(), SharedState::new(), 1);
    assert_eq!(probe.value("x-last"), Some(":"), "INTERNAL_FAILURE (10)");
    let logs = probe.messages();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(
        logs[0].contains("a VM keeps at most 4096 CEL expressions"),
        "{logs:?}"
    );
}

/// A root context declares at most 4096 properties (`declare_property`, from
/// `proxy_on_vm_start`): past them a new declaration is `INTERNAL_FAILURE`, and the plugin is
/// told why once.
#[test]
fn a_root_context_declares_at_most_4096_properties() {
    let module = r#"(module
  (import "env" "proxy_call_foreign_function" (func $foreign (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x-last")
  (data (i32.const 100) "declare_property")
  ;; DeclarePropertyArguments { name: four letters } = 0x0a 0x04 + the name
  (data (i32.const 200) "\0a\04")
  (global $last (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 16384)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (local $i i32) (local $k i32)
    (block (loop
      (local.set $k (i32.const 0))
      (block (loop
        (i32.store8 (i32.add (i32.const 202) (local.get $k))
          (i32.add (i32.const 97)
            (i32.and (i32.shr_u (local.get $i) (i32.mul (local.get $k) (i32.const 4))) (i32.const 15))))
        (local.set $k (i32.add (local.get $k) (i32.const 1)))
        (br_if 1 (i32.ge_u (local.get $k) (i32.const 4)))
        (br 0)))
      (global.set $last (call $foreign (i32.const 100) (i32.const 16) (i32.const 200) (i32.const 6)
        (i32.const 0) (i32.const 0)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if 1 (i32.ge_u (local.get $i) (i32.const 4100)))
      (br 0)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (i32.store8 (i32.const 16) (i32.add (i32.const 48) (global.get $last)))
    (drop (call $add (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 16) (i32.const 1)))
    i32.const 0))"#;
    let probe = run_probe(module, PluginConfig::default(), SharedState::new(), 1);
    assert_eq!(probe.value("x-last"), Some(":"), "INTERNAL_FAILURE (10)");
    let logs = probe.messages();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(
        logs[0].contains("a root context declares at most 4096 properties"),
        "{logs:?}"
    );
}

/// A VM has at most `abi::MAX_OPEN_CALLS` (1024, Envoy's default circuit breaker) calls open in
/// any host: past it a call is `INTERNAL_FAILURE` without reaching the host, and the plugin is
/// told once; an answer frees its call's place.
#[test]
fn a_vm_has_at_most_1024_calls_open() {
    let plugin = load("call_flood.wat", SharedState::new());
    let mut vm = started(&plugin);
    let local_reply = |vm: &mut Vm| {
        let stream = vm.create_http_context().unwrap();
        vm.host_as::<InMemoryHost>().unwrap().stream(stream);
        vm.on_request_headers(stream, 0, true).unwrap();
        let host = vm.host_as::<InMemoryHost>().unwrap();
        let reply = host.stream(stream).local_response.clone().expect("a reply");
        String::from_utf8(reply.body).unwrap()
    };
    assert_eq!(local_reply(&mut vm), "opened 1024, then status 10");
    assert_eq!(abi::MAX_OPEN_CALLS, 1024);
    let host = vm.host_as::<InMemoryHost>().unwrap();
    assert_eq!(
        host.http_calls.len(),
        1024,
        "the refused call reached no host"
    );
    let first = host.http_calls[0].token;
    let warnings: Vec<&str> = host
        .logs
        .iter()
        .filter(|log| log.message.starts_with("pwhost limit"))
        .map(|log| log.message.as_str())
        .collect();
    assert_eq!(
        warnings,
        [
            "pwhost limit: this VM has 1024 HTTP or gRPC calls open: more are refused \
          (INTERNAL_FAILURE) until answers come"
        ]
    );
    vm.on_http_call_response(first, abi::HttpCallResponse::default())
        .unwrap();
    assert_eq!(local_reply(&mut vm), "opened 1, then status 10");
    let host = vm.host_as::<InMemoryHost>().unwrap();
    let told = host
        .logs
        .iter()
        .filter(|log| log.message.starts_with("pwhost limit"))
        .count();
    assert_eq!(told, 1, "told once");
}

/// A gRPC stream that closes leaves the open-calls count before its close callback runs, so a
/// plugin at the limit may open another stream in its place from the callback (as an HTTP
/// call's answer does).
#[test]
fn a_closing_grpc_stream_frees_its_place_before_its_callback() {
    let module = r#"(module
  (import "env" "proxy_grpc_stream"
    (func $stream (param i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "cluster")
  (data (i32.const 32) "svc")
  (data (i32.const 48) "m")
  (data (i32.const 64) "reopened")
  (data (i32.const 80) "refused")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 8192)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func $open (result i32)
    (call $stream (i32.const 16) (i32.const 7) (i32.const 32) (i32.const 3) (i32.const 48)
      (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 4096)))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $i i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (i32.const 1024)))
      (drop (call $open))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (if (i32.eqz (call $open))
      (then (drop (call $log (i32.const 2) (i32.const 64) (i32.const 8))))
      (else (drop (call $log (i32.const 2) (i32.const 80) (i32.const 7)))))
    i32.const 0)
  (func (export "proxy_on_grpc_close") (param i32 i32 i32)
    (if (i32.eqz (call $open))
      (then (drop (call $log (i32.const 2) (i32.const 64) (i32.const 8))))
      (else (drop (call $log (i32.const 2) (i32.const 80) (i32.const 7)))))))"#;
    let wasm = wat::parse_str(module).unwrap();
    let runtime = WasmtimeRuntime::new(RuntimeConfig::default()).unwrap();
    let plugin =
        Plugin::load(&runtime, &wasm, PluginConfig::default(), SharedState::new()).unwrap();
    let mut vm = started(&plugin);
    let stream = vm.create_http_context().unwrap();
    vm.on_request_headers(stream, 0, true).unwrap();
    let host = vm.host_as::<InMemoryHost>().unwrap();
    assert_eq!(host.grpc_calls.len(), 1024);
    let first = host.grpc_calls[0].token;
    vm.on_grpc_close(first, 0, Vec::new()).unwrap();
    let host = vm.host_as::<InMemoryHost>().unwrap();
    let said: Vec<&str> = host
        .logs
        .iter()
        .map(|log| log.message.as_str())
        .filter(|m| !m.starts_with("pwhost limit"))
        .collect();
    assert_eq!(
        said,
        ["refused", "reopened"],
        "the 1025th refused, then one in the closed one's place"
    );
    assert_eq!(host.grpc_calls.len(), 1025);
}

/// What a plugin makes the host keep outside its VM (where no memory cap applies) is bounded,
/// and so is the work one host call does for it: each refusal is a status the plugin can
/// read, told to it once in the log, and the VM goes on.
#[test]
fn what_a_plugin_makes_the_host_keep_or_do_is_bounded() {
    let module = r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call"
    (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_call_foreign_function"
    (func $foreign (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_send" (func $grpc_send (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_call"
    (func $grpc_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1100)
  (data (i32.const 100) "x-big")
  (data (i32.const 120) "compress")
  (data (i32.const 140) "cluster")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func $record (param $at i32) (param $status i32)
    (i32.store8 (local.get $at) (i32.add (i32.const 48) (local.get $status))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $added i32) (local $status i32)
    ;; 1 MiB values until one is refused (at most 40)
    (block $refused (loop $next
      (local.set $status (call $add (i32.const 0) (i32.const 100) (i32.const 5)
        (i32.const 65536) (i32.const 1048576)))
      (br_if $refused (local.get $status))
      (local.set $added (i32.add (local.get $added) (i32.const 1)))
      (br_if $refused (i32.ge_u (local.get $added) (i32.const 40)))
      (br $next)))
    (call $record (i32.const 0) (local.get $added))
    (call $record (i32.const 1) (local.get $status))
    ;; a foreign function called with 64 MiB + 1 of arguments
    (call $record (i32.const 2) (call $foreign (i32.const 120) (i32.const 8)
      (i32.const 65536) (i32.const 67108865) (i32.const 0) (i32.const 0)))
    ;; an HTTP call with a body of 64 MiB + 1
    (call $record (i32.const 3) (call $http_call (i32.const 140) (i32.const 7)
      (i32.const 0) (i32.const 0) (i32.const 65536) (i32.const 67108865)
      (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 200)))
    ;; a gRPC call with a message of 64 MiB + 1 (told once, with the HTTP call's limit)
    (call $record (i32.const 6) (call $grpc_call (i32.const 140) (i32.const 7)
      (i32.const 140) (i32.const 7) (i32.const 140) (i32.const 7) (i32.const 0) (i32.const 0)
      (i32.const 65536) (i32.const 67108865) (i32.const 1000) (i32.const 200)))
    ;; a gRPC message on a stream this VM never opened
    (call $record (i32.const 4) (call $grpc_send (i32.const 12345) (i32.const 0) (i32.const 0)
      (i32.const 0)))
    ;; poll_oneoff with 1025 subscriptions
    (call $record (i32.const 5) (call $poll (i32.const 65536) (i32.const 65536) (i32.const 1025)
      (i32.const 300)))
    (drop (call $log (i32.const 2) (i32.const 0) (i32.const 7)))
    i32.const 0)
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    ;; 33 MiB appended twice: the second would make the body 66 MiB
    (call $record (i32.const 0) (call $set_buffer (i32.const 0) (i32.const -1) (i32.const 0)
      (i32.const 65536) (i32.const 34603008)))
    (call $record (i32.const 1) (call $set_buffer (i32.const 0) (i32.const -1) (i32.const 0)
      (i32.const 65536) (i32.const 34603008)))
    (drop (call $log (i32.const 2) (i32.const 0) (i32.const 2)))
    i32.const 0))"#;
    let wasm = wat::parse_str(module).unwrap();
    let runtime = WasmtimeRuntime::new(RuntimeConfig::default()).unwrap();
    let plugin =
        Plugin::load(&runtime, &wasm, PluginConfig::default(), SharedState::new()).unwrap();
    let mut vm = started(&plugin);
    let stream = vm.create_http_context().unwrap();
    vm.host_as::<InMemoryHost>().unwrap().stream(stream);
    vm.on_request_headers(stream, 0, false).unwrap();
    vm.on_request_body(stream, 0, true).unwrap();
    let host = vm.host_as::<InMemoryHost>().unwrap();
    let record = host.stream(stream);
    let big = record
        .request_headers
        .iter()
        .filter(|(name, _)| name == b"x-big")
        .count();
    // 15 values of 1 MiB and their names fit in 16 MiB; the 16th does not.
    assert_eq!(abi::MAX_HEADER_BYTES_WRITTEN, 16 << 20);
    assert_eq!(big, 15);
    assert_eq!(
        record.request_body.len(),
        33 << 20,
        "the refused append left the body as it was"
    );
    let messages: Vec<&str> = host.logs.iter().map(|log| log.message.as_str()).collect();
    let statuses = |count: u8, rest: &[u8]| {
        let mut expected = vec![b'0' + count];
        expected.extend(rest.iter().map(|status| b'0' + status));
        String::from_utf8(expected).unwrap()
    };
    // INTERNAL_FAILURE (10), BAD_ARGUMENT (2) twice, NOT_FOUND (1), EINVAL (28), BAD_ARGUMENT.
    let headers = statuses(15, &[10, 2, 2, 1, 28, 2]);
    let body = statuses(0, &[10]);
    let limits: Vec<&str> = messages
        .iter()
        .copied()
        .filter(|message| message.starts_with("pwhost limit"))
        .collect();
    assert_eq!(
        messages
            .iter()
            .filter(|m| !m.starts_with("pwhost limit"))
            .collect::<Vec<_>>(),
        [&headers.as_str(), &body.as_str()],
        "{messages:?}"
    );
    assert_eq!(
        limits,
        [
            "pwhost limit: a plugin writes at most 16777216 bytes of header names and values \
             into one stream's maps: INTERNAL_FAILURE",
            "pwhost limit: a foreign function is called with at most 67108864 bytes of \
             arguments: BAD_ARGUMENT",
            "pwhost limit: an HTTP call has a body of at most 67108864 bytes: BAD_ARGUMENT",
            "pwhost limit: a plugin may make a body or message buffer of at most 67108864 bytes: \
             INTERNAL_FAILURE",
        ]
    );
    assert!(
        host.http_calls.is_empty(),
        "the refused call reached no host"
    );
    assert!(
        host.grpc_calls.is_empty(),
        "the refused gRPC call reached no host"
    );
}

/// A host that takes every gRPC message, cancel and close, whatever the token, and counts
/// them; the log is kept.
#[derive(Default)]
struct TakesAnyGrpcToken {
    reached: usize,
    logs: Vec<String>,
}

impl abi::Host for TakesAnyGrpcToken {
    fn log(&mut self, _: ContextId, _: abi::LogLevel, message: &str) {
        self.logs.push(message.to_string());
    }

    fn header_map(&mut self, _: ContextId, _: abi::MapType) -> Option<&mut dyn abi::Headers> {
        None
    }

    fn buffer(&mut self, _: ContextId, _: abi::BufferType) -> Option<&mut Vec<u8>> {
        None
    }

    fn send_local_response(&mut self, _: ContextId, _: abi::LocalResponse) -> abi::Status {
        abi::Status::Ok
    }

    fn continue_stream(&mut self, _: ContextId, _: abi::StreamType) -> abi::Status {
        abi::Status::Ok
    }

    fn close_stream(&mut self, _: ContextId, _: abi::StreamType) -> abi::Status {
        abi::Status::Ok
    }

    fn grpc_send(&mut self, _: ContextId, _: u32, _: &[u8], _: bool) -> abi::Status {
        self.reached += 1;
        abi::Status::Ok
    }

    fn grpc_cancel(&mut self, _: ContextId, _: u32) -> abi::Status {
        self.reached += 1;
        abi::Status::Ok
    }

    fn grpc_close(&mut self, _: ContextId, _: u32) -> abi::Status {
        self.reached += 1;
        abi::Status::Ok
    }
}

/// A gRPC token the VM did not open (another VM's, in a host that numbers every VM's calls in
/// one table) is `NOT_FOUND` for `proxy_grpc_send`, `proxy_grpc_cancel` and `proxy_grpc_close`,
/// as Envoy answers for a token it does not know, and never reaches the host.
#[test]
fn a_grpc_token_this_vm_did_not_open_is_not_found_without_reaching_the_host() {
    let module = r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_send" (func $send (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_cancel" (func $cancel (param i32) (result i32)))
  (import "env" "proxy_grpc_close" (func $close (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func $record (param $at i32) (param $status i32)
    (i32.store8 (local.get $at) (i32.add (i32.const 48) (local.get $status))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $record (i32.const 0) (call $send (i32.const 12345) (i32.const 0) (i32.const 0)
      (i32.const 0)))
    (call $record (i32.const 1) (call $cancel (i32.const 12345)))
    (call $record (i32.const 2) (call $close (i32.const 12345)))
    (drop (call $log (i32.const 2) (i32.const 0) (i32.const 3)))
    i32.const 0))"#;
    let wasm = wat::parse_str(module).unwrap();
    let runtime = WasmtimeRuntime::new(RuntimeConfig::default()).unwrap();
    let plugin =
        Plugin::load(&runtime, &wasm, PluginConfig::default(), SharedState::new()).unwrap();
    let mut vm = Vm::new(&plugin, Box::new(TakesAnyGrpcToken::default())).unwrap();
    assert!(vm.start().unwrap() && vm.configure().unwrap());
    let stream = vm.create_http_context().unwrap();
    vm.on_request_headers(stream, 0, true).unwrap();
    let host = vm.host_as::<TakesAnyGrpcToken>().unwrap();
    assert_eq!(host.logs, ["111"], "NOT_FOUND (1) three times");
    assert_eq!(host.reached, 0);
}

/// The headers a host sets itself on a plugin's HTTP call, whatever the plugin wrote: its
/// connection's and framing's, any case, but `te: trailers`.
#[test]
fn a_calls_connection_headers_are_the_hosts() {
    let own = abi::HttpCallRequest::is_connection_header;
    for name in [
        "connection",
        "Keep-Alive",
        "proxy-connection",
        "Transfer-Encoding",
        "upgrade",
    ] {
        assert!(own(name.as_bytes(), b"anything"), "{name}");
    }
    assert!(own(b"te", b"gzip"));
    assert!(!own(b"TE", b"Trailers"), "gRPC servers require it");
    for name in ["content-type", "x-te", "authorization", "host"] {
        assert!(!own(name.as_bytes(), b"value"), "{name}");
    }
}
