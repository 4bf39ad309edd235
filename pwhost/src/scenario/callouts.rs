//! Answering the HTTP and gRPC calls a plugin makes, from the scenario's scripted responses.

use abi::{HeaderMap, HttpCallResponse, Vm, VmError};

use super::report::{GrpcCallReport, HttpCallReport};
use super::{in_memory_host, lossy, CallResponse, GrpcResponse, Headers};

/// The gRPC status a call gets when nothing answers it (the host's timeout).
const DEADLINE_EXCEEDED: u32 = 4;

/// The most calls answered for one exchange, connection or root callback: a plugin that makes a
/// new call from every answer (e.g. retrying a failure forever) must not keep a run going.
pub(super) const MAX_ANSWERS: usize = 1000;

pub(super) fn to_map(headers: &Headers) -> HeaderMap {
    headers
        .iter()
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
        .collect()
}

/// The calls made during one exchange (or connection, or tick) and their scripted answers.
pub(super) struct Callouts<'a> {
    http_answers: std::slice::Iter<'a, CallResponse>,
    grpc_answers: std::slice::Iter<'a, GrpcResponse>,
    /// Index of the first HTTP call made during this exchange in the host's record.
    first_http: usize,
    http_answered: usize,
    first_grpc: usize,
    grpc_answered: usize,
    /// Whether [`MAX_ANSWERS`] calls were answered and the rest left unanswered.
    gave_up: bool,
}

impl<'a> Callouts<'a> {
    /// Starts watching the calls `vm` makes from now on.
    pub(super) fn new(vm: &mut Vm, http: &'a [CallResponse], grpc: &'a [GrpcResponse]) -> Self {
        let host = in_memory_host(vm);
        Callouts {
            http_answers: http.iter(),
            grpc_answers: grpc.iter(),
            first_http: host.http_calls.len(),
            http_answered: 0,
            first_grpc: host.grpc_calls.len(),
            grpc_answered: 0,
            gave_up: false,
        }
    }

    /// Answers the oldest unanswered call, HTTP first; `false` if every call is answered.
    /// A call with no scripted answer left fails as in Envoy: an HTTP call gets the response
    /// callback with no headers, body or trailers (and `proxy_get_status` says 11, "reset"); a
    /// gRPC call closes with DEADLINE_EXCEEDED.
    pub(super) fn answer_next(&mut self, vm: &mut Vm) -> Result<bool, VmError> {
        if self.http_answered + self.grpc_answered >= MAX_ANSWERS {
            let host = in_memory_host(vm);
            self.gave_up |= host.http_calls.len() > self.first_http + self.http_answered
                || host.grpc_calls.len() > self.first_grpc + self.grpc_answered;
            return Ok(false);
        }
        let host = in_memory_host(vm);
        if let Some(call) = host.http_calls.get(self.first_http + self.http_answered) {
            let token = call.token;
            self.http_answered += 1;
            match self.http_answers.next() {
                Some(answer) => vm.on_http_call_response(
                    token,
                    HttpCallResponse {
                        headers: to_map(&answer.headers),
                        body: answer.body.clone().into_bytes(),
                        trailers: to_map(&answer.trailers),
                    },
                )?,
                None => vm.on_http_call_failure(token)?,
            }
            return Ok(true);
        }
        let Some(call) = host.grpc_calls.get(self.first_grpc + self.grpc_answered) else {
            return Ok(false);
        };
        let (token, cancelled, unary) =
            (call.token, call.cancelled, call.request.message.is_some());
        self.grpc_answered += 1;
        if cancelled {
            return Ok(true);
        }
        let Some(answer) = self.grpc_answers.next() else {
            vm.on_grpc_close(token, DEADLINE_EXCEEDED, b"no response".to_vec())?;
            return Ok(true);
        };
        // A unary call gets its reply as one message, or a close with the failure status, as
        // Envoy delivers them; a stream gets everything the answer scripts.
        if unary {
            if answer.status == 0 {
                vm.on_grpc_receive(token, answer.messages.concat().into_bytes())?;
            } else {
                vm.on_grpc_close(token, answer.status, answer.message.clone().into_bytes())?;
            }
            return Ok(true);
        }
        // Stop delivering as soon as the plugin cancels the stream.
        let still_open = |vm: &mut Vm| {
            in_memory_host(vm)
                .grpc_calls
                .iter()
                .any(|c| c.token == token && !c.cancelled)
        };
        if !answer.initial_metadata.is_empty() {
            vm.on_grpc_receive_initial_metadata(token, to_map(&answer.initial_metadata))?;
        }
        for message in &answer.messages {
            if !still_open(vm) {
                return Ok(true);
            }
            vm.on_grpc_receive(token, message.clone().into_bytes())?;
        }
        if !answer.trailing_metadata.is_empty() && still_open(vm) {
            vm.on_grpc_receive_trailing_metadata(token, to_map(&answer.trailing_metadata))?;
        }
        if still_open(vm) {
            vm.on_grpc_close(token, answer.status, answer.message.clone().into_bytes())?;
        }
        Ok(true)
    }

    /// Why calls were left unanswered, if the plugin kept making them past [`MAX_ANSWERS`].
    pub(super) fn gave_up(&self) -> Option<String> {
        self.gave_up.then(|| {
            format!("the plugin kept making calls: {MAX_ANSWERS} were answered, the rest were not")
        })
    }

    /// Reports the HTTP and gRPC calls made since `new`.
    pub(super) fn report(&self, vm: &mut Vm) -> (Vec<HttpCallReport>, Vec<GrpcCallReport>) {
        let host = in_memory_host(vm);
        let http = host.http_calls[self.first_http.min(host.http_calls.len())..]
            .iter()
            .map(|call| HttpCallReport {
                upstream: lossy(&call.request.upstream),
                headers: call.request.headers.to_string_pairs(),
                body: lossy(&call.request.body),
                trailers: call.request.trailers.to_string_pairs(),
                timeout_ms: call.request.timeout.as_millis() as u64,
            })
            .collect();
        let grpc = host.grpc_calls[self.first_grpc.min(host.grpc_calls.len())..]
            .iter()
            .map(|call| GrpcCallReport {
                upstream: lossy(&call.request.upstream),
                service: lossy(&call.request.service),
                method: lossy(&call.request.method),
                initial_metadata: call.request.initial_metadata.to_string_pairs(),
                message: call.request.message.as_deref().map(lossy),
                timeout_ms: call.request.timeout.map(|t| t.as_millis() as u64),
                sent: call
                    .sent
                    .iter()
                    .map(|(message, _)| lossy(message))
                    .collect(),
                cancelled: call.cancelled,
                closed: call.closed,
            })
            .collect();
        (http, grpc)
    }
}
