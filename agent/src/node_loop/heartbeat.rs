//! The heartbeat loop (status, modules, services, systemd's state; the answer sets
//! the interval, wakes the lease loop and may ask for renewal) and the certificate
//! renewal it drives: a fresh key, a CSR, the new certificate stored, then the
//! client swapped.

use std::sync::Arc;

use powernode_proto::node::{HeartbeatRequest, HeartbeatResponse, RenewRequest};
use powernode_proto::{paths, ErrorCode, InstanceStatus};

use super::options::{AgentOptions, Exit};
use super::shared::{lock, Shared};
use crate::backoff::jittered;
use crate::client::{ApiClient, ClientError};
use crate::credentials::{unix_now, CredentialError, Credentials, NodeKey};
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

pub(crate) async fn heartbeat_loop(shared: Arc<Shared>) {
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
