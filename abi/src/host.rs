//! What the embedding proxy provides: the [`Host`] trait.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use crate::{
    BufferType, ContextId, HeaderMap, Headers, LogLevel, MapType, Node, Status, StreamInfo,
    StreamType,
};

/// The time since the process's first reading of this clock.
pub(crate) fn system_monotonic() -> Duration {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(std::time::Instant::now).elapsed()
}

/// A property path as the plugin passed it: segments separated by NUL bytes, e.g.
/// `request\0path`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PropertyPath<'a>(pub &'a [u8]);

impl<'a> PropertyPath<'a> {
    /// The path's segments (a trailing NUL does not add an empty segment).
    pub fn segments(self) -> impl Iterator<Item = &'a [u8]> {
        let bytes = self.0.strip_suffix(b"\0").unwrap_or(self.0);
        bytes.split(|b| *b == 0)
    }

    /// The segments joined with `.` as text, e.g. `request.path`, for lookups and messages.
    pub fn dotted(self) -> String {
        let mut out = String::new();
        for (i, segment) in self.segments().enumerate() {
            if i > 0 {
                out.push('.');
            }
            out.push_str(&String::from_utf8_lossy(segment));
        }
        out
    }
}

/// A local reply a plugin asked the host to send instead of forwarding the request
/// (`proxy_send_local_response`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    /// The HTTP status code.
    pub status: u32,
    /// The status code details (Envoy's response code details).
    pub details: Vec<u8>,
    /// The response body.
    pub body: Vec<u8>,
    /// Extra response headers.
    pub headers: HeaderMap,
    /// The gRPC status, or `None` for a plain HTTP reply (the guest passes -1).
    pub grpc_status: Option<i32>,
}

/// An HTTP call a plugin asked the host to dispatch (`proxy_http_call`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpCallRequest {
    /// The upstream (cluster) name.
    pub upstream: Vec<u8>,
    /// Request headers, including pseudo-headers.
    pub headers: HeaderMap,
    /// Request body.
    pub body: Vec<u8>,
    /// Request trailers.
    pub trailers: HeaderMap,
    /// How long the host waits for the response; zero: no timeout (as in Envoy).
    pub timeout: Duration,
}

impl HttpCallRequest {
    /// Whether request header `name` (with `value`) belongs to the call's connection and
    /// framing, which a host sets itself and leaves out of a plugin's call: `connection`,
    /// `keep-alive`, `proxy-connection`, `transfer-encoding`, `upgrade`, and `te` but for
    /// `te: trailers` (which gRPC servers require). A plugin's `transfer-encoding` beside the
    /// host's own framing, for one, would make the upstream (or a pooled connection's next
    /// call) read the call wrongly.
    pub fn is_connection_header(name: &[u8], value: &[u8]) -> bool {
        const CONNECTION_HEADERS: [&[u8]; 6] = [
            b"connection",
            b"keep-alive",
            b"proxy-connection",
            b"transfer-encoding",
            b"te",
            b"upgrade",
        ];
        let trailers_wanted =
            name.eq_ignore_ascii_case(b"te") && value.eq_ignore_ascii_case(b"trailers");
        !trailers_wanted
            && CONNECTION_HEADERS
                .iter()
                .any(|own| name.eq_ignore_ascii_case(own))
    }
}

/// The response to an HTTP call, handed to the plugin's `proxy_on_http_call_response`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpCallResponse {
    /// Response headers (with `:status`).
    pub headers: HeaderMap,
    /// Response body.
    pub body: Vec<u8>,
    /// Response trailers.
    pub trailers: HeaderMap,
}

/// A gRPC call (`proxy_grpc_call`) or stream (`proxy_grpc_stream`) a plugin asked the host to
/// open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcRequest {
    /// The upstream (cluster) name.
    pub upstream: Vec<u8>,
    /// The gRPC service, e.g. `pwhost.Auth`.
    pub service: Vec<u8>,
    /// The method, e.g. `Check`.
    pub method: Vec<u8>,
    /// Initial metadata.
    pub initial_metadata: HeaderMap,
    /// The request message of a unary call; `None` for a stream.
    pub message: Option<Vec<u8>>,
    /// The timeout of a unary call; `None` for a stream.
    pub timeout: Option<Duration>,
}

/// What the embedding proxy provides to plugins: its view of each stream (headers, bodies,
/// properties), its actions (local replies, continuing streams, outgoing calls), time and logging.
///
/// One `Host` serves one VM; every method names the context the plugin is acting on (its
/// effective context), so the proxy maps ids to its own streams. Methods return `Option`/`Status`
/// for what may be missing or refused; the ABI turns those into the spec's status codes.
///
/// Header maps are the proxy's own, lent through [`Headers`] for each host call: the ABI reads
/// and edits them in place, with nothing copied into a map of pwhost's and back (see the crate
/// docs for a proxy-owned map). Bodies are byte vectors the ABI edits in place.
pub trait Host: Send + std::any::Any {
    /// A log line from the plugin.
    fn log(&mut self, context: ContextId, level: LogLevel, message: &str);

    /// The least severe level the host records; plugins skip formatting below it.
    fn log_level(&self) -> LogLevel {
        LogLevel::Trace
    }

    /// The wall-clock time (`proxy_get_current_time_nanoseconds`, WASI's realtime clock, the
    /// time attributes).
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    /// Time on a monotonic clock since an origin of the host's choosing (WASI's monotonic
    /// clock); by default the process's first reading.
    fn monotonic(&self) -> Duration {
        system_monotonic()
    }

    /// Fills `buffer` with random bytes (WASI's `random_get`); `false` if there are none to be
    /// had. By default the operating system's.
    fn fill_random(&mut self, buffer: &mut [u8]) -> bool {
        getrandom::fill(buffer).is_ok()
    }

    /// The VM just failed (a trap, a deadline, memory exhausted): it runs no more plugin code,
    /// and the answers to its calls could only fail again. Called once, inside the [`Vm`]
    /// method whose callback failed it, before that method returns the error, wherever the
    /// callback came from (a stream's, a tick, a queue notification, a call's answer, the
    /// module's start function while [`Vm::new`] runs). A host that started work for the
    /// plugin (calls without a timeout, gRPC streams) ends it here, and wakes whatever waits on
    /// the VM. It cannot reach the VM; a panic here is caught and logged.
    ///
    /// [`Vm`]: crate::Vm
    /// [`Vm::new`]: crate::Vm::new
    fn vm_failed(&mut self) {}

    /// A header map of a stream, or `None` if the stream has none. The ABI asks only for maps
    /// the plugin may reach at that moment (Envoy's rules: e.g. request headers until the
    /// plugin lets them go upstream, response trailers while it holds them), and refuses the
    /// plugin itself otherwise.
    fn header_map(&mut self, context: ContextId, map: MapType) -> Option<&mut dyn Headers>;

    /// A body or data buffer of a stream, or `None` if it has none. As for maps, the ABI asks
    /// only while the plugin holds that body or data.
    fn buffer(&mut self, context: ContextId, buffer: BufferType) -> Option<&mut Vec<u8>>;

    /// What the proxy knows of a stream or connection beyond its maps (addresses, connection
    /// id, times, sizes, response code, route and cluster), for Envoy's attributes; `None` if
    /// nothing. The ABI derives the rest (`request.path`, `response.headers`, ...) from the maps.
    fn stream_info(&mut self, _context: ContextId) -> Option<&StreamInfo> {
        None
    }

    /// The proxy's identity, for `xds.node` (`node.id`, `node.metadata`, ...); `None` if none.
    fn node(&self) -> Option<&Node> {
        None
    }

    /// A property the proxy answers itself, before Envoy's attributes (`proxy_get_property`),
    /// as the bytes the plugin receives; `None` to let the ABI answer. Properties a plugin sets
    /// are the ABI's (its filter state, see [`crate::Vm::filter_state`]).
    fn property(&mut self, _context: ContextId, _path: PropertyPath<'_>) -> Option<Cow<'_, [u8]>> {
        None
    }

    /// Sends a local reply on a stream instead of forwarding it. Called at most once per stream
    /// (the ABI ignores a plugin's later replies, as Envoy does) and never for a root context.
    /// A reply sent from a request callback goes out through the plugin's response callbacks, as
    /// Envoy sends it through the whole filter chain; one sent later replaces the response
    /// without them.
    fn send_local_response(&mut self, context: ContextId, response: LocalResponse) -> Status;

    /// Resumes a stream the plugin had paused (never called for a root context, nor for the
    /// upstream direction of a connection, which Envoy cannot resume).
    fn continue_stream(&mut self, context: ContextId, stream: StreamType) -> Status;

    /// Closes a stream (never called for a root context).
    fn close_stream(&mut self, context: ContextId, stream: StreamType) -> Status;

    /// Dispatches an HTTP call on behalf of a root context and returns its token; the proxy later
    /// delivers the response through [`crate::Vm::on_http_call_response`].
    fn http_call(&mut self, context: ContextId, request: HttpCallRequest) -> Result<u32, Status> {
        let _ = (context, request);
        Err(Status::Unimplemented)
    }

    /// Dispatches a unary gRPC call for a root context and returns its token; the proxy later
    /// delivers the reply through the `Vm::on_grpc_*` methods.
    fn grpc_call(&mut self, context: ContextId, request: GrpcRequest) -> Result<u32, Status> {
        let _ = (context, request);
        Err(Status::Unimplemented)
    }

    /// Opens a gRPC stream for a root context and returns its token.
    fn grpc_stream(&mut self, context: ContextId, request: GrpcRequest) -> Result<u32, Status> {
        let _ = (context, request);
        Err(Status::Unimplemented)
    }

    /// Sends a message on an open gRPC stream.
    fn grpc_send(
        &mut self,
        _context: ContextId,
        _token: u32,
        _message: &[u8],
        _end_of_stream: bool,
    ) -> Status {
        Status::NotFound
    }

    /// Cancels a gRPC call or stream: no more callbacks will come for it.
    fn grpc_cancel(&mut self, _context: ContextId, _token: u32) -> Status {
        Status::NotFound
    }

    /// Half-closes a gRPC stream (or cancels a call).
    fn grpc_close(&mut self, _context: ContextId, _token: u32) -> Status {
        Status::NotFound
    }

    /// Clears the route cache of an HTTP stream (ABI 0.1.0 `proxy_clear_route_cache`, and the
    /// foreign function `clear_route_cache` of 0.2.x). The plugin is always told `OK`.
    fn clear_route_cache(&mut self, _context: ContextId) {}

    /// The root context finished the asynchronous work it had pending when the host asked it to
    /// finish (`proxy_done`).
    fn done(&mut self, _context: ContextId) -> Status {
        Status::Ok
    }
}
