//! The plugin traits, method for method as the proxy-wasm Rust SDK (0.2.5) defines them, so that
//! moving a plugin between Wasm and native is a change of `use` lines.

use std::time::{Duration, SystemTime};

use super::hostcalls;
use super::types::{
    Action, BufferType, Bytes, ContextType, GrpcStatusCode, LogLevel, MapType, PeerType, Status,
    StreamType,
};

/// What every context can do.
///
/// Unlike the Wasm SDK's, contexts must be `Send`: a native VM may move between threads.
pub trait Context: Send {
    /// The host's current time.
    fn get_current_time(&self) -> SystemTime {
        hostcalls::get_current_time()
    }

    /// A property, by path (`["request", "path"]`).
    fn get_property(&self, path: Vec<&str>) -> Option<Bytes> {
        hostcalls::get_property(&path)
    }

    /// Sets a property.
    fn set_property(&self, path: Vec<&str>, value: Option<&[u8]>) {
        hostcalls::set_property(&path, value)
    }

    /// Shared data and its CAS token.
    fn get_shared_data(&self, key: &str) -> (Option<Bytes>, Option<u32>) {
        hostcalls::get_shared_data(key)
    }

    /// Sets shared data if `cas` matches (or unconditionally without one).
    fn set_shared_data(
        &self,
        key: &str,
        value: Option<&[u8]>,
        cas: Option<u32>,
    ) -> Result<(), Status> {
        hostcalls::set_shared_data(key, value, cas)
    }

    /// Removes shared data if `cas` matches (or unconditionally without one).
    fn remove_shared_data(&self, key: &str, cas: Option<u32>) -> Result<(), Status> {
        hostcalls::set_shared_data(key, None, cas)
    }

    /// Registers a shared queue of this VM, returning its id.
    fn register_shared_queue(&self, name: &str) -> u32 {
        hostcalls::register_shared_queue(name).unwrap_or(0)
    }

    /// Finds the queue `name` of VM `vm_id`.
    fn resolve_shared_queue(&self, vm_id: &str, name: &str) -> Option<u32> {
        hostcalls::resolve_shared_queue(vm_id, name).ok().flatten()
    }

    /// Takes the next item of a queue (`Ok(None)` if it is empty).
    fn dequeue_shared_queue(&self, queue_id: u32) -> Result<Option<Bytes>, Status> {
        hostcalls::dequeue_shared_queue(queue_id)
    }

    /// Appends an item to a queue.
    fn enqueue_shared_queue(&self, queue_id: u32, value: Option<&[u8]>) -> Result<(), Status> {
        hostcalls::enqueue_shared_queue(queue_id, value)
    }

    /// Sends an HTTP request to `upstream`; the answer comes to `on_http_call_response`.
    fn dispatch_http_call(
        &self,
        upstream: &str,
        headers: Vec<(&str, &str)>,
        body: Option<&[u8]>,
        trailers: Vec<(&str, &str)>,
        timeout: Duration,
    ) -> Result<u32, Status> {
        hostcalls::dispatch_http_call(upstream, &headers, body, &trailers, timeout)
    }

    /// The answer to `dispatch_http_call` (headers, body and trailers are readable meanwhile).
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        _num_headers: usize,
        _body_size: usize,
        _num_trailers: usize,
    ) {
    }

    /// The HTTP call response's headers.
    fn get_http_call_response_headers(&self) -> Vec<(String, String)> {
        hostcalls::get_map(MapType::HttpCallResponseHeaders)
    }

    /// The HTTP call response's headers, values as bytes.
    fn get_http_call_response_headers_bytes(&self) -> Vec<(String, Bytes)> {
        hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders)
    }

    /// One HTTP call response header.
    fn get_http_call_response_header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpCallResponseHeaders, name).map(hostcalls::into_string)
    }

    /// One HTTP call response header, as bytes.
    fn get_http_call_response_header_bytes(&self, name: &str) -> Option<Bytes> {
        hostcalls::get_map_value(MapType::HttpCallResponseHeaders, name)
    }

    /// The HTTP call response's body.
    fn get_http_call_response_body(&self, start: usize, max_size: usize) -> Option<Bytes> {
        hostcalls::buffer(BufferType::HttpCallResponseBody, start, max_size)
    }

    /// The HTTP call response's trailers.
    fn get_http_call_response_trailers(&self) -> Vec<(String, String)> {
        hostcalls::get_map(MapType::HttpCallResponseTrailers)
    }

    /// The HTTP call response's trailers, values as bytes.
    fn get_http_call_response_trailers_bytes(&self) -> Vec<(String, Bytes)> {
        hostcalls::get_map_bytes(MapType::HttpCallResponseTrailers)
    }

    /// One HTTP call response trailer.
    fn get_http_call_response_trailer(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpCallResponseTrailers, name)
            .map(hostcalls::into_string)
    }

    /// One HTTP call response trailer, as bytes.
    fn get_http_call_response_trailer_bytes(&self, name: &str) -> Option<Bytes> {
        hostcalls::get_map_value(MapType::HttpCallResponseTrailers, name)
    }

    /// Sends a unary gRPC request; the answer comes to `on_grpc_call_response`.
    fn dispatch_grpc_call(
        &self,
        upstream_name: &str,
        service_name: &str,
        method_name: &str,
        initial_metadata: Vec<(&str, &[u8])>,
        message: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, Status> {
        hostcalls::dispatch_grpc_call(
            upstream_name,
            service_name,
            method_name,
            &initial_metadata,
            message,
            timeout,
        )
    }

    /// The answer to `dispatch_grpc_call`: status 0 with the reply's size, or a failure status
    /// (read its message with [`Context::get_grpc_status`]) and size 0.
    fn on_grpc_call_response(&mut self, _token_id: u32, _status_code: u32, _response_size: usize) {}

    /// The gRPC reply's message.
    fn get_grpc_call_response_body(&self, start: usize, max_size: usize) -> Option<Bytes> {
        hostcalls::buffer(BufferType::GrpcReceiveBuffer, start, max_size)
    }

    /// Cancels a gRPC call: no callback comes for it.
    fn cancel_grpc_call(&self, token_id: u32) {
        let _ = hostcalls::cancel_grpc_call(token_id);
    }

    /// Opens a gRPC stream; what arrives comes to the `on_grpc_stream_*` callbacks.
    fn open_grpc_stream(
        &self,
        cluster_name: &str,
        service_name: &str,
        method_name: &str,
        initial_metadata: Vec<(&str, &[u8])>,
    ) -> Result<u32, Status> {
        hostcalls::open_grpc_stream(cluster_name, service_name, method_name, &initial_metadata)
    }

    /// A gRPC stream's initial metadata arrived.
    fn on_grpc_stream_initial_metadata(&mut self, _token_id: u32, _num_elements: u32) {}

    /// The gRPC stream's initial metadata.
    fn get_grpc_stream_initial_metadata(&self) -> Vec<(String, Bytes)> {
        hostcalls::get_map_bytes(MapType::GrpcReceiveInitialMetadata)
    }

    /// One value of the gRPC stream's initial metadata.
    fn get_grpc_stream_initial_metadata_value(&self, name: &str) -> Option<Bytes> {
        hostcalls::get_map_value(MapType::GrpcReceiveInitialMetadata, name)
    }

    /// Sends a message on a gRPC stream, and with `end_stream` half-closes it.
    fn send_grpc_stream_message(&self, token_id: u32, message: Option<&[u8]>, end_stream: bool) {
        let _ = hostcalls::send_grpc_stream_message(token_id, message, end_stream);
    }

    /// A message arrived on a gRPC stream.
    fn on_grpc_stream_message(&mut self, _token_id: u32, _message_size: usize) {}

    /// The gRPC stream message that arrived.
    fn get_grpc_stream_message(&mut self, start: usize, max_size: usize) -> Option<Bytes> {
        hostcalls::buffer(BufferType::GrpcReceiveBuffer, start, max_size)
    }

    /// A gRPC stream's trailing metadata arrived.
    fn on_grpc_stream_trailing_metadata(&mut self, _token_id: u32, _num_elements: u32) {}

    /// The gRPC stream's trailing metadata.
    fn get_grpc_stream_trailing_metadata(&self) -> Vec<(String, Bytes)> {
        hostcalls::get_map_bytes(MapType::GrpcReceiveTrailingMetadata)
    }

    /// One value of the gRPC stream's trailing metadata.
    fn get_grpc_stream_trailing_metadata_value(&self, name: &str) -> Option<Bytes> {
        hostcalls::get_map_value(MapType::GrpcReceiveTrailingMetadata, name)
    }

    /// Cancels a gRPC stream: no more callbacks come for it.
    fn cancel_grpc_stream(&self, token_id: u32) {
        let _ = hostcalls::cancel_grpc_stream(token_id);
    }

    /// Half-closes a gRPC stream from this side.
    fn close_grpc_stream(&self, token_id: u32) {
        let _ = hostcalls::close_grpc_stream(token_id);
    }

    /// A gRPC stream closed with `status_code`.
    fn on_grpc_stream_close(&mut self, _token_id: u32, _status_code: u32) {}

    /// The status of the last gRPC reply: code and message.
    fn get_grpc_status(&self) -> (u32, Option<String>) {
        hostcalls::get_grpc_status()
    }

    /// The host called foreign function `function_id` of this plugin; the arguments are the
    /// `CallData` buffer.
    fn on_foreign_function(&mut self, _function_id: u32, _arguments_size: usize) {}

    /// Calls a host-registered foreign function.
    fn call_foreign_function(
        &self,
        function_name: &str,
        arguments: Option<&[u8]>,
    ) -> Result<Option<Bytes>, Status> {
        hostcalls::call_foreign_function(function_name, arguments)
    }

    /// The host asks the context to finish; `false` defers until [`Context::done`].
    fn on_done(&mut self) -> bool {
        true
    }

    /// Tells the host a deferred `on_done` has finished.
    fn done(&self) {
        let _ = hostcalls::done();
    }
}

/// The per-plugin context: configuration, timers and the factory of stream contexts.
pub trait RootContext: Context {
    /// The VM started; `false` rejects the VM configuration.
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        true
    }

    /// The VM configuration.
    fn get_vm_configuration(&self) -> Option<Bytes> {
        hostcalls::buffer(BufferType::VmConfiguration, 0, usize::MAX)
    }

    /// The plugin is configured; `false` rejects the configuration.
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        true
    }

    /// The plugin configuration.
    fn get_plugin_configuration(&self) -> Option<Bytes> {
        hostcalls::buffer(BufferType::PluginConfiguration, 0, usize::MAX)
    }

    /// Asks for `on_tick` every `period` (zero stops it).
    fn set_tick_period(&self, period: Duration) {
        hostcalls::set_tick_period(period)
    }

    /// A timer tick.
    fn on_tick(&mut self) {}

    /// A shared queue of this VM has items.
    fn on_queue_ready(&mut self, _queue_id: u32) {}

    /// The root context's log callback.
    fn on_log(&mut self) {}

    /// Creates the context of a new HTTP stream.
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        None
    }

    /// Creates the context of a new TCP connection.
    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        None
    }

    /// Which kind of stream contexts this root creates.
    fn get_type(&self) -> Option<ContextType> {
        None
    }
}

/// A TCP connection.
pub trait StreamContext: Context {
    /// A new connection.
    fn on_new_connection(&mut self) -> Action {
        Action::Continue
    }

    /// Data from downstream.
    fn on_downstream_data(&mut self, _data_size: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }

    /// The downstream data buffered so far.
    fn get_downstream_data(&self, start: usize, max_size: usize) -> Option<Bytes> {
        hostcalls::buffer(BufferType::DownstreamData, start, max_size)
    }

    /// Replaces `size` bytes of downstream data at `start`.
    fn set_downstream_data(&self, start: usize, size: usize, value: &[u8]) {
        hostcalls::set_buffer(BufferType::DownstreamData, start, size, value)
    }

    /// Resumes a paused downstream.
    fn resume_downstream(&self) {
        let _ = hostcalls::continue_stream(StreamType::Downstream);
    }

    /// Closes the downstream.
    fn close_downstream(&self) {
        let _ = hostcalls::close_stream(StreamType::Downstream);
    }

    /// Downstream closed.
    fn on_downstream_close(&mut self, _peer_type: PeerType) {}

    /// Data from upstream.
    fn on_upstream_data(&mut self, _data_size: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }

    /// The upstream data buffered so far.
    fn get_upstream_data(&self, start: usize, max_size: usize) -> Option<Bytes> {
        hostcalls::buffer(BufferType::UpstreamData, start, max_size)
    }

    /// Replaces `size` bytes of upstream data at `start`.
    fn set_upstream_data(&self, start: usize, size: usize, value: &[u8]) {
        hostcalls::set_buffer(BufferType::UpstreamData, start, size, value)
    }

    /// Resumes a paused upstream.
    fn resume_upstream(&self) {
        let _ = hostcalls::continue_stream(StreamType::Upstream);
    }

    /// Closes the upstream.
    fn close_upstream(&self) {
        let _ = hostcalls::close_stream(StreamType::Upstream);
    }

    /// Upstream closed.
    fn on_upstream_close(&mut self, _peer_type: PeerType) {}

    /// The connection is over.
    fn on_log(&mut self) {}
}

macro_rules! header_methods {
    (
        $map:expr,
        $get_all:ident, $get_all_bytes:ident, $set_all:ident, $set_all_bytes:ident,
        $get:ident, $get_bytes:ident, $set:ident, $set_bytes:ident,
        $add:ident, $add_bytes:ident, $remove:ident
    ) => {
        #[doc = concat!("All pairs of `", stringify!($map), "`.")]
        fn $get_all(&self) -> Vec<(String, String)> {
            hostcalls::get_map($map)
        }

        #[doc = concat!("All pairs of `", stringify!($map), "`, values as bytes.")]
        fn $get_all_bytes(&self) -> Vec<(String, Bytes)> {
            hostcalls::get_map_bytes($map)
        }

        #[doc = concat!("Replaces all pairs of `", stringify!($map), "`.")]
        fn $set_all(&self, pairs: Vec<(&str, &str)>) {
            let pairs: Vec<(&str, &[u8])> = pairs.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
            hostcalls::set_map($map, &pairs)
        }

        #[doc = concat!("Replaces all pairs of `", stringify!($map), "`, values as bytes.")]
        fn $set_all_bytes(&self, pairs: Vec<(&str, &[u8])>) {
            hostcalls::set_map($map, &pairs)
        }

        #[doc = concat!("One value of `", stringify!($map), "`.")]
        fn $get(&self, name: &str) -> Option<String> {
            hostcalls::get_map_value($map, name).map(hostcalls::into_string)
        }

        #[doc = concat!("One value of `", stringify!($map), "`, as bytes.")]
        fn $get_bytes(&self, name: &str) -> Option<Bytes> {
            hostcalls::get_map_value($map, name)
        }

        #[doc = concat!("Replaces (or with `None` removes) a value of `", stringify!($map), "`.")]
        fn $set(&self, name: &str, value: Option<&str>) {
            hostcalls::set_map_value($map, name, value.map(str::as_bytes))
        }

        #[doc = concat!("Replaces (or with `None` removes) a value of `", stringify!($map), "`, as bytes.")]
        fn $set_bytes(&self, name: &str, value: Option<&[u8]>) {
            hostcalls::set_map_value($map, name, value)
        }

        #[doc = concat!("Adds a value to `", stringify!($map), "`.")]
        fn $add(&self, name: &str, value: &str) {
            hostcalls::add_map_value($map, name, value.as_bytes())
        }

        #[doc = concat!("Adds a value to `", stringify!($map), "`, as bytes.")]
        fn $add_bytes(&self, name: &str, value: &[u8]) {
            hostcalls::add_map_value($map, name, value)
        }

        #[doc = concat!("Removes a name from `", stringify!($map), "`.")]
        fn $remove(&self, name: &str) {
            hostcalls::set_map_value($map, name, None)
        }
    };
}

/// An HTTP stream.
pub trait HttpContext: Context {
    /// Request headers arrived.
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }

    header_methods!(
        MapType::HttpRequestHeaders,
        get_http_request_headers,
        get_http_request_headers_bytes,
        set_http_request_headers,
        set_http_request_headers_bytes,
        get_http_request_header,
        get_http_request_header_bytes,
        set_http_request_header,
        set_http_request_header_bytes,
        add_http_request_header,
        add_http_request_header_bytes,
        remove_http_request_header
    );

    /// A request body chunk arrived.
    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }

    /// The request body buffered so far.
    fn get_http_request_body(&self, start: usize, max_size: usize) -> Option<Bytes> {
        hostcalls::buffer(BufferType::HttpRequestBody, start, max_size)
    }

    /// Replaces `size` bytes of the request body at `start`.
    fn set_http_request_body(&self, start: usize, size: usize, value: &[u8]) {
        hostcalls::set_buffer(BufferType::HttpRequestBody, start, size, value)
    }

    /// Request trailers arrived.
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        Action::Continue
    }

    header_methods!(
        MapType::HttpRequestTrailers,
        get_http_request_trailers,
        get_http_request_trailers_bytes,
        set_http_request_trailers,
        set_http_request_trailers_bytes,
        get_http_request_trailer,
        get_http_request_trailer_bytes,
        set_http_request_trailer,
        set_http_request_trailer_bytes,
        add_http_request_trailer,
        add_http_request_trailer_bytes,
        remove_http_request_trailer
    );

    /// Resumes a paused request.
    fn resume_http_request(&self) {
        let _ = hostcalls::continue_stream(StreamType::HttpRequest);
    }

    /// Resets the request.
    fn reset_http_request(&self) {
        let _ = hostcalls::close_stream(StreamType::HttpRequest);
    }

    /// Response headers arrived.
    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }

    header_methods!(
        MapType::HttpResponseHeaders,
        get_http_response_headers,
        get_http_response_headers_bytes,
        set_http_response_headers,
        set_http_response_headers_bytes,
        get_http_response_header,
        get_http_response_header_bytes,
        set_http_response_header,
        set_http_response_header_bytes,
        add_http_response_header,
        add_http_response_header_bytes,
        remove_http_response_header
    );

    /// A response body chunk arrived.
    fn on_http_response_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }

    /// The response body buffered so far.
    fn get_http_response_body(&self, start: usize, max_size: usize) -> Option<Bytes> {
        hostcalls::buffer(BufferType::HttpResponseBody, start, max_size)
    }

    /// Replaces `size` bytes of the response body at `start`.
    fn set_http_response_body(&self, start: usize, size: usize, value: &[u8]) {
        hostcalls::set_buffer(BufferType::HttpResponseBody, start, size, value)
    }

    /// Response trailers arrived.
    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        Action::Continue
    }

    header_methods!(
        MapType::HttpResponseTrailers,
        get_http_response_trailers,
        get_http_response_trailers_bytes,
        set_http_response_trailers,
        set_http_response_trailers_bytes,
        get_http_response_trailer,
        get_http_response_trailer_bytes,
        set_http_response_trailer,
        set_http_response_trailer_bytes,
        add_http_response_trailer,
        add_http_response_trailer_bytes,
        remove_http_response_trailer
    );

    /// Resumes a paused response.
    fn resume_http_response(&self) {
        let _ = hostcalls::continue_stream(StreamType::HttpResponse);
    }

    /// Resets the response.
    fn reset_http_response(&self) {
        let _ = hostcalls::close_stream(StreamType::HttpResponse);
    }

    /// Answers the request locally instead of forwarding it.
    fn send_http_response(
        &self,
        status_code: u32,
        headers: Vec<(&str, &str)>,
        body: Option<&[u8]>,
    ) {
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        // -1: not a gRPC response.
        let _ = hostcalls::send_http_response(status_code, &headers, body, -1);
    }

    /// Answers the request locally with a gRPC status (HTTP 200; as the SDK, the message is the
    /// body).
    fn send_grpc_response(
        &self,
        grpc_status: GrpcStatusCode,
        grpc_status_message: Option<&str>,
        custom_metadata: Vec<(&str, &[u8])>,
    ) {
        let _ = hostcalls::send_http_response(
            200,
            &custom_metadata,
            grpc_status_message.map(str::as_bytes),
            grpc_status as i32,
        );
    }

    /// The stream is over.
    fn on_log(&mut self) {}
}

/// Sets the least level the host passes on (the SDK's `set_log_level`); see [`super::logger`].
pub fn set_log_level(level: LogLevel) {
    super::logger::set_log_level(level)
}
