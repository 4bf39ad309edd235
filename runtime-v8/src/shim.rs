//! The shim's raw C ABI (`shim/pwhost_v8.h`), for benchmarks and other raw users: code that
//! drives V8 exactly as [`crate::V8Runtime`] does, but without its `Instance`/`Module` layers
//! and without `runtime_api` (e.g. `pwhost-bench`'s V8 floor, which measures what those layers
//! cost).
//!
//! Beside the bindings themselves, this module gives the pieces of runtime-v8's configuration
//! that live on the Rust side, so that a raw user runs V8 the way the runtime does:
//!
//! * [`initialize`]: V8's one start per process, with the runtime's flags ([`FLAGS`]) and worker
//!   threads ([`thread_pool_size`]). It is the same start as the runtime's: whichever of the two
//!   comes first, V8 runs with the same settings.
//! * [`prepare`]: the module as the runtime compiles it (memory cap and table bound written in,
//!   shared memories refused), with the shape of every function import and export.
//!
//! The isolate's settings (heap limit, near-heap-limit termination, microtask policy, stack
//! limits, the thread-parking Locker path) are inside the shim, so every `pwv8_vm` has them.
//! runtime-v8 adds a CPU-time watchdog only when its configuration has a deadline or is
//! interruptible ([`pwv8_vm_terminate`] is its tool); with the default configuration it has
//! neither.
//!
//! Every function of the C ABI is `unsafe`: its `# Safety` section is its contract.

pub use crate::ffi::{
    pwv8_compile, pwv8_cpu_time_ns, pwv8_current_thread_cpu_clock, pwv8_initialize,
    pwv8_module_delete, pwv8_text_free, pwv8_vm_call, pwv8_vm_cancel_terminate, pwv8_vm_delete,
    pwv8_vm_export_function, pwv8_vm_heap_exhausted, pwv8_vm_instantiate, pwv8_vm_memory,
    pwv8_vm_new, pwv8_vm_terminate, HostFn, Message, RawImport, RawModule, RawText, RawVm, Shape,
    FAILED, OK, TERMINATED, THROWN,
};

use runtime_api::ExternKind;

use crate::{binary, module, platform};

/// The V8 flags runtime-v8 starts V8 with (V8's command-line syntax): wasm threads and
/// exception handling off (see the crate's documentation for why).
pub const FLAGS: &str = platform::FLAGS;

/// The number of worker threads runtime-v8 gives V8's platform.
pub fn thread_pool_size() -> u32 {
    platform::thread_pool_size()
}

/// Starts V8 as runtime-v8 does ([`FLAGS`], [`thread_pool_size`]), once per process; later calls
/// return the first outcome. Shared with [`crate::V8Runtime::new`].
pub fn initialize() -> Result<(), String> {
    platform::ensure_initialized().map_err(|error| error.to_string())
}

/// A function import, with the shape the shim passes its values in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionImport {
    /// The import's module name.
    pub module: String,
    /// The import's field name.
    pub name: String,
    /// How it passes its values.
    pub shape: Shape,
}

/// A function export the shim can call (integer parameters and at most one integer result).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionExport {
    /// The export's name.
    pub name: String,
    /// How it passes its values.
    pub shape: Shape,
}

/// A module as runtime-v8 compiles it, and what the shim needs to instantiate and call it.
#[derive(Clone, Debug)]
pub struct PreparedModule {
    /// The bytes to give [`pwv8_compile`]: the module with the memory cap and the table bound
    /// written in (the original bytes if neither changed anything).
    pub bytes: Vec<u8>,
    /// Every import, in import order: what [`pwv8_vm_instantiate`] takes.
    pub imports: Vec<FunctionImport>,
    /// The exported functions the shim can call, in export order.
    pub exports: Vec<FunctionExport>,
}

/// Prepares `wasm` as [`crate::V8Runtime`] does before compiling it, with the memory cap
/// `max_memory_bytes` (`runtime_api::RuntimeConfig::max_memory_bytes`; `None`: no cap). Fails on
/// a malformed module, a shared memory, a memory whose initial size exceeds the cap, and an
/// import the shim cannot provide (anything but a function of integers with at most one result).
pub fn prepare(wasm: &[u8], max_memory_bytes: Option<u64>) -> Result<PreparedModule, String> {
    binary::check_magic(wasm)?;
    let prepared = binary::prepare(wasm, max_memory_bytes).map_err(|refused| match refused {
        binary::Refused::Malformed(reason) | binary::Refused::Unsupported(reason) => reason,
    })?;
    if let Some(pages) = prepared.memory_too_large {
        return Err(format!(
            "memory minimum size of {pages} pages exceeds memory limits"
        ));
    }
    let bytes = prepared.bytes.into_owned();
    let interface = binary::interface(&bytes)?;
    let imports = interface
        .imports
        .into_iter()
        .map(|import| {
            let shape = match &import.kind {
                ExternKind::Function(ty) => module::shape(&ty.params, &ty.results),
                _ => None,
            };
            let shape = shape.ok_or_else(|| {
                format!(
                    "import {}.{} is not a function the shim can provide",
                    import.module, import.name
                )
            })?;
            Ok(FunctionImport {
                module: import.module,
                name: import.name,
                shape,
            })
        })
        .collect::<Result<_, String>>()?;
    let exports = interface
        .exports
        .into_iter()
        .filter_map(|export| {
            let ExternKind::Function(ty) = &export.kind else {
                return None;
            };
            let shape = module::shape(&ty.params, &ty.results)?;
            Some(FunctionExport {
                name: export.name,
                shape,
            })
        })
        .collect();
    Ok(PreparedModule {
        bytes,
        imports,
        exports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_caps_memory_and_gives_shapes() {
        let wasm = wat::parse_str(
            r#"(module
                 (import "env" "f" (func (param i32 i64) (result i32)))
                 (memory (export "memory") 1)
                 (func (export "g") (param i32))
                 (func (export "h") (param f32)))"#,
        )
        .unwrap();
        let prepared = prepare(&wasm, Some(4 * 65536)).unwrap();
        assert_ne!(prepared.bytes, wasm, "the memory maximum is written in");
        assert_eq!(
            prepared.imports,
            vec![FunctionImport {
                module: "env".into(),
                name: "f".into(),
                shape: Shape {
                    params: 2,
                    i64_params: 0b10,
                    result: 0
                },
            }]
        );
        assert_eq!(
            prepared.exports,
            vec![FunctionExport {
                name: "g".into(),
                shape: Shape {
                    params: 1,
                    i64_params: 0,
                    result: -1
                },
            }],
            "an export with a float parameter cannot be called through the shim"
        );
        let too_large = wat::parse_str("(module (memory 8))").unwrap();
        assert!(prepare(&too_large, Some(4 * 65536)).is_err());
        let memory_import = wat::parse_str(r#"(module (import "env" "m" (memory 1)))"#).unwrap();
        assert!(prepare(&memory_import, None).is_err());
    }
}
