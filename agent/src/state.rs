//! The agent's state directory: the identity it booted with, its private key (0600),
//! its certificate and the CA it pins. A restarted agent with a valid certificate
//! for the same instance carries on without enrolling again (the bootstrap token is
//! single use), which is how agents survive their own restart and the server's.
//!
//! Files are replaced atomically (write a temporary file, fsync, rename). The key
//! and the certificate are two renames; if a crash falls between them, loading
//! finds the certificate still in its temporary file and pairs them up again.
//!
//! An enrollment in progress keeps its key in `pending.key` (0600), written before
//! the request leaves: a retry whose first answer was lost presents the same key, so
//! the server answers with the same certificate instead of `bootstrap_token_used`.
//! Saving the enrolled credentials renames that file into `node.key`.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use powernode_proto::IdentityDocument;

use crate::credentials::{unix_now, CredentialError, Credentials, NodeKey};

pub const IDENTITY_FILE: &str = "identity.json";
pub const KEY_FILE: &str = "node.key";
pub const CERT_FILE: &str = "node.crt";
pub const CA_FILE: &str = "ca.pem";
/// The key of an enrollment that has not been answered (and saved) yet.
pub const PENDING_KEY_FILE: &str = "pending.key";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {}: cannot {action}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stored identity {} is unusable", path.display())]
    Identity {
        path: PathBuf,
        #[source]
        source: powernode_proto::IdentityError,
    },
    #[error("stored credentials are unusable")]
    Credentials(#[from] CredentialError),
    #[error("pending enrollment key {} is unusable", path.display())]
    PendingKey {
        path: PathBuf,
        #[source]
        source: CredentialError,
    },
}

/// Where the key [`StateDir::pending_key`] returned came from.
#[derive(Debug)]
pub enum KeyOrigin {
    /// Made now: no enrollment was in progress.
    Created,
    /// Saved by an earlier attempt of this enrollment.
    Reused,
    /// Made now because the saved one did not parse (the error names the file),
    /// which it replaced.
    Replaced(StateError),
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io {
        action,
        path,
        source,
    }
}

/// Writes `bytes` to `path` atomically with `mode`; returns the temporary path
/// without renaming when `rename` is false.
fn write_file(path: &Path, bytes: &[u8], mode: u32, rename: bool) -> Result<PathBuf, StateError> {
    let tmp = tmp_path(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    // The mode only applies at creation; a leftover temp file may have another.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", &tmp))?;
    f.write_all(bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    if rename {
        std::fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    }
    Ok(tmp)
}

/// Replaces `path` with `bytes` (mode `mode`) atomically: a temporary file, fsync,
/// rename. For the agent's other files in the state directory (the version floors).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    write_file(path, bytes, mode, true).map(|_| ())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn read_optional(path: &Path) -> Result<Option<String>, StateError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

impl StateDir {
    /// Opens (creating, mode 0700) the state directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StateError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(io_err("create", &root))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", &root))?;
        Ok(Self { root })
    }

    /// The state directory at `root` as it is, nothing created or changed: for
    /// readers (the registry client reading the node's certificate).
    pub fn open_existing(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Keeps the identity (0600: it holds the bootstrap token).
    pub fn save_identity(&self, doc: &IdentityDocument) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(doc).unwrap_or_default();
        write_file(&self.file(IDENTITY_FILE), &bytes, 0o600, true).map(|_| ())
    }

    pub fn load_identity(&self) -> Result<Option<IdentityDocument>, StateError> {
        let path = self.file(IDENTITY_FILE);
        match read_optional(&path)? {
            None => Ok(None),
            Some(text) => IdentityDocument::parse(text.as_bytes())
                .map(Some)
                .map_err(|source| StateError::Identity { path, source }),
        }
    }

    /// Stores key (0600), certificate and CA.
    pub fn save_credentials(&self, creds: &Credentials) -> Result<(), StateError> {
        self.save_credentials_from(creds, false)
    }

    /// The key for an enrollment's CSR: the one an earlier attempt of it saved, or a
    /// new one, saved (0600, atomically) before this returns, so before any request
    /// leaves. A saved key that does not parse is replaced; the error naming it comes
    /// back in [`KeyOrigin::Replaced`] for the caller to report.
    pub fn pending_key(&self) -> Result<(NodeKey, KeyOrigin), StateError> {
        let path = self.file(PENDING_KEY_FILE);
        let saved = match std::fs::read(&path) {
            Ok(bytes) => Some(zeroize::Zeroizing::new(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let origin = match saved {
            None => KeyOrigin::Created,
            Some(bytes) => match std::str::from_utf8(&bytes)
                .map_err(|_| CredentialError::KeyFormat)
                .and_then(NodeKey::from_pem)
            {
                Ok(key) => return Ok((key, KeyOrigin::Reused)),
                Err(source) => KeyOrigin::Replaced(StateError::PendingKey {
                    path: path.clone(),
                    source,
                }),
            },
        };
        let key = NodeKey::generate()?;
        write_file(&path, key.to_pem()?.as_bytes(), 0o600, true)?;
        Ok((key, origin))
    }

    /// Stores the credentials an enrollment got for [`StateDir::pending_key`]: the
    /// pending key file becomes `node.key` (renamed; rewritten if it no longer holds
    /// this key), so none is left over.
    pub fn save_enrolled_credentials(&self, creds: &Credentials) -> Result<(), StateError> {
        self.save_credentials_from(creds, true)
    }

    fn save_credentials_from(&self, creds: &Credentials, pending: bool) -> Result<(), StateError> {
        let key_pem = creds.key.to_pem()?;
        write_file(&self.file(CA_FILE), creds.ca_pem.as_bytes(), 0o644, true)?;
        let cert_tmp = write_file(
            &self.file(CERT_FILE),
            creds.cert_pem.as_bytes(),
            0o644,
            false,
        )?;
        let pending_path = self.file(PENDING_KEY_FILE);
        let pending_pem = if pending {
            read_optional(&pending_path)?.map(zeroize::Zeroizing::new)
        } else {
            None
        };
        if pending_pem.as_ref().map(|p| p.as_str()) == Some(key_pem.as_str()) {
            std::fs::rename(&pending_path, self.file(KEY_FILE))
                .map_err(io_err("rename", &pending_path))?;
        } else {
            write_file(&self.file(KEY_FILE), key_pem.as_bytes(), 0o600, true)?;
            if pending_pem.is_some() {
                std::fs::remove_file(&pending_path).map_err(io_err("remove", &pending_path))?;
            }
        }
        std::fs::rename(&cert_tmp, self.file(CERT_FILE)).map_err(io_err("rename", &cert_tmp))?;
        Ok(())
    }

    /// Loads the credentials for `instance_id`. `Ok(None)` when there are none or
    /// they are for another instance or key: the caller enrolls then (the reason
    /// is logged). An expired certificate is still returned: the node's clock may
    /// be wrong, and even when it is right the key re-enrolls the certificate
    /// ([`crate::reissue`]) where a spent bootstrap token would be refused.
    pub fn load_credentials(&self, instance_id: &str) -> Result<Option<Credentials>, StateError> {
        let (Some(key_pem), Some(ca_pem)) = (
            read_optional(&self.file(KEY_FILE))?,
            read_optional(&self.file(CA_FILE))?,
        ) else {
            return Ok(None);
        };
        // A stored key that does not parse is an error to report, not a reason to
        // silently enroll again with a spent token.
        NodeKey::from_pem(&key_pem)?;
        // The certificate, or its temporary file if a crash fell between the renames.
        let mut candidates = Vec::new();
        for path in [self.file(CERT_FILE), tmp_path(&self.file(CERT_FILE))] {
            if let Some(pem) = read_optional(&path)? {
                // The file's mtime is when the node received the certificate.
                let received_at = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                    .unwrap_or_else(unix_now);
                candidates.push((pem, received_at));
            }
        }
        let mut last_err = None;
        for (cert_pem, received_at) in candidates {
            let key = NodeKey::from_pem(&key_pem)?;
            match Credentials::new(key, cert_pem, ca_pem.clone(), instance_id).map(|mut c| {
                c.info.received_at = received_at.min(unix_now());
                c
            }) {
                Ok(creds) => {
                    if creds.info.expired(unix_now()) {
                        tracing::warn!(
                            not_after = creds.info.not_after,
                            "stored certificate looks expired by this node's clock; \
                             the server will say, and reissue it if so"
                        );
                    }
                    return Ok(Some(creds));
                }
                Err(e) => last_err = Some(e),
            }
        }
        if let Some(e) = last_err {
            tracing::warn!(error = %crate::error_chain(&e), instance_id,
                "stored certificate does not fit this instance and key; enrolling again");
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::tests::sign;

    fn creds(seed: u8, instance: &str, lifetime: i64) -> Credentials {
        let key = NodeKey::from_seed([seed; 32]);
        let (cert, ca) = sign(&key.csr_pem(instance).unwrap(), lifetime);
        Credentials::new(key, cert, ca, instance).unwrap()
    }

    #[test]
    fn credentials_round_trip_with_modes() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path().join("state")).unwrap();
        assert!(state.load_credentials("inst-1").unwrap().is_none());
        let c = creds(1, "inst-1", 3600);
        state.save_credentials(&c).unwrap();
        let mode = |f: &str| {
            std::fs::metadata(state.file(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(KEY_FILE), 0o600);
        assert_eq!(
            std::fs::metadata(state.path())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        let back = state.load_credentials("inst-1").unwrap().unwrap();
        assert_eq!(back.key.public_key(), c.key.public_key());
        assert_eq!(back.info.serial, c.info.serial);
        assert!((back.info.received_at - c.info.received_at).abs() <= 2);
        // Another instance's identity does not reuse these credentials.
        assert!(state.load_credentials("inst-2").unwrap().is_none());
    }

    #[test]
    fn expired_credentials_are_kept_for_reissue_and_mismatched_ones_are_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        // Expired by this clock: still the node's key and certificate, which the
        // server may reissue (a spent token would be refused for good).
        let expired = creds(1, "inst-1", -10);
        state.save_credentials(&expired).unwrap();
        let back = state.load_credentials("inst-1").unwrap().unwrap();
        assert_eq!(back.info.serial, expired.info.serial);
        // Key from one enrollment, certificate from another.
        let a = creds(1, "inst-1", 3600);
        let b = creds(2, "inst-1", 3600);
        state.save_credentials(&a).unwrap();
        std::fs::write(state.file(CERT_FILE), &b.cert_pem).unwrap();
        assert!(state.load_credentials("inst-1").unwrap().is_none());
    }

    #[test]
    fn crash_between_renames_is_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let old = creds(1, "inst-1", 3600);
        state.save_credentials(&old).unwrap();
        // New key renamed into place, new certificate still in its temp file.
        let new = creds(2, "inst-1", 3600);
        std::fs::write(state.file(KEY_FILE), new.key.to_pem().unwrap().as_bytes()).unwrap();
        std::fs::write(tmp_path(&state.file(CERT_FILE)), &new.cert_pem).unwrap();
        let back = state.load_credentials("inst-1").unwrap().unwrap();
        assert_eq!(back.key.public_key(), new.key.public_key());
    }

    #[test]
    fn a_pending_key_is_saved_private_reused_and_becomes_the_credentials_key() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let (first, origin) = state.pending_key().unwrap();
        assert!(matches!(origin, KeyOrigin::Created), "{origin:?}");
        let mode = std::fs::metadata(state.file(PENDING_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A retry (or a restarted agent) gets the same key.
        let (again, origin) = state.pending_key().unwrap();
        assert!(matches!(origin, KeyOrigin::Reused), "{origin:?}");
        assert_eq!(again.public_key(), first.public_key());
        let (cert, ca) = sign(&again.csr_pem("inst-1").unwrap(), 3600);
        let creds = Credentials::new(again, cert, ca, "inst-1").unwrap();
        state.save_enrolled_credentials(&creds).unwrap();
        assert!(
            !state.file(PENDING_KEY_FILE).exists(),
            "a pending key was left"
        );
        let back = state.load_credentials("inst-1").unwrap().unwrap();
        assert_eq!(back.key.public_key(), first.public_key());
        let mode = std::fs::metadata(state.file(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The next enrollment (a new instance on this state dir) starts afresh.
        let (next, origin) = state.pending_key().unwrap();
        assert!(matches!(origin, KeyOrigin::Created), "{origin:?}");
        assert_ne!(next.public_key(), first.public_key());
    }

    #[test]
    fn a_corrupt_pending_key_is_an_error_naming_the_file_and_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let path = state.file(PENDING_KEY_FILE);
        for junk in [&b"not a key"[..], b"", &[0xff, 0xfe, 0x00][..]] {
            std::fs::write(&path, junk).unwrap();
            let replaced = match state.pending_key() {
                Ok((key, KeyOrigin::Replaced(e))) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&path.display().to_string()), "{msg}");
                    key
                }
                other => panic!("{other:?}"),
            };
            let (kept, origin) = state.pending_key().unwrap();
            assert!(matches!(origin, KeyOrigin::Reused), "{origin:?}");
            assert_eq!(kept.public_key(), replaced.public_key());
        }
    }

    #[test]
    fn identity_round_trip_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(state.load_identity().unwrap().is_none());
        let doc = crate::identity::tests::doc("inst-9");
        state.save_identity(&doc).unwrap();
        assert_eq!(state.load_identity().unwrap(), Some(doc));
        let mode = std::fs::metadata(state.file(IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
