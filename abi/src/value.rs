//! Typed values of Envoy's attributes, and their encoding for plugins.
//!
//! Envoy answers `proxy_get_property` (and evaluates CEL expressions) over typed values and hands
//! the plugin their native bytes, untagged, since a plugin knows the type of what it asked for:
//! strings and bytes as they are, integers and doubles as 8 little-endian bytes, booleans as one
//! byte, timestamps and durations as 64-bit nanoseconds, maps and lists in the header-pairs
//! format (a list as its elements paired with empty values), protobuf messages serialized.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::header_map::wire;
use crate::Status;

/// A value of an attribute or property.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<'a> {
    /// A string (as bytes: header values need not be UTF-8).
    String(Cow<'a, [u8]>),
    /// Bytes.
    Bytes(Cow<'a, [u8]>),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer.
    Uint(u64),
    /// A double.
    Double(f64),
    /// A boolean.
    Bool(bool),
    /// A point in time.
    Timestamp(SystemTime),
    /// A duration.
    Duration(Duration),
    /// A map with string keys, in its own order.
    Map(Vec<(Cow<'a, [u8]>, Value<'a>)>),
    /// A list.
    List(Vec<Value<'a>>),
    /// A serialized protobuf message (e.g. `google.protobuf.Struct`), handed over as is.
    Message(Cow<'a, [u8]>),
    /// No value (a JSON null in a `Struct`): cannot be handed to a plugin.
    Null,
}

impl<'a> Value<'a> {
    /// A string value borrowing `text`.
    pub fn str(text: &'a str) -> Self {
        Value::String(Cow::Borrowed(text.as_bytes()))
    }

    /// A string value owning `text`.
    pub fn string(text: impl Into<String>) -> Value<'static> {
        Value::String(Cow::Owned(text.into().into_bytes()))
    }

    /// The value with everything borrowed copied, so it outlives its source.
    pub fn into_owned(self) -> Value<'static> {
        match self {
            Value::String(s) => Value::String(Cow::Owned(s.into_owned())),
            Value::Bytes(b) => Value::Bytes(Cow::Owned(b.into_owned())),
            Value::Message(m) => Value::Message(Cow::Owned(m.into_owned())),
            Value::Map(entries) => Value::Map(
                entries
                    .into_iter()
                    .map(|(k, v)| (Cow::Owned(k.into_owned()), v.into_owned()))
                    .collect(),
            ),
            Value::List(items) => Value::List(items.into_iter().map(Value::into_owned).collect()),
            Value::Int(i) => Value::Int(i),
            Value::Uint(u) => Value::Uint(u),
            Value::Double(d) => Value::Double(d),
            Value::Bool(b) => Value::Bool(b),
            Value::Timestamp(t) => Value::Timestamp(t),
            Value::Duration(d) => Value::Duration(d),
            Value::Null => Value::Null,
        }
    }

    /// The entry `key` of a map, or element `key` (a decimal index) of a list, as Envoy selects
    /// the next segment of a property path; `None` for anything else.
    pub fn select(self, key: &[u8]) -> Option<Value<'a>> {
        match self {
            Value::Map(entries) => entries
                .into_iter()
                .find(|(k, _)| k.as_ref() == key)
                .map(|(_, v)| v),
            Value::List(items) => {
                let index: usize = std::str::from_utf8(key).ok()?.parse().ok()?;
                items.into_iter().nth(index)
            }
            _ => None,
        }
    }

    /// The bytes a plugin receives for this value, as Envoy's `serializeValue` encodes them;
    /// `SERIALIZATION_FAILURE` for a null anywhere inside.
    pub fn encode(&self) -> Result<Vec<u8>, Status> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), Status> {
        match self {
            Value::String(bytes) | Value::Bytes(bytes) | Value::Message(bytes) => {
                out.extend_from_slice(bytes)
            }
            Value::Int(i) => out.extend_from_slice(&i.to_le_bytes()),
            Value::Uint(u) => out.extend_from_slice(&u.to_le_bytes()),
            Value::Double(d) => out.extend_from_slice(&d.to_le_bytes()),
            Value::Bool(b) => out.push(u8::from(*b)),
            Value::Timestamp(t) => out.extend_from_slice(&timestamp_nanos(*t).to_le_bytes()),
            Value::Duration(d) => {
                let nanos = i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
                out.extend_from_slice(&nanos.to_le_bytes());
            }
            Value::Map(entries) => {
                let encoded = entries
                    .iter()
                    .map(|(k, v)| Ok((k.to_vec(), v.encode()?)))
                    .collect::<Result<Vec<_>, Status>>()?;
                encode_pairs(&encoded, out)?;
            }
            Value::List(items) => {
                let encoded = items
                    .iter()
                    .map(|item| Ok((item.encode()?, Vec::new())))
                    .collect::<Result<Vec<_>, Status>>()?;
                encode_pairs(&encoded, out)?;
            }
            Value::Null => return Err(Status::SerializationFailure),
        }
        Ok(())
    }
}

fn encode_pairs(pairs: &[(Vec<u8>, Vec<u8>)], out: &mut Vec<u8>) -> Result<(), Status> {
    let iter = || pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice()));
    let len = wire::encoded_len(iter()).ok_or(Status::SerializationFailure)?;
    let start = out.len();
    out.resize(start + len as usize, 0);
    wire::encode_into(iter(), &mut out[start..]);
    Ok(())
}

/// Nanoseconds since the UNIX epoch, negative before it, saturating.
pub(crate) fn timestamp_nanos(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_nanos())
            .map(|n| -n)
            .unwrap_or(i64::MIN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_are_their_native_little_endian_bytes() {
        assert_eq!(Value::Int(-2).encode().unwrap(), (-2i64).to_le_bytes());
        assert_eq!(Value::Uint(7).encode().unwrap(), 7u64.to_le_bytes());
        assert_eq!(Value::Double(1.5).encode().unwrap(), 1.5f64.to_le_bytes());
        assert_eq!(Value::Bool(true).encode().unwrap(), [1]);
        assert_eq!(Value::str("abc").encode().unwrap(), b"abc");
        let time = UNIX_EPOCH + Duration::from_nanos(1_500);
        assert_eq!(
            Value::Timestamp(time).encode().unwrap(),
            1_500i64.to_le_bytes()
        );
        assert_eq!(
            Value::Duration(Duration::from_millis(2)).encode().unwrap(),
            2_000_000i64.to_le_bytes()
        );
    }

    #[test]
    fn maps_and_lists_are_header_pairs() {
        let map = Value::Map(vec![(Cow::Borrowed(&b"k"[..]), Value::Int(1))]);
        let encoded = map.encode().unwrap();
        let pairs = wire::decode(&encoded).unwrap();
        assert_eq!(pairs, vec![(&b"k"[..], &1i64.to_le_bytes()[..])]);
        let list = Value::List(vec![Value::str("a"), Value::str("b")]);
        let encoded = list.encode().unwrap();
        assert_eq!(
            wire::decode(&encoded).unwrap(),
            vec![(&b"a"[..], &b""[..]), (&b"b"[..], &b""[..])]
        );
        assert_eq!(Value::Map(Vec::new()).encode().unwrap(), [0, 0, 0, 0]);
    }

    #[test]
    fn a_null_cannot_be_handed_over() {
        assert_eq!(Value::Null.encode(), Err(Status::SerializationFailure));
        let map = Value::Map(vec![(Cow::Borrowed(&b"k"[..]), Value::Null)]);
        assert_eq!(map.encode(), Err(Status::SerializationFailure));
    }

    #[test]
    fn paths_select_into_maps_and_lists() {
        let map = Value::Map(vec![(
            Cow::Borrowed(&b"list"[..]),
            Value::List(vec![Value::Int(1), Value::Int(2)]),
        )]);
        let list = map.select(b"list").unwrap();
        assert_eq!(list.clone().select(b"1"), Some(Value::Int(2)));
        assert_eq!(list.clone().select(b"2"), None);
        assert_eq!(list.select(b"x"), None);
    }
}
