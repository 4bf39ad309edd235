//! Header maps: request/response headers and trailers, call responses' headers, gRPC metadata.
//!
//! A map is reachable only while the plugin holds it (see `crate::stream`), with Envoy's
//! answers otherwise: `BAD_ARGUMENT` for a read of a single value and for every change,
//! an empty `OK` for a read of all pairs. Maps of call responses and gRPC metadata are readable
//! in their callbacks only and never writable.

use runtime_api::Caller;

use super::{return_data, Failure, HostResult};
use crate::callbacks::Callback;
use crate::header_map::wire;
use crate::state::Limit;
use crate::stream::{Access, MAX_HEADER_BYTES_WRITTEN};
use crate::{AbiVersion, HeaderMap, Headers, MapType, Status, VmState};

/// Why a map cannot be reached.
enum Unavailable {
    /// Not held by the plugin now: `BAD_ARGUMENT`.
    NotHeld,
    /// Held, but the stream has none (e.g. no response trailers came): reads find nothing.
    Missing,
    /// A write past the stream's [`MAX_HEADER_BYTES_WRITTEN`] (the plugin was told):
    /// `INTERNAL_FAILURE`.
    OverLimit,
}

/// The map a plugin names, in the effective context, if it may use it in this way now. A read
/// of a map the stream does not have, or of any map the plugin cannot reach in `proxy_on_log`
/// (Envoy's access-log phase), finds nothing (`NOT_FOUND`); anything else unavailable is
/// `BAD_ARGUMENT`.
fn map(state: &mut VmState, map_type: u64, access: Access) -> Result<&mut dyn Headers, Failure> {
    let map_type = MapType::from_raw(map_type).ok_or(Status::BadArgument)?;
    map_of(state, map_type, access)
}

/// [`map`] for a known map type.
fn map_of(
    state: &mut VmState,
    map_type: MapType,
    access: Access,
) -> Result<&mut dyn Headers, Failure> {
    map_to_write(state, map_type, access, 0)
}

/// [`map_of`], counting `written` bytes the plugin is about to write into it.
fn map_to_write(
    state: &mut VmState,
    map_type: MapType,
    access: Access,
    written: u64,
) -> Result<&mut dyn Headers, Failure> {
    let in_log = state.callback == Some(Callback::Log);
    writable(state, map_type, access, written).map_err(|unavailable| {
        match (unavailable, access) {
            (Unavailable::Missing, Access::Read) => Status::NotFound,
            (Unavailable::NotHeld, Access::Read) if in_log => Status::NotFound,
            (Unavailable::OverLimit, _) => Status::InternalFailure,
            _ => Status::BadArgument,
        }
        .into()
    })
}

fn lookup(
    state: &mut VmState,
    map_type: MapType,
    access: Access,
) -> Result<&mut dyn Headers, Unavailable> {
    writable(state, map_type, access, 0)
}

/// [`lookup`], counting `written` bytes against the stream's limit for a write.
fn writable(
    state: &mut VmState,
    map_type: MapType,
    access: Access,
    written: u64,
) -> Result<&mut dyn Headers, Unavailable> {
    match map_type {
        MapType::HttpCallResponseHeaders => callout_map(
            state.http_call_response.as_mut().map(|r| &mut r.headers),
            access,
        ),
        MapType::HttpCallResponseTrailers => callout_map(
            state.http_call_response.as_mut().map(|r| &mut r.trailers),
            access,
        ),
        MapType::GrpcReceiveInitialMetadata => {
            callout_map(state.grpc_initial_metadata.as_mut(), access)
        }
        MapType::GrpcReceiveTrailingMetadata => {
            callout_map(state.grpc_trailing_metadata.as_mut(), access)
        }
        _ => stream_map(state, map_type, access, written),
    }
}

/// A map of a call response or gRPC reply: readable while its callback runs, never writable.
fn callout_map(
    map: Option<&mut HeaderMap>,
    access: Access,
) -> Result<&mut dyn Headers, Unavailable> {
    match map {
        Some(map) if access == Access::Read => Ok(map),
        _ => Err(Unavailable::NotHeld),
    }
}

/// A map of the effective stream, if the plugin holds it; a write counts `written` bytes.
fn stream_map(
    state: &mut VmState,
    map_type: MapType,
    access: Access,
    written: u64,
) -> Result<&mut dyn Headers, Unavailable> {
    let in_log = state.callback == Some(Callback::Log);
    let context = state.effective_context;
    let within_limit = match state.effective_stream() {
        Some(stream) if stream.map_available(map_type, access, in_log) => {
            let charged = access == Access::Read || stream.charge_header_bytes(written);
            if charged && access == Access::Write {
                stream.note_change(map_type);
            }
            charged
        }
        _ => return Err(Unavailable::NotHeld),
    };
    if !within_limit {
        state.tell_limit(Limit::HeaderBytes, || {
            format!(
                "a plugin writes at most {MAX_HEADER_BYTES_WRITTEN} bytes of header names and \
                 values into one stream's maps: INTERNAL_FAILURE"
            )
        });
        return Err(Unavailable::OverLimit);
    }
    if written > 0 && state.host.header_map(context, map_type).is_none() {
        // Nothing is written to a map the stream does not have: the charge goes back.
        if let Some(stream) = state.effective_stream() {
            stream.refund_header_bytes(written);
        }
        return Err(Unavailable::Missing);
    }
    state
        .host
        .header_map(context, map_type)
        .ok_or(Unavailable::Missing)
}

/// `proxy_get_header_map_pairs(map_type, return_map_data, return_map_size)`: an unavailable or
/// empty map is an empty answer (a null pointer and size 0), as in Envoy.
pub(super) fn get_header_map_pairs(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let map_type = MapType::from_raw(args[0]).ok_or(Status::BadArgument)?;
    let len = match lookup(caller.state(), map_type, Access::Read) {
        Ok(map) if !map.is_empty() => {
            wire::encoded_len_of(map).ok_or(Status::SerializationFailure)?
        }
        _ => 0,
    };
    return_data(caller, len, args[1], args[2], |state, memory, pointer| {
        // The allocator ran in between: the map may have changed, or an embedder's map may
        // misreport its length; either way the plugin gets no half-written answer.
        let map = map(state, args[0], Access::Read)?;
        if !wire::encode_headers_into(map, memory.slice_mut(pointer, len)?) {
            return Err(Status::InternalFailure.into());
        }
        Ok(())
    })
}

/// Every pair of a map, as `proxy_get_header_map_pairs` answers: nothing for a map that is
/// unavailable.
pub(crate) fn visit_pairs(
    state: &mut VmState,
    map_type: MapType,
    visit: &mut dyn FnMut(&[u8], &[u8]),
) {
    if let Ok(map) = lookup(state, map_type, Access::Read) {
        map.for_each(visit);
    }
}

/// `proxy_set_header_map_pairs(map_type, map_data, map_size)`: replaces the whole map.
pub(super) fn set_header_map_pairs(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    let pairs = wire::decode(memory.slice(args[1], args[2])?)?;
    let map_type = MapType::from_raw(args[0]).ok_or(Status::BadArgument)?;
    set_pairs(state, map_type, pairs.iter().copied())
}

/// Replaces the whole map with `pairs`, in order.
pub(crate) fn set_pairs<'p, I>(state: &mut VmState, map_type: MapType, pairs: I) -> HostResult
where
    I: IntoIterator<Item = (&'p [u8], &'p [u8])> + Clone,
{
    // The callers' iterators are cheap to clone: no copy of the pairs.
    let written = pairs
        .clone()
        .into_iter()
        .map(|(key, value)| (key.len() + value.len()) as u64)
        .sum();
    let map = map_to_write(state, map_type, Access::Write, written)?;
    map.clear();
    for (key, value) in pairs {
        map.add(key, value);
    }
    Ok(())
}

/// Values up to this size are copied out once, before the guest's allocator runs, instead of
/// being looked up again after it.
const INLINE_VALUE: usize = 256;

/// `proxy_get_header_map_value(map_type, key_data, key_size, return_value_data,
/// return_value_size)`: the first value of the key. A missing key (or, in `proxy_on_log`, a
/// missing map) is `NOT_FOUND`, except for ABI 0.1.0 modules, which Envoy answers with an empty
/// value.
// Inlined into its one caller, the `status!` wrapper, as it was before its lookup became
// `value` (shared with `abi::direct`): outlined, the hottest host call pays ~80 instructions
// more per call on wasmtime (callgrind, `profile pwhost-proxy`).
#[inline(always)]
pub(super) fn get_header_map_value(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let mut inline = [0u8; INLINE_VALUE];
    let len = {
        let (state, memory) = caller.state_and_memory();
        let key = memory.slice(args[1], args[2])?;
        let map_type = MapType::from_raw(args[0]).ok_or(Status::BadArgument)?;
        let value = value(state, map_type, key)?;
        if let Some(copy) = inline.get_mut(..value.len()) {
            copy.copy_from_slice(value);
        }
        value.len()
    };
    return_data(
        caller,
        len as u64,
        args[3],
        args[4],
        |state, memory, pointer| {
            if let Some(value) = inline.get(..len) {
                memory.write(pointer, value)?;
                return Ok(());
            }
            // A long value: look the key up again, since the allocator ran in between and may have
            // changed anything.
            let key = memory.slice(args[1], args[2])?;
            let value = map(state, args[0], Access::Read)?
                .get(key)
                .ok_or(Status::NotFound)?;
            super::fill_exact(memory, pointer, len as u64, value)
        },
    )
}

/// The first value of `key`, as `proxy_get_header_map_value` answers (an ABI 0.1.0 module's
/// missing key is an empty value).
pub(crate) fn value<'s>(
    state: &'s mut VmState,
    map_type: MapType,
    key: &[u8],
) -> Result<&'s [u8], Failure> {
    let legacy = state.abi == AbiVersion::V0_1_0;
    let value = match map_of(state, map_type, Access::Read) {
        Ok(map) => map.get(key),
        Err(Failure::Status(Status::NotFound)) => None,
        Err(other) => return Err(other),
    };
    match value {
        Some(value) => Ok(value),
        None if legacy => Ok(&[]),
        None => Err(Status::NotFound.into()),
    }
}

/// `proxy_add_header_map_value(map_type, key_data, key_size, value_data, value_size)`.
pub(super) fn add_header_map_value(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    let key = memory.slice(args[1], args[2])?;
    let value = memory.slice(args[3], args[4])?;
    let map_type = MapType::from_raw(args[0]).ok_or(Status::BadArgument)?;
    edit(state, map_type, key, Edit::Add(value))
}

/// `proxy_replace_header_map_value(map_type, key_data, key_size, value_data, value_size)`.
pub(super) fn replace_header_map_value(
    caller: &mut dyn Caller<VmState>,
    args: &[u64],
) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    let key = memory.slice(args[1], args[2])?;
    let value = memory.slice(args[3], args[4])?;
    let map_type = MapType::from_raw(args[0]).ok_or(Status::BadArgument)?;
    edit(state, map_type, key, Edit::Replace(value))
}

/// `proxy_remove_header_map_value(map_type, key_data, key_size)`.
pub(super) fn remove_header_map_value(
    caller: &mut dyn Caller<VmState>,
    args: &[u64],
) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    let key = memory.slice(args[1], args[2])?;
    let map_type = MapType::from_raw(args[0]).ok_or(Status::BadArgument)?;
    edit(state, map_type, key, Edit::Remove)
}

/// A change to one key of a map.
pub(crate) enum Edit<'v> {
    /// Adds a value (keeping the key's others).
    Add(&'v [u8]),
    /// Sets the key's only value.
    Replace(&'v [u8]),
    /// Removes every value of the key.
    Remove,
}

/// Changes `key` of a map the plugin holds (`BAD_ARGUMENT` otherwise).
pub(crate) fn edit(state: &mut VmState, map_type: MapType, key: &[u8], edit: Edit) -> HostResult {
    let written = match edit {
        Edit::Add(value) | Edit::Replace(value) => (key.len() + value.len()) as u64,
        Edit::Remove => 0,
    };
    let map = map_to_write(state, map_type, Access::Write, written)?;
    match edit {
        Edit::Add(value) => map.add(key, value),
        Edit::Replace(value) => map.replace(key, value),
        Edit::Remove => map.remove(key),
    }
    Ok(())
}

/// `proxy_get_header_map_size(map_type, return_size)`: as Envoy, the sum of the names' and
/// values' lengths in bytes, from a map the plugin holds (`BAD_ARGUMENT` otherwise, also for
/// call responses and gRPC metadata).
pub(super) fn get_header_map_size(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let map_type = MapType::from_raw(args[0]).ok_or(Status::BadArgument)?;
    let size = size(caller.state(), map_type)?;
    // `return_size` is a `usize` in the guest: 4 bytes in Wasm, 8 for native plugins.
    caller.memory().write_size(args[1], size)?;
    Ok(())
}

/// What `proxy_get_header_map_size` answers for `map_type`.
fn size(state: &mut VmState, map_type: MapType) -> Result<u64, Failure> {
    match map_type {
        MapType::HttpRequestHeaders
        | MapType::HttpRequestTrailers
        | MapType::HttpResponseHeaders
        | MapType::HttpResponseTrailers => {
            let mut size = 0u64;
            map_of(state, map_type, Access::Write)?
                .for_each(&mut |k, v| size += (k.len() + v.len()) as u64);
            Ok(size)
        }
        _ => Err(Status::BadArgument.into()),
    }
}
