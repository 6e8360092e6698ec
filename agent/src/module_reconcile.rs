//! The module reconcile seam between the node loop ([`crate::node_loop`]) and the
//! module runtime ([`crate::modules::module_runtime`]): what is running (for
//! heartbeats) and how to move it to what the control plane wants. The node loop
//! calls [`ModuleReconciler::reconcile`] before it reports `ready` (DESIGN:
//! `phase=ready` after the first good reconcile) and periodically afterwards; the
//! module runtime plugs in by implementing this trait, [`NoModules`] stands in
//! without one.

use std::future::Future;
use std::pin::Pin;

use powernode_proto::node::{DesiredModulesResponse, FailureReport, Phase, RunningModule};
use powernode_proto::ErrorCode;

/// One module a reconcile changed; `from` is the digest it replaced (an update).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModuleChange {
    pub name: String,
    pub version: String,
    pub digest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// What a reconcile did (the result of a `module_update` task).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileOutcome {
    pub attached: Vec<ModuleChange>,
    pub updated: Vec<ModuleChange>,
    pub detached: Vec<ModuleChange>,
    /// Runtime modules already at their desired digest.
    pub unchanged: Vec<String>,
    /// Root modules whose change waits for a reboot (never applied live).
    pub reboot_required: Vec<String>,
}

impl ReconcileOutcome {
    pub fn changed(&self) -> bool {
        !(self.attached.is_empty() && self.updated.is_empty() && self.detached.is_empty())
    }
}

pub type ReconcileFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ReconcileOutcome, FailureReport>> + Send + 'a>>;

pub trait ModuleReconciler: Send + Sync {
    /// Modules running now, as heartbeats report them.
    fn running(&self) -> Vec<RunningModule>;
    /// Brings the node to `desired` and says what changed; `Err` carries the
    /// machine-readable reason that goes upstream (signature mismatch, OCI 404,
    /// digest mismatch...).
    fn reconcile<'a>(&'a self, desired: &'a DesiredModulesResponse) -> ReconcileFuture<'a>;
    /// The attached modules' drain steps, in the order a drain runs them (modules
    /// in reverse attach order, each one's steps in its order).
    fn drain_steps(&self) -> Vec<crate::drain::DrainStep> {
        Vec::new()
    }
    /// Gives up the reconciles in flight that have not started changing anything (a
    /// drain or reboot takes over): they end with `task_cancelled`. One already
    /// stopping services and swapping mounts finishes. Reconciles started later run.
    fn cancel_in_flight(&self) {}
}

/// A node without a module runtime: fine while nothing is desired, a clear
/// failure as soon as something is.
#[derive(Debug, Default)]
pub struct NoModules;

impl ModuleReconciler for NoModules {
    fn running(&self) -> Vec<RunningModule> {
        Vec::new()
    }

    fn reconcile<'a>(&'a self, desired: &'a DesiredModulesResponse) -> ReconcileFuture<'a> {
        Box::pin(async move {
            if desired.modules.is_empty() {
                return Ok(ReconcileOutcome::default());
            }
            let names: Vec<&str> = desired.modules.iter().map(|m| m.name.as_str()).collect();
            Err(FailureReport {
                phase: Phase::ModulesVerified,
                code: ErrorCode::Internal,
                message: format!(
                    "this agent runs without a module runtime but {} module(s) are desired: {}",
                    names.len(),
                    names.join(", ")
                ),
                attempt: 0,
                recovery: None,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_proto::node::DesiredModule;

    #[tokio::test]
    async fn no_modules_accepts_nothing_and_refuses_something() {
        let r = NoModules;
        assert!(r
            .reconcile(&DesiredModulesResponse::default())
            .await
            .is_ok());
        let desired = DesiredModulesResponse {
            modules: vec![DesiredModule {
                name: "base".into(),
                version: "1".into(),
                repository: "127.0.0.1:1/modules/base".into(),
                digest: "sha256:00".into(),
                kind: "root".into(),
            }],
            trust_keys: vec![],
        };
        let err = r.reconcile(&desired).await.unwrap_err();
        assert!(err.message.contains("base"), "{}", err.message);
        assert!(r.running().is_empty());
    }
}
