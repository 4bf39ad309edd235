//! `google.protobuf.Any` configurations, turned into the bytes the plugin reads as Envoy turns
//! them: a `StringValue`'s string, a `BytesValue`'s bytes, any other message's protobuf
//! encoding. Envoy's documentation says a `Struct` is handed over as JSON, but its code (and
//! Istio's experience, which is why Istio wraps JSON in a `StringValue`) hands over the Struct's
//! protobuf bytes; pwhost does what Envoy does. Traffic Server's files give the configuration
//! as a plain string, taken as it is.

use base64::Engine as _;
use prost::Message as _;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_yaml::Value;

const TYPE_PREFIX: &str = "type.googleapis.com/";

/// A configuration as the plugin receives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Any(pub(super) Vec<u8>);

impl<'de> Deserialize<'de> for Any {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        to_bytes(&value).map(Any).map_err(D::Error::custom)
    }
}

fn to_bytes(value: &Value) -> Result<Vec<u8>, String> {
    let message = match value {
        Value::String(text) => return Ok(text.clone().into_bytes()),
        Value::Mapping(message) => message,
        Value::Null => return Ok(Vec::new()),
        _ => return Err(
            "a configuration is a string or a google.protobuf.Any ({\"@type\": ..., value: ...})"
                .into(),
        ),
    };
    let type_url = message
        .get("@type")
        .and_then(Value::as_str)
        .ok_or("a google.protobuf.Any needs its \"@type\"")?;
    for key in message.keys() {
        if !matches!(key.as_str(), Some("@type" | "value")) {
            return Err(format!(
                "unknown field {} beside \"@type\" and value",
                describe(key)
            ));
        }
    }
    let value = message.get("value").unwrap_or(&Value::Null);
    let type_name = type_url.strip_prefix(TYPE_PREFIX).unwrap_or(type_url);
    match type_name {
        "google.protobuf.StringValue" => match value {
            Value::String(text) => Ok(text.clone().into_bytes()),
            Value::Null => Ok(Vec::new()),
            _ => Err("a google.protobuf.StringValue's value is a string".into()),
        },
        "google.protobuf.BytesValue" => match value {
            Value::String(text) => base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|e| format!("a google.protobuf.BytesValue's value is base64: {e}")),
            Value::Null => Ok(Vec::new()),
            _ => Err("a google.protobuf.BytesValue's value is a base64 string".into()),
        },
        "google.protobuf.Struct" => match value {
            Value::Mapping(_) | Value::Null => Ok(to_struct(value)?.encode_to_vec()),
            _ => Err("a google.protobuf.Struct's value is an object".into()),
        },
        other => Err(format!(
            "unsupported configuration type {other:?} (Envoy's Wasm plugins take \
             google.protobuf.StringValue, BytesValue or Struct)"
        )),
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("`{s}`"),
        other => format!("{other:?}"),
    }
}

fn to_struct(value: &Value) -> Result<prost_types::Struct, String> {
    let mut fields = std::collections::BTreeMap::new();
    if let Value::Mapping(map) = value {
        for (key, value) in map {
            let key = key
                .as_str()
                .ok_or_else(|| format!("a Struct's keys are strings, not {}", describe(key)))?;
            fields.insert(key.to_string(), to_value(value)?);
        }
    }
    Ok(prost_types::Struct { fields })
}

fn to_value(value: &Value) -> Result<prost_types::Value, String> {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Sequence(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(to_value).collect::<Result<_, _>>()?,
        }),
        Value::Mapping(_) => Kind::StructValue(to_struct(value)?),
        Value::Tagged(tagged) => return to_value(&tagged.value),
    };
    Ok(prost_types::Value { kind: Some(kind) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(yaml: &str) -> Result<Vec<u8>, String> {
        let value: Value = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        to_bytes(&value)
    }

    #[test]
    fn wrapped_strings_and_bytes_are_handed_over_unwrapped() {
        assert_eq!(bytes("plain text").unwrap(), b"plain text");
        let string = r#"{"@type": "type.googleapis.com/google.protobuf.StringValue", value: "{}"}"#;
        assert_eq!(bytes(string).unwrap(), b"{}");
        let raw = r#"{"@type": "type.googleapis.com/google.protobuf.BytesValue", value: "AAEC"}"#;
        assert_eq!(bytes(raw).unwrap(), [0, 1, 2]);
    }

    #[test]
    fn a_struct_is_handed_over_as_its_protobuf_encoding_as_envoy_does() {
        let encoded = bytes(
            r#"{"@type": "type.googleapis.com/google.protobuf.Struct", value: {a: 1, b: [true]}}"#,
        )
        .unwrap();
        let decoded = prost_types::Struct::decode(&encoded[..]).unwrap();
        assert_eq!(
            decoded.fields["a"].kind,
            Some(prost_types::value::Kind::NumberValue(1.0))
        );
    }

    #[test]
    fn other_messages_and_malformed_wrappers_are_refused() {
        assert!(
            bytes(r#"{"@type": "type.googleapis.com/my.Message", value: {}}"#)
                .unwrap_err()
                .contains("unsupported configuration type \"my.Message\"")
        );
        assert!(bytes(r#"{value: "x"}"#).unwrap_err().contains("@type"));
        assert!(bytes(
            r#"{"@type": "type.googleapis.com/google.protobuf.BytesValue", value: "!!"}"#
        )
        .unwrap_err()
        .contains("base64"));
        assert!(bytes("[1, 2]").is_err());
    }
}
