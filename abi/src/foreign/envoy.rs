//! Envoy's foreign functions (Envoy's `source/extensions/common/wasm/foreign.cc`), with its
//! names, protobuf arguments (`ext/*.proto`, decoded with prost) and results.

use std::io::{Read, Write};
use std::sync::Arc;

use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use flate2::Compression;
use prost::Message;

use super::{ForeignCall, ForeignFunction};
use crate::filter_state::{LifeSpan, PropertyDeclaration, PropertyType};
use crate::{SharedState, Status};

/// `envoy.source.extensions.common.wasm.SetEnvoyFilterStateArguments`.
#[derive(Clone, PartialEq, Message)]
struct SetEnvoyFilterStateArguments {
    #[prost(string, tag = "1")]
    path: String,
    #[prost(string, tag = "2")]
    value: String,
    #[prost(int32, tag = "3")]
    span: i32,
}

/// `envoy.source.extensions.common.wasm.DeclarePropertyArguments`.
#[derive(Clone, PartialEq, Message)]
struct DeclarePropertyArguments {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(bool, tag = "2")]
    readonly: bool,
    #[prost(int32, tag = "3")]
    r#type: i32,
    #[prost(bytes = "vec", tag = "4")]
    schema: Vec<u8>,
    #[prost(int32, tag = "5")]
    span: i32,
}

/// The most bytes `uncompress` produces. Envoy grows its buffer without limit, so a small
/// "zip bomb" from a plugin makes the proxy allocate gigabytes; pwhost answers
/// `SERIALIZATION_FAILURE` instead, as for any data it cannot inflate.
pub(crate) const UNCOMPRESS_LIMIT: u64 = 64 << 20;

/// Registers Envoy's foreign functions in `shared`.
pub(crate) fn register(shared: &SharedState) {
    let functions: [(&str, ForeignFunction); 5] = [
        ("compress", Arc::new(|_, args| compress(args))),
        ("uncompress", Arc::new(|_, args| uncompress(args))),
        ("set_envoy_filter_state", Arc::new(set_envoy_filter_state)),
        ("declare_property", Arc::new(declare_property)),
        ("clear_route_cache", Arc::new(clear_route_cache)),
    ];
    for (name, function) in functions {
        shared.register_foreign_function(name, function);
    }
    #[cfg(feature = "signatures")]
    super::signatures::register(shared);
    #[cfg(feature = "expressions")]
    super::expressions::register(shared);
}

/// `compress`: the arguments in zlib format (RFC 1950) at zlib's default level, as Envoy's
/// `compress()`.
fn compress(data: &[u8]) -> Result<Vec<u8>, Status> {
    let mut encoder = ZlibEncoder::new(Vec::new(), Compression::default());
    encoder
        .write_all(data)
        .and_then(|()| encoder.finish())
        .map_err(|_| Status::SerializationFailure)
}

/// `uncompress`: zlib-format arguments inflated; anything that is not a whole zlib stream (or
/// inflates past [`UNCOMPRESS_LIMIT`]) is `SERIALIZATION_FAILURE`.
fn uncompress(data: &[u8]) -> Result<Vec<u8>, Status> {
    let mut out = Vec::new();
    ZlibDecoder::new(data)
        .take(UNCOMPRESS_LIMIT + 1)
        .read_to_end(&mut out)
        .map_err(|_| Status::SerializationFailure)?;
    if out.len() as u64 > UNCOMPRESS_LIMIT {
        return Err(Status::SerializationFailure);
    }
    Ok(out)
}

/// `set_envoy_filter_state`: a well-known Envoy object in the stream's filter state.
fn set_envoy_filter_state(call: &mut ForeignCall<'_>, args: &[u8]) -> Result<Vec<u8>, Status> {
    let args = SetEnvoyFilterStateArguments::decode(args).map_err(|_| Status::BadArgument)?;
    match call.set_envoy_object(
        &args.path,
        args.value.as_bytes(),
        LifeSpan::from_proto(args.span),
    ) {
        Status::Ok => Ok(Vec::new()),
        Status::InternalFailure => {
            use crate::filter_state::MAX_FILTER_STATE_BYTES;
            call.state.tell_limit(crate::state::Limit::FilterState, || {
                format!(
                    "set_envoy_filter_state: a stream keeps at most {MAX_FILTER_STATE_BYTES} \
                         bytes of properties and filter state objects in all: INTERNAL_FAILURE"
                )
            });
            Err(Status::InternalFailure)
        }
        status => Err(status),
    }
}

/// `declare_property`: the type, writability and life span of a property the plugin will set.
fn declare_property(call: &mut ForeignCall<'_>, args: &[u8]) -> Result<Vec<u8>, Status> {
    let args = DeclarePropertyArguments::decode(args).map_err(|_| Status::BadArgument)?;
    let declaration = PropertyDeclaration {
        readonly: args.readonly,
        property_type: PropertyType::from_proto(args.r#type, args.schema),
        span: LifeSpan::from_proto(args.span),
    };
    match call.declare_property(args.name.as_bytes(), declaration) {
        Status::Ok => Ok(Vec::new()),
        status => Err(status),
    }
}

/// `clear_route_cache`: the stream's route is chosen again (ABI 0.2.x has no host function for
/// it); the arguments are ignored and the answer is always `OK`.
fn clear_route_cache(call: &mut ForeignCall<'_>, _args: &[u8]) -> Result<Vec<u8>, Status> {
    if call.is_http_stream() {
        let context = call.context();
        call.host().clear_route_cache(context);
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_writes_zlib_that_uncompress_reads_back() {
        let data = b"hello hello hello hello".repeat(10);
        let compressed = compress(&data).unwrap();
        assert_eq!(
            &compressed[..2],
            &[0x78, 0x9c],
            "zlib header, default level"
        );
        assert!(compressed.len() < data.len());
        assert_eq!(uncompress(&compressed).unwrap(), data);
        assert_eq!(compress(b"").unwrap(), [0x78, 0x9c, 3, 0, 0, 0, 0, 1]);
        assert_eq!(uncompress(&compress(b"").unwrap()).unwrap(), b"");
    }

    #[test]
    fn uncompress_refuses_what_is_not_a_whole_zlib_stream() {
        let compressed = compress(b"some data to cut short").unwrap();
        for bad in [
            &b""[..],
            b"not zlib at all",
            &compressed[..compressed.len() - 3],
        ] {
            assert_eq!(uncompress(bad), Err(Status::SerializationFailure));
        }
    }

    #[test]
    fn uncompress_stops_a_zip_bomb() {
        let bomb = {
            let mut encoder = ZlibEncoder::new(Vec::new(), Compression::best());
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..(UNCOMPRESS_LIMIT >> 20) + 1 {
                encoder.write_all(&zeros).unwrap();
            }
            encoder.finish().unwrap()
        };
        assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
        assert_eq!(uncompress(&bomb), Err(Status::SerializationFailure));
    }

    #[test]
    fn arguments_that_are_not_the_message_are_bad_arguments() {
        // Envoy's tests send these bytes; neither parses as the message.
        for bad in [&b"bad_arg"[..], b"declare_property"] {
            assert!(DeclarePropertyArguments::decode(bad).is_err());
            assert!(SetEnvoyFilterStateArguments::decode(bad).is_err());
        }
        let encoded = SetEnvoyFilterStateArguments {
            path: "envoy.tcp_proxy.cluster".into(),
            value: "unicorns".into(),
            span: 1,
        }
        .encode_to_vec();
        assert_eq!(&encoded[..2], &[0x0a, 0x17]);
    }
}
