//! The [WebAssembly Micro Runtime](https://github.com/bytecodealliance/wasm-micro-runtime)'s fast
//! interpreter (through `wamrx-sys`) behind [`runtime_api::WasmRuntime`].
//!
//! * WAMR has one runtime and one registry of native functions per process, keyed by import
//!   module name. pwhost initialises it once, registers every import name once against a single
//!   raw trampoline (arguments in 64-bit slots, result in slot 0), and routes each call to the
//!   right instance by the exec env's user data and to the right host function by the symbol's
//!   attachment, looked up in the linked module's table. So any number of runtimes, modules with
//!   different host tables and instances on any threads coexist in one process. Threads other
//!   than the initialising one set up WAMR's thread environment before they use it.
//! * Each instance owns one exec env for all its calls; calls in both directions pass values in
//!   stack buffers, with no allocation. Host functions see the guest memory through a
//!   bounds-checked view built from the memory's base and size, re-read on every access.
//! * A trap is WAMR's exception string, mapped onto the canonical trap codes; a host function's
//!   trap is kept aside while an exception unwinds the guest, and returned unchanged. The
//!   exception is cleared after every failed call, so the instance stays usable.
//! * Call deadlines and interrupts use `wasm_runtime_terminate` (WAMR's thread manager): one
//!   shared watchdog thread stops calls that overrun their deadline (see `watchdog.rs`).
//! * The memory cap is WAMR's per-instance maximum page count.
//! * WAMR would run a module's start function and some exports while instantiating, out of
//!   reach of deadlines; modules are rewritten so that it does not (see `binary.rs`).

mod binary;
mod global;
mod instance;
mod module;
mod trap;
mod watchdog;

use std::sync::Arc;
use std::time::Duration;

use runtime_api::{Capabilities, CompiledModule, Error, RuntimeConfig, WasmRuntime};

pub use global::{lock_native_registry, NativeRegistryLock};
pub use instance::{give_back_aux_stack, WamrInstance};
pub use module::{WamrLinkedModule, WamrModule};

/// The size of a WebAssembly page.
const PAGE_SIZE: u64 = 64 * 1024;

/// Options specific to WAMR, beside the engine-neutral [`RuntimeConfig`].
#[derive(Clone, Debug)]
pub struct WamrOptions {
    /// The size of each instance's interpreter stack (frames, locals and operands), in bytes.
    /// It is allocated and zeroed per instance, so it counts fully towards each VM's memory;
    /// deeper recursion fails with a stack-overflow trap.
    pub stack_size: u32,
}

impl Default for WamrOptions {
    fn default() -> Self {
        WamrOptions {
            stack_size: 128 * 1024,
        }
    }
}

/// How instances are created, shared by a runtime's modules.
pub(crate) struct Settings {
    pub(crate) stack_size: u32,
    /// WAMR's maximum page count (0: the module's own maximum).
    pub(crate) max_memory_pages: u32,
    pub(crate) max_memory_bytes: Option<u64>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) interruptible: bool,
}

/// The WAMR fast interpreter.
pub struct WamrRuntime {
    config: RuntimeConfig,
    settings: Arc<Settings>,
}

impl WamrRuntime {
    /// An engine with the given configuration and default [`WamrOptions`].
    pub fn new(config: RuntimeConfig) -> Result<Self, Error> {
        Self::with_options(config, WamrOptions::default())
    }

    /// An engine with the given configuration and WAMR-specific options.
    ///
    /// Fails if `max_memory_bytes` is below one 64 KiB page (WAMR caps memory in whole pages,
    /// and cannot forbid growing a memory that starts empty).
    pub fn with_options(config: RuntimeConfig, options: WamrOptions) -> Result<Self, Error> {
        global::init()?;
        let max_memory_pages = match config.max_memory_bytes {
            None => 0,
            Some(bytes) if bytes < PAGE_SIZE => {
                return Err(Error::Config(format!(
                    "WAMR caps memory in 64 KiB pages; max_memory_bytes {bytes} is below one page"
                )))
            }
            Some(bytes) => u32::try_from(bytes / PAGE_SIZE)
                .unwrap_or(u32::MAX)
                .min(65536),
        };
        if config.call_deadline.is_some() {
            watchdog::watchdog()?;
        }
        let settings = Arc::new(Settings {
            stack_size: options.stack_size,
            max_memory_pages,
            max_memory_bytes: config.max_memory_bytes,
            deadline: config.call_deadline,
            interruptible: config.interruptible,
        });
        Ok(WamrRuntime { config, settings })
    }
}

impl<S: Send + 'static> WasmRuntime<S> for WamrRuntime {
    fn name(&self) -> &'static str {
        "wamr"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            interrupt: self.config.interruptible,
            call_deadline: self.config.call_deadline.is_some(),
            memory_limit: true,
            precompiled_modules: false,
            sandboxed: true,
        }
    }

    fn compile(&self, wasm: &[u8]) -> Result<Arc<dyn CompiledModule<S>>, Error> {
        Ok(Arc::new(WamrModule::load(wasm, self.settings.clone())?))
    }
}
