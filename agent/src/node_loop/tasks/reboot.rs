//! The `reboot` task (PID 1 only): cordon, stop the services, and end the run
//! for a reboot once the server recorded the task done.

use std::ops::ControlFlow;
use std::time::Duration;

use powernode_proto::TaskStatus;

use super::super::shared::Shared;
use super::{
    cancelled_result, complete, params, renew_lease, while_leased, Lease, Leased, TaskAbort,
    TaskOutcome,
};

/// `reboot` parameters: the budget to stop services first, under either name the
/// server may send (`timeout_seconds`, `drain_timeout_seconds`).
#[derive(Debug, serde::Deserialize)]
struct RebootParams {
    #[serde(default)]
    timeout_seconds: Option<u64>,
    #[serde(default)]
    drain_timeout_seconds: Option<u64>,
}

impl RebootParams {
    fn budget(&self) -> Duration {
        let secs = self
            .timeout_seconds
            .or(self.drain_timeout_seconds)
            .unwrap_or(60);
        Duration::from_secs(secs.clamp(1, 3600))
    }
}

/// Cordons, stops the services (killing what outlives the budget) and completes
/// the task itself; once the server recorded it, the run ends with
/// [`Exit::Reboot`] for PID 1 to sync and reboot.
pub(crate) async fn reboot(shared: &Shared, task: &Lease) -> TaskOutcome {
    if !shared.opts.can_reboot {
        return Ok((
            TaskStatus::Failed,
            serde_json::json!({"error": "unsupported",
                "message": "this agent is not PID 1 and does not reboot the machine"}),
        ));
    }
    let p: RebootParams = match params(task) {
        Ok(p) => p,
        Err(bad) => return Ok((TaskStatus::Failed, bad)),
    };
    if renew_lease(shared, task, "stopping services for reboot").await? {
        return Ok(cancelled_result("before the reboot"));
    }
    let was_cordoned = shared.status().cordoned;
    shared.set_status(|s| s.cordoned = true);
    let budget = p.budget();
    let stop = shared.supervisor.stop_all(budget, true);
    let undo = |shared: &Shared| {
        let restarted = shared.supervisor.start_all();
        shared.set_status(|s| s.cordoned = was_cordoned);
        (
            TaskStatus::Cancelled,
            serde_json::json!({"cancelled": true, "services_restarted": restarted}),
        )
    };
    // A lost lease means no reboot: the services come back, the requeued task
    // runs again.
    let report = match while_leased(shared, task, "stopping services for reboot", stop).await {
        Ok(Leased::Done(r)) => r,
        Ok(Leased::Cancelled) => return Ok(undo(shared)),
        Err(lost @ TaskAbort::LeaseLost { .. }) => {
            undo(shared);
            return Err(lost);
        }
        Err(e) => return Err(e),
    };
    // The last chance to cancel: after this the node goes down.
    match renew_lease(shared, task, "rebooting").await {
        Ok(false) => {}
        Ok(true) => return Ok(undo(shared)),
        Err(lost @ TaskAbort::LeaseLost { .. }) => {
            undo(shared);
            return Err(lost);
        }
        Err(e) => return Err(e),
    }
    let result = serde_json::json!({
        "rebooting": true,
        "services_stopped": report.stopped,
        "services_killed": report.killed,
    });
    // Completed here, not by the caller: only a completion the server recorded may
    // end in a reboot. One that never landed (or a cancel at the last moment) would
    // leave the task to be requeued and run again, and an ephemeral node without
    // the re-enrollment window the server opens on completion: stay up instead; the
    // lease runs out and the task is leased again.
    match complete(shared, task, TaskStatus::Succeeded, result).await {
        (ControlFlow::Break(()), _) => Err(TaskAbort::Stop),
        (_, Some(TaskStatus::Succeeded)) => {
            tracing::info!(task_id = %task.task_id, stopped = ?report.stopped, killed = ?report.killed, "rebooting");
            Err(TaskAbort::Reboot)
        }
        (_, recorded) => {
            let (_, restarted) = undo(shared);
            tracing::warn!(task_id = %task.task_id, ?recorded, %restarted,
                "reboot not recorded by the server; not rebooting, services restarted");
            Err(TaskAbort::Completed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::leased;
    use super::*;

    #[test]
    fn reboot_params_take_both_of_the_servers_names() {
        let p: RebootParams = params(&leased(
            serde_json::json!({"reason": "x", "drain_timeout_seconds": 7}),
        ))
        .unwrap();
        assert_eq!(p.budget(), Duration::from_secs(7));
        // The server sends both names.
        let p: RebootParams = params(&leased(
            serde_json::json!({"drain_timeout_seconds": 7, "timeout_seconds": 9}),
        ))
        .unwrap();
        assert_eq!(p.budget(), Duration::from_secs(9));
        let p: RebootParams = params(&leased(serde_json::Value::Null)).unwrap();
        assert_eq!(p.budget(), Duration::from_secs(60));
    }
}
