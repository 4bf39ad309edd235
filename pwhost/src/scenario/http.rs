//! Running one HTTP exchange through a VM, as Envoy runs a stream through a Wasm filter.
//!
//! Per direction: the headers callback; then each body chunk (the last one carries
//! end_of_stream); then the trailers callback. What the plugin lets go on is recorded as
//! forwarded at that moment. Envoy's rules for stopping:
//! - headers returning `StopAllIteration*` (which includes a plain `Pause` unless the plugin is
//!   configured with `allow_on_headers_stop_iteration`) hold everything: no body or trailer
//!   callback until the plugin continues the stream; then the body that arrived meanwhile comes
//!   in one callback;
//! - headers returning `Pause` (allowed) hold the headers only: body chunks and trailers still
//!   reach the plugin, and a `Continue` from any of them resumes the whole stream;
//! - a body chunk the plugin holds is buffered and handed back with the next one;
//! - a local reply from a request callback goes back through the plugin's own response
//!   callbacks, as Envoy sends it through the whole filter chain; one from a response callback
//!   replaces the response without them.

use abi::{
    ContextId, DataAction, HeaderMap, HeadersAction, LocalResponse, StreamType, Vm, VmError,
};

use super::callouts::{to_map, Callouts};
use super::report::{FilterStateReport, HttpReport, LocalResponseReport};
use super::{in_memory_host, lossy, FailurePolicy, Headers, HttpExchange, UPSTREAM_ADDRESS};

fn default_request_headers() -> Headers {
    [
        (":method", "GET"),
        (":path", "/"),
        (":authority", "localhost"),
        (":scheme", "http"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn default_response_headers() -> Headers {
    vec![(":status".into(), "200".into())]
}

/// Which way data flows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

impl Direction {
    /// The report's action keys for this direction's headers, body and trailers.
    fn action_keys(self) -> [&'static str; 3] {
        match self {
            Direction::Request => ["request_headers", "request_body", "request_trailers"],
            Direction::Response => ["response_headers", "response_body", "response_trailers"],
        }
    }

    fn stream_type(self) -> StreamType {
        match self {
            Direction::Request => StreamType::HttpRequest,
            Direction::Response => StreamType::HttpResponse,
        }
    }
}

/// One direction of an exchange as it arrives at the proxy.
struct Message {
    headers: HeaderMap,
    body: Vec<Vec<u8>>,
    trailers: HeaderMap,
}

impl Message {
    /// A direction as the scenario scripts it.
    fn scripted(
        headers: Option<&Headers>,
        default: fn() -> Headers,
        body: &[String],
        trailers: &Headers,
    ) -> Message {
        Message {
            headers: match headers {
                Some(headers) => to_map(headers),
                None => to_map(&default()),
            },
            body: body
                .iter()
                .map(|chunk| chunk.clone().into_bytes())
                .collect(),
            trailers: to_map(trailers),
        }
    }

    fn request(exchange: &HttpExchange) -> Message {
        Message::scripted(
            exchange.request_headers.as_ref(),
            default_request_headers,
            &exchange.request_body,
            &exchange.request_trailers,
        )
    }

    fn response(exchange: &HttpExchange) -> Message {
        Message::scripted(
            exchange.response_headers.as_ref(),
            default_response_headers,
            &exchange.response_body,
            &exchange.response_trailers,
        )
    }

    /// The response Envoy makes of a local reply: `:status`, the plugin's headers, and for a body
    /// its length and (unless the plugin set one) `content-type: text/plain`. For a gRPC request
    /// it is a trailers-only gRPC response: `:status 200` with `grpc-status` (the plugin's, else
    /// the HTTP status mapped as Envoy maps it) and the body as `grpc-message`.
    fn local_reply(reply: &LocalResponse, grpc_request: bool) -> Message {
        let mut headers = HeaderMap::new();
        if grpc_request {
            headers.add(b":status", b"200");
            headers.add(b"content-type", b"application/grpc");
            let status = reply
                .grpc_status
                .unwrap_or_else(|| grpc_status_of_http(reply.status));
            headers.add(b"grpc-status", status.to_string().as_bytes());
            if !reply.body.is_empty() {
                headers.add(b"grpc-message", &reply.body);
            }
            for (name, value) in reply.headers.iter() {
                headers.add(name, value);
            }
            return Message {
                headers,
                body: Vec::new(),
                trailers: HeaderMap::new(),
            };
        }
        headers.add(b":status", reply.status.to_string().as_bytes());
        for (name, value) in reply.headers.iter() {
            headers.add(name, value);
        }
        if !reply.body.is_empty() {
            headers.replace(b"content-length", reply.body.len().to_string().as_bytes());
            if headers.get(b"content-type").is_none() {
                headers.add(b"content-type", b"text/plain");
            }
        }
        Message {
            headers,
            body: if reply.body.is_empty() {
                Vec::new()
            } else {
                vec![reply.body.clone()]
            },
            trailers: HeaderMap::new(),
        }
    }
}

/// Envoy's gRPC status for an HTTP status (`Grpc::Utility::httpToGrpcStatus`).
fn grpc_status_of_http(status: u32) -> i32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// Runs one exchange; stops early on a local reply, a stall or a VM failure.
struct ExchangeRun<'a> {
    vm: &'a mut Vm,
    context: ContextId,
    report: HttpReport,
    callouts: Callouts<'a>,
    /// Whether the local reply the host holds was already acted upon.
    local_reply_handled: bool,
}

/// Why an exchange stopped before its end.
enum Stop {
    LocalResponse,
    Reset,
    Stalled,
    Failed(VmError),
}

impl From<VmError> for Stop {
    fn from(error: VmError) -> Self {
        Stop::Failed(error)
    }
}

impl<'a> ExchangeRun<'a> {
    fn stream(&mut self) -> &mut abi::StreamRecord {
        let context = self.context;
        in_memory_host(self.vm).stream(context)
    }

    /// Whether the plugin ended the exchange: a new local reply, or closing the stream (which a
    /// proxy answers by resetting it: nothing more is forwarded either way).
    fn check_local_response(&mut self) -> Result<(), Stop> {
        let handled = self.local_reply_handled;
        let stream = self.stream();
        if stream.local_response.is_some() && !handled {
            return Err(Stop::LocalResponse);
        }
        if !stream.closed.is_empty() {
            return Err(Stop::Reset);
        }
        Ok(())
    }

    /// Whether the plugin continued `direction` since the last look (consuming the signal).
    fn take_continued(&mut self, direction: Direction) -> bool {
        let stream = self.stream();
        let before = stream.continued.len();
        stream.continued.retain(|t| *t != direction.stream_type());
        stream.continued.len() != before
    }

    /// Waits, as a proxy would, for the plugin to continue a paused `direction`: delivers pending
    /// call responses until it does, replies locally, or nothing is left to wait for.
    fn settle(&mut self, direction: Direction) -> Result<(), Stop> {
        loop {
            self.check_local_response()?;
            if self.take_continued(direction) {
                return Ok(());
            }
            if !self.callouts.answer_next(self.vm)? {
                return Err(Stop::Stalled);
            }
        }
    }

    fn headers_mut(&mut self, direction: Direction) -> &mut HeaderMap {
        let stream = self.stream();
        match direction {
            Direction::Request => &mut stream.request_headers,
            Direction::Response => &mut stream.response_headers,
        }
    }

    fn body_mut(&mut self, direction: Direction) -> &mut Vec<u8> {
        let stream = self.stream();
        match direction {
            Direction::Request => &mut stream.request_body,
            Direction::Response => &mut stream.response_body,
        }
    }

    fn trailers_mut(&mut self, direction: Direction) -> &mut HeaderMap {
        let stream = self.stream();
        match direction {
            Direction::Request => &mut stream.request_trailers,
            Direction::Response => &mut stream.response_trailers,
        }
    }

    /// Records the headers as forwarded, as they are now.
    fn forward_headers(&mut self, direction: Direction) {
        let headers = self.headers_mut(direction).to_string_pairs();
        match direction {
            Direction::Request => {
                self.report.request_headers = headers;
                // The request goes to an upstream host now.
                self.stream().info.upstream_address = Some(UPSTREAM_ADDRESS.into());
            }
            Direction::Response => self.report.response_headers = headers,
        }
    }

    /// Records the body the plugin holds as forwarded, and empties it.
    fn forward_body(&mut self, direction: Direction) {
        let body = std::mem::take(self.body_mut(direction));
        if direction == Direction::Response {
            let sent = &mut self.stream().info.bytes_sent;
            *sent = Some(sent.unwrap_or(0) + body.len() as u64);
        }
        let forwarded = match direction {
            Direction::Request => &mut self.report.request_body,
            Direction::Response => &mut self.report.response_body,
        };
        forwarded.push_str(&lossy(&body));
    }

    /// Records the trailers as forwarded.
    fn forward_trailers(&mut self, direction: Direction) {
        let trailers = self.trailers_mut(direction).to_string_pairs();
        match direction {
            Direction::Request => self.report.request_trailers = trailers,
            Direction::Response => self.report.response_trailers = trailers,
        }
    }

    fn record(&mut self, key: &'static str, action: &'static str) {
        self.report.actions.insert(key, action);
    }

    fn direction_phase(&mut self, direction: Direction, message: Message) -> Result<(), Stop> {
        // A continue made while nothing of this direction was held does not release what the
        // plugin holds from now on.
        self.take_continued(direction);
        let context = self.context;
        let [headers_key, body_key, trailers_key] = direction.action_keys();
        let has_trailers = !message.trailers.is_empty();
        let headers_end = message.body.is_empty() && !has_trailers;
        let count = message.headers.len();
        if direction == Direction::Response && !self.local_reply_handled {
            let code = message
                .headers
                .get(b":status")
                .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok());
            let info = &mut self.stream().info;
            info.response_code = code;
            info.response_code_details = Some("via_upstream".into());
        }
        *self.headers_mut(direction) = message.headers;
        let action = match direction {
            Direction::Request => self.vm.on_request_headers(context, count, headers_end)?,
            Direction::Response => self.vm.on_response_headers(context, count, headers_end)?,
        };
        self.record(headers_key, action.as_str());
        self.check_local_response()?;
        let mut chunks = message.body;
        // Whether the headers (and with them everything after) wait for the plugin.
        let mut held = match action {
            HeadersAction::Continue => false,
            HeadersAction::Pause => true,
            HeadersAction::StopAllAndBuffer | HeadersAction::StopAllAndWatermark => {
                self.settle(direction)?;
                // The body that arrived while everything was stopped comes in one callback.
                if chunks.len() > 1 {
                    chunks = vec![chunks.concat()];
                }
                false
            }
        };
        if !held {
            self.forward_headers(direction);
        }
        let chunk_count = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let end_of_stream = i + 1 == chunk_count && !has_trailers;
            if direction == Direction::Request {
                let received = &mut self.stream().info.bytes_received;
                *received = Some(received.unwrap_or(0) + chunk.len() as u64);
            }
            let body = self.body_mut(direction);
            body.extend_from_slice(&chunk);
            let size = body.len();
            let action = match direction {
                Direction::Request => self.vm.on_request_body(context, size, end_of_stream)?,
                Direction::Response => self.vm.on_response_body(context, size, end_of_stream)?,
            };
            self.record(body_key, action.as_str());
            self.check_local_response()?;
            // Without buffering, the plugin has taken the chunk (as Envoy's filter manager keeps
            // nothing for StopIterationNoBuffer).
            if action == DataAction::StopNoBuffer {
                self.body_mut(direction).clear();
            }
            // A Continue from the body, or the plugin continuing the stream, resumes it all.
            if action == DataAction::Continue || self.take_continued(direction) {
                if held {
                    self.forward_headers(direction);
                    held = false;
                }
                self.forward_body(direction);
            }
        }
        let mut body_held = !self.body_mut(direction).is_empty();
        if has_trailers {
            let count = message.trailers.len();
            *self.trailers_mut(direction) = message.trailers;
            let action = match direction {
                Direction::Request => self.vm.on_request_trailers(context, count)?,
                Direction::Response => self.vm.on_response_trailers(context, count)?,
            };
            self.record(trailers_key, action.as_str());
            self.check_local_response()?;
            if action.continues() || self.take_continued(direction) {
                if held {
                    self.forward_headers(direction);
                    held = false;
                }
                self.forward_body(direction);
                body_held = false;
            } else {
                held = true;
            }
        }
        if held || body_held {
            self.settle(direction)?;
            if self.report_headers(direction).is_empty() {
                self.forward_headers(direction);
            }
            self.forward_body(direction);
        }
        // Trailers the plugin added during the last body chunk go out too.
        self.forward_trailers(direction);
        Ok(())
    }

    fn report_headers(&self, direction: Direction) -> &Headers {
        match direction {
            Direction::Request => &self.report.request_headers,
            Direction::Response => &self.report.response_headers,
        }
    }

    /// The response to a local reply, and the request it answered.
    fn local_reply(&mut self, from_request: bool) -> Result<(), Stop> {
        self.local_reply_handled = true;
        let grpc_request = self
            .stream()
            .request_headers
            .get(b"content-type")
            .is_some_and(|v| v.starts_with(b"application/grpc"));
        let Some(reply) = self.stream().local_response.clone() else {
            return Ok(());
        };
        let info = &mut self.stream().info;
        info.response_code = Some(reply.status);
        info.response_code_details = Some(lossy(&reply.details));
        let response = Message::local_reply(&reply, grpc_request);
        if from_request {
            // Nothing more of the request goes upstream; the reply passes the plugin's own
            // response callbacks.
            *self.body_mut(Direction::Response) = Vec::new();
            self.report.response_headers.clear();
            self.report.response_body.clear();
            return self.direction_phase(Direction::Response, response);
        }
        if !self.report.response_headers.is_empty() {
            // The response headers already went downstream: Envoy can only reset the stream.
            return Err(Stop::Reset);
        }
        // From the response path, before anything went downstream, the reply replaces the
        // response as it is (what on_log reads too).
        self.report.response_headers = response.headers.to_string_pairs();
        self.report.response_body = lossy(&response.body.concat());
        self.report.response_trailers.clear();
        let stream = self.stream();
        stream.response_headers = response.headers;
        stream.response_trailers = HeaderMap::new();
        Ok(())
    }

    fn run(&mut self, exchange: &HttpExchange) -> Result<(), Stop> {
        match self.direction_phase(Direction::Request, Message::request(exchange)) {
            Err(Stop::LocalResponse) => self.local_reply(true)?,
            other => {
                other?;
                match self.direction_phase(Direction::Response, Message::response(exchange)) {
                    Err(Stop::LocalResponse) => self.local_reply(false)?,
                    other => other?,
                }
            }
        }
        // Calls nobody waited for still get their answers before the stream ends.
        while self.callouts.answer_next(self.vm)? {}
        Ok(())
    }
}

/// Records a VM failure: fail closed answers 503; fail open forwards what the plugin had not
/// yet handled as it arrived.
fn fail(report: &mut HttpReport, policy: FailurePolicy, error: String, exchange: &HttpExchange) {
    report.error = Some(error);
    match policy {
        FailurePolicy::FailClosed => {
            report.local_response = Some(LocalResponseReport {
                status: 503,
                headers: Vec::new(),
                body: String::new(),
                details: "plugin_failed".into(),
                grpc_status: None,
            });
        }
        FailurePolicy::FailOpen => {
            if report.request_headers.is_empty() {
                report.request_headers = exchange
                    .request_headers
                    .clone()
                    .unwrap_or_else(default_request_headers);
                report.request_body = exchange.request_body.concat();
                report.request_trailers = exchange.request_trailers.clone();
            }
            if report.response_headers.is_empty() {
                report.response_headers = exchange
                    .response_headers
                    .clone()
                    .unwrap_or_else(default_response_headers);
                report.response_body = exchange.response_body.concat();
                report.response_trailers = exchange.response_trailers.clone();
            }
        }
    }
}

pub(super) fn run_exchange(
    vm: &mut Vm,
    exchange: &HttpExchange,
    policy: FailurePolicy,
    configured: bool,
    connection_id: u64,
) -> HttpReport {
    let mut report = HttpReport::default();
    if !configured || vm.is_failed() {
        let reason = if vm.is_failed() {
            "the VM has failed"
        } else {
            "the plugin is not configured"
        };
        fail(&mut report, policy, reason.into(), exchange);
        return report;
    }
    let context = match vm.create_http_context() {
        Ok(context) => context,
        Err(error) => {
            fail(&mut report, policy, error.to_string(), exchange);
            return report;
        }
    };
    let start_time = vm.host().now();
    let stream = in_memory_host(vm).stream(context);
    stream.info = super::connection_info(connection_id, start_time);
    stream.info.protocol = Some("HTTP/1.1".into());
    let callouts = Callouts::new(
        vm,
        &exchange.http_call_responses,
        &exchange.grpc_call_responses,
    );
    let mut run = ExchangeRun {
        vm,
        context,
        report,
        callouts,
        local_reply_handled: false,
    };
    let outcome = run.run(exchange);
    let ExchangeRun {
        vm,
        mut report,
        callouts,
        ..
    } = run;
    match outcome {
        Ok(()) | Err(Stop::LocalResponse) => {}
        Err(Stop::Stalled) => report.stalled = true,
        Err(Stop::Reset) => report.reset = true,
        Err(Stop::Failed(error)) => fail(&mut report, policy, error.to_string(), exchange),
    }
    if let Some(local) = in_memory_host(vm).stream(context).local_response.clone() {
        report.local_response = Some(LocalResponseReport {
            status: local.status,
            headers: local.headers.to_string_pairs(),
            body: lossy(&local.body),
            details: lossy(&local.details),
            grpc_status: local.grpc_status,
        });
    }
    (report.http_calls, report.grpc_calls) = callouts.report(vm);
    if let Some(reason) = callouts.gave_up() {
        report.error.get_or_insert(reason);
    }
    let now = vm.host().now();
    let stream = in_memory_host(vm).stream(context);
    stream.info.duration = stream
        .info
        .start_time
        .and_then(|start| now.duration_since(start).ok());
    report.route_cache_clears = stream.route_cache_clears;
    // The stream ends: the plugin logs it and lets go of it, even after a stall or a local reply.
    if !vm.is_failed() {
        let ended = vm.on_log(context).and_then(|_| vm.on_done(context));
        report.filter_state = FilterStateReport::of(vm.filter_state(context));
        if let Err(error) = ended.and_then(|_| vm.on_delete(context)) {
            report.error.get_or_insert_with(|| error.to_string());
        }
    }
    in_memory_host(vm).streams.remove(&context);
    report
}
