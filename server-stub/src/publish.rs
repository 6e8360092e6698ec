//! Module publications: the server side (signing on request, recording
//! publications, template module lists, what a node should run) and the publisher
//! client behind `powernode-stub publish-module` (build or read an OCI image,
//! compute its composefs digest with `powernode-modfmt`, push, sign, record).
//!
//! The server never signs a digest of a manifest it was not named, and never
//! records a publication of the embedded registry whose manifest is missing, lacks
//! the composefs annotation it claims, or is unsigned.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context as _};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::Router;
use base64::Engine as _;
use powernode_proto::node::{
    DesiredModule, COMPOSEFS_DIGEST_ANNOTATION, MODULE_NAME_ANNOTATION, MODULE_VERSION_ANNOTATION,
};
use powernode_proto::{paths, ErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest as _;

use crate::api::Json;
use crate::error::{AppError, AppResult};
use crate::registry::{parse_digest, valid_repo, valid_tag, Storage, OCI_MANIFEST};
use crate::service::AppState;
use crate::signing::{signature_tag, Signature, SigningKey};
use crate::store::{Store, StoreError};

/// One published module version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModulePublication {
    pub id: String,
    pub name: String,
    pub version: String,
    /// `root` or `runtime` (what the publisher meant; templates decide).
    pub kind: String,
    /// `host[:port]` of an external registry; `None`: the embedded one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// Repository path inside the registry, e.g. `modules/base`.
    pub repository: String,
    /// Pinned manifest digest.
    pub digest: String,
    /// fs-verity digest of the module's composefs image (the manifest annotation).
    pub composefs_digest: String,
    /// Digest of the cosign signature manifest (tag `sha256-HEX.sig`).
    pub signature_digest: String,
    pub created_at: String,
    pub created_ms: i64,
}

/// Module lists a template names (overriding the built-in catalog's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateModules {
    pub template_id: String,
    #[serde(default)]
    pub root_modules: Vec<String>,
    #[serde(default)]
    pub runtime_modules: Vec<String>,
}

/// The server's module state: registry storage, signing key, publications.
pub struct Modules {
    pub storage: Storage,
    signing: Result<SigningKey, String>,
    publications: Mutex<Vec<ModulePublication>>,
    templates: Mutex<BTreeMap<String, TemplateModules>>,
    /// Bumped by every publication and template change, so the sensor's safety-net
    /// sweep costs one load when nothing changed.
    generation: AtomicU64,
}

impl std::fmt::Debug for Modules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Modules").finish_non_exhaustive()
    }
}

impl Modules {
    /// Loads publications and template lists, and the signing key (made on first
    /// start; a key that cannot be made or read is logged and answered 500 on use).
    pub fn load(dir: &Path, store: &Store, max_blob: u64) -> Result<Self, StoreError> {
        let signing = SigningKey::load_or_create(dir).map_err(|e| {
            tracing::error!(error = %e, source = ?std::error::Error::source(&e), "module signing key unusable");
            e.to_string()
        });
        let templates = store
            .load_template_modules()?
            .into_iter()
            .map(|t| (t.template_id.clone(), t))
            .collect();
        Ok(Self {
            storage: Storage::new(dir.join("registry"), max_blob),
            signing,
            publications: Mutex::new(store.load_module_publications()?),
            templates: Mutex::new(templates),
            generation: AtomicU64::new(0),
        })
    }

    fn key(&self) -> AppResult<&SigningKey> {
        self.signing
            .as_ref()
            .map_err(|e| AppError::internal(&format!("module signing key: {e}")))
    }

    /// The trust keys nodes verify signatures with.
    pub fn trust_keys(&self) -> Vec<String> {
        self.signing
            .as_ref()
            .map(|k| vec![k.public_pem().to_string()])
            .unwrap_or_default()
    }

    /// Changes so far (publications and template module lists).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn push_publication(&self, p: ModulePublication) {
        self.publications
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(p);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn set_template(&self, t: TemplateModules) {
        self.templates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(t.template_id.clone(), t);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn publications(&self) -> Vec<ModulePublication> {
        self.publications
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn latest(&self, name: &str) -> Option<ModulePublication> {
        self.publications
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .find(|p| p.name == name)
            .cloned()
    }

    /// A template with its module lists overridden by what was set on it.
    pub fn apply_to_template(&self, t: &mut powernode_proto::admin::Template) {
        if let Some(m) = self
            .templates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&t.id)
        {
            t.root_modules = m.root_modules.clone();
            t.runtime_modules = m.runtime_modules.clone();
        }
    }

    /// The latest publication of every module `template` names, root modules first;
    /// names never published are left out (the drift report shows them).
    pub fn desired(
        &self,
        template: &powernode_proto::admin::Template,
        public_host: &str,
    ) -> Vec<DesiredModule> {
        let mut t = template.clone();
        self.apply_to_template(&mut t);
        let mut out = Vec::new();
        for (names, kind) in [(&t.root_modules, "root"), (&t.runtime_modules, "runtime")] {
            for name in names {
                if let Some(p) = self.latest(name) {
                    let host = p.registry.as_deref().unwrap_or(public_host);
                    out.push(DesiredModule {
                        name: p.name,
                        version: p.version,
                        repository: format!("{host}/{}", p.repository),
                        digest: p.digest,
                        kind: kind.to_string(),
                    });
                }
            }
        }
        out
    }
}

/// `host[:port]` of a URL.
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().filter(|h| !h.is_empty())
}

/// Module names: lowercase `[a-z0-9]` with inner `.`, `_`, `-` (they become
/// repository path components).
pub fn valid_module_name(name: &str) -> bool {
    valid_repo(name) && !name.contains('/') && name.len() <= 100
}

// ----- admin API ----------------------------------------------------------------------

/// Admin routes of this module (mounted behind the admin-token guard).
pub fn admin_routes() -> Router<AppState> {
    Router::new()
        .route(
            paths::ADMIN_MODULE_PUBLICATIONS,
            get(list_publications).post(record_publication),
        )
        .route(paths::ADMIN_MODULE_SIGNATURES, post(sign))
        .route(paths::ADMIN_MODULE_SIGNING_KEY, get(signing_key))
        .route(
            "/api/v1/system/templates/{id}/modules",
            put(set_template_modules),
        )
}

async fn list_publications(State(st): State<AppState>) -> axum::Json<Value> {
    let mut v = st.modules.publications();
    v.reverse();
    axum::Json(json!({ "publications": v }))
}

async fn signing_key(State(st): State<AppState>) -> AppResult<axum::Json<Value>> {
    Ok(axum::Json(
        json!({"public_key_pem": st.modules.key()?.public_pem()}),
    ))
}

#[derive(Debug, Deserialize)]
struct SignRequest {
    /// `host[:port]` of an external registry; absent: the embedded one (named by the
    /// control plane's public URL, as nodes reach it).
    #[serde(default)]
    registry: Option<String>,
    repository: String,
    digest: String,
}

fn public_host(st: &AppState) -> String {
    url_host(&st.public_url).unwrap_or("localhost").to_string()
}

async fn sign(
    State(st): State<AppState>,
    Json(req): Json<SignRequest>,
) -> AppResult<axum::Json<Value>> {
    if !valid_repo(&req.repository) || parse_digest(&req.digest).is_none() {
        return Err(AppError::bad_request(
            "repository must be a registry path and digest sha256:HEX",
        ));
    }
    let host = req.registry.clone().unwrap_or_else(|| public_host(&st));
    let reference = format!("{host}/{}", req.repository);
    let s = st
        .modules
        .key()?
        .sign_manifest(&reference, &req.digest)
        .map_err(|e| AppError::internal(&e))?;
    Ok(axum::Json(json!({
        "docker_reference": reference,
        "payload": base64::engine::general_purpose::STANDARD.encode(&s.payload),
        "signature": s.signature_b64,
        "tag": signature_tag(&req.digest),
    })))
}

#[derive(Debug, Deserialize)]
struct RecordRequest {
    name: String,
    version: String,
    #[serde(default = "default_kind")]
    kind: String,
    #[serde(default)]
    registry: Option<String>,
    repository: String,
    digest: String,
    composefs_digest: String,
    signature_digest: String,
}

fn default_kind() -> String {
    "root".to_string()
}

fn module_invalid(msg: impl Into<String>) -> AppError {
    AppError::new(StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::BadRequest, msg)
}

async fn record_publication(
    State(st): State<AppState>,
    Json(req): Json<RecordRequest>,
) -> AppResult<(StatusCode, axum::Json<Value>)> {
    if !valid_module_name(&req.name) {
        return Err(AppError::bad_request(
            "module name: lowercase letters, digits and inner . _ -",
        ));
    }
    if !valid_tag(&req.version) {
        return Err(AppError::bad_request("version must be a valid OCI tag"));
    }
    if req.kind != "root" && req.kind != "runtime" {
        return Err(AppError::bad_request("kind is root or runtime"));
    }
    if !valid_repo(&req.repository)
        || parse_digest(&req.digest).is_none()
        || parse_digest(&req.composefs_digest).is_none()
        || parse_digest(&req.signature_digest).is_none()
    {
        return Err(AppError::bad_request(
            "repository must be a registry path; digests sha256:HEX",
        ));
    }
    if req.registry.is_none() {
        check_embedded(&st.modules.storage, &req).await?;
    }
    let now = st.clock.now_ms();
    let p = ModulePublication {
        id: crate::service::new_id("modpub"),
        name: req.name,
        version: req.version,
        kind: req.kind,
        registry: req.registry,
        repository: req.repository,
        digest: req.digest,
        composefs_digest: req.composefs_digest,
        signature_digest: req.signature_digest,
        created_at: crate::clock::format_ts(now),
        created_ms: now,
    };
    st.store.insert_module_publication(p.clone()).await?;
    st.modules.push_publication(p.clone());
    tracing::info!(name = %p.name, version = %p.version, digest = %p.digest, "module published");
    // Affected nodes get their module_update task now, not at the next sensor pass.
    st.schedule_module_changes().await;
    Ok((StatusCode::CREATED, axum::Json(json!({ "publication": p }))))
}

/// For the embedded registry we can check the claim: the manifest is there, its
/// annotation names the composefs digest, and the signature tag holds the given
/// signature manifest.
async fn check_embedded(storage: &Storage, req: &RecordRequest) -> AppResult<()> {
    let io = |e: crate::registry::StorageError| AppError::internal(&e);
    let hex = parse_digest(&req.digest).expect("checked");
    if storage
        .manifest_type(&req.repository, hex)
        .await
        .map_err(io)?
        .is_none()
    {
        return Err(module_invalid(format!(
            "{}@{} is not in the embedded registry",
            req.repository, req.digest
        )));
    }
    let bytes = storage
        .read_blob(hex)
        .await
        .map_err(io)?
        .unwrap_or_default();
    let doc: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if doc["annotations"][COMPOSEFS_DIGEST_ANNOTATION].as_str() != Some(&req.composefs_digest) {
        return Err(module_invalid(format!(
            "the manifest's {COMPOSEFS_DIGEST_ANNOTATION} annotation is not {}",
            req.composefs_digest
        )));
    }
    let tag = signature_tag(&req.digest).expect("checked");
    if storage
        .resolve_tag(&req.repository, &tag)
        .await
        .map_err(io)?
        .as_deref()
        != Some(req.signature_digest.as_str())
    {
        return Err(module_invalid(format!(
            "tag {tag} does not hold signature {}",
            req.signature_digest
        )));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
struct SetTemplateModules {
    #[serde(default)]
    root_modules: Vec<String>,
    #[serde(default)]
    runtime_modules: Vec<String>,
}

async fn set_template_modules(
    State(st): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Json(req): Json<SetTemplateModules>,
) -> AppResult<axum::Json<Value>> {
    let Some(mut template) = st.catalog.templates.iter().find(|t| t.id == id).cloned() else {
        return Err(AppError::not_found("template", &id));
    };
    if let Some(bad) = req
        .root_modules
        .iter()
        .chain(&req.runtime_modules)
        .find(|n| !valid_module_name(n))
    {
        return Err(AppError::bad_request(format!(
            "invalid module name {bad:?}"
        )));
    }
    let t = TemplateModules {
        template_id: id.clone(),
        root_modules: req.root_modules,
        runtime_modules: req.runtime_modules,
    };
    st.store.save_template_modules(t.clone()).await?;
    st.modules.set_template(t);
    st.modules.apply_to_template(&mut template);
    st.schedule_module_changes().await;
    Ok(axum::Json(json!({ "template": template })))
}

// ----- publisher client ---------------------------------------------------------------

/// A module image ready to push: blobs (config and layers) and the manifest bytes.
#[derive(Debug)]
pub struct ModuleImage {
    /// `(digest, source)`: layers and config.
    pub blobs: Vec<(String, BlobSource)>,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub composefs_digest: String,
}

/// Where a blob's bytes are.
#[derive(Debug)]
pub enum BlobSource {
    Memory(Vec<u8>),
    File(PathBuf),
}

fn sha256_digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

fn annotations(name: &str, version: &str, composefs: &str) -> Value {
    json!({
        COMPOSEFS_DIGEST_ANNOTATION: composefs,
        MODULE_NAME_ANNOTATION: name,
        MODULE_VERSION_ANNOTATION: version,
    })
}

/// How a folder becomes a module (an OCI image layout says all this itself).
#[derive(Debug, Clone, Default)]
pub struct FolderOptions {
    /// Keep the files' owners (a distribution root: daemons' own users, setuid
    /// helpers' groups); otherwise every file is 0:0.
    pub preserve_owners: bool,
    /// Image config labels (`org.powernode.services`, `org.powernode.drain`,
    /// `org.powernode.mountpoint`), covered by the signature like the files.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Builds a module image from a folder: one reproducible layer (modfmt).
pub fn image_from_folder(dir: &Path, name: &str, version: &str) -> anyhow::Result<ModuleImage> {
    image_from_folder_with(dir, name, version, &FolderOptions::default())
}

/// [`image_from_folder`] with owners kept or labels set.
pub fn image_from_folder_with(
    dir: &Path,
    name: &str,
    version: &str,
    opts: &FolderOptions,
) -> anyhow::Result<ModuleImage> {
    use powernode_modfmt::publish::{build_module, BuildOptions};
    let scratch_dir = tempfile::tempdir().context("scratch directory")?;
    let scratch = powernode_modfmt::store::ObjectStore::open(scratch_dir.path())
        .context("scratch object store")?;
    let build = BuildOptions {
        preserve_owners: opts.preserve_owners,
        ..BuildOptions::default()
    };
    let m = build_module(dir, &build, &scratch)
        .with_context(|| format!("building a module from {}", dir.display()))?;
    let composefs = m.image_digest.to_string();
    let container_config = if opts.labels.is_empty() {
        json!({})
    } else {
        json!({"Labels": opts.labels})
    };
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [m.diff_id]},
        "config": container_config,
    }))?;
    let config_digest = sha256_digest(&config);
    let mut layer_descriptor = json!({
        "mediaType": m.layer_media_type,
        "digest": m.layer_digest,
        "size": m.layer.len(),
    });
    if let Some(toc) = &m.toc {
        // The layer's table of contents (signed with the manifest): nodes fetch only
        // the files they lack.
        layer_descriptor["annotations"] = json!(toc.annotations());
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [layer_descriptor],
        "annotations": annotations(name, version, &composefs),
    }))?;
    Ok(ModuleImage {
        manifest_digest: sha256_digest(&manifest),
        manifest,
        composefs_digest: composefs,
        blobs: vec![
            (m.layer_digest, BlobSource::Memory(m.layer)),
            (config_digest, BlobSource::Memory(config)),
        ],
    })
}

fn layout_blob(layout: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let hex = parse_digest(digest).with_context(|| format!("{digest:?} is not sha256:HEX"))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

fn read_layout_json(layout: &Path, digest: &str) -> anyhow::Result<(Value, Vec<u8>)> {
    let p = layout_blob(layout, digest)?;
    let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    if sha256_digest(&bytes) != digest {
        bail!("{} does not hash to its name", p.display());
    }
    Ok((serde_json::from_slice(&bytes)?, bytes))
}

/// Takes the first image of an OCI image layout (an index entry may itself be an
/// index: its first manifest is used), adds the module annotations to its manifest
/// and computes the composefs digest by unpacking its layers as the node will.
pub fn image_from_layout(layout: &Path, name: &str, version: &str) -> anyhow::Result<ModuleImage> {
    let index_path = layout.join("index.json");
    let index: Value = serde_json::from_slice(
        &std::fs::read(&index_path).with_context(|| format!("reading {}", index_path.display()))?,
    )
    .context("index.json is not JSON")?;
    let mut desc = index["manifests"][0].clone();
    let mut manifest = loop {
        let d = desc["digest"]
            .as_str()
            .context("index entry without digest")?;
        let (doc, _) = read_layout_json(layout, d)?;
        if doc.get("manifests").is_some() {
            desc = doc["manifests"][0].clone();
            continue;
        }
        break doc;
    };
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .context("manifest without config")?
        .to_string();
    let layers: Vec<(String, String)> = manifest["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .map(|l| {
            Ok((
                l["mediaType"]
                    .as_str()
                    .context("layer without mediaType")?
                    .to_string(),
                l["digest"]
                    .as_str()
                    .context("layer without digest")?
                    .to_string(),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let scratch_dir = tempfile::tempdir().context("scratch directory")?;
    let scratch = powernode_modfmt::store::ObjectStore::open(scratch_dir.path())
        .context("scratch object store")?;
    let mut readers = Vec::new();
    for (mt, d) in &layers {
        let p = layout_blob(layout, d)?;
        let f = std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        readers.push((mt.as_str(), std::io::BufReader::new(f)));
    }
    let (_, digest) = powernode_modfmt::publish::image_from_layers(&scratch, readers)
        .context("computing the composefs image of the layers")?;
    let composefs = digest.to_string();
    // Docker schema 2 has no annotations: the module becomes an OCI manifest.
    if manifest["mediaType"].as_str() == Some(crate::registry::DOCKER_MANIFEST) {
        manifest["mediaType"] = json!(OCI_MANIFEST);
        manifest["config"]["mediaType"] = json!("application/vnd.oci.image.config.v1+json");
    }
    if manifest["mediaType"].is_null() {
        manifest["mediaType"] = json!(OCI_MANIFEST);
    }
    let mut ann = manifest["annotations"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    if let Value::Object(add) = annotations(name, version, &composefs) {
        ann.extend(add);
    }
    manifest["annotations"] = Value::Object(ann);
    let bytes = serde_json::to_vec(&manifest)?;
    let mut blobs = vec![(
        config_digest.clone(),
        BlobSource::File(layout_blob(layout, &config_digest)?),
    )];
    for (_, d) in &layers {
        blobs.push((d.clone(), BlobSource::File(layout_blob(layout, d)?)));
    }
    Ok(ModuleImage {
        manifest_digest: sha256_digest(&bytes),
        manifest: bytes,
        composefs_digest: composefs,
        blobs,
    })
}

/// A registry push client (distribution spec, two-step monolithic uploads).
#[derive(Debug, Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    /// `https://host:port` or `http://host:port`.
    base: String,
    /// Bearer token (the admin token for the embedded registry).
    token: Option<String>,
}

impl RegistryClient {
    pub fn new(http: reqwest::Client, base: &str, token: Option<String>) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
        }
    }

    pub fn host(&self) -> &str {
        url_host(&self.base).unwrap_or("")
    }

    fn req(&self, m: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(m, url);
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}{location}", self.base)
        }
    }

    /// Pushes one blob unless the registry has it; answers the bytes sent.
    pub async fn push_blob(
        &self,
        repo: &str,
        digest: &str,
        src: &BlobSource,
    ) -> anyhow::Result<u64> {
        let head = self
            .req(
                reqwest::Method::HEAD,
                &format!("{}/v2/{repo}/blobs/{digest}", self.base),
            )
            .send()
            .await
            .context("registry unreachable")?;
        if head.status().is_success() {
            return Ok(0);
        }
        let start = self
            .req(
                reqwest::Method::POST,
                &format!("{}/v2/{repo}/blobs/uploads/", self.base),
            )
            .send()
            .await?;
        if start.status() != reqwest::StatusCode::ACCEPTED {
            bail!(
                "starting an upload: {} {}",
                start.status(),
                start.text().await.unwrap_or_default()
            );
        }
        let loc = start
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .context("upload answer without Location")?;
        let mut url = self.absolute(loc);
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={digest}"));
        let data = match src {
            BlobSource::Memory(b) => b.clone(),
            BlobSource::File(p) => tokio::fs::read(p)
                .await
                .with_context(|| format!("reading {}", p.display()))?,
        };
        let len = data.len() as u64;
        let put = self
            .req(reqwest::Method::PUT, &url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(data)
            .send()
            .await?;
        if put.status() != reqwest::StatusCode::CREATED {
            bail!(
                "uploading {digest}: {} {}",
                put.status(),
                put.text().await.unwrap_or_default()
            );
        }
        Ok(len)
    }

    /// Pushes a manifest at `reference` (tag or digest); answers the registry's digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> anyhow::Result<String> {
        let resp = self
            .req(
                reqwest::Method::PUT,
                &format!("{}/v2/{repo}/manifests/{reference}", self.base),
            )
            .header(reqwest::header::CONTENT_TYPE, media_type)
            .body(bytes.to_vec())
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::CREATED {
            bail!(
                "pushing manifest {reference}: {} {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        }
        let digest = sha256_digest(bytes);
        if let Some(d) = resp
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
        {
            if d != digest {
                bail!("the registry stored manifest {reference} as {d}, we sent {digest}");
            }
        }
        Ok(digest)
    }
}

/// What `publish-module` needs.
#[derive(Debug, Clone)]
pub struct PublishArgs {
    pub source: PathBuf,
    pub name: String,
    pub version: String,
    pub kind: String,
    /// External registry base URL (`http://127.0.0.1:5000`); `None`: embedded.
    pub registry: Option<String>,
    pub folder: FolderOptions,
}

/// Builds or reads the image, pushes it, has the server sign it, pushes the
/// signature and records the publication. Answers the publication JSON and figures.
pub async fn publish_module(
    admin: &crate::cli::AdminClient,
    http: reqwest::Client,
    server_url: &str,
    admin_token: &str,
    args: &PublishArgs,
) -> anyhow::Result<Value> {
    if !valid_module_name(&args.name) {
        bail!(
            "module name {:?}: lowercase letters, digits and inner . _ -",
            args.name
        );
    }
    if !valid_tag(&args.version) {
        bail!("version {:?} is not a valid OCI tag", args.version);
    }
    let src = args.source.clone();
    let (name, version) = (args.name.clone(), args.version.clone());
    let folder = args.folder.clone();
    let t0 = std::time::Instant::now();
    let image = tokio::task::spawn_blocking(move || {
        if src.join("oci-layout").is_file() {
            if folder.preserve_owners || !folder.labels.is_empty() {
                bail!("--preserve-owners and --label apply to a folder; an OCI image layout carries its own owners and labels");
            }
            image_from_layout(&src, &name, &version)
        } else if src.is_dir() {
            image_from_folder_with(&src, &name, &version, &folder)
        } else {
            bail!(
                "{} is neither a folder nor an OCI image layout",
                src.display()
            )
        }
    })
    .await??;
    let build_ms = t0.elapsed().as_millis();
    // The embedded registry takes the admin token; an external one gets no
    // credentials (a local docker-registry), over plain HTTP or HTTPS with our CA.
    let registry = match &args.registry {
        Some(url) => RegistryClient::new(http, url, None),
        None => RegistryClient::new(http, server_url, Some(admin_token.to_string())),
    };
    let registry_host = args.registry.as_ref().map(|_| registry.host().to_string());
    let repo = format!("modules/{}", args.name);
    let t1 = std::time::Instant::now();
    let mut pushed = 0u64;
    for (d, b) in &image.blobs {
        pushed += registry.push_blob(&repo, d, b).await?;
    }
    registry
        .push_manifest(&repo, &args.version, OCI_MANIFEST, &image.manifest)
        .await?;
    let push_ms = t1.elapsed().as_millis();

    let (status, text) = admin
        .call(
            reqwest::Method::POST,
            paths::ADMIN_MODULE_SIGNATURES,
            Some(json!({"registry": registry_host, "repository": repo, "digest": image.manifest_digest})),
        )
        .await?;
    if !status.is_success() {
        bail!("signing: {status} {text}");
    }
    let v: Value = serde_json::from_str(&text)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let sig = Signature {
        payload: b64.decode(v["payload"].as_str().context("no payload")?)?,
        signature_b64: v["signature"].as_str().context("no signature")?.to_string(),
    };
    let sig_image = sig.image();
    for b in [&sig_image.config, &sig.payload] {
        registry
            .push_blob(&repo, &sha256_digest(b), &BlobSource::Memory(b.clone()))
            .await?;
    }
    let tag = signature_tag(&image.manifest_digest).context("digest")?;
    let signature_digest = registry
        .push_manifest(&repo, &tag, OCI_MANIFEST, &sig_image.manifest)
        .await?;

    let (status, text) = admin
        .call(
            reqwest::Method::POST,
            paths::ADMIN_MODULE_PUBLICATIONS,
            Some(json!({
                "name": args.name, "version": args.version, "kind": args.kind,
                "registry": registry_host, "repository": repo,
                "digest": image.manifest_digest, "composefs_digest": image.composefs_digest,
                "signature_digest": signature_digest,
            })),
        )
        .await?;
    if !status.is_success() {
        bail!("recording the publication: {status} {text}");
    }
    let mut out: Value = serde_json::from_str(&text)?;
    out["figures"] = json!({
        "build_ms": build_ms, "push_ms": push_ms, "bytes_pushed": pushed,
    });
    Ok(out)
}
