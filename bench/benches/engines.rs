//! The request lifecycle and VM start on every engine compiled in, each beside its own floor:
//! the runtime matrix.
//!
//! Group `engines` — for each engine of `pwhost::runtimes::available()` (or those named in
//! `PWHOST_BENCH_ENGINES`, comma-separated, e.g. `PWHOST_BENCH_ENGINES=wasmi,wamr`):
//! * `request/ENGINE`: one full request on a started VM of `lifecycle_bench` (the sequence of
//!   the `lifecycle` bench's `request_lifecycle` group), through pwhost, with the headers in
//!   storage the embedder owns and lends ([`ProxyHost`]);
//! * `floor/ENGINE`: the same request through that engine's hand-written floor
//!   ([`pwhost_bench::floor`]), from the same storage;
//! * `vm_start/ENGINE` and `floor_start/ENGINE`: a new VM copy (instance), started and
//!   configured, then dropped (not for `null-sdk`, see below).
//!
//! The null runtime runs the same plugin source twice: `null-sdk` is the unmodified proxy-wasm
//! SDK build as a native library (`plugins/dist/native/liblifecycle_bench.so`), `null-native`
//! its port to pwhost's native SDK compiled in (`native:lifecycle_bench`). They have no floor:
//! with no engine in between, they are the ABI layer's own cost.
//!
//! Run: `cargo bench -p pwhost-bench --features all-engines --bench engines`.

use std::hint::black_box;

use abi::{HeadersAction, PluginConfig, SharedState};
use criterion::{criterion_group, criterion_main, Criterion};
use pwhost_bench::floor::engine_floor;
use pwhost_bench::{
    plugin_path, pwhost_request_in, pwhost_vm_in, read_plugin, ProxyHeaders, LIFECYCLE_PLUGIN,
};
use runtime_api::RuntimeConfig;

/// Every (label, engine, plugin) to measure.
fn variants() -> Vec<(String, &'static str, String)> {
    let wasm = plugin_path(LIFECYCLE_PLUGIN).to_string_lossy().into_owned();
    let chosen = std::env::var("PWHOST_BENCH_ENGINES").ok();
    let chosen: Option<Vec<&str>> = chosen.as_deref().map(|list| list.split(',').collect());
    let mut variants = Vec::new();
    for engine in pwhost::runtimes::available() {
        if chosen
            .as_ref()
            .is_some_and(|chosen| !chosen.contains(engine))
        {
            continue;
        }
        if *engine == "null" {
            let library = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../plugins/dist/native/liblifecycle_bench.so");
            variants.push((
                "null-sdk".into(),
                *engine,
                library.to_string_lossy().into_owned(),
            ));
            variants.push((
                "null-native".into(),
                *engine,
                "native:lifecycle_bench".into(),
            ));
        } else {
            variants.push((engine.to_string(), *engine, wasm.clone()));
        }
    }
    variants
}

fn engines(c: &mut Criterion) {
    let wasm = read_plugin(LIFECYCLE_PLUGIN).unwrap_or_else(|e| panic!("{e}"));
    let mut group = c.benchmark_group("engines");
    for (label, engine, plugin) in variants() {
        {
            let runtime = pwhost::runtimes::create(engine, RuntimeConfig::default())
                .unwrap_or_else(|e| panic!("{engine}: {e:#}"));
            let plugin = pwhost::plugins::load(
                &*runtime,
                &plugin,
                PluginConfig::default(),
                SharedState::new(),
            )
            .unwrap_or_else(|e| panic!("{label}: {e:#}"));
            let mut vm = pwhost_vm_in::<ProxyHeaders>(&plugin).expect("VM starts");
            let outcome = pwhost_request_in::<ProxyHeaders>(&mut vm).expect("a request");
            assert_eq!(
                outcome.request,
                HeadersAction::Continue,
                "{label} did its work"
            );
            group.bench_function(format!("request/{label}"), |b| {
                b.iter(|| black_box(pwhost_request_in::<ProxyHeaders>(&mut vm).expect("request")))
            });
            // Each VM of an SDK library maps a private copy of it, and glibc does not unmap a
            // library whose thread-locals registered destructors on a thread still running:
            // criterion's thousands of starts on this one thread would exhaust memory. `pwhost
            // bench --starts N` times a few instead.
            if label != "null-sdk" {
                group.bench_function(format!("vm_start/{label}"), |b| {
                    b.iter(|| {
                        drop(black_box(
                            pwhost_vm_in::<ProxyHeaders>(&plugin).expect("VM"),
                        ))
                    })
                });
            }
        }
        let Some(floor) = engine_floor::<ProxyHeaders>(engine, &wasm) else {
            continue;
        };
        let floor = floor.unwrap_or_else(|e| panic!("{engine} floor: {e:#}"));
        let mut vm = floor
            .instantiate()
            .unwrap_or_else(|e| panic!("{engine} floor: {e:#}"));
        let outcome = vm
            .request()
            .unwrap_or_else(|e| panic!("{engine} floor: {e:#}"));
        assert_eq!(outcome.request, HeadersAction::Continue, "{engine} floor");
        group.bench_function(format!("floor/{label}"), |b| {
            b.iter(|| black_box(vm.request().expect("floor request")))
        });
        group.bench_function(format!("floor_start/{label}"), |b| {
            b.iter(|| drop(black_box(floor.instantiate().expect("floor instance"))))
        });
    }
    group.finish();
}

criterion_group!(benches, engines);
criterion_main!(benches);
