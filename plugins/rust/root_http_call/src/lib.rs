//! `root_http_call`: an HTTP call made by a root context when the plugin starts, as a plugin
//! does that fetches its rules or keys at start-up (often as a singleton service), and streams
//! that read what it fetched.
//!
//! The plugin configuration is `[UPSTREAM [HEADER]]`, separated by spaces: the upstream to call
//! (default `config_cluster`; `-` for none) and the response header streams add (default
//! `x-fetched`). `grpc UPSTREAM [HEADER]` makes the root call a gRPC one instead.
//!
//! - Root `on_configure`: dispatches `GET /config` (authority `config.local`, 5 s timeout) to
//!   the upstream and logs `dispatched root http call: token {token}`; if the dispatch fails,
//!   logs `root http call not dispatched: {status:?}` at warn and stores `not dispatched:
//!   {status:?}` in shared data key `root_http_call.fetched`. Returns true either way.
//! - In gRPC mode, root `on_configure` dispatches unary `pwhost.Auth/Check` (message `root`,
//!   5 s timeout) to the upstream instead, and root `on_grpc_call_response` stores `grpc
//!   {status} {reply as UTF-8, lossy}` (`grpc {status}` without a reply) in the same key.
//! - Root `on_http_call_response`: stores `<:status> <first line of the body>` (e.g. `200 rules
//!   v1`) in shared data key `root_http_call.fetched` (`failed` if the call failed: no
//!   headers), and logs `root http call response: token {token}, status {status}`.
//! - Each stream, on response headers: adds the response header with the value of shared data
//!   `root_http_call.fetched` (`nothing yet` before an answer). Shared data is per VM id, so a
//!   filter with the same `vm_id` as a singleton service running this plugin (configured with
//!   upstream `-`) sees what the service fetched.

use log::{info, warn};
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { header: "x-fetched".to_string() })
    });
}}

const KEY: &str = "root_http_call.fetched";

struct Root {
    header: String,
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let configuration = self
            .get_plugin_configuration()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .unwrap_or_default();
        let mut words = configuration.split_whitespace().peekable();
        let grpc = words.next_if_eq(&"grpc").is_some();
        let upstream = words.next().unwrap_or("config_cluster").to_string();
        if let Some(header) = words.next() {
            self.header = header.to_string();
        }
        if upstream == "-" {
            return true;
        }
        let dispatched = if grpc {
            self.dispatch_grpc_call(
                &upstream,
                "pwhost.Auth",
                "Check",
                vec![],
                Some(b"root"),
                Duration::from_secs(5),
            )
        } else {
            self.dispatch_http_call(
                &upstream,
                vec![
                    (":method", "GET"),
                    (":path", "/config"),
                    (":authority", "config.local"),
                ],
                None,
                vec![],
                Duration::from_secs(5),
            )
        };
        match dispatched {
            Ok(token) => info!("dispatched root http call: token {}", token),
            Err(status) => {
                warn!("root http call not dispatched: {:?}", status);
                let value = format!("not dispatched: {:?}", status);
                let _ = self.set_shared_data(KEY, Some(value.as_bytes()), None);
            }
        }
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            header: self.header.clone(),
        }))
    }
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let reply = self
            .get_grpc_call_response_body(0, response_size)
            .map(|bytes| format!(" {}", String::from_utf8_lossy(&bytes)))
            .unwrap_or_default();
        info!(
            "root grpc call response: token {}, status {}",
            token_id, status_code
        );
        let value = format!("grpc {}{}", status_code, reply);
        let _ = self.set_shared_data(KEY, Some(value.as_bytes()), None);
    }

    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let value = if num_headers == 0 {
            info!("root http call failed: token {}", token_id);
            "failed".to_string()
        } else {
            let status = self
                .get_http_call_response_header(":status")
                .unwrap_or_default();
            let body = self
                .get_http_call_response_body(0, body_size)
                .unwrap_or_default();
            info!(
                "root http call response: token {}, status {}",
                token_id, status
            );
            let body = String::from_utf8_lossy(&body);
            format!("{} {}", status, body.lines().next().unwrap_or(""))
        };
        let _ = self.set_shared_data(KEY, Some(value.as_bytes()), None);
    }
}

struct Stream {
    header: String,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let (fetched, _) = self.get_shared_data(KEY);
        let fetched = fetched
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|| "nothing yet".to_string());
        self.add_http_response_header(&self.header, &fetched);
        Action::Continue
    }
}
