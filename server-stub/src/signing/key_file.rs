//! A signing key file as cosign reads it, for offline signing on the publisher
//! (`publish-module --key PATH`).
//!
//! Two forms:
//! - what `cosign generate-key-pair` writes: PEM `ENCRYPTED SIGSTORE PRIVATE KEY`
//!   (older cosign: `ENCRYPTED COSIGN PRIVATE KEY`) whose body is go-securesystemslib's
//!   `encrypted` envelope, JSON `{"kdf": {"name": "scrypt", "params": {"N", "r",
//!   "p"}, "salt"}, "cipher": {"name": "nacl/secretbox", "nonce"}, "ciphertext"}`
//!   (byte strings base64), the key scrypt-derived (32 bytes) from the password and
//!   the plaintext the PKCS#8 DER of the P-256 key; the password comes from
//!   `COSIGN_PASSWORD` as for cosign, and may be empty;
//! - an unencrypted PKCS#8 `PRIVATE KEY` PEM of a P-256 key.
//!
//! The envelope is opened with RustCrypto's `scrypt` and `crypto_secretbox` (NaCl's
//! XSalsa20-Poly1305, tag first, as Go's `secretbox` writes it); only the JSON
//! framing around them is ours. The scrypt cost the file names is bounded, so a
//! crafted file cannot make the publisher allocate gigabytes.
//!
//! It must never write the key anywhere, nor hand it to the network: the key signs
//! on this machine and only the signature leaves it.

use std::path::{Path, PathBuf};

use crypto_secretbox::aead::{Aead, KeyInit};
use serde::{Deserialize, Serialize};

use super::SigningKey;

/// The environment variable cosign takes the key password from.
pub const PASSWORD_ENV: &str = "COSIGN_PASSWORD";
/// `cosign generate-key-pair`'s label.
pub const SIGSTORE_LABEL: &str = "ENCRYPTED SIGSTORE PRIVATE KEY";
/// The label of cosign before 2.0.
pub const COSIGN_LABEL: &str = "ENCRYPTED COSIGN PRIVATE KEY";
pub const PKCS8_LABEL: &str = "PRIVATE KEY";

/// A key file is under a kilobyte; anything this large is not one.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;
/// scrypt needs 128 * r * N bytes; cosign's own (N = 32768, r = 8) is 32 MiB.
const MAX_SCRYPT_BYTES: u64 = 256 * 1024 * 1024;
const MAX_SCRYPT_P: u32 = 16;
const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("signing key file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signing key file {path} is larger than any key file")]
    TooLarge { path: PathBuf },
    #[error("signing key file {path} is not PEM (expected cosign.key or a PKCS#8 P-256 key)")]
    NotPem { path: PathBuf },
    #[error(
        "signing key file {path} holds a {label:?} block; expected {SIGSTORE_LABEL:?} \
         (cosign generate-key-pair), {COSIGN_LABEL:?} or an unencrypted {PKCS8_LABEL:?}"
    )]
    Label { path: PathBuf, label: String },
    #[error("signing key file {path} is not a cosign encrypted key: {reason}")]
    Envelope {
        path: PathBuf,
        reason: EnvelopeError,
    },
    #[error(
        "signing key file {path}: wrong password (from {PASSWORD_ENV}{}) or a damaged file",
        if *password_set { "" } else { ", which is not set: an empty password was tried" }
    )]
    WrongPassword { path: PathBuf, password_set: bool },
    #[error("signing key file {path} is not an ECDSA P-256 PKCS#8 key")]
    NotP256 { path: PathBuf },
}

/// What is wrong with an encrypted envelope (before any password is tried).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("its body is not the envelope JSON ({0})")]
    Json(String),
    #[error("unknown key derivation {0:?} (cosign uses scrypt)")]
    Kdf(String),
    #[error("unknown cipher {0:?} (cosign uses nacl/secretbox)")]
    Cipher(String),
    #[error("scrypt parameters N={n} r={r} p={p} are invalid or cost more than 256 MiB")]
    ScryptParams { n: u64, r: u32, p: u32 },
    #[error("the nonce is {0} bytes, not 24")]
    Nonce(usize),
    /// The password did not open the box (or the box was altered).
    #[error("the password does not open it")]
    Open,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    kdf: Kdf,
    cipher: Cipher,
    #[serde(with = "b64")]
    ciphertext: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Kdf {
    name: String,
    params: ScryptParams,
    #[serde(with = "b64")]
    salt: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct ScryptParams {
    #[serde(rename = "N")]
    n: u64,
    r: u32,
    p: u32,
}

#[derive(Serialize, Deserialize)]
struct Cipher {
    name: String,
    #[serde(with = "b64")]
    nonce: Vec<u8>,
}

/// Go's `[]byte` in JSON: standard base64 with padding.
mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

impl ScryptParams {
    fn checked(&self) -> Result<scrypt::Params, EnvelopeError> {
        let bad = || EnvelopeError::ScryptParams {
            n: self.n,
            r: self.r,
            p: self.p,
        };
        if self.n < 2 || !self.n.is_power_of_two() || self.r == 0 || self.p == 0 {
            return Err(bad());
        }
        let memory = 128u64
            .checked_mul(u64::from(self.r))
            .and_then(|m| m.checked_mul(self.n))
            .ok_or_else(bad)?;
        if memory > MAX_SCRYPT_BYTES || self.p > MAX_SCRYPT_P {
            return Err(bad());
        }
        let log_n = u8::try_from(self.n.trailing_zeros()).map_err(|_| bad())?;
        scrypt::Params::new(log_n, self.r, self.p, KEY_BYTES).map_err(|_| bad())
    }
}

/// Opens a cosign envelope (the PEM body) with `password`; answers the plaintext
/// (the PKCS#8 DER of the key).
pub fn decrypt(envelope: &[u8], password: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let e: Envelope =
        serde_json::from_slice(envelope).map_err(|e| EnvelopeError::Json(e.to_string()))?;
    if e.kdf.name != "scrypt" {
        return Err(EnvelopeError::Kdf(e.kdf.name));
    }
    if e.cipher.name != "nacl/secretbox" {
        return Err(EnvelopeError::Cipher(e.cipher.name));
    }
    if e.cipher.nonce.len() != NONCE_BYTES {
        return Err(EnvelopeError::Nonce(e.cipher.nonce.len()));
    }
    let params = e.kdf.params.checked()?;
    let mut key = [0u8; KEY_BYTES];
    scrypt::scrypt(password, &e.kdf.salt, &params, &mut key).map_err(|_| {
        EnvelopeError::ScryptParams {
            n: e.kdf.params.n,
            r: e.kdf.params.r,
            p: e.kdf.params.p,
        }
    })?;
    crypto_secretbox::XSalsa20Poly1305::new(crypto_secretbox::Key::from_slice(&key))
        .decrypt(
            crypto_secretbox::Nonce::from_slice(&e.cipher.nonce),
            e.ciphertext.as_slice(),
        )
        .map_err(|_| EnvelopeError::Open)
}

/// The password as cosign takes it: `COSIGN_PASSWORD`, `None` when unset.
pub fn password_from_env() -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt as _;
    std::env::var_os(PASSWORD_ENV).map(|v| v.as_bytes().to_vec())
}

/// Loads the key at `path`; `password` (unset: empty) opens an encrypted one.
pub fn load(path: &Path, password: Option<&[u8]>) -> Result<SigningKey, KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_KEY_FILE_BYTES {
        return Err(KeyFileError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    parse(path, &bytes, password)
}

/// [`load`] on bytes already read (`path` names them in errors).
pub fn parse(
    path: &Path,
    bytes: &[u8],
    password: Option<&[u8]>,
) -> Result<SigningKey, KeyFileError> {
    let path = path.to_path_buf();
    let block = pem::parse(bytes).map_err(|_| KeyFileError::NotPem { path: path.clone() })?;
    let der = match block.tag() {
        SIGSTORE_LABEL | COSIGN_LABEL => {
            match decrypt(block.contents(), password.unwrap_or_default()) {
                Ok(der) => der,
                Err(EnvelopeError::Open) => {
                    return Err(KeyFileError::WrongPassword {
                        path,
                        password_set: password.is_some(),
                    })
                }
                Err(reason) => return Err(KeyFileError::Envelope { path, reason }),
            }
        }
        PKCS8_LABEL => block.contents().to_vec(),
        other => {
            return Err(KeyFileError::Label {
                path,
                label: other.to_string(),
            })
        }
    };
    SigningKey::from_pkcs8_der(&der).ok_or(KeyFileError::NotP256 { path })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cheap scrypt cost for tests (cosign's is 32768).
    const N: u64 = 1024;

    /// Seals `plaintext` as cosign does, with scrypt cost `n` (cosign: 32768): the
    /// tests' key files (the publisher never writes one).
    fn encrypt(plaintext: &[u8], password: &[u8], n: u64) -> Vec<u8> {
        use rand::RngCore as _;
        let mut salt = vec![0u8; 32];
        let mut nonce = vec![0u8; NONCE_BYTES];
        rand::thread_rng().fill_bytes(&mut salt);
        rand::thread_rng().fill_bytes(&mut nonce);
        let params = ScryptParams { n, r: 8, p: 1 };
        let mut key = [0u8; KEY_BYTES];
        let checked = params.checked().expect("scrypt cost within bounds");
        scrypt::scrypt(password, &salt, &checked, &mut key).expect("32-byte output");
        let ciphertext =
            crypto_secretbox::XSalsa20Poly1305::new(crypto_secretbox::Key::from_slice(&key))
                .encrypt(crypto_secretbox::Nonce::from_slice(&nonce), plaintext)
                .expect("sealing into memory");
        serde_json::to_vec(&Envelope {
            kdf: Kdf {
                name: "scrypt".into(),
                params,
                salt,
            },
            cipher: Cipher {
                name: "nacl/secretbox".into(),
                nonce,
            },
            ciphertext,
        })
        .expect("JSON values serialize")
    }

    /// The PEM text of an encrypted key file (tests).
    fn encrypted_pem(plaintext: &[u8], password: &[u8], n: u64) -> String {
        let p = pem::Pem::new(SIGSTORE_LABEL, encrypt(plaintext, password, n));
        pem::encode_config(
            &p,
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        )
    }

    fn p256() -> rcgen::KeyPair {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn an_encrypted_key_opens_with_its_password_only() {
        let dir = tempfile::tempdir().unwrap();
        let kp = p256();
        let path = write(
            dir.path(),
            "cosign.key",
            &encrypted_pem(&kp.serialize_der(), b"s3cret", N),
        );
        let key = load(&path, Some(b"s3cret")).unwrap();
        assert_eq!(key.public_pem(), kp.public_key_pem());
        let sig = key.sign(b"msg").unwrap();
        assert!(key.public_key().verify(b"msg", &sig));

        let err = load(&path, Some(b"wrong")).unwrap_err();
        assert!(
            matches!(
                err,
                KeyFileError::WrongPassword {
                    password_set: true,
                    ..
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("cosign.key") && text.contains("wrong password"),
            "{text}"
        );
        let err = load(&path, None).unwrap_err().to_string();
        assert!(
            err.contains("COSIGN_PASSWORD") && err.contains("not set"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_password_and_the_older_cosign_label_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let kp = p256();
        let text = encrypted_pem(&kp.serialize_der(), b"", N).replace(SIGSTORE_LABEL, COSIGN_LABEL);
        let path = write(dir.path(), "old.key", &text);
        assert_eq!(load(&path, None).unwrap().public_pem(), kp.public_key_pem());
        assert_eq!(
            load(&path, Some(b"")).unwrap().public_pem(),
            kp.public_key_pem()
        );
    }

    #[test]
    fn a_plain_pkcs8_p256_key_is_read_and_other_keys_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let kp = p256();
        let path = write(dir.path(), "plain.pem", &kp.serialize_pem());
        assert_eq!(load(&path, None).unwrap().public_pem(), kp.public_key_pem());

        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        for (name, text, want) in [
            ("p384.pem", p384.serialize_pem(), "P-256"),
            ("ed.pem", ed.serialize_pem(), "P-256"),
            (
                "enc384.key",
                encrypted_pem(&p384.serialize_der(), b"", N),
                "P-256",
            ),
            (
                "sec1.pem",
                kp.serialize_pem().replace("PRIVATE KEY", "EC PRIVATE KEY"),
                "EC PRIVATE KEY",
            ),
            ("junk.key", "not a key".to_string(), "not PEM"),
            ("cert.pem", kp.public_key_pem(), "PUBLIC KEY"),
        ] {
            let path = write(dir.path(), name, &text);
            let err = load(&path, Some(b"")).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(want), "{name}: {err}");
        }
        let err = load(&dir.path().join("absent.key"), None).unwrap_err();
        assert!(matches!(err, KeyFileError::Io { .. }) && err.to_string().contains("absent.key"));
        let big = write(dir.path(), "big.key", &"x".repeat(100_000));
        assert!(matches!(
            load(&big, None).unwrap_err(),
            KeyFileError::TooLarge { .. }
        ));
    }

    fn envelope(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value =
            serde_json::from_slice(&encrypt(&p256().serialize_der(), b"", N)).unwrap();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn a_crafted_envelope_is_refused_before_any_costly_work() {
        use serde_json::json;
        let cases: Vec<(Vec<u8>, EnvelopeError)> = vec![
            (b"{".to_vec(), EnvelopeError::Json(String::new())),
            (
                envelope(|v| v["kdf"]["name"] = json!("pbkdf2")),
                EnvelopeError::Kdf("pbkdf2".into()),
            ),
            (
                envelope(|v| v["cipher"]["name"] = json!("aes")),
                EnvelopeError::Cipher("aes".into()),
            ),
            (
                envelope(|v| v["cipher"]["nonce"] = json!("AAAA")),
                EnvelopeError::Nonce(3),
            ),
            // 128 * 8 * 2^30 bytes: refused, never allocated.
            (
                envelope(|v| v["kdf"]["params"]["N"] = json!(1u64 << 30)),
                EnvelopeError::ScryptParams {
                    n: 1 << 30,
                    r: 8,
                    p: 1,
                },
            ),
            (
                envelope(|v| v["kdf"]["params"]["N"] = json!(1000)),
                EnvelopeError::ScryptParams {
                    n: 1000,
                    r: 8,
                    p: 1,
                },
            ),
            (
                envelope(|v| v["kdf"]["params"]["p"] = json!(1000)),
                EnvelopeError::ScryptParams {
                    n: N,
                    r: 8,
                    p: 1000,
                },
            ),
            (
                envelope(|v| v["kdf"]["params"]["r"] = json!(u32::MAX)),
                EnvelopeError::ScryptParams {
                    n: N,
                    r: u32::MAX,
                    p: 1,
                },
            ),
            (
                envelope(|v| v["ciphertext"] = json!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")),
                EnvelopeError::Open,
            ),
        ];
        for (bytes, want) in cases {
            let got = decrypt(&bytes, b"").unwrap_err();
            match want {
                EnvelopeError::Json(_) => assert!(matches!(got, EnvelopeError::Json(_)), "{got}"),
                want => assert_eq!(got, want),
            }
        }
    }
}
