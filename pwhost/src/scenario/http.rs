//! Running one HTTP exchange through the HTTP filter chain, as Envoy's filter manager runs a
//! stream through Wasm filters.
//!
//! The request passes the plugins in chain order, the response in reverse order; each event
//! (headers, a body chunk, trailers) goes as far down the chain as the plugins let it before the
//! next one arrives. Per plugin, Envoy's rules for stopping:
//! - headers returning `StopAllIteration*` (which includes a plain `Pause` unless the plugin is
//!   configured with `allow_on_headers_stop_iteration`) hold everything: no body or trailer
//!   callback until the plugin continues the stream; then the body that arrived meanwhile comes
//!   in one callback;
//! - headers returning `Pause` (allowed) hold the headers only: body chunks and trailers still
//!   reach the plugin, and a `Continue` from any of them resumes the whole stream;
//! - a body chunk the plugin holds is buffered and handed back with the next one;
//! - a plugin holding anything when its direction ends is waited for: the runner answers the
//!   calls the plugins made, in the order they made them, until it continues (or nothing is left
//!   to answer: the stream is reported stalled);
//! - a local reply from a request callback goes back through every plugin's response callbacks
//!   (as Envoy sends it through the whole encoder chain); one from a response callback replaces
//!   the response without them, or resets the stream if the response already went downstream.
//!
//! A plugin whose VM fails (or has failed) applies its failure policy: fail closed answers the
//! stream with a local 503 sent from that plugin's place in the chain; fail open passes the
//! stream on without it, with what it had let through or held.

use abi::{
    ContextId, DataAction, HeaderMap, HeadersAction, LocalResponse, StreamRecord, StreamType, Vm,
    VmError,
};
use lifecycle::{Admission, OnFailure, PluginId, StreamVm, Worker};

use super::callouts::{to_map, Callouts};
use super::report::{FilterReport, FilterStateReport, HttpReport, LocalResponseReport};
use super::{in_memory_host, pairs, report_text, Bytes, Headers, HttpExchange, UPSTREAM_ADDRESS};

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
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
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
        body: &[Bytes],
        trailers: &Headers,
    ) -> Message {
        Message {
            headers: match headers {
                Some(headers) => to_map(headers),
                None => to_map(&default()),
            },
            body: body.iter().map(|chunk| chunk.0.clone()).collect(),
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
                .unwrap_or_else(|| lifecycle::grpc_status_of_http(reply.status));
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

    /// The message as the events that reach the first plugin.
    fn into_events(self) -> Vec<Event> {
        let has_trailers = !self.trailers.is_empty();
        let chunks = self.body.len();
        let mut events = vec![Event::Headers(self.headers, chunks == 0 && !has_trailers)];
        for (i, chunk) in self.body.into_iter().enumerate() {
            events.push(Event::Data(chunk, i + 1 == chunks && !has_trailers));
        }
        if has_trailers {
            events.push(Event::Trailers(self.trailers));
        }
        events
    }
}

/// What passes from one plugin to the next: headers (with end of stream), a body chunk (with
/// end of stream), or trailers.
enum Event {
    Headers(HeaderMap, bool),
    Data(Vec<u8>, bool),
    Trailers(HeaderMap),
}

/// Why the exchange stopped before its end.
enum Stop {
    /// The plugin of this stage sent a local reply.
    LocalResponse(usize),
    /// A plugin closed the stream (which a proxy answers by resetting it).
    Reset,
    /// A plugin held the stream and nothing was left to wait for.
    Stalled,
    /// The VM of this stage failed.
    Failed(usize, VmError),
    /// The plugin of this stage fails the stream closed.
    FailClosed(usize),
}

/// Where one plugin stands in one direction of the exchange.
#[derive(Default)]
struct DirectionState {
    /// The headers wait for the plugin.
    held: bool,
    /// Everything waits for the plugin (`StopAllIteration`).
    stop_all: bool,
    /// Body chunks that arrived while everything waited.
    stopped: Vec<Vec<u8>>,
    headers_arrived: bool,
    headers_end: bool,
    headers_sent: bool,
    trailers_arrived: bool,
    /// The last event of the direction arrived.
    ended: bool,
    /// The end of the direction was passed on.
    end_sent: bool,
}

/// One plugin of the chain, on this exchange.
struct Stage {
    plugin: PluginId,
    held_vm: Option<StreamVm>,
    context: ContextId,
    /// The plugin's VM had failed before the stream (fail closed): the stream fails at this
    /// plugin's request headers.
    closed_at_admission: bool,
    /// The plugin sees nothing of the stream: its VM failed before or during it.
    inactive: bool,
    report: FilterReport,
    direction: DirectionState,
}

/// An exchange running through the chain.
struct Exchange<'w, 'a> {
    worker: &'w mut Worker,
    stages: Vec<Stage>,
    callouts: Callouts<'a>,
    report: HttpReport,
    /// The request and response bodies as they left the proxy, made report text once whole
    /// (chunk by chunk, a character split between two chunks would read as two escapes).
    bodies: [Vec<u8>; 2],
    /// The local reply sent (by a plugin, or for a plugin failing closed), and by which stage.
    local_reply: Option<(usize, LocalResponse)>,
    /// The response headers went downstream.
    response_started: bool,
}

/// The stream record of stage `stage` (in the host of its VM copy).
fn record<'s>(worker: &'s mut Worker, stage: &Stage) -> Result<&'s mut StreamRecord, VmError> {
    super::stream_record(worker, stage.held_vm.as_ref(), stage.context)
}

impl Exchange<'_, '_> {
    fn stream(&mut self, k: usize) -> Result<&mut StreamRecord, Stop> {
        record(self.worker, &self.stages[k]).map_err(|e| Stop::Failed(k, e))
    }

    /// Runs one callback of stage `k`'s plugin, then notes the calls it made.
    fn invoke<T>(
        &mut self,
        k: usize,
        callback: impl FnOnce(&mut Vm, ContextId) -> Result<T, VmError>,
    ) -> Result<T, Stop> {
        let handles: Vec<Option<&StreamVm>> =
            self.stages.iter().map(|s| s.held_vm.as_ref()).collect();
        let context = self.stages[k].context;
        self.callouts
            .invoke(self.worker, &handles, k, context, callback)
            .map_err(|error| Stop::Failed(k, error))
    }

    fn record_action(&mut self, k: usize, key: &'static str, action: &'static str) {
        self.stages[k].report.actions.insert(key, action);
    }

    /// Whether a plugin ended the exchange: a new local reply, or closing the stream.
    fn check_local_response(&mut self) -> Result<(), Stop> {
        if self.local_reply.is_some() {
            return Ok(());
        }
        for k in 0..self.stages.len() {
            if self.stages[k].inactive {
                continue;
            }
            let Ok(stream) = record(self.worker, &self.stages[k]) else {
                continue;
            };
            if stream.local_response.is_some() {
                return Err(Stop::LocalResponse(k));
            }
            if !stream.closed.is_empty() {
                return Err(Stop::Reset);
            }
        }
        Ok(())
    }

    /// Whether stage `k`'s plugin continued `direction` since the last look (consuming the
    /// signal).
    fn take_continued(&mut self, k: usize, direction: Direction) -> Result<bool, Stop> {
        let stream = self.stream(k)?;
        let before = stream.continued.len();
        stream.continued.retain(|t| *t != direction.stream_type());
        Ok(stream.continued.len() != before)
    }

    /// Waits, as a proxy would, for stage `k`'s plugin to continue `direction`: delivers pending
    /// call answers until it does, a plugin replies locally, or nothing is left to wait for.
    fn settle(&mut self, k: usize, direction: Direction) -> Result<(), Stop> {
        loop {
            self.check_local_response()?;
            if self.take_continued(k, direction)? {
                return Ok(());
            }
            let handles: Vec<Option<&StreamVm>> =
                self.stages.iter().map(|s| s.held_vm.as_ref()).collect();
            match self.callouts.answer_next(self.worker, &handles) {
                Ok(Some(_)) => {}
                Ok(None) => return Err(Stop::Stalled),
                Err((j, error)) if j == k => return Err(Stop::Failed(k, error)),
                // Another plugin failed on a call's answer: it leaves the stream by its policy.
                Err((j, error)) => {
                    if self.fail(j, &error) == OnFailure::FailClosed {
                        return Err(Stop::FailClosed(j));
                    }
                }
            }
        }
    }

    /// Stage `k`'s plugin failed: records it, and says what the stream gets.
    fn fail(&mut self, k: usize, error: &VmError) -> OnFailure {
        let stage = &mut self.stages[k];
        stage.inactive = true;
        stage.report.error.get_or_insert_with(|| error.to_string());
        let outcome = self.worker.failed(stage.plugin, error);
        stage.report.bypassed = outcome == OnFailure::FailOpen;
        outcome
    }

    fn headers_mut(&mut self, k: usize, direction: Direction) -> Result<&mut HeaderMap, Stop> {
        let stream = self.stream(k)?;
        Ok(match direction {
            Direction::Request => &mut stream.request_headers,
            Direction::Response => &mut stream.response_headers,
        })
    }

    fn body_mut(&mut self, k: usize, direction: Direction) -> Result<&mut Vec<u8>, Stop> {
        let stream = self.stream(k)?;
        Ok(match direction {
            Direction::Request => &mut stream.request_body,
            Direction::Response => &mut stream.response_body,
        })
    }

    fn trailers_mut(&mut self, k: usize, direction: Direction) -> Result<&mut HeaderMap, Stop> {
        let stream = self.stream(k)?;
        Ok(match direction {
            Direction::Request => &mut stream.request_trailers,
            Direction::Response => &mut stream.response_trailers,
        })
    }

    /// Stage `k`'s headers as the plugin left them, passed on.
    fn headers_event(&mut self, k: usize, direction: Direction, end: bool) -> Result<Event, Stop> {
        let headers = self.headers_mut(k, direction)?.clone();
        let state = &mut self.stages[k].direction;
        state.held = false;
        state.stop_all = false;
        state.headers_sent = true;
        state.end_sent |= end;
        Ok(Event::Headers(headers, end))
    }

    /// The body stage `k`'s plugin holds, passed on (and emptied). It ends the direction at
    /// `end` unless the plugin added trailers, which follow then.
    fn data_event(&mut self, k: usize, direction: Direction, end: bool) -> Result<Event, Stop> {
        let trailers_added = !self.trailers_mut(k, direction)?.is_empty();
        let body = std::mem::take(self.body_mut(k, direction)?);
        let end = end && !trailers_added;
        self.stages[k].direction.end_sent |= end;
        Ok(Event::Data(body, end))
    }

    /// Trailers the plugin of stage `k` added during its last body callback, passed on.
    fn added_trailers(&mut self, k: usize, direction: Direction) -> Result<Option<Event>, Stop> {
        let trailers = self.trailers_mut(k, direction)?;
        if trailers.is_empty() {
            return Ok(None);
        }
        let trailers = trailers.clone();
        self.stages[k].direction.end_sent = true;
        Ok(Some(Event::Trailers(trailers)))
    }

    fn on_headers(
        &mut self,
        k: usize,
        direction: Direction,
        headers: HeaderMap,
        end: bool,
    ) -> Result<Vec<Event>, Stop> {
        // A continue made while nothing of this direction was held does not release what the
        // plugin holds from now on.
        self.take_continued(k, direction)?;
        self.stages[k].direction = DirectionState {
            headers_arrived: true,
            headers_end: end,
            ended: end,
            ..DirectionState::default()
        };
        let count = headers.len();
        *self.headers_mut(k, direction)? = headers;
        let action = self.invoke(k, |vm, context| match direction {
            Direction::Request => vm.on_request_headers(context, count, end),
            Direction::Response => vm.on_response_headers(context, count, end),
        })?;
        self.record_action(k, direction.action_keys()[0], action.as_str());
        self.check_local_response()?;
        let mut out = Vec::new();
        match action {
            HeadersAction::Continue => out.push(self.headers_event(k, direction, end)?),
            HeadersAction::Pause => self.stages[k].direction.held = true,
            HeadersAction::StopAllAndBuffer | HeadersAction::StopAllAndWatermark => {
                let state = &mut self.stages[k].direction;
                state.held = true;
                state.stop_all = true;
            }
        }
        if end && self.stages[k].direction.held {
            self.settle(k, direction)?;
            out.push(self.headers_event(k, direction, true)?);
        }
        Ok(out)
    }

    fn on_data(
        &mut self,
        k: usize,
        direction: Direction,
        chunk: Vec<u8>,
        end: bool,
    ) -> Result<Vec<Event>, Stop> {
        let state = &mut self.stages[k].direction;
        state.ended |= end;
        if !state.stop_all {
            return self.body_callback(k, direction, chunk, end);
        }
        state.stopped.push(chunk);
        if !end {
            return Ok(Vec::new());
        }
        // Everything waited: once the plugin continues, the body that arrived meanwhile comes
        // in one callback.
        self.settle(k, direction)?;
        let stopped = std::mem::take(&mut self.stages[k].direction.stopped).concat();
        let mut out = vec![self.headers_event(k, direction, false)?];
        out.extend(self.body_callback(k, direction, stopped, true)?);
        Ok(out)
    }

    fn body_callback(
        &mut self,
        k: usize,
        direction: Direction,
        chunk: Vec<u8>,
        end: bool,
    ) -> Result<Vec<Event>, Stop> {
        if direction == Direction::Request {
            let received = &mut self.stream(k)?.info.bytes_received;
            *received = Some(received.unwrap_or(0) + chunk.len() as u64);
        }
        let body = self.body_mut(k, direction)?;
        body.extend_from_slice(&chunk);
        let size = body.len();
        let action = self.invoke(k, |vm, context| match direction {
            Direction::Request => vm.on_request_body(context, size, end),
            Direction::Response => vm.on_response_body(context, size, end),
        })?;
        self.record_action(k, direction.action_keys()[1], action.as_str());
        self.check_local_response()?;
        // Without buffering, the plugin has taken the chunk (as Envoy's filter manager keeps
        // nothing for StopIterationNoBuffer).
        if action == DataAction::StopNoBuffer {
            self.body_mut(k, direction)?.clear();
        }
        let mut out = Vec::new();
        // A Continue from the body, or the plugin continuing the stream, resumes it all.
        if action == DataAction::Continue || self.take_continued(k, direction)? {
            if self.stages[k].direction.held {
                out.push(self.headers_event(k, direction, false)?);
            }
            out.push(self.data_event(k, direction, end)?);
        }
        if end {
            let body_held = !self.body_mut(k, direction)?.is_empty();
            if self.stages[k].direction.held || body_held {
                self.settle(k, direction)?;
                if self.stages[k].direction.held {
                    out.push(self.headers_event(k, direction, false)?);
                }
                out.push(self.data_event(k, direction, true)?);
            }
            if let Some(trailers) = self.added_trailers(k, direction)? {
                out.push(trailers);
            } else if !self.stages[k].direction.end_sent {
                // The plugin took the last chunk: the end of the stream still goes on.
                self.stages[k].direction.end_sent = true;
                out.push(Event::Data(Vec::new(), true));
            }
        }
        Ok(out)
    }

    fn on_trailers(
        &mut self,
        k: usize,
        direction: Direction,
        trailers: HeaderMap,
    ) -> Result<Vec<Event>, Stop> {
        let state = &mut self.stages[k].direction;
        state.ended = true;
        state.trailers_arrived = true;
        let mut out = Vec::new();
        if state.stop_all {
            self.settle(k, direction)?;
            let stopped = std::mem::take(&mut self.stages[k].direction.stopped).concat();
            out.push(self.headers_event(k, direction, false)?);
            if !stopped.is_empty() {
                out.extend(self.body_callback(k, direction, stopped, false)?);
            }
        }
        let count = trailers.len();
        *self.trailers_mut(k, direction)? = trailers;
        let action = self.invoke(k, |vm, context| match direction {
            Direction::Request => vm.on_request_trailers(context, count),
            Direction::Response => vm.on_response_trailers(context, count),
        })?;
        self.record_action(k, direction.action_keys()[2], action.as_str());
        self.check_local_response()?;
        if !action.continues() && !self.take_continued(k, direction)? {
            self.settle(k, direction)?;
        }
        if self.stages[k].direction.held {
            out.push(self.headers_event(k, direction, false)?);
        }
        if !self.body_mut(k, direction)?.is_empty() {
            out.push(self.data_event(k, direction, false)?);
        }
        let trailers = self.trailers_mut(k, direction)?.clone();
        self.stages[k].direction.end_sent = true;
        out.push(Event::Trailers(trailers));
        Ok(out)
    }

    /// What stage `k`'s plugin holds of `direction`, passed on as it stands (the plugin is
    /// bypassed from now on).
    fn release_held(&mut self, k: usize, direction: Direction) -> Vec<Event> {
        let mut out = Vec::new();
        let state = std::mem::take(&mut self.stages[k].direction);
        let Ok(stream) = record(self.worker, &self.stages[k]) else {
            return out;
        };
        let (headers, body, trailers) = match direction {
            Direction::Request => (
                &stream.request_headers,
                &mut stream.request_body,
                &stream.request_trailers,
            ),
            Direction::Response => (
                &stream.response_headers,
                &mut stream.response_body,
                &stream.response_trailers,
            ),
        };
        let mut body = std::mem::take(body);
        for chunk in &state.stopped {
            body.extend_from_slice(chunk);
        }
        let body_end = state.ended && !state.trailers_arrived;
        if state.headers_arrived && !state.headers_sent {
            let end = state.headers_end;
            out.push(Event::Headers(headers.clone(), end));
            if end {
                return out;
            }
        }
        if !body.is_empty() || (body_end && !state.end_sent) {
            out.push(Event::Data(body, body_end));
        }
        if state.trailers_arrived && !state.end_sent {
            out.push(Event::Trailers(trailers.clone()));
        }
        out
    }

    /// Passes `event` to the plugin at `position` of `order`, and what it lets through on down
    /// the chain; past the last plugin, the event leaves the proxy.
    fn deliver(
        &mut self,
        direction: Direction,
        order: &[usize],
        position: usize,
        event: Event,
    ) -> Result<(), Stop> {
        let Some(&k) = order.get(position) else {
            self.leave(direction, event);
            return Ok(());
        };
        // A plugin whose VM had failed (fail closed) fails the stream at its request headers, as
        // Envoy's filter does.
        if self.stages[k].closed_at_admission
            && direction == Direction::Request
            && matches!(event, Event::Headers(..))
        {
            return Err(Stop::FailClosed(k));
        }
        let outputs = if self.stages[k].inactive {
            vec![event]
        } else {
            let handled = match event {
                Event::Headers(headers, end) => self.on_headers(k, direction, headers, end),
                Event::Data(chunk, end) => self.on_data(k, direction, chunk, end),
                Event::Trailers(trailers) => self.on_trailers(k, direction, trailers),
            };
            match handled {
                Ok(outputs) => outputs,
                // Only this plugin's callbacks fail here (`settle` deals with the others').
                Err(Stop::Failed(j, error)) => match self.fail(j, &error) {
                    OnFailure::FailClosed => return Err(Stop::FailClosed(j)),
                    OnFailure::FailOpen => self.release_held(k, direction),
                },
                Err(stop) => return Err(stop),
            }
        };
        for output in outputs {
            self.deliver(direction, order, position + 1, output)?;
        }
        Ok(())
    }

    /// An event leaving the proxy: the request upstream, the response downstream.
    fn leave(&mut self, direction: Direction, event: Event) {
        match (direction, event) {
            (Direction::Request, Event::Headers(headers, _)) => {
                self.report.request_headers = pairs(&headers);
                // The request goes to an upstream host now.
                for k in 0..self.stages.len() {
                    if let Ok(stream) = record(self.worker, &self.stages[k]) {
                        stream.info.upstream_address = Some(UPSTREAM_ADDRESS);
                    }
                }
            }
            (Direction::Request, Event::Data(chunk, _)) => self.bodies[0].extend_from_slice(&chunk),
            (Direction::Request, Event::Trailers(trailers)) => {
                self.report.request_trailers = pairs(&trailers)
            }
            (Direction::Response, Event::Headers(headers, _)) => {
                self.response_started = true;
                self.report.response_headers = pairs(&headers);
            }
            (Direction::Response, Event::Data(chunk, _)) => {
                for k in 0..self.stages.len() {
                    if let Ok(stream) = record(self.worker, &self.stages[k]) {
                        let sent = &mut stream.info.bytes_sent;
                        *sent = Some(sent.unwrap_or(0) + chunk.len() as u64);
                    }
                }
                self.bodies[1].extend_from_slice(&chunk);
            }
            (Direction::Response, Event::Trailers(trailers)) => {
                self.report.response_trailers = pairs(&trailers)
            }
        }
    }

    /// Runs `message` through the chain in `direction`.
    fn flow(&mut self, direction: Direction, message: Message) -> Result<(), Stop> {
        let order: Vec<usize> = match direction {
            Direction::Request => (0..self.stages.len()).collect(),
            Direction::Response => (0..self.stages.len()).rev().collect(),
        };
        for event in message.into_events() {
            self.deliver(direction, &order, 0, event)?;
        }
        Ok(())
    }

    /// Sets what every plugin's stream info says of the response.
    fn set_response_code(&mut self, code: Option<u32>, details: &str) {
        for k in 0..self.stages.len() {
            if let Ok(stream) = record(self.worker, &self.stages[k]) {
                stream.info.response_code = code;
                stream.info.response_code_details = Some(details.to_string());
            }
        }
    }

    /// The response to a local reply (from stage `k`, sent while the request or the response
    /// passed the chain).
    fn local_reply(
        &mut self,
        k: usize,
        reply: LocalResponse,
        grpc_request: bool,
        from_request: bool,
    ) -> Result<(), Stop> {
        self.set_response_code(Some(reply.status), &report_text(&reply.details));
        let response = Message::local_reply(&reply, grpc_request);
        self.local_reply = Some((k, reply));
        if from_request {
            // Nothing more of the request goes upstream; the reply passes every plugin's
            // response callbacks.
            for stage in 0..self.stages.len() {
                if let Ok(stream) = record(self.worker, &self.stages[stage]) {
                    stream.response_body.clear();
                }
            }
            self.report.response_headers.clear();
            self.bodies[1].clear();
            return match self.flow(Direction::Response, response) {
                // A plugin failing closed on the reply's way replaces it with its 503, sent
                // straight downstream (the response already passed plugins).
                Err(stop @ Stop::FailClosed(_)) => match self.reply_of(&stop) {
                    Some((j, failure)) => self.local_reply(j, failure, grpc_request, false),
                    None => Err(stop),
                },
                other => other,
            };
        }
        if self.response_started {
            // The response headers already went downstream: Envoy can only reset the stream.
            return Err(Stop::Reset);
        }
        // From the response path, before anything went downstream, the reply replaces the
        // response as it is (what on_log reads too).
        self.report.response_headers = pairs(&response.headers);
        self.bodies[1] = response.body.concat();
        self.report.response_trailers.clear();
        for stage in 0..self.stages.len() {
            if let Ok(stream) = record(self.worker, &self.stages[stage]) {
                stream.response_headers = response.headers.clone();
                stream.response_trailers = HeaderMap::new();
            }
        }
        Ok(())
    }

    /// How the exchange's stop at stage `k` is answered: a plugin's own local reply, or
    /// Envoy's 503 for a plugin failing the stream closed.
    fn reply_of(&mut self, stop: &Stop) -> Option<(usize, LocalResponse)> {
        match stop {
            Stop::LocalResponse(k) => {
                let reply = record(self.worker, &self.stages[*k])
                    .ok()?
                    .local_response
                    .clone()?;
                Some((*k, reply))
            }
            Stop::FailClosed(k) => Some((
                *k,
                LocalResponse {
                    status: 503,
                    body: Vec::new(),
                    headers: HeaderMap::new(),
                    grpc_status: Some(lifecycle::FAIL_STREAM_GRPC_STATUS),
                    details: lifecycle::fail_stream_details(
                        self.worker
                            .plugins()
                            .config(self.stages[*k].plugin)
                            .display_name(),
                    )
                    .into_bytes(),
                },
            )),
            _ => None,
        }
    }

    fn run(&mut self, exchange: &HttpExchange, grpc_request: bool) -> Result<(), Stop> {
        match self.flow(Direction::Request, Message::request(exchange)) {
            Ok(()) => {
                let response = Message::response(exchange);
                let code = response
                    .headers
                    .get(b":status")
                    .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok());
                self.set_response_code(code, "via_upstream");
                match self.flow(Direction::Response, response) {
                    Ok(()) => {}
                    Err(stop) => match self.reply_of(&stop) {
                        Some((k, reply)) => self.local_reply(k, reply, grpc_request, false)?,
                        None => return Err(stop),
                    },
                }
            }
            Err(stop) => match self.reply_of(&stop) {
                Some((k, reply)) => self.local_reply(k, reply, grpc_request, true)?,
                None => return Err(stop),
            },
        }
        self.answer_remaining();
        Ok(())
    }

    /// Calls nobody waited for still get their answers before the stream ends.
    fn answer_remaining(&mut self) {
        loop {
            let handles: Vec<Option<&StreamVm>> =
                self.stages.iter().map(|s| s.held_vm.as_ref()).collect();
            match self.callouts.answer_next(self.worker, &handles) {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err((j, error)) => {
                    self.fail(j, &error);
                }
            }
        }
    }
}

/// Why a plugin whose VM had failed before the stream gets no part in it.
fn admission_error(worker: &mut Worker, plugin: PluginId) -> String {
    match worker.copy_of(plugin) {
        Some((_, vm, _)) if vm.is_failed() => "the VM has failed".into(),
        Some(_) => "the plugin is not configured".into(),
        None => "the plugin's VM could not be made".into(),
    }
}

/// Runs `exchange` through the plugins of `chain` on `worker`.
pub(super) fn run_exchange(
    worker: &mut Worker,
    chain: &[PluginId],
    exchange: &HttpExchange,
    connection_id: u64,
    owners: &mut super::Owners,
) -> HttpReport {
    let names: Vec<String> = chain
        .iter()
        .map(|p| worker.plugins().config(*p).name.clone())
        .collect();
    let mut stages = Vec::new();
    for (plugin, name) in chain.iter().zip(&names) {
        let mut stage = Stage {
            plugin: *plugin,
            held_vm: None,
            context: ContextId(0),
            closed_at_admission: false,
            inactive: false,
            report: FilterReport {
                plugin: name.clone(),
                ..FilterReport::default()
            },
            direction: DirectionState::default(),
        };
        match worker.admit(*plugin) {
            Admission::Run(held) => {
                let created = worker
                    .vm(&held)
                    .map(|vm| vm.create_http_context_for(held.root()));
                let copy = held.copy();
                stage.held_vm = Some(held);
                match created {
                    Some(Ok(context)) => {
                        stage.context = context;
                        owners.insert((copy, context), *plugin);
                    }
                    Some(Err(error)) => {
                        stage.inactive = true;
                        stage.report.error = Some(error.to_string());
                        match worker.failed(*plugin, &error) {
                            OnFailure::FailClosed => stage.closed_at_admission = true,
                            OnFailure::FailOpen => stage.report.bypassed = true,
                        }
                    }
                    None => stage.inactive = true,
                }
            }
            Admission::FailClosed => {
                stage.inactive = true;
                stage.closed_at_admission = true;
                stage.report.error = Some(admission_error(worker, *plugin));
            }
            Admission::FailOpen => {
                stage.inactive = true;
                stage.report.bypassed = true;
                stage.report.error = Some(admission_error(worker, *plugin));
            }
        }
        stages.push(stage);
    }
    // Every plugin that takes part knows the stream from its start.
    for stage in &stages {
        if stage.inactive {
            continue;
        }
        let Some(vm) = stage.held_vm.as_ref().and_then(|h| worker.vm(h)) else {
            continue;
        };
        let start_time = vm.host().now();
        let stream = in_memory_host(vm).stream(stage.context);
        stream.info = super::connection_info(connection_id, start_time);
        stream.info.protocol = Some("HTTP/1.1".into());
        stream.info.route_name.clone_from(&exchange.route_name);
        stream.info.cluster_name.clone_from(&exchange.cluster_name);
    }
    let grpc_request = Message::request(exchange)
        .headers
        .get(b"content-type")
        .is_some_and(|v| v.starts_with(b"application/grpc"));
    let handles: Vec<Option<&StreamVm>> = stages.iter().map(|s| s.held_vm.as_ref()).collect();
    let callouts = Callouts::new(
        worker,
        &handles,
        &exchange.http_call_responses,
        &exchange.grpc_call_responses,
    );
    let mut run = Exchange {
        worker,
        stages,
        callouts,
        report: HttpReport::default(),
        bodies: [Vec::new(), Vec::new()],
        local_reply: None,
        response_started: false,
    };
    match run.run(exchange, grpc_request) {
        Ok(()) => {}
        Err(Stop::Stalled) => run.report.stalled = true,
        Err(Stop::Reset) => run.report.reset = true,
        // Handled where they arise.
        Err(Stop::LocalResponse(_) | Stop::Failed(..) | Stop::FailClosed(_)) => {}
    }
    finish(run, chain.len())
}

/// Ends the stream for every plugin and puts the report together.
fn finish(mut run: Exchange<'_, '_>, chain_length: usize) -> HttpReport {
    if let Some((k, reply)) = &run.local_reply {
        run.report.local_response = Some(LocalResponseReport {
            status: reply.status,
            headers: pairs(&reply.headers),
            body: report_text(&reply.body),
            details: report_text(&reply.details),
            grpc_status: reply.grpc_status,
            plugin: (chain_length > 1).then(|| run.stages[*k].report.plugin.clone()),
        });
    }
    let gave_up = run.callouts.gave_up();
    let unused_answers = run.callouts.unused_answers();
    let Exchange {
        worker,
        mut stages,
        callouts,
        mut report,
        bodies: [request_body, response_body],
        ..
    } = run;
    report.request_body = report_text(&request_body);
    report.response_body = report_text(&response_body);
    let handles: Vec<Option<&StreamVm>> = stages.iter().map(|s| s.held_vm.as_ref()).collect();
    let calls = callouts.reports(worker, &handles);
    for (stage, (http_calls, grpc_calls)) in stages.iter_mut().zip(calls) {
        stage.report.http_calls = http_calls;
        stage.report.grpc_calls = grpc_calls;
        let Some(held) = stage.held_vm.take() else {
            continue;
        };
        let failure = worker.vm(&held).and_then(|vm| end_stream(vm, stage));
        if let Some(error) = failure {
            stage.report.error.get_or_insert_with(|| error.to_string());
            worker.failed(stage.plugin, &error);
        }
        worker.release(held);
    }
    let mut filters: Vec<FilterReport> = stages.into_iter().map(|s| s.report).collect();
    report.error = filters.iter().find_map(|f| f.error.clone()).or(gave_up);
    report.warnings = unused_answers;
    if filters.len() == 1 {
        let only = filters.remove(0);
        report.actions = only.actions;
        report.http_calls = only.http_calls;
        report.grpc_calls = only.grpc_calls;
        report.filter_state = only.filter_state;
        report.route_cache_clears = only.route_cache_clears;
    } else {
        report.route_cache_clears = filters.iter().map(|f| f.route_cache_clears).sum();
        report.filters = filters;
    }
    report
}

/// The stream ends for one plugin: it logs it and lets go of it, even after a stall or a local
/// reply; the host forgets the stream. Returns the error if the VM failed meanwhile.
fn end_stream(vm: &mut Vm, stage: &mut Stage) -> Option<VmError> {
    let context = stage.context;
    let mut failure = None;
    if context != ContextId(0) {
        let now = vm.host().now();
        let stream = in_memory_host(vm).stream(context);
        stream.info.duration = stream
            .info
            .start_time
            .and_then(|start| now.duration_since(start).ok());
        stage.report.route_cache_clears = stream.route_cache_clears;
        if !vm.is_failed() {
            let ended = vm.on_log(context).and_then(|_| vm.on_done(context));
            stage.report.filter_state = FilterStateReport::of(vm.filter_state(context));
            failure = ended.and_then(|_| vm.on_delete(context)).err();
        }
    }
    in_memory_host(vm).streams.remove(&context);
    failure
}
