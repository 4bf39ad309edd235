//! `abi_coverage`: the host functions and callbacks no other corpus plugin uses.
//!
//! Calls whose status matters are made through this crate's own `env` imports (raw `u32`
//! statuses), because the SDK wrappers panic on any non-OK status. Statuses are printed as
//! decimal numbers (0 = Ok, 1 = NotFound, 2 = BadArgument, ...).
//!
//! Request headers (`on_http_request_headers`, returns Continue), in this order:
//! 1. `proxy_get_header_map_size(HttpRequestHeaders)` on the untouched map → header
//!    `x-header-map-size: <status>:<size>` (as Envoy: the names' and values' lengths summed,
//!    Σ(len(key)+len(value))).
//! 2. If `x-replace-all` is present: `proxy_set_header_map_pairs` replaces the whole map with
//!    `:method: GET`, `:path: /replaced`, `x-replaced: yes` (the headers below are added after).
//! 3. `proxy_get_log_level` → `x-log-level: <level as u32>` (`x-log-level: status <status>` if
//!    the call fails).
//! 4. `proxy_get_current_time_nanoseconds` → `x-time-set: yes` if later than 2020-01-01T00:00:00Z,
//!    else `x-time-set: no`.
//! 5. If `x-grpc-cancel` is present: `proxy_grpc_stream` to `grpc_cluster` `pwhost.Echo/Cancel`
//!    (logs `grpc cancel stream opened: token <t>`), then `proxy_grpc_cancel(token)` →
//!    `x-grpc-cancel: done` (`error <Status:?>` if cancel fails, `open failed <Status:?>` if the
//!    stream could not be opened). After a cancel the host must deliver no callback for the token.
//! 6. If `x-grpc-close` is present: same with method `Close` (log `grpc close stream opened:
//!    token <t>`) and `proxy_grpc_close(token)` → `x-grpc-close: done` (same error forms). A close
//!    only half-closes the stream: the remote may still answer (callbacks are logged, below).
//! 7. If `x-close` is present: `proxy_close_stream(0 = HttpRequest)`, logs
//!    `close_stream status: <status>`, then adds `x-close-status: <status>` with a raw
//!    `proxy_add_header_map_value` (its own status, if not 0, is logged as
//!    `add x-close-status status: <status>`, no panic).
//!
//! Request body (`on_http_request_body(body_size, end_of_stream)`, Continue):
//! `proxy_get_buffer_status(HttpRequestBody)` → info log
//! `buffer status: <status> <length> <flags> eos=<true|false>` (Envoy sets no flags: 0).
//!
//! Trailers: `on_http_request_trailers` logs `request trailer: <x-trailer value>` (`<missing>`
//! when absent), adds request trailer `x-added-trailer: yes`, returns Continue.
//! `on_http_response_trailers(num)` logs `response trailers: <num>`, returns Continue.
//!
//! gRPC stream callbacks on the HTTP context (info): `grpc stream <t> initial metadata <n>`,
//! `grpc stream <t> message: <utf8 lossy>`, `grpc stream <t> trailing metadata <n>`,
//! `grpc stream <t> close: <status>`.
//!
//! Root context:
//! - `on_configure`: only when the plugin configuration is exactly `done-test`, sets a 100 ms
//!   tick period and logs `done-test: tick period set: 100 ms`.
//! - `on_tick` (first tick only): calls `proxy_done`, logs `root called proxy_done` and
//!   `proxy_done status: <status>`, then sets the tick period to 0 (so exactly one of each).
//! - `on_done`: the first call logs `root on_done: pending` and returns false (not done yet);
//!   later calls log `root on_done: done` and return true.
//! - `on_foreign_function(function_id, arguments_size)` (`proxy_on_foreign_function`, routed by
//!   the SDK to the context whose id the host passes): reads `CallData` bytes `[0, size)` and logs
//!   `foreign function <id> called with <args as UTF-8, lossy>` (root context), or
//!   `http foreign function <id> called with <args>` when the host targets an HTTP context.

use log::info;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(AbiCoverageRoot { done_called: false, on_done_calls: 0 })
    });
}}

// Raw imports: same wasm signatures as the SDK's, but statuses come back as plain `u32`.
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    fn proxy_get_header_map_size(map_type: u32, return_size: *mut usize) -> u32;
    fn proxy_get_buffer_status(buffer_type: u32, length: *mut usize, flags: *mut u32) -> u32;
    fn proxy_close_stream(stream_type: u32) -> u32;
    fn proxy_done() -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
}

/// 2020-01-01T00:00:00Z in seconds since the UNIX epoch.
const Y2020: u64 = 1_577_836_800;

fn log_foreign(prefix: &str, function_id: u32, arguments_size: usize) {
    let args = match hostcalls::get_buffer(BufferType::CallData, 0, arguments_size) {
        Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        Ok(None) => String::new(),
        Err(status) => format!("<error {:?}>", status),
    };
    info!(
        "{}foreign function {} called with {}",
        prefix, function_id, args
    );
}

struct AbiCoverageRoot {
    done_called: bool,
    on_done_calls: u32,
}

impl Context for AbiCoverageRoot {
    fn on_done(&mut self) -> bool {
        self.on_done_calls += 1;
        if self.on_done_calls == 1 {
            info!("root on_done: pending");
            false
        } else {
            info!("root on_done: done");
            true
        }
    }

    fn on_foreign_function(&mut self, function_id: u32, arguments_size: usize) {
        log_foreign("", function_id, arguments_size);
    }
}

impl RootContext for AbiCoverageRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        if self.get_plugin_configuration().as_deref() == Some(b"done-test".as_slice()) {
            self.set_tick_period(Duration::from_millis(100));
            info!("done-test: tick period set: 100 ms");
        }
        true
    }

    fn on_tick(&mut self) {
        if !self.done_called {
            self.done_called = true;
            let status = unsafe { proxy_done() };
            info!("root called proxy_done");
            info!("proxy_done status: {}", status);
        }
        self.set_tick_period(Duration::ZERO);
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AbiCoverage))
    }
}

struct AbiCoverage;

impl AbiCoverage {
    /// Opens a gRPC stream to `pwhost.Echo/<method>`, then cancels (`cancel`) or closes it.
    fn grpc_open_then(&self, method: &str, cancel: bool) -> String {
        let what = if cancel { "cancel" } else { "close" };
        match self.open_grpc_stream("grpc_cluster", "pwhost.Echo", method, vec![]) {
            Ok(token) => {
                info!("grpc {} stream opened: token {}", what, token);
                let result = if cancel {
                    hostcalls::cancel_grpc_stream(token)
                } else {
                    hostcalls::close_grpc_stream(token)
                };
                match result {
                    Ok(()) => "done".to_string(),
                    Err(status) => format!("error {:?}", status),
                }
            }
            Err(status) => format!("open failed {:?}", status),
        }
    }
}

impl Context for AbiCoverage {
    fn on_grpc_stream_initial_metadata(&mut self, token_id: u32, num_elements: u32) {
        info!("grpc stream {} initial metadata {}", token_id, num_elements);
    }

    fn on_grpc_stream_message(&mut self, token_id: u32, message_size: usize) {
        let message = self
            .get_grpc_stream_message(0, message_size)
            .unwrap_or_default();
        info!(
            "grpc stream {} message: {}",
            token_id,
            String::from_utf8_lossy(&message)
        );
    }

    fn on_grpc_stream_trailing_metadata(&mut self, token_id: u32, num_elements: u32) {
        info!(
            "grpc stream {} trailing metadata {}",
            token_id, num_elements
        );
    }

    fn on_grpc_stream_close(&mut self, token_id: u32, status_code: u32) {
        info!("grpc stream {} close: {}", token_id, status_code);
    }

    fn on_foreign_function(&mut self, function_id: u32, arguments_size: usize) {
        log_foreign("http ", function_id, arguments_size);
    }
}

impl HttpContext for AbiCoverage {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // 1. Map size of the untouched request headers.
        let mut size: usize = 0;
        let size_status = unsafe { proxy_get_header_map_size(0, &mut size) };

        let replace_all = self.get_http_request_header("x-replace-all").is_some();
        let close = self.get_http_request_header("x-close").is_some();
        let grpc_cancel = self.get_http_request_header("x-grpc-cancel").is_some();
        let grpc_close = self.get_http_request_header("x-grpc-close").is_some();

        // 2. proxy_set_header_map_pairs.
        if replace_all {
            self.set_http_request_headers(vec![
                (":method", "GET"),
                (":path", "/replaced"),
                ("x-replaced", "yes"),
            ]);
        }
        self.add_http_request_header("x-header-map-size", &format!("{}:{}", size_status, size));

        // 3. proxy_get_log_level.
        let mut level: u32 = 0;
        let level_status = unsafe { proxy_get_log_level(&mut level) };
        let level_value = if level_status == 0 {
            level.to_string()
        } else {
            format!("status {}", level_status)
        };
        self.add_http_request_header("x-log-level", &level_value);

        // 4. proxy_get_current_time_nanoseconds.
        let time_set = self.get_current_time() > UNIX_EPOCH + Duration::from_secs(Y2020);
        self.add_http_request_header("x-time-set", if time_set { "yes" } else { "no" });

        // 5./6. gRPC stream cancel / close.
        if grpc_cancel {
            let result = self.grpc_open_then("Cancel", true);
            self.add_http_request_header("x-grpc-cancel", &result);
        }
        if grpc_close {
            let result = self.grpc_open_then("Close", false);
            self.add_http_request_header("x-grpc-close", &result);
        }

        // 7. proxy_close_stream(HttpRequest).
        if close {
            let status = unsafe { proxy_close_stream(0) };
            info!("close_stream status: {}", status);
            let key = "x-close-status";
            let value = status.to_string();
            let add_status = unsafe {
                proxy_add_header_map_value(0, key.as_ptr(), key.len(), value.as_ptr(), value.len())
            };
            if add_status != 0 {
                info!("add x-close-status status: {}", add_status);
            }
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, _body_size: usize, end_of_stream: bool) -> Action {
        let mut length: usize = 0;
        let mut flags: u32 = 0;
        let status = unsafe { proxy_get_buffer_status(0, &mut length, &mut flags) };
        info!(
            "buffer status: {} {} {} eos={}",
            status, length, flags, end_of_stream
        );
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        let value = self
            .get_http_request_trailer("x-trailer")
            .unwrap_or_else(|| "<missing>".to_string());
        info!("request trailer: {}", value);
        self.add_http_request_trailer("x-added-trailer", "yes");
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, num_trailers: usize) -> Action {
        info!("response trailers: {}", num_trailers);
        Action::Continue
    }
}
