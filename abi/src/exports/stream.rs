//! Stream control: local replies, continuing and closing streams, contexts.
//!
//! As in Envoy, these answer `OK` whatever the proxy makes of them: on a root context (no
//! stream), or a TCP connection for what only HTTP streams have, they do nothing, so a plugin
//! may call them from wherever its SDK lets it.

use runtime_api::Caller;

use super::{check, HostResult};
use crate::header_map::wire;
use crate::{LocalResponse, Status, StreamType, VmState};

/// The gRPC status codes Envoy passes on in a local reply (0 OK to 16 UNAUTHENTICATED); any
/// other value (the SDKs send -1) means a plain HTTP reply.
const GRPC_STATUS_MAX: i32 = 16;

/// `proxy_send_local_response(status_code, details_data, details_size, body_data, body_size,
/// headers_data, headers_size, grpc_status)`. The first reply on a stream is the one sent; the
/// running callback's result then stops the stream whatever the plugin returns.
pub(super) fn send_local_response(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    // Envoy replaces whitespace in the details, which go into access logs unquoted.
    let details = memory
        .slice(args[1], args[2])?
        .iter()
        .map(|&b| if b.is_ascii_whitespace() { b'_' } else { b })
        .collect();
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
        grpc_status: (0..=GRPC_STATUS_MAX)
            .contains(&grpc_status)
            .then_some(grpc_status),
    };
    state.stop_iteration = true;
    let context = state.effective_context;
    match state.effective_stream() {
        Some(stream) if stream.is_http() && !stream.local_reply_sent => {
            stream.local_reply_sent = true;
            // Envoy sends the reply after the callback and tells the plugin nothing of it.
            let _ = state.host.send_local_response(context, response);
        }
        _ => {}
    }
    Ok(())
}

/// `proxy_continue_stream(stream_type)`: lets go of the request's headers, body and trailers (for
/// the request or the response, as Envoy does) and resumes the stream. Continuing the upstream
/// direction of a connection is `UNIMPLEMENTED`, as in Envoy.
pub(super) fn continue_stream(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let stream_type = StreamType::from_raw(args[0]).ok_or(Status::BadArgument)?;
    continue_(caller.state(), stream_type)
}

fn continue_(state: &mut VmState, stream_type: StreamType) -> HostResult {
    if stream_type == StreamType::Upstream {
        return Err(Status::Unimplemented.into());
    }
    let context = state.effective_context;
    let Some(stream) = state.effective_stream() else {
        return Ok(());
    };
    let http = matches!(
        stream_type,
        StreamType::HttpRequest | StreamType::HttpResponse
    );
    if http != stream.is_http() {
        return Ok(());
    }
    if http {
        stream.release_request();
    }
    let _ = state.host.continue_stream(context, stream_type);
    Ok(())
}

/// `proxy_close_stream(stream_type)`.
pub(super) fn close_stream(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let stream = StreamType::from_raw(args[0]).ok_or(Status::BadArgument)?;
    let state = caller.state();
    let context = state.effective_context;
    let http = matches!(stream, StreamType::HttpRequest | StreamType::HttpResponse);
    if state
        .effective_stream()
        .is_some_and(|s| s.is_http() == http)
    {
        let _ = state.host.close_stream(context, stream);
    }
    Ok(())
}

/// `proxy_set_effective_context(context_id)`: later host calls of this callback act on that
/// context, which must exist; 0 goes back to the callback's own context.
pub(super) fn set_effective_context(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let state = caller.state();
    let id = u32::try_from(args[0]).map_err(|_| Status::BadArgument)?;
    if id == 0 {
        state.effective_context = state.callback_context;
        return Ok(());
    }
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
    continue_(caller.state(), StreamType::HttpRequest)
}

/// ABI 0.1.0 `proxy_continue_response()`.
pub(super) fn continue_response(caller: &mut dyn Caller<VmState>, _args: &[u64]) -> HostResult {
    continue_(caller.state(), StreamType::HttpResponse)
}

/// ABI 0.1.0 `proxy_clear_route_cache()`: always `OK`; only an HTTP stream has a route.
pub(super) fn clear_route_cache(caller: &mut dyn Caller<VmState>, _args: &[u64]) -> HostResult {
    let state = caller.state();
    let context = state.effective_context;
    if state.effective_stream().is_some_and(|s| s.is_http()) {
        state.host.clear_route_cache(context);
    }
    Ok(())
}
