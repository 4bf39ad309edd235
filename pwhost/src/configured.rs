//! `pwhost run --config FILE`: a plugin as Envoy or Traffic Server configures it (see the
//! `lifecycle` crate for the configuration).

use std::path::Path;

use anyhow::Context as _;
use lifecycle::{Code, FailurePolicy};
use runtime_api::RuntimeConfig;

use crate::runtimes;
use crate::scenario;

/// A plugin loaded from a configuration file, with how `pwhost run` runs it.
pub struct Configured {
    /// The loaded plugin.
    pub plugin: abi::Plugin,
    /// What a VM failure does to streams.
    pub policy: scenario::FailurePolicy,
    /// The engine it runs on.
    pub engine: &'static str,
}

/// Loads the plugin the configuration at `path` describes, on `runtime_override` if given,
/// else on the engine its `vm_config.runtime` names. Relative code file names are taken from
/// the configuration's directory.
pub fn load(
    path: &Path,
    runtime_override: Option<&str>,
    runtime_config: RuntimeConfig,
) -> anyhow::Result<Configured> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read configuration {}", path.display()))?;
    let deployment = lifecycle::parse(&text)
        .with_context(|| format!("invalid configuration {}", path.display()))?;
    let mut plugins = deployment
        .http_filters
        .iter()
        .chain(&deployment.network_filters);
    let (Some(config), None) = (plugins.next(), plugins.next()) else {
        anyhow::bail!(
            "{}: pwhost run runs one HTTP or network filter plugin per configuration so far \
             (this one has {} HTTP filters, {} network filters and {} services)",
            path.display(),
            deployment.http_filters.len(),
            deployment.network_filters.len(),
            deployment.services.len()
        );
    };
    if !deployment.services.is_empty() {
        anyhow::bail!("{}: pwhost run does not run services yet", path.display());
    }
    let policy = match config.failure_policy {
        FailurePolicy::FailClosed => scenario::FailurePolicy::FailClosed,
        FailurePolicy::FailOpen => scenario::FailurePolicy::FailOpen,
        FailurePolicy::FailReload { .. } => anyhow::bail!(
            "{}: pwhost run does not run failure_policy FAIL_RELOAD yet",
            path.display()
        ),
    };
    let engine = match runtime_override {
        Some(name) => lifecycle::runtime_name::resolve(name, runtimes::available()),
        None => lifecycle::runtime_name::resolve(&config.vm.runtime, runtimes::available()),
    }
    .map_err(|message| {
        let field = config.field_path("vm_config.runtime");
        anyhow::anyhow!("{}: {field}: {message}", path.display())
    })?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let code =
        lifecycle::code::read_local(&config.vm.code, engine, base_dir).with_context(|| {
            let field = config.field_path("vm_config.code");
            format!("{}: {field}", path.display())
        })?;
    let runtime = runtimes::create(engine, runtime_config)?;
    let abi_config = lifecycle::abi_config(config);
    let shared = abi::SharedState::new();
    let plugin = match code {
        Code::Wasm(wasm) => {
            abi::Plugin::load(&*runtime, &wasm, abi_config, shared).map_err(anyhow::Error::from)
        }
        Code::NativeName(name) => crate::plugins::load(
            &*runtime,
            &format!("{}{name}", crate::plugins::NATIVE_PREFIX),
            abi_config,
            shared,
        ),
        Code::NativeLibrary(library) => {
            crate::plugins::load(&*runtime, &library.to_string_lossy(), abi_config, shared)
        }
    }
    .with_context(|| format!("cannot load plugin {:?}", config.name))?;
    Ok(Configured {
        plugin,
        policy,
        engine,
    })
}
