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

/// The admin listener (`/stats/prometheus`, `/ready`, `/config_dump`, `POST /reload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminListener {
    /// Where it listens.
    pub address: SocketAddr,
    /// How long a client has for a request's headers, as on an HTTP listener (60 s unless
    /// set; `None`: for ever).
    pub request_headers_timeout: Option<Duration>,
}

/// The whole configuration.
#[derive(Debug)]
pub struct ServeConfig {
    /// Worker threads (each with its own VM copy of every plugin).
    pub workers: usize,
    /// `workers` as the file gives it (`None`: one per core, counted at start): what a reload
    /// compares, so that the same file reloads even where the cores available changed.
    pub(crate) workers_written: Option<usize>,
    /// Where clients connect.
    pub listeners: Vec<Listener>,
    /// Where requests go, by name.
    pub clusters: BTreeMap<String, Cluster>,
    /// Plugins that run beside the traffic (Envoy's `WasmService`).
    pub services: Deployment,
    /// The admin listener, if any.
    pub admin: Option<AdminListener>,
    /// How long streams and connections in flight may take to finish once the proxy is told
    /// to stop (SIGTERM, SIGINT).
    pub drain_timeout: Duration,
    /// How much plugins may keep in shared data and queues, per VM id (`shared_limits`).
    pub shared_limits: abi::SharedLimits,
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
    /// What it carries: HTTP streams or TCP connections.
    pub protocol: Protocol,
    /// Which cluster a request goes to (HTTP).
    pub routes: Vec<Route>,
    /// Where every connection goes (TCP, as Envoy's `tcp_proxy` filter's `cluster`).
    pub cluster: Option<String>,
    /// The filter chain, in order: HTTP filters (HTTP) or network filters (TCP).
    pub plugins: Deployment,
    /// What a client may send, with Envoy's names and defaults.
    pub limits: Limits,
    /// TCP: how long a connection may go without traffic before it is closed (`None`: for
    /// ever). Envoy's `tcp_proxy` `idle_timeout` (1 h; `0s` turns it off).
    pub idle_timeout: Option<Duration>,
}

/// A listener's limits on what clients send, as Envoy's listener and HTTP connection manager
/// have them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes a plugin may buffer per body (HTTP: over it, 413 for a request; a response's
    /// stream is reset, its headers having gone out, as Envoy resets it then) or per direction
    /// (TCP: over it, the connection closes). Envoy's listener
    /// `per_connection_buffer_limit_bytes` (1 MiB).
    pub buffer_limit_bytes: usize,
    /// HTTP: request headers larger than this many KiB (names and values) are answered 431
    /// before any plugin sees them. Envoy's `max_request_headers_kb` (60, at most 8192).
    pub max_request_headers_kb: u32,
    /// HTTP: requests with more headers than this are answered 431 before any plugin sees
    /// them. Envoy's `max_headers_count` (100).
    pub max_headers_count: u32,
    /// HTTP: how long a client has to send a request's headers, from the request's first
    /// byte (from the connection's start for its first request); past it, a client that began
    /// a request is answered 408 and the connection closes, one that sent nothing is closed.
    /// Envoy's `request_headers_timeout` (`None`, `0s` in the file: no deadline). Envoy has
    /// none by default; pwhost has 60 s, nginx's `client_header_timeout`, since Pingora by
    /// itself would hold a connection that never completes its headers for ever. Over 60 s,
    /// a client silent for 60 s in its headers is closed by Pingora without a 408.
    pub request_headers_timeout: Option<Duration>,
    /// HTTP: how long a stream may go with its client neither reading what the proxy writes
    /// nor (HTTP/1.1) sending more of its body (each write or read waiting longer fails the
    /// stream: a reset, counted with cause `client`). Envoy's `stream_idle_timeout` (5 min;
    /// `None`, `0s` in the file: no limit, as Pingora has by itself for a client that stops
    /// reading). Pingora reads an HTTP/2 request body without a time limit: a stalled HTTP/2
    /// upload ends at the cluster's `request_timeout` instead (504) while the upstream waits
    /// for the body.
    pub stream_idle_timeout: Option<Duration>,
}

/// The most headers Pingora's HTTP/1 parser takes (more is its 400).
const MAX_HEADERS_COUNT: u32 = 256;

/// The most KiB of headers Pingora's HTTP/1 parser takes (more is its 400).
const MAX_HEADERS_KB: u32 = 1023;

/// The most worker threads `workers` may ask for.
const MAX_WORKERS: usize = 1024;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            buffer_limit_bytes: 1 << 20,
            max_request_headers_kb: 60,
            max_headers_count: 100,
            request_headers_timeout: Some(Duration::from_secs(60)),
            stream_idle_timeout: Some(Duration::from_secs(300)),
        }
    }
}

impl Listener {
    /// The field its filter chain is written in, for errors.
    pub fn filters_field(&self) -> &'static str {
        match self.protocol {
            Protocol::Http => "http_filters",
            Protocol::Tcp => "network_filters",
        }
    }
}

/// What a listener carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2 (h2c) streams through HTTP filters, routed to clusters.
    #[default]
    Http,
    /// TCP connections through network filters to one cluster.
    Tcp,
}

/// A request to `cluster` when its path starts with `prefix` (and its host is `host`, if set).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Its name, for plugins (Envoy's route `name`: the `xds.route_name` attribute, empty if
    /// unnamed).
    #[serde(default)]
    pub name: Option<String>,
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
                "{text:?} is not a duration of 1 ns to 10,000 years (e.g. \"1s\", \"0.5s\", \
                 \"250ms\")"
            ))
        })
    }

    pub(super) fn parse(text: &str) -> Option<Duration> {
        let text = text.trim();
        let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
            (ms, 0.001)
        } else {
            (text.strip_suffix('s')?, 1.0)
        };
        let value: f64 = number.trim().parse().ok()?;
        Duration::try_from_secs_f64(value * scale)
            .ok()
            .filter(|duration| duration.as_secs() <= MAX_SECONDS)
            // Below a nanosecond is not zero, which reads "none" where a timeout may be off.
            .filter(|duration| value == 0.0 || !duration.is_zero())
    }

    /// The longest duration taken, `google.protobuf.Duration`'s (10,000 years) as Envoy
    /// checks it: more would overflow the clock when a timer is set.
    const MAX_SECONDS: u64 = 315_576_000_000;
}

/// A map whose every key is new: a name given twice is refused (a plain map keeps the last,
/// and the first would be lost without a word).
fn unique_names<'de, D, V>(deserializer: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Unique<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Unique<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("a map of names")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut names = BTreeMap::new();
            while let Some(name) = map.next_key::<String>()? {
                if names.contains_key(&name) {
                    return Err(serde::de::Error::custom(format!("{name:?} is given twice")));
                }
                let value = map.next_value()?;
                names.insert(name, value);
            }
            Ok(names)
        }
    }
    deserializer.deserialize_map(Unique(std::marker::PhantomData))
}

/// The file's shape, before the plugin blocks go to the lifecycle layer.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    workers: Option<usize>,
    listeners: Vec<ListenerFile>,
    #[serde(default, deserialize_with = "unique_names")]
    clusters: BTreeMap<String, Cluster>,
    #[serde(default)]
    services: Option<serde_yaml::Value>,
    #[serde(default)]
    admin: Option<AdminFile>,
    #[serde(default = "drain_timeout", with = "duration")]
    drain_timeout: Duration,
    #[serde(default)]
    shared_limits: SharedLimitsFile,
}

/// `shared_limits`: each field left out keeps [`abi::SharedLimits`]'s default.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SharedLimitsFile {
    data_bytes_per_vm_id: Option<usize>,
    queue_bytes_per_vm_id: Option<usize>,
    queues_per_vm_id: Option<usize>,
    metric_names_per_vm_id: Option<usize>,
}

impl SharedLimitsFile {
    fn limits(&self) -> abi::SharedLimits {
        let default = abi::SharedLimits::default();
        abi::SharedLimits {
            data_bytes_per_vm_id: self
                .data_bytes_per_vm_id
                .unwrap_or(default.data_bytes_per_vm_id),
            queue_bytes_per_vm_id: self
                .queue_bytes_per_vm_id
                .unwrap_or(default.queue_bytes_per_vm_id),
            queues_per_vm_id: self.queues_per_vm_id.unwrap_or(default.queues_per_vm_id),
            metric_names_per_vm_id: self
                .metric_names_per_vm_id
                .unwrap_or(default.metric_names_per_vm_id),
        }
    }
}

fn drain_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    address: SocketAddr,
    #[serde(default)]
    request_headers_timeout: Option<String>,
}

impl AdminFile {
    /// The admin listener, checked.
    fn admin(&self) -> Result<AdminListener, String> {
        let request_headers_timeout = match &self.request_headers_timeout {
            Some(text) => timeout(text, "admin", "request_headers_timeout")?,
            None => Limits::default().request_headers_timeout,
        };
        Ok(AdminListener {
            address: self.address,
            request_headers_timeout,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerFile {
    #[serde(default)]
    name: Option<String>,
    address: SocketAddr,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    http_filters: Option<serde_yaml::Value>,
    #[serde(default)]
    network_filters: Option<serde_yaml::Value>,
    #[serde(default)]
    per_connection_buffer_limit_bytes: Option<usize>,
    #[serde(default)]
    max_request_headers_kb: Option<u32>,
    #[serde(default)]
    max_headers_count: Option<u32>,
    #[serde(default)]
    idle_timeout: Option<String>,
    #[serde(default)]
    request_headers_timeout: Option<String>,
    #[serde(default)]
    stream_idle_timeout: Option<String>,
}

impl ListenerFile {
    /// Its idle timeout, checked (TCP only; `0s` is none).
    fn idle_timeout(&self, at: &str) -> Result<Option<Duration>, String> {
        let Some(text) = &self.idle_timeout else {
            return Ok((self.protocol == Protocol::Tcp).then_some(Duration::from_secs(3600)));
        };
        if self.protocol != Protocol::Tcp {
            return Err(format!("{at}.idle_timeout: only a TCP listener has one"));
        }
        timeout(text, at, "idle_timeout")
    }

    /// Its limits, checked (`at`: its path, for errors).
    fn limits(&self, at: &str) -> Result<Limits, String> {
        let mut limits = Limits::default();
        if self.protocol == Protocol::Tcp {
            for (field, set) in [
                (
                    "max_request_headers_kb",
                    self.max_request_headers_kb.is_some(),
                ),
                ("max_headers_count", self.max_headers_count.is_some()),
                (
                    "request_headers_timeout",
                    self.request_headers_timeout.is_some(),
                ),
                ("stream_idle_timeout", self.stream_idle_timeout.is_some()),
            ] {
                if set {
                    return Err(format!("{at}.{field}: only an HTTP listener has one"));
                }
            }
        }
        if let Some(bytes) = self.per_connection_buffer_limit_bytes {
            if bytes == 0 {
                return Err(format!(
                    "{at}.per_connection_buffer_limit_bytes: must be at least 1"
                ));
            }
            limits.buffer_limit_bytes = bytes;
        }
        if let Some(kb) = self.max_request_headers_kb {
            // Envoy allows up to 8192; Pingora's HTTP/1 parser refuses more than 1 MiB itself.
            if !(1..=MAX_HEADERS_KB).contains(&kb) {
                return Err(format!(
                    "{at}.max_request_headers_kb: {kb} is not in 1..={MAX_HEADERS_KB} \
                     (Pingora's parser refuses larger headers)"
                ));
            }
            limits.max_request_headers_kb = kb;
        }
        if let Some(count) = self.max_headers_count {
            if !(1..=MAX_HEADERS_COUNT).contains(&count) {
                return Err(format!(
                    "{at}.max_headers_count: {count} is not in 1..={MAX_HEADERS_COUNT} \
                     (Pingora's parser refuses more headers)"
                ));
            }
            limits.max_headers_count = count;
        }
        if let Some(text) = &self.request_headers_timeout {
            limits.request_headers_timeout = timeout(text, at, "request_headers_timeout")?;
        }
        if let Some(text) = &self.stream_idle_timeout {
            limits.stream_idle_timeout = timeout(text, at, "stream_idle_timeout")?;
        }
        Ok(limits)
    }
}

/// A listener's timeout `field`, written `text` (`0s`: none).
fn timeout(text: &str, at: &str, field: &str) -> Result<Option<Duration>, String> {
    let timeout = duration::parse(text).ok_or_else(|| {
        format!(
            "{at}.{field}: {text:?} is not a duration of 1 ns to 10,000 years (e.g. \"10s\", \
             \"0.5s\", \"250ms\"; \"0s\": none)"
        )
    })?;
    Ok((!timeout.is_zero()).then_some(timeout))
}

impl ServeConfig {
    /// Reads `file`. Relative code paths are relative to the file's directory.
    pub fn read(file: &Path) -> Result<ServeConfig, ConfigError> {
        let error = |message: String| ConfigError {
            file: file.to_path_buf(),
            message,
        };
        let text = lifecycle::files::read_regular_text_file(file)
            .map_err(|e| error(format!("cannot read: {e}")))?;
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
        lifecycle::config::check_yaml_expansion(text)?;
        let file: File = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let mut listeners = Vec::new();
        for (index, listener) in file.listeners.into_iter().enumerate() {
            let at = format!("listeners[{index}]");
            let mut plugins = match listener.protocol {
                Protocol::Http => http_listener(&listener, &file.clusters, &at)?,
                Protocol::Tcp => tcp_listener(&listener, &file.clusters, &at)?,
            };
            plugins.resolve_files(base);
            let limits = listener.limits(&at)?;
            let idle_timeout = listener.idle_timeout(&at)?;
            listeners.push(Listener {
                name: listener.name.unwrap_or_else(|| format!("listener_{index}")),
                address: listener.address,
                protocol: listener.protocol,
                routes: listener.routes,
                cluster: listener.cluster,
                plugins,
                limits,
                idle_timeout,
            });
        }
        if listeners.is_empty() {
            return Err("listeners: at least one listener is needed".into());
        }
        // Names label each listener's metrics (and the admin listener's are `admin`).
        let mut names = std::collections::HashSet::new();
        for (index, listener) in listeners.iter().enumerate() {
            if listener.name == "admin" {
                return Err(format!(
                    "listeners[{index}].name: \"admin\" names the admin listener's metrics"
                ));
            }
            if !names.insert(listener.name.as_str()) {
                return Err(format!(
                    "listeners[{index}].name: {:?} is an earlier listener's name",
                    listener.name
                ));
            }
        }
        // One socket per address: a second listener there could never be bound (nor, by a
        // reload, take the first one's socket).
        let mut addresses = std::collections::HashSet::new();
        for (index, listener) in listeners.iter().enumerate() {
            if !addresses.insert(listener.address) {
                return Err(format!(
                    "listeners[{index}].address: {} is an earlier listener's address",
                    listener.address
                ));
            }
        }
        for (name, cluster) in &file.clusters {
            if cluster.endpoints.is_empty() {
                return Err(format!("clusters.{name}.endpoints: at least one is needed"));
            }
            // Zero would time out every connection or answer at once (Envoy, too, requires a
            // connect timeout above zero).
            for (field, timeout) in [
                ("connect_timeout", cluster.connect_timeout),
                ("request_timeout", cluster.request_timeout),
            ] {
                if timeout.is_zero() {
                    return Err(format!("clusters.{name}.{field}: must be more than 0s"));
                }
            }
        }
        let mut services = match &file.services {
            Some(value) => plugin_blocks(value, "services")?,
            None => Deployment::default(),
        };
        if !services.http_filters.is_empty() || !services.network_filters.is_empty() {
            // A bare `config:` block is read as a filter unless it says `singleton:`, as in
            // the other lists the plugin-config reader shares.
            return Err(
                "services: only services belong here: envoy.bootstrap.wasm (WasmService) \
                 blocks, or bare `config:` blocks with `singleton:` (true: one copy on a thread \
                 of its own; false: a copy per worker); a bare block without it is an HTTP filter"
                    .into(),
            );
        }
        services.resolve_files(base);
        let workers = match file.workers {
            Some(0) => return Err("workers: must be at least 1".into()),
            // Each worker is a thread in each of Pingora's services, made at start.
            Some(workers) if workers > MAX_WORKERS => {
                return Err(format!("workers: at most {MAX_WORKERS}, not {workers}"))
            }
            Some(workers) => workers,
            None => std::thread::available_parallelism().map_or(1, usize::from),
        };
        let admin = file.admin.as_ref().map(AdminFile::admin).transpose()?;
        if let Some(admin) = &admin {
            if addresses.contains(&admin.address) {
                return Err(format!(
                    "admin.address: {} is a listener's address",
                    admin.address
                ));
            }
        }
        Ok(ServeConfig {
            workers,
            workers_written: file.workers,
            listeners,
            clusters: file.clusters,
            services,
            admin,
            drain_timeout: file.drain_timeout,
            shared_limits: file.shared_limits.limits(),
            text: text.to_string(),
            path: None,
        })
    }
}

/// Checks an HTTP listener; returns its HTTP filter chain.
fn http_listener(
    listener: &ListenerFile,
    clusters: &BTreeMap<String, Cluster>,
    at: &str,
) -> Result<Deployment, String> {
    if listener.cluster.is_some() {
        return Err(format!(
            "{at}.cluster: only a TCP listener (protocol: tcp) has one; HTTP listeners route with routes:"
        ));
    }
    if listener.network_filters.is_some() {
        return Err(format!(
            "{at}.network_filters: only a TCP listener (protocol: tcp) has network filters"
        ));
    }
    let plugins = match &listener.http_filters {
        Some(value) => plugin_blocks(value, &format!("{at}.http_filters"))?,
        None => Deployment::default(),
    };
    if !plugins.services.is_empty() || !plugins.network_filters.is_empty() {
        return Err(format!(
            "{at}.http_filters: only HTTP filters belong here (services go under services:)"
        ));
    }
    for (route_index, route) in listener.routes.iter().enumerate() {
        let at = format!("{at}.routes[{route_index}]");
        if !clusters.contains_key(&route.cluster) {
            return Err(format!(
                "{at}.cluster: no cluster named {:?}",
                route.cluster
            ));
        }
        // A request's path begins with `/` and its host is matched without a port: a route
        // written otherwise would never match.
        // `""` takes every path, as `/` does; `*` is the path of `OPTIONS *`.
        if !route.prefix.is_empty() && !route.prefix.starts_with(['/', '*']) {
            return Err(format!(
                "{at}.prefix: {:?} does not begin with /, as every request's path does",
                route.prefix
            ));
        }
        // Routes are tried in order: one that an earlier route takes every request of is a
        // mistake (usually a catch-all written first).
        let shadowing = listener.routes[..route_index].iter().position(|earlier| {
            route.prefix.starts_with(&earlier.prefix)
                && match (&earlier.host, &route.host) {
                    (None, _) => true,
                    (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                    (Some(_), None) => false,
                }
        });
        if let Some(earlier) = shadowing {
            return Err(format!(
                "{at}: never matches: routes[{earlier}] before it takes every request it would \
                 (routes are tried in order; put the more specific first)"
            ));
        }
        if let Some(host) = &route.host {
            let bare = host
                .parse::<http::uri::Authority>()
                .is_ok_and(|authority| authority.port().is_none() && authority.host() == host);
            if !bare {
                let ipv6 = match host.contains(':') && !host.starts_with('[') {
                    true => "; an IPv6 address is written in brackets, [::1]",
                    false => "",
                };
                return Err(format!(
                    "{at}.host: {host:?} is not a host name or address without a port (a \
                     request's host is matched without its port{ipv6})"
                ));
            }
        }
    }
    if listener.routes.is_empty() {
        return Err(format!("{at}.routes: at least one route is needed"));
    }
    Ok(plugins)
}

/// Checks a TCP listener; returns its network filter chain. A plugin block there is a network
/// filter whether written bare or in Envoy's `envoy.filters.network.wasm` wrapper.
fn tcp_listener(
    listener: &ListenerFile,
    clusters: &BTreeMap<String, Cluster>,
    at: &str,
) -> Result<Deployment, String> {
    if !listener.routes.is_empty() {
        return Err(format!(
            "{at}.routes: a TCP listener has no routes; its connections go to its cluster:"
        ));
    }
    if listener.http_filters.is_some() {
        return Err(format!(
            "{at}.http_filters: a TCP listener runs network filters (network_filters:)"
        ));
    }
    match &listener.cluster {
        None => return Err(format!("{at}.cluster: required for a TCP listener")),
        Some(cluster) if !clusters.contains_key(cluster) => {
            return Err(format!("{at}.cluster: no cluster named {cluster:?}"))
        }
        Some(_) => {}
    }
    let mut chain = Deployment::default();
    let field = format!("{at}.network_filters");
    let entries = match &listener.network_filters {
        None => Vec::new(),
        Some(serde_yaml::Value::Sequence(entries)) => entries.clone(),
        Some(entry) => vec![entry.clone()],
    };
    // One entry at a time, so that bare blocks and wrapped ones keep their order.
    for (entry_index, entry) in entries.iter().enumerate() {
        let at = format!("{field}[{entry_index}]");
        let named = |name: &str| entry.get("name").and_then(|n| n.as_str()) == Some(name);
        if named("envoy.filters.http.wasm") {
            return Err(format!(
                "{at}: an HTTP filter (envoy.filters.http.wasm) on a TCP listener"
            ));
        }
        let mut parsed = plugin_blocks(entry, &at)?;
        if !parsed.services.is_empty() {
            return Err(format!("{at}: services go under services:"));
        }
        chain.network_filters.append(&mut parsed.network_filters);
        chain.network_filters.append(&mut parsed.http_filters);
    }
    Ok(chain)
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
        assert_eq!(config.drain_timeout, Duration::from_secs(10));
        // Envoy's defaults, and nginx's header deadline (Envoy has none).
        assert_eq!(
            listener.limits,
            Limits {
                buffer_limit_bytes: 1 << 20,
                max_request_headers_kb: 60,
                max_headers_count: 100,
                request_headers_timeout: Some(Duration::from_secs(60)),
                stream_idle_timeout: Some(Duration::from_secs(300)),
            }
        );
    }

    /// What could never work as written is refused, naming the field: a cluster named twice
    /// (the last would win), a timeout below a nanosecond (zero would read "none"), a route
    /// that no request can match.
    #[test]
    fn a_configuration_that_cannot_work_as_written_is_refused() {
        let cases = [
            (
                MINIMAL.replace(
                    "clusters:\n",
                    "clusters:\n  backend: {endpoints: [127.0.0.1:9001]}\n",
                ),
                "clusters: \"backend\" is given twice",
            ),
            (
                MINIMAL.replace(
                    "routes: [{cluster: backend}]",
                    "routes: [{cluster: backend}]\n    stream_idle_timeout: 1e-10s",
                ),
                "listeners[0].stream_idle_timeout: \"1e-10s\" is not a duration",
            ),
            (
                MINIMAL.replace(
                    "routes: [{cluster: backend}]",
                    "routes: [{prefix: api, cluster: backend}]",
                ),
                "listeners[0].routes[0].prefix: \"api\" does not begin with /",
            ),
            (
                MINIMAL.replace(
                    "routes: [{cluster: backend}]",
                    "routes: [{host: \"example.com:8080\", cluster: backend}]",
                ),
                "listeners[0].routes[0].host: \"example.com:8080\"",
            ),
            (
                MINIMAL.replace(
                    "routes: [{cluster: backend}]",
                    "routes: [{cluster: backend}, {prefix: /api, cluster: backend}]",
                ),
                "listeners[0].routes[1]: never matches: routes[0] before it takes every request",
            ),
            (
                MINIMAL.replace(
                    "routes: [{cluster: backend}]",
                    "routes: [{prefix: /api, host: A.example, cluster: backend}, \
                     {prefix: /api/v2, host: a.example, cluster: backend}, {cluster: backend}]",
                ),
                "listeners[0].routes[1]: never matches: routes[0]",
            ),
            (
                format!(
                    "{MINIMAL}services:\n  - config:\n      vm_config: {{code: {{local: \
                     {{filename: s.wasm}}}}}}\n"
                ),
                "a bare block without it is an HTTP filter",
            ),
        ];
        for (text, needle) in cases {
            let error = ServeConfig::parse(&text, Path::new("/")).unwrap_err();
            assert!(error.contains(needle), "{error}\nfor\n{text}");
        }
    }

    #[test]
    fn the_admin_listener_has_a_headers_deadline_of_its_own() {
        let parse = |admin: &str| ServeConfig::parse(&format!("{admin}{MINIMAL}"), Path::new("/"));
        let admin = |config: ServeConfig| config.admin.expect("an admin listener");
        let default = admin(parse("admin: {address: 127.0.0.1:9901}\n").unwrap());
        assert_eq!(default.address, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(
            default.request_headers_timeout,
            Some(Duration::from_secs(60))
        );
        let set = "admin: {address: 127.0.0.1:9901, request_headers_timeout: 2s}\n";
        assert_eq!(
            admin(parse(set).unwrap()).request_headers_timeout,
            Some(Duration::from_secs(2))
        );
        let none = "admin: {address: 127.0.0.1:9901, request_headers_timeout: 0s}\n";
        assert_eq!(admin(parse(none).unwrap()).request_headers_timeout, None);
        let bad = "admin: {address: 127.0.0.1:9901, request_headers_timeout: soon}\n";
        let error = parse(bad).unwrap_err();
        assert!(
            error.starts_with("admin.request_headers_timeout: \"soon\" is not a duration"),
            "{error}"
        );
    }

    #[test]
    fn shared_limits_default_to_the_abis_and_are_set_field_by_field() {
        let config = ServeConfig::parse(MINIMAL, Path::new("/")).unwrap();
        assert_eq!(config.shared_limits, abi::SharedLimits::default());
        let text = format!(
            "{MINIMAL}shared_limits: {{data_bytes_per_vm_id: 1073741824, \
             metric_names_per_vm_id: 100000}}\n"
        );
        let config = ServeConfig::parse(&text, Path::new("/")).unwrap();
        assert_eq!(
            config.shared_limits,
            abi::SharedLimits {
                data_bytes_per_vm_id: 1 << 30,
                metric_names_per_vm_id: 100_000,
                ..abi::SharedLimits::default()
            }
        );
        let typo = format!("{MINIMAL}shared_limits: {{queue_bytes: 1}}\n");
        let error = ServeConfig::parse(&typo, Path::new("/")).unwrap_err();
        assert!(error.contains("queue_bytes"), "{error}");
    }

    #[test]
    fn limits_and_the_drain_timeout_are_set_with_envoys_names_and_ranges() {
        let text = MINIMAL.replace(
            "    routes:",
            "    per_connection_buffer_limit_bytes: 4096\n    max_request_headers_kb: 8\n    \
             max_headers_count: 20\n    request_headers_timeout: 2s\n    \
             stream_idle_timeout: 30s\n    routes:",
        ) + "drain_timeout: 2.5s\n";
        let config = ServeConfig::parse(&text, Path::new("/")).unwrap();
        assert_eq!(
            config.listeners[0].limits,
            Limits {
                buffer_limit_bytes: 4096,
                max_request_headers_kb: 8,
                max_headers_count: 20,
                request_headers_timeout: Some(Duration::from_secs(2)),
                stream_idle_timeout: Some(Duration::from_secs(30)),
            }
        );
        let without = MINIMAL.replace(
            "    routes:",
            "    request_headers_timeout: 0s\n    stream_idle_timeout: 0s\n    routes:",
        );
        let none = ServeConfig::parse(&without, Path::new("/")).unwrap();
        assert_eq!(none.listeners[0].limits.request_headers_timeout, None);
        assert_eq!(none.listeners[0].limits.stream_idle_timeout, None);
        assert_eq!(config.drain_timeout, Duration::from_millis(2500));
        let cases = [
            (
                MINIMAL.replace(
                    "    routes:",
                    "    max_request_headers_kb: 9000\n    routes:",
                ),
                "listeners[0].max_request_headers_kb: 9000 is not in 1..=1023",
            ),
            (
                MINIMAL.replace("    routes:", "    max_headers_count: 0\n    routes:"),
                "listeners[0].max_headers_count: 0 is not in 1..=256",
            ),
            (
                TCP.replace(
                    "    cluster: backend\n",
                    "    cluster: backend\n    max_headers_count: 5\n",
                ),
                "listeners[0].max_headers_count: only an HTTP listener",
            ),
            (
                MINIMAL.replace(
                    "    routes:",
                    "    request_headers_timeout: soon\n    routes:",
                ),
                "listeners[0].request_headers_timeout: \"soon\" is not a duration",
            ),
            // A duration past 10,000 years would overflow the clock when a timer is set.
            (
                MINIMAL.replace("    routes:", "    stream_idle_timeout: 1e19s\n    routes:"),
                "listeners[0].stream_idle_timeout: \"1e19s\" is not a duration",
            ),
            (
                TCP.replace(
                    "    cluster: backend\n",
                    "    cluster: backend\n    request_headers_timeout: 5s\n",
                ),
                "listeners[0].request_headers_timeout: only an HTTP listener",
            ),
            (
                TCP.replace(
                    "    cluster: backend\n",
                    "    cluster: backend\n    stream_idle_timeout: 5s\n",
                ),
                "listeners[0].stream_idle_timeout: only an HTTP listener",
            ),
        ];
        for (text, expected) in cases {
            let error = ServeConfig::parse(&text, Path::new("/")).unwrap_err();
            assert!(error.starts_with(expected), "{error:?} for {expected:?}");
        }
    }

    const TCP: &str = "
listeners:
  - name: tcp
    address: 127.0.0.1:8081
    protocol: tcp
    cluster: backend
    network_filters:
      - name: bare
        vm_config: {code: {local: {filename: tcp_filter.wasm}}}
      - name: envoy.filters.network.wasm
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm
          config:
            name: wrapped
            vm_config: {code: {local: {filename: tcp_filter.wasm}}}
clusters:
  backend: {endpoints: [127.0.0.1:9000]}
";

    #[test]
    fn a_tcp_listener_has_a_cluster_and_network_filters_bare_or_wrapped_in_order() {
        let config = ServeConfig::parse(TCP, Path::new("/etc/pwhost")).unwrap();
        let listener = &config.listeners[0];
        assert_eq!(listener.protocol, Protocol::Tcp);
        assert_eq!(listener.cluster.as_deref(), Some("backend"));
        assert!(listener.routes.is_empty());
        assert!(listener.plugins.http_filters.is_empty());
        let names: Vec<&str> = listener
            .plugins
            .network_filters
            .iter()
            .map(|plugin| plugin.name.as_str())
            .collect();
        assert_eq!(names, ["bare", "wrapped"]);
        assert_eq!(listener.filters_field(), "network_filters");
    }

    #[test]
    fn tcp_and_http_listeners_refuse_what_belongs_to_the_other() {
        let cases = [
            (
                TCP.replace("    cluster: backend\n", ""),
                "listeners[0].cluster: required for a TCP listener",
            ),
            (
                TCP.replace("cluster: backend", "cluster: elsewhere"),
                "listeners[0].cluster: no cluster named \"elsewhere\"",
            ),
            (
                TCP.replace(
                    "    cluster: backend\n",
                    "    cluster: backend\n    routes: [{cluster: backend}]\n",
                ),
                "listeners[0].routes: a TCP listener has no routes",
            ),
            (
                TCP.replace("envoy.filters.network.wasm", "envoy.filters.http.wasm"),
                "listeners[0].network_filters[1]: an HTTP filter",
            ),
            (
                TCP.replace("network_filters:", "http_filters:"),
                "listeners[0].http_filters: a TCP listener runs network filters",
            ),
            (
                MINIMAL.replace("    routes:", "    cluster: backend\n    routes:"),
                "listeners[0].cluster: only a TCP listener",
            ),
            (
                TCP.replace("protocol: tcp", "protocol: udp"),
                "listeners[0].protocol: unknown variant `udp`",
            ),
        ];
        for (text, expected) in cases {
            let error = ServeConfig::parse(&text, Path::new("/")).unwrap_err();
            assert!(error.starts_with(expected), "{error:?} for {expected:?}");
        }
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
            (
                MINIMAL.replace("  - address:", "  - name: admin\n    address:"),
                "listeners[0].name: \"admin\" names the admin listener's metrics",
            ),
            (
                MINIMAL.replace(
                    "clusters:",
                    "  - name: listener_0\n    address: 127.0.0.1:8081\n    \
                     routes: [{cluster: backend}]\nclusters:",
                ),
                "listeners[1].name: \"listener_0\" is an earlier listener's name",
            ),
            (
                MINIMAL.replace(
                    "clusters:",
                    "  - address: 127.0.0.1:8080\n    routes: [{cluster: backend}]\nclusters:",
                ),
                "listeners[1].address: 127.0.0.1:8080 is an earlier listener's address",
            ),
            (
                format!("admin: {{address: 127.0.0.1:8080}}\n{MINIMAL}"),
                "admin.address: 127.0.0.1:8080 is a listener's address",
            ),
            (
                MINIMAL.replace("0.5s", "0s"),
                "clusters.backend.connect_timeout: must be more than 0s",
            ),
            (
                MINIMAL.replace("0.5s", "0.5s, request_timeout: 0ms"),
                "clusters.backend.request_timeout: must be more than 0s",
            ),
            (
                format!("workers: 18446744073709551615\n{MINIMAL}"),
                "workers: at most 1024, not 18446744073709551615",
            ),
        ];
        for (text, expected) in cases {
            let error = ServeConfig::parse(&text, Path::new("/")).unwrap_err();
            assert!(error.starts_with(expected), "{error:?} for {expected:?}");
        }
    }
}
