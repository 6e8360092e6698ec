//! The control-plane client: JSON over HTTPS that trusts only the CA from the
//! identity document (never the system roots), with the node's client certificate
//! once it has one. TLS is rustls with the ring provider.
//!
//! Every refusal is parsed into its stable error code, so the caller can tell a
//! node that must stop for good ([`ClientError::terminal_code`]) from a transient
//! failure to retry. Response bodies are bounded; server input never panics.

use std::sync::Arc;
use std::time::Duration;

use powernode_proto::{ErrorBody, ErrorCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::credentials::Credentials;
use crate::server_time::ServerClock;

/// Largest response body the agent reads.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("{method} {path} refused with HTTP {status} `{code}`: {message}")]
    Refused {
        method: &'static str,
        path: String,
        status: u16,
        code: ErrorCode,
        message: String,
    },
    #[error("{method} {path} answered HTTP {status} without an error body: {snippet}")]
    UnexpectedStatus {
        method: &'static str,
        path: String,
        status: u16,
        snippet: String,
    },
    #[error("{method} {path} failed in transport")]
    Transport {
        method: &'static str,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {path} answered more than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge { method: &'static str, path: String },
    #[error("{method} {path} answered a body that does not decode")]
    Decode {
        method: &'static str,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The code when the server refused with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// `Some(code)` when the node must stop for good (revoked, terminated, token
    /// spent): retrying cannot help.
    pub fn terminal_code(&self) -> Option<ErrorCode> {
        self.code().filter(|c| c.is_terminal_for_node())
    }

    /// The best stable code for reporting this failure upstream.
    pub fn report_code(&self) -> ErrorCode {
        match self {
            Self::Refused { code, .. } => *code,
            Self::Transport { .. } | Self::Tls(_) => ErrorCode::Network,
            _ => ErrorCode::Internal,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(ca_pem: &str) -> Result<rustls::RootCertStore, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut reader = ca_pem.as_bytes();
    for cert in rustls_pemfile::certs(&mut reader) {
        let cert = cert.map_err(|e| ClientError::Tls(format!("CA PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ClientError::Tls(format!("CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Tls(
            "the pinned CA PEM holds no certificate".into(),
        ));
    }
    Ok(roots)
}

/// rustls client config pinning `ca_pem`, with the node's certificate if given.
pub fn tls_config(
    ca_pem: &str,
    creds: Option<&Credentials>,
) -> Result<rustls::ClientConfig, ClientError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(root_store(ca_pem)?);
    match creds {
        None => Ok(builder.with_no_client_auth()),
        Some(c) => {
            let mut reader = c.cert_pem.as_bytes();
            let chain = rustls_pemfile::certs(&mut reader)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ClientError::Tls(format!("client certificate PEM: {e}")))?;
            let der = c
                .key
                .pkcs8_der()
                .map_err(|e| ClientError::Tls(e.to_string()))?;
            let key = rustls::pki_types::PrivateKeyDer::Pkcs8(der.to_vec().into());
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::Tls(format!("client certificate: {e}")))
        }
    }
}

/// Timeouts; tests shorten them.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            request: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
    /// Fed by every answer's `Date`; shared with the clients that replace this one.
    clock: Arc<ServerClock>,
}

impl ApiClient {
    /// A client for `base_url` pinning `ca_pem`; mTLS when `creds` is given.
    pub fn new(
        base_url: &str,
        ca_pem: &str,
        creds: Option<&Credentials>,
        timeouts: Timeouts,
    ) -> Result<Self, ClientError> {
        let tls = tls_config(ca_pem, creds)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.request)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("powernode-agent/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .build()
            .map_err(|e| ClientError::Tls(crate::error_chain(&e)))?;
        Ok(Self {
            base: base_url.trim_end_matches('/').to_string(),
            http,
            clock: Arc::default(),
        })
    }

    /// This client, feeding `clock` (a renewed client keeps its predecessor's).
    pub fn with_server_clock(mut self, clock: Arc<ServerClock>) -> Self {
        self.clock = clock;
        self
    }

    /// The server's clock as the answers' `Date` headers tell it.
    pub fn server_clock(&self) -> &Arc<ServerClock> {
        &self.clock
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub async fn post<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
    ) -> Result<Resp, ClientError> {
        let req = self.http.post(format!("{}{path}", self.base)).json(body);
        self.send("POST", path, req).await
    }

    /// [`Self::post`] with its own whole-request timeout (a long poll outlives the
    /// client's usual one).
    pub async fn post_with_timeout<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
        timeout: std::time::Duration,
    ) -> Result<Resp, ClientError> {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .timeout(timeout);
        self.send("POST", path, req).await
    }

    pub async fn get<Resp: DeserializeOwned>(&self, path: &str) -> Result<Resp, ClientError> {
        let req = self.http.get(format!("{}{path}", self.base));
        self.send("GET", path, req).await
    }

    async fn send<Resp: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<Resp, ClientError> {
        let transport = |source| ClientError::Transport {
            method,
            path: path.to_string(),
            source,
        };
        let sent = std::time::Instant::now();
        let mut resp = req.send().await.map_err(transport)?;
        if let Some(date) = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|d| d.to_str().ok())
        {
            self.clock.observe(date, sent, std::time::Instant::now());
        }
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(ClientError::TooLarge {
                    method,
                    path: path.to_string(),
                });
            }
            body.extend_from_slice(&chunk);
        }
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|source| ClientError::Decode {
                method,
                path: path.to_string(),
                source,
            });
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => Err(ClientError::Refused {
                method,
                path: path.to_string(),
                status: status.as_u16(),
                code: e.error.code,
                message: e.error.message,
            }),
            Err(_) => Err(ClientError::UnexpectedStatus {
                method,
                path: path.to_string(),
                status: status.as_u16(),
                snippet: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    struct Pki {
        ca_pem: String,
        cert_der: Vec<u8>,
        key_der: Vec<u8>,
    }

    /// A CA and a server certificate for 127.0.0.1 signed by it.
    fn pki() -> Pki {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        Pki {
            ca_pem: ca.pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }

    /// Serves `response` (raw HTTP) to every connection on 127.0.0.1:0.
    async fn serve(pki: &Pki, response: Vec<u8>) -> String {
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![pki.cert_der.clone().into()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(pki.key_der.clone().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let response = response.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 16 * 1024];
                    let _ = tls.read(&mut buf).await;
                    let _ = tls.write_all(&response).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        format!("https://{addr}")
    }

    fn http(status: &str, body: &[u8]) -> Vec<u8> {
        http_dated(status, body, None)
    }

    fn http_dated(status: &str, body: &[u8], date: Option<&str>) -> Vec<u8> {
        let date = date.map(|d| format!("date: {d}\r\n")).unwrap_or_default();
        let mut r = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{date}connection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    #[tokio::test]
    async fn every_answer_s_date_feeds_the_server_clock_also_a_refusal() {
        let pki = pki();
        // The server is five hours ahead of this machine.
        let ahead = std::time::SystemTime::now() + Duration::from_secs(5 * 3600);
        let date = httpdate::fmt_http_date(ahead);
        let expired =
            serde_json::to_vec(&ErrorBody::new(ErrorCode::CertificateExpired, "old")).unwrap();
        let url = serve(&pki, http_dated("401 Unauthorized", &expired, Some(&date))).await;
        let client = ApiClient::new(&url, &pki.ca_pem, None, timeouts()).unwrap();
        assert_eq!(client.server_clock().offset_ms(), None);
        let err = client.get::<serde_json::Value>("/x").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::CertificateExpired));
        assert_eq!(
            err.terminal_code(),
            None,
            "an expired certificate is not final"
        );
        let offset = client.server_clock().offset_ms().unwrap();
        assert!(
            (5 * 3600 - 2) * 1000 < offset && offset < (5 * 3600 + 2) * 1000,
            "{offset}"
        );
        // A client that replaces it keeps the estimate.
        let next = ApiClient::new(&url, &pki.ca_pem, None, timeouts())
            .unwrap()
            .with_server_clock(client.server_clock().clone());
        assert!(next.server_clock().offset_ms().is_some());
    }

    fn timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn refusals_are_typed_and_garbage_is_an_error() {
        let pki = pki();
        let revoked =
            serde_json::to_vec(&ErrorBody::new(ErrorCode::CertificateRevoked, "gone")).unwrap();
        let url = serve(&pki, http("401 Unauthorized", &revoked)).await;
        let client = ApiClient::new(&url, &pki.ca_pem, None, timeouts()).unwrap();
        let err = client.get::<serde_json::Value>("/x").await.unwrap_err();
        assert_eq!(
            err.terminal_code(),
            Some(ErrorCode::CertificateRevoked),
            "{err}"
        );

        let url = serve(
            &pki,
            http("500 Internal Server Error", b"<html>oops</html>"),
        )
        .await;
        let client = ApiClient::new(&url, &pki.ca_pem, None, timeouts()).unwrap();
        let err = client.get::<serde_json::Value>("/x").await.unwrap_err();
        assert!(
            matches!(err, ClientError::UnexpectedStatus { status: 500, .. }),
            "{err}"
        );
        assert_eq!(err.terminal_code(), None);

        let url = serve(&pki, http("200 OK", b"{\"truncated\":")).await;
        let client = ApiClient::new(&url, &pki.ca_pem, None, timeouts()).unwrap();
        let err = client.get::<serde_json::Value>("/x").await.unwrap_err();
        assert!(matches!(err, ClientError::Decode { .. }), "{err}");

        let huge = vec![b' '; MAX_RESPONSE_BYTES + 10];
        let url = serve(&pki, http("200 OK", &huge)).await;
        let client = ApiClient::new(&url, &pki.ca_pem, None, timeouts()).unwrap();
        let err = client.get::<serde_json::Value>("/x").await.unwrap_err();
        assert!(matches!(err, ClientError::TooLarge { .. }), "{err}");

        let url = serve(&pki, http("200 OK", b"{\"ok\":true}")).await;
        let client = ApiClient::new(&url, &pki.ca_pem, None, timeouts()).unwrap();
        let v: serde_json::Value = client.get("/x").await.unwrap();
        assert_eq!(v["ok"], true);
    }

    #[tokio::test]
    async fn only_the_pinned_ca_is_trusted() {
        let server_pki = pki();
        let other = pki();
        let url = serve(&server_pki, http("200 OK", b"{}")).await;
        let client = ApiClient::new(&url, &other.ca_pem, None, timeouts()).unwrap();
        let err = client.get::<serde_json::Value>("/x").await.unwrap_err();
        assert!(matches!(err, ClientError::Transport { .. }), "{err}");
        assert_eq!(err.report_code(), ErrorCode::Network);
        assert!(matches!(
            ApiClient::new(&url, "no pem here", None, timeouts()),
            Err(ClientError::Tls(_))
        ));
    }
}
