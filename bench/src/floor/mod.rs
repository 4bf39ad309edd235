//! The floors: for each engine, the least a correct Proxy-Wasm host written by hand on that
//! engine's own API must do to run `lifecycle_bench`. pwhost on an engine is compared with that
//! engine's floor, in the same run.
//!
//! Every floor follows the same rules, so that a ratio to it measures pwhost's layers and not a
//! difference of setup:
//!
//! * Same engine, same configuration as pwhost's runtime for it (the same compiler, deadline
//!   mechanism and memory settings), the module compiled once.
//! * Everything resolved once: host functions bound with the engine's cheapest typed binding,
//!   the guest's memory, allocator and callbacks looked up once per instance.
//! * Only the host calls the plugin makes (`proxy_log`, `proxy_get_header_map_value`,
//!   `proxy_add_header_map_value`); every other function import returns `UNIMPLEMENTED` (12).
//! * Still what any correct host must do: bounds-check every guest pointer, validate the log
//!   level and enum arguments, allocate reply buffers with the plugin's allocator
//!   (`proxy_on_memory_allocate`, else `malloc`), write values straight into guest memory.
//! * The same embedder work as pwhost's bench host: the same [`BenchStream`] in the same header
//!   storage `M`, restored the same way, and the same log counter.
//! * The same callback sequence per request as [`crate::pwhost_request`], and per start as
//!   [`crate::pwhost_vm`] (`_initialize`, `proxy_on_context_create(1, 0)`, `proxy_on_vm_start`,
//!   `proxy_on_configure`).
//!
//! [`wasmtime`] is the reference floor; the others live beside it, one module per engine, each
//! behind its engine's cargo feature. [`engine_floors`] lists those compiled in, by pwhost's
//! engine names.

use crate::{BenchHeaders, BenchStream, RequestOutcome};
use abi::Status;

#[cfg(feature = "v8")]
pub mod v8;
#[cfg(feature = "wamr")]
pub mod wamr;
#[cfg(any(
    feature = "wasmer-cranelift",
    feature = "wasmer-singlepass",
    feature = "wasmer-llvm"
))]
pub mod wasmer;
#[cfg(feature = "wasmi")]
pub mod wasmi;
pub mod wasmtime;

pub use self::wasmtime::{FloorOptions, FloorPlugin, FloorVm};

/// `OK` as a raw status.
pub const OK: i32 = Status::Ok as i32;
/// `NOT_FOUND` as a raw status.
pub const NOT_FOUND: i32 = Status::NotFound as i32;
/// `BAD_ARGUMENT` as a raw status.
pub const BAD_ARGUMENT: i32 = Status::BadArgument as i32;
/// `INVALID_MEMORY_ACCESS` as a raw status.
pub const INVALID_MEMORY_ACCESS: i32 = Status::InvalidMemoryAccess as i32;
/// `INTERNAL_FAILURE` as a raw status.
pub const INTERNAL_FAILURE: i32 = Status::InternalFailure as i32;
/// `UNIMPLEMENTED` as a raw status.
pub const UNIMPLEMENTED: i32 = Status::Unimplemented as i32;

/// The host functions the floors implement; every other import returns `UNIMPLEMENTED`.
pub const IMPLEMENTED: [&str; 3] = [
    "proxy_log",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
];

/// `bytes[ptr..ptr + len]`, if it lies in guest memory.
#[inline]
pub fn slice(bytes: &[u8], ptr: i32, len: i32) -> Option<&[u8]> {
    let start = ptr as u32 as usize;
    bytes.get(start..start.checked_add(len as u32 as usize)?)
}

/// Writes a little-endian `u32` at `ptr`, if it lies in guest memory.
#[inline]
pub fn write_u32(bytes: &mut [u8], ptr: i32, value: u32) -> Option<()> {
    let start = ptr as u32 as usize;
    bytes
        .get_mut(start..start.checked_add(4)?)?
        .copy_from_slice(&value.to_le_bytes());
    Some(())
}

/// `proxy_get_header_map_value` up to the allocator, with the guest memory in hand: where the
/// value of the key at `key_ptr` is in map `map_type` of `stream` and its length, or the status
/// that answers the call. Every floor does this part alike; only reaching the memory and the
/// allocator is the engine's.
#[inline]
pub fn find_value<M: BenchHeaders>(
    bytes: &[u8],
    stream: &mut BenchStream<M>,
    context: u32,
    map_type: abi::MapType,
    key_ptr: i32,
    key_len: i32,
) -> Result<(usize, usize), i32> {
    let key = slice(bytes, key_ptr, key_len).ok_or(INVALID_MEMORY_ACCESS)?;
    let map = stream.header_map(context, map_type).ok_or(NOT_FOUND)?;
    map.find(key).ok_or(NOT_FOUND)
}

/// `proxy_get_header_map_value` after the allocator returned `pointer` for the `len` bytes of
/// value `index` (`find_value`'s answer; `pointer` is 0 for an empty value): copies the value
/// there, writes the pointer and the size, and returns the call's status.
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn return_value<M: BenchHeaders>(
    bytes: &mut [u8],
    stream: &mut BenchStream<M>,
    context: u32,
    map_type: abi::MapType,
    (index, len): (usize, usize),
    pointer: u32,
    return_data: i32,
    return_size: i32,
) -> i32 {
    if len > 0 {
        let value = stream
            .header_map(context, map_type)
            .and_then(|map| map.value_at(index));
        let start = pointer as usize;
        let out = start
            .checked_add(len)
            .and_then(|end| bytes.get_mut(start..end));
        match (value, out) {
            (Some(value), Some(out)) if value.len() == len => out.copy_from_slice(value),
            _ => return INTERNAL_FAILURE,
        }
    }
    if write_u32(bytes, return_data, pointer).is_none()
        || write_u32(bytes, return_size, len as u32).is_none()
    {
        return INVALID_MEMORY_ACCESS;
    }
    OK
}

/// `proxy_add_header_map_value` with the guest memory in hand.
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn add_value<M: BenchHeaders>(
    bytes: &[u8],
    stream: &mut BenchStream<M>,
    context: u32,
    map_type: abi::MapType,
    key_ptr: i32,
    key_len: i32,
    value_ptr: i32,
    value_len: i32,
) -> i32 {
    let (Some(key), Some(value)) = (
        slice(bytes, key_ptr, key_len),
        slice(bytes, value_ptr, value_len),
    ) else {
        return INVALID_MEMORY_ACCESS;
    };
    match stream.header_map(context, map_type) {
        Some(map) => {
            map.add(key, value);
            OK
        }
        None => NOT_FOUND,
    }
}

/// The outcome of a request from the two headers callbacks' raw results.
#[inline]
pub fn outcome(request: i32, response: i32) -> RequestOutcome {
    RequestOutcome {
        request: abi::HeadersAction::from_headers_callback(request as u32 as u64, false),
        response: abi::HeadersAction::from_headers_callback(response as u32 as u64, false),
    }
}

/// One started floor instance, engine hidden: what the benchmarks drive.
pub trait FloorInstance<M: BenchHeaders> {
    /// One full request, the callback sequence of [`crate::pwhost_request`].
    fn request(&mut self) -> anyhow::Result<RequestOutcome>;

    /// The instance's stream.
    fn stream(&self) -> &BenchStream<M>;
}

/// A floor's compiled plugin, engine hidden: makes started instances.
pub trait FloorEngine<M: BenchHeaders> {
    /// A new instance, initialised, started and configured.
    fn instantiate(&self) -> anyhow::Result<Box<dyn FloorInstance<M>>>;
}

/// wasmtime's own error type as an `anyhow::Error`, its context chain kept.
fn wasmtime_error(error: ::wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{error:?}")
}

impl<M: BenchHeaders> FloorInstance<M> for FloorVm<M> {
    fn request(&mut self) -> anyhow::Result<RequestOutcome> {
        FloorVm::request(self).map_err(wasmtime_error)
    }

    fn stream(&self) -> &BenchStream<M> {
        self.state().stream()
    }
}

impl<M: BenchHeaders> FloorEngine<M> for FloorPlugin<M> {
    fn instantiate(&self) -> anyhow::Result<Box<dyn FloorInstance<M>>> {
        Ok(Box::new(
            FloorPlugin::instantiate(self).map_err(wasmtime_error)?,
        ))
    }
}

/// Compiles `wasm` into the floor of the pwhost engine named `engine`, if that engine is
/// compiled in and has a floor; `None` otherwise. Each floor runs with its engine's default
/// configuration, as `pwhost::runtimes::create(engine, RuntimeConfig::default())` does.
pub fn engine_floor<M: BenchHeaders>(
    engine: &str,
    wasm: &[u8],
) -> Option<anyhow::Result<Box<dyn FloorEngine<M>>>> {
    let floor = match engine {
        "wasmtime" => FloorPlugin::<M>::new(wasm, FloorOptions::default())
            .map(|floor| Box::new(floor) as Box<dyn FloorEngine<M>>)
            .map_err(wasmtime_error),
        #[cfg(feature = "wasmer-cranelift")]
        "wasmer-cranelift" => wasmer::floor::<M>(wasmer::Compiler::Cranelift, wasm),
        #[cfg(feature = "wasmer-singlepass")]
        "wasmer-singlepass" => wasmer::floor::<M>(wasmer::Compiler::Singlepass, wasm),
        #[cfg(feature = "wasmer-llvm")]
        "wasmer-llvm" => wasmer::floor::<M>(wasmer::Compiler::Llvm, wasm),
        #[cfg(feature = "wasmi")]
        "wasmi" => wasmi::floor::<M>(wasm),
        #[cfg(feature = "wamr")]
        "wamr" => wamr::floor::<M>(wasm),
        #[cfg(feature = "v8")]
        "v8" => v8::floor::<M>(wasm),
        _ => return None,
    };
    Some(floor)
}

/// The pwhost engine names with a floor in this build, in `pwhost::runtimes::available()`'s
/// order.
pub fn engine_floors() -> Vec<&'static str> {
    [
        ("wasmtime", true),
        ("wasmer-cranelift", cfg!(feature = "wasmer-cranelift")),
        ("wasmer-singlepass", cfg!(feature = "wasmer-singlepass")),
        ("wasmer-llvm", cfg!(feature = "wasmer-llvm")),
        ("wasmi", cfg!(feature = "wasmi")),
        ("wamr", cfg!(feature = "wamr")),
        ("v8", cfg!(feature = "v8")),
    ]
    .into_iter()
    .filter_map(|(engine, built)| built.then_some(engine))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{read_plugin, ProxyHeaders, LIFECYCLE_PLUGIN, REQUEST_HEADERS};
    use abi::{HeaderMap, HeadersAction};

    /// Every floor compiled in serves requests as pwhost does: both headers callbacks continue,
    /// the plugin logs one line per request and adds `x-bench: 1` to the request headers, in
    /// the header storage `M`, request after request on one instance and on a second instance.
    fn every_floor_serves_requests_in<M: BenchHeaders>() {
        let wasm = read_plugin(LIFECYCLE_PLUGIN).unwrap_or_else(|e| panic!("{e}"));
        for engine in engine_floors() {
            let floor = engine_floor::<M>(engine, &wasm)
                .expect("a floor for every engine listed")
                .unwrap_or_else(|e| panic!("{engine}: {e:#}"));
            for instance in 0..2 {
                let mut vm = floor
                    .instantiate()
                    .unwrap_or_else(|e| panic!("{engine}: {e:#}"));
                for request in 1..=3u64 {
                    let outcome = vm.request().unwrap_or_else(|e| panic!("{engine}: {e:#}"));
                    let what = format!("{engine}, instance {instance}, request {request}");
                    assert_eq!(outcome.request, HeadersAction::Continue, "{what}");
                    assert_eq!(outcome.response, HeadersAction::Continue, "{what}");
                    assert_eq!(vm.stream().logs(), request, "{what}: one log line each");
                    let headers = vm.stream().request_headers();
                    assert_eq!(headers.get(b"x-bench"), Some(&b"1"[..]), "{what}");
                    assert_eq!(headers.len(), REQUEST_HEADERS.len() + 1, "{what}");
                }
            }
        }
    }

    #[test]
    fn every_floor_serves_requests_in_pwhost_header_maps() {
        every_floor_serves_requests_in::<HeaderMap>();
    }

    #[test]
    fn every_floor_serves_requests_in_proxy_owned_storage() {
        every_floor_serves_requests_in::<ProxyHeaders>();
    }

    #[test]
    fn engines_without_a_floor_have_none() {
        assert!(engine_floor::<HeaderMap>("null", b"").is_none());
        assert!(engine_floor::<HeaderMap>("no-such-engine", b"").is_none());
    }
}
