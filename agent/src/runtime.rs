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
#[derive(Debug, Clone)]
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
        f(&mut lock(&self.status));
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
    let creds = match state.load_credentials(&identity.instance_id)? {
        Some(creds) => {
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

    let client = ApiClient::new(
        &identity.control_plane_url,
        &creds.ca_pem,
        Some(&creds),
        opts.timeouts,
    )?;
    let mut root = crate::facts::read_root_facts(&opts.mountinfo);
    if let Some(r) = root.as_mut() {
        r.modules = opts.root_modules.clone();
        if let Some(init) = &opts.root_facts {
            r.verity = init.verity.clone();
            r.store = init.store.clone();
            r.upper = init.upper.clone();
            r.compose = init.compose.clone();
        }
    }
    // First reconcile: `ready` only once the node runs what it should. A failure
    // goes upstream with its reason and is retried with backoff.
    let mut backoff = Backoff::new(opts.backoff_base, opts.backoff_cap);
    let first_reconcile = loop {
        let desired = with_retry(
            "desired modules",
            Backoff::new(opts.backoff_base, opts.backoff_cap),
            &mut shutdown,
            ClientError::terminal_code,
            || client.get::<DesiredModulesResponse>(paths::DESIRED_MODULES),
        )
        .await;
        let desired = match desired {
            Ok(d) => d,
            Err(exit) => return Ok(exit),
        };
        match hooks.reconciler.reconcile(&desired).await {
            Ok(()) => break reconcile_result(None),
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
        status: Mutex::new(NodeStatus {
            phase: Phase::Ready,
            cordoned: false,
        }),
        interval_secs: AtomicU64::new(interval),
        supervisor: hooks.supervisor,
        reconciler: hooks.reconciler,
        last_reconcile: Mutex::new(Some(first_reconcile)),
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
    let exit = tokio::select! {
        e = exit_rx.recv() => e.unwrap_or(Exit::Stopped),
        _ = &mut shutdown => Exit::Stopped,
    };
    heartbeat.abort();
    leases.abort();
    reconciles.abort();
    let report = shared.supervisor.stop_all(shared.opts.stop_grace).await;
    tracing::info!(stopped = ?report.stopped, killed = ?report.killed, "agent stopped its services");
    Ok(exit)
}

async fn heartbeat_loop(shared: Arc<Shared>) {
    let mut backoff = shared.backoff();
    let mut server_asked_renewal = false;
    loop {
        let status = shared.status();
        let req = HeartbeatRequest {
            instance_id: shared.instance_id().to_string(),
            phase: status.phase,
            uptime_seconds: crate::timeline::boot_ms() / 1000,
            agent_version: crate::AGENT_VERSION.to_string(),
            modules: shared.reconciler.running(),
            services: shared.supervisor.services(),
            last_reconcile: lock(&shared.last_reconcile).clone(),
            cordoned: status.cordoned,
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

fn reconcile_result(error: Option<FailureReport>) -> ReconcileResult {
    ReconcileResult {
        at: now_rfc3339(),
        ok: error.is_none(),
        error,
    }
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
        let result = match shared.reconciler.reconcile(&desired).await {
            Ok(()) => reconcile_result(None),
            Err(failure) => {
                tracing::warn!(code = %failure.code, message = %failure.message, "module reconcile failed");
                reconcile_result(Some(failure))
            }
        };
        *lock(&shared.last_reconcile) = Some(result);
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
async fn run_task(shared: &Shared, task: LeasedTask) -> ControlFlow<()> {
    tracing::info!(task_id = %task.task_id, kind = task.kind.as_str(), params = %task.params, "task leased");
    let (status, result) = match task.kind {
        TaskKind::Drain => match drain(shared, &task).await {
            Ok(outcome) => outcome,
            Err(TaskAbort::Stop) => return ControlFlow::Break(()),
        },
        TaskKind::CollectDiagnostics => (TaskStatus::Succeeded, diagnostics(shared)),
        other if shared.status().cordoned => (
            TaskStatus::Failed,
            serde_json::json!({"error": "cordoned",
                "message": format!("the node is cordoned and takes no `{}` work", other.as_str())}),
        ),
        other => (
            TaskStatus::Failed,
            serde_json::json!({"error": "unsupported",
                "message": format!("this agent does not run `{}` tasks yet", other.as_str())}),
        ),
    };
    complete(shared, &task, status, result).await
}

enum TaskAbort {
    /// A terminal refusal: the agent is stopping.
    Stop,
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

async fn drain(
    shared: &Shared,
    task: &LeasedTask,
) -> Result<(TaskStatus, serde_json::Value), TaskAbort> {
    let params: DrainParams = match serde_json::from_value(match &task.params {
        serde_json::Value::Null => serde_json::json!({}),
        v => v.clone(),
    }) {
        Ok(p) => p,
        Err(e) => {
            return Ok((
                TaskStatus::Failed,
                serde_json::json!({"error": "bad_params", "message": e.to_string()}),
            ))
        }
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
        return Ok(cancelled(shared, task));
    }
    let grace = Duration::from_secs(params.timeout_seconds.max(1));
    let stop = shared.supervisor.stop_all(grace);
    let mut stop = std::pin::pin!(stop);
    let renew_every = Duration::from_secs((shared.opts.lease_seconds / 3).max(1));
    let report = loop {
        tokio::select! {
            report = &mut stop => break report,
            _ = tokio::time::sleep(renew_every) => {
                if renew_lease(shared, task, "stopping services").await? {
                    // Dropping the stop future abandons it; start_all undoes it.
                    return Ok(cancelled(shared, task));
                }
            }
        }
    };
    shared.set_status(|s| s.phase = Phase::Drained);
    tracing::info!(task_id = %task.task_id, stopped = ?report.stopped, killed = ?report.killed, "node drained");
    Ok((
        TaskStatus::Succeeded,
        serde_json::json!({
            "drained": true,
            "cordon_only": false,
            "services_stopped": report.stopped,
            "services_killed": report.killed,
        }),
    ))
}

/// The operator cancelled a drain: restart what was stopped, take work again.
fn cancelled(shared: &Shared, task: &LeasedTask) -> (TaskStatus, serde_json::Value) {
    let restarted = shared.supervisor.start_all();
    tracing::info!(task_id = %task.task_id, restarted = ?restarted, "drain cancelled; uncordoning");
    shared.set_status(|s| {
        s.cordoned = false;
        s.phase = Phase::Ready;
    });
    (
        TaskStatus::Cancelled,
        serde_json::json!({"cancelled": true, "services_restarted": restarted}),
    )
}

fn diagnostics(shared: &Shared) -> serde_json::Value {
    let status = shared.status();
    let cert = lock(&shared.cert).clone();
    serde_json::json!({
        "agent_version": crate::AGENT_VERSION,
        "uptime_ms": crate::timeline::boot_ms(),
        "phase": status.phase,
        "cordoned": status.cordoned,
        "services": shared.supervisor.services(),
        "certificate": {"serial": cert.serial, "not_before": cert.not_before, "not_after": cert.not_after},
    })
}

/// Completes a task, retrying transient failures a few times.
async fn complete(
    shared: &Shared,
    task: &LeasedTask,
    status: TaskStatus,
    result: serde_json::Value,
) -> ControlFlow<()> {
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
                return ControlFlow::Continue(());
            }
            Err(e) if shared.stop_if_terminal(&e).await => return ControlFlow::Break(()),
            Err(e @ ClientError::Refused { .. }) => {
                // Lease lost or task cancelled meanwhile: nothing to retry.
                tracing::warn!(task_id = %task.task_id, error = %crate::error_chain(&e), "task completion refused");
                return ControlFlow::Continue(());
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(task_id = %task.task_id, retry_in_ms = delay.as_millis() as u64,
                    error = %crate::error_chain(&e), "task completion failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
    ControlFlow::Continue(())
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
        let ok = reconcile_result(None);
        assert!(ok.ok && ok.error.is_none());
        let at =
            time::OffsetDateTime::parse(&ok.at, &time::format_description::well_known::Rfc3339)
                .unwrap();
        assert!((time::OffsetDateTime::now_utc() - at).whole_seconds().abs() < 5);
        let failed = reconcile_result(Some(FailureReport {
            phase: Phase::ModulesVerified,
            code: ErrorCode::DigestMismatch,
            message: "x".into(),
            attempt: 1,
        }));
        assert!(!failed.ok);
        assert_eq!(
            serde_json::to_value(&failed).unwrap()["error"]["code"],
            "digest_mismatch"
        );
    }

    #[test]
    fn options_defaults_are_sane() {
        let o = AgentOptions::new("/tmp/x");
        assert!(o.lease_seconds >= 3 && o.reconcile_every >= 1 && o.lease_poll_every >= 1);
        assert!(o.backoff_cap >= o.backoff_base);
    }
}
