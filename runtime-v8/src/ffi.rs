//! The C ABI of the shim (`shim/pwhost_v8.h`), bound by hand, and owned wrappers of its handles.

use std::ffi::{c_char, c_void};

/// A compiled module (`pwv8_module`).
#[repr(C)]
pub(crate) struct RawModule {
    _opaque: [u8; 0],
}

/// An isolate with its context and instance (`pwv8_vm`).
#[repr(C)]
pub(crate) struct RawVm {
    _opaque: [u8; 0],
}

/// A message allocated by the shim.
#[repr(C)]
pub(crate) struct RawText {
    ptr: *mut c_char,
    len: usize,
}

/// How a function passes its values (`pwv8_shape`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    /// The number of parameters.
    pub(crate) params: u32,
    /// Bit `i` set: parameter `i` is an `i64`.
    pub(crate) i64_params: u32,
    /// -1: no result; 0: `i32`; 1: `i64`.
    pub(crate) result: i32,
}

/// A host function import (`pwv8_import`).
#[repr(C)]
pub(crate) struct RawImport {
    pub(crate) module: *const u8,
    pub(crate) module_len: usize,
    pub(crate) name: *const u8,
    pub(crate) name_len: usize,
    pub(crate) shape: Shape,
}

/// The host function entry point the shim calls (`pwv8_host_fn`).
pub(crate) type HostFn = unsafe extern "C" fn(
    host_context: *mut c_void,
    import_index: u32,
    slots: *mut u64,
    count: u32,
) -> i32;

/// Completed.
pub(crate) const OK: i32 = 0;
/// A JavaScript exception: a wasm trap, or a host function failing.
pub(crate) const THROWN: i32 = 1;
/// `TerminateExecution` stopped the call.
pub(crate) const TERMINATED: i32 = 2;

extern "C" {
    pub(crate) fn pwv8_initialize(
        flags: *const c_char,
        flags_len: usize,
        thread_pool_size: u32,
        message: *mut RawText,
    ) -> i32;
    pub(crate) fn pwv8_compile(
        bytes: *const u8,
        len: usize,
        message: *mut RawText,
    ) -> *mut RawModule;
    pub(crate) fn pwv8_module_delete(module: *mut RawModule);
    pub(crate) fn pwv8_vm_new(message: *mut RawText) -> *mut RawVm;
    pub(crate) fn pwv8_vm_instantiate(
        vm: *mut RawVm,
        module: *const RawModule,
        imports: *const RawImport,
        import_count: usize,
        host_fn: HostFn,
        host_context: *mut c_void,
        message: *mut RawText,
    ) -> i32;
    pub(crate) fn pwv8_vm_export_function(
        vm: *mut RawVm,
        name: *const c_char,
        name_len: usize,
        shape: Shape,
    ) -> i32;
    pub(crate) fn pwv8_vm_call(
        vm: *mut RawVm,
        index: u32,
        args: *const u64,
        arg_count: u32,
        results: *mut u64,
        result_count: u32,
        nested: i32,
        message: *mut RawText,
    ) -> i32;
    pub(crate) fn pwv8_vm_memory(
        vm: *mut RawVm,
        nested: i32,
        base: *mut *mut u8,
        len: *mut usize,
    ) -> i32;
    pub(crate) fn pwv8_vm_heap_exhausted(vm: *const RawVm) -> i32;
    pub(crate) fn pwv8_vm_terminate(vm: *mut RawVm);
    pub(crate) fn pwv8_vm_cancel_terminate(vm: *mut RawVm);
    pub(crate) fn pwv8_vm_delete(vm: *mut RawVm);
    pub(crate) fn pwv8_current_thread_cpu_clock() -> i64;
    pub(crate) fn pwv8_cpu_time_ns(clock: i64) -> i64;
    pub(crate) fn pwv8_text_free(text: RawText);
}

/// A message from the shim, freed on drop.
pub(crate) struct Message(RawText);

impl Message {
    /// An empty message for the shim to fill.
    pub(crate) fn new() -> Self {
        Message(RawText {
            ptr: std::ptr::null_mut(),
            len: 0,
        })
    }

    /// Where the shim writes the message.
    pub(crate) fn as_out(&mut self) -> *mut RawText {
        &mut self.0
    }

    /// The message as text (invalid UTF-8 replaced), or `fallback` if the shim wrote none.
    pub(crate) fn text_or(&self, fallback: &str) -> String {
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
            let text = std::mem::replace(
                &mut self.0,
                RawText {
                    ptr: std::ptr::null_mut(),
                    len: 0,
                },
            );
            // SAFETY: the text was allocated by the shim and is freed exactly once, here.
            unsafe { pwv8_text_free(text) };
        }
    }
}
