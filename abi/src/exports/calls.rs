//! Outgoing calls: HTTP and gRPC callouts, foreign functions.

use std::time::Duration;

use runtime_api::{Caller, GuestMemory};

use super::buffers::MAX_BODY_BYTES;
use super::{check, return_data, write_u32, Failure, HostResult};
use crate::header_map::wire;
use crate::state::Limit;
use crate::{GrpcRequest, HttpCallRequest, Status, VmState};

/// The pseudo-headers Envoy requires of an HTTP call.
const REQUIRED_CALL_HEADERS: [&[u8]; 3] = [b":method", b":path", b":authority"];

/// The most HTTP and gRPC calls and streams a VM has open at once (Envoy's default circuit
/// breaker, 1024 pending requests): past it a new call is `INTERNAL_FAILURE` without reaching
/// the host, so a plugin dispatching calls in a loop cannot open connections (and keep their
/// answers) without end in any proxy.
pub const MAX_OPEN_CALLS: usize = 1024;

/// The most bytes of arguments a foreign function is called with: as much as a body a plugin may
/// hold ([`MAX_BODY_BYTES`]), so that any such body can be compressed or signed. Envoy's
/// functions (`compress`, signatures) and the embedder's run inside a host call, which no
/// deadline interrupts: over it the call is `BAD_ARGUMENT` (told to the plugin once), so a
/// plugin cannot hold the proxy's thread with gigabytes to deflate.
pub const MAX_FOREIGN_ARGUMENT_BYTES: u64 = MAX_BODY_BYTES;

/// `data`, unless it is longer than [`MAX_BODY_BYTES`] (`BAD_ARGUMENT`, told once).
fn call_bytes<'d>(state: &mut VmState, data: &'d [u8], what: &str) -> Result<&'d [u8], Failure> {
    if data.len() as u64 <= MAX_BODY_BYTES {
        return Ok(data);
    }
    super::buffers::tell_body_limit(state, Limit::CallBytes, what, "BAD_ARGUMENT");
    Err(Status::BadArgument.into())
}

/// `Ok` while the VM has fewer than [`MAX_OPEN_CALLS`] calls open; the plugin is told once.
fn room_for_a_call(state: &mut VmState) -> Result<(), Failure> {
    if state.callout_roots.len() < MAX_OPEN_CALLS {
        return Ok(());
    }
    state.tell_limit(Limit::OpenCalls, || {
        format!(
            "this VM has {MAX_OPEN_CALLS} HTTP or gRPC calls open: more are refused \
             (INTERNAL_FAILURE) until answers come"
        )
    });
    Err(Status::InternalFailure.into())
}

/// `proxy_http_call(upstream_data, upstream_size, headers_data, headers_size, body_data,
/// body_size, trailers_data, trailers_size, timeout_ms, return_token)`. The call is dispatched
/// for the root context, which receives the response. As in Envoy, a call without `:method`,
/// `:path` or `:authority`, or with a timeout that is negative as a signed 32-bit number, is
/// `BAD_ARGUMENT` and nothing is sent; a timeout of 0 means none.
pub(super) fn http_call(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, mut memory) = caller.state_and_memory();
    // The token reads 0 unless the call is made, as in Envoy.
    memory.write_u32(args[9], 0)?;
    if (args[8] as u32 as i32) < 0 {
        return Err(Status::BadArgument.into());
    }
    let request = HttpCallRequest {
        upstream: memory.slice(args[0], args[1])?.to_vec(),
        headers: wire::decode(memory.slice(args[2], args[3])?)?
            .into_iter()
            .collect(),
        body: call_bytes(
            state,
            memory.slice(args[4], args[5])?,
            "an HTTP call has a body",
        )?
        .to_vec(),
        trailers: wire::decode(memory.slice(args[6], args[7])?)?
            .into_iter()
            .collect(),
        timeout: Duration::from_millis(args[8]),
    };
    let complete = REQUIRED_CALL_HEADERS
        .iter()
        .all(|name| request.headers.get(name).is_some());
    if request.upstream.is_empty() || !complete {
        return Err(Status::BadArgument.into());
    }
    room_for_a_call(state)?;
    let root = state.effective_root();
    let token = state
        .host
        .http_call(root, request)
        .map_err(super::Failure::Status)?;
    state.callout_roots.insert(token, root);
    write_u32(caller, args[9], token)
}

/// Reads the target of a gRPC call or stream: upstream, service, method and initial metadata from
/// the first eight arguments, none of the names empty.
fn grpc_request(memory: &GuestMemory<'_>, args: &[u64]) -> Result<GrpcRequest, Failure> {
    let request = GrpcRequest {
        upstream: memory.slice(args[0], args[1])?.to_vec(),
        service: memory.slice(args[2], args[3])?.to_vec(),
        method: memory.slice(args[4], args[5])?.to_vec(),
        initial_metadata: wire::decode(memory.slice(args[6], args[7])?)?
            .into_iter()
            .collect(),
        message: None,
        timeout: None,
    };
    if request.upstream.is_empty() || request.service.is_empty() || request.method.is_empty() {
        return Err(Status::BadArgument.into());
    }
    Ok(request)
}

/// `proxy_grpc_call(upstream_data, upstream_size, service_data, service_size, method_data,
/// method_size, initial_metadata_data, initial_metadata_size, message_data, message_size,
/// timeout_ms, return_token)`: dispatched for the root context, which receives the reply.
pub(super) fn grpc_call(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, mut memory) = caller.state_and_memory();
    memory.slice_mut(args[11], 4)?;
    let message = call_bytes(
        state,
        memory.slice(args[8], args[9])?,
        "a gRPC call sends a message",
    )?;
    let request = GrpcRequest {
        message: Some(message.to_vec()),
        timeout: Some(Duration::from_millis(args[10])),
        ..grpc_request(&memory, args)?
    };
    room_for_a_call(state)?;
    let root = state.effective_root();
    let token = state.host.grpc_call(root, request)?;
    state.callout_roots.insert(token, root);
    state.unary_grpc_calls.insert(token);
    write_u32(caller, args[11], token)
}

/// `proxy_grpc_stream(upstream_data, upstream_size, service_data, service_size, method_data,
/// method_size, initial_metadata_data, initial_metadata_size, return_token)`.
pub(super) fn grpc_stream(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, mut memory) = caller.state_and_memory();
    memory.slice_mut(args[8], 4)?;
    let request = grpc_request(&memory, args)?;
    room_for_a_call(state)?;
    let root = state.effective_root();
    let token = state.host.grpc_stream(root, request)?;
    state.callout_roots.insert(token, root);
    write_u32(caller, args[8], token)
}

/// `token`, if it is a call this VM made and has not been told the end of: another VM's token
/// (an embedder may number every VM's calls in one table) or a finished call's is `NOT_FOUND`,
/// as Envoy answers for a token it does not know.
fn own_call(state: &VmState, token: u64) -> Result<u32, Failure> {
    let token = token as u32;
    if state.callout_roots.contains_key(&token) {
        Ok(token)
    } else {
        Err(Status::NotFound.into())
    }
}

/// `proxy_grpc_send(token, message_data, message_size, end_of_stream)`.
pub(super) fn grpc_send(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    let token = own_call(state, args[0])?;
    let message = call_bytes(
        state,
        memory.slice(args[1], args[2])?,
        "a gRPC stream sends a message",
    )?;
    let root = state.effective_root();
    check(state.host.grpc_send(root, token, message, args[3] != 0))
}

/// `proxy_grpc_cancel(token)`: no callback comes for a cancelled call, so it is forgotten.
pub(super) fn grpc_cancel(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let state = caller.state();
    let root = state.effective_root();
    let token = own_call(state, args[0])?;
    let status = state.host.grpc_cancel(root, token);
    if status == Status::Ok {
        state.callout_roots.remove(&token);
        state.unary_grpc_calls.remove(&token);
    }
    check(status)
}

/// `proxy_grpc_close(token)`: a stream is half-closed (its close callback comes later); a unary
/// call is cancelled, no callback comes, and it is forgotten.
pub(super) fn grpc_close(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let state = caller.state();
    let root = state.effective_root();
    let token = own_call(state, args[0])?;
    let status = state.host.grpc_close(root, token);
    if status == Status::Ok && state.unary_grpc_calls.remove(&token) {
        state.callout_roots.remove(&token);
    }
    check(status)
}

/// `proxy_get_status(return_code, return_message_data, return_message_size)`: always `OK`, with
/// the code of the last failed HTTP call or closed gRPC call (0 before any) and, in the callback
/// that reported it, its message (see `VmState::status`).
pub(super) fn get_status(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (code, message) = caller
        .state()
        .effective_root_state()
        .map(|root| root.status.clone())
        .unwrap_or_default();
    caller.memory().write_u32(args[0], code)?;
    let len = message.len() as u64;
    return_data(caller, len, args[1], args[2], |_, memory, pointer| {
        super::fill_exact(memory, pointer, len, &message)
    })
}

/// `proxy_call_foreign_function(name_data, name_size, args_data, args_size, return_data,
/// return_size)`: calls a function registered in the [`crate::SharedState`] (Envoy's, and the
/// embedder's); `NOT_FOUND` if there is none of that name. A function that panics is an
/// `INTERNAL_FAILURE` for the plugin, never a crash of the host.
pub(super) fn call_foreign_function(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (function, arguments) = {
        let (state, memory) = caller.state_and_memory();
        let function = state
            .shared
            .foreign_function(memory.slice(args[0], args[1])?)
            .ok_or(Status::NotFound)?;
        let arguments = memory.slice(args[2], args[3])?;
        if arguments.len() as u64 > MAX_FOREIGN_ARGUMENT_BYTES {
            state.tell_limit(crate::state::Limit::ForeignArguments, || {
                format!(
                    "a foreign function is called with at most {MAX_FOREIGN_ARGUMENT_BYTES} \
                     bytes of arguments: BAD_ARGUMENT"
                )
            });
            return Err(Status::BadArgument.into());
        }
        (function, arguments.to_vec())
    };
    let result = {
        let mut call = crate::ForeignCall {
            state: caller.state(),
        };
        // A panic leaves at most the function's own data half-updated; the VM state it may touch
        // stays consistent (every field is valid on its own).
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            function(&mut call, &arguments)
        }))
        .unwrap_or(Err(Status::InternalFailure))
    };
    let (return_data_at, return_size_at) = (args[4], args[5]);
    match result {
        // As in Envoy, a null place for the result discards it.
        Ok(_) if return_data_at == 0 || return_size_at == 0 => Ok(()),
        Ok(result) => {
            let len = result.len() as u64;
            return_data(
                caller,
                len,
                return_data_at,
                return_size_at,
                |_, memory, pointer| super::fill_exact(memory, pointer, len, &result),
            )
        }
        // A failure returns no result: a null pointer and size 0 where the plugin asked for them.
        Err(status) => {
            let mut memory = caller.memory();
            if return_data_at != 0 {
                memory.write_pointer(return_data_at, 0)?;
            }
            if return_size_at != 0 {
                memory.write_size(return_size_at, 0)?;
            }
            Err(status.into())
        }
    }
}
