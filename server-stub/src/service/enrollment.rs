//! Node API: enrollment with a bootstrap token (renewal and reissue are in
//! `certificates`).
//!
//! Enrollment is idempotent for the node that asked: a retry with the same token and
//! the same key (its answer was lost: a reset, a timeout, a failed save on the node)
//! within [the window](repeated_enrollment) gets the certificate it was issued, with
//! no new certificate and no second `instance.enrolled`. Another key with a used token
//! is `bootstrap_token_used`.
use powernode_proto::node::{EnrollmentRequest, EnrollmentResponse, Phase};
use powernode_proto::{ErrorCode, InstanceStatus};
use serde_json::json;

use super::bookkeeping::finish_reboot_tasks;
use super::{csr_error, invalid_transition, token_hash, AppState, REFUSAL_SIGNAL_EVERY_MS};
use crate::ca::csr_key_sha256;
use crate::clock::{format_ts, Millis};
use crate::error::{AppError, AppResult};
use crate::model::{CertRec, Mem, Op, TokenRec};

/// What one enrollment request came to.
enum Enrolled {
    /// A certificate issued now.
    Issued(EnrollmentResponse),
    /// The same token and key asked again: the certificate issued then.
    Again(Repeat),
}

/// The certificate an earlier answer to the same enrollment carried.
struct Repeat {
    serial: String,
    not_after_ms: Millis,
    node_id: String,
    instance_id: String,
}

impl AppState {
    pub async fn enroll(&self, req: EnrollmentRequest) -> AppResult<EnrollmentResponse> {
        match self.enroll_or_repeat(req).await? {
            Enrolled::Issued(resp) => Ok(resp),
            Enrolled::Again(again) => self.answer_again(again).await,
        }
    }

    /// The answer to a repeated enrollment, with the PEM SQLite kept (the record was
    /// committed before the first answer left).
    async fn answer_again(&self, again: Repeat) -> AppResult<EnrollmentResponse> {
        let pem = self
            .store
            .cert_pem(again.serial.clone())
            .await
            .map_err(|e| AppError::storage(&e))?
            .ok_or_else(|| {
                AppError::internal(&format!(
                    "certificate {} has no stored PEM to answer a repeated enrollment",
                    again.serial
                ))
            })?;
        tracing::info!(instance_id = %again.instance_id, serial = %again.serial,
            "the same token and key enrolled again: answered with the certificate issued before");
        Ok(EnrollmentResponse {
            certificate_pem: pem,
            ca_pem: self.ca.cert_pem().to_string(),
            not_after: format_ts(again.not_after_ms),
            serial: again.serial,
            node_id: again.node_id,
            instance_id: again.instance_id,
            heartbeat_interval_seconds: self.cfg.heartbeat_interval_seconds,
        })
    }

    /// Checks the token; a repeat of an earlier enrollment comes back as
    /// [`Enrolled::Again`] with nothing changed, a first one (or the one after a
    /// reboot task) issues and records the certificate.
    async fn enroll_or_repeat(&self, req: EnrollmentRequest) -> AppResult<Enrolled> {
        let ttl_ms = (self.cfg.token_ttl_seconds as i64).saturating_mul(1000);
        self.mutate(|mem, now| {
            let hash = token_hash(&req.bootstrap_token);
            let tok = mem.tokens.get(&hash).cloned().ok_or_else(|| {
                AppError::unauthorized(ErrorCode::BootstrapTokenInvalid, "unknown bootstrap token")
            })?;
            if let Some(again) = repeated_enrollment(mem, now, ttl_ms, &tok, &req) {
                return Ok(Enrolled::Again(again));
            }
            // A decommissioned node trying again is refused, and the refusal is
            // recorded where the operator looks (signals), not only in its log.
            let refuse = |mem: &mut Mem, code: ErrorCode, message: &str| {
                let withdrawn = mem.instances.get_mut(&tok.instance_id).filter(|i| {
                    !i.status.is_live()
                        && i
                            .last_refused_ms
                            .is_none_or(|t| now - t >= REFUSAL_SIGNAL_EVERY_MS)
                });
                if let Some(inst) = withdrawn {
                    inst.last_refused_ms = Some(now);
                    mem.save_instance(&tok.instance_id);
                    mem.signal(
                        now,
                        "instance.refused",
                        &tok.instance_id,
                        false,
                        json!({
                            "code": code, "path": powernode_proto::paths::ENROLLMENT,
                            "reason": "a node enrolled with the bootstrap token of an instance that is no longer live",
                        }),
                    );
                }
                AppError::unauthorized(code, message)
            };
            // One more enrollment after a reboot task (ephemeral nodes come back with
            // nothing but their identity document).
            let reenroll = tok.used_ms.is_some()
                && !tok.revoked
                && tok.reenroll_until_ms.is_some_and(|u| now <= u)
                && mem
                    .instances
                    .get(&tok.instance_id)
                    .is_some_and(|i| matches!(i.status, InstanceStatus::Running | InstanceStatus::Bootstrapping));
            if tok.used_ms.is_some() && !reenroll {
                return Err(refuse(
                    mem,
                    ErrorCode::BootstrapTokenUsed,
                    "bootstrap token was already used",
                ));
            }
            if tok.revoked {
                return Err(refuse(
                    mem,
                    ErrorCode::BootstrapTokenExpired,
                    "bootstrap token has expired (its instance was terminated or cancelled)",
                ));
            }
            if now - tok.created_ms > ttl_ms && !reenroll {
                return Err(AppError::unauthorized(
                    ErrorCode::BootstrapTokenExpired,
                    "bootstrap token has expired",
                ));
            }
            if req.instance_id != tok.instance_id || req.node_id != tok.node_id {
                return Err(AppError::forbidden(
                    ErrorCode::CsrInstanceMismatch,
                    "the request names another instance than the bootstrap token",
                ));
            }
            let inst = mem.instances.get(&tok.instance_id).ok_or_else(|| {
                AppError::unauthorized(ErrorCode::BootstrapTokenInvalid, "token's instance is gone")
            })?;
            if !reenroll && !inst.status.can_transition_to(InstanceStatus::Bootstrapping) {
                return Err(invalid_transition(format!(
                    "instance is {}, not provisioning",
                    inst.status
                )));
            }
            let issued = self
                .ca
                .issue_node_cert(
                    &req.csr_pem,
                    &tok.instance_id,
                    now,
                    self.cfg.cert_ttl_seconds,
                )
                .map_err(csr_error)?;
            if reenroll {
                // The old key is gone with the reboot: its certificates go too.
                let old: Vec<String> = mem
                    .certs
                    .values()
                    .filter(|c| c.instance_id == tok.instance_id && !c.revoked)
                    .map(|c| c.serial.clone())
                    .collect();
                for serial in &old {
                    if let Some(c) = mem.certs.get_mut(serial) {
                        c.revoked = true;
                        mem.ops.push(Op::Cert(c.clone()));
                    }
                }
                mem.event(
                    now,
                    "instance.re_enrolled",
                    Some(&tok.node_id),
                    Some(&tok.instance_id),
                    json!({"reason": "reboot", "revoked_certificates": old}),
                );
                finish_reboot_tasks(mem, now, &tok.instance_id, "re_enrolled");
            }
            if let Some(t) = mem.tokens.get_mut(&hash) {
                t.used_ms = Some(now);
                t.reenroll_until_ms = None;
                t.serial = Some(issued.serial.clone());
                let t = t.clone();
                mem.ops.push(Op::Token(t));
            }
            mem.add_enrollment_cert(
                CertRec {
                    serial: issued.serial.clone(),
                    instance_id: tok.instance_id.clone(),
                    issued_ms: now,
                    not_after_ms: issued.not_after_ms,
                    revoked: false,
                    key_sha256: Some(issued.key_sha256.clone()),
                },
                issued.pem.clone(),
            );
            if let Some(inst) = mem.instances.get_mut(&tok.instance_id) {
                inst.enrolled_ms = Some(now);
                inst.last_heartbeat_ms = Some(now);
                inst.identity_source = Some(req.identity_source.clone());
                inst.agent_version = Some(req.agent_version.clone());
                inst.provider_facts = req.provider.clone();
                inst.phase = Some(Phase::Enrolled);
            }
            mem.event(
                now,
                "instance.enrolled",
                Some(&tok.node_id),
                Some(&tok.instance_id),
                json!({
                    "identity_source": req.identity_source,
                    "agent_version": req.agent_version,
                    "provider": req.provider,
                    "serial": issued.serial,
                }),
            );
            if !reenroll {
                mem.set_status(now, &tok.instance_id, InstanceStatus::Bootstrapping);
            }
            Ok(Enrolled::Issued(EnrollmentResponse {
                certificate_pem: issued.pem,
                ca_pem: self.ca.cert_pem().to_string(),
                not_after: format_ts(issued.not_after_ms),
                serial: issued.serial,
                node_id: tok.node_id,
                instance_id: tok.instance_id,
                heartbeat_interval_seconds: self.cfg.heartbeat_interval_seconds,
            }))
        })
        .await
    }
}

/// The earlier enrollment this request repeats, if it does: the token was used within
/// the window (its TTL, counted from that use: a node retrying through an outage
/// shorter than that still gets its answer) and not revoked since, and the request
/// names the same node and instance and carries a valid CSR for the same key as the
/// certificate that use issued, which is neither revoked nor expired, for an instance
/// that is `bootstrapping` or `running`. Changes nothing.
fn repeated_enrollment(
    mem: &Mem,
    now: Millis,
    window_ms: Millis,
    tok: &TokenRec,
    req: &EnrollmentRequest,
) -> Option<Repeat> {
    let used = tok.used_ms?;
    if tok.revoked
        || now - used > window_ms
        || req.instance_id != tok.instance_id
        || req.node_id != tok.node_id
    {
        return None;
    }
    let cert = mem.certs.get(tok.serial.as_deref()?)?;
    let key = cert.key_sha256.as_deref()?;
    if cert.revoked || cert.not_after_ms <= now || cert.instance_id != tok.instance_id {
        return None;
    }
    let live = mem.instances.get(&tok.instance_id).is_some_and(|i| {
        matches!(
            i.status,
            InstanceStatus::Bootstrapping | InstanceStatus::Running
        )
    });
    // The CSR is checked like a first one (self-signed: the node holds the key).
    let same_key = csr_key_sha256(&req.csr_pem, &tok.instance_id).is_ok_and(|k| k == key);
    (live && same_key).then(|| Repeat {
        serial: cert.serial.clone(),
        not_after_ms: cert.not_after_ms,
        node_id: tok.node_id.clone(),
        instance_id: tok.instance_id.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::tests::ed25519_csr;
    use crate::ca::Ca;
    use crate::clock::Clock;
    use crate::config::Config;
    use crate::provider::Recorder;
    use crate::store::{Store, DB_FILE};
    use axum::http::StatusCode;
    use powernode_proto::admin::{CreateNodeRequest, ProvisionRequest};

    fn state(dir: &std::path::Path) -> AppState {
        let cfg = Config::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
        AppState::with_provider(
            cfg,
            "https://127.0.0.1:1".into(),
            Clock::default(),
            Ca::load_or_create(dir).unwrap(),
            Store::open(dir).unwrap(),
            "admin",
            Box::new(Recorder { image_base: None }),
        )
        .unwrap()
    }

    /// A provisioned instance and the enrollment request its node would send.
    async fn provisioned(st: &AppState) -> (String, EnrollmentRequest) {
        let n = st
            .create_node(CreateNodeRequest {
                hostname: "e".into(),
                template_id: crate::catalog::TEMPLATE_EDGE_BASE.into(),
                lifecycle_class: powernode_proto::LifecycleClass::Ephemeral,
                labels: Default::default(),
            })
            .await
            .unwrap();
        let p = st
            .provision(&n.id, ProvisionRequest::default())
            .await
            .unwrap();
        let id = p.instance.id;
        let doc = st.instance_identity(&id).await.unwrap();
        let req = EnrollmentRequest {
            bootstrap_token: doc["bootstrap_token"].as_str().unwrap().into(),
            node_id: n.id,
            instance_id: id.clone(),
            csr_pem: ed25519_csr(&id).1,
            identity_source: "file".into(),
            agent_version: "test".into(),
            provider: None,
        };
        (id, req)
    }

    /// What memory says about the instance's enrollment: token, certificates,
    /// instance status and enrollment time.
    fn snapshot(st: &AppState, id: &str) -> String {
        let mem = st.lock();
        let tokens: Vec<_> = mem
            .tokens
            .values()
            .filter(|t| t.instance_id == id)
            .collect();
        let certs: Vec<_> = mem.certs.values().filter(|c| c.instance_id == id).collect();
        let i = &mem.instances[id];
        format!(
            "{tokens:?} {certs:?} {} {:?} {:?} {:?}",
            i.status, i.enrolled_ms, i.phase, i.task_ids
        )
    }

    async fn kinds(st: &AppState, id: &str) -> Vec<String> {
        st.recent_events(1000, Some(id.to_string()))
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    /// The commit of an enrollment fails for real (a trigger makes SQLite refuse the
    /// event row, after the token and certificate rows were written in the same
    /// transaction): the node gets 503 `storage_unavailable`, and memory is as it was,
    /// so the same request succeeds once the store recovers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_leaves_memory_unchanged_and_the_next_enrollment_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(dir.path());
        let (id, req) = provisioned(&st).await;
        let before = snapshot(&st, &id);
        let events_before = kinds(&st, &id).await;
        let db = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        db.execute_batch(
            "CREATE TRIGGER broken_disk BEFORE INSERT ON events
             BEGIN SELECT RAISE(ABORT, 'injected: disk I/O error'); END;",
        )
        .unwrap();

        let err = st.enroll(req.clone()).await.unwrap_err();
        assert_eq!(
            (err.status, err.code),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StorageUnavailable
            ),
            "{err}"
        );
        assert!(err.message.contains("storage failure"), "{}", err.message);
        assert_eq!(
            snapshot(&st, &id),
            before,
            "memory kept a change SQLite refused"
        );
        assert_eq!(kinds(&st, &id).await, events_before);
        assert!(st.lock().certs.values().all(|c| c.instance_id != id));
        let inst = st.get_instance(&id).unwrap();
        assert_eq!(inst.status, InstanceStatus::Provisioning);

        // The store recovers: the same request enrolls, once.
        db.execute_batch("DROP TRIGGER broken_disk").unwrap();
        let resp = st.enroll(req.clone()).await.unwrap();
        assert_eq!(
            st.get_instance(&id).unwrap().status,
            InstanceStatus::Bootstrapping
        );
        let again = st.enroll(req).await.unwrap();
        assert_eq!(
            (again.serial, again.certificate_pem),
            (resp.serial, resp.certificate_pem)
        );
        let enrolled = kinds(&st, &id)
            .await
            .iter()
            .filter(|k| *k == "instance.enrolled")
            .count();
        assert_eq!(enrolled, 1);
        // And a restart reads back what memory said.
        drop(st);
        let back = state(dir.path());
        assert_eq!(
            back.get_instance(&id).unwrap().status,
            InstanceStatus::Bootstrapping
        );
    }
}
