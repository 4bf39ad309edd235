//! Scenarios: scripted traffic for a plugin, and the report of what the plugin did with it.
//!
//! A scenario is JSON or YAML:
//!
//! ```yaml
//! properties: [{path: [source, address], value: "10.0.0.1:1234"}]
//! ticks: 0
//! http:
//!   - request_headers: [[":method", "GET"], [":path", "/"]]
//!     request_body: ["first chunk", "last chunk"]
//!     response_headers: [[":status", "200"]]
//!     http_call_responses: [{headers: [[":status", "200"]], body: "ok"}]
//! ```
//!
//! Each HTTP exchange runs through the plugin as a proxy would run it: request headers, body
//! chunks (the last one carries end-of-stream), trailers, then the same for the response, then
//! `on_log`, `on_done` and `on_delete`. A stream the plugin pauses resumes only when the plugin
//! continues it (typically from an HTTP call response, which the runner answers from
//! `http_call_responses` in order, or with the spec's failure callback when none is left);
//! otherwise it is reported as stalled.

use std::collections::BTreeMap;

use abi::{
    ContextId, DataAction, HeaderMap, HeadersAction, HttpCallResponse, InMemoryHost, Plugin,
    StreamType, Vm, VmError,
};
use serde::{Deserialize, Serialize};

/// A header list as `[name, value]` pairs.
pub type Headers = Vec<(String, String)>;

/// Scripted traffic for one plugin.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// HTTP exchanges, run one after the other.
    #[serde(default)]
    pub http: Vec<HttpExchange>,
    /// Properties the host answers `proxy_get_property` with.
    #[serde(default)]
    pub properties: Vec<PropertyValue>,
    /// How many timer ticks to deliver after configuration (only if the plugin set a tick
    /// period).
    #[serde(default)]
    pub ticks: u32,
}

/// One HTTP exchange.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpExchange {
    /// Request headers; default `GET /` to `localhost`.
    #[serde(default)]
    pub request_headers: Option<Headers>,
    /// Request body chunks.
    #[serde(default)]
    pub request_body: Vec<String>,
    /// Request trailers.
    #[serde(default)]
    pub request_trailers: Headers,
    /// Response headers from upstream; default `:status 200`.
    #[serde(default)]
    pub response_headers: Option<Headers>,
    /// Response body chunks.
    #[serde(default)]
    pub response_body: Vec<String>,
    /// Response trailers.
    #[serde(default)]
    pub response_trailers: Headers,
    /// Answers to the HTTP calls the plugin dispatches during this exchange, in order.
    #[serde(default)]
    pub http_call_responses: Vec<CallResponse>,
}

/// The answer to one HTTP call.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallResponse {
    /// Response headers (include `:status`).
    #[serde(default)]
    pub headers: Headers,
    /// Response body.
    #[serde(default)]
    pub body: String,
    /// Response trailers.
    #[serde(default)]
    pub trailers: Headers,
}

/// A property the host provides.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyValue {
    /// Path segments, e.g. `["request", "path"]`.
    pub path: Vec<String>,
    /// The value.
    pub value: String,
}

impl Scenario {
    /// Parses a scenario from JSON or YAML text (YAML is a superset of JSON).
    pub fn parse(text: &str) -> Result<Scenario, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }

    /// The scenario used when none is given: one `GET /`.
    pub fn single_get() -> Scenario {
        Scenario {
            http: vec![HttpExchange::default()],
            ..Scenario::default()
        }
    }
}

/// What the host does when the VM fails (a trap) while a stream is in the plugin's hands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Answer the stream with a local 503 reply (never leave it hanging).
    #[default]
    FailClosed,
    /// Forward the stream as if the plugin were not there.
    FailOpen,
}

/// What happened to one HTTP exchange.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct HttpReport {
    /// Request headers as forwarded upstream (empty if never forwarded).
    pub request_headers: Headers,
    /// Request body as forwarded upstream.
    pub request_body: String,
    /// Request trailers as forwarded upstream.
    pub request_trailers: Headers,
    /// Response headers as sent downstream.
    pub response_headers: Headers,
    /// Response body as sent downstream.
    pub response_body: String,
    /// Response trailers as sent downstream.
    pub response_trailers: Headers,
    /// The local reply the plugin (or a fail-closed policy) sent instead.
    pub local_response: Option<LocalResponseReport>,
    /// HTTP calls the plugin dispatched during the exchange.
    pub http_calls: Vec<HttpCallReport>,
    /// The action the plugin returned from each callback (the last one, for bodies).
    pub actions: BTreeMap<&'static str, &'static str>,
    /// Whether the plugin paused the stream and never continued it.
    pub stalled: bool,
    /// The error that failed the VM during this exchange, if any.
    pub error: Option<String>,
}

/// A local reply.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LocalResponseReport {
    /// HTTP status.
    pub status: u32,
    /// Extra headers.
    pub headers: Headers,
    /// Body.
    pub body: String,
    /// Status code details.
    pub details: String,
    /// gRPC status, if a gRPC reply.
    pub grpc_status: Option<i32>,
}

/// A dispatched HTTP call.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HttpCallReport {
    /// Upstream (cluster) name.
    pub upstream: String,
    /// Request headers.
    pub headers: Headers,
    /// Request body.
    pub body: String,
    /// Request trailers.
    pub trailers: Headers,
    /// Timeout in milliseconds.
    pub timeout_ms: u64,
}

/// A log line.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LogReport {
    /// Level name.
    pub level: &'static str,
    /// Text.
    pub message: String,
    /// The context that wrote it.
    pub context_id: u32,
}

/// A metric's final value.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MetricReport {
    /// The name the plugin defined.
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    #[serde(rename = "type")]
    pub metric_type: &'static str,
    /// The value (last recorded value for histograms).
    pub value: i64,
}

/// Everything a run produced.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// The engine.
    pub runtime: String,
    /// The plugin's ABI version.
    pub abi_version: String,
    /// Whether `proxy_on_vm_start` succeeded.
    pub vm_start: bool,
    /// Whether `proxy_on_configure` succeeded.
    pub configure: bool,
    /// The error that failed the VM while starting, if any.
    pub start_error: Option<String>,
    /// One report per HTTP exchange.
    pub http: Vec<HttpReport>,
    /// Log lines in order.
    pub logs: Vec<LogReport>,
    /// Metrics in definition order.
    pub metrics: Vec<MetricReport>,
    /// Shared data of the plugin's VM id.
    pub shared_data: BTreeMap<String, String>,
}

fn to_map(headers: &Headers) -> HeaderMap {
    headers
        .iter()
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
        .collect()
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

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

/// Which way data flows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

impl Direction {
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
    answers: std::slice::Iter<'a, CallResponse>,
    /// Index into the host's dispatched calls of the first one made during this exchange.
    first_call: usize,
    /// How many of the calls made during this exchange have been answered.
    answered: usize,
}

/// Why an exchange stopped before its end.
enum Stop {
    LocalResponse,
    Stalled,
    Failed(VmError),
}

impl From<VmError> for Stop {
    fn from(error: VmError) -> Self {
        Stop::Failed(error)
    }
}

fn in_memory_host(vm: &mut Vm) -> &mut InMemoryHost {
    vm.host_as::<InMemoryHost>()
        .expect("scenario VMs run on an InMemoryHost")
}

impl<'a> ExchangeRun<'a> {
    fn stream(&mut self) -> &mut abi::StreamRecord {
        let context = self.context;
        in_memory_host(self.vm).stream(context)
    }

    fn check_local_response(&mut self) -> Result<(), Stop> {
        if self.stream().local_response.is_some() {
            return Err(Stop::LocalResponse);
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
        let calls = &in_memory_host(self.vm).http_calls;
        let Some(call) = calls.get(self.first_call + self.answered) else {
            return Ok(false);
        };
        let token = call.token;
        self.answered += 1;
        // No scripted answer left: the spec's failure callback has no headers, body or trailers.
        let response = match self.answers.next() {
            Some(answer) => HttpCallResponse {
                headers: to_map(&answer.headers),
                body: answer.body.clone().into_bytes(),
                trailers: to_map(&answer.trailers),
            },
            None => HttpCallResponse::default(),
        };
        self.vm.on_http_call_response(token, response)?;
        Ok(true)
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
        let key = if direction == Direction::Request {
            "request_headers"
        } else {
            "response_headers"
        };
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
                    .unwrap_or_else(|| vec![(":status".into(), "200".into())]),
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
            let key = if direction == Direction::Request {
                "request_body"
            } else {
                "response_body"
            };
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
            let key = if direction == Direction::Request {
                "request_trailers"
            } else {
                "response_trailers"
            };
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

/// Runs `scenario` through a new VM of `plugin` and reports what happened.
pub fn run(plugin: &Plugin, scenario: &Scenario, policy: FailurePolicy) -> Result<Report, VmError> {
    let mut host = InMemoryHost::new();
    for property in &scenario.properties {
        host.properties
            .insert(property.path.join("."), property.value.clone().into_bytes());
    }
    let mut vm = Vm::new(plugin, Box::new(host))?;
    let mut report = Report {
        runtime: plugin.runtime_name().to_string(),
        abi_version: plugin.abi_version().to_string(),
        vm_start: false,
        configure: false,
        start_error: None,
        http: Vec::new(),
        logs: Vec::new(),
        metrics: Vec::new(),
        shared_data: BTreeMap::new(),
    };
    let started = vm.start().and_then(|ok| {
        report.vm_start = ok;
        if ok {
            report.configure = vm.configure()?;
        }
        Ok(())
    });
    if let Err(error) = started {
        report.start_error = Some(error.to_string());
    }
    if report.configure {
        for _ in 0..scenario.ticks {
            if vm.tick_period().is_none() || vm.tick().is_err() {
                break;
            }
        }
    }
    for exchange in &scenario.http {
        report
            .http
            .push(run_exchange(&mut vm, exchange, policy, report.configure));
    }
    let host = in_memory_host(&mut vm);
    report.logs = host
        .logs
        .iter()
        .map(|log| LogReport {
            level: log.level.as_str(),
            message: log.message.clone(),
            context_id: log.context.0,
        })
        .collect();
    let shared = plugin.shared_state();
    report.metrics = shared
        .metrics_snapshot()
        .into_iter()
        .map(|m| MetricReport {
            name: m.name,
            metric_type: m.metric_type.as_str(),
            value: m.value,
        })
        .collect();
    report.shared_data = shared
        .data_snapshot(&plugin.config().vm_id)
        .into_iter()
        .map(|(k, v)| (lossy(&k), lossy(&v)))
        .collect();
    Ok(report)
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
                    .unwrap_or_else(|| vec![(":status".into(), "200".into())]);
                report.response_body = exchange.response_body.concat();
                report.response_trailers = exchange.response_trailers.clone();
            }
        }
    }
}

fn run_exchange(
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
    let first_call = in_memory_host(vm).http_calls.len();
    let mut run = ExchangeRun {
        vm,
        context,
        exchange,
        report,
        answers: exchange.http_call_responses.iter(),
        first_call,
        answered: 0,
    };
    let outcome = run.run();
    let mut report = run.report;
    let vm = run.vm;
    match outcome {
        Ok(()) => {}
        Err(Stop::Stalled) => report.stalled = true,
        Err(Stop::LocalResponse) => {}
        Err(Stop::Failed(error)) => fail(&mut report, policy, error.to_string(), exchange),
    }
    let host_ref = in_memory_host(vm);
    if let Some(local) = host_ref.stream(context).local_response.clone() {
        report.local_response = Some(LocalResponseReport {
            status: local.status,
            headers: local.headers.to_string_pairs(),
            body: lossy(&local.body),
            details: lossy(&local.details),
            grpc_status: local.grpc_status,
        });
    }
    report.http_calls = host_ref.http_calls[first_call..]
        .iter()
        .map(|call| HttpCallReport {
            upstream: lossy(&call.request.upstream),
            headers: call.request.headers.to_string_pairs(),
            body: lossy(&call.request.body),
            trailers: call.request.trailers.to_string_pairs(),
            timeout_ms: call.request.timeout.as_millis() as u64,
        })
        .collect();
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
