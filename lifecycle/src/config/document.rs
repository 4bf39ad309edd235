//! The configuration as written: Envoy's v3 messages in their protobuf JSON mapping, read with
//! serde from YAML or JSON. Fields are snake_case, with protobuf's lowerCamelCase names as
//! aliases (`rootId`, `vmConfig`), as Envoy and Traffic Server accept both. Unknown fields are
//! refused, as Envoy's strict parsing refuses them.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::any::Any;
use super::duration::ProtoDuration;

/// `envoy.extensions.wasm.v3.PluginConfig`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PluginConfig {
    #[serde(default)]
    pub(super) name: String,
    #[serde(default, alias = "rootId")]
    pub(super) root_id: String,
    #[serde(default, alias = "vmConfig")]
    pub(super) vm_config: Option<VmConfig>,
    #[serde(default)]
    pub(super) configuration: Option<Any>,
    #[serde(default, alias = "failOpen")]
    pub(super) fail_open: Option<bool>,
    #[serde(default, alias = "failurePolicy")]
    pub(super) failure_policy: Option<FailurePolicy>,
    #[serde(default, alias = "reloadConfig")]
    pub(super) reload_config: Option<ReloadConfig>,
    #[serde(default, alias = "capabilityRestrictionConfig")]
    pub(super) capability_restriction_config: Option<CapabilityRestrictionConfig>,
    #[serde(default, alias = "allowOnHeadersStopIteration")]
    pub(super) allow_on_headers_stop_iteration: Option<BoolValue>,
}

/// A `google.protobuf.BoolValue` as its JSON mapping writes it (a plain boolean), or as the
/// wrapper message some tools write (`{value: true}`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum BoolValue {
    Plain(bool),
    Wrapped { value: bool },
}

impl BoolValue {
    pub(super) fn get(&self) -> bool {
        match self {
            BoolValue::Plain(value) | BoolValue::Wrapped { value } => *value,
        }
    }
}

/// `envoy.extensions.wasm.v3.FailurePolicy`, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(super) enum FailurePolicy {
    #[serde(rename = "UNSPECIFIED")]
    Unspecified,
    #[serde(rename = "FAIL_RELOAD")]
    FailReload,
    #[serde(rename = "FAIL_CLOSED")]
    FailClosed,
    #[serde(rename = "FAIL_OPEN")]
    FailOpen,
}

/// `envoy.extensions.wasm.v3.ReloadConfig`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReloadConfig {
    #[serde(default)]
    pub(super) backoff: Option<BackoffStrategy>,
}

/// `envoy.config.core.v3.BackoffStrategy`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BackoffStrategy {
    #[serde(default, alias = "baseInterval")]
    pub(super) base_interval: Option<ProtoDuration>,
    #[serde(default, alias = "maxInterval")]
    pub(super) max_interval: Option<ProtoDuration>,
}

/// `envoy.extensions.wasm.v3.CapabilityRestrictionConfig`: Envoy writes the allowed
/// capabilities as a map of names to (empty) sanitization configs, Traffic Server as a list.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CapabilityRestrictionConfig {
    #[serde(default, alias = "allowedCapabilities")]
    pub(super) allowed_capabilities: Option<Capabilities>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Capabilities {
    Map(BTreeMap<String, SanitizationConfig>),
    List(Vec<String>),
}

/// `envoy.extensions.wasm.v3.SanitizationConfig`: empty (Envoy implements none).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SanitizationConfig {}

/// `envoy.extensions.wasm.v3.VmConfig`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VmConfig {
    #[serde(default, alias = "vmId")]
    pub(super) vm_id: String,
    #[serde(default)]
    pub(super) runtime: String,
    #[serde(default)]
    pub(super) code: Option<AsyncDataSource>,
    #[serde(default)]
    pub(super) configuration: Option<Any>,
    #[serde(default, alias = "allowPrecompiled")]
    pub(super) allow_precompiled: bool,
    #[serde(default, alias = "nackOnCodeCacheMiss")]
    pub(super) nack_on_code_cache_miss: bool,
    #[serde(default, alias = "environmentVariables")]
    pub(super) environment_variables: Option<EnvironmentVariables>,
    #[serde(default, alias = "capabilityRestrictionConfig")]
    pub(super) capability_restriction_config: Option<CapabilityRestrictionConfig>,
}

/// `envoy.extensions.wasm.v3.EnvironmentVariables`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EnvironmentVariables {
    #[serde(default, alias = "hostEnvKeys")]
    pub(super) host_env_keys: Vec<String>,
    #[serde(default, alias = "keyValues")]
    pub(super) key_values: BTreeMap<String, String>,
}

/// `envoy.config.core.v3.AsyncDataSource`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AsyncDataSource {
    #[serde(default)]
    pub(super) local: Option<DataSource>,
    #[serde(default)]
    pub(super) remote: Option<RemoteDataSource>,
}

/// `envoy.config.core.v3.DataSource`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DataSource {
    #[serde(default)]
    pub(super) filename: Option<String>,
    #[serde(default, alias = "inlineBytes")]
    pub(super) inline_bytes: Option<String>,
    #[serde(default, alias = "inlineString")]
    pub(super) inline_string: Option<String>,
    #[serde(default, alias = "environmentVariable")]
    pub(super) environment_variable: Option<String>,
}

/// `envoy.config.core.v3.RemoteDataSource`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RemoteDataSource {
    #[serde(default, alias = "httpUri")]
    pub(super) http_uri: Option<HttpUri>,
    #[serde(default)]
    pub(super) sha256: Option<String>,
    #[serde(default, alias = "retryPolicy")]
    pub(super) retry_policy: Option<RetryPolicy>,
}

/// `envoy.config.core.v3.HttpUri`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HttpUri {
    #[serde(default)]
    pub(super) uri: Option<String>,
    #[serde(default)]
    pub(super) cluster: Option<String>,
    #[serde(default)]
    pub(super) timeout: Option<ProtoDuration>,
}

/// `envoy.config.core.v3.RetryPolicy`, the fields a code fetch uses.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RetryPolicy {
    #[serde(default, alias = "retryBackOff")]
    pub(super) retry_back_off: Option<BackoffStrategy>,
    #[serde(default, alias = "numRetries")]
    pub(super) num_retries: Option<UInt32Value>,
}

/// A `google.protobuf.UInt32Value`: a plain number, or the wrapper message.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum UInt32Value {
    Plain(u32),
    Wrapped { value: u32 },
}

impl UInt32Value {
    pub(super) fn get(&self) -> u32 {
        match self {
            UInt32Value::Plain(value) | UInt32Value::Wrapped { value } => *value,
        }
    }
}

/// `envoy.extensions.wasm.v3.WasmService`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WasmService {
    #[serde(default)]
    pub(super) config: Option<PluginConfig>,
    #[serde(default)]
    pub(super) singleton: bool,
}

/// The Wasm filters' own message (`envoy.extensions.filters.{http,network}.wasm.v3.Wasm`, and
/// the top level of Traffic Server's files): a `PluginConfig` under `config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Wasm {
    #[serde(default)]
    pub(super) config: Option<PluginConfig>,
}
