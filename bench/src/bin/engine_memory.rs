//! Resident memory per extra VM copy of `lifecycle_bench` on any engine compiled in.
//!
//! Run with `cargo run --release -p pwhost-bench --features wamr --bin engine_memory -- wamr
//! [COUNT]` (default 200 VMs). Linux with glibc only: it reads `/proc/self/status` and calls
//! `mallinfo2`.
//!
//! Each VM is started, configured and has served one request, as a worker's VM would; all stay
//! alive. Warm-up VMs are created first, so one-time initialisation and the heap freed by
//! compiling do not flatter the figure.
//!
//! Splitting off the guest's memory: WAMR, wasmtime, wasmer and V8 map each linear memory with
//! `mmap` of its own, and allocate everything else (instance, tables, stacks, host state) with
//! `malloc`. So for them the growth of glibc's in-use heap (`mallinfo2`) is what a VM costs
//! beyond its linear memory (an upper bound: allocated pages count even if never touched), and
//! the rest of the resident growth is guest memory. wasmi keeps linear memory on the heap, so its
//! heap figure includes the guest's memory.

use std::process::ExitCode;

use abi::{Plugin, PluginConfig, SharedState};
use pwhost_bench::{memory, plugin_path, pwhost_request, pwhost_vm, LIFECYCLE_PLUGIN};
use runtime_api::RuntimeConfig;

/// VMs created (and kept) before the measured ones.
const WARM_UP: usize = 300;

/// glibc's `struct mallinfo2`.
#[repr(C)]
struct MallInfo2 {
    arena: usize,
    ordblks: usize,
    smblks: usize,
    hblks: usize,
    hblkhd: usize,
    usmblks: usize,
    fsmblks: usize,
    uordblks: usize,
    fordblks: usize,
    keepcost: usize,
}

unsafe extern "C" {
    fn mallinfo2() -> MallInfo2;
}

/// `malloc`ed memory in use (small blocks plus mmapped chunks), in KiB.
fn heap_in_use_kib() -> u64 {
    // SAFETY: `mallinfo2` only reads the allocator's statistics; the struct matches glibc's.
    let info = unsafe { mallinfo2() };
    ((info.uordblks + info.hblkhd) / 1024) as u64
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (runtime, count) = match args.as_slice() {
        [runtime] => (runtime.as_str(), Ok(200)),
        [runtime, count] => (runtime.as_str(), count.parse::<usize>()),
        _ => {
            eprintln!(
                "usage: engine_memory RUNTIME [COUNT]  (engines in this build: {})",
                pwhost::runtimes::available().join(", ")
            );
            return ExitCode::FAILURE;
        }
    };
    let count = match count {
        Ok(count) if count > 0 => count,
        _ => {
            eprintln!("COUNT must be a positive number");
            return ExitCode::FAILURE;
        }
    };
    match measure(runtime, count) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn measure(runtime_name: &str, count: usize) -> anyhow::Result<()> {
    let runtime = pwhost::runtimes::create(runtime_name, RuntimeConfig::default())?;
    let path = plugin_path(LIFECYCLE_PLUGIN);
    let plugin: Plugin = pwhost::plugins::load(
        runtime.as_ref(),
        &path.to_string_lossy(),
        PluginConfig::default(),
        SharedState::new(),
    )?;
    let make_vm = || -> anyhow::Result<abi::Vm> {
        let mut vm = pwhost_vm(&plugin)?;
        pwhost_request(&mut vm)?;
        Ok(vm)
    };
    let mut vms = Vec::with_capacity(WARM_UP + count);
    for _ in 0..WARM_UP {
        vms.push(make_vm()?);
    }
    let (rss_before, heap_before) = (memory::rss_kib(), heap_in_use_kib());
    for _ in 0..count {
        vms.push(make_vm()?);
    }
    let (rss_after, heap_after) = (memory::rss_kib(), heap_in_use_kib());
    let memory_size_kib = vms.last_mut().map_or(0, |vm| vm.memory_size() / 1024);
    let per_vm = |kib: u64| kib as f64 / count as f64;
    let total = per_vm(rss_after.saturating_sub(rss_before));
    let heap = per_vm(heap_after.saturating_sub(heap_before));
    println!(
        "{runtime_name}: {count} VMs: RSS {rss_before} -> {rss_after} KiB, {total:.1} KiB/VM \
         resident in total; malloc'ed heap {heap:.1} KiB/VM; the rest {:.1} KiB/VM \
         (memory.size {memory_size_kib} KiB)",
        total - heap
    );
    Ok(())
}
