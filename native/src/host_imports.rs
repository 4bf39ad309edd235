//! The host functions a native plugin may call, numbered for [`runtime_null::call_host`].

use std::sync::OnceLock;

use abi::AbiVersion;
use std::io::Write as _;

use runtime_api::{ExternKind, FunctionType, Import, Trap};

macro_rules! host_imports {
    ($($variant:ident => $name:ident),* $(,)?) => {
        /// A Proxy-Wasm host function, by its position in a native module's imports.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(usize)]
        pub enum HostImport {
            $(
                #[doc = concat!("`", stringify!($name), "`")]
                $variant,
            )*
        }

        /// The import names, in [`HostImport`] order.
        const NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

host_imports! {
    Log => proxy_log,
    GetLogLevel => proxy_get_log_level,
    GetCurrentTimeNanoseconds => proxy_get_current_time_nanoseconds,
    SetTickPeriodMilliseconds => proxy_set_tick_period_milliseconds,
    GetBufferBytes => proxy_get_buffer_bytes,
    SetBufferBytes => proxy_set_buffer_bytes,
    GetBufferStatus => proxy_get_buffer_status,
    GetHeaderMapPairs => proxy_get_header_map_pairs,
    SetHeaderMapPairs => proxy_set_header_map_pairs,
    GetHeaderMapValue => proxy_get_header_map_value,
    AddHeaderMapValue => proxy_add_header_map_value,
    ReplaceHeaderMapValue => proxy_replace_header_map_value,
    RemoveHeaderMapValue => proxy_remove_header_map_value,
    GetHeaderMapSize => proxy_get_header_map_size,
    GetProperty => proxy_get_property,
    SetProperty => proxy_set_property,
    SendLocalResponse => proxy_send_local_response,
    ContinueStream => proxy_continue_stream,
    CloseStream => proxy_close_stream,
    SetEffectiveContext => proxy_set_effective_context,
    Done => proxy_done,
    GetSharedData => proxy_get_shared_data,
    SetSharedData => proxy_set_shared_data,
    RegisterSharedQueue => proxy_register_shared_queue,
    ResolveSharedQueue => proxy_resolve_shared_queue,
    DequeueSharedQueue => proxy_dequeue_shared_queue,
    EnqueueSharedQueue => proxy_enqueue_shared_queue,
    DefineMetric => proxy_define_metric,
    IncrementMetric => proxy_increment_metric,
    RecordMetric => proxy_record_metric,
    GetMetric => proxy_get_metric,
    HttpCall => proxy_http_call,
    GrpcCall => proxy_grpc_call,
    GrpcStream => proxy_grpc_stream,
    GrpcSend => proxy_grpc_send,
    GrpcCancel => proxy_grpc_cancel,
    GrpcClose => proxy_grpc_close,
    GetStatus => proxy_get_status,
    CallForeignFunction => proxy_call_foreign_function,
}

/// `Status::InternalFailure`: what a native plugin sees when the host could not run its call.
const INTERNAL_FAILURE: u32 = 10;

/// Every host function a native plugin may call, as imports of module `env` typed as ABI 0.2.1
/// declares them (pointers and sizes travel in full 64-bit slots whatever the declared type).
pub(crate) fn imports() -> &'static [Import] {
    static IMPORTS: OnceLock<Vec<Import>> = OnceLock::new();
    IMPORTS.get_or_init(|| {
        let host = abi::host_functions(AbiVersion::V0_2_1);
        NAMES
            .iter()
            .map(|name| {
                let signature = host
                    .iter()
                    .find(|f| f.module == "env" && f.name == *name)
                    .map(|f| f.signature)
                    .unwrap_or_else(|| panic!("abi lacks host function {name}"));
                Import {
                    module: "env".into(),
                    name: (*name).into(),
                    kind: ExternKind::Function(FunctionType {
                        params: signature.params.to_vec(),
                        results: signature.results.to_vec(),
                    }),
                }
            })
            .collect()
    })
}

/// Calls `import` with `args` for the plugin instance running on this thread and returns the
/// status it reports. A call the host could not run (no plugin call on this thread, or the host
/// stopped the plugin) is `Status::InternalFailure`; in the second case the plugin's current call
/// fails with the host's trap when it returns.
pub fn call(import: HostImport, args: &[u64]) -> u32 {
    if import == HostImport::Log && !runtime_null::in_instance_call() {
        return log_outside_call(args);
    }
    match try_call(import, args) {
        Ok(status) => status,
        Err(_) => INTERNAL_FAILURE,
    }
}

/// A log line written where no plugin call runs: a plugin library's thread-local contexts are
/// dropped when their thread exits, and a context that logs from `Drop` would otherwise get a
/// failure, on which the SDK panics and, in an `extern "C"` callback's thread teardown, aborts
/// the process. The line goes to standard error instead.
fn log_outside_call(args: &[u64]) -> u32 {
    let &[level, data, size] = args else {
        return INTERNAL_FAILURE;
    };
    let message = if data == 0 || size == 0 || size > isize::MAX as u64 {
        &[][..]
    } else {
        // SAFETY: `proxy_log`'s contract (the only caller, through the `proxy_log` symbol or
        // the native SDK, both trusted native code) is that `data` points at `size` readable
        // bytes for the duration of the call.
        unsafe {
            std::slice::from_raw_parts(
                std::ptr::with_exposed_provenance::<u8>(data as usize),
                size as usize,
            )
        }
    };
    let level = abi::LogLevel::from_raw(level).map_or("unknown", abi::LogLevel::as_str);
    // Not `eprintln!`, which panics when standard error is closed: in an `extern "C"`
    // callback that would abort the process.
    let _ = writeln!(
        std::io::stderr(),
        "[{level}] (plugin, outside a call) {}",
        String::from_utf8_lossy(message)
    );
    0
}

/// As [`call`], with the failure.
pub fn try_call(import: HostImport, args: &[u64]) -> Result<u32, Trap> {
    let mut slots = [0u64; 12];
    let slots = &mut slots[..args.len().max(1)];
    slots[..args.len()].copy_from_slice(args);
    runtime_null::call_host(import as usize, slots)?;
    Ok(slots[0] as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_import_is_a_host_function_of_abi_0_2_1() {
        assert_eq!(imports().len(), NAMES.len());
        assert_eq!(
            imports()[HostImport::CallForeignFunction as usize].name,
            "proxy_call_foreign_function"
        );
    }
}
