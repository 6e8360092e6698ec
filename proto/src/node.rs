//! Node API (`node_api`) and worker API (`worker_api`) bodies.
//!
//! Enrollment is authenticated by the bootstrap token; every other call by the client
//! certificate the enrollment returned. The certificate names the instance (subject CN
//! and a `urn:powernode:instance:<id>` URI SAN); bodies that carry an `instance_id`
//! must match it or the server answers `certificate_instance_mismatch`.

use serde::{Deserialize, Serialize};

use crate::{ErrorCode, InstanceStatus, TaskKind, TaskStatus, Timestamp};

/// URI SAN prefix binding a client certificate to an instance.
pub const INSTANCE_URI_PREFIX: &str = "urn:powernode:instance:";

/// `POST` [`crate::paths::ENROLLMENT`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentRequest {
    pub bootstrap_token: String,
    pub node_id: String,
    pub instance_id: String,
    /// PEM PKCS#10 request over an Ed25519 key; subject CN must be the instance id.
    pub csr_pem: String,
    /// Which identity strategy answered (`cmdline`, `fw_cfg`, `file`, `aws`, ...).
    pub identity_source: String,
    pub agent_version: String,
    /// What the provider's metadata said about this machine, when it said anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderFacts>,
}

/// Facts a cloud metadata service reports about the instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderFacts {
    pub provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentResponse {
    pub certificate_pem: String,
    /// The CA chain to keep pinning for the control plane.
    pub ca_pem: String,
    pub not_after: Timestamp,
    pub serial: String,
    pub node_id: String,
    pub instance_id: String,
    pub heartbeat_interval_seconds: u64,
}

/// The node's boot phases, in order. `ready` marks the instance `running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    KernelStart,
    InitStart,
    ModulesLoaded,
    NetworkUp,
    IdentityFound,
    Enrolled,
    ModulesVerified,
    RootMounted,
    AgentStarted,
    Ready,
    Draining,
    Drained,
    Failed,
}

/// One timeline entry: when a phase was reached, in milliseconds since kernel start
/// (CLOCK_BOOTTIME), so the operator sees where boot time went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub phase: Phase,
    pub at_ms: u64,
}

/// A failure the node reports upstream: which phase, a stable code, and detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureReport {
    pub phase: Phase,
    pub code: ErrorCode,
    pub message: String,
    /// How many times this phase has been tried so far.
    #[serde(default)]
    pub attempt: u32,
    /// What the operator can do about it, where the node knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<String>,
}

/// `POST` [`crate::paths::HANDSHAKE`]: the node says where it is in its boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeRequest {
    pub instance_id: String,
    pub phase: Phase,
    #[serde(default)]
    pub timeline: Vec<TimelineEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureReport>,
    pub agent_version: String,
    /// Facts about the composed root, as the agent sees them (e.g. `/` is overlay
    /// over composefs), so tests and operators never read the console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<RootFacts>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFacts {
    /// Filesystem type of `/` (from `/proc/self/mountinfo`).
    pub fstype: String,
    /// Mount options of `/`.
    pub options: String,
    /// Digests of the root modules composed into `/`.
    #[serde(default)]
    pub modules: Vec<String>,
    /// How the root's objects are protected: `require` (kernel fs-verity on every
    /// object, overlay `verity=require`) or `userspace` (re-hashed before mounting).
    /// Empty when `/` is not a composed root.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub verity: String,
    /// The object store under the root (`/persist/powernode/store` on a persistent
    /// node, `/run/powernode/store` on tmpfs).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub store: String,
    /// Where writes to `/` go: `tmpfs`, or the directory on `/persist` holding the
    /// overlay's upper and work directories.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub upper: String,
    /// What composing the root cost on this boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compose: Option<ComposeStats>,
    /// Who is PID 1 of the composed root: `systemd` (the agent is
    /// `powernode-agent.service`) or `agent`. Empty when `/` is not a composed root.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub init: String,
}

/// What the init did to compose the root on one boot: a second boot of a persistent
/// node with the same modules adds no object (only the signed manifests are fetched
/// again to re-check their signatures).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComposeStats {
    /// Bytes received from registries (manifests, signatures, layers).
    #[serde(default)]
    pub bytes_fetched: u64,
    /// Objects (file contents, composefs images) written into the store.
    #[serde(default)]
    pub objects_added: u64,
    #[serde(default)]
    pub bytes_added: u64,
    /// Objects on which fs-verity was enabled, and the time those ioctls took.
    #[serde(default)]
    pub verity_enabled: u64,
    #[serde(default)]
    pub verity_enable_ms: u64,
    /// Pull, verify and mount of the root modules, wall time.
    #[serde(default)]
    pub compose_ms: u64,
    /// Files of the composed root read in full before switch_root (each read is
    /// checked by the kernel when fs-verity is on).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checked: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeResponse {
    pub instance_status: InstanceStatus,
    pub heartbeat_interval_seconds: u64,
}

/// A module as the node runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningModule {
    pub name: String,
    pub version: String,
    /// Pinned OCI manifest digest (`sha256:...`).
    pub digest: String,
}

/// A supervised service's state, as reported in heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    pub name: String,
    pub module: String,
    /// `running`, `backoff` (crashed, waiting to restart), `stopping` (TERM sent),
    /// `stopped`, `failed` (could not start, or the restart policy gave up), `held`
    /// (declared while the node is drained: not started).
    pub state: String,
    /// Crash restarts since the service was declared.
    #[serde(default)]
    pub restarts: u32,
    /// The running process, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How the last process ended (`exit 1`, `signal 9`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
}

/// Result of the node's last reconcile pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileResult {
    pub at: Timestamp,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<FailureReport>,
    /// Root modules whose desired digest differs from what `/` was composed from
    /// (or that are desired while the initramfs is the root): applied by a reboot,
    /// never live.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reboot_required: Vec<String>,
}

/// `POST` [`crate::paths::HEARTBEAT`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub instance_id: String,
    pub phase: Phase,
    pub uptime_seconds: u64,
    pub agent_version: String,
    #[serde(default)]
    pub modules: Vec<RunningModule>,
    #[serde(default)]
    pub services: Vec<ServiceState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reconcile: Option<ReconcileResult>,
    /// The agent no longer takes work (a drain task was applied).
    #[serde(default)]
    pub cordoned: bool,
    /// systemd's state, when the agent runs under systemd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd: Option<SystemdState>,
}

/// What systemd says about the node (the agent is a systemd service on a root whose
/// `/sbin/init` is systemd).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemdState {
    /// `systemctl is-system-running`: `initializing`, `starting`, `running`,
    /// `degraded`, `maintenance`, `stopping`...
    pub state: String,
    /// Units in the `failed` state.
    #[serde(default)]
    pub failed_units: Vec<String>,
    /// `multi-user.target` is active: the boot reached its target.
    #[serde(default)]
    pub multi_user: bool,
    /// When it was reached, ms since kernel start (the boot timeline's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_user_at_ms: Option<u64>,
    /// When systemd started (its exec after switch_root), ms since kernel start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userspace_at_ms: Option<u64>,
    /// How often systemd restarted `powernode-agent.service` this boot.
    #[serde(default)]
    pub agent_restarts: u32,
}

impl SystemdState {
    /// A unit failed: the node runs, but not everything its root declares.
    pub fn degraded(&self) -> bool {
        self.state == "degraded" || !self.failed_units.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub instance_status: InstanceStatus,
    pub heartbeat_interval_seconds: u64,
    /// A node-side task is waiting: lease it now rather than at the next poll.
    #[serde(default)]
    pub tasks_pending: bool,
    /// The certificate expires within the renewal window: renew now.
    #[serde(default)]
    pub renew_certificate: bool,
}

/// A module the control plane wants on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredModule {
    pub name: String,
    pub version: String,
    /// OCI reference without tag, e.g. `10.0.2.2:8443/modules/base`.
    pub repository: String,
    /// Pinned manifest digest.
    pub digest: String,
    /// `root` (composed into `/`, changes need a reboot) or `runtime`.
    pub kind: String,
}

/// `GET` [`crate::paths::DESIRED_MODULES`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredModulesResponse {
    pub modules: Vec<DesiredModule>,
    /// PEM public keys module signatures must verify against.
    #[serde(default)]
    pub trust_keys: Vec<String>,
}

/// `POST` [`crate::paths::CERTIFICATE_RENEW`] (mTLS with the current certificate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewRequest {
    pub instance_id: String,
    pub csr_pem: String,
}

/// `POST` [`crate::paths::CERTIFICATE_REISSUE`]: a node whose certificate expired
/// (an outage longer than its life) asks for a new one for the same key. The CSR,
/// signed by that key, proves possession; the server answers with an
/// [`EnrollmentResponse`] or refuses (revoked, terminated, expired too long ago).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReissueRequest {
    pub instance_id: String,
    /// The expired certificate (PEM), as the server issued it.
    pub certificate_pem: String,
    /// A PKCS#10 request for the same public key, CN = instance id.
    pub csr_pem: String,
}

/// `POST` [`crate::paths::TASK_LEASE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub instance_id: String,
    /// How long the agent asks to hold the task before it must renew.
    pub lease_seconds: u64,
    /// Long poll: with nothing to lease, the server may hold the request this long
    /// (it caps it, see [`MAX_LEASE_WAIT_SECONDS`]) and answers as soon as a task is
    /// queued for the node. 0 or absent: answer at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub wait_seconds: u64,
}

/// The longest a server holds a long-polled lease: below common proxies' idle
/// timeouts, and what the agent's request timeout allows for.
pub const MAX_LEASE_WAIT_SECONDS: u64 = 25;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A task handed to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasedTask {
    pub task_id: String,
    pub kind: TaskKind,
    /// Kind-specific parameters, e.g. `{"timeout_seconds":300,"cordon_only":false}`.
    #[serde(default)]
    pub params: serde_json::Value,
    pub lease_expires_at: Timestamp,
    /// Opaque token that must accompany renew and complete.
    pub lease_token: String,
    /// The lease length the server granted (the asked length, capped by the
    /// server's maximum): the agent renews within it. Absent from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseResponse {
    /// `None` when there is nothing to do.
    pub task: Option<LeasedTask>,
}

/// `POST` `/worker_api/tasks/{id}/renew`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewLeaseRequest {
    pub instance_id: String,
    pub lease_token: String,
    pub lease_seconds: u64,
    /// Free-form progress for the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewLeaseResponse {
    pub lease_expires_at: Timestamp,
    /// The operator cancelled the task: stop and complete it as cancelled.
    #[serde(default)]
    pub cancelled: bool,
    /// The lease length granted by this renewal (see [`LeasedTask::lease_seconds`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_seconds: Option<u64>,
}

/// `POST` `/worker_api/tasks/{id}/complete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteTaskRequest {
    pub instance_id: String,
    pub lease_token: String,
    /// `succeeded`, `failed` or `cancelled`.
    pub status: TaskStatus,
    #[serde(default)]
    pub result: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteTaskResponse {
    pub task_id: String,
    pub status: TaskStatus,
    pub instance_status: InstanceStatus,
}

/// Manifest annotation carrying the fs-verity digest (`sha256:HEX`) of the module's
/// composefs image. It lives in the manifest, so the cosign signature over the
/// manifest digest covers it.
pub const COMPOSEFS_DIGEST_ANNOTATION: &str = "org.powernode.composefs.fsverity-digest";
/// Manifest annotations naming the module and its version.
pub const MODULE_NAME_ANNOTATION: &str = "org.powernode.module.name";
pub const MODULE_VERSION_ANNOTATION: &str = "org.powernode.module.version";
