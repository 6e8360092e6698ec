//! The `module_update` task: fetch the desired set and reconcile now.

use std::sync::Arc;

use powernode_proto::node::{DesiredModulesResponse, FailureReport, LeasedTask, Phase};
use powernode_proto::{paths, ErrorCode, TaskStatus};

use super::super::reconcile_loop::record_reconcile;
use super::super::shared::Shared;
use super::{cancelled_result, renew_lease, while_leased, Leased, TaskAbort, TaskOutcome};

/// Fetches the desired modules and reconciles now; the result says what changed.
/// The task's params (the server's view of the drift) are informative only: the
/// desired set, fetched now, decides.
pub(crate) async fn module_update(shared: &Arc<Shared>, task: &LeasedTask) -> TaskOutcome {
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
    // The reconcile runs as its own task: a cancel stops the waiting, never a module
    // half way through its swap (services stopped, mounts changing).
    let reconciler = shared.reconciler.clone();
    let mut work = tokio::spawn(async move { reconciler.reconcile(&desired).await });
    let result = match while_leased(shared, task, "reconciling modules", &mut work).await? {
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
    Ok(match result {
        Ok(outcome) => {
            tracing::info!(task_id = %task.task_id, ?outcome, "module update applied");
            (
                TaskStatus::Succeeded,
                serde_json::to_value(&outcome).unwrap_or_default(),
            )
        }
        Err(failure) => (
            TaskStatus::Failed,
            serde_json::json!({"error": failure.code, "message": failure.message}),
        ),
    })
}
