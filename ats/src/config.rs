//! The plugin's arguments: the YAML files of `plugin.config` (`pwhost_ats.so a.yaml b.yaml`),
//! each a plugin configuration as Traffic Server's Wasm plugin reads it (`config: {name,
//! rootId, vmConfig: {vmId, runtime, code: {local: {filename}}}, configuration}`), or anything
//! else the `lifecycle` layer accepts (Envoy's filter blocks, a list of them), plus an optional
//! top-level `upstreams:` map naming the servers `proxy_http_call` may reach.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use lifecycle::{CodeCache, Deployment, LoadOptions, Plugins};
use serde_yaml::Value;

/// Where `proxy_http_call` may send requests: upstream name → address.
pub type Upstreams = BTreeMap<String, SocketAddr>;

/// One deployment read from the plugin's files: the plugins, loaded, and their upstreams.
pub struct Loaded {
    /// The plugins of every file, in file order (each file's HTTP filters in its order).
    pub plugins: Plugins,
    /// The upstreams of every file.
    pub upstreams: Upstreams,
}

/// Reads and parses `file`: its deployment (relative code file names resolved against the
/// file's directory, as Traffic Server's plugin does) and its upstreams.
pub fn read(file: &Path) -> Result<(Deployment, Upstreams), String> {
    let shown = file.display();
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mut document: Value = serde_yaml::from_str(&text).map_err(|e| format!("{shown}: {e}"))?;
    let upstreams = match &mut document {
        Value::Mapping(map) => match map.remove("upstreams") {
            Some(value) => upstreams(&value).map_err(|e| format!("{shown}: upstreams{e}"))?,
            None => Upstreams::new(),
        },
        _ => Upstreams::new(),
    };
    let rest = serde_yaml::to_string(&document).map_err(|e| format!("{shown}: {e}"))?;
    let mut deployment = lifecycle::parse(&rest).map_err(|e| format!("{shown}: {e}"))?;
    deployment.resolve_files(file.parent().unwrap_or(Path::new(".")));
    Ok((deployment, upstreams))
}

/// The `upstreams:` map: names to `host:port` addresses (IP literals: the plugin resolves no
/// names on Traffic Server's threads). Errors start with the field path below `upstreams`.
fn upstreams(value: &Value) -> Result<Upstreams, String> {
    let Value::Mapping(map) = value else {
        return Err(": expected a map of names to host:port addresses".into());
    };
    let mut upstreams = Upstreams::new();
    for (name, address) in map {
        let Some(name) = name.as_str() else {
            return Err(": names must be strings".into());
        };
        let address = match address {
            Value::String(text) => text.parse::<SocketAddr>().map_err(|_| {
                format!(".{name}: {text:?} is not an IP address and port (e.g. 127.0.0.1:8000)")
            })?,
            _ => return Err(format!(".{name}: expected \"ip:port\"")),
        };
        upstreams.insert(name.to_string(), address);
    }
    Ok(upstreams)
}

/// Reads every file and loads their plugins on `engines`: one deployment, the files' HTTP
/// filters in order. Nothing is loaded if any file is wrong. With `previous` (a reload), the
/// plugins keep its shared data and queues, and modules whose VM key did not change are not
/// compiled again.
pub fn load(
    files: &[PathBuf],
    engines: &dyn lifecycle::Engines,
    previous: Option<&Plugins>,
) -> Result<Loaded, String> {
    if files.is_empty() {
        return Err(
            "no configuration file given (plugin.config: pwhost_ats.so FILE.yaml ...)".into(),
        );
    }
    let mut deployment = Deployment::default();
    let mut upstreams = Upstreams::new();
    for file in files {
        let (part, part_upstreams) = read(file)?;
        if let Some(filter) = part.network_filters.first() {
            // Refused rather than left idle: a user who sent one expects it to run.
            return Err(format!(
                "{}: network filter {:?}: TCP (L4) filters do not run in Traffic Server; \
                 only HTTP filters and services do",
                file.display(),
                filter.display_name()
            ));
        }
        deployment.http_filters.extend(part.http_filters);
        deployment.services.extend(part.services);
        for (name, address) in part_upstreams {
            if let Some(other) = upstreams.insert(name.clone(), address) {
                if other != address {
                    return Err(format!(
                        "{}: upstreams.{name}: already {other} in an earlier file",
                        file.display()
                    ));
                }
            }
        }
    }
    if deployment.http_filters.is_empty() && deployment.services.is_empty() {
        return Err("no HTTP filter or service in the configuration files: nothing to run".into());
    }
    let options = LoadOptions {
        base_dir: PathBuf::from("/"),
        code_cache: CodeCache::new(None),
        compilation_cache: None,
    };
    let plugins = match previous {
        Some(previous) => Plugins::load_replacing(previous, &deployment, engines, &options),
        None => Plugins::load(&deployment, engines, &options, abi::SharedState::new()),
    }
    .map_err(|e| e.to_string())?;
    Ok(Loaded { plugins, upstreams })
}
