//! `lifecycle_bench`, ported from `plugins/rust/lifecycle_bench`: the benchmark plugin.

use native::info;
use native::sdk::*;

pub const PLUGIN: NativePlugin = NativePlugin::new("lifecycle_bench", |setup| {
    setup.set_log_level(LogLevel::Info);
    setup.set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Bench) });
});

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
