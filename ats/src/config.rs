//! The plugin's arguments: the YAML files of `plugin.config` (`pwhost_ats.so a.yaml b.yaml`),
//! each a plugin configuration as Traffic Server's Wasm plugin reads it (`config: {name,
//! rootId, vmConfig: {vmId, runtime, code: {local: {filename}}}, configuration}`), or anything
//! else the `lifecycle` layer accepts (Envoy's filter blocks, a list of them), plus an optional
//! top-level `upstreams:` map naming the servers `proxy_http_call` may reach, and an optional
//! top-level `tcp:` listener on which the file's network filters run (beside those two keys:
//! one plugin block, or a `filters:` list of them, in chain order):
//!
//! ```yaml
//! tcp:
//!   listen: 127.0.0.1:9000      # the address and port Traffic Server accepts on
//!   upstream: echo              # where every connection goes: an `upstreams:` name or ip:port
//!   idle_timeout: 3600s         # optional (Envoy's tcp_proxy default; "0s": none)
//!   connect_timeout: 5s         # optional: how long the upstream may take to accept
//!   buffer_limit_bytes: 1048576 # optional: data of one direction held before reading stops
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lifecycle::{Deployment, LoadOptions, Plugins};
use serde_yaml::Value;

/// Where `proxy_http_call` may send requests: upstream name → address.
pub type Upstreams = BTreeMap<String, SocketAddr>;

/// One deployment read from the plugin's files: the plugins, loaded, their upstreams and the
/// TCP listeners of their network filters.
pub struct Loaded {
    /// The plugins of every file, in file order (each file's HTTP filters in its order).
    pub plugins: Plugins,
    /// The upstreams of every file.
    pub upstreams: Upstreams,
    /// The TCP listeners, in file order.
    pub listeners: Vec<TcpListener>,
}

/// A TCP listener: connections Traffic Server accepts on `listen` run through network
/// filters and go to `upstream`.
#[derive(Clone, Debug, PartialEq)]
pub struct TcpListener {
    /// The file that configures it, for messages.
    pub file: PathBuf,
    /// Where Traffic Server accepts its connections.
    pub listen: SocketAddr,
    /// Where every connection goes.
    pub upstream: SocketAddr,
    /// The upstream's name in `upstreams:`, if it was given by name (Envoy's cluster name).
    pub upstream_name: Option<String>,
    /// How long a connection may stay without traffic (`None`: for ever).
    pub idle_timeout: Option<Duration>,
    /// How long the upstream may take to accept a connection.
    pub connect_timeout: Duration,
    /// Bytes of one direction's data the plugins may hold (and the proxy keep to write)
    /// before the connection stops reading that side.
    pub buffer_limit: usize,
    /// Its network filters: their positions among the deployment's network filters.
    pub filters: Range<usize>,
}

/// The `tcp:` block of a file, before its upstream is resolved.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpBlock {
    listen: String,
    upstream: String,
    #[serde(default, alias = "idleTimeout")]
    idle_timeout: Option<String>,
    #[serde(default, alias = "connectTimeout")]
    connect_timeout: Option<String>,
    #[serde(default, alias = "bufferLimitBytes")]
    buffer_limit_bytes: Option<usize>,
}

/// One file, parsed.
pub struct File {
    /// Its plugins.
    pub deployment: Deployment,
    /// Its `upstreams:` map.
    pub upstreams: Upstreams,
    /// Its `tcp:` listener (its network filters' positions not yet set).
    pub listener: Option<TcpListener>,
}

/// Reads and parses `file`: its deployment (relative code file names resolved against the
/// file's directory, as Traffic Server's plugin does), its upstreams and its TCP listener.
pub fn read(file: &Path) -> Result<File, String> {
    let shown = file.display();
    let text = lifecycle::files::read_regular_text_file(file)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    lifecycle::config::check_yaml_expansion(&text).map_err(|e| format!("{shown}: {e}"))?;
    let mut document: Value = serde_yaml::from_str(&text).map_err(|e| format!("{shown}: {e}"))?;
    let (upstreams, tcp) = match &mut document {
        Value::Mapping(map) => {
            let upstreams = match map.remove("upstreams") {
                Some(value) => upstreams(&value).map_err(|e| format!("{shown}: upstreams{e}"))?,
                None => Upstreams::new(),
            };
            (upstreams, map.remove("tcp"))
        }
        _ => (Upstreams::new(), None),
    };
    let listener = match tcp {
        Some(value) => {
            Some(tcp_listener(file, value, &upstreams).map_err(|e| format!("{shown}: tcp{e}"))?)
        }
        None => None,
    };
    // Beside `upstreams:` and `tcp:` a mapping holds one plugin block; several (a chain) go in
    // a `filters:` list.
    if let Value::Mapping(map) = &mut document {
        if let Some(filters) = map.remove("filters") {
            if let Some(other) = map.keys().next() {
                return Err(format!(
                    "{shown}: {}: with `filters:`, every plugin goes in that list",
                    other.as_str().unwrap_or("a key")
                ));
            }
            document = filters;
        }
    }
    let rest = serde_yaml::to_string(&document).map_err(|e| format!("{shown}: {e}"))?;
    let mut deployment = lifecycle::parse(&rest).map_err(|e| format!("{shown}: {e}"))?;
    deployment.resolve_files(file.parent().unwrap_or(Path::new(".")));
    Ok(File {
        deployment,
        upstreams,
        listener,
    })
}

/// The `tcp:` block. Errors start with the field path below `tcp`.
fn tcp_listener(file: &Path, value: Value, upstreams: &Upstreams) -> Result<TcpListener, String> {
    let block: TcpBlock = serde_yaml::from_value(value).map_err(|e| format!(": {e}"))?;
    let listen = block.listen.parse::<SocketAddr>().map_err(|_| {
        format!(
            ".listen: {:?} is not an IP address and port (e.g. 127.0.0.1:9000)",
            block.listen
        )
    })?;
    let (upstream, upstream_name) = match upstreams.get(&block.upstream) {
        Some(address) => (*address, Some(block.upstream.clone())),
        None => (
            block.upstream.parse::<SocketAddr>().map_err(|_| {
                format!(
                    ".upstream: {:?} is neither a name in upstreams nor an IP address and port",
                    block.upstream
                )
            })?,
            None,
        ),
    };
    let idle_timeout = match &block.idle_timeout {
        None => Some(Duration::from_secs(3600)),
        Some(text) => {
            let timeout = lifecycle::config::parse_duration(text).ok_or_else(|| {
                format!(".idle_timeout: {text:?} is not a duration (e.g. \"30s\", \"0.5s\")")
            })?;
            (!timeout.is_zero()).then_some(timeout)
        }
    };
    let connect_timeout = match &block.connect_timeout {
        None => Duration::from_secs(5),
        Some(text) => lifecycle::config::parse_duration(text)
            .filter(|timeout| !timeout.is_zero())
            .ok_or_else(|| {
                format!(".connect_timeout: {text:?} is not a duration above 0 (e.g. \"5s\")")
            })?,
    };
    let buffer_limit = match block.buffer_limit_bytes {
        Some(0) => return Err(".buffer_limit_bytes: must be above 0".into()),
        Some(limit) => limit,
        None => 1 << 20,
    };
    Ok(TcpListener {
        file: file.to_path_buf(),
        listen,
        upstream,
        upstream_name,
        idle_timeout,
        connect_timeout,
        buffer_limit,
        filters: 0..0,
    })
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

/// What a load starts from.
pub enum Start<'a> {
    /// Nothing: the plugins get a new store of shared data and queues, with these limits.
    Fresh(abi::SharedLimits),
    /// The plugins in force (a reload): the new ones keep their shared data and queues, and
    /// modules whose VM key did not change are not compiled again.
    Replacing(&'a Plugins),
}

/// Reads every file and loads their plugins on `engines`: one deployment, the files' HTTP
/// filters in order. Nothing is loaded if any file is wrong. With `cache_dir`, remote code and
/// compiled code are kept there (`code/`, `compiled/`) for the next start; without it, remote
/// code is kept in memory only and every start compiles.
pub fn load(
    files: &[PathBuf],
    engines: &dyn lifecycle::Engines,
    start: Start<'_>,
    cache_dir: Option<&std::path::Path>,
) -> Result<Loaded, String> {
    if files.is_empty() {
        return Err(
            "no configuration file given (plugin.config: pwhost_ats.so FILE.yaml ...)".into(),
        );
    }
    let mut deployment = Deployment::default();
    let mut upstreams = Upstreams::new();
    let mut listeners: Vec<TcpListener> = Vec::new();
    for file in files {
        let File {
            deployment: part,
            upstreams: part_upstreams,
            listener,
        } = read(file)?;
        match listener {
            Some(mut listener) => {
                if let Some(other) = listeners.iter().find(|l| l.listen == listener.listen) {
                    return Err(format!(
                        "{}: tcp.listen: {} is already the listener of {}",
                        file.display(),
                        listener.listen,
                        other.file.display()
                    ));
                }
                let start = deployment.network_filters.len();
                listener.filters = start..start + part.network_filters.len();
                listeners.push(listener);
            }
            None => {
                if let Some(filter) = part.network_filters.first() {
                    // Refused rather than left idle: a user who sent one expects it to run.
                    return Err(format!(
                        "{}: network filter {:?} needs a TCP listener in the same file \
                         (tcp: {{listen: IP:PORT, upstream: NAME or IP:PORT}})",
                        file.display(),
                        filter.display_name()
                    ));
                }
            }
        }
        deployment.network_filters.extend(part.network_filters);
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
    if deployment.http_filters.is_empty() && deployment.services.is_empty() && listeners.is_empty()
    {
        return Err(
            "no HTTP filter, service or TCP listener in the configuration files: nothing to run"
                .into(),
        );
    }
    let options = LoadOptions::cached_in(PathBuf::from("/"), cache_dir);
    let plugins = match start {
        Start::Replacing(previous) => {
            Plugins::load_replacing(previous, &deployment, engines, &options)
        }
        Start::Fresh(limits) => Plugins::load(
            &deployment,
            engines,
            &options,
            abi::SharedState::with_limits(limits),
        ),
    }
    .map_err(|e| e.to_string())?;
    Ok(Loaded {
        plugins,
        upstreams,
        listeners,
    })
}
