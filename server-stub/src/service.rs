//! The control plane's behaviour: every admin and node action as a method on
//! [`AppState`], independent of HTTP. Handlers in [`crate::api`] only decode, call
//! one method and encode.
//!
//! Concurrency: one `std` mutex guards [`Mem`]; it is never held across an await.
//! Every change that must be durable before the answer goes through
//! [`AppState::mutate`], which also holds an async write lock so SQLite sees changes in
//! the order memory saw them. Routine heartbeats skip both: they update memory and
//! mark the instance dirty for the batch flusher.

use std::sync::{Arc, Mutex, MutexGuard};

use axum::http::StatusCode;
use powernode_proto::admin::{
    self, Catalog, CreateNodeRequest, DeleteNodeResponse, DrainRequest, DriftItem, DriftReport,
    InstanceActionResponse, ProvisionRequest, ProvisionResponse, TerminateRequest,
    UpdateNodeRequest,
};
use powernode_proto::node::{
    CompleteTaskRequest, CompleteTaskResponse, DesiredModulesResponse, EnrollmentRequest,
    EnrollmentResponse, FailureReport, HandshakeRequest, HandshakeResponse, HeartbeatRequest,
    HeartbeatResponse, LeaseRequest, LeaseResponse, LeasedTask, Phase, RenewLeaseRequest,
    RenewLeaseResponse, RenewRequest,
};
use powernode_proto::{
    ErrorCode, IdentityDocument, InstanceStatus, NetworkConfig, TaskKind, TaskStatus,
};
use serde_json::json;
use sha2::Digest;

use crate::ca::{Ca, ClientIdentity, CsrError};
use crate::clock::{format_ts, Clock, Millis};
use crate::config::{url_host, Config};
use crate::error::{AppError, AppResult};
use crate::images::{read_image_dir_cached, DigestCache, Publication};
use crate::model::{self, new_id, CertRec, InstRec, Mem, NodeRec, Op, TaskRec, TokenRec};
use crate::provider::{Provider, ProviderError, ProviderRecord, ProvisionSpec};
use crate::store::{Store, StoreError};

mod attribution;
mod module_store;
pub mod modules;
mod tasks;

/// How long a provision call waits for the provider before answering `pending`.
const PROVISION_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Shared {
    pub cfg: Config,
    /// Control-plane URL put into identity documents.
    pub public_url: String,
    pub clock: Clock,
    pub ca: Ca,
    pub store: Store,
    pub provider: Box<dyn Provider>,
    pub catalog: Catalog,
    /// Embedded registry, module-signing key, module publications.
    pub modules: module_store::Modules,
    admin_token_hash: [u8; 32],
    /// When this process started serving: silence is only counted from here, since
    /// heartbeats sent while the server was down could not arrive.
    started_ms: Millis,
    mem: Mutex<Mem>,
    write_lock: tokio::sync::Mutex<()>,
    /// Netboot image publications, oldest first (also in SQLite).
    publications: Mutex<Vec<Publication>>,
    /// Serialises publishers so two never record the same image twice.
    publish_lock: tokio::sync::Mutex<()>,
    /// Why the image folder could not be published last time (for the 422 answer).
    last_image_error: Mutex<Option<String>>,
    /// Digests of the image folder's files, so a provision does not re-hash them.
    image_digests: Arc<DigestCache>,
    /// What the sensor last saw of module publications and template module lists,
    /// to notice changes made through the module admin routes.
    module_watch: Mutex<ModuleWatch>,
}

/// Module lists per template, `(root, runtime)`.
type TemplateLists = std::collections::BTreeMap<String, (Vec<String>, Vec<String>)>;

#[derive(Debug, Default)]
struct ModuleWatch {
    /// `Modules::generation` when last compared.
    generation: u64,
    publications: usize,
    templates: TemplateLists,
}

/// A module change the sensor noticed.
#[derive(Debug)]
enum ModuleChange {
    Published(crate::model::ModulePublication),
    TemplateChanged {
        template_id: String,
        before: (Vec<String>, Vec<String>),
        after: (Vec<String>, Vec<String>),
    },
}

/// How long after a reboot task was leased the node may enroll again with its
/// (already used) bootstrap token.
const REENROLL_WINDOW_MS: Millis = 10 * 60 * 1000;

/// At most one `instance.refused` signal per instance in this period.
const REFUSAL_SIGNAL_EVERY_MS: Millis = 60 * 1000;

/// Cheap to clone; shared by every handler and background task.
#[derive(Clone)]
pub struct AppState(pub Arc<Shared>);

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

fn token_hash(token: &str) -> String {
    hex::encode(sha256(token.as_bytes()))
}

fn random_secret() -> String {
    let mut b = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut b[..]);
    hex::encode(b)
}

fn invalid_transition(msg: impl Into<String>) -> AppError {
    AppError::conflict(ErrorCode::InvalidTransition, msg)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

impl AppState {
    pub fn new(
        cfg: Config,
        public_url: String,
        clock: Clock,
        ca: Ca,
        store: Store,
        admin_token: &str,
    ) -> Result<Self, StoreError> {
        let provider = crate::provider::from_mode(cfg.provider, cfg.image_base.clone());
        Self::with_provider(cfg, public_url, clock, ca, store, admin_token, provider)
    }

    /// [`AppState::new`] with a given provider (tests use slow or failing ones).
    pub fn with_provider(
        cfg: Config,
        public_url: String,
        clock: Clock,
        ca: Ca,
        store: Store,
        admin_token: &str,
        provider: Box<dyn Provider>,
    ) -> Result<Self, StoreError> {
        let mut mem = store.load()?;
        let publications = store.load_publications()?;
        let started_ms = clock.now_ms();
        let recovered = recover_lost_vms(&store, &mut mem, started_ms)?;
        if recovered > 0 {
            tracing::warn!(
                instances = recovered,
                "instances whose VM did not survive the server restart were marked failed"
            );
        }
        let modules =
            module_store::Modules::load(&cfg.data_dir, &store, cfg.registry_max_blob_bytes)?;
        let catalog = crate::catalog::catalog();
        let module_watch = ModuleWatch {
            generation: modules.generation(),
            publications: modules.publications().len(),
            templates: template_lists(&modules, &catalog),
        };
        Ok(Self(Arc::new(Shared {
            cfg,
            public_url,
            clock,
            ca,
            store,
            provider,
            catalog,
            modules,
            admin_token_hash: sha256(admin_token.as_bytes()),
            started_ms,
            mem: Mutex::new(mem),
            write_lock: tokio::sync::Mutex::new(()),
            publications: Mutex::new(publications),
            publish_lock: tokio::sync::Mutex::new(()),
            last_image_error: Mutex::new(None),
            image_digests: Arc::default(),
            module_watch: Mutex::new(module_watch),
        })))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Mem> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Constant-time check of a presented admin token.
    pub fn admin_token_ok(&self, presented: &str) -> bool {
        let h = sha256(presented.as_bytes());
        h.iter()
            .zip(self.admin_token_hash.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// Runs `f` on the state and writes what it changed before returning. `f`
    /// validates before it changes anything; its writes are kept even when it ends in
    /// an error (e.g. a provider failure recorded on the instance).
    pub async fn mutate<T>(
        &self,
        f: impl FnOnce(&mut Mem, Millis) -> AppResult<T>,
    ) -> AppResult<T> {
        let _w = self.write_lock.lock().await;
        let now = self.clock.now_ms();
        let (res, ops) = {
            let mut mem = self.lock();
            let r = f(&mut mem, now);
            (r, std::mem::take(&mut mem.ops))
        };
        self.store.apply(ops).await?;
        res
    }

    /// Writes the heartbeat state of dirty instances in one transaction.
    pub async fn flush_dirty(&self) -> Result<usize, StoreError> {
        let _w = self.write_lock.lock().await;
        let (ids, ops): (Vec<String>, Vec<Op>) = {
            let mut mem = self.lock();
            let ids: Vec<String> = mem.dirty.drain().collect();
            let ops = ids
                .iter()
                .filter_map(|id| {
                    mem.instances
                        .get(id)
                        .cloned()
                        .map(|i| Op::Instance(Box::new(i)))
                })
                .collect();
            (ids, ops)
        };
        let n = ops.len();
        if let Err(e) = self.store.apply(ops).await {
            // Keep them dirty so the next flush tries again.
            self.lock().dirty.extend(ids);
            return Err(e);
        }
        Ok(n)
    }

    /// Synchronous final flush at shutdown.
    pub fn flush_dirty_blocking(&self) -> Result<usize, StoreError> {
        let ops: Vec<Op> = {
            let mut mem = self.lock();
            let ids: Vec<String> = mem.dirty.drain().collect();
            ids.iter()
                .filter_map(|id| {
                    mem.instances
                        .get(id)
                        .cloned()
                        .map(|i| Op::Instance(Box::new(i)))
                })
                .collect()
        };
        self.store.apply_blocking(&ops)?;
        Ok(ops.len())
    }

    // ----- admin: nodes and catalog -------------------------------------------------

    pub fn catalog(&self) -> Catalog {
        let mut c = self.catalog.clone();
        for t in &mut c.templates {
            self.modules.apply_to_template(t);
        }
        c
    }

    /// `host[:port]` of the public URL: how nodes name the embedded registry.
    pub(crate) fn public_host(&self) -> &str {
        url_host(&self.public_url).unwrap_or("localhost")
    }

    fn template(&self, id: &str) -> Option<&admin::Template> {
        self.catalog.templates.iter().find(|t| t.id == id)
    }

    pub async fn create_node(&self, req: CreateNodeRequest) -> AppResult<admin::Node> {
        if !valid_name(&req.hostname) {
            return Err(AppError::bad_request(
                "hostname must be 1-253 ASCII letters, digits, '-', '_' or '.'",
            ));
        }
        if self.template(&req.template_id).is_none() {
            return Err(AppError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::UnknownTemplate,
                format!(
                    "unknown template {:?} (see list-templates)",
                    req.template_id
                ),
            ));
        }
        self.mutate(|mem, now| {
            let node = NodeRec {
                id: new_id("node"),
                hostname: req.hostname,
                template_id: req.template_id,
                lifecycle_class: req.lifecycle_class,
                lifecycle_class_locked: false,
                labels: req.labels,
                current_instance_id: None,
                instance_history: Vec::new(),
                created_ms: now,
            };
            let id = node.id.clone();
            mem.nodes.insert(id.clone(), node);
            mem.save_node(&id);
            mem.event(now, "node.created", Some(&id), None, json!({}));
            Ok(mem.node_view(&mem.nodes[&id]))
        })
        .await
    }

    pub fn get_node(&self, id: &str) -> AppResult<admin::Node> {
        let mem = self.lock();
        let node = mem
            .nodes
            .get(id)
            .ok_or_else(|| AppError::not_found("node", id))?;
        Ok(mem.node_view(node))
    }

    pub fn list_nodes(&self) -> Vec<admin::Node> {
        let mem = self.lock();
        let mut nodes: Vec<_> = mem.nodes.values().map(|n| mem.node_view(n)).collect();
        nodes.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        nodes
    }

    pub async fn update_node(&self, id: &str, req: UpdateNodeRequest) -> AppResult<admin::Node> {
        self.mutate(|mem, now| {
            let node = mem
                .nodes
                .get(id)
                .ok_or_else(|| AppError::not_found("node", id))?;
            if let Some(class) = req.lifecycle_class {
                if node.lifecycle_class_locked && class != node.lifecycle_class {
                    return Err(AppError::conflict(
                        ErrorCode::LifecycleClassImmutable,
                        format!(
                            "lifecycle_class is {} and fixed since the first provision",
                            node.lifecycle_class.as_str()
                        ),
                    ));
                }
            }
            let node = mem
                .nodes
                .get_mut(id)
                .ok_or_else(|| AppError::not_found("node", id))?;
            if let Some(class) = req.lifecycle_class {
                node.lifecycle_class = class;
            }
            if let Some(labels) = req.labels {
                node.labels = labels;
            }
            mem.save_node(id);
            mem.event(now, "node.updated", Some(id), None, json!({}));
            Ok(mem.node_view(&mem.nodes[id]))
        })
        .await
    }

    pub async fn delete_node(&self, id: &str) -> AppResult<DeleteNodeResponse> {
        self.mutate(|mem, now| {
            let node = mem
                .nodes
                .get(id)
                .ok_or_else(|| AppError::not_found("node", id))?;
            if let Some(inst) = mem.live_instance(node) {
                return Err(AppError::conflict(
                    ErrorCode::NodeHasLiveInstance,
                    format!(
                        "node has live instance {} ({}): terminate it first",
                        inst.id, inst.status
                    ),
                ));
            }
            mem.nodes.remove(id);
            mem.ops.push(Op::DeleteNode(id.to_string()));
            mem.event(now, "node.deleted", Some(id), None, json!({}));
            Ok(DeleteNodeResponse {
                deleted: true,
                node_id: id.to_string(),
            })
        })
        .await
    }

    // ----- admin: instances ----------------------------------------------------------

    pub async fn provision(
        &self,
        node_id: &str,
        req: ProvisionRequest,
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
                let task_id = new_id("task");
                let token = random_secret();
                let inst = InstRec {
                    id: instance_id.clone(),
                    node_id: node.id.clone(),
                    status: InstanceStatus::Pending,
                    task_id: Some(task_id.clone()),
                    instance_type: instance_type.id.clone(),
                    region: region.clone(),
                    provider: self.provider.name().to_string(),
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
                    task_ids: vec![task_id.clone()],
                    silent_signal: None,
                    stuck_signal: None,
                    drift_signal: None,
                    bootstrap_failed_signal: None,
                    drift_key: String::new(),
                    last_refused_ms: None,
                    systemd: None,
                    systemd_signal: None,
                    reboot_expected_ms: None,
                };
                mem.instances.insert(instance_id.clone(), inst);
                mem.save_instance(&instance_id);
                mem.tasks.insert(
                    task_id.clone(),
                    TaskRec {
                        id: task_id.clone(),
                        instance_id: instance_id.clone(),
                        kind: TaskKind::Provision,
                        status: TaskStatus::Running,
                        params: json!({"instance_type": instance_type.id, "region": region}),
                        result: serde_json::Value::Null,
                        progress: None,
                        lease_token: None,
                        lease_expires_ms: None,
                        attempts: 1,
                        leased_ms: None,
                        history: Vec::new(),
                        created_ms: now,
                        updated_ms: now,
                    },
                );
                mem.save_task(&task_id);
                let tok = TokenRec {
                    hash: token_hash(&token),
                    instance_id: instance_id.clone(),
                    node_id: node.id.clone(),
                    created_ms: now,
                    used_ms: None,
                    revoked: false,
                    reenroll_until_ms: None,
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
                    module_trust_keys: Vec::new(),
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
        // creation, a loaded host) answers `pending` after PROVISION_ANSWER_WAIT and
        // finishes in the background; a quick one answers with its outcome.
        let st = self.clone();
        let tid = task_id.clone();
        let work = tokio::spawn(async move { st.run_provider(spec, tid).await });
        match tokio::time::timeout(PROVISION_ANSWER_WAIT, work).await {
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
        let result = tokio::task::spawn_blocking(move || st.provider.provision(&spec))
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
                            false,
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

    /// The identity document the provider handed (or would hand) the VM.
    pub async fn instance_identity(&self, id: &str) -> AppResult<serde_json::Value> {
        if !self.lock().instances.contains_key(id) {
            return Err(AppError::not_found("instance", id));
        }
        let record = self
            .store
            .provider_record(id.to_string(), "provision")
            .await?
            .ok_or_else(|| AppError::not_found("identity document of instance", id))?;
        record
            .get("identity")
            .cloned()
            .ok_or_else(|| AppError::not_found("identity document of instance", id))
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
            let moot: Vec<String> = inst
                .task_ids
                .iter()
                .filter(|t| {
                    mem.tasks.get(*t).is_some_and(|t| {
                        matches!(t.kind, TaskKind::ModuleUpdate | TaskKind::Reboot)
                            && t.status == TaskStatus::Pending
                    })
                })
                .cloned()
                .collect();
            for t in &moot {
                finish_task(
                    mem,
                    now,
                    t,
                    TaskStatus::Cancelled,
                    json!({"reason": "the instance is draining: a cordoned node takes no new work"}),
                );
            }
            let task_id = new_id("task");
            mem.tasks.insert(
                task_id.clone(),
                TaskRec {
                    id: task_id.clone(),
                    instance_id: id.to_string(),
                    kind: TaskKind::Drain,
                    status: TaskStatus::Pending,
                    params: json!({"timeout_seconds": req.timeout_seconds, "cordon_only": req.cordon_only}),
                    result: serde_json::Value::Null,
                    progress: None,
                    lease_token: None,
                    lease_expires_ms: None,
                    attempts: 0,
                    leased_ms: None,
                    history: Vec::new(),
                    created_ms: now,
                    updated_ms: now,
                },
            );
            mem.save_task(&task_id);
            if let Some(inst) = mem.instances.get_mut(id) {
                inst.task_ids.push(task_id.clone());
                inst.task_id = Some(task_id.clone());
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
                finish_open_tasks(
                    mem,
                    now,
                    id,
                    TaskStatus::Cancelled,
                    &json!({"reason": "instance terminated"}),
                );
                let task_id = new_id("task");
                mem.tasks.insert(
                    task_id.clone(),
                    TaskRec {
                        id: task_id.clone(),
                        instance_id: id.to_string(),
                        kind: TaskKind::Terminate,
                        status: TaskStatus::Running,
                        params: json!({"force": req.force}),
                        result: serde_json::Value::Null,
                        progress: None,
                        lease_token: None,
                        lease_expires_ms: None,
                        attempts: 1,
                        leased_ms: None,
                        history: Vec::new(),
                        created_ms: now,
                        updated_ms: now,
                    },
                );
                mem.save_task(&task_id);
                if let Some(inst) = mem.instances.get_mut(id) {
                    inst.task_ids.push(task_id.clone());
                    inst.task_id = Some(task_id.clone());
                }
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
        self.mutate(|mem, now| match result {
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
        .await
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

    // ----- admin: tasks, signals, events ---------------------------------------------

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

    /// Destroys an instance's machine (no lock held) and records what was done.
    async fn destroy_and_record(&self, instance_id: &str) -> AppResult<()> {
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

    /// Notices VMs that ended on their own: an event, and the instance fails with
    /// the reason unless it was being terminated anyway, or the guest rebooted after
    /// it was handed a reboot task (QEMU runs with `-no-reboot`, so a guest reboot
    /// ends the process): then the provider starts the VM again, as a machine's own
    /// reset would, and the node boots back to `running`.
    pub async fn reap_vms(&self) -> AppResult<usize> {
        let exits = self.provider.poll_exited();
        if exits.is_empty() {
            return Ok(0);
        }
        let n = exits.len();
        let rebooting = self
            .mutate(|mem, now| {
                let mut rebooting = Vec::new();
                for ex in exits {
                    let Some(inst) = mem.instances.get(&ex.instance_id) else {
                        continue;
                    };
                    let (status, node_id) = (inst.status, inst.node_id.clone());
                    let reboot = ex.clean
                        && status.is_live()
                        && status != InstanceStatus::Terminating
                        && inst
                            .reboot_expected_ms
                            .is_some_and(|t| now.saturating_sub(t) < REENROLL_WINDOW_MS);
                    mem.event(
                        now,
                        "vm.exited",
                        Some(&node_id),
                        Some(&ex.instance_id),
                        json!({"pid": ex.pid, "status": ex.status, "serial_tail": ex.serial_tail, "reboot": reboot}),
                    );
                    if reboot {
                        if let Some(inst) = mem.instances.get_mut(&ex.instance_id) {
                            inst.reboot_expected_ms = None;
                        }
                        mem.save_instance(&ex.instance_id);
                        rebooting.push((ex.instance_id, node_id));
                    } else if status.is_live() && status != InstanceStatus::Terminating {
                        let message = format!(
                            "the VM exited on its own (QEMU pid {}, {}) while the instance was {status}; last console lines: {}",
                            ex.pid, ex.status, ex.serial_tail
                        );
                        vm_lost(mem, now, &ex.instance_id, &message);
                    }
                }
                Ok(rebooting)
            })
            .await?;
        for (instance_id, node_id) in rebooting {
            let st = self.clone();
            let id = instance_id.clone();
            let result = tokio::task::spawn_blocking(move || st.provider.restart(&id))
                .await
                .map_err(|e| AppError::internal(&e))?;
            self.mutate(|mem, now| {
                match result {
                    Ok(record) => vm_started(
                        mem,
                        now,
                        self.provider.name(),
                        (&instance_id, &node_id),
                        record,
                        true,
                    ),
                    Err(e) => {
                        let message = format!(
                            "the guest rebooted and its VM could not be started again: {}",
                            e.chain()
                        );
                        vm_lost(mem, now, &instance_id, &message);
                    }
                }
                Ok(())
            })
            .await?;
        }
        Ok(n)
    }

    /// Kills every VM (server shutdown).
    pub fn shutdown_vms(&self) -> usize {
        self.provider.shutdown()
    }

    // ----- admin: netboot image publications -------------------------------------------

    /// Publications, newest first.
    pub fn list_publications(&self) -> Vec<Publication> {
        let mut v = self
            .publications
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        v.reverse();
        v
    }

    /// Reads an image folder's manifest (default: `--image-base`), checks its files
    /// and records a publication unless the newest one for its platform and arch
    /// already says the same.
    pub async fn publish_image(&self, dir: Option<std::path::PathBuf>) -> AppResult<Publication> {
        let dir = dir.or_else(|| self.cfg.image_base.clone()).ok_or_else(|| {
            AppError::bad_request(
                "no image folder: pass image_base or start the server with --image-base",
            )
        })?;
        let digests = self.image_digests.clone();
        let facts = tokio::task::spawn_blocking(move || read_image_dir_cached(&dir, &digests))
            .await
            .map_err(|e| AppError::internal(&e))?;
        let facts = match facts {
            Ok(f) => f,
            Err(e) => {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(c) = src {
                    msg.push_str(&format!(": {c}"));
                    src = c.source();
                }
                *self
                    .last_image_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
                return Err(AppError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    ErrorCode::MissingNetbootImageError,
                    msg,
                ));
            }
        };
        let _p = self.publish_lock.lock().await;
        *self
            .last_image_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        let newest = self
            .list_publications()
            .into_iter()
            .find(|p| p.platform == facts.platform && p.arch == facts.arch);
        if let Some(p) = newest.filter(|p| p.same_as(&facts)) {
            return Ok(p);
        }
        let now = self.clock.now_ms();
        let publication = Publication {
            id: new_id("pub"),
            platform: facts.platform,
            arch: facts.arch,
            kernel_version: facts.kernel_version,
            kernel_release: facts.kernel_release,
            vmlinuz_sha256: facts.vmlinuz_sha256,
            initramfs_sha256: facts.initramfs_sha256,
            path: facts.path,
            cmdline: facts.cmdline,
            disk_image: facts.disk_image,
            created_at: format_ts(now),
            created_ms: now,
        };
        self.store.insert_publication(publication.clone()).await?;
        self.publications
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(publication.clone());
        let detail = serde_json::to_value(&publication).unwrap_or_default();
        self.mutate(|mem, now| {
            mem.event(now, "image.published", None, None, detail);
            Ok(())
        })
        .await?;
        tracing::info!(id = %publication.id, path = %publication.path.display(), "netboot image published");
        Ok(publication)
    }

    // ----- node API ------------------------------------------------------------------

    pub async fn enroll(&self, req: EnrollmentRequest) -> AppResult<EnrollmentResponse> {
        let ttl_ms = (self.cfg.token_ttl_seconds as i64).saturating_mul(1000);
        self.mutate(|mem, now| {
            let hash = token_hash(&req.bootstrap_token);
            let tok = mem.tokens.get(&hash).cloned().ok_or_else(|| {
                AppError::unauthorized(ErrorCode::BootstrapTokenInvalid, "unknown bootstrap token")
            })?;
            // A decommissioned node trying again is refused, and the refusal is
            // recorded where the operator looks (signals), not only in its log.
            let refuse = |mem: &mut Mem, code: ErrorCode, message: &str| {
                let withdrawn = mem.instances.get_mut(&tok.instance_id).filter(|i| {
                    !i.status.is_live()
                        && i
                            .last_refused_ms
                            .is_none_or(|t| now - t >= REFUSAL_SIGNAL_EVERY_MS)
                });
                if let Some(inst) = withdrawn {
                    inst.last_refused_ms = Some(now);
                    mem.save_instance(&tok.instance_id);
                    mem.signal(
                        now,
                        "instance.refused",
                        &tok.instance_id,
                        false,
                        json!({
                            "code": code, "path": powernode_proto::paths::ENROLLMENT,
                            "reason": "a node enrolled with the bootstrap token of an instance that is no longer live",
                        }),
                    );
                }
                AppError::unauthorized(code, message)
            };
            // One more enrollment after a reboot task (ephemeral nodes come back with
            // nothing but their identity document).
            let reenroll = tok.used_ms.is_some()
                && !tok.revoked
                && tok.reenroll_until_ms.is_some_and(|u| now <= u)
                && mem
                    .instances
                    .get(&tok.instance_id)
                    .is_some_and(|i| matches!(i.status, InstanceStatus::Running | InstanceStatus::Bootstrapping));
            if tok.used_ms.is_some() && !reenroll {
                return Err(refuse(
                    mem,
                    ErrorCode::BootstrapTokenUsed,
                    "bootstrap token was already used",
                ));
            }
            if tok.revoked {
                return Err(refuse(
                    mem,
                    ErrorCode::BootstrapTokenExpired,
                    "bootstrap token has expired (its instance was terminated or cancelled)",
                ));
            }
            if now - tok.created_ms > ttl_ms && !reenroll {
                return Err(AppError::unauthorized(
                    ErrorCode::BootstrapTokenExpired,
                    "bootstrap token has expired",
                ));
            }
            if req.instance_id != tok.instance_id || req.node_id != tok.node_id {
                return Err(AppError::forbidden(
                    ErrorCode::CsrInstanceMismatch,
                    "the request names another instance than the bootstrap token",
                ));
            }
            let inst = mem.instances.get(&tok.instance_id).ok_or_else(|| {
                AppError::unauthorized(ErrorCode::BootstrapTokenInvalid, "token's instance is gone")
            })?;
            if !reenroll && !inst.status.can_transition_to(InstanceStatus::Bootstrapping) {
                return Err(invalid_transition(format!(
                    "instance is {}, not provisioning",
                    inst.status
                )));
            }
            let issued = self
                .ca
                .issue_node_cert(
                    &req.csr_pem,
                    &tok.instance_id,
                    now,
                    self.cfg.cert_ttl_seconds,
                )
                .map_err(csr_error)?;
            if reenroll {
                // The old key is gone with the reboot: its certificates go too.
                let old: Vec<String> = mem
                    .certs
                    .values()
                    .filter(|c| c.instance_id == tok.instance_id && !c.revoked)
                    .map(|c| c.serial.clone())
                    .collect();
                for serial in &old {
                    if let Some(c) = mem.certs.get_mut(serial) {
                        c.revoked = true;
                        mem.ops.push(Op::Cert(c.clone()));
                    }
                }
                mem.event(
                    now,
                    "instance.re_enrolled",
                    Some(&tok.node_id),
                    Some(&tok.instance_id),
                    json!({"reason": "reboot", "revoked_certificates": old}),
                );
                finish_reboot_tasks(mem, now, &tok.instance_id, "re_enrolled");
            }
            if let Some(t) = mem.tokens.get_mut(&hash) {
                t.used_ms = Some(now);
                t.reenroll_until_ms = None;
                let t = t.clone();
                mem.ops.push(Op::Token(t));
            }
            let cert = CertRec {
                serial: issued.serial.clone(),
                instance_id: tok.instance_id.clone(),
                issued_ms: now,
                not_after_ms: issued.not_after_ms,
                revoked: false,
            };
            mem.ops.push(Op::Cert(cert.clone()));
            mem.certs.insert(cert.serial.clone(), cert);
            if let Some(inst) = mem.instances.get_mut(&tok.instance_id) {
                inst.enrolled_ms = Some(now);
                inst.last_heartbeat_ms = Some(now);
                inst.identity_source = Some(req.identity_source.clone());
                inst.agent_version = Some(req.agent_version.clone());
                inst.provider_facts = req.provider.clone();
                inst.phase = Some(Phase::Enrolled);
            }
            mem.event(
                now,
                "instance.enrolled",
                Some(&tok.node_id),
                Some(&tok.instance_id),
                json!({
                    "identity_source": req.identity_source,
                    "agent_version": req.agent_version,
                    "provider": req.provider,
                    "serial": issued.serial,
                }),
            );
            if !reenroll {
                mem.set_status(now, &tok.instance_id, InstanceStatus::Bootstrapping);
            }
            Ok(EnrollmentResponse {
                certificate_pem: issued.pem,
                ca_pem: self.ca.cert_pem().to_string(),
                not_after: format_ts(issued.not_after_ms),
                serial: issued.serial,
                node_id: tok.node_id,
                instance_id: tok.instance_id,
                heartbeat_interval_seconds: self.cfg.heartbeat_interval_seconds,
            })
        })
        .await
    }

    pub async fn renew_certificate(
        &self,
        ident: &ClientIdentity,
        req: RenewRequest,
    ) -> AppResult<EnrollmentResponse> {
        self.mutate(|mem, now| {
            authorize(mem, ident, Some(&req.instance_id))?;
            let node_id = mem.instances[&ident.instance_id].node_id.clone();
            let issued = self
                .ca
                .issue_node_cert(
                    &req.csr_pem,
                    &ident.instance_id,
                    now,
                    self.cfg.cert_ttl_seconds,
                )
                .map_err(csr_error)?;
            let cert = CertRec {
                serial: issued.serial.clone(),
                instance_id: ident.instance_id.clone(),
                issued_ms: now,
                not_after_ms: issued.not_after_ms,
                revoked: false,
            };
            mem.ops.push(Op::Cert(cert.clone()));
            mem.certs.insert(cert.serial.clone(), cert);
            mem.event(
                now,
                "certificate.renewed",
                Some(&node_id),
                Some(&ident.instance_id),
                json!({"old_serial": ident.serial, "serial": issued.serial}),
            );
            Ok(EnrollmentResponse {
                certificate_pem: issued.pem,
                ca_pem: self.ca.cert_pem().to_string(),
                not_after: format_ts(issued.not_after_ms),
                serial: issued.serial,
                node_id,
                instance_id: ident.instance_id.clone(),
                heartbeat_interval_seconds: self.cfg.heartbeat_interval_seconds,
            })
        })
        .await
    }

    pub async fn handshake(
        &self,
        ident: &ClientIdentity,
        req: HandshakeRequest,
    ) -> AppResult<HandshakeResponse> {
        self.mutate(|mem, now| {
            authorize(mem, ident, Some(&req.instance_id))?;
            let id = ident.instance_id.as_str();
            let Some(inst) = mem.instances.get_mut(id) else {
                return Err(AppError::not_found("instance", id));
            };
            inst.phase = Some(req.phase);
            inst.last_heartbeat_ms = Some(now);
            inst.agent_version = Some(req.agent_version.clone());
            if !req.timeline.is_empty() {
                inst.boot_timeline = req.timeline.clone();
            }
            if req.root.is_some() {
                inst.root = req.root.clone();
            }
            let node_id = inst.node_id.clone();
            let status = inst.status;
            mem.event(
                now,
                "instance.handshake",
                Some(&node_id),
                Some(id),
                json!({"phase": req.phase, "agent_version": req.agent_version}),
            );
            if let Some(failure) = &req.failure {
                if let Some(inst) = mem.instances.get_mut(id) {
                    inst.failure = Some(failure.clone());
                }
                let prev = mem
                    .instances
                    .get(id)
                    .and_then(|i| i.bootstrap_failed_signal);
                if let Some(prev) = prev {
                    mem.ops.push(Op::SignalActive {
                        id: prev,
                        active: false,
                    });
                }
                let sig = mem.signal(
                    now,
                    "bootstrap.failed",
                    id,
                    true,
                    serde_json::to_value(failure).unwrap_or_default(),
                );
                if let Some(inst) = mem.instances.get_mut(id) {
                    inst.bootstrap_failed_signal = Some(sig);
                }
            }
            if req.phase == Phase::Ready && status == InstanceStatus::Bootstrapping {
                mark_running(mem, now, id);
            }
            // A handshake comes at boot: a leased reboot task has done its work.
            finish_reboot_tasks(mem, now, id, "came_back");
            mem.save_instance(id);
            Ok(HandshakeResponse {
                instance_status: mem.instances[id].status,
                heartbeat_interval_seconds: self.cfg.heartbeat_interval_seconds,
            })
        })
        .await
    }

    /// The hot path: memory only, unless the heartbeat changes the instance's state.
    pub async fn heartbeat(
        &self,
        ident: &ClientIdentity,
        req: HeartbeatRequest,
    ) -> AppResult<HeartbeatResponse> {
        let now = self.clock.now_ms();
        {
            let mut mem = self.lock();
            authorize(&mem, ident, Some(&req.instance_id))?;
            let id = ident.instance_id.as_str();
            let transition = req.phase == Phase::Ready
                && mem.instances[id].status == InstanceStatus::Bootstrapping;
            if !transition {
                apply_heartbeat(&mut mem, id, &req, now);
                mem.dirty.insert(id.to_string());
                return Ok(self.heartbeat_response(&mem, ident, now));
            }
        }
        self.mutate(|mem, now| {
            authorize(mem, ident, Some(&req.instance_id))?;
            let id = ident.instance_id.as_str();
            apply_heartbeat(mem, id, &req, now);
            if req.phase == Phase::Ready
                && mem.instances[id].status == InstanceStatus::Bootstrapping
            {
                mark_running(mem, now, id);
            }
            mem.save_instance(id);
            Ok(self.heartbeat_response(mem, ident, now))
        })
        .await
    }

    fn heartbeat_response(
        &self,
        mem: &Mem,
        ident: &ClientIdentity,
        now: Millis,
    ) -> HeartbeatResponse {
        let inst = &mem.instances[&ident.instance_id];
        HeartbeatResponse {
            instance_status: inst.status,
            heartbeat_interval_seconds: self.cfg.heartbeat_interval_seconds,
            tasks_pending: mem.has_pending_node_task(inst),
            renew_certificate: ident.renewal_due(now),
        }
    }

    pub fn desired_modules(&self, ident: &ClientIdentity) -> AppResult<DesiredModulesResponse> {
        let mem = self.lock();
        authorize(&mem, ident, None)?;
        let template = mem
            .instances
            .get(&ident.instance_id)
            .and_then(|i| mem.nodes.get(&i.node_id))
            .and_then(|n| self.template(&n.template_id));
        let host = self.public_host();
        Ok(DesiredModulesResponse {
            modules: template
                .map(|t| self.modules.desired(t, host))
                .unwrap_or_default(),
            trust_keys: self.modules.trust_keys(),
        })
    }

    pub async fn lease(
        &self,
        ident: &ClientIdentity,
        req: LeaseRequest,
    ) -> AppResult<LeaseResponse> {
        {
            // Fast answer when there is nothing to lease (agents poll this).
            let now = self.clock.now_ms();
            let mem = self.lock();
            authorize(&mem, ident, Some(&req.instance_id))?;
            let inst = &mem.instances[&ident.instance_id];
            let expired = inst.task_ids.iter().any(|t| {
                mem.tasks.get(t).is_some_and(|t| {
                    t.status == TaskStatus::Running
                        && t.kind.is_node_side()
                        && t.lease_expires_ms.is_some_and(|e| e < now)
                })
            });
            if !expired && !mem.has_pending_node_task(inst) {
                return Ok(LeaseResponse { task: None });
            }
        }
        let lease_max = self.cfg.lease_max_seconds.max(1);
        self.mutate(|mem, now| {
            authorize(mem, ident, Some(&req.instance_id))?;
            let id = ident.instance_id.clone();
            requeue_expired(mem, now, Some(&id));
            let next = mem.instances[&id]
                .task_ids
                .iter()
                .find(|t| {
                    mem.tasks
                        .get(*t)
                        .is_some_and(|t| t.kind.is_node_side() && t.status == TaskStatus::Pending)
                })
                .cloned();
            let Some(task_id) = next else {
                return Ok(LeaseResponse { task: None });
            };
            let secs = req.lease_seconds.clamp(1, lease_max);
            let token = random_secret();
            let expires = now + (secs as i64) * 1000;
            let Some(t) = mem.tasks.get_mut(&task_id) else {
                return Ok(LeaseResponse { task: None });
            };
            t.status = TaskStatus::Running;
            t.lease_token = Some(token.clone());
            t.lease_expires_ms = Some(expires);
            t.leased_ms = Some(now);
            t.attempts += 1;
            t.updated_ms = now;
            let kind = t.kind;
            let leased = LeasedTask {
                task_id: t.id.clone(),
                kind: t.kind,
                params: t.params.clone(),
                lease_expires_at: format_ts(expires),
                lease_token: token,
            };
            let attempts = t.attempts;
            mem.save_task(&task_id);
            if kind == TaskKind::Reboot {
                // The node may come back without credentials (ephemeral): its used
                // bootstrap token may enroll once more for a while.
                open_reenroll_window(mem, &id, expires + REENROLL_WINDOW_MS);
                if let Some(inst) = mem.instances.get_mut(&id) {
                    inst.reboot_expected_ms = Some(now);
                    mem.save_instance(&id);
                }
            }
            let node_id = mem.instances[&id].node_id.clone();
            mem.event(
                now,
                "task.leased",
                Some(&node_id),
                Some(&id),
                json!({"task_id": task_id, "kind": kind, "attempt": attempts}),
            );
            Ok(LeaseResponse { task: Some(leased) })
        })
        .await
    }

    pub async fn renew_lease(
        &self,
        ident: &ClientIdentity,
        task_id: &str,
        req: RenewLeaseRequest,
    ) -> AppResult<RenewLeaseResponse> {
        let lease_max = self.cfg.lease_max_seconds.max(1);
        self.mutate(|mem, now| {
            authorize(mem, ident, Some(&req.instance_id))?;
            let t = leased_task(mem, ident, task_id, &req.lease_token)?;
            if t.status == TaskStatus::Cancelled {
                return Ok(RenewLeaseResponse {
                    lease_expires_at: format_ts(now),
                    cancelled: true,
                });
            }
            if t.status != TaskStatus::Running {
                return Err(AppError::conflict(
                    ErrorCode::TaskNotLeased,
                    format!("task is {}", t.status.as_str()),
                ));
            }
            if t.lease_expires_ms.is_some_and(|e| e < now) {
                requeue_expired(mem, now, Some(&ident.instance_id));
                return Err(AppError::conflict(
                    ErrorCode::LeaseExpired,
                    "the lease expired; the task was requeued",
                ));
            }
            let secs = req.lease_seconds.clamp(1, lease_max);
            let expires = now + (secs as i64) * 1000;
            if let Some(t) = mem.tasks.get_mut(task_id) {
                t.lease_expires_ms = Some(expires);
                t.updated_ms = now;
                if req.progress.is_some() {
                    t.progress = req.progress.clone();
                }
            }
            mem.save_task(task_id);
            Ok(RenewLeaseResponse {
                lease_expires_at: format_ts(expires),
                cancelled: false,
            })
        })
        .await
    }

    pub async fn complete_task(
        &self,
        ident: &ClientIdentity,
        task_id: &str,
        req: CompleteTaskRequest,
    ) -> AppResult<CompleteTaskResponse> {
        if !req.status.is_final() {
            return Err(AppError::bad_request(
                "status must be succeeded, failed or cancelled",
            ));
        }
        self.mutate(|mem, now| {
            authorize(mem, ident, Some(&req.instance_id))?;
            let t = leased_task(mem, ident, task_id, &req.lease_token)?;
            let id = ident.instance_id.clone();
            let node_id = mem.instances[&id].node_id.clone();
            let result = tasks::bound_result(req.result.clone());
            match t.status {
                // Cancelled by the operator meanwhile: the agent's stop is the answer;
                // what it reported is kept beside the cancellation.
                TaskStatus::Cancelled => {
                    if let Some(t) = mem.tasks.get_mut(task_id) {
                        if let Some(obj) = t.result.as_object_mut() {
                            obj.insert("agent_status".into(), json!(req.status));
                            obj.insert("agent_result".into(), result);
                        }
                        t.updated_ms = now;
                    }
                    mem.save_task(task_id);
                }
                TaskStatus::Running => {
                    if t.kind == TaskKind::Reboot && req.status == TaskStatus::Succeeded {
                        open_reenroll_window(mem, &id, now + REENROLL_WINDOW_MS);
                    }
                    finish_task(mem, now, task_id, req.status, result);
                    if t.kind == TaskKind::Drain {
                        let kind = match req.status {
                            TaskStatus::Succeeded => "instance.drained",
                            _ => "instance.drain_unfinished",
                        };
                        mem.event(
                            now,
                            kind,
                            Some(&node_id),
                            Some(&id),
                            json!({"task_id": task_id, "status": req.status}),
                        );
                    }
                }
                other => {
                    return Err(AppError::conflict(
                        ErrorCode::TaskNotLeased,
                        format!("task is {}", other.as_str()),
                    ))
                }
            }
            Ok(CompleteTaskResponse {
                task_id: task_id.to_string(),
                status: mem.tasks[task_id].status,
                instance_status: mem.instances[&id].status,
            })
        })
        .await
    }

    // ----- sensors ---------------------------------------------------------------------

    /// One sensor pass: silence, stuck states, drift, expired leases. The scan only
    /// borrows; records are touched only where a condition starts or ends, so a quiet
    /// fleet costs one read pass under the lock (heartbeats wait on that lock).
    pub async fn sense(&self) -> AppResult<()> {
        let silent_ms = (self.cfg.silent_after_seconds as i64).saturating_mul(1000);
        let thresholds = self.cfg.stuck;
        let module_changes = self.module_changes();
        self.mutate(|mem, now| {
            requeue_expired(mem, now, None);
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

fn template_lists(modules: &module_store::Modules, catalog: &Catalog) -> TemplateLists {
    catalog
        .templates
        .iter()
        .map(|t| {
            let mut t = t.clone();
            modules.apply_to_template(&mut t);
            (t.id, (t.root_modules, t.runtime_modules))
        })
        .collect()
}

fn csr_error(e: CsrError) -> AppError {
    match e {
        CsrError::WrongInstance { .. } => {
            AppError::forbidden(ErrorCode::CsrInstanceMismatch, e.to_string())
        }
        CsrError::Sign(_) => AppError::internal(&e),
        CsrError::Unparsable(_) | CsrError::NotEd25519 | CsrError::NoCommonName => AppError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::CsrInvalid,
            e.to_string(),
        ),
    }
}

/// Checks a verified client certificate against the state: not revoked, bound to
/// the instance the body names, instance not terminated.
pub fn authorize(mem: &Mem, ident: &ClientIdentity, body_instance: Option<&str>) -> AppResult<()> {
    match mem.certs.get(&ident.serial) {
        Some(c) if c.revoked => {
            return Err(AppError::unauthorized(
                ErrorCode::CertificateRevoked,
                "this certificate was revoked",
            ))
        }
        Some(c) if c.instance_id == ident.instance_id => {}
        _ => {
            return Err(AppError::unauthorized(
                ErrorCode::ClientCertificateInvalid,
                "this certificate was not issued by this control plane",
            ))
        }
    }
    if let Some(b) = body_instance {
        if b != ident.instance_id {
            return Err(AppError::forbidden(
                ErrorCode::CertificateInstanceMismatch,
                format!(
                    "the certificate belongs to instance {}, not {b}",
                    ident.instance_id
                ),
            ));
        }
    }
    let inst = mem.instances.get(&ident.instance_id).ok_or_else(|| {
        AppError::unauthorized(ErrorCode::ClientCertificateInvalid, "unknown instance")
    })?;
    if inst.status == InstanceStatus::Terminated {
        return Err(AppError::forbidden(
            ErrorCode::InstanceTerminated,
            "the instance was terminated",
        ));
    }
    Ok(())
}

fn apply_heartbeat(mem: &mut Mem, id: &str, req: &HeartbeatRequest, now: Millis) {
    if let Some(inst) = mem.instances.get_mut(id) {
        inst.last_heartbeat_ms = Some(now);
        inst.phase = Some(req.phase);
        inst.uptime_seconds = req.uptime_seconds;
        if inst.agent_version.as_deref() != Some(req.agent_version.as_str()) {
            inst.agent_version = Some(req.agent_version.clone());
        }
        if inst.modules != req.modules {
            inst.modules = req.modules.clone();
        }
        if inst.services != req.services {
            inst.services = req.services.clone();
        }
        if req.last_reconcile.is_some() && inst.last_reconcile != req.last_reconcile {
            inst.last_reconcile = req.last_reconcile.clone();
        }
        if req.systemd.is_some() && inst.systemd != req.systemd {
            inst.systemd = req.systemd.clone();
        }
        if inst.status == InstanceStatus::Draining || req.cordoned {
            inst.cordoned = inst.cordoned || req.cordoned;
        } else {
            inst.cordoned = false;
        }
    }
}

fn mark_running(mem: &mut Mem, now: Millis, id: &str) {
    let provision: Vec<String> = mem.instances[id]
        .task_ids
        .iter()
        .filter(|t| {
            mem.tasks
                .get(*t)
                .is_some_and(|t| t.kind == TaskKind::Provision && !t.status.is_final())
        })
        .cloned()
        .collect();
    for t in provision {
        finish_task(mem, now, &t, TaskStatus::Succeeded, json!({"ready": true}));
    }
    mem.set_status(now, id, InstanceStatus::Running);
}

pub(crate) fn finish_task(
    mem: &mut Mem,
    now: Millis,
    id: &str,
    status: TaskStatus,
    result: serde_json::Value,
) {
    let Some(t) = mem.tasks.get_mut(id) else {
        return;
    };
    let from = t.status;
    t.status = status;
    t.result = result;
    t.lease_expires_ms = None;
    t.updated_ms = now;
    let (kind, inst_id) = (t.kind, t.instance_id.clone());
    mem.save_task(id);
    let node_id = mem.instances.get(&inst_id).map(|i| i.node_id.clone());
    mem.event(
        now,
        "task.status_changed",
        node_id.as_deref(),
        Some(&inst_id),
        json!({"task_id": id, "kind": kind, "from": from, "to": status}),
    );
}

/// Moves an instance to `failed` with a reason and withdraws its credentials.
fn fail_instance(mem: &mut Mem, now: Millis, id: &str, code: ErrorCode, message: &str) {
    if let Some(inst) = mem.instances.get_mut(id) {
        inst.failure = Some(FailureReport {
            phase: Phase::Failed,
            code,
            message: message.to_string(),
            attempt: 0,
            recovery: None,
        });
    }
    mem.revoke_credentials(now, id);
    mem.set_status(now, id, InstanceStatus::Failed);
}

/// The task named by a worker call, checked against the caller's instance and
/// lease token.
fn leased_task(
    mem: &Mem,
    ident: &ClientIdentity,
    task_id: &str,
    token: &str,
) -> AppResult<TaskRec> {
    let t = mem
        .tasks
        .get(task_id)
        .filter(|t| t.instance_id == ident.instance_id)
        .ok_or_else(|| AppError::not_found("task", task_id))?;
    match &t.lease_token {
        Some(held)
            if held.len() == token.len()
                && held
                    .bytes()
                    .zip(token.bytes())
                    .fold(0u8, |a, (x, y)| a | (x ^ y))
                    == 0 =>
        {
            Ok(t.clone())
        }
        _ if t.status == TaskStatus::Pending && t.attempts > 0 => Err(AppError::conflict(
            ErrorCode::LeaseExpired,
            "the lease expired; the task was requeued",
        )),
        _ => Err(AppError::conflict(
            ErrorCode::TaskNotLeased,
            "no lease with this token",
        )),
    }
}

/// Records a VM the provider started for an instance: its provider record and a
/// `provider.provision` event with the VM's pid and files, so an operator can find
/// them (`reboot`: started again after the guest rebooted).
fn vm_started(
    mem: &mut Mem,
    now: Millis,
    provider: &str,
    (instance_id, node_id): (&str, &str),
    record: ProviderRecord,
    reboot: bool,
) {
    let mut detail = json!({
        "provider": provider,
        "pid": record.get("pid"),
        "instance_dir": record.get("instance_dir"),
        "publication_id": record.get("publication_id"),
    });
    if reboot {
        detail["reboot"] = json!(true);
    }
    mem.ops.push(Op::ProviderRecord {
        instance_id: instance_id.to_string(),
        action: if reboot { "restart" } else { "provision" }.to_string(),
        at_ms: now,
        doc: record,
    });
    mem.event(
        now,
        "provider.provision",
        Some(node_id),
        Some(instance_id),
        detail,
    );
}

/// Ends the instance's unfinished tasks with `status` and `result`.
fn finish_open_tasks(
    mem: &mut Mem,
    now: Millis,
    instance_id: &str,
    status: TaskStatus,
    result: &serde_json::Value,
) {
    let open: Vec<String> = mem
        .instances
        .get(instance_id)
        .map(|i| {
            i.task_ids
                .iter()
                .filter(|t| mem.tasks.get(*t).is_some_and(|t| !t.status.is_final()))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for t in &open {
        finish_task(mem, now, t, status, result.clone());
    }
}

/// The instance's VM is gone for good: its open tasks fail and so does it.
fn vm_lost(mem: &mut Mem, now: Millis, instance_id: &str, message: &str) {
    finish_open_tasks(
        mem,
        now,
        instance_id,
        TaskStatus::Failed,
        &json!({"error": message}),
    );
    fail_instance(mem, now, instance_id, ErrorCode::ProviderFailed, message);
}

/// Lets the instance's used, unrevoked bootstrap tokens enroll once more until
/// `until` (a reboot is under way).
fn open_reenroll_window(mem: &mut Mem, instance_id: &str, until: Millis) {
    let hashes: Vec<String> = mem
        .tokens
        .values()
        .filter(|t| t.instance_id == instance_id && !t.revoked && t.used_ms.is_some())
        .map(|t| t.hash.clone())
        .collect();
    for h in hashes {
        if let Some(t) = mem.tokens.get_mut(&h) {
            t.reenroll_until_ms = Some(until.max(t.reenroll_until_ms.unwrap_or(0)));
            mem.ops.push(Op::Token(t.clone()));
        }
    }
}

/// A node that booted again while a reboot task was open: the reboot happened.
fn finish_reboot_tasks(mem: &mut Mem, now: Millis, instance_id: &str, how: &str) {
    let open: Vec<String> = mem
        .instances
        .get(instance_id)
        .map(|i| {
            i.task_ids
                .iter()
                .filter(|t| {
                    mem.tasks.get(*t).is_some_and(|t| {
                        t.kind == TaskKind::Reboot && t.status == TaskStatus::Running
                    })
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for t in open {
        finish_task(mem, now, &t, TaskStatus::Succeeded, json!({ how: true }));
    }
    if let Some(i) = mem.instances.get_mut(instance_id) {
        if i.reboot_expected_ms.take().is_some() {
            mem.save_instance(instance_id);
        }
    }
}

/// Puts node-side tasks whose lease ran out back to `pending`.
fn requeue_expired(mem: &mut Mem, now: Millis, instance_id: Option<&str>) {
    let expired: Vec<String> = mem
        .tasks
        .values()
        .filter(|t| {
            t.status == TaskStatus::Running
                && t.kind.is_node_side()
                && t.lease_expires_ms.is_some_and(|e| e < now)
                && instance_id.is_none_or(|i| i == t.instance_id)
        })
        .map(|t| t.id.clone())
        .collect();
    for id in expired {
        let Some(t) = mem.tasks.get_mut(&id) else {
            continue;
        };
        // The attempt that died is kept: when it was leased, how far it got.
        t.history.push(admin::TaskAttempt {
            attempt: t.attempts,
            leased_at: format_ts(t.leased_ms.unwrap_or(t.updated_ms)),
            ended_at: format_ts(now),
            outcome: "lease_expired".to_string(),
            progress: t.progress.take(),
            result: std::mem::take(&mut t.result),
        });
        t.status = TaskStatus::Pending;
        t.lease_token = None;
        t.lease_expires_ms = None;
        t.leased_ms = None;
        t.updated_ms = now;
        let (inst, attempts) = (t.instance_id.clone(), t.attempts);
        mem.save_task(&id);
        let node_id = mem.instances.get(&inst).map(|i| i.node_id.clone());
        mem.event(
            now,
            "task.lease_expired",
            node_id.as_deref(),
            Some(&inst),
            json!({"task_id": id, "attempts": attempts}),
        );
    }
}

/// At start: a live instance of the `real` provider has no VM any more (QEMU is a
/// child of the server and dies with it; one left running by a SIGKILLed server is
/// killed here). It is marked failed with the reason, its credentials withdrawn.
fn recover_lost_vms(store: &Store, mem: &mut Mem, now: Millis) -> Result<usize, StoreError> {
    let lost: Vec<String> = mem
        .instances
        .values()
        .filter(|i| i.provider == "real" && i.status.is_live())
        .map(|i| i.id.clone())
        .collect();
    for id in &lost {
        let record = store.provider_record_blocking(id, "provision")?;
        let pid = record
            .as_ref()
            .and_then(|r| r["pid"].as_u64())
            .map(|p| p as u32);
        let dir = record
            .as_ref()
            .and_then(|r| r["instance_dir"].as_str())
            .map(std::path::PathBuf::from);
        let message = match (pid, dir) {
            (Some(pid), Some(dir)) if crate::provider::orphan_vm_alive(pid, &dir) => {
                crate::provider::kill_orphan(pid);
                format!(
                    "the server restarted: its VM (QEMU pid {pid}) was left behind by a killed \
                     server and has been killed; VMs do not outlive the server that started them"
                )
            }
            (Some(pid), _) => format!(
                "the server restarted and the VM (QEMU pid {pid}) is gone: VMs are children of \
                 the server and do not survive it"
            ),
            (None, _) => "the server restarted before the VM was started".to_string(),
        };
        let status = mem.instances[id].status;
        mem.event(
            now,
            "vm.lost",
            None,
            Some(id),
            json!({"pid": pid, "was": status, "reason": message}),
        );
        vm_lost(mem, now, id, &message);
    }
    let ops = std::mem::take(&mut mem.ops);
    store.apply_blocking(&ops)?;
    Ok(lost.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Recorder;
    use std::time::{Duration, Instant};

    /// The recorder, slowed down like a VM start.
    #[derive(Debug)]
    struct Slow(Recorder, Duration);

    impl Provider for Slow {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn enabled(&self) -> bool {
            true
        }
        fn provision(
            &self,
            spec: &ProvisionSpec,
        ) -> Result<crate::provider::ProviderRecord, ProviderError> {
            std::thread::sleep(self.1);
            self.0.provision(spec)
        }
        fn destroy(&self, id: &str) -> Result<crate::provider::ProviderRecord, ProviderError> {
            std::thread::sleep(self.1);
            self.0.destroy(id)
        }
    }

    fn state(dir: &std::path::Path, delay: Duration) -> AppState {
        let cfg = Config::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
        AppState::with_provider(
            cfg,
            "https://127.0.0.1:1".into(),
            Clock::default(),
            Ca::load_or_create(dir).unwrap(),
            Store::open(dir).unwrap(),
            "admin",
            Box::new(Slow(Recorder { image_base: None }, delay)),
        )
        .unwrap()
    }

    /// A provider whose destroy fails: the instance stays `terminating`.
    #[derive(Debug)]
    struct NoDestroy(Recorder);

    impl Provider for NoDestroy {
        fn name(&self) -> &'static str {
            "nodestroy"
        }
        fn enabled(&self) -> bool {
            true
        }
        fn provision(
            &self,
            spec: &ProvisionSpec,
        ) -> Result<crate::provider::ProviderRecord, ProviderError> {
            self.0.provision(spec)
        }
        fn destroy(&self, _id: &str) -> Result<crate::provider::ProviderRecord, ProviderError> {
            Err(ProviderError::Failed(
                "the hypervisor does not answer".into(),
            ))
        }
    }

    fn state_with(dir: &std::path::Path, clock: Clock, provider: Box<dyn Provider>) -> AppState {
        let cfg = Config::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
        AppState::with_provider(
            cfg,
            "https://127.0.0.1:1".into(),
            clock,
            Ca::load_or_create(dir).unwrap(),
            Store::open(dir).unwrap(),
            "admin",
            provider,
        )
        .unwrap()
    }

    fn edge(h: &str) -> CreateNodeRequest {
        CreateNodeRequest {
            hostname: h.into(),
            template_id: crate::catalog::TEMPLATE_EDGE_BASE.into(),
            lifecycle_class: powernode_proto::LifecycleClass::Ephemeral,
            labels: Default::default(),
        }
    }

    async fn stuck_signal(st: &AppState, inst: &str) -> admin::Signal {
        st.recent_signals(100, Some(inst.to_string()))
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.kind == "instance.stuck" && s.active)
            .expect("an active instance.stuck signal")
    }

    /// The `pending` row: the provider has not answered yet (a boot that hangs).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_provider_that_never_answers_leaves_pending_stuck_with_cancel_as_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::default();
        let st = state_with(
            dir.path(),
            clock.clone(),
            Box::new(Slow(Recorder { image_base: None }, Duration::from_secs(3))),
        );
        let n = st.create_node(edge("p")).await.unwrap();
        let bg = st.clone();
        let id = n.id.clone();
        let prov =
            tokio::spawn(async move { bg.provision(&id, ProvisionRequest::default()).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let inst_id = st.get_node(&n.id).unwrap().current_instance_id.unwrap();
        assert_eq!(
            st.get_instance(&inst_id).unwrap().status,
            InstanceStatus::Pending
        );
        clock.advance_secs(301);
        st.sense().await.unwrap();
        let i = st.get_instance(&inst_id).unwrap();
        let stuck = i.stuck.expect("stuck");
        assert_eq!(stuck.reason, "pending_too_long");
        let task = i.task_id.unwrap();
        assert!(stuck.recovery.contains(&format!("cancel-task {task}")));
        let sig = stuck_signal(&st, &inst_id).await;
        assert_eq!(sig.detail["reason"], "pending_too_long");
        // The recovery works: cancel, the late VM is destroyed, the node is free.
        st.cancel_task(&task).await.unwrap();
        let _ = prov.await.unwrap();
        assert_eq!(
            st.get_instance(&inst_id).unwrap().status,
            InstanceStatus::Failed
        );
        st.provision(&n.id, ProvisionRequest::default())
            .await
            .unwrap();
    }

    /// The `terminating` row: the provider cannot destroy the VM.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_destroy_that_fails_leaves_terminating_stuck_with_retry_as_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::default();
        let st = state_with(
            dir.path(),
            clock.clone(),
            Box::new(NoDestroy(Recorder { image_base: None })),
        );
        let n = st.create_node(edge("t")).await.unwrap();
        let p = st
            .provision(&n.id, ProvisionRequest::default())
            .await
            .unwrap();
        let err = st
            .terminate(&p.instance.id, TerminateRequest { force: true })
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::ProviderFailed);
        assert!(err.message.contains("run terminate-instance again"));
        clock.advance_secs(301);
        st.sense().await.unwrap();
        let i = st.get_instance(&p.instance.id).unwrap();
        assert_eq!(i.status, InstanceStatus::Terminating);
        let stuck = i.stuck.expect("stuck");
        assert_eq!(stuck.reason, "terminating_too_long");
        assert!(stuck.recovery.contains("terminate-instance again"));
        assert_eq!(
            stuck_signal(&st, &p.instance.id).await.detail["reason"],
            "terminating_too_long"
        );
    }

    /// A refused node retrying within the signal period is answered without the
    /// write lock (held here by another writer) and records nothing more; after the
    /// period the next refusal is a fresh signal.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_repeated_refusal_takes_no_write_lock() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::default();
        let st = state_with(
            dir.path(),
            clock.clone(),
            Box::new(Recorder { image_base: None }),
        );
        let n = st.create_node(edge("r")).await.unwrap();
        let p = st
            .provision(&n.id, ProvisionRequest::default())
            .await
            .unwrap();
        let inst = p.instance.id.clone();
        st.terminate(&inst, TerminateRequest { force: true })
            .await
            .unwrap();
        let refuse = || st.record_refusal(&inst, "01", ErrorCode::CertificateRevoked, "hb");
        let refused = || async {
            st.recent_signals(100, Some(inst.clone()))
                .await
                .unwrap()
                .into_iter()
                .filter(|s| s.kind == "instance.refused")
                .count()
        };
        refuse().await;
        assert_eq!(refused().await, 1);
        {
            let _writer = st.write_lock.lock().await;
            tokio::time::timeout(Duration::from_secs(2), refuse())
                .await
                .expect("a repeated refusal waited for the write lock");
        }
        assert_eq!(refused().await, 1);
        clock.advance_secs(61);
        refuse().await;
        assert_eq!(refused().await, 2);
    }

    /// While a provider works (here 1.5 s), reads and other writes are not blocked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn providers_run_without_the_state_lock() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(dir.path(), Duration::from_millis(1500));
        let node = |h: &str| CreateNodeRequest {
            hostname: h.into(),
            template_id: crate::catalog::TEMPLATE_EDGE_BASE.into(),
            lifecycle_class: powernode_proto::LifecycleClass::Ephemeral,
            labels: Default::default(),
        };
        let n1 = st.create_node(node("a")).await.unwrap();
        let bg = st.clone();
        let id = n1.id.clone();
        let t = Instant::now();
        let prov =
            tokio::spawn(async move { bg.provision(&id, ProvisionRequest::default()).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let quick = Instant::now();
        let n2 = st.create_node(node("b")).await.unwrap();
        assert_eq!(st.list_nodes().len(), 2);
        st.get_node(&n2.id).unwrap();
        assert!(
            quick.elapsed() < Duration::from_millis(700),
            "a write waited {:?} for the provider",
            quick.elapsed()
        );
        let resp = prov.await.unwrap().unwrap();
        assert!(t.elapsed() >= Duration::from_millis(1500));
        assert_eq!(resp.instance.status, InstanceStatus::Provisioning);

        // Terminate: the destroy runs without the lock too.
        let st2 = st.clone();
        let inst = resp.instance.id.clone();
        let term =
            tokio::spawn(
                async move { st2.terminate(&inst, TerminateRequest { force: true }).await },
            );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let quick = Instant::now();
        assert_eq!(
            st.get_instance(&resp.instance.id).unwrap().status,
            InstanceStatus::Terminating
        );
        st.create_node(node("c")).await.unwrap();
        assert!(quick.elapsed() < Duration::from_millis(700));
        let done = term.await.unwrap().unwrap();
        assert_eq!(done.status, InstanceStatus::Terminated);
    }
}
