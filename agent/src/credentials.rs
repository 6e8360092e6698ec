//! The node's credentials: a fresh Ed25519 key per enrollment (and per renewal),
//! the PKCS#10 request that binds it to the instance, and what the node needs to
//! know about the certificate it got back (validity, subject, public key).
//!
//! The private key never leaves the node: only the CSR goes on the wire.

use base64::Engine as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use ed25519_dalek::SigningKey;
use powernode_proto::node::INSTANCE_URI_PREFIX;
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot generate the node key")]
    Entropy(#[from] crate::entropy::EntropyError),
    #[error("cannot encode the node key")]
    Encode(String),
    #[error("the stored node key is not a PEM PKCS#8 Ed25519 key")]
    KeyFormat,
    #[error("cannot build the certificate request")]
    Csr(#[source] rcgen::Error),
    #[error("the certificate is not a PEM X.509 certificate: {0}")]
    Certificate(String),
}

/// The node's Ed25519 private key (zeroized on drop, copies included).
#[derive(Clone)]
pub struct NodeKey {
    signing: SigningKey,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey")
            .field("public", &hex_prefix(&self.public_key()))
            .finish()
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

impl NodeKey {
    /// A fresh key seeded from the kernel RNG (logs if it had to wait for entropy).
    pub fn generate() -> Result<Self, CredentialError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        let fill = crate::entropy::fill(seed.as_mut())?;
        if let Some(waited) = fill.waited {
            tracing::warn!(
                waited_ms = waited.as_millis() as u64,
                "node key generation waited for kernel entropy"
            );
        }
        Ok(Self {
            signing: SigningKey::from_bytes(&seed),
        })
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// PKCS#8 DER (v2, with the public key), as rustls and rcgen take it.
    pub fn pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, CredentialError> {
        let doc = self
            .signing
            .to_pkcs8_der()
            .map_err(|e| CredentialError::Encode(e.to_string()))?;
        Ok(Zeroizing::new(doc.as_bytes().to_vec()))
    }

    pub fn to_pem(&self) -> Result<Zeroizing<String>, CredentialError> {
        let der = self.pkcs8_der()?;
        let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der.as_slice()));
        let mut pem = Zeroizing::new(String::from("-----BEGIN PRIVATE KEY-----\n"));
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(chunk));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        Ok(pem)
    }

    pub fn from_pem(pem: &str) -> Result<Self, CredentialError> {
        let mut reader = pem.as_bytes();
        match rustls_pemfile::private_key(&mut reader) {
            Ok(Some(rustls::pki_types::PrivateKeyDer::Pkcs8(der))) => {
                SigningKey::from_pkcs8_der(der.secret_pkcs8_der())
                    .map(|signing| Self { signing })
                    .map_err(|_| CredentialError::KeyFormat)
            }
            _ => Err(CredentialError::KeyFormat),
        }
    }

    /// A PEM PKCS#10 request: subject CN = instance id, URI SAN
    /// `urn:powernode:instance:<id>`, signed by this key.
    pub fn csr_pem(&self, instance_id: &str) -> Result<String, CredentialError> {
        let der = self.pkcs8_der()?;
        let pkcs8 = rustls::pki_types::PrivatePkcs8KeyDer::from(der.as_slice());
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
            .map_err(CredentialError::Csr)?;
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, instance_id);
        params.distinguished_name = dn;
        let uri = rcgen::string::Ia5String::try_from(format!("{INSTANCE_URI_PREFIX}{instance_id}"))
            .map_err(CredentialError::Csr)?;
        params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
        params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(CredentialError::Csr)
    }
}

/// What the node reads out of its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub common_name: Option<String>,
    /// The instance named by the `urn:powernode:instance:` URI SAN.
    pub instance_uri: Option<String>,
    /// Raw subject public key bytes (32 for Ed25519).
    pub public_key: Vec<u8>,
    pub serial: String,
    /// When this node got the certificate (unix seconds, local clock). Servers
    /// backdate `not_before` for clock skew, so the lifetime that matters for
    /// renewal starts at the later of the two.
    pub received_at: i64,
}

/// The node's estimate of the server's time comes from `Date` headers (whole
/// seconds, stamped before the answer travelled) and a certificate's times are whole
/// seconds, while the server judges renewal in milliseconds: asking this long after
/// the computed point keeps a node from being `renewal_not_due` by a second.
pub const RENEWAL_SLACK_SECS: i64 = 2;

impl CertInfo {
    /// The instance the certificate is bound to: the URI SAN, else the CN.
    pub fn instance_id(&self) -> Option<&str> {
        self.instance_uri.as_deref().or(self.common_name.as_deref())
    }

    /// The usable lifetime: from the later of `not_before` and receipt to `not_after`.
    /// A receipt time outside the validity is a clock that was off when the
    /// certificate came (it cannot have arrived before it was issued or after it
    /// expired): then the whole validity counts, never a lifetime of zero that would
    /// have the node renew at every heartbeat.
    pub fn lifetime_seconds(&self) -> i64 {
        let received = Some(self.received_at)
            .filter(|r| (self.not_before..self.not_after).contains(r))
            .unwrap_or(self.not_before);
        self.not_after.saturating_sub(received)
    }

    /// Renew when the server asks, or when a third of the lifetime (or less) is left,
    /// [`RENEWAL_SLACK_SECS`] past that point. `now` is the server's time as the node
    /// estimates it ([`crate::server_time::ServerClock`]), not the node's own clock.
    pub fn renewal_due(&self, now: i64, server_asked: bool) -> bool {
        if server_asked {
            return true;
        }
        let left = self.not_after.saturating_sub(now);
        left.saturating_add(RENEWAL_SLACK_SECS).saturating_mul(3) <= self.lifetime_seconds()
    }

    pub fn expired(&self, now: i64) -> bool {
        now >= self.not_after
    }
}

/// Parses the first certificate of a PEM bundle.
pub fn parse_cert(pem: &str) -> Result<CertInfo, CredentialError> {
    let bad = |e: &dyn std::fmt::Display| CredentialError::Certificate(e.to_string());
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| bad(&e))?;
    let cert = pem.parse_x509().map_err(|e| bad(&e))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let mut instance_uri = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if let Some(id) = uri.strip_prefix(INSTANCE_URI_PREFIX) {
                    instance_uri = Some(id.to_string());
                }
            }
        }
    }
    Ok(CertInfo {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        common_name,
        instance_uri,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
        serial: cert.raw_serial_as_string(),
        received_at: unix_now(),
    })
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Everything a node needs for mTLS: its key, its certificate, the CA it pins.
#[derive(Debug)]
pub struct Credentials {
    pub key: NodeKey,
    pub cert_pem: String,
    pub ca_pem: String,
    pub info: CertInfo,
}

impl Credentials {
    /// Checks that the certificate carries this key and names this instance.
    pub fn new(
        key: NodeKey,
        cert_pem: String,
        ca_pem: String,
        instance_id: &str,
    ) -> Result<Self, CredentialError> {
        let info = parse_cert(&cert_pem)?;
        if info.public_key != key.public_key() {
            return Err(CredentialError::Certificate(
                "it does not carry the node's public key".into(),
            ));
        }
        if info.instance_id() != Some(instance_id) {
            return Err(CredentialError::Certificate(format!(
                "it names instance {:?}, not {instance_id:?}",
                info.instance_id()
            )));
        }
        Ok(Self {
            key,
            cert_pem,
            ca_pem,
            info,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Signs `csr_pem` with a throwaway CA, as the server would.
    pub(crate) fn sign(csr_pem: &str, lifetime_secs: i64) -> (String, String) {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now;
        csr.params.not_after = now + time::Duration::seconds(lifetime_secs);
        let cert = csr.signed_by(&issuer).unwrap();
        (cert.pem(), ca.pem())
    }

    #[test]
    fn key_pem_round_trip() {
        let key = NodeKey::generate().unwrap();
        let pem = key.to_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let back = NodeKey::from_pem(&pem).unwrap();
        assert_eq!(back.public_key(), key.public_key());
        assert!(NodeKey::from_pem("garbage").is_err());
        assert_ne!(NodeKey::generate().unwrap().public_key(), key.public_key());
    }

    #[test]
    fn csr_binds_key_and_instance() {
        let key = NodeKey::from_seed([7; 32]);
        let csr = key.csr_pem("inst-42").unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let (cert, ca) = sign(&csr, 3600);
        let creds = Credentials::new(key, cert, ca, "inst-42").unwrap();
        assert_eq!(creds.info.common_name.as_deref(), Some("inst-42"));
        assert_eq!(creds.info.instance_uri.as_deref(), Some("inst-42"));
        // `sign` does not backdate, so the lifetime is the full validity.
        assert!((3599..=3600).contains(&creds.info.lifetime_seconds()));
        // The same certificate with another key or instance is refused.
        let other = NodeKey::from_seed([8; 32]);
        assert!(Credentials::new(
            other,
            creds.cert_pem.clone(),
            creds.ca_pem.clone(),
            "inst-42"
        )
        .is_err());
        let key = NodeKey::from_seed([7; 32]);
        assert!(
            Credentials::new(key, creds.cert_pem.clone(), creds.ca_pem.clone(), "inst-43").is_err()
        );
        assert!(parse_cert("not a cert").is_err());
    }

    #[test]
    fn renewal_at_a_third_of_lifetime_or_on_request() {
        let info = CertInfo {
            not_before: 1000,
            not_after: 1900,
            common_name: None,
            instance_uri: None,
            public_key: vec![],
            serial: String::new(),
            received_at: 0,
        };
        assert!(!info.renewal_due(1000, false));
        assert!(!info.renewal_due(1601, false));
        assert!(
            info.renewal_due(1602, false),
            "300 of 900 s left, and the slack"
        );
        assert!(info.renewal_due(2000, false));
        assert!(info.renewal_due(1000, true));
        assert!(!info.expired(1899));
        assert!(info.expired(1900));
        // A certificate backdated 60 s for clock skew: its life starts at receipt,
        // so it is not renewed at once.
        let backdated = CertInfo {
            not_before: 940,
            received_at: 1000,
            ..info.clone()
        };
        assert_eq!(backdated.lifetime_seconds(), 900);
        assert!(!backdated.renewal_due(1001, false));
        assert!(backdated.renewal_due(1602, false));
        // A receipt time past expiry (a node clock hours ahead) neither makes the
        // lifetime negative nor zero (which would renew at every heartbeat): the
        // whole validity counts. Same for a clock hours behind.
        for received_at in [5000, 1900, -20_000] {
            let odd = CertInfo {
                received_at,
                ..info.clone()
            };
            assert_eq!(odd.lifetime_seconds(), 900, "received at {received_at}");
            assert!(!odd.renewal_due(1100, false), "received at {received_at}");
            assert!(odd.renewal_due(1602, false), "received at {received_at}");
        }
    }
}
