//! `panics`: a Rust panic inside a callback.
//!
//! On request headers, panics when header `x-panic` is present (message
//! `pwhost test panic: <value>`); holds the stream (Pause, never continued) when header
//! `x-hold` is present; otherwise adds `x-panics: no` and returns Continue. On response headers,
//! holds the stream (Pause, never continued) when the request had header `x-hold-response`.
//! The SDK's panic hook first logs the panic message at critical level via `proxy_log`, then the
//! panic aborts (panic = "abort"), which in wasm is an `unreachable` trap. A host test should
//! see that critical log line, the trap contained (the request failed per the plugin's
//! fail-open/fail-closed policy, the host still alive), and the VM treated as failed/restarted.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> {
        Box::new(Panics {
            hold_response: false,
        })
    });
}}

struct Panics {
    /// The request asked for its response to be held (`x-hold-response`).
    hold_response: bool,
}

impl Context for Panics {}

impl HttpContext for Panics {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(value) = self.get_http_request_header("x-panic") {
            panic!("pwhost test panic: {}", value);
        }
        if self.get_http_request_header("x-hold").is_some() {
            return Action::Pause;
        }
        self.hold_response = self.get_http_request_header("x-hold-response").is_some();
        self.add_http_request_header("x-panics", "no");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.hold_response {
            true => Action::Pause,
            false => Action::Continue,
        }
    }
}
