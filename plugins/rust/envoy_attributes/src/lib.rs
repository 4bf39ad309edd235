//! `envoy_attributes`: reads the properties its configuration lists, at the moments it names, and
//! logs what it got, so a test sees Envoy's attributes as a plugin does (their bytes decoded by
//! the type Envoy gives them).
//!
//! The plugin configuration has one probe per line: `<when> <path> <type>`, where `when` is
//! `request` (request headers callback), `response` (response headers callback), `log`
//! (`on_log`), `root` (`on_configure`) or `connection` (a TCP connection's first data); `path`
//! is the property's segments separated by `/` (`request/headers/user-agent`); `type` is how to
//! show the bytes: `string`, `int` (8 little-endian bytes, signed), `uint`, `bool` (one byte),
//! `double`, `map` (header pairs, `{k=v,...}` with values as text), `list`, `size` (the byte
//! count only, for values that change from run to run, such as times) or `hex`.
//!
//! Each probe logs `<when> <path>: <value>`, or `<when> <path>: status <n>` when the host answers
//! anything but OK (1 NOT_FOUND, 3 SERIALIZATION_FAILURE, ...).
//!
//! Request headers `x-set-property: <name>=<value>` make the request headers callback set that
//! property first (logging `set <name>: <status>`).

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::sync::Arc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { probes: Arc::new(Vec::new()) })
    });
}}

#[link(wasm_import_module = "env")]
extern "C" {
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

struct Probe {
    when: String,
    path: String,
    kind: String,
}

fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: the host filled a block of `size` bytes that the SDK's allocator made as a Vec.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

fn get(path: &str) -> Result<Vec<u8>, u32> {
    let serialized = path.replace('/', "\0");
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: valid slice and out-pointers.
    let status =
        unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    let value = take(data, size);
    if status == 0 {
        Ok(value)
    } else {
        Err(status)
    }
}

fn number<const N: usize>(bytes: &[u8]) -> Option<[u8; N]> {
    bytes.try_into().ok()
}

fn pairs(bytes: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = u32::from_le_bytes(number(bytes.get(..4)?)?) as usize;
    let mut sizes = Vec::new();
    for i in 0..count {
        let at = 4 + 8 * i;
        let key = u32::from_le_bytes(number(bytes.get(at..at + 4)?)?) as usize;
        let value = u32::from_le_bytes(number(bytes.get(at + 4..at + 8)?)?) as usize;
        sizes.push((key, value));
    }
    let mut at = 4 + 8 * count;
    let mut out = Vec::new();
    for (key, value) in sizes {
        let k = String::from_utf8_lossy(bytes.get(at..at + key)?).into_owned();
        at += key + 1;
        let v = bytes.get(at..at + value)?.to_vec();
        at += value + 1;
        out.push((k, v));
    }
    Some(out)
}

fn show(kind: &str, bytes: &[u8]) -> String {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let shown = match kind {
        "string" => Some(text(bytes)),
        "int" => number::<8>(bytes).map(|b| i64::from_le_bytes(b).to_string()),
        "uint" => number::<8>(bytes).map(|b| u64::from_le_bytes(b).to_string()),
        "double" => number::<8>(bytes).map(|b| f64::from_le_bytes(b).to_string()),
        "bool" => match bytes {
            [0] => Some("false".into()),
            [1] => Some("true".into()),
            _ => None,
        },
        "map" => pairs(bytes).map(|entries| {
            let entries: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{}={}", k, text(v)))
                .collect();
            format!("{{{}}}", entries.join(","))
        }),
        "list" => pairs(bytes).map(|entries| {
            let items: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
            format!("[{}]", items.join(","))
        }),
        "size" => Some(format!("{} bytes", bytes.len())),
        _ => Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
    };
    shown.unwrap_or_else(|| format!("<{} bytes, not a {}>", bytes.len(), kind))
}

fn run(probes: &[Probe], when: &str) {
    for probe in probes.iter().filter(|p| p.when == when) {
        match get(&probe.path) {
            Ok(value) => info!("{} {}: {}", when, probe.path, show(&probe.kind, &value)),
            Err(status) => info!("{} {}: status {}", when, probe.path, status),
        }
    }
}

struct Root {
    probes: Arc<Vec<Probe>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let probes = String::from_utf8_lossy(&config)
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                Some(Probe {
                    when: words.next()?.to_string(),
                    path: words.next()?.to_string(),
                    kind: words.next().unwrap_or("hex").to_string(),
                })
            })
            .collect();
        self.probes = Arc::new(probes);
        run(&self.probes, "root");
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(if self.probes.iter().any(|p| p.when == "connection") {
            ContextType::StreamContext
        } else {
            ContextType::HttpContext
        })
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            probes: Arc::clone(&self.probes),
            first_data: true,
        }))
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Stream {
            probes: Arc::clone(&self.probes),
            first_data: true,
        }))
    }
}

struct Stream {
    probes: Arc<Vec<Probe>>,
    first_data: bool,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if let Some(assignment) = self.get_http_request_header("x-set-property") {
            if let Some((name, value)) = assignment.split_once('=') {
                // SAFETY: valid slices.
                let status = unsafe {
                    proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len())
                };
                info!("set {}: {}", name, status);
            }
        }
        run(&self.probes, "request");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        run(&self.probes, "response");
        Action::Continue
    }

    fn on_log(&mut self) {
        run(&self.probes, "log");
    }
}

impl StreamContext for Stream {
    fn on_downstream_data(&mut self, _size: usize, _end_of_stream: bool) -> Action {
        if std::mem::take(&mut self.first_data) {
            run(&self.probes, "connection");
        }
        Action::Continue
    }
}
