//! Envoy's `verify_signature` and `sign` foreign functions, with RustCrypto: RSA PKCS#1 v1.5 and
//! ECDSA (P-256, P-384, P-521, DER signatures) over SHA-1, SHA-224, SHA-256, SHA-384 or SHA-512.
//!
//! As in Envoy, only malformed arguments are a status (`BAD_ARGUMENT`); a key or signature that
//! does not work is an `OK` answer whose result says `false`, with Envoy's error text.

use std::sync::Arc;

use p256::pkcs8::{DecodePrivateKey, DecodePublicKey};
use prost::Message;
use rsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use rsa::Pkcs1v15Sign;
use sha2::Digest;

use crate::{SharedState, Status};

/// The largest key accepted, DER or PEM: an 8192-bit RSA private key is about 5 KiB as DER.
/// A plugin must not make the host parse or compute with keys of unbounded size.
const MAX_KEY_BYTES: usize = 16 * 1024;
/// The largest RSA modulus used, in bytes (8192 bits, the limit RustCrypto already applies to
/// public keys), so a crafted multi-prime private key cannot make signing arbitrarily slow.
const MAX_RSA_MODULUS_BYTES: usize = 1024;

/// `envoy.source.extensions.common.wasm.VerifySignatureArguments`.
#[derive(Clone, PartialEq, Message)]
struct VerifySignatureArguments {
    #[prost(string, tag = "1")]
    hash_function: String,
    /// DER `SubjectPublicKeyInfo`.
    #[prost(bytes = "vec", tag = "2")]
    public_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    signature: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    text: Vec<u8>,
    /// PEM `PUBLIC KEY`.
    #[prost(string, tag = "5")]
    public_key_pem: String,
}

/// `envoy.source.extensions.common.wasm.VerifySignatureResult`.
#[derive(Clone, PartialEq, Message)]
struct VerifySignatureResult {
    #[prost(bool, tag = "1")]
    result: bool,
    #[prost(string, tag = "2")]
    error: String,
}

/// `envoy.source.extensions.common.wasm.SignArguments`.
#[derive(Clone, PartialEq, Message)]
struct SignArguments {
    #[prost(string, tag = "1")]
    hash_function: String,
    /// DER PKCS#8 `PrivateKeyInfo`.
    #[prost(bytes = "vec", tag = "2")]
    private_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    text: Vec<u8>,
    /// PEM `PRIVATE KEY` (PKCS#8) or `RSA PRIVATE KEY` (PKCS#1).
    #[prost(string, tag = "4")]
    private_key_pem: String,
}

/// `envoy.source.extensions.common.wasm.SignResult`.
#[derive(Clone, PartialEq, Message)]
struct SignResult {
    #[prost(bool, tag = "1")]
    result: bool,
    #[prost(bytes = "vec", tag = "2")]
    signature: Vec<u8>,
    #[prost(string, tag = "3")]
    error: String,
}

pub(super) fn register(shared: &SharedState) {
    shared.register_foreign_function("verify_signature", Arc::new(|_, args| verify(args)));
    shared.register_foreign_function("sign", Arc::new(|_, args| sign(args)));
}

/// A hash Envoy accepts, by its name in any case.
#[derive(Clone, Copy)]
enum Hash {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn named(name: &str) -> Option<Hash> {
        match name.to_ascii_lowercase().as_str() {
            "sha1" => Some(Hash::Sha1),
            "sha224" => Some(Hash::Sha224),
            "sha256" => Some(Hash::Sha256),
            "sha384" => Some(Hash::Sha384),
            "sha512" => Some(Hash::Sha512),
            _ => None,
        }
    }

    fn digest(self, text: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha1 => sha1::Sha1::digest(text).to_vec(),
            Hash::Sha224 => sha2::Sha224::digest(text).to_vec(),
            Hash::Sha256 => sha2::Sha256::digest(text).to_vec(),
            Hash::Sha384 => sha2::Sha384::digest(text).to_vec(),
            Hash::Sha512 => sha2::Sha512::digest(text).to_vec(),
        }
    }

    fn pkcs1v15(self) -> Pkcs1v15Sign {
        match self {
            Hash::Sha1 => Pkcs1v15Sign::new::<sha1::Sha1>(),
            Hash::Sha224 => Pkcs1v15Sign::new::<sha2::Sha224>(),
            Hash::Sha256 => Pkcs1v15Sign::new::<sha2::Sha256>(),
            Hash::Sha384 => Pkcs1v15Sign::new::<sha2::Sha384>(),
            Hash::Sha512 => Pkcs1v15Sign::new::<sha2::Sha512>(),
        }
    }
}

/// Exactly one of a DER and a PEM key, or `BAD_ARGUMENT`; `None` for one too large to use.
fn one_key(der: &[u8], pem: &str) -> Result<Option<()>, Status> {
    match (der.is_empty(), pem.is_empty()) {
        (false, true) | (true, false) => Ok((der.len() + pem.len() <= MAX_KEY_BYTES).then_some(())),
        _ => Err(Status::BadArgument),
    }
}

/// A public key of a kind Envoy verifies with.
enum PublicKey {
    Rsa(rsa::PublicKey),
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    P521(p521::ecdsa::VerifyingKey),
}

impl PublicKey {
    fn parse(der: &[u8], pem: &str) -> Option<PublicKey> {
        fn any<K: DecodePublicKey>(der: &[u8], pem: &str) -> Option<K> {
            if der.is_empty() {
                K::from_public_key_pem(pem).ok()
            } else {
                K::from_public_key_der(der).ok()
            }
        }
        any(der, pem)
            .map(PublicKey::Rsa)
            .or_else(|| any(der, pem).map(PublicKey::P256))
            .or_else(|| any(der, pem).map(PublicKey::P384))
            .or_else(|| any(der, pem).map(PublicKey::P521))
    }

    fn verify(&self, hash: Hash, digest: &[u8], signature: &[u8]) -> bool {
        match self {
            PublicKey::Rsa(key) => key.verify(hash.pkcs1v15(), digest, signature).is_ok(),
            PublicKey::P256(key) => p256::ecdsa::Signature::from_der(signature)
                .is_ok_and(|s| key.verify_prehash(digest, &s).is_ok()),
            PublicKey::P384(key) => p384::ecdsa::Signature::from_der(signature)
                .is_ok_and(|s| key.verify_prehash(digest, &s).is_ok()),
            PublicKey::P521(key) => p521::ecdsa::Signature::from_der(signature)
                .is_ok_and(|s| key.verify_prehash(digest, &s).is_ok()),
        }
    }
}

/// `verify_signature`.
fn verify(args: &[u8]) -> Result<Vec<u8>, Status> {
    let args = VerifySignatureArguments::decode(args).map_err(|_| Status::BadArgument)?;
    let usable = one_key(&args.public_key, &args.public_key_pem)?;
    let answer =
        |result: bool, error: String| Ok(VerifySignatureResult { result, error }.encode_to_vec());
    let Some(hash) = Hash::named(&args.hash_function) else {
        return answer(false, format!("{} is not supported.", args.hash_function));
    };
    let Some(key) = usable.and_then(|()| PublicKey::parse(&args.public_key, &args.public_key_pem))
    else {
        return answer(false, "Failed to initialize digest verify.".into());
    };
    if key.verify(hash, &hash.digest(&args.text), &args.signature) {
        answer(true, String::new())
    } else {
        answer(false, "Failed to verify digest. Error code: 0".into())
    }
}

/// A private key of a kind Envoy signs with.
enum PrivateKey {
    Rsa(rsa::PrivateKey),
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    P521(p521::ecdsa::SigningKey),
}

impl PrivateKey {
    fn parse(der: &[u8], pem: &str) -> Option<PrivateKey> {
        fn any<K: DecodePrivateKey>(der: &[u8], pem: &str) -> Option<K> {
            if der.is_empty() {
                K::from_pkcs8_pem(pem).ok()
            } else {
                K::from_pkcs8_der(der).ok()
            }
        }
        let pkcs1 = || {
            use rsa::pkcs1::DecodeRsaPrivateKey;
            rsa::PrivateKey::from_pkcs1_pem(pem).ok()
        };
        any::<rsa::PrivateKey>(der, pem)
            .or_else(|| der.is_empty().then(pkcs1).flatten())
            .filter(|key| {
                use rsa::traits::PublicKeyParts;
                key.size() <= MAX_RSA_MODULUS_BYTES
            })
            .map(PrivateKey::Rsa)
            .or_else(|| any(der, pem).map(PrivateKey::P256))
            .or_else(|| any(der, pem).map(PrivateKey::P384))
            .or_else(|| any(der, pem).map(PrivateKey::P521))
    }

    fn sign(&self, hash: Hash, digest: &[u8]) -> Option<Vec<u8>> {
        match self {
            PrivateKey::Rsa(key) => key.sign(hash.pkcs1v15(), digest).ok(),
            PrivateKey::P256(key) => {
                let signature: p256::ecdsa::Signature = key.sign_prehash(digest).ok()?;
                Some(signature.to_der().as_bytes().to_vec())
            }
            PrivateKey::P384(key) => {
                let signature: p384::ecdsa::Signature = key.sign_prehash(digest).ok()?;
                Some(signature.to_der().as_bytes().to_vec())
            }
            PrivateKey::P521(key) => {
                let signature: p521::ecdsa::Signature = key.sign_prehash(digest).ok()?;
                Some(signature.to_der().as_bytes().to_vec())
            }
        }
    }
}

/// `sign`.
fn sign(args: &[u8]) -> Result<Vec<u8>, Status> {
    let args = SignArguments::decode(args).map_err(|_| Status::BadArgument)?;
    let usable = one_key(&args.private_key, &args.private_key_pem)?;
    let answer = |signature: Option<Vec<u8>>, error: String| {
        Ok(SignResult {
            result: signature.is_some(),
            signature: signature.unwrap_or_default(),
            error,
        }
        .encode_to_vec())
    };
    let Some(hash) = Hash::named(&args.hash_function) else {
        return answer(None, format!("{} is not supported.", args.hash_function));
    };
    let Some(key) =
        usable.and_then(|()| PrivateKey::parse(&args.private_key, &args.private_key_pem))
    else {
        return answer(
            None,
            "Invalid key type: private key required for signing operation.".into(),
        );
    };
    match key.sign(hash, &hash.digest(&args.text)) {
        Some(signature) => answer(Some(signature), String::new()),
        None => answer(None, "Failed to create signature.".into()),
    }
}
