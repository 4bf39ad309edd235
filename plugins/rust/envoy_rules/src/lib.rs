//! `envoy_rules`: probes of the places where Envoy is stricter than the spec's text, so that a
//! plugin tested on pwhost behaves the same in Envoy. Each probe makes raw host calls (this
//! crate's own `env` imports, so a non-OK status comes back as a number instead of an SDK panic)
//! and logs what it got, at info level. Statuses: 0 OK, 1 NOT_FOUND, 2 BAD_ARGUMENT,
//! 8 CAS_MISMATCH.
//!
//! HTTP probes are chosen by the request header `x-probe`:
//! - `hold`: request headers dispatch an HTTP call to `cluster` and return Pause; the call's
//!   response resumes the request. Logs `request body <size> end_of_stream=<bool>` per body
//!   callback and `request trailers <count>` per trailers callback, returning Continue.
//! - `maps`: logs the status of reaching each map where Envoy does not hand it out:
//!   `request headers: response :status <s>` (in the request headers callback, which continues);
//!   `request body: get <s> add <s> pairs <s> <size>` (request headers after they went on) and,
//!   in the last body chunk, `request body: add trailer <s>` (trailers may be added there);
//!   `response headers: request :path <s>`; `response body: get <s>` (response headers after
//!   they went on); in the response headers callback also `response headers: request body get
//!   <s> <size> set <s>, call response body get <s>` (a body after it went on, a call's body
//!   outside its callback); in `on_log`: `log: request :path <s> <value>`, `log: response
//!   :status <s> <value>`, `log: add request header <s>`, `log: request trailer <s>`, `log:
//!   response body get <s> <size> set <s>`.
//! - `local-reply`: request headers send a 403 (`x-local: 1`, body `no`) and then a 500; logs
//!   `local reply: <s> <s>` and returns Continue. The response callbacks log `response headers:
//!   :status <value>` and add `x-seen-by-plugin: yes`; `on_log` logs `log: :status <value>`.
//! - `status`: request headers dispatch an HTTP call (Pause); its response callback logs
//!   `call response: <headers> headers, get_status <s> <code> <message>` and resumes.
//! - `grpc-status`: request headers dispatch a unary gRPC call (Pause); its response callback
//!   logs `grpc response: status <code>, get_status <s> <code> <message>` and resumes.
//! - `incomplete-call`: logs `call without <name>: <s>` for a call missing each of `:method`,
//!   `:path`, `:authority`.
//! - `set-buffer`: the request body callback edits the body and logs `set_buffer_bytes <start>
//!   <size>: <s>` for (3, 2) (the middle), (0, 0) (prepend `<`), (len, 0) (append `>`), (0, 2)
//!   (replace the first two bytes with `[`).
//! - `config`: logs `plugin configuration in request: <s>` and `vm configuration in request: <s>`.
//! - `tick`: sets a 10 ms tick period from the stream; the root's `on_tick` logs `tick <n>` and
//!   stops the timer after the second.
//! - `order`: the stream logs `stream log` from `on_log` and `stream done` from `on_done`.
//!
//! TCP (plugin configuration `tcp`): the connection logs `connection done` from `on_done` and
//! `connection log` from `on_log`.
//!
//! Root probes, chosen by the plugin configuration and logged from `on_configure`:
//! - `config` (also as the VM configuration): `on_vm_start: plugin configuration <s>` (from
//!   `on_vm_start`) and `on_configure: plugin configuration <s>`;
//! - `root-stream-calls`: `root: send_local_response <s> continue_stream <s> close_stream <s>
//!   set_effective_context(0) <s>`;
//! - `shared-data`: `shared data: set missing key with cas <s>, get <s> <value>`; `shared data:
//!   cas of two keys differ <bool>, set b with a's cas <s>`;
//! - `metrics`: `metrics: increment counter by 0 <s>, by 3 <s>, record 5 <s>, value <s> <n>`;
//!   `metrics: histogram record <s> increment <s> get <s>`;
//! - `queue`: registers a queue and resolves it under three vm_ids: `queue: vm_id <plugin_vm_id>,
//!   resolve with empty vm_id <s> same token <bool>, with own vm_id <s> same token <bool>, with
//!   vm_id elsewhere <s>`.
//!
//! With plugin configuration `never-done` the root's `on_done` returns false and it never calls
//! `proxy_done`; with `done` it returns true. In both, dropping the root context (which the SDK
//! does in `proxy_on_delete`) logs `root deleted`.

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { mode: String::new(), ticks: 0 })
    });
}}

// Raw imports: the SDK's wasm signatures, with statuses as plain numbers.
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_status(
        return_code: *mut u32,
        return_message_data: *mut *mut u8,
        return_message_size: *mut usize,
    ) -> u32;
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_close_stream(stream_type: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_get_metric(metric_id: u32, return_value: *mut u64) -> u32;
    fn proxy_register_shared_queue(
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_resolve_shared_queue(
        vm_id_data: *const u8,
        vm_id_size: usize,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
}

const REQUEST_HEADERS: u32 = 0;
const REQUEST_TRAILERS: u32 = 1;
const RESPONSE_HEADERS: u32 = 2;
const CALL_RESPONSE_HEADERS: u32 = 6;
const REQUEST_BODY: u32 = 0;
const RESPONSE_BODY: u32 = 1;
const CALL_RESPONSE_BODY: u32 = 4;
const VM_CONFIGURATION: u32 = 6;
const PLUGIN_CONFIGURATION: u32 = 7;

/// Takes ownership of a block the host returned (allocated by the SDK's allocator, a `Vec`).
fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: the host filled a block of exactly `size` bytes that the SDK's
    // `proxy_on_memory_allocate` allocated as a `Vec<u8>` of that capacity.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// `proxy_get_header_map_value`: the status and the value (lossy UTF-8).
fn get_value(map: u32, key: &str) -> (u32, String) {
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: valid key slice and out-pointers.
    let status =
        unsafe { proxy_get_header_map_value(map, key.as_ptr(), key.len(), &mut data, &mut size) };
    let value = String::from_utf8_lossy(&take(data, size)).into_owned();
    (status, value)
}

fn add_value(map: u32, key: &str, value: &str) -> u32 {
    // SAFETY: valid slices.
    unsafe { proxy_add_header_map_value(map, key.as_ptr(), key.len(), value.as_ptr(), value.len()) }
}

/// `proxy_get_header_map_pairs`: the status and the serialized size.
fn get_pairs(map: u32) -> (u32, usize) {
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: valid out-pointers.
    let status = unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) };
    (status, take(data, size).len())
}

/// `proxy_get_buffer_bytes` of the whole buffer: the status and the size read.
fn buffer_read(buffer: u32) -> (u32, usize) {
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: valid out-pointers.
    let status =
        unsafe { proxy_get_buffer_bytes(buffer, 0, usize::MAX >> 1, &mut data, &mut size) };
    (status, take(data, size).len())
}

fn buffer_read_status(buffer: u32) -> u32 {
    buffer_read(buffer).0
}

fn set_buffer(buffer: u32, start: usize, size: usize, data: &[u8]) -> u32 {
    // SAFETY: valid slice.
    unsafe { proxy_set_buffer_bytes(buffer, start, size, data.as_ptr(), data.len()) }
}

/// Serializes header pairs in the ABI's format.
fn pairs(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = (headers.len() as u32).to_le_bytes().to_vec();
    for (k, v) in headers {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

fn local_reply(status: u32, body: &str, headers: &[(&str, &str)]) -> u32 {
    let headers = pairs(headers);
    let details = "probe reply";
    // SAFETY: valid slices.
    unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    }
}

/// `proxy_http_call` to `cluster` with `headers`; the status and token.
fn http_call(headers: &[(&str, &str)]) -> (u32, u32) {
    let upstream = "cluster";
    let headers = pairs(headers);
    let mut token = 0;
    // SAFETY: valid slices and out-pointer.
    let status = unsafe {
        proxy_http_call(
            upstream.as_ptr(),
            upstream.len(),
            headers.as_ptr(),
            headers.len(),
            std::ptr::null(),
            0,
            std::ptr::null(),
            0,
            1000,
            &mut token,
        )
    };
    (status, token)
}

const FULL_CALL: [(&str, &str); 3] = [(":method", "GET"), (":path", "/"), (":authority", "a")];

struct Root {
    mode: String,
    ticks: u32,
}

impl Drop for Root {
    fn drop(&mut self) {
        if self.mode == "never-done" || self.mode == "done" {
            info!("root deleted");
        }
    }
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        self.mode != "never-done"
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        // The plugin configuration is not readable here in Envoy; probe it only when asked,
        // which the configuration itself cannot say yet: the VM configuration does.
        if self.get_vm_configuration().as_deref() == Some(b"config") {
            info!(
                "on_vm_start: plugin configuration {}",
                buffer_read_status(PLUGIN_CONFIGURATION)
            );
        }
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let status = buffer_read_status(PLUGIN_CONFIGURATION);
        self.mode = self
            .get_plugin_configuration()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        match self.mode.as_str() {
            "config" => info!("on_configure: plugin configuration {}", status),
            "root-stream-calls" => root_stream_calls(),
            "shared-data" => shared_data(),
            "metrics" => metrics(),
            "queue" => queue(),
            _ => {}
        }
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        info!("tick {}", self.ticks);
        if self.ticks == 2 {
            self.set_tick_period(Duration::ZERO);
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(if self.mode == "tcp" {
            ContextType::StreamContext
        } else {
            ContextType::HttpContext
        })
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe {
            probe: String::new(),
        }))
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Connection))
    }
}

// SAFETY (every unsafe block of the root probes): valid slices and out-pointers.

fn root_stream_calls() {
    let reply = local_reply(403, "", &[]);
    let (cont, close, effective) = unsafe {
        (
            proxy_continue_stream(0),
            proxy_close_stream(0),
            proxy_set_effective_context(0),
        )
    };
    info!(
        "root: send_local_response {} continue_stream {} close_stream {} set_effective_context(0) {}",
        reply, cont, close, effective
    );
}

fn shared_data() {
    let set = |key: &str, value: &str, cas: u32| unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    };
    let get = |key: &str| {
        let (mut data, mut size, mut cas) = (std::ptr::null_mut(), 0, 0);
        let status = unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        };
        (
            status,
            String::from_utf8_lossy(&take(data, size)).into_owned(),
            cas,
        )
    };
    let set_missing = set("missing-key", "stored", 12345);
    let (status, value, _) = get("missing-key");
    info!(
        "shared data: set missing key with cas {}, get {} {}",
        set_missing, status, value
    );
    set("a", "1", 0);
    set("b", "1", 0);
    let (_, _, cas_a) = get("a");
    let (_, _, cas_b) = get("b");
    info!(
        "shared data: cas of two keys differ {}, set b with a's cas {}",
        cas_a != cas_b,
        set("b", "2", cas_a)
    );
}

fn metrics() {
    let define = |kind: u32, name: &str| {
        let mut id = 0;
        unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) };
        id
    };
    let counter = define(0, "probe_counter");
    let zero = unsafe { proxy_increment_metric(counter, 0) };
    // Recorded onto a counter that is not 0, so that adding and setting differ.
    let three = unsafe { proxy_increment_metric(counter, 3) };
    let record = unsafe { proxy_record_metric(counter, 5) };
    let mut value = 0;
    let get_counter = unsafe { proxy_get_metric(counter, &mut value) };
    info!(
        "metrics: increment counter by 0 {}, by 3 {}, record 5 {}, value {} {}",
        zero, three, record, get_counter, value
    );
    let histogram = define(2, "probe_histogram");
    let record = unsafe { proxy_record_metric(histogram, 1) };
    let increment = unsafe { proxy_increment_metric(histogram, 1) };
    let get_histogram = unsafe { proxy_get_metric(histogram, &mut value) };
    info!(
        "metrics: histogram record {} increment {} get {}",
        record, increment, get_histogram
    );
}

fn queue() {
    let name = "probe_queue";
    let mut registered = 0;
    unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut registered) };
    let resolve = |vm_id: &[u8]| {
        let mut resolved = 0;
        let status = unsafe {
            proxy_resolve_shared_queue(
                vm_id.as_ptr(),
                vm_id.len(),
                name.as_ptr(),
                name.len(),
                &mut resolved,
            )
        };
        (status, resolved == registered)
    };
    let own_vm_id = {
        let path = "plugin_vm_id";
        let (mut data, mut size) = (std::ptr::null_mut(), 0);
        unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
        take(data, size)
    };
    let (empty, empty_same) = resolve(b"");
    let (own, own_same) = resolve(&own_vm_id);
    let (elsewhere, _) = resolve(b"elsewhere");
    info!(
        "queue: vm_id {}, resolve with empty vm_id {} same token {}, with own vm_id {} same token {}, with vm_id elsewhere {}",
        String::from_utf8_lossy(&own_vm_id),
        empty,
        empty_same,
        own,
        own_same,
        elsewhere
    );
}

struct Probe {
    probe: String,
}

impl Context for Probe {
    fn on_done(&mut self) -> bool {
        if self.probe == "order" {
            info!("stream done");
        }
        true
    }

    fn on_http_call_response(
        &mut self,
        _token: u32,
        headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        if self.probe == "status" {
            let (mut code, mut data, mut size) = (0, std::ptr::null_mut(), 0);
            // SAFETY: valid out-pointers.
            let status = unsafe { proxy_get_status(&mut code, &mut data, &mut size) };
            let message = String::from_utf8_lossy(&take(data, size)).into_owned();
            info!(
                "call response: {} headers, get_status {} {} {}",
                headers, status, code, message
            );
        }
        self.resume_http_request();
    }

    fn on_grpc_call_response(&mut self, _token: u32, status_code: u32, _size: usize) {
        let (mut code, mut data, mut size) = (0, std::ptr::null_mut(), 0);
        // SAFETY: valid out-pointers.
        let status = unsafe { proxy_get_status(&mut code, &mut data, &mut size) };
        let message = String::from_utf8_lossy(&take(data, size)).into_owned();
        info!(
            "grpc response: status {}, get_status {} {} {}",
            status_code, status, code, message
        );
        self.resume_http_request();
    }
}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        self.probe = self.get_http_request_header("x-probe").unwrap_or_default();
        match self.probe.as_str() {
            "hold" | "status" => {
                // Through the SDK, which routes the response back to this context.
                if let Err(status) = self.dispatch_http_call(
                    "cluster",
                    FULL_CALL.to_vec(),
                    None,
                    vec![],
                    Duration::from_secs(1),
                ) {
                    info!("dispatch failed: {:?}", status);
                }
                Action::Pause
            }
            "grpc-status" => {
                if let Err(status) = self.dispatch_grpc_call(
                    "cluster",
                    "probe.Service",
                    "Call",
                    vec![],
                    Some(b"ping"),
                    Duration::from_secs(1),
                ) {
                    info!("dispatch failed: {:?}", status);
                }
                Action::Pause
            }
            "maps" => {
                info!(
                    "request headers: response :status {}",
                    get_value(RESPONSE_HEADERS, ":status").0
                );
                Action::Continue
            }
            "local-reply" => {
                let first = local_reply(403, "no", &[("x-local", "1")]);
                let second = local_reply(500, "second", &[]);
                info!("local reply: {} {}", first, second);
                Action::Continue
            }
            "incomplete-call" => {
                for missing in [":method", ":path", ":authority"] {
                    let headers: Vec<_> = FULL_CALL
                        .iter()
                        .copied()
                        .filter(|(name, _)| *name != missing)
                        .collect();
                    info!("call without {}: {}", missing, http_call(&headers).0);
                }
                Action::Continue
            }
            "config" => {
                info!(
                    "plugin configuration in request: {}",
                    buffer_read_status(PLUGIN_CONFIGURATION)
                );
                info!(
                    "vm configuration in request: {}",
                    buffer_read_status(VM_CONFIGURATION)
                );
                Action::Continue
            }
            "tick" => {
                // SAFETY: no pointers.
                unsafe { proxy_set_tick_period_milliseconds(10) };
                Action::Continue
            }
            _ => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        match self.probe.as_str() {
            "hold" => info!("request body {} end_of_stream={}", size, end_of_stream),
            "maps" => {
                let (get, _) = get_value(REQUEST_HEADERS, ":path");
                let add = add_value(REQUEST_HEADERS, "x-late", "1");
                let (pairs, pairs_size) = get_pairs(REQUEST_HEADERS);
                info!(
                    "request body: get {} add {} pairs {} {}",
                    get, add, pairs, pairs_size
                );
                if end_of_stream {
                    info!(
                        "request body: add trailer {}",
                        add_value(REQUEST_TRAILERS, "x-added-in-body", "yes")
                    );
                }
            }
            "set-buffer" => {
                for (start, size, data) in [
                    (3, 2, &b"XX"[..]),
                    (0, 0, b"<"),
                    (usize::MAX >> 1, 0, b">"),
                    (0, 2, b"["),
                ] {
                    let start_text = if start > 1000 {
                        "len".to_string()
                    } else {
                        start.to_string()
                    };
                    info!(
                        "set_buffer_bytes {} {}: {}",
                        start_text,
                        size,
                        set_buffer(REQUEST_BODY, start, size, data)
                    );
                }
            }
            _ => {}
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, trailers: usize) -> Action {
        if self.probe == "hold" {
            info!("request trailers {}", trailers);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        match self.probe.as_str() {
            "maps" => {
                info!(
                    "response headers: request :path {} call response :status {}",
                    get_value(REQUEST_HEADERS, ":path").0,
                    get_value(CALL_RESPONSE_HEADERS, ":status").0
                );
                let (get, size) = buffer_read(REQUEST_BODY);
                info!(
                    "response headers: request body get {} {} set {}, call response body get {}",
                    get,
                    size,
                    set_buffer(REQUEST_BODY, 0, 0, b"late"),
                    buffer_read_status(CALL_RESPONSE_BODY)
                );
            }
            "local-reply" => {
                info!(
                    "response headers: :status {}",
                    get_value(RESPONSE_HEADERS, ":status").1
                );
                add_value(RESPONSE_HEADERS, "x-seen-by-plugin", "yes");
            }
            _ => {}
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, _size: usize, _end_of_stream: bool) -> Action {
        if self.probe == "maps" {
            info!(
                "response body: get {}",
                get_value(RESPONSE_HEADERS, ":status").0
            );
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        match self.probe.as_str() {
            "maps" => {
                let (status, path) = get_value(REQUEST_HEADERS, ":path");
                info!("log: request :path {} {}", status, path);
                let (status, code) = get_value(RESPONSE_HEADERS, ":status");
                info!("log: response :status {} {}", status, code);
                info!(
                    "log: add request header {}",
                    add_value(REQUEST_HEADERS, "x-too-late", "1")
                );
                info!(
                    "log: request trailer {}",
                    get_value(REQUEST_TRAILERS, "x-added-in-body").0
                );
                let (get, size) = buffer_read(RESPONSE_BODY);
                info!(
                    "log: response body get {} {} set {}",
                    get,
                    size,
                    set_buffer(RESPONSE_BODY, 0, 0, b"late")
                );
            }
            "order" => info!("stream log"),
            "local-reply" => info!("log: :status {}", get_value(RESPONSE_HEADERS, ":status").1),
            _ => {}
        }
    }
}

struct Connection;

impl Context for Connection {
    fn on_done(&mut self) -> bool {
        info!("connection done");
        true
    }
}

impl StreamContext for Connection {
    fn on_log(&mut self) {
        info!("connection log");
    }
}
