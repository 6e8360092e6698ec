//! A recording fake of the kernel: files are a map, every call is recorded, and
//! chosen calls fail with chosen errnos.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{EndSignal, Errno, ModuleSysError, MountFlags, RebootKind, RootFile, Sys};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Mkdir(String),
    Mount {
        source: String,
        target: String,
        fstype: String,
        flags: MountFlags,
        data: String,
    },
    Read(String),
    Write(String, String),
    FinitModule(String),
    Console(String),
    Sync,
    SetHostname(String),
    Reboot(RebootKind),
    RemountReadOnly(String),
    Umount(String),
    Watchdog(Duration, RebootKind),
    SignalAll(EndSignal),
    Sleep(Duration),
    StartLogging,
    Create(String, String),
    Copy(String, String),
    ListDir(String),
    Netlink(Vec<u8>),
    Dhcp {
        ifname: String,
        kind: u8,
    },
    MoveMount(String, String),
    Chdir(String),
    Chroot(String),
    FreeInitramfs,
    Exec(String, Vec<String>),
    /// `read_through(root, path)`, recorded as `root` + `path`.
    ReadThrough(String),
    AttachLoop(String),
    DetachLoop(String),
}

#[derive(Debug, Default)]
pub struct FakeSys {
    pub calls: Vec<Call>,
    /// Leftover processes that exit on SIGTERM, and those only SIGKILL ends.
    pub strays_on_term: u32,
    pub strays_on_kill: u32,
    /// Exited, waiting to be reaped.
    pub zombies: u32,
    /// `signal_all` fails with this (not PID 1).
    pub signal_error: Option<Errno>,
    pub files: BTreeMap<String, Vec<u8>>,
    pub mount_errors: BTreeMap<String, Errno>,
    /// `remount_read_only` of these targets fails with this errno.
    pub remount_errors: BTreeMap<String, Errno>,
    /// Remounts of these targets fail `EBUSY` this many times, then work (a
    /// mount busy until another one goes).
    pub remount_busy_left: BTreeMap<String, u32>,
    /// `umount` of these targets fails with this errno.
    pub umount_errors: BTreeMap<String, Errno>,
    pub module_errors: BTreeMap<String, ModuleSysError>,
    /// Module loads that fail this many times before succeeding.
    pub module_failures_left: BTreeMap<String, u32>,
    pub now_ms: u64,
    pub dirs: BTreeMap<String, Vec<String>>,
    pub ifindex: BTreeMap<String, u32>,
    /// DHCP message types the fake server answers with, one per exchange;
    /// `None` means no answer (timeout).
    pub dhcp_answers: std::collections::VecDeque<Option<u8>>,
    pub executables: std::collections::BTreeSet<String>,
    /// Symlinks (full path -> target, absolute targets inside the root) that
    /// `resolve_in_root` follows.
    pub links: BTreeMap<String, String>,
    pub root_not_initramfs: bool,
    /// `read_through` and `read_at` of these full paths fail with this errno.
    pub read_errors: BTreeMap<String, Errno>,
    /// Like `read_errors`, for the first read only (a transient fault).
    pub read_errors_once: BTreeMap<String, Errno>,
}

impl FakeSys {
    pub fn with_file(mut self, path: &str, data: impl Into<Vec<u8>>) -> Self {
        self.files.insert(path.to_string(), data.into());
        self
    }

    pub fn mounts(&self) -> Vec<(String, String, String)> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::Mount {
                    source,
                    target,
                    fstype,
                    ..
                } => Some((source.clone(), target.clone(), fstype.clone())),
                _ => None,
            })
            .collect()
    }

    pub fn modules(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::FinitModule(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// The calls from the last watchdog on: what `failure::reset` did.
    pub fn reset_calls(&self) -> &[Call] {
        let from = self
            .calls
            .iter()
            .rposition(|c| matches!(c, Call::Watchdog(..)))
            .unwrap_or(self.calls.len());
        &self.calls[from..]
    }

    /// Whether the calls end with a whole `failure::reset` to `kind`: watchdog,
    /// SIGTERM to what is left (nothing), sync, the mount table read, only remounts / unmounts and the console
    /// event, then `reboot(kind)`.
    pub fn ends_with_reset(&self, kind: RebootKind) -> bool {
        match self.reset_calls() {
            [Call::Watchdog(_, k), Call::SignalAll(EndSignal::Term), Call::Sync, Call::Read(table), middle @ .., Call::Reboot(last)] => {
                *k == kind
                    && *last == kind
                    && table == crate::layout::MOUNTINFO
                    && middle.iter().all(|c| {
                        matches!(
                            c,
                            Call::RemountReadOnly(_) | Call::Umount(_) | Call::Console(_)
                        )
                    })
            }
            _ => false,
        }
    }

    pub fn console_lines(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::Console(l) => Some(l.clone()),
                _ => None,
            })
            .collect()
    }
}

impl Sys for FakeSys {
    fn mkdir(&mut self, path: &str, _mode: u32) -> Result<(), Errno> {
        self.calls.push(Call::Mkdir(path.to_string()));
        Ok(())
    }

    fn mount(
        &mut self,
        source: &str,
        target: &str,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> Result<(), Errno> {
        self.calls.push(Call::Mount {
            source: source.to_string(),
            target: target.to_string(),
            fstype: fstype.to_string(),
            flags,
            data: data.to_string(),
        });
        self.now_ms += 1;
        match self.mount_errors.get(target) {
            Some(e) => Err(*e),
            None => Ok(()),
        }
    }

    fn read_at(&mut self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        self.calls.push(Call::Read(path.to_string()));
        if let Some(e) = self.read_errors.get(path) {
            return Err(*e);
        }
        let data = self.files.get(path).ok_or(Errno::NOENT)?;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let end = start.saturating_add(len).min(data.len());
        Ok(data[start..end].to_vec())
    }

    fn read_file(&mut self, path: &str, limit: usize) -> Result<Vec<u8>, Errno> {
        self.calls.push(Call::Read(path.to_string()));
        let data = self.files.get(path).ok_or(Errno::NOENT)?;
        if data.len() > limit {
            return Err(Errno::FBIG);
        }
        Ok(data.clone())
    }

    fn write_file(&mut self, path: &str, data: &[u8]) -> Result<(), Errno> {
        self.calls.push(Call::Write(
            path.to_string(),
            String::from_utf8_lossy(data).into_owned(),
        ));
        Ok(())
    }

    fn finit_module(&mut self, path: &str) -> Result<(), ModuleSysError> {
        self.calls.push(Call::FinitModule(path.to_string()));
        self.now_ms += 5;
        if let Some(left) = self.module_failures_left.get_mut(path) {
            if *left > 0 {
                *left -= 1;
                return Err(ModuleSysError::Load(Errno::NOEXEC));
            }
        }
        match self.module_errors.get(path) {
            Some(e) => Err(*e),
            None => Ok(()),
        }
    }

    fn boot_ms(&mut self) -> u64 {
        self.now_ms
    }

    fn console(&mut self, line: &str) {
        self.calls.push(Call::Console(line.to_string()));
    }

    fn set_hostname(&mut self, name: &str) -> Result<(), Errno> {
        self.calls.push(Call::SetHostname(name.to_string()));
        Ok(())
    }

    fn sync(&mut self) {
        self.calls.push(Call::Sync);
    }

    fn reboot(&mut self, kind: RebootKind) -> Result<(), Errno> {
        self.calls.push(Call::Reboot(kind));
        Ok(())
    }

    fn remount_read_only(&mut self, target: &str) -> Result<(), Errno> {
        self.calls.push(Call::RemountReadOnly(target.to_string()));
        self.now_ms += 1;
        if let Some(left) = self.remount_busy_left.get_mut(target) {
            if *left > 0 {
                *left -= 1;
                return Err(Errno::BUSY);
            }
        }
        match self.remount_errors.get(target) {
            Some(e) => Err(*e),
            None => Ok(()),
        }
    }

    fn umount(&mut self, target: &str) -> Result<(), Errno> {
        self.calls.push(Call::Umount(target.to_string()));
        self.now_ms += 1;
        match self.umount_errors.get(target) {
            Some(e) => Err(*e),
            None => Ok(()),
        }
    }

    fn arm_watchdog(&mut self, after: Duration, kind: RebootKind) {
        self.calls.push(Call::Watchdog(after, kind));
    }

    fn signal_all(&mut self, signal: EndSignal) -> Result<(), Errno> {
        self.calls.push(Call::SignalAll(signal));
        if let Some(errno) = self.signal_error {
            return Err(errno);
        }
        if self.strays_on_term + self.strays_on_kill == 0 {
            return Err(Errno::SRCH);
        }
        self.zombies += std::mem::take(&mut self.strays_on_term);
        if signal == EndSignal::Kill {
            self.zombies += std::mem::take(&mut self.strays_on_kill);
        }
        Ok(())
    }

    fn reap_any(&mut self) -> Result<Option<u32>, Errno> {
        if self.zombies > 0 {
            self.zombies -= 1;
            return Ok(Some(100 + self.zombies));
        }
        if self.strays_on_term + self.strays_on_kill > 0 {
            return Ok(None);
        }
        Err(Errno::CHILD)
    }

    fn sleep(&mut self, duration: Duration) {
        self.calls.push(Call::Sleep(duration));
        self.now_ms += u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    }

    fn start_logging(&mut self) {
        self.calls.push(Call::StartLogging);
    }

    fn create_file(&mut self, path: &str, data: &[u8], _mode: u32) -> Result<(), Errno> {
        self.calls.push(Call::Create(
            path.to_string(),
            String::from_utf8_lossy(data).into_owned(),
        ));
        self.files.insert(path.to_string(), data.to_vec());
        Ok(())
    }

    fn copy_file(&mut self, from: &str, to: &str, _mode: u32) -> Result<u64, Errno> {
        self.calls
            .push(Call::Copy(from.to_string(), to.to_string()));
        let data = self.files.get(from).cloned().ok_or(Errno::NOENT)?;
        let n = data.len() as u64;
        self.files.insert(to.to_string(), data);
        Ok(n)
    }

    fn list_dir(&mut self, path: &str) -> Result<Vec<String>, Errno> {
        self.calls.push(Call::ListDir(path.to_string()));
        self.dirs.get(path).cloned().ok_or(Errno::NOENT)
    }

    fn if_index(&mut self, name: &str) -> Result<u32, Errno> {
        self.ifindex.get(name).copied().ok_or(Errno::NODEV)
    }

    fn netlink(&mut self, msg: &[u8], _seq: u32) -> Result<(), Errno> {
        self.calls.push(Call::Netlink(msg.to_vec()));
        Ok(())
    }

    fn dhcp_exchange(
        &mut self,
        ifname: &str,
        packet: &[u8],
        timeout: Duration,
        accept: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<Vec<u8>, Errno> {
        // Option 53 sits first in our packets: byte 242 is the message type.
        let kind = packet.get(242).copied().unwrap_or(0);
        self.calls.push(Call::Dhcp {
            ifname: ifname.to_string(),
            kind,
        });
        let xid = packet
            .get(4..8)
            .and_then(|x| <[u8; 4]>::try_from(x).ok())
            .map(u32::from_be_bytes)
            .unwrap_or(0);
        match self.dhcp_answers.pop_front().flatten() {
            Some(answer) => {
                let reply = crate::dhcp::tests::reply(answer, xid);
                if accept(&reply) {
                    Ok(reply)
                } else {
                    Err(Errno::TIMEDOUT)
                }
            }
            None => {
                self.now_ms += u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
                Err(Errno::TIMEDOUT)
            }
        }
    }

    fn move_mount(&mut self, from: &str, to: &str) -> Result<(), Errno> {
        self.calls
            .push(Call::MoveMount(from.to_string(), to.to_string()));
        Ok(())
    }

    fn chdir(&mut self, path: &str) -> Result<(), Errno> {
        self.calls.push(Call::Chdir(path.to_string()));
        Ok(())
    }

    fn chroot(&mut self, path: &str) -> Result<(), Errno> {
        self.calls.push(Call::Chroot(path.to_string()));
        Ok(())
    }

    fn root_is_initramfs(&mut self) -> Result<bool, Errno> {
        Ok(!self.root_not_initramfs)
    }

    fn free_initramfs(&mut self) -> Result<u64, Errno> {
        self.calls.push(Call::FreeInitramfs);
        Ok(42)
    }

    fn is_executable(&mut self, path: &str) -> bool {
        self.executables.contains(path)
    }

    fn read_through(&mut self, root: &str, path: &str) -> Result<u64, Errno> {
        let full = format!(
            "{}/{}",
            root.trim_end_matches('/'),
            path.trim_start_matches('/')
        );
        self.calls.push(Call::ReadThrough(full.clone()));
        if let Some(e) = self.read_errors_once.remove(&full) {
            return Err(e);
        }
        if let Some(e) = self.read_errors.get(&full) {
            return Err(*e);
        }
        let data = self.files.get(&full).ok_or(Errno::NOENT)?;
        Ok(data.len() as u64)
    }

    fn resolve_in_root(&mut self, root: &str, path: &str) -> Result<Option<RootFile>, Errno> {
        let root = root.trim_end_matches('/');
        let mut full = format!("{root}/{}", path.trim_start_matches('/'));
        // Up to 8 links, as if the kernel followed them inside the root.
        for _ in 0..8 {
            match self.links.get(&full) {
                Some(target) => full = format!("{root}/{}", target.trim_start_matches('/')),
                None => break,
            }
        }
        if self.files.contains_key(&full) {
            let inside = full.strip_prefix(root).unwrap_or(&full).to_string();
            let executable = self.executables.contains(&full);
            return Ok(Some(RootFile {
                path: inside,
                executable,
            }));
        }
        let asked = format!("{root}/{}", path.trim_start_matches('/'));
        if self.links.contains_key(&asked) {
            return Ok(None);
        }
        Err(Errno::NOENT)
    }

    fn exec(&mut self, path: &str, args: &[&str]) -> Errno {
        self.calls.push(Call::Exec(
            path.to_string(),
            args.iter().map(|a| a.to_string()).collect(),
        ));
        Errno::NOEXEC
    }

    fn attach_loop(&mut self, file: &Path) -> std::io::Result<PathBuf> {
        let n = self
            .calls
            .iter()
            .filter(|c| matches!(c, Call::AttachLoop(_)))
            .count();
        self.calls
            .push(Call::AttachLoop(file.display().to_string()));
        Ok(PathBuf::from(format!("/dev/loop{n}")))
    }

    fn detach_loop(&mut self, dev: &Path) -> std::io::Result<()> {
        self.calls.push(Call::DetachLoop(dev.display().to_string()));
        Ok(())
    }
}
