//! `http_headers`, ported from `plugins/rust/http_headers`: header inspection and mutation.

use native::info;
use native::sdk::*;

pub const PLUGIN: NativePlugin = NativePlugin::new("http_headers", |setup| {
    setup.set_log_level(LogLevel::Trace);
    setup.set_root_context(|_| -> Box<dyn RootContext> { Box::new(HttpHeadersRoot) });
});

struct HttpHeadersRoot;

impl Context for HttpHeadersRoot {}

impl RootContext for HttpHeadersRoot {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(HttpHeaders))
    }
}

struct HttpHeaders;

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
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.add_http_response_header("x-powered-by", "pwhost");
        self.remove_http_response_header("server");
        Action::Continue
    }

    fn on_log(&mut self) {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        info!("done: {}", path);
    }
}
