//! A complete in-memory [`Host`], for tests, benchmarks and `pwhost run`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::{
    BufferType, ContextId, GrpcRequest, HeaderMap, Headers, Host, HttpCallRequest, LocalResponse,
    LogLevel, MapType, Node, PropertyPath, Status, StreamInfo, StreamType,
};

/// One log line a plugin wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// Its level.
    pub level: LogLevel,
    /// The text.
    pub message: String,
    /// The context that was effective when it was written.
    pub context: ContextId,
}

/// Time and randomness that are the same on every run of the same plugin with the same
/// traffic: both clocks start at a fixed point and move [`Reproducible::TICK`] with every
/// reading (so a plugin waiting for time to pass is not stuck, and each run reads the same
/// times), and random bytes come from a seeded generator. For reports that can be compared
/// (across engines, or with a recorded one).
#[derive(Clone, Debug)]
pub struct Reproducible {
    /// The wall clock's first reading.
    pub start: SystemTime,
    readings: std::cell::Cell<u32>,
    random: fastrand::Rng,
}

impl Reproducible {
    /// How far both clocks move with each reading.
    pub const TICK: Duration = Duration::from_micros(1);

    /// Clocks from `start`, random bytes from `seed`.
    pub fn new(start: SystemTime, seed: u64) -> Reproducible {
        Reproducible {
            start,
            readings: std::cell::Cell::new(0),
            random: fastrand::Rng::with_seed(seed),
        }
    }

    /// The time since `start` at this reading.
    fn reading(&self) -> Duration {
        let reading = self.readings.get();
        self.readings.set(reading.saturating_add(1));
        Reproducible::TICK * reading
    }
}

/// Everything the host knows about one HTTP stream.
#[derive(Clone, Debug, Default)]
pub struct StreamRecord {
    /// Request headers (as the plugin left them).
    pub request_headers: HeaderMap,
    /// The request body the plugin currently sees (the current chunk plus anything buffered).
    pub request_body: Vec<u8>,
    /// Request trailers.
    pub request_trailers: HeaderMap,
    /// Response headers.
    pub response_headers: HeaderMap,
    /// The response body the plugin currently sees.
    pub response_body: Vec<u8>,
    /// Response trailers.
    pub response_trailers: HeaderMap,
    /// The local reply the plugin sent, if any.
    pub local_response: Option<LocalResponse>,
    /// `proxy_continue_stream` calls not yet acted upon.
    pub continued: Vec<StreamType>,
    /// `proxy_close_stream` calls.
    pub closed: Vec<StreamType>,
    /// What the proxy knows of the stream beyond its maps, for Envoy's attributes.
    pub info: StreamInfo,
    /// TCP data from downstream the plugin currently sees.
    pub downstream_data: Vec<u8>,
    /// TCP data from upstream the plugin currently sees.
    pub upstream_data: Vec<u8>,
    /// Route cache clears (`proxy_clear_route_cache` of ABI 0.1.0, the `clear_route_cache`
    /// foreign function of 0.2.x).
    pub route_cache_clears: u32,
}

/// A gRPC call or stream a plugin opened, and what it did with it since.
#[derive(Clone, Debug)]
pub struct GrpcRecord {
    /// The token returned to the plugin.
    pub token: u32,
    /// The context that opened it (the root context).
    pub context: ContextId,
    /// What was asked.
    pub request: GrpcRequest,
    /// Messages sent on a stream, with their end-of-stream flag.
    pub sent: Vec<(Vec<u8>, bool)>,
    /// Whether the plugin cancelled it.
    pub cancelled: bool,
    /// Whether the plugin closed it.
    pub closed: bool,
}

/// An HTTP call a plugin dispatched.
#[derive(Clone, Debug)]
pub struct DispatchedCall {
    /// The token returned to the plugin.
    pub token: u32,
    /// The context that dispatched it (the root context).
    pub context: ContextId,
    /// What was asked.
    pub request: HttpCallRequest,
}

/// A [`Host`] that keeps everything in memory and records what plugins do.
#[derive(Debug, Default)]
pub struct InMemoryHost {
    /// Streams by context id; a stream exists once the embedder adds it.
    pub streams: HashMap<ContextId, StreamRecord>,
    /// Log lines at or above `log_level`, in order.
    pub logs: Vec<LogRecord>,
    /// The least severe level recorded (reported by `proxy_get_log_level`).
    pub log_level: LogLevel,
    /// Properties answered as given (the bytes the plugin receives) before Envoy's attributes,
    /// for every context, by path as the plugin sends it: segments separated by NUL
    /// (`request\0path`).
    pub properties: HashMap<Vec<u8>, Vec<u8>>,
    /// The proxy's identity (`xds.node`).
    pub node: Option<Node>,
    /// HTTP calls dispatched, in order.
    pub http_calls: Vec<DispatchedCall>,
    /// gRPC calls and streams opened, in order.
    pub grpc_calls: Vec<GrpcRecord>,
    /// Root contexts that called `proxy_done`.
    pub done: Vec<ContextId>,
    /// Clocks and random bytes that are the same on every run, for reproducible reports;
    /// `None` uses the system's.
    pub reproducible: Option<Reproducible>,
    next_token: u32,
    /// Bytes of the messages in `logs` (counted again from 0 once `logs` is emptied, e.g. taken
    /// by its reader).
    log_bytes: usize,
    /// Lines not kept past [`InMemoryHost::MAX_LOG_BYTES`], counted in `logs`' last line (also
    /// from 0 once `logs` is emptied).
    lines_not_kept: u64,
}

impl InMemoryHost {
    /// The most bytes of log messages kept: past them a plugin logging in a loop would grow the
    /// host without bound, so later lines are counted in a last line saying so, not kept. Each
    /// line counts [`InMemoryHost::LOG_LINE_COST`] bytes beside its message, so that empty
    /// lines are bounded too.
    pub const MAX_LOG_BYTES: usize = 64 << 20;

    /// What a kept log line costs beside its message's bytes (its record, and its place in a
    /// report): at most a million lines are kept, however short.
    pub const LOG_LINE_COST: usize = 64;

    /// Records a gRPC call or stream and returns its token (tokens are shared with HTTP calls,
    /// so each is unique).
    fn open_grpc(&mut self, context: ContextId, request: GrpcRequest) -> u32 {
        self.next_token += 1;
        let token = self.next_token;
        self.grpc_calls.push(GrpcRecord {
            token,
            context,
            request,
            sent: Vec::new(),
            cancelled: false,
            closed: false,
        });
        token
    }

    /// An empty host that records every log level.
    pub fn new() -> Self {
        InMemoryHost::default()
    }

    /// The stream of `context`, created empty if needed.
    pub fn stream(&mut self, context: ContextId) -> &mut StreamRecord {
        self.streams.entry(context).or_default()
    }
}

impl Host for InMemoryHost {
    fn log(&mut self, context: ContextId, level: LogLevel, message: &str) {
        if level < self.log_level {
            return;
        }
        if self.logs.is_empty() {
            (self.log_bytes, self.lines_not_kept) = (0, 0);
        }
        let cost = message.len() + Self::LOG_LINE_COST;
        if self.lines_not_kept == 0 && self.log_bytes + cost <= Self::MAX_LOG_BYTES {
            self.log_bytes += cost;
            self.logs.push(LogRecord {
                level,
                message: message.to_string(),
                context,
            });
            return;
        }
        if self.lines_not_kept == 0 {
            self.logs.push(LogRecord {
                level: LogLevel::Warn,
                message: String::new(),
                context,
            });
        }
        self.lines_not_kept += 1;
        if let Some(last) = self.logs.last_mut() {
            last.message = format!(
                "pwhost: {} more log lines not kept (the log keeps at most {} MiB)",
                self.lines_not_kept,
                Self::MAX_LOG_BYTES >> 20
            );
        }
    }

    fn log_level(&self) -> LogLevel {
        self.log_level
    }

    fn now(&self) -> SystemTime {
        match &self.reproducible {
            Some(reproducible) => reproducible.start + reproducible.reading(),
            None => SystemTime::now(),
        }
    }

    fn monotonic(&self) -> Duration {
        match &self.reproducible {
            Some(reproducible) => reproducible.reading(),
            None => crate::host::system_monotonic(),
        }
    }

    fn fill_random(&mut self, buffer: &mut [u8]) -> bool {
        match &mut self.reproducible {
            Some(reproducible) => {
                reproducible.random.fill(buffer);
                true
            }
            None => getrandom::fill(buffer).is_ok(),
        }
    }

    fn header_map(&mut self, context: ContextId, map: MapType) -> Option<&mut dyn Headers> {
        let stream = self.streams.get_mut(&context)?;
        match map {
            MapType::HttpRequestHeaders => Some(&mut stream.request_headers),
            MapType::HttpRequestTrailers => Some(&mut stream.request_trailers),
            MapType::HttpResponseHeaders => Some(&mut stream.response_headers),
            MapType::HttpResponseTrailers => Some(&mut stream.response_trailers),
            _ => None,
        }
    }

    fn buffer(&mut self, context: ContextId, buffer: BufferType) -> Option<&mut Vec<u8>> {
        let stream = self.streams.get_mut(&context)?;
        match buffer {
            BufferType::HttpRequestBody => Some(&mut stream.request_body),
            BufferType::HttpResponseBody => Some(&mut stream.response_body),
            BufferType::DownstreamData => Some(&mut stream.downstream_data),
            BufferType::UpstreamData => Some(&mut stream.upstream_data),
            _ => None,
        }
    }

    fn stream_info(&mut self, context: ContextId) -> Option<&StreamInfo> {
        self.streams.get(&context).map(|stream| &stream.info)
    }

    fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    fn property(&mut self, _context: ContextId, path: PropertyPath<'_>) -> Option<Cow<'_, [u8]>> {
        let path = path.0.strip_suffix(b"\0").unwrap_or(path.0);
        self.properties.get(path).map(|v| Cow::Borrowed(&v[..]))
    }

    fn send_local_response(&mut self, context: ContextId, response: LocalResponse) -> Status {
        match self.streams.get_mut(&context) {
            Some(stream) => {
                stream.local_response = Some(response);
                Status::Ok
            }
            None => Status::NotFound,
        }
    }

    fn continue_stream(&mut self, context: ContextId, stream_type: StreamType) -> Status {
        match self.streams.get_mut(&context) {
            Some(stream) => {
                stream.continued.push(stream_type);
                Status::Ok
            }
            None => Status::NotFound,
        }
    }

    fn close_stream(&mut self, context: ContextId, stream_type: StreamType) -> Status {
        match self.streams.get_mut(&context) {
            Some(stream) => {
                stream.closed.push(stream_type);
                Status::Ok
            }
            None => Status::NotFound,
        }
    }

    fn http_call(&mut self, context: ContextId, request: HttpCallRequest) -> Result<u32, Status> {
        self.next_token += 1;
        let token = self.next_token;
        self.http_calls.push(DispatchedCall {
            token,
            context,
            request,
        });
        Ok(token)
    }

    fn grpc_call(&mut self, context: ContextId, request: GrpcRequest) -> Result<u32, Status> {
        Ok(self.open_grpc(context, request))
    }

    fn grpc_stream(&mut self, context: ContextId, request: GrpcRequest) -> Result<u32, Status> {
        Ok(self.open_grpc(context, request))
    }

    fn grpc_send(
        &mut self,
        _context: ContextId,
        token: u32,
        message: &[u8],
        end_of_stream: bool,
    ) -> Status {
        match self
            .grpc_calls
            .iter_mut()
            .find(|c| c.token == token && c.request.message.is_none())
        {
            Some(stream) if !stream.cancelled => {
                stream.sent.push((message.to_vec(), end_of_stream));
                Status::Ok
            }
            _ => Status::NotFound,
        }
    }

    fn grpc_cancel(&mut self, _context: ContextId, token: u32) -> Status {
        match self.grpc_calls.iter_mut().find(|c| c.token == token) {
            Some(call) => {
                call.cancelled = true;
                Status::Ok
            }
            None => Status::NotFound,
        }
    }

    fn grpc_close(&mut self, _context: ContextId, token: u32) -> Status {
        match self.grpc_calls.iter_mut().find(|c| c.token == token) {
            Some(call) => {
                call.closed = true;
                Status::Ok
            }
            None => Status::NotFound,
        }
    }

    fn clear_route_cache(&mut self, context: ContextId) {
        if let Some(stream) = self.streams.get_mut(&context) {
            stream.route_cache_clears += 1;
        }
    }

    fn done(&mut self, context: ContextId) -> Status {
        self.done.push(context);
        Status::Ok
    }
}
