//! The embedded OCI registry at `/v2/`: the parts of the distribution spec that
//! `oras`, `cosign` and the agent use (blobs, monolithic and chunked uploads,
//! cross-repository mount, manifests by tag and digest, tag list).
//!
//! Auth: every write (POST, PATCH, PUT, DELETE, and an upload's status) needs the
//! admin token, as `Authorization: Bearer TOKEN` or Basic with any user name and the
//! token as password. Every read (GET and HEAD of blobs, manifests, tags, referrers)
//! needs the admin token the same way, or the client certificate of a live node: one
//! the TLS layer verified against our CA whose instance the caller of [`router`]
//! judges live ([`Access::node`]: the node API's own check, so a revoked certificate
//! or a terminated instance can no longer pull). A refusal is 401 with the
//! distribution-spec body whose message says why (no credentials, a wrong token, the
//! node certificate's refusal and its code), and a server log line. `GET /v2/`
//! without credentials answers 401 with a Basic challenge, because that is how
//! go-containerregistry (cosign) and oras learn that they should send theirs.
//!
//! It must never keep a blob whose content does not hash to its name, never
//! buffer an upload in memory (uploads stream to disk, bounded by a maximum size),
//! and never serve a byte to a caller without credentials.

pub mod storage;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

pub use storage::{parse_digest, valid_repo, valid_tag, Storage, StorageError};

/// Largest manifest accepted (they are small JSON documents).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Default maximum blob size: 4 GiB.
pub const DEFAULT_MAX_BLOB_BYTES: u64 = 4 * 1024 * 1024 * 1024;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MANIFEST_TYPES: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Judges a presented admin token.
pub type TokenCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;
/// Judges the node certificate the TLS layer attached to the request (its
/// extensions), if any.
pub type NodeCheck = Arc<dyn Fn(&axum::http::Extensions) -> NodeReader + Send + Sync>;

/// What a request's client certificate makes of its sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeReader {
    /// No client certificate on the connection.
    Absent,
    /// The certificate of a live node: its instance id.
    Live(String),
    /// A certificate that was presented and refused: why, for the answer and the log
    /// (e.g. `certificate_revoked: this certificate was revoked`).
    Refused(String),
}

/// Who may write (the admin token) and who may read (that, or a live node).
#[derive(Clone)]
pub struct Access {
    pub token_ok: TokenCheck,
    pub node: NodeCheck,
}

#[derive(Clone)]
struct Reg {
    storage: Storage,
    access: Access,
}

/// The `/v2` router.
pub fn router(storage: Storage, access: Access) -> Router {
    let reg = Reg { storage, access };
    Router::new()
        .route("/v2", any(dispatch))
        .route("/v2/", any(dispatch))
        .route("/v2/{*rest}", any(dispatch))
        // Uploads stream to disk with their own bound; the JSON limit does not apply.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(reg)
}

/// A distribution-spec error: `{"errors":[{"code","message","detail"}]}`.
#[derive(Debug)]
pub struct RegError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl RegError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for RegError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            axum::Json(
                json!({"errors":[{"code": self.code, "message": self.message, "detail": null}]}),
            ),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"powernode\""),
            );
        }
        resp
    }
}

impl From<StorageError> for RegError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::UploadUnknown(_) => {
                Self::new(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN", e.to_string())
            }
            StorageError::DigestMismatch { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string())
            }
            StorageError::TooLarge(_) => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID", e.to_string())
            }
            StorageError::RangeMismatch { .. } => Self::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "BLOB_UPLOAD_INVALID",
                e.to_string(),
            ),
            StorageError::Io { .. } => {
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), "registry storage");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "UNKNOWN",
                    "storage error (see server log)",
                )
            }
        }
    }
}

type RegResult = Result<Response, RegError>;

/// Which resource a `/v2/...` path names.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Base,
    Blob(&'a str, &'a str),
    UploadStart(&'a str),
    Upload(&'a str, &'a str),
    Manifest(&'a str, &'a str),
    Tags(&'a str),
    Referrers(&'a str, &'a str),
}

/// Splits at the last `/blobs/`, `/manifests/`, ... so that repository names with
/// slashes work.
fn parse_path(path: &str) -> Option<Target<'_>> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Target::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Target::Tags(name));
    }
    if let Some(name) = rest.strip_suffix("/blobs/uploads/") {
        return Some(Target::UploadStart(name));
    }
    if let Some(name) = rest.strip_suffix("/blobs/uploads") {
        return Some(Target::UploadStart(name));
    }
    if let Some((name, id)) = rest.rsplit_once("/blobs/uploads/") {
        return Some(Target::Upload(name, id));
    }
    if let Some((name, d)) = rest.rsplit_once("/blobs/") {
        return Some(Target::Blob(name, d));
    }
    if let Some((name, r)) = rest.rsplit_once("/manifests/") {
        return Some(Target::Manifest(name, r));
    }
    if let Some((name, d)) = rest.rsplit_once("/referrers/") {
        return Some(Target::Referrers(name, d));
    }
    None
}

/// What the `Authorization` header says.
#[derive(Debug, PartialEq, Eq)]
enum Cred {
    None,
    Good,
    Bad,
}

fn credentials(reg: &Reg, headers: &HeaderMap) -> Cred {
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Cred::None;
    };
    let v = v.trim();
    let token = if let Some(t) = v.strip_prefix("Bearer ") {
        Some(t.trim().to_string())
    } else if let Some(b) = v.strip_prefix("Basic ") {
        base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|s| s.split_once(':').map(|(_, p)| p.to_string()))
    } else {
        None
    };
    match token {
        Some(t) if (reg.access.token_ok)(&t) => Cred::Good,
        _ => Cred::Bad,
    }
}

fn require_push(reg: &Reg, headers: &HeaderMap) -> Result<(), RegError> {
    match credentials(reg, headers) {
        Cred::Good => Ok(()),
        Cred::None => Err(RegError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "pushing needs the admin token (Bearer, or Basic with the token as password)",
        )),
        Cred::Bad => Err(RegError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "wrong credentials: the password must be the admin token",
        )),
    }
}

/// The sender of a read: the admin token or a live node, else the refusal naming why.
fn require_read(
    reg: &Reg,
    headers: &HeaderMap,
    ext: &axum::http::Extensions,
) -> Result<(), RegError> {
    let cred = credentials(reg, headers);
    if cred == Cred::Good {
        return Ok(());
    }
    let why = match ((reg.access.node)(ext), cred) {
        (NodeReader::Live(_), _) => return Ok(()),
        (NodeReader::Refused(why), _) => format!("node certificate refused: {why}"),
        (NodeReader::Absent, Cred::Bad) => {
            "wrong credentials: the password must be the admin token".to_string()
        }
        (NodeReader::Absent, _) => "no credentials: reading needs an enrolled node's client \
            certificate or the admin token (Bearer, or Basic with the token as password)"
            .to_string(),
    };
    Err(RegError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", why))
}

fn name_unknown(name: &str) -> RegError {
    RegError::new(
        StatusCode::NOT_FOUND,
        "NAME_UNKNOWN",
        format!("repository {name:?} is not known"),
    )
}

fn check_name(name: &str) -> Result<(), RegError> {
    if valid_repo(name) {
        Ok(())
    } else {
        Err(RegError::new(
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
            format!("invalid repository name {name:?}"),
        ))
    }
}

fn check_digest(d: &str) -> Result<&str, RegError> {
    parse_digest(d).ok_or_else(|| {
        RegError::new(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            format!("{d:?} is not a sha256 digest"),
        )
    })
}

fn unsupported() -> RegError {
    RegError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "UNSUPPORTED",
        "method not supported on this endpoint",
    )
}

#[derive(Debug, Default, Deserialize)]
struct UploadQuery {
    digest: Option<String>,
    mount: Option<String>,
    from: Option<String>,
}

async fn dispatch(State(reg): State<Reg>, Query(q): Query<UploadQuery>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let r = match parse_path(&path) {
        None => Err(RegError::new(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "no such registry endpoint",
        )),
        Some(t) => handle(&reg, t, method.clone(), q, req).await,
    };
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    let mut resp = resp;
    resp.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    if method == Method::HEAD {
        // HEAD answers keep their headers (Content-Length included), not the body.
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    resp
}

async fn handle(
    reg: &Reg,
    t: Target<'_>,
    method: Method,
    q: UploadQuery,
    req: Request,
) -> RegResult {
    let headers = req.headers().clone();
    // An upload's status (GET) belongs to the push.
    if matches!(
        method,
        Method::POST | Method::PATCH | Method::PUT | Method::DELETE
    ) || matches!(t, Target::Upload(..))
    {
        require_push(reg, &headers)?;
    } else if let Err(e) = require_read(reg, &headers, req.extensions()) {
        // Clients ping the base anonymously to learn that they should send
        // credentials: that is no refusal worth a warning.
        if t == Target::Base {
            tracing::debug!(reason = %e.message, "registry: anonymous ping of /v2/");
        } else {
            tracing::warn!(%method, path = %req.uri().path(), reason = %e.message, "registry read refused");
        }
        return Err(e);
    }
    match (t, method) {
        (Target::Base, Method::GET | Method::HEAD) => {
            Ok((StatusCode::OK, axum::Json(json!({}))).into_response())
        }
        (Target::Blob(name, d), Method::GET | Method::HEAD) => {
            check_name(name)?;
            let hex = check_digest(d)?;
            get_blob(reg, d, hex, headers.get(header::RANGE)).await
        }
        (Target::Blob(name, d), Method::DELETE) => {
            check_name(name)?;
            check_digest(d)?;
            Err(unsupported())
        }
        (Target::UploadStart(name), Method::POST) => {
            check_name(name)?;
            start_upload(reg, name, q, req).await
        }
        (Target::Upload(name, id), Method::PATCH) => {
            check_name(name)?;
            let start = content_range_start(&headers)?;
            let len = reg.storage.append(name, id, start, req.into_body()).await?;
            Ok(upload_accepted(name, id, len))
        }
        (Target::Upload(name, id), Method::PUT) => {
            check_name(name)?;
            let Some(digest) = q.digest else {
                return Err(RegError::new(
                    StatusCode::BAD_REQUEST,
                    "DIGEST_INVALID",
                    "closing an upload needs ?digest=",
                ));
            };
            check_digest(&digest)?;
            reg.storage.append(name, id, None, req.into_body()).await?;
            reg.storage.finish_upload(name, id, &digest).await?;
            Ok(blob_created(name, &digest))
        }
        (Target::Upload(name, id), Method::GET) => {
            check_name(name)?;
            let len = reg.storage.upload_len(name, id)?;
            let mut r = upload_accepted(name, id, len);
            *r.status_mut() = StatusCode::NO_CONTENT;
            Ok(r)
        }
        (Target::Upload(name, id), Method::DELETE) => {
            check_name(name)?;
            reg.storage.cancel_upload(name, id).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (Target::Manifest(name, r), Method::GET | Method::HEAD) => {
            check_name(name)?;
            get_manifest(reg, name, r).await
        }
        (Target::Manifest(name, r), Method::PUT) => {
            check_name(name)?;
            put_manifest(reg, name, r, req).await
        }
        (Target::Manifest(name, r), Method::DELETE) => {
            check_name(name)?;
            if parse_digest(r).is_none() && valid_tag(r) && reg.storage.delete_tag(name, r).await? {
                Ok(StatusCode::ACCEPTED.into_response())
            } else {
                Err(unsupported())
            }
        }
        (Target::Tags(name), Method::GET) => {
            check_name(name)?;
            let tags = reg
                .storage
                .tags(name)
                .await?
                .ok_or_else(|| name_unknown(name))?;
            Ok(axum::Json(json!({"name": name, "tags": tags})).into_response())
        }
        (Target::Referrers(name, d), Method::GET) => {
            check_name(name)?;
            check_digest(d)?;
            // No referrers index: an empty one is the spec's answer for "none".
            let mut r = axum::Json(json!({"schemaVersion":2,"mediaType":OCI_INDEX,"manifests":[]}))
                .into_response();
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(OCI_INDEX));
            Ok(r)
        }
        _ => Err(unsupported()),
    }
}

/// `Range: bytes=START-[END]` (one range) against a blob of `len` bytes; `None` for
/// anything else, which is answered whole (allowed by RFC 9110).
fn byte_range(v: Option<&HeaderValue>, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = v?.to_str().ok()?.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end: u64 = if b.trim().is_empty() {
        len.saturating_sub(1)
    } else {
        b.trim().parse::<u64>().ok()?.min(len.saturating_sub(1))
    };
    Some(if start >= len || end < start {
        Err(())
    } else {
        Ok((start, end))
    })
}

async fn get_blob(reg: &Reg, digest: &str, hex: &str, range: Option<&HeaderValue>) -> RegResult {
    let path = reg.storage.blob_path(hex);
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RegError::new(
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                format!("blob {digest} unknown"),
            ))
        }
        Err(source) => return Err(StorageError::Io { path, source }.into()),
    };
    let len = file
        .metadata()
        .await
        .map_err(|source| StorageError::Io {
            path: path.clone(),
            source,
        })?
        .len();
    let mut file = file;
    match byte_range(range, len) {
        None => {}
        Some(Err(())) => {
            let mut r = RegError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                // The spec has no range code; the status is what clients act on.
                "SIZE_INVALID",
                format!("range outside the blob's {len} bytes"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(r);
        }
        Some(Ok((start, end))) => {
            use tokio::io::{AsyncReadExt, AsyncSeekExt};
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(|source| StorageError::Io {
                    path: path.clone(),
                    source,
                })?;
            let n = end - start + 1;
            let counted = Counted {
                inner: file.take(n),
                count: reg.storage.served_counter(),
            };
            let stream = tokio_util::io::ReaderStream::with_capacity(counted, 256 * 1024);
            return Response::builder()
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_LENGTH, n)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header("Docker-Content-Digest", digest)
                .body(Body::from_stream(stream))
                .map_err(|e| {
                    RegError::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string())
                });
        }
    }
    let counted = Counted {
        inner: file,
        count: reg.storage.served_counter(),
    };
    let stream = tokio_util::io::ReaderStream::with_capacity(counted, 256 * 1024);
    Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .status(StatusCode::OK)
        .header(header::CONTENT_LENGTH, len)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("Docker-Content-Digest", digest)
        .header(header::ETAG, format!("\"{digest}\""))
        .body(Body::from_stream(stream))
        .map_err(|e| RegError::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()))
}

/// A blob body that counts what it hands to the connection into the storage's total
/// (a HEAD answer drops its body unread, so it counts nothing).
struct Counted<R> {
    inner: R,
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = r {
            let n = (buf.filled().len() - before) as u64;
            self.count
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

fn content_range_start(h: &HeaderMap) -> Result<Option<u64>, RegError> {
    let Some(v) = h.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("");
    let s = s.strip_prefix("bytes ").unwrap_or(s);
    s.split('-')
        .next()
        .and_then(|a| a.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| {
            RegError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "BLOB_UPLOAD_INVALID",
                format!("bad Content-Range {s:?}"),
            )
        })
}

fn upload_accepted(name: &str, id: &str, len: u64) -> Response {
    let mut r = StatusCode::ACCEPTED.into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/v2/{name}/blobs/uploads/{id}")) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("0-{}", len.saturating_sub(1))) {
        h.insert(header::RANGE, v);
    }
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("Docker-Upload-UUID", v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    r
}

fn blob_created(name: &str, digest: &str) -> Response {
    let mut r = StatusCode::CREATED.into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/v2/{name}/blobs/{digest}")) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(digest) {
        h.insert("Docker-Content-Digest", v);
    }
    r
}

async fn start_upload(reg: &Reg, name: &str, q: UploadQuery, req: Request) -> RegResult {
    if let (Some(mount), Some(from)) = (&q.mount, &q.from) {
        // Blobs are global: a mount succeeds whenever we hold the blob.
        if valid_repo(from) {
            if let Some(hex) = parse_digest(mount) {
                if reg.storage.blob_size(hex).await?.is_some() {
                    return Ok(blob_created(name, mount));
                }
            }
        }
    }
    let id = reg.storage.start_upload(name).await?;
    if let Some(digest) = q.digest {
        check_digest(&digest)?;
        reg.storage.append(name, &id, None, req.into_body()).await?;
        reg.storage.finish_upload(name, &id, &digest).await?;
        return Ok(blob_created(name, &digest));
    }
    Ok(upload_accepted(name, &id, 0))
}

async fn get_manifest(reg: &Reg, name: &str, r: &str) -> RegResult {
    let unknown = || {
        RegError::new(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!("manifest {name}:{r} unknown"),
        )
    };
    let digest = if parse_digest(r).is_some() {
        r.to_string()
    } else if valid_tag(r) {
        match reg.storage.resolve_tag(name, r).await? {
            Some(d) => d,
            None if reg.storage.tags(name).await?.is_none() => return Err(name_unknown(name)),
            None => return Err(unknown()),
        }
    } else {
        return Err(RegError::new(
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
            format!("invalid reference {r:?}"),
        ));
    };
    let hex = &digest["sha256:".len()..];
    let media_type = reg
        .storage
        .manifest_type(name, hex)
        .await?
        .ok_or_else(unknown)?;
    let bytes = reg.storage.read_blob(hex).await?.ok_or_else(unknown)?;
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, media_type)
        .header(header::CONTENT_LENGTH, bytes.len())
        .header("Docker-Content-Digest", &digest)
        .header(header::ETAG, format!("\"{digest}\""))
        .body(Body::from(bytes))
        .map_err(|e| RegError::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()))
}

fn manifest_invalid(msg: impl Into<String>) -> RegError {
    RegError::new(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", msg)
}

async fn put_manifest(reg: &Reg, name: &str, r: &str, req: Request) -> RegResult {
    let by_digest = parse_digest(r).is_some();
    if !by_digest && !valid_tag(r) {
        return Err(RegError::new(
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
            format!("invalid reference {r:?}"),
        ));
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or("").trim().to_string());
    let body = axum::body::to_bytes(req.into_body(), MAX_MANIFEST_BYTES)
        .await
        .map_err(|_| {
            RegError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "SIZE_INVALID",
                format!("manifest larger than {MAX_MANIFEST_BYTES} bytes"),
            )
        })?;
    let doc: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| manifest_invalid(format!("manifest is not JSON: {e}")))?;
    let declared = doc.get("mediaType").and_then(|v| v.as_str());
    let media_type = match (declared, content_type.as_deref()) {
        (Some(d), _) => d.to_string(),
        (None, Some(c)) if MANIFEST_TYPES.contains(&c) => c.to_string(),
        // An OCI manifest may omit mediaType; a config field tells it is one.
        (None, _) if doc.get("config").is_some() => OCI_MANIFEST.to_string(),
        (None, _) if doc.get("manifests").is_some() => OCI_INDEX.to_string(),
        (None, c) => {
            return Err(manifest_invalid(format!(
                "cannot tell the manifest's media type (Content-Type {c:?})"
            )))
        }
    };
    if !MANIFEST_TYPES.contains(&media_type.as_str()) {
        return Err(manifest_invalid(format!(
            "unsupported manifest media type {media_type:?}"
        )));
    }
    if doc.get("schemaVersion").and_then(|v| v.as_u64()) != Some(2) {
        return Err(manifest_invalid("schemaVersion must be 2"));
    }
    // Everything a manifest names must be here already.
    let mut refs: Vec<(&str, bool)> = Vec::new();
    if media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST {
        let config = doc
            .get("config")
            .and_then(|c| c.get("digest"))
            .and_then(|d| d.as_str())
            .ok_or_else(|| manifest_invalid("image manifest without config.digest"))?;
        refs.push((config, false));
        for l in doc
            .get("layers")
            .and_then(|l| l.as_array())
            .ok_or_else(|| manifest_invalid("image manifest without layers"))?
        {
            let d = l
                .get("digest")
                .and_then(|d| d.as_str())
                .ok_or_else(|| manifest_invalid("layer without digest"))?;
            refs.push((d, false));
        }
    } else {
        for m in doc
            .get("manifests")
            .and_then(|l| l.as_array())
            .ok_or_else(|| manifest_invalid("index without manifests"))?
        {
            let d = m
                .get("digest")
                .and_then(|d| d.as_str())
                .ok_or_else(|| manifest_invalid("index entry without digest"))?;
            refs.push((d, true));
        }
    }
    for (d, is_manifest) in refs {
        let hex = parse_digest(d)
            .ok_or_else(|| manifest_invalid(format!("{d:?} is not a sha256 digest")))?;
        let present = if is_manifest {
            reg.storage.manifest_type(name, hex).await?.is_some()
        } else {
            reg.storage.blob_size(hex).await?.is_some()
        };
        if !present {
            return Err(RegError::new(
                StatusCode::BAD_REQUEST,
                "MANIFEST_BLOB_UNKNOWN",
                format!("{d} is not in this registry"),
            ));
        }
    }
    let digest = reg.storage.put_bytes(&body).await?;
    if by_digest && digest != r {
        return Err(RegError::new(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            format!("manifest hashes to {digest}, not {r}"),
        ));
    }
    let hex = &digest["sha256:".len()..];
    reg.storage
        .link_manifest(name, hex, &media_type, (!by_digest).then_some(r))
        .await?;
    let mut resp = StatusCode::CREATED.into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/v2/{name}/manifests/{digest}")) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&digest) {
        h.insert("Docker-Content-Digest", v);
    }
    if let Some(subject) = doc
        .get("subject")
        .and_then(|s| s.get("digest"))
        .and_then(|d| d.as_str())
        .and_then(|d| HeaderValue::from_str(d).ok())
    {
        h.insert("OCI-Subject", subject);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_at_the_last_keyword() {
        assert_eq!(parse_path("/v2/"), Some(Target::Base));
        assert_eq!(parse_path("/v2"), Some(Target::Base));
        assert_eq!(
            parse_path("/v2/modules/base/blobs/sha256:ab"),
            Some(Target::Blob("modules/base", "sha256:ab"))
        );
        assert_eq!(
            parse_path("/v2/a/b/blobs/uploads/"),
            Some(Target::UploadStart("a/b"))
        );
        assert_eq!(
            parse_path("/v2/a/b/blobs/uploads/123"),
            Some(Target::Upload("a/b", "123"))
        );
        assert_eq!(
            parse_path("/v2/a/manifests/v1"),
            Some(Target::Manifest("a", "v1"))
        );
        assert_eq!(parse_path("/v2/a/b/tags/list"), Some(Target::Tags("a/b")));
        assert_eq!(parse_path("/v3/a"), None);
    }
}
