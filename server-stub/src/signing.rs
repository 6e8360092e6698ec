//! The module-signing key and cosign-compatible signatures.
//!
//! An ECDSA P-256 key made on first start (`DIR/module-signing.key`, PKCS#8 PEM,
//! 0600; first writer wins, as for the CA) with its public key exported as PEM
//! (`DIR/module-signing.pub`), the form `cosign verify --key` and the agent's trust
//! keys take. A signature is cosign's "simple signing" payload signed with
//! ECDSA-SHA256 (DER), published as an OCI manifest at tag `sha256-HEX.sig`.
//!
//! It must never write the private key anywhere but its 0600 file, nor sign a
//! payload that names anything but the exact manifest digest it was given.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
use serde_json::json;
use sha2::Digest as _;

pub const KEY_FILE: &str = "module-signing.key";
pub const PUB_FILE: &str = "module-signing.pub";

pub const SIMPLESIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
pub const OCI_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("signing key file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signing key file {0} is not a P-256 PKCS#8 PEM key")]
    BadKey(PathBuf),
    #[error("cannot make a signing key")]
    Generate(#[from] rcgen::Error),
    #[error("ECDSA signing failed")]
    Sign,
    #[error("{0:?} is not a sha256 manifest digest")]
    BadDigest(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SigningError + '_ {
    move |source| SigningError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The server's module-signing key.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    public_pem: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Loads `DIR/module-signing.key`, making it (and the `.pub`) on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, SigningError> {
        let path = dir.join(KEY_FILE);
        let pem = match std::fs::read_to_string(&path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                let tmp = dir.join(format!(".{KEY_FILE}.{:016x}", rand::random::<u64>()));
                crate::ca::write_private(&tmp, kp.serialize_pem().as_bytes())
                    .map_err(|_| SigningError::BadKey(tmp.clone()))?;
                let linked = std::fs::hard_link(&tmp, &path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io(&path)(e)),
                }
                std::fs::read_to_string(&path).map_err(io(&path))?
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let key = Self::from_pem(&pem).ok_or_else(|| SigningError::BadKey(path.clone()))?;
        let pub_path = dir.join(PUB_FILE);
        if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(key.public_pem.as_str()) {
            let tmp = dir.join(format!(".{PUB_FILE}.{:016x}", rand::random::<u64>()));
            std::fs::write(&tmp, &key.public_pem).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &pub_path).map_err(io(&pub_path))?;
        }
        Ok(key)
    }

    fn from_pem(pem: &str) -> Option<Self> {
        let kp = rcgen::KeyPair::from_pem(pem).ok()?;
        let der = kp.serialize_der();
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng).ok()?;
        debug_assert_eq!(pair.public_key().as_ref(), kp.public_key_raw());
        Some(Self {
            pair,
            public_pem: kp.public_key_pem(),
        })
    }

    /// The public key as a `PUBLIC KEY` (SubjectPublicKeyInfo) PEM.
    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    /// ECDSA-SHA256 over `msg`, DER encoded.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, SigningError> {
        let rng = ring::rand::SystemRandom::new();
        self.pair
            .sign(&rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| SigningError::Sign)
    }

    /// Signs manifest `digest` of `docker_reference` (`host[:port]/repo`).
    pub fn sign_manifest(
        &self,
        docker_reference: &str,
        digest: &str,
    ) -> Result<Signature, SigningError> {
        if crate::registry::parse_digest(digest).is_none() {
            return Err(SigningError::BadDigest(digest.to_string()));
        }
        let payload = simple_signing_payload(docker_reference, digest);
        let sig = self.sign(&payload)?;
        Ok(Signature {
            payload,
            signature_b64: base64::engine::general_purpose::STANDARD.encode(sig),
        })
    }
}

/// cosign's payload, byte for byte in cosign's field order.
pub fn simple_signing_payload(docker_reference: &str, digest: &str) -> Vec<u8> {
    let v = json!({
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature",
        },
        "optional": null,
    });
    serde_json::to_vec(&v).expect("JSON values serialize")
}

/// A signed payload, ready to be published.
#[derive(Debug, Clone)]
pub struct Signature {
    pub payload: Vec<u8>,
    /// base64 of the DER ECDSA signature.
    pub signature_b64: String,
}

/// The tag a signature of `digest` lives at: `sha256-HEX.sig`.
pub fn signature_tag(digest: &str) -> Option<String> {
    crate::registry::parse_digest(digest).map(|h| format!("sha256-{h}.sig"))
}

/// The signature image: config blob, manifest bytes (the payload is its one layer).
#[derive(Debug, Clone)]
pub struct SignatureImage {
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

fn sha256_digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

impl Signature {
    /// The OCI image cosign writes for one signature: a config whose rootfs names
    /// the payload layer, and a manifest whose layer carries the signature.
    pub fn image(&self) -> SignatureImage {
        let payload_digest = sha256_digest(&self.payload);
        let config = serde_json::to_vec(&json!({
            "architecture": "",
            "created": "0001-01-01T00:00:00Z",
            "history": [{"created": "0001-01-01T00:00:00Z"}],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [payload_digest]},
            "config": {},
        }))
        .expect("JSON values serialize");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": crate::registry::OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG_MEDIA_TYPE,
                "size": config.len(),
                "digest": sha256_digest(&config),
            },
            "layers": [{
                "mediaType": SIMPLESIGNING_MEDIA_TYPE,
                "size": self.payload.len(),
                "digest": payload_digest,
                "annotations": {SIGNATURE_ANNOTATION: self.signature_b64},
            }],
        }))
        .expect("JSON values serialize");
        SignatureImage { config, manifest }
    }
}

/// Verifies a DER ECDSA P-256 signature with a `PUBLIC KEY` PEM (tests, and a check
/// after signing).
pub fn verify_with_pem(public_pem: &str, msg: &[u8], sig_der: &[u8]) -> bool {
    let Some(der) = pem_body(public_pem) else {
        return false;
    };
    let Ok((_, spki)) =
        <x509_parser::x509::SubjectPublicKeyInfo as x509_parser::prelude::FromDer<_>>::from_der(
            &der,
        )
    else {
        return false;
    };
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        &spki.subject_public_key.data,
    )
    .verify(msg, sig_der)
    .is_ok()
}

fn pem_body(pem: &str) -> Option<Vec<u8>> {
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_made_once_and_signatures_verify() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = SigningKey::load_or_create(dir.path()).unwrap();
        let k2 = SigningKey::load_or_create(dir.path()).unwrap();
        assert_eq!(k1.public_pem(), k2.public_pem());
        let pub_file = std::fs::read_to_string(dir.path().join(PUB_FILE)).unwrap();
        assert_eq!(pub_file, k1.public_pem());
        assert!(pub_file.starts_with("-----BEGIN PUBLIC KEY-----"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let d = format!("sha256:{}", "ab".repeat(32));
        let s = k1.sign_manifest("127.0.0.1:1/modules/x", &d).unwrap();
        let sig = base64::engine::general_purpose::STANDARD
            .decode(&s.signature_b64)
            .unwrap();
        assert!(verify_with_pem(k2.public_pem(), &s.payload, &sig));
        let mut tampered = s.payload.clone();
        tampered[10] ^= 1;
        assert!(!verify_with_pem(k2.public_pem(), &tampered, &sig));
        let other = SigningKey::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        assert!(!verify_with_pem(other.public_pem(), &s.payload, &sig));
        assert!(k1.sign_manifest("r/x", "sha256:zz").is_err());
        assert_eq!(
            std::str::from_utf8(&s.payload).unwrap(),
            format!(
                r#"{{"critical":{{"identity":{{"docker-reference":"127.0.0.1:1/modules/x"}},"image":{{"docker-manifest-digest":"{d}"}},"type":"cosign container image signature"}},"optional":null}}"#
            )
        );
    }
}
