//! The node loop: what the agent does for as long as the node runs. Credentials
//! (stored or freshly enrolled), a first module reconcile, the handshake with phase
//! and boot timeline, then these duties until told to stop, each in its own file:
//! - [`heartbeat`]: heartbeat at the server's interval with jitter, backing off on
//!   errors, and renewing the certificate when the server asks or a third of its
//!   life is left;
//! - [`lease`]: lease node-side tasks and run them ([`tasks`]: drain, module update,
//!   reboot, diagnostics), renewing the lease while working and honouring cancel;
//! - [`reconcile_loop`]: reconcile modules against the desired set now and then,
//!   reporting the result in heartbeats;
//! - stop for good, with a distinct exit, when the control plane says this node's
//!   credentials are gone (revoked, terminated, token spent). An expired
//!   certificate is not that: it is re-enrolled with the same key (at start and in
//!   [`heartbeat`]), and the services keep running meanwhile.
//!
//! What they share is [`shared`]; what the caller gives and gets back is [`options`].
//! Everything from the network is data: a bad answer is logged and retried, never a
//! panic.

mod heartbeat;
mod lease;
mod options;
mod reconcile_loop;
mod shared;
mod tasks;

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use powernode_proto::node::{DesiredModulesResponse, HandshakeRequest, HandshakeResponse, Phase};
use powernode_proto::{paths, ErrorCode};
use tokio::sync::{mpsc, Notify};

pub use options::{AgentOptions, Exit, Hooks, CORDON_FILE};

use crate::backoff::Backoff;
use crate::client::{ApiClient, ClientError};
use crate::credentials::CredentialError;
use crate::identity::Resolved;
use crate::state::{StateDir, StateError};
use crate::timeline::Timeline;
use reconcile_loop::reconcile_result;
use shared::{load_cordon, NodeStatus, Shared};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent state")]
    State(#[from] StateError),
    #[error("node credentials")]
    Credentials(#[from] CredentialError),
    #[error("control-plane client")]
    Client(#[from] ClientError),
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

/// Aborts its task when dropped (any way out of [`run`]).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Pings systemd's watchdog at half its period for as long as `alive` says the
/// node loop's loops run. It is a task on the agent's own async runtime, so a wedged
/// async runtime stops pinging too, and systemd restarts the agent.
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

/// How often a node that keeps failing to enroll with the same code reports it.
const BOOT_REPORT_EVERY: Duration = Duration::from_secs(60);

/// Sends a failed enrollment upstream as a boot report with the agent's last log
/// lines, when the throttle says so; best effort, logged.
async fn report_enroll_failure(
    identity: &powernode_proto::IdentityDocument,
    error: &crate::enroll::EnrollError,
    attempt: u32,
    throttle: &Mutex<crate::boot_report::Throttle>,
) {
    let code = crate::boot_report::enroll_code(error);
    let due = throttle
        .lock()
        .map(|mut t| t.due(code, error.terminal_code().is_some()))
        .unwrap_or(false);
    if !due {
        return;
    }
    let target = powernode_proto::boot_report::ReportTarget::from(identity);
    let report = crate::boot_report::request(
        &target,
        Phase::Enrolled,
        code,
        format!("enrollment: {}", crate::error_chain(error)),
        attempt,
        crate::logring::tail(powernode_proto::boot_report::MAX_CONSOLE_LINES),
    );
    match crate::boot_report::send(&target, &report, crate::boot_report::TIMEOUTS).await {
        Ok(_) => {
            tracing::info!(%code, attempt, "enrollment failure reported upstream (boot report)")
        }
        Err(e) => tracing::warn!(%code, error = %crate::error_chain(&e),
            "could not send the boot report"),
    }
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

/// [`ClientError::terminal_code`], and `certificate_expired` too: at start, the way
/// out of a retry loop to re-enroll the certificate ([`reissue_at_start`]).
fn terminal_or_expired(e: &ClientError) -> Option<ErrorCode> {
    e.terminal_code()
        .or(e.code().filter(|c| *c == ErrorCode::CertificateExpired))
}

fn is_expired(exit: &Exit) -> bool {
    matches!(exit, Exit::Terminal { code, .. } if *code == ErrorCode::CertificateExpired)
}

/// The stored certificate expired (a node that was off, or a server that was down,
/// for longer than it lives): re-enrolls it with the same key, retrying with
/// backoff, and returns the client that presents the new one. `Ok(Err(exit))`:
/// refused for good, or stopped.
async fn reissue_at_start(
    identity: &powernode_proto::IdentityDocument,
    state: &StateDir,
    opts: &AgentOptions,
    client: &ApiClient,
    creds: &mut crate::credentials::Credentials,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<Result<ApiClient, Exit>, AgentError> {
    tracing::warn!(serial = %creds.info.serial, not_after = creds.info.not_after,
        "the server says the stored certificate expired; re-enrolling it with the same key");
    let reissued = with_retry(
        "reissue",
        Backoff::new(opts.backoff_base, opts.backoff_cap),
        shutdown,
        crate::reissue::ReissueError::terminal_code,
        || crate::reissue::reissue(client, creds, &identity.instance_id),
    )
    .await;
    match reissued {
        Ok(Some(new)) => {
            state.save_credentials(&new)?;
            *creds = new;
        }
        // The server calls it unexpired after all: carry on with it.
        Ok(None) => {}
        Err(exit) => return Ok(Err(exit)),
    }
    let fresh = ApiClient::new(
        &identity.control_plane_url,
        &creds.ca_pem,
        Some(creds),
        opts.timeouts,
    )?
    .with_server_clock(client.server_clock().clone());
    Ok(Ok(fresh))
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
    let mut creds = match state.load_credentials(&identity.instance_id)? {
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
            // Each failure may go upstream as a boot report (the token is not spent
            // by it), throttled: the operator sees why the node cannot enroll.
            let throttle = Mutex::new(crate::boot_report::Throttle::new(BOOT_REPORT_EVERY));
            let tries = AtomicU32::new(0);
            let (doc, throttle, tries, timeouts, st) =
                (&identity, &throttle, &tries, opts.timeouts, &state);
            let enrolled = with_retry(
                "enroll",
                Backoff::new(opts.backoff_base, opts.backoff_cap),
                &mut shutdown,
                crate::enroll::EnrollError::terminal_code,
                move || async move {
                    let result = crate::enroll::enroll(st, doc, source, timeouts).await;
                    let attempt = tries.fetch_add(1, Ordering::Relaxed).saturating_add(1);
                    if let Err(e) = &result {
                        report_enroll_failure(doc, e, attempt, throttle).await;
                    }
                    result
                },
            )
            .await;
            let (creds, resp) = match enrolled {
                Ok(v) => v,
                Err(exit) => return Ok(exit),
            };
            interval = resp.heartbeat_interval_seconds;
            creds
        }
    };
    timeline.mark(Phase::Enrolled);

    let mut client = match warm {
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
                    terminal_or_expired,
                    || client.get::<DesiredModulesResponse>(paths::DESIRED_MODULES),
                )
                .await
            }
        };
        let desired = match desired {
            Ok(d) => d,
            Err(exit) if is_expired(&exit) => {
                match reissue_at_start(&identity, &state, &opts, &client, &mut creds, &mut shutdown)
                    .await?
                {
                    Ok(c) => client = c,
                    Err(exit) => return Ok(exit),
                }
                continue;
            }
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
    let hs = loop {
        let hs = with_retry(
            "handshake",
            Backoff::new(opts.backoff_base, opts.backoff_cap),
            &mut shutdown,
            terminal_or_expired,
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
        match hs {
            Ok(hs) => break hs,
            Err(exit) if is_expired(&exit) => {
                match reissue_at_start(&identity, &state, &opts, &client, &mut creds, &mut shutdown)
                    .await?
                {
                    Ok(c) => client = c,
                    Err(exit) => return Ok(exit),
                }
            }
            Err(exit) => return Ok(exit),
        }
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

    // The certificate's receipt time was read by this node's clock; the server has
    // answered by now, so put it on the server's clock, which renewal is judged by.
    let mut cert = creds.info.clone();
    if let Some(offset_ms) = client.server_clock().offset_ms() {
        cert.received_at = cert.received_at.saturating_add(offset_ms / 1000);
    }
    let (exit_tx, mut exit_rx) = mpsc::channel(4);
    let shared = Arc::new(Shared {
        opts,
        state,
        client: RwLock::new(client),
        ca_pem: Mutex::new(creds.ca_pem.clone()),
        cert: Mutex::new(cert),
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

    let heartbeat = tokio::spawn(heartbeat::heartbeat_loop(shared.clone()));
    let leases = tokio::spawn(lease::lease_loop(shared.clone()));
    let reconciles = tokio::spawn(reconcile_loop::reconcile_loop(shared.clone()));
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
