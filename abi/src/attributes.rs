//! Envoy's attributes: the facts of a request, response and connection that plugins read through
//! `proxy_get_property` (`request.path`, `source.address`, `xds.node.id`, ...), answered as
//! Envoy answers them, with its types and encodings (see [`crate::Value`]).
//!
//! The request and response attributes come from the stream's own header maps, and, like the
//! maps, only while the plugin holds them (Envoy: `request.path` is not found in the response
//! phase, and is again in `proxy_on_log`). The rest comes from what the embedder reports of the
//! stream ([`StreamInfo`], through [`crate::Host::stream_info`]) and of itself ([`Node`]).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use crate::callbacks::Callback;
use crate::filter_state::{FilterStateObject, FilterStateSource, PropertyType};
use crate::stream::Access;
use crate::value::Value;
use crate::{Headers, MapType, PropertyPath, Status, VmState};

/// What the proxy knows of a stream or connection beyond its header maps (Envoy's
/// `StreamInfo`), for the attributes. A field left `None` is an attribute not found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamInfo {
    /// The downstream peer's address (`source.address` as `ip:port`, `source.port`). Kept as
    /// an address, not text: it is formatted only when a plugin reads it.
    pub source_address: Option<SocketAddr>,
    /// The downstream connection's local address (`destination.address`, `destination.port`).
    pub destination_address: Option<SocketAddr>,
    /// The downstream connection's id (`connection.id`, `connection_id`).
    pub connection_id: Option<u64>,
    /// Whether the downstream connection is TLS with a client certificate (`connection.mtls`).
    pub mtls: Option<bool>,
    /// The TLS server name the client asked for (`connection.requested_server_name`).
    pub requested_server_name: Option<String>,
    /// The TLS version, e.g. `TLSv1.3` (`connection.tls_version`).
    pub tls_version: Option<String>,
    /// The upstream host's address (`upstream.address` as `ip:port`, `upstream.port`).
    pub upstream_address: Option<SocketAddr>,
    /// When the first byte of the request arrived (`request.time`).
    pub start_time: Option<SystemTime>,
    /// How long the request took, once complete (`request.duration`).
    pub duration: Option<Duration>,
    /// The HTTP protocol, e.g. `HTTP/1.1`, `HTTP/2` (`request.protocol`).
    pub protocol: Option<String>,
    /// Body bytes received from downstream (`request.size` without `content-length`,
    /// `request.total_size`).
    pub bytes_received: Option<u64>,
    /// Body bytes sent downstream (`response.size`, `response.total_size`).
    pub bytes_sent: Option<u64>,
    /// The response's status code (`response.code`; else the held `:status`).
    pub response_code: Option<u32>,
    /// Why the response is what it is, e.g. `via_upstream` (`response.code_details`).
    pub response_code_details: Option<String>,
    /// Envoy's response flags bitmask (`response.flags`; 0 when `None`).
    pub response_flags: Option<u64>,
    /// The route's name (`xds.route_name`, formerly `route_name`).
    pub route_name: Option<String>,
    /// The upstream cluster's name (`xds.cluster_name`, formerly `cluster_name`).
    pub cluster_name: Option<String>,
}

/// The proxy's identity (Envoy's `Node`), for `xds.node` (formerly `node`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node {
    /// `xds.node.id`.
    pub id: String,
    /// `xds.node.cluster`.
    pub cluster: String,
    /// `xds.node.metadata`: a `google.protobuf.Struct`, as a map of its values (strings,
    /// doubles, booleans, lists, maps, nulls).
    pub metadata: Vec<(String, Value<'static>)>,
}

impl Node {
    /// The node as a map, for selecting into it.
    fn as_map(&self) -> Value<'static> {
        Value::Map(vec![
            (Cow::Borrowed(b"id"), Value::string(self.id.clone())),
            (
                Cow::Borrowed(b"cluster"),
                Value::string(self.cluster.clone()),
            ),
            (Cow::Borrowed(b"metadata"), self.metadata_value()),
        ])
    }

    fn metadata_value(&self) -> Value<'static> {
        Value::Map(
            self.metadata
                .iter()
                .map(|(k, v)| (Cow::Owned(k.clone().into_bytes()), v.clone()))
                .collect(),
        )
    }

    /// The node as a serialized `envoy.config.core.v3.Node` (its id, cluster and metadata).
    fn to_protobuf(&self) -> Vec<u8> {
        use prost::Message;
        let node = proto::Node {
            id: self.id.clone(),
            cluster: self.cluster.clone(),
            metadata: Some(proto::to_struct(&self.metadata)),
        };
        node.encode_to_vec()
    }
}

/// The protobuf shapes of what Envoy hands over as messages.
mod proto {
    use crate::value::Value;

    /// `envoy.config.core.v3.Node`, the fields pwhost knows.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Node {
        #[prost(string, tag = "1")]
        pub(super) id: String,
        #[prost(string, tag = "2")]
        pub(super) cluster: String,
        #[prost(message, optional, tag = "3")]
        pub(super) metadata: Option<prost_types::Struct>,
    }

    pub(super) fn to_struct(fields: &[(String, Value<'static>)]) -> prost_types::Struct {
        prost_types::Struct {
            fields: fields
                .iter()
                .map(|(k, v)| (k.clone(), to_value(v)))
                .collect(),
        }
    }

    fn to_value(value: &Value<'static>) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match value {
            Value::Null => Kind::NullValue(0),
            Value::Bool(b) => Kind::BoolValue(*b),
            Value::Double(d) => Kind::NumberValue(*d),
            Value::Int(i) => Kind::NumberValue(*i as f64),
            Value::Uint(u) => Kind::NumberValue(*u as f64),
            Value::List(items) => Kind::ListValue(prost_types::ListValue {
                values: items.iter().map(to_value).collect(),
            }),
            Value::Map(entries) => Kind::StructValue(prost_types::Struct {
                fields: entries
                    .iter()
                    .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), to_value(v)))
                    .collect(),
            }),
            Value::String(s) | Value::Bytes(s) | Value::Message(s) => {
                Kind::StringValue(String::from_utf8_lossy(s).into_owned())
            }
            Value::Timestamp(_) | Value::Duration(_) => Kind::NullValue(0),
        };
        prost_types::Value { kind: Some(kind) }
    }
}

/// The value of the property at `path` for the effective context, or the status Envoy answers:
/// `NOT_FOUND` for nothing there, `SERIALIZATION_FAILURE` for a whole group such as `request`.
pub(crate) fn property(
    state: &mut VmState,
    path: PropertyPath<'_>,
) -> Result<Value<'static>, Status> {
    let mut segments = path.segments();
    let first = segments.next().ok_or(Status::NotFound)?;
    let mut rest: Vec<Cow<'_, [u8]>> = segments.map(Cow::Borrowed).collect();
    // Header names are looked up as Envoy does, whatever their case.
    if matches!(first, b"request" | b"response")
        && rest
            .first()
            .is_some_and(|s| matches!(s.as_ref(), b"headers" | b"trailers"))
    {
        if let Some(name) = rest.get_mut(1) {
            *name = Cow::Owned(name.to_ascii_lowercase());
        }
    }
    let rest: Vec<&[u8]> = rest.iter().map(|s| s.as_ref()).collect();
    let (value, selected) = root_value(state, first, &rest)?;
    rest[selected..].iter().try_fold(value, |value, segment| {
        value.select(segment).ok_or(Status::NotFound)
    })
}

/// The value named by `first` (and, for groups, the first of `rest`), and how many of `rest` it
/// used.
fn root_value(
    state: &mut VmState,
    first: &[u8],
    rest: &[&[u8]],
) -> Result<(Value<'static>, usize), Status> {
    let root = state.effective_root_config();
    let identity = match first {
        b"plugin_name" => root.map(|root| root.name.clone()),
        b"plugin_root_id" => root.map(|root| root.root_id.clone()),
        b"plugin_vm_id" => Some(state.config.vm_id.clone()),
        _ => None,
    };
    if let Some(identity) = identity {
        return Ok((Value::string(identity), 0));
    }
    let group = matches!(
        first,
        b"request" | b"response" | b"connection" | b"upstream" | b"source" | b"destination"
    );
    if (group || first == b"filter_state") && state.effective_stream().is_none() {
        // A root context has no stream, so none of these (Envoy has no stream info there).
        return Err(Status::NotFound);
    }
    if group || first == b"xds" || first == b"filter_state" {
        let Some(second) = rest.first() else {
            // A group as a whole: Envoy cannot list its keys.
            return Err(Status::SerializationFailure);
        };
        let value = match first {
            b"xds" => xds(state, second, rest.len() > 1),
            b"filter_state" => filter_state_object(state, second, rest.len() > 1),
            _ => stream_attribute(state, first, second),
        };
        return value.map(|v| (v, 1)).ok_or(Status::NotFound);
    }
    let value = match first {
        b"connection_id" => info(state).and_then(|i| i.connection_id).map(Value::Uint),
        // The names older Envoy answered at the top level, now under `xds`.
        b"node" => node(state, !rest.is_empty()),
        b"cluster_name" | b"route_name" => xds(state, first, false),
        name => stream_property(state, name, !rest.is_empty()),
    };
    value.map(|v| (v, 0)).ok_or(Status::NotFound)
}

fn info(state: &mut VmState) -> Option<&StreamInfo> {
    let context = state.effective_context;
    state.effective_stream()?;
    state.host.stream_info(context)
}

/// A header map of the effective stream if the plugin may read it now (as for the maps).
fn held_map(state: &mut VmState, map: MapType) -> Option<&dyn Headers> {
    let in_log = state.callback == Some(Callback::Log);
    let context = state.effective_context;
    if !state
        .effective_stream()?
        .map_available(map, Access::Read, in_log)
    {
        return None;
    }
    state.host.header_map(context, map).map(|m| &*m)
}

fn header(map: Option<&dyn Headers>, name: &[u8]) -> Option<Value<'static>> {
    map?.get(name)
        .map(|value| Value::String(Cow::Owned(value.to_vec())))
}

/// One entry per name, repeated values joined with commas, as Envoy's header attributes.
fn header_attribute_map(map: Option<&dyn Headers>) -> Value<'static> {
    let mut entries: Vec<(Cow<'static, [u8]>, Vec<u8>)> = Vec::new();
    // Each name's entry found by hashing, not by a scan of the entries: a plugin may add many
    // names, and a scan per field would make this quadratic in them.
    let mut index: rustc_hash::FxHashMap<Vec<u8>, usize> = rustc_hash::FxHashMap::default();
    if let Some(map) = map {
        map.for_each(&mut |name, value| match index.get(name) {
            Some(&at) => {
                let joined = &mut entries[at].1;
                joined.push(b',');
                joined.extend_from_slice(value);
            }
            None => {
                index.insert(name.to_vec(), entries.len());
                entries.push((Cow::Owned(name.to_vec()), value.to_vec()));
            }
        });
    }
    Value::Map(
        entries
            .into_iter()
            .map(|(k, v)| (k, Value::String(Cow::Owned(v))))
            .collect(),
    )
}

/// The sum of names' and values' lengths (Envoy's `byteSize`).
fn byte_size(map: Option<&dyn Headers>) -> u64 {
    let mut size = 0;
    if let Some(map) = map {
        map.for_each(&mut |k, v| size += (k.len() + v.len()) as u64);
    }
    size
}

fn address(address: Option<SocketAddr>) -> Option<Value<'static>> {
    address.map(|a| Value::string(a.to_string()))
}

fn port(address: Option<SocketAddr>) -> Option<Value<'static>> {
    address.map(|a| Value::Int(i64::from(a.port())))
}

fn to_int(value: u64) -> Value<'static> {
    Value::Int(i64::try_from(value).unwrap_or(i64::MAX))
}

fn stream_attribute(state: &mut VmState, group: &[u8], name: &[u8]) -> Option<Value<'static>> {
    match group {
        b"request" => request_attribute(state, name),
        b"response" => response_attribute(state, name),
        _ => {
            let info = info(state)?;
            let string = |s: &Option<String>| s.clone().map(Value::string);
            match (group, name) {
                (b"connection", b"mtls") => Some(Value::Bool(info.mtls.unwrap_or(false))),
                (b"connection", b"requested_server_name") => Some(Value::string(
                    info.requested_server_name.clone().unwrap_or_default(),
                )),
                (b"connection", b"tls_version") => string(&info.tls_version),
                (b"connection", b"id") => info.connection_id.map(Value::Uint),
                (b"source", b"address") => address(info.source_address),
                (b"source", b"port") => port(info.source_address),
                (b"destination", b"address") => address(info.destination_address),
                (b"destination", b"port") => port(info.destination_address),
                (b"upstream", b"address") => address(info.upstream_address),
                (b"upstream", b"port") => port(info.upstream_address),
                _ => None,
            }
        }
    }
}

fn request_attribute(state: &mut VmState, name: &[u8]) -> Option<Value<'static>> {
    let derived = {
        let headers = held_map(state, MapType::HttpRequestHeaders);
        match name {
            b"path" => Some(header(headers, b":path")),
            b"url_path" | b"query" => Some(headers.map(|map| {
                let path = map.get(b":path").unwrap_or_default();
                let (before, after) = match path.iter().position(|&b| b == b'?') {
                    Some(at) => (&path[..at], &path[at + 1..]),
                    None => (path, &b""[..]),
                };
                let part = if name == b"url_path" {
                    before
                } else {
                    after.split(|&b| b == b'#').next().unwrap_or_default()
                };
                Value::String(Cow::Owned(part.to_vec()))
            })),
            b"host" => Some(header(headers, b":authority")),
            b"scheme" => Some(header(headers, b":scheme")),
            b"method" => Some(header(headers, b":method")),
            b"referer" => Some(header(headers, b"referer")),
            b"useragent" => Some(header(headers, b"user-agent")),
            b"id" => Some(header(headers, b"x-request-id")),
            b"headers" => Some(Some(header_attribute_map(headers))),
            b"headers_bytes" => Some(Some(to_int(byte_size(headers)))),
            _ => None,
        }
    };
    if let Some(derived) = derived {
        return derived;
    }
    let content_length = held_map(state, MapType::HttpRequestHeaders)
        .map(|headers| headers.get(b"content-length").map(<[u8]>::to_vec));
    let header_bytes = byte_size(held_map(state, MapType::HttpRequestHeaders));
    let info = info(state);
    match name {
        b"time" => info?.start_time.map(Value::Timestamp),
        b"duration" => info?.duration.map(Value::Duration),
        b"protocol" => info?.protocol.clone().map(Value::string),
        b"size" => match content_length {
            // A content-length that is not a number is no size at all, as in Envoy.
            Some(Some(length)) => std::str::from_utf8(&length)
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
                .map(to_int),
            _ => info?.bytes_received.map(to_int),
        },
        b"total_size" => Some(to_int(
            info?
                .bytes_received
                .unwrap_or(0)
                .saturating_add(header_bytes),
        )),
        _ => None,
    }
}

fn response_attribute(state: &mut VmState, name: &[u8]) -> Option<Value<'static>> {
    match name {
        b"headers" => {
            return Some(header_attribute_map(held_map(
                state,
                MapType::HttpResponseHeaders,
            )))
        }
        b"trailers" => {
            return Some(header_attribute_map(held_map(
                state,
                MapType::HttpResponseTrailers,
            )))
        }
        b"headers_bytes" => {
            return Some(to_int(byte_size(held_map(
                state,
                MapType::HttpResponseHeaders,
            ))))
        }
        b"grpc_status" => {
            let from = |state: &mut VmState, map| {
                held_map(state, map)?
                    .get(b"grpc-status")
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
            };
            return from(state, MapType::HttpResponseTrailers)
                .or_else(|| from(state, MapType::HttpResponseHeaders))
                .map(Value::Int);
        }
        _ => {}
    }
    let status = held_map(state, MapType::HttpResponseHeaders)
        .and_then(|h| h.get(b":status"))
        .and_then(|s| std::str::from_utf8(s).ok()?.parse::<i64>().ok());
    let header_bytes = byte_size(held_map(state, MapType::HttpResponseHeaders))
        + byte_size(held_map(state, MapType::HttpResponseTrailers));
    let info = info(state);
    match name {
        b"code" => info
            .and_then(|i| i.response_code)
            .map(i64::from)
            .or(status)
            .map(Value::Int),
        b"code_details" => info?.response_code_details.clone().map(Value::string),
        b"flags" => Some(to_int(info?.response_flags.unwrap_or(0))),
        b"size" => info?.bytes_sent.map(to_int),
        b"total_size" => Some(to_int(
            info?.bytes_sent.unwrap_or(0).saturating_add(header_bytes),
        )),
        _ => None,
    }
}

/// `xds.*`: the node (also in a root context) and the stream's route and cluster.
fn xds(state: &mut VmState, name: &[u8], selecting: bool) -> Option<Value<'static>> {
    match name {
        b"node" => node(state, selecting),
        b"cluster_name" => info(state)?.cluster_name.clone().map(Value::string),
        b"route_name" => info(state)?.route_name.clone().map(Value::string),
        _ => None,
    }
}

/// The node: a message as a whole, a map to select into.
fn node(state: &mut VmState, selecting: bool) -> Option<Value<'static>> {
    let node = state.host.node()?;
    Some(if selecting {
        node.as_map()
    } else {
        Value::Message(Cow::Owned(node.to_protobuf()))
    })
}

fn filter_state(state: &mut VmState) -> Option<&crate::filter_state::FilterState> {
    Some(&state.effective_stream()?.filter_state)
}

/// `filter_state.<key>`: any object of the stream's filter state by its full key.
fn filter_state_object(state: &mut VmState, key: &[u8], selecting: bool) -> Option<Value<'static>> {
    let object = filter_state(state)?.get(key)?;
    Some(object_value(object, selecting))
}

/// A property the plugin set, by its one-segment name.
fn stream_property(state: &mut VmState, name: &[u8], selecting: bool) -> Option<Value<'static>> {
    let object = filter_state(state)?.property(name)?;
    Some(object_value(object, selecting))
}

/// An object's value: strings as strings, everything else as the bytes given. The socket
/// address objects Envoy gives fields to are maps of `ip` and `port` to select into (and,
/// as in Envoy, an empty map as a whole).
fn object_value(object: &FilterStateObject, selecting: bool) -> Value<'static> {
    let value = object.value.clone();
    match &object.source {
        FilterStateSource::Property(declaration) => match declaration.property_type {
            PropertyType::String => Value::String(Cow::Owned(value)),
            _ => Value::Bytes(Cow::Owned(value)),
        },
        FilterStateSource::EnvoyObject if is_address_object(&object.key) => {
            if !selecting {
                return Value::Map(Vec::new());
            }
            let address = std::str::from_utf8(&value)
                .ok()
                .and_then(|v| v.parse::<SocketAddr>().ok());
            match address {
                Some(address) => Value::Map(vec![
                    (
                        Cow::Borrowed(b"ip"),
                        Value::string(address.ip().to_string()),
                    ),
                    (
                        Cow::Borrowed(b"port"),
                        Value::Int(i64::from(address.port())),
                    ),
                ]),
                None => Value::Map(Vec::new()),
            }
        }
        FilterStateSource::EnvoyObject => Value::Bytes(Cow::Owned(value)),
    }
}

fn is_address_object(key: &[u8]) -> bool {
    matches!(
        key,
        b"envoy.network.transport_socket.original_dst_address"
            | b"envoy.filters.listener.original_dst.local_ip"
            | b"envoy.filters.listener.original_dst.remote_ip"
    )
}

/// Every attribute group and the names in it, for CEL expressions (which see them as maps).
pub(crate) const GROUPS: &[(&str, &[&str])] = &[
    (
        "request",
        &[
            "path",
            "url_path",
            "query",
            "host",
            "scheme",
            "method",
            "referer",
            "useragent",
            "id",
            "headers",
            "headers_bytes",
            "time",
            "duration",
            "protocol",
            "size",
            "total_size",
        ],
    ),
    (
        "response",
        &[
            "code",
            "code_details",
            "flags",
            "grpc_status",
            "headers",
            "headers_bytes",
            "trailers",
            "size",
            "total_size",
        ],
    ),
    (
        "connection",
        &["mtls", "requested_server_name", "tls_version", "id"],
    ),
    ("source", &["address", "port"]),
    ("destination", &["address", "port"]),
    ("upstream", &["address", "port"]),
    ("xds", &["node", "cluster_name", "route_name"]),
];

/// The attribute group `group` as a map of the attributes found, for CEL; `filter_state` as a
/// map of the stream's objects by key.
pub(crate) fn group_value(state: &mut VmState, group: &str) -> Option<Value<'static>> {
    if group == "filter_state" {
        let objects = filter_state(state)?.objects().to_vec();
        return Some(Value::Map(
            objects
                .iter()
                .map(|o| (Cow::Owned(o.key.clone()), object_value(o, true)))
                .collect(),
        ));
    }
    let names = GROUPS.iter().find(|(name, _)| *name == group)?.1;
    let mut entries = Vec::new();
    for name in names {
        let value = match group {
            "xds" => xds(state, name.as_bytes(), true),
            _ => stream_attribute(state, group.as_bytes(), name.as_bytes()),
        };
        if let Some(value) = value {
            entries.push((Cow::Borrowed(name.as_bytes()), value));
        }
    }
    Some(Value::Map(entries))
}
