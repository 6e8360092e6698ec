//! The seam between the init's phases and the agent library (`powernode_agent`):
//! enrollment + first handshake during the `bootstrap` phase, upstream failure
//! reports, and the agent runtime the init becomes once the boot is done.
//!
//! [`AgentDriver`] is a trait so the boot sequence stays testable with fakes; the
//! real driver ([`RealAgent`]) owns one tokio current-thread runtime inside PID 1
//! (no worker threads: PID 1 stays a single, simple process).
//!
//! Its rooms: [`compose`] (the root modules composed for the hand-off, and the
//! store's repair), [`mounter`] (the kernel mounter with EROFS images on loop
//! devices) and [`reaper`] (PID 1's orphans). This file keeps the seam, the real
//! driver, and the agent run after the hand-off (agent mode, the systemd service).

use std::path::PathBuf;
use std::time::Duration;

use powernode_agent::client::{ApiClient, ClientError, Timeouts};
use powernode_agent::credentials::Credentials;
use powernode_agent::enroll::EnrollError;
use powernode_agent::identity::Resolved;
use powernode_agent::node_loop::{self, AgentOptions, Exit, Hooks};
use powernode_agent::reissue::{reissue, ReissueError};
use powernode_agent::state::{StateDir, StateError};
use powernode_agent::timeline::Timeline;
use powernode_proto::boot_report::ReportTarget;
use powernode_proto::node::{FailureReport, Phase, RootFacts, RunningModule, TimelineEntry};
use powernode_proto::{ErrorCode, IdentityDocument};

pub mod compose;
pub mod mounter;
pub mod reaper;

use compose::{ComposeError, Composed, ComposedUnion};
use mounter::LoopMounter;

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
    #[error("re-enrolling the expired stored certificate failed")]
    Reissue(#[source] ReissueError),
}

impl BootstrapError {
    /// The stable code reported upstream and on the console.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Enroll(EnrollError::Client(e))
            | Self::Handshake(e)
            | Self::Reissue(ReissueError::Client(e)) => e.report_code(),
            _ => ErrorCode::Internal,
        }
    }

    /// The control plane refused the node for good (token spent or expired,
    /// instance terminated, certificate revoked).
    pub fn refused_for_good(&self) -> bool {
        match self {
            Self::Enroll(e) => e.terminal_code().is_some(),
            Self::Handshake(e) => e.terminal_code().is_some(),
            Self::Reissue(e) => e.terminal_code().is_some(),
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
    /// Best effort, before the node has credentials: sends `failure` as a boot
    /// report to `target`, authenticated by its bootstrap token (which it does not
    /// spend), with the recent console lines. One quick try (a few seconds at most
    /// when the control plane is unreachable); `false` when it was not recorded.
    fn report_boot(&mut self, _target: &ReportTarget, _failure: &FailureReport) -> bool {
        false
    }
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
    /// When boot reports were last sent (failures before enrollment).
    boot_throttle: Option<powernode_agent::boot_report::Throttle>,
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
            let mut creds: Credentials = match stored {
                Some(c) => {
                    log::info!(
                        "bootstrap: reusing stored credentials (serial {})",
                        c.info.serial
                    );
                    c
                }
                None => {
                    // Saves the credentials; a retry of this phase (the failure
                    // policy) reuses the pending key, so a lost answer is answered
                    // again rather than refused.
                    let (creds, _resp) = powernode_agent::enroll::enroll_with_provider(
                        &state,
                        &identity,
                        input.source,
                        input.provider.clone(),
                        timeouts,
                    )
                    .await?;
                    creds
                }
            };
            state.save_identity(&identity)?;
            let mut timeline = Timeline::from_entries(input.timeline.clone());
            let enrolled_at_ms = timeline.mark(Phase::Enrolled);
            let mut client = ApiClient::new(
                &identity.control_plane_url,
                &creds.ca_pem,
                Some(&creds),
                timeouts,
            )
            .map_err(BootstrapError::Handshake)?;
            let root = powernode_agent::facts::read_root_facts(std::path::Path::new(
                crate::layout::MOUNTINFO,
            ));
            let first = node_loop::handshake(
                &client,
                &identity.instance_id,
                Phase::Enrolled,
                &timeline,
                root.clone(),
                None,
            )
            .await;
            let hs = match first {
                // A node that was off (or whose server was down) for longer than its
                // certificate lives: re-enroll it with the same key, no token spent.
                Err(e) if e.code() == Some(ErrorCode::CertificateExpired) => {
                    log::warn!(
                        "bootstrap: the stored certificate (serial {}) expired; re-enrolling it",
                        creds.info.serial
                    );
                    let reissued = reissue(&client, &creds, &identity.instance_id)
                        .await
                        .map_err(BootstrapError::Reissue)?;
                    if let Some(new) = reissued {
                        state.save_credentials(&new)?;
                        creds = new;
                        client = ApiClient::new(
                            &identity.control_plane_url,
                            &creds.ca_pem,
                            Some(&creds),
                            timeouts,
                        )
                        .map_err(BootstrapError::Handshake)?
                        .with_server_clock(client.server_clock().clone());
                    }
                    node_loop::handshake(
                        &client,
                        &identity.instance_id,
                        Phase::Enrolled,
                        &timeline,
                        root,
                        None,
                    )
                    .await
                }
                other => other,
            }
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

    fn report_boot(&mut self, target: &ReportTarget, failure: &FailureReport) -> bool {
        // Under `retry` a phase fails again and again: the first failure, a new code
        // and a refusal go up, otherwise one a minute.
        let due = self
            .boot_throttle
            .get_or_insert_with(|| {
                powernode_agent::boot_report::Throttle::new(Duration::from_secs(60))
            })
            .due(failure.code, failure.code.is_terminal_for_node());
        if !due {
            log::info!(
                "boot report for {} sent less than a minute ago",
                failure.code
            );
            return false;
        }
        let Ok(rt) = self.runtime() else {
            return false;
        };
        let report = powernode_agent::boot_report::request(
            target,
            failure.phase,
            failure.code,
            failure.message.clone(),
            failure.attempt,
            crate::console::recent(),
        );
        let sent = rt.block_on(powernode_agent::boot_report::send(
            target,
            &report,
            powernode_agent::boot_report::TIMEOUTS,
        ));
        match sent {
            Ok(answer) => {
                log::info!(
                    "failure reported upstream as a boot report; the operator is told: {}",
                    answer.recovery
                );
                answer.recorded
            }
            Err(e) => {
                log::warn!(
                    "could not send the boot report: {}",
                    powernode_agent::error_chain(&e)
                );
                false
            }
        }
    }

    fn compose_root(&mut self, target: &str) -> Result<Option<Vec<RunningModule>>, ComposeError> {
        let Some(session) = &self.session else {
            return Err(ComposeError::internal(
                "compose_root before a successful bootstrap".into(),
            ));
        };
        let client = session.client.clone();
        let state_dir = session.state_dir.clone();
        let pinned = session.resolved.document.module_trust_keys.clone();
        let rt = self
            .runtime()
            .map_err(|e| ComposeError::internal(format!("async runtime: {e}")))?;
        match compose::compose(rt, &client, &state_dir, &pinned, target)? {
            Composed::NoRoot(desired) => {
                self.desired = Some(desired);
                Ok(None)
            }
            Composed::Root(root) => {
                let ComposedUnion {
                    modules,
                    facts,
                    store_dir,
                    images,
                    union,
                } = *root;
                self.composed = Some(facts);
                self.composed_images = Some((store_dir, images));
                self.union = Some(union);
                Ok(Some(modules))
            }
        }
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
        let _renewer = crate::dhcp_renew::spawn();
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
        let pinned = resolved.document.module_trust_keys.clone();
        let hooks = match rt
            .block_on(async { node_hooks(&state_dir, &pinned, Vec::new(), None, Host::Pid1) })
        {
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
        match &self.composed_images {
            Some((store_dir, images)) => compose::repair(store_dir, images),
            None => Ok(Vec::new()),
        }
    }
}

/// What the agent drives on a node: one service supervisor, shared by the drain and
/// by the live module runtime (runtime modules under `/run/powernode/modules`, exposed
/// at their mount points, their services supervised). `root_modules` are the modules
/// composed into `/`: reported as running, never swapped live. Call inside the
/// runtime (the supervisor spawns its monitors there).
fn node_hooks(
    state_dir: &std::path::Path,
    pinned_keys: &[String],
    root_modules: Vec<RunningModule>,
    root_images: Option<Vec<powernode_agent::verity::VerityDigest>>,
    host: Host,
) -> Result<Hooks, String> {
    use powernode_agent::modules::{module_runtime, registry, trust};
    use powernode_agent::supervisor::ServiceSupervisor;
    use std::sync::Arc;
    let store_dir = state_dir.join("store");
    std::fs::create_dir_all(&store_dir)
        .map_err(|e| format!("creating the module store {}: {e}", store_dir.display()))?;
    let store = compose::open_store(&store_dir)?;
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
    .with_pinned_keys(pinned_keys.to_vec())
    .with_floor(
        trust::VersionFloor::load(&state_dir.join(trust::FLOOR_FILE))
            .map_err(|e| powernode_agent::error_chain(&e))?,
    )
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
        let reaper = (host == Host::Pid1).then(|| tokio::spawn(reaper::reap_children()));
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
    // The DHCP lease the boot took outlives the boot: renewed from here on.
    let _renewer = crate::dhcp_renew::spawn();
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
    let pinned = document.module_trust_keys.clone();
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
    let hooks = match rt
        .block_on(async { node_hooks(state_dir, &pinned, root_modules, root_images, host) })
    {
        Ok(h) => h,
        Err(message) => return failed(message),
    };
    run_on(&rt, resolved, opts, hooks, &timeline, host)
}

/// The agent's tunables from the kernel command line (`powernode.lease_s=`).
fn apply_cmdline(opts: &mut AgentOptions) {
    let text = std::fs::read_to_string(powernode_sysfmt::cmdline::PATH).unwrap_or_default();
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
        /// Boot reports sent (instance, failure) and whether the server records them.
        pub boot_reports: Vec<(String, FailureReport)>,
        pub boot_report_ok: bool,
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

        fn report_boot(&mut self, target: &ReportTarget, failure: &FailureReport) -> bool {
            self.boot_reports
                .push((target.instance_id.clone(), failure.clone()));
            self.boot_report_ok
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
