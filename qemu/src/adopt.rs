//! A QEMU this process did not start: one left running by an earlier control plane
//! (killed, or stopped on purpose) that a new one takes back. It is found by pid,
//! checked to be the QEMU of a given folder (its command line names the program and
//! the folder, so a reused pid is not taken for it), and watched through a pidfd:
//! it is not our child, so `waitpid` cannot see it end, but its pidfd becomes
//! readable when it does, and signals sent through the pidfd never reach a process
//! that reused the number.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("QEMU pid {pid} is gone")]
    Gone { pid: u32 },
    #[error("pid {pid} is not the QEMU of {} (its command line: {cmdline:?})", marker.display())]
    NotOurs {
        pid: u32,
        marker: PathBuf,
        cmdline: String,
    },
    #[error("cannot watch QEMU pid {pid}")]
    Pidfd {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// The command line of `pid` (arguments joined by spaces), if it is alive and not a
/// zombie (a zombie's command line is empty).
fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text = String::from_utf8_lossy(&raw).replace('\0', " ");
    (!text.trim().is_empty()).then_some(text)
}

/// Whether `pid` is a live QEMU whose command line names `marker` (an instance
/// folder: every VM file of one instance lives in it).
pub fn is_qemu_of(pid: u32, marker: &Path) -> bool {
    cmdline(pid)
        .is_some_and(|c| c.contains("qemu-system") && c.contains(&*marker.to_string_lossy()))
}

/// A QEMU taken back by pid.
#[derive(Debug)]
pub struct Adopted {
    pid: u32,
    pidfd: OwnedFd,
    exited: bool,
}

impl Adopted {
    /// Takes back the QEMU `pid` if it is the one of `marker` ([`is_qemu_of`]). The
    /// pidfd is opened first and the command line read after, so the process checked
    /// is the one the pidfd holds (a pid reused before the open fails the check).
    pub fn adopt(pid: u32, marker: &Path) -> Result<Self, AdoptError> {
        let raw = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or(AdoptError::Gone { pid })?;
        let pidfd = pidfd_open(raw, PidfdFlags::empty()).map_err(|e| match e {
            rustix::io::Errno::SRCH => AdoptError::Gone { pid },
            e => AdoptError::Pidfd {
                pid,
                source: e.into(),
            },
        })?;
        if !is_qemu_of(pid, marker) {
            return Err(match cmdline(pid) {
                None => AdoptError::Gone { pid },
                Some(cmdline) => AdoptError::NotOurs {
                    pid,
                    marker: marker.to_path_buf(),
                    cmdline,
                },
            });
        }
        let mut adopted = Self {
            pid,
            pidfd,
            exited: false,
        };
        if adopted.has_exited() {
            return Err(AdoptError::Gone { pid });
        }
        Ok(adopted)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether QEMU has ended (never blocks). Its exit status belongs to its parent.
    pub fn has_exited(&mut self) -> bool {
        self.wait_timeout(Duration::ZERO)
    }

    /// Waits up to `timeout` for QEMU to end; whether it did.
    pub fn wait_timeout(&mut self, timeout: Duration) -> bool {
        if !self.exited {
            let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
            // A poll that fails says nothing; the process is taken as still there.
            self.exited = crate::sys::poll_readable(self.pidfd.as_fd(), ms).unwrap_or(false);
        }
        self.exited
    }

    /// SIGKILL through the pidfd (never to a process that reused the number).
    pub fn kill(&mut self) {
        if !self.has_exited() {
            let _ = pidfd_send_signal(&self.pidfd, Signal::KILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A stand-in QEMU: `sleep` run under a name holding `qemu-system` and an
    /// argument naming `marker`.
    fn fake_qemu(dir: &Path, marker: &Path) -> std::process::Child {
        let bin = dir.join("qemu-system-x86_64");
        // A loop, not `exec sleep`: the shell keeps the script's command line, and
        // killing it leaves at most a one-second sleep behind.
        std::fs::write(&bin, "#!/bin/sh\nwhile :; do sleep 1; done\n").unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        Command::new(&bin)
            .arg("-serial")
            .arg(format!("file:{}/serial.log", marker.display()))
            .spawn()
            .unwrap()
    }

    #[test]
    fn a_qemu_of_the_folder_is_adopted_watched_and_killed() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("instances/inst-1");
        let mut child = fake_qemu(dir.path(), &marker);
        let pid = child.id();
        // Wait until the shell runs the script (its command line names it).
        for _ in 0..200 {
            if is_qemu_of(pid, &marker) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut vm = Adopted::adopt(pid, &marker).unwrap();
        assert_eq!(vm.pid(), pid);
        assert!(!vm.has_exited());
        assert!(!vm.wait_timeout(Duration::from_millis(50)));
        vm.kill();
        // Readable as soon as it exits, before (and whether or not) its parent reaps.
        assert!(vm.wait_timeout(Duration::from_secs(10)));
        let _ = child.wait();
        assert!(matches!(
            Adopted::adopt(pid, &marker),
            Err(AdoptError::Gone { .. }) | Err(AdoptError::NotOurs { .. })
        ));
    }

    #[test]
    fn another_folders_qemu_or_another_program_is_not_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("instances/inst-1");
        let mut child = fake_qemu(dir.path(), &marker);
        let pid = child.id();
        for _ in 0..200 {
            if is_qemu_of(pid, &marker) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let other = dir.path().join("instances/inst-2");
        let err = Adopted::adopt(pid, &other).unwrap_err();
        assert!(matches!(err, AdoptError::NotOurs { .. }), "{err}");
        assert!(err.to_string().contains("inst-2"), "{err}");
        // This test binary is alive but is no QEMU.
        let err = Adopted::adopt(std::process::id(), &marker).unwrap_err();
        assert!(matches!(err, AdoptError::NotOurs { .. }), "{err}");
        let _ = child.kill();
        let _ = child.wait();
        assert!(matches!(
            Adopted::adopt(pid, &marker),
            Err(AdoptError::Gone { .. })
        ));
    }
}
