//! The `module_update` task: fetch the desired set and reconcile now.

use std::sync::Arc;

use powernode_proto::node::{DesiredModulesResponse, FailureReport, Phase};
use powernode_proto::{paths, ErrorCode, TaskStatus};

use super::super::reconcile_loop::record_reconcile;
use super::super::shared::Shared;
use super::{cancelled_result, renew_lease, while_leased, Lease, Leased, TaskAbort, TaskOutcome};

/// What a drain or reboot that preempts the update sends: `KIND task ID`.
pub(crate) type Preempt = tokio::sync::watch::Receiver<Option<String>>;

/// Waits until a drain or reboot preempts the update; never, once nothing can.
async fn preempted(rx: &mut Preempt) -> String {
    loop {
        if let Some(by) = rx.borrow_and_update().clone() {
            return by;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn preempted_result(by: &str, message: &str) -> (TaskStatus, serde_json::Value) {
    (
        TaskStatus::Cancelled,
        serde_json::json!({"cancelled": true, "error": "preempted", "preempted_by": by,
            "message": format!("preempted by {by}: {message}")}),
    )
}

/// Fetches the desired modules and reconciles now; the result says what changed.
/// The task's params (the server's view of the drift) are informative only: the
/// desired set, fetched now, decides.
///
/// A drain or reboot leased meanwhile preempts it (`preempt`): the reconcile is
/// cancelled before it changes anything (a stalled pull is abandoned), and the task
/// ends `cancelled` with `error: preempted`; a swap already under way finishes first
/// and is reported as done. Services it would start stay held by the drain.
pub(crate) async fn module_update(
    shared: &Arc<Shared>,
    task: &Lease,
    mut preempt: Preempt,
) -> TaskOutcome {
    if renew_lease(shared, task, "fetching desired modules").await? {
        return Ok(cancelled_result("before any change"));
    }
    let desired = match shared
        .client()
        .get::<DesiredModulesResponse>(paths::DESIRED_MODULES)
        .await
    {
        Ok(d) => d,
        Err(e) if shared.stop_if_terminal(&e).await => return Err(TaskAbort::Stop),
        Err(e) => {
            return Ok((
                TaskStatus::Failed,
                serde_json::json!({"error": e.report_code(), "message": crate::error_chain(&e)}),
            ))
        }
    };
    if let Some(by) = preempt.borrow_and_update().clone() {
        return Ok(preempted_result(&by, "nothing was changed"));
    }
    // The reconcile runs as its own task: a cancel stops the waiting, never a module
    // half way through its swap (services stopped, mounts changing).
    let reconciler = shared.reconciler.clone();
    let mut work = tokio::spawn(async move { reconciler.reconcile(&desired).await });
    let mut by = None;
    let leased = tokio::select! {
        r = while_leased(shared, task, "reconciling modules", &mut work) => r,
        p = preempted(&mut preempt) => {
            tracing::info!(task_id = %task.task_id, by = %p, "module update preempted; cancelling its reconcile");
            shared.reconciler.cancel_in_flight();
            by = Some(p);
            // Cancelled at its next safe point: at once while it pulls.
            while_leased(shared, task, "cancelling for a drain or reboot", &mut work).await
        }
    };
    let leased = match leased {
        // Whoever leases the requeued task reconciles again: this one stops pulling.
        Err(lost @ TaskAbort::LeaseLost { .. }) => {
            shared.reconciler.cancel_in_flight();
            return Err(lost);
        }
        other => other?,
    };
    let result = match leased {
        Leased::Done(Ok(r)) => r,
        Leased::Done(Err(e)) => Err(FailureReport {
            phase: Phase::ModulesVerified,
            code: ErrorCode::Internal,
            message: format!("the reconcile task failed: {e}"),
            attempt: 0,
            recovery: None,
        }),
        Leased::Cancelled => {
            // The task's answer goes now; the reconcile's own result still reaches
            // the heartbeats when it is done.
            let shared = shared.clone();
            tokio::spawn(async move {
                if let Ok(result) = work.await {
                    record_reconcile(&shared, &result);
                    shared.wake_heartbeat.notify_one();
                }
            });
            return Ok((
                TaskStatus::Cancelled,
                serde_json::json!({"cancelled": true,
                    "message": "cancelled while reconciling: the reconcile in flight completes \
                                (no module is left half swapped); heartbeats report the result"}),
            ));
        }
    };
    record_reconcile(shared, &result);
    shared.wake_heartbeat.notify_one();
    Ok(match (result, by) {
        (Err(f), Some(by)) if f.code == ErrorCode::TaskCancelled => preempted_result(
            &by,
            "the reconcile was cancelled before any module changed; the next reconcile applies the desired set",
        ),
        (Ok(outcome), _) => {
            tracing::info!(task_id = %task.task_id, ?outcome, "module update applied");
            (
                TaskStatus::Succeeded,
                serde_json::to_value(&outcome).unwrap_or_default(),
            )
        }
        (Err(failure), _) => (
            TaskStatus::Failed,
            serde_json::json!({"error": failure.code, "message": failure.message}),
        ),
    })
}
