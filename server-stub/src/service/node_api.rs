//! Node API after enrollment (mTLS): handshake, heartbeat, desired modules, and the
//! worker API's task lease, renew and complete.
use powernode_proto::admin::MAX_TASK_RESULT_BYTES;
use powernode_proto::node::{
    CompleteTaskRequest, CompleteTaskResponse, DesiredModulesResponse, HandshakeRequest,
    HandshakeResponse, HeartbeatRequest, HeartbeatResponse, LeaseRequest, LeaseResponse,
    LeasedTask, Phase, RenewLeaseRequest, RenewLeaseResponse, MAX_LEASE_WAIT_SECONDS,
};
use powernode_proto::{ErrorCode, InstanceStatus, TaskKind, TaskStatus};
use serde_json::{json, Value};

use super::bookkeeping::{
    finish_reboot_tasks, finish_task, mark_running, open_reenroll_window, requeue_expired,
};
use super::{authorize, random_secret, AppState, REENROLL_WINDOW_MS};
use crate::ca::ClientIdentity;
use crate::clock::{format_ts, Millis};
use crate::error::{AppError, AppResult};
use crate::model::{Mem, Op, TaskRec};

/// Bytes of a too-large result kept as a preview.
const RESULT_PREVIEW_BYTES: usize = 4096;

/// Keeps results small enough for SQLite rows and admin answers: a result above
/// [`MAX_TASK_RESULT_BYTES`] is replaced by a marked preview.
fn bound_result(result: Value) -> Value {
    let text = result.to_string();
    if text.len() <= MAX_TASK_RESULT_BYTES {
        return result;
    }
    let mut cut = RESULT_PREVIEW_BYTES.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    json!({
        "truncated": true,
        "original_bytes": text.len(),
        "limit_bytes": MAX_TASK_RESULT_BYTES,
        "preview": &text[..cut],
    })
}

impl AppState {
    pub async fn handshake(
        &self,
        ident: &ClientIdentity,
        req: HandshakeRequest,
    ) -> AppResult<HandshakeResponse> {
        self.mutate(|mem, now| {
            authorize(mem, ident, Some(&req.instance_id))?;
            let id = ident.instance_id.as_str();
            let Some(inst) = mem.instances.get_mut(id) else {
                return Err(AppError::not_found("instance", id));
            };
            inst.phase = Some(req.phase);
            inst.last_heartbeat_ms = Some(now);
            inst.agent_version = Some(req.agent_version.clone());
            if !req.timeline.is_empty() {
                inst.boot_timeline = req.timeline.clone();
            }
            if req.root.is_some() {
                inst.root = req.root.clone();
            }
            let node_id = inst.node_id.clone();
            let status = inst.status;
            mem.event(
                now,
                "instance.handshake",
                Some(&node_id),
                Some(id),
                json!({"phase": req.phase, "agent_version": req.agent_version}),
            );
            if let Some(failure) = &req.failure {
                if let Some(inst) = mem.instances.get_mut(id) {
                    inst.failure = Some(failure.clone());
                }
                let prev = mem
                    .instances
                    .get(id)
                    .and_then(|i| i.bootstrap_failed_signal);
                if let Some(prev) = prev {
                    mem.ops.push(Op::SignalActive {
                        id: prev,
                        active: false,
                    });
                }
                let sig = mem.signal(
                    now,
                    "bootstrap.failed",
                    id,
                    true,
                    serde_json::to_value(failure).unwrap_or_default(),
                );
                if let Some(inst) = mem.instances.get_mut(id) {
                    inst.bootstrap_failed_signal = Some(sig);
                }
            }
            if req.phase == Phase::Ready && status == InstanceStatus::Bootstrapping {
                mark_running(mem, now, id);
            }
            // A handshake comes at boot: a leased reboot task has done its work.
            finish_reboot_tasks(mem, now, id, "came_back");
            mem.save_instance(id);
            Ok(HandshakeResponse {
                instance_status: mem.instances[id].status,
                heartbeat_interval_seconds: self.cfg.heartbeat_interval_seconds,
            })
        })
        .await
    }

    /// The hot path: memory only, unless the heartbeat changes the instance's state.
    pub async fn heartbeat(
        &self,
        ident: &ClientIdentity,
        req: HeartbeatRequest,
    ) -> AppResult<HeartbeatResponse> {
        let now = self.clock.now_ms();
        {
            let mut mem = self.lock();
            authorize(&mem, ident, Some(&req.instance_id))?;
            let id = ident.instance_id.as_str();
            let transition = req.phase == Phase::Ready
                && mem.instances[id].status == InstanceStatus::Bootstrapping;
            if !transition {
                apply_heartbeat(&mut mem, id, &req, now);
                mem.dirty.insert(id.to_string());
                return Ok(self.heartbeat_response(&mem, ident, now));
            }
        }
        self.mutate(|mem, now| {
            authorize(mem, ident, Some(&req.instance_id))?;
            let id = ident.instance_id.as_str();
            apply_heartbeat(mem, id, &req, now);
            if req.phase == Phase::Ready
                && mem.instances[id].status == InstanceStatus::Bootstrapping
            {
                mark_running(mem, now, id);
            }
            mem.save_instance(id);
            Ok(self.heartbeat_response(mem, ident, now))
        })
        .await
    }

    fn heartbeat_response(
        &self,
        mem: &Mem,
        ident: &ClientIdentity,
        now: Millis,
    ) -> HeartbeatResponse {
        let inst = &mem.instances[&ident.instance_id];
        HeartbeatResponse {
            instance_status: inst.status,
            heartbeat_interval_seconds: self.cfg.heartbeat_interval_seconds,
            tasks_pending: mem.has_pending_node_task(inst),
            renew_certificate: ident.renewal_due(now),
        }
    }

    pub fn desired_modules(&self, ident: &ClientIdentity) -> AppResult<DesiredModulesResponse> {
        let mem = self.lock();
        authorize(&mem, ident, None)?;
        let template = mem
            .instances
            .get(&ident.instance_id)
            .and_then(|i| mem.nodes.get(&i.node_id))
            .and_then(|n| self.template(&n.template_id));
        let host = self.public_host();
        Ok(DesiredModulesResponse {
            modules: template
                .map(|t| self.modules.desired(t, host))
                .unwrap_or_default(),
            trust_keys: self.modules.trust_keys(),
        })
    }

    /// Leases the next pending node-side task of the caller's instance. With
    /// `wait_seconds` and nothing to lease, holds the request (long poll) until a task
    /// is queued for it, the wait (capped) is over or the server stops.
    pub async fn lease(
        &self,
        ident: &ClientIdentity,
        req: LeaseRequest,
    ) -> AppResult<LeaseResponse> {
        let wait = req.wait_seconds.min(MAX_LEASE_WAIT_SECONDS);
        if wait == 0 {
            return self.lease_now(ident, &req).await;
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
        let waiter = self.task_waiter(&ident.instance_id);
        let mut stopping = self.stopping.subscribe();
        let answer = loop {
            // Registered before the check, so a task queued in between is not missed.
            let notified = waiter.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.lease_now(ident, &req).await {
                Ok(LeaseResponse { task: None }) => {}
                other => break other,
            }
            if *stopping.borrow_and_update() || tokio::time::Instant::now() >= deadline {
                break Ok(LeaseResponse { task: None });
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = stopping.changed() => {}
            }
        };
        self.drop_task_waiter(&ident.instance_id, waiter);
        answer
    }

    /// [`Self::lease`] without waiting.
    async fn lease_now(
        &self,
        ident: &ClientIdentity,
        req: &LeaseRequest,
    ) -> AppResult<LeaseResponse> {
        {
            // Fast answer when there is nothing to lease (agents poll this).
            let now = self.clock.now_ms();
            let mem = self.lock();
            authorize(&mem, ident, Some(&req.instance_id))?;
            let inst = &mem.instances[&ident.instance_id];
            let expired = inst.task_ids.iter().any(|t| {
                mem.tasks.get(t).is_some_and(|t| {
                    t.status == TaskStatus::Running
                        && t.kind.is_node_side()
                        && t.lease_expires_ms.is_some_and(|e| e < now)
                })
            });
            if !expired && !mem.has_pending_node_task(inst) {
                return Ok(LeaseResponse { task: None });
            }
        }
        let lease_max = self.cfg.lease_max_seconds.max(1);
        self.mutate(|mem, now| {
            authorize(mem, ident, Some(&req.instance_id))?;
            let id = ident.instance_id.clone();
            requeue_expired(mem, now, Some(&id));
            let next = mem.instances[&id]
                .task_ids
                .iter()
                .find(|t| {
                    mem.tasks
                        .get(*t)
                        .is_some_and(|t| t.kind.is_node_side() && t.status == TaskStatus::Pending)
                })
                .cloned();
            let Some(task_id) = next else {
                return Ok(LeaseResponse { task: None });
            };
            let secs = req.lease_seconds.clamp(1, lease_max);
            let token = random_secret();
            let expires = now + (secs as i64) * 1000;
            let Some(t) = mem.tasks.get_mut(&task_id) else {
                return Ok(LeaseResponse { task: None });
            };
            t.status = TaskStatus::Running;
            t.lease_token = Some(token.clone());
            t.lease_expires_ms = Some(expires);
            t.leased_ms = Some(now);
            t.attempts += 1;
            t.updated_ms = now;
            let kind = t.kind;
            let leased = LeasedTask {
                task_id: t.id.clone(),
                kind: t.kind,
                params: t.params.clone(),
                lease_expires_at: format_ts(expires),
                lease_token: token,
                lease_seconds: Some(secs),
            };
            let attempts = t.attempts;
            mem.save_task(&task_id);
            if kind == TaskKind::Reboot {
                // The node may come back without credentials (ephemeral): its used
                // bootstrap token may enroll once more for a while.
                open_reenroll_window(mem, &id, expires + REENROLL_WINDOW_MS);
                if let Some(inst) = mem.instances.get_mut(&id) {
                    inst.reboot_expected_ms = Some(now);
                    mem.save_instance(&id);
                }
            }
            let node_id = mem.instances[&id].node_id.clone();
            mem.event(
                now,
                "task.leased",
                Some(&node_id),
                Some(&id),
                json!({"task_id": task_id, "kind": kind, "attempt": attempts}),
            );
            Ok(LeaseResponse { task: Some(leased) })
        })
        .await
    }

    pub async fn renew_lease(
        &self,
        ident: &ClientIdentity,
        task_id: &str,
        req: RenewLeaseRequest,
    ) -> AppResult<RenewLeaseResponse> {
        let lease_max = self.cfg.lease_max_seconds.max(1);
        self.mutate(|mem, now| {
            authorize(mem, ident, Some(&req.instance_id))?;
            let t = leased_task(mem, ident, task_id, &req.lease_token)?;
            if t.status == TaskStatus::Cancelled {
                return Ok(RenewLeaseResponse {
                    lease_expires_at: format_ts(now),
                    cancelled: true,
                    lease_seconds: Some(0),
                });
            }
            if t.status != TaskStatus::Running {
                return Err(AppError::conflict(
                    ErrorCode::TaskNotLeased,
                    format!("task is {}", t.status.as_str()),
                ));
            }
            if t.lease_expires_ms.is_some_and(|e| e < now) {
                requeue_expired(mem, now, Some(&ident.instance_id));
                return Err(AppError::conflict(
                    ErrorCode::LeaseExpired,
                    "the lease expired; the task was requeued",
                ));
            }
            let secs = req.lease_seconds.clamp(1, lease_max);
            let expires = now + (secs as i64) * 1000;
            if let Some(t) = mem.tasks.get_mut(task_id) {
                t.lease_expires_ms = Some(expires);
                t.updated_ms = now;
                if req.progress.is_some() {
                    t.progress = req.progress.clone();
                }
            }
            mem.save_task(task_id);
            Ok(RenewLeaseResponse {
                lease_expires_at: format_ts(expires),
                cancelled: false,
                lease_seconds: Some(secs),
            })
        })
        .await
    }

    pub async fn complete_task(
        &self,
        ident: &ClientIdentity,
        task_id: &str,
        req: CompleteTaskRequest,
    ) -> AppResult<CompleteTaskResponse> {
        if !req.status.is_final() {
            return Err(AppError::bad_request(
                "status must be succeeded, failed or cancelled",
            ));
        }
        self.mutate(|mem, now| {
            authorize(mem, ident, Some(&req.instance_id))?;
            let t = leased_task(mem, ident, task_id, &req.lease_token)?;
            let id = ident.instance_id.clone();
            let node_id = mem.instances[&id].node_id.clone();
            let result = bound_result(req.result.clone());
            match t.status {
                // Cancelled by the operator meanwhile: the agent's stop is the answer;
                // what it reported is kept beside the cancellation.
                TaskStatus::Cancelled => {
                    if let Some(t) = mem.tasks.get_mut(task_id) {
                        if let Some(obj) = t.result.as_object_mut() {
                            obj.insert("agent_status".into(), json!(req.status));
                            obj.insert("agent_result".into(), result);
                        }
                        t.updated_ms = now;
                    }
                    mem.save_task(task_id);
                }
                TaskStatus::Running => {
                    if t.kind == TaskKind::Reboot && req.status == TaskStatus::Succeeded {
                        open_reenroll_window(mem, &id, now + REENROLL_WINDOW_MS);
                    }
                    finish_task(mem, now, task_id, req.status, result);
                    if t.kind == TaskKind::Drain {
                        let kind = match req.status {
                            TaskStatus::Succeeded => "instance.drained",
                            _ => "instance.drain_unfinished",
                        };
                        mem.event(
                            now,
                            kind,
                            Some(&node_id),
                            Some(&id),
                            json!({"task_id": task_id, "status": req.status}),
                        );
                    }
                }
                other => {
                    return Err(AppError::conflict(
                        ErrorCode::TaskNotLeased,
                        format!("task is {}", other.as_str()),
                    ))
                }
            }
            Ok(CompleteTaskResponse {
                task_id: task_id.to_string(),
                status: mem.tasks[task_id].status,
                instance_status: mem.instances[&id].status,
            })
        })
        .await
    }
}

fn apply_heartbeat(mem: &mut Mem, id: &str, req: &HeartbeatRequest, now: Millis) {
    if let Some(inst) = mem.instances.get_mut(id) {
        inst.last_heartbeat_ms = Some(now);
        inst.phase = Some(req.phase);
        inst.uptime_seconds = req.uptime_seconds;
        if inst.agent_version.as_deref() != Some(req.agent_version.as_str()) {
            inst.agent_version = Some(req.agent_version.clone());
        }
        if inst.modules != req.modules {
            inst.modules = req.modules.clone();
        }
        if inst.services != req.services {
            inst.services = req.services.clone();
        }
        if req.last_reconcile.is_some() && inst.last_reconcile != req.last_reconcile {
            inst.last_reconcile = req.last_reconcile.clone();
        }
        if req.systemd.is_some() && inst.systemd != req.systemd {
            inst.systemd = req.systemd.clone();
        }
        if inst.status == InstanceStatus::Draining || req.cordoned {
            inst.cordoned = inst.cordoned || req.cordoned;
        } else {
            inst.cordoned = false;
        }
    }
}

/// The task named by a worker call, checked against the caller's instance and
/// lease token.
fn leased_task(
    mem: &Mem,
    ident: &ClientIdentity,
    task_id: &str,
    token: &str,
) -> AppResult<TaskRec> {
    let t = mem
        .tasks
        .get(task_id)
        .filter(|t| t.instance_id == ident.instance_id)
        .ok_or_else(|| AppError::not_found("task", task_id))?;
    match &t.lease_token {
        Some(held)
            if held.len() == token.len()
                && held
                    .bytes()
                    .zip(token.bytes())
                    .fold(0u8, |a, (x, y)| a | (x ^ y))
                    == 0 =>
        {
            Ok(t.clone())
        }
        _ if t.status == TaskStatus::Pending && t.attempts > 0 => Err(AppError::conflict(
            ErrorCode::LeaseExpired,
            "the lease expired; the task was requeued",
        )),
        _ => Err(AppError::conflict(
            ErrorCode::TaskNotLeased,
            "no lease with this token",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_results_pass_and_large_ones_become_a_marked_preview() {
        let small = json!({"ok": true, "lines": ["a", "b"]});
        assert_eq!(bound_result(small.clone()), small);
        let big = json!({"log": "é".repeat(MAX_TASK_RESULT_BYTES)});
        let b = bound_result(big);
        assert_eq!(b["truncated"], true);
        assert!(b["original_bytes"].as_u64().unwrap() > MAX_TASK_RESULT_BYTES as u64);
        let preview = b["preview"].as_str().unwrap();
        assert!(preview.len() <= RESULT_PREVIEW_BYTES && preview.starts_with("{\"log\""));
        assert!(b.to_string().len() < MAX_TASK_RESULT_BYTES);
    }
}
