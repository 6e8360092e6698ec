//! The pinned kernel's complete module tree as a root module: stacked over a Debian root,
//! it gives `modprobe`, udev and Docker every module of the kernel the node booted.
//!
//! The tree is written under `usr/lib/modules/RELEASE`, never `lib/modules`: Debian roots
//! have `/lib -> usr/lib`, and a real `lib/` folder in an upper layer of the overlay would
//! hide that symlink and with it the whole of `/lib`. The `.ko.xz` files are copied as
//! Debian ships them, then `depmod` writes `modules.dep` and its indexes (Debian's package
//! ships none: its postinst runs depmod). Every entry gets fixed modes and the mtime the
//! package gave `modules.order`, so the same kernel gives the same bytes.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use crate::kernel::{run, KernelError, KernelTree};

#[derive(Debug, thiserror::Error)]
pub enum KmodsError {
    #[error("{0} exists and is not an empty folder")]
    OutNotEmpty(PathBuf),
    #[error("{path} is neither a file nor a folder; a module tree holds only those")]
    UnexpectedEntry { path: PathBuf },
    #[error("depmod")]
    Depmod(#[source] KernelError),
    #[error("depmod wrote no {0}")]
    DepmodOutputMissing(PathBuf),
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KmodsError + '_ {
    move |source| KmodsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What [`write_module_tree`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleTreeOutput {
    pub release: String,
    /// `OUT/usr/lib/modules/RELEASE`.
    pub modules_dir: PathBuf,
    /// Regular files written, the depmod indexes included.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Writes the kernel's module tree to `out/usr/lib/modules/RELEASE` and runs `depmod`
/// over it. `out` must not exist or be an empty folder; it is built beside and renamed
/// into place, so an interrupted run leaves no tree that looks complete.
pub fn write_module_tree(kernel: &KernelTree, out: &Path) -> Result<ModuleTreeOutput, KmodsError> {
    write_module_tree_with(
        &kernel.modules_dir(),
        &kernel.pin.release,
        out,
        Path::new("depmod"),
    )
}

/// [`write_module_tree`] from a module folder, with the `depmod` to run.
pub fn write_module_tree_with(
    source: &Path,
    release: &str,
    out: &Path,
    depmod: &Path,
) -> Result<ModuleTreeOutput, KmodsError> {
    if out.exists() {
        let empty = out.is_dir() && fs::read_dir(out).map_err(io(out))?.next().is_none();
        if !empty {
            return Err(KmodsError::OutNotEmpty(out.to_path_buf()));
        }
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "kernel-modules".into());
    let partial = out.with_file_name(format!(".{name}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    let rel = Path::new("usr/lib/modules").join(release);
    let dest = partial.join(&rel);
    fs::create_dir_all(&dest).map_err(io(&dest))?;
    copy_tree(source, &dest)?;

    // Bookworm's kmod reads BASE/lib/modules (trixie's BASE/usr/lib/modules): a `lib`
    // symlink, as in the root this is stacked on, serves both and is removed after.
    let lib = partial.join("lib");
    std::os::unix::fs::symlink("usr/lib", &lib).map_err(io(&lib))?;
    let mut cmd = Command::new(depmod);
    cmd.arg("-b").arg(&partial).arg(release);
    let ran = run(cmd).map_err(KmodsError::Depmod);
    fs::remove_file(&lib).map_err(io(&lib))?;
    ran?;
    let dep = dest.join("modules.dep");
    if !dep.is_file() {
        return Err(KmodsError::DepmodOutputMissing(dep));
    }

    // The package's own time for every entry, the depmod output and folders included.
    let order = source.join("modules.order");
    let mtime = fs::metadata(&order)
        .and_then(|m| m.modified())
        .map_err(io(&order))?;
    let mut totals = (0, 0);
    normalize(&partial, mtime, &mut totals)?;
    fs::rename(&partial, out).map_err(io(out))?;
    Ok(ModuleTreeOutput {
        release: release.to_string(),
        modules_dir: out.join(rel),
        files: totals.0,
        bytes: totals.1,
    })
}

fn sorted_entries(dir: &Path) -> Result<Vec<fs::DirEntry>, KmodsError> {
    let mut entries = fs::read_dir(dir)
        .map_err(io(dir))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io(dir))?;
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), KmodsError> {
    for entry in sorted_entries(from)? {
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let kind = entry.file_type().map_err(io(&src))?;
        if kind.is_dir() {
            fs::create_dir(&dst).map_err(io(&dst))?;
            copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            fs::copy(&src, &dst).map_err(io(&dst))?;
        } else {
            // Debian's package has no symlinks or devices here; one would mean a tree
            // this code was not written for.
            return Err(KmodsError::UnexpectedEntry { path: src });
        }
    }
    Ok(())
}

/// 0755 folders, 0644 files, one mtime; counts the files and their bytes. Children
/// first, so setting a folder's time is the last change to it.
fn normalize(path: &Path, mtime: SystemTime, totals: &mut (u64, u64)) -> Result<(), KmodsError> {
    let meta = fs::symlink_metadata(path).map_err(io(path))?;
    let mode = if meta.is_dir() {
        for entry in sorted_entries(path)? {
            normalize(&entry.path(), mtime, totals)?;
        }
        0o755
    } else if meta.is_file() {
        totals.0 += 1;
        totals.1 += meta.len();
        0o644
    } else {
        return Err(KmodsError::UnexpectedEntry {
            path: path.to_path_buf(),
        });
    };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io(path))?;
    fs::File::open(path)
        .and_then(|f| f.set_modified(mtime))
        .map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    const RELEASE: &str = "6.1.0-test";

    /// A stand-in module folder and a `depmod` that writes `modules.dep` where the real
    /// one does (BASE/lib/modules/RELEASE), recording its arguments.
    fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
        let src = dir.join("src");
        fs::create_dir_all(src.join("kernel/fs/overlayfs")).unwrap();
        fs::write(src.join("kernel/fs/overlayfs/overlay.ko.xz"), b"xz").unwrap();
        fs::write(
            src.join("modules.order"),
            b"kernel/fs/overlayfs/overlay.ko\n",
        )
        .unwrap();
        fs::write(src.join("modules.builtin"), b"kernel/fs/ext4/ext4.ko\n").unwrap();
        let then = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        fs::File::open(src.join("modules.order"))
            .unwrap()
            .set_modified(then)
            .unwrap();
        let depmod = dir.join("depmod");
        fs::write(
            &depmod,
            format!(
                "#!/bin/sh\necho \"$@\" > {args}\n\
                 echo 'kernel/fs/overlayfs/overlay.ko.xz:' > \"$2/lib/modules/$3/modules.dep\"\n",
                args = dir.join("args").display()
            ),
        )
        .unwrap();
        fs::set_permissions(&depmod, fs::Permissions::from_mode(0o755)).unwrap();
        (src, depmod)
    }

    #[test]
    fn the_tree_lands_under_usr_lib_modules_with_no_lib_folder() {
        let dir = tempfile::tempdir().unwrap();
        let (src, depmod) = fixture(dir.path());
        let out = dir.path().join("out");
        let written = write_module_tree_with(&src, RELEASE, &out, &depmod).unwrap();
        let modules = out.join("usr/lib/modules").join(RELEASE);
        assert_eq!(written.modules_dir, modules);
        assert!(modules.join("kernel/fs/overlayfs/overlay.ko.xz").is_file());
        assert!(modules.join("modules.dep").is_file());
        assert!(modules.join("modules.builtin").is_file());
        // A `lib` entry would hide the root's `/lib -> usr/lib` in the overlay.
        assert!(fs::symlink_metadata(out.join("lib")).is_err());
        let names: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["usr"]);
        assert_eq!(written.files, 4);
        let args = fs::read_to_string(dir.path().join("args")).unwrap();
        assert!(args.ends_with(&format!(" {RELEASE}\n")), "{args}");
        assert!(args.starts_with("-b "), "{args}");
    }

    #[test]
    fn every_entry_gets_fixed_modes_and_the_package_time() {
        let dir = tempfile::tempdir().unwrap();
        let (src, depmod) = fixture(dir.path());
        let out = dir.path().join("out");
        write_module_tree_with(&src, RELEASE, &out, &depmod).unwrap();
        let mut stack = vec![out.clone()];
        while let Some(p) = stack.pop() {
            let m = fs::symlink_metadata(&p).unwrap();
            assert_eq!(m.mtime(), 1_700_000_000, "{}", p.display());
            if m.is_dir() {
                assert_eq!(m.mode() & 0o7777, 0o755, "{}", p.display());
                stack.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else {
                assert_eq!(m.mode() & 0o7777, 0o644, "{}", p.display());
            }
        }
    }

    #[test]
    fn a_folder_with_content_is_refused_and_an_empty_one_is_filled() {
        let dir = tempfile::tempdir().unwrap();
        let (src, depmod) = fixture(dir.path());
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("stray"), b"").unwrap();
        let err = write_module_tree_with(&src, RELEASE, &out, &depmod).unwrap_err();
        assert!(matches!(err, KmodsError::OutNotEmpty(_)), "{err}");
        fs::remove_file(out.join("stray")).unwrap();
        write_module_tree_with(&src, RELEASE, &out, &depmod).unwrap();
        assert!(out.join("usr/lib/modules").join(RELEASE).is_dir());
    }

    #[test]
    fn a_failed_depmod_leaves_no_output() {
        let dir = tempfile::tempdir().unwrap();
        let (src, _) = fixture(dir.path());
        let out = dir.path().join("out");
        let err = write_module_tree_with(&src, RELEASE, &out, Path::new("false")).unwrap_err();
        assert!(matches!(err, KmodsError::Depmod(_)), "{err}");
        assert!(!out.exists());
    }
}
