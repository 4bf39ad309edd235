//! The SDK's types, as the proxy-wasm Rust SDK names them.

pub use abi::{BufferType, LogLevel, MapType, MetricType, PeerType, Status, StreamType};

/// Bytes returned by the host.
pub type Bytes = Vec<u8>;

/// What the host does after a stream callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Action {
    /// Go on with the stream.
    Continue = 0,
    /// Hold the stream until the plugin resumes it.
    Pause = 1,
}

/// Which kind of stream contexts a root context creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextType {
    /// HTTP streams ([`super::HttpContext`]).
    HttpContext,
    /// TCP streams ([`super::StreamContext`]).
    StreamContext,
}

/// Creates the root context for a context id.
pub type NewRootContext = fn(context_id: u32) -> Box<dyn super::RootContext>;

/// Creates the context of an HTTP stream without a root context's help.
pub type NewHttpContext = fn(context_id: u32, root_context_id: u32) -> Box<dyn super::HttpContext>;

/// A gRPC status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
#[allow(missing_docs)]
pub enum GrpcStatusCode {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}
