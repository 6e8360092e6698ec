//! The server's module state beside SQLite: the embedded registry's storage, the
//! online module-signing key (when online signing is on) and the trust set, the
//! publications and the template module lists, with a generation counter the
//! sensor compares.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use powernode_proto::admin::Catalog;
use powernode_proto::node::DesiredModule;
use powernode_proto::ErrorCode;

use crate::error::{AppError, AppResult};
use crate::model::{ModulePublication, TemplateModules};
use crate::registry::Storage;
use crate::signing::{PublicKey, SigningKey};
use crate::store::{Store, StoreError};

/// The server's module state: registry storage, signing keys, publications.
pub struct Modules {
    pub storage: Storage,
    /// The online key; `None` when online signing is off.
    signing: Option<Result<SigningKey, String>>,
    /// The trust set: the online public key (when on and usable) first, then the
    /// offline signers' keys, without repeats.
    trust: Vec<PublicKey>,
    publications: Mutex<Vec<ModulePublication>>,
    templates: Mutex<BTreeMap<String, TemplateModules>>,
    /// Bumped by every publication and template change, so the sensor's safety-net
    /// sweep costs one load when nothing changed.
    generation: AtomicU64,
}

impl std::fmt::Debug for Modules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Modules").finish_non_exhaustive()
    }
}

impl Modules {
    /// Loads publications and template lists, and with `online_signing` the
    /// signing key (made on first start; a key that cannot be made or read is
    /// logged and answered 500 on use). `offline_keys` join the trust set.
    pub fn load(
        dir: &Path,
        store: &Store,
        max_blob: u64,
        online_signing: bool,
        offline_keys: &[PublicKey],
    ) -> Result<Self, StoreError> {
        let signing = online_signing.then(|| {
            SigningKey::load_or_create(dir).map_err(|e| {
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), "module signing key unusable");
                e.to_string()
            })
        });
        if !online_signing {
            tracing::info!(
                trust_keys = offline_keys.len(),
                "online module signing is off: publishers sign offline (publish-module --key)"
            );
        }
        let mut trust: Vec<PublicKey> = Vec::new();
        let online = signing
            .as_ref()
            .and_then(|k| k.as_ref().ok())
            .map(SigningKey::public_key);
        for k in online.into_iter().chain(offline_keys.iter().cloned()) {
            if !trust.contains(&k) {
                trust.push(k);
            }
        }
        let templates = store
            .load_template_modules()?
            .into_iter()
            .map(|t| (t.template_id.clone(), t))
            .collect();
        Ok(Self {
            storage: Storage::new(dir.join("registry"), max_blob),
            signing,
            trust,
            publications: Mutex::new(store.load_module_publications()?),
            templates: Mutex::new(templates),
            generation: AtomicU64::new(0),
        })
    }

    /// The online key; 409 `online_signing_disabled` when online signing is off.
    pub(super) fn key(&self) -> AppResult<&SigningKey> {
        match &self.signing {
            None => Err(AppError::conflict(
                ErrorCode::OnlineSigningDisabled,
                "online signing is off on this server (serve --online-signing off): sign \
                 offline with `powernode-stub publish-module --key PATH` (a cosign key \
                 whose public key the server trusts: serve --module-trust-key)",
            )),
            Some(k) => k
                .as_ref()
                .map_err(|e| AppError::internal(&format!("module signing key: {e}"))),
        }
    }

    /// Whether the server signs on the admin route.
    pub fn online_signing(&self) -> bool {
        self.signing.is_some()
    }

    /// The trust set: the keys a publication's signature must verify with.
    pub fn trust(&self) -> &[PublicKey] {
        &self.trust
    }

    /// The trust set as PEM: what nodes are handed to verify signatures with (the
    /// desired-modules answer) and to pin (identity documents).
    pub fn trust_keys(&self) -> Vec<String> {
        self.trust.iter().map(|k| k.pem().to_string()).collect()
    }

    /// Changes so far (publications and template module lists).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(super) fn push_publication(&self, p: ModulePublication) {
        self.publications
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(p);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub(super) fn set_template(&self, t: TemplateModules) {
        self.templates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(t.template_id.clone(), t);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn publications(&self) -> Vec<ModulePublication> {
        self.publications
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn latest(&self, name: &str) -> Option<ModulePublication> {
        self.publications
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .find(|p| p.name == name)
            .cloned()
    }

    /// A template with its module lists overridden by what was set on it.
    pub fn apply_to_template(&self, t: &mut powernode_proto::admin::Template) {
        if let Some(m) = self
            .templates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&t.id)
        {
            t.root_modules = m.root_modules.clone();
            t.runtime_modules = m.runtime_modules.clone();
        }
    }

    /// The latest publication of every module `template` names, root modules first;
    /// names never published are left out (the drift report shows them).
    pub fn desired(
        &self,
        template: &powernode_proto::admin::Template,
        public_host: &str,
    ) -> Vec<DesiredModule> {
        let mut t = template.clone();
        self.apply_to_template(&mut t);
        let mut out = Vec::new();
        for (names, kind) in [(&t.root_modules, "root"), (&t.runtime_modules, "runtime")] {
            for name in names {
                if let Some(p) = self.latest(name) {
                    let host = p.registry.as_deref().unwrap_or(public_host);
                    out.push(DesiredModule {
                        name: p.name,
                        version: p.version,
                        repository: format!("{host}/{}", p.repository),
                        digest: p.digest,
                        kind: kind.to_string(),
                    });
                }
            }
        }
        out
    }
}

/// Module lists per template, `(root, runtime)`.
pub(super) type TemplateLists = std::collections::BTreeMap<String, (Vec<String>, Vec<String>)>;

#[derive(Debug, Default)]
pub(super) struct ModuleWatch {
    /// `Modules::generation` when last compared.
    pub(super) generation: u64,
    pub(super) publications: usize,
    pub(super) templates: TemplateLists,
}

/// A module change the sensor noticed.
#[derive(Debug)]
pub(super) enum ModuleChange {
    Published(crate::model::ModulePublication),
    TemplateChanged {
        template_id: String,
        before: (Vec<String>, Vec<String>),
        after: (Vec<String>, Vec<String>),
    },
}

pub(super) fn template_lists(modules: &Modules, catalog: &Catalog) -> TemplateLists {
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
