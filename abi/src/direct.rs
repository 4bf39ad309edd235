//! Host calls made directly on a VM's state, for plugins compiled into the host.
//!
//! A WebAssembly plugin reaches the host through the functions it imports: arguments in its
//! linear memory, answers copied into blocks of its own allocator. A native plugin (the null
//! runtime) shares the host's address space, so on a request's hot path it may skip both: these
//! functions take and lend plain Rust values, and answer as the host functions of the same
//! names — the same statuses, capability checks and restrictions, and the same count of host
//! calls — except that nothing is serialized, so nothing can fail to be. Embedders never call
//! them; a native plugin SDK does, on the state its runtime lends it for the duration of one call
//! (e.g. `runtime_null::with_state`).
//!
//! Each returns `Err(trap)` when the plugin must be stopped (where the host function would
//! trap), otherwise the call's status, `Ok(Ok(_))` being `OK`.

use runtime_api::Trap;

use crate::exports::headers::{self, Edit};
use crate::exports::{answer, check_allowed, logging, Failure};
use crate::{LogLevel, MapType, Status, VmState};

/// What a host call made directly answers: a trap that stops the plugin, or the call's status.
pub type HostCallResult<T> = Result<Result<T, Status>, Trap>;

/// Runs `body` as host function `name` of module `env`: counted, refused as the capability
/// restriction says, its failure split into trap and status.
fn host_call<T>(
    state: &mut VmState,
    name: &str,
    body: impl FnOnce(&mut VmState) -> Result<T, Failure>,
) -> HostCallResult<T> {
    if !check_allowed(state, "env", name)? {
        return Ok(Err(Status::InternalFailure));
    }
    answer(body(state))
}

/// `proxy_log`: `message` to the host's log at `level`, from the effective context.
pub fn log(state: &mut VmState, level: LogLevel, message: &[u8]) -> HostCallResult<()> {
    host_call(state, "proxy_log", |state| {
        logging::write_log(state, level, message);
        Ok(())
    })
}

/// `proxy_get_header_map_value`: `read` runs on the first value of `key` (an empty value for
/// an ABI 0.1.0 module's missing key), lent from the embedder's map.
pub fn get_header_map_value<R>(
    state: &mut VmState,
    map_type: MapType,
    key: &[u8],
    read: impl FnOnce(&[u8]) -> R,
) -> HostCallResult<R> {
    host_call(state, "proxy_get_header_map_value", |state| {
        headers::value(state, map_type, key).map(read)
    })
}

/// `proxy_get_header_map_pairs`: `visit` runs on every pair of the map in order (on none if the
/// plugin cannot reach the map, which the host function answers with an empty map).
pub fn get_header_map_pairs(
    state: &mut VmState,
    map_type: MapType,
    visit: &mut dyn FnMut(&[u8], &[u8]),
) -> HostCallResult<()> {
    host_call(state, "proxy_get_header_map_pairs", |state| {
        headers::visit_pairs(state, map_type, visit);
        Ok(())
    })
}

/// `proxy_set_header_map_pairs`: the map becomes `pairs`, in order.
pub fn set_header_map_pairs<'p>(
    state: &mut VmState,
    map_type: MapType,
    pairs: impl IntoIterator<Item = (&'p [u8], &'p [u8])> + Clone,
) -> HostCallResult<()> {
    host_call(state, "proxy_set_header_map_pairs", |state| {
        headers::set_pairs(state, map_type, pairs)
    })
}

/// `proxy_add_header_map_value`: adds `value` to `key`'s values.
pub fn add_header_map_value(
    state: &mut VmState,
    map_type: MapType,
    key: &[u8],
    value: &[u8],
) -> HostCallResult<()> {
    host_call(state, "proxy_add_header_map_value", |state| {
        headers::edit(state, map_type, key, Edit::Add(value))
    })
}

/// `proxy_replace_header_map_value`: `value` becomes `key`'s only value.
pub fn replace_header_map_value(
    state: &mut VmState,
    map_type: MapType,
    key: &[u8],
    value: &[u8],
) -> HostCallResult<()> {
    host_call(state, "proxy_replace_header_map_value", |state| {
        headers::edit(state, map_type, key, Edit::Replace(value))
    })
}

/// `proxy_remove_header_map_value`: removes every value of `key`.
pub fn remove_header_map_value(
    state: &mut VmState,
    map_type: MapType,
    key: &[u8],
) -> HostCallResult<()> {
    host_call(state, "proxy_remove_header_map_value", |state| {
        headers::edit(state, map_type, key, Edit::Remove)
    })
}
