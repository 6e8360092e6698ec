//! What the node loop's loops and tasks share: identity, client, certificate, the
//! node's status (phase, cordon) and the wake-ups between the loops. Under systemd
//! the cordon is kept in a file for the next agent of the same boot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use powernode_proto::node::{Phase, ReconcileResult};
use powernode_proto::IdentityDocument;
use tokio::sync::{mpsc, Notify};

use super::options::{AgentOptions, Exit};
use crate::backoff::Backoff;
use crate::client::{ApiClient, ClientError};
use crate::credentials::CertInfo;
use crate::module_reconcile::ModuleReconciler;
use crate::state::StateDir;
use crate::supervisor::Supervisor;

/// What the agent reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct NodeStatus {
    pub(crate) phase: Phase,
    pub(crate) cordoned: bool,
}

pub(crate) struct Shared {
    pub(crate) identity: IdentityDocument,
    pub(crate) opts: AgentOptions,
    pub(crate) state: StateDir,
    pub(crate) client: RwLock<ApiClient>,
    pub(crate) ca_pem: Mutex<String>,
    pub(crate) cert: Mutex<CertInfo>,
    pub(crate) status: Mutex<NodeStatus>,
    pub(crate) interval_secs: AtomicU64,
    pub(crate) supervisor: Arc<dyn Supervisor>,
    pub(crate) reconciler: Arc<dyn ModuleReconciler>,
    pub(crate) last_reconcile: Mutex<Option<ReconcileResult>>,
    /// What `/` is, as reported at handshake (for diagnostics).
    pub(crate) root: Option<powernode_proto::node::RootFacts>,
    pub(crate) wake_lease: Notify,
    pub(crate) wake_heartbeat: Notify,
    pub(crate) exit: mpsc::Sender<Exit>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(crate) fn client(&self) -> ApiClient {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Unix seconds by the server's clock as its answers tell it (the local clock
    /// until it first answers): what certificate dates are judged by.
    pub(crate) fn server_now(&self) -> i64 {
        self.client().server_clock().now()
    }

    /// [`Shared::server_now`] less the estimate's error: renewal is judged by it,
    /// so the node is never ahead of the server's renewal point.
    pub(crate) fn server_now_earliest(&self) -> i64 {
        self.client().server_clock().earliest_now()
    }

    pub(crate) fn instance_id(&self) -> &str {
        &self.identity.instance_id
    }

    pub(crate) fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_secs.load(Ordering::Relaxed).clamp(1, 3600))
    }

    pub(crate) fn set_interval(&self, secs: u64) {
        if (1..=3600).contains(&secs) {
            self.interval_secs.store(secs, Ordering::Relaxed);
        } else {
            tracing::warn!(
                secs,
                "ignoring out-of-range heartbeat interval from the server"
            );
        }
    }

    pub(crate) fn status(&self) -> NodeStatus {
        lock(&self.status).clone()
    }

    pub(crate) fn set_status(&self, f: impl FnOnce(&mut NodeStatus)) {
        let status = {
            let mut status = lock(&self.status);
            f(&mut status);
            status.clone()
        };
        if self.opts.systemd {
            save_cordon(&self.opts.cordon_file, &status);
        }
        self.wake_heartbeat.notify_one();
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(self.opts.backoff_base, self.opts.backoff_cap)
    }

    /// Stops the agent for good if `err` says the node's credentials are gone.
    pub(crate) async fn stop_if_terminal(&self, err: &ClientError) -> bool {
        match err.terminal_code() {
            Some(code) => {
                let message = match err {
                    ClientError::Refused { message, .. } => message.clone(),
                    other => other.to_string(),
                };
                let _ = self.exit.send(Exit::Terminal { code, message }).await;
                true
            }
            None => false,
        }
    }
}

/// Keeps the cordon (and the drain phase) for the next agent of this boot; a
/// status without cordon removes it. A failure is logged: the cost is a restarted
/// agent that forgets the cordon, as before.
fn save_cordon(path: &std::path::Path, status: &NodeStatus) {
    let result = if status.cordoned {
        serde_json::to_vec(status)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, path)
            })
    } else {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    };
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "keeping the cordon for a restart failed");
    }
}

/// The cordon an earlier agent of this boot left, if any (junk counts as none).
pub(crate) fn load_cordon(path: &std::path::Path) -> Option<NodeStatus> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice::<NodeStatus>(&bytes)
        .ok()
        .filter(|s| s.cordoned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cordon_is_kept_for_the_next_agent_and_dropped_with_the_uncordon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agent-cordon.json");
        assert_eq!(load_cordon(&path), None);
        let drained = NodeStatus {
            phase: Phase::Drained,
            cordoned: true,
        };
        save_cordon(&path, &drained);
        assert_eq!(load_cordon(&path), Some(drained));
        save_cordon(
            &path,
            &NodeStatus {
                phase: Phase::Ready,
                cordoned: false,
            },
        );
        assert!(!path.exists());
        std::fs::write(&path, b"junk").unwrap();
        assert_eq!(load_cordon(&path), None);
    }
}
