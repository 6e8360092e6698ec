//! The steady-state module reconcile: every `reconcile_every` heartbeat intervals
//! against the desired set, its result kept for the heartbeats (`last_reconcile`).

use std::sync::Arc;

use powernode_proto::node::{DesiredModulesResponse, FailureReport, ReconcileResult};
use powernode_proto::paths;

use super::shared::{lock, Shared};

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

pub(crate) fn reconcile_result(
    error: Option<FailureReport>,
    reboot_required: Vec<String>,
) -> ReconcileResult {
    ReconcileResult {
        at: now_rfc3339(),
        ok: error.is_none(),
        error,
        reboot_required,
    }
}

/// Records a reconcile's result for the heartbeats; a failure keeps the last known
/// reboot_required.
pub(crate) fn record_reconcile(
    shared: &Shared,
    result: &Result<crate::module_reconcile::ReconcileOutcome, FailureReport>,
) {
    let mut last = lock(&shared.last_reconcile);
    let previous = last
        .as_ref()
        .map(|r| r.reboot_required.clone())
        .unwrap_or_default();
    *last = Some(match result {
        Ok(outcome) => reconcile_result(None, outcome.reboot_required.clone()),
        Err(failure) => reconcile_result(Some(failure.clone()), previous),
    });
}

/// Reconciles every `reconcile_every` heartbeat intervals; the result rides on the
/// next heartbeats. Runs apart from the heartbeat so a long pull never silences it.
pub(crate) async fn reconcile_loop(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(shared.interval() * shared.opts.reconcile_every.max(1)).await;
        let desired = match shared
            .client()
            .get::<DesiredModulesResponse>(paths::DESIRED_MODULES)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                if shared.stop_if_terminal(&e).await {
                    return;
                }
                tracing::warn!(error = %crate::error_chain(&e), "fetching desired modules failed");
                continue;
            }
        };
        let result = shared.reconciler.reconcile(&desired).await;
        match &result {
            Ok(o) if o.changed() => {
                tracing::info!(attached = o.attached.len(), updated = o.updated.len(),
                detached = o.detached.len(), reboot_required = ?o.reboot_required, "modules reconciled")
            }
            Ok(_) => {}
            Err(failure) => {
                tracing::warn!(code = %failure.code, message = %failure.message, "module reconcile failed")
            }
        }
        record_reconcile(&shared, &result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_proto::node::Phase;
    use powernode_proto::ErrorCode;

    #[test]
    fn reconcile_results_are_stamped_rfc3339() {
        let ok = reconcile_result(None, vec![]);
        assert!(ok.ok && ok.error.is_none());
        let at =
            time::OffsetDateTime::parse(&ok.at, &time::format_description::well_known::Rfc3339)
                .unwrap();
        assert!((time::OffsetDateTime::now_utc() - at).whole_seconds().abs() < 5);
        let failed = reconcile_result(
            Some(FailureReport {
                phase: Phase::ModulesVerified,
                code: ErrorCode::DigestMismatch,
                message: "x".into(),
                attempt: 1,
                recovery: None,
            }),
            vec!["base".into()],
        );
        assert!(!failed.ok);
        assert_eq!(
            serde_json::to_value(&failed).unwrap()["reboot_required"],
            serde_json::json!(["base"])
        );
        assert!(serde_json::to_value(&ok)
            .unwrap()
            .get("reboot_required")
            .is_none());
        assert_eq!(
            serde_json::to_value(&failed).unwrap()["error"]["code"],
            "digest_mismatch"
        );
    }
}
