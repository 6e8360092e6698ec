//! Admin API bodies: one request / response pair per runbook action. Responses wrap
//! their object in a named field (`{"node": {...}}`, `{"instance": {...}}`), as the
//! platform's runbook shows them.

use serde::{Deserialize, Serialize};

use crate::{InstanceStatus, LifecycleClass, TaskKind, TaskStatus, Timestamp};

/// `status` of a Node that has no live instance.
pub const NODE_NO_INSTANCE: &str = "no_instance";

/// `POST` [`crate::paths::ADMIN_NODES`] (`system_create_node`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateNodeRequest {
    pub hostname: String,
    #[serde(default = "default_template")]
    pub template_id: String,
    pub lifecycle_class: LifecycleClass,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

pub fn default_template() -> String {
    "tmpl-edge-base".to_string()
}

/// A logical Node. `status` is the live instance's status, or `no_instance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub hostname: String,
    pub status: String,
    pub template_id: String,
    pub lifecycle_class: LifecycleClass,
    /// True once any instance was provisioned: `lifecycle_class` is then fixed.
    pub lifecycle_class_locked: bool,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_instance_id: Option<String>,
    /// Every instance this Node has had, newest first.
    #[serde(default)]
    pub instance_history: Vec<String>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeResponse {
    pub node: Node,
}

/// `PATCH` `/nodes/{id}`: only `lifecycle_class` and `labels` can change, and the
/// class only before the first provision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateNodeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle_class: Option<LifecycleClass>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteNodeResponse {
    pub deleted: bool,
    pub node_id: String,
}

/// The catalog (`system_list_templates`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub id: String,
    pub name: String,
    pub platform: String,
    pub arch: String,
    pub default_region: String,
    pub default_instance_type: String,
    /// Module names composed into the root.
    #[serde(default)]
    pub root_modules: Vec<String>,
    #[serde(default)]
    pub runtime_modules: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceType {
    pub id: String,
    pub vcpus: u32,
    pub memory_mb: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub templates: Vec<Template>,
    pub platforms: Vec<String>,
    pub architectures: Vec<String>,
    pub regions: Vec<String>,
    pub instance_types: Vec<InstanceType>,
}

/// `POST` `/nodes/{id}/provision` (`system_provision_instance`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// The most Nodes one `provision-cluster` call makes (the runbook's cap).
pub const MAX_CLUSTER_COUNT: u32 = 50;

/// `POST` [`crate::paths::ADMIN_CLUSTERS`]: `count` Nodes of one template, each
/// provisioned at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionClusterRequest {
    #[serde(default = "default_template")]
    pub template_id: String,
    pub count: u32,
    /// Hostnames are `PREFIX-1` .. `PREFIX-N`; default `node-` and 6 random hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname_prefix: Option<String>,
    /// Default `ephemeral`: a fleet's usual member.
    #[serde(default = "ephemeral")]
    pub lifecycle_class: LifecycleClass,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

fn ephemeral() -> LifecycleClass {
    LifecycleClass::Ephemeral
}

/// One Node of a cluster, provisioned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMember {
    pub node_id: String,
    pub hostname: String,
    pub instance_id: String,
    pub task_id: String,
}

/// What `provision-cluster` made: every member, and the error that stopped it
/// early (the members made before it stay, each a Node with its instance).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvisionClusterResponse {
    pub members: Vec<ClusterMember>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ClusterError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterError {
    /// The hostname whose creation or provision failed.
    pub hostname: String,
    pub code: crate::ErrorCode,
    pub message: String,
}

/// A stuck-state finding: which threshold was crossed and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StuckInfo {
    pub status: InstanceStatus,
    /// Seconds spent in the state (or since the last heartbeat, for `running`).
    pub for_seconds: u64,
    pub threshold_seconds: u64,
    /// Stable machine-readable name, e.g. `pending_too_long`.
    pub reason: String,
    /// What the operator should do, e.g. `cancel-task then provision-instance again`.
    pub recovery: String,
}

/// A systemd root that did not come up whole: failed units and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemdDegraded {
    /// Stable machine-readable name: `systemd_degraded`.
    pub reason: String,
    pub state: String,
    pub failed_units: Vec<String>,
    pub recovery: String,
}

/// An instance (`system_get_instance`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub node_id: String,
    pub status: InstanceStatus,
    /// The task that drives the current state (provision, drain, terminate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    pub instance_type: String,
    pub region: String,
    pub provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_source: Option<String>,
    /// Agent version from the last enrollment, handshake or heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// What the provider's metadata told the node at enrollment, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_facts: Option<crate::node::ProviderFacts>,
    /// Uptime from the last heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<u64>,
    /// Last phase the node reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<crate::node::Phase>,
    #[serde(default)]
    pub boot_timeline: Vec<crate::node::TimelineEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<crate::node::FailureReport>,
    /// Failures the node reported with its bootstrap token before it had
    /// credentials, oldest first (the last [`crate::boot_report::KEPT_PER_INSTANCE`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boot_reports: Vec<crate::boot_report::BootReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<crate::node::RootFacts>,
    #[serde(default)]
    pub modules: Vec<crate::node::RunningModule>,
    #[serde(default)]
    pub services: Vec<crate::node::ServiceState>,
    #[serde(default)]
    pub cordoned: bool,
    /// The node's last reconcile pass, as its last heartbeat reported it (root modules
    /// waiting for a reboot in `reboot_required`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reconcile: Option<crate::node::ReconcileResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stuck: Option<StuckInfo>,
    /// systemd's state from the last heartbeat, on a systemd root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd: Option<crate::node::SystemdState>,
    /// Set while systemd reports a failed unit (or `degraded`): what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd_degraded: Option<SystemdDegraded>,
    pub status_changed_at: Timestamp,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceResponse {
    pub instance: Instance,
}

/// Answer to provision: the new instance and its provision task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvisionResponse {
    pub instance: Instance,
    pub task_id: String,
}

/// A task (`system_get_task`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub instance_id: String,
    pub kind: TaskKind,
    pub status: TaskStatus,
    #[serde(default)]
    pub params: serde_json::Value,
    #[serde(default)]
    pub result: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<Timestamp>,
    /// How many times the task was leased (a lease that expired requeues it).
    #[serde(default)]
    pub attempts: u32,
    /// Earlier attempts that ended without completing (a lease that expired because
    /// the agent died), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<TaskAttempt>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// One attempt of a node-side task that did not finish it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskAttempt {
    pub attempt: u32,
    pub leased_at: Timestamp,
    pub ended_at: Timestamp,
    /// `lease_expired` (the agent stopped renewing) or `superseded`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub result: serde_json::Value,
}

/// `POST` `/instances/{id}/reboot` (`system_reboot_instance`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootRequest {
    /// Free text for the audit trail; default `operator`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long the agent may take to stop services before rebooting.
    #[serde(default = "default_reboot_drain_timeout")]
    pub drain_timeout_seconds: u64,
}

pub fn default_reboot_drain_timeout() -> u64 {
    60
}

/// `POST` `/instances/{id}/collect_diagnostics` (`system_collect_diagnostics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectDiagnosticsRequest {
    /// Last log lines per source the agent includes.
    #[serde(default = "default_log_lines")]
    pub log_lines: u32,
}

impl Default for CollectDiagnosticsRequest {
    fn default() -> Self {
        Self {
            log_lines: default_log_lines(),
        }
    }
}

pub fn default_log_lines() -> u32 {
    100
}

/// Largest task result the server keeps, as serialized JSON; a larger one is replaced
/// by `{"truncated": true, "original_bytes": N, "preview": "..."}`.
pub const MAX_TASK_RESULT_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResponse {
    pub task: Task,
}

/// `POST` `/instances/{id}/drain` (`system_drain_instance`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRequest {
    #[serde(default = "default_drain_timeout")]
    pub timeout_seconds: u64,
    #[serde(default)]
    pub cordon_only: bool,
}

pub fn default_drain_timeout() -> u64 {
    300
}

/// `{task_id, status: "draining"}` / `{task_id, status: "terminating"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionResponse {
    pub task_id: String,
    pub status: InstanceStatus,
}

/// `POST` `/instances/{id}/terminate` (`system_terminate_instance`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminateRequest {
    /// Terminate without a completed drain.
    #[serde(default)]
    pub force: bool,
}

/// One difference between desired and running modules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftItem {
    pub module: String,
    /// `attach`, `detach` or `update`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_digest: Option<String>,
    /// `root` (composed into `/`) or `runtime`; absent from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// A root module change is applied by a reboot, never live.
    #[serde(default)]
    pub reboot_required: bool,
}

/// `system_drift_report`: `{drift: false}` when desired equals running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftReport {
    pub drift: bool,
    pub instance_id: String,
    #[serde(default)]
    pub items: Vec<DriftItem>,
    /// Some item concerns a root module: only a reboot applies it.
    #[serde(default)]
    pub reboot_required: bool,
    /// What to do, e.g. `reboot-instance ID`; absent without drift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<String>,
}

/// `attribute-failure`: what went wrong, when, and the changes that could explain it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureAttribution {
    pub instance_id: String,
    pub failure: AttributedFailure,
    pub lookback_hours: u64,
    /// Start of the window searched (`failure.at` minus the lookback).
    pub window_start: Timestamp,
    /// Best explanation first.
    pub candidates: Vec<AttributionCandidate>,
}

/// The failure being explained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttributedFailure {
    pub at: Timestamp,
    pub status: InstanceStatus,
    /// `failure_report`, `stuck`, `silent`, `failed_task` or `none` (nothing wrong yet:
    /// the window ends now).
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<crate::ErrorCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One change in the window, with why it may (or may not) explain the failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttributionCandidate {
    pub rank: u32,
    /// 0..=100, higher is likelier (ranks follow the unclamped score).
    pub score: u32,
    /// `module_published`, `template_modules_changed`, `module_update_task`,
    /// `drift_detected`, `reboot_task`.
    pub change: String,
    pub at: Timestamp,
    pub minutes_before_failure: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// `root` or `runtime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub reasoning: String,
}

/// A sensor finding (`system_recent_signals`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    pub id: i64,
    /// `instance.silent`, `instance.stuck`, `module.drift_detected`,
    /// `bootstrap.failed`, `bootstrap.reported` (a boot report before enrollment),
    /// `instance.silent_cleared`.
    pub kind: String,
    pub instance_id: String,
    pub at: Timestamp,
    /// True while the condition still holds.
    pub active: bool,
    #[serde(default)]
    pub detail: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalsResponse {
    pub signals: Vec<Signal>,
}

/// An audit event: every state change, enrollment, provider action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: i64,
    pub at: Timestamp,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(default)]
    pub detail: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsResponse {
    pub events: Vec<Event>,
}
