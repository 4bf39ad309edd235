//! The host functions plugins import, engine-free (the counterpart of proxy-wasm-cpp-host's
//! `exports.cc`).
//!
//! Each function validates every guest pointer before use and reports failures as the spec's
//! status codes; only conditions the guest must not survive (a trap in its own allocator,
//! `proc_exit`) stop it.

pub(crate) mod buffers;
pub(crate) mod calls;
pub(crate) mod headers;
pub(crate) mod logging;
mod properties;
mod shared_data;
mod stream;
mod wasi;

pub(crate) use properties::property_bytes;

use runtime_api::{Caller, GuestMemory, HostFunction, MemoryAccessError, Trap, ValType};

use crate::state::Restriction;
use crate::{AbiVersion, Status, VmState};

/// Why a host function did not complete with `OK`.
pub(crate) enum Failure {
    /// Report this status to the guest.
    Status(Status),
    /// Stop the guest.
    Trap(Trap),
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Failure::Status(status)
    }
}

impl From<MemoryAccessError> for Failure {
    fn from(_: MemoryAccessError) -> Self {
        Failure::Status(Status::InvalidMemoryAccess)
    }
}

impl From<Trap> for Failure {
    fn from(trap: Trap) -> Self {
        Failure::Trap(trap)
    }
}

/// The result of a host function body: `Ok` is `Status::Ok`.
pub(crate) type HostResult = Result<(), Failure>;

/// A body's result as the plugin meets it: `Err` stops the plugin, otherwise the call's status
/// (`Ok(_)` being `OK`).
#[inline]
pub(crate) fn answer<T>(result: Result<T, Failure>) -> Result<Result<T, Status>, Trap> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(Failure::Status(status)) => Ok(Err(status)),
        Err(Failure::Trap(trap)) => Err(trap),
    }
}

/// A status from the host (or shared state) as a host function result.
pub(crate) fn check(status: Status) -> HostResult {
    match status {
        Status::Ok => Ok(()),
        other => Err(other.into()),
    }
}

/// Whether host function `module.name` runs now. A trap while the plugin runs code that may
/// not call it (see [`Restriction`]): the plugin is stopped and its VM fails. `Ok(false)` when
/// the plugin's capability restriction leaves the function out: the caller then answers as
/// proxy-wasm-cpp-host's stub does, after the error logged here.
#[inline]
pub(crate) fn check_allowed(state: &mut VmState, module: &str, name: &str) -> Result<bool, Trap> {
    #[cfg(feature = "host-call-count")]
    HOST_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if state.restriction == Restriction::None && state.allowed_capabilities.is_none() {
        return Ok(true);
    }
    check_restricted(state, module, name)
}

#[cold]
fn check_restricted(state: &mut VmState, module: &str, name: &str) -> Result<bool, Trap> {
    let restriction = state.restriction;
    if restriction != Restriction::None && !restriction.allows(module, name) {
        let during = match restriction {
            Restriction::Start => "the module's start function",
            _ => "the plugin's allocator (running to return data of a host call)",
        };
        return Err(Trap::host(format!(
            "{module}.{name} called from {during}, which may call only {}",
            restriction.describe()
        )));
    }
    let Some(allowed) = &state.allowed_capabilities else {
        return Ok(true);
    };
    let kind = match module {
        "env" if name.starts_with("proxy_") => "proxy-wasm",
        "wasi_snapshot_preview1" | "wasi_unstable" => "WASI",
        // Toolchain notices (Emscripten's) are no capability.
        _ => return Ok(true),
    };
    if allowed.contains(name) {
        return Ok(true);
    }
    let context = state.effective_context;
    state.host.log(
        context,
        crate::LogLevel::Error,
        &format!("Attempted call to restricted {kind} capability: {name}"),
    );
    Ok(false)
}

/// Host calls made in this process (every engine, every VM), for fuzzing campaigns.
#[cfg(feature = "host-call-count")]
pub(crate) static HOST_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Wraps a body returning [`HostResult`] as a [`runtime_api::HostCallback`] that writes the
/// status into slot 0.
macro_rules! status {
    ($name:expr, $body:path) => {
        |caller: &mut dyn runtime_api::Caller<crate::VmState>,
         args: &mut [u64]|
         -> Result<(), runtime_api::Trap> {
            if !crate::exports::check_allowed(caller.state(), "env", $name)? {
                args[0] = u64::from(crate::Status::InternalFailure.code());
                return Ok(());
            }
            let status = match crate::exports::answer($body(caller, args))? {
                Ok(()) => crate::Status::Ok,
                Err(status) => status,
            };
            args[0] = u64::from(status.code());
            Ok(())
        }
    };
}
pub(crate) use status;

const I32: ValType = ValType::I32;
const I64: ValType = ValType::I64;

/// A host function of module `env` taking `params` and returning an `i32` status.
macro_rules! env {
    ($name:ident, [$($param:ident),*], $body:path) => {
        runtime_api::HostFunction {
            module: "env",
            name: stringify!($name),
            signature: runtime_api::Signature::new(&[$(crate::exports::$param),*], &[crate::exports::I32]),
            callback: crate::exports::status!(stringify!($name), $body),
        }
    };
}

/// The host functions of ABI 0.2.x (0.2.1 adds only `proxy_get_log_level`, which a 0.2.0 module
/// simply does not import). WASI follows under both of its module names.
static V0_2: &[HostFunction<VmState>] = &[
    env!(proxy_log, [I32, I32, I32], logging::log),
    env!(proxy_get_log_level, [I32], logging::get_log_level),
    env!(
        proxy_get_current_time_nanoseconds,
        [I32],
        logging::get_current_time_nanoseconds
    ),
    env!(
        proxy_set_tick_period_milliseconds,
        [I32],
        logging::set_tick_period_milliseconds
    ),
    env!(
        proxy_get_buffer_bytes,
        [I32, I32, I32, I32, I32],
        buffers::get_buffer_bytes
    ),
    env!(
        proxy_set_buffer_bytes,
        [I32, I32, I32, I32, I32],
        buffers::set_buffer_bytes
    ),
    env!(
        proxy_get_buffer_status,
        [I32, I32, I32],
        buffers::get_buffer_status
    ),
    env!(
        proxy_get_header_map_pairs,
        [I32, I32, I32],
        headers::get_header_map_pairs
    ),
    env!(
        proxy_set_header_map_pairs,
        [I32, I32, I32],
        headers::set_header_map_pairs
    ),
    env!(
        proxy_get_header_map_value,
        [I32, I32, I32, I32, I32],
        headers::get_header_map_value
    ),
    env!(
        proxy_add_header_map_value,
        [I32, I32, I32, I32, I32],
        headers::add_header_map_value
    ),
    env!(
        proxy_replace_header_map_value,
        [I32, I32, I32, I32, I32],
        headers::replace_header_map_value
    ),
    env!(
        proxy_remove_header_map_value,
        [I32, I32, I32],
        headers::remove_header_map_value
    ),
    env!(
        proxy_get_header_map_size,
        [I32, I32],
        headers::get_header_map_size
    ),
    env!(
        proxy_get_property,
        [I32, I32, I32, I32],
        properties::get_property
    ),
    env!(
        proxy_set_property,
        [I32, I32, I32, I32],
        properties::set_property
    ),
    env!(
        proxy_send_local_response,
        [I32, I32, I32, I32, I32, I32, I32, I32],
        stream::send_local_response
    ),
    env!(proxy_continue_stream, [I32], stream::continue_stream),
    env!(proxy_close_stream, [I32], stream::close_stream),
    env!(
        proxy_set_effective_context,
        [I32],
        stream::set_effective_context
    ),
    env!(proxy_done, [], stream::done),
    env!(
        proxy_get_shared_data,
        [I32, I32, I32, I32, I32],
        shared_data::get_shared_data
    ),
    env!(
        proxy_set_shared_data,
        [I32, I32, I32, I32, I32],
        shared_data::set_shared_data
    ),
    env!(
        proxy_register_shared_queue,
        [I32, I32, I32],
        shared_data::register_shared_queue
    ),
    env!(
        proxy_resolve_shared_queue,
        [I32, I32, I32, I32, I32],
        shared_data::resolve_shared_queue
    ),
    env!(
        proxy_dequeue_shared_queue,
        [I32, I32, I32],
        shared_data::dequeue_shared_queue
    ),
    env!(
        proxy_enqueue_shared_queue,
        [I32, I32, I32],
        shared_data::enqueue_shared_queue
    ),
    env!(
        proxy_define_metric,
        [I32, I32, I32, I32],
        shared_data::define_metric
    ),
    env!(
        proxy_increment_metric,
        [I32, I64],
        shared_data::increment_metric
    ),
    env!(proxy_record_metric, [I32, I64], shared_data::record_metric),
    env!(proxy_get_metric, [I32, I32], shared_data::get_metric),
    env!(
        proxy_http_call,
        [I32, I32, I32, I32, I32, I32, I32, I32, I32, I32],
        calls::http_call
    ),
    env!(
        proxy_grpc_call,
        [I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32],
        calls::grpc_call
    ),
    env!(
        proxy_grpc_stream,
        [I32, I32, I32, I32, I32, I32, I32, I32, I32],
        calls::grpc_stream
    ),
    env!(proxy_grpc_send, [I32, I32, I32, I32], calls::grpc_send),
    env!(proxy_grpc_cancel, [I32], calls::grpc_cancel),
    env!(proxy_grpc_close, [I32], calls::grpc_close),
    env!(proxy_get_status, [I32, I32, I32], calls::get_status),
    env!(
        proxy_call_foreign_function,
        [I32, I32, I32, I32, I32, I32],
        calls::call_foreign_function
    ),
];

/// Imports some toolchains add beside the ABI, provided for every version.
static TOOLCHAIN: &[HostFunction<VmState>] = &[
    // Emscripten (the C++ SDK) tells the host its memory grew; pwhost re-reads memory on every
    // access anyway, so there is nothing to do.
    HostFunction {
        module: "env",
        name: "emscripten_notify_memory_growth",
        signature: runtime_api::Signature::new(&[I32], &[]),
        callback: |_, _| Ok(()),
    },
];

/// Host functions only ABI 0.1.0 has.
static V0_1_ONLY: &[HostFunction<VmState>] = &[
    env!(
        proxy_get_configuration,
        [I32, I32],
        buffers::get_configuration
    ),
    env!(proxy_continue_request, [], stream::continue_request),
    env!(proxy_continue_response, [], stream::continue_response),
    env!(proxy_clear_route_cache, [], stream::clear_route_cache),
];

/// Host functions of 0.2.x that 0.1.0 does not have.
const NOT_IN_V0_1: [&str; 3] = [
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_get_log_level",
];

/// Every host function a module of ABI `abi` may import: that version's `env` functions, and
/// WASI under both of its module names.
pub fn host_functions(abi: AbiVersion) -> &'static [HostFunction<VmState>] {
    static V0_1: std::sync::OnceLock<Vec<HostFunction<VmState>>> = std::sync::OnceLock::new();
    static V0_2_ALL: std::sync::OnceLock<Vec<HostFunction<VmState>>> = std::sync::OnceLock::new();
    let wasi = || wasi::FUNCTIONS.iter().copied().chain(wasi::unstable());
    match abi {
        AbiVersion::V0_1_0 => V0_1.get_or_init(|| {
            V0_2.iter()
                .filter(|f| !NOT_IN_V0_1.contains(&f.name))
                .chain(V0_1_ONLY)
                .chain(TOOLCHAIN)
                .copied()
                .chain(wasi())
                .collect()
        }),
        AbiVersion::V0_2_0 | AbiVersion::V0_2_1 => V0_2_ALL.get_or_init(|| {
            V0_2.iter()
                .chain(TOOLCHAIN)
                .copied()
                .chain(wasi())
                .collect()
        }),
    }
}

/// Copies guest bytes out, so the host may be borrowed mutably afterwards.
pub(crate) fn read_bytes(
    caller: &mut dyn Caller<VmState>,
    ptr: u64,
    len: u64,
) -> Result<Vec<u8>, Failure> {
    Ok(caller.memory().slice(ptr, len)?.to_vec())
}

/// Allocates `len` bytes in the guest with its allocator.
fn allocate(caller: &mut dyn Caller<VmState>, len: u64) -> Result<u64, Failure> {
    if len > u64::from(u32::MAX) && caller.memory().pointer_size() == 4 {
        return Err(Status::InternalFailure.into());
    }
    let state = caller.state();
    let allocator = state.allocator.ok_or(Status::InternalFailure)?;
    let outer = std::mem::replace(&mut state.restriction, Restriction::Allocator);
    let mut pointer = [0];
    let result = caller.call(allocator, &[len], &mut pointer);
    caller.state().restriction = outer;
    result?;
    if pointer[0] == 0 {
        return Err(Status::InternalFailure.into());
    }
    Ok(pointer[0])
}

/// Hands `len` bytes to the guest: allocates them with the guest's allocator, lets `fill` write
/// them straight into guest memory at the pointer it is given, and stores the pointer and size at
/// `return_data` and `return_size`. Zero bytes are returned as a null pointer, as the reference
/// host does.
///
/// `fill` runs after the allocator (which may have re-entered the host or grown memory), with a
/// fresh view of memory; it writes exactly `len` bytes at the pointer (bounds-checked), or fails
/// if what it would write no longer has `len` bytes.
// Inlined into each host function: generic over `fill`, it was outlined once it gained callers,
// at ~15 instructions more per reply on wasmtime.
#[inline(always)]
pub(crate) fn return_data(
    caller: &mut dyn Caller<VmState>,
    len: u64,
    return_data: u64,
    return_size: u64,
    fill: impl FnOnce(&mut VmState, &mut GuestMemory<'_>, u64) -> HostResult,
) -> HostResult {
    // The return slots are checked when written: a plugin passing bad ones loses the block its
    // allocator gave, which costs the host nothing and spares every good call a check.
    let pointer = if len == 0 { 0 } else { allocate(caller, len)? };
    let (state, mut memory) = caller.state_and_memory();
    if len > 0 {
        fill(state, &mut memory, pointer)?;
    }
    memory.write_pointer(return_data, pointer)?;
    memory.write_size(return_size, len)?;
    Ok(())
}

/// Writes `bytes` at `pointer`, which `return_data` allocated for exactly `expected` bytes.
pub(crate) fn fill_exact(
    memory: &mut GuestMemory<'_>,
    pointer: u64,
    expected: u64,
    bytes: &[u8],
) -> HostResult {
    if bytes.len() as u64 != expected {
        return Err(Status::InternalFailure.into());
    }
    memory.write(pointer, bytes)?;
    Ok(())
}

/// Writes a `u32` result at `ptr`.
pub(crate) fn write_u32(caller: &mut dyn Caller<VmState>, ptr: u64, value: u32) -> HostResult {
    caller.memory().write_u32(ptr, value)?;
    Ok(())
}
