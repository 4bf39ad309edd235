//! Answering the HTTP and gRPC calls plugins make, from the scenario's scripted responses.
//!
//! An exchange (or connection) hands its scripted answers out in the order the plugins of its
//! chain dispatched the calls (HTTP calls before gRPC ones, as a proxy whose HTTP upstreams
//! answer first would), whichever plugin made them. Calls made by root contexts outside any
//! exchange (timer ticks, queue notifications, shutdown) get the failure callback: nothing
//! scripts them.

use std::collections::VecDeque;

use abi::{ContextId, HeaderMap, HttpCallResponse, Vm, VmError};
use lifecycle::{CopyId, StreamVm, Worker};

use super::report::{GrpcCallReport, HttpCallReport};
use super::{in_memory_host, pairs, report_text, CallResponse, GrpcResponse, Headers};

/// The gRPC status a call gets when nothing answers it (the host's timeout).
const DEADLINE_EXCEEDED: u32 = 4;

/// The most calls answered for one exchange, connection or root callback: a plugin that makes a
/// new call from every answer (e.g. retrying a failure forever) must not keep a run going.
pub(super) const MAX_ANSWERS: usize = 1000;

/// The most calls one VM copy's host records in a run before its root contexts' calls are
/// answered no more (an exchange's are, by its own [`MAX_ANSWERS`]).
pub(super) const MAX_CALL_RECORDS: usize = 100_000;

pub(super) fn to_map(headers: &Headers) -> HeaderMap {
    headers
        .iter()
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
        .collect()
}

/// A call a plugin of the chain made: which stage, HTTP or gRPC, and its place in the host's
/// record of the stage's VM copy.
#[derive(Clone, Copy)]
struct Call {
    stage: usize,
    grpc: bool,
    index: usize,
}

/// The calls the plugins of one exchange (or connection) make, and their scripted answers.
pub(super) struct Callouts<'a> {
    http_answers: std::slice::Iter<'a, CallResponse>,
    grpc_answers: std::slice::Iter<'a, GrpcResponse>,
    /// How many HTTP and gRPC answers the scenario scripted.
    scripted: (usize, usize),
    /// Per VM copy of the chain: how many of its host's HTTP and gRPC records were seen.
    seen: Vec<(CopyId, usize, usize)>,
    /// Calls not answered yet, in dispatch order.
    pending: VecDeque<Call>,
    /// Every call made, in dispatch order, for the report.
    made: Vec<Call>,
    answered: usize,
    /// Whether [`MAX_ANSWERS`] calls were answered and the rest left unanswered.
    gave_up: bool,
}

/// Each stage's hold on its VM copy (`None` for a plugin the stream bypasses).
pub(super) type Handles<'s> = [Option<&'s StreamVm>];

impl<'a> Callouts<'a> {
    /// Starts watching the calls the stages' VM copies make from now on.
    pub(super) fn new(
        worker: &mut Worker,
        handles: &Handles<'_>,
        http: &'a [CallResponse],
        grpc: &'a [GrpcResponse],
    ) -> Self {
        let mut seen: Vec<(CopyId, usize, usize)> = Vec::new();
        for held in handles.iter().flatten() {
            if seen.iter().any(|(copy, ..)| *copy == held.copy()) {
                continue;
            }
            if let Some(vm) = worker.vm(held) {
                let host = in_memory_host(vm);
                seen.push((held.copy(), host.http_calls.len(), host.grpc_calls.len()));
            }
        }
        Callouts {
            http_answers: http.iter(),
            grpc_answers: grpc.iter(),
            scripted: (http.len(), grpc.len()),
            seen,
            pending: VecDeque::new(),
            made: Vec::new(),
            answered: 0,
            gave_up: false,
        }
    }

    /// Takes note of the calls made since the last look, attributing each to the stage whose
    /// root context made it. Call after every plugin callback.
    pub(super) fn scan(&mut self, worker: &mut Worker, handles: &Handles<'_>) {
        for (copy, http_seen, grpc_seen) in &mut self.seen {
            let Some(first) = handles.iter().flatten().find(|h| h.copy() == *copy) else {
                continue;
            };
            let Some(vm) = worker.vm(first) else {
                continue;
            };
            let host = in_memory_host(vm);
            let stage_of = |root: abi::ContextId| {
                handles
                    .iter()
                    .position(|h| h.is_some_and(|h| h.copy() == *copy && h.root() == root))
            };
            for index in *http_seen..host.http_calls.len() {
                if let Some(stage) = stage_of(host.http_calls[index].context) {
                    let call = Call {
                        stage,
                        grpc: false,
                        index,
                    };
                    self.pending.push_back(call);
                    self.made.push(call);
                }
            }
            for index in *grpc_seen..host.grpc_calls.len() {
                if let Some(stage) = stage_of(host.grpc_calls[index].context) {
                    let call = Call {
                        stage,
                        grpc: true,
                        index,
                    };
                    self.pending.push_back(call);
                    self.made.push(call);
                }
            }
            *http_seen = host.http_calls.len();
            *grpc_seen = host.grpc_calls.len();
        }
    }

    /// Answers the oldest unanswered call (HTTP calls first). Returns the stage whose plugin got
    /// the answer, `None` if every call is answered; on a failure of its VM, the stage and the
    /// error.
    ///
    /// A call with no scripted answer left fails as in Envoy: an HTTP call gets the response
    /// callback with no headers, body or trailers (and `proxy_get_status` says 11, "reset"); a
    /// gRPC call closes with DEADLINE_EXCEEDED.
    pub(super) fn answer_next(
        &mut self,
        worker: &mut Worker,
        handles: &Handles<'_>,
    ) -> Result<Option<usize>, (usize, VmError)> {
        if self.answered >= MAX_ANSWERS {
            self.gave_up |= !self.pending.is_empty();
            return Ok(None);
        }
        let position =
            self.pending
                .iter()
                .position(|call| !call.grpc)
                .or(if self.pending.is_empty() {
                    None
                } else {
                    Some(0)
                });
        let Some(call) = position.and_then(|p| self.pending.remove(p)) else {
            return Ok(None);
        };
        self.answered += 1;
        let Some(vm) = handles[call.stage].and_then(|held| worker.vm(held)) else {
            return Ok(Some(call.stage));
        };
        // A failed VM gets no more callbacks: its calls are dropped.
        if !vm.is_failed() {
            let answered = if call.grpc {
                answer_grpc(vm, call.index, &mut self.grpc_answers)
            } else {
                answer_http(vm, call.index, self.http_answers.next())
            };
            answered.map_err(|error| (call.stage, error))?;
        }
        self.scan(worker, handles);
        Ok(Some(call.stage))
    }

    /// What the scenario scripted that no call took (the plugins made fewer calls, cancelled
    /// some, or failed or reset the stream before their calls were answered), one line for
    /// HTTP and one for gRPC: a script that does not match the plugin should not pass
    /// unnoticed.
    pub(super) fn unused_answers(&self) -> Vec<String> {
        [
            (
                "http_call_responses",
                self.scripted.0,
                self.http_answers.len(),
            ),
            (
                "grpc_call_responses",
                self.scripted.1,
                self.grpc_answers.len(),
            ),
        ]
        .into_iter()
        .filter(|(_, _, unused)| *unused > 0)
        .map(|(field, scripted, unused)| match scripted - unused {
            0 if scripted == 1 => {
                format!("{field}: the scripted answer went unused (no call took it)")
            }
            0 => format!("{field}: the {scripted} scripted answers went unused (no call took one)"),
            used => format!(
                "{field}: {unused} of the {scripted} scripted answers went unused (the calls \
                 took the first {used})"
            ),
        })
        .collect()
    }

    /// Why calls were left unanswered, if the plugins kept making them past [`MAX_ANSWERS`].
    pub(super) fn gave_up(&self) -> Option<String> {
        self.gave_up.then(|| {
            format!("the plugin kept making calls: {MAX_ANSWERS} were answered, the rest were not")
        })
    }

    /// Runs `callback` for `context` in the VM copy `handles[stage]` holds, then takes note of
    /// the calls the chain's plugins made ([`Callouts::scan`]).
    pub(super) fn invoke<T>(
        &mut self,
        worker: &mut Worker,
        handles: &Handles<'_>,
        stage: usize,
        context: ContextId,
        callback: impl FnOnce(&mut Vm, ContextId) -> Result<T, VmError>,
    ) -> Result<T, VmError> {
        let result = match handles[stage].and_then(|held| worker.vm(held)) {
            Some(vm) => callback(vm, context),
            None => Err(super::no_vm_on_worker()),
        };
        self.scan(worker, handles);
        result
    }

    /// The HTTP and gRPC calls of every stage, in stage order.
    pub(super) fn reports(
        &self,
        worker: &mut Worker,
        handles: &Handles<'_>,
    ) -> Vec<(Vec<HttpCallReport>, Vec<GrpcCallReport>)> {
        (0..handles.len())
            .map(|stage| self.report(worker, handles, stage))
            .collect()
    }

    /// Reports the HTTP and gRPC calls `stage` made.
    pub(super) fn report(
        &self,
        worker: &mut Worker,
        handles: &Handles<'_>,
        stage: usize,
    ) -> (Vec<HttpCallReport>, Vec<GrpcCallReport>) {
        let Some(vm) = handles[stage].and_then(|held| worker.vm(held)) else {
            return (Vec::new(), Vec::new());
        };
        let host = in_memory_host(vm);
        let mut http = Vec::new();
        let mut grpc = Vec::new();
        for call in self.made.iter().filter(|call| call.stage == stage) {
            if call.grpc {
                if let Some(record) = host.grpc_calls.get(call.index) {
                    grpc.push(grpc_report(record));
                }
            } else if let Some(record) = host.http_calls.get(call.index) {
                http.push(http_report(record));
            }
        }
        (http, grpc)
    }
}

/// Answers HTTP call number `index` of `vm`'s host with `answer`, or fails it.
fn answer_http(vm: &mut Vm, index: usize, answer: Option<&CallResponse>) -> Result<(), VmError> {
    let Some(token) = in_memory_host(vm).http_calls.get(index).map(|c| c.token) else {
        return Ok(());
    };
    match answer {
        Some(answer) => vm.on_http_call_response(
            token,
            HttpCallResponse {
                headers: to_map(&answer.headers),
                body: answer.body.0.clone(),
                trailers: to_map(&answer.trailers),
            },
        ),
        None => vm.on_http_call_failure(token),
    }
}

/// Answers gRPC call or stream number `index` of `vm`'s host with the next of `answers`, or closes it with
/// DEADLINE_EXCEEDED. A unary call gets its reply as one message, or a close with the failure
/// status, as Envoy delivers them; a stream gets everything the answer scripts, until the plugin
/// cancels it.
fn answer_grpc(
    vm: &mut Vm,
    index: usize,
    answers: &mut dyn Iterator<Item = &GrpcResponse>,
) -> Result<(), VmError> {
    let Some(call) = in_memory_host(vm).grpc_calls.get(index) else {
        return Ok(());
    };
    let (token, cancelled, unary) = (call.token, call.cancelled, call.request.message.is_some());
    // A call the plugin cancelled takes no answer, nor does a unary one it closed (closing a
    // unary call cancels it, as in Envoy).
    if cancelled || unary && call.closed {
        return Ok(());
    }
    let Some(answer) = answers.next() else {
        return vm.on_grpc_close(token, DEADLINE_EXCEEDED, b"no response".to_vec());
    };
    if unary {
        return if answer.status == 0 {
            let reply: Vec<u8> = answer
                .messages
                .iter()
                .flat_map(|m| m.0.iter().copied())
                .collect();
            vm.on_grpc_call_reply(token, reply)
        } else {
            vm.on_grpc_close(token, answer.status, answer.message.clone().into_bytes())
        };
    }
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
            return Ok(());
        }
        vm.on_grpc_receive(token, message.0.clone())?;
    }
    if !answer.trailing_metadata.is_empty() && still_open(vm) {
        vm.on_grpc_receive_trailing_metadata(token, to_map(&answer.trailing_metadata))?;
    }
    if still_open(vm) {
        vm.on_grpc_close(token, answer.status, answer.message.clone().into_bytes())?;
    }
    Ok(())
}

/// Why answering a root context's calls stopped short.
#[derive(Debug, thiserror::Error)]
pub(super) enum RootCallsError {
    /// A callback the answering made failed the VM: the plugin's failure, to be counted.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The plugin kept making calls past what is answered (the message says which budget).
    #[error("{0}")]
    Budget(String),
}

/// Answers, with the failure callback, the calls a root context of `vm` made since `since`
/// (the host's HTTP and gRPC record lengths then); the error if a callback failed the VM or
/// the plugin kept making calls.
pub(super) fn answer_root_calls(vm: &mut Vm, since: (usize, usize)) -> Result<(), RootCallsError> {
    let (mut next_http, mut next_grpc) = since;
    for _ in 0..MAX_ANSWERS {
        if vm.is_failed() {
            return Ok(());
        }
        let host = in_memory_host(vm);
        if host.http_calls.len() + host.grpc_calls.len() > MAX_CALL_RECORDS {
            // Each answer may make another call, and each tick up to MAX_ANSWERS: a plugin
            // doing so on every tick would fill memory with records no report shows. Past the
            // budget its calls stay open (and past 1024 open, are refused, and not recorded);
            // it is said once, by the answering that crossed it.
            if since.0 + since.1 > MAX_CALL_RECORDS {
                return Ok(());
            }
            return Err(RootCallsError::Budget(format!(
                "the plugin made over {MAX_CALL_RECORDS} calls in this run: those of its root \
                 contexts are answered no more"
            )));
        }
        let answered = if next_http < host.http_calls.len() {
            next_http += 1;
            answer_http(vm, next_http - 1, None)
        } else if next_grpc < host.grpc_calls.len() {
            next_grpc += 1;
            answer_grpc(vm, next_grpc - 1, &mut std::iter::empty())
        } else {
            return Ok(());
        };
        answered?;
    }
    let host = in_memory_host(vm);
    if next_http < host.http_calls.len() || next_grpc < host.grpc_calls.len() {
        return Err(RootCallsError::Budget(format!(
            "the plugin kept making calls: {MAX_ANSWERS} were answered, the rest were not"
        )));
    }
    Ok(())
}

/// [`answer_root_calls`] on a worker: a spent budget is noted in `errors`; what is left to
/// return is a callback failing the VM (the plugin's failure, to be counted).
pub(super) fn answer_root_calls_noting(
    vm: &mut Vm,
    since: (usize, usize),
    errors: &mut Vec<String>,
) -> Result<(), VmError> {
    match answer_root_calls(vm, since) {
        Err(RootCallsError::Vm(error)) => Err(error),
        Err(RootCallsError::Budget(message)) => {
            errors.push(message);
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// Where `vm`'s host's call records end now, for [`answer_root_calls`].
pub(super) fn calls_mark(vm: &mut Vm) -> (usize, usize) {
    let host = in_memory_host(vm);
    (host.http_calls.len(), host.grpc_calls.len())
}

fn http_report(call: &abi::DispatchedCall) -> HttpCallReport {
    HttpCallReport {
        upstream: report_text(&call.request.upstream),
        headers: pairs(&call.request.headers),
        body: report_text(&call.request.body),
        trailers: pairs(&call.request.trailers),
        timeout_ms: call.request.timeout.as_millis() as u64,
    }
}

fn grpc_report(call: &abi::GrpcRecord) -> GrpcCallReport {
    GrpcCallReport {
        upstream: report_text(&call.request.upstream),
        service: report_text(&call.request.service),
        method: report_text(&call.request.method),
        initial_metadata: pairs(&call.request.initial_metadata),
        message: call.request.message.as_deref().map(report_text),
        timeout_ms: call.request.timeout.map(|t| t.as_millis() as u64),
        sent: call
            .sent
            .iter()
            .map(|(message, _)| report_text(message))
            .collect(),
        cancelled: call.cancelled,
        closed: call.closed,
    }
}
