//! Native plugins on the null runtime: compiled-in plugins and proxy-wasm SDK libraries, each VM
//! with its own state.

#![cfg(feature = "null")]

use std::path::PathBuf;

use abi::{HeadersAction, InMemoryHost, LogLevel, Plugin, PluginConfig, SharedState, Vm};
use pwhost::runtimes;
use runtime_api::RuntimeConfig;

fn library(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist/native")
        .join(format!("lib{name}.so"));
    assert!(path.exists(), "run `bash plugins/build.sh` first");
    path.to_string_lossy().into_owned()
}

fn load(plugin: &str) -> Plugin {
    let runtime = runtimes::create("null", RuntimeConfig::default()).unwrap();
    pwhost::plugins::load(
        &*runtime,
        plugin,
        PluginConfig::default(),
        SharedState::new(),
    )
    .unwrap()
}

fn started(plugin: &Plugin) -> Vm {
    let mut vm = Vm::new(plugin, Box::new(InMemoryHost::new())).unwrap();
    assert!(vm.start().unwrap() && vm.configure().unwrap());
    vm
}

/// Runs one request through `vm` and returns its request headers afterwards.
fn request(vm: &mut Vm, path: &str) -> Vec<(String, String)> {
    let stream = vm.create_http_context().unwrap();
    vm.host_as::<InMemoryHost>()
        .unwrap()
        .stream(stream)
        .request_headers
        .add(b":path", path.as_bytes());
    assert_eq!(
        vm.on_request_headers(stream, 1, true).unwrap(),
        HeadersAction::Continue
    );
    vm.on_log(stream).unwrap();
    vm.host_as::<InMemoryHost>()
        .unwrap()
        .stream(stream)
        .request_headers
        .to_string_pairs()
}

fn info_logs(vm: &mut Vm) -> Vec<String> {
    vm.host_as::<InMemoryHost>()
        .unwrap()
        .logs
        .iter()
        .filter(|l| l.level == LogLevel::Info)
        .map(|l| l.message.clone())
        .collect()
}

#[test]
fn two_vms_of_one_sdk_library_on_one_thread_keep_their_own_contexts() {
    // The SDK keeps contexts in the library's thread-locals and panics on a duplicate context
    // id: two VMs sharing one loaded library would both create root context 1 there.
    let plugin = load(&library("http_headers"));
    let mut first = started(&plugin);
    let mut second = started(&plugin);
    for (which, path) in [(0, "/one"), (1, "/two"), (0, "/three")] {
        let vm = if which == 0 { &mut first } else { &mut second };
        let headers = request(vm, path);
        assert!(headers.contains(&("x-pwhost-plugin".into(), "http_headers".into())));
    }
    assert_eq!(
        info_logs(&mut first)
            .iter()
            .filter(|l| l.starts_with("done:"))
            .count(),
        2
    );
    assert_eq!(
        info_logs(&mut second),
        ["request header: :path: /two", "done: /two"]
    );
}

/// Every VM of a plugin runs the library as it was loaded: one replaced on disk meanwhile (a new
/// build deployed) is not what VMs made later run, so no thread runs another build than the
/// checked one. (A configuration update picks the new build up: its identity includes the
/// file's digest.)
#[test]
fn vms_made_after_the_library_file_was_replaced_run_the_library_as_loaded() {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("libplugin.so");
    std::fs::copy(library("http_headers"), &file).unwrap();
    let plugin = load(&file.to_string_lossy());
    let mut before = started(&plugin);
    // Replaced as a deployment would (a new file renamed over the old one).
    let replacement = directory.path().join("libplugin.so.new");
    std::fs::copy(library("lifecycle_bench"), &replacement).unwrap();
    std::fs::rename(&replacement, &file).unwrap();
    let mut after = started(&plugin);
    // Through the plugin layer, the library is read once, with the configuration: what was
    // read is what runs, and what names the VM.
    std::fs::copy(library("http_headers"), &file).unwrap();
    let source = lifecycle::config::CodeSource::File("libplugin.so".into());
    let code = lifecycle::code::read_local(&source, "null", directory.path()).unwrap();
    std::fs::copy(library("lifecycle_bench"), &replacement).unwrap();
    std::fs::rename(&replacement, &file).unwrap();
    let engines = engines::BuildEngines::new(RuntimeConfig::default());
    let runtime = lifecycle::Engines::runtime(&engines, "null").unwrap();
    let read_once = lifecycle::Engines::load_native(
        &engines,
        &*runtime,
        &code,
        PluginConfig::default(),
        SharedState::new(),
    )
    .unwrap();
    let mut through_the_plugin_layer = started(&read_once);
    for vm in [&mut before, &mut after, &mut through_the_plugin_layer] {
        let headers = request(vm, "/a");
        assert!(
            headers.contains(&("x-pwhost-plugin".into(), "http_headers".into())),
            "{headers:?}"
        );
        assert!(!headers.iter().any(|(name, _)| name == "x-bench"));
    }
}

#[test]
fn two_different_sdk_libraries_run_side_by_side() {
    let headers_plugin = load(&library("http_headers"));
    let bench_plugin = load(&library("lifecycle_bench"));
    let mut headers_vm = started(&headers_plugin);
    let mut bench_vm = started(&bench_plugin);
    let from_headers = request(&mut headers_vm, "/a");
    let from_bench = request(&mut bench_vm, "/b");
    assert!(from_headers.contains(&("x-pwhost-plugin".into(), "http_headers".into())));
    assert!(from_bench.contains(&("x-bench".into(), "1".into())));
    assert!(!from_bench.iter().any(|(name, _)| name == "x-pwhost-plugin"));
}

#[test]
fn the_corpus_rust_plugins_are_compiled_in_under_their_own_names() {
    let mut compiled_in = pwhost::plugins::native_plugins();
    compiled_in.sort_unstable();
    // Every Rust plugin of the corpus but `wasi_calls` (about a Wasm build's WASI imports), from
    // the same source files as its Wasm builds.
    assert_eq!(
        compiled_in,
        [
            "abi_coverage",
            "body_rewrite",
            "chain_probe",
            "envoy_attributes",
            "envoy_foreign",
            "envoy_rules",
            "foreign_call",
            "grpc_call",
            "grpc_stream",
            "http_call",
            "http_headers",
            "lifecycle_bench",
            "local_response",
            "metrics",
            "panics",
            "plugin_config",
            "properties",
            "root_http_call",
            "shared_data",
            "shared_queue",
            "tcp_filter",
            "timers",
        ]
    );
}

#[test]
fn compiled_in_plugins_are_registered_by_name_and_isolated_per_vm() {
    assert!(pwhost::plugins::native_plugins().contains(&"http_headers"));
    let plugin = load("native:http_headers");
    let mut first = started(&plugin);
    let mut second = started(&plugin);
    request(&mut first, "/one");
    let headers = request(&mut second, "/two");
    assert!(headers.contains(&("x-pwhost-plugin".into(), "http_headers".into())));
    assert_eq!(
        info_logs(&mut second),
        ["request header: :path: /two", "done: /two"]
    );
}

#[test]
fn an_sdk_library_vm_used_from_another_thread_fails_instead_of_crashing() {
    let plugin = load(&library("http_headers"));
    let mut vm = started(&plugin);
    let failure = std::thread::spawn(move || {
        let stream = vm.create_http_context();
        (stream.is_err(), vm.is_failed())
    })
    .join()
    .expect("no crash");
    assert_eq!(failure, (true, true));
}

#[test]
fn the_null_runtime_reports_that_it_cannot_limit_native_code() {
    let runtime = runtimes::create("null", RuntimeConfig::default()).unwrap();
    let capabilities = runtime.capabilities();
    assert!(!capabilities.sandboxed);
    assert!(!capabilities.call_deadline && !capabilities.interrupt && !capabilities.memory_limit);
    let wasm = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist/rust/http_headers.wasm"),
    )
    .unwrap();
    let error = runtime
        .compile(&wasm)
        .err()
        .expect("no WebAssembly on null");
    assert!(error.to_string().contains("native plugins only"), "{error}");
}

#[test]
fn a_library_that_is_not_a_proxy_wasm_plugin_is_refused() {
    let runtime = runtimes::create("null", RuntimeConfig::default()).unwrap();
    let libc = "/lib/x86_64-linux-gnu/libc.so.6";
    let error = pwhost::plugins::load(&*runtime, libc, PluginConfig::default(), SharedState::new())
        .err()
        .expect("libc is not a plugin");
    assert!(
        format!("{error:#}").contains("not a Proxy-Wasm plugin"),
        "{error:#}"
    );
    let error = pwhost::plugins::load(
        &*runtime,
        "/nonexistent/libplugin.so",
        PluginConfig::default(),
        SharedState::new(),
    )
    .err()
    .expect("no such file");
    assert!(format!("{error:#}").contains("cannot read"), "{error:#}");
}
