//! The early mounts, as data. `/dev` comes first so that `/dev/kmsg` exists before
//! anything wants to log; `/dev/pts` needs `/dev`, the cgroup hierarchy needs `/sys`.

use crate::sys::{Errno, MountFlags, Sys};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mount {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MountFlags,
    pub data: &'static str,
}

const NOSUID: MountFlags = MountFlags::NOSUID;
const NODEV: MountFlags = MountFlags::NODEV;
const NOEXEC: MountFlags = MountFlags::NOEXEC;

/// In order. The kernel's `CONFIG_DEVTMPFS_MOUNT` is off in Debian's cloud kernel, and
/// it would not apply to an initramfs anyway, so `/dev` is ours to mount.
pub const EARLY_MOUNTS: &[Mount] = &[
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: NOSUID,
        data: "mode=0755",
    },
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID.union(NODEV).union(NOEXEC),
        data: "",
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID.union(NODEV).union(NOEXEC),
        data: "",
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID.union(NODEV),
        data: "mode=0755",
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID.union(NODEV),
        data: "mode=1777",
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: NOSUID.union(NOEXEC),
        data: "mode=0620,ptmxmode=0666",
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID.union(NODEV).union(NOEXEC),
        data: "nsdelegate",
    },
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MountError {
    #[error("cannot create mount point {target}")]
    Mkdir {
        target: &'static str,
        #[source]
        errno: Errno,
    },
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        target: &'static str,
        fstype: &'static str,
        #[source]
        errno: Errno,
    },
}

/// Mounts one table row. `EBUSY` means it is already mounted (a retried phase), which
/// is fine.
pub fn mount_one(sys: &mut dyn Sys, m: &Mount) -> Result<(), MountError> {
    sys.mkdir(m.target, 0o755)
        .map_err(|errno| MountError::Mkdir {
            target: m.target,
            errno,
        })?;
    match sys.mount(m.source, m.target, m.fstype, m.flags, m.data) {
        Ok(()) | Err(Errno::BUSY) => Ok(()),
        Err(errno) => Err(MountError::Mount {
            target: m.target,
            fstype: m.fstype,
            errno,
        }),
    }
}

pub fn mount_all(sys: &mut dyn Sys, table: &[Mount]) -> Result<(), MountError> {
    table.iter().try_for_each(|m| mount_one(sys, m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::FakeSys;

    #[test]
    fn dev_is_first_and_parents_precede_children() {
        assert_eq!(EARLY_MOUNTS[0].target, "/dev");
        for (i, m) in EARLY_MOUNTS.iter().enumerate() {
            let parent = m.target.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
            if parent.is_empty() {
                continue;
            }
            let parent_pos = EARLY_MOUNTS
                .iter()
                .position(|p| parent.starts_with(p.target))
                .unwrap();
            assert!(parent_pos < i, "{} before its parent", m.target);
        }
    }

    #[test]
    fn busy_is_already_mounted_other_errors_name_the_target() {
        let mut sys = FakeSys::default();
        sys.mount_errors.insert("/proc".into(), Errno::BUSY);
        sys.mount_errors.insert("/sys".into(), Errno::NODEV);
        let err = mount_all(&mut sys, EARLY_MOUNTS).unwrap_err();
        assert_eq!(
            err,
            MountError::Mount {
                target: "/sys",
                fstype: "sysfs",
                errno: Errno::NODEV
            }
        );
        assert_eq!(sys.mounts().len(), 3);
    }
}
