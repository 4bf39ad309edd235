//! The Proxy-Wasm host functions as C symbols, for proxy-wasm SDK plugins built as native
//! shared libraries.
//!
//! Such a library imports `proxy_log` and the rest as undefined symbols. The executable defines
//! them here and exports them dynamically (its build script passes
//! `-Wl,--export-dynamic-symbol=proxy_*`, see [`crate::LINK_ARG`]), so the dynamic linker binds
//! every loaded library to these. Each forwards its arguments, with their C types, to the plugin
//! instance running on the calling thread ([`runtime_null::call_host`]): the symbols are shared,
//! the state is not.

use crate::host_imports::{call, HostImport};

/// A C argument as a 64-bit slot.
trait Slot {
    fn slot(self) -> u64;
}

impl Slot for u32 {
    fn slot(self) -> u64 {
        u64::from(self)
    }
}

impl Slot for i32 {
    fn slot(self) -> u64 {
        // Zero-extended from the unsigned value, as WebAssembly engines pass i32 arguments.
        u64::from(self as u32)
    }
}

impl Slot for u64 {
    fn slot(self) -> u64 {
        self
    }
}

impl Slot for i64 {
    fn slot(self) -> u64 {
        self as u64
    }
}

impl Slot for usize {
    fn slot(self) -> u64 {
        self as u64
    }
}

impl Slot for bool {
    fn slot(self) -> u64 {
        u64::from(self)
    }
}

impl<T> Slot for *const T {
    fn slot(self) -> u64 {
        self.expose_provenance() as u64
    }
}

impl<T> Slot for *mut T {
    fn slot(self) -> u64 {
        self.expose_provenance() as u64
    }
}

macro_rules! host_symbols {
    ($($import:ident => fn $name:ident($($arg:ident: $ty:ty),* $(,)?);)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "`, forwarded to the running plugin's host.")]
            ///
            /// # Safety
            /// Pointer arguments must be valid for the access the Proxy-Wasm ABI defines, as for
            /// any C function; only trusted native plugins call this.
            #[no_mangle]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> u32 {
                call(HostImport::$import, &[$(Slot::slot($arg)),*])
            }
        )*

        /// Refers to every symbol, so that linking the loader keeps them all: nothing else in the
        /// executable calls them, and the linker drops what nothing refers to.
        pub(crate) fn keep_symbols() {
            std::hint::black_box([$($name as *const ()),*]);
        }
    };
}

// The C types of the proxy-wasm SDK's declarations (and the ABI spec's).
host_symbols! {
    Log => fn proxy_log(level: u32, message: *const u8, message_size: usize);
    GetLogLevel => fn proxy_get_log_level(return_level: *mut u32);
    GetCurrentTimeNanoseconds => fn proxy_get_current_time_nanoseconds(return_time: *mut u64);
    SetTickPeriodMilliseconds => fn proxy_set_tick_period_milliseconds(period: u32);
    GetBufferBytes => fn proxy_get_buffer_bytes(
        buffer_type: u32, start: usize, max_size: usize,
        return_data: *mut *mut u8, return_size: *mut usize,
    );
    SetBufferBytes => fn proxy_set_buffer_bytes(
        buffer_type: u32, start: usize, size: usize, data: *const u8, data_size: usize,
    );
    GetBufferStatus => fn proxy_get_buffer_status(
        buffer_type: u32, return_length: *mut usize, return_flags: *mut u32,
    );
    GetHeaderMapPairs => fn proxy_get_header_map_pairs(
        map_type: u32, return_data: *mut *mut u8, return_size: *mut usize,
    );
    SetHeaderMapPairs => fn proxy_set_header_map_pairs(
        map_type: u32, data: *const u8, size: usize,
    );
    GetHeaderMapValue => fn proxy_get_header_map_value(
        map_type: u32, key: *const u8, key_size: usize,
        return_data: *mut *mut u8, return_size: *mut usize,
    );
    AddHeaderMapValue => fn proxy_add_header_map_value(
        map_type: u32, key: *const u8, key_size: usize, value: *const u8, value_size: usize,
    );
    ReplaceHeaderMapValue => fn proxy_replace_header_map_value(
        map_type: u32, key: *const u8, key_size: usize, value: *const u8, value_size: usize,
    );
    RemoveHeaderMapValue => fn proxy_remove_header_map_value(
        map_type: u32, key: *const u8, key_size: usize,
    );
    GetHeaderMapSize => fn proxy_get_header_map_size(map_type: u32, return_size: *mut usize);
    GetProperty => fn proxy_get_property(
        path: *const u8, path_size: usize, return_data: *mut *mut u8, return_size: *mut usize,
    );
    SetProperty => fn proxy_set_property(
        path: *const u8, path_size: usize, value: *const u8, value_size: usize,
    );
    SendLocalResponse => fn proxy_send_local_response(
        status_code: u32, details: *const u8, details_size: usize,
        body: *const u8, body_size: usize, headers: *const u8, headers_size: usize,
        grpc_status: i32,
    );
    ContinueStream => fn proxy_continue_stream(stream_type: u32);
    CloseStream => fn proxy_close_stream(stream_type: u32);
    SetEffectiveContext => fn proxy_set_effective_context(context_id: u32);
    Done => fn proxy_done();
    GetSharedData => fn proxy_get_shared_data(
        key: *const u8, key_size: usize, return_data: *mut *mut u8, return_size: *mut usize,
        return_cas: *mut u32,
    );
    SetSharedData => fn proxy_set_shared_data(
        key: *const u8, key_size: usize, value: *const u8, value_size: usize, cas: u32,
    );
    RegisterSharedQueue => fn proxy_register_shared_queue(
        name: *const u8, name_size: usize, return_id: *mut u32,
    );
    ResolveSharedQueue => fn proxy_resolve_shared_queue(
        vm_id: *const u8, vm_id_size: usize, name: *const u8, name_size: usize,
        return_id: *mut u32,
    );
    DequeueSharedQueue => fn proxy_dequeue_shared_queue(
        queue_id: u32, return_data: *mut *mut u8, return_size: *mut usize,
    );
    EnqueueSharedQueue => fn proxy_enqueue_shared_queue(
        queue_id: u32, value: *const u8, value_size: usize,
    );
    DefineMetric => fn proxy_define_metric(
        metric_type: u32, name: *const u8, name_size: usize, return_id: *mut u32,
    );
    IncrementMetric => fn proxy_increment_metric(metric_id: u32, offset: i64);
    RecordMetric => fn proxy_record_metric(metric_id: u32, value: u64);
    GetMetric => fn proxy_get_metric(metric_id: u32, return_value: *mut u64);
    HttpCall => fn proxy_http_call(
        upstream: *const u8, upstream_size: usize, headers: *const u8, headers_size: usize,
        body: *const u8, body_size: usize, trailers: *const u8, trailers_size: usize,
        timeout: u32, return_token: *mut u32,
    );
    GrpcCall => fn proxy_grpc_call(
        upstream: *const u8, upstream_size: usize, service: *const u8, service_size: usize,
        method: *const u8, method_size: usize, metadata: *const u8, metadata_size: usize,
        message: *const u8, message_size: usize, timeout: u32, return_token: *mut u32,
    );
    GrpcStream => fn proxy_grpc_stream(
        upstream: *const u8, upstream_size: usize, service: *const u8, service_size: usize,
        method: *const u8, method_size: usize, metadata: *const u8, metadata_size: usize,
        return_token: *mut u32,
    );
    GrpcSend => fn proxy_grpc_send(
        token: u32, message: *const u8, message_size: usize, end_of_stream: bool,
    );
    GrpcCancel => fn proxy_grpc_cancel(token: u32);
    GrpcClose => fn proxy_grpc_close(token: u32);
    GetStatus => fn proxy_get_status(
        return_code: *mut u32, return_message: *mut *mut u8, return_message_size: *mut usize,
    );
    CallForeignFunction => fn proxy_call_foreign_function(
        name: *const u8, name_size: usize, arguments: *const u8, arguments_size: usize,
        return_results: *mut *mut u8, return_results_size: *mut usize,
    );
}
