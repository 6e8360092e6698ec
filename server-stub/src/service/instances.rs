//! Admin: instances. Provisioning (the provider runs with no state lock held and a
//! slow boot answers `pending`), reading, the identity document, drain, terminate,
//! the drift report (the VM watcher is `vms.rs`).
use axum::http::StatusCode;
use powernode_proto::admin::{
    self, DrainRequest, DriftItem, DriftReport, InstanceActionResponse, ProvisionRequest,
    ProvisionResponse, TerminateRequest,
};
use powernode_proto::{
    ErrorCode, IdentityDocument, InstanceStatus, NetworkConfig, TaskKind, TaskStatus,
};
use serde_json::json;

use super::bookkeeping::{add_task, fail_instance, finish_task, finish_tasks, vm_started};
use super::{invalid_transition, random_secret, token_hash, AppState};
use crate::error::{AppError, AppResult};
use crate::images::Publication;
use crate::model::{self, new_id, InstRec, Mem, Op, TokenRec};
use crate::provider::{ProviderError, ProviderRecord, ProvisionSpec};

/// How long a provision call waits for the provider before answering `pending`.
const PROVISION_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl AppState {
    pub async fn provision(
        &self,
        node_id: &str,
        req: ProvisionRequest,
    ) -> AppResult<ProvisionResponse> {
        self.provision_answering_within(node_id, req, PROVISION_ANSWER_WAIT)
            .await
    }

    /// [`Self::provision`], answering `pending` when the provider's work (or its wait
    /// for quota) takes longer than `answer_within`.
    pub(crate) async fn provision_answering_within(
        &self,
        node_id: &str,
        req: ProvisionRequest,
        answer_within: std::time::Duration,
    ) -> AppResult<ProvisionResponse> {
        if !self.provider.enabled() {
            return Err(AppError::conflict(
                ErrorCode::ProviderDisabled,
                "no provider is configured (provider mode `disabled`)",
            ));
        }
        if self.cfg.image_base.is_some() {
            // Picks up a rebuilt image folder; a folder that does not check out is
            // remembered for the error below and the last good publication stays.
            if let Err(e) = self.publish_image(None).await {
                tracing::warn!(error = %e.message, "image folder not published");
            }
        }
        let publications = self.list_publications();
        let needs_image = self.provider.needs_image();
        let (spec, task_id) = self
            .mutate(|mem, now| {
                let node = mem
                    .nodes
                    .get(node_id)
                    .ok_or_else(|| AppError::not_found("node", node_id))?
                    .clone();
                if let Some(inst) = mem.live_instance(&node) {
                    return Err(AppError::conflict(
                        ErrorCode::NodeAlreadyHasInstance,
                        format!(
                            "node already has live instance {} ({})",
                            inst.id, inst.status
                        ),
                    ));
                }
                let template = self
                    .template(&node.template_id)
                    .ok_or_else(|| {
                        AppError::new(
                            StatusCode::BAD_REQUEST,
                            ErrorCode::UnknownTemplate,
                            format!(
                                "node's template {:?} is not in the catalog",
                                node.template_id
                            ),
                        )
                    })?
                    .clone();
                let type_id = req
                    .instance_type
                    .unwrap_or_else(|| template.default_instance_type.clone());
                let instance_type = self
                    .catalog
                    .instance_types
                    .iter()
                    .find(|t| t.id == type_id)
                    .cloned()
                    .ok_or_else(|| {
                        AppError::new(
                            StatusCode::BAD_REQUEST,
                            ErrorCode::UnknownInstanceType,
                            format!("unknown instance type {type_id:?} (see list-templates)"),
                        )
                    })?;
                let region = req
                    .region
                    .unwrap_or_else(|| template.default_region.clone());
                if !self.catalog.regions.contains(&region) {
                    return Err(AppError::new(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::UnknownRegion,
                        format!("unknown region {region:?} (see list-templates)"),
                    ));
                }

                let image = publications
                    .iter()
                    .find(|p| p.platform == template.platform && p.arch == template.arch)
                    .map(Publication::image_ref);
                if image.is_none() && needs_image {
                    let why = self
                        .last_image_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone()
                        .map(|e| format!(" (last attempt: {e})"))
                        .unwrap_or_default();
                    return Err(AppError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        ErrorCode::MissingNetbootImageError,
                        format!(
                            "no netboot image is published for platform {} / {}: build one \
                         (powernode-initramfs build) and run publish-disk-image or start \
                         the server with --image-base{why}",
                            template.platform, template.arch
                        ),
                    ));
                }

                // Validated: from here on every change is recorded.
                let instance_id = new_id("inst");
                let token = random_secret();
                let inst = InstRec::new(
                    instance_id.clone(),
                    node.id.clone(),
                    instance_type.id.clone(),
                    region.clone(),
                    self.provider.name().to_string(),
                    now,
                );
                mem.instances.insert(instance_id.clone(), inst);
                let task_id = add_task(
                    mem,
                    now,
                    &instance_id,
                    TaskKind::Provision,
                    TaskStatus::Running,
                    json!({"instance_type": instance_type.id, "region": region}),
                );
                mem.save_instance(&instance_id);
                let tok = TokenRec {
                    hash: token_hash(&token),
                    instance_id: instance_id.clone(),
                    node_id: node.id.clone(),
                    created_ms: now,
                    used_ms: None,
                    revoked: false,
                    reenroll_until_ms: None,
                    serial: None,
                };
                mem.ops.push(Op::Token(tok.clone()));
                mem.tokens.insert(tok.hash.clone(), tok);
                if let Some(n) = mem.nodes.get_mut(node_id) {
                    n.current_instance_id = Some(instance_id.clone());
                    n.instance_history.insert(0, instance_id.clone());
                    n.lifecycle_class_locked = true;
                }
                mem.save_node(node_id);
                mem.event(
                now,
                "instance.created",
                Some(node_id),
                Some(&instance_id),
                json!({"task_id": task_id, "instance_type": instance_type.id, "region": region}),
            );

                let identity = IdentityDocument {
                    version: powernode_proto::identity::IDENTITY_VERSION,
                    control_plane_url: self.public_url.clone(),
                    ca_pem: self.ca.cert_pem().to_string(),
                    bootstrap_token: token,
                    node_id: node.id.clone(),
                    instance_id: instance_id.clone(),
                    hostname: node.hostname.clone(),
                    network: NetworkConfig::Dhcp,
                    heartbeat_interval_seconds: self.cfg.heartbeat_interval_seconds,
                    ssh_authorized_keys: Vec::new(),
                    // The trust set, for the node to pin: a control plane that later
                    // hands it other keys cannot make it take their signatures.
                    module_trust_keys: self.modules.trust_keys(),
                };
                let spec = ProvisionSpec {
                    instance_id: instance_id.clone(),
                    node_id: node.id.clone(),
                    hostname: node.hostname.clone(),
                    lifecycle_class: node.lifecycle_class,
                    instance_type,
                    region,
                    template_id: template.id.clone(),
                    platform: template.platform.clone(),
                    arch: template.arch.clone(),
                    identity,
                    image,
                };
                Ok((spec, task_id))
            })
            .await?;
        let instance_id = spec.instance_id.clone();
        // The provider's work runs as its own task: a slow boot (KVM canary, disk
        // creation, a loaded host), or one waiting for provider quota, answers
        // `pending` after PROVISION_ANSWER_WAIT and finishes in the background; a
        // quick one answers with its outcome.
        let st = self.clone();
        let tid = task_id.clone();
        let work = tokio::spawn(async move {
            let _slot = st.wait_for_quota(&spec.instance_id, &spec.region).await?;
            st.run_provider(spec, tid).await
        });
        match tokio::time::timeout(answer_within, work).await {
            Ok(joined) => joined.map_err(|e| AppError::internal(&e))?,
            Err(_) => Ok(ProvisionResponse {
                instance: self.get_instance(&instance_id)?,
                task_id,
            }),
        }
    }

    /// Provision steps 2 and 3: the provider (no lock held), then its outcome.
    async fn run_provider(
        &self,
        spec: ProvisionSpec,
        task_id: String,
    ) -> AppResult<ProvisionResponse> {
        let instance_id = spec.instance_id.clone();
        let node_id = spec.node_id.clone();

        // Booting takes time: no state lock is held while the provider works.
        let st = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            st.keep_identity(&spec.identity)
                .map_err(|source| ProviderError::Io {
                    path: st.cfg.data_dir.join(super::identities::IDENTITIES_DIR),
                    source,
                })?;
            st.provider.provision(&spec)
        })
        .await
        .map_err(|e| AppError::internal(&e))?;

        let thresholds = self.cfg.stuck;
        let (resp, orphaned) = self
            .mutate(|mem, now| {
                let node_id = node_id.as_str();
                let still_pending = mem
                    .instances
                    .get(&instance_id)
                    .is_some_and(|i| i.status == InstanceStatus::Pending);
                match result {
                    Ok(record) => {
                        vm_started(
                            mem,
                            now,
                            self.provider.name(),
                            (&instance_id, node_id),
                            record,
                        );
                        if still_pending {
                            mem.set_status(now, &instance_id, InstanceStatus::Provisioning);
                        }
                    }
                    Err(e) => {
                        let message = e.chain();
                        if still_pending {
                            fail_instance(
                                mem,
                                now,
                                &instance_id,
                                ErrorCode::ProviderFailed,
                                &message,
                            );
                            finish_task(
                                mem,
                                now,
                                &task_id,
                                TaskStatus::Failed,
                                json!({"error": message}),
                            );
                        }
                        let (status, code) = match e {
                            ProviderError::Disabled => {
                                (StatusCode::CONFLICT, ErrorCode::ProviderDisabled)
                            }
                            ProviderError::MissingImage => (
                                StatusCode::UNPROCESSABLE_ENTITY,
                                ErrorCode::MissingNetbootImageError,
                            ),
                            _ => (StatusCode::BAD_GATEWAY, ErrorCode::ProviderFailed),
                        };
                        return Err(AppError::new(status, code, message));
                    }
                }
                let inst = &mem.instances[&instance_id];
                let inst = model::instance_view(
                    inst,
                    now,
                    self.started_ms,
                    &thresholds,
                    mem.drain_state(inst).as_ref(),
                );
                Ok((
                    ProvisionResponse {
                        instance: inst,
                        task_id: task_id.clone(),
                    },
                    !still_pending,
                ))
            })
            .await?;
        if orphaned {
            // Cancelled or terminated while booting: the machine must not stay.
            self.destroy_and_record(&instance_id).await?;
        }
        Ok(resp)
    }

    pub fn get_instance(&self, id: &str) -> AppResult<admin::Instance> {
        let now = self.clock.now_ms();
        let mem = self.lock();
        let inst = mem
            .instances
            .get(id)
            .ok_or_else(|| AppError::not_found("instance", id))?;
        Ok(model::instance_view(
            inst,
            now,
            self.started_ms,
            &self.cfg.stuck,
            mem.drain_state(inst).as_ref(),
        ))
    }

    /// The identity document the provider handed (or would hand) the VM, while the
    /// instance lives (see `identities`).
    pub async fn instance_identity(&self, id: &str) -> AppResult<serde_json::Value> {
        if !self.lock().instances.contains_key(id) {
            return Err(AppError::not_found("instance", id));
        }
        let st = self.clone();
        let owned = id.to_string();
        let kept = tokio::task::spawn_blocking(move || st.kept_identity(&owned))
            .await
            .map_err(|e| AppError::internal(&e))?
            .map_err(|e| AppError::internal(&e))?;
        kept.ok_or_else(|| {
            AppError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                format!(
                    "instance {id} has no identity document any more: it is kept only while \
                     the instance lives"
                ),
            )
        })
    }

    pub async fn drain(&self, id: &str, req: DrainRequest) -> AppResult<InstanceActionResponse> {
        self.mutate(|mem, now| {
            let inst = mem
                .instances
                .get(id)
                .ok_or_else(|| AppError::not_found("instance", id))?;
            if !inst.status.can_transition_to(InstanceStatus::Draining) {
                return Err(invalid_transition(format!(
                    "instance is {}: only a bootstrapping or running instance can be drained",
                    inst.status
                )));
            }
            // A cordoned node takes no new work: module updates and reboots that were
            // not leased yet are moot.
            finish_tasks(
                mem,
                now,
                id,
                |t| {
                    matches!(t.kind, TaskKind::ModuleUpdate | TaskKind::Reboot)
                        && t.status == TaskStatus::Pending
                },
                TaskStatus::Cancelled,
                &json!({"reason": "the instance is draining: a cordoned node takes no new work"}),
            );
            let task_id = add_task(
                mem,
                now,
                id,
                TaskKind::Drain,
                TaskStatus::Pending,
                json!({"timeout_seconds": req.timeout_seconds, "cordon_only": req.cordon_only}),
            );
            if let Some(inst) = mem.instances.get_mut(id) {
                inst.cordoned = true;
            }
            mem.set_status(now, id, InstanceStatus::Draining);
            Ok(InstanceActionResponse {
                task_id,
                status: InstanceStatus::Draining,
            })
        })
        .await
    }

    pub async fn terminate(
        &self,
        id: &str,
        req: TerminateRequest,
    ) -> AppResult<InstanceActionResponse> {
        let (task_id, node_id) = self
            .mutate(|mem, now| {
                let inst = mem
                    .instances
                    .get(id)
                    .ok_or_else(|| AppError::not_found("instance", id))?;
                let st = inst.status;
                if st == InstanceStatus::Terminated {
                    return Err(invalid_transition("instance is already terminated"));
                }
                let drained = st == InstanceStatus::Draining
                    && inst.task_ids.iter().rev().any(|t| {
                        mem.tasks.get(t).is_some_and(|t| {
                            t.kind == TaskKind::Drain && t.status == TaskStatus::Succeeded
                        })
                    });
                let without_force = matches!(
                    st,
                    InstanceStatus::Pending
                        | InstanceStatus::Provisioning
                        | InstanceStatus::Failed
                        | InstanceStatus::Terminating
                ) || drained;
                if !without_force && !req.force {
                    return Err(invalid_transition(format!(
                        "instance is {st} and not drained: drain first or use --force"
                    )));
                }
                if st != InstanceStatus::Terminating
                    && !st.can_transition_to(InstanceStatus::Terminating)
                {
                    return Err(invalid_transition(format!("instance is {st}")));
                }
                let node_id = inst.node_id.clone();
                // Open node-side work is moot once the machine goes away.
                finish_tasks(
                    mem,
                    now,
                    id,
                    |t| !t.status.is_final(),
                    TaskStatus::Cancelled,
                    &json!({"reason": "instance terminated"}),
                );
                let task_id = add_task(
                    mem,
                    now,
                    id,
                    TaskKind::Terminate,
                    TaskStatus::Running,
                    json!({"force": req.force}),
                );
                if st != InstanceStatus::Terminating {
                    mem.set_status(now, id, InstanceStatus::Terminating);
                }
                mem.revoke_credentials(now, id);
                Ok((task_id, node_id))
            })
            .await?;

        // Killing and reaping QEMU happens with no state lock held.
        let st = self.clone();
        let owned_id = id.to_string();
        let result = tokio::task::spawn_blocking(move || st.provider.destroy(&owned_id))
            .await
            .map_err(|e| AppError::internal(&e))?;
        let answer = self
            .mutate(|mem, now| match result {
                Ok(record) => {
                    mem.ops.push(Op::ProviderRecord {
                        instance_id: id.to_string(),
                        action: "destroy".to_string(),
                        at_ms: now,
                        doc: record,
                    });
                    mem.event(
                        now,
                        "provider.destroy",
                        Some(&node_id),
                        Some(id),
                        json!({"provider": self.provider.name()}),
                    );
                    finish_task(mem, now, &task_id, TaskStatus::Succeeded, json!({}));
                    if mem.instances.get(id).map(|i| i.status) != Some(InstanceStatus::Terminated) {
                        mem.set_status(now, id, InstanceStatus::Terminated);
                    }
                    if let Some(node) = mem.nodes.get_mut(&node_id) {
                        if node.current_instance_id.as_deref() == Some(id) {
                            node.current_instance_id = None;
                        }
                    }
                    mem.save_node(&node_id);
                    Ok(InstanceActionResponse {
                        task_id: task_id.clone(),
                        status: InstanceStatus::Terminated,
                    })
                }
                Err(e) => {
                    let message = e.chain();
                    finish_task(
                        mem,
                        now,
                        &task_id,
                        TaskStatus::Failed,
                        json!({"error": message}),
                    );
                    Err(AppError::new(
                        StatusCode::BAD_GATEWAY,
                        ErrorCode::ProviderFailed,
                        format!(
                        "{message}; the instance stays terminating, run terminate-instance again"
                    ),
                    ))
                }
            })
            .await;
        // Its token is withdrawn: the identity document that held it goes too.
        if answer.is_ok() {
            self.sweep_identities();
        }
        answer
    }

    pub fn drift_report(&self, id: &str) -> AppResult<DriftReport> {
        let mem = self.lock();
        let inst = mem
            .instances
            .get(id)
            .ok_or_else(|| AppError::not_found("instance", id))?;
        let items = self.drift_items(&mem, inst);
        // The agent's own word counts too (it knows what `/` was composed from).
        let reboot_required = items.iter().any(|i| i.reboot_required)
            || inst
                .last_reconcile
                .as_ref()
                .is_some_and(|r| !r.reboot_required.is_empty());
        let recovery = match (items.is_empty() && !reboot_required, reboot_required) {
            (true, _) => None,
            (false, true) => Some(format!(
                "root modules change only at boot: reboot-instance {id} (runtime modules are \
                 reconciled live by the agent)"
            )),
            (false, false) => Some(format!(
                "the agent reconciles runtime modules live; update-modules {id} asks it now"
            )),
        };
        Ok(DriftReport {
            drift: !items.is_empty(),
            instance_id: id.to_string(),
            items,
            reboot_required,
            recovery,
        })
    }

    /// What the template of `node_id` wants, with pinned digests.
    pub(crate) fn desired_set(&self, template_id: &str) -> Option<crate::drift::DesiredSet> {
        let mut t = self.template(template_id)?.clone();
        self.modules.apply_to_template(&mut t);
        let pinned = self
            .modules
            .desired(&t, "")
            .into_iter()
            .map(|m| (m.name, m.digest))
            .collect();
        Some(crate::drift::DesiredSet::new(&t, pinned))
    }

    /// Desired modules (the node's template) against what the last heartbeat said
    /// is running.
    pub(crate) fn drift_items(&self, mem: &Mem, inst: &InstRec) -> Vec<DriftItem> {
        mem.nodes
            .get(&inst.node_id)
            .and_then(|n| self.desired_set(&n.template_id))
            .map(|set| crate::drift::items(&set, inst))
            .unwrap_or_default()
    }

    /// Destroys an instance's machine (no lock held) and records what was done.
    pub(super) async fn destroy_and_record(&self, instance_id: &str) -> AppResult<()> {
        let st = self.clone();
        let owned = instance_id.to_string();
        let result = tokio::task::spawn_blocking(move || st.provider.destroy(&owned))
            .await
            .map_err(|e| AppError::internal(&e))?;
        self.mutate(|mem, now| {
            let doc: ProviderRecord = match result {
                Ok(record) => record,
                Err(e) => json!({"provider": self.provider.name(), "action": "destroy", "error": e.chain()}),
            };
            mem.ops.push(Op::ProviderRecord {
                instance_id: instance_id.to_string(),
                action: "destroy".to_string(),
                at_ms: now,
                doc,
            });
            Ok(())
        })
        .await
    }
}
