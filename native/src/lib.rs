//! Native Proxy-Wasm plugins on pwhost's null runtime.
//!
//! Two kinds, both run by the same `abi` crate as WebAssembly plugins:
//!
//! * [`sdk`]: plugins written in Rust against this crate's SDK (the shape of the proxy-wasm Rust
//!   SDK: a root context, HTTP and stream contexts, the same callbacks and host calls) and
//!   compiled into the host. Several live in one binary, each VM with its own state. Registered
//!   by name, e.g. `native:http_headers` for `pwhost run --plugin`.
//! * [`SdkLibrary`]: plugins built with the unmodified crates.io `proxy-wasm` SDK as native
//!   `cdylib`s, loaded at run time; their `proxy_*` imports bind to this crate's [`symbols`].
//!
//! **Trust model.** Native plugins are trusted code: they run in the host's address space, on its
//! stack, with its privileges. Nothing checks their pointers, caps their memory or stops a call
//! that loops, and a panic in an SDK library aborts the process (the SDK's exports are
//! `extern "C"`). Compiled-in plugins' panics are caught and fail the VM like a trap. Use native
//! plugins for speed and for debugging with native tools; use a WebAssembly engine for code you
//! do not trust.
//!
//! Executables that load SDK libraries must export the `proxy_*` symbols dynamically: their build
//! script prints [`LINK_ARG`] as `cargo:rustc-link-arg`.

mod callbacks;
mod host_imports;
mod library;
pub mod sdk;
pub mod symbols;

pub use host_imports::HostImport;
pub use library::SdkLibrary;

// The proxy-wasm Rust SDK's paths (`proxy_wasm::traits::*`, `proxy_wasm::set_root_context`, ...),
// so that a plugin's source compiles unchanged against this crate: see [`sdk`].
pub use sdk::{hostcalls, set_http_context, set_log_level, set_root_context, traits, types};

/// The linker argument that exports the host's `proxy_*` symbols to SDK libraries.
pub const LINK_ARG: &str = "-Wl,--export-dynamic-symbol=proxy_*";
