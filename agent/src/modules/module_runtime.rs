//! The module runtime behind [`crate::module_reconcile::ModuleReconciler`]: pulls, verifies and
//! mounts desired `runtime` modules under `/run/powernode/modules/NAME` (swapping a
//! changed one), unmounts ones no longer desired, and reports what runs. `root` modules
//! are the init's: [`compose_root`] pulls them and builds the union root before
//! switch_root; a change to them needs a reboot, so the module runtime only reports it
//! (`reboot_required`). A runtime module's config may name a mount point where it is
//! bind-mounted too, and services the supervisor runs while it is attached: they are
//! stopped before its mounts change and started after (see [`super::config`]).
//!
//! It must never mount a module whose signature and composefs digest did not verify:
//! everything goes through [`pull_module`] first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use powernode_proto::node::{
    DesiredModule, DesiredModulesResponse, FailureReport, Phase, RunningModule,
};
use powernode_proto::ErrorCode;

use super::config::{self, ConfigError, ModuleConfig};
use super::mount::{mount_module, mount_union, MountError, Mounter, UnionRoot, Upper};
use super::pull::{pull_module, PullError};
use super::registry::{RegistryClient, RegistryError, RegistryOptions, Repository};
use super::signature::{Expected, SignatureError, TrustKey};
use super::store::ObjectStore;
use super::trust::{FloorError, TrustAnchor, VersionFloor};
use super::ModuleErrorCode;
use crate::drain::DrainStep;
use crate::module_reconcile::{ModuleChange, ModuleReconciler, ReconcileFuture, ReconcileOutcome};
use crate::supervisor::Supervisor;
use crate::verity::VerityDigest;

pub const RUNTIME_MODULES_DIR: &str = "/run/powernode/modules";
pub const KIND_ROOT: &str = "root";
pub const KIND_RUNTIME: &str = "runtime";

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("module {name}: {source}")]
    Pull {
        name: String,
        #[source]
        source: Box<PullError>,
    },
    #[error("module {name}: mounting")]
    Mount {
        name: String,
        #[source]
        source: MountError,
    },
    #[error(transparent)]
    Keys(#[from] SignatureError),
    #[error(transparent)]
    Floor(#[from] FloorError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("module {name}: unknown kind {kind:?}")]
    Kind { name: String, kind: String },
    #[error("the blocking pull task failed: {0}")]
    Join(String),
    #[error("reading the registry CA {path}")]
    Ca {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("module {name}: mounting needs root (this agent runs as uid {uid})")]
    NotRoot { name: String, uid: u32 },
    #[error("module {name}: config")]
    Config {
        name: String,
        #[source]
        source: ConfigError,
    },
    #[error(
        "module {name}: its mount point {} is where module {by} is exposed already",
        at.display()
    )]
    MountpointTaken {
        name: String,
        at: PathBuf,
        by: String,
    },
    #[error(
        "the reconcile was cancelled before it changed anything (a drain or reboot took over)"
    )]
    Cancelled,
    #[error("module {name}: exposing it at {}", at.display())]
    Expose {
        name: String,
        at: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ModuleErrorCode for ModuleError {
    fn code(&self) -> ErrorCode {
        match self {
            ModuleError::Pull { source, .. } => source.code(),
            ModuleError::Mount { source, .. } => source.code(),
            ModuleError::Keys(e) => e.code(),
            ModuleError::Floor(e) => e.code(),
            ModuleError::Registry(e) => e.code(),
            ModuleError::Kind { .. } => ErrorCode::BadRequest,
            ModuleError::Join(_) => ErrorCode::Internal,
            ModuleError::Ca { .. } => ErrorCode::Internal,
            ModuleError::NotRoot { .. } => ErrorCode::Internal,
            ModuleError::Config { .. } => ErrorCode::BadRequest,
            ModuleError::Expose { .. } => ErrorCode::Internal,
            ModuleError::Cancelled => ErrorCode::TaskCancelled,
            // Two desired modules name the same mount point: a template to fix.
            ModuleError::MountpointTaken { .. } => ErrorCode::BadRequest,
        }
    }
}

/// A pull failure of module `m`, named.
fn pull_error(m: &DesiredModule) -> impl Fn(PullError) -> ModuleError + '_ {
    move |source| ModuleError::Pull {
        name: m.name.clone(),
        source: Box::new(source),
    }
}

/// The module's repository, as the control plane named it.
fn repository(m: &DesiredModule) -> Result<Repository, ModuleError> {
    m.repository
        .parse()
        .map_err(|e: RegistryError| pull_error(m)(e.into()))
}

fn pull_one(
    client: &RegistryClient,
    m: &DesiredModule,
    keys: &[TrustKey],
    store: &ObjectStore,
) -> Result<VerityDigest, ModuleError> {
    let pull_err = pull_error(m);
    let repo = repository(m)?;
    let expected = Expected {
        repository: &repo.name,
        name: &m.name,
        version: &m.version,
    };
    let report =
        pull_module(client, &repo, &m.digest, keys, Some(&expected), store).map_err(pull_err)?;
    tracing::info!(
        module = %m.name, version = %m.version, digest = %m.digest,
        image = %report.image(), bytes = report.bytes_received,
        already_present = report.install.already_present, "module verified"
    );
    Ok(report.image())
}

/// For the init: pulls and verifies every `root` module of `desired` into `store`, then
/// mounts them as one union root at `target` (work mounts under `work`) with `upper`.
/// Root modules are listed base first in `desired`; later ones win over earlier ones.
/// Signatures verify against `trust` (the node's pins), and a version below `floor`
/// is refused before any pull; the floor rises once the root is mounted.
/// Blocking: call it from a plain thread or `spawn_blocking`.
#[allow(clippy::too_many_arguments)]
pub fn compose_root(
    desired: &DesiredModulesResponse,
    trust: &TrustAnchor,
    floor: &VersionFloor,
    store: &ObjectStore,
    registry: RegistryOptions,
    mounter: &dyn Mounter,
    work: &Path,
    upper: &Upper,
    target: &Path,
) -> Result<UnionRoot, ModuleError> {
    let roots: Vec<&DesiredModule> = desired
        .modules
        .iter()
        .filter(|m| m.kind == KIND_ROOT)
        .collect();
    for m in &roots {
        floor.admit(&m.name, &m.version)?;
    }
    let keys = trust.keys(&desired.trust_keys)?;
    let client = RegistryClient::new(registry)?;
    let mut images = Vec::new();
    for m in &roots {
        images.push(pull_one(&client, m, &keys, store)?);
    }
    // mount_union wants the top first.
    images.reverse();
    let mut union =
        mount_union(mounter, store, &images, work, upper, target).map_err(|source| {
            ModuleError::Mount {
                name: "root".into(),
                source,
            }
        })?;
    union.fetched_bytes = client.bytes_received();
    if let Err(e) = floor.raise(roots.iter().map(|m| (m.name.as_str(), m.version.as_str()))) {
        // The root is mounted and verified; a floor not saved weakens the next boot's
        // rollback check, it does not make this root wrong.
        tracing::warn!(error = %crate::error_chain(&e), "raising the module version floors");
    }
    Ok(union)
}

#[derive(Debug, Clone)]
struct Mounted {
    module: RunningModule,
    image: VerityDigest,
    image_mnt: PathBuf,
    target: PathBuf,
    /// Where the module is bind-mounted too (its mount point label), when it is.
    exposed: Option<PathBuf>,
    /// Its drain steps (`org.powernode.drain`), resolved against its tree.
    drain: Vec<DrainStep>,
    /// Attach order: a drain runs the latest attached module's steps first.
    seq: u64,
}

/// A module pulled and verified, ready to be mounted.
struct Prepared {
    desired: DesiredModule,
    image: VerityDigest,
    config: ModuleConfig,
}

/// Runtime modules, mounted under [`RUNTIME_MODULES_DIR`] (or another dir, for tests),
/// exposed at their mount points, with their services run by the supervisor.
pub struct ModuleRuntime {
    store: Arc<ObjectStore>,
    registry: RegistryOptions,
    mounter: Arc<dyn Mounter + Send + Sync>,
    dir: PathBuf,
    mounted: Mutex<BTreeMap<String, Mounted>>,
    /// Root modules the init composed (reported as running; never swapped live).
    root: Vec<RunningModule>,
    /// The root modules' drain steps, base first: given, or read from their configs
    /// at a reconcile (see [`ModuleRuntime::read_root_configs`]).
    root_drain: Mutex<Option<Vec<DrainStep>>>,
    /// Read the root modules' configs (for their drain steps) at the next reconcile.
    read_root_configs: bool,
    /// The next attach's [`Mounted::seq`].
    next_seq: std::sync::atomic::AtomicU64,
    /// With `Some(root images)`, unreferenced objects are collected after a reconcile
    /// that dropped a module. Off by default: the store may hold the root's images, and
    /// collecting without naming them would delete the running root's objects.
    gc_keep: Option<Vec<VerityDigest>>,
    /// A module was swapped since the last collection.
    swaps: std::sync::atomic::AtomicBool,
    /// CA PEM file read at each pull when `registry.ca_pem` is unset: the agent's
    /// pinned control-plane CA, which only exists once enrollment wrote it.
    ca_file: Option<PathBuf>,
    /// Refuse to mount (with a coded error, before any pull) unless running as root.
    require_root: bool,
    /// Runs the services modules declare.
    services: Option<Arc<dyn Supervisor>>,
    /// Bind-mount modules at their mount point label (needs the real kernel).
    expose: bool,
    /// One reconcile at a time (the periodic one and a module_update task). A pull
    /// holds it on its blocking thread, so a cancelled reconcile's pull (left to end
    /// on its own, at worst by the registry stall timeout) still keeps the next one out.
    op: Arc<tokio::sync::Mutex<()>>,
    /// Bumped by [`ModuleReconciler::cancel_in_flight`]: reconciles that have not
    /// started changing mounts give up.
    cancel: tokio::sync::watch::Sender<u64>,
    /// The module keys this node pins (see [`super::trust`]).
    trust: TrustAnchor,
    /// Per module, the lowest version it may attach.
    floor: VersionFloor,
}

impl std::fmt::Debug for ModuleRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleRuntime")
            .field("dir", &self.dir)
            .finish()
    }
}

impl ModuleRuntime {
    pub fn new(
        store: ObjectStore,
        registry: RegistryOptions,
        mounter: Arc<dyn Mounter + Send + Sync>,
        dir: PathBuf,
        root: Vec<RunningModule>,
    ) -> Self {
        Self {
            store: Arc::new(store),
            registry,
            mounter,
            dir,
            mounted: Mutex::new(BTreeMap::new()),
            root,
            root_drain: Mutex::new(None),
            read_root_configs: false,
            next_seq: Default::default(),
            gc_keep: None,
            swaps: Default::default(),
            ca_file: None,
            require_root: false,
            services: None,
            expose: false,
            op: Arc::new(tokio::sync::Mutex::new(())),
            cancel: tokio::sync::watch::Sender::new(0),
            trust: TrustAnchor::default(),
            floor: VersionFloor::in_memory(),
        }
    }

    /// Verifies signatures against these keys only (the identity's
    /// `module_trust_keys`), whatever keys the control plane sends; none pins nothing.
    pub fn with_pinned_keys(mut self, pems: Vec<String>) -> Self {
        self.trust = TrustAnchor::pinned(pems);
        self
    }

    /// Keeps the version floors in `floor` (loaded from the state directory) rather
    /// than in memory.
    pub fn with_floor(mut self, floor: VersionFloor) -> Self {
        self.floor = floor;
        self
    }

    /// Pins the CA in `path` (read when a pull starts) unless a CA PEM was given.
    pub fn with_ca_file(mut self, path: PathBuf) -> Self {
        self.ca_file = Some(path);
        self
    }

    /// Fails a reconcile that has something to mount when not running as root, rather
    /// than letting the kernel refuse halfway.
    pub fn require_root(mut self) -> Self {
        self.require_root = true;
        self
    }

    /// Runs the services modules declare (`org.powernode.services`) on `supervisor`.
    pub fn with_services(mut self, supervisor: Arc<dyn Supervisor>) -> Self {
        self.services = Some(supervisor);
        self
    }

    /// The root modules' configs (base first, by module name), for their drain
    /// steps; the steps run in `/`.
    pub fn with_root_configs(self, configs: &[(String, ModuleConfig)]) -> Self {
        let steps = configs
            .iter()
            .flat_map(|(name, c)| c.drain_steps(name, Path::new("/")))
            .collect();
        *self.root_drain.lock().unwrap_or_else(|e| e.into_inner()) = Some(steps);
        self
    }

    /// Reads the root modules' configs (by the digests `/` was composed from, as the
    /// desired set names them) at the first reconcile that can: their drain steps,
    /// and their services, started then (a distribution root's own units, e.g.
    /// `{"name":"docker","unit":"docker.service"}`, or commands run in `/`). A failed
    /// read is logged and retried at the next reconcile; it never fails the
    /// reconcile.
    pub fn read_root_configs(mut self) -> Self {
        self.read_root_configs = true;
        self
    }

    /// Bind-mounts each module at its `org.powernode.mountpoint`, if it has one.
    pub fn expose_mountpoints(mut self) -> Self {
        self.expose = true;
        self
    }

    fn registry_options(&self) -> Result<RegistryOptions, ModuleError> {
        let mut opts = self.registry.clone();
        if opts.ca_pem.is_none() {
            if let Some(path) = &self.ca_file {
                let pem = std::fs::read_to_string(path).map_err(|source| ModuleError::Ca {
                    path: path.clone(),
                    source,
                })?;
                opts.ca_pem = Some(pem);
            }
        }
        Ok(opts)
    }

    /// Turns on garbage collection; `root_images` are the composefs images of the root
    /// modules in use (they share the store), kept along with the mounted modules'.
    pub fn with_gc(mut self, root_images: Vec<VerityDigest>) -> Self {
        self.gc_keep = Some(root_images);
        self
    }

    /// With [`with_gc`](Self::with_gc): the first reconcile collects too, so a store
    /// that outlives boots (`/persist`) sheds what earlier root and runtime versions
    /// left there. (A fresh tmpfs store has nothing to shed.)
    pub fn collect_on_first_reconcile(self) -> Self {
        self.swaps.store(true, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// Images of the mounted runtime modules: with the root images, the live set for
    /// [`ObjectStore::gc`].
    pub fn live_images(&self) -> Vec<VerityDigest> {
        self.mounted().values().map(|m| m.image).collect()
    }

    pub fn store(&self) -> &ObjectStore {
        &self.store
    }

    fn mounted(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Mounted>> {
        self.mounted.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unmount(&self, m: &Mounted) {
        let paths = m.exposed.iter().chain([&m.target, &m.image_mnt]);
        for p in paths {
            if let Err(e) = self.mounter.unmount(p) {
                tracing::warn!(path = %p.display(), error = %crate::error_chain(&e), "unmount failed");
            }
        }
    }

    /// Root modules whose desired digest differs from what `/` was composed from, or
    /// that were added or dropped: only a reboot applies them.
    fn reboot_required(&self, desired: &DesiredModulesResponse) -> Vec<String> {
        let wanted: Vec<&DesiredModule> = desired
            .modules
            .iter()
            .filter(|m| m.kind == KIND_ROOT)
            .collect();
        let mut names: Vec<String> = wanted
            .iter()
            .filter(|m| {
                !self
                    .root
                    .iter()
                    .any(|r| r.name == m.name && r.digest == m.digest)
            })
            .map(|m| m.name.clone())
            .collect();
        names.extend(
            self.root
                .iter()
                .filter(|r| !wanted.iter().any(|m| m.name == r.name))
                .map(|r| r.name.clone()),
        );
        names.sort();
        names.dedup();
        names
    }

    /// Checks kinds and names; returns the runtime modules desired.
    fn runtime_modules(
        desired: &DesiredModulesResponse,
    ) -> Result<Vec<DesiredModule>, ModuleError> {
        let mut out = Vec::new();
        for m in desired.modules.iter().filter(|m| m.kind != KIND_ROOT) {
            if m.kind != KIND_RUNTIME {
                return Err(ModuleError::Kind {
                    name: m.name.clone(),
                    kind: m.kind.clone(),
                });
            }
            // Names become paths: the same rule as repository components.
            if m.name.is_empty()
                || !m
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                || m.name.starts_with('.')
            {
                return Err(ModuleError::Kind {
                    name: m.name.clone(),
                    kind: "(name is not a safe path component)".into(),
                });
            }
            out.push(m.clone());
        }
        Ok(out)
    }

    /// The blocking part: pull and verify what changed, and read each one's config.
    fn prepare(
        &self,
        todo: Vec<DesiredModule>,
        trust_keys: &[String],
    ) -> Result<Vec<Prepared>, ModuleError> {
        let Some(first) = todo.first() else {
            return Ok(Vec::new());
        };
        let uid = rustix::process::geteuid().as_raw();
        if self.require_root && uid != 0 {
            return Err(ModuleError::NotRoot {
                name: first.name.clone(),
                uid,
            });
        }
        for m in &todo {
            self.floor.admit(&m.name, &m.version)?;
        }
        let keys = self.trust.keys(trust_keys)?;
        let client = RegistryClient::new(self.registry_options()?)?;
        let mut out = Vec::new();
        for m in todo {
            let image = pull_one(&client, &m, &keys, &self.store)?;
            let config = module_config(&client, &m)?;
            out.push(Prepared {
                desired: m,
                image,
                config,
            });
        }
        Ok(out)
    }

    /// With [`read_root_configs`](Self::read_root_configs), until it
    /// worked once: reads the configs of the root modules `/` was composed from.
    async fn load_root_configs(self: &Arc<Self>, desired: &DesiredModulesResponse) {
        let loaded = self
            .root_drain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if !self.read_root_configs || loaded || self.root.is_empty() {
            return;
        }
        let composed: Vec<DesiredModule> = desired
            .modules
            .iter()
            .filter(|m| m.kind == KIND_ROOT)
            .filter(|m| {
                self.root
                    .iter()
                    .any(|r| r.name == m.name && r.digest == m.digest)
            })
            .cloned()
            .collect();
        if composed.len() != self.root.len() {
            // The desired set moved on (a reboot is pending): the configs of what
            // `/` runs are not named there; keep trying later.
            tracing::debug!("root modules not all in the desired set; their configs not read yet");
            return;
        }
        let this = Arc::clone(self);
        let read = tokio::task::spawn_blocking(move || -> Result<_, ModuleError> {
            let client = RegistryClient::new(this.registry_options()?)?;
            composed
                .iter()
                .map(|m| Ok((m.name.clone(), module_config(&client, m)?)))
                .collect::<Result<Vec<_>, ModuleError>>()
        })
        .await;
        match read {
            Ok(Ok(configs)) => {
                let steps: Vec<DrainStep> = configs
                    .iter()
                    .flat_map(|(name, c)| c.drain_steps(name, Path::new("/")))
                    .collect();
                tracing::info!(steps = steps.len(), "root modules' drain steps read");
                *self.root_drain.lock().unwrap_or_else(|e| e.into_inner()) = Some(steps);
                // Base module first: its services start first and stop last.
                if let Some(sup) = &self.services {
                    for (name, c) in &configs {
                        let specs = c.service_specs(name, Path::new("/"));
                        if !specs.is_empty() {
                            tracing::info!(module = %name, services = specs.len(), "starting root module services");
                            sup.add(specs);
                        }
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %crate::error_chain(&e),
                "reading the root modules' configs failed; retried at the next reconcile"),
            Err(e) => tracing::warn!(error = %e, "reading the root modules' configs failed"),
        }
    }

    /// Drain steps in the order a drain runs them: runtime modules latest attached
    /// first, then the root modules top first.
    pub fn drain_steps(&self) -> Vec<DrainStep> {
        let mut mounted: Vec<(u64, Vec<DrainStep>)> = self
            .mounted()
            .values()
            .map(|m| (m.seq, m.drain.clone()))
            .collect();
        mounted.sort_by_key(|m| std::cmp::Reverse(m.0));
        let mut steps: Vec<DrainStep> = mounted.into_iter().flat_map(|(_, d)| d).collect();
        let root = self
            .root_drain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default();
        // Each root module's steps keep their order; the modules go top first.
        let mut by_module: Vec<Vec<DrainStep>> = Vec::new();
        for s in root {
            match by_module.last_mut() {
                Some(last) if last.first().is_some_and(|f| f.module == s.module) => last.push(s),
                _ => by_module.push(vec![s]),
            }
        }
        steps.extend(by_module.into_iter().rev().flatten());
        steps
    }

    /// Mounts a prepared module (replacing `old`, already stopped) and exposes it.
    /// Mount point conflicts were refused before (see [`mountpoint_conflict`]).
    fn mount(&self, p: &Prepared, old: Option<Mounted>) -> Result<Mounted, ModuleError> {
        let m = &p.desired;
        let next = Mounted {
            module: RunningModule {
                name: m.name.clone(),
                version: m.version.clone(),
                digest: m.digest.clone(),
            },
            image: p.image,
            image_mnt: self.dir.join(".images").join(p.image.to_hex()),
            target: self.dir.join(&m.name),
            exposed: None,
            drain: Vec::new(),
            seq: self
                .next_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        if let Some(old) = old {
            self.unmount(&old);
            self.swaps.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        mount_module(
            &*self.mounter,
            &self.store,
            &p.image,
            &next.image_mnt,
            &next.target,
            p.config.restrict(),
        )
        .map_err(|source| ModuleError::Mount {
            name: m.name.clone(),
            source,
        })?;
        let mut next = next;
        if let (true, Some(at)) = (self.expose, &p.config.mountpoint) {
            if let Err(source) = bind(&next.target, at) {
                self.unmount(&next);
                return Err(ModuleError::Expose {
                    name: m.name.clone(),
                    at: at.clone(),
                    source,
                });
            }
            tracing::info!(module = %m.name, at = %at.display(), "module exposed at its mount point");
            next.exposed = Some(at.clone());
        }
        let dir = next.exposed.as_ref().unwrap_or(&next.target).clone();
        next.drain = p.config.drain_steps(&m.name, &dir);
        Ok(next)
    }

    async fn stop_services(&self, name: &str) {
        if let Some(sup) = &self.services {
            let report = sup.remove_module(name).await;
            if !report.stopped.is_empty() || !report.killed.is_empty() {
                tracing::info!(module = %name, stopped = ?report.stopped, killed = ?report.killed, "module services stopped");
            }
        }
    }

    fn start_services(&self, mounted: &Mounted, config: &ModuleConfig) {
        if let Some(sup) = &self.services {
            let dir = mounted.exposed.as_ref().unwrap_or(&mounted.target);
            let specs = config.service_specs(&mounted.module.name, dir);
            if !specs.is_empty() {
                tracing::info!(module = %mounted.module.name, services = specs.len(), "starting module services");
                sup.add(specs);
            }
        }
    }

    /// Pulls what changed (blocking, off the async thread); drops what is no longer
    /// desired (services first, then mounts, so its mount point is free); then per
    /// module: stop its services, swap the mounts, start the new services.
    ///
    /// A cancel ([`ModuleReconciler::cancel_in_flight`]) ends it with
    /// [`ModuleError::Cancelled`] while it waits for its turn or its pulls, and at
    /// the last check before the first change; once services stop and mounts change
    /// it runs to its end (bounded by the services' stop timeouts), so no module is
    /// left half swapped.
    async fn apply(
        self: Arc<Self>,
        desired: DesiredModulesResponse,
    ) -> Result<ReconcileOutcome, ModuleError> {
        let mut cancel = self.cancel.subscribe();
        let generation = *cancel.borrow_and_update();
        let one_at_a_time = tokio::select! {
            g = self.op.clone().lock_owned() => g,
            _ = cancel.changed() => return Err(ModuleError::Cancelled),
        };
        let mut outcome = ReconcileOutcome {
            reboot_required: self.reboot_required(&desired),
            ..Default::default()
        };
        let runtime = Self::runtime_modules(&desired)?;
        let (todo, unchanged): (Vec<DesiredModule>, Vec<DesiredModule>) =
            runtime.iter().cloned().partition(|m| {
                self.mounted()
                    .get(&m.name)
                    .is_none_or(|cur| cur.module.digest != m.digest)
            });
        outcome.unchanged = unchanged.into_iter().map(|m| m.name).collect();
        // Nothing changed (the common case): no blocking thread, no registry client.
        let (prepared, _one_at_a_time) = if todo.is_empty() {
            (Vec::new(), one_at_a_time)
        } else {
            let this = Arc::clone(&self);
            let keys = desired.trust_keys.clone();
            let pull =
                tokio::task::spawn_blocking(move || (this.prepare(todo, &keys), one_at_a_time));
            // On cancel the pull is left to end on its own (its result unused), still
            // holding the reconcile lock.
            let (prepared, guard) = tokio::select! {
                r = pull => r.map_err(|e| ModuleError::Join(e.to_string()))?,
                _ = cancel.changed() => return Err(ModuleError::Cancelled),
            };
            (prepared?, guard)
        };
        self.load_root_configs(&desired).await;
        // The last moment a cancel is taken: after this, services stop and mounts change.
        if *cancel.borrow() != generation {
            return Err(ModuleError::Cancelled);
        }
        let gone: Vec<String> = self
            .mounted()
            .keys()
            .filter(|n| !runtime.iter().any(|m| &m.name == *n))
            .cloned()
            .collect();
        for name in gone {
            self.stop_services(&name).await;
            if let Some(m) = self.mounted().remove(&name) {
                self.unmount(&m);
                tracing::info!(module = %name, "module detached");
                outcome.detached.push(ModuleChange {
                    name: m.module.name,
                    version: m.module.version,
                    digest: m.module.digest,
                    from: None,
                });
            }
        }
        // Refused before any service stops or mount changes: a second bind would
        // stack on the first, and a module stopped and then left unmounted would
        // drop out of what is tracked (and of what collection keeps).
        if self.expose {
            let wanted: Vec<(&str, &Path)> = prepared
                .iter()
                .filter_map(|p| Some((p.desired.name.as_str(), p.config.mountpoint.as_deref()?)))
                .collect();
            if let Some(e) = mountpoint_conflict(&self.mounted(), &wanted) {
                return Err(e);
            }
        }
        for p in &prepared {
            let name = p.desired.name.clone();
            // The old version stays listed (heartbeats) while its services stop.
            if self.mounted().contains_key(&name) {
                self.stop_services(&name).await;
            }
            let old = self.mounted().remove(&name);
            let change = ModuleChange {
                name: name.clone(),
                version: p.desired.version.clone(),
                digest: p.desired.digest.clone(),
                from: old.as_ref().map(|o| o.module.digest.clone()),
            };
            let mounted = self.mount(p, old)?;
            self.start_services(&mounted, &p.config);
            self.mounted().insert(name, mounted);
            // Attached: older versions of it are refused from now on.
            if let Err(e) = self
                .floor
                .raise([(p.desired.name.as_str(), p.desired.version.as_str())])
            {
                tracing::warn!(error = %crate::error_chain(&e), "raising the module version floor");
            }
            if change.from.is_some() {
                outcome.updated.push(change);
            } else {
                outcome.attached.push(change);
            }
        }
        if let Some(keep) = &self.gc_keep {
            let dropped = !outcome.detached.is_empty();
            if dropped || self.swaps.swap(false, std::sync::atomic::Ordering::Relaxed) {
                let mut live = keep.clone();
                live.extend(self.live_images());
                match self.store.gc(&live) {
                    Ok(s) => tracing::info!(?s, "module store collected"),
                    // A failed collection wastes space, nothing more: report, go on.
                    Err(e) => tracing::warn!(error = %crate::error_chain(&e), "module gc failed"),
                }
            }
        }
        Ok(outcome)
    }
}

/// The mounted module other than `except` exposed at `at`, if any.
/// The first mount point a module about to be mounted would take from another:
/// where a mounted module (not its own old version) is exposed, or one two of them
/// name.
fn mountpoint_conflict(
    mounted: &BTreeMap<String, Mounted>,
    wanted: &[(&str, &Path)],
) -> Option<ModuleError> {
    wanted.iter().enumerate().find_map(|(i, (name, at))| {
        let by = exposed_by(mounted, at, name).or_else(|| {
            wanted[..i]
                .iter()
                .find(|(_, other)| other == at)
                .map(|(other, _)| other.to_string())
        })?;
        Some(ModuleError::MountpointTaken {
            name: name.to_string(),
            at: at.to_path_buf(),
            by,
        })
    })
}

fn exposed_by(mounted: &BTreeMap<String, Mounted>, at: &Path, except: &str) -> Option<String> {
    mounted
        .iter()
        .find(|(name, m)| name.as_str() != except && m.exposed.as_deref() == Some(at))
        .map(|(name, _)| name.clone())
}

/// The module's image config, read by the manifest digest the control plane pinned
/// (so the signature checked by the pull covers it).
fn module_config(client: &RegistryClient, m: &DesiredModule) -> Result<ModuleConfig, ModuleError> {
    let pull_err = pull_error(m);
    let repo = repository(m)?;
    let fetched = client
        .manifest(&repo, &m.digest, Some(&m.digest))
        .map_err(|e| pull_err(e.into()))?;
    let bytes = client
        .small_blob(&repo, &fetched.manifest.config, MAX_CONFIG_BYTES)
        .map_err(|e| pull_err(e.into()))?;
    config::parse(&bytes).map_err(|source| ModuleError::Config {
        name: m.name.clone(),
        source,
    })
}

/// Image configs are small; one this big is not one.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Bind-mounts `from` at `at` (created if missing).
fn bind(from: &Path, at: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(at)?;
    rustix::mount::mount_bind(from, at)?;
    Ok(())
}

impl ModuleReconciler for Arc<ModuleRuntime> {
    fn running(&self) -> Vec<RunningModule> {
        let mut out = self.root.clone();
        out.extend(self.mounted().values().map(|m| m.module.clone()));
        out
    }

    fn drain_steps(&self) -> Vec<DrainStep> {
        ModuleRuntime::drain_steps(self)
    }

    fn cancel_in_flight(&self) {
        self.cancel.send_modify(|g| *g = g.wrapping_add(1));
    }

    fn reconcile<'a>(&'a self, desired: &'a DesiredModulesResponse) -> ReconcileFuture<'a> {
        let this = Arc::clone(self);
        let desired = desired.clone();
        Box::pin(async move {
            this.apply(desired).await.map_err(|e| FailureReport {
                phase: Phase::ModulesVerified,
                code: e.code(),
                message: crate::error_chain(&e),
                attempt: 0,
                recovery: None,
            })
        })
    }
}

#[cfg(test)]
mod runtime_tests {
    use super::*;
    use crate::modules::mount::RecordingMounter;

    fn desired() -> DesiredModulesResponse {
        DesiredModulesResponse {
            modules: vec![DesiredModule {
                name: "demo".into(),
                version: "1".into(),
                repository: "127.0.0.1:1/modules/demo".into(),
                digest: format!("sha256:{}", "a".repeat(64)),
                kind: KIND_RUNTIME.into(),
            }],
            trust_keys: vec![],
        }
    }

    fn runtime(dir: &Path) -> ModuleRuntime {
        ModuleRuntime::new(
            ObjectStore::open(&dir.join("store")).expect("store"),
            RegistryOptions::default(),
            Arc::new(RecordingMounter::default()),
            dir.join("run"),
            vec![],
        )
    }

    #[test]
    fn a_mount_point_taken_by_another_module_is_named() {
        let mounted_at = |name: &str, at: Option<&str>| Mounted {
            module: RunningModule {
                name: name.into(),
                version: "1".into(),
                digest: "sha256:aa".into(),
            },
            image: format!("sha256:{}", "ab".repeat(32))
                .parse()
                .expect("digest"),
            image_mnt: PathBuf::from("/run/m/.images/x"),
            target: PathBuf::from("/run/m").join(name),
            exposed: at.map(PathBuf::from),
            drain: Vec::new(),
            seq: 0,
        };
        let mut mounted = BTreeMap::new();
        mounted.insert("web".to_string(), mounted_at("web", Some("/opt/web")));
        mounted.insert("tools".to_string(), mounted_at("tools", None));
        assert_eq!(
            exposed_by(&mounted, Path::new("/opt/web"), "other"),
            Some("web".to_string())
        );
        // Its own mount point (a swap of the same module) is not a conflict.
        assert_eq!(exposed_by(&mounted, Path::new("/opt/web"), "web"), None);
        assert_eq!(exposed_by(&mounted, Path::new("/opt/tools"), "other"), None);
        // What the reconcile checks before it stops anything: a mounted module's
        // mount point, or one two new modules both name; a swap keeps its own.
        let web = Path::new("/opt/web");
        let tools = Path::new("/opt/tools");
        assert!(mountpoint_conflict(&mounted, &[("web", web), ("tools", tools)]).is_none());
        let e = mountpoint_conflict(&mounted, &[("tools", tools), ("other", web)])
            .expect("taken by web");
        assert!(matches!(&e, ModuleError::MountpointTaken { name, by, .. }
            if name == "other" && by == "web"));
        let e = mountpoint_conflict(&mounted, &[("a", tools), ("b", tools)]).expect("named twice");
        assert!(matches!(&e, ModuleError::MountpointTaken { name, by, .. }
            if name == "b" && by == "a"));
        assert_eq!(e.code(), ErrorCode::BadRequest);
        assert!(e.to_string().contains("/opt/tools") && e.to_string().contains("module a"));
    }

    #[tokio::test]
    async fn a_missing_pinned_ca_file_fails_the_reconcile_with_a_report() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = Arc::new(runtime(dir.path()).with_ca_file(dir.path().join("ca.pem")));
        let err = rt.reconcile(&desired()).await.expect_err("no CA yet");
        assert_eq!(err.phase, Phase::ModulesVerified);
        assert!(err.message.contains("registry CA"), "{}", err.message);
        assert!(rt.running().is_empty());
        // Nothing desired: nothing to pull, the missing CA does not matter.
        rt.reconcile(&DesiredModulesResponse::default())
            .await
            .expect("empty desired set");
    }

    #[tokio::test]
    async fn the_first_reconcile_collects_what_earlier_boots_left_and_keeps_the_root() {
        use powernode_modfmt::publish::{build_module, BuildOptions};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ObjectStore::open(&dir.path().join("store")).expect("store");
        let tree = |name: &str, body: &[u8]| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(d.join("etc")).expect("mkdir");
            std::fs::write(d.join("etc/os-release"), body).expect("write");
            std::fs::write(d.join("shared"), b"same in both\n").expect("write");
            let built = build_module(&d, &BuildOptions::default(), &store).expect("build");
            powernode_modfmt::install_image(&store, &built.image_digest, 1, |_| {
                Ok((built.layer_media_type.to_string(), &built.layer[..]))
            })
            .expect("install");
            built
        };
        let root = tree("root-v2", b"v2\n");
        let old = tree("root-v1", b"v1\n");
        assert!(store.has_image(&old.image_digest));
        drop(store);
        let rt = Arc::new(
            runtime(dir.path())
                .with_gc(vec![root.image_digest])
                .collect_on_first_reconcile(),
        );
        rt.reconcile(&DesiredModulesResponse::default())
            .await
            .expect("empty desired set");
        assert!(!rt.store().has_image(&old.image_digest));
        assert!(rt.store().has_image(&root.image_digest));
        // Every object of the running root is still there, shared ones included.
        rt.store()
            .verify_image(&root.image_digest)
            .expect("root intact");
    }

    #[tokio::test]
    async fn require_root_refuses_before_pulling_when_not_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = Arc::new(runtime(dir.path()).require_root());
        let err = rt.reconcile(&desired()).await.expect_err("fails");
        if rustix::process::geteuid().is_root() {
            // As root the pull runs and fails on the unreachable registry instead.
            assert!(!err.message.contains("needs root"), "{}", err.message);
        } else {
            assert_eq!(err.code, ErrorCode::Internal);
            assert!(err.message.contains("needs root"), "{}", err.message);
        }
    }

    #[test]
    fn drain_steps_run_latest_attached_module_first_then_the_root_top_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let labels = |name: &str, steps: &[&str]| {
            let drain: Vec<serde_json::Value> = steps
                .iter()
                .map(|s| serde_json::json!({"name": s, "command": ["/bin/true"]}))
                .collect();
            let bytes = serde_json::to_vec(&serde_json::json!({"config": {"Labels": {
                config::DRAIN_LABEL: serde_json::Value::Array(drain).to_string()}}}))
            .expect("json");
            (name.to_string(), config::parse(&bytes).expect("config"))
        };
        let rt = runtime(dir.path()).with_root_configs(&[
            labels("base", &["b1"]),
            labels("docker", &["containers", "daemon"]),
        ]);
        for (seq, (name, cfg)) in [labels("web", &["w1"]), labels("cache", &["c1"])]
            .into_iter()
            .enumerate()
        {
            rt.mounted().insert(
                name.clone(),
                Mounted {
                    module: RunningModule {
                        name: name.clone(),
                        version: "1".into(),
                        digest: "sha256:aa".into(),
                    },
                    image: format!("sha256:{}", "ab".repeat(32))
                        .parse()
                        .expect("digest"),
                    image_mnt: PathBuf::from("/run/m/.images/x"),
                    target: PathBuf::from("/run/m").join(&name),
                    exposed: None,
                    drain: cfg.drain_steps(&name, Path::new("/run/m")),
                    seq: seq as u64,
                },
            );
        }
        let order: Vec<String> = rt.drain_steps().iter().map(|s| s.label()).collect();
        assert_eq!(
            order,
            [
                "step:cache/c1",
                "step:web/w1",
                "step:docker/containers",
                "step:docker/daemon",
                "step:base/b1",
            ]
        );
    }
}
