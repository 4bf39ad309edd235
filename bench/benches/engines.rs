//! The request lifecycle and VM start on every engine compiled in: the runtime matrix.
//!
//! Group `engines` — for each engine of `pwhost::runtimes::available()`:
//! * `request/ENGINE`: one full request on a started VM of `lifecycle_bench` (as in the
//!   `request_lifecycle` group of the `lifecycle` bench, same plugin, same [`BenchHost`]);
//! * `vm_start/ENGINE`: a new VM copy, started and configured, then dropped (not for
//!   `null-sdk`, see below).
//!
//! The null runtime runs the same plugin source twice: `null-sdk` is the unmodified proxy-wasm
//! SDK build as a native library (`plugins/dist/native/liblifecycle_bench.so`), `null-native`
//! its port to pwhost's native SDK compiled in (`native:lifecycle_bench`). They are the floor for
//! every WebAssembly engine: the same host work with no engine in between.
//!
//! Run: `cargo bench -p pwhost-bench --features all-engines --bench engines`.

use std::hint::black_box;

use abi::{HeadersAction, PluginConfig, SharedState};
use criterion::{criterion_group, criterion_main, Criterion};
use pwhost_bench::{plugin_path, pwhost_request, pwhost_vm, LIFECYCLE_PLUGIN};
use runtime_api::RuntimeConfig;

/// Every (label, engine, plugin) to measure.
fn variants() -> Vec<(String, &'static str, String)> {
    let wasm = plugin_path(LIFECYCLE_PLUGIN).to_string_lossy().into_owned();
    let mut variants = Vec::new();
    for engine in pwhost::runtimes::available() {
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
    let mut group = c.benchmark_group("engines");
    for (label, engine, plugin) in variants() {
        let runtime = pwhost::runtimes::create(engine, RuntimeConfig::default())
            .unwrap_or_else(|e| panic!("{engine}: {e:#}"));
        let plugin = pwhost::plugins::load(
            &*runtime,
            &plugin,
            PluginConfig::default(),
            SharedState::new(),
        )
        .unwrap_or_else(|e| panic!("{label}: {e:#}"));
        let mut vm = pwhost_vm(&plugin).expect("VM starts");
        let outcome = pwhost_request(&mut vm).expect("a request");
        assert_eq!(
            outcome.request,
            HeadersAction::Continue,
            "{label} did its work"
        );
        group.bench_function(format!("request/{label}"), |b| {
            b.iter(|| black_box(pwhost_request(&mut vm).expect("request")))
        });
        if label == "null-sdk" {
            // Each VM of an SDK library maps a private copy of it, and glibc does not unmap a
            // library whose thread-locals registered destructors on a thread still running:
            // criterion's thousands of starts on this one thread would exhaust memory. `pwhost
            // bench --starts N` times a few instead.
            continue;
        }
        group.bench_function(format!("vm_start/{label}"), |b| {
            b.iter(|| black_box(pwhost_vm(&plugin).expect("VM starts")))
        });
    }
    group.finish();
}

criterion_group!(benches, engines);
criterion_main!(benches);
