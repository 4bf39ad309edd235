//! The [wasmi](https://github.com/wasmi-labs/wasmi) interpreter behind [`runtime_api::WasmRuntime`].
//!
//! wasmi is a pure-Rust interpreter: nothing is generated at run time, so it runs where JIT
//! compilation is not allowed, and compiling a module is fast.
//!
//! * Every module gets its own wasmi `Engine`. wasmi frees compiled code only when its engine
//!   goes away, so a shared engine would keep the code of every plugin ever loaded.
//! * Host functions are registered once per module in a wasmi `Linker` as typed closures (one per
//!   signature shape, see `host.rs`), which wasmi calls without allocating. wasmi 2 has no
//!   pre-instantiated form, so each instantiation resolves the imports through the linker again.
//! * Guest functions the host calls are resolved once per instance into typed handles (see
//!   `call.rs`): a call passes its arguments on the stack, with one arity compare.
//! * Call deadlines and interruption run guest calls on slices of fuel (see `fuel.rs`): when a
//!   slice runs out wasmi suspends the call, the host checks the clock and the interrupt flag,
//!   then resumes or stops it. Without either option fuel metering stays off in optimized
//!   builds; builds with debug assertions always slice, to bound the native stack.
//! * A guest recursing through host functions is stopped after a few levels with a stack
//!   overflow trap: wasmi's own recursion limit does not see it (see `instance.rs`).
//! * The memory cap is a `StoreLimits` resource limiter.
//! * There are no precompiled artifacts: wasmi compiles quickly. It translates every function
//!   when the module is compiled (not lazily on its first call, wasmi's default), so a function
//!   wasmi cannot translate refuses the module at load, and no request pays for translation.

mod call;
mod fuel;
mod host;
mod instance;
mod module;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use runtime_api::{Capabilities, CompiledModule, Error, RuntimeConfig, WasmRuntime};

pub use instance::WasmiInstance;
pub use module::{WasmiLinkedModule, WasmiModule};

/// The first four bytes of every binary WebAssembly module.
const WASM_MAGIC: &[u8] = b"\0asm";

/// The wasmi interpreter, configured once; every module compiled with it shares the configuration.
pub struct WasmiRuntime {
    wasmi_config: wasmi::Config,
    config: RuntimeConfig,
    fuel: Option<fuel::FuelPolicy>,
}

impl WasmiRuntime {
    /// An engine with the given configuration.
    pub fn new(config: RuntimeConfig) -> Result<Self, Error> {
        let fuel = fuel::FuelPolicy::for_config(&config);
        let mut wasmi_config = wasmi::Config::default();
        wasmi_config.consume_fuel(fuel.is_some());
        // wasmi translates each function on its first call and charges fuel for it, but running
        // out of fuel there ends the call instead of suspending it. Translation is bounded by
        // the module's size and happens once per module, so it is free; copying bytes keeps
        // wasmi's default cost.
        wasmi_config.fuel_cost(wasmi::CustomFuelCosts {
            bytes_copied_per_fuel: 64,
            fuel_per_bytes_translated: 0,
            fuel_per_bytes_validated: 0,
        });
        // wasmi keeps finished execution stacks for reuse, two by default. Every thread running a
        // guest needs one, plus one per nested call (the ABI calls the plugin's allocator from
        // inside host functions); without enough cached stacks each call would allocate one.
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
        wasmi_config.set_max_cached_stacks(threads.saturating_mul(4).max(8));
        // Every function is translated when the module is compiled, not on its first call: a
        // function wasmi cannot translate then refuses the module at load (see `compile`)
        // instead of failing a plugin's callback mid-traffic, and no request pays for
        // translation.
        wasmi_config.compilation_mode(wasmi::CompilationMode::Eager);
        Ok(WasmiRuntime {
            wasmi_config,
            config,
            fuel,
        })
    }
}

impl<S: Send + 'static> WasmRuntime<S> for WasmiRuntime {
    fn name(&self) -> &'static str {
        "wasmi"
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
        // wasmi (built with its `wat` feature) would parse anything else as the text format;
        // like every other engine, accept only binary modules.
        if !wasm.starts_with(WASM_MAGIC) {
            return Err(Error::InvalidModule(
                "not a WebAssembly binary (magic header not detected)".into(),
            ));
        }
        let engine = wasmi::Engine::new(&self.wasmi_config);
        // wasmi panics on some valid modules it cannot translate (2.0.0: an `i32.store8` with
        // a large offset, found by the fuzz campaign): the module is refused like an invalid
        // one. The engine is the module's own and is dropped with the panic, so nothing a
        // half-done translation left behind is ever used (hence `AssertUnwindSafe`).
        let compiled =
            std::panic::catch_unwind(AssertUnwindSafe(|| wasmi::Module::new(&engine, wasm)));
        let module = compiled
            .map_err(|panic| {
                Error::InvalidModule(format!(
                    "wasmi cannot translate the module (an internal error of wasmi: {})",
                    runtime_api::panic_message(&*panic)
                ))
            })?
            .map_err(|e| Error::InvalidModule(e.to_string()))?;
        Ok(Arc::new(WasmiModule::new(
            module,
            module::has_start_section(wasm),
            self.config.clone(),
            self.fuel,
        )))
    }
}
