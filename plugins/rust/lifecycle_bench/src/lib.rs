//! `lifecycle_bench`: the benchmark plugin — a fixed, small amount of work per request.
//!
//! - Request headers: reads 10 headers one by one with `get_http_request_header`
//!   (`:method`, `:path`, `:authority`, `:scheme`, `user-agent`, `accept`, `accept-encoding`,
//!   `accept-language`, `x-request-id`, `x-forwarded-for`), adds `x-bench: 1`, returns Continue.
//! - Response headers: reads `:status`, returns Continue.
//! - `on_log`: one info line, `bench: request done`.
//!
//! Host calls per request: 10 × get_header_map_value, 1 × add_header_map_value,
//! 1 × get_header_map_value (response), 1 × log, plus the context lifecycle callbacks.

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Bench) });
}}

const REQUEST_HEADERS: [&str; 10] = [
    ":method",
    ":path",
    ":authority",
    ":scheme",
    "user-agent",
    "accept",
    "accept-encoding",
    "accept-language",
    "x-request-id",
    "x-forwarded-for",
];

struct Bench;

impl Context for Bench {}

impl HttpContext for Bench {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for name in REQUEST_HEADERS {
            let _ = self.get_http_request_header(name);
        }
        self.add_http_request_header("x-bench", "1");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let _ = self.get_http_response_header(":status");
        Action::Continue
    }

    fn on_log(&mut self) {
        info!("bench: request done");
    }
}
