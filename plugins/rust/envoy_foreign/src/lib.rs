//! `envoy_foreign`: calls Envoy's foreign functions as plugins written for Envoy do, and logs
//! what they answer. Arguments are Envoy's protobuf messages, encoded here by hand (a plugin
//! would use its protobuf library; the messages are a few fields).
//!
//! Each request's headers say what to call (`x-call`), logging `<call>: status <n> ...`:
//! - `compress`: `compress(x-data)`, then `uncompress` of the result: `compress: status <s> size
//!   <n>, uncompress: status <s> <text>`.
//! - `uncompress`: `uncompress(hex-decoded x-data-hex)`: `uncompress: status <s> <text>`.
//! - `filter-state`: `set_envoy_filter_state(path x-path, value x-value, span x-span)`, then
//!   reads property `filter_state/<x-path>` (or `filter_state/<x-path>/<x-field>`, a port shown
//!   as the integer it is):
//!   `filter-state: status <s>, read <status or value>`.
//! - `set`: `proxy_set_property(name, value)` for each `name=value` of `x-set` (`;`-separated),
//!   then reads each name back: `set <name>: status <s>, read <status or value>`.
//! - `clear-route-cache`: `clear-route-cache: status <s>`.
//! - `verify`: `verify_signature(hash x-hash, DER key hex x-key-hex or PEM x-key-pem (with `\n`
//!   for line breaks), signature hex x-signature-hex, text x-text)`: `verify: status <s> result
//!   <bool> error <text>`.
//! - `sign`: `sign(hash x-hash, PKCS#8 DER hex x-private-key-hex, text x-text)`, then verifies
//!   the signature with `x-key-hex`: `sign: status <s> result <bool> error <text>, verify:
//!   result <bool>`.
//! - `expr`: `expr_create(x-expr)`, `expr_evaluate` (shown as `x-expr-type`: `string`, `int`,
//!   `bool` or `hex`), `expr_delete`, `expr_evaluate` again: `expr: create <s>, evaluate <s>
//!   <value>, delete <s>, evaluate after delete <s>`.
//! - `bad-arguments`: each function with bytes that are not its message: `bad arguments: <name>
//!   <s>` for `declare_property`, `set_envoy_filter_state`, `verify_signature`, `expr_evaluate`
//!   (three bytes), then `missing <s>` for a function nobody registered.
//!
//! The root context (`on_configure`) declares the properties its configuration lists, one per
//! line `declare <name> <readonly 0|1> <type 0..3> <span 0..2>`, logging `declare <name>:
//! <s>`; a line `set <name> <value>` sets a property from the root context (`root set <name>:
//! status <s>`); a line `tcp <cluster>` makes it a TCP filter that routes each connection to that
//! cluster (`set_envoy_filter_state` of `envoy.tcp_proxy.cluster`, for the connection, from
//! `on_new_connection`), logging `route: status <s>`.

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::sync::Arc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { tcp_cluster: None })
    });
}}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_call_foreign_function(
        function_name_data: *const u8,
        function_name_size: usize,
        arguments_data: *const u8,
        arguments_size: usize,
        results_data: *mut *mut u8,
        results_size: *mut usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
}

fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: the host filled a block of `size` bytes that the SDK's allocator made as a Vec.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// Calls foreign function `name`: its status and result.
fn call(name: &str, args: &[u8]) -> (u32, Vec<u8>) {
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: valid slices and out-pointers.
    let status = unsafe {
        proxy_call_foreign_function(
            name.as_ptr(),
            name.len(),
            args.as_ptr(),
            args.len(),
            &mut data,
            &mut size,
        )
    };
    (status, take(data, size))
}

fn property_bytes(path: &[&str]) -> Result<Vec<u8>, u32> {
    let path = path.join("\0");
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: valid slice and out-pointers.
    let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
    let value = take(data, size);
    if status == 0 {
        Ok(value)
    } else {
        Err(status)
    }
}

fn property(path: &[&str]) -> String {
    match property_bytes(path) {
        Ok(value) => String::from_utf8_lossy(&value).into_owned(),
        Err(status) => format!("status {status}"),
    }
}

/// A protobuf message, written field by field.
#[derive(Default)]
struct Message(Vec<u8>);

impl Message {
    fn varint(&mut self, mut value: u64) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                self.0.push(byte);
                return;
            }
            self.0.push(byte | 0x80);
        }
    }

    fn bytes(mut self, field: u64, value: &[u8]) -> Self {
        if !value.is_empty() {
            self.varint(field << 3 | 2);
            self.varint(value.len() as u64);
            self.0.extend_from_slice(value);
        }
        self
    }

    fn number(mut self, field: u64, value: u64) -> Self {
        if value != 0 {
            self.varint(field << 3);
            self.varint(value);
        }
        self
    }
}

/// The fields of a `{1: bool result, 2: bytes/string, 3: string}` result message.
fn result_fields(mut bytes: &[u8]) -> (bool, Vec<u8>, Vec<u8>) {
    let mut out = (false, Vec::new(), Vec::new());
    fn varint(bytes: &mut &[u8]) -> u64 {
        let mut value = 0;
        let mut shift = 0;
        while let Some((&byte, rest)) = bytes.split_first() {
            *bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        value
    }
    while !bytes.is_empty() {
        let key = varint(&mut bytes);
        match key & 7 {
            0 => {
                let value = varint(&mut bytes);
                if key >> 3 == 1 {
                    out.0 = value != 0;
                }
            }
            2 => {
                let len = (varint(&mut bytes) as usize).min(bytes.len());
                let (value, rest) = bytes.split_at(len);
                bytes = rest;
                match key >> 3 {
                    2 => out.1 = value.to_vec(),
                    3 => out.2 = value.to_vec(),
                    _ => {}
                }
            }
            _ => break,
        }
    }
    out
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .filter_map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Root {
    tcp_cluster: Option<Arc<str>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        for line in String::from_utf8_lossy(&config).lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["declare", name, readonly, kind, span] => {
                    let number = |w: &str| w.parse::<u64>().unwrap_or(0);
                    let args = Message::default()
                        .bytes(1, name.as_bytes())
                        .number(2, number(readonly))
                        .number(3, number(kind))
                        .number(5, number(span));
                    info!("declare {}: {}", name, call("declare_property", &args.0).0);
                }
                ["tcp", cluster] => self.tcp_cluster = Some(Arc::from(*cluster)),
                ["set", name, value] => {
                    // SAFETY: valid slices.
                    let status = unsafe {
                        proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len())
                    };
                    info!("root set {}: status {}", name, status);
                }
                _ => {}
            }
        }
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(if self.tcp_cluster.is_some() {
            ContextType::StreamContext
        } else {
            ContextType::HttpContext
        })
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Calls))
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Route {
            cluster: self.tcp_cluster.clone().unwrap_or_else(|| Arc::from("")),
        }))
    }
}

struct Calls;

impl Context for Calls {}

impl Calls {
    fn header(&self, name: &str) -> String {
        self.get_http_request_header(name).unwrap_or_default()
    }
}

impl HttpContext for Calls {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        match self.header("x-call").as_str() {
            "compress" => {
                let (status, compressed) = call("compress", self.header("x-data").as_bytes());
                let (back, text) = call("uncompress", &compressed);
                info!(
                    "compress: status {} size {}, uncompress: status {} {}",
                    status,
                    compressed.len(),
                    back,
                    String::from_utf8_lossy(&text)
                );
            }
            "uncompress" => {
                let (status, text) = call("uncompress", &unhex(&self.header("x-data-hex")));
                info!(
                    "uncompress: status {} {}",
                    status,
                    String::from_utf8_lossy(&text)
                );
            }
            "filter-state" => {
                let path = self.header("x-path");
                let span = self.header("x-span").parse::<u64>().unwrap_or(0);
                let args = Message::default()
                    .bytes(1, path.as_bytes())
                    .bytes(2, self.header("x-value").as_bytes())
                    .number(3, span);
                let status = call("set_envoy_filter_state", &args.0).0;
                let field = self.header("x-field");
                let read = if field.is_empty() {
                    property(&["filter_state", &path])
                } else {
                    // Envoy's address objects have an `ip` (a string) and a `port` (an integer).
                    match property_bytes(&["filter_state", &path, &field]) {
                        Ok(bytes) if field == "port" && bytes.len() == 8 => {
                            let mut port = [0; 8];
                            port.copy_from_slice(&bytes);
                            i64::from_le_bytes(port).to_string()
                        }
                        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                        Err(status) => format!("status {status}"),
                    }
                };
                info!("filter-state: status {}, read {}", status, read);
            }
            "set" => {
                for assignment in self.header("x-set").split(';') {
                    let Some((name, value)) = assignment.split_once('=') else {
                        continue;
                    };
                    // SAFETY: valid slices.
                    let status = unsafe {
                        proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len())
                    };
                    info!(
                        "set {}: status {}, read {}",
                        name,
                        status,
                        property(&[name])
                    );
                }
            }
            "clear-route-cache" => {
                info!(
                    "clear-route-cache: status {}",
                    call("clear_route_cache", b"").0
                );
            }
            "verify" => {
                let pem = self.header("x-key-pem").replace("\\n", "\n");
                let args = Message::default()
                    .bytes(1, self.header("x-hash").as_bytes())
                    .bytes(2, &unhex(&self.header("x-key-hex")))
                    .bytes(3, &unhex(&self.header("x-signature-hex")))
                    .bytes(4, self.header("x-text").as_bytes())
                    .bytes(5, pem.as_bytes());
                let (status, result) = call("verify_signature", &args.0);
                let (ok, error, _) = result_fields(&result);
                info!(
                    "verify: status {} result {} error {}",
                    status,
                    ok,
                    String::from_utf8_lossy(&error)
                );
            }
            "sign" => {
                let hash = self.header("x-hash");
                let text = self.header("x-text");
                let args = Message::default()
                    .bytes(1, hash.as_bytes())
                    .bytes(2, &unhex(&self.header("x-private-key-hex")))
                    .bytes(3, text.as_bytes());
                let (status, result) = call("sign", &args.0);
                let (ok, signature, error) = result_fields(&result);
                let verify = Message::default()
                    .bytes(1, hash.as_bytes())
                    .bytes(2, &unhex(&self.header("x-key-hex")))
                    .bytes(3, &signature)
                    .bytes(4, text.as_bytes());
                let (verified, _, _) = result_fields(&call("verify_signature", &verify.0).1);
                info!(
                    "sign: status {} result {} error {}, verify: result {}",
                    status,
                    ok,
                    String::from_utf8_lossy(&error),
                    verified
                );
            }
            "expr" => {
                let (create, token) = call("expr_create", self.header("x-expr").as_bytes());
                let (evaluate, value) = call("expr_evaluate", &token);
                let shown = match (self.header("x-expr-type").as_str(), value.as_slice()) {
                    ("string", v) => String::from_utf8_lossy(v).into_owned(),
                    ("int", v) if v.len() == 8 => {
                        let mut bytes = [0; 8];
                        bytes.copy_from_slice(v);
                        i64::from_le_bytes(bytes).to_string()
                    }
                    ("bool", [b]) => (*b != 0).to_string(),
                    (_, v) => hex(v),
                };
                let delete = call("expr_delete", &token).0;
                let again = call("expr_evaluate", &token).0;
                info!(
                    "expr: create {}, evaluate {} {}, delete {}, evaluate after delete {}",
                    create, evaluate, shown, delete, again
                );
            }
            "bad-arguments" => {
                for name in [
                    "declare_property",
                    "set_envoy_filter_state",
                    "verify_signature",
                ] {
                    info!("bad arguments: {} {}", name, call(name, b"bad_arg").0);
                }
                info!(
                    "bad arguments: expr_evaluate {}",
                    call("expr_evaluate", b"abc").0
                );
                info!("missing {}", call("no_such_function", b"").0);
            }
            _ => {}
        }
        Action::Continue
    }
}

struct Route {
    cluster: Arc<str>,
}

impl Context for Route {}

impl StreamContext for Route {
    fn on_new_connection(&mut self) -> Action {
        let args = Message::default()
            .bytes(1, b"envoy.tcp_proxy.cluster")
            .bytes(2, self.cluster.as_bytes())
            .number(3, 2);
        info!(
            "route: status {}",
            call("set_envoy_filter_state", &args.0).0
        );
        Action::Continue
    }
}
