//! The sensors: one pass over every instance (silence, stuck states, drift, systemd,
//! expired leases, settled boot reports) raising and clearing signals, and the
//! signal and event lists.
use powernode_proto::admin::{self, DriftItem};
use powernode_proto::InstanceStatus;
use serde_json::json;

use super::bookkeeping::requeue_expired;
use super::AppState;
use crate::clock::{format_ts, Millis};
use crate::error::AppResult;
use crate::model::{self, Mem, Op};

impl AppState {
    /// One sensor pass: silence, stuck states, drift, expired leases. The scan only
    /// borrows; records are touched only where a condition starts or ends, so a quiet
    /// fleet costs one read pass under the lock (heartbeats wait on that lock).
    pub async fn sense(&self) -> AppResult<()> {
        let silent_ms = (self.cfg.silent_after_seconds as i64).saturating_mul(1000);
        let thresholds = self.cfg.stuck;
        let module_changes = self.module_changes();
        self.mutate(|mem, now| {
            requeue_expired(mem, now, None);
            self.clear_settled_boot_reports(mem);
            if !module_changes.is_empty() {
                self.apply_module_changes(mem, now, module_changes);
            }
            let mut sets: std::collections::HashMap<String, Option<crate::drift::DesiredSet>> =
                std::collections::HashMap::new();
            let mut changes: Vec<SensorChange> = Vec::new();
            for inst in mem.instances.values() {
                let has_signal = inst.silent_signal.is_some()
                    || inst.stuck_signal.is_some()
                    || inst.drift_signal.is_some()
                    || inst.systemd_signal.is_some();
                if !inst.status.is_live() && !has_signal {
                    continue;
                }
                let watched = matches!(
                    inst.status,
                    InstanceStatus::Running | InstanceStatus::Draining
                );
                let since_hb = now
                    - inst
                        .last_heartbeat_ms
                        .unwrap_or(inst.status_changed_ms)
                        .max(self.started_ms);
                let silent = watched && since_hb > silent_ms;
                let silent_change = (silent != inst.silent_signal.is_some()).then_some(silent);
                let stuck = model::stuck_info(
                    inst,
                    now,
                    self.started_ms,
                    &thresholds,
                    mem.drain_state(inst).as_ref(),
                );
                let stuck_change = (stuck.as_ref().map(|s| s.reason.as_str())
                    != inst.stuck_signal.as_ref().map(|(r, _)| r.as_str()))
                .then_some(stuck);
                // Each template's desired set once per pass (a fleet shares few).
                let set = match mem.nodes.get(&inst.node_id) {
                    Some(n) if inst.status == InstanceStatus::Running => {
                        if !sets.contains_key(&n.template_id) {
                            sets.insert(n.template_id.clone(), self.desired_set(&n.template_id));
                        }
                        sets.get(&n.template_id).and_then(Option::as_ref)
                    }
                    _ => None,
                };
                let drift_change = match set.filter(|s| crate::drift::has_drift(s, inst)) {
                    Some(set) => {
                        let items = crate::drift::items(set, inst);
                        (inst.drift_signal.is_none() || crate::drift::key(&items) != inst.drift_key)
                            .then_some(Some(items))
                    }
                    None => inst.drift_signal.is_some().then_some(None),
                };
                let degraded = model::systemd_degraded(inst);
                let systemd_change =
                    (degraded.is_some() != inst.systemd_signal.is_some()).then_some(degraded);
                if silent_change.is_some()
                    || stuck_change.is_some()
                    || drift_change.is_some()
                    || systemd_change.is_some()
                {
                    changes.push(SensorChange {
                        id: inst.id.clone(),
                        since_hb,
                        silent: silent_change,
                        stuck: stuck_change,
                        drift: drift_change,
                        systemd: systemd_change,
                    });
                }
            }
            for c in changes {
                self.apply_sensor_change(mem, now, silent_ms, c);
            }
            Ok(())
        })
        .await
    }

    fn apply_sensor_change(&self, mem: &mut Mem, now: Millis, silent_ms: i64, c: SensorChange) {
        let Some(inst) = mem.instances.get(&c.id).cloned() else {
            return;
        };
        let id = c.id.as_str();
        let mut silent_signal = inst.silent_signal;
        let mut stuck_signal = inst.stuck_signal.clone();
        let mut drift_signal = inst.drift_signal;
        match (c.silent, inst.silent_signal) {
            (Some(true), None) => {
                silent_signal = Some(mem.signal(
                    now,
                    "instance.silent",
                    id,
                    true,
                    json!({
                        "last_heartbeat_at": inst.last_heartbeat_ms.map(format_ts),
                        "silent_for_seconds": c.since_hb / 1000,
                        "threshold_seconds": silent_ms / 1000,
                    }),
                ));
            }
            (Some(false), Some(sig)) => {
                mem.ops.push(Op::SignalActive {
                    id: sig,
                    active: false,
                });
                // Cleared by a heartbeat (not by the instance going away).
                if matches!(
                    inst.status,
                    InstanceStatus::Running | InstanceStatus::Draining
                ) {
                    mem.signal(
                        now,
                        "instance.silent_cleared",
                        id,
                        false,
                        json!({
                            "silent_signal_id": sig,
                            "last_heartbeat_at": inst.last_heartbeat_ms.map(format_ts),
                        }),
                    );
                }
                silent_signal = None;
            }
            _ => {}
        }
        if let Some(stuck) = c.stuck {
            if let Some((_, sig)) = &inst.stuck_signal {
                mem.ops.push(Op::SignalActive {
                    id: *sig,
                    active: false,
                });
            }
            stuck_signal = stuck.map(|info| {
                let detail = serde_json::to_value(&info).unwrap_or_default();
                (
                    info.reason,
                    mem.signal(now, "instance.stuck", id, true, detail),
                )
            });
        }
        let mut drift_key = inst.drift_key.clone();
        if let Some(drift) = c.drift {
            // A drift that changed (a new publication meanwhile) ends the old signal
            // and fires a fresh one with the new verbs.
            if let Some(sig) = inst.drift_signal {
                mem.ops.push(Op::SignalActive {
                    id: sig,
                    active: false,
                });
            }
            drift_signal = None;
            drift_key.clear();
            if let Some(items) = drift {
                drift_key = crate::drift::key(&items);
                let reboot_required = items.iter().any(|i| i.reboot_required);
                let verbs: Vec<String> = items
                    .iter()
                    .map(|i| format!("{} {}", i.action, i.module))
                    .collect();
                drift_signal = Some(mem.signal(
                    now,
                    "module.drift_detected",
                    id,
                    true,
                    json!({
                        "items": items,
                        "summary": verbs.join(", "),
                        "reboot_required": reboot_required,
                    }),
                ));
            }
        }
        let mut systemd_signal = inst.systemd_signal;
        match (c.systemd, inst.systemd_signal) {
            (Some(Some(degraded)), None) => {
                systemd_signal = Some(mem.signal(
                    now,
                    "instance.systemd_degraded",
                    id,
                    true,
                    serde_json::to_value(&degraded).unwrap_or_default(),
                ));
            }
            (Some(None), Some(sig)) => {
                mem.ops.push(Op::SignalActive {
                    id: sig,
                    active: false,
                });
                mem.signal(
                    now,
                    "instance.systemd_degraded_cleared",
                    id,
                    false,
                    json!({
                        "systemd_signal_id": sig,
                        "state": inst.systemd.as_ref().map(|s| s.state.clone()),
                    }),
                );
                systemd_signal = None;
            }
            _ => {}
        }
        if let Some(slot) = mem.instances.get_mut(id) {
            slot.systemd_signal = systemd_signal;
            slot.silent_signal = silent_signal;
            slot.stuck_signal = stuck_signal;
            slot.drift_signal = drift_signal;
            slot.drift_key = drift_key;
        }
        mem.save_instance(id);
    }

    pub async fn recent_signals(
        &self,
        limit: u32,
        instance_id: Option<String>,
    ) -> AppResult<Vec<admin::Signal>> {
        Ok(self.store.recent_signals(limit, instance_id).await?)
    }

    pub async fn recent_events(
        &self,
        limit: u32,
        instance_id: Option<String>,
    ) -> AppResult<Vec<admin::Event>> {
        Ok(self.store.recent_events(limit, instance_id).await?)
    }
}

/// What one sensor pass found changed for one instance (`None`: unchanged).
struct SensorChange {
    id: String,
    since_hb: Millis,
    silent: Option<bool>,
    stuck: Option<Option<admin::StuckInfo>>,
    /// `Some(Some(items))`: drift started or changed; `Some(None)`: it ended.
    drift: Option<Option<Vec<DriftItem>>>,
    /// `Some(Some(_))`: systemd reports failed units; `Some(None)`: healthy again.
    systemd: Option<Option<admin::SystemdDegraded>>,
}
