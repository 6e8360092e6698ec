//! Mounting modules: each composefs image is an EROFS mount (file-backed; Linux >= 6.12
//! mounts a regular file directly), and overlayfs stacks image mounts over the object
//! store as a data-only lower layer (what `lowerdir=IMG1:IMG2::OBJECTS` says; we pass
//! the layers one by one as `lowerdir+`/`datadir+`, Linux >= 6.8, because `fsconfig`
//! caps a string value at 256 bytes and three store paths exceed it),
//! `metacopy=on,redirect_dir=on`, plus `verity=require` when the store has kernel
//! fs-verity. A union root adds an upper layer: a tmpfs (ephemeral nodes) or a
//! directory on `/persist` (persistent nodes); writable, lowers untouched.
//!
//! Every mount goes through the [`Mounter`] seam; [`KernelMounter`] issues the
//! syscalls (new mount API) and [`RecordingMounter`] records them, so the exact mount
//! sequence is unit-testable without root.
//!
//! It must never mount an image whose objects it has not verified: in userspace mode
//! every object is re-hashed first; in kernel mode overlayfs checks digests itself.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use powernode_proto::ErrorCode;

use super::store::{ObjectStore, StoreError, VerityMode};
use super::ModuleErrorCode;
use crate::verity::VerityDigest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOpt {
    Flag(&'static str),
    Str(&'static str, String),
}

/// One filesystem mount, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub fstype: &'static str,
    pub source: Option<PathBuf>,
    pub options: Vec<MountOpt>,
    pub read_only: bool,
    pub target: PathBuf,
    pub restrict: Restrict,
}

/// What a mount refuses to honour. A runtime module's tree is mounted `nosuid,nodev`
/// (its set-user-ID files run as their caller, its device nodes open nothing) unless
/// the module asks otherwise (`org.powernode.mount-options`); a root module is the
/// node's whole userspace and keeps both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restrict {
    pub nosuid: bool,
    pub nodev: bool,
}

impl Restrict {
    /// `nosuid,nodev`.
    pub const RUNTIME: Self = Self {
        nosuid: true,
        nodev: true,
    };
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(
        "{path}: overlayfs layer paths must be UTF-8, under 256 bytes, without `:`, `,` or `\\`"
    )]
    BadPath { path: PathBuf },
    #[error("filesystem type {fstype} is not available in this kernel")]
    FsNotSupported { fstype: &'static str },
    #[error("{step} for {fstype} on {target}: {kernel_log}")]
    Syscall {
        step: &'static str,
        fstype: &'static str,
        target: PathBuf,
        kernel_log: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unmounting {target}")]
    Unmount {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {0} is not in the store")]
    ImageMissing(VerityDigest),
    #[error("a union root needs at least one module")]
    NoModules,
    #[error("verifying the module's objects")]
    Store(#[from] StoreError),
}

impl ModuleErrorCode for MountError {
    fn code(&self) -> ErrorCode {
        match self {
            MountError::Store(e) => e.code(),
            MountError::ImageMissing(_) => ErrorCode::NotFound,
            _ => ErrorCode::Internal,
        }
    }
}

/// The syscall seam.
pub trait Mounter {
    fn mount(&self, spec: &MountSpec) -> Result<(), MountError>;
    fn unmount(&self, target: &Path) -> Result<(), MountError>;
}

/// Records mounts instead of making them.
#[derive(Debug, Default)]
pub struct RecordingMounter {
    pub calls: Mutex<Vec<String>>,
}

impl RecordingMounter {
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Mounter for RecordingMounter {
    fn mount(&self, spec: &MountSpec) -> Result<(), MountError> {
        let opts: Vec<String> = spec
            .options
            .iter()
            .map(|o| match o {
                MountOpt::Flag(f) => f.to_string(),
                MountOpt::Str(k, v) => format!("{k}={v}"),
            })
            .collect();
        let line = format!(
            "mount {} {} -> {}{} [{}]",
            spec.fstype,
            spec.source
                .as_ref()
                .map_or("none".into(), |s| s.display().to_string()),
            spec.target.display(),
            if spec.read_only { " ro" } else { "" },
            opts.join(",")
        );
        if let Ok(mut c) = self.calls.lock() {
            c.push(line);
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        if let Ok(mut c) = self.calls.lock() {
            c.push(format!("umount {}", target.display()));
        }
        Ok(())
    }
}

/// The real thing: `fsopen`/`fsconfig`/`fsmount`/`move_mount`.
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelMounter;

impl Mounter for KernelMounter {
    fn mount(&self, spec: &MountSpec) -> Result<(), MountError> {
        sys::mount(spec)
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH).map_err(|e| {
            MountError::Unmount {
                target: target.to_path_buf(),
                source: e.into(),
            }
        })
    }
}

mod sys {
    use super::{MountError, MountOpt, MountSpec};
    use rustix::fs::CWD;
    use rustix::io::Errno;
    use rustix::mount::{
        fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount,
        FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags,
    };
    use std::os::fd::{AsFd, OwnedFd};

    /// What the kernel wrote to the fs context (`e overlay: ...`), for the error.
    fn kernel_log(fs: &OwnedFd) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = rustix::io::read(fs, &mut buf) {
            if n == 0 {
                break;
            }
            if !out.is_empty() {
                out.push("; ".to_string());
            }
            out.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
        }
        out.concat()
    }

    pub(super) fn mount(spec: &MountSpec) -> Result<(), MountError> {
        let fs = fsopen(spec.fstype, FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| match e {
            Errno::NODEV => MountError::FsNotSupported {
                fstype: spec.fstype,
            },
            e => MountError::Syscall {
                step: "fsopen",
                fstype: spec.fstype,
                target: spec.target.clone(),
                kernel_log: String::new(),
                source: e.into(),
            },
        })?;
        let fail = |step: &'static str, e: Errno| MountError::Syscall {
            step,
            fstype: spec.fstype,
            target: spec.target.clone(),
            kernel_log: kernel_log(&fs),
            source: e.into(),
        };
        if let Some(src) = &spec.source {
            fsconfig_set_string(fs.as_fd(), "source", src.as_path())
                .map_err(|e| fail("fsconfig source", e))?;
        }
        for o in &spec.options {
            match o {
                MountOpt::Flag(f) => fsconfig_set_flag(fs.as_fd(), *f),
                MountOpt::Str(k, v) => fsconfig_set_string(fs.as_fd(), *k, v.as_str()),
            }
            .map_err(|e| fail("fsconfig", e))?;
        }
        fsconfig_create(fs.as_fd()).map_err(|e| fail("fsconfig create", e))?;
        let mut attrs = MountAttrFlags::empty();
        if spec.read_only {
            attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY;
        }
        if spec.restrict.nosuid {
            attrs |= MountAttrFlags::MOUNT_ATTR_NOSUID;
        }
        if spec.restrict.nodev {
            attrs |= MountAttrFlags::MOUNT_ATTR_NODEV;
        }
        let mnt = fsmount(fs.as_fd(), FsMountFlags::FSMOUNT_CLOEXEC, attrs)
            .map_err(|e| fail("fsmount", e))?;
        move_mount(
            mnt.as_fd(),
            "",
            CWD,
            spec.target.as_path(),
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(|e| fail("move_mount", e))
    }
}

/// Layer paths as overlayfs options. `lowerdir+` needs no escaping, but refusing the
/// characters the classic `lowerdir=` syntax would need escaped keeps the recorded
/// option lines unambiguous, and no path of ours contains them; and each value must fit
/// `fsconfig`'s 256-byte string limit.
fn layer_path(p: &Path) -> Result<&str, MountError> {
    p.to_str()
        .filter(|s| !s.contains([':', ',', '\\']) && !s.is_empty() && s.len() < 256)
        .ok_or_else(|| MountError::BadPath {
            path: p.to_path_buf(),
        })
}

/// Overlay options for image mounts `lowers` (top first) over the object store `data`.
pub fn overlay_options(
    lowers: &[&Path],
    data: &Path,
    upper: Option<(&Path, &Path)>,
    verity: VerityMode,
) -> Result<Vec<MountOpt>, MountError> {
    let mut opts = Vec::new();
    for p in lowers {
        opts.push(MountOpt::Str("lowerdir+", layer_path(p)?.into()));
    }
    opts.push(MountOpt::Str("datadir+", layer_path(data)?.into()));
    opts.push(MountOpt::Str("metacopy", "on".into()));
    opts.push(MountOpt::Str("redirect_dir", "on".into()));
    if verity == VerityMode::Kernel {
        opts.push(MountOpt::Str("verity", "require".into()));
    }
    if let Some((upperdir, workdir)) = upper {
        opts.push(MountOpt::Str("upperdir", layer_path(upperdir)?.into()));
        opts.push(MountOpt::Str("workdir", layer_path(workdir)?.into()));
    }
    Ok(opts)
}

fn mkdir(p: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(p).map_err(|source| MountError::Io {
        path: p.to_path_buf(),
        source,
    })
}

/// Mounts the image (read-only EROFS) at `at`, after checking it and its objects.
fn mount_image(
    m: &dyn Mounter,
    store: &ObjectStore,
    image: &VerityDigest,
    at: &Path,
    restrict: Restrict,
) -> Result<(), MountError> {
    if !store.has_image(image) {
        return Err(MountError::ImageMissing(*image));
    }
    if store.verity_mode() == VerityMode::Userspace {
        store.verify_image(image)?;
    } else {
        // The image itself is read by EROFS, not through overlay: measure it.
        store.verify(image)?;
    }
    mkdir(at)?;
    m.mount(&MountSpec {
        fstype: "erofs",
        source: Some(store.image_path(image)),
        options: vec![],
        read_only: true,
        target: at.to_path_buf(),
        restrict,
    })
}

/// Mounts one module read-only at `target` with `restrict` (both mounts: the EROFS
/// image at `image_mnt` and the overlay over it).
pub fn mount_module(
    m: &dyn Mounter,
    store: &ObjectStore,
    image: &VerityDigest,
    image_mnt: &Path,
    target: &Path,
    restrict: Restrict,
) -> Result<(), MountError> {
    mount_image(m, store, image, image_mnt, restrict)?;
    let options = overlay_options(&[image_mnt], store.objects_dir(), None, store.verity_mode())?;
    mkdir(target)?;
    let r = m.mount(&MountSpec {
        fstype: "overlay",
        source: Some(PathBuf::from(format!("composefs:{}", image.to_hex()))),
        options,
        read_only: true,
        target: target.to_path_buf(),
        restrict,
    });
    if r.is_err() {
        let _ = m.unmount(image_mnt);
    }
    r
}

/// Where a union root's writes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upper {
    /// A fresh tmpfs: writes vanish at reboot (ephemeral nodes).
    Tmpfs,
    /// A directory on a persistent filesystem (`/persist/...`); the overlay's upper and
    /// work directories are created inside it, so they share one filesystem as
    /// overlayfs requires.
    Dir(PathBuf),
}

/// What [`mount_union`] mounted, so it can be taken down again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnionRoot {
    pub target: PathBuf,
    pub image_mounts: Vec<PathBuf>,
    /// The directory holding `upper/` and `work/`.
    pub upper: PathBuf,
    /// Whether `upper` is a tmpfs this module mounted.
    pub upper_is_tmpfs: bool,
    /// Bytes received from registries to compose it (set by
    /// `module_runtime::compose_root`; 0 when every module was already in the store
    /// apart from its re-checked manifest and signature).
    pub fetched_bytes: u64,
}

impl UnionRoot {
    /// Unmounts everything, top first.
    pub fn unmount(&self, m: &dyn Mounter) -> Result<(), MountError> {
        m.unmount(&self.target)?;
        if self.upper_is_tmpfs {
            m.unmount(&self.upper)?;
        }
        for p in &self.image_mounts {
            m.unmount(p)?;
        }
        Ok(())
    }
}

/// Composes root modules (`images`, top first: earlier ones win) into a writable
/// union at `target`: image mounts under `work/images/`, the overlay's upper and work
/// dirs on a fresh tmpfs at `work/upper` or in the given persistent directory.
pub fn mount_union(
    m: &dyn Mounter,
    store: &ObjectStore,
    images: &[VerityDigest],
    work: &Path,
    upper_kind: &Upper,
    target: &Path,
) -> Result<UnionRoot, MountError> {
    if images.is_empty() {
        return Err(MountError::NoModules);
    }
    let mut mounted: Vec<PathBuf> = Vec::new();
    let undo = |mounted: &[PathBuf]| {
        for p in mounted.iter().rev() {
            let _ = m.unmount(p);
        }
    };
    for image in images {
        let at = work.join("images").join(image.to_hex());
        // The node's own userspace: set-user-ID programs and device nodes work.
        if let Err(e) = mount_image(m, store, image, &at, Restrict::default()) {
            undo(&mounted);
            return Err(e);
        }
        mounted.push(at);
    }
    let (upper, upper_is_tmpfs) = match upper_kind {
        Upper::Tmpfs => (work.join("upper"), true),
        Upper::Dir(d) => (d.clone(), false),
    };
    let r = (|| {
        mkdir(&upper)?;
        if !upper_is_tmpfs {
            return Ok(());
        }
        m.mount(&MountSpec {
            fstype: "tmpfs",
            source: Some(PathBuf::from("powernode-upper")),
            options: vec![MountOpt::Str("mode", "0755".into())],
            read_only: false,
            target: upper.clone(),
            restrict: Restrict::default(),
        })
    })();
    if let Err(e) = r {
        undo(&mounted);
        return Err(e);
    }
    if upper_is_tmpfs {
        mounted.push(upper.clone());
    }
    let r = (|| {
        let (u, w) = (upper.join("upper"), upper.join("work"));
        mkdir(&u)?;
        mkdir(&w)?;
        let lowers: Vec<&Path> = mounted[..images.len()]
            .iter()
            .map(|p| p.as_path())
            .collect();
        let options = overlay_options(
            &lowers,
            store.objects_dir(),
            Some((&u, &w)),
            store.verity_mode(),
        )?;
        mkdir(target)?;
        m.mount(&MountSpec {
            fstype: "overlay",
            source: Some(PathBuf::from("powernode-root")),
            options,
            read_only: false,
            target: target.to_path_buf(),
            restrict: Restrict::default(),
        })
    })();
    if let Err(e) = r {
        undo(&mounted);
        return Err(e);
    }
    Ok(UnionRoot {
        target: target.to_path_buf(),
        image_mounts: mounted[..images.len()].to_vec(),
        upper,
        upper_is_tmpfs,
        fetched_bytes: 0,
    })
}
