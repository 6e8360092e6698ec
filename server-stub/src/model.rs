//! The server's records and the in-memory state they live in.
//!
//! Memory is the authority while the server runs: every read is served from it and
//! every change is made to it first, then written to SQLite (see [`crate::store`]);
//! a change whose write fails is put back ([`Table`] remembers what it replaced).
//! Changes other than routine heartbeats are written before the API answers;
//! heartbeats mark their instance dirty and a flusher writes them in batches.

use std::collections::{BTreeMap, HashSet};

use powernode_proto::admin::{self, StuckInfo};
use powernode_proto::node::{
    FailureReport, Phase, ProviderFacts, RootFacts, RunningModule, ServiceState, SystemdState,
    TimelineEntry,
};
use powernode_proto::{InstanceStatus, LifecycleClass, TaskKind, TaskStatus};
use serde::{Deserialize, Serialize};

use crate::clock::{format_ts, Millis};
use crate::config::StuckThresholds;

mod table;
pub use table::{Before, Table};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRec {
    pub id: String,
    pub hostname: String,
    pub template_id: String,
    pub lifecycle_class: LifecycleClass,
    pub lifecycle_class_locked: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub current_instance_id: Option<String>,
    /// Newest first.
    #[serde(default)]
    pub instance_history: Vec<String>,
    pub created_ms: Millis,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstRec {
    pub id: String,
    pub node_id: String,
    pub status: InstanceStatus,
    pub task_id: Option<String>,
    pub instance_type: String,
    pub region: String,
    pub provider: String,
    pub last_heartbeat_ms: Option<Millis>,
    pub enrolled_ms: Option<Millis>,
    pub identity_source: Option<String>,
    pub agent_version: Option<String>,
    pub provider_facts: Option<ProviderFacts>,
    pub phase: Option<Phase>,
    #[serde(default)]
    pub boot_timeline: Vec<TimelineEntry>,
    pub failure: Option<FailureReport>,
    pub root: Option<RootFacts>,
    #[serde(default)]
    pub modules: Vec<RunningModule>,
    #[serde(default)]
    pub services: Vec<ServiceState>,
    #[serde(default)]
    pub cordoned: bool,
    #[serde(default)]
    pub last_reconcile: Option<powernode_proto::node::ReconcileResult>,
    #[serde(default)]
    pub uptime_seconds: u64,
    pub status_changed_ms: Millis,
    pub created_ms: Millis,
    pub terminated_ms: Option<Millis>,
    /// Ids of this instance's tasks, oldest first.
    #[serde(default)]
    pub task_ids: Vec<String>,
    /// Sensor state: the active signal for each condition, so it fires once and is
    /// cleared once.
    #[serde(default)]
    pub silent_signal: Option<i64>,
    #[serde(default)]
    pub stuck_signal: Option<(String, i64)>,
    #[serde(default)]
    pub drift_signal: Option<i64>,
    #[serde(default)]
    pub bootstrap_failed_signal: Option<i64>,
    /// Boot reports the node sent with its bootstrap token, oldest first (the last
    /// `proto::boot_report::KEPT_PER_INSTANCE`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boot_reports: Vec<powernode_proto::boot_report::BootReport>,
    /// The active `bootstrap.reported` signal and when the report came: cleared once
    /// the node enrolled after it, or the instance is no longer live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_report_signal: Option<(i64, Millis)>,
    /// [`crate::drift::key`] of the drift the active drift signal reported.
    #[serde(default)]
    pub drift_key: String,
    /// Last time a call with this instance's withdrawn credentials was refused (the
    /// `instance.refused` signal fires at most once a minute).
    #[serde(default)]
    pub last_refused_ms: Option<Millis>,
    /// systemd's state from the last heartbeat that carried one.
    #[serde(default)]
    pub systemd: Option<SystemdState>,
    /// The active `instance.systemd_degraded` signal.
    #[serde(default)]
    pub systemd_signal: Option<i64>,
    /// When the node was handed a reboot task (cleared once it came back): the VM
    /// watcher's `vm.rebooted` says whether a reset was that task's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot_expected_ms: Option<Millis>,
    /// Set while the provision waits for provider quota: which limit, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for_quota: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRec {
    pub id: String,
    pub instance_id: String,
    pub kind: TaskKind,
    pub status: TaskStatus,
    #[serde(default)]
    pub params: serde_json::Value,
    #[serde(default)]
    pub result: serde_json::Value,
    pub progress: Option<String>,
    pub lease_token: Option<String>,
    pub lease_expires_ms: Option<Millis>,
    #[serde(default)]
    pub attempts: u32,
    /// When the current lease was granted.
    #[serde(default)]
    pub leased_ms: Option<Millis>,
    /// Attempts that ended without completing the task, oldest first.
    #[serde(default)]
    pub history: Vec<admin::TaskAttempt>,
    pub created_ms: Millis,
    pub updated_ms: Millis,
}

impl InstRec {
    /// A new `pending` instance of `node_id`, nothing reported yet.
    pub fn new(
        id: String,
        node_id: String,
        instance_type: String,
        region: String,
        provider: String,
        now: Millis,
    ) -> Self {
        Self {
            id,
            node_id,
            status: InstanceStatus::Pending,
            task_id: None,
            instance_type,
            region,
            provider,
            last_heartbeat_ms: None,
            enrolled_ms: None,
            identity_source: None,
            agent_version: None,
            provider_facts: None,
            phase: None,
            boot_timeline: Vec::new(),
            failure: None,
            root: None,
            modules: Vec::new(),
            services: Vec::new(),
            cordoned: false,
            last_reconcile: None,
            uptime_seconds: 0,
            status_changed_ms: now,
            created_ms: now,
            terminated_ms: None,
            task_ids: Vec::new(),
            silent_signal: None,
            stuck_signal: None,
            drift_signal: None,
            bootstrap_failed_signal: None,
            boot_reports: Vec::new(),
            boot_report_signal: None,
            drift_key: String::new(),
            last_refused_ms: None,
            systemd: None,
            systemd_signal: None,
            reboot_expected_ms: None,
            waiting_for_quota: None,
        }
    }
}

impl TaskRec {
    /// A fresh task record (`pending` for node-side kinds until leased).
    pub fn new(
        id: String,
        instance_id: &str,
        kind: TaskKind,
        status: TaskStatus,
        params: serde_json::Value,
        now: Millis,
    ) -> Self {
        Self {
            id,
            instance_id: instance_id.to_string(),
            kind,
            status,
            params,
            result: serde_json::Value::Null,
            progress: None,
            lease_token: None,
            lease_expires_ms: None,
            attempts: u32::from(status == TaskStatus::Running),
            leased_ms: None,
            history: Vec::new(),
            created_ms: now,
            updated_ms: now,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRec {
    /// sha256 of the token, hex; the token itself is never stored here.
    pub hash: String,
    pub instance_id: String,
    pub node_id: String,
    pub created_ms: Millis,
    pub used_ms: Option<Millis>,
    /// Expired early (the instance was terminated or its provision cancelled).
    #[serde(default)]
    pub revoked: bool,
    /// A leased reboot task lets the used token enroll once more until then (an
    /// ephemeral node has no credentials left after a reboot).
    #[serde(default)]
    pub reenroll_until_ms: Option<Millis>,
    /// The certificate the token's last use issued: a retry with the same key gets
    /// it again (see `service::enrollment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertRec {
    pub serial: String,
    pub instance_id: String,
    pub issued_ms: Millis,
    pub not_after_ms: Millis,
    pub revoked: bool,
    /// SHA-256 (hex) of the certified public key, for certificates issued at
    /// enrollment (the PEM itself stays in SQLite, `certs.pem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
}

/// A signal or event waiting to be written.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: i64,
    pub at_ms: Millis,
    pub kind: String,
    pub node_id: Option<String>,
    pub instance_id: Option<String>,
    pub detail: serde_json::Value,
}

#[derive(Debug, Clone)]
pub struct NewSignal {
    pub id: i64,
    pub at_ms: Millis,
    pub kind: String,
    pub instance_id: String,
    pub active: bool,
    pub detail: serde_json::Value,
}

/// One write to SQLite.
#[derive(Debug, Clone)]
pub enum Op {
    Node(NodeRec),
    DeleteNode(String),
    Instance(Box<InstRec>),
    Task(TaskRec),
    Token(TokenRec),
    Cert(CertRec),
    /// The PEM of a certificate recorded by an `Op::Cert` before it (kept in SQLite
    /// only: an enrollment retry reads it back).
    CertPem {
        serial: String,
        pem: String,
    },
    Event(NewEvent),
    Signal(NewSignal),
    SignalActive {
        id: i64,
        active: bool,
    },
    ProviderRecord {
        instance_id: String,
        action: String,
        at_ms: Millis,
        doc: serde_json::Value,
    },
}

/// All state, guarded by one mutex in [`crate::service::Shared`].
#[derive(Debug, Default)]
pub struct Mem {
    pub nodes: Table<NodeRec>,
    pub instances: Table<InstRec>,
    pub tasks: Table<TaskRec>,
    pub tokens: Table<TokenRec>,
    pub certs: Table<CertRec>,
    /// Instances whose heartbeat state is newer in memory than in SQLite.
    pub dirty: HashSet<String>,
    pub next_event_id: i64,
    pub next_signal_id: i64,
    /// Writes produced by the current mutation, drained by the caller.
    pub ops: Vec<Op>,
}

/// The records a mutation changed, as they were before it (see [`Mem::record`]).
#[derive(Debug, Default)]
pub struct Undo {
    nodes: Before<NodeRec>,
    instances: Before<InstRec>,
    tasks: Before<TaskRec>,
    tokens: Before<TokenRec>,
    certs: Before<CertRec>,
}

impl Mem {
    /// Starts remembering each record before its first write, until
    /// [`Mem::finish_recording`].
    pub fn record(&mut self) {
        self.nodes.record();
        self.instances.record();
        self.tasks.record();
        self.tokens.record();
        self.certs.record();
    }

    pub fn finish_recording(&mut self) -> Undo {
        Undo {
            nodes: self.nodes.finish(),
            instances: self.instances.finish(),
            tasks: self.tasks.finish(),
            tokens: self.tokens.finish(),
            certs: self.certs.finish(),
        }
    }

    /// Puts back the records a mutation changed (its commit failed). Event and
    /// signal ids it took stay taken: a gap is harmless, a reused id is not. A
    /// restored instance is marked dirty, since it may carry heartbeat state that
    /// SQLite does not have yet.
    pub fn undo(&mut self, undo: Undo) {
        self.nodes.restore(undo.nodes);
        for id in self.instances.restore(undo.instances) {
            if self.instances.contains_key(&id) {
                self.dirty.insert(id);
            }
        }
        self.tasks.restore(undo.tasks);
        self.tokens.restore(undo.tokens);
        self.certs.restore(undo.certs);
    }

    pub fn save_node(&mut self, id: &str) {
        if let Some(n) = self.nodes.get(id) {
            self.ops.push(Op::Node(n.clone()));
        }
    }

    pub fn save_instance(&mut self, id: &str) {
        if let Some(i) = self.instances.get(id) {
            self.dirty.remove(id);
            self.ops.push(Op::Instance(Box::new(i.clone())));
        }
    }

    /// Records a certificate just issued to `instance_id` (enrollment or renewal).
    pub fn add_cert(&mut self, now: Millis, instance_id: &str, serial: &str, not_after_ms: Millis) {
        let cert = CertRec {
            serial: serial.to_string(),
            instance_id: instance_id.to_string(),
            issued_ms: now,
            not_after_ms,
            revoked: false,
            key_sha256: None,
        };
        self.ops.push(Op::Cert(cert.clone()));
        self.certs.insert(cert.serial.clone(), cert);
    }

    /// Records the certificate an enrollment issued (`cert.key_sha256` set), and its
    /// PEM in SQLite only: a retry of the same enrollment is answered from these.
    pub fn add_enrollment_cert(&mut self, cert: CertRec, pem: String) {
        self.ops.push(Op::Cert(cert.clone()));
        self.ops.push(Op::CertPem {
            serial: cert.serial.clone(),
            pem,
        });
        self.certs.insert(cert.serial.clone(), cert);
    }

    pub fn save_task(&mut self, id: &str) {
        if let Some(t) = self.tasks.get(id) {
            self.ops.push(Op::Task(t.clone()));
        }
    }

    pub fn event(
        &mut self,
        now: Millis,
        kind: &str,
        node_id: Option<&str>,
        instance_id: Option<&str>,
        detail: serde_json::Value,
    ) {
        self.next_event_id += 1;
        tracing::info!(kind, node_id, instance_id, %detail, "event");
        self.ops.push(Op::Event(NewEvent {
            id: self.next_event_id,
            at_ms: now,
            kind: kind.to_string(),
            node_id: node_id.map(str::to_string),
            instance_id: instance_id.map(str::to_string),
            detail,
        }));
    }

    /// Records a signal (and the matching event) and returns its id.
    pub fn signal(
        &mut self,
        now: Millis,
        kind: &str,
        instance_id: &str,
        active: bool,
        detail: serde_json::Value,
    ) -> i64 {
        self.next_signal_id += 1;
        let id = self.next_signal_id;
        let node_id = self.instances.get(instance_id).map(|i| i.node_id.clone());
        self.ops.push(Op::Signal(NewSignal {
            id,
            at_ms: now,
            kind: kind.to_string(),
            instance_id: instance_id.to_string(),
            active,
            detail: detail.clone(),
        }));
        self.event(now, kind, node_id.as_deref(), Some(instance_id), detail);
        id
    }

    /// Changes an instance's status (the caller checked the transition), with an
    /// event.
    pub fn set_status(&mut self, now: Millis, instance_id: &str, to: InstanceStatus) {
        let Some(inst) = self.instances.get_mut(instance_id) else {
            return;
        };
        let from = inst.status;
        inst.status = to;
        inst.status_changed_ms = now;
        if to == InstanceStatus::Terminated {
            inst.terminated_ms = Some(now);
        }
        let node_id = inst.node_id.clone();
        self.save_instance(instance_id);
        self.event(
            now,
            "instance.status_changed",
            Some(&node_id),
            Some(instance_id),
            serde_json::json!({"from": from, "to": to}),
        );
    }

    /// Revokes every certificate of the instance and expires its unused tokens.
    pub fn revoke_credentials(&mut self, now: Millis, instance_id: &str) {
        let serials: Vec<String> = self
            .certs
            .values()
            .filter(|c| c.instance_id == instance_id && !c.revoked)
            .map(|c| c.serial.clone())
            .collect();
        for serial in &serials {
            if let Some(c) = self.certs.get_mut(serial) {
                c.revoked = true;
                self.ops.push(Op::Cert(c.clone()));
            }
        }
        let hashes: Vec<String> = self
            .tokens
            .values()
            .filter(|t| t.instance_id == instance_id && !t.revoked)
            .map(|t| t.hash.clone())
            .collect();
        for h in &hashes {
            if let Some(t) = self.tokens.get_mut(h) {
                t.revoked = true;
                self.ops.push(Op::Token(t.clone()));
            }
        }
        if !serials.is_empty() || !hashes.is_empty() {
            let node_id = self.instances.get(instance_id).map(|i| i.node_id.clone());
            self.event(
                now,
                "credentials.revoked",
                node_id.as_deref(),
                Some(instance_id),
                serde_json::json!({"certificates": serials, "tokens": hashes.len()}),
            );
        }
    }

    /// The Node as the API shows it: `status` is the live instance's status or
    /// `no_instance`.
    /// The Node's current instance while it is live (holds resources or credentials).
    pub fn live_instance(&self, node: &NodeRec) -> Option<&InstRec> {
        node.current_instance_id
            .as_ref()
            .and_then(|id| self.instances.get(id))
            .filter(|i| i.status.is_live())
    }

    pub fn node_view(&self, node: &NodeRec) -> admin::Node {
        let status = self
            .live_instance(node)
            .map(|i| i.status.as_str().to_string())
            .unwrap_or_else(|| admin::NODE_NO_INSTANCE.to_string());
        admin::Node {
            id: node.id.clone(),
            hostname: node.hostname.clone(),
            status,
            template_id: node.template_id.clone(),
            lifecycle_class: node.lifecycle_class,
            lifecycle_class_locked: node.lifecycle_class_locked,
            labels: node.labels.clone(),
            current_instance_id: node.current_instance_id.clone(),
            instance_history: node.instance_history.clone(),
            created_at: format_ts(node.created_ms),
        }
    }

    /// The drain that drives a `draining` instance: its timeout and state.
    pub fn drain_state(&self, inst: &InstRec) -> Option<DrainState> {
        if inst.status != InstanceStatus::Draining {
            return None;
        }
        let t = inst
            .task_ids
            .iter()
            .rev()
            .filter_map(|id| self.tasks.get(id))
            .find(|t| t.kind == TaskKind::Drain)?;
        Some(DrainState {
            task_id: t.id.clone(),
            timeout_seconds: t.params["timeout_seconds"]
                .as_u64()
                .unwrap_or_else(admin::default_drain_timeout),
            created_ms: t.created_ms,
            status: t.status,
        })
    }

    /// Open node-side tasks of an instance waiting for a lease.
    pub fn has_pending_node_task(&self, inst: &InstRec) -> bool {
        inst.task_ids.iter().any(|id| {
            self.tasks
                .get(id)
                .is_some_and(|t| t.kind.is_node_side() && t.status == TaskStatus::Pending)
        })
    }
}

/// What [`stuck_info`] needs to know about the drain of a `draining` instance.
#[derive(Debug, Clone)]
pub struct DrainState {
    pub task_id: String,
    pub timeout_seconds: u64,
    pub created_ms: Millis,
    pub status: TaskStatus,
}

/// Slack past a drain's own timeout before the server calls it stuck: the agent
/// reports its outcome right at the deadline.
pub const DRAIN_TIMEOUT_GRACE_MS: Millis = 5_000;

/// `serving_since`: when this server process started (see [`stuck_info`]).
pub fn instance_view(
    inst: &InstRec,
    now: Millis,
    serving_since: Millis,
    thresholds: &StuckThresholds,
    drain: Option<&DrainState>,
) -> admin::Instance {
    admin::Instance {
        id: inst.id.clone(),
        node_id: inst.node_id.clone(),
        status: inst.status,
        task_id: inst.task_id.clone(),
        instance_type: inst.instance_type.clone(),
        region: inst.region.clone(),
        provider: inst.provider.clone(),
        last_heartbeat_at: inst.last_heartbeat_ms.map(format_ts),
        enrolled_at: inst.enrolled_ms.map(format_ts),
        identity_source: inst.identity_source.clone(),
        agent_version: inst.agent_version.clone(),
        provider_facts: inst.provider_facts.clone(),
        uptime_seconds: inst.last_heartbeat_ms.map(|_| inst.uptime_seconds),
        phase: inst.phase,
        boot_timeline: inst.boot_timeline.clone(),
        failure: inst.failure.clone(),
        boot_reports: inst.boot_reports.clone(),
        root: inst.root.clone(),
        modules: inst.modules.clone(),
        services: inst.services.clone(),
        cordoned: inst.cordoned,
        last_reconcile: inst.last_reconcile.clone(),
        stuck: stuck_info(inst, now, serving_since, thresholds, drain),
        waiting_for_quota: inst.waiting_for_quota.clone(),
        systemd: inst.systemd.clone(),
        systemd_degraded: systemd_degraded(inst),
        status_changed_at: format_ts(inst.status_changed_ms),
        created_at: format_ts(inst.created_ms),
        terminated_at: inst.terminated_ms.map(format_ts),
    }
}

pub fn task_view(t: &TaskRec) -> admin::Task {
    admin::Task {
        id: t.id.clone(),
        instance_id: t.instance_id.clone(),
        kind: t.kind,
        status: t.status,
        params: t.params.clone(),
        result: t.result.clone(),
        progress: t.progress.clone(),
        lease_expires_at: t.lease_expires_ms.map(format_ts),
        attempts: t.attempts,
        history: t.history.clone(),
        created_at: format_ts(t.created_ms),
        updated_at: format_ts(t.updated_ms),
    }
}

/// A live instance whose systemd reports a failed unit (or `degraded`): what failed
/// and what to do.
pub fn systemd_degraded(inst: &InstRec) -> Option<admin::SystemdDegraded> {
    let s = inst.systemd.as_ref().filter(|s| s.degraded())?;
    if !inst.status.is_live() {
        return None;
    }
    Some(admin::SystemdDegraded {
        reason: "systemd_degraded".into(),
        state: s.state.clone(),
        failed_units: s.failed_units.clone(),
        recovery: format!(
            "collect-diagnostics {}; the failed units are listed; fix the unit in the root \
             module and publish a new version",
            inst.id
        ),
    })
}

/// Whether the instance has crossed its state's threshold, and what to do. A missing
/// heartbeat counts from `serving_since` at the earliest: while this server was down
/// the node could not have reached it.
pub fn stuck_info(
    inst: &InstRec,
    now: Millis,
    serving_since: Millis,
    t: &StuckThresholds,
    drain: Option<&DrainState>,
) -> Option<StuckInfo> {
    // A drain that outlived its own --timeout-seconds is stuck before the generic
    // draining threshold: the operator asked for that bound.
    // A drain the agent gave up on (`failed`: a service would not stop in time) is
    // stuck at once.
    if let Some(d) = drain.filter(|d| {
        inst.status == InstanceStatus::Draining
            && (d.status == TaskStatus::Failed
                || (d.status != TaskStatus::Succeeded
                    && now - d.created_ms
                        > (d.timeout_seconds as i64).saturating_mul(1000) + DRAIN_TIMEOUT_GRACE_MS))
    }) {
        return Some(StuckInfo {
            status: inst.status,
            for_seconds: u64::try_from((now - d.created_ms).max(0) / 1000).unwrap_or(0),
            threshold_seconds: d.timeout_seconds,
            reason: "drain_timeout".to_string(),
            recovery: format!(
                "the drain (task {}, {}) did not finish within its {} s timeout: a service \
                 would not stop; terminate-instance {} --force ends it (or cancel-task {} to \
                 uncordon)",
                d.task_id,
                d.status.as_str(),
                d.timeout_seconds,
                inst.id,
                d.task_id
            ),
        });
    }
    let threshold = t.for_status(inst.status)?;
    let since = match inst.status {
        InstanceStatus::Bootstrapping => inst.enrolled_ms.unwrap_or(inst.status_changed_ms),
        InstanceStatus::Running => inst
            .last_heartbeat_ms
            .unwrap_or(inst.status_changed_ms)
            .max(inst.status_changed_ms)
            .max(serving_since),
        _ => inst.status_changed_ms,
    };
    let for_seconds = u64::try_from((now - since).max(0) / 1000).unwrap_or(0);
    if for_seconds <= threshold {
        return None;
    }
    let task = inst.task_id.as_deref().unwrap_or("<task>");
    let (reason, recovery) = match inst.status {
        InstanceStatus::Pending => match &inst.waiting_for_quota {
            Some(quota) => (
                "pending_provider_quota",
                format!(
                    "waiting for provider quota ({quota}): it starts when a provision in {} \
                     ends or an instance there is terminated; raise the limit (serve \
                     --quota-concurrent-provisions / --quota-instances-per-region) or \
                     cancel-task {task}",
                    inst.region
                ),
            ),
            None => (
                "pending_too_long",
                format!(
                    "the provider never started: cancel-task {task}, then provision-instance again"
                ),
            ),
        },
        InstanceStatus::Provisioning => (
            "provisioning_too_long",
            format!(
                "the VM never enrolled: check the provider and the VM console, then cancel-task {task} (or terminate-instance) and provision-instance again"
            ),
        ),
        InstanceStatus::Bootstrapping => (
            "bootstrapping_too_long",
            "enrolled but never reported ready: read boot_timeline and failure in get-instance, then terminate-instance --force and provision-instance again".to_string(),
        ),
        InstanceStatus::Running => (
            "running_without_heartbeat",
            "no heartbeat: check the VM and its network; drain-instance then terminate-instance, or terminate-instance --force".to_string(),
        ),
        InstanceStatus::Draining if drain.is_some_and(|d| d.status == TaskStatus::Succeeded) => (
            "draining_too_long",
            format!("drained and waiting: terminate-instance {}", inst.id),
        ),
        InstanceStatus::Draining => (
            "draining_too_long",
            format!("the drain did not finish: cancel-task {task} to uncordon, or terminate-instance --force"),
        ),
        InstanceStatus::Terminating => (
            "terminating_too_long",
            "the provider did not finish destroying the VM: run terminate-instance again".to_string(),
        ),
        InstanceStatus::Terminated | InstanceStatus::Failed => return None,
    };
    Some(StuckInfo {
        status: inst.status,
        for_seconds,
        threshold_seconds: threshold,
        reason: reason.to_string(),
        recovery,
    })
}

/// One published module version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModulePublication {
    pub id: String,
    pub name: String,
    pub version: String,
    /// `root` or `runtime` (what the publisher meant; templates decide).
    pub kind: String,
    /// `host[:port]` of an external registry; `None`: the embedded one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// Repository path inside the registry, e.g. `modules/base`.
    pub repository: String,
    /// Pinned manifest digest.
    pub digest: String,
    /// fs-verity digest of the module's composefs image (the manifest annotation).
    pub composefs_digest: String,
    /// Digest of the cosign signature manifest (tag `sha256-HEX.sig`).
    pub signature_digest: String,
    pub created_at: String,
    pub created_ms: i64,
}

/// Module lists a template names (overriding the built-in catalog's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateModules {
    pub template_id: String,
    #[serde(default)]
    pub root_modules: Vec<String>,
    #[serde(default)]
    pub runtime_modules: Vec<String>,
}

/// Random id with a readable prefix; only `[a-z0-9-]`, so it is valid in identity
/// documents, certificate names and URLs.
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    rand::Rng::fill(&mut rand::thread_rng(), &mut b[..]);
    format!("{prefix}-{}", hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(status: InstanceStatus) -> InstRec {
        InstRec {
            status,
            task_id: Some("task-1".into()),
            ..InstRec::new(
                "inst-1".into(),
                "node-1".into(),
                "t".into(),
                "r".into(),
                "recorder".into(),
                0,
            )
        }
    }

    #[test]
    fn every_threshold_in_design_is_detected_with_its_recovery() {
        let t = StuckThresholds::default();
        let cases = [
            (
                InstanceStatus::Pending,
                300,
                "pending_too_long",
                "cancel-task task-1",
            ),
            (
                InstanceStatus::Provisioning,
                600,
                "provisioning_too_long",
                "cancel-task task-1",
            ),
            (
                InstanceStatus::Bootstrapping,
                300,
                "bootstrapping_too_long",
                "--force",
            ),
            (
                InstanceStatus::Running,
                300,
                "running_without_heartbeat",
                "drain-instance",
            ),
            (
                InstanceStatus::Draining,
                1800,
                "draining_too_long",
                "cancel-task task-1",
            ),
            (
                InstanceStatus::Terminating,
                300,
                "terminating_too_long",
                "terminate-instance again",
            ),
        ];
        for (status, secs, reason, recovery) in cases {
            let i = inst(status);
            assert!(
                stuck_info(&i, secs * 1000, 0, &t, None).is_none(),
                "{status} at threshold"
            );
            let s = stuck_info(&i, (secs + 1) * 1000, 0, &t, None)
                .unwrap_or_else(|| panic!("{status}"));
            assert_eq!(s.reason, reason);
            assert_eq!(
                (s.threshold_seconds, s.for_seconds),
                (secs as u64, secs as u64 + 1)
            );
            assert!(s.recovery.contains(recovery), "{status}: {}", s.recovery);
        }
        for status in [InstanceStatus::Terminated, InstanceStatus::Failed] {
            assert!(stuck_info(&inst(status), i64::MAX / 2, 0, &t, None).is_none());
        }
    }

    #[test]
    fn a_drain_past_its_own_timeout_or_failed_is_drain_timeout() {
        let t = StuckThresholds::default();
        let i = inst(InstanceStatus::Draining);
        let mut d = DrainState {
            task_id: "task-d".into(),
            timeout_seconds: 60,
            created_ms: 0,
            status: TaskStatus::Running,
        };
        assert!(stuck_info(&i, 65_000, 0, &t, Some(&d)).is_none(), "grace");
        let s = stuck_info(&i, 65_001, 0, &t, Some(&d)).expect("past timeout + grace");
        assert_eq!(
            (s.reason.as_str(), s.threshold_seconds),
            ("drain_timeout", 60)
        );
        assert!(s.recovery.contains("terminate-instance inst-1 --force"));
        d.status = TaskStatus::Failed;
        assert_eq!(
            stuck_info(&i, 1_000, 0, &t, Some(&d)).map(|s| s.reason),
            Some("drain_timeout".to_string())
        );
        d.status = TaskStatus::Succeeded;
        assert!(stuck_info(&i, 65_001, 0, &t, Some(&d)).is_none());
        let s = stuck_info(&i, 1_801_000, 0, &t, Some(&d)).expect("waiting too long");
        assert!(s
            .recovery
            .contains("drained and waiting: terminate-instance inst-1"));
    }

    #[test]
    fn running_counts_from_the_last_heartbeat_and_bootstrapping_from_enrollment() {
        let t = StuckThresholds::default();
        let mut i = inst(InstanceStatus::Running);
        i.last_heartbeat_ms = Some(1_000_000);
        assert!(stuck_info(&i, 1_000_000 + 300_000, 0, &t, None).is_none());
        assert!(stuck_info(&i, 1_000_000 + 301_000, 0, &t, None).is_some());
        // Not while the server itself has only just come back.
        assert!(stuck_info(&i, 1_000_000 + 301_000, 1_200_000, &t, None).is_none());
        let mut b = inst(InstanceStatus::Bootstrapping);
        b.enrolled_ms = Some(500_000);
        assert!(stuck_info(&b, 500_000 + 300_000, 0, &t, None).is_none());
        assert_eq!(
            stuck_info(&b, 500_000 + 301_000, 0, &t, None).map(|s| s.for_seconds),
            Some(301)
        );
    }
}
