//! What goes into the initramfs: a sorted map of absolute paths to entries. Building
//! the spec and writing the archive are separate steps so that tests can check either
//! one alone, and so the archive depends on nothing but the spec.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("path {0:?} must be absolute, normalized and not the root")]
    BadPath(String),
    #[error("{path:?} is already a {existing}, cannot add it as a {new}")]
    Conflict {
        path: String,
        existing: &'static str,
        new: &'static str,
    },
    #[error("parent of {0:?} is not a directory")]
    ParentNotDir(String),
}

/// One archive member. Owners are always root and times always zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

impl Entry {
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Dir { .. } => "directory",
            Entry::File { .. } => "file",
            Entry::Symlink { .. } => "symlink",
            Entry::CharDev { .. } => "character device",
        }
    }
}

/// The initramfs contents. Keys are paths without the leading `/` (as cpio stores
/// them); a `BTreeMap` keeps them sorted, and a parent sorts before its children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spec {
    entries: BTreeMap<String, Entry>,
}

fn key(path: &str) -> Result<String, SpecError> {
    let bad = || SpecError::BadPath(path.to_string());
    let rel = path.strip_prefix('/').ok_or_else(bad)?;
    if rel.is_empty()
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\0'))
    {
        return Err(bad());
    }
    Ok(rel.to_string())
}

impl Spec {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        key(path).ok().and_then(|k| self.entries.get(&k))
    }

    /// Adds (or keeps) a directory and its parents, mode 0755 for implied parents.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, SpecError> {
        let k = key(path)?;
        self.parents(&k)?;
        match self.entries.get(&k) {
            None => {
                self.entries.insert(k, Entry::Dir { mode });
            }
            Some(Entry::Dir { .. }) => {
                self.entries.insert(k, Entry::Dir { mode });
            }
            Some(other) => {
                return Err(SpecError::Conflict {
                    path: path.to_string(),
                    existing: other.kind(),
                    new: "directory",
                })
            }
        }
        Ok(self)
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<&mut Self, SpecError> {
        self.leaf(path, Entry::File { mode, data })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, SpecError> {
        self.leaf(
            path,
            Entry::Symlink {
                target: target.to_string(),
            },
        )
    }

    pub fn char_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, SpecError> {
        self.leaf(path, Entry::CharDev { mode, major, minor })
    }

    fn leaf(&mut self, path: &str, entry: Entry) -> Result<&mut Self, SpecError> {
        let k = key(path)?;
        self.parents(&k)?;
        if let Some(existing) = self.entries.get(&k) {
            if std::mem::discriminant(existing) != std::mem::discriminant(&entry) {
                return Err(SpecError::Conflict {
                    path: path.to_string(),
                    existing: existing.kind(),
                    new: entry.kind(),
                });
            }
        }
        self.entries.insert(k, entry);
        Ok(self)
    }

    fn parents(&mut self, k: &str) -> Result<(), SpecError> {
        let mut prefix = String::new();
        let comps: Vec<&str> = k.split('/').collect();
        for comp in comps.iter().take(comps.len().saturating_sub(1)) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(comp);
            match self.entries.get(&prefix) {
                None => {
                    self.entries
                        .insert(prefix.clone(), Entry::Dir { mode: 0o755 });
                }
                Some(Entry::Dir { .. }) => {}
                Some(_) => return Err(SpecError::ParentNotDir(format!("/{k}"))),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_implied_and_sorted_first() {
        let mut spec = Spec::new();
        spec.file("/lib/modules/a.ko", 0o644, vec![1]).unwrap();
        spec.file("/init", 0o755, vec![2]).unwrap();
        spec.dir("/lib-extra", 0o700).unwrap();
        let keys: Vec<&str> = spec.entries().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "init",
                "lib",
                "lib-extra",
                "lib/modules",
                "lib/modules/a.ko"
            ]
        );
        assert_eq!(spec.get("/lib"), Some(&Entry::Dir { mode: 0o755 }));
    }

    #[test]
    fn bad_paths_and_conflicts_are_refused() {
        let mut spec = Spec::new();
        for bad in ["init", "/", "/a/../b", "/a//b", "/a/./b"] {
            assert!(
                matches!(spec.file(bad, 0o644, vec![]), Err(SpecError::BadPath(_))),
                "{bad}"
            );
        }
        spec.file("/etc", 0o644, vec![]).unwrap();
        assert!(matches!(
            spec.dir("/etc", 0o755),
            Err(SpecError::Conflict { .. })
        ));
        assert!(matches!(
            spec.file("/etc/x", 0o644, vec![]),
            Err(SpecError::ParentNotDir(_))
        ));
    }
}
