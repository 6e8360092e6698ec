//! The lease loop: lease a task and run it by kind; each kind is a file in
//! [`super::tasks`]. The lease is long-polled (the server holds it until a task is
//! queued for this node, up to `lease_wait_seconds`), so a task reaches the node at
//! once whatever the heartbeat interval; against a server that answers at once, it
//! polls now and then and when a heartbeat says a task is pending.
//!
//! A `module_update` runs in the background, so the loop keeps leasing: a pull stuck
//! on a registry must not hold a drain or a reboot behind it. A drain or reboot
//! leased while an update runs preempts it (the update's reconcile is cancelled
//! before it changes anything, the update ends `cancelled` with `error: preempted`)
//! and runs once the update has reported; reconciles in flight elsewhere (the
//! periodic one) are cancelled too.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use powernode_proto::node::{LeaseRequest, LeaseResponse};
use powernode_proto::{paths, TaskKind, TaskStatus};
use tokio::sync::watch;

use super::options::Exit;
use super::shared::Shared;
use super::tasks::{
    complete, diagnostics::collect_diagnostics, drain::drain, module_update::module_update,
    reboot::reboot, Lease, TaskAbort,
};

/// A `module_update` running beside the loop, and how to preempt it.
struct Background {
    handle: tokio::task::JoinHandle<ControlFlow<()>>,
    preempt: watch::Sender<Option<String>>,
}

pub(crate) async fn lease_loop(shared: Arc<Shared>) {
    let mut backoff = shared.backoff();
    let mut update: Option<Background> = None;
    loop {
        if update.as_ref().is_some_and(|u| u.handle.is_finished()) {
            if let Some(u) = update.take() {
                if matches!(u.handle.await, Ok(ControlFlow::Break(()))) {
                    return;
                }
            }
        }
        let wait = shared.opts.lease_wait_seconds;
        let req = LeaseRequest {
            instance_id: shared.instance_id().to_string(),
            lease_seconds: shared.opts.lease_seconds,
            wait_seconds: wait,
        };
        let sent = std::time::Instant::now();
        // The server holds the request up to `wait`: the timeout covers that and a
        // normal request's time on top.
        let timeout = Duration::from_secs(wait) + shared.opts.timeouts.request;
        let delay = match shared
            .client()
            .post_with_timeout::<_, LeaseResponse>(paths::TASK_LEASE, &req, timeout)
            .await
        {
            Ok(LeaseResponse { task: Some(task) }) => {
                backoff.reset();
                let task = Lease::new(task, shared.opts.lease_seconds, sent);
                if matches!(task.kind, TaskKind::Drain | TaskKind::Reboot) {
                    // Whatever reconcile is pulling now would change mounts under the
                    // drain: it gives up before its first change.
                    shared.reconciler.cancel_in_flight();
                    if let Some(u) = update.take() {
                        let by = format!("{} task {}", task.kind.as_str(), task.task_id);
                        tracing::info!(by = %by, "preempting the module update in progress");
                        let _ = u.preempt.send(Some(by));
                        if matches!(u.handle.await, Ok(ControlFlow::Break(()))) {
                            return;
                        }
                    }
                }
                if task.kind == TaskKind::ModuleUpdate {
                    let (tx, rx) = watch::channel(None);
                    let s = shared.clone();
                    update = Some(Background {
                        handle: tokio::spawn(async move { run_task(&s, task, Some(rx)).await }),
                        preempt: tx,
                    });
                    continue;
                }
                if run_task(&shared, task, None).await.is_break() {
                    return;
                }
                // Something may be queued behind it: ask again at once.
                continue;
            }
            Ok(LeaseResponse { task: None }) => {
                backoff.reset();
                if held(wait, sent.elapsed()) {
                    // A long poll that ran its course: ask again at once.
                    Duration::ZERO
                } else {
                    // Answered at once: a server without long polls (or stopping).
                    shared.interval() * shared.opts.lease_poll_every.max(1)
                }
            }
            Err(e) => {
                if shared.stop_if_terminal(&e).await {
                    return;
                }
                let delay = backoff.next_delay();
                tracing::warn!(retry_in_ms = delay.as_millis() as u64,
                    error = %crate::error_chain(&e), "task lease failed");
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.wake_lease.notified() => {}
        }
    }
}

/// Whether an empty lease answer came after the server held it (a long poll), not at
/// once: a server without long polls answers in milliseconds, one that caps the wait
/// lower than asked still holds it for a second or more.
fn held(wait_seconds: u64, took: Duration) -> bool {
    wait_seconds > 0 && took >= (Duration::from_secs(wait_seconds) / 2).min(Duration::from_secs(1))
}

/// Runs one leased task to completion. `Break` means the agent must stop. A module
/// update can be preempted through `preempt`.
async fn run_task(
    shared: &Arc<Shared>,
    task: Lease,
    preempt: Option<watch::Receiver<Option<String>>>,
) -> ControlFlow<()> {
    tracing::info!(task_id = %task.task_id, kind = task.kind.as_str(), params = %task.params,
        granted_s = task.lease_seconds, "task leased");
    let outcome = match task.kind {
        TaskKind::Drain => drain(shared, &task).await,
        TaskKind::CollectDiagnostics => collect_diagnostics(shared, &task).await,
        TaskKind::ModuleUpdate => {
            let preempt = preempt.unwrap_or_else(|| watch::channel(None).1);
            module_update(shared, &task, preempt).await
        }
        TaskKind::Reboot => reboot(shared, &task).await,
        other if shared.status().cordoned => Ok((
            TaskStatus::Failed,
            serde_json::json!({"error": "cordoned",
                "message": format!("the node is cordoned and takes no `{}` work", other.as_str())}),
        )),
        other => Ok((
            TaskStatus::Failed,
            serde_json::json!({"error": "unsupported",
                "message": format!("this agent does not run `{}` tasks yet", other.as_str())}),
        )),
    };
    let (status, result) = match outcome {
        Ok(v) => v,
        Err(TaskAbort::Stop) => return ControlFlow::Break(()),
        Err(TaskAbort::Reboot) => {
            let _ = shared.exit.send(Exit::Reboot).await;
            return ControlFlow::Break(());
        }
        Err(TaskAbort::Completed) => return ControlFlow::Continue(()),
        // The server requeued it; whoever leases it next runs it.
        Err(TaskAbort::LeaseLost { code }) => {
            tracing::warn!(task_id = %task.task_id, kind = task.kind.as_str(), %code,
                "task abandoned: its lease is gone (not reported done)");
            return ControlFlow::Continue(());
        }
    };
    complete(shared, &task, status, result).await.0
}

#[cfg(test)]
mod tests {
    use super::held;
    use std::time::Duration;

    #[test]
    fn only_a_held_answer_is_asked_again_at_once() {
        assert!(held(20, Duration::from_secs(20)));
        assert!(held(20, Duration::from_secs(10)));
        assert!(held(20, Duration::from_secs(1)));
        assert!(!held(20, Duration::from_millis(30)));
        assert!(!held(0, Duration::from_secs(60)));
    }
}
