//! The mounter the module runtime and the root composition use: the kernel's,
//! with composefs EROFS image files put on a loop device first (this kernel mounts
//! EROFS from block devices only) and the device freed after the unmount. The loop
//! devices and the mount table read go through [`Sys`].

use std::path::{Path, PathBuf};

use powernode_agent::modules::mount::{KernelMounter, MountError, MountOpt, MountSpec, Mounter};
use powernode_sysfmt::mountinfo;

use crate::layout::{MOUNTINFO, MOUNTINFO_LIMIT};
use crate::sys::{RealSys, Sys};

/// The kernel mounter, with composefs image files put on a loop device first.
pub struct LoopMounter;

/// Loads [`crate::layout::COMPOSEFS_MODULES`] before a module mount (the boot leaves
/// them out: a node without modules never needs them); modules already in the
/// kernel are skipped by their `/sys/module` entry.
fn ensure_composefs_modules(spec: &MountSpec) -> Result<(), MountError> {
    crate::modules::load_on_demand("composefs", crate::layout::COMPOSEFS_MODULES).map_err(|chain| {
        MountError::Syscall {
            step: "loading the composefs kernel modules",
            fstype: spec.fstype,
            target: spec.target.clone(),
            kernel_log: chain.clone(),
            source: std::io::Error::other(chain),
        }
    })
}

impl Mounter for LoopMounter {
    fn mount(&self, spec: &MountSpec) -> Result<(), MountError> {
        ensure_composefs_modules(spec)?;
        let file = spec
            .source
            .as_ref()
            .filter(|p| spec.fstype == "erofs" && p.is_file());
        let Some(file) = file else {
            return KernelMounter.mount(spec);
        };
        let on_loop = on_loop_device(&mut RealSys::new(), spec, file)?;
        KernelMounter.mount(&on_loop)
    }

    fn unmount(&self, target: &std::path::Path) -> Result<(), MountError> {
        // An EROFS image on a loop device: free the device too (live swaps would
        // otherwise use up the driver's few loop devices).
        let mut sys = RealSys::new();
        let loop_dev = loop_under(&mut sys, target);
        KernelMounter.unmount(target)?;
        if let Some(dev) = loop_dev {
            detach(&mut sys, &dev, target);
        }
        Ok(())
    }
}

/// `spec` with its EROFS image `file` put on a loop device, read-only.
fn on_loop_device(
    sys: &mut dyn Sys,
    spec: &MountSpec,
    file: &Path,
) -> Result<MountSpec, MountError> {
    let dev = sys.attach_loop(file).map_err(|e| MountError::Syscall {
        step: "attach loop device",
        fstype: spec.fstype,
        target: spec.target.clone(),
        kernel_log: String::new(),
        source: e,
    })?;
    log::info!("{} on {}", file.display(), dev.display());
    let mut on_loop = spec.clone();
    on_loop.source = Some(dev);
    // A read-only block device must be mounted read-only (else EACCES).
    on_loop.options.push(MountOpt::Flag("ro"));
    Ok(on_loop)
}

/// The loop device under the EROFS mount at `target`, read before it goes.
fn loop_under(sys: &mut dyn Sys, target: &Path) -> Option<PathBuf> {
    let text = sys.read_file(MOUNTINFO, MOUNTINFO_LIMIT).ok()?;
    loop_source(&String::from_utf8(text).ok()?, target)
}

/// Frees a loop device once the mount on it at `target` is gone (best effort).
fn detach(sys: &mut dyn Sys, dev: &Path, target: &Path) {
    match sys.detach_loop(dev) {
        Ok(()) => log::info!("{} detached from {}", dev.display(), target.display()),
        Err(e) => log::warn!("detaching {}: {e}", dev.display()),
    }
}

/// The loop device under the mount in effect at `target`, when that mount is
/// EROFS on a loop device, from mountinfo text.
fn loop_source(text: &str, target: &Path) -> Option<PathBuf> {
    let mounts: Vec<_> = mountinfo::entries(text).filter_map(Result::ok).collect();
    let top = mountinfo::top_at(&mounts, target.to_str()?)?;
    (top.fstype == "erofs" && top.source.starts_with("/dev/loop"))
        .then(|| PathBuf::from(&top.source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_device_under_an_erofs_mount_is_found() {
        let info = "30 22 7:0 / /run/powernode/modules/.images/ab ro - erofs /dev/loop3 ro\n\
                    31 22 0:40 / /run/powernode/modules/demo ro - overlay composefs:ab ro\n\
                    32 22 7:1 / /elsewhere ro - erofs /dev/loop4 ro\n\
                    33 22 7:5 / /run/powernode/modules/.images/c\\040d ro - erofs /dev/loop5 ro\n";
        assert_eq!(
            loop_source(
                info,
                std::path::Path::new("/run/powernode/modules/.images/ab")
            ),
            Some(PathBuf::from("/dev/loop3"))
        );
        assert_eq!(
            loop_source(info, std::path::Path::new("/run/powernode/modules/demo")),
            None
        );
        assert_eq!(loop_source(info, std::path::Path::new("/nowhere")), None);
        // An escaped mount point is found by its real name (the old split did not unescape).
        assert_eq!(
            loop_source(info, Path::new("/run/powernode/modules/.images/c d")),
            Some(PathBuf::from("/dev/loop5"))
        );
    }

    /// The loop device calls go through the seam: attach before the mount, the
    /// mount table read and the detach around the unmount.
    #[test]
    fn an_erofs_image_goes_on_a_loop_device_and_the_device_is_freed_after() {
        use crate::sys::fake::{Call, FakeSys};
        let target = Path::new("/run/powernode/modules/.images/ab");
        let spec = MountSpec {
            fstype: "erofs",
            source: Some(PathBuf::from("/persist/powernode/store/images/ab")),
            options: Vec::new(),
            read_only: true,
            target: target.into(),
            restrict: powernode_agent::modules::mount::Restrict::RUNTIME,
        };
        let mut sys = FakeSys::default().with_file(
            MOUNTINFO,
            "30 22 7:0 / /run/powernode/modules/.images/ab ro - erofs /dev/loop0 ro\n",
        );
        let file = Path::new("/persist/powernode/store/images/ab");
        let on_loop = on_loop_device(&mut sys, &spec, file).unwrap();
        assert_eq!(on_loop.source, Some(PathBuf::from("/dev/loop0")));
        assert_eq!(on_loop.options, [MountOpt::Flag("ro")]);
        let dev = loop_under(&mut sys, target).unwrap();
        detach(&mut sys, &dev, target);
        assert_eq!(
            sys.calls,
            [
                Call::AttachLoop(file.display().to_string()),
                Call::Read(MOUNTINFO.into()),
                Call::DetachLoop("/dev/loop0".into()),
            ]
        );
        // No mount table: nothing to detach.
        let mut sys = FakeSys::default();
        assert_eq!(loop_under(&mut sys, target), None);
        assert_eq!(sys.calls, [Call::Read(MOUNTINFO.into())]);
    }
}
