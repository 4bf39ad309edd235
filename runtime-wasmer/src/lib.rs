//! The [wasmer](https://wasmer.io) engine behind [`runtime_api::WasmRuntime`], with any of its
//! three compilers (cranelift, singlepass, LLVM).
//!
//! * Host functions are resolved once per module ([`CompiledModule::link`]); each instance only
//!   creates them in its new store, in import order, and instantiates with
//!   `Instance::new_by_index` (no name lookups). The all-`i32` shapes Proxy-Wasm uses are typed
//!   host functions (`Function::new_typed_with_env`): native arguments, no value vectors.
//! * Guest functions are called through wasmer's own call trampoline, resolved once per export
//!   and entered under `StoreMut::parked` (what `TypedFunction::call` does, less its per-call
//!   lookups; see the `call` module). Host functions find their environment once per host call
//!   and reach the guest memory through its `VMMemoryDefinition`, read afresh on every access
//!   (two loads, no store lookup).
//! * Call deadlines and interruption: a middleware adds a stop flag that the guest checks at
//!   function entries and loop headers; the host raises it from any thread (see the `stop` module).
//!   Modules compiled without deadlines or interruption carry no checks.
//! * Every module gets its own wasmer engine: the stop-flag middleware keeps per-module state,
//!   and wasmer frees a module's machine code only with the engine that compiled it, so a shared
//!   engine would also keep the code of every unloaded plugin.
//! * The memory cap is a [`wasmer::sys::Tunables`] that lowers every memory's maximum.
//! * Precompiled modules are wasmer's serialized artifacts behind a small header naming the
//!   compiler and the stop checks they were compiled with.

mod call;
mod instance;
mod module;
mod stop;
mod tunables;

use std::sync::Arc;

use runtime_api::{
    ArtifactIdentity, Capabilities, CompiledModule, Error, RuntimeConfig, WasmRuntime,
};
use wasmer::sys::{CompilerConfig, EngineBuilder, Features, NativeEngineExt};

/// The wasmer version this crate is built with (pinned exactly in the workspace, and checked
/// against `Cargo.lock` by a test): precompiled artifacts are tied to it.
pub const WASMER_VERSION: &str = "7.4.2";

pub use instance::WasmerInstance;
pub use module::{WasmerLinkedModule, WasmerModule};

use instance::StopConfig;
use module::ArtifactHeader;
use stop::{CheckStyle, StopCheck, Ticker};
pub use tunables::CappedTunables;

/// Which wasmer compiler translates modules to machine code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compiler {
    /// Cranelift: fast compile, good code.
    #[cfg(feature = "cranelift")]
    Cranelift,
    /// Singlepass: linear-time compile, slower code.
    #[cfg(feature = "singlepass")]
    Singlepass,
    /// LLVM: slow compile, the fastest code.
    #[cfg(feature = "llvm")]
    Llvm,
}

impl Compiler {
    /// The runtime name users select it by.
    pub fn runtime_name(self) -> &'static str {
        match self {
            #[cfg(feature = "cranelift")]
            Compiler::Cranelift => "wasmer-cranelift",
            #[cfg(feature = "singlepass")]
            Compiler::Singlepass => "wasmer-singlepass",
            #[cfg(feature = "llvm")]
            Compiler::Llvm => "wasmer-llvm",
        }
    }

    /// How this compiler's code must check the stop flag (see the `stop` module).
    fn check_style(self) -> CheckStyle {
        match self {
            #[cfg(feature = "cranelift")]
            Compiler::Cranelift => CheckStyle::ScratchStore,
            #[cfg(feature = "singlepass")]
            Compiler::Singlepass => CheckStyle::Plain,
            #[cfg(feature = "llvm")]
            Compiler::Llvm => CheckStyle::AtomicLoad,
        }
    }

    /// A byte that identifies the compiler in precompiled artifacts.
    fn artifact_tag(self) -> u8 {
        match self {
            #[cfg(feature = "cranelift")]
            Compiler::Cranelift => b'c',
            #[cfg(feature = "singlepass")]
            Compiler::Singlepass => b's',
            #[cfg(feature = "llvm")]
            Compiler::Llvm => b'l',
        }
    }

    fn config(self) -> Box<dyn CompilerConfig> {
        match self {
            #[cfg(feature = "cranelift")]
            Compiler::Cranelift => Box::new(wasmer::sys::Cranelift::new()),
            #[cfg(feature = "singlepass")]
            Compiler::Singlepass => Box::new(wasmer::sys::Singlepass::new()),
            #[cfg(feature = "llvm")]
            Compiler::Llvm => Box::new(wasmer::sys::LLVM::new()),
        }
    }
}

/// The wasmer engine with one compiler and one configuration.
pub struct WasmerRuntime {
    compiler: Compiler,
    config: RuntimeConfig,
    ticker: Option<Arc<Ticker>>,
}

impl WasmerRuntime {
    /// An engine with the given compiler and configuration.
    pub fn new(compiler: Compiler, config: RuntimeConfig) -> Result<Self, Error> {
        let ticker = match config.call_deadline {
            Some(deadline) => Some(
                Ticker::start(deadline)
                    .ok_or_else(|| Error::Config("cannot start the deadline thread".to_string()))?,
            ),
            None => None,
        };
        Ok(WasmerRuntime {
            compiler,
            config,
            ticker,
        })
    }

    /// The compiler this runtime uses.
    pub fn compiler(&self) -> Compiler {
        self.compiler
    }

    /// Whether modules need the stop-flag checks.
    fn stops(&self) -> bool {
        self.config.interruptible || self.config.call_deadline.is_some()
    }

    fn stop_config(&self) -> StopConfig {
        StopConfig {
            enabled: self.stops(),
            ticker: self.ticker.clone(),
            interruptible: self.config.interruptible,
        }
    }

    /// What this runtime records in front of the artifacts it precompiles.
    fn artifact_header(&self) -> ArtifactHeader {
        ArtifactHeader {
            compiler: self.compiler.artifact_tag(),
            checks: self.stops().then(|| self.compiler.check_style().tag()),
        }
    }

    /// A fresh engine: a compiler (with the stop-flag middleware when needed), or none for
    /// loading artifacts; the memory cap either way.
    fn engine(&self, compiler: bool) -> wasmer::Engine {
        let mut engine: wasmer::Engine = if compiler {
            let mut config = self.compiler.config();
            if self.stops() {
                config.push_middleware(Arc::new(StopCheck::new(self.compiler.check_style())));
            }
            // No threads proposal: a guest blocked in `memory.atomic.wait32` on a shared memory of
            // its own would sit in wasmer's wait, where no stop check can reach it.
            let mut features = Features::new();
            features.threads(false);
            EngineBuilder::new(config)
                .set_features(Some(features))
                .engine()
                .into()
        } else {
            EngineBuilder::headless().engine().into()
        };
        engine.set_tunables(CappedTunables::new(self.config.max_memory_bytes));
        engine
    }
}

impl<S: Send + 'static> WasmRuntime<S> for WasmerRuntime {
    fn name(&self) -> &'static str {
        self.compiler.runtime_name()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            interrupt: self.config.interruptible,
            call_deadline: self.config.call_deadline.is_some(),
            memory_limit: true,
            precompiled_modules: true,
            sandboxed: true,
        }
    }

    fn compile(&self, wasm: &[u8]) -> Result<Arc<dyn CompiledModule<S>>, Error> {
        let engine = self.engine(true);
        // wasmer makes and grows a table with an infallible `Vec` resize that fills it: the
        // module's tables get bounded maxima before it is compiled.
        let bounded = runtime_api::binary::bound_tables(wasm);
        let wasm = match &bounded {
            Ok(Some(rewritten)) => rewritten.as_slice(),
            Ok(None) => wasm,
            // Malformed, or over the budget: wasmer says better what is malformed.
            Err(why) => {
                wasmer::Module::validate(&engine, wasm)
                    .map_err(|e| Error::InvalidModule(e.to_string()))?;
                return Err(Error::InvalidModule(why.clone()));
            }
        };
        let module = wasmer::Module::from_binary(&engine, wasm).map_err(|e| match e {
            // The module is valid, but the stop checks cannot be added to it.
            wasmer::CompileError::Wasm(wasmer::WasmError::Middleware(e)) => {
                Error::Config(e.to_string())
            }
            wasmer::CompileError::MiddlewareError(message) => Error::Config(message),
            e => Error::InvalidModule(e.to_string()),
        })?;
        Ok(Arc::new(WasmerModule::new(
            engine,
            module,
            self.artifact_header(),
            self.stop_config(),
            self.config.max_memory_bytes,
        )))
    }

    unsafe fn load_precompiled(
        &self,
        artifact: &[u8],
    ) -> Result<Arc<dyn CompiledModule<S>>, Error> {
        let (header, artifact) = ArtifactHeader::split(artifact)?;
        let expected = self.artifact_header();
        if header.compiler != expected.compiler {
            return Err(Error::InvalidModule(
                "the artifact was precompiled by another wasmer compiler".to_string(),
            ));
        }
        // Checks the runtime does not need are harmless; missing ones would let a call overrun.
        if self.stops() && header.checks != expected.checks {
            return Err(Error::InvalidModule(
                "the artifact was compiled without deadline and interrupt checks, which this \
                 runtime needs"
                    .to_string(),
            ));
        }
        let engine = self.engine(false);
        // SAFETY: the trait's contract makes the caller vouch that the artifact is trusted output
        // of `serialize`; wasmer checks its format, version and target.
        let module = unsafe { wasmer::Module::deserialize(&engine, artifact) }
            .map_err(|e| Error::InvalidModule(e.to_string()))?;
        Ok(Arc::new(WasmerModule::new(
            engine,
            module,
            header,
            self.stop_config(),
            self.config.max_memory_bytes,
        )))
    }

    fn artifact_identity(&self) -> Option<ArtifactIdentity> {
        // The compiler is in the engine name; what else changes the code is the stop checks.
        let header = self.artifact_header();
        Some(ArtifactIdentity {
            engine: self.compiler.runtime_name(),
            version: WASMER_VERSION,
            // `bounded-tables`: code compiled since the table maxima are written into the
            // module (`runtime_api::binary::bound_tables`); a cache entry from before misses.
            configuration: match header.checks {
                Some(tag) => format!("stop-checks-{},bounded-tables", tag as char),
                None => "no-stop-checks,bounded-tables".to_string(),
            },
        })
    }
}

#[cfg(test)]
mod version_tests {
    #[test]
    fn the_version_constant_is_the_wasmer_in_cargo_lock() {
        let lock = include_str!("../../Cargo.lock");
        let expected = format!("name = \"wasmer\"\nversion = \"{}\"", super::WASMER_VERSION);
        assert!(
            lock.contains(&expected),
            "Cargo.lock has another wasmer than WASMER_VERSION {}",
            super::WASMER_VERSION
        );
    }
}
