//! Node API: enrollment with a bootstrap token.
use powernode_proto::node::{EnrollmentRequest, EnrollmentResponse, Phase};
use powernode_proto::{ErrorCode, InstanceStatus};
use serde_json::json;

use super::bookkeeping::finish_reboot_tasks;
use super::{csr_error, invalid_transition, token_hash, AppState, REFUSAL_SIGNAL_EVERY_MS};
use crate::clock::format_ts;
use crate::error::{AppError, AppResult};
use crate::model::{Mem, Op};

impl AppState {
    pub async fn enroll(&self, req: EnrollmentRequest) -> AppResult<EnrollmentResponse> {
        let ttl_ms = (self.cfg.token_ttl_seconds as i64).saturating_mul(1000);
        self.mutate(|mem, now| {
            let hash = token_hash(&req.bootstrap_token);
            let tok = mem.tokens.get(&hash).cloned().ok_or_else(|| {
                AppError::unauthorized(ErrorCode::BootstrapTokenInvalid, "unknown bootstrap token")
            })?;
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
                let t = t.clone();
                mem.ops.push(Op::Token(t));
            }
            mem.add_cert(now, &tok.instance_id, &issued.serial, issued.not_after_ms);
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
            Ok(EnrollmentResponse {
                certificate_pem: issued.pem,
                ca_pem: self.ca.cert_pem().to_string(),
                not_after: format_ts(issued.not_after_ms),
                serial: issued.serial,
                node_id: tok.node_id,
                instance_id: tok.instance_id,
                heartbeat_interval_seconds: self.cfg.heartbeat_interval_seconds,
            })
        })
        .await
    }
}
