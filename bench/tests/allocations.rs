//! The ABI allocates nothing on the request path for an embedder whose storage needs no
//! allocation: a full request of the `lifecycle_bench` plugin (10 header reads, a header added,
//! a response header read, a log line, and the context's whole lifecycle) on wasmtime, counted
//! by a counting global allocator on the test's own thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use abi::{
    BufferType, ContextId, Headers, Host, LocalResponse, LogLevel, MapType, Plugin, PluginConfig,
    SharedState, Status, StreamType, Vm,
};
use pwhost_bench::{read_plugin, LIFECYCLE_PLUGIN, REQUEST_HEADERS, RESPONSE_HEADERS};
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

/// Header storage that keeps its entries' buffers: once warm, reading and editing it
/// allocates nothing, as a proxy's arena-backed header map.
#[derive(Default)]
struct ReusingHeaders {
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    len: usize,
}

impl ReusingHeaders {
    fn set_from(&mut self, pairs: &[(&str, &str)]) {
        self.len = 0;
        for (name, value) in pairs {
            self.add(name.as_bytes(), value.as_bytes());
        }
    }

    fn live(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.entries[..self.len]
    }
}

impl Headers for ReusingHeaders {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.live()
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    fn for_each(&self, visit: &mut dyn FnMut(&[u8], &[u8])) {
        for (name, value) in self.live() {
            visit(name, value);
        }
    }

    fn add(&mut self, name: &[u8], value: &[u8]) {
        if self.len == self.entries.len() {
            self.entries.push((Vec::new(), Vec::new()));
        }
        let (k, v) = &mut self.entries[self.len];
        k.clear();
        k.extend(name.iter().map(u8::to_ascii_lowercase));
        v.clear();
        v.extend_from_slice(value);
        self.len += 1;
    }

    fn replace(&mut self, name: &[u8], value: &[u8]) {
        self.remove(name);
        self.add(name, value);
    }

    fn remove(&mut self, name: &[u8]) {
        let mut index = 0;
        while index < self.len {
            if self.entries[index].0.eq_ignore_ascii_case(name) {
                // The buffers move behind the live entries, to be reused.
                self.entries[index..self.len].rotate_left(1);
                self.len -= 1;
            } else {
                index += 1;
            }
        }
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

/// One stream at a time, in reusing storage; logs counted.
#[derive(Default)]
struct ReusingHost {
    request: ReusingHeaders,
    response: ReusingHeaders,
    logs: u64,
}

impl Host for ReusingHost {
    fn log(&mut self, _context: ContextId, _level: LogLevel, _message: &str) {
        self.logs += 1;
    }

    fn header_map(&mut self, _context: ContextId, map: MapType) -> Option<&mut dyn Headers> {
        match map {
            MapType::HttpRequestHeaders => Some(&mut self.request),
            MapType::HttpResponseHeaders => Some(&mut self.response),
            _ => None,
        }
    }

    fn buffer(&mut self, _context: ContextId, _buffer: BufferType) -> Option<&mut Vec<u8>> {
        None
    }

    fn send_local_response(&mut self, _context: ContextId, _response: LocalResponse) -> Status {
        Status::Unimplemented
    }

    fn continue_stream(&mut self, _context: ContextId, _stream: StreamType) -> Status {
        Status::Unimplemented
    }

    fn close_stream(&mut self, _context: ContextId, _stream: StreamType) -> Status {
        Status::Unimplemented
    }
}

fn request(vm: &mut Vm) {
    let host = vm.host_as::<ReusingHost>().expect("a ReusingHost");
    host.request.set_from(&REQUEST_HEADERS);
    host.response.set_from(&RESPONSE_HEADERS);
    let context = vm.create_http_context().expect("context");
    vm.on_request_headers(context, REQUEST_HEADERS.len(), false)
        .expect("request headers");
    vm.on_response_headers(context, RESPONSE_HEADERS.len(), false)
        .expect("response headers");
    vm.on_log(context).expect("log");
    vm.on_done(context).expect("done");
    vm.on_delete(context).expect("delete");
}

#[test]
fn a_request_allocates_nothing_once_warm() {
    let wasm = read_plugin(LIFECYCLE_PLUGIN).unwrap_or_else(|e| panic!("{e}"));
    let runtime = WasmtimeRuntime::new(RuntimeConfig::default()).expect("engine");
    let plugin =
        Plugin::load(&runtime, &wasm, PluginConfig::default(), SharedState::new()).expect("plugin");
    let mut vm = Vm::new(&plugin, Box::<ReusingHost>::default()).expect("VM");
    vm.start().expect("start");
    vm.configure().expect("configure");
    for _ in 0..100 {
        request(&mut vm);
    }
    let host = vm.host_as::<ReusingHost>().unwrap();
    assert_eq!(
        host.request.get(b"x-bench"),
        Some(&b"1"[..]),
        "the plugin ran"
    );
    let logs = host.logs;

    // The counter counts.
    let probe = allocations();
    drop(std::hint::black_box(Vec::<u8>::with_capacity(16)));
    assert_eq!(allocations(), probe + 1);

    let before = allocations();
    for _ in 0..1000 {
        request(&mut vm);
    }
    let made = allocations() - before;
    assert_eq!(vm.host_as::<ReusingHost>().unwrap().logs, logs + 1000);
    assert_eq!(made, 0, "allocations in 1000 requests");
}
