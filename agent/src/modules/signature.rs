//! cosign-compatible signature verification, key-based and offline: the signature
//! manifest at tag `sha256-<hex>.sig`, simple-signing payload layers, each signed
//! (annotation `dev.cosignproject.cosign/signature`, base64 DER ECDSA P-256/SHA-256)
//! by one of the trust keys (PEM SPKI, what `cosign generate-key-pair` writes).
//!
//! Why not the `sigstore` crate: its cosign verification pulls in an HTTP stack, TUF
//! and (by default) openssl/aws-lc; key-based offline verification is one ECDSA check
//! and a JSON field compare, which ring (already our TLS crypto, pure for musl) does.
//!
//! It must never accept a payload that names another manifest, or a signature that no
//! trust key made.

use base64::Engine as _;
use powernode_proto::ErrorCode;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use serde::Deserialize;
use x509_parser::prelude::FromDer as _;

use super::registry::{RegistryClient, RegistryError, Repository};
use super::ModuleErrorCode;

pub const SIMPLESIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
pub const COSIGN_SIGNATURE_TYPE: &str = "cosign container image signature";
/// A simple-signing payload is a few hundred bytes.
const MAX_PAYLOAD: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("no cosign signature for {digest}")]
    Missing { digest: String },
    #[error("no trust key verifies a signature for {digest}: {reason}")]
    Mismatch { digest: String, reason: String },
    #[error("trust key {index}: {reason}")]
    BadKey { index: usize, reason: String },
    #[error("fetching the signature")]
    Registry(#[source] RegistryError),
}

impl ModuleErrorCode for SignatureError {
    fn code(&self) -> ErrorCode {
        match self {
            SignatureError::Missing { .. } => ErrorCode::SignatureMissing,
            SignatureError::Mismatch { .. } | SignatureError::BadKey { .. } => {
                ErrorCode::SignatureMismatch
            }
            SignatureError::Registry(e) => e.code(),
        }
    }
}

/// A P-256 public key (the SEC1 point ring verifies against).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustKey {
    point: Vec<u8>,
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";

impl TrustKey {
    /// A `-----BEGIN PUBLIC KEY-----` PEM (SPKI) holding an ECDSA P-256 key.
    pub fn from_pem(pem: &str, index: usize) -> Result<Self, SignatureError> {
        let bad = |reason: String| SignatureError::BadKey { index, reason };
        let mut reader = pem.as_bytes();
        let der = rustls_pemfile::public_keys(&mut reader)
            .next()
            .ok_or_else(|| bad("no PUBLIC KEY block".into()))?
            .map_err(|e| bad(e.to_string()))?;
        let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der.as_ref())
            .map_err(|e| bad(e.to_string()))?;
        let alg = spki.algorithm.algorithm.to_id_string();
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string());
        if alg != OID_EC_PUBLIC_KEY || curve.as_deref() != Some(OID_P256) {
            return Err(bad(format!(
                "not an ECDSA P-256 key (algorithm {alg}, curve {curve:?})"
            )));
        }
        Ok(Self {
            point: spki.subject_public_key.data.to_vec(),
        })
    }

    fn verifies(&self, payload: &[u8], der_sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &self.point)
            .verify(payload, der_sig)
            .is_ok()
    }
}

pub fn parse_trust_keys(pems: &[String]) -> Result<Vec<TrustKey>, SignatureError> {
    pems.iter()
        .enumerate()
        .map(|(i, p)| TrustKey::from_pem(p, i))
        .collect()
}

#[derive(Deserialize)]
struct SimpleSigning {
    critical: Critical,
}
#[derive(Deserialize)]
struct Critical {
    image: Image,
    #[serde(rename = "type")]
    kind: String,
}
#[derive(Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// Checks one signature layer offline: `Ok(())` when a trust key signed `payload` and
/// the payload names `digest`; otherwise why not.
pub fn check_payload(
    keys: &[TrustKey],
    digest: &str,
    payload: &[u8],
    signature_b64: &str,
) -> Result<(), String> {
    let sig = base64::engine::general_purpose::STANDARD
        .decode(signature_b64.trim())
        .map_err(|e| format!("signature is not base64: {e}"))?;
    if !keys.iter().any(|k| k.verifies(payload, &sig)) {
        return Err("signature made by no trust key".into());
    }
    let p: SimpleSigning = serde_json::from_slice(payload).map_err(|e| format!("payload: {e}"))?;
    if p.critical.kind != COSIGN_SIGNATURE_TYPE {
        return Err(format!("payload type {:?}", p.critical.kind));
    }
    if !p
        .critical
        .image
        .docker_manifest_digest
        .eq_ignore_ascii_case(digest)
    {
        return Err(format!(
            "payload signs {}, not {digest}",
            p.critical.image.docker_manifest_digest
        ));
    }
    Ok(())
}

/// The cosign tag for a manifest digest: `sha256:HEX` -> `sha256-HEX.sig`.
pub fn signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replacen(':', "-", 1))
}

/// Fetches the signature manifest of `digest` from `repo` and accepts it when any of
/// its simple-signing layers is signed by a trust key and names `digest`.
pub fn verify_signature(
    client: &RegistryClient,
    repo: &Repository,
    digest: &str,
    keys: &[TrustKey],
) -> Result<(), SignatureError> {
    if keys.is_empty() {
        return Err(SignatureError::Mismatch {
            digest: digest.into(),
            reason: "no trust keys configured".into(),
        });
    }
    let sig_manifest = match client.manifest(repo, &signature_tag(digest), None) {
        Ok(m) => m,
        Err(RegistryError::NotFound { .. }) => {
            return Err(SignatureError::Missing {
                digest: digest.into(),
            })
        }
        Err(e) => return Err(SignatureError::Registry(e)),
    };
    let mut reasons = Vec::new();
    let mut seen = 0;
    for layer in &sig_manifest.manifest.layers {
        if layer.media_type != SIMPLESIGNING_MEDIA_TYPE {
            continue;
        }
        let Some(sig) = layer.annotations.get(SIGNATURE_ANNOTATION) else {
            continue;
        };
        seen += 1;
        let payload = match client.small_blob(repo, layer, MAX_PAYLOAD) {
            Ok(p) => p,
            Err(e) => {
                reasons.push(format!("payload {}: {e}", layer.digest));
                continue;
            }
        };
        match check_payload(keys, digest, &payload, sig) {
            Ok(()) => return Ok(()),
            Err(r) => reasons.push(r),
        }
    }
    if seen == 0 {
        return Err(SignatureError::Missing {
            digest: digest.into(),
        });
    }
    Err(SignatureError::Mismatch {
        digest: digest.into(),
        reason: reasons.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

    fn key() -> (EcdsaKeyPair, TrustKey) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let tk = TrustKey {
            point: kp.public_key().as_ref().to_vec(),
        };
        (kp, tk)
    }

    fn payload(digest: &str, kind: &str) -> Vec<u8> {
        format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"r/x"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"{kind}"}},"optional":null}}"#
        )
        .into_bytes()
    }

    fn sign(kp: &EcdsaKeyPair, data: &[u8]) -> String {
        let sig = kp.sign(&SystemRandom::new(), data).unwrap();
        base64::engine::general_purpose::STANDARD.encode(sig.as_ref())
    }

    #[test]
    fn payload_checks() {
        let (kp, tk) = key();
        let (_, other) = key();
        let d = "sha256:aa";
        let p = payload(d, COSIGN_SIGNATURE_TYPE);
        let s = sign(&kp, &p);
        assert!(check_payload(std::slice::from_ref(&tk), d, &p, &s).is_ok());
        assert!(check_payload(&[other.clone(), tk.clone()], d, &p, &s).is_ok());
        assert!(check_payload(&[other], d, &p, &s).is_err());
        // Another digest, another type, a flipped payload byte, garbage signature.
        let p2 = payload("sha256:bb", COSIGN_SIGNATURE_TYPE);
        assert!(check_payload(std::slice::from_ref(&tk), d, &p2, &sign(&kp, &p2)).is_err());
        let p3 = payload(d, "something else");
        assert!(check_payload(std::slice::from_ref(&tk), d, &p3, &sign(&kp, &p3)).is_err());
        let mut p4 = p.clone();
        p4[5] ^= 1;
        assert!(check_payload(std::slice::from_ref(&tk), d, &p4, &s).is_err());
        assert!(check_payload(&[tk], d, &p, "!!!").is_err());
    }

    #[test]
    fn tags_and_keys() {
        assert_eq!(signature_tag("sha256:abc"), "sha256-abc.sig");
        assert!(TrustKey::from_pem("nope", 0).is_err());
        // An Ed25519 SPKI is refused with a reason.
        let ed = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
        let e = TrustKey::from_pem(ed, 3).unwrap_err();
        assert!(e.to_string().contains("trust key 3"), "{e}");
    }
}
