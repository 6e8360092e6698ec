//! Trust anchored on the node: the module keys it pins and the version floor it keeps.
//!
//! Pinned keys come from the identity document's `module_trust_keys` (the init adds
//! the keys built into the initramfs). A node that pins keys verifies module
//! signatures against those alone: the keys the control plane sends with the desired
//! modules are ignored, so a control plane (or an admin token) that signs with a key
//! of its own cannot put a module on the node. A node that pins nothing takes the
//! control plane's keys, and says so once in its log.
//!
//! The version floor is, per module name, the highest version this node attached
//! (kept in the state directory: across reboots on `/persist`, for the boot on a
//! tmpfs node). A desired version below it is refused (`version_rollback`) before
//! anything is pulled, so an old, validly signed version cannot roll the node back.
//! Versions compare in natural order: runs of digits as numbers, the rest byte by
//! byte (`1.10 > 1.9`, `v2 > v1`, `2026.12.07-2 > 2026.12.07-1`).
//!
//! It must never widen what the node trusts beyond its pins, and never lower a floor.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Mutex;

use powernode_proto::ErrorCode;

use super::signature::{parse_trust_keys, SignatureError, TrustKey};
use super::ModuleErrorCode;

/// The file in the state directory that keeps the floors.
pub const FLOOR_FILE: &str = "module-floors.json";

/// Which keys module signatures must verify against.
#[derive(Debug, Default)]
pub struct TrustAnchor {
    pinned: Vec<String>,
    warned: AtomicBool,
}

impl TrustAnchor {
    /// Pins `pems` (the identity's `module_trust_keys`); none pins nothing.
    pub fn pinned(pems: Vec<String>) -> Self {
        Self {
            pinned: pems,
            warned: AtomicBool::new(false),
        }
    }

    pub fn pins_keys(&self) -> bool {
        !self.pinned.is_empty()
    }

    /// The keys a pull verifies against: the pinned ones when there are any (the
    /// control plane's `offered` keys are then ignored), else `offered`.
    pub fn keys(&self, offered: &[String]) -> Result<Vec<TrustKey>, SignatureError> {
        if self.pins_keys() {
            let ignored = offered.iter().filter(|k| !self.pinned.contains(k)).count();
            if ignored > 0 && !self.warned.swap(true, AtomicOrdering::Relaxed) {
                tracing::warn!(
                    ignored,
                    "the control plane sent module keys this node does not pin; they are ignored"
                );
            }
            return parse_trust_keys(&self.pinned);
        }
        if !self.warned.swap(true, AtomicOrdering::Relaxed) {
            tracing::warn!(
                "this node pins no module keys (identity module_trust_keys is empty): \
                 trusting the keys the control plane sends"
            );
        }
        parse_trust_keys(offered)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error(
        "module {name}: version {version:?} is older than {floor:?}, which this node \
         already ran; refusing the rollback"
    )]
    Rollback {
        name: String,
        version: String,
        floor: String,
    },
    #[error("saving the module version floors")]
    Save(#[source] crate::state::StateError),
    #[error("module version floors {}: cannot {action}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ModuleErrorCode for FloorError {
    fn code(&self) -> ErrorCode {
        match self {
            FloorError::Rollback { .. } => ErrorCode::VersionRollback,
            FloorError::Io { .. } | FloorError::Save(_) => ErrorCode::Internal,
        }
    }
}

/// Per module name, the highest version attached; kept in a file when given one.
#[derive(Debug, Default)]
pub struct VersionFloor {
    path: Option<PathBuf>,
    floors: Mutex<BTreeMap<String, String>>,
}

impl VersionFloor {
    /// Floors kept in memory only (tests, and tools that attach nothing).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Loads the floors kept at `path` (none yet: empty). A file that does not parse
    /// is an error, not an empty floor: forgetting floors would allow rollbacks.
    pub fn load(path: &Path) -> Result<Self, FloorError> {
        let floors = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| FloorError::Io {
                action: "parse",
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(FloorError::Io {
                    action: "read",
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Ok(Self {
            path: Some(path.to_path_buf()),
            floors: Mutex::new(floors),
        })
    }

    fn floors(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.floors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The floor of `name`, if it has one.
    pub fn get(&self, name: &str) -> Option<String> {
        self.floors().get(name).cloned()
    }

    /// `Ok(())` unless `version` is below the floor of `name`.
    pub fn admit(&self, name: &str, version: &str) -> Result<(), FloorError> {
        match self.floors().get(name) {
            Some(floor) if compare_versions(version, floor) == Ordering::Less => {
                Err(FloorError::Rollback {
                    name: name.into(),
                    version: version.into(),
                    floor: floor.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Raises the floor of each `(name, version)` that is above it, then saves (write
    /// a temporary file, fsync, rename) when one moved.
    pub fn raise<'a>(
        &self,
        attached: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), FloorError> {
        let mut floors = self.floors();
        let mut moved = false;
        for (name, version) in attached {
            let above = floors
                .get(name)
                .is_none_or(|f| compare_versions(version, f) == Ordering::Greater);
            if above {
                floors.insert(name.to_string(), version.to_string());
                moved = true;
            }
        }
        match (&self.path, moved) {
            (Some(path), true) => save(path, &floors),
            _ => Ok(()),
        }
    }
}

fn save(path: &Path, floors: &BTreeMap<String, String>) -> Result<(), FloorError> {
    let bytes = serde_json::to_vec_pretty(floors).expect("string maps serialize");
    crate::state::write_atomic(path, &bytes, 0o644).map_err(FloorError::Save)
}

/// Natural order: digit runs compare as numbers (leading zeros ignored, then the
/// shorter run first), everything else byte by byte; a version that is a prefix of
/// another is the lower one.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let (da, ra) = split_digits(a);
                let (db, rb) = split_digits(b);
                let (na, nb) = (trim_zeros(da), trim_zeros(db));
                let ord = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if ord != Ordering::Equal {
                    return ord;
                }
                (a, b) = (ra, rb);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                (a, b) = (&a[1..], &b[1..]);
            }
        }
    }
}

fn split_digits(s: &[u8]) -> (&[u8], &[u8]) {
    let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
    s.split_at(n)
}

fn trim_zeros(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&c| c == b'0').count();
    &s[n..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_naturally() {
        let lt = |a: &str, b: &str| {
            assert_eq!(compare_versions(a, b), Ordering::Less, "{a} < {b}");
            assert_eq!(compare_versions(b, a), Ordering::Greater, "{b} > {a}");
        };
        lt("1.9", "1.10");
        lt("v1", "v2");
        lt("1", "1.0");
        lt("2026.12.07-1", "2026.12.07-2");
        lt("1.0.0", "2.0.0");
        lt("9", "10");
        lt("a", "b");
        lt("1.2.3", "1.2.4-rc1");
        assert_eq!(compare_versions("1.01", "1.1"), Ordering::Equal);
        assert_eq!(compare_versions("", ""), Ordering::Equal);
        // A run longer than any integer type still compares.
        lt(&"9".repeat(40), &format!("1{}", "0".repeat(40)));
    }

    #[test]
    fn floor_refuses_rollback_and_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FLOOR_FILE);
        let floor = VersionFloor::load(&path).unwrap();
        floor.admit("base", "1").unwrap();
        floor.raise([("base", "2"), ("web", "1.10")]).unwrap();
        // A lower raise never lowers it.
        floor.raise([("base", "1")]).unwrap();
        assert_eq!(floor.get("base").as_deref(), Some("2"));
        let e = floor.admit("base", "1").unwrap_err();
        assert_eq!(e.code(), ErrorCode::VersionRollback);
        assert!(e.to_string().contains("\"1\" is older than \"2\""), "{e}");
        floor.admit("base", "2").unwrap();
        floor.admit("base", "3").unwrap();
        floor.admit("other", "0").unwrap();

        let again = VersionFloor::load(&path).unwrap();
        assert!(again.admit("web", "1.9").is_err());
        again.admit("web", "1.10").unwrap();
    }

    #[test]
    fn a_corrupt_floor_file_is_an_error_not_an_empty_floor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FLOOR_FILE);
        std::fs::write(&path, b"{not json").unwrap();
        let e = VersionFloor::load(&path).unwrap_err();
        assert!(e.to_string().contains("cannot parse"), "{e}");
    }

    #[test]
    fn pinned_keys_win_over_offered_ones() {
        let pem = || {
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .unwrap()
                .public_key_pem()
        };
        let (a, b) = (pem(), pem());
        let pinned = TrustAnchor::pinned(vec![a.clone()]);
        assert!(pinned.pins_keys());
        // The offered key is ignored: only the pinned one verifies.
        let keys = pinned.keys(std::slice::from_ref(&b)).unwrap();
        assert_eq!(keys, parse_trust_keys(std::slice::from_ref(&a)).unwrap());
        let unpinned = TrustAnchor::default();
        assert!(!unpinned.pins_keys());
        assert_eq!(
            unpinned.keys(std::slice::from_ref(&b)).unwrap(),
            parse_trust_keys(&[b]).unwrap()
        );
    }
}
