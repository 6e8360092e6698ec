//! The syscall seam: every call the init makes to the kernel goes through [`Sys`].
//! [`RealSys`] does them: rustix first (mount, umount, mkdir, finit_module, reboot, sync,
//! clock_gettime, netlink and UDP sockets, chroot, statfs), nix where rustix lacks
//! the call (`SO_BINDTODEVICE`), std for plain file I/O and `exec`.
//! `fake::FakeSys` (tests only) records every call so that tests can assert the exact boot
//! sequence without root.
//!
//! The one `unsafe` is the loop-device ioctls in [`Sys::attach_loop`] and
//! [`Sys::detach_loop`] (rustix has no safe wrapper for them), each with a
//! `// SAFETY:` comment.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use rustix::io::Errno;
pub use rustix::mount::MountFlags;

/// What `reboot(2)` is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootKind {
    PowerOff,
    Restart,
}

/// The signals the shutdown ends leftover processes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndSignal {
    Term,
    Kill,
}

/// Why a module did not load: opening the file or the `finit_module` call itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleSysError {
    Open(Errno),
    Load(Errno),
}

pub trait Sys {
    /// `mkdir`; an existing directory is not an error.
    fn mkdir(&mut self, path: &str, mode: u32) -> Result<(), Errno>;
    fn mount(
        &mut self,
        source: &str,
        target: &str,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> Result<(), Errno>;
    /// Reads a whole file, refusing more than `limit` bytes (`EFBIG`). Reads in one
    /// large call where the kernel allows it (fw_cfg reads cost time per offset).
    fn read_file(&mut self, path: &str, limit: usize) -> Result<Vec<u8>, Errno>;
    /// Reads up to `len` bytes at `offset` (a block device's superblock); fewer at
    /// the end of the file.
    fn read_at(&mut self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, Errno>;
    fn write_file(&mut self, path: &str, data: &[u8]) -> Result<(), Errno>;
    /// Opens `path` and hands it to `finit_module` with no parameters.
    fn finit_module(&mut self, path: &str) -> Result<(), ModuleSysError>;
    /// Milliseconds since the kernel started (CLOCK_BOOTTIME).
    fn boot_ms(&mut self) -> u64;
    /// One line to the console (PID 1's stdout, which the kernel opened on
    /// `/dev/console`).
    fn console(&mut self, line: &str);
    fn sync(&mut self);
    /// `sethostname(2)`: the identity's hostname, which a composed root's systemd
    /// keeps when the root has no `/etc/hostname`.
    fn set_hostname(&mut self, name: &str) -> Result<(), Errno>;
    /// Does not return on success on a real kernel.
    fn reboot(&mut self, kind: RebootKind) -> Result<(), Errno>;
    /// `mount(NULL, target, NULL, MS_REMOUNT|MS_RDONLY, "")`: the whole superblock
    /// goes read-only (ext4 writes its journal out and marks itself clean).
    fn remount_read_only(&mut self, target: &str) -> Result<(), Errno>;
    /// `umount2(target, 0)`: no force, no lazy detach (a lazily detached filesystem
    /// would stay dirty out of reach).
    fn umount(&mut self, target: &str) -> Result<(), Errno>;
    /// Calls `reboot(kind)` from a thread after `after`, whatever this thread is
    /// doing then: the bound on a shutdown step stuck in the kernel.
    fn arm_watchdog(&mut self, after: Duration, kind: RebootKind);
    /// `kill(-1, signal)`: every process but PID 1 and kernel threads; `ESRCH` when
    /// there is none. Refused (`EPERM`, nothing sent) unless this process is PID 1.
    fn signal_all(&mut self, signal: EndSignal) -> Result<(), Errno>;
    /// `waitpid(-1, WNOHANG)`: a reaped child's pid, `None` while children are
    /// still running, `ECHILD` when there are none.
    fn reap_any(&mut self) -> Result<Option<u32>, Errno>;
    fn sleep(&mut self, duration: Duration);
    /// `/dev` is mounted: start logging to `/dev/kmsg`.
    fn start_logging(&mut self);
    /// Creates or truncates a regular file.
    fn create_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), Errno>;
    /// Names in a folder (unsorted).
    fn list_dir(&mut self, path: &str) -> Result<Vec<String>, Errno>;
    /// Copies `from` to a new `to` with `mode` (in the kernel where it can:
    /// `copy_file_range`); returns the bytes copied.
    fn copy_file(&mut self, from: &str, to: &str, mode: u32) -> Result<u64, Errno>;
    /// Interface index of a network device.
    fn if_index(&mut self, name: &str) -> Result<u32, Errno>;
    /// Sends one rtnetlink request and waits for the kernel's ack for `seq`.
    fn netlink(&mut self, msg: &[u8], seq: u32) -> Result<(), Errno>;
    /// Broadcasts `packet` from UDP port 68 to port 67 on `ifname` (no address
    /// needed) and returns the first datagram that `accept` takes before `timeout`
    /// (`ETIMEDOUT` when none).
    fn dhcp_exchange(
        &mut self,
        ifname: &str,
        packet: &[u8],
        timeout: Duration,
        accept: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<Vec<u8>, Errno>;
    /// `mount(from, to, MS_MOVE)`.
    fn move_mount(&mut self, from: &str, to: &str) -> Result<(), Errno>;
    fn chdir(&mut self, path: &str) -> Result<(), Errno>;
    fn chroot(&mut self, path: &str) -> Result<(), Errno>;
    /// Whether `/` is a ramfs or tmpfs (the initramfs).
    fn root_is_initramfs(&mut self) -> Result<bool, Errno>;
    /// Deletes every file and folder on `/`'s device, never crossing into another
    /// mount; returns how many entries went.
    fn free_initramfs(&mut self) -> Result<u64, Errno>;
    fn is_executable(&mut self, path: &str) -> bool;
    /// Replaces this process; returns only the error.
    fn exec(&mut self, path: &str, args: &[&str]) -> Errno;
    /// Reads `path` to its end, resolved inside `root` as if `root` were `/` (an
    /// absolute symlink in the composed root stays in it), discarding the bytes;
    /// returns how many were read. On fs-verity files every page read is checked
    /// by the kernel, so a corrupt block is `EIO` here.
    fn read_through(&mut self, root: &str, path: &str) -> Result<u64, Errno>;
    /// What `path` names inside `root`, resolved as if `root` were `/` (symlinks
    /// followed, never out of it): the file's path inside the root and whether it is
    /// an executable regular file. A dangling symlink is `Ok(None)`; nothing at
    /// `path` is `Err(NOENT)`.
    fn resolve_in_root(&mut self, root: &str, path: &str) -> Result<Option<RootFile>, Errno>;
    /// Attaches `file` read-only to the first free `/dev/loopN` and returns that
    /// device: composefs EROFS images are files, and this kernel mounts EROFS from
    /// block devices only (no `EROFS_FS_BACKED_BY_FILE`).
    fn attach_loop(&mut self, file: &Path) -> std::io::Result<PathBuf>;
    /// Detaches a loop device from its file (LOOP_CLR_FD) once its filesystem is
    /// unmounted, so live module swaps do not use up the driver's few devices. On a
    /// device still in use (a lazily unmounted filesystem) the kernel sets autoclear
    /// instead: it is freed when its last user goes.
    fn detach_loop(&mut self, dev: &Path) -> std::io::Result<()>;
}

/// A file found by [`Sys::resolve_in_root`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootFile {
    /// Its path inside the root (every symlink resolved).
    pub path: String,
    pub executable: bool,
}

/// The real kernel.
#[derive(Debug, Default)]
pub struct RealSys {
    _private: (),
}

impl RealSys {
    pub fn new() -> Self {
        Self::default()
    }
}

/// A `mkdir` result with an existing directory counted as made.
pub fn ok_if_exists(r: Result<(), Errno>) -> Result<(), Errno> {
    match r {
        Err(Errno::EXIST) => Ok(()),
        other => other,
    }
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from_io_error(&e).unwrap_or(Errno::IO)
}

impl Sys for RealSys {
    fn mkdir(&mut self, path: &str, mode: u32) -> Result<(), Errno> {
        match rustix::fs::mkdir(path, rustix::fs::Mode::from_raw_mode(mode)) {
            Err(Errno::EXIST) => Ok(()),
            other => other,
        }
    }

    fn mount(
        &mut self,
        source: &str,
        target: &str,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> Result<(), Errno> {
        let data = std::ffi::CString::new(data).map_err(|_| Errno::INVAL)?;
        let data = (!data.as_bytes().is_empty()).then_some(data.as_c_str());
        rustix::mount::mount(source, target, fstype, flags, data)
    }

    fn read_at(&mut self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(path).map_err(errno)?;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while let Some(rest) = buf.get_mut(got..).filter(|r| !r.is_empty()) {
            match file.read_at(rest, offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(errno(e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    fn read_file(&mut self, path: &str, limit: usize) -> Result<Vec<u8>, Errno> {
        let mut file = std::fs::File::open(path).map_err(errno)?;
        // One byte more than the limit tells "exactly at the limit" from "over it".
        let mut buf = vec![0u8; limit.saturating_add(1)];
        let mut len = 0;
        loop {
            let Some(rest) = buf.get_mut(len..) else {
                return Err(Errno::FBIG);
            };
            if rest.is_empty() {
                return Err(Errno::FBIG);
            }
            match file.read(rest) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(errno(e)),
            }
        }
        if len > limit {
            return Err(Errno::FBIG);
        }
        buf.truncate(len);
        Ok(buf)
    }

    fn write_file(&mut self, path: &str, data: &[u8]) -> Result<(), Errno> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(errno)?;
        file.write_all(data).map_err(errno)
    }

    fn finit_module(&mut self, path: &str) -> Result<(), ModuleSysError> {
        let fd = rustix::fs::open(
            path,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(ModuleSysError::Open)?;
        rustix::system::finit_module(&fd, c"", 0).map_err(ModuleSysError::Load)
    }

    fn boot_ms(&mut self) -> u64 {
        crate::console::boot_ms_now()
    }

    fn console(&mut self, line: &str) {
        crate::console::console_line(line)
    }

    fn set_hostname(&mut self, name: &str) -> Result<(), Errno> {
        rustix::system::sethostname(name.as_bytes())
    }

    fn sync(&mut self) {
        rustix::fs::sync()
    }

    fn reboot(&mut self, kind: RebootKind) -> Result<(), Errno> {
        rustix::system::reboot(match kind {
            RebootKind::PowerOff => rustix::system::RebootCommand::PowerOff,
            RebootKind::Restart => rustix::system::RebootCommand::Restart,
        })
    }

    fn remount_read_only(&mut self, target: &str) -> Result<(), Errno> {
        rustix::mount::mount_remount(target, MountFlags::RDONLY, "")
    }

    fn umount(&mut self, target: &str) -> Result<(), Errno> {
        rustix::mount::unmount(target, rustix::mount::UnmountFlags::empty())
    }

    fn signal_all(&mut self, signal: EndSignal) -> Result<(), Errno> {
        // Only PID 1 may do this: anywhere else (a host test) it would signal every
        // process the user owns.
        if rustix::process::getpid() != rustix::process::Pid::INIT {
            return Err(Errno::PERM);
        }
        let signal = match signal {
            EndSignal::Term => nix::sys::signal::Signal::SIGTERM,
            EndSignal::Kill => nix::sys::signal::Signal::SIGKILL,
        };
        // rustix has no kill(-1, ...).
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), signal)
            .map_err(|e| Errno::from_raw_os_error(e as i32))
    }

    fn reap_any(&mut self) -> Result<Option<u32>, Errno> {
        Ok(rustix::process::wait(rustix::process::WaitOptions::NOHANG)?
            .map(|(pid, _)| pid.as_raw_nonzero().get().unsigned_abs()))
    }

    fn arm_watchdog(&mut self, after: Duration, kind: RebootKind) {
        let spawned = std::thread::Builder::new()
            .name("shutdown-watchdog".into())
            .spawn(move || {
                std::thread::sleep(after);
                // Straight to fd 1: the logger's or stdout's lock may be what is stuck.
                let line = format!(
                    "powernode-init: shutdown still not done after {} s; {kind:?} now\n",
                    after.as_secs()
                );
                let _ = rustix::io::write(rustix::stdio::stdout(), line.as_bytes());
                let _ = RealSys::new().reboot(kind);
            });
        if let Err(e) = spawned {
            log::warn!("shutdown: no watchdog thread ({e}); carrying on without one");
        }
    }

    fn sleep(&mut self, duration: Duration) {
        std::thread::sleep(duration)
    }

    fn start_logging(&mut self) {
        crate::logger::start()
    }

    fn create_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), Errno> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .map_err(errno)?;
        file.write_all(data).map_err(errno)
    }

    fn copy_file(&mut self, from: &str, to: &str, mode: u32) -> Result<u64, Errno> {
        use std::os::unix::fs::PermissionsExt;
        let n = std::fs::copy(from, to).map_err(errno)?;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).map_err(errno)?;
        Ok(n)
    }

    fn list_dir(&mut self, path: &str) -> Result<Vec<String>, Errno> {
        std::fs::read_dir(path)
            .map_err(errno)?
            .map(|e| {
                e.map(|e| e.file_name().to_string_lossy().into_owned())
                    .map_err(errno)
            })
            .collect()
    }

    fn if_index(&mut self, name: &str) -> Result<u32, Errno> {
        use rustix::net::{socket_with, AddressFamily, SocketFlags, SocketType};
        let sock = socket_with(
            AddressFamily::INET,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )?;
        rustix::net::netdevice::name_to_index(&sock, name)
    }

    fn netlink(&mut self, msg: &[u8], seq: u32) -> Result<(), Errno> {
        use rustix::net::netlink::SocketAddrNetlink;
        use rustix::net::{socket_with, sockopt, AddressFamily, RecvFlags, SendFlags};
        use rustix::net::{SocketFlags, SocketType};
        let sock = socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            None, // NETLINK_ROUTE is protocol 0
        )?;
        sockopt::set_socket_timeout(&sock, sockopt::Timeout::Recv, Some(Duration::from_secs(2)))?;
        rustix::net::sendto(
            &sock,
            msg,
            SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )?;
        let mut buf = vec![0u8; 8192];
        // The ack is normally the first message; allow a few unrelated ones.
        for _ in 0..8 {
            let (n, _) = rustix::net::recv(&sock, &mut buf[..], RecvFlags::empty())?;
            match crate::netlink::parse_ack(buf.get(..n).unwrap_or_default(), seq) {
                Some(Ok(())) => return Ok(()),
                Some(Err(code)) => return Err(Errno::from_raw_os_error(code)),
                None => continue,
            }
        }
        Err(Errno::PROTO)
    }

    fn dhcp_exchange(
        &mut self,
        ifname: &str,
        packet: &[u8],
        timeout: Duration,
        accept: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<Vec<u8>, Errno> {
        use rustix::net::{socket_with, sockopt, AddressFamily, RecvFlags, SendFlags};
        use rustix::net::{SocketAddrV4, SocketFlags, SocketType};
        use std::net::Ipv4Addr;
        let sock = socket_with(
            AddressFamily::INET,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )?;
        sockopt::set_socket_reuseaddr(&sock, true)?;
        sockopt::set_socket_broadcast(&sock, true)?;
        // rustix has no SO_BINDTODEVICE; nix does. Without it the broadcast would go
        // out of whichever interface the (empty) routing table picks: none.
        nix::sys::socket::setsockopt(
            &sock,
            nix::sys::socket::sockopt::BindToDevice,
            &std::ffi::OsString::from(ifname),
        )
        .map_err(|e| Errno::from_raw_os_error(e as i32))?;
        rustix::net::bind(
            &sock,
            &SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, crate::dhcp::CLIENT_PORT),
        )?;
        rustix::net::sendto(
            &sock,
            packet,
            SendFlags::empty(),
            &SocketAddrV4::new(Ipv4Addr::BROADCAST, crate::dhcp::SERVER_PORT),
        )?;
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 1500];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(Errno::TIMEDOUT);
            }
            sockopt::set_socket_timeout(&sock, sockopt::Timeout::Recv, Some(left))?;
            match rustix::net::recv(&sock, &mut buf[..], RecvFlags::empty()) {
                Ok((n, _)) => {
                    let got = buf.get(..n).unwrap_or_default();
                    if accept(got) {
                        return Ok(got.to_vec());
                    }
                }
                Err(Errno::AGAIN | Errno::INTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn move_mount(&mut self, from: &str, to: &str) -> Result<(), Errno> {
        rustix::mount::mount_move(from, to)
    }

    fn chdir(&mut self, path: &str) -> Result<(), Errno> {
        rustix::process::chdir(path)
    }

    fn chroot(&mut self, path: &str) -> Result<(), Errno> {
        rustix::process::chroot(path)
    }

    fn root_is_initramfs(&mut self) -> Result<bool, Errno> {
        const RAMFS_MAGIC: i64 = 0x8584_58f6;
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        let st = rustix::fs::statfs("/")?;
        #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
        let kind = st.f_type as i64;
        Ok(kind == RAMFS_MAGIC || kind == TMPFS_MAGIC)
    }

    fn free_initramfs(&mut self) -> Result<u64, Errno> {
        use std::os::unix::fs::MetadataExt;
        fn remove(dir: &std::path::Path, dev: u64, count: &mut u64) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(md) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                if md.dev() != dev {
                    continue; // another mount (the new root among them)
                }
                if md.is_dir() {
                    remove(&path, dev, count);
                    if std::fs::remove_dir(&path).is_ok() {
                        *count += 1;
                    }
                } else if std::fs::remove_file(&path).is_ok() {
                    *count += 1;
                }
            }
        }
        let dev = std::fs::symlink_metadata("/").map_err(errno)?.dev();
        let mut count = 0;
        remove(std::path::Path::new("/"), dev, &mut count);
        Ok(count)
    }

    fn is_executable(&mut self, path: &str) -> bool {
        rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok()
            && std::fs::metadata(path).is_ok_and(|m| m.is_file())
    }

    fn read_through(&mut self, root: &str, path: &str) -> Result<u64, Errno> {
        use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
        let dir = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let file = openat2(
            &dir,
            path.trim_start_matches('/'),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT,
        )?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total: u64 = 0;
        loop {
            match rustix::io::read(&file, &mut buf[..]) {
                Ok(0) => return Ok(total),
                Ok(n) => total = total.saturating_add(n as u64),
                Err(Errno::INTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn resolve_in_root(&mut self, root: &str, path: &str) -> Result<Option<RootFile>, Errno> {
        use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
        use std::os::fd::AsRawFd;
        let dir = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let rel = path.trim_start_matches('/');
        let open = |flags: OFlags| {
            openat2(
                &dir,
                rel,
                OFlags::PATH | OFlags::CLOEXEC | flags,
                Mode::empty(),
                ResolveFlags::IN_ROOT,
            )
        };
        let file = match open(OFlags::empty()) {
            Ok(f) => f,
            // The name exists but what it points at does not.
            Err(Errno::NOENT) if open(OFlags::NOFOLLOW).is_ok() => return Ok(None),
            Err(e) => return Err(e),
        };
        let stat = rustix::fs::fstat(&file)?;
        let regular = rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file();
        let executable = regular && stat.st_mode & 0o111 != 0;
        // The kernel's name for the opened file is its path from the real `/`.
        let full = rustix::fs::readlink(format!("/proc/self/fd/{}", file.as_raw_fd()), Vec::new())?;
        let full = full.to_string_lossy().into_owned();
        let inside = full
            .strip_prefix(root.trim_end_matches('/'))
            .filter(|p| p.starts_with('/'))
            .unwrap_or(&full)
            .to_string();
        Ok(Some(RootFile {
            path: inside,
            executable,
        }))
    }

    fn exec(&mut self, path: &str, args: &[&str]) -> Errno {
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new(path).args(args).exec();
        errno(err)
    }

    #[allow(unsafe_code)]
    fn attach_loop(&mut self, file: &Path) -> std::io::Result<PathBuf> {
        use rustix::fs::{open, Mode, OFlags};
        use std::os::fd::AsRawFd;
        const LOOP_SET_FD: rustix::ioctl::Opcode = 0x4C00;
        let backing = open(file, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
        let fd = usize::try_from(backing.as_raw_fd()).map_err(std::io::Error::other)?;
        // The loop driver makes loop0..loop7 when it loads; more are not needed here.
        for n in 0..64 {
            let dev = format!("/dev/loop{n}");
            let lo = match open(
                dev.as_str(),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(f) => f,
                Err(Errno::NOENT) => break,
                Err(e) => return Err(e.into()),
            };
            // SAFETY: LOOP_SET_FD takes a file descriptor as its integer argument and
            // reads or writes no memory of ours; `backing` outlives the call.
            let r = unsafe {
                rustix::ioctl::ioctl(
                    &lo,
                    rustix::ioctl::IntegerSetter::<LOOP_SET_FD>::new_usize(fd),
                )
            };
            match r {
                Ok(()) => return Ok(dev.into()),
                Err(Errno::BUSY) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(std::io::Error::other("no free loop device"))
    }

    #[allow(unsafe_code)]
    fn detach_loop(&mut self, dev: &Path) -> std::io::Result<()> {
        use rustix::fs::{open, Mode, OFlags};
        const LOOP_CLR_FD: rustix::ioctl::Opcode = 0x4C01;
        let lo = open(dev, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
        // SAFETY: LOOP_CLR_FD takes no argument and touches no memory of ours.
        unsafe { rustix::ioctl::ioctl(&lo, rustix::ioctl::NoArg::<LOOP_CLR_FD>::new()) }?;
        Ok(())
    }
}

#[cfg(test)]
pub mod fake;
