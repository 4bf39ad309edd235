//! The ABI allocates nothing on the request path for an embedder whose storage needs no
//! allocation (the benchmarks' [`ProxyHeaders`], a proxy's arena-backed map): a full request of the `lifecycle_bench` plugin (10 header reads, a header added,
//! a response header read, a log line, and the context's whole lifecycle) on wasmtime, counted
//! by a counting global allocator on the test's own thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use abi::{Headers, HeadersAction, Plugin, PluginConfig, SharedState, Vm};
use pwhost_bench::{
    pwhost_request_in, pwhost_vm_in, read_plugin, ProxyHeaders, ProxyHost, LIFECYCLE_PLUGIN,
};
use runtime_api::RuntimeConfig;
use runtime_wasmtime::WasmtimeRuntime;

thread_local! {
    /// Allocations (and reallocations) made by this thread.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// The system allocator, counting per thread.
struct Counting;

// SAFETY: every method forwards to the system allocator with the caller's arguments unchanged;
// counting touches only a const-initialized thread-local, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        // SAFETY: the caller's contract is `GlobalAlloc::alloc`'s, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above, for `dealloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        // SAFETY: as above, for `realloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// One full request (`pwhost_request_in` restores the proxy's maps in place first), checked.
fn request(vm: &mut Vm) {
    let outcome = pwhost_request_in::<ProxyHeaders>(vm).expect("request");
    assert_eq!(outcome.request, HeadersAction::Continue);
}

#[test]
fn a_request_allocates_nothing_once_warm() {
    let wasm = read_plugin(LIFECYCLE_PLUGIN).unwrap_or_else(|e| panic!("{e}"));
    let runtime = WasmtimeRuntime::new(RuntimeConfig::default()).expect("engine");
    let plugin =
        Plugin::load(&runtime, &wasm, PluginConfig::default(), SharedState::new()).expect("plugin");
    let mut vm = pwhost_vm_in::<ProxyHeaders>(&plugin).expect("VM");
    for _ in 0..100 {
        request(&mut vm);
    }
    let stream = &vm.host_as::<ProxyHost>().unwrap().stream;
    assert_eq!(
        stream.request_headers().get(b"x-bench"),
        Some(&b"1"[..]),
        "the plugin ran"
    );
    let logs = stream.logs();

    // The counter counts.
    let probe = allocations();
    drop(std::hint::black_box(Vec::<u8>::with_capacity(16)));
    assert_eq!(allocations(), probe + 1);

    let before = allocations();
    for _ in 0..1000 {
        request(&mut vm);
    }
    let made = allocations() - before;
    assert_eq!(
        vm.host_as::<ProxyHost>().unwrap().stream.logs(),
        logs + 1000
    );
    assert_eq!(made, 0, "allocations in 1000 requests");
}
