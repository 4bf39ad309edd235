//! Resident memory per extra VM copy of `lifecycle_bench`, for pwhost and for the raw-wasmtime
//! floor, beyond the guest's own linear memory.
//!
//! Run with `cargo run --release -p pwhost-bench --bin memory [-- COUNT]` (default 200 VMs).
//! Each VM is started and configured and has served one request, as a worker's VM would. Each
//! kind of VM is measured in a fresh child process (`memory --only pwhost|floor COUNT`), so one
//! measurement's freed heap does not flatter the next.

use std::process::{Command, ExitCode};

use abi::{Plugin, PluginConfig, SharedState};
use pwhost_bench::floor::{FloorOptions, FloorPlugin};
use pwhost_bench::{memory, pwhost_request, pwhost_vm, read_plugin, LIFECYCLE_PLUGIN};
use runtime_api::RuntimeConfig;
use runtime_wasmtime::WasmtimeRuntime;

/// VMs created (and kept) before the measured ones; see [`memory::measure`].
const WARM_UP: usize = 300;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, kind, count] if flag == "--only" => {
            let count = count.parse().expect("COUNT must be a number");
            run(kind, count)
        }
        [] | [_] => {
            let count = args.first().map_or("200", String::as_str);
            let exe = std::env::current_exe().expect("own executable");
            for kind in ["pwhost", "floor"] {
                let status = Command::new(&exe)
                    .args(["--only", kind, count])
                    .status()
                    .expect("run child");
                if !status.success() {
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: memory [COUNT]");
            ExitCode::FAILURE
        }
    }
}

fn run(kind: &str, count: usize) -> ExitCode {
    let wasm = match read_plugin(LIFECYCLE_PLUGIN) {
        Ok(wasm) => wasm,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match kind {
        "pwhost" => {
            let runtime = WasmtimeRuntime::new(RuntimeConfig::default()).expect("wasmtime runtime");
            let plugin = Plugin::load(&runtime, &wasm, PluginConfig::default(), SharedState::new())
                .expect("load plugin");
            let (report, _vms) = memory::measure(
                count,
                WARM_UP,
                || {
                    let mut vm = pwhost_vm(&plugin).expect("start VM");
                    pwhost_request(&mut vm).expect("request");
                    vm
                },
                |vm| vm.memory_size(),
            );
            println!("pwhost/wasmtime: {report}");
        }
        "floor" => {
            let plugin = FloorPlugin::<abi::HeaderMap>::new(&wasm, FloorOptions::default())
                .expect("floor plugin");
            let (report, vms) = memory::measure(
                count,
                WARM_UP,
                || {
                    let mut vm = plugin.instantiate().expect("start floor VM");
                    vm.request().expect("request");
                    vm
                },
                |vm| vm.memory_size(),
            );
            println!("floor/wasmtime:  {report}");
            // Cross-check the smaps heuristic where the memory regions are known.
            let by_address: u64 = vms
                .iter()
                .filter_map(|vm| vm.memory_region())
                .map(|(base, len)| memory::region_resident_kib(base, len))
                .sum();
            println!(
                "  check: floor guest memory resident by address {:.1} KiB/VM (smaps heuristic {:.1})",
                by_address as f64 / vms.len() as f64,
                report.guest_resident_per_vm_kib(),
            );
        }
        other => {
            eprintln!("unknown VM kind {other} (pwhost or floor)");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
