//! What the wasmi engine costs per call, with and without fuel slicing, and whether the hot paths
//! allocate.
//!
//! `cargo run --release -p runtime-wasmi --example costs`
//!
//! Prints nanoseconds per operation (best of five rounds) and heap allocations per operation,
//! counted by a global allocator, for:
//! * an empty guest call from the host;
//! * a guest→host call of a typed shape (`i32` arguments, `i32` result) and of an unlisted shape
//!   (which goes through wasmi's untyped `func_new`);
//! * a host function that calls back into the guest (the ABI's allocator pattern);
//! * a tight integer loop (the worst case for fuel metering);
//! * instantiation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime_api::{
    Caller, CompiledModule, GuestFunction, HostFunction, Instance, LinkedModule, RuntimeConfig,
    Signature, Trap, ValType, WasmRuntime,
};
use runtime_wasmi::WasmiRuntime;

/// Counts heap allocations, to check that calls do not allocate.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to the system allocator unchanged; counting has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as in `dealloc`, and the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

#[derive(Default)]
struct State {
    allocator: Option<GuestFunction>,
}

const I32: ValType = ValType::I32;
const I64: ValType = ValType::I64;

fn status(_caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    args[0] = args[0].wrapping_add(args[1]);
    Ok(())
}

fn unlisted(_caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    args[0] = args[0].wrapping_add(args[1]);
    Ok(())
}

fn allocate(caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    let allocator = caller
        .state()
        .allocator
        .ok_or_else(|| Trap::host("no allocator"))?;
    let mut pointer = [0];
    caller.call(allocator, &[16], &mut pointer)?;
    caller
        .memory()
        .write_u32(pointer[0], 7)
        .map_err(|e| Trap::host(e.to_string()))?;
    args[0] = pointer[0];
    Ok(())
}

static HOST: &[HostFunction<State>] = &[
    HostFunction {
        module: "env",
        name: "status",
        signature: Signature::new(&[I32, I32], &[I32]),
        callback: status,
    },
    HostFunction {
        module: "env",
        name: "unlisted",
        signature: Signature::new(&[I64, I64], &[I64]),
        callback: unlisted,
    },
    HostFunction {
        module: "env",
        name: "allocate",
        signature: Signature::new(&[], &[I32]),
        callback: allocate,
    },
];

const MODULE: &str = r#"
(module
  (import "env" "status" (func $status (param i32 i32) (result i32)))
  (import "env" "unlisted" (func $unlisted (param i64 i64) (result i64)))
  (import "env" "allocate" (func $allocate (result i32)))
  (memory (export "memory") 1)
  (func (export "noop"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "call_status") (param $n i32)
    (loop $again
      (drop (call $status (local.get $n) (i32.const 1)))
      (br_if $again (local.tee $n (i32.sub (local.get $n) (i32.const 1))))))
  (func (export "call_unlisted") (param $n i32)
    (loop $again
      (drop (call $unlisted (i64.extend_i32_u (local.get $n)) (i64.const 1)))
      (br_if $again (local.tee $n (i32.sub (local.get $n) (i32.const 1))))))
  (func (export "call_allocate") (param $n i32)
    (loop $again
      (drop (call $allocate))
      (br_if $again (local.tee $n (i32.sub (local.get $n) (i32.const 1))))))
  (func (export "count") (param $n i32)
    (loop $again
      (br_if $again (local.tee $n (i32.sub (local.get $n) (i32.const 1)))))))
"#;

/// Runs `operation` (which performs `per_run` operations) five times; returns the best time per
/// operation and the allocations per operation of the last round.
fn measure(per_run: u64, mut operation: impl FnMut()) -> (f64, f64) {
    operation();
    let mut best = Duration::MAX;
    let mut allocations = 0;
    for _ in 0..5 {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let started = Instant::now();
        operation();
        best = best.min(started.elapsed());
        allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    }
    (
        best.as_nanos() as f64 / per_run as f64,
        allocations as f64 / per_run as f64,
    )
}

fn report(what: &str, (ns, allocations): (f64, f64)) {
    println!("  {what:<38} {ns:>9.1} ns  {allocations:>6.2} allocations");
}

fn run(label: &str, config: RuntimeConfig) -> Result<(), Box<dyn std::error::Error>> {
    println!("{label}");
    let runtime = WasmiRuntime::new(config)?;
    let module: Arc<dyn CompiledModule<State>> = runtime.compile(&wat::parse_str(MODULE)?)?;
    let linked: Arc<dyn LinkedModule<State>> = module.link(HOST)?;
    let mut instance: Box<dyn Instance<State>> = linked.instantiate(State::default())?;
    let allocator = instance.function("malloc");
    instance.state().allocator = allocator;
    let function = |instance: &mut Box<dyn Instance<State>>, name: &str| {
        instance
            .function(name)
            .ok_or_else(|| format!("no export {name}"))
    };
    let noop = function(&mut instance, "noop")?;
    let call_status = function(&mut instance, "call_status")?;
    let call_unlisted = function(&mut instance, "call_unlisted")?;
    let call_allocate = function(&mut instance, "call_allocate")?;
    let count = function(&mut instance, "count")?;
    let mut failed = None;
    let mut call = |instance: &mut Box<dyn Instance<State>>, f, args: &[u64]| {
        if let Err(trap) = instance.call(f, args, &mut []) {
            failed = Some(trap);
        }
    };

    const CALLS: u64 = 100_000;
    report(
        "host→guest call (empty function)",
        measure(CALLS, || {
            for _ in 0..CALLS {
                call(&mut instance, noop, &[]);
            }
        }),
    );
    report(
        "guest→host call, typed shape",
        measure(CALLS, || call(&mut instance, call_status, &[CALLS])),
    );
    report(
        "guest→host call, untyped shape",
        measure(CALLS, || call(&mut instance, call_unlisted, &[CALLS])),
    );
    report(
        "host function calling the guest back",
        measure(CALLS, || call(&mut instance, call_allocate, &[CALLS])),
    );
    const ITERATIONS: u64 = 20_000_000;
    report(
        "tight loop iteration",
        measure(ITERATIONS, || call(&mut instance, count, &[ITERATIONS])),
    );
    const INSTANCES: u64 = 1_000;
    let mut instantiated = Vec::with_capacity(INSTANCES as usize);
    report(
        "instantiate",
        measure(INSTANCES, || {
            instantiated.clear();
            for _ in 0..INSTANCES {
                match linked.instantiate(State::default()) {
                    Ok(instance) => instantiated.push(instance),
                    Err(error) => failed = Some(Trap::host(error.to_string())),
                }
            }
        }),
    );
    if let Some(trap) = failed {
        return Err(trap.into());
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    run(
        "no deadline, not interruptible (fuel off)",
        RuntimeConfig::default(),
    )?;
    run(
        "call deadline 10 s (fuel slices)",
        RuntimeConfig {
            call_deadline: Some(Duration::from_secs(10)),
            ..RuntimeConfig::default()
        },
    )?;
    run(
        "interruptible (fuel slices)",
        RuntimeConfig {
            interruptible: true,
            ..RuntimeConfig::default()
        },
    )?;
    Ok(())
}
