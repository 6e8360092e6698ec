//! cosign-compatible signature verification, key-based and offline: the signature
//! manifest at tag `sha256-<hex>.sig`, simple-signing payload layers, each signed
//! (annotation `dev.cosignproject.cosign/signature`, base64 DER ECDSA P-256/SHA-256)
//! by one of the trust keys (PEM SPKI, what `cosign generate-key-pair` writes).
//!
//! Why not the `sigstore` crate: its cosign verification pulls in an HTTP stack, TUF
//! and (by default) openssl/aws-lc; key-based offline verification is one ECDSA check
//! and a JSON field compare, which ring (already our TLS crypto, pure for musl) does.
//!
//! The payload binds more than the digest: its `docker-reference` names the
//! repository and its annotations (`cosign sign -a org.powernode.module.name=NAME -a
//! org.powernode.module.version=VERSION`) the module and version, all checked against
//! what the control plane asked for ([`Expected`]).
//!
//! It must never accept a payload that names another manifest, module or version, or a
//! signature that no trust key made.

use base64::Engine as _;
use powernode_proto::ErrorCode;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use x509_parser::prelude::FromDer as _;

use super::registry::{RegistryClient, RegistryError, Repository};
use super::ModuleErrorCode;

pub const SIMPLESIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
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

// The payload's format and its check are shared with the publisher and the server.
pub use powernode_modfmt::signed_payload::{
    parse_payload, reference_path, Expected, PayloadError, SignedPayload, COSIGN_SIGNATURE_TYPE,
};

/// Checks one signature layer offline: `Ok(())` when a trust key signed `payload` and
/// the payload names `digest` (and, with `expected`, that module and version);
/// otherwise why not.
pub fn check_payload(
    keys: &[TrustKey],
    digest: &str,
    expected: Option<&Expected<'_>>,
    payload: &[u8],
    signature_b64: &str,
) -> Result<(), String> {
    let sig = base64::engine::general_purpose::STANDARD
        .decode(signature_b64.trim())
        .map_err(|e| format!("signature is not base64: {e}"))?;
    if !keys.iter().any(|k| k.verifies(payload, &sig)) {
        return Err("signature made by no trust key".into());
    }
    parse_payload(payload)
        .and_then(|p| p.check(digest, expected))
        .map_err(|e| e.to_string())
}

/// The cosign tag for a manifest digest: `sha256:HEX` -> `sha256-HEX.sig`.
pub fn signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replacen(':', "-", 1))
}

/// Fetches the signature manifest of `digest` from `repo` and accepts it when any of
/// its simple-signing layers is signed by a trust key and names `digest` (and, with
/// `expected`, the module and version asked for).
pub fn verify_signature(
    client: &RegistryClient,
    repo: &Repository,
    digest: &str,
    keys: &[TrustKey],
    expected: Option<&Expected<'_>>,
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
        match check_payload(keys, digest, expected, &payload, sig) {
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
        assert!(check_payload(std::slice::from_ref(&tk), d, None, &p, &s).is_ok());
        assert!(check_payload(&[other.clone(), tk.clone()], d, None, &p, &s).is_ok());
        assert!(check_payload(&[other], d, None, &p, &s).is_err());
        // Another digest, another type, a flipped payload byte, garbage signature.
        let p2 = payload("sha256:bb", COSIGN_SIGNATURE_TYPE);
        assert!(check_payload(std::slice::from_ref(&tk), d, None, &p2, &sign(&kp, &p2)).is_err());
        let p3 = payload(d, "something else");
        assert!(check_payload(std::slice::from_ref(&tk), d, None, &p3, &sign(&kp, &p3)).is_err());
        let mut p4 = p.clone();
        p4[5] ^= 1;
        assert!(check_payload(std::slice::from_ref(&tk), d, None, &p4, &s).is_err());
        assert!(check_payload(&[tk], d, None, &p, "!!!").is_err());
    }

    #[test]
    fn payload_binds_repository_name_and_version() {
        let (kp, tk) = key();
        let d = "sha256:aa";
        let bound = |reference: &str, optional: &str| {
            format!(
                r#"{{"critical":{{"identity":{{"docker-reference":"{reference}"}},"image":{{"docker-manifest-digest":"{d}"}},"type":"{COSIGN_SIGNATURE_TYPE}"}},"optional":{optional}}}"#
            )
            .into_bytes()
        };
        let ann = r#"{"org.powernode.module.name":"base","org.powernode.module.version":"2"}"#;
        let want = Expected {
            repository: "modules/base",
            name: "base",
            version: "2",
        };
        let check = |p: &[u8], want: &Expected<'_>| {
            check_payload(std::slice::from_ref(&tk), d, Some(want), p, &sign(&kp, p))
        };
        let good = bound("10.0.2.2:8443/modules/base", ann);
        check(&good, &want).unwrap();
        // The host may differ (a mirror, another view of the same registry).
        check(&bound("registry.example:5000/modules/base", ann), &want).unwrap();
        let other = |f: fn(&mut Expected<'static>)| {
            let mut w = want;
            f(&mut w);
            check(&good, &w).unwrap_err()
        };
        assert!(other(|w| w.name = "web").contains(r#"name="base", not "web""#));
        assert!(other(|w| w.version = "3").contains(r#"version="2", not "3""#));
        assert!(other(|w| w.repository = "modules/web").contains("repository"));
        // No annotations, non-string ones, no reference: refused when a module is expected.
        let e = check(&bound("h:1/modules/base", "null"), &want).unwrap_err();
        assert!(e.contains("no org.powernode.module.name annotation"), "{e}");
        let e = check(
            &bound("h:1/modules/base", r#"{"org.powernode.module.name":1}"#),
            &want,
        )
        .unwrap_err();
        assert!(e.contains("not a string"), "{e}");
        let no_ref = format!(
            r#"{{"critical":{{"identity":{{}},"image":{{"docker-manifest-digest":"{d}"}},"type":"{COSIGN_SIGNATURE_TYPE}"}},"optional":{ann}}}"#
        )
        .into_bytes();
        assert!(check(&no_ref, &want).unwrap_err().contains("repository"));
        // Without an expectation (the `module pull` tool without --name): digest only.
        let p = bound("h:1/anything", "null");
        check_payload(std::slice::from_ref(&tk), d, None, &p, &sign(&kp, &p)).unwrap();
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
