//! `grpc_call`: unary gRPC callout (`proxy_grpc_call`, `proxy_on_grpc_receive`,
//! `proxy_on_grpc_close`, `proxy_get_status`).
//!
//! On request headers, dispatches `pwhost.Auth/Check` to upstream `grpc_cluster` with initial
//! metadata `x-meta: 1`, message bytes `request-bytes` and a 5 s timeout, logs
//! `dispatched grpc call: token <token>` and returns Pause. If the dispatch fails it sends a
//! local 503 with body `grpc dispatch failed: <Status as Debug>`.
//!
//! `on_grpc_call_response(token, status_code, response_size)` (the SDK maps
//! `proxy_on_grpc_receive` to status 0 and `proxy_on_grpc_close(token, code)` to that code, with
//! size 0) logs `grpc call response: token <token>, status <code>, <size> bytes`, then:
//! - status 0: reads the reply message (`GrpcReceiveBuffer`, 0..size) and adds request header
//!   `x-grpc-reply: <message as UTF-8, lossy>` and resumes the request;
//! - otherwise: reads `proxy_get_status` and sends a local response 503 with body
//!   `grpc failed: <status_code> <status message>`, or `grpc failed: <status_code>` when the host
//!   reports no message.

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(GrpcCall) });
}}

struct GrpcCall;

impl HttpContext for GrpcCall {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.dispatch_grpc_call(
            "grpc_cluster",
            "pwhost.Auth",
            "Check",
            vec![("x-meta", &b"1"[..])],
            Some(b"request-bytes"),
            Duration::from_secs(5),
        ) {
            Ok(token) => info!("dispatched grpc call: token {}", token),
            Err(status) => {
                let body = format!("grpc dispatch failed: {:?}", status);
                self.send_http_response(503, vec![], Some(body.as_bytes()));
            }
        }
        Action::Pause
    }
}

impl Context for GrpcCall {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        info!(
            "grpc call response: token {}, status {}, {} bytes",
            token_id, status_code, response_size
        );
        if status_code == 0 {
            let reply = self
                .get_grpc_call_response_body(0, response_size)
                .unwrap_or_default();
            self.add_http_request_header("x-grpc-reply", &String::from_utf8_lossy(&reply));
            self.resume_http_request();
        } else {
            let body = match self.get_grpc_status().1 {
                Some(message) => format!("grpc failed: {} {}", status_code, message),
                None => format!("grpc failed: {}", status_code),
            };
            self.send_http_response(503, vec![], Some(body.as_bytes()));
        }
    }
}
