//! `http_headers`: header inspection and mutation.
//!
//! Request headers: logs every header at info as `request header: {k}: {v}`, adds
//! `x-pwhost-plugin: http_headers`, replaces `user-agent` with `pwhost-test` (only if present) and
//! removes `x-remove-me`. Response headers: adds `x-powered-by: pwhost` and removes `server`.
//! Response trailers: logs each as `response trailer: {k}: {v}` and adds
//! `x-pwhost-trailer: seen`; if the request had header `x-reset-at-trailers`, resets the stream
//! there instead. All return Continue. `on_log` logs `done: {path}` once (`done: {path}
//! (grpc-status {s})` when the response had a `grpc-status` trailer), reading `:path` from the
//! request headers — a host test should see the original path, i.e. request headers (and the
//! response trailers) must stay readable during `proxy_on_log`.

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(HttpHeadersRoot) });
}}

struct HttpHeadersRoot;

impl Context for HttpHeadersRoot {}

impl RootContext for HttpHeadersRoot {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(HttpHeaders {
            reset_at_trailers: false,
        }))
    }
}

struct HttpHeaders {
    reset_at_trailers: bool,
}

impl Context for HttpHeaders {}

impl HttpContext for HttpHeaders {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for (name, value) in &self.get_http_request_headers() {
            info!("request header: {}: {}", name, value);
        }
        self.add_http_request_header("x-pwhost-plugin", "http_headers");
        if self.get_http_request_header("user-agent").is_some() {
            self.set_http_request_header("user-agent", Some("pwhost-test"));
        }
        self.remove_http_request_header("x-remove-me");
        self.reset_at_trailers = self
            .get_http_request_header("x-reset-at-trailers")
            .is_some();
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.add_http_response_header("x-powered-by", "pwhost");
        self.remove_http_response_header("server");
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        for (name, value) in &self.get_http_response_trailers() {
            info!("response trailer: {}: {}", name, value);
        }
        if self.reset_at_trailers {
            info!("resetting the stream at its trailers");
            self.reset_http_response();
            return Action::Pause;
        }
        self.add_http_response_trailer("x-pwhost-trailer", "seen");
        Action::Continue
    }

    fn on_log(&mut self) {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        match self.get_http_response_trailer("grpc-status") {
            Some(status) => info!("done: {} (grpc-status {})", path, status),
            None => info!("done: {}", path),
        }
    }
}
