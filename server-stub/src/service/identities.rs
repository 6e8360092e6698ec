//! The identity documents handed to VMs, kept for `instance-identity` in
//! `DIR/identities/<instance id>.json` (0600, in a 0700 folder) while the instance
//! lives, and not in provider records: those are history (kept, shown, backed up
//! with the database), and a document holds its bootstrap token in clear. The
//! records keep the document with the token replaced by its hash
//! (`bookkeeping::vm_started`).

use std::path::PathBuf;

use powernode_proto::IdentityDocument;

use super::AppState;

pub const IDENTITIES_DIR: &str = "identities";

impl AppState {
    fn identity_path(&self, instance_id: &str) -> PathBuf {
        self.cfg
            .data_dir
            .join(IDENTITIES_DIR)
            .join(format!("{instance_id}.json"))
    }

    /// Writes the document before the provider boots the VM.
    pub(super) fn keep_identity(&self, doc: &IdentityDocument) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        let path = self.identity_path(&doc.instance_id);
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let bytes = serde_json::to_vec_pretty(doc).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, &bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// The document of a live instance; `None` once it ended (or from before it was
    /// kept here).
    pub(super) fn kept_identity(
        &self,
        instance_id: &str,
    ) -> std::io::Result<Option<serde_json::Value>> {
        match std::fs::read(self.identity_path(instance_id)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes the documents of instances that are no longer live (their tokens are
    /// spent or withdrawn). At start, at terminate, and with each retention pass.
    /// Returns how many went.
    pub fn sweep_identities(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join(IDENTITIES_DIR)) else {
            return 0;
        };
        let live: std::collections::HashSet<String> = self
            .lock()
            .instances
            .values()
            .filter(|i| i.status.is_live())
            .map(|i| i.id.clone())
            .collect();
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if !live.contains(id) && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}
