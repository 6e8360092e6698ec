//! The stub's certificate authority: created on first start and kept in the data
//! directory, it signs the server certificate (fresh at every start) and the node
//! client certificates (from Ed25519 CSRs). It also validates a presented client
//! chain at the application layer, so a foreign certificate is a JSON 401, not a TLS
//! alert.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData as _, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use sha2::Digest as _;
use time::OffsetDateTime;

use crate::clock::Millis;
use powernode_proto::node::INSTANCE_URI_PREFIX;

pub const CA_CERT_FILE: &str = "ca.pem";
/// Node certificates start this long before they are issued, for clock skew
/// between node and control plane; their usable lifetime starts at issue.
pub const BACKDATE_MS: i64 = 60_000;
pub const CA_KEY_FILE: &str = "ca-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation failed")]
    Rcgen(#[from] rcgen::Error),
    #[error("stored CA in {0} is unusable")]
    BadStoredCa(PathBuf),
    #[error("TLS verifier setup failed: {0}")]
    Verifier(String),
}

/// Why a CSR was refused (answered as `csr_invalid` / `csr_instance_mismatch`).
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is not a valid, self-signed PEM PKCS#10 request")]
    Unparsable(#[source] rcgen::Error),
    #[error("CSR key must be Ed25519")]
    NotEd25519,
    #[error("CSR subject has no common name")]
    NoCommonName,
    #[error("CSR subject CN {found:?} is not instance {expected:?}")]
    WrongInstance { found: String, expected: String },
    #[error("CSR key is not the key of the certificate it re-enrolls")]
    WrongKey,
    #[error("signing the certificate failed")]
    Sign(#[source] rcgen::Error),
}

/// Why a presented client certificate is not acceptable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientCertError {
    #[error("certificate chain does not verify against the control-plane CA: {0}")]
    Chain(String),
    #[error("certificate is not bound to an instance (no {INSTANCE_URI_PREFIX} URI SAN)")]
    NotBound,
    #[error("certificate cannot be parsed")]
    Parse,
}

/// A certificate the CA issued to a node.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub serial: String,
    /// SHA-256 (hex) of the certified public key (the raw Ed25519 key).
    pub key_sha256: String,
    pub not_before_ms: Millis,
    pub not_after_ms: Millis,
}

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub instance_id: String,
    pub serial: String,
    pub not_before_ms: Millis,
    pub not_after_ms: Millis,
    /// The raw subject public key (32 bytes for Ed25519).
    pub public_key: Vec<u8>,
}

impl ClientIdentity {
    /// Whether less than a third of the usable lifetime (from issue, not from the
    /// backdated `not_before`) is left: the node should renew now.
    pub fn renewal_due(&self, now_ms: Millis) -> bool {
        let issued = (self.not_before_ms + BACKDATE_MS).min(self.not_after_ms);
        let lifetime = (self.not_after_ms - issued).max(1);
        (self.not_after_ms - now_ms).saturating_mul(3) <= lifetime
    }
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Ca {
    /// Loads the CA from `dir`, or creates and stores one (key file 0600). Creation
    /// is first-writer-wins (hard link of `ca.pem`), so two servers started on one
    /// empty directory end up with the same CA instead of each overwriting the other.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if cert_path.exists() {
            return Self::load(&cert_path, &key_path);
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Powernode stub CA");
        dn.push(DnType::OrganizationName, "Powernode");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let unique = format!("{}.{:016x}", std::process::id(), rand::random::<u64>());
        let tmp_key = dir.join(format!(".{CA_KEY_FILE}.{unique}"));
        let tmp_cert = dir.join(format!(".{CA_CERT_FILE}.{unique}"));
        write_private(&tmp_key, key.serialize_pem().as_bytes())?;
        std::fs::write(&tmp_cert, &cert_pem).map_err(io_err(&tmp_cert))?;
        let won = std::fs::hard_link(&tmp_cert, &cert_path);
        let _ = std::fs::remove_file(&tmp_cert);
        match won {
            Ok(()) => {
                std::fs::rename(&tmp_key, &key_path).map_err(io_err(&key_path))?;
                Self::from_parts(Issuer::new(params, key), cert_pem)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let _ = std::fs::remove_file(&tmp_key);
                Self::load(&cert_path, &key_path)
            }
            Err(e) => Err(CaError::Io {
                path: cert_path,
                source: e,
            }),
        }
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        // Another process may have linked ca.pem and not yet renamed its key in.
        let mut tries = 0;
        while !key_path.exists() && tries < 40 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            tries += 1;
        }
        let key_pem = std::fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let cert_pem = std::fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|_| CaError::BadStoredCa(key_path.to_path_buf()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|_| CaError::BadStoredCa(cert_path.to_path_buf()))?;
        Self::from_parts(issuer, cert_pem)
    }

    fn from_parts(issuer: Issuer<'static, KeyPair>, cert_pem: String) -> Result<Self, CaError> {
        let cert_der = pem_certs(&cert_pem)
            .into_iter()
            .next()
            .ok_or_else(|| CaError::Verifier("CA PEM holds no certificate".into()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(cert_der.clone())
            .map_err(|e| CaError::Verifier(e.to_string()))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| CaError::Verifier(e.to_string()))?;
        Ok(Self {
            issuer,
            cert_pem,
            cert_der,
            verifier,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A fresh server certificate for this start, covering `names` (DNS names or IP
    /// addresses).
    pub fn server_cert(
        &self,
        names: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for name in names {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into()?),
            };
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        params
            .distinguished_name
            .push(DnType::CommonName, "powernode-stub");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key_der))
    }

    /// Signs a node certificate for `instance_id` from an Ed25519 CSR whose subject
    /// CN must be that instance id.
    pub fn issue_node_cert(
        &self,
        csr_pem: &str,
        instance_id: &str,
        now_ms: Millis,
        ttl_seconds: u64,
    ) -> Result<IssuedCert, CsrError> {
        let checked = checked_csr(csr_pem, instance_id)?;
        self.sign_node_cert(checked, instance_id, now_ms, ttl_seconds)
    }

    /// [`Ca::issue_node_cert`] for a CSR that must carry `public_key`: the key of
    /// the (expired) certificate it re-enrolls, so the holder keeps its key.
    pub fn reissue_node_cert(
        &self,
        csr_pem: &str,
        instance_id: &str,
        public_key: &[u8],
        now_ms: Millis,
        ttl_seconds: u64,
    ) -> Result<IssuedCert, CsrError> {
        let checked = checked_csr(csr_pem, instance_id)?;
        if rcgen::PublicKeyData::der_bytes(&checked.0.public_key) != public_key {
            return Err(CsrError::WrongKey);
        }
        self.sign_node_cert(checked, instance_id, now_ms, ttl_seconds)
    }

    fn sign_node_cert(
        &self,
        (csr, key_sha256): (CertificateSigningRequestParams, String),
        instance_id: &str,
        now_ms: Millis,
        ttl_seconds: u64,
    ) -> Result<IssuedCert, CsrError> {
        let mut serial = [0u8; 16];
        rand::Rng::fill(&mut rand::thread_rng(), &mut serial[..]);
        // Positive and without a leading zero byte, so the hex form is stable when the
        // certificate is parsed back.
        serial[0] = 0x10 | (serial[0] & 0x6f);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, instance_id);
        params.distinguished_name = dn;
        let uri = format!("{INSTANCE_URI_PREFIX}{instance_id}");
        params.subject_alt_names = vec![SanType::URI(
            uri.try_into()
                .map_err(|e: rcgen::Error| CsrError::Sign(e))?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        // Backdate a little for clock skew between node and control plane.
        let not_before_ms = now_ms - BACKDATE_MS;
        let not_after_ms = now_ms + (ttl_seconds as i64) * 1000;
        params.not_before = ms_to_datetime(not_before_ms);
        params.not_after = ms_to_datetime(not_after_ms);
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(CsrError::Sign)?;
        Ok(IssuedCert {
            pem: cert.pem(),
            serial: hex::encode(serial),
            key_sha256,
            not_before_ms: not_before_ms.div_euclid(1000) * 1000,
            not_after_ms: not_after_ms.div_euclid(1000) * 1000,
        })
    }

    /// Validates a presented chain (leaf first) against this CA, and reads the
    /// instance binding, serial and validity out of the leaf. The signatures are
    /// checked at `now_ms` clamped into the leaf's validity, so an expired (or, after
    /// a clock step back, not yet valid) certificate of ours still verifies: the
    /// caller decides what its dates mean (`certificate_expired`, reissue) and the
    /// serial is checked against the certificates this server issued.
    pub fn verify_client(
        &self,
        chain: &[CertificateDer<'static>],
        now_ms: Millis,
    ) -> Result<ClientIdentity, ClientCertError> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| ClientCertError::Chain("empty chain".into()))?;
        let ident = parse_client_leaf(leaf)?;
        // min then max, not clamp: a foreign leaf may have its dates reversed.
        let at_ms = now_ms
            .min(ident.not_after_ms.saturating_sub(1000))
            .max(ident.not_before_ms);
        let at = UnixTime::since_unix_epoch(Duration::from_millis(at_ms.max(0) as u64));
        self.verifier
            .verify_client_cert(leaf, intermediates, at)
            .map_err(|e| ClientCertError::Chain(e.to_string()))?;
        Ok(ident)
    }

    /// [`Ca::verify_client`] for a certificate sent as PEM (a reissue body).
    pub fn verify_client_pem(
        &self,
        pem: &str,
        now_ms: Millis,
    ) -> Result<ClientIdentity, ClientCertError> {
        let chain = pem_certs(pem);
        if chain.is_empty() {
            return Err(ClientCertError::Parse);
        }
        self.verify_client(&chain, now_ms)
    }
}

/// Reads instance binding, serial and validity from a leaf certificate.
pub fn parse_client_leaf(leaf: &CertificateDer<'_>) -> Result<ClientIdentity, ClientCertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|_| ClientCertError::Parse)?;
    let mut instance_id = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if let Some(id) = uri.strip_prefix(INSTANCE_URI_PREFIX) {
                    instance_id = Some(id.to_string());
                }
            }
        }
    }
    let instance_id = instance_id.ok_or(ClientCertError::NotBound)?;
    Ok(ClientIdentity {
        instance_id,
        serial: hex::encode(cert.raw_serial()),
        not_before_ms: cert.validity().not_before.timestamp() * 1000,
        not_after_ms: cert.validity().not_after.timestamp() * 1000,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

/// Checks a CSR as [`Ca::issue_node_cert`] does (self-signed, Ed25519, CN =
/// `instance_id`) and returns the SHA-256 (hex) of its public key, without issuing:
/// how a repeated enrollment is recognised.
pub fn csr_key_sha256(csr_pem: &str, instance_id: &str) -> Result<String, CsrError> {
    checked_csr(csr_pem, instance_id).map(|(_, key)| key)
}

fn checked_csr(
    csr_pem: &str,
    instance_id: &str,
) -> Result<(CertificateSigningRequestParams, String), CsrError> {
    let csr = parse_csr(csr_pem)?;
    let cn = csr_common_name(&csr).ok_or(CsrError::NoCommonName)?;
    if cn != instance_id {
        return Err(CsrError::WrongInstance {
            found: cn,
            expected: instance_id.to_string(),
        });
    }
    let key = hex::encode(sha2::Sha256::digest(csr.public_key.der_bytes()));
    Ok((csr, key))
}

fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, CsrError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CsrError::Unparsable)?;
    if csr.public_key.algorithm() != &rcgen::PKCS_ED25519 {
        return Err(CsrError::NotEd25519);
    }
    Ok(csr)
}

fn csr_common_name(csr: &CertificateSigningRequestParams) -> Option<String> {
    match csr.params.distinguished_name.get(&DnType::CommonName)? {
        DnValue::Utf8String(s) => Some(s.clone()),
        DnValue::PrintableString(s) => Some(s.as_str().to_string()),
        DnValue::Ia5String(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn ms_to_datetime(ms: Millis) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// All certificates in a PEM text.
pub fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile_certs(pem)
}

fn rustls_pemfile_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// Writes a secret file readable by the owner only.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(contents).map_err(io_err(path))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An Ed25519 CSR for `cn`, as the agent would make it.
    pub fn ed25519_csr(cn: &str) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        let csr = params.serialize_request(&key).unwrap();
        (key, csr.pem().unwrap())
    }

    #[test]
    fn issues_bound_client_cert_and_verifies_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let (_key, csr) = ed25519_csr("inst-1");
        let now = crate::clock::Clock::default().now_ms();
        let issued = ca.issue_node_cert(&csr, "inst-1", now, 3600).unwrap();
        let chain = pem_certs(&issued.pem);
        let id = ca.verify_client(&chain, now).unwrap();
        assert_eq!(id.instance_id, "inst-1");
        assert_eq!(id.serial, issued.serial);
        assert_eq!(id.not_after_ms, issued.not_after_ms);
        // Expired at a later time, and still ours: the caller sees the dates.
        let later = ca.verify_client(&chain, now + 7200 * 1000).unwrap();
        assert!(later.not_after_ms < now + 7200 * 1000);
        assert_eq!(later.serial, issued.serial);
        // Same CA after a reload (and no temporary files left); a different CA
        // refuses it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert!(again.verify_client(&chain, now).is_ok());
        let other_dir = tempfile::tempdir().unwrap();
        let other = Ca::load_or_create(other_dir.path()).unwrap();
        assert!(matches!(
            other.verify_client(&chain, now),
            Err(ClientCertError::Chain(_))
        ));
    }

    #[test]
    fn renewal_is_due_at_a_third_of_the_usable_lifetime() {
        let id = |issued: i64, ttl: i64| ClientIdentity {
            instance_id: "i".into(),
            serial: "01".into(),
            not_before_ms: issued - BACKDATE_MS,
            not_after_ms: issued + ttl,
            public_key: Vec::new(),
        };
        // A 6 s certificate is not due at issue (the backdating must not count).
        let c = id(1_000_000, 6_000);
        assert!(!c.renewal_due(1_000_000));
        assert!(!c.renewal_due(1_003_900));
        assert!(c.renewal_due(1_004_000));
        let c = id(0, 86_400_000);
        assert!(!c.renewal_due(57_000_000));
        assert!(c.renewal_due(57_600_000));
    }

    #[test]
    fn server_cert_covers_every_name_and_chains_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let names: Vec<String> = [
            "localhost",
            "127.0.0.1",
            "::1",
            "10.0.2.2",
            "cp.example.test",
            "localhost",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (chain, _key) = ca.server_cert(&names).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(&chain[1], ca.cert_der());
        let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let got: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                    4 => std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string(),
                    _ => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap()).to_string(),
                },
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                "localhost",
                "127.0.0.1",
                "::1",
                "10.0.2.2",
                "cp.example.test"
            ]
        );
    }

    #[test]
    fn concurrent_first_starts_agree_on_one_ca() {
        let dir = tempfile::tempdir().unwrap();
        let cas: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        Ca::load_or_create(dir.path())
                            .unwrap()
                            .cert_pem()
                            .to_string()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let on_disk = std::fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap();
        assert!(cas.iter().all(|c| *c == on_disk));
    }

    #[test]
    fn refuses_bad_csrs() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let (_k, csr) = ed25519_csr("inst-2");
        assert!(matches!(
            ca.issue_node_cert(&csr, "inst-1", 0, 60),
            Err(CsrError::WrongInstance { .. })
        ));
        assert!(matches!(
            ca.issue_node_cert("garbage", "inst-1", 0, 60),
            Err(CsrError::Unparsable(_))
        ));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "inst-1");
        let p256 = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(matches!(
            ca.issue_node_cert(&p256, "inst-1", 0, 60),
            Err(CsrError::NotEd25519)
        ));
    }
}
