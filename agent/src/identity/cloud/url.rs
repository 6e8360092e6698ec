//! The generic source: `powernode.identity_url=<URL>` on the command line names
//! where the identity document is fetched from, for clouds without a provider
//! here and for bare metal with a provisioning server.
//!
//! The URL's presence on the command line is the source's presence, so every
//! failure is an error, 404 included (the operator named a document that is not
//! there). Redirects are followed (at most 5).
//!
//! Trust for `https://` (the decision, stated once here):
//! - `powernode.identity_url_ca_b64=<base64url PEM>` pins that CA and trusts
//!   nothing else, like the control-plane client does with the document's CA;
//! - without it, the system bundle (`/etc/ssl/certs/ca-certificates.crt`) when the
//!   image carries one;
//! - with neither, the source refuses to run: the image ships no public roots, and
//!   a document that hands out a bootstrap token must not be fetched unverified.
//!
//! `http://` is accepted, as every metadata service is plain HTTP on a link-local
//! address; use it only on a network you trust.

use base64::Engine as _;
use powernode_proto::identity::MAX_IDENTITY_BYTES;

use super::http::Fetcher;
use super::{CloudFuture, CloudProvider, Dmi, ProviderFacts, SourceError, SourceErrorKind};

pub const NAME: &str = "url";
/// The system bundle used for HTTPS when no CA is pinned.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Clone, Default)]
pub struct UrlSource {
    url: Option<String>,
    ca_pem: Option<String>,
    system_bundle: Option<std::path::PathBuf>,
}

fn config_error(what: &str, reason: impl Into<String>) -> SourceError {
    SourceError::new(
        NAME,
        SourceErrorKind::Config {
            what: what.to_string(),
            reason: reason.into(),
        },
    )
}

impl UrlSource {
    /// A source for `url`, pinning `ca_pem` for HTTPS when given.
    pub fn new(url: impl Into<String>, ca_pem: Option<String>) -> Self {
        Self {
            url: Some(url.into()),
            ca_pem,
            system_bundle: Some(SYSTEM_BUNDLE.into()),
        }
    }

    /// Another system bundle path (tests), `None` for none.
    pub fn with_system_bundle(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.system_bundle = path;
        self
    }

    /// From the command line: absent (never asked) when it has no
    /// `powernode.identity_url=`. The last occurrence of a key wins.
    pub fn from_cmdline(cmdline: &str) -> Result<Self, SourceError> {
        let params = powernode_sysfmt::cmdline::split_params(cmdline);
        let last = |key: &str| {
            params
                .iter()
                .filter(|(k, _)| k == key)
                .filter_map(|(_, v)| v.clone())
                .next_back()
        };
        let Some(url) = last("powernode.identity_url") else {
            return Ok(Self::default());
        };
        let ca_pem = match last("powernode.identity_url_ca_b64") {
            None => None,
            Some(b64) => {
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(b64.trim_end_matches('='))
                    .map_err(|_| {
                        config_error("powernode.identity_url_ca_b64", "is not valid base64url")
                    })?;
                Some(String::from_utf8(bytes).map_err(|_| {
                    config_error("powernode.identity_url_ca_b64", "is not PEM text")
                })?)
            }
        };
        Ok(Self::new(url, ca_pem))
    }

    pub fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    fn parsed(&self) -> Result<Option<reqwest::Url>, SourceError> {
        let Some(text) = &self.url else {
            return Ok(None);
        };
        let url = reqwest::Url::parse(text)
            .map_err(|e| config_error("powernode.identity_url", format!("{text:?}: {e}")))?;
        match url.scheme() {
            "http" | "https" if url.host_str().is_some() => Ok(Some(url)),
            _ => Err(config_error(
                "powernode.identity_url",
                format!("{text:?} is not an http:// or https:// URL with a host"),
            )),
        }
    }

    async fn read(
        &self,
        http: &Fetcher,
    ) -> Result<Option<(powernode_proto::IdentityDocument, ProviderFacts)>, SourceError> {
        let Some(url) = self.parsed()? else {
            return Ok(None);
        };
        let body = http
            .get(url.as_str(), &[], MAX_IDENTITY_BYTES)
            .await?
            .ok_or_else(|| {
                http.error(SourceErrorKind::HttpStatus {
                    method: "GET",
                    url: url.to_string(),
                    status: 404,
                    detail: "the identity URL on the command line names no document".into(),
                })
            })?;
        let document = super::parse_user_data(NAME, &body)?.ok_or_else(|| {
            http.field_error("(document)", format!("{url} answered an empty body"))
        })?;
        Ok(Some((
            document,
            ProviderFacts {
                provider: NAME.to_string(),
                ..Default::default()
            },
        )))
    }
}

/// Root store from PEM text, refusing text that holds no certificate.
fn roots(pem: &str, what: &str) -> Result<rustls::RootCertStore, SourceError> {
    let mut store = rustls::RootCertStore::empty();
    let mut reader = pem.as_bytes();
    for cert in rustls_pemfile::certs(&mut reader) {
        let cert = cert.map_err(|e| config_error(what, format!("bad PEM: {e}")))?;
        // A bundle may carry certificates webpki cannot use; skip those, as
        // reqwest's own bundle loading does.
        let _ = store.add(cert);
    }
    if store.is_empty() {
        return Err(config_error(what, "holds no usable certificate"));
    }
    Ok(store)
}

impl CloudProvider for UrlSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn detect(&self, _dmi: &Dmi) -> bool {
        self.url.is_some()
    }

    fn fetch<'a>(&'a self, http: &'a Fetcher) -> CloudFuture<'a> {
        Box::pin(self.read(http))
    }

    fn tls(&self) -> Result<Option<rustls::ClientConfig>, SourceError> {
        let Some(url) = self.parsed()? else {
            return Ok(None);
        };
        if url.scheme() != "https" {
            return Ok(None);
        }
        let store = match (&self.ca_pem, &self.system_bundle) {
            (Some(pem), _) => roots(pem, "powernode.identity_url_ca_b64")?,
            (None, Some(bundle)) => match std::fs::read_to_string(bundle) {
                Ok(pem) => roots(&pem, &bundle.display().to_string())?,
                Err(e) => {
                    return Err(config_error(
                        "powernode.identity_url",
                        format!(
                            "is https:// but no CA is pinned (powernode.identity_url_ca_b64=) \
                             and the system bundle {} cannot be read: {e}",
                            bundle.display()
                        ),
                    ))
                }
            },
            (None, None) => {
                return Err(config_error(
                    "powernode.identity_url",
                    "is https:// but no CA is pinned (powernode.identity_url_ca_b64=)",
                ))
            }
        };
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error("TLS", e.to_string()))?
            .with_root_certificates(store)
            .with_no_client_auth();
        Ok(Some(config))
    }

    fn follow_redirects(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_forms() {
        let s = UrlSource::from_cmdline("quiet").unwrap();
        assert!(s.url().is_none());
        assert!(!s.detect(&Dmi::default()));
        let s = UrlSource::from_cmdline("powernode.identity_url=http://10.0.0.1/id.json").unwrap();
        assert_eq!(s.url(), Some("http://10.0.0.1/id.json"));
        assert!(s.detect(&Dmi::default()));
        assert!(s.tls().unwrap().is_none());
        let err =
            UrlSource::from_cmdline("powernode.identity_url=x powernode.identity_url_ca_b64=!!")
                .unwrap_err();
        assert!(crate::error_chain(&err).contains("identity_url_ca_b64"));
    }

    #[test]
    fn bad_urls_and_https_without_trust_are_errors() {
        let err = UrlSource::new("ftp://host/x", None).parsed().unwrap_err();
        assert!(crate::error_chain(&err).contains("http://"), "{err}");
        assert!(UrlSource::new("not a url", None).parsed().is_err());
        let s = UrlSource::new("https://example.invalid/id", None).with_system_bundle(None);
        let err = s.tls().unwrap_err();
        assert!(crate::error_chain(&err).contains("no CA is pinned"));
        let s = UrlSource::new("https://example.invalid/id", Some("not pem".into()));
        assert!(s.tls().is_err());
    }
}
