//! What every leased task does: read its parameters, renew its lease (also while
//! its work runs, stopping on cancel) and report its end. One file per task kind.
//!
//! The lease is the length the server granted ([`lease_timer`]); a renewal the
//! server refuses (`lease_expired`, `task_not_leased`), or none answered before the
//! lease ran out, loses it: the task's work stops and it is not reported done (the
//! server requeues it).

pub(crate) mod diagnostics;
pub(crate) mod drain;
pub(crate) mod lease_timer;
pub(crate) mod module_update;
pub(crate) mod reboot;

use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Mutex;
use std::time::Instant;

use powernode_proto::node::{
    CompleteTaskRequest, CompleteTaskResponse, LeasedTask, RenewLeaseRequest, RenewLeaseResponse,
};
use powernode_proto::{paths, ErrorCode, TaskStatus};

use super::shared::{lock, Shared};
use crate::client::ClientError;
use lease_timer::LeaseTimer;

/// A leased task and its lease's clock.
pub(crate) struct Lease {
    pub(crate) task: LeasedTask,
    /// The length the agent asks for at each renewal.
    asked: u64,
    timer: Mutex<LeaseTimer>,
}

impl Lease {
    /// `task` as the lease request sent at `sent` (asking `asked` seconds) got it.
    pub(crate) fn new(task: LeasedTask, asked: u64, sent: Instant) -> Self {
        let timer = LeaseTimer::new(task.lease_seconds, asked, sent);
        Self {
            task,
            asked,
            timer: Mutex::new(timer),
        }
    }

    fn timer(&self) -> LeaseTimer {
        lock(&self.timer).clone()
    }
}

impl std::ops::Deref for Lease {
    type Target = LeasedTask;
    fn deref(&self) -> &LeasedTask {
        &self.task
    }
}

/// The code of a renewal refusal that means the lease is gone.
pub(crate) fn lease_lost(e: &ClientError) -> Option<ErrorCode> {
    e.code()
        .filter(|c| matches!(c, ErrorCode::LeaseExpired | ErrorCode::TaskNotLeased))
}

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

/// Runs `work` while renewing the task's lease (after a third of the granted
/// length, sooner after a failed renewal); a renewal that says `cancelled` drops
/// `work` (the caller undoes what it must), a lost lease drops it too
/// ([`TaskAbort::LeaseLost`]).
pub(crate) async fn while_leased<T>(
    shared: &Shared,
    task: &Lease,
    progress: &str,
    work: impl Future<Output = T>,
) -> Result<Leased<T>, TaskAbort> {
    let mut work = std::pin::pin!(work);
    loop {
        let next = tokio::time::Instant::from_std(task.timer().next_renewal());
        tokio::select! {
            v = &mut work => return Ok(Leased::Done(v)),
            _ = tokio::time::sleep_until(next) => {
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
    /// The lease is gone (refused as `code`, or run out unrenewed): the server
    /// requeues the task; its work stops and it is not reported.
    LeaseLost { code: ErrorCode },
    /// A reboot the server recorded as done: the agent ends for PID 1 to reboot.
    Reboot,
    /// The task already reported its end itself; nothing left to complete.
    Completed,
}

/// Renews the task's lease; `Ok(true)` when the operator cancelled it. A refusal
/// that says the lease is gone, or a failure once it ran out, is
/// [`TaskAbort::LeaseLost`]; other failures leave it to the next attempt.
pub(crate) async fn renew_lease(
    shared: &Shared,
    task: &Lease,
    progress: &str,
) -> Result<bool, TaskAbort> {
    let req = RenewLeaseRequest {
        instance_id: shared.instance_id().to_string(),
        lease_token: task.lease_token.clone(),
        lease_seconds: task.asked,
        progress: Some(progress.to_string()),
    };
    let sent = Instant::now();
    match shared
        .client()
        .post::<_, RenewLeaseResponse>(&paths::task_renew(&task.task_id), &req)
        .await
    {
        Ok(r) => {
            lock(&task.timer).renewed(r.lease_seconds, task.asked, sent);
            Ok(r.cancelled)
        }
        Err(e) if shared.stop_if_terminal(&e).await => Err(TaskAbort::Stop),
        Err(e) => {
            if let Some(code) = lease_lost(&e) {
                tracing::warn!(task_id = %task.task_id, %code, error = %crate::error_chain(&e),
                    "task lease lost; its work stops and it is not reported");
                return Err(TaskAbort::LeaseLost { code });
            }
            let mut timer = lock(&task.timer);
            if timer.expired(Instant::now()) {
                tracing::warn!(task_id = %task.task_id, error = %crate::error_chain(&e),
                    granted_s = timer.granted().as_secs(),
                    "task lease ran out unrenewed; its work stops and it is not reported");
                return Err(TaskAbort::LeaseLost {
                    code: ErrorCode::LeaseExpired,
                });
            }
            timer.failed(Instant::now());
            tracing::warn!(task_id = %task.task_id, error = %crate::error_chain(&e), "lease renewal failed; retrying before it runs out");
            Ok(false)
        }
    }
}

/// Completes a task, retrying transient failures a few times; returns the status
/// the server recorded when it answered (a task the operator cancelled meanwhile
/// stays `cancelled`).
pub(crate) async fn complete(
    shared: &Shared,
    task: &Lease,
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
        lease_seconds: Some(30),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_that_says_so_loses_the_lease() {
        let refused = |code| ClientError::Refused {
            method: "POST",
            path: "/renew".into(),
            status: 409,
            code,
            message: "x".into(),
        };
        assert_eq!(
            lease_lost(&refused(ErrorCode::LeaseExpired)),
            Some(ErrorCode::LeaseExpired)
        );
        assert_eq!(
            lease_lost(&refused(ErrorCode::TaskNotLeased)),
            Some(ErrorCode::TaskNotLeased)
        );
        assert_eq!(lease_lost(&refused(ErrorCode::Internal)), None);
        assert_eq!(lease_lost(&ClientError::Tls("down".into())), None);
    }
}
