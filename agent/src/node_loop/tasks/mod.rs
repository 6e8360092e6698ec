//! What every leased task does: read its parameters, renew its lease (also while
//! its work runs, stopping on cancel) and report its end. One file per task kind.

pub(crate) mod diagnostics;
pub(crate) mod drain;
pub(crate) mod module_update;
pub(crate) mod reboot;

use std::future::Future;
use std::ops::ControlFlow;
use std::time::Duration;

use powernode_proto::node::{
    CompleteTaskRequest, CompleteTaskResponse, LeasedTask, RenewLeaseRequest, RenewLeaseResponse,
};
use powernode_proto::{paths, TaskStatus};

use super::shared::Shared;
use crate::client::ClientError;

/// Task parameters as JSON; `null` is `{}`.
pub(crate) fn params<T: serde::de::DeserializeOwned>(
    task: &LeasedTask,
) -> Result<T, serde_json::Value> {
    let v = match &task.params {
        serde_json::Value::Null => serde_json::json!({}),
        v => v.clone(),
    };
    serde_json::from_value(v)
        .map_err(|e| serde_json::json!({"error": "bad_params", "message": e.to_string()}))
}

pub(crate) type TaskOutcome = Result<(TaskStatus, serde_json::Value), TaskAbort>;

/// How a piece of task work under lease ended.
pub(crate) enum Leased<T> {
    Done(T),
    Cancelled,
}

/// Runs `work` while renewing the task's lease every third of it; a renewal that
/// says `cancelled` drops `work` (the caller undoes what it must).
pub(crate) async fn while_leased<T>(
    shared: &Shared,
    task: &LeasedTask,
    progress: &str,
    work: impl Future<Output = T>,
) -> Result<Leased<T>, TaskAbort> {
    let mut work = std::pin::pin!(work);
    let renew_every = Duration::from_secs((shared.opts.lease_seconds / 3).max(1));
    loop {
        tokio::select! {
            v = &mut work => return Ok(Leased::Done(v)),
            _ = tokio::time::sleep(renew_every) => {
                if renew_lease(shared, task, progress).await? {
                    return Ok(Leased::Cancelled);
                }
            }
        }
    }
}

pub(crate) fn cancelled_result(what: &str) -> (TaskStatus, serde_json::Value) {
    (
        TaskStatus::Cancelled,
        serde_json::json!({"cancelled": true, "message": format!("cancelled {what}")}),
    )
}

pub(crate) enum TaskAbort {
    /// A terminal refusal: the agent is stopping.
    Stop,
    /// A reboot the server recorded as done: the agent ends for PID 1 to reboot.
    Reboot,
    /// The task already reported its end itself; nothing left to complete.
    Completed,
}

/// Renews the task's lease; `Ok(true)` when the operator cancelled it.
pub(crate) async fn renew_lease(
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

/// Completes a task, retrying transient failures a few times; returns the status
/// the server recorded when it answered (a task the operator cancelled meanwhile
/// stays `cancelled`).
pub(crate) async fn complete(
    shared: &Shared,
    task: &LeasedTask,
    status: TaskStatus,
    result: serde_json::Value,
) -> (ControlFlow<()>, Option<TaskStatus>) {
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
                return (ControlFlow::Continue(()), Some(r.status));
            }
            Err(e) if shared.stop_if_terminal(&e).await => return (ControlFlow::Break(()), None),
            Err(e @ ClientError::Refused { .. }) => {
                // Lease lost or task cancelled meanwhile: nothing to retry.
                tracing::warn!(task_id = %task.task_id, error = %crate::error_chain(&e), "task completion refused");
                return (ControlFlow::Continue(()), None);
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(task_id = %task.task_id, retry_in_ms = delay.as_millis() as u64,
                    error = %crate::error_chain(&e), "task completion failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
    (ControlFlow::Continue(()), None)
}

/// A leased task with `params`, for the task kinds' tests.
#[cfg(test)]
pub(crate) fn leased(params: serde_json::Value) -> LeasedTask {
    LeasedTask {
        task_id: "t".into(),
        kind: powernode_proto::TaskKind::Reboot,
        params,
        lease_expires_at: String::new(),
        lease_token: "x".into(),
    }
}
