//! Running one HTTP exchange through a VM, as a proxy would.

use abi::{ContextId, DataAction, HeadersAction, StreamType, Vm, VmError};

use super::callouts::{to_map, Callouts};
use super::report::{HttpReport, LocalResponseReport};
use super::{in_memory_host, lossy, FailurePolicy, Headers, HttpExchange};

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

/// Runs one exchange; stops early on a local reply, a stall or a VM failure.
struct ExchangeRun<'a> {
    vm: &'a mut Vm,
    context: ContextId,
    exchange: &'a HttpExchange,
    report: HttpReport,
    callouts: Callouts<'a>,
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

    /// Whether the plugin ended the exchange: a local reply, or closing the stream (which a
    /// proxy answers by resetting it: nothing more is forwarded either way).
    fn check_local_response(&mut self) -> Result<(), Stop> {
        let stream = self.stream();
        if stream.local_response.is_some() {
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

    /// Answers the next unanswered call of this exchange; `false` if there is none.
    fn answer_next_call(&mut self) -> Result<bool, Stop> {
        Ok(self.callouts.answer_next(self.vm)?)
    }

    /// Waits, as a proxy would, for the plugin to continue a paused `direction`: delivers pending
    /// call responses until it does, replies locally, or nothing is left to wait for.
    fn settle(&mut self, direction: Direction) -> Result<(), Stop> {
        loop {
            self.check_local_response()?;
            if self.take_continued(direction) {
                return Ok(());
            }
            if !self.answer_next_call()? {
                return Err(Stop::Stalled);
            }
        }
    }

    fn headers_phase(
        &mut self,
        direction: Direction,
        headers: Headers,
        end_of_stream: bool,
    ) -> Result<HeadersAction, Stop> {
        let map = to_map(&headers);
        let count = map.len();
        let stream = self.stream();
        match direction {
            Direction::Request => stream.request_headers = map,
            Direction::Response => stream.response_headers = map,
        }
        let context = self.context;
        let action = match direction {
            Direction::Request => self.vm.on_request_headers(context, count, end_of_stream)?,
            Direction::Response => self.vm.on_response_headers(context, count, end_of_stream)?,
        };
        let key = direction.action_keys()[0];
        self.report.actions.insert(key, action.as_str());
        self.check_local_response()?;
        // StopAll* also holds back the body callbacks; plain Pause (StopIteration) does not.
        if matches!(
            action,
            HeadersAction::StopAllAndBuffer | HeadersAction::StopAllAndWatermark
        ) {
            self.settle(direction)?;
            return Ok(HeadersAction::Continue);
        }
        Ok(action)
    }

    fn direction_phase(&mut self, direction: Direction) -> Result<(), Stop> {
        let exchange = self.exchange;
        let (headers, chunks, trailers) = match direction {
            Direction::Request => (
                exchange
                    .request_headers
                    .clone()
                    .unwrap_or_else(default_request_headers),
                &exchange.request_body,
                &exchange.request_trailers,
            ),
            Direction::Response => (
                exchange
                    .response_headers
                    .clone()
                    .unwrap_or_else(default_response_headers),
                &exchange.response_body,
                &exchange.response_trailers,
            ),
        };
        let headers_end = chunks.is_empty() && trailers.is_empty();
        let action = self.headers_phase(direction, headers, headers_end)?;
        let mut headers_held = !action.continues();
        let mut forwarded_body = Vec::new();
        let mut body_held = false;
        let context = self.context;
        for (i, chunk) in chunks.iter().enumerate() {
            let end_of_stream = i + 1 == chunks.len() && trailers.is_empty();
            let stream = self.stream();
            let (body, eos) = match direction {
                Direction::Request => (&mut stream.request_body, &mut stream.request_end_of_stream),
                Direction::Response => (
                    &mut stream.response_body,
                    &mut stream.response_end_of_stream,
                ),
            };
            body.extend_from_slice(chunk.as_bytes());
            *eos = end_of_stream;
            let size = body.len();
            let action = match direction {
                Direction::Request => self.vm.on_request_body(context, size, end_of_stream)?,
                Direction::Response => self.vm.on_response_body(context, size, end_of_stream)?,
            };
            let key = direction.action_keys()[1];
            self.report.actions.insert(key, action.as_str());
            self.check_local_response()?;
            body_held = !matches!(action, DataAction::Continue);
            if !body_held && !headers_held {
                forwarded_body.append(self.body_mut(direction));
            }
            if headers_held && self.take_continued(direction) {
                headers_held = false;
                forwarded_body.append(self.body_mut(direction));
            }
        }
        if !trailers.is_empty() {
            let map = to_map(trailers);
            let count = map.len();
            let stream = self.stream();
            match direction {
                Direction::Request => stream.request_trailers = map,
                Direction::Response => stream.response_trailers = map,
            }
            let action = match direction {
                Direction::Request => self.vm.on_request_trailers(context, count)?,
                Direction::Response => self.vm.on_response_trailers(context, count)?,
            };
            let key = direction.action_keys()[2];
            self.report.actions.insert(key, action.as_str());
            self.check_local_response()?;
            if !action.continues() {
                headers_held = true;
            }
        }
        if headers_held || body_held {
            self.settle(direction)?;
        }
        forwarded_body.append(self.body_mut(direction));
        let stream = self.stream();
        let (headers, trailers) = match direction {
            Direction::Request => (&stream.request_headers, &stream.request_trailers),
            Direction::Response => (&stream.response_headers, &stream.response_trailers),
        };
        let (headers, trailers) = (headers.to_string_pairs(), trailers.to_string_pairs());
        let body = lossy(&forwarded_body);
        match direction {
            Direction::Request => {
                self.report.request_headers = headers;
                self.report.request_body = body;
                self.report.request_trailers = trailers;
            }
            Direction::Response => {
                self.report.response_headers = headers;
                self.report.response_body = body;
                self.report.response_trailers = trailers;
            }
        }
        Ok(())
    }

    fn body_mut(&mut self, direction: Direction) -> &mut Vec<u8> {
        let stream = self.stream();
        match direction {
            Direction::Request => &mut stream.request_body,
            Direction::Response => &mut stream.response_body,
        }
    }

    fn run(&mut self) -> Result<(), Stop> {
        self.direction_phase(Direction::Request)?;
        self.direction_phase(Direction::Response)?;
        // Calls nobody waited for still get their answers before the stream ends.
        while self.answer_next_call()? {}
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
    let callouts = Callouts::new(
        vm,
        &exchange.http_call_responses,
        &exchange.grpc_call_responses,
    );
    let mut run = ExchangeRun {
        vm,
        context,
        exchange,
        report,
        callouts,
    };
    let outcome = run.run();
    let ExchangeRun {
        vm,
        mut report,
        callouts,
        ..
    } = run;
    match outcome {
        Ok(()) => {}
        Err(Stop::Stalled) => report.stalled = true,
        Err(Stop::LocalResponse) => {}
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
    // The stream ends: the plugin logs it and lets go of it, even after a stall or a local reply.
    if !vm.is_failed() {
        let ended = vm
            .on_log(context)
            .and_then(|_| vm.on_done(context))
            .and_then(|_| vm.on_delete(context));
        if let Err(error) = ended {
            report.error.get_or_insert_with(|| error.to_string());
        }
    }
    in_memory_host(vm).streams.remove(&context);
    report
}
