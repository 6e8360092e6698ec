//! The heartbeat loop (status, modules, services, systemd's state; the answer sets
//! the interval, wakes the lease loop and may ask for renewal) and the certificate
//! renewal it drives: a fresh key, a CSR, the new certificate stored, then the
//! client swapped. Renewal is judged by the server's clock as the answers' `Date`
//! tells it, and an early one the server refuses (`renewal_not_due`) waits for the
//! server to ask.
//!
//! The node's own certificate running out is never a reason to stop: workloads
//! keep running, heartbeats keep being retried with backoff and jitter, and when
//! the server answers `certificate_expired` the loop re-enrolls the certificate
//! with the same key ([`crate::reissue`]). Only the server ends the node
//! (revoked, terminated, expired beyond its grace period).

use std::sync::Arc;

use powernode_proto::node::{HeartbeatRequest, HeartbeatResponse, RenewRequest};
use powernode_proto::{paths, ErrorCode, InstanceStatus};

use super::options::{AgentOptions, Exit};
use super::shared::{lock, Shared};
use crate::backoff::jittered;
use crate::client::{ApiClient, ClientError};
use crate::credentials::{CredentialError, Credentials, NodeKey};
use crate::reissue::ReissueError;
use crate::state::StateError;

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

/// When the agent renews: the server asked, or the certificate is due by the
/// server's clock; after a `renewal_not_due` only when the server asks, and after
/// `renewal_rate_limited` not before a backoff.
#[derive(Debug)]
struct Renewal {
    server_asked: bool,
    only_when_asked: bool,
    not_before: Option<tokio::time::Instant>,
    backoff: crate::backoff::Backoff,
}

impl Renewal {
    fn due(&self, info: &crate::credentials::CertInfo, now: i64) -> bool {
        if self
            .not_before
            .is_some_and(|t| tokio::time::Instant::now() < t)
        {
            return false;
        }
        if self.only_when_asked {
            return self.server_asked;
        }
        info.renewal_due(now, self.server_asked)
    }

    fn renewed(&mut self) {
        self.server_asked = false;
        self.only_when_asked = false;
        self.not_before = None;
        self.backoff.reset();
    }
}

pub(crate) async fn heartbeat_loop(shared: Arc<Shared>) {
    let mut backoff = shared.backoff();
    let mut renewal = Renewal {
        server_asked: false,
        only_when_asked: false,
        not_before: None,
        backoff: shared.backoff(),
    };
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
        let mut expired = false;
        let mut delay = match shared
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
                renewal.server_asked |= resp.renew_certificate;
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
                expired = e.code() == Some(ErrorCode::CertificateExpired);
                let delay = backoff.next_delay();
                tracing::warn!(attempt = backoff.attempt(), retry_in_ms = delay.as_millis() as u64,
                    error = %crate::error_chain(&e), "heartbeat failed");
                delay
            }
        };

        if expired {
            match reissue_certificate(&shared).await {
                Ok(true) => {
                    // Heartbeat again at once, on the new certificate.
                    backoff.reset();
                    renewal.renewed();
                    delay = std::time::Duration::ZERO;
                }
                Ok(false) => tracing::warn!(
                    "the server refused the certificate as expired, then called it unexpired"
                ),
                Err(e) if stop_if_terminal(&shared, &e).await => return,
                Err(e) => tracing::warn!(error = %crate::error_chain(&e),
                    "reissue of the expired certificate failed; retrying"),
            }
        } else if renewal.due(&lock(&shared.cert), shared.server_now_earliest()) {
            match renew_certificate(&shared).await {
                Ok(()) => renewal.renewed(),
                Err(e) if stop_if_terminal(&shared, &e).await => return,
                Err(e) => match e.code() {
                    Some(ErrorCode::RenewalNotDue) => {
                        tracing::info!(error = %crate::error_chain(&e),
                            "renewal not due by the server's clock; renewing when it asks");
                        renewal.only_when_asked = true;
                        renewal.server_asked = false;
                    }
                    Some(ErrorCode::RenewalRateLimited) => {
                        let wait = renewal.backoff.next_delay();
                        tracing::warn!(
                            retry_in_ms = wait.as_millis() as u64,
                            "renewal rate-limited by the server; backing off"
                        );
                        renewal.not_before = Some(tokio::time::Instant::now() + wait);
                    }
                    _ => tracing::warn!(error = %crate::error_chain(&e),
                        "certificate renewal failed; retrying at the next heartbeat"),
                },
            }
        }

        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.wake_heartbeat.notified() => {}
        }
    }
}

/// Stops the agent when `err` is the server refusing the node for good.
async fn stop_if_terminal(shared: &Shared, err: &RenewError) -> bool {
    match err {
        RenewError::Client(e) | RenewError::Reissue(ReissueError::Client(e)) => {
            shared.stop_if_terminal(e).await
        }
        _ => false,
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
    #[error("re-enrolling the expired certificate")]
    Reissue(#[from] ReissueError),
    #[error("the node's key and certificate are gone from its state directory")]
    NoCredentials,
}

impl RenewError {
    fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Client(e) | Self::Reissue(ReissueError::Client(e)) => e.code(),
            _ => None,
        }
    }
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
    let mut creds = Credentials::new(key, resp.certificate_pem, ca_pem, shared.instance_id())?;
    creds.info.received_at = shared.server_now();
    install(shared, &creds)?;
    tracing::info!(serial = %creds.info.serial, not_after = creds.info.not_after, "certificate renewed");
    Ok(())
}

/// Re-enrolls the expired certificate with the key on disk. `Ok(false)`: the
/// server says it has not expired after all.
async fn reissue_certificate(shared: &Shared) -> Result<bool, RenewError> {
    let creds = shared
        .state
        .load_credentials(shared.instance_id())?
        .ok_or(RenewError::NoCredentials)?;
    match crate::reissue::reissue(&shared.client(), &creds, shared.instance_id()).await? {
        Some(new) => {
            install(shared, &new)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Stores `creds`, then swaps the client (keeping the server-clock estimate) so
/// the next call presents them.
fn install(shared: &Shared, creds: &Credentials) -> Result<(), RenewError> {
    let client = ApiClient::new(
        &shared.identity.control_plane_url,
        &creds.ca_pem,
        Some(creds),
        shared.opts.timeouts,
    )?
    .with_server_clock(shared.client().server_clock().clone());
    shared.state.save_credentials(creds)?;
    *shared.client.write().unwrap_or_else(|p| p.into_inner()) = client;
    *lock(&shared.ca_pem) = creds.ca_pem.clone();
    *lock(&shared.cert) = creds.info.clone();
    Ok(())
}
