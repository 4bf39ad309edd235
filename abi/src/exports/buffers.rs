//! Buffers: bodies, TCP data, configurations and the HTTP call response body.

use runtime_api::Caller;

use super::{fill_exact, return_data, Failure, HostResult};
use crate::{BufferType, Status, VmState};

/// The bytes of a buffer, read-only.
fn buffer(state: &mut VmState, buffer_type: u64) -> Result<&[u8], Failure> {
    let buffer_type = BufferType::from_raw(buffer_type).ok_or(Status::BadArgument)?;
    let context = state.effective_context;
    let bytes = match buffer_type {
        BufferType::VmConfiguration => Some(state.config.vm_configuration.as_slice()),
        BufferType::PluginConfiguration => Some(state.config.plugin_configuration.as_slice()),
        BufferType::HttpCallResponseBody => {
            state.http_call_response.as_ref().map(|r| r.body.as_slice())
        }
        BufferType::CallData => state.call_data.as_deref(),
        BufferType::GrpcReceiveBuffer => state.grpc_message.as_deref(),
        other => state.host.buffer(context, other).map(|b| b.as_slice()),
    };
    Ok(bytes.ok_or(Status::NotFound)?)
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

/// `proxy_set_buffer_bytes(buffer_type, start, size, data, data_size)`: replaces `size` bytes at
/// `start` with the data. `start` past the end appends; `(0, 0)` prepends; `(0, len)` or more
/// replaces everything.
pub(super) fn set_buffer_bytes(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let buffer_type = BufferType::from_raw(args[0]).ok_or(Status::BadArgument)?;
    let (state, memory) = caller.state_and_memory();
    let data = memory.slice(args[3], args[4])?;
    let context = state.effective_context;
    let buffer = match buffer_type {
        BufferType::HttpCallResponseBody => state.http_call_response.as_mut().map(|r| &mut r.body),
        BufferType::VmConfiguration | BufferType::PluginConfiguration => {
            return Err(Status::BadArgument.into())
        }
        BufferType::GrpcReceiveBuffer | BufferType::CallData => None,
        other => state.host.buffer(context, other),
    }
    .ok_or(Status::NotFound)?;
    let range = clip(buffer.len(), args[1], args[2]);
    buffer.splice(range, data.iter().copied());
    Ok(())
}

/// `proxy_get_buffer_status(buffer_type, return_length, return_flags)`: flags bit 0 is
/// end-of-stream.
pub(super) fn get_buffer_status(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let state = caller.state();
    let len = buffer(state, args[0])?.len() as u64;
    let end_of_stream = match BufferType::from_raw(args[0]) {
        Some(
            t @ (BufferType::HttpRequestBody
            | BufferType::HttpResponseBody
            | BufferType::DownstreamData
            | BufferType::UpstreamData),
        ) => {
            let context = state.effective_context;
            state.host.end_of_stream(context, t)
        }
        _ => true,
    };
    let mut memory = caller.memory();
    memory.write_size(args[1], len)?;
    memory.write_u32(args[2], u32::from(end_of_stream))?;
    Ok(())
}

/// ABI 0.1.0 `proxy_get_configuration(return_data, return_size)`: the VM configuration while
/// `proxy_on_vm_start` runs, the plugin configuration otherwise.
pub(super) fn get_configuration(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let which = |state: &VmState| {
        if state.in_vm_start {
            BufferType::VmConfiguration as u64
        } else {
            BufferType::PluginConfiguration as u64
        }
    };
    let buffer_type = which(caller.state());
    get_buffer_bytes(
        caller,
        &[buffer_type, 0, u64::from(u32::MAX), args[0], args[1]],
    )
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn ranges_are_clipped_to_the_buffer() {
        assert_eq!(clip(10, 0, u64::from(u32::MAX)), 0..10);
        assert_eq!(clip(10, 4, 3), 4..7);
        assert_eq!(clip(10, 12, 3), 10..10);
        assert_eq!(clip(10, u64::MAX, u64::MAX), 10..10);
    }
}
