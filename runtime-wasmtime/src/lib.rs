//! The [wasmtime](https://wasmtime.dev) engine behind [`runtime_api::WasmRuntime`].
//!
//! * Host functions are registered once per module with `Linker::func_new_unchecked` and
//!   instantiated many times through an `InstancePre`, so a new VM copy resolves nothing.
//! * Calls in both directions go through `ValRaw` slots on the stack: no allocation, no dynamic
//!   type check beyond one arity compare.
//! * Call deadlines and interruption use epoch interruption: a ticker thread advances the epoch, and
//!   each store's epoch callback decides whether its running call must stop.
//! * The memory cap is a `StoreLimits` resource limiter.

mod epoch;
mod instance;
mod module;

use std::sync::Arc;

use std::hash::{Hash, Hasher};

use sha2::{Digest, Sha256};

use runtime_api::{
    ArtifactIdentity, Capabilities, CompiledModule, Error, RuntimeConfig, WasmRuntime,
};

/// The wasmtime version this crate is built with (pinned exactly in the workspace, and checked
/// against `Cargo.lock` by a test): precompiled artifacts are tied to it.
pub const WASMTIME_VERSION: &str = "48.0.8";

pub use instance::WasmtimeInstance;
pub use module::{WasmtimeLinkedModule, WasmtimeModule};

/// Options specific to wasmtime, beside the engine-neutral [`RuntimeConfig`].
#[derive(Clone, Debug, Default)]
pub struct WasmtimeOptions {
    /// Use the pooling instance allocator with room for this many instances at once: faster
    /// instantiation, at the price of reserving address space up front. `None` allocates on
    /// demand.
    pub pooling_instances: Option<u32>,
}

/// The wasmtime engine, configured once and shared by every module compiled with it.
pub struct WasmtimeRuntime {
    engine: wasmtime::Engine,
    config: RuntimeConfig,
    epoch: Option<Arc<epoch::EpochTicker>>,
}

impl WasmtimeRuntime {
    /// An engine with the given configuration and wasmtime's defaults otherwise.
    pub fn new(config: RuntimeConfig) -> Result<Self, Error> {
        Self::with_options(config, WasmtimeOptions::default())
    }

    /// An engine with the given configuration and wasmtime-specific options.
    pub fn with_options(config: RuntimeConfig, options: WasmtimeOptions) -> Result<Self, Error> {
        let mut wasmtime_config = wasmtime::Config::new();
        let uses_epoch = config.interruptible || config.call_deadline.is_some();
        wasmtime_config.epoch_interruption(uses_epoch);
        if let Some(instances) = options.pooling_instances {
            let mut pooling = wasmtime::PoolingAllocationConfig::default();
            pooling.total_core_instances(instances);
            pooling.total_memories(instances);
            pooling.total_tables(instances);
            if let Some(max) = config.max_memory_bytes {
                pooling.max_memory_size(max as usize);
            }
            wasmtime_config
                .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pooling));
        }
        let engine =
            wasmtime::Engine::new(&wasmtime_config).map_err(|e| Error::Config(format!("{e:#}")))?;
        let epoch = uses_epoch.then(|| epoch::EpochTicker::start(&engine, config.call_deadline));
        Ok(WasmtimeRuntime {
            engine,
            config,
            epoch,
        })
    }

    /// The underlying wasmtime engine.
    pub fn engine(&self) -> &wasmtime::Engine {
        &self.engine
    }
}

impl<S: Send + 'static> WasmRuntime<S> for WasmtimeRuntime {
    fn name(&self) -> &'static str {
        "wasmtime"
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
        let module = wasmtime::Module::from_binary(&self.engine, wasm)
            .map_err(|e| Error::InvalidModule(format!("{e:#}")))?;
        Ok(Arc::new(WasmtimeModule::new(
            module,
            self.config.clone(),
            self.epoch.clone(),
        )))
    }

    unsafe fn load_precompiled(
        &self,
        artifact: &[u8],
    ) -> Result<Arc<dyn CompiledModule<S>>, Error> {
        // SAFETY: the trait's contract makes the caller vouch that the artifact is trusted output
        // of `serialize`; wasmtime itself checks the engine version and configuration.
        let module = unsafe { wasmtime::Module::deserialize(&self.engine, artifact) }
            .map_err(|e| Error::InvalidModule(format!("{e:#}")))?;
        Ok(Arc::new(WasmtimeModule::new(
            module,
            self.config.clone(),
            self.epoch.clone(),
        )))
    }

    fn artifact_identity(&self) -> Option<ArtifactIdentity> {
        // wasmtime's own fingerprint of every setting its artifacts depend on (epoch checks,
        // memory layout, target features), digested with SHA-256 rather than std's hasher,
        // whose output may change with the Rust release.
        let mut hasher = Sha256Hasher(Sha256::new());
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        let digest = hasher.0.finalize();
        Some(ArtifactIdentity {
            engine: "wasmtime",
            version: WASMTIME_VERSION,
            configuration: digest[..12].iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

/// A [`Hasher`] that feeds everything into a SHA-256 digest (read with `finalize`; `finish`
/// is there for the trait).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fingerprint_follows_settings_that_change_code() {
        use runtime_api::WasmRuntime;
        let identity = |config| {
            let runtime = super::WasmtimeRuntime::new(config).unwrap();
            WasmRuntime::<()>::artifact_identity(&runtime).unwrap()
        };
        let plain = identity(runtime_api::RuntimeConfig::default());
        assert_eq!(plain, identity(runtime_api::RuntimeConfig::default()));
        let with_deadlines = identity(runtime_api::RuntimeConfig {
            call_deadline: Some(std::time::Duration::from_secs(1)),
            ..Default::default()
        });
        assert_ne!(plain.configuration, with_deadlines.configuration);
        assert_eq!(
            plain.section_name(),
            format!("precompiled_wasmtime_{}", super::WASMTIME_VERSION)
        );
    }

    #[test]
    fn the_version_constant_is_the_wasmtime_in_cargo_lock() {
        let lock = include_str!("../../Cargo.lock");
        let expected = format!(
            "name = \"wasmtime\"\nversion = \"{}\"",
            super::WASMTIME_VERSION
        );
        assert!(
            lock.contains(&expected),
            "Cargo.lock has another wasmtime than WASMTIME_VERSION {}",
            super::WASMTIME_VERSION
        );
    }
}
