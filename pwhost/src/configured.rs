//! `pwhost run --config FILE`: plugins as Envoy or Traffic Server configure them, loaded through
//! the `lifecycle` layer (VM keys, the check at load) on this build's engines.

use std::path::Path;

use anyhow::Context as _;
use lifecycle::{LoadOptions, Plugins};
use runtime_api::RuntimeConfig;

use crate::runtimes;

pub use engines::BuildEngines;

/// Loads the plugins the configuration at `path` describes, each on the engine its
/// `vm_config.runtime` names (or `runtime_override`). Relative code file names are taken from
/// the configuration's directory; remote code is kept in `cache_dir` (and in memory).
pub fn load(
    path: &Path,
    runtime_override: Option<&str>,
    runtime_config: RuntimeConfig,
    cache_dir: Option<&Path>,
) -> anyhow::Result<Plugins> {
    let bytes = lifecycle::files::read_regular_file(path)
        .with_context(|| format!("cannot read configuration {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("cannot read configuration {}", path.display()))?;
    let mut deployment = lifecycle::parse(&text)
        .with_context(|| format!("invalid configuration {}", path.display()))?;
    if deployment.http_filters.is_empty() && deployment.network_filters.is_empty() {
        anyhow::bail!(
            "{}: no HTTP or network filter to run the scenario through",
            path.display()
        );
    }
    if let Some(name) = runtime_override {
        let engine = lifecycle::runtime_name::resolve(name, runtimes::available())
            .map_err(|message| anyhow::anyhow!("--runtime: {message}"))?;
        // --runtime replaces what the configuration names.
        for plugin in deployment
            .http_filters
            .iter_mut()
            .chain(&mut deployment.network_filters)
            .chain(deployment.services.iter_mut().map(|s| &mut s.plugin))
        {
            plugin.vm.runtime = engine.to_string();
        }
    }
    let engines = BuildEngines::new(runtime_config);
    let base_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let options = LoadOptions::cached_in(base_dir, cache_dir);
    let plugins = Plugins::load(&deployment, &engines, &options, abi::SharedState::new())
        .with_context(|| format!("cannot load {}", path.display()))?;
    for warning in plugins.warnings() {
        eprintln!("warning: {warning}");
    }
    Ok(plugins)
}

/// Where `pwhost` keeps what it caches (remote code under `code/`, compiled code under
/// `compiled/`): `$XDG_CACHE_HOME/pwhost`, else
/// `~/.cache/pwhost`; `None` without either variable.
pub fn default_cache_dir() -> Option<std::path::PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => std::path::PathBuf::from(dir),
        _ => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("pwhost"))
}
