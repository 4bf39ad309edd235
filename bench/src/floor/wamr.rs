//! The WAMR floor: the least a correct Proxy-Wasm host on WAMR's raw C API (`wamrx-sys`) must do
//! to run `lifecycle_bench`, written by hand for this one plugin (the rules all floors follow are
//! in [`super`]; [`super::wasmtime`] is the reference this one copies).
//!
//! Why it is a fair floor for pwhost on WAMR (`runtime-wamr` with `RuntimeConfig::default()`):
//!
//! * Same engine, same configuration: WAMR is one runtime per process, and the floor does not
//!   initialise it itself: it creates (and drops) a pwhost WAMR runtime first, so WAMR is set up
//!   by `runtime-wamr`'s own one-time initialisation (fast interpreter, system allocator, one
//!   thread per cluster) whichever of the two comes first. Instances are made as `runtime-wamr`
//!   makes them: `wasm_runtime_instantiate_ex2` with the same 128 KiB interpreter stack, no
//!   WAMR-managed heap and the 1 GiB cap of `RuntimeConfig::default()` as WAMR's maximum page
//!   count; one exec env per instance for all its calls, created with the same stack size and
//!   given back the whole auxiliary stack the same way. There is no deadline and no interrupt
//!   (as in the default configuration), so nothing is watched.
//! * Everything is resolved once: each instance looks up its memory, allocator and callbacks
//!   once (`wasm_runtime_lookup_function`), and every callback's type is checked once per module,
//!   so a call is one `wasm_runtime_call_wasm` on a stack array of 32-bit cells. Host functions
//!   are WAMR natives in the raw calling convention (arguments in 64-bit slots, the result
//!   written to slot 0), measured as the cheaper of WAMR's two conventions here (see
//!   [`register_natives`]), and find the instance's state through the exec env's user data.
//! * It does only the host calls the plugin makes (`proxy_log`, `proxy_get_header_map_value`,
//!   `proxy_add_header_map_value`); the module's other function imports return `UNIMPLEMENTED`
//!   (12).
//! * It still does what any correct host on WAMR must: bounds-checks every guest pointer against
//!   the memory's current size (re-read after the allocator ran, since `memory.grow` moves WAMR's
//!   memory), validates the log level and the map type, decodes the message leniently (as every
//!   floor and pwhost do), allocates reply
//!   buffers with the plugin's allocator, writes values straight into guest memory, and bounds how
//!   deeply host functions call back into the guest (as pwhost does: WAMR's native-stack check
//!   keeps only a small margin).
//! * Its embedder data work is identical to pwhost's bench host: the same [`BenchStream`] in the
//!   same header storage `M`, restored the same way, and the same log counter.
//!
//! What it leaves out is what pwhost adds for generality: the engine-neutral `runtime_api`
//! layer (guest-function handles looked up per call, arguments converted to and from `u64`
//! slots, one trampoline for every import that dispatches on the symbol's attachment through a
//! host-function table, `catch_unwind`), the `dyn Host` indirection, context bookkeeping,
//! per-call status plumbing and the second header lookup after allocation.
//!
//! # Living beside pwhost's WAMR runtime
//!
//! WAMR resolves imports against one process-wide registry of natives keyed by import module
//! name, and `runtime-wamr` registers every name its modules import (`env.proxy_log` …) against
//! its own trampoline. The floor must neither take those names over nor be bound to them, so it
//! loads a copy of the plugin whose function imports come from `pwhost-floor:<module>` instead
//! of `<module>` ([`rename_imports`]: only the import section's module names change). Its natives
//! are registered under those names only while its module loads (WAMR copies the function
//! pointers into the module), then unregistered. WAMR's registry has no lock of its own: the
//! floor takes `runtime-wamr`'s ([`runtime_wamr::lock_native_registry`]) around registering,
//! loading and unloading, so it may be created and dropped while other threads link or drop
//! pwhost WAMR modules.

use std::cell::Cell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::rc::Rc;

use abi::{LogLevel, MapType};
use anyhow::{anyhow, bail, Context as _};
use runtime_api::RuntimeConfig;
use wamrx_sys as sys;

use super::{
    add_value, find_value, outcome, return_value, slice, FloorEngine, FloorInstance, BAD_ARGUMENT,
    INTERNAL_FAILURE, INVALID_MEMORY_ACCESS, OK, UNIMPLEMENTED,
};
use crate::{BenchHeaders, BenchStream, RequestOutcome, REQUEST_HEADERS, RESPONSE_HEADERS};

/// Each instance's interpreter stack, and its exec env's: `runtime_wamr::WamrOptions`'s default
/// `stack_size`, which pwhost's runtime uses with `RuntimeConfig::default()`.
const STACK_SIZE: u32 = 128 * 1024;

/// The size of a WebAssembly page.
const PAGE_SIZE: u64 = 64 * 1024;

/// How deeply host functions may call back into the guest: `runtime-wamr`'s
/// `MAX_NESTED_CALLS`. WAMR checks the native stack only with a 3 KiB margin, at guest entries
/// and host calls; a guest recursing through a host function (the allocator calling a host
/// function that calls the allocator …) must fail well before it can reach the guard page.
const MAX_NESTED_CALLS: u32 = 8;

/// The prefix the floor's copy of a module gets on its function imports' module names.
const FLOOR_MODULE_PREFIX: &str = "pwhost-floor:";

/// A guest callback the floor calls: its export name, its number of (`i32`) parameters and
/// whether it returns an `i32`.
type Signature = (&'static CStr, u32, bool);

const CONTEXT_CREATE: Signature = (c"proxy_on_context_create", 2, false);
const VM_START: Signature = (c"proxy_on_vm_start", 2, true);
const CONFIGURE: Signature = (c"proxy_on_configure", 2, true);
const REQUEST_HEADERS_CALLBACK: Signature = (c"proxy_on_request_headers", 3, true);
const RESPONSE_HEADERS_CALLBACK: Signature = (c"proxy_on_response_headers", 3, true);
const LOG: Signature = (c"proxy_on_log", 1, false);
const DONE: Signature = (c"proxy_on_done", 1, true);
const DELETE: Signature = (c"proxy_on_delete", 1, false);
const INITIALIZE: Signature = (c"_initialize", 0, false);
/// The allocators pwhost uses, in its order of preference.
const ALLOCATORS: [Signature; 2] = [(c"proxy_on_memory_allocate", 1, true), (c"malloc", 1, true)];

/// The callbacks every instance calls, in [`Callbacks`]' order.
const CALLBACKS: [Signature; 8] = [
    CONTEXT_CREATE,
    VM_START,
    CONFIGURE,
    REQUEST_HEADERS_CALLBACK,
    RESPONSE_HEADERS_CALLBACK,
    LOG,
    DONE,
    DELETE,
];

/// The WAMR floor of `wasm`.
pub fn floor<M: BenchHeaders>(wasm: &[u8]) -> anyhow::Result<Box<dyn FloorEngine<M>>> {
    Ok(Box::new(WamrFloor::<M>::new(wasm)?))
}

thread_local! {
    /// This thread's WAMR environment, set up by the floor (see [`ensure_thread_env`]).
    static THREAD_ENV: ThreadEnv = const { ThreadEnv { ready: Cell::new(false) } };
}

/// Whether the floor set up WAMR's environment on this thread; torn down when the thread exits.
struct ThreadEnv {
    ready: Cell<bool>,
}

impl Drop for ThreadEnv {
    fn drop(&mut self) {
        if self.ready.get() {
            // SAFETY: this thread set its environment up and, exiting, runs no more WAMR code
            // of the floor's. Tearing down is idempotent on this build (without hardware bound
            // checks it undoes nothing `runtime-wamr`'s own teardown of the same thread needs).
            unsafe { sys::wasm_runtime_destroy_thread_env() };
        }
    }
}

/// Sets up WAMR's environment on this thread if the floor has not yet: WAMR requires it on every
/// thread that loads, instantiates or calls. Floor engines and instances are not `Send`, so an
/// instance is only ever called on the thread that made it, which ran this first: calls need no
/// check of their own.
fn ensure_thread_env() -> anyhow::Result<()> {
    THREAD_ENV.with(|env| {
        if !env.ready.get() {
            // SAFETY: WAMR is initialised (every caller runs after `init_wamr`); setting up a
            // thread's environment twice (here and in `runtime-wamr`) is harmless.
            if !unsafe { sys::wasm_runtime_init_thread_env() } {
                bail!("cannot set up WAMR's environment on this thread");
            }
            env.ready.set(true);
        }
        Ok(())
    })
}

/// Initialises WAMR the way pwhost does, by creating (and dropping) a pwhost WAMR runtime:
/// `runtime-wamr` initialises WAMR once per process with its own arguments, which a floor
/// initialising first would otherwise pre-empt (WAMR ignores the arguments of later
/// initialisations).
fn init_wamr() -> anyhow::Result<()> {
    drop(pwhost::runtimes::create("wamr", RuntimeConfig::default())?);
    ensure_thread_env()
}

/// WAMR's maximum page count for pwhost's default memory cap, as `runtime-wamr` computes it.
fn max_memory_pages() -> u32 {
    match RuntimeConfig::default().max_memory_bytes {
        None => 0,
        Some(bytes) => u32::try_from(bytes / PAGE_SIZE)
            .unwrap_or(u32::MAX)
            .min(65536),
    }
}

/// The per-instance state host functions reach through the exec env's user data.
struct FloorState<M: BenchHeaders> {
    stream: BenchStream<M>,
    /// The context host calls act on (the callback's context).
    effective_context: u32,
    /// The exported `memory` (null if the module exports none).
    memory: sys::wasm_memory_inst_t,
    /// The memory's page size in bytes (fixed per memory).
    page_size: usize,
    /// The plugin's allocator (null if it has none).
    malloc: sys::wasm_function_inst_t,
    /// How many calls from host functions into the guest are running.
    nested_calls: u32,
}

/// The guest's linear memory as it is now, or `None` if the instance has none.
///
/// # Safety
/// `memory` is null or a memory of a live instance, and no guest code runs while the returned
/// slice is used (guest code may grow, and so move, the memory).
#[inline(always)]
unsafe fn guest_memory<'a>(
    memory: sys::wasm_memory_inst_t,
    page_size: usize,
) -> Option<&'a mut [u8]> {
    if memory.is_null() {
        return None;
    }
    // SAFETY: per the contract; WAMR allocates `cur_page_count * page_size` bytes at the base
    // address, and the memory is this instance's alone (this build has no shared memories).
    unsafe {
        let base = sys::wasm_memory_get_base_address(memory).cast::<u8>();
        let size = (sys::wasm_memory_get_cur_page_count(memory) as usize).checked_mul(page_size)?;
        if base.is_null() || size > isize::MAX as usize {
            return None;
        }
        Some(std::slice::from_raw_parts_mut(base, size))
    }
}

/// The floor state of the instance `exec_env` runs, or null if it is not a floor instance's
/// exec env (WAMR running guest code while it instantiates, which `lifecycle_bench` never makes
/// it do).
///
/// # Safety
/// `exec_env` is the live exec env WAMR passes to a native.
#[inline(always)]
unsafe fn state_of<M: BenchHeaders>(exec_env: sys::wasm_exec_env_t) -> *mut FloorState<M> {
    // SAFETY: per the contract. The floor sets the user data of its exec envs to their
    // instance's `FloorState<M>` only (see `WamrFloor::instantiate`), and the natives of a
    // module are registered monomorphized for the same `M` as its instances' states.
    unsafe { sys::wasm_runtime_get_user_data(exec_env).cast() }
}

/// `proxy_log(level, message_data, message_size)`.
///
/// # Safety
/// `exec_env` is the live exec env running the calling guest code.
#[inline(always)]
unsafe fn proxy_log<M: BenchHeaders>(
    exec_env: sys::wasm_exec_env_t,
    level: i32,
    ptr: i32,
    len: i32,
) -> i32 {
    let Some(level) = LogLevel::from_raw(u64::from(level as u32)) else {
        return BAD_ARGUMENT;
    };
    // SAFETY: per the contract.
    let state = unsafe { state_of::<M>(exec_env) };
    // SAFETY: a non-null state is the live state of the instance whose guest code is calling
    // (it is freed only after the instance); no other reference to it is live, since the host
    // holds none across guest calls and this native makes no guest call while it uses this one.
    let Some(state) = (unsafe { state.as_mut() }) else {
        return INTERNAL_FAILURE;
    };
    // SAFETY: the memory belongs to the calling instance, and no guest code runs in this native.
    let Some(bytes) = (unsafe { guest_memory(state.memory, state.page_size) }) else {
        return INTERNAL_FAILURE;
    };
    let Some(message) = slice(bytes, ptr, len) else {
        return INVALID_MEMORY_ACCESS;
    };
    state.stream.log(level, &String::from_utf8_lossy(message));
    OK
}

/// `proxy_get_header_map_value(map_type, key_data, key_size, return_value_data,
/// return_value_size)`: looks the key up once, allocates with the plugin's allocator, copies the
/// value into guest memory and writes the pointer and size.
///
/// # Safety
/// `exec_env` is the live exec env running the calling guest code.
#[inline(always)]
unsafe fn proxy_get_header_map_value<M: BenchHeaders>(
    exec_env: sys::wasm_exec_env_t,
    map_type: i32,
    key_ptr: i32,
    key_len: i32,
    return_data: i32,
    return_size: i32,
) -> i32 {
    let Some(map_type) = MapType::from_raw(u64::from(map_type as u32)) else {
        return BAD_ARGUMENT;
    };
    // SAFETY: per the contract.
    let state_ptr = unsafe { state_of::<M>(exec_env) };
    if state_ptr.is_null() {
        return INTERNAL_FAILURE;
    }
    let found = {
        // SAFETY: as in `proxy_log`; this reference ends before the allocator (guest code that
        // may re-enter the natives) runs.
        let state = unsafe { &mut *state_ptr };
        // SAFETY: as in `proxy_log`; the slice ends with this block.
        let Some(bytes) = (unsafe { guest_memory(state.memory, state.page_size) }) else {
            return INTERNAL_FAILURE;
        };
        let context = state.effective_context;
        match find_value(
            bytes,
            &mut state.stream,
            context,
            map_type,
            key_ptr,
            key_len,
        ) {
            Ok(found) => found,
            Err(status) => return status,
        }
    };
    let len = found.1;
    let pointer = if len == 0 {
        0
    } else {
        // SAFETY: the state is live and no reference to it is held across the call.
        let pointer = unsafe { allocate(exec_env, state_ptr, len) };
        if pointer == 0 {
            return INTERNAL_FAILURE;
        }
        pointer
    };
    // SAFETY: as in `proxy_log`; the allocator has returned, so nothing else refers to the state.
    let state = unsafe { &mut *state_ptr };
    // SAFETY: as in `proxy_log`; read afresh, since the allocator may have grown the memory.
    let Some(bytes) = (unsafe { guest_memory(state.memory, state.page_size) }) else {
        return INTERNAL_FAILURE;
    };
    let context = state.effective_context;
    return_value(
        bytes,
        &mut state.stream,
        context,
        map_type,
        found,
        pointer,
        return_data,
        return_size,
    )
}

/// Allocates `len` bytes with the plugin's allocator, on the exec env that is calling the host
/// function; 0 if the plugin has no allocator, host functions are nested too deeply, or the
/// allocator failed (then its trap is the instance's exception, and the guest unwinds as soon as
/// the host function returns).
///
/// # Safety
/// `exec_env` is the live exec env running the calling guest code and `state` its instance's
/// live state, to which no reference is held across this call.
#[inline(always)]
unsafe fn allocate<M: BenchHeaders>(
    exec_env: sys::wasm_exec_env_t,
    state: *mut FloorState<M>,
    len: usize,
) -> u32 {
    // SAFETY: per the contract; each access is a short-lived place expression.
    let (malloc, depth) = unsafe { ((*state).malloc, (*state).nested_calls) };
    let Ok(len) = u32::try_from(len) else {
        return 0;
    };
    if malloc.is_null() || depth >= MAX_NESTED_CALLS {
        return 0;
    }
    // SAFETY: as above.
    unsafe { (*state).nested_calls = depth + 1 };
    // One cell for the `i32` argument, reused for the `i32` result (the allocator's type was
    // checked once per module).
    let mut cells = [len];
    // SAFETY: WAMR allows a native to call into its instance on the exec env it was given; the
    // allocator belongs to that instance and takes and returns one `i32`.
    let completed = unsafe { sys::wasm_runtime_call_wasm(exec_env, malloc, 1, cells.as_mut_ptr()) };
    // SAFETY: as above; the guest call is over.
    unsafe { (*state).nested_calls = depth };
    if completed {
        cells[0]
    } else {
        0
    }
}

/// `proxy_add_header_map_value(map_type, key_data, key_size, value_data, value_size)`.
///
/// # Safety
/// `exec_env` is the live exec env running the calling guest code.
#[inline(always)]
unsafe fn proxy_add_header_map_value<M: BenchHeaders>(
    exec_env: sys::wasm_exec_env_t,
    map_type: i32,
    key_ptr: i32,
    key_len: i32,
    value_ptr: i32,
    value_len: i32,
) -> i32 {
    let Some(map_type) = MapType::from_raw(u64::from(map_type as u32)) else {
        return BAD_ARGUMENT;
    };
    // SAFETY: per the contract.
    let state = unsafe { state_of::<M>(exec_env) };
    // SAFETY: as in `proxy_log`.
    let Some(state) = (unsafe { state.as_mut() }) else {
        return INTERNAL_FAILURE;
    };
    // SAFETY: as in `proxy_log`.
    let Some(bytes) = (unsafe { guest_memory(state.memory, state.page_size) }) else {
        return INTERNAL_FAILURE;
    };
    let context = state.effective_context;
    add_value(
        bytes,
        &mut state.stream,
        context,
        map_type,
        key_ptr,
        key_len,
        value_ptr,
        value_len,
    )
}

/// Argument `index` of a raw native as the `i32` it is.
///
/// # Safety
/// `args` is WAMR's raw argument buffer, which holds at least 16 slots (see [`raw_unimplemented`])
/// and `index` is below the import's parameter count.
#[inline(always)]
unsafe fn arg(args: *const u64, index: usize) -> i32 {
    // SAFETY: per the contract.
    unsafe { *args.add(index) as u32 as i32 }
}

/// `proxy_log` as a raw native: three `i32` arguments, an `i32` result in slot 0.
///
/// # Safety
/// Called by WAMR only, for an import of type `(i32, i32, i32) -> i32` (checked when the floor
/// loads the module): `exec_env` runs the calling instance, `args` holds its argument slots.
unsafe extern "C" fn raw_proxy_log<M: BenchHeaders>(
    exec_env: sys::wasm_exec_env_t,
    args: *mut u64,
) {
    // SAFETY: per the contract; slot 0 receives the result.
    unsafe {
        let status = proxy_log::<M>(exec_env, arg(args, 0), arg(args, 1), arg(args, 2));
        *args = u64::from(status as u32);
    }
}

/// `proxy_get_header_map_value` as a raw native.
///
/// # Safety
/// As [`raw_proxy_log`], for an import of type `(i32, i32, i32, i32, i32) -> i32`.
unsafe extern "C" fn raw_proxy_get_header_map_value<M: BenchHeaders>(
    exec_env: sys::wasm_exec_env_t,
    args: *mut u64,
) {
    // SAFETY: per the contract.
    unsafe {
        let status = proxy_get_header_map_value::<M>(
            exec_env,
            arg(args, 0),
            arg(args, 1),
            arg(args, 2),
            arg(args, 3),
            arg(args, 4),
        );
        *args = u64::from(status as u32);
    }
}

/// `proxy_add_header_map_value` as a raw native.
///
/// # Safety
/// As [`raw_proxy_log`], for an import of type `(i32, i32, i32, i32, i32) -> i32`.
unsafe extern "C" fn raw_proxy_add_header_map_value<M: BenchHeaders>(
    exec_env: sys::wasm_exec_env_t,
    args: *mut u64,
) {
    // SAFETY: per the contract.
    unsafe {
        let status = proxy_add_header_map_value::<M>(
            exec_env,
            arg(args, 0),
            arg(args, 1),
            arg(args, 2),
            arg(args, 3),
            arg(args, 4),
        );
        *args = u64::from(status as u32);
    }
}

/// Every other function import: returns `UNIMPLEMENTED` whatever its type.
///
/// # Safety
/// Called by WAMR only, with its raw argument buffer: at least 16 slots on its stack, or one per
/// parameter when there are more, so slot 0 always exists (an import without results ignores it).
unsafe extern "C" fn raw_unimplemented(_exec_env: sys::wasm_exec_env_t, args: *mut u64) {
    // SAFETY: per the contract.
    unsafe { *args = u64::from(UNIMPLEMENTED as u32) };
}

/// `proxy_log` as a typed native: WAMR passes the arguments as C arguments.
///
/// # Safety
/// As [`raw_proxy_log`].
unsafe extern "C" fn typed_proxy_log<M: BenchHeaders>(
    exec_env: sys::wasm_exec_env_t,
    level: i32,
    ptr: i32,
    len: i32,
) -> i32 {
    // SAFETY: per the contract.
    unsafe { proxy_log::<M>(exec_env, level, ptr, len) }
}

/// `proxy_get_header_map_value` as a typed native.
///
/// # Safety
/// As [`raw_proxy_get_header_map_value`].
unsafe extern "C" fn typed_proxy_get_header_map_value<M: BenchHeaders>(
    exec_env: sys::wasm_exec_env_t,
    map_type: i32,
    key_ptr: i32,
    key_len: i32,
    return_data: i32,
    return_size: i32,
) -> i32 {
    // SAFETY: per the contract.
    unsafe {
        proxy_get_header_map_value::<M>(
            exec_env,
            map_type,
            key_ptr,
            key_len,
            return_data,
            return_size,
        )
    }
}

/// `proxy_add_header_map_value` as a typed native.
///
/// # Safety
/// As [`raw_proxy_add_header_map_value`].
unsafe extern "C" fn typed_proxy_add_header_map_value<M: BenchHeaders>(
    exec_env: sys::wasm_exec_env_t,
    map_type: i32,
    key_ptr: i32,
    key_len: i32,
    value_ptr: i32,
    value_len: i32,
) -> i32 {
    // SAFETY: per the contract.
    unsafe {
        proxy_add_header_map_value::<M>(exec_env, map_type, key_ptr, key_len, value_ptr, value_len)
    }
}

/// A minimal reader of the wasm binary format, for [`rename_imports`].
struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.position >= self.bytes.len()
    }

    fn bytes(&mut self, len: usize) -> anyhow::Result<&'a [u8]> {
        let end = self
            .position
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| anyhow!("truncated module"))?;
        let bytes = &self.bytes[self.position..end];
        self.position = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> anyhow::Result<u8> {
        Ok(self.bytes(1)?[0])
    }

    /// An unsigned LEB128 `u32`.
    fn u32(&mut self) -> anyhow::Result<u32> {
        let mut value = 0u32;
        for shift in (0..35).step_by(7) {
            let byte = self.byte()?;
            value |= u32::from(byte & 0x7f)
                .checked_shl(shift)
                .ok_or_else(|| anyhow!("bad LEB128"))?;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        bail!("LEB128 too long")
    }

    /// Skips a LEB128 integer of up to 64 bits.
    fn skip_leb(&mut self) -> anyhow::Result<()> {
        for _ in 0..10 {
            if self.byte()? & 0x80 == 0 {
                return Ok(());
            }
        }
        bail!("LEB128 too long")
    }

    fn name(&mut self) -> anyhow::Result<&'a [u8]> {
        let len = self.u32()? as usize;
        self.bytes(len)
    }

    /// Skips a table's or memory's limits.
    fn skip_limits(&mut self) -> anyhow::Result<()> {
        let flags = self.byte()?;
        if flags > 0x0f {
            bail!("unsupported limits flags {flags:#x}");
        }
        self.skip_leb()?;
        if flags & 0x01 != 0 {
            self.skip_leb()?;
        }
        if flags & 0x08 != 0 {
            // A custom page size.
            self.skip_leb()?;
        }
        Ok(())
    }
}

fn write_leb_u32(out: &mut Vec<u8>, mut value: u32) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn write_name(out: &mut Vec<u8>, name: &[u8]) -> anyhow::Result<()> {
    write_leb_u32(out, u32::try_from(name.len()).context("name too long")?);
    out.extend_from_slice(name);
    Ok(())
}

/// A function import of the floor's copy of a module: its (renamed) module name and its name.
struct FunctionImport {
    module: CString,
    name: CString,
}

/// Copies `wasm` with every function import's module name `m` replaced by
/// `pwhost-floor:m` (see the module docs), and lists the function imports. Every other section
/// is copied byte for byte; only the import section is re-encoded.
fn rename_imports(wasm: &[u8]) -> anyhow::Result<(Vec<u8>, Vec<FunctionImport>)> {
    let mut reader = Reader {
        bytes: wasm,
        position: 0,
    };
    let header = reader.bytes(8)?;
    if header != b"\0asm\x01\0\0\0" {
        bail!("not a core wasm module");
    }
    let mut out = Vec::with_capacity(wasm.len() + 256);
    out.extend_from_slice(header);
    let mut imports = Vec::new();
    while !reader.done() {
        let start = reader.position;
        let id = reader.byte()?;
        let size = reader.u32()? as usize;
        let body = reader.bytes(size)?;
        if id != 2 {
            out.extend_from_slice(&wasm[start..reader.position]);
            continue;
        }
        let mut section = Reader {
            bytes: body,
            position: 0,
        };
        let mut renamed = Vec::with_capacity(body.len() + 256);
        let count = section.u32()?;
        write_leb_u32(&mut renamed, count);
        for _ in 0..count {
            let module = section.name()?;
            let name = section.name()?;
            let descriptor_start = section.position;
            let kind = section.byte()?;
            match kind {
                // A function: its type index.
                0x00 => section.skip_leb()?,
                // A table: a reference type (0x70 funcref, 0x6f externref) and limits.
                0x01 => {
                    let element = section.byte()?;
                    if element != 0x70 && element != 0x6f {
                        bail!("unsupported table import type {element:#x}");
                    }
                    section.skip_limits()?;
                }
                0x02 => section.skip_limits()?,
                // A global: a one-byte value type and mutability.
                0x03 => {
                    let ty = section.byte()?;
                    if ty == 0x63 || ty == 0x64 {
                        bail!("unsupported global import type {ty:#x}");
                    }
                    section.byte()?;
                }
                // A tag: an attribute and a type index.
                0x04 => {
                    section.byte()?;
                    section.skip_leb()?;
                }
                other => bail!("unsupported import kind {other:#x}"),
            }
            let descriptor = &body[descriptor_start..section.position];
            if kind == 0x00 {
                let mut floor_module = FLOOR_MODULE_PREFIX.as_bytes().to_vec();
                floor_module.extend_from_slice(module);
                write_name(&mut renamed, &floor_module)?;
                imports.push(FunctionImport {
                    module: CString::new(floor_module).context("import module name has a NUL")?,
                    name: CString::new(name).context("import name has a NUL")?,
                });
            } else {
                write_name(&mut renamed, module)?;
            }
            write_name(&mut renamed, name)?;
            renamed.extend_from_slice(descriptor);
        }
        if !section.done() {
            bail!("trailing bytes in the import section");
        }
        out.push(id);
        write_leb_u32(
            &mut out,
            u32::try_from(renamed.len()).context("import section too large")?,
        );
        out.extend_from_slice(&renamed);
    }
    Ok((out, imports))
}

/// Which of WAMR's two native calling conventions the floor's host functions use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Convention {
    /// `void f(exec_env, uint64 *args)`: WAMR copies the argument cells into a 16-slot buffer
    /// and reads the result from slot 0.
    Raw,
    /// `int32 f(exec_env, int32, …)`: WAMR spreads the arguments over registers with its
    /// `invokeNative` assembly stub.
    Typed,
}

/// The floor's natives of one import module name, as registered with WAMR.
struct NativeArray {
    module: CString,
    symbols: Box<[sys::NativeSymbol]>,
}

/// Registers natives for `imports` (the floor's renamed function imports), runs `load` while
/// they are registered, and unregisters them: WAMR copies a resolved import's function pointer
/// and attachment into the module, and keeps no pointer into the registered arrays.
///
/// The three implemented host functions use `convention`; every other import is
/// [`raw_unimplemented`] (raw natives can serve any type). Natives are registered without
/// signature strings, which WAMR would otherwise check on every call; their import types are
/// checked once after loading instead (see [`check_imports`]).
///
/// The raw convention is the default, measured as the cheaper of the two on this build (a whole
/// request 0.5–2% faster than with typed natives, in 14 of 16 interleaved runs): both copy the
/// argument cells, take the instance's exception lock afterwards and zero a buffer (16 slots for
/// raw, 32 for typed), and the typed one also loads every argument register through an assembly
/// stub. Signature strings would add a check per argument and call, in either convention.
fn register_natives<M: BenchHeaders, R>(
    imports: &[FunctionImport],
    convention: Convention,
    load: impl FnOnce() -> R,
) -> anyhow::Result<R> {
    let implemented = |name: &CStr| -> Option<*mut c_void> {
        let name = name.to_bytes();
        let raw = convention == Convention::Raw;
        let raw_fn = |f: unsafe extern "C" fn(sys::wasm_exec_env_t, *mut u64)| f as *mut c_void;
        Some(match name {
            b"proxy_log" if raw => raw_fn(raw_proxy_log::<M>),
            b"proxy_get_header_map_value" if raw => raw_fn(raw_proxy_get_header_map_value::<M>),
            b"proxy_add_header_map_value" if raw => raw_fn(raw_proxy_add_header_map_value::<M>),
            b"proxy_log" => typed_proxy_log::<M> as unsafe extern "C" fn(_, _, _, _) -> _ as _,
            b"proxy_get_header_map_value" => {
                typed_proxy_get_header_map_value::<M> as unsafe extern "C" fn(_, _, _, _, _, _) -> _
                    as _
            }
            b"proxy_add_header_map_value" => {
                typed_proxy_add_header_map_value::<M> as unsafe extern "C" fn(_, _, _, _, _, _) -> _
                    as _
            }
            _ => return None,
        })
    };
    let env = CString::new(format!("{FLOOR_MODULE_PREFIX}env")).expect("no NUL");
    // One array per (module name, convention): WAMR's registry nodes have one convention each.
    let mut raw: Vec<(CString, Vec<sys::NativeSymbol>)> = Vec::new();
    let mut typed: Vec<sys::NativeSymbol> = Vec::new();
    for import in imports {
        let function = (import.module == env)
            .then(|| implemented(&import.name))
            .flatten();
        let (function, array) = match function {
            Some(function) if convention == Convention::Typed => (function, &mut typed),
            function => {
                let function = function
                    .unwrap_or(raw_unimplemented as unsafe extern "C" fn(_, _) as *mut c_void);
                let index = match raw.iter().position(|(module, _)| *module == import.module) {
                    Some(index) => index,
                    None => {
                        raw.push((import.module.clone(), Vec::new()));
                        raw.len() - 1
                    }
                };
                (function, &mut raw[index].1)
            }
        };
        array.push(sys::NativeSymbol {
            symbol: import.name.as_ptr(),
            func_ptr: function,
            signature: std::ptr::null(),
            attachment: std::ptr::null_mut(),
        });
    }
    let mut arrays: Vec<(NativeArray, bool)> = raw
        .into_iter()
        .map(|(module, symbols)| {
            let symbols = symbols.into_boxed_slice();
            (NativeArray { module, symbols }, true)
        })
        .collect();
    if !typed.is_empty() {
        let symbols = typed.into_boxed_slice();
        arrays.push((
            NativeArray {
                module: env,
                symbols,
            },
            false,
        ));
    }

    let _registry = runtime_wamr::lock_native_registry();
    let mut registered = 0;
    let mut failed = false;
    for (array, is_raw) in &mut arrays {
        let len = u32::try_from(array.symbols.len()).expect("fewer than 2^32 imports");
        let symbols = array.symbols.as_mut_ptr();
        // SAFETY: WAMR is initialised; the module name, the array and the symbol names it points
        // at stay alive and unmoved until they are unregistered below (WAMR sorts the array in
        // place). The function pointers have the convention the registration call declares.
        let ok = unsafe {
            if *is_raw {
                sys::wasm_runtime_register_natives_raw(array.module.as_ptr(), symbols, len)
            } else {
                sys::wasm_runtime_register_natives(array.module.as_ptr(), symbols, len)
            }
        };
        if !ok {
            failed = true;
            break;
        }
        registered += 1;
    }
    let result = (!failed).then(load);
    for (array, _) in &mut arrays[..registered] {
        // SAFETY: the array was registered above under this module name; once unregistered WAMR
        // keeps no pointer into it.
        unsafe {
            sys::wasm_runtime_unregister_natives(array.module.as_ptr(), array.symbols.as_mut_ptr())
        };
    }
    result.ok_or_else(|| anyhow!("cannot register the floor's natives with WAMR"))
}

/// The text of a NUL-terminated error buffer WAMR filled in.
fn c_buffer_text(buffer: &[c_char]) -> String {
    let bytes: Vec<u8> = buffer
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether `ty` is `(i32 × params) -> (i32 if result)`.
///
/// # Safety
/// `ty` is a function type of a loaded module.
unsafe fn has_type(ty: sys::wasm_func_type_t, params: u32, result: bool) -> bool {
    // SAFETY: per the contract; indices stay below the counts WAMR reports.
    unsafe {
        let i32_kind = |kind: sys::wasm_valkind_t| u32::from(kind) == sys::WASM_I32;
        sys::wasm_func_type_get_param_count(ty) == params
            && sys::wasm_func_type_get_result_count(ty) == u32::from(result)
            && (0..params).all(|i| i32_kind(sys::wasm_func_type_get_param_valkind(ty, i)))
            && (!result || i32_kind(sys::wasm_func_type_get_result_valkind(ty, 0)))
    }
}

/// Checks that every function import of `module` is linked, and that the implemented host
/// functions have the types their natives read (WAMR, given no signature strings, checks none).
///
/// # Safety
/// `module` is a loaded module.
unsafe fn check_imports(module: sys::wasm_module_t) -> anyhow::Result<()> {
    // SAFETY: per the contract; each index is below the count and WAMR fills the whole
    // `wasm_import_t` (its names point into the module).
    unsafe {
        for index in 0..sys::wasm_runtime_get_import_count(module).max(0) {
            let mut import = MaybeUninit::<sys::wasm_import_t>::zeroed();
            sys::wasm_runtime_get_import_type(module, index, import.as_mut_ptr());
            let import = import.assume_init();
            if import.kind != sys::WASM_IMPORT_EXPORT_KIND_FUNC {
                continue;
            }
            let name = CStr::from_ptr(import.name);
            if !import.linked {
                bail!("import {name:?} is not linked to the floor's natives");
            }
            let expected = match name.to_bytes() {
                b"proxy_log" => Some(3),
                b"proxy_get_header_map_value" | b"proxy_add_header_map_value" => Some(5),
                _ => None,
            };
            let module_name = CStr::from_ptr(import.module_name).to_bytes();
            if let Some(params) = expected.filter(|_| module_name == b"pwhost-floor:env") {
                if import.u.func_type.is_null() || !has_type(import.u.func_type, params, true) {
                    bail!("import {name:?} does not have the proxy-wasm type");
                }
            }
        }
    }
    Ok(())
}

/// The function type of export `name` of `module`, if it exports a function by that name.
///
/// # Safety
/// `module` is a loaded module.
unsafe fn export_type(module: sys::wasm_module_t, name: &CStr) -> Option<sys::wasm_func_type_t> {
    // SAFETY: as in `check_imports`.
    unsafe {
        (0..sys::wasm_runtime_get_export_count(module).max(0)).find_map(|index| {
            let mut export = MaybeUninit::<sys::wasm_export_t>::zeroed();
            sys::wasm_runtime_get_export_type(module, index, export.as_mut_ptr());
            let export = export.assume_init();
            (export.kind == sys::WASM_IMPORT_EXPORT_KIND_FUNC
                && !export.u.func_type.is_null()
                && CStr::from_ptr(export.name) == name)
                .then_some(export.u.func_type)
        })
    }
}

/// Whether `module` exports `signature`'s function with exactly that type; an error if it
/// exports it with another type.
///
/// # Safety
/// `module` is a loaded module.
unsafe fn exports(module: sys::wasm_module_t, signature: Signature) -> anyhow::Result<bool> {
    let (name, params, result) = signature;
    // SAFETY: per the contract.
    match unsafe { export_type(module, name) } {
        None => Ok(false),
        // SAFETY: the type belongs to the loaded module.
        Some(ty) if unsafe { has_type(ty, params, result) } => Ok(true),
        Some(_) => bail!("export {name:?} does not have the proxy-wasm type"),
    }
}

/// The floor's copy of a module, loaded by WAMR, with the bytes WAMR keeps pointing into.
struct LoadedModule {
    module: sys::wasm_module_t,
    /// The renamed wasm bytes: WAMR reads (and may modify) them for as long as the module
    /// exists, so they are freed only after it is unloaded.
    bytes: NonNull<[u8]>,
}

impl Drop for LoadedModule {
    fn drop(&mut self) {
        // Unloading reads WAMR's registry of natives, which pwhost's runtime may be changing.
        let _registry = runtime_wamr::lock_native_registry();
        // SAFETY: every instance holds an `Rc` to this module, so none is left; the bytes are
        // freed only after WAMR let go of them; the registry is locked (above).
        unsafe {
            sys::wasm_runtime_unload(self.module);
            drop(Box::from_raw(self.bytes.as_ptr()));
        }
    }
}

/// `lifecycle_bench` loaded once, with its callbacks' types checked: makes started instances.
pub struct WamrFloor<M: BenchHeaders> {
    loaded: Rc<LoadedModule>,
    /// The allocator's export name (`proxy_on_memory_allocate` or `malloc`).
    allocator: &'static CStr,
    /// Whether the module exports `_initialize`.
    initialize: bool,
    max_memory_pages: u32,
    _state: std::marker::PhantomData<fn() -> M>,
}

impl<M: BenchHeaders> WamrFloor<M> {
    /// Loads the floor's copy of `wasm` (its function imports renamed, see the module docs)
    /// with its imports bound to the floor's natives, and checks the types of the imports it
    /// implements and of the callbacks it calls.
    pub fn new(wasm: &[u8]) -> anyhow::Result<Self> {
        Self::with_convention(wasm, Convention::Raw)
    }

    fn with_convention(wasm: &[u8], convention: Convention) -> anyhow::Result<Self> {
        init_wamr()?;
        let (bytes, imports) = rename_imports(wasm)?;
        let size = u32::try_from(bytes.len()).context("module larger than 4 GiB")?;
        let bytes = NonNull::from(Box::leak(bytes.into_boxed_slice()));
        // The arguments `runtime-wamr` loads with, except that imports are resolved now, while
        // the floor's natives are registered.
        let args = sys::LoadArgs {
            name: c"".as_ptr().cast_mut(),
            clone_wasm_binary: false,
            wasm_binary_freeable: false,
            no_resolve: false,
        };
        let mut error = [0 as c_char; 256];
        let module = register_natives::<M, _>(&imports, convention, || {
            // SAFETY: `bytes` is a writable buffer of `size` bytes that outlives the module (it
            // is freed after `wasm_runtime_unload`); `args` and `error` live across the call and
            // `error`'s length is passed.
            unsafe {
                sys::wasm_runtime_load_ex(
                    bytes.as_ptr().cast(),
                    size,
                    &args,
                    error.as_mut_ptr(),
                    error.len() as u32,
                )
            }
        });
        let module = match module {
            Ok(module) if !module.is_null() => module,
            other => {
                // SAFETY: WAMR made no module, so it did not keep the buffer.
                drop(unsafe { Box::from_raw(bytes.as_ptr()) });
                other?;
                bail!("WAMR cannot load the module: {}", c_buffer_text(&error));
            }
        };
        let loaded = Rc::new(LoadedModule { module, bytes });
        // SAFETY: the module is loaded (and stays so while `loaded` lives).
        unsafe {
            check_imports(module)?;
            for callback in CALLBACKS {
                if !exports(module, callback)? {
                    bail!("the module does not export {:?}", callback.0);
                }
            }
            let mut allocator = None;
            for candidate in ALLOCATORS {
                if exports(module, candidate)? {
                    allocator = Some(candidate.0);
                    break;
                }
            }
            Ok(WamrFloor {
                allocator: allocator.context("the module exports no allocator")?,
                initialize: exports(module, INITIALIZE)?,
                loaded,
                max_memory_pages: max_memory_pages(),
                _state: std::marker::PhantomData,
            })
        }
    }

    /// A new instance, initialised, started and configured: `_initialize` (if exported),
    /// `proxy_on_context_create(1, 0)`, `proxy_on_vm_start(1, 0)`, `proxy_on_configure(1, 0)`.
    pub fn instantiate(&self) -> anyhow::Result<WamrFloorVm<M>> {
        ensure_thread_env()?;
        let state = NonNull::from(Box::leak(Box::new(FloorState {
            stream: BenchStream::<M>::new(),
            effective_context: 0,
            memory: std::ptr::null_mut(),
            page_size: 0,
            malloc: std::ptr::null_mut(),
            nested_calls: 0,
        })));
        // SAFETY: the module is loaded and resolved, and outlives the instance (which holds an
        // `Rc` to it).
        let module_inst = unsafe { instantiate(self.loaded.module, self.max_memory_pages) };
        let module_inst = match module_inst {
            Ok(module_inst) => module_inst,
            Err(error) => {
                // SAFETY: nothing refers to the state yet.
                drop(unsafe { Box::from_raw(state.as_ptr()) });
                return Err(error);
            }
        };
        let mut vm = WamrFloorVm {
            state,
            module_inst,
            exec_env: std::ptr::null_mut(),
            callbacks: Callbacks::default(),
            next_context: 2,
            _module: self.loaded.clone(),
        };
        // SAFETY: the instance is alive; names are NUL-terminated.
        unsafe {
            let memory = sys::wasm_runtime_lookup_memory(module_inst, c"memory".as_ptr());
            let page_size = if memory.is_null() {
                0
            } else {
                sys::wasm_memory_get_bytes_per_page(memory) as usize
            };
            let malloc = sys::wasm_runtime_lookup_function(module_inst, self.allocator.as_ptr());
            let state = &mut *state.as_ptr();
            state.memory = memory;
            state.page_size = page_size;
            state.malloc = malloc;
        }
        // SAFETY: the instance is alive.
        let exec_env = unsafe { sys::wasm_runtime_create_exec_env(module_inst, STACK_SIZE) };
        if exec_env.is_null() {
            bail!("WAMR could not create an execution environment");
        }
        vm.exec_env = exec_env;
        // SAFETY: the exec env was just created for this instance; the state outlives it (both
        // are destroyed by the `WamrFloorVm`, the exec env first).
        unsafe {
            runtime_wamr::give_back_aux_stack(exec_env);
            sys::wasm_runtime_set_user_data(exec_env, state.as_ptr().cast());
        }
        let lookup = |(name, _, _): Signature| {
            // SAFETY: the instance is alive; the name is NUL-terminated.
            let function = unsafe { sys::wasm_runtime_lookup_function(module_inst, name.as_ptr()) };
            if function.is_null() {
                Err(anyhow!("the instance has no function {name:?}"))
            } else {
                Ok(function)
            }
        };
        vm.callbacks = Callbacks {
            context_create: lookup(CONTEXT_CREATE)?,
            vm_start: lookup(VM_START)?,
            configure: lookup(CONFIGURE)?,
            request_headers: lookup(REQUEST_HEADERS_CALLBACK)?,
            response_headers: lookup(RESPONSE_HEADERS_CALLBACK)?,
            log: lookup(LOG)?,
            done: lookup(DONE)?,
            delete: lookup(DELETE)?,
        };
        if self.initialize {
            let initialize = lookup(INITIALIZE)?;
            vm.call(0, initialize, &mut [0], 0)?;
        }
        vm.call(1, vm.callbacks.context_create, &mut [1, 0], 2)?;
        vm.call(1, vm.callbacks.vm_start, &mut [1, 0], 2)?;
        vm.call(1, vm.callbacks.configure, &mut [1, 0], 2)?;
        Ok(vm)
    }
}

impl<M: BenchHeaders> FloorEngine<M> for WamrFloor<M> {
    fn instantiate(&self) -> anyhow::Result<Box<dyn FloorInstance<M>>> {
        Ok(Box::new(WamrFloor::instantiate(self)?))
    }
}

/// Instantiates `module` as `runtime-wamr` does (see the module docs).
///
/// # Safety
/// `module` is a loaded, resolved module that outlives the instance.
unsafe fn instantiate(
    module: sys::wasm_module_t,
    max_memory_pages: u32,
) -> anyhow::Result<sys::wasm_module_inst_t> {
    let mut args = std::ptr::null_mut();
    // SAFETY: `args` is created, filled and destroyed here; the rest per the contract.
    unsafe {
        if !sys::wasm_runtime_instantiation_args_create(&mut args) || args.is_null() {
            bail!("out of memory");
        }
        sys::wasm_runtime_instantiation_args_set_default_stack_size(args, STACK_SIZE);
        // No WAMR-managed heap inside the guest's memory: the guest has its own allocator.
        sys::wasm_runtime_instantiation_args_set_host_managed_heap_size(args, 0);
        sys::wasm_runtime_instantiation_args_set_max_memory_pages(args, max_memory_pages);
        let mut error = [0 as c_char; 256];
        let module_inst =
            sys::wasm_runtime_instantiate_ex2(module, args, error.as_mut_ptr(), error.len() as u32);
        sys::wasm_runtime_instantiation_args_destroy(args);
        if module_inst.is_null() {
            bail!(
                "WAMR cannot instantiate the module: {}",
                c_buffer_text(&error)
            );
        }
        Ok(module_inst)
    }
}

/// The callbacks the floor calls, resolved once per instance (their types were checked once per
/// module).
struct Callbacks {
    context_create: sys::wasm_function_inst_t,
    vm_start: sys::wasm_function_inst_t,
    configure: sys::wasm_function_inst_t,
    request_headers: sys::wasm_function_inst_t,
    response_headers: sys::wasm_function_inst_t,
    log: sys::wasm_function_inst_t,
    done: sys::wasm_function_inst_t,
    delete: sys::wasm_function_inst_t,
}

impl Default for Callbacks {
    fn default() -> Self {
        let none = std::ptr::null_mut();
        Callbacks {
            context_create: none,
            vm_start: none,
            configure: none,
            request_headers: none,
            response_headers: none,
            log: none,
            done: none,
            delete: none,
        }
    }
}

/// One started floor instance: a WAMR instance, its one exec env and its state.
pub struct WamrFloorVm<M: BenchHeaders> {
    /// Leaked from a box in `instantiate`, freed on drop; the exec env's user data. Only
    /// reached through this pointer, one short-lived reference at a time, because the guest
    /// re-enters it through the natives during calls.
    state: NonNull<FloorState<M>>,
    module_inst: sys::wasm_module_inst_t,
    exec_env: sys::wasm_exec_env_t,
    callbacks: Callbacks,
    next_context: u32,
    /// Keeps the module loaded while the instance lives.
    _module: Rc<LoadedModule>,
}

impl<M: BenchHeaders> Drop for WamrFloorVm<M> {
    fn drop(&mut self) {
        // SAFETY: no call is running (`&mut self`); the exec env belongs to the instance and is
        // destroyed first; the state was leaked from a box in `instantiate` and nothing refers
        // to it once the exec env is gone.
        unsafe {
            if !self.exec_env.is_null() {
                sys::wasm_runtime_destroy_exec_env(self.exec_env);
            }
            sys::wasm_runtime_deinstantiate(self.module_inst);
            drop(Box::from_raw(self.state.as_ptr()));
        }
    }
}

impl<M: BenchHeaders> WamrFloorVm<M> {
    /// Calls `function` (of this instance) for `context` with `argc` argument cells from
    /// `cells`, which receives the result in cell 0; the caller passes the callback's argument
    /// count and a buffer of at least one cell (every callback returns at most one `i32`).
    #[inline(always)]
    fn call(
        &mut self,
        context: u32,
        function: sys::wasm_function_inst_t,
        cells: &mut [u32],
        argc: u32,
    ) -> anyhow::Result<u32> {
        debug_assert!(cells.len() >= (argc as usize).max(1));
        // SAFETY: no reference to the state is live (`&mut self`, and natives hold none past
        // their return).
        unsafe { (*self.state.as_ptr()).effective_context = context };
        // SAFETY: the exec env and the function belong to this live instance; `cells` holds the
        // function's argument cells and room for its one-cell result (types checked once per
        // module, counts passed by the callers below).
        let completed = unsafe {
            sys::wasm_runtime_call_wasm(self.exec_env, function, argc, cells.as_mut_ptr())
        };
        if completed {
            Ok(cells[0])
        } else {
            Err(self.take_exception())
        }
    }

    /// The instance's exception as an error, cleared so that the instance stays usable.
    #[cold]
    fn take_exception(&mut self) -> anyhow::Error {
        // SAFETY: the instance is alive and its call is over; the exception string is copied
        // before it is cleared.
        unsafe {
            let exception = sys::wasm_runtime_get_exception(self.module_inst);
            let text = if exception.is_null() {
                "unknown trap".to_string()
            } else {
                CStr::from_ptr(exception).to_string_lossy().into_owned()
            };
            sys::wasm_runtime_clear_exception(self.module_inst);
            anyhow!("guest trapped: {text}")
        }
    }

    /// One full request, the same callback sequence as [`crate::pwhost_request`]:
    /// `proxy_on_context_create(ctx, 1)`, `proxy_on_request_headers(ctx, 10, 0)`,
    /// `proxy_on_response_headers(ctx, 3, 0)`, `proxy_on_log`, `proxy_on_done`,
    /// `proxy_on_delete`.
    #[inline]
    pub fn request(&mut self) -> anyhow::Result<RequestOutcome> {
        let context = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(2);
        let c = self.callbacks.context_create;
        self.call(context, c, &mut [context, 1], 2)?;
        // SAFETY: no guest code runs, so nothing else refers to the state.
        unsafe { (*self.state.as_ptr()).stream.begin(context) };
        let f = self.callbacks.request_headers;
        let request = self.call(
            context,
            f,
            &mut [context, REQUEST_HEADERS.len() as u32, 0],
            3,
        )?;
        let f = self.callbacks.response_headers;
        let response = self.call(
            context,
            f,
            &mut [context, RESPONSE_HEADERS.len() as u32, 0],
            3,
        )?;
        let f = self.callbacks.log;
        self.call(context, f, &mut [context], 1)?;
        let f = self.callbacks.done;
        self.call(context, f, &mut [context], 1)?;
        let f = self.callbacks.delete;
        self.call(context, f, &mut [context], 1)?;
        Ok(outcome(request as i32, response as i32))
    }
}

impl<M: BenchHeaders> FloorInstance<M> for WamrFloorVm<M> {
    fn request(&mut self) -> anyhow::Result<RequestOutcome> {
        WamrFloorVm::request(self)
    }

    fn stream(&self) -> &BenchStream<M> {
        // SAFETY: the state lives as long as `self`; no guest code (and so no native) runs while
        // `&self` is borrowed, since calls need `&mut self`.
        unsafe { &(*self.state.as_ptr()).stream }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{read_plugin, ProxyHeaders, LIFECYCLE_PLUGIN};

    /// Both calling conventions serve requests (the default one is also covered by
    /// `floor::tests`).
    #[test]
    fn both_conventions_serve_requests() {
        let wasm = read_plugin(LIFECYCLE_PLUGIN).unwrap_or_else(|e| panic!("{e}"));
        for convention in [Convention::Raw, Convention::Typed] {
            let floor = WamrFloor::<ProxyHeaders>::with_convention(&wasm, convention)
                .unwrap_or_else(|e| panic!("{convention:?}: {e:#}"));
            let mut vm = floor.instantiate().expect("an instance");
            for request in 1..=3 {
                let outcome = vm.request().expect("a request");
                assert_eq!(outcome.request, abi::HeadersAction::Continue);
                assert_eq!(vm.stream().logs(), request);
            }
        }
    }

    /// Only function imports are renamed, and the module still parses the same otherwise.
    #[test]
    fn renames_function_imports_only() {
        let wasm = wat::parse_str(
            r#"(module
                (import "env" "f" (func (param i32) (result i32)))
                (import "env" "m" (memory 1))
                (import "wasi" "g" (func)))"#,
        )
        .expect("valid wat");
        let (renamed, imports) = rename_imports(&wasm).expect("renamed");
        let names: Vec<_> = imports
            .iter()
            .map(|i| (i.module.to_str().unwrap(), i.name.to_str().unwrap()))
            .collect();
        assert_eq!(
            names,
            [("pwhost-floor:env", "f"), ("pwhost-floor:wasi", "g")]
        );
        let text = String::from_utf8_lossy(&renamed);
        assert!(text.contains("pwhost-floor:env"));
        assert!(
            text.contains("\u{3}env\u{1}m"),
            "the memory import keeps its module"
        );
    }
}
