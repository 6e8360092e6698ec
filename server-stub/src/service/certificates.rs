//! Node API: the certificate after enrollment. Renewal over mTLS (only when due,
//! rate-limited per instance) and the reissue of an expired certificate for the
//! same key, so a node that outlived its certificate (a control-plane outage, a
//! long power-off) comes back without a new bootstrap token, unless the server
//! refuses it (revoked, terminated, expired longer ago than the grace period).
use axum::http::StatusCode;
use powernode_proto::node::{EnrollmentResponse, ReissueRequest, RenewRequest};
use powernode_proto::{paths, ErrorCode, InstanceStatus};
use serde_json::json;

use super::{authorize, csr_error, AppState};
use crate::ca::ClientIdentity;
use crate::clock::{format_ts, Millis};
use crate::error::{AppError, AppResult};
use crate::model::Mem;

/// At most this many certificates per instance within one certificate lifetime
/// (renewals, reissues, the enrollment itself). A node renews once per two thirds
/// of a lifetime; the slack covers answers lost on the way back.
pub(crate) const CERTS_PER_LIFETIME: usize = 4;

/// Refuses a new certificate for `instance_id` when it got
/// [`CERTS_PER_LIFETIME`] within the last `ttl_ms`.
fn rate_limit(mem: &Mem, instance_id: &str, now: Millis, ttl_ms: Millis) -> AppResult<()> {
    let recent = mem
        .certs
        .values()
        .filter(|c| c.instance_id == instance_id && c.issued_ms > now - ttl_ms)
        .count();
    if recent >= CERTS_PER_LIFETIME {
        return Err(AppError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RenewalRateLimited,
            format!(
                "{recent} certificates were issued to this instance within one certificate \
                 lifetime; renew later"
            ),
        ));
    }
    Ok(())
}

impl AppState {
    fn ttl_ms(&self) -> Millis {
        (self.cfg.cert_ttl_seconds as i64)
            .saturating_mul(1000)
            .max(1000)
    }

    fn certificate_answer(
        &self,
        issued: crate::ca::IssuedCert,
        node_id: String,
        instance_id: &str,
    ) -> EnrollmentResponse {
        EnrollmentResponse {
            certificate_pem: issued.pem,
            ca_pem: self.ca.cert_pem().to_string(),
            not_after: format_ts(issued.not_after_ms),
            serial: issued.serial,
            node_id,
            instance_id: instance_id.to_string(),
            heartbeat_interval_seconds: self.cfg.heartbeat_interval_seconds,
        }
    }

    /// A new certificate (the node's fresh key) for a certificate that reached its
    /// renewal point: exactly when heartbeat answers ask for renewal
    /// ([`ClientIdentity::renewal_due`]), so an earlier request is `renewal_not_due`.
    pub async fn renew_certificate(
        &self,
        ident: &ClientIdentity,
        req: RenewRequest,
    ) -> AppResult<EnrollmentResponse> {
        self.mutate(|mem, now| {
            authorize(mem, ident, Some(&req.instance_id))?;
            if !ident.renewal_due(now) {
                return Err(AppError::conflict(
                    ErrorCode::RenewalNotDue,
                    format!(
                        "this certificate is not due for renewal before a third of its life is \
                         left (it expires at {}); renew when a heartbeat answer asks",
                        format_ts(ident.not_after_ms)
                    ),
                ));
            }
            rate_limit(mem, &ident.instance_id, now, self.ttl_ms())?;
            let node_id = mem.instances[&ident.instance_id].node_id.clone();
            let issued = self
                .ca
                .issue_node_cert(
                    &req.csr_pem,
                    &ident.instance_id,
                    now,
                    self.cfg.cert_ttl_seconds,
                )
                .map_err(csr_error)?;
            mem.add_cert(now, &ident.instance_id, &issued.serial, issued.not_after_ms);
            mem.event(
                now,
                "certificate.renewed",
                Some(&node_id),
                Some(&ident.instance_id),
                json!({"old_serial": ident.serial, "serial": issued.serial}),
            );
            Ok(self.certificate_answer(issued, node_id, &ident.instance_id))
        })
        .await
    }

    /// Re-enrolls an expired certificate: it must be one this CA signed (dates
    /// aside) and this server recorded, not revoked, of a live instance, expired no
    /// longer ago than `--reissue-grace-seconds`; the CSR must carry its key. The
    /// new certificate is for that same key.
    pub async fn reissue_certificate(&self, req: ReissueRequest) -> AppResult<EnrollmentResponse> {
        let now = self.clock.now_ms();
        let ident = self
            .ca
            .verify_client_pem(&req.certificate_pem, now)
            .map_err(|e| {
                AppError::unauthorized(
                    ErrorCode::ClientCertificateInvalid,
                    format!("this certificate was not issued by this control plane: {e}"),
                )
            })?;
        let res = self.reissue_checked(&ident, &req).await;
        self.note_node_error(&ident, paths::CERTIFICATE_REISSUE, res)
            .await
    }

    async fn reissue_checked(
        &self,
        ident: &ClientIdentity,
        req: &ReissueRequest,
    ) -> AppResult<EnrollmentResponse> {
        let grace_ms = (self.cfg.reissue_grace_seconds as i64).saturating_mul(1000);
        self.mutate(|mem, now| {
            authorize(mem, ident, Some(&req.instance_id))?;
            let inst = &mem.instances[&ident.instance_id];
            if !inst.status.is_live() || inst.status == InstanceStatus::Terminating {
                return Err(AppError::forbidden(
                    ErrorCode::InstanceTerminated,
                    format!("the instance is {}; its node cannot come back", inst.status),
                ));
            }
            if now < ident.not_after_ms {
                return Err(AppError::conflict(
                    ErrorCode::RenewalNotDue,
                    format!(
                        "this certificate has not expired (it does at {}): keep using it",
                        format_ts(ident.not_after_ms)
                    ),
                ));
            }
            if now - ident.not_after_ms > grace_ms {
                return Err(AppError::unauthorized(
                    ErrorCode::CertificateGraceExceeded,
                    format!(
                        "this certificate expired at {}, more than {} s ago; the node needs a \
                         new bootstrap token",
                        format_ts(ident.not_after_ms),
                        self.cfg.reissue_grace_seconds
                    ),
                ));
            }
            rate_limit(mem, &ident.instance_id, now, self.ttl_ms())?;
            let node_id = inst.node_id.clone();
            let issued = self
                .ca
                .reissue_node_cert(
                    &req.csr_pem,
                    &ident.instance_id,
                    &ident.public_key,
                    now,
                    self.cfg.cert_ttl_seconds,
                )
                .map_err(csr_error)?;
            mem.add_cert(now, &ident.instance_id, &issued.serial, issued.not_after_ms);
            mem.event(
                now,
                "certificate.reissued_after_expiry",
                Some(&node_id),
                Some(&ident.instance_id),
                json!({
                    "old_serial": ident.serial,
                    "serial": issued.serial,
                    "expired_at": format_ts(ident.not_after_ms),
                    "expired_for_seconds": (now - ident.not_after_ms) / 1000,
                }),
            );
            Ok(self.certificate_answer(issued, node_id, &ident.instance_id))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::tests::ed25519_csr;
    use crate::clock::Clock;
    use crate::config::Config;
    use crate::provider::Recorder;
    use crate::store::Store;
    use powernode_proto::admin::{CreateNodeRequest, ProvisionRequest};
    use powernode_proto::node::EnrollmentRequest;

    /// A terminated (or failed) instance whose certificates were somehow not
    /// revoked (a crash between the two writes) is still refused, for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_instance_is_refused_even_with_an_unrevoked_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::default();
        let mut cfg = Config::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
        cfg.cert_ttl_seconds = 60;
        let st = AppState::with_provider(
            cfg,
            "https://127.0.0.1:1".into(),
            clock.clone(),
            crate::ca::Ca::load_or_create(dir.path()).unwrap(),
            Store::open(dir.path()).unwrap(),
            "admin",
            Box::new(Recorder { image_base: None }),
        )
        .unwrap();
        let node = st
            .create_node(CreateNodeRequest {
                hostname: "dead".into(),
                template_id: crate::catalog::TEMPLATE_EDGE_BASE.into(),
                lifecycle_class: powernode_proto::LifecycleClass::Ephemeral,
                labels: Default::default(),
            })
            .await
            .unwrap();
        let p = st
            .provision(&node.id, ProvisionRequest::default())
            .await
            .unwrap();
        let inst = p.instance.id.clone();
        let doc = st.instance_identity(&inst).await.unwrap();
        let (key, csr) = ed25519_csr(&inst);
        let enrolled = st
            .enroll(EnrollmentRequest {
                bootstrap_token: doc["bootstrap_token"].as_str().unwrap().into(),
                node_id: node.id.clone(),
                instance_id: inst.clone(),
                csr_pem: csr.clone(),
                identity_source: "file".into(),
                agent_version: "t".into(),
                provider: None,
            })
            .await
            .unwrap();
        clock.advance_secs(90);
        let req = ReissueRequest {
            instance_id: inst.clone(),
            certificate_pem: enrolled.certificate_pem.clone(),
            csr_pem: csr,
        };
        for status in [
            InstanceStatus::Terminating,
            InstanceStatus::Terminated,
            InstanceStatus::Failed,
        ] {
            st.lock().instances.get_mut(&inst).unwrap().status = status;
            let err = st.reissue_certificate(req.clone()).await.unwrap_err();
            assert_eq!(err.code, ErrorCode::InstanceTerminated, "{status}: {err}");
            assert!(err.code.is_terminal_for_node());
        }
        // Back to running (only to show the same request is otherwise fine).
        st.lock().instances.get_mut(&inst).unwrap().status = InstanceStatus::Running;
        let again = st.reissue_certificate(req).await.unwrap();
        let der = crate::ca::pem_certs(&again.certificate_pem).remove(0);
        let leaf = crate::ca::parse_client_leaf(&der).unwrap();
        assert_eq!(leaf.public_key, key.public_key_raw());
    }
}
