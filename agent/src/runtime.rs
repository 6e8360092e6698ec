//! The running agent: credentials (stored or freshly enrolled), a first module
//! reconcile, the handshake with phase and boot timeline, then these duties until
//! told to stop:
//! - heartbeat at the server's interval with jitter, backing off on errors, and
//!   renewing the certificate when the server asks or a third of its life is left;
//! - lease node-side tasks and run them (drain, cordon, diagnostics), renewing the
//!   lease while working and honouring cancel;
//! - reconcile modules against the desired set now and then, reporting the result
//!   in heartbeats;
//! - stop for good, with a distinct exit, when the control plane says this node's
//!   credentials are gone (revoked, terminated, token spent).
//!
//! Everything from the network is data: a bad answer is logged and retried, never a
//! panic.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use powernode_proto::node::{
    CompleteTaskRequest, CompleteTaskResponse, DesiredModulesResponse, FailureReport,
    HandshakeRequest, HandshakeResponse, HeartbeatRequest, HeartbeatResponse, LeaseRequest,
    LeaseResponse, LeasedTask, Phase, ReconcileResult, RenewLeaseRequest, RenewLeaseResponse,
    RenewRequest,
};
use powernode_proto::{paths, ErrorCode, IdentityDocument, InstanceStatus, TaskKind, TaskStatus};
use tokio::sync::{mpsc, Notify};

use crate::backoff::{jittered, Backoff};
use crate::client::{ApiClient, ClientError, Timeouts};
use crate::credentials::{unix_now, CertInfo, CredentialError, Credentials, NodeKey};
use crate::identity::Resolved;
use crate::reconcile::{NoModules, Reconciler};
use crate::state::{StateDir, StateError};
use crate::supervisor::Supervisor;
use crate::timeline::Timeline;

/// Default [`AgentOptions::cordon_file`].
pub const CORDON_FILE: &str = "/run/powernode/agent-cordon.json";

/// Tunables; the defaults suit production, tests shorten them.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub state_dir: PathBuf,
    /// How long a lease is asked for; renewed every third of it.
    pub lease_seconds: u64,
    pub timeouts: Timeouts,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Heartbeat spread, as a fraction of the interval (±).
    pub jitter: f64,
    /// Grace given to services when the agent itself stops.
    pub stop_grace: Duration,
    /// Steady-state reconcile period, in heartbeat intervals.
    pub reconcile_every: u32,
    /// Fallback task poll period, in heartbeat intervals; a heartbeat answer with
    /// `tasks_pending` wakes the lease loop at once, so this can be slow.
    pub lease_poll_every: u32,
    /// Where the facts about `/` reported at handshake come from.
    pub mountinfo: PathBuf,
    /// Digests of the root modules composed into `/` (set by the init after
    /// switch_root), reported with the root facts.
    pub root_modules: Vec<String>,
    /// What the init composed `/` on (store, verity mode, upper, compose cost),
    /// merged into the root facts read from mountinfo.
    pub root_facts: Option<powernode_proto::node::RootFacts>,
    /// The agent may reboot the machine (it is PID 1): a `reboot` task ends the run
    /// with [`Exit::Reboot`]. Elsewhere reboot tasks fail as unsupported.
    pub can_reboot: bool,
    /// Collect-diagnostics includes the last kernel log lines (`/dev/kmsg`, where the
    /// init logs).
    pub kmsg_log: bool,
    /// An mTLS client for the stored credentials that is already connected (the
    /// init's bootstrap made it): its warm connection saves a TLS handshake on the
    /// way to `ready`. Used only when the stored credentials are reused and it talks
    /// to the identity's control plane.
    pub client: Option<ApiClient>,
    /// The desired set the init fetched a moment ago (to decide on root modules):
    /// it serves the first reconcile instead of asking again.
    pub first_desired: Option<DesiredModulesResponse>,
    /// The agent is a systemd service (`Type=notify`): it tells systemd `READY=1`
    /// after the handshake, pings its watchdog (`WatchdogSec=`), reports systemd's
    /// state in heartbeats and diagnostics, and leaves the services (systemd units)
    /// running when it stops.
    pub systemd: bool,
    /// Under systemd: where the cordon outlives an agent restart (a tmpfs, so a
    /// reboot clears it), so a restarted agent on a drained node holds its
    /// services instead of starting them again.
    pub cordon_file: PathBuf,
}

impl AgentOptions {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            lease_seconds: 30,
            timeouts: Timeouts::default(),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            jitter: 0.1,
            stop_grace: Duration::from_secs(10),
            reconcile_every: 10,
            lease_poll_every: 5,
            mountinfo: PathBuf::from(crate::facts::MOUNTINFO),
            root_modules: Vec::new(),
            root_facts: None,
            can_reboot: false,
            kmsg_log: false,
            client: None,
            first_desired: None,
            systemd: false,
            cordon_file: PathBuf::from(CORDON_FILE),
        }
    }
}

/// What the runtime drives on the node: services and modules.
#[derive(Clone)]
pub struct Hooks {
    pub supervisor: Arc<dyn Supervisor>,
    pub reconciler: Arc<dyn Reconciler>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks").finish_non_exhaustive()
    }
}

impl Default for Hooks {
    fn default() -> Self {
        Self {
            supervisor: Arc::new(crate::supervisor::NoServices),
            reconciler: Arc::new(NoModules),
        }
    }
}

/// How the agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop (signal).
    Stopped,
    /// The control plane refused this node for good; `code` says why.
    Terminal { code: ErrorCode, message: String },
    /// A reboot task completed: services are stopped, the caller (PID 1) syncs and
    /// reboots.
    Reboot,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent state")]
    State(#[from] StateError),
    #[error("node credentials")]
    Credentials(#[from] CredentialError),
    #[error("control-plane client")]
    Client(#[from] ClientError),
}

/// What the agent reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct NodeStatus {
    phase: Phase,
    cordoned: bool,
}

struct Shared {
    identity: IdentityDocument,
    opts: AgentOptions,
    state: StateDir,
    client: RwLock<ApiClient>,
    ca_pem: Mutex<String>,
    cert: Mutex<CertInfo>,
    status: Mutex<NodeStatus>,
    interval_secs: AtomicU64,
    supervisor: Arc<dyn Supervisor>,
    reconciler: Arc<dyn Reconciler>,
    last_reconcile: Mutex<Option<ReconcileResult>>,
    /// What `/` is, as reported at handshake (for diagnostics).
    root: Option<powernode_proto::node::RootFacts>,
    wake_lease: Notify,
    wake_heartbeat: Notify,
    exit: mpsc::Sender<Exit>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn client(&self) -> ApiClient {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn instance_id(&self) -> &str {
        &self.identity.instance_id
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_secs.load(Ordering::Relaxed).clamp(1, 3600))
    }

    fn set_interval(&self, secs: u64) {
        if (1..=3600).contains(&secs) {
            self.interval_secs.store(secs, Ordering::Relaxed);
        } else {
            tracing::warn!(
                secs,
                "ignoring out-of-range heartbeat interval from the server"
            );
        }
    }

    fn status(&self) -> NodeStatus {
        lock(&self.status).clone()
    }

    fn set_status(&self, f: impl FnOnce(&mut NodeStatus)) {
        let status = {
            let mut status = lock(&self.status);
            f(&mut status);
            status.clone()
        };
        if self.opts.systemd {
            save_cordon(&self.opts.cordon_file, &status);
        }
        self.wake_heartbeat.notify_one();
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(self.opts.backoff_base, self.opts.backoff_cap)
    }

    /// Stops the agent for good if `err` says the node's credentials are gone.
    async fn stop_if_terminal(&self, err: &ClientError) -> bool {
        match err.terminal_code() {
            Some(code) => {
                let message = match err {
                    ClientError::Refused { message, .. } => message.clone(),
                    other => other.to_string(),
                };
                let _ = self.exit.send(Exit::Terminal { code, message }).await;
                true
            }
            None => false,
        }
    }
}

/// Keeps the cordon (and the drain phase) for the next agent of this boot; a
/// status without cordon removes it. A failure is logged: the cost is a restarted
/// agent that forgets the cordon, as before.
fn save_cordon(path: &std::path::Path, status: &NodeStatus) {
    let result = if status.cordoned {
        serde_json::to_vec(status)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, path)
            })
    } else {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    };
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "keeping the cordon for a restart failed");
    }
}

/// The cordon an earlier agent of this boot left, if any (junk counts as none).
fn load_cordon(path: &std::path::Path) -> Option<NodeStatus> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice::<NodeStatus>(&bytes)
        .ok()
        .filter(|s| s.cordoned)
}

/// Tells systemd `state` when the agent is its notify service; a failure is logged
/// (systemd then times the start out or the watchdog fires, and says so).
fn sd_notify(opts: &AgentOptions, state: &str) {
    if !opts.systemd {
        return;
    }
    match crate::systemd::notify(state) {
        Ok(true) => tracing::debug!(%state, "told systemd"),
        Ok(false) => {}
        Err(e) => tracing::warn!(%state, error = %e, "sd_notify failed"),
    }
}

/// systemd's state, asked off the async thread; `None` when not under systemd.
async fn systemd_state(opts: &AgentOptions) -> Option<powernode_proto::node::SystemdState> {
    if !opts.systemd {
        return None;
    }
    tokio::task::spawn_blocking(crate::systemd::system_state)
        .await
        .ok()
        .flatten()
}

/// The services' states for a heartbeat. Under systemd they come from `systemctl
/// show`, which blocks: asked off the async thread.
async fn services(shared: &Arc<Shared>) -> Vec<powernode_proto::node::ServiceState> {
    if !shared.opts.systemd {
        return shared.supervisor.services();
    }
    let sup = shared.supervisor.clone();
    tokio::task::spawn_blocking(move || sup.services())
        .await
        .unwrap_or_default()
}

/// Aborts its task when dropped (any way out of [`run`]).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Pings systemd's watchdog at half its period for as long as `alive` says the
/// runtime's loops run. It is a task on the agent's own runtime, so a wedged
/// runtime stops pinging too, and systemd restarts the agent.
async fn watchdog(period: Duration, alive: impl Fn() -> bool) {
    let mut tick = tokio::time::interval((period / 2).max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        if !alive() {
            tracing::error!("an agent loop ended; no more watchdog pings");
            return;
        }
        if let Err(e) = crate::systemd::notify("WATCHDOG=1") {
            tracing::warn!(error = %e, "watchdog ping failed");
        }
    }
}

/// Sends a handshake: where the node is in its boot, its timeline, what `/` is,
/// and a failure if there is one.
pub async fn handshake(
    client: &ApiClient,
    instance_id: &str,
    phase: Phase,
    timeline: &Timeline,
    root: Option<powernode_proto::node::RootFacts>,
    failure: Option<powernode_proto::node::FailureReport>,
) -> Result<HandshakeResponse, ClientError> {
    let req = HandshakeRequest {
        instance_id: instance_id.to_string(),
        phase,
        timeline: timeline.to_vec(),
        failure,
        agent_version: crate::AGENT_VERSION.to_string(),
        root,
    };
    client.post(paths::HANDSHAKE, &req).await
}

/// Retries `op` with backoff until it succeeds, the error is terminal, or
/// `shutdown` fires. `Err(Some(exit))` is the way out.
async fn with_retry<T, E, F, Fut>(
    what: &'static str,
    mut backoff: Backoff,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
    terminal: impl Fn(&E) -> Option<ErrorCode>,
    mut op: F,
) -> Result<T, Exit>
where
    E: std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        let result = tokio::select! {
            r = op() => r,
            _ = &mut *shutdown => return Err(Exit::Stopped),
        };
        match result {
            Ok(v) => return Ok(v),
            Err(e) => {
                if let Some(code) = terminal(&e) {
                    return Err(Exit::Terminal {
                        code,
                        message: crate::error_chain(&e),
                    });
                }
                let delay = backoff.next_delay();
                tracing::warn!(step = what, attempt = backoff.attempt(), retry_in_ms = delay.as_millis() as u64,
                    error = %crate::error_chain(&e), "control plane call failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut *shutdown => return Err(Exit::Stopped),
                }
            }
        }
    }
}

/// Runs the agent until `shutdown` resolves or the control plane stops the node.
pub async fn run(
    resolved: Resolved,
    opts: AgentOptions,
    hooks: Hooks,
    mut timeline: Timeline,
    shutdown: impl Future<Output = ()>,
) -> Result<Exit, AgentError> {
    let mut shutdown = std::pin::pin!(shutdown);
    // Pings from the start: whether systemd arms the watchdog at start or at READY,
    // a slow first reconcile never trips it; the unit's start timeout bounds that.
    let early_watchdog = crate::systemd::watchdog_interval()
        .filter(|_| opts.systemd)
        .map(|period| AbortOnDrop(tokio::spawn(watchdog(period, || true))));
    sd_notify(&opts, "STATUS=enrolling");
    let identity = resolved.document;
    let state = StateDir::open(&opts.state_dir)?;
    timeline.mark(Phase::IdentityFound);
    if let Some(old) = state.load_identity().ok().flatten() {
        if old.instance_id != identity.instance_id {
            tracing::info!(old = %old.instance_id, new = %identity.instance_id,
                "identity names a new instance; previous credentials are not reused");
        }
    }
    state.save_identity(&identity)?;

    let mut interval = identity.heartbeat_interval_seconds;
    let mut warm = None;
    let creds = match state.load_credentials(&identity.instance_id)? {
        Some(creds) => {
            warm = opts
                .client
                .clone()
                .filter(|c| c.base_url() == identity.control_plane_url.trim_end_matches('/'));
            tracing::info!(instance_id = %identity.instance_id, serial = %creds.info.serial,
                not_after = creds.info.not_after, "reusing stored certificate; skipping enrollment");
            creds
        }
        None => {
            let source = resolved.source;
            let enrolled = with_retry(
                "enroll",
                Backoff::new(opts.backoff_base, opts.backoff_cap),
                &mut shutdown,
                crate::enroll::EnrollError::terminal_code,
                || crate::enroll::enroll(&identity, source, opts.timeouts),
            )
            .await;
            let (creds, resp) = match enrolled {
                Ok(v) => v,
                Err(exit) => return Ok(exit),
            };
            state.save_credentials(&creds)?;
            interval = resp.heartbeat_interval_seconds;
            creds
        }
    };
    timeline.mark(Phase::Enrolled);

    let client = match warm {
        Some(c) => c,
        None => ApiClient::new(
            &identity.control_plane_url,
            &creds.ca_pem,
            Some(&creds),
            opts.timeouts,
        )?,
    };
    let mut root = crate::facts::read_root_facts(&opts.mountinfo);
    if let Some(r) = root.as_mut() {
        r.modules = opts.root_modules.clone();
        if let Some(init) = &opts.root_facts {
            r.verity = init.verity.clone();
            r.store = init.store.clone();
            r.upper = init.upper.clone();
            r.compose = init.compose.clone();
            r.init = init.init.clone();
        }
        if opts.systemd {
            r.init = "systemd".into();
        } else if std::process::id() == 1 {
            r.init = "agent".into();
        }
    }
    // An agent restarted on a cordoned (drained) node keeps the cordon and holds
    // the services the first reconcile declares, rather than starting them again.
    let resumed = opts
        .systemd
        .then(|| load_cordon(&opts.cordon_file))
        .flatten();
    if let Some(s) = &resumed {
        tracing::warn!(phase = ?s.phase, "resuming a cordon from before this agent's restart; services held");
        hooks.supervisor.stop_all(Duration::ZERO, false).await;
    }
    sd_notify(&opts, "STATUS=reconciling modules");
    // First reconcile: `ready` only once the node runs what it should. A failure
    // goes upstream with its reason and is retried with backoff.
    let mut backoff = Backoff::new(opts.backoff_base, opts.backoff_cap);
    let mut prefetched = opts.first_desired.clone();
    let first_reconcile = loop {
        let desired = match prefetched.take() {
            Some(d) => Ok(d),
            None => {
                with_retry(
                    "desired modules",
                    Backoff::new(opts.backoff_base, opts.backoff_cap),
                    &mut shutdown,
                    ClientError::terminal_code,
                    || client.get::<DesiredModulesResponse>(paths::DESIRED_MODULES),
                )
                .await
            }
        };
        let desired = match desired {
            Ok(d) => d,
            Err(exit) => return Ok(exit),
        };
        match hooks.reconciler.reconcile(&desired).await {
            Ok(outcome) => break reconcile_result(None, outcome.reboot_required),
            Err(mut failure) => {
                failure.attempt = backoff.attempt().saturating_add(1);
                tracing::error!(code = %failure.code, attempt = failure.attempt,
                    message = %failure.message, "module reconcile failed; reporting and retrying");
                let report = handshake(
                    &client,
                    &identity.instance_id,
                    Phase::Failed,
                    &timeline,
                    root.clone(),
                    Some(failure),
                )
                .await;
                if let Err(e) = report {
                    if let Some(code) = e.terminal_code() {
                        return Ok(Exit::Terminal {
                            code,
                            message: crate::error_chain(&e),
                        });
                    }
                    tracing::warn!(error = %crate::error_chain(&e), "could not report the failure");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = &mut shutdown => return Ok(Exit::Stopped),
                }
            }
        }
    };

    timeline.mark(Phase::Ready);
    let hs = with_retry(
        "handshake",
        Backoff::new(opts.backoff_base, opts.backoff_cap),
        &mut shutdown,
        ClientError::terminal_code,
        || {
            handshake(
                &client,
                &identity.instance_id,
                Phase::Ready,
                &timeline,
                root.clone(),
                None,
            )
        },
    )
    .await;
    let hs = match hs {
        Ok(hs) => hs,
        Err(exit) => return Ok(exit),
    };
    tracing::info!(instance_status = %hs.instance_status,
        heartbeat_interval_seconds = hs.heartbeat_interval_seconds, "handshake done; node ready");
    sd_notify(
        &opts,
        &format!(
            "READY=1\nSTATUS=ready: instance {} ({})",
            identity.instance_id, hs.instance_status
        ),
    );
    if hs.heartbeat_interval_seconds > 0 {
        interval = hs.heartbeat_interval_seconds;
    }

    let (exit_tx, mut exit_rx) = mpsc::channel(4);
    let shared = Arc::new(Shared {
        opts,
        state,
        client: RwLock::new(client),
        ca_pem: Mutex::new(creds.ca_pem.clone()),
        cert: Mutex::new(creds.info.clone()),
        status: Mutex::new(resumed.unwrap_or(NodeStatus {
            phase: Phase::Ready,
            cordoned: false,
        })),
        interval_secs: AtomicU64::new(interval),
        supervisor: hooks.supervisor,
        reconciler: hooks.reconciler,
        last_reconcile: Mutex::new(Some(first_reconcile)),
        root: root.clone(),
        wake_lease: Notify::new(),
        wake_heartbeat: Notify::new(),
        exit: exit_tx,
        identity,
    });
    drop(creds);
    shared.set_interval(interval);

    let heartbeat = tokio::spawn(heartbeat_loop(shared.clone()));
    let leases = tokio::spawn(lease_loop(shared.clone()));
    let reconciles = tokio::spawn(reconcile_loop(shared.clone()));
    drop(early_watchdog);
    let loops = [
        heartbeat.abort_handle(),
        leases.abort_handle(),
        reconciles.abort_handle(),
    ];
    let pinger = crate::systemd::watchdog_interval()
        .filter(|_| shared.opts.systemd)
        .map(|period| {
            AbortOnDrop(tokio::spawn(watchdog(period, move || {
                loops.iter().all(|l| !l.is_finished())
            })))
        });
    let exit = tokio::select! {
        e = exit_rx.recv() => e.unwrap_or(Exit::Stopped),
        _ = &mut shutdown => Exit::Stopped,
    };
    drop(pinger);
    heartbeat.abort();
    leases.abort();
    reconciles.abort();
    if shared.opts.systemd {
        // The services are systemd units: an agent restart must not take them
        // down (a reboot task stopped them already).
        sd_notify(&shared.opts, "STOPPING=1");
        tracing::info!(?exit, "agent stopping; its services stay with systemd");
        return Ok(exit);
    }
    let report = shared
        .supervisor
        .stop_all(shared.opts.stop_grace, true)
        .await;
    tracing::info!(stopped = ?report.stopped, killed = ?report.killed, "agent stopped its services");
    Ok(exit)
}

async fn heartbeat_loop(shared: Arc<Shared>) {
    let mut backoff = shared.backoff();
    let mut server_asked_renewal = false;
    loop {
        let status = shared.status();
        let systemd = systemd_state(&shared.opts).await;
        let req = HeartbeatRequest {
            instance_id: shared.instance_id().to_string(),
            phase: status.phase,
            uptime_seconds: crate::timeline::boot_ms() / 1000,
            agent_version: crate::AGENT_VERSION.to_string(),
            modules: shared.reconciler.running(),
            services: services(&shared).await,
            last_reconcile: lock(&shared.last_reconcile).clone(),
            cordoned: status.cordoned,
            systemd,
        };
        let delay = match shared
            .client()
            .post::<_, HeartbeatResponse>(paths::HEARTBEAT, &req)
            .await
        {
            Ok(resp) => {
                backoff.reset();
                shared.set_interval(resp.heartbeat_interval_seconds);
                tracing::debug!(instance_status = %resp.instance_status, tasks_pending = resp.tasks_pending,
                    renew_certificate = resp.renew_certificate, "heartbeat");
                if resp.instance_status == InstanceStatus::Terminated {
                    let _ = shared
                        .exit
                        .send(Exit::Terminal {
                            code: ErrorCode::InstanceTerminated,
                            message: "the control plane reports this instance terminated".into(),
                        })
                        .await;
                    return;
                }
                if resp.tasks_pending {
                    shared.wake_lease.notify_one();
                }
                server_asked_renewal |= resp.renew_certificate;
                jittered(
                    shared.interval(),
                    shared.opts.jitter,
                    crate::entropy::unit_random(),
                )
            }
            Err(e) => {
                if shared.stop_if_terminal(&e).await {
                    return;
                }
                let delay = backoff.next_delay();
                tracing::warn!(attempt = backoff.attempt(), retry_in_ms = delay.as_millis() as u64,
                    error = %crate::error_chain(&e), "heartbeat failed");
                delay
            }
        };

        let info = lock(&shared.cert).clone();
        let now = unix_now();
        if info.expired(now) {
            let _ = shared
                .exit
                .send(Exit::Terminal {
                    code: ErrorCode::ClientCertificateInvalid,
                    message: format!(
                        "the node certificate expired at unix time {} before it could be renewed; \
                         the node needs a new bootstrap token",
                        info.not_after
                    ),
                })
                .await;
            return;
        }
        if info.renewal_due(now, server_asked_renewal) {
            match renew_certificate(&shared).await {
                Ok(()) => server_asked_renewal = false,
                Err(RenewError::Client(e)) if shared.stop_if_terminal(&e).await => return,
                Err(e) => tracing::warn!(error = %crate::error_chain(&e),
                    "certificate renewal failed; retrying at the next heartbeat"),
            }
        }

        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.wake_heartbeat.notified() => {}
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RenewError {
    #[error("renewal request failed")]
    Client(#[from] ClientError),
    #[error("renewal key or certificate")]
    Credentials(#[from] CredentialError),
    #[error("storing the renewed certificate")]
    State(#[from] StateError),
}

/// The renewal answer; only the certificate is required.
#[derive(Debug, serde::Deserialize)]
struct RenewedCertificate {
    certificate_pem: String,
    #[serde(default)]
    ca_pem: Option<String>,
}

/// Renews with a fresh key, stores the result, then swaps the client so the next
/// call presents the new certificate.
async fn renew_certificate(shared: &Shared) -> Result<(), RenewError> {
    let key = NodeKey::generate()?;
    let req = RenewRequest {
        instance_id: shared.instance_id().to_string(),
        csr_pem: key.csr_pem(shared.instance_id())?,
    };
    let resp: RenewedCertificate = shared.client().post(paths::CERTIFICATE_RENEW, &req).await?;
    let ca_pem = resp
        .ca_pem
        .filter(|c| c.contains("-----BEGIN CERTIFICATE-----"))
        .unwrap_or_else(|| lock(&shared.ca_pem).clone());
    let creds = Credentials::new(key, resp.certificate_pem, ca_pem, shared.instance_id())?;
    let client = ApiClient::new(
        &shared.identity.control_plane_url,
        &creds.ca_pem,
        Some(&creds),
        shared.opts.timeouts,
    )?;
    shared.state.save_credentials(&creds)?;
    *shared.client.write().unwrap_or_else(|p| p.into_inner()) = client;
    *lock(&shared.ca_pem) = creds.ca_pem.clone();
    *lock(&shared.cert) = creds.info.clone();
    tracing::info!(serial = %creds.info.serial, not_after = creds.info.not_after, "certificate renewed");
    Ok(())
}

async fn lease_loop(shared: Arc<Shared>) {
    let mut backoff = shared.backoff();
    loop {
        let req = LeaseRequest {
            instance_id: shared.instance_id().to_string(),
            lease_seconds: shared.opts.lease_seconds,
        };
        let delay = match shared
            .client()
            .post::<_, LeaseResponse>(paths::TASK_LEASE, &req)
            .await
        {
            Ok(LeaseResponse { task: Some(task) }) => {
                backoff.reset();
                if run_task(&shared, task).await.is_break() {
                    return;
                }
                // Something may be queued behind it: ask again at once.
                continue;
            }
            Ok(LeaseResponse { task: None }) => {
                backoff.reset();
                shared.interval() * shared.opts.lease_poll_every.max(1)
            }
            Err(e) => {
                if shared.stop_if_terminal(&e).await {
                    return;
                }
                let delay = backoff.next_delay();
                tracing::warn!(retry_in_ms = delay.as_millis() as u64,
                    error = %crate::error_chain(&e), "task lease failed");
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.wake_lease.notified() => {}
        }
    }
}

use std::ops::ControlFlow;

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn reconcile_result(error: Option<FailureReport>, reboot_required: Vec<String>) -> ReconcileResult {
    ReconcileResult {
        at: now_rfc3339(),
        ok: error.is_none(),
        error,
        reboot_required,
    }
}

/// Records a reconcile's result for the heartbeats; a failure keeps the last known
/// reboot_required.
fn record_reconcile(
    shared: &Shared,
    result: &Result<crate::reconcile::ReconcileOutcome, FailureReport>,
) {
    let mut last = lock(&shared.last_reconcile);
    let previous = last
        .as_ref()
        .map(|r| r.reboot_required.clone())
        .unwrap_or_default();
    *last = Some(match result {
        Ok(outcome) => reconcile_result(None, outcome.reboot_required.clone()),
        Err(failure) => reconcile_result(Some(failure.clone()), previous),
    });
}

/// Reconciles every `reconcile_every` heartbeat intervals; the result rides on the
/// next heartbeats. Runs apart from the heartbeat so a long pull never silences it.
async fn reconcile_loop(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(shared.interval() * shared.opts.reconcile_every.max(1)).await;
        let desired = match shared
            .client()
            .get::<DesiredModulesResponse>(paths::DESIRED_MODULES)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                if shared.stop_if_terminal(&e).await {
                    return;
                }
                tracing::warn!(error = %crate::error_chain(&e), "fetching desired modules failed");
                continue;
            }
        };
        let result = shared.reconciler.reconcile(&desired).await;
        match &result {
            Ok(o) if o.changed() => {
                tracing::info!(attached = o.attached.len(), updated = o.updated.len(),
                detached = o.detached.len(), reboot_required = ?o.reboot_required, "modules reconciled")
            }
            Ok(_) => {}
            Err(failure) => {
                tracing::warn!(code = %failure.code, message = %failure.message, "module reconcile failed")
            }
        }
        record_reconcile(&shared, &result);
    }
}

/// Drain parameters as the server sends them; absent fields take the defaults.
#[derive(Debug, serde::Deserialize)]
struct DrainParams {
    #[serde(default = "powernode_proto::admin::default_drain_timeout")]
    timeout_seconds: u64,
    #[serde(default)]
    cordon_only: bool,
}

/// Runs one leased task to completion. `Break` means the agent must stop.
async fn run_task(shared: &Arc<Shared>, task: LeasedTask) -> ControlFlow<()> {
    tracing::info!(task_id = %task.task_id, kind = task.kind.as_str(), params = %task.params, "task leased");
    let outcome = match task.kind {
        TaskKind::Drain => drain(shared, &task).await,
        TaskKind::CollectDiagnostics => collect_diagnostics(shared, &task).await,
        TaskKind::ModuleUpdate => module_update(shared, &task).await,
        TaskKind::Reboot => reboot(shared, &task).await,
        other if shared.status().cordoned => Ok((
            TaskStatus::Failed,
            serde_json::json!({"error": "cordoned",
                "message": format!("the node is cordoned and takes no `{}` work", other.as_str())}),
        )),
        other => Ok((
            TaskStatus::Failed,
            serde_json::json!({"error": "unsupported",
                "message": format!("this agent does not run `{}` tasks yet", other.as_str())}),
        )),
    };
    let (status, result) = match outcome {
        Ok(v) => v,
        Err(TaskAbort::Stop) => return ControlFlow::Break(()),
        Err(TaskAbort::Reboot) => {
            let _ = shared.exit.send(Exit::Reboot).await;
            return ControlFlow::Break(());
        }
        Err(TaskAbort::Completed) => return ControlFlow::Continue(()),
    };
    complete(shared, &task, status, result).await.0
}

/// Task parameters as JSON; `null` is `{}`.
fn params<T: serde::de::DeserializeOwned>(task: &LeasedTask) -> Result<T, serde_json::Value> {
    let v = match &task.params {
        serde_json::Value::Null => serde_json::json!({}),
        v => v.clone(),
    };
    serde_json::from_value(v)
        .map_err(|e| serde_json::json!({"error": "bad_params", "message": e.to_string()}))
}

type TaskOutcome = Result<(TaskStatus, serde_json::Value), TaskAbort>;

/// How a piece of task work under lease ended.
enum Leased<T> {
    Done(T),
    Cancelled,
}

/// Runs `work` while renewing the task's lease every third of it; a renewal that
/// says `cancelled` drops `work` (the caller undoes what it must).
async fn while_leased<T>(
    shared: &Shared,
    task: &LeasedTask,
    progress: &str,
    work: impl Future<Output = T>,
) -> Result<Leased<T>, TaskAbort> {
    let mut work = std::pin::pin!(work);
    let renew_every = Duration::from_secs((shared.opts.lease_seconds / 3).max(1));
    loop {
        tokio::select! {
            v = &mut work => return Ok(Leased::Done(v)),
            _ = tokio::time::sleep(renew_every) => {
                if renew_lease(shared, task, progress).await? {
                    return Ok(Leased::Cancelled);
                }
            }
        }
    }
}

fn cancelled_result(what: &str) -> (TaskStatus, serde_json::Value) {
    (
        TaskStatus::Cancelled,
        serde_json::json!({"cancelled": true, "message": format!("cancelled {what}")}),
    )
}

/// Fetches the desired modules and reconciles now; the result says what changed.
/// The task's params (the server's view of the drift) are informative only: the
/// desired set, fetched now, decides.
async fn module_update(shared: &Arc<Shared>, task: &LeasedTask) -> TaskOutcome {
    if renew_lease(shared, task, "fetching desired modules").await? {
        return Ok(cancelled_result("before any change"));
    }
    let desired = match shared
        .client()
        .get::<DesiredModulesResponse>(paths::DESIRED_MODULES)
        .await
    {
        Ok(d) => d,
        Err(e) if shared.stop_if_terminal(&e).await => return Err(TaskAbort::Stop),
        Err(e) => {
            return Ok((
                TaskStatus::Failed,
                serde_json::json!({"error": e.report_code(), "message": crate::error_chain(&e)}),
            ))
        }
    };
    // The reconcile runs as its own task: a cancel stops the waiting, never a module
    // half way through its swap (services stopped, mounts changing).
    let reconciler = shared.reconciler.clone();
    let mut work = tokio::spawn(async move { reconciler.reconcile(&desired).await });
    let result = match while_leased(shared, task, "reconciling modules", &mut work).await? {
        Leased::Done(Ok(r)) => r,
        Leased::Done(Err(e)) => Err(FailureReport {
            phase: Phase::ModulesVerified,
            code: ErrorCode::Internal,
            message: format!("the reconcile task failed: {e}"),
            attempt: 0,
            recovery: None,
        }),
        Leased::Cancelled => {
            // The task's answer goes now; the reconcile's own result still reaches
            // the heartbeats when it is done.
            let shared = shared.clone();
            tokio::spawn(async move {
                if let Ok(result) = work.await {
                    record_reconcile(&shared, &result);
                    shared.wake_heartbeat.notify_one();
                }
            });
            return Ok((
                TaskStatus::Cancelled,
                serde_json::json!({"cancelled": true,
                    "message": "cancelled while reconciling: the reconcile in flight completes \
                                (no module is left half swapped); heartbeats report the result"}),
            ));
        }
    };
    record_reconcile(shared, &result);
    shared.wake_heartbeat.notify_one();
    Ok(match result {
        Ok(outcome) => {
            tracing::info!(task_id = %task.task_id, ?outcome, "module update applied");
            (
                TaskStatus::Succeeded,
                serde_json::to_value(&outcome).unwrap_or_default(),
            )
        }
        Err(failure) => (
            TaskStatus::Failed,
            serde_json::json!({"error": failure.code, "message": failure.message}),
        ),
    })
}

/// `reboot` parameters: the budget to stop services first, under either name the
/// server may send (`timeout_seconds`, `drain_timeout_seconds`).
#[derive(Debug, serde::Deserialize)]
struct RebootParams {
    #[serde(default)]
    timeout_seconds: Option<u64>,
    #[serde(default)]
    drain_timeout_seconds: Option<u64>,
}

impl RebootParams {
    fn budget(&self) -> Duration {
        let secs = self
            .timeout_seconds
            .or(self.drain_timeout_seconds)
            .unwrap_or(60);
        Duration::from_secs(secs.clamp(1, 3600))
    }
}

/// Cordons, stops the services (killing what outlives the budget) and completes
/// the task itself; once the server recorded it, the run ends with
/// [`Exit::Reboot`] for PID 1 to sync and reboot.
async fn reboot(shared: &Shared, task: &LeasedTask) -> TaskOutcome {
    if !shared.opts.can_reboot {
        return Ok((
            TaskStatus::Failed,
            serde_json::json!({"error": "unsupported",
                "message": "this agent is not PID 1 and does not reboot the machine"}),
        ));
    }
    let p: RebootParams = match params(task) {
        Ok(p) => p,
        Err(bad) => return Ok((TaskStatus::Failed, bad)),
    };
    if renew_lease(shared, task, "stopping services for reboot").await? {
        return Ok(cancelled_result("before the reboot"));
    }
    let was_cordoned = shared.status().cordoned;
    shared.set_status(|s| s.cordoned = true);
    let budget = p.budget();
    let stop = shared.supervisor.stop_all(budget, true);
    let undo = |shared: &Shared| {
        let restarted = shared.supervisor.start_all();
        shared.set_status(|s| s.cordoned = was_cordoned);
        (
            TaskStatus::Cancelled,
            serde_json::json!({"cancelled": true, "services_restarted": restarted}),
        )
    };
    let report = match while_leased(shared, task, "stopping services for reboot", stop).await? {
        Leased::Done(r) => r,
        Leased::Cancelled => return Ok(undo(shared)),
    };
    // The last chance to cancel: after this the node goes down.
    if renew_lease(shared, task, "rebooting").await? {
        return Ok(undo(shared));
    }
    let result = serde_json::json!({
        "rebooting": true,
        "services_stopped": report.stopped,
        "services_killed": report.killed,
    });
    // Completed here, not by the caller: only a completion the server recorded may
    // end in a reboot. One that never landed (or a cancel at the last moment) would
    // leave the task to be requeued and run again, and an ephemeral node without
    // the re-enrollment window the server opens on completion: stay up instead; the
    // lease runs out and the task is leased again.
    match complete(shared, task, TaskStatus::Succeeded, result).await {
        (ControlFlow::Break(()), _) => Err(TaskAbort::Stop),
        (_, Some(TaskStatus::Succeeded)) => {
            tracing::info!(task_id = %task.task_id, stopped = ?report.stopped, killed = ?report.killed, "rebooting");
            Err(TaskAbort::Reboot)
        }
        (_, recorded) => {
            let (_, restarted) = undo(shared);
            tracing::warn!(task_id = %task.task_id, ?recorded, %restarted,
                "reboot not recorded by the server; not rebooting, services restarted");
            Err(TaskAbort::Completed)
        }
    }
}

#[derive(Debug, serde::Deserialize)]
struct DiagnosticsParams {
    #[serde(default = "default_log_lines")]
    log_lines: usize,
}

fn default_log_lines() -> usize {
    50
}

/// Upper bounds of a diagnostics result.
const MAX_LOG_LINES: usize = 200;
const MAX_DIAGNOSTICS_BYTES: usize = 64 * 1024;
const MAX_SERVICE_OUTPUT_LINES: usize = 50;
const MAX_MOUNTS: usize = 100;

async fn collect_diagnostics(shared: &Arc<Shared>, task: &LeasedTask) -> TaskOutcome {
    let p: DiagnosticsParams = match params(task) {
        Ok(p) => p,
        Err(bad) => return Ok((TaskStatus::Failed, bad)),
    };
    if renew_lease(shared, task, "collecting diagnostics").await? {
        return Ok(cancelled_result("before collecting"));
    }
    let lines = p.log_lines.min(MAX_LOG_LINES);
    if !shared.opts.systemd {
        return Ok((TaskStatus::Succeeded, diagnostics(shared, lines, None)));
    }
    // systemctl and journalctl block: off the async thread.
    let this = shared.clone();
    let v = tokio::task::spawn_blocking(move || {
        let systemd = crate::systemd::system_state();
        diagnostics(&this, lines, systemd)
    })
    .await
    .unwrap_or_else(|e| serde_json::json!({"error": "internal", "message": e.to_string()}));
    Ok((TaskStatus::Succeeded, v))
}

enum TaskAbort {
    /// A terminal refusal: the agent is stopping.
    Stop,
    /// A reboot the server recorded as done: the agent ends for PID 1 to reboot.
    Reboot,
    /// The task already reported its end itself; nothing left to complete.
    Completed,
}

/// Renews the task's lease; `Ok(true)` when the operator cancelled it.
async fn renew_lease(
    shared: &Shared,
    task: &LeasedTask,
    progress: &str,
) -> Result<bool, TaskAbort> {
    let req = RenewLeaseRequest {
        instance_id: shared.instance_id().to_string(),
        lease_token: task.lease_token.clone(),
        lease_seconds: shared.opts.lease_seconds,
        progress: Some(progress.to_string()),
    };
    match shared
        .client()
        .post::<_, RenewLeaseResponse>(&paths::task_renew(&task.task_id), &req)
        .await
    {
        Ok(r) => Ok(r.cancelled),
        Err(e) if shared.stop_if_terminal(&e).await => Err(TaskAbort::Stop),
        Err(e) => {
            // The lease may still be valid; carry on and let complete tell.
            tracing::warn!(task_id = %task.task_id, error = %crate::error_chain(&e), "lease renewal failed");
            Ok(false)
        }
    }
}

async fn drain(shared: &Shared, task: &LeasedTask) -> TaskOutcome {
    let params: DrainParams = match params(task) {
        Ok(p) => p,
        Err(bad) => return Ok((TaskStatus::Failed, bad)),
    };
    // Stop taking work first, so nothing new lands while services stop.
    shared.set_status(|s| s.cordoned = true);
    tracing::info!(task_id = %task.task_id, cordon_only = params.cordon_only,
        timeout_seconds = params.timeout_seconds, "node cordoned");
    if params.cordon_only {
        return Ok((
            TaskStatus::Succeeded,
            serde_json::json!({"cordoned": true, "cordon_only": true}),
        ));
    }
    shared.set_status(|s| s.phase = Phase::Draining);
    if renew_lease(shared, task, "stopping services").await? {
        return Ok(cancelled(shared, task, Vec::new()).await);
    }
    // The drain's budget is the operator's: a service still running at its end is
    // not killed but reported, and the node stays draining (stuck) for the operator
    // to decide (terminate --force, or cancel). Drain steps share it.
    let budget = Duration::from_secs(params.timeout_seconds.max(1));
    let deadline = tokio::time::Instant::now() + budget;
    let steps = shared.reconciler.drain_steps();
    let started = Mutex::new(Vec::new());
    let work = drain_work(&*shared.supervisor, &steps, deadline, &started);
    let progress = if steps.is_empty() {
        "stopping services"
    } else {
        "running drain steps, then stopping services"
    };
    let outcome = match while_leased(shared, task, progress, work).await? {
        Leased::Done(r) => r,
        // Dropping the work kills a step that runs and abandons the stop;
        // `cancelled` undoes both.
        Leased::Cancelled => {
            let started = std::mem::take(&mut *lock(&started));
            return Ok(cancelled(shared, task, started).await);
        }
    };
    let started: Vec<String> = lock(&started).iter().map(|s| s.label()).collect();
    let (status, result) = drain_result(params.timeout_seconds, started, outcome);
    match status {
        TaskStatus::Succeeded => {
            shared.set_status(|s| s.phase = Phase::Drained);
            tracing::info!(task_id = %task.task_id, stopped = %result["stopped"], "node drained");
        }
        _ => {
            tracing::warn!(task_id = %task.task_id, error = %result["error"], message = %result["message"],
            "drain did not finish; the node stays draining")
        }
    }
    Ok((status, result))
}

/// A drain's work within `deadline`: the modules' drain steps in order, then the
/// services (reverse start order, never killed). Steps started go to `started`.
async fn drain_work(
    supervisor: &dyn Supervisor,
    steps: &[crate::drain::DrainStep],
    deadline: tokio::time::Instant,
    started: &Mutex<Vec<crate::drain::DrainStep>>,
) -> Result<(Vec<String>, crate::supervisor::StopReport), crate::drain::StepError> {
    let done = crate::drain::run_steps(steps, deadline, started).await?;
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    Ok((done, supervisor.stop_all(left, false).await))
}

/// The drain task's answer. `stopped` lists what stopped in order: the steps
/// (`step:MODULE/NAME`), then the services. A failed step (`started` ends with it)
/// or a service still running fails the drain; the node then stays draining.
fn drain_result(
    timeout_seconds: u64,
    started: Vec<String>,
    outcome: Result<(Vec<String>, crate::supervisor::StopReport), crate::drain::StepError>,
) -> (TaskStatus, serde_json::Value) {
    let (steps, report) = match outcome {
        Ok(v) => v,
        Err(e) => {
            let mut done = started;
            done.pop();
            return (
                TaskStatus::Failed,
                serde_json::json!({
                    "error": e.code(),
                    "message": crate::error_chain(&e),
                    "step": e.step(),
                    "timeout_seconds": timeout_seconds,
                    "steps": done,
                    "stopped": done,
                    "services_stopped": [],
                }),
            );
        }
    };
    let stopped: Vec<&String> = steps.iter().chain(&report.stopped).collect();
    if !report.stuck.is_empty() {
        return (
            TaskStatus::Failed,
            serde_json::json!({
                "error": "drain_timeout",
                "message": format!("{} service(s) still running after {} s: {}",
                    report.stuck.len(), timeout_seconds, report.stuck.join(", ")),
                "timeout_seconds": timeout_seconds,
                "steps": steps,
                "stopped": stopped,
                "services_stopped": report.stopped,
                "services_stuck": report.stuck,
            }),
        );
    }
    (
        TaskStatus::Succeeded,
        serde_json::json!({
            "drained": true,
            "cordon_only": false,
            "steps": steps,
            "stopped": stopped,
            "services_stopped": report.stopped,
            "services_killed": report.killed,
        }),
    )
}

/// The operator cancelled a drain: restart what was stopped, undo the drain steps
/// that ran (`started`, last first), take work again.
async fn cancelled(
    shared: &Shared,
    task: &LeasedTask,
    started: Vec<crate::drain::DrainStep>,
) -> (TaskStatus, serde_json::Value) {
    let restarted = shared.supervisor.start_all();
    let undone = crate::drain::undo_steps(&started).await;
    tracing::info!(task_id = %task.task_id, restarted = ?restarted, ?undone, "drain cancelled; uncordoning");
    shared.set_status(|s| {
        s.cordoned = false;
        s.phase = Phase::Ready;
    });
    let undone: Vec<serde_json::Value> = undone
        .into_iter()
        .map(|(step, error)| serde_json::json!({"step": step, "error": error}))
        .collect();
    (
        TaskStatus::Cancelled,
        serde_json::json!({"cancelled": true, "services_restarted": restarted, "steps_undone": undone}),
    )
}

/// What an operator needs to see without SSH, bounded to [`MAX_DIAGNOSTICS_BYTES`]:
/// versions, what `/` is, modules, mounts, services, certificate, last log lines.
/// Under systemd, `systemd` is its state (failed units included) and the services'
/// output is their journal lines.
fn diagnostics(
    shared: &Shared,
    log_lines: usize,
    systemd: Option<powernode_proto::node::SystemdState>,
) -> serde_json::Value {
    let status = shared.status();
    let cert = lock(&shared.cert).clone();
    let uname = rustix::system::uname();
    let mounts = read_mounts(&shared.opts.mountinfo, MAX_MOUNTS);
    let (log_source, mut log) = if shared.opts.kmsg_log {
        (
            "kmsg",
            kmsg_tail(std::path::Path::new("/dev/kmsg"), log_lines),
        )
    } else {
        ("agent", crate::logring::tail(log_lines))
    };
    // Each service's last lines (what a crash printed), fewer than the node's log.
    let mut service_output = shared
        .supervisor
        .output(log_lines.min(MAX_SERVICE_OUTPUT_LINES));
    let mut truncated = false;
    loop {
        let v = serde_json::json!({
            "agent_version": crate::AGENT_VERSION,
            "kernel": uname.release().to_string_lossy(),
            "uptime_ms": crate::timeline::boot_ms(),
            "phase": status.phase,
            "cordoned": status.cordoned,
            "root": shared.root,
            "modules": shared.reconciler.running(),
            "last_reconcile": lock(&shared.last_reconcile).clone(),
            "mounts": mounts,
            "services": shared.supervisor.services(),
            "service_output": service_output,
            "systemd": systemd,
            "certificate": {"serial": cert.serial, "not_before": cert.not_before, "not_after": cert.not_after},
            "log_source": log_source,
            "log": log,
            "truncated": truncated,
        });
        let size = serde_json::to_vec(&v).map(|b| b.len()).unwrap_or(0);
        let output_left = service_output.values().any(|l| !l.is_empty());
        if size <= MAX_DIAGNOSTICS_BYTES || (log.is_empty() && !output_left) {
            return v;
        }
        // Drop the oldest half of the log until it fits, then of each service's
        // output.
        if log.is_empty() {
            for lines in service_output.values_mut() {
                let keep = lines.len() / 2;
                lines.drain(..lines.len() - keep);
            }
        } else {
            let keep = log.len() / 2;
            log.drain(..log.len() - keep);
        }
        truncated = true;
    }
}

/// Mount points from mountinfo: `{target, fstype, source}`, at most `max`.
fn read_mounts(mountinfo: &std::path::Path, max: usize) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(mountinfo).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let target = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let source = post.next().unwrap_or("");
            Some(serde_json::json!({"target": target, "fstype": fstype, "source": source}))
        })
        .take(max)
        .collect()
}

/// The last `n` messages of the kernel log (where the init logs), read without
/// blocking; each record is `prio,seq,usec,flags;message`.
fn kmsg_tail(path: &std::path::Path, n: usize) -> Vec<String> {
    use rustix::fs::{Mode, OFlags};
    let mut out = std::collections::VecDeque::with_capacity(n + 1);
    if n == 0 {
        return Vec::new();
    }
    let Ok(fd) = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return Vec::new();
    };
    let mut buf = vec![0u8; 8192];
    // Bounded: the ring holds a finite number of records.
    for _ in 0..100_000 {
        match rustix::io::read(&fd, &mut buf) {
            Ok(0) => break,
            Ok(len) => {
                let rec = String::from_utf8_lossy(&buf[..len]);
                let msg = rec
                    .split_once(';')
                    .map(|(_, m)| m)
                    .unwrap_or(&rec)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                out.push_back(msg);
                if out.len() > n {
                    out.pop_front();
                }
            }
            // Records overwritten while reading: go on from the next one.
            Err(rustix::io::Errno::PIPE) => continue,
            Err(_) => break,
        }
    }
    out.into()
}

/// Completes a task, retrying transient failures a few times; returns the status
/// the server recorded when it answered (a task the operator cancelled meanwhile
/// stays `cancelled`).
async fn complete(
    shared: &Shared,
    task: &LeasedTask,
    status: TaskStatus,
    result: serde_json::Value,
) -> (ControlFlow<()>, Option<TaskStatus>) {
    let req = CompleteTaskRequest {
        instance_id: shared.instance_id().to_string(),
        lease_token: task.lease_token.clone(),
        status,
        result,
    };
    let mut backoff = shared.backoff();
    for _ in 0..5 {
        match shared
            .client()
            .post::<_, CompleteTaskResponse>(&paths::task_complete(&task.task_id), &req)
            .await
        {
            Ok(r) => {
                tracing::info!(task_id = %r.task_id, status = r.status.as_str(),
                    instance_status = %r.instance_status, "task completed");
                return (ControlFlow::Continue(()), Some(r.status));
            }
            Err(e) if shared.stop_if_terminal(&e).await => return (ControlFlow::Break(()), None),
            Err(e @ ClientError::Refused { .. }) => {
                // Lease lost or task cancelled meanwhile: nothing to retry.
                tracing::warn!(task_id = %task.task_id, error = %crate::error_chain(&e), "task completion refused");
                return (ControlFlow::Continue(()), None);
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(task_id = %task.task_id, retry_in_ms = delay.as_millis() as u64,
                    error = %crate::error_chain(&e), "task completion failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
    (ControlFlow::Continue(()), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_params_default_and_refuse_junk() {
        let p: DrainParams = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!((p.timeout_seconds, p.cordon_only), (300, false));
        let p: DrainParams =
            serde_json::from_value(serde_json::json!({"timeout_seconds": 5, "cordon_only": true}))
                .unwrap();
        assert_eq!((p.timeout_seconds, p.cordon_only), (5, true));
        assert!(serde_json::from_value::<DrainParams>(
            serde_json::json!({"timeout_seconds": "soon"})
        )
        .is_err());
    }

    #[test]
    fn reconcile_results_are_stamped_rfc3339() {
        let ok = reconcile_result(None, vec![]);
        assert!(ok.ok && ok.error.is_none());
        let at =
            time::OffsetDateTime::parse(&ok.at, &time::format_description::well_known::Rfc3339)
                .unwrap();
        assert!((time::OffsetDateTime::now_utc() - at).whole_seconds().abs() < 5);
        let failed = reconcile_result(
            Some(FailureReport {
                phase: Phase::ModulesVerified,
                code: ErrorCode::DigestMismatch,
                message: "x".into(),
                attempt: 1,
                recovery: None,
            }),
            vec!["base".into()],
        );
        assert!(!failed.ok);
        assert_eq!(
            serde_json::to_value(&failed).unwrap()["reboot_required"],
            serde_json::json!(["base"])
        );
        assert!(serde_json::to_value(&ok)
            .unwrap()
            .get("reboot_required")
            .is_none());
        assert_eq!(
            serde_json::to_value(&failed).unwrap()["error"]["code"],
            "digest_mismatch"
        );
    }

    fn leased(params: serde_json::Value) -> LeasedTask {
        LeasedTask {
            task_id: "t".into(),
            kind: TaskKind::Reboot,
            params,
            lease_expires_at: String::new(),
            lease_token: "x".into(),
        }
    }

    #[test]
    fn task_params_take_the_servers_names_and_refuse_junk() {
        let p: RebootParams = params(&leased(
            serde_json::json!({"reason": "x", "drain_timeout_seconds": 7}),
        ))
        .unwrap();
        assert_eq!(p.budget(), Duration::from_secs(7));
        // The server sends both names.
        let p: RebootParams = params(&leased(
            serde_json::json!({"drain_timeout_seconds": 7, "timeout_seconds": 9}),
        ))
        .unwrap();
        assert_eq!(p.budget(), Duration::from_secs(9));
        let p: RebootParams = params(&leased(serde_json::Value::Null)).unwrap();
        assert_eq!(p.budget(), Duration::from_secs(60));
        let p: DiagnosticsParams = params(&leased(serde_json::json!({"log_lines": 5}))).unwrap();
        assert_eq!(p.log_lines, 5);
        let bad =
            params::<DiagnosticsParams>(&leased(serde_json::json!({"log_lines": -1}))).unwrap_err();
        assert_eq!(bad["error"], "bad_params");
    }

    #[test]
    fn mounts_come_from_mountinfo_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mountinfo");
        std::fs::write(
            &path,
            "22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/a\n\
             23 22 0:5 / /dev rw - devtmpfs devtmpfs rw\n\
             garbage line\n\
             24 22 7:0 / /run/powernode/modules/demo ro - overlay composefs:ab ro\n",
        )
        .unwrap();
        let m = read_mounts(&path, 10);
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(m[0]["target"], "/");
        assert_eq!(m[2]["target"], "/run/powernode/modules/demo");
        assert_eq!(m[2]["source"], "composefs:ab");
        assert_eq!(read_mounts(&path, 1).len(), 1);
        assert!(read_mounts(&dir.path().join("missing"), 10).is_empty());
        // A missing kernel log is no log, not an error.
        assert!(kmsg_tail(&dir.path().join("missing"), 10).is_empty());
    }

    #[test]
    fn options_defaults_are_sane() {
        let o = AgentOptions::new("/tmp/x");
        assert!(o.lease_seconds >= 3 && o.reconcile_every >= 1 && o.lease_poll_every >= 1);
        assert!(o.backoff_cap >= o.backoff_base);
    }

    fn sh_step(module: &str, name: &str, script: &str) -> crate::drain::DrainStep {
        crate::drain::DrainStep {
            module: module.into(),
            name: name.into(),
            argv: vec!["sh".into(), "-c".into(), script.into()],
            undo: None,
            timeout: Duration::from_secs(10),
            env: Vec::new(),
            cwd: None,
        }
    }

    /// The DockerHost runbook in miniature: the step stops the "containers" while
    /// the "daemon" still runs, then the daemon stops; the result lists both in
    /// that order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_runs_the_steps_before_the_services_and_lists_both_in_order() {
        use crate::supervisor::{ServiceSpec, ServiceSupervisor};
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let daemon = format!(
            "trap 'echo daemon-stopped >> {l}; exit 0' TERM; while :; do sleep 0.05; done",
            l = log.display()
        );
        let sup = ServiceSupervisor::default();
        sup.add(vec![ServiceSpec::new(
            "docker",
            "dockerhost",
            vec!["sh".into(), "-c".into(), daemon],
        )]);
        let t = std::time::Instant::now();
        while sup.services()[0].state != "running" {
            assert!(t.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let steps = [sh_step(
            "dockerhost",
            "containers",
            &format!("echo containers-stopped >> {}", log.display()),
        )];
        let started = Mutex::new(Vec::new());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let outcome = drain_work(&sup, &steps, deadline, &started).await;
        let started: Vec<String> = started.lock().unwrap().iter().map(|s| s.label()).collect();
        let (status, result) = drain_result(10, started, outcome);
        assert_eq!(status, TaskStatus::Succeeded, "{result}");
        assert_eq!(
            result["stopped"],
            serde_json::json!(["step:dockerhost/containers", "docker"])
        );
        assert_eq!(
            result["steps"],
            serde_json::json!(["step:dockerhost/containers"])
        );
        assert_eq!(result["services_stopped"], serde_json::json!(["docker"]));
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "containers-stopped\ndaemon-stopped\n"
        );
    }

    #[tokio::test]
    async fn a_failing_drain_step_fails_the_drain_and_leaves_the_services_running() {
        use crate::supervisor::{ServiceSpec, ServiceSupervisor};
        let sup = ServiceSupervisor::default();
        sup.add(vec![ServiceSpec::new(
            "web",
            "m",
            vec!["sleep".into(), "100".into()],
        )]);
        let t = std::time::Instant::now();
        while sup.services()[0].state != "running" {
            assert!(t.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = sup.services()[0].pid;
        let steps = [
            sh_step("m", "ok", "true"),
            sh_step("m", "stuck-container", "echo container refuses >&2; exit 1"),
            sh_step("m", "never", "true"),
        ];
        let started = Mutex::new(Vec::new());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let outcome = drain_work(&sup, &steps, deadline, &started).await;
        let started: Vec<String> = started.lock().unwrap().iter().map(|s| s.label()).collect();
        let (status, result) = drain_result(10, started, outcome);
        assert_eq!(status, TaskStatus::Failed);
        assert_eq!(result["error"], "drain_step_failed");
        assert_eq!(result["step"], "step:m/stuck-container");
        assert_eq!(result["steps"], serde_json::json!(["step:m/ok"]));
        assert!(result["message"]
            .as_str()
            .unwrap()
            .contains("container refuses"));
        let web = &sup.services()[0];
        assert_eq!(
            (web.state.as_str(), web.pid),
            ("running", pid),
            "services untouched"
        );
        sup.stop_all(Duration::from_millis(10), true).await;
    }

    #[test]
    fn a_stuck_service_still_reports_drain_timeout_with_the_steps_that_ran() {
        let report = crate::supervisor::StopReport {
            stopped: vec!["b".into()],
            killed: vec![],
            stuck: vec!["a".into()],
        };
        let (status, result) = drain_result(5, vec![], Ok((vec!["step:m/s".into()], report)));
        assert_eq!(status, TaskStatus::Failed);
        assert_eq!(result["error"], "drain_timeout");
        assert_eq!(result["stopped"], serde_json::json!(["step:m/s", "b"]));
        assert_eq!(result["services_stuck"], serde_json::json!(["a"]));
    }

    #[test]
    fn a_cordon_is_kept_for_the_next_agent_and_dropped_with_the_uncordon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agent-cordon.json");
        assert_eq!(load_cordon(&path), None);
        let drained = NodeStatus {
            phase: Phase::Drained,
            cordoned: true,
        };
        save_cordon(&path, &drained);
        assert_eq!(load_cordon(&path), Some(drained));
        save_cordon(
            &path,
            &NodeStatus {
                phase: Phase::Ready,
                cordoned: false,
            },
        );
        assert!(!path.exists());
        std::fs::write(&path, b"junk").unwrap();
        assert_eq!(load_cordon(&path), None);
    }
}
