//! Outgoing calls: HTTP and gRPC callouts, foreign functions.

use std::time::Duration;

use runtime_api::Caller;

use super::{return_data, write_u32, HostResult};
use crate::header_map::wire;
use crate::{HttpCallRequest, Status, VmState};

/// `proxy_http_call(upstream_data, upstream_size, headers_data, headers_size, body_data,
/// body_size, trailers_data, trailers_size, timeout_ms, return_token)`. The call is dispatched
/// for the root context, which receives the response.
pub(super) fn http_call(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, mut memory) = caller.state_and_memory();
    memory.slice_mut(args[9], 4)?;
    let request = HttpCallRequest {
        upstream: memory.slice(args[0], args[1])?.to_vec(),
        headers: wire::decode(memory.slice(args[2], args[3])?)?
            .into_iter()
            .collect(),
        body: memory.slice(args[4], args[5])?.to_vec(),
        trailers: wire::decode(memory.slice(args[6], args[7])?)?
            .into_iter()
            .collect(),
        timeout: Duration::from_millis(args[8]),
    };
    if request.upstream.is_empty() {
        return Err(Status::BadArgument.into());
    }
    let root = state.effective_root();
    let token = state
        .host
        .http_call(root, request)
        .map_err(super::Failure::Status)?;
    write_u32(caller, args[9], token)
}

/// `proxy_grpc_call(...)`: not implemented yet.
pub(super) fn grpc_call(_caller: &mut dyn Caller<VmState>, _args: &[u64]) -> HostResult {
    Err(Status::Unimplemented.into())
}

/// `proxy_grpc_stream(...)`: not implemented yet.
pub(super) fn grpc_stream(_caller: &mut dyn Caller<VmState>, _args: &[u64]) -> HostResult {
    Err(Status::Unimplemented.into())
}

/// `proxy_grpc_send(token, message_data, message_size, end_of_stream)`: not implemented yet.
pub(super) fn grpc_send(_caller: &mut dyn Caller<VmState>, _args: &[u64]) -> HostResult {
    Err(Status::Unimplemented.into())
}

/// `proxy_grpc_cancel(token)`: not implemented yet.
pub(super) fn grpc_cancel(_caller: &mut dyn Caller<VmState>, _args: &[u64]) -> HostResult {
    Err(Status::Unimplemented.into())
}

/// `proxy_grpc_close(token)`: not implemented yet.
pub(super) fn grpc_close(_caller: &mut dyn Caller<VmState>, _args: &[u64]) -> HostResult {
    Err(Status::Unimplemented.into())
}

/// `proxy_get_status(return_code, return_message_data, return_message_size)`: not implemented
/// yet.
pub(super) fn get_status(_caller: &mut dyn Caller<VmState>, _args: &[u64]) -> HostResult {
    Err(Status::Unimplemented.into())
}

/// `proxy_call_foreign_function(name_data, name_size, args_data, args_size, return_data,
/// return_size)`: calls a function the embedder registered in the [`crate::SharedState`];
/// `NOT_FOUND` if there is none of that name.
pub(super) fn call_foreign_function(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (function, arguments) = {
        let (state, memory) = caller.state_and_memory();
        let function = state
            .shared
            .foreign_function(memory.slice(args[0], args[1])?)
            .ok_or(Status::NotFound)?;
        (function, memory.slice(args[2], args[3])?.to_vec())
    };
    let result = function(&arguments)?;
    let len = result.len() as u64;
    return_data(caller, len, args[4], args[5], |_, memory, pointer| {
        super::fill_exact(memory, pointer, len, &result)
    })
}
