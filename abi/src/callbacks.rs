//! The callbacks a plugin may export, with their types per ABI version.

use runtime_api::{Signature, ValType};

use crate::AbiVersion;

const I: ValType = ValType::I32;

/// A callback the host calls, as an index into [`CALLBACKS`] and a VM's resolved handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum Callback {
    ContextCreate,
    VmStart,
    Configure,
    Tick,
    QueueReady,
    Done,
    Log,
    Delete,
    NewConnection,
    DownstreamData,
    UpstreamData,
    DownstreamConnectionClose,
    UpstreamConnectionClose,
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    HttpCallResponse,
    GrpcReceiveInitialMetadata,
    GrpcReceive,
    GrpcReceiveTrailingMetadata,
    GrpcClose,
    ForeignFunction,
}

/// How many callbacks there are.
pub(crate) const CALLBACK_COUNT: usize = Callback::ForeignFunction as usize + 1;

/// A callback's export name and types.
pub(crate) struct CallbackSpec {
    pub(crate) name: &'static str,
    /// The type in ABI 0.2.x.
    v0_2: Signature,
    /// The types a 0.1.0 module may export it with (empty if 0.1.0 has no such callback).
    v0_1: &'static [Signature],
}

impl CallbackSpec {
    /// Whether the callback exists in `abi`.
    pub(crate) fn in_abi(&self, abi: AbiVersion) -> bool {
        abi != AbiVersion::V0_1_0 || !self.v0_1.is_empty()
    }

    /// The types the callback may have in `abi`, the spec's first.
    pub(crate) fn signatures(&self, abi: AbiVersion) -> &[Signature] {
        match abi {
            AbiVersion::V0_1_0 => self.v0_1,
            AbiVersion::V0_2_0 | AbiVersion::V0_2_1 => std::slice::from_ref(&self.v0_2),
        }
    }
}

/// The callbacks a module of ABI `abi` may export, by export name, each with the type the spec
/// gives it in that version (0.1.0's header callbacks also have a second accepted shape), for
/// tools that generate plugins, such as the fuzzers.
pub fn callback_exports(abi: AbiVersion) -> impl Iterator<Item = (&'static str, Signature)> {
    CALLBACKS
        .iter()
        .filter_map(move |spec| Some((spec.name, *spec.signatures(abi).first()?)))
}

/// A callback of the same type in every version.
macro_rules! same {
    ($name:literal, $params:expr, $results:expr) => {
        CallbackSpec {
            name: $name,
            v0_2: Signature::new($params, $results),
            v0_1: &[Signature::new($params, $results)],
        }
    };
}

/// The header callbacks of 0.1.0 exist in two shapes. The spec's has `(context_id, headers)`;
/// the C++ SDK of 2020 and the Go SDK up to v0.0.14 (TinyGo, `-tags abi_010`) exported the same
/// marker with 0.2's third `end_of_stream` parameter, and MOSN runs those. Both are accepted; the
/// host passes as many arguments as the export takes.
const HEADERS_0_1: &[Signature] = &[
    Signature::new(&[I, I], &[I]),
    Signature::new(&[I, I, I], &[I]),
];

/// Every callback, in [`Callback`] order.
pub(crate) static CALLBACKS: [CallbackSpec; CALLBACK_COUNT] = [
    same!("proxy_on_context_create", &[I, I], &[]),
    same!("proxy_on_vm_start", &[I, I], &[I]),
    same!("proxy_on_configure", &[I, I], &[I]),
    same!("proxy_on_tick", &[I], &[]),
    same!("proxy_on_queue_ready", &[I, I], &[]),
    same!("proxy_on_done", &[I], &[I]),
    same!("proxy_on_log", &[I], &[]),
    same!("proxy_on_delete", &[I], &[]),
    same!("proxy_on_new_connection", &[I], &[I]),
    same!("proxy_on_downstream_data", &[I, I, I], &[I]),
    same!("proxy_on_upstream_data", &[I, I, I], &[I]),
    same!("proxy_on_downstream_connection_close", &[I, I], &[]),
    same!("proxy_on_upstream_connection_close", &[I, I], &[]),
    CallbackSpec {
        name: "proxy_on_request_headers",
        v0_2: Signature::new(&[I, I, I], &[I]),
        v0_1: HEADERS_0_1,
    },
    same!("proxy_on_request_body", &[I, I, I], &[I]),
    same!("proxy_on_request_trailers", &[I, I], &[I]),
    CallbackSpec {
        name: "proxy_on_response_headers",
        v0_2: Signature::new(&[I, I, I], &[I]),
        v0_1: HEADERS_0_1,
    },
    same!("proxy_on_response_body", &[I, I, I], &[I]),
    same!("proxy_on_response_trailers", &[I, I], &[I]),
    same!("proxy_on_http_call_response", &[I, I, I, I, I], &[]),
    same!("proxy_on_grpc_receive_initial_metadata", &[I, I, I], &[]),
    same!("proxy_on_grpc_receive", &[I, I, I], &[]),
    same!("proxy_on_grpc_receive_trailing_metadata", &[I, I, I], &[]),
    same!("proxy_on_grpc_close", &[I, I, I], &[]),
    CallbackSpec {
        name: "proxy_on_foreign_function",
        v0_2: Signature::new(&[I, I, I], &[]),
        v0_1: &[],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_enum_order() {
        assert_eq!(
            CALLBACKS[Callback::ContextCreate as usize].name,
            "proxy_on_context_create"
        );
        assert_eq!(
            CALLBACKS[Callback::RequestHeaders as usize].name,
            "proxy_on_request_headers"
        );
        assert_eq!(
            CALLBACKS[Callback::HttpCallResponse as usize].name,
            "proxy_on_http_call_response"
        );
        assert_eq!(
            CALLBACKS[Callback::ForeignFunction as usize].name,
            "proxy_on_foreign_function"
        );
    }
}
