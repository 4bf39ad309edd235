//! Envoy's filter state as plugins see it: the properties a plugin sets on a stream
//! (`proxy_set_property`, stored under `wasm.<name>` with the type, writability and life span
//! the plugin may have declared with the `declare_property` foreign function), and the objects
//! Envoy's own filters read, which plugins set with the `set_envoy_filter_state` foreign
//! function (e.g. `envoy.tcp_proxy.cluster`, the cluster a TCP proxy routes to).

use std::net::SocketAddr;

use crate::Status;

/// How long a filter state object lives (Envoy's `FilterState::LifeSpan`, in the numbering of
/// the `LifeSpan` enum of Envoy's `declare_property.proto`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LifeSpan {
    /// The filter chain of one stream (the default).
    #[default]
    FilterChain,
    /// The downstream request, across internal redirects.
    DownstreamRequest,
    /// The downstream connection, across its requests.
    DownstreamConnection,
}

impl LifeSpan {
    /// The life span for the enum value a plugin sent; an unknown value is `FilterChain`, as
    /// in Envoy.
    pub fn from_proto(value: i32) -> Self {
        match value {
            1 => LifeSpan::DownstreamRequest,
            2 => LifeSpan::DownstreamConnection,
            _ => LifeSpan::FilterChain,
        }
    }

    /// The snake_case name, for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            LifeSpan::FilterChain => "filter_chain",
            LifeSpan::DownstreamRequest => "downstream_request",
            LifeSpan::DownstreamConnection => "downstream_connection",
        }
    }
}

/// The type of a property a plugin declared (the `WasmType` enum of Envoy's
/// `declare_property.proto`). Values are stored as given whatever the type, as Envoy does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PropertyType {
    /// Bytes (the default).
    #[default]
    Bytes,
    /// A string.
    String,
    /// A FlatBuffers table; the schema is its binary reflection schema.
    FlatBuffers {
        /// The `.bfbs` schema (shared, not copied, by every stream's object of the property: a
        /// schema may be large).
        schema: std::sync::Arc<[u8]>,
    },
    /// A protobuf message; the schema is its type URL.
    Protobuf {
        /// e.g. `type.googleapis.com/my.Message`.
        type_url: std::sync::Arc<[u8]>,
    },
}

impl PropertyType {
    /// The type for the enum value and schema a plugin sent; an unknown value is `Bytes`, as
    /// in Envoy.
    pub fn from_proto(value: i32, schema: Vec<u8>) -> Self {
        match value {
            1 => PropertyType::String,
            2 => PropertyType::FlatBuffers {
                schema: schema.into(),
            },
            3 => PropertyType::Protobuf {
                type_url: schema.into(),
            },
            _ => PropertyType::Bytes,
        }
    }

    /// The snake_case name, for reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            PropertyType::Bytes => "bytes",
            PropertyType::String => "string",
            PropertyType::FlatBuffers { .. } => "flatbuffers",
            PropertyType::Protobuf { .. } => "protobuf",
        }
    }
}

/// How a property the plugin declared behaves once set (`declare_property`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PropertyDeclaration {
    /// Set once, then `BAD_ARGUMENT` on every later `proxy_set_property`.
    pub readonly: bool,
    /// Its type.
    pub property_type: PropertyType,
    /// How long a value lives.
    pub span: LifeSpan,
}

/// What set a filter state object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilterStateSource {
    /// `proxy_set_property` (the key is `wasm.` and the property's path).
    Property(PropertyDeclaration),
    /// `set_envoy_filter_state` (the key is the object's name).
    EnvoyObject,
}

/// One object of a stream's (or connection's) filter state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterStateObject {
    /// The key, e.g. `wasm.my_property` or `envoy.tcp_proxy.cluster`.
    pub key: Vec<u8>,
    /// The value as the plugin gave it.
    pub value: Vec<u8>,
    /// How long it lives (an embedder keeps `DownstreamConnection` objects for the connection's
    /// later streams).
    pub span: LifeSpan,
    /// What set it.
    pub source: FilterStateSource,
}

/// The filter state of one stream or connection.
#[derive(Clone, Debug, Default)]
pub(crate) struct FilterState {
    objects: Vec<FilterStateObject>,
}

/// The most properties a stream keeps (`proxy_set_property`; Envoy has no limit): a plugin
/// setting new ones without end would grow the host, outside its VM's memory cap.
pub(crate) const MAX_FILTER_STATE_OBJECTS: usize = 4096;

/// The most bytes of keys and values a stream's properties keep in all.
pub(crate) const MAX_FILTER_STATE_BYTES: usize = 16 << 20;

/// The most properties a root context declares (`declare_property`).
pub(crate) const MAX_DECLARATIONS: usize = 4096;

/// The most bytes of names and schemas a root context's declarations keep in all.
pub(crate) const MAX_DECLARATION_BYTES: usize = 16 << 20;

/// The filter state key of property `path`: Envoy prefixes the whole raw path, NUL separators
/// included, so a property set at a path of several segments is not found by a read of those
/// segments (only a one-segment name round-trips).
fn property_key(path: &[u8]) -> Vec<u8> {
    let mut key = b"wasm.".to_vec();
    key.extend_from_slice(path);
    key
}

impl FilterState {
    pub(crate) fn objects(&self) -> &[FilterStateObject] {
        &self.objects
    }

    /// The object at `key`.
    pub(crate) fn get(&self, key: &[u8]) -> Option<&FilterStateObject> {
        self.objects.iter().find(|object| object.key == key)
    }

    /// The property a plugin set by name (one path segment).
    pub(crate) fn property(&self, name: &[u8]) -> Option<&FilterStateObject> {
        self.get(&property_key(name))
    }

    /// `proxy_set_property(path, value)`: a declared property takes its declaration, any other
    /// is writable bytes for the filter chain. A read-only property already set is
    /// `BAD_ARGUMENT`.
    pub(crate) fn set_property(
        &mut self,
        path: &[u8],
        value: &[u8],
        declaration: Option<&PropertyDeclaration>,
    ) -> Status {
        let key = property_key(path);
        if let Some(at) = self.objects.iter().position(|o| o.key == key) {
            let object = &self.objects[at];
            if let FilterStateSource::Property(PropertyDeclaration { readonly: true, .. }) =
                object.source
            {
                return Status::BadArgument;
            }
            if !self.has_room(
                object.key.len() + object.value.len(),
                key.len() + value.len(),
            ) {
                return Status::InternalFailure;
            }
            self.objects[at].value = value.to_vec();
            return Status::Ok;
        }
        if self.objects.len() >= MAX_FILTER_STATE_OBJECTS
            || !self.has_room(0, key.len() + value.len())
        {
            return Status::InternalFailure;
        }
        let declaration = declaration.cloned().unwrap_or_default();
        self.objects.push(FilterStateObject {
            key,
            value: value.to_vec(),
            span: declaration.span,
            source: FilterStateSource::Property(declaration),
        });
        Status::Ok
    }

    /// Whether an object of `size` bytes (key and value) may take the place of one of
    /// `replaced` bytes (0: none) within [`MAX_FILTER_STATE_BYTES`]: one that does not grow
    /// always may.
    fn has_room(&self, replaced: usize, size: usize) -> bool {
        if size <= replaced {
            return true;
        }
        let kept: usize = self
            .objects
            .iter()
            .map(|o| o.key.len() + o.value.len())
            .sum();
        kept - replaced + size <= MAX_FILTER_STATE_BYTES
    }

    /// `set_envoy_filter_state`: the object of a well-known Envoy key, replacing an earlier value
    /// of the same life span (Envoy keeps an object set with another life span, and still answers
    /// `OK`). An unknown key is `NOT_FOUND` and a value the key's object cannot be made from is
    /// `BAD_ARGUMENT`, as Envoy's object factories answer.
    pub(crate) fn set_envoy_object(&mut self, key: &str, value: &[u8], span: LifeSpan) -> Status {
        let Some(check) = envoy_object_check(key) else {
            return Status::NotFound;
        };
        if !check(value) {
            return Status::BadArgument;
        }
        // Counted with the stream's properties (`set_property`); one of another life span is
        // kept and this one dropped (as below), so it is never refused.
        let replaced = match self.objects.iter().find(|o| o.key == key.as_bytes()) {
            Some(existing) if existing.span != span => return Status::Ok,
            Some(existing) => existing.key.len() + existing.value.len(),
            None => 0,
        };
        if !self.has_room(replaced, key.len() + value.len()) {
            return Status::InternalFailure;
        }
        let object = FilterStateObject {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
            span,
            source: FilterStateSource::EnvoyObject,
        };
        match self.objects.iter_mut().find(|o| o.key == key.as_bytes()) {
            Some(existing) if existing.span == span => *existing = object,
            Some(_) => {}
            None => self.objects.push(object),
        }
        Status::Ok
    }
}

/// How a value of a well-known filter state key must look.
type ValueCheck = fn(&[u8]) -> bool;

/// The filter state objects Envoy's own filters read, by key (Envoy's documentation of
/// well-known filter state), with what their factories accept. Envoy refuses any other key.
const ENVOY_OBJECTS: &[(&str, ValueCheck)] = &[
    ("envoy.string", any),
    ("envoy.tcp_proxy.cluster", any),
    ("envoy.udp_proxy.cluster", any),
    ("envoy.network.upstream_server_name", any),
    ("envoy.network.application_protocols", any),
    ("envoy.network.upstream_subject_alt_names", any),
    ("envoy.network.ip", ip),
    ("envoy.network.network_namespace", any),
    (
        "envoy.network.transport_socket.original_dst_address",
        socket_address,
    ),
    (
        "envoy.filters.listener.original_dst.local_ip",
        socket_address,
    ),
    (
        "envoy.filters.listener.original_dst.remote_ip",
        socket_address,
    ),
    ("envoy.upstream.dynamic_host", any),
    ("envoy.upstream.dynamic_port", port),
    ("envoy.tcp_proxy.disable_tunneling", boolean),
    ("envoy.tcp_proxy.per_connection_idle_timeout_ms", unsigned),
    ("envoy.ratelimit.hits_addend", unsigned),
    (
        "envoy.filters.network.http_connection_manager.local_reply_owner",
        any,
    ),
];

fn envoy_object_check(key: &str) -> Option<ValueCheck> {
    ENVOY_OBJECTS
        .iter()
        .find(|(name, _)| *name == key)
        .map(|(_, check)| *check)
}

/// Whether `key` names an object Envoy's filters read (see [`FilterState::set_envoy_object`]).
pub fn is_envoy_object(key: &str) -> bool {
    envoy_object_check(key).is_some()
}

fn any(_: &[u8]) -> bool {
    true
}

fn text(value: &[u8]) -> Option<&str> {
    std::str::from_utf8(value).ok()
}

fn ip(value: &[u8]) -> bool {
    text(value).is_some_and(|v| v.parse::<std::net::IpAddr>().is_ok())
}

fn socket_address(value: &[u8]) -> bool {
    text(value).is_some_and(|v| v.parse::<SocketAddr>().is_ok())
}

fn port(value: &[u8]) -> bool {
    text(value).is_some_and(|v| v.parse::<u16>().is_ok())
}

fn unsigned(value: &[u8]) -> bool {
    text(value).is_some_and(|v| v.parse::<u64>().is_ok())
}

fn boolean(value: &[u8]) -> bool {
    matches!(value, b"true" | b"false")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_stored_under_wasm_and_their_raw_path() {
        let mut state = FilterState::default();
        assert_eq!(state.set_property(b"a", b"1", None), Status::Ok);
        assert_eq!(state.get(b"wasm.a").map(|o| &o.value[..]), Some(&b"1"[..]));
        assert_eq!(state.set_property(b"x\0y", b"2", None), Status::Ok);
        assert!(state.property(b"x").is_none(), "Envoy's get/set asymmetry");
        assert!(state.get(b"wasm.x\0y").is_some());
    }

    #[test]
    fn a_read_only_property_is_set_once() {
        let mut state = FilterState::default();
        let declaration = PropertyDeclaration {
            readonly: true,
            ..Default::default()
        };
        assert_eq!(
            state.set_property(b"p", b"1", Some(&declaration)),
            Status::Ok
        );
        assert_eq!(
            state.set_property(b"p", b"2", Some(&declaration)),
            Status::BadArgument
        );
        assert_eq!(state.property(b"p").map(|o| &o.value[..]), Some(&b"1"[..]));
    }

    #[test]
    fn envoy_objects_need_a_known_key_and_a_value_its_factory_accepts() {
        let mut state = FilterState::default();
        let span = LifeSpan::DownstreamConnection;
        assert_eq!(
            state.set_envoy_object("envoy.tcp_proxy.cluster", b"c1", span),
            Status::Ok
        );
        assert_eq!(
            state.set_envoy_object("envoy.tcp_proxy.cluster", b"c2", span),
            Status::Ok,
            "a later value replaces the earlier"
        );
        assert_eq!(state.objects().len(), 1);
        assert_eq!(
            state.set_envoy_object("invalid.path", b"x", span),
            Status::NotFound
        );
        assert_eq!(
            state.set_envoy_object(
                "envoy.network.transport_socket.original_dst_address",
                b"not an address",
                span
            ),
            Status::BadArgument
        );
        assert_eq!(
            state.set_envoy_object(
                "envoy.network.transport_socket.original_dst_address",
                b"10.0.0.1:443",
                span
            ),
            Status::Ok
        );
    }
}
