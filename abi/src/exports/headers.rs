//! Header maps: request/response headers and trailers, and the HTTP call response's.

use runtime_api::Caller;

use super::{return_data, Failure, HostResult};
use crate::header_map::wire;
use crate::{HeaderMap, MapType, Status, VmState};

/// The map a plugin names, in the effective context.
pub(crate) fn map(state: &mut VmState, map_type: u64) -> Result<&mut HeaderMap, Failure> {
    let map_type = MapType::from_raw(map_type).ok_or(Status::BadArgument)?;
    let context = state.effective_context;
    let map = match map_type {
        MapType::HttpCallResponseHeaders => {
            state.http_call_response.as_mut().map(|r| &mut r.headers)
        }
        MapType::HttpCallResponseTrailers => {
            state.http_call_response.as_mut().map(|r| &mut r.trailers)
        }
        MapType::GrpcReceiveInitialMetadata => state.grpc_initial_metadata.as_mut(),
        MapType::GrpcReceiveTrailingMetadata => state.grpc_trailing_metadata.as_mut(),
        other => state.host.header_map(context, other),
    };
    Ok(map.ok_or(Status::NotFound)?)
}

/// `proxy_get_header_map_pairs(map_type, return_map_data, return_map_size)`.
pub(super) fn get_header_map_pairs(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let len = wire::encoded_len(map(caller.state(), args[0])?.iter())
        .ok_or(Status::SerializationFailure)?;
    return_data(caller, len, args[1], args[2], |state, memory, pointer| {
        let map = map(state, args[0])?;
        if wire::encoded_len(map.iter()) != Some(len) {
            return Err(Status::InternalFailure.into());
        }
        wire::encode_into(map.iter(), memory.slice_mut(pointer, len)?);
        Ok(())
    })
}

/// `proxy_set_header_map_pairs(map_type, map_data, map_size)`: replaces the whole map.
pub(super) fn set_header_map_pairs(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    let pairs = wire::decode(memory.slice(args[1], args[2])?)?;
    let map = map(state, args[0])?;
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
/// return_value_size)`: the first value of the key.
pub(super) fn get_header_map_value(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let mut inline = [0u8; INLINE_VALUE];
    let len = {
        let (state, memory) = caller.state_and_memory();
        let key = memory.slice(args[1], args[2])?;
        let value = map(state, args[0])?.get(key).ok_or(Status::NotFound)?;
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
            let value = map(state, args[0])?.get(key).ok_or(Status::NotFound)?;
            super::fill_exact(memory, pointer, len as u64, value)
        },
    )
}

/// `proxy_add_header_map_value(map_type, key_data, key_size, value_data, value_size)`.
pub(super) fn add_header_map_value(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    let key = memory.slice(args[1], args[2])?;
    let value = memory.slice(args[3], args[4])?;
    map(state, args[0])?.add(key, value);
    Ok(())
}

/// `proxy_replace_header_map_value(map_type, key_data, key_size, value_data, value_size)`.
pub(super) fn replace_header_map_value(
    caller: &mut dyn Caller<VmState>,
    args: &[u64],
) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    let key = memory.slice(args[1], args[2])?;
    let value = memory.slice(args[3], args[4])?;
    map(state, args[0])?.replace(key, value);
    Ok(())
}

/// `proxy_remove_header_map_value(map_type, key_data, key_size)`.
pub(super) fn remove_header_map_value(
    caller: &mut dyn Caller<VmState>,
    args: &[u64],
) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    let key = memory.slice(args[1], args[2])?;
    map(state, args[0])?.remove(key);
    Ok(())
}

/// `proxy_get_header_map_size(map_type, return_size)`: the size of the serialized map in bytes.
pub(super) fn get_header_map_size(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let len = wire::encoded_len(map(caller.state(), args[0])?.iter())
        .ok_or(Status::SerializationFailure)?;
    // `return_size` is a `usize` in the guest: 4 bytes in Wasm, 8 for native plugins.
    caller.memory().write_size(args[1], len)?;
    Ok(())
}
