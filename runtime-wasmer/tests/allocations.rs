//! The hot paths allocate nothing: host→guest calls, guest→host calls and (almost) re-entrant
//! calls, counted with a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use runtime_api::{
    Caller, CompiledModule, HostFunction, Instance, RuntimeConfig, Signature, Trap, ValType,
    WasmRuntime,
};
use runtime_wasmer::{Compiler, WasmerRuntime};

/// The system allocator, counting allocations.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; counting has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

#[derive(Default)]
struct State {
    total: u64,
    allocator: Option<runtime_api::GuestFunction>,
}

/// Reads a byte of guest memory and adds it up (what every Proxy-Wasm host function does).
fn read(caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    let (state, memory) = caller.state_and_memory();
    let byte = memory
        .slice(args[0], 1)
        .map_err(|e| Trap::host(e.to_string()))?[0];
    state.total += u64::from(byte);
    args[0] = 0;
    Ok(())
}

/// Calls the guest's allocator, as the ABI does to return data.
fn allocate(caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    let allocator = caller
        .state()
        .allocator
        .ok_or_else(|| Trap::host("no allocator"))?;
    let mut pointer = [0];
    caller.call(allocator, &[16], &mut pointer)?;
    args[0] = pointer[0];
    Ok(())
}

static HOST: &[HostFunction<State>] = &[
    HostFunction {
        module: "env",
        name: "read",
        signature: Signature::new(&[ValType::I32], &[ValType::I32]),
        callback: read,
    },
    HostFunction {
        module: "env",
        name: "allocate",
        signature: Signature::new(&[], &[ValType::I32]),
        callback: allocate,
    },
];

const MODULE: &str = r#"
(module
  (import "env" "read" (func $read (param i32) (result i32)))
  (import "env" "allocate" (func $allocate (result i32)))
  (memory (export "memory") 1)
  (global $next (mut i32) (i32.const 1024))
  (func (export "malloc") (param $size i32) (result i32)
    (global.set $next (i32.and (i32.add (global.get $next) (local.get $size)) (i32.const 0xfff0)))
    (global.get $next))
  (func (export "reads") (param $n i32) (result i32)
    (loop $l
      (drop (call $read (local.get $n)))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br_if $l (local.get $n)))
    (i32.const 0))
  (func (export "allocates") (result i32) (call $allocate)))
"#;

/// Allocations per call of `name` with `args` over `calls` calls, after a warm-up; the least of
/// three rounds, so that a one-off allocation elsewhere in the process (the test harness's
/// threads, a lazily initialised global) does not count.
fn allocations_per_call(
    instance: &mut dyn Instance<State>,
    name: &str,
    args: &[u64],
    calls: usize,
) -> f64 {
    let function = instance.function(name).unwrap();
    let mut result = [0];
    for _ in 0..100 {
        instance.call(function, args, &mut result).unwrap();
    }
    (0..3)
        .map(|_| {
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            for _ in 0..calls {
                instance.call(function, args, &mut result).unwrap();
            }
            (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / calls as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn compilers() -> Vec<Compiler> {
    vec![
        #[cfg(feature = "cranelift")]
        Compiler::Cranelift,
        #[cfg(feature = "singlepass")]
        Compiler::Singlepass,
        #[cfg(feature = "llvm")]
        Compiler::Llvm,
    ]
}

// One test, so that no other test allocates while this one counts.
#[test]
fn calls_in_both_directions_do_not_allocate() {
    let configs = [
        RuntimeConfig::default(),
        RuntimeConfig {
            call_deadline: Some(Duration::from_secs(10)),
            interruptible: true,
            ..Default::default()
        },
    ];
    for compiler in compilers() {
        for config in &configs {
            let runtime = WasmerRuntime::new(compiler, config.clone()).unwrap();
            let module: Arc<dyn CompiledModule<State>> =
                runtime.compile(&wat::parse_str(MODULE).unwrap()).unwrap();
            let mut instance = module
                .link(HOST)
                .unwrap()
                .instantiate(State::default())
                .unwrap();
            let malloc = instance.function("malloc");
            instance.state().allocator = malloc;
            // A top-level call making 100 host calls.
            let per_call = allocations_per_call(&mut *instance, "reads", &[100], 1000);
            assert_eq!(
                per_call, 0.0,
                "{compiler:?} {config:?}: host and guest calls"
            );
            // A top-level call whose host function calls back into the guest. wasmer runs every
            // guest call on a coroutine stack; a nested call takes a second stack from a global
            // lock-free queue (crossbeam's `SegQueue`), which allocates one block per 31 pushes.
            let per_call = allocations_per_call(&mut *instance, "allocates", &[], 3100);
            assert!(
                per_call <= 1.0 / 31.0 + 1e-9,
                "{compiler:?} {config:?}: {per_call} allocations per re-entrant call"
            );
        }
    }
}
