//! `pwhost serve`'s configuration: listeners with their routes and plugin chains, clusters,
//! services, workers. Plugin blocks are the lifecycle layer's (Envoy's and Traffic Server's
//! formats, parsed strictly); everything else is parsed here, as strictly: an unknown field or a
//! bad value is an error naming its path (`listeners[0].adress: unknown field`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lifecycle::Deployment;
use serde::Deserialize;

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// What is wrong, starting with the field's path.
    pub message: String,
}

/// The whole configuration.
#[derive(Debug)]
pub struct ServeConfig {
    /// Worker threads (each with its own VM copy of every plugin).
    pub workers: usize,
    /// Where clients connect.
    pub listeners: Vec<Listener>,
    /// Where requests go, by name.
    pub clusters: BTreeMap<String, Cluster>,
    /// Plugins that run beside the traffic (Envoy's `WasmService`).
    pub services: Deployment,
    /// Where the admin listener listens, if anywhere.
    pub admin: Option<SocketAddr>,
    /// The configuration as written (for `/config_dump`).
    pub text: String,
    /// The file it was read from (what a reload reads again).
    pub path: Option<PathBuf>,
}

/// One listening address and what runs on it.
#[derive(Debug)]
pub struct Listener {
    /// Its name, for logs and metrics.
    pub name: String,
    /// Where it listens.
    pub address: SocketAddr,
    /// Which cluster a request goes to.
    pub routes: Vec<Route>,
    /// The HTTP filter chain, in order.
    pub plugins: Deployment,
}

/// A request to `cluster` when its path starts with `prefix` (and its host is `host`, if set).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The path prefix (default `/`).
    #[serde(default = "slash")]
    pub prefix: String,
    /// The `:authority` (without port) it must have, if any.
    #[serde(default)]
    pub host: Option<String>,
    /// Where it goes.
    pub cluster: String,
}

fn slash() -> String {
    "/".into()
}

/// Upstream endpoints and how to reach them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Addresses, used in turn.
    pub endpoints: Vec<SocketAddr>,
    /// How long a connection may take.
    #[serde(default = "connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// How long the upstream may stay silent while answering.
    #[serde(default = "request_timeout", with = "duration")]
    pub request_timeout: Duration,
    /// Speak HTTP/2 without TLS (h2c, prior knowledge) to the endpoints.
    #[serde(default)]
    pub http2: bool,
}

fn connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn request_timeout() -> Duration {
    Duration::from_secs(15)
}

/// Durations as Envoy writes them (`"1s"`, `"0.25s"`, `"250ms"`).
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration (e.g. \"1s\", \"0.5s\", \"250ms\")"
            ))
        })
    }

    fn parse(text: &str) -> Option<Duration> {
        let text = text.trim();
        let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
            (ms, 0.001)
        } else {
            (text.strip_suffix('s')?, 1.0)
        };
        let value: f64 = number.trim().parse().ok()?;
        Duration::try_from_secs_f64(value * scale).ok()
    }
}

/// The file's shape, before the plugin blocks go to the lifecycle layer.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    workers: Option<usize>,
    listeners: Vec<ListenerFile>,
    #[serde(default)]
    clusters: BTreeMap<String, Cluster>,
    #[serde(default)]
    services: Option<serde_yaml::Value>,
    #[serde(default)]
    admin: Option<AdminFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    address: SocketAddr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerFile {
    #[serde(default)]
    name: Option<String>,
    address: SocketAddr,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(default)]
    http_filters: Option<serde_yaml::Value>,
}

impl ServeConfig {
    /// Reads `file`. Relative code paths are relative to the file's directory.
    pub fn read(file: &Path) -> Result<ServeConfig, ConfigError> {
        let error = |message: String| ConfigError {
            file: file.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(file).map_err(|e| error(format!("cannot read: {e}")))?;
        // Code paths are relative to the file's directory, wherever the proxy runs from.
        let absolute = std::path::absolute(file).map_err(|e| error(format!("{e}")))?;
        let base = absolute.parent().unwrap_or(Path::new("/"));
        let mut config = ServeConfig::parse(&text, base).map_err(error)?;
        config.path = Some(absolute);
        Ok(config)
    }

    /// Parses a configuration; relative code paths are made relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<ServeConfig, String> {
        // serde_yaml's errors start with the field's path and end with the line.
        let file: File = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let mut listeners = Vec::new();
        for (index, listener) in file.listeners.into_iter().enumerate() {
            let at = format!("listeners[{index}]");
            let mut plugins = match &listener.http_filters {
                Some(value) => plugin_blocks(value, &format!("{at}.http_filters"))?,
                None => Deployment::default(),
            };
            if !plugins.services.is_empty() || !plugins.network_filters.is_empty() {
                return Err(format!(
                    "{at}.http_filters: only HTTP filters belong here (services go under services:)"
                ));
            }
            plugins.resolve_files(base);
            for (route_index, route) in listener.routes.iter().enumerate() {
                if !file.clusters.contains_key(&route.cluster) {
                    return Err(format!(
                        "{at}.routes[{route_index}].cluster: no cluster named {:?}",
                        route.cluster
                    ));
                }
            }
            if listener.routes.is_empty() {
                return Err(format!("{at}.routes: at least one route is needed"));
            }
            listeners.push(Listener {
                name: listener.name.unwrap_or_else(|| format!("listener_{index}")),
                address: listener.address,
                routes: listener.routes,
                plugins,
            });
        }
        if listeners.is_empty() {
            return Err("listeners: at least one listener is needed".into());
        }
        for (name, cluster) in &file.clusters {
            if cluster.endpoints.is_empty() {
                return Err(format!("clusters.{name}.endpoints: at least one is needed"));
            }
        }
        let mut services = match &file.services {
            Some(value) => plugin_blocks(value, "services")?,
            None => Deployment::default(),
        };
        if !services.http_filters.is_empty() || !services.network_filters.is_empty() {
            return Err(
                "services: only services belong here (envoy.bootstrap.wasm / WasmService blocks)"
                    .into(),
            );
        }
        services.resolve_files(base);
        let workers = match file.workers {
            Some(0) => return Err("workers: must be at least 1".into()),
            Some(workers) => workers,
            None => std::thread::available_parallelism().map_or(1, usize::from),
        };
        Ok(ServeConfig {
            workers,
            listeners,
            clusters: file.clusters,
            services,
            admin: file.admin.map(|admin| admin.address),
            text: text.to_string(),
            path: None,
        })
    }
}

/// Parses plugin blocks with the lifecycle layer, prefixing its errors with `at`.
fn plugin_blocks(value: &serde_yaml::Value, at: &str) -> Result<Deployment, String> {
    let text = serde_yaml::to_string(value).map_err(|e| format!("{at}: {e}"))?;
    lifecycle::parse(&text).map_err(|e| format!("{at}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifecycle::CodeSource;

    const MINIMAL: &str = "
listeners:
  - address: 127.0.0.1:8080
    routes: [{cluster: backend}]
    http_filters:
      - name: headers
        vm_config: {code: {local: {filename: plugins/http_headers.wasm}}}
clusters:
  backend: {endpoints: [127.0.0.1:9000], connect_timeout: 0.5s}
";

    #[test]
    fn a_minimal_file_has_defaults_and_paths_relative_to_it() {
        let config = ServeConfig::parse(MINIMAL, Path::new("/etc/pwhost")).unwrap();
        assert!(config.workers >= 1);
        let listener = &config.listeners[0];
        assert_eq!(listener.name, "listener_0");
        assert_eq!(listener.routes[0].prefix, "/");
        let CodeSource::File(path) = &listener.plugins.http_filters[0].vm.code else {
            panic!("a file");
        };
        assert_eq!(path, Path::new("/etc/pwhost/plugins/http_headers.wasm"));
        let backend = &config.clusters["backend"];
        assert_eq!(backend.connect_timeout, Duration::from_millis(500));
        assert_eq!(backend.request_timeout, Duration::from_secs(15));
    }

    #[test]
    fn errors_name_the_field_and_the_problem() {
        let cases = [
            (
                MINIMAL.replace("address:", "adress:"),
                "listeners[0]: unknown field `adress`, expected one of",
            ),
            (
                MINIMAL.replace("0.5s", "soon"),
                // serde_yaml names the map; the line and column point at the field.
                "clusters.backend: \"soon\" is not a duration",
            ),
            (
                MINIMAL.replace("{cluster: backend}", "{cluster: elsewhere}"),
                "listeners[0].routes[0].cluster: no cluster named \"elsewhere\"",
            ),
            (
                MINIMAL.replace("vm_config:", "vm_confg:"),
                "listeners[0].http_filters: ",
            ),
            (
                MINIMAL.replace("[127.0.0.1:9000]", "[]"),
                "clusters.backend.endpoints",
            ),
        ];
        for (text, expected) in cases {
            let error = ServeConfig::parse(&text, Path::new("/")).unwrap_err();
            assert!(error.starts_with(expected), "{error:?} for {expected:?}");
        }
    }
}
