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
pub mod fake {
    //! A recording fake of the kernel: files are a map, every call is recorded, and
    //! chosen calls fail with chosen errnos.

    use super::*;
    use std::collections::BTreeMap;

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
                        && table == crate::shutdown::MOUNTINFO
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
}
