//! The spec's enumerations and small value types.

use std::fmt;

/// A Proxy-Wasm status code (`proxy_status_t`), returned by every host function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// The call succeeded.
    Ok = 0,
    /// The requested item does not exist.
    NotFound = 1,
    /// An argument is invalid (unknown enum value, malformed data).
    BadArgument = 2,
    /// A value could not be serialized.
    SerializationFailure = 3,
    /// A value could not be parsed.
    ParseFailure = 4,
    /// An expression could not be evaluated (Envoy's `BadExpression`).
    BadExpression = 5,
    /// A pointer/length pair does not lie inside guest memory.
    InvalidMemoryAccess = 6,
    /// There is nothing to return (e.g. an empty queue).
    Empty = 7,
    /// A compare-and-swap did not match.
    CasMismatch = 8,
    /// A result did not match what was expected (Envoy's `ResultMismatch`).
    ResultMismatch = 9,
    /// The host failed.
    InternalFailure = 10,
    /// A connection failed: what `proxy_get_status` reports after an HTTP call failed.
    BrokenConnection = 11,
    /// The host does not implement this call.
    Unimplemented = 12,
}

impl Status {
    /// The status as the guest sees it.
    pub const fn code(self) -> u32 {
        self as u32
    }
}

impl From<runtime_api::MemoryAccessError> for Status {
    fn from(_: runtime_api::MemoryAccessError) -> Self {
        Status::InvalidMemoryAccess
    }
}

/// The id of a root, HTTP stream or TCP connection context, as the host assigns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContextId(pub u32);

impl fmt::Display for ContextId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

macro_rules! spec_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)*
        }

        impl $name {
            /// The value for a raw guest argument, or `None` if the spec defines no such value.
            pub fn from_raw(raw: u64) -> Option<Self> {
                match raw {
                    $($value => Some($name::$variant),)*
                    _ => None,
                }
            }

            /// The spec's snake_case name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

spec_enum! {
    /// Log levels (`proxy_log_level_t`).
    LogLevel {
        /// Trace.
        Trace = 0 => "trace",
        /// Debug.
        Debug = 1 => "debug",
        /// Info.
        Info = 2 => "info",
        /// Warning.
        Warn = 3 => "warn",
        /// Error.
        Error = 4 => "error",
        /// Critical.
        Critical = 5 => "critical",
    }
}

impl Default for LogLevel {
    /// Everything is logged unless the host says otherwise.
    fn default() -> Self {
        LogLevel::Trace
    }
}

spec_enum! {
    /// Header/metadata maps (`proxy_map_type_t`).
    MapType {
        /// HTTP request headers.
        HttpRequestHeaders = 0 => "http_request_headers",
        /// HTTP request trailers.
        HttpRequestTrailers = 1 => "http_request_trailers",
        /// HTTP response headers.
        HttpResponseHeaders = 2 => "http_response_headers",
        /// HTTP response trailers.
        HttpResponseTrailers = 3 => "http_response_trailers",
        /// gRPC receive initial metadata.
        GrpcReceiveInitialMetadata = 4 => "grpc_receive_initial_metadata",
        /// gRPC receive trailing metadata.
        GrpcReceiveTrailingMetadata = 5 => "grpc_receive_trailing_metadata",
        /// Headers of an HTTP call's response.
        HttpCallResponseHeaders = 6 => "http_call_response_headers",
        /// Trailers of an HTTP call's response.
        HttpCallResponseTrailers = 7 => "http_call_response_trailers",
    }
}

spec_enum! {
    /// Buffers (`proxy_buffer_type_t`).
    BufferType {
        /// HTTP request body.
        HttpRequestBody = 0 => "http_request_body",
        /// HTTP response body.
        HttpResponseBody = 1 => "http_response_body",
        /// Data received from downstream (TCP).
        DownstreamData = 2 => "downstream_data",
        /// Data received from upstream (TCP).
        UpstreamData = 3 => "upstream_data",
        /// Body of an HTTP call's response.
        HttpCallResponseBody = 4 => "http_call_response_body",
        /// A gRPC message received.
        GrpcReceiveBuffer = 5 => "grpc_receive_buffer",
        /// The VM configuration.
        VmConfiguration = 6 => "vm_configuration",
        /// The plugin configuration.
        PluginConfiguration = 7 => "plugin_configuration",
        /// Arguments of a foreign function call.
        CallData = 8 => "call_data",
    }
}

spec_enum! {
    /// Which side closed a connection (`proxy_peer_type_t`).
    PeerType {
        /// Unknown.
        Unknown = 0 => "unknown",
        /// This proxy.
        Local = 1 => "local",
        /// The remote peer.
        Remote = 2 => "remote",
    }
}

spec_enum! {
    /// Streams (`proxy_stream_type_t`).
    StreamType {
        /// The HTTP request.
        HttpRequest = 0 => "http_request",
        /// The HTTP response.
        HttpResponse = 1 => "http_response",
        /// Downstream TCP data.
        Downstream = 2 => "downstream",
        /// Upstream TCP data.
        Upstream = 3 => "upstream",
    }
}

/// What the host does after a header or trailer callback (Envoy's `FilterHeadersStatus` and
/// `FilterTrailersStatus`), decided from the plugin's return value as proxy-wasm-cpp-host and
/// Envoy decide it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeadersAction {
    /// Continue processing.
    Continue,
    /// Stop until the plugin continues the stream (`StopIteration`, the SDKs' `Pause`); later
    /// body chunks and trailers still reach the plugin. From a header callback only when the
    /// embedder allows it ([`crate::PluginConfig::allow_on_headers_stop_iteration`]); from a
    /// trailers callback always.
    Pause,
    /// Stop, buffering the body until the plugin continues (`StopAllIterationAndBuffer`).
    StopAllAndBuffer,
    /// Stop, buffering with flow control until the plugin continues
    /// (`StopAllIterationAndWatermark`): no body or trailer callbacks meanwhile.
    StopAllAndWatermark,
}

impl HeadersAction {
    /// The action for a header callback's return value `raw`. As in Envoy: `StopIteration` (1)
    /// becomes `StopAllIterationAndWatermark` unless `allow_stop_iteration` (proxy-wasm-cpp-host
    /// #143); `ContinueAndEndStream` (2) continues; values above 4 stop everything.
    pub fn from_headers_callback(raw: u64, allow_stop_iteration: bool) -> Self {
        match raw {
            0 | 2 => HeadersAction::Continue,
            1 if allow_stop_iteration => HeadersAction::Pause,
            3 => HeadersAction::StopAllAndBuffer,
            _ => HeadersAction::StopAllAndWatermark,
        }
    }

    /// The action for a trailers callback's return value: 0 continues, anything else stops.
    pub fn from_trailers_callback(raw: u64) -> Self {
        if raw == 0 {
            HeadersAction::Continue
        } else {
            HeadersAction::Pause
        }
    }

    /// Whether the host forwards the headers now.
    pub fn continues(self) -> bool {
        self == HeadersAction::Continue
    }

    /// A short name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            HeadersAction::Continue => "continue",
            HeadersAction::Pause => "pause",
            HeadersAction::StopAllAndBuffer => "stop_all_and_buffer",
            HeadersAction::StopAllAndWatermark => "stop_all_and_watermark",
        }
    }
}

/// What the host does after a body or data callback (`FilterDataStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataAction {
    /// Forward the data (and anything buffered before it).
    Continue,
    /// Keep the data, and hand it back with the next chunk (`StopIterationAndBuffer`, the SDKs'
    /// `Pause`).
    StopAndBuffer,
    /// As `StopAndBuffer`, with flow control.
    StopAndWatermark,
    /// Stop without buffering: the chunk is dropped from the plugin's view.
    StopNoBuffer,
}

impl DataAction {
    /// The action for an HTTP body callback's return value: values above 3 stop without
    /// buffering, as in proxy-wasm-cpp-host.
    pub fn from_body_callback(raw: u64) -> Self {
        match raw {
            0 => DataAction::Continue,
            1 => DataAction::StopAndBuffer,
            2 => DataAction::StopAndWatermark,
            _ => DataAction::StopNoBuffer,
        }
    }

    /// The action for a TCP callback's return value: 0 continues; anything else stops, and the
    /// connection keeps the data for the next callback (Envoy's network `StopIteration`).
    pub fn from_network_callback(raw: u64) -> Self {
        if raw == 0 {
            DataAction::Continue
        } else {
            DataAction::StopAndBuffer
        }
    }

    /// A short name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            DataAction::Continue => "continue",
            DataAction::StopAndBuffer => "pause",
            DataAction::StopAndWatermark => "stop_and_watermark",
            DataAction::StopNoBuffer => "stop_no_buffer",
        }
    }
}
