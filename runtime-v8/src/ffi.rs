//! The C ABI of the shim (`shim/pwhost_v8.h`), bound by hand, and owned wrappers of its handles.
//!
//! The bindings are public through [`crate::shim`], for benchmarks and other raw users; this
//! crate's own code reaches them here. Every function's `# Safety` section is its contract; the
//! shim's header says the same in C terms.

use std::ffi::{c_char, c_void};
use std::marker::{PhantomData, PhantomPinned};

/// A compiled module (`pwv8_module`): V8 code of the process-wide wasm engine, instantiable in
/// any isolate. Made by [`pwv8_compile`], freed by [`pwv8_module_delete`].
#[repr(C)]
pub struct RawModule {
    _opaque: [u8; 0],
    // Only ever behind a pointer the shim owns: neither `Send`, `Sync` nor `Unpin` by itself.
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// An isolate with its context and instance (`pwv8_vm`). Made by [`pwv8_vm_new`], freed by
/// [`pwv8_vm_delete`].
#[repr(C)]
pub struct RawVm {
    _opaque: [u8; 0],
    // As `RawModule`'s.
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// A message allocated by the shim (`pwv8_text`): `len` bytes at `ptr` (`ptr` may be null when
/// `len` is 0), not NUL-terminated, owned by whoever received it and freed with
/// [`pwv8_text_free`].
#[repr(C)]
pub struct RawText {
    /// The message's first byte (null: no message).
    pub ptr: *mut c_char,
    /// The message's length in bytes.
    pub len: usize,
}

impl RawText {
    /// No message: what to pass for the shim to fill.
    pub const fn empty() -> Self {
        RawText {
            ptr: std::ptr::null_mut(),
            len: 0,
        }
    }
}

/// How a function passes its values (`pwv8_shape`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// The number of parameters (at most 16).
    pub params: u32,
    /// Bit `i` set: parameter `i` is an `i64` (else an `i32`).
    pub i64_params: u32,
    /// -1: no result; 0: `i32`; 1: `i64`.
    pub result: i32,
}

/// A host function import (`pwv8_import`): the (pointer, length) pairs of its module and field
/// names, and its shape.
#[repr(C)]
pub struct RawImport {
    /// The import's module name.
    pub module: *const u8,
    /// The length of `module` in bytes.
    pub module_len: usize,
    /// The import's field name.
    pub name: *const u8,
    /// The length of `name` in bytes.
    pub name_len: usize,
    /// How the import passes its values.
    pub shape: Shape,
}

/// The host function entry point the shim calls (`pwv8_host_fn`): host function `import_index`
/// of the instance instantiated with `host_context`, on `count` (at least one) argument slots,
/// each an `i32` (zero-extended) or an `i64` as the import's shape says. The result, if any, goes
/// to slot 0. Returns 0, or non-zero when the call failed (the host remembers why) and the guest
/// must unwind.
///
/// It runs on the thread that called into the guest, with the isolate locked and entered: it may
/// call back into the same instance with `nested` set. It must not unwind (a Rust panic out of
/// an `extern "C"` function aborts the process, which is sound).
pub type HostFn = unsafe extern "C" fn(
    host_context: *mut c_void,
    import_index: u32,
    slots: *mut u64,
    count: u32,
) -> i32;

/// Completed (`PWV8_OK`).
pub const OK: i32 = 0;
/// A JavaScript exception: a wasm trap, or a host function failing (`PWV8_THROWN`).
pub const THROWN: i32 = 1;
/// `TerminateExecution` stopped the call (`PWV8_TERMINATED`).
pub const TERMINATED: i32 = 2;
/// The shim could not do what was asked; the message says why (`PWV8_FAILED`).
pub const FAILED: i32 = 3;

extern "C" {
    /// Starts V8 once per process: sets `flags` (V8 command-line syntax), creates the platform
    /// with `thread_pool_size` worker threads and initialises V8. Later calls do nothing and
    /// return [`OK`]: the first call's flags stay. Returns [`OK`] or [`FAILED`], with the reason
    /// in `*message`.
    ///
    /// # Safety
    /// `flags` points to `flags_len` readable bytes; `message` is null or points to a writable
    /// [`RawText`] (see [`RawText`] for who frees what the shim writes there).
    pub fn pwv8_initialize(
        flags: *const c_char,
        flags_len: usize,
        thread_pool_size: u32,
        message: *mut RawText,
    ) -> i32;

    /// Compiles (and validates) a module in a short-lived isolate. Null on failure, with the
    /// reason in `*message`.
    ///
    /// # Safety
    /// V8 is initialised ([`pwv8_initialize`] returned [`OK`]); `bytes` points to `len` readable
    /// bytes (copied: they may go after the call); `message` as in [`pwv8_initialize`].
    pub fn pwv8_compile(bytes: *const u8, len: usize, message: *mut RawText) -> *mut RawModule;

    /// Frees a compiled module. Instances made from it stay valid (they hold the code).
    ///
    /// # Safety
    /// `module` came from [`pwv8_compile`], is freed once, and is not in use by another thread.
    pub fn pwv8_module_delete(module: *mut RawModule);

    /// Creates an isolate (registered with the platform, with runtime-v8's heap limit) and a
    /// context, for one instance. Null on failure, with the reason in `*message`.
    ///
    /// # Safety
    /// V8 is initialised; `message` as in [`pwv8_initialize`].
    pub fn pwv8_vm_new(message: *mut RawText) -> *mut RawVm;

    /// Instantiates `module` in `vm`, with `imports` (one per function import, in the module's
    /// import order) calling `host_fn(host_context, index, ...)`, and runs the module's start
    /// function. Returns [`OK`], [`THROWN`], [`TERMINATED`] or [`FAILED`].
    ///
    /// # Safety
    /// `vm` is live, not yet instantiated, and used by no other thread during the call;
    /// `module` is live; `imports` points to `import_count` imports whose name pairs are
    /// readable for the call; `host_fn` accepts `host_context` for as long as `vm` lives (the
    /// shim calls it from guest code on every later call); `message` as in [`pwv8_initialize`].
    pub fn pwv8_vm_instantiate(
        vm: *mut RawVm,
        module: *const RawModule,
        imports: *const RawImport,
        import_count: usize,
        host_fn: HostFn,
        host_context: *mut c_void,
        message: *mut RawText,
    ) -> i32;

    /// Resolves exported function `name` once; returns its index for [`pwv8_vm_call`] (indices
    /// count up from 0 in resolution order), or -1 if the instance exports no function of that
    /// name. The shim trusts `shape`: it must be the function's type.
    ///
    /// # Safety
    /// `vm` is live, instantiated, and used by no other thread during the call (and not from
    /// inside one of its host functions); `name` points to `name_len` readable bytes.
    pub fn pwv8_vm_export_function(
        vm: *mut RawVm,
        name: *const c_char,
        name_len: usize,
        shape: Shape,
    ) -> i32;

    /// Calls function `index` with `args`, writing `results`; the counts must match its shape
    /// (else [`FAILED`]). Returns [`OK`], [`THROWN`], [`TERMINATED`] or [`FAILED`], with the
    /// message of the last three in `*message`.
    ///
    /// # Safety
    /// `vm` is live. `nested` is 0 for a call from the host, which takes the isolate's lock:
    /// then no other thread uses `vm` during the call. `nested` is non-zero for a call from
    /// inside one of `vm`'s host functions, on the thread running it. `args` points to
    /// `arg_count` readable values, `results` to `result_count` writable ones; `message` as in
    /// [`pwv8_initialize`].
    pub fn pwv8_vm_call(
        vm: *mut RawVm,
        index: u32,
        args: *const u64,
        arg_count: u32,
        results: *mut u64,
        result_count: u32,
        nested: i32,
        message: *mut RawText,
    ) -> i32;

    /// The exported memory's current bytes: `*base` and `*len` (null and 0 without a memory).
    /// They stay valid until guest code runs again (a `memory.grow` replaces them) or `vm` is
    /// deleted.
    ///
    /// # Safety
    /// `vm` is live; `nested` as in [`pwv8_vm_call`]; `base` and `len` are writable.
    pub fn pwv8_vm_memory(vm: *mut RawVm, nested: i32, base: *mut *mut u8, len: *mut usize) -> i32;

    /// Whether the JS heap reached its limit during the last call (then the call was
    /// terminated and the instance refuses further calls).
    ///
    /// # Safety
    /// `vm` is live.
    pub fn pwv8_vm_heap_exhausted(vm: *const RawVm) -> i32;

    /// Stops the running call of `vm`, even one that has not taken the isolate's lock yet; every
    /// entry into `vm` is stopped until [`pwv8_vm_cancel_terminate`].
    ///
    /// # Safety
    /// `vm` is live for the whole call; callable from any thread.
    pub fn pwv8_vm_terminate(vm: *mut RawVm);

    /// Undoes [`pwv8_vm_terminate`] (and a termination the heap limit caused), so the instance
    /// runs calls again.
    ///
    /// # Safety
    /// `vm` is live; no call into it is running (the shim takes the isolate's lock), and no
    /// [`pwv8_vm_terminate`] can follow for the call that was stopped.
    pub fn pwv8_vm_cancel_terminate(vm: *mut RawVm);

    /// Disposes of the instance, its context and its isolate.
    ///
    /// # Safety
    /// `vm` came from [`pwv8_vm_new`], is deleted once, no call into it is running and nothing
    /// uses it afterwards (no [`pwv8_vm_terminate`] from another thread either).
    pub fn pwv8_vm_delete(vm: *mut RawVm);

    /// An identifier of the calling thread's CPU-time clock, for [`pwv8_cpu_time_ns`] from any
    /// thread; -1 if there is none.
    ///
    /// # Safety
    /// None beyond calling a C function: it reads the calling thread's identity only.
    pub fn pwv8_current_thread_cpu_clock() -> i64;

    /// The CPU time, in nanoseconds, of the thread whose clock [`pwv8_current_thread_cpu_clock`]
    /// returned; -1 if it cannot be read (e.g. the thread exited).
    ///
    /// # Safety
    /// None beyond calling a C function: an unknown clock yields -1.
    pub fn pwv8_cpu_time_ns(clock: i64) -> i64;

    /// Frees a message.
    ///
    /// # Safety
    /// `text` was written by the shim and is freed once (an empty one may be passed freely).
    pub fn pwv8_text_free(text: RawText);
}

/// A message from the shim, freed on drop: pass [`Message::as_out`] where a function takes
/// `message`, read it with [`Message::text_or`].
pub struct Message(RawText);

impl Default for Message {
    fn default() -> Self {
        Message::new()
    }
}

impl Message {
    /// An empty message for the shim to fill.
    pub fn new() -> Self {
        Message(RawText::empty())
    }

    /// Where the shim writes the message. The pointer is valid while `self` is neither moved
    /// nor dropped; a message already there must have been read (the shim overwrites it, which
    /// leaks it, never frees it twice).
    pub fn as_out(&mut self) -> *mut RawText {
        &mut self.0
    }

    /// The message as text (invalid UTF-8 replaced), or `fallback` if the shim wrote none.
    pub fn text_or(&self, fallback: &str) -> String {
        if self.0.ptr.is_null() || self.0.len == 0 {
            return fallback.to_string();
        }
        // SAFETY: the shim set `ptr` to a live allocation of `len` bytes that it owns until
        // `pwv8_text_free`, which only `drop` calls.
        let bytes = unsafe { std::slice::from_raw_parts(self.0.ptr.cast::<u8>(), self.0.len) };
        String::from_utf8_lossy(bytes).into_owned()
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        if !self.0.ptr.is_null() {
            let text = std::mem::replace(&mut self.0, RawText::empty());
            // SAFETY: the text was allocated by the shim and is freed exactly once, here.
            unsafe { pwv8_text_free(text) };
        }
    }
}
