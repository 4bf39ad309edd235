//! pwhost against its floor on wasmtime, on the `lifecycle_bench` plugin.
//!
//! Group `request_lifecycle` — one full HTTP request per iteration on a started VM:
//! create the HTTP context, `proxy_on_request_headers` with the 10 headers of
//! [`REQUEST_HEADERS`] (the plugin reads all 10 by name and adds `x-bench`),
//! `proxy_on_response_headers` with [`RESPONSE_HEADERS`] (the plugin reads `:status`),
//! `proxy_on_log` (the plugin logs one line), `proxy_on_done`, `proxy_on_delete`.
//!
//! * `pwhost/wasmtime`: through `abi::Vm` on `runtime_wasmtime`, with [`BenchHost`].
//! * `floor/wasmtime`: the hand-written raw-wasmtime host of [`pwhost_bench::floor`], doing the
//!   same callbacks and the same embedder work (the same [`pwhost_bench::BenchStream`]).
//! * `pwhost/wasmtime+deadline`: pwhost with a 1 s deadline per call.
//! * `floor/wasmtime+epoch`: the floor with the same deadline, enforced the same way (epoch
//!   interruption, a ticker every 100 ms, a fresh deadline before every top-level call).
//! * `.../proxy-headers`: each of the above with the headers in storage the embedder owns and
//!   lends through `abi::Headers` ([`ProxyHeaders`], a proxy's arena-backed map), instead of
//!   pwhost's own `abi::HeaderMap`; the floor reads and writes the same storage.
//!
//! Group `vm_start` — a new VM copy of an already-loaded plugin, ready to serve:
//! instantiate, `_initialize`, `proxy_on_context_create(1, 0)`, `proxy_on_vm_start`,
//! `proxy_on_configure`. The VM is dropped inside the timed routine (plain `iter`), so each
//! figure is the whole cost of a VM copy's life minus its requests: creation plus teardown.
//!
//! Both groups name the pwhost and floor variants side by side so one run compares them.
//!
//! Group `plugin_layer` — what the `lifecycle` layer adds (a proxy's view: a worker per thread,
//! a hold on the plugin's VM copy per stream), to compare with the groups above in one run:
//! * `new_copy`: a new worker's first stream: the VM copy made, its root context started and
//!   configured, the hold given back, the worker (and copy) dropped — against `vm_start`.
//! * `admit_release`: a stream's lookup of its VM copy on a warm worker (admit, find the VM,
//!   release), no callback.
//! * `admit_release+live`: the same through [`lifecycle::ThreadWorkers`] (the per-stream check
//!   for a configuration update).
//! * `request`: one full request through the worker — against `request_lifecycle`.
//!
//! Run: `cargo bench -p pwhost-bench --bench lifecycle`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use abi::HeaderMap;
use abi::{HeadersAction, Plugin, PluginConfig, SharedState, Vm};
use criterion::{criterion_group, criterion_main, Criterion};
use lifecycle::{Admission, LivePlugins, PluginId, StreamVm, ThreadWorkers, Worker};
use pwhost_bench::floor::{FloorOptions, FloorPlugin, FloorVm};
use pwhost_bench::pwhost_request;
use pwhost_bench::{
    pwhost_request_in, pwhost_vm, pwhost_vm_in, read_plugin, BenchHeaders, BenchHost, ProxyHeaders,
    LIFECYCLE_PLUGIN, REQUEST_HEADERS,
};
use runtime_api::RuntimeConfig;
use runtime_wasmtime::{WasmtimeOptions, WasmtimeRuntime};

/// The call deadline of the `+deadline`/`+epoch` variants.
const DEADLINE: Duration = Duration::from_secs(1);

fn plugin_bytes() -> Vec<u8> {
    read_plugin(LIFECYCLE_PLUGIN).unwrap_or_else(|e| panic!("{e}"))
}

fn runtime(config: RuntimeConfig, options: WasmtimeOptions) -> WasmtimeRuntime {
    WasmtimeRuntime::with_options(config, options).expect("wasmtime runtime")
}

fn load(runtime: &WasmtimeRuntime, wasm: &[u8]) -> Plugin {
    Plugin::load(runtime, wasm, PluginConfig::default(), SharedState::new())
        .expect("load lifecycle_bench")
}

fn deadline_config() -> RuntimeConfig {
    RuntimeConfig {
        call_deadline: Some(DEADLINE),
        ..Default::default()
    }
}

/// Runs one request on a pwhost VM and checks the plugin did its work, so a broken setup fails
/// loudly instead of benchmarking nothing.
fn verify_pwhost(vm: &mut Vm) {
    verify_pwhost_in::<HeaderMap>(vm);
}

/// As [`verify_pwhost`], with the headers in storage `M`.
fn verify_pwhost_in<M: BenchHeaders>(vm: &mut Vm) {
    let logs = vm.host_as::<BenchHost<M>>().unwrap().stream.logs();
    let outcome = pwhost_request_in::<M>(vm).expect("pwhost request");
    assert_eq!(outcome.request, HeadersAction::Continue);
    assert_eq!(outcome.response, HeadersAction::Continue);
    let stream = &vm.host_as::<BenchHost<M>>().unwrap().stream;
    assert_eq!(
        stream.logs(),
        logs + 1,
        "the plugin logs one line per request"
    );
    assert_eq!(stream.request_headers().get(b"x-bench"), Some(&b"1"[..]));
    assert_eq!(stream.request_headers().len(), REQUEST_HEADERS.len() + 1);
}

/// As [`verify_pwhost`], for the floor.
fn verify_floor<M: BenchHeaders>(vm: &mut FloorVm<M>) {
    let logs = vm.state().stream().logs();
    let outcome = vm.request().expect("floor request");
    assert_eq!(outcome.request, HeadersAction::Continue);
    assert_eq!(outcome.response, HeadersAction::Continue);
    let stream = vm.state().stream();
    assert_eq!(
        stream.logs(),
        logs + 1,
        "the plugin logs one line per request"
    );
    assert_eq!(stream.request_headers().get(b"x-bench"), Some(&b"1"[..]));
    assert_eq!(stream.request_headers().len(), REQUEST_HEADERS.len() + 1);
}

/// pwhost and the floor on one configuration and header storage `M`, side by side.
fn request_pair<M: BenchHeaders>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    wasm: &[u8],
    (pwhost_name, floor_name): (&str, &str),
    deadline: Option<Duration>,
) {
    let config = match deadline {
        Some(_) => deadline_config(),
        None => RuntimeConfig::default(),
    };
    // Each engine (and its epoch ticker thread) lives only while its benchmark runs.
    {
        let runtime = runtime(config, WasmtimeOptions::default());
        let plugin = load(&runtime, wasm);
        let mut vm = pwhost_vm_in::<M>(&plugin).expect("start pwhost VM");
        verify_pwhost_in::<M>(&mut vm);
        group.bench_function(pwhost_name, |b| {
            b.iter(|| black_box(pwhost_request_in::<M>(&mut vm).unwrap()))
        });
    }
    {
        let options = FloorOptions {
            deadline,
            pooling_instances: None,
        };
        let plugin = FloorPlugin::<M>::new(wasm, options).expect("floor plugin");
        let mut vm = plugin.instantiate().expect("start floor VM");
        verify_floor(&mut vm);
        group.bench_function(floor_name, |b| b.iter(|| black_box(vm.request().unwrap())));
    }
}

fn request_lifecycle(c: &mut Criterion) {
    let wasm = plugin_bytes();
    let mut group = c.benchmark_group("request_lifecycle");
    let names = ("pwhost/wasmtime", "floor/wasmtime");
    request_pair::<HeaderMap>(&mut group, &wasm, names, None);
    let names = ("pwhost/wasmtime+deadline", "floor/wasmtime+epoch");
    request_pair::<HeaderMap>(&mut group, &wasm, names, Some(DEADLINE));
    let names = (
        "pwhost/wasmtime/proxy-headers",
        "floor/wasmtime/proxy-headers",
    );
    request_pair::<ProxyHeaders>(&mut group, &wasm, names, None);
    let names = (
        "pwhost/wasmtime+deadline/proxy-headers",
        "floor/wasmtime+epoch/proxy-headers",
    );
    request_pair::<ProxyHeaders>(&mut group, &wasm, names, Some(DEADLINE));
    group.finish();
}

fn vm_start(c: &mut Criterion) {
    let wasm = plugin_bytes();
    let mut group = c.benchmark_group("vm_start");

    for (name, pooling) in [("", None), ("+pooling", Some(100))] {
        {
            let options = WasmtimeOptions {
                pooling_instances: pooling,
            };
            let runtime = runtime(RuntimeConfig::default(), options);
            let plugin = load(&runtime, &wasm);
            verify_pwhost(&mut pwhost_vm(&plugin).expect("start pwhost VM"));
            group.bench_function(format!("pwhost/wasmtime{name}"), |b| {
                // The VM is dropped inside the timed routine: creation plus teardown.
                b.iter(|| drop(black_box(pwhost_vm(&plugin).unwrap())))
            });
        }
        {
            let options = FloorOptions {
                deadline: None,
                pooling_instances: pooling,
            };
            let plugin = FloorPlugin::<HeaderMap>::new(&wasm, options).expect("floor plugin");
            verify_floor(&mut plugin.instantiate().expect("start floor VM"));
            group.bench_function(format!("floor/wasmtime{name}"), |b| {
                // As above: creation plus teardown.
                b.iter(|| drop(black_box(plugin.instantiate().unwrap())))
            });
        }
    }
    group.finish();
}

/// The `lifecycle_bench` plugin loaded through the lifecycle layer on wasmtime.
fn lifecycle_plugins() -> Arc<lifecycle::Plugins> {
    let yaml = format!(
        "name: bench\nvm_config:\n  runtime: wasmtime\n  code: {{local: {{filename: {:?}}}}}\n",
        pwhost_bench::plugin_path(LIFECYCLE_PLUGIN).to_string_lossy()
    );
    let deployment = lifecycle::parse(&yaml).expect("valid configuration");
    let engines = pwhost::configured::BuildEngines::new(RuntimeConfig::default());
    let plugins = lifecycle::Plugins::load(
        &deployment,
        &engines,
        &lifecycle::LoadOptions::default(),
        SharedState::new(),
    )
    .expect("the plugin loads");
    Arc::new(plugins)
}

fn bench_worker(plugins: &Arc<lifecycle::Plugins>) -> Worker {
    Worker::new(Arc::clone(plugins), || Box::new(BenchHost::new()))
}

/// A stream's hold on the plugin's copy.
fn admit(worker: &mut Worker) -> StreamVm {
    match worker.admit(PluginId(0)) {
        Admission::Run(held) => held,
        _ => panic!("the plugin failed"),
    }
}

fn plugin_layer(c: &mut Criterion) {
    let plugins = lifecycle_plugins();
    let mut group = c.benchmark_group("plugin_layer");
    group.bench_function("new_copy", |b| {
        b.iter(|| {
            let mut worker = bench_worker(&plugins);
            let held = admit(&mut worker);
            worker.release(held);
            drop(black_box(worker));
        })
    });
    let mut worker = bench_worker(&plugins);
    let held = admit(&mut worker);
    verify_pwhost(worker.vm(&held).expect("the VM"));
    worker.release(held);
    group.bench_function("admit_release", |b| {
        b.iter(|| {
            let held = admit(&mut worker);
            black_box(worker.vm(&held).is_some());
            worker.release(held);
        })
    });
    group.bench_function("request", |b| {
        b.iter(|| {
            let held = admit(&mut worker);
            let vm = worker.vm(&held).expect("the VM");
            black_box(pwhost_request(vm).unwrap());
            worker.release(held);
        })
    });
    let live = Arc::new(LivePlugins::new(
        Arc::try_unwrap(lifecycle_plugins()).unwrap_or_else(|_| unreachable!("one owner")),
    ));
    let mut threads = ThreadWorkers::new(
        Arc::clone(&live),
        Box::new(|plugins| bench_worker(&plugins)),
    );
    group.bench_function("admit_release+live", |b| {
        b.iter(|| {
            let (generation, worker) = threads.for_new_stream();
            let held = admit(worker);
            black_box(worker.vm(&held).is_some());
            worker.release(held);
            threads.stream_ended(generation);
        })
    });
    group.finish();
}

criterion_group!(benches, request_lifecycle, vm_start, plugin_layer);
criterion_main!(benches);
