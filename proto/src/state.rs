//! Lifecycle states and the transition rules both sides rely on.

use serde::{Deserialize, Serialize};

/// A Node's lifecycle class; immutable once an instance has been provisioned into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleClass {
    /// Gets a `/persist` disk; the module store and the node key survive reboots.
    Persistent,
    /// tmpfs only.
    Ephemeral,
    /// tmpfs only, and the provider may reclaim it at any time.
    Spot,
}

impl LifecycleClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Persistent => "persistent",
            Self::Ephemeral => "ephemeral",
            Self::Spot => "spot",
        }
    }
}

impl std::str::FromStr for LifecycleClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "persistent" => Ok(Self::Persistent),
            "ephemeral" => Ok(Self::Ephemeral),
            "spot" => Ok(Self::Spot),
            other => Err(format!(
                "unknown lifecycle class {other:?} (persistent, ephemeral or spot)"
            )),
        }
    }
}

/// Instance states: `pending -> provisioning -> bootstrapping -> running -> draining
/// -> terminating -> terminated`, plus `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    Pending,
    Provisioning,
    Bootstrapping,
    Running,
    Draining,
    Terminating,
    Terminated,
    Failed,
}

impl InstanceStatus {
    pub const ALL: [InstanceStatus; 8] = [
        Self::Pending,
        Self::Provisioning,
        Self::Bootstrapping,
        Self::Running,
        Self::Draining,
        Self::Terminating,
        Self::Terminated,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Provisioning => "provisioning",
            Self::Bootstrapping => "bootstrapping",
            Self::Running => "running",
            Self::Draining => "draining",
            Self::Terminating => "terminating",
            Self::Terminated => "terminated",
            Self::Failed => "failed",
        }
    }

    /// A live instance holds provider resources or credentials; a Node with one
    /// cannot be deleted or provisioned again.
    pub fn is_live(self) -> bool {
        !matches!(self, Self::Terminated | Self::Failed)
    }

    /// The transition table. Anything not listed is refused with
    /// `invalid_transition`. `failed` is reachable from every live state; a failed
    /// instance can still be terminated so its credentials are revoked.
    pub fn can_transition_to(self, to: InstanceStatus) -> bool {
        use InstanceStatus::*;
        match (self, to) {
            (Pending, Provisioning)
            | (Provisioning, Bootstrapping)
            | (Bootstrapping, Running)
            | (Running, Draining)
            | (Bootstrapping, Draining)
            | (Draining, Running) // uncordon (cancel of a drain task)
            | (Draining, Terminating)
            | (Terminating, Terminated) => true,
            // terminate without drain: allowed from any live state before running, and
            // from running/bootstrapping only with --force (enforced by the server).
            (Pending | Provisioning | Bootstrapping | Running | Failed, Terminating) => true,
            (from, Failed) => from.is_live(),
            _ => false,
        }
    }
}

impl std::fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for InstanceStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown instance status {s:?}"))
    }
}

/// What a task does. Server-side kinds (`provision`, `terminate`) are run by the
/// provider; node-side kinds are leased by the agent through the worker API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Provision,
    Terminate,
    Drain,
    ModuleUpdate,
    Reboot,
    CollectDiagnostics,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provision => "provision",
            Self::Terminate => "terminate",
            Self::Drain => "drain",
            Self::ModuleUpdate => "module_update",
            Self::Reboot => "reboot",
            Self::CollectDiagnostics => "collect_diagnostics",
        }
    }

    /// Whether the agent leases this kind (otherwise the server's provider runs it).
    pub fn is_node_side(self) -> bool {
        !matches!(self, Self::Provision | Self::Terminate)
    }
}

impl std::str::FromStr for TaskKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Self::Provision,
            Self::Terminate,
            Self::Drain,
            Self::ModuleUpdate,
            Self::Reboot,
            Self::CollectDiagnostics,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| format!("unknown task kind {s:?}"))
    }
}

/// Task states. A task is `pending` until leased (node-side) or started
/// (server-side), `running` while a lease or the provider holds it, then one of the
/// final states. A lease that expires puts a node-side task back to `pending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl std::str::FromStr for TaskStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Self::Pending,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| format!("unknown task status {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::InstanceStatus::*;
    use super::*;

    #[test]
    fn happy_path_is_allowed() {
        let path = [
            Pending,
            Provisioning,
            Bootstrapping,
            Running,
            Draining,
            Terminating,
            Terminated,
        ];
        for w in path.windows(2) {
            assert!(w[0].can_transition_to(w[1]), "{} -> {}", w[0], w[1]);
        }
    }

    #[test]
    fn terminal_states_go_nowhere_but_failed_can_be_terminated() {
        for to in InstanceStatus::ALL {
            assert!(!Terminated.can_transition_to(to), "terminated -> {to}");
        }
        assert!(Failed.can_transition_to(Terminating));
        assert!(!Failed.can_transition_to(Running));
        assert!(!Running.can_transition_to(Pending));
        assert!(!Pending.can_transition_to(Running));
    }

    #[test]
    fn status_strings_round_trip() {
        for st in InstanceStatus::ALL {
            assert_eq!(st.as_str().parse::<InstanceStatus>().unwrap(), st);
        }
        assert!("bogus".parse::<InstanceStatus>().is_err());
    }
}
