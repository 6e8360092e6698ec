//! A small OCI distribution-spec client (pull side only): manifests by pinned digest or
//! tag, blobs as streams hashed while they arrive, optional bearer-token challenge.
//!
//! Why not `oci-client`: it pins its own reqwest (0.12) and TLS features, so it would
//! add a second HTTP stack next to the agent's reqwest 0.13 + rustls/ring, and its async
//! blob API does not fit the unpacker's streaming `Read`. The pull side of the spec is
//! three GETs; this client is that, over the agent's blocking reqwest with the
//! control-plane CA pinned (the stub embeds the registry on its listener).
//!
//! The control plane's embedded registry serves enrolled nodes only: the client
//! presents the node's certificate ([`NodeCertificate`]) there, and only there. Which
//! registry that is, is decided per request by its `host[:port]` against the control
//! plane URL's, so a module whose repository names another registry never sees the
//! certificate (two reqwest clients, one with it, one without: rustls picks a client
//! certificate without knowing the server's name, so the choice is made before the
//! connection). A refusal (401/403 the client cannot answer) is `registry_unauthorized`,
//! with the registry's reason.
//!
//! It must never return a byte it has not checked: manifests are hashed before they
//! are parsed, blobs as they stream ([`BlobReader`]). Plain HTTP only to loopback, and
//! only when the caller says so (tests).
//!
//! Nothing may hang on a registry that stops sending: small documents (manifests,
//! configs, signatures) have a whole-request timeout; blobs and ranges, of any size,
//! a stall timeout that runs only while bytes are awaited (see `stream.rs`), so a big
//! layer on a slow but moving link still finishes.

use std::io::{self, Read};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use powernode_proto::ErrorCode;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::stream::{Check, Head, StreamRequest, Streamed};
use super::ModuleErrorCode;
use crate::credentials::Credentials;
use crate::state::StateDir;

pub use super::stream::BlobReader;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const KNOWN_CONFIGS: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.oci.empty.v1+json",
    "application/vnd.unknown.config.v1+json",
];
/// Manifests and configs are small; anything bigger is not one.
const MAX_MANIFEST: u64 = 4 << 20;
const MAX_CONFIG: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{what} not found in the registry")]
    NotFound { what: String },
    #[error("registry {url} unreachable")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("registry answered {status} for {url}")]
    Status { url: String, status: u16 },
    #[error("registry {registry} refused the credentials ({status}) for {what}: {reason}")]
    Unauthorized {
        registry: String,
        what: String,
        status: u16,
        reason: String,
    },
    #[error("the node's credentials in {}", dir.display())]
    NodeCredentials {
        dir: PathBuf,
        #[source]
        source: crate::state::StateError,
    },
    #[error("{what}: digest {actual} is not the pinned {expected}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what}: unsupported media type {media_type:?}")]
    UnsupportedMediaType { what: String, media_type: String },
    #[error("{what}: malformed: {reason}")]
    Malformed { what: String, reason: String },
    #[error("{what}: larger than {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    #[error("repository {0:?} is not HOST[:PORT]/NAME")]
    BadRepository(String),
    #[error("plain HTTP to {0} refused: only loopback, and only with --insecure-http-loopback")]
    InsecureRefused(String),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("registry {registry} stalled: no answer within {after:?} to the request for {what}")]
    Stalled {
        registry: String,
        what: String,
        after: Duration,
    },
    #[error("registry {registry}: receiving {what} broke off (stalled, too slow for {within:?}, or dropped)")]
    BrokeOff {
        registry: String,
        what: String,
        within: Duration,
        #[source]
        source: io::Error,
    },
    #[error("reading {what}")]
    Read {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl ModuleErrorCode for RegistryError {
    fn code(&self) -> ErrorCode {
        match self {
            RegistryError::NotFound { .. } => ErrorCode::OciNotFound,
            RegistryError::Unreachable { .. }
            | RegistryError::Status { .. }
            | RegistryError::Stalled { .. }
            | RegistryError::BrokeOff { .. } => ErrorCode::RegistryUnreachable,
            RegistryError::Unauthorized { .. } => ErrorCode::RegistryUnauthorized,
            RegistryError::NodeCredentials { .. } => ErrorCode::Internal,
            RegistryError::DigestMismatch { .. } => ErrorCode::DigestMismatch,
            RegistryError::UnsupportedMediaType { .. }
            | RegistryError::Malformed { .. }
            | RegistryError::TooLarge { .. } => ErrorCode::UnsupportedMediaType,
            RegistryError::BadRepository(_)
            | RegistryError::InsecureRefused(_)
            | RegistryError::Tls(_) => ErrorCode::BadRequest,
            RegistryError::Read { source, .. } => super::error::stream_error_code(source),
        }
    }
}

/// `HOST[:PORT]/NAME`, as `DesiredModule::repository` carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository {
    pub host: String,
    pub name: String,
}

impl std::str::FromStr for Repository {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s
            .strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"))
            .unwrap_or(s);
        let (host, name) = s
            .split_once('/')
            .ok_or_else(|| RegistryError::BadRepository(s.into()))?;
        let name_ok = !name.is_empty()
            && name.split('/').all(|c| {
                c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if host.is_empty() || !name_ok || host.contains(['?', '#', '@']) {
            return Err(RegistryError::BadRepository(s.into()));
        }
        Ok(Self {
            host: host.into(),
            name: name.into(),
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// A manifest and the digest of its exact bytes.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub digest: String,
    pub manifest: Manifest,
}

/// The node's enrolled certificate and key, for the control plane's embedded registry
/// (which serves enrolled nodes and the admin only).
#[derive(Debug, Clone)]
pub enum NodeCertificate {
    /// Read from the agent's state directory whenever a client is made (each pull,
    /// so a renewed certificate is used from the next one on): `identity.json`
    /// names the control plane and the instance, `node.key`/`node.crt` are the
    /// credentials. A node with none yet (not enrolled) pulls without.
    StateDir(PathBuf),
    /// Presented to `registry` (`host[:port]`) only.
    Given {
        registry: String,
        credentials: Arc<Credentials>,
    },
}

impl NodeCertificate {
    /// `(registry host[:port], credentials)`, or `None` when the state directory holds
    /// no enrolled credentials yet.
    fn load(&self) -> Result<Option<(String, Arc<Credentials>)>, RegistryError> {
        let (dir, registry, credentials) = match self {
            NodeCertificate::Given {
                registry,
                credentials,
            } => return Ok(Some((registry.clone(), credentials.clone()))),
            NodeCertificate::StateDir(dir) => {
                let err = |source| RegistryError::NodeCredentials {
                    dir: dir.clone(),
                    source,
                };
                // `open` would create (and chmod) the directory: only read it here.
                let state = StateDir::open_existing(dir);
                match state.load_identity().map_err(err)? {
                    Some(identity) => {
                        let creds = state.load_credentials(&identity.instance_id).map_err(err)?;
                        (dir, identity.control_plane_url, creds)
                    }
                    None => (dir, String::new(), None),
                }
            }
        };
        let Some(creds) = credentials else {
            tracing::warn!(dir = %dir.display(), "no enrolled credentials: pulling without a node certificate");
            return Ok(None);
        };
        Ok(Some((registry, Arc::new(creds))))
    }
}

/// `host`, `port` of `host[:port]` or of a URL, for comparing registries: the host
/// lower-cased, a missing port HTTPS's.
fn authority(s: &str) -> Option<(String, u16)> {
    let url = if s.contains("://") {
        reqwest::Url::parse(s).ok()?
    } else {
        reqwest::Url::parse(&format!("https://{s}/")).ok()?
    };
    Some((
        url.host_str()?.to_ascii_lowercase(),
        url.port_or_known_default()?,
    ))
}

#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// PEM CA(s) to pin for HTTPS (the control-plane CA for the embedded registry).
    /// Default with a node certificate: the CA kept with it.
    pub ca_pem: Option<String>,
    /// The node's certificate, presented to the control plane's registry only.
    pub node_certificate: Option<NodeCertificate>,
    /// Allow `http://` to a loopback host (tests against a local registry).
    pub allow_http_loopback: bool,
    pub connect_timeout: Option<Duration>,
    /// Whole-request timeout for manifests, configs and signatures (at most 4 MiB);
    /// default [`DEFAULT_READ_TIMEOUT`].
    pub read_timeout: Option<Duration>,
    /// Blobs and ranges (any size) have no total timeout, but fail when the registry
    /// sends nothing for this long while they are awaited (before the response head or
    /// mid-body); a consumer busy with the bytes never counts. Default
    /// [`DEFAULT_STALL_TIMEOUT`].
    pub stall_timeout: Option<Duration>,
}

/// See [`RegistryOptions::read_timeout`].
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// See [`RegistryOptions::stall_timeout`].
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct RegistryClient {
    http: Clients,
    /// With a node certificate: clients that present it, and the registry
    /// (`host`, `port`) they are for.
    node: Option<((String, u16), Clients)>,
    opts: RegistryOptions,
    /// Bearer token per repository scope, from a 401 challenge.
    tokens: Mutex<std::collections::HashMap<String, String>>,
    received: Arc<AtomicU64>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("allow_http_loopback", &self.opts.allow_http_loopback)
            .field("received", &self.bytes_received())
            .finish()
    }
}

fn is_loopback_host(host: &str) -> bool {
    let h = host
        .rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// One HTTP stack of the registry client.
struct Clients {
    http: reqwest::blocking::Client,
    /// The same client, async, for blob bodies: each blob is received, counted and
    /// hashed on its own read-ahead thread ([`BlobReader`]) under a runtime of that
    /// thread, so the bytes never hop through the blocking client's runtime thread.
    stream: reqwest::Client,
}

impl Clients {
    /// Always our own rustls config with the ring provider (reqwest is built without
    /// one). Without a CA it trusts nothing: only the loopback HTTP path can work.
    fn new(opts: &RegistryOptions, creds: Option<&Credentials>) -> Result<Self, RegistryError> {
        let tls = match &opts.ca_pem {
            Some(ca) => crate::client::tls_config(ca, creds)
                .map_err(|e| RegistryError::Tls(e.to_string()))?,
            None => rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| RegistryError::Tls(e.to_string()))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        };
        let connect = opts.connect_timeout.unwrap_or(Duration::from_secs(10));
        let stream = reqwest::Client::builder()
            .connect_timeout(connect)
            .redirect(reqwest::redirect::Policy::limited(5))
            // Each blob runs on its own thread's runtime: an idle pooled connection
            // would outlive the runtime it was made on.
            .pool_max_idle_per_host(0)
            .use_preconfigured_tls(tls.clone())
            .build()
            .map_err(|e| RegistryError::Tls(e.to_string()))?;
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(connect)
            // No total timeout by default: blobs can be large (manifests set their own).
            .timeout(None::<Duration>)
            .redirect(reqwest::redirect::Policy::limited(5))
            .use_preconfigured_tls(tls)
            .build()
            .map_err(|e| RegistryError::Tls(e.to_string()))?;
        Ok(Self { http, stream })
    }
}

impl RegistryClient {
    /// Must be called outside an async context (reqwest's blocking client runs its own
    /// runtime); the module runtime calls it from `spawn_blocking`.
    pub fn new(mut opts: RegistryOptions) -> Result<Self, RegistryError> {
        let node = match &opts.node_certificate {
            Some(n) => n.load()?,
            None => None,
        };
        if let (None, Some((_, creds))) = (&opts.ca_pem, &node) {
            opts.ca_pem = Some(creds.ca_pem.clone());
        }
        let http = Clients::new(&opts, None)?;
        let node = match node {
            Some((registry, creds)) => {
                let at = authority(&registry).ok_or_else(|| {
                    RegistryError::BadRepository(format!("{registry} (the control plane)"))
                })?;
                Some((at, Clients::new(&opts, Some(&creds))?))
            }
            None => None,
        };
        Ok(Self {
            http,
            node,
            opts,
            tokens: Mutex::new(Default::default()),
            received: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The clients for `repo`: with the node certificate for the control plane's
    /// registry, without it for any other.
    fn clients(&self, repo: &Repository) -> &Clients {
        match &self.node {
            Some((at, c)) if authority(&repo.host).as_ref() == Some(at) => c,
            _ => &self.http,
        }
    }

    /// Body bytes received so far (manifests and blobs), for the dedup test and logs.
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn base(&self, repo: &Repository) -> Result<String, RegistryError> {
        if self.opts.allow_http_loopback && is_loopback_host(&repo.host) {
            return Ok(format!("http://{}/v2/{}", repo.host, repo.name));
        }
        if self.opts.ca_pem.is_none() {
            return Err(RegistryError::InsecureRefused(repo.host.clone()));
        }
        Ok(format!("https://{}/v2/{}", repo.host, repo.name))
    }

    /// GET of something small (a manifest, a config or signature blob), answering a
    /// bearer challenge once, under a whole-request timeout (`read_timeout`): at
    /// most 4 MiB, so a registry that stalls it is cut off there.
    fn get(
        &self,
        repo: &Repository,
        url: &str,
        accept: &str,
        what: &str,
    ) -> Result<reqwest::blocking::Response, RegistryError> {
        let scope = format!("repository:{}:pull", repo.name);
        let mut retried = false;
        loop {
            let mut req = self
                .clients(repo)
                .http
                .get(url)
                .header("Accept", accept)
                .timeout(self.whole_timeout());
            if let Some(t) = self.tokens.lock().ok().and_then(|m| m.get(&scope).cloned()) {
                req = req.bearer_auth(t);
            }
            let resp = req.send().map_err(|source| RegistryError::Unreachable {
                url: url.into(),
                source,
            })?;
            let challenge = resp
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            match resp.status().as_u16() {
                200 => return Ok(resp),
                404 => return Err(RegistryError::NotFound { what: what.into() }),
                401 if !retried && challenge.starts_with("Bearer ") => {
                    retried = true;
                    let token = self.bearer_token(&challenge, &scope).ok_or_else(|| {
                        RegistryError::Unauthorized {
                            registry: repo.host.clone(),
                            what: what.into(),
                            status: 401,
                            reason: "its token service gave no token".into(),
                        }
                    })?;
                    if let Ok(mut m) = self.tokens.lock() {
                        m.insert(scope.clone(), token);
                    }
                }
                status @ (401 | 403) => {
                    return Err(RegistryError::Unauthorized {
                        registry: repo.host.clone(),
                        what: what.into(),
                        status,
                        reason: refusal_reason(resp),
                    })
                }
                status => {
                    return Err(RegistryError::Status {
                        url: url.into(),
                        status,
                    })
                }
            }
        }
    }

    fn whole_timeout(&self) -> Duration {
        self.opts.read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT)
    }

    fn stall_timeout(&self) -> Duration {
        self.opts.stall_timeout.unwrap_or(DEFAULT_STALL_TIMEOUT)
    }

    /// Anonymous bearer token from a `Bearer realm=...,service=...` challenge.
    fn bearer_token(&self, challenge: &str, scope: &str) -> Option<String> {
        let params = challenge.strip_prefix("Bearer ")?;
        let mut realm = None;
        let mut query: Vec<(String, String)> = Vec::new();
        for part in params.split(',') {
            let (k, v) = part.trim().split_once('=')?;
            let v = v.trim_matches('"').to_string();
            match k {
                "realm" => realm = Some(v),
                "service" => query.push(("service".into(), v)),
                _ => {}
            }
        }
        query.push(("scope".into(), scope.into()));
        #[derive(Deserialize)]
        struct Tok {
            token: Option<String>,
            access_token: Option<String>,
        }
        let url = reqwest::Url::parse_with_params(&realm?, &query).ok()?;
        let resp = self
            .http
            .http
            .get(url)
            .timeout(Duration::from_secs(30))
            .send()
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let t: Tok = resp.json().ok()?;
        t.token.or(t.access_token)
    }

    fn read_limited(
        &self,
        repo: &Repository,
        resp: reqwest::blocking::Response,
        limit: u64,
        what: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let mut body = Vec::new();
        resp.take(limit + 1)
            .read_to_end(&mut body)
            .map_err(|source| RegistryError::BrokeOff {
                registry: repo.host.clone(),
                what: what.into(),
                within: self.whole_timeout(),
                source,
            })?;
        self.received
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        if body.len() as u64 > limit {
            return Err(RegistryError::TooLarge {
                what: what.into(),
                limit,
            });
        }
        Ok(body)
    }

    /// The image manifest at `reference` (a digest or a tag). With `pinned`, its bytes
    /// must hash to it (`digest_mismatch`); media types must be ones we know.
    pub fn manifest(
        &self,
        repo: &Repository,
        reference: &str,
        pinned: Option<&str>,
    ) -> Result<FetchedManifest, RegistryError> {
        let what = format!("manifest {}@{reference}", repo.name);
        let url = format!("{}/manifests/{reference}", self.base(repo)?);
        let resp = self.get(
            repo,
            &url,
            &format!("{OCI_MANIFEST}, {DOCKER_MANIFEST}"),
            &what,
        )?;
        let header_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string());
        let body = self.read_limited(repo, resp, MAX_MANIFEST, &what)?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if let Some(pin) = pinned {
            if !pin.eq_ignore_ascii_case(&digest) {
                return Err(RegistryError::DigestMismatch {
                    what,
                    expected: pin.into(),
                    actual: digest,
                });
            }
        }
        let manifest: Manifest =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Malformed {
                what: what.clone(),
                reason: e.to_string(),
            })?;
        // The signed bytes say what they are; the header only when they do not.
        let media_type = manifest
            .media_type
            .clone()
            .or(header_type)
            .unwrap_or_default();
        if manifest.schema_version != 2 || ![OCI_MANIFEST, DOCKER_MANIFEST].contains(&&*media_type)
        {
            return Err(RegistryError::UnsupportedMediaType { what, media_type });
        }
        Ok(FetchedManifest { digest, manifest })
    }

    /// A blob as a stream checked against `desc` (size cap and digest at EOF). The
    /// network reads, the byte count and the SHA-256 run ahead on their own thread
    /// ([`BlobReader`]), so they overlap with whatever the caller does with the bytes
    /// (unpacking, fs-verity, writing objects) instead of taking turns with it. A
    /// registry that sends nothing for the stall timeout fails it (`registry_unreachable`).
    pub fn blob(&self, repo: &Repository, desc: &Descriptor) -> Result<BlobReader, RegistryError> {
        let what = format!("blob {}@{}", repo.name, desc.digest);
        if !desc.digest.starts_with("sha256:") {
            return Err(RegistryError::UnsupportedMediaType {
                what,
                media_type: "non-sha256 digest".into(),
            });
        }
        let check = Check::Digest {
            expected: desc.digest.clone(),
            size: desc.size,
        };
        match self.stream_get(repo, desc, &what, None, check)? {
            (Some(reader), _) => Ok(reader),
            (None, head) => Err(RegistryError::Status {
                url: format!("{}/blobs/{}", self.base(repo)?, desc.digest),
                status: head.status,
            }),
        }
    }

    /// A streamed GET of a blob (or a range of it), answering a bearer challenge
    /// once. `(None, head)`: a range request the registry answered with anything but
    /// 206 (the caller falls back).
    fn stream_get(
        &self,
        repo: &Repository,
        desc: &Descriptor,
        what: &str,
        range: Option<(u64, u64)>,
        check: Check,
    ) -> Result<(Option<BlobReader>, Head), RegistryError> {
        let url = format!("{}/blobs/{}", self.base(repo)?, desc.digest);
        let scope = format!("repository:{}:pull", repo.name);
        let mut retried = false;
        loop {
            let mut req = self.clients(repo).stream.get(&url).header("Accept", "*/*");
            if let Some((start, end)) = range {
                req = req.header("Range", format!("bytes={start}-{}", end - 1));
            }
            if let Some(t) = self.tokens.lock().ok().and_then(|m| m.get(&scope).cloned()) {
                req = req.bearer_auth(t);
            }
            let head = match BlobReader::stream(StreamRequest {
                req,
                want: if range.is_some() { 206 } else { 200 },
                check: check.clone(),
                count: self.received.clone(),
                stall: self.stall_timeout(),
                registry: repo.host.clone(),
                what: what.into(),
            }) {
                Streamed::Ok(reader, head) => return Ok((Some(reader), head)),
                Streamed::Unreachable(source) => {
                    return Err(RegistryError::Unreachable { url, source })
                }
                Streamed::Stalled => {
                    return Err(RegistryError::Stalled {
                        registry: repo.host.clone(),
                        what: what.into(),
                        after: self.stall_timeout(),
                    })
                }
                Streamed::NotOk(head) => head,
            };
            match head.status {
                404 => return Err(RegistryError::NotFound { what: what.into() }),
                401 if !retried
                    && head
                        .challenge
                        .as_deref()
                        .is_some_and(|c| c.starts_with("Bearer ")) =>
                {
                    retried = true;
                    let challenge = head.challenge.unwrap_or_default();
                    let token = self.bearer_token(&challenge, &scope).ok_or_else(|| {
                        RegistryError::Unauthorized {
                            registry: repo.host.clone(),
                            what: what.into(),
                            status: 401,
                            reason: "its token service gave no token".into(),
                        }
                    })?;
                    if let Ok(mut m) = self.tokens.lock() {
                        m.insert(scope.clone(), token);
                    }
                }
                // The streamed answer's body is not read; the manifest, fetched first,
                // carries the registry's reason in the usual case.
                status @ (401 | 403) => {
                    return Err(RegistryError::Unauthorized {
                        registry: repo.host.clone(),
                        what: what.into(),
                        status,
                        reason: "refused without a reason read".into(),
                    })
                }
                200 | 416 if range.is_some() => return Ok((None, head)),
                status => return Err(RegistryError::Status { url, status }),
            }
        }
    }

    /// Bytes `[start, end)` of a blob as a stream (at most that many bytes, under the
    /// stall timeout), or `Unsupported` when the registry will not serve that range as
    /// asked (no range support, a multi-part or other range, 416): the caller then
    /// fetches the blob whole. The bytes are NOT checked here: the caller checks them
    /// against what the signed manifest says about them (and notices a short body).
    pub fn blob_range(
        &self,
        repo: &Repository,
        desc: &Descriptor,
        start: u64,
        end: u64,
    ) -> Result<RangeRead, RegistryError> {
        let what = format!("blob {}@{} bytes {start}..{end}", repo.name, desc.digest);
        if !desc.digest.starts_with("sha256:") || start >= end || end > desc.size {
            return Err(RegistryError::Malformed {
                what,
                reason: "range outside the blob".into(),
            });
        }
        let (reader, head) = self.stream_get(
            repo,
            desc,
            &what,
            Some((start, end)),
            Check::Limit(end - start),
        )?;
        let content_range = head.content_range.unwrap_or_default();
        match reader {
            Some(body) if content_range.starts_with(&format!("bytes {start}-{}/", end - 1)) => {
                Ok(RangeRead::Body(body))
            }
            // Dropping the reader closes its connection unread.
            _ => Ok(RangeRead::Unsupported {
                status: head.status,
            }),
        }
    }

    /// A small blob (config, signature payload) read whole and checked.
    pub fn small_blob(
        &self,
        repo: &Repository,
        desc: &Descriptor,
        limit: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let what = format!("blob {}@{}", repo.name, desc.digest);
        if desc.size > limit {
            return Err(RegistryError::TooLarge { what, limit });
        }
        let hex = desc.digest.strip_prefix("sha256:").ok_or_else(|| {
            RegistryError::UnsupportedMediaType {
                what: what.clone(),
                media_type: "non-sha256 digest".into(),
            }
        })?;
        let url = format!("{}/blobs/{}", self.base(repo)?, desc.digest);
        let resp = self.get(repo, &url, "*/*", &what)?;
        let body = self.read_limited(repo, resp, desc.size, &what)?;
        let actual = hex::encode(Sha256::digest(&body));
        if body.len() as u64 != desc.size || !actual.eq_ignore_ascii_case(hex) {
            return Err(RegistryError::DigestMismatch {
                what,
                expected: desc.digest.clone(),
                actual: format!("sha256:{actual}"),
            });
        }
        Ok(body)
    }

    /// The config blob, checked (a flipped byte in it fails here, `digest_mismatch`).
    pub fn check_config(
        &self,
        repo: &Repository,
        manifest: &Manifest,
    ) -> Result<(), RegistryError> {
        if !KNOWN_CONFIGS.contains(&manifest.config.media_type.as_str()) {
            return Err(RegistryError::UnsupportedMediaType {
                what: "config".into(),
                media_type: manifest.config.media_type.clone(),
            });
        }
        self.small_blob(repo, &manifest.config, MAX_CONFIG)
            .map(drop)
    }
}

/// The reason in a distribution-spec error body (`{"errors":[{"code","message"}]}`),
/// read up to 64 KiB; what there is otherwise.
fn refusal_reason(resp: reqwest::blocking::Response) -> String {
    #[derive(Deserialize)]
    struct Body {
        errors: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        code: String,
        #[serde(default)]
        message: String,
    }
    let mut body = Vec::new();
    if resp.take(64 << 10).read_to_end(&mut body).is_err() {
        return "no reason given".into();
    }
    match serde_json::from_slice::<Body>(&body) {
        Ok(b) if !b.errors.is_empty() => b
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; "),
        _ if body.is_empty() => "no reason given".into(),
        _ => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

/// What [`RegistryClient::blob_range`] got.
#[derive(Debug)]
pub enum RangeRead {
    Body(BlobReader),
    Unsupported { status: u16 },
}

#[cfg(test)]
mod tests {
    use super::super::unpack::DigestingReader;
    use super::*;

    #[test]
    fn repositories_parse_strictly() {
        let r: Repository = "127.0.0.1:5000/modules/base".parse().unwrap();
        assert_eq!(r.host, "127.0.0.1:5000");
        assert_eq!(r.name, "modules/base");
        for bad in [
            "noslash", "h/", "h/UPPER", "h/a//b", "h/../x", "/x", "h@x/y",
        ] {
            assert!(bad.parse::<Repository>().is_err(), "{bad}");
        }
    }

    #[test]
    fn read_ahead_hands_over_the_blob_and_the_digest_verdict() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let good = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        let mut r = BlobReader::spawn(DigestingReader::new(
            std::io::Cursor::new(data.clone()),
            &good,
            1 << 30,
        ))
        .unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        assert_eq!(r.read(&mut [0u8; 8]).unwrap(), 0, "EOF stays EOF");

        // A mismatch surfaces at the end, with its code.
        let bad = format!("sha256:{}", "0".repeat(64));
        let owned = data.clone();
        let mut r = BlobReader::spawn(DigestingReader::new(
            std::io::Cursor::new(owned),
            &bad,
            1 << 30,
        ))
        .unwrap();
        let e = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(
            super::super::error::stream_error_code(&e),
            ErrorCode::DigestMismatch
        );

        // Dropped half way: the thread notices and ends (no hang, no panic).
        let owned = data.clone();
        let mut r = BlobReader::spawn(std::io::Cursor::new(owned)).unwrap();
        let mut first = [0u8; 10];
        r.read_exact(&mut first).unwrap();
        assert_eq!(&first[..], &data[..10]);
        drop(r);
    }

    #[test]
    fn loopback_detection() {
        for h in ["127.0.0.1:5000", "localhost:1", "[::1]:80", "127.0.0.1"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["10.0.0.1:5000", "example.com", "[2001:db8::1]:80"] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}

#[cfg(test)]
mod auth_tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// A one-thread HTTP/1.1 server on loopback answering from `route(request line,
    /// authorization header)`; closes each connection after one response.
    fn serve(
        route: impl Fn(&str, Option<&str>) -> (u16, Vec<(String, String)>, Vec<u8>) + Send + 'static,
    ) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let mut auth = None;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.strip_prefix("authorization: ") {
                        auth = Some(v.trim().to_string());
                    }
                }
                let (status, headers, body) = route(line.trim(), auth.as_deref());
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                let _ = s.write_all(out.as_bytes());
                let _ = s.write_all(&body);
            }
        });
        port
    }

    #[test]
    fn bearer_challenge_is_answered_and_the_token_reused() {
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#.to_vec();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
        let port_cell = std::sync::Arc::new(std::sync::OnceLock::<u16>::new());
        let pc = port_cell.clone();
        let port = serve(move |line, auth| {
            if line.starts_with("GET /token?") {
                assert!(line.contains("scope=repository%3Amod%2Fx%3Apull"), "{line}");
                return (200, vec![], br#"{"token":"t0k"}"#.to_vec());
            }
            if auth != Some("Bearer t0k") {
                let realm = format!("http://127.0.0.1:{}/token", pc.get().unwrap());
                return (
                    401,
                    vec![(
                        "www-authenticate".into(),
                        format!(r#"Bearer realm="{realm}",service="reg""#),
                    )],
                    vec![],
                );
            }
            (200, vec![], manifest.clone())
        });
        port_cell.set(port).unwrap();
        let c = RegistryClient::new(RegistryOptions {
            allow_http_loopback: true,
            ..Default::default()
        })
        .unwrap();
        let repo: Repository = format!("127.0.0.1:{port}/mod/x").parse().unwrap();
        let m = c.manifest(&repo, &digest, Some(&digest)).unwrap();
        assert_eq!(m.digest, digest);
        // Cached token: the second request carries it straight away.
        c.manifest(&repo, &digest, Some(&digest)).unwrap();
        // A pin the bytes do not match.
        let other = format!("sha256:{}", "1".repeat(64));
        let e = c.manifest(&repo, &other, Some(&other)).unwrap_err();
        assert_eq!(e.code(), ErrorCode::DigestMismatch);
    }

    #[test]
    fn streamed_blobs_are_checked_and_non_200_answers_take_the_blocking_path() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        let mut flipped = data.clone();
        flipped[2_999_000] ^= 1;
        let port_cell = std::sync::Arc::new(std::sync::OnceLock::<u16>::new());
        let pc = port_cell.clone();
        let hits = std::sync::Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let served = data.clone();
        let port = serve(move |line, auth| {
            h.fetch_add(1, Ordering::Relaxed);
            let path = line.split(' ').nth(1).unwrap_or_default();
            if path.starts_with("/token?") {
                return (200, vec![], br#"{"token":"t0k"}"#.to_vec());
            }
            if path.starts_with("/v2/auth/") && auth != Some("Bearer t0k") {
                let realm = format!("http://127.0.0.1:{}/token", pc.get().unwrap());
                let challenge = format!(r#"Bearer realm="{realm}",service="reg""#);
                return (401, vec![("www-authenticate".into(), challenge)], vec![]);
            }
            match path.split('/').nth(2) {
                Some("good" | "auth") => (200, vec![], served.clone()),
                Some("flipped") => (200, vec![], flipped.clone()),
                _ => (404, vec![], vec![]),
            }
        });
        port_cell.set(port).unwrap();
        let c = RegistryClient::new(RegistryOptions {
            allow_http_loopback: true,
            ..Default::default()
        })
        .unwrap();
        let desc = |size| Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: digest.clone(),
            size,
            annotations: Default::default(),
        };
        let repo =
            |name: &str| -> Repository { format!("127.0.0.1:{port}/{name}/x").parse().unwrap() };
        let read = |name: &str, size| {
            let mut out = Vec::new();
            c.blob(&repo(name), &desc(size))?
                .read_to_end(&mut out)
                .map_err(|source| RegistryError::Read {
                    what: name.into(),
                    source,
                })
                .map(|_| out)
        };
        let before = c.bytes_received();
        assert!(read("good", 3_000_000).unwrap() == data);
        assert_eq!(c.bytes_received() - before, 3_000_000);
        assert_eq!(hits.load(Ordering::Relaxed), 1, "one request, streamed");
        let code = |r: Result<Vec<u8>, RegistryError>| r.map(|_| ()).unwrap_err().code();
        assert_eq!(code(read("flipped", 3_000_000)), ErrorCode::DigestMismatch);
        // More bytes than the descriptor says: refused as soon as they exceed it.
        assert_eq!(code(read("good", 2_999_999)), ErrorCode::DigestMismatch);
        assert_eq!(code(read("missing", 3_000_000)), ErrorCode::OciNotFound);
        // A challenge: the blocking path answers it, and the token is then reused.
        assert!(read("auth", 3_000_000).unwrap() == data);
        let n = hits.load(Ordering::Relaxed);
        assert!(read("auth", 3_000_000).unwrap() == data);
        assert_eq!(
            hits.load(Ordering::Relaxed),
            n + 1,
            "token reused, streamed"
        );
        // Registry down.
        let dead = TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_port = dead.local_addr().unwrap().port();
        drop(dead);
        let gone: Repository = format!("127.0.0.1:{dead_port}/mod/x").parse().unwrap();
        let e = c.blob(&gone, &desc(3_000_000)).unwrap_err();
        assert_eq!(e.code(), ErrorCode::RegistryUnreachable, "{e}");
    }

    #[test]
    fn unknown_manifest_types_and_https_without_ca_are_refused() {
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[],"config":{"mediaType":"x","digest":"sha256:00","size":0}}"#.to_vec();
        let port = serve(move |_, _| (200, vec![], body.clone()));
        let c = RegistryClient::new(RegistryOptions {
            allow_http_loopback: true,
            ..Default::default()
        })
        .unwrap();
        let repo: Repository = format!("127.0.0.1:{port}/mod/x").parse().unwrap();
        let e = c.manifest(&repo, "latest", None).unwrap_err();
        assert_eq!(e.code(), ErrorCode::UnsupportedMediaType, "{e}");
        let strict = RegistryClient::new(RegistryOptions::default()).unwrap();
        let e = strict.manifest(&repo, "latest", None).unwrap_err();
        assert!(matches!(e, RegistryError::InsecureRefused(_)), "{e}");
    }

    /// A registry that refuses the credentials (the embedded one refusing a revoked
    /// node) is `registry_unauthorized` with its reason, not `registry_unreachable`:
    /// manifests (body read) and blobs (streamed) alike, 401 and 403.
    #[test]
    fn a_refusal_is_registry_unauthorized_with_the_registry_s_reason() {
        let body = br#"{"errors":[{"code":"UNAUTHORIZED","message":"node certificate refused: certificate_revoked: this certificate was revoked","detail":null}]}"#.to_vec();
        let port = serve(move |line, _| {
            let status = if line.contains("/forbidden/") {
                403
            } else {
                401
            };
            let challenge = (
                "www-authenticate".into(),
                r#"Basic realm="powernode""#.into(),
            );
            (status, vec![challenge], body.clone())
        });
        let c = RegistryClient::new(RegistryOptions {
            allow_http_loopback: true,
            ..Default::default()
        })
        .unwrap();
        let repo: Repository = format!("127.0.0.1:{port}/mod/x").parse().unwrap();
        let e = c.manifest(&repo, "v1", None).unwrap_err();
        assert_eq!(e.code(), ErrorCode::RegistryUnauthorized, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("certificate_revoked") && msg.contains("401"),
            "{msg}"
        );
        let desc = Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 10,
            annotations: Default::default(),
        };
        let e = c.blob(&repo, &desc).unwrap_err();
        assert_eq!(e.code(), ErrorCode::RegistryUnauthorized, "{e}");
        let forbidden: Repository = format!("127.0.0.1:{port}/forbidden/x").parse().unwrap();
        let e = c.manifest(&forbidden, "v1", None).unwrap_err();
        assert_eq!(e.code(), ErrorCode::RegistryUnauthorized, "{e}");
        assert!(e.to_string().contains("403"), "{e}");
    }
}

#[cfg(test)]
mod node_certificate_tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// A TLS registry on 127.0.0.1 that offers client auth (as the stub does) and
    /// answers a manifest to a client that presented a certificate of `client_ca`,
    /// 401 to one that did not; returns its port, its CA and how many connections
    /// came with a certificate.
    fn tls_registry(client_ca: &str, manifest: Vec<u8>) -> (u16, String, Arc<AtomicU64>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut client_ca.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .unwrap();
        let cfg = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(
                    vec![cert.der().clone()],
                    rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                )
                .unwrap(),
        );
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let presented = Arc::new(AtomicU64::new(0));
        let seen = presented.clone();
        std::thread::spawn(move || {
            for tcp in l.incoming() {
                let Ok(tcp) = tcp else { return };
                let Ok(conn) = rustls::ServerConnection::new(cfg.clone()) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut r = BufReader::new(&mut tls);
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let with_cert = tls.conn.peer_certificates().is_some_and(|c| !c.is_empty());
                let (status, body) = if with_cert {
                    seen.fetch_add(1, Ordering::Relaxed);
                    ("200 OK", manifest.clone())
                } else {
                    (
                        "401 Unauthorized",
                        br#"{"errors":[{"code":"UNAUTHORIZED","message":"no credentials"}]}"#
                            .to_vec(),
                    )
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(head.as_bytes());
                let _ = tls.write_all(&body);
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        (port, ca.pem(), presented)
    }

    /// The node's certificate goes to the control plane's registry (same host and
    /// port, however the URL spells it) and to no other.
    #[test]
    fn the_node_certificate_goes_to_the_control_plane_s_registry_only() {
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#.to_vec();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
        let key = crate::credentials::NodeKey::from_seed([7; 32]);
        let (cert, node_ca) =
            crate::credentials::tests::sign(&key.csr_pem("inst-1").unwrap(), 3600);
        let creds = Arc::new(Credentials::new(key, cert, node_ca.clone(), "inst-1").unwrap());
        let (port, server_ca, presented) = tls_registry(&node_ca, manifest);
        let repo: Repository = format!("127.0.0.1:{port}/modules/x").parse().unwrap();
        let client = |control_plane: String| {
            RegistryClient::new(RegistryOptions {
                ca_pem: Some(server_ca.clone()),
                node_certificate: Some(NodeCertificate::Given {
                    registry: control_plane,
                    credentials: creds.clone(),
                }),
                ..Default::default()
            })
            .unwrap()
        };
        let m = client(format!("https://127.0.0.1:{port}"))
            .manifest(&repo, &digest, Some(&digest))
            .unwrap();
        assert_eq!(m.digest, digest);
        assert_eq!(presented.load(Ordering::Relaxed), 1);
        // Another control plane (here: another port): this registry is not it, so it
        // never sees the certificate, and refuses.
        let e = client(format!("https://127.0.0.1:{}", port.wrapping_add(1)))
            .manifest(&repo, &digest, Some(&digest))
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::RegistryUnauthorized, "{e}");
        assert!(e.to_string().contains("no credentials"), "{e}");
        assert_eq!(presented.load(Ordering::Relaxed), 1);
        // Without a CA of its own the client pins the one kept with the certificate
        // (here not the one that signed this server: refused at the handshake).
        let own_ca = RegistryClient::new(RegistryOptions {
            node_certificate: Some(NodeCertificate::Given {
                registry: format!("127.0.0.1:{port}"),
                credentials: creds.clone(),
            }),
            ..Default::default()
        })
        .unwrap();
        let e = own_ca.manifest(&repo, &digest, Some(&digest)).unwrap_err();
        assert_eq!(e.code(), ErrorCode::RegistryUnreachable, "a TLS error: {e}");
    }

    #[test]
    fn registries_compare_by_host_and_port() {
        assert_eq!(
            authority("https://CP.example:8443"),
            authority("cp.example:8443")
        );
        assert_eq!(authority("https://cp.example"), authority("cp.example:443"));
        assert_eq!(authority("https://[::1]:5000/x"), authority("[::1]:5000"));
        assert_ne!(authority("10.0.2.2:8443"), authority("10.0.2.2:8444"));
        assert_eq!(authority("no host"), None);
    }
}
