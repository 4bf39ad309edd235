//! The Proxy-Wasm callbacks a native plugin exports, with their C types.
//!
//! A WebAssembly engine calls an export knowing its type from the module. A native library has
//! only symbol addresses, so the C type of every callback the ABI defines is written down here
//! (as the proxy-wasm SDK declares them), and each is called through a function pointer of
//! exactly that type.

use runtime_api::{Export, ExternKind, FunctionType, ValType};

/// The C type of an exported callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    /// `fn()`
    Unit,
    /// `fn(u32)`
    U32,
    /// `fn(u32) -> bool`
    U32ToBool,
    /// `fn(u32) -> u32` (an `Action`)
    U32ToU32,
    /// `fn(u32, u32)`
    U32U32,
    /// `fn(u32, usize) -> bool`
    U32UsizeToBool,
    /// `fn(u32, usize) -> u32`
    U32UsizeToU32,
    /// `fn(u32, usize, bool) -> u32`
    U32UsizeBoolToU32,
    /// `fn(u32, u32, u32)`
    U32U32U32,
    /// `fn(u32, u32, usize)`
    U32U32Usize,
    /// `fn(u32, u32, usize, usize, usize)`
    U32U32UsizeUsizeUsize,
    /// `fn(usize) -> *mut u8`, the allocator.
    UsizeToPointer,
}

impl Shape {
    /// The WebAssembly type a wasm32 build of the same plugin exports: the ABI checks this.
    pub(crate) fn wasm_type(self) -> FunctionType {
        use Shape::*;
        const I: ValType = ValType::I32;
        let (params, results): (&[ValType], &[ValType]) = match self {
            Unit => (&[], &[]),
            U32 => (&[I], &[]),
            U32ToBool | U32ToU32 => (&[I], &[I]),
            U32U32 => (&[I, I], &[]),
            U32UsizeToBool | U32UsizeToU32 => (&[I, I], &[I]),
            U32UsizeBoolToU32 => (&[I, I, I], &[I]),
            U32U32U32 | U32U32Usize => (&[I, I, I], &[]),
            U32U32UsizeUsizeUsize => (&[I, I, I, I, I], &[]),
            UsizeToPointer => (&[I], &[I]),
        };
        FunctionType {
            params: params.to_vec(),
            results: results.to_vec(),
        }
    }

    /// How many parameters and results [`Shape::wasm_type`] has, without allocating.
    pub(crate) fn arity(self) -> (usize, usize) {
        use Shape::*;
        match self {
            Unit => (0, 0),
            U32 => (1, 0),
            U32ToBool | U32ToU32 | UsizeToPointer => (1, 1),
            U32U32 => (2, 0),
            U32UsizeToBool | U32UsizeToU32 => (2, 1),
            U32UsizeBoolToU32 => (3, 1),
            U32U32U32 | U32U32Usize => (3, 0),
            U32U32UsizeUsizeUsize => (5, 0),
        }
    }

    /// Calls the function at `address` as this shape.
    ///
    /// # Safety
    /// `address` must be a function of exactly this C type, and `args`/`results` must have the
    /// lengths of [`Shape::wasm_type`].
    pub(crate) unsafe fn call(self, address: *const (), args: &[u64], results: &mut [u64]) {
        use Shape::*;
        // The host passes i32 values zero-extended in 64-bit slots; C wants them as their real
        // types, and a `bool` must be exactly 0 or 1.
        let u32_at = |i: usize| args[i] as u32;
        let usize_at = |i: usize| args[i] as usize;
        let bool_at = |i: usize| args[i] != 0;
        // SAFETY (all arms): the caller guarantees `address` has this shape's C type.
        unsafe {
            match self {
                Unit => std::mem::transmute::<*const (), extern "C" fn()>(address)(),
                U32 => std::mem::transmute::<*const (), extern "C" fn(u32)>(address)(u32_at(0)),
                U32ToBool => {
                    let f = std::mem::transmute::<*const (), extern "C" fn(u32) -> bool>(address);
                    results[0] = u64::from(f(u32_at(0)));
                }
                U32ToU32 => {
                    let f = std::mem::transmute::<*const (), extern "C" fn(u32) -> u32>(address);
                    results[0] = u64::from(f(u32_at(0)));
                }
                U32U32 => {
                    let f = std::mem::transmute::<*const (), extern "C" fn(u32, u32)>(address);
                    f(u32_at(0), u32_at(1));
                }
                U32UsizeToBool => {
                    let f = std::mem::transmute::<*const (), extern "C" fn(u32, usize) -> bool>(
                        address,
                    );
                    results[0] = u64::from(f(u32_at(0), usize_at(1)));
                }
                U32UsizeToU32 => {
                    let f =
                        std::mem::transmute::<*const (), extern "C" fn(u32, usize) -> u32>(address);
                    results[0] = u64::from(f(u32_at(0), usize_at(1)));
                }
                U32UsizeBoolToU32 => {
                    let f = std::mem::transmute::<*const (), extern "C" fn(u32, usize, bool) -> u32>(
                        address,
                    );
                    results[0] = u64::from(f(u32_at(0), usize_at(1), bool_at(2)));
                }
                U32U32U32 => {
                    let f = std::mem::transmute::<*const (), extern "C" fn(u32, u32, u32)>(address);
                    f(u32_at(0), u32_at(1), u32_at(2));
                }
                U32U32Usize => {
                    let f =
                        std::mem::transmute::<*const (), extern "C" fn(u32, u32, usize)>(address);
                    f(u32_at(0), u32_at(1), usize_at(2));
                }
                U32U32UsizeUsizeUsize => {
                    let f = std::mem::transmute::<
                        *const (),
                        extern "C" fn(u32, u32, usize, usize, usize),
                    >(address);
                    f(u32_at(0), u32_at(1), usize_at(2), usize_at(3), usize_at(4));
                }
                UsizeToPointer => {
                    let f =
                        std::mem::transmute::<*const (), extern "C" fn(usize) -> *mut u8>(address);
                    results[0] = f(usize_at(0)).expose_provenance() as u64;
                }
            }
        }
    }
}

/// Every export a native Proxy-Wasm plugin may have, with its C type. The ABI version marker is
/// found separately.
pub(crate) const CALLBACKS: &[(&str, Shape)] = &[
    ("_initialize", Shape::Unit),
    ("proxy_on_memory_allocate", Shape::UsizeToPointer),
    ("proxy_on_context_create", Shape::U32U32),
    ("proxy_on_vm_start", Shape::U32UsizeToBool),
    ("proxy_on_configure", Shape::U32UsizeToBool),
    ("proxy_on_tick", Shape::U32),
    ("proxy_on_queue_ready", Shape::U32U32),
    ("proxy_on_done", Shape::U32ToBool),
    ("proxy_on_log", Shape::U32),
    ("proxy_on_delete", Shape::U32),
    ("proxy_on_new_connection", Shape::U32ToU32),
    ("proxy_on_downstream_data", Shape::U32UsizeBoolToU32),
    ("proxy_on_upstream_data", Shape::U32UsizeBoolToU32),
    ("proxy_on_downstream_connection_close", Shape::U32U32),
    ("proxy_on_upstream_connection_close", Shape::U32U32),
    ("proxy_on_request_headers", Shape::U32UsizeBoolToU32),
    ("proxy_on_request_body", Shape::U32UsizeBoolToU32),
    ("proxy_on_request_trailers", Shape::U32UsizeToU32),
    ("proxy_on_response_headers", Shape::U32UsizeBoolToU32),
    ("proxy_on_response_body", Shape::U32UsizeBoolToU32),
    ("proxy_on_response_trailers", Shape::U32UsizeToU32),
    ("proxy_on_http_call_response", Shape::U32U32UsizeUsizeUsize),
    ("proxy_on_grpc_receive_initial_metadata", Shape::U32U32U32),
    ("proxy_on_grpc_receive", Shape::U32U32Usize),
    ("proxy_on_grpc_receive_trailing_metadata", Shape::U32U32U32),
    ("proxy_on_grpc_close", Shape::U32U32U32),
    ("proxy_on_foreign_function", Shape::U32U32Usize),
];

/// The ABI version markers a plugin may export (functions of no arguments).
pub(crate) const ABI_MARKERS: &[&str] = &[
    "proxy_abi_version_0_1_0",
    "proxy_abi_version_0_2_0",
    "proxy_abi_version_0_2_1",
];

/// An export entry for a function of type `ty`.
pub(crate) fn function_export(name: &str, ty: FunctionType) -> Export {
    Export {
        name: name.into(),
        kind: ExternKind::Function(ty),
    }
}

/// The memory export the ABI checks for: a native plugin's memory is the process's.
pub(crate) fn memory_export() -> Export {
    Export {
        name: "memory".into(),
        kind: ExternKind::Memory,
    }
}
