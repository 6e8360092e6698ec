//! One module, end to end up to the store: manifest by pinned digest, cosign signature
//! against the trust keys, then (unless the signed image is already stored) config and
//! layers streamed through their digests into [`install_image`], which rebuilds the
//! composefs image and refuses it unless it is the signed one.
//!
//! Order matters: nothing from a layer is read before the manifest matched its pin and
//! its signature verified, since the signature covers the manifest and so the layer
//! digests and the composefs digest annotation.

use powernode_proto::node::COMPOSEFS_DIGEST_ANNOTATION;
use powernode_proto::ErrorCode;

use super::registry::{RegistryClient, RegistryError, Repository};
use super::signature::{verify_signature, SignatureError, TrustKey};
use super::store::ObjectStore;
use super::unpack::CodedStreamError;
use super::{install_image, InstallError, InstallReport, ModuleErrorCode};
use crate::verity::VerityDigest;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("pinned digest {0:?} is not sha256:HEX")]
    BadPin(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("manifest {digest}: composefs digest annotation {reason}")]
    Annotation { digest: String, reason: String },
    #[error("installing {digest}")]
    Install {
        digest: String,
        #[source]
        source: InstallError,
    },
}

impl ModuleErrorCode for PullError {
    fn code(&self) -> ErrorCode {
        match self {
            PullError::BadPin(_) => ErrorCode::DigestMismatch,
            PullError::Registry(e) => e.code(),
            PullError::Signature(e) => e.code(),
            PullError::Annotation { .. } => ErrorCode::VerityMismatch,
            PullError::Install { source, .. } => source.code(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PullReport {
    pub manifest_digest: String,
    pub install: InstallReport,
    /// Body bytes this pull received (manifests, signature, config, layers).
    pub bytes_received: u64,
}

impl PullReport {
    pub fn image(&self) -> VerityDigest {
        self.install.image
    }
}

fn valid_pin(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Pulls, verifies and stores the module `repo@pinned`.
pub fn pull_module(
    client: &RegistryClient,
    repo: &Repository,
    pinned: &str,
    keys: &[TrustKey],
    store: &ObjectStore,
) -> Result<PullReport, PullError> {
    if !valid_pin(pinned) {
        return Err(PullError::BadPin(pinned.into()));
    }
    let start = client.bytes_received();
    let fetched = client.manifest(repo, pinned, Some(pinned))?;
    verify_signature(client, repo, &fetched.digest, keys)?;
    let m = &fetched.manifest;
    let annotation = |reason: &str| PullError::Annotation {
        digest: fetched.digest.clone(),
        reason: reason.into(),
    };
    let image: VerityDigest = m
        .annotations
        .get(COMPOSEFS_DIGEST_ANNOTATION)
        .ok_or_else(|| annotation("missing"))?
        .parse()
        .map_err(|_| annotation("is not sha256:HEX"))?;
    if !store.has_image(&image) {
        client.check_config(repo, m)?;
    }
    let install = install_image(store, &image, m.layers.len(), |i| {
        let desc = &m.layers[i];
        let reader = client.blob(repo, desc).map_err(|e| CodedStreamError {
            code: e.code(),
            message: crate::error_chain(&e),
        })?;
        Ok((desc.media_type.clone(), reader))
    })
    .map_err(|source| PullError::Install {
        digest: fetched.digest.clone(),
        source,
    })?;
    Ok(PullReport {
        manifest_digest: fetched.digest.clone(),
        install,
        bytes_received: client.bytes_received() - start,
    })
}
