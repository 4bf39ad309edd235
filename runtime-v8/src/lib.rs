//! [V8](https://v8.dev), as Debian ships it in libnode (Node 18, V8 10.2), behind
//! [`runtime_api::WasmRuntime`].
//!
//! The `v8` crate downloads a prebuilt V8, so this crate binds to the system's instead, through a
//! small C++ shim (`shim/`, built by `build.rs`; `PWHOST_V8_DIR` points it at another V8):
//!
//! * V8 starts once per process: Node's platform (libnode does not export V8's default one),
//!   then `V8::Initialize`.
//! * A module is compiled once, in a short-lived isolate, into a `CompiledWasmModule`: code of
//!   V8's process-wide wasm engine. Every instance imports that code into its own isolate
//!   (`WasmModuleObject::FromCompiledModule`): nothing is compiled twice.
//! * Each instance has its own isolate and context. Isolates are what V8 can stop
//!   (`TerminateExecution`) and move between threads (`v8::Locker`), so one per instance is what
//!   makes deadlines and interrupts stop exactly the right call, and `Instance` `Send`. The price
//!   is memory and start-up time per instance (an isolate and a context, about 1.5 ms).
//! * A call from the host takes a `v8::Locker`, enters the isolate and the context, and calls the
//!   export through `Function::Call` (about 230 ns; V8's `Isolate::Enter` allocates once per
//!   entry). The first threads to call an instance are left "parked" inside an `Unlocker`, which
//!   makes later Lockers on them restore the thread's state instead of rebuilding it (see
//!   `shim/pwhost_v8.cc`): a third off each call. V8 never frees a parked thread's state, so the
//!   thread that deletes an instance is unparked first (its state freed); a thread that called
//!   an instance deleted elsewhere leaves its state behind (under 1 KiB for the last parked
//!   thread, a few KiB for the other one).
//! * Host functions are one `FunctionTemplate` callback that copies the arguments into `u64`
//!   slots and calls the Rust host function; a host function's trap unwinds the guest as a
//!   JavaScript exception and comes back out of the call unchanged. Traps map from V8's messages
//!   (`trap.rs`).
//! * CPU deadlines and interrupts call `TerminateExecution` from a shared watchdog thread or the
//!   interrupting thread (renewed by the shim whenever it takes the isolate's lock, where V8
//!   keeps the request), and `CancelTerminateExecution` under that lock afterwards, so the
//!   instance stays usable (`watchdog.rs`).
//! * Wasm threads and exception handling are off (`platform.rs`): a guest blocked in
//!   `memory.atomic.wait32` would use no CPU time and outlive its deadline, and a guest's
//!   `catch_all` could catch the exception a host function's trap unwinds it with.
//! * The memory cap lowers the maximum of the module's memories before compilation (`binary.rs`),
//!   so `memory.grow` beyond it fails in the guest, per engine configuration (V8 itself has only
//!   a process-wide limit). Tables, which live on the JS heap, get a budget the same way, and the
//!   JS heap's limit terminates the call instead of aborting the process.
//! * V8's trap handler stays off: bounds checks are explicit, and V8 installs no signal handler
//!   that could conflict with another engine's in the same process.
//!
//! The shim's C ABI itself is public as [`shim`], for benchmarks and other raw users.
//!
//! The shim is a static library, linked into every binary that uses this crate; V8's library
//! is a dependency of those binaries by file name only (`libnode.so.108`). They find it through
//! their own run path, relative to themselves (`$ORIGIN/../lib/pwhost` beside an installed
//! `bin/pwhost`, the build tree's `target/<profile>/`), then in the system's directories, so a
//! binary keeps working after `cargo install`, `cargo clean` or a copy to another machine that
//! has the library in one of those places. `build.rs` says who sets the run path and why.

mod binary;
mod ffi;
mod instance;
mod module;
mod platform;
pub mod shim;
mod trap;
mod watchdog;

use std::sync::Arc;

use runtime_api::{Capabilities, CompiledModule, Error, RuntimeConfig, WasmRuntime};

pub use instance::V8Instance;
pub use module::{V8LinkedModule, V8Module};

use crate::module::{CompiledCode, InstanceSettings};

/// The V8 engine.
pub struct V8Runtime {
    config: RuntimeConfig,
}

impl V8Runtime {
    /// An engine with the given configuration. Starts V8 if this is the first engine of the
    /// process.
    pub fn new(config: RuntimeConfig) -> Result<Self, Error> {
        platform::ensure_initialized()?;
        Ok(V8Runtime { config })
    }
}

impl<S: Send + 'static> WasmRuntime<S> for V8Runtime {
    fn name(&self) -> &'static str {
        "v8"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            interrupt: self.config.interruptible,
            call_deadline: self.config.call_deadline.is_some(),
            memory_limit: true,
            // V8 10.2 can serialize compiled code, but offers no public way to load it back
            // outside of streaming compilation.
            precompiled_modules: false,
            sandboxed: true,
        }
    }

    fn compile(&self, wasm: &[u8]) -> Result<Arc<dyn CompiledModule<S>>, Error> {
        binary::check_magic(wasm).map_err(Error::InvalidModule)?;
        let prepared = match binary::prepare(wasm, self.config.max_memory_bytes) {
            Ok(prepared) => prepared,
            Err(binary::Refused::Unsupported(reason)) => return Err(Error::InvalidModule(reason)),
            Err(binary::Refused::Malformed(reason)) => {
                // Malformed, most likely: V8 says how. If V8 would run it, running it without
                // the limits is not an option.
                CompiledCode::compile(wasm)?;
                return Err(Error::InvalidModule(reason));
            }
        };
        // wasmtime's words, so that the error reads the same on every engine.
        let over_memory_limit = prepared
            .memory_too_large
            .map(|pages| format!("memory minimum size of {pages} pages exceeds memory limits"));
        let bytes = prepared.bytes;
        let code = CompiledCode::compile(&bytes)?;
        let interface = binary::interface(&bytes).map_err(Error::InvalidModule)?;
        let settings = InstanceSettings {
            call_deadline: self.config.call_deadline,
            interruptible: self.config.interruptible,
            over_memory_limit,
            memory_limit: self
                .config
                .max_memory_bytes
                .map(|max| usize::try_from(max).unwrap_or(usize::MAX)),
        };
        Ok(Arc::new(V8Module::new(
            code,
            interface.imports,
            interface.exports,
            settings,
        )))
    }
}
