//! The machines behind instances, as the provider sees them: the watcher's pass
//! (VMs that reset in place, VMs that ended on their own), the VMs a starting server
//! takes back from the one before it, and what a stopping server does with them.
//!
//! A reboot is not a death: the `real` provider's QEMU resets the guest in place
//! (same process, kernel, initrd, fw_cfg identity and disks), so a reboot task, a
//! panic under `panic=-1` or the init's failure policy brings the same instance
//! back; the watcher records each reset (`vm.rebooted`) and stops a reboot loop. A
//! server restart is not a death either: VMs outlive the server, and the next one
//! adopts them (`vm.adopted`); only a VM that really ended is `vm.lost`.

use powernode_proto::InstanceStatus;
use serde_json::json;

use super::bookkeeping::{open_reenroll_window, vm_lost};
use super::{AppState, REENROLL_WINDOW_MS};
use crate::clock::Millis;
use crate::error::AppResult;
use crate::model::{Mem, Op};
use crate::provider::{
    end_orphan, Provider, VmEvent, VmExit, VmReset, RESET_LIMIT, RESET_WINDOW, VM_PROVIDERS,
};
use crate::store::{Store, StoreError};

impl AppState {
    /// The watcher's pass (every 500 ms): records what the provider saw happen to
    /// the VMs. A reset is a reboot (`vm.rebooted`; a reboot loop is destroyed and
    /// fails the instance); a VM that ended fails its instance unless it was being
    /// terminated anyway (`vm.exited`, with QEMU's reason and the console tail).
    pub async fn reap_vms(&self) -> AppResult<usize> {
        let news = self.provider.poll();
        if news.is_empty() {
            return Ok(0);
        }
        let n = news.len();
        let looping = self
            .mutate(|mem, now| {
                let mut looping = Vec::new();
                for item in news {
                    match item {
                        VmEvent::Reset(r) => {
                            if let Some(message) = vm_reset(mem, now, &r) {
                                looping.push((r.instance_id, message));
                            }
                        }
                        VmEvent::Exited(ex) => vm_exited(mem, now, &ex),
                    }
                }
                Ok(looping)
            })
            .await?;
        for (instance_id, message) in looping {
            tracing::warn!(instance = %instance_id, %message, "reboot loop: the VM is destroyed");
            self.destroy_and_record(&instance_id).await?;
            self.mutate(|mem, now| {
                vm_lost(mem, now, &instance_id, &message);
                Ok(())
            })
            .await?;
        }
        Ok(n)
    }

    /// Server shutdown: the VMs are let go of and keep running (an upgrade or a
    /// restart of the control plane costs no node); the next server on this data
    /// directory adopts them. Returns how many were left running.
    pub fn shutdown_vms(&self) -> usize {
        self.provider.shutdown()
    }
}

/// Records a reset of an instance's VM; returns the failure message when the VM
/// is in a reboot loop (more than [`RESET_LIMIT`] reboots within [`RESET_WINDOW`]).
fn vm_reset(mem: &mut Mem, now: Millis, r: &VmReset) -> Option<String> {
    let inst = mem.instances.get(&r.instance_id)?;
    let (status, node_id) = (inst.status, inst.node_id.clone());
    let reboot_task = inst.reboot_expected_ms.is_some();
    mem.event(
        now,
        "vm.rebooted",
        Some(&node_id),
        Some(&r.instance_id),
        json!({
            "pid": r.pid,
            "reason": r.reason,
            "by_guest": r.by_guest,
            "reboot_task": reboot_task,
            "reboots_in_window": r.recent,
            "window_seconds": RESET_WINDOW.as_secs(),
            "limit": RESET_LIMIT,
        }),
    );
    if !status.is_live() || status == InstanceStatus::Terminating {
        return None;
    }
    if r.recent > RESET_LIMIT {
        return Some(format!(
            "the VM is in a reboot loop: {} reboots within {} s (QEMU pid {}, last reason {:?}); \
             it was stopped",
            r.recent,
            RESET_WINDOW.as_secs(),
            r.pid,
            r.reason
        ));
    }
    // The hypervisor saw the machine reset: a node that comes back without
    // credentials (ephemeral) may enroll once more with its token, as after a task.
    open_reenroll_window(mem, &r.instance_id, now + REENROLL_WINDOW_MS);
    None
}

/// Records a VM that ended on its own; its instance fails unless it was ending.
fn vm_exited(mem: &mut Mem, now: Millis, ex: &VmExit) {
    let Some(inst) = mem.instances.get(&ex.instance_id) else {
        return;
    };
    let (status, node_id) = (inst.status, inst.node_id.clone());
    mem.event(
        now,
        "vm.exited",
        Some(&node_id),
        Some(&ex.instance_id),
        json!({
            "pid": ex.pid,
            "status": ex.status,
            "shutdown_reason": ex.shutdown_reason,
            "serial_tail": ex.serial_tail,
        }),
    );
    if status.is_live() && status != InstanceStatus::Terminating {
        let said = ex
            .shutdown_reason
            .as_deref()
            .map(|r| format!(", QEMU's reason: {r}"))
            .unwrap_or_default();
        let message = format!(
            "the VM exited on its own (QEMU pid {}, {}{said}) while the instance was {status}; \
             last console lines: {}",
            ex.pid, ex.status, ex.serial_tail
        );
        vm_lost(mem, now, &ex.instance_id, &message);
    }
}

/// At start: every live instance of a VM provider (`real`, `libvirt`) gets its VM
/// back from `provider` (by its latest provision record: event
/// `vm.adopted`), or, when that VM is gone, fails with the reason (event `vm.lost`,
/// credentials withdrawn). A VM left running that this provider cannot take back
/// (the server now runs another provider) is killed first. Returns (adopted, lost).
pub(super) fn recover_vms(
    store: &Store,
    mem: &mut Mem,
    now: Millis,
    provider: &dyn Provider,
) -> Result<(usize, usize), StoreError> {
    let live: Vec<String> = mem
        .instances
        .values()
        .filter(|i| VM_PROVIDERS.contains(&i.provider.as_str()) && i.status.is_live())
        .map(|i| i.id.clone())
        .collect();
    let (mut adopted, mut lost) = (0, 0);
    for id in &live {
        // A VM started again by an older server (`restart`) has a newer record.
        let record = match store.provider_record_blocking(id, "restart")? {
            Some(r) => Some(r),
            None => store.provider_record_blocking(id, "provision")?,
        };
        let pid = record.as_ref().and_then(|r| r["pid"].as_u64());
        let outcome = match &record {
            None => Err("the server restarted before the VM was started".to_string()),
            Some(rec) => provider.adopt(id, rec).map_err(|e| match end_orphan(rec) {
                Some(what) => format!(
                    "the server restarted and cannot take back its VM ({what}), which has been \
                     stopped: {}",
                    e.chain()
                ),
                None => format!(
                    "the server restarted and the VM (QEMU pid {}) is gone: {}",
                    pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                    e.chain()
                ),
            }),
        };
        let status = mem.instances[id].status;
        let node_id = mem.instances[id].node_id.clone();
        match outcome {
            Ok(doc) => {
                adopted += 1;
                mem.event(
                    now,
                    "vm.adopted",
                    Some(&node_id),
                    Some(id),
                    json!({"pid": doc["pid"], "instance_dir": doc["instance_dir"],
                           "provider": provider.name(), "status": status}),
                );
                mem.ops.push(Op::ProviderRecord {
                    instance_id: id.clone(),
                    action: "adopt".to_string(),
                    at_ms: now,
                    doc,
                });
            }
            Err(message) => {
                lost += 1;
                mem.event(
                    now,
                    "vm.lost",
                    Some(&node_id),
                    Some(id),
                    json!({"pid": pid, "was": status, "reason": message}),
                );
                vm_lost(mem, now, id, &message);
            }
        }
    }
    let ops = std::mem::take(&mut mem.ops);
    store.apply_blocking(&ops)?;
    Ok((adopted, lost))
}
