//! Node API: boot reports. A node that fails before it has credentials (the
//! network, enrollment refused, a broken identity document) posts the phase, code,
//! message and its last console lines with its bootstrap token. The report is kept
//! on the instance (the last few), raises a `bootstrap.reported` signal with the
//! recovery step for its code, and never spends the token: enrollment afterwards
//! works as before.
//!
//! Who may report: a known token whose instance is not terminated and that was not
//! revoked. A used token may report (a node refused for `bootstrap_token_used` must
//! be able to say so); an unknown token is `401 bootstrap_token_invalid` and nothing
//! is stored. At most [`RATE_LIMIT`] reports per token per [`RATE_WINDOW_SECONDS`];
//! more are `429 rate_limited`, not stored.

use std::collections::HashMap;

use axum::http::StatusCode;
use powernode_proto::boot_report::{
    BootReport, BootReportRequest, BootReportResponse, KEPT_PER_INSTANCE, RATE_LIMIT,
    RATE_WINDOW_SECONDS,
};
use powernode_proto::{ErrorCode, InstanceStatus};
use serde_json::json;

use super::{token_hash, AppState};
use crate::clock::{format_ts, Millis};
use crate::error::{AppError, AppResult};
use crate::model::{Mem, Op, TokenRec};

const WINDOW_MS: Millis = (RATE_WINDOW_SECONDS as Millis) * 1000;
/// Console lines copied into the signal (the whole console is on the instance).
const SIGNAL_CONSOLE_LINES: usize = 5;

/// Reports accepted per token hash: (start of the window, count in it).
pub(super) type Windows = HashMap<String, (Millis, u32)>;

impl AppState {
    pub async fn boot_report(&self, req: BootReportRequest) -> AppResult<BootReportResponse> {
        let hash = token_hash(&req.bootstrap_token);
        // A node over its limit is answered without the write lock.
        {
            let mem = self.lock();
            let tok = reporting_token(&mem, &hash, &req.instance_id)?;
            self.check_window(&tok.hash, self.clock.now_ms(), false)?;
        }
        let (req, truncated) = req.bounded();
        self.mutate(|mem, now| {
            let tok = reporting_token(mem, &hash, &req.instance_id)?;
            self.check_window(&tok.hash, now, true)?;
            let recovery = recovery_for(req.code, &tok.instance_id, &tok.node_id);
            let report = BootReport {
                at: format_ts(now),
                phase: req.phase,
                code: req.code,
                message: req.message,
                attempt: req.attempt,
                console: req.console,
                recovery: recovery.clone(),
                agent_version: req.agent_version,
                truncated,
            };
            let tail = report.console.len().saturating_sub(SIGNAL_CONSOLE_LINES);
            let detail = json!({
                "phase": report.phase,
                "code": report.code,
                "message": report.message,
                "attempt": report.attempt,
                "recovery": recovery,
                "console_tail": report.console.get(tail..).unwrap_or_default(),
                "token_used": tok.used_ms.is_some(),
            });
            let id = tok.instance_id.as_str();
            let prev = mem.instances.get(id).and_then(|i| i.boot_report_signal);
            if let Some((prev, _)) = prev {
                mem.ops.push(Op::SignalActive {
                    id: prev,
                    active: false,
                });
            }
            let sig = mem.signal(now, "bootstrap.reported", id, true, detail);
            if let Some(inst) = mem.instances.get_mut(id) {
                inst.boot_reports.push(report);
                let extra = inst.boot_reports.len().saturating_sub(KEPT_PER_INSTANCE);
                inst.boot_reports.drain(..extra);
                inst.boot_report_signal = Some((sig, now));
            }
            mem.save_instance(id);
            Ok(BootReportResponse {
                recorded: true,
                recovery,
            })
        })
        .await
    }

    /// Part of the sensor pass: a `bootstrap.reported` signal stays active until the
    /// node enrolled after its report, or the instance is no longer live.
    pub(super) fn clear_settled_boot_reports(&self, mem: &mut Mem) {
        let settled: Vec<(String, i64)> = mem
            .instances
            .values()
            .filter_map(|i| {
                let (sig, at) = i.boot_report_signal?;
                (i.enrolled_ms.is_some_and(|e| e >= at) || !i.status.is_live())
                    .then(|| (i.id.clone(), sig))
            })
            .collect();
        for (id, sig) in settled {
            mem.ops.push(Op::SignalActive {
                id: sig,
                active: false,
            });
            if let Some(inst) = mem.instances.get_mut(&id) {
                inst.boot_report_signal = None;
            }
            mem.save_instance(&id);
        }
    }

    /// `429 rate_limited` when the token has used up its window; `count` records
    /// this report in it.
    fn check_window(&self, hash: &str, now: Millis, count: bool) -> AppResult<()> {
        let mut windows = self
            .boot_report_windows
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if count {
            windows.retain(|_, (start, _)| now - *start < WINDOW_MS);
        }
        let slot = windows
            .get(hash)
            .copied()
            .filter(|(s, _)| now - s < WINDOW_MS);
        let (start, n) = slot.unwrap_or((now, 0));
        if n >= RATE_LIMIT {
            let wait = (start + WINDOW_MS - now).max(0) / 1000 + 1;
            return Err(AppError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                format!(
                    "at most {RATE_LIMIT} boot reports per {RATE_WINDOW_SECONDS} s per token; \
                     try again in {wait} s"
                ),
            ));
        }
        if count {
            windows.insert(hash.to_string(), (start, n + 1));
        }
        Ok(())
    }
}

/// The token a report authenticates with, if it may report for `instance_id`.
fn reporting_token(mem: &Mem, hash: &str, instance_id: &str) -> AppResult<TokenRec> {
    let tok = mem.tokens.get(hash).cloned().ok_or_else(|| {
        AppError::unauthorized(ErrorCode::BootstrapTokenInvalid, "unknown bootstrap token")
    })?;
    if instance_id != tok.instance_id {
        return Err(AppError::forbidden(
            ErrorCode::CsrInstanceMismatch,
            "the report names another instance than the bootstrap token",
        ));
    }
    match mem.instances.get(&tok.instance_id) {
        None => Err(AppError::unauthorized(
            ErrorCode::BootstrapTokenInvalid,
            "token's instance is gone",
        )),
        Some(i) if i.status == InstanceStatus::Terminated => Err(AppError::forbidden(
            ErrorCode::InstanceTerminated,
            "the instance was terminated",
        )),
        Some(_) if tok.revoked => Err(AppError::unauthorized(
            ErrorCode::BootstrapTokenExpired,
            "bootstrap token has expired (its instance was cancelled or failed)",
        )),
        Some(_) => Ok(tok),
    }
}

/// What the operator should do about a failure the node reported before it had
/// credentials.
pub fn recovery_for(code: ErrorCode, instance_id: &str, node_id: &str) -> String {
    let fresh_token = format!(
        "terminate-instance {instance_id} --force, then provision-instance {node_id} \
         for a new instance with a new bootstrap token"
    );
    match code {
        ErrorCode::BootstrapTokenUsed => format!(
            "the bootstrap token was already spent (another boot enrolled with it, or the \
             node lost its credentials): {fresh_token}"
        ),
        ErrorCode::BootstrapTokenExpired | ErrorCode::BootstrapTokenInvalid => format!(
            "the bootstrap token is no longer valid: {fresh_token}, and boot the VM within \
             the token's lifetime"
        ),
        ErrorCode::Network | ErrorCode::RegistryUnreachable => format!(
            "the node could not reach the control plane: check that the control-plane URL \
             in its identity document (instance-identity {instance_id}) is reachable from \
             the node's network (route, firewall, DNS, the server's --public-url and \
             certificate names)"
        ),
        ErrorCode::CsrInvalid | ErrorCode::CsrInstanceMismatch => format!(
            "the control plane refused the node's certificate request: check that the \
             node's agent version matches this server and that its identity document \
             names this instance (instance-identity {instance_id})"
        ),
        ErrorCode::IdentityInvalid | ErrorCode::IdentityMissing => format!(
            "fix the identity document the node was given (the field is named in the \
             message; compare with instance-identity {instance_id}), then {fresh_token}"
        ),
        ErrorCode::InstanceTerminated => {
            format!("the instance was terminated: provision-instance {node_id} again")
        }
        ErrorCode::SignatureMissing
        | ErrorCode::SignatureMismatch
        | ErrorCode::DigestMismatch
        | ErrorCode::VerityMismatch
        | ErrorCode::OciNotFound
        | ErrorCode::UnsupportedMediaType
        | ErrorCode::UnsafePath
        | ErrorCode::LayerTooLarge => format!(
            "a module failed its supply-chain check: list-module-publications and \
             module-signing-key show what is published and trusted; publish a good version, \
             then {fresh_token}"
        ),
        ErrorCode::VersionRollback => format!(
            "the node already ran a newer version of that module and keeps it as its floor: \
             publish a version above it (list-module-publications), then {fresh_token}"
        ),
        _ => format!(
            "read the message and the console lines in get-instance {instance_id}; when the \
             node cannot recover on its own, {fresh_token}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recovery_names_a_next_step() {
        for (code, want) in [
            (ErrorCode::BootstrapTokenUsed, "provision-instance node-1"),
            (ErrorCode::Network, "control-plane URL"),
            (ErrorCode::CsrInvalid, "certificate request"),
            (ErrorCode::IdentityInvalid, "fix the identity document"),
            (ErrorCode::SignatureMismatch, "list-module-publications"),
            (ErrorCode::Internal, "get-instance inst-1"),
        ] {
            let r = recovery_for(code, "inst-1", "node-1");
            assert!(r.contains(want), "{code}: {r}");
        }
    }
}
