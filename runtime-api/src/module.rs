//! Runtimes, modules and instances.

use std::sync::Arc;

use crate::{Capabilities, Error, FunctionType, HostFunction, Trap};

/// One WebAssembly engine (or the native null runtime), configured and ready to compile modules.
///
/// `S` is the embedder's per-instance state that host functions receive. Engines implement this
/// trait for every `S`.
pub trait WasmRuntime<S: Send + 'static>: Send + Sync + 'static {
    /// The engine's name as users select it, e.g. `wasmtime`.
    fn name(&self) -> &'static str;

    /// What this engine can do.
    fn capabilities(&self) -> Capabilities;

    /// Validates and compiles a module.
    fn compile(&self, wasm: &[u8]) -> Result<Arc<dyn CompiledModule<S>>, Error>;

    /// Loads a module from an artifact produced by [`CompiledModule::serialize`] on the same
    /// engine version and configuration.
    ///
    /// # Safety
    /// Engines that run precompiled machine code cannot validate it: the artifact must come from
    /// a source the embedder trusts with native code (its own cache, or a module producer the
    /// configuration trusts, as Envoy's `allow_precompiled`); anything in the artifact that
    /// names its engine or configuration only selects it and proves nothing.
    unsafe fn load_precompiled(
        &self,
        _artifact: &[u8],
    ) -> Result<Arc<dyn CompiledModule<S>>, Error> {
        Err(Error::Unsupported("loading precompiled modules"))
    }

    /// Which engine build and code-affecting configuration this runtime's precompiled artifacts
    /// need, for naming them and keying caches of them; `None` if it cannot precompile.
    fn artifact_identity(&self) -> Option<ArtifactIdentity> {
        None
    }
}

/// What a precompiled artifact must match to be loaded by a runtime: the engine, its exact
/// version, and the settings that change the code it generates.
///
/// Engines check their artifacts again when loading them; this identity lets a host pick the
/// right artifact (or cache entry) without trying each one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ArtifactIdentity {
    /// The runtime's name, e.g. `wasmtime` or `wasmer-cranelift`.
    pub engine: &'static str,
    /// The engine crate's exact version, e.g. `48.0.8`.
    pub version: &'static str,
    /// A fingerprint of the engine settings that change generated code (e.g. whether calls
    /// carry deadline checks); artifacts made under another one cannot be loaded.
    pub configuration: String,
}

impl ArtifactIdentity {
    /// The name of the custom section that carries this engine build's artifact inside a
    /// module, e.g. `precompiled_wasmtime_48.0.8`.
    pub fn section_name(&self) -> String {
        format!("precompiled_{}_{}", self.engine, self.version)
    }
}

/// A compiled module: its interface, and the ability to link it against host functions.
pub trait CompiledModule<S>: Send + Sync {
    /// What the module imports, in declaration order.
    fn imports(&self) -> &[Import];

    /// What the module exports.
    fn exports(&self) -> &[Export];

    /// Resolves the module's imports against `host` once (see [`crate::resolve_imports`]); the
    /// result is instantiated as often as needed without resolving again.
    fn link(&self, host: &[HostFunction<S>]) -> Result<Arc<dyn LinkedModule<S>>, Error>;

    /// A precompiled artifact for [`WasmRuntime::load_precompiled`].
    fn serialize(&self) -> Result<Vec<u8>, Error> {
        Err(Error::Unsupported("precompiling modules"))
    }
}

/// A module with its imports resolved, ready to be instantiated many times, on any thread.
pub trait LinkedModule<S>: Send + Sync {
    /// A new instance owning `state`. Runs the module's start section, not `_initialize`/`_start`
    /// (the embedder decides when to call those).
    fn instantiate(&self, state: S) -> Result<Box<dyn Instance<S>>, Error>;
}

/// A live instance: guest memory, exported functions and the embedder's state.
///
/// Used by one thread at a time; may move between threads.
pub trait Instance<S>: Send {
    /// The embedder's state.
    fn state(&mut self) -> &mut S;

    /// Looks up an exported function by name, once; the handle makes later calls cheap. `None` if
    /// there is no such exported function.
    fn function(&mut self, name: &str) -> Option<GuestFunction>;

    /// Calls a guest function from the host (not from inside a host function: use
    /// [`crate::Caller::call`] there).
    ///
    /// `args.len()` and `results.len()` must match the function's type, or the call fails with
    /// [`crate::TrapKind::BadCall`].
    fn call(
        &mut self,
        function: GuestFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap>;

    /// The current size of the guest memory in bytes (0 if it has none).
    fn memory_size(&mut self) -> usize;

    /// The memory cap this instance runs under ([`crate::RuntimeConfig::max_memory_bytes`]), if
    /// any and if the engine applies one: with [`Instance::memory_size`] it tells a guest that
    /// likely ran out of memory under the cap from one that trapped for another reason.
    fn memory_limit(&self) -> Option<usize> {
        None
    }

    /// Whether the memory cap has refused one of this instance's `memory.grow`s, if the engine
    /// can tell (engines with a resource limiter can; `None` for the others): a guest that
    /// traps after that ran out of memory.
    fn memory_grow_refused(&self) -> Option<bool> {
        None
    }

    /// A handle that stops a running call of this instance from another thread, if the engine can
    /// (see [`Capabilities::interrupt`] and [`crate::RuntimeConfig::interruptible`]).
    fn interrupt_handle(&self) -> Option<Arc<dyn InterruptHandle>> {
        None
    }
}

/// Stops a running guest call from another thread.
pub trait InterruptHandle: Send + Sync {
    /// Makes the current (or next) call of the instance trap with
    /// [`crate::TrapKind::Interrupted`] as soon as the engine notices.
    fn interrupt(&self);
}

/// A handle to a guest function of one instance, obtained from [`Instance::function`].
///
/// It records the function's arity so that engines can reject a mismatched call with one compare
/// instead of a type check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestFunction {
    index: u32,
    params: u16,
    results: u16,
}

impl GuestFunction {
    /// A handle to the engine's function number `index`, of type `ty`. Called by engines.
    #[inline]
    pub fn new(index: u32, ty: &FunctionType) -> Self {
        GuestFunction {
            index,
            params: ty.params.len() as u16,
            results: ty.results.len() as u16,
        }
    }

    /// The engine's function number.
    #[inline]
    pub fn index(self) -> u32 {
        self.index
    }

    /// How many parameters the function takes.
    #[inline]
    pub fn param_count(self) -> usize {
        self.params as usize
    }

    /// How many results the function returns.
    #[inline]
    pub fn result_count(self) -> usize {
        self.results as usize
    }

    /// Checks that a call passes as many arguments and result slots as the function has.
    #[inline]
    pub fn check_arity(self, args: usize, results: usize) -> Result<(), Trap> {
        if args == self.param_count() && results == self.result_count() && args <= crate::MAX_ARGS {
            Ok(())
        } else {
            Err(self.arity_mismatch(args, results))
        }
    }

    #[cold]
    fn arity_mismatch(self, args: usize, results: usize) -> Trap {
        Trap::new(
            crate::TrapKind::BadCall,
            format!(
                "function takes {} arguments and returns {} results, called with {args} and {results}",
                self.params, self.results
            ),
        )
    }
}

/// The kind of an imported or exported item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExternKind {
    /// A function of this type.
    Function(FunctionType),
    /// A linear memory.
    Memory,
    /// A table.
    Table,
    /// A global.
    Global,
    /// Anything else (tags, …).
    Other,
}

impl ExternKind {
    /// A word for messages: "function", "memory", …
    pub fn describe(&self) -> &'static str {
        match self {
            ExternKind::Function(_) => "function",
            ExternKind::Memory => "memory",
            ExternKind::Table => "table",
            ExternKind::Global => "global",
            ExternKind::Other => "item",
        }
    }
}

/// An import of a module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Import {
    /// Import module name.
    pub module: String,
    /// Import field name.
    pub name: String,
    /// What is imported.
    pub kind: ExternKind,
}

/// An export of a module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// Export name.
    pub name: String,
    /// What is exported.
    pub kind: ExternKind,
}
