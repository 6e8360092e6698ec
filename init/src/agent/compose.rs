//! The root modules composed into a root for the hand-off: the desired set fetched,
//! the root modules pulled and verified into the node's module store, their union
//! mounted; and the repair of that store when the kernel refused a block of it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use powernode_agent::client::ApiClient;
use powernode_agent::modules::mount::UnionRoot;
use powernode_agent::verity::VerityDigest;
use powernode_proto::node::{ComposeStats, DesiredModulesResponse, RootFacts, RunningModule};
use powernode_proto::ErrorCode;

use super::mounter::LoopMounter;

/// Why the composed root could not be built; `code` is the wire code reported upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeError {
    pub code: ErrorCode,
    pub message: String,
}

impl ComposeError {
    pub fn internal(message: String) -> Self {
        Self {
            code: ErrorCode::Internal,
            message,
        }
    }
}

/// What [`compose`] did.
#[derive(Debug)]
pub enum Composed {
    /// The desired set names no root module: the initramfs stays the root. The
    /// set is kept for the agent's first reconcile.
    NoRoot(DesiredModulesResponse),
    /// The root modules mounted at the target.
    Root(Box<ComposedUnion>),
}

/// The root modules' union, mounted.
#[derive(Debug)]
pub struct ComposedUnion {
    /// Base first.
    pub modules: Vec<RunningModule>,
    pub facts: RootFacts,
    /// The store the images are in, and the images (for [`repair`]).
    pub store_dir: PathBuf,
    pub images: Vec<VerityDigest>,
    /// What was mounted, to take down before a retry.
    pub union: UnionRoot,
}

/// Fetches the desired modules; when they include `root` modules, pulls and
/// verifies them into the store under `state_dir` and mounts their union at
/// `target`.
pub fn compose(
    rt: &tokio::runtime::Runtime,
    client: &ApiClient,
    state_dir: &Path,
    pinned_keys: &[String],
    target: &str,
) -> Result<Composed, ComposeError> {
    use powernode_agent::modules::{module_runtime, mount, registry, trust};
    let desired = rt
        .block_on(client.get::<DesiredModulesResponse>(powernode_proto::paths::DESIRED_MODULES))
        .map_err(|e| ComposeError {
            code: e.report_code(),
            message: format!(
                "fetching the desired modules: {}",
                powernode_agent::error_chain(&e)
            ),
        })?;
    let roots: Vec<RunningModule> = desired
        .modules
        .iter()
        .filter(|m| m.kind == module_runtime::KIND_ROOT)
        .map(|m| RunningModule {
            name: m.name.clone(),
            version: m.version.clone(),
            digest: m.digest.clone(),
        })
        .collect();
    if roots.is_empty() {
        log::info!("no root modules desired; the initramfs stays the root");
        return Ok(Composed::NoRoot(desired));
    }
    // The embedded registry serves HTTPS with the control-plane CA kept at enrollment.
    let ca_path = state_dir.join(powernode_agent::state::CA_FILE);
    let ca_pem = std::fs::read_to_string(&ca_path)
        .map_err(|e| ComposeError::internal(format!("reading {}: {e}", ca_path.display())))?;
    let store_dir = state_dir.join("store");
    std::fs::create_dir_all(&store_dir)
        .map_err(|e| ComposeError::internal(format!("creating {}: {e}", store_dir.display())))?;
    let store = open_store(&store_dir).map_err(ComposeError::internal)?;
    let opts = registry::RegistryOptions {
        ca_pem: Some(ca_pem),
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let work = state_dir.join("compose");
    std::fs::create_dir_all(target)
        .map_err(|e| ComposeError::internal(format!("creating {target}: {e}")))?;
    // A persistent node keeps the root's writes on /persist, next to its store.
    let upper = if state_dir.starts_with(crate::layout::PERSIST_MOUNT) {
        mount::Upper::Dir(state_dir.join("root"))
    } else {
        mount::Upper::Tmpfs
    };
    let floor = trust::VersionFloor::load(&state_dir.join(trust::FLOOR_FILE))
        .map_err(|e| ComposeError::internal(powernode_agent::error_chain(&e)))?;
    let started = std::time::Instant::now();
    let union = module_runtime::compose_root(
        &desired,
        &trust::TrustAnchor::pinned(pinned_keys.to_vec()),
        &floor,
        &store,
        opts,
        &LoopMounter,
        &work,
        &upper,
        std::path::Path::new(target),
    )
    .map_err(|e| {
        use powernode_agent::modules::ModuleErrorCode;
        ComposeError {
            code: e.code(),
            message: powernode_agent::error_chain(&e),
        }
    })?;
    let stats = store.stats();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let facts = RootFacts {
        verity: match store.verity_mode() {
            powernode_agent::modules::store::VerityMode::Kernel => "require",
            powernode_agent::modules::store::VerityMode::Userspace => "userspace",
        }
        .into(),
        store: store_dir.display().to_string(),
        upper: match &upper {
            mount::Upper::Tmpfs => "tmpfs".into(),
            mount::Upper::Dir(d) => d.display().to_string(),
        },
        compose: Some(ComposeStats {
            bytes_fetched: union.fetched_bytes,
            objects_added: stats.objects_added,
            bytes_added: stats.bytes_added,
            verity_enabled: stats.verity_enabled,
            verity_enable_ms: ms(Duration::from_nanos(stats.verity_enable_ns)),
            compose_ms: ms(started.elapsed()),
            checked: Vec::new(),
        }),
        ..RootFacts::default()
    };
    log::info!(
        "composed root at {} from {} root module(s): store {} (verity {}), upper {}, \
         {} bytes fetched, {} objects added, fs-verity enabled on {} in {} ms, \
         {} objects re-hashed ({} bytes), {} checks skipped (written this boot)",
        union.target.display(),
        roots.len(),
        facts.store,
        facts.verity,
        facts.upper,
        union.fetched_bytes,
        stats.objects_added,
        stats.verity_enabled,
        stats.verity_enable_ns / 1_000_000,
        stats.objects_rehashed,
        stats.bytes_rehashed,
        stats.rehash_skipped
    );
    // Image mounts are `work/images/<hex>`.
    let images = union
        .image_mounts
        .iter()
        .filter_map(|p| p.file_name()?.to_str()?.parse().ok())
        .collect();
    Ok(Composed::Root(Box::new(ComposedUnion {
        modules: roots,
        facts,
        store_dir,
        images,
        union,
    })))
}

/// After a read of the composed root failed: reads every object of `images` in
/// full and moves the corrupt ones out of the store, so the next boot fetches
/// them again. Returns their digests.
pub fn repair(store_dir: &Path, images: &[VerityDigest]) -> Result<Vec<String>, ComposeError> {
    use powernode_agent::modules::store::ObjectStore;
    let fail = |e: powernode_agent::modules::store::StoreError| ComposeError {
        code: ErrorCode::Internal,
        message: format!(
            "scrubbing the store {}: {}",
            store_dir.display(),
            powernode_agent::error_chain(&e)
        ),
    };
    let store = ObjectStore::open(store_dir).map_err(fail)?;
    let mut moved = Vec::new();
    for image in images {
        for d in store.scrub_image(image).map_err(fail)? {
            log::warn!("store: object {d} is corrupt; moved out, fetched again next boot");
            moved.push(d.to_string());
        }
    }
    Ok(moved)
}

/// Opens the node's module store. The accelerated sha256 is loaded first (on demand:
/// a node without modules never pays for it): fs-verity picks its hash when the
/// store first enables verity, and keeps it. Without it `sha256-generic` serves.
pub fn open_store(
    store_dir: &Path,
) -> Result<powernode_agent::modules::store::ObjectStore, String> {
    if let Err(chain) = crate::modules::load_on_demand("fs-verity", crate::layout::VERITY_MODULES) {
        log::warn!("accelerated sha256 not loaded, fs-verity uses the generic one: {chain}");
    }
    powernode_agent::modules::store::ObjectStore::open(store_dir).map_err(|e| {
        format!(
            "module store {}: {}",
            store_dir.display(),
            powernode_agent::error_chain(&e)
        )
    })
}
