//! Stream control: local replies, continuing and closing streams, contexts.

use runtime_api::Caller;

use super::{check, HostResult};
use crate::header_map::wire;
use crate::{LocalResponse, Status, StreamType, VmState};

/// `proxy_send_local_response(status_code, details_data, details_size, body_data, body_size,
/// headers_data, headers_size, grpc_status)`.
pub(super) fn send_local_response(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    let details = memory.slice(args[1], args[2])?.to_vec();
    let body = memory.slice(args[3], args[4])?.to_vec();
    let headers = wire::decode(memory.slice(args[5], args[6])?)?
        .into_iter()
        .collect();
    // The guest passes -1 (as an unsigned 32-bit value) for "not gRPC".
    let grpc_status = args[7] as u32 as i32;
    let response = LocalResponse {
        status: args[0] as u32,
        details,
        body,
        headers,
        grpc_status: (grpc_status >= 0).then_some(grpc_status),
    };
    let context = state.effective_context;
    check(state.host.send_local_response(context, response))
}

/// `proxy_continue_stream(stream_type)`.
pub(super) fn continue_stream(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let stream = StreamType::from_raw(args[0]).ok_or(Status::BadArgument)?;
    let state = caller.state();
    let context = state.effective_context;
    check(state.host.continue_stream(context, stream))
}

/// `proxy_close_stream(stream_type)`.
pub(super) fn close_stream(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let stream = StreamType::from_raw(args[0]).ok_or(Status::BadArgument)?;
    let state = caller.state();
    let context = state.effective_context;
    check(state.host.close_stream(context, stream))
}

/// `proxy_set_effective_context(context_id)`: later host calls of this callback act on that
/// context, which must exist.
pub(super) fn set_effective_context(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let state = caller.state();
    let id = u32::try_from(args[0]).map_err(|_| Status::BadArgument)?;
    if !state.contexts.contains_key(&id) {
        return Err(Status::BadArgument.into());
    }
    state.effective_context = crate::ContextId(id);
    Ok(())
}

/// `proxy_done()`: the root context finished the work it had pending when its `proxy_on_done`
/// returned false; `NOT_FOUND` if it owes none (as the reference host answers).
pub(super) fn done(caller: &mut dyn Caller<VmState>, _args: &[u64]) -> HostResult {
    let state = caller.state();
    let root = state.effective_root();
    let position = state
        .pending_done
        .iter()
        .position(|pending| *pending == root)
        .ok_or(Status::NotFound)?;
    state.pending_done.swap_remove(position);
    check(state.host.done(root))
}

/// ABI 0.1.0 `proxy_continue_request()`.
pub(super) fn continue_request(caller: &mut dyn Caller<VmState>, _args: &[u64]) -> HostResult {
    let state = caller.state();
    let context = state.effective_context;
    check(state.host.continue_stream(context, StreamType::HttpRequest))
}

/// ABI 0.1.0 `proxy_continue_response()`.
pub(super) fn continue_response(caller: &mut dyn Caller<VmState>, _args: &[u64]) -> HostResult {
    let state = caller.state();
    let context = state.effective_context;
    check(
        state
            .host
            .continue_stream(context, StreamType::HttpResponse),
    )
}

/// ABI 0.1.0 `proxy_clear_route_cache()`.
pub(super) fn clear_route_cache(caller: &mut dyn Caller<VmState>, _args: &[u64]) -> HostResult {
    let state = caller.state();
    let context = state.effective_context;
    check(state.host.clear_route_cache(context))
}
