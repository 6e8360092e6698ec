//! One module, end to end up to the store: manifest by pinned digest, cosign signature
//! against the trust keys, then (unless the signed image is already stored) config and
//! layers streamed through their digests into [`install_image_gated`], which rebuilds the
//! composefs image and refuses it unless it is the signed one.
//!
//! A layer whose (signed) descriptor names a table of contents is fetched by ranges
//! when the store already has most of it: only the missing files move (see
//! `powernode_modfmt::toc`); otherwise, and for layers without one, the blob is
//! streamed whole.
//!
//! Order matters: nothing from a layer is read before the manifest matched its pin
//! (which fixes the layer digests and the composefs digest annotation), and nothing is
//! recorded as installed before the signature over that manifest verified; the
//! signature is checked on a second thread meanwhile (see [`pull_module`]).

use powernode_proto::node::COMPOSEFS_DIGEST_ANNOTATION;
use powernode_proto::ErrorCode;

use std::collections::HashSet;
use std::io::Read as _;

use powernode_modfmt::toc::{decode_toc, TocLocation};
use powernode_modfmt::{install_image_gated, LayerInput};
use std::time::{Duration, Instant};

use super::error::CodedStreamError;
use super::registry::{
    Descriptor, FetchedManifest, RangeRead, RegistryClient, RegistryError, Repository,
};
use super::signature::{verify_signature, Expected, SignatureError, TrustKey};
use super::store::ObjectStore;
use super::unpack::Compression;
use super::{InstallError, InstallReport, ModuleErrorCode};
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
    pub ranged: RangedStats,
    /// From the call to the signature verified (it runs while the manifest and the
    /// layers arrive).
    pub verify_time: Duration,
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

/// The signature check, running on its own thread while the manifest and the layers
/// arrive; joined once, its verdict kept.
struct PendingSignature<'s> {
    handle: Option<std::thread::ScopedJoinHandle<'s, (Result<(), SignatureError>, Duration)>>,
    verdict: Option<Result<(), SignatureError>>,
    took: Duration,
}

impl PendingSignature<'_> {
    /// Waits for the check; true when the signature verified.
    fn verified(&mut self) -> bool {
        if let Some(h) = self.handle.take() {
            let (verdict, took) = h.join().unwrap_or_else(|_| {
                let e = SignatureError::Mismatch {
                    digest: String::new(),
                    reason: "the signature check panicked".into(),
                };
                (Err(e), Duration::ZERO)
            });
            self.verdict = Some(verdict);
            self.took = took;
        }
        matches!(self.verdict, Some(Ok(())))
    }

    /// The failure, once [`verified`](Self::verified) said false.
    fn error(&mut self) -> Option<SignatureError> {
        match self.verdict.take() {
            Some(Err(e)) => Some(e),
            other => {
                self.verdict = other;
                None
            }
        }
    }
}

/// Pulls, verifies and stores the module `repo@pinned`; with `expected`, its signature
/// must name that repository path, module name and version too.
///
/// The signature names the pinned digest, so it is fetched and checked on a second
/// thread while the manifest (checked against the pin) and the layers (checked
/// against the manifest) stream: layer objects may land in the store before the
/// signature verified, but the image is recorded, and the module reported, only after
/// it did. Any failure after the pin check is reported as the signature's when the
/// signature failed too (an unsigned module's other faults are not worth naming).
pub fn pull_module(
    client: &RegistryClient,
    repo: &Repository,
    pinned: &str,
    keys: &[TrustKey],
    expected: Option<&Expected<'_>>,
    store: &ObjectStore,
) -> Result<PullReport, PullError> {
    if !valid_pin(pinned) {
        return Err(PullError::BadPin(pinned.into()));
    }
    let start = client.bytes_received();
    let started = Instant::now();
    // The manifest's digest is the pin once it matched (lower-case hex).
    let signed = pinned.to_ascii_lowercase();
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("module-signature".into())
            .spawn_scoped(s, || {
                let verdict = verify_signature(client, repo, &signed, keys, expected);
                (verdict, started.elapsed())
            });
        let mut pending = match handle {
            Ok(h) => PendingSignature {
                handle: Some(h),
                verdict: None,
                took: Duration::ZERO,
            },
            Err(_) => PendingSignature {
                handle: None,
                verdict: Some(verify_signature(client, repo, &signed, keys, expected)),
                took: started.elapsed(),
            },
        };
        let fetched = client.manifest(repo, pinned, Some(pinned))?;
        let result = pull_pinned(client, repo, &fetched, store, &mut pending);
        if !pending.verified() {
            if let Some(e) = pending.error() {
                return Err(PullError::Signature(e));
            }
        }
        let (install, ranged) = result?;
        Ok(PullReport {
            manifest_digest: fetched.digest.clone(),
            install,
            bytes_received: client.bytes_received() - start,
            ranged,
            verify_time: pending.took,
        })
    })
}

/// The part of [`pull_module`] after the manifest matched its pin.
fn pull_pinned(
    client: &RegistryClient,
    repo: &Repository,
    fetched: &FetchedManifest,
    store: &ObjectStore,
    pending: &mut PendingSignature<'_>,
) -> Result<(InstallReport, RangedStats), PullError> {
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
    // The config is checked before any layer byte is used. With a streamed first
    // layer it is fetched once that layer's request is out, so the layer's read-ahead
    // fills during the config round trip instead of after it.
    let mut config_unchecked = !store.has_image(&image);
    if config_unchecked && m.layers.is_empty() {
        client.check_config(repo, m)?;
        config_unchecked = false;
    }
    let check_config = |unchecked: &mut bool| {
        if std::mem::take(unchecked) {
            client.check_config(repo, m).map_err(|e| coded(&e))?;
        }
        Ok::<(), CodedStreamError>(())
    };
    let mut ranged = RangedStats::default();
    let install = install_image_gated(
        store,
        &image,
        m.layers.len(),
        |i| {
            let desc = &m.layers[i];
            if has_toc(desc) {
                check_config(&mut config_unchecked)?;
            }
            if let Some(input) = ranged_layer(client, repo, desc, store, &mut ranged)? {
                return Ok(input);
            }
            let reader = client.blob(repo, desc).map_err(|e| coded(&e))?;
            check_config(&mut config_unchecked)?;
            Ok(LayerInput::Stream {
                media_type: desc.media_type.clone(),
                reader,
            })
        },
        // Nothing is recorded before the signature verified (its error is reported
        // by the caller).
        || match pending.verified() {
            true => Ok(()),
            false => Err(CodedStreamError {
                code: ErrorCode::SignatureMismatch,
                message: "signature not verified".into(),
            }),
        },
    )
    .map_err(|source| PullError::Install {
        digest: fetched.digest.clone(),
        source,
    })?;
    Ok((install, ranged))
}

/// How the layers of a pull were fetched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RangedStats {
    /// Layers built from their TOC (only missing objects fetched).
    pub toc_layers: u64,
    /// Ranged reads made (TOCs included).
    pub range_requests: u64,
    /// Layers with a TOC fetched whole anyway (most content missing, or the registry
    /// would not serve the range).
    pub fallbacks: u64,
}

/// Members closer than this share one ranged read.
const MAX_GAP: u64 = 16 << 10;
/// Ranged reads stream, so this only bounds how much one request carries.
const MAX_RANGE: u64 = 64 << 20;

fn coded(e: &(impl ModuleErrorCode + std::error::Error + 'static)) -> CodedStreamError {
    CodedStreamError {
        code: e.code(),
        message: crate::error_chain(e),
    }
}

/// True when the store holds at least one object (a first pull fetches layers whole:
/// one request beats a TOC plus ranges when everything is missing).
fn store_has_objects(store: &ObjectStore) -> bool {
    std::fs::read_dir(store.objects_dir())
        .into_iter()
        .flatten()
        .flatten()
        .any(|d| {
            std::fs::read_dir(d.path())
                .map(|mut e| e.next().is_some())
                .unwrap_or(false)
        })
}

/// True when the layer's (signed) descriptor names a TOC: it may be range-read.
fn has_toc(desc: &Descriptor) -> bool {
    !matches!(
        TocLocation::from_annotations(&desc.annotations, desc.size),
        Ok(None)
    )
}

/// The layer through its TOC, when it has one (a signed layer annotation), the store
/// already has objects, and less than half the blob is missing: the TOC and the missing
/// members are range-read, each object checked against its fs-verity digest as it is
/// stored. `None`: fetch the blob whole (also when the registry refuses a range).
fn ranged_layer<R>(
    client: &RegistryClient,
    repo: &Repository,
    desc: &Descriptor,
    store: &ObjectStore,
    stats: &mut RangedStats,
) -> Result<Option<LayerInput<R>>, CodedStreamError> {
    if Compression::from_media_type(&desc.media_type).ok() != Some(Compression::Gzip) {
        return Ok(None);
    }
    let loc = match TocLocation::from_annotations(&desc.annotations, desc.size) {
        Ok(Some(loc)) => loc,
        Ok(None) => return Ok(None),
        Err(e) => {
            // Signed but unusable: the whole blob is still checked by its digest.
            tracing::warn!(layer = %desc.digest, error = %e, "layer TOC annotation unusable; fetching the layer whole");
            return Ok(None);
        }
    };
    if !store_has_objects(store) {
        return Ok(None);
    }
    let fallback = |stats: &mut RangedStats, status: u16| {
        tracing::info!(layer = %desc.digest, status, "registry refused a range; fetching the layer whole");
        stats.fallbacks += 1;
        Ok(None)
    };
    stats.range_requests += 1;
    let mut toc_bytes = Vec::new();
    match client
        .blob_range(repo, desc, loc.offset, loc.offset + loc.size)
        .map_err(|e| coded(&e))?
    {
        // At most `loc.size` (<= MAX_TOC_SIZE) bytes; a short body fails the digest.
        RangeRead::Body(mut body) => body.read_to_end(&mut toc_bytes).map_err(|e| {
            coded(&RegistryError::Read {
                what: format!("TOC of {}", desc.digest),
                source: e,
            })
        })?,
        RangeRead::Unsupported { status } => return fallback(stats, status),
    };
    let toc = decode_toc(&toc_bytes, &loc).map_err(|e| coded(&e))?;
    let plan = toc
        .plan(|d| store.contains(d), MAX_GAP, MAX_RANGE, loc.offset)
        .map_err(|e| coded(&e))?;
    if plan.range_bytes > desc.size / 2 {
        stats.fallbacks += 1;
        return Ok(None);
    }
    let mut fetched = HashSet::new();
    for range in &plan.ranges {
        stats.range_requests += 1;
        let body = match client
            .blob_range(repo, desc, range.start, range.end)
            .map_err(|e| coded(&e))?
        {
            RangeRead::Body(body) => body,
            // Objects stored so far are verified and stay; the blob fills the rest.
            RangeRead::Unsupported { status } => return fallback(stats, status),
        };
        fetched.extend(
            toc.store_range(store, range, body, loc.offset)
                .map_err(|e| coded(&e))?,
        );
    }
    stats.toc_layers += 1;
    tracing::debug!(layer = %desc.digest, objects = plan.missing_objects, bytes = plan.range_bytes, ranges = plan.ranges.len(), "layer fetched by TOC");
    Ok(Some(LayerInput::Toc {
        toc,
        data_end: loc.offset,
        fetched,
    }))
}
