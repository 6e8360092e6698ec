//! Module publications, the behaviour side: signing a named manifest (when online
//! signing is on), the trust set, recording a publication, setting a template's
//! module lists. The HTTP routes are in [`crate::api`]; the publisher client is
//! [`crate::cli::publish`].
//!
//! The server never signs a digest of a manifest it was not named, nor without the
//! module name and version the signature binds, and never records a publication of
//! the embedded registry whose manifest is missing, lacks the composefs annotation
//! it claims, or whose signature no key of the trust set made over a payload naming
//! exactly that repository, digest, name and version (a node would refuse it: the
//! publisher learns it first).

use axum::http::StatusCode;
use base64::Engine as _;
use powernode_proto::admin::Template;
use powernode_proto::node::COMPOSEFS_DIGEST_ANNOTATION;
use powernode_proto::ErrorCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::AppState;
use crate::error::{AppError, AppResult};
use crate::model::{new_id, ModulePublication, TemplateModules};
use crate::registry::{parse_digest, valid_repo, valid_tag, Storage};
use crate::signing::{
    check_layer, signature_tag, Expected, LayerRefused, PublicKey, SIGNATURE_ANNOTATION,
    SIMPLESIGNING_MEDIA_TYPE,
};

#[derive(Debug, Deserialize)]
pub struct SignRequest {
    /// The module name and version the signature binds (the payload's
    /// `org.powernode.module.{name,version}` annotations).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    /// `host[:port]` of an external registry; absent: the embedded one (named by the
    /// control plane's public URL, as nodes reach it).
    #[serde(default)]
    pub registry: Option<String>,
    pub repository: String,
    pub digest: String,
}

#[derive(Debug, Deserialize)]
pub struct RecordRequest {
    pub name: String,
    pub version: String,
    #[serde(default = "default_kind")]
    pub kind: String,
    #[serde(default)]
    pub registry: Option<String>,
    pub repository: String,
    pub digest: String,
    pub composefs_digest: String,
    pub signature_digest: String,
}

fn default_kind() -> String {
    "root".to_string()
}

#[derive(Debug, Deserialize)]
pub struct SetTemplateModules {
    #[serde(default)]
    pub root_modules: Vec<String>,
    #[serde(default)]
    pub runtime_modules: Vec<String>,
}

/// Module names: lowercase `[a-z0-9]` with inner `.`, `_`, `-` (they become
/// repository path components).
pub fn valid_module_name(name: &str) -> bool {
    valid_repo(name) && !name.contains('/') && name.len() <= 100
}

fn module_invalid(msg: impl Into<String>) -> AppError {
    AppError::new(StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::BadRequest, msg)
}

fn signature_refused(msg: impl Into<String>) -> AppError {
    AppError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::SignatureMismatch,
        msg,
    )
}

/// The name and version rules of every publication.
fn check_name_version(name: &str, version: &str) -> AppResult<()> {
    if !valid_module_name(name) {
        return Err(AppError::bad_request(
            "module name: lowercase letters, digits and inner . _ -",
        ));
    }
    if !valid_tag(version) {
        return Err(AppError::bad_request("version must be a valid OCI tag"));
    }
    Ok(())
}

impl AppState {
    /// Module publications, newest first.
    pub fn module_publications(&self) -> Vec<ModulePublication> {
        let mut v = self.modules.publications();
        v.reverse();
        v
    }

    /// The public half of the online module-signing key, PEM (409 when online
    /// signing is off).
    pub fn module_signing_key(&self) -> AppResult<String> {
        Ok(self.modules.key()?.public_pem().to_string())
    }

    /// What a publisher needs to sign offline: whether the server signs online, the
    /// host a signature of the embedded registry names (the control plane's public
    /// host, as nodes reach it), and the trust set.
    pub fn module_trust(&self) -> Value {
        json!({
            "online_signing": self.modules.online_signing(),
            "registry_host": self.public_host(),
            "trust_keys": self.modules.trust_keys(),
        })
    }

    /// Signs the named manifest with the module-signing key, binding the module's
    /// name and version; answers the cosign payload and signature for the
    /// publisher to push.
    pub fn sign_module(&self, req: SignRequest) -> AppResult<Value> {
        let (Some(name), Some(version)) = (req.name.as_deref(), req.version.as_deref()) else {
            return Err(AppError::bad_request(
                "name and version are required: the signature binds them",
            ));
        };
        check_name_version(name, version)?;
        if !valid_repo(&req.repository) || parse_digest(&req.digest).is_none() {
            return Err(AppError::bad_request(
                "repository must be a registry path and digest sha256:HEX",
            ));
        }
        let host = req
            .registry
            .clone()
            .unwrap_or_else(|| self.public_host().to_string());
        let reference = format!("{host}/{}", req.repository);
        let s = self
            .modules
            .key()?
            .sign_manifest(&reference, &req.digest, name, version)
            .map_err(|e| AppError::internal(&e))?;
        Ok(json!({
            "docker_reference": reference,
            "payload": base64::engine::general_purpose::STANDARD.encode(&s.payload),
            "signature": s.signature_b64,
            "tag": signature_tag(&req.digest),
        }))
    }

    /// Records a pushed, signed module version (checked against the embedded
    /// registry when it is there) and schedules the module updates it causes.
    pub async fn record_module_publication(
        &self,
        req: RecordRequest,
    ) -> AppResult<ModulePublication> {
        check_name_version(&req.name, &req.version)?;
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
            check_embedded(&self.modules.storage, self.modules.trust(), &req).await?;
        }
        let now = self.clock.now_ms();
        let p = ModulePublication {
            id: new_id("modpub"),
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
        self.store.insert_module_publication(p.clone()).await?;
        self.modules.push_publication(p.clone());
        tracing::info!(name = %p.name, version = %p.version, digest = %p.digest, "module published");
        // Affected nodes get their module_update task now, not at the next sensor pass.
        self.schedule_module_changes().await;
        Ok(p)
    }

    /// Overrides a template's module lists; answers the template as it now is.
    pub async fn set_template_modules(
        &self,
        id: &str,
        req: SetTemplateModules,
    ) -> AppResult<Template> {
        let Some(mut template) = self.catalog.templates.iter().find(|t| t.id == id).cloned() else {
            return Err(AppError::not_found("template", id));
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
            template_id: id.to_string(),
            root_modules: req.root_modules,
            runtime_modules: req.runtime_modules,
        };
        self.store.save_template_modules(t.clone()).await?;
        self.modules.set_template(t);
        self.modules.apply_to_template(&mut template);
        self.schedule_module_changes().await;
        Ok(template)
    }
}
/// For the embedded registry we can check the claim: the manifest is there, its
/// annotation names the composefs digest, the signature tag holds the given
/// signature manifest, and one of its layers is a signature the trust set made
/// over this repository, digest, name and version.
async fn check_embedded(
    storage: &Storage,
    trust: &[PublicKey],
    req: &RecordRequest,
) -> AppResult<()> {
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
    let want = Expected {
        repository: &req.repository,
        digest: &req.digest,
        name: &req.name,
        version: &req.version,
    };
    check_signature(storage, trust, &req.signature_digest, &want).await
}

/// Signature layers looked at, at most (cosign appends one per `cosign sign`).
const MAX_SIGNATURE_LAYERS: usize = 64;
/// A simple-signing payload is a few hundred bytes; larger layers are not read.
const MAX_PAYLOAD_BYTES: u64 = 64 * 1024;

/// Finds a layer of signature manifest `signature_digest` that stands for `want`
/// (see [`check_layer`]); refuses with what the best layer lacked.
async fn check_signature(
    storage: &Storage,
    trust: &[PublicKey],
    signature_digest: &str,
    want: &Expected<'_>,
) -> AppResult<()> {
    let io = |e: crate::registry::StorageError| AppError::internal(&e);
    let hex = parse_digest(signature_digest).expect("checked");
    let bytes = storage
        .read_blob(hex)
        .await
        .map_err(io)?
        .unwrap_or_default();
    let doc: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let layers = doc["layers"].as_array().cloned().unwrap_or_default();
    let mut best: Option<LayerRefused> = None;
    for layer in layers.iter().take(MAX_SIGNATURE_LAYERS) {
        if layer["mediaType"] != SIMPLESIGNING_MEDIA_TYPE
            || layer["size"].as_u64().is_none_or(|n| n > MAX_PAYLOAD_BYTES)
        {
            continue;
        }
        let (Some(sig), Some(hex)) = (
            layer["annotations"][SIGNATURE_ANNOTATION].as_str(),
            layer["digest"].as_str().and_then(parse_digest),
        ) else {
            continue;
        };
        let Some(payload) = storage.read_blob(hex).await.map_err(io)? else {
            continue;
        };
        match check_layer(trust, &payload, sig, want) {
            Ok(()) => return Ok(()),
            // A trusted signature naming something else says more than an
            // untrusted one.
            Err(e) if best.as_ref().is_none_or(|b| e.trusted() && !b.trusted()) => best = Some(e),
            Err(_) => {}
        }
    }
    Err(signature_refused(match best {
        None => format!(
            "signature {signature_digest} has no cosign signature layer; sign with a key of \
             the trust set"
        ),
        Some(e @ (LayerRefused::Untrusted | LayerRefused::SignatureEncoding)) => format!(
            "signature {signature_digest} was not made by a key of the trust set ({e}); \
             nodes would refuse it: sign with a trusted key (serve --module-trust-key)"
        ),
        Some(e) => format!(
            "signature {signature_digest} does not stand for {}@{} {} {}: {e}",
            want.repository, want.digest, want.name, want.version
        ),
    }))
}
