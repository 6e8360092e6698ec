//! Leaving the initramfs for the composed root.
//!
//! `pivot_root(2)` does not work here: the initramfs is the kernel's `rootfs`, which
//! can never be unmounted or pivoted away from. So this is the switch_root pattern
//! (busybox, systemd, u-root): move `/dev /proc /sys /run` (and `/persist` on a
//! persistent node) into the new root, chdir
//! there, delete the initramfs's files (they would pin RAM forever; only files on the
//! rootfs device are touched, never other mounts), move the new root onto `/`,
//! chroot into it, and exec its init. Deleting is refused unless `/` really is a
//! ramfs/tmpfs, so a mistake can never wipe a disk.

use crate::sys::{Errno, Sys};

/// Mounts that move along into the new root.
pub const MOVED_MOUNTS: &[&str] = &["/dev", "/proc", "/sys", "/run"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SwitchRootError {
    #[error("{path} is not an executable in the new root")]
    NoInit { path: String },
    #[error("/ is not the initramfs (not ramfs/tmpfs); refusing to delete its contents")]
    NotInitramfs,
    #[error("{what} failed")]
    Sys {
        what: String,
        #[source]
        errno: Errno,
    },
}

fn sys_err(what: String) -> impl FnOnce(Errno) -> SwitchRootError {
    move |errno| SwitchRootError::Sys { what, errno }
}

/// Switches into `new_root` (already mounted) and execs `init` there with `args`.
/// Returns only on failure. Before the point of no return (the move onto `/`) every
/// step is checked; after it, only `exec` can fail.
pub fn switch_root(
    sys: &mut dyn Sys,
    new_root: &str,
    init: &str,
    args: &[&str],
) -> SwitchRootError {
    switch_root_moving(sys, new_root, init, args, &[])
}

/// [`switch_root`] that also moves the mounts in `extra` (after [`MOVED_MOUNTS`]):
/// the `/persist` disk of a persistent node, which holds the agent's state and
/// the object store the composed root reads from.
pub fn switch_root_moving(
    sys: &mut dyn Sys,
    new_root: &str,
    init: &str,
    args: &[&str],
    extra: &[&str],
) -> SwitchRootError {
    match prepare(sys, new_root, init, extra) {
        Ok(()) => {}
        Err(e) => return e,
    }
    let errno = sys.exec(init, args);
    SwitchRootError::Sys {
        what: format!("exec {init} in the new root"),
        errno,
    }
}

fn prepare(
    sys: &mut dyn Sys,
    new_root: &str,
    init: &str,
    extra: &[&str],
) -> Result<(), SwitchRootError> {
    let root = new_root.trim_end_matches('/');
    // An init under a mount that moves into the new root (a copy of this init in
    // `/run`) is checked where it is now.
    let moves = MOVED_MOUNTS
        .iter()
        .any(|m| init.starts_with(&format!("{m}/")));
    let init_in_root = if moves {
        init.to_string()
    } else {
        format!("{root}/{}", init.trim_start_matches('/'))
    };
    if !sys.is_executable(&init_in_root) {
        return Err(SwitchRootError::NoInit { path: init_in_root });
    }
    if !sys
        .root_is_initramfs()
        .map_err(sys_err("statfs /".into()))?
    {
        return Err(SwitchRootError::NotInitramfs);
    }
    for m in MOVED_MOUNTS.iter().chain(extra) {
        let target = format!("{root}{m}");
        sys.mkdir(&target, 0o755)
            .map_err(sys_err(format!("mkdir {target}")))?;
        sys.move_mount(m, &target)
            .map_err(sys_err(format!("moving {m} to {target}")))?;
    }
    sys.chdir(root).map_err(sys_err(format!("chdir {root}")))?;
    let freed = sys
        .free_initramfs()
        .map_err(sys_err("freeing the initramfs".into()))?;
    log::info!("switch_root: freed {freed} initramfs entries; moving {root} onto /");
    crate::logger::flush();
    sys.move_mount(".", "/")
        .map_err(sys_err(format!("moving {root} onto /")))?;
    sys.chroot(".").map_err(sys_err("chroot .".into()))?;
    sys.chdir("/").map_err(sys_err("chdir /".into()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{Call, FakeSys};

    #[test]
    fn an_init_under_a_moved_mount_is_checked_where_it_is_now() {
        let mut sys = FakeSys::default();
        sys.executables
            .insert("/run/powernode/powernode-init".into());
        let err = switch_root(
            &mut sys,
            "/sysroot",
            "/run/powernode/powernode-init",
            &["agent"],
        );
        assert!(!matches!(err, SwitchRootError::NoInit { .. }), "{err:?}");
        let mut sys = FakeSys::default();
        let err = switch_root(&mut sys, "/sysroot", "/run/powernode/powernode-init", &[]);
        assert!(matches!(err, SwitchRootError::NoInit { .. }), "{err:?}");
    }

    #[test]
    fn the_exact_switch_root_sequence() {
        let mut sys = FakeSys::default();
        sys.executables.insert("/sysroot/sbin/init".into());
        let err = switch_root(&mut sys, "/sysroot/", "/sbin/init", &["--x"]);
        // The fake's exec "fails" with ENOEXEC so the sequence can be inspected.
        assert!(matches!(
            err,
            SwitchRootError::Sys {
                errno: Errno::NOEXEC,
                ..
            }
        ));
        let want = vec![
            Call::Mkdir("/sysroot/dev".into()),
            Call::MoveMount("/dev".into(), "/sysroot/dev".into()),
            Call::Mkdir("/sysroot/proc".into()),
            Call::MoveMount("/proc".into(), "/sysroot/proc".into()),
            Call::Mkdir("/sysroot/sys".into()),
            Call::MoveMount("/sys".into(), "/sysroot/sys".into()),
            Call::Mkdir("/sysroot/run".into()),
            Call::MoveMount("/run".into(), "/sysroot/run".into()),
            Call::Chdir("/sysroot".into()),
            Call::FreeInitramfs,
            Call::MoveMount(".".into(), "/".into()),
            Call::Chroot(".".into()),
            Call::Chdir("/".into()),
            Call::Exec("/sbin/init".into(), vec!["--x".into()]),
        ];
        assert_eq!(sys.calls, want);
    }

    #[test]
    fn persist_moves_along_before_the_initramfs_is_freed() {
        let mut sys = FakeSys::default();
        sys.executables
            .insert("/run/powernode/powernode-init".into());
        switch_root_moving(
            &mut sys,
            "/sysroot",
            "/run/powernode/powernode-init",
            &["agent", "/persist/powernode"],
            &["/persist"],
        );
        let pos = |c: &Call| sys.calls.iter().position(|x| x == c).unwrap();
        let moved = pos(&Call::MoveMount(
            "/persist".into(),
            "/sysroot/persist".into(),
        ));
        assert_eq!(sys.calls[moved - 1], Call::Mkdir("/sysroot/persist".into()));
        assert!(pos(&Call::MoveMount("/run".into(), "/sysroot/run".into())) < moved);
        assert!(moved < pos(&Call::FreeInitramfs));
        assert_eq!(
            sys.calls.last(),
            Some(&Call::Exec(
                "/run/powernode/powernode-init".into(),
                vec!["agent".into(), "/persist/powernode".into()]
            ))
        );
    }

    #[test]
    fn refuses_without_init_or_on_a_disk_root() {
        let mut sys = FakeSys::default();
        assert_eq!(
            switch_root(&mut sys, "/sysroot", "/sbin/init", &[]),
            SwitchRootError::NoInit {
                path: "/sysroot/sbin/init".into()
            }
        );
        assert!(sys.calls.is_empty());
        let mut sys = FakeSys::default();
        sys.executables.insert("/sysroot/sbin/init".into());
        sys.root_not_initramfs = true;
        assert_eq!(
            switch_root(&mut sys, "/sysroot", "/sbin/init", &[]),
            SwitchRootError::NotInitramfs
        );
        assert!(!sys
            .calls
            .iter()
            .any(|c| matches!(c, Call::FreeInitramfs | Call::MoveMount(..))));
    }
}
