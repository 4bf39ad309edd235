//! Buffers: bodies, TCP data, configurations, call responses and foreign call arguments.
//!
//! As in Envoy: a body or data buffer the plugin does not hold now reads as empty and cannot be
//! written (`BAD_ARGUMENT`); the plugin configuration is readable only while the root context is
//! created and configured (`NOT_FOUND` elsewhere); configurations and call responses are never
//! writable.

use runtime_api::Caller;

use super::{fill_exact, return_data, Failure, HostResult};
use crate::state::Limit;
use crate::{BufferType, Status, VmState};

/// The bytes of a buffer, read-only; `None` where Envoy has no buffer at all (`NOT_FOUND`).
fn readable(state: &mut VmState, buffer_type: BufferType) -> Option<&[u8]> {
    match buffer_type {
        BufferType::VmConfiguration => Some(state.config.vm_configuration.as_slice()),
        BufferType::PluginConfiguration => {
            if !state.plugin_configuration_readable {
                return None;
            }
            state
                .effective_root_config()
                .map(|root| root.plugin_configuration.as_slice())
        }
        BufferType::HttpCallResponseBody => state
            .http_call_response
            .as_ref()
            .map(|response| response.body.as_slice()),
        BufferType::CallData => Some(state.call_data.as_deref().unwrap_or_default()),
        BufferType::GrpcReceiveBuffer => Some(state.grpc_message.as_deref().unwrap_or_default()),
        body => {
            let context = state.effective_context;
            let held = state
                .effective_stream()
                .is_some_and(|stream| stream.buffer_available(body));
            if !held {
                return Some(&[]);
            }
            Some(
                state
                    .host
                    .buffer(context, body)
                    .map(|b| b.as_slice())
                    .unwrap_or_default(),
            )
        }
    }
}

fn buffer(state: &mut VmState, buffer_type: u64) -> Result<&[u8], Failure> {
    let buffer_type = BufferType::from_raw(buffer_type).ok_or(Status::BadArgument)?;
    Ok(readable(state, buffer_type).ok_or(Status::NotFound)?)
}

/// The range `start..start + max` of `len` bytes, clipped to the buffer.
fn clip(len: usize, start: u64, max: u64) -> std::ops::Range<usize> {
    let start = (start.min(len as u64)) as usize;
    let end = (start as u64).saturating_add(max).min(len as u64) as usize;
    start..end
}

/// `proxy_get_buffer_bytes(buffer_type, start, max_size, return_data, return_size)`.
pub(super) fn get_buffer_bytes(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (start, max) = (args[1], args[2]);
    let len = {
        let bytes = buffer(caller.state(), args[0])?;
        clip(bytes.len(), start, max).len() as u64
    };
    return_data(caller, len, args[3], args[4], |state, memory, pointer| {
        let bytes = buffer(state, args[0])?;
        fill_exact(memory, pointer, len, &bytes[clip(bytes.len(), start, max)])
    })
}

/// Where `proxy_set_buffer_bytes(start, size)` puts new data in a buffer of `len` bytes, as
/// Envoy's buffers allow: at 0 it replaces the first `size` bytes (`(0, 0)` prepends; `(0, len)`
/// or more replaces everything); at or past the end it appends. Anything between is
/// `BAD_ARGUMENT`.
fn edit_range(len: usize, start: u64, size: u64) -> Result<std::ops::Range<usize>, Status> {
    if start == 0 {
        Ok(0..size.min(len as u64) as usize)
    } else if start >= len as u64 {
        Ok(len..len)
    } else {
        Err(Status::BadArgument)
    }
}

/// The largest body or message a plugin may make the host keep: a body (or gRPC message) buffer
/// it grows with `proxy_set_buffer_bytes`, the body of an HTTP call, a gRPC message it sends.
/// Past it the write is refused (told to the plugin once), so a plugin cannot grow the proxy's
/// memory, which no VM memory cap covers, by gigabytes in one callback. A buffer that was larger
/// already (data the proxy buffered) may still shrink or keep its size.
pub const MAX_BODY_BYTES: u64 = 64 << 20;

/// Tells the plugin (once per `limit`) that `what` passed [`MAX_BODY_BYTES`], answered with
/// `status`.
pub(crate) fn tell_body_limit(state: &mut VmState, limit: Limit, what: &str, status: &str) {
    state.tell_limit(limit, || {
        format!("{what} of at most {MAX_BODY_BYTES} bytes: {status}")
    });
}

/// `proxy_set_buffer_bytes(buffer_type, start, size, data, data_size)`: a body (or gRPC message)
/// grown past [`MAX_BODY_BYTES`] is `INTERNAL_FAILURE`, and the buffer stays as it was.
pub(super) fn set_buffer_bytes(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let buffer_type = BufferType::from_raw(args[0]).ok_or(Status::BadArgument)?;
    let (state, memory) = caller.state_and_memory();
    let data = memory.slice(args[3], args[4])?;
    let context = state.effective_context;
    let buffer = match buffer_type {
        BufferType::PluginConfiguration if !state.plugin_configuration_readable => {
            return Err(Status::NotFound.into())
        }
        BufferType::HttpCallResponseBody if state.http_call_response.is_none() => {
            return Err(Status::NotFound.into())
        }
        BufferType::VmConfiguration
        | BufferType::PluginConfiguration
        | BufferType::HttpCallResponseBody
        | BufferType::CallData => return Err(Status::BadArgument.into()),
        BufferType::GrpcReceiveBuffer => state.grpc_message.as_mut(),
        body => {
            let held = state
                .effective_stream()
                .is_some_and(|stream| stream.buffer_available(body));
            if held {
                state.host.buffer(context, body)
            } else {
                None
            }
        }
    }
    .ok_or(Status::BadArgument)?;
    let range = edit_range(buffer.len(), args[1], args[2])?;
    let len = (buffer.len() - range.len()) as u64 + data.len() as u64;
    if len <= MAX_BODY_BYTES || len <= buffer.len() as u64 {
        buffer.splice(range, data.iter().copied());
        return Ok(());
    }
    tell_body_limit(
        state,
        Limit::BodyBytes,
        "a plugin may make a body or message buffer",
        "INTERNAL_FAILURE",
    );
    Err(Status::InternalFailure.into())
}

/// `proxy_get_buffer_status(buffer_type, return_length, return_flags)`: the length, and flags
/// that are always 0 (Envoy sets none; end of stream reaches the plugin as a callback argument).
pub(super) fn get_buffer_status(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let len = buffer(caller.state(), args[0])?.len() as u64;
    let mut memory = caller.memory();
    memory.write_size(args[1], len)?;
    memory.write_u32(args[2], 0)?;
    Ok(())
}

/// ABI 0.1.0 `proxy_get_configuration(return_data, return_size)`: the plugin configuration
/// while the root context is created and configured, the VM configuration otherwise (Envoy).
pub(super) fn get_configuration(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let buffer_type = if caller.state().plugin_configuration_readable {
        BufferType::PluginConfiguration
    } else {
        BufferType::VmConfiguration
    };
    get_buffer_bytes(
        caller,
        &[buffer_type as u64, 0, u64::from(u32::MAX), args[0], args[1]],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_clipped_to_the_buffer() {
        assert_eq!(clip(10, 0, u64::from(u32::MAX)), 0..10);
        assert_eq!(clip(10, 4, 3), 4..7);
        assert_eq!(clip(10, 12, 3), 10..10);
        assert_eq!(clip(10, u64::MAX, u64::MAX), 10..10);
    }

    #[test]
    fn edits_prepend_replace_a_prefix_or_append_as_envoy_buffers_do() {
        assert_eq!(edit_range(10, 0, 0), Ok(0..0), "prepend");
        assert_eq!(edit_range(10, 0, 4), Ok(0..4), "replace the first bytes");
        assert_eq!(edit_range(10, 0, 99), Ok(0..10), "replace everything");
        assert_eq!(edit_range(10, 10, 5), Ok(10..10), "append");
        assert_eq!(edit_range(10, 99, 0), Ok(10..10), "append");
        assert_eq!(edit_range(10, 3, 2), Err(Status::BadArgument), "the middle");
        assert_eq!(edit_range(0, 0, 0), Ok(0..0));
    }
}
