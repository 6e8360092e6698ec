//! Node-side tasks the operator or the server creates (reboot, collect diagnostics,
//! module update), module changes noticed by the sensor, bounded task results, and
//! the record of calls refused after decommission.

use powernode_proto::admin::{self, InstanceActionResponse};
use powernode_proto::{ErrorCode, InstanceStatus, TaskKind, TaskStatus};
use serde_json::{json, Value};

use super::bookkeeping::{add_task, fail_instance, finish_task};
use super::module_store::{template_lists, ModuleChange};
use super::{invalid_transition, AppState, REFUSAL_SIGNAL_EVERY_MS};
use crate::ca::ClientIdentity;
use crate::clock::Millis;
use crate::error::{AppError, AppResult};
use crate::model::{self, Mem, TaskRec};

/// Which instance states can take a node-side task of `kind` (an agent must be there
/// to lease it).
fn accepts(kind: TaskKind, status: InstanceStatus) -> bool {
    use InstanceStatus::*;
    match kind {
        TaskKind::Reboot => status == Running,
        TaskKind::ModuleUpdate => matches!(status, Running | Bootstrapping),
        TaskKind::CollectDiagnostics => matches!(status, Running | Bootstrapping | Draining),
        TaskKind::Drain | TaskKind::Provision | TaskKind::Terminate => false,
    }
}

/// Adds a `pending` node-side task to an instance, with an event.
pub(super) fn create_task(
    mem: &mut Mem,
    now: Millis,
    instance_id: &str,
    kind: TaskKind,
    params: Value,
) -> String {
    let id = add_task(
        mem,
        now,
        instance_id,
        kind,
        TaskStatus::Pending,
        params.clone(),
    );
    let node_id = mem.instances.get(instance_id).map(|i| i.node_id.clone());
    mem.save_instance(instance_id);
    mem.event(
        now,
        "task.created",
        node_id.as_deref(),
        Some(instance_id),
        json!({"task_id": id, "kind": kind, "params": params}),
    );
    id
}

/// An open (pending or leased) task of `kind` on the instance, newest first.
fn open_task(mem: &Mem, instance_id: &str, kind: TaskKind) -> Option<TaskRec> {
    let inst = mem.instances.get(instance_id)?;
    inst.task_ids
        .iter()
        .rev()
        .filter_map(|t| mem.tasks.get(t))
        .find(|t| t.kind == kind && !t.status.is_final())
        .cloned()
}

impl AppState {
    /// Creates a node-side task on an instance (reboot, collect diagnostics, module
    /// update); the agent leases it through the worker API.
    pub async fn node_task(
        &self,
        instance_id: &str,
        kind: TaskKind,
        params: Value,
    ) -> AppResult<InstanceActionResponse> {
        let drift = if kind == TaskKind::ModuleUpdate {
            let mem = self.lock();
            let inst = mem
                .instances
                .get(instance_id)
                .ok_or_else(|| AppError::not_found("instance", instance_id))?;
            Some(self.drift_items(&mem, inst))
        } else {
            None
        };
        self.mutate(|mem, now| {
            let inst = mem
                .instances
                .get(instance_id)
                .ok_or_else(|| AppError::not_found("instance", instance_id))?;
            let status = inst.status;
            if !accepts(kind, status) {
                return Err(invalid_transition(format!(
                    "instance is {status}: a {} task needs a {} instance",
                    kind.as_str(),
                    match kind {
                        TaskKind::Reboot => "running",
                        TaskKind::ModuleUpdate => "bootstrapping or running",
                        _ => "bootstrapping, running or draining",
                    }
                )));
            }
            if let Some(open) = open_task(mem, instance_id, kind) {
                return Err(invalid_transition(format!(
                    "{} task {} is already {}: cancel-task it first or wait",
                    kind.as_str(),
                    open.id,
                    open.status.as_str()
                )));
            }
            let params = match (kind, drift) {
                (TaskKind::ModuleUpdate, Some(items)) => module_update_params("operator", items),
                _ => params,
            };
            let task_id = create_task(mem, now, instance_id, kind, params);
            Ok(InstanceActionResponse { task_id, status })
        })
        .await
    }

    /// Module publications and template module lists that changed since they were
    /// last looked at (they are changed through the module admin routes). Nothing
    /// to compare when the modules' generation has not moved.
    pub(super) fn module_changes(&self) -> Vec<ModuleChange> {
        let mut watch = self.module_watch.lock().unwrap_or_else(|p| p.into_inner());
        // Read before the lists: a change landing meanwhile bumps it again and is
        // picked up by the next call (the lists are diffed, never replayed).
        let generation = self.modules.generation();
        if generation == watch.generation {
            return Vec::new();
        }
        watch.generation = generation;
        let mut out = Vec::new();
        let pubs = self.modules.publications();
        if pubs.len() > watch.publications {
            out.extend(
                pubs[watch.publications..]
                    .iter()
                    .cloned()
                    .map(ModuleChange::Published),
            );
        }
        watch.publications = pubs.len();
        let now = template_lists(&self.modules, &self.catalog);
        for (id, after) in &now {
            let before = watch.templates.get(id).cloned().unwrap_or_default();
            if &before != after {
                out.push(ModuleChange::TemplateChanged {
                    template_id: id.clone(),
                    before,
                    after: after.clone(),
                });
            }
        }
        watch.templates = now;
        out
    }

    /// Schedules the `module_update` tasks of a module change right away (called by
    /// the module admin routes after a publication or a template change); the
    /// sensor pass only sweeps up what this missed. A failed write is logged: the
    /// change itself is already recorded.
    pub async fn schedule_module_changes(&self) {
        let changes = self.module_changes();
        if changes.is_empty() {
            return;
        }
        let res = self
            .mutate(|mem, now| {
                self.apply_module_changes(mem, now, changes);
                Ok(())
            })
            .await;
        if let Err(e) = res {
            tracing::warn!(error = %e.message, "module_update tasks not scheduled");
        }
    }

    /// Records module changes and gives each affected live instance a
    /// `module_update` task describing what now differs.
    pub(super) fn apply_module_changes(
        &self,
        mem: &mut Mem,
        now: Millis,
        changes: Vec<ModuleChange>,
    ) {
        // template id -> trigger
        let mut affected: Vec<(String, &'static str)> = Vec::new();
        for c in changes {
            match c {
                ModuleChange::Published(p) => {
                    mem.event(
                        now,
                        "module.published",
                        None,
                        None,
                        json!({
                            "publication_id": p.id, "name": p.name, "version": p.version,
                            "kind": p.kind, "digest": p.digest, "at_ms": p.created_ms,
                        }),
                    );
                    for t in &self.catalog.templates {
                        let mut t = t.clone();
                        self.modules.apply_to_template(&mut t);
                        if t.root_modules.contains(&p.name) || t.runtime_modules.contains(&p.name) {
                            affected.push((t.id, "module_published"));
                        }
                    }
                }
                ModuleChange::TemplateChanged {
                    template_id,
                    before,
                    after,
                } => {
                    mem.event(
                        now,
                        "template.modules_changed",
                        None,
                        None,
                        json!({
                            "template_id": template_id,
                            "before": {"root_modules": before.0, "runtime_modules": before.1},
                            "after": {"root_modules": after.0, "runtime_modules": after.1},
                        }),
                    );
                    affected.push((template_id, "template_modules_changed"));
                }
            }
        }
        // One task per template; a changed module list says more than a publication.
        affected.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(a.1)));
        affected.dedup_by(|a, b| a.0 == b.0);
        for (template_id, trigger) in affected {
            let Some(set) = self.desired_set(&template_id) else {
                continue;
            };
            let targets: Vec<(String, Vec<admin::DriftItem>)> = mem
                .instances
                .values()
                .filter(|i| {
                    matches!(
                        i.status,
                        InstanceStatus::Running | InstanceStatus::Bootstrapping
                    )
                })
                .filter(|i| {
                    mem.nodes
                        .get(&i.node_id)
                        .is_some_and(|n| n.template_id == template_id)
                })
                .map(|i| (i.id.clone(), crate::drift::items(&set, i)))
                .filter(|(_, items)| !items.is_empty())
                .collect();
            for (inst_id, items) in targets {
                let params = module_update_params(trigger, items);
                match open_task(mem, &inst_id, TaskKind::ModuleUpdate) {
                    // Not leased yet: it describes the newest state instead.
                    Some(t) if t.status == TaskStatus::Pending => {
                        if let Some(t) = mem.tasks.get_mut(&t.id) {
                            t.params = params;
                            t.updated_ms = now;
                        }
                        mem.save_task(&t.id);
                    }
                    // Leased: the agent re-reads desired modules anyway; a fresh task
                    // follows once it is done (next change or update-modules).
                    Some(_) => {}
                    None => {
                        create_task(mem, now, &inst_id, TaskKind::ModuleUpdate, params);
                    }
                }
            }
        }
    }

    /// Notes a call refused because the instance's credentials were withdrawn
    /// (decommissioned node coming back): an `instance.refused` signal, at most one
    /// a minute per instance, so an operator sees it without reading node logs.
    pub async fn record_refusal(
        &self,
        instance_id: &str,
        serial: &str,
        code: ErrorCode,
        path: &str,
    ) {
        // A refused node retries every few seconds; within the signal period there
        // is nothing to record, so that answer takes no write lock and writes nothing.
        if !self.refusal_signal_due(instance_id) {
            return;
        }
        let res = self
            .mutate(|mem, now| {
                let Some(inst) = mem.instances.get_mut(instance_id) else {
                    return Ok(());
                };
                if inst
                    .last_refused_ms
                    .is_some_and(|t| now - t < REFUSAL_SIGNAL_EVERY_MS)
                {
                    return Ok(());
                }
                inst.last_refused_ms = Some(now);
                let status = inst.status;
                mem.save_instance(instance_id);
                mem.signal(
                    now,
                    "instance.refused",
                    instance_id,
                    false,
                    json!({
                        "code": code, "path": path, "serial": serial, "instance_status": status,
                        "reason": "a node presented withdrawn credentials (a revoked certificate or a terminated instance's); it was refused",
                    }),
                );
                Ok(())
            })
            .await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "could not record a refused call");
        }
    }

    /// Whether a refusal of `instance_id` now would fire a signal (read under the
    /// state mutex only; `record_refusal` checks again under the write lock).
    fn refusal_signal_due(&self, instance_id: &str) -> bool {
        let now = self.clock.now_ms();
        self.lock().instances.get(instance_id).is_some_and(|i| {
            i.last_refused_ms
                .is_none_or(|t| now - t >= REFUSAL_SIGNAL_EVERY_MS)
        })
    }

    /// [`AppState::record_refusal`] for a node API answer, when it is a refusal.
    pub async fn note_node_error<T>(
        &self,
        ident: &ClientIdentity,
        path: &str,
        res: AppResult<T>,
    ) -> AppResult<T> {
        if let Err(e) = &res {
            if matches!(
                e.code,
                ErrorCode::CertificateRevoked | ErrorCode::InstanceTerminated
            ) {
                self.record_refusal(&ident.instance_id, &ident.serial, e.code, path)
                    .await;
            }
        }
        res
    }
}

fn module_update_params(trigger: &str, items: Vec<admin::DriftItem>) -> Value {
    let reboot_required = items.iter().any(|i| i.reboot_required);
    json!({"trigger": trigger, "changes": items, "reboot_required": reboot_required})
}

impl AppState {
    pub fn get_task(&self, id: &str) -> AppResult<admin::Task> {
        let mem = self.lock();
        mem.tasks
            .get(id)
            .map(model::task_view)
            .ok_or_else(|| AppError::not_found("task", id))
    }

    pub async fn cancel_task(&self, id: &str) -> AppResult<admin::Task> {
        let mut destroy: Option<String> = None;
        let task = self
            .mutate(|mem, now| {
                let task = mem
                    .tasks
                    .get(id)
                    .ok_or_else(|| AppError::not_found("task", id))?
                    .clone();
                if task.status.is_final() {
                    return Err(invalid_transition(format!(
                        "task is already {}",
                        task.status.as_str()
                    )));
                }
                finish_task(
                    mem,
                    now,
                    id,
                    TaskStatus::Cancelled,
                    json!({"reason": "cancelled by operator"}),
                );
                let inst_status = mem.instances.get(&task.instance_id).map(|i| i.status);
                match (task.kind, inst_status) {
                    (TaskKind::Drain, Some(InstanceStatus::Draining)) => {
                        // Cancelling a drain uncordons the instance.
                        if let Some(inst) = mem.instances.get_mut(&task.instance_id) {
                            inst.cordoned = false;
                        }
                        mem.set_status(now, &task.instance_id, InstanceStatus::Running);
                    }
                    (
                        TaskKind::Provision,
                        Some(
                            InstanceStatus::Pending
                            | InstanceStatus::Provisioning
                            | InstanceStatus::Bootstrapping,
                        ),
                    ) => {
                        // A cancelled provision leaves no machine (destroyed below, with
                        // no lock held) and no credentials.
                        destroy = Some(task.instance_id.clone());
                        fail_instance(
                            mem,
                            now,
                            &task.instance_id,
                            ErrorCode::TaskCancelled,
                            "provision task cancelled by operator",
                        );
                    }
                    _ => {}
                }
                Ok(model::task_view(&mem.tasks[id]))
            })
            .await?;
        if let Some(instance_id) = destroy {
            self.destroy_and_record(&instance_id).await?;
        }
        Ok(task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_kinds_need_an_agent_in_the_right_state() {
        assert!(accepts(TaskKind::Reboot, InstanceStatus::Running));
        assert!(!accepts(TaskKind::Reboot, InstanceStatus::Draining));
        assert!(accepts(
            TaskKind::CollectDiagnostics,
            InstanceStatus::Draining
        ));
        assert!(!accepts(
            TaskKind::CollectDiagnostics,
            InstanceStatus::Provisioning
        ));
        assert!(accepts(
            TaskKind::ModuleUpdate,
            InstanceStatus::Bootstrapping
        ));
        assert!(!accepts(TaskKind::ModuleUpdate, InstanceStatus::Terminated));
        assert!(!accepts(TaskKind::Drain, InstanceStatus::Running));
    }
}
