//! Typed host calls, over [`crate::host_imports`] or [`abi::direct`]. The public ones have the
//! signatures of the SDK's `hostcalls` functions of the same names (buffers, metrics, gRPC cancel
//! and close); the others serve the traits' methods.
//!
//! The calls on a request's hot path (header maps, logging) skip the host-function interface
//! altogether: they run [`abi::direct`]'s functions on the VM state the null runtime lends
//! ([`runtime_null::with_state`]), so values are lent straight from the embedder's maps instead
//! of being copied through the plugin's allocator. Both paths answer alike.

use std::ptr::null_mut;
use std::time::{Duration, SystemTime};

use abi::direct::HostCallResult;

use super::dispatcher::Callout;
use super::types::{BufferType, Bytes, LogLevel, MapType, MetricType, Status, StreamType};
use crate::host_imports::{call, HostImport};

/// A native address as a slot.
fn address<T>(pointer: *const T) -> u64 {
    pointer.expose_provenance() as u64
}

fn bytes(value: &[u8]) -> [u64; 2] {
    [address(value.as_ptr()), value.len() as u64]
}

fn status(code: u32) -> Result<(), Status> {
    match code {
        0 => Ok(()),
        1 => Err(Status::NotFound),
        2 => Err(Status::BadArgument),
        3 => Err(Status::SerializationFailure),
        4 => Err(Status::ParseFailure),
        6 => Err(Status::InvalidMemoryAccess),
        7 => Err(Status::Empty),
        8 => Err(Status::CasMismatch),
        12 => Err(Status::Unimplemented),
        _ => Err(Status::InternalFailure),
    }
}

/// As the proxy-wasm SDK's calls that only act (set a header, a property): any status but OK
/// is a bug of the plugin or a capability the host withheld, and panics with the SDK's message.
fn expect_ok(code: u32) {
    if code != 0 {
        panic!("unexpected status: {code}");
    }
}

/// [`expect_ok`] for a call made directly.
fn expect_done(result: Result<(), Status>) {
    if let Err(status) = result {
        expect_ok(status.code());
    }
}

/// Makes a host call directly on the running call's VM state ([`abi::direct`]). Failing to reach
/// the state (no call running, or the state in use) is `INTERNAL_FAILURE`, as [`call`] answers
/// when the host function cannot run; a trap also ends the plugin's call.
fn direct<R>(call: impl FnOnce(&mut abi::VmState) -> HostCallResult<R>) -> Result<R, Status> {
    runtime_null::with_state(call).unwrap_or(Err(Status::InternalFailure))
}

/// Calls a host function that returns data through `(return_data, return_size)` as its last two
/// arguments, and takes ownership of the data (allocated by this plugin's allocator).
fn with_return_data(import: HostImport, args: &[u64]) -> Result<Option<Bytes>, Status> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut slots = [0u64; 12];
    slots[..args.len()].copy_from_slice(args);
    slots[args.len()] = address(&mut data as *mut *mut u8);
    slots[args.len() + 1] = address(&mut size as *mut usize);
    status(call(import, &slots[..args.len() + 2]))?;
    Ok(take(data, size))
}

fn take(data: *mut u8, size: usize) -> Option<Bytes> {
    if data.is_null() {
        return None;
    }
    // SAFETY: the host filled `size` bytes at `data`, which it got from this plugin's allocator
    // (`allocate`) for exactly `size` bytes.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Bytes as text, without a copy when they are valid UTF-8 (the usual case).
pub(crate) fn into_string(bytes: Bytes) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
}

/// The allocator the host calls to hand data to the plugin.
pub(crate) fn allocate(size: usize) -> *mut u8 {
    let mut block = std::mem::ManuallyDrop::new(Vec::<u8>::with_capacity(size));
    block.as_mut_ptr()
}

pub(crate) fn log(level: LogLevel, message: &str) {
    if runtime_null::in_instance_call() {
        let _ = direct(|state| abi::direct::log(state, level, message.as_bytes()));
        return;
    }
    // Outside a call (a context dropped with its thread), `call` writes the line to stderr.
    let [data, len] = bytes(message.as_bytes());
    call(HostImport::Log, &[level as u64, data, len]);
}

pub(crate) fn get_current_time() -> SystemTime {
    let mut nanos = 0u64;
    call(
        HostImport::GetCurrentTimeNanoseconds,
        &[address(&mut nanos as *mut u64)],
    );
    SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos)
}

pub(crate) fn set_tick_period(period: Duration) {
    call(
        HostImport::SetTickPeriodMilliseconds,
        &[period.as_millis().min(u128::from(u32::MAX)) as u64],
    );
}

/// Up to `max_size` bytes of a buffer from `start` (the SDK's `hostcalls::get_buffer`).
pub fn get_buffer(
    buffer: BufferType,
    start: usize,
    max_size: usize,
) -> Result<Option<Bytes>, Status> {
    with_return_data(
        HostImport::GetBufferBytes,
        &[buffer as u64, start as u64, max_size as u64],
    )
}

/// [`get_buffer`] for the traits' methods, which return no status.
pub(crate) fn buffer(buffer: BufferType, start: usize, max_size: usize) -> Option<Bytes> {
    get_buffer(buffer, start, max_size).ok().flatten()
}

pub(crate) fn set_buffer(buffer: BufferType, start: usize, size: usize, value: &[u8]) {
    let [data, len] = bytes(value);
    call(
        HostImport::SetBufferBytes,
        &[buffer as u64, start as u64, size as u64, data, len],
    );
}

pub(crate) fn get_map(map: MapType) -> Vec<(String, String)> {
    pairs(map, |value| String::from_utf8_lossy(value).into_owned())
}

pub(crate) fn get_map_bytes(map: MapType) -> Vec<(String, Bytes)> {
    pairs(map, <[u8]>::to_vec)
}

/// Every pair of a map, names as text and values as `value` makes them; none on failure.
fn pairs<V>(map: MapType, value: impl Fn(&[u8]) -> V) -> Vec<(String, V)> {
    direct(|state| {
        let mut pairs = Vec::new();
        let status = abi::direct::get_header_map_pairs(state, map, &mut |name, bytes| {
            pairs.push((String::from_utf8_lossy(name).into_owned(), value(bytes)));
        })?;
        Ok(status.map(|()| pairs))
    })
    .unwrap_or_default()
}

pub(crate) fn set_map(map: MapType, pairs: &[(&str, &[u8])]) {
    expect_done(direct(|state| {
        abi::direct::set_header_map_pairs(
            state,
            map,
            pairs.iter().map(|(name, value)| (name.as_bytes(), *value)),
        )
    }));
}

pub(crate) fn get_map_value(map: MapType, name: &str) -> Option<Bytes> {
    // As the proxy-wasm SDK: an empty value comes back as no data, i.e. `None`.
    direct(|state| abi::direct::get_header_map_value(state, map, name.as_bytes(), <[u8]>::to_vec))
        .ok()
        .filter(|value| !value.is_empty())
}

pub(crate) fn set_map_value(map: MapType, name: &str, value: Option<&[u8]>) {
    let key = name.as_bytes();
    expect_done(direct(|state| match value {
        Some(value) => abi::direct::replace_header_map_value(state, map, key, value),
        None => abi::direct::remove_header_map_value(state, map, key),
    }));
}

pub(crate) fn add_map_value(map: MapType, name: &str, value: &[u8]) {
    expect_done(direct(|state| {
        abi::direct::add_header_map_value(state, map, name.as_bytes(), value)
    }));
}

/// A property path as the proxy-wasm SDK sends it: segments separated (not ended) by NUL.
fn serialize_path(path: &[&str]) -> Vec<u8> {
    path.iter()
        .map(|part| part.as_bytes())
        .collect::<Vec<_>>()
        .join(&0)
}

pub(crate) fn get_property(path: &[&str]) -> Option<Bytes> {
    let serialized = serialize_path(path);
    let [data, len] = bytes(&serialized);
    with_return_data(HostImport::GetProperty, &[data, len])
        .ok()
        .flatten()
}

pub(crate) fn set_property(path: &[&str], value: Option<&[u8]>) {
    let serialized = serialize_path(path);
    let [path_data, path_len] = bytes(&serialized);
    let [data, len] = bytes(value.unwrap_or_default());
    expect_ok(call(
        HostImport::SetProperty,
        &[path_data, path_len, data, len],
    ));
}

pub(crate) fn get_shared_data(key: &str) -> (Option<Bytes>, Option<u32>) {
    let [key_data, key_len] = bytes(key.as_bytes());
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut cas = 0u32;
    let code = call(
        HostImport::GetSharedData,
        &[
            key_data,
            key_len,
            address(&mut data as *mut *mut u8),
            address(&mut size as *mut usize),
            address(&mut cas as *mut u32),
        ],
    );
    match status(code) {
        Ok(()) => (take(data, size), Some(cas)),
        Err(_) => (None, None),
    }
}

pub(crate) fn set_shared_data(
    key: &str,
    value: Option<&[u8]>,
    cas: Option<u32>,
) -> Result<(), Status> {
    let [key_data, key_len] = bytes(key.as_bytes());
    let [data, len] = bytes(value.unwrap_or_default());
    status(call(
        HostImport::SetSharedData,
        &[key_data, key_len, data, len, u64::from(cas.unwrap_or(0))],
    ))
}

fn with_return_id(import: HostImport, args: &[u64]) -> Result<u32, Status> {
    let mut id = 0u32;
    let mut slots = [0u64; 12];
    slots[..args.len()].copy_from_slice(args);
    slots[args.len()] = address(&mut id as *mut u32);
    status(call(import, &slots[..args.len() + 1]))?;
    Ok(id)
}

pub(crate) fn register_shared_queue(name: &str) -> Result<u32, Status> {
    let [data, len] = bytes(name.as_bytes());
    with_return_id(HostImport::RegisterSharedQueue, &[data, len])
}

pub(crate) fn resolve_shared_queue(vm_id: &str, name: &str) -> Result<Option<u32>, Status> {
    let [vm_data, vm_len] = bytes(vm_id.as_bytes());
    let [data, len] = bytes(name.as_bytes());
    match with_return_id(
        HostImport::ResolveSharedQueue,
        &[vm_data, vm_len, data, len],
    ) {
        Ok(id) => Ok(Some(id)),
        Err(Status::NotFound) => Ok(None),
        Err(other) => Err(other),
    }
}

pub(crate) fn dequeue_shared_queue(queue_id: u32) -> Result<Option<Bytes>, Status> {
    match with_return_data(HostImport::DequeueSharedQueue, &[u64::from(queue_id)]) {
        Ok(data) => Ok(Some(data.unwrap_or_default())),
        Err(Status::Empty) => Ok(None),
        Err(other) => Err(other),
    }
}

pub(crate) fn enqueue_shared_queue(queue_id: u32, value: Option<&[u8]>) -> Result<(), Status> {
    let [data, len] = bytes(value.unwrap_or_default());
    status(call(
        HostImport::EnqueueSharedQueue,
        &[u64::from(queue_id), data, len],
    ))
}

/// Defines a metric, returning its id.
pub fn define_metric(metric_type: MetricType, name: &str) -> Result<u32, Status> {
    let [data, len] = bytes(name.as_bytes());
    with_return_id(HostImport::DefineMetric, &[metric_type as u64, data, len])
}

/// Adds `offset` to a metric.
pub fn increment_metric(metric_id: u32, offset: i64) -> Result<(), Status> {
    status(call(
        HostImport::IncrementMetric,
        &[u64::from(metric_id), offset as u64],
    ))
}

/// Sets a metric.
pub fn record_metric(metric_id: u32, value: u64) -> Result<(), Status> {
    status(call(
        HostImport::RecordMetric,
        &[u64::from(metric_id), value],
    ))
}

/// Reads a metric.
pub fn get_metric(metric_id: u32) -> Result<u64, Status> {
    let mut value = 0u64;
    status(call(
        HostImport::GetMetric,
        &[u64::from(metric_id), address(&mut value as *mut u64)],
    ))?;
    Ok(value)
}

pub(crate) fn send_http_response(
    status_code: u32,
    headers: &[(&str, &[u8])],
    body: Option<&[u8]>,
    grpc_status: i32,
) -> Result<(), Status> {
    let serialized = abi::wire::encode(headers.iter().map(|(n, v)| (n.as_bytes(), *v)));
    let [headers_data, headers_len] = bytes(&serialized);
    let [body_data, body_len] = bytes(body.unwrap_or_default());
    status(call(
        HostImport::SendLocalResponse,
        &[
            u64::from(status_code),
            0,
            0,
            body_data,
            body_len,
            headers_data,
            headers_len,
            u64::from(grpc_status as u32),
        ],
    ))
}

pub(crate) fn continue_stream(stream: StreamType) -> Result<(), Status> {
    status(call(HostImport::ContinueStream, &[stream as u64]))
}

pub(crate) fn close_stream(stream: StreamType) -> Result<(), Status> {
    status(call(HostImport::CloseStream, &[stream as u64]))
}

pub(crate) fn set_effective_context(context_id: u32) -> Result<(), Status> {
    status(call(
        HostImport::SetEffectiveContext,
        &[u64::from(context_id)],
    ))
}

pub(crate) fn done() -> Result<(), Status> {
    status(call(HostImport::Done, &[]))
}

pub(crate) fn dispatch_http_call(
    upstream: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    trailers: &[(&str, &str)],
    timeout: Duration,
) -> Result<u32, Status> {
    let headers = abi::wire::encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let trailers = abi::wire::encode(trailers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let [upstream_data, upstream_len] = bytes(upstream.as_bytes());
    let [headers_data, headers_len] = bytes(&headers);
    let [body_data, body_len] = bytes(body.unwrap_or_default());
    let [trailers_data, trailers_len] = bytes(&trailers);
    let token = with_return_id(
        HostImport::HttpCall,
        &[
            upstream_data,
            upstream_len,
            headers_data,
            headers_len,
            body_data,
            body_len,
            trailers_data,
            trailers_len,
            timeout.as_millis().min(u128::from(u32::MAX)) as u64,
        ],
    )?;
    super::dispatcher::register_callout(Callout::Http, token);
    Ok(token)
}

/// The arguments `proxy_grpc_call` and `proxy_grpc_stream` begin with: upstream, service, method
/// and the serialized initial metadata, each as address and size.
fn grpc_target(upstream: &str, service: &str, method: &str, metadata: &[u8]) -> [u64; 8] {
    let [upstream_data, upstream_len] = bytes(upstream.as_bytes());
    let [service_data, service_len] = bytes(service.as_bytes());
    let [method_data, method_len] = bytes(method.as_bytes());
    let [metadata_data, metadata_len] = bytes(metadata);
    [
        upstream_data,
        upstream_len,
        service_data,
        service_len,
        method_data,
        method_len,
        metadata_data,
        metadata_len,
    ]
}

pub(crate) fn dispatch_grpc_call(
    upstream: &str,
    service: &str,
    method: &str,
    initial_metadata: &[(&str, &[u8])],
    message: Option<&[u8]>,
    timeout: Duration,
) -> Result<u32, Status> {
    let metadata = abi::wire::encode(initial_metadata.iter().map(|(n, v)| (n.as_bytes(), *v)));
    let mut args = [0u64; 11];
    args[..8].copy_from_slice(&grpc_target(upstream, service, method, &metadata));
    args[8..10].copy_from_slice(&bytes(message.unwrap_or_default()));
    args[10] = timeout.as_millis().min(u128::from(u32::MAX)) as u64;
    let token = with_return_id(HostImport::GrpcCall, &args)?;
    super::dispatcher::register_callout(Callout::GrpcCall, token);
    Ok(token)
}

pub(crate) fn open_grpc_stream(
    upstream: &str,
    service: &str,
    method: &str,
    initial_metadata: &[(&str, &[u8])],
) -> Result<u32, Status> {
    let metadata = abi::wire::encode(initial_metadata.iter().map(|(n, v)| (n.as_bytes(), *v)));
    let args = grpc_target(upstream, service, method, &metadata);
    let token = with_return_id(HostImport::GrpcStream, &args)?;
    super::dispatcher::register_callout(Callout::GrpcStream, token);
    Ok(token)
}

pub(crate) fn send_grpc_stream_message(
    token: u32,
    message: Option<&[u8]>,
    end_stream: bool,
) -> Result<(), Status> {
    let [data, len] = bytes(message.unwrap_or_default());
    status(call(
        HostImport::GrpcSend,
        &[u64::from(token), data, len, u64::from(end_stream)],
    ))
}

/// Cancels a gRPC call: no callback comes for it.
pub fn cancel_grpc_call(token: u32) -> Result<(), Status> {
    status(call(HostImport::GrpcCancel, &[u64::from(token)]))
}

/// Cancels a gRPC stream: no more callbacks come for it.
pub fn cancel_grpc_stream(token: u32) -> Result<(), Status> {
    status(call(HostImport::GrpcCancel, &[u64::from(token)]))
}

/// Half-closes a gRPC stream from the plugin's side.
pub fn close_grpc_stream(token: u32) -> Result<(), Status> {
    status(call(HostImport::GrpcClose, &[u64::from(token)]))
}

/// The status of the last gRPC reply: its code and message, if any.
pub(crate) fn get_grpc_status() -> (u32, Option<String>) {
    let mut code = 0u32;
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let result = call(
        HostImport::GetStatus,
        &[
            address(&mut code as *mut u32),
            address(&mut data as *mut *mut u8),
            address(&mut size as *mut usize),
        ],
    );
    // Taken whatever the status, so that nothing the host handed over leaks.
    let message = take(data, size).map(into_string);
    match status(result) {
        Ok(()) => (code, message),
        Err(_) => (code, None),
    }
}

pub(crate) fn call_foreign_function(
    name: &str,
    arguments: Option<&[u8]>,
) -> Result<Option<Bytes>, Status> {
    let [name_data, name_len] = bytes(name.as_bytes());
    let [data, len] = bytes(arguments.unwrap_or_default());
    with_return_data(
        HostImport::CallForeignFunction,
        &[name_data, name_len, data, len],
    )
}
