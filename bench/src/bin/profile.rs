//! Runs the benchmarked request in a loop, for profilers.
//!
//! `profile KIND [COUNT]` with KIND one of `pwhost`, `floor`, `pwhost-deadline`,
//! `floor-epoch`, `pwhost-proxy`, `floor-proxy` (the last two with the headers in the
//! embedder's own storage, [`ProxyHeaders`]; COUNT requests on one started VM), `pwhost-null`
//! (the same on the null runtime, `native:lifecycle_bench`, when built with `null`), or `pwhost-start`, `floor-start`,
//! `pwhost-start-pooling`, `floor-start-pooling` (start and drop COUNT VMs).
//! The measured work is in `run_*` functions that are never inlined, e.g.:
//!
//! ```text
//! valgrind --tool=callgrind --toggle-collect='profile::run_*' \
//!     target/release/profile pwhost 20000
//! perf record -g target/release/profile pwhost 2000000
//! ```

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use abi::{HeaderMap, Plugin, PluginConfig, SharedState, Vm};
use pwhost_bench::floor::{FloorOptions, FloorPlugin, FloorVm};
use pwhost_bench::{
    pwhost_request_in, pwhost_vm, pwhost_vm_in, read_plugin, BenchHeaders, ProxyHeaders,
    LIFECYCLE_PLUGIN,
};
use runtime_api::RuntimeConfig;
use runtime_wasmtime::{WasmtimeOptions, WasmtimeRuntime};

/// The call deadline of the `-deadline`/`-epoch` kinds, as in the criterion benchmarks.
const DEADLINE: Duration = Duration::from_secs(1);

#[inline(never)]
fn run_pwhost<M: BenchHeaders>(vm: &mut Vm, requests: u64) {
    for _ in 0..requests {
        black_box(pwhost_request_in::<M>(vm).unwrap());
    }
}

#[inline(never)]
fn run_floor<M: BenchHeaders>(vm: &mut FloorVm<M>, requests: u64) {
    for _ in 0..requests {
        black_box(vm.request().unwrap());
    }
}

#[inline(never)]
fn run_pwhost_start(plugin: &Plugin, count: u64) {
    for _ in 0..count {
        drop(black_box(pwhost_vm(plugin).unwrap()));
    }
}

#[inline(never)]
fn run_floor_start(plugin: &FloorPlugin<HeaderMap>, count: u64) {
    for _ in 0..count {
        drop(black_box(plugin.instantiate().unwrap()));
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let kind = args.next().unwrap_or_default();
    let count: u64 = args
        .next()
        .map(|n| n.parse().expect("COUNT must be a number"))
        .unwrap_or(1_000_000);
    let wasm = match read_plugin(LIFECYCLE_PLUGIN) {
        Ok(wasm) => wasm,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let deadline = RuntimeConfig {
        call_deadline: Some(DEADLINE),
        ..Default::default()
    };
    let load = |config: RuntimeConfig, pooling_instances: Option<u32>| {
        let options = WasmtimeOptions { pooling_instances };
        let runtime = WasmtimeRuntime::with_options(config, options).expect("wasmtime runtime");
        let plugin = Plugin::load(&runtime, &wasm, PluginConfig::default(), SharedState::new())
            .expect("load plugin");
        (runtime, plugin)
    };
    let floor = |deadline: Option<Duration>, pooling_instances: Option<u32>| {
        let options = FloorOptions {
            deadline,
            pooling_instances,
        };
        FloorPlugin::<HeaderMap>::new(&wasm, options).expect("floor plugin")
    };
    let pooling = kind.ends_with("-pooling").then_some(100);
    match kind.as_str() {
        "pwhost" | "pwhost-deadline" => {
            let config = if kind == "pwhost" {
                RuntimeConfig::default()
            } else {
                deadline
            };
            let (_runtime, plugin) = load(config, None);
            let mut vm = pwhost_vm(&plugin).expect("start VM");
            let start = Instant::now();
            run_pwhost::<HeaderMap>(&mut vm, count);
            report(&kind, count, start);
        }
        "pwhost-proxy" => {
            let (_runtime, plugin) = load(RuntimeConfig::default(), None);
            let mut vm = pwhost_vm_in::<ProxyHeaders>(&plugin).expect("start VM");
            let start = Instant::now();
            run_pwhost::<ProxyHeaders>(&mut vm, count);
            report(&kind, count, start);
        }
        #[cfg(feature = "null")]
        "pwhost-null" => {
            let runtime =
                pwhost::runtimes::create("null", RuntimeConfig::default()).expect("null runtime");
            let plugin = pwhost::plugins::load(
                &*runtime,
                "native:lifecycle_bench",
                PluginConfig::default(),
                SharedState::new(),
            )
            .expect("native plugin");
            let mut vm = pwhost_vm_in::<ProxyHeaders>(&plugin).expect("start VM");
            let start = Instant::now();
            run_pwhost::<ProxyHeaders>(&mut vm, count);
            report(&kind, count, start);
        }
        "floor-proxy" => {
            let plugin = FloorPlugin::<ProxyHeaders>::new(&wasm, FloorOptions::default())
                .expect("floor plugin");
            let mut vm = plugin.instantiate().expect("start VM");
            let start = Instant::now();
            run_floor(&mut vm, count);
            report(&kind, count, start);
        }
        "floor" | "floor-epoch" => {
            let plugin = floor((kind == "floor-epoch").then_some(DEADLINE), None);
            let mut vm = plugin.instantiate().expect("start VM");
            let start = Instant::now();
            run_floor(&mut vm, count);
            report(&kind, count, start);
        }
        "pwhost-start" | "pwhost-start-pooling" => {
            let (_runtime, plugin) = load(RuntimeConfig::default(), pooling);
            let start = Instant::now();
            run_pwhost_start(&plugin, count);
            report(&kind, count, start);
        }
        "floor-start" | "floor-start-pooling" => {
            let plugin = floor(None, pooling);
            let start = Instant::now();
            run_floor_start(&plugin, count);
            report(&kind, count, start);
        }
        _ => {
            eprintln!(
                "usage: profile KIND [COUNT], KIND: pwhost, floor, pwhost-deadline, floor-epoch, \
                 pwhost-proxy, floor-proxy, pwhost-null, pwhost-start[-pooling], floor-start[-pooling]"
            );
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn report(kind: &str, count: u64, start: Instant) {
    let elapsed = start.elapsed();
    eprintln!(
        "{kind}: {count} in {elapsed:.2?}, {:.1} ns each",
        elapsed.as_nanos() as f64 / count as f64
    );
}
