//! Plugin configuration as Envoy and Traffic Server write it (Envoy's v3 `PluginConfig`,
//! `VmConfig`, `WasmService` and the Wasm filters' wrappers), parsed strictly: every error names
//! the field path and the problem, and nothing starts on a bad configuration.
//!
//! [`parse`] accepts what users paste from Envoy's and Traffic Server's documentation as it is:
//! an Envoy filter or bootstrap extension entry (`name: envoy.filters.http.wasm` with a
//! `typed_config` carrying `@type`, or a `TypedStruct`), the Wasm message (`config: {...}`, the
//! top level of Traffic Server's files), a bare `PluginConfig`, or a list of any of these (a
//! filter chain, in order). Field names may be snake_case or protobuf's lowerCamelCase.

mod any;
mod document;
mod duration;
mod expansion;

pub use duration::parse as parse_duration;
pub use expansion::{check_yaml_expansion, MAX_YAML_NODES};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

/// A configuration error: where, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct ConfigError {
    /// The field path, e.g. `vm_config.code.remote.sha256` (empty for the document itself).
    pub path: String,
    /// The problem, e.g. `required`.
    pub message: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Where code comes from (`envoy.config.core.v3.AsyncDataSource`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodeSource {
    /// A file (`local.filename`).
    File(PathBuf),
    /// Bytes in the configuration (`local.inline_bytes`, base64 in YAML/JSON).
    Bytes(Vec<u8>),
    /// A string in the configuration (`local.inline_string`): for the null runtime the name of a
    /// compiled-in plugin, as in Envoy; for an engine the code's bytes.
    String(String),
    /// The value of an environment variable of the host (`local.environment_variable`).
    EnvironmentVariable(String),
    /// Code fetched over HTTP(S) (`remote`).
    Remote(RemoteCode),
}

/// Code fetched over HTTP(S) (`envoy.config.core.v3.RemoteDataSource`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteCode {
    /// The URL (`http_uri.uri`).
    pub uri: String,
    /// The cluster Envoy would fetch through (`http_uri.cluster`); kept, not needed here.
    pub cluster: Option<String>,
    /// How long one fetch may take (`http_uri.timeout`).
    pub timeout: Duration,
    /// The code's SHA-256, 64 lowercase hex digits; nothing else is run.
    pub sha256: String,
    /// Retries after a failed fetch (`retry_policy.num_retries`, default 1 as in Envoy).
    pub retries: u32,
    /// The first wait before a retry (`retry_policy.retry_back_off.base_interval`, default 1 s).
    pub backoff_base: Duration,
    /// The longest wait (`retry_back_off.max_interval`, default 10 × the base).
    pub backoff_max: Duration,
}

/// Environment variables a VM sees through WASI (`EnvironmentVariables`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Environment {
    /// Names of the host's variables passed through (absent ones skipped).
    pub host_env_keys: Vec<String>,
    /// Variables given in the configuration.
    pub key_values: BTreeMap<String, String>,
}

impl Environment {
    /// The variables a VM sees: `key_values`, then the host's `host_env_keys`, as Envoy builds
    /// them.
    pub fn resolve(&self) -> Vec<(String, String)> {
        let mut variables: Vec<(String, String)> = self
            .key_values
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for key in &self.host_env_keys {
            if let Ok(value) = std::env::var(key) {
                variables.push((key.clone(), value));
            }
        }
        variables
    }
}

/// How to find or start a plugin's VM (`VmConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// The VM id: plugins with the same id and code share a VM (and shared data).
    pub vm_id: String,
    /// The runtime as written (`envoy.wasm.runtime.v8`, `ats.wasm.runtime.wamr`, `wasmtime`, or
    /// empty for the build's default); see [`crate::runtime_name`].
    pub runtime: String,
    /// The code.
    pub code: CodeSource,
    /// The VM configuration (`proxy_on_vm_start`).
    pub configuration: Vec<u8>,
    /// Load an engine artifact stored in the module when there is one of this engine's build.
    pub allow_precompiled: bool,
    /// With remote code missing from the cache: refuse the configuration (and fetch in the
    /// background) instead of waiting for the fetch.
    pub nack_on_code_cache_miss: bool,
    /// Environment variables.
    pub environment: Environment,
}

/// What happens to streams when a plugin's VM fails (`failure_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Streams get a local 503 (the default).
    FailClosed,
    /// The plugin is skipped.
    FailOpen,
    /// The next stream gets a fresh VM once the backoff has passed since the failed one was
    /// made: `base_interval`, doubling with every reload in a row up to `max_interval` (with
    /// jitter); streams meanwhile fail closed.
    FailReload {
        /// The shortest time between reloads (`reload_config.backoff.base_interval`, default
        /// 1 s).
        base_interval: Duration,
        /// The longest (`max_interval`, default 10 × the base).
        max_interval: Duration,
    },
}

/// One plugin (`PluginConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginConfig {
    /// Where it is in the configuration (e.g. `[1].typed_config.config`; empty at the top), for
    /// messages about it.
    pub path: String,
    /// The plugin's name (`plugin_name`), used in logs and counters.
    pub name: String,
    /// The root id selecting the plugin's root context in the module.
    pub root_id: String,
    /// Its VM.
    pub vm: VmConfig,
    /// The plugin configuration (`proxy_on_configure`).
    pub configuration: Vec<u8>,
    /// What a VM failure does to streams.
    pub failure_policy: FailurePolicy,
    /// The host functions the plugin may call, if restricted (`capability_restriction_config`).
    pub allowed_capabilities: Option<BTreeSet<String>>,
    /// Envoy's `allow_on_headers_stop_iteration`.
    pub allow_on_headers_stop_iteration: bool,
}

/// A Wasm service (`envoy.bootstrap.wasm`'s `WasmService`): a plugin with no streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WasmService {
    /// The plugin.
    pub plugin: PluginConfig,
    /// One VM on a thread of its own, instead of one per worker.
    pub singleton: bool,
}

/// Every plugin of a configuration, by what it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deployment {
    /// The HTTP filter chain, in order.
    pub http_filters: Vec<PluginConfig>,
    /// The network (TCP) filter chain, in order.
    pub network_filters: Vec<PluginConfig>,
    /// The services.
    pub services: Vec<WasmService>,
}

impl Deployment {
    /// Every plugin, with the path of its configuration, for checks across them.
    pub fn plugins(&self) -> impl Iterator<Item = &PluginConfig> {
        self.http_filters
            .iter()
            .chain(&self.network_filters)
            .chain(self.services.iter().map(|s| &s.plugin))
    }

    /// Makes every relative code file name relative to `base` (the directory of the file the
    /// configuration came from), as Envoy and Traffic Server read them.
    pub fn resolve_files(&mut self, base: &std::path::Path) {
        let plugins = self
            .http_filters
            .iter_mut()
            .chain(&mut self.network_filters)
            .chain(self.services.iter_mut().map(|s| &mut s.plugin));
        for plugin in plugins {
            if let CodeSource::File(path) = &mut plugin.vm.code {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
        }
    }
}

const HTTP_FILTER: &str = "envoy.filters.http.wasm";
const NETWORK_FILTER: &str = "envoy.filters.network.wasm";
const SERVICE: &str = "envoy.bootstrap.wasm";
const TYPE_PREFIX: &str = "type.googleapis.com/";
const TYPED_STRUCTS: [&str; 2] = ["udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"];

/// What an entry of a configuration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    HttpFilter,
    NetworkFilter,
    Service,
}

impl Kind {
    fn of_extension(name: &str) -> Option<Kind> {
        match name {
            HTTP_FILTER => Some(Kind::HttpFilter),
            NETWORK_FILTER => Some(Kind::NetworkFilter),
            SERVICE => Some(Kind::Service),
            _ => None,
        }
    }

    /// The message type its `typed_config` carries.
    fn message(self) -> &'static str {
        match self {
            Kind::HttpFilter => "envoy.extensions.filters.http.wasm.v3.Wasm",
            Kind::NetworkFilter => "envoy.extensions.filters.network.wasm.v3.Wasm",
            Kind::Service => "envoy.extensions.wasm.v3.WasmService",
        }
    }
}

/// Parses a configuration (YAML or JSON): one entry or a list (see the module's documentation).
pub fn parse(text: &str) -> Result<Deployment, ConfigError> {
    check_yaml_expansion(text).map_err(|e| ConfigError::new("", e))?;
    let document: Value =
        serde_yaml::from_str(text).map_err(|e| ConfigError::new("", e.to_string()))?;
    let mut deployment = Deployment::default();
    match &document {
        Value::Sequence(entries) => {
            for (i, entry) in entries.iter().enumerate() {
                add_entry(&mut deployment, entry, &format!("[{i}]"))?;
            }
        }
        Value::Mapping(_) => add_entry(&mut deployment, &document, "")?,
        Value::Null => return Err(ConfigError::new("", "the configuration is empty")),
        _ => {
            return Err(ConfigError::new(
                "",
                "a configuration is a plugin configuration or a list of them",
            ))
        }
    }
    Ok(deployment)
}

fn join(path: &str, field: &str) -> String {
    match (path.is_empty(), field.starts_with('[')) {
        (true, _) => field.to_string(),
        (false, true) => format!("{path}{field}"),
        (false, false) => format!("{path}.{field}"),
    }
}

fn add_entry(deployment: &mut Deployment, entry: &Value, path: &str) -> Result<(), ConfigError> {
    let Value::Mapping(map) = entry else {
        return Err(ConfigError::new(path, "expected a plugin configuration"));
    };
    let has = |key: &str| map.contains_key(key);
    if has("typed_config") || has("typedConfig") {
        return add_extension(deployment, map, path);
    }
    if has("config") {
        let kind = if has("singleton") {
            Kind::Service
        } else {
            Kind::HttpFilter
        };
        return add_message(deployment, kind, entry, path);
    }
    // A bare PluginConfig is an HTTP filter.
    let plugin = plugin_config(deserialize(entry, path)?, path)?;
    deployment.http_filters.push(plugin);
    Ok(())
}

/// The field of `map` written `snake` or, as protobuf's JSON mapping allows, `camel`, with the
/// spelling found (`snake` if neither); both at once is an error, as serde's aliases make it for
/// the other fields, rather than one of them silently dropped.
fn one_spelling<'m>(
    map: &'m Mapping,
    snake: &'static str,
    camel: &'static str,
    path: &str,
) -> Result<(&'static str, Option<&'m Value>), ConfigError> {
    match (map.get(snake), map.get(camel)) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            join(path, camel),
            format!("duplicate field (also written {snake})"),
        )),
        (None, Some(value)) => Ok((camel, Some(value))),
        (value, None) => Ok((snake, value)),
    }
}

/// An Envoy extension entry: `name` and `typed_config`.
fn add_extension(
    deployment: &mut Deployment,
    map: &Mapping,
    path: &str,
) -> Result<(), ConfigError> {
    for key in map.keys() {
        let key = key.as_str().unwrap_or_default();
        if !matches!(key, "name" | "typed_config" | "typedConfig") {
            return Err(ConfigError::new(
                join(path, key),
                "unknown field (an extension has name and typed_config)",
            ));
        }
    }
    let name = map
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ConfigError::new(join(path, "name"), "required"))?;
    let kind = Kind::of_extension(name).ok_or_else(|| {
        ConfigError::new(
            join(path, "name"),
            format!(
                "unknown extension {name:?} (pwhost runs {HTTP_FILTER}, {NETWORK_FILTER} and {SERVICE})"
            ),
        )
    })?;
    let (field, typed) = one_spelling(map, "typed_config", "typedConfig", path)?;
    let typed = typed.unwrap_or(&Value::Null);
    let path = join(path, field);
    let Value::Mapping(typed) = typed else {
        return Err(ConfigError::new(path, "expected an object with \"@type\""));
    };
    let type_url = typed
        .get("@type")
        .and_then(Value::as_str)
        .ok_or_else(|| ConfigError::new(join(&path, "@type"), "required"))?;
    let type_name = type_url.strip_prefix(TYPE_PREFIX).unwrap_or(type_url);
    let expect = |found: &str, at: &str| {
        if found == kind.message() {
            Ok(())
        } else {
            Err(ConfigError::new(
                at,
                format!(
                    "{name} takes {TYPE_PREFIX}{}, not {found:?}",
                    kind.message()
                ),
            ))
        }
    };
    if TYPED_STRUCTS.contains(&type_name) {
        // A TypedStruct names the message in `type_url` and carries it as JSON in `value`.
        for key in typed.keys() {
            let key = key.as_str().unwrap_or_default();
            if !matches!(key, "@type" | "type_url" | "typeUrl" | "value") {
                return Err(ConfigError::new(join(&path, key), "unknown field"));
            }
        }
        let inner_url = one_spelling(typed, "type_url", "typeUrl", &path)?
            .1
            .and_then(Value::as_str)
            .ok_or_else(|| ConfigError::new(join(&path, "type_url"), "required"))?;
        expect(
            inner_url.strip_prefix(TYPE_PREFIX).unwrap_or(inner_url),
            &join(&path, "type_url"),
        )?;
        let value = typed.get("value").cloned().unwrap_or(Value::Null);
        return add_message(deployment, kind, &value, &join(&path, "value"));
    }
    expect(type_name, &join(&path, "@type"))?;
    let mut message = typed.clone();
    message.remove("@type");
    add_message(deployment, kind, &Value::Mapping(message), &path)
}

/// The message an extension carries: the filters' `Wasm` (`config`) or a `WasmService`.
fn add_message(
    deployment: &mut Deployment,
    kind: Kind,
    message: &Value,
    path: &str,
) -> Result<(), ConfigError> {
    match kind {
        Kind::HttpFilter | Kind::NetworkFilter => {
            let wasm: document::Wasm = deserialize(message, path)?;
            let config = wasm
                .config
                .ok_or_else(|| ConfigError::new(join(path, "config"), "required"))?;
            let plugin = plugin_config(config, &join(path, "config"))?;
            match kind {
                Kind::HttpFilter => deployment.http_filters.push(plugin),
                _ => deployment.network_filters.push(plugin),
            }
        }
        Kind::Service => {
            let service: document::WasmService = deserialize(message, path)?;
            let config = service
                .config
                .ok_or_else(|| ConfigError::new(join(path, "config"), "required"))?;
            deployment.services.push(WasmService {
                plugin: plugin_config(config, &join(path, "config"))?,
                singleton: service.singleton,
            });
        }
    }
    Ok(())
}

/// Reads `value` as `T`, with serde's error at the field path it arose at.
fn deserialize<T: DeserializeOwned>(value: &Value, path: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value.clone()).map_err(|error| {
        let at = error.path().to_string();
        let at = if at == "." { String::new() } else { at };
        let message = error.into_inner().to_string();
        // serde says "unknown field `runtme`, expected one of ...", at the unknown field.
        if let Some(rest) = message.strip_prefix("unknown field `") {
            if let Some((_, expected)) = rest.split_once('`') {
                let expected = expected.trim_start_matches(", ");
                return ConfigError::new(join(path, &at), format!("unknown field ({expected})"));
            }
        }
        ConfigError::new(join(path, &at), message)
    })
}

fn plugin_config(raw: document::PluginConfig, path: &str) -> Result<PluginConfig, ConfigError> {
    let field = |name: &str| join(path, name);
    let vm = raw
        .vm_config
        .ok_or_else(|| ConfigError::new(field("vm_config"), "required"))?;
    let vm = vm_config(vm, &field("vm_config"))?;
    let explicit_policy = raw
        .failure_policy
        .filter(|p| *p != document::FailurePolicy::Unspecified);
    let fail_open = raw.fail_open.unwrap_or(false);
    if fail_open && explicit_policy.is_some() {
        return Err(ConfigError::new(
            field("fail_open"),
            "only one of fail_open or failure_policy can be set",
        ));
    }
    if raw.reload_config.is_some() && explicit_policy != Some(document::FailurePolicy::FailReload) {
        return Err(ConfigError::new(
            field("reload_config"),
            "applies only to failure_policy FAIL_RELOAD",
        ));
    }
    let failure_policy = match (fail_open, explicit_policy) {
        (true, _) | (false, Some(document::FailurePolicy::FailOpen)) => FailurePolicy::FailOpen,
        (false, Some(document::FailurePolicy::FailReload)) => {
            let backoff = raw.reload_config.and_then(|r| r.backoff);
            let (base_interval, max_interval) =
                backoff_strategy(backoff, &field("reload_config.backoff"))?;
            FailurePolicy::FailReload {
                base_interval,
                max_interval,
            }
        }
        _ => FailurePolicy::FailClosed,
    };
    let names = |restriction: Option<document::CapabilityRestrictionConfig>| {
        restriction
            .and_then(|c| c.allowed_capabilities)
            .map(|capabilities| match capabilities {
                document::Capabilities::Map(map) => map.into_keys().collect::<BTreeSet<_>>(),
                document::Capabilities::List(list) => list.into_iter().collect(),
            })
    };
    // Given on the VM and on the plugin, one would silently win over the other.
    let allowed_capabilities = match (names(vm.1), names(raw.capability_restriction_config)) {
        (Some(on_vm), Some(on_plugin)) if on_vm != on_plugin => {
            return Err(ConfigError::new(
                field("capability_restriction_config"),
                "differs from vm_config.capability_restriction_config: give it in one place",
            ))
        }
        (on_vm, on_plugin) => on_vm.or(on_plugin),
    };
    Ok(PluginConfig {
        path: path.to_string(),
        name: raw.name,
        root_id: raw.root_id,
        vm: vm.0,
        configuration: raw.configuration.map(|c| c.0).unwrap_or_default(),
        failure_policy,
        allowed_capabilities,
        allow_on_headers_stop_iteration: raw
            .allow_on_headers_stop_iteration
            .is_some_and(|b| b.get()),
    })
}

/// A backoff's base and max intervals: base at least 1 ms (default 1 s), max default 10 × base.
fn backoff_strategy(
    backoff: Option<document::BackoffStrategy>,
    path: &str,
) -> Result<(Duration, Duration), ConfigError> {
    let Some(backoff) = backoff else {
        return Ok((Duration::from_secs(1), Duration::from_secs(10)));
    };
    let base = backoff
        .base_interval
        .ok_or_else(|| ConfigError::new(join(path, "base_interval"), "required"))?
        .0;
    if base < Duration::from_millis(1) {
        return Err(ConfigError::new(
            join(path, "base_interval"),
            "must be at least 1ms",
        ));
    }
    let max = backoff.max_interval.map_or(base * 10, |m| m.0);
    if max < base {
        return Err(ConfigError::new(
            join(path, "max_interval"),
            "must not be below base_interval",
        ));
    }
    Ok((base, max))
}

/// The VM configuration, and the capability restrictions given at the VM (which win over the
/// plugin's, as in Envoy).
fn vm_config(
    raw: document::VmConfig,
    path: &str,
) -> Result<(VmConfig, Option<document::CapabilityRestrictionConfig>), ConfigError> {
    let field = |name: &str| join(path, name);
    let code = raw
        .code
        .ok_or_else(|| ConfigError::new(field("code"), "required"))?;
    let code = code_source(code, &field("code"))?;
    let environment = match raw.environment_variables {
        None => Environment::default(),
        Some(env) => {
            let mut seen = BTreeSet::new();
            for key in env.host_env_keys.iter().chain(env.key_values.keys()) {
                if !seen.insert(key) {
                    return Err(ConfigError::new(
                        field("environment_variables"),
                        format!("key {key:?} is given twice; keys must be unique"),
                    ));
                }
            }
            Environment {
                host_env_keys: env.host_env_keys,
                key_values: env.key_values,
            }
        }
    };
    if crate::runtime_name::is_null(&raw.runtime) && !environment.key_values.is_empty() {
        return Err(ConfigError::new(
            field("environment_variables.key_values"),
            "must not be set for the null runtime (native code sees the host's environment)",
        ));
    }
    Ok((
        VmConfig {
            vm_id: raw.vm_id,
            runtime: raw.runtime,
            code,
            configuration: raw.configuration.map(|c| c.0).unwrap_or_default(),
            allow_precompiled: raw.allow_precompiled,
            nack_on_code_cache_miss: raw.nack_on_code_cache_miss,
            environment,
        },
        raw.capability_restriction_config,
    ))
}

fn code_source(raw: document::AsyncDataSource, path: &str) -> Result<CodeSource, ConfigError> {
    match (raw.local, raw.remote) {
        (Some(local), None) => local_source(local, &join(path, "local")),
        (None, Some(remote)) => remote_source(remote, &join(path, "remote")),
        (Some(_), Some(_)) => Err(ConfigError::new(
            path,
            "exactly one of local or remote, not both",
        )),
        (None, None) => Err(ConfigError::new(path, "one of local or remote is required")),
    }
}

fn local_source(raw: document::DataSource, path: &str) -> Result<CodeSource, ConfigError> {
    let given = [
        raw.filename.is_some(),
        raw.inline_bytes.is_some(),
        raw.inline_string.is_some(),
        raw.environment_variable.is_some(),
    ]
    .iter()
    .filter(|given| **given)
    .count();
    if given != 1 {
        return Err(ConfigError::new(
            path,
            "exactly one of filename, inline_bytes, inline_string or environment_variable",
        ));
    }
    if let Some(filename) = raw.filename {
        if filename.is_empty() {
            return Err(ConfigError::new(
                join(path, "filename"),
                "must not be empty",
            ));
        }
        return Ok(CodeSource::File(PathBuf::from(filename)));
    }
    if let Some(bytes) = raw.inline_bytes {
        return base64::engine::general_purpose::STANDARD
            .decode(bytes.trim())
            .map(CodeSource::Bytes)
            .map_err(|e| ConfigError::new(join(path, "inline_bytes"), format!("not base64: {e}")));
    }
    if let Some(text) = raw.inline_string {
        return Ok(CodeSource::String(text));
    }
    match raw.environment_variable {
        Some(name) if !name.is_empty() => Ok(CodeSource::EnvironmentVariable(name)),
        _ => Err(ConfigError::new(
            join(path, "environment_variable"),
            "must not be empty",
        )),
    }
}

fn remote_source(raw: document::RemoteDataSource, path: &str) -> Result<CodeSource, ConfigError> {
    let field = |name: &str| join(path, name);
    let http_uri = raw
        .http_uri
        .ok_or_else(|| ConfigError::new(field("http_uri"), "required"))?;
    let uri = http_uri
        .uri
        .filter(|u| !u.is_empty())
        .ok_or_else(|| ConfigError::new(field("http_uri.uri"), "required"))?;
    if !(uri.starts_with("http://") || uri.starts_with("https://")) {
        return Err(ConfigError::new(
            field("http_uri.uri"),
            format!("{uri:?} is not an http:// or https:// URL"),
        ));
    }
    let timeout = http_uri
        .timeout
        .ok_or_else(|| ConfigError::new(field("http_uri.timeout"), "required"))?
        .0;
    let sha256 = raw
        .sha256
        .ok_or_else(|| ConfigError::new(field("sha256"), "required"))?;
    if sha256.len() != 64
        || !sha256
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(ConfigError::new(
            field("sha256"),
            "64 lowercase hexadecimal digits (the SHA-256 of the code)",
        ));
    }
    let retry = raw.retry_policy.unwrap_or_default();
    let retries = retry.num_retries.map_or(1, |n| n.get());
    let (backoff_base, backoff_max) =
        backoff_strategy(retry.retry_back_off, &field("retry_policy.retry_back_off"))?;
    Ok(CodeSource::Remote(RemoteCode {
        uri,
        cluster: http_uri.cluster,
        timeout,
        sha256,
        retries,
        backoff_base,
        backoff_max,
    }))
}

impl PluginConfig {
    /// The plugin's name for logs and metrics: its `name`, else its `root_id`, else `plugin`.
    pub fn display_name(&self) -> &str {
        if !self.name.is_empty() {
            &self.name
        } else if !self.root_id.is_empty() {
            &self.root_id
        } else {
            "plugin"
        }
    }

    /// The path of one of its fields, for messages (e.g. `[1].typed_config.config.vm_config`).
    pub fn field_path(&self, field: &str) -> String {
        join(&self.path, field)
    }
}

impl fmt::Display for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailurePolicy::FailClosed => "FAIL_CLOSED",
            FailurePolicy::FailOpen => "FAIL_OPEN",
            FailurePolicy::FailReload { .. } => "FAIL_RELOAD",
        })
    }
}

#[cfg(test)]
mod tests;
