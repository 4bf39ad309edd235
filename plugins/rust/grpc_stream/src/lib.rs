//! `grpc_stream`: streaming gRPC callout (`proxy_grpc_stream`, `proxy_grpc_send`,
//! `proxy_on_grpc_receive_initial_metadata`, `proxy_on_grpc_receive`,
//! `proxy_on_grpc_receive_trailing_metadata`, `proxy_on_grpc_close`).
//!
//! On request headers, opens a stream to `pwhost.Echo/Stream` on upstream `grpc_cluster` (no
//! initial metadata), logs `opened grpc stream: token <token>`, sends one message `hello`
//! (end_stream = false; true with request header `x-last`, which ends the plugin's side of the
//! stream with it) and returns Pause. If opening fails it sends a local 503 with body
//! `grpc stream failed: <Status as Debug>`.
//!
//! Callbacks (info logs, exact text):
//! - initial metadata: `initial metadata x-init: <value>` (value of `x-init`, UTF-8 lossy;
//!   `<missing>` when absent);
//! - each message: `stream message: <message as UTF-8, lossy>`;
//! - trailing metadata: `trailing metadata count <n>` (the element count the host passed);
//! - close(token, status): adds request header `x-stream-status: <status>` (decimal gRPC status)
//!   and resumes the request — the forwarded request carries the header.
//!
//! A request with `x-flood: <n>` opens `pwhost.Echo/Hold` instead and sends `n` messages of
//! 1 MiB once the stream's initial metadata came (the upstream answered), to test how a host
//! bounds what a plugin sends faster than the upstream takes it.
//!
//! A request with `x-cancel: <n>` opens `pwhost.Echo/Hold` too and, once the initial metadata
//! came, sends `n` messages `queued` and cancels the stream (`proxy_grpc_cancel`) in the same
//! callback, then adds request header `x-cancelled: <n>` and resumes the request: a host must
//! reset such a stream, with none of the queued messages or a clean end reaching the upstream.

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> {
        Box::new(GrpcStream { flood: 0, cancel: None })
    });
}}

struct GrpcStream {
    /// MiB to send once the upstream answered (`x-flood`).
    flood: usize,
    /// Messages to queue before cancelling the stream, once the upstream answered
    /// (`x-cancel`).
    cancel: Option<usize>,
}

impl HttpContext for GrpcStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.flood = self
            .get_http_request_header("x-flood")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        self.cancel = self
            .get_http_request_header("x-cancel")
            .and_then(|n| n.parse::<usize>().ok());
        let method = if self.flood > 0 || self.cancel.is_some() {
            "Hold"
        } else {
            "Stream"
        };
        match self.open_grpc_stream("grpc_cluster", "pwhost.Echo", method, vec![]) {
            Ok(token) => {
                info!("opened grpc stream: token {}", token);
                let last = self.get_http_request_header("x-last").is_some();
                self.send_grpc_stream_message(token, Some(b"hello"), last);
            }
            Err(status) => {
                let body = format!("grpc stream failed: {:?}", status);
                self.send_http_response(503, vec![], Some(body.as_bytes()));
            }
        }
        Action::Pause
    }
}

impl Context for GrpcStream {
    fn on_grpc_stream_initial_metadata(&mut self, token_id: u32, _num_elements: u32) {
        let value = match self.get_grpc_stream_initial_metadata_value("x-init") {
            Some(value) => String::from_utf8_lossy(&value).into_owned(),
            None => "<missing>".to_string(),
        };
        info!("initial metadata x-init: {}", value);
        let megabyte = vec![b'x'; 1 << 20];
        for _ in 0..self.flood {
            self.send_grpc_stream_message(token_id, Some(&megabyte), false);
        }
        if let Some(count) = self.cancel {
            for _ in 0..count {
                self.send_grpc_stream_message(token_id, Some(b"queued"), false);
            }
            self.cancel_grpc_stream(token_id);
            self.add_http_request_header("x-cancelled", &count.to_string());
            self.resume_http_request();
        }
    }

    fn on_grpc_stream_message(&mut self, _token_id: u32, message_size: usize) {
        let message = self
            .get_grpc_stream_message(0, message_size)
            .unwrap_or_default();
        info!("stream message: {}", String::from_utf8_lossy(&message));
    }

    fn on_grpc_stream_trailing_metadata(&mut self, _token_id: u32, num_elements: u32) {
        info!("trailing metadata count {}", num_elements);
    }

    fn on_grpc_stream_close(&mut self, _token_id: u32, status_code: u32) {
        self.add_http_request_header("x-stream-status", &status_code.to_string());
        self.resume_http_request();
    }
}
