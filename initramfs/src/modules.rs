//! Kernel-module closure: which `.ko` files the init must load, in which order.
//!
//! Dependencies come from `modules.dep` when the tree has one (a tree that went
//! through `depmod`). Debian's kernel package ships none (its postinst runs depmod),
//! so otherwise they come from each module's own `.modinfo` `depends=` field, which
//! modpost writes at kernel build time and from which depmod derives the same edges.
//! Only the modules on the closure are decompressed, so this stays fast.
//!
//! Modules are decompressed here, at build time, so the init hands plain ELF files to
//! `finit_module` and needs no decompressor (and the kernel no module-decompress
//! support).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("module `{0}` is neither a module file nor built into the kernel")]
    NotFound(String),
    #[error("module `{name}` (needed by `{by}`) is neither a module file nor built in")]
    DependencyNotFound { name: String, by: String },
    #[error("modules.dep line {line} is malformed: {text:?}")]
    DepSyntax { line: usize, text: String },
    #[error("module dependency cycle through `{0}`")]
    Cycle(String),
    #[error("cannot decompress {path}")]
    Decompress {
        path: PathBuf,
        #[source]
        source: lzma_rs::error::Error,
    },
    #[error("cannot decompress {path}")]
    DecompressZstd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a kernel module: {reason}")]
    NotAModule { path: PathBuf, reason: String },
    #[error("{path} was built for kernel `{vermagic}`, not `{release}`")]
    WrongKernel {
        path: PathBuf,
        vermagic: String,
        release: String,
    },
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModuleError + '_ {
    move |source| ModuleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `virtio-rng` and `virtio_rng` are the same module to the kernel.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name of a path such as `kernel/fs/erofs/erofs.ko.xz`.
pub fn name_of(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file
        .strip_suffix(".ko.xz")
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))
        .or_else(|| file.strip_suffix(".ko"))?;
    Some(normalize(stem))
}

/// Parses `modules.dep`: `path: dep-path dep-path ...` per line, paths relative to
/// the modules folder. Returns name -> (path, dependency names).
pub fn parse_modules_dep(
    text: &str,
) -> Result<BTreeMap<String, (String, Vec<String>)>, ModuleError> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || ModuleError::DepSyntax {
            line: i + 1,
            text: line.to_string(),
        };
        let (path, deps) = line.split_once(':').ok_or_else(bad)?;
        let name = name_of(path.trim()).ok_or_else(bad)?;
        let deps = deps
            .split_whitespace()
            .map(|d| name_of(d).ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()?;
        out.insert(name, (path.trim().to_string(), deps));
    }
    Ok(out)
}

/// Fields of a module's `.modinfo` section that the closure needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModInfo {
    pub name: Option<String>,
    pub depends: Vec<String>,
    pub vermagic: Option<String>,
    /// `alias=` fields: the device (or filesystem, device node) patterns the
    /// module serves.
    pub aliases: Vec<String>,
}

/// Reads `.modinfo` (NUL-separated `key=value` strings) from a module's ELF image.
pub fn read_modinfo(elf: &[u8]) -> Result<ModInfo, String> {
    let file = object::File::parse(elf).map_err(|e| e.to_string())?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or_else(|| "no .modinfo section".to_string())?;
    let data = section.data().map_err(|e| e.to_string())?;
    let mut info = ModInfo::default();
    for field in data.split(|b| *b == 0) {
        let Ok(field) = std::str::from_utf8(field) else {
            continue;
        };
        match field.split_once('=') {
            Some(("name", v)) => info.name = Some(v.to_string()),
            Some(("vermagic", v)) => info.vermagic = Some(v.to_string()),
            Some(("alias", v)) => info.aliases.push(v.to_string()),
            Some(("depends", v)) => {
                info.depends = v
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(normalize)
                    .collect()
            }
            _ => {}
        }
    }
    Ok(info)
}

/// Decompresses a module file by its suffix.
pub fn read_module_file(path: &Path) -> Result<Vec<u8>, ModuleError> {
    let raw = fs::read(path).map_err(io(path))?;
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        let mut out = Vec::with_capacity(raw.len() * 4);
        lzma_rs::xz_decompress(&mut raw.as_slice(), &mut out).map_err(|source| {
            ModuleError::Decompress {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(out)
    } else if name.ends_with(".zst") {
        zstd::stream::decode_all(raw.as_slice()).map_err(|source| ModuleError::DecompressZstd {
            path: path.to_path_buf(),
            source,
        })
    } else {
        Ok(raw)
    }
}

/// A kernel's modules folder (`/usr/lib/modules/RELEASE`).
#[derive(Debug)]
pub struct ModuleTree {
    dir: PathBuf,
    release: String,
    /// name -> path relative to `dir`
    paths: BTreeMap<String, String>,
    /// From `modules.dep` when present.
    dep: Option<BTreeMap<String, Vec<String>>>,
    builtin: BTreeSet<String>,
}

/// One module of the closure, decompressed.
#[derive(Debug, Clone)]
pub struct ResolvedModule {
    pub name: String,
    /// Path in the kernel tree, relative to the modules folder.
    pub source: String,
    pub elf: Vec<u8>,
    /// Dependencies that are modules of the closure (built-in ones left out).
    pub deps: Vec<String>,
    /// The module's `alias=` fields.
    pub aliases: Vec<String>,
    /// Named in the request (not only pulled in as a dependency).
    pub requested: bool,
}

/// The closure in load order, plus requested names the kernel has built in.
#[derive(Debug, Clone)]
pub struct Closure {
    pub modules: Vec<ResolvedModule>,
    pub builtin: Vec<String>,
}

impl ModuleTree {
    pub fn open(dir: &Path, release: &str) -> Result<Self, ModuleError> {
        let builtin_path = dir.join("modules.builtin");
        let builtin = fs::read_to_string(&builtin_path)
            .map_err(io(&builtin_path))?
            .lines()
            .filter_map(name_of)
            .collect();
        let dep_path = dir.join("modules.dep");
        let (paths, dep) = if dep_path.is_file() {
            let parsed = parse_modules_dep(&fs::read_to_string(&dep_path).map_err(io(&dep_path))?)?;
            let paths = parsed
                .iter()
                .map(|(n, (p, _))| (n.clone(), p.clone()))
                .collect();
            let dep = parsed.into_iter().map(|(n, (_, d))| (n, d)).collect();
            (paths, Some(dep))
        } else {
            let mut paths = BTreeMap::new();
            let kernel = dir.join("kernel");
            walk(&kernel, &mut |path| {
                if let Ok(rel) = path.strip_prefix(dir) {
                    let rel = rel.to_string_lossy().into_owned();
                    if let Some(name) = name_of(&rel) {
                        paths.insert(name, rel);
                    }
                }
            })?;
            (paths, None)
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            release: release.to_string(),
            paths,
            dep,
            builtin,
        })
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    fn load(&self, name: &str) -> Result<(String, Vec<u8>, ModInfo), ModuleError> {
        let rel = self
            .paths
            .get(name)
            .ok_or_else(|| ModuleError::NotFound(name.to_string()))?;
        let path = self.dir.join(rel);
        let elf = read_module_file(&path)?;
        let info = read_modinfo(&elf).map_err(|reason| ModuleError::NotAModule {
            path: path.clone(),
            reason,
        })?;
        let vermagic = info.vermagic.clone().unwrap_or_default();
        if vermagic.split_whitespace().next() != Some(self.release.as_str()) {
            return Err(ModuleError::WrongKernel {
                path,
                vermagic,
                release: self.release.clone(),
            });
        }
        Ok((rel.clone(), elf, info))
    }

    /// Resolves `wanted` and everything they depend on, dependencies first. The order
    /// is deterministic: depth-first in the order given, dependencies in their
    /// recorded order.
    pub fn closure(&self, wanted: &[String]) -> Result<Closure, ModuleError> {
        let mut state: BTreeMap<String, bool> = BTreeMap::new(); // false = visiting
        let mut modules = Vec::new();
        let mut builtin = Vec::new();
        for name in wanted {
            let name = normalize(name);
            if !self.paths.contains_key(&name) {
                if self.is_builtin(&name) {
                    builtin.push(name);
                    continue;
                }
                return Err(ModuleError::NotFound(name));
            }
            self.visit(&name, &mut state, &mut modules)?;
            if let Some(m) = modules.iter_mut().find(|m| m.name == name) {
                m.requested = true;
            }
        }
        Ok(Closure { modules, builtin })
    }

    fn visit(
        &self,
        name: &str,
        state: &mut BTreeMap<String, bool>,
        out: &mut Vec<ResolvedModule>,
    ) -> Result<(), ModuleError> {
        match state.get(name) {
            Some(true) => return Ok(()),
            Some(false) => return Err(ModuleError::Cycle(name.to_string())),
            None => {}
        }
        state.insert(name.to_string(), false);
        let (source, elf, info) = self.load(name)?;
        let deps = match &self.dep {
            Some(dep) => dep.get(name).cloned().unwrap_or_default(),
            None => info.depends.clone(),
        };
        let mut module_deps = Vec::new();
        for dep in deps {
            if !self.paths.contains_key(&dep) {
                if self.is_builtin(&dep) {
                    continue;
                }
                return Err(ModuleError::DependencyNotFound {
                    name: dep,
                    by: name.to_string(),
                });
            }
            self.visit(&dep, state, out)?;
            module_deps.push(dep);
        }
        state.insert(name.to_string(), true);
        out.push(ResolvedModule {
            name: name.to_string(),
            source,
            elf,
            deps: module_deps,
            aliases: info.aliases,
            requested: false,
        });
        Ok(())
    }
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) -> Result<(), ModuleError> {
    let mut entries = fs::read_dir(dir)
        .map_err(io(dir))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path))?;
        if kind.is_dir() {
            walk(&path, f)?;
        } else if kind.is_file() {
            f(&path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalized() {
        assert_eq!(
            name_of("kernel/drivers/char/hw_random/virtio-rng.ko.xz").as_deref(),
            Some("virtio_rng")
        );
        assert_eq!(name_of("kernel/fs/ext4/ext4.ko").as_deref(), Some("ext4"));
        assert_eq!(name_of("kernel/fs/ext4/README"), None);
    }

    #[test]
    fn modules_dep_parses() {
        let text = "kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz\n\
                    kernel/net/core/failover.ko.xz:\n\n";
        let dep = parse_modules_dep(text).unwrap();
        assert_eq!(dep["virtio_net"].1, vec!["net_failover", "failover"]);
        assert!(dep["failover"].1.is_empty());
        assert!(matches!(
            parse_modules_dep("no colon here"),
            Err(ModuleError::DepSyntax { line: 1, .. })
        ));
    }

    /// Builds a fake module tree: minimal ELF objects with a `.modinfo` section,
    /// xz-compressed like Debian's.
    fn fake_tree(
        mods: &[(&str, &str, &str)],
        builtin: &str,
        dep: Option<&str>,
    ) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (rel, depends, vermagic) in mods {
            let name = name_of(rel).unwrap();
            let elf = fake_module(&name, depends, vermagic);
            let path = dir.path().join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            let mut xz = Vec::new();
            lzma_rs::xz_compress(&mut elf.as_slice(), &mut xz).unwrap();
            fs::write(path, xz).unwrap();
        }
        fs::write(dir.path().join("modules.builtin"), builtin).unwrap();
        if let Some(dep) = dep {
            fs::write(dir.path().join("modules.dep"), dep).unwrap();
        }
        dir
    }

    pub(crate) fn fake_module(name: &str, depends: &str, vermagic: &str) -> Vec<u8> {
        use object::write::Object as WObject;
        let mut obj = WObject::new(
            object::BinaryFormat::Elf,
            object::Architecture::X86_64,
            object::Endianness::Little,
        );
        let id = obj.add_section(
            Vec::new(),
            b".modinfo".to_vec(),
            object::SectionKind::ReadOnlyData,
        );
        let info = format!("name={name}\0depends={depends}\0vermagic={vermagic} SMP mod_unload \0");
        obj.append_section_data(id, info.as_bytes(), 1);
        obj.write().unwrap()
    }

    const REL: &str = "6.12.0-test";

    #[test]
    fn closure_from_modinfo_is_dependencies_first() {
        let dir = fake_tree(
            &[
                ("kernel/drivers/net/virtio_net.ko.xz", "net_failover", REL),
                ("kernel/drivers/net/net_failover.ko.xz", "failover", REL),
                ("kernel/net/core/failover.ko.xz", "", REL),
                ("kernel/fs/erofs/erofs.ko.xz", "libcrc32c", REL),
                ("kernel/lib/libcrc32c.ko.xz", "", REL),
                ("kernel/drivers/char/hw_random/virtio-rng.ko.xz", "", REL),
            ],
            "kernel/fs/ext4/ext4.ko\n",
            None,
        );
        let tree = ModuleTree::open(dir.path(), REL).unwrap();
        let wanted: Vec<String> = ["virtio_net", "erofs", "ext4", "virtio-rng", "failover"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let closure = tree.closure(&wanted).unwrap();
        let names: Vec<&str> = closure.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "failover",
                "net_failover",
                "virtio_net",
                "libcrc32c",
                "erofs",
                "virtio_rng"
            ]
        );
        assert_eq!(closure.builtin, ["ext4"]);
        // Decompressed: plain ELF.
        assert!(closure.modules[0].elf.starts_with(b"\x7fELF"));
    }

    #[test]
    fn modules_dep_wins_over_modinfo() {
        let dir = fake_tree(
            &[("kernel/a.ko.xz", "", REL), ("kernel/b.ko.xz", "", REL)],
            "",
            Some("kernel/a.ko.xz: kernel/b.ko.xz\nkernel/b.ko.xz:\n"),
        );
        let tree = ModuleTree::open(dir.path(), REL).unwrap();
        let closure = tree.closure(&["a".to_string()]).unwrap();
        let names: Vec<&str> = closure.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
    }

    #[test]
    fn missing_wrong_kernel_and_cycles_are_errors() {
        let dir = fake_tree(
            &[
                ("kernel/a.ko.xz", "b", REL),
                ("kernel/b.ko.xz", "a", REL),
                ("kernel/c.ko.xz", "nowhere", REL),
                ("kernel/d.ko.xz", "", "5.10.0-old"),
            ],
            "",
            None,
        );
        let tree = ModuleTree::open(dir.path(), REL).unwrap();
        let one = |n: &str| tree.closure(&[n.to_string()]).unwrap_err();
        assert!(matches!(one("a"), ModuleError::Cycle(_)));
        assert!(matches!(one("c"), ModuleError::DependencyNotFound { .. }));
        assert!(matches!(one("d"), ModuleError::WrongKernel { .. }));
        assert!(matches!(one("zzz"), ModuleError::NotFound(_)));
    }
}
