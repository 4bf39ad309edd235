//! The hot paths allocate nothing on the Rust side: host→guest calls, guest→host calls, and
//! host functions calling back into the guest, with a deadline and interrupts enabled (the
//! watched path). WAMR's own C code on these paths (`wasm_runtime_call_wasm` for integer
//! functions, raw natives with at most 16 arguments) uses stack buffers only.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use runtime_api::{
    Caller, CompiledModule, GuestFunction, HostFunction, RuntimeConfig, Signature, Trap, ValType,
    WasmRuntime,
};
use runtime_wamr::WamrRuntime;

/// Counts allocations per thread, so tests running in parallel do not disturb each other.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; counting touches only a const-initialised
// thread-local cell (`try_with` tolerates threads that are exiting).
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: the caller's layout is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: as in `alloc` and `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[derive(Default)]
struct State {
    sum: u64,
    allocator: Option<GuestFunction>,
}

const I32: ValType = ValType::I32;

fn add(caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    caller.state().sum += args[0] + args[1];
    args[0] += args[1];
    Ok(())
}

/// Allocates in the guest and writes there, as the ABI does to return data.
fn reply(caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    let allocator = caller.state().allocator.ok_or_else(|| Trap::host("none"))?;
    let mut pointer = [0];
    caller.call(allocator, &[16], &mut pointer)?;
    let (state, mut memory) = caller.state_and_memory();
    state.sum += 1;
    memory
        .write(pointer[0], b"sixteen bytes!!!")
        .map_err(|e| Trap::host(e.to_string()))?;
    args[0] = pointer[0];
    Ok(())
}

static HOST: &[HostFunction<State>] = &[
    HostFunction {
        module: "env",
        name: "add",
        signature: Signature::new(&[I32, I32], &[I32]),
        callback: add,
    },
    HostFunction {
        module: "env",
        name: "reply",
        signature: Signature::new(&[], &[I32]),
        callback: reply,
    },
];

#[test]
fn calls_in_both_directions_allocate_nothing() {
    let wasm = wat::parse_str(
        r#"(module
             (import "env" "add" (func $add (param i32 i32) (result i32)))
             (import "env" "reply" (func $reply (result i32)))
             (memory (export "memory") 1)
             (global $next (mut i32) (i32.const 1024))
             (func (export "malloc") (param $size i32) (result i32)
               (global.get $next)
               (global.set $next (i32.and (i32.add (global.get $next) (local.get $size))
                                          (i32.const 0x7fff))))
             (func (export "on_request") (param $a i32) (result i32)
               (i32.add (call $add (local.get $a) (i32.const 1)) (call $reply))))"#,
    )
    .unwrap();
    let runtime = WamrRuntime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_secs(10)),
        interruptible: true,
        ..Default::default()
    })
    .unwrap();
    let module: Arc<dyn CompiledModule<State>> = runtime.compile(&wasm).unwrap();
    let mut instance = module
        .link(HOST)
        .unwrap()
        .instantiate(State::default())
        .unwrap();
    instance.state().allocator = instance.function("malloc");
    let on_request = instance.function("on_request").unwrap();
    let mut result = [0];
    instance.call(on_request, &[1], &mut result).unwrap();
    let before = allocations();
    for i in 0..1000 {
        instance.call(on_request, &[i], &mut result).unwrap();
    }
    assert_eq!(allocations() - before, 0, "allocations in 1000 calls");
    assert_eq!(
        instance.state().sum,
        2 + 1 + (0..1000).map(|i| i + 1 + 1).sum::<u64>()
    );
}
