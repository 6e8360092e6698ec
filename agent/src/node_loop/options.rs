//! What the caller gives the node loop (options, the hooks it drives) and how
//! a run ends.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use powernode_proto::node::DesiredModulesResponse;
use powernode_proto::ErrorCode;

use crate::client::{ApiClient, Timeouts};
use crate::module_reconcile::{ModuleReconciler, NoModules};
use crate::supervisor::Supervisor;

/// Default [`AgentOptions::cordon_file`].
pub const CORDON_FILE: &str = "/run/powernode/agent-cordon.json";

/// Tunables; the defaults suit production, tests shorten them.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub state_dir: PathBuf,
    /// How long a lease is asked for; renewed every third of it.
    pub lease_seconds: u64,
    pub timeouts: Timeouts,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Heartbeat spread, as a fraction of the interval (±).
    pub jitter: f64,
    /// Grace given to services when the agent itself stops.
    pub stop_grace: Duration,
    /// Steady-state reconcile period, in heartbeat intervals.
    pub reconcile_every: u32,
    /// Fallback task poll period, in heartbeat intervals, for a server that answers a
    /// lease at once (no long poll); a heartbeat answer with `tasks_pending` wakes the
    /// lease loop too, so this can be slow.
    pub lease_poll_every: u32,
    /// Long poll: how long the server may hold a lease request while nothing is
    /// queued (it caps it at `MAX_LEASE_WAIT_SECONDS`), so a task reaches the node
    /// as soon as it is queued, whatever the heartbeat interval. 0: plain polling.
    pub lease_wait_seconds: u64,
    /// Where the facts about `/` reported at handshake come from.
    pub mountinfo: PathBuf,
    /// Digests of the root modules composed into `/` (set by the init after
    /// switch_root), reported with the root facts.
    pub root_modules: Vec<String>,
    /// What the init composed `/` on (store, verity mode, upper, compose cost),
    /// merged into the root facts read from mountinfo.
    pub root_facts: Option<powernode_proto::node::RootFacts>,
    /// The agent may reboot the machine (it is PID 1): a `reboot` task ends the run
    /// with [`Exit::Reboot`]. Elsewhere reboot tasks fail as unsupported.
    pub can_reboot: bool,
    /// Collect-diagnostics includes the last kernel log lines (`/dev/kmsg`, where the
    /// init logs).
    pub kmsg_log: bool,
    /// An mTLS client for the stored credentials that is already connected (the
    /// init's bootstrap made it): its warm connection saves a TLS handshake on the
    /// way to `ready`. Used only when the stored credentials are reused and it talks
    /// to the identity's control plane.
    pub client: Option<ApiClient>,
    /// The desired set the init fetched a moment ago (to decide on root modules):
    /// it serves the first reconcile instead of asking again.
    pub first_desired: Option<DesiredModulesResponse>,
    /// The agent is a systemd service (`Type=notify`): it tells systemd `READY=1`
    /// after the handshake, pings its watchdog (`WatchdogSec=`), reports systemd's
    /// state in heartbeats and diagnostics, and leaves the services (systemd units)
    /// running when it stops.
    pub systemd: bool,
    /// Under systemd: where the cordon outlives an agent restart (a tmpfs, so a
    /// reboot clears it), so a restarted agent on a drained node holds its
    /// services instead of starting them again.
    pub cordon_file: PathBuf,
}

impl AgentOptions {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            lease_seconds: 30,
            timeouts: Timeouts::default(),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            jitter: 0.1,
            stop_grace: Duration::from_secs(10),
            reconcile_every: 10,
            lease_poll_every: 5,
            lease_wait_seconds: 20,
            mountinfo: PathBuf::from(powernode_sysfmt::mountinfo::PATH),
            root_modules: Vec::new(),
            root_facts: None,
            can_reboot: false,
            kmsg_log: false,
            client: None,
            first_desired: None,
            systemd: false,
            cordon_file: PathBuf::from(CORDON_FILE),
        }
    }
}

/// What the node loop drives on the node: services and modules.
#[derive(Clone)]
pub struct Hooks {
    pub supervisor: Arc<dyn Supervisor>,
    pub reconciler: Arc<dyn ModuleReconciler>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks").finish_non_exhaustive()
    }
}

impl Default for Hooks {
    fn default() -> Self {
        Self {
            supervisor: Arc::new(crate::supervisor::NoServices),
            reconciler: Arc::new(NoModules),
        }
    }
}

/// How the agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop (signal).
    Stopped,
    /// The control plane refused this node for good; `code` says why.
    Terminal { code: ErrorCode, message: String },
    /// A reboot task completed: services are stopped, the caller (PID 1) syncs and
    /// reboots.
    Reboot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_defaults_are_sane() {
        let o = AgentOptions::new("/tmp/x");
        assert!(o.lease_seconds >= 3 && o.reconcile_every >= 1 && o.lease_poll_every >= 1);
        assert!(o.backoff_cap >= o.backoff_base);
    }
}
