//! The engine interface of pwhost.
//!
//! A [`WasmRuntime`] hides one WebAssembly engine (or the native "null" runtime) behind a small set
//! of object-safe traits, so that the Proxy-Wasm ABI is written once and runs unchanged on every
//! engine. The shape follows from what all six engines can do cheaply:
//!
//! * Every Proxy-Wasm host function takes integer arguments and returns one `i32`, and every
//!   callback takes `i32` arguments and returns nothing or one `i32`. So a host function is a plain
//!   Rust function over 64-bit argument slots ([`HostCallback`]) and a guest call passes slices of
//!   `u64` ([`Instance::call`]): no boxing, no per-call allocation, no per-call type dispatch.
//! * A host function sees the guest through a [`Caller`]: the embedder's per-instance state, the
//!   guest memory (fetched fresh on every access, because `memory.grow` may move it) and the ability
//!   to call back into the guest (the ABI allocates reply buffers with the plugin's allocator).
//! * A module is compiled once ([`CompiledModule`]), linked once against a host function table
//!   ([`LinkedModule`]) and instantiated many times, on any thread, without re-registering host
//!   functions.
//! * What differs between engines (interrupting a running call, call deadlines, memory caps,
//!   precompiled artifacts) is reported as data in [`Capabilities`], so the ABI adapts without
//!   knowing which engine it runs on.
//!
//! The host state type `S` is a parameter of every trait: each engine implements the traits for
//! all `S`, and the ABI picks its own state type. Host functions therefore get `&mut S` directly,
//! with no downcast.

#[cfg(feature = "binary")]
pub mod binary;
mod caller;
mod capabilities;
mod error;
mod exports;
mod host;
mod limits;
mod memory;
mod module;
mod value;

pub use caller::Caller;
pub use capabilities::{Capabilities, RuntimeConfig};
pub use error::{panic_message, Error, StopReason, Trap, TrapKind, WasmTrapCode};
pub use exports::ExportedFunctions;
pub use host::{resolve_imports, HostCallback, HostFunction};
pub use limits::TableEntries;
pub use memory::{GuestMemory, MemoryAccessError};
pub use module::{
    ArtifactIdentity, CompiledModule, Export, ExternKind, GuestFunction, Import, Instance,
    InterruptHandle, LinkedModule, WasmRuntime,
};
pub use value::{i64_mask, FunctionType, Signature, ValType};

/// The most entries an instance's tables have, all of them together, declared or grown: a
/// module declaring more is refused, and `table.grow` past it fails (returns -1) on every
/// engine. A table entry is host memory outside the guest's memory cap (8 to 16 bytes each, and
/// some engines fill a table when they make or grow it, in one step no deadline interrupts), so
/// a few bytes of module could otherwise take gigabytes. The Proxy-Wasm SDKs' modules have one
/// table of a few hundred functions.
pub const MAX_TABLE_ENTRIES: u64 = 1 << 20;

/// The largest number of arguments a guest function called through [`Instance::call`] or a host
/// function may take. Proxy-Wasm needs at most 8 (`proxy_http_call` has 10 host arguments, which is
/// why host functions get up to [`MAX_ARGS`]).
pub const MAX_ARGS: usize = 16;
