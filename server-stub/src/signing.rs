//! Module-signing keys and cosign-compatible signatures.
//!
//! The online key (optional: `serve --online-signing off` never makes or reads it)
//! is an ECDSA P-256 key made on first start (`DIR/module-signing.key`, PKCS#8 PEM,
//! 0600; first writer wins, as for the CA) with its public key exported as PEM
//! (`DIR/module-signing.pub`), the form `cosign verify --key` and the agent's trust
//! keys take. An offline key is a cosign key file the publisher reads
//! ([`key_file`]). A signature is cosign's "simple signing" payload signed with
//! ECDSA-SHA256 (DER), published as an OCI manifest at tag `sha256-HEX.sig`; the
//! payload names the `HOST/REPOSITORY` and manifest digest, and its `optional`
//! annotations the module's name and version, exactly as `cosign sign -a
//! org.powernode.module.name=N -a org.powernode.module.version=V` writes them.
//! [`PublicKey`] is a key of the trust set, and [`check_layer`] the check that a
//! signature was made by one over a payload naming exactly the module.
//!
//! It must never write the private key anywhere but its 0600 file, nor sign a
//! payload that names anything but the exact manifest digest, name and version it
//! was given.

pub mod key_file;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use powernode_modfmt::signed_payload::{self, PayloadError};
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
    #[error("module trust key {path}")]
    TrustKeyIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("module trust key {path} is not a P-256 public key PEM (SubjectPublicKeyInfo, as cosign.pub)")]
    BadTrustKey { path: PathBuf },
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
        let block = pem::parse(pem).ok()?;
        (block.tag() == key_file::PKCS8_LABEL).then_some(())?;
        Self::from_pkcs8_der(block.contents())
    }

    /// A P-256 key from its PKCS#8 DER; `None` for any other key or bytes.
    pub fn from_pkcs8_der(der: &[u8]) -> Option<Self> {
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng).ok()?;
        let public_pem = spki_pem(pair.public_key().as_ref());
        Some(Self { pair, public_pem })
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

    /// The public half, as a key of a trust set.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            pem: self.public_pem.clone(),
            point: self.pair.public_key().as_ref().to_vec(),
        }
    }

    /// Signs manifest `digest` of `docker_reference` (`host[:port]/repo`), module
    /// `name` at `version`.
    pub fn sign_manifest(
        &self,
        docker_reference: &str,
        digest: &str,
        name: &str,
        version: &str,
    ) -> Result<Signature, SigningError> {
        if crate::registry::parse_digest(digest).is_none() {
            return Err(SigningError::BadDigest(digest.to_string()));
        }
        let payload = simple_signing_payload(docker_reference, digest, name, version);
        let sig = self.sign(&payload)?;
        Ok(Signature {
            payload,
            signature_b64: base64::engine::general_purpose::STANDARD.encode(sig),
        })
    }
}

pub use powernode_modfmt::signed_payload::{simple_signing_payload, COSIGN_SIGNATURE_TYPE};

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
    PublicKey::from_pem(public_pem).is_some_and(|k| k.verify(msg, sig_der))
}

/// The DER `AlgorithmIdentifier` + BIT STRING header of a P-256 SubjectPublicKeyInfo
/// (id-ecPublicKey, prime256v1), before the 65-byte uncompressed point: the one
/// fixed shape of such a key, so it is written out rather than built by an ASN.1
/// encoder.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The `PUBLIC KEY` PEM of an uncompressed P-256 point (64-column lines, LF, as
/// Go's `pem.Encode` and so `cosign.pub`).
fn spki_pem(point: &[u8]) -> String {
    let mut der = P256_SPKI_PREFIX.to_vec();
    der.extend_from_slice(point);
    pem::encode_config(
        &pem::Pem::new("PUBLIC KEY", der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// A public key of the trust set: ECDSA P-256, kept as the canonical PEM nodes are
/// handed (byte for byte what `cosign generate-key-pair` writes to `cosign.pub`).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    pem: String,
    /// The uncompressed point (65 bytes).
    point: Vec<u8>,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("sha256", &hex::encode(sha2::Sha256::digest(&self.point)))
            .finish()
    }
}

impl PublicKey {
    /// A `PUBLIC KEY` PEM of a P-256 key; `None` for anything else.
    pub fn from_pem(text: &str) -> Option<Self> {
        let block = pem::parse(text).ok()?;
        (block.tag() == "PUBLIC KEY").then_some(())?;
        let der = block.contents();
        let point = der.strip_prefix(&P256_SPKI_PREFIX[..])?;
        // An uncompressed point on the curve: ring checks it is on the curve when
        // it verifies; the form is checked here.
        (point.len() == 65 && point[0] == 0x04).then_some(())?;
        Some(Self {
            pem: spki_pem(point),
            point: point.to_vec(),
        })
    }

    /// Reads a trust key file (`serve --module-trust-key PATH`); errors name it.
    pub fn from_file(path: &Path) -> Result<Self, SigningError> {
        let text = std::fs::read(path).map_err(|source| SigningError::TrustKeyIo {
            path: path.to_path_buf(),
            source,
        })?;
        std::str::from_utf8(&text)
            .ok()
            .and_then(Self::from_pem)
            .ok_or_else(|| SigningError::BadTrustKey {
                path: path.to_path_buf(),
            })
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Whether `sig_der` is this key's ECDSA-SHA256 signature of `msg`.
    pub fn verify(&self, msg: &[u8], sig_der: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            &self.point,
        )
        .verify(msg, sig_der)
        .is_ok()
    }
}

/// What a signature of one module publication must name.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// Registry path, e.g. `modules/base` (the docker-reference after its host).
    pub repository: &'a str,
    pub digest: &'a str,
    pub name: &'a str,
    pub version: &'a str,
}

/// Why a signature layer does not stand for a publication.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerRefused {
    #[error("no key of the trust set made this signature")]
    Untrusted,
    #[error("the signature annotation is not base64")]
    SignatureEncoding,
    /// Trusted, but not naming the publication (the node's own check).
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

impl LayerRefused {
    /// Whether a key of the trust set made the signature (the payload is wrong).
    pub fn trusted(&self) -> bool {
        matches!(self, Self::Payload(_))
    }
}

/// Checks one signature layer as a node will: a key of `keys` signed `payload`
/// (`signature_b64`, DER ECDSA), and the payload names the expected digest, the
/// repository path after the docker-reference's host, the module name and version
/// ([`powernode_modfmt::signed_payload`], the node's very check).
pub fn check_layer(
    keys: &[PublicKey],
    payload: &[u8],
    signature_b64: &str,
    want: &Expected<'_>,
) -> Result<(), LayerRefused> {
    let sig = base64::engine::general_purpose::STANDARD
        .decode(signature_b64.trim())
        .map_err(|_| LayerRefused::SignatureEncoding)?;
    if !keys.iter().any(|k| k.verify(payload, &sig)) {
        return Err(LayerRefused::Untrusted);
    }
    let module = signed_payload::Expected {
        repository: want.repository,
        name: want.name,
        version: want.version,
    };
    signed_payload::parse_payload(payload)?.check(want.digest, Some(&module))?;
    Ok(())
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
        let s = k1
            .sign_manifest("127.0.0.1:1/modules/x", &d, "x", "1.0.0")
            .unwrap();
        let sig = base64::engine::general_purpose::STANDARD
            .decode(&s.signature_b64)
            .unwrap();
        assert!(verify_with_pem(k2.public_pem(), &s.payload, &sig));
        let mut tampered = s.payload.clone();
        tampered[10] ^= 1;
        assert!(!verify_with_pem(k2.public_pem(), &tampered, &sig));
        let other = SigningKey::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        assert!(!verify_with_pem(other.public_pem(), &s.payload, &sig));
        assert!(k1.sign_manifest("r/x", "sha256:zz", "x", "1").is_err());
        // cosign's bytes for `cosign sign -a org.powernode.module.name=x -a
        // org.powernode.module.version=1.0.0` (keys sorted, no spaces).
        assert_eq!(
            std::str::from_utf8(&s.payload).unwrap(),
            format!(
                r#"{{"critical":{{"identity":{{"docker-reference":"127.0.0.1:1/modules/x"}},"image":{{"docker-manifest-digest":"{d}"}},"type":"cosign container image signature"}},"optional":{{"org.powernode.module.name":"x","org.powernode.module.version":"1.0.0"}}}}"#
            )
        );
        // The public key file is what cosign.pub looks like, and reads back.
        assert_eq!(
            PublicKey::from_pem(&pub_file).unwrap().pem(),
            k1.public_key().pem()
        );
    }

    fn want<'a>(digest: &'a str) -> Expected<'a> {
        Expected {
            repository: "modules/x",
            digest,
            name: "x",
            version: "1.0.0",
        }
    }

    #[test]
    fn a_layer_stands_for_a_publication_only_when_trusted_and_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::load_or_create(dir.path()).unwrap();
        let other = SigningKey::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        let trust = [other.public_key(), key.public_key()];
        let d = format!("sha256:{}", "cd".repeat(32));
        let sign = |reference: &str, digest: &str, name: &str, version: &str| {
            key.sign_manifest(reference, digest, name, version).unwrap()
        };
        let good = sign("h:1/modules/x", &d, "x", "1.0.0");
        assert_eq!(
            check_layer(&trust, &good.payload, &good.signature_b64, &want(&d)),
            Ok(())
        );
        // Signed by no key of the set.
        assert_eq!(
            check_layer(
                &[other.public_key()],
                &good.payload,
                &good.signature_b64,
                &want(&d)
            ),
            Err(LayerRefused::Untrusted)
        );
        assert_eq!(
            check_layer(&trust, &good.payload, "%%%", &want(&d)),
            Err(LayerRefused::SignatureEncoding)
        );
        // Trusted, but naming something else.
        let e = format!("sha256:{}", "ef".repeat(32));
        for (s, refused) in [
            (sign("h:1/modules/x", &e, "x", "1.0.0"), "digest"),
            (sign("h:1/modules/y", &d, "x", "1.0.0"), "repository"),
            (sign("modules-x", &d, "x", "1.0.0"), "repository"),
            (sign("h:1/modules/x", &d, "y", "1.0.0"), "name"),
            (sign("h:1/modules/x", &d, "x", "0.9.0"), "version"),
        ] {
            let err = check_layer(&trust, &s.payload, &s.signature_b64, &want(&d)).unwrap_err();
            assert!(err.trusted(), "{err}");
            assert!(err.to_string().contains(refused), "{refused}: {err}");
        }
        // The payload of old: no annotations at all.
        let old = format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"h:1/modules/x"}},"image":{{"docker-manifest-digest":"{d}"}},"type":"cosign container image signature"}},"optional":null}}"#
        );
        let sig =
            base64::engine::general_purpose::STANDARD.encode(key.sign(old.as_bytes()).unwrap());
        assert_eq!(
            check_layer(&trust, old.as_bytes(), &sig, &want(&d)),
            Err(LayerRefused::Payload(PayloadError::Missing {
                key: powernode_proto::node::MODULE_NAME_ANNOTATION,
                expected: "x".into()
            }))
        );
        for junk in [&b"not json"[..], br#"{"critical":{}}"#] {
            let sig = base64::engine::general_purpose::STANDARD.encode(key.sign(junk).unwrap());
            assert!(matches!(
                check_layer(&trust, junk, &sig, &want(&d)),
                Err(LayerRefused::Payload(PayloadError::NotPayload(_)))
            ));
        }
    }

    #[test]
    fn public_keys_are_p256_spki_pems_only() {
        let k = SigningKey::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        let pem = k.public_pem().to_string();
        // CRLF and surrounding blank lines read the same.
        let crlf = format!("\n{}\n", pem.replace('\n', "\r\n"));
        assert_eq!(PublicKey::from_pem(&crlf).unwrap().pem(), pem);
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        for bad in [
            ed.public_key_pem(),
            p384.public_key_pem(),
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_string(),
            pem.replace("PUBLIC KEY", "CERTIFICATE"),
            "junk".to_string(),
            String::new(),
        ] {
            assert!(PublicKey::from_pem(&bad).is_none(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k.pub");
        std::fs::write(&f, ed.public_key_pem()).unwrap();
        let err = PublicKey::from_file(&f).unwrap_err().to_string();
        assert!(err.contains("k.pub") && err.contains("P-256"), "{err}");
        let err = PublicKey::from_file(&dir.path().join("absent.pub")).unwrap_err();
        assert!(err.to_string().contains("absent.pub"), "{err}");
    }
}
