//! The control plane's behaviour: every admin and node action as a method on
//! [`AppState`], independent of HTTP. Handlers in [`crate::api`] only decode, call
//! one method and encode.
//!
//! Concurrency: one `std` mutex guards [`Mem`]; it is never held across an await.
//! Every change that must be durable before the answer goes through
//! [`AppState::mutate`], which also holds an async write lock so SQLite sees changes in
//! the order memory saw them. Routine heartbeats skip both: they update memory and
//! mark the instance dirty for the batch flusher.
//!
//! Layout: this file holds [`AppState`] (construction, `lock`, `mutate`, the dirty
//! flush) and the helpers every action shares. One file per area adds its methods:
//! `nodes`, `instances` (provision, drain, terminate, drift),
//! `disk_images`, `enrollment`, `certificates` (renewal, reissue after expiry),
//! `node_api` (handshake, heartbeat, worker API), `boot_reports` (failures before
//! enrollment, by bootstrap token), `tasks` (node-side tasks, refusals), `modules`
//! (module publications), `sensors`, `attribution`, `vms` (the VM watcher's resets
//! and exits, adopting VMs at start), `retention`. `bookkeeping` holds the record
//! changes several of them
//! make (finishing and adding tasks, failing an instance); `module_store` the module
//! state beside SQLite. Imports point one way: areas use this file, `bookkeeping`
//! and `module_store`, never each other's free functions and never the reverse.

use std::sync::{Arc, Mutex, MutexGuard};

use powernode_proto::admin::{self, Catalog};
use powernode_proto::{ErrorCode, InstanceStatus, TaskStatus};
use sha2::Digest;

use crate::ca::{Ca, ClientIdentity, CsrError};
use crate::clock::{Clock, Millis};
use crate::config::{url_host, Config};
use crate::error::{AppError, AppResult};
use crate::images::{DigestCache, Publication};
use crate::model::{Mem, Op};
use crate::provider::Provider;
use crate::store::{Store, StoreError};
use module_store::{template_lists, ModuleWatch};

mod attribution;
mod bookkeeping;
mod boot_reports;
mod certificates;
mod disk_images;
mod enrollment;
mod identities;
mod instances;
mod module_store;
pub mod modules;
mod node_api;
mod nodes;
mod quota;
pub mod retention;
mod sensors;
mod tasks;
mod vms;

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
    /// Boot reports accepted per token hash in the current window (memory only).
    boot_report_windows: Mutex<boot_reports::Windows>,
    /// Per instance, what a long-polled task lease waits on: notified when a
    /// node-side task of that instance becomes pending (see [`AppState::mutate`]).
    task_waiters: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Notify>>>,
    /// Set when the server stops: long polls answer at once.
    pub(crate) stopping: tokio::sync::watch::Sender<bool>,
    /// Provider quota: provisions under way per region, and their waiters.
    quota: Arc<quota::Quota>,
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

/// A refused CSR (enrollment, renewal, reissue) as the node sees it.
fn csr_error(e: CsrError) -> AppError {
    match e {
        CsrError::WrongInstance { .. } => {
            AppError::forbidden(ErrorCode::CsrInstanceMismatch, e.to_string())
        }
        CsrError::Sign(_) => AppError::internal(&e),
        CsrError::Unparsable(_)
        | CsrError::NotEd25519
        | CsrError::NoCommonName
        | CsrError::WrongKey => AppError::new(
            axum::http::StatusCode::BAD_REQUEST,
            ErrorCode::CsrInvalid,
            e.to_string(),
        ),
    }
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
        let provider =
            crate::provider::from_mode(cfg.provider, cfg.image_base.clone(), &cfg.libvirt_uri);
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
        let (adopted, lost) = vms::recover_vms(&store, &mut mem, started_ms, provider.as_ref())?;
        if adopted > 0 {
            tracing::info!(vms = adopted, "VMs taken back from the previous server");
        }
        if lost > 0 {
            tracing::warn!(
                instances = lost,
                "instances whose VM did not survive the server restart were marked failed"
            );
        }
        let modules = module_store::Modules::load(
            &cfg.data_dir,
            &store,
            cfg.registry_max_blob_bytes,
            cfg.online_signing,
            &cfg.module_trust_keys,
        )?;
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
            boot_report_windows: Mutex::default(),
            task_waiters: Mutex::default(),
            stopping: tokio::sync::watch::Sender::new(false),
            quota: Arc::default(),
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
    ///
    /// Memory never keeps a change SQLite did not commit: while `f` runs, each record
    /// it writes is remembered as it was (only those, see [`crate::model::Table`]), and
    /// when the commit fails they are put back and the caller gets 503
    /// `storage_unavailable`. A heartbeat that changed one of those records between
    /// `f` and the failed commit is undone with it; the node's next one brings it back.
    pub async fn mutate<T>(
        &self,
        f: impl FnOnce(&mut Mem, Millis) -> AppResult<T>,
    ) -> AppResult<T> {
        let _w = self.write_lock.lock().await;
        let now = self.clock.now_ms();
        let (res, ops, undo) = {
            let mut mem = self.lock();
            mem.record();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut mem, now)));
            let undo = mem.finish_recording();
            match r {
                Ok(r) => (r, std::mem::take(&mut mem.ops), undo),
                Err(panic) => {
                    // A bug in `f`: leave memory as SQLite has it, then go on panicking.
                    mem.ops.clear();
                    mem.undo(undo);
                    drop(mem);
                    std::panic::resume_unwind(panic)
                }
            }
        };
        // Instances with a node-side task pending after this change (new, or
        // requeued), or terminated: a lease long-polled for them answers now (with
        // the task, or with the refusal that stops the agent).
        let wake: Vec<String> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Task(t) if t.status == TaskStatus::Pending && t.kind.is_node_side() => {
                    Some(t.instance_id.clone())
                }
                Op::Instance(i) if i.status == InstanceStatus::Terminated => Some(i.id.clone()),
                _ => None,
            })
            .collect();
        let ended = ops.iter().any(|op| {
            matches!(op, Op::Instance(i)
                if matches!(i.status, InstanceStatus::Terminated | InstanceStatus::Failed))
        });
        if let Err(e) = self.store.apply(ops).await {
            self.lock().undo(undo);
            return Err(AppError::storage(&e));
        }
        // An instance that ended frees its region's quota.
        if ended {
            self.quota.changed();
        }
        if !wake.is_empty() {
            let waiters = self.task_waiters.lock().unwrap_or_else(|p| p.into_inner());
            for id in wake {
                if let Some(n) = waiters.get(&id) {
                    n.notify_waiters();
                }
            }
        }
        res
    }

    /// What a long-polled lease of `instance_id` waits on; [`Self::drop_task_waiter`]
    /// when done.
    pub(crate) fn task_waiter(&self, instance_id: &str) -> Arc<tokio::sync::Notify> {
        self.task_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(instance_id.to_string())
            .or_default()
            .clone()
    }

    /// Forgets the waiter of `instance_id` when nobody else holds it.
    pub(crate) fn drop_task_waiter(&self, instance_id: &str, waiter: Arc<tokio::sync::Notify>) {
        let mut waiters = self.task_waiters.lock().unwrap_or_else(|p| p.into_inner());
        // The map's reference and `waiter`: no other lease of it is waiting.
        if Arc::strong_count(&waiter) <= 2 {
            waiters.remove(instance_id);
        }
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

    // ----- admin: catalog -----------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{ProviderError, ProvisionSpec, Recorder};
    use powernode_proto::admin::{CreateNodeRequest, ProvisionRequest, TerminateRequest};
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
        state_from(cfg, clock, provider)
    }

    /// A state on `cfg` (its data directory included) with `provider`; other areas'
    /// tests start here too.
    pub(super) fn state_from(cfg: Config, clock: Clock, provider: Box<dyn Provider>) -> AppState {
        let dir = cfg.data_dir.clone();
        AppState::with_provider(
            cfg,
            "https://127.0.0.1:1".into(),
            clock,
            Ca::load_or_create(&dir).unwrap(),
            Store::open(&dir).unwrap(),
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
