//! The seam between the init's phases and the agent library (`powernode_agent`):
//! enrollment + first handshake during the `bootstrap` phase, upstream failure
//! reports, and the agent runtime the init becomes once the boot is done.
//!
//! [`AgentDriver`] is a trait so the boot sequence stays testable with fakes; the
//! real driver ([`RealAgent`]) owns one tokio current-thread runtime inside PID 1
//! (no worker threads: PID 1 stays a single, simple process).

use std::path::{Path, PathBuf};
use std::time::Duration;

use powernode_agent::client::{ApiClient, ClientError, Timeouts};
use powernode_agent::credentials::Credentials;
use powernode_agent::enroll::EnrollError;
use powernode_agent::identity::Resolved;
use powernode_agent::node_loop::{self, AgentOptions, Exit, Hooks};
use powernode_agent::state::{StateDir, StateError};
use powernode_agent::timeline::Timeline;
use powernode_proto::node::{
    ComposeStats, FailureReport, Phase, RootFacts, RunningModule, TimelineEntry,
};
use powernode_proto::{ErrorCode, IdentityDocument};

use crate::shutdown::{MOUNTINFO, MOUNTINFO_LIMIT};
use crate::sys::{RealSys, Sys};

/// Everything the bootstrap needs from the earlier phases.
#[derive(Debug, Clone)]
pub struct BootstrapInput {
    pub identity: IdentityDocument,
    /// Which source gave the identity (`fw_cfg`, `cmdline`), reported at enrollment.
    pub source: &'static str,
    /// What a cloud's metadata said about the machine, reported at enrollment.
    pub provider: Option<powernode_proto::node::ProviderFacts>,
    /// The agent's state directory (already created by the init).
    pub state_dir: PathBuf,
    /// The init's boot timeline so far.
    pub timeline: Vec<TimelineEntry>,
}

/// What the bootstrap did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrapped {
    /// `true` when stored credentials were reused (a persistent node rebooting).
    pub reused_credentials: bool,
    /// When enrollment finished (ms since boot).
    pub enrolled_at_ms: u64,
    /// How long key generation waited for the kernel RNG, if it had to.
    pub entropy_wait_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot start the agent's async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("the kernel RNG could not be read")]
    Entropy(#[source] powernode_agent::entropy::EntropyError),
    #[error("agent state directory")]
    State(#[from] StateError),
    #[error("enrollment failed")]
    Enroll(#[from] EnrollError),
    #[error("node credentials")]
    Credentials(#[from] powernode_agent::credentials::CredentialError),
    #[error("first handshake failed")]
    Handshake(#[source] ClientError),
}

impl BootstrapError {
    /// The stable code reported upstream and on the console.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Enroll(EnrollError::Client(e)) | Self::Handshake(e) => e.report_code(),
            _ => ErrorCode::Internal,
        }
    }

    /// The control plane refused the node for good (token spent or expired,
    /// instance terminated, certificate revoked).
    pub fn refused_for_good(&self) -> bool {
        match self {
            Self::Enroll(e) => e.terminal_code().is_some(),
            Self::Handshake(e) => e.terminal_code().is_some(),
            Self::Runtime(_) | Self::Entropy(_) | Self::State(_) | Self::Credentials(_) => false,
        }
    }

    /// Retrying cannot help when the node was refused for good.
    pub fn retryable(&self) -> bool {
        !self.refused_for_good()
    }
}

/// How the agent runtime ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEnd {
    /// Stopped by a signal to PID 1 (SIGTERM / SIGINT).
    Stopped,
    /// The control plane refused the node for good (terminated, revoked).
    Refused { code: ErrorCode, message: String },
    /// A local failure (state directory, TLS setup): the failure policy applies.
    Failed { code: ErrorCode, message: String },
    /// A reboot task completed (services stopped): sync and reboot.
    Reboot,
}

/// The agent library as the boot sees it.
pub trait AgentDriver {
    /// Enrollment (or stored credentials), then the first handshake with the
    /// timeline so far and phase `enrolled`.
    fn bootstrap(&mut self, input: &BootstrapInput) -> Result<Bootstrapped, BootstrapError>;
    /// Best effort: sends `failure` upstream in a handshake. `false` when the node
    /// has no credentials yet or the control plane cannot be reached.
    fn report_failure(&mut self, timeline: &[TimelineEntry], failure: FailureReport) -> bool;
    /// Runs the agent (heartbeats, tasks, drain) until it ends.
    fn run(&mut self, timeline: &[TimelineEntry]) -> AgentEnd;
    /// Fetches the desired modules; when they include `root` modules, pulls and
    /// verifies them and mounts their union at `target`. `Ok(None)`: no root modules
    /// (the initramfs stays the root). `Ok(Some(modules))`: the root modules composed
    /// (name, version, pinned manifest digest), base first.
    fn compose_root(&mut self, _target: &str) -> Result<Option<Vec<RunningModule>>, ComposeError> {
        Ok(None)
    }
    /// What the last successful [`compose_root`](Self::compose_root) built the root
    /// on: store, verity mode, upper layer, and what it cost (for the root facts).
    fn root_facts(&self) -> Option<RootFacts> {
        None
    }
    /// After a read of the composed root failed: reads every object of the root's
    /// images in full and moves the corrupt ones out of the store, so the next boot
    /// fetches them again. Returns their digests.
    fn repair_root(&mut self) -> Result<Vec<String>, ComposeError> {
        Ok(Vec::new())
    }
    /// Takes down what the last [`compose_root`](Self::compose_root) mounted, before
    /// a retry (best effort: failures are logged).
    fn undo_compose(&mut self) {}
    /// The composefs images (fs-verity digests) of the last composed root.
    fn root_images(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Why the composed root could not be built; `code` is the wire code reported upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeError {
    pub code: ErrorCode,
    pub message: String,
}

/// What the init leaves in the state directory for itself in agent mode after
/// switch_root: the boot timeline and the root modules composed into `/`.
pub const HANDOFF_FILE: &str = "handoff.json";

/// The contents of [`HANDOFF_FILE`].
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Handoff {
    pub timeline: Vec<TimelineEntry>,
    pub root_modules: Vec<RunningModule>,
    /// Store, verity mode, upper and compose cost, as the init saw them.
    pub root_facts: Option<RootFacts>,
    /// The composefs images (fs-verity digests) the root was composed from: the
    /// store collection keeps them. Empty (an older init): nothing is collected.
    #[serde(default)]
    pub root_images: Vec<String>,
}
/// argv\[1\] of the init re-executed in the composed root: run the agent as PID 1.
pub const AGENT_MODE: &str = "agent";
/// Where the init copies itself before switch_root (`/run` is moved into the new root).
pub const AGENT_MODE_BIN: &str = "/run/powernode/powernode-init";

/// The real driver: the agent library on a current-thread runtime.
#[derive(Default)]
pub struct RealAgent {
    rt: Option<tokio::runtime::Runtime>,
    /// Set by a successful bootstrap.
    session: Option<Session>,
    /// Set by a successful compose_root.
    composed: Option<RootFacts>,
    /// The store and the root's images, for [`AgentDriver::repair_root`].
    composed_images: Option<(PathBuf, Vec<powernode_agent::verity::VerityDigest>)>,
    /// What the last compose_root mounted, for [`AgentDriver::undo_compose`].
    union: Option<powernode_agent::modules::mount::UnionRoot>,
    /// The desired set compose_root fetched when it named no root module: the
    /// agent's first reconcile uses it.
    desired: Option<powernode_proto::node::DesiredModulesResponse>,
}

impl std::fmt::Debug for RealAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealAgent")
            .field("enrolled", &self.session.is_some())
            .finish_non_exhaustive()
    }
}

struct Session {
    resolved: Resolved,
    state_dir: PathBuf,
    client: ApiClient,
}

impl RealAgent {
    fn runtime(&mut self) -> Result<&tokio::runtime::Runtime, std::io::Error> {
        if self.rt.is_none() {
            self.rt = Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?,
            );
        }
        // Just set above when it was missing.
        self.rt
            .as_ref()
            .ok_or_else(|| std::io::Error::other("runtime missing"))
    }
}

/// Reads 32 bytes from the kernel RNG before key generation, so a wait for entropy
/// is logged (with its length) by the init rather than hidden inside the key code.
fn wait_for_entropy() -> Result<Option<u64>, BootstrapError> {
    let mut probe = [0u8; 32];
    let fill = powernode_agent::entropy::fill(&mut probe).map_err(BootstrapError::Entropy)?;
    let waited = fill
        .waited
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    match waited {
        Some(ms) => log::warn!("bootstrap: waited {ms} ms for the kernel RNG to be seeded"),
        None => log::info!("bootstrap: kernel RNG ready, no wait"),
    }
    Ok(waited)
}

impl AgentDriver for RealAgent {
    fn bootstrap(&mut self, input: &BootstrapInput) -> Result<Bootstrapped, BootstrapError> {
        let state = StateDir::open(&input.state_dir)?;
        let identity = input.identity.clone();
        let stored = state.load_credentials(&identity.instance_id)?;
        let reused = stored.is_some();
        let entropy_wait_ms = if reused { None } else { wait_for_entropy()? };
        let rt = self.runtime().map_err(BootstrapError::Runtime)?;
        let timeouts = Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(15),
        };
        let (creds, enrolled_at_ms, client) = rt.block_on(async {
            let creds: Credentials = match stored {
                Some(c) => {
                    log::info!(
                        "bootstrap: reusing stored credentials (serial {})",
                        c.info.serial
                    );
                    c
                }
                None => {
                    let (creds, _resp) = powernode_agent::enroll::enroll_with_provider(
                        &identity,
                        input.source,
                        input.provider.clone(),
                        timeouts,
                    )
                    .await?;
                    state.save_credentials(&creds)?;
                    creds
                }
            };
            state.save_identity(&identity)?;
            let mut timeline = Timeline::from_entries(input.timeline.clone());
            let enrolled_at_ms = timeline.mark(Phase::Enrolled);
            let client = ApiClient::new(
                &identity.control_plane_url,
                &creds.ca_pem,
                Some(&creds),
                timeouts,
            )
            .map_err(BootstrapError::Handshake)?;
            let root = powernode_agent::facts::read_root_facts(std::path::Path::new(
                powernode_agent::facts::MOUNTINFO,
            ));
            let hs = node_loop::handshake(
                &client,
                &identity.instance_id,
                Phase::Enrolled,
                &timeline,
                root,
                None,
            )
            .await
            .map_err(BootstrapError::Handshake)?;
            log::info!(
                "bootstrap: enrolled and handshaken; instance status {}",
                hs.instance_status
            );
            Ok::<_, BootstrapError>((creds, enrolled_at_ms, client))
        })?;
        drop(creds);
        self.session = Some(Session {
            resolved: Resolved {
                document: identity,
                source: input.source,
            },
            state_dir: input.state_dir.clone(),
            client,
        });
        Ok(Bootstrapped {
            reused_credentials: reused,
            enrolled_at_ms,
            entropy_wait_ms,
        })
    }

    fn report_failure(&mut self, timeline: &[TimelineEntry], failure: FailureReport) -> bool {
        let Some(session) = &self.session else {
            return false;
        };
        let client = session.client.clone();
        let instance_id = session.resolved.document.instance_id.clone();
        let Ok(rt) = self.runtime() else {
            return false;
        };
        let timeline = Timeline::from_entries(timeline.to_vec());
        let sent = rt.block_on(node_loop::handshake(
            &client,
            &instance_id,
            Phase::Failed,
            &timeline,
            None,
            Some(failure),
        ));
        match sent {
            Ok(_) => true,
            Err(e) => {
                log::warn!(
                    "could not report the failure upstream: {}",
                    powernode_agent::error_chain(&e)
                );
                false
            }
        }
    }

    fn compose_root(&mut self, target: &str) -> Result<Option<Vec<RunningModule>>, ComposeError> {
        use powernode_agent::modules::{module_runtime, mount, registry};
        let internal = |message: String| ComposeError {
            code: ErrorCode::Internal,
            message,
        };
        let Some(session) = &self.session else {
            return Err(internal(
                "compose_root before a successful bootstrap".into(),
            ));
        };
        let client = session.client.clone();
        let state_dir = session.state_dir.clone();
        let rt = self
            .runtime()
            .map_err(|e| internal(format!("async runtime: {e}")))?;
        let desired = rt
            .block_on(client.get::<powernode_proto::node::DesiredModulesResponse>(
                powernode_proto::paths::DESIRED_MODULES,
            ))
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
            self.desired = Some(desired);
            return Ok(None);
        }
        // The embedded registry serves HTTPS with the control-plane CA kept at enrollment.
        let ca_path = state_dir.join(powernode_agent::state::CA_FILE);
        let ca_pem = std::fs::read_to_string(&ca_path)
            .map_err(|e| internal(format!("reading {}: {e}", ca_path.display())))?;
        let store_dir = state_dir.join("store");
        std::fs::create_dir_all(&store_dir)
            .map_err(|e| internal(format!("creating {}: {e}", store_dir.display())))?;
        let store = open_store(&store_dir).map_err(internal)?;
        let opts = registry::RegistryOptions {
            ca_pem: Some(ca_pem),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(30)),
            ..Default::default()
        };
        let work = state_dir.join("compose");
        std::fs::create_dir_all(target).map_err(|e| internal(format!("creating {target}: {e}")))?;
        // A persistent node keeps the root's writes on /persist, next to its store.
        let upper = if state_dir.starts_with(crate::layout::PERSIST_MOUNT) {
            mount::Upper::Dir(state_dir.join("root"))
        } else {
            mount::Upper::Tmpfs
        };
        let started = std::time::Instant::now();
        let union = module_runtime::compose_root(
            &desired,
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
        self.composed = Some(facts);
        // Image mounts are `work/images/<hex>`.
        let images = union
            .image_mounts
            .iter()
            .filter_map(|p| p.file_name()?.to_str()?.parse().ok())
            .collect();
        self.composed_images = Some((store_dir.clone(), images));
        self.union = Some(union);
        Ok(Some(roots))
    }

    fn root_images(&self) -> Vec<String> {
        self.composed_images
            .as_ref()
            .map(|(_, images)| images.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    fn undo_compose(&mut self) {
        self.composed = None;
        self.composed_images = None;
        if let Some(union) = self.union.take() {
            match union.unmount(&LoopMounter) {
                Ok(()) => log::info!("composed root at {} taken down", union.target.display()),
                Err(e) => log::warn!(
                    "taking down the composed root at {}: {}",
                    union.target.display(),
                    powernode_agent::error_chain(&e)
                ),
            }
        }
    }

    fn run(&mut self, timeline: &[TimelineEntry]) -> AgentEnd {
        let Some(session) = &self.session else {
            return AgentEnd::Failed {
                code: ErrorCode::Internal,
                message: "the agent runtime started before a successful bootstrap".into(),
            };
        };
        let resolved = session.resolved.clone();
        let state_dir = session.state_dir.clone();
        let mut opts = AgentOptions::new(&state_dir);
        opts.can_reboot = true;
        opts.kmsg_log = true;
        apply_cmdline(&mut opts);
        // Same process, same runtime: the bootstrap's connection is still open.
        opts.client = Some(session.client.clone());
        opts.first_desired = self.desired.take();
        let rt = match self.runtime() {
            Ok(rt) => rt,
            Err(e) => {
                return AgentEnd::Failed {
                    code: ErrorCode::Internal,
                    message: format!("cannot start the agent's async runtime: {e}"),
                }
            }
        };
        // The initramfs is the root: runtime modules (and their services) only.
        let hooks =
            match rt.block_on(async { node_hooks(&state_dir, Vec::new(), None, Host::Pid1) }) {
                Ok(h) => h,
                Err(message) => {
                    return AgentEnd::Failed {
                        code: ErrorCode::Internal,
                        message,
                    }
                }
            };
        run_on(rt, resolved, opts, hooks, timeline, Host::Pid1)
    }

    fn root_facts(&self) -> Option<RootFacts> {
        self.composed.clone()
    }

    fn repair_root(&mut self) -> Result<Vec<String>, ComposeError> {
        use powernode_agent::modules::store::ObjectStore;
        let Some((store_dir, images)) = &self.composed_images else {
            return Ok(Vec::new());
        };
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
}

/// What the agent drives on a node: one service supervisor, shared by the drain and
/// by the live module runtime (runtime modules under `/run/powernode/modules`, exposed
/// at their mount points, their services supervised). `root_modules` are the modules
/// composed into `/`: reported as running, never swapped live. Call inside the
/// runtime (the supervisor spawns its monitors there).
fn node_hooks(
    state_dir: &std::path::Path,
    root_modules: Vec<RunningModule>,
    root_images: Option<Vec<powernode_agent::verity::VerityDigest>>,
    host: Host,
) -> Result<Hooks, String> {
    use powernode_agent::modules::{module_runtime, registry};
    use powernode_agent::supervisor::ServiceSupervisor;
    use std::sync::Arc;
    let store_dir = state_dir.join("store");
    std::fs::create_dir_all(&store_dir)
        .map_err(|e| format!("creating the module store {}: {e}", store_dir.display()))?;
    let store = open_store(&store_dir)?;
    // Under systemd, module services are units: `systemctl status` shows them and
    // a restart of the agent never stops them.
    let services: Arc<dyn powernode_agent::supervisor::Supervisor> = match host {
        Host::Pid1 => Arc::new(ServiceSupervisor::default()),
        Host::Systemd => Arc::new(powernode_agent::systemd::SystemdSupervisor::system()),
    };
    let has_root = !root_modules.is_empty();
    // What a swap or detach leaves unreferenced is collected (and, on /persist, what
    // earlier boots left, at the first reconcile), keeping the root's images. With
    // the initramfs as root there are none; a composed root's must be known exactly
    // (from the hand-off), else nothing is collected: deleting an object the running
    // root reads would break it.
    let collect = match root_images {
        Some(images) => Some(images),
        None if root_modules.is_empty() => Some(Vec::new()),
        None => None,
    };
    let mut modules = module_runtime::ModuleRuntime::new(
        store,
        registry::RegistryOptions::default(),
        Arc::new(LoopMounter),
        module_runtime::RUNTIME_MODULES_DIR.into(),
        root_modules,
    )
    .with_ca_file(state_dir.join(powernode_agent::state::CA_FILE))
    .with_services(services.clone())
    .expose_mountpoints();
    if has_root {
        // The root modules' own drain steps (a Docker root's containers) run too.
        modules = modules.read_root_configs();
    }
    if let Some(keep) = collect {
        modules = modules.with_gc(keep);
        if state_dir.starts_with(crate::layout::PERSIST_MOUNT) {
            modules = modules.collect_on_first_reconcile();
        }
    }
    let modules = Arc::new(modules);
    Ok(Hooks {
        supervisor: services,
        reconciler: Arc::new(modules),
    })
}

/// The agent runtime on `rt` with the orphan reaper (PID 1 inherits orphans; the
/// reaper leaves supervised services to their monitors).
fn run_on(
    rt: &tokio::runtime::Runtime,
    resolved: Resolved,
    opts: AgentOptions,
    hooks: Hooks,
    timeline: &[TimelineEntry],
    host: Host,
) -> AgentEnd {
    let mut timeline = Timeline::from_entries(timeline.to_vec());
    timeline.mark(Phase::AgentStarted);
    let ended = rt.block_on(async {
        // Under systemd, PID 1 reaps; reaping here would only race the monitors.
        let reaper = (host == Host::Pid1).then(|| tokio::spawn(reap_children()));
        let result = node_loop::run(resolved, opts, hooks, timeline, stop_signal()).await;
        if let Some(r) = reaper {
            r.abort();
        }
        result
    });
    match ended {
        Ok(Exit::Stopped) => AgentEnd::Stopped,
        Ok(Exit::Reboot) => AgentEnd::Reboot,
        Ok(Exit::Terminal { code, message }) => AgentEnd::Refused { code, message },
        Err(e) => AgentEnd::Failed {
            code: ErrorCode::Internal,
            message: powernode_agent::error_chain(&e),
        },
    }
}

/// Opens the node's module store. The accelerated sha256 is loaded first (on demand:
/// a node without modules never pays for it): fs-verity picks its hash when the
/// store first enables verity, and keeps it. Without it `sha256-generic` serves.
fn open_store(store_dir: &Path) -> Result<powernode_agent::modules::store::ObjectStore, String> {
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

/// The kernel mounter, with composefs image files put on a loop device first.
struct LoopMounter;

/// Loads [`crate::layout::COMPOSEFS_MODULES`] before a module mount (the boot leaves
/// them out: a node without modules never needs them); modules already in the
/// kernel are skipped by their `/sys/module` entry.
fn ensure_composefs_modules(
    spec: &powernode_agent::modules::mount::MountSpec,
) -> Result<(), powernode_agent::modules::mount::MountError> {
    crate::modules::load_on_demand("composefs", crate::layout::COMPOSEFS_MODULES).map_err(|chain| {
        powernode_agent::modules::mount::MountError::Syscall {
            step: "loading the composefs kernel modules",
            fstype: spec.fstype,
            target: spec.target.clone(),
            kernel_log: chain.clone(),
            source: std::io::Error::other(chain),
        }
    })
}

impl powernode_agent::modules::mount::Mounter for LoopMounter {
    fn mount(
        &self,
        spec: &powernode_agent::modules::mount::MountSpec,
    ) -> Result<(), powernode_agent::modules::mount::MountError> {
        use powernode_agent::modules::mount::KernelMounter;
        ensure_composefs_modules(spec)?;
        let file = spec
            .source
            .as_ref()
            .filter(|p| spec.fstype == "erofs" && p.is_file());
        let Some(file) = file else {
            return KernelMounter.mount(spec);
        };
        let on_loop = on_loop_device(&mut RealSys::new(), spec, file)?;
        KernelMounter.mount(&on_loop)
    }

    fn unmount(
        &self,
        target: &std::path::Path,
    ) -> Result<(), powernode_agent::modules::mount::MountError> {
        // An EROFS image on a loop device: free the device too (live swaps would
        // otherwise use up the driver's few loop devices).
        let mut sys = RealSys::new();
        let loop_dev = loop_under(&mut sys, target);
        powernode_agent::modules::mount::KernelMounter.unmount(target)?;
        if let Some(dev) = loop_dev {
            detach(&mut sys, &dev, target);
        }
        Ok(())
    }
}

/// `spec` with its EROFS image `file` put on a loop device, read-only.
fn on_loop_device(
    sys: &mut dyn Sys,
    spec: &powernode_agent::modules::mount::MountSpec,
    file: &Path,
) -> Result<powernode_agent::modules::mount::MountSpec, powernode_agent::modules::mount::MountError>
{
    let dev = sys.attach_loop(file).map_err(|e| {
        powernode_agent::modules::mount::MountError::Syscall {
            step: "attach loop device",
            fstype: spec.fstype,
            target: spec.target.clone(),
            kernel_log: String::new(),
            source: e,
        }
    })?;
    log::info!("{} on {}", file.display(), dev.display());
    let mut on_loop = spec.clone();
    on_loop.source = Some(dev);
    // A read-only block device must be mounted read-only (else EACCES).
    on_loop
        .options
        .push(powernode_agent::modules::mount::MountOpt::Flag("ro"));
    Ok(on_loop)
}

/// The loop device under the EROFS mount at `target`, read before it goes.
fn loop_under(sys: &mut dyn Sys, target: &Path) -> Option<PathBuf> {
    let mountinfo = sys.read_file(MOUNTINFO, MOUNTINFO_LIMIT).ok()?;
    loop_source(&String::from_utf8(mountinfo).ok()?, target)
}

/// Frees a loop device once the mount on it at `target` is gone (best effort).
fn detach(sys: &mut dyn Sys, dev: &Path, target: &Path) {
    match sys.detach_loop(dev) {
        Ok(()) => log::info!("{} detached from {}", dev.display(), target.display()),
        Err(e) => log::warn!("detaching {}: {e}", dev.display()),
    }
}

/// The loop device under the topmost EROFS mount at `target`, from mountinfo text.
fn loop_source(mountinfo: &str, target: &std::path::Path) -> Option<PathBuf> {
    let target = target.to_str()?;
    mountinfo.lines().rev().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let at = pre.split(' ').nth(4)?;
        let mut post = post.split(' ');
        let (fstype, source) = (post.next()?, post.next()?);
        (at == target && fstype == "erofs" && source.starts_with("/dev/loop"))
            .then(|| PathBuf::from(source))
    })
}

/// Who the agent runs under in the composed root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// The agent is PID 1: it reaps orphans and supervises services itself.
    Pid1,
    /// systemd is PID 1 and the agent is `powernode-agent.service`.
    Systemd,
}

/// Agent mode, PID 1 of the composed root: the identity and credentials come from
/// `state_dir` (saved by the bootstrap before switch_root), the timeline and root
/// module digests from [`HANDOFF_FILE`].
pub fn run_in_composed_root(state_dir: &std::path::Path) -> AgentEnd {
    run_in_root(state_dir, Host::Pid1)
}

/// The agent as a systemd service of the composed root: [`run_in_composed_root`]
/// with systemd reaping and running the module services as units.
pub fn run_as_service(state_dir: &std::path::Path) -> AgentEnd {
    run_in_root(state_dir, Host::Systemd)
}

fn run_in_root(state_dir: &std::path::Path, host: Host) -> AgentEnd {
    let failed = |message: String| AgentEnd::Failed {
        code: ErrorCode::Internal,
        message,
    };
    let state = match StateDir::open(state_dir) {
        Ok(s) => s,
        Err(e) => return failed(format!("state dir: {}", powernode_agent::error_chain(&e))),
    };
    let document = match state.load_identity() {
        Ok(Some(d)) => d,
        Ok(None) => return failed(format!("no identity in {}", state_dir.display())),
        Err(e) => return failed(format!("identity: {}", powernode_agent::error_chain(&e))),
    };
    // Without it the agent would report a root it knows nothing about.
    let handoff_path = state_dir.join(HANDOFF_FILE);
    let handoff: Handoff = match std::fs::read(&handoff_path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(h) => h,
            Err(e) => return failed(format!("{} is corrupt: {e}", handoff_path.display())),
        },
        Err(e) => return failed(format!("reading {}: {e}", handoff_path.display())),
    };
    let Handoff {
        timeline,
        root_modules,
        root_facts,
        root_images,
    } = handoff;
    let mut opts = AgentOptions::new(state_dir);
    opts.root_modules = root_modules.iter().map(|m| m.digest.clone()).collect();
    opts.root_facts = root_facts;
    opts.can_reboot = true;
    opts.kmsg_log = true;
    apply_cmdline(&mut opts);
    if host == Host::Systemd {
        // READY=1 after the handshake, watchdog pings, systemd's state upstream;
        // the journal keeps the log (stderr), not the kernel ring.
        opts.systemd = true;
        opts.kmsg_log = false;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return failed(format!("cannot start the agent's async runtime: {e}")),
    };
    let resolved = Resolved {
        document,
        source: "state",
    };
    // Runtime modules mount under /run/powernode/modules; the root modules are
    // reported as running (they are `/`), never touched.
    let root_images = match root_images
        .iter()
        .map(|d| d.parse())
        .collect::<Result<Vec<powernode_agent::verity::VerityDigest>, _>>()
    {
        Ok(images) if !images.is_empty() => Some(images),
        Ok(_) => None,
        Err(e) => {
            return failed(format!(
                "{}: a root image digest: {e}",
                handoff_path.display()
            ))
        }
    };
    let hooks = match rt.block_on(async { node_hooks(state_dir, root_modules, root_images, host) })
    {
        Ok(h) => h,
        Err(message) => return failed(message),
    };
    run_on(&rt, resolved, opts, hooks, &timeline, host)
}

/// The agent's tunables from the kernel command line (`powernode.lease_s=`).
fn apply_cmdline(opts: &mut AgentOptions) {
    let text = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(n) = crate::cmdline::parse(&text).lease_seconds {
        opts.lease_seconds = n;
    }
}

/// SIGTERM or SIGINT (ctrl-alt-del with CAD disabled) to PID 1: stop the agent.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (term, int) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        (Ok(mut t), Err(_)) => {
            t.recv().await;
        }
        (Err(_), Ok(mut i)) => {
            i.recv().await;
        }
        (Err(e), Err(_)) => {
            log::warn!("cannot listen for stop signals: {e}");
            std::future::pending::<()>().await;
        }
    }
    log::info!("PID 1 asked to stop");
}

/// PID 1 inherits every orphan: reap them on SIGCHLD so no zombie piles up.
async fn reap_children() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("cannot listen for SIGCHLD; orphans will not be reaped: {e}");
            return;
        }
    };
    loop {
        reap_all();
        if sigchld.recv().await.is_none() {
            return;
        }
    }
}

/// Reaps every exited child of this process that no service monitor waits for,
/// without blocking. Never `waitpid(-1)`: that would steal a supervised service's
/// exit status from its monitor (which then could not apply its restart policy).
/// The supervised set stays locked while reaping, so no service can start (and be
/// mistaken for an orphan) in between.
pub fn reap_all() -> usize {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let zombies = zombie_children(std::path::Path::new("/proc"), me);
    if zombies.is_empty() {
        return 0;
    }
    powernode_agent::supervisor::with_supervised(|supervised| {
        let mut reaped = 0;
        for pid in zombies {
            if supervised.contains(&pid) {
                continue;
            }
            let Some(p) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            else {
                continue;
            };
            if let Ok(Some(status)) =
                rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG)
            {
                log::debug!("reaped orphan {pid} ({status:?})");
                reaped += 1;
            }
        }
        reaped
    })
}

/// Children of `parent` that have exited and wait to be reaped (state `Z` in
/// `/proc/PID/stat`).
pub fn zombie_children(proc_root: &std::path::Path, parent: i32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat"))
                .ok()
                .and_then(|stat| parse_stat(&stat))
                .is_some_and(|(state, ppid)| state == 'Z' && ppid == parent)
        })
        .collect()
}

/// `(state, ppid)` from a `/proc/PID/stat` line; the command name may hold spaces
/// and parentheses, so fields are counted after its last `)`.
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
pub mod fake {
    //! A scripted driver for the boot sequence tests.
    use super::*;

    #[derive(Debug, Default)]
    pub struct FakeAgent {
        /// Errors returned by the next bootstrap calls, in order.
        pub bootstrap_errors: Vec<BootstrapError>,
        pub bootstraps: Vec<BootstrapInput>,
        pub reports: Vec<FailureReport>,
        pub runs: Vec<Vec<TimelineEntry>>,
        pub ends: Vec<AgentEnd>,
        pub enrolled: bool,
    }

    impl AgentDriver for FakeAgent {
        fn bootstrap(&mut self, input: &BootstrapInput) -> Result<Bootstrapped, BootstrapError> {
            self.bootstraps.push(input.clone());
            if !self.bootstrap_errors.is_empty() {
                return Err(self.bootstrap_errors.remove(0));
            }
            self.enrolled = true;
            Ok(Bootstrapped {
                reused_credentials: false,
                enrolled_at_ms: 1234,
                entropy_wait_ms: None,
            })
        }

        fn report_failure(&mut self, _timeline: &[TimelineEntry], failure: FailureReport) -> bool {
            self.reports.push(failure);
            self.enrolled
        }

        fn run(&mut self, timeline: &[TimelineEntry]) -> AgentEnd {
            self.runs.push(timeline.to_vec());
            if self.ends.is_empty() {
                AgentEnd::Stopped
            } else {
                self.ends.remove(0)
            }
        }
    }
}

#[cfg(test)]
mod reaper_tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn the_loop_device_under_an_erofs_mount_is_found() {
        let info = "30 22 7:0 / /run/powernode/modules/.images/ab ro - erofs /dev/loop3 ro\n\
                    31 22 0:40 / /run/powernode/modules/demo ro - overlay composefs:ab ro\n\
                    32 22 7:1 / /elsewhere ro - erofs /dev/loop4 ro\n";
        assert_eq!(
            loop_source(
                info,
                std::path::Path::new("/run/powernode/modules/.images/ab")
            ),
            Some(PathBuf::from("/dev/loop3"))
        );
        assert_eq!(
            loop_source(info, std::path::Path::new("/run/powernode/modules/demo")),
            None
        );
        assert_eq!(loop_source(info, std::path::Path::new("/nowhere")), None);
    }

    /// The loop device calls go through the seam: attach before the mount, the
    /// mount table read and the detach around the unmount.
    #[test]
    fn an_erofs_image_goes_on_a_loop_device_and_the_device_is_freed_after() {
        use crate::sys::fake::{Call, FakeSys};
        use powernode_agent::modules::mount::{MountOpt, MountSpec};
        let target = Path::new("/run/powernode/modules/.images/ab");
        let spec = MountSpec {
            fstype: "erofs",
            source: Some(PathBuf::from("/persist/powernode/store/images/ab")),
            options: Vec::new(),
            read_only: true,
            target: target.into(),
        };
        let mut sys = FakeSys::default().with_file(
            MOUNTINFO,
            "30 22 7:0 / /run/powernode/modules/.images/ab ro - erofs /dev/loop0 ro\n",
        );
        let file = Path::new("/persist/powernode/store/images/ab");
        let on_loop = on_loop_device(&mut sys, &spec, file).unwrap();
        assert_eq!(on_loop.source, Some(PathBuf::from("/dev/loop0")));
        assert_eq!(on_loop.options, [MountOpt::Flag("ro")]);
        let dev = loop_under(&mut sys, target).unwrap();
        detach(&mut sys, &dev, target);
        assert_eq!(
            sys.calls,
            [
                Call::AttachLoop(file.display().to_string()),
                Call::Read(MOUNTINFO.into()),
                Call::DetachLoop("/dev/loop0".into()),
            ]
        );
        // No mount table: nothing to detach.
        let mut sys = FakeSys::default();
        assert_eq!(loop_under(&mut sys, target), None);
        assert_eq!(sys.calls, [Call::Read(MOUNTINFO.into())]);
    }

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        assert_eq!(parse_stat("12 (a) b) Z 1 12 12 0"), Some(('Z', 1)));
        assert_eq!(parse_stat("7 (sleep) S 42 7"), Some(('S', 42)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) Z notanumber"), None);
    }

    #[test]
    fn zombie_children_of_a_parent_from_a_proc_tree() {
        let dir = std::env::temp_dir().join(format!("reaper-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (pid, stat) in [
            ("10", "10 (x) Z 5 10"),
            ("11", "11 (y) S 5 11"),
            ("12", "12 (z z) Z 6 12"),
            ("self", "1 (me) R 0 1"),
        ] {
            std::fs::create_dir_all(dir.join(pid)).unwrap();
            std::fs::write(dir.join(pid).join("stat"), stat).unwrap();
        }
        assert_eq!(zombie_children(&dir, 5), vec![10]);
        assert_eq!(zombie_children(&dir, 6), vec![12]);
        assert!(zombie_children(&dir.join("missing"), 5).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The fix for PID 1's waitpid(-1): an orphan is reaped, a supervised service's
    /// exit is left to its monitor, which still sees its status and applies its
    /// restart policy.
    #[test]
    fn reaping_leaves_supervised_children_to_their_monitor() {
        use powernode_agent::supervisor::{
            RestartPolicy, ServiceSpec, ServiceSupervisor, Supervisor,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let orphan = std::process::Command::new("true").spawn().unwrap();
            let orphan_pid = orphan.id();
            std::mem::forget(orphan);
            let sup = ServiceSupervisor::default();
            let mut spec = ServiceSpec::new(
                "crasher",
                "m",
                vec!["sh".into(), "-c".into(), "sleep 0.3; exit 3".into()],
            );
            spec.restart = RestartPolicy::Never;
            sup.add(vec![spec]);
            // Reap as eagerly as a SIGCHLD storm would, while the service runs and exits.
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                reap_all();
                let s = sup.services();
                if s[0].state == "failed"
                    && !std::path::Path::new(&format!("/proc/{orphan_pid}")).exists()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let s = sup.services();
            assert_eq!(s[0].state, "failed", "{s:?}");
            assert_eq!(s[0].last_exit.as_deref(), Some("exit 3"), "{s:?}");
            assert!(
                !std::path::Path::new(&format!("/proc/{orphan_pid}")).exists(),
                "the orphan {orphan_pid} was not reaped"
            );
        });
    }
}
