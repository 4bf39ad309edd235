//! `local_response`, ported from `plugins/rust/local_response`: an API-key gate that answers
//! requests itself. (`Rc` became `Arc`: native contexts must be `Send`.)

use std::sync::Arc;

use native::info;
use native::sdk::*;

pub const PLUGIN: NativePlugin = NativePlugin::new("local_response", |setup| {
    setup.set_log_level(LogLevel::Trace);
    setup.set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(LocalResponseRoot {
            api_key: Arc::from("secret"),
        })
    });
});

struct LocalResponseRoot {
    api_key: Arc<str>,
}

impl Context for LocalResponseRoot {}

impl RootContext for LocalResponseRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let key = self
            .get_plugin_configuration()
            .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
            .unwrap_or_default();
        self.api_key = if key.is_empty() {
            Arc::from("secret")
        } else {
            Arc::from(key)
        };
        info!("configured api key of {} bytes", self.api_key.len());
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(LocalResponse {
            api_key: Arc::clone(&self.api_key),
        }))
    }
}

struct LocalResponse {
    api_key: Arc<str>,
}

impl Context for LocalResponse {}

impl HttpContext for LocalResponse {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.get_http_request_header(":path").as_deref() == Some("/grpc-deny") {
            self.send_grpc_response(
                GrpcStatusCode::PermissionDenied,
                Some("denied by pwhost"),
                vec![("x-denied-by", b"pwhost")],
            );
            return Action::Pause;
        }
        match self.get_http_request_header("x-api-key") {
            Some(key) if *key == *self.api_key => Action::Continue,
            _ => {
                self.send_http_response(
                    403,
                    vec![("x-denied-by", "pwhost")],
                    Some(b"access denied\n"),
                );
                Action::Pause
            }
        }
    }
}
