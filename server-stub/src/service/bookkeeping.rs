//! Changes to the in-memory records that several actions share: finishing tasks,
//! failing an instance, a VM started or lost, the re-enroll window, expired leases.
//! Plain functions on [`Mem`]; they never lock, await or call the provider.

use powernode_proto::admin::{self};
use powernode_proto::node::{FailureReport, Phase};
use powernode_proto::{ErrorCode, InstanceStatus, TaskKind, TaskStatus};
use serde_json::json;

use crate::clock::{format_ts, Millis};
use crate::model::{new_id, Mem, Op, TaskRec};
use crate::provider::ProviderRecord;

use super::token_hash;

pub(super) fn mark_running(mem: &mut Mem, now: Millis, id: &str) {
    finish_tasks(
        mem,
        now,
        id,
        |t| t.kind == TaskKind::Provision && !t.status.is_final(),
        TaskStatus::Succeeded,
        &json!({"ready": true}),
    );
    mem.set_status(now, id, InstanceStatus::Running);
}

/// Records a new task on the instance and returns its id. A lifecycle task
/// (provision, drain, terminate) also becomes the instance's current one; callers
/// end what it supersedes first ([`finish_tasks`]).
pub(super) fn add_task(
    mem: &mut Mem,
    now: Millis,
    instance_id: &str,
    kind: TaskKind,
    status: TaskStatus,
    params: serde_json::Value,
) -> String {
    let id = new_id("task");
    mem.tasks.insert(
        id.clone(),
        TaskRec::new(id.clone(), instance_id, kind, status, params, now),
    );
    mem.save_task(&id);
    if let Some(i) = mem.instances.get_mut(instance_id) {
        i.task_ids.push(id.clone());
        if matches!(
            kind,
            TaskKind::Provision | TaskKind::Drain | TaskKind::Terminate
        ) {
            i.task_id = Some(id.clone());
        }
    }
    id
}

pub(super) fn finish_task(
    mem: &mut Mem,
    now: Millis,
    id: &str,
    status: TaskStatus,
    result: serde_json::Value,
) {
    let Some(t) = mem.tasks.get_mut(id) else {
        return;
    };
    let from = t.status;
    t.status = status;
    t.result = result;
    t.lease_expires_ms = None;
    t.updated_ms = now;
    let (kind, inst_id) = (t.kind, t.instance_id.clone());
    mem.save_task(id);
    let node_id = mem.instances.get(&inst_id).map(|i| i.node_id.clone());
    mem.event(
        now,
        "task.status_changed",
        node_id.as_deref(),
        Some(&inst_id),
        json!({"task_id": id, "kind": kind, "from": from, "to": status}),
    );
    // A reboot that will not happen (the task failed, or was cancelled) leaves no
    // window for the token to enroll again: it was opened for that reboot alone.
    if kind == TaskKind::Reboot && matches!(status, TaskStatus::Failed | TaskStatus::Cancelled) {
        close_reenroll_window(mem, &inst_id);
        if let Some(i) = mem.instances.get_mut(&inst_id) {
            if i.reboot_expected_ms.take().is_some() {
                mem.save_instance(&inst_id);
            }
        }
    }
}

/// Moves an instance to `failed` with a reason and withdraws its credentials.
pub(super) fn fail_instance(mem: &mut Mem, now: Millis, id: &str, code: ErrorCode, message: &str) {
    if let Some(inst) = mem.instances.get_mut(id) {
        inst.failure = Some(FailureReport {
            phase: Phase::Failed,
            code,
            message: message.to_string(),
            attempt: 0,
            recovery: None,
        });
    }
    mem.revoke_credentials(now, id);
    mem.set_status(now, id, InstanceStatus::Failed);
}

/// What a provider record says instead of the bootstrap token (see `identities`).
pub const TOKEN_NOT_KEPT: &str = "(not kept)";

/// A provision record's identity document with its token replaced by the token's
/// hash (the same hash the token rows are keyed by).
fn redact_identity(record: &mut ProviderRecord) {
    let Some(token) = record["identity"]["bootstrap_token"].as_str() else {
        return;
    };
    let hash = token_hash(token);
    record["identity"]["bootstrap_token"] = json!(TOKEN_NOT_KEPT);
    record["identity"]["bootstrap_token_sha256"] = json!(hash);
}

/// Records a VM the provider started for an instance: its provider record and a
/// `provider.provision` event with the VM's pid and files (and its libvirt domain),
/// so an operator can find them.
pub(super) fn vm_started(
    mem: &mut Mem,
    now: Millis,
    provider: &str,
    (instance_id, node_id): (&str, &str),
    mut record: ProviderRecord,
) {
    redact_identity(&mut record);
    let mut detail = json!({
        "provider": provider,
        "pid": record.get("pid"),
        "instance_dir": record.get("instance_dir"),
        "publication_id": record.get("publication_id"),
    });
    for key in ["domain", "uuid"] {
        if let Some(v) = record.get(key) {
            detail[key] = v.clone();
        }
    }
    mem.ops.push(Op::ProviderRecord {
        instance_id: instance_id.to_string(),
        action: "provision".to_string(),
        at_ms: now,
        doc: record,
    });
    mem.event(
        now,
        "provider.provision",
        Some(node_id),
        Some(instance_id),
        detail,
    );
}

/// Ends the instance's tasks that `which` picks with `status` and `result`.
pub(super) fn finish_tasks(
    mem: &mut Mem,
    now: Millis,
    instance_id: &str,
    which: impl Fn(&TaskRec) -> bool,
    status: TaskStatus,
    result: &serde_json::Value,
) {
    let picked: Vec<String> = mem
        .instances
        .get(instance_id)
        .map(|i| {
            i.task_ids
                .iter()
                .filter(|t| mem.tasks.get(*t).is_some_and(&which))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for t in &picked {
        finish_task(mem, now, t, status, result.clone());
    }
}

/// The instance's VM is gone for good: its open tasks fail and so does it.
pub(super) fn vm_lost(mem: &mut Mem, now: Millis, instance_id: &str, message: &str) {
    finish_tasks(
        mem,
        now,
        instance_id,
        |t| !t.status.is_final(),
        TaskStatus::Failed,
        &json!({"error": message}),
    );
    fail_instance(mem, now, instance_id, ErrorCode::ProviderFailed, message);
}

/// Lets the instance's used, unrevoked bootstrap tokens enroll once more until
/// `until` (a reboot is under way).
pub(super) fn open_reenroll_window(mem: &mut Mem, instance_id: &str, until: Millis) {
    let hashes: Vec<String> = mem
        .tokens
        .values()
        .filter(|t| t.instance_id == instance_id && !t.revoked && t.used_ms.is_some())
        .map(|t| t.hash.clone())
        .collect();
    for h in hashes {
        if let Some(t) = mem.tokens.get_mut(&h) {
            t.reenroll_until_ms = Some(until.max(t.reenroll_until_ms.unwrap_or(0)));
            mem.ops.push(Op::Token(t.clone()));
        }
    }
}

/// Ends the instance's re-enrollment window (see [`open_reenroll_window`]).
pub(super) fn close_reenroll_window(mem: &mut Mem, instance_id: &str) {
    let hashes: Vec<String> = mem
        .tokens
        .values()
        .filter(|t| t.instance_id == instance_id && t.reenroll_until_ms.is_some())
        .map(|t| t.hash.clone())
        .collect();
    for h in hashes {
        if let Some(t) = mem.tokens.get_mut(&h) {
            t.reenroll_until_ms = None;
            mem.ops.push(Op::Token(t.clone()));
        }
    }
}

/// A node that booted again while a reboot task was open: the reboot happened.
pub(super) fn finish_reboot_tasks(mem: &mut Mem, now: Millis, instance_id: &str, how: &str) {
    finish_tasks(
        mem,
        now,
        instance_id,
        |t| t.kind == TaskKind::Reboot && t.status == TaskStatus::Running,
        TaskStatus::Succeeded,
        &json!({ how: true }),
    );
    if let Some(i) = mem.instances.get_mut(instance_id) {
        if i.reboot_expected_ms.take().is_some() {
            mem.save_instance(instance_id);
        }
    }
}

/// Puts node-side tasks whose lease ran out back to `pending`.
pub(super) fn requeue_expired(mem: &mut Mem, now: Millis, instance_id: Option<&str>) {
    let expired: Vec<String> = mem
        .tasks
        .values()
        .filter(|t| {
            t.status == TaskStatus::Running
                && t.kind.is_node_side()
                && t.lease_expires_ms.is_some_and(|e| e < now)
                && instance_id.is_none_or(|i| i == t.instance_id)
        })
        .map(|t| t.id.clone())
        .collect();
    for id in expired {
        let Some(t) = mem.tasks.get_mut(&id) else {
            continue;
        };
        // The attempt that died is kept: when it was leased, how far it got.
        t.history.push(admin::TaskAttempt {
            attempt: t.attempts,
            leased_at: format_ts(t.leased_ms.unwrap_or(t.updated_ms)),
            ended_at: format_ts(now),
            outcome: "lease_expired".to_string(),
            progress: t.progress.take(),
            result: std::mem::take(&mut t.result),
        });
        t.status = TaskStatus::Pending;
        t.lease_token = None;
        t.lease_expires_ms = None;
        t.leased_ms = None;
        t.updated_ms = now;
        let (inst, attempts) = (t.instance_id.clone(), t.attempts);
        mem.save_task(&id);
        let node_id = mem.instances.get(&inst).map(|i| i.node_id.clone());
        mem.event(
            now,
            "task.lease_expired",
            node_id.as_deref(),
            Some(&inst),
            json!({"task_id": id, "attempts": attempts}),
        );
    }
}
