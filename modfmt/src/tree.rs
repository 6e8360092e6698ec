//! The in-memory file tree a module's layers unpack into and its composefs image is
//! built from: metadata and names only; regular file contents live in the object store
//! and are referenced by fs-verity digest.
//!
//! Lookups never follow symlinks: a path that crosses one is an error, so nothing an
//! archive says can make us touch anything outside this tree.

use std::collections::BTreeMap;

use crate::verity::VerityDigest;

/// Index of an inode in an [`FsTree`]. Hardlinks are several directory entries
/// naming the same id.
pub type InodeId = usize;

/// Permission bits that survive into the image (`07777`).
pub const PERM_MASK: u32 = 0o7777;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits only; the file type comes from [`Kind`].
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub mtime_nsec: u32,
    /// Full xattr names (`user.foo`), sorted.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Default for Meta {
    /// What a directory gets when an archive names a child before the directory itself.
    fn default() -> Self {
        Self {
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Children by name; each entry remembers the layer that last wrote it, which is
    /// what whiteouts and opaque markers compare against.
    Dir(BTreeMap<Vec<u8>, Entry>),
    /// `digest` is `None` exactly when `size == 0` (empty files need no object).
    File {
        size: u64,
        digest: Option<VerityDigest>,
    },
    Symlink(Vec<u8>),
    CharDev(u32),
    BlockDev(u32),
    Fifo,
    Socket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub inode: InodeId,
    pub layer: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub meta: Meta,
    pub kind: Kind,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("{path}: path component is not a directory")]
    NotADirectory { path: String },
    #[error("{path}: path crosses a symlink")]
    ThroughSymlink { path: String },
    #[error("{path}: no such entry")]
    NotFound { path: String },
    #[error("{path}: cannot replace the root directory with a non-directory")]
    RootNotDir { path: String },
}

/// A file tree. Inode 0 is the root directory. Inodes that lose their last entry stay
/// in the arena but are unreachable; everything that walks the tree starts at the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsTree {
    inodes: Vec<Inode>,
}

impl Default for FsTree {
    fn default() -> Self {
        Self::new()
    }
}

pub fn display(path: &[&[u8]]) -> String {
    let joined: Vec<u8> = path.join(&b'/');
    format!("/{}", String::from_utf8_lossy(&joined))
}

impl FsTree {
    pub const ROOT: InodeId = 0;

    pub fn new() -> Self {
        Self {
            inodes: vec![Inode {
                meta: Meta::default(),
                kind: Kind::Dir(BTreeMap::new()),
            }],
        }
    }

    pub fn inode(&self, id: InodeId) -> &Inode {
        &self.inodes[id]
    }

    pub fn inode_mut(&mut self, id: InodeId) -> &mut Inode {
        &mut self.inodes[id]
    }

    pub fn add_inode(&mut self, inode: Inode) -> InodeId {
        self.inodes.push(inode);
        self.inodes.len() - 1
    }

    /// Looks a path (already split into safe components) up without following any
    /// symlink. `Ok(None)` when the last component is absent.
    pub fn lookup(&self, path: &[&[u8]]) -> Result<Option<InodeId>, TreeError> {
        let mut cur = Self::ROOT;
        for (i, name) in path.iter().enumerate() {
            let Kind::Dir(children) = &self.inodes[cur].kind else {
                return Err(self.not_dir(cur, &path[..i]));
            };
            match children.get(*name) {
                Some(e) => cur = e.inode,
                None if i + 1 == path.len() => return Ok(None),
                None => {
                    return Err(TreeError::NotFound {
                        path: display(&path[..=i]),
                    })
                }
            }
        }
        Ok(Some(cur))
    }

    fn not_dir(&self, id: InodeId, path: &[&[u8]]) -> TreeError {
        match self.inodes[id].kind {
            Kind::Symlink(_) => TreeError::ThroughSymlink {
                path: display(path),
            },
            _ => TreeError::NotADirectory {
                path: display(path),
            },
        }
    }

    /// The directory `path`, creating missing ones with default metadata (archives may
    /// name `a/b/c` before `a/b`). Existing non-directories are an error.
    pub fn ensure_dir(&mut self, path: &[&[u8]], layer: u32) -> Result<InodeId, TreeError> {
        let mut cur = Self::ROOT;
        for (i, name) in path.iter().enumerate() {
            let next = match &self.inodes[cur].kind {
                Kind::Dir(children) => children.get(*name).map(|e| e.inode),
                _ => return Err(self.not_dir(cur, &path[..i])),
            };
            cur = match next {
                Some(id) => id,
                None => {
                    let id = self.add_inode(Inode {
                        meta: Meta::default(),
                        kind: Kind::Dir(BTreeMap::new()),
                    });
                    self.children_mut(cur)
                        .insert(name.to_vec(), Entry { inode: id, layer });
                    id
                }
            };
        }
        match self.inodes[cur].kind {
            Kind::Dir(_) => Ok(cur),
            _ => Err(self.not_dir(cur, path)),
        }
    }

    fn children_mut(&mut self, dir: InodeId) -> &mut BTreeMap<Vec<u8>, Entry> {
        match &mut self.inodes[dir].kind {
            Kind::Dir(c) => c,
            // Callers only pass ids they just checked are directories.
            _ => unreachable!("children_mut on a non-directory"),
        }
    }

    /// Points `parent/name` at `inode`, replacing what was there. A directory that
    /// replaces a directory keeps the old children (tar semantics: a later `dir/` entry
    /// only updates metadata); callers handle that by updating meta in place instead.
    pub fn link(&mut self, parent: InodeId, name: &[u8], inode: InodeId, layer: u32) {
        self.children_mut(parent)
            .insert(name.to_vec(), Entry { inode, layer });
    }

    /// Removes `parent/name`; returns whether it existed.
    pub fn unlink(&mut self, parent: InodeId, name: &[u8]) -> bool {
        self.children_mut(parent).remove(name).is_some()
    }

    /// Entries of `dir` written by an earlier layer than `layer` are removed (opaque
    /// whiteout).
    pub fn clear_lower(&mut self, dir: InodeId, layer: u32) {
        self.children_mut(dir).retain(|_, e| e.layer >= layer);
    }

    pub fn entry_layer(&self, parent: InodeId, name: &[u8]) -> Option<u32> {
        match &self.inodes[parent].kind {
            Kind::Dir(c) => c.get(name).map(|e| e.layer),
            _ => None,
        }
    }

    /// Reachable inodes in a deterministic order (depth first, names sorted, each
    /// inode once, the root first), with their link counts.
    pub fn walk(&self) -> Vec<(InodeId, u32)> {
        let mut order = Vec::new();
        let mut seen = vec![u32::MAX; self.inodes.len()];
        let mut stack = vec![Self::ROOT];
        seen[Self::ROOT] = 0;
        order.push(Self::ROOT);
        let mut nlink = vec![0u32; self.inodes.len()];
        // Depth first with sorted names; explicit stack of iterators would borrow self,
        // so the stack holds directory ids and children are pushed in reverse.
        while let Some(dir) = stack.pop() {
            let Kind::Dir(children) = &self.inodes[dir].kind else {
                continue;
            };
            let mut subdirs = Vec::new();
            for e in children.values() {
                nlink[e.inode] += 1;
                if seen[e.inode] == u32::MAX {
                    seen[e.inode] = order.len() as u32;
                    order.push(e.inode);
                    if matches!(self.inodes[e.inode].kind, Kind::Dir(_)) {
                        subdirs.push(e.inode);
                    }
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
        order
            .into_iter()
            .map(|id| {
                let n = match &self.inodes[id].kind {
                    Kind::Dir(children) => {
                        2 + children
                            .values()
                            .filter(|e| matches!(self.inodes[e.inode].kind, Kind::Dir(_)))
                            .count() as u32
                    }
                    _ => nlink[id],
                };
                (id, n)
            })
            .collect()
    }

    /// Every object digest the tree references (sorted, deduplicated).
    pub fn objects(&self) -> Vec<VerityDigest> {
        let mut out: Vec<VerityDigest> = self
            .walk()
            .into_iter()
            .filter_map(|(id, _)| match self.inodes[id].kind {
                Kind::File {
                    digest: Some(d), ..
                } => Some(d),
                _ => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tree: &mut FsTree) -> InodeId {
        tree.add_inode(Inode {
            meta: Meta::default(),
            kind: Kind::File {
                size: 0,
                digest: None,
            },
        })
    }

    #[test]
    fn lookup_refuses_to_cross_symlinks() {
        let mut t = FsTree::new();
        let etc = t.ensure_dir(&[b"etc"], 0).unwrap();
        let link = t.add_inode(Inode {
            meta: Meta::default(),
            kind: Kind::Symlink(b"/".to_vec()),
        });
        t.link(FsTree::ROOT, b"up", link, 0);
        let f = file(&mut t);
        t.link(etc, b"passwd", f, 0);
        assert_eq!(t.lookup(&[b"etc", b"passwd"]).unwrap(), Some(f));
        assert_eq!(
            t.lookup(&[b"up", b"etc"]),
            Err(TreeError::ThroughSymlink { path: "/up".into() })
        );
        assert!(matches!(
            t.ensure_dir(&[b"up", b"x"], 0),
            Err(TreeError::ThroughSymlink { .. })
        ));
        assert!(matches!(
            t.ensure_dir(&[b"etc", b"passwd", b"x"], 0),
            Err(TreeError::NotADirectory { .. })
        ));
    }

    #[test]
    fn walk_counts_hardlinks_and_subdirs() {
        let mut t = FsTree::new();
        let a = t.ensure_dir(&[b"a"], 0).unwrap();
        t.ensure_dir(&[b"a", b"b"], 0).unwrap();
        let f = file(&mut t);
        t.link(a, b"f1", f, 0);
        t.link(FsTree::ROOT, b"f2", f, 0);
        let w = t.walk();
        assert_eq!(w[0], (FsTree::ROOT, 3));
        assert!(w.contains(&(a, 3)));
        assert!(w.contains(&(f, 2)));
        assert_eq!(w.len(), 4);
    }

    #[test]
    fn clear_lower_keeps_same_layer_entries() {
        let mut t = FsTree::new();
        let d = t.ensure_dir(&[b"d"], 0).unwrap();
        let old = file(&mut t);
        let new = file(&mut t);
        t.link(d, b"old", old, 0);
        t.link(d, b"new", new, 1);
        t.clear_lower(d, 1);
        assert_eq!(t.lookup(&[b"d", b"old"]).unwrap(), None);
        assert_eq!(t.lookup(&[b"d", b"new"]).unwrap(), Some(new));
    }
}
