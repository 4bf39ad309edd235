//! Shared pieces of pwhost's benchmarks: where the benchmark plugins live, the request the
//! benchmarks replay, a proxy-like [`Host`] with one reusable stream ([`BenchHost`]), the pwhost
//! side of the lifecycle ([`pwhost_request`]) and a hand-written wasmtime host that is the
//! performance floor pwhost is compared against ([`floor`]).
//!
//! The benchmarks themselves are in `benches/lifecycle.rs`; `src/bin/memory.rs` measures the
//! resident memory of extra VM copies. A later `pwhost bench` command can reuse everything here.
//!
//! # Fairness
//!
//! pwhost and the floor keep their stream in the same [`BenchStream`]: the same header maps,
//! restored the same way before every request, and the same log counter. The maps are either
//! pwhost's own [`HeaderMap`] or [`ProxyHeaders`], storage the embedder owns and lends to pwhost
//! through [`abi::Headers`] (as a proxy does); the floors read and write the very same storage
//! through the same trait, monomorphized. So what differs
//! between the two is only what lies between the engine and the embedder's data: the ABI layer
//! (pointer checks, status codes, context bookkeeping, the `runtime_api` indirection) in pwhost,
//! and the least a correct host must do in the floor.

pub mod floor;
pub mod memory;
mod proxy_headers;

pub use proxy_headers::ProxyHeaders;

use std::io;
use std::path::{Path, PathBuf};

use abi::{
    BufferType, ContextId, HeaderMap, Headers, HeadersAction, Host, LocalResponse, LogLevel,
    MapType, Status, StreamType, Vm, VmError,
};

/// The plugin every lifecycle benchmark runs (`plugins/rust/lifecycle_bench`).
pub const LIFECYCLE_PLUGIN: &str = "lifecycle_bench";

/// The request headers of every benchmarked request; the plugin reads all ten by name.
pub const REQUEST_HEADERS: [(&str, &str); 10] = [
    (":method", "GET"),
    (":path", "/index.html"),
    (":authority", "example.com"),
    (":scheme", "https"),
    ("user-agent", "bench"),
    ("accept", "*/*"),
    ("accept-encoding", "gzip"),
    ("accept-language", "en"),
    ("x-request-id", "42"),
    ("x-forwarded-for", "10.0.0.1"),
];

/// The response headers of every benchmarked request; the plugin reads `:status`.
pub const RESPONSE_HEADERS: [(&str, &str); 3] = [
    (":status", "200"),
    ("content-type", "text/html"),
    ("content-length", "1024"),
];

/// The path of a prebuilt plugin of the repository: `plugins/dist/rust/<name>.wasm` (a name
/// ending in `.wasm` is taken as the file name). The file exists once `bash plugins/build.sh`
/// has run.
pub fn plugin_path(name: &str) -> PathBuf {
    let file = if name.ends_with(".wasm") {
        name.to_string()
    } else {
        format!("{name}.wasm")
    };
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist/rust")
        .join(file)
}

/// Reads a prebuilt plugin (see [`plugin_path`]). A missing file is an error telling the user to
/// build the plugins.
pub fn read_plugin(name: &str) -> io::Result<Vec<u8>> {
    let path = plugin_path(name);
    std::fs::read(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot read plugin {}: {e}; build the plugins first with `bash plugins/build.sh` \
                 (from the repository root)",
                path.display()
            ),
        )
    })
}

/// Header storage a benchmark stream can keep its maps in: [`HeaderMap`] (pwhost's in-memory
/// map) or [`ProxyHeaders`] (an embedder's own arena-backed map).
///
/// Beside [`Headers`], the floors need a lookup by position, so that they can find a value,
/// call the plugin's allocator, and copy the value without a second search by name.
pub trait BenchHeaders: Headers + Clone + Default + Send + 'static {
    /// A map holding `pairs`, in order.
    fn from_pairs(pairs: &[(&str, &str)]) -> Self;

    /// Makes `self` equal to `template`, without allocating when the plugin only appended
    /// entries (a proxy fills maps it already owns: allocation here would be the benchmark's
    /// cost, not the ABI's).
    fn restore_from(&mut self, template: &Self);

    /// The position of the first entry named `name` (ASCII case ignored) and its value's length.
    fn find(&self, name: &[u8]) -> Option<(usize, usize)>;

    /// The value of the entry at `index`.
    fn value_at(&self, index: usize) -> Option<&[u8]>;
}

impl BenchHeaders for HeaderMap {
    fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        pairs.iter().copied().collect()
    }

    fn restore_from(&mut self, template: &Self) {
        restore(self, template);
    }

    #[inline]
    fn find(&self, name: &[u8]) -> Option<(usize, usize)> {
        self.iter()
            .enumerate()
            .find(|(_, (key, _))| key.eq_ignore_ascii_case(name))
            .map(|(index, (_, value))| (index, value.len()))
    }

    #[inline]
    fn value_at(&self, index: usize) -> Option<&[u8]> {
        self.iter().nth(index).map(|(_, value)| value)
    }
}

impl BenchHeaders for ProxyHeaders {
    fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        ProxyHeaders::from_pairs(pairs)
    }

    fn restore_from(&mut self, template: &Self) {
        self.restore_from(template);
    }

    #[inline]
    fn find(&self, name: &[u8]) -> Option<(usize, usize)> {
        ProxyHeaders::find(self, name)
    }

    #[inline]
    fn value_at(&self, index: usize) -> Option<&[u8]> {
        ProxyHeaders::value_at(self, index)
    }
}

/// The state of the one HTTP stream a benchmark VM serves, shared by [`BenchHost`] and the
/// floors so that both do exactly the same embedder work, in the header storage `M`.
///
/// The header maps are restored from templates before every request ([`BenchStream::begin`]).
#[derive(Debug)]
pub struct BenchStream<M: BenchHeaders = HeaderMap> {
    context: u32,
    request: M,
    response: M,
    request_template: M,
    response_template: M,
    logs: u64,
}

impl<M: BenchHeaders> Default for BenchStream<M> {
    fn default() -> Self {
        BenchStream::new()
    }
}

impl<M: BenchHeaders> BenchStream<M> {
    /// A stream holding [`REQUEST_HEADERS`] and [`RESPONSE_HEADERS`], bound to no context yet.
    pub fn new() -> Self {
        let request_template = M::from_pairs(&REQUEST_HEADERS);
        let response_template = M::from_pairs(&RESPONSE_HEADERS);
        BenchStream {
            context: 0,
            request: request_template.clone(),
            response: response_template.clone(),
            request_template,
            response_template,
            logs: 0,
        }
    }

    /// Binds the stream to a new request's context and restores both header maps.
    #[inline]
    pub fn begin(&mut self, context: u32) {
        self.context = context;
        self.request.restore_from(&self.request_template);
        self.response.restore_from(&self.response_template);
    }

    /// The context the stream is bound to (0: none).
    pub fn context(&self) -> u32 {
        self.context
    }

    /// The header map `map` of `context`, if `context` is this stream's.
    #[inline]
    pub fn header_map(&mut self, context: u32, map: MapType) -> Option<&mut M> {
        if context != self.context || context == 0 {
            return None;
        }
        match map {
            MapType::HttpRequestHeaders => Some(&mut self.request),
            MapType::HttpResponseHeaders => Some(&mut self.response),
            _ => None,
        }
    }

    /// The request headers as the plugin left them.
    pub fn request_headers(&self) -> &M {
        &self.request
    }

    /// Records a log line: the benchmark only counts them.
    #[inline]
    pub fn log(&mut self, _level: LogLevel, _message: &str) {
        self.logs += 1;
    }

    /// How many lines plugins logged.
    pub fn logs(&self) -> u64 {
        self.logs
    }
}

/// Makes `map` equal to `template`. When the plugin only appended entries with names the
/// template lacks, they are removed in place (no allocation); otherwise the map is re-cloned.
fn restore(map: &mut HeaderMap, template: &HeaderMap) {
    const MAX_NAME: usize = 64;
    let prefix_intact =
        map.len() >= template.len() && map.iter().zip(template.iter()).all(|(a, b)| a == b);
    if !prefix_intact {
        *map = template.clone();
        return;
    }
    while map.len() > template.len() {
        let mut name = [0u8; MAX_NAME];
        let len = match map.iter().last() {
            Some((k, _)) if k.len() <= MAX_NAME && template.get(k).is_none() => {
                name[..k.len()].copy_from_slice(k);
                k.len()
            }
            _ => {
                *map = template.clone();
                return;
            }
        };
        map.remove(&name[..len]);
    }
}

/// A [`Host`] shaped like a proxy's: one reusable stream ([`BenchStream`]) instead of a map of
/// streams, logs counted instead of stored, and nothing else (properties, bodies, local replies
/// and calls are reported as unavailable).
///
/// `M` is where the stream keeps its headers: [`HeaderMap`] by default, [`ProxyHeaders`] for an
/// embedder lending its own storage ([`ProxyHost`]).
#[derive(Debug, Default)]
pub struct BenchHost<M: BenchHeaders = HeaderMap> {
    /// The stream the VM serves.
    pub stream: BenchStream<M>,
}

/// A [`BenchHost`] whose headers live in the embedder's own storage ([`ProxyHeaders`]).
pub type ProxyHost = BenchHost<ProxyHeaders>;

impl BenchHost {
    /// A host with a fresh [`BenchStream`] in [`HeaderMap`]s (`BenchHost::<M>::default()` for
    /// another storage, e.g. a [`ProxyHost`]).
    pub fn new() -> Self {
        BenchHost::default()
    }
}

impl<M: BenchHeaders> Host for BenchHost<M> {
    fn log(&mut self, _context: ContextId, level: LogLevel, message: &str) {
        self.stream.log(level, message);
    }

    fn header_map(&mut self, context: ContextId, map: MapType) -> Option<&mut dyn Headers> {
        let map: &mut dyn Headers = self.stream.header_map(context.0, map)?;
        Some(map)
    }

    fn buffer(&mut self, _context: ContextId, _buffer: BufferType) -> Option<&mut Vec<u8>> {
        None
    }

    fn send_local_response(&mut self, _context: ContextId, _response: LocalResponse) -> Status {
        Status::Unimplemented
    }

    fn continue_stream(&mut self, _context: ContextId, _stream: StreamType) -> Status {
        Status::Unimplemented
    }

    fn close_stream(&mut self, _context: ContextId, _stream: StreamType) -> Status {
        Status::Unimplemented
    }
}

/// What one request's headers callbacks returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestOutcome {
    /// `proxy_on_request_headers`'s action.
    pub request: HeadersAction,
    /// `proxy_on_response_headers`'s action.
    pub response: HeadersAction,
}

/// One full request through pwhost: create an HTTP context, bind the host's stream to it,
/// request headers, response headers, log, done, delete.
///
/// # Panics
/// If the VM's host is not a [`BenchHost`] (see [`pwhost_request_in`] for a [`ProxyHost`]).
#[inline]
pub fn pwhost_request(vm: &mut Vm) -> Result<RequestOutcome, VmError> {
    pwhost_request_in::<HeaderMap>(vm)
}

/// As [`pwhost_request`], on a VM whose host is a `BenchHost<M>`.
///
/// # Panics
/// If the VM's host is not a `BenchHost<M>`.
#[inline]
pub fn pwhost_request_in<M: BenchHeaders>(vm: &mut Vm) -> Result<RequestOutcome, VmError> {
    let context = vm.create_http_context()?;
    vm.host_as::<BenchHost<M>>()
        .expect("the VM's host is a BenchHost of this header storage")
        .stream
        .begin(context.0);
    let request = vm.on_request_headers(context, REQUEST_HEADERS.len(), false)?;
    let response = vm.on_response_headers(context, RESPONSE_HEADERS.len(), false)?;
    vm.on_log(context)?;
    vm.on_done(context)?;
    vm.on_delete(context)?;
    Ok(RequestOutcome { request, response })
}

/// A new pwhost VM of `plugin` with a [`BenchHost`], started and configured: what a worker
/// thread does before it can serve requests.
pub fn pwhost_vm(plugin: &abi::Plugin) -> Result<Vm, VmError> {
    pwhost_vm_in::<HeaderMap>(plugin)
}

/// As [`pwhost_vm`], with a `BenchHost<M>`.
pub fn pwhost_vm_in<M: BenchHeaders>(plugin: &abi::Plugin) -> Result<Vm, VmError> {
    let mut vm = Vm::new(plugin, Box::new(BenchHost::<M>::default()))?;
    vm.start()?;
    vm.configure()?;
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_removes_appended_headers_in_place() {
        let mut stream = BenchStream::<HeaderMap>::new();
        stream.begin(2);
        let map = stream.header_map(2, MapType::HttpRequestHeaders).unwrap();
        map.add(b"x-bench", b"1");
        assert_eq!(map.len(), 11);
        stream.begin(3);
        assert_eq!(stream.request, stream.request_template);
        assert!(stream.header_map(2, MapType::HttpRequestHeaders).is_none());
    }

    #[test]
    fn restore_reclones_changed_maps() {
        let mut stream = BenchStream::<HeaderMap>::new();
        stream.begin(2);
        let map = stream.header_map(2, MapType::HttpRequestHeaders).unwrap();
        map.replace(b":path", b"/other");
        map.add(b"accept", b"text/html");
        stream.begin(3);
        assert_eq!(stream.request, stream.request_template);
    }

    #[test]
    fn plugin_path_points_at_dist() {
        let path = plugin_path(LIFECYCLE_PLUGIN);
        assert!(path.ends_with("plugins/dist/rust/lifecycle_bench.wasm"));
        let missing = read_plugin("no_such_plugin").unwrap_err().to_string();
        assert!(missing.contains("bash plugins/build.sh"), "{missing}");
    }
}
