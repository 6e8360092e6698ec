//! The `drain` task: cordon, run the modules' drain steps, stop the services
//! (never killing), and undo all of it on cancel.

use std::sync::Mutex;
use std::time::Duration;

use powernode_proto::node::Phase;
use powernode_proto::TaskStatus;

use super::super::shared::{lock, Shared};
use super::{params, renew_lease, while_leased, Lease, Leased, TaskOutcome};
use crate::supervisor::Supervisor;

/// Drain parameters as the server sends them; absent fields take the defaults.
#[derive(Debug, serde::Deserialize)]
struct DrainParams {
    #[serde(default = "powernode_proto::admin::default_drain_timeout")]
    timeout_seconds: u64,
    #[serde(default)]
    cordon_only: bool,
}

pub(crate) async fn drain(shared: &Shared, task: &Lease) -> TaskOutcome {
    let params: DrainParams = match params(task) {
        Ok(p) => p,
        Err(bad) => return Ok((TaskStatus::Failed, bad)),
    };
    // Stop taking work first, so nothing new lands while services stop.
    shared.set_status(|s| s.cordoned = true);
    tracing::info!(task_id = %task.task_id, cordon_only = params.cordon_only,
        timeout_seconds = params.timeout_seconds, "node cordoned");
    if params.cordon_only {
        return Ok((
            TaskStatus::Succeeded,
            serde_json::json!({"cordoned": true, "cordon_only": true}),
        ));
    }
    shared.set_status(|s| s.phase = Phase::Draining);
    if renew_lease(shared, task, "stopping services").await? {
        return Ok(cancelled(shared, task, Vec::new()).await);
    }
    // The drain's budget is the operator's: a service still running at its end is
    // not killed but reported, and the node stays draining (stuck) for the operator
    // to decide (terminate --force, or cancel). Drain steps share it.
    let budget = Duration::from_secs(params.timeout_seconds.max(1));
    let deadline = tokio::time::Instant::now() + budget;
    let steps = shared.reconciler.drain_steps();
    let started = Mutex::new(Vec::new());
    let work = drain_work(&*shared.supervisor, &steps, deadline, &started);
    let progress = if steps.is_empty() {
        "stopping services"
    } else {
        "running drain steps, then stopping services"
    };
    let outcome = match while_leased(shared, task, progress, work).await? {
        Leased::Done(r) => r,
        // Dropping the work kills a step that runs and abandons the stop;
        // `cancelled` undoes both.
        Leased::Cancelled => {
            let started = std::mem::take(&mut *lock(&started));
            return Ok(cancelled(shared, task, started).await);
        }
    };
    let started: Vec<String> = lock(&started).iter().map(|s| s.label()).collect();
    let (status, result) = drain_result(params.timeout_seconds, started, outcome);
    match status {
        TaskStatus::Succeeded => {
            shared.set_status(|s| s.phase = Phase::Drained);
            tracing::info!(task_id = %task.task_id, stopped = %result["stopped"], "node drained");
        }
        _ => {
            tracing::warn!(task_id = %task.task_id, error = %result["error"], message = %result["message"],
            "drain did not finish; the node stays draining")
        }
    }
    Ok((status, result))
}

/// A drain's work within `deadline`: the modules' drain steps in order, then the
/// services (reverse start order, never killed). Steps started go to `started`.
async fn drain_work(
    supervisor: &dyn Supervisor,
    steps: &[crate::drain::DrainStep],
    deadline: tokio::time::Instant,
    started: &Mutex<Vec<crate::drain::DrainStep>>,
) -> Result<(Vec<String>, crate::supervisor::StopReport), crate::drain::StepError> {
    let done = crate::drain::run_steps(steps, deadline, started).await?;
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    Ok((done, supervisor.stop_all(left, false).await))
}

/// The drain task's answer. `stopped` lists what stopped in order: the steps
/// (`step:MODULE/NAME`), then the services. A failed step (`started` ends with it)
/// or a service still running fails the drain; the node then stays draining.
fn drain_result(
    timeout_seconds: u64,
    started: Vec<String>,
    outcome: Result<(Vec<String>, crate::supervisor::StopReport), crate::drain::StepError>,
) -> (TaskStatus, serde_json::Value) {
    let (steps, report) = match outcome {
        Ok(v) => v,
        Err(e) => {
            let mut done = started;
            done.pop();
            return (
                TaskStatus::Failed,
                serde_json::json!({
                    "error": e.code(),
                    "message": crate::error_chain(&e),
                    "step": e.step(),
                    "timeout_seconds": timeout_seconds,
                    "steps": done,
                    "stopped": done,
                    "services_stopped": [],
                }),
            );
        }
    };
    let stopped: Vec<&String> = steps.iter().chain(&report.stopped).collect();
    if !report.stuck.is_empty() {
        return (
            TaskStatus::Failed,
            serde_json::json!({
                "error": "drain_timeout",
                "message": format!("{} service(s) still running after {} s: {}",
                    report.stuck.len(), timeout_seconds, report.stuck.join(", ")),
                "timeout_seconds": timeout_seconds,
                "steps": steps,
                "stopped": stopped,
                "services_stopped": report.stopped,
                "services_stuck": report.stuck,
            }),
        );
    }
    (
        TaskStatus::Succeeded,
        serde_json::json!({
            "drained": true,
            "cordon_only": false,
            "steps": steps,
            "stopped": stopped,
            "services_stopped": report.stopped,
            "services_killed": report.killed,
        }),
    )
}

/// The operator cancelled a drain: restart what was stopped, undo the drain steps
/// that ran (`started`, last first), take work again.
async fn cancelled(
    shared: &Shared,
    task: &Lease,
    started: Vec<crate::drain::DrainStep>,
) -> (TaskStatus, serde_json::Value) {
    let restarted = shared.supervisor.start_all();
    let undone = crate::drain::undo_steps(&started).await;
    tracing::info!(task_id = %task.task_id, restarted = ?restarted, ?undone, "drain cancelled; uncordoning");
    shared.set_status(|s| {
        s.cordoned = false;
        s.phase = Phase::Ready;
    });
    let undone: Vec<serde_json::Value> = undone
        .into_iter()
        .map(|(step, error)| serde_json::json!({"step": step, "error": error}))
        .collect();
    (
        TaskStatus::Cancelled,
        serde_json::json!({"cancelled": true, "services_restarted": restarted, "steps_undone": undone}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_params_default_and_refuse_junk() {
        let p: DrainParams = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!((p.timeout_seconds, p.cordon_only), (300, false));
        let p: DrainParams =
            serde_json::from_value(serde_json::json!({"timeout_seconds": 5, "cordon_only": true}))
                .unwrap();
        assert_eq!((p.timeout_seconds, p.cordon_only), (5, true));
        assert!(serde_json::from_value::<DrainParams>(
            serde_json::json!({"timeout_seconds": "soon"})
        )
        .is_err());
    }

    fn sh_step(module: &str, name: &str, script: &str) -> crate::drain::DrainStep {
        crate::drain::DrainStep {
            module: module.into(),
            name: name.into(),
            argv: vec!["sh".into(), "-c".into(), script.into()],
            undo: None,
            timeout: Duration::from_secs(10),
            env: Vec::new(),
            cwd: None,
        }
    }

    /// The DockerHost runbook in miniature: the step stops the "containers" while
    /// the "daemon" still runs, then the daemon stops; the result lists both in
    /// that order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_runs_the_steps_before_the_services_and_lists_both_in_order() {
        use crate::supervisor::{ServiceSpec, ServiceSupervisor};
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let daemon = format!(
            "trap 'echo daemon-stopped >> {l}; exit 0' TERM; while :; do sleep 0.05; done",
            l = log.display()
        );
        let sup = ServiceSupervisor::default();
        sup.add(vec![ServiceSpec::new(
            "docker",
            "dockerhost",
            vec!["sh".into(), "-c".into(), daemon],
        )]);
        let t = std::time::Instant::now();
        while sup.services()[0].state != "running" {
            assert!(t.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let steps = [sh_step(
            "dockerhost",
            "containers",
            &format!("echo containers-stopped >> {}", log.display()),
        )];
        let started = Mutex::new(Vec::new());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let outcome = drain_work(&sup, &steps, deadline, &started).await;
        let started: Vec<String> = started.lock().unwrap().iter().map(|s| s.label()).collect();
        let (status, result) = drain_result(10, started, outcome);
        assert_eq!(status, TaskStatus::Succeeded, "{result}");
        assert_eq!(
            result["stopped"],
            serde_json::json!(["step:dockerhost/containers", "docker"])
        );
        assert_eq!(
            result["steps"],
            serde_json::json!(["step:dockerhost/containers"])
        );
        assert_eq!(result["services_stopped"], serde_json::json!(["docker"]));
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "containers-stopped\ndaemon-stopped\n"
        );
    }

    #[tokio::test]
    async fn a_failing_drain_step_fails_the_drain_and_leaves_the_services_running() {
        use crate::supervisor::{ServiceSpec, ServiceSupervisor};
        let sup = ServiceSupervisor::default();
        sup.add(vec![ServiceSpec::new(
            "web",
            "m",
            vec!["sleep".into(), "100".into()],
        )]);
        let t = std::time::Instant::now();
        while sup.services()[0].state != "running" {
            assert!(t.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = sup.services()[0].pid;
        let steps = [
            sh_step("m", "ok", "true"),
            sh_step("m", "stuck-container", "echo container refuses >&2; exit 1"),
            sh_step("m", "never", "true"),
        ];
        let started = Mutex::new(Vec::new());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let outcome = drain_work(&sup, &steps, deadline, &started).await;
        let started: Vec<String> = started.lock().unwrap().iter().map(|s| s.label()).collect();
        let (status, result) = drain_result(10, started, outcome);
        assert_eq!(status, TaskStatus::Failed);
        assert_eq!(result["error"], "drain_step_failed");
        assert_eq!(result["step"], "step:m/stuck-container");
        assert_eq!(result["steps"], serde_json::json!(["step:m/ok"]));
        assert!(result["message"]
            .as_str()
            .unwrap()
            .contains("container refuses"));
        let web = &sup.services()[0];
        assert_eq!(
            (web.state.as_str(), web.pid),
            ("running", pid),
            "services untouched"
        );
        sup.stop_all(Duration::from_millis(10), true).await;
    }

    #[test]
    fn a_stuck_service_still_reports_drain_timeout_with_the_steps_that_ran() {
        let report = crate::supervisor::StopReport {
            stopped: vec!["b".into()],
            killed: vec![],
            stuck: vec!["a".into()],
        };
        let (status, result) = drain_result(5, vec![], Ok((vec!["step:m/s".into()], report)));
        assert_eq!(status, TaskStatus::Failed);
        assert_eq!(result["error"], "drain_timeout");
        assert_eq!(result["stopped"], serde_json::json!(["step:m/s", "b"]));
        assert_eq!(result["services_stuck"], serde_json::json!(["a"]));
    }
}
