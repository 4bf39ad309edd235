//! `local_response`: API-key gate that answers requests itself.
//!
//! The plugin configuration is the expected API key (`secret` if the configuration is empty or
//! absent). On request headers:
//! - `:path` == `/grpc-deny`: sends a gRPC local response via the SDK's `send_grpc_response`
//!   (PERMISSION_DENIED, message `denied by pwhost`, metadata `x-denied-by: pwhost`) and returns
//!   Pause. On the wire that is `proxy_send_local_response(status 200, details "", body
//!   "denied by pwhost", headers [x-denied-by: pwhost], grpc_status 7)`: note that SDK 0.2.5 passes
//!   the gRPC message as the local-response *body*, not as status details.
//! - `x-api-key` missing or different from the key: sends a local response 403 with header
//!   `x-denied-by: pwhost` and body `access denied\n`, returns Pause. The upstream must not see
//!   the request.
//! - otherwise Continue.

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::sync::Arc; // Arc, not Rc: the same source compiles into pwhost, whose contexts are Send

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(LocalResponseRoot { api_key: Arc::from("secret") })
    });
}}

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
