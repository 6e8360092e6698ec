//! The admin API client of the CLI: the admin token and the CA to pin come from the
//! server's data directory.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use serde_json::Value;

/// An admin API client pinned to the stub's CA.
#[derive(Debug, Clone)]
pub struct AdminClient {
    pub(super) http: reqwest::Client,
    pub(super) base: String,
    pub(super) token: String,
}

impl AdminClient {
    /// Token from `DIR/admin-token`, CA from `DIR/ca.pem`, URL from `server` or
    /// `DIR/server-url`.
    pub fn from_data_dir(dir: &Path, server: Option<&str>) -> anyhow::Result<Self> {
        let token_path = dir.join(crate::server::ADMIN_TOKEN_FILE);
        let token = std::fs::read_to_string(&token_path)
            .with_context(|| format!("reading {}", token_path.display()))?
            .trim()
            .to_string();
        let ca_path = dir.join(crate::ca::CA_CERT_FILE);
        let ca_pem = std::fs::read_to_string(&ca_path)
            .with_context(|| format!("reading {}", ca_path.display()))?;
        let base = match server {
            Some(s) => s.to_string(),
            None => {
                let p = dir.join(crate::server::SERVER_URL_FILE);
                std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {} (or pass --server)", p.display()))?
                    .trim()
                    .to_string()
            }
        };
        Ok(Self {
            http: pinned_client(&ca_pem, None)?,
            base: base.trim_end_matches('/').to_string(),
            token,
        })
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(reqwest::StatusCode, String)> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("calling {url}"))?;
        let status = resp.status();
        let text = resp.text().await.context("reading the answer")?;
        Ok((status, text))
    }
}

/// A reqwest client that trusts only `ca_pem` (ring provider), optionally with a
/// client certificate (`cert_pem`, `key_pem`).
pub fn pinned_client(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> anyhow::Result<reqwest::Client> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::ca::pem_certs(ca_pem) {
        roots.add(cert).context("adding the CA certificate")?;
    }
    if roots.is_empty() {
        bail!("the CA PEM holds no certificate");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots);
    let mut tls = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let certs = crate::ca::pem_certs(cert_pem);
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .context("parsing the client key")?;
            builder
                .with_client_auth_cert(certs, key)
                .context("client certificate")?
        }
    };
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .context("building the HTTP client")
}
